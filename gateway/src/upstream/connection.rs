//! One keep-alive TCP connection to a worker: connect, write a request, read the response head.
//!
//! The connection is driven by the task of the client's request itself — no connection task,
//! no channel between the two — so a request costs two writes and two reads on the sockets and
//! no wake-up of another task. Its buffers live as long as the connection and are reused.
//!
//! This is where an attempt's failure gets its two facts ([`UpstreamError`]):
//! - **reached or not**: "not reached" means provably not — the connect failed, the kernel
//!   took not one byte of the request, or the worker's FIN came before any answer without
//!   acknowledging a byte of it (it had closed the connection first: [`acked`]). Once a byte went
//!   out the worker may act on it, so a broken write after that is "reached" (a POST is then not
//!   replayed elsewhere).
//! - **whose fault**: a client body that breaks off or stalls is the client's
//!   ([`UpstreamErrorKind::ClientBody`]); a worker that takes no bytes, or gives no response head,
//!   within `timeouts.response_header` is the worker's. The response-header clock starts once the
//!   request is fully written, so a slow upload never counts against the worker.

use std::io::IoSlice;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::acked;
use super::codec::{self, Parsed, RequestFraming, ResponseHead};
use super::error::{UpstreamError, UpstreamErrorKind};
use super::request_body::{BodyError, UpstreamBody, client_went_away};
use crate::headers::{Forwarding, RawRequestHead};

/// How soon after a request went out a close of a kept-alive connection still means the worker
/// closed it idle (its FIN was already on the way: one network round trip, plus scheduling). A
/// close later than this means the worker had the request and died with it: a reset, which
/// counts as an attempt and against the worker.
const STALE_WINDOW: Duration = Duration::from_millis(100);

/// Bytes asked of the kernel per read of a response head, and of a body's next bytes but for
/// a known rest longer than this (read as one piece, `upstream::body`).
pub(super) const READ_CHUNK: usize = 8 * 1024;
/// Bodies up to this size are copied behind the head and go out in one write.
const COALESCE_BODY: usize = 16 * 1024;

/// A connection to a worker, idle or carrying one request: its [`Socket`], boxed. A
/// connection moves with every request (out of the pool, into the attempt, into the response
/// body, back to the pool); as a pointer that is 8 bytes a move instead of 112, in every future
/// and response that holds it (docs/performance.md, section 20). The box is made once per
/// connection, not per request.
#[derive(Debug)]
pub struct Connection(Box<Socket>);

impl std::ops::Deref for Connection {
    type Target = Socket;
    fn deref(&self) -> &Socket {
        &self.0
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut Socket {
        &mut self.0
    }
}

/// The state of a [`Connection`]: the socket, its buffers and its head timer.
#[derive(Debug)]
pub struct Socket {
    stream: TcpStream,
    /// Bytes read from the worker and not consumed yet.
    pub(super) read: BytesMut,
    write: BytesMut,
    /// Where the rest of a long body is read, a piece at a time, each piece handed on as it is
    /// ([`Socket::poll_read_long`]; no allocation until a body needs it).
    long: BytesMut,
    /// Whether it carried a request before (a failure on it may be the worker's idle close).
    reused: bool,
    /// Bytes the kernel took on it so far: TCP acknowledges a connection's bytes by their
    /// position in it, so this is where a request's first byte is ([`acked`]).
    sent: u64,
    /// How long the worker keeps it open while idle, as its last answer said (`Keep-Alive:
    /// timeout=N`): the pool stops offering it [`codec::IDLE_MARGIN`] before that.
    pub(super) worker_idle: Option<std::time::Duration>,
    /// The response-head timeout, kept from request to request and moved on for each: a
    /// deadline later than the one registered is a compare-and-swap in tokio's timer, where a
    /// new timer per request was a registration in its wheel and a removal (about 500
    /// instructions per request, docs/performance.md section 13).
    head_timer: Option<Pin<Box<Sleep>>>,
}

/// What to send: the parts of the request the worker sees.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    /// Headers, hop-by-hop ones already removed.
    pub headers: &'a HeaderMap,
    /// The client's header lines as it sent them, written before `headers` (see
    /// `headers::RawRequestHead`).
    pub raw: Option<&'a RawRequestHead>,
    /// What the gateway adds for the worker (written after `headers`).
    pub forwarding: Forwarding<'a>,
    /// Whether the client declared a length (an empty declared body is sent as length 0).
    pub declared_length: Option<u64>,
    /// The body.
    pub body: UpstreamBody,
    /// Keep the response's header lines as the worker sent them (`ResponseHead::raw`), for a
    /// client served by the gateway's own HTTP/1.1 server, instead of a header map.
    pub raw_response: bool,
}

impl Connection {
    /// Connects to `authority` within `timeout`.
    pub async fn open(authority: &Authority, timeout: Duration) -> Result<Self, UpstreamError> {
        let connect = TcpStream::connect(authority.as_str());
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                // Refused or no route: nothing serves there (a timeout may be a full backlog).
                let kind = match error.kind() {
                    std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable => UpstreamErrorKind::Refused,
                    _ => UpstreamErrorKind::Connect,
                };
                return Err(not_reached(kind, error));
            }
            Err(_) => {
                return Err(UpstreamError {
                    kind: UpstreamErrorKind::Connect,
                    reached: false,
                    detail: format!("connect timed out after {timeout:?}"),
                });
            }
        };
        // Requests and responses are small and complete when written: send them at once.
        let _ = stream.set_nodelay(true);
        Ok(Connection(Box::new(Socket {
            stream,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(1024),
            long: BytesMut::new(),
            reused: false,
            sent: 0,
            worker_idle: None,
            head_timer: None,
        })))
    }

    /// The socket and what was read from it beyond the response head: after a 101, the start
    /// of the new protocol.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        let socket = *self.0;
        (socket.stream, socket.read)
    }
}

impl Socket {
    /// Whether the connection carried a request before (taken from the pool, not new).
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether an idle connection can take a request: not closed by the worker, nothing unasked
    /// for in it. Costs no system call unless the socket has become readable.
    pub fn is_usable(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Sends `request` (its body is taken) and reads the response head; the body (or its start)
    /// stays in [`Socket::read`]. The worker gets `response_header` for each write to make
    /// progress and, once the request is written, for its response head, never past `deadline`;
    /// waiting for the client's body is not bounded here (the caller bounds it by the deadline).
    /// The request is borrowed down from where it was made: passed by value, each layer's future
    /// (attempt, exchange, send, write) held a copy of its 224 bytes, made once per request.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    pub fn send(
        &mut self,
        request: &mut Outgoing<'_>,
        fallback_host: &Authority,
        response_header: Duration,
        timing: super::Timing,
    ) -> impl Future<Output = Result<ResponseHead, UpstreamError>> {
        // Not an `async fn`: its arguments would be copied into locals at the first poll and
        // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
        async move {
            let deadline = timing.deadline;
            // A request that went out in one write left at `timing.sent`; one that waited for room
            // or for the client's body left later (its head timeout and stale window start then).
            let waits = matches!(request.body, UpstreamBody::Stream { .. });
            let uploads = waits
                || matches!(&request.body, UpstreamBody::Full(Some(data)) if !data.is_empty());
            let was_reused = self.reused;
            self.reused = true;
            let method = request.method.clone();
            let upgrade = request.headers.contains_key(http::header::UPGRADE);
            let raw = request.raw_response;
            let mut written = Sent::default();
            let stall = Stall {
                each: response_header,
                deadline,
            };
            let before = self.sent;
            let wrote = self
                .write_request(request, fallback_host, stall, &mut written)
                .await;
            self.sent += written.bytes;
            wrote.map_err(|error| error.into_upstream(was_reused, timing.sent, written.bytes))?;
            let sent_at = if waits || written.waited {
                Instant::now()
            } else {
                timing.sent
            };
            let head_by = deadline.min(sent_at + response_header);
            let mut timer = match self.head_timer.take() {
                Some(mut timer) => {
                    timer.as_mut().reset(head_by);
                    timer
                }
                None => Box::pin(tokio::time::sleep_until(head_by)),
            };
            let head = self.read_head(&method, upgrade, raw, was_reused, sent_at, before);
            let outcome = tokio::select! {
                biased;
                head = head => head,
                // Outside tokio's task budget, as `tokio::time::timeout` polls its timer: a worker
                // that keeps the socket full (an endless run of 1xx heads) spends the budget in
                // `head` on every poll, and a budgeted timer would then never fire.
                () = tokio::task::unconstrained(timer.as_mut()) => Err(UpstreamError::timeout()),
            };
            self.head_timer = Some(timer);
            let mut head = outcome?;
            // A worker that turns an upload down by its head (a 413 for its declared length, a
            // 401 before the body) may close the connection right after its answer, the body
            // unread, without saying so: hyper's server does. Its kernel then resets the
            // connection, and a request sent on it meanwhile is lost (a POST: a 502). Whether
            // the body was read does not show from here, so no connection is kept after an
            // error answer to a request with a body: a new connection now and then, for no 502.
            // Closed with a reset, not a FIN: a socket the gateway closes first would wait in
            // TIME_WAIT for a minute, and a stream of turned-down logins could use up the local
            // ports to the worker. Nothing of ours is left to send on it.
            if uploads && head.status.as_u16() >= 400 {
                head.keep_alive = false;
                let _ = self.stream.set_zero_linger();
            }
            Ok(head)
        }
    }

    /// Whether the worker's FIN, just read, came before the request that starts at the
    /// connection's byte `request_start`: whether its TCP acknowledged none of the request.
    /// A FIN acknowledges everything the worker's TCP had received when it was sent, so a request
    /// it does not cover arrived after the worker had closed its side of the connection, which no
    /// HTTP server does while it means to read another request: no program read it, and a POST
    /// may go to another worker ([`acked`]). A reset with no FIN before it proves nothing: a
    /// program that read part of the request and died (its kernel's acknowledgement still
    /// delayed) resets the connection too, and Linux reads no acknowledgement off a reset.
    /// Called only on that failure: one `getsockopt`.
    fn closed_before(&self, request_start: u64) -> bool {
        acked::bytes_acked(&self.stream).is_some_and(|acked| acked <= request_start)
    }

    async fn write_request(
        &mut self,
        request: &mut Outgoing<'_>,
        fallback_host: &Authority,
        stall: Stall,
        written: &mut Sent,
    ) -> Result<(), WriteError> {
        let Outgoing {
            method,
            path,
            headers,
            raw,
            forwarding,
            declared_length,
            ref mut body,
            raw_response: _,
        } = *request;
        match std::mem::replace(body, UpstreamBody::Full(None)) {
            UpstreamBody::Full(data) => {
                let length = data.as_ref().map_or(0, Bytes::len) as u64;
                let framing = if length > 0 || declared_length.is_some() {
                    RequestFraming::Length(length)
                } else {
                    RequestFraming::None
                };
                codec::encode_request_head(
                    &mut self.write,
                    method,
                    path,
                    headers,
                    raw,
                    framing,
                    fallback_host,
                    &forwarding,
                );
                let stream = &mut self.stream;
                match data {
                    Some(data) if data.len() <= COALESCE_BODY => {
                        self.write.extend_from_slice(&data);
                        send_all(stream, &self.write, stall, written).await?;
                    }
                    Some(data) => {
                        let parts = [IoSlice::new(&self.write), IoSlice::new(&data)];
                        send_all_parts(stream, parts, stall, written).await?;
                    }
                    None => send_all(stream, &self.write, stall, written).await?,
                }
            }
            mut body @ UpstreamBody::Stream { .. } => {
                let framing = match declared_length {
                    Some(length) => RequestFraming::Length(length),
                    None => RequestFraming::Chunked,
                };
                codec::encode_request_head(
                    &mut self.write,
                    method,
                    path,
                    headers,
                    raw,
                    framing,
                    fallback_host,
                    &forwarding,
                );
                send_all(&mut self.stream, &self.write, stall, written).await?;
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(WriteError::Body)?;
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers are not forwarded
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if framing == RequestFraming::Chunked {
                        self.write.clear();
                        codec::encode_chunk_start(&mut self.write, data.len());
                        let parts = [
                            IoSlice::new(&self.write),
                            IoSlice::new(&data),
                            IoSlice::new(b"\r\n"),
                        ];
                        send_all_parts(&mut self.stream, parts, stall, written).await?;
                    } else {
                        send_all(&mut self.stream, &data, stall, written).await?;
                    }
                }
                if framing == RequestFraming::Chunked {
                    send_all(&mut self.stream, codec::LAST_CHUNK, stall, written).await?;
                }
            }
        }
        Ok(())
    }

    async fn read_head(
        &mut self,
        method: &Method,
        upgrade: bool,
        raw: bool,
        reused: bool,
        sent_at: Instant,
        request_start: u64,
    ) -> Result<ResponseHead, UpstreamError> {
        // Closed or reset before the first byte of an answer, at once on a kept-alive connection:
        // the worker closed it idle (or exited) just as the request went out. Later, or on a new
        // connection, the worker had the request and lost it.
        let before_any_answer = || {
            if reused && sent_at.elapsed() <= STALE_WINDOW {
                UpstreamErrorKind::Closed
            } else {
                UpstreamErrorKind::Reset
            }
        };
        loop {
            // Nothing read yet (as for nearly every response, whose head comes in one read):
            // nothing to parse.
            let parsed = if self.read.is_empty() {
                Ok(Parsed::Partial)
            } else {
                codec::parse_response(&mut self.read, method, upgrade, raw)
            };
            match parsed {
                Ok(Parsed::Complete(head, idle)) => {
                    self.worker_idle = idle;
                    return Ok(head);
                }
                Ok(Parsed::Interim(length)) => {
                    let _ = self.read.split_to(length);
                    continue;
                }
                Ok(Parsed::Partial) => {}
                Err(error) => return Err(protocol(error)),
            }
            self.read.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) if self.read.is_empty() => {
                    if self.closed_before(request_start) {
                        // On a kept-alive connection, the worker closed it idle: a stale one,
                        // whenever that came. A new one it closed unread is the worker's fault
                        // (overloaded, or going away while still listening), though free to
                        // send elsewhere.
                        return Err(UpstreamError {
                            kind: if reused {
                                UpstreamErrorKind::Closed
                            } else {
                                UpstreamErrorKind::Reset
                            },
                            reached: false,
                            detail: "the worker had closed the connection before the request \
                                     reached it (its TCP acknowledged none of it)"
                                .into(),
                        });
                    }
                    return Err(reached(
                        before_any_answer(),
                        "connection closed before a response",
                    ));
                }
                Ok(0) => return Err(protocol(codec::ProtocolError("response head cut off"))),
                Ok(_) => {}
                Err(error) if self.read.is_empty() => {
                    return Err(reached(before_any_answer(), &error.to_string()));
                }
                Err(error) => return Err(reached(UpstreamErrorKind::Reset, &error.to_string())),
            }
        }
    }

    /// Reads more of the response body into [`Socket::read`]; `Ok(0)` at end of stream.
    pub(super) fn poll_read_more(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.stream), cx, &mut self.read)
    }

    /// Reads up to `most` bytes of the response body past the connection's buffer (empty by
    /// then) and hands them over as they are (empty at the end of the stream): the rest of a
    /// long body, read in pieces as large as it is (up to a limit) while the buffer the
    /// connection keeps stays one head's size. The read may take `slack` bytes more, what
    /// follows the body's known part: they go to the connection's buffer, where the body's
    /// framing reads them (a chunk's CRLF and the next size line) or, behind a body's declared
    /// end, keep the connection out of the pool. A read that ends the known part without
    /// filling its room also tells tokio the socket is drained, so the pool's check of the
    /// connection before its next request costs no system call (a read of exactly the body's
    /// rest left the socket marked readable: one `recvfrom` more per request).
    pub(super) fn poll_read_long(
        &mut self,
        cx: &mut std::task::Context<'_>,
        most: usize,
        slack: usize,
    ) -> std::task::Poll<std::io::Result<Bytes>> {
        debug_assert!(self.read.is_empty());
        self.long.reserve(most + slack);
        let mut limited = bytes::BufMut::limit(&mut self.long, most + slack);
        std::task::ready!(tokio_util::io::poll_read_buf(
            std::pin::Pin::new(&mut self.stream),
            cx,
            &mut limited
        ))?;
        if self.long.len() > most {
            self.read.extend_from_slice(&self.long[most..]);
            self.long.truncate(most);
        }
        std::task::Poll::Ready(Ok(self.long.split().freeze()))
    }

    /// Lets go of the long-body buffer's allocation (what a piece handed on left of it): a
    /// connection waiting in the pool keeps no more than one head's buffer.
    pub(super) fn let_go_of_long_buffer(&mut self) {
        self.long = BytesMut::new();
    }
}

/// Why writing a request failed.
#[derive(Debug)]
enum WriteError {
    /// The socket write failed.
    Io(std::io::Error),
    /// The worker took no bytes for a whole `response_header` (hung, or not reading).
    Stalled,
    /// Reading the client's streaming body failed.
    Body(BodyError),
}

impl From<std::io::Error> for WriteError {
    fn from(error: std::io::Error) -> Self {
        WriteError::Io(error)
    }
}

impl WriteError {
    /// The attempt's error for a write that failed after `written` bytes of a request sent at
    /// `sent`, on a `reused` connection or a new one.
    fn into_upstream(self, reused: bool, sent: Instant, written: u64) -> UpstreamError {
        // Not one byte left: the worker cannot have acted on the request.
        let reached = written > 0;
        match self {
            WriteError::Io(error) => {
                let what = if reused { "reused" } else { "new" };
                // Broken at once on a kept-alive connection: the worker had closed it (idle, or
                // after an answer it gave without reading the body before) as the request went
                // out, as `read_head` judges a close before any answer; not the worker's fault.
                let stale = reused && sent.elapsed() <= STALE_WINDOW;
                UpstreamError {
                    kind: if stale {
                        UpstreamErrorKind::Closed
                    } else {
                        UpstreamErrorKind::Reset
                    },
                    reached,
                    detail: format!(
                        "writing the request on a {what} connection after {written} bytes: {error}"
                    ),
                }
            }
            WriteError::Stalled => UpstreamError {
                kind: UpstreamErrorKind::Timeout,
                reached,
                detail: format!("the worker took no request bytes in time after {written}"),
            },
            WriteError::Body(BodyError::TooLarge) => UpstreamError {
                kind: UpstreamErrorKind::ClientBody,
                reached,
                detail: "request body over the size limit".into(),
            },
            WriteError::Body(BodyError::Client(error)) => UpstreamError {
                kind: if client_went_away(&error) {
                    UpstreamErrorKind::ClientGone
                } else {
                    UpstreamErrorKind::ClientBody
                },
                reached,
                detail: format!("client body: {error}"),
            },
        }
    }
}

/// How a request's write went: bytes the kernel took, and whether it had to wait for room.
#[derive(Debug, Default)]
struct Sent {
    bytes: u64,
    waited: bool,
}

/// How long a write to the worker may wait for room: `each` time, never past `deadline`.
#[derive(Debug, Clone, Copy)]
struct Stall {
    each: Duration,
    deadline: Instant,
}

/// Writes all of `data`, counting in `written` what the kernel took; a write that finds no room
/// waits as long as `stall` allows (no timer otherwise). (`write_all` would not say how much
/// went out before an error.)
fn send_all<'a>(
    stream: &'a mut TcpStream,
    data: &'a [u8],
    stall: Stall,
    written: &'a mut Sent,
) -> impl Future<Output = Result<(), WriteError>> + 'a {
    // Not an `async fn`: the parts' future itself, without a state machine around it.
    send_all_parts(stream, [IoSlice::new(data)], stall, written)
}

/// [`send_all`] for data in parts (a head and a body, a chunk's size line, data and CRLF): one
/// `writev` where the kernel takes them all, no copy into one buffer first. One part left is
/// written with a plain `send`.
async fn send_all_parts<const N: usize>(
    stream: &mut TcpStream,
    mut parts: [IoSlice<'_>; N],
    stall: Stall,
    written: &mut Sent,
) -> Result<(), WriteError> {
    let mut left = &mut parts[..];
    IoSlice::advance_slices(&mut left, 0);
    while !left.is_empty() {
        let tried = match &*left {
            [one] => stream.try_write(one),
            _ => stream.try_write_vectored(left),
        };
        let n = match tried {
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                written.waited = true;
                let by = stall.deadline.min(Instant::now() + stall.each);
                match tokio::time::timeout_at(by, stream.write_vectored(left)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(WriteError::Stalled),
                }
            }
            Err(error) => return Err(error.into()),
        };
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        written.bytes += n as u64;
        IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

fn not_reached(kind: UpstreamErrorKind, error: std::io::Error) -> UpstreamError {
    UpstreamError {
        kind,
        reached: false,
        detail: error.to_string(),
    }
}

fn reached(kind: UpstreamErrorKind, detail: &str) -> UpstreamError {
    UpstreamError {
        kind,
        reached: true,
        detail: detail.to_owned(),
    }
}

fn protocol(error: codec::ProtocolError) -> UpstreamError {
    UpstreamError {
        kind: UpstreamErrorKind::Protocol,
        reached: true,
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test(start_paused = true)]
    async fn a_write_broken_at_once_on_a_reused_connection_is_a_stale_one() {
        let broken = || WriteError::Io(std::io::ErrorKind::BrokenPipe.into());
        let now = Instant::now();
        let stale = broken().into_upstream(true, now, 0);
        assert_eq!(
            (stale.kind, stale.reached),
            (UpstreamErrorKind::Closed, false)
        );
        assert!(!stale.blames_worker());
        let stale = broken().into_upstream(true, now, 217);
        assert_eq!(
            (stale.kind, stale.reached),
            (UpstreamErrorKind::Closed, true)
        );
        // On a new connection, or long after the request went out (a streamed body): the worker
        // broke it while it had the request.
        let new = broken().into_upstream(false, now, 217);
        assert_eq!(new.kind, UpstreamErrorKind::Reset);
        assert!(new.blames_worker());
        tokio::time::advance(STALE_WINDOW * 2).await;
        let late = broken().into_upstream(true, now, 217);
        assert_eq!(late.kind, UpstreamErrorKind::Reset);
    }

    /// A worker that answers its connection's first request, then does `after` with it (and
    /// closes it when that is done).
    async fn worker_answering_once<F, Done>(after: F) -> Authority
    where
        F: FnOnce(TcpStream) -> Done + Send + 'static,
        Done: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0u8; 4096];
            let _ = stream.read(&mut buffer).await.unwrap();
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            stream.write_all(answer).await.unwrap();
            after(stream).await;
        });
        authority
    }

    /// A worker that answers its connection's first request, reads the second, waits
    /// `before_close`, and closes without answering it.
    async fn worker_that_dies_on_the_second_request(before_close: Duration) -> Authority {
        worker_answering_once(move |mut stream| async move {
            let _ = stream.read(&mut [0u8; 4096]).await.unwrap();
            tokio::time::sleep(before_close).await;
        })
        .await
    }

    /// A worker that answers its connection's first request and closes it at once.
    async fn worker_that_closes_after_one_answer() -> Authority {
        worker_answering_once(|_| async {}).await
    }

    /// Sends a GET to `authority` on a new connection, then, `pause` after its answer, a second
    /// request on the same connection (`method`, with a 5-byte body but for a GET): its error.
    async fn second_request_error(
        authority: Authority,
        pause: Duration,
        method: &'static Method,
    ) -> UpstreamError {
        request_error(authority, true, pause, method).await
    }

    /// Opens a connection to `authority`, sends a GET on it first if `warm_up` (answered 200),
    /// then, `pause` later, a request (`method`, with a 5-byte body but for a GET): its error.
    async fn request_error(
        authority: Authority,
        warm_up: bool,
        pause: Duration,
        method: &'static Method,
    ) -> UpstreamError {
        let mut connection = Connection::open(&authority, Duration::from_secs(1))
            .await
            .unwrap();
        let headers = HeaderMap::new();
        let client = http::HeaderValue::from_static("127.0.0.1");
        let id = http::HeaderValue::from_static("test-1");
        let request = |method: &'static Method, headers| {
            let body = (*method != Method::GET).then(|| Bytes::from_static(b"hello"));
            Outgoing {
                method,
                path: "/",
                headers,
                raw: None,
                forwarding: Forwarding {
                    request_id: &id,
                    client: &client,
                    over_tls: None,
                    authority: None,
                },
                declared_length: body.as_ref().map(|body| body.len() as u64),
                body: UpstreamBody::Full(body),
                raw_response: false,
            }
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let timeout = Duration::from_secs(5);
        let timing = || super::super::Timing {
            sent: Instant::now(),
            deadline,
        };
        if warm_up {
            let first = connection
                .send(
                    &mut request(&Method::GET, &headers),
                    &authority,
                    timeout,
                    timing(),
                )
                .await;
            assert_eq!(first.unwrap().status, http::StatusCode::OK);
        }
        tokio::time::sleep(pause).await;
        connection
            .send(
                &mut request(method, &headers),
                &authority,
                timeout,
                timing(),
            )
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_new_connection_the_worker_closed_unread_is_its_fault_but_free_to_send_elsewhere() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream); // closed at once, nothing read
        });
        let error = request_error(authority, false, Duration::from_millis(50), &Method::POST).await;
        assert_eq!(error.kind, UpstreamErrorKind::Reset, "{error:?}");
        assert!(!error.reached, "{error:?}");
        assert!(error.blames_worker());
        assert!(error.retry_safe(false, false));
    }

    /// A worker that answers its connection's first request, lets the second arrive unread,
    /// and closes: its kernel resets the connection (unread bytes) with no FIN before it.
    async fn worker_that_resets_with_the_second_request_unread() -> Authority {
        worker_answering_once(|stream| async move {
            stream.readable().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_post_a_worker_reset_with_no_fin_before_may_have_reached_it() {
        // The same reset comes from a program that read part of the request and died before its
        // kernel acknowledged it: unacknowledged bytes and a reset prove nothing.
        let authority = worker_that_resets_with_the_second_request_unread().await;
        let error = second_request_error(authority, Duration::ZERO, &Method::POST).await;
        assert!(error.reached, "{error:?}");
        assert!(
            !error.retry_safe(false, false),
            "a POST stays where it went"
        );
    }

    async fn second_request_fails_as(before_close: Duration) -> UpstreamErrorKind {
        let authority = worker_that_dies_on_the_second_request(before_close).await;
        let error = second_request_error(authority, Duration::ZERO, &Method::POST).await;
        // The worker read it: its TCP acknowledged it (with its FIN at the latest).
        assert!(error.reached, "{error:?}");
        error.kind
    }

    #[tokio::test]
    async fn a_post_sent_on_a_connection_the_worker_had_closed_never_reached_it() {
        // Its FIN is in by the time the POST goes out (as when the pool's check of the
        // connection came just before it): the POST meets a closed socket and a reset.
        let authority = worker_that_closes_after_one_answer().await;
        let error = second_request_error(authority, Duration::from_millis(50), &Method::POST).await;
        assert_eq!(error.kind, UpstreamErrorKind::Closed, "{error:?}");
        assert!(!error.reached, "{error:?}");
        assert!(error.retry_safe(false, false), "a POST may go elsewhere");
        assert!(
            error.detail.contains("acknowledged none"),
            "{}",
            error.detail
        );
    }

    #[tokio::test]
    async fn a_reused_connection_closed_at_once_is_stale() {
        assert_eq!(
            second_request_fails_as(Duration::ZERO).await,
            UpstreamErrorKind::Closed
        );
    }

    #[tokio::test]
    async fn a_reused_connection_closed_after_the_worker_had_the_request_is_a_reset() {
        let later = STALE_WINDOW + Duration::from_millis(100);
        assert_eq!(
            second_request_fails_as(later).await,
            UpstreamErrorKind::Reset
        );
    }
}
