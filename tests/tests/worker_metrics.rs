//! A worker's `/metrics`: requests by route and status, latency, session store operations, the
//! Redis pool, the shared Redis lines and registry heartbeats move as the worker serves.

use herd_tests::redis::TestRedis;
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{cookie, plain_client, set_session_cookie};

/// The value of the sample `series` (name and labels, exactly) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_metrics_move_with_requests_and_session_operations() {
    let dir = herd_tests::temp_dir();
    let redis = TestRedis::start();
    let prefix = herd_tests::unique_prefix();
    let worker = TestWorker::start(&WorkerOptions::new("w1", redis.url(), &prefix), dir.path());
    let client = plain_client();
    let metrics = || async {
        let response = client.get(worker.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    };
    // Every session operation's series is there from the start, at zero.
    let before = metrics().await;
    assert_eq!(
        sample(
            &before,
            r#"herd_worker_session_ops_total{op="save",result="ok"}"#
        ),
        Some(0.0),
        "{before}"
    );

    let login = client
        .post(worker.url("/login"))
        .json(&serde_json::json!({ "user": "ann" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let session = set_session_cookie(&login).expect("session cookie");
    for _ in 0..3 {
        let response = client
            .get(worker.url("/cart"))
            .header("cookie", cookie(&session))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let missing = client
        .get(worker.url("/no/such/page"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let text = metrics().await;
    let expect = |series: &str, at_least: f64| {
        let value = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!(
            value >= at_least,
            "{series} = {value}, expected ≥ {at_least}"
        );
    };
    expect(
        r#"herd_worker_requests_total{route="/login",status="200"}"#,
        1.0,
    );
    expect(
        r#"herd_worker_requests_total{route="/cart",status="200"}"#,
        3.0,
    );
    expect(
        r#"herd_worker_requests_total{route="unmatched",status="404"}"#,
        1.0,
    );
    expect(
        r#"herd_worker_request_duration_seconds_count{route="/cart"}"#,
        3.0,
    );
    expect(
        r#"herd_worker_session_ops_total{op="save",result="ok"}"#,
        1.0,
    );
    expect(
        r#"herd_worker_session_ops_total{op="load",result="ok"}"#,
        3.0,
    );
    expect(
        r#"herd_worker_session_op_duration_seconds_count{op="load"}"#,
        3.0,
    );
    expect(r#"herd_worker_registry_heartbeats_total{result="ok"}"#, 1.0);
    expect(r#"herd_worker_redis_pool_connections{state="open"}"#, 1.0);
    expect(r#"herd_worker_redis_pool_connections{state="max"}"#, 1.0);
    // The three reads went on the thread's shared line: three calls, a write each at least
    // (one at a time here), one connection.
    expect(r#"herd_worker_redis_line_events_total{event="call"}"#, 3.0);
    expect(r#"herd_worker_redis_line_events_total{event="write"}"#, 3.0);
    expect(
        r#"herd_worker_redis_line_events_total{event="connect"}"#,
        1.0,
    );
    expect(r#"herd_worker_redis_line_events_total{event="break"}"#, 0.0);
    // The scrape itself is the one request in flight.
    expect("herd_worker_in_flight", 1.0);
    expect("herd_worker_session_cas_conflicts_total", 0.0);
}
