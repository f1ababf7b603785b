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

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt as _;
use futures_util::future::Either;
use http::{HeaderName, HeaderValue};
use tower::Service as _;
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
}

/// The middleware (`axum::middleware::from_fn_with_state`): the request handed to its route,
/// and the future of everything around it, inside the span when the request is traced.
///
/// Not an `async fn`: an `async fn`'s future keeps its arguments beside the futures it awaits,
/// and with one per concern (`serve`, the panic catcher, axum's `Next::run`) the request was
/// held four times over in the 2.4 KB that axum boxes per request (docs/performance.md,
/// section 51). Here the request goes straight into the route's future, and the future made
/// here holds only what it needs afterwards. What it does runs, as before, when it is first
/// polled: the span covers everything, the metrics all but the span, the drain count all but
/// those, and a handler's panic is caught innermost, so a panicked handler's 500 is stamped,
/// counted and traced like any answer.
pub(crate) fn around(
    State(envelope): State<Arc<Envelope>>,
    request: Request,
    mut next: Next,
) -> impl Future<Output = Response> + Send + 'static {
    let span = trace::request_span(&request);
    let route = request.extensions().get::<MatchedPath>().cloned();
    let uri = request.uri().clone();
    // Only makes the route's future (axum's `Route::call` defers the inner services' calls to its
    // first poll): the session layer and the handler run where the panic is caught.
    let handled = AssertUnwindSafe(next.call(request)).catch_unwind();
    let traced = span.clone();
    let served = async move {
        let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let measure = envelope.metrics.request(route);
        let _in_flight = envelope.traffic.enter(uri.path());
        let mut response = match handled.await {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                tracing::error!(path = %uri.path(), "handler panicked");
                ApiError::Internal.into_response()
            }
        };
        envelope.identity.stamp(&mut response);
        measure.finish(response.status());
        if let Some(span) = &traced {
            trace::record_status(span, response.status());
        }
        response
    };
    // As before: not instrumented with a disabled span when untraced, nothing spent on tracing.
    match span {
        Some(span) => Either::Left(served.instrument(span)),
        None => Either::Right(served),
    }
}

/// `x-herd-worker`: the worker's id on every response.
const WORKER: HeaderName = HeaderName::from_static("x-herd-worker");
/// `x-herd-machine`: the worker's machine on every response.
const MACHINE: HeaderName = HeaderName::from_static("x-herd-machine");

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

    /// Puts both headers on `response`. Names made at compile time: a `&str` name would be
    /// parsed and copied into a new allocation at each insert (it was 1 100 of a `GET /me`'s
    /// 42 000 instructions, two allocations; docs/performance.md, section 52).
    pub(crate) fn stamp(&self, response: &mut Response) {
        let map = response.headers_mut();
        map.insert(WORKER, self.worker.clone());
        map.insert(MACHINE, self.machine.clone());
    }
}
