//! The request path: from a client's request to a worker's response (or the gateway's error).
//!
//! ```text
//! client ─▶ head checks (431) ─▶ request id, X-Forwarded-*, hop-by-hop stripped
//!        ─▶ body: buffer ≤ retry.buffer_body_bytes (413 / 408), else stream
//!        ─▶ ┌ pick a worker (selection; none → 503 at once)
//!           │ send on the worker's pooled keep-alive connection (crate::upstream), bounded by
//!           │ timeouts.response_header
//!           │ outcome → latency EWMA, counters, passive health
//!           └ failed and retry safe and budget left and attempts left → next worker
//!        ─▶ response headers (hop-by-hop stripped, x-request-id added) and the body streamed back
//! ```
//!
//! The whole path up to the response headers is bounded by `timeouts.request`. Errors become
//! responses in [`crate::error`] only.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::balancer::{Balancer, ChangeSource, Refusal, Worker};
use crate::body::{self, ClientBody, ClientIncoming, Prepared, ResponseBody};
use crate::config::GatewayConfig;
use crate::error::{GatewayError, UpstreamError, UpstreamErrorKind};
use crate::headers;
use crate::hedge::Hedging;
use crate::hedge_timer::HedgeTimer;
use crate::metrics::Metrics;
use crate::retry::RetryBudget;
use crate::trace::{self, Choice};
use crate::tunnel::WorkerTunnel;
use crate::upstream::{self, ClientSettings, Connection, Outgoing, PoolLimits, Reply, Timing};

/// The workers a request went to so far, in order. Inline up to four: no allocation for the
/// usual one attempt (or a few retries).
type Tried = smallvec::SmallVec<[Arc<Worker>; 4]>;

/// Limits and timeouts the request path applies, copied out of the configuration.
#[derive(Debug, Clone)]
struct Settings {
    max_attempts: u32,
    retry_on_timeout: bool,
    buffer_body: u64,
    max_body: u64,
    max_header: usize,
    request: Duration,
    count_5xx: bool,
}

/// Forwards requests to workers. One per gateway, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    balancer: Arc<Balancer>,
    upstream: ClientSettings,
    metrics: Arc<Metrics>,
    budget: RetryBudget,
    hedging: Hedging,
    settings: Settings,
    /// `x-herd-gateway` on every response: which gateway of a pair answered.
    gateway_id: HeaderValue,
    /// Trace export is on: spans per request and attempt. Off, the request path does no trace
    /// work at all beyond testing this.
    tracing: bool,
    /// The balancing algorithm's name, for the attempt spans.
    algorithm: String,
}

/// How one attempt ended.
enum Attempt {
    /// A response to pass on.
    Response(Response<ResponseBody>),
    /// The worker switched protocols: its 101, and its side of the tunnel.
    // Boxed: a rare answer; inline, its 72 bytes made every attempt's outcome larger to move.
    Switched(Response<ResponseBody>, Box<WorkerTunnel>),
    /// A 502/503 to an idempotent request: retried elsewhere if possible, else passed on.
    Retryable(Response<ResponseBody>),
    /// Failed.
    Failed {
        /// What the client gets if this was the last attempt.
        error: GatewayError,
        /// Whether another attempt elsewhere is safe (method, reached or not).
        retry_safe: bool,
        /// The retry reason label.
        reason: &'static str,
    },
}

impl Proxy {
    /// A proxy over `balancer`'s workers.
    pub fn new(config: &GatewayConfig, balancer: Arc<Balancer>, metrics: Arc<Metrics>) -> Self {
        let hedging = Hedging::new(&config.hedging);
        metrics.watch_hedge_delay(hedging.delay_handle());
        let upstream = ClientSettings {
            connect_timeout: config.timeouts.connect,
            response_header: config.timeouts.response_header,
            pool: PoolLimits {
                max_idle: config.limits.max_idle_per_worker,
                idle_timeout: config.timeouts.upstream_idle,
            },
        };
        Proxy {
            tracing: herd_shared::telemetry::tracing_enabled(),
            algorithm: format!("{:?}", config.balancing.algorithm).to_lowercase(),
            gateway_id: HeaderValue::from_str(&config.id)
                .unwrap_or_else(|_| HeaderValue::from_static("gateway")),
            balancer,
            upstream,
            metrics,
            budget: RetryBudget::new(&config.retry),
            hedging,
            settings: Settings {
                max_attempts: config.retry.max_attempts,
                retry_on_timeout: config.retry.on_timeout,
                buffer_body: config.retry.buffer_body_bytes,
                max_body: config.limits.max_body_bytes,
                max_header: config.limits.max_header_bytes,
                request: config.timeouts.request,
                count_5xx: config.health.passive.count_5xx,
            },
        }
    }

    /// Whether requests are traced (then a request needs its header map: `traceparent`).
    pub fn tracing(&self) -> bool {
        self.tracing
    }

    /// Sweeps the calling serving thread's share of every worker's idle connections
    /// (`upstream::Pool::sweep`): what a load that stopped left behind goes.
    pub fn sweep_idle_connections(&self, now: Instant) {
        for worker in &self.balancer.workers().workers {
            worker.pool.sweep(&self.upstream.pool, now);
        }
    }

    /// The largest request body that may come read with its head (`ClientBody::Read`): what
    /// the request path would buffer itself (`retry.buffer_body_bytes`, within
    /// `limits.max_body_bytes`).
    pub fn buffered_body_limit(&self) -> u64 {
        self.settings.buffer_body.min(self.settings.max_body)
    }

    /// This gateway's `x-herd-gateway` value.
    pub fn gateway_id(&self) -> &HeaderValue {
        &self.gateway_id
    }

    /// Handles one client request; never fails (errors become JSON responses). `raw`: the
    /// request's header lines, when the gateway's own HTTP/1.1 server kept them in place of its
    /// (then empty) header map (`headers::RawRequestHead`). `request_id`: the request's id when
    /// the caller took it already (`headers::request_id`; that server writes it into a worker's
    /// raw head, `plain_http1`). The request is borrowed from the caller, which has it in its
    /// future already: taken by value, it was copied into this future and on into the next
    /// layer's (264 and 224 bytes), for every request. Its body and header map are taken.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    pub fn handle(
        &self,
        request: &mut Request<ClientBody>,
        raw: Option<headers::RawRequestHead>,
        request_id: Option<HeaderValue>,
        forwarded_for: &HeaderValue,
    ) -> impl Future<Output = Response<ResponseBody>> {
        // Not an `async fn`: its arguments would be copied into locals at the first poll and
        // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
        async move {
            let started = Instant::now();
            // A protocol switch (WebSocket) is an HTTP/1.1 affair; HTTP/2 has no Upgrade.
            let upgrade = (request.version() == http::Version::HTTP_11)
                .then(|| headers::upgrade(request.headers()))
                .flatten();
            let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut *request));
            let body = std::mem::take(request.body_mut());
            let version = request.version();
            let request_id = request_id.unwrap_or_else(|| headers::request_id(request.headers()));
            // Sampling is decided here, before any span exists: an unsampled request costs a draw
            // and one header (so the workers do not trace it either), no span.
            let span = (self.tracing && herd_shared::telemetry::decide(request.headers_mut()))
                .then(|| trace::request_span(request, &request_id));
            // Made inside `in_span`'s argument, not bound first: a bound future and the wrapper
            // that takes it would each get a slot in this future, which hyper moves per request.
            let forwarded = herd_shared::telemetry::in_span(
                span.clone(),
                self.forward(
                    request,
                    body,
                    raw,
                    forwarded_for,
                    started,
                    &request_id,
                    upgrade,
                    span.is_some(),
                ),
            )
            .await;
            let mut response = match forwarded {
                Ok((response, None)) => response,
                Ok((response, Some(worker_side))) => {
                    if let Some(client_side) = client_side {
                        let id = request_id.to_str().unwrap_or("-").to_owned();
                        worker_side.spawn(client_side, id);
                    }
                    response
                }
                Err(error) => {
                    let (status, kind, _) = error.parts();
                    self.metrics.error(kind);
                    // The log line below carries the request's trace id.
                    let _entered = span.as_ref().map(tracing::Span::enter);
                    let id = request_id.to_str().unwrap_or("-");
                    if status.is_server_error() {
                        warn!(request_id = id, status = status.as_u16(), error = %error, "request failed");
                    } else {
                        debug!(request_id = id, status = status.as_u16(), error = %error, "request refused");
                    }
                    let mut response = error.to_response(id);
                    if error.body_left_unread() && version < http::Version::HTTP_2 {
                        // The rest of the request is still on its way: a client that reused the
                        // connection would meet it closed under its next request.
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    response
                }
            };
            self.metrics.latency.observe(started.elapsed());
            if let Some(span) = &span {
                trace::record_status(span, response.status());
            }
            // A raw head's writer (`plain_http1`) adds `x-herd-gateway` itself.
            if response.body().raw_head().is_none() {
                response
                    .headers_mut()
                    .insert(headers::GATEWAY, self.gateway_id.clone());
            }
            let response_headers = response.headers_mut();
            if version == http::Version::HTTP_2
                && let Some(id) = response_headers.get_mut(headers::REQUEST_ID)
            {
                // Unique per response: HPACK would add every id to the connection's table, evicting
                // what is worth keeping there and comparing each new id with all the ids already in
                // it (a sixth of the gateway's own CPU time under h2load). Never-indexed skips both.
                id.set_sensitive(true);
            }
            response
        }
    }

    /// The response to pass on, and the worker's side of a tunnel when it switched protocols.
    /// `traced`: the request has a span, so each attempt gets one too. Its header map is taken
    /// (and given back for reuse when the request is over).
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    fn forward(
        &self,
        request: &mut Request<ClientBody>,
        body: ClientBody,
        raw: Option<headers::RawRequestHead>,
        forwarded_for: &HeaderValue,
        started: Instant,
        request_id: &HeaderValue,
        upgrade: Option<HeaderValue>,
        traced: bool,
    ) -> impl Future<Output = Result<(Response<ResponseBody>, Option<Box<WorkerTunnel>>), GatewayError>>
    {
        // Not an `async fn`: its arguments would be copied into locals at the first poll and
        // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
        async move {
            // Handed back for another response when the request is over (`headers::recycle`).
            let mut request_headers = headers::Recycled(std::mem::take(request.headers_mut()));
            let request = &*request;
            let settings = &self.settings;
            let head_size = match &raw {
                Some(raw) => raw.size as usize,
                None => headers::head_size(request.uri(), &request_headers),
            };
            if head_size > settings.max_header {
                return Err(GatewayError::HeadersTooLarge);
            }
            // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with more than one, gets a 400.
            // (Raw lines hold exactly one.)
            if request.version() == http::Version::HTTP_11
                && raw.is_none()
                && request_headers.get_all(header::HOST).iter().count() != 1
            {
                return Err(GatewayError::BadRequest(
                    "an HTTP/1.1 request needs exactly one Host header",
                ));
            }
            // A tunnel (RFC 9110 §9.3.6) is a forward proxy's service: forwarded, a worker's
            // 2xx would leave the client expecting one the gateway does not open.
            if request.method() == http::Method::CONNECT {
                return Err(GatewayError::BadRequest(
                    "CONNECT is not served: the gateway is a reverse proxy and opens no tunnels",
                ));
            }
            let content_length = match (&body, request_headers.get(header::CONTENT_LENGTH)) {
                // Read with its head, by its one `Content-Length` line (left out of a raw head).
                (ClientBody::Read(data), _) => Some(data.len() as u64),
                (_, None) => None,
                (_, Some(value)) => Some(
                    value
                        .to_str()
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .ok_or(GatewayError::BadRequest("invalid content-length"))?,
                ),
            };
            let idempotent = headers::is_idempotent(request.method());
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            headers::strip_hop_by_hop(&mut request_headers);
            // Hedging doubles a request: only for idempotent ones that are no protocol switch.
            let hedge_delay = (idempotent && upgrade.is_none())
                .then(|| self.hedging.delay())
                .flatten();
            if let Some(protocol) = upgrade {
                headers::set_upgrade(&mut request_headers, protocol);
            }
            let forwarding = headers::Forwarding {
                request_id,
                client: forwarded_for,
                over_tls: request.extensions().get::<headers::OverTls>(),
                // HTTP/2 clients send :authority instead of Host.
                authority: request.uri().authority().map(http::uri::Authority::as_str),
            };
            self.budget.deposit();

            let raw_head = raw.as_ref();
            let deadline = started + settings.request;
            // The gateway's own HTTP/1.1 server writes the worker's header lines through: no
            // header map for the response.
            let raw_response = body.read_by_gateway();
            // A body still to come from the client, read (or its start) before the first attempt.
            let reads_body = matches!(&body, ClientBody::Incoming(body)
                if !(matches!(content_length, None | Some(0)) && body.is_end_stream()));
            let mut prepared = match body {
                // Boxed, as opening a connection below: awaited in place, each of these rarer
                // futures took room of its own in every request's future.
                ClientBody::Incoming(body) if reads_body => {
                    Box::pin(self.read_body(body, content_length, deadline)).await?
                }
                // Read whole with its head, within the limits of a buffered body (`plain_http1`).
                ClientBody::Read(data) if !data.is_empty() => Prepared::Replayable(Some(data)),
                // Most requests: nothing to read, so no timer to arm.
                _ => Prepared::Replayable(None),
            };

            let mut tried = Tried::new();
            let mut last: Option<GatewayError> = None;
            // Attempts that may have reached a worker; `retry.max_attempts` bounds these. Attempts
            // that provably did not (refused, or not one byte written) cost no worker anything: they
            // are bounded by the workers left untried and the deadline, not by attempts or budget.
            let mut reached = 0;
            // Workers whose kept-alive connection turned out closed: one free retry each (below).
            let mut stale_from: Vec<Arc<Worker>> = Vec::new();
            // Why the next attempt is a retry (for its span).
            let mut retry_reason: Option<&'static str> = None;
            loop {
                // One clock read per attempt serves the pick, the pool and the attempt's start; the
                // first attempt of a request without a body to read starts when the request did.
                let now = if tried.is_empty() && !reads_body {
                    started
                } else {
                    Instant::now()
                };
                let pick = match self.balancer.pick_at(&tried, now) {
                    Ok(pick) => pick,
                    Err(refusal) => {
                        return Err(last.unwrap_or(match refusal {
                            Refusal::NoWorker => GatewayError::NoWorker,
                            Refusal::AllBusy => GatewayError::AllBusy,
                        }));
                    }
                };
                let worker = pick.worker;
                tried.push(worker.clone());
                let attempt_span = traced.then(|| {
                    let choice = Choice {
                        algorithm: &self.algorithm,
                        probe: pick.probe,
                        retry_reason,
                        hedge: false,
                    };
                    let span = trace::attempt_span(worker.id(), tried.len(), choice);
                    trace::inject(&span, &mut request_headers);
                    span
                });
                // Most attempts take a pooled connection: no future, no timer for them. Not the
                // retry on a worker whose pooled connection turned out closed: a worker that closed
                // one (restarting, or closing every connection after its answer without saying so)
                // may have closed them all, and a new connection cannot have been.
                let stale = stale_from.iter().any(|w| Arc::ptr_eq(w, &worker));
                let pooled = if stale { None } else { worker.pool.take(now) };
                let connected = match pooled {
                    Some(connection) => Ok(connection),
                    None => {
                        let opened = upstream::open(&worker.authority, &self.upstream);
                        match Box::pin(tokio::time::timeout_at(deadline, opened)).await {
                            Err(_) => return Err(last.unwrap_or(GatewayError::UpstreamTimeout)),
                            Ok(opened) => opened,
                        }
                    }
                };
                let outcome = match connected {
                    Err(error) => self.connect_failed(&worker, error, idempotent),
                    Ok(connection) => {
                        // A new connection took a handshake: the attempt starts after it.
                        let sent = if connection.is_reused() {
                            now
                        } else {
                            Instant::now()
                        };
                        let Some(body) = prepared.attempt() else {
                            break;
                        };
                        // Hedging: once per request, on a body that can be sent twice.
                        let hedge = match hedge_delay {
                            Some(delay) if tried.len() == 1 && prepared.replayable() => {
                                prepared.attempt().map(|spare| (delay, spare))
                            }
                            _ => None,
                        };
                        let mut outgoing = Outgoing {
                            method: request.method(),
                            path,
                            headers: &request_headers,
                            raw: raw_head,
                            forwarding,
                            declared_length: content_length,
                            body,
                            raw_response,
                        };
                        // Pinned where it is made: the attempt's future is large, and moving it into
                        // `hedged` cost measurable memcpy per request.
                        let mut first = std::pin::pin!(herd_shared::telemetry::in_span(
                            attempt_span.clone(),
                            self.attempt(
                                &worker,
                                connection,
                                &mut outgoing,
                                idempotent,
                                Timing { sent, deadline },
                                &prepared,
                                request_id,
                            )
                        ));
                        match hedge {
                            // Nearly every request is answered before the hedge delay: only then
                            // is the hedge made, and it waits on the heap (an allocation for a
                            // hedged request; the hedge's closure and the race's state took
                            // 720 bytes in every request's future).
                            Some((delay, spare)) => {
                                match before(first.as_mut(), sent + delay).await {
                                    Some(outcome) => outcome,
                                    None => {
                                        let prepared = &prepared;
                                        let request_headers = &request_headers;
                                        let algorithm = self.algorithm.as_str();
                                        let second = move |worker: Arc<Worker>| async move {
                                            // The hedge has a span (and a traceparent) of its own.
                                            let hedge_span = traced.then(|| {
                                                let choice = Choice {
                                                    algorithm,
                                                    probe: false,
                                                    retry_reason: None,
                                                    hedge: true,
                                                };
                                                trace::attempt_span(worker.id(), 2, choice)
                                            });
                                            let mut hedge_headers = None;
                                            if let Some(span) = &hedge_span {
                                                let mut copy =
                                                    http::HeaderMap::clone(request_headers);
                                                trace::inject(span, &mut copy);
                                                hedge_headers = Some(copy);
                                            }
                                            let request_headers = hedge_headers
                                                .as_ref()
                                                .unwrap_or(&**request_headers);
                                            let mut outgoing = Outgoing {
                                                method: request.method(),
                                                path,
                                                headers: request_headers,
                                                raw: raw_head,
                                                forwarding,
                                                declared_length: content_length,
                                                body: spare,
                                                raw_response,
                                            };
                                            let connection = match upstream::connect(
                                                &worker.pool,
                                                &worker.authority,
                                                &self.upstream,
                                                Instant::now(),
                                            )
                                            .await
                                            {
                                                Ok(connection) => connection,
                                                Err(error) => {
                                                    return self
                                                        .connect_failed(&worker, error, true);
                                                }
                                            };
                                            let outcome = herd_shared::telemetry::in_span(
                                                hedge_span.clone(),
                                                self.attempt(
                                                    &worker,
                                                    connection,
                                                    &mut outgoing,
                                                    true,
                                                    Timing {
                                                        sent: Instant::now(),
                                                        deadline,
                                                    },
                                                    prepared,
                                                    request_id,
                                                ),
                                            )
                                            .await;
                                            if let Some(span) = &hedge_span {
                                                record_attempt(span, &outcome);
                                            }
                                            outcome
                                        };
                                        Box::pin(self.hedged(
                                            first.as_mut(),
                                            &worker,
                                            (sent, delay),
                                            &mut tried,
                                            second,
                                        ))
                                        .await
                                    }
                                }
                            }
                            None => first.await,
                        }
                    }
                };
                if let Some(span) = &attempt_span {
                    record_attempt(span, &outcome);
                }
                let (error, reason) = match outcome {
                    Attempt::Response(response) => return Ok((response, None)),
                    Attempt::Switched(response, tunnel) => return Ok((response, Some(tunnel))),
                    Attempt::Retryable(response) => {
                        reached += 1;
                        if !self.may_retry(reached, "status", false, &prepared, deadline, &tried) {
                            return Ok((response, None));
                        }
                        let error = GatewayError::Upstream(UpstreamError {
                            kind: UpstreamErrorKind::Reset,
                            reached: true,
                            detail: format!("worker answered {}", response.status().as_u16()),
                        });
                        (error, "status")
                    }
                    Attempt::Failed {
                        error,
                        retry_safe,
                        reason,
                    } => {
                        // A pooled connection the worker closed as we reused it says nothing about
                        // the worker: an idempotent request goes again, on another connection, and
                        // may go to the same worker (a dead one then refuses, which is free). Once
                        // per worker, so that losing every worker at once still ends in a 503 (each
                        // refuses), not in a 502 for the last stale connection. The stale error is
                        // not kept as the last one: it says nothing about whether a worker is left.
                        // Not for a streamed body the attempt took: it cannot go again (the
                        // loop would end with no error to answer).
                        let stale = retry_safe
                            && prepared.available()
                            && !stale_from.iter().any(|w| Arc::ptr_eq(w, &worker))
                            && matches!(&error, GatewayError::Upstream(e) if e.kind == UpstreamErrorKind::Closed);
                        if stale {
                            stale_from.push(worker);
                            tried.pop();
                            self.metrics.retry(reason);
                            retry_reason = Some(reason);
                            continue;
                        }
                        let free = matches!(&error, GatewayError::Upstream(e) if !e.reached);
                        if !free {
                            reached += 1;
                        }
                        if !retry_safe
                            || !self.may_retry(reached, reason, free, &prepared, deadline, &tried)
                        {
                            return Err(error);
                        }
                        (error, reason)
                    }
                };
                debug!(
                    request_id = request_id.to_str().unwrap_or("-"),
                    worker = %worker.id(),
                    attempts = tried.len(),
                    reason,
                    error = %error,
                    "retrying on another worker"
                );
                retry_reason = Some(reason);
                last = Some(error);
            }
            Err(last.unwrap_or(GatewayError::NoWorker))
        }
    }

    /// A connect that failed: the worker never saw the request, so any method may go elsewhere.
    /// Refused means nothing serves there: unreachable at once, no passive streak needed.
    fn connect_failed(&self, worker: &Worker, error: UpstreamError, idempotent: bool) -> Attempt {
        worker.count_response(None);
        if error.kind == UpstreamErrorKind::Refused {
            self.balancer
                .unreachable(worker, ChangeSource::Passive, &error.detail);
        } else if error.blames_worker() {
            self.balancer.report(worker, false);
        }
        Attempt::Failed {
            retry_safe: error.retry_safe(idempotent, self.settings.retry_on_timeout),
            reason: error.reason(),
            error: GatewayError::Upstream(error),
        }
    }

    /// Reads the start of the request body within the request deadline (408 when the client is
    /// too slow).
    async fn read_body(
        &self,
        body: ClientIncoming,
        content_length: Option<u64>,
        deadline: Instant,
    ) -> Result<Prepared, GatewayError> {
        let settings = &self.settings;
        let prepare = body::prepare(
            body,
            content_length,
            settings.buffer_body,
            settings.max_body,
        );
        match tokio::time::timeout_at(deadline, prepare).await {
            Ok(prepared) => prepared,
            Err(_) => Err(GatewayError::ClientTimeout),
        }
    }

    /// Whether a retry-safe failure may be retried: body still at hand, time left, another
    /// worker to go to, and — unless the failed attempt provably never reached its worker
    /// (`free`) — attempts and budget left. Counts the retry or the limit that refused it.
    fn may_retry(
        &self,
        reached: u32,
        reason: &'static str,
        free: bool,
        prepared: &Prepared,
        deadline: Instant,
        tried: &[Arc<Worker>],
    ) -> bool {
        if !prepared.available() || Instant::now() >= deadline {
            return false;
        }
        if !free && reached >= self.settings.max_attempts {
            self.metrics.retry_refused("max_attempts");
            return false;
        }
        if !self.balancer.has_candidate(tried) {
            return false;
        }
        let second = self.balancer.clock().now() / 1_000_000_000;
        if !free && !self.budget.try_withdraw(second) {
            self.metrics.retry_refused("budget");
            return false;
        }
        self.metrics.retry(reason);
        true
    }

    /// `first` (an attempt at `worker`, sent at `sent`) had no answer within `delay`
    /// ([`before`]): also sends the request to another worker (`second`, spending a retry-budget
    /// token) and takes the first answer. The slower attempt is dropped with its connection; its
    /// wait so far goes into its worker's latency estimate, so p2c steers new requests away from
    /// a worker that hangs.
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    fn hedged<F, S, Fut>(
        &self,
        mut first: std::pin::Pin<&mut F>,
        worker: &Arc<Worker>,
        (sent, delay): (Instant, Duration),
        tried: &mut Tried,
        second: S,
    ) -> impl Future<Output = Attempt>
    where
        F: Future<Output = Attempt>,
        S: FnOnce(Arc<Worker>) -> Fut,
        Fut: Future<Output = Attempt>,
    {
        // Not an `async fn`: its arguments (the hedge's closure, 280 bytes) would be copied into
        // locals at the first poll and both kept in the future (rust-lang/rust#62958).
        async move {
            let Ok(pick) = self.balancer.pick(tried) else {
                return first.await;
            };
            let second_worker = pick.worker;
            let now = self.balancer.clock().now();
            if !self.budget.try_withdraw(now / 1_000_000_000) {
                self.metrics.retry_refused("budget");
                return first.await;
            }
            self.metrics.retry("hedge");
            tried.push(second_worker.clone());
            let hedge_started = Instant::now();
            // Boxed: only hedged requests pay for the second attempt's room.
            let mut second = Box::pin(second(second_worker.clone()));
            let (outcome, winner_is_first) = tokio::select! {
                outcome = &mut first => (outcome, true),
                outcome = &mut second => (outcome, false),
            };
            let succeeded = matches!(outcome, Attempt::Response(_) | Attempt::Switched(..));
            let (outcome, first_won) = if succeeded {
                (outcome, winner_is_first)
            } else if winner_is_first {
                // The first failed: the hedge is the answer now (the retry loop goes on from it).
                (second.await, false)
            } else {
                (first.await, true)
            };
            // The loser was dropped mid-way (or failed, and was counted then).
            let clock = self.balancer.clock().now();
            if first_won {
                let waited = hedge_started.elapsed().as_nanos() as f64;
                second_worker.ewma.observe(waited, clock);
            } else if succeeded {
                worker.ewma.observe(sent.elapsed().as_nanos() as f64, clock);
                // Another worker answered while this one had not in twice its p99. If this one
                // answered nothing else since the request was sent either, it may hang: a
                // failure for passive health, so a hung worker is ejected after a few hedges
                // instead of drawing requests (its in-flight count drops with each abandoned
                // attempt, which makes it look idle to p2c) until the active checks time out.
                // A worker that went on answering is busy, not hung: the request waited in its
                // queue. Counting those ejected healthy workers of a saturated pool one after
                // another; the latency estimate above steers new requests away instead.
                if !worker.answered_since(self.balancer.clock().at(sent)) {
                    worker.count_response(None);
                    self.balancer.report_at(worker, false, clock);
                }
            }
            debug!(
                worker = %worker.id(),
                hedge = %second_worker.id(),
                first_won,
                delay_ms = delay.as_millis() as u64,
                "hedged request"
            );
            outcome
        }
    }

    /// Sends one attempt to `worker` and classifies the result. Only the worker's own failures
    /// count against its passive health; a refused connect makes it unreachable at once.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // see the comment in the body
    fn attempt(
        &self,
        worker: &Arc<Worker>,
        connection: Connection,
        request: &mut Outgoing<'_>,
        idempotent: bool,
        timing: Timing,
        prepared: &Prepared,
        request_id: &HeaderValue,
    ) -> impl Future<Output = Attempt> {
        // Not an `async fn`: its arguments would be copied into locals at the first poll and
        // both kept in the future (rust-lang/rust#62958); an async block uses them in place.
        async move {
            let guard = worker.begin();
            let Timing { sent, deadline } = timing;
            // Pinned where it is made: bound as a value and then awaited, the exchange's future
            // (1.8 KB) was copied whole into the slot that awaits it, for every request.
            let exchange = std::pin::pin!(upstream::exchange(
                connection,
                &worker.authority,
                &worker.pool,
                request,
                &self.upstream,
                timing,
            ));
            // The exchange bounds the worker's waits itself; only a streamed body waits for the
            // client, and that wait needs the request deadline on top (one timer fewer otherwise).
            let result = if prepared.watch().is_some() {
                tokio::time::timeout_at(deadline, exchange).await
            } else {
                Ok(exchange.await)
            };
            match result {
                Ok(Ok((head, reply, answered))) => {
                    let status = head.status;
                    let clock = self.balancer.clock().at(answered);
                    let waited = answered.saturating_duration_since(sent);
                    worker.ewma.observe(waited.as_nanos() as f64, clock);
                    worker.note_answer(clock);
                    worker.latency.observe(waited);
                    self.hedging.observe(waited);
                    worker.count_response(Some(status));
                    let failed = self.settings.count_5xx && status.is_server_error();
                    self.balancer.report_at(worker, !failed, clock);
                    let retryable = idempotent
                        && matches!(
                            status,
                            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                        );
                    let mut response_headers = head.headers;
                    let switched_to = response_headers.get(header::UPGRADE).cloned();
                    // A raw head's lines are filtered where they are written (`plain_http1`).
                    headers::strip_hop_by_hop(&mut response_headers);
                    // A raw head's writer adds the request id itself (`plain_http1`).
                    let raw_head = head.raw;
                    if raw_head.is_none() && !response_headers.contains_key(headers::REQUEST_ID) {
                        response_headers.insert(headers::REQUEST_ID, request_id.clone());
                    }
                    let (body, tunnel) = match reply {
                        Reply::Body(worker_body) => {
                            let body = ResponseBody::Upstream {
                                inner: worker_body,
                                guard: Some(guard),
                                raw_head,
                            };
                            (body, None)
                        }
                        Reply::Switched(connection) => {
                            if let Some(protocol) = switched_to {
                                headers::set_upgrade(&mut response_headers, protocol);
                            }
                            // The tunnel counts as in flight on its worker until it closes.
                            let tunnel = Box::new(WorkerTunnel::new(connection, guard));
                            (ResponseBody::empty(), Some(tunnel))
                        }
                    };
                    let mut response = Response::new(body);
                    *response.status_mut() = status;
                    *response.headers_mut() = response_headers;
                    if let Some(tunnel) = tunnel {
                        Attempt::Switched(response, tunnel)
                    } else if retryable {
                        Attempt::Retryable(response)
                    } else {
                        Attempt::Response(response)
                    }
                }
                Ok(Err(error)) => {
                    if prepared.watch().is_some_and(|w| w.too_large()) {
                        return Attempt::Failed {
                            error: GatewayError::BodyTooLarge,
                            retry_safe: false,
                            reason: "body",
                        };
                    }
                    match error.kind {
                        UpstreamErrorKind::ClientGone => {
                            return Attempt::Failed {
                                error: GatewayError::ClientGone(error.detail),
                                retry_safe: false,
                                reason: "client",
                            };
                        }
                        UpstreamErrorKind::ClientBody => {
                            return Attempt::Failed {
                                error: GatewayError::ClientBody(error.detail),
                                retry_safe: false,
                                reason: "client",
                            };
                        }
                        UpstreamErrorKind::Refused => {
                            self.balancer
                                .unreachable(worker, ChangeSource::Passive, &error.detail);
                        }
                        _ => {}
                    }
                    worker.count_response(None);
                    if error.blames_worker() {
                        self.balancer.report(worker, false);
                    }
                    Attempt::Failed {
                        retry_safe: error.retry_safe(idempotent, self.settings.retry_on_timeout),
                        reason: error.reason(),
                        error: GatewayError::Upstream(error),
                    }
                }
                Err(_) => {
                    // The whole request's time is up. Waiting for the client's body: its fault, and
                    // the worker is not blamed. Otherwise the worker took the time.
                    if prepared.watch().is_some_and(|w| !w.finished()) {
                        return Attempt::Failed {
                            error: GatewayError::ClientTimeout,
                            retry_safe: false,
                            reason: "client",
                        };
                    }
                    worker.count_response(None);
                    self.balancer.report(worker, false);
                    Attempt::Failed {
                        error: GatewayError::UpstreamTimeout,
                        retry_safe: false,
                        reason: "timeout",
                    }
                }
            }
        }
    }
}

/// `first`'s outcome if it comes by `hedge_at`, `None` if that time comes first (the attempt goes
/// on: see `Proxy::hedged`).
async fn before<F: Future<Output = Attempt>>(
    first: std::pin::Pin<&mut F>,
    hedge_at: Instant,
) -> Option<Attempt> {
    tokio::select! {
        biased;
        outcome = first => Some(outcome),
        () = HedgeTimer::until(hedge_at) => None,
    }
}

/// Records how an attempt ended on its span.
fn record_attempt(span: &tracing::Span, outcome: &Attempt) {
    match outcome {
        Attempt::Response(response)
        | Attempt::Retryable(response)
        | Attempt::Switched(response, _) => {
            trace::record_status(span, response.status());
        }
        Attempt::Failed { error, reason, .. } => trace::record_failure(span, reason, error),
    }
}
