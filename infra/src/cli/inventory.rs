//! `herd up|down|status --inventory FILE` (and `herd tls push --inventory FILE`): the thin layer between the command line and
//! [`crate::deploy`]. The file is read and checked first: a bad inventory is refused before
//! anything starts, with exit 2 and one line naming the entry and the problem.

use std::path::{Path, PathBuf};

use super::{
    CliError, EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, StateDirArgs, StatusArgs, TlsPushArgs,
    UpArgs, token,
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

/// `herd status --inventory FILE [--json]`: exit 0 all healthy, 1 something down, 3 nothing
/// runs.
pub(crate) fn status(args: &StatusArgs) -> Result<u8, CliError> {
    let (inventory, state_root) = load(&args.state)?;
    let options = Options {
        state_root,
        token: String::new(),
    };
    let status = deploy::status::collect(&inventory, &options);
    if args.json {
        super::say(serde_json::to_string_pretty(&status).expect("a Status always serializes"));
    } else {
        super::say(status.table());
    }
    Ok(if status.nothing_runs() {
        EXIT_NOT_RUNNING
    } else if status.healthy() {
        EXIT_OK
    } else {
        EXIT_FAILED
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
