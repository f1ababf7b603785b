//! A per-worker latency histogram for the dashboard's p50/p99, sampled so it stays off the
//! request path's costs.
//!
//! The request path already reads the time an answer took (for the peak-EWMA). One answer in
//! [`SAMPLE_EVERY`] per serving thread is also counted here: a thread-local counter on every
//! answer, and one relaxed atomic add in this worker's buckets on the sampled ones — the same
//! sampling the hedge delay uses, so no shared cache line is written by every request. Readers
//! (the dashboard, once a second) diff two snapshots of the buckets to get the quantiles of the
//! answers in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets per doubling: a quantile is known to within 2^(1/2) ≈ 41 % before interpolation.
const STEPS_PER_DOUBLING: f64 = 2.0;
/// The smallest bucket's upper bound: 100 µs.
const FIRST_BOUND_NS: f64 = 100_000.0;
/// 100 µs × 2^(40/2) ≈ 105 s; slower answers land in the last bucket.
pub const BUCKETS: usize = 40;
/// One answer in this many is sampled, per thread.
const SAMPLE_EVERY: u32 = 4;

thread_local! {
    /// Answers since this thread last sampled one.
    static SKIPPED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Sampled answer latencies of one worker, by bucket, since it was added.
#[derive(Debug)]
pub struct WorkerLatency {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for WorkerLatency {
    fn default() -> Self {
        WorkerLatency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl WorkerLatency {
    /// Counts one answer's latency, if this thread samples it.
    #[inline]
    pub fn observe(&self, waited: Duration) {
        let sampled = SKIPPED.with(|skipped| {
            let n = skipped.get() + 1;
            if n >= SAMPLE_EVERY {
                skipped.set(0);
                true
            } else {
                skipped.set(n);
                false
            }
        });
        if sampled {
            self.record(waited);
        }
    }

    /// Counts one latency unconditionally.
    fn record(&self, waited: Duration) {
        self.buckets[bucket_of(waited)].fetch_add(1, Ordering::Relaxed);
    }

    /// The bucket counts now.
    pub fn snapshot(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

fn bucket_of(waited: Duration) -> usize {
    let ratio = waited.as_nanos() as f64 / FIRST_BOUND_NS;
    if ratio <= 1.0 {
        return 0;
    }
    ((ratio.log2() * STEPS_PER_DOUBLING).ceil() as usize).min(BUCKETS - 1)
}

/// The upper bound of bucket `index`, in seconds.
fn upper_bound(index: usize) -> f64 {
    FIRST_BOUND_NS * 2f64.powf(index as f64 / STEPS_PER_DOUBLING) / 1e9
}

/// The `q` quantile (0..1) of the answers counted between two snapshots, in seconds,
/// interpolated inside its bucket; `None` when there were none.
pub fn quantile(before: &[u64; BUCKETS], after: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let delta: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (index, &count) in delta.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (below + count) as f64 >= rank {
            let low = if index == 0 {
                0.0
            } else {
                upper_bound(index - 1)
            };
            let high = upper_bound(index);
            let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
            return Some(low + (high - low) * within);
        }
        below += count;
    }
    Some(upper_bound(BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_by_half_doublings() {
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert_eq!(bucket_of(Duration::from_micros(100)), 0);
        assert_eq!(bucket_of(Duration::from_micros(141)), 1);
        assert_eq!(bucket_of(Duration::from_micros(200)), 2);
        assert_eq!(bucket_of(Duration::from_secs(1000)), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_the_answers_between_snapshots() {
        let latency = WorkerLatency::default();
        // Old answers, all slow: they must not count.
        for _ in 0..100 {
            latency.record(Duration::from_secs(2));
        }
        let before = latency.snapshot();
        for _ in 0..98 {
            latency.record(Duration::from_millis(1));
        }
        for _ in 0..2 {
            latency.record(Duration::from_millis(100));
        }
        let after = latency.snapshot();
        let p50 = quantile(&before, &after, 0.5).unwrap();
        assert!((0.0007..=0.0015).contains(&p50), "{p50}");
        let p99 = quantile(&before, &after, 0.99).unwrap();
        assert!((0.07..=0.15).contains(&p99), "{p99}");
        assert_eq!(quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn one_answer_in_four_is_sampled_per_thread() {
        let latency = WorkerLatency::default();
        for _ in 0..400 {
            latency.observe(Duration::from_millis(1));
        }
        assert_eq!(latency.snapshot().iter().sum::<u64>(), 100);
    }
}
