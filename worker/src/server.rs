//! Running an app as a herd worker: [`run`] wraps any axum [`Router`] with sessions, health
//! routes, identity headers and request tracking, registers the worker, serves, and on the
//! shutdown signal drains without failing requests.
//!
//! The drain, step by step: readiness turns 503 and the registry entry turns `draining` with a
//! `drain` notice (gateways stop sending); requests that still arrive are served until none has
//! come for `drain.quiet` (at least `drain.min`, at most `drain.max`); then the listener closes,
//! in-flight requests finish (at most `drain.in_flight_timeout`), the entry is deleted with a
//! `leave` notice, and [`run`] returns.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use herd_shared::registry::{WorkerRecord, WorkerState};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Identity, WorkerConfig};
use crate::envelope::{self, Envelope, IdentityHeaders};
use crate::error;
use crate::health::{self, Readiness};
use crate::metrics::{self, WorkerMetrics};
use crate::redis_link::{self, RedisLink};
use crate::registry::Registry;
use crate::session::{SessionLayer, SessionStore};
use crate::traffic::Traffic;

/// Why the worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The Redis settings could not make a pool.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The id or machine name can't be sent as a header.
    #[error("worker id or machine is not a valid header value")]
    BadIdentity,
}

/// The line printed on stdout once the listener is bound, so tools find the port.
pub fn listening_line(addr: SocketAddr, identity: &Identity) -> String {
    // Field order as documented; serde_json's map would sort the keys.
    format!(
        r#"{{"event":"listening","role":"public","addr":{},"id":{}}}"#,
        serde_json::Value::from(addr.to_string()),
        serde_json::Value::from(identity.id.as_str()),
    )
}

/// The session store for `config`, on a direct link to `redis.url` (no Sentinel following;
/// [`run`] builds its own).
pub fn session_store(config: &WorkerConfig) -> Result<SessionStore, WorkerError> {
    Ok(store_on(RedisLink::new(&config.redis)?, config))
}

fn store_on(link: RedisLink, config: &WorkerConfig) -> SessionStore {
    let link = if config.session.pipelined {
        link
    } else {
        link.without_shared_line()
    };
    SessionStore::new(
        link,
        config.redis.keys(),
        config.session.clone(),
        config.redis.connect_timeout + config.redis.command_timeout,
    )
}

/// Serves `app` on `listener` as a herd worker until `shutdown` resolves, then drains and returns.
pub async fn run<F>(
    listener: TcpListener,
    config: WorkerConfig,
    app: Router,
    shutdown: F,
) -> Result<(), WorkerError>
where
    F: Future<Output = ()> + Send,
{
    let bound = listener.local_addr()?;
    let identity = config.identity(bound);
    let link = RedisLink::new(&config.redis)?;
    let background = CancellationToken::new();
    if config.sentinel.enabled() {
        let _ =
            tokio::time::timeout(redis_link::FIRST_RESOLVE, link.resolve(&config.sentinel)).await;
        tokio::spawn(
            link.clone()
                .follow(config.sentinel.clone(), background.clone()),
        );
    }
    let metrics = Arc::new(WorkerMetrics::new());
    metrics.watch_pool(link.clone());
    let store = store_on(link.clone(), &config).with_metrics(metrics.clone());
    let readiness = Arc::new(Readiness::default());
    let traffic = Arc::new(Traffic::default());

    readiness.set_redis_ok(store.ping().await);
    let probe = tokio::spawn(health::probe_redis(
        store.clone(),
        readiness.clone(),
        config.health.redis_interval,
        background.clone(),
    ));

    let registry = if config.registry.enabled {
        let registry = Arc::new(
            Registry::new(
                link.clone(),
                config.redis.keys(),
                config.registry.clone(),
                config.redis.connect_timeout + config.redis.command_timeout,
                record(&identity, &config),
            )
            .with_metrics(metrics.clone()),
        );
        let heartbeat = tokio::spawn({
            let registry = registry.clone();
            let stop = background.clone();
            async move { registry.heartbeat(stop).await }
        });
        Some((registry, heartbeat))
    } else {
        None
    };

    if identity
        .advertise
        .parse::<SocketAddr>()
        .is_ok_and(|addr| addr.ip().is_unspecified())
    {
        tracing::warn!(advertise = %identity.advertise, "advertised address is unspecified; set `advertise` so gateways can reach this worker");
    }
    let router = wrap(
        app,
        store,
        readiness.clone(),
        traffic.clone(),
        metrics,
        &identity,
    )?;
    tracing::info!(worker = %identity.id, machine = %identity.machine, addr = %bound, advertise = %identity.advertise, "worker serving");

    let server = Serving::start(listener, router);
    shutdown.await;

    let started = tokio::time::Instant::now();
    tracing::info!(worker = %identity.id, in_flight = traffic.in_flight(), "draining");
    readiness.set_draining();
    if let Some((registry, _)) = &registry {
        let _ = registry.drain().await;
    }
    traffic.wait_quiet(&config.drain, started).await;
    tracing::info!(worker = %identity.id, in_flight = traffic.in_flight(), "drain: no longer accepting");
    if !server.stop(config.drain.in_flight_timeout).await {
        tracing::warn!(
            in_flight = traffic.in_flight(),
            "drain: in-flight requests did not finish in time"
        );
    }
    background.cancel();
    let _ = probe.await;
    if let Some((registry, heartbeat)) = registry {
        let _ = heartbeat.await;
        let _ = registry.leave().await;
    }
    tracing::info!(worker = %identity.id, drained_ms = started.elapsed().as_millis() as u64, "worker stopped");
    Ok(())
}

/// An axum server on its own task, accepting until [`Serving::stop`].
pub(crate) struct Serving {
    stop_accepting: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Serving {
    /// Starts serving `router` on `listener`.
    pub(crate) fn start(listener: TcpListener, router: Router) -> Self {
        let listener = no_delay(listener);
        let stop_accepting = CancellationToken::new();
        let task = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(stop_accepting.clone().cancelled_owned())
                .into_future(),
        );
        Serving {
            stop_accepting,
            task,
        }
    }

    /// Closes the listener and waits up to `grace` for in-flight requests; false when they did
    /// not finish in time (errors of the server itself are logged here).
    pub(crate) async fn stop(self, grace: std::time::Duration) -> bool {
        self.stop_accepting.cancel();
        match tokio::time::timeout(grace, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(error = %error, "server ended with an error"),
            Ok(Err(error)) => tracing::warn!(error = %error, "server task failed"),
            Err(_) => return false,
        }
        true
    }
}

/// `listener` with `TCP_NODELAY` set on every connection it accepts: an answer's last segment
/// must not wait for the client's ACK of the one before (Nagle). Over HTTP/2, whose HEADERS and
/// DATA frames may go out in two writes, that held answers for the client's delayed ACK: 10 ms
/// each at 400 h2c requests a second (h2load; 0.19 ms with it), 40 ms for many a connection's
/// first (docs/performance.md section 55).
fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|connection| {
        if let Err(error) = connection.set_nodelay(true) {
            tracing::debug!(error = %error, "TCP_NODELAY could not be set on a connection");
        }
    })
}

/// The app with everything a herd worker adds around it (`/metrics` too: an app must not
/// define that route itself), and the [`Envelope`] around every request.
fn wrap(
    app: Router,
    store: SessionStore,
    readiness: Arc<Readiness>,
    traffic: Arc<Traffic>,
    metrics: Arc<WorkerMetrics>,
    identity: &Identity,
) -> Result<Router, WorkerError> {
    let envelope = Arc::new(Envelope::new(identity, traffic, metrics.clone())?);
    Ok(Router::new()
        .merge(app.layer(SessionLayer::new(store)))
        .merge(health::routes(readiness))
        .merge(
            Router::new()
                .route("/metrics", axum::routing::get(metrics::serve))
                .with_state(metrics),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(envelope, envelope::around)))
}

/// `router` with `x-herd-worker` and `x-herd-machine` on every response.
pub(crate) fn with_identity_headers(
    router: Router,
    identity: &Identity,
) -> Result<Router, WorkerError> {
    let headers = Arc::new(IdentityHeaders::new(identity)?);
    Ok(router.layer(middleware::from_fn_with_state(headers, identity_headers)))
}

async fn method_not_allowed() -> error::ApiError {
    error::ApiError::MethodNotAllowed
}

/// Adds `x-herd-worker` and `x-herd-machine` to every response.
async fn identity_headers(
    State(headers): State<Arc<IdentityHeaders>>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    headers.stamp(&mut response);
    response
}

fn record(identity: &Identity, config: &WorkerConfig) -> WorkerRecord {
    WorkerRecord {
        id: identity.id.clone(),
        addr: identity.advertise.clone(),
        machine: identity.machine.clone(),
        weight: config.weight,
        version: env!("CARGO_PKG_VERSION").into(),
        started_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(0))
            .unwrap_or(0),
        state: WorkerState::Ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::StatusCode;
    use tower::ServiceExt;

    #[tokio::test]
    async fn every_connection_is_served_without_nagles_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = no_delay(listener);
        for _ in 0..2 {
            let client = tokio::net::TcpStream::connect(addr);
            let ((accepted, _), client) =
                tokio::join!(axum::serve::Listener::accept(&mut listener), client);
            assert!(accepted.nodelay().unwrap());
            drop(client);
        }
    }

    fn router(app: Router) -> Router {
        let config = WorkerConfig {
            id: Some("w1".into()),
            machine: Some("m1".into()),
            ..WorkerConfig::default()
        };
        let app = app.route(
            "/panic",
            axum::routing::get(|| async {
                let nothing: Option<String> = std::hint::black_box(None);
                nothing.expect("a bug")
            }),
        );
        let identity = config.identity("127.0.0.1:1".parse().unwrap());
        let store = session_store(&config).unwrap();
        wrap(
            app,
            store,
            Arc::new(Readiness::default()),
            Arc::new(Traffic::default()),
            Arc::new(WorkerMetrics::new()),
            &identity,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn every_response_names_worker_and_machine() {
        let app = router(Router::new().route("/x", axum::routing::get(|| async { "x" })));
        for (method, path, status) in [
            ("GET", "/x", StatusCode::OK),
            ("GET", "/healthz", StatusCode::OK),
            ("GET", "/nope", StatusCode::NOT_FOUND),
            ("POST", "/x", StatusCode::METHOD_NOT_ALLOWED),
            ("GET", "/panic", StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let response = app
                .clone()
                .oneshot(
                    Request::builder()
                        .method(method)
                        .uri(path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), status, "{method} {path}");
            assert_eq!(response.headers()["x-herd-worker"], "w1");
            assert_eq!(response.headers()["x-herd-machine"], "m1");
            if !status.is_success() {
                assert_eq!(response.headers()["content-type"], "application/json");
            }
        }
    }

    #[test]
    fn listening_line_is_the_documented_json() {
        let identity = Identity {
            id: "w1".into(),
            machine: "m".into(),
            advertise: "a:1".into(),
        };
        let line = listening_line("127.0.0.1:5000".parse().unwrap(), &identity);
        assert_eq!(
            line,
            r#"{"event":"listening","role":"public","addr":"127.0.0.1:5000","id":"w1"}"#
        );
    }
}
