//! The pool of connections to one Redis: `deadpool`'s pool with a manager of our own, whose
//! check of a connection before it is handed out costs nothing.
//!
//! deadpool-redis' manager sends `UNWATCH` and `PING` on every checkout and waits for the
//! answer: a round trip to Redis before every command, half of the round trips of a worker's
//! session request (one script per request) and about a quarter of Redis's CPU per request there
//! (docs/performance.md, section 45). What that check finds out, a connection whose socket
//! closed (Redis restarted, or closed it as idle), is known here without asking: each pooled
//! connection is a [`WireConnection`], whose socket is ours to look at, and a look that finds its
//! end (or an error, or bytes nobody asked for) costs no round trip. A closed connection is
//! dropped at checkout and a new one made, as after a failed `PING`. A connection whose command
//! timed out or failed in its I/O is dropped too: a Redis that vanished without closing its
//! sockets (its machine lost) leaves them open, and a `PING` would have timed out on each of
//! them. What neither tells, a connection idle long enough for a firewall or NAT to forget it,
//! is asked with a `PING` before it is handed out again, as before, once it has not been used
//! for [`IDLE_CHECK`]: under load, connections are reused within milliseconds and never asked.
//! herd sends no `WATCH`, so nothing is left for an `UNWATCH` to clear.

use std::time::Duration;

use deadpool::managed;
use redis::RedisError;

use crate::redis_wire::WireConnection;

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
    response_timeout: Duration,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("addr", self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl Connections {
    /// Connections to `url` whose commands wait at most `response_timeout` for their reply. The
    /// connect timeout is the pool's (`create_timeout`).
    pub fn new(url: &str, response_timeout: Duration) -> Result<Self, RedisError> {
        Ok(Connections {
            client: redis::Client::open(url)?,
            response_timeout,
        })
    }
}

impl managed::Manager for Connections {
    type Type = WireConnection;
    type Error = RedisError;

    // The connect and the idle check's PING are boxed: they are rare, and inline they made
    // every checkout's future (held by every Redis call) 2.7 KB, copied whole on each call.
    async fn create(&self) -> Result<WireConnection, RedisError> {
        Box::pin(WireConnection::connect(
            self.client.get_connection_info(),
            self.response_timeout,
        ))
        .await
    }

    async fn recycle(
        &self,
        connection: &mut WireConnection,
        metrics: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        if connection.is_closed() {
            return Err(managed::RecycleError::message(
                "the connection to Redis closed",
            ));
        }
        if metrics.last_used() >= IDLE_CHECK {
            let () = Box::pin(redis::cmd("PING").query_async(connection)).await?;
        }
        Ok(())
    }
}
