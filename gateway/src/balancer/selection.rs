//! Selection: which worker gets this request.
//!
//! Filtering comes first, by the precedence order of [`super::worker`]: workers removed or drained
//! (by an operator or by their own announcement) never get new requests, and neither do workers
//! that refused the last connection (unreachable: nothing listens there). Workers that are down
//! (active checks) or ejected (passive checks) don't either, unless fewer than `panic_threshold`
//! of the reachable, routable workers are healthy, in which case those two judgements are
//! ignored ("panic mode": a health signal wrong across the board, say a readiness endpoint that
//! times out under load, must not turn into a total outage).
//!
//! Panic mode never overrides a refused connection. Envoy's panic threshold does, and that is a
//! known outage: kill 2 of 3 workers and half the traffic goes to the dead ones, the retries it
//! needs exhaust the budget, and users see 503s while a healthy survivor idles. Here the dead
//! workers are not reachable, so they count neither as routable nor as healthy: one survivor of
//! three is 100 % of the reachable workers, not 33 %, and takes all the traffic. Workers already
//! tried for this request and workers at their in-flight limit are skipped. An ejected worker
//! whose backoff is over gets exactly one probe request before anything else.
//!
//! Then the algorithm picks among the candidates:
//! - `p2c` (default): two random candidates, the one with the lower peak-EWMA latency ×
//!   (in-flight + 1) wins;
//! - `round_robin`: each candidate in turn;
//! - `weighted`: random, proportional to weight.
//!
//! Slow start scales a worker's share by a factor ramping from `slow_start_min` to 1.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::worker::{EJECTED, NEVER_ROUTED, UNHEALTHY, Worker};
use crate::config::{Algorithm, BalancingConfig};

/// Why no worker was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No routable worker is left (none configured, all drained, removed, or already tried).
    NoWorker,
    /// Every candidate is at its in-flight limit.
    AllBusy,
}

/// A picked worker, and whether the request is its passive-health probe.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The worker.
    pub worker: Arc<Worker>,
    /// This request decides whether an ejected worker comes back.
    pub probe: bool,
}

/// The selection policy, built once from the configuration.
#[derive(Debug)]
pub struct Selector {
    algorithm: Algorithm,
    slow_start_ns: u64,
    slow_start_min: f64,
    panic_threshold: f64,
    max_in_flight: u32,
    next: AtomicUsize,
}

thread_local! {
    /// Reused candidate buffer, so selection allocates nothing after warm-up.
    static CANDIDATES: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The thread's random numbers for picking: a small fast generator seeded once from the
    /// thread's cryptographic one. Choosing between workers needs no unpredictability, and
    /// `rand::rng()` (ChaCha, reference-counted, reseeding) cost about 75 instructions per
    /// pick (`infra/bench/instructions.sh`).
    static PICKER: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// Runs `f` with the thread's picking generator.
fn with_rng<T>(f: impl FnOnce(&mut SmallRng) -> T) -> T {
    PICKER.with_borrow_mut(f)
}

impl Selector {
    /// A selector for `config`, with a per-worker in-flight limit.
    pub fn new(config: &BalancingConfig, max_in_flight: u32) -> Self {
        Selector {
            algorithm: config.algorithm,
            slow_start_ns: config.slow_start.as_nanos() as u64,
            slow_start_min: config.slow_start_min,
            panic_threshold: config.panic_threshold,
            max_in_flight,
            next: AtomicUsize::new(0),
        }
    }

    /// Length of slow start, in nanoseconds.
    pub fn slow_start_ns(&self) -> u64 {
        self.slow_start_ns
    }

    /// Whether health would be ignored right now (fewer healthy workers than the threshold).
    pub fn in_panic(&self, workers: &[Arc<Worker>]) -> bool {
        let (routable, healthy) = count(workers);
        self.panics(routable, healthy)
    }

    /// How many workers new requests go to right now (healthy ones; in panic mode also the down
    /// and ejected ones that are still reachable), and whether that is panic mode.
    pub fn serving(&self, workers: &[Arc<Worker>]) -> (usize, bool) {
        serving(workers, self.panic_threshold)
    }

    fn panics(&self, routable: usize, healthy: usize) -> bool {
        panics(routable, healthy, self.panic_threshold)
    }

    /// Whether [`Selector::pick`] would find a worker (without claiming a probe).
    pub fn has_candidate(&self, workers: &[Arc<Worker>], tried: &[Arc<Worker>], now: u64) -> bool {
        let (routable, healthy) = count(workers);
        let excluded = if self.panics(routable, healthy) {
            NEVER_ROUTED
        } else {
            NEVER_ROUTED | UNHEALTHY
        };
        workers.iter().any(|w| {
            let flags = w.flags();
            let usable = flags & excluded == 0 || (flags == EJECTED && w.probe_due(now));
            usable && w.in_flight() < self.max_in_flight && !tried.iter().any(|t| Arc::ptr_eq(t, w))
        })
    }

    /// Picks a worker for a request that already went to `tried`, at time `now`.
    pub fn pick(
        &self,
        workers: &[Arc<Worker>],
        tried: &[Arc<Worker>],
        now: u64,
    ) -> Result<Pick, Refusal> {
        let untried = |w: &Arc<Worker>| !tried.iter().any(|t| Arc::ptr_eq(t, w));
        let (routable, healthy) = count(workers);
        let panic = self.panics(routable, healthy);
        if !panic {
            // A due probe goes first: it is how an ejected worker earns its way back.
            for worker in workers {
                if worker.flags() == EJECTED
                    && worker.probe_due(now)
                    && worker.in_flight() < self.max_in_flight
                    && untried(worker)
                    && worker.start_probe(now)
                {
                    return Ok(Pick {
                        worker: worker.clone(),
                        probe: true,
                    });
                }
            }
        }
        let excluded = if panic {
            NEVER_ROUTED
        } else {
            NEVER_ROUTED | UNHEALTHY
        };
        CANDIDATES.with(|cell| {
            let mut candidates = cell.borrow_mut();
            candidates.clear();
            let mut busy = false;
            for (index, worker) in workers.iter().enumerate() {
                if worker.flags() & excluded != 0 || !untried(worker) {
                    continue;
                }
                if worker.in_flight() >= self.max_in_flight {
                    busy = true;
                    continue;
                }
                candidates.push(index as u32);
            }
            if candidates.is_empty() {
                return Err(if busy {
                    Refusal::AllBusy
                } else {
                    Refusal::NoWorker
                });
            }
            let index = match self.algorithm {
                Algorithm::P2c => self.p2c(workers, &candidates, now),
                Algorithm::RoundRobin => self.round_robin(workers, &candidates, now),
                Algorithm::Weighted => self.weighted(workers, &candidates, now),
            };
            Ok(Pick {
                worker: workers[index].clone(),
                probe: false,
            })
        })
    }

    fn factor(&self, worker: &Worker, now: u64) -> f64 {
        worker.slow_start_factor(now, self.slow_start_ns, self.slow_start_min)
    }

    fn p2c(&self, workers: &[Arc<Worker>], candidates: &[u32], now: u64) -> usize {
        let n = candidates.len();
        if n == 1 {
            return candidates[0] as usize;
        }
        let (a, mut b, draw) = with_rng(|rng| {
            (
                rng.random_range(0..n),
                rng.random_range(0..n - 1),
                rng.random::<f64>(),
            )
        });
        if b >= a {
            b += 1;
        }
        let (a, b) = (candidates[a] as usize, candidates[b] as usize);
        let cost = |i: usize| {
            let w = &workers[i];
            // +1 ns keeps in-flight meaningful when the estimate has decayed to zero.
            (w.ewma.get(now) + 1.0) * (w.in_flight() as f64 + 1.0)
        };
        let (winner, loser) = if cost(a) <= cost(b) { (a, b) } else { (b, a) };
        let factor = self.factor(&workers[winner], now);
        if factor < 1.0 && draw >= factor {
            loser
        } else {
            winner
        }
    }

    fn round_robin(&self, workers: &[Arc<Worker>], candidates: &[u32], now: u64) -> usize {
        let n = candidates.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for step in 0..n {
            let index = candidates[(start + step) % n] as usize;
            let factor = self.factor(&workers[index], now);
            if factor >= 1.0 || with_rng(|rng| rng.random::<f64>()) < factor {
                return index;
            }
        }
        candidates[start % n] as usize
    }

    fn weighted(&self, workers: &[Arc<Worker>], candidates: &[u32], now: u64) -> usize {
        let share = |i: u32| {
            let w = &workers[i as usize];
            w.weight() as f64 * self.factor(w, now)
        };
        let total: f64 = candidates.iter().map(|&i| share(i)).sum();
        let mut point = with_rng(|rng| rng.random::<f64>()) * total;
        for &index in candidates {
            point -= share(index);
            if point < 0.0 {
                return index as usize;
            }
        }
        candidates[candidates.len() - 1] as usize
    }
}

fn panics(routable: usize, healthy: usize, threshold: f64) -> bool {
    routable > 0 && (healthy as f64) < threshold * routable as f64
}

/// How many of `workers` new requests go to under `panic_threshold`, and whether that is panic
/// mode (see [`Selector::serving`]).
pub fn serving(workers: &[Arc<Worker>], panic_threshold: f64) -> (usize, bool) {
    let (routable, healthy) = count(workers);
    if panics(routable, healthy, panic_threshold) {
        (routable, true)
    } else {
        (healthy, false)
    }
}

/// Routable, reachable workers, and how many of them are healthy.
fn count(workers: &[Arc<Worker>]) -> (usize, usize) {
    let mut routable = 0;
    let mut healthy = 0;
    for worker in workers {
        let flags = worker.flags();
        if flags & NEVER_ROUTED == 0 {
            routable += 1;
            if flags & UNHEALTHY == 0 {
                healthy += 1;
            }
        }
    }
    (routable, healthy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::ewma::PeakEwma;
    use crate::balancer::passive::Breaker;
    use crate::balancer::worker::{
        ACTIVE_DOWN, ADMIN_DRAIN, Origin, REGISTRY_DRAIN, UNREACHABLE, WorkerSpec,
    };
    use crate::config::PassiveConfig;
    use std::collections::HashMap;
    use std::time::Duration;

    const LATE: u64 = 1_000_000_000_000;

    fn worker(id: &str, weight: u32, ewma_ms: f64) -> Arc<Worker> {
        let spec = WorkerSpec {
            id: id.into(),
            addr: "127.0.0.1:1".into(),
            machine: String::new(),
            weight,
            origin: Origin::Static,
        };
        Arc::new(Worker::new(
            spec,
            "127.0.0.1:1".parse().unwrap(),
            Breaker::new(&PassiveConfig::default()),
            PeakEwma::new(ewma_ms * 1e6, 1e18, 0),
            0,
        ))
    }

    fn selector(algorithm: Algorithm) -> Selector {
        Selector::new(
            &BalancingConfig {
                algorithm,
                slow_start: Duration::from_secs(10),
                ..BalancingConfig::default()
            },
            100,
        )
    }

    fn spread(s: &Selector, workers: &[Arc<Worker>], n: usize, now: u64) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let pick = s.pick(workers, &[], now).unwrap();
            *counts.entry(pick.worker.id().to_string()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn p2c_prefers_the_cheaper_worker() {
        let s = selector(Algorithm::P2c);
        let workers = vec![worker("fast", 1, 1.0), worker("slow", 1, 50.0)];
        let counts = spread(&s, &workers, 1000, LATE);
        assert_eq!(counts.get("fast"), Some(&1000));
        // In-flight load counts too: a busy fast worker loses to an idle slower one.
        let guards: Vec<_> = (0..99).map(|_| workers[0].begin()).collect();
        let counts = spread(&s, &workers, 100, LATE);
        assert_eq!(counts.get("slow"), Some(&100));
        drop(guards);
    }

    #[test]
    fn p2c_spreads_over_equal_workers() {
        let s = selector(Algorithm::P2c);
        let workers: Vec<_> = (0..4).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        let counts = spread(&s, &workers, 4000, LATE);
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|&c| c > 500), "{counts:?}");
    }

    #[test]
    fn round_robin_takes_turns() {
        let s = selector(Algorithm::RoundRobin);
        let workers: Vec<_> = (0..3).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        let order: Vec<String> = (0..6)
            .map(|_| s.pick(&workers, &[], LATE).unwrap().worker.id().to_string())
            .collect();
        assert_eq!(order, vec!["w0", "w1", "w2", "w0", "w1", "w2"]);
    }

    #[test]
    fn weighted_follows_weights() {
        let s = selector(Algorithm::Weighted);
        let workers = vec![worker("heavy", 300, 1.0), worker("light", 100, 1.0)];
        let counts = spread(&s, &workers, 4000, LATE);
        let heavy = counts["heavy"] as f64 / 4000.0;
        assert!((0.7..0.8).contains(&heavy), "{counts:?}");
    }

    #[test]
    fn drained_down_ejected_and_tried_workers_are_skipped() {
        let s = selector(Algorithm::RoundRobin);
        let workers: Vec<_> = (0..5).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        workers[0].set_flag(ADMIN_DRAIN, true);
        workers[1].set_flag(REGISTRY_DRAIN, true);
        workers[2].set_flag(ACTIVE_DOWN, true);
        // w3 tried already; w4 is the only choice left.
        for _ in 0..10 {
            let pick = s.pick(&workers, &[workers[3].clone()], LATE).unwrap();
            assert_eq!(pick.worker.id(), "w4");
        }
        assert_eq!(
            s.pick(&workers, &[workers[3].clone(), workers[4].clone()], LATE)
                .unwrap_err(),
            Refusal::NoWorker
        );
    }

    #[test]
    fn panic_mode_uses_unhealthy_workers_but_never_drained_ones() {
        let s = selector(Algorithm::RoundRobin);
        let workers: Vec<_> = (0..4).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        workers[0].set_flag(ADMIN_DRAIN, true);
        workers[1].set_flag(ACTIVE_DOWN, true);
        workers[2].set_flag(ACTIVE_DOWN, true);
        workers[3].set_flag(ACTIVE_DOWN, true);
        assert!(s.in_panic(&workers));
        let counts = spread(&s, &workers, 30, LATE);
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(!counts.contains_key("w0"));
        // Half healthy is not below the 50 % threshold: health is respected again.
        workers[1].set_flag(ACTIVE_DOWN, false);
        workers[0].set_flag(ADMIN_DRAIN, false);
        assert!(!s.in_panic(&workers));
        let counts = spread(&s, &workers, 30, LATE);
        assert_eq!(counts.len(), 2, "{counts:?}");
    }

    #[test]
    fn unreachable_workers_are_never_picked_and_do_not_cause_panic() {
        let s = selector(Algorithm::RoundRobin);
        // Two of three refuse connections: the survivor is all of the reachable workers, so
        // this is not panic mode, and even a panic never sends to a refused worker.
        let workers: Vec<_> = (0..3).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        workers[0].set_flag(UNREACHABLE, true);
        workers[1].set_flag(UNREACHABLE | EJECTED, true);
        assert!(!s.in_panic(&workers));
        assert_eq!(s.serving(&workers), (1, false));
        let counts = spread(&s, &workers, 30, LATE);
        assert_eq!(counts.get("w2"), Some(&30), "{counts:?}");
        // The survivor is judged down as well: panic mode, yet still only reachable workers.
        workers[2].set_flag(ACTIVE_DOWN, true);
        assert!(s.in_panic(&workers));
        assert_eq!(s.serving(&workers), (1, true));
        let counts = spread(&s, &workers, 30, LATE);
        assert_eq!(counts.get("w2"), Some(&30), "{counts:?}");
        assert!(s.has_candidate(&workers, &[], LATE));
        assert!(!s.has_candidate(&workers, &[workers[2].clone()], LATE));
        // Nothing reachable at all: no worker, not a refused one.
        workers[2].set_flag(UNREACHABLE, true);
        assert_eq!(s.pick(&workers, &[], LATE).unwrap_err(), Refusal::NoWorker);
        assert_eq!(s.serving(&workers), (0, false));
    }

    #[test]
    fn an_ejected_worker_gets_exactly_one_probe_when_due() {
        let s = selector(Algorithm::RoundRobin);
        let workers: Vec<_> = (0..3).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        for _ in 0..3 {
            workers[0].record_outcome(false, 0);
        }
        assert_eq!(workers[0].flags(), EJECTED);
        let before_due = spread(&s, &workers, 20, 1);
        assert!(!before_due.contains_key("w0"));
        let due = 2_000_000_000;
        let first = s.pick(&workers, &[], due).unwrap();
        assert_eq!(first.worker.id(), "w0");
        assert!(first.probe);
        let after = spread(&s, &workers, 20, due);
        assert!(!after.contains_key("w0"), "one probe only: {after:?}");
    }

    #[test]
    fn full_workers_give_all_busy() {
        let s = Selector::new(&BalancingConfig::default(), 1);
        let workers = vec![worker("w0", 1, 1.0)];
        let _guard = workers[0].begin();
        assert_eq!(s.pick(&workers, &[], LATE).unwrap_err(), Refusal::AllBusy);
        assert_eq!(s.pick(&[], &[], LATE).unwrap_err(), Refusal::NoWorker);
    }

    #[test]
    fn slow_start_gives_a_new_worker_a_reduced_share() {
        let s = selector(Algorithm::RoundRobin);
        let workers: Vec<_> = (0..2).map(|i| worker(&format!("w{i}"), 1, 1.0)).collect();
        // w1 just joined at LATE; w0 is long past its slow start.
        workers[0].start_slow_start(1);
        workers[1].start_slow_start(LATE);
        let counts = spread(&s, &workers, 2000, LATE);
        let new = *counts.get("w1").unwrap_or(&0);
        assert!(new > 0, "a new worker gets some traffic at once");
        assert!(new < 400, "but much less than half: {counts:?}");
    }
}
