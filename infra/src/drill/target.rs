//! What a drill needs from a cluster, as one small trait: where users reach it, which workers and
//! gateways it has, and the faults (and their undoing) a drill injects. The local cluster of
//! `herd up` ([`super::local`]) and the netns lab ([`super::lab`]) implement it; an inventory of
//! real machines can plug in the same way.

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// This cluster cannot do that at all (e.g. no standby gateway, one machine only); the drill
    /// reports "not applicable" with this reason.
    #[error("not applicable: {0}")]
    NotApplicable(String),
    /// The operation was tried and failed.
    #[error("{0}")]
    Failed(String),
}

impl TargetError {
    /// A [`TargetError::Failed`] from anything printable.
    pub fn failed(what: impl std::fmt::Display) -> Self {
        TargetError::Failed(what.to_string())
    }
}

/// One worker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id (what responses name in `x-herd-worker`).
    pub id: String,
    /// Its process id.
    pub pid: u32,
    /// The machine it runs on.
    pub machine: String,
}

/// One gateway of the cluster, with what its admin API says now.
#[derive(Debug, Clone, Default)]
pub struct GatewayInfo {
    /// Its id (what responses name in `x-herd-gateway`).
    pub name: String,
    /// The machine it runs on.
    pub machine: String,
    /// Whether it is the one serving the public address.
    pub active: bool,
    /// Its `/metrics` text, when it answered.
    pub metrics: Option<String>,
}

/// What a plain Redis restart is, in a drill's report.
pub const REDIS_RESTARTED: &str = "Redis stopped (SIGTERM) and started again";

/// How a drained worker stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It exited by itself within the grace period after SIGTERM.
    Drained,
    /// It was still running after the grace period and was killed.
    Killed,
}

/// A cluster a drill can run against. Every method is bounded in time.
pub trait ClusterHandle {
    /// One line naming the cluster, for the report.
    fn describe(&self) -> String;
    /// Where users reach it.
    fn public_addr(&self) -> SocketAddr;
    /// The network namespace users connect from (`None`: this host's own network).
    fn client_netns(&self) -> Option<String>;
    /// The gateway's whole-request timeout: no user should wait longer.
    fn request_timeout(&self) -> Duration;
    /// The workers, in a stable order.
    fn workers(&mut self) -> Vec<WorkerInfo>;
    /// Sends `signal` to worker `id` (SIGKILL, SIGSTOP, SIGCONT).
    fn signal_worker(&mut self, id: &str, signal: Signal) -> Result<(), TargetError>;
    /// Starts worker `id` again as it was (same id, address and machine) after it was killed or
    /// drained; returns once it listens.
    fn restart_worker(&mut self, id: &str) -> Result<(), TargetError>;
    /// Takes `machine`'s network link down (`up = false`) or brings it back.
    fn set_link(&mut self, machine: &str, up: bool) -> Result<(), TargetError>;
    /// The gateways, with their admin API's metrics.
    fn gateways(&mut self) -> Vec<GatewayInfo>;
    /// Sends `signal` to gateway `name`.
    fn signal_gateway(&mut self, name: &str, signal: Signal) -> Result<(), TargetError>;
    /// Starts gateway `name` again after it was killed or stopped.
    fn restart_gateway(&mut self, name: &str) -> Result<(), TargetError>;
    /// Stops Redis (SIGTERM: it writes what it must to disk) and starts it again on the same
    /// address and data directory — or, where Redis runs with Sentinel, fails the master over —
    /// and returns once it answers, with one line saying what was done.
    fn restart_redis(&mut self) -> Result<String, TargetError>;
    /// Starts Redis if it is not running (the undo of a restart that failed halfway).
    fn ensure_redis(&mut self) -> Result<(), TargetError>;
    /// Starts one more worker that joins through the registry; returns its id.
    fn add_worker(&mut self) -> Result<String, TargetError>;
    /// Drains worker `id` with SIGTERM; kills it if it hasn't exited after `grace`.
    fn drain_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError>;
    /// Removes a worker [`add_worker`](Self::add_worker) started (drained like
    /// [`drain_worker`](Self::drain_worker)) and forgets it.
    fn remove_added_worker(&mut self, id: &str, grace: Duration) -> Result<Stopped, TargetError>;
    /// Whether the active gateway sees every worker it knows healthy (its `/readyz`); when
    /// not, what it said instead.
    fn all_healthy(&mut self) -> Result<(), String>;
}
