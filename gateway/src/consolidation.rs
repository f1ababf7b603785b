//! How many serving threads take the load (`adaptive_threads`): as few as it needs.
//!
//! Two threads that each see half the traffic each go to sleep and wake up about twice as
//! often as one thread with all of it, and on a small machine shared with workers a sleep and
//! the wake-up after it cost more than the requests between them: on the session route one
//! thread spent a third less CPU per request than two (docs/performance.md, sections 10–12).
//! But where the gateway itself is the bottleneck, two threads serve 20–30 % more.
//!
//! ```text
//! every TICK: busy share of each thread (tokio's busy time / wall time)
//!   an active thread busier than GROW_ABOVE            ──▶ one more active thread (HIGH_TICKS in a row)
//!   all together under SHRINK_BELOW × (active − 1)     ──▶ one fewer (LOW_TICKS in a row)
//! new connections go to active threads (serving::Occupancy::place); an inactive thread sheds
//! its HTTP/1.1 connections to the active ones, an active one those above its fair share, each
//! at its next moment between two requests (crate::connections)
//! ```
//!
//! HTTP/2 and TLS connections stay where they are (their state lives in the connection's
//! task); the threads start all active, so a gateway started into heavy load is not held back.

use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;

/// How often the load is looked at.
pub const TICK: Duration = Duration::from_millis(250);

/// An active thread busier than this (share of wall time it was not waiting for events) gets
/// help. Near 1: on a machine shared with busy workers a thread with work often waits for a
/// CPU, and that counts as busy; one thread busy 70–80 % of the time on the session route
/// still served more, at less CPU per request, than two (docs/performance.md, section 12).
pub const GROW_ABOVE: f64 = 0.9;

/// Ticks in a row a thread must be that busy before one more is taken into use.
const HIGH_TICKS: u32 = 2;

/// The threads give one up when all of them together are busy less than this share of one
/// thread for each that would remain.
pub const SHRINK_BELOW: f64 = 0.6;

/// Ticks in a row the load must be low before a thread is given up (a second): a short lull
/// does not move connections back and forth.
const LOW_TICKS: u32 = 4;

/// The serving threads' load over time, and how many of them are active.
#[derive(Debug)]
pub struct Consolidation {
    runtimes: Vec<Handle>,
    /// Busy time of each thread at the last tick.
    busy: Vec<Duration>,
    at: Instant,
    active: usize,
    /// Ticks in a row that wanted more threads / fewer.
    high_ticks: u32,
    low_ticks: u32,
}

impl Consolidation {
    /// Watches the single-threaded runtimes of the serving threads, all of them active.
    pub fn new(runtimes: Vec<Handle>) -> Self {
        let busy = runtimes.iter().map(busy_time).collect();
        Consolidation {
            active: runtimes.len(),
            runtimes,
            busy,
            at: Instant::now(),
            high_ticks: 0,
            low_ticks: 0,
        }
    }

    /// Reads how busy each thread was since the last tick; returns how many threads should be
    /// active now.
    pub fn tick(&mut self) -> usize {
        let now = Instant::now();
        let wall = now.duration_since(self.at).as_secs_f64().max(1e-3);
        self.at = now;
        let shares: Vec<f64> = self
            .runtimes
            .iter()
            .zip(self.busy.iter_mut())
            .map(|(runtime, last)| {
                let busy = busy_time(runtime);
                let share = busy.saturating_sub(*last).as_secs_f64() / wall;
                *last = busy;
                share
            })
            .collect();
        let wanted = decide(self.active, &shares);
        // A change must be wanted for some ticks in a row: a short burst or lull does not move
        // connections back and forth.
        let (ticks, needed) = if wanted > self.active {
            (&mut self.high_ticks, HIGH_TICKS)
        } else if wanted < self.active {
            (&mut self.low_ticks, LOW_TICKS)
        } else {
            self.high_ticks = 0;
            self.low_ticks = 0;
            return self.active;
        };
        *ticks += 1;
        if *ticks >= needed {
            self.active = wanted;
            self.high_ticks = 0;
            self.low_ticks = 0;
        }
        self.active
    }
}

/// Busy time of a single-threaded runtime so far.
fn busy_time(runtime: &Handle) -> Duration {
    runtime.metrics().worker_total_busy_duration(0)
}

/// Active threads wanted given each thread's busy share, `active` now (the caller waits for
/// [`HIGH_TICKS`] or [`LOW_TICKS`] ticks in a row wanting a change).
pub fn decide(active: usize, shares: &[f64]) -> usize {
    let threads = shares.len();
    let active = active.clamp(1, threads.max(1));
    let busiest = shares[..active].iter().copied().fold(0.0, f64::max);
    if active < threads && busiest > GROW_ABOVE {
        return active + 1;
    }
    let total: f64 = shares.iter().sum();
    if active > 1 && total < SHRINK_BELOW * (active - 1) as f64 {
        return active - 1;
    }
    active
}

/// How many connections each thread should hand over, given the open ones per thread: an
/// inactive thread all of them, an active one those beyond its fair share (plus one of slack,
/// so that a difference of one does not move a connection).
pub fn shed_orders(active: usize, open: &[usize]) -> Vec<usize> {
    let active = active.clamp(1, open.len().max(1));
    let total: usize = open.iter().sum();
    let fair = total.div_ceil(active);
    open.iter()
        .enumerate()
        .map(|(thread, &count)| {
            if thread >= active {
                count
            } else {
                count.saturating_sub(fair + 1)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_active_thread_gets_help_one_thread_at_a_time() {
        assert_eq!(decide(1, &[0.95, 0.0, 0.0]), 2);
        assert_eq!(decide(2, &[0.5, 0.97, 0.0]), 3);
        assert_eq!(decide(3, &[1.0, 1.0, 1.0]), 3, "all are active");
        // Busy 80 % of the time on a shared machine: one thread still copes.
        assert_eq!(decide(1, &[0.8, 0.0]), 1);
    }

    #[test]
    fn a_light_load_gives_threads_up_down_to_one() {
        // 0.5 in all fits on one thread, below GROW_ABOVE (and one thread does the same work
        // in less time than two).
        assert_eq!(decide(2, &[0.25, 0.25]), 1);
        assert_eq!(decide(3, &[0.3, 0.3, 0.3]), 2);
        assert_eq!(decide(1, &[0.1, 0.0]), 1, "never below one");
        // 0.7 in all: one thread would be too close to needing help again.
        assert_eq!(decide(2, &[0.35, 0.35]), 2);
        // An inactive thread still serving HTTP/2 counts in the total.
        assert_eq!(decide(2, &[0.2, 0.2, 0.3]), 2);
    }

    #[test]
    fn between_the_marks_nothing_changes() {
        assert_eq!(decide(2, &[0.5, 0.5]), 2);
        assert_eq!(decide(1, &[0.85, 0.0]), 1);
    }

    #[test]
    fn inactive_threads_shed_everything_active_ones_their_surplus() {
        assert_eq!(shed_orders(1, &[10, 10]), vec![0, 10]);
        assert_eq!(shed_orders(2, &[64, 0]), vec![31, 0]);
        assert_eq!(shed_orders(2, &[33, 31]), vec![0, 0], "one of slack");
        assert_eq!(shed_orders(2, &[20, 5, 6]), vec![3, 0, 6]);
        assert_eq!(shed_orders(1, &[0, 0]), vec![0, 0]);
    }

    #[test]
    fn ticks_wait_for_a_second_of_low_load_before_giving_a_thread_up() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let other = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut consolidation =
            Consolidation::new(vec![runtime.handle().clone(), other.handle().clone()]);
        assert_eq!(consolidation.active, 2);
        // Idle runtimes: low ticks keep both until the fourth gives one up.
        for _ in 1..LOW_TICKS {
            assert_eq!(consolidation.tick(), 2);
        }
        assert_eq!(consolidation.tick(), 1);
        assert_eq!(consolidation.tick(), 1);
    }
}
