//! Idle keep-alive connections to one worker, ready for the next request.
//!
//! Last in, first out: the connection used most recently is the warmest and the least likely to
//! have been closed by the worker. A connection is checked before it is handed out (closed by
//! the worker, unexpected bytes, idle too long: dropped), so a request rarely meets a dead one.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::connection::Connection;

/// How many idle connections to keep per worker, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept per worker (`limits.max_idle_per_worker`).
    pub max_idle: usize,
    /// Idle time after which a connection is closed (`timeouts.upstream_idle`).
    pub idle_timeout: Duration,
}

/// A worker's idle connections.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

impl Pool {
    /// A live idle connection, if there is one; dead and expired ones are dropped on the way.
    pub fn take(&self, limits: &PoolLimits) -> Option<Connection> {
        let now = Instant::now();
        loop {
            let idle = self.lock().pop()?;
            if now.duration_since(idle.since) < limits.idle_timeout && idle.connection.is_usable() {
                return Some(idle.connection);
            }
        }
    }

    /// Keeps `connection` for the next request, unless the pool is full.
    pub fn put(&self, connection: Connection, limits: &PoolLimits) {
        let now = Instant::now();
        let mut idle = self.lock();
        // The oldest are at the front: drop the expired ones while we hold the lock anyway.
        let expired = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= limits.idle_timeout)
            .count();
        idle.drain(..expired);
        if idle.len() < limits.max_idle {
            idle.push(Idle {
                connection,
                since: now,
            });
        }
    }

    /// Number of idle connections (for tests and the admin API).
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    /// Closes every idle connection (the worker left or went down).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // A panic while holding this lock cannot leave the Vec inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
