//! Whose fault is it (issue 14, items 1 and 2), in-process against real sockets:
//! - clients that abort or stall their uploads eject no worker, use no retry budget, and are
//!   counted as client errors (`client_closed_request`, 408);
//! - a request the worker may have received is never replayed: a worker that reads the head and
//!   part of a large body, then resets, costs a POST a 502 (the other worker never sees it),
//!   while a GET is retried elsewhere.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use support::{Gateway, Upstream, client, get, send, worker_state};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The gateway's `/metrics` text.
async fn metrics(gw: &Gateway) -> String {
    let answer = get(&client(), &gw.admin_url("/metrics")).await;
    String::from_utf8(answer.body.to_vec()).unwrap()
}

/// The value of the first metric line starting with `line_start` (0 when absent).
fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Sends the head of a POST declaring `length` bytes, then `sent` bytes of it; returns the
/// socket (the caller hangs up or stalls).
async fn start_upload(gateway: SocketAddr, length: usize, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'a'; sent]).await.unwrap();
    stream
}

#[tokio::test]
async fn clients_that_abort_their_uploads_eject_no_worker() {
    let w1 = Upstream::start("w1").await;
    let w2 = Upstream::start("w2").await;
    let gw = Gateway::start(&[&w1, &w2], |c| {
        // Health checks out of the way: only passive ejection could take the workers out.
        c.health.interval = Duration::from_secs(60);
        c.balancing.slow_start = Duration::ZERO;
        c.retry.budget_min_per_sec = 0;
    })
    .await;
    // The reported attack: start a 100 kB POST (streamed: over the 64 KiB buffer), send a few
    // hundred bytes, hang up. Three in a row ejected a worker; 24 here.
    for _ in 0..3 {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let public = gw.public;
                tokio::spawn(async move {
                    let stream = start_upload(public, 100_000, 300).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    drop(stream);
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in [&w1, &w2] {
        assert_eq!(worker_state(&gw, &w.addr.to_string()).await, "healthy");
    }
    let text = metrics(&gw).await;
    assert!(
        metric(
            &text,
            "herd_gateway_errors_total{kind=\"client_closed_request\"}"
        ) >= 20,
        "{text}"
    );
    assert_eq!(metric(&text, "herd_gateway_retries_total"), 0, "{text}");
    assert!(!text.contains("to=\"ejected\""), "{text}");
    assert_eq!(get(&client(), &gw.url("/")).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_stalled_upload_is_the_clients_timeout_not_the_workers() {
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |c| {
        c.health.interval = Duration::from_secs(60);
        c.balancing.slow_start = Duration::ZERO;
        // The worker's clock is short and the request's long: before the fix the worker was
        // charged with a timeout 300 ms into every stalled upload.
        c.timeouts.response_header = Duration::from_millis(300);
        c.timeouts.request = Duration::from_millis(1200);
    })
    .await;
    let stalled: Vec<_> = (0..4)
        .map(|_| {
            let public = gw.public;
            tokio::spawn(async move {
                let mut stream = start_upload(public, 100_000, 300).await;
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
                        .await;
                String::from_utf8_lossy(&answer).to_string()
            })
        })
        .collect();
    for client in stalled {
        let answer = client.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert_eq!(worker_state(&gw, &w1.addr.to_string()).await, "healthy");
    let text = metrics(&gw).await;
    assert_eq!(
        metric(&text, "herd_gateway_errors_total{kind=\"request_timeout\"}"),
        4,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "herd_gateway_worker_responses_total{worker=\"127.0.0.1"
        ),
        0,
        "no response counted against the worker: {text}"
    );
    gw.shutdown().await;
}

/// A scripted worker: reads each request's head and `body_prefix` bytes of its body, then resets
/// the connection (linger 0). Counts the requests it saw.
async fn resetting_worker(body_prefix: usize) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
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
                    if buffer.starts_with(b"GET /readyz") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        let _ = stream.write_all(ok).await;
                        buffer.drain(..end + 4);
                        continue;
                    }
                    if buffer.len() >= end + 4 + body_prefix {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_zero_linger();
                        return; // dropped: RST
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_request_that_may_have_reached_the_worker_is_not_replayed() {
    let (resetting, seen) = resetting_worker(1000).await;
    let good = Upstream::start("good").await;
    let gw = Gateway::start(&[&good], |c| {
        c.workers.insert(0, resetting.to_string());
        c.balancing.algorithm = herd_gateway::config::Algorithm::RoundRobin;
        c.balancing.slow_start = Duration::ZERO;
        c.health.passive.enabled = false;
        c.retry.budget_min_per_sec = 1000;
        // Kept whole, so replaying would be possible: only the rule stops it. 8 MiB is more
        // than the loopback socket buffers take, so the reset meets the gateway mid-write.
        c.retry.buffer_body_bytes = 16 * 1024 * 1024;
        c.limits.max_body_bytes = 16 * 1024 * 1024;
    })
    .await;
    let c = client();
    let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
    let mut failed = 0;
    let mut served = 0;
    for _ in 0..4 {
        let answer = send(&c, "POST", &gw.url("/echo"), &[], body.clone()).await;
        match answer.status {
            200 => {
                assert_eq!(answer.body.len(), body.len());
                served += 1;
            }
            502 => failed += 1,
            other => panic!("unexpected {other}: {:?}", answer.body),
        }
    }
    let reached_the_resetter = seen.load(Ordering::SeqCst);
    assert!(reached_the_resetter >= 1, "round robin sent some there");
    assert_eq!(
        failed, reached_the_resetter,
        "each one that reached it: 502"
    );
    assert_eq!(
        good.hits(),
        served,
        "the good worker saw no replayed POST (served {served}, failed {failed})"
    );
    // The same for a GET: retried on the good worker, the client sees 200.
    let before = seen.load(Ordering::SeqCst);
    for _ in 0..4 {
        let answer = send(&c, "GET", &gw.url("/echo"), &[], body.clone()).await;
        assert_eq!(answer.status, 200, "{:?}", answer.headers);
    }
    assert!(
        seen.load(Ordering::SeqCst) > before,
        "some GETs met the resetter"
    );
    gw.shutdown().await;
}
