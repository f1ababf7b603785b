//! `herd bench soak`: hold many client connections through a real herd-gateway for a long time
//! while workers are killed and restarted, and check that the gateway neither grows nor leaks.
//!
//! The setup is a small real cluster: a private redis-server, `workers` demo workers (registry
//! on) and herd-gateway in front of them (static list + registry, `limits.max_connections`
//! raised above the soak's count). The clients ([`client`]) run on two tokio threads in this
//! process: `connections` keep-alive connections, `active` of them sending `GET /work?ms=1` at
//! `rate` per second in all, the rest one `GET /work?ms=0` every `idle_every`. Once every
//! connection is open the measured phase lasts `duration`: every `sample_every` the gateway's
//! RSS and descriptors are read ([`fds`]); every `kill_every` one worker (in turn) gets SIGKILL
//! and is started again on the same port [`RESTART_AFTER`] later. At the end every client
//! connection is closed and the gateway's descriptors are read again once its client sockets
//! are gone.
//!
//! The verdict ([`judge`]) passes only if no request failed and no connection was dropped, the
//! RSS at the end is within max(10 %, 4 MiB) of its steady level after warm-up, and the
//! descriptors that are neither client nor worker connections are back to the start ± a few,
//! with no client socket left.

pub mod client;
pub mod fds;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::Signal;
use serde::Serialize;

use self::client::{ClientPlan, Clients};
use self::fds::Reading;
use super::{BenchError, Stop, http};
use crate::binaries;
use crate::process::{Process, Spec};
use crate::redis_server::RedisServer;

/// Most client connections one run holds.
pub const MAX_CONNECTIONS: u32 = 50_000;
/// How long a killed worker stays down before it is started again.
pub const RESTART_AFTER: Duration = Duration::from_secs(2);
/// The gateway's admin token.
const ADMIN_TOKEN: &str = "bench-soak-token";
/// The registry's key prefix in the private Redis.
const PREFIX: &str = "herd:";
/// How long a process gets to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound of one readiness request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest warm-up: the steady RSS is read after it.
const MAX_WARMUP: Duration = Duration::from_secs(60);
/// RSS growth allowed from the steady level to the end: this fraction, or [`RSS_SLACK_KIB`]
/// when that is more (a small gateway's allocator moves by a few MiB).
const RSS_GROWTH: f64 = 0.10;
const RSS_SLACK_KIB: u64 = 4 * 1024;
/// Descriptors (other than client and worker connections) allowed above the start at the end.
const FD_SLACK: u32 = 8;
/// How long the gateway gets to close its side of the client connections at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakOptions {
    /// Client connections to hold.
    pub connections: u32,
    /// How many of them carry the active load.
    pub active: u32,
    /// Requests per second over the active connections.
    pub rate: u32,
    /// The measured phase, after every connection is open.
    #[serde(serialize_with = "as_seconds")]
    pub duration: Duration,
    /// SIGKILL a worker this often; `None`: never.
    #[serde(serialize_with = "as_seconds_opt")]
    pub kill_every: Option<Duration>,
    /// Workers behind the gateway.
    pub workers: u32,
    /// An idle connection's keep-alive request interval.
    #[serde(serialize_with = "as_seconds")]
    pub idle_every: Duration,
    /// Sampling interval of the gateway's RSS and descriptors.
    #[serde(serialize_with = "as_seconds")]
    pub sample_every: Duration,
}

impl SoakOptions {
    /// The warm-up after which the steady RSS is read: a quarter of the run, at most a minute,
    /// but at least until every idle connection has sent its first request and two samples
    /// more (the gateway's buffers of a connection are allocated at its first request: RSS
    /// climbs for one `idle_every`); never more than half the run.
    pub fn warmup(&self) -> Duration {
        (self.duration / 4)
            .min(MAX_WARMUP)
            .max(self.idle_every + self.sample_every * 2)
            .min(self.duration / 2)
    }

    /// Open files this process and the gateway each need.
    fn open_files(&self) -> u64 {
        u64::from(self.connections) + 4096
    }
}

fn as_seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

fn as_seconds_opt<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => serializer.serialize_f64(duration.as_secs_f64()),
        None => serializer.serialize_none(),
    }
}

/// One sample of the measured phase.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since every connection was open.
    pub t: f64,
    /// The gateway.
    pub gateway: Reading,
    /// Connections open on the client side.
    pub open: u64,
    /// 2xx answers so far.
    pub ok: u64,
    /// Failed requests so far.
    pub failed: u64,
    /// Dropped connections so far.
    pub dropped: u64,
    /// What happened since the previous sample (`kill w2`, `w2 back 0.3 s`).
    pub events: Vec<String>,
}

/// What the run measured, and the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SoakResult {
    /// The options.
    pub options: SoakOptions,
    /// Source addresses the connections came from.
    pub sources: u32,
    /// The gateway before any client connection (after a few warm-up requests).
    pub start: Reading,
    /// Seconds it took to open every connection.
    pub open_seconds: f64,
    /// The measured phase.
    pub samples: Vec<Sample>,
    /// The gateway after every client connection was closed.
    pub end: Reading,
    /// 2xx answers on active and on idle connections.
    pub active_ok: u64,
    /// See `active_ok`.
    pub idle_ok: u64,
    /// Failed requests.
    pub failed: u64,
    /// Dropped connections (failed connects, keep-alive connections the gateway closed).
    pub dropped: u64,
    /// Failures by kind.
    pub failures: BTreeMap<String, u64>,
    /// Workers killed, and started again.
    pub kills: u32,
    /// See `kills`.
    pub restarts: u32,
    /// Longest time from starting a killed worker again until it listened, ms.
    pub max_restart_ms: u64,
    /// The verdict.
    pub verdict: Verdict,
}

/// PASS or FAIL, with the figures it was decided on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// Whether every check passed.
    pub pass: bool,
    /// RSS steady level: median of the samples in the second warm-up interval, KiB.
    pub rss_steady_kib: u64,
    /// RSS at the end: median of the last three samples, KiB.
    pub rss_end_kib: u64,
    /// Highest RSS seen (samples and VmHWM), KiB.
    pub rss_peak_kib: u64,
    /// End minus steady, in percent of steady.
    pub rss_growth_percent: f64,
    /// Least-squares slope of RSS over the samples after the warm-up, MiB per minute: a slow
    /// creep the end-vs-steady check lets through on a short run shows here (not judged).
    pub rss_slope_mib_per_min: f64,
    /// What failed, one line each (empty when it passed).
    pub reasons: Vec<String>,
}

/// Runs the soak with logs in `dir`.
pub fn run(
    options: &SoakOptions,
    dir: &Path,
    stop: &Stop,
    progress: &mut dyn FnMut(String),
) -> Result<SoakResult, BenchError> {
    validate(options)?;
    raise_open_files(options.open_files())?;
    progress(format!(
        "soak: starting redis-server, {} workers and the gateway",
        options.workers
    ));
    let redis = RedisServer::start(None, dir, dir)?;
    let mut workers = Vec::new();
    for index in 1..=options.workers {
        workers.push(Worker::start(&format!("w{index}"), &redis, dir)?);
    }
    let worker_addrs: Vec<SocketAddr> = workers.iter().map(|worker| worker.addr).collect();
    let worker_ports: Vec<u16> = worker_addrs.iter().map(SocketAddr::port).collect();
    let mut gateway = start_gateway(options, &redis, &worker_addrs, dir)?;
    let public = gateway.addr("public").expect("waited for public");
    let admin = gateway.addr("admin").expect("waited for admin");
    wait_all_up(&mut gateway, admin, options.workers, stop)?;
    // A few requests so the first pooled worker connections exist in the start reading.
    for _ in 0..20 {
        let status = http::status(public, "/work?ms=0", REQUEST_TIMEOUT);
        if status != Some(200) {
            return Err(BenchError::Setup(format!(
                "GET /work?ms=0 through the gateway answered {status:?}; last log lines:\n{}",
                gateway.log_tail(10)
            )));
        }
    }
    stop.sleep(Duration::from_secs(1))?;
    let start = fds::read(gateway.pid(), public.port(), &worker_ports);

    let plan = ClientPlan {
        gateway: public,
        connections: options.connections,
        active: options.active,
        rate: options.rate,
        idle_every: options.idle_every,
    };
    let sources = plan.sources();
    progress(format!(
        "soak: gateway RSS {:.1} MiB, {} fds; opening {} connections from {sources} source addresses",
        mib(start.rss_kib),
        start.fds,
        options.connections
    ));
    let mut clients = Clients::start(plan).map_err(|source| BenchError::Io {
        what: "start the client threads for",
        path: "the soak".into(),
        source,
    })?;
    let counters = clients.counters().clone();
    let opening = Instant::now();
    let open_bound = Duration::from_secs(30 + u64::from(options.connections / 500));
    while counters.open.load(Ordering::Relaxed) < u64::from(options.connections) {
        stop.check()?;
        check_alive(&mut gateway)?;
        if opening.elapsed() > open_bound {
            return Err(BenchError::Setup(format!(
                "only {} of {} connections open after {open_bound:?}; failures: {:?}",
                counters.open.load(Ordering::Relaxed),
                options.connections,
                counters.kinds()
            )));
        }
        stop.sleep(Duration::from_millis(100))?;
    }
    let open_seconds = opening.elapsed().as_secs_f64();
    progress(format!(
        "soak: {} connections open after {open_seconds:.1} s; measuring for {}",
        options.connections,
        humantime::format_duration(options.duration)
    ));

    let phase = Instant::now();
    let mut samples = Vec::new();
    let mut events = Vec::new();
    let mut next_sample = Duration::ZERO;
    let mut next_kill = options.kill_every;
    let mut victim = 0;
    let mut down: Option<(usize, Instant)> = None;
    let (mut kills, mut restarts, mut max_restart_ms) = (0, 0, 0);
    let mut next_report = Duration::from_secs(60);
    loop {
        stop.check()?;
        check_alive(&mut gateway)?;
        let now = phase.elapsed();
        if let Some((index, since)) = down
            && since.elapsed() >= RESTART_AFTER
        {
            let started = Instant::now();
            workers[index].restart(&redis, dir)?;
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            max_restart_ms = max_restart_ms.max(ms);
            restarts += 1;
            events.push(format!("{} back", workers[index].id));
            down = None;
        }
        if let Some(at) = next_kill
            && now >= at
            && now < options.duration
            && down.is_none()
        {
            workers[victim].kill();
            kills += 1;
            events.push(format!("kill {}", workers[victim].id));
            down = Some((victim, Instant::now()));
            victim = (victim + 1) % workers.len();
            next_kill = options.kill_every.map(|every| at + every);
        }
        if now >= next_sample {
            samples.push(Sample {
                t: now.as_secs_f64(),
                gateway: fds::read(gateway.pid(), public.port(), &worker_ports),
                open: counters.open.load(Ordering::Relaxed),
                ok: counters.ok(),
                failed: counters.failed.load(Ordering::Relaxed),
                dropped: counters.dropped.load(Ordering::Relaxed),
                events: std::mem::take(&mut events),
            });
            next_sample += options.sample_every;
            if now >= next_report
                && let Some(last) = samples.last()
            {
                progress(format!(
                    "soak: {:.0} s: RSS {:.1} MiB, {} fds, {} open, {} ok, {} failed, {} dropped, {kills} kills",
                    last.t,
                    mib(last.gateway.rss_kib),
                    last.gateway.fds,
                    last.open,
                    last.ok,
                    last.failed,
                    last.dropped
                ));
                next_report += Duration::from_secs(60);
            }
            if now >= options.duration && down.is_none() {
                break;
            }
        }
        stop.sleep(Duration::from_millis(20))?;
    }

    progress("soak: closing every client connection".into());
    clients.close();
    let closing = Instant::now();
    let mut end = fds::read(gateway.pid(), public.port(), &worker_ports);
    while end.client_sockets > 0 && closing.elapsed() < CLOSE_TIMEOUT {
        stop.sleep(Duration::from_millis(250))?;
        end = fds::read(gateway.pid(), public.port(), &worker_ports);
    }
    // Let anything per-connection that is freed after the socket (timers, tasks) go too.
    stop.sleep(Duration::from_secs(1))?;
    check_alive(&mut gateway)?;
    end = fds::read(gateway.pid(), public.port(), &worker_ports);

    let failures = counters.kinds();
    let verdict = judge(options, &start, &samples, &end, &counters_failed(&counters));
    Ok(SoakResult {
        options: options.clone(),
        sources,
        start,
        open_seconds,
        samples,
        end,
        active_ok: counters.active_ok.load(Ordering::Relaxed),
        idle_ok: counters.idle_ok.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        dropped: counters.dropped.load(Ordering::Relaxed),
        failures,
        kills,
        restarts,
        max_restart_ms,
        verdict,
    })
}

fn counters_failed(counters: &client::Counters) -> (u64, u64) {
    (
        counters.failed.load(Ordering::Relaxed),
        counters.dropped.load(Ordering::Relaxed),
    )
}

/// The checks clap can't do.
pub fn validate(options: &SoakOptions) -> Result<(), BenchError> {
    let usage = |text: String| Err(BenchError::Usage(text));
    if options.connections == 0 || options.connections > MAX_CONNECTIONS {
        return usage(format!("--connections must be 1–{MAX_CONNECTIONS}"));
    }
    if options.active > options.connections {
        return usage(format!(
            "--active ({}) can't exceed --connections ({})",
            options.active, options.connections
        ));
    }
    if options.active > 0 && options.rate == 0 {
        return usage("--rate must be at least 1 with active connections".into());
    }
    if options.workers < 2 {
        return usage("--workers must be at least 2: one is killed at a time".into());
    }
    if let Some(every) = options.kill_every
        && every < RESTART_AFTER * 2
    {
        return usage(format!(
            "--kill-every must be at least {:?} (a killed worker is down for {RESTART_AFTER:?}), or 0s for no kills",
            RESTART_AFTER * 2
        ));
    }
    Ok(())
}

/// Raises this process's open-file limit to `needed` (soft and, if need be, hard: root only);
/// the gateway and workers inherit it.
fn raise_open_files(needed: u64) -> Result<(), BenchError> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|error| BenchError::Setup(format!("cannot read RLIMIT_NOFILE: {error}")))?;
    if soft >= needed {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard.max(needed)).map_err(|error| {
        BenchError::Usage(format!(
            "this soak needs {needed} open files per process, the limit is {soft} (hard {hard}), and raising it failed ({error}); run as root, raise the hard limit, or use fewer --connections"
        ))
    })
}

/// Decides the verdict from the readings and `(failed requests, dropped connections)`.
pub fn judge(
    options: &SoakOptions,
    start: &Reading,
    samples: &[Sample],
    end: &Reading,
    (failed, dropped): &(u64, u64),
) -> Verdict {
    let mut reasons = Vec::new();
    if *failed > 0 {
        reasons.push(format!("{failed} requests failed"));
    }
    if *dropped > 0 {
        reasons.push(format!(
            "{dropped} connections dropped (failed connects or closed by the gateway)"
        ));
    }
    let warmup = options.warmup().as_secs_f64();
    let mut steady: Vec<u64> = samples
        .iter()
        .filter(|sample| sample.t >= warmup && sample.t <= 2.0 * warmup)
        .map(|sample| sample.gateway.rss_kib)
        .collect();
    if steady.is_empty() {
        steady.extend(
            samples
                .iter()
                .find(|sample| sample.t >= warmup)
                .map(|sample| sample.gateway.rss_kib),
        );
    }
    let rss_steady_kib = median(&mut steady);
    let mut last: Vec<u64> = samples
        .iter()
        .rev()
        .take(3)
        .map(|sample| sample.gateway.rss_kib)
        .collect();
    let rss_end_kib = median(&mut last);
    let rss_peak_kib = samples
        .iter()
        .map(|sample| sample.gateway.rss_kib.max(sample.gateway.peak_kib))
        .chain([end.peak_kib])
        .max()
        .unwrap_or(0);
    let allowed = ((rss_steady_kib as f64 * RSS_GROWTH) as u64).max(RSS_SLACK_KIB);
    if rss_steady_kib == 0 {
        reasons.push("no RSS sample after the warm-up".into());
    } else if rss_end_kib > rss_steady_kib + allowed {
        reasons.push(format!(
            "RSS grew from {:.1} MiB (steady) to {:.1} MiB at the end, more than {:.1} MiB",
            mib(rss_steady_kib),
            mib(rss_end_kib),
            mib(allowed)
        ));
    }
    if end.client_sockets > 0 {
        reasons.push(format!(
            "{} client sockets still open after every client closed",
            end.client_sockets
        ));
    }
    if end.other_fds() > start.other_fds() + FD_SLACK {
        reasons.push(format!(
            "descriptor leak: {} descriptors besides client and worker connections at the end, {} at the start (allowed +{FD_SLACK})",
            end.other_fds(),
            start.other_fds()
        ));
    }
    let after_warmup: Vec<(f64, f64)> = samples
        .iter()
        .filter(|sample| sample.t >= warmup)
        .map(|sample| (sample.t / 60.0, mib(sample.gateway.rss_kib)))
        .collect();
    Verdict {
        pass: reasons.is_empty(),
        rss_slope_mib_per_min: slope(&after_warmup),
        rss_steady_kib,
        rss_end_kib,
        rss_peak_kib,
        rss_growth_percent: if rss_steady_kib == 0 {
            0.0
        } else {
            (rss_end_kib as f64 - rss_steady_kib as f64) / rss_steady_kib as f64 * 100.0
        },
        reasons,
    }
}

/// Least-squares slope of `(x, y)` points; 0 with fewer than two distinct x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mean_x) * (y - mean_y);
        den += (x - mean_x) * (x - mean_x);
    }
    if den > 0.0 { num / den } else { 0.0 }
}

fn median(values: &mut [u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[values.len() / 2]
}

/// KiB → MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// An error if the gateway has exited.
fn check_alive(gateway: &mut Process) -> Result<(), BenchError> {
    match gateway.try_wait() {
        Some(status) => Err(BenchError::Setup(format!(
            "the gateway exited ({status}) during the soak; last log lines:\n{}",
            gateway.log_tail(20)
        ))),
        None => Ok(()),
    }
}

/// One demo worker, restarted on the same address after each kill.
struct Worker {
    id: String,
    addr: SocketAddr,
    process: Option<Process>,
    incarnation: u32,
}

impl Worker {
    fn start(id: &str, redis: &RedisServer, dir: &Path) -> Result<Worker, BenchError> {
        let process = Process::spawn_and_wait(
            &worker_spec(id, id, "127.0.0.1:0", redis, dir)?,
            &["public"],
            START_TIMEOUT,
        )?;
        let addr = process
            .addr("public")
            .ok_or_else(|| BenchError::Setup(format!("worker {id} announced no address")))?;
        Ok(Worker {
            id: id.to_string(),
            addr,
            process: Some(process),
            incarnation: 1,
        })
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.signal(Signal::SIGKILL);
            let _ = process.wait_exit(Duration::from_secs(5));
        }
    }

    /// Starts it again on its address; a few tries, since the port can be briefly taken.
    fn restart(&mut self, redis: &RedisServer, dir: &Path) -> Result<(), BenchError> {
        self.incarnation += 1;
        let name = format!("{}-{}", self.id, self.incarnation);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let spec = worker_spec(&name, &self.id, &self.addr.to_string(), redis, dir)?;
            match Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT) {
                Ok(process) => {
                    self.process = Some(process);
                    return Ok(());
                }
                Err(_) if attempt < 5 => std::thread::sleep(Duration::from_millis(500)),
                Err(error) => return Err(error.into()),
            }
        }
    }
}

fn worker_spec(
    name: &str,
    id: &str,
    listen: &str,
    redis: &RedisServer,
    dir: &Path,
) -> Result<Spec, BenchError> {
    Ok(Spec::new(
        format!("worker-{name}"),
        binaries::locate(binaries::WORKER)?,
        dir,
    )
    .env("HERD_WORKER_LISTEN", listen)
    .env("HERD_WORKER_ID", id)
    .env("HERD_WORKER_REDIS__URL", redis.url())
    .env("HERD_WORKER_REDIS__PREFIX", PREFIX)
    .env("HERD_WORKER_REGISTRY__ENABLED", "true")
    .env("HERD_LOG", "warn")
    .arg("--log-format")
    .arg("json"))
}

fn start_gateway(
    options: &SoakOptions,
    redis: &RedisServer,
    workers: &[SocketAddr],
    dir: &Path,
) -> Result<Process, BenchError> {
    let workers: Vec<String> = workers.iter().map(ToString::to_string).collect();
    let max_connections = (options.connections + 1024).max(10_000);
    let spec = Spec::new("herd-gateway", binaries::locate(binaries::GATEWAY)?, dir)
        .env("HERD_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_ADMIN__TOKEN", ADMIN_TOKEN)
        .env("HERD_GATEWAY_WORKERS", workers.join(","))
        .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
        .env("HERD_GATEWAY_REDIS__URL", redis.url())
        .env("HERD_GATEWAY_REDIS__PREFIX", PREFIX)
        .env(
            "HERD_GATEWAY_LIMITS__MAX_CONNECTIONS",
            max_connections.to_string(),
        )
        .env("HERD_LOG", "warn")
        .arg("--log-format")
        .arg("json");
    Ok(Process::spawn_and_wait(
        &spec,
        &["public", "admin"],
        START_TIMEOUT,
    )?)
}

/// Waits until the gateway's admin API shows every worker up (bounded).
fn wait_all_up(
    gateway: &mut Process,
    admin: SocketAddr,
    workers: u32,
    stop: &Stop,
) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        stop.check()?;
        check_alive(gateway)?;
        let up = workers_up(admin);
        if up >= Some(workers) {
            return Ok(());
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(BenchError::Setup(format!(
                "the gateway showed {up:?} of {workers} workers up after {START_TIMEOUT:?}; last log lines:\n{}",
                gateway.log_tail(10)
            )));
        }
        stop.sleep(Duration::from_millis(100))?;
    }
}

/// Workers the admin API lists as healthy (or in slow start).
fn workers_up(admin: SocketAddr) -> Option<u32> {
    let reply = http::request(
        admin,
        "GET",
        "/api/workers",
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        None,
        REQUEST_TIMEOUT,
    )
    .ok()?;
    let workers: Vec<serde_json::Value> = serde_json::from_str(&reply.body).ok()?;
    let up = workers
        .iter()
        .filter(|worker| matches!(worker["state"].as_str(), Some("healthy" | "slow_start")))
        .count();
    u32::try_from(up).ok()
}

/// The Markdown report: a compact sample table (at most about 40 rows) and the figures.
pub fn markdown(result: &SoakResult) -> String {
    use std::fmt::Write;
    let options = &result.options;
    let mut out = String::new();
    let kills = match options.kill_every {
        Some(every) => format!(
            ", SIGKILL one worker every {} (back after {})",
            humantime::format_duration(every),
            humantime::format_duration(RESTART_AFTER)
        ),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "### soak — {} connections ({} active at {} req/s, the others one request every {}), {}, {} workers{kills}\n",
        options.connections,
        options.active,
        options.rate,
        humantime::format_duration(options.idle_every),
        humantime::format_duration(options.duration),
        options.workers,
    );
    let _ = writeln!(
        out,
        "| t s | RSS MiB | fds | client conns (gateway) | open (clients) | req/s | failed | events |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---|");
    let row = |out: &mut String,
               t: &str,
               reading: &Reading,
               open: &str,
               rate: &str,
               failed: &str,
               events: &str| {
        let _ = writeln!(
            out,
            "| {t} | {:.1} | {} | {} | {open} | {rate} | {failed} | {events} |",
            mib(reading.rss_kib),
            reading.fds,
            reading.client_sockets
        );
    };
    row(
        &mut out,
        "start",
        &result.start,
        "0",
        "—",
        "—",
        "before any client",
    );
    let stride = result.samples.len().div_ceil(40).max(1);
    let mut previous: Option<&Sample> = None;
    let mut pending: Vec<String> = Vec::new();
    for (index, sample) in result.samples.iter().enumerate() {
        pending.extend(sample.events.iter().cloned());
        let last = index + 1 == result.samples.len();
        if index % stride != 0 && !last {
            continue;
        }
        let rate = match previous {
            Some(before) if sample.t > before.t => {
                format!(
                    "{:.0}",
                    (sample.ok - before.ok) as f64 / (sample.t - before.t)
                )
            }
            _ => "—".into(),
        };
        row(
            &mut out,
            &format!("{:.0}", sample.t),
            &sample.gateway,
            &sample.open.to_string(),
            &rate,
            &(sample.failed + sample.dropped).to_string(),
            &std::mem::take(&mut pending).join(", "),
        );
        previous = Some(sample);
    }
    row(
        &mut out,
        "closed",
        &result.end,
        "0",
        "—",
        "—",
        "every client closed",
    );
    let verdict = &result.verdict;
    let start_rss = mib(result.start.rss_kib);
    let open_rss = result
        .samples
        .first()
        .map_or(0.0, |sample| mib(sample.gateway.rss_kib));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- RSS MiB: start {start_rss:.1}, all connections open {open_rss:.1}, steady (after {} warm-up) {:.1}, peak {:.1}, end {:.1} ({:+.1} % vs steady; slope after warm-up {:+.2} MiB/min), after closing {:.1}",
        humantime::format_duration(options.warmup()),
        mib(verdict.rss_steady_kib),
        mib(verdict.rss_peak_kib),
        mib(verdict.rss_end_kib),
        verdict.rss_growth_percent,
        verdict.rss_slope_mib_per_min,
        mib(result.end.rss_kib),
    );
    let peak_fds = result
        .samples
        .iter()
        .map(|sample| sample.gateway.fds)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "- fds: start {} ({} worker connections, {} other), peak {peak_fds}, after closing {} ({} client sockets, {} worker connections, {} other)",
        result.start.fds,
        result.start.upstream_sockets,
        result.start.other_fds(),
        result.end.fds,
        result.end.client_sockets,
        result.end.upstream_sockets,
        result.end.other_fds(),
    );
    let _ = writeln!(
        out,
        "- requests: {} ok ({} active, {} idle keep-alive), {} failed; {} connections dropped; connections opened in {:.1} s from {} source addresses",
        result.active_ok + result.idle_ok,
        result.active_ok,
        result.idle_ok,
        result.failed,
        result.dropped,
        result.open_seconds,
        result.sources,
    );
    if !result.failures.is_empty() {
        let kinds: Vec<String> = result
            .failures
            .iter()
            .map(|(kind, count)| format!("{kind}: {count}"))
            .collect();
        let _ = writeln!(out, "- failures by kind: {}", kinds.join("; "));
    }
    let _ = writeln!(
        out,
        "- workers: {} killed, {} started again (longest start {} ms)",
        result.kills, result.restarts, result.max_restart_ms
    );
    let _ = writeln!(out);
    if verdict.pass {
        let _ = writeln!(out, "verdict: PASS");
    } else {
        let _ = writeln!(out, "verdict: FAIL — {}", verdict.reasons.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SoakOptions {
        SoakOptions {
            connections: 100,
            active: 10,
            rate: 10,
            duration: Duration::from_secs(100),
            kill_every: Some(Duration::from_secs(30)),
            workers: 3,
            idle_every: Duration::from_secs(5),
            sample_every: Duration::from_secs(5),
        }
    }

    fn reading(rss_mib: u64, fds: u32, client_sockets: u32, upstream_sockets: u32) -> Reading {
        Reading {
            rss_kib: rss_mib * 1024,
            peak_kib: rss_mib * 1024,
            fds,
            client_sockets,
            upstream_sockets,
        }
    }

    /// Samples every 5 s over 100 s: RSS 100 MiB until `from`, then `then` MiB.
    fn samples(from: f64, then: u64) -> Vec<Sample> {
        (0..=20)
            .map(|i| {
                let t = f64::from(i) * 5.0;
                Sample {
                    t,
                    gateway: reading(if t < from { 100 } else { then }, 150, 100, 10),
                    open: 100,
                    ok: 0,
                    failed: 0,
                    dropped: 0,
                    events: Vec::new(),
                }
            })
            .collect()
    }

    #[test]
    fn a_clean_run_passes() {
        let start = reading(10, 30, 0, 3);
        let end = reading(60, 34, 0, 6);
        let verdict = judge(&options(), &start, &samples(80.0, 108), &end, &(0, 0));
        assert!(verdict.pass, "{verdict:?}");
        assert_eq!(verdict.rss_steady_kib, 100 * 1024);
        assert_eq!(verdict.rss_end_kib, 108 * 1024);
        assert_eq!(verdict.rss_peak_kib, 108 * 1024);
        assert!((verdict.rss_growth_percent - 8.0).abs() < 0.01);
        // From 25 s on: 100 MiB until 80 s, then 108: a positive slope.
        assert!(verdict.rss_slope_mib_per_min > 1.0, "{verdict:?}");
        let flat = judge(&options(), &start, &samples(0.0, 100), &end, &(0, 0));
        assert!(flat.rss_slope_mib_per_min.abs() < 1e-9, "{flat:?}");
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
        assert!(slope(&[(1.0, 1.0)]).abs() < 1e-9);
    }

    #[test]
    fn growth_failures_and_leaks_fail() {
        let start = reading(10, 30, 0, 3);
        let clean_end = reading(60, 34, 0, 6);
        // RSS: 100 → 115 MiB is more than 10 %.
        let verdict = judge(&options(), &start, &samples(80.0, 115), &clean_end, &(0, 0));
        assert!(!verdict.pass);
        assert!(verdict.reasons[0].contains("RSS grew"), "{verdict:?}");
        // A failed request, a dropped connection.
        let verdict = judge(&options(), &start, &samples(0.0, 100), &clean_end, &(1, 2));
        assert_eq!(verdict.reasons.len(), 2, "{verdict:?}");
        // Client sockets left, and descriptors that are not connections: 21 → 40.
        let leaky = reading(60, 60, 10, 10);
        let verdict = judge(&options(), &start, &samples(0.0, 100), &leaky, &(0, 0));
        assert!(verdict.reasons[0].contains("client sockets"), "{verdict:?}");
        assert!(
            verdict.reasons[1].contains("descriptor leak"),
            "{verdict:?}"
        );
    }

    #[test]
    fn small_gateways_get_a_few_mib_of_slack() {
        let mut small = samples(80.0, 0);
        for sample in &mut small {
            sample.gateway.rss_kib = if sample.t < 80.0 {
                10 * 1024
            } else {
                13 * 1024
            };
        }
        let start = reading(8, 30, 0, 3);
        let verdict = judge(&options(), &start, &small, &start, &(0, 0));
        assert!(
            verdict.pass,
            "+3 MiB on 10 MiB is within the slack: {verdict:?}"
        );
    }

    #[test]
    fn options_are_checked() {
        assert!(validate(&options()).is_ok());
        for bad in [
            SoakOptions {
                connections: 0,
                ..options()
            },
            SoakOptions {
                active: 101,
                ..options()
            },
            SoakOptions {
                rate: 0,
                ..options()
            },
            SoakOptions {
                workers: 1,
                ..options()
            },
            SoakOptions {
                kill_every: Some(Duration::from_secs(1)),
                ..options()
            },
        ] {
            assert!(
                matches!(validate(&bad), Err(BenchError::Usage(_))),
                "{bad:?}"
            );
        }
        assert_eq!(options().warmup(), Duration::from_secs(25), "a quarter");
        // Idle requests every 30 s: until 30 s + two 5 s samples.
        let slow_idle = SoakOptions {
            idle_every: Duration::from_secs(30),
            ..options()
        };
        assert_eq!(slow_idle.warmup(), Duration::from_secs(40));
        let long = SoakOptions {
            duration: Duration::from_secs(600),
            ..options()
        };
        assert_eq!(long.warmup(), MAX_WARMUP);
        let short = SoakOptions {
            duration: Duration::from_secs(60),
            idle_every: Duration::from_secs(45),
            ..options()
        };
        assert_eq!(
            short.warmup(),
            Duration::from_secs(30),
            "at most half the run"
        );
    }
}
