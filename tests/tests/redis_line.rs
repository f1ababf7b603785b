//! The connection shared by hot reads (`herd_shared::redis_line`) against a real redis-server:
//! many calls in flight at once each get their own replies over one connection; a call dropped
//! half-way, one Redis refuses and a long reply leave it in step; a call that waits past the
//! response timeout breaks it for all and the next call connects again; a restart and an idle
//! spell are noticed before a call is sent; and the call the socket would have woken can go
//! away without the others being left waiting.

use std::sync::Arc;
use std::time::Duration;

use herd_shared::redis_line::{Line, LineError};
use herd_shared::redis_pool::IDLE_CHECK;
use herd_shared::resp::{self, Cursor};
use herd_tests::redis::TestRedis;

fn line_for(redis: &TestRedis, response_timeout: Duration) -> Line {
    let client = redis::Client::open(redis.url()).unwrap();
    Line::new(
        client.get_connection_info().clone(),
        Duration::from_millis(500),
        response_timeout,
    )
}

fn packed(commands: &[&[&str]]) -> Vec<u8> {
    let mut packed = Vec::new();
    for command in commands {
        let arguments: Vec<&[u8]> = command.iter().map(|a| a.as_bytes()).collect();
        resp::pack_command(&mut packed, &arguments);
    }
    packed
}

/// A bulk string's text (`None` for nil), as a reader.
fn text(replies: &mut Cursor<'_>) -> Option<Option<String>> {
    Some(
        replies
            .bulk()?
            .map(|b| String::from_utf8(b.to_vec()).unwrap()),
    )
}

/// `GET key` on the line.
async fn get(line: &Line, key: &str) -> Result<Option<String>, String> {
    let sent = line
        .send(&packed(&[&["GET", key]]), 1)
        .await
        .map_err(|e| e.to_string())?;
    match sent.read(text).await {
        Ok(Ok(Some(value))) => Ok(value),
        Ok(Ok(None)) => Err("not a bulk string".into()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// `SET key value`, from the harness's own connection.
async fn set(redis: &TestRedis, key: &str, value: &str) {
    let mut connection = redis.connection().await;
    let () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut connection)
        .await
        .unwrap();
}

/// `CLIENT ID` of the line's connection: which connection it is.
async fn client_id(line: &Line) -> i64 {
    let sent = line.send(&packed(&[&["CLIENT", "ID"]]), 1).await.unwrap();
    sent.read(|replies| replies.integer())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// Connections Redis has open (`INFO clients`), the harness's own included.
async fn connected_clients(redis: &TestRedis) -> usize {
    let mut connection = redis.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut connection)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_in_flight_each_get_their_own_replies_over_one_connection() {
    let redis = TestRedis::start();
    // One connection of the harness's (counted in `before`, and open until the end).
    let mut connection = redis.connection().await;
    for n in 0..64 {
        let () = redis::cmd("SET")
            .arg(format!("k{n}"))
            .arg(format!("v{n}"))
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let before = connected_clients(&redis).await;
    let line = Arc::new(line_for(&redis, Duration::from_secs(2)));
    let mut tasks = Vec::new();
    for task in 0..64 {
        let line = line.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..50 {
                let n = (task + round) % 64;
                // Two commands a call, as the session load sends: both replies are this call's.
                let sent = line
                    .send(
                        &packed(&[
                            &["GET", &format!("k{n}")],
                            &["ECHO", &format!("{task}/{round}")],
                        ]),
                        2,
                    )
                    .await
                    .unwrap();
                let answer = sent
                    .read(|replies| Some((text(replies)??, text(replies)??)))
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(answer, Some((format!("v{n}"), format!("{task}/{round}"))));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(
        connected_clients(&redis).await,
        before + 1,
        "3 200 calls from 64 tasks on one connection"
    );
    // Calls that 64 tasks make at once went out several to a write.
    let stats = line.stats();
    assert_eq!((stats.calls, stats.connects, stats.breaks), (3_200, 1, 0));
    assert!(stats.writes < stats.calls, "{stats:?}");
}

#[tokio::test]
async fn a_refused_command_a_short_reader_and_a_long_reply_leave_the_line_in_step() {
    let redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_secs(2));
    let long = "x".repeat(200_000);
    set(&redis, "long", &long).await;
    set(&redis, "n", "7").await;
    let refused = line
        .send(&packed(&[&["GET", "n"], &["HGET", "n", "f"]]), 2)
        .await
        .unwrap()
        .read(|replies| Some((text(replies)?, text(replies)?)))
        .await
        .expect("Redis answered");
    let error = refused.expect_err("HGET of a string is refused");
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
    assert_eq!(get(&line, "n").await.unwrap().as_deref(), Some("7"));
    // A reader that takes one of two replies gets no answer; the other is not left behind.
    let short = line
        .send(&packed(&[&["GET", "n"], &["GET", "n"]]), 2)
        .await
        .unwrap()
        .read(text)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(short, None);
    assert_eq!(get(&line, "n").await.unwrap().as_deref(), Some("7"));
    // 200 KB over many reads, between two short replies of other calls in flight with it.
    let (before, whole, after) = tokio::join!(get(&line, "n"), get(&line, "long"), get(&line, "n"));
    assert_eq!(before.unwrap().as_deref(), Some("7"));
    assert_eq!(whole.unwrap().map(|v| v.len()), Some(long.len()));
    assert_eq!(after.unwrap().as_deref(), Some("7"));
}

#[tokio::test]
async fn the_call_the_socket_would_wake_can_go_away_and_the_next_still_gets_its_reply() {
    let redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_secs(2));
    set(&redis, "k", "v").await;
    // The slow call is first in line: the socket's readiness goes to it. Dropped at 50 ms,
    // it must hand that on, or the call behind it would wait for its reply forever.
    let slow = async {
        let sent = line
            .send(&packed(&[&["BLPOP", "nothing", "0.3"]]), 1)
            .await
            .unwrap();
        tokio::time::timeout(
            Duration::from_millis(50),
            sent.read(|replies| replies.array()),
        )
        .await
    };
    let behind = async {
        tokio::task::yield_now().await;
        tokio::time::timeout(Duration::from_secs(1), get(&line, "k")).await
    };
    let (slow, behind) = tokio::join!(slow, behind);
    assert!(slow.is_err(), "the slow call was given up");
    assert_eq!(
        behind
            .expect("answered within a second")
            .unwrap()
            .as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn a_call_past_the_response_timeout_breaks_the_line_for_all_and_the_next_connects_again() {
    let redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_millis(150));
    let first = client_id(&line).await;
    let stalled = async {
        line.send(&packed(&[&["BLPOP", "nothing", "0.5"]]), 1)
            .await
            .unwrap()
            .read(|replies| replies.array())
            .await
    };
    let behind = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        get(&line, "k").await
    };
    let (stalled, behind) = tokio::join!(stalled, behind);
    assert!(
        matches!(stalled, Err(LineError::TimedOut(_))),
        "{stalled:?}"
    );
    let behind = behind.expect_err("the call behind fails with the line");
    assert!(
        behind.contains("broke") || behind.contains("within"),
        "{behind}"
    );
    assert_ne!(client_id(&line).await, first, "a new connection");
    assert_eq!(get(&line, "k").await.unwrap(), None);
}

// On the runtime's worker threads, as in the worker: the look at the socket before a call is
// appended finds the end Redis's death left on it (the I/O driver, run by the idle thread, has
// seen it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_and_an_idle_spell_are_noticed_before_a_call_is_sent() {
    let mut redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_secs(2));
    let first = client_id(&line).await;
    // Restarted: the old socket's end is seen before the call goes out, and the call is sent
    // on a new connection, without an error.
    redis.kill();
    redis.start_again();
    assert_eq!(get(&line, "k").await.unwrap(), None);
    let second = client_id(&line).await;
    assert_eq!(client_id(&line).await, second, "kept while in use");
    // Idle past the check: connected again rather than trusted (a firewall may have forgotten
    // it; the pool asks with a PING in that case).
    tokio::time::sleep(IDLE_CHECK + Duration::from_millis(100)).await;
    let third = client_id(&line).await;
    assert_ne!(third, second);
    // Three connections made; the one Redis's death closed counted as broken.
    let stats = line.stats();
    assert_eq!((stats.connects, stats.breaks), (3, 1), "{stats:?}");
    let _ = first;
    // Nothing to send: said so, and not sent.
    assert!(matches!(line.send(b"", 0).await, Err(LineError::Empty)));
    // Redis down: no connection, nothing sent, said so.
    redis.stop();
    let refused = line.send(&packed(&[&["GET", "k"]]), 1).await;
    assert!(
        matches!(refused, Err(LineError::Connect(_))),
        "{:?}",
        refused.err()
    );
}

#[tokio::test]
async fn a_batch_whose_opener_went_away_before_writing_it_is_written_by_the_next() {
    use std::future::Future;
    use std::task::Poll;
    let redis = TestRedis::start();
    let line = Arc::new(line_for(&redis, Duration::from_secs(2)));
    let _ = get(&line, "warm").await;
    // The opener of a batch lets the other ready tasks append before it writes; here it is
    // polled once (it yields), a call in another task appends and waits, and the opener is
    // dropped before it comes back to write. The other task must be woken to write both.
    let opener = line.send(&packed(&[&["GET", "a"]]), 1).await.unwrap();
    let mut opener = Box::pin(opener.read(text));
    std::future::poll_fn(|cx| {
        assert!(
            opener.as_mut().poll(cx).is_pending(),
            "the opener yields first"
        );
        Poll::Ready(())
    })
    .await;
    let second = tokio::spawn({
        let line = line.clone();
        async move { get(&line, "b").await }
    });
    // The other task appends its call and waits for the opener's write.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!second.is_finished());
    drop(opener);
    let answer = tokio::time::timeout(Duration::from_secs(1), second)
        .await
        .expect("answered within a second");
    assert_eq!(answer.unwrap(), Ok(None));
}

/// What must never happen on a shared connection: a call handed another call's replies (a
/// session read given someone else's session). 48 tasks on two threads make calls of two
/// commands each, whose replies name the call, until the test has killed the line's connection
/// from Redis's side five times (125 to 2 000 calls each); a third of the calls are given up
/// after 0–300 µs (their requests cancelled, mid-batch or mid-read). Every call that gets
/// replies gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_cancellations_and_killed_connections_every_call_gets_only_its_own_replies() {
    let redis = TestRedis::start();
    let line = Arc::new(line_for(&redis, Duration::from_secs(2)));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let broken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for task in 0..48u64 {
        let (line, answered, broken) = (line.clone(), answered.clone(), broken.clone());
        let killed = killed.clone();
        tasks.push(tokio::spawn(async move {
            // xorshift, seeded per task: which calls are given up, and when.
            let mut seed = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            for call in 0..2_000 {
                if call >= 125 && killed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (a, b) = (format!("{task}/{call}/a"), format!("{task}/{call}/b"));
                let exchange = async {
                    let sent = line
                        .send(&packed(&[&["ECHO", &a], &["ECHO", &b]]), 2)
                        .await
                        .map_err(|e| e.to_string())?;
                    sent.read(|replies| Some((text(replies)??, text(replies)??)))
                        .await
                        .map_err(|e| e.to_string())
                };
                let outcome = if next() % 3 == 0 {
                    let within = Duration::from_micros(next() % 300);
                    match tokio::time::timeout(within, exchange).await {
                        Ok(outcome) => outcome,
                        Err(_) => continue,
                    }
                } else {
                    exchange.await
                };
                match outcome {
                    Ok(Ok(Some(replies))) => {
                        assert_eq!(replies, (a, b), "a call got another call's replies");
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(other) => panic!("Redis's answer to ECHO: {other:?}"),
                    // The line broke under the call (killed below): nothing to check.
                    Err(error) => {
                        assert!(
                            error.contains("broke") || error.contains("no Redis connection"),
                            "{error}"
                        );
                        broken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let killer = {
        let client = redis.client();
        tokio::spawn(async move {
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(15)).await;
                // Every connection but this one: the line's (the harness keeps none open).
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("SKIPME")
                    .arg("yes")
                    .query_async(&mut connection)
                    .await;
            }
            killed.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    };
    for task in tasks {
        task.await.unwrap();
    }
    killer.await.unwrap();
    let answered = answered.load(std::sync::atomic::Ordering::Relaxed);
    let broken = broken.load(std::sync::atomic::Ordering::Relaxed);
    assert!(answered > 2_000, "only {answered} calls answered");
    assert!(
        broken > 0,
        "no call met a killed connection: the test tested less than it says"
    );
}

/// Sends a call Redis answers in 300 ms and gives it up after 50 (its request cancelled).
async fn give_up_a_slow_call(line: &Line) {
    let slow = async {
        let sent = line
            .send(&packed(&[&["BLPOP", "nothing", "0.3"]]), 1)
            .await
            .unwrap();
        sent.read(|replies| replies.array()).await
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_call_given_up_on_a_quiet_line_never_has_its_reply_taken_and_the_line_is_made_again() {
    let redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_secs(2));
    set(&redis, "k", "v").await;
    let first = client_id(&line).await;
    // The only call on a quiet line, given up before its reply came: the next call gets its
    // own reply, on a new connection (nobody has seen the old one answer since).
    give_up_a_slow_call(&line).await;
    assert_eq!(get(&line, "k").await.unwrap().as_deref(), Some("v"));
    let second = client_id(&line).await;
    assert_ne!(second, first, "connected again");
    // The same when the given-up call's reply came meanwhile and nobody read it.
    give_up_a_slow_call(&line).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&line, "k").await.unwrap().as_deref(), Some("v"));
    assert_ne!(client_id(&line).await, second, "connected again");
    assert_eq!(line.stats().breaks, 0, "closed as idle, not broken");
    // Behind a call still waiting, a given-up call's reply is read and thrown away on the same
    // connection: the next test, and the stress test.
}

#[tokio::test]
async fn commands_that_are_not_the_replies_asked_for_are_not_sent() {
    let redis = TestRedis::start();
    let line = line_for(&redis, Duration::from_secs(2));
    // Two commands and one reply asked for would leave the second reply to the next call.
    let miscounted = line.send(&packed(&[&["GET", "a"], &["GET", "b"]]), 1).await;
    assert!(
        matches!(
            miscounted,
            Err(LineError::Miscounted {
                commands: Some(2),
                replies: 1
            })
        ),
        "{:?}",
        miscounted.err()
    );
    let cut = line.send(b"*1\r\n$4\r\nTI", 1).await;
    assert!(matches!(
        cut,
        Err(LineError::Miscounted { commands: None, .. })
    ));
    assert_eq!(line.stats().calls, 0, "nothing sent");
    assert_eq!(get(&line, "a").await.unwrap(), None);
}
