//! Command-line flags shared by every herd server binary.

use std::path::PathBuf;

use crate::telemetry::LogFormat;

/// `--config FILE` and `--log-format`, flattened into each binary's own arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file. Environment variables with the binary's prefix override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

/// The exit of a server binary's `main`: 0, or 1 after printing `{program}: {error:#}` (with an
/// `anyhow` error, its whole chain of causes on one line) to stderr. Returning the error from
/// `main` instead would print its `Debug` form, and with `RUST_BACKTRACE` set a backtrace after
/// it, which pushes the reason out of the last log lines `herd up` shows.
pub fn exit_code<E: std::fmt::Display>(
    program: &str,
    result: Result<(), E>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
