//! `herd bench health`: what health-checking N registered workers costs an idle herd-gateway.
//!
//! N workers are registered in a private Redis exactly as real workers register themselves
//! (`{prefix}worker:{id}` hashes with the fields of [`WorkerRecord::to_fields`], a TTL of 3 s
//! refreshed every second, a `join` notice on `{prefix}events`), each with its own address
//! `127.0.A.B:PORT`. One hello worker listening on `0.0.0.0:PORT` answers all of them, since
//! every 127.x.y.z address is this machine's loopback. The gateway runs with the registry on and
//! default health settings; once its admin API lists all N workers as up, its CPU time and memory
//! are read over the measuring window, without any client traffic.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herd_shared::keys::Keys;
use herd_shared::registry::{Event, WorkerRecord, WorkerState};
use serde::Serialize;

use super::sample::{self, Usage};
use super::{BenchError, Stop, http};
use crate::binaries;
use crate::process::{Process, Spec};
use crate::redis_server::RedisServer;

/// Most workers one run registers (addresses 127.0.1.1 … 127.0.250.250 would allow more, but
/// the gateway needs a file descriptor per worker).
pub const MAX_WORKERS: u32 = 20_000;
/// The registry's key prefix in the private Redis.
const PREFIX: &str = "herd:";
/// The admin token of the measured gateway.
const ADMIN_TOKEN: &str = "bench-health-token";
/// Heartbeat and TTL of the registered entries: the workers' defaults.
const HEARTBEAT: Duration = Duration::from_secs(1);
const TTL: Duration = Duration::from_secs(3);
/// The gateway's default check interval (`health.interval`), for the expected check rate.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long a process gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the gateway gets to report every worker up.
const UP_TIMEOUT: Duration = Duration::from_secs(90);
/// After every worker is up: let the first round of checks and the slow start pass.
const SETTLE: Duration = Duration::from_secs(2);
/// Bound of one admin API request (the list of N workers can be large).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct HealthOptions {
    /// Registered workers.
    pub workers: u32,
    /// Measuring window.
    #[serde(serialize_with = "as_seconds")]
    pub duration: Duration,
}

fn as_seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct HealthResult {
    /// Registered workers.
    pub workers: u32,
    /// Workers the gateway showed as up at the end of the window.
    pub up: u32,
    /// The measuring window.
    #[serde(serialize_with = "as_seconds")]
    pub duration: Duration,
    /// The gateway's CPU seconds in the window.
    pub cpu_seconds: f64,
    /// CPU seconds per second, in percent of one core.
    pub cpu_percent: f64,
    /// RSS at the end of the window, KiB.
    pub rss_kib: u64,
    /// Peak RSS (VmHWM), KiB.
    pub peak_kib: u64,
    /// Health checks per second, from the gateway's metrics when it exports a check counter.
    pub checks_per_sec: Option<f64>,
    /// What the default interval implies: workers / `health.interval`.
    pub expected_checks_per_sec: f64,
    /// Failed checks in the window, summed over the workers (admin API `check_failures`).
    pub check_failures: u64,
}

/// Runs the measurement with logs in `dir`.
pub fn run(
    options: &HealthOptions,
    dir: &Path,
    stop: &Stop,
    progress: &mut dyn FnMut(String),
) -> Result<HealthResult, BenchError> {
    if options.workers == 0 || options.workers > MAX_WORKERS {
        return Err(BenchError::Usage(format!(
            "--workers must be 1–{MAX_WORKERS}"
        )));
    }
    check_open_files(options.workers)?;
    progress(format!(
        "health: starting redis-server, a hello worker and the gateway for {} workers",
        options.workers
    ));
    let redis = RedisServer::start(None, dir, dir)?;
    let upstream = start_upstream(dir)?;
    let port = upstream
        .addr("public")
        .map(|addr| addr.port())
        .ok_or_else(|| BenchError::Setup("the hello worker announced no port".into()))?;
    let records = records(options.workers, port);
    let heartbeat = Heartbeat::start(redis.url(), records)?;
    let mut gateway = start_gateway(&redis, dir)?;
    let admin = gateway.addr("admin").expect("waited for admin");

    progress(format!(
        "health: waiting until the gateway shows {} workers up",
        options.workers
    ));
    let started = Instant::now();
    loop {
        stop.check()?;
        heartbeat.check()?;
        if let Some(fleet) = fleet(admin)
            && fleet.up >= options.workers
        {
            break;
        }
        if started.elapsed() > UP_TIMEOUT || gateway.try_wait().is_some() {
            return Err(BenchError::Setup(format!(
                "the gateway did not show {} workers up within {UP_TIMEOUT:?} (last: {:?}); last log lines:\n{}",
                options.workers,
                fleet(admin),
                gateway.log_tail(10)
            )));
        }
        stop.sleep(Duration::from_millis(250))?;
    }
    progress(format!(
        "health: all up after {:.1} s; measuring for {:?}",
        started.elapsed().as_secs_f64(),
        options.duration
    ));
    stop.sleep(SETTLE)?;

    let checks_before = check_count(admin);
    let failures_before = fleet(admin).map(|fleet| fleet.check_failures);
    let before = sample::group_usage(gateway.pid());
    let window = Instant::now();
    stop.sleep(options.duration)?;
    let after: Usage = sample::group_usage(gateway.pid());
    let elapsed = window.elapsed().as_secs_f64();
    let checks_after = check_count(admin);
    heartbeat.check()?;
    let end = fleet(admin).unwrap_or_default();
    let cpu_seconds = (after.cpu_seconds - before.cpu_seconds).max(0.0);
    Ok(HealthResult {
        workers: options.workers,
        up: end.up,
        duration: options.duration,
        cpu_seconds,
        cpu_percent: cpu_seconds / elapsed * 100.0,
        rss_kib: after.rss_kib,
        peak_kib: after.peak_kib,
        checks_per_sec: checks_before
            .zip(checks_after)
            .map(|(before, after)| (after - before).max(0.0) / elapsed),
        expected_checks_per_sec: f64::from(options.workers) / CHECK_INTERVAL.as_secs_f64(),
        check_failures: end
            .check_failures
            .saturating_sub(failures_before.unwrap_or(end.check_failures)),
    })
}

/// The gateway keeps a connection per worker, and the hello worker one per check connection.
fn check_open_files(workers: u32) -> Result<(), BenchError> {
    let needed = u64::from(workers) + 512;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<u64>().ok());
    match soft {
        Some(soft) if soft < needed => Err(BenchError::Usage(format!(
            "{workers} workers need about {needed} open files per process, but the limit is {soft}; raise it (e.g. `ulimit -n {needed}`) or use fewer --workers"
        ))),
        _ => Ok(()),
    }
}

fn start_upstream(dir: &Path) -> Result<Process, BenchError> {
    let spec = Spec::new("worker-hello", binaries::locate(binaries::WORKER)?, dir)
        // Every 127.x.y.z address reaches a listener on 0.0.0.0 over the loopback interface.
        .env("HERD_WORKER_LISTEN", "0.0.0.0:0")
        .env("HERD_WORKER_APP", "hello")
        .env("HERD_WORKER_ID", "hello")
        .env("HERD_WORKER_REGISTRY__ENABLED", "false")
        .env("HERD_LOG", "warn")
        .arg("--log-format")
        .arg("json");
    Ok(Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?)
}

fn start_gateway(redis: &RedisServer, dir: &Path) -> Result<Process, BenchError> {
    let spec = Spec::new("herd-gateway", binaries::locate(binaries::GATEWAY)?, dir)
        .env("HERD_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_ADMIN__TOKEN", ADMIN_TOKEN)
        .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
        .env("HERD_GATEWAY_REDIS__URL", redis.url())
        .env("HERD_GATEWAY_REDIS__PREFIX", PREFIX)
        .env("HERD_LOG", "warn")
        .arg("--log-format")
        .arg("json");
    Ok(Process::spawn_and_wait(
        &spec,
        &["public", "admin"],
        START_TIMEOUT,
    )?)
}

/// The address of worker `index` (0-based): 127.0.A.B with A in 1–250 and B in 1–250, so no
/// address is a network or broadcast-looking .0 / .255.
pub fn worker_addr(index: u32, port: u16) -> SocketAddr {
    let a = 1 + index / 250;
    let b = 1 + index % 250;
    SocketAddr::from(([127, 0, a as u8, b as u8], port))
}

fn records(count: u32, port: u16) -> Vec<WorkerRecord> {
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(0))
        .unwrap_or(0);
    (0..count)
        .map(|index| WorkerRecord {
            id: format!("bench-{}", index + 1),
            addr: worker_addr(index, port).to_string(),
            machine: "bench".into(),
            weight: 100,
            version: env!("CARGO_PKG_VERSION").into(),
            started_ms,
            state: WorkerState::Ready,
        })
        .collect()
}

/// Keeps the registered entries alive, as each worker's own heartbeat would: every second, one
/// pipeline rewrites every hash and its TTL. The first beat also publishes each `join` notice.
/// Stopped (and joined) when dropped.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Heartbeat {
    fn start(url: String, records: Vec<WorkerRecord>) -> Result<Self, BenchError> {
        let keys = Keys::new(PREFIX);
        let mut connection = connect(&url).map_err(BenchError::Setup)?;
        beat(&mut connection, &keys, &records, true).map_err(BenchError::Setup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut next = Instant::now() + HEARTBEAT;
                while !stop.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        next += HEARTBEAT;
                        beat(&mut connection, &keys, &records, false)?;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
        });
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    /// An error if the heartbeat thread has given up (Redis failed).
    fn check(&self) -> Result<(), BenchError> {
        match &self.thread {
            Some(thread) if thread.is_finished() => Err(BenchError::Setup(
                "the registry heartbeat stopped (Redis failed)".into(),
            )),
            _ => Ok(()),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn connect(url: &str) -> Result<redis::Connection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
    let connection = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|e| format!("cannot connect to redis at {url}: {e}"))?;
    connection
        .set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| connection.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| format!("redis: {e}"))?;
    Ok(connection)
}

/// One heartbeat of every entry (and the `join` notices when `announce`).
fn beat(
    connection: &mut redis::Connection,
    keys: &Keys,
    records: &[WorkerRecord],
    announce: bool,
) -> Result<(), String> {
    let ttl_ms = i64::try_from(TTL.as_millis()).unwrap_or(i64::MAX);
    let mut pipe = redis::pipe();
    for record in records {
        let key = keys.worker(&record.id);
        pipe.hset_multiple(&key, &record.to_fields()).ignore();
        pipe.pexpire(&key, ttl_ms).ignore();
        if announce {
            let join = Event::Join {
                worker: record.clone(),
            };
            pipe.publish(keys.events(), join.to_json()).ignore();
        }
    }
    pipe.query::<()>(connection)
        .map_err(|e| format!("registry heartbeat failed: {e}"))
}

/// The workers as the gateway's admin API shows them.
#[derive(Debug, Clone, Copy, Default)]
struct Fleet {
    /// Healthy or in slow start.
    up: u32,
    /// `check_failures`, summed.
    check_failures: u64,
}

fn fleet(admin: SocketAddr) -> Option<Fleet> {
    let reply = http::request(
        admin,
        "GET",
        "/api/workers",
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        None,
        REQUEST_TIMEOUT,
    )
    .ok()?;
    if reply.status != 200 {
        return None;
    }
    let workers: Vec<serde_json::Value> = serde_json::from_str(&reply.body).ok()?;
    let up = workers
        .iter()
        .filter(|worker| matches!(worker["state"].as_str(), Some("healthy" | "slow_start")))
        .count();
    Some(Fleet {
        up: u32::try_from(up).ok()?,
        check_failures: workers
            .iter()
            .filter_map(|worker| worker["check_failures"].as_u64())
            .sum(),
    })
}

/// The gateway's total of health checks, if its metrics export a check counter.
fn check_count(admin: SocketAddr) -> Option<f64> {
    let reply = http::request(admin, "GET", "/metrics", &[], None, REQUEST_TIMEOUT).ok()?;
    (reply.status == 200).then_some(())?;
    sum_counter(
        &reply.body,
        &[
            "herd_gateway_health_checks_total",
            "herd_gateway_checks_total",
        ],
    )
}

/// The sum over all label sets of the first of `names` that appears in Prometheus text.
pub fn sum_counter(text: &str, names: &[&str]) -> Option<f64> {
    names.iter().find_map(|name| {
        let mut seen = false;
        let mut sum = 0.0;
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                continue;
            }
            if let Some(value) = rest
                .rsplit(' ')
                .next()
                .and_then(|value| value.parse::<f64>().ok())
            {
                sum += value;
                seen = true;
            }
        }
        seen.then_some(sum)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fields_map(record: &WorkerRecord) -> HashMap<String, String> {
        record
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    #[test]
    fn worker_addresses_are_distinct_loopback_addresses() {
        assert_eq!(worker_addr(0, 80).to_string(), "127.0.1.1:80");
        assert_eq!(worker_addr(249, 80).to_string(), "127.0.1.250:80");
        assert_eq!(worker_addr(250, 80).to_string(), "127.0.2.1:80");
        let addrs: std::collections::HashSet<_> =
            (0..MAX_WORKERS).map(|i| worker_addr(i, 1)).collect();
        assert_eq!(addrs.len(), MAX_WORKERS as usize);
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn records_read_back_like_real_workers() {
        let records = records(3, 4000);
        assert_eq!(records[2].id, "bench-3");
        assert_eq!(records[2].addr, "127.0.1.3:4000");
        let back = WorkerRecord::from_fields(&fields_map(&records[0])).unwrap();
        assert_eq!(back, records[0]);
    }

    #[test]
    fn counters_are_summed_over_labels() {
        let text = "# HELP herd_gateway_health_checks_total checks\n# TYPE herd_gateway_health_checks_total counter\nherd_gateway_health_checks_total{result=\"ok\"} 120\nherd_gateway_health_checks_total{result=\"failed\"} 3\nherd_gateway_health_checks_totally 9\n";
        assert_eq!(
            sum_counter(text, &["herd_gateway_health_checks_total"]),
            Some(123.0)
        );
        assert_eq!(sum_counter(text, &["nothing_total"]), None);
    }
}
