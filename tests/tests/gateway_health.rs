//! The gateway hides worker failures from users — real redis-server, herd-worker and herd-gateway
//! processes, bounded load through the gateway (issue 3, item 8):
//! - kill -9 one of 4 workers under ≥ 500 req/s → 0 failed GETs;
//! - SIGSTOP one → ejected, no request waits longer than the request timeout; SIGCONT → back;
//! - SIGTERM one → 0 failed requests of any method;
//! - a new worker registers → it gets traffic within 1 s;
//! - all workers gone → 503 JSON at once; admin API without a token → 401;
//! - Redis unreachable → the gateway keeps the workers it knows and keeps serving.
//!
//! Loads are bounded in rate, count and time and go to 127.0.0.1 only.

use std::time::{Duration, Instant};

use herd::load::{self, Plan, Report};
use herd_tests::cluster::{Cluster, ClusterOptions};
use herd_tests::gateway::ADMIN_TOKEN;
use herd_tests::worker_support::EventLog;
use herd_tests::{client, wait_until};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The tests of this file run one at a time: each drives ≥ 500 req/s through 4+ processes, and
/// on a small box two at once would measure the box, not the gateway.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// ≥ 500 req/s for a few seconds: 9 GETs to 1 POST.
fn plan(seconds: u64) -> Plan {
    Plan {
        rate: 500,
        duration: Duration::from_secs(seconds),
        concurrency: 16,
        timeout: Duration::from_secs(10),
    }
}

/// Starts the mixed load of `plan` through the cluster's gateway in the background.
fn start_load(plan: &Plan, cluster: &Cluster) -> tokio::task::JoinHandle<Report> {
    let plan = plan.clone();
    let request = mixed(cluster.gateway.url(""));
    tokio::spawn(async move { load::run(&plan, &client(), request).await })
}

fn mixed(gateway_url: String) -> impl Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder {
    move |client, n| {
        if n % 10 == 9 {
            client
                .post(format!("{gateway_url}/login"))
                .json(&serde_json::json!({ "user": format!("user{n}") }))
        } else {
            client.get(format!("{gateway_url}/work?ms=1"))
        }
    }
}

fn failed_of(report: &Report, method: &str) -> usize {
    report
        .samples
        .iter()
        .filter(|s| s.method == method && s.failure.is_some())
        .count()
}

async fn four_workers(gateway_env: &[(&str, &str)]) -> Cluster {
    Cluster::start(ClusterOptions {
        workers: 4,
        static_workers: false,
        gateway_env: gateway_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        // Quick drains keep the SIGTERM test short; they change nothing else.
        worker_env: vec![
            ("HERD_WORKER_DRAIN__MIN".into(), "1s".into()),
            ("HERD_WORKER_DRAIN__QUIET".into(), "300ms".into()),
        ],
    })
    .await
}

/// Waits until the gateway routes to all `n` workers (registry discovery done).
async fn wait_workers(cluster: &Cluster, n: usize) {
    let url = cluster.gateway.admin_url("/api/workers");
    let http = client();
    wait_until(
        Duration::from_secs(10),
        "the gateway knows every worker",
        || {
            let request = http.get(&url).bearer_auth(ADMIN_TOKEN).send();
            async move {
                let Ok(response) = request.await else {
                    return false;
                };
                let list: Value = response.json().await.unwrap_or_default();
                list.as_array().is_some_and(|l| {
                    l.iter()
                        .filter(|w| matches!(w["state"].as_str(), Some("healthy" | "slow_start")))
                        .count()
                        == n
                })
            }
        },
    )
    .await;
}

/// A worker's state in the admin API (`absent` when unknown).
async fn state_of(cluster: &Cluster, id: &str) -> String {
    let response = client()
        .get(cluster.gateway.admin_url("/api/workers"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await;
    let Ok(response) = response else {
        return "unreachable".into();
    };
    let list: Value = response.json().await.unwrap_or_default();
    list.as_array()
        .and_then(|l| l.iter().find(|w| w["id"] == id))
        .and_then(|w| w["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "absent".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_fails_no_get() {
    let _serial = SERIAL.lock().await;
    let mut cluster = four_workers(&[]).await;
    wait_workers(&cluster, 4).await;
    let plan = plan(4);
    let load = start_load(&plan, &cluster);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.worker("w2").kill9();
    let report = load.await.unwrap();
    println!("kill -9: {}", report.summary());
    // The load ran around the kill (closed-loop: a slow box sends fewer; docs/health.md saw
    // 73 % of the plan on a shared 2-core box).
    assert!(
        report.sent() as f64 >= plan.max_requests() as f64 * 0.5,
        "the load ran at ≥ 50 % of its rate: {}",
        report.summary()
    );
    assert_eq!(failed_of(&report, "GET"), 0, "{}", report.summary());
    let by_worker = report.by_worker();
    assert!(by_worker.len() >= 4, "{by_worker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_is_ejected_bounded_by_the_request_timeout_and_returns() {
    let _serial = SERIAL.lock().await;
    let request_timeout = Duration::from_secs(2);
    let mut cluster = four_workers(&[
        ("HERD_GATEWAY_TIMEOUTS__REQUEST", "2s"),
        ("HERD_GATEWAY_TIMEOUTS__RESPONSE_HEADER", "800ms"),
    ])
    .await;
    wait_workers(&cluster, 4).await;
    let plan = plan(5);
    let load = start_load(&plan, &cluster);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.worker("w3").signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let ejected_after = wait_until(Duration::from_secs(3), "the hung worker is out", || async {
        matches!(state_of(&cluster, "w3").await.as_str(), "down" | "ejected")
    })
    .await;
    let report = load.await.unwrap();
    cluster.worker("w3").signal(Signal::SIGCONT);
    println!(
        "SIGSTOP: out after {ejected_after:?}; failed GETs {} POSTs {}; {}",
        failed_of(&report, "GET"),
        failed_of(&report, "POST"),
        report.summary()
    );
    assert!(ejected_after <= Duration::from_secs(2), "{ejected_after:?}");
    // GETs that met the hung worker were retried elsewhere after `response_header`.
    assert_eq!(failed_of(&report, "GET"), 0, "{}", report.summary());
    // A POST caught by the stopped worker runs to the request timeout (docs/health.md: 2.12 s
    // of 2 s); without the timeout it would wait for SIGCONT, seconds later.
    assert!(
        report.max_latency() <= request_timeout + Duration::from_millis(1500),
        "no request waits longer than the request timeout: {}",
        report.summary()
    );
    // After SIGCONT it comes back after `rise` checks (2 × 500 ms) plus a little.
    let back = wait_until(Duration::from_secs(5), "the worker is back", || async {
        matches!(
            state_of(&cluster, "w3").await.as_str(),
            "healthy" | "slow_start"
        )
    })
    .await;
    println!(
        "SIGCONT: back after {back:?} (stopped {:?} in all)",
        stopped.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let mut cluster = four_workers(&[]).await;
    wait_workers(&cluster, 4).await;
    let plan = plan(5);
    let load = start_load(&plan, &cluster);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.worker("w1").signal(Signal::SIGTERM);
    let report = load.await.unwrap();
    println!("SIGTERM: {}", report.summary());
    assert_eq!(report.failed(), 0, "any method: {}", report.summary());
    let exit = cluster
        .worker("w1")
        .process
        .wait_exit(Duration::from_secs(15))
        .expect("the drained worker exits");
    assert!(exit.success(), "{exit:?}");
    wait_until(
        Duration::from_secs(5),
        "the left worker is gone",
        || async { state_of(&cluster, "w1").await == "absent" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_gets_traffic_within_a_second() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(ClusterOptions {
        workers: 3,
        static_workers: false,
        ..ClusterOptions::default()
    })
    .await;
    wait_workers(&cluster, 3).await;
    let events = EventLog::subscribe(&cluster.redis.url(), &cluster.prefix);
    let plan = plan(6);
    let load = start_load(&plan, &cluster);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.add_worker("w9");
    events.wait_for("join", "w9", Duration::from_secs(10)).await;
    let joined = Instant::now();
    let admin = cluster.gateway.admin_url("/api/workers");
    let took = wait_until(Duration::from_secs(3), "w9 served a request", || {
        let request = client().get(&admin).bearer_auth(ADMIN_TOKEN).send();
        async move {
            let Ok(response) = request.await else {
                return false;
            };
            let list: Value = response.json().await.unwrap_or_default();
            list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|w| w["id"] == "w9" && w["responses"]["2xx"].as_u64().unwrap_or(0) > 0)
            })
        }
    })
    .await;
    let report = load.await.unwrap();
    println!(
        "new worker: traffic {took:?} after its join ({:?} since); {}",
        joined.elapsed(),
        report.summary()
    );
    assert!(took <= Duration::from_secs(1), "{took:?}");
    assert!(
        report.by_worker().contains_key("w9"),
        "{:?}",
        report.by_worker()
    );
    assert_eq!(report.failed(), 0, "{}", report.summary());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_workers_gone_gives_503_json_at_once() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(ClusterOptions {
        workers: 2,
        static_workers: false,
        ..ClusterOptions::default()
    })
    .await;
    wait_workers(&cluster, 2).await;
    cluster.worker("w1").kill9();
    cluster.worker("w2").kill9();
    let http = client();
    let check = async |label: &str| {
        for _ in 0..5 {
            let started = Instant::now();
            let response = http
                .get(cluster.gateway.url("/work?ms=1"))
                .send()
                .await
                .unwrap();
            let elapsed = started.elapsed();
            assert_eq!(response.status(), 503, "{label}");
            assert!(elapsed < Duration::from_millis(500), "{label}: {elapsed:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "no_worker_available", "{label}: {body}");
            assert!(body["request_id"].is_string(), "{label}: {body}");
        }
    };
    // Right away (connections refused, retried, then refused) …
    check("just killed").await;
    // … and once the gateway knows (health checks, then the registry entries expire).
    let readyz = cluster.gateway.admin_url("/readyz");
    wait_until(Duration::from_secs(5), "the gateway is not ready", || {
        let request = http.get(&readyz).send();
        async move { matches!(request.await, Ok(r) if r.status() == 503) }
    })
    .await;
    check("detected").await;
    wait_until(
        Duration::from_secs(10),
        "the expired workers are removed",
        || async {
            state_of(&cluster, "w1").await == "absent" && state_of(&cluster, "w2").await == "absent"
        },
    )
    .await;
    check("removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterOptions {
        workers: 1,
        ..ClusterOptions::default()
    })
    .await;
    let http = client();
    let url = cluster.gateway.admin_url("/api/workers");
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let response = http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(response.status(), 401);
    let response = http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let list: Value = response.json().await.unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // The open endpoints need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = http
            .get(cluster.gateway.admin_url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_keeps_the_known_workers_serving() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(ClusterOptions {
        workers: 2,
        static_workers: false,
        ..ClusterOptions::default()
    })
    .await;
    wait_workers(&cluster, 2).await;
    cluster.redis.stop();
    // Longer than an entry's TTL (3 s) plus the missing grace (2 s): with Redis unreachable
    // nothing is removed, and requests that need no Redis keep flowing.
    let plan = Plan {
        rate: 50,
        duration: Duration::from_secs(6),
        concurrency: 4,
        timeout: Duration::from_secs(5),
    };
    let url = cluster.gateway.url("/work?ms=1");
    let report = load::run(&plan, &client(), move |client, _| client.get(&url)).await;
    println!("Redis down: {}", report.summary());
    assert_eq!(report.failed(), 0, "{}", report.summary());
    assert!(report.by_worker().len() == 2, "{:?}", report.by_worker());
    for id in ["w1", "w2"] {
        assert_ne!(state_of(&cluster, id).await, "absent", "{id} kept");
    }
    cluster.redis.start_again();
    cluster.wait_ready(Duration::from_secs(10)).await;
}
