//! Worker failures, in-process against small upstreams: dead, hung, draining, erroring workers.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::{Gateway, Upstream, client, get, send, wait_until, worker_state};

#[tokio::test]
async fn a_dead_worker_costs_no_request_of_any_method() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    // Health checks slowed down and passive ejection off: only retries can save these requests.
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.health.interval = Duration::from_secs(60);
        c.health.passive.enabled = false;
        c.balancing.slow_start = Duration::ZERO;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.retry.budget_min_per_sec = 1000;
    })
    .await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    }
    w1.kill().await;
    for i in 0..40 {
        let answer = get(&c, &gw.url("/")).await;
        assert_eq!(answer.status, 200, "GET {i}: {:?}", answer.body);
        assert_eq!(answer.worker(), "w2");
    }
    for i in 0..20 {
        let answer = send(&c, "POST", &gw.url("/"), &[], &b"{}"[..]).await;
        assert_eq!(
            answer.status, 200,
            "POST {i} (never reached the dead worker): {:?}",
            answer.body
        );
    }
    let metrics = get(&c, &gw.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("herd_gateway_retries_total{reason=\"refused\"}"),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_hung_worker_is_bounded_by_the_timeout_and_ejected_then_returns() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let request_timeout = Duration::from_secs(1);
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.timeouts.request = request_timeout;
        c.timeouts.response_header = Duration::from_millis(300);
        c.balancing.slow_start = Duration::ZERO;
    })
    .await;
    let c = client();
    w1.behavior.hang.store(true, Ordering::SeqCst);
    let started = Instant::now();
    for i in 0..30 {
        let sent = Instant::now();
        let answer = get(&c, &gw.url("/")).await;
        assert!(
            sent.elapsed() < request_timeout + Duration::from_millis(300),
            "request {i} took {:?}",
            sent.elapsed()
        );
        assert_eq!(
            answer.status, 200,
            "GET {i} is retried on the healthy worker"
        );
    }
    let id = w1.addr.to_string();
    wait_until(
        Duration::from_secs(2),
        "the hung worker is down",
        || async { worker_state(&gw, &id).await == "down" },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(4));
    let hits = w1.hits();
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/")).await.worker(), "w2");
    }
    assert_eq!(w1.hits(), hits, "no new requests to a down worker");
    // SIGCONT: back after `rise` checks.
    w1.behavior.hang.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(3), "the worker is back", || async {
        matches!(
            worker_state(&gw, &id).await.as_str(),
            "healthy" | "slow_start"
        )
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_post_to_a_hung_worker_gets_504_within_the_timeout() {
    let w1 = Upstream::start("w1").await;
    w1.behavior.hang.store(true, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1], |c| {
        c.timeouts.request = Duration::from_millis(700);
        c.timeouts.response_header = Duration::from_millis(300);
        c.health.interval = Duration::from_secs(60);
    })
    .await;
    let sent = Instant::now();
    let answer = send(&client(), "POST", &gw.url("/"), &[], &b"x"[..]).await;
    assert_eq!(answer.status, 504);
    assert_eq!(answer.json()["error"], "upstream_timeout");
    assert!(
        sent.elapsed() < Duration::from_millis(700),
        "{:?}",
        sent.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_draining_worker_gets_no_new_requests() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let gw = Gateway::start(&[&w1, &w2], |c| c.balancing.slow_start = Duration::ZERO).await;
    let c = client();
    w1.behavior.ready_status.store(503, Ordering::SeqCst);
    let id = w1.addr.to_string();
    wait_until(
        Duration::from_secs(2),
        "the draining worker is down",
        || async { worker_state(&gw, &id).await == "down" },
    )
    .await;
    let hits = w1.hits();
    for _ in 0..20 {
        assert_eq!(get(&c, &gw.url("/")).await.worker(), "w2");
    }
    assert_eq!(w1.hits(), hits);
    gw.shutdown().await;
}

#[tokio::test]
async fn idempotent_requests_are_retried_on_503_and_posts_keep_the_workers_answer() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    w1.behavior.status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.health.passive.enabled = false;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
    })
    .await;
    let c = client();
    // Half the GETs meet w1 and are retried: within the floor of 10 retries a second.
    for i in 0..10 {
        let answer = get(&c, &gw.url("/")).await;
        assert_eq!(answer.status, 200, "GET {i}");
    }
    let mut worker_503 = 0;
    for _ in 0..10 {
        let answer = send(&c, "POST", &gw.url("/"), &[], &b"x"[..]).await;
        if answer.status == 503 {
            // The worker's own answer, not the gateway's.
            assert_eq!(answer.worker(), "w1");
            assert_eq!(answer.json()["worker"], "w1");
            worker_503 += 1;
        }
    }
    assert!(worker_503 > 0, "round robin sends some POSTs to w1");
    gw.shutdown().await;
}

#[tokio::test]
async fn consecutive_5xx_eject_a_worker_until_a_probe_succeeds() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    w1.behavior.status.store(500, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.health.passive.base_ejection = Duration::from_millis(300);
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
    })
    .await;
    let c = client();
    let id = w1.addr.to_string();
    for _ in 0..10 {
        get(&c, &gw.url("/")).await;
    }
    assert_eq!(worker_state(&gw, &id).await, "ejected");
    assert_eq!(support::worker_field(&gw, &id, "ejections").await, 1);
    let hits = w1.hits();
    for _ in 0..5 {
        assert_eq!(get(&c, &gw.url("/")).await.worker(), "w2");
    }
    assert_eq!(w1.hits(), hits, "ejected: no requests");
    w1.behavior.status.store(0, Ordering::SeqCst);
    wait_until(
        Duration::from_secs(3),
        "a probe brings the worker back",
        || async {
            get(&c, &gw.url("/")).await;
            worker_state(&gw, &id).await == "healthy"
        },
    )
    .await;
    assert_eq!(
        support::worker_field(&gw, &id, "last_change").await["what"],
        "recovered"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_ejected_worker_comes_back_by_its_health_checks_without_traffic() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    w1.behavior.status.store(500, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.health.passive.base_ejection = Duration::from_millis(300);
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
    })
    .await;
    let c = client();
    let id = w1.addr.to_string();
    for _ in 0..10 {
        get(&c, &gw.url("/")).await;
    }
    assert_eq!(worker_state(&gw, &id).await, "ejected");
    // Fixed, and no request comes to probe it: its passing health checks bring it back.
    w1.behavior.status.store(0, Ordering::SeqCst);
    let hits = w1.hits();
    wait_until(
        Duration::from_secs(3),
        "the health checks bring the worker back",
        || async { worker_state(&gw, &id).await == "healthy" },
    )
    .await;
    assert_eq!(w1.hits(), hits, "back without a request");
    let change = support::worker_field(&gw, &id, "last_change").await;
    assert_eq!(change["what"], "recovered", "{change}");
    assert!(
        change["reason"]
            .as_str()
            .unwrap()
            .contains("health check passed"),
        "{change}"
    );
    // On probation: if it still fails, the first failure ejects it again.
    w1.behavior.status.store(500, Ordering::SeqCst);
    let mut from_w1 = 0;
    for _ in 0..4 {
        if get(&c, &gw.url("/")).await.worker() == "w1" {
            from_w1 += 1;
        }
    }
    assert_eq!(from_w1, 1, "one failure, then ejected");
    assert_eq!(worker_state(&gw, &id).await, "ejected");
    assert_eq!(support::worker_field(&gw, &id, "ejections").await, 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn all_workers_dead_gives_503_json_at_once() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let gw = Gateway::start(&[&w1, &w2], |_| {}).await;
    let c = client();
    assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    w1.kill().await;
    w2.kill().await;
    // Before and after the health checks notice: always a quick 503 in JSON. Right after the
    // kill a request meets the pooled connections the dead workers closed: each is a free
    // stale-connection retry (once per worker), and the fresh connects are refused.
    for _round in 0..2 {
        for _ in 0..5 {
            let sent = Instant::now();
            let answer = get(&c, &gw.url("/")).await;
            assert!(
                sent.elapsed() < Duration::from_millis(500),
                "{:?}",
                sent.elapsed()
            );
            assert_eq!(answer.status, 503, "{:?}", answer.body);
            assert_eq!(answer.json()["error"], "no_worker_available");
        }
        let id = w1.addr.to_string();
        wait_until(
            Duration::from_secs(2),
            "the dead worker is unreachable",
            || async { worker_state(&gw, &id).await == "unreachable" },
        )
        .await;
    }
    assert_eq!(get(&c, &gw.admin_url("/readyz")).await.status, 503);
    gw.shutdown().await;
}

#[tokio::test]
async fn panic_mode_keeps_serving_when_every_check_fails() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    w1.behavior.ready_status.store(503, Ordering::SeqCst);
    w2.behavior.ready_status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1, &w2], |_| {}).await;
    let c = client();
    let (id1, id2) = (w1.addr.to_string(), w2.addr.to_string());
    wait_until(Duration::from_secs(2), "both workers are down", || async {
        worker_state(&gw, &id1).await == "down" && worker_state(&gw, &id2).await == "down"
    })
    .await;
    assert_eq!(get(&c, &gw.admin_url("/readyz")).await.status, 503);
    for _ in 0..10 {
        assert_eq!(
            get(&c, &gw.url("/")).await.status,
            200,
            "health ignored in panic mode"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn removed_worker_gets_nothing_and_undrain_restores_traffic() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let gw = Gateway::start(&[&w1, &w2], |c| c.balancing.slow_start = Duration::ZERO).await;
    let c = client();
    let auth = [("authorization", "Bearer test-token")];
    let answer = send(
        &c,
        "DELETE",
        &gw.admin_url(&format!("/api/workers/{}", w1.addr)),
        &auth,
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(worker_state(&gw, &w1.addr.to_string()).await, "absent");
    for _ in 0..10 {
        assert_eq!(get(&c, &gw.url("/")).await.worker(), "w2");
    }
    let drain = format!("/api/workers/{}/drain", w2.addr);
    assert_eq!(
        send(&c, "POST", &gw.admin_url(&drain), &auth, Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(get(&c, &gw.url("/")).await.status, 503);
    let undrain = format!("/api/workers/{}/undrain", w2.addr);
    assert_eq!(
        send(&c, "POST", &gw.admin_url(&undrain), &auth, Bytes::new())
            .await
            .status,
        200
    );
    assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn an_exhausted_retry_budget_passes_the_workers_503_on() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    w1.behavior.status.store(503, Ordering::SeqCst);
    let gw = Gateway::start(&[&w1, &w2], |c| {
        c.health.passive.enabled = false;
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
        c.retry.budget_ratio = 0.0;
        c.retry.budget_min_per_sec = 0;
    })
    .await;
    let c = client();
    let mut from_w1 = 0;
    for _ in 0..6 {
        let answer = get(&c, &gw.url("/")).await;
        if answer.worker() == "w1" {
            assert_eq!(answer.status, 503);
            from_w1 += 1;
        }
    }
    assert_eq!(from_w1, 3, "no budget: no retries");
    let metrics = get(&c, &gw.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("herd_gateway_retries_refused_total{limit=\"budget\"} 3"),
        "{text}"
    );
    gw.shutdown().await;
}
