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
//! wake-up between them; pinning cut the gateway's CPU per request by 15–20 % and raised
//! its throughput (docs/performance.md, section 6).
//!
//! Every thread waits on its own duplicate of the listening socket: one accept queue, whichever
//! thread is free first takes the next connection. Since a keep-alive connection stays where it
//! is served for its whole life, the accepting thread hands a new connection to the thread with
//! the fewest open ones when that one has at least two fewer than itself (over a channel; the
//! socket moves to that thread's event loop). Without it, a burst of new connections often
//! landed mostly on the thread that woke first: 49 / 15 instead of 32 / 32, and 17 % fewer
//! requests per second for the life of those connections. Admin traffic, the failover node and the registry run elsewhere (the caller's
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
use tokio::sync::{mpsc, oneshot};
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
    /// Open client connections, in all and per thread.
    occupancy: Arc<Occupancy>,
}

impl Clients {
    /// Serving settings for `threads` serving threads; no connection open yet.
    pub fn new(
        proxy: Arc<Proxy>,
        builder: auto::Builder<TokioExecutor>,
        metrics: Arc<Metrics>,
        max_connections: usize,
        shutdown_grace: Duration,
        threads: usize,
    ) -> Self {
        Clients {
            proxy,
            builder,
            metrics,
            max_connections,
            shutdown_grace,
            occupancy: Arc::new(Occupancy::new(threads.max(1))),
        }
    }

    /// Open connections of each serving thread (for the metrics).
    pub fn open_per_thread(&self) -> Arc<[AtomicUsize]> {
        self.occupancy.per_thread.clone()
    }

    /// Client connections open right now, over all threads.
    pub fn open(&self) -> usize {
        self.occupancy.total.load(Ordering::Relaxed)
    }

    /// Serves a connection on the current thread until it ends.
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnectionSlot,
        graceful: &GracefulShutdown,
    ) {
        let _ = stream.set_nodelay(true);
        let proxy = self.proxy.clone();
        let forwarded_for = crate::headers::forwarded_for(peer.ip());
        let service = service_fn(move |request: hyper::Request<Incoming>| {
            let proxy = proxy.clone();
            let forwarded_for = forwarded_for.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, &forwarded_for).await) }
        });
        // With upgrades: a WebSocket request's connection is handed to `crate::tunnel`.
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
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
}

/// The running serving threads.
pub struct ServingThreads {
    stop: CancellationToken,
    finished: Vec<oneshot::Receiver<()>>,
}

impl ServingThreads {
    /// Starts one thread per shard of `clients` (at least one), serving from `listener`.
    pub fn start(listener: std::net::TcpListener, clients: Arc<Clients>) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let count = clients.occupancy.per_thread.len();
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[Inbox]> = inboxes.into();
        // Built first, so that if a later thread cannot start, dropping it stops the earlier ones.
        let mut threads = ServingThreads {
            stop: CancellationToken::new(),
            finished: Vec::new(),
        };
        for (index, receiver) in receivers.into_iter().enumerate() {
            let listener = listener.try_clone()?;
            let thread = ServingThread {
                index,
                clients: clients.clone(),
                inboxes: inboxes.clone(),
                stop: threads.stop.clone(),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (done, done_rx) = oneshot::channel();
            std::thread::Builder::new()
                .name(format!("herd-serve-{index}"))
                .spawn(move || {
                    upstream::use_shard(index);
                    runtime.block_on(thread.run(listener, receiver));
                    // Dropping the runtime ends the connections still open after the grace.
                    drop(runtime);
                    let _ = done.send(());
                })?;
            threads.finished.push(done_rx);
        }
        Ok(threads)
    }

    /// Stops accepting on every thread, lets open connections finish their requests (each
    /// thread up to `timeouts.shutdown_grace`) and returns when all threads have ended.
    pub async fn stop(mut self) {
        self.stop.cancel();
        for finished in std::mem::take(&mut self.finished) {
            // An error means the thread ended without saying so (a panic, already reported).
            let _ = finished.await;
        }
    }
}

impl Drop for ServingThreads {
    /// Also when `run` is dropped before it stops them: the threads drain and end.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connection accepted on one thread for another to serve.
struct HandedOver {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
}

type Inbox = mpsc::UnboundedSender<HandedOver>;

/// One serving thread.
struct ServingThread {
    index: usize,
    clients: Arc<Clients>,
    /// Every thread's inbox, by index.
    inboxes: Arc<[Inbox]>,
    stop: CancellationToken,
}

impl ServingThread {
    /// Accepts until stopped, then drains its connections.
    async fn run(
        self,
        listener: std::net::TcpListener,
        mut inbox: mpsc::UnboundedReceiver<HandedOver>,
    ) {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                error!(error = %error, "serving thread cannot use the public listener");
                return;
            }
        };
        let graceful = GracefulShutdown::new();
        let mut failures = AcceptFailures::default();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => break,
                Some(handed) = inbox.recv() => self.serve_handed(handed, &graceful),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.place(stream, peer, &graceful),
                    Err(error) => failures.failed(&error).await,
                },
            }
        }
        drop(listener);
        // Serve what other threads handed over before they stopped too.
        inbox.close();
        while let Some(handed) = inbox.recv().await {
            self.serve_handed(handed, &graceful);
        }
        let grace = self.clients.shutdown_grace;
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(
                grace = %humantime_serde::re::humantime::format_duration(grace),
                "shutdown grace over; closing the remaining connections"
            );
        }
    }

    /// Serves a new connection here, or hands it to a thread with fewer connections (a burst of
    /// connections woken on one thread would otherwise stay there for their whole life).
    fn place(&self, stream: TcpStream, peer: SocketAddr, graceful: &GracefulShutdown) {
        let clients = &self.clients;
        let target = clients.occupancy.place(self.index);
        let mut slot = ConnectionSlot::take(&clients.occupancy, target);
        if slot.total > clients.max_connections {
            slot.move_to(self.index);
            clients.metrics.connections_refused.inc();
            clients.serve_refusal(stream, slot, graceful);
            return;
        }
        if target == self.index {
            clients.serve(stream, peer, slot, graceful);
            return;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                debug!(peer = %peer, error = %error, "cannot hand a connection over; closed");
                return;
            }
        };
        if let Err(mpsc::error::SendError(handed)) =
            self.inboxes[target].send(HandedOver { stream, peer, slot })
        {
            // The other thread is stopping: serve it here after all.
            self.serve_handed(handed, graceful);
        }
    }

    fn serve_handed(&self, handed: HandedOver, graceful: &GracefulShutdown) {
        let HandedOver {
            stream,
            peer,
            mut slot,
        } = handed;
        slot.move_to(self.index);
        match TcpStream::from_std(stream) {
            Ok(stream) => self.clients.serve(stream, peer, slot, graceful),
            Err(error) => {
                debug!(peer = %peer, error = %error, "cannot take a connection over; closed")
            }
        }
    }
}

/// How long a thread stops accepting after running out of file descriptors or memory.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// How often a thread logs failed accepts while they go on.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(5);

/// Failed accepts of one accept loop: logged at most every [`ACCEPT_LOG_EVERY`] (out of file
/// descriptors, a gateway with many threads would otherwise write hundreds of lines a second).
#[derive(Debug, Default)]
pub(crate) struct AcceptFailures {
    last_logged: Option<std::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// Counts (and now and then logs) a failed accept; after running out of file descriptors or
    /// memory, also waits a moment: the connection stays queued and accepting again at once
    /// would fail the same way, spinning a core and starving the connections already open.
    pub(crate) async fn failed(&mut self, error: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_LOG_EVERY)
        {
            warn!(error = %error, failed_since_last_line = self.unlogged, "accept failed");
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        if is_resource_shortage(error) {
            tokio::time::sleep(ACCEPT_PAUSE).await;
        }
    }
}

/// Whether an accept failed for lack of a resource that only freeing something brings back.
fn is_resource_shortage(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    error.raw_os_error().is_some_and(|code| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .contains(&Errno::from_raw(code))
    })
}

/// Open client connections, in all (for `limits.max_connections`) and per serving thread (to
/// place new ones).
struct Occupancy {
    total: AtomicUsize,
    per_thread: Arc<[AtomicUsize]>,
}

impl Occupancy {
    fn new(threads: usize) -> Self {
        Occupancy {
            total: AtomicUsize::new(0),
            per_thread: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Where a connection accepted on thread `here` is served: here, unless some thread serves
    /// at least two connections fewer (then the least busy one). One of slack keeps a
    /// connection from being handed over for a difference that the next one evens out.
    fn place(&self, here: usize) -> usize {
        let load = |index: usize| self.per_thread[index].load(Ordering::Relaxed);
        let least = (0..self.per_thread.len())
            .min_by_key(|&index| load(index))
            .unwrap_or(here);
        if load(here) > load(least) + 1 {
            least
        } else {
            here
        }
    }
}

/// One open client connection, counted in all and on the thread serving it.
struct ConnectionSlot {
    occupancy: Arc<Occupancy>,
    thread: usize,
    /// Open connections in all, this one included, when it was taken.
    total: usize,
}

impl ConnectionSlot {
    fn take(occupancy: &Arc<Occupancy>, thread: usize) -> Self {
        let total = occupancy.total.fetch_add(1, Ordering::Relaxed) + 1;
        occupancy.per_thread[thread].fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            occupancy: occupancy.clone(),
            thread,
            total,
        }
    }

    /// Counts the connection on `thread` instead (it was served elsewhere than planned).
    fn move_to(&mut self, thread: usize) {
        if thread != self.thread {
            self.occupancy.per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
            self.occupancy.per_thread[thread].fetch_add(1, Ordering::Relaxed);
            self.thread = thread;
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.occupancy.total.fetch_sub(1, Ordering::Relaxed);
        self.occupancy.per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occupancy(loads: &[usize]) -> Arc<Occupancy> {
        let occupancy = Arc::new(Occupancy::new(loads.len()));
        for (thread, &load) in loads.iter().enumerate() {
            occupancy.per_thread[thread].store(load, Ordering::Relaxed);
        }
        occupancy
    }

    #[test]
    fn a_connection_stays_unless_another_thread_has_two_fewer() {
        assert_eq!(occupancy(&[0]).place(0), 0);
        assert_eq!(occupancy(&[3, 2]).place(0), 0);
        assert_eq!(occupancy(&[4, 2]).place(0), 1);
        assert_eq!(occupancy(&[2, 9, 5]).place(1), 0);
        assert_eq!(occupancy(&[2, 2, 2]).place(2), 2);
    }

    #[test]
    fn only_running_out_of_resources_pauses_accepting() {
        let errno = |code: nix::errno::Errno| std::io::Error::from_raw_os_error(code as i32);
        assert!(is_resource_shortage(&errno(nix::errno::Errno::EMFILE)));
        assert!(is_resource_shortage(&errno(nix::errno::Errno::ENFILE)));
        assert!(!is_resource_shortage(&errno(
            nix::errno::Errno::ECONNABORTED
        )));
        assert!(!is_resource_shortage(&std::io::Error::other("other")));
    }

    #[tokio::test]
    async fn failed_accepts_are_logged_once_per_period_and_counted_between() {
        let mut failures = AcceptFailures::default();
        let aborted = std::io::Error::from_raw_os_error(nix::errno::Errno::ECONNABORTED as i32);
        for _ in 0..3 {
            failures.failed(&aborted).await;
        }
        assert!(failures.last_logged.is_some());
        assert_eq!(failures.unlogged, 2);
    }

    #[test]
    fn slots_count_in_all_and_per_thread_until_dropped() {
        let occupancy = occupancy(&[0, 0]);
        let mut first = ConnectionSlot::take(&occupancy, 0);
        let second = ConnectionSlot::take(&occupancy, 0);
        assert_eq!((first.total, second.total), (1, 2));
        first.move_to(1);
        let load = |thread: usize| occupancy.per_thread[thread].load(Ordering::Relaxed);
        assert_eq!((load(0), load(1)), (1, 1));
        drop(first);
        drop(second);
        assert_eq!((load(0), load(1)), (0, 0));
        assert_eq!(occupancy.total.load(Ordering::Relaxed), 0);
    }
}
