//! The worker's Prometheus metrics, served as text on `/metrics` by every herd worker app.
//!
//! What the worker library sees of every request and of its own Redis work: requests by route
//! and status, their latency, requests in flight, session store operations (load, save,
//! compare-and-set conflicts, errors) and their latency, the Redis pool's state and registry
//! heartbeats. Label values are bounded: the route is the app's route *pattern* (`/cart/{item}`),
//! never the raw path, and a path that matches no route counts as `unmatched`.

use std::sync::{Arc, OnceLock, PoisonError, RwLock};
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

    const ALL: [SessionOp; 3] = [SessionOp::Load, SessionOp::Save, SessionOp::Destroy];

    /// The operation's place in [`SessionOp::ALL`].
    fn index(self) -> usize {
        match self {
            SessionOp::Load => 0,
            SessionOp::Save => 1,
            SessionOp::Destroy => 2,
        }
    }
}

/// The request series of one route, made on its first request. A family's lookup hashes its
/// labels with SipHash and needs them as owned strings, twice per request; a look through the
/// routes seen so far (a handful per app) is a few comparisons (docs/performance.md, section 49).
#[derive(Debug)]
struct RouteSeries {
    route: Box<str>,
    latency: Histogram,
    /// By status code, as answered so far.
    by_status: RwLock<Vec<(u16, Counter)>>,
}

/// Calls `then` with the item of `list` that `is`, adding `make()` first when none is.
fn find_or_add<T>(
    list: &RwLock<Vec<T>>,
    is: impl Fn(&T) -> bool,
    make: impl FnOnce() -> T,
    then: impl FnOnce(&T),
) {
    let read = list.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(item) = read.iter().find(|item| is(item)) {
        return then(item);
    }
    drop(read);
    let mut write = list.write().unwrap_or_else(PoisonError::into_inner);
    // Another request may have added it in between.
    let index = match write.iter().position(&is) {
        Some(index) => index,
        None => {
            write.push(make());
            write.len() - 1
        }
    };
    then(&write[index]);
}

/// The series of one session store operation, looked up once when the metrics are made: a
/// family's lookup hashes its labels with SipHash on every call (docs/performance.md, section
/// 49). Shown from the start, at zero.
#[derive(Debug)]
struct SessionOpSeries {
    ok: Counter,
    error: Counter,
    latency: Histogram,
}

/// The worker's metrics; one per worker, shared by its middleware, session store and registry.
#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    latency: Histograms<Route>,
    /// The request series of the routes seen so far.
    routes: RwLock<Vec<RouteSeries>>,
    in_flight: Gauge,
    /// By [`SessionOp`], in [`SessionOp::ALL`]'s order.
    session_ops: [SessionOpSeries; 3],
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
        // One statement each: a family's lookup holds its lock until the statement ends.
        let session_ops = SessionOp::ALL.map(|op| {
            let ok = session_ops
                .get_or_create(&[("op", op.label()), ("result", "ok")])
                .clone();
            let error = session_ops
                .get_or_create(&[("op", op.label()), ("result", "error")])
                .clone();
            let latency = session_latency.get_or_create(&[("op", op.label())]).clone();
            SessionOpSeries { ok, error, latency }
        });
        WorkerMetrics {
            registry,
            requests,
            latency,
            routes: RwLock::default(),
            in_flight,
            session_ops,
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
        let series = &self.session_ops[op.index()];
        if ok { &series.ok } else { &series.error }.inc();
        series.latency.observe(took.as_secs_f64());
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
        let took = self.started.elapsed().as_secs_f64();
        let RequestMeasure { metrics, route, .. } = self;
        let new_route = || RouteSeries {
            route: route.into(),
            latency: metrics
                .latency
                .get_or_create(&[("route", route.to_owned())])
                .clone(),
            by_status: RwLock::default(),
        };
        let new_status = || {
            let labels = [
                ("route", route.to_owned()),
                ("status", status.as_str().to_owned()),
            ];
            (
                status.as_u16(),
                metrics.requests.get_or_create(&labels).clone(),
            )
        };
        find_or_add(
            &metrics.routes,
            |series| *series.route == *route,
            new_route,
            |series| {
                series.latency.observe(took);
                find_or_add(
                    &series.by_status,
                    |(code, _)| *code == status.as_u16(),
                    new_status,
                    |(_, requests)| {
                        requests.inc();
                    },
                );
            },
        );
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
        if let Some(stats) = link.line_stats() {
            let mut metric = encoder.encode_descriptor(
                "redis_line_events",
                "Session reads pipelined on the shared Redis lines, by event (call: a read sent; \
                 write: a write of sent reads, so calls / writes is the reads per write; connect; \
                 break: a line broken or found closed)",
                None,
                MetricType::Counter,
            )?;
            for (event, count) in [
                ("call", stats.calls),
                ("write", stats.writes),
                ("connect", stats.connects),
                ("break", stats.breaks),
            ] {
                metric
                    .encode_family(&[("event", event)])?
                    .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                        &count, None,
                    )?;
            }
        }
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

    #[test]
    fn requests_count_by_route_and_status() {
        let metrics = WorkerMetrics::new();
        for (route, status, times) in [
            ("/cart/{item}", 200, 3),
            ("/cart/{item}", 404, 1),
            ("/me", 200, 2),
            ("unmatched", 404, 1),
        ] {
            for _ in 0..times {
                let status = http::StatusCode::from_u16(status).unwrap();
                metrics.request(route).finish(status);
            }
        }
        let text = metrics.encode();
        for line in [
            "herd_worker_requests_total{route=\"/cart/{item}\",status=\"200\"} 3",
            "herd_worker_requests_total{route=\"/cart/{item}\",status=\"404\"} 1",
            "herd_worker_requests_total{route=\"/me\",status=\"200\"} 2",
            "herd_worker_requests_total{route=\"unmatched\",status=\"404\"} 1",
            "herd_worker_request_duration_seconds_count{route=\"/cart/{item}\"} 4",
            "herd_worker_request_duration_seconds_count{route=\"/me\"} 2",
            "herd_worker_in_flight 0",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
    }

    #[test]
    fn each_session_op_counts_in_its_own_series() {
        let metrics = WorkerMetrics::new();
        let text = metrics.encode();
        assert!(
            text.contains("herd_worker_session_ops_total{op=\"destroy\",result=\"error\"} 0"),
            "series shown from the start:\n{text}"
        );
        for (n, op) in SessionOp::ALL.into_iter().enumerate() {
            assert_eq!(op.index(), n);
            for _ in 0..=n {
                metrics.session_op(op, false, Duration::from_millis(1));
            }
            let text = metrics.encode();
            let line = format!(
                "herd_worker_session_ops_total{{op=\"{}\",result=\"error\"}} {}",
                op.label(),
                n + 1
            );
            assert!(text.contains(&line), "{line} missing in:\n{text}");
        }
    }
}
