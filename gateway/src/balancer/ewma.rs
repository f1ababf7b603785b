//! Peak-EWMA latency estimate of one worker, lock-free.
//!
//! The estimate jumps up at once to a slower observation (the "peak") and decays towards faster
//! ones with the time constant `decay`; while a worker gets no responses, its estimate decays
//! towards zero, so an idle worker is eventually tried again (as in Finagle, linkerd and tower).
//! Updates from concurrent responses may race; losing one of them costs only a little accuracy,
//! never correctness, which is why plain atomics are enough.

use std::sync::atomic::{AtomicU64, Ordering};

/// A peak-EWMA estimate in nanoseconds, updated from response latencies.
#[derive(Debug)]
pub struct PeakEwma {
    /// `f64` bits of the estimate, in nanoseconds.
    estimate: AtomicU64,
    /// When the estimate was last updated, in the balancer clock's nanoseconds.
    updated_at: AtomicU64,
    /// Decay time constant in nanoseconds.
    decay_ns: f64,
}

impl PeakEwma {
    /// A new estimate starting at `initial_ns` at time `now`.
    pub fn new(initial_ns: f64, decay_ns: f64, now: u64) -> Self {
        PeakEwma {
            estimate: AtomicU64::new(initial_ns.to_bits()),
            updated_at: AtomicU64::new(now),
            decay_ns,
        }
    }

    /// The estimate at `now`, decayed since its last update.
    pub fn get(&self, now: u64) -> f64 {
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.updated_at.load(Ordering::Relaxed)) as f64;
        estimate * (-elapsed / self.decay_ns).exp()
    }

    /// Folds in one observed latency.
    pub fn observe(&self, rtt_ns: f64, now: u64) {
        let previous = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.updated_at.load(Ordering::Relaxed)) as f64;
        let next = if rtt_ns > previous {
            rtt_ns
        } else {
            let weight = (-elapsed / self.decay_ns).exp();
            previous * weight + rtt_ns * (1.0 - weight)
        };
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.updated_at.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1_000_000.0;
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn jumps_to_a_peak_and_decays_slowly() {
        let ewma = PeakEwma::new(1.0 * MS, 10.0 * SEC as f64, 0);
        ewma.observe(50.0 * MS, 1);
        assert!((ewma.get(1) - 50.0 * MS).abs() < 1.0);
        // A fast answer right after moves the estimate only a little: the peak sticks.
        ewma.observe(1.0 * MS, 2);
        assert!(ewma.get(2) > 49.0 * MS);
        // After a long quiet time the estimate has decayed towards zero.
        assert!(ewma.get(60 * SEC) < 1.0 * MS);
    }

    #[test]
    fn converges_towards_steady_observations() {
        let ewma = PeakEwma::new(20.0 * MS, SEC as f64, 0);
        for step in 1..=100 {
            ewma.observe(2.0 * MS, step * SEC / 10);
        }
        let value = ewma.get(10 * SEC);
        assert!((value - 2.0 * MS).abs() < 0.1 * MS, "{value}");
    }
}
