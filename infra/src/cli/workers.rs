//! What `herd scale` and `herd rollout` share: where workers run ([`Placement`]), and the
//! active gateway's view of them ([`GatewayView`]), which decides when a new worker counts as
//! taking traffic.
//!
//! [`Placement`] is deliberately small (start one worker, drain and stop one); the local
//! cluster's [`LocalMachine`] runs processes on this machine's loopback. An inventory's machines
//! have their sibling in [`crate::deploy::scale`]: the same steps (start, wait until the active
//! gateway sends traffic, drain newest first, roll back a failed batch) over
//! [`crate::machine::Machine`], with the count recorded on the machines instead of a local state
//! file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::CliError;
use super::cluster::WORKER_GRACE;
use crate::pid::{self, ProcessId, Stopped};
use crate::process::Spec;
use crate::state::{Kind, Member, State, StateDir, Supervision};

/// How often the gateway's view is polled while waiting.
const POLL: Duration = Duration::from_millis(100);
/// Longest wait for one admin API answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Where workers run: start one from a spec, drain and stop one.
pub(crate) trait Placement {
    /// Starts a worker from `spec` and waits until it listens; returns its state-file member
    /// (with the spec pinned to its address, so the supervisor can restart it there).
    fn start(&self, spec: &Spec, image: &str) -> Result<Member, CliError>;
    /// Drains and stops a worker: SIGTERM (the worker announces it drains, so the gateway sends
    /// it nothing new, and exits once its in-flight requests are done), then SIGKILL after
    /// `grace`.
    fn stop(&self, member: &Member, grace: Duration) -> Stopped;
}

/// Processes on this machine (the cluster `herd up` starts).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LocalMachine;

impl Placement for LocalMachine {
    fn start(&self, spec: &Spec, image: &str) -> Result<Member, CliError> {
        let (process, pinned, addr) = super::cluster::start_worker(spec)?;
        let log = process.log_path().to_path_buf();
        let pid = process.detach();
        Ok(Member {
            name: spec.name.clone(),
            kind: Kind::Worker,
            process: ProcessId::of(pid),
            addr: Some(addr),
            admin_addr: None,
            log: Some(log),
            spec: Some(pinned),
            image: Some(image.to_string()),
            supervision: Supervision::default(),
        })
    }

    fn stop(&self, member: &Member, grace: Duration) -> Stopped {
        pid::stop_all(&[member.process], grace)[0]
    }
}

/// Drains and stops `members` in parallel (each is taken out of the state file first, so the
/// supervisor does not bring it back); returns one line per worker.
pub(crate) fn retire(
    placement: &(impl Placement + Sync),
    dir: &StateDir,
    members: &[Member],
) -> Result<Vec<String>, CliError> {
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    dir.update(|state| state.members.retain(|m| !names.contains(&m.name.as_str())))?;
    let outcomes: Vec<Stopped> = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .iter()
            .map(|member| scope.spawn(move || placement.stop(member, WORKER_GRACE)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Stopped::Survived))
            .collect()
    });
    Ok(members
        .iter()
        .zip(outcomes)
        .map(|(member, outcome)| {
            let (name, pid) = (&member.name, member.process.pid);
            match outcome {
                Stopped::Exited => format!("drained and stopped {name} (pid {pid})"),
                Stopped::NotRunning => format!("{name} (pid {pid}) was not running"),
                Stopped::Killed => format!(
                    "killed {name} (pid {pid}): it did not finish draining within {}s",
                    WORKER_GRACE.as_secs()
                ),
                Stopped::Survived => format!("{name} (pid {pid}) survived SIGKILL"),
            }
        })
        .collect())
}

/// The next free worker number of a cluster (`w{n}`): one past the highest recorded now. A
/// worker leaves the state file only once it has stopped, so a new one never takes the id of one
/// still draining (the registry then sees the reused id as a new incarnation).
pub(crate) fn next_worker_number(state: &State) -> u32 {
    state
        .workers()
        .filter_map(|m| m.id().strip_prefix('w')?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1
}

/// The workers of `image`, in start order.
pub(crate) fn of_image<'a>(state: &'a State, image: &str) -> Vec<&'a Member> {
    state
        .workers()
        .filter(|m| m.image.as_deref().unwrap_or(super::cluster::IMAGE) == image)
        .collect()
}

/// Refuses an image this cluster does not run.
pub(crate) fn check_image(state: &State, image: &str) -> Result<(), CliError> {
    if of_image(state, image).is_empty() {
        let mut images: Vec<String> = state
            .workers()
            .map(|m| {
                m.image
                    .clone()
                    .unwrap_or_else(|| super::cluster::IMAGE.into())
            })
            .collect();
        images.dedup();
        return Err(CliError::Usage(format!(
            "no image {image:?} in this cluster (it runs: {})",
            images.join(", ")
        )));
    }
    Ok(())
}

/// One worker as the gateway's admin API shows it.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub(crate) struct GatewayWorker {
    pub(crate) id: String,
    pub(crate) addr: String,
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) in_flight: u64,
    #[serde(default)]
    pub(crate) ewma_ms: f64,
    #[serde(default)]
    pub(crate) responses: BTreeMap<String, u64>,
    #[serde(default)]
    pub(crate) ejections: u64,
    #[serde(default)]
    pub(crate) flags: BTreeMap<String, bool>,
}

impl GatewayWorker {
    /// Whether new requests go to it (healthy, or ramping up in slow start).
    pub(crate) fn takes_traffic(&self) -> bool {
        matches!(self.state.as_str(), "healthy" | "slow_start")
    }

    /// Responses counted so far, all classes.
    pub(crate) fn answered(&self) -> u64 {
        self.responses.values().sum()
    }
}

/// A gateway's failover status (`GET /api/failover`), the fields herd shows.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Default)]
pub(crate) struct GatewayFailover {
    #[serde(default)]
    pub(crate) enabled: bool,
    #[serde(default)]
    pub(crate) role: Option<String>,
    #[serde(default)]
    pub(crate) epoch: Option<u64>,
    #[serde(default)]
    pub(crate) holds_address: Option<bool>,
    #[serde(default)]
    pub(crate) last_transition: Option<serde_json::Value>,
}

/// The admin API of the cluster's gateways.
#[derive(Debug, Clone)]
pub(crate) struct GatewayView {
    client: reqwest::Client,
    token: String,
    /// (name, admin address) of each gateway.
    gateways: Vec<(String, std::net::SocketAddr)>,
}

impl GatewayView {
    /// The gateways recorded in `state`.
    pub(crate) fn new(state: &State) -> Result<Self, CliError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(ADMIN_TIMEOUT)
            .build()
            .map_err(|error| CliError::Os {
                what: "build an HTTP client",
                source: std::io::Error::other(error),
            })?;
        let gateways = state
            .members
            .iter()
            .filter(|m| m.kind == Kind::Gateway)
            .filter_map(|m| Some((m.name.clone(), m.admin_addr?)))
            .collect();
        Ok(GatewayView {
            client,
            token: state.admin_token.clone(),
            gateways,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        admin: std::net::SocketAddr,
        path: &str,
    ) -> Result<T, String> {
        let response = self
            .client
            .get(format!("http://{admin}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status().as_u16()));
        }
        response.json().await.map_err(|e| e.to_string())
    }

    /// Each gateway's failover status (or why it could not be read), in record order.
    pub(crate) async fn failover(&self) -> Vec<(String, Result<GatewayFailover, String>)> {
        let mut out = Vec::new();
        for (name, admin) in &self.gateways {
            out.push((name.clone(), self.get(*admin, "/api/failover").await));
        }
        out
    }

    /// The admin address of the active gateway (the first that answers, when none says it is
    /// active: a lone gateway, or a pair between roles).
    pub(crate) async fn active(&self) -> Option<(String, std::net::SocketAddr)> {
        let mut answering = None;
        for (name, admin) in &self.gateways {
            if let Ok(status) = self.get::<GatewayFailover>(*admin, "/api/failover").await {
                if !status.enabled || status.role.as_deref() == Some("active") {
                    return Some((name.clone(), *admin));
                }
                answering.get_or_insert((name.clone(), *admin));
            }
        }
        answering
    }

    /// The workers as the active gateway sees them, and its name.
    pub(crate) async fn workers(&self) -> Result<(String, Vec<GatewayWorker>), String> {
        let (name, admin) = self
            .active()
            .await
            .ok_or_else(|| "no gateway answers its admin API".to_string())?;
        Ok((name, self.get(admin, "/api/workers").await?))
    }

    /// Each worker's latency quantiles by id, from the active gateway's dashboard
    /// document (`GET /api/dashboard`). The gateway computes them against its oldest reading of
    /// the last 5 s: after a quiet while, ask once, wait, and ask again.
    pub(crate) async fn latencies(
        &self,
    ) -> Result<BTreeMap<String, crate::deploy::admin::Latency>, String> {
        let (_, admin) = self
            .active()
            .await
            .ok_or_else(|| "no gateway answers its admin API".to_string())?;
        let document: serde_json::Value = self.get(admin, "/api/dashboard").await?;
        Ok(crate::deploy::admin::worker_latencies(&document))
    }

    /// Waits until the active gateway sends traffic to every worker in `ids`, with a progress
    /// bar; errors naming the ones that did not make it by `timeout`. `gone` says whether a
    /// worker's process has died (then there is no point waiting).
    pub(crate) async fn wait_taking_traffic(
        &self,
        ids: &[String],
        timeout: Duration,
        what: &str,
        gone: impl Fn(&str) -> bool,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let bar = progress(ids.len() as u64, what);
        let mut last;
        loop {
            let missing: Vec<&String> = match self.workers().await {
                Ok((_, workers)) => {
                    let missing: Vec<&String> = ids
                        .iter()
                        .filter(|id| !workers.iter().any(|w| &w.id == *id && w.takes_traffic()))
                        .collect();
                    last = workers
                        .iter()
                        .filter(|w| ids.contains(&w.id))
                        .map(|w| format!("{} {}", w.id, w.state))
                        .collect::<Vec<_>>()
                        .join(", ");
                    missing
                }
                Err(error) => {
                    last = error;
                    ids.iter().collect()
                }
            };
            bar.set_position((ids.len() - missing.len()) as u64);
            if missing.is_empty() {
                bar.finish_and_clear();
                return Ok(started.elapsed());
            }
            let dead: Vec<&&String> = missing.iter().filter(|id| gone(id)).collect();
            if !dead.is_empty() || started.elapsed() > timeout {
                bar.abandon();
                let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                let why = if dead.is_empty() {
                    format!(
                        "not taking traffic after {}",
                        humantime::format_duration(timeout)
                    )
                } else {
                    "the process exited".to_string()
                };
                return Err(format!(
                    "{}: {why} (gateway says: {})",
                    names.join(", "),
                    if last.is_empty() { "not listed" } else { &last }
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal, as in tests and CI logs).
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Whether the member named `name` in `dir`'s state file has a live process.
pub(crate) fn runs(dir: &StateDir, name: &str) -> bool {
    dir.load()
        .ok()
        .flatten()
        .and_then(|state| {
            state
                .members
                .iter()
                .find(|m| m.name == name)
                .map(|m| m.process.is_running())
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str) -> Member {
        Member {
            name: name.into(),
            kind: Kind::Worker,
            process: ProcessId::of(std::process::id()),
            addr: None,
            admin_addr: None,
            log: None,
            spec: None,
            image: None,
            supervision: Supervision::default(),
        }
    }

    #[test]
    fn new_workers_take_the_next_number_and_images_default_to_web() {
        let state = State {
            version: crate::state::VERSION,
            started_at: 0,
            detached: true,
            public_url: String::new(),
            admin_url: String::new(),
            admin_token: String::new(),
            redis_url: String::new(),
            redis_prefix: String::new(),
            members: vec![
                worker("worker-w1"),
                worker("worker-w7"),
                worker("worker-w3"),
            ],
            floating_ip: None,
        };
        assert_eq!(next_worker_number(&state), 8);
        assert_eq!(of_image(&state, "web").len(), 3);
        check_image(&state, "web").unwrap();
        let error = check_image(&state, "api").unwrap_err().to_string();
        assert!(
            error.contains("\"api\"") && error.contains("web"),
            "{error}"
        );
    }
}
