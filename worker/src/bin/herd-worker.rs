//! The herd demo app (or, with `app = "hello"`, the Redis-free hello app) as a worker process:
//! reads its configuration, binds, prints the `listening` line on stdout, and serves until
//! SIGTERM / SIGINT, then drains and exits 0.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use herd_shared::cli::CommonArgs;
use herd_shared::config::{self, Source};
use herd_worker::config::{App, ENV_LIST_KEYS, ENV_PREFIX, WorkerConfig};
use herd_worker::{demo, hello, server};

/// mimalloc rather than glibc's allocator, as the gateway (section 42 of docs/performance.md):
/// axum and tower allocate a few dozen blocks per request (boxed futures and services), and
/// glibc's bins made a third of the demo app's instructions per session request (section 45).
/// Entered through its plain calls where the alignment allows: 4 % fewer instructions per session
/// request than through its aligned ones (section 56).
#[global_allocator]
static ALLOCATOR: herd_shared::allocator::Mimalloc = herd_shared::allocator::Mimalloc;

/// herd worker running the demo app (or the hello app).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    herd_shared::cli::exit_code("herd-worker", serve())
}

/// Parses the flags and the configuration, then serves until SIGTERM / SIGINT.
fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    let config: WorkerConfig = config::exit_on_error(config::load(&Source {
        file: args.common.config.as_deref(),
        env_prefix: ENV_PREFIX,
        env_list_keys: ENV_LIST_KEYS,
    }));
    let _telemetry = herd_shared::telemetry::init_with_tracing(
        args.common.log_format,
        &config.tracing,
        "herd-worker",
    )
    .context("setting up trace export")?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        runtime.worker_threads(config.threads);
    }
    runtime
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(async {
            let shutdown = shutdown_signal().context("installing signal handlers")?;
            let listener =
                herd_shared::net::listen(config.listen, herd_shared::net::LISTEN_BACKLOG)
                    .with_context(|| format!("binding listen = {}", config.listen))?;
            let addr = listener.local_addr()?;
            let identity = config.identity(addr);
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", server::listening_line(addr, &identity))?;
            stdout.flush()?;
            drop(stdout);
            match config.app {
                App::Demo => demo::run(listener, config, shutdown).await?,
                App::Hello => hello::run(listener, config, shutdown).await?,
            }
            Ok(())
        })
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed now, before the
/// listening line is printed, so a signal sent right after it is never lost (or fatal).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        }
    })
}
