//! The threads that serve clients: one per CPU by default (`threads`), each with an event loop
//! of its own, all accepting from the one public listening socket.
//!
//! ```text
//! public socket ─┬─ herd-serve-0: accept ─▶ connection ─▶ proxy ─▶ worker connection (shard 0)
//!                └─ herd-serve-1: accept ─▶ connection ─▶ proxy ─▶ worker connection (shard 1)
//! ```
//!
//! A client connection, the tasks of its requests and the worker connections they use stay on
//! the thread that accepted it, the way HAProxy and nginx run. On tokio's work-stealing runtime
//! a socket's events were often taken by one thread and its task run by the other, with a
//! wake-up between them; pinning cut the gateway's CPU per request by about a seventh and raised
//! its throughput (docs/performance.md, section 6). Every thread waits on its own duplicate of
//! the listening socket: one accept queue, and whichever thread is free first takes the next
//! connection. Admin traffic, the failover node and the registry run elsewhere (the caller's
//! runtime), health checks on their own thread, so neither waits behind client traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream;

/// What every serving thread shares: how to serve a client connection, and the limits on them.
pub struct Clients {
    /// The request path.
    pub proxy: Arc<Proxy>,
    /// HTTP/1.1 + HTTP/2 connection settings.
    pub builder: auto::Builder<TokioExecutor>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// `limits.max_connections`.
    pub max_connections: usize,
    /// `timeouts.shutdown_grace`.
    pub shutdown_grace: Duration,
    /// Open client connections over all threads.
    open: Arc<AtomicUsize>,
}

impl Clients {
    /// Serving settings; no connection open yet.
    pub fn new(
        proxy: Arc<Proxy>,
        builder: auto::Builder<TokioExecutor>,
        metrics: Arc<Metrics>,
        max_connections: usize,
        shutdown_grace: Duration,
    ) -> Self {
        Clients {
            proxy,
            builder,
            metrics,
            max_connections,
            shutdown_grace,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Serves one accepted connection on the current thread until it ends; one beyond
    /// `limits.max_connections` gets a 503 and is closed.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, graceful: &GracefulShutdown) {
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot::take(&self.open);
        if slot.count > self.max_connections {
            self.metrics.connections_refused.inc();
            self.serve_refusal(stream, slot, graceful);
            return;
        }
        let proxy = self.proxy.clone();
        let forwarded_for = crate::headers::forwarded_for(peer.ip());
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let proxy = proxy.clone();
            let forwarded_for = forwarded_for.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, &forwarded_for).await) }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(peer = %peer, error = %error, "client connection ended with an error");
            }
            drop(slot);
        });
    }

    /// Answers every request of a connection over the limit with 503 and closes it.
    fn serve_refusal(&self, stream: TcpStream, slot: ConnectionSlot, graceful: &GracefulShutdown) {
        let service = service_fn(|_request: hyper::Request<Incoming>| async {
            let id = crate::headers::new_request_id();
            let mut response =
                GatewayError::TooManyConnections.to_response(id.to_str().unwrap_or("-"));
            response.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            Ok::<_, Infallible>(response)
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }

    /// Client connections open right now, over all threads.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// The running serving threads.
pub struct ServingThreads {
    stop: CancellationToken,
    finished: Vec<oneshot::Receiver<()>>,
}

impl ServingThreads {
    /// Starts `count` threads (at least one) serving `clients` from `listener`.
    pub fn start(
        listener: std::net::TcpListener,
        count: usize,
        clients: Arc<Clients>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let stop = CancellationToken::new();
        let mut finished = Vec::new();
        for index in 0..count.max(1) {
            let listener = listener.try_clone()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (done, done_rx) = oneshot::channel();
            let (clients, stop) = (clients.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("herd-serve-{index}"))
                .spawn(move || {
                    upstream::use_shard(index);
                    runtime.block_on(serve_thread(listener, &clients, stop));
                    // Dropping the runtime ends the connections still open after the grace.
                    drop(runtime);
                    let _ = done.send(());
                })?;
            finished.push(done_rx);
        }
        Ok(ServingThreads { stop, finished })
    }

    /// Stops accepting on every thread, lets open connections finish their requests (each
    /// thread up to `timeouts.shutdown_grace`) and returns when all threads have ended.
    pub async fn stop(self) {
        self.stop.cancel();
        for finished in self.finished {
            // An error means the thread ended without saying so (a panic, already reported).
            let _ = finished.await;
        }
    }
}

/// One serving thread's life: accept until stopped, then drain.
async fn serve_thread(listener: std::net::TcpListener, clients: &Clients, stop: CancellationToken) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            error!(error = %error, "serving thread cannot use the public listener");
            return;
        }
    };
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => clients.serve(stream, peer, &graceful),
                // E.g. out of file descriptors: log and keep accepting.
                Err(error) => warn!(error = %error, "accept failed"),
            },
        }
    }
    drop(listener);
    if tokio::time::timeout(clients.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            grace = %humantime_serde::re::humantime::format_duration(clients.shutdown_grace),
            "shutdown grace over; closing the remaining connections"
        );
    }
}

/// Counts an open client connection for `limits.max_connections`.
struct ConnectionSlot {
    open: Arc<AtomicUsize>,
    count: usize,
}

impl ConnectionSlot {
    fn take(open: &Arc<AtomicUsize>) -> Self {
        let count = open.fetch_add(1, Ordering::Relaxed) + 1;
        ConnectionSlot {
            open: open.clone(),
            count,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}
