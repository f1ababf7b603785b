//! A worker's life with real processes: it registers itself and heartbeats, survives a Redis
//! outage with quick 503s and heals without a restart, and on SIGTERM announces the drain, keeps
//! serving until traffic stops, finishes in-flight requests, leaves the registry and exits 0.

use std::process::Command;
use std::time::{Duration, Instant};

use herd::binaries;
use herd_tests::redis::TestRedis;
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{EventLog, cookie, plain_client, set_session_cookie};
use herd_tests::{temp_dir, unique_prefix, wait_until};
use nix::sys::signal::Signal;
use redis::AsyncCommands;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// Short drain settings so the tests stay quick.
fn quick_drain(options: WorkerOptions) -> WorkerOptions {
    options
        .env("HERD_WORKER_DRAIN__MIN", "1s")
        .env("HERD_WORKER_DRAIN__QUIET", "300ms")
        .env("HERD_WORKER_DRAIN__MAX", "8s")
}

async fn status(client: &reqwest::Client, url: &str) -> u16 {
    match client.get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_heartbeats_drains_and_leaves() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let events = EventLog::subscribe(&redis.url(), &prefix);
    let dir = temp_dir();
    let options = quick_drain(WorkerOptions::new("w1", redis.url(), &prefix))
        .env("HERD_WORKER_REGISTRY__HEARTBEAT", "200ms")
        .env("HERD_WORKER_REGISTRY__TTL", "1s");
    let mut worker = TestWorker::start(&options, dir.path());
    let client = plain_client();
    let mut con = redis.connection().await;
    let key = format!("{prefix}worker:w1");

    let join = events.wait_for("join", "w1", WAIT).await;
    assert_eq!(join["worker"]["addr"], worker.addr.to_string());
    assert_eq!(join["worker"]["state"], "ready");
    let entry: std::collections::HashMap<String, String> = con.hgetall(&key).await.unwrap();
    assert_eq!(entry["state"], "ready", "{entry:?}");
    assert_eq!(entry["machine"], "test-machine");
    assert_eq!(entry["weight"], "100");
    // The heartbeat keeps the TTL fresh: after several TTLs the entry is still there.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let ttl: i64 = con.pttl(&key).await.unwrap();
    assert!(ttl > 0 && ttl <= 1_000, "ttl {ttl}");
    assert_eq!(events.count("join", "w1"), 1, "join is announced once");

    // A request in flight when SIGTERM arrives still completes.
    let slow = tokio::spawn({
        let client = client.clone();
        let url = worker.url("/work?ms=700");
        async move { client.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let term_sent = Instant::now();
    worker.signal(Signal::SIGTERM);
    events.wait_for("drain", "w1", WAIT).await;
    let state: Option<String> = con.hget(&key, "state").await.unwrap();
    assert_eq!(state.as_deref(), Some("draining"));
    assert_eq!(status(&client, &worker.url("/readyz")).await, 503);
    // Still serving whatever arrives while draining.
    assert_eq!(status(&client, &worker.url("/work?ms=1")).await, 200);
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "the in-flight request finished"
    );

    let exit = tokio::task::block_in_place(|| worker.process.wait_exit(WAIT));
    let exit = exit.expect("the worker exits after draining");
    assert!(exit.success(), "exit status {exit:?}");
    let took = term_sent.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "drain.min is honoured: {took:?}"
    );
    events.wait_for("leave", "w1", WAIT).await;
    let exists: bool = con.exists(&key).await.unwrap();
    assert!(!exists, "the registry entry is deleted on leave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_serves_until_traffic_stops_with_no_failed_request() {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let dir = temp_dir();
    // A quiet period long enough that a busy test box never pauses that long between requests.
    let options = WorkerOptions::new("w1", redis.url(), &prefix)
        .env("HERD_WORKER_DRAIN__MIN", "1s")
        .env("HERD_WORKER_DRAIN__QUIET", "1s")
        .env("HERD_WORKER_DRAIN__MAX", "8s");
    let mut worker = TestWorker::start(&options, dir.path());
    let client = plain_client();
    let url = worker.url("/work?ms=2");

    worker.signal(Signal::SIGTERM);
    // Traffic that keeps coming (a gateway that has not noticed yet) is served, for longer than
    // drain.min, every request succeeding, while readiness says "draining".
    let started = Instant::now();
    let mut sent = 0;
    let mut saw_not_ready = false;
    while started.elapsed() < Duration::from_millis(2_500) && sent < 2_000 {
        assert_eq!(
            status(&client, &url).await,
            200,
            "request {sent} during the drain"
        );
        sent += 1;
        saw_not_ready |= status(&client, &worker.url("/readyz")).await == 503;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_not_ready, "readyz said 503 while draining");
    assert!(
        worker.process.try_wait().is_none(),
        "still up while requests arrive"
    );
    // Once traffic stops, the worker leaves after the quiet period.
    let stopped = Instant::now();
    let exit = tokio::task::block_in_place(|| worker.process.wait_exit(WAIT)).expect("exits");
    assert!(exit.success(), "{exit:?}");
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "waited for the quiet period: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_gives_fast_503s_and_heals_without_restart() {
    let mut redis = TestRedis::start();
    let prefix = unique_prefix();
    let events = EventLog::subscribe(&redis.url(), &prefix);
    let dir = temp_dir();
    let options = WorkerOptions::new("w1", redis.url(), &prefix)
        .env("HERD_WORKER_REDIS__CONNECT_TIMEOUT", "300ms")
        .env("HERD_WORKER_REDIS__COMMAND_TIMEOUT", "300ms")
        .env("HERD_WORKER_HEALTH__REDIS_INTERVAL", "100ms")
        .env("HERD_WORKER_REGISTRY__HEARTBEAT", "200ms")
        .env("HERD_WORKER_REGISTRY__TTL", "1s");
    let worker = TestWorker::start(&options, dir.path());
    let client = plain_client();
    events.wait_for("join", "w1", WAIT).await;

    let login = client
        .post(worker.url("/login"))
        .json(&json!({"user": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let id = set_session_cookie(&login).expect("session cookie");
    drop(events);

    redis.kill();
    for (method, path) in [
        ("GET", "/me"),
        ("GET", "/cart"),
        ("POST", "/cart/items"),
        ("POST", "/login"),
    ] {
        let started = Instant::now();
        let request = match (method, path) {
            ("GET", _) => client.get(worker.url(path)),
            (_, "/login") => client.post(worker.url(path)).json(&json!({"user": "ann"})),
            _ => client
                .post(worker.url(path))
                .json(&json!({"item": "apple"})),
        };
        let response = request.header("cookie", cookie(&id)).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(response.status(), 503, "{method} {path}");
        assert_eq!(response.headers()["retry-after"], "1", "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"], "session_store_unavailable",
            "{method} {path}"
        );
        // connect (300 ms) + command (300 ms) bound one call; allow for a slow box.
        assert!(
            took < Duration::from_millis(1_500),
            "{method} {path} took {took:?}"
        );
    }
    wait_until(WAIT, "readyz turns 503 without Redis", || {
        let client = client.clone();
        let url = worker.url("/readyz");
        async move { status(&client, &url).await == 503 }
    })
    .await;
    assert_eq!(
        status(&client, &worker.url("/healthz")).await,
        200,
        "still alive"
    );
    assert_eq!(
        status(&client, &worker.url("/work?ms=1")).await,
        200,
        "no-session routes still work"
    );

    // Redis comes back (empty: it was killed): the worker recovers by itself.
    redis.start_again();
    wait_until(WAIT, "readyz turns 200 again", || {
        let client = client.clone();
        let url = worker.url("/readyz");
        async move { status(&client, &url).await == 200 }
    })
    .await;
    let login = client
        .post(worker.url("/login"))
        .json(&json!({"user": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "sessions work again without a restart");
    let id = set_session_cookie(&login).expect("new session");
    let me: Value = client
        .get(worker.url("/me"))
        .header("cookie", cookie(&id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"], "bob");
    // The registry entry is written again (the restarted Redis had lost it).
    let con = redis.connection().await;
    let key = format!("{prefix}worker:w1");
    wait_until(WAIT, "the registry entry is back", || {
        let (mut con, key) = (con.clone(), key.clone());
        async move {
            let state: Option<String> = con.hget(&key, "state").await.unwrap_or(None);
            state.as_deref() == Some("ready")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_serves_while_redis_is_down() {
    let dir = temp_dir();
    // Nothing listens on this Redis port (a server started and killed at once).
    let mut redis = TestRedis::start();
    let url = redis.url();
    redis.kill();
    let options = WorkerOptions::new("w1", &url, unique_prefix())
        .env("HERD_WORKER_REDIS__CONNECT_TIMEOUT", "200ms")
        .env("HERD_WORKER_REDIS__COMMAND_TIMEOUT", "200ms");
    let worker = TestWorker::start(&options, dir.path());
    let client = plain_client();
    assert_eq!(status(&client, &worker.url("/healthz")).await, 200);
    assert_eq!(status(&client, &worker.url("/readyz")).await, 503);
    assert_eq!(status(&client, &worker.url("/work?ms=1")).await, 200);
    let response = client.get(worker.url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-herd-worker"], "w1");
    assert_eq!(response.headers()["x-herd-machine"], "test-machine");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
}

#[test]
fn a_bad_config_value_exits_2_naming_the_key() {
    let program = binaries::locate(binaries::WORKER).unwrap_or_else(|error| panic!("{error}"));
    for (var, value, key) in [
        (
            "HERD_WORKER_SESSION__IDLE_TIMEOUT",
            "soon",
            "session.idle_timeout",
        ),
        ("HERD_WORKER_DRAIN__QUIET", "1", "drain.quiet"),
        ("HERD_WORKER_LISTEN", "nowhere", "listen"),
        ("HERD_WORKER_REGISTRY__TTL", "100ms", "registry.ttl"),
    ] {
        let output = Command::new(&program)
            .env(var, value)
            .env(
                "HERD_WORKER_LISTEN",
                if var == "HERD_WORKER_LISTEN" {
                    value
                } else {
                    "127.0.0.1:0"
                },
            )
            .output()
            .expect("runs");
        assert_eq!(output.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{var}={value}: {stderr}");
        assert!(output.stdout.is_empty(), "nothing on stdout");
    }
}
