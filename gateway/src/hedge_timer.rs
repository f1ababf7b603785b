//! The hedge delay's timers: entries in a queue of the serving thread instead of one tokio
//! timer per request.
//!
//! Every hedgeable request waits for its hedge delay next to its first attempt, and nearly
//! every one is answered first: the timer is made and dropped, almost never fired. A tokio
//! `Sleep` per request cost a registration in the runtime's timer wheel at its first poll (a
//! lock, a tick computed from the clock, an insert) and a removal when dropped: about 750
//! instructions of a 26 000-instruction request (`infra/bench/instructions.sh h1`,
//! docs/performance.md section 16). Here a timer is a slot in its thread's table and an entry in
//! a queue in deadline order: no lock, no allocation once the table has grown, and dropping it
//! frees the slot (its queue entry goes stale, and the alarm drops it without waking for it).
//!
//! ```text
//! request ─ HedgeTimer::until(t) ─▶ slot (state, waker) + queue entry (t, slot, generation)
//! alarm task (one per thread) ─ sleeps until the earliest live entry ─▶ marks due slots, wakes them
//! ```
//!
//! The alarm is a task on the thread's own runtime, started with the first timer and again after
//! a runtime that ran it is gone. A deadline earlier than the one the alarm sleeps for wakes it to
//! sleep less (the delay shrinks when latency drops). Timers fire on tokio's clock and at its
//! resolution (1 ms), as a `Sleep` would. Off a current-thread runtime (a work-stealing runtime
//! may poll a future on any of its threads, and the table is per thread), a timer is a plain
//! tokio `Sleep`.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::time::{Instant, Sleep};

thread_local! {
    static TIMERS: RefCell<Timers> = const { RefCell::new(Timers::new()) };
}

/// A hedge delay running out: ready at its deadline. Made with [`HedgeTimer::until`].
#[derive(Debug)]
pub struct HedgeTimer {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// A slot in this thread's table.
    Queued { slot: u32, generation: u32 },
    /// A tokio timer (not on a current-thread runtime).
    Sleep(Pin<Box<Sleep>>),
}

impl HedgeTimer {
    /// A timer that is ready at `deadline`.
    pub fn until(deadline: Instant) -> Self {
        let queued = TIMERS.with_borrow_mut(|timers| timers.add(deadline));
        let inner = match queued {
            Some((slot, generation)) => Inner::Queued { slot, generation },
            None => Inner::Sleep(Box::pin(tokio::time::sleep_until(deadline))),
        };
        HedgeTimer { inner }
    }
}

impl Future for HedgeTimer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.get_mut().inner {
            Inner::Queued { slot, generation } => {
                TIMERS.with_borrow_mut(|timers| timers.poll(*slot, *generation, cx.waker()))
            }
            Inner::Sleep(sleep) => sleep.as_mut().poll(cx),
        }
    }
}

impl Drop for HedgeTimer {
    fn drop(&mut self) {
        if let Inner::Queued { slot, generation } = self.inner {
            // `try_with`: a timer dropped as its thread ends finds the table gone.
            let _ = TIMERS.try_with(|timers| {
                if let Ok(mut timers) = timers.try_borrow_mut() {
                    timers.remove(slot, generation);
                }
            });
        }
    }
}

/// A timer in the queue: its deadline, slot and the slot's generation.
type Entry = (Instant, u32, u32);

/// One timer's place in the table.
#[derive(Debug)]
struct Slot {
    /// Bumped when the slot is freed: queue entries of earlier timers no longer match.
    generation: u32,
    state: State,
    /// The task to wake when the timer is due (set by its first pending poll).
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Waiting,
    Due,
}

/// A thread's timers.
#[derive(Debug)]
struct Timers {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// (deadline, slot, generation) in the order added: deadlines as good as sorted, since
    /// every request adds the same delay to its start. Entries of dropped timers stay until the
    /// alarm next looks (`fire`).
    queue: VecDeque<Entry>,
    /// The rare entries due before the queue's last one (the delay shrank): earliest first.
    early: BinaryHeap<Reverse<Entry>>,
    alarm: Alarm,
}

/// What the alarm task is doing.
#[derive(Debug)]
enum Alarm {
    /// Not running on this thread (never started, or its runtime is gone).
    Stopped,
    /// Running; asleep until `until` (`None`: nothing to wait for), woken through `waker`.
    Running {
        until: Option<Instant>,
        waker: Option<Waker>,
    },
}

impl Timers {
    const fn new() -> Self {
        Timers {
            slots: Vec::new(),
            free: Vec::new(),
            queue: VecDeque::new(),
            early: BinaryHeap::new(),
            alarm: Alarm::Stopped,
        }
    }

    /// Adds a timer for `deadline`: its slot and generation, or `None` when timers here must be
    /// tokio's own (no alarm runs here, and this is no current-thread runtime to start one on).
    fn add(&mut self, deadline: Instant) -> Option<(u32, u32)> {
        match &mut self.alarm {
            Alarm::Stopped => {
                let handle = Handle::try_current().ok()?;
                if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
                    return None;
                }
                self.alarm = Alarm::Running {
                    until: None,
                    waker: None,
                };
                handle.spawn(alarm());
            }
            Alarm::Running { until, waker } => {
                // Asleep for later (or for nothing): it must wake to sleep less.
                if until.is_none_or(|until| deadline < until)
                    && let Some(waker) = waker.take()
                {
                    waker.wake();
                }
            }
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    state: State::Free,
                    waker: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let entry = &mut self.slots[slot as usize];
        entry.state = State::Waiting;
        let generation = entry.generation;
        let entry = (deadline, slot, generation);
        match self.queue.back() {
            Some(&(last, _, _)) if deadline < last => self.early.push(Reverse(entry)),
            _ => self.queue.push_back(entry),
        }
        Some((slot, generation))
    }

    fn poll(&mut self, slot: u32, generation: u32, waker: &Waker) -> Poll<()> {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return Poll::Ready(());
        };
        if entry.generation != generation || entry.state != State::Waiting {
            return Poll::Ready(());
        }
        match &mut entry.waker {
            Some(known) if known.will_wake(waker) => {}
            other => *other = Some(waker.clone()),
        }
        Poll::Pending
    }

    fn remove(&mut self, slot: u32, generation: u32) {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if entry.generation != generation || entry.state == State::Free {
            return;
        }
        entry.generation = entry.generation.wrapping_add(1);
        entry.state = State::Free;
        entry.waker = None;
        self.free.push(slot);
    }

    /// Marks every timer due by `now`, putting their wakers in `woken`; the earliest deadline
    /// of a timer still waiting. Entries of dropped timers are taken out on the way, due or
    /// not: the alarm sleeps until a timer that can fire, not until the next stale entry.
    /// Nearly every timer is dropped (its request answered long before the hedge delay), so
    /// under load waking for each stale deadline woke the alarm once a tick (1 ms) per thread,
    /// each time also re-arming its `Sleep` and so unparking the runtime's driver (an eventfd
    /// write): about 1 000 wake-ups a second per thread for nothing.
    fn fire(&mut self, now: Instant, woken: &mut Vec<Waker>) -> Option<Instant> {
        loop {
            let queued = self.queue.front().copied();
            let early = self.early.peek().map(|&Reverse(entry)| entry);
            let (deadline, slot, generation) = match (queued, early) {
                (Some(q), Some(e)) if e.0 < q.0 => e,
                (Some(q), _) => q,
                (None, Some(e)) => e,
                (None, None) => return None,
            };
            let entry = &mut self.slots[slot as usize];
            let waiting = entry.generation == generation && entry.state == State::Waiting;
            if waiting && deadline > now {
                return Some(deadline);
            }
            if waiting {
                entry.state = State::Due;
                woken.extend(entry.waker.take());
            }
            if early == Some((deadline, slot, generation)) {
                self.early.pop();
            } else {
                self.queue.pop_front();
            }
        }
    }
}

/// Marks the alarm stopped when its task ends (its runtime shut down): the next timer starts
/// another.
struct Stopped;

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = TIMERS.try_with(|timers| {
            if let Ok(mut timers) = timers.try_borrow_mut() {
                timers.alarm = Alarm::Stopped;
            }
        });
    }
}

/// The alarm task: sleeps until the earliest waiting timer is due, fires what is due, again.
async fn alarm() {
    let _stopped = Stopped;
    let mut sleep = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut woken = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            let next = TIMERS.with_borrow_mut(|timers| {
                let next = timers.fire(Instant::now(), &mut woken);
                timers.alarm = Alarm::Running {
                    until: next,
                    waker: Some(cx.waker().clone()),
                };
                next
            });
            for waker in woken.drain(..) {
                waker.wake();
            }
            let Some(next) = next else {
                return Poll::Pending;
            };
            sleep.as_mut().reset(next);
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn queued(timer: &HedgeTimer) -> bool {
        matches!(timer.inner, Inner::Queued { .. })
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_is_ready_at_its_deadline_not_before() {
        let start = Instant::now();
        let timer = HedgeTimer::until(start + Duration::from_millis(50));
        assert!(queued(&timer));
        timer.await;
        assert_eq!(start.elapsed().as_millis(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_added_later_fires_first() {
        let start = Instant::now();
        let late = HedgeTimer::until(start + Duration::from_secs(1));
        // Let the alarm go to sleep for the late one first.
        tokio::time::sleep(Duration::from_millis(1)).await;
        HedgeTimer::until(start + Duration::from_millis(20)).await;
        assert_eq!(start.elapsed().as_millis(), 20);
        late.await;
        assert_eq!(start.elapsed().as_millis(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_timer_frees_its_slot_and_wakes_no_one() {
        let start = Instant::now();
        for _ in 0..100 {
            let mut timer = std::pin::pin!(HedgeTimer::until(start + Duration::from_millis(5)));
            assert!(futures_poll_once(timer.as_mut()).await.is_pending());
        }
        let slots = TIMERS.with_borrow(|t| t.slots.len());
        assert_eq!(slots, 1, "each dropped timer's slot was reused");
        // Their queue entries are stale: the alarm skips them, and a new timer still fires.
        HedgeTimer::until(start + Duration::from_millis(10)).await;
        assert_eq!(start.elapsed().as_millis(), 10);
        TIMERS.with_borrow(|t| assert!(t.queue.is_empty(), "stale entries popped"));
    }

    #[test]
    fn the_alarm_sleeps_until_a_waiting_timer_not_a_dropped_ones_entry() {
        let mut timers = Timers::new();
        // As under load: one timer a request, nearly all dropped long before their deadline.
        timers.alarm = Alarm::Running {
            until: None,
            waker: None,
        };
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let dropped: Vec<_> = (0..3).map(|ms| timers.add(at(50 + ms)).unwrap()).collect();
        let (waiting, generation) = timers.add(at(60)).unwrap();
        let (early, early_generation) = timers.add(at(55)).unwrap();
        for (slot, generation) in dropped {
            timers.remove(slot, generation);
        }
        timers.remove(early, early_generation);
        let mut woken = Vec::new();
        assert_eq!(timers.fire(start, &mut woken), Some(at(60)));
        assert_eq!(
            timers.queue.len(),
            1,
            "the dropped timers' entries are gone"
        );
        assert!(timers.early.is_empty());
        // At its deadline the waiting timer fires, and nothing is left to wake for.
        assert_eq!(timers.fire(at(60), &mut woken), None);
        assert_eq!(timers.slots[waiting as usize].state, State::Due);
        assert_eq!(timers.slots[waiting as usize].generation, generation);
    }

    #[test]
    fn timers_fire_again_on_a_new_runtime_of_the_same_thread() {
        for _ in 0..2 {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                let start = Instant::now();
                let timer = HedgeTimer::until(start + Duration::from_millis(5));
                assert!(queued(&timer));
                tokio::time::timeout(Duration::from_secs(5), timer)
                    .await
                    .expect("the timer fired");
                assert!(start.elapsed() >= Duration::from_millis(5));
            });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_work_stealing_runtime_gets_tokio_timers() {
        let start = Instant::now();
        let timer = HedgeTimer::until(start + Duration::from_millis(5));
        assert!(!queued(&timer));
        timer.await;
        assert!(start.elapsed() >= Duration::from_millis(5));
    }

    /// Polls `future` once.
    async fn futures_poll_once<F: Future + Unpin>(mut future: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut future).poll(cx))).await
    }
}
