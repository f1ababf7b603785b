//! The gateway's HTTP/2 server for clients: the `h2` crate driven directly, without hyper's
//! server around it.
//!
//! hyper's HTTP/2 server is a thin layer over `h2`, but it cost about 1 400 of an h2c request's
//! 31 000 user-space instructions (`infra/bench/instructions.sh h2`, docs/performance.md
//! section 53): each request's body wrapped for hyper and its stream future moved through
//! hyper's state machine, a lock taken per request for its keep-alive pings, six header-map
//! removals and a lookup on every response.
//! Here each stream is one future ([`serve_stream`]) on the connection's task
//! (`crate::h2_streams`): the request goes through the same service as HTTP/1.1's
//! (`ServiceContext::respond`), its body read by `body::ClientIncoming`, and the answer is sent
//! the way hyper sends it.
//!
//! What hyper's server did, and where it is now:
//! - settings: hyper's defaults (1 MiB stream and connection windows, 16 KiB frames, 200
//!   concurrent streams, 400 KiB send buffer, 1024 local error resets), the header list limit
//!   from `limits.max_header_bytes` ([`Http2Settings`]);
//! - keep-alive: a ping every `timeouts.client_idle / 2` and the connection closed when its
//!   pong is not back within as long ([`KeepAlive`]): a client that vanished is noticed also
//!   while its requests are in flight (an idle connection is closed by `crate::client_io`).
//!   hyper pinged only after an interval with nothing read, which took a lock per request to
//!   note the reads; here a busy connection gets one ping more per interval;
//! - a stream the client resets cancels its request (the request path is dropped, as on a
//!   hang-up over HTTP/1.1), before and during the answer;
//! - a response gets `Date` when it has none, `Content-Length` when its body's length is known
//!   and not declared, and no hop-by-hop headers (HTTP/2 forbids them; the worker's answers
//!   come without them already, `headers::strip_hop_by_hop`);
//! - the body is sent as its frames come, each DATA frame once the stream's window has room for
//!   some of it, but a small last one (one frame's worth) at once; trailers as trailers;
//! - a graceful close (the gateway stopping) sends GOAWAY and lets the open streams finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::server::{Connection as H2Connection, Handshake, SendResponse};
use h2::{PingPong, Reason, RecvStream, SendStream};
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderValue, Request};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use crate::body::{ClientBody, ClientIncoming};
use crate::serving::{Inline, ServiceContext};

/// What an HTTP/2 client connection is served with.
#[derive(Clone, Copy, Debug)]
pub struct Http2Settings {
    /// SETTINGS_MAX_HEADER_LIST_SIZE: the largest request head (decoded) a client may send.
    pub max_header_list_size: u32,
    /// How long the connection may go without a ping; `None`: no pings.
    pub keep_alive_interval: Option<Duration>,
    /// How long a ping's pong may take before the connection is closed.
    pub keep_alive_timeout: Duration,
}

impl Http2Settings {
    /// `h2`'s server with these settings and hyper's defaults for the rest (see the module doc).
    fn builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(1024 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_frame_size(16 * 1024)
            .max_concurrent_streams(200)
            .max_send_buffer_size(400 * 1024)
            .max_local_error_reset_streams(Some(1024))
            .max_header_list_size(self.max_header_list_size);
        builder
    }
}

/// Why a client's HTTP/2 connection ended other than by closing normally.
#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    /// The protocol or the connection broke (a client's protocol error, a reset socket).
    #[error(transparent)]
    Protocol(#[from] h2::Error),
    /// The client answered no ping in time.
    #[error("the client answered no ping for {0:?}")]
    KeepAliveTimedOut(Duration),
}

/// A client's HTTP/2 connection: accepts its streams and hands each to the connection's task
/// (`crate::h2_streams::hand_over`, run inside `h2_streams::WithStreams`). Ends when the
/// connection does; its streams may still be finishing then.
pub(crate) struct Http2Connection<T> {
    state: State<T>,
    context: Arc<ServiceContext>,
    settings: Http2Settings,
    keep_alive: Option<KeepAlive>,
    /// Told to close before the handshake was done.
    close_pending: bool,
    /// A ping went unanswered: the connection is closing.
    timed_out: bool,
}

enum State<T> {
    Handshaking(Handshake<T, Bytes>),
    Serving(H2Connection<T, Bytes>),
}

impl<T> Http2Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Serves `io` (past the client's preface sniff) with `context`'s service.
    pub(crate) fn new(io: T, context: Arc<ServiceContext>, settings: &Http2Settings) -> Self {
        Http2Connection {
            state: State::Handshaking(settings.builder().handshake(io)),
            context,
            settings: *settings,
            keep_alive: None,
            close_pending: false,
            timed_out: false,
        }
    }

    /// Starts a graceful close: GOAWAY, no new streams, the open ones finish.
    pub(crate) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Handshaking(_) => self.close_pending = true,
            State::Serving(connection) => connection.graceful_shutdown(),
        }
    }
}

impl<T> Future for Http2Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<(), Http2Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let connection = match &mut this.state {
                State::Handshaking(handshake) => {
                    let mut connection = ready!(Pin::new(handshake).poll(cx))?;
                    if let Some(interval) = this.settings.keep_alive_interval
                        && let Some(ping_pong) = connection.ping_pong()
                    {
                        this.keep_alive = Some(KeepAlive::new(
                            ping_pong,
                            interval,
                            this.settings.keep_alive_timeout,
                        ));
                    }
                    if this.close_pending {
                        connection.graceful_shutdown();
                    }
                    this.state = State::Serving(connection);
                    continue;
                }
                State::Serving(connection) => connection,
            };
            if !this.timed_out
                && let Some(keep_alive) = &mut this.keep_alive
                && keep_alive.poll_timed_out(cx)
            {
                debug!("an HTTP/2 client answered no ping in time; closing its connection");
                // Polled on below, to send the GOAWAY, until the connection is over.
                connection.abrupt_shutdown(Reason::NO_ERROR);
                this.timed_out = true;
            }
            let ended = match ready!(connection.poll_accept(cx)) {
                Some(Ok((request, respond))) => {
                    let context = this.context.clone();
                    // Made in its allocation: the stream's future is several KB.
                    let stream = Box::into_pin(Box::write(
                        Box::new_uninit(),
                        serve_stream(context, request, respond),
                    ));
                    crate::h2_streams::hand_over(stream);
                    continue;
                }
                Some(Err(error)) => Err(error.into()),
                None => Ok(()),
            };
            return Poll::Ready(match (&this.keep_alive, this.timed_out) {
                (Some(keep_alive), true) => Err(Http2Error::KeepAliveTimedOut(
                    keep_alive.interval + keep_alive.timeout,
                )),
                _ => ended,
            });
        }
    }
}

/// One request of an HTTP/2 connection, from its head to the last frame of its answer.
async fn serve_stream(
    context: Arc<ServiceContext>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    // Looked up only for a body to come (a GET's stream ends with its head).
    let content_length = if request.body().is_end_stream() {
        Some(0)
    } else {
        declared_length(&request)
    };
    let request =
        request.map(|body| ClientBody::Incoming(ClientIncoming::http2(body, content_length)));
    let mut responding = std::pin::pin!(context.respond::<Inline>(request, None, None));
    // The client may reset the stream while the request path runs: dropping it then cancels
    // the request at its worker.
    let answered = std::future::poll_fn(|cx| {
        if let Poll::Ready(answer) = responding.as_mut().poll(cx) {
            return Poll::Ready(Some(answer));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let response = match answered {
        Some(Ok(response)) => response,
        // Not expected over HTTP/2 (no hang-up watch); a reset, as hyper sends.
        Some(Err(_)) => {
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
        None => {
            debug!("an HTTP/2 client reset its stream before the answer");
            return;
        }
    };
    let (mut head, body) = response.into_parts();
    crate::headers::strip_hop_by_hop(&mut head.headers);
    if !head.headers.contains_key(DATE) {
        head.headers.insert(DATE, crate::date::now());
    }
    let end = body.is_end_stream();
    if !end
        && let Some(length) = body.size_hint().exact()
        && !head.headers.contains_key(CONTENT_LENGTH)
    {
        head.headers
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    let sending = match respond.send_response(http::Response::from_parts(head, ()), end) {
        Ok(sending) => sending,
        Err(error) => {
            debug!(error = %error, "an HTTP/2 answer's head could not be sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end && let Err(error) = send_body(body, sending).await {
        debug!(error = %error, "an HTTP/2 answer's body ended early");
    }
}

/// The request's `Content-Length`: its value, when every one it has is the same number (h2
/// refuses a request whose lines disagree or are not numbers, as hyper read them).
fn declared_length<B>(request: &Request<B>) -> Option<u64> {
    let mut length = None;
    for value in request.headers().get_all(CONTENT_LENGTH) {
        let value: u64 = value.to_str().ok()?.parse().ok()?;
        if length.is_some_and(|length| length != value) {
            return None;
        }
        length = Some(value);
    }
    length
}

/// Why an answer's body stopped before its end.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("the client reset the stream ({0})")]
    Reset(Reason),
    #[error("the worker's body failed: {0}")]
    Body(#[from] crate::serving::ServedError),
    #[error(transparent)]
    Protocol(#[from] h2::Error),
    #[error("the stream closed while its body was on the way")]
    Closed,
}

/// Sends `body` on `stream` as its frames come: each DATA frame once the stream's window has
/// room for some of it (so a slow client holds the worker's body back, not the gateway's
/// memory), trailers as trailers. A last frame of at most [`SMALL_LAST_FRAME`] goes at once.
/// A reset by the client ends it; a broken worker body resets the stream.
async fn send_body<B>(body: B, mut stream: SendStream<Bytes>) -> Result<(), SendError>
where
    B: Body<Data = Bytes, Error = crate::serving::ServedError>,
{
    let mut body = std::pin::pin!(body);
    // A frame's data waiting for room in the stream's window, and whether it is the last.
    let mut waiting: Option<(Bytes, bool)> = None;
    std::future::poll_fn(|cx| {
        loop {
            if let Some((data, last)) = waiting.take() {
                while stream.capacity() == 0 {
                    match stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                        // Reset by the client, or closed.
                        Poll::Ready(None) => return Poll::Ready(Err(SendError::Closed)),
                        Poll::Pending => {
                            waiting = Some((data, last));
                            return Poll::Pending;
                        }
                    }
                }
                stream.send_data(data, last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
            }
            // The next frame is read before room is asked for: room held for a body that
            // sends nothing could hold back the connection's other streams (hyper#4003).
            let frame = match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => frame,
                // Woken when the client resets the stream, too.
                Poll::Pending => {
                    if let Poll::Ready(reason) = stream.poll_reset(cx)? {
                        return Poll::Ready(Err(SendError::Reset(reason)));
                    }
                    return Poll::Pending;
                }
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        // A small last frame goes at once (h2 buffers it until the window
                        // has room; nothing is read after it), as does an empty one.
                        let last = body.is_end_stream();
                        if data.is_empty() || (last && data.len() <= SMALL_LAST_FRAME) {
                            stream.send_data(data, last)?;
                            if last {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // One byte asked for: h2 raises the claim to what is buffered.
                        stream.reserve_capacity(1);
                        waiting = Some((data, last));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            stream.reserve_capacity(0);
                            stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(error)) => {
                    stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(error.into()));
                }
                None => {
                    stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    })
    .await
}

/// The largest last DATA frame sent without waiting for room in the stream's window: one frame
/// at the default frame size. Most answers are one small frame, and asking h2 for room first
/// costs a reservation and its bookkeeping per answer (docs/performance.md section 53). Bounded,
/// so that a client that grants no window holds at most this much per stream (200 streams:
/// 3.2 MiB per connection; the connection's idle timer then closes it).
const SMALL_LAST_FRAME: usize = 16 * 1024;

/// The connection's keep-alive: a ping each `interval`, and the connection over when a pong
/// takes longer than `timeout`.
struct KeepAlive {
    ping_pong: PingPong,
    interval: Duration,
    timeout: Duration,
    /// The next ping is due, or (while a ping is out) its pong.
    due: Pin<Box<Sleep>>,
    ping_out: bool,
}

impl KeepAlive {
    fn new(ping_pong: PingPong, interval: Duration, timeout: Duration) -> Self {
        KeepAlive {
            ping_pong,
            interval,
            timeout,
            due: Box::pin(tokio::time::sleep(interval)),
            ping_out: false,
        }
    }

    /// Sends the pings when due; true when a pong is overdue.
    fn poll_timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            // Polled right after a ping is sent too, so that its pong wakes the connection.
            if self.ping_out {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.ping_out = false;
                        self.due.as_mut().reset(Instant::now() + self.interval);
                    }
                    // The connection is ending; it says why itself.
                    Poll::Ready(Err(_)) => return false,
                    Poll::Pending => {}
                }
            }
            if self.due.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.ping_out {
                return true;
            }
            if self.ping_pong.send_ping(h2::Ping::opaque()).is_err() {
                return false;
            }
            self.ping_out = true;
            self.due.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_lengths(values: &[&str]) -> Request<()> {
        let mut request = Request::post("/").body(()).unwrap();
        for value in values {
            request
                .headers_mut()
                .append(CONTENT_LENGTH, HeaderValue::from_str(value).unwrap());
        }
        request
    }

    #[test]
    fn the_declared_length_is_the_one_number_every_line_gives() {
        assert_eq!(declared_length(&with_lengths(&[])), None);
        assert_eq!(declared_length(&with_lengths(&["12"])), Some(12));
        assert_eq!(declared_length(&with_lengths(&["12", "12"])), Some(12));
        assert_eq!(declared_length(&with_lengths(&["12", "13"])), None);
        assert_eq!(declared_length(&with_lengths(&["twelve"])), None);
    }
}
