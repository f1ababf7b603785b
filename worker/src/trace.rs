//! The worker's request span (OpenTelemetry, when `[tracing] enabled`): continues the trace of
//! the `traceparent` the gateway sent, so the worker's request — and under it the session
//! store's Redis operations — sits below the gateway's attempt in one trace.

use axum::extract::{MatchedPath, Request};
use herd_shared::telemetry::{self, TRACE_TARGET};
use tracing::Span;

/// A server span for `request` when tracing is on and the request is sampled: a child of the
/// caller's `traceparent` if any (whose sampled flag decides; without one, a draw at the
/// configured ratio). `None` otherwise; with tracing off that is one boolean load.
pub(crate) fn request_span(request: &Request) -> Option<Span> {
    if !telemetry::tracing_enabled() || !telemetry::should_trace(request.headers()) {
        return None;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("-");
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "worker request",
        otel.name = %format!("{} {}", request.method(), route),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        url.path = %request.uri().path(),
        request_id = %request_id,
        trace_id = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, request.headers());
    if let Some(trace_id) = telemetry::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    Some(span)
}

/// Records the response's status on the request's span (an error status for a 5xx).
pub(crate) fn record_status(span: &Span, status: http::StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}
