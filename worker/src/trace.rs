//! The worker's request span (OpenTelemetry, when `[tracing] enabled`): continues the trace of
//! the `traceparent` the gateway sent, so the worker's request — and under it the session
//! store's Redis operations — sits below the gateway's attempt in one trace.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use herd_shared::telemetry::{self, TRACE_TARGET};
use tracing::Instrument as _;

/// Middleware: a server span per traced request, child of the caller's `traceparent` if any
/// (whose sampled flag decides; without one, a draw at the configured ratio). With tracing off
/// it only forwards (one boolean load).
pub async fn request_span(request: Request, next: Next) -> Response {
    if !telemetry::tracing_enabled() || !telemetry::should_trace(request.headers()) {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
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
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}
