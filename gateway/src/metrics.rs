//! Prometheus metrics of the gateway, served as text on the admin port's `/metrics`.
//!
//! What changes on every request (per-worker response counts, in-flight, the latency histogram)
//! lives in plain atomics — in [`crate::balancer::Worker`] or in [`LatencyHistogram`] — and is read
//! only when scraped, through a [`Collector`]; the request path never takes a lock for metrics.
//! Rare events (retries, the gateway's own error responses) use prometheus-client's label
//! families.
//!
//! Label sets stay bounded: every label value is a fixed word, except the worker's id, and
//! per-worker series show only the workers in the balancer's table — a removed worker's series
//! leave `/metrics` with it (the registry may bring and take workers all day).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::balancer::selection::serving;
use crate::balancer::worker::{CLASSES, Status};
use crate::balancer::{Clock, Table};

/// Labels of one label: `[(name, value)]`.
type One = [(&'static str, String); 1];

/// State changes by worker id, then by (new state, source of the reason).
type Changes = BTreeMap<String, BTreeMap<(String, String), u64>>;

/// The gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Latency from a request's arrival to its response headers, all attempts included.
    pub latency: Arc<LatencyHistogram>,
    retries: Family<One, Counter>,
    retries_refused: Family<One, Counter>,
    errors: Family<One, Counter>,
    /// Worker state changes; shown for the workers in the table only (see [`ChangesCollector`]).
    changes: Arc<Mutex<Changes>>,
    /// The same changes summed over workers, by new state and source: kept when a worker
    /// leaves, so that a worker ejected, then restarted under a new incarnation (which drops
    /// its own series) still counts (`herd drill worker-kill` reads it).
    changes_all: Family<[(&'static str, String); 2], Counter>,
    /// The balancer's table, once known.
    table: Arc<OnceLock<Arc<ArcSwap<Table>>>>,
    /// Client connections refused because `limits.max_connections` was reached.
    pub connections_refused: Counter,
    /// Client connections refused because their address was at
    /// `limits.max_connections_per_client`.
    pub connections_refused_per_client: Counter,
    /// Idle HTTP/1.1 client connections moved to another serving thread (`adaptive_threads`).
    pub connections_moved: Counter,
    /// Serving threads that new connections go to (`adaptive_threads`; else all of them).
    pub serving_threads_active: Gauge,
    /// Active health checks that passed / failed (handles into one family, made once: the
    /// checks of a thousand workers run thousands of times a second).
    checks_passed: Counter,
    checks_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every gateway-wide metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("herd_gateway");
        let retries = Family::<One, Counter>::default();
        registry.register(
            "retries",
            "Requests sent again to another worker, by reason",
            retries.clone(),
        );
        let retries_refused = Family::<One, Counter>::default();
        registry.register(
            "retries_refused",
            "Retries not made although safe, by limit (budget, max_attempts)",
            retries_refused.clone(),
        );
        let errors = Family::<One, Counter>::default();
        registry.register(
            "errors",
            "Error responses made by the gateway itself, by kind",
            errors.clone(),
        );
        let changes = Arc::new(Mutex::new(Changes::new()));
        let changes_all = Family::<[(&'static str, String); 2], Counter>::default();
        registry.register(
            "state_changes",
            "Routing state changes of all workers together, by new state and source of the reason (kept when a worker leaves)",
            changes_all.clone(),
        );
        let table = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ChangesCollector {
            changes: changes.clone(),
            table: table.clone(),
        }));
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections answered 503 because limits.max_connections was reached",
            connections_refused.clone(),
        );
        let connections_refused_per_client = Counter::default();
        registry.register(
            "connections_refused_per_client",
            "Client connections answered 429 because their address had limits.max_connections_per_client open",
            connections_refused_per_client.clone(),
        );
        let connections_moved = Counter::default();
        registry.register(
            "client_connections_moved",
            "Idle HTTP/1.1 client connections moved to another serving thread (adaptive_threads)",
            connections_moved.clone(),
        );
        let serving_threads_active = Gauge::default();
        registry.register(
            "serving_threads_active",
            "Serving threads that take new connections; with adaptive_threads as many as the load needs",
            serving_threads_active.clone(),
        );
        let checks = Family::<One, Counter>::default();
        registry.register(
            "health_checks",
            "Active health checks, by result (ok, failed)",
            checks.clone(),
        );
        let checks_passed = checks.get_or_create(&[("result", "ok".into())]).clone();
        let checks_failed = checks.get_or_create(&[("result", "failed".into())]).clone();
        let latency = Arc::new(LatencyHistogram::default());
        Metrics {
            checks_passed,
            checks_failed,
            registry: Mutex::new(registry),
            latency,
            retries,
            retries_refused,
            errors,
            changes,
            changes_all,
            table,
            connections_refused,
            connections_refused_per_client,
            connections_moved,
            serving_threads_active,
        }
    }

    /// Adds the per-worker metrics, read from the balancer's table at scrape time.
    pub fn watch_workers(
        &self,
        table: Arc<ArcSwap<Table>>,
        clock: Clock,
        slow_start_ns: u64,
        panic_threshold: f64,
    ) {
        let _ = self.table.set(table.clone());
        let collector = WorkerCollector {
            table,
            clock,
            slow_start_ns,
            panic_threshold,
            latency: self.latency.clone(),
        };
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(collector));
    }

    /// Adds the failover node's role, epoch and transitions, read from its status at scrape
    /// time.
    pub fn watch_failover(
        &self,
        status: tokio::sync::watch::Receiver<crate::failover::FailoverStatus>,
    ) {
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(FailoverCollector { status }));
    }

    /// Adds the open client connections of each serving thread, read at scrape time.
    pub fn watch_client_connections(&self, per_thread: Arc<[AtomicUsize]>) {
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(ConnectionsCollector { per_thread }));
    }

    /// Adds the current hedge delay (nanoseconds; 0 when hedging is off), read at scrape time.
    pub fn watch_hedge_delay(&self, delay_ns: Arc<AtomicU64>) {
        self.registry
            .lock()
            .unwrap()
            .register_collector(Box::new(HedgeCollector { delay_ns }));
    }

    /// Adds a collector read at scrape time (for state kept by another module, such as the
    /// registry's Redis reachability in [`crate::events`], the TLS metrics in `crate::tls`).
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.registry.lock().unwrap().register_collector(collector);
    }

    /// Counts a retry.
    pub fn retry(&self, reason: &'static str) {
        self.retries
            .get_or_create(&[("reason", reason.to_string())])
            .inc();
    }

    /// Counts one active health check.
    pub fn health_check(&self, ok: bool) {
        if ok {
            self.checks_passed.inc();
        } else {
            self.checks_failed.inc();
        }
    }

    /// Counts a safe retry that a limit refused.
    pub fn retry_refused(&self, limit: &'static str) {
        self.retries_refused
            .get_or_create(&[("limit", limit.to_string())])
            .inc();
    }

    /// Counts an error response made by the gateway.
    pub fn error(&self, kind: &'static str) {
        self.errors
            .get_or_create(&[("kind", kind.to_string())])
            .inc();
    }

    /// Counts a worker's state change; `source` is the kind of reason (admin, registry, active,
    /// passive). A removal drops the worker's series instead: it leaves `/metrics`.
    pub fn state_change(&self, worker: &str, to: &str, source: &str) {
        let mut changes = self.changes.lock().unwrap();
        if to == Status::Removed.as_str() {
            changes.remove(worker);
            return;
        }
        self.changes_all
            .get_or_create(&[("to", to.to_string()), ("source", source.to_string())])
            .inc();
        *changes
            .entry(worker.to_string())
            .or_default()
            .entry((to.to_string(), source.to_string()))
            .or_default() += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(8192);
        let registry = self.registry.lock().unwrap();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free latency histogram (prometheus-client's own one takes a mutex per observation).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Non-cumulative counts; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one latency.
    #[inline]
    pub fn observe(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts); the encoder makes the buckets cumulative.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (index, count) in self.counts.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            total += count;
            let bound = BUCKETS.get(index).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, count));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, total, buckets)
    }
}

/// Reads per-worker values from the balancer's table on each scrape.
#[derive(Debug)]
struct WorkerCollector {
    table: Arc<ArcSwap<Table>>,
    clock: Clock,
    slow_start_ns: u64,
    panic_threshold: f64,
    latency: Arc<LatencyHistogram>,
}

const STATES: [Status; 8] = [
    Status::Removed,
    Status::Drained,
    Status::Draining,
    Status::Unreachable,
    Status::Down,
    Status::Ejected,
    Status::SlowStart,
    Status::Healthy,
];

/// Worker state changes, for the workers in the balancer's table (all of them before the table
/// is known). A change that races a removal (a health check finishing just after it) is dropped
/// at the next scrape, so the map never keeps workers that are gone.
#[derive(Debug)]
struct ChangesCollector {
    changes: Arc<Mutex<Changes>>,
    table: Arc<OnceLock<Arc<ArcSwap<Table>>>>,
}

impl Collector for ChangesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut changes = self.changes.lock().unwrap();
        if let Some(table) = self.table.get() {
            let table = table.load();
            changes.retain(|id, _| table.workers.iter().any(|w| w.id() == id));
        }
        let mut metric = encoder.encode_descriptor(
            "worker_state_changes",
            "Routing state changes of workers, by new state and source of the reason",
            None,
            MetricType::Counter,
        )?;
        for (worker, counts) in changes.iter() {
            for ((to, source), count) in counts {
                let labels = [
                    ("worker", worker.as_str()),
                    ("to", to.as_str()),
                    ("source", source.as_str()),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(count, None)?;
            }
        }
        Ok(())
    }
}

/// Reads the failover node's status when scraped.
#[derive(Debug)]
struct FailoverCollector {
    status: tokio::sync::watch::Receiver<crate::failover::FailoverStatus>,
}

/// Open client connections per serving thread.
#[derive(Debug)]
struct ConnectionsCollector {
    per_thread: Arc<[AtomicUsize]>,
}

impl Collector for ConnectionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "client_connections",
            "Open client connections, by the serving thread that serves them",
            None,
            MetricType::Gauge,
        )?;
        for (thread, open) in self.per_thread.iter().enumerate() {
            let open = i64::try_from(open.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            metric
                .encode_family(&[("thread", thread.to_string())])?
                .encode_gauge(&open)?;
        }
        Ok(())
    }
}

/// Reads the hedge delay when scraped.
#[derive(Debug)]
struct HedgeCollector {
    delay_ns: Arc<AtomicU64>,
}

impl Collector for HedgeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let seconds = self.delay_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_descriptor(
                "hedge_delay_seconds",
                "How long an idempotent request waits for its worker before it is hedged (0: off)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&seconds)?;
        Ok(())
    }
}

impl Collector for FailoverCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.status.borrow().clone();
        let mut metric = encoder.encode_descriptor(
            "failover_role",
            "1 for this gateway's current role in the pair (active or standby), 0 for the other",
            None,
            MetricType::Gauge,
        )?;
        for role in [
            crate::failover::Role::Active,
            crate::failover::Role::Standby,
        ] {
            let value = i64::from(status.role == role);
            metric
                .encode_family(&[("role", role.as_str())])?
                .encode_gauge(&value)?;
        }
        let epoch = i64::try_from(status.epoch).unwrap_or(i64::MAX);
        encoder
            .encode_descriptor(
                "failover_epoch",
                "Fencing epoch of the lease this gateway holds or last saw",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&epoch)?;
        encoder
            .encode_descriptor(
                "failover_transitions",
                "Role changes since start",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&status.transitions, None)?;
        let peer = i64::from(status.peer.reachable);
        encoder
            .encode_descriptor(
                "failover_peer_reachable",
                "1 while heartbeats from the peer gateway arrive",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&peer)?;
        for (name, help, value) in [
            (
                "failover_holds_address",
                "1 while the floating address is on this host",
                status.holds_address,
            ),
            (
                "failover_redis_reachable",
                "1 while the last lease call reached Redis",
                status.redis_reachable,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&i64::from(value))?;
        }
        // The reason stays on the admin API: free text makes a new series per transition.
        if let Some(last) = &status.last_transition {
            let seconds = last.at_unix_ms as f64 / 1000.0;
            encoder
                .encode_descriptor(
                    "failover_last_transition_timestamp_seconds",
                    "When this gateway's role last changed, and from which role to which",
                    None,
                    MetricType::Gauge,
                )?
                .encode_family(&[("from", last.from.as_str()), ("to", last.to.as_str())])?
                .encode_gauge(&seconds)?;
        }
        Ok(())
    }
}

impl Collector for WorkerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.latency.snapshot();
        let mut metric = encoder.encode_descriptor(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers, retries included",
            None,
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(
            sum,
            count,
            &buckets,
            None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
        )?;

        let table = self.table.load();
        let now = self.clock.now();
        let label = |w: &crate::balancer::Worker| [("worker", w.id().to_string())];

        let (serving, panic) = serving(&table.workers, self.panic_threshold);
        encoder
            .encode_descriptor(
                "workers_serving",
                "Workers new requests go to right now (in panic mode: every reachable one)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(serving as i64))?;
        encoder
            .encode_descriptor(
                "panic_mode",
                "1 while fewer than balancing.panic_threshold of the reachable workers are healthy",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&(panic as i64))?;

        let mut metric = encoder.encode_descriptor(
            "worker_responses",
            "Responses from each worker by status class (error = no response)",
            None,
            MetricType::Counter,
        )?;
        for worker in table.workers.iter() {
            for (index, class) in CLASSES.iter().enumerate() {
                let labels = [
                    ("worker", worker.id().to_string()),
                    ("class", class.to_string()),
                ];
                let value = worker.counters.responses[index].load(Ordering::Relaxed);
                metric
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "worker_in_flight",
            "Requests in flight to each worker",
            None,
            MetricType::Gauge,
        )?;
        for worker in table.workers.iter() {
            metric
                .encode_family(&label(worker))?
                .encode_gauge(&(worker.in_flight() as i64))?;
        }

        let mut metric = encoder.encode_descriptor(
            "worker_healthy",
            "1 when the worker takes new requests (healthy or in slow start), else 0",
            None,
            MetricType::Gauge,
        )?;
        for worker in table.workers.iter() {
            let status = worker.status(now, self.slow_start_ns);
            let healthy = matches!(status, Status::Healthy | Status::SlowStart);
            metric
                .encode_family(&label(worker))?
                .encode_gauge(&(healthy as i64))?;
        }

        let mut metric = encoder.encode_descriptor(
            "worker_state",
            "1 for each worker's current state, by precedence",
            None,
            MetricType::Gauge,
        )?;
        for worker in table.workers.iter() {
            let status = worker.status(now, self.slow_start_ns);
            for state in STATES {
                let labels = [
                    ("worker", worker.id().to_string()),
                    ("state", state.as_str().to_string()),
                ];
                metric
                    .encode_family(&labels)?
                    .encode_gauge(&((state == status) as i64))?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "worker_ejections",
            "Passive ejections of each worker",
            None,
            MetricType::Counter,
        )?;
        for worker in table.workers.iter() {
            let value = worker.counters.ejections.load(Ordering::Relaxed);
            metric
                .encode_family(&label(worker))?
                .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }

        let mut metric = encoder.encode_descriptor(
            "worker_latency_ewma_seconds",
            "Peak-EWMA latency estimate of each worker",
            None,
            MetricType::Gauge,
        )?;
        for worker in table.workers.iter() {
            metric
                .encode_family(&label(worker))?
                .encode_gauge(&(worker.ewma.get(now) / 1e9))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0031).abs() < 1e-6);
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets.last().unwrap().1, 1);
        // Rendered through prometheus-client, the buckets add up.
        let metrics = Metrics::new();
        metrics.latency.observe(Duration::from_micros(100));
        metrics.latency.observe(Duration::from_millis(3));
        metrics.watch_workers(
            Arc::new(ArcSwap::from_pointee(Table::default())),
            Clock::new(),
            0,
            0.5,
        );
        let text = metrics.render();
        assert!(
            text.contains("herd_gateway_request_duration_seconds_bucket{le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("herd_gateway_request_duration_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("herd_gateway_request_duration_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn render_has_the_gateway_families() {
        let metrics = Metrics::new();
        metrics.retry("connect");
        metrics.error("no_worker_available");
        metrics.state_change("w1", "down", "active");
        metrics.health_check(true);
        metrics.health_check(true);
        metrics.health_check(false);
        let text = metrics.render();
        assert!(
            text.contains("herd_gateway_health_checks_total{result=\"ok\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("herd_gateway_health_checks_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("herd_gateway_retries_total{reason=\"connect\"} 1"),
            "{text}"
        );
        assert!(text.contains("herd_gateway_errors_total{kind=\"no_worker_available\"} 1"));
        assert!(text.contains(
            "herd_gateway_worker_state_changes_total{worker=\"w1\",to=\"down\",source=\"active\"} 1"
        ));
    }

    #[test]
    fn state_changes_summed_over_workers_outlive_the_worker() {
        let metrics = Metrics::new();
        metrics.state_change("w1", "ejected", "passive");
        metrics.state_change("w2", "ejected", "passive");
        metrics.state_change("w1", "removed", "registry");
        let text = metrics.render();
        assert!(!text.contains("worker=\"w1\""), "{text}");
        assert!(
            text.contains("herd_gateway_state_changes_total{to=\"ejected\",source=\"passive\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn removed_workers_leave_the_metrics() {
        use crate::balancer::{Balancer, ChangeSource};
        let metrics = Arc::new(Metrics::new());
        let config = crate::GatewayConfig::default();
        let balancer = Balancer::new(&config, metrics.clone(), Box::new(|_, _| {}));
        balancer.watch_metrics(&metrics);
        balancer.add(balancer.static_spec("127.0.0.1:1")).unwrap();
        let before = metrics.render();
        assert!(before.contains("worker=\"127.0.0.1:1\""), "{before}");

        for round in 0..3 {
            for port in 1000..1200 {
                let id = format!("127.0.0.1:{port}");
                balancer.add(balancer.static_spec(&id)).unwrap();
                balancer.admin_drain(&id, true).unwrap();
                balancer.admin_drain(&id, false).unwrap();
                if round == 0 {
                    assert!(metrics.render().contains(&format!("worker=\"{id}\"")));
                }
                balancer
                    .remove(&id, ChangeSource::Registry, "gone")
                    .unwrap();
                // A health check that finishes just after the removal.
                metrics.state_change(&id, "down", "active");
            }
        }
        let after = metrics.render();
        // The same series but for the changes summed over workers: a few more states, none per
        // worker (their number is bounded by the states and sources, not by the workers).
        let series = |text: &str| -> std::collections::BTreeSet<String> {
            (text.lines().filter(|line| !line.starts_with('#')))
                .map(|line| {
                    line.rsplit_once(' ')
                        .map_or(line, |(series, _)| series)
                        .into()
                })
                .collect()
        };
        let (before, after) = (series(&before), series(&after));
        let new: Vec<_> = after.difference(&before).collect();
        assert!(
            new.iter()
                .all(|s| s.starts_with("herd_gateway_state_changes_total{")),
            "/metrics grew with removed workers: {new:?}"
        );
        assert_eq!(new.len(), 3, "{new:?}");
        assert!(before.is_subset(&after));
        assert_eq!(metrics.changes.lock().unwrap().len(), 1);
    }

    #[test]
    fn render_has_the_failover_state() {
        use crate::failover::{FailoverStatus, PeerStatus, Role, Transition};
        let metrics = Metrics::new();
        let (_tx, status) = tokio::sync::watch::channel(FailoverStatus {
            id: "gw1".into(),
            role: Role::Active,
            epoch: 7,
            holds_address: true,
            redis_reachable: false,
            peer: PeerStatus::default(),
            transitions: 1,
            last_transition: Some(Transition {
                from: Role::Standby,
                to: Role::Active,
                reason: "peer silent and the lease is free".into(),
                epoch: 7,
                at_unix_ms: 1_500,
            }),
        });
        metrics.watch_failover(status);
        let text = metrics.render();
        for line in [
            "herd_gateway_failover_role{role=\"active\"} 1",
            "herd_gateway_failover_epoch 7",
            "herd_gateway_failover_transitions_total 1",
            "herd_gateway_failover_holds_address 1",
            "herd_gateway_failover_redis_reachable 0",
            "herd_gateway_failover_last_transition_timestamp_seconds{from=\"standby\",to=\"active\"} 1.5",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }
}
