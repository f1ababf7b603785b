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
