//! The serving threads, in-process: connections spread evenly over them, and the connection
//! limit holds over all of them.

mod support;

use std::time::Duration;

use support::{Gateway, Upstream, client, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one keep-alive GET on `stream` and returns the whole response as text.
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
            .unwrap();
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

/// Open keep-alive connections, each having had one answered request.
async fn open_connections(gateway: &Gateway, count: usize) -> Vec<TcpStream> {
    let connecting = (0..count).map(|_| async {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        let response = request(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        stream
    });
    futures_util::future::join_all(connecting).await
}

/// `client_connections{thread="N"}` of every serving thread, from `/metrics`.
async fn connections_per_thread(gateway: &Gateway) -> Vec<u64> {
    let metrics = get(&client(), &gateway.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    text.lines()
        .filter(|line| line.starts_with("herd_gateway_client_connections{"))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn a_burst_of_connections_is_spread_evenly_over_the_threads() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.threads = 4;
        config.adaptive_threads = false;
    })
    .await;

    let connections = open_connections(&gateway, 40).await;
    let per_thread = connections_per_thread(&gateway).await;
    assert_eq!(per_thread.len(), 4, "{per_thread:?}");
    assert_eq!(per_thread.iter().sum::<u64>(), 40, "{per_thread:?}");
    let (least, most) = (
        per_thread.iter().min().unwrap(),
        per_thread.iter().max().unwrap(),
    );
    // Placement keeps threads within 2 of each other; concurrent accepts may add one or two.
    assert!(most - least <= 4, "uneven: {per_thread:?}");

    drop(connections);
    support::wait_until(Duration::from_secs(5), "connections closed", || async {
        connections_per_thread(&gateway).await.iter().sum::<u64>() == 0
    })
    .await;
    gateway.shutdown().await;
}

/// The value of the metric line starting with `prefix` (e.g. `herd_gateway_x_total `).
async fn metric(gateway: &Gateway, prefix: &str) -> u64 {
    let metrics = get(&client(), &gateway.admin_url("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn an_idle_gateway_gathers_its_keep_alive_connections_on_one_thread_and_they_keep_serving() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| config.threads = 2).await;

    // Both threads take connections at first (a gateway may start into heavy load).
    let mut connections = open_connections(&gateway, 20).await;
    let spread = connections_per_thread(&gateway).await;
    assert!(spread[1] > 0, "both threads took some: {spread:?}");

    // Nothing to do: within a few ticks one thread serves them all, moved between requests.
    support::wait_until(Duration::from_secs(10), "all on thread 0", || async {
        connections_per_thread(&gateway).await == [20, 0]
    })
    .await;
    assert_eq!(
        metric(&gateway, "herd_gateway_serving_threads_active ").await,
        1
    );
    assert_eq!(
        metric(&gateway, "herd_gateway_client_connections_moved_total ").await,
        spread[1],
        "each connection of thread 1 moved once"
    );
    // The same sockets go on serving, one request after another and pipelined.
    for stream in &mut connections {
        assert!(request(stream).await.starts_with("HTTP/1.1 200"));
    }
    let stream = &mut connections[0];
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: g\r\n\r\nGET / HTTP/1.1\r\nhost: g\r\n\r\n")
        .await
        .unwrap();
    let mut answers = String::new();
    support::wait_until(Duration::from_secs(5), "two pipelined answers", || {
        let mut buffer = [0u8; 8192];
        let read = stream.try_read(&mut buffer).unwrap_or(0);
        answers.push_str(&String::from_utf8_lossy(&buffer[..read]));
        let done = answers.matches("HTTP/1.1 200").count() == 2;
        async move { done }
    })
    .await;
    assert_eq!(connections_per_thread(&gateway).await, [20, 0]);
    gateway.shutdown().await;
}

#[tokio::test]
async fn http2_connections_spread_over_every_thread_even_when_one_is_in_use() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| config.threads = 2).await;
    support::wait_until(Duration::from_secs(10), "one thread in use", || async {
        metric(&gateway, "herd_gateway_serving_threads_active ").await == 1
    })
    .await;

    // HTTP/2 connections cannot move later: they go to both threads from the start.
    let mut senders = Vec::new();
    for _ in 0..4 {
        let stream = TcpStream::connect(gateway.public).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = http::Request::get(format!("http://{}/", gateway.public))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        senders.push(sender);
    }
    assert_eq!(connections_per_thread(&gateway).await, [2, 2]);
    drop(senders);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_connection_over_the_limit_gets_503_json_and_is_closed() {
    let upstream = Upstream::start("a").await;
    let gateway = Gateway::start(&[&upstream], |config| {
        config.threads = 2;
        config.limits.max_connections = 3;
    })
    .await;
    let mut held = open_connections(&gateway, 3).await;

    let mut over = TcpStream::connect(gateway.public).await.unwrap();
    let response = request(&mut over).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert!(
        response.contains(r#""error":"too_many_connections""#),
        "{response}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the refused connection is closed"
    );

    // The held connections still work, and a freed slot is taken again.
    assert!(request(&mut held[0]).await.starts_with("HTTP/1.1 200"));
    drop(held.pop());
    support::wait_until(Duration::from_secs(5), "a slot freed", || async {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        request(&mut stream).await.starts_with("HTTP/1.1 200")
    })
    .await;
    gateway.shutdown().await;
}

/// The streams of an HTTP/2 connection run on the connection's task (`herd_gateway::h2_streams`),
/// not on a task each: they must still be served side by side, and a stream the client resets
/// must free its worker request while the others go on.
#[tokio::test]
async fn the_streams_of_one_http2_connection_run_side_by_side_and_a_reset_one_frees_its_worker() {
    use std::sync::atomic::Ordering;
    let upstream = Upstream::start("a").await;
    let worker = upstream.addr.to_string();
    let gateway = Gateway::start(&[&upstream], |_| {}).await;
    let (sender, connection) = support::http2_connect(gateway.public).await;
    let get = |path: &str| {
        http::Request::get(format!("http://{}{path}", gateway.public))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let in_flight = || async { support::worker_field(&gateway, &worker, "in_flight").await };

    upstream.behavior.hang.store(true, Ordering::SeqCst);
    let mut stuck_sender = sender.clone();
    let stuck_request = get("/stuck");
    let stuck = tokio::spawn(async move { stuck_sender.send_request(stuck_request).await });
    support::wait_until(
        Duration::from_secs(5),
        "the stuck request is at the worker",
        || async { in_flight().await == 1 },
    )
    .await;
    upstream.behavior.hang.store(false, Ordering::SeqCst);

    let beside = (0..32).map(|_| {
        let mut sender = sender.clone();
        let request = get("/");
        async move { sender.send_request(request).await.unwrap().status() }
    });
    let statuses = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(beside),
    )
    .await
    .expect("32 streams answered beside the stuck one");
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert_eq!(in_flight().await, 1, "the stuck stream is still in flight");
    assert!(!stuck.is_finished());

    // The client gives up on the stuck stream (RST_STREAM): its worker request goes too.
    stuck.abort();
    support::wait_until(
        Duration::from_secs(5),
        "the reset stream's worker request is cancelled",
        || async { in_flight().await == 0 },
    )
    .await;
    let mut sender = sender;
    let after = sender.send_request(get("/")).await.unwrap();
    assert_eq!(after.status(), 200, "the connection serves on");
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the connection ends when the client is done with it");
    gateway.shutdown().await;
}
