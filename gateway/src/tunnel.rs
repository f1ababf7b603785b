//! Switched protocols (WebSocket, or any HTTP/1.1 `Upgrade`): once the worker has answered 101,
//! the gateway copies bytes both ways between the client's connection and the worker's socket
//! until either side closes.
//!
//! ```text
//! client ── GET, Connection: upgrade, Upgrade: websocket ──▶ proxy ──▶ worker (same headers)
//! client ◀────────── 101, Upgrade: websocket ─────────────── proxy ◀── worker
//! client ◀═════════ bytes, both ways, until one side closes ═════════▶ worker socket
//! ```
//!
//! The worker's socket leaves the pool for good. Bytes the worker sent right behind its 101 (read
//! with the head) go to the client first. A tunnel does not count as a request in flight on its
//! worker (it may last hours; `limits.max_in_flight_per_worker` is about requests), and a stopping
//! gateway closes the tunnels still open once its in-flight requests are done.

use bytes::BytesMut;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::debug;

use crate::upstream::Connection;

/// The worker's side of a switched connection.
#[derive(Debug)]
pub struct WorkerTunnel {
    stream: TcpStream,
    /// Bytes of the new protocol read together with the 101.
    early: BytesMut,
}

impl WorkerTunnel {
    /// The worker's connection after its 101.
    pub fn new(connection: Connection) -> Self {
        let (stream, early) = connection.into_parts();
        WorkerTunnel { stream, early }
    }

    /// Waits for hyper to hand over the client's connection (after it wrote the 101), then
    /// copies both ways until either side closes; runs on its own task.
    pub fn spawn(self, client: OnUpgrade, request_id: String) {
        tokio::spawn(async move {
            let WorkerTunnel { mut stream, early } = self;
            let mut client = match client.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(error) => {
                    debug!(request_id, error = %error, "client left before the protocol switch");
                    return;
                }
            };
            if !early.is_empty() && client.write_all(&early).await.is_err() {
                return;
            }
            match tokio::io::copy_bidirectional(&mut client, &mut stream).await {
                Ok((to_worker, to_client)) => {
                    debug!(request_id, to_worker, to_client, "tunnel closed");
                }
                Err(error) => debug!(request_id, error = %error, "tunnel broke"),
            }
        });
    }
}
