//! The processes of a cluster that `herd up` holds while it runs: starting them in order and
//! waiting until they are ready, watching them, stopping them in order, or letting them go.
//!
//! Order matters both ways. Up: Redis (everyone needs it), the workers (on port 0; their
//! listening lines tell their addresses), then the gateway listing them, and last a wait for
//! every worker's and the gateway's `/readyz`. Down: the gateway first (no new requests), the
//! workers together (SIGTERM, they drain in parallel), Redis last (draining workers still write
//! sessions).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::CliError;
use super::error::NotReady;
use super::signals::StopSignal;
use crate::pid::ProcessId;
use crate::process::{self, Process, ProcessError, Spec};
use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;
use crate::state::{Kind, Member, State, StateDir, VERSION};

/// How long a worker or the gateway gets to print its listening lines.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long, from the gateway's start, everything gets to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the gateway gets to exit after SIGTERM.
pub(crate) const GATEWAY_GRACE: Duration = Duration::from_secs(10);
/// How long workers get to drain and exit after SIGTERM (their drain lasts ~2.5 s when no
/// request arrives, which is the case once the gateway has stopped).
pub(crate) const WORKER_GRACE: Duration = Duration::from_secs(15);
/// How long Redis gets to flush and exit after SIGTERM.
pub(crate) const REDIS_GRACE: Duration = Duration::from_secs(10);
/// Lines of a process's log shown when it fails.
const TAIL_LINES: usize = 20;

/// What to start.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Number of workers.
    pub(crate) workers: u16,
    /// Gateway public listener.
    pub(crate) public: SocketAddr,
    /// Gateway admin listener.
    pub(crate) admin: SocketAddr,
    /// Fixed Redis port, or `None` for a free one.
    pub(crate) redis_port: Option<u16>,
    /// Start a local Redis Cluster (3 masters + 3 replicas) instead of one redis-server.
    pub(crate) redis_cluster: bool,
    /// Where logs, Redis data and state go.
    pub(crate) dir: StateDir,
    /// The gateway's admin token.
    pub(crate) token: String,
    /// Redis key prefix.
    pub(crate) prefix: String,
    /// The herd-worker executable.
    pub(crate) worker_program: PathBuf,
    /// The herd-gateway executable.
    pub(crate) gateway_program: PathBuf,
    /// The gateway pair's floating address on `lo`, when herd may add one (root).
    pub(crate) floating_ip: Option<std::net::Ipv4Addr>,
}

/// The image (worker app) of a local cluster: the demo web app that herd-worker serves.
pub(crate) const IMAGE: &str = "web";

/// A started worker or gateway.
#[derive(Debug)]
struct Server {
    process: Process,
    /// How it was started (with its listeners' real addresses, so a restart binds them again).
    spec: Spec,
    /// Public listener.
    addr: SocketAddr,
    /// Admin listener (gateway only).
    admin: Option<SocketAddr>,
}

/// The running processes (each killed if dropped; [`Cluster::stop`] stops them cleanly).
#[derive(Debug, Default)]
pub(crate) struct Cluster {
    redis: Option<RedisServer>,
    redis_cluster: Option<RedisCluster>,
    workers: Vec<Server>,
    /// The pair: the preferred gateway (`gateway-gw1`, on the public port) first.
    gateways: Vec<Server>,
}

impl Cluster {
    /// Starts everything in `plan` and waits until it is ready. On error, what has started
    /// stays in `self`, for the caller to [`stop`](Self::stop).
    pub(crate) async fn start(&mut self, plan: &Plan, stop: &StopSignal) -> Result<(), CliError> {
        let (port, data_dir, log_dir) = (plan.redis_port, plan.dir.redis_dir(), plan.dir.log_dir());
        let redis_url = if plan.redis_cluster {
            let cluster = blocking(move || {
                RedisCluster::start(3, 1, &data_dir, Duration::from_secs(2)).map_err(|error| {
                    CliError::Os {
                        what: "start the local Redis Cluster",
                        source: std::io::Error::other(error),
                    }
                })
            })
            .await?;
            let seeds = cluster.seeds().join(",");
            super::warn(format!("herd: Redis Cluster is up: {seeds}"));
            self.redis_cluster = Some(cluster);
            seeds
        } else {
            let redis = blocking(move || RedisServer::start(port, &data_dir, &log_dir)).await?;
            super::warn(format!("herd: redis-server is up on {}", redis.addr()));
            let url = redis.url();
            self.redis = Some(redis);
            url
        };
        interrupted(stop)?;

        let specs = (1..=plan.workers)
            .map(|n| worker_spec_of(plan, n, &redis_url))
            .collect();
        let watch = stop.clone();
        self.workers = blocking(move || start_servers(specs, &["public"], &watch)).await?;
        super::warn(format!(
            "herd: {} workers listen on {}",
            self.workers.len(),
            self.worker_addrs().join(", ")
        ));

        let peer_ports = (free_port()?, free_port()?);
        let specs = vec![
            gateway_spec(plan, 1, peer_ports, &redis_url),
            gateway_spec(plan, 2, peer_ports, &redis_url),
        ];
        let watch = stop.clone();
        self.gateways =
            blocking(move || start_servers(specs, &["public", "admin"], &watch)).await?;
        super::warn("herd: the gateway pair listens; waiting until it is ready");
        self.wait_ready(stop).await
    }

    /// Waits until every worker's `/readyz` and the gateway's admin `/readyz` answer 200.
    async fn wait_ready(&mut self, stop: &StopSignal) -> Result<(), CliError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .map_err(|error| CliError::Os {
                what: "build an HTTP client",
                source: std::io::Error::other(error),
            })?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let servers = self.workers.iter_mut().map(|w| (w, false));
        let gateway = self.gateways.iter_mut().map(|g| (g, true));
        for (server, is_gateway) in servers.chain(gateway) {
            let addr = if is_gateway {
                server.admin.unwrap_or(server.addr)
            } else {
                server.addr
            };
            let url = format!("http://{addr}/readyz");
            loop {
                let last = match client.get(&url).send().await {
                    Ok(response) if response.status().is_success() => break,
                    Ok(response) => format!("status {}", response.status().as_u16()),
                    Err(error) => error.to_string(),
                };
                interrupted(stop)?;
                if let Some(status) = server.process.try_wait() {
                    return Err(ProcessError::Exited {
                        name: server.process.name().to_string(),
                        status,
                        log: server.process.log_tail(TAIL_LINES),
                    }
                    .into());
                }
                if Instant::now() > deadline {
                    return Err(CliError::NotReady(Box::new(NotReady {
                        name: server.process.name().to_string(),
                        url,
                        last,
                        waited: READY_TIMEOUT,
                        log: server.process.log_path().to_path_buf(),
                        tail: server.process.log_tail(TAIL_LINES),
                    })));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    fn worker_addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.to_string()).collect()
    }

    /// The state file's view of this cluster; `supervisor` is the pid of a foreground `herd up`.
    pub(crate) fn state(&self, plan: &Plan, supervisor: Option<u32>) -> State {
        let mut members = Vec::new();
        if let Some(pid) = supervisor {
            members.push(Member {
                name: "herd".into(),
                kind: Kind::Supervisor,
                process: ProcessId::of(pid),
                addr: None,
                admin_addr: None,
                log: None,
                spec: None,
                image: None,
                supervision: Default::default(),
            });
        }
        for node in self.redis_cluster.iter().flat_map(RedisCluster::nodes) {
            members.push(Member {
                name: format!("redis-{}", node.port()),
                kind: Kind::Redis,
                process: ProcessId::of(node.pid().unwrap_or_default()),
                addr: Some(node.addr()),
                admin_addr: None,
                log: Some(node.log_path()),
                spec: None,
                image: None,
                supervision: Default::default(),
            });
        }
        if let Some(redis) = &self.redis {
            members.push(Member {
                name: "redis".into(),
                kind: Kind::Redis,
                process: ProcessId::of(redis.pid().unwrap_or_default()),
                addr: Some(redis.addr()),
                admin_addr: None,
                log: Some(redis.log_path()),
                spec: None,
                image: None,
                supervision: Default::default(),
            });
        }
        let servers = self.workers.iter().map(|w| (w, Kind::Worker));
        for (server, kind) in servers.chain(self.gateways.iter().map(|g| (g, Kind::Gateway))) {
            members.push(Member {
                name: server.process.name().to_string(),
                kind,
                process: ProcessId::of(server.process.pid()),
                addr: Some(server.addr),
                admin_addr: server.admin,
                log: Some(server.process.log_path().to_path_buf()),
                spec: Some(server.spec.clone()),
                image: (kind == Kind::Worker).then(|| IMAGE.to_string()),
                supervision: Default::default(),
            });
        }
        let public = self.gateways.first().map_or(plan.public, |g| g.addr);
        let admin = self
            .gateways
            .first()
            .and_then(|g| g.admin)
            .unwrap_or(plan.admin);
        State {
            version: VERSION,
            started_at: crate::state::now_unix(),
            detached: supervisor.is_none(),
            public_url: format!("http://{public}"),
            admin_url: format!("http://{admin}"),
            admin_token: plan.token.clone(),
            redis_url: self
                .redis
                .as_ref()
                .map(RedisServer::url)
                .or_else(|| self.redis_cluster.as_ref().map(|c| c.seeds().join(",")))
                .unwrap_or_default(),
            redis_prefix: plan.prefix.clone(),
            members,
            floating_ip: plan.floating_ip.map(|ip| ip.to_string()),
        }
    }

    /// Stops everything in order (gateway, workers, Redis), printing a line per process.
    pub(crate) fn stop(mut self) {
        for mut gateway in std::mem::take(&mut self.gateways) {
            let outcome = gateway.process.terminate(GATEWAY_GRACE);
            super::say(describe(&gateway.process, outcome, GATEWAY_GRACE));
        }
        // SIGTERM to all first, so they drain at the same time rather than one after the other.
        for worker in &self.workers {
            let _ = worker.process.signal(Signal::SIGTERM);
        }
        for mut worker in std::mem::take(&mut self.workers) {
            let outcome = worker.process.terminate(WORKER_GRACE);
            super::say(describe(&worker.process, outcome, WORKER_GRACE));
        }
        if let Some(mut redis) = self.redis.take() {
            let pid = redis.pid().unwrap_or_default();
            redis.stop();
            super::say(format!("stopped redis (pid {pid})"));
        }
        if let Some(cluster) = self.redis_cluster.take() {
            drop(cluster);
            super::say("stopped the Redis Cluster");
        }
    }

    /// Lets every process run on after herd exits (`--detach`).
    pub(crate) fn detach(mut self) {
        for gateway in std::mem::take(&mut self.gateways) {
            gateway.process.detach();
        }
        for worker in std::mem::take(&mut self.workers) {
            worker.process.detach();
        }
        if let Some(redis) = self.redis.take() {
            redis.detach();
        }
        if let Some(cluster) = self.redis_cluster.take() {
            cluster.detach();
        }
    }
}

/// One line saying how a process stopped.
fn describe(
    process: &Process,
    (status, clean): (Option<std::process::ExitStatus>, bool),
    grace: Duration,
) -> String {
    let (name, pid) = (process.name(), process.pid());
    match status {
        _ if !clean => format!(
            "killed {name} (pid {pid}): it did not exit within {}s of SIGTERM",
            grace.as_secs()
        ),
        Some(status) if status.success() => format!("stopped {name} (pid {pid})"),
        Some(status) => format!("stopped {name} (pid {pid}): {status}"),
        None => format!("stopped {name} (pid {pid})"),
    }
}

/// Errors with [`CliError::Interrupted`] once a stop signal has arrived.
fn interrupted(stop: &StopSignal) -> Result<(), CliError> {
    match stop.received() {
        Some(signal) => Err(CliError::Interrupted(signal)),
        None => Ok(()),
    }
}

/// Runs blocking `work` (process start-up polls and sleeps) off the async thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// Starts all `specs` at once, then waits for each one's listening lines for `roles`. If one
/// fails (or a stop signal arrives), those already started are killed as they are dropped.
fn start_servers(
    specs: Vec<Spec>,
    roles: &[&str],
    stop: &StopSignal,
) -> Result<Vec<Server>, CliError> {
    let mut started = Vec::with_capacity(specs.len());
    for spec in &specs {
        started.push((Process::spawn(spec)?, spec));
    }
    let mut servers = Vec::with_capacity(started.len());
    for (mut process, spec) in started {
        // `Process::wait_listening` can't be cut short by a signal; this wait can.
        let out = spec.log_dir.join(format!("{}.out", spec.name));
        let mut listening = Vec::new();
        process.wait_until(LISTEN_TIMEOUT, |_| {
            listening = process::read_listening(&out);
            stop.received().is_some()
                || roles.iter().all(|r| listening.iter().any(|l| l.role == *r))
        })?;
        interrupted(stop)?;
        let addr_of = |role: &str| listening.iter().find(|l| l.role == role).map(|l| l.addr);
        let addr = addr_of("public").expect("waited for the public listener");
        let admin = addr_of("admin");
        servers.push(Server {
            spec: pin_addresses(spec.clone(), addr, admin),
            addr,
            admin,
            process,
        });
    }
    Ok(servers)
}

/// `spec` with the addresses its listeners got (it may have asked for port 0), so that a
/// restart binds the same ones: the gateway finds a restarted worker where it was, and users
/// find the gateway where the banner said.
fn pin_addresses(spec: Spec, public: SocketAddr, admin: Option<SocketAddr>) -> Spec {
    if spec.env_value("HERD_WORKER_LISTEN").is_some() {
        return spec.set_env("HERD_WORKER_LISTEN", public.to_string());
    }
    let spec = spec.set_env("HERD_GATEWAY_LISTEN", public.to_string());
    match admin {
        Some(admin) => spec.set_env("HERD_GATEWAY_ADMIN__LISTEN", admin.to_string()),
        None => spec,
    }
}

fn free_port() -> Result<u16, CliError> {
    crate::ports::free_port().map_err(|source| CliError::Os {
        what: "find a free port for the gateways' peer link",
        source,
    })
}

/// The variable that points a process at Redis: `…_REDIS__URL` for one server, or
/// `…_REDIS__CLUSTER` for a Redis Cluster's seed list (the state file records it comma-separated).
fn redis_variable(prefix: &str, redis_url: &str) -> String {
    let key = if redis_url.contains(',') {
        "CLUSTER"
    } else {
        "URL"
    };
    format!("{prefix}_REDIS__{key}")
}

/// A worker of the local image, `w{n}`, on a free loopback port.
pub(crate) fn worker_spec(
    program: &std::path::Path,
    log_dir: &std::path::Path,
    n: u32,
    redis_url: &str,
    prefix: &str,
) -> Spec {
    let id = format!("w{n}");
    Spec::new(format!("worker-{id}"), program, log_dir)
        .arg("--log-format")
        .arg("pretty")
        .env("HERD_WORKER_LISTEN", "127.0.0.1:0")
        .env("HERD_WORKER_ID", id)
        .env("HERD_WORKER_MACHINE", "local")
        .env(redis_variable("HERD_WORKER", redis_url), redis_url)
        .env("HERD_WORKER_REDIS__PREFIX", prefix)
        .env("HERD_WORKER_REGISTRY__ENABLED", "true")
}

/// Starts a worker from `spec` and waits for its public listening line; returns the process and
/// the spec pinned to the address it got.
pub(crate) fn start_worker(spec: &Spec) -> Result<(Process, Spec, SocketAddr), CliError> {
    let process = Process::spawn_and_wait(spec, &["public"], LISTEN_TIMEOUT)?;
    let addr = process
        .addr("public")
        .expect("waited for the public listener");
    Ok((process, pin_addresses(spec.clone(), addr, None), addr))
}

fn worker_spec_of(plan: &Plan, n: u16, redis_url: &str) -> Spec {
    let spec = worker_spec(
        &plan.worker_program,
        &plan.dir.log_dir(),
        u32::from(n),
        redis_url,
        &plan.prefix,
    );
    let (key, value) = worker_threads(usize::from(plan.workers));
    spec.set_env(key, value)
}

/// The workers' `threads` setting.
pub(crate) const WORKER_THREADS: &str = "HERD_WORKER_THREADS";

/// The `threads` setting of a local worker started while its image has `workers` workers: the
/// value of `HERD_WORKER_THREADS` in herd's own environment if set (the operator's choice,
/// recorded with the worker's command), else the machine's CPUs shared among the workers.
/// `herd up`, `herd scale` and `herd rollout` set it on each worker they start.
pub(crate) fn worker_threads(workers: usize) -> (&'static str, String) {
    let value = std::env::var(WORKER_THREADS).unwrap_or_else(|_| {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        threads_per_worker(cpus, workers).to_string()
    });
    (WORKER_THREADS, value)
}

/// Threads for each of `workers` workers on one machine of `cpus` CPUs: the CPUs shared among
/// them, at least one each. A worker's default, one thread per CPU, would run workers × CPUs
/// threads, and on a machine they fill that costs the upstream side 10–20 % more CPU per request
/// (docs/performance.md, section 47).
fn threads_per_worker(cpus: usize, workers: usize) -> usize {
    (cpus / workers.max(1)).max(1)
}

/// Gateway `n` (1 or 2) of the pair. `gw1` is preferred and takes the public port; `gw2` is the
/// standby on a free port. Both run failover over a peer link on loopback; with
/// `plan.floating_ip`, the active holds that address on `lo`.
///
/// Workers are not listed statically: every worker registers in Redis under its id (`w1`…), so
/// the gateway, `herd status` and the `x-herd-worker` header all name it the same way, and
/// workers started later (`herd scale`, `herd rollout`) join without a restart.
fn gateway_spec(plan: &Plan, n: u8, peer_ports: (u16, u16), redis_url: &str) -> Spec {
    let (own, peer) = if n == 1 {
        peer_ports
    } else {
        (peer_ports.1, peer_ports.0)
    };
    let (public, admin) = if n == 1 {
        (plan.public, plan.admin)
    } else {
        (
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
    };
    let id = format!("gw{n}");
    let mut spec = Spec::new(
        format!("gateway-{id}"),
        &plan.gateway_program,
        &plan.dir.log_dir(),
    )
    .arg("--log-format")
    .arg("pretty")
    .env("HERD_GATEWAY_ID", &id)
    .env("HERD_GATEWAY_LISTEN", public.to_string())
    .env("HERD_GATEWAY_ADMIN__LISTEN", admin.to_string())
    .env("HERD_GATEWAY_ADMIN__TOKEN", &plan.token)
    .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
    .env(redis_variable("HERD_GATEWAY", redis_url), redis_url)
    .env("HERD_GATEWAY_REDIS__PREFIX", &plan.prefix)
    .env("HERD_GATEWAY_FAILOVER__ENABLED", "true")
    .env("HERD_GATEWAY_FAILOVER__LISTEN", format!("127.0.0.1:{own}"))
    .env("HERD_GATEWAY_FAILOVER__PEER", format!("127.0.0.1:{peer}"))
    .env("HERD_GATEWAY_FAILOVER__PREFERRED", (n == 1).to_string())
    .env("HERD_GATEWAY_FAILOVER__PREEMPT", "true");
    if let Some(ip) = plan.floating_ip {
        spec = spec
            .env("HERD_GATEWAY_FAILOVER__ADDRESS__IP", ip.to_string())
            .env("HERD_GATEWAY_FAILOVER__ADDRESS__PREFIX_LEN", "32")
            .env("HERD_GATEWAY_FAILOVER__ADDRESS__INTERFACE", "lo");
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_workers_share_the_cpus_at_least_one_thread_each() {
        assert_eq!(threads_per_worker(2, 3), 1);
        assert_eq!(threads_per_worker(2, 2), 1);
        assert_eq!(threads_per_worker(16, 3), 5);
        assert_eq!(threads_per_worker(8, 1), 8);
        assert_eq!(threads_per_worker(1, 0), 1);
        assert_eq!(threads_per_worker(8, 8), 1);
    }
}
