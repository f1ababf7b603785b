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
//! Every thread in use waits on its own duplicate of the listening socket: one accept queue,
//! whichever thread is free first takes the next connection (a thread out of use takes its
//! duplicate off its event loop: `Listening`). Since a keep-alive connection stays where it
//! is served for its whole life, the accepting thread hands a new connection to the thread with
//! the fewest open ones when that one has fewer than itself by more than a slack (over a
//! channel; the socket moves to that thread's event loop). Without it, a burst of new
//! connections often landed mostly on the thread that woke first: 49 / 15 instead of 32 / 32,
//! and 17 % fewer requests per second for the life of those connections. Admin traffic, the
//! failover node and the registry run elsewhere (the caller's runtime), health checks on their
//! own thread, so neither waits behind client traffic.
//!
//! With `adaptive_threads`, new connections go only to the threads the load needs
//! (`crate::consolidation` decides how many, every quarter second), and idle HTTP/1.1
//! connections move between threads: a thread told to shed some (`Message::Shed`) lets each give
//! its socket back at its next moment between two requests (`crate::connections`), and hands
//! it, with the bytes of the next request already read, to the least loaded thread in use.
//!
//! A new connection's protocol is told by its first bytes (the HTTP/2 preface or not, within
//! `timeouts.request_head`). A cleartext HTTP/1.1 connection is served by the gateway's own
//! server while its requests are plain (`crate::plain_http1`), by hyper from the first that is
//! not (a body, an upgrade); TLS HTTP/1.1 the same way, through the session; HTTP/2 by the
//! gateway's own server on the `h2` crate (`crate::h2_server`), cleartext or after TLS's ALPN.
//!
//! Limits on clients (docs/security.md): a new connection over `limits.max_connections` gets one
//! 503, one over `limits.max_connections_per_client` from its address one 429, both JSON with
//! `Connection: close`, after a second look once the client has sent something
//! (`Clients::admit_later`: connections closed just before may not have been seen closing yet).
//! The per-address count is one map over all threads (`PerClient`), since a client's
//! connections land on any thread. Every client socket is a
//! [`crate::client_io::ClientIo`]: head, idle and send timeouts, and the framing check whose
//! finding the service answers here with a 400.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::body::{ClientBody, ClientIncoming, ResponseBody};
use crate::client_io::{ClientIo, ClientTimeouts, ConnectionState, RequestGuard};
use crate::config::GatewayConfig;
use crate::connections::{self, Ended};
use crate::consolidation::Consolidation;
use crate::error::GatewayError;
use crate::h2_server::{Http2Connection, Http2Settings};
use crate::h2_streams::WithStreams;
use crate::hang_up::{ClientHungUp, HangUpWatch, SharedStream, UntilHungUp, Watcher};
use crate::metrics::Metrics;
use crate::plain_http1;
use crate::proxy::Proxy;
use crate::tls::Terminator;
use crate::tls::redirect::Redirect;
use crate::upstream;
use crate::upstream::WorkerBodyError;

/// The HTTP/1.1 and HTTP/2 settings of client connections.
#[derive(Clone, Debug)]
pub struct Protocols {
    /// HTTP/1.1 (with upgrades).
    pub http1: http1::Builder,
    /// The same with hyper's check for a client hang-up off (`half_close`): for connections
    /// whose requests the gateway watches itself (`crate::hang_up`).
    pub http1_watched: http1::Builder,
    /// HTTP/2, cleartext (prior knowledge) or after TLS (`crate::h2_server`).
    pub http2: Http2Settings,
    /// Both, told apart by hyper-util (for the refusals of connections over a limit).
    pub auto: auto::Builder<TokioExecutor>,
}

/// What every serving thread shares: how to serve a client connection, and the limits on them.
pub struct Clients {
    /// The request path.
    pub proxy: Arc<Proxy>,
    /// HTTP/1.1 + HTTP/2 connection settings.
    pub protocols: Protocols,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// `limits.max_connections`.
    pub max_connections: usize,
    /// `timeouts.shutdown_grace`.
    pub shutdown_grace: Duration,
    /// `timeouts.tunnel_idle`.
    pub tunnel_idle: Duration,
    /// Head, idle and send timeouts of every client connection.
    timeouts: ClientTimeouts,
    /// Open client connections, in all and per thread.
    occupancy: Arc<Occupancy>,
    /// Open connections per client address (`None`: no limit).
    per_client: Option<Arc<PerClient>>,
    /// TLS termination for connections from `tls.listen` (`None`: `[tls]` is off).
    tls: Option<Arc<Terminator>>,
    /// `tls.redirect_http`: cleartext requests are answered with a redirect to https.
    redirect: Option<Redirect>,
    /// Set when the gateway starts to stop (see [`Clients::drain`]).
    draining: CancellationToken,
    /// Set when the connections still open should close now (see [`Clients::close_idle`]).
    closing_idle: CancellationToken,
    /// `adaptive_threads`: serve on as few threads as the load needs.
    adaptive: bool,
    /// Every serving thread's inbox, by index (set when the threads start).
    inboxes: std::sync::OnceLock<Arc<[Inbox]>>,
}

impl Clients {
    /// Serving settings for `threads` serving threads; no connection open yet.
    pub fn new(
        proxy: Arc<Proxy>,
        protocols: Protocols,
        metrics: Arc<Metrics>,
        config: &GatewayConfig,
        threads: usize,
    ) -> Self {
        let per_client = config.limits.max_connections_per_client;
        Clients {
            draining: CancellationToken::new(),
            closing_idle: CancellationToken::new(),
            proxy,
            protocols,
            metrics,
            max_connections: config.limits.max_connections,
            shutdown_grace: config.timeouts.shutdown_grace,
            tunnel_idle: config.timeouts.tunnel_idle,
            timeouts: ClientTimeouts {
                head: config.timeouts.request_head,
                idle: config.timeouts.client_idle,
                send: config.timeouts.client_send,
            },
            occupancy: Arc::new(Occupancy::new(threads.max(1))),
            per_client: (per_client > 0).then(|| Arc::new(PerClient::new(per_client))),
            tls: None,
            redirect: None,
            adaptive: config.adaptive_threads,
            inboxes: std::sync::OnceLock::new(),
        }
    }

    /// Terminates TLS on the connections of the TLS listener with `tls`; with `redirect`, the
    /// cleartext listener only redirects to https.
    pub fn with_tls(mut self, tls: Arc<Terminator>, redirect: Option<Redirect>) -> Self {
        self.tls = Some(tls);
        self.redirect = redirect;
        self
    }

    /// Open connections of each serving thread (for the metrics).
    pub fn open_per_thread(&self) -> Arc<[AtomicUsize]> {
        self.occupancy.per_thread.clone()
    }

    /// Client connections open right now, over all threads.
    pub fn open(&self) -> usize {
        self.occupancy.total.load(Ordering::Relaxed)
    }

    /// The gateway starts to stop: from now on every HTTP/1 response says `Connection: close`
    /// (the connection closes once it is written), and connections accepted meanwhile serve one
    /// request. Connections that stay idle are closed by [`Clients::close_idle`].
    ///
    /// Why in two steps: a graceful stop hands the floating address to the standby, and a client
    /// that kept a connection to this gateway would send its next request on it after the address
    /// moved, reach the new holder, which knows no such connection, and be reset. But closing an
    /// idle keep-alive connection races with a request the client is sending on it just then
    /// (HTTP/1.1 has no clean way out: the client sees the connection closed under its request).
    /// So connections in use are closed by their next response — no race — and only those idle
    /// through the whole hand-over are closed from our side, when the standby reports itself
    /// active, before the address moves.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Closes the connections still open after [`Clients::drain`]: idle keep-alive ones now, one
    /// with a request in progress after its response (HTTP/2 gets GOAWAY). Implies `drain`.
    pub fn close_idle(&self) {
        self.draining.cancel();
        self.closing_idle.cancel();
    }

    /// Serves a connection on the current thread until it ends or moves; `secure`: it came
    /// from the TLS listener and is served after its handshake; `opening`: how far another
    /// thread got with it.
    fn serve(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnectionSlot,
        secure: bool,
        opening: Opening,
    ) {
        // Registered before the task first runs: a thread told to stop or close right after
        // this sees the connection.
        let entry = connections::Entry::new(matches!(opening, Opening::Resumed(_)));
        self.serve_registered(stream, peer, slot, secure, opening, entry);
    }

    /// [`Clients::serve`], with the connection already registered with its thread as `entry`.
    fn serve_registered(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: ConnectionSlot,
        secure: bool,
        opening: Opening,
        entry: connections::Entry,
    ) {
        // Set on the listeners (`crate::server`), which new connections take it from on Linux.
        if !herd_shared::net::ACCEPTED_INHERIT_NO_DELAY && matches!(opening, Opening::New { .. }) {
            let _ = stream.set_nodelay(true);
        }
        let clients = self.clone();
        let Some(tls) = self.tls.as_ref().filter(|_| secure) else {
            // Made on the heap, so that the task holds a pointer: tokio copies a task's future
            // into the task when spawned and again as it ends (about 1 KB here, each copy into
            // memory not yet touched for a new connection).
            tokio::spawn(Boxed::place(move || async move {
                let (mut stream, mut slot, mut opening) = (stream, slot, opening);
                if let Opening::New { head_due } = opening {
                    let sniffed = {
                        // Pinned where it is made: passed by value, it was copied into the wait.
                        let sniffing = std::pin::pin!(Opening::sniff(&mut stream, head_due));
                        entry.until_stopped(sniffing).await
                    };
                    opening = match sniffed {
                        Some(Ok(sniffed)) => sniffed,
                        Some(Err(error)) => {
                            debug!(peer = %peer, error = %error, "client connection ended before a request");
                            return;
                        }
                        None => return,
                    };
                    // HTTP/2 stays on one thread for its life: spread over all of them, not
                    // only the threads in use.
                    if let Opening::Sniffed { http2: true, .. } = opening {
                        let Some(kept) = clients.place_for_life(stream, peer, slot, opening) else {
                            return;
                        };
                        (stream, slot, opening) = kept;
                    }
                }
                // Only cleartext HTTP/1.1 is ever handed back (a TLS session stays where its
                // handshake was).
                let mut entry = Some(entry);
                loop {
                    let entry = entry
                        .take()
                        .unwrap_or_else(|| connections::Entry::new(true));
                    // On the heap, made there: serving's future is about 6 KB, and made here
                    // then moved into its box it was copied whole into memory not yet touched
                    // (for a connection per request, half of the gateway's cache misses on
                    // writes; docs/performance.md, section 42).
                    if let Opening::Sniffed { http2: true, .. } = opening {
                        Boxed::place(|| {
                            clients.serve_stream(stream, peer, None, opening, entry, None)
                        })
                        .await;
                        break;
                    }
                    // Shared with the hang-up watches of its requests (`crate::hang_up`).
                    let shared = SharedStream::new(stream);
                    let watcher = Some(shared.watcher());
                    let serving = Boxed::place(|| {
                        clients.serve_stream(shared, peer, None, opening, entry, watcher)
                    });
                    let Some(handed) = serving.await else {
                        break;
                    };
                    let resumed = Opening::Resumed(handed.resumed);
                    let here = slot.thread;
                    let Ok(unshared) = handed.stream.into_inner() else {
                        // Not expected: a connection is handed back between two requests,
                        // when every watch of its requests is gone.
                        warn!(peer = %peer, "a connection handed back was still watched; closed");
                        return;
                    };
                    let Some(kept) =
                        clients.hand_over(unshared, peer, (slot, here), (resumed, false), None)
                    else {
                        return;
                    };
                    (stream, slot, opening) = kept;
                }
                drop(slot);
            }));
            return;
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(handshake) = entry.until_stopped(tls.handshake(stream)).await else {
                return;
            };
            match handshake {
                Ok(stream) => {
                    // The head timeout starts after the handshake, which has its own.
                    let opening = Opening::new(clients.timeouts.head);
                    let serving = Boxed::place(|| {
                        clients.serve_stream(stream, peer, Some(&tls), opening, entry, None)
                    });
                    let _ = serving.await;
                }
                Err(error) => debug!(peer = %peer, error = %error, "TLS handshake failed"),
            }
            drop(slot);
        });
    }

    /// Hands a connection that will never move (HTTP/2) to the least loaded of all threads
    /// when that is another one; returns it when it stays here.
    fn place_for_life(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        mut slot: ConnectionSlot,
        opening: Opening,
    ) -> Option<(TcpStream, ConnectionSlot, Opening)> {
        if !self.adaptive {
            return Some((stream, slot, opening));
        }
        let here = slot.thread;
        let target = self.occupancy.place_for_life(here);
        slot.fix();
        self.hand_over(stream, peer, (slot, here), (opening, false), Some(target))
    }

    /// Serves HTTP (h1 or h2, with upgrades) over a client's stream until the connection ends,
    /// or, for cleartext HTTP/1.1, until it gives its socket back between two requests
    /// ([`connections::shed`]); `tls` when the stream is a TLS session (the scheme for workers,
    /// HSTS); `watcher`: HTTP/1.1 requests are watched for a client hang-up by the gateway, not
    /// by hyper (`crate::hang_up`).
    async fn serve_stream<S>(
        &self,
        mut stream: S,
        peer: SocketAddr,
        tls: Option<&Terminator>,
        opening: Opening,
        entry: connections::Entry,
        watcher: Option<Watcher>,
    ) -> Option<Handed<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let opening = match opening {
            Opening::New { head_due } => {
                let sniffing = std::pin::pin!(Opening::sniff(&mut stream, head_due));
                match entry.until_stopped(sniffing).await {
                    Some(Ok(sniffed)) => sniffed,
                    Some(Err(error)) => {
                        debug!(peer = %peer, error = %error, "client connection ended before a request");
                        return None;
                    }
                    None => return None,
                }
            }
            opening => opening,
        };
        let (io, state, http2) = match opening {
            Opening::New { .. } => unreachable!("sniffed above"),
            Opening::Sniffed {
                http2,
                first,
                head_due,
            } => {
                let state = Arc::new(ConnectionState::default());
                let io = ClientIo::new(stream, state.clone(), self.timeouts)
                    .head_due(head_due)
                    .with_prefix(first);
                (io, state, http2)
            }
            Opening::Resumed(Resumed { state, read_ahead }) => {
                let io =
                    ClientIo::resumed(stream, state.clone(), self.timeouts).with_prefix(read_ahead);
                (io, state, false)
            }
        };
        let context = ServiceContext {
            proxy: self.proxy.clone(),
            metrics: self.metrics.clone(),
            forwarded_for: crate::headers::forwarded_for(peer.ip()),
            over_tls: tls.map(|_| crate::headers::OverTls::new(peer.ip())),
            hsts: tls.and_then(|tls| tls.hsts().cloned()),
            redirect: if tls.is_none() { self.redirect } else { None },
            draining: self.draining.clone(),
            state: state.clone(),
            watcher: if http2 { None } else { watcher },
        };
        let context = Arc::new(context);
        let movable = self.adaptive && tls.is_none();
        if http2 {
            let connection = Http2Connection::new(io, context, &self.protocols.http2);
            let connection = WithStreams::new(connections::Watched::new(connection, entry));
            if let Err(error) = connection.await {
                debug!(peer = %peer, error = %error, "client connection ended with an error");
            }
            return None;
        }
        // HTTP/1.1: the gateway's own server, while the requests are plain. Cleartext requests
        // are watched for a hang-up by their socket (`crate::hang_up`), those over TLS by the
        // server itself, reading through the session (`plain_http1`).
        let own_server = context.watcher.is_some() || tls.is_some();
        let mut io = io;
        // Hyper gave the connection back to the own server before.
        let mut returned = false;
        loop {
            let mut back = false;
            if own_server {
                let begun = state.latest_request();
                io = match plain_http1::serve(io, &context, &entry, movable).await {
                    plain_http1::Ended::Closed => return None,
                    plain_http1::Ended::Handed {
                        stream,
                        state,
                        read_ahead,
                    } => return Some(Handed::new(stream, state, read_ahead)),
                    plain_http1::Ended::ToHyper(io) => *io,
                };
                // Hyper serves the request left to it and gives the connection back after it,
                // so an upload does not cost the requests after it the own server (a fifth
                // of a plain request's work, and more with raw heads). Not when the own server
                // served nothing since hyper last gave it back: a client whose every request is
                // an upload stays with hyper, instead of moving between the two each time.
                back = !returned || state.latest_request() > begun;
            }
            // With upgrades: a WebSocket request's connection is handed to `crate::tunnel`.
            let http1 = if context.watcher.is_some() {
                &self.protocols.http1_watched
            } else {
                &self.protocols.http1
            };
            let connection = http1
                .serve_connection(TokioIo::new(io), context.clone().service::<Inline>())
                .with_upgrades();
            let served = connections::Http1::new(connection, state.clone(), &entry, movable)
                .back_to_own_server(back);
            match served.await {
                Ended::Closed(Ok(())) => return None,
                Ended::Closed(Err(error)) => {
                    debug!(peer = %peer, error = %error, "client connection ended with an error");
                    return None;
                }
                Ended::Handed {
                    stream,
                    state,
                    read_ahead,
                } => return Some(Handed::new(stream, state, read_ahead)),
                Ended::Returned {
                    stream,
                    state,
                    read_ahead,
                } => {
                    io = ClientIo::resumed(stream, state, self.timeouts).with_prefix(read_ahead);
                    returned = true;
                }
            }
        }
    }

    /// Sends a connection served on thread `here` to the thread that should serve it now
    /// (`target`, or the least loaded other thread in use); returns it (to be served on here)
    /// when there is none, it is this one, or that thread is stopping.
    fn hand_over(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        (slot, here): (ConnectionSlot, usize),
        (opening, secure): (Opening, bool),
        target: Option<usize>,
    ) -> Option<(TcpStream, ConnectionSlot, Opening)> {
        let target = target.or_else(|| self.occupancy.place_moved(here));
        let (Some(target), Some(inboxes)) = (target.filter(|&t| t != here), self.inboxes.get())
        else {
            return Some((stream, slot, opening));
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                debug!(peer = %peer, error = %error, "cannot move a connection; closed");
                return None;
            }
        };
        // Counted there at once, so that connections handed over together spread.
        let mut slot = slot;
        slot.move_to(target);
        let moved = matches!(opening, Opening::Resumed(_));
        let message = Message::Connection(HandedOver {
            stream,
            peer,
            slot,
            secure,
            opening,
        });
        match inboxes[target].send(message) {
            Ok(()) => {
                if moved {
                    self.metrics.connections_moved.inc();
                }
                None
            }
            Err(mpsc::error::SendError(message)) => {
                let Message::Connection(returned) = message else {
                    unreachable!("the message sent")
                };
                let mut slot = returned.slot;
                slot.move_to(here);
                match TcpStream::from_std(returned.stream) {
                    Ok(stream) => Some((stream, slot, returned.opening)),
                    Err(error) => {
                        debug!(peer = %peer, error = %error, "cannot take a connection back; closed");
                        None
                    }
                }
            }
        }
    }

    /// Counts a new connection against `limits.max_connections_per_client`, unless it is over
    /// `limits.max_connections` (`open` connections in all, this one included) or that limit.
    fn admit(&self, slot: &mut ConnectionSlot, open: usize, ip: IpAddr) -> Result<(), OverLimit> {
        if open > self.max_connections {
            return Err(OverLimit::Connections);
        }
        if let Some(per_client) = &self.per_client {
            slot.client = Some(per_client.take(ip).ok_or(OverLimit::ClientConnections)?);
        }
        Ok(())
    }

    /// A new connection that was over a limit when accepted, looked at again before it is
    /// refused: once its client has sent something (right away over TLS, whose client could not
    /// read the refusal anyway) and this thread has run what was woken with it, then after
    /// pauses of up to [`ADMIT_AGAIN_AFTER`] in all for the other threads. Served as a new
    /// connection (placed as at accept) if it is then within the limits.
    ///
    /// Connections their clients have closed count until the gateway reads their end, and a
    /// burst of new connections can be accepted before the ends that arrived with them: a
    /// client that closed its connections and at once opened as many new ones was told 429 for
    /// connections it no longer had (`herd bench proxy --proxy-cpus`, where the gateway runs in
    /// bursts, saw it between two loads). The wait is registered with the thread (a stopping
    /// thread ends it) and keeps the head deadline set at accept.
    async fn admit_later(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        mut slot: ConnectionSlot,
        (secure, head_due): (bool, tokio::time::Instant),
        mut over: OverLimit,
    ) {
        let entry = connections::Entry::new(false);
        let looks = async {
            if !secure {
                let mut first = [0u8; 1];
                match tokio::time::timeout_at(head_due, stream.peek(&mut first)).await {
                    Ok(Ok(1..)) => {}
                    // Closed, failed or silent until its head was due: nothing to answer.
                    _ => return Err(false),
                }
                // Behind the tasks woken with it: the connections whose end came in the same
                // batch.
                tokio::task::yield_now().await;
            }
            let mut pauses = ADMIT_AGAIN_AFTER.iter();
            loop {
                let open = self.occupancy.total.load(Ordering::Relaxed);
                match self.admit(&mut slot, open, peer.ip()) {
                    Ok(()) => return Ok(()),
                    Err(still) => over = still,
                }
                let Some(&pause) = pauses.next() else {
                    return Err(true);
                };
                tokio::time::sleep(pause).await;
            }
        };
        let answer = match entry.until_stopped(looks).await {
            Some(Ok(())) => {
                let here = slot.thread;
                let target = if secure {
                    self.occupancy.place_for_life(here)
                } else {
                    self.occupancy.place(here)
                };
                let opening = (Opening::New { head_due }, secure);
                if let Some((stream, slot, opening)) =
                    self.hand_over(stream, peer, (slot, here), opening, Some(target))
                {
                    self.serve_registered(stream, peer, slot, secure, opening, entry);
                }
                return;
            }
            Some(Err(answer)) => answer,
            // The thread stops: closed with the others.
            None => return,
        };
        over.counter(&self.metrics).inc();
        // A TLS client can't read a cleartext answer: it is closed before its handshake.
        if answer && !secure {
            self.serve_refusal(stream, slot, head_due, over.error());
        }
    }

    /// Answers every request of a connection over a limit with `error` (503 or 429) and closes
    /// it; its head is due by `head_due`.
    fn serve_refusal(
        &self,
        stream: TcpStream,
        slot: ConnectionSlot,
        head_due: tokio::time::Instant,
        error: fn() -> GatewayError,
    ) {
        let metrics = self.metrics.clone();
        let service = service_fn(move |_request: hyper::Request<Incoming>| {
            let response = refusal(&error(), &metrics);
            async move { Ok::<_, Infallible>(response) }
        });
        // The head timeout holds here too: a refused client can't keep the connection.
        let io = ClientIo::new(stream, Arc::default(), self.timeouts).head_due(head_due);
        let connection = self
            .protocols
            .auto
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let connection = connections::Watched::new(connection, connections::Entry::new(false));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
}

/// The pauses between the looks at a connection over a limit ([`Clients::admit_later`]): 127
/// ms in all, time for the other serving threads to read the ends of closed connections on a
/// busy machine (or under a CPU quota: several of its periods). A refused client gets its
/// answer that much later; a silent one holds its slot up to `timeouts.request_head` anyway.
const ADMIT_AGAIN_AFTER: [Duration; 7] = [
    Duration::from_millis(1),
    Duration::from_millis(2),
    Duration::from_millis(4),
    Duration::from_millis(8),
    Duration::from_millis(16),
    Duration::from_millis(32),
    Duration::from_millis(64),
];

/// The limit a new connection is over.
#[derive(Debug, Clone, Copy)]
enum OverLimit {
    /// `limits.max_connections`: 503.
    Connections,
    /// `limits.max_connections_per_client`: 429.
    ClientConnections,
}

impl OverLimit {
    /// The counter of connections refused for it.
    fn counter(self, metrics: &Metrics) -> &prometheus_client::metrics::counter::Counter {
        match self {
            OverLimit::Connections => &metrics.connections_refused,
            OverLimit::ClientConnections => &metrics.connections_refused_per_client,
        }
    }

    /// The answer to a connection refused for it.
    fn error(self) -> fn() -> GatewayError {
        match self {
            OverLimit::Connections => || GatewayError::TooManyConnections,
            OverLimit::ClientConnections => || GatewayError::TooManyClientConnections,
        }
    }
}

/// How far a connection got before a thread serves it.
enum Opening {
    /// Just accepted (over TLS: through its handshake); its first head is due by `head_due`.
    New { head_due: tokio::time::Instant },
    /// Its first bytes read: HTTP/2 or HTTP/1.1, the bytes, and when its first head is due.
    Sniffed {
        http2: bool,
        first: Bytes,
        head_due: tokio::time::Instant,
    },
    /// Handed over by another thread between two HTTP/1.1 requests.
    Resumed(Resumed),
}

impl Opening {
    /// A connection just accepted, whose first head is due within `head` from now.
    fn new(head: Duration) -> Self {
        Opening::New {
            head_due: tokio::time::Instant::now() + head,
        }
    }

    /// Reads a new connection's first bytes (see [`first_bytes`]); its first head is due by
    /// `head_due`.
    async fn sniff<S: AsyncRead + Unpin>(
        stream: &mut S,
        head_due: tokio::time::Instant,
    ) -> std::io::Result<Self> {
        let (http2, first) = first_bytes(stream, head_due).await?;
        Ok(Opening::Sniffed {
            http2,
            first,
            head_due,
        })
    }
}

/// What an HTTP/1.1 connection handed over between two requests brings along.
struct Resumed {
    state: Arc<ConnectionState>,
    /// Bytes of its next request already read from the socket.
    read_ahead: Bytes,
}

/// An HTTP/1.1 connection that gave its socket back between two requests.
struct Handed<S> {
    stream: S,
    resumed: Resumed,
}

impl<S> Handed<S> {
    fn new(stream: S, state: Arc<ConnectionState>, read_ahead: Bytes) -> Self {
        Handed {
            stream,
            resumed: Resumed { state, read_ahead },
        }
    }
}

/// The first line of the HTTP/2 connection preface (RFC 9113 §3.4), all 24 bytes of it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A new connection's first read: room for a whole ordinary request head.
const FIRST_READ: usize = 4096;

/// Reads a new connection's first bytes, as many as it takes to tell HTTP/2's preface from an
/// HTTP/1.1 request (what hyper-util's auto builder does, here with the head timeout):
/// whether it is HTTP/2, and the bytes read.
async fn first_bytes<S: AsyncRead + Unpin>(
    stream: &mut S,
    due: tokio::time::Instant,
) -> std::io::Result<(bool, Bytes)> {
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let reading = async {
        loop {
            if stream.read_buf(&mut first).await? == 0 {
                if first.is_empty() {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                return Ok::<bool, std::io::Error>(false);
            }
            let compared = first.len().min(H2_PREFACE.len());
            if first[..compared] != H2_PREFACE[..compared] {
                return Ok(false);
            }
            if compared == H2_PREFACE.len() {
                return Ok(true);
            }
        }
    };
    let http2 = tokio::time::timeout_at(due, reading).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not received in time",
        )
    })??;
    Ok((http2, first.freeze()))
}

/// What the service of one client connection needs, for each of its requests.
pub(crate) struct ServiceContext {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    /// The client's address as an `X-Forwarded-For` value.
    forwarded_for: http::HeaderValue,
    /// Set on connections from `tls.listen`.
    over_tls: Option<crate::headers::OverTls>,
    /// `Strict-Transport-Security`, for connections over TLS when `tls.hsts` is set.
    hsts: Option<http::HeaderValue>,
    redirect: Option<Redirect>,
    draining: CancellationToken,
    pub(crate) state: Arc<ConnectionState>,
    /// Cleartext HTTP/1.1: makes each request's hang-up watch (`crate::hang_up`).
    watcher: Option<Watcher>,
}

/// Where the request path's future sits while a request is served. The future is several KB.
/// HTTP/1.1 moves it once, and keeping it inline saves the allocation and a copy
/// (`infra/bench/instructions.sh h1`: 29 361 → 28 693 per request, docs/performance.md section
/// 13); an HTTP/2 stream's future is made in its own allocation (`crate::h2_server`), with the
/// request path inline in it. When hyper's HTTP/2 server moved the future four times per
/// request (into the stream, the spawn, the task), it went on the heap here.
pub(crate) trait Placement: 'static {
    /// The future `make` makes, placed. A maker rather than a future: the heap placement makes
    /// it straight into its allocation, where a future passed in was made on the stack first and
    /// then copied whole (3 296 bytes, most of them room for later states) into the box.
    fn place<F: Future + Send>(make: impl FnOnce() -> F) -> impl Future<Output = F::Output> + Send;
}

/// In the service's own future (HTTP/1.1, and an HTTP/2 stream's).
pub(crate) struct Inline;

impl Placement for Inline {
    fn place<F: Future + Send>(make: impl FnOnce() -> F) -> impl Future<Output = F::Output> + Send {
        make()
    }
}

/// On the heap, made there (a connection's task and serving futures,
/// `Clients::serve_registered`).
struct Boxed;

impl Placement for Boxed {
    fn place<F: Future + Send>(make: impl FnOnce() -> F) -> impl Future<Output = F::Output> + Send {
        // Allocated before the future is made, so that it is made in the allocation.
        Box::into_pin(Box::write(Box::new_uninit(), make()))
    }
}

impl ServiceContext {
    /// The connection's service: each request through the proxy, answered with its response.
    fn service<P: Placement>(
        self: Arc<Self>,
    ) -> impl hyper::service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<Served>,
        Error = ClientHungUp,
        Future: Send + 'static,
    > {
        let context = self;
        service_fn(move |request: hyper::Request<Incoming>| {
            let request = request.map(|body| ClientBody::Incoming(ClientIncoming::new(body)));
            context.respond::<P>(request, None, None)
        })
    }

    /// Whether the gateway's own HTTP/1.1 server may hand requests over as raw header lines
    /// (`headers::RawRequestHead`): not when the HTTPS redirect reads `Host` before the request
    /// path, nor when tracing reads and writes `traceparent` in the request's map.
    pub(crate) fn raw_requests(&self) -> bool {
        self.redirect.is_none() && !self.proxy.tracing()
    }

    /// The largest request body the gateway's own HTTP/1.1 server may read with its head and
    /// hand over read (`body::ClientBody::Read`).
    pub(crate) fn read_body_limit(&self) -> u64 {
        self.proxy.buffered_body_limit()
    }

    /// Whether a request's client is watched for a hang-up by reading from the connection
    /// while the request is in flight (`plain_http1` does: TLS, whose socket carries records,
    /// not requests) rather than by peeking its socket (`crate::hang_up`, cleartext).
    pub(crate) fn watched_by_reading(&self) -> bool {
        self.watcher.is_none()
    }

    /// This gateway's `x-herd-gateway` value.
    pub(crate) fn gateway_id(&self) -> &http::HeaderValue {
        self.proxy.gateway_id()
    }

    /// The gateway has started to stop: every HTTP/1 answer from now on says `Connection: close`.
    pub(crate) fn draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The answer to a request head no server may take (`crate::plain_http1`): a 400 with the
    /// gateway's JSON error saying what is wrong, counted as every error the gateway makes, and
    /// `Connection: close`. It counts as a request of the connection until it is written, and as
    /// one with a body: whatever the client sends after the head (its body, on its way) is read
    /// away when the connection closes (`ClientIo`'s linger), so that it does not reset the
    /// connection before the client has read the answer.
    pub(crate) fn broken_head(&self, problem: &'static str) -> hyper::Response<Served> {
        let request = self.state.begin(http::Version::HTTP_11, true);
        refusal(&GatewayError::BadRequest(problem), &self.metrics).map(|inner| Served {
            inner,
            _request: request,
            watch: None,
        })
    }

    /// Begins `request` (its head was just read: the connection is busy from here) and returns
    /// the future of its response. A request read by the gateway's own HTTP/1.1 server
    /// (`crate::plain_http1`) has no body or one read whole with its head, and comes with the
    /// request's id that server took (`request_id`, see `Proxy::handle`).
    pub(crate) fn respond<P: Placement>(
        self: &Arc<Self>,
        mut request: hyper::Request<ClientBody>,
        raw: Option<crate::headers::RawRequestHead>,
        request_id: Option<http::HeaderValue>,
    ) -> impl Future<Output = Result<hyper::Response<Served>, ClientHungUp>> + Send + use<P> {
        let context = self.clone();
        let with_body = request.body().to_read();
        let request_guard = context.state.begin(request.version(), with_body);
        if with_body
            && request.version() < http::Version::HTTP_2
            && let ClientBody::Incoming(body) = request.body_mut()
        {
            body.tell_at_end(context.state.clone(), context.state.latest_request());
        }
        if let Some(over_tls) = &context.over_tls {
            request.extensions_mut().insert(over_tls.clone());
        }
        let http1 = request.version() < http::Version::HTTP_2;
        // Not with bytes of a next request read behind this one (hyper holds them: the
        // client asked for more answers even if it hangs up now).
        let watch = (context.watcher.as_ref())
            .filter(|_| !context.state.pipelined_behind())
            .map(|watcher| watcher.watch(with_body.then(|| context.state.clone())));
        async move {
            let served = |response: hyper::Response<ResponseBody>, watch| {
                Ok(response.map(|body| Served {
                    inner: body,
                    _request: request_guard,
                    watch,
                }))
            };
            // Made here, not before the block: a response held across the block's await would
            // take its room (368 bytes) in every request's future.
            if let Some(redirect) = &context.redirect {
                return served(redirect.respond(&request), None);
            }
            if context.state.conflicting_framing() {
                // Not forwarded; hyper closes the connection after this answer (it does
                // after any request with both headers).
                let error = GatewayError::BadRequest(
                    "both Content-Length and Transfer-Encoding in one request",
                );
                return served(refusal(&error, &context.metrics), None);
            }
            // Dropping the request path cancels the request at the worker.
            // Made in the pinned place itself, the call's result written straight into it: made
            // as an argument of `UntilHungUp::new`, whether the future (several KB, most of it
            // room for later states) was copied whole into the watch's struct depended on
            // unrelated code around it (docs/performance.md sections 23 and 32).
            let handled = std::pin::pin!(P::place(|| {
                (context.proxy).handle(&mut request, raw, request_id, &context.forwarded_for)
            }));
            let mut until = std::pin::pin!(UntilHungUp::new(handled, watch));
            let Some(mut response) = until.as_mut().await else {
                return Err(ClientHungUp);
            };
            let watch = until.take_watch();
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                context.state.switched();
            }
            if let Some(hsts) = &context.hsts {
                response
                    .headers_mut()
                    .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
            // Decided as the answer is ready, not when the request began: one begun before the
            // gateway started to stop and answered after says it too, so its client does not
            // reuse a connection that closes when idle ones do (`Clients::close_idle`).
            if http1 && context.draining.is_cancelled() {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            // Watched on while the body streams, unless it is complete already.
            let watch = watch.filter(|_| !response.body().is_end_stream());
            served(response, watch)
        }
    }
}

/// The gateway's answer to a request it refuses before the request path: the JSON error,
/// counted, with `Connection: close`.
fn refusal(error: &GatewayError, metrics: &Metrics) -> hyper::Response<ResponseBody> {
    metrics.error(error.parts().1);
    let id = crate::headers::new_request_id();
    let mut response = error.to_response(id.to_str().unwrap_or("-"));
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// A response body that tells the connection its request is over when it ends (or is dropped
/// unfinished): the idle timeout starts then. While it waits for the worker's bytes, it watches
/// for the client hanging up (cleartext HTTP/1.1, `crate::hang_up`).
#[derive(Debug)]
pub struct Served {
    inner: ResponseBody,
    _request: RequestGuard,
    watch: Option<HangUpWatch>,
}

impl Served {
    /// The response body it wraps.
    pub(crate) fn inner(&self) -> &ResponseBody {
        &self.inner
    }
}

/// Why a response body to a client ended early.
#[derive(Debug, thiserror::Error)]
pub enum ServedError {
    /// The worker's body broke.
    #[error(transparent)]
    Worker(#[from] WorkerBodyError),
    /// The client hung up while the body was on its way.
    #[error(transparent)]
    ClientHungUp(#[from] ClientHungUp),
}

impl Body for Served {
    type Data = Bytes;
    type Error = ServedError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ServedError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(ServedError::Worker))),
            Poll::Pending => match this.watch.as_mut().map(|watch| watch.poll_hung_up(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Some(Err(ClientHungUp.into()))),
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections per client address, over all serving threads, for
/// `limits.max_connections_per_client`: a map in shards, each behind its own lock (taken once
/// when a connection opens and once when it closes), an entry removed when its count drops to 0.
pub(crate) struct PerClient {
    limit: usize,
    /// Mixed into a client's key before its shard is picked, drawn at start: which clients
    /// share a shard is not known in advance (the map in each shard hashes with its own
    /// random keys).
    seed: u64,
    shards: Box<[Mutex<HashMap<u128, usize>>]>,
}

/// Shards of [`PerClient`]: enough that serving threads rarely meet on one lock (a power of two:
/// a shard is the top bits of a product).
const PER_CLIENT_SHARDS: usize = 64;

impl PerClient {
    pub(crate) fn new(limit: usize) -> Self {
        PerClient {
            limit,
            seed: rand::random(),
            shards: (0..PER_CLIENT_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    /// Who a connection counts against: its IPv4 address, or its IPv6 /64 (one subscriber's
    /// network, which hands out as many addresses as it likes); as the 128 bits of an IPv6
    /// address (an IPv4 one mapped, whose low 64 bits are never all zero as a /64's are).
    fn key(ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 64) - 1),
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        }
    }

    /// The shard of `key`: Fibonacci hashing of its two halves folded and the seed, one
    /// multiplication, where hashing the address to pick it and again in the shard's map cost
    /// about a thousand instructions per connection (`infra/bench/instructions.sh close`). A
    /// fixed multiplier: a random one now and then bunched neighbouring addresses into a few
    /// shards.
    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, usize>> {
        /// 2^64 divided by the golden ratio.
        const FIBONACCI: u64 = 0x9E37_79B9_7F4A_7C15;
        let folded = (key as u64) ^ ((key >> 64) as u64) ^ self.seed;
        let bits = PER_CLIENT_SHARDS.trailing_zeros();
        let index = folded.wrapping_mul(FIBONACCI) >> (u64::BITS - bits);
        &self.shards[index as usize]
    }

    /// Counts a connection from `ip`, or `None` when that client is at the limit.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = Self::key(ip);
        let mut shard = self.shard(key).lock().unwrap();
        let open = shard.entry(key).or_insert(0);
        if *open >= self.limit {
            return None;
        }
        *open += 1;
        Some(ClientSlot {
            owner: self.clone(),
            key,
        })
    }

    /// Client addresses with open connections.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }
}

/// One connection counted against its client address until dropped.
pub(crate) struct ClientSlot {
    owner: Arc<PerClient>,
    key: u128,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut shard = self.owner.shard(self.key).lock().unwrap();
        if let Some(open) = shard.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

/// The running serving threads.
pub struct ServingThreads {
    stop: CancellationToken,
    finished: Vec<oneshot::Receiver<()>>,
}

impl ServingThreads {
    /// Starts one thread per shard of `clients` (at least one), serving from `listener` and,
    /// when `[tls]` is on, from `tls_listener` (TLS connections). With `adaptive_threads`, also
    /// the task on the caller's runtime that decides how many of them take the load
    /// ([`Consolidation`]).
    pub fn start(
        listener: std::net::TcpListener,
        tls_listener: Option<std::net::TcpListener>,
        clients: Arc<Clients>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        if let Some(tls_listener) = &tls_listener {
            tls_listener.set_nonblocking(true)?;
        }
        let count = clients.occupancy.per_thread.len();
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..count).map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[Inbox]> = inboxes.into();
        let _ = clients.inboxes.set(inboxes.clone());
        clients
            .metrics
            .serving_threads_active
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        // Built first, so that if a later thread cannot start, dropping it stops the earlier ones.
        let mut threads = ServingThreads {
            stop: CancellationToken::new(),
            finished: Vec::new(),
        };
        let mut runtimes = Vec::with_capacity(count);
        for (index, receiver) in receivers.into_iter().enumerate() {
            let listener = listener.try_clone()?;
            let tls_listener = tls_listener
                .as_ref()
                .map(std::net::TcpListener::try_clone)
                .transpose()?;
            let thread = ServingThread {
                index,
                clients: clients.clone(),
                inboxes: inboxes.clone(),
                stop: threads.stop.clone(),
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtimes.push(runtime.handle().clone());
            let (done, done_rx) = oneshot::channel();
            std::thread::Builder::new()
                .name(format!("herd-serve-{index}"))
                .spawn(move || {
                    upstream::use_shard(index);
                    runtime.block_on(thread.run(listener, tls_listener, receiver));
                    // Dropping the runtime ends the connections still open after the grace.
                    drop(runtime);
                    let _ = done.send(());
                })?;
            threads.finished.push(done_rx);
        }
        if clients.adaptive && count > 1 {
            let consolidation = Consolidation::new(runtimes);
            tokio::spawn(consolidate(
                consolidation,
                clients.clone(),
                inboxes,
                threads.stop.clone(),
            ));
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

/// Every [`crate::consolidation::TICK`], how many threads take the load, and the orders to
/// shed connections that follow from it; until the gateway stops or starts to drain.
async fn consolidate(
    mut consolidation: Consolidation,
    clients: Arc<Clients>,
    inboxes: Arc<[Inbox]>,
    stop: CancellationToken,
) {
    let tick = crate::consolidation::TICK;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: Vec<usize> = vec![0; inboxes.len()];
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = clients.draining.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let active = consolidation.tick();
        let before = clients.occupancy.active.swap(active, Ordering::Relaxed);
        if active != before {
            for inbox in inboxes.iter() {
                let _ = inbox.send(Message::InUse);
            }
        }
        clients
            .metrics
            .serving_threads_active
            .set(i64::try_from(active).unwrap_or(i64::MAX));
        let open: Vec<usize> = clients
            .occupancy
            .per_thread
            .iter()
            .map(|open| open.load(Ordering::Relaxed))
            .collect();
        let mut orders = crate::consolidation::shed_orders(active, &open);
        // Only HTTP/1.1 cleartext connections can go.
        for (thread, order) in orders.iter_mut().enumerate() {
            let fixed = clients.occupancy.fixed_per_thread[thread].load(Ordering::Relaxed);
            *order = (*order).min(open[thread].saturating_sub(fixed));
        }
        for (thread, (&order, last)) in orders.iter().zip(sent.iter_mut()).enumerate() {
            if order != *last {
                *last = order;
                let _ = inboxes[thread].send(Message::Shed(order));
            }
        }
    }
}

/// A connection accepted on one thread for another to serve.
struct HandedOver {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    /// From the TLS listener: the handshake is still to do.
    secure: bool,
    /// How far the thread that handed it over got with it.
    opening: Opening,
}

/// What a serving thread is told by the others.
enum Message {
    /// Serve this connection.
    Connection(HandedOver),
    /// Hand this many HTTP/1.1 connections to other threads, each at its next moment between
    /// two requests (replaces the last such order).
    Shed(usize),
    /// The number of threads in use changed: take new connections if this one is among them,
    /// leave them to those that are if not ([`Listening`]).
    InUse,
}

type Inbox = mpsc::UnboundedSender<Message>;

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
        tls_listener: Option<std::net::TcpListener>,
        mut inbox: mpsc::UnboundedReceiver<Message>,
    ) {
        let mut listening = Listening::new(listener, tls_listener);
        let tunnels = crate::tunnel::track_on_this_thread(self.clients.tunnel_idle);
        let sweeper = tokio::spawn(sweep_idle_connections(self.clients.proxy.clone()));
        let mut failures = AcceptFailures::default();
        let mut closing = false;
        loop {
            // Thread 0 is always in use.
            let active = self.clients.occupancy.active.load(Ordering::Relaxed);
            listening.accepting(self.index < active.max(1));
            let (listener, tls_listener) = listening.registered();
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = self.clients.closing_idle.cancelled(), if !closing => {
                    // Connections opened from now on are not told: they close after one
                    // request (`Clients::drain`).
                    closing = true;
                    connections::shed(0);
                    connections::close_idle();
                }
                Some(message) = inbox.recv() => self.receive(message),
                accepted = accept_on(listener), if listener.is_some() => match accepted {
                    Ok((stream, peer)) => self.place(stream, peer, false),
                    Err(error) => failures.failed(&error).await,
                },
                // Disabled (never polled) when `[tls]` is off.
                accepted = accept_on(tls_listener), if tls_listener.is_some() => {
                    match accepted {
                        Ok((stream, peer)) => self.place(stream, peer, true),
                        Err(error) => failures.failed(&error).await,
                    }
                }
            }
        }
        drop(listening);
        sweeper.abort();
        connections::shed(0);
        // Serve what other threads handed over before they stopped too.
        inbox.close();
        while let Some(message) = inbox.recv().await {
            self.receive(message);
        }
        let grace = self.clients.shutdown_grace;
        connections::close_all();
        // Tunnels too: their HTTP connections ended at the switch, so the registry of
        // connections no longer sees them.
        tunnels.close();
        let drained = async {
            connections::all_ended().await;
            tunnels.wait().await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            warn!(
                grace = %humantime_serde::re::humantime::format_duration(grace),
                "shutdown grace over; closing the remaining connections"
            );
        }
    }

    fn receive(&self, message: Message) {
        match message {
            Message::Connection(handed) => self.serve_handed(handed),
            Message::Shed(count) => {
                if !self.clients.draining.is_cancelled() {
                    connections::shed(count);
                }
            }
            // Looked at by the accept loop after every message.
            Message::InUse => {}
        }
    }

    /// Serves a new connection here, or hands it to a thread with fewer connections (a burst of
    /// connections woken on one thread would otherwise stay there for their whole life).
    fn place(&self, stream: TcpStream, peer: SocketAddr, secure: bool) {
        let clients = &self.clients;
        // A TLS connection stays on one thread for its life: spread over all of them.
        let target = if secure {
            clients.occupancy.place_for_life(self.index)
        } else {
            clients.occupancy.place(self.index)
        };
        let mut slot = ConnectionSlot::take(&clients.occupancy, target);
        if secure {
            slot.fix();
        }
        let head_due = tokio::time::Instant::now() + clients.timeouts.head;
        let open = slot.total;
        if let Err(over) = clients.admit(&mut slot, open, peer.ip()) {
            slot.move_to(self.index);
            let later = clients
                .clone()
                .admit_later(stream, peer, slot, (secure, head_due), over);
            tokio::spawn(later);
            return;
        }
        if target == self.index {
            clients.serve(stream, peer, slot, secure, Opening::New { head_due });
            return;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                debug!(peer = %peer, error = %error, "cannot hand a connection over; closed");
                return;
            }
        };
        let handed = HandedOver {
            stream,
            peer,
            slot,
            secure,
            opening: Opening::New { head_due },
        };
        if let Err(mpsc::error::SendError(message)) =
            self.inboxes[target].send(Message::Connection(handed))
        {
            // The other thread is stopping: serve it here after all.
            self.receive(message);
        }
    }

    fn serve_handed(&self, handed: HandedOver) {
        let HandedOver {
            stream,
            peer,
            mut slot,
            secure,
            opening,
        } = handed;
        slot.move_to(self.index);
        match TcpStream::from_std(stream) {
            Ok(stream) => self.clients.serve(stream, peer, slot, secure, opening),
            Err(error) => {
                debug!(peer = %peer, error = %error, "cannot take a connection over; closed")
            }
        }
    }
}

/// Every [`upstream::SWEEP_EVERY`], on this serving thread: drops its idle worker connections
/// that a load which stopped left behind (`upstream::Pool::sweep`).
async fn sweep_idle_connections(proxy: Arc<crate::proxy::Proxy>) {
    let mut every = tokio::time::interval(upstream::SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = every.tick().await;
        proxy.sweep_idle_connections(now);
    }
}

/// Accepts on `listener`; never completes without one.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// A serving thread's duplicates of the public and TLS listening sockets, registered with its
/// event loop only while the thread is in use (`adaptive_threads`, `crate::consolidation`).
///
/// Every thread registered with a listening socket is woken by each new connection, and one
/// accepts it: the others find nothing. A thread not in use would also hand each connection
/// it took to one in use (`Occupancy::place`). With clients that open a connection per request
/// that was a wake-up, an `accept` that found nothing, and a hand-over (two `epoll_ctl` calls
/// and a wake-up of the other thread) for many of them: 47 µs of CPU per request against 38
/// with one thread (docs/performance.md, section 41).
struct Listening {
    public: Registered,
    tls: Option<Registered>,
}

/// A listening socket, registered with this thread's event loop or kept aside.
enum Registered {
    Accepting(TcpListener),
    Aside(std::net::TcpListener),
    /// Its registration could not be taken off the event loop (not expected): this thread
    /// accepts no more from it; the other threads go on.
    Lost,
}

impl Listening {
    /// Registered, as every thread starts in use.
    fn new(public: std::net::TcpListener, tls: Option<std::net::TcpListener>) -> Self {
        let mut listening = Listening {
            public: Registered::Aside(public),
            tls: tls.map(Registered::Aside),
        };
        listening.accepting(true);
        listening
    }

    /// Registers the sockets with this thread's event loop (`in_use`) or takes them off it.
    /// Connections already waiting stay in the socket's queue for the threads in use. A socket
    /// that cannot be registered (the event loop out of room) stays aside, tried again at the
    /// next change; the thread goes on serving its connections either way.
    fn accepting(&mut self, in_use: bool) {
        for registered in std::iter::once(&mut self.public).chain(self.tls.as_mut()) {
            *registered = match (std::mem::replace(registered, Registered::Lost), in_use) {
                // Registered as a duplicate: the one kept aside survives a failure.
                (Registered::Aside(listener), true) => {
                    match listener.try_clone().and_then(TcpListener::from_std) {
                        Ok(accepting) => Registered::Accepting(accepting),
                        Err(error) => {
                            warn!(error = %error, "serving thread cannot accept from a listener");
                            Registered::Aside(listener)
                        }
                    }
                }
                (Registered::Accepting(listener), false) => match listener.into_std() {
                    Ok(aside) => Registered::Aside(aside),
                    Err(error) => {
                        warn!(error = %error, "serving thread cannot set a listener aside");
                        Registered::Lost
                    }
                },
                (unchanged, _) => unchanged,
            };
        }
    }

    /// The sockets to accept from now: none while the thread is not in use.
    fn registered(&self) -> (Option<&TcpListener>, Option<&TcpListener>) {
        fn accepting(registered: &Registered) -> Option<&TcpListener> {
            match registered {
                Registered::Accepting(listener) => Some(listener),
                Registered::Aside(_) | Registered::Lost => None,
            }
        }
        (
            accepting(&self.public),
            self.tls.as_ref().and_then(accepting),
        )
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
/// place new ones), and how many threads take new ones.
struct Occupancy {
    total: AtomicUsize,
    per_thread: Arc<[AtomicUsize]>,
    /// Threads `0..active` take new connections (all of them unless `adaptive_threads`).
    active: AtomicUsize,
    /// Of `per_thread`, the connections that never move (TLS, HTTP/2).
    fixed_per_thread: Box<[AtomicUsize]>,
}

impl Occupancy {
    fn new(threads: usize) -> Self {
        Occupancy {
            total: AtomicUsize::new(0),
            per_thread: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            active: AtomicUsize::new(threads),
            fixed_per_thread: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    fn load(&self, thread: usize) -> usize {
        self.per_thread[thread].load(Ordering::Relaxed)
    }

    /// The active thread with the fewest connections, other than `except`.
    fn least_loaded(&self, except: Option<usize>) -> Option<usize> {
        let active = self
            .active
            .load(Ordering::Relaxed)
            .clamp(1, self.per_thread.len());
        (0..active)
            .filter(|&index| Some(index) != except)
            .min_by_key(|&index| self.load(index))
    }

    /// Where a connection accepted on thread `here` is served: here if `here` is active,
    /// unless some active thread serves fewer connections by more than the slack (then the
    /// least busy one). The slack, one plus an eighth of that thread's count, keeps a
    /// connection from being handed over for a difference that the next ones even out: with
    /// clients that open a connection per request, the threads' counts move by a few all the
    /// time, and two fewer handed over most new connections, each a cross-thread wake-up and
    /// two more `epoll_ctl` calls (docs/performance.md, section 41). A burst landing on one
    /// thread is still spread: 49 / 15 becomes even within an eighth.
    fn place(&self, here: usize) -> usize {
        let Some(least) = self.least_loaded(None) else {
            return here;
        };
        let active = self.active.load(Ordering::Relaxed);
        let slack = 1 + self.load(least) / 8;
        if here >= active || self.load(here) > self.load(least) + slack {
            least
        } else {
            here
        }
    }

    /// Where a connection that never moves (TLS, HTTP/2) seen on thread `here` is served: as
    /// [`Occupancy::place`] over all threads, in use or not (it could not follow if the load
    /// grew).
    ///
    /// Spread by such connections alone: HTTP/1.1 ones can follow the load later.
    fn place_for_life(&self, here: usize) -> usize {
        let fixed = |index: usize| self.fixed_per_thread[index].load(Ordering::Relaxed);
        let least = (0..self.fixed_per_thread.len())
            .min_by_key(|&index| fixed(index))
            .unwrap_or(here);
        if fixed(here) > fixed(least) {
            least
        } else {
            here
        }
    }

    /// Where a connection that thread `here` sheds goes: the least loaded other active thread.
    fn place_moved(&self, here: usize) -> Option<usize> {
        self.least_loaded(Some(here))
    }
}

/// One open client connection, counted in all and on the thread serving it.
struct ConnectionSlot {
    occupancy: Arc<Occupancy>,
    thread: usize,
    /// Open connections in all, this one included, when it was taken.
    total: usize,
    /// Its count against its client address, when that is limited.
    client: Option<ClientSlot>,
    /// Counted among the connections that never move.
    fixed: bool,
}

impl ConnectionSlot {
    fn take(occupancy: &Arc<Occupancy>, thread: usize) -> Self {
        let total = occupancy.total.fetch_add(1, Ordering::Relaxed) + 1;
        occupancy.per_thread[thread].fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            occupancy: occupancy.clone(),
            thread,
            total,
            client: None,
            fixed: false,
        }
    }

    /// Counts the connection among those that never move (TLS, HTTP/2).
    fn fix(&mut self) {
        if !self.fixed {
            self.fixed = true;
            self.occupancy.fixed_per_thread[self.thread].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts the connection on `thread` instead (it was served elsewhere than planned).
    fn move_to(&mut self, thread: usize) {
        if thread != self.thread {
            let occupancy = &self.occupancy;
            occupancy.per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
            occupancy.per_thread[thread].fetch_add(1, Ordering::Relaxed);
            if self.fixed {
                occupancy.fixed_per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
                occupancy.fixed_per_thread[thread].fetch_add(1, Ordering::Relaxed);
            }
            self.thread = thread;
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.occupancy.total.fetch_sub(1, Ordering::Relaxed);
        self.occupancy.per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
        if self.fixed {
            self.occupancy.fixed_per_thread[self.thread].fetch_sub(1, Ordering::Relaxed);
        }
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
    fn a_connection_stays_unless_another_thread_has_fewer_by_more_than_the_slack() {
        assert_eq!(occupancy(&[0]).place(0), 0);
        assert_eq!(occupancy(&[3, 2]).place(0), 0);
        assert_eq!(occupancy(&[4, 2]).place(0), 1);
        assert_eq!(occupancy(&[2, 9, 5]).place(1), 0);
        assert_eq!(occupancy(&[2, 2, 2]).place(2), 2);
        // An eighth of the less busy thread's count more slack: 32 and 28 stay, 32 and 27 not.
        assert_eq!(occupancy(&[32, 28]).place(0), 0);
        assert_eq!(occupancy(&[33, 27]).place(0), 1);
        assert_eq!(occupancy(&[49, 15]).place(0), 1);
    }

    #[test]
    fn connections_that_never_move_spread_over_all_threads_by_their_own_count() {
        let occupancy = occupancy(&[10, 0]);
        occupancy.active.store(1, Ordering::Relaxed);
        // An HTTP/1.1 connection goes to the threads in use only.
        assert_eq!(occupancy.place(1), 0);
        // One that never moves goes to the thread with fewest such connections.
        assert_eq!(occupancy.place_for_life(0), 0, "a tie stays");
        let mut first = ConnectionSlot::take(&occupancy, 0);
        first.fix();
        assert_eq!(occupancy.place_for_life(0), 1);
        first.move_to(1);
        assert_eq!(occupancy.place_for_life(1), 0);
        drop(first);
        assert_eq!(occupancy.fixed_per_thread[1].load(Ordering::Relaxed), 0);
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
    fn per_client_counts_hold_the_limit_and_leave_no_entry_behind() {
        let per_client = Arc::new(PerClient::new(2));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let first = per_client.take(v4).expect("first");
        let second = per_client.take(v4).expect("second");
        assert!(per_client.take(v4).is_none(), "third over the limit");
        // The same address as IPv4-mapped IPv6 is the same client.
        assert!(
            per_client
                .take("::ffff:192.0.2.1".parse().unwrap())
                .is_none()
        );
        let other = per_client
            .take("192.0.2.2".parse().unwrap())
            .expect("another client");
        drop(first);
        let again = per_client.take(v4).expect("a freed slot is taken again");
        // One IPv6 /64 is one client, whatever its last 64 bits.
        let a = per_client.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let b = per_client
            .take("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(
            per_client
                .take("2001:db8:1:2::3".parse().unwrap())
                .is_none()
        );
        assert!(
            per_client
                .take("2001:db8:1:3::1".parse().unwrap())
                .is_some()
        );
        assert_eq!(per_client.clients(), 3);
        drop((second, other, again, a, b));
        assert_eq!(
            per_client.clients(),
            0,
            "entries go when their count drops to 0"
        );
    }

    #[test]
    fn clients_spread_over_the_per_client_shards() {
        let per_client = PerClient::new(1);
        let used = |addresses: Vec<IpAddr>| {
            let shards: std::collections::HashSet<*const _> = addresses
                .into_iter()
                .map(|ip| std::ptr::from_ref(per_client.shard(PerClient::key(ip))))
                .collect();
            shards.len()
        };
        // Neighbouring IPv4 addresses, and IPv6 networks that differ in one /64 bit.
        let v4 = (0..512u32).map(|n| IpAddr::from((0xc000_0200 + n).to_be_bytes()));
        let v6 =
            (0..512u128).map(|n| IpAddr::from(((0x2001_0db8u128 << 96) | (n << 64)).to_be_bytes()));
        assert!(used(v4.collect()) >= PER_CLIENT_SHARDS * 3 / 4);
        assert!(used(v6.collect()) >= PER_CLIENT_SHARDS * 3 / 4);
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
