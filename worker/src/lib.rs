//! herd-worker: makes any axum app a well-behaved herd worker, plus the demo app.
//!
//! Layout — the flow starts in [`server::run`]:
//! - [`server`]: wraps an app with sessions, `/healthz` + `/readyz`, the `x-herd-worker` /
//!   `x-herd-machine` headers and request tracking; registers; serves; drains on shutdown.
//! - [`session`]: sessions in Redis — the [`session::SessionLayer`] and the [`session::Session`]
//!   extractor, with compare-and-set saves that never lose a concurrent update.
//! - [`registry`]: the worker's entry in the Redis registry (join, heartbeat, drain, leave).
//! - [`health`]: readiness state and the health routes.
//! - [`redis_link`]: the Redis pool, following the master through Sentinel when configured.
//! - [`traffic`]: in-flight counting and the "quiet for a while" wait of the drain.
//! - [`metrics`]: `/metrics` (Prometheus text): requests, latency, in flight, session store
//!   operations, the Redis pool and registry heartbeats — every app gets them.
//! - [`trace`]: the request span of OpenTelemetry tracing (off unless `[tracing] enabled`).
//! - [`error`]: the one place where errors become statuses and JSON bodies.
//! - [`config`]: the worker's configuration (keys documented in `worker/README.md`).
//! - [`demo`]: the demo app (login, cart, work) that the `herd-worker` binary serves.
//! - [`hello`]: the Redis-free hello app (`app = "hello"`), the upstream of proxy benchmarks.
//!
//! Using it in another app:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use herd_worker::{config::WorkerConfig, server};
//! let config = WorkerConfig::default();
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
//! server::run(listener, config, app, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod demo;
mod envelope;
pub mod error;
pub mod health;
pub mod hello;
pub mod metrics;
pub mod redis_link;
pub mod registry;
pub mod server;
pub mod session;
pub mod trace;
pub mod traffic;

pub use error::ApiError;
