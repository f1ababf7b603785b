//! The pool of connections to one Redis: `deadpool`'s pool with a manager of our own, whose
//! check of a connection before it is handed out costs nothing.
//!
//! deadpool-redis' manager sends `UNWATCH` and `PING` on every checkout and waits for the
//! answer: a round trip to Redis before every command, half of the round trips of a worker's
//! session request (one script per request) and about a quarter of Redis's CPU per request there
//! (docs/performance.md, section 45). What that check finds out, a connection whose socket
//! closed (Redis restarted, or closed it as idle), is known here without asking: each pooled
//! connection's I/O task is ours, and it marks the connection closed when it ends, which it does
//! as soon as the socket reads its end or fails. A closed connection is dropped at checkout and a
//! new one made, as after a failed `PING`. A connection whose command timed out or failed in its
//! I/O is marked closed too: a Redis that vanished without closing its sockets (its machine
//! lost) leaves them open, and a `PING` would have timed out on each of them. What neither tells,
//! a connection idle long enough for a firewall or NAT to forget it, is asked with a `PING`
//! before it is handed out again, as before, once it has not been used for [`IDLE_CHECK`]: under
//! load, connections are reused within milliseconds and never asked. herd sends no `WATCH`, so
//! nothing is left for an `UNWATCH` to clear.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool::managed;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ConnectionAddr, RedisError};
use tokio::io::{AsyncRead, AsyncWrite};

/// A connection not handed out for this long is asked with a `PING` before it is again.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A pool of connections to one Redis.
pub type Pool = managed::Pool<Connections>;

/// A connection from a [`Pool`]; back to the pool when dropped.
pub type Connection = managed::Object<Connections>;

/// How many connections a [`Pool`] has and how many callers wait for one.
pub type Status = managed::Status;

/// Makes the connections of a [`Pool`] to the Redis of a client's URL.
pub struct Connections {
    client: redis::Client,
    config: AsyncConnectionConfig,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("addr", self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Connections to `url`, each with `config`'s response timeout. The connect timeout is the
    /// pool's (`create_timeout`).
    pub fn new(url: &str, config: AsyncConnectionConfig) -> Result<Self, RedisError> {
        Ok(Connections {
            client: redis::Client::open(url)?,
            config,
        })
    }
}

/// A pooled connection: the multiplexed connection, and whether its socket has closed.
pub struct Pooled {
    connection: MultiplexedConnection,
    closed: Arc<AtomicBool>,
}

impl Pooled {
    /// Whether the connection's socket closed (its I/O task ended).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The socket of a connection, TCP or a Unix socket.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Socket for S {}

impl managed::Manager for Connections {
    type Type = Pooled;
    type Error = RedisError;

    async fn create(&self) -> Result<Pooled, RedisError> {
        let info = self.client.get_connection_info();
        let socket: Box<dyn Socket> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            #[cfg(unix)]
            ConnectionAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            other => {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "not a TCP or Unix socket address",
                    format!("{other:?}"),
                )));
            }
        };
        let (connection, io) = MultiplexedConnection::new_with_config(
            info.redis_settings(),
            socket,
            self.config.clone(),
        )
        .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let mark = MarkClosed(closed.clone());
        // Ends when the socket reads its end or fails, or when the connection is dropped; the
        // mark is made when the task ends either way, also when its runtime drops it.
        tokio::spawn(async move {
            let _mark = mark;
            io.await;
        });
        Ok(Pooled { connection, closed })
    }

    async fn recycle(
        &self,
        pooled: &mut Pooled,
        metrics: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        if pooled.is_closed() {
            return Err(managed::RecycleError::message(
                "the connection to Redis closed",
            ));
        }
        if metrics.last_used() >= IDLE_CHECK {
            let () = redis::cmd("PING").query_async(pooled).await?;
        }
        Ok(())
    }
}

/// Marks a connection closed when dropped: held by the task that drives its socket.
struct MarkClosed(Arc<AtomicBool>);

impl Drop for MarkClosed {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// `reply`, marking the connection `closed` when it fails in its I/O or times out: the
/// connection may be dead without its socket having closed.
fn watched<'a, T: Send + 'a>(
    closed: &'a AtomicBool,
    reply: redis::RedisFuture<'a, T>,
) -> redis::RedisFuture<'a, T> {
    Box::pin(async move {
        let result = reply.await;
        if let Err(error) = &result
            && (error.is_io_error() || error.is_timeout() || error.is_connection_dropped())
        {
            closed.store(true, Ordering::Release);
        }
        result
    })
}

impl ConnectionLike for Pooled {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let Pooled { connection, closed } = self;
        watched(closed, connection.req_packed_command(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        let Pooled { connection, closed } = self;
        watched(closed, connection.req_packed_commands(cmd, offset, count))
    }

    fn get_db(&self) -> i64 {
        self.connection.get_db()
    }
}
