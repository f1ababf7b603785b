//! Idle keep-alive connections to one worker, ready for the next request.
//!
//! Last in, first out: the connection used most recently is the warmest and the least likely to
//! have been closed by the worker. A connection is checked before it is handed out (closed by
//! the worker, unexpected bytes, idle too long: dropped), so a request rarely meets a dead one.
//!
//! One shard per serving thread (see `crate::serving`): a socket is registered with the event
//! loop of the thread that opened it, and a request on another thread would wait for that loop
//! to pass the wake-up over. Each thread takes from and returns to its own shard only.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::connection::Connection;

/// How many idle connections to keep per worker, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept per worker and serving thread (`limits.max_idle_per_worker`).
    pub max_idle: usize,
    /// Idle time after which a connection is closed (`timeouts.upstream_idle`).
    pub idle_timeout: Duration,
}

thread_local! {
    /// The serving thread's index; 0 on any other thread.
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread use shard `index` of every pool (set once by each serving thread).
pub fn use_shard(index: usize) {
    SHARD.set(index);
}

/// A worker's idle connections.
#[derive(Debug)]
pub struct Pool {
    shards: Box<[Shard]>,
}

/// One thread's idle connections, on cache lines of its own: unpadded, two shards' locks shared
/// a line, and every take and put of one thread evicted it from the other's core.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(Mutex<Vec<Idle>>);

impl Default for Pool {
    fn default() -> Self {
        Pool::new(1)
    }
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    /// When it has been idle for `idle_timeout`: kept as a time, so the checks on every take and
    /// put compare instants instead of subtracting them. `None`: a timeout too long to add to
    /// the clock (never, in practice).
    expires: Option<Instant>,
}

impl Pool {
    /// An empty pool for `threads` serving threads.
    pub fn new(threads: usize) -> Self {
        Pool {
            shards: (0..threads.max(1)).map(|_| Shard::default()).collect(),
        }
    }

    /// A live idle connection, if there is one; dead and expired ones are dropped on the way.
    /// `now`: the caller's reading of the clock.
    pub fn take(&self, now: Instant) -> Option<Connection> {
        let shard = self.shard();
        loop {
            let idle = lock(shard).pop()?;
            if idle.expires.is_none_or(|expires| now < expires) && idle.connection.is_usable() {
                return Some(idle.connection);
            }
        }
    }

    /// Keeps `connection` for the next request, unless the pool is full; it counts as idle
    /// since `now` (the caller's reading of the clock).
    pub fn put(&self, connection: Connection, limits: &PoolLimits, now: Instant) {
        let mut idle = lock(self.shard());
        // The oldest are at the front: drop the expired ones while we hold the lock anyway.
        let expired = idle
            .iter()
            .take_while(|i| i.expires.is_some_and(|expires| now >= expires))
            .count();
        idle.drain(..expired);
        if idle.len() < limits.max_idle {
            idle.push(Idle {
                connection,
                expires: now.checked_add(limits.idle_timeout),
            });
        }
    }

    /// Number of idle connections over all shards (for tests and the admin API).
    pub fn idle(&self) -> usize {
        self.shards.iter().map(|shard| lock(&shard.0).len()).sum()
    }

    /// Closes every idle connection (the worker left or went down).
    pub fn clear(&self) {
        for shard in &self.shards {
            lock(&shard.0).clear();
        }
    }

    fn shard(&self) -> &Mutex<Vec<Idle>> {
        &self.shards[SHARD.get() % self.shards.len()].0
    }
}

fn lock(shard: &Mutex<Vec<Idle>>) -> std::sync::MutexGuard<'_, Vec<Idle>> {
    // A panic while holding this lock cannot leave the Vec inconsistent.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connection(listener: &tokio::net::TcpListener) -> Connection {
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        Connection::open(&authority, Duration::from_secs(1))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_thread_takes_only_the_connections_of_its_own_shard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(2);
        pool.put(connection(&listener).await, &limits, Instant::now()); // this thread: shard 0
        let (_accepted, _) = listener.accept().await.unwrap();
        assert_eq!(pool.idle(), 1);

        let taken_on_shard_1 = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    use_shard(1);
                    pool.take(Instant::now()).is_some()
                })
                .join()
                .unwrap()
        });
        assert!(
            !taken_on_shard_1,
            "shard 1 must not hand out shard 0's socket"
        );
        assert!(pool.take(Instant::now()).is_some());
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_idle_timeout_is_not_handed_out_and_goes_at_the_next_put() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(10),
        };
        let pool = Pool::new(1);
        let start = Instant::now();
        let second = |s| start + Duration::from_secs(s);

        pool.put(connection(&listener).await, &limits, start);
        let _accepted = listener.accept().await.unwrap();
        assert!(
            pool.take(second(9)).is_some(),
            "idle for 9 s of 10: still usable"
        );

        pool.put(connection(&listener).await, &limits, start);
        let _accepted = listener.accept().await.unwrap();
        assert!(
            pool.take(second(10)).is_none(),
            "idle for 10 s of 10: expired"
        );
        assert_eq!(pool.idle(), 0, "the expired one was dropped on the way");

        pool.put(connection(&listener).await, &limits, start);
        let _accepted = listener.accept().await.unwrap();
        pool.put(connection(&listener).await, &limits, second(11));
        let _accepted = listener.accept().await.unwrap();
        assert_eq!(pool.idle(), 1, "a put drops the expired ones before it");
    }

    #[tokio::test]
    async fn an_idle_timeout_too_long_for_the_clock_means_never() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::MAX,
        };
        let pool = Pool::new(1);
        let now = Instant::now();
        pool.put(connection(&listener).await, &limits, now);
        let _accepted = listener.accept().await.unwrap();
        assert!(pool.take(now + Duration::from_secs(3600)).is_some());
    }

    #[tokio::test]
    async fn clear_empties_every_shard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(3);
        for shard in [0, 2] {
            use_shard(shard);
            pool.put(connection(&listener).await, &limits, Instant::now());
        }
        use_shard(0);
        assert_eq!(pool.idle(), 2);
        pool.clear();
        assert_eq!(pool.idle(), 0);
    }
}
