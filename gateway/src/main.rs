//! herd-gateway binary: flags, logging, configuration (exit 2 when invalid), then [`run`].

use anyhow::Context;
use clap::Parser;
use herd_gateway::{GatewayConfig, Listeners, run};
use herd_shared::cli::CommonArgs;
use herd_shared::config::exit_on_error;

/// mimalloc rather than glibc's allocator: each new client connection allocates a few blocks of
/// 1 to 6 KB (its task, its serving future, its first read), which glibc serves from its bins
/// rather than its per-thread cache: 4 900 of 27 000 instructions per request with a connection
/// per request; with mimalloc 0.95x the CPU per request there, the same on keep-alive, +1.6 MiB
/// RSS (docs/performance.md, section 42). Entered through its plain calls where the alignment
/// allows, not its aligned ones for every block (section 56).
#[global_allocator]
static ALLOCATOR: herd_shared::allocator::Mimalloc = herd_shared::allocator::Mimalloc;

/// The herd gateway: balances HTTP traffic over healthy workers.
#[derive(Debug, Parser)]
#[command(name = "herd-gateway", version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    herd_shared::cli::exit_code("herd-gateway", serve())
}

/// Parses the flags and the configuration, then serves until SIGTERM / SIGINT.
fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = exit_on_error(GatewayConfig::load(args.common.config.as_deref()));
    // Kept to the end of `main`: dropping it flushes the spans still queued.
    let _telemetry = herd_shared::telemetry::init_with_tracing(
        args.common.log_format,
        &config.tracing,
        "herd-gateway",
    )
    .context("setting up trace export")?;
    // Admin API, failover and registry; clients are served on threads of their own (`serving`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(&config).await?;
        listeners
            .announce()
            .context("cannot write the listening lines to stdout")?;
        run(listeners, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
    }
}
