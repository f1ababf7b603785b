//! The client connections of one serving thread, driven to their end: closed gracefully when
//! the gateway stops, and handed to another serving thread between two requests when the
//! threads rebalance (`crate::consolidation`).
//!
//! ```text
//! close_idle(): idle HTTP/1.1 ──▶ closed now          busy ──▶ closed after its response
//!               not yet past its first request ──▶ serves it, then closes
//!               HTTP/2 ──▶ GOAWAY, closed when its streams end
//! close_all():  the same, and a TLS handshake or a wait for first bytes ends now
//! shed(n):      the next n HTTP/1.1 cleartext connections found between two requests give
//!               their socket back (`Ended::Handed`) for the serving thread to hand over
//! back_to_own_server: hyper's HTTP/1.1 connection gives its socket back between two requests
//!               (`Ended::Returned`) for the gateway's own server (`crate::plain_http1`)
//! ```
//!
//! Every connection's task is registered in a per-thread slab (its waker), so the thread can
//! reach connections parked in an idle read; a connection looks at the thread's signals on
//! each poll (one thread-local read). This replaces hyper-util's `GracefulShutdown`, whose
//! watch polled a `watch` receiver on every wake-up of every connection (540 instructions per
//! request, docs/performance.md section 11) and kept the connection out of reach.
//!
//! Between two requests (`ConnectionState::between_requests`: the last response written and
//! flushed, no request body unread, no request in progress) hyper holds nothing of an HTTP/1.1
//! connection but the bytes of the next request it may have read ahead, which `into_parts`
//! returns with the socket: the connection moves, or closes, without a byte lost and without
//! the client seeing anything.

use std::cell::{Cell, RefCell};
use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use slab::Slab;

use crate::client_io::{ClientIo, ConnectionState};

type BoxError = Box<dyn StdError + Send + Sync>;

/// The connections of this thread.
#[derive(Default)]
struct Registry {
    /// The task of every open connection.
    tasks: Slab<Waker>,
    /// Woken when the last connection ends.
    all_ended: Option<Waker>,
}

/// What this thread asks of its connections.
#[derive(Debug, Clone, Copy, Default)]
struct Signals {
    /// Raised by each [`close_idle`] and [`close_all`]: connections registered before it close.
    closes: u32,
    /// Set by [`close_all`]: the thread stops, and connections that have not sent a request yet
    /// close too.
    stopping: bool,
    /// HTTP/1.1 connections still to give their socket back ([`shed`]).
    shed: usize,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::default();
    static SIGNALS: Cell<Signals> = const {
        Cell::new(Signals {
            closes: 0,
            stopping: false,
            shed: 0,
        })
    };
}

/// Wakes every connection of this thread.
fn wake_all() {
    let tasks: Vec<Waker> = REGISTRY.with(|registry| {
        registry
            .borrow()
            .tasks
            .iter()
            .map(|(_, waker)| waker.clone())
            .collect()
    });
    for task in tasks {
        task.wake();
    }
}

/// Tells every connection open on this thread to close: an idle keep-alive one now (after
/// reading what already arrived: a request the client sent just before is served, not dropped),
/// one with a request in progress after its response, HTTP/2 with GOAWAY once its streams end.
/// A connection that has not sent its first request yet (TLS handshake, first bytes) serves it:
/// its client just connected to send one, and closing it would race with that request for
/// sure. Connections opened later are not told (until the next call).
pub(crate) fn close_idle() {
    raise_close(false);
}

/// [`close_idle`], and the thread stops: a connection still in its TLS handshake or waiting for
/// its first bytes closes now too.
pub(crate) fn close_all() {
    raise_close(true);
}

fn raise_close(stopping: bool) {
    SIGNALS.with(|signals| {
        let mut now = signals.get();
        now.closes = now.closes.wrapping_add(1);
        now.stopping |= stopping;
        signals.set(now);
    });
    wake_all();
}

/// Asks `count` HTTP/1.1 cleartext connections of this thread (in place of an earlier ask) to
/// give their socket back at their next moment between two requests.
pub(crate) fn shed(count: usize) {
    SIGNALS.with(|signals| {
        let mut now = signals.get();
        now.shed = count;
        signals.set(now);
    });
    if count > 0 {
        wake_all();
    }
}

/// How many connections an earlier [`shed`] still asks for.
#[cfg(test)]
pub(crate) fn still_to_shed() -> usize {
    SIGNALS.with(|signals| signals.get().shed)
}

/// One connection less to shed; false when none was asked for.
pub(crate) fn take_shed() -> bool {
    SIGNALS.with(|signals| {
        let mut now = signals.get();
        if now.shed == 0 {
            return false;
        }
        now.shed -= 1;
        signals.set(now);
        true
    })
}

/// Completes when no connection of this thread is open.
pub(crate) async fn all_ended() {
    poll_fn(|cx| {
        REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            if registry.tasks.is_empty() {
                Poll::Ready(())
            } else {
                registry.all_ended = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    })
    .await
}

/// Open connections on this thread.
#[cfg(test)]
pub(crate) fn open() -> usize {
    REGISTRY.with(|registry| registry.borrow().tasks.len())
}

/// A connection's place in its thread's registry, until dropped. Made when the thread takes
/// the connection (before its task first runs), so that [`close_all`] and [`all_ended`] see it
/// from then on.
#[derive(Debug)]
pub(crate) struct Entry {
    key: usize,
    /// `Signals::closes` when the connection opened.
    closes: u32,
}

impl Entry {
    /// A connection new to this thread. `resumed`: one handed over between two requests,
    /// which is told to close if the thread was told to already (a new connection is not: it
    /// serves one request, answered with `Connection: close` while the gateway drains).
    pub(crate) fn new(resumed: bool) -> Self {
        let key =
            REGISTRY.with(|registry| registry.borrow_mut().tasks.insert(Waker::noop().clone()));
        let closes = SIGNALS.with(|signals| signals.get().closes);
        Entry {
            key,
            closes: if resumed && closes > 0 {
                closes - 1
            } else {
                closes
            },
        }
    }

    /// Runs `future` until it completes, or until the thread stops ([`close_all`]; then
    /// `None`): for a connection in its TLS handshake or before its first bytes, which has
    /// nothing to finish. [`close_idle`] does not end it: its first request is served.
    pub(crate) async fn until_stopped<F: Future>(&self, future: F) -> Option<F::Output> {
        let mut future = std::pin::pin!(future);
        poll_fn(|cx| {
            self.polled_by(cx.waker());
            // First what arrived: bytes that came with the signal are a request to serve.
            if let Poll::Ready(output) = future.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            if self.told_to_stop() {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Keeps the task's waker (a spawned task's is the same on every poll: no clone then).
    pub(crate) fn polled_by(&self, waker: &Waker) {
        REGISTRY.with(|registry| {
            let mut registry = registry.borrow_mut();
            let task = &mut registry.tasks[self.key];
            if !task.will_wake(waker) {
                task.clone_from(waker);
            }
        });
    }

    /// Whether the thread told its connections to close since this one opened.
    pub(crate) fn told_to_close(&self) -> bool {
        SIGNALS.with(|signals| signals.get().closes != self.closes)
    }

    /// Whether the thread stops, and told this connection so.
    fn told_to_stop(&self) -> bool {
        self.told_to_close() && SIGNALS.with(|signals| signals.get().stopping)
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // `try_with`: a runtime dropped while the thread ends drops its tasks late.
        let all_ended = REGISTRY.try_with(|registry| {
            let mut registry = registry.borrow_mut();
            registry.tasks.try_remove(self.key);
            if registry.tasks.is_empty() {
                registry.all_ended.take()
            } else {
                None
            }
        });
        if let Ok(Some(waker)) = all_ended {
            waker.wake();
        }
    }
}

/// How an HTTP/1.1 connection's serving ended.
pub(crate) enum Ended<S> {
    /// It is over (with the error it ended with, if any).
    Closed(Result<(), hyper::Error>),
    /// It gave its socket back between two requests ([`shed`]): the stream, its state and the
    /// bytes of the next request already read from it.
    Handed {
        stream: S,
        state: Arc<ConnectionState>,
        read_ahead: Bytes,
    },
    /// It gave its socket back between two requests for the gateway's own HTTP/1.1 server to
    /// serve on, here (`Http1::back_to_own_server`): the same parts as `Handed`.
    Returned {
        stream: S,
        state: Arc<ConnectionState>,
        read_ahead: Bytes,
    },
}

/// An HTTP/1.1 connection (with upgrades) of this thread, served until it ends or is handed
/// over.
pub(crate) struct Http1<'a, S, Svc>
where
    Svc: HttpService<Incoming>,
{
    connection: Option<http1::UpgradeableConnection<TokioIo<ClientIo<S>>, Svc>>,
    state: Arc<ConnectionState>,
    entry: &'a Entry,
    /// May give its socket back (cleartext; a TLS session stays where its handshake was).
    movable: bool,
    /// Gives its socket back at the first moment between two requests, for the gateway's own
    /// server to serve the next ones (`crate::plain_http1` left it a request it does not serve).
    back_to_own_server: bool,
    told_to_close: bool,
    /// Hyper was told to close after the response in progress.
    closing_after_response: bool,
}

impl<'a, S, Svc> Http1<'a, S, Svc>
where
    Svc: HttpService<Incoming>,
{
    /// Serves `connection`, whose socket reports to `state`, registered as `entry`; `movable`:
    /// may be handed over.
    pub(crate) fn new(
        connection: http1::UpgradeableConnection<TokioIo<ClientIo<S>>, Svc>,
        state: Arc<ConnectionState>,
        entry: &'a Entry,
        movable: bool,
    ) -> Self {
        Http1 {
            connection: Some(connection),
            state,
            entry,
            movable,
            back_to_own_server: false,
            told_to_close: false,
            closing_after_response: false,
        }
    }

    /// Ends with [`Ended::Returned`] as soon as the connection is between two requests.
    pub(crate) fn back_to_own_server(mut self, back: bool) -> Self {
        self.back_to_own_server = back;
        self
    }
}

impl<S, Svc, B> Future for Http1<'_, S, Svc>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B> + Unpin,
    Svc::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Ended<S>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended<S>> {
        let this = self.get_mut();
        this.entry.polled_by(cx.waker());
        if !this.told_to_close && this.entry.told_to_close() {
            this.told_to_close = true;
        }
        // Once told to close, a request in progress gets `Connection: close` on its response (if
        // its head is not written yet) and the connection closes after it. Not while no request
        // is in progress: hyper would close at once, dropping the bytes of a next head it has
        // begun to read; that request is told when it begins.
        let close_after_response = |this: &mut Self| {
            if !this.told_to_close || this.closing_after_response || !this.state.in_request() {
                return;
            }
            if let Some(connection) = this.connection.as_mut() {
                this.closing_after_response = true;
                Pin::new(connection).graceful_shutdown();
            }
        };
        close_after_response(this);
        // Hyper runs first, also when just told to close: the bytes of a next request that
        // arrived since its last read begin that request, instead of going down with the socket
        // (the client would see its connection closed under a request it had sent).
        let Some(connection) = this.connection.as_mut() else {
            return Poll::Ready(Ended::Closed(Ok(())));
        };
        if let Poll::Ready(result) = Pin::new(connection).poll(cx) {
            this.connection = None;
            return Poll::Ready(Ended::Closed(result));
        }
        // A request that began in this poll.
        close_after_response(this);
        if !this.state.between_requests() {
            return Poll::Pending;
        }
        if this.told_to_close {
            // Idle, nothing arrived, and hyper would wait for a next request (one handed over
            // here has not served one on this thread, so hyper does not count it idle).
            this.connection = None;
            return Poll::Ready(Ended::Closed(Ok(())));
        }
        // Back to the own server before any hand-over: it sheds connections as well.
        let back = this.back_to_own_server;
        if !(back || this.movable && take_shed()) {
            return Poll::Pending;
        }
        let parts = this.connection.take().and_then(|c| c.into_parts());
        let Some(parts) = parts else {
            return Poll::Ready(Ended::Closed(Ok(())));
        };
        let (stream, state) = parts.io.into_inner().into_parts();
        let read_ahead = parts.read_buf;
        Poll::Ready(if back {
            Ended::Returned {
                stream,
                state,
                read_ahead,
            }
        } else {
            Ended::Handed {
                stream,
                state,
                read_ahead,
            }
        })
    }
}

/// Any other connection of this thread (HTTP/2, a refusal), closed gracefully when told.
pub(crate) struct Watched<C> {
    connection: Pin<Box<C>>,
    entry: Entry,
    told_to_close: bool,
}

impl<C> Watched<C> {
    /// Serves `connection`, registered as `entry`.
    pub(crate) fn new(connection: C, entry: Entry) -> Self {
        Watched {
            connection: Box::pin(connection),
            entry,
            told_to_close: false,
        }
    }
}

impl<C> Future for Watched<C>
where
    C: Graceful,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.entry.polled_by(cx.waker());
        if !this.told_to_close && this.entry.told_to_close() {
            this.told_to_close = true;
            this.connection.as_mut().close_gracefully();
        }
        this.connection.as_mut().poll(cx)
    }
}

/// A connection that can be closed gracefully (its requests in flight finish, no new ones are
/// taken): hyper's, and the gateway's HTTP/2 server's.
pub(crate) trait Graceful: Future {
    /// Starts the graceful close.
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<C: GracefulConnection> Graceful for C {
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<T> Graceful for crate::h2_server::Http2Connection<T>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.get_mut().graceful_shutdown();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn signals_reach_connections_opened_before_them_only() {
        let before = Entry::new(false);
        assert!(!before.told_to_close());
        close_all();
        let after = Entry::new(false);
        let moved_here_after = Entry::new(true);
        assert!(before.told_to_close());
        assert!(!after.told_to_close(), "opened after the signal");
        assert!(
            moved_here_after.told_to_close(),
            "handed over after the signal: told at once"
        );
        assert_eq!(open(), 3);
        drop((before, after, moved_here_after));
        assert_eq!(open(), 0);
        all_ended().await;
    }

    #[tokio::test]
    async fn a_connection_before_its_first_request_outlives_close_idle_not_close_all() {
        let entry = Entry::new(false);
        let (_client_sends, first_bytes) = tokio::sync::oneshot::channel::<()>();
        let mut waiting = Box::pin(entry.until_stopped(first_bytes));
        assert!(waiting.as_mut().now_or_never().is_none());
        close_idle();
        assert!(entry.told_to_close());
        assert!(
            waiting.as_mut().now_or_never().is_none(),
            "its client just connected to send a request: it is served"
        );
        close_all();
        assert!(matches!(waiting.as_mut().now_or_never(), Some(None)));
    }

    #[tokio::test]
    async fn bytes_that_came_with_the_stop_are_served() {
        let entry = Entry::new(false);
        close_all();
        let arrived = std::future::ready("GET / HTTP/1.1");
        assert_eq!(
            entry.until_stopped(arrived).now_or_never(),
            Some(Some("GET / HTTP/1.1"))
        );
    }

    #[tokio::test]
    async fn shedding_counts_down_and_a_new_ask_replaces_the_old() {
        shed(2);
        assert!(take_shed());
        shed(1);
        assert_eq!(still_to_shed(), 1);
        assert!(take_shed());
        assert!(!take_shed());
        assert_eq!(still_to_shed(), 0);
    }

    #[tokio::test]
    async fn all_ended_waits_for_the_last_connection() {
        let entry = Entry::new(false);
        let mut waiting = Box::pin(all_ended());
        assert!(waiting.as_mut().now_or_never().is_none());
        drop(entry);
        assert!(waiting.as_mut().now_or_never().is_some());
    }
}
