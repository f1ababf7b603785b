//! The walking skeleton's promises, end to end through real processes: sessions live in Redis so
//! any worker serves any request, a killed worker loses nothing, a Redis outage is a clean 503
//! that heals by itself, and a bad config value stops a process with exit 2 naming the key.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use herd::binaries;
use herd_tests::cluster::{Cluster, ClusterOptions};
use herd_tests::{client, wait_until};
use serde_json::{Value, json};

async fn cart_items(response: reqwest::Response) -> Vec<String> {
    let body: Value = response.json().await.expect("cart is JSON");
    body["items"]
        .as_array()
        .expect("cart has items")
        .iter()
        .map(|item| item["item"].as_str().expect("item name").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_spans_workers_and_survives_a_killed_worker() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let user = client();
    let login = user
        .post(cluster.gateway.url("/login"))
        .json(&json!({"user": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "{:?}", login.text().await);

    let mut served_by = BTreeSet::new();
    let mut added = Vec::new();
    for n in 0..24 {
        let item = format!("item-{n}");
        let response = user
            .post(cluster.gateway.url("/cart/items"))
            .json(&json!({"item": item, "qty": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "adding {item}");
        let worker = response.headers()["x-herd-worker"]
            .to_str()
            .unwrap()
            .to_string();
        served_by.insert(worker);
        added.push(item);
    }
    assert!(
        served_by.len() >= 2,
        "24 requests should spread over ≥ 2 workers, saw {served_by:?}"
    );

    // kill -9 a worker that held part of the conversation: nothing of the session lived there.
    let victim = served_by.iter().next().unwrap().clone();
    cluster.worker(&victim).kill9();
    for _ in 0..10 {
        let response = user.get(cluster.gateway.url("/cart")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let worker = response.headers()["x-herd-worker"]
            .to_str()
            .unwrap()
            .to_string();
        assert_ne!(worker, victim, "a killed worker cannot answer");
        assert_eq!(cart_items(response).await, added, "the whole cart survives");
    }
    let me: Value = user
        .get(cluster.gateway.url("/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["user"], "ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_is_a_fast_503_and_heals_without_restarts() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let user = client();
    let login = user
        .post(cluster.gateway.url("/login"))
        .json(&json!({"user": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let added = user
        .post(cluster.gateway.url("/cart/items"))
        .json(&json!({"item": "pear", "qty": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(added.status(), 200);

    cluster.redis.stop();
    for path in ["/cart", "/me"] {
        let started = Instant::now();
        let response = user.get(cluster.gateway.url(path)).send().await.unwrap();
        let waited = started.elapsed();
        assert_eq!(response.status(), 503, "{path} while Redis is down");
        let body: Value = response.json().await.expect("503 body is JSON");
        assert!(
            body["error"].is_string(),
            "503 body names the error: {body}"
        );
        // Bounded, not a hang: Redis timeouts are 500 ms; retries over 3 workers stay far below.
        assert!(waited < Duration::from_secs(5), "{path} took {waited:?}");
    }

    cluster.redis.start_again();
    wait_until(Duration::from_secs(10), "sessions work again", || {
        let request = user.get(cluster.gateway.url("/cart")).send();
        async move { matches!(request.await, Ok(r) if r.status() == 200) }
    })
    .await;
    let response = user.get(cluster.gateway.url("/cart")).send().await.unwrap();
    assert_eq!(
        cart_items(response).await,
        vec!["pear"],
        "the session written before the outage is intact"
    );
    let fresh = client();
    let login = fresh
        .post(cluster.gateway.url("/login"))
        .json(&json!({"user": "cy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        login.status(),
        200,
        "new sessions work without restarting anything"
    );
}

/// Runs `binary` with `env` and returns (exit code, stderr).
fn run_with_env(binary: &str, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let program = binaries::locate(binary).unwrap_or_else(|error| panic!("{error}"));
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// (binary, environment, arguments, the key the error must name).
type BadConfigCase<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);

#[test]
fn a_bad_config_value_exits_2_with_one_line_naming_the_key() {
    let dir = herd_tests::temp_dir();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "listen = \"127.0.0.1:0\"\nlisten_port = 80\n").unwrap();
    let typo = typo.display().to_string();
    let cases: Vec<BadConfigCase> = vec![
        (
            "herd-gateway",
            vec![("HERD_GATEWAY_LISTEN", "not-an-address")],
            vec![],
            "listen",
        ),
        (
            "herd-worker",
            vec![("HERD_WORKER_LISTEN", "300.1.1.1:80")],
            vec![],
            "listen",
        ),
        (
            "herd-worker",
            vec![("HERD_WORKER_REDIS__URL", "http://nope")],
            vec![],
            "redis.url",
        ),
        (
            "herd-gateway",
            vec![],
            vec!["--config", &typo],
            "listen_port",
        ),
        (
            "herd-worker",
            vec![],
            vec!["--config", "/nonexistent/worker.toml"],
            "config",
        ),
    ];
    for (binary, env, args, key) in cases {
        let (code, stderr) = run_with_env(binary, &env, &args);
        assert_eq!(code, Some(2), "{binary} {env:?} {args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line, no backtrace: {stderr}");
        assert!(
            lines[0].starts_with(&format!("config error: {key}")),
            "{binary}: the line names `{key}`: {stderr}"
        );
    }
}

#[test]
fn a_taken_port_exits_1_with_one_line_naming_the_address_even_with_backtraces_on() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let cases = [
        ("herd-gateway", "HERD_GATEWAY_LISTEN", "herd-gateway: "),
        ("herd-worker", "HERD_WORKER_LISTEN", "herd-worker: "),
    ];
    for (binary, variable, start) in cases {
        let env = [
            (variable, addr.as_str()),
            ("RUST_BACKTRACE", "1"),
            ("HERD_WORKER_APP", "hello"),
            ("HERD_WORKER_REGISTRY__ENABLED", "false"),
        ];
        let (code, stderr) = run_with_env(binary, &env, &["--log-format", "json"]);
        assert_eq!(code, Some(1), "{binary}: {stderr}");
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let last = last.unwrap_or_default();
        assert!(
            last.starts_with(start) && last.contains(&addr),
            "{binary}: the last line says which address: {stderr}"
        );
        assert!(!stderr.contains("backtrace"), "{binary}: {stderr}");
    }
}
