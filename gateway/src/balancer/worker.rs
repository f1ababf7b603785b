//! One worker as the gateway sees it: address, routing flags, load, counters, last state change.
//!
//! Everything the request path reads is an atomic, so selection never takes a lock. The few
//! mutexes here guard data written only on news (a failure, a state change) and are per worker.
//!
//! Whether a worker may take a new request is a set of independent flags, one per source of
//! truth, combined in one documented precedence order (see [`Worker::status`] and the README):
//! admin remove > admin drain > registry draining > unreachable > active health down > passive
//! ejection. Sources never overwrite each other; undraining a worker brings back whatever the
//! lower layers say.
//!
//! Two kinds of "not healthy" are kept apart on purpose. *Unreachable* is a hard fact: the last
//! connection attempt was refused (nothing listens on the port) or had no route, so a request sent
//! there cannot be served. *Down* and *ejected* are judgements from checks and traffic (timeouts,
//! 5xx) that can be wrong across the board; only those may be overridden by panic mode.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::ewma::PeakEwma;
use super::latency::WorkerLatency;
use super::passive::{Breaker, BreakerState, Transition};

/// Removed by an operator (or gone from the registry): never routed again.
pub const REMOVED: u32 = 1;
/// Drained by an operator.
pub const ADMIN_DRAIN: u32 = 1 << 1;
/// The worker announced draining in the registry.
pub const REGISTRY_DRAIN: u32 = 1 << 2;
/// Active checks say the worker is down.
pub const ACTIVE_DOWN: u32 = 1 << 3;
/// Passive checks ejected the worker.
pub const EJECTED: u32 = 1 << 4;
/// The last connect (a request's or a health check's) was refused or had no route: nothing
/// serves there. Cleared by the next successful connect of a health check.
pub const UNREACHABLE: u32 = 1 << 5;
/// Flags that keep new requests away whatever else holds.
pub const NOT_ROUTABLE: u32 = REMOVED | ADMIN_DRAIN | REGISTRY_DRAIN;
/// Flags that keep new requests away even in panic mode: an operator's or the worker's own word,
/// or a refused connection.
pub const NEVER_ROUTED: u32 = NOT_ROUTABLE | UNREACHABLE;
/// Flags that the panic threshold may override (judgements, not facts).
pub const UNHEALTHY: u32 = ACTIVE_DOWN | EJECTED;

/// Where a worker's entry came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The static `workers` list.
    Static,
    /// The Redis registry; `started_ms` tells one incarnation from the next.
    Registry {
        /// The record's start time.
        started_ms: u64,
    },
}

/// The state shown to operators: the highest-precedence flag that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Removed; kept only until in-flight requests finish.
    Removed,
    /// Drained by an operator.
    Drained,
    /// Draining by its own announcement.
    Draining,
    /// Refusing connections (or no route to it).
    Unreachable,
    /// Failing active checks.
    Down,
    /// Ejected by passive checks.
    Ejected,
    /// Healthy but still ramping up.
    SlowStart,
    /// Healthy.
    Healthy,
}

impl Status {
    /// The name used in logs, metrics and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Removed => "removed",
            Status::Drained => "drained",
            Status::Draining => "draining",
            Status::Unreachable => "unreachable",
            Status::Down => "down",
            Status::Ejected => "ejected",
            Status::SlowStart => "slow_start",
            Status::Healthy => "healthy",
        }
    }
}

/// The last change of a worker's routing state, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What changed (e.g. `down`, `ejected`, `drained`).
    pub what: String,
    /// Why.
    pub reason: String,
}

/// Response status classes counted per worker (1xx … 5xx, plus transport errors).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Per-worker counters, exposed in the admin API and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Responses by class, index as in [`CLASSES`].
    pub responses: [AtomicU64; 6],
    /// Passive ejections.
    pub ejections: AtomicU64,
    /// Failed active checks.
    pub check_failures: AtomicU64,
}

/// Static facts about a worker, from config or the registry.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Id (registry id, or `host:port` for static workers).
    pub id: String,
    /// `host:port`.
    pub addr: String,
    /// Machine name, when the registry told us.
    pub machine: String,
    /// Relative weight.
    pub weight: u32,
    /// Where it came from.
    pub origin: Origin,
}

/// A worker and everything the gateway tracks about it.
#[derive(Debug)]
pub struct Worker {
    /// Static facts.
    pub spec: WorkerSpec,
    /// `addr` parsed once for building upstream URIs.
    pub authority: http::uri::Authority,
    flags: AtomicU32,
    in_flight: AtomicU32,
    weight: AtomicU32,
    /// Latency estimate.
    pub ewma: PeakEwma,
    /// Sampled answer latencies, for the dashboard's p50/p99.
    pub latency: WorkerLatency,
    /// Start of the current slow start (clock nanoseconds); 0 when none.
    slow_start_since: AtomicU64,
    /// When the worker last answered a request (clock nanoseconds); 0 before its first answer.
    answered_at: AtomicU64,
    /// Failures in a row, mirrored from the breaker so successes skip the lock.
    failure_streak: AtomicU32,
    /// End of the passive ejection (clock nanoseconds), mirrored so the due check skips the lock.
    probe_at: AtomicU64,
    breaker: Mutex<Breaker>,
    last_change: Mutex<Change>,
    /// Counters.
    pub counters: Counters,
    /// Cancels this worker's health-check task when it is removed.
    pub cancel: CancellationToken,
    /// Idle keep-alive connections of the request path.
    pub pool: std::sync::Arc<crate::upstream::Pool>,
}

impl Worker {
    /// A new worker, healthy, in slow start from `now` (clock nanoseconds).
    pub fn new(
        spec: WorkerSpec,
        authority: http::uri::Authority,
        breaker: Breaker,
        ewma: PeakEwma,
        now: u64,
    ) -> Self {
        let weight = spec.weight.max(1);
        Worker {
            spec,
            authority,
            flags: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            weight: AtomicU32::new(weight),
            ewma,
            latency: WorkerLatency::default(),
            slow_start_since: AtomicU64::new(now.max(1)),
            answered_at: AtomicU64::new(0),
            failure_streak: AtomicU32::new(0),
            probe_at: AtomicU64::new(u64::MAX),
            breaker: Mutex::new(breaker),
            last_change: Mutex::new(Change {
                at_ms: unix_ms(),
                what: "added".into(),
                reason: "joined".into(),
            }),
            counters: Counters::default(),
            cancel: CancellationToken::new(),
            pool: std::sync::Arc::default(),
        }
    }

    /// The same worker with `pool` for its idle connections (one shard per serving thread).
    pub fn with_pool(mut self, pool: crate::upstream::Pool) -> Self {
        self.pool = std::sync::Arc::new(pool);
        self
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// Current flags.
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// Sets or clears one flag; returns whether it changed.
    pub fn set_flag(&self, flag: u32, on: bool) -> bool {
        let before = if on {
            self.flags.fetch_or(flag, Ordering::AcqRel)
        } else {
            self.flags.fetch_and(!flag, Ordering::AcqRel)
        };
        (before & flag != 0) != on
    }

    /// Requests in flight to this worker.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in; the returned guard counts it out when dropped.
    pub fn begin(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            worker: self.clone(),
        }
    }

    /// Relative weight.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Updates the weight (the registry may change it).
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// Restarts slow start at `now`.
    pub fn start_slow_start(&self, now: u64) {
        self.slow_start_since.store(now.max(1), Ordering::Relaxed);
    }

    /// Share of its fair traffic the worker should get at `now`: from `min` up to 1 over `window`.
    #[inline]
    pub fn slow_start_factor(&self, now: u64, window_ns: u64, min: f64) -> f64 {
        let since = self.slow_start_since.load(Ordering::Relaxed);
        if since == 0 || window_ns == 0 {
            return 1.0;
        }
        let elapsed = now.saturating_sub(since);
        if elapsed >= window_ns {
            // Over: skip this arithmetic from now on.
            self.slow_start_since.store(0, Ordering::Relaxed);
            return 1.0;
        }
        (elapsed as f64 / window_ns as f64).max(min)
    }

    /// Whether the worker is still ramping up.
    pub fn in_slow_start(&self, now: u64, window_ns: u64) -> bool {
        let since = self.slow_start_since.load(Ordering::Relaxed);
        since != 0 && now.saturating_sub(since) < window_ns
    }

    /// Whether an ejected worker's probe is due (cheap check before claiming it).
    #[inline]
    pub fn probe_due(&self, now: u64) -> bool {
        now >= self.probe_at.load(Ordering::Relaxed)
    }

    /// Claims the single probe of an ejected worker.
    pub fn start_probe(&self, now: u64) -> bool {
        let mut breaker = self.breaker.lock().unwrap();
        let claimed = breaker.start_probe(now);
        if claimed {
            self.probe_at.store(u64::MAX, Ordering::Relaxed);
        }
        claimed
    }

    /// Feeds a request's outcome to the passive breaker. Returns a transition when there is one.
    pub fn record_outcome(&self, ok: bool, now: u64) -> Option<Transition> {
        if ok && self.failure_streak.load(Ordering::Relaxed) == 0 && self.flags() & EJECTED == 0 {
            // The common case: nothing to change, no lock.
            return None;
        }
        let mut breaker = self.breaker.lock().unwrap();
        let transition = if ok {
            breaker.on_success(now)
        } else {
            breaker.on_failure(now)
        };
        self.mirror(breaker);
        transition
    }

    /// Feeds a passed health check to the passive breaker: an ejected worker whose ejection is
    /// over comes back (see [`Breaker::on_check_passed`]).
    pub fn record_check_passed(&self, now: u64) -> Option<Transition> {
        if self.flags() & EJECTED == 0 {
            return None;
        }
        let mut breaker = self.breaker.lock().unwrap();
        let transition = breaker.on_check_passed(now);
        self.mirror(breaker);
        transition
    }

    /// Copies the breaker's state into the lock-free fields the request path reads.
    fn mirror(&self, breaker: std::sync::MutexGuard<'_, Breaker>) {
        self.failure_streak
            .store(breaker.failures(), Ordering::Relaxed);
        let (ejected, probe_at) = match breaker.state() {
            BreakerState::Closed => (false, u64::MAX),
            BreakerState::Ejected { until } => (true, until),
            BreakerState::Probing => (true, u64::MAX),
        };
        self.probe_at.store(probe_at, Ordering::Relaxed);
        drop(breaker);
        self.set_flag(EJECTED, ejected);
    }

    /// Clears passive state (worker re-added, or passive checks turned off).
    pub fn reset_breaker(&self, now: u64) {
        self.breaker.lock().unwrap().reset(now);
        self.failure_streak.store(0, Ordering::Relaxed);
        self.probe_at.store(u64::MAX, Ordering::Relaxed);
        self.set_flag(EJECTED, false);
    }

    /// Records a state change for the admin API.
    pub fn note_change(&self, what: &str, reason: &str) {
        *self.last_change.lock().unwrap() = Change {
            at_ms: unix_ms(),
            what: what.to_string(),
            reason: reason.to_string(),
        };
    }

    /// The last state change.
    pub fn last_change(&self) -> Change {
        self.last_change.lock().unwrap().clone()
    }

    /// The state shown to operators, by precedence.
    pub fn status(&self, now: u64, slow_start_ns: u64) -> Status {
        let flags = self.flags();
        if flags & REMOVED != 0 {
            Status::Removed
        } else if flags & ADMIN_DRAIN != 0 {
            Status::Drained
        } else if flags & REGISTRY_DRAIN != 0 {
            Status::Draining
        } else if flags & UNREACHABLE != 0 {
            Status::Unreachable
        } else if flags & ACTIVE_DOWN != 0 {
            Status::Down
        } else if flags & EJECTED != 0 {
            Status::Ejected
        } else if self.in_slow_start(now, slow_start_ns) {
            Status::SlowStart
        } else {
            Status::Healthy
        }
    }

    /// Notes that the worker answered a request at `now` (clock nanoseconds).
    #[inline]
    pub fn note_answer(&self, now: u64) {
        // A plain store, not a `fetch_max` (a locked compare-and-swap loop on every answer):
        // two threads answering at once may leave the earlier of their two times, microseconds
        // off, which no hedge delay can tell apart.
        self.answered_at.store(now, Ordering::Relaxed);
    }

    /// Whether the worker has answered any request since `since` (clock nanoseconds): a worker
    /// that has is not hung, whatever one slow request of it says.
    pub fn answered_since(&self, since: u64) -> bool {
        self.answered_at.load(Ordering::Relaxed) > since
    }

    /// Counts one response (or transport error) by class.
    #[inline]
    pub fn count_response(&self, status: Option<http::StatusCode>) {
        let index = match status {
            Some(status) => (status.as_u16() / 100).clamp(1, 5) as usize - 1,
            None => 5,
        };
        self.counters.responses[index].fetch_add(1, Ordering::Relaxed);
    }
}

/// Holds a worker's in-flight count up while a request (and its response body) is under way.
#[derive(Debug)]
pub struct InFlight {
    worker: std::sync::Arc<Worker>,
}

impl InFlight {
    /// The worker this request went to.
    pub fn worker(&self) -> &std::sync::Arc<Worker> {
        &self.worker
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.worker.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PassiveConfig;
    use std::sync::Arc;

    fn worker() -> Arc<Worker> {
        let spec = WorkerSpec {
            id: "w1".into(),
            addr: "127.0.0.1:1".into(),
            machine: String::new(),
            weight: 100,
            origin: Origin::Static,
        };
        Arc::new(Worker::new(
            spec,
            "127.0.0.1:1".parse().unwrap(),
            Breaker::new(&PassiveConfig::default()),
            PeakEwma::new(0.0, 1e9, 0),
            0,
        ))
    }

    #[test]
    fn status_follows_the_precedence_order() {
        let w = worker();
        let late = 100_000_000_000;
        assert_eq!(w.status(late, 1), Status::Healthy);
        w.set_flag(EJECTED, true);
        assert_eq!(w.status(late, 1), Status::Ejected);
        w.set_flag(ACTIVE_DOWN, true);
        assert_eq!(w.status(late, 1), Status::Down);
        w.set_flag(UNREACHABLE, true);
        assert_eq!(w.status(late, 1), Status::Unreachable);
        w.set_flag(REGISTRY_DRAIN, true);
        assert_eq!(w.status(late, 1), Status::Draining);
        w.set_flag(ADMIN_DRAIN, true);
        assert_eq!(w.status(late, 1), Status::Drained);
        w.set_flag(REMOVED, true);
        assert_eq!(w.status(late, 1), Status::Removed);
        // Lower layers are kept: undraining shows what they say.
        w.set_flag(REMOVED, false);
        w.set_flag(ADMIN_DRAIN, false);
        assert_eq!(w.status(late, 1), Status::Draining);
    }

    #[test]
    fn set_flag_reports_changes_only() {
        let w = worker();
        assert!(w.set_flag(ADMIN_DRAIN, true));
        assert!(!w.set_flag(ADMIN_DRAIN, true));
        assert!(w.set_flag(ADMIN_DRAIN, false));
        assert!(!w.set_flag(ADMIN_DRAIN, false));
    }

    #[test]
    fn in_flight_guard_counts_in_and_out() {
        let w = worker();
        let a = w.begin();
        let b = w.begin();
        assert_eq!(w.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn slow_start_ramps_from_the_minimum() {
        let w = worker();
        w.start_slow_start(1_000);
        assert_eq!(w.slow_start_factor(1_000, 10_000, 0.1), 0.1);
        assert!((w.slow_start_factor(6_000, 10_000, 0.1) - 0.5).abs() < 1e-9);
        assert_eq!(w.slow_start_factor(11_000, 10_000, 0.1), 1.0);
        assert!(!w.in_slow_start(11_000, 10_000));
    }

    #[test]
    fn outcomes_drive_the_ejected_flag() {
        let w = worker();
        assert_eq!(w.record_outcome(false, 0), None);
        assert_eq!(w.record_outcome(false, 0), None);
        assert!(matches!(
            w.record_outcome(false, 0),
            Some(Transition::Ejected(_))
        ));
        assert_ne!(w.flags() & EJECTED, 0);
        assert!(!w.probe_due(999_999_999));
        assert!(w.probe_due(2_000_000_000));
        assert!(w.start_probe(2_000_000_000));
        assert_eq!(
            w.record_outcome(true, 2_000_000_001),
            Some(Transition::Recovered)
        );
        assert_eq!(w.flags() & EJECTED, 0);
    }

    #[test]
    fn responses_are_counted_by_class() {
        let w = worker();
        w.count_response(Some(http::StatusCode::OK));
        w.count_response(Some(http::StatusCode::BAD_GATEWAY));
        w.count_response(None);
        let counts: Vec<u64> = w
            .counters
            .responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, vec![0, 1, 0, 0, 1, 1]);
    }
}
