//! The request path, in-process against small upstreams: headers, bodies, limits, errors.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herd_gateway::config::Algorithm;
use support::{Gateway, Upstream, client, get, send};

#[tokio::test]
async fn forwards_with_request_id_forwarding_headers_and_without_hop_by_hop() {
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |_| {}).await;
    let c = client();

    let answer = send(
        &c,
        "GET",
        &gw.url("/hello?x=1"),
        &[
            ("connection", "x-secret"),
            ("x-secret", "hidden"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-proto", "https"),
            ("x-request-id", "client.id_1-A"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.worker(), "w1", "x-herd-worker passes through");
    let seen = answer.json();
    let headers = &seen["headers"];
    assert_eq!(seen["path"], "/hello");
    assert_eq!(
        headers["x-request-id"], "client.id_1-A",
        "a sane id is kept"
    );
    assert_eq!(answer.headers["x-request-id"], "client.id_1-A");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(
        headers.get("x-secret").is_none(),
        "Connection-listed header stripped: {headers}"
    );
    assert!(headers.get("keep-alive").is_none());
    assert!(
        answer.headers.get("x-upstream-hop").is_none(),
        "hop-by-hop stripped from responses too"
    );

    // An insane id is replaced by a generated one, which the worker and the client both see.
    let answer = send(
        &c,
        "GET",
        &gw.url("/"),
        &[("x-request-id", "bad id;drop")],
        Bytes::new(),
    )
    .await;
    let id = answer.headers["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(id, "bad id;drop");
    assert_eq!(answer.json()["headers"]["x-request-id"], id.as_str());
    let other = get(&c, &gw.url("/")).await;
    assert_ne!(
        other.headers["x-request-id"].to_str().unwrap(),
        id,
        "ids are unique"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn round_robin_spreads_over_all_workers() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let w3 = Upstream::start("w3").await;
    let gw = Gateway::start(&[&w1, &w2, &w3], |c| {
        c.balancing.algorithm = Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
    })
    .await;
    let c = client();
    let mut seen = HashSet::new();
    for _ in 0..9 {
        seen.insert(get(&c, &gw.url("/")).await.worker());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    gw.shutdown().await;
}

#[tokio::test]
async fn p2c_default_uses_every_worker() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let gw = Gateway::start(&[&w1, &w2], |c| c.balancing.slow_start = Duration::ZERO).await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, &gw.url("/")).await.status, 200);
    }
    assert!(
        w1.hits() > 0 && w2.hits() > 0,
        "{} / {}",
        w1.hits(),
        w2.hits()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |c| c.retry.buffer_body_bytes = 1024).await;
    let c = client();
    // Over the retry buffer: streamed through.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let answer = send(&c, "POST", &gw.url("/echo"), &[], big.clone()).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.as_ref(), big.as_slice());
    // Under it: buffered, same result.
    let answer = send(&c, "PUT", &gw.url("/echo"), &[], &b"small"[..]).await;
    assert_eq!(answer.body.as_ref(), b"small");
    gw.shutdown().await;
}

#[tokio::test]
async fn big_body_gets_413_and_big_headers_431() {
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |c| {
        c.limits.max_body_bytes = 100_000;
        c.retry.buffer_body_bytes = 1000;
        c.limits.max_header_bytes = 4096;
    })
    .await;
    let c = client();
    let answer = send(&c, "POST", &gw.url("/echo"), &[], vec![0u8; 100_001]).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "payload_too_large");
    // The unread body is still coming: the connection closes (a client reusing it met the
    // close under its next request: 9 of 60 runs failed before).
    assert_eq!(answer.headers["connection"], "close");
    assert_eq!(w1.hits(), 0, "refused before reaching the worker");

    let big = "x".repeat(6000);
    let answer = send(
        &c,
        "GET",
        &gw.url("/"),
        &[("x-big", big.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 431);
    assert_eq!(answer.json()["error"], "headers_too_large");
    assert!(answer.json()["request_id"].is_string());
    gw.shutdown().await;
}

#[tokio::test]
async fn chunked_body_over_the_limit_gets_413() {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |c| {
        c.limits.max_body_bytes = 50_000;
        c.retry.buffer_body_bytes = 1000;
    })
    .await;
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from(vec![1u8; 5000]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let streaming: hyper_util::client::legacy::Client<_, StreamBody<_>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let request = hyper::Request::post(gw.url("/echo")).body(body).unwrap();
    let response = streaming.request(request).await.unwrap();
    assert_eq!(response.status(), 413);
    gw.shutdown().await;
}

/// A client that writes its whole upload before it reads (as many simple clients do) still
/// gets the 413: the gateway reads away the rest of the body before it closes. Closing with
/// unread bytes would make the kernel reset the connection, and the client would see a broken
/// pipe (seen in CI with the streaming test above).
#[tokio::test]
async fn a_client_that_uploads_everything_before_reading_gets_its_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |c| {
        c.limits.max_body_bytes = 50_000;
        c.retry.buffer_body_bytes = 1000;
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(gw.public).await.unwrap();
    let head = "POST /echo HTTP/1.1\r\nhost: gw\r\ntransfer-encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = [b"10000\r\n".as_slice(), &[1u8; 0x10000], b"\r\n"].concat();
    for _ in 0..128 {
        // 8 MiB: more than loopback's socket buffers hold, so without the gateway reading
        // them this write fails.
        stream.write_all(&chunk).await.expect("the upload was cut");
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    drop(stream);
    gw.shutdown().await;
}

#[tokio::test]
async fn no_worker_gives_503_json_at_once() {
    let gw = Gateway::start(&[], |_| {}).await;
    let c = client();
    let started = Instant::now();
    let answer = get(&c, &gw.url("/")).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(answer.status, 503);
    let json = answer.json();
    assert_eq!(json["error"], "no_worker_available");
    assert_eq!(
        json["request_id"],
        answer.headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(answer.headers["content-type"], "application/json");
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints_and_token() {
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |_| {}).await;
    let c = client();
    assert_eq!(get(&c, &gw.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&c, &gw.admin_url("/readyz")).await.status, 200);
    let answer = get(&c, &gw.admin_url("/api/workers")).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"], "unauthorized");
    let answer = send(
        &c,
        "POST",
        &gw.admin_url(&format!("/api/workers/{}/drain", w1.addr)),
        &[("authorization", "Bearer test-token")],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["state"], "drained");
    // Drained: no worker can take requests.
    assert_eq!(get(&c, &gw.url("/")).await.status, 503);
    assert_eq!(get(&c, &gw.admin_url("/readyz")).await.status, 503);
    let metrics = get(&c, &gw.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("herd_gateway_worker_state_changes_total"),
        "{text}"
    );
    assert!(
        text.contains("herd_gateway_errors_total{kind=\"no_worker_available\"} 1"),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn admin_without_configured_token_is_always_401() {
    let gw = Gateway::start(&[], |c| c.admin.token = String::new()).await;
    let answer = send(
        &client(),
        "GET",
        &gw.admin_url("/api/workers"),
        &[("authorization", "Bearer ")],
        Bytes::new(),
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"], "admin_token_not_configured");
    gw.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let w1 = Upstream::start("w1").await;
    w1.behavior
        .hang
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let gw = Gateway::start(&[&w1], |c| {
        c.timeouts.response_header = Duration::from_millis(800);
        c.retry.max_attempts = 1;
        c.health.interval = Duration::from_secs(60);
    })
    .await;
    let url = gw.url("/");
    let request = tokio::spawn(async move { get(&client(), &url).await });
    let id = w1.addr.to_string();
    support::wait_until(
        Duration::from_secs(2),
        "the request is in flight",
        || async { support::worker_field(&gw, &id, "in_flight").await == 1 },
    )
    .await;
    let started = Instant::now();
    gw.shutdown().await;
    let answer = request.await.unwrap();
    // The in-flight request was answered (its own timeout), not cut off.
    assert_eq!(answer.status, 504, "{:?}", answer.body);
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// CONNECT asks for a tunnel, a forward proxy's service: refused with the JSON error, never
/// forwarded (a worker's 2xx would leave the client waiting for a tunnel).
#[tokio::test]
async fn connect_is_refused_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.public)
        .await
        .unwrap();
    stream
        .write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("}") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .expect("answered within 10 s")
            .unwrap();
        assert!(read > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buffer[..read]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("CONNECT is not served"), "{answer}");
    assert_eq!(upstream.hits(), 0, "nothing reached the worker");
    let client = support::client();
    assert_eq!(support::get(&client, &gateway.url("/")).await.status, 200);
    gateway.shutdown().await;
}
