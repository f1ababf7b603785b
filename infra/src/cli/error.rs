//! Why a `herd` command failed, and the exit code each failure gets.

use std::path::PathBuf;
use std::time::Duration;

use crate::bench::BenchError;
use crate::binaries::NotFound;
use crate::process::ProcessError;
use crate::redis_server::RedisServerError;
use crate::state::StateError;

/// Exit code: everything is fine.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed, or (for `status`) something is down.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad flags (the same code clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of `herd status` when no cluster is running.
pub const EXIT_NOT_RUNNING: u8 = 3;
/// Exit code when Ctrl-C or SIGTERM cut `herd up` short before the cluster was up (128 + SIGINT,
/// as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Flags that don't fit together.
    #[error("{0}")]
    Usage(String),
    /// A lab experiment could not run.
    #[error("lab: {0}")]
    Lab(String),
    /// The state directory could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// `herd up` while a cluster from the same state directory still runs.
    #[error(
        "a herd cluster started at {started} is still running from {dir} ({running}); stop it with `{herd} down --state-dir {dir}`, or use another --state-dir"
    )]
    AlreadyRunning {
        /// How the user runs herd (`./infra/herd` from a checkout).
        herd: String,
        /// The state directory.
        dir: PathBuf,
        /// When that cluster came up.
        started: String,
        /// Names and pids of its running processes.
        running: String,
    },
    /// A fixed port is taken by some other program (or not ours to bind).
    #[error(
        "port {port} (from {flag}) is not free: {source}; pick another with {flag} (0 = any free port)"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// The flag that set it.
        flag: &'static str,
        /// The bind error.
        source: std::io::Error,
    },
    /// The gateway or worker executable is missing.
    #[error(transparent)]
    Binary(#[from] NotFound),
    /// Redis did not start.
    #[error("redis-server did not start: {0}")]
    Redis(#[from] RedisServerError),
    /// A worker or the gateway did not start.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A process started but did not become ready in time (boxed: it is large, and rare).
    #[error(transparent)]
    NotReady(Box<NotReady>),
    /// Ctrl-C or SIGTERM arrived while the cluster was starting.
    #[error("interrupted by {0} while starting; stopped everything that had started")]
    Interrupted(&'static str),
    /// Something of the operating system failed (runtime, signal handlers, random source).
    #[error("cannot {what}: {source}")]
    Os {
        /// What we tried.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A benchmark failed or was interrupted.
    #[error("bench: {0}")]
    Bench(#[from] BenchError),
    /// `herd up|down|status --inventory` failed on the machines.
    #[error(transparent)]
    Deploy(#[from] crate::deploy::DeployError),
    /// A drill could not start (no cluster, lab not built…).
    #[error("drill: {0}")]
    Drill(String),
    /// Ctrl-C or SIGTERM ended a drill; its fault was undone.
    #[error("drill interrupted; the fault was undone and the cluster left as it was")]
    DrillInterrupted,
    /// `herd scale` or `herd rollout` could not do what was asked (what it did instead is in
    /// the message: new workers stopped again, a rollout rolled back).
    #[error("{0}")]
    Change(String),
    /// No cluster is recorded in the state directory.
    #[error("{0}")]
    NotRunning(String),
    /// Some processes could not be stopped, not even with SIGKILL.
    #[error("could not stop {0}; the state file is kept so that `down` can try again")]
    Survivors(String),
}

/// A process started but did not become ready in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "{name} did not become ready within {waited:?} ({url} last said: {last}); last lines of {log}:\n{tail}"
)]
pub struct NotReady {
    /// Process name.
    pub name: String,
    /// The readiness URL polled.
    pub url: String,
    /// The last answer or error.
    pub last: String,
    /// How long we waited.
    pub waited: Duration,
    /// Its log file.
    pub log: PathBuf,
    /// The end of that log.
    pub tail: String,
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::NotRunning(_) => EXIT_NOT_RUNNING,
            CliError::Interrupted(_)
            | CliError::DrillInterrupted
            | CliError::Bench(BenchError::Interrupted) => EXIT_INTERRUPTED,
            CliError::Bench(BenchError::Usage(_)) => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    }
}
