//! Noticing a client that hangs up while its HTTP/1.1 request is in flight, without hyper's own
//! check, which cost a new 8 KB read buffer per request.
//!
//! While a request waits for its response (and while the response body streams), hyper reads
//! from the client's socket only to notice a hang-up (`mid_message_detect_eof`). That read
//! reserves room in hyper's read buffer while the request head's values still point into it, so
//! the buffer could not be reused: every request allocated a new one (docs/performance.md,
//! section 14). With `half_close(true)` hyper skips the read, and the gateway watches instead:
//! the socket is shared ([`SharedStream`]) between hyper's I/O and a [`HangUpWatch`], which the
//! request's service future and its response body poll while they wait. One byte is peeked:
//!
//! - none (the client closed or half-closed) or an error (it reset): the client hung up. The
//!   request is dropped, and with it the worker connection it used, as hyper did;
//! - bytes, after a request without a body: a pipelined request. Watching stops, as hyper's
//!   check stopped with bytes in its buffer; hyper reads them after the response. Bytes of a
//!   next request already read with this one's head are in hyper's buffer, not on the socket:
//!   such a request is not watched at all (`ConnectionState::pipelined_behind`);
//! - bytes, while the request has a body: possibly the rest of that body, which hyper reads.
//!   The watch stays, and peeks again once hyper has read from the socket since.
//!
//! All of the connection (hyper, the service future, the response body) runs in one task, so the
//! watch and hyper's reads register the same waker: no wake-up is lost or added. Only cleartext
//! HTTP/1.1 is watched here: over TLS the socket's bytes are records, not requests, so the
//! gateway's own server reads through the session instead (`crate::plain_http1`), and hyper,
//! serving what that server does not, keeps its own check; HTTP/2 has stream resets.
//!
//! Why [`SharedStream`] reads the way it does: tokio's own `TcpStream::poll_read` clears the
//! socket's read readiness after a read that did not fill the buffer (edge-triggered epoll
//! reports new bytes again), but its `&self` reads clear it only on `WouldBlock`. Through a plain
//! `Arc<TcpStream>`, the watch's first peek of every request would find the readiness of the
//! request's own bytes and cost a system call; [`SharedStream`] clears it after a short read as
//! tokio does, and the peek finds nothing to do.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::client_io::ConnectionState;

/// A client's socket, shared between hyper's I/O (this) and the [`HangUpWatch`]es of its
/// requests.
#[derive(Debug)]
pub struct SharedStream(Arc<TcpStream>);

impl SharedStream {
    /// Shares `stream`.
    pub fn new(stream: TcpStream) -> Self {
        SharedStream(Arc::new(stream))
    }

    /// A handle to make watches from, kept by the connection's service.
    pub fn watcher(&self) -> Watcher {
        Watcher(self.0.clone())
    }

    /// The stream alone again (to move to another thread); fails while a watch is alive.
    pub fn into_inner(self) -> Result<TcpStream, SharedStream> {
        Arc::try_unwrap(self.0).map_err(SharedStream)
    }
}

/// Makes the [`HangUpWatch`] of each request of a connection.
#[derive(Debug, Clone)]
pub struct Watcher(Arc<TcpStream>);

impl Watcher {
    /// A watch for one request; `body`: the request has a body still to be read, and this is
    /// its connection's state (which counts hyper's reads).
    pub fn watch(&self, body: Option<Arc<ConnectionState>>) -> HangUpWatch {
        HangUpWatch {
            stream: self.0.clone(),
            body,
            bytes_seen: None,
        }
    }
}

/// Watches one request's client for a hang-up (see the module's doc).
#[derive(Debug)]
pub struct HangUpWatch {
    stream: Arc<TcpStream>,
    /// The request has a body, so bytes on the socket may be the rest of it: the connection's
    /// state, whose count of reads tells when hyper took some.
    body: Option<Arc<ConnectionState>>,
    /// Bytes were waiting at the last peek: the count of reads then (0 without a body).
    bytes_seen: Option<u64>,
}

impl HangUpWatch {
    /// Ready once the client has hung up. `Pending` otherwise, with the task woken when the
    /// socket has news — except while bytes are waiting: a pipelined request (after a request
    /// without a body) ends the watch, and the rest of a body is peeked again only once hyper
    /// has read since (each peek at bytes is a system call, and an upload held back by a slow
    /// worker wakes its task often).
    pub fn poll_hung_up(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(seen_at) = self.bytes_seen {
            let Some(state) = &self.body else {
                return Poll::Pending;
            };
            if state.reads() == seen_at {
                return Poll::Pending;
            }
        }
        let mut byte = [0u8; 1];
        let mut peeked = ReadBuf::new(&mut byte);
        match self.stream.poll_peek(cx, &mut peeked) {
            Poll::Pending => {
                self.bytes_seen = None;
                Poll::Pending
            }
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) => {
                self.bytes_seen = Some(self.body.as_ref().map_or(0, |state| state.reads()));
                Poll::Pending
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's future that ends early (with `None`) when its client hangs up; without a
    /// watch, the future alone.
    pub struct UntilHungUp<F> {
        #[pin]
        future: F,
        watch: Option<HangUpWatch>,
    }
}

impl<F> UntilHungUp<F> {
    /// `future`, ended by `watch` (if any).
    pub fn new(future: F, watch: Option<HangUpWatch>) -> Self {
        UntilHungUp { future, watch }
    }

    /// The watch, to go on watching while the response's body streams (after the output).
    pub fn take_watch(self: Pin<&mut Self>) -> Option<HangUpWatch> {
        self.project().watch.take()
    }
}

impl<F: Future> Future for UntilHungUp<F> {
    /// `None` when the client hung up first. (The watch is taken apart, with
    /// [`UntilHungUp::take_watch`]: in a pair with it, the response was copied once more.)
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        match this.watch.as_mut().map(|watch| watch.poll_hung_up(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// The service's error when its client hung up: hyper closes the connection.
#[derive(Debug, thiserror::Error)]
#[error("the client hung up while its request was in flight")]
pub struct ClientHungUp;

/// Writes with `write` once the socket is writable. A write that takes less than `wanted` filled
/// the send buffer: reported to tokio as `WouldBlock`, which clears the write readiness (what
/// `TcpStream::poll_write` does), so the next write waits instead of failing with `EAGAIN`.
fn poll_write_with(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    wanted: usize,
    mut write: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        let mut written = 0;
        let result = stream.try_io(Interest::WRITABLE, || {
            written = write()?;
            if written > 0 && written < wanted {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => return Poll::Ready(Ok(written)),
            Err(_) if written > 0 => return Poll::Ready(Ok(written)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Poll::Ready(Err(error)),
        }
    }
}

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.0;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let wanted = buf.remaining();
            let mut short = false;
            // A read that leaves room in the buffer drained the socket: reported to tokio as
            // `WouldBlock`, which clears the readiness (what `TcpStream::poll_read` does).
            let read = stream.try_io(Interest::READABLE, || {
                let read = stream.try_read_buf(buf)?;
                short = read > 0 && read < wanted;
                if short {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(()) => return Poll::Ready(Ok(())),
                Err(_) if short => return Poll::Ready(Ok(())),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.0;
        poll_write_with(stream, cx, buf.len(), || stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.0;
        let wanted = bufs.iter().map(|buf| buf.len()).sum();
        poll_write_with(stream, cx, wanted, || stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair: the gateway's side shared, and the client's.
    async fn pair() -> (SharedStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (SharedStream::new(accepted), client)
    }

    /// Whether the watch reports a hang-up within 2 s.
    async fn hung_up_soon(watch: &mut HangUpWatch) -> bool {
        hung_up_within(watch, Duration::from_secs(2)).await
    }

    /// Whether the watch reports a hang-up within `time`.
    async fn hung_up_within(watch: &mut HangUpWatch, time: Duration) -> bool {
        let hung_up = poll_fn(|cx| watch.poll_hung_up(cx));
        tokio::time::timeout(time, hung_up).await.is_ok()
    }

    #[tokio::test]
    async fn reads_writes_and_shuts_down_like_the_stream_it_shares() {
        let (mut shared, mut client) = pair().await;
        client.write_all(b"request").await.unwrap();
        let mut got = [0u8; 64];
        let read = shared.read(&mut got).await.unwrap();
        assert_eq!(&got[..read], b"request");
        shared.write_all(b"response").await.unwrap();
        shared.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"response");
    }

    #[tokio::test]
    async fn a_close_or_a_reset_is_a_hang_up() {
        let (shared, client) = pair().await;
        let mut watch = shared.watcher().watch(None);
        assert!(
            poll_fn(|cx| watch.poll_hung_up(cx))
                .now_or_never()
                .is_none()
        );
        drop(client);
        assert!(hung_up_soon(&mut watch).await);

        let (shared, client) = pair().await;
        let mut watch = shared.watcher().watch(None);
        client.set_zero_linger().unwrap();
        drop(client);
        assert!(hung_up_soon(&mut watch).await);
    }

    #[tokio::test]
    async fn a_pipelined_request_ends_the_watch_of_a_bodiless_one() {
        let (mut shared, mut client) = pair().await;
        let mut watch = shared.watcher().watch(None);
        client
            .write_all(b"GET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let quarter_second = Duration::from_millis(250);
        let hung_up = hung_up_within(&mut watch, quarter_second).await;
        assert!(!hung_up, "the next request is waiting");
        // Peeking took nothing: hyper reads the next request after the response.
        let mut next = [0u8; 64];
        let read = shared.read(&mut next).await.unwrap();
        assert_eq!(&next[..read], b"GET /next HTTP/1.1\r\n\r\n");
        // The watch of this request has stopped: the hang-up is the next request's to notice.
        drop(client);
        let hung_up = hung_up_within(&mut watch, quarter_second).await;
        assert!(!hung_up, "stopped at the pipelined request");
    }

    #[tokio::test]
    async fn bytes_of_a_body_do_not_end_the_watch_of_its_request() {
        let (mut shared, mut client) = pair().await;
        let state = Arc::new(ConnectionState::default());
        let mut watch = shared.watcher().watch(Some(state.clone()));
        client.write_all(b"body").await.unwrap();
        let quarter_second = Duration::from_millis(250);
        let hung_up = hung_up_within(&mut watch, quarter_second).await;
        assert!(!hung_up, "bytes, no hang-up");
        drop(client);
        let hung_up = hung_up_within(&mut watch, quarter_second).await;
        assert!(!hung_up, "the body's bytes are still in front of the close");
        // Hyper reads the body (`ClientIo` counts the read): the close is next.
        let mut body = [0u8; 4];
        shared.read_exact(&mut body).await.unwrap();
        state.count_read();
        assert!(hung_up_soon(&mut watch).await, "watched on after the body");
    }

    #[tokio::test]
    async fn the_stream_is_unshared_only_once_no_watch_is_left() {
        let (shared, _client) = pair().await;
        let watcher = shared.watcher();
        let watch = watcher.watch(None);
        let shared = shared.into_inner().expect_err("watched");
        drop((watcher, watch));
        assert!(shared.into_inner().is_ok());
    }
}
