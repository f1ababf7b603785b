//! Redis Sentinel: a worker finds the master through three sentinels, and when the master dies
//! under load, sessions written before the failover are still there, requests during it fail with
//! 503 at worst (never 500), and the worker follows the new master without a restart. The window
//! is measured and printed.

use std::time::{Duration, Instant};

use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{
    cookie, plain_client, sentinel_knows, set_session_cookie, spawn_redis,
};
use herd_tests::{temp_dir, unique_prefix, wait_until};
use serde_json::{Value, json};

const SENTINEL_CONF: &str = "port {port}
bind 127.0.0.1
sentinel monitor m 127.0.0.1 MASTER_PORT 2
sentinel down-after-milliseconds m 400
sentinel failover-timeout m 2000
sentinel parallel-syncs m 1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_sentinel_failover_under_load() {
    let dir = temp_dir();
    // No diskless-sync delay (5 s by default): the replica syncs at once.
    let mut master = spawn_redis(
        dir.path(),
        "master",
        None,
        &["--repl-diskless-sync-delay", "0"],
    );
    let replica = spawn_redis(
        dir.path(),
        "replica",
        None,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    );
    let conf = SENTINEL_CONF.replace("MASTER_PORT", &master.port.to_string());
    let sentinels: Vec<_> = (1..=3)
        .map(|n| {
            spawn_redis(
                dir.path(),
                &format!("sentinel{n}"),
                Some(&conf),
                &["--sentinel"],
            )
        })
        .collect();
    // Every sentinel knows the replica and the two other sentinels.
    wait_until(Duration::from_secs(20), "the sentinels see the whole topology", || {
        let ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
        async move {
            ports
                .iter()
                .all(|port| matches!(sentinel_knows(*port, "m"), Some((replicas, others)) if replicas >= 1 && others >= 2))
        }
    })
    .await;

    let addrs = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect::<Vec<_>>()
        .join(",");
    let mut options = WorkerOptions::new("w1", "redis://127.0.0.1:1/0", unique_prefix())
        .env("HERD_WORKER_SENTINEL__ADDRS", addrs)
        .env("HERD_WORKER_SENTINEL__MASTER", "m")
        .env("HERD_WORKER_SENTINEL__POLL", "100ms")
        .env("HERD_WORKER_REDIS__CONNECT_TIMEOUT", "300ms")
        .env("HERD_WORKER_REDIS__COMMAND_TIMEOUT", "300ms")
        .env("HERD_WORKER_HEALTH__REDIS_INTERVAL", "100ms");
    options.registry = false;
    let worker = TestWorker::start(&options, dir.path());
    let client = plain_client();

    // Sessions written before the failover (redis.url points nowhere: Sentinel found the master).
    let mut sessions = Vec::new();
    for n in 0..5 {
        let response = client
            .post(worker.url("/login"))
            .json(&json!({ "user": format!("u{n}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = set_session_cookie(&response).unwrap();
        for item in ["apple", "pear"] {
            let response = client
                .post(worker.url("/cart/items"))
                .header("cookie", cookie(&id))
                .json(&json!({ "item": item }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        sessions.push(id);
    }
    // Make sure the replica has them (replication is asynchronous).
    let master_client = redis::Client::open(format!("redis://127.0.0.1:{}/", master.port)).unwrap();
    let mut con = master_client.get_connection().unwrap();
    // WAIT counts replicas that acknowledged this connection's last write, which comes after
    // every session write above.
    let _: () = redis::cmd("SET")
        .arg("sentinel-test-marker")
        .arg(1)
        .query(&mut con)
        .unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5_000)
        .query(&mut con)
        .unwrap();
    assert_eq!(acked, 1, "the replica acknowledged the writes");
    drop(con);

    // Load: one session's cart, read and written, until told to stop (bounded).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (client, stop, id) = (client.clone(), stop.clone(), sessions[0].clone());
        let (cart, items) = (worker.url("/cart"), worker.url("/cart/items"));
        async move {
            let started = Instant::now();
            let mut outcomes: Vec<(Duration, u16)> = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && n < 20_000
                && started.elapsed() < Duration::from_secs(40)
            {
                let request = if n % 2 == 0 {
                    client.get(&cart)
                } else {
                    client
                        .post(&items)
                        .json(&json!({ "item": format!("load-{n}") }))
                };
                let status = match request.header("cookie", cookie(&id)).send().await {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                };
                outcomes.push((started.elapsed(), status));
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (started, outcomes)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    master.kill();
    // Recovered when writes succeed again (through the promoted replica).
    wait_until(
        Duration::from_secs(30),
        "writes succeed after the failover",
        || {
            let client = client.clone();
            let (url, id) = (worker.url("/cart/items"), sessions[1].clone());
            async move {
                let response = client
                    .post(url)
                    .header("cookie", cookie(&id))
                    .json(&json!({ "item": "after" }))
                    .send()
                    .await;
                matches!(response, Ok(r) if r.status() == 200)
            }
        },
    )
    .await;
    let recovered_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (load_started, outcomes) = load.await.unwrap();

    let killed_offset = killed_at - load_started;
    let failed: Vec<&(Duration, u16)> = outcomes
        .iter()
        .filter(|(_, status)| *status != 200)
        .collect();
    for (at, status) in &failed {
        assert_eq!(
            *status, 503,
            "at {at:?}: only 503s during a failover, never {status}"
        );
    }
    let window = match (failed.first(), failed.last()) {
        (Some((first, _)), Some((last, _))) => last.saturating_sub(*first),
        _ => Duration::ZERO,
    };
    eprintln!(
        "sentinel failover: {} requests, {} failed (all 503), failure window {:?}, writes back {:?} after the kill (first failure {:?} after it)",
        outcomes.len(),
        failed.len(),
        window,
        recovered_after,
        failed
            .first()
            .map(|(at, _)| at.saturating_sub(killed_offset)),
    );
    assert!(
        outcomes
            .iter()
            .any(|(at, status)| *at > killed_offset && *status == 200),
        "load recovered"
    );

    // Every session written before the failover is intact on the new master.
    for (n, id) in sessions.iter().enumerate() {
        let me: Value = client
            .get(worker.url("/me"))
            .header("cookie", cookie(id))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(me["user"], format!("u{n}"));
        let cart: Value = client
            .get(worker.url("/cart"))
            .header("cookie", cookie(id))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let names: Vec<&str> = cart["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["item"].as_str().unwrap())
            .collect();
        assert!(
            names.starts_with(&["apple", "pear"]),
            "session {n}: {names:?}"
        );
    }
    drop(replica);
}
