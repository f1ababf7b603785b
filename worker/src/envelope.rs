//! What a herd worker puts around every request of its app, as one middleware: the request's
//! trace span, its metrics, the drain's count of requests in flight, the `x-herd-worker` and
//! `x-herd-machine` headers, and a handler's panic answered as a JSON 500.
//!
//! One layer, not one per concern: axum boxes the future of every layer and clones the service
//! under it into the `Next` it hands on, per request, so each layer cost an allocation, a clone
//! and a copy of its future (docs/performance.md, section 46). Each concern stays in its own
//! module ([`trace`], [`metrics`](crate::metrics), [`traffic`](crate::traffic)); this file only
//! orders them, as the layers did, outermost first: the span covers everything, the metrics all
//! but the span, the drain count all but those, and the panic is caught innermost, so a panicked
//! handler's 500 is stamped, counted and traced like any answer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use http::HeaderValue;
use tracing::Instrument as _;

use crate::config::Identity;
use crate::error::ApiError;
use crate::metrics::WorkerMetrics;
use crate::server::WorkerError;
use crate::trace;
use crate::traffic::Traffic;

/// What the middleware needs, made once per worker.
pub(crate) struct Envelope {
    traffic: Arc<Traffic>,
    metrics: Arc<WorkerMetrics>,
    identity: IdentityHeaders,
}

impl Envelope {
    pub(crate) fn new(
        identity: &Identity,
        traffic: Arc<Traffic>,
        metrics: Arc<WorkerMetrics>,
    ) -> Result<Self, WorkerError> {
        Ok(Envelope {
            traffic,
            metrics,
            identity: IdentityHeaders::new(identity)?,
        })
    }

    /// Everything but the span.
    async fn serve(&self, request: Request, next: Next) -> Response {
        let route = request.extensions().get::<MatchedPath>().cloned();
        let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let measure = self.metrics.request(route);
        let _in_flight = self.traffic.enter(request.uri().path());
        let mut response = catching_panics(request, next).await;
        self.identity.stamp(&mut response);
        measure.finish(response.status());
        response
    }
}

/// The middleware (`axum::middleware::from_fn_with_state`).
pub(crate) async fn around(
    State(envelope): State<Arc<Envelope>>,
    request: Request,
    next: Next,
) -> Response {
    match trace::request_span(&request) {
        None => envelope.serve(request, next).await,
        Some(span) => {
            let response = envelope.serve(request, next).instrument(span.clone()).await;
            trace::record_status(&span, response.status());
            response
        }
    }
}

/// A handler that panics answers a JSON 500 (and is logged) instead of dropping the connection,
/// which a gateway could not tell from a dead worker.
async fn catching_panics(request: Request, next: Next) -> Response {
    let uri = request.uri().clone();
    match AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(path = %uri.path(), "handler panicked");
            ApiError::Internal.into_response()
        }
    }
}

/// `x-herd-worker` and `x-herd-machine`, checked once.
pub(crate) struct IdentityHeaders {
    worker: HeaderValue,
    machine: HeaderValue,
}

impl IdentityHeaders {
    pub(crate) fn new(identity: &Identity) -> Result<Self, WorkerError> {
        Ok(IdentityHeaders {
            worker: HeaderValue::from_str(&identity.id).map_err(|_| WorkerError::BadIdentity)?,
            machine: HeaderValue::from_str(&identity.machine)
                .map_err(|_| WorkerError::BadIdentity)?,
        })
    }

    /// Puts both headers on `response`.
    pub(crate) fn stamp(&self, response: &mut Response) {
        let map = response.headers_mut();
        map.insert("x-herd-worker", self.worker.clone());
        map.insert("x-herd-machine", self.machine.clone());
    }
}
