//! The hello app (`app = "hello"`): `200 text/plain "hello\n"` on every path and method but
//! `/page`, which answers 64 KiB of hello lines (`herd_shared::page`: a page's weight), plus
//! `/healthz` and `/readyz`, with the usual `x-herd-worker` / `x-herd-machine` headers — and no
//! Redis at all (no sessions, no registry, readiness only turns 503 while draining).
//!
//! It is the upstream of the proxy benchmarks (`herd bench`): as little work per request as an
//! axum server can do, so the figures measure the proxy in front of it, not the app. A gateway
//! finds it through its static `workers` list, never through the registry.
//!
//! Shutdown: on the signal `/readyz` turns 503 for `drain.min` (so active health checks see it
//! leave), then the listener closes and in-flight requests get `drain.in_flight_timeout`.

use std::future::Future;
use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::routing::any;
use bytes::Bytes;
use http::{HeaderValue, header};
use tokio::net::TcpListener;

use crate::config::{Identity, WorkerConfig};
use crate::health::{self, Readiness};
use crate::server::{Serving, WorkerError};

/// The body of every answer.
pub const BODY: &str = "hello\n";

/// Serves the hello app on `listener` until `shutdown`, then leaves as described above.
pub async fn run<F>(
    listener: TcpListener,
    config: WorkerConfig,
    shutdown: F,
) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send,
{
    let bound = listener.local_addr()?;
    let identity = config.identity(bound);
    let readiness = Arc::new(Readiness::default());
    let app = router(&identity, readiness.clone())?;
    tracing::info!(worker = %identity.id, machine = %identity.machine, addr = %bound, app = "hello", "worker serving");

    let server = Serving::start(listener, app);
    shutdown.await;
    tracing::info!(worker = %identity.id, "draining");
    readiness.set_draining();
    tokio::time::sleep(config.drain.min).await;
    if !server.stop(config.drain.in_flight_timeout).await {
        tracing::warn!("drain: in-flight requests did not finish in time");
    }
    tracing::info!(worker = %identity.id, "worker stopped");
    Ok(())
}

/// The hello app's routes with the identity headers on every response.
pub fn router(identity: &Identity, readiness: Arc<Readiness>) -> Result<Router, WorkerError> {
    let routes = health::routes(readiness)
        .route(herd_shared::page::PATH, any(page))
        .fallback(hello);
    crate::server::with_identity_headers(routes, identity)
}

/// The page, made once.
static PAGE: LazyLock<Bytes> = LazyLock::new(|| Bytes::from(herd_shared::page::body()));

async fn page() -> ([(header::HeaderName, HeaderValue); 1], Bytes) {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        PAGE.clone(),
    )
}

async fn hello() -> ([(header::HeaderName, HeaderValue); 1], &'static str) {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        BODY,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Request;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;

    fn app(readiness: Arc<Readiness>) -> Router {
        let identity = Identity {
            id: "h1".into(),
            machine: "m1".into(),
            advertise: "127.0.0.1:1".into(),
        };
        router(&identity, readiness).unwrap()
    }

    async fn call(app: Router, method: &str, path: &str) -> (StatusCode, http::HeaderMap, String) {
        let response = app
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(path)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    #[tokio::test]
    async fn every_path_says_hello_with_identity_headers() {
        let readiness = Arc::new(Readiness::default());
        for (method, path) in [("GET", "/"), ("GET", "/me"), ("POST", "/a/b?c=d")] {
            let (status, headers, body) = call(app(readiness.clone()), method, path).await;
            assert_eq!(status, StatusCode::OK, "{method} {path}");
            assert_eq!(body, BODY);
            assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
            assert_eq!(headers["x-herd-worker"], "h1");
            assert_eq!(headers["x-herd-machine"], "m1");
        }
    }

    #[tokio::test]
    async fn the_page_is_64_kib_of_hello_lines() {
        let (status, headers, body) = call(app(Arc::default()), "GET", "/page").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.len(), herd_shared::page::BYTES);
        assert_eq!(body.as_bytes(), herd_shared::page::body());
        assert_eq!(headers["x-herd-worker"], "h1");
    }

    #[tokio::test]
    async fn health_routes_need_no_redis_and_follow_the_drain() {
        let readiness = Arc::new(Readiness::default());
        let (status, headers, _) = call(app(readiness.clone()), "GET", "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-herd-worker"], "h1");
        readiness.set_draining();
        let (status, _, _) = call(app(readiness.clone()), "GET", "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _, _) = call(app(readiness.clone()), "GET", "/healthz").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn serves_over_the_wire_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = WorkerConfig {
            app: crate::config::App::Hello,
            id: Some("h2".into()),
            drain: crate::config::DrainConfig {
                min: std::time::Duration::from_millis(50),
                ..Default::default()
            },
            ..WorkerConfig::default()
        };
        let stop = CancellationToken::new();
        let server = tokio::spawn(run(listener, config, stop.clone().cancelled_owned()));
        let response = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}/"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-herd-worker"], "h2");
        assert_eq!(response.text().await.unwrap(), BODY);
        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }
}
