//! herd-gateway: a health-checking, retrying HTTP load balancer in front of herd workers.
//!
//! Layout — where the flow starts and what each module is for:
//! - [`server`]: [`server::run`] binds nothing itself; it takes the listeners, the configuration
//!   and a shutdown future, starts membership and health checks, the serving threads and the
//!   admin API, and shuts down gracefully. `main.rs` only parses flags, sets up logging and loads
//!   the configuration.
//! - [`serving`]: the threads that accept and serve clients, one event loop each, and the
//!   connection limits (in all, per client address).
//! - [`connections`]: a serving thread's client connections — graceful close, and the hand-over
//!   of idle HTTP/1.1 connections between threads.
//! - [`consolidation`]: how many serving threads take the load (`adaptive_threads`).
//! - [`client_io`]: a client's socket with the head, idle and send timeouts.
//! - [`plain_http1`]: the gateway's own HTTP/1.1 server for plain requests (no body, no
//!   upgrade); the rest of a connection goes to hyper from the first request that is not.
//! - [`tunnel`]: switched protocols (WebSocket upgrades), bytes copied both ways.
//! - [`proxy`]: the request path — pick a worker, forward, retry when safe, stream the answer.
//! - [`balancer`]: membership (static list + Redis registry), health (active checks and passive
//!   ejection) and selection (p2c over peak-EWMA, round robin, weighted).
//! - [`failover`]: the active / standby pair (peer link, Redis lease, floating address).
//! - [`upstream`]: the HTTP/1.1 client to workers — per-worker keep-alive pools, driven by the
//!   request's own task; a leaf (imports nothing else of the gateway) that decides whether an
//!   attempt reached its worker and whose fault a failure was.
//! - [`retry`]: the retry budget.
//! - [`hedge`]: when a slow attempt is doubled on another worker (delay learnt from latency);
//!   [`hedge_timer`]: its timers, a queue per serving thread.
//! - [`error`]: upstream and gateway errors, and the one place that turns them into responses.
//! - [`headers`], [`body`]: header rules and request/response bodies of the request path.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the `/api/*` operator endpoints.
//! - [`dashboard`]: the live dashboard page at `/dashboard` and the JSON it polls.
//! - [`events`]: the bounded ring of recent events (joins, drains, ejections, role changes).
//! - [`metrics`]: Prometheus metrics, lock-free on the request path.
//! - [`tls`]: TLS termination on its own listener — certificates by SNI, hot reload, handshake
//!   limits (docs/tls.md).
//! - [`trace`]: OpenTelemetry spans of a request and its attempts (only when tracing is on).
//! - [`config`]: the typed configuration with its documented defaults (see `gateway/README.md`).

pub mod admin;
pub mod balancer;
pub mod body;
pub mod client_io;
pub mod config;
pub mod connections;
pub mod consolidation;
pub mod dashboard;
pub(crate) mod date;
pub mod error;
pub mod events;
pub mod failover;
pub mod h2_server;
pub mod h2_streams;
pub mod hang_up;
pub mod headers;
pub mod hedge;
pub mod hedge_timer;
pub mod metrics;
pub mod plain_http1;
pub mod proxy;
pub mod retry;
pub mod server;
pub mod serving;
pub mod tls;
pub mod trace;
pub mod tunnel;
pub mod upstream;

pub use config::GatewayConfig;
pub use server::{Listeners, run};
