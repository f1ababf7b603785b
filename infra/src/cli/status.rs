//! `herd status`: is every process of the recorded cluster running, and does it answer? Prints
//! one row per process; exit 0 when all are healthy, 1 when something is down, 3 when no
//! cluster is running.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use super::{CliError, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, StateDirArgs};
use crate::redis_server;
use crate::state::{Kind, Member, State, StateDir};

/// Longest wait for one health check's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One process's health.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    name: String,
    pid: u32,
    running: bool,
    addr: String,
    checks: String,
    healthy: bool,
}

/// Runs `herd status`; returns the exit code.
pub(crate) fn run(args: &StateDirArgs) -> Result<u8, CliError> {
    let dir = StateDir::new(&args.state_dir)?;
    let Some(state) = dir.load()? else {
        eprintln!(
            "herd: no herd cluster is running (no state file at {}); start one with `herd up`",
            dir.state_file().display()
        );
        return Ok(EXIT_NOT_RUNNING);
    };
    if state.is_stale() {
        eprintln!(
            "herd: no herd cluster is running: none of the processes recorded in {} runs any more; `herd down` clears the file, `herd up` replaces it",
            dir.state_file().display()
        );
        return Ok(EXIT_NOT_RUNNING);
    }
    let rows = super::runtime()?.block_on(check_all(&state))?;
    print!("{}", render(&state, &dir, &rows));
    Ok(if rows.iter().all(|row| row.healthy) {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
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
            (Kind::Supervisor, _) => ("supervising (foreground herd up)".to_string(), true),
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
    Row {
        name: member.name.clone(),
        pid: member.process.pid,
        running,
        addr,
        checks,
        healthy: running && ok,
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
        "{:name_width$}  {:>8}  {:8}  {:addr_width$}  CHECKS\n",
        "NAME", "PID", "PROCESS", "ADDRESS"
    ));
    for row in rows {
        out.push_str(&format!(
            "{:name_width$}  {:>8}  {:8}  {:addr_width$}  {}\n",
            row.name,
            row.pid,
            if row.running { "running" } else { "exited" },
            row.addr,
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
        };
        let rows = vec![
            Row {
                name: "redis".into(),
                pid: 10,
                running: true,
                addr: "127.0.0.1:6400".into(),
                checks: "PING ok".into(),
                healthy: true,
            },
            Row {
                name: "worker-w1".into(),
                pid: 11,
                running: false,
                addr: "127.0.0.1:4001".into(),
                checks: "not running".into(),
                healthy: false,
            },
        ];
        let dir = StateDir::new(std::path::Path::new("/tmp/h")).unwrap();
        let text = render(&state, &dir, &rows);
        assert!(text.contains("up 1m 5s"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("worker-w1 ") && l.contains(" 11  exited ")),
            "{text}"
        );
        assert!(
            text.contains("1 of 2 processes are down or unhealthy: worker-w1"),
            "{text}"
        );
    }
}
