//! Counting requests for the drain: how many are in flight and when the last one arrived.
//!
//! On SIGTERM the worker keeps serving until no new request has arrived for `drain.quiet` (and at
//! least `drain.min` has passed, so every gateway has seen the drain notice), bounded by
//! `drain.max`. Health checks are not counted: gateways keep polling `/readyz` while a worker
//! drains, and that must not hold it up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::time::Instant;

use crate::config::DrainConfig;

/// Requests in flight and the time of the latest arrival.
#[derive(Debug)]
pub struct Traffic {
    epoch: Instant,
    /// Milliseconds after `epoch` of the latest request arrival.
    last_arrival_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            epoch: Instant::now(),
            last_arrival_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Traffic {
    /// Records that a request arrived.
    pub fn arrived(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_arrival_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Counts a request to `path` as arrived, and in flight until the guard is dropped (also
    /// when the client went away first). Health checks are not counted: `None`.
    pub(crate) fn enter(&self, path: &str) -> Option<InFlight<'_>> {
        if crate::health::is_check(path) {
            return None;
        }
        self.arrived();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight(self))
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn last_arrival(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_arrival_ms.load(Ordering::Relaxed))
    }

    /// Returns once the drain may stop taking requests: `min` after `started`, and no arrival for
    /// `quiet`; or `max` after `started`, whatever.
    pub async fn wait_quiet(&self, config: &DrainConfig, started: Instant) {
        let deadline = started + config.max;
        loop {
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(in_flight = self.in_flight(), "drain: maximum time reached");
                return;
            }
            let earliest = (started + config.min).max(self.last_arrival() + config.quiet);
            if now >= earliest {
                return;
            }
            tokio::time::sleep_until(earliest.min(deadline)).await;
        }
    }
}

/// One request in flight (see [`Traffic::enter`]).
pub(crate) struct InFlight<'a>(&'a Traffic);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn config() -> DrainConfig {
        DrainConfig {
            min: Duration::from_secs(2),
            quiet: Duration::from_millis(500),
            max: Duration::from_secs(10),
            in_flight_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_request_is_in_flight_until_its_guard_drops_and_health_checks_are_not_counted() {
        let traffic = Traffic::default();
        assert!(traffic.enter("/healthz").is_none());
        assert!(traffic.enter("/readyz").is_none());
        assert_eq!(traffic.last_arrival_ms.load(Ordering::Relaxed), 0);
        let first = traffic.enter("/me");
        let second = traffic.enter("/cart");
        assert_eq!(traffic.in_flight(), 2);
        drop(first);
        assert_eq!(traffic.in_flight(), 1);
        drop(second);
        assert_eq!(traffic.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_worker_waits_the_minimum() {
        let traffic = Traffic::default();
        let started = Instant::now();
        traffic.wait_quiet(&config(), started).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn arrivals_extend_the_drain_until_quiet() {
        let traffic = Arc::new(Traffic::default());
        let started = Instant::now();
        let feeder = {
            let traffic = traffic.clone();
            tokio::spawn(async move {
                // A request every 300 ms for 3 s: never quiet for 500 ms meanwhile.
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    traffic.arrived();
                }
            })
        };
        traffic.wait_quiet(&config(), started).await;
        feeder.await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(3_500), "{waited:?}");
        assert!(waited <= Duration::from_millis(3_600), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_maximum_bounds_a_busy_drain() {
        let traffic = Arc::new(Traffic::default());
        let started = Instant::now();
        let feeder = {
            let traffic = traffic.clone();
            tokio::spawn(async move {
                for _ in 0..1_000 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    traffic.arrived();
                }
            })
        };
        traffic.wait_quiet(&config(), started).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        feeder.abort();
    }
}
