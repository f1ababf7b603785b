//! The `herd` operator CLI: `herd up`, `herd status`, `herd down`. Parsing and dispatch live in
//! [`herd::cli`]; this only sets up logging and turns the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use herd::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    herd_shared::telemetry::init(cli.log_format);
    match cli::run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // The messages already include their causes; printing the source chain too would
            // repeat them.
            eprintln!("herd: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
