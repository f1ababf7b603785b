//! [`ClusterHandle`] for the local cluster of `herd up`, known from its state file alone.
//!
//! A cluster `herd up` supervises (the foreground `herd up`, or `herd supervise` of a detached
//! one) gets a killed worker or gateway back from its supervisor: the drill waits for that, as
//! it would happen without a drill. Redis is not supervised, and a cluster may run without a
//! supervisor: then the drill brings back what it took down itself, from how each process was
//! started (its command line and environment, read from `/proc` before any fault) — a worker on
//! the address the gateway knows it by. Scaling starts workers like `herd scale` (from a worker's
//! recorded spec, registered in the state file so the supervisor watches them) and drains them
//! after taking them out of the state file first (so the supervisor does not bring them back).
//! Every change to the state file is a locked read-modify-write ([`StateDir::update`]): the
//! supervisor edits it too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use super::target::{ClusterHandle, GatewayInfo, Stopped, TargetError, WorkerInfo};
use crate::cli::workers::{self, LocalMachine, Placement};
use crate::pid::{self, ProcessId};
use crate::process::{self, Process, Spec};
use crate::redis_server::RedisServer;
use crate::state::{Kind, Member, State, StateDir};

/// How long the supervisor gets to bring a dead process back (its first restart waits 0.5 s).
const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restarted process gets to listen again.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long Redis gets to write its data and exit after SIGTERM.
const REDIS_GRACE: Duration = Duration::from_secs(10);
/// The gateway's default whole-request timeout (`timeouts.request`).
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How a process was started: enough to start it again.
#[derive(Debug, Clone)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Launch {
    /// Reads `/proc/{pid}/cmdline` and `/proc/{pid}/environ`.
    fn of(pid: u32) -> Option<Launch> {
        let split = |bytes: Vec<u8>| -> Vec<String> {
            bytes
                .split(|b| *b == 0)
                .filter(|part| !part.is_empty())
                .map(|part| String::from_utf8_lossy(part).into_owned())
                .collect()
        };
        let cmdline = split(std::fs::read(format!("/proc/{pid}/cmdline")).ok()?);
        let environ = split(std::fs::read(format!("/proc/{pid}/environ")).ok()?);
        let (program, args) = cmdline.split_first()?;
        Some(Launch {
            program: program.into(),
            args: args.to_vec(),
            env: environ
                .iter()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The spec that starts it again as `name`, with `overrides` on top of its environment.
    fn spec(&self, name: &str, log_dir: &std::path::Path, overrides: &[(&str, String)]) -> Spec {
        let mut spec = Spec::new(name, &self.program, log_dir).args_from(self.args.clone());
        for (key, value) in &self.env {
            if !overrides.iter().any(|(k, _)| k == key) {
                spec = spec.env(key, value);
            }
        }
        for (key, value) in overrides {
            spec = spec.env(*key, value);
        }
        spec
    }
}

/// The local cluster of one state directory.
#[derive(Debug)]
pub struct LocalCluster {
    dir: StateDir,
    state: State,
    /// How each member was started, by member name.
    launches: HashMap<String, Launch>,
    /// Workers the drill added (by id).
    added: Vec<String>,
    /// Workers the drill drained and took out of the state file, by member name.
    retired: HashMap<String, Member>,
}

/// `GET url` (2 s at most); the body when it answered 2xx.
fn get(url: String) -> Option<String> {
    super::traffic::run_in(None, move || async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        let response = client.get(url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    })
    .ok()
    .flatten()
}

fn failed(what: impl std::fmt::Display) -> TargetError {
    TargetError::failed(what)
}

impl LocalCluster {
    /// Opens the cluster recorded in `dir`; errors if none runs there.
    pub fn open(dir: StateDir) -> Result<LocalCluster, TargetError> {
        let state = dir
            .load()
            .map_err(failed)?
            .filter(|state| !state.is_stale())
            .ok_or_else(|| {
                failed(format!(
                    "no herd cluster runs from {}; start one with `herd up --detach`",
                    dir.root().display()
                ))
            })?;
        let mut launches = HashMap::new();
        for member in &state.members {
            if member.kind != Kind::Supervisor
                && let Some(launch) = Launch::of(member.process.pid)
            {
                launches.insert(member.name.clone(), launch);
            }
        }
        Ok(LocalCluster {
            dir,
            state,
            launches,
            added: Vec::new(),
            retired: HashMap::new(),
        })
    }

    fn member(&self, name: &str) -> Result<&Member, TargetError> {
        self.state
            .members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| failed(format!("no member {name} in the state file")))
    }

    fn worker_name(id: &str) -> String {
        format!("worker-{id}")
    }

    /// Starts member `name` again from its recorded launch, on its recorded address when
    /// `listen_key` names the variable that sets it; records the new pid.
    fn respawn(
        &mut self,
        name: &str,
        roles: &[&str],
        listen_key: Option<&str>,
    ) -> Result<(), TargetError> {
        self.refresh();
        if let Some(member) = self.retired.remove(name) {
            // Drained by the drill (and so out of the state file): start it again like `herd scale`.
            let spec = member
                .spec
                .clone()
                .ok_or_else(|| failed(format!("{name} has no recorded command")))?;
            let image = member.image.clone().unwrap_or_else(|| "web".into());
            let started = LocalMachine.start(&spec, &image).map_err(failed)?;
            self.dir
                .update(|state| state.members.push(started))
                .map_err(failed)?;
            self.refresh();
            return Ok(());
        }
        if self.supervised() {
            return self.wait_for_supervisor(name);
        }
        let member = self.member(name)?.clone();
        let launch = self
            .launches
            .get(name)
            .ok_or_else(|| failed(format!("how {name} was started is unknown")))?
            .clone();
        // The old process must be gone (a restart after SIGKILL/SIGTERM; kill what lingers).
        member.process.signal(Signal::SIGKILL);
        pid::wait(Duration::from_secs(5), || !member.process.is_running());
        let log_dir = self.dir.log_dir();
        for ext in ["log", "out"] {
            let path = log_dir.join(format!("{name}.{ext}"));
            let _ = std::fs::rename(&path, log_dir.join(format!("{name}.{ext}.prev")));
        }
        let overrides: Vec<(&str, String)> = match (listen_key, member.addr) {
            (Some(key), Some(addr)) => vec![(key, addr.to_string())],
            _ => Vec::new(),
        };
        let spec = launch.spec(name, &log_dir, &overrides);
        let process = Process::spawn_and_wait(&spec, roles, START_TIMEOUT).map_err(failed)?;
        let new_pid = process.detach();
        self.update(name, |m| m.process = ProcessId::of(new_pid))
    }

    fn update(&mut self, name: &str, change: impl FnOnce(&mut Member)) -> Result<(), TargetError> {
        self.dir
            .update(|state| {
                if let Some(member) = state.members.iter_mut().find(|m| m.name == name) {
                    change(member);
                }
            })
            .map_err(failed)?;
        self.refresh();
        Ok(())
    }

    /// Reads the state file again (the supervisor records the processes it restarts).
    fn refresh(&mut self) {
        if let Ok(Some(state)) = self.dir.load() {
            self.state = state;
        }
    }

    /// Whether a supervisor restarts the cluster's dead workers and gateways.
    fn supervised(&self) -> bool {
        self.state
            .members
            .iter()
            .any(|m| m.kind == Kind::Supervisor && m.process.is_running())
    }

    /// Waits until the supervisor has `name` running again.
    fn wait_for_supervisor(&mut self, name: &str) -> Result<(), TargetError> {
        let deadline = std::time::Instant::now() + SUPERVISOR_TIMEOUT;
        loop {
            self.refresh();
            if self.member(name)?.process.is_running() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(failed(format!(
                    "the supervisor did not start {name} again within {} s",
                    SUPERVISOR_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster's one Redis server. A Redis Cluster (`herd up --redis-cluster`, one member
    /// per node) is not restarted here: stopping one node and starting a plain server in its
    /// place would fake the fault and break the cluster.
    fn redis(&self) -> Result<Member, TargetError> {
        let nodes: Vec<&Member> = self
            .state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Redis)
            .collect();
        match nodes[..] {
            [] => Err(failed("the cluster has no Redis member")),
            [one] => Ok(one.clone()),
            _ => Err(TargetError::NotApplicable(format!(
                "this cluster runs a Redis Cluster ({} nodes); the drill restarts one Redis server",
                nodes.len()
            ))),
        }
    }

    fn gateway_launch(&self) -> Option<&Launch> {
        self.state
            .members
            .iter()
            .find(|m| m.kind == Kind::Gateway)
            .and_then(|m| self.launches.get(&m.name))
    }
}

impl ClusterHandle for LocalCluster {
    fn describe(&self) -> String {
        format!("local cluster in {}", self.dir.root().display())
    }

    fn public_addr(&self) -> SocketAddr {
        self.state
            .public_url
            .trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    fn client_netns(&self) -> Option<String> {
        None
    }

    fn request_timeout(&self) -> Duration {
        self.gateway_launch()
            .and_then(|l| l.env("HERD_GATEWAY_TIMEOUTS__REQUEST"))
            .and_then(|v| humantime::parse_duration(v).ok())
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }

    fn workers(&mut self) -> Vec<WorkerInfo> {
        self.refresh();
        self.state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Worker)
            .map(|m| WorkerInfo {
                id: m.name.trim_start_matches("worker-").to_string(),
                pid: m.process.pid,
                machine: "local".into(),
            })
            .collect()
    }

    fn signal_worker(&mut self, id: &str, signal: Signal) -> Result<(), TargetError> {
        self.refresh();
        let member = self.member(&Self::worker_name(id))?;
        process::signal_pid(member.process.pid, signal).map_err(failed)
    }

    fn restart_worker(&mut self, id: &str) -> Result<(), TargetError> {
        self.respawn(
            &Self::worker_name(id),
            &["public"],
            Some("HERD_WORKER_LISTEN"),
        )
    }

    fn set_link(&mut self, _machine: &str, _up: bool) -> Result<(), TargetError> {
        Err(TargetError::NotApplicable(
            "the local cluster runs on one machine".into(),
        ))
    }

    fn gateways(&mut self) -> Vec<GatewayInfo> {
        self.refresh();
        let gateways: Vec<Member> = self
            .state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Gateway)
            .cloned()
            .collect();
        let single = gateways.len() == 1;
        gateways
            .into_iter()
            .map(|m| {
                let metrics = m
                    .admin_addr
                    .and_then(|admin| get(format!("http://{admin}/metrics")));
                let active = single
                    || metrics.as_deref().is_some_and(|t| {
                        t.contains("herd_gateway_failover_role{role=\"active\"} 1")
                    });
                GatewayInfo {
                    name: m.name.clone(),
                    machine: "local".into(),
                    active,
                    metrics,
                }
            })
            .collect()
    }

    fn signal_gateway(&mut self, name: &str, signal: Signal) -> Result<(), TargetError> {
        self.refresh();
        let member = self.member(name)?;
        process::signal_pid(member.process.pid, signal).map_err(failed)
    }

    fn restart_gateway(&mut self, name: &str) -> Result<(), TargetError> {
        self.respawn(name, &["public", "admin"], None)
    }

    fn restart_redis(&mut self) -> Result<String, TargetError> {
        let redis = self.redis()?;
        let outcome = pid::stop_all(&[redis.process], REDIS_GRACE);
        match outcome.first() {
            Some(pid::Stopped::Exited) => {}
            Some(pid::Stopped::Killed) => {
                return Err(failed(format!(
                    "redis-server did not exit within {} s of SIGTERM",
                    REDIS_GRACE.as_secs()
                )));
            }
            // Not running, or still running: either way there was no restart to drill.
            other => {
                return Err(failed(format!(
                    "redis-server was not stopped as a restart needs ({other:?})"
                )));
            }
        }
        self.ensure_redis()?;
        Ok(super::target::REDIS_RESTARTED.to_string())
    }

    fn ensure_redis(&mut self) -> Result<(), TargetError> {
        let redis = match self.redis() {
            Ok(redis) => redis,
            // A Redis Cluster is never restarted here (see `redis`): nothing to bring back.
            Err(TargetError::NotApplicable(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        if redis.process.is_running() {
            return Ok(());
        }
        // redis-server rewrites its command line (`redis-server 127.0.0.1:6400`), so it is started
        // as `herd up` starts it: same port, same data directory, append-only.
        let port = redis
            .addr
            .map(|a| a.port())
            .ok_or_else(|| failed("the state file has no Redis address"))?;
        let server = RedisServer::start(Some(port), &self.dir.redis_dir(), &self.dir.log_dir())
            .map_err(failed)?;
        let new_pid = server.detach().unwrap_or_default();
        self.update(&redis.name, |m| m.process = ProcessId::of(new_pid))
    }

    fn add_worker(&mut self) -> Result<String, TargetError> {
        self.refresh();
        let template = self
            .state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Worker)
            .find_map(|m| m.spec.clone().map(|spec| (spec, m.image.clone())))
            .ok_or_else(|| failed("no worker with a recorded command to copy"))?;
        let (template, image) = template;
        let image = image.unwrap_or_else(|| "web".into());
        let n = workers::next_worker_number(&self.state);
        let spec = crate::cli::rollout::respec(&template, n, None, &[]);
        let member = LocalMachine.start(&spec, &image).map_err(failed)?;
        let id = member.id().to_string();
        self.dir
            .update(|state| state.members.push(member))
            .map_err(failed)?;
        self.refresh();
        self.added.push(id.clone());
        Ok(id)
    }

    fn drain_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        self.refresh();
        let name = Self::worker_name(id);
        let member = self.member(&name)?.clone();
        let process = member.process;
        // Out of the state file first, so the supervisor does not bring it back; kept here so
        // the drill can start it again afterwards.
        self.dir
            .update(|state| state.members.retain(|m| m.name != name))
            .map_err(failed)?;
        self.retired.insert(name, member);
        Ok(match pid::stop_all(&[process], grace).first() {
            Some(pid::Stopped::Killed) | Some(pid::Stopped::Survived) => Stopped::Killed,
            _ => Stopped::Drained,
        })
    }

    fn remove_added_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError> {
        let stopped = self.drain_worker(id, grace)?;
        let name = Self::worker_name(id);
        self.retired.remove(&name);
        self.added.retain(|a| a != id);
        self.launches.remove(&name);
        self.refresh();
        Ok(stopped)
    }

    fn all_healthy(&mut self) -> Result<(), String> {
        // The active gateway's view (the pair's standby sees the same workers, but only the
        // active one's traffic revives an ejected worker).
        let gateways = self.gateways();
        let admin = self
            .state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Gateway)
            .filter(|m| gateways.iter().any(|g| g.name == m.name && g.active))
            .chain(
                self.state
                    .members
                    .iter()
                    .filter(|m| m.kind == Kind::Gateway),
            )
            .find_map(|m| m.admin_addr)
            .ok_or_else(|| "no gateway admin address in the state file".to_string())?;
        let body = get(format!("http://{admin}/readyz"))
            .ok_or_else(|| format!("the gateway's /readyz on {admin} did not answer 200"))?;
        healthy(&body, self.workers().len())
    }
}

/// Whether a gateway's `/readyz` body says every worker it knows is healthy, and that it knows
/// at least the `expected` workers the cluster runs: a restarted worker that never registered
/// again drops out of both of the gateway's counts, and must not pass for healthy.
pub(super) fn healthy(body: &str, expected: usize) -> Result<(), String> {
    let ready: Value = serde_json::from_str(body).map_err(|e| format!("/readyz: {e}"))?;
    let healthy = ready["healthy"].as_u64();
    if ready["ready"] == true
        && healthy.is_some_and(|h| h >= expected as u64)
        && ready["healthy"] == ready["workers"]
    {
        Ok(())
    } else {
        Err(format!("/readyz said {body} ({expected} workers run)"))
    }
}

#[cfg(test)]
mod tests {
    use super::healthy;

    #[test]
    fn healthy_needs_every_known_worker_healthy_and_every_running_one_known() {
        let body = |healthy: u64, workers: u64| {
            format!(r#"{{"ready":true,"healthy":{healthy},"workers":{workers}}}"#)
        };
        assert!(healthy(&body(3, 3), 3).is_ok());
        assert!(
            healthy(&body(2, 3), 3).is_err(),
            "one known worker is not healthy"
        );
        // A restarted worker that never registered again: the gateway knows 2, 3 run.
        let error = healthy(&body(2, 2), 3).unwrap_err();
        assert!(error.contains("3 workers run"), "{error}");
        assert!(healthy(r#"{"ready":false,"healthy":3,"workers":3}"#, 3).is_err());
        assert!(healthy("not json", 0).is_err());
    }
}
