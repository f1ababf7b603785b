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

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::balancer::{Balancer, Refusal, Worker};
use crate::body::{self, Prepared, ResponseBody};
use crate::config::GatewayConfig;
use crate::error::{GatewayError, UpstreamError, UpstreamErrorKind};
use crate::headers;
use crate::metrics::Metrics;
use crate::retry::RetryBudget;
use crate::tunnel::WorkerTunnel;
use crate::upstream::{self, ClientSettings, Outgoing, PoolLimits, Reply};

/// Limits and timeouts the request path applies, copied out of the configuration.
#[derive(Debug, Clone)]
struct Settings {
    max_attempts: u32,
    retry_on_timeout: bool,
    buffer_body: u64,
    max_body: u64,
    max_header: usize,
    response_header: Duration,
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
    settings: Settings,
    /// `x-herd-gateway` on every response: which gateway of a pair answered.
    gateway_id: HeaderValue,
}

/// How one attempt ended.
enum Attempt {
    /// A response to pass on.
    Response(Response<ResponseBody>),
    /// The worker switched protocols: its 101, and its side of the tunnel.
    Switched(Response<ResponseBody>, WorkerTunnel),
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
        let upstream = ClientSettings {
            connect_timeout: config.timeouts.connect,
            pool: PoolLimits {
                max_idle: config.limits.max_idle_per_worker,
                idle_timeout: config.timeouts.upstream_idle,
            },
        };
        Proxy {
            gateway_id: HeaderValue::from_str(&config.id)
                .unwrap_or_else(|_| HeaderValue::from_static("gateway")),
            balancer,
            upstream,
            metrics,
            budget: RetryBudget::new(&config.retry),
            settings: Settings {
                max_attempts: config.retry.max_attempts,
                retry_on_timeout: config.retry.on_timeout,
                buffer_body: config.retry.buffer_body_bytes,
                max_body: config.limits.max_body_bytes,
                max_header: config.limits.max_header_bytes,
                response_header: config.timeouts.response_header,
                request: config.timeouts.request,
                count_5xx: config.health.passive.count_5xx,
            },
        }
    }

    /// Handles one client request; never fails (errors become JSON responses).
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        forwarded_for: &HeaderValue,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        // A protocol switch (WebSocket) is an HTTP/1.1 affair; HTTP/2 has no Upgrade.
        let upgrade = (request.version() == http::Version::HTTP_11)
            .then(|| headers::upgrade(request.headers()))
            .flatten();
        let client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let version = parts.version;
        let request_id = headers::ensure_request_id(&mut parts.headers);
        let mut response = match self
            .forward(parts, body, forwarded_for, started, &request_id, upgrade)
            .await
        {
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
                let id = request_id.to_str().unwrap_or("-");
                if status.is_server_error() {
                    warn!(request_id = id, status = status.as_u16(), error = %error, "request failed");
                } else {
                    debug!(request_id = id, status = status.as_u16(), error = %error, "request refused");
                }
                error.to_response(id)
            }
        };
        self.metrics.latency.observe(started.elapsed());
        let response_headers = response.headers_mut();
        response_headers.insert(headers::GATEWAY, self.gateway_id.clone());
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

    /// The response to pass on, and the worker's side of a tunnel when it switched protocols.
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        forwarded_for: &HeaderValue,
        started: Instant,
        request_id: &HeaderValue,
        upgrade: Option<HeaderValue>,
    ) -> Result<(Response<ResponseBody>, Option<WorkerTunnel>), GatewayError> {
        let settings = &self.settings;
        if headers::head_size(&parts.uri, &parts.headers) > settings.max_header {
            return Err(GatewayError::HeadersTooLarge);
        }
        // RFC 9112 §3.2: an HTTP/1.1 request without Host, or with more than one, gets a 400.
        if parts.version == http::Version::HTTP_11
            && parts.headers.get_all(header::HOST).iter().count() != 1
        {
            return Err(GatewayError::BadRequest(
                "an HTTP/1.1 request needs exactly one Host header",
            ));
        }
        let content_length = match parts.headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(GatewayError::BadRequest("invalid content-length"))?,
            ),
        };
        let idempotent = headers::is_idempotent(&parts.method);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            // HTTP/2 clients send :authority instead of Host; HTTP/1.1 workers want Host.
            parts.headers.insert(header::HOST, host);
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        if let Some(protocol) = upgrade {
            headers::set_upgrade(&mut parts.headers, protocol);
        }
        headers::add_forwarded(&mut parts.headers, forwarded_for, "http");
        self.budget.deposit();

        let deadline = started + settings.request;
        let no_body = matches!(content_length, None | Some(0)) && body.is_end_stream();
        let mut prepared = if no_body {
            // Most requests: nothing to read, so no timer to arm.
            Prepared::Replayable(None)
        } else {
            self.read_body(body, content_length, deadline).await?
        };

        let mut tried: Vec<Arc<Worker>> = Vec::new();
        let mut last: Option<GatewayError> = None;
        for attempt in 1..=settings.max_attempts {
            let pick = match self.balancer.pick(&tried) {
                Ok(pick) => pick,
                Err(refusal) => {
                    return Err(last.unwrap_or(match refusal {
                        Refusal::NoWorker => GatewayError::NoWorker,
                        Refusal::AllBusy => GatewayError::AllBusy,
                    }));
                }
            };
            let Some(body) = prepared.attempt() else {
                break;
            };
            let request = Outgoing {
                method: &parts.method,
                path,
                headers: &parts.headers,
                declared_length: content_length,
                body,
            };

            let outcome = self
                .attempt(
                    &pick.worker,
                    request,
                    idempotent,
                    deadline,
                    &prepared,
                    request_id,
                )
                .await;
            let (error, reason) = match outcome {
                Attempt::Response(response) => return Ok((response, None)),
                Attempt::Switched(response, tunnel) => return Ok((response, Some(tunnel))),
                Attempt::Retryable(response) => {
                    tried.push(pick.worker.clone());
                    if !self.may_retry(attempt, "status", &prepared, deadline, &tried) {
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
                    tried.push(pick.worker.clone());
                    if !retry_safe || !self.may_retry(attempt, reason, &prepared, deadline, &tried)
                    {
                        return Err(error);
                    }
                    (error, reason)
                }
            };
            debug!(
                request_id = request_id.to_str().unwrap_or("-"),
                worker = %pick.worker.id(),
                attempt,
                reason,
                error = %error,
                "retrying on another worker"
            );
            last = Some(error);
        }
        Err(last.unwrap_or(GatewayError::NoWorker))
    }

    /// Reads the start of the request body within the request deadline (408 when the client is
    /// too slow).
    async fn read_body(
        &self,
        body: Incoming,
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

    /// Whether a retry-safe failure may be retried: body replayable, time left, attempts left,
    /// another worker to go to, and budget. Counts the retry or the limit that refused it.
    fn may_retry(
        &self,
        attempt: u32,
        reason: &'static str,
        prepared: &Prepared,
        deadline: Instant,
        tried: &[Arc<Worker>],
    ) -> bool {
        if !prepared.replayable() || Instant::now() >= deadline {
            return false;
        }
        if attempt >= self.settings.max_attempts {
            self.metrics.retry_refused("max_attempts");
            return false;
        }
        if !self.balancer.has_candidate(tried) {
            return false;
        }
        let second = self.balancer.clock().now() / 1_000_000_000;
        if !self.budget.try_withdraw(second) {
            self.metrics.retry_refused("budget");
            return false;
        }
        self.metrics.retry(reason);
        true
    }

    /// Sends one attempt to `worker` and classifies the result.
    async fn attempt(
        &self,
        worker: &Arc<Worker>,
        request: Outgoing<'_>,
        idempotent: bool,
        deadline: Instant,
        prepared: &Prepared,
        request_id: &HeaderValue,
    ) -> Attempt {
        let guard = worker.begin();
        let sent = Instant::now();
        let per_try = deadline.min(sent + self.settings.response_header);
        let exchange = upstream::exchange(worker, request, &self.upstream);
        let result = tokio::time::timeout_at(per_try, exchange).await;
        match result {
            Ok(Ok((head, reply))) => {
                let status = head.status;
                let clock = self.balancer.clock().now();
                worker.ewma.observe(sent.elapsed().as_nanos() as f64, clock);
                worker.count_response(Some(status));
                let failed = self.settings.count_5xx && status.is_server_error();
                self.balancer.report(worker, !failed);
                let retryable = idempotent
                    && matches!(
                        status,
                        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                    );
                let mut response_headers = head.headers;
                let switched_to = response_headers.get(header::UPGRADE).cloned();
                headers::strip_hop_by_hop(&mut response_headers);
                if !response_headers.contains_key(headers::REQUEST_ID) {
                    response_headers.insert(headers::REQUEST_ID, request_id.clone());
                }
                let (body, tunnel) = match reply {
                    Reply::Body(worker_body) => {
                        let body = ResponseBody::Upstream {
                            inner: worker_body,
                            guard: Some(guard),
                        };
                        (body, None)
                    }
                    Reply::Switched(connection) => {
                        if let Some(protocol) = switched_to {
                            headers::set_upgrade(&mut response_headers, protocol);
                        }
                        // The tunnel counts as in flight on its worker until it closes.
                        let tunnel = WorkerTunnel::new(connection, guard);
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
                worker.count_response(None);
                if prepared.watch().is_some_and(|w| w.too_large()) {
                    return Attempt::Failed {
                        error: GatewayError::BodyTooLarge,
                        retry_safe: false,
                        reason: "body",
                    };
                }
                self.balancer.report(worker, false);
                Attempt::Failed {
                    retry_safe: error.retry_safe(idempotent, self.settings.retry_on_timeout),
                    reason: error.reason(),
                    error: GatewayError::Upstream(error),
                }
            }
            Err(_) => {
                worker.count_response(None);
                self.balancer.report(worker, false);
                if Instant::now() >= deadline {
                    let client_slow = prepared.watch().is_some_and(|w| !w.finished());
                    let error = if client_slow {
                        GatewayError::ClientTimeout
                    } else {
                        GatewayError::UpstreamTimeout
                    };
                    return Attempt::Failed {
                        error,
                        retry_safe: false,
                        reason: "timeout",
                    };
                }
                let error = UpstreamError::timeout();
                Attempt::Failed {
                    retry_safe: error.retry_safe(idempotent, self.settings.retry_on_timeout),
                    reason: "timeout",
                    error: GatewayError::Upstream(error),
                }
            }
        }
    }
}
