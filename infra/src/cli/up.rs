//! `herd up`: start a local cluster, print where to reach it, then either supervise it until
//! Ctrl-C / SIGTERM and stop it cleanly (the default), or record it in the state file and leave
//! it running (`--detach`). The state file is written in both modes, so `herd status` and
//! `herd down` work from another shell, and a second `herd up` on the same state directory is
//! refused while the first cluster runs.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cluster::{Cluster, Plan};
use super::signals::StopSignal;
use super::{CliError, EXIT_OK, UpArgs, token};
use crate::binaries::{self, GATEWAY, WORKER};
use crate::state::{State, StateDir};

/// Redis key prefix of a local cluster (the workers' and gateway's default).
const PREFIX: &str = "herd:";
/// How often the foreground `herd up` looks whether a process died on its own.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs `herd up`; returns the exit code.
pub(crate) fn run(args: &UpArgs) -> Result<u8, CliError> {
    args.validate()?;
    let dir = StateDir::new(&args.state.state_dir)?;
    refuse_if_running(&dir)?;
    let fixed_ports = [
        ("--port", args.port),
        ("--admin-port", args.admin_port),
        ("--redis-port", args.fixed_redis_port().unwrap_or(0)),
    ];
    for (flag, port) in fixed_ports {
        ensure_free(port, flag)?;
    }
    // Find both executables before starting anything, so a missing one costs nothing to undo.
    let plan = Plan {
        workers: args.workers,
        public: loopback(args.port),
        admin: loopback(args.admin_port),
        redis_port: args.fixed_redis_port(),
        redis_cluster: args.redis_cluster,
        dir,
        token: String::new(),
        prefix: PREFIX.into(),
        worker_program: binaries::locate(WORKER)?,
        gateway_program: binaries::locate(GATEWAY)?,
    };
    super::runtime()?.block_on(up(plan, args.detach))
}

async fn up(mut plan: Plan, detach: bool) -> Result<u8, CliError> {
    let mut stop = StopSignal::install()?;
    plan.dir.create()?;
    plan.token = token::generate()?;
    plan.dir.write_token(&plan.token)?;
    super::warn(format!(
        "herd: starting redis-server, {} workers and a gateway (logs in {})",
        plan.workers,
        shown(&plan.dir.log_dir())
    ));
    let mut cluster = Cluster::default();
    let started = cluster.start(&plan, &stop).await;
    let saved = started.and_then(|()| {
        let state = cluster.state(&plan, (!detach).then(std::process::id));
        plan.dir.save(&state)?;
        Ok(state)
    });
    let state = match saved {
        Ok(state) => state,
        Err(error) => {
            super::warn("herd: the cluster did not come up; stopping what had started");
            tokio::task::spawn_blocking(move || cluster.stop())
                .await
                .ok();
            let _ = plan.dir.clear();
            return Err(error);
        }
    };
    print_banner(&state, &plan.dir, detach);
    if detach {
        cluster.detach();
        return Ok(EXIT_OK);
    }

    let signal = supervise(&mut cluster, &mut stop).await;
    super::say(format!("herd: {signal} received; stopping the cluster"));
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .ok();
    plan.dir.clear()?;
    super::say("herd: stopped; nothing left running");
    Ok(EXIT_OK)
}

/// Waits for Ctrl-C / SIGTERM, reporting any process that dies meanwhile (the rest keep
/// serving; a `herd up` that tore everything down because one worker died would defeat the
/// point of having several).
async fn supervise(cluster: &mut Cluster, stop: &mut StopSignal) -> &'static str {
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            signal = stop.wait() => return signal,
            _ = watch.tick() => {
                for line in cluster.newly_exited() {
                    super::warn(format!("herd: {line}"));
                }
            }
        }
    }
}

/// Errors if a cluster recorded in `dir` still runs; clears the files of one that is gone.
fn refuse_if_running(dir: &StateDir) -> Result<(), CliError> {
    let Some(state) = dir.load()? else {
        return Ok(());
    };
    let running = state.running();
    if !running.is_empty() {
        return Err(CliError::AlreadyRunning {
            dir: dir.root().to_path_buf(),
            started: super::timestamp(&state),
            running: running
                .iter()
                .map(|m| format!("{} pid {}", m.name, m.process.pid))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    eprintln!(
        "herd: note: replacing the state file of the cluster started at {}: none of its processes runs any more",
        super::timestamp(&state)
    );
    dir.clear()?;
    Ok(())
}

/// Errors unless `port` (when not 0) can be bound on 127.0.0.1 now: a taken port is reported
/// before anything starts, rather than as a gateway that died with a bind error in its log.
fn ensure_free(port: u16, flag: &'static str) -> Result<(), CliError> {
    if port == 0 {
        return Ok(());
    }
    TcpListener::bind(loopback(port))
        .map(drop)
        .map_err(|source| CliError::PortInUse { port, flag, source })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// `path` relative to the current directory when it is below it (shorter to read and type).
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(PathBuf::from))
        .filter(|relative| !relative.as_os_str().is_empty())
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

fn print_banner(state: &State, dir: &StateDir, detach: bool) {
    let url = &state.public_url;
    let root = shown(dir.root());
    let dir_flag = if root == ".herd" {
        String::new()
    } else {
        format!(" --state-dir {root}")
    };
    let jar = shown(&dir.root().join("cookies"));
    let json = "-H 'content-type: application/json'";
    let mut banner = format!(
        "herd is up: {url}  (admin {}, token in {})\n\ntry it:\n",
        state.admin_url,
        shown(&dir.token_file())
    );
    banner.push_str(&format!(
        "  curl -c {jar} {json} -d '{{\"user\":\"ann\"}}' {url}/login\n"
    ));
    banner.push_str(&format!(
        "  curl -b {jar} {json} -d '{{\"item\":\"apple\",\"qty\":1}}' {url}/cart/items\n"
    ));
    banner.push_str(&format!(
        "  curl -b {jar} -i {url}/cart      # x-herd-worker says which worker answered\n"
    ));
    banner.push_str(&format!("  herd status{dir_flag}\n\n"));
    if detach {
        banner.push_str(&format!(
            "running in the background; stop it with: herd down{dir_flag}"
        ));
    } else {
        banner.push_str(&format!(
            "Ctrl-C stops it (or `herd down{dir_flag}` from another shell)"
        ));
    }
    super::say(banner);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_reported_with_its_flag() {
        let taken = TcpListener::bind(loopback(0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let error = ensure_free(port, "--admin-port").unwrap_err().to_string();
        assert!(error.contains(&format!("port {port}")), "{error}");
        assert!(error.contains("--admin-port"), "{error}");
        ensure_free(0, "--port").unwrap();
    }

    #[test]
    fn paths_below_the_current_dir_are_shown_relative() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(shown(&cwd.join(".herd/logs")), ".herd/logs");
        assert_eq!(shown(Path::new("/elsewhere/x")), "/elsewhere/x");
    }
}
