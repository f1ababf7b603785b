//! One herd-worker (demo app) process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herd::binaries;
use herd::process::{Process, Spec};
use nix::sys::signal::Signal;

/// How long a worker gets to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Worker id (`x-herd-worker`).
    pub id: String,
    /// Machine name (`x-herd-machine`).
    pub machine: String,
    /// Redis URL (empty: not set, e.g. when `HERD_WORKER_REDIS__CLUSTER` is given in `env`).
    pub redis_url: String,
    /// Redis key prefix.
    pub prefix: String,
    /// Whether it registers itself in Redis.
    pub registry: bool,
    /// Extra `HERD_WORKER_…` variables (full names).
    pub env: Vec<(String, String)>,
}

impl WorkerOptions {
    /// A worker `id` on `redis_url` under `prefix`, registering itself.
    pub fn new(
        id: impl Into<String>,
        redis_url: impl Into<String>,
        prefix: impl Into<String>,
    ) -> Self {
        WorkerOptions {
            id: id.into(),
            machine: "test-machine".into(),
            redis_url: redis_url.into(),
            prefix: prefix.into(),
            registry: true,
            env: Vec::new(),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running worker; killed on drop.
#[derive(Debug)]
pub struct TestWorker {
    /// The process.
    pub process: Process,
    /// Its id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl TestWorker {
    /// Starts a worker with logs in `log_dir` and waits until it listens.
    pub fn start(options: &WorkerOptions, log_dir: &Path) -> Self {
        let program = binaries::locate(binaries::WORKER).unwrap_or_else(|error| panic!("{error}"));
        let mut spec = Spec::new(format!("worker-{}", options.id), program, log_dir)
            .env("HERD_WORKER_LISTEN", "127.0.0.1:0")
            .env("HERD_WORKER_ID", &options.id)
            .env("HERD_WORKER_MACHINE", &options.machine)
            .env("HERD_WORKER_REDIS__PREFIX", &options.prefix)
            .env(
                "HERD_WORKER_REGISTRY__ENABLED",
                options.registry.to_string(),
            )
            .env("HERD_LOG", "info")
            .arg("--log-format")
            .arg("json");
        if !options.redis_url.is_empty() {
            spec = spec.env("HERD_WORKER_REDIS__URL", &options.redis_url);
        }
        for (key, value) in &options.env {
            spec = spec.env(key, value);
        }
        let process = Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)
            .unwrap_or_else(|error| panic!("worker {} did not start: {error}", options.id));
        let addr = process.addr("public").expect("waited for public");
        TestWorker {
            process,
            id: options.id.clone(),
            addr,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        self.process.kill();
    }

    /// Sends a signal (SIGSTOP, SIGCONT, SIGTERM…).
    pub fn signal(&self, signal: Signal) {
        self.process
            .signal(signal)
            .unwrap_or_else(|error| panic!("cannot send {signal} to worker {}: {error}", self.id));
    }
}
