//! OpenTelemetry end to end: a real OTLP/HTTP receiver gets one trace whose spans cross
//! client → gateway (request, attempts, one of them retried after a worker reset it) → worker →
//! Redis, with the right parent/child links; and with the collector down every request is still
//! answered.

use std::collections::HashMap;
use std::time::Duration;

use herd_tests::gateway::{GatewayOptions, TestGateway};
use herd_tests::otlp::{ReceivedSpan, Receiver};
use herd_tests::redis::TestRedis;
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{cookie, plain_client, set_session_cookie};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A "worker" that answers health checks but resets the connection of every other request.
async fn resetting_worker() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                if text.starts_with("GET /readyz") || text.starts_with("GET /healthz") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                } else {
                    // Reset: the request reached a worker that died on it.
                    let _ = stream.set_zero_linger();
                }
            });
        }
    });
    (addr, task)
}

fn tracing_env(prefix: &str, endpoint: &str) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}_TRACING__ENABLED"), "true".into()),
        (format!("{prefix}_TRACING__ENDPOINT"), endpoint.into()),
        // Export within 100 ms instead of 5 s, so the test need not wait.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]
}

fn by_id(spans: &[ReceivedSpan]) -> HashMap<&str, &ReceivedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_crosses_gateway_worker_and_redis_with_a_retried_attempt() {
    let receiver = Receiver::start().await;
    let dir = herd_tests::temp_dir();
    let redis = TestRedis::start();
    let prefix = herd_tests::unique_prefix();
    let mut options = WorkerOptions::new("w1", redis.url(), &prefix);
    options.registry = false;
    // The worker is configured by the standard variables only.
    options.env.extend([
        ("HERD_WORKER_TRACING__ENABLED".into(), "true".into()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
        ("OTEL_SERVICE_NAME".into(), "worker-w1".into()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]);
    let worker = TestWorker::start(&options, dir.path());
    let (resetter, resetter_task) = resetting_worker().await;
    let mut gateway_options = GatewayOptions {
        workers: vec![resetter, worker.addr],
        ..GatewayOptions::default()
    }
    .env("HERD_GATEWAY_BALANCING__ALGORITHM", "round_robin")
    // The retry's log line ("retrying on another worker") is a debug line.
    .env("HERD_LOG", "info,herd_gateway::proxy=debug");
    gateway_options
        .env
        .extend(tracing_env("HERD_GATEWAY", &receiver.endpoint()));
    let gateway = TestGateway::start(&gateway_options, dir.path());
    let client = plain_client();

    // A session, made at the worker directly (a POST is not retried after a reset).
    let login = client
        .post(worker.url("/login"))
        .json(&serde_json::json!({ "user": "ann" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let session = set_session_cookie(&login).expect("session cookie");

    // GET /cart through the gateway, each with a client trace, until one was retried (round
    // robin sends every other first attempt to the resetting worker).
    let client_span = "00f067aa0ba902b7";
    let mut traces = Vec::new();
    for n in 0..6u32 {
        let trace_id = format!("4bf92f3577b34da6a3ce929d{n:08x}");
        let response = client
            .get(gateway.url("/cart"))
            .header("cookie", cookie(&session))
            .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {n}");
        traces.push(trace_id);
    }

    // Wait for a trace with two gateway attempts and the worker's Redis load in it.
    let mut retried = None;
    herd_tests::wait_until(Duration::from_secs(15), "a retried trace", || {
        let spans = receiver.spans();
        retried = traces.iter().find_map(|trace| {
            let spans: Vec<_> = spans
                .iter()
                .filter(|s| &s.trace_id == trace)
                .cloned()
                .collect();
            let attempts = spans.iter().filter(|s| s.name == "gateway attempt").count();
            let load = spans.iter().any(|s| s.name == "redis session.load");
            (attempts == 2 && load).then_some(spans)
        });
        let found = retried.is_some();
        async move { found }
    })
    .await;
    let spans = retried.unwrap();
    let ids = by_id(&spans);

    let request = spans
        .iter()
        .find(|s| s.name.ends_with("gateway") && s.service == "herd-gateway")
        .unwrap_or_else(|| panic!("no gateway request span in {spans:#?}"));
    assert_eq!(
        request.parent_span_id, client_span,
        "the client's span is the parent"
    );
    assert!(
        request
            .attribute("request_id")
            .is_some_and(|id| !id.is_empty())
    );

    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "gateway attempt")
        .collect();
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, request.span_id, "{attempt:#?}");
    }
    let failed = attempts
        .iter()
        .find(|a| {
            a.attribute("herd.worker")
                .is_some_and(|w| w.contains(&resetter.port().to_string()))
        })
        .unwrap_or_else(|| panic!("no attempt at the resetting worker: {attempts:#?}"));
    assert!(
        failed
            .attribute("herd.outcome")
            .is_some_and(|o| !o.is_empty()),
        "{failed:#?}"
    );
    let retry = attempts
        .iter()
        .find(|a| a.span_id != failed.span_id)
        .unwrap();
    assert!(
        retry
            .attribute("herd.retry_reason")
            .is_some_and(|r| !r.is_empty()),
        "{retry:#?}"
    );
    assert_eq!(retry.attribute("http.response.status_code"), Some("200"));

    let served = spans
        .iter()
        .find(|s| s.service == "worker-w1" && s.name == "GET /cart")
        .unwrap_or_else(|| panic!("no worker span in {spans:#?}"));
    assert_eq!(
        served.parent_span_id, retry.span_id,
        "the worker's span hangs under the attempt that reached it"
    );
    let load = spans
        .iter()
        .find(|s| s.name == "redis session.load")
        .unwrap();
    assert_eq!(load.parent_span_id, served.span_id);
    assert_eq!(load.attribute("outcome"), Some("found"));
    assert!(ids.contains_key(load.parent_span_id.as_str()));

    // The gateway's log line about the retry leads to the trace: it carries the trace id and
    // the request id.
    let log = std::fs::read_to_string(gateway.process.log_path()).unwrap();
    let line = log
        .lines()
        .find(|line| {
            line.contains("retrying on another worker") && line.contains(&request.trace_id)
        })
        .unwrap_or_else(|| {
            panic!(
                "no retry log line with trace id {} in:\n{log}",
                request.trace_id
            )
        });
    let request_id = request.attribute("request_id").unwrap();
    assert!(line.contains(request_id), "{line}");

    // The login's trace (started at the worker): the save and its compare-and-set attempt.
    let all = receiver.spans();
    let save = all
        .iter()
        .find(|s| s.name == "redis session.save")
        .unwrap_or_else(|| panic!("no save span in {all:#?}"));
    assert_eq!(save.attribute("outcome"), Some("saved"));
    let session_save = all
        .iter()
        .find(|s| s.span_id == save.parent_span_id)
        .unwrap();
    assert_eq!(session_save.name, "session save");
    let login_span = all
        .iter()
        .find(|s| s.span_id == session_save.parent_span_id)
        .unwrap();
    assert_eq!(login_span.name, "POST /login");
    assert!(
        login_span.parent_span_id.is_empty(),
        "a trace started at the worker"
    );
    resetter_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_spans_are_lost_but_no_request() {
    // A port nothing listens on: bound without listen() and held to the end, so connections to it
    // are refused and no other socket (a Redis, or a source port the kernel hands out) can take it.
    // (A port freed at once can be handed out again while the test runs: one CI run saw the
    // worker's Redis connection reset when the first span export went out.)
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    let endpoint = format!("http://{closed}");
    let dir = herd_tests::temp_dir();
    let redis = TestRedis::start();
    let prefix = herd_tests::unique_prefix();
    let mut options = WorkerOptions::new("w1", redis.url(), &prefix);
    options.registry = false;
    options.env.extend(tracing_env("HERD_WORKER", &endpoint));
    // The worker exports over gRPC, the gateway over HTTP: neither transport may hold a request.
    options
        .env
        .push(("HERD_WORKER_TRACING__PROTOCOL".into(), "grpc".into()));
    let worker = TestWorker::start(&options, dir.path());
    let mut gateway_options = GatewayOptions {
        workers: vec![worker.addr],
        ..GatewayOptions::default()
    };
    gateway_options
        .env
        .extend(tracing_env("HERD_GATEWAY", &endpoint));
    let gateway = TestGateway::start(&gateway_options, dir.path());
    let client = plain_client();
    let login = client
        .post(gateway.url("/login"))
        .json(&serde_json::json!({ "user": "bob" }))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let session = set_session_cookie(&login).expect("session cookie");
    // Spans of 200 requests, exported every 100 ms to nowhere, while the requests go on.
    for n in 0..200 {
        let response = client
            .get(gateway.url("/cart"))
            .header("cookie", cookie(&session))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "request {n}");
    }
}
