//! Protocol switches (WebSocket) through the gateway, against a worker speaking raw HTTP/1.1 on
//! a real socket: the 101 comes back, then bytes flow both ways; a declined switch is an
//! ordinary answer on a connection that stays HTTP. A tunnel counts as in flight on its worker,
//! closes when idle, and a stopping gateway waits for it up to its grace.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(5);

/// Reads one message head (up to the blank line) from `stream`; what came after it stays in
/// `buffer`. `None` at end of stream.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head: Vec<u8> = buffer.drain(..end + 4).collect();
            return Some(String::from_utf8_lossy(&head).to_string());
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("data within 5 s")
            .ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Reads exactly `length` bytes, starting with what is already in `buffer`.
async fn read_exactly(stream: &mut TcpStream, buffer: &mut Vec<u8>, length: usize) -> String {
    while buffer.len() < length {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(LIMIT, stream.read(&mut chunk))
            .await
            .expect("data within 5 s")
            .unwrap();
        assert!(
            read > 0,
            "closed after {:?}",
            String::from_utf8_lossy(buffer)
        );
        buffer.extend_from_slice(&chunk[..read]);
    }
    let bytes: Vec<u8> = buffer.drain(..length).collect();
    String::from_utf8(bytes).unwrap()
}

/// A worker: `/readyz` → 200; a request asking to switch to websocket on any path but
/// `/decline` → 101 with `welcome;` right behind it, then every byte echoed in upper case;
/// anything else → 200 `plain`.
async fn raw_worker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

async fn serve(mut stream: TcpStream) {
    let mut buffer = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buffer).await {
        let lower = head.to_ascii_lowercase();
        let switch = lower.contains("\r\nupgrade: websocket\r\n")
            && lower.contains("\r\nconnection: upgrade\r\n")
            && !lower.starts_with("get /decline");
        if !switch {
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain";
            if stream.write_all(answer).await.is_err() {
                return;
            }
            continue;
        }
        let switched = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nx-herd-worker: raw\r\n\r\nwelcome;";
        if stream.write_all(switched).await.is_err() {
            return;
        }
        let mut chunk = buffer.clone();
        loop {
            if !chunk.is_empty() {
                let upper = chunk.to_ascii_uppercase();
                if stream.write_all(&upper).await.is_err() {
                    return;
                }
            }
            let mut next = [0u8; 4096];
            match stream.read(&mut next).await {
                Ok(0) | Err(_) => return,
                Ok(read) => chunk = next[..read].to_vec(),
            }
        }
    }
}

/// A gateway in front of one [`raw_worker`], once it answers through it.
async fn gateway_over_raw_worker() -> Gateway {
    tweaked_gateway_over_raw_worker(|_| {}).await.0
}

/// [`gateway_over_raw_worker`] with its configuration adjusted by `tweak`; also the worker's id.
async fn tweaked_gateway_over_raw_worker(
    tweak: impl FnOnce(&mut herd_gateway::GatewayConfig),
) -> (Gateway, String) {
    let worker = raw_worker().await;
    let gateway = Gateway::start(&[], |config| {
        config.workers = vec![worker.to_string()];
        tweak(config);
    })
    .await;
    support::wait_until(LIMIT, "the worker is up", || async {
        support::get(&support::client(), &gateway.url("/"))
            .await
            .status
            == 200
    })
    .await;
    (gateway, worker.to_string())
}

const SWITCH: &str = "host: gateway\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn a_websocket_switch_is_tunnelled_both_ways() {
    let gateway = gateway_over_raw_worker().await;

    let mut client = TcpStream::connect(gateway.public).await.unwrap();
    client
        .write_all(format!("GET /chat HTTP/1.1\r\n{SWITCH}").as_bytes())
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let head = read_head(&mut client, &mut buffer).await.expect("a 101");
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(lower.contains("\r\nx-request-id: "), "{head}");
    assert_eq!(read_exactly(&mut client, &mut buffer, 8).await, "welcome;");

    for message in ["ping", "a longer second message"] {
        client.write_all(message.as_bytes()).await.unwrap();
        let echoed = read_exactly(&mut client, &mut buffer, message.len()).await;
        assert_eq!(echoed, message.to_ascii_uppercase());
    }
    // The gateway keeps serving HTTP meanwhile.
    assert_eq!(
        support::get(&support::client(), &gateway.url("/"))
            .await
            .status,
        200
    );
    drop(client);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_declined_switch_is_an_ordinary_answer_and_the_connection_stays_http() {
    let gateway = gateway_over_raw_worker().await;

    let mut client = TcpStream::connect(gateway.public).await.unwrap();
    let mut buffer = Vec::new();
    client
        .write_all(format!("GET /decline HTTP/1.1\r\n{SWITCH}").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut client, &mut buffer)
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(&mut client, &mut buffer, 5).await, "plain");

    client
        .write_all(b"GET /again HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut client, &mut buffer)
        .await
        .expect("a second answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(read_exactly(&mut client, &mut buffer, 5).await, "plain");
    gateway.shutdown().await;
}

/// Opens a tunnel through `gateway` and reads the worker's greeting.
async fn open_tunnel(gateway: &Gateway) -> (TcpStream, Vec<u8>) {
    let mut client = TcpStream::connect(gateway.public).await.unwrap();
    client
        .write_all(format!("GET /chat HTTP/1.1\r\n{SWITCH}").as_bytes())
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let head = read_head(&mut client, &mut buffer).await.expect("a 101");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_exactly(&mut client, &mut buffer, 8).await, "welcome;");
    (client, buffer)
}

/// One message through the tunnel and its echo.
async fn echo(client: &mut TcpStream, buffer: &mut Vec<u8>, message: &str) {
    client.write_all(message.as_bytes()).await.unwrap();
    let echoed = read_exactly(client, buffer, message.len()).await;
    assert_eq!(echoed, message.to_ascii_uppercase());
}

async fn in_flight(gateway: &Gateway, worker: &str) -> u64 {
    support::worker_field(gateway, worker, "in_flight")
        .await
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Whether the gateway closed `client` within `limit` (reading whatever comes).
async fn closed_within(client: &mut TcpStream, limit: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(limit, client.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn a_tunnel_counts_in_flight_on_its_worker_until_it_closes() {
    let (gateway, worker) = tweaked_gateway_over_raw_worker(|_| {}).await;
    let (mut client, mut buffer) = open_tunnel(&gateway).await;
    echo(&mut client, &mut buffer, "hello").await;
    assert_eq!(in_flight(&gateway, &worker).await, 1, "the open tunnel");
    drop(client);
    support::wait_until(
        LIMIT,
        "the closed tunnel is no longer in flight",
        || async { in_flight(&gateway, &worker).await == 0 },
    )
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_tunnel_without_traffic_is_closed_on_both_sides() {
    let (gateway, worker) = tweaked_gateway_over_raw_worker(|config| {
        config.timeouts.tunnel_idle = Duration::from_secs(1);
    })
    .await;
    let (mut client, mut buffer) = open_tunnel(&gateway).await;
    // Traffic every 300 ms for 2 s keeps it open.
    let mut last_sent = std::time::Instant::now();
    for round in 0..7 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Timed from before the last message: its echo is the tunnel's last traffic, so a slow
        // box can only make the quiet longer.
        last_sent = std::time::Instant::now();
        echo(&mut client, &mut buffer, &format!("message {round}")).await;
    }
    assert!(closed_within(&mut client, LIMIT).await, "closed when idle");
    let after = last_sent.elapsed();
    assert!(
        after >= Duration::from_millis(990),
        "closed after {after:?} of quiet, before tunnel_idle (1 s)"
    );
    // The worker's side went too.
    support::wait_until(LIMIT, "the worker's side is closed", || async {
        in_flight(&gateway, &worker).await == 0
    })
    .await;
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_stopping_gateway_waits_for_its_tunnels_up_to_the_grace() {
    let (gateway, _) = tweaked_gateway_over_raw_worker(|config| {
        config.timeouts.shutdown_grace = Duration::from_secs(2);
    })
    .await;
    let (mut client, mut buffer) = open_tunnel(&gateway).await;
    let stopping = std::time::Instant::now();
    let stopped = tokio::spawn(gateway.shutdown());
    tokio::time::sleep(Duration::from_millis(500)).await;
    echo(&mut client, &mut buffer, "still there").await;
    assert!(!stopped.is_finished(), "the gateway waits for the tunnel");
    assert!(
        closed_within(&mut client, LIMIT).await,
        "closed at the end of the grace"
    );
    tokio::time::timeout(LIMIT, stopped).await.unwrap().unwrap();
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "stopped after {took:?}, not at the 2 s grace"
    );
}

#[tokio::test]
async fn a_tunnel_is_not_timed_as_an_http_connection() {
    // Tunnel bytes are not a request head: the client connection's head and idle timers stop at
    // the switch; only tunnel_idle applies.
    let (gateway, _) = tweaked_gateway_over_raw_worker(|config| {
        config.timeouts.request_head = Duration::from_millis(500);
        config.timeouts.client_idle = Duration::from_millis(500);
    })
    .await;
    let (mut client, mut buffer) = open_tunnel(&gateway).await;
    for round in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        echo(&mut client, &mut buffer, &format!("message {round}")).await;
    }
    drop(client);
    gateway.shutdown().await;
}
