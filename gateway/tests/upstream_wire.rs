//! The gateway's HTTP/1.1 client against workers that answer with exact bytes: every framing a
//! worker may use, keep-alive reuse, idle connections the worker closes, and broken answers.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use support::{Gateway, client, send};

/// Requests a scripted worker saw: head and body.
type Seen = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// What a scripted worker does with one request (health checks are answered by the harness).
#[derive(Clone, Copy)]
enum Script {
    /// Writes these pieces, with a pause between them, then keeps the connection.
    Pieces(&'static [&'static [u8]]),
    /// Writes these bytes and closes the connection.
    ThenClose(&'static [u8]),
    /// Writes these bytes over and over, 64 KiB at a time, for up to 10 s or until the
    /// connection breaks.
    Flood(&'static [u8]),
    /// Writes these pieces (made at run time: long answers), with a pause between them, then
    /// closes the connection when the flag says so.
    Made(&'static LazyLock<Vec<Vec<u8>>>, bool),
    /// Writes these bytes (after the second duration) and keeps the connection; a request that
    /// comes after it was idle for the first gets no answer: the connection closes (the worker
    /// closed it idle as the request was on its way).
    IdleClose(&'static [u8], Duration, Duration),
}

/// A worker speaking raw HTTP/1.1: `answer(path) -> Script`.
struct RawWorker {
    addr: std::net::SocketAddr,
    /// Connections whose first request was not a health check.
    request_connections: Arc<AtomicU64>,
    /// Requests seen (health checks excluded), with their head and body.
    seen: Seen,
    task: JoinHandle<()>,
}

impl Drop for RawWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const READY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl RawWorker {
    async fn start(answer: fn(&str) -> Script) -> RawWorker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request_connections = Arc::new(AtomicU64::new(0));
        let seen: Seen = Arc::default();
        let (count, log) = (request_connections.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (count, log) = (count.clone(), log.clone());
                tokio::spawn(async move { serve(stream, answer, count, log).await });
            }
        });
        RawWorker {
            addr,
            request_connections,
            seen,
            task,
        }
    }

    fn requests(&self) -> Vec<(String, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    answer: fn(&str) -> Script,
    count: Arc<AtomicU64>,
    log: Seen,
) {
    let mut buffer = Vec::new();
    let mut first = true;
    let mut answered = tokio::time::Instant::now();
    loop {
        let Some((head, body)) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        if path == "/readyz" {
            if stream.write_all(READY).await.is_err() {
                return;
            }
            continue;
        }
        let first_request = first;
        if first {
            count.fetch_add(1, Ordering::SeqCst);
            first = false;
        }
        log.lock().unwrap().push((head, body));
        match answer(&path) {
            Script::Pieces(pieces) => {
                for piece in pieces {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Script::ThenClose(bytes) => {
                let _ = stream.write_all(bytes).await;
                return;
            }
            Script::Made(pieces, close) => {
                for piece in pieces.iter() {
                    if stream.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if close {
                    return;
                }
            }
            Script::IdleClose(bytes, idle, delay) => {
                if !first_request && answered.elapsed() >= idle {
                    return;
                }
                tokio::time::sleep(delay).await;
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
                answered = tokio::time::Instant::now();
            }
            Script::Flood(bytes) => {
                let batch = bytes.repeat(64 * 1024 / bytes.len());
                let until = tokio::time::Instant::now() + Duration::from_secs(10);
                while tokio::time::Instant::now() < until {
                    if stream.write_all(&batch).await.is_err() {
                        return;
                    }
                }
                return;
            }
        }
    }
}

/// Reads one request (head, and a content-length or chunked body) off the connection.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            buffer.drain(..end + 4);
            let lower = head.to_ascii_lowercase();
            let body = if let Some(length) = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                let length: usize = length.trim().parse().unwrap();
                while buffer.len() < length {
                    read_more(stream, buffer).await?;
                }
                buffer.drain(..length).collect()
            } else if lower.contains("transfer-encoding: chunked") {
                while !buffer.windows(5).any(|w| w == b"0\r\n\r\n") {
                    read_more(stream, buffer).await?;
                }
                let end = buffer.windows(5).position(|w| w == b"0\r\n\r\n").unwrap() + 5;
                buffer.drain(..end).collect()
            } else {
                Vec::new()
            };
            return Some((head, body));
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

async fn gateway_over(worker: &RawWorker) -> Gateway {
    let addr = worker.addr.to_string();
    Gateway::start(&[], move |c| {
        c.workers = vec![addr];
        c.retry.buffer_body_bytes = 1024;
    })
    .await
}

#[tokio::test]
async fn every_response_framing_reaches_the_client_whole() {
    let worker = RawWorker::start(|path| match path {
        "/chunked" => Script::Pieces(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6;ext=1\r\n world\r\n",
            b"0\r\nx-trailer: t\r\n\r\n",
        ]),
        "/length" => Script::Pieces(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello",
            b" world",
        ]),
        "/close" => Script::ThenClose(b"HTTP/1.1 200 OK\r\nx-framing: close\r\n\r\nhello world"),
        "/empty" => Script::Pieces(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
        "/continue" => Script::Pieces(&[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world",
        ]),
        _ => Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    for path in ["/chunked", "/length", "/close", "/continue", "/length"] {
        let answer = send(&c, "GET", &gw.url(path), &[], "").await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.body.as_ref(), b"hello world", "{path}");
    }
    let answer = send(&c, "GET", &gw.url("/empty"), &[], "").await;
    assert_eq!(answer.status, 204);
    assert!(answer.body.is_empty());
    // HEAD: a length but no body; the connection stays usable for the next request.
    let answer = send(&c, "HEAD", &gw.url("/head"), &[], "").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-length"], "5");
    assert!(answer.body.is_empty());
    let answer = send(&c, "GET", &gw.url("/after-head"), &[], "").await;
    assert_eq!(answer.body.as_ref(), b"hello");
    gw.shutdown().await;
}

/// 200 000 body bytes in a pattern that repeats every 251: a piece lost, doubled or out of
/// order shows.
static LONG: LazyLock<Vec<u8>> = LazyLock::new(|| (0..200_000).map(|i| (i % 251) as u8).collect());

fn long_head(framing: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n{framing}\r\n")
        .into_bytes()
}

/// `bytes` cut at `cuts` (offsets into it, ascending).
fn cut(bytes: Vec<u8>, cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut from = 0;
    for &at in cuts.iter().chain([bytes.len()].iter()) {
        pieces.push(bytes[from..at].to_vec());
        from = at;
    }
    pieces
}

/// The long body with a length, in three writes: the head with the body's start, then the rest
/// in two.
static LENGTH_IN_PIECES: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let head = long_head("content-length: 200000\r\n");
    let cuts = [head.len() + 3_000, head.len() + 100_000];
    cut([head, LONG.clone()].concat(), &cuts)
});
/// The long body with a length, in one write.
static LENGTH_IN_ONE: LazyLock<Vec<Vec<u8>>> =
    LazyLock::new(|| vec![[long_head("content-length: 200000\r\n"), LONG.clone()].concat()]);
/// The long body in chunks of 70 000, 1 and 129 999 bytes (hex 11170, 1, 1fbcf), cut inside a
/// size line, inside a chunk, between a chunk and its CRLF and inside that CRLF.
static CHUNKED: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let head = long_head("transfer-encoding: chunked\r\n");
    let first = head.len() + "11170\r\n".len();
    let wire = [
        head.clone(),
        b"11170\r\n".to_vec(),
        LONG[..70_000].to_vec(),
        b"\r\n1\r\n".to_vec(),
        LONG[70_000..70_001].to_vec(),
        b"\r\n1fbcf\r\n".to_vec(),
        LONG[70_001..].to_vec(),
        b"\r\n0\r\n\r\n".to_vec(),
    ]
    .concat();
    let cuts = [
        head.len() + 3,
        first + 20_000,
        first + 70_000,
        first + 70_001,
        wire.len() - 129_999 - 7,
        wire.len() - 60_000,
    ];
    cut(wire, &cuts)
});
/// The long body until the worker closes, in two writes.
static UNTIL_CLOSE: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let head = long_head("");
    let cuts = [head.len() + 10_000];
    cut([head, LONG.clone()].concat(), &cuts)
});
/// 20 000 bytes with a length, and a whole answer behind them that nobody asked for.
static LENGTH_THEN_UNASKED: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    vec![
        [
            long_head("content-length: 20000\r\n"),
            LONG[..20_000].to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nWRONG".to_vec(),
        ]
        .concat(),
    ]
});

#[tokio::test]
async fn long_answers_in_every_framing_arrive_whole_and_their_connection_serves_on() {
    let worker = RawWorker::start(|path| match path {
        "/length-in-pieces" => Script::Made(&LENGTH_IN_PIECES, false),
        "/length-in-one" => Script::Made(&LENGTH_IN_ONE, false),
        "/chunked" => Script::Made(&CHUNKED, false),
        "/until-close" => Script::Made(&UNTIL_CLOSE, true),
        "/length-then-unasked" => Script::Made(&LENGTH_THEN_UNASKED, false),
        _ => Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    // One after the other: each answer read in pieces larger than a head's read (up to 64 KiB),
    // and the worker connection back in the pool after each, carrying the next.
    for path in ["/length-in-pieces", "/length-in-one", "/chunked"].repeat(2) {
        let answer = send(&c, "GET", &gw.url(path), &[], "").await;
        assert_eq!(answer.status, 200, "{path}");
        assert!(
            answer.body == LONG[..],
            "{path}: {} bytes",
            answer.body.len()
        );
    }
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 1);
    // Over HTTP/2 the same pieces become DATA frames.
    let (mut sender, _connection) = support::http2_connect(gw.public).await;
    for path in ["/length-in-pieces", "/chunked"] {
        let request = http::Request::get(gw.url(path))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "h2 {path}");
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert!(body.to_bytes() == LONG[..], "h2 {path}");
    }
    let answer = send(&c, "GET", &gw.url("/until-close"), &[], "").await;
    assert!(
        answer.body == LONG[..],
        "until close: {} bytes",
        answer.body.len()
    );
    // Bytes behind a body's end stay in the socket, where the pool finds them: the connection
    // never carries another request, and no client gets the unasked answer.
    let answer = send(&c, "GET", &gw.url("/length-then-unasked"), &[], "").await;
    assert!(answer.body == LONG[..20_000]);
    for _ in 0..5 {
        let answer = send(&c, "GET", &gw.url("/"), &[], "").await;
        assert_eq!(answer.body.as_ref(), b"hello");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn keep_alive_connections_are_reused_across_requests() {
    let worker = RawWorker::start(|_| {
        Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"])
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    for _ in 0..50 {
        let answer = send(&c, "GET", &gw.url("/"), &[], "").await;
        assert_eq!(answer.body.as_ref(), b"hello");
    }
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_idle_serve_the_next_burst_instead_of_closing() {
    // Bursts of 16 requests in flight at once (HTTP/2 clients send 8 per connection) against a
    // pool that keeps 2 through quiet times: the 16 connections of the first burst serve the
    // next ones. Closing the 14 beyond `max_idle` as they came back opened 14 new ones per burst.
    let worker = RawWorker::start(|_| {
        Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", b"hello"])
    })
    .await;
    let addr = worker.addr.to_string();
    let gw = Gateway::start(&[], move |c| {
        c.workers = vec![addr];
        c.threads = 1;
        c.limits.max_idle_per_worker = 2;
    })
    .await;
    let c = client();
    let url = gw.url("/");
    for burst in 0..8 {
        let requests = (0..16).map(|_| send(&c, "GET", &url, &[], ""));
        for answer in futures_util::future::join_all(requests).await {
            assert_eq!(answer.status, 200, "burst {burst}");
            assert_eq!(answer.body.as_ref(), b"hello");
        }
    }
    let opened = worker.request_connections.load(Ordering::SeqCst);
    assert!(
        opened <= 20,
        "{opened} worker connections for 8 bursts of 16 requests"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_worker_closing_idle_connections_costs_no_request() {
    // Answers without `connection: close` and then closes: the pooled connection is dead by the
    // time the next request wants it.
    let worker = RawWorker::start(|_| {
        Script::ThenClose(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    for i in 0..40 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let answer = send(&c, method, &gw.url("/"), &[], "x").await;
        assert_eq!(answer.status, 200, "request {i} ({method})");
        assert_eq!(answer.body.as_ref(), b"hello");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 40);
    gw.shutdown().await;
}

/// A worker that says how long it keeps an idle connection open (`Keep-Alive: timeout=2`;
/// Node.js says 5, Apache 5) gets no request on one idle for longer than that less a second: a
/// request sent as the worker closes the connection is lost, and a POST is not sent again.
#[tokio::test]
async fn a_connection_the_worker_may_have_closed_idle_is_not_reused() {
    let worker = RawWorker::start(|_| {
        Script::IdleClose(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=2\r\ncontent-length: 5\r\n\r\nhello",
            Duration::from_millis(1200),
            Duration::ZERO,
        )
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    for i in 0..3 {
        let answer = send(&c, "POST", &gw.url("/"), &[], "x").await;
        assert_eq!((answer.status, i), (200, i), "{:?}", answer.body);
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 3);
    // Within the second: reused.
    for _ in 0..3 {
        assert_eq!(send(&c, "POST", &gw.url("/"), &[], "x").await.status, 200);
    }
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 4);
    gw.shutdown().await;
}

/// A worker that closed every kept-alive connection of the gateway (it restarted, or closed them
/// idle) as the next request arrives on each: the first attempt meets one, and the retry opens a
/// new connection to the worker rather than taking the next dead one from the pool. (It took the
/// next pooled one before: a second stale connection on the one worker ended the GET in a 502.)
#[tokio::test]
async fn after_a_stale_connection_the_retry_opens_a_new_one() {
    let worker = RawWorker::start(|_| {
        Script::IdleClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Duration::from_millis(200),
            Duration::from_millis(50),
        )
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    // Two requests at once: two connections to the worker, both pooled after.
    let url = gw.url("/");
    let (a, b) = tokio::join!(
        send(&c, "GET", &url, &[], ""),
        send(&c, "GET", &url, &[], "")
    );
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(worker.request_connections.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = send(&c, "GET", &url, &[], "").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        worker.request_connections.load(Ordering::SeqCst),
        3,
        "one new connection"
    );
    gw.shutdown().await;
}

/// A kept-alive connection the worker closes as a request arrives on it (the stale-connection
/// race): a GET goes again on another connection; a PUT whose body was streamed to the worker
/// cannot go again, and gets the worker's 502, not a 503 as if no worker were left.
#[tokio::test]
async fn a_streamed_body_lost_with_a_stale_connection_is_a_502() {
    let worker = RawWorker::start(|_| {
        Script::IdleClose(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            Duration::from_millis(200),
            Duration::ZERO,
        )
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    assert_eq!(send(&c, "GET", &gw.url("/"), &[], "").await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&c, "GET", &gw.url("/"), &[], "").await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Over `buffer_body_bytes` (1024 here): streamed, one attempt only.
    let put = send(&c, "PUT", &gw.url("/"), &[], vec![b'p'; 5000]).await;
    assert_eq!(put.status, 502, "{:?}", put.body);
    gw.shutdown().await;
}

/// A worker that turns an upload down by its head (a 413 for its declared length, as axum's
/// body limit does) and closes the connection a moment later with the body unread, without
/// saying `Connection: close` (hyper's server closes at once; the moment makes the race sure).
/// Its kernel resets the connection then, losing what the gateway sent on it meanwhile. Other
/// requests it reads whole and answers `200 hello`, but `/missing`: a `404`.
async fn upload_refuser() -> (std::net::SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut first = true;
                loop {
                    let end = loop {
                        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        if read_more(&mut stream, &mut buffer).await.is_none() {
                            return;
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                    buffer.drain(..end + 4);
                    if head.starts_with("get /readyz ") {
                        if stream.write_all(READY).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if std::mem::take(&mut first) {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    if head.starts_with("post /upload ") {
                        let _ = stream
                            .write_all(
                                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
                            )
                            .await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        return; // dropped with the body unread: a reset
                    }
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .map_or(0, |length| length.trim().parse().unwrap());
                    while buffer.len() < length {
                        if read_more(&mut stream, &mut buffer).await.is_none() {
                            return;
                        }
                    }
                    buffer.drain(..length);
                    let answer: &[u8] = if head.starts_with("get /missing ") {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections, task)
}

/// After an error answer to a request with a body, the connection is not reused: the worker may
/// not have read the body and may be about to close it (see [`upload_refuser`]); the next POST,
/// sent on it, was lost with it (a 502: a POST is not sent again). Other answers to uploads, and
/// error answers to requests without a body, keep their connection.
#[tokio::test]
async fn a_connection_whose_upload_was_turned_down_unread_is_not_reused() {
    let (addr, connections, task) = upload_refuser().await;
    let addr = addr.to_string();
    let gw = Gateway::start(&[], move |c| {
        c.workers = vec![addr];
        c.retry.buffer_body_bytes = 1024;
    })
    .await;
    let c = client();
    // Streamed to the worker (over `buffer_body_bytes`), and sent whole with its head.
    for upload in [vec![b'u'; 5000], vec![b'u'; 500]] {
        for round in 0..3 {
            let refused = send(&c, "POST", &gw.url("/upload"), &[], upload.clone()).await;
            assert_eq!((refused.status, round), (413, round));
            let next = send(&c, "POST", &gw.url("/order"), &[], "{}").await;
            assert_eq!((next.status, round), (200, round), "{:?}", next.body);
        }
    }
    // Each refused upload's connection was left (the first upload's, then the pooled one each
    // later upload took); the POST after it opened a new one.
    assert_eq!(connections.load(Ordering::SeqCst), 7);
    for _ in 0..3 {
        assert_eq!(
            send(&c, "GET", &gw.url("/missing"), &[], "").await.status,
            404
        );
        assert_eq!(
            send(&c, "POST", &gw.url("/order"), &[], "{}").await.status,
            200
        );
        assert_eq!(send(&c, "GET", &gw.url("/"), &[], "").await.status, 200);
    }
    assert_eq!(connections.load(Ordering::SeqCst), 7);
    gw.shutdown().await;
    task.abort();
}

#[tokio::test]
async fn request_bodies_are_framed_for_the_worker() {
    let worker =
        RawWorker::start(|_| Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]))
            .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    // Buffered (under retry.buffer_body_bytes), streamed with a declared length, an empty POST
    // that declared its length, a GET without a body.
    send(&c, "POST", &gw.url("/small"), &[], "small").await;
    let big = vec![b'b'; 5000];
    send(&c, "PUT", &gw.url("/big"), &[], big.clone()).await;
    send(
        &c,
        "POST",
        &gw.url("/empty"),
        &[("content-length", "0")],
        "",
    )
    .await;
    send(&c, "GET", &gw.url("/get"), &[], "").await;
    let seen = worker.requests();
    assert_eq!(seen.len(), 4);
    assert!(seen[0].0.contains("content-length: 5"), "{}", seen[0].0);
    assert_eq!(seen[0].1, b"small");
    assert!(seen[1].0.contains("content-length: 5000"), "{}", seen[1].0);
    assert_eq!(seen[1].1, big);
    assert!(seen[2].0.contains("content-length: 0"), "{}", seen[2].0);
    assert!(!seen[3].0.contains("content-length"), "{}", seen[3].0);
    for (head, _) in &seen {
        assert!(head.contains("\r\nhost: "), "{head}");
        assert!(head.contains("\r\nx-forwarded-for: 127.0.0.1"), "{head}");
    }
    gw.shutdown().await;
}

/// A chunked body as a worker reads it: the data of every chunk.
fn dechunk(mut wire: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    loop {
        let line_end = wire.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&wire[..line_end]).unwrap(), 16).unwrap();
        wire = &wire[line_end + 2..];
        if size == 0 {
            return data;
        }
        data.extend_from_slice(&wire[..size]);
        assert_eq!(&wire[size..size + 2], b"\r\n");
        wire = &wire[size + 2..];
    }
}

/// Long uploads go to the worker as one `writev` of head and body (kept for a retry), or
/// streamed with the client's length, or re-chunked with each piece's size line, data and CRLF
/// in one `writev` each: every byte, in order, however the kernel takes the parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_request_bodies_reach_the_worker_whole() {
    let worker =
        RawWorker::start(|_| Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]))
            .await;
    let addr = worker.addr.to_string();
    let gw = Gateway::start(&[], move |c| c.workers = vec![addr]).await;
    let pattern = |n: usize| (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    let c = client();
    // Within retry.buffer_body_bytes (64 KiB) and over the 16 KiB copied behind the head.
    let kept = pattern(40_000);
    assert_eq!(
        send(&c, "POST", &gw.url("/kept"), &[], kept.clone())
            .await
            .status,
        200
    );
    let streamed = pattern(1_000_000);
    assert_eq!(
        send(&c, "PUT", &gw.url("/streamed"), &[], streamed.clone())
            .await
            .status,
        200
    );
    // Chunked by the client, in chunks of 300 000, 1 and 299 999 bytes.
    let chunked = pattern(600_000);
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut wire =
        b"POST /chunked HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for piece in [
        &chunked[..300_000],
        &chunked[300_000..300_001],
        &chunked[300_001..],
    ] {
        wire.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        wire.extend_from_slice(piece);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&wire).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok") {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(stream);
    let seen = worker.requests();
    assert_eq!(seen.len(), 3);
    assert!(seen[0].0.contains("content-length: 40000"), "{}", seen[0].0);
    assert!(seen[0].1 == kept);
    assert!(
        seen[1].0.contains("content-length: 1000000"),
        "{}",
        seen[1].0
    );
    assert!(seen[1].1 == streamed);
    assert!(
        seen[2].0.contains("transfer-encoding: chunked"),
        "{}",
        seen[2].0
    );
    assert!(dechunk(&seen[2].1) == chunked);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_flooding_interim_responses_times_out_like_a_silent_one() {
    // 1xx heads are skipped while the final head is awaited; an endless run of them must still
    // end at `timeouts.response_header`. (The timer is polled outside tokio's task budget, as
    // `tokio::time::timeout` does, so that a worker keeping the socket full cannot starve it;
    // this test did not reproduce that starvation here, it pins the timeout.)
    let worker = RawWorker::start(|path| match path {
        "/flood" => Script::Flood(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n"),
        _ => Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
    })
    .await;
    let addr = worker.addr.to_string();
    let gw = Gateway::start(&[], move |c| {
        c.workers = vec![addr];
        c.timeouts.response_header = Duration::from_millis(300);
        c.retry.max_attempts = 1;
        c.hedging.enabled = false;
    })
    .await;
    let c = client();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(8),
        send(&c, "POST", &gw.url("/flood"), &[], ""),
    )
    .await
    .expect("the flooded request must end at the response-header timeout");
    assert_eq!(answer.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn broken_answers_become_502_and_the_gateway_keeps_serving() {
    let worker = RawWorker::start(|path| match path {
        "/garbage" => Script::ThenClose(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"),
        "/nothing" => Script::ThenClose(b""),
        "/bad-length" => Script::ThenClose(b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n"),
        "/cut" => Script::ThenClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort"),
        _ => Script::Pieces(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]),
    })
    .await;
    let gw = gateway_over(&worker).await;
    let c = client();
    for path in ["/garbage", "/bad-length"] {
        let answer = send(&c, "POST", &gw.url(path), &[], "").await;
        assert_eq!(answer.status, 502, "{path}");
        assert_eq!(answer.json()["error"], "bad_gateway", "{path}");
    }
    let answer = send(&c, "POST", &gw.url("/nothing"), &[], "").await;
    assert_eq!(answer.status, 502);
    // A body cut off after the head: the client's response breaks, it is not completed with
    // made-up bytes.
    let request = hyper::Request::get(gw.url("/cut"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    if let Ok(response) = c.request(request).await {
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(body.is_err(), "a truncated body must not look complete");
    }
    let answer = send(&c, "GET", &gw.url("/fine"), &[], "").await;
    assert_eq!(answer.body.as_ref(), b"hello");
    gw.shutdown().await;
}
