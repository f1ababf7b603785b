//! Load balancing in three parts, after pingora: membership (who exists), health (who may take
//! traffic) and selection (who gets this request).
//!
//! - [`worker`]: one worker's state — routing flags by source, in-flight, latency, counters.
//! - [`selection`]: filter by the precedence order, then p2c / round robin / weighted.
//! - [`health`]: active checks (a task per worker), flipping only after `rise`/`fall` in a row.
//! - [`passive`]: ejection after consecutive request failures, with growing backoff and a probe.
//! - [`ewma`]: the peak-EWMA latency estimate used by p2c.
//! - [`latency`]: sampled per-worker latency buckets for the dashboard's p50/p99.
//! - [`registry`]: membership from Redis (registry entries plus the events channel).
//!
//! [`Balancer`] ties them together. The table of workers is read-mostly and lives behind an
//! [`ArcSwap`]: the request path loads it without a lock; the rare writers (registry, admin)
//! serialize on a mutex and publish a new table.

pub mod ewma;
pub mod health;
pub mod latency;
pub mod passive;
pub mod registry;
pub mod selection;
pub mod worker;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tracing::{debug, info, warn};

use crate::config::{GatewayConfig, PassiveConfig, parse_worker_addr};
use crate::events::{Events, Subject};
use crate::metrics::Metrics;
use crate::upstream::Pool;
use ewma::PeakEwma;
use passive::{Breaker, Transition};
pub use selection::{Pick, Refusal, Selector};
pub use worker::{InFlight, Origin, Status, Worker, WorkerSpec};

/// Monotonic time in nanoseconds since the balancer started (tokio time, so tests can pause it).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: tokio::time::Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Self {
        Clock {
            base: tokio::time::Instant::now(),
        }
    }

    /// Nanoseconds since the start, never 0 (0 means "unset" in some atomics).
    #[inline]
    pub fn now(&self) -> u64 {
        self.at(tokio::time::Instant::now())
    }

    /// The clock's reading at `instant` (one the caller already has: no clock read).
    #[inline]
    pub fn at(&self, instant: tokio::time::Instant) -> u64 {
        instant.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The current set of workers.
#[derive(Debug, Default)]
pub struct Table {
    /// Workers in the order they were added.
    pub workers: Vec<Arc<Worker>>,
}

/// Starts the active health checks of a newly added worker.
pub type SpawnChecks = Box<dyn Fn(Arc<Worker>, Notifier) + Send + Sync>;

/// Why a membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// No worker with that id.
    #[error("no worker with id {0:?}")]
    Unknown(String),
    /// A worker with that id already exists.
    #[error("a worker with id {0:?} already exists")]
    Exists(String),
    /// An operator removed this worker; it stays out until it registers again.
    #[error("worker {0:?} was removed by an operator")]
    Removed(String),
    /// The address is not `host:port`.
    #[error("bad worker address: {0}")]
    BadAddr(String),
}

/// Where a state change came from, for metrics (the log line carries the detailed reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    /// The static configuration.
    Config,
    /// An operator through the admin API.
    Admin,
    /// The worker's registry entry or events.
    Registry,
    /// Active health checks.
    Active,
    /// Passive checks on real traffic.
    Passive,
}

impl ChangeSource {
    fn as_str(self) -> &'static str {
        match self {
            ChangeSource::Config => "config",
            ChangeSource::Admin => "admin",
            ChangeSource::Registry => "registry",
            ChangeSource::Active => "active",
            ChangeSource::Passive => "passive",
        }
    }
}

/// Logs and counts state changes; shared by the balancer and the health-check tasks.
#[derive(Debug, Clone)]
pub struct Notifier {
    metrics: Arc<Metrics>,
    /// The clock every timestamp in the balancer uses.
    pub clock: Clock,
    /// Recent changes, for the dashboard.
    events: Arc<Events>,
}

impl Notifier {
    /// A notifier counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>, clock: Clock) -> Self {
        Notifier {
            metrics,
            clock,
            events: Arc::default(),
        }
    }

    /// The ring of recent events every change is also written to.
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Counts one active health check.
    pub fn checked(&self, ok: bool) {
        self.metrics.health_check(ok);
    }

    /// An active check's connect was refused: the worker is unreachable from now on.
    pub fn unreachable(&self, worker: &Worker, reason: &str) {
        if worker.set_flag(worker::UNREACHABLE, true) {
            self.changed(worker, "unreachable", ChangeSource::Active, reason);
        }
    }

    /// An active check passed: an unreachable worker accepts connections again (and starts
    /// slow, like any worker coming back).
    pub fn reachable(&self, worker: &Worker) {
        if worker.set_flag(worker::UNREACHABLE, false) {
            worker.start_slow_start(self.clock.now());
            self.changed(
                worker,
                "reachable",
                ChangeSource::Active,
                "a health check passed",
            );
        }
    }

    /// Records one change: a log line (fields first), a counter, and the worker's last change.
    /// A change seen after the worker's removal (a health check that was under way) is only
    /// logged at debug level: the worker is gone, and counting it would bring its series back.
    pub fn changed(&self, worker: &Worker, what: &str, source: ChangeSource, reason: &str) {
        if what != "removed" && worker.flags() & worker::REMOVED != 0 {
            debug!(worker = %worker.id(), state = what, source = source.as_str(), reason, "state change after removal ignored");
            return;
        }
        worker.note_change(what, reason);
        self.events.push(Subject::Worker, worker.id(), what, reason);
        self.metrics
            .state_change(worker.id(), what, source.as_str());
        let routing = matches!(
            what,
            "healthy" | "added" | "undrained" | "recovered" | "ready" | "reachable"
        );
        if routing {
            info!(worker = %worker.id(), addr = %worker.spec.addr, state = what, source = source.as_str(), reason, "worker state changed");
        } else {
            warn!(worker = %worker.id(), addr = %worker.spec.addr, state = what, source = source.as_str(), reason, "worker state changed");
        }
    }
}

/// Settings the balancer needs when it creates workers.
#[derive(Debug, Clone)]
struct WorkerDefaults {
    passive: PassiveConfig,
    ewma_decay_ns: f64,
    static_weight: u32,
    panic_threshold: f64,
    /// Serving threads: one idle-connection pool shard each.
    serving_threads: usize,
}

/// The worker table plus selection, health bookkeeping and membership changes.
pub struct Balancer {
    table: Arc<ArcSwap<Table>>,
    /// Serializes writers; holds the ids an operator removed (with their incarnation).
    writer: Mutex<HashSet<(String, Option<u64>)>>,
    selector: Selector,
    notifier: Notifier,
    defaults: WorkerDefaults,
    spawn_checks: SpawnChecks,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("workers", &self.table.load().workers.len())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// An empty balancer set up from `config`; `spawn_checks` starts each added worker's active
    /// health checks.
    pub fn new(config: &GatewayConfig, metrics: Arc<Metrics>, spawn_checks: SpawnChecks) -> Self {
        let clock = Clock::new();
        let selector = Selector::new(&config.balancing, config.limits.max_in_flight_per_worker);
        Balancer {
            table: Arc::new(ArcSwap::from_pointee(Table::default())),
            writer: Mutex::new(HashSet::new()),
            selector,
            notifier: Notifier::new(metrics, clock),
            defaults: WorkerDefaults {
                passive: config.health.passive.clone(),
                ewma_decay_ns: config.balancing.ewma_decay.as_nanos() as f64,
                static_weight: config.balancing.static_weight,
                panic_threshold: config.balancing.panic_threshold,
                serving_threads: config.serving_threads(),
            },
            spawn_checks,
        }
    }

    /// The shared table (for metrics at scrape time).
    pub fn table(&self) -> Arc<ArcSwap<Table>> {
        self.table.clone()
    }

    /// The current workers.
    #[inline]
    pub fn workers(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// The balancer's clock.
    #[inline]
    pub fn clock(&self) -> Clock {
        self.notifier.clock
    }

    /// Logs and counts state changes.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The selection policy.
    pub fn selector(&self) -> &Selector {
        &self.selector
    }

    /// Picks a worker for a request that already went to `tried`.
    #[inline]
    pub fn pick(&self, tried: &[Arc<Worker>]) -> Result<Pick, Refusal> {
        self.pick_at(tried, tokio::time::Instant::now())
    }

    /// [`Balancer::pick`] at a time the caller read already.
    #[inline]
    pub fn pick_at(
        &self,
        tried: &[Arc<Worker>],
        now: tokio::time::Instant,
    ) -> Result<Pick, Refusal> {
        let table = self.table.load();
        self.selector
            .pick(&table.workers, tried, self.clock().at(now))
    }

    /// Whether a request that already went to `tried` could go somewhere else.
    pub fn has_candidate(&self, tried: &[Arc<Worker>]) -> bool {
        let table = self.table.load();
        self.selector
            .has_candidate(&table.workers, tried, self.clock().now())
    }

    /// True when at least one worker takes new requests and is healthy.
    pub fn is_ready(&self) -> bool {
        self.healthy_count() > 0
    }

    /// Workers that take new requests and are healthy (not drained, unreachable, down or
    /// ejected).
    pub fn healthy_count(&self) -> usize {
        self.table
            .load()
            .workers
            .iter()
            .filter(|w| w.flags() & (worker::NEVER_ROUTED | worker::UNHEALTHY) == 0)
            .count()
    }

    /// How many workers new requests go to right now, and whether that is panic mode.
    pub fn serving(&self) -> (usize, bool) {
        self.selector.serving(&self.table.load().workers)
    }

    /// Marks a worker unreachable after a request's connect was refused: no request goes there
    /// until one of its health checks connects again.
    pub fn unreachable(&self, worker: &Worker, source: ChangeSource, reason: &str) {
        if worker.set_flag(worker::UNREACHABLE, true) {
            self.notifier.changed(worker, "unreachable", source, reason);
        }
    }

    /// Finds a worker by id.
    pub fn find(&self, id: &str) -> Option<Arc<Worker>> {
        self.table
            .load()
            .workers
            .iter()
            .find(|w| w.id() == id)
            .cloned()
    }

    /// A static worker's spec from its `workers` entry: `host:port`, or `id=host:port`.
    pub fn static_spec(&self, entry: &str) -> WorkerSpec {
        let (id, addr) = crate::config::split_static_worker(entry);
        WorkerSpec {
            id: id.to_string(),
            addr: addr.to_string(),
            machine: String::new(),
            weight: self.defaults.static_weight,
            origin: Origin::Static,
        }
    }

    /// Adds a worker (healthy, in slow start) and starts its health checks.
    pub fn add(&self, spec: WorkerSpec) -> Result<Arc<Worker>, MembershipError> {
        let authority = parse_worker_addr(&spec.addr).map_err(MembershipError::BadAddr)?;
        let removed = self.writer.lock().unwrap();
        if removed.contains(&tombstone(&spec.id, &spec.origin)) {
            return Err(MembershipError::Removed(spec.id));
        }
        let current = self.table.load();
        if current.workers.iter().any(|w| w.id() == spec.id) {
            return Err(MembershipError::Exists(spec.id));
        }
        let now = self.clock().now();
        // Start from the others' typical latency, so a newcomer neither wins every p2c
        // comparison (estimate 0) nor loses them all (a pessimistic default).
        let estimates: Vec<f64> = current.workers.iter().map(|w| w.ewma.get(now)).collect();
        let initial = if estimates.is_empty() {
            0.0
        } else {
            estimates.iter().sum::<f64>() / estimates.len() as f64
        };
        let worker = Arc::new(
            Worker::new(
                spec,
                authority,
                Breaker::new(&self.defaults.passive),
                PeakEwma::new(initial, self.defaults.ewma_decay_ns, now),
                now,
            )
            .with_pool(Pool::new(self.defaults.serving_threads)),
        );
        let mut workers = current.workers.clone();
        workers.push(worker.clone());
        self.table.store(Arc::new(Table { workers }));
        drop(removed);
        let (source, reason) = match worker.spec.origin {
            Origin::Static => (ChangeSource::Config, "listed in the configuration"),
            Origin::Registry { .. } => (ChangeSource::Registry, "registered"),
        };
        self.notifier.changed(&worker, "added", source, reason);
        (self.spawn_checks)(worker.clone(), self.notifier.clone());
        Ok(worker)
    }

    /// Removes a worker: no new requests, health checks stop, in-flight requests finish.
    /// An operator's removal sticks until the worker registers again as a new incarnation.
    pub fn remove(
        &self,
        id: &str,
        source: ChangeSource,
        reason: &str,
    ) -> Result<Arc<Worker>, MembershipError> {
        let mut removed = self.writer.lock().unwrap();
        let current = self.table.load();
        let Some(worker) = current.workers.iter().find(|w| w.id() == id).cloned() else {
            return Err(MembershipError::Unknown(id.to_string()));
        };
        if source == ChangeSource::Admin {
            removed.insert(tombstone(id, &worker.spec.origin));
        }
        let workers = current
            .workers
            .iter()
            .filter(|w| !Arc::ptr_eq(w, &worker))
            .cloned()
            .collect();
        self.table.store(Arc::new(Table { workers }));
        drop(removed);
        worker.set_flag(worker::REMOVED, true);
        worker.cancel.cancel();
        self.notifier.changed(&worker, "removed", source, reason);
        Ok(worker)
    }

    /// Sets or clears an operator's drain.
    pub fn admin_drain(&self, id: &str, drain: bool) -> Result<Arc<Worker>, MembershipError> {
        let worker = self
            .find(id)
            .ok_or_else(|| MembershipError::Unknown(id.to_string()))?;
        if worker.set_flag(worker::ADMIN_DRAIN, drain) {
            let (what, reason) = if drain {
                ("drained", "drained by operator")
            } else {
                worker.start_slow_start(self.clock().now());
                ("undrained", "undrained by operator")
            };
            self.notifier
                .changed(&worker, what, ChangeSource::Admin, reason);
        }
        Ok(worker)
    }

    /// Applies a worker's own announcement of draining (or of being ready again).
    pub fn registry_drain(&self, worker: &Worker, draining: bool, reason: &str) {
        if worker.set_flag(worker::REGISTRY_DRAIN, draining) {
            let what = if draining { "draining" } else { "ready" };
            if !draining {
                worker.start_slow_start(self.clock().now());
            }
            self.notifier
                .changed(worker, what, ChangeSource::Registry, reason);
        }
    }

    /// Feeds a request's outcome to passive health; logs and counts an ejection or recovery.
    pub fn report(&self, worker: &Worker, ok: bool) {
        self.report_at(worker, ok, self.clock().now());
    }

    /// [`Balancer::report`] of an outcome seen at `now`, a reading of [`Balancer::clock`] the
    /// caller has already (turning an `Instant` into one costs a subtraction).
    pub fn report_at(&self, worker: &Worker, ok: bool, now: u64) {
        if !self.defaults.passive.enabled {
            return;
        }
        match worker.record_outcome(ok, now) {
            None => {}
            Some(Transition::Ejected(length)) => {
                worker
                    .counters
                    .ejections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let reason = format!(
                    "{} consecutive failures, ejected for {}",
                    self.defaults.passive.consecutive_failures,
                    humantime_serde::re::humantime::format_duration(length)
                );
                self.notifier
                    .changed(worker, "ejected", ChangeSource::Passive, &reason);
            }
            Some(Transition::Recovered) => {
                worker.start_slow_start(now);
                self.notifier.changed(
                    worker,
                    "recovered",
                    ChangeSource::Passive,
                    "probe request succeeded",
                );
            }
        }
    }

    /// Stops every worker's health checks (at shutdown).
    pub fn stop(&self) {
        for worker in self.table.load().workers.iter() {
            worker.cancel.cancel();
        }
    }

    /// Registers the per-worker metrics collector on this balancer's table.
    pub fn watch_metrics(&self, metrics: &Metrics) {
        metrics.watch_workers(
            self.table.clone(),
            self.clock(),
            self.selector.slow_start_ns(),
            self.defaults.panic_threshold,
        );
        metrics.register_collector(Box::new(self.notifier.events().collector()));
    }
}

fn tombstone(id: &str, origin: &Origin) -> (String, Option<u64>) {
    match origin {
        Origin::Static => (id.to_string(), None),
        Origin::Registry { started_ms } => (id.to_string(), Some(*started_ms)),
    }
}

/// A balancer with default settings and one static worker (127.0.0.1:8081), its metrics
/// watched: what the admin API and dashboard tests serve.
#[cfg(test)]
pub(crate) fn with_one_worker() -> (Arc<Balancer>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let balancer = Arc::new(Balancer::new(
        &GatewayConfig::default(),
        metrics.clone(),
        Box::new(|_, _| {}),
    ));
    balancer.watch_metrics(&metrics);
    balancer
        .add(balancer.static_spec("127.0.0.1:8081"))
        .unwrap();
    (balancer, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(workers: &[&str]) -> Balancer {
        let config = GatewayConfig {
            workers: workers.iter().map(|s| s.to_string()).collect(),
            ..GatewayConfig::default()
        };
        let b = Balancer::new(&config, Arc::new(Metrics::new()), Box::new(|_, _| {}));
        for addr in workers {
            b.add(b.static_spec(addr)).unwrap();
        }
        b
    }

    #[test]
    fn a_named_static_worker_goes_by_its_name() {
        let b = balancer(&["w1=127.0.0.1:1"]);
        let worker = b.find("w1").expect("found by name");
        assert_eq!(worker.spec.addr, "127.0.0.1:1");
        assert!(b.find("127.0.0.1:1").is_none());
    }

    #[test]
    fn a_change_seen_after_removal_is_not_counted() {
        let metrics = Arc::new(Metrics::new());
        let config = GatewayConfig {
            workers: vec!["w1=127.0.0.1:1".to_string()],
            ..GatewayConfig::default()
        };
        let b = Balancer::new(&config, metrics.clone(), Box::new(|_, _| {}));
        b.add(b.static_spec("w1=127.0.0.1:1")).unwrap();
        let gone = b.remove("w1", ChangeSource::Registry, "test").unwrap();
        let changes = || -> Vec<String> {
            let text = metrics.render();
            text.lines()
                .filter(|line| line.contains("state_changes") && !line.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        let before = changes();
        // A health check that was under way when the worker was removed ends now.
        b.notifier().unreachable(&gone, "connection refused");
        let after = changes();
        assert_eq!(before, after);
        assert!(
            !after.iter().any(|line| line.contains("worker=\"w1\"")),
            "{after:?}"
        );
    }

    #[test]
    fn add_remove_and_admin_removal_sticks() {
        let b = balancer(&["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(b.workers().workers.len(), 2);
        assert!(matches!(
            b.add(b.static_spec("127.0.0.1:1")),
            Err(MembershipError::Exists(_))
        ));
        let gone = b
            .remove("127.0.0.1:1", ChangeSource::Admin, "test")
            .unwrap();
        assert_eq!(gone.status(b.clock().now(), 0), Status::Removed);
        assert!(gone.cancel.is_cancelled());
        assert_eq!(b.workers().workers.len(), 1);
        assert!(matches!(
            b.add(b.static_spec("127.0.0.1:1")),
            Err(MembershipError::Removed(_))
        ));
        assert!(matches!(
            b.remove("nope", ChangeSource::Admin, "test"),
            Err(MembershipError::Unknown(_))
        ));
    }

    #[test]
    fn registry_removal_does_not_block_a_return() {
        let b = balancer(&[]);
        let spec = WorkerSpec {
            id: "w1".into(),
            addr: "127.0.0.1:3".into(),
            machine: "m".into(),
            weight: 1,
            origin: Origin::Registry { started_ms: 1 },
        };
        b.add(spec.clone()).unwrap();
        b.remove("w1", ChangeSource::Registry, "expired").unwrap();
        b.add(spec.clone()).unwrap();
        // An operator's removal blocks this incarnation, not the next one.
        b.remove("w1", ChangeSource::Admin, "bad").unwrap();
        assert!(b.add(spec.clone()).is_err());
        let next = WorkerSpec {
            origin: Origin::Registry { started_ms: 2 },
            ..spec
        };
        b.add(next).unwrap();
    }

    #[test]
    fn readiness_needs_a_healthy_routable_worker() {
        let b = balancer(&["127.0.0.1:1"]);
        assert!(b.is_ready());
        assert_eq!(b.healthy_count(), 1);
        b.admin_drain("127.0.0.1:1", true).unwrap();
        assert!(!b.is_ready());
        b.admin_drain("127.0.0.1:1", false).unwrap();
        b.find("127.0.0.1:1")
            .unwrap()
            .set_flag(worker::ACTIVE_DOWN, true);
        assert!(!b.is_ready());
        assert!(!balancer(&[]).is_ready());
    }

    #[test]
    fn a_refused_worker_is_out_until_it_accepts_again() {
        let b = balancer(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let dead: Vec<_> = ["127.0.0.1:1", "127.0.0.1:2"]
            .iter()
            .map(|id| b.find(id).unwrap())
            .collect();
        for w in &dead {
            b.unreachable(w, ChangeSource::Passive, "connection refused");
        }
        assert_eq!(b.healthy_count(), 1);
        assert_eq!(b.serving(), (1, false));
        assert_eq!(dead[0].status(b.clock().now(), 0), Status::Unreachable);
        assert_eq!(dead[0].last_change().what, "unreachable");
        for _ in 0..50 {
            assert_eq!(b.pick(&[]).unwrap().worker.id(), "127.0.0.1:3");
        }
        b.notifier().reachable(&dead[0]);
        assert_eq!(b.serving(), (2, false));
        assert_eq!(dead[0].last_change().what, "reachable");
    }

    #[test]
    fn passive_failures_eject_and_count() {
        let b = balancer(&["127.0.0.1:1"]);
        let w = b.find("127.0.0.1:1").unwrap();
        for _ in 0..3 {
            b.report(&w, false);
        }
        assert_eq!(w.status(b.clock().now(), 0), Status::Ejected);
        assert_eq!(
            w.counters
                .ejections
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(w.last_change().what, "ejected");
    }
}
