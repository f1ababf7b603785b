//! `herd up`: start a local cluster, print where to reach it, then either supervise it until
//! Ctrl-C / SIGTERM and stop it cleanly (the default), or record it in the state file and leave
//! it running (`--detach`). The state file is written in both modes, so `herd status` and
//! `herd down` work from another shell, and a second `herd up` on the same state directory is
//! refused while the first cluster runs.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use super::cluster::{Cluster, Plan};
use super::signals::StopSignal;
use super::supervisor::Supervisor;
use super::{CliError, EXIT_OK, UpArgs, token};
use crate::binaries::{self, GATEWAY, WORKER};
use crate::process::Spec;
use crate::state::{State, StateDir};

/// Redis key prefix of a local cluster (the workers' and gateway's default).
const PREFIX: &str = "herd:";

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
        floating_ip: None,
    };
    let mut plan = plan;
    plan.floating_ip = floating_ip(&plan.dir);
    super::runtime()?.block_on(up(plan, args.detach))
}

/// The gateway pair's floating address on `lo`, when herd may add one (root), else `None` with a
/// line saying why. The address is derived from the state directory, so two local clusters (two
/// checkouts, parallel tests) don't share one.
fn floating_ip(dir: &StateDir) -> Option<Ipv4Addr> {
    if !nix::unistd::geteuid().is_root() {
        super::warn(
            "herd: the gateway pair runs without a floating address: putting one on lo needs root (CAP_NET_ADMIN); the standby still takes over the active role, on its own port",
        );
        return None;
    }
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    dir.root().hash(&mut hasher);
    let [a, b, ..] = hasher.finish().to_le_bytes();
    // 127.77.0.0/16 minus .0 and .255 endings: clear of 127.0.0.1 and of the lab's addresses.
    Some(Ipv4Addr::new(127, 77, a, b.clamp(1, 254)))
}

async fn up(mut plan: Plan, detach: bool) -> Result<u8, CliError> {
    let mut stop = StopSignal::install()?;
    plan.dir.create()?;
    plan.token = token::generate()?;
    plan.dir.write_token(&plan.token)?;
    super::warn(format!(
        "herd: starting redis-server, {} workers and the gateway pair (logs in {})",
        plan.workers,
        shown(&plan.dir.log_dir())
    ));
    let mut cluster = Cluster::default();
    let started = cluster.start(&plan, &stop).await;
    let saved = started.and_then(|()| {
        let supervisor = if detach {
            spawn_supervisor(&plan.dir)?
        } else {
            std::process::id()
        };
        let mut state = cluster.state(&plan, Some(supervisor));
        state.detached = detach;
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
    // From here on the state file is the truth: the supervisor watches what it records, and
    // `herd scale` / `herd rollout` change it.
    cluster.detach();
    print_banner(&state, &plan.dir, detach);
    if detach {
        return Ok(EXIT_OK);
    }
    supervise_until_stopped(&plan.dir, &mut stop).await
}

/// Supervises the cluster recorded in `dir` until Ctrl-C / SIGTERM, then stops it in order and
/// clears the state file. A process that dies meanwhile is restarted (see
/// [`super::supervisor`]); the rest keep serving.
pub(crate) async fn supervise_until_stopped(
    dir: &StateDir,
    stop: &mut StopSignal,
) -> Result<u8, CliError> {
    let mut supervisor = Supervisor::new(dir.clone());
    let signal = supervisor.run(stop).await;
    super::say(format!("herd: {signal} received; stopping the cluster"));
    let dir = dir.clone();
    tokio::task::spawn_blocking(move || -> Result<(), CliError> {
        let _lock = dir.lock()?;
        if let Some(state) = dir.load()? {
            let (_, survivors) = super::down::stop_servers(&state, true);
            if !survivors.is_empty() {
                return Err(CliError::Survivors(survivors.join(", ")));
            }
        }
        dir.clear()?;
        Ok(())
    })
    .await
    .map_err(|error| CliError::Os {
        what: "stop the cluster",
        source: std::io::Error::other(error),
    })??;
    super::say("herd: stopped; nothing left running");
    Ok(EXIT_OK)
}

/// `herd supervise`: the background supervisor `herd up --detach` leaves.
pub(crate) fn supervise_detached(args: &super::StateDirArgs) -> Result<u8, CliError> {
    let dir = StateDir::new(&args.state_dir)?;
    super::runtime()?.block_on(async {
        let mut stop = StopSignal::install()?;
        supervise_until_stopped(&dir, &mut stop).await
    })
}

/// Starts `herd supervise` for `dir` in the background (its own process group, so the
/// terminal's Ctrl-C doesn't reach it; output in `logs/supervisor.log`); returns its pid.
///
/// Why a background supervisor rather than none: users expect a detached cluster to behave
/// like a foreground one (a dead worker comes back), as `docker compose up -d` does.
fn spawn_supervisor(dir: &StateDir) -> Result<u32, CliError> {
    let program = std::env::current_exe().map_err(|source| CliError::Os {
        what: "find the herd executable",
        source,
    })?;
    let spec = Spec::new("supervisor", program, &dir.log_dir())
        .arg("supervise")
        .arg("--state-dir")
        .arg(dir.root().display().to_string());
    let process = crate::process::Process::spawn(&spec)?;
    Ok(process.detach())
}

/// Errors if a cluster recorded in `dir` still runs; clears the files of one that is gone.
fn refuse_if_running(dir: &StateDir) -> Result<(), CliError> {
    let Some(state) = dir.load()? else {
        return Ok(());
    };
    let running = state.running();
    if !running.is_empty() {
        return Err(CliError::AlreadyRunning {
            herd: herd_command(),
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
    let herd = herd_command();
    banner.push_str(&format!("  {herd} status{dir_flag}\n\n"));
    if let Some(standby) = state
        .members
        .iter()
        .filter(|m| m.kind == crate::state::Kind::Gateway)
        .nth(1)
        .and_then(|m| m.addr)
    {
        let floating = match &state.floating_ip {
            Some(ip) => format!("; the active one holds {ip} on lo"),
            None => String::new(),
        };
        banner.push_str(&format!(
            "gateway pair: gw1 serves {url}, the standby gw2 serves http://{standby}{floating}\n"
        ));
    }
    if detach {
        banner.push_str(&format!(
            "running in the background, restarted by `herd supervise` when a process dies; stop it with: {herd} down{dir_flag}"
        ));
    } else {
        banner.push_str(&format!(
            "Ctrl-C stops it (or `{herd} down{dir_flag}` from another shell)"
        ));
    }
    super::say(banner);
}

/// How to run herd again as the user ran it: `./infra/herd` from a checkout (the wrapper script
/// that builds and runs it; `herd` is not on PATH there), else `herd`.
pub(crate) fn herd_command() -> String {
    herd_command_from(std::env::var("HERD_WRAPPER").ok().as_deref())
}

/// [`herd_command`] given the wrapper's `$0` (set by `infra/herd`).
fn herd_command_from(wrapper: Option<&str>) -> String {
    if let Some(wrapper) = wrapper {
        let path = PathBuf::from(wrapper);
        let shown = shown(&path);
        if shown.contains('/') {
            return if shown.starts_with('/') || shown.starts_with('.') {
                shown
            } else {
                format!("./{shown}")
            };
        }
    }
    "herd".to_string()
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
    fn hints_name_the_wrapper_as_it_was_run() {
        assert_eq!(herd_command_from(None), "herd");
        assert_eq!(herd_command_from(Some("./infra/herd")), "./infra/herd");
        assert_eq!(
            herd_command_from(Some("../x/infra/herd")),
            "../x/infra/herd"
        );
        let cwd = std::env::current_dir().unwrap();
        let below = cwd.join("infra/herd");
        assert_eq!(
            herd_command_from(Some(below.to_str().unwrap())),
            "./infra/herd"
        );
        assert_eq!(
            herd_command_from(Some("/opt/h/infra/herd")),
            "/opt/h/infra/herd"
        );
    }

    #[test]
    fn paths_below_the_current_dir_are_shown_relative() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(shown(&cwd.join(".herd/logs")), ".herd/logs");
        assert_eq!(shown(Path::new("/elsewhere/x")), "/elsewhere/x");
    }
}
