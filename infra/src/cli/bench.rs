//! `herd bench proxy`, `herd bench health` and `herd bench soak`: run the benchmark (see [`crate::bench`]) on a
//! blocking thread while Ctrl-C / SIGTERM / SIGHUP are caught, print the Markdown table, write
//! `--out` and the JSON.
//!
//! A signal raises the benchmark's [`Stop`]: the run in progress is killed, every process the
//! benchmark started is stopped with its process group, the temporary directory is removed, and
//! herd exits 130.

use std::path::Path;

use serde::Serialize;
use serde_json::json;

use super::signals::StopSignal;
use super::{
    BenchHealthArgs, BenchOutputArgs, BenchProxyArgs, BenchSoakArgs, BenchUpstreamArgs, CliError,
    EXIT_FAILED, EXIT_OK, say, warn,
};
use crate::bench::health::{self, HealthOptions};
use crate::bench::proxy::{self, ProxyOptions};
use crate::bench::{BenchError, Stop, WorkDir, report};
use crate::bench::{soak, upstream};

/// Runs `herd bench proxy`.
pub(super) fn proxy(args: &BenchProxyArgs) -> Result<u8, CliError> {
    args.validate()?;
    let options = ProxyOptions {
        scenarios: args.scenarios.clone(),
        targets: args.targets.clone(),
        concurrency: args.concurrency.clone(),
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        threads: args.threads,
        h2_streams: args.h2_streams,
        upstream: args.upstream,
        proxy_cpus: args.proxy_cpus,
        rate: args.rate,
    };
    let dir = WorkDir::new(args.output.log_dir.as_deref())?;
    let path = dir.path().to_path_buf();
    let runs = options.rounds as usize
        * options.concurrency.len()
        * options.targets.len()
        * options.scenarios.len();
    warn(format!(
        "herd bench proxy: {runs} runs of {:?}; work directory {}",
        options.duration,
        path.display()
    ));
    let machine = machine();
    let results = with_stop(move |stop| proxy::run(&options, &path, stop, &mut |line| warn(line)))?;
    let table = report::proxy_markdown(&results);
    say(&table);
    write_outputs(
        &args.output,
        &table,
        &json!({
            "command": "bench proxy",
            "machine": machine,
            "results": results,
        }),
    )?;
    let failed = results.failed_runs();
    if failed > 0 {
        warn(format!(
            "herd bench proxy: {failed} run(s) produced no figures; see the messages above"
        ));
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}

/// Runs `herd bench upstream` until the process is killed.
pub(super) fn upstream(args: &BenchUpstreamArgs) -> Result<u8, CliError> {
    upstream::run(args.listen).map_err(|error| BenchError::Setup(error.to_string()))?;
    Ok(EXIT_OK)
}

/// Runs `herd bench health`.
pub(super) fn health(args: &BenchHealthArgs) -> Result<u8, CliError> {
    args.validate()?;
    let options = HealthOptions {
        workers: args.workers,
        duration: args.duration,
    };
    let dir = WorkDir::new(args.output.log_dir.as_deref())?;
    let path = dir.path().to_path_buf();
    warn(format!(
        "herd bench health: {} workers, {:?}; work directory {}",
        options.workers,
        options.duration,
        path.display()
    ));
    let machine = machine();
    let result = with_stop({
        let options = options.clone();
        move |stop| health::run(&options, &path, stop, &mut |line| warn(line))
    })?;
    let table = report::health_markdown(&result);
    say(&table);
    write_outputs(
        &args.output,
        &table,
        &json!({
            "command": "bench health",
            "machine": machine,
            "options": options,
            "result": result,
        }),
    )?;
    Ok(EXIT_OK)
}

/// Runs `herd bench soak`: exit 0 on PASS, 1 on FAIL.
pub(super) fn soak(args: &BenchSoakArgs) -> Result<u8, CliError> {
    args.validate()?;
    let options = args.options();
    soak::validate(&options)?;
    let dir = WorkDir::new(args.output.log_dir.as_deref())?;
    let path = dir.path().to_path_buf();
    warn(format!(
        "herd bench soak: {} connections for {}; work directory {}",
        options.connections,
        humantime::format_duration(options.duration),
        path.display()
    ));
    let machine = machine();
    let result = with_stop({
        let options = options.clone();
        move |stop| soak::run(&options, &path, stop, &mut |line| warn(line))
    })?;
    let table = soak::markdown(&result);
    say(&table);
    write_outputs(
        &args.output,
        &table,
        &json!({
            "command": "bench soak",
            "machine": machine,
            "result": result,
        }),
    )?;
    Ok(if result.verdict.pass {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// Runs `work` on a blocking thread; a stop signal raises its [`Stop`] and waits for it to wind
/// down (it kills what it started on the way out).
fn with_stop<T, F>(work: F) -> Result<T, CliError>
where
    T: Send + 'static,
    F: FnOnce(&Stop) -> Result<T, BenchError> + Send + 'static,
{
    // What the bench starts dies with its thread, also when herd is killed with SIGKILL.
    if let Err(missing) = crate::process::end_with_their_starter() {
        warn(format!("herd bench: {missing}"));
    }
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let mut signals = StopSignal::install()?;
        let stop = Stop::default();
        let task = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || work(&stop)
        });
        tokio::pin!(task);
        let joined = tokio::select! {
            joined = &mut task => joined,
            name = signals.wait() => {
                warn(format!("herd bench: {name}; stopping every process it started"));
                stop.raise();
                task.await
            }
        };
        match joined {
            Ok(result) => result.map_err(CliError::from),
            Err(error) => Err(CliError::Bench(BenchError::Setup(format!(
                "the benchmark thread failed: {error}"
            )))),
        }
    })
}

/// The machine the figures come from: a shared or busy box shows in the load average.
#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    loadavg_at_start: String,
    kernel: String,
}

fn machine() -> Machine {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|text| text.trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        loadavg_at_start: read("/proc/loadavg"),
        kernel: read("/proc/sys/kernel/osrelease"),
    }
}

fn write_outputs(
    output: &BenchOutputArgs,
    table: &str,
    json: &serde_json::Value,
) -> Result<(), CliError> {
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text)
            .map_err(|source| CliError::from(BenchError::io("write", path, source)))
    };
    if let Some(out) = &output.out {
        write(out, table)?;
        warn(format!("table written to {}", out.display()));
    }
    if let Some(path) = output.json_path() {
        let text = serde_json::to_string_pretty(json).unwrap_or_default();
        write(&path, &text)?;
        warn(format!("raw results written to {}", path.display()));
    }
    Ok(())
}
