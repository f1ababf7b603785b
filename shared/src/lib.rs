//! Pieces that more than one herd crate needs, and nothing else.
//!
//! Layout:
//! - [`allocator`]: the binaries' global allocator, mimalloc.
//! - [`config`]: load a process's settings from a TOML file plus `HERD_…` environment overrides,
//!   then validate them once; a bad value becomes one line naming the key ([`config::ConfigError`]).
//! - [`redis`]: the Redis connection settings and pool every process uses.
//! - [`redis_pool`]: the pool of connections to one Redis, checked without a round trip.
//! - [`redis_wire`]: one connection to Redis, driven by the task that uses it.
//! - [`resp`]: Redis's replies parsed off a buffer.
//! - [`sentinel`]: a pool that follows the Redis master through Sentinel.
//! - [`keys`]: the Redis key schema (sessions, registry, events, gateway lease).
//! - [`registry`]: the worker registry entry and the `events` notices, as written by workers and
//!   read by gateways.
//! - [`telemetry`]: logging set-up (pretty on a terminal, JSON otherwise) and OTLP trace export.
//! - [`cli`]: the command-line flags every herd binary shares.
//! - [`net`]: listening sockets with a load-ready accept queue.
//! - [`page`]: the long answer (`GET /page`, 64 KiB) of the benchmarks' upstreams.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod keys;
pub mod net;
pub mod page;
pub mod redis;
pub mod redis_line;
pub mod redis_pool;
pub mod redis_wire;
pub mod registry;
pub mod resp;
pub mod script;
pub mod sentinel;
pub mod telemetry;
