//! Active health checks: a task per worker asks its readiness endpoint at a jittered interval.
//!
//! A worker goes down after `fall` failed checks in a row and comes back after `rise` passed ones
//! ([`HealthMachine`]); a single blip changes nothing. A check fails on a connect error, a timeout
//! or any non-2xx answer — a draining worker's 503 included, so it gets no new requests while its
//! in-flight ones finish. A worker starts as up (it is added when configured or when it announced
//! itself ready) and is checked at once, so a dead one is found within about `fall` × `interval`
//! (`timeout` more for a hung one): with the defaults, 0.5–1 s for a refused connection and
//! ≤ 1.5 s for a hung process.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;

use super::worker::{ACTIVE_DOWN, Worker};
use super::{ChangeSource, Notifier};
use crate::config::HealthConfig;

/// One health check of a worker.
pub trait Probe: Send + Sync + 'static {
    /// Ok when the worker is ready; otherwise why not, in a few words.
    fn check(&self, worker: &Worker) -> impl Future<Output = Result<(), String>> + Send;
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

/// Checks by HTTP GET of the configured path; 2xx within the timeout passes.
#[derive(Debug, Clone)]
pub struct HttpProbe {
    client: Client<HttpConnector, Empty<Bytes>>,
    path: http::uri::PathAndQuery,
    timeout: Duration,
}

impl HttpProbe {
    /// A probe for `config` (its own connection pool, apart from the request path's).
    pub fn new(config: &HealthConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.interval * 4)
            .pool_max_idle_per_host(1)
            .build(connector);
        HttpProbe {
            client,
            path: config
                .path
                .parse()
                .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/readyz")),
            timeout: config.timeout,
        }
    }
}

impl Probe for HttpProbe {
    async fn check(&self, worker: &Worker) -> Result<(), String> {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(worker.authority.clone())
            .path_and_query(self.path.clone())
            .build()
            .map_err(|e| format!("bad check URI: {e}"))?;
        let request = http::Request::get(uri)
            .header(http::header::USER_AGENT, "herd-gateway-health")
            .body(Empty::new())
            .map_err(|e| format!("bad check request: {e}"))?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Err(_) => Err(format!(
                "no answer within {}",
                humantime_serde::re::humantime::format_duration(self.timeout)
            )),
            Ok(Err(error)) if error.is_connect() => Err("connection failed".into()),
            Ok(Err(error)) => Err(format!("request failed: {}", root_cause(&error))),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("answered {}", response.status().as_u16())),
        }
    }
}

/// The innermost error's message.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Runs the checks of one worker until its cancel token fires.
pub async fn run<P: Probe>(
    worker: Arc<Worker>,
    probe: Arc<P>,
    config: HealthConfig,
    notifier: Notifier,
) {
    let mut machine = HealthMachine::new(config.rise, config.fall);
    let cancel = worker.cancel.clone();
    loop {
        let result = tokio::select! {
            result = probe.check(&worker) => result,
            _ = cancel.cancelled() => return,
        };
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
                    result.err().unwrap_or_default()
                );
                notifier.changed(&worker, "down", ChangeSource::Active, &reason);
            }
            None => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(config.interval, config.jitter)) => {}
            _ = cancel.cancelled() => return,
        }
    }
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

    /// A probe whose answer the test switches, counting calls.
    struct Switch {
        healthy: AtomicBool,
        calls: AtomicU32,
    }

    impl Probe for Switch {
        async fn check(&self, _: &Worker) -> Result<(), String> {
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
}
