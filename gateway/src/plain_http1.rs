//! The gateway's own HTTP/1.1 server, for the plain requests of HTTP/1.1 connections, cleartext
//! or TLS: no body, or a small one (`Content-Length` in digits, at most what the request path
//! buffers) whole behind its head or within `BODY_GRACE` of it, as an API client's JSON comes
//! (Python's clients write it apart from the head); no protocol switch, no
//! `Expect`, an origin-form target, a head that fits. Nearly every request a gateway sees is
//! one. A request that is not goes to hyper's server with the bytes read so far: streamed and
//! chunked uploads, WebSockets, odd or broken heads and their 400 / 431 answers keep hyper's
//! behaviour, unchanged. Hyper gives the connection back between two requests (after an upload,
//! the requests that follow are plain again; `crate::serving`), unless this server served none
//! since the last time: then hyper keeps it.
//!
//! ```text
//! read until a head is whole ─▶ httparse ─▶ plain? ─no──▶ hyper (the bytes put back) ─┐
//!        ▲                                    │yes                  between requests   │
//!        └────────────────────────────────────┼────────────────────────────────────────┘
//!                                             │
//!                                             ▼
//!          the service (crate::serving, as for hyper) ─▶ response head + body written
//!                                             │
//!          keep-alive: next head; told to close (drain) or shed (another thread): as hyper's
//! ```
//!
//! Why: hyper's server was about a fifth of the user-space work of a request
//! (`infra/bench/instructions.sh h1`, docs/performance.md section 16): its dispatch state
//! machine, a buffer of its own, a clock read for its `Date` cache at every poll, and an
//! encoder that handles what a plain request never has. Here a head is parsed once: its header
//! lines are kept as they came when the request path neither reads nor changes any of them but
//! those a raw head leaves out and reads itself (a browser's `Connection: keep-alive`, a
//! one-request client's `Connection: close`, a proxy's
//! forwarding lines and request id, a body's `Content-Length`: `headers::RawRequestHead`), and
//! put in a header map
//! otherwise, names from the per-thread cache of the worker client. A response whose head came
//! raw from the worker (see `upstream::codec::RawHead`) is written as those lines plus the
//! gateway's own, with its small body, in one `write`.
//!
//! The response rules are hyper's (`proto/h1/role.rs`, `Server::encode`): a body's exact size
//! becomes `Content-Length`, an unknown one is chunked; a `Content-Length` the response names
//! wins, and is dropped from an empty body except for HEAD; no body after HEAD, 204 or 304; a
//! `Date` when the response has none; the connection closes after a response or request that
//! says `Connection: close`. The socket is the connection's [`ClientIo`], so the head, idle and
//! send timeouts, the hang-up watch and the hand-over between threads work as they do for hyper.
//!
//! A client that hangs up while its request waits for the worker's answer or its body cancels
//! the request. On cleartext connections the socket is peeked for it (`crate::hang_up`); over
//! TLS the socket carries records (a next request, or the client's `close_notify`, look alike
//! there), so this server reads through the session instead, as hyper's own check does
//! ([`ReadWatch`]): the end of the session or an error is a hang-up; bytes are the next request,
//! kept (its head due within the head timeout once this request ends), and watching stops.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use futures_util::task::AtomicWaker;
use http::{HeaderValue, Method, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::ClientBody;
use crate::client_io::{ClientIo, ConnectionState};
use crate::connections::{self, Entry};
use crate::headers::{self, LeftOut, RawRequestHead};
use crate::serving::{Inline, Served, ServiceContext};

/// A head still incomplete at this size is left to hyper (its limits, its 431).
const MAX_HEAD: usize = 16 * 1024;
/// Headers a plain request may have; a head with more is left to hyper.
const MAX_HEADERS: usize = 64;
// A raw head marks the lines it leaves out by their index in a `u64`.
const _: () = assert!(MAX_HEADERS <= 64);
/// Room for one read.
const READ_SIZE: usize = 8 * 1024;
/// Room made for one read of a body behind its head ([`body_read`]).
const BODY_READ: usize = 64 * 1024;
/// Body bytes copied behind the head before a write; a larger frame goes out beside what is
/// gathered, in the same `writev`, uncopied.
const GATHER: usize = 16 * 1024;

/// How serving a connection here ended.
pub(crate) enum Ended<S> {
    /// The connection is over.
    Closed,
    /// It gave its socket back between two requests (`connections::shed`).
    Handed {
        stream: S,
        state: Arc<ConnectionState>,
        read_ahead: Bytes,
    },
    /// A request that is not plain: hyper serves the connection from here, the bytes read so
    /// far put back into its socket (boxed: once per connection at most).
    ToHyper(Box<ClientIo<S>>),
}

/// Serves the requests of `io` until one is not plain, the connection ends, or it is handed
/// over (`movable`: may be).
#[allow(clippy::manual_async_fn)] // see the comment in the body
pub(crate) fn serve<S>(
    mut io: ClientIo<S>,
    context: &Arc<ServiceContext>,
    entry: &Entry,
    movable: bool,
) -> impl Future<Output = Ended<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Not an `async fn`: its arguments would be copied into locals at the first poll and
    // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
    async move {
        let state = context.state.clone();
        // Raw request heads only where nothing before the request path reads headers (the HTTPS
        // redirect reads `Host`) and the request path needs no map (tracing reads and writes
        // `traceparent`).
        let keep_raw = context.raw_requests();
        let body_limit = context.read_body_limit();
        let watched_by_reading = context.watched_by_reading();
        // Every head is parsed here: `ClientIo`'s scan of the bytes would find out nothing more.
        io.stop_head_scan();
        // A new connection's first bytes become the buffer they were read into (no copy; the
        // head's split off it is then a reference count, not an allocation).
        let mut buffer = match io.take_prefix().try_into_mut() {
            Ok(read) if read.capacity() > 0 => read,
            Ok(_) => BytesMut::with_capacity(READ_SIZE),
            Err(shared) => {
                let mut copied = BytesMut::with_capacity(READ_SIZE.max(shared.len()));
                copied.extend_from_slice(&shared);
                copied
            }
        };
        let mut out: Vec<u8> = Vec::with_capacity(1024);
        let mut watch = ReadWatch::new(watched_by_reading);
        loop {
            // Until when the rest of a body behind a whole head may still come (see below).
            let mut body_due = None;
            let request = loop {
                if !buffer.is_empty() {
                    let before = buffer.len();
                    match parse(&mut buffer, keep_raw, body_limit) {
                        Parsed::Partial => {}
                        Parsed::Plain(request) => {
                            io.head_parsed(before - buffer.len(), &buffer);
                            break request;
                        }
                        Parsed::BodyComing(whole) if body_read(&mut io, &mut buffer, whole) => {
                            continue;
                        }
                        Parsed::BodyComing(whole)
                            if body_arrives(&mut io, &mut buffer, whole, &mut body_due).await =>
                        {
                            continue;
                        }
                        Parsed::NotPlain | Parsed::BodyComing(_) => {
                            io.put_back(buffer.freeze());
                            return Ended::ToHyper(Box::new(io));
                        }
                        Parsed::Broken(problem) => {
                            answer_broken_head(&mut io, context, problem, &mut out).await;
                            return Ended::Closed;
                        }
                    }
                }
                match read_more(&mut io, &mut buffer, entry, &state, movable).await {
                    Ok(Read::Bytes) => {}
                    Ok(Read::Closed | Read::Told(Told::Close)) | Err(_) => {
                        if watched_by_reading {
                            // A TLS session ends with the gateway's `close_notify` too, as
                            // hyper ended it (within `timeouts.client_send`, see `ClientIo`).
                            let _ = io.shutdown().await;
                        }
                        return Ended::Closed;
                    }
                    Ok(Read::Told(Told::Shed)) => {
                        let (stream, state) = io.into_parts();
                        return Ended::Handed {
                            stream,
                            state,
                            read_ahead: buffer.freeze(),
                        };
                    }
                }
            };
            // Taken apart: a request used in part after the await below would be kept whole
            // (320 bytes) beside the request path's own copy.
            let PlainRequest {
                request,
                raw,
                close,
            } = request;
            // Taken here, as the request path would, to be written into a worker's raw head.
            let request_id = match &raw {
                Some(raw) => raw.request_id(),
                None => headers::request_id(request.headers()),
            };
            let head_only = request.method() == Method::HEAD;
            // Pinned where they are made: awaited as values, these futures (the request path's is
            // several KB) were copied into this one's state for every request. Each in a block of
            // its own, so that they share room in this future instead of adding up.
            let closing;
            // Not with bytes of a next request read behind this one: the client asked for more
            // answers even if it hangs up now (as `crate::hang_up` and hyper do).
            watch.on = watched_by_reading && buffer.is_empty();
            let written = {
                // The request path's future is a temporary of this statement, made in place (a
                // future bound first is copied whole, 5 KB, into where it is pinned): it ends
                // here, and the writer's future below takes its room.
                let answer =
                    pin!(context.respond::<Inline>(request, raw, Some(request_id.clone())));
                let Some(Ok(mut response)) = watch.until(answer, &mut io, &mut buffer).await else {
                    // The client hung up: nobody is left to answer.
                    return Ended::Closed;
                };
                // Closing after this answer: it says so (hyper adds `Connection: close` then
                // too). Decided as its head is written: a request begun before the gateway
                // started to stop, answered after, says it as well, so the client does not reuse
                // a connection about to close.
                closing = close || entry.told_to_close() || context.draining();
                let how = Writing {
                    head_only,
                    closing,
                    request_id: &request_id,
                    gateway: context.gateway_id(),
                };
                let watched = (&mut watch, &mut buffer);
                let writing = pin!(write_response(
                    &mut io,
                    &mut response,
                    how,
                    &mut out,
                    watched
                ));
                writing.await
                // `response` is dropped here, not moved to be dropped (a copy of 300 bytes): the
                // request is over (its guard is in the body), and the idle timer starts.
            };
            let keep_alive = match written {
                Ok(keep_alive) => keep_alive && !closing,
                Err(_) => return Ended::Closed,
            };
            if !keep_alive || entry.told_to_close() {
                // A TLS session ends with the gateway's `close_notify`. A client that said
                // `Connection: close` sends nothing after its request, and closing the socket
                // sends the FIN a shutdown would: one system call fewer for clients that open
                // a connection per request (nginx closes so too; docs/performance.md, section
                // 42). When the gateway closes on its own (draining, told to), a next request
                // may arrive unread, and closing then resets the connection: the shutdown sends
                // the FIN first, so the client sees it end. (Bodies this server reads are read
                // whole: nothing of a request is left to linger over, as hyper does.)
                if watched_by_reading || !close {
                    let _ = io.shutdown().await;
                }
                return Ended::Closed;
            }
        }
    }
}

/// Answers a head no server may take with the gateway's JSON 400 (`bad_request`, counted as
/// every error the gateway makes), and closes the connection: what follows such a head cannot
/// be told apart from it. Where hyper answered these, the client got a 400 with no body.
async fn answer_broken_head<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
    context: &Arc<ServiceContext>,
    problem: &'static str,
    out: &mut Vec<u8>,
) {
    let mut response = context.broken_head(problem);
    let request_id = (response.headers().get(headers::REQUEST_ID).cloned())
        .unwrap_or_else(headers::new_request_id);
    let how = Writing {
        head_only: false,
        closing: true,
        request_id: &request_id,
        gateway: context.gateway_id(),
    };
    // Nothing is read while the answer goes out: the connection ends after it either way.
    let watched = (&mut ReadWatch::new(false), &mut BytesMut::new());
    if write_response(io, &mut response, how, out, watched)
        .await
        .is_ok()
    {
        let _ = io.shutdown().await;
    }
}

/// Under TLS, whether a request's client is still watched for a hang-up by reading through the
/// session (see the module doc). Once bytes of a next request come, it no longer is: they stay
/// in the connection's buffer, and that request is read from there.
struct ReadWatch {
    /// Watching the current request's client.
    on: bool,
    /// The read's own waker, on connections watched this way (one per connection).
    client: Option<(Arc<ClientWoke>, Waker)>,
}

impl ReadWatch {
    /// Off; able to watch (`on`) when `by_reading`.
    fn new(by_reading: bool) -> Self {
        let client = by_reading.then(|| {
            let woke = Arc::new(ClientWoke {
                watching: AtomicBool::new(false),
                again: AtomicBool::new(true),
                task: AtomicWaker::new(),
            });
            let waker = Waker::from(woke.clone());
            (woke, waker)
        });
        ReadWatch { on: false, client }
    }

    /// `answer`'s output, or `None` when the client hung up first: while the watch is on, the
    /// connection is read into `buffer` meanwhile. Off, `answer` alone is awaited.
    ///
    /// The read has a waker of its own ([`ClientWoke`]): it is polled again only when it asked
    /// to be, not at every wake-up of the request's task (the worker's side wakes it for each
    /// part of an answer, and a read that waits goes through the TLS session down to the
    /// socket each time), and what it registered no longer wakes the task once the watch is
    /// over.
    async fn until<F: Future, S: AsyncRead + Unpin>(
        &mut self,
        mut answer: Pin<&mut F>,
        io: &mut ClientIo<S>,
        buffer: &mut BytesMut,
    ) -> Option<F::Output> {
        let (woke, waker) = match &self.client {
            Some(client) if self.on => client,
            _ => return Some(answer.await),
        };
        if buffer.capacity() - buffer.len() < READ_SIZE / 4 {
            buffer.reserve(READ_SIZE);
        }
        // The first poll reads: the session may hold what an earlier read brought.
        woke.again.store(true, Ordering::SeqCst);
        woke.watching.store(true, Ordering::SeqCst);
        let mut on = true;
        let mut reading = pin!(io.read_buf(buffer));
        let output = std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(output));
            }
            if on {
                woke.task.register(cx.waker());
                // After the registration: a wake-up from here on wakes this task again.
                if woke.again.swap(false, Ordering::SeqCst) {
                    match reading.as_mut().poll(&mut Context::from_waker(waker)) {
                        // The session ended (`close_notify` or the socket closed) or broke.
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) => {
                            // What the read registered wakes the task no more.
                            woke.watching.store(false, Ordering::SeqCst);
                            on = false;
                        }
                        Poll::Pending => {}
                    }
                }
            }
            Poll::Pending
        })
        .await;
        woke.watching.store(false, Ordering::SeqCst);
        if !on {
            // What came is the start of the next request (a plain request's body, if any, was
            // read whole with its head).
            io.next_head_begun();
        }
        self.on = on;
        output
    }
}

/// The waker of [`ReadWatch`]'s read: notes that the read asked to be polled, and wakes the
/// request's task while the watch waits. After it, what the read registered may still wake
/// this waker, once each: the socket's readiness, and the connection's state, which wakes the
/// reader of a busy connection when its request ends (`ClientIo`), as the watch's read was. By
/// then the connection reads its next request with the task's own waker, and with the task's
/// waker in the watch's read that wake-up made every HTTPS/1.1 request's task run once more for
/// a read that had nothing (`infra/bench/instructions.sh tls`: 25 999 → 24 996 instructions per
/// request, docs/performance.md section 30).
struct ClientWoke {
    /// `ReadWatch::until` is waiting.
    watching: AtomicBool,
    /// The read asked to be polled.
    again: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ClientWoke {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.again.store(true, Ordering::SeqCst);
        if self.watching.load(Ordering::SeqCst) {
            self.task.wake();
        }
    }
}

/// What a read brought.
enum Read {
    /// Bytes, in the buffer.
    Bytes,
    /// The client closed its side.
    Closed,
    /// The thread told the connection to close, or to give its socket back.
    Told(Told),
}

enum Told {
    Close,
    Shed,
}

/// Reads what is already there of a body behind a whole head (a read takes 8 KiB at most, and a
/// body can be larger), without waiting: whether bytes came. A body that is still on its way is
/// waited for a moment only ([`body_arrives`]); longer, it is hyper's to wait for (and to time,
/// with the 408 of `timeouts.request`), not this server's, whose waits are timed as heads.
/// `whole`: the bytes of head and body together.
fn body_read<S: AsyncRead + Unpin>(
    io: &mut ClientIo<S>,
    buffer: &mut BytesMut,
    whole: usize,
) -> bool {
    // Room for what the next read may bring, not for the whole declared length at once: a head
    // that declares a large body (up to `retry.buffer_body_bytes`) and sends nothing behind it
    // costs a read's room, as on hyper's way.
    buffer.reserve(whole.saturating_sub(buffer.len()).min(BODY_READ));
    matches!(io.read_buf(buffer).now_or_never(), Some(Ok(read)) if read > 0)
}

/// How long a body declared small enough to read whole, whose head came without it, may take to
/// follow before hyper's server takes the request over. Python's `http.client` (so `requests`
/// and `urllib3`) writes a request's head and body with two system calls: the gateway often reads
/// the head before the body has arrived (382 of 400 JSON POSTs from one such client on loopback,
/// 2026-12-05), and each went to hyper (a hyper connection made for it; its requests cost 40 %
/// more). A body that takes longer (a client's Nagle wait for the head's ACK, a slow or hostile
/// sender) is hyper's to wait for, as before, and to time with the 408 of `timeouts.request`.
const BODY_GRACE: std::time::Duration = std::time::Duration::from_millis(2);

/// [`body_read`] for a body still on its way: waits for more of it until [`BODY_GRACE`] after
/// the first wait for it (`due`); whether bytes came.
async fn body_arrives<S: AsyncRead + Unpin>(
    io: &mut ClientIo<S>,
    buffer: &mut BytesMut,
    whole: usize,
    due: &mut Option<tokio::time::Instant>,
) -> bool {
    let until = *due.get_or_insert_with(|| tokio::time::Instant::now() + BODY_GRACE);
    buffer.reserve(whole.saturating_sub(buffer.len()).min(BODY_READ));
    matches!(
        tokio::time::timeout_at(until, io.read_buf(buffer)).await,
        Ok(Ok(read)) if read > 0
    )
}

/// Reads more of the next request into `buffer`. Between two requests, the thread may tell the
/// connection to close or, when `movable` and nothing of the next request was read, to give its
/// socket back: as `connections::Http1` does for hyper.
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut ClientIo<S>,
    buffer: &mut BytesMut,
    entry: &Entry,
    state: &ConnectionState,
    movable: bool,
) -> io::Result<Read> {
    let idle = buffer.is_empty();
    if buffer.capacity() - buffer.len() < READ_SIZE / 4 {
        buffer.reserve(READ_SIZE);
    }
    let mut reading = pin!(io.read_buf(buffer));
    std::future::poll_fn(|cx| {
        entry.polled_by(cx.waker());
        if let Poll::Ready(read) = reading.as_mut().poll(cx) {
            return Poll::Ready(read.map(|n| if n == 0 { Read::Closed } else { Read::Bytes }));
        }
        if state.between_requests() {
            if entry.told_to_close() {
                return Poll::Ready(Ok(Read::Told(Told::Close)));
            }
            if idle && movable && connections::take_shed() {
                return Poll::Ready(Ok(Read::Told(Told::Shed)));
            }
        }
        Poll::Pending
    })
    .await
}

/// A plain request, read.
struct PlainRequest {
    /// Its header map is empty when `raw` holds the headers; its body, when it has one, read.
    request: http::Request<ClientBody>,
    /// Its header lines, to forward as they are (see [`parse`]).
    raw: Option<RawRequestHead>,
    /// It said `Connection: close`.
    close: bool,
}

// Not boxed: a request is the common case, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// More bytes needed.
    Partial,
    /// Taken off the buffer.
    Plain(PlainRequest),
    /// Not for this server; the buffer is as it was.
    NotPlain,
    /// A head whose body is not all here yet: this many bytes in all, head and body, would do.
    /// The buffer is as it was.
    BodyComing(usize),
    /// A head no HTTP/1.1 server may take (hyper would answer it with a 400 and no body): what
    /// is wrong with it, for the gateway's JSON 400.
    Broken(&'static str),
}

/// Where a header's name and value sit in the head.
type Spans = smallvec::SmallVec<[(Range<usize>, Range<usize>); 16]>;

/// Parses the head at the start of `buffer`, and the body behind it when it has a
/// `Content-Length` of at most `body_limit` bytes and all of them are in `buffer` already (a
/// small upload sent with its head, as clients send one); a body still on its way, a larger one
/// or a chunked one is left to hyper. With `keep_raw`, a head whose lines the request path
/// neither reads nor changes (no hop-by-hop, `Transfer-Encoding` or `Expect` header, exactly one
/// `Host`, CRLF line ends), but for the lines a raw head leaves out and reads itself
/// (`Connection: keep-alive` or `close`, the forwarding headers and the request id, a body's
/// `Content-Length`, in up to three runs of adjacent lines), is kept as its lines
/// ([`RawRequestHead`]) with an empty header map: the worker gets them as the client sent them
/// (and a length the gateway writes), and no map is built or encoded.
fn parse(buffer: &mut BytesMut, keep_raw: bool, body_limit: u64) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let length = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut head, buffer, &mut slots)
    {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() < MAX_HEAD => return Parsed::Partial,
        // Over this server's limits, not the protocol's: hyper's (its 431, its header count).
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::NotPlain;
        }
        Err(error) => return Parsed::Broken(broken_head(error)),
    };
    let (Some(method), Some(path), Some(1)) = (head.method, head.path, head.version) else {
        return Parsed::NotPlain;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Parsed::NotPlain;
    }
    let mut close = false;
    let mut content_length = None;
    let mut raw = keep_raw;
    let mut hosts = 0;
    // Bit `i`: the line of header `i` is left out of a raw head (`RawRequestHead`); among
    // them, the index of the one `X-Forwarded-For` and of the first `X-Request-Id`.
    let mut left_out = 0u64;
    let mut forwarded_for = None;
    let mut request_id = None;
    // As `headers::head_size` counts it: the target up to a fragment (`http` drops it).
    let mut size = path.split('#').next().map_or(0, str::len);
    for (index, header) in head.headers.iter().enumerate() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parsed::NotPlain;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // One length, in digits only, within the limit. A list, the same length twice, or
            // a body over the limit is hyper's to judge or stream; a length that is no number,
            // or two that differ, no server may take (RFC 9112 §6.3 item 5).
            match (content_length, body_length(header.value)) {
                (None, Some(length)) if length <= body_limit => content_length = Some(length),
                (_, None) if !header.value.contains(&b',') => {
                    return Parsed::Broken("the Content-Length is not a number");
                }
                (Some(first), Some(length)) if first != length => {
                    return Parsed::Broken("two Content-Length headers that differ");
                }
                _ => return Parsed::NotPlain,
            }
        }
        if name.eq_ignore_ascii_case(b"connection") && has_token(header.value, b"close") {
            close = true;
        }
        if raw {
            if crate::headers::is_read_or_replaced_in_requests_raw(name) {
                left_out |= 1 << index;
                match crate::headers::left_out_of_request(name, header.value) {
                    Some(LeftOut::ConnectionOption | LeftOut::Replaced) => {}
                    Some(LeftOut::RequestId) => {
                        request_id.get_or_insert(index);
                    }
                    // Its hops are kept as one value: a second line takes the map.
                    Some(LeftOut::ForwardedFor) if forwarded_for.is_none() => {
                        forwarded_for = Some(index);
                    }
                    _ => raw = false,
                }
            }
            hosts += usize::from(name.eq_ignore_ascii_case(b"host"));
            size += name.len() + header.value.len() + 4;
        }
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::NotPlain;
    };
    // The body, if any, must be here whole: waiting for the rest would time it as a head.
    let Ok(body_length) = usize::try_from(content_length.unwrap_or(0)) else {
        return Parsed::NotPlain;
    };
    if buffer.len() - length < body_length {
        return match length.checked_add(body_length) {
            Some(whole) => Parsed::BodyComing(whole),
            None => Parsed::NotPlain,
        };
    }
    let base = buffer.as_ptr() as usize;
    let span = |bytes: &[u8]| {
        let start = bytes.as_ptr() as usize - base;
        start..start + bytes.len()
    };
    let target = span(path.as_bytes());
    // Filled in place: `collect` would build the vector and then move all its inline room.
    let mut spans = Spans::new();
    spans.extend(
        head.headers
            .iter()
            .map(|h| (span(h.name.as_bytes()), span(h.value))),
    );
    let whole = buffer.split_to(length).freeze();
    let body = content_length.map(|_| buffer.split_to(body_length).freeze());
    let raw = if raw && hosts == 1 {
        let read = headers::ReadFromRaw {
            forwarded_for,
            request_id,
        };
        RawRequestHead::of(&whole, &spans, size, left_out, read)
    } else {
        None
    };
    let built = match &raw {
        Some(_) => build(&whole, method, target, &[], body),
        None => build(&whole, method, target, &spans, body),
    };
    match built {
        Ok(request) => Parsed::Plain(PlainRequest {
            request,
            raw,
            close,
        }),
        Err(body) => {
            // Put back as it was (rare: a target or a value `http` refuses).
            let body = body.unwrap_or_default();
            let mut restored = BytesMut::with_capacity(whole.len() + body.len() + buffer.len());
            restored.extend_from_slice(&whole);
            restored.extend_from_slice(&body);
            restored.extend_from_slice(buffer);
            *buffer = restored;
            Parsed::NotPlain
        }
    }
}

/// What is wrong with a head `httparse` refused, in the words of the gateway's 400.
fn broken_head(error: httparse::Error) -> &'static str {
    match error {
        httparse::Error::HeaderName => "a header name is not a token",
        httparse::Error::HeaderValue => "a header value has a control character",
        httparse::Error::NewLine => "a line of the request head does not end in CRLF",
        httparse::Error::Token => "the request line is malformed (method, target or spaces)",
        httparse::Error::Version => "the request line's HTTP version is malformed",
        // Not a request's (a response's status), or over a limit the caller handles.
        httparse::Error::Status | httparse::Error::TooManyHeaders => "malformed request head",
    }
}

/// The request at the start of `buffer` as this server reads it (taken off the buffer, with a
/// body of at most `body_limit` bytes): the request, and its header lines when kept raw (its map
/// is empty then); `None` when the request is incomplete or not for this server (the buffer is
/// as it was). With `keep_raw` false, every head goes through the map. For the property tests,
/// which check that a raw head forwards what its map would, and where a body ends.
pub fn read_head(
    buffer: &mut BytesMut,
    keep_raw: bool,
    body_limit: u64,
) -> Option<(http::Request<ClientBody>, Option<RawRequestHead>)> {
    match parse(buffer, keep_raw, body_limit) {
        Parsed::Plain(plain) => Some((plain.request, plain.raw)),
        Parsed::Partial | Parsed::NotPlain | Parsed::BodyComing(_) | Parsed::Broken(_) => None,
    }
}

/// The request of a parsed head, with the headers at `spans` and its `body` if it has one; the
/// body given back when `http` refuses a part of the head.
fn build(
    head: &Bytes,
    method: Method,
    target: Range<usize>,
    spans: &[(Range<usize>, Range<usize>)],
    body: Option<Bytes>,
) -> Result<http::Request<ClientBody>, Option<Bytes>> {
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target)) else {
        return Err(body);
    };
    // Made with its body in place: set after, the request was copied once more per request.
    let mut request = http::Request::new(body.map_or(ClientBody::Empty, ClientBody::Read));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    // Without spans (a raw head: its headers are its lines) the request keeps the empty map it
    // was made with: no allocation, and no map made or dropped.
    if !spans.is_empty() {
        let headers = request.headers_mut();
        *headers = crate::headers::spare_map(spans.len());
        for (name, value) in spans {
            let name = crate::upstream::codec::header_name(&head[name.clone()]);
            let value = HeaderValue::from_maybe_shared(head.slice(value.clone()));
            let (Ok(name), Ok(value)) = (name, value) else {
                return Err(match std::mem::take(request.body_mut()) {
                    ClientBody::Read(body) => Some(body),
                    _ => None,
                });
            };
            headers.append(name, value);
        }
    }
    Ok(request)
}

/// A `Content-Length` value of digits only (RFC 9110 §8.6), as a number; `None` for anything
/// else, or a length past `u64`.
fn body_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |sum, &digit| {
        sum.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Whether a comma-separated header value lists `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Exactly this many bytes (0: none).
    Length(u64),
    /// Chunked.
    Chunked,
    /// No body may follow the head (HEAD, 204, 304).
    Nothing,
}

/// How a response is written.
#[derive(Clone, Copy)]
struct Writing<'a> {
    /// The request was a HEAD: no body follows the head.
    head_only: bool,
    /// The head says `Connection: close`.
    closing: bool,
    /// The request's id and this gateway's `x-herd-gateway`, added to a worker's raw head (the
    /// request path puts them in the header map of every other response): the id when the
    /// worker sent none.
    request_id: &'a HeaderValue,
    gateway: &'a HeaderValue,
}

/// Writes `response` as `how` says; whether the connection may serve another request. A body
/// longer or shorter than its `Content-Length` is an error: the connection closes rather than
/// send a client bytes it would read as the next answer, or leave it waiting for bytes that
/// never come (as hyper). The caller drops `response` after: that ends the request (its guard is
/// in the body). Borrowed, not taken: taken, the response (300 bytes) was copied into this
/// future's arguments, its locals and out of it again, for every request. While it waits for
/// the body, `watch` (TLS) reads the client into `buffer`: its hang-up is an error too.
async fn write_response<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut ClientIo<S>,
    response: &mut Response<Served>,
    how: Writing<'_>,
    out: &mut Vec<u8>,
    (watch, buffer): (&mut ReadWatch, &mut BytesMut),
) -> io::Result<bool> {
    out.clear();
    let (framing, keep_alive) = encode_head(response, how, out)?;
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    crate::headers::recycle(response.headers_mut());
    let body = response.body_mut();
    if framing != Framing::Nothing && !body.is_end_stream() {
        loop {
            // What is ready now goes out with the head; a body that waits sends what is
            // gathered first.
            let ready = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)));
            let frame = match ready.await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if !out.is_empty() {
                        io.write_all(out).await?;
                        out.clear();
                    }
                    match watch.until(pin!(body.frame()), io, buffer).await {
                        Some(frame) => frame,
                        None => return Err(io::Error::other("the client hung up mid-answer")),
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(error)) => {
                    // What came before the break goes out, then the connection ends (a client
                    // sees a cut-off answer, as from hyper, not none at all).
                    if !out.is_empty() {
                        io.write_all(out).await?;
                    }
                    return Err(io::Error::other(error));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers are not forwarded over HTTP/1.1
                },
            };
            if data.is_empty() {
                continue;
            }
            let data = if framing == Framing::Chunked {
                data
            } else if data.len() as u64 > remaining {
                // More than the declared length: what fits goes out, then the connection ends.
                out.extend_from_slice(&data[..remaining as usize]);
                io.write_all(out).await?;
                return Err(io::Error::other(
                    "response body longer than its Content-Length",
                ));
            } else {
                remaining -= data.len() as u64;
                data
            };
            if framing == Framing::Chunked {
                let mut size = [0u8; 16];
                out.extend_from_slice(hex(data.len(), &mut size));
                out.extend_from_slice(b"\r\n");
            }
            if out.len() + data.len() <= GATHER {
                out.extend_from_slice(&data);
            } else {
                io.write_all_buf(&mut bytes::Buf::chain(&out[..], &data[..]))
                    .await?;
                out.clear();
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        } else if remaining > 0 {
            if !out.is_empty() {
                io.write_all(out).await?;
            }
            return Err(io::Error::other(
                "response body shorter than its Content-Length",
            ));
        }
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    io.flush().await?;
    Ok(keep_alive)
}

/// `n` in lower-case hex, in `room`.
fn hex(mut n: usize, room: &mut [u8; 16]) -> &[u8] {
    let mut at = room.len();
    loop {
        at -= 1;
        room[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &room[at..];
        }
    }
}

/// Writes the status line and headers of `response` to `out`, by hyper's rules (see the module
/// doc): how the body is framed, and whether the connection may stay open. The worker's header
/// lines come as they were sent when the response has them raw (`ResponseBody::raw_head`).
/// An error: the head cannot be written safely, and the connection must close.
fn encode_head(
    response: &Response<Served>,
    how: Writing<'_>,
    out: &mut Vec<u8>,
) -> io::Result<(Framing, bool)> {
    let Writing {
        head_only,
        closing,
        request_id,
        gateway,
    } = how;
    let status = response.status();
    let body = response.body();
    // What the body says of its length: none, exactly n, or not known.
    let length = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let body_allowed =
        !head_only && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let length_allowed = !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut framing = None;
    let mut keep_alive = true;
    let mut dated = false;
    if let Some(raw) = body.inner().raw_head() {
        // The worker's lines as it sent them, less those about its own connection (`RawHead`:
        // nothing else in them to take out). Its `Content-Length` frames the body, whose length
        // is therefore exact.
        let [before, after] = raw.runs();
        if !before.is_empty() {
            out.extend_from_slice(before);
        }
        out.extend_from_slice(after);
        if raw.has_content_length {
            // A body framed by its length knows it exactly (`WorkerBody::size_hint`). Were it
            // ever unknown, the body would be chunked after the worker's length line: two
            // framings, which a client could be desynchronised by. Fail closed instead.
            let Some(length) = length else {
                return Err(io::Error::other(
                    "a worker's Content-Length line with a body of unknown length",
                ));
            };
            framing = Some(Framing::Length(length));
        }
        dated = raw.has_date;
        // What the gateway adds, kept out of the (empty) header map.
        if !raw.has_request_id {
            put_line(out, headers::REQUEST_ID.as_str(), request_id.as_bytes());
        }
        put_line(out, headers::GATEWAY.as_str(), gateway.as_bytes());
    }
    for (name, value) in response.headers() {
        if *name == header::CONTENT_LENGTH {
            if framing.is_some() {
                continue; // the first one counts, as in hyper
            }
            match length {
                // An empty body keeps the header only for HEAD (the length of what a GET
                // would get); otherwise `content-length: 0` is written below.
                Some(0) if !head_only => continue,
                Some(n) => framing = Some(Framing::Length(n)),
                None => match std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    Some(n) => framing = Some(Framing::Length(n)),
                    None => continue,
                },
            }
        } else if *name == header::TRANSFER_ENCODING {
            if !body_allowed {
                continue;
            }
            framing = Some(Framing::Chunked);
        } else if *name == header::CONNECTION {
            if has_token(value.as_bytes(), b"close") {
                keep_alive = false;
            }
        } else if *name == header::DATE {
            dated = true;
        }
        put_line(out, name.as_str(), value.as_bytes());
    }
    if closing && keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
        keep_alive = false;
    }
    let framing = match framing {
        Some(framing) => framing,
        None => match length {
            Some(0) => {
                if length_allowed && !head_only {
                    out.extend_from_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(n) => {
                if length_allowed {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                Framing::Length(n)
            }
            None if body_allowed => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None => Framing::Nothing,
        },
    };
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(crate::date::now().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = if body_allowed {
        framing
    } else {
        Framing::Nothing
    };
    Ok((framing, keep_alive))
}

/// Writes the header line `name: value`.
fn put_line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
