//! OpenTelemetry spans of the request path (only when `[tracing] enabled`; the proxy tests one
//! boolean and does none of this otherwise).
//!
//! ```text
//! gateway request  (server; child of the client's traceparent, if any)
//! ├─ gateway attempt  worker=w1 pick=p2c            → traceparent sent to w1
//! ├─ gateway attempt  worker=w2 retry_reason=reset   → traceparent sent to w2
//! └─ gateway attempt  worker=w3 hedge=true           (a hedged second attempt)
//! ```
//!
//! Each attempt sends its own span as the worker's parent, so the worker's spans (and its
//! Redis calls) hang under the attempt that caused them.

use herd_shared::telemetry::{self, TRACE_TARGET};
use http::{HeaderMap, HeaderName, HeaderValue};
use tracing::Span;
use tracing::field::Empty;

/// W3C trace context: the parent span.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C trace context: vendor state, passed on unchanged.
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The span of one client request, child of the client's `traceparent` when it sent one; its
/// `trace_id` and `request_id` fields go into every log line written inside it.
pub(crate) fn request_span<B>(request: &http::Request<B>, request_id: &HeaderValue) -> Span {
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "gateway request",
        otel.name = %format!("{} gateway", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %request.uri().path(),
        request_id = request_id.to_str().unwrap_or("-"),
        trace_id = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
        herd.attempts = Empty,
    );
    telemetry::set_remote_parent(&span, request.headers());
    if let Some(trace_id) = telemetry::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    span
}

/// Why an attempt went where it did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Choice<'a> {
    /// The balancing algorithm that picked the worker.
    pub(crate) algorithm: &'a str,
    /// The pick lets an ejected worker prove itself again.
    pub(crate) probe: bool,
    /// The failure of the previous attempt that made this one a retry.
    pub(crate) retry_reason: Option<&'static str>,
    /// A hedge: a second attempt sent because the first was slow.
    pub(crate) hedge: bool,
}

/// The span of one attempt at `worker` (child of the current request span).
pub(crate) fn attempt_span(worker: &str, number: usize, choice: Choice<'_>) -> Span {
    tracing::info_span!(
        target: TRACE_TARGET,
        "gateway attempt",
        otel.kind = "client",
        herd.worker = worker,
        herd.attempt = number,
        herd.pick = choice.algorithm,
        herd.probe = choice.probe,
        herd.retry_reason = choice.retry_reason.unwrap_or(""),
        herd.hedge = choice.hedge,
        herd.outcome = Empty,
        http.response.status_code = Empty,
        otel.status_code = Empty,
    )
}

/// Puts `span`'s `traceparent` (and the caller's `tracestate`) on the request to the worker.
pub(crate) fn inject(span: &Span, headers: &mut HeaderMap) {
    match telemetry::trace_headers(span) {
        Some((parent, state)) => {
            headers.insert(TRACEPARENT, parent);
            match state {
                Some(state) => {
                    headers.insert(TRACESTATE, state);
                }
                None => {
                    headers.remove(TRACESTATE);
                }
            }
        }
        None => {
            // Not traced: pass on whatever the client sent.
        }
    }
}

/// Records a worker's answer on an attempt or request span.
pub(crate) fn record_status(span: &Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// Records a failed attempt: the retry reason label and the error.
pub(crate) fn record_failure(span: &Span, reason: &str, error: &dyn std::fmt::Display) {
    span.record(
        "herd.outcome",
        tracing::field::display(format_args!("{reason}: {error}")),
    );
    span.record("otel.status_code", "ERROR");
}
