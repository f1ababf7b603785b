//! The end-to-end test harness: real `redis-server`, `herd-worker` and `herd-gateway` processes
//! on free loopback ports, each stopped when its handle is dropped, also when a test panics.
//!
//! Layout:
//! - [`redis`]: [`redis::TestRedis`], a private redis-server in a temp dir.
//! - [`worker`]: [`worker::TestWorker`], one herd-worker process.
//! - [`gateway`]: [`gateway::TestGateway`], one herd-gateway process.
//! - [`otlp`]: [`otlp::Receiver`], an OTLP/HTTP trace receiver that decodes what it is sent.
//! - [`session_calls`]: the demo app's session calls straight to one worker.
//! - [`cluster`]: [`cluster::Cluster`], Redis + N workers + a gateway in one call.
//! - [`drill_report`]: what a drill report may show and still count as passed.
//! - [`inventory`]: run `herd` over a netns inventory and undo all it started.
//! - [`herd_cli`]: [`herd_cli::HerdCluster`], a cluster run by the `herd` binary itself.
//! - [`wait_until`], [`unique_prefix`], [`client`]: small helpers every test needs.
//!
//! Tests find the binaries next to their own executable (`target/<profile>/`); build them first
//! with `cargo build --bins` (the README's test command does). Every cluster gets its own Redis key
//! prefix, so tests never see each other's keys.

pub mod cluster;
pub mod drill_report;
pub mod gateway;
pub mod herd_cli;
pub mod inventory;
pub mod otlp;
pub mod redis;
pub mod session_calls;
pub mod worker;
pub mod worker_support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use herd::load;

/// Polls `condition` every 20 ms until it returns true; panics with `what` after `timeout`.
/// Returns how long it took.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`wait_until`], for plain threads: polls `condition` every 20 ms, panics after `timeout`.
pub fn wait_blocking(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        if condition() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis key prefix no other test uses: `t{pid}-{n}:`.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}:",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An HTTP client with a cookie store (one per simulated user), short timeouts and no proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client builds")
}

/// A fresh temp dir for one process set's data and logs (removed when dropped).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("herd-test-")
        .tempdir()
        .expect("temp dir")
}
