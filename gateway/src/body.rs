//! Bodies on both sides of the gateway.
//!
//! Request bodies up to `retry.buffer_body_bytes` are read fully before the first attempt, so a
//! failed attempt can be replayed elsewhere (cloning [`Bytes`] is a reference count). Larger
//! bodies stream straight through: the first attempt is the only one. A body with no declared
//! length is buffered up to the same size and streams from there. The size limit
//! (`limits.max_body_bytes`) is checked on the declared length up front and counted while
//! streaming.
//!
//! A small body the gateway's own HTTP/1.1 server found whole behind its head
//! (`crate::plain_http1`) comes read ([`ClientBody::Read`]): it is the buffered case without the
//! reading.
//!
//! Response bodies stream from the worker to the client as they come; the worker's in-flight
//! count is held until the body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::balancer::InFlight;
use crate::client_io::ConnectionState;
use crate::error::GatewayError;
pub use crate::upstream::{
    BodyError, ClientReadError, StreamWatch, UpstreamBody, client_went_away,
};
use crate::upstream::{RawHead, WorkerBody, WorkerBodyError};

/// A client's request body, as the request path gets it.
#[derive(Debug, Default)]
pub enum ClientBody {
    /// None: a request the gateway's own HTTP/1.1 server read without one.
    #[default]
    Empty,
    /// Read whole with its head by the gateway's own HTTP/1.1 server: at most
    /// `retry.buffer_body_bytes` and `limits.max_body_bytes`, so replayable as a buffered one.
    Read(Bytes),
    /// To be read from the client: from an HTTP/2 stream (`crate::h2_server`), or by hyper's
    /// HTTP/1.1 server (the requests it serves).
    Incoming(ClientIncoming),
}

impl ClientBody {
    /// Whether the request came from the gateway's own HTTP/1.1 server, which writes a worker's
    /// response head through as its lines (no header map for the response).
    pub fn read_by_gateway(&self) -> bool {
        !matches!(self, ClientBody::Incoming(_))
    }

    /// Whether bytes of it are still to be read from the client.
    pub fn to_read(&self) -> bool {
        matches!(self, ClientBody::Incoming(body) if !body.is_end_stream())
    }
}

/// A request body read from the client: by hyper's HTTP/1.1 server, or from its HTTP/2 stream
/// (`crate::h2_server`). Read to its end, an HTTP/1.1 body tells its connection so
/// ([`ConnectionState::body_read`]): nothing of it is left for hyper to read, so once the
/// response is done the connection is between requests again — it may move to another serving
/// thread, and is closed at once when the gateway stops, as after a request without a body (it
/// was kept until the drain timeout).
#[derive(Debug)]
pub struct ClientIncoming {
    inner: Source,
    /// The connection and its request's number ([`ConnectionState::latest_request`]), while
    /// the end is still to be told.
    tell: Option<(Arc<ConnectionState>, u64)>,
}

/// Where a request body's bytes come from.
#[derive(Debug)]
enum Source {
    Http1(Incoming),
    Http2(Http2Body),
}

impl ClientIncoming {
    /// A body hyper's server reads, that tells no one of its end (until
    /// [`ClientIncoming::tell_at_end`]).
    pub fn new(inner: Incoming) -> Self {
        ClientIncoming {
            inner: Source::Http1(inner),
            tell: None,
        }
    }

    /// The body of an HTTP/2 request, `content_length` as its head declared it.
    pub fn http2(stream: h2::RecvStream, content_length: Option<u64>) -> Self {
        ClientIncoming {
            inner: Source::Http2(Http2Body {
                stream,
                data_done: false,
                left: content_length,
            }),
            tell: None,
        }
    }

    /// Tells `connection` when the body of its request number `request` has been read.
    pub fn tell_at_end(&mut self, connection: Arc<ConnectionState>, request: u64) {
        self.tell = Some((connection, request));
    }
}

impl Body for ClientIncoming {
    type Data = Bytes;
    type Error = ClientReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientReadError>>> {
        let this = self.get_mut();
        let frame = match &mut this.inner {
            Source::Http1(incoming) => {
                ready!(Pin::new(&mut *incoming).poll_frame(cx)).map(|f| f.map_err(Into::into))
            }
            Source::Http2(body) => ready!(body.poll_frame(cx)).map(|f| f.map_err(Into::into)),
        };
        // A reader may stop at the last frame when the body says it ended: told then too.
        // After an error (broken framing, the client gone) hyper ends the body early, bytes of
        // it possibly unread: never told.
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => this.is_end_stream(),
            Some(Err(_)) => {
                this.tell = None;
                false
            }
        };
        if ended && let Some((connection, request)) = this.tell.take() {
            connection.body_read(request);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Http1(incoming) => incoming.is_end_stream(),
            Source::Http2(body) => body.stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Http1(incoming) => incoming.size_hint(),
            Source::Http2(body) if body.stream.is_end_stream() => SizeHint::with_exact(0),
            Source::Http2(body) => body
                .left
                .map_or_else(SizeHint::default, SizeHint::with_exact),
        }
    }
}

/// An HTTP/2 request body, read as hyper's server read one: each DATA frame's bytes are given
/// back to the flow-control window as they are taken (the client may send more), trailers
/// after the data.
#[derive(Debug)]
struct Http2Body {
    stream: h2::RecvStream,
    /// The data has ended: trailers are next.
    data_done: bool,
    /// Bytes still to come, when the head declared a length (h2 checks that it holds).
    left: Option<u64>,
}

impl Http2Body {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    if let Some(left) = &mut self.left {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset with NO_ERROR is an early answer (RFC 9113 §8.1): the body ends,
                // without failing.
                Some(Err(error)) if error.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(error) if error.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }
}

/// A request body after the first read: replayable, or streaming (one attempt only).
#[derive(Debug)]
pub enum Prepared {
    /// Buffered or empty; each attempt gets a copy.
    Replayable(Option<Bytes>),
    /// Streaming; taken by the first attempt.
    Streaming(Option<UpstreamBody>, Arc<StreamWatch>),
}

impl Prepared {
    /// The body for the next attempt, if one can still be made.
    pub fn attempt(&mut self) -> Option<UpstreamBody> {
        match self {
            Prepared::Replayable(data) => Some(UpstreamBody::Full(data.clone())),
            Prepared::Streaming(body, _) => body.take(),
        }
    }

    /// Whether the body can be sent more than once.
    pub fn replayable(&self) -> bool {
        matches!(self, Prepared::Replayable(_))
    }

    /// Whether [`Prepared::attempt`] has a body to give: always when replayable, and for a
    /// stream until it was handed to a worker (a refused connect leaves it untouched).
    pub fn available(&self) -> bool {
        match self {
            Prepared::Replayable(_) => true,
            Prepared::Streaming(body, _) => body.is_some(),
        }
    }

    /// The stream's watch, for a streaming body.
    pub fn watch(&self) -> Option<&StreamWatch> {
        match self {
            Prepared::Streaming(_, watch) => Some(watch),
            Prepared::Replayable(_) => None,
        }
    }
}

/// Reads the start of a request body: all of it up to `buffer_limit`, then streams.
pub async fn prepare(
    mut body: ClientIncoming,
    content_length: Option<u64>,
    buffer_limit: u64,
    max_body: u64,
) -> Result<Prepared, GatewayError> {
    if let Some(length) = content_length {
        if length > max_body {
            return Err(GatewayError::BodyTooLarge);
        }
        if length == 0 {
            return Ok(Prepared::Replayable(None));
        }
        if length > buffer_limit {
            return Ok(streaming(None, body, 0, max_body));
        }
    } else if body.is_end_stream() {
        return Ok(Prepared::Replayable(None));
    }
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                let data = (!buffer.is_empty()).then(|| buffer.freeze());
                return Ok(Prepared::Replayable(data));
            }
            Some(Err(error)) if client_went_away(&error) => {
                return Err(GatewayError::ClientGone(error.to_string()));
            }
            Some(Err(error)) => return Err(GatewayError::ClientBody(error.to_string())),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not forwarded
                };
                buffer.extend_from_slice(&data);
                let seen = buffer.len() as u64;
                if seen > max_body {
                    return Err(GatewayError::BodyTooLarge);
                }
                if seen > buffer_limit {
                    return Ok(streaming(Some(buffer.freeze()), body, seen, max_body));
                }
            }
        }
    }
}

fn streaming(prefix: Option<Bytes>, inner: ClientIncoming, seen: u64, limit: u64) -> Prepared {
    let watch = Arc::new(StreamWatch::default());
    Prepared::Streaming(
        Some(UpstreamBody::Stream {
            prefix,
            inner,
            seen,
            limit,
            watch: watch.clone(),
        }),
        watch,
    )
}

/// A response body to the client: the worker's stream, or the gateway's own bytes.
// Not boxed: the worker's stream is the common case, and a box would be an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ResponseBody {
    /// Made by the gateway (errors, admin).
    Full(Option<Bytes>),
    /// Streaming from a worker; holds the worker's in-flight count until it ends.
    Upstream {
        /// The worker's body.
        inner: WorkerBody,
        /// Released at the end of the body.
        guard: Option<InFlight>,
        /// The worker's head as it came, when the response's header map holds only what the
        /// gateway adds (for the gateway's own HTTP/1.1 server, `crate::plain_http1`).
        raw_head: Option<RawHead>,
    },
}

impl ResponseBody {
    /// A body of fixed bytes.
    pub fn full(data: Bytes) -> Self {
        ResponseBody::Full((!data.is_empty()).then_some(data))
    }

    /// An empty body.
    pub fn empty() -> Self {
        ResponseBody::Full(None)
    }

    /// The worker's head as it came, when the response's header lines are still in it.
    pub fn raw_head(&self) -> Option<&RawHead> {
        match self {
            ResponseBody::Upstream { raw_head, .. } => raw_head.as_ref(),
            ResponseBody::Full(_) => None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = WorkerBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WorkerBodyError>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Upstream { inner, guard, .. } => {
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                if !matches!(frame, Some(Ok(_))) {
                    guard.take();
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
