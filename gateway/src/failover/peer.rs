//! The direct link between the two gateways: heartbeats both ways over TCP.
//!
//! Each gateway listens for its peer and also connects to it, sending one JSON [`Heartbeat`] per
//! line every heartbeat interval. TCP, not UDP, for one reason: when the peer's *process* dies,
//! its kernel closes the connection at once, so the survivor learns of a crash within a round trip
//! instead of after a timeout ([`PeerEvent::Closed`]). A partition or a vanished machine closes
//! nothing; those show up as silence, which alone never justifies a takeover (Redis decides).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Role;

/// What a gateway tells its peer, every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's gateway id.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// The epoch of the lease it holds (active) or last saw (standby).
    pub epoch: u64,
    /// How many workers it can send to right now.
    pub healthy_workers: usize,
    /// The sender is the preferred gateway, healthy, and asks for the active role back.
    pub wants_active: bool,
}

/// What the link reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// A heartbeat arrived.
    Heartbeat(Heartbeat, Instant),
    /// The peer closed a connection on which it had sent `last` — its process stopped.
    Closed {
        /// The last heartbeat received on that connection.
        last: Heartbeat,
    },
}

/// Starts the link: accepts the peer's connections on `listener` and keeps one connection to
/// `peer`, writing `outgoing`'s current heartbeat every `interval`. Events go to `events`.
pub fn spawn(
    listener: TcpListener,
    peer: SocketAddr,
    interval: Duration,
    outgoing: watch::Receiver<Heartbeat>,
    events: mpsc::Sender<PeerEvent>,
) {
    tokio::spawn(accept_loop(listener, events));
    tokio::spawn(send_loop(peer, interval, outgoing));
}

async fn accept_loop(listener: TcpListener, events: mpsc::Sender<PeerEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(read_connection(stream, from, events.clone()));
            }
            Err(error) => {
                warn!(%error, "peer link: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_connection(stream: TcpStream, from: SocketAddr, events: mpsc::Sender<PeerEvent>) {
    let mut lines = BufReader::new(stream).lines();
    let mut last: Option<Heartbeat> = None;
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => match serde_json::from_str::<Heartbeat>(&line) {
                Ok(heartbeat) => {
                    last = Some(heartbeat.clone());
                    if events
                        .send(PeerEvent::Heartbeat(heartbeat, Instant::now()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(error) => {
                    // Not our peer speaking (or a broken one): drop the connection, report nothing.
                    warn!(%from, %error, "peer link: bad heartbeat, closing connection");
                    return;
                }
            },
            // EOF or reset: the kernel on the other side closed it, so the process is gone.
            Ok(None) | Err(_) => {
                if let Some(last) = last {
                    debug!(%from, peer = %last.id, "peer link: connection closed");
                    let _ = events.send(PeerEvent::Closed { last }).await;
                }
                return;
            }
        }
    }
}

async fn send_loop(peer: SocketAddr, interval: Duration, outgoing: watch::Receiver<Heartbeat>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut connection: Option<TcpStream> = None;
    loop {
        ticks.tick().await;
        if connection.is_none() {
            connection = match tokio::time::timeout(interval, TcpStream::connect(peer)).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    Some(stream)
                }
                _ => None,
            };
        }
        let Some(stream) = connection.as_mut() else {
            continue;
        };
        let mut line = serde_json::to_vec(&*outgoing.borrow()).expect("heartbeats serialize");
        line.push(b'\n');
        // A write that can't finish within one interval means the path is stuck: start over.
        let written = tokio::time::timeout(interval, stream.write_all(&line)).await;
        if !matches!(written, Ok(Ok(()))) {
            connection = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(id: &str) -> Heartbeat {
        Heartbeat {
            id: id.into(),
            role: Role::Active,
            epoch: 7,
            healthy_workers: 3,
            wants_active: false,
        }
    }

    #[tokio::test]
    async fn heartbeats_flow_and_a_closed_peer_is_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, events_tx));

        // Play the peer by hand: one heartbeat, then close, as a dying process's kernel would.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut line = serde_json::to_vec(&heartbeat("gw2")).unwrap();
        line.push(b'\n');
        stream.write_all(&line).await.unwrap();
        match events.recv().await.unwrap() {
            PeerEvent::Heartbeat(received, _) => assert_eq!(received, heartbeat("gw2")),
            other => panic!("expected a heartbeat, got {other:?}"),
        }
        drop(stream);
        assert_eq!(
            events.recv().await.unwrap(),
            PeerEvent::Closed {
                last: heartbeat("gw2")
            }
        );
    }

    #[tokio::test]
    async fn the_sender_reaches_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        let (_outgoing_tx, outgoing) = watch::channel(heartbeat("gw1"));
        spawn(
            listener,
            addr,
            Duration::from_millis(10),
            outgoing,
            events_tx,
        );
        match events.recv().await.unwrap() {
            PeerEvent::Heartbeat(received, _) => assert_eq!(received.id, "gw1"),
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_closes_the_connection_without_an_event() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, events_tx));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(stream);
        let nothing = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
        assert!(nothing.is_err(), "no event for a stranger: {nothing:?}");
    }
}
