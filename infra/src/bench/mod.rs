//! `herd bench`: one-command benchmarks on this machine, loopback only.
//!
//! - [`proxy`]: herd-gateway against HAProxy and nginx in front of the same upstreams, with the
//!   upstream itself as the baseline ("direct"): req/s, latency, the proxy's CPU per request and
//!   its memory, runs interleaved over several rounds and reported as medians.
//! - [`health`]: what health-checking N registered workers costs an idle gateway.
//! - [`soak`]: thousands of keep-alive connections through the gateway for minutes while workers
//!   are killed and restarted: does its memory stay flat, does it leak descriptors, does any
//!   request fail.
//!
//! Parts:
//! - [`targets`]: the upstreams (hello or demo workers, Redis) and the proxies under test
//!   (herd-gateway, HAProxy and nginx from the templates in `infra/bench/`);
//! - [`loadgen`]: wrk and h2load as bounded child processes, and their output parsers;
//! - [`sample`]: CPU seconds and RSS of a process group from `/proc`;
//! - [`report`]: medians and the Markdown tables;
//! - [`http`]: a tiny blocking HTTP/1.1 client for readiness checks, the login and the admin API;
//! - [`upstream`]: `herd bench upstream`, a minimal hyper server (the plain upstream of
//!   `herd bench proxy --upstream hyper`).
//!
//! Everything runs in a temporary directory that is removed afterwards; every process is started
//! in its own process group and killed with it when its handle is dropped, also on an error or
//! when [`Stop`] is raised (the CLI raises it on Ctrl-C).

pub mod cpu_budget;
pub mod health;
pub mod http;
pub mod loadgen;
pub mod proxy;
pub mod report;
pub mod sample;
pub mod soak;
pub mod targets;
pub mod upstream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::binaries::NotFound;
use crate::deps::DepsError;
use crate::process::ProcessError;
use crate::redis_server::RedisServerError;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Flags that don't fit together.
    #[error("{0}")]
    Usage(String),
    /// A tool is missing and could not be installed.
    #[error(transparent)]
    Missing(#[from] DepsError),
    /// The gateway or worker executable is missing.
    #[error(transparent)]
    Binary(#[from] NotFound),
    /// A process did not start or exited early.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// redis-server did not start.
    #[error("redis-server did not start: {0}")]
    Redis(#[from] RedisServerError),
    /// A load generator failed or overran its bound.
    #[error("{tool} failed ({status}):\n{log}")]
    Tool {
        /// Which run.
        tool: String,
        /// Its exit status, or why it was killed.
        status: String,
        /// Its output and the end of its stderr.
        log: String,
    },
    /// A load generator's output could not be read.
    #[error("cannot read {tool}'s output:\n{output}")]
    Output {
        /// The tool.
        tool: &'static str,
        /// What it printed (the start).
        output: String,
    },
    /// Something did not get ready or answered wrongly.
    #[error("{0}")]
    Setup(String),
    /// A file or directory could not be written.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Ctrl-C / SIGTERM: everything started has been stopped.
    #[error("interrupted; stopped every process the benchmark had started")]
    Interrupted,
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        BenchError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}

/// A flag the CLI raises on Ctrl-C / SIGTERM; long waits check it and give up at once.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Asks the benchmark to stop.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once raised: for `?` between steps.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.raised() {
            Err(BenchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Sleeps for `duration`, waking early (with `Err`) when a stop is raised.
    pub fn sleep(&self, duration: std::time::Duration) -> Result<(), BenchError> {
        let until = std::time::Instant::now() + duration;
        loop {
            self.check()?;
            let now = std::time::Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(std::time::Duration::from_millis(50)));
        }
    }
}

/// A scratch directory for configs and logs: a new temporary one (removed when dropped) or a
/// given one that is kept.
#[derive(Debug)]
pub struct WorkDir {
    path: std::path::PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    /// `keep` if given (created, kept afterwards), else a fresh temporary directory.
    pub fn new(keep: Option<&std::path::Path>) -> Result<Self, BenchError> {
        match keep {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .map_err(|source| BenchError::io("create", path, source))?;
                Ok(WorkDir {
                    path: path.to_path_buf(),
                    _temp: None,
                })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("herd-bench-")
                    .tempdir()
                    .map_err(|source| BenchError::io("create", &std::env::temp_dir(), source))?;
                Ok(WorkDir {
                    path: temp.path().to_path_buf(),
                    _temp: Some(temp),
                })
            }
        }
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// A subdirectory, created.
    pub fn sub(&self, name: &str) -> Result<std::path::PathBuf, BenchError> {
        let path = self.path.join(name);
        std::fs::create_dir_all(&path).map_err(|source| BenchError::io("create", &path, source))?;
        Ok(path)
    }
}

/// Writes `text` to `path`.
pub fn write_file(path: &std::path::Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|source| BenchError::io("write", path, source))
}
