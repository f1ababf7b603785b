//! A client's socket as hyper sees it: the timeouts a public gateway needs on a client
//! connection, and the one framing check hyper leaves out.
//!
//! ```text
//!  accept ──▶ Head ── head complete (the service is called) ──▶ Busy ── response done ──▶ Idle
//!             │ timeouts.request_head                                                  │ timeouts.client_idle
//!             ▲                                                                        │
//!             └──────────────────── first byte of the next request (HTTP/1.1) ◀────────┘
//!  bytes of the next head read while Busy (`next_head_begun`): Busy ── done ──▶ Head
//!  any phase: a write that makes no progress for timeouts.client_send cuts the connection
//!  after a 101: no read timer (the tunnel has its own idle timeout, `crate::tunnel`)
//! ```
//!
//! A timer that runs out makes the next read (or write) fail with `TimedOut`; hyper then closes
//! the connection, dropping the request in progress and with it the worker connection that fed
//! it. The timers are armed only when a read or write would wait, so a busy connection pays a
//! few atomic loads per read and nothing else.
//!
//! Why not hyper's `header_read_timeout`: in hyper 1.12 (`proto/h1/conn.rs`,
//! `Conn::poll_read_head`) its timer starts when an HTTP/1 connection is ready to read a head —
//! at its first poll and again right after each response is written — so one value bounds the
//! idle keep-alive time and the head's arrival together: 10 s would close idle keep-alive
//! connections, 60 s lets a slowloris client hold a connection a minute per request. And
//! hyper-util's auto builder first reads up to 24 bytes to tell HTTP/2's preface from HTTP/1,
//! with no timer at all: a client that connected and sent nothing stayed forever (measured with
//! the previous code: still open after 3 s with `client_idle` = 1 s).
//!
//! The framing check: hyper reads a request with both `Content-Length` and `Transfer-Encoding`
//! by the latter alone and closes the connection after it (RFC 9112 §6.1 allows that), but it
//! removes `Content-Length` before the request reaches the service, so the gateway could not
//! refuse such a request. [`HeadScan`] watches the header names of heads as they are read.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// The client-side timeouts, copied out of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// `timeouts.request_head`.
    pub head: Duration,
    /// `timeouts.client_idle`.
    pub idle: Duration,
    /// `timeouts.client_send`.
    pub send: Duration,
}

/// What the request path tells the socket about the connection (shared: the service and the
/// socket run on the same thread, but hyper wants both `Send`).
#[derive(Debug, Default)]
pub struct ConnectionState {
    /// Requests whose response is not done.
    open: AtomicU32,
    /// Requests begun, so the socket sees one that came and went between two reads.
    begun: AtomicU64,
    /// The connection switched protocols: no more HTTP on it.
    switched: AtomicBool,
    /// HTTP/2: no head phases after the first request (pings arrive while idle).
    http2: AtomicBool,
    /// A head with both `Content-Length` and `Transfer-Encoding` was read.
    conflicting_framing: AtomicBool,
    /// The last request (HTTP/1) came with a body not yet read to its end: a close lingers
    /// (`ClientIo::poll_shutdown`), and the connection is not between requests.
    had_body: AtomicBool,
    /// The connection's task, parked in a read while a request was in progress: woken when the
    /// last request ends, so the idle timer starts then (hyper does not read again by itself).
    reader: AtomicWaker,
    /// HTTP/1.1 between requests, with nothing half done: the last response written and
    /// flushed, the last request had no body, no request in progress, and no byte read since
    /// the response (hyper may still hold bytes of a pipelined request read with the last one,
    /// which `into_parts` returns). Only then may the connection move to another serving
    /// thread (see [`ConnectionState::between_requests`]).
    between_requests: AtomicBool,
    /// Requests numbered below this one (counted as `begun` counts them) had bytes of a next
    /// request read behind their head: hyper holds those (HTTP/1.1 pipelining).
    pipelined_below: AtomicU64,
    /// Reads that brought bytes (for a hang-up watch waiting for hyper to read: `crate::hang_up`).
    reads: AtomicU64,
}

impl ConnectionState {
    /// A request's head has been read; the guard marks its response done when dropped (put it
    /// in the response body).
    pub fn begin(self: &Arc<Self>, version: http::Version, with_body: bool) -> RequestGuard {
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        } else {
            self.had_body.store(with_body, Ordering::Relaxed);
        }
        self.between_requests.store(false, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.begun.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            state: self.clone(),
        }
    }

    /// The number of the request begun last (1 for the first).
    pub fn latest_request(&self) -> u64 {
        self.begun.load(Ordering::Relaxed)
    }

    /// The body of request number `request` ([`ConnectionState::latest_request`]) has been
    /// read to its end (HTTP/1): no byte of it is left unread, so none holds the connection
    /// between requests, and a close need not linger. Nothing changes once a later request
    /// has begun.
    pub fn body_read(&self, request: u64) {
        if self.begun.load(Ordering::Relaxed) == request {
            self.had_body.store(false, Ordering::Relaxed);
        }
    }

    /// The connection switched protocols (a 101 went out).
    pub fn switched(&self) {
        self.switched.store(true, Ordering::Relaxed);
    }

    /// Whether a head read so far had both `Content-Length` and `Transfer-Encoding`.
    pub fn conflicting_framing(&self) -> bool {
        self.conflicting_framing.load(Ordering::Relaxed)
    }

    /// Whether bytes of a next request were read with the head of the request begun last (HTTP/1.1
    /// pipelining, as far as [`HeadScan`] follows it: not behind a request with a body). Hyper
    /// holds them, so a client that hangs up after sending them has still asked for answers
    /// (`crate::hang_up`).
    pub fn pipelined_behind(&self) -> bool {
        self.begun.load(Ordering::Relaxed) < self.pipelined_below.load(Ordering::Relaxed)
    }

    /// Reads from the socket that brought bytes, so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// One more read brought bytes.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a request has begun on the connection (on any thread).
    pub fn has_begun(&self) -> bool {
        self.begun.load(Ordering::Relaxed) > 0
    }

    /// Whether a request is in progress (its response not done).
    pub fn in_request(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    /// Whether the connection is HTTP/1.1 between two requests with nothing half done, as its
    /// socket saw it at its last read: no request in progress, the last response written and
    /// flushed, no request body left unread. Hyper then holds nothing of the connection but
    /// the bytes of the next request it may have read ahead (`Parts::read_buf`), so the socket
    /// can be taken from it and served elsewhere, or closed, with nothing lost. Meant for the
    /// connection's own task, right after hyper returned Pending.
    pub fn between_requests(&self) -> bool {
        self.between_requests.load(Ordering::Relaxed)
            && self.open.load(Ordering::Relaxed) == 0
            && !self.switched.load(Ordering::Relaxed)
    }
}

/// One request in progress on a connection; see [`ConnectionState::begin`].
#[derive(Debug)]
pub struct RequestGuard {
    state: Arc<ConnectionState>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.state.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.state.reader.wake();
        }
    }
}

/// Where the connection is, as the socket sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head, until then (set when a read first waits: a
    /// head that arrives whole costs no clock read).
    Head(Option<Instant>),
    /// A request in progress.
    Busy,
    /// Nothing in progress, until then (set when a read first waits).
    Idle(Option<Instant>),
    /// Switched protocols.
    Tunnel,
}

/// A client's stream — its TCP socket, or the TLS session over it (`crate::tls`) — with the
/// connection's timeouts (see the module doc). Generic so the cleartext path stays a plain
/// `TcpStream` with no indirection.
#[derive(Debug)]
pub struct ClientIo<S = TcpStream> {
    stream: S,
    state: Arc<ConnectionState>,
    timeouts: ClientTimeouts,
    phase: Phase,
    /// `state.begun` when the phase was last updated.
    seen: u64,
    read_timer: Option<Deadline>,
    /// When a stuck write gives up; `None` while writes make progress.
    write_deadline: Option<Instant>,
    write_timer: Option<Deadline>,
    scan: HeadScan,
    /// Whether reads go through `scan`: not while the gateway's own HTTP/1.1 server reads, which
    /// parses every head itself ([`ClientIo::stop_head_scan`]).
    scanning: bool,
    /// Meanwhile, bytes read behind the heads that server parsed go through `scan` instead: how
    /// many of them it has seen (`None`: none are waiting).
    behind: Option<usize>,
    /// Set once the write side is shut and the rest of a request body is being read away,
    /// until then.
    lingering: Option<Instant>,
    /// Bytes read from the socket before this `ClientIo` was made (to tell HTTP/2 from
    /// HTTP/1.1, or by another serving thread), given to the first reads.
    prefix: Bytes,
    /// How many of the prefix's first bytes came through this `ClientIo` already
    /// ([`ClientIo::put_back`]): seen, not seen again.
    prefix_seen: usize,
    /// Everything written has been flushed (hyper flushes after each response).
    flushed: bool,
    /// Bytes of the next request's head came while this one was busy
    /// ([`ClientIo::next_head_begun`]): when it ends, that head is due.
    next_head: bool,
}

impl<S> ClientIo<S> {
    /// A freshly accepted connection (after its TLS handshake, if any): its first head is due
    /// within `timeouts.head` from now.
    pub fn new(stream: S, state: Arc<ConnectionState>, timeouts: ClientTimeouts) -> Self {
        ClientIo {
            stream,
            state,
            timeouts,
            phase: Phase::Head(None),
            seen: 0,
            read_timer: None,
            write_deadline: None,
            write_timer: None,
            scan: HeadScan::default(),
            scanning: true,
            behind: None,
            lingering: None,
            prefix: Bytes::new(),
            prefix_seen: 0,
            flushed: true,
            next_head: false,
        }
    }

    /// A connection taken over from another serving thread between two requests
    /// ([`ConnectionState::between_requests`]): idle, its next head not begun.
    pub fn resumed(stream: S, state: Arc<ConnectionState>, timeouts: ClientTimeouts) -> Self {
        let seen = state.begun.load(Ordering::Relaxed);
        ClientIo {
            phase: Phase::Idle(None),
            seen,
            ..ClientIo::new(stream, state, timeouts)
        }
    }

    /// The first head is due by `until` (its first bytes were read before this `ClientIo` was
    /// made, under the same deadline).
    pub fn head_due(mut self, until: Instant) -> Self {
        self.phase = Phase::Head(Some(until));
        self
    }

    /// Serves `prefix` (bytes already read from the stream) before reading the stream.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = prefix;
        self
    }

    /// Reads no longer go through the head scan: the reader parses every head itself and tells
    /// the connection what the scan would ([`ClientIo::head_parsed`]). The scan
    /// costs about 2 % of a plain request's instructions (`infra/bench/instructions.sh h1`);
    /// [`ClientIo::put_back`] turns it on again.
    pub fn stop_head_scan(&mut self) {
        self.scanning = false;
        self.behind = None;
    }

    /// Under [`ClientIo::stop_head_scan`]: the head of the next request to begin, `taken` bytes,
    /// was parsed off the front of the reader's buffer, and `rest` is what the buffer holds behind
    /// it. Tells the connection's state what the scan would have: whether bytes of another
    /// request came with this one (pipelining, for the hang-up watch), and whether a head among
    /// them has both `Content-Length` and `Transfer-Encoding` (then this request is refused too,
    /// as when the scan saw them arrive). Bytes behind a head are scanned once, however many heads
    /// they hold; without any (nearly every request) this is two stores. Bytes behind it are
    /// the start of the next head too ([`ClientIo::next_head_begun`]); none, and an earlier
    /// notice is used up.
    pub fn head_parsed(&mut self, taken: usize, rest: &[u8]) {
        let next = self.state.begun.load(Ordering::Relaxed) + 1;
        let more = !rest.is_empty();
        self.next_head = more;
        self.state
            .pipelined_below
            .store(next + u64::from(more), Ordering::Relaxed);
        if !more {
            self.behind = None;
            return;
        }
        // `rest` starts a head (a request read here has no body or one read whole with its
        // head, taken with it). The scan goes on where
        // it stopped if it saw past this head, and starts over at `rest` otherwise.
        let seen = match self.behind {
            Some(seen) if seen >= taken && seen - taken <= rest.len() => seen - taken,
            _ => {
                self.scan = HeadScan::at_http1_head();
                0
            }
        };
        if self.scan.feed(&rest[seen..]) {
            self.state
                .conflicting_framing
                .store(true, Ordering::Relaxed);
        }
        self.behind = Some(rest.len());
    }

    /// Gives `bytes`, read through this `ClientIo` and not used, to the next reads: the
    /// gateway's own HTTP/1.1 server hands a request it leaves to hyper over this way
    /// (`crate::plain_http1`). Heads the scan counted when they were read are not counted again;
    /// after [`ClientIo::stop_head_scan`] the scan starts over with these bytes.
    pub fn put_back(&mut self, bytes: Bytes) {
        // Read unscanned (`stop_head_scan`): the scan starts over at the head they begin with
        // (the reader took any body whole with its head, so a head begins there) and sees them.
        let seen = if self.scanning { bytes.len() } else { 0 };
        if !self.scanning {
            self.scanning = true;
            self.behind = None;
            self.scan = HeadScan::at_http1_head();
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            // In front of what is left of an earlier prefix, which has not been seen.
            let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        };
        self.prefix_seen += seen;
    }

    /// The bytes waiting to be read ahead of the stream (see [`ClientIo::with_prefix`]), all at
    /// once, counted as a read of them would count them: the gateway's own HTTP/1.1 server makes
    /// its read buffer of a new connection's first bytes this way instead of copying them out.
    pub fn take_prefix(&mut self) -> Bytes {
        self.update_phase();
        let prefix = std::mem::take(&mut self.prefix);
        let seen = std::mem::take(&mut self.prefix_seen).min(prefix.len());
        if prefix.len() > seen {
            self.received(&prefix[seen..]);
        }
        prefix
    }

    /// The stream and the connection's state, for another serving thread to go on with.
    pub fn into_parts(self) -> (S, Arc<ConnectionState>) {
        (self.stream, self.state)
    }

    /// Catches up with what the request path did since the last read.
    fn update_phase(&mut self) {
        let state = &self.state;
        if state.switched.load(Ordering::Relaxed) {
            self.phase = Phase::Tunnel;
            return;
        }
        let begun = state.begun.load(Ordering::Relaxed);
        if state.open.load(Ordering::Relaxed) > 0 {
            self.phase = Phase::Busy;
            self.seen = begun;
        } else if self.phase == Phase::Busy || begun != self.seen {
            self.phase = if std::mem::take(&mut self.next_head) {
                Phase::Head(None)
            } else {
                Phase::Idle(None)
            };
            self.seen = begun;
        }
    }

    /// Bytes read while a request is busy are the start of the next request's head (the
    /// gateway's own HTTP/1.1 server knows: it takes a body whole with its head): once this request ends,
    /// the connection waits for the rest under `timeouts.request_head`, as when they arrive
    /// after it, not under the idle timeout. Used up when the request ends, or when that head
    /// is parsed ([`ClientIo::head_parsed`]).
    pub fn next_head_begun(&mut self) {
        self.next_head = true;
    }

    /// Bytes arrived: the first ones after an idle spell start a head (HTTP/1.1).
    fn received(&mut self, bytes: &[u8]) {
        self.state.between_requests.store(false, Ordering::Relaxed);
        self.state.count_read();
        let http1 = !self.state.http2.load(Ordering::Relaxed);
        if matches!(self.phase, Phase::Idle(_)) && http1 {
            self.phase = Phase::Head(None);
            self.scan.next_head();
        }
        if !matches!(self.phase, Phase::Head(_)) || !self.scanning {
            return;
        }
        let ended = self.scan.heads_ended;
        if self.scan.feed(bytes) {
            self.state
                .conflicting_framing
                .store(true, Ordering::Relaxed);
        }
        let completed = self.scan.heads_ended - ended;
        if completed > 0 {
            // Hyper begins the requests of these heads after this read: the last one is
            // `begun + completed`, and bytes after its head belong to the next.
            let last = self.state.begun.load(Ordering::Relaxed) + completed;
            let below = last + u64::from(self.scan.bytes_after_last_head);
            self.state.pipelined_below.store(below, Ordering::Relaxed);
        }
    }
}

/// A connection's timer, and the waker it holds.
#[derive(Debug)]
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// The waker the timer holds: set by a poll that registered it, cleared when the timer is
    /// moved (a moved timer holds no waker until polled again).
    armed: Option<Waker>,
}

/// Polls `timer` for `until` (made on first use); true when `until` has passed.
///
/// A timer set earlier than `until` is left where it is and moved on when it fires: the idle
/// deadline moves forward with every request of a keep-alive connection, and moving the timer
/// each time cost a timer-wheel removal and insertion per request. An earlier `until` (a head
/// due sooner than the idle deadline) moves the timer at once.
///
/// A timer that holds the waker of this poll and has not fired wakes the poll when it does: it
/// is not polled again until then (each poll registered the same waker anew, about 100
/// instructions per request of a keep-alive connection). It is polled outside tokio's
/// cooperative budget: a `Sleep` polled with the task's budget spent returns `Pending` without
/// registering any waker, and the skip would then leave it unregistered for good.
fn ran_out(timer: &mut Option<Deadline>, until: Instant, cx: &mut Context<'_>) -> bool {
    let timer = timer.get_or_insert_with(|| Deadline {
        sleep: Box::pin(tokio::time::sleep_until(until)),
        armed: None,
    });
    if timer.sleep.deadline() > until {
        timer.sleep.as_mut().reset(until);
        timer.armed = None;
    }
    let holds_this_waker = (timer.armed.as_ref()).is_some_and(|armed| armed.will_wake(cx.waker()));
    if holds_this_waker && !timer.sleep.is_elapsed() {
        return false;
    }
    timer.armed = None;
    while pin!(tokio::task::unconstrained(timer.sleep.as_mut()))
        .poll(cx)
        .is_ready()
    {
        if timer.sleep.deadline() >= until {
            return true;
        }
        timer.sleep.as_mut().reset(until);
    }
    timer.armed = Some(cx.waker().clone());
    false
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl<S: AsyncRead + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.update_phase();
        let before = buf.filled().len();
        if !this.prefix.is_empty() {
            let taken = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(taken));
            let seen = this.prefix_seen.min(taken);
            this.prefix_seen -= seen;
            if taken > seen {
                this.received(&buf.filled()[before + seen..]);
            }
            if this.prefix.is_empty() {
                // An empty tail still holds the whole buffer it came from.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.received(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let (until, what) = match &mut this.phase {
                    Phase::Head(until) => (
                        *until.get_or_insert_with(|| Instant::now() + this.timeouts.head),
                        "request head not received in time",
                    ),
                    Phase::Idle(until) => {
                        let state = &this.state;
                        if this.flushed
                            && !state.had_body.load(Ordering::Relaxed)
                            && !state.http2.load(Ordering::Relaxed)
                        {
                            state.between_requests.store(true, Ordering::Relaxed);
                        }
                        (
                            *until.get_or_insert_with(|| Instant::now() + this.timeouts.idle),
                            "idle client connection",
                        )
                    }
                    Phase::Busy => {
                        this.state.reader.register(cx.waker());
                        // The request may have ended between `update_phase` and `register`.
                        if this.state.open.load(Ordering::Relaxed) == 0 {
                            cx.waker().wake_by_ref();
                        }
                        return Poll::Pending;
                    }
                    Phase::Tunnel => return Poll::Pending,
                };
                if ran_out(&mut this.read_timer, until, cx) {
                    return Poll::Ready(Err(timed_out(what)));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl<S> ClientIo<S> {
    /// Arms the send timer while the client takes nothing (from the first wait on); the error
    /// once `timeouts.send` has run out.
    fn send_ran_out(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let until = *self
            .write_deadline
            .get_or_insert_with(|| Instant::now() + self.timeouts.send);
        ran_out(&mut self.write_timer, until, cx)
            .then(|| timed_out("client accepted no data in time"))
    }

    /// Arms the send timer when a write waits, clears it when one makes progress.
    fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Pending => match self.send_ran_out(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
            Poll::Ready(Ok(written)) if written > 0 => {
                self.write_deadline = None;
                Poll::Ready(Ok(written))
            }
            ready => ready,
        }
    }

    /// [`ClientIo::watch_write`] for a flush or a shutdown: over TLS both write the session's
    /// records (what a write left buffered, the `close_notify`), and a client that reads nothing
    /// holds them as it holds a write. On cleartext both are ready at once.
    fn watch_wait(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        match result {
            Poll::Pending => match self.send_ran_out(cx) {
                Some(error) => Poll::Ready(Err(error)),
                None => Poll::Pending,
            },
            ready => {
                self.write_deadline = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = false;
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        this.flushed = matches!(flushed, Poll::Ready(Ok(())));
        this.watch_wait(cx, flushed)
    }

    /// Closes the write side; if the last request declared a body, then reads and discards
    /// what the client still sends until it closes too, for at most [`LINGER`] (nginx's
    /// `lingering_close`). Hyper closes a connection whose request body it did not read — a
    /// 413, or an answer that came before the upload ended — and closing a socket with unread
    /// bytes makes the kernel send a reset, which can reach the client before it read the
    /// answer: it would see a broken pipe instead of the 413.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let until = match this.lingering {
            Some(until) => until,
            None => {
                let shut = Pin::new(&mut this.stream).poll_shutdown(cx);
                ready!(this.watch_wait(cx, shut))?;
                if !this.state.had_body.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(()));
                }
                *this.lingering.insert(Instant::now() + LINGER)
            }
        };
        let mut scratch = [0u8; 8192];
        for _ in 0..LINGER_READS_PER_POLL {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed (or reset): nothing is left to lose.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return if ran_out(&mut this.read_timer, until, cx) {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        // A fast sender: let other connections of this thread run, then read on.
        cx.waker().wake_by_ref();
        if ran_out(&mut this.read_timer, until, cx) {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

/// How long a closing connection reads away the rest of a request body (see
/// `ClientIo::poll_shutdown`).
const LINGER: Duration = Duration::from_secs(2);

/// Reads of at most 8 KiB per wake-up while lingering.
const LINGER_READS_PER_POLL: usize = 16;

/// The HTTP/2 preface's first line; a connection starting with it is not scanned.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Watches the header names of HTTP/1.1 request heads as their bytes are read, for
/// `Content-Length` together with `Transfer-Encoding`, and counts the heads (for the hang-up
/// watch, `crate::hang_up`: which requests have bytes of a next one read behind them). Not a
/// parser: hyper parses (and rejects what is malformed); this only looks at the first bytes of
/// each header line, up to the blank line, and at the digits of `Content-Length`. After a head
/// without a body it goes on into the next head read with it (pipelining), and after a body of a
/// plain `Content-Length` read with its head, too (skipping the body whole: a body can hold any
/// bytes). After a chunked head, or a body that goes on into later reads, it stops until the next
/// head starts after an idle spell. A pipelined head it does not see is left to hyper, which
/// reads a request with both headers by `Transfer-Encoding` alone and closes the connection after
/// it; the gateway re-frames every body it sends a worker, so the worker sees no ambiguity.
#[derive(Debug, Default)]
pub(crate) struct HeadScan {
    at: ScanAt,
    content_length: bool,
    transfer_encoding: bool,
    /// Bytes of the connection's first line that matched the HTTP/2 preface's so far.
    preface: usize,
    /// The first line was not the HTTP/2 preface's (or a head was seen).
    http1: bool,
    /// The head's `Content-Length`, once its value was read (`None`: none yet, or not a plain
    /// number, or two that differ).
    length: Option<u64>,
    /// A `Content-Length` value was not a plain number (or two differed).
    length_unknown: bool,
    /// Heads whose end was read.
    heads_ended: u64,
    /// The last `feed` that ended a head had bytes after the end of the last request in it (its
    /// head, or its `Content-Length` body): bytes of a next request — or, behind a chunked body,
    /// maybe (counted as if).
    bytes_after_last_head: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ScanAt {
    /// In the request line.
    #[default]
    RequestLine,
    /// At the start of a header line.
    LineStart,
    /// In a header name: bytes so far, and whether they still match each of the two names.
    Name {
        length: usize,
        content_length: bool,
        transfer_encoding: bool,
    },
    /// In a header value (or a line to skip).
    Value,
    /// In the value of a `Content-Length` header: its number so far (`None`: not a plain
    /// number), and whether a digit was seen.
    Length { value: Option<u64>, digits: bool },
    /// In a body of a known length: bytes still to come.
    Body(u64),
    /// After the `\r` of the blank line.
    BlankLine,
    /// Not looking (in a body, or an HTTP/2 connection).
    Off,
}

const CONTENT_LENGTH: &[u8] = b"content-length";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";

impl HeadScan {
    /// A scan of an HTTP/1.1 connection (no HTTP/2 preface to look for) at the start of a head.
    fn at_http1_head() -> Self {
        HeadScan {
            http1: true,
            ..HeadScan::default()
        }
    }

    /// A new head starts with the next byte (unless this is an HTTP/2 connection).
    pub(crate) fn next_head(&mut self) {
        if self.http1 {
            self.start_head();
        }
    }

    fn start_head(&mut self) {
        self.at = ScanAt::RequestLine;
        self.content_length = false;
        self.transfer_encoding = false;
        self.length = None;
        self.length_unknown = false;
    }

    /// Scans `bytes`; true when a head with both framing headers ended in them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut conflict = false;
        let mut at = 0;
        let ended = self.heads_ended;
        // Where the last request read in full ends (its head, or its body), and where the last
        // head ends.
        let mut last_request_end = 0;
        let mut last_head_end = 0;
        while at < bytes.len() {
            let skip_line = match self.at {
                ScanAt::Off => break,
                ScanAt::Body(remaining) => {
                    // Skipped whole: a body holds any bytes.
                    let taken = remaining.min((bytes.len() - at) as u64);
                    at += taken as usize;
                    if taken == remaining {
                        self.start_head();
                        last_request_end = at;
                    } else {
                        self.at = ScanAt::Body(remaining - taken);
                    }
                    continue;
                }
                // Within a request line (once known not to be HTTP/2's) or a header value only
                // the line's end matters: jump to it rather than stepping byte by byte (this
                // scan runs over every request head; byte steps cost 0.65 % of the gateway's
                // CPU under wrk).
                ScanAt::Value => true,
                ScanAt::RequestLine => self.http1,
                _ => false,
            };
            if skip_line {
                match memchr::memchr(b'\n', &bytes[at..]) {
                    Some(offset) => at += offset,
                    None => break,
                }
            }
            let before = self.heads_ended;
            conflict |= self.step(bytes[at]);
            at += 1;
            if self.heads_ended != before {
                last_head_end = at;
                if self.at == ScanAt::RequestLine {
                    last_request_end = at;
                }
            }
        }
        if self.heads_ended != ended {
            self.bytes_after_last_head = match self.at {
                // The last request's body goes on past these bytes.
                ScanAt::Body(_) => false,
                // A chunked body (or one of no plain length): where it ends is not followed.
                ScanAt::Off => last_head_end < bytes.len(),
                _ => last_request_end < bytes.len(),
            };
        }
        conflict
    }

    fn step(&mut self, byte: u8) -> bool {
        match self.at {
            ScanAt::RequestLine => {
                if !self.http1 {
                    if H2_PREFACE_LINE.get(self.preface) == Some(&byte) {
                        self.preface += 1;
                        if self.preface == H2_PREFACE_LINE.len() {
                            // An HTTP/2 connection: frames, not heads.
                            self.at = ScanAt::Off;
                        }
                        return false;
                    }
                    self.http1 = true;
                }
                if byte == b'\n' {
                    self.at = ScanAt::LineStart;
                }
            }
            ScanAt::LineStart => {
                self.at = match byte {
                    b'\r' => ScanAt::BlankLine,
                    b'\n' => return self.end_of_head(),
                    _ => ScanAt::Name {
                        length: 0,
                        content_length: true,
                        transfer_encoding: true,
                    },
                };
                if matches!(self.at, ScanAt::Name { .. }) {
                    return self.step(byte);
                }
            }
            ScanAt::Name {
                length,
                content_length,
                transfer_encoding,
            } => {
                self.at = match byte {
                    b':' => {
                        let is_length = content_length && length == CONTENT_LENGTH.len();
                        self.content_length |= is_length;
                        self.transfer_encoding |=
                            transfer_encoding && length == TRANSFER_ENCODING.len();
                        if is_length {
                            ScanAt::Length {
                                value: Some(0),
                                digits: false,
                            }
                        } else {
                            ScanAt::Value
                        }
                    }
                    b'\n' => ScanAt::LineStart,
                    _ => {
                        let lower = byte.to_ascii_lowercase();
                        let content_length =
                            content_length && CONTENT_LENGTH.get(length) == Some(&lower);
                        let transfer_encoding =
                            transfer_encoding && TRANSFER_ENCODING.get(length) == Some(&lower);
                        if content_length || transfer_encoding {
                            ScanAt::Name {
                                length: length.saturating_add(1),
                                content_length,
                                transfer_encoding,
                            }
                        } else {
                            // Neither name: only the line's end matters now, and `feed` jumps
                            // to it (stepping through every name cost 21 steps per request).
                            ScanAt::Value
                        }
                    }
                };
            }
            ScanAt::Value => {
                if byte == b'\n' {
                    self.at = ScanAt::LineStart;
                }
            }
            ScanAt::Length { value, digits } => match byte {
                b'0'..=b'9' => {
                    let value = value
                        .and_then(|v| v.checked_mul(10))
                        .and_then(|v| v.checked_add(u64::from(byte - b'0')));
                    self.at = ScanAt::Length {
                        value,
                        digits: true,
                    };
                }
                b' ' | b'\t' | b'\r' => {}
                b'\n' => {
                    match (value.filter(|_| digits), self.length) {
                        (Some(value), None) => self.length = Some(value),
                        (Some(value), Some(before)) if value == before => {}
                        _ => self.length_unknown = true,
                    }
                    self.at = ScanAt::LineStart;
                }
                _ => {
                    self.at = ScanAt::Length {
                        value: None,
                        digits,
                    };
                }
            },
            ScanAt::BlankLine => {
                if byte == b'\n' {
                    return self.end_of_head();
                }
                // Malformed; hyper rejects it.
                self.at = ScanAt::Off;
            }
            // `feed` skips bodies whole.
            ScanAt::Off | ScanAt::Body(_) => {}
        }
        false
    }

    fn end_of_head(&mut self) -> bool {
        self.heads_ended += 1;
        let conflict = self.content_length && self.transfer_encoding;
        let length = self.length.filter(|_| !self.length_unknown);
        if self.transfer_encoding {
            // Chunked: where the body ends is hyper's business.
            self.at = ScanAt::Off;
        } else if self.content_length {
            match length {
                // No body after all: what follows is the next head.
                Some(0) => self.start_head(),
                // The next head follows the body.
                Some(length) => self.at = ScanAt::Body(length),
                // Hyper rejects it.
                None => self.at = ScanAt::Off,
            }
        } else {
            // No body: what follows is the next head.
            self.start_head();
        }
        conflict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five seconds for a head and to send; `idle` between requests.
    fn timeouts(idle: Duration) -> ClientTimeouts {
        ClientTimeouts {
            head: Duration::from_secs(5),
            idle,
            send: Duration::from_secs(5),
        }
    }

    /// Polls `poll` until ready, as a task of its own would (a task's waker tells it is the
    /// one a timer holds; `block_on`'s may not). Its first polls come with the task's
    /// cooperative budget spent, and it is woken for them by something else than its timers:
    /// those polls find a timer holding this waker and leave it (`ran_out`), so the timer's own
    /// wake-up must bring the last poll, which must end in a time-out.
    async fn times_out_with_budget_spent<T: Send + 'static>(
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<io::Result<T>> + Send + 'static,
    ) {
        let task = tokio::spawn(async move {
            let mut polls = 0;
            let output = std::future::poll_fn(|cx| {
                polls += 1;
                if polls <= 3 {
                    // Spends the budget (the poll that finds it spent wakes the task).
                    while pin!(tokio::task::coop::consume_budget())
                        .poll(cx)
                        .is_ready()
                    {}
                }
                poll(cx)
            })
            .await;
            (output, polls)
        });
        let (result, polls) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the timer woke the task")
            .unwrap();
        assert_eq!(
            result.err().map(|e| e.kind()),
            Some(io::ErrorKind::TimedOut)
        );
        assert!(polls > 3, "polled {polls} times");
    }

    #[tokio::test]
    async fn an_idle_timer_polled_with_the_budget_spent_and_again_before_it_fires_ends_the_read() {
        let (stream, _client) = tokio::io::duplex(64);
        let state = Arc::new(ConnectionState::default());
        let mut io = ClientIo::resumed(stream, state, timeouts(Duration::from_millis(200)));
        times_out_with_budget_spent(move |cx| {
            let mut scratch = [0u8; 16];
            Pin::new(&mut io).poll_read(cx, &mut ReadBuf::new(&mut scratch))
        })
        .await;
    }

    #[tokio::test]
    async fn a_send_timer_polled_with_the_budget_spent_ends_a_write_the_client_does_not_read() {
        use tokio::io::AsyncWrite;
        let (stream, _client) = tokio::io::duplex(64);
        let state = Arc::new(ConnectionState::default());
        let timeouts = ClientTimeouts {
            send: Duration::from_millis(200),
            ..timeouts(Duration::from_secs(5))
        };
        let mut io = ClientIo::new(stream, state, timeouts);
        times_out_with_budget_spent(move |cx| {
            loop {
                // Writes until the client's side is full, then waits on the send timer.
                match Pin::new(&mut io).poll_write(cx, &[b'x'; 64]) {
                    Poll::Ready(Ok(_)) => continue,
                    other => return other,
                }
            }
        })
        .await;
    }

    /// A TLS session over an in-memory pipe of 64 bytes, its handshake done: the gateway's end
    /// and the client's (which reads nothing after).
    async fn tls_over_a_pipe() -> (
        tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    ) {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        // No session tickets after the handshake: the server's end would wait to send them
        // through the pipe, which a client that reads nothing never empties.
        server.send_tls13_tickets = 0;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (gateway_end, client_end) = tokio::io::duplex(64);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let (server, client) = tokio::join!(
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(gateway_end),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, client_end),
        );
        (server.unwrap(), client.unwrap())
    }

    /// `ClientIo` over a TLS session whose client reads nothing, a send timeout of 200 ms, after
    /// a write the session took whole: its records wait in the session, not sent.
    async fn tls_io_with_records_waiting() -> (
        ClientIo<tokio_rustls::server::TlsStream<tokio::io::DuplexStream>>,
        tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
    ) {
        use tokio::io::AsyncWriteExt;
        let (server, client) = tls_over_a_pipe().await;
        let timeouts = ClientTimeouts {
            send: Duration::from_millis(200),
            ..timeouts(Duration::from_secs(5))
        };
        let mut io = ClientIo::new(server, Arc::new(ConnectionState::default()), timeouts);
        let written = io.write(&[b'x'; 4096]).await.unwrap();
        assert_eq!(written, 4096, "the session takes the write whole");
        (io, client)
    }

    #[tokio::test]
    async fn over_tls_a_flush_the_client_takes_nothing_of_ends_after_the_send_timeout() {
        use tokio::io::AsyncWrite;
        let (mut io, _client) = tls_io_with_records_waiting().await;
        times_out_with_budget_spent(move |cx| Pin::new(&mut io).poll_flush(cx)).await;
    }

    #[tokio::test]
    async fn over_tls_a_shutdown_the_client_takes_nothing_of_ends_after_the_send_timeout() {
        use tokio::io::AsyncWrite;
        let (mut io, _client) = tls_io_with_records_waiting().await;
        times_out_with_budget_spent(move |cx| Pin::new(&mut io).poll_shutdown(cx)).await;
    }

    #[tokio::test]
    async fn heads_parsed_by_the_reader_tell_pipelining_and_a_smuggled_head_behind_them() {
        let (stream, _client) = tokio::io::duplex(1024);
        let state = Arc::new(ConnectionState::default());
        let timeouts = timeouts(Duration::from_secs(5));
        let mut io = ClientIo::new(stream, state.clone(), timeouts);
        io.stop_head_scan();
        // Alone in the buffer: no pipelining.
        io.head_parsed(30, b"");
        let _first = state.begin(http::Version::HTTP_11, false);
        assert!(!state.pipelined_behind());
        // A next head read with it, and part of a third: scanned once, up to where it stops.
        let second: &[u8] = b"GET /b HTTP/1.1\r\nhost: a\r\n\r\n";
        let third = b"POST /c HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        let behind = [second, &third[..12]].concat();
        io.head_parsed(30, &behind);
        let _second_begun = state.begin(http::Version::HTTP_11, false);
        assert!(state.pipelined_behind());
        assert!(
            !state.conflicting_framing(),
            "the third head is not whole yet"
        );
        // The second is parsed off; the rest of the third arrived: the scan goes on after the
        // 12 bytes of it that it saw (past them, it would miss `content-length`).
        let rest = [&third[..12], &third[12..]].concat();
        io.head_parsed(second.len(), &rest);
        assert!(
            state.conflicting_framing(),
            "both framing headers behind a plain head"
        );
        // Given back (the third is not for the reader): the scan is on again, from that head.
        io.put_back(Bytes::from(rest));
        assert!(io.scanning && io.behind.is_none() && io.prefix_seen == 0);
    }

    #[tokio::test]
    async fn bytes_put_back_come_again_before_the_rest_and_are_not_counted_twice() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (stream, mut client) = tokio::io::duplex(1024);
        let state = Arc::new(ConnectionState::default());
        let timeouts = timeouts(Duration::from_secs(5));
        let first: &[u8] = b"GET /a HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut io = ClientIo::new(stream, state.clone(), timeouts).with_prefix(Bytes::from(first));
        // Read the first head and a bit of the second, give it back: it comes first, then the
        // rest of the prefix, then the socket.
        let mut part = [0u8; 30];
        io.read_exact(&mut part).await.unwrap();
        assert_eq!(io.scan.heads_ended, 1);
        io.put_back(Bytes::copy_from_slice(&part));
        client.write_all(b"GET /c").await.unwrap();
        let mut all = vec![0u8; first.len() + 6];
        io.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..first.len()], first);
        assert_eq!(&all[first.len()..], b"GET /c");
        // The first head was counted when first read, not again.
        assert_eq!(io.scan.heads_ended, 2);
    }

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scan = HeadScan::default();
        chunks
            .iter()
            .fold(false, |found, chunk| found | scan.feed(chunk))
    }

    #[test]
    fn both_framing_headers_are_found_in_any_case_and_split() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        for split in 1..head.len() {
            assert!(scan(&[&head[..split], &head[split..]]), "split at {split}");
        }
        assert!(scan(&[
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
        ]));
        // Names that share a prefix with one of the two (the scan stops reading a name once it
        // can be neither), before both, and the head fed a byte at a time.
        let head: &[u8] = b"POST / HTTP/1.1\r\nContent-Type: a\r\nTE: b\r\nContent-Lengt: 1\r\n\
            Transfer-Encodings: c\r\nCONTENT-LENGTH: 3\r\ntRANSFER-eNCODING: chunked\r\n\r\n";
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytes));
        let without_transfer_encoding = head.len() - b"tRANSFER-eNCODING: chunked\r\n\r\n".len();
        assert!(!scan(&[&head[..without_transfer_encoding], b"\r\n"]));
    }

    #[test]
    fn one_framing_header_or_lookalikes_are_fine() {
        assert!(!scan(&[b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\ncontent-length: 1\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nx-content-length: 3\r\ntransfer-encoding-x: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nx: content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn a_pipelined_head_behind_a_bodiless_one_is_scanned() {
        assert!(scan(&[
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        ]));
    }

    #[test]
    fn heads_ended_and_bytes_behind_the_last_are_counted_per_read() {
        let mut scan = HeadScan::default();
        scan.feed(b"GET /a HTTP/1.1\r\nhost: a\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        assert_eq!(scan.heads_ended, 2);
        assert!(!scan.bytes_after_last_head, "the read ended with a head");
        scan.feed(b"GET /c HTTP/1.1\r\n\r\nGET /d HT");
        assert_eq!(scan.heads_ended, 3);
        assert!(
            scan.bytes_after_last_head,
            "a part of the next head was read"
        );
        scan.feed(b"TP/1.1\r\nhost: a");
        assert_eq!(scan.heads_ended, 3);
        assert!(scan.bytes_after_last_head, "no head ended: unchanged");
        scan.feed(b"\r\n\r\n");
        assert_eq!(scan.heads_ended, 4);
        assert!(!scan.bytes_after_last_head);
        scan.feed(b"POST /e HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert_eq!(scan.heads_ended, 5);
        assert!(!scan.bytes_after_last_head, "a body, not a next request");
    }

    #[test]
    fn heads_behind_a_body_of_known_length_are_counted_not_behind_a_chunked_one() {
        let mut scan = HeadScan::default();
        scan.feed(b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n");
        assert_eq!(
            scan.heads_ended, 2,
            "the body skipped, the head behind it seen"
        );
        assert!(!scan.bytes_after_last_head);
        scan.feed(b"POST /c HTTP/1.1\r\nContent-Length:  0 \r\n\r\nGET /d");
        assert_eq!(scan.heads_ended, 3, "a zero length is no body");
        assert!(scan.bytes_after_last_head, "part of the next head");
        let mut scan = HeadScan::default();
        scan.feed(b"POST /a HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc");
        assert_eq!(scan.heads_ended, 1);
        assert!(!scan.bytes_after_last_head, "the body goes on");
        let mut scan = HeadScan::default();
        scan.feed(b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert!(!scan.bytes_after_last_head, "the body ended with the read");
        let mut scan = HeadScan::default();
        scan.feed(b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n");
        assert_eq!(scan.heads_ended, 1);
        assert!(
            scan.bytes_after_last_head,
            "where a chunked body ends is not followed"
        );
        for odd in [&b"1x"[..], b"", b"3, 3", b"99999999999999999999999"] {
            let mut scan = HeadScan::default();
            let head = [
                b"POST /a HTTP/1.1\r\ncontent-length: ".as_slice(),
                odd,
                b"\r\n\r\nabc",
            ]
            .concat();
            scan.feed(&head);
            assert!(
                scan.bytes_after_last_head,
                "{}: not a plain length",
                String::from_utf8_lossy(odd)
            );
        }
        let mut scan = HeadScan::default();
        scan.feed(b"POST /a HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd");
        assert!(scan.bytes_after_last_head, "two lengths that differ");
    }

    #[test]
    fn a_smuggled_head_behind_a_body_of_known_length_is_found() {
        assert!(scan(&[
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabcPOST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\ncontent-length: 70\r\n\r\nPOST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        ]), "inside the body: only bytes");
    }

    #[test]
    fn http2_connections_are_not_scanned() {
        assert!(!scan(&[
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\ncontent-length: 1\ntransfer-encoding: x\n\n"
        ]));
    }

    #[test]
    fn the_next_head_is_scanned_again_after_a_body() {
        let mut scan = HeadScan::default();
        assert!(!scan.feed(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"));
        scan.next_head();
        assert!(
            scan.feed(
                b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
            )
        );
    }
}
