//! The worker's Prometheus metrics, served as text on `/metrics` by every herd worker app.
//!
//! What the worker library sees of every request and of its own Redis work: requests by route
//! and status, their latency, requests in flight, session store operations (load, save,
//! compare-and-set conflicts, errors) and their latency, the Redis pool's state and registry
//! heartbeats. Label values are bounded: the route is the app's route *pattern* (`/cart/{item}`),
//! never the raw path, and a path that matches no route counts as `unmatched`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::redis_link::RedisLink;

/// Labels `[(route), (status)]` of the request counter.
type RouteStatus = [(&'static str, String); 2];
/// One label.
type One = [(&'static str, &'static str); 1];
/// Two fixed labels.
type Two = [(&'static str, &'static str); 2];
/// Labels `[(route)]` of the latency histogram.
type Route = [(&'static str, String); 1];
/// A histogram family whose histograms share [`latency_buckets`].
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 0.5 ms to ~16 s, doubling: a cached page and a stuck Redis both land in a bucket.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// A session store operation, for [`WorkerMetrics::session_op`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOp {
    /// Reading a session.
    Load,
    /// One compare-and-set write attempt.
    Save,
    /// Deleting a session (or all of a user's).
    Destroy,
}

impl SessionOp {
    /// The span name of the operation.
    pub(crate) fn span_name(self) -> &'static str {
        match self {
            SessionOp::Load => "redis session.load",
            SessionOp::Save => "redis session.save",
            SessionOp::Destroy => "redis session.destroy",
        }
    }

    fn label(self) -> &'static str {
        match self {
            SessionOp::Load => "load",
            SessionOp::Save => "save",
            SessionOp::Destroy => "destroy",
        }
    }
}

/// The worker's metrics; one per worker, shared by its middleware, session store and registry.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Histograms<Route>,
    in_flight: Gauge,
    session_ops: Family<Two, Counter>,
    session_latency: Histograms<One>,
    session_conflicts: Counter,
    session_busy: Counter,
    heartbeats: Family<One, Counter>,
    /// The Redis link whose pool `/metrics` shows, once known.
    link: Arc<OnceLock<RedisLink>>,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// Registers every worker metric (prefix `herd_worker_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("herd_worker");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register(
            "requests",
            "Requests served, by route pattern and status code",
            requests.clone(),
        );
        let latency: Histograms<Route> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers, by route pattern",
            latency.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight",
            "Requests being served now (health checks excluded)",
            in_flight.clone(),
        );
        let session_ops = Family::<Two, Counter>::default();
        registry.register(
            "session_ops",
            "Session store operations on Redis, by op (load, save, destroy) and result (ok, error); a save counts each compare-and-set attempt",
            session_ops.clone(),
        );
        let session_latency: Histograms<One> = Family::new_with_constructor(latency_buckets);
        registry.register(
            "session_op_duration_seconds",
            "Latency of session store operations on Redis, by op",
            session_latency.clone(),
        );
        let session_conflicts = Counter::default();
        registry.register(
            "session_cas_conflicts",
            "Session saves that lost a compare-and-set race and were retried on fresh data",
            session_conflicts.clone(),
        );
        let session_busy = Counter::default();
        registry.register(
            "session_lease_waits",
            "Session saves that waited for another writer's lease",
            session_busy.clone(),
        );
        let heartbeats = Family::<One, Counter>::default();
        registry.register(
            "registry_heartbeats",
            "Heartbeats of the worker's registry entry, by result (ok, failed)",
            heartbeats.clone(),
        );
        let link = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(PoolCollector { link: link.clone() }));
        WorkerMetrics {
            registry,
            requests,
            latency,
            in_flight,
            session_ops,
            session_latency,
            session_conflicts,
            session_busy,
            heartbeats,
            link,
        }
    }

    /// Shows the state of `link`'s pool (the current one, after a Sentinel switch too).
    pub fn watch_pool(&self, link: RedisLink) {
        let _ = self.link.set(link);
    }

    /// Counts one session store operation and its latency.
    pub fn session_op(&self, op: SessionOp, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.session_ops
            .get_or_create(&[("op", op.label()), ("result", result)])
            .inc();
        self.session_latency
            .get_or_create(&[("op", op.label())])
            .observe(took.as_secs_f64());
    }

    /// Counts a save that lost a compare-and-set race.
    pub fn session_conflict(&self) {
        self.session_conflicts.inc();
    }

    /// Counts a save that met another writer's lease.
    pub fn session_busy(&self) {
        self.session_busy.inc();
    }

    /// Counts a registry heartbeat.
    pub fn heartbeat(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.heartbeats.get_or_create(&[("result", result)]).inc();
    }

    /// Starts measuring a request to `route` (the route pattern, or `unmatched`): in flight from
    /// now (health checks excluded) until the measure is finished or dropped.
    pub(crate) fn request<'a>(&'a self, route: &'a str) -> RequestMeasure<'a> {
        RequestMeasure {
            metrics: self,
            route,
            started: tokio::time::Instant::now(),
            _in_flight: (!crate::health::is_check(route)).then(|| InFlight::enter(&self.in_flight)),
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// `/metrics`: the worker's metrics as Prometheus text.
pub async fn serve(State(metrics): State<Arc<WorkerMetrics>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response()
}

/// One request being measured, from [`WorkerMetrics::request`].
pub(crate) struct RequestMeasure<'a> {
    metrics: &'a WorkerMetrics,
    route: &'a str,
    started: tokio::time::Instant,
    _in_flight: Option<InFlight<'a>>,
}

impl RequestMeasure<'_> {
    /// Counts the request by route pattern and status, and its time to the response head.
    pub(crate) fn finish(self, status: http::StatusCode) {
        self.metrics
            .latency
            .get_or_create(&[("route", self.route.to_owned())])
            .observe(self.started.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&[
                ("route", self.route.to_owned()),
                ("status", status.as_str().to_owned()),
            ])
            .inc();
    }
}

/// One request in flight; leaves the gauge when dropped (also when the client goes away).
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The Redis pool's state, read at scrape time.
#[derive(Debug)]
struct PoolCollector {
    link: Arc<OnceLock<RedisLink>>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(link) = self.link.get() else {
            return Ok(());
        };
        // A cluster has no pool (one shared multiplexed connection): nothing to show.
        let Some(status) = link.pool().status() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(
            "redis_pool_connections",
            "Redis pool: connections by state (open, idle, max) and tasks waiting for one",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [
            ("open", status.size),
            ("idle", status.available),
            ("max", status.max_size),
            ("waiting", status.waiting),
        ] {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            metric
                .encode_family(&[("state", state)])?
                .encode_gauge(&value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ops_and_heartbeats_show_in_the_text() {
        let metrics = WorkerMetrics::new();
        metrics.session_op(SessionOp::Save, true, Duration::from_millis(2));
        metrics.session_op(SessionOp::Load, false, Duration::from_millis(1));
        metrics.session_conflict();
        metrics.heartbeat(true);
        let text = metrics.encode();
        for line in [
            "herd_worker_session_ops_total{op=\"save\",result=\"ok\"} 1",
            "herd_worker_session_ops_total{op=\"load\",result=\"error\"} 1",
            "herd_worker_session_cas_conflicts_total 1",
            "herd_worker_registry_heartbeats_total{result=\"ok\"} 1",
            "herd_worker_session_op_duration_seconds_count{op=\"save\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }
}
