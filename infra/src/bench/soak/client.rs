//! The soak's clients: N keep-alive HTTP/1.1 connections to the gateway on a few tokio threads
//! (hyper's client connection, one task per connection; no thread per connection).
//!
//! Connections `0..active` send `GET /work?ms=1` each at `rate / active` per second; the others
//! are idle keep-alive connections that send one `GET /work?ms=0` every `idle_every` (below the
//! gateway's `timeouts.client_idle` of 60 s, so they stay open as real keep-alive connections).
//! First requests are spread over one interval so the load is even. Connection `i` binds the
//! source address `127.0.0.(2 + i % K)` before connecting, so no source address holds more than
//! [`PER_SOURCE`] connections: a per-client-address cap in the gateway and the ephemeral port
//! range of one address never limit the run.
//!
//! What each request saw is counted: answered 2xx (by class), or failed by kind (status, error,
//! timeout), and connections the gateway closed on its own. A connection that failed is
//! reopened after a second. Everything stops when the [`Clients`] handle is closed or dropped.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most connections from one source address.
pub const PER_SOURCE: u32 = 250;
/// How long one request may take before it counts as failed (the gateway gives up at 15 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound of one connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before a failed connection is opened again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// New connections per second while opening them all.
const OPEN_RATE: u32 = 2_000;
/// Threads of the client runtime.
const THREADS: usize = 2;
/// How long closing every connection may take before the runtime is dropped anyway.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);

/// What the clients do.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    /// The gateway's public address.
    pub gateway: SocketAddr,
    /// Connections to hold.
    pub connections: u32,
    /// How many of them send the active load.
    pub active: u32,
    /// Requests per second over all active connections.
    pub rate: u32,
    /// How often an idle connection sends its keep-alive request.
    pub idle_every: Duration,
}

impl ClientPlan {
    /// How many source addresses the connections are spread over.
    pub fn sources(&self) -> u32 {
        self.connections.div_ceil(PER_SOURCE).clamp(1, 250)
    }
}

/// Counters the sampler reads while the clients run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections open now (client side).
    pub open: AtomicU64,
    /// Connections opened, reopenings included.
    pub opened: AtomicU64,
    /// 2xx answers on active connections.
    pub active_ok: AtomicU64,
    /// 2xx answers on idle connections.
    pub idle_ok: AtomicU64,
    /// Requests that failed, any kind.
    pub failed: AtomicU64,
    /// Connections that failed without a request: connects that failed, and keep-alive
    /// connections the gateway closed on its own.
    pub dropped: AtomicU64,
    /// Failures by kind, e.g. `active: status 502`, `idle: error`, `connect`.
    kinds: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// 2xx answers so far.
    pub fn ok(&self) -> u64 {
        self.active_ok.load(Ordering::Relaxed) + self.idle_ok.load(Ordering::Relaxed)
    }

    /// Failures by kind so far.
    pub fn kinds(&self) -> BTreeMap<String, u64> {
        self.kinds
            .lock()
            .map(|kinds| kinds.clone())
            .unwrap_or_default()
    }

    /// Counts one failure of `kind`; `request` says whether a request was lost with it.
    fn fail(&self, kind: String, request: bool) {
        let counter = if request { &self.failed } else { &self.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut kinds) = self.kinds.lock() {
            *kinds.entry(kind).or_default() += 1;
        }
    }
}

/// The running clients on their own thread and runtime. Dropping it closes every connection.
#[derive(Debug)]
pub struct Clients {
    counters: Arc<Counters>,
    cancel: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Clients {
    /// Starts opening the connections (at [`OPEN_RATE`] per second) and sending.
    pub fn start(plan: ClientPlan) -> std::io::Result<Clients> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .thread_name("soak-client")
            .enable_all()
            .build()?;
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name("soak-clients".into())
            .spawn({
                let counters = counters.clone();
                let cancel = cancel.clone();
                move || {
                    runtime.block_on(open_all(plan, counters, cancel.clone()));
                    runtime.block_on(cancel.cancelled());
                    runtime.shutdown_timeout(SHUTDOWN_BOUND);
                }
            })?;
        Ok(Clients {
            counters,
            cancel,
            thread: Some(thread),
        })
    }

    /// The live counters.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Closes every connection and waits (bounded) until the client thread has ended.
    pub fn close(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.close();
    }
}

/// Spawns one task per connection, paced at [`OPEN_RATE`].
async fn open_all(plan: ClientPlan, counters: Arc<Counters>, cancel: CancellationToken) {
    let plan = Arc::new(plan);
    let start = Instant::now();
    let per_tick = (OPEN_RATE / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for index in 0..plan.connections {
        if index % per_tick == 0 {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
        }
        tokio::spawn(connection(
            plan.clone(),
            index,
            start,
            counters.clone(),
            cancel.clone(),
        ));
    }
}

/// Where a connection stands in the schedule: its interval and its first request.
fn schedule(plan: &ClientPlan, index: u32) -> (Duration, Duration, &'static str) {
    if index < plan.active {
        let interval = Duration::from_secs_f64(f64::from(plan.active) / f64::from(plan.rate));
        let offset = interval.mul_f64(f64::from(index) / f64::from(plan.active));
        (interval, offset, "active")
    } else {
        // The golden ratio spreads consecutive indexes evenly over the interval.
        let fraction = (f64::from(index) * 0.618_033_988_75).fract();
        (plan.idle_every, plan.idle_every.mul_f64(fraction), "idle")
    }
}

/// The source address of connection `index`.
fn source(plan: &ClientPlan, index: u32) -> SocketAddr {
    let host = 2 + index % plan.sources();
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(127, 0, 0, u8::try_from(host).unwrap_or(251)),
        0,
    ))
}

/// One connection for the whole run: open, send on schedule, reopen after a failure.
async fn connection(
    plan: Arc<ClientPlan>,
    index: u32,
    start: Instant,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let (interval, offset, class) = schedule(&plan, index);
    let path = if class == "active" {
        "/work?ms=1"
    } else {
        "/work?ms=0"
    };
    let mut next = start + offset;
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    loop {
        if sender.is_none() {
            match open(&plan, index, &counters).await {
                Ok(opened) => {
                    sender = Some(opened);
                    // A real client sends its request as soon as it has connected: a connection
                    // that stays silent is cut by the gateway's `timeouts.request_head` (10 s
                    // from accept), by design. Idle connections idle after their first request.
                    if class == "idle" {
                        next = Instant::now();
                    }
                }
                Err(()) => {
                    tokio::select! {
                        () = tokio::time::sleep(RECONNECT_AFTER) => continue,
                        () = cancel.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = cancel.cancelled() => return,
        }
        // No catching up after a slow answer: the rate is an upper bound.
        next = (next + interval).max(Instant::now());
        let Some(current) = sender.as_mut() else {
            continue;
        };
        if current.is_closed() || current.ready().await.is_err() {
            counters.fail(format!("{class}: connection closed by the gateway"), false);
            sender = None;
            continue;
        }
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, plan.gateway.to_string())
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(REQUEST_TIMEOUT, exchange(current, request)) => outcome,
            () = cancel.cancelled() => return,
        };
        match outcome {
            Ok(Ok((status, _))) if (200..300).contains(&status) => {
                let ok = if class == "active" {
                    &counters.active_ok
                } else {
                    &counters.idle_ok
                };
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok((status, error))) => counters.fail(
                format!("{class}: status {status} {}", error.unwrap_or_default())
                    .trim_end()
                    .to_string(),
                true,
            ),
            Ok(Err(error)) => {
                counters.fail(format!("{class}: {error}"), true);
                sender = None;
            }
            Err(_) => {
                counters.fail(format!("{class}: timeout"), true);
                sender = None;
            }
        }
    }
}

/// Opens connection `index` from its source address and starts its hyper connection task.
async fn open(
    plan: &ClientPlan,
    index: u32,
    counters: &Arc<Counters>,
) -> Result<SendRequest<Empty<Bytes>>, ()> {
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(source(plan, index))?;
        let stream = socket.connect(plan.gateway).await?;
        stream.set_nodelay(true)?;
        http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok((sender, connection))) => {
            counters.open.fetch_add(1, Ordering::Relaxed);
            counters.opened.fetch_add(1, Ordering::Relaxed);
            let counters = counters.clone();
            tokio::spawn(async move {
                let _ = connection.await;
                counters.open.fetch_sub(1, Ordering::Relaxed);
            });
            Ok(sender)
        }
        Ok(Err(error)) => {
            counters.fail(format!("connect: {}", error.kind()), false);
            Err(())
        }
        Err(_) => {
            counters.fail("connect: timeout".into(), false);
            Err(())
        }
    }
}

/// Sends `request` and reads the whole answer; its status.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<(u16, Option<String>), &'static str> {
    let response = sender.send_request(request).await.map_err(|error| {
        if error.is_canceled() || error.is_closed() || error.is_incomplete_message() {
            "connection closed mid-request"
        } else {
            "error"
        }
    })?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "body cut short")?
        .to_bytes();
    let error = (!(200..300).contains(&status))
        .then(|| error_kind(&body))
        .flatten();
    Ok((status, error))
}

/// The `error` field of the gateway's JSON error body (`{"error":"upstream_failed",…}`).
fn error_kind(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value["error"].as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(connections: u32, active: u32, rate: u32) -> ClientPlan {
        ClientPlan {
            gateway: SocketAddr::from(([127, 0, 0, 1], 1)),
            connections,
            active,
            rate,
            idle_every: Duration::from_secs(45),
        }
    }

    #[test]
    fn active_connections_share_the_rate_and_idle_ones_spread() {
        let plan = plan(10_000, 200, 400);
        let (interval, offset, class) = schedule(&plan, 0);
        assert_eq!(
            (interval, offset, class),
            (Duration::from_millis(500), Duration::ZERO, "active")
        );
        let (_, offset, _) = schedule(&plan, 100);
        assert_eq!(offset, Duration::from_millis(250));
        let offsets: Vec<Duration> = (200..10_000).map(|i| schedule(&plan, i).1).collect();
        assert!(
            offsets
                .iter()
                .all(|offset| *offset < Duration::from_secs(45))
        );
        // Evenly spread: every 4.5 s slice of the 45 s interval gets about a tenth.
        for slice in 0..10 {
            let count = offsets
                .iter()
                .filter(|offset| offset.as_secs_f64() / 4.5 >= f64::from(slice))
                .filter(|offset| offset.as_secs_f64() / 4.5 < f64::from(slice + 1))
                .count();
            assert!((900..1060).contains(&count), "slice {slice}: {count}");
        }
    }

    #[test]
    fn gateway_error_bodies_name_their_kind() {
        let body = br#"{"error":"upstream_failed","message":"x","request_id":"r"}"#;
        assert_eq!(error_kind(body).as_deref(), Some("upstream_failed"));
        assert_eq!(error_kind(b"<html>"), None);
    }

    #[test]
    fn sources_hold_at_most_their_share() {
        let plan = plan(10_000, 200, 200);
        assert_eq!(plan.sources(), 40);
        assert_eq!(source(&plan, 0).to_string(), "127.0.0.2:0");
        assert_eq!(source(&plan, 39).to_string(), "127.0.0.41:0");
        assert_eq!(source(&plan, 40).to_string(), "127.0.0.2:0");
        assert_eq!(
            ClientPlan {
                connections: 1,
                ..plan
            }
            .sources(),
            1
        );
    }
}
