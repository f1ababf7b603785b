//! Listeners, connections and the gateway's lifetime: start everything, serve, shut down.
//!
//! [`run`] takes bound listeners, the configuration and a shutdown future (mini-redis style), so
//! tests run a whole gateway in-process on `127.0.0.1:0` with their own shutdown signal. On
//! shutdown the listeners stop accepting, health checks and the registry stop, and open
//! connections finish their in-flight requests (up to `timeouts.shutdown_grace`).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::Admin;
use crate::balancer::health::{self, HttpProbe};
use crate::balancer::{Balancer, MembershipError, registry};
use crate::config::GatewayConfig;
use crate::failover;
use crate::h2_server::Http2Settings;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::serving::{Clients, Protocols, ServingThreads};
use crate::tls::Terminator;
use crate::tls::redirect::Redirect;

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Clients' traffic.
    pub public: TcpListener,
    /// Admin API, health and metrics.
    pub admin: TcpListener,
    /// Clients' traffic over TLS (`tls.listen`), when `[tls]` is on.
    pub tls: Option<TcpListener>,
}

impl Listeners {
    /// Binds both listeners from the configuration.
    pub async fn bind(config: &GatewayConfig) -> std::io::Result<Self> {
        let public = herd_shared::net::listen_no_delay(config.listen, config.limits.listen_backlog)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
            })?;
        let admin = TcpListener::bind(config.admin.listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot listen on {} (admin): {e}", config.admin.listen),
            )
        })?;
        let tls = if config.tls.enabled {
            let listen = config.tls.listen;
            Some(
                herd_shared::net::listen_no_delay(listen, config.limits.listen_backlog).map_err(
                    |e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot listen on {listen} (tls): {e}"),
                        )
                    },
                )?,
            )
        } else {
            None
        };
        Ok(Listeners { public, admin, tls })
    }

    /// Prints one `{"event":"listening",...}` line per listener on stdout, flushed, so scripts
    /// and tests find ports chosen by the OS.
    pub fn announce(&self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        let tls = self.tls.as_ref().map(|listener| ("tls", listener));
        for (role, listener) in [("public", &self.public), ("admin", &self.admin)]
            .into_iter()
            .chain(tls)
        {
            // Written by hand to keep the documented key order (serde_json sorts keys).
            let addr = listener.local_addr()?;
            writeln!(
                out,
                r#"{{"event":"listening","role":"{role}","addr":"{addr}"}}"#
            )?;
        }
        out.flush()
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A configured worker could not be added.
    #[error("worker list: {0}")]
    Workers(#[from] MembershipError),
    /// The failover node could not start.
    #[error(transparent)]
    Failover(#[from] failover::FailoverError),
    /// The Redis pool for the failover lease could not be built.
    #[error("redis: {0}")]
    Redis(redis::RedisError),
    /// The health-check thread could not start.
    #[error("cannot start the health-check thread: {0}")]
    HealthThread(std::io::Error),
    /// The threads serving clients could not start.
    #[error("cannot start the serving threads: {0}")]
    ServingThreads(std::io::Error),
    /// The TLS certificates could not be loaded.
    #[error("{0}")]
    Tls(herd_shared::config::ConfigError),
}

/// The longest a stopping gateway keeps accepting while its failover node hands the role over
/// (the node's own bound is 3 s plus a 1 s linger).
const HAND_OVER_BOUND: Duration = Duration::from_secs(5);

/// Runs the gateway until `shutdown` completes, then drains connections and returns.
pub async fn run(
    listeners: Listeners,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new());
    let probe = Arc::new(HttpProbe::new(&config.health));
    let health_config = config.health.clone();
    let health_thread = HealthThread::start().map_err(ServerError::HealthThread)?;
    let health_runtime = health_thread.handle.clone();
    let balancer = Arc::new(Balancer::new(
        &config,
        metrics.clone(),
        Box::new(move |worker, notifier| {
            health_runtime.spawn(health::run(
                worker,
                probe.clone(),
                health_config.clone(),
                notifier,
            ));
        }),
    ));
    balancer.watch_metrics(&metrics);
    for addr in &config.workers {
        balancer.add(balancer.static_spec(addr))?;
    }
    let stop = CancellationToken::new();
    if config.registry.enabled {
        tokio::spawn(registry::run(
            balancer.clone(),
            config.redis_pool(),
            config.redis.clone(),
            config.registry.clone(),
            stop.clone(),
        ));
    }
    let failover = if config.failover.enabled {
        let pool = config.redis_pool().map_err(ServerError::Redis)?;
        let counted = balancer.clone();
        let healthy: failover::HealthyCount = Arc::new(move || counted.healthy_count());
        let started = failover::start(
            &config.id,
            config.failover.clone(),
            pool,
            &config.redis.keys(),
            healthy,
            stop.clone().cancelled_owned(),
        )
        .await?;
        metrics.watch_failover(started.status.clone());
        Some(started)
    } else {
        None
    };
    let proxy = Arc::new(Proxy::new(&config, balancer.clone(), metrics.clone()));
    let admin = Arc::new(
        Admin::new(
            balancer.clone(),
            metrics.clone(),
            config.admin.token.clone(),
        )
        .with_failover(failover.as_ref().map(|started| started.status.clone())),
    );
    let builder = connection_builder(&config);
    let admin_builder = admin_connection_builder(&builder, &config);
    let threads = config.serving_threads();
    let public_addr = listeners.public.local_addr().ok();
    let protocols = client_protocols(&config, builder);
    let mut clients = Clients::new(proxy, protocols, metrics.clone(), &config, threads);
    if config.tls.enabled {
        let tls = Arc::new(Terminator::new(&config.tls).map_err(ServerError::Tls)?);
        metrics.register_collector(tls.collector());
        tokio::spawn(tls.reloader(stop.clone()));
        let https_port = listeners
            .tls
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
            .map_or(config.tls.listen.port(), |addr| addr.port());
        let redirect = config.tls.redirect_http.then_some(Redirect { https_port });
        clients = clients.with_tls(tls, redirect);
    }
    let clients = Arc::new(clients);
    metrics.watch_client_connections(clients.open_per_thread());
    let public = listeners
        .public
        .into_std()
        .map_err(ServerError::ServingThreads)?;
    let tls_listener = listeners
        .tls
        .map(TcpListener::into_std)
        .transpose()
        .map_err(ServerError::ServingThreads)?;
    let serving = ServingThreads::start(public, tls_listener, clients.clone())
        .map_err(ServerError::ServingThreads)?;
    let admin_listener = listeners.admin;
    let admin_connections = GracefulShutdown::new();
    info!(
        public = %public_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        threads,
        workers = config.workers.len(),
        registry = config.registry.enabled,
        "gateway started"
    );

    let mut shutdown = std::pin::pin!(shutdown);
    // After the shutdown signal, an active gateway with a ready standby hands the address over
    // first (the failback path); it keeps accepting until then, so no client's connection meets
    // a closed port. `handed_over` completes when the failover node is done (at once without one).
    // Without a pair, idle connections close when serving stops.
    let address_leaving = failover
        .as_ref()
        .map(|started| started.address_leaving.clone())
        .unwrap_or_default();
    let mut failover_done = failover.map(|started| started.stopped);
    let mut handed_over = std::pin::pin!(async {
        if let Some(done) = failover_done.as_mut() {
            // Bounded: the node's hand-over gives up after a few seconds.
            let _ = tokio::time::timeout(HAND_OVER_BOUND, done).await;
        }
    });
    let mut stopping = false;
    let mut idle_closed = false;
    let mut admin_accept_failures = crate::serving::AcceptFailures::default();
    loop {
        tokio::select! {
            accepted = admin_listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        stream
                    }
                    Err(error) => {
                        admin_accept_failures.failed(&error).await;
                        continue;
                    }
                };
                let admin = admin.clone();
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(&request)) }
                });
                let connection = admin_builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = admin_connections.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            () = &mut shutdown, if !stopping => {
                stopping = true;
                info!("shutdown requested: keep-alive connections close after their next response; giving up the role if active");
                clients.drain();
                stop.cancel();
            }
            () = address_leaving.cancelled(), if stopping && !idle_closed => {
                idle_closed = true;
                info!("the address is about to leave: closing idle client connections");
                clients.close_idle();
            }
            () = &mut handed_over, if stopping => break,
        }
    }

    info!(
        open_connections = clients.open(),
        "shutting down: finishing in-flight requests"
    );
    drop(admin_listener);
    balancer.stop();
    let grace = config.timeouts.shutdown_grace;
    let admin_drained = async {
        let _ = tokio::time::timeout(grace, admin_connections.shutdown()).await;
    };
    tokio::join!(serving.stop(), admin_drained);
    info!("gateway stopped");
    Ok(())
}

/// The HTTP/1.1 + HTTP/2 (cleartext) connection settings for clients.
fn connection_builder(config: &GatewayConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let buffer = client_buffer(config);
    // hyper's `header_read_timeout` is switched off (its default is 30 s): `crate::client_io`
    // times heads and idle connections apart, where hyper's one timer covers both at once.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(buffer)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(buffer).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(config.timeouts.client_idle / 2))
        .keep_alive_timeout(config.timeouts.client_idle / 2);
    builder
}

/// The client connections' settings, HTTP/1.1 and HTTP/2 apart (the gateway tells them apart
/// itself, `crate::serving`), as in `auto` (the same settings, kept for refusals).
fn client_protocols(config: &GatewayConfig, auto: auto::Builder<TokioExecutor>) -> Protocols {
    let buffer = client_buffer(config);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    // `pipeline_flush` must stay off: with it hyper may leave a response in its buffer while it
    // reads on, and a connection then judged between two requests (`crate::connections`) would
    // move without it.
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(buffer)
        .keep_alive(true);
    let http2 = Http2Settings {
        max_header_list_size: u32::try_from(buffer).unwrap_or(u32::MAX),
        keep_alive_interval: Some(config.timeouts.client_idle / 2),
        keep_alive_timeout: config.timeouts.client_idle / 2,
    };
    let mut http1_watched = http1.clone();
    http1_watched.half_close(true);
    Protocols {
        http1,
        http1_watched,
        http2,
        auto,
    }
}

/// Bytes of a client's request head hyper buffers at most: hyper answers 431 (without a body)
/// beyond its buffer; between `limits.max_header_bytes` and that buffer the gateway answers
/// itself with the JSON error.
fn client_buffer(config: &GatewayConfig) -> usize {
    (config.limits.max_header_bytes + 16 * 1024).max(8192)
}

/// The admin listener's connection settings: the clients' ones, with hyper's header read timeout
/// (`timeouts.client_idle`, idle time and head together) instead of `crate::client_io`'s timers:
/// the admin API faces operators and scrapers, not the public.
fn admin_connection_builder(
    public: &auto::Builder<TokioExecutor>,
    config: &GatewayConfig,
) -> auto::Builder<TokioExecutor> {
    let mut builder = public.clone();
    builder
        .http1()
        .header_read_timeout(config.timeouts.client_idle);
    builder
}

/// The thread that runs the active health checks, on a single-threaded runtime of its own.
///
/// With a thousand workers the checks wake up thousands of times a second; on the request
/// runtime each wake-up could unpark a second worker thread (a futex call and a context switch),
/// and a busy request path could delay a check into a false timeout. Stops when dropped.
struct HealthThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HealthThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("herd-health".into())
            .spawn(move || {
                // Returns when the sender is dropped; dropping the runtime ends every check.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(HealthThread {
            handle,
            stop: Some(stop),
        })
    }
}

impl Drop for HealthThread {
    fn drop(&mut self) {
        drop(self.stop.take());
    }
}
