//! The gateway's own HTTP/2 server (`herd_gateway::h2_server`), end to end: what hyper's server
//! did for the gateway before, checked through real sockets. Bodies larger than every
//! flow-control window both ways, answers given a `Date` and no hop-by-hop headers, a client
//! that stops answering pings, and a graceful stop with a request in flight.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::{Gateway, Upstream};

fn request(gateway: &Gateway, method: &str, path: &str, body: Bytes) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gateway.public))
        .body(Full::new(body))
        .unwrap()
}

/// 3 MiB up and back: over the gateway's 1 MiB receive windows (its reads must give the room
/// back) and over hyper's client's 2 MiB stream window (its sends must wait for room).
#[tokio::test]
async fn bodies_larger_than_every_window_cross_whole_both_ways() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.limits.max_body_bytes = 8 << 20;
    })
    .await;
    let (mut sender, _connection) = support::http2_connect(gateway.public).await;
    let sent: Bytes = (0..3 << 20)
        .map(|i: u32| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        sender.send_request(request(&gateway, "POST", "/echo", sent.clone())),
    )
    .await
    .expect("answered within 30 s")
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], "3145728");
    let received = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "the bytes came back changed");
    assert_eq!(upstream.hits(), 1);
    gateway.shutdown().await;
}

/// A client connection of the `h2` crate (frames under the test's control), ready to send, and
/// the task that drives it.
async fn h2_client(
    gateway: &Gateway,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let stream = tokio::net::TcpStream::connect(gateway.public)
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(stream).await.unwrap();
    let driver = tokio::spawn(connection);
    (sender.ready().await.unwrap(), driver)
}

/// A worker that answers every request (health checks too) with `answer`, as raw bytes.
async fn raw_upstream(answer: &'static [u8]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(read) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    head.extend_from_slice(&buffer[..read]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_answer_without_a_date_gets_one_and_hop_by_hop_headers_stay_behind() {
    let worker = raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=30\r\nx-hop: 1\r\nx-kept: yes\r\n\r\nok",
    )
    .await;
    let gateway = Gateway::start(&[], |config| {
        config.workers = vec![worker.to_string()];
    })
    .await;
    let (mut sender, _connection) = support::http2_connect(gateway.public).await;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(request(&gateway, "GET", "/", Bytes::new())),
    )
    .await
    .expect("answered within 10 s")
    .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let date = headers.get("date").expect("a Date the worker did not send");
    let parsed = httpdate::parse_http_date(date.to_str().unwrap()).expect("an HTTP date");
    let off = parsed
        .duration_since(std::time::SystemTime::now() - Duration::from_secs(60))
        .expect("not a minute old");
    assert!(off < Duration::from_secs(120), "{date:?}");
    for hop in ["connection", "keep-alive", "x-hop"] {
        assert!(
            !headers.contains_key(hop),
            "{hop} reached the client: {headers:?}"
        );
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["content-length"], "2");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok");
    gateway.shutdown().await;
}

/// A client that vanishes without closing (its machine gone) while its request is in flight:
/// not idle, so only the keep-alive pings notice. Its connection is closed and its worker
/// request cancelled within `client_idle` (a ping after half of it, the pong due within the
/// other half).
#[tokio::test]
async fn a_client_that_stops_answering_pings_loses_its_connection_and_its_request() {
    let upstream = Upstream::start("a").await;
    let worker = upstream.addr.to_string();
    let gateway = Gateway::start(&[&upstream], |config| {
        config.timeouts.client_idle = Duration::from_secs(2);
        config.timeouts.request = Duration::from_secs(60);
        config.timeouts.response_header = Duration::from_secs(60);
    })
    .await;
    upstream.behavior.slow_ms.store(30_000, Ordering::SeqCst);
    let stream = tokio::net::TcpStream::connect(gateway.public)
        .await
        .unwrap();
    let (mut sender, connection) = h2::client::handshake(stream).await.unwrap();
    // Drives the client's connection (reads, answers pings) until `frozen` says stop, and
    // again when it says go on.
    let (freeze, mut frozen) = tokio::sync::watch::channel(false);
    let driver = tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        loop {
            if *frozen.borrow_and_update() {
                if frozen.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            tokio::select! {
                ended = &mut connection => return Some(ended),
                _ = frozen.changed() => {}
            }
        }
    });
    let slow = http::Request::get(format!("http://{}/slow", gateway.public))
        .body(())
        .unwrap();
    let (answer, _) = sender.send_request(slow, true).unwrap();
    let in_flight = || async { support::worker_field(&gateway, &worker, "in_flight").await };
    support::wait_until(
        Duration::from_secs(5),
        "the request is at the worker",
        || async { in_flight().await == 1 },
    )
    .await;

    freeze.send(true).unwrap();
    let frozen_at = Instant::now();
    support::wait_until(
        Duration::from_secs(8),
        "the vanished client's worker request is cancelled",
        || async { in_flight().await == 0 },
    )
    .await;
    let cancelled_after = frozen_at.elapsed();
    assert!(
        cancelled_after >= Duration::from_millis(900),
        "cancelled {cancelled_after:?} after the client went quiet: before a ping was due"
    );
    // Back: the client finds its connection gone and its request failed.
    freeze.send(false).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the client's connection is over")
        .unwrap();
    assert!(ended.is_some());
    let answered = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("the request failed at once");
    assert!(answered.is_err(), "{answered:?}");
    println!("a client gone quiet: its worker request cancelled after {cancelled_after:?}");
    gateway.shutdown().await;
}

/// The gateway stopping: the request in flight finished and answered, then GOAWAY and the
/// connection's end.
#[tokio::test]
async fn a_stopping_gateway_finishes_the_http2_request_in_flight() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;
    upstream.behavior.slow_ms.store(1_000, Ordering::SeqCst);
    let (sender, connection) = support::http2_connect(gateway.public).await;
    let slow = request(&gateway, "GET", "/slow", Bytes::new());
    let mut slow_sender = sender.clone();
    let answer = tokio::spawn(async move { slow_sender.send_request(slow).await });
    support::wait_until(
        Duration::from_secs(5),
        "the request is at the worker",
        || async { upstream.hits() == 1 },
    )
    .await;
    let stopping = tokio::spawn(gateway.shutdown());
    let response = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered while the gateway stops")
        .unwrap()
        .expect("the request in flight is answered, not reset");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "{body:?}");
    // GOAWAY once it has no stream in flight: the connection ends with the gateway.
    drop(sender);
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection ends")
        .unwrap()
        .ok();
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("the gateway stops")
        .unwrap();
}

/// CONNECT over HTTP/2 (RFC 9113 §8.5) asks a proxy for a tunnel; the gateway is a reverse
/// proxy for its workers and opens none: refused with the gateway's JSON error, the
/// connection serving on.
#[tokio::test]
async fn connect_over_http2_is_refused_and_the_connection_serves_on() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;
    let (mut sender, driver) = h2_client(&gateway).await;
    let connect = http::Request::builder()
        .method("CONNECT")
        .uri("example.com:443")
        .body(())
        .unwrap();
    let (answer, _tunnel) = sender.send_request(connect, false).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered within 10 s")
        .unwrap();
    println!("CONNECT over HTTP/2: {}", answer.status());
    assert!(answer.status().is_client_error(), "{}", answer.status());
    let mut body = answer.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let error: serde_json::Value = serde_json::from_slice(&bytes).expect("the JSON error");
    assert!(error["error"].is_string(), "{error}");
    assert_eq!(upstream.hits(), 0, "nothing reached the worker");

    let mut sender = sender.ready().await.unwrap();
    let get = http::Request::get(format!("http://{}/", gateway.public))
        .body(())
        .unwrap();
    let (answer, _) = sender.send_request(get, true).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("answered within 10 s")
        .unwrap();
    assert_eq!(answer.status(), 200);
    drop(sender);
    driver.abort();
    gateway.shutdown().await;
}

/// An HTTP/2 client that gives up on its upload midway (RST_STREAM CANCEL) went away: counted
/// as `client_closed_request` (the client's doing), its worker request cancelled, the worker
/// neither blamed nor retried.
#[tokio::test]
async fn an_upload_the_client_resets_midway_is_the_clients_doing() {
    let upstream = Upstream::start("a").await;
    let worker = upstream.addr.to_string();
    let gateway = Gateway::start(&[&upstream], |config| {
        config.balancing.slow_start = Duration::ZERO;
        config.timeouts.request = Duration::from_secs(60);
        config.timeouts.response_header = Duration::from_secs(60);
    })
    .await;
    let (mut sender, driver) = h2_client(&gateway).await;
    let upload = http::Request::post(format!("http://{}/upload", gateway.public))
        .header("content-length", "400000")
        .body(())
        .unwrap();
    let (answer, mut body) = sender.send_request(upload, false).unwrap();
    // Past the 64 KiB the gateway buffers: the body streams to the worker.
    body.send_data(Bytes::from(vec![b'x'; 200_000]), false)
        .unwrap();
    let in_flight = || async { support::worker_field(&gateway, &worker, "in_flight").await };
    support::wait_until(
        Duration::from_secs(5),
        "the upload streams to the worker",
        || async { in_flight().await == 1 },
    )
    .await;
    body.send_reset(h2::Reason::CANCEL);
    support::wait_until(
        Duration::from_secs(5),
        "the reset upload's worker request is cancelled",
        || async { in_flight().await == 0 },
    )
    .await;
    drop(answer);
    let metrics = support::get(&support::client(), &gateway.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    let count = |start: &str| {
        text.lines()
            .find(|line| line.starts_with(start))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        count("herd_gateway_errors_total{kind=\"client_closed_request\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(count("herd_gateway_retries_total"), 0.0, "{text}");
    assert_eq!(support::worker_state(&gateway, &worker).await, "healthy");
    driver.abort();
    gateway.shutdown().await;
}
