//! Liveness and readiness: `/healthz` (200 while the process runs) and `/readyz` (200 when Redis
//! answers and the worker is not draining, else 503).
//!
//! `/readyz` answers at once from state kept by a background Redis probe, so a gateway's health
//! check never waits on Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::session::SessionStore;

/// Whether this worker should get new requests.
#[derive(Debug)]
pub struct Readiness {
    redis_ok: AtomicBool,
    draining: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            // Optimistic until the first probe: the probe runs before the listener is announced.
            redis_ok: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        }
    }
}

impl Readiness {
    /// Records the latest Redis probe; logs only changes.
    pub fn set_redis_ok(&self, ok: bool) {
        let was = self.redis_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!(redis = "reachable", "redis is back; ready");
            } else {
                tracing::warn!(redis = "unreachable", "redis unreachable; not ready");
            }
        }
    }

    /// Marks the worker as draining: `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the worker is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.is_draining() {
            Some("draining")
        } else if !self.redis_ok.load(Ordering::Relaxed) {
            Some("redis_unreachable")
        } else {
            None
        }
    }
}

/// Pings Redis every `interval` until `stop`, recording the result.
pub async fn probe_redis(
    store: SessionStore,
    readiness: Arc<Readiness>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        let ok = tokio::select! {
            ok = store.ping() => ok,
            () = stop.cancelled() => return,
        };
        readiness.set_redis_ok(ok);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Whether `path` is one of the health checks, which the drain and the in-flight gauge leave
/// out (gateways keep polling them).
pub(crate) fn is_check(path: &str) -> bool {
    path == "/healthz" || path == "/readyz"
}

/// `/healthz` and `/readyz`.
pub fn routes(readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> Response {
    match readiness.not_ready_reason() {
        None => Json(json!({ "status": "ready" })).into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "not_ready", "message": reason })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    async fn status(readiness: &Arc<Readiness>, path: &str) -> StatusCode {
        routes(readiness.clone())
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn readyz_follows_redis_and_drain() {
        let readiness = Arc::new(Readiness::default());
        assert_eq!(status(&readiness, "/readyz").await, StatusCode::OK);
        readiness.set_redis_ok(false);
        assert_eq!(
            status(&readiness, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(&readiness, "/healthz").await, StatusCode::OK);
        readiness.set_redis_ok(true);
        assert_eq!(status(&readiness, "/readyz").await, StatusCode::OK);
        readiness.set_draining();
        assert_eq!(
            status(&readiness, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(&readiness, "/healthz").await, StatusCode::OK);
    }
}
