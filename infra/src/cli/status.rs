//! `herd status`: is every process of the recorded cluster running, and does it answer? Then
//! the workers as the active gateway sees them (state, in-flight, req/s, EWMA latency, p50 and
//! p99 from the gateway's dashboard document, ejections, flags), both gateways' failover roles, and Redis. A table for people, `--json` for scripts,
//! `--watch` to refresh every 2 s until Ctrl-C. Exit 0 when all are healthy, 1 when something
//! is down, 3 when no cluster is running.
//!
//! Workers are named by their id (`w1`) everywhere: in the gateway's admin API, in the
//! `x-herd-worker` response header and here.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::workers::{GatewayFailover, GatewayView, GatewayWorker};
use super::{CliError, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, StatusArgs};
use crate::redis_server;
use crate::state::{Kind, Member, State, StateDir};

/// Longest wait for one health check's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often `--watch` refreshes.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// The window over which one `herd status` measures req/s (two reads of the counters).
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// One process's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Row {
    name: String,
    pid: u32,
    running: bool,
    addr: String,
    checks: String,
    healthy: bool,
    /// Restarts by the supervisor.
    restarts: u32,
    /// In a crash loop (see `cli::supervisor`).
    crash_loop: bool,
}

/// One worker as the active gateway sees it, with its request rate.
#[derive(Debug, Clone, Serialize)]
struct WorkerRow {
    #[serde(flatten)]
    worker: GatewayWorker,
    /// Responses per second over the measuring window.
    req_per_sec: f64,
    /// Median latency (ms) the gateway measured over its dashboard window (none: no requests).
    p50_ms: Option<f64>,
    /// 99th percentile latency (ms) over the same window.
    p99_ms: Option<f64>,
}

/// Everything `herd status` shows.
#[derive(Debug, Clone, Serialize)]
struct Report {
    public_url: String,
    admin_url: String,
    floating_ip: Option<String>,
    processes: Vec<Row>,
    /// Which gateway's view `workers` is.
    seen_by: Option<String>,
    workers: Vec<WorkerRow>,
    /// Why `workers` is empty, when the gateways could not be asked.
    workers_error: Option<String>,
    gateways: Vec<GatewayRow>,
    healthy: bool,
}

/// One gateway's failover view.
#[derive(Debug, Clone, Serialize)]
struct GatewayRow {
    name: String,
    #[serde(flatten)]
    failover: Option<GatewayFailover>,
    error: Option<String>,
}
/// Runs `herd status`; returns the exit code.
pub(crate) fn run(args: &StatusArgs) -> Result<u8, CliError> {
    let dir = StateDir::new(&args.state.state_dir)?;
    let runtime = super::runtime()?;
    if !args.watch {
        return runtime.block_on(once(&dir, args.json));
    }
    runtime.block_on(async {
        let mut stop = super::signals::StopSignal::install()?;
        loop {
            // Clear the screen and go home, like `watch`.
            emit("\x1b[2J\x1b[H");
            let code = once(&dir, false).await?;
            if code == EXIT_NOT_RUNNING {
                return Ok(code);
            }
            tokio::select! {
                _ = stop.wait() => return Ok(code),
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
        }
    })
}

/// One look at the cluster, printed; returns the exit code.
async fn once(dir: &StateDir, json: bool) -> Result<u8, CliError> {
    let herd = super::up::herd_command();
    let Some(state) = dir.load()? else {
        eprintln!(
            "herd: no herd cluster is running (no state file at {}); start one with `{herd} up`",
            dir.state_file().display()
        );
        return Ok(EXIT_NOT_RUNNING);
    };
    if state.is_stale() {
        eprintln!(
            "herd: no herd cluster is running: none of the processes recorded in {} runs any more; `{herd} down` clears the file, `{herd} up` replaces it",
            dir.state_file().display()
        );
        return Ok(EXIT_NOT_RUNNING);
    }
    let report = report(&state).await?;
    if json {
        let json = serde_json::to_string_pretty(&report).expect("a report always serializes");
        emit(&format!("{json}\n"));
    } else {
        emit(&render(&state, dir, &report.processes));
        emit(&render_gateway_view(&report));
    }
    Ok(if report.healthy { EXIT_OK } else { EXIT_FAILED })
}

/// Writes `text` on stdout, ignoring errors: `herd status --json | head` closes the pipe early,
/// and that is no reason to panic.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

async fn report(state: &State) -> Result<Report, CliError> {
    let view = GatewayView::new(state)?;
    // Latency quantiles are differences between two readings of the gateway's counters (one
    // sampled answer in 4): this first ask gives it a reading to compare with (unless someone
    // asked within its 5 s window), and the checks and the rate window below widen the window
    // before the second.
    let _ = view.latencies().await;
    let processes = check_all(state).await?;
    let gateways = view
        .failover()
        .await
        .into_iter()
        .map(|(name, answer)| match answer {
            Ok(failover) => GatewayRow {
                name,
                failover: Some(failover),
                error: None,
            },
            Err(error) => GatewayRow {
                name,
                failover: None,
                error: Some(error),
            },
        })
        .collect();
    let (seen_by, workers, workers_error) = match view.workers().await {
        Ok((name, before)) => {
            tokio::time::sleep(RATE_WINDOW).await;
            let after = view.workers().await.map(|(_, w)| w).unwrap_or_default();
            let mut rows = rates(&before, after, RATE_WINDOW);
            if let Ok(latencies) = view.latencies().await {
                for row in &mut rows {
                    if let Some(latency) = latencies.get(&row.worker.id) {
                        (row.p50_ms, row.p99_ms) = (latency.p50_ms, latency.p99_ms);
                    }
                }
            }
            (Some(name), rows, None)
        }
        Err(error) => (None, Vec::new(), Some(error)),
    };
    let healthy = processes.iter().all(|row| row.healthy);
    Ok(Report {
        public_url: state.public_url.clone(),
        admin_url: state.admin_url.clone(),
        floating_ip: state.floating_ip.clone(),
        processes,
        seen_by,
        workers,
        workers_error,
        gateways,
        healthy,
    })
}

/// The workers of `after`, each with its responses per second since `before`.
fn rates(before: &[GatewayWorker], after: Vec<GatewayWorker>, window: Duration) -> Vec<WorkerRow> {
    after
        .into_iter()
        .map(|worker| {
            let earlier = before
                .iter()
                .find(|w| w.id == worker.id)
                .map_or(worker.answered(), GatewayWorker::answered);
            let req_per_sec =
                worker.answered().saturating_sub(earlier) as f64 / window.as_secs_f64();
            WorkerRow {
                worker,
                req_per_sec,
                p50_ms: None,
                p99_ms: None,
            }
        })
        .collect()
}

fn render_gateway_view(report: &Report) -> String {
    let mut out = String::new();
    match (&report.seen_by, &report.workers_error) {
        (Some(name), _) => {
            out.push_str(&format!("\nworkers as {name} sees them:\n"));
            out.push_str(&format!(
                "{:6}  {:22}  {:12}  {:>9}  {:>7}  {:>8}  {:>8}  {:>8}  {:>10}  FLAGS\n",
                "ID", "ADDRESS", "STATE", "IN-FLIGHT", "REQ/S", "EWMA", "P50", "P99", "EJECTIONS"
            ));
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}ms"));
            for row in &report.workers {
                let w = &row.worker;
                let flags: Vec<&str> = w
                    .flags
                    .iter()
                    .filter(|(_, on)| **on)
                    .map(|(flag, _)| flag.as_str())
                    .collect();
                out.push_str(&format!(
                    "{:6}  {:22}  {:12}  {:>9}  {:>7.1}  {:>6.1}ms  {:>8}  {:>8}  {:>10}  {}\n",
                    w.id,
                    w.addr,
                    w.state,
                    w.in_flight,
                    row.req_per_sec,
                    w.ewma_ms,
                    ms(row.p50_ms),
                    ms(row.p99_ms),
                    w.ejections,
                    if flags.is_empty() {
                        "-".to_string()
                    } else {
                        flags.join(",")
                    }
                ));
            }
        }
        (None, Some(error)) => {
            out.push_str(&format!("\nworkers: cannot ask a gateway ({error})\n"))
        }
        (None, None) => {}
    }
    out.push_str("\ngateways:\n");
    for gateway in &report.gateways {
        match (&gateway.failover, &gateway.error) {
            (Some(f), _) if f.enabled => {
                let last = f
                    .last_transition
                    .as_ref()
                    .map(|t| {
                        format!(
                            "last transition {} -> {} ({})",
                            t["from"].as_str().unwrap_or("?"),
                            t["to"].as_str().unwrap_or("?"),
                            t["reason"].as_str().unwrap_or("?")
                        )
                    })
                    .unwrap_or_else(|| "no transition yet".into());
                let address = match f.holds_address {
                    Some(true) => ", holds the floating address",
                    _ => "",
                };
                out.push_str(&format!(
                    "  {}: {} epoch {}{address}; {last}\n",
                    gateway.name,
                    f.role.as_deref().unwrap_or("?"),
                    f.epoch.unwrap_or_default()
                ));
            }
            (Some(_), _) => out.push_str(&format!("  {}: failover off\n", gateway.name)),
            (None, error) => out.push_str(&format!(
                "  {}: admin API does not answer ({})\n",
                gateway.name,
                error.as_deref().unwrap_or("?")
            )),
        }
    }
    if let Some(ip) = &report.floating_ip {
        out.push_str(&format!("  floating address {ip} on lo\n"));
    }
    out
}

async fn check_all(state: &State) -> Result<Vec<Row>, CliError> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(CHECK_TIMEOUT)
        .connect_timeout(CHECK_TIMEOUT)
        .build()
        .map_err(|error| CliError::Os {
            what: "build an HTTP client",
            source: std::io::Error::other(error),
        })?;
    // Concurrently: one listener that hangs until the timeout must not add up to a slow status.
    let tasks: Vec<_> = state
        .members
        .iter()
        .cloned()
        .map(|member| {
            let client = client.clone();
            tokio::spawn(async move { check(&client, &member).await })
        })
        .collect();
    let mut rows = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(row) => rows.push(row),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    Ok(rows)
}

async fn check(client: &reqwest::Client, member: &Member) -> Row {
    let running = member.process.is_running();
    let addr = member
        .addr
        .map(|a| a.to_string())
        .unwrap_or_else(|| "-".into());
    let (checks, ok) = if !running {
        ("not running".to_string(), false)
    } else {
        match (member.kind, member.addr) {
            (Kind::Supervisor, _) => ("supervising (restarts what dies)".to_string(), true),
            (Kind::Redis, Some(addr)) => {
                let pong = tokio::task::spawn_blocking(move || redis_server::ping(addr))
                    .await
                    .unwrap_or(false);
                (
                    if pong { "PING ok" } else { "no answer to PING" }.to_string(),
                    pong,
                )
            }
            (Kind::Worker, Some(addr)) => http_checks(client, addr, "").await,
            (Kind::Gateway, Some(addr)) => {
                let admin = member.admin_addr.unwrap_or(addr);
                http_checks(client, admin, "admin ").await
            }
            (_, None) => ("no address recorded".to_string(), false),
        }
    };
    let checks = if member.supervision.crash_loop {
        format!(
            "CRASH LOOP ({} restarts); {checks}",
            member.supervision.restarts
        )
    } else {
        checks
    };
    Row {
        name: member.name.clone(),
        pid: member.process.pid,
        running,
        addr,
        checks,
        healthy: running && ok && !member.supervision.crash_loop,
        restarts: member.supervision.restarts,
        crash_loop: member.supervision.crash_loop,
    }
}

/// GET `/healthz` and `/readyz` on `addr`; healthy when both answer 2xx.
async fn http_checks(client: &reqwest::Client, addr: SocketAddr, label: &str) -> (String, bool) {
    let mut parts = Vec::new();
    let mut ok = true;
    for path in ["/healthz", "/readyz"] {
        let answer = match client.get(format!("http://{addr}{path}")).send().await {
            Ok(response) => {
                ok &= response.status().is_success();
                response.status().as_u16().to_string()
            }
            Err(error) => {
                ok = false;
                if error.is_timeout() {
                    "timeout".to_string()
                } else {
                    "no answer".to_string()
                }
            }
        };
        parts.push(format!("{path} {answer}"));
    }
    let prefix = if label.is_empty() {
        String::new()
    } else {
        format!("{label}{addr} ")
    };
    (format!("{prefix}{}", parts.join(", ")), ok)
}

fn render(state: &State, dir: &StateDir, rows: &[Row]) -> String {
    let age = SystemTime::now()
        .duration_since(state.started())
        .map(|age| humantime::format_duration(Duration::from_secs(age.as_secs())).to_string())
        .unwrap_or_else(|_| "?".into());
    let mode = if state.detached {
        "detached"
    } else {
        "foreground"
    };
    let mut out = format!(
        "herd cluster in {}: up {age} (since {}, {mode})\npublic {}  admin {}\n\n",
        dir.root().display(),
        super::timestamp(state),
        state.public_url,
        state.admin_url
    );
    let header = Row {
        name: "NAME".into(),
        pid: 0,
        running: true,
        addr: "ADDRESS".into(),
        checks: "CHECKS".into(),
        healthy: true,
        restarts: 0,
        crash_loop: false,
    };
    let name_width = rows
        .iter()
        .chain([&header])
        .map(|r| r.name.len())
        .max()
        .unwrap_or(4);
    let addr_width = rows
        .iter()
        .chain([&header])
        .map(|r| r.addr.len())
        .max()
        .unwrap_or(7);
    out.push_str(&format!(
        "{:name_width$}  {:>8}  {:8}  {:addr_width$}  {:>8}  CHECKS\n",
        "NAME", "PID", "PROCESS", "ADDRESS", "RESTARTS"
    ));
    for row in rows {
        out.push_str(&format!(
            "{:name_width$}  {:>8}  {:8}  {:addr_width$}  {:>8}  {}\n",
            row.name,
            row.pid,
            if row.running { "running" } else { "exited" },
            row.addr,
            row.restarts,
            row.checks
        ));
    }
    let unhealthy: Vec<&str> = rows
        .iter()
        .filter(|r| !r.healthy)
        .map(|r| r.name.as_str())
        .collect();
    out.push('\n');
    if unhealthy.is_empty() {
        out.push_str(&format!("all {} processes are healthy\n", rows.len()));
    } else {
        out.push_str(&format!(
            "{} of {} processes are down or unhealthy: {}\n",
            unhealthy.len(),
            rows.len(),
            unhealthy.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::VERSION;

    #[test]
    fn renders_a_table_and_names_what_is_down() {
        let state = State {
            version: VERSION,
            started_at: crate::state::now_unix() - 65,
            detached: true,
            public_url: "http://127.0.0.1:8080".into(),
            admin_url: "http://127.0.0.1:9090".into(),
            admin_token: "t".into(),
            redis_url: "redis://127.0.0.1:6400/0".into(),
            redis_prefix: "herd:".into(),
            members: Vec::new(),
            floating_ip: None,
        };
        let rows = vec![
            Row {
                name: "redis".into(),
                pid: 10,
                running: true,
                addr: "127.0.0.1:6400".into(),
                checks: "PING ok".into(),
                healthy: true,
                restarts: 0,
                crash_loop: false,
            },
            Row {
                name: "worker-w1".into(),
                pid: 11,
                running: false,
                addr: "127.0.0.1:4001".into(),
                checks: "not running".into(),
                healthy: false,
                restarts: 2,
                crash_loop: false,
            },
        ];
        let dir = StateDir::new(std::path::Path::new("/tmp/h")).unwrap();
        let text = render(&state, &dir, &rows);
        assert!(text.contains("up 1m 5s"), "{text}");
        assert!(
            text.lines().any(|l| l.starts_with("worker-w1 ")
                && l.contains(" 11  exited ")
                && l.contains(" 2  not running")),
            "{text}"
        );
        assert!(
            text.contains("1 of 2 processes are down or unhealthy: worker-w1"),
            "{text}"
        );
    }
}
