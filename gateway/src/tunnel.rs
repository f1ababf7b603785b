//! Switched protocols (WebSocket, or any HTTP/1.1 `Upgrade`): once the worker has answered 101,
//! the gateway copies bytes both ways between the client's connection and the worker's socket
//! until either side closes, or neither sends a byte for `timeouts.tunnel_idle`.
//!
//! ```text
//! client ── GET, Connection: upgrade, Upgrade: websocket ──▶ proxy ──▶ worker (same headers)
//! client ◀────────── 101, Upgrade: websocket ─────────────── proxy ◀── worker
//! client ◀═════════ bytes, both ways, until one side closes ═════════▶ worker socket
//!                   (or tunnel_idle without a byte: both closed)
//! ```
//!
//! The worker's socket leaves the pool for good. Bytes the worker sent right behind its 101 (read
//! with the head) go to the client first. A tunnel counts as in flight on its worker for its
//! whole life, as a request does (it holds the worker's [`InFlight`]): selection sees the load,
//! `limits.max_in_flight_per_worker` counts it, and a drained worker shows it in `in_flight`
//! until it closes. A stopping gateway waits for its tunnels as for its requests, up to
//! `timeouts.shutdown_grace` (see [`track_on_this_thread`]), then closes the ones still open.
//! A client that stops reading is cut by `timeouts.client_send` (`crate::client_io`).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::balancer::InFlight;
use crate::upstream::Connection;

/// Where this thread's tunnels run: the tracker a stopping serving thread waits on, and the idle
/// timeout.
struct Tunnels {
    tracker: TaskTracker,
    idle: Duration,
}

thread_local! {
    static TUNNELS: RefCell<Option<Tunnels>> = const { RefCell::new(None) };
}

/// Tunnels started on the calling thread from now on close after `idle` without traffic and
/// are tracked by the returned tracker (a serving thread waits on it when it stops). On a
/// thread that never called this, tunnels run untracked with the default idle timeout.
pub fn track_on_this_thread(idle: Duration) -> TaskTracker {
    let tracker = TaskTracker::new();
    TUNNELS.with(|tunnels| {
        *tunnels.borrow_mut() = Some(Tunnels {
            tracker: tracker.clone(),
            idle,
        });
    });
    tracker
}

/// The worker's side of a switched connection.
#[derive(Debug)]
pub struct WorkerTunnel {
    stream: TcpStream,
    /// Bytes of the new protocol read together with the 101.
    early: BytesMut,
    /// The worker's in-flight count, held until the tunnel closes.
    in_flight: InFlight,
}

impl WorkerTunnel {
    /// The worker's connection after its 101, with the in-flight count of the request that
    /// switched.
    pub fn new(connection: Connection, in_flight: InFlight) -> Self {
        let (stream, early) = connection.into_parts();
        WorkerTunnel {
            stream,
            early,
            in_flight,
        }
    }

    /// Waits for hyper to hand over the client's connection (after it wrote the 101), then
    /// copies both ways until either side closes or the tunnel is idle; runs on its own task.
    pub fn spawn(self, client: OnUpgrade, request_id: String) {
        let (tracker, idle) = TUNNELS.with(|tunnels| match &*tunnels.borrow() {
            Some(tunnels) => (Some(tunnels.tracker.clone()), tunnels.idle),
            None => (None, crate::config::TimeoutsConfig::default().tunnel_idle),
        });
        let run = self.run(client, request_id, idle);
        match tracker {
            Some(tracker) => drop(tracker.spawn(run)),
            None => drop(tokio::spawn(run)),
        }
    }

    async fn run(self, client: OnUpgrade, request_id: String, idle: Duration) {
        let WorkerTunnel {
            stream,
            early,
            in_flight: _in_flight,
        } = self;
        let client = match client.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => {
                debug!(request_id, error = %error, "client left before the protocol switch");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        let mut client = Active::new(client, &activity);
        let mut worker = Active::new(stream, &activity);
        if !early.is_empty() && client.write_all(&early).await.is_err() {
            return;
        }
        let copy = tokio::io::copy_bidirectional(&mut client, &mut worker);
        tokio::pin!(copy);
        loop {
            let quiet_until = activity.last() + idle;
            tokio::select! {
                copied = &mut copy => {
                    match copied {
                        Ok((to_worker, to_client)) => {
                            debug!(request_id, to_worker, to_client, "tunnel closed");
                        }
                        Err(error) => debug!(request_id, error = %error, "tunnel broke"),
                    }
                    break;
                }
                () = tokio::time::sleep_until(quiet_until) => {
                    if activity.last() + idle <= Instant::now() {
                        debug!(request_id, idle = ?idle, "tunnel idle; closed on both sides");
                        break;
                    }
                }
            }
        }
        // Locals drop in reverse order: both sockets close here, then the in-flight count goes.
    }
}

/// When a tunnel last moved a byte, as nanoseconds since it started.
struct Activity {
    start: Instant,
    last_ns: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_nanos() as u64;
        self.last_ns.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
    }
}

/// One end of a tunnel, noting every byte read from it (every byte copied is read first).
struct Active<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Active<T> {
    fn new(inner: T, activity: &Arc<Activity>) -> Self {
        Active {
            inner,
            activity: activity.clone(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
