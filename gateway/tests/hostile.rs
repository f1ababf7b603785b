//! Hostile clients against an in-process gateway, over raw sockets: trickled heads and silent
//! connections are cut by the head timeout while idle keep-alive connections wait for the idle
//! one; thousands of trickling connections don't stop normal requests; malformed framing is
//! refused before any worker sees it; one address can't take every connection; a client that
//! stops reading is cut and its worker connection freed.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::{Gateway, Upstream, client, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Sends `raw` and reads everything until the gateway closes the connection (at most 5 s).
async fn exchange(gateway: &Gateway, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(gateway.public).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .is_ok();
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(closed, "the gateway closes the connection: {text}");
    text
}

/// One keep-alive GET on `stream`; the response head and body as text.
async fn request(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("a response within 5 s")
            .unwrap_or(0);
        response.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&response).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        if read == 0 {
            return text;
        }
    }
}

/// How long until the gateway closes `stream` (reading whatever comes), at most `limit`.
async fn closed_after(stream: &mut TcpStream, since: Instant, limit: Duration) -> Duration {
    let mut sink = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut sink))
        .await
        .expect("closed by the gateway in time")
        .ok();
    since.elapsed()
}

async fn worker_in_flight(gateway: &Gateway, id: &str) -> u64 {
    support::worker_field(gateway, id, "in_flight")
        .await
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test]
async fn silent_and_trickling_heads_are_cut_after_the_head_timeout_idle_connections_later() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.timeouts.request_head = Duration::from_secs(1);
        config.timeouts.client_idle = Duration::from_secs(3);
    })
    .await;

    // Connects and sends nothing (hyper-util's protocol sniffing used to wait forever).
    let started = Instant::now();
    let mut silent = TcpStream::connect(gateway.public).await.unwrap();
    // Sends a header line every 200 ms: never a whole head.
    let mut trickler = TcpStream::connect(gateway.public).await.unwrap();
    let (mut reader, mut writer) = trickler.split();
    let trickle = async {
        writer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        for line in 0..25 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let header = format!("x-trickle-{line}: 1\r\n");
            if writer.write_all(header.as_bytes()).await.is_err() {
                break;
            }
        }
    };
    let mut sink = Vec::new();
    let cut = async {
        tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut sink))
            .await
            .expect("the trickler is cut within 5 s")
            .ok();
        started.elapsed()
    };
    let trickler_cut = tokio::select! {
        elapsed = cut => elapsed,
        () = trickle => panic!("the trickler sent 25 lines over 5 s without being cut"),
    };
    let silent_cut = closed_after(&mut silent, started, Duration::from_secs(5)).await;
    for (what, elapsed) in [("silent", silent_cut), ("trickling", trickler_cut)] {
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500),
            "{what} connection cut after {elapsed:?}, not about 1 s"
        );
    }
    assert_eq!(upstream.hits(), 0);

    // An idle keep-alive connection outlives the head timeout and is closed after the idle one.
    let mut keep_alive = TcpStream::connect(gateway.public).await.unwrap();
    assert!(request(&mut keep_alive).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        request(&mut keep_alive).await.starts_with("HTTP/1.1 200"),
        "still open after 1.5 s idle"
    );
    let idle_cut = closed_after(&mut keep_alive, Instant::now(), Duration::from_secs(6)).await;
    assert!(
        idle_cut >= Duration::from_millis(2500),
        "idle connection closed after {idle_cut:?}, before client_idle (3 s)"
    );
    gateway.shutdown().await;
}

/// Latencies of `count` GETs, one every `every`, on one keep-alive client.
async fn latencies(gateway: &Gateway, count: usize, every: Duration) -> Vec<Duration> {
    let client = client();
    let mut took = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let answer = get(&client, &gateway.url("/")).await;
        assert_eq!(answer.status, 200);
        took.push(started.elapsed());
        tokio::time::sleep(every).await;
    }
    took.sort();
    took
}

/// Sends one more byte of a head that never ends; false once the gateway has closed `stream`.
fn trickle_one_byte(stream: &mut std::net::TcpStream) -> bool {
    use std::io::{ErrorKind, Read, Write};
    let mut probe = [0u8; 64];
    match stream.read(&mut probe) {
        Ok(0) => return false,
        Err(error) if error.kind() != ErrorKind::WouldBlock => return false,
        _ => {}
    }
    match stream.write(b"x") {
        Ok(written) => written == 1,
        Err(error) => error.kind() == ErrorKind::WouldBlock,
    }
}

#[tokio::test]
async fn thousands_of_trickling_connections_do_not_stop_normal_requests() {
    const TRICKLERS: usize = 2000;
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.threads = 2;
        // Long enough for the measuring below (200 requests 10 ms apart, ~2.5 s on a quiet box)
        // to finish while every trickler is still there, also on a busy one.
        config.timeouts.request_head = Duration::from_secs(8);
        config.limits.max_connections_per_client = 0;
    })
    .await;
    let quiet = latencies(&gateway, 100, Duration::from_millis(10)).await;

    // The tricklers run on a thread of their own, so that their 8000 system calls a second don't
    // delay the measuring client's event loop.
    let open = Arc::new(AtomicU64::new(0));
    let still_open = open.clone();
    let public = gateway.public;
    let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
    let trickle = std::thread::spawn(move || {
        let mut tricklers = Vec::with_capacity(TRICKLERS);
        for _ in 0..TRICKLERS {
            let mut stream = std::net::TcpStream::connect(public).unwrap();
            std::io::Write::write_all(&mut stream, b"GET / HTTP/1.1\r\n").unwrap();
            stream.set_nonblocking(true).unwrap();
            tricklers.push(stream);
        }
        still_open.store(TRICKLERS as u64, Ordering::Relaxed);
        let _ = opened_tx.send(Instant::now());
        // One byte per connection every 250 ms, for at most 15 s.
        let mut alive = vec![true; tricklers.len()];
        for _ in 0..60 {
            for (stream, alive) in tricklers.iter_mut().zip(alive.iter_mut()) {
                if *alive && !trickle_one_byte(stream) {
                    *alive = false;
                }
            }
            let count = alive.iter().filter(|a| **a).count() as u64;
            still_open.store(count, Ordering::Relaxed);
            if count == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let opened = opened_rx.await.expect("the tricklers connected");
    let loaded = latencies(&gateway, 200, Duration::from_millis(10)).await;
    let measured_within = opened.elapsed();
    assert!(
        open.load(Ordering::Relaxed) > (TRICKLERS as u64) * 9 / 10,
        "the tricklers were still there while measuring"
    );
    tokio::task::spawn_blocking(move || trickle.join().unwrap())
        .await
        .unwrap();
    let cut_after = opened.elapsed();
    assert_eq!(open.load(Ordering::Relaxed), 0, "every trickler cut");
    let figure = |took: &[Duration]| {
        format!(
            "p50 {:?}, p99 {:?}, max {:?}",
            took[took.len() / 2],
            took[took.len() * 99 / 100],
            took[took.len() - 1]
        )
    };
    println!(
        "without tricklers: {}; with {TRICKLERS} trickling connections: {} (measured within {measured_within:?}); all cut after {cut_after:?}",
        figure(&quiet),
        figure(&loaded),
    );
    assert!(
        loaded[loaded.len() - 1] < Duration::from_secs(1),
        "{}",
        figure(&loaded)
    );
    assert!(
        cut_after < Duration::from_secs(13),
        "cut after {cut_after:?} (the head timeout is 8 s)"
    );
    gateway.shutdown().await;
}

#[tokio::test]
async fn an_http11_request_needs_exactly_one_host() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;

    for raw in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let answer = request_answer(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "bad_request", "{answer}");
        let id = json["request_id"].as_str().unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("x-request-id: {id}")),
            "{answer}"
        );
        assert!(json["message"].as_str().unwrap().contains("Host"), "{body}");
    }
    // HTTP/1.0 predates Host: forwarded.
    let answer = exchange(&gateway, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert_eq!(
        upstream.hits(),
        1,
        "only the HTTP/1.0 request reached the worker"
    );
    gateway.shutdown().await;
}

/// Reads one response (head and Content-Length body) from `stream`.
async fn request_answer(stream: &mut TcpStream) -> String {
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("an answer within 5 s")
            .unwrap_or(0);
        response.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&response).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|line| line.strip_prefix("content-length: ").map(str::to_owned))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        assert!(read > 0, "closed before a whole answer: {text}");
    }
}

#[tokio::test]
async fn a_head_no_server_may_take_gets_a_json_400_saying_what_is_wrong() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;

    let cases: [(&[u8], &str); 7] = [
        (
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: abc\r\n\r\nabc",
            "Content-Length is not a number",
        ),
        (
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            "two Content-Length headers that differ",
        ),
        (b"HELLO\r\n\r\n", "request line is malformed"),
        (b"GET /\r\nhost: a\r\n\r\n", "request line is malformed"),
        (b"GET / HTTP/x\r\nhost: a\r\n\r\n", "HTTP version"),
        (b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n", "header name"),
        // After a request served on the same connection.
        (
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nx: a\x01b\r\n\r\n",
            "control character",
        ),
    ];
    for (raw, problem) in cases {
        let answer = exchange(&gateway, raw).await;
        // The last answer on the connection: after a served request, the 400 comes second.
        let start = answer.rfind("HTTP/1.1 ").unwrap();
        let last = &answer[start..];
        assert!(last.starts_with("HTTP/1.1 400"), "{answer}");
        let (head, body) = last.split_once("\r\n\r\n").unwrap();
        let head = head.to_ascii_lowercase();
        assert!(head.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(head.contains("content-type: application/json"), "{answer}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "bad_request", "{answer}");
        assert!(
            json["message"].as_str().unwrap().contains(problem),
            "{body}"
        );
        let id = json["request_id"].as_str().unwrap();
        assert!(head.contains(&format!("x-request-id: {id}")), "{answer}");
    }
    assert_eq!(
        upstream.hits(),
        1,
        "only the one good request reached a worker"
    );
    let metrics = get(&client(), &gateway.admin_url("/metrics")).await;
    let metrics = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        metrics.contains("herd_gateway_errors_total{kind=\"bad_request\"} 7"),
        "{metrics}"
    );
    // What hyper judges stays hyper's: the same length twice is one length.
    let answer = exchange(
        &gateway,
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |_| {}).await;

    for raw in [
        &b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n",
        // Behind a request without a body, in the same packet.
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\nPOST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ] {
        let answer = exchange(&gateway, raw).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains(r#""error":"bad_request""#)
                && answer.contains("Transfer-Encoding"),
            "{answer}"
        );
        assert!(!answer.contains(" 200 "), "{answer}");
    }
    assert_eq!(upstream.hits(), 0, "no worker saw any of them");
    // A plain chunked request still goes through.
    let answer = exchange(
        &gateway,
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gateway.shutdown().await;
}

#[tokio::test]
async fn one_address_over_its_connection_cap_gets_429_and_a_closed_slot_frees() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.threads = 2;
        config.limits.max_connections_per_client = 3;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        assert!(request(&mut stream).await.starts_with("HTTP/1.1 200"));
        held.push(stream);
    }

    let mut over = TcpStream::connect(gateway.public).await.unwrap();
    let response = request(&mut over).await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    let lower = response.to_ascii_lowercase();
    assert!(lower.contains("connection: close"), "{response}");
    assert!(
        lower.contains("content-type: application/json"),
        "{response}"
    );
    assert!(
        response.contains(r#""error":"too_many_connections_from_client""#),
        "{response}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the refused connection is closed"
    );
    let metrics = get(&client(), &gateway.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("herd_gateway_connections_refused_per_client_total 1"),
        "{text}"
    );

    // The held connections still work, and a closed one's slot is taken again.
    assert!(request(&mut held[0]).await.starts_with("HTTP/1.1 200"));
    drop(held.pop());
    support::wait_until(Duration::from_secs(5), "a slot freed", || async {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        request(&mut stream).await.starts_with("HTTP/1.1 200")
    })
    .await;
    gateway.shutdown().await;
}

/// A worker that answers `/readyz` with 200 and anything else with `size` bytes, written until
/// the gateway stops taking them; `cut` is set when a write fails.
async fn bulk_worker(size: usize, cut: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let Ok(read) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..read]);
                    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_string();
                    buffer.drain(..end + 4);
                    if head.starts_with("GET /readyz") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                    stream.write_all(head.as_bytes()).await.unwrap();
                    let block = vec![b'x'; 64 * 1024];
                    let mut left = size;
                    while left > 0 {
                        let part = left.min(block.len());
                        if stream.write_all(&block[..part]).await.is_err() {
                            cut.store(true, Ordering::SeqCst);
                            return;
                        }
                        left -= part;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_its_worker_connection_freed() {
    let cut = Arc::new(AtomicBool::new(false));
    let worker = bulk_worker(64 << 20, cut.clone()).await.to_string();
    let gateway = Gateway::start(&[], |config| {
        config.workers = vec![worker.clone()];
        config.timeouts.client_send = Duration::from_secs(1);
    })
    .await;

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut reader = socket.connect(gateway.public).await.unwrap();
    reader
        .write_all(b"GET /big HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    // It reads nothing: the response fills the buffers and the gateway's writes wait.
    support::wait_until(
        Duration::from_secs(5),
        "the response is in flight",
        || async { worker_in_flight(&gateway, &worker).await == 1 },
    )
    .await;
    let stalled = Instant::now();
    support::wait_until(
        Duration::from_secs(10),
        "the worker's in-flight count is back to 0",
        || async { worker_in_flight(&gateway, &worker).await == 0 },
    )
    .await;
    let freed_after = stalled.elapsed();
    support::wait_until(
        Duration::from_secs(10),
        "the worker's connection is closed",
        || async { cut.load(Ordering::SeqCst) },
    )
    .await;
    assert!(
        freed_after >= Duration::from_millis(500),
        "freed after {freed_after:?}, before the send timeout"
    );
    // The client gets what was buffered, then the end: far less than the 64 MiB.
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut received)).await;
    println!(
        "client_send 1 s: worker freed {freed_after:?} after the response was in flight; the client got {} of 64 MiB",
        received.len()
    );
    assert!(received.len() < 32 << 20, "{} bytes", received.len());
    gateway.shutdown().await;
}

#[tokio::test]
async fn http2_connections_are_served_then_closed_when_idle_and_never_scanned_as_heads() {
    use http_body_util::{BodyExt, Full};
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.timeouts.request_head = Duration::from_millis(500);
        config.timeouts.client_idle = Duration::from_secs(2);
    })
    .await;
    let (mut sender, connection) = support::http2_connect(gateway.public).await;
    // A body that looks like a conflicting HTTP/1.1 head must not matter on HTTP/2.
    let lookalike = "x\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut quiet = Instant::now();
    for round in 0..4 {
        let request = http::Request::post(format!("http://{}/echo", gateway.public))
            .body(Full::new(bytes::Bytes::from(lookalike)))
            .unwrap();
        quiet = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, lookalike.as_bytes());
        // Longer than request_head between requests: an HTTP/2 connection waits for client_idle.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), connection)
        .await
        .expect("the idle HTTP/2 connection is closed");
    // Timed from before the last request (the connection is idle from its answer on): a slow
    // box can only make it longer. Closed by request_head (500 ms), it would be well under 1.5 s.
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "closed after {after:?} idle, well before client_idle (2 s)"
    );
    assert_eq!(upstream.hits(), 4);
    gateway.shutdown().await;
}

/// hyper's own header read timer (30 s by default) once cut every idle keep-alive connection
/// after 30 s, whatever `timeouts.client_idle` said (found by `herd bench soak`).
#[tokio::test]
async fn an_idle_keep_alive_connection_lives_for_client_idle_not_hypers_30_s() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.timeouts.client_idle = Duration::from_secs(40);
    })
    .await;
    let mut keep_alive = TcpStream::connect(gateway.public).await.unwrap();
    assert!(request(&mut keep_alive).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(32)).await;
    assert!(
        request(&mut keep_alive).await.starts_with("HTTP/1.1 200"),
        "the connection was cut after 32 s idle, before client_idle (40 s)"
    );
    gateway.shutdown().await;
}
