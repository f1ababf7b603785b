//! A worker's response body on its way to the client, read straight from the worker's
//! connection by the task that writes it to the client.
//!
//! When the whole body arrived with the head — the common case for small responses — it is
//! handed over as one piece and the connection goes back to the pool before the client sees a
//! byte. Otherwise the body holds the connection and returns it once the body is complete; a
//! body dropped half-way (the client left) closes it, since the rest would still be in flight.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::codec::{Chunk, ChunkedDecoder, ProtocolError, ResponseFraming};
use super::connection::{Connection, READ_CHUNK};
use super::pool::PoolLimits;

/// The most of a long body read at once (a 64 KiB answer in two reads and two writes to the
/// client rather than eight each; docs/performance.md, section 36).
const LONG_READ: usize = 64 * 1024;

/// Room for what follows the known part of a body, taken in the read that ends it (see
/// [`super::connection::Socket::poll_read_long`]): a chunk's CRLF and the next size line or the
/// last chunk, or the first unasked bytes behind a body.
const FRAMING_SLACK: usize = 64;

/// Reading a worker's response body failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerBodyError {
    /// The connection broke mid-body.
    #[error("worker connection broke mid-body: {0}")]
    Io(#[from] std::io::Error),
    /// The worker closed the connection before the declared end of the body.
    #[error("worker closed the connection mid-body")]
    Truncated,
    /// The body's framing is broken.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Where a connection goes when its response is complete.
#[derive(Debug)]
pub struct Home {
    /// The worker's pool, which takes it back.
    pub pool: Arc<super::Pool>,
    /// The pool's limits.
    pub limits: PoolLimits,
    /// When the response head arrived: the connection's idle time counts from then (no clock
    /// read when the body ends; a body that takes longer only makes it expire sooner).
    pub answered: tokio::time::Instant,
}

/// A worker's response body.
#[derive(Debug)]
pub struct WorkerBody {
    state: State,
    /// Present while the body is still being read from it.
    connection: Option<Connection>,
    /// Whether the connection may carry another request afterwards.
    keep_alive: bool,
    home: Option<Home>,
}

#[derive(Debug)]
enum State {
    /// Everything is here (or there is nothing); the connection is back in the pool.
    Buffered(Option<Bytes>),
    /// This many bytes still to come.
    Length(u64),
    /// Chunked.
    Chunked(ChunkedDecoder),
    /// Until the worker closes.
    UntilClose,
    /// Finished.
    Done,
}

impl WorkerBody {
    /// The body of a response framed by `framing`, whose start is in `connection`'s buffer.
    /// Returns the connection to `home` at once when the whole body is already there.
    pub fn new(
        framing: ResponseFraming,
        keep_alive: bool,
        connection: Connection,
        home: Home,
    ) -> Self {
        let mut body = WorkerBody {
            state: match framing {
                ResponseFraming::Empty => State::Buffered(None),
                ResponseFraming::Length(length) => State::Length(length),
                ResponseFraming::Chunked => State::Chunked(ChunkedDecoder::new()),
                ResponseFraming::UntilClose => State::UntilClose,
            },
            connection: Some(connection),
            keep_alive,
            home: Some(home),
        };
        body.complete_from_buffer();
        body
    }

    /// Turns a body that already sits whole in the buffer into one piece.
    fn complete_from_buffer(&mut self) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        match &mut self.state {
            State::Buffered(_) => self.release(),
            State::Length(length) if (connection.read.len() as u64) >= *length => {
                let data = connection.read.split_to(*length as usize).freeze();
                self.state = State::Buffered(Some(data));
                self.release();
            }
            State::Chunked(decoder) => {
                // Only when the whole body is there; otherwise stream it.
                let mut probe = connection.read.clone();
                let mut scratch = decoder.clone();
                let mut pieces = Vec::new();
                loop {
                    match scratch.next(&mut probe) {
                        Ok(Chunk::Data(data)) => pieces.push(data),
                        Ok(Chunk::End) => break,
                        Ok(Chunk::NeedMore) | Err(_) => return,
                    }
                }
                connection.read = probe;
                let data = match pieces.len() {
                    0 => None,
                    1 => pieces.pop(),
                    _ => Some(Bytes::from(pieces.concat())),
                };
                self.state = State::Buffered(data);
                self.release();
            }
            _ => {}
        }
    }

    /// The body is complete: give the connection back when it can carry another request.
    fn release(&mut self) {
        let streamed = matches!(
            self.state,
            State::Length(_) | State::Chunked(_) | State::UntilClose
        );
        if streamed {
            self.state = State::Done;
        }
        let connection = self.connection.take();
        let home = self.home.take();
        if let (Some(mut connection), Some(home)) = (connection, home)
            && self.keep_alive
            && connection.read.is_empty()
        {
            // Idle from now: a body that came with its head (nearly all) ends as it arrived,
            // and needs no clock read; a streamed one may have taken minutes.
            let back = if streamed {
                connection.let_go_of_long_buffer();
                tokio::time::Instant::now()
            } else {
                home.answered
            };
            home.pool
                .put_answered(connection, &home.limits, back, home.answered);
        }
    }

    /// Hands on a piece of the body read as [`State::long_read`] says.
    fn long_read_done(
        &mut self,
        piece: std::io::Result<Bytes>,
    ) -> Poll<Option<Result<Frame<Bytes>, WorkerBodyError>>> {
        let piece = match piece {
            Ok(piece) if piece.is_empty() => return self.fail(WorkerBodyError::Truncated),
            Ok(piece) => piece,
            Err(error) => return self.fail(error.into()),
        };
        match &mut self.state {
            State::Length(left) => {
                *left -= piece.len() as u64;
                if *left == 0 {
                    self.release();
                }
            }
            State::Chunked(decoder) => decoder.read_past(piece.len() as u64),
            State::UntilClose | State::Buffered(_) | State::Done => {}
        }
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn fail(
        &mut self,
        error: WorkerBodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, WorkerBodyError>>> {
        self.state = State::Done;
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl State {
    /// How much to read past the connection's buffer, when `buffered` (that buffer) is empty
    /// (see [`super::connection::Socket::poll_read_long`]), and how many bytes more the read may
    /// take: the body bytes known to come next before any framing, when more than one ordinary
    /// read (at most [`LONG_READ`]), with [`FRAMING_SLACK`] when that is all of them. A body
    /// that ends when the worker closes (rare: HTTP/1.0, or a stream of events) keeps ordinary
    /// reads: its size is not known, and a trickle would hold a long buffer for its whole life.
    fn long_read(&self, buffered: &BytesMut) -> Option<(usize, usize)> {
        let coming = match self {
            _ if !buffered.is_empty() => return None,
            State::Length(left) => *left,
            State::Chunked(decoder) => decoder.data_left(),
            State::UntilClose | State::Buffered(_) | State::Done => return None,
        };
        if coming <= READ_CHUNK as u64 {
            None
        } else if coming <= LONG_READ as u64 {
            Some((coming as usize, FRAMING_SLACK))
        } else {
            Some((LONG_READ, 0))
        }
    }
}

impl Body for WorkerBody {
    type Data = Bytes;
    type Error = WorkerBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WorkerBodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(match &mut this.state {
                    State::Buffered(data) => data.take().map(|d| Ok(Frame::data(d))),
                    _ => None,
                });
            };
            match &mut this.state {
                State::Length(left) if !connection.read.is_empty() => {
                    let take = (*left).min(connection.read.len() as u64);
                    let data = connection.read.split_to(take as usize).freeze();
                    *left -= take;
                    if *left == 0 {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(decoder) => match decoder.next(&mut connection.read) {
                    Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Chunk::End) => {
                        this.release();
                        return Poll::Ready(None);
                    }
                    Ok(Chunk::NeedMore) => {}
                    Err(error) => return this.fail(error.into()),
                },
                State::UntilClose if !connection.read.is_empty() => {
                    let data = connection.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                _ => {}
            }
            if let Some((most, slack)) = this.state.long_read(&connection.read) {
                let piece = ready!(connection.poll_read_long(cx, most, slack));
                return this.long_read_done(piece);
            }
            match ready!(connection.poll_read_more(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.connection = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(WorkerBodyError::Truncated),
                Ok(_) => {}
                Err(error) => return this.fail(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Buffered(None) | State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Buffered(None) | State::Done => SizeHint::with_exact(0),
            State::Buffered(Some(data)) => SizeHint::with_exact(data.len() as u64),
            State::Length(left) => SizeHint::with_exact(*left),
            State::Chunked(_) | State::UntilClose => SizeHint::default(),
        }
    }
}
