//! Hedging: when a worker has not answered an idempotent request within the hedge delay, the
//! same request also goes to another worker and the first answer wins ("The Tail at Scale",
//! Dean & Barroso). A hung worker (SIGSTOP, a stuck GC, a lost packet) then costs a user the
//! hedge delay instead of `timeouts.response_header`.
//!
//! The delay follows what the gateway measures: `factor` × the p99 of the time from sending a
//! request to its response head, over the last window of answers, kept between `min_delay` and
//! `max_delay` (or fixed by `delay`). Until a window has enough answers the delay is `max_delay`;
//! the first window (a fresh gateway, or a standby that just took over) samples every answer and
//! closes as soon as it has enough, so a hung worker costs users `max_delay` for a moment only.
//! Each hedge spends one token of the retry budget, so a slow cluster is never doubled.
//!
//! Cost on the request path: one relaxed atomic add per answer (its latency bucket), and once per
//! window a pass over the buckets by whichever request closes it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::HedgingConfig;

/// Buckets per doubling of latency: p99 is known to within 2^(1/4) ≈ 19 %.
const STEPS_PER_DOUBLING: f64 = 4.0;
/// The smallest bucket's upper bound.
const FIRST_BOUND_NS: f64 = 100_000.0;
/// 100 µs × 2^(80/4) ≈ 105 s: everything slower lands in the last bucket.
const BUCKETS: usize = 80;
/// Sampled answers a window needs before its p99 is trusted.
const MIN_WINDOW: u64 = 64;
/// A window closes after this many sampled answers, or after `WINDOW_TIME` with at least
/// `MIN_WINDOW`.
const MAX_WINDOW: u64 = 5_000;
const WINDOW_TIME: Duration = Duration::from_secs(1);

/// One answer in this many is sampled, per thread.
const SAMPLE_EVERY: u32 = 4;

thread_local! {
    /// Answers since this thread last sampled one.
    static SKIPPED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// When to hedge, learnt from answer latencies. One per gateway.
#[derive(Debug)]
pub struct Hedging {
    enabled: bool,
    fixed: Option<Duration>,
    factor: f64,
    min: Duration,
    max: Duration,
    /// Answers per latency bucket since the gateway started.
    buckets: [AtomicU64; BUCKETS],
    answers: AtomicU64,
    /// A window has closed: the delay is measured, not `max_delay`.
    warm: AtomicBool,
    /// The current delay in nanoseconds (shared with the metrics; 0 when hedging is off).
    delay_ns: Arc<AtomicU64>,
    /// The bucket counts and time at the start of the current window.
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: [u64; BUCKETS],
    answers: u64,
    since: tokio::time::Instant,
}

impl Hedging {
    /// A policy for `config`.
    pub fn new(config: &HedgingConfig) -> Self {
        let max = config.max_delay.max(config.min_delay);
        Hedging {
            enabled: config.enabled,
            fixed: (!config.delay.is_zero()).then_some(config.delay),
            factor: config.factor,
            min: config.min_delay,
            max,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            answers: AtomicU64::new(0),
            warm: AtomicBool::new(false),
            delay_ns: Arc::new(AtomicU64::new(if !config.enabled {
                0
            } else if !config.delay.is_zero() {
                config.delay.as_nanos() as u64
            } else {
                max.as_nanos() as u64
            })),
            window: Mutex::new(Window {
                start: [0; BUCKETS],
                answers: 0,
                since: tokio::time::Instant::now(),
            }),
        }
    }

    /// The current delay in nanoseconds, for `herd_gateway_hedge_delay_seconds`.
    pub fn delay_handle(&self) -> Arc<AtomicU64> {
        self.delay_ns.clone()
    }

    /// The delay after which a request still waiting for its worker is hedged; `None` when
    /// hedging is off.
    #[inline]
    pub fn delay(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        Some(
            self.fixed
                .unwrap_or_else(|| Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))),
        )
    }

    /// Records the time from sending a request to its response head: one answer in
    /// [`SAMPLE_EVERY`] per serving thread, so the shared counters are not written by every
    /// request of every thread (cache lines bouncing between cores cost more than the count);
    /// every answer until the first window closes.
    #[inline]
    pub fn observe(&self, latency: Duration) {
        if !self.enabled || self.fixed.is_some() {
            return;
        }
        let sampled = !self.warm.load(Ordering::Relaxed)
            || SKIPPED.with(|skipped| {
                let next = skipped.get() + 1;
                skipped.set(next % SAMPLE_EVERY);
                next == SAMPLE_EVERY
            });
        if !sampled {
            return;
        }
        self.buckets[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let answers = self.answers.fetch_add(1, Ordering::Relaxed) + 1;
        if answers.is_multiple_of(16) {
            self.maybe_close_window(answers);
        }
    }

    fn maybe_close_window(&self, answers: u64) {
        // Another request is closing it: nothing to do.
        let Ok(mut window) = self.window.try_lock() else {
            return;
        };
        let in_window = answers - window.answers;
        // The first window closes as soon as it can: any measure beats `max_delay`.
        let timely = !self.warm.load(Ordering::Relaxed) || window.since.elapsed() >= WINDOW_TIME;
        if in_window < MIN_WINDOW || (in_window < MAX_WINDOW && !timely) {
            return;
        }
        let now: [u64; BUCKETS] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let counts: [u64; BUCKETS] = std::array::from_fn(|i| now[i] - window.start[i]);
        if let Some(p99) = quantile(&counts, 0.99) {
            let delay = p99.mul_f64(self.factor).clamp(self.min, self.max);
            self.delay_ns
                .store(delay.as_nanos() as u64, Ordering::Relaxed);
            self.warm.store(true, Ordering::Relaxed);
        }
        *window = Window {
            start: now,
            answers,
            since: tokio::time::Instant::now(),
        };
    }
}

/// The bucket of `latency`: bucket i holds latencies up to FIRST_BOUND × 2^(i/4).
fn bucket(latency: Duration) -> usize {
    let ns = latency.as_nanos() as f64;
    if ns <= FIRST_BOUND_NS {
        return 0;
    }
    let index = ((ns / FIRST_BOUND_NS).log2() * STEPS_PER_DOUBLING).ceil() as usize;
    index.min(BUCKETS - 1)
}

/// The upper bound of bucket `index`.
fn upper_bound(index: usize) -> Duration {
    Duration::from_nanos((FIRST_BOUND_NS * 2f64.powf(index as f64 / STEPS_PER_DOUBLING)) as u64)
}

/// The `q` quantile of the counted latencies (the upper bound of its bucket).
fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(upper_bound(index));
        }
    }
    Some(upper_bound(BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> HedgingConfig {
        HedgingConfig {
            enabled: true,
            delay: Duration::ZERO,
            factor: 2.0,
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_secs(1),
        }
    }

    #[test]
    fn buckets_are_ordered_and_bounded() {
        assert_eq!(bucket(Duration::from_micros(50)), 0);
        assert_eq!(bucket(Duration::from_micros(100)), 0);
        let ms = bucket(Duration::from_millis(1));
        assert!(upper_bound(ms) >= Duration::from_millis(1));
        assert!(upper_bound(ms - 1) < Duration::from_millis(1));
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }

    #[test]
    fn the_delay_is_the_measured_p99_times_the_factor_within_bounds() {
        let hedging = Hedging::new(&config());
        assert_eq!(hedging.delay(), Some(Duration::from_secs(1)), "cold: max");
        // 5000 answers: 98 % at 10 ms, 2 % at 40 ms → p99 ≈ 40 ms, delay ≈ 80 ms.
        for i in 0..5_000 * SAMPLE_EVERY {
            // Whole sampling rounds alike, so sampling keeps the 2 %.
            let round = i / SAMPLE_EVERY;
            let ms = if round % 50 < 2 { 40 } else { 10 };
            hedging.observe(Duration::from_millis(ms));
            hedging.observe(Duration::from_millis(ms));
        }
        let delay = hedging.delay().unwrap();
        assert!(
            delay >= Duration::from_millis(80) && delay <= Duration::from_millis(96),
            "{delay:?}"
        );
        // Fast answers: the floor holds.
        for _ in 0..10_000 * SAMPLE_EVERY {
            hedging.observe(Duration::from_micros(300));
        }
        assert_eq!(hedging.delay(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn a_cold_gateway_measures_its_delay_from_its_first_answers() {
        let hedging = Hedging::new(&config());
        // 64 answers at once (a standby that just took over): no second to wait, every one
        // counted.
        for _ in 0..MIN_WINDOW {
            hedging.observe(Duration::from_millis(15));
        }
        let delay = hedging.delay().unwrap();
        assert!(
            delay >= Duration::from_millis(30) && delay <= Duration::from_millis(36),
            "{delay:?}"
        );
        // From then on, one answer in SAMPLE_EVERY and windows of a second.
        for _ in 0..MIN_WINDOW {
            hedging.observe(Duration::from_millis(100));
        }
        assert_eq!(
            hedging.delay(),
            Some(delay),
            "a warm window waits its second"
        );
    }

    #[test]
    fn off_or_fixed() {
        let off = Hedging::new(&HedgingConfig {
            enabled: false,
            ..config()
        });
        assert_eq!(off.delay(), None);
        let fixed = Hedging::new(&HedgingConfig {
            delay: Duration::from_millis(150),
            ..config()
        });
        for _ in 0..10_000 {
            fixed.observe(Duration::from_millis(1));
        }
        assert_eq!(fixed.delay(), Some(Duration::from_millis(150)));
    }
}
