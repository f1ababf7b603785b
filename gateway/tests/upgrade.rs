//! Protocol switches (WebSocket) through the gateway, against a worker speaking raw HTTP/1.1 on
//! a real socket: the 101 comes back, then bytes flow both ways; a declined switch is an
//! ordinary answer on a connection that stays HTTP.

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
    let worker = raw_worker().await;
    let gateway = Gateway::start(&[], |config| config.workers = vec![worker.to_string()]).await;
    support::wait_until(LIMIT, "the worker is up", || async {
        support::get(&support::client(), &gateway.url("/"))
            .await
            .status
            == 200
    })
    .await;
    gateway
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
