//! A client's request body on its way to a worker: buffered whole (replayable) or streamed
//! from the client, with what the proxy needs to know afterwards (did the client finish, did it
//! go over the size limit, did it go away).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::ClientIncoming;

/// Why a request body stopped while streaming to a worker.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body grew over `limits.max_body_bytes`.
    #[error("request body over the size limit")]
    TooLarge,
    /// Reading from the client failed.
    #[error("reading the request body failed: {0}")]
    Client(#[from] ClientReadError),
}

/// Reading a client's request body failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientReadError {
    /// HTTP/1.1, read by hyper's server.
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    /// HTTP/2, read from its stream (`crate::h2_server`).
    #[error(transparent)]
    Http2(#[from] h2::Error),
}

/// Whether a body read failed because the client closed or reset its connection midway (as
/// opposed to sending something broken): nobody is left to answer. On HTTP/2 also a stream
/// the client reset, or a connection it is closing: it wants no answer to this request.
pub fn client_went_away(error: &ClientReadError) -> bool {
    match error {
        ClientReadError::Http1(error) => {
            if error.is_incomplete_message() || error.is_canceled() {
                return true;
            }
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                    return connection_lost(io);
                }
                source = cause.source();
            }
            false
        }
        ClientReadError::Http2(error) => match error.get_io() {
            Some(io) => connection_lost(io),
            None => error.is_remote() && (error.is_reset() || error.is_go_away()),
        },
    }
}

/// Whether `error` says the connection closed or broke under the read.
fn connection_lost(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// What a streaming request body did, seen from the proxy after a failed attempt.
#[derive(Debug, Default)]
pub struct StreamWatch {
    pub(crate) finished: AtomicBool,
    pub(crate) too_large: AtomicBool,
}

impl StreamWatch {
    /// The client sent the whole body.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }

    /// The body went over the size limit.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }
}

/// A request body on its way to a worker.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Fully buffered (or empty): can be sent again.
    Full(Option<Bytes>),
    /// Streaming from the client, after an already read prefix.
    Stream {
        /// Bytes read before streaming began.
        prefix: Option<Bytes>,
        /// The rest, from the client.
        inner: ClientIncoming,
        /// Bytes seen so far, prefix included.
        seen: u64,
        /// Size limit.
        limit: u64,
        /// Shared with the proxy.
        watch: Arc<StreamWatch>,
    },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Stream {
                prefix,
                inner,
                seen,
                limit,
                watch,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                match ready!(Pin::new(inner).poll_frame(cx)) {
                    None => {
                        watch.finished.store(true, Ordering::Relaxed);
                        Poll::Ready(None)
                    }
                    Some(Err(error)) => Poll::Ready(Some(Err(BodyError::Client(error)))),
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            *seen += data.len() as u64;
                            if *seen > *limit {
                                watch.too_large.store(true, Ordering::Relaxed);
                                return Poll::Ready(Some(Err(BodyError::TooLarge)));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(data) => data.is_none(),
            UpstreamBody::Stream { prefix, inner, .. } => prefix.is_none() && inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(None) => SizeHint::with_exact(0),
            UpstreamBody::Full(Some(data)) => SizeHint::with_exact(data.len() as u64),
            UpstreamBody::Stream { prefix, inner, .. } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let hint = inner.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + extra);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + extra);
                }
                out
            }
        }
    }
}
