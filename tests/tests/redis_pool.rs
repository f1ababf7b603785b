//! The pool of connections to one Redis (`herd_shared::redis_pool`) against a real redis-server:
//! a checkout costs no round trip, but for a connection idle past the check; and a connection that
//! died is not handed out again, whether its socket closed (Redis restarted) or it went silent (a
//! command timed out).

use std::time::Duration;

use herd_shared::redis::{RedisConfig, RedisPool};
use herd_shared::redis_pool::IDLE_CHECK;
use herd_tests::redis::TestRedis;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn pool_for(redis: &TestRedis) -> RedisPool {
    let config = RedisConfig {
        url: redis.url(),
        pool_size: 2,
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(200),
        ..RedisConfig::default()
    };
    config.pool().expect("a pool for a valid url")
}

/// `CLIENT ID` of the connection the pool hands out next: which connection it is.
async fn client_id(pool: &RedisPool) -> redis::RedisResult<i64> {
    let mut connection = pool.get().await.expect("a pooled connection");
    redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut connection)
        .await
}

/// Calls of `command` in Redis's `INFO commandstats` (0 when never called).
async fn calls(redis: &TestRedis, command: &str) -> u64 {
    let mut connection = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn a_checkout_costs_no_round_trip() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    // The harness pinged Redis to see it up.
    let (pings, unwatches) = (calls(&redis, "ping").await, calls(&redis, "unwatch").await);
    for n in 0..50 {
        let mut connection = pool.get().await.expect("a pooled connection");
        let () = redis::cmd("SET")
            .arg("k")
            .arg(n)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    assert_eq!(calls(&redis, "set").await, 50);
    // deadpool-redis' manager sent UNWATCH and PING before every checkout but the first.
    assert_eq!(calls(&redis, "ping").await, pings);
    assert_eq!(calls(&redis, "unwatch").await, unwatches);
}

#[tokio::test]
async fn a_connection_idle_past_the_check_is_asked_before_it_is_handed_out() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    client_id(&pool).await.unwrap();
    let pings = calls(&redis, "ping").await;
    client_id(&pool).await.unwrap();
    assert_eq!(
        calls(&redis, "ping").await,
        pings,
        "used a moment ago: not asked"
    );
    tokio::time::sleep(IDLE_CHECK + Duration::from_millis(100)).await;
    client_id(&pool).await.unwrap();
    assert_eq!(
        calls(&redis, "ping").await,
        pings + 1,
        "idle past the check: asked once"
    );
}

// On the runtime's worker threads, as in the worker and the gateway: the connection's I/O task
// reads the end of its socket while the test waits for Redis to start again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_the_first_call_gets_a_new_connection() {
    let mut redis = TestRedis::start();
    let pool = pool_for(&redis);
    let before = client_id(&pool).await.unwrap();
    // Killed and started again at once (no pause for the pool to notice, and the connection
    // was used a moment ago, so it is not asked with a PING either).
    redis.kill();
    redis.start_again();
    let after = client_id(&pool)
        .await
        .expect("the first call after the restart is served, on a new connection");
    assert!(before >= 1 && after >= 1);
}

#[tokio::test]
async fn a_connection_whose_command_timed_out_is_not_handed_out_again() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    let first = client_id(&pool).await.unwrap();
    // Alive but silent (as a Redis whose machine vanished, its sockets left open): the command
    // times out (command_timeout 200 ms).
    let pid = Pid::from_raw(redis.pid().expect("redis runs") as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let timed_out = client_id(&pool).await;
    kill(pid, Signal::SIGCONT).unwrap();
    assert!(timed_out.is_err(), "{timed_out:?}");
    // Redis answers again, and would on the old connection too: the pool made a new one.
    let next = client_id(&pool).await.unwrap();
    assert_ne!(
        next, first,
        "the connection that timed out was handed out again"
    );
}
