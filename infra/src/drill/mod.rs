//! `herd drill`: failover drills under load, with a verdict a person reads in ten seconds.
//!
//! A drill logs users in, runs a bounded load through the public address ([`traffic`]), injects
//! one fault at a known moment (30 % into the load) and undoes it (at 60 %, or after the load
//! for the scaling drills), checks every session, and judges the figures against the targets
//! of docs/drills.md ([`report`]).
//!
//! Layout:
//! - [`target`]: the [`ClusterHandle`] trait — all a drill needs from a cluster;
//! - [`local`]: it for the local cluster of `herd up` (its state file);
//! - [`lab`]: it for the netns lab (client, gw1, gw2, redis, m1, m2);
//! - [`inventory`]: it for a cluster `herd up --inventory FILE` runs (netns, ssh or local
//!   machines);
//! - [`traffic`]: users, load, session check;
//! - [`report`]: figures, verdict, renderings.
//!
//! A drill leaves the cluster as it found it: every fault is recorded in a [`Guard`] as it is
//! injected and undone when the guard is dropped — at the planned moment, when the drill fails
//! halfway, or when Ctrl-C / SIGTERM ends it early ([`install_interrupt_handler`]).

pub mod inventory;
pub mod lab;
pub mod local;
pub mod report;
pub mod target;
pub mod traffic;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

pub use report::{Outcome, Report};
pub use target::{ClusterHandle, GatewayInfo, Stopped, TargetError, WorkerInfo};

use traffic::{Counters, LoadPlan};

/// Where in the load the fault is injected (fraction of the duration).
const FAULT_AT: f64 = 0.3;
/// Where in the load a fault that is undone mid-load is undone.
const UNDO_AT: f64 = 0.6;
/// How long a drained worker gets to exit after SIGTERM before it is killed (and the drill
/// fails): the worker's own drain takes ~2.5 s when nothing arrives.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Slow requests sent just before a worker is killed, so that it dies with requests in flight
/// (spread over the workers, a few land on the victim); quick ones as a worker hangs.
const SLOW_BURST: u32 = 12;
/// How long before the kill they are sent: well past the gateway's stale-connection window
/// (100 ms), so that the kill is, to the gateway, a worker that died with requests in flight —
/// retried only when retries are on.
const SLOW_LEAD: Duration = Duration::from_millis(400);
/// How long each of them takes (`traffic::Op::GetSlow`): well beyond `SLOW_LEAD` plus the look
/// at the cluster before the kill, which takes several ssh round trips on an inventory (600 ms
/// on a busy CI box, where 1000 ms requests had ended before the kill and the drill passed with
/// retries off).
const SLOW_REQUEST: Duration = Duration::from_millis(2000);
/// Requests sent through the public address per health poll while waiting for the cluster to
/// be healthy.
const NUDGE_REQUESTS: usize = 8;
/// What a request waiting around a hung worker may take beyond the hedge delay and the normal
/// p99 (a shared box's scheduling; a gateway that does not hedge makes it wait the whole hang).
const HANG_ALLOWANCE: Duration = Duration::from_millis(150);
/// Failed requests a report describes one by one.
const FAILURES_LISTED: usize = 5;
/// How long the cluster gets to be healthy again (before and after a drill).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Set by Ctrl-C / SIGTERM: the drill stops its load and undoes its fault.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// One drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// kill -9 one worker, then start it again.
    WorkerKill,
    /// SIGSTOP one worker, then SIGCONT.
    WorkerHang,
    /// A worker machine's link goes down, then comes back.
    MachineLoss,
    /// kill -9 the active gateway, then start it again (it returns as standby).
    GatewayKill,
    /// The active gateway's link goes down, then comes back.
    GatewayMachineLoss,
    /// SIGTERM the active gateway (graceful stop), then start it again.
    GatewayStop,
    /// Stop Redis and start it again.
    RedisRestart,
    /// Add a worker under load (removed again afterwards).
    ScaleUp,
    /// Drain and stop a worker under load (started again afterwards).
    ScaleDown,
    /// Every drill in turn, one summary.
    All,
}

impl Kind {
    /// Every drill `all` runs, in order.
    pub const EVERY: [Kind; 9] = [
        Kind::WorkerKill,
        Kind::WorkerHang,
        Kind::MachineLoss,
        Kind::GatewayKill,
        Kind::GatewayMachineLoss,
        Kind::GatewayStop,
        Kind::RedisRestart,
        Kind::ScaleUp,
        Kind::ScaleDown,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::WorkerKill => "worker-kill",
            Kind::WorkerHang => "worker-hang",
            Kind::MachineLoss => "machine-loss",
            Kind::GatewayKill => "gateway-kill",
            Kind::GatewayMachineLoss => "gateway-machine-loss",
            Kind::GatewayStop => "gateway-stop",
            Kind::RedisRestart => "redis-restart",
            Kind::ScaleUp => "scale-up",
            Kind::ScaleDown => "scale-down",
            Kind::All => "all",
        }
    }

    /// What the drill sets out to show.
    pub fn hypothesis(self) -> String {
        let zero = "users see no failed idempotent request and no session is lost";
        match self {
            Kind::WorkerKill => format!("when a worker is killed, {zero}"),
            Kind::WorkerHang => format!("when a worker hangs, {zero}, and nobody waits past the request timeout"),
            Kind::MachineLoss => format!("when a worker machine drops off the network, {zero}"),
            Kind::GatewayKill => "when the active gateway is killed, the standby serves within 0.5 s and no session is lost".into(),
            Kind::GatewayMachineLoss => "when the active gateway's machine drops off the network, the standby serves within 1 s and no session is lost".into(),
            Kind::GatewayStop => format!("when the active gateway is stopped gracefully, {zero}"),
            Kind::RedisRestart => format!("when Redis restarts, {zero}"),
            Kind::ScaleUp => format!("when a worker is added under load, it takes traffic and {zero}"),
            Kind::ScaleDown => format!("when a worker is drained and stopped under load, {zero}"),
            Kind::All => "every drill passes".into(),
        }
    }

    fn is_gateway_drill(self) -> bool {
        matches!(
            self,
            Kind::GatewayKill | Kind::GatewayMachineLoss | Kind::GatewayStop
        )
    }
}

/// How much load, for how long.
#[derive(Debug, Clone)]
pub struct Options {
    /// Load length per drill.
    pub duration: Duration,
    /// Requests per second.
    pub rate: u32,
    /// Users logged in (sessions checked).
    pub users: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(10),
            rate: 100,
            users: 20,
        }
    }
}

/// Why a drill could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// Ctrl-C or SIGTERM; the fault has been undone.
    #[error("interrupted; the fault was undone")]
    Interrupted,
    /// The cluster could not be used (users could not log in…).
    #[error("{0}")]
    Setup(String),
}

/// Makes Ctrl-C and SIGTERM stop the drill (which then undoes its fault) instead of killing
/// herd with the fault still in place. Idempotent.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                let _ = ready_tx.send(());
                return;
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    let _ = ready_tx.send(());
                    return;
                };
                let _ = ready_tx.send(());
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                INTERRUPTED.store(true, Ordering::SeqCst);
            });
        });
        // The handlers are in place before the first fault.
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    });
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A fault to undo.
#[derive(Debug, Clone)]
enum Undo {
    Cont(String),
    RestartWorker(String),
    LinkUp(String),
    RestartGateway(String),
    RemoveAdded(String),
    RedisUp,
}

/// The faults in place; undone (newest first) when dropped, also on failure, panic or Ctrl-C.
pub struct Guard<'a> {
    cluster: &'a mut dyn ClusterHandle,
    pending: Vec<Undo>,
}

impl Guard<'_> {
    /// Undoes every fault in place; returns a line per undo that failed.
    fn undo_all(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        while let Some(undo) = self.pending.pop() {
            let result = match &undo {
                Undo::Cont(id) => self.cluster.signal_worker(id, Signal::SIGCONT),
                Undo::RestartWorker(id) => self.cluster.restart_worker(id),
                Undo::LinkUp(machine) => self.cluster.set_link(machine, true),
                Undo::RestartGateway(name) => self.cluster.restart_gateway(name),
                Undo::RemoveAdded(id) => self
                    .cluster
                    .remove_added_worker(id, DRAIN_GRACE)
                    .map(|_| ()),
                Undo::RedisUp => self.cluster.ensure_redis(),
            };
            if let Err(error) = result {
                failed.push(format!("could not undo {undo:?}: {error}"));
            }
        }
        failed
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        for line in self.undo_all() {
            eprintln!("herd drill: {line}");
        }
    }
}

/// The live progress line on stderr (hidden when stderr is not a terminal).
fn progress_bar(kind: Kind) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_prefix(kind.name());
    bar
}

/// Runs drill `kind` (not `All`) on `cluster`.
pub fn run(
    cluster: &mut dyn ClusterHandle,
    kind: Kind,
    options: &Options,
) -> Result<Report, DrillError> {
    if let Some(why) = not_applicable(cluster, kind) {
        return Ok(Report::not_applicable(kind, cluster.describe(), why));
    }
    let bar = progress_bar(kind);
    bar.set_message("waiting until every worker is healthy");
    if let Err(last) = wait_healthy(cluster, SETTLE_TIMEOUT) {
        return Err(DrillError::Setup(format!(
            "the cluster is not healthy (the active gateway does not see every worker healthy after {} s; {last}); fix that before drilling",
            SETTLE_TIMEOUT.as_secs()
        )));
    }
    let target = cluster.public_addr();
    let netns = cluster.client_netns();
    bar.set_message(format!("logging {} users in", options.users));
    let tag = format!("{}-{}", kind.name(), crate::state::now_unix());
    let users = traffic::run_in(netns.clone(), {
        let users = options.users;
        move || traffic::log_in(target, users, tag)
    })
    .and_then(|r| r)
    .map_err(DrillError::Setup)?;
    let users = Arc::new(users);
    let before = cluster.gateways();
    let request_timeout = cluster.request_timeout();
    let workers = cluster.workers();

    let plan = LoadPlan {
        target,
        rate: options.rate,
        duration: options.duration,
        // A little over the gateway's own timeout, so a request it gives up on is seen as its
        // answer (a 504) rather than as our timeout.
        timeout: request_timeout + Duration::from_secs(1),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let origin = Instant::now();
    let origin_wall = std::time::SystemTime::now();
    let load = traffic::spawn_in(netns.clone(), {
        let (users, stop, counters) =
            (Arc::clone(&users), Arc::clone(&stop), Arc::clone(&counters));
        move || traffic::run_load(plan, users, origin, stop, counters)
    });

    let mut guard = Guard {
        cluster,
        pending: Vec::new(),
    };
    let mut extra_failures = Vec::new();
    let mut notes = Vec::new();
    let fault_at = options.duration.mul_f64(FAULT_AT);
    let undo_at = options.duration.mul_f64(UNDO_AT);
    let status = |phase: &str| {
        format!(
            "{:>5.1}/{:.0} s  sent {}  failed {}  {phase}",
            origin.elapsed().as_secs_f64(),
            options.duration.as_secs_f64(),
            counters.done.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed),
        )
    };
    let wait = |until: Duration, phase: &str| -> Result<(), DrillError> {
        while origin.elapsed() < until {
            if interrupted() {
                stop.store(true, Ordering::SeqCst);
                return Err(DrillError::Interrupted);
            }
            bar.set_message(status(phase));
            bar.tick();
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };

    wait(
        fault_at.saturating_sub(SLOW_LEAD),
        "load running, fault next",
    )?;
    let slow_sent = origin.elapsed();
    if kind == Kind::WorkerKill {
        counters.burst(SLOW_BURST, traffic::Op::GetSlow);
    }
    wait(fault_at, "load running, fault next")?;
    let mut fault_time = origin.elapsed();
    let (fault, faulted_gateway, undo_mid, added) =
        match inject(&mut guard, kind, &workers, &before) {
            Ok(injected) => injected,
            Err(error) => {
                stop.store(true, Ordering::SeqCst);
                let _ = load.join();
                // Only trying tells (an ssh machine's link can't be cut from here).
                if let TargetError::NotApplicable(why) = error {
                    drop(guard);
                    return Ok(Report::not_applicable(kind, cluster.describe(), why));
                }
                return Err(DrillError::Setup(format!(
                    "could not inject the fault: {error}"
                )));
            }
        };
    if let Some(struck) = added.struck {
        fault_time = struck.duration_since(origin);
    }
    if kind == Kind::WorkerHang {
        // Requests arriving together as the worker hangs, as under real load: some go to it
        // and must be hedged around (one by one, the balancer soon avoids the stuck worker, and
        // whether any GET waited on it would be luck).
        counters.burst(SLOW_BURST, traffic::Op::GetWork);
    }
    let kill_lag = fault_time.saturating_sub(slow_sent);
    if kind == Kind::WorkerKill && kill_lag >= SLOW_REQUEST {
        // Whatever the gateways said was in flight had ended by the kill.
        extra_failures.push(format!(
            "the kill came {} ms after the {SLOW_BURST} slow requests, which take {} ms: none \
             was in flight any more, nothing was tested",
            kill_lag.as_millis(),
            SLOW_REQUEST.as_millis()
        ));
    } else if added.killed_in_flight == Some(0.0) {
        // Nothing died in flight: the drill did not test what it claims.
        extra_failures.push(format!(
            "the killed worker had no request in flight (the {SLOW_BURST} slow requests sent \
             {} ms before went elsewhere or were over): nothing was tested",
            SLOW_LEAD.as_millis()
        ));
    }
    if let Some(Stopped::Killed) = added.drained {
        extra_failures.push(format!(
            "the drained worker did not exit within {} s of SIGTERM and was killed",
            DRAIN_GRACE.as_secs()
        ));
    }
    let mut undone_at = None;
    if undo_mid {
        wait(undo_at, "fault injected")?;
        for line in guard.undo_all() {
            extra_failures.push(line);
        }
        undone_at = Some(origin.elapsed());
    } else if kind == Kind::RedisRestart {
        undone_at = Some(origin.elapsed());
    }
    wait(
        options.duration,
        if undo_mid {
            "fault undone"
        } else {
            "fault in place"
        },
    )?;
    bar.set_message(status("waiting for the last requests"));
    let samples = match load.join() {
        Ok(Ok(samples)) => samples,
        Ok(Err(error)) => return Err(DrillError::Setup(error)),
        Err(panic) => std::panic::resume_unwind(panic),
    };
    // Scaling drills undo after the load: the added worker leaves, the drained one returns.
    for line in guard.undo_all() {
        extra_failures.push(line);
    }
    drop(guard);
    bar.set_message("waiting until every worker is healthy again");
    if let Err(last) = wait_healthy(cluster, SETTLE_TIMEOUT) {
        extra_failures.push(format!(
            "the cluster was not healthy again {} s after the fault was undone ({last})",
            SETTLE_TIMEOUT.as_secs()
        ));
    }
    bar.set_message("checking every session");
    let sessions = traffic::run_in(netns, {
        let users = Arc::clone(&users);
        move || traffic::check_sessions(target, users)
    })
    .map_err(DrillError::Setup)?;
    let after = cluster.gateways();
    bar.finish_and_clear();

    let figures = report::figures(&samples, fault_time, faulted_gateway.as_deref());
    // A fault no request met tested nothing: a fault in place until the load ends meets every
    // later request, one undone mid-load only those in flight before it was undone.
    let fault_end = undone_at.unwrap_or(options.duration);
    let met = report::met_the_fault(&samples, fault_time, fault_end);
    if met == 0 {
        extra_failures.push(format!(
            "no request was in flight during the fault ({:.0} ms at {} req/s): nothing was \
             tested; raise --rate or --duration",
            report::ms(fault_end.saturating_sub(fault_time)),
            options.rate
        ));
    } else {
        notes.push(format!("{met} requests met the fault"));
    }
    if let (Kind::WorkerHang, Some(undone)) = (kind, undone_at) {
        // The target (DESIGN.md): no idempotent request waits longer than the hedge delay plus
        // the normal latency. The gateways' delay from before the load (0: hedging off).
        let hedge = before
            .iter()
            .filter_map(|g| report::hedge_delay(g.metrics.as_deref()?))
            .max()
            .unwrap_or_default();
        let wait = report::hang_wait(&samples, fault_time, undone);
        let bound = hedge + wait.normal_p99 + HANG_ALLOWANCE;
        let line = format!(
            "the longest idempotent request sent while the worker was hung took {} ms (bound {} ms: \
             hedge delay {} ms + normal p99 {} ms + {} ms)",
            wait.longest.as_millis(),
            bound.as_millis(),
            hedge.as_millis(),
            wait.normal_p99.as_millis(),
            HANG_ALLOWANCE.as_millis()
        );
        if wait.longest > bound {
            extra_failures.push(line);
        } else {
            notes.push(line);
        }
    }
    if let Some(id) = &added.id {
        let answered = figures.by_worker.get(id).copied().unwrap_or(0);
        if answered == 0 {
            extra_failures.push(format!("the added worker {id} answered no request"));
        } else {
            notes.push(format!(
                "the added worker {id} answered {answered} requests"
            ));
        }
    }
    let (verdict, reason) =
        report::judge(kind, &figures, &sessions, request_timeout, &extra_failures);
    let mut report = Report::not_applicable(kind, String::new(), String::new());
    report.cluster = cluster.describe();
    report.fault = fault;
    report.fault_at_s = fault_time.as_secs_f64();
    report.undone_at_s = undone_at.map(|d| d.as_secs_f64());
    report.duration_s = options.duration.as_secs_f64();
    report.rate = options.rate;
    report.set_figures(&figures);
    report.request_timeout_ms = request_timeout.as_secs_f64() * 1000.0;
    if let Some(faulted) = &faulted_gateway {
        report.took_over_ms = report::took_over_ms(&after, faulted, origin_wall + fault_time);
    }
    report.sessions = sessions;
    report.gateways = report::gateways_saw(&before, &after);
    report.failed_requests = report::failed_requests(&samples, fault_time, FAILURES_LISTED);
    report.notes = notes;
    report.verdict = verdict;
    report.reason = reason;
    Ok(report)
}

/// Why `kind` can't run on `cluster`, if it can't.
fn not_applicable(cluster: &mut dyn ClusterHandle, kind: Kind) -> Option<String> {
    if kind.is_gateway_drill() {
        let gateways = cluster.gateways();
        if gateways.len() < 2 {
            return Some("no standby gateway (this cluster runs one gateway)".into());
        }
        // Two processes on one machine cannot both listen on the public address and port: the
        // standby there keeps the role warm but cannot take over the clients.
        if gateways.iter().all(|g| g.machine == gateways[0].machine) {
            return Some(format!(
                "both gateways run on one machine ({}): the standby cannot take over the public \
                 address there; drill the gateways on the netns lab (--lab) or several machines",
                gateways[0].machine
            ));
        }
    }
    if kind == Kind::MachineLoss {
        let mut machines: Vec<String> = cluster.workers().into_iter().map(|w| w.machine).collect();
        machines.sort();
        machines.dedup();
        if machines.len() < 2 {
            return Some(format!(
                "every worker runs on one machine ({}); losing it loses them all",
                machines.join(", ")
            ));
        }
    }
    if kind == Kind::ScaleDown && cluster.workers().len() < 2 {
        return Some("one worker only; scaling it down leaves none".into());
    }
    None
}

/// What [`inject`] did besides the fault line.
#[derive(Debug, Default)]
struct Side {
    /// The worker a scale-up added.
    id: Option<String>,
    /// How the worker a scale-down drained stopped.
    drained: Option<Stopped>,
    /// Requests in flight on the worker worker-kill killed, as the gateways said just before
    /// (`None`: no gateway said).
    killed_in_flight: Option<f64>,
    /// When the fault struck, where that came after a look at the cluster (worker-kill reads the
    /// active gateway's metrics first, several round trips over ssh).
    struck: Option<Instant>,
}

/// The worker with the most requests in flight now, and how many: summed over every gateway
/// whose metrics answer (`None`: none names a worker). Not only the active one's: a gateway that
/// says it is active is not always the one users reach (on one machine the standby cannot take
/// the public port, and a pair that has just swapped roles says so before traffic follows).
/// Ties go to the first in `workers`' order.
fn busiest(cluster: &mut dyn ClusterHandle, workers: &[WorkerInfo]) -> Option<(WorkerInfo, f64)> {
    let gateways = cluster.gateways();
    let mut best: Option<(f64, &WorkerInfo)> = None;
    for worker in workers {
        let counts = gateways
            .iter()
            .filter_map(|g| report::in_flight(g.metrics.as_deref()?, &worker.id));
        let Some(count) = counts.reduce(|a, b| a + b) else {
            continue;
        };
        if best.is_none_or(|(most, _)| count > most) {
            best = Some((count, worker));
        }
    }
    best.map(|(count, worker)| (worker.clone(), count))
}

/// Injects `kind`'s fault; returns its description, the faulted gateway (gateway drills),
/// whether it is undone mid-load, and what was added or drained.
fn inject(
    guard: &mut Guard<'_>,
    kind: Kind,
    workers: &[WorkerInfo],
    gateways: &[GatewayInfo],
) -> Result<(String, Option<String>, bool, Side), TargetError> {
    let worker = workers
        .first()
        .cloned()
        .ok_or_else(|| TargetError::failed("the cluster has no worker"))?;
    // The gateway drills fault the gateway active now, not the one active before the load: a
    // pair may have swapped roles since (with `preempt`, a gateway back from the drill before
    // takes its role back during the next one), and cutting the standby would pass on nothing.
    // When no gateway says so at this moment (a split second of two address holders), the one
    // active before the load.
    let before = || gateways.iter().find(|g| g.active).cloned();
    let active = if kind.is_gateway_drill() {
        guard
            .cluster
            .gateways()
            .into_iter()
            .find(|g| g.active)
            .or_else(before)
    } else {
        before()
    };
    let active_name = || {
        active
            .clone()
            .ok_or_else(|| TargetError::failed("no gateway says it is active"))
    };
    let cluster = &mut *guard.cluster;
    let mut side = Side::default();
    let (fault, gateway, mid) = match kind {
        Kind::WorkerKill => {
            // The worker with the most requests in flight (the slow burst): a crash under load.
            // No gateway naming one (its metrics unreachable): the first, and the report says so.
            let (worker, chosen) = match busiest(cluster, workers) {
                Some((busiest, count)) => {
                    side.killed_in_flight = Some(count);
                    (busiest, format!(", {count} requests in flight"))
                }
                None => (
                    worker,
                    ", the first: no gateway named its busiest worker".to_string(),
                ),
            };
            side.struck = Some(Instant::now());
            cluster.signal_worker(&worker.id, Signal::SIGKILL)?;
            guard.pending.push(Undo::RestartWorker(worker.id.clone()));
            (
                format!(
                    "SIGKILL worker {} (pid {}{chosen}), then start it again",
                    worker.id, worker.pid
                ),
                None,
                true,
            )
        }
        Kind::WorkerHang => {
            guard.pending.push(Undo::Cont(worker.id.clone()));
            cluster.signal_worker(&worker.id, Signal::SIGSTOP)?;
            (
                format!(
                    "SIGSTOP worker {} (pid {}), then SIGCONT",
                    worker.id, worker.pid
                ),
                None,
                true,
            )
        }
        Kind::MachineLoss => {
            guard.pending.push(Undo::LinkUp(worker.machine.clone()));
            cluster.set_link(&worker.machine, false)?;
            (
                format!(
                    "link of machine {} down (workers on it: {}), then up",
                    worker.machine,
                    workers
                        .iter()
                        .filter(|w| w.machine == worker.machine)
                        .map(|w| w.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None,
                true,
            )
        }
        Kind::GatewayKill => {
            let gw = active_name()?;
            side.struck = Some(Instant::now());
            cluster.signal_gateway(&gw.name, Signal::SIGKILL)?;
            guard.pending.push(Undo::RestartGateway(gw.name.clone()));
            (
                format!("SIGKILL active gateway {}, then start it again", gw.name),
                Some(gw.name),
                true,
            )
        }
        Kind::GatewayMachineLoss => {
            let gw = active_name()?;
            side.struck = Some(Instant::now());
            guard.pending.push(Undo::LinkUp(gw.machine.clone()));
            cluster.set_link(&gw.machine, false)?;
            (
                format!(
                    "link of active gateway {}'s machine {} down, then up",
                    gw.name, gw.machine
                ),
                Some(gw.name),
                true,
            )
        }
        Kind::GatewayStop => {
            let gw = active_name()?;
            side.struck = Some(Instant::now());
            cluster.signal_gateway(&gw.name, Signal::SIGTERM)?;
            guard.pending.push(Undo::RestartGateway(gw.name.clone()));
            // Started again only after the load: its graceful stop (hand-over, linger, drain
            // of its connections) takes seconds, and a restart kills what is left of it.
            (
                format!(
                    "SIGTERM active gateway {}; started again after the load",
                    gw.name
                ),
                Some(gw.name),
                false,
            )
        }
        Kind::RedisRestart => {
            guard.pending.push(Undo::RedisUp);
            let fault = cluster.restart_redis()?;
            (fault, None, false)
        }
        Kind::ScaleUp => {
            let id = cluster.add_worker()?;
            guard.pending.push(Undo::RemoveAdded(id.clone()));
            side.id = Some(id.clone());
            (
                format!("worker {id} added; drained and removed after the load"),
                None,
                false,
            )
        }
        Kind::ScaleDown => {
            guard.pending.push(Undo::RestartWorker(worker.id.clone()));
            let stopped = cluster.drain_worker(&worker.id, DRAIN_GRACE)?;
            side.drained = Some(stopped);
            (
                format!(
                    "worker {} drained (SIGTERM) and stopped; started again after the load",
                    worker.id
                ),
                None,
                false,
            )
        }
        Kind::All => return Err(TargetError::failed("`all` is not one drill")),
    };
    Ok((fault, gateway, mid, side))
}

/// Waits (bounded) until the active gateway sees every worker healthy; else what it said last.
/// Meanwhile a trickle of requests goes through the public address: a worker the gateway ejected
/// comes back through a probe request, which only real traffic brings (after the load has ended
/// there would be none, and the worker would wait for it indefinitely).
fn wait_healthy(cluster: &mut dyn ClusterHandle, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let (target, netns) = (cluster.public_addr(), cluster.client_netns());
    loop {
        let last = match cluster.all_healthy() {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() > deadline || interrupted() {
            return Err(last);
        }
        let _ = traffic::run_in(netns.clone(), move || {
            traffic::trickle(target, NUDGE_REQUESTS)
        });
        std::thread::sleep(Duration::from_millis(200));
    }
}
