//! The streams of a client's HTTP/2 connection run on the connection's own task, not on a task
//! each.
//!
//! The gateway's HTTP/2 server (`crate::h2_server`) makes a future per stream (the request
//! path and the answer it sends). On a tokio task each, every stream was spawned, scheduled,
//! woken, completed and freed, about 1 900 of the 45 400 instructions of an h2c request
//! (`infra/bench/instructions.sh h2`, when hyper's executor ran them). A client's connection
//! and all its streams live on one serving thread anyway (`crate::serving`), so a task each
//! buys no parallelism: here the connection's task polls them itself.
//!
//! The connection hands its new streams over with [`hand_over`]. While [`WithStreams`] polls
//! a connection, what is handed over is kept on the thread (a plain `Vec`, no lock, no
//! atomics) and taken by that same poll into the connection's `FuturesUnordered`; outside such
//! a poll a stream gets a task of its own. After the connection has ended, its remaining
//! streams are still polled to their end (`h2` resets them when the connection goes: they end
//! at once).
//!
//! One difference from a task each: a stream that panics takes its connection's other streams
//! with it (tokio catches the panic at the task). The service does not panic on any input; the
//! tests send what a hostile client would.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;

/// A stream's future.
pub type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// Set while [`WithStreams`] polls its connection or streams on this thread.
    static COLLECTING: Cell<bool> = const { Cell::new(false) };
    /// Streams handed to the executor during that poll, not yet taken by the connection.
    static HANDED: RefCell<Vec<StreamFuture>> = const { RefCell::new(Vec::new()) };
}

/// Runs `stream` on the task of the connection being polled (see the module doc), elsewhere on
/// a task of its own.
pub fn hand_over(stream: StreamFuture) {
    if COLLECTING.get() {
        HANDED.with_borrow_mut(|handed| handed.push(stream));
    } else {
        tokio::spawn(stream);
    }
}

/// An HTTP/2 connection with its streams: ends when the connection has ended and every stream
/// with it.
pub struct WithStreams<C: Future> {
    connection: Pin<Box<C>>,
    /// The connection's result, once it has ended.
    ended: Option<C::Output>,
    streams: FuturesUnordered<StreamFuture>,
    /// Whether the connection asked to be polled (its waker: `waker`).
    wanted: Arc<Wanted>,
    waker: Waker,
}

impl<C: Future> WithStreams<C> {
    /// Serves `connection` (which gives its streams to [`hand_over`]) and the streams it opens.
    pub fn new(connection: C) -> Self {
        let wanted = Arc::new(Wanted {
            again: AtomicBool::new(true),
            polling: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        WithStreams {
            connection: Box::pin(connection),
            ended: None,
            streams: FuturesUnordered::new(),
            waker: Waker::from(wanted.clone()),
            wanted,
        }
    }
}

impl<C: Future> Future for WithStreams<C>
where
    C::Output: Unpin,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        let collecting = Collecting::start();
        this.wanted.task.register(cx.waker());
        this.wanted.polling.store(true, Ordering::SeqCst);
        loop {
            // Streams first: what they answered is queued before the connection writes.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            // The connection only when it asked (a stream answered, its socket is ready, a
            // timer or a signal fired): most wake-ups are a stream's alone.
            if this.ended.is_none() && this.wanted.again.swap(false, Ordering::SeqCst) {
                let mut own = Context::from_waker(&this.waker);
                if let Poll::Ready(output) = this.connection.as_mut().poll(&mut own) {
                    this.ended = Some(output);
                }
            }
            // New streams (and upgrades a stream started) are polled at once; the connection
            // again when what they (or the streams before) answered asked for it.
            let new_streams = collecting.take_into(&mut this.streams);
            if new_streams == 0
                && (this.ended.is_some()
                    || (!this.wanted.again.load(Ordering::SeqCst) && this.wanted.stop_polling()))
            {
                break;
            }
        }
        if this.streams.is_empty()
            && let Some(output) = this.ended.take()
        {
            return Poll::Ready(output);
        }
        Poll::Pending
    }
}

/// The connection's waker. A wake-up while the connection's task is being polled only marks
/// the connection for that poll's loop; otherwise it wakes the task. Without it every answer a
/// stream queued woke the task it was polled on for one more poll that found nothing to do.
struct Wanted {
    /// The connection asked to be polled.
    again: AtomicBool,
    /// `WithStreams::poll` is running (and checks `again` before it returns).
    polling: AtomicBool,
    task: AtomicWaker,
}

impl Wanted {
    /// Ends a poll; false when a wake-up came in meanwhile (the poll goes on).
    fn stop_polling(&self) -> bool {
        self.polling.store(false, Ordering::SeqCst);
        // A waker on another thread either saw `polling` false (and woke the task) or set
        // `again` before this load (SeqCst on both sides).
        if self.again.load(Ordering::SeqCst) {
            self.polling.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

impl Wake for Wanted {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.again.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// The executor collects on this thread until dropped (also when a poll panics).
struct Collecting {
    /// What was collected before (a poll inside a poll): not this poll's.
    start: usize,
    was_collecting: bool,
}

impl Collecting {
    fn start() -> Self {
        Collecting {
            start: HANDED.with_borrow(Vec::len),
            was_collecting: COLLECTING.replace(true),
        }
    }

    /// Moves the streams handed over during this poll into `streams`; how many.
    fn take_into(&self, streams: &mut FuturesUnordered<StreamFuture>) -> usize {
        HANDED.with_borrow_mut(|handed| {
            let new = handed.len().saturating_sub(self.start);
            if new > 0 {
                streams.extend(handed.drain(self.start..));
            }
            new
        })
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        COLLECTING.set(self.was_collecting);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::FutureExt;
    use tokio::sync::oneshot;

    use super::*;

    /// A connection stand-in that hands `streams` over at its first poll, then ends
    /// when `end` fires.
    async fn connection(streams: Vec<StreamFuture>, end: oneshot::Receiver<()>) -> &'static str {
        for stream in streams {
            hand_over(stream);
        }
        let _ = end.await;
        "ended"
    }

    #[tokio::test]
    async fn streams_run_on_the_connection_task_and_outlive_the_connection() {
        let done = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        let quick = {
            let done = done.clone();
            Box::pin(async move {
                done.fetch_add(1, Ordering::SeqCst);
            }) as StreamFuture
        };
        let slow = {
            let done = done.clone();
            Box::pin(async move {
                let _ = released.await;
                done.fetch_add(1, Ordering::SeqCst);
            }) as StreamFuture
        };
        let (end, ended) = oneshot::channel();
        let mut served = Box::pin(WithStreams::new(connection(vec![quick, slow], ended)));

        assert!(served.as_mut().now_or_never().is_none());
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "a new stream is polled at once"
        );
        assert_eq!(
            HANDED.with_borrow(Vec::len),
            0,
            "nothing left on the thread"
        );
        assert!(!COLLECTING.get(), "collecting ends with the poll");

        end.send(()).unwrap();
        assert!(
            served.as_mut().now_or_never().is_none(),
            "the connection ended, a stream did not: still pending"
        );
        release.send(()).unwrap();
        assert_eq!(served.as_mut().now_or_never(), Some("ended"));
        assert_eq!(done.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn outside_a_connection_a_stream_gets_a_task() {
        let (sent, received) = oneshot::channel();
        hand_over(Box::pin(async move {
            let _ = sent.send(std::thread::current().id());
        }));
        assert_eq!(HANDED.with_borrow(Vec::len), 0);
        let ran_on = tokio::time::timeout(std::time::Duration::from_secs(5), received)
            .await
            .expect("the spawned task ran")
            .unwrap();
        assert_eq!(ran_on, std::thread::current().id());
    }

    #[tokio::test]
    async fn a_panicking_connection_poll_stops_the_collecting() {
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut served = Box::pin(WithStreams::new(async { panic!("in the poll") }));
            let _: Option<()> = served.as_mut().now_or_never();
        }));
        assert!(panicked.is_err());
        assert!(!COLLECTING.get());
    }
}
