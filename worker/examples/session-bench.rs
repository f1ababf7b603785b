//! Session benchmark (not a test): `cargo run --release -p herd-worker --example session-bench`.
//!
//! Starts its own redis-server on a free loopback port (or uses `HERD_BENCH_REDIS_URL`), then
//! measures:
//! 1. session load + save per request (the session layer around a handler that reads a counter
//!    and changes it, in-process, no HTTP) at 1 and 64 concurrent clients: median and p99 in µs;
//! 2. requests per second over HTTP (keep-alive, 64 connections) of the same route with and
//!    without a session.
//!
//! `HERD_BENCH_SECS` sets the seconds per HTTP run (default 5). `HERD_BENCH_REDIS_CLUSTER`
//! (comma-separated seed URLs) runs it on a Redis Cluster instead, and prints how many commands
//! each master served during the in-process runs (the per-shard spread).

// The session layer's futures (tracing spans around cluster-aware Redis calls) nest deeper
// than the default limit when clippy computes their layout.
#![recursion_limit = "256"]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use herd_worker::config::WorkerConfig;
use herd_worker::session::{Session, SessionLayer};
use herd_worker::{ApiError, server};
use tower::ServiceExt;

const OPS_PER_CLIENT_1: usize = 5_000;
const OPS_TOTAL_64: usize = 40_000;

/// A redis-server killed on drop.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> (Option<Redis>, String) {
    if let Ok(url) = std::env::var("HERD_BENCH_REDIS_URL") {
        return (None, url);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    let redis = Redis(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (Some(redis), format!("redis://127.0.0.1:{port}/0"))
}

/// The measured route: read the counter, change it (saved by compare-and-set).
async fn counter(session: Session) -> Result<String, ApiError> {
    session.update("hits", |hits: &mut u64| *hits += 1).await?;
    session.save().await?;
    Ok(session.get::<u64>("hits").await?.unwrap_or(0).to_string())
}

/// The same route without a session.
async fn plain() -> Result<String, ApiError> {
    Ok("1".to_string())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Load + save latencies (µs) with `clients` concurrent clients, each on its own session.
async fn load_save(app: Router, clients: usize, ops_per_client: usize) -> (Vec<u64>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                // First request creates the session; its id comes back in Set-Cookie.
                let response = app
                    .clone()
                    .oneshot(http::Request::get("/counter").body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let cookie = response.headers()["set-cookie"]
                    .to_str()
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .to_string();
                let mut latencies = Vec::with_capacity(ops_per_client);
                for _ in 0..ops_per_client {
                    let request = http::Request::get("/counter")
                        .header("cookie", &cookie)
                        .body(Body::empty())
                        .unwrap();
                    let one = Instant::now();
                    let response = app.clone().oneshot(request).await.unwrap();
                    latencies.push(one.elapsed().as_micros() as u64);
                    assert_eq!(response.status(), 200);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    (all, started.elapsed())
}

/// Requests per second over HTTP with `connections` keep-alive clients for `secs`.
async fn http_rate(
    url: String,
    connections: usize,
    secs: u64,
    cookie: Option<String>,
) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, done, failed, url) =
                (stop.clone(), done.clone(), failed.clone(), url.clone());
            let cookie = cookie.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                // Each client gets its own session (as real users would).
                let mut cookie = cookie;
                while !stop.load(Ordering::Relaxed) {
                    let mut request = client.get(&url);
                    if let Some(cookie) = &cookie {
                        request = request.header("cookie", cookie);
                    }
                    match request.send().await {
                        Ok(response) if response.status().is_success() => {
                            if cookie.is_none()
                                && let Some(value) = response.headers().get("set-cookie")
                            {
                                cookie = value
                                    .to_str()
                                    .ok()
                                    .and_then(|v| v.split(';').next())
                                    .map(str::to_string);
                            }
                            let _ = response.bytes().await;
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, failed.load(Ordering::Relaxed))
}

/// `total_commands_processed` of every master among `seeds` (nothing without a cluster).
async fn commands_per_master(seeds: &[String]) -> Vec<(String, u64)> {
    let mut counts = Vec::new();
    for seed in seeds {
        let Ok(client) = redis::Client::open(seed.as_str()) else {
            continue;
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        if !info.contains("role:master") {
            continue;
        }
        let count = info
            .lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        counts.push((seed.clone(), count));
    }
    counts
}

#[tokio::main]
async fn main() {
    let (_redis, url) = start_redis();
    let secs: u64 = std::env::var("HERD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut config = WorkerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        id: Some("bench".into()),
        ..WorkerConfig::default()
    };
    let cluster: Vec<String> = std::env::var("HERD_BENCH_REDIS_CLUSTER")
        .map(|seeds| seeds.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let url = if cluster.is_empty() {
        config.redis.url = url.clone();
        url
    } else {
        config.redis.cluster = cluster.clone();
        format!("cluster {}", cluster.join(","))
    };
    config.redis.prefix = format!("bench{}:", std::process::id());
    config.redis.pool_size = 16;
    config.registry.enabled = false;
    config.drain.min = Duration::ZERO;
    config.drain.quiet = Duration::from_millis(10);

    println!(
        "herd session benchmark — redis {url}, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let store = server::session_store(&config).expect("store");
    let app = Router::new()
        .route("/counter", get(counter))
        .layer(SessionLayer::new(store));

    // Warm up (connections, script cache).
    let _ = load_save(app.clone(), 4, 200).await;
    let before = commands_per_master(&cluster).await;
    println!("\nsession load + save per request (in-process, no HTTP)");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12}",
        "clients", "ops", "median µs", "p99 µs", "ops/s"
    );
    for (clients, ops) in [(1, OPS_PER_CLIENT_1), (64, OPS_TOTAL_64 / 64)] {
        let (latencies, elapsed) = load_save(app.clone(), clients, ops).await;
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>12.0}",
            clients,
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.len() as f64 / elapsed.as_secs_f64()
        );
    }

    if !cluster.is_empty() {
        let after = commands_per_master(&cluster).await;
        println!("\ncommands served per master during the runs above");
        for (node, count) in &after {
            let start = before
                .iter()
                .find(|(n, _)| n == node)
                .map_or(0, |(_, c)| *c);
            println!("{node:>28} {:>10}", count - start);
        }
    }

    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = Router::new()
        .route("/counter", get(counter))
        .route("/plain", get(plain));
    let server = tokio::spawn(server::run(listener, config, app, async {
        let _ = stop_rx.await;
    }));
    println!(
        "\nHTTP, 64 keep-alive connections, {secs} s each (client, server and redis share the box)"
    );
    println!("{:>22} {:>12} {:>8}", "route", "req/s", "failed");
    let (rate, failed) = http_rate(format!("http://{addr}/plain"), 64, secs, None).await;
    println!("{:>22} {:>12.0} {:>8}", "GET /plain (none)", rate, failed);
    let (rate, failed) = http_rate(format!("http://{addr}/counter"), 64, secs, None).await;
    println!(
        "{:>22} {:>12.0} {:>8}",
        "GET /counter (session)", rate, failed
    );
    let _ = stop_tx.send(());
    let _ = server.await;
}
