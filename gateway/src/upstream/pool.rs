//! Idle keep-alive connections to one worker, ready for the next request.
//!
//! Last in, first out: the connection used most recently is the warmest and the least likely to
//! have been closed by the worker. A connection is checked before it is handed out (closed by
//! the worker, unexpected bytes, idle too long: dropped), so a request rarely meets a dead one.
//!
//! One shard per serving thread (see `crate::serving`): a socket is registered with the event
//! loop of the thread that opened it, and a request on another thread would wait for that loop
//! to pass the wake-up over. Each thread takes from and returns to its own shard only.
//!
//! `max_idle` connections are kept through quiet times (until `idle_timeout`); more are kept
//! while the load uses them, and those beyond `max_idle` go once idle for [`SURPLUS_IDLE`].
//! Closing every connection beyond a fixed count when it came back made a load with more
//! requests in flight than that count (HTTP/2 clients: 8 streams each) open and close a worker
//! connection for most requests once the requests ran in step: twice the CPU per request, half
//! the throughput, and a TIME-WAIT socket per request (docs/performance.md, section 34).

use std::cell::Cell;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::codec::IDLE_MARGIN;
use super::connection::Connection;

/// How many idle connections to keep per worker, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept per worker and serving thread through quiet times
    /// (`limits.max_idle_per_worker`); 0: none at all, every connection closed after its request.
    pub max_idle: usize,
    /// Idle time after which a connection is closed (`timeouts.upstream_idle`).
    pub idle_timeout: Duration,
}

/// How long an idle connection beyond `max_idle` is kept: the load that needed it is over. As
/// HAProxy's `pool-purge-delay` (5 s by default), long enough to span the gaps of a bursty load.
const SURPLUS_IDLE: Duration = Duration::from_secs(5);

/// How often each serving thread sweeps its shard of every worker's pool ([`Pool::sweep`]).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

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
    /// When it came back (the answer's arrival, for a body that came with its head).
    since: Instant,
    /// When it has been idle for `idle_timeout`: kept as a time, so the check on every take
    /// compares instants instead of subtracting them. `None`: a timeout too long to add to the
    /// clock (never, in practice).
    expires: Option<Instant>,
}

impl Idle {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|expires| now >= expires)
    }
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
            if !idle.expired(now) && idle.connection.is_usable() {
                return Some(idle.connection);
            }
        }
    }

    /// Keeps `connection` for the next request, idle since `now` (the caller's reading of the
    /// clock). On the way, while it holds the lock anyway, it drops what [`trim`] drops.
    pub fn put(&self, connection: Connection, limits: &PoolLimits, now: Instant) {
        self.put_answered(connection, limits, now, now);
    }

    /// [`Pool::put`] of a connection whose last answer's head arrived at `answered`: a worker
    /// that said it closes idle connections (`Connection::worker_idle`) counts from then, not
    /// from the end of the body. A body read only as fast as a slow client takes it may have left
    /// the worker, which started its timer, long before the gateway read its end.
    pub fn put_answered(
        &self,
        connection: Connection,
        limits: &PoolLimits,
        now: Instant,
        answered: Instant,
    ) {
        if limits.max_idle == 0 {
            return;
        }
        let mut idle = lock(self.shard());
        // Looked at first: nearly always nothing to drop, and no call made.
        if idle.len() > limits.max_idle || idle.first().is_some_and(|i| i.expired(now)) {
            trim(&mut idle, limits, now);
        }
        // Not offered once the worker may have closed it as idle, as its last answer said: a
        // request sent as it closes is lost (a POST is not sent again).
        let ours = now.checked_add(limits.idle_timeout);
        let worker = (connection.worker_idle)
            .and_then(|worker| answered.checked_add(worker.saturating_sub(IDLE_MARGIN)));
        idle.push(Idle {
            connection,
            since: now,
            expires: [ours, worker].into_iter().flatten().min(),
        });
    }

    /// Drops what [`trim`] drops from the calling thread's shard: for a pool no request puts
    /// into (the load stopped), run every [`SWEEP_EVERY`] by each serving thread.
    pub fn sweep(&self, limits: &PoolLimits, now: Instant) {
        let mut idle = lock(self.shard());
        // Also those expired behind one that is not (a worker that said it closes sooner).
        idle.retain(|i| !i.expired(now));
        trim(&mut idle, limits, now);
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

/// Drops the expired connections at the front (the oldest; one whose worker said it closes
/// sooner may expire behind one that has not: [`Pool::take`] skips it, [`Pool::sweep`] drops it),
/// and those beyond `max_idle` idle for [`SURPLUS_IDLE`]: the oldest, at the front. Called on
/// every put while the pool holds more than `max_idle`: no scan of the whole pool here.
fn trim(idle: &mut Vec<Idle>, limits: &PoolLimits, now: Instant) {
    let expired = idle.iter().take_while(|i| i.expired(now)).count();
    let beyond_floor = (idle.len() - expired).saturating_sub(limits.max_idle);
    let unused = if beyond_floor == 0 {
        0
    } else {
        idle[expired..expired + beyond_floor]
            .iter()
            .take_while(|i| now.saturating_duration_since(i.since) >= SURPLUS_IDLE)
            .count()
    };
    idle.drain(..expired + unused);
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
    async fn a_connection_whose_worker_closes_it_sooner_goes_a_margin_before_that() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 4,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(1);
        let start = Instant::now();
        let millis = |ms| start + Duration::from_millis(ms);
        async fn said(
            listener: &tokio::net::TcpListener,
            seconds: u64,
        ) -> (Connection, (tokio::net::TcpStream, std::net::SocketAddr)) {
            let mut connection = connection(listener).await;
            connection.worker_idle = Some(Duration::from_secs(seconds));
            (connection, listener.accept().await.unwrap())
        }

        // `Keep-Alive: timeout=5`: offered for 4 s.
        let (five, _accepted) = said(&listener, 5).await;
        pool.put(five, &limits, start);
        assert!(pool.take(millis(3_900)).is_some(), "3.9 s of 4");
        let (five, _accepted) = said(&listener, 5).await;
        pool.put(five, &limits, start);
        assert!(
            pool.take(millis(4_000)).is_none(),
            "4 s of 4: the worker may close it"
        );

        // A body streamed for 3.5 s after its head: the worker's 4 s count from the head.
        let (five, _accepted) = said(&listener, 5).await;
        pool.put_answered(five, &limits, millis(3_500), start);
        assert!(pool.take(millis(3_900)).is_some(), "3.9 s after the head");
        let (five, _accepted) = said(&listener, 5).await;
        pool.put_answered(five, &limits, millis(3_500), start);
        assert!(pool.take(millis(4_000)).is_none(), "4 s after the head");

        // One that expires first behind one that does not goes at the next sweep all the same.
        let (plain, _a) = (
            connection(&listener).await,
            listener.accept().await.unwrap(),
        );
        pool.put(plain, &limits, start);
        let (two, _b) = said(&listener, 2).await;
        pool.put(two, &limits, start);
        pool.sweep(&limits, millis(1_500));
        assert_eq!(pool.idle(), 1, "the one said to close at 2 s went at 1 s");
    }

    #[tokio::test]
    async fn connections_beyond_max_idle_stay_while_the_load_uses_them_and_go_once_unused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 2,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(1);
        let start = Instant::now();
        let second = |s| start + Duration::from_secs(s);
        let mut accepted = Vec::new();
        macro_rules! put {
            ($at:expr) => {
                pool.put(connection(&listener).await, &limits, $at);
                accepted.push(listener.accept().await.unwrap());
            };
        }

        // A burst of six answers: all six are kept for the next burst, not four closed.
        for _ in 0..6 {
            put!(start);
        }
        assert_eq!(pool.idle(), 6);
        put!(second(4));
        assert_eq!(pool.idle(), 7, "idle for 4 s: still wanted");
        // Five seconds on, the burst's surplus goes, oldest first: of the seven, the five beyond
        // max_idle had been idle for 5 s; two stay, and the one coming back.
        put!(second(5));
        assert_eq!(pool.idle(), 3);
        // Beyond max_idle again (three): the oldest, back at 0 s, goes.
        put!(second(30));
        assert_eq!(pool.idle(), 3);
        // The two kept through the quiet time (back at 4 s and 5 s) expire after the idle
        // timeout (60 s): the one back at 30 s and the new one remain.
        put!(second(89));
        assert_eq!(pool.idle(), 2);
    }

    /// The local address of `connection` (its worker's side sees it as the peer).
    fn local(connection: Connection) -> std::net::SocketAddr {
        connection.into_parts().0.local_addr().unwrap()
    }

    #[tokio::test]
    async fn the_surplus_goes_oldest_first_at_a_put_or_a_sweep_and_the_floor_at_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 1,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(1);
        let start = Instant::now();
        let second = |s| start + Duration::from_secs(s);
        // Each one's address as its worker's side saw it, in the order they came back.
        let mut accepted = Vec::new();
        for at in [0, 0, 0, 5] {
            pool.put(connection(&listener).await, &limits, second(at));
            accepted.push(listener.accept().await.unwrap());
        }
        // At 5 s the two oldest beyond the floor went; the third, and the one back at 5 s, stay.
        assert_eq!(pool.idle(), 2);
        assert_eq!(local(pool.take(second(5)).unwrap()), accepted[3].1);
        assert_eq!(local(pool.take(second(5)).unwrap()), accepted[2].1);

        // No put at all (the load stopped): the sweep does the same.
        for at in [10, 11, 12] {
            pool.put(connection(&listener).await, &limits, second(at));
            accepted.push(listener.accept().await.unwrap());
        }
        pool.sweep(&limits, second(14));
        assert_eq!(pool.idle(), 3, "idle for 4 s at most: all still wanted");
        pool.sweep(&limits, second(15));
        assert_eq!(pool.idle(), 2, "the first back at 10 s went");
        pool.sweep(&limits, second(16));
        assert_eq!(
            pool.idle(),
            1,
            "the one back at 11 s too; the floor of one stays"
        );
        pool.sweep(&limits, second(71));
        assert_eq!(pool.idle(), 1, "the floor is kept until the idle timeout");
        pool.sweep(&limits, second(72));
        assert_eq!(pool.idle(), 0, "expired 60 s after it came back");
    }

    #[tokio::test]
    async fn max_idle_zero_keeps_no_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = PoolLimits {
            max_idle: 0,
            idle_timeout: Duration::from_secs(60),
        };
        let pool = Pool::new(1);
        pool.put(connection(&listener).await, &limits, Instant::now());
        let _accepted = listener.accept().await.unwrap();
        assert_eq!(pool.idle(), 0);
        assert!(pool.take(Instant::now()).is_none());
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
