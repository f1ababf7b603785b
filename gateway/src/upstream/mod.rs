//! The gateway's HTTP/1.1 client to workers: per-worker pools of keep-alive connections, driven
//! by the client request's own task.
//!
//! ```text
//! proxy ─▶ connect(worker)
//!            ├ worker.pool.take()  (live idle connection, LIFO)   ─┐
//!            └ or Connection::open (timeouts.connect)             ─┘
//!       ─▶ exchange(worker, connection, request) ─▶ write head (+ body) ─▶ read head
//!          ◀─ (head, WorkerBody)
//!             WorkerBody: whole body already read → connection back in the pool at once;
//!                         otherwise read on as the client takes it, then back in the pool
//! ```
//!
//! A leaf of the gateway: it knows addresses, pools and bytes, nothing of workers' health,
//! selection or metrics, and nothing else in the gateway is imported here. It is where each
//! attempt's failure gets its facts ([`UpstreamError`]: reached or not, whose fault); the proxy
//! decides what to do with them.
//!
//! Why not hyper's pooled client: it runs every connection in its own task and talks to it over
//! channels, so each request paid a pool lock, two cross-task hand-offs and their wake-ups.
//! Here the request's task writes and reads the worker's socket itself; see
//! docs/performance.md for the measurements that led to it.

mod acked;
mod body;
pub mod codec;
mod connection;
mod error;
mod pool;
mod request_body;

use std::sync::Arc;
use std::time::Duration;

pub use body::{Home, WorkerBody, WorkerBodyError};
pub use codec::{RawHead, ResponseHead};
pub use connection::{Connection, Outgoing};
pub use error::{UpstreamError, UpstreamErrorKind};
pub use pool::{Pool, PoolLimits, SWEEP_EVERY, use_shard};
pub use request_body::{BodyError, ClientReadError, StreamWatch, UpstreamBody, client_went_away};

use http::uri::Authority;

/// How the gateway talks to workers.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// Connect timeout (`timeouts.connect`).
    pub connect_timeout: Duration,
    /// How long the worker gets to take request bytes, and then to send its response head
    /// (`timeouts.response_header`).
    pub response_header: Duration,
    /// Pool limits.
    pub pool: PoolLimits,
}

/// What follows a response head.
#[derive(Debug)]
pub enum Reply {
    /// The body, read from the connection as the client takes it.
    Body(WorkerBody),
    /// The worker switched protocols (101, to a request that asked for it): the connection now
    /// speaks the new protocol, and is never pooled again.
    Switched(Connection),
}

/// A connection to the worker at `authority`: a live idle one from its `pool`, or a new one
/// (within `timeouts.connect`). A failure here means the worker never saw the request.
pub async fn connect(
    pool: &Pool,
    authority: &Authority,
    settings: &ClientSettings,
    now: tokio::time::Instant,
) -> Result<Connection, UpstreamError> {
    match pool.take(now) {
        Some(connection) => Ok(connection),
        None => open(authority, settings).await,
    }
}

/// A new connection to the worker at `authority` (within `timeouts.connect`), for a caller
/// that looked in the pool itself.
pub async fn open(
    authority: &Authority,
    settings: &ClientSettings,
) -> Result<Connection, UpstreamError> {
    Connection::open(authority, settings.connect_timeout).await
}

/// When an attempt started and when its request must be over.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the request went to the worker (the caller's reading of the clock: one read serves
    /// the pick, the pool and this).
    pub sent: tokio::time::Instant,
    /// The request's deadline.
    pub deadline: tokio::time::Instant,
}

/// Sends `request` over `connection` to the worker at `authority`; returns the response head
/// and what follows it (the body hands the connection back to `pool` when it is done). The
/// worker's side is bounded here (`response_header` for each write and for the head, never past
/// `deadline`); waits for a streamed client body are the caller's to bound.
#[allow(clippy::manual_async_fn)] // see the comment in the body
pub fn exchange(
    mut connection: Connection,
    authority: &Authority,
    pool: &Arc<Pool>,
    request: &mut Outgoing<'_>,
    settings: &ClientSettings,
    timing: Timing,
) -> impl Future<Output = Result<(ResponseHead, Reply, tokio::time::Instant), UpstreamError>> {
    // Not an `async fn`: its arguments would be copied into locals at the first poll and
    // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
    async move {
        let head = connection
            .send(request, authority, settings.response_header, timing)
            .await?;
        let answered = tokio::time::Instant::now();
        if head.status == http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok((head, Reply::Switched(connection), answered));
        }
        let body = WorkerBody::new(
            head.framing,
            head.keep_alive,
            connection,
            Home {
                pool: pool.clone(),
                limits: settings.pool,
                answered,
            },
        );
        Ok((head, Reply::Body(body), answered))
    }
}
