//! Dev tool: what do active health checks (and the registry poll) of many workers cost the
//! gateway's CPU?
//!
//! One small HTTP server listens on `0.0.0.0:<port>` and so answers on every `127.x.y.z` address;
//! `--workers N` of those addresses are handed to a real `herd-gateway` process — as its static
//! `workers` list (`--mode static`) or as N entries in a throwaway redis-server's registry
//! (`--mode registry`, with heartbeats refreshing every entry each second like real workers).
//! Once every address has been checked at least once, the gateway's utime + stime is read from
//! `/proc/<pid>/stat` across `--seconds`; the server counts the checks (and new connections) in
//! the same window, so a "cheaper" checker that simply checks less would show.
//!
//! ```sh
//! CARGO_TARGET_DIR=target/x cargo build --release -p herd-gateway --bin herd-gateway --example health_cost
//! target/x/release/examples/health_cost --gateway target/x/release/herd-gateway --mode static --runs 3
//! ```
//!
//! This is a developer's measurement, not the official benchmark (that is `herd bench health`).
//! `--hold` keeps the last gateway running after its measurement, for `perf record -p <pid>`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
struct Args {
    /// The herd-gateway binary to measure.
    #[arg(long)]
    gateway: String,
    /// `static` (HERD_GATEWAY_WORKERS) or `registry` (entries in a private redis-server).
    #[arg(long, default_value = "static")]
    mode: String,
    /// Number of workers (distinct 127.x.y.z addresses).
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Measurement window per run, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Settling time after every worker was checked once, seconds.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Fresh gateways measured one after the other.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep the last gateway running (for perf) until Ctrl-C.
    #[arg(long)]
    hold: bool,
}

/// What the shared upstream saw.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    connections: AtomicU64,
    peers: Mutex<HashSet<IpAddr>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seen = Arc::new(Seen::default());
    let port = serve(seen.clone()).await?;
    let addrs: Vec<String> = (0..args.workers).map(|i| worker_addr(i, port)).collect();

    let mut env: Vec<(String, String)> = vec![
        ("HERD_GATEWAY_LISTEN".into(), "127.0.0.1:0".into()),
        ("HERD_GATEWAY_ADMIN__LISTEN".into(), "127.0.0.1:0".into()),
        ("HERD_LOG".into(), "warn".into()),
    ];
    // Kept alive for the whole measurement: dropping them stops Redis and the heartbeats.
    let mut _redis = None;
    match args.mode.as_str() {
        "static" => env.push(("HERD_GATEWAY_WORKERS".into(), addrs.join(","))),
        "registry" => {
            let (child, url) = start_redis().await?;
            _redis = Some(child);
            let prefix = format!("hc{}:", std::process::id());
            let client = redis::Client::open(url.as_str())?;
            // A loaded box can take longer than the default 500 ms for 2000 pipelined commands.
            let patient = redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(10)));
            let conn = client
                .get_multiplexed_async_connection_with_config(&patient)
                .await?;
            tokio::spawn(heartbeats(conn, prefix.clone(), addrs.clone()));
            env.push(("HERD_GATEWAY_REGISTRY__ENABLED".into(), "true".into()));
            env.push(("HERD_GATEWAY_REDIS__URL".into(), url));
            env.push(("HERD_GATEWAY_REDIS__PREFIX".into(), prefix));
        }
        other => anyhow::bail!("--mode must be static or registry, not {other:?}"),
    }

    let tick = clock_ticks()?;
    let mut results = Vec::new();
    for run in 1..=args.runs {
        seen.peers.lock().unwrap().clear();
        let mut child = tokio::process::Command::new(&args.gateway)
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().expect("running");
        let started = Instant::now();
        while seen.peers.lock().unwrap().len() < args.workers {
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!(
                    "only {} of {} workers checked after 60 s",
                    seen.peers.lock().unwrap().len(),
                    args.workers
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let up_after = started.elapsed();
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;

        let cpu0 = cpu_ticks(pid)?;
        let (req0, conn0) = (
            seen.requests.load(Ordering::Relaxed),
            seen.connections.load(Ordering::Relaxed),
        );
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let cpu1 = cpu_ticks(pid)?;
        let elapsed = t0.elapsed().as_secs_f64();
        let checks = (seen.requests.load(Ordering::Relaxed) - req0) as f64 / elapsed;
        let connects = (seen.connections.load(Ordering::Relaxed) - conn0) as f64 / elapsed;
        let cpu = (cpu1 - cpu0) as f64 / tick / elapsed * 100.0;
        println!(
            "run {run}: mode={} workers={} all checked after {:.1}s; gateway CPU {cpu:.2} % of a core; {checks:.0} checks/s; {connects:.1} new connections/s (pid {pid})",
            args.mode,
            args.workers,
            up_after.as_secs_f64()
        );
        results.push(cpu);
        if args.hold && run == args.runs {
            println!("holding gateway pid {pid}; Ctrl-C ends");
            tokio::signal::ctrl_c().await?;
        }
        child.kill().await?;
    }
    results.sort_by(|a, b| a.total_cmp(b));
    println!(
        "median gateway CPU over {} runs: {:.2} % of a core (min {:.2}, max {:.2})",
        results.len(),
        results[results.len() / 2],
        results[0],
        results[results.len() - 1]
    );
    Ok(())
}

/// The i-th worker's address: 127.0.0.2 upwards, skipping .0, .1 and .255 in the last octet.
fn worker_addr(i: usize, port: u16) -> String {
    format!("127.0.{}.{}:{port}", i / 250, i % 250 + 2)
}

/// Starts the shared upstream on `0.0.0.0:0`: 200 `ok` for every request, keep-alive.
async fn serve(seen: Arc<Seen>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            // The gateway connects to 127.x.y.z; the local address is the worker it meant.
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            seen.connections.fetch_add(1, Ordering::Relaxed);
            seen.peers.lock().unwrap().insert(local.ip());
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                    seen.requests.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(port)
}

/// A throwaway redis-server on a free loopback port, nothing persisted.
async fn start_redis() -> anyhow::Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str())?;
    for _ in 0..100 {
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok()
        {
            return Ok((child, url));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("redis-server did not start")
}

/// Keeps every entry alive like real workers do: rewritten once a second, with a TTL (10 s rather
/// than the workers' 3 s, so a slow beat on a loaded box never expires entries mid-measurement).
async fn heartbeats(
    mut conn: redis::aio::MultiplexedConnection,
    prefix: String,
    addrs: Vec<String>,
) {
    let keys = herd_shared::keys::Keys::new(prefix);
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let records: Vec<herd_shared::registry::WorkerRecord> = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| herd_shared::registry::WorkerRecord {
            id: format!("w{i}"),
            addr: addr.clone(),
            machine: "bench".into(),
            weight: 100,
            version: "0.1.0".into(),
            started_ms,
            state: herd_shared::registry::WorkerState::Ready,
        })
        .collect();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        ticker.tick().await;
        let mut pipe = redis::pipe();
        for record in &records {
            let key = keys.worker(&record.id);
            pipe.cmd("HSET").arg(&key);
            for (field, value) in record.to_fields() {
                pipe.arg(field).arg(value);
            }
            pipe.ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(10_000).ignore();
        }
        if let Err(error) = pipe.query_async::<()>(&mut conn).await {
            eprintln!("heartbeat failed: {error}");
        }
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap_or(0) + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn clock_ticks() -> anyhow::Result<f64> {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}
