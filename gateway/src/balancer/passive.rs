//! Passive health (outlier detection): eject a worker after consecutive failures of real requests.
//!
//! A [`Breaker`] counts failures in a row. At the threshold it ejects the worker for a backoff
//! that doubles with each ejection (up to a maximum). When the backoff is over, exactly one
//! request is let through as a probe: its success closes the breaker, its failure ejects the
//! worker again for longer. The backoff count resets once the worker has stayed healthy for
//! `max_ejection`. The breaker is a plain state machine over explicit times, so it is tested
//! without clocks; the worker wraps it in a per-worker mutex touched only when there is news.

use std::time::Duration;

use crate::config::PassiveConfig;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// No traffic until `until` (clock nanoseconds); then one probe.
    Ejected {
        /// End of the ejection.
        until: u64,
    },
    /// One probe request is out; its outcome decides.
    Probing,
}

/// What changed after an outcome, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The worker is ejected for this long.
    Ejected(Duration),
    /// The probe succeeded; the worker is back.
    Recovered,
}

/// One worker's failure accrual.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    base_ns: u64,
    max_ns: u64,
    failures: u32,
    ejections: u32,
    state: BreakerState,
    /// When the breaker last closed (for resetting the backoff).
    closed_at: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: &PassiveConfig) -> Self {
        Breaker {
            threshold: config.consecutive_failures.max(1),
            base_ns: config.base_ejection.as_nanos() as u64,
            max_ns: config.max_ejection.as_nanos() as u64,
            failures: 0,
            ejections: 0,
            state: BreakerState::Closed,
            closed_at: 0,
        }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Length of the next ejection: base × 2^ejections, capped.
    fn backoff_ns(&self) -> u64 {
        let factor = 1u64 << self.ejections.min(30);
        self.base_ns.saturating_mul(factor).min(self.max_ns)
    }

    fn eject(&mut self, now: u64) -> Transition {
        let length = self.backoff_ns();
        self.ejections = self.ejections.saturating_add(1);
        self.failures = 0;
        self.state = BreakerState::Ejected {
            until: now.saturating_add(length),
        };
        Transition::Ejected(Duration::from_nanos(length))
    }

    /// A request to the worker succeeded.
    pub fn on_success(&mut self, now: u64) -> Option<Transition> {
        self.failures = 0;
        match self.state {
            BreakerState::Probing => {
                self.state = BreakerState::Closed;
                self.closed_at = now;
                Some(Transition::Recovered)
            }
            BreakerState::Closed => {
                if self.ejections > 0 && now.saturating_sub(self.closed_at) >= self.max_ns {
                    self.ejections = 0;
                }
                None
            }
            // A response to a request sent before the ejection: it tells nothing new.
            BreakerState::Ejected { .. } => None,
        }
    }

    /// A request to the worker failed (transport error, timeout, or a counted 5xx).
    pub fn on_failure(&mut self, now: u64) -> Option<Transition> {
        match self.state {
            BreakerState::Probing => Some(self.eject(now)),
            BreakerState::Closed => {
                self.failures += 1;
                (self.failures >= self.threshold).then(|| self.eject(now))
            }
            BreakerState::Ejected { .. } => None,
        }
    }

    /// A health check passed. Once the ejection is over this brings the worker back without
    /// waiting for a probe request, which may be long in coming when little traffic arrives —
    /// on probation: the failure count stands one short of the threshold, so its next failure
    /// ejects it again, for longer, as a failed probe would.
    pub fn on_check_passed(&mut self, now: u64) -> Option<Transition> {
        if !self.probe_due(now) {
            return None;
        }
        self.state = BreakerState::Closed;
        self.closed_at = now;
        self.failures = self.threshold - 1;
        Some(Transition::Recovered)
    }

    /// Whether the ejection is over and a probe may go (without claiming it).
    pub fn probe_due(&self, now: u64) -> bool {
        matches!(self.state, BreakerState::Ejected { until } if now >= until)
    }

    /// Claims the single probe: true for exactly one caller once the ejection is over.
    pub fn start_probe(&mut self, now: u64) -> bool {
        if self.probe_due(now) {
            self.state = BreakerState::Probing;
            true
        } else {
            false
        }
    }

    /// Forgets everything (the worker was re-added or an operator reset it).
    pub fn reset(&mut self, now: u64) {
        self.failures = 0;
        self.ejections = 0;
        self.state = BreakerState::Closed;
        self.closed_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn breaker() -> Breaker {
        Breaker::new(&PassiveConfig {
            enabled: true,
            consecutive_failures: 3,
            count_5xx: true,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(4),
        })
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let mut b = breaker();
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_success(0), None, "a success breaks the streak");
        assert_eq!(b.on_failure(0), None);
        assert_eq!(b.on_failure(0), None);
        assert_eq!(
            b.on_failure(10),
            Some(Transition::Ejected(Duration::from_secs(1)))
        );
        assert_eq!(b.state(), BreakerState::Ejected { until: 10 + SEC });
    }

    #[test]
    fn one_probe_after_the_backoff_decides() {
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(0);
        }
        assert!(!b.start_probe(SEC - 1), "no probe before the ejection ends");
        assert!(b.start_probe(SEC));
        assert!(!b.start_probe(SEC), "only one probe at a time");
        assert_eq!(b.on_success(SEC + 5), Some(Transition::Recovered));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_passed_health_check_ends_an_ejection_that_is_over_on_probation() {
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(0);
        }
        assert_eq!(
            b.on_check_passed(SEC - 1),
            None,
            "not before the ejection ends"
        );
        assert_eq!(b.on_check_passed(SEC), Some(Transition::Recovered));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.on_check_passed(SEC + 1), None, "already back");
        // On probation: one failure ejects it again, for twice as long.
        assert_eq!(
            b.on_failure(SEC + 2),
            Some(Transition::Ejected(Duration::from_secs(2)))
        );
        // A success first ends the probation: three failures again.
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(0);
        }
        b.on_check_passed(SEC);
        assert_eq!(b.on_success(SEC + 1), None);
        assert_eq!(b.on_failure(SEC + 2), None);
        assert_eq!(b.on_failure(SEC + 2), None);
        assert!(b.on_failure(SEC + 2).is_some());
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_and_resets_after_healthy_time() {
        let mut b = breaker();
        let mut now = 0;
        for _ in 0..3 {
            b.on_failure(now);
        }
        let mut lengths = vec![];
        for _ in 0..4 {
            let BreakerState::Ejected { until } = b.state() else {
                panic!("ejected")
            };
            now = until;
            assert!(b.start_probe(now));
            match b.on_failure(now) {
                Some(Transition::Ejected(length)) => lengths.push(length.as_secs()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(lengths, vec![2, 4, 4, 4]);
        // Recover, stay healthy for max_ejection: the next trip starts from the base again.
        let BreakerState::Ejected { until } = b.state() else {
            panic!()
        };
        assert!(b.start_probe(until));
        b.on_success(until);
        b.on_success(until + 4 * SEC);
        for _ in 0..2 {
            b.on_failure(until + 5 * SEC);
        }
        assert_eq!(
            b.on_failure(until + 5 * SEC),
            Some(Transition::Ejected(Duration::from_secs(1)))
        );
    }

    #[test]
    fn late_answers_during_an_ejection_change_nothing() {
        let mut b = breaker();
        for _ in 0..3 {
            b.on_failure(0);
        }
        assert_eq!(b.on_success(1), None);
        assert_eq!(b.on_failure(1), None);
        assert!(matches!(b.state(), BreakerState::Ejected { .. }));
    }
}
