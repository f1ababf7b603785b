//! Active health checks: a task per worker asks its readiness endpoint at a jittered interval.
//!
//! A worker goes down after `fall` failed checks in a row and comes back after `rise` passed ones
//! ([`HealthMachine`]); a single blip changes nothing. A check fails on a connect error, a timeout
//! or any non-2xx answer — a draining worker's 503 included, so it gets no new requests while its
//! in-flight ones finish. A worker starts as up (it is added when configured or when it announced
//! itself ready) and is checked at once, so a dead one is found within about `fall` × `interval`
//! (`timeout` more for a hung one): with the defaults, 0.5–1 s for a refused connection and
//! ≤ 1.5 s for a hung process.
//!
//! Checks must stay cheap with a thousand workers (2000 checks a second at the defaults): each
//! worker's task owns one keep-alive connection and a request prepared once ([`Session`]), and one
//! timer that bounds a check and then waits out the interval. The next check's time is moved to
//! the nearest slot of a grid all workers share (slots of 2 % of the interval, at most 10 ms, so
//! ±5 ms at the defaults), so the checks due together go out in one wake-up. A connection the
//! worker closed while idle is replaced within the check, so it is not a failure; see `conn.rs`
//! for exactly when a connection is kept. The cost, measured: `docs/health.md`.

mod conn;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::passive::Transition;
use super::worker::{ACTIVE_DOWN, Worker};
use super::{ChangeSource, Notifier};
use crate::config::HealthConfig;
pub use conn::Session;

/// Why a check did not pass: in a few words, and whether the connect was refused (nothing
/// listens there, so the worker is unreachable at once, without waiting for `fall` checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// What went wrong, for logs and the admin API.
    pub reason: String,
    /// The connection was refused or had no route.
    pub refused: bool,
}

impl From<String> for CheckFailure {
    fn from(reason: String) -> Self {
        CheckFailure {
            reason,
            refused: false,
        }
    }
}

impl From<&str> for CheckFailure {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::ops::Deref for CheckFailure {
    type Target = str;

    fn deref(&self) -> &str {
        &self.reason
    }
}

/// One health check of a worker.
pub trait Probe: Send + Sync + 'static {
    /// What one worker's checks keep from one check to the next (e.g. an open connection).
    type Session: Send + 'static;

    /// A fresh session for `worker`, made once when its checks start.
    fn session(&self, worker: &Worker) -> Self::Session;

    /// Ok when the worker is ready; otherwise why not, in a few words. The caller bounds it with
    /// the check timeout and may drop it midway.
    fn check(
        &self,
        session: &mut Self::Session,
        worker: &Worker,
    ) -> impl Future<Output = Result<(), CheckFailure>> + Send;
}

/// Counts results in a row and flips only at `rise` successes or `fall` failures.
#[derive(Debug, Clone)]
pub struct HealthMachine {
    up: bool,
    streak: u32,
    rise: u32,
    fall: u32,
}

impl HealthMachine {
    /// A machine that starts up.
    pub fn new(rise: u32, fall: u32) -> Self {
        HealthMachine {
            up: true,
            streak: 0,
            rise: rise.max(1),
            fall: fall.max(1),
        }
    }

    /// Whether the worker is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check; returns the new state when it flips.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            // Confirms the current state.
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Checks by HTTP GET of the configured path over one kept-alive connection per worker (see
/// [`Session`]); 2xx passes.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    path: String,
}

impl HttpProbe {
    /// A probe for `config` (its own connections, apart from the request path's pool).
    pub fn new(config: &HealthConfig) -> Self {
        // An unusable path was refused by config validation; "/readyz" keeps a check meaningful
        // should one slip through.
        let path = match config.path.parse::<http::uri::PathAndQuery>() {
            Ok(path) => path.as_str().to_string(),
            Err(_) => "/readyz".to_string(),
        };
        HttpProbe { path }
    }
}

impl Probe for HttpProbe {
    type Session = Session;

    fn session(&self, worker: &Worker) -> Session {
        Session::new(worker.authority.as_str(), &self.path)
    }

    async fn check(&self, session: &mut Session, _: &Worker) -> Result<(), CheckFailure> {
        session.check().await
    }
}

/// Runs the checks of one worker until its cancel token fires: the first at once, each next one
/// `interval` (± jitter) after the previous one ended, each bounded by `timeout`.
pub async fn run<P: Probe>(
    worker: Arc<Worker>,
    probe: Arc<P>,
    config: HealthConfig,
    notifier: Notifier,
) {
    // The checks run in their own task that never looks at the cancel token: polling it on every
    // wake-up (two per check) was a measurable share of the cost with a thousand workers. This
    // task wakes only when the worker is removed, and aborting the checks mid-way is safe: it
    // drops the connection with them.
    let cancel = worker.cancel.clone();
    let checks = tokio::spawn(checks(worker, probe, config, notifier));
    let abort = checks.abort_handle();
    tokio::select! {
        _ = cancel.cancelled() => abort.abort(),
        _ = checks => {}
    }
}

async fn checks<P: Probe>(
    worker: Arc<Worker>,
    probe: Arc<P>,
    config: HealthConfig,
    notifier: Notifier,
) {
    let mut machine = HealthMachine::new(config.rise, config.fall);
    let mut session = probe.session(&worker);
    // One timer for the task's whole life: it bounds a check, then waits out the interval.
    let timer = tokio::time::sleep(config.timeout);
    tokio::pin!(timer);
    let timed_out = format!(
        "no answer within {}",
        humantime_serde::re::humantime::format_duration(config.timeout)
    );
    loop {
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + config.timeout);
        let result = tokio::select! {
            biased;
            result = probe.check(&mut session, &worker) => result,
            // Dropping the check midway also drops its connection (see `Session`).
            _ = &mut timer => Err(CheckFailure::from(timed_out.clone())),
        };
        let passed = result.is_ok();
        notifier.checked(passed);
        // Reachability is a fact, not a judgement: it follows every single check.
        match &result {
            Err(failure) if failure.refused => notifier.unreachable(&worker, &failure.reason),
            Ok(()) => notifier.reachable(&worker),
            Err(_) => {}
        }
        if let Err(reason) = &result {
            worker
                .counters
                .check_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(worker = %worker.id(), reason = %reason, "health check failed");
        }
        match machine.record(result.is_ok()) {
            Some(true) => {
                worker.set_flag(ACTIVE_DOWN, false);
                let now = notifier.clock.now();
                // A worker that was down and answers again starts afresh: a passive ejection
                // from before would otherwise wait for a probe request that may be long in coming.
                worker.reset_breaker(now);
                worker.start_slow_start(now);
                let reason = format!("{} checks passed in a row", config.rise);
                notifier.changed(&worker, "healthy", ChangeSource::Active, &reason);
            }
            Some(false) => {
                worker.set_flag(ACTIVE_DOWN, true);
                let reason = format!(
                    "{} checks failed in a row, last: {}",
                    config.fall,
                    result.err().map(|f| f.reason).unwrap_or_default()
                );
                notifier.changed(&worker, "down", ChangeSource::Active, &reason);
            }
            None => {}
        }
        if passed {
            let now = notifier.clock.now();
            if let Some(Transition::Recovered) = worker.record_check_passed(now) {
                worker.start_slow_start(now);
                let reason = "ejection over and a health check passed (on probation)";
                notifier.changed(&worker, "recovered", ChangeSource::Active, reason);
            }
        }
        let delay = jittered(config.interval, config.jitter);
        timer
            .as_mut()
            .reset(on_slot(notifier.clock, delay, config.interval));
        timer.as_mut().await;
    }
}

/// `delay` from now, moved to the nearest slot of a grid shared by every worker's checks.
///
/// Why: at the defaults a thousand workers mean 2000 checks a second; left at random times, each
/// one wakes the runtime (and, over loopback, the worker) on its own. On a grid of slots of 2 %
/// of the interval (at most 10 ms) the checks due together go out in one wake-up. The shift is
/// at most half a slot (±5 ms at the defaults), well inside the ± `jitter` spread, which still
/// scatters workers over the slots.
fn on_slot(clock: super::Clock, delay: Duration, interval: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let slot = (interval / 50).min(Duration::from_millis(10)).as_nanos() as u64;
    if slot == 0 {
        return now + delay;
    }
    // The balancer's clock is the grid's origin, so all workers share it.
    let elapsed = clock.now() - 1;
    let target = elapsed + delay.as_nanos() as u64;
    let rounded = (target + slot / 2) / slot * slot;
    now + Duration::from_nanos(rounded.saturating_sub(elapsed))
}

/// `interval` spread by ±`jitter` (a fraction).
fn jittered(interval: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 {
        return interval;
    }
    let spread = rand::rng().random_range(-jitter..=jitter);
    interval.mul_f64(1.0 + spread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::ewma::PeakEwma;
    use crate::balancer::passive::Breaker;
    use crate::balancer::worker::{Origin, WorkerSpec};
    use crate::balancer::{Clock, Status};
    use crate::config::PassiveConfig;
    use crate::metrics::Metrics;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    #[test]
    fn flips_only_after_rise_or_fall_in_a_row() {
        let mut m = HealthMachine::new(2, 3);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None, "a success resets the streak");
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(false), Some(false));
        assert!(!m.is_up());
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(false), None);
        assert_eq!(m.record(true), None);
        assert_eq!(m.record(true), Some(true));
    }

    #[test]
    fn jitter_stays_in_bounds() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000), 0.1);
            assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        }
        assert_eq!(
            jittered(Duration::from_secs(1), 0.0),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn next_checks_land_on_a_shared_grid_near_their_time() {
        let clock = Clock::new();
        let interval = Duration::from_millis(500);
        tokio::time::advance(Duration::from_micros(123_456)).await;
        for delay_ms in [450, 473, 500, 527, 550] {
            let delay = Duration::from_millis(delay_ms);
            let at = on_slot(clock, delay, interval);
            let from_origin = (at - tokio::time::Instant::now()) + Duration::from_micros(123_456);
            assert_eq!(from_origin.as_nanos() % 10_000_000, 0, "on the 10 ms grid");
            let shift =
                (at - tokio::time::Instant::now()).as_nanos() as i64 - delay.as_nanos() as i64;
            assert!(
                shift.abs() <= 5_000_000,
                "moved by at most half a slot: {shift} ns"
            );
        }
        // Short intervals get proportionally fine slots.
        let at = on_slot(clock, Duration::from_millis(20), Duration::from_millis(20));
        let off = (at - tokio::time::Instant::now()).as_micros() as i64 - 20_000;
        assert!(off.abs() <= 200, "{off} µs");
    }

    /// A probe whose answer the test switches, counting calls.
    struct Switch {
        healthy: AtomicBool,
        calls: AtomicU32,
    }

    impl Probe for Switch {
        type Session = ();

        fn session(&self, _: &Worker) {}

        async fn check(&self, _: &mut (), _: &Worker) -> Result<(), CheckFailure> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.healthy.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("answered 503".into())
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_worker_goes_down_after_fall_intervals_and_back_after_rise() {
        let clock = Clock::new();
        let worker = Arc::new(Worker::new(
            WorkerSpec {
                id: "w".into(),
                addr: "127.0.0.1:1".into(),
                machine: String::new(),
                weight: 1,
                origin: Origin::Static,
            },
            "127.0.0.1:1".parse().unwrap(),
            Breaker::new(&PassiveConfig::default()),
            PeakEwma::new(0.0, 1e9, 0),
            clock.now(),
        ));
        let probe = Arc::new(Switch {
            healthy: AtomicBool::new(false),
            calls: AtomicU32::new(0),
        });
        let config = HealthConfig {
            interval: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            jitter: 0.0,
            ..HealthConfig::default()
        };
        let notifier = Notifier::new(Arc::new(Metrics::new()), clock);
        let task = tokio::spawn(run(worker.clone(), probe.clone(), config, notifier));

        // Passive checks ejected it as well; coming back through active checks clears that.
        for _ in 0..3 {
            worker.record_outcome(false, clock.now());
        }
        // Checks at t=0 and t=500ms fail: down right after the second one.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(worker.flags() & ACTIVE_DOWN, 0, "one failure is not enough");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_ne!(worker.flags() & ACTIVE_DOWN, 0);
        assert_eq!(worker.status(clock.now(), 0), Status::Down);
        assert_eq!(probe.calls.load(Ordering::SeqCst), 2);

        // Healthy again: back after two more checks (t=1000, t=1500).
        probe.healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_ne!(worker.flags() & ACTIVE_DOWN, 0, "one success is not enough");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(worker.flags() & ACTIVE_DOWN, 0);
        assert_eq!(worker.last_change().what, "healthy");
        assert_eq!(worker.status(clock.now(), 0), Status::Healthy);

        // Cancelling stops the task.
        worker.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("task ends")
            .unwrap();
    }

    fn worker_at(addr: &str, clock: Clock) -> Arc<Worker> {
        Arc::new(Worker::new(
            WorkerSpec {
                id: "w".into(),
                addr: addr.into(),
                machine: String::new(),
                weight: 1,
                origin: Origin::Static,
            },
            addr.parse().unwrap(),
            Breaker::new(&PassiveConfig::default()),
            PeakEwma::new(0.0, 1e9, 0),
            clock.now(),
        ))
    }

    /// Real time and real sockets, with short intervals: the probe against a scripted worker.
    async fn run_against(
        fake: &conn::tests::Fake,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> (Arc<Worker>, tokio::task::JoinHandle<()>) {
        let clock = Clock::new();
        let worker = worker_at(&fake.addr.to_string(), clock);
        let config = HealthConfig {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 2,
            jitter: 0.0,
            ..HealthConfig::default()
        };
        let probe = Arc::new(HttpProbe::new(&config));
        let notifier = Notifier::new(Arc::new(Metrics::new()), clock);
        let task = tokio::spawn(run(worker.clone(), probe, config, notifier));
        (worker, task)
    }

    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn checks_share_one_kept_alive_connection() {
        use conn::tests::{Fake, Reply};
        let fake =
            Fake::start(|_| Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")).await;
        let (worker, task) = run_against(&fake, 10, 500).await;
        until("20 checks", || fake.requests.load(Ordering::SeqCst) >= 20).await;
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(worker.flags() & ACTIVE_DOWN, 0);
        assert_eq!(worker.counters.check_failures.load(Ordering::Relaxed), 0);
        worker.cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_503_takes_the_worker_down_and_a_200_brings_it_back() {
        use conn::tests::{Fake, Reply};
        let answers = Arc::new(AtomicBool::new(false));
        let draining = answers.clone();
        let fake = Fake::start(move |_| {
            Reply::Answer(if draining.load(Ordering::SeqCst) {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\ndraining\n"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n"
            })
        })
        .await;
        let (worker, task) = run_against(&fake, 20, 500).await;
        until("first check", || fake.requests.load(Ordering::SeqCst) >= 1).await;
        answers.store(true, Ordering::SeqCst);
        until("down", || worker.flags() & ACTIVE_DOWN != 0).await;
        let change = worker.last_change();
        assert_eq!(change.what, "down");
        assert!(
            change.reason.ends_with("last: answered 503"),
            "{}",
            change.reason
        );
        answers.store(false, Ordering::SeqCst);
        until("back", || worker.flags() & ACTIVE_DOWN == 0).await;
        assert_eq!(
            fake.accepted.load(Ordering::SeqCst),
            1,
            "a non-2xx keeps the connection"
        );
        worker.cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_hung_worker_goes_down_by_timeouts() {
        use conn::tests::{Fake, Reply};
        let fake = Fake::start(|_| Reply::Hang).await;
        let started = tokio::time::Instant::now();
        let (worker, task) = run_against(&fake, 20, 100).await;
        until("down", || worker.flags() & ACTIVE_DOWN != 0).await;
        assert!(
            started.elapsed() >= Duration::from_millis(220),
            "down after two timed-out checks and one interval, not sooner: {:?}",
            started.elapsed()
        );
        let change = worker.last_change();
        assert!(
            change.reason.ends_with("last: no answer within 100ms"),
            "{}",
            change.reason
        );
        assert!(
            fake.accepted.load(Ordering::SeqCst) >= 2,
            "a timed-out check leaves its connection behind"
        );
        // Removal stops the task even in the middle of a check.
        worker.cancel.cancel();
        tokio::time::timeout(Duration::from_millis(50), task)
            .await
            .expect("stops at once")
            .unwrap();
    }

    #[tokio::test]
    async fn garbage_is_a_failed_check() {
        use conn::tests::{Fake, Reply};
        let fake = Fake::start(|_| Reply::AnswerAndClose(b"\x16\x03\x01\x00\xa5 not http")).await;
        let (worker, task) = run_against(&fake, 10, 500).await;
        until("down", || worker.flags() & ACTIVE_DOWN != 0).await;
        let change = worker.last_change();
        assert!(
            change.reason.contains("invalid HTTP answer"),
            "{}",
            change.reason
        );
        worker.cancel.cancel();
        task.await.unwrap();
    }
}
