//! Logging set-up shared by every herd binary.
//!
//! Logs go to stderr: human-readable on a terminal, one JSON object a line otherwise (what log
//! shippers want), or as chosen with `--log-format`. The filter comes from `HERD_LOG` (or
//! `RUST_LOG`), in `tracing_subscriber::EnvFilter` syntax, default `info`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = std::env::var("HERD_LOG")
        .ok()
        .and_then(|value| EnvFilter::try_new(value).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Auto => !std::io::stderr().is_terminal(),
        LogFormat::Pretty => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (e.g. in tests) keeps the first subscriber; that is fine.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
