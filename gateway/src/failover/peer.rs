//! The direct link between the two gateways: heartbeats both ways over TCP.
//!
//! Each gateway listens for its peer and also connects to it, sending one JSON [`Heartbeat`] per
//! line every heartbeat interval. TCP, not UDP, for one reason: when the peer's *process* dies,
//! its kernel closes the connection at once, so the survivor learns of a crash within a round trip
//! instead of after a timeout ([`PeerEvent::Closed`]). A partition or a vanished machine closes
//! nothing; those show up as silence, which alone never justifies a takeover (Redis decides).
//!
//! Only a clean end of stream (FIN) counts as the peer's death: that is what a dying process's
//! kernel sends. A sender that gives up on a stuck connection aborts it with a reset instead, so
//! a FIN queued behind a partition can't arrive after it heals and pass for a death while the
//! sender lives on. A reset, an over-long line, garbage or a connection silent for
//! [`READ_IDLE_HEARTBEATS`] intervals end the connection without an event.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Role;

/// The longest heartbeat line accepted (a real one is ~100 bytes); longer input is not our peer.
const MAX_LINE: usize = 4096;
/// Heartbeat intervals of silence after which an incoming connection is dropped (no event): a
/// peer that connects and never writes, or a half-open connection left by a partition.
const READ_IDLE_HEARTBEATS: u32 = 30;

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
    tokio::spawn(accept_loop(
        listener,
        interval * READ_IDLE_HEARTBEATS,
        events,
    ));
    tokio::spawn(send_loop(peer, interval, outgoing));
}

async fn accept_loop(listener: TcpListener, idle: Duration, events: mpsc::Sender<PeerEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(read_connection(stream, from, idle, events.clone()));
            }
            Err(error) => {
                warn!(%error, "peer link: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_connection(
    stream: TcpStream,
    from: SocketAddr,
    idle: Duration,
    events: mpsc::Sender<PeerEvent>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    let mut last: Option<Heartbeat> = None;
    loop {
        line.clear();
        // At most MAX_LINE + 1 bytes per line, so a stranger can't make us buffer without end.
        let limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = tokio::time::timeout(idle, read_line(limited, &mut line)).await;
        match read {
            Ok(Ok(0)) => {
                // A clean end of stream: the kernel on the other side closed it, so the process
                // is gone (a living sender aborts with a reset instead, see `send_loop`).
                if let Some(last) = last {
                    debug!(%from, peer = %last.id, "peer link: connection closed");
                    let _ = events.send(PeerEvent::Closed { last }).await;
                }
                return;
            }
            Ok(Ok(_)) if line.len() > MAX_LINE => {
                warn!(%from, "peer link: line too long, closing connection");
                return;
            }
            Ok(Ok(_)) => match serde_json::from_slice::<Heartbeat>(&line) {
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
            // A reset proves nothing about the peer's process (a living sender resets a stuck
            // connection); silence is for the node's timers and Redis to judge.
            Ok(Err(error)) => {
                debug!(%from, %error, "peer link: connection reset");
                return;
            }
            Err(_) => {
                debug!(%from, "peer link: connection silent, dropping it");
                return;
            }
        }
    }
}

/// Reads one line (up to and including `\n`) into `line`; 0 at the end of the stream.
async fn read_line(
    mut reader: impl tokio::io::AsyncBufRead + Unpin,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    reader.read_until(b'\n', line).await
}

async fn send_loop(peer: SocketAddr, interval: Duration, outgoing: watch::Receiver<Heartbeat>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut connection: Option<TcpStream> = None;
    loop {
        ticks.tick().await;
        if outgoing.has_changed().is_err() {
            // The node is gone (stopped, or its task ended): stop vouching for it. The clean
            // close tells the peer at once, instead of heartbeats claiming a role nobody renews.
            return;
        }
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
            // Abort with a reset, not a FIN: a FIN queued behind a partition would reach the peer
            // once it heals, and a clean close there means "this process died".
            if let Some(stream) = connection.take() {
                let _ = stream.set_zero_linger();
            }
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
        tokio::spawn(accept_loop(listener, Duration::from_secs(5), events_tx));

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
        tokio::spawn(accept_loop(listener, Duration::from_secs(5), events_tx));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(stream);
        let nothing = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
        assert!(nothing.is_err(), "no event for a stranger: {nothing:?}");
    }

    #[tokio::test]
    async fn a_reset_is_no_proof_of_death() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, Duration::from_secs(5), events_tx));
        // A living sender that gives up on a stuck connection aborts it: no `Closed`, or the
        // standby would take over the live active's lease.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut line = serde_json::to_vec(&heartbeat("gw2")).unwrap();
        line.push(b'\n');
        stream.write_all(&line).await.unwrap();
        assert!(matches!(
            events.recv().await.unwrap(),
            PeerEvent::Heartbeat(..)
        ));
        stream.set_zero_linger().unwrap();
        drop(stream);
        let nothing = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
        assert!(nothing.is_err(), "a reset reported as a death: {nothing:?}");
    }

    #[tokio::test]
    async fn an_endless_line_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, Duration::from_secs(5), events_tx));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // No newline, ever: the reader must not buffer it all. 64 MiB: more than loopback's
        // socket buffers hold (4 MiB could sit in them whole before the reader ran at all, and
        // the write then succeeded on a busy machine).
        let chunk = vec![b'a'; 64 * 1024];
        let writing = async {
            for _ in 0..1024 {
                if stream.write_all(&chunk).await.is_err() {
                    return true;
                }
            }
            false
        };
        let refused = tokio::time::timeout(Duration::from_secs(3), writing).await;
        assert_eq!(
            refused.ok(),
            Some(true),
            "64 MiB without a newline were taken"
        );
        let nothing = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
        assert!(nothing.is_err(), "no event for a stranger: {nothing:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_dropped_without_an_event() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, mut events) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, Duration::from_secs(3), events_tx));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut buffer = [0u8; 16];
        // The gateway hangs up on a connection that never speaks.
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection was kept: {read:?}"
        );
        let nothing = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
        assert!(
            nothing.is_err(),
            "no event for a silent stranger: {nothing:?}"
        );
    }

    #[tokio::test]
    async fn the_sender_stops_vouching_once_the_node_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (outgoing_tx, outgoing) = watch::channel(heartbeat("gw1"));
        tokio::spawn(send_loop(addr, Duration::from_millis(10), outgoing));
        let (stream, _) = listener.accept().await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        assert!(lines.next_line().await.unwrap().is_some());
        drop(outgoing_tx);
        let ended = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(Some(_)) = lines.next_line().await {}
        })
        .await;
        assert!(ended.is_ok(), "heartbeats went on for a node that is gone");
    }

    #[tokio::test]
    async fn a_stuck_connection_is_aborted_never_closed_cleanly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Heartbeats so big that a peer that doesn't read fills the buffers at once.
        let (_outgoing_tx, outgoing) = watch::channel(heartbeat(&"x".repeat(1 << 20)));
        tokio::spawn(send_loop(addr, Duration::from_millis(20), outgoing));
        let (mut stuck, _) = listener.accept().await.unwrap();
        let reconnected = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(
            reconnected.is_ok(),
            "the sender never gave up on the stuck connection"
        );
        // What the stuck connection ends with once read: a clean end of stream would read as
        // "the sender's process died" when a partition that held it back heals.
        let mut buffer = vec![0u8; 64 * 1024];
        let end = loop {
            match stuck.read(&mut buffer).await {
                Ok(0) => break "end of stream",
                Ok(_) => {}
                Err(_) => break "reset",
            }
        };
        assert_eq!(end, "reset");
    }
}
