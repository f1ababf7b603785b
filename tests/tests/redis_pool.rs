//! The pool of connections to one Redis (`herd_shared::redis_pool`) against a real redis-server:
//! a checkout costs no round trip, but for a connection idle past the check; a connection that
//! died is not handed out again, whether its socket closed (Redis restarted), it went silent (a
//! command timed out) or its caller gave up half-way; and what the connection of our own
//! (`herd_shared::redis_wire`) reads, long replies and errors in pipelines, is what redis-rs's
//! would.

use std::time::Duration;

use deadpool::managed::{PoolError, TimeoutType};
use herd_shared::redis::{ConnectError, RedisConfig, RedisPool};
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
    // deadpool-redis' manager sent UNWATCH and PING before every checkout but the first. The
    // one PING is the connection's, once when it was made.
    assert_eq!(calls(&redis, "ping").await, pings + 1);
    assert_eq!(calls(&redis, "unwatch").await, unwatches);
}

/// The worker's checkout (`get_in_bounded_call`: its calls bound themselves) waits for a busy
/// pool past the pool's wait timeout, until a connection is given back or the caller's own bound
/// ends the wait; the pool's `get` gives up at that timeout. Still bounded without the caller's
/// timer: a connection idle past the check whose Redis went silent is asked within the response
/// timeout, and so is the new one made after it (a stopped Redis still accepts connections).
#[tokio::test]
async fn a_checkout_in_a_bounded_call_waits_as_long_as_its_caller_does() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    let first = pool.get().await.unwrap();
    let second = pool.get().await.unwrap();
    let waited = std::time::Instant::now();
    let refused = pool.get().await.map(|_| ());
    assert!(
        matches!(
            refused,
            Err(ConnectError::Pool(PoolError::Timeout(TimeoutType::Wait)))
        ),
        "{refused:?}"
    );
    assert!(
        waited.elapsed() < Duration::from_secs(2),
        "the wait timeout"
    );
    let caller_bound =
        tokio::time::timeout(Duration::from_millis(400), pool.get_in_bounded_call()).await;
    assert!(caller_bound.is_err(), "ended by the caller's bound only");

    let given_back = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(first);
    });
    let waited = std::time::Instant::now();
    let mut connection = pool
        .get_in_bounded_call()
        .await
        .expect("the connection given back, after the pool's wait timeout");
    assert!(waited.elapsed() >= Duration::from_millis(400));
    let () = redis::cmd("SET")
        .arg("k")
        .arg(1)
        .query_async(&mut connection)
        .await
        .unwrap();
    given_back.await.unwrap();
    drop((connection, second));

    // Idle past the check, then Redis silent: the check's PING times out, the new connection
    // times out, and the checkout fails without a timer of the caller's.
    tokio::time::sleep(IDLE_CHECK + Duration::from_millis(100)).await;
    let pid = Pid::from_raw(redis.pid().expect("redis runs") as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let waited = std::time::Instant::now();
    let silent = pool.get_in_bounded_call().await.map(|_| ());
    let took = waited.elapsed();
    kill(pid, Signal::SIGCONT).unwrap();
    assert!(silent.is_err(), "{silent:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
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

// On the runtime's worker threads, as in the worker and the gateway: the pool's look at the
// socket before handing the connection out finds the end Redis's death left on it.
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

#[tokio::test]
async fn a_call_its_caller_gave_up_on_leaves_no_connection_out_of_step() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    let first = client_id(&pool).await.unwrap();
    // The caller stops waiting (its future dropped) before Redis answers: the reply to the
    // abandoned command is still on its way on that connection.
    let mut connection = pool.get().await.expect("a pooled connection");
    let gave_up = tokio::time::timeout(
        Duration::from_millis(30),
        redis::cmd("BLPOP")
            .arg("nothing")
            .arg(0.1)
            .query_async::<()>(&mut connection),
    )
    .await;
    assert!(gave_up.is_err(), "BLPOP answered within 30 ms: {gave_up:?}");
    drop(connection);
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Handed out again, the old connection would read the BLPOP's nil for this call.
    let next = client_id(&pool)
        .await
        .expect("the next call is answered by its own reply");
    assert_ne!(
        next, first,
        "the connection left out of step was handed out again"
    );
}

#[tokio::test]
async fn a_url_with_a_user_password_and_database_is_followed() {
    let redis = TestRedis::start();
    let mut admin = redis.connection().await;
    let () = redis::cmd("ACL")
        .arg(&["SETUSER", "alice", "on", ">s3cret", "~*", "+@all"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://alice:s3cret@127.0.0.1:{}/3", redis.port());
    let pool = RedisConfig {
        url,
        ..RedisConfig::default()
    }
    .pool()
    .unwrap();
    let mut connection = pool.get().await.expect("authenticated");
    let () = redis::cmd("SET")
        .arg("k")
        .arg("in three")
        .query_async(&mut connection)
        .await
        .unwrap();
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(
        info.contains(" db=3 ") && info.contains(" user=alice "),
        "{info}"
    );
    let () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut admin)
        .await
        .unwrap();
    let stored: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(stored, "in three");

    let wrong = RedisConfig {
        url: format!("redis://alice:wrong@127.0.0.1:{}/3", redis.port()),
        ..RedisConfig::default()
    }
    .pool()
    .unwrap();
    let error = wrong
        .get()
        .await
        .err()
        .expect("a wrong password is refused");
    assert!(error.to_string().contains("WRONGPASS"), "{error}");
}

#[tokio::test]
async fn long_replies_and_errors_inside_pipelines_leave_the_connection_in_step() {
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    let mut connection = pool.get().await.expect("a pooled connection");
    // Over a megabyte: many reads for one bulk string.
    let long: Vec<u8> = (0..1_200_000u32).map(|n| (n % 251) as u8).collect();
    let () = redis::cmd("SET")
        .arg("long")
        .arg(&long)
        .query_async(&mut connection)
        .await
        .unwrap();
    let read: Vec<u8> = redis::cmd("GET")
        .arg("long")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(read == long, "the long value came back changed");
    // An array of many short values, over many reads.
    let items: Vec<String> = (0..20_000).map(|n| format!("item-{n}")).collect();
    let pushed: usize = redis::cmd("RPUSH")
        .arg("list")
        .arg(&items)
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(pushed, items.len());
    let listed: Vec<String> = redis::cmd("LRANGE")
        .arg(&["list", "0", "-1"])
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(listed == items, "the list came back changed");
    // A server error in the middle of a pipeline is the pipeline's error ...
    let () = redis::cmd("HSET")
        .arg(&["h", "f", "v"])
        .query_async(&mut connection)
        .await
        .unwrap();
    let failed: redis::RedisResult<(i64, i64, i64)> = redis::pipe()
        .cmd("INCR")
        .arg("n")
        .cmd("INCR")
        .arg("h")
        .cmd("INCR")
        .arg("n")
        .query_async(&mut connection)
        .await;
    let error = failed.expect_err("INCR of a hash fails");
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
    // ... and so is a command a transaction refused to queue; neither puts the connection
    // out of step.
    let refused: redis::RedisResult<(i64,)> = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("n")
        .cmd("INCR")
        .query_async(&mut connection)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let n: i64 = redis::cmd("GET")
        .arg("n")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(
        n, 2,
        "the pipeline's other commands ran, the transaction's did not"
    );
    drop(connection);
    let (a, b): (i64, i64) = redis::pipe()
        .cmd("INCR")
        .arg("n")
        .cmd("INCR")
        .arg("n")
        .query_async(&mut pool.get().await.unwrap())
        .await
        .unwrap();
    assert_eq!((a, b), (3, 4));
}

/// Commands packed without redis-rs (`resp::pack_command`), for one round trip.
fn packed(commands: &[&[&str]]) -> Vec<u8> {
    let mut out = Vec::new();
    for arguments in commands {
        let arguments: Vec<&[u8]> = arguments.iter().map(|a| a.as_bytes()).collect();
        herd_shared::resp::pack_command(&mut out, &arguments);
    }
    out
}

/// Packed commands' replies are read in place by the caller's reader (`resp::Cursor`, as the
/// session load reads its own), a long one over several reads too; a server error among them
/// is the call's, and replies the reader does not expect are no answer: either way the
/// connection stays in step with Redis.
#[tokio::test]
async fn packed_commands_get_their_replies_and_a_server_error_is_the_calls() {
    use herd_shared::resp::Cursor;
    let redis = TestRedis::start();
    let pool = pool_for(&redis);
    let mut connection = pool.get().await.expect("a pooled connection");
    /// `GET n`'s answer, as text.
    fn number(replies: &mut Cursor<'_>) -> Option<String> {
        Some(String::from_utf8(replies.bulk()??.to_vec()).unwrap())
    }
    let answer = connection
        .exchange_packed(
            &packed(&[&["HSET", "h", "f", "v"], &["HMGET", "h", "f", "absent"]]),
            2,
            |replies| {
                Some((
                    replies.integer()?,
                    replies.array()??,
                    replies.bulk()??.to_vec(),
                    replies.bulk()?.is_none(),
                ))
            },
        )
        .await
        .unwrap();
    assert_eq!(
        answer,
        Some((1, 2, b"v".to_vec(), true)),
        "the absent field nil"
    );
    // A command Redis refuses fails the exchange, as it fails a pipeline; the others ran and
    // the connection is still in step.
    let refused = connection
        .exchange_packed(
            &packed(&[&["INCR", "n"], &["INCR", "h"], &["INCR", "n"]]),
            3,
            |replies| Some((replies.integer()?, replies.integer()?, replies.integer()?)),
        )
        .await
        .expect_err("INCR of a hash fails");
    assert!(refused.to_string().contains("WRONGTYPE"), "{refused}");
    let get_n = packed(&[&["GET", "n"]]);
    let after = connection.exchange_packed(&get_n, 1, number).await;
    assert_eq!(after.unwrap().as_deref(), Some("2"));
    // Replies that are not what the reader expects are no answer; nor is a reader that read
    // fewer replies than were asked for. The connection is in step after both.
    let unexpected = connection
        .exchange_packed(&packed(&[&["GET", "n"], &["GET", "n"]]), 2, |replies| {
            replies.integer()
        })
        .await;
    assert_eq!(unexpected.unwrap(), None);
    let short = connection
        .exchange_packed(&packed(&[&["GET", "n"], &["GET", "n"]]), 2, number)
        .await;
    assert_eq!(short.unwrap(), None, "one of two replies read");
    let after = connection.exchange_packed(&get_n, 1, number).await;
    assert_eq!(after.unwrap().as_deref(), Some("2"), "in step");
    // A reply far longer than one read (4 KiB), beside a short one, whole and in step.
    let long = "x".repeat(200_000);
    let answer = connection
        .exchange_packed(
            &packed(&[&["SET", "long", &long], &["GET", "long"], &["GET", "n"]]),
            3,
            |replies| {
                // SET's `+OK` is not one the cursor reads: the long way, then.
                let _ = replies;
                None::<()>
            },
        )
        .await;
    assert_eq!(answer.unwrap(), None);
    let answer = connection
        .exchange_packed(&packed(&[&["GET", "long"], &["GET", "n"]]), 2, |replies| {
            Some((replies.bulk()??.len(), number(replies)?))
        })
        .await;
    assert_eq!(answer.unwrap(), Some((long.len(), "2".to_string())));
    let after = connection.exchange_packed(&get_n, 1, number).await;
    assert_eq!(
        after.unwrap().as_deref(),
        Some("2"),
        "in step after the long reply"
    );
}

#[tokio::test]
async fn a_connection_redis_refuses_fails_when_made_not_at_its_first_command() {
    let redis = TestRedis::start();
    let mut admin = redis.connection().await;
    let set_max_clients = |n: u32| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(n)
            .clone()
    };
    let () = set_max_clients(1).query_async(&mut admin).await.unwrap();
    // No password and database 0: nothing to set up, but the connection still asks once.
    let pool = pool_for(&redis);
    let refused = pool
        .get()
        .await
        .err()
        .expect("Redis is full: no connection");
    assert!(
        refused.to_string().contains("max number of clients"),
        "{refused}"
    );
    let () = set_max_clients(10_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    client_id(&pool)
        .await
        .expect("a connection once Redis has room");
}
