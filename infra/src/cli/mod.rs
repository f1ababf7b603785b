//! The `herd` command line: parse the command ([`Cli`]), run it ([`run`]), map the outcome to
//! an exit code.
//!
//! Layout:
//! - `args`: commands and flags (clap derive) and the checks clap can't do;
//! - `up`, `status`, `down`, `scale`, `rollout`, `lab`, `bench`, `drill`: one module per command;
//! - `inventory`: `up`, `down`, `status`, `scale` and `rollout` with `--inventory FILE`
//!   (several machines), and `tls push --inventory FILE`;
//! - `cluster`: the processes `herd up` holds (start in order, wait ready, stop in order);
//! - `supervisor`: restarts dead workers and gateways with backoff, reports crash loops;
//! - `workers`: where workers run ([`workers::Placement`]) and the gateway's view of them,
//!   shared by `scale` and `rollout`;
//! - `signals`: Ctrl-C / SIGTERM for the foreground `herd up`;
//! - `token`: the gateway's admin token;
//! - `error`: [`CliError`] and the exit codes.
//!
//! What `herd up` started is recorded in the state directory ([`crate::state`]); `status` and
//! `down` work from that file alone.

mod args;
mod bench;
pub(crate) mod cluster;
mod down;
mod drill;
mod error;
mod inventory;
mod lab;
pub(crate) mod rollout;
mod scale;
mod signals;
mod status;
mod supervisor;
mod token;
mod up;
pub(crate) mod workers;

pub use args::{
    BenchCommand, BenchHealthArgs, BenchOutputArgs, BenchProxyArgs, BenchSoakArgs,
    BenchUpstreamArgs, Cli, Command, DrillArgs, FailoverCompareArgs, LabCommand, MAX_SCALE,
    MAX_WORKERS, RolloutArgs, ScaleArgs, StateDirArgs, StatusArgs, TlsCommand, TlsPushArgs, UpArgs,
};
pub use error::{CliError, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE};

use crate::state::State;

/// Runs the parsed command; returns the exit code (errors carry theirs, see
/// [`CliError::exit_code`]).
pub fn run(cli: &Cli) -> Result<u8, CliError> {
    match &cli.command {
        Command::Up(args) if args.state.inventory.is_some() => inventory::up(args),
        Command::Up(args) => up::run(args),
        Command::Status(args) if args.state.inventory.is_some() => inventory::status(args),
        Command::Status(args) => status::run(args),
        Command::Down(args) if args.inventory.is_some() => inventory::down(args),
        Command::Down(args) => down::run(args),
        Command::Scale(args) if args.state.inventory.is_some() => inventory::scale(args),
        Command::Scale(args) => scale::run(args),
        Command::Rollout(args) if args.state.inventory.is_some() => inventory::rollout(args),
        Command::Rollout(args) => rollout::run(args),
        Command::Supervise(args) => up::supervise_detached(args),
        Command::Lab(LabCommand::FailoverCompare(args)) => lab::failover_compare(args),
        Command::Tls(TlsCommand::Push(args)) => inventory::tls_push(args),
        Command::Bench(BenchCommand::Proxy(args)) => bench::proxy(args),
        Command::Bench(BenchCommand::Health(args)) => bench::health(args),
        Command::Bench(BenchCommand::Soak(args)) => bench::soak(args),
        Command::Bench(BenchCommand::Upstream(args)) => bench::upstream(args),
        Command::Drill(args) => drill::run(args),
    }
}

/// A single-threaded tokio runtime: the CLI's async work is a few HTTP checks and waiting for
/// signals; blocking waits run on its blocking pool.
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Os {
            what: "start the async runtime",
            source,
        })
}

/// Prints a line on stdout, ignoring errors: after a SIGHUP the terminal may be gone, and
/// `println!` would panic halfway through stopping the cluster.
fn say(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Like [`say`], on stderr.
fn warn(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Says so when a rollout changes neither the executable nor the environment (called once the
/// rollout's arguments and cluster are checked, right before it starts).
fn say_if_restart(args: &RolloutArgs) {
    if args.binary.is_none() && args.env.is_empty() {
        say("herd rollout: neither --binary nor --env: a rolling restart (the current command)");
    }
}

/// When the cluster came up, for messages (RFC 3339, UTC).
fn timestamp(state: &State) -> String {
    humantime::format_rfc3339_seconds(state.started()).to_string()
}
