//! The multi-host lab: the gateway pair's world on one box, for failover tests and drills.
//!
//! ```text
//!                       bridge (own namespace), 10.200.0.0/24, floating address .10
//!   client .100 ─┐
//!   gw1 .11 ─────┤   herd-gateway (preferred), peer link :7946, public :8080
//!   gw2 .12 ─────┤   herd-gateway, peer link :7946, public :8080
//!   redis .5 ────┤   redis-server :6379
//!   m1 .21 ──────┤   herd-worker :8081, :8082 …
//!   m2 .22 ──────┘   herd-worker :8081, :8082 …
//! ```
//!
//! Every process runs inside its host's namespace; dropping the [`Lab`] kills them and then
//! removes every namespace, also when a test panics.

pub mod compare;
mod observe;

pub use observe::{FaultRun, SERVED_BY};

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::binaries;
use crate::netns::{HostSpec, NetnsError, Topology};
use crate::process::{Process, ProcessError, Spec};
use crate::redis_server::{RedisServer, RedisServerError};

/// How long a new lab waits for gw1 to serve before it starts gw2.
const GW1_FIRST: Duration = Duration::from_secs(10);

/// The lab segment.
pub const SUBNET: [u8; 3] = [10, 200, 0];
/// Last octet of the floating address.
pub const FLOATING_OCTET: u8 = 10;
/// The gateways' public port.
pub const PUBLIC_PORT: u16 = 8080;
/// The gateways' peer-link port.
pub const PEER_PORT: u16 = 7946;
/// The gateways' admin port (on each gateway host's loopback).
pub const ADMIN_PORT: u16 = 9090;
/// Redis' port.
pub const REDIS_PORT: u16 = 6379;
/// The first worker port on each worker machine.
const FIRST_WORKER_PORT: u16 = 8081;
/// How long a process gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The admin token of the lab's gateways.
pub const ADMIN_TOKEN: &str = "lab-token";
/// The two gateway hosts.
pub const GATEWAYS: [&str; 2] = ["gw1", "gw2"];

/// Which gateway pair runs on gw1 / gw2.
#[derive(Debug, Clone, PartialEq)]
pub enum Pair {
    /// Two herd-gateways with failover on.
    Herd,
    /// HAProxy + keepalived on each host (the reference), VRRP `version` with adverts every
    /// `advert_int` seconds; configs in `infra/failover-lab/`.
    Keepalived {
        /// VRRP version (2 or 3).
        version: u8,
        /// Advert interval in seconds (1 by default; VRRPv3 takes 0.1).
        advert_int: f64,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The gateway pair.
    pub pair: Pair,
    /// Worker machines (`m1`, `m2`, …).
    pub machines: usize,
    /// Workers on each machine.
    pub workers_per_machine: usize,
    /// Whether gw1 (preferred) takes the role back when it returns.
    pub preempt: bool,
    /// Extra environment for both gateways.
    pub gateway_env: Vec<(String, String)>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            pair: Pair::Herd,
            machines: 2,
            workers_per_machine: 2,
            preempt: false,
            gateway_env: Vec::new(),
        }
    }
}

/// Why the lab could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The namespaces.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Redis.
    #[error(transparent)]
    Redis(#[from] RedisServerError),
    /// A herd process.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A binary is missing.
    #[error(transparent)]
    Binary(#[from] binaries::NotFound),
    /// HAProxy or keepalived is missing.
    #[error(transparent)]
    Deps(#[from] crate::deps::DepsError),
    /// A gateway could not be signalled: it was never started, or the signal failed.
    #[error("cannot signal gateway {name}: {reason}")]
    Signal {
        /// The gateway.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// A config file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running lab. Field order is drop order: processes first, the namespaces last.
#[derive(Debug)]
pub struct Lab {
    /// Per gateway host: the proxy first (herd-gateway or haproxy), then keepalived if any.
    gateways: [Vec<Process>; 2],
    workers: Vec<Process>,
    /// How each worker was started (same index as `workers`), to start it again.
    worker_specs: Vec<Spec>,
    redis: RedisServer,
    topology: Topology,
    options: LabOptions,
    log_dir: PathBuf,
}

impl Lab {
    /// Builds the topology and starts Redis, the workers and both gateways (gw1 first, so it
    /// becomes the active one).
    pub fn start(options: LabOptions, log_dir: &Path) -> Result<Lab, LabError> {
        let mut hosts = vec![
            HostSpec::new("client", 100),
            HostSpec::new("gw1", 11).nonlocal_bind(),
            HostSpec::new("gw2", 12).nonlocal_bind(),
            HostSpec::new("redis", 5),
        ];
        for machine in 1..=options.machines {
            hosts.push(HostSpec::new(format!("m{machine}"), 20 + machine as u8));
        }
        let topology = Topology::create(SUBNET, &hosts)?;
        let redis_host = topology.host("redis")?.clone();
        let data_dir = log_dir.join("redis-data");
        std::fs::create_dir_all(&data_dir).map_err(|source| ProcessError::Log {
            path: data_dir.display().to_string(),
            source,
        })?;
        let redis = RedisServer::start_in_netns(
            &redis_host.netns,
            redis_host.addr,
            REDIS_PORT,
            &data_dir,
            log_dir,
        )?;
        let worker_program = binaries::locate(binaries::WORKER)?;
        let mut workers = Vec::new();
        let mut worker_specs = Vec::new();
        for machine in 1..=options.machines {
            let host = topology.host(&format!("m{machine}"))?.clone();
            for n in 0..options.workers_per_machine {
                let spec = worker_spec(&worker_program, &host, n + 1, &redis.url(), log_dir);
                workers.push(Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?);
                worker_specs.push(spec);
            }
        }
        let mut lab = Lab {
            gateways: [Vec::new(), Vec::new()],
            workers,
            worker_specs,
            redis,
            topology,
            options,
            log_dir: log_dir.to_path_buf(),
        };
        lab.start_gateway(0)?;
        if matches!(lab.options.pair, Pair::Herd) {
            // gw1 (the preferred one) takes the role before gw2 exists, as `herd up --inventory`
            // does: started together, gw2 sometimes found the lease free first and kept it
            // (without preempt it never hands back), and the lab began with the other holder.
            // Bounded; a gw1 that never serves is the caller's to report.
            let _ = lab.wait_serving("gw1", GW1_FIRST);
        }
        lab.start_gateway(1)?;
        Ok(lab)
    }

    /// Starts gateway `index` (0 = gw1, 1 = gw2), e.g. again after it was killed.
    pub fn start_gateway(&mut self, index: usize) -> Result<(), LabError> {
        let mut previous = Vec::new();
        for mut old in self.gateways[index].drain(..) {
            old.kill();
            previous.push(old.name().to_string());
        }
        for name in previous {
            // Best effort: a drill must not fail for want of an old log.
            let _ = Process::keep_previous_logs(&self.log_dir, &name);
        }
        let processes = match self.options.pair.clone() {
            Pair::Herd => vec![self.start_herd_gateway(index)?],
            Pair::Keepalived {
                version,
                advert_int,
            } => self.start_keepalived_pair_member(index, version, advert_int)?,
        };
        self.gateways[index] = processes;
        Ok(())
    }

    fn worker_addrs(&self) -> Vec<SocketAddr> {
        self.workers
            .iter()
            .filter_map(|w| w.addr("public"))
            .collect()
    }

    fn start_herd_gateway(&self, index: usize) -> Result<Process, LabError> {
        let name = GATEWAYS[index];
        let peer = self.topology.host(GATEWAYS[1 - index])?.addr;
        // Named as the workers name themselves (`m1-w1=10.200.0.21:8081`), so that the gateway's
        // per-worker metrics and `x-herd-worker` agree (a drill finds the busiest worker by name).
        let workers = self
            .workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                Some(format!(
                    "{}={}",
                    self.worker_identity(i).0,
                    w.addr("public")?
                ))
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut spec = Spec::new(name, binaries::locate(binaries::GATEWAY)?, &self.log_dir)
            .env("HERD_GATEWAY_ID", name)
            .env("HERD_GATEWAY_LISTEN", format!("0.0.0.0:{PUBLIC_PORT}"))
            .env(
                "HERD_GATEWAY_ADMIN__LISTEN",
                format!("127.0.0.1:{ADMIN_PORT}"),
            )
            .env("HERD_GATEWAY_ADMIN__TOKEN", ADMIN_TOKEN)
            .env("HERD_GATEWAY_WORKERS", workers)
            .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
            .env("HERD_GATEWAY_REDIS__URL", self.redis.url())
            .env("HERD_GATEWAY_FAILOVER__ENABLED", "true")
            .env(
                "HERD_GATEWAY_FAILOVER__LISTEN",
                format!("0.0.0.0:{PEER_PORT}"),
            )
            .env("HERD_GATEWAY_FAILOVER__PEER", format!("{peer}:{PEER_PORT}"))
            .env("HERD_GATEWAY_FAILOVER__PREFERRED", (index == 0).to_string())
            .env(
                "HERD_GATEWAY_FAILOVER__PREEMPT",
                self.options.preempt.to_string(),
            )
            .env(
                "HERD_GATEWAY_FAILOVER__ADDRESS__IP",
                self.floating_ip().to_string(),
            )
            .env("HERD_GATEWAY_FAILOVER__ADDRESS__INTERFACE", "eth0")
            .env("HERD_LOG", "info")
            .arg("--log-format")
            .arg("json");
        for (key, value) in &self.options.gateway_env {
            spec = spec.env(key, value);
        }
        let spec = self.topology.spec_in(name, spec)?;
        Ok(Process::spawn_and_wait(
            &spec,
            &["public", "admin"],
            START_TIMEOUT,
        )?)
    }

    /// HAProxy + keepalived on gateway host `index`, from the templates in `infra/failover-lab/`
    /// (the team's anchor lab configs with this lab's addresses).
    fn start_keepalived_pair_member(
        &self,
        index: usize,
        version: u8,
        advert_int: f64,
    ) -> Result<Vec<Process>, LabError> {
        let haproxy = crate::deps::ensure(crate::deps::HAPROXY)?;
        let keepalived = crate::deps::ensure(crate::deps::KEEPALIVED)?;
        crate::deps::ensure(crate::deps::CURL)?;
        let name = GATEWAYS[index];
        let servers: String = self
            .worker_addrs()
            .iter()
            .enumerate()
            .map(|(n, addr)| format!("    server w{n} {addr} check inter 1s fall 2 rise 2\n"))
            .collect();
        let haproxy_cfg = self.log_dir.join(format!("haproxy-{name}.cfg"));
        write(
            &haproxy_cfg,
            &include_str!("../../failover-lab/haproxy.cfg.in")
                .replace("{NAME}", name)
                .replace("{PORT}", &PUBLIC_PORT.to_string())
                .replace("{SERVERS}", &servers),
        )?;
        let check = self.log_dir.join(format!("chk-{name}.sh"));
        write(&check, include_str!("../../failover-lab/chk_haproxy.sh"))?;
        set_executable(&check)?;
        let keepalived_cfg = self.log_dir.join(format!("keepalived-{name}.conf"));
        write(
            &keepalived_cfg,
            &include_str!("../../failover-lab/keepalived.conf.in")
                .replace("{NAME}", name)
                .replace("{VERSION}", &version.to_string())
                .replace("{CHECK}", &check.display().to_string())
                .replace("{STATE}", if index == 0 { "MASTER" } else { "BACKUP" })
                .replace("{PRIORITY}", if index == 0 { "101" } else { "100" })
                .replace("{ADVERT}", &advert_int.to_string())
                .replace("{VIP}", &self.floating_ip().to_string()),
        )?;
        let proxy = Spec::new(format!("haproxy-{name}"), haproxy, &self.log_dir)
            .arg("-db")
            .arg("-f")
            .arg(haproxy_cfg.display().to_string());
        let proxy = Process::spawn(&self.topology.spec_in(name, proxy)?)?;
        let pid_file = |kind: &str| {
            self.log_dir
                .join(format!("keepalived-{name}-{kind}.pid"))
                .display()
                .to_string()
        };
        let vrrp = Spec::new(format!("keepalived-{name}"), keepalived, &self.log_dir)
            .args_from(["-n", "-l", "-D", "-f"])
            .arg(keepalived_cfg.display().to_string())
            .arg("-p")
            .arg(pid_file("main"))
            .arg("-r")
            .arg(pid_file("vrrp"))
            .arg("-c")
            .arg(pid_file("checkers"));
        let vrrp = Process::spawn(&self.topology.spec_in(name, vrrp)?)?;
        Ok(vec![proxy, vrrp])
    }

    /// Starts worker `index` again (same id, machine and address), e.g. after it was killed;
    /// the old process is killed first if it still runs.
    pub fn restart_worker(&mut self, index: usize) -> Result<(), LabError> {
        self.workers[index].kill();
        let spec = self.worker_specs[index].clone();
        self.workers[index] = Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?;
        Ok(())
    }

    /// Starts one more worker on machine `machine` (`m1`, …) on the next free worker port; it
    /// joins through the Redis registry. Returns its index.
    pub fn add_worker(&mut self, machine: &str) -> Result<usize, LabError> {
        let host = self.topology.host(machine)?.clone();
        let on_machine = self
            .worker_specs
            .iter()
            .filter(|spec| {
                spec.env
                    .iter()
                    .any(|(k, v)| k == "HERD_WORKER_MACHINE" && *v == host.name)
            })
            .count();
        let program = binaries::locate(binaries::WORKER)?;
        let spec = worker_spec(
            &program,
            &host,
            on_machine + 1,
            &self.redis.url(),
            &self.log_dir,
        );
        self.workers
            .push(Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?);
        self.worker_specs.push(spec);
        Ok(self.workers.len() - 1)
    }

    /// Forgets worker `index` (killed if it still runs): undoes [`add_worker`](Self::add_worker).
    pub fn forget_worker(&mut self, index: usize) {
        let mut process = self.workers.remove(index);
        process.kill();
        self.worker_specs.remove(index);
    }

    /// Worker `index`'s id (`m1-w1`) and machine (`m1`).
    pub fn worker_identity(&self, index: usize) -> (String, String) {
        let value = |key: &str| {
            self.worker_specs[index]
                .env
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        (value("HERD_WORKER_ID"), value("HERD_WORKER_MACHINE"))
    }

    /// Sends `signal` to gateway `index` (kill -9 is `SIGKILL`); its handle stays, so this needs
    /// only a shared borrow — a test can inject it while other threads probe. An error when the
    /// gateway was never started or the signal failed: a drill must not report a fault it did
    /// not make.
    pub fn signal_gateway(
        &self,
        index: usize,
        signal: nix::sys::signal::Signal,
    ) -> Result<(), LabError> {
        let name = GATEWAYS[index];
        let proxy = self.gateways[index].first().ok_or(LabError::Signal {
            name,
            reason: "it was never started".into(),
        })?;
        proxy.signal(signal).map_err(|errno| LabError::Signal {
            name,
            reason: errno.to_string(),
        })
    }

    /// The worker processes.
    pub fn workers(&mut self) -> &mut [Process] {
        &mut self.workers
    }

    /// Redis.
    pub fn redis(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    /// The namespaces.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The floating address.
    pub fn floating_ip(&self) -> Ipv4Addr {
        self.topology.address(FLOATING_OCTET)
    }

    /// Where users reach the pair.
    pub fn public_addr(&self) -> SocketAddr {
        SocketAddr::from((self.floating_ip(), PUBLIC_PORT))
    }

    /// The gateway hosts that hold the floating address right now.
    pub fn address_holders(&self) -> Vec<&'static str> {
        GATEWAYS
            .into_iter()
            .filter(|name| {
                self.topology
                    .holds(name, self.floating_ip())
                    .unwrap_or(false)
            })
            .collect()
    }
}

/// Worker number `n` of machine `host`: id `{machine}-w{n}`, port `8080 + n`.
fn worker_spec(
    program: &Path,
    host: &crate::netns::Host,
    n: usize,
    redis_url: &str,
    log_dir: &Path,
) -> Spec {
    let port = FIRST_WORKER_PORT + (n - 1) as u16;
    let id = format!("{}-w{n}", host.name);
    Spec::new(format!("worker-{id}"), program, log_dir)
        .env("HERD_WORKER_ID", &id)
        .env("HERD_WORKER_MACHINE", &host.name)
        .env("HERD_WORKER_LISTEN", format!("{}:{port}", host.addr))
        .env("HERD_WORKER_REDIS__URL", redis_url)
        .env("HERD_LOG", "info")
        .arg("--log-format")
        .arg("json")
        .in_netns(&host.netns)
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|source| LabError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn set_executable(path: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        LabError::Write {
            path: path.display().to_string(),
            source,
        }
    })
}
