//! `herd up|down|status|scale|rollout --inventory FILE` (and `herd tls push --inventory FILE`):
//! the thin layer between the command line and [`crate::deploy`]. The file is read and checked
//! first: a bad inventory is refused before
//! anything starts, with exit 2 and one line naming the entry and the problem.

use std::path::{Path, PathBuf};

use super::{
    CliError, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, RolloutArgs, ScaleArgs, StateDirArgs,
    StatusArgs, TlsPushArgs, UpArgs, token,
};
use crate::deploy::{self, Options};
use crate::inventory::{self, Inventory};

/// Loads the inventory named by `--inventory`, or a usage error (exit 2).
pub(super) fn load(state: &StateDirArgs) -> Result<(Inventory, PathBuf), CliError> {
    let file = state
        .inventory
        .as_deref()
        .expect("dispatched on --inventory");
    let inventory = inventory::load(file).map_err(|error| CliError::Usage(error.to_string()))?;
    let root = std::path::absolute(&state.state_dir)
        .unwrap_or_else(|_| state.state_dir.clone())
        .join(format!("inventory-{}", inventory.name));
    Ok((inventory, root))
}

fn file_flag(state: &StateDirArgs) -> String {
    let file = state.inventory.as_deref().unwrap_or(Path::new("FILE"));
    let dir = if state.state_dir == Path::new(".herd") {
        String::new()
    } else {
        format!(" --state-dir {}", state.state_dir.display())
    };
    format!("--inventory {}{dir}", file.display())
}

/// `herd up --inventory FILE`.
pub(crate) fn up(args: &UpArgs) -> Result<u8, CliError> {
    refuse_local_flags(args)?;
    let (inventory, state_root) = load(&args.state)?;
    let options = Options {
        state_root: state_root.clone(),
        token: token::generate()?,
    };
    let report = deploy::up(&inventory, &options, &mut |line| {
        super::warn(format!("herd: {line}"))
    })?;
    let token_file = state_root.join("admin-token");
    deploy::write_private(&token_file, &format!("{}\n", options.token))?;
    let flag = file_flag(&args.state);
    super::say(format!(
        "herd is up: {url}  (active gateway on {active}, {workers} workers healthy, up in {took:.1}s; admin token in {token})\n\n  herd status {flag}\n  herd down {flag}",
        url = report.public_url,
        active = report.active,
        workers = report.workers,
        took = report.took.as_secs_f64(),
        token = token_file.display(),
    ));
    Ok(EXIT_OK)
}

/// The flags of a local `herd up` say what the inventory says; given with `--inventory` they
/// would be ignored, so they are refused (a value equal to the default can't be told apart and
/// passes).
fn refuse_local_flags(args: &UpArgs) -> Result<(), CliError> {
    let defaults = <UpArgs as clap::FromArgMatches>::from_arg_matches(
        &<UpArgs as clap::Args>::augment_args(clap::Command::new("up")).get_matches_from(["up"]),
    )
    .expect("the defaults parse");
    let given = [
        ("--workers", args.workers != defaults.workers),
        ("--port", args.port != defaults.port),
        ("--admin-port", args.admin_port != defaults.admin_port),
        ("--redis-port", args.redis_port.is_some()),
        ("--detach", args.detach),
    ];
    if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
        return Err(CliError::Usage(format!(
            "{flag} does not go with --inventory: the inventory says what runs where (and `herd up --inventory` always returns once the cluster is up)"
        )));
    }
    Ok(())
}

/// `herd down --inventory FILE`.
pub(crate) fn down(args: &StateDirArgs) -> Result<u8, CliError> {
    let (inventory, state_root) = load(args)?;
    let options = Options {
        state_root: state_root.clone(),
        token: String::new(),
    };
    deploy::down(&inventory, &options, &mut |line| super::say(line))?;
    let _ = std::fs::remove_file(state_root.join("admin-token"));
    super::say(format!("herd: inventory {} is down", inventory.name));
    Ok(EXIT_OK)
}

/// `herd status --inventory FILE [--json | --watch]`: exit 0 all healthy, 1 something down, 3
/// nothing runs. `--watch` redraws the table every 2 s (like the local `status --watch`) until
/// Ctrl-C, or until nothing of the cluster runs any more.
pub(crate) fn status(args: &StatusArgs) -> Result<u8, CliError> {
    let (inventory, state_root) = load(&args.state)?;
    let options = Options {
        state_root,
        token: String::new(),
    };
    if !args.watch {
        let status = deploy::status::collect(&inventory, &options);
        if args.json {
            super::say(serde_json::to_string_pretty(&status).expect("a Status always serializes"));
        } else {
            super::say(status.table());
        }
        return Ok(exit_code(&status));
    }
    super::runtime()?.block_on(async {
        let mut stop = super::signals::StopSignal::install()?;
        let shared = std::sync::Arc::new((inventory, options));
        loop {
            let task = shared.clone();
            let status =
                tokio::task::spawn_blocking(move || deploy::status::collect(&task.0, &task.1))
                    .await
                    .map_err(|error| CliError::Os {
                        what: "collect the status",
                        source: std::io::Error::other(error),
                    })?;
            // Clear the screen and go home, like `watch`.
            super::say(format!(
                "\x1b[2J\x1b[H{}  (every {}s, Ctrl-C to stop)\n{}",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                WATCH_EVERY.as_secs(),
                status.table()
            ));
            let code = exit_code(&status);
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

/// How often `status --inventory --watch` redraws.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn exit_code(status: &deploy::status::Status) -> u8 {
    if status.nothing_runs() {
        EXIT_NOT_RUNNING
    } else if status.healthy() {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// The image a `scale` or `rollout` is about: the one named, or the inventory's only one.
fn image(inventory: &Inventory, named: Option<&str>) -> Result<String, CliError> {
    let all: Vec<&str> = inventory.images.iter().map(|i| i.name.as_str()).collect();
    match (named, all.as_slice()) {
        (Some(name), _) if all.contains(&name) => Ok(name.to_string()),
        (None, [only]) => Ok(only.to_string()),
        (Some(name), _) => Err(CliError::Usage(format!(
            "no image {name:?} in inventory {} (it has: {})",
            inventory.name,
            all.join(", ")
        ))),
        (None, _) => Err(CliError::Usage(format!(
            "inventory {} has several images ({}): name the one to change",
            inventory.name,
            all.join(", ")
        ))),
    }
}

/// Refuses a `scale` or `rollout` of an inventory whose netns machines have no namespace (it
/// is not up): exit 3, as the local commands without a cluster.
fn require_up(inventory: &Inventory, state: &StateDirArgs) -> Result<(), CliError> {
    let missing = inventory
        .machines
        .iter()
        .filter(|m| m.transport == inventory::Transport::Netns)
        .map(|m| deploy::netns_name(inventory, &m.name))
        .find(|ns| !crate::netns::exists(ns));
    match missing {
        Some(ns) => Err(CliError::NotRunning(format!(
            "inventory {} is not up (no network namespace {ns}); start it with `{} up {}`",
            inventory.name,
            super::up::herd_command(),
            file_flag(state)
        ))),
        None => Ok(()),
    }
}

/// Holds `{state_root}/change.lock` (`flock`) while a `scale` or `rollout` runs, so two from
/// this box don't both write the machines' records; a second one is refused at once.
fn lock_changes(state_root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, CliError> {
    let os = |source| CliError::Os {
        what: "lock the inventory for a change",
        source,
    };
    std::fs::create_dir_all(state_root).map_err(os)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_root.join("change.lock"))
        .map_err(os)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        CliError::Change(format!(
            "another `herd scale` or `herd rollout` of this inventory runs (it holds {})",
            state_root.join("change.lock").display()
        ))
    })
}

/// `herd tls push --inventory FILE`: exit 0 when both gateways reloaded (or don't run and
/// read the files when they start), 1 when one refused the new files.
pub(crate) fn tls_push(args: &TlsPushArgs) -> Result<u8, CliError> {
    let state = StateDirArgs {
        inventory: Some(args.inventory.clone()),
        state_dir: args.state_dir.clone(),
    };
    let (inventory, state_root) = load(&state)?;
    let options = Options {
        state_root,
        token: String::new(),
    };
    let outcomes = deploy::tls::push(&inventory, &options, &mut |line| super::say(line))?;
    let refused = outcomes
        .iter()
        .any(|(_, outcome)| *outcome == deploy::tls::Pushed::Refused);
    Ok(if refused { EXIT_FAILED } else { EXIT_OK })
}

/// `herd scale [IMAGE] N --inventory FILE [--on MACHINE]`.
pub(crate) fn scale(args: &ScaleArgs) -> Result<u8, CliError> {
    let (inventory, state_root) = load(&args.state)?;
    // Each machine's max_workers is checked as workers are placed; this only bounds N.
    let room: u32 = inventory
        .machines
        .iter()
        .map(|m| u32::from(m.max_workers))
        .sum();
    let (_, wanted) = args.image_and_count_up_to(room.max(1))?;
    let named = (args.target.len() == 2).then(|| args.target[0].as_str());
    let image = image(&inventory, named)?;
    if let Some(on) = &args.on
        && inventory.machine(on).is_none()
    {
        return Err(CliError::Usage(format!(
            "--on {on}: no such machine in inventory {}",
            inventory.name
        )));
    }
    require_up(&inventory, &args.state)?;
    let _lock = lock_changes(&state_root)?;
    let options = Options {
        state_root,
        token: String::new(),
    };
    deploy::scale::scale(
        &inventory,
        &options,
        &image,
        wanted as usize,
        args.on.as_deref(),
        args.timeout,
        &mut |line| super::say(line),
    )?;
    Ok(EXIT_OK)
}

/// `herd rollout [IMAGE] --inventory FILE [--binary B] [--env K=V] [--batch N]`.
pub(crate) fn rollout(args: &RolloutArgs) -> Result<u8, CliError> {
    let (inventory, state_root) = load(&args.state)?;
    let env = args.env_pairs()?;
    let image = image(&inventory, args.image.as_deref())?;
    let binary = match &args.binary {
        Some(path) => {
            let path = std::path::absolute(path).map_err(|source| CliError::Os {
                what: "resolve --binary",
                source,
            })?;
            if !path.is_file() {
                return Err(CliError::Usage(format!(
                    "--binary {}: no such file",
                    path.display()
                )));
            }
            Some(path)
        }
        None => None,
    };
    require_up(&inventory, &args.state)?;
    let _lock = lock_changes(&state_root)?;
    super::say_if_restart(args);
    let options = Options {
        state_root,
        token: String::new(),
    };
    deploy::scale::rollout(
        &inventory,
        &options,
        &image,
        deploy::scale::Upgrade {
            binary: binary.as_deref(),
            env: &env,
            batch: args.batch as usize,
        },
        args.timeout,
        &mut |line| super::say(line),
    )?;
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    fn up(args: &[&str]) -> UpArgs {
        let all = ["herd", "up", "--inventory", "i.toml"].iter().chain(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Up(up) => up,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_change_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("inventory-x");
        let held = lock_changes(&root).unwrap();
        let error = lock_changes(&root).unwrap_err();
        assert!(
            error.to_string().contains("another `herd scale`"),
            "{error}"
        );
        drop(held);
        lock_changes(&root).unwrap();
    }

    #[test]
    fn scale_and_rollout_name_an_image_or_take_the_only_one() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/netns-6.toml");
        let mut inv = inventory::load(&file).unwrap();
        assert_eq!(image(&inv, None).unwrap(), "demo");
        assert_eq!(image(&inv, Some("demo")).unwrap(), "demo");
        let error = image(&inv, Some("api")).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("(it has: demo)"), "{error}");
        let mut second = inv.images[0].clone();
        second.name = "api".into();
        inv.images.push(second);
        let error = image(&inv, None).unwrap_err().to_string();
        assert!(error.contains("several images (demo, api)"), "{error}");
    }

    #[test]
    fn local_up_flags_are_refused_with_an_inventory() {
        refuse_local_flags(&up(&[])).unwrap();
        refuse_local_flags(&up(&["--state-dir", "/tmp/s"])).unwrap();
        for flags in [
            &["--workers", "5"][..],
            &["--port", "0"],
            &["--detach"],
            &["--redis-port", "7"],
        ] {
            let error = refuse_local_flags(&up(flags)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{flags:?}");
            assert!(error.to_string().starts_with(flags[0]), "{error}");
        }
    }
}
