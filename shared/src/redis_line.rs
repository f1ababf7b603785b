//! One connection to Redis shared by every caller of a hot path, their commands pipelined:
//! what many requests in flight ask at once goes to Redis over one socket, and its replies come
//! back in few reads.
//!
//! A pooled connection ([`crate::redis_wire`]) serves one call at a time: each call is a write
//! and a read on its own socket, and Redis reads, runs and answers each on its own, a system
//! call or two apiece on both sides. Redis is single-threaded and shared by every worker, so
//! that per-call cost is what bounds how far the workers scale: `redis-benchmark -c 16` with
//! `HMGET` measured 6.3 µs of Redis CPU per command one at a time and 1.6 µs eight to a
//! pipeline (docs/performance.md, section 58). Here every call's packed commands are appended to
//! one outgoing buffer and written by whichever caller polls first; the replies are read by
//! whoever is woken, cut at each call's last reply, and handed to their callers in the order
//! sent. No task of its own: the socket's readiness wakes the caller whose replies come next
//! (a waker that forwards to it), and that caller hands out all the replies it read.
//!
//! When the connection breaks, a call whose replies had not come does not know whether Redis
//! ran its commands, and is told so ([`LineError::Broke`]): a read can be sent again, a write
//! (the worker's session scripts) cannot, and its caller returns the error, as it would on a
//! pooled connection that broke. A call whose replies do
//! not come within the response timeout breaks the line (Redis stalled, or its machine is gone):
//! every call waiting on it fails at once and the next call connects again, as a pooled
//! connection whose call timed out is dropped. A call dropped half-way (its request cancelled)
//! leaves its replies to be read and thrown away.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis::{ConnectionInfo, RedisError, RedisResult};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::redis_pool::IDLE_CHECK;
use crate::redis_wire::{Socket, WireConnection};
use crate::resp;

/// Room made in the reply buffer before each read.
const READ_SIZE: usize = 16 * 1024;

/// Why a call on the line got no replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line broke before the call's replies came (Redis closed it, an I/O or protocol
    /// error, or another call timed out): Redis may or may not have run the commands.
    #[error("the shared connection to Redis broke before the reply: {0}")]
    Broke(String),
    /// No connection could be made; nothing was sent.
    #[error("no Redis connection: {0}")]
    Connect(String),
    /// Redis did not answer within the response timeout (the line is broken for all).
    #[error("Redis did not answer within {0:?}")]
    TimedOut(Duration),
    /// The call was not sent: it had no command.
    #[error("an empty command is not sent")]
    Empty,
    /// The call was not sent: its bytes are not `replies` whole commands.
    #[error("not sent: {replies} replies asked for packed commands that are {commands:?}")]
    Miscounted {
        /// Whole commands found (`None`: not whole commands).
        commands: Option<usize>,
        /// Replies the call would have waited for.
        replies: usize,
    },
}

impl From<LineError> for RedisError {
    fn from(error: LineError) -> Self {
        let kind = match error {
            LineError::TimedOut(_) => io::ErrorKind::TimedOut,
            LineError::Empty | LineError::Miscounted { .. } => io::ErrorKind::InvalidInput,
            LineError::Connect(_) => io::ErrorKind::NotConnected,
            LineError::Broke(_) => io::ErrorKind::ConnectionReset,
        };
        io::Error::new(kind, error.to_string()).into()
    }
}

/// The shared connection to one Redis, made on first use and again after it broke.
pub struct Line {
    info: ConnectionInfo,
    connect_timeout: Duration,
    response_timeout: Duration,
    shared: Arc<Shared>,
    /// One connect at a time: the callers that find the line down wait for the same one.
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Line")
            .field("addr", self.info.addr())
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// The socket woke the line while the state was locked: whoever holds it wakes the next
    /// call after letting go ([`Locked`]), so [`Forward`] never waits for the lock (it may be
    /// called where the lock is held, on the same thread: tokio wakes at once when a task's
    /// budget is spent outside a worker thread).
    missed: std::sync::atomic::AtomicBool,
}

/// The line's socket and the calls on it. Locked only between awaits, never across one.
struct State {
    socket: Option<Box<dyn Socket>>,
    /// Commands appended and not yet written.
    outgoing: Vec<u8>,
    /// The call that opened the batch in `outgoing` has not yet come back to write it: calls
    /// appended meanwhile wait for it, so that all go out in one write.
    gathering: Option<u64>,
    /// Replies read and not yet handed out.
    incoming: BytesMut,
    /// Calls whose replies are owed, in the order their commands were appended.
    owed: VecDeque<Owed>,
    /// Replies (or the line's failure) handed out and not yet taken by their call.
    answered: Vec<(u64, Result<Bytes, LineError>)>,
    next_id: u64,
    /// When the line last had no call owed its replies.
    idle_since: Instant,
    /// The waker the socket wakes: it wakes the call whose replies come next.
    forward: Waker,
    /// What the line did so far ([`Line::stats`]).
    stats: LineStats,
}

/// What a line (or all of [`Lines`]) did since it was made, for the worker's `/metrics`:
/// `calls / writes` is how many calls went to Redis in one write, on average.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Calls appended (each a few commands, one session read).
    pub calls: u64,
    /// Writes of appended commands to the socket.
    pub writes: u64,
    /// Connections made.
    pub connects: u64,
    /// Times a connection broke with calls on it or was found closed (Redis restarted, an I/O
    /// or protocol error, a call past the response timeout).
    pub breaks: u64,
}

impl std::ops::Add for LineStats {
    type Output = LineStats;

    fn add(self, other: LineStats) -> LineStats {
        LineStats {
            calls: self.calls + other.calls,
            writes: self.writes + other.writes,
            connects: self.connects + other.connects,
            breaks: self.breaks + other.breaks,
        }
    }
}

/// A call waiting for its replies.
struct Owed {
    id: u64,
    replies: usize,
    /// The call's task, woken when its replies are handed out (or when it must read them).
    waker: Option<Waker>,
    /// The call was dropped: its replies are read and thrown away.
    abandoned: bool,
}

impl Line {
    /// A line to `info`'s Redis (nothing is connected until the first call).
    pub fn new(
        info: ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            state: Mutex::new(State {
                socket: None,
                outgoing: Vec::new(),
                gathering: None,
                incoming: BytesMut::new(),
                owed: VecDeque::new(),
                answered: Vec::new(),
                next_id: 0,
                idle_since: Instant::now(),
                forward: Waker::from(Arc::new(Forward(weak.clone()))),
                stats: LineStats::default(),
            }),
            missed: std::sync::atomic::AtomicBool::new(false),
        });
        Line {
            info,
            connect_timeout,
            response_timeout,
            shared,
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends commands packed by the caller ([`resp::pack_command`]), `replies` of them, behind
    /// whatever other calls sent, connecting first when the line is down. `Err`: no connection
    /// could be made, and nothing was sent. The replies are then [`Sent::read`]'s.
    pub async fn send(&self, packed: &[u8], replies: usize) -> Result<Sent<'_>, LineError> {
        if packed.is_empty() || replies == 0 {
            return Err(LineError::Empty);
        }
        // A count short of the commands would leave replies owed on the line, handed to the
        // next call as its own (another request's session): checked on every call, by the
        // commands' lengths.
        let commands = resp::commands_in(packed);
        if commands != Some(replies) {
            return Err(LineError::Miscounted { commands, replies });
        }
        let id = self.append(packed, replies).await?;
        Ok(Sent {
            waiting: Waiting {
                shared: &self.shared,
                id,
                yielded: false,
            },
            replies,
            timeout: self.response_timeout,
        })
    }

    /// Appends the call's commands, connecting first when the line is down (or was idle long
    /// enough for a firewall to have forgotten it). Returns the call's id.
    async fn append(&self, packed: &[u8], replies: usize) -> Result<u64, LineError> {
        loop {
            {
                let mut state = self.shared.lock();
                if state.is_usable() {
                    let id = state.next_id;
                    state.next_id += 1;
                    state.stats.calls += 1;
                    if state.outgoing.is_empty() {
                        state.gathering = Some(id);
                    }
                    state.outgoing.extend_from_slice(packed);
                    state.owed.push_back(Owed {
                        id,
                        replies,
                        waker: None,
                        abandoned: false,
                    });
                    return Ok(id);
                }
            }
            self.connect().await?;
        }
    }

    /// What the line did so far.
    pub fn stats(&self) -> LineStats {
        self.shared.lock().stats
    }

    /// Connects the line, unless another caller did meanwhile.
    async fn connect(&self) -> Result<(), LineError> {
        let _one = self.connecting.lock().await;
        if self.shared.lock().is_usable() {
            return Ok(());
        }
        let connect = WireConnection::connect(&self.info, self.response_timeout);
        let socket = match tokio::time::timeout(self.connect_timeout, Box::pin(connect)).await {
            Ok(Ok(connection)) => connection.into_socket(),
            Ok(Err(error)) => return Err(LineError::Connect(error.to_string())),
            Err(_) => {
                return Err(LineError::Connect(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        let mut state = self.shared.lock();
        // Calls owed replies on the old socket (none unless it broke) fail; the new one is clean.
        state.fail("replaced by a new connection");
        state.socket = Some(socket);
        state.idle_since = Instant::now();
        state.stats.connects += 1;
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> Locked<'_> {
        // A panic while locked leaves nothing half-done that matters more than the line: the
        // state is still consistent enough to fail the calls on it.
        let guard = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Locked {
            shared: self,
            guard: Some(guard),
        }
    }

    /// Wakes the next call for a wake-up the socket gave while the state was locked, unless
    /// it is locked now (its holder does it when letting go).
    fn wake_missed(&self) {
        let guard = match self.state.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if self.missed.swap(false, Ordering::SeqCst) {
            guard.wake_next();
        }
    }
}

/// The locked state; on letting go, wakes the next call for a wake-up missed meanwhile.
struct Locked<'s> {
    shared: &'s Shared,
    guard: Option<MutexGuard<'s, State>>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.guard = None;
        if self.shared.missed.load(Ordering::SeqCst) {
            self.shared.wake_missed();
        }
    }
}

impl State {
    /// Whether a call may be appended: connected, and either in use or idle for less than
    /// [`IDLE_CHECK`] with nothing from Redis (its end, an error, bytes nobody asked for)
    /// waiting on the socket. A line idle longer is connected again rather than trusted.
    fn is_usable(&mut self) -> bool {
        let Some(socket) = &mut self.socket else {
            return false;
        };
        if self.owed.iter().any(|owed| !owed.abandoned) {
            return true;
        }
        // No call waits on it. Only given-up calls' replies owed (their requests cancelled
        // while the line was otherwise quiet), or idle a while: not trusted, connected again.
        if !self.owed.is_empty() || self.idle_since.elapsed() >= IDLE_CHECK {
            self.close_idle();
            return false;
        }
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        // The line's own waker: the probe takes the socket's one read registration.
        let mut context = Context::from_waker(&self.forward);
        if Pin::new(socket)
            .poll_read(&mut context, &mut probe)
            .is_ready()
        {
            self.socket = None;
            self.stats.breaks += 1;
            return false;
        }
        true
    }

    /// Writes what is waiting, reads what came, and hands out every call's replies that came
    /// whole. The socket wakes [`Forward`] when it can go on.
    fn drive(&mut self) {
        if let Err(error) = self.drive_io() {
            self.fail(&error.to_string());
        }
    }

    fn drive_io(&mut self) -> RedisResult<()> {
        let forward = self.forward.clone();
        let mut context = Context::from_waker(&forward);
        let Some(socket) = &mut self.socket else {
            return Ok(());
        };
        while self.gathering.is_none() && !self.outgoing.is_empty() {
            match Pin::new(&mut *socket).poll_write(&mut context, &self.outgoing) {
                Poll::Ready(Ok(0)) => return Err(closed()),
                Poll::Ready(Ok(written)) => {
                    self.outgoing.drain(..written);
                    self.stats.writes += 1;
                }
                Poll::Ready(Err(error)) => return Err(error.into()),
                Poll::Pending => break,
            }
        }
        loop {
            self.incoming.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(
                Pin::new(&mut *socket),
                &mut context,
                &mut self.incoming,
            ) {
                Poll::Ready(Ok(0)) => return Err(closed()),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(error)) => return Err(error.into()),
                Poll::Pending => break,
            }
        }
        while let Some(front) = self.owed.front() {
            let Some((end, _)) = resp::replies_end(&self.incoming, front.replies)? else {
                break;
            };
            let replies = self.incoming.split_to(end).freeze();
            let done = self.owed.pop_front().expect("a front");
            if !done.abandoned {
                self.answered.push((done.id, Ok(replies)));
                if let Some(waker) = done.waker {
                    waker.wake();
                }
            }
        }
        if self.owed.is_empty() {
            if !self.incoming.is_empty() {
                return Err(RedisError::from((
                    redis::ErrorKind::Client,
                    "Redis sent a reply nobody asked for",
                )));
            }
            self.idle_since = Instant::now();
        }
        Ok(())
    }

    /// Closes a line no call waits on (only given-up calls' replies owed, if any): the next call
    /// connects again.
    fn close_idle(&mut self) {
        self.socket = None;
        self.outgoing.clear();
        self.gathering = None;
        self.incoming.clear();
        self.owed.clear();
    }

    /// Breaks the line: every call owed replies gets `why`, and the next call connects again.
    fn fail(&mut self, why: &str) {
        if self.socket.is_some() {
            self.stats.breaks += 1;
        }
        self.socket = None;
        self.outgoing.clear();
        self.gathering = None;
        self.incoming.clear();
        for owed in self.owed.drain(..) {
            if !owed.abandoned {
                self.answered
                    .push((owed.id, Err(LineError::Broke(why.to_string()))));
                if let Some(waker) = owed.waker {
                    waker.wake();
                }
            }
        }
    }

    /// The call `id` waited `timeout` in vain: if its replies are still owed, Redis is stalled or
    /// gone, and the line is broken for all (a pooled connection whose call timed out is
    /// dropped the same way).
    fn time_out(&mut self, id: u64, timeout: Duration) {
        if let Some(owed) = self.owed.iter_mut().find(|owed| owed.id == id) {
            owed.abandoned = true;
            owed.waker = None;
            self.fail(&format!("a call waited {timeout:?} for Redis"));
        } else {
            self.answered.retain(|(answered, _)| *answered != id);
        }
    }

    /// Wakes the first call still waiting, which reads for all.
    fn wake_next(&self) {
        if let Some(waker) = self
            .owed
            .iter()
            .find(|owed| !owed.abandoned)
            .and_then(|owed| owed.waker.as_ref())
        {
            waker.wake_by_ref();
        }
    }
}

/// The error of a connection Redis closed.
fn closed() -> RedisError {
    io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection").into()
}

/// The waker the socket holds: wakes the first call still waiting, which reads for all. Never
/// waits for the state's lock ([`Shared::missed`]).
struct Forward(Weak<Shared>);

impl Wake for Forward {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.0.upgrade() {
            // Noted first, then looked at if the lock is free: a holder that lets go after
            // this finds it noted.
            shared.missed.store(true, Ordering::SeqCst);
            shared.wake_missed();
        }
    }
}

/// A call whose commands are on the line.
pub struct Sent<'l> {
    waiting: Waiting<'l>,
    replies: usize,
    timeout: Duration,
}

impl Sent<'_> {
    /// Waits for the call's replies and has `read` read them in place
    /// ([`resp::read_replies`]): what Redis answered (`Ok(None)`: not what `read` expected; a
    /// server error among the replies is the inner error, as on a pooled connection,
    /// [`WireConnection::exchange_packed`]), or the line's breaking before they came.
    pub async fn read<T>(
        self,
        read: impl FnOnce(&mut resp::Cursor<'_>) -> Option<T>,
    ) -> Result<RedisResult<Option<T>>, LineError> {
        let Sent {
            waiting,
            replies,
            timeout,
        } = self;
        let shared = waiting.shared;
        let id = waiting.id;
        let bytes = match tokio::time::timeout(timeout, waiting).await {
            Ok(answer) => answer?,
            Err(_) => {
                shared.lock().time_out(id, timeout);
                return Err(LineError::TimedOut(timeout));
            }
        };
        Ok(match resp::read_replies(&bytes, replies, read) {
            Ok(Some((_, answer))) => answer,
            Err(error) => Err(error),
            // The line cut these bytes at the end of exactly `replies` replies.
            Ok(None) => Err(RedisError::from((
                redis::ErrorKind::Client,
                "replies cut short on the shared connection",
            ))),
        })
    }
}

/// A call waiting for its replies on the line.
struct Waiting<'l> {
    shared: &'l Arc<Shared>,
    id: u64,
    /// Whether it let the other ready tasks run once (see [`State::gathering`]).
    yielded: bool,
}

impl Future for Waiting<'_> {
    type Output = Result<Bytes, LineError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.shared.lock();
        if let Some(answer) = state.take_answer(self.id) {
            return Poll::Ready(answer);
        }
        if state.gathering == Some(self.id) {
            if !self.yielded {
                // The batch's opener: first let the other tasks ready to run append theirs
                // (woken now, it runs after them), then write them all in one go.
                drop(state);
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            state.gathering = None;
        }
        state.drive();
        if let Some(answer) = state.take_answer(self.id) {
            return Poll::Ready(answer);
        }
        match state.owed.iter_mut().find(|owed| owed.id == self.id) {
            Some(owed) => {
                if !owed.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    owed.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            // Neither owed nor answered: taken already (polled after it was ready).
            None => Poll::Ready(Err(LineError::Broke(
                "the call was already answered".into(),
            ))),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state.take_answer(self.id).is_some() {
            return;
        }
        if state.gathering == Some(self.id) {
            // Its batch is written by whoever polls next.
            state.gathering = None;
        }
        if let Some(owed) = state.owed.iter_mut().find(|owed| owed.id == self.id) {
            owed.abandoned = true;
            owed.waker = None;
            // If the socket would have woken this call to read for all, another must now.
            state.wake_next();
        }
    }
}

impl State {
    fn take_answer(&mut self, id: u64) -> Option<Result<Bytes, LineError>> {
        let at = self
            .answered
            .iter()
            .position(|(answered, _)| *answered == id)?;
        Some(self.answered.swap_remove(at).1)
    }
}

/// One [`Line`] per serving thread (as many as the machine has CPUs, found by the thread's
/// place in the order threads first called): a thread's calls are batched on its own line, and
/// the task that reads the replies wakes the others on its own thread, not across threads
/// (with one line shared by two threads, the worker's CPU per session request did not fall;
/// docs/performance.md, section 58).
#[derive(Debug)]
pub struct Lines {
    lines: Box<[Line]>,
}

impl Lines {
    /// `count` lines (at least one) to `info`'s Redis; nothing connects before a call.
    pub fn new(
        info: &ConnectionInfo,
        connect_timeout: Duration,
        response_timeout: Duration,
        count: usize,
    ) -> Self {
        Lines {
            lines: (0..count.max(1))
                .map(|_| Line::new(info.clone(), connect_timeout, response_timeout))
                .collect(),
        }
    }

    /// What all the lines did so far.
    pub fn stats(&self) -> LineStats {
        self.lines
            .iter()
            .fold(LineStats::default(), |sum, line| sum + line.stats())
    }

    /// The calling thread's line.
    pub fn line(&self) -> &Line {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static THREADS: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static PLACE: usize = THREADS.fetch_add(1, Ordering::Relaxed);
        }
        &self.lines[PLACE.with(|place| *place) % self.lines.len()]
    }
}
