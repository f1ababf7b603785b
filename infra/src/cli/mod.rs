//! The `herd` command line: parse the command ([`Cli`]), run it ([`run`]), map the outcome to
//! an exit code.
//!
//! Layout:
//! - `args`: commands and flags (clap derive) and the checks clap can't do;
//! - `up`, `status`, `down`, `lab`, `bench`, `drill`: one module per command;
//! - `inventory`: `up`, `down` and `status` with `--inventory FILE` (several machines);
//! - `cluster`: the processes `herd up` holds (start in order, wait ready, stop in order);
//! - `signals`: Ctrl-C / SIGTERM for the foreground `herd up`;
//! - `token`: the gateway's admin token;
//! - `error`: [`CliError`] and the exit codes.
//!
//! What `herd up` started is recorded in the state directory ([`crate::state`]); `status` and
//! `down` work from that file alone.

mod args;
mod bench;
mod cluster;
mod down;
mod drill;
mod error;
mod inventory;
mod lab;
mod signals;
mod status;
mod token;
mod up;

pub use args::{
    BenchCommand, BenchHealthArgs, BenchOutputArgs, BenchProxyArgs, BenchSoakArgs, Cli, Command,
    DrillArgs, FailoverCompareArgs, LabCommand, MAX_WORKERS, StateDirArgs, StatusArgs, UpArgs,
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
        Command::Status(args) => status::run(&args.state),
        Command::Down(args) if args.inventory.is_some() => inventory::down(args),
        Command::Down(args) => down::run(args),
        Command::Lab(LabCommand::FailoverCompare(args)) => lab::failover_compare(args),
        Command::Bench(BenchCommand::Proxy(args)) => bench::proxy(args),
        Command::Bench(BenchCommand::Health(args)) => bench::health(args),
        Command::Bench(BenchCommand::Soak(args)) => bench::soak(args),
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

/// When the cluster came up, for messages (RFC 3339, UTC).
fn timestamp(state: &State) -> String {
    humantime::format_rfc3339_seconds(state.started()).to_string()
}
