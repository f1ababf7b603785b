//! The gateway's configuration: typed sections with documented defaults, validated once at start.
//!
//! Loaded through [`herd_shared::config::load`] with the prefix `HERD_GATEWAY` (e.g.
//! `HERD_GATEWAY_HEALTH__INTERVAL=500ms`). Every key is described in `gateway/README.md`; the
//! defaults here are the ones documented there.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herd_shared::config::{ConfigError, Source, Validate, check};
use herd_shared::redis::{RedisConfig, RedisPool};
use herd_shared::sentinel::SentinelConfig;

use crate::failover::FailoverConfig;
use herd_shared::telemetry::TracingConfig;
use serde::Deserialize;

/// Environment prefix of the gateway's settings.
pub const ENV_PREFIX: &str = "HERD_GATEWAY";
/// Keys whose environment value is a comma-separated list.
pub const ENV_LIST_KEYS: &[&str] = &["workers", "redis.cluster", "sentinel.addrs"];

/// The whole configuration of one gateway process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// This gateway's name: sent as `x-herd-gateway` on every response, and its name in the
    /// active / standby pair. Default: the host name.
    pub id: String,
    /// Public listener (clients' traffic).
    pub listen: SocketAddr,
    /// Static workers: `host:port` (its id is that string) or `id=host:port` (e.g.
    /// `w1=127.0.0.1:45101`), so the admin API, metrics and logs name a static worker as the
    /// worker names itself (`x-herd-worker`, the registry).
    pub workers: Vec<String>,
    /// Threads serving client connections, each with its own event loop; 0: one per CPU the
    /// process may run on.
    pub threads: usize,
    /// Serve on as few of the `threads` as the load needs: new connections go to the threads in
    /// use, and idle HTTP/1.1 keep-alive connections move between threads as the load grows and
    /// shrinks (`crate::consolidation`).
    pub adaptive_threads: bool,
    /// Admin listener and its token.
    pub admin: AdminConfig,
    /// How to reach Redis (used by the registry and the failover lease).
    pub redis: RedisConfig,
    /// `[sentinel]`: follow the Redis master through Sentinel (off when `addrs` is empty);
    /// `redis.url` then gives the password, the database and the first address to try.
    pub sentinel: SentinelConfig,
    /// Discovery of workers that register themselves in Redis.
    pub registry: RegistryConfig,
    /// Active and passive health checks.
    pub health: HealthConfig,
    /// Worker selection.
    pub balancing: BalancingConfig,
    /// When a failed attempt is tried again on another worker.
    pub retry: RetryConfig,
    /// When a slow attempt is doubled on another worker.
    pub hedging: HedgingConfig,
    /// Every wait the gateway bounds.
    pub timeouts: TimeoutsConfig,
    /// Sizes and counts the gateway refuses to exceed.
    pub limits: LimitsConfig,
    /// The active / standby pair (off by default).
    pub failover: FailoverConfig,
    /// TLS termination on a listener of its own (off by default; docs/tls.md).
    pub tls: crate::tls::TlsConfig,
    /// OpenTelemetry trace export (`[tracing]`; off by default; see `docs/observability.md`).
    pub tracing: TracingConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: default_id(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: Vec::new(),
            threads: 0,
            adaptive_threads: true,
            admin: AdminConfig::default(),
            redis: RedisConfig::default(),
            sentinel: SentinelConfig::default(),
            registry: RegistryConfig::default(),
            health: HealthConfig::default(),
            balancing: BalancingConfig::default(),
            retry: RetryConfig::default(),
            hedging: HedgingConfig::default(),
            timeouts: TimeoutsConfig::default(),
            limits: LimitsConfig::default(),
            failover: FailoverConfig::default(),
            tls: crate::tls::TlsConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

/// The host name, or `gateway` when it can't be read.
/// A `workers` entry as (id, address): `id=host:port`, or `host:port` standing for both.
pub fn split_static_worker(entry: &str) -> (&str, &str) {
    entry.split_once('=').unwrap_or((entry, entry))
}

fn default_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "gateway".to_string())
}

impl GatewayConfig {
    /// The Redis pool for the registry and the failover lease: following the master through
    /// Sentinel when `[sentinel]` lists sentinels, else `redis.url` (or `redis.cluster`).
    pub fn redis_pool(&self) -> Result<RedisPool, redis::RedisError> {
        if self.sentinel.enabled() {
            herd_shared::sentinel::following_pool(&self.redis, &self.sentinel)
        } else {
            self.redis.pool()
        }
    }

    /// The number of serving threads: `threads`, or one per CPU the process may run on.
    pub fn serving_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            threads => threads,
        }
    }

    /// Loads the configuration from an optional file plus `HERD_GATEWAY_…` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        herd_shared::config::load(&Source {
            file,
            env_prefix: ENV_PREFIX,
            env_list_keys: ENV_LIST_KEYS,
        })
    }
}

/// `[admin]`: the operator's listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listener; loopback by default so the API is not exposed by accident.
    pub listen: SocketAddr,
    /// Bearer token for `/api/*`; empty disables those endpoints (they answer 401).
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            token: String::new(),
        }
    }
}

/// `[registry]`: workers found in Redis.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Discover workers registered in Redis and follow the events channel.
    pub enabled: bool,
    /// Full re-read of the registry (catches expired entries and missed events).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Wait before reconnecting the events subscription after it broke.
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Duration,
    /// A registered worker whose entry is gone stays this long before it is removed (rides out a
    /// Redis restart that lost the entries until the workers' next heartbeat).
    #[serde(with = "humantime_serde")]
    pub missing_grace: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            enabled: false,
            poll_interval: Duration::from_secs(1),
            reconnect_delay: Duration::from_millis(500),
            missing_grace: Duration::from_secs(2),
        }
    }
}

/// `[health]`: active checks, plus `[health.passive]` for outlier ejection.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Path of the readiness check (HTTP GET, 2xx = ready).
    pub path: String,
    /// Time between two checks of one worker.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Longest wait for one check's answer.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes in a row that bring a down worker back.
    pub rise: u32,
    /// Failures in a row that take a worker down.
    pub fall: u32,
    /// Random spread of the interval, as a fraction (0.1 = ±10 %), so checks don't line up.
    pub jitter: f64,
    /// Passive checks: ejection after consecutive failures of real requests.
    pub passive: PassiveConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            path: "/readyz".into(),
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            jitter: 0.1,
            passive: PassiveConfig::default(),
        }
    }
}

/// `[health.passive]`: outlier detection from real traffic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Turn passive ejection on.
    pub enabled: bool,
    /// Consecutive failures (connect errors, resets, timeouts, 5xx) that eject a worker.
    pub consecutive_failures: u32,
    /// Count 5xx responses as failures (not only transport errors).
    pub count_5xx: bool,
    /// First ejection's length; each further ejection doubles it.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection; also how long a worker must stay healthy before the backoff resets.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            enabled: true,
            consecutive_failures: 3,
            count_5xx: true,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

/// Which selection algorithm picks a worker.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency × (in-flight + 1).
    P2c,
    /// Each worker in turn.
    RoundRobin,
    /// Random, proportional to each worker's weight.
    Weighted,
}

/// `[balancing]`: how a worker is chosen.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BalancingConfig {
    /// `p2c`, `round_robin` or `weighted`.
    pub algorithm: Algorithm,
    /// Time constant of the peak-EWMA latency's decay.
    #[serde(with = "humantime_serde")]
    pub ewma_decay: Duration,
    /// Ramp-up time of a worker that joined or recovered; zero turns slow start off.
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// Share of its fair traffic a worker gets at the start of slow start.
    pub slow_start_min: f64,
    /// When fewer than this fraction of routable workers is healthy, ignore health and use all.
    pub panic_threshold: f64,
    /// Weight of static workers (registered workers bring their own).
    pub static_weight: u32,
}

impl Default for BalancingConfig {
    fn default() -> Self {
        BalancingConfig {
            algorithm: Algorithm::P2c,
            ewma_decay: Duration::from_secs(10),
            slow_start: Duration::from_secs(5),
            slow_start_min: 0.1,
            panic_threshold: 0.5,
            static_weight: 100,
        }
    }
}

/// `[retry]`: trying a failed request again on another worker.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Retries allowed as a fraction of requests (0.2 = one retry per five requests).
    pub budget_ratio: f64,
    /// Retries per second always allowed, whatever the ratio says.
    pub budget_min_per_sec: u32,
    /// Request bodies up to this size (bytes) are kept so the request can be retried.
    pub buffer_body_bytes: u64,
    /// Also retry idempotent requests whose worker did not answer within `timeouts.response_header`.
    pub on_timeout: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            buffer_body_bytes: 64 * 1024,
            on_timeout: true,
        }
    }
}

/// `[hedging]`: an idempotent request whose worker has not answered within the hedge delay also
/// goes to another worker; the first answer wins (see `crate::hedge`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HedgingConfig {
    /// Turn hedging on.
    pub enabled: bool,
    /// A fixed hedge delay; zero: derived from measured latency (`factor` × p99).
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    /// The derived delay is this many times the p99 of the time to a worker's response head.
    pub factor: f64,
    /// The derived delay is never shorter (hedging normal tail latency would double traffic).
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    /// The derived delay is never longer; also the delay until enough answers were measured.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for HedgingConfig {
    fn default() -> Self {
        HedgingConfig {
            enabled: true,
            delay: Duration::ZERO,
            factor: 2.0,
            min_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
        }
    }
}

/// `[timeouts]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP connect to a worker.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// One attempt: from sending to the worker until its response headers.
    #[serde(with = "humantime_serde")]
    pub response_header: Duration,
    /// Whole request: from its arrival until response headers go to the client, all attempts.
    #[serde(with = "humantime_serde")]
    pub request: Duration,
    /// A client connection with no request in progress (HTTP/1.1 keep-alive between requests,
    /// HTTP/2 with no open stream) is closed after this. HTTP/2 connections are also pinged
    /// every half of it, and closed when a pong takes longer than the other half.
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    /// A request head (request line and headers) must arrive whole within this, counted from the
    /// connection's accept for its first request and from the first byte for later ones; a
    /// client that trickles its head (slowloris) is cut.
    #[serde(with = "humantime_serde")]
    pub request_head: Duration,
    /// A client that accepts no byte of the response for this long (its socket buffer stays
    /// full) is cut, and the worker connection feeding it freed.
    #[serde(with = "humantime_serde")]
    pub client_send: Duration,
    /// A switched-protocol tunnel (WebSocket) with no byte either way for this long is closed on
    /// both sides.
    #[serde(with = "humantime_serde")]
    pub tunnel_idle: Duration,
    /// Idle pooled connection to a worker is closed after this.
    #[serde(with = "humantime_serde")]
    pub upstream_idle: Duration,
    /// On shutdown, how long in-flight requests may still run.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            // Just over Linux's first SYN retransmission (1 s): a SYN dropped by a worker's full
            // accept queue (a burst of new connections, a busy event loop) costs one wait of
            // 1 s, where a 1 s timeout gave up just as the retry went out, failed the attempt
            // and counted it against a healthy worker (ejected after three).
            connect: Duration::from_millis(1500),
            // Tight enough that a request caught by a hung worker is retried while the user still
            // waits (the demo app's slowest endpoint takes 1 s); raise both for slow apps.
            response_header: Duration::from_secs(5),
            request: Duration::from_secs(15),
            client_idle: Duration::from_secs(60),
            // A real client sends its head in one or two packets; 10 s covers a slow mobile link
            // and its retransmits while keeping a slowloris connection cheap (HAProxy's advice
            // for `timeout http-request`).
            request_head: Duration::from_secs(10),
            // No byte accepted for 30 s is not a slow reader but a stalled one: a mobile handover
            // or a lost route recovers within seconds, and the kernel's buffers (MBs) absorb
            // every pause shorter than that. Half of nginx's `send_timeout` (60 s): a stalled
            // reader holds a worker connection the whole time.
            client_send: Duration::from_secs(30),
            // WebSocket applications that want long-lived quiet connections ping (browsers don't
            // by themselves); 5 min keeps those and frees tunnels both ends forgot.
            tunnel_idle: Duration::from_secs(300),
            upstream_idle: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open client connections; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// Open connections from one client address (IPv4 address, IPv6 /64); one more gets a 429
    /// and is closed. 0 turns the limit off (trusted networks, benchmarks from one host).
    pub max_connections_per_client: usize,
    /// Requests in flight to one worker; a full worker is skipped, all full gives 503.
    pub max_in_flight_per_worker: u32,
    /// Request line plus headers, in bytes (431 above).
    pub max_header_bytes: usize,
    /// Request body, in bytes (413 above).
    pub max_body_bytes: u64,
    /// Idle pooled connections kept per worker.
    pub max_idle_per_worker: usize,
    /// Length of the public listener's accept queue (the kernel caps it at
    /// `net.core.somaxconn`). Bursts of new connections beyond it wait for SYN retransmits.
    pub listen_backlog: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            // One address may hold at most 1/40 of `max_connections`, and a NAT with 40 users
            // each at a browser's 6 connections per host still fits.
            max_connections_per_client: 256,
            max_in_flight_per_worker: 1_000,
            max_header_bytes: 32 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            max_idle_per_worker: 256,
            listen_backlog: 4096,
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check::not_empty("id", &self.id)?;
        let header_safe = self
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !header_safe || self.id.len() > 64 {
            return Err(ConfigError::new(
                "id",
                "must be at most 64 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        self.failover.validate()?;
        self.tracing.validate_in("tracing")?;
        self.sentinel.validate_in("sentinel")?;
        if self.sentinel.enabled() && self.redis.is_cluster() {
            return Err(ConfigError::new(
                "sentinel.addrs",
                "set either sentinel.addrs (one Redis found through Sentinel) or redis.cluster, not both",
            ));
        }
        if self.failover.enabled {
            self.redis.validate_in("redis")?;
        }
        let mut ids = std::collections::HashSet::new();
        for (index, worker) in self.workers.iter().enumerate() {
            let key = || format!("workers[{index}]");
            let (id, addr) = split_static_worker(worker);
            parse_worker_addr(addr).map_err(|problem| ConfigError::new(key(), problem))?;
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                return Err(ConfigError::new(
                    key(),
                    "the id before '=' must be 1-64 letters, digits, '-', '_', '.' or ':'",
                ));
            }
            if !ids.insert(id) {
                return Err(ConfigError::new(key(), format!("id {id} is listed twice")));
            }
        }
        if self.registry.enabled {
            self.redis.validate_in("redis")?;
        }
        let ms = Duration::from_millis;
        check::at_least(
            "registry.poll_interval",
            self.registry.poll_interval,
            ms(50),
        )?;
        check::at_least(
            "registry.reconnect_delay",
            self.registry.reconnect_delay,
            ms(10),
        )?;

        let health = &self.health;
        if !health.path.starts_with('/') || health.path.parse::<http::Uri>().is_err() {
            return Err(ConfigError::new(
                "health.path",
                "must be an absolute path such as /readyz",
            ));
        }
        check::at_least("health.interval", health.interval, ms(10))?;
        check::at_least("health.timeout", health.timeout, ms(1))?;
        check::range("health.rise", health.rise, 1, 100)?;
        check::range("health.fall", health.fall, 1, 100)?;
        check::range("health.jitter", health.jitter, 0.0, 0.5)?;
        let passive = &health.passive;
        check::range(
            "health.passive.consecutive_failures",
            passive.consecutive_failures,
            1,
            1000,
        )?;
        check::at_least(
            "health.passive.base_ejection",
            passive.base_ejection,
            ms(10),
        )?;
        if passive.max_ejection < passive.base_ejection {
            return Err(ConfigError::new(
                "health.passive.max_ejection",
                "must be at least health.passive.base_ejection",
            ));
        }

        let balancing = &self.balancing;
        check::at_least("balancing.ewma_decay", balancing.ewma_decay, ms(10))?;
        check::range(
            "balancing.slow_start_min",
            balancing.slow_start_min,
            0.01,
            1.0,
        )?;
        check::range(
            "balancing.panic_threshold",
            balancing.panic_threshold,
            0.0,
            1.0,
        )?;
        check::range(
            "balancing.static_weight",
            balancing.static_weight,
            1,
            10_000,
        )?;

        let retry = &self.retry;
        check::range("retry.max_attempts", retry.max_attempts, 1, 10)?;
        check::range("retry.budget_ratio", retry.budget_ratio, 0.0, 10.0)?;
        check::range(
            "retry.budget_min_per_sec",
            retry.budget_min_per_sec,
            0,
            100_000,
        )?;
        if retry.buffer_body_bytes > self.limits.max_body_bytes {
            return Err(ConfigError::new(
                "retry.buffer_body_bytes",
                "must not exceed limits.max_body_bytes",
            ));
        }

        let hedging = &self.hedging;
        check::range("hedging.factor", hedging.factor, 1.0, 100.0)?;
        check::at_least("hedging.min_delay", hedging.min_delay, ms(1))?;
        if hedging.max_delay < hedging.min_delay {
            return Err(ConfigError::new(
                "hedging.max_delay",
                "must be at least hedging.min_delay",
            ));
        }
        if !hedging.delay.is_zero() {
            check::at_least("hedging.delay", hedging.delay, ms(1))?;
        }

        let t = &self.timeouts;
        check::at_least("timeouts.connect", t.connect, ms(1))?;
        check::at_least("timeouts.response_header", t.response_header, ms(1))?;
        check::at_least("timeouts.request", t.request, ms(1))?;
        check::at_least("timeouts.client_idle", t.client_idle, ms(100))?;
        check::at_least("timeouts.upstream_idle", t.upstream_idle, ms(100))?;
        check::at_least("timeouts.request_head", t.request_head, ms(100))?;
        check::at_least("timeouts.client_send", t.client_send, ms(100))?;
        check::at_least("timeouts.tunnel_idle", t.tunnel_idle, ms(100))?;

        let l = &self.limits;
        check::range("threads", self.threads, 0, 1024)?;
        check::range("limits.max_connections", l.max_connections, 1, 1_000_000)?;
        check::range(
            "limits.max_connections_per_client",
            l.max_connections_per_client,
            0,
            1_000_000,
        )?;
        check::range(
            "limits.max_in_flight_per_worker",
            l.max_in_flight_per_worker,
            1,
            1_000_000,
        )?;
        check::range(
            "limits.max_header_bytes",
            l.max_header_bytes,
            1024,
            1024 * 1024,
        )?;
        check::range("limits.max_body_bytes", l.max_body_bytes, 0, 1 << 40)?;
        check::range(
            "limits.max_idle_per_worker",
            l.max_idle_per_worker,
            0,
            100_000,
        )?;
        check::range("limits.listen_backlog", l.listen_backlog, 1, 65_535)?;

        self.tls.validate(self.listen)?;
        if self.tls.enabled {
            // The files too, so that a missing, unreadable, mismatched or expired one stops
            // the start with its key named (exit 2), like any other bad value.
            crate::tls::certs::CertSet::load(&self.tls, &crate::tls::provider())?;
        }
        Ok(())
    }
}

/// Checks a worker address: `host:port` with a non-zero port and nothing else.
pub fn parse_worker_addr(addr: &str) -> Result<http::uri::Authority, String> {
    let authority: http::uri::Authority = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not a host:port address"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{addr:?} must not contain user info"));
    }
    match authority.port_u16() {
        Some(port) if port != 0 => Ok(authority),
        _ => Err(format!("{addr:?} needs a non-zero port (host:port)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)]) -> Result<GatewayConfig, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        herd_shared::config::load_with_env(
            &Source {
                file: None,
                env_prefix: ENV_PREFIX,
                env_list_keys: ENV_LIST_KEYS,
            },
            Some(env),
        )
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let config = load(&[]).unwrap();
        assert_eq!(config, GatewayConfig::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(config.health.interval, Duration::from_millis(500));
        assert_eq!(config.limits.listen_backlog, 4096);
        assert_eq!(config.timeouts.request_head, Duration::from_secs(10));
        assert_eq!(config.timeouts.client_send, Duration::from_secs(30));
        assert_eq!(config.timeouts.tunnel_idle, Duration::from_secs(300));
        assert_eq!(config.limits.max_connections_per_client, 256);
    }

    #[test]
    fn environment_overrides_nested_keys_and_lists() {
        let config = load(&[
            ("HERD_GATEWAY_LISTEN", "127.0.0.1:0"),
            ("HERD_GATEWAY_WORKERS", "127.0.0.1:8081,127.0.0.1:8082"),
            ("HERD_GATEWAY_ADMIN__TOKEN", "secret"),
            ("HERD_GATEWAY_HEALTH__INTERVAL", "250ms"),
            ("HERD_GATEWAY_HEALTH__PASSIVE__CONSECUTIVE_FAILURES", "5"),
            ("HERD_GATEWAY_BALANCING__ALGORITHM", "round_robin"),
            ("HERD_GATEWAY_REGISTRY__ENABLED", "true"),
        ])
        .unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.workers, vec!["127.0.0.1:8081", "127.0.0.1:8082"]);
        assert_eq!(config.admin.token, "secret");
        assert_eq!(config.health.interval, Duration::from_millis(250));
        assert_eq!(config.health.passive.consecutive_failures, 5);
        assert_eq!(config.balancing.algorithm, Algorithm::RoundRobin);
        assert!(config.registry.enabled);
    }

    #[test]
    fn sentinel_comes_from_the_environment_and_is_checked() {
        let config = load(&[
            (
                "HERD_GATEWAY_SENTINEL__ADDRS",
                "10.0.0.1:26379,10.0.0.2:26379",
            ),
            ("HERD_GATEWAY_SENTINEL__MASTER", "herd"),
        ])
        .unwrap();
        assert_eq!(config.sentinel.addrs, ["10.0.0.1:26379", "10.0.0.2:26379"]);
        assert_eq!(config.sentinel.master, "herd");
        assert!(matches!(
            config.redis_pool().unwrap(),
            herd_shared::redis::RedisPool::Sentinel(_)
        ));
        let error = load(&[("HERD_GATEWAY_SENTINEL__ADDRS", "10.0.0.1")]).unwrap_err();
        assert_eq!(error.key, "sentinel.addrs[0]");
        let error = load(&[
            ("HERD_GATEWAY_SENTINEL__ADDRS", "10.0.0.1:26379"),
            ("HERD_GATEWAY_REDIS__CLUSTER", "redis://10.0.0.3:7000"),
        ])
        .unwrap_err();
        assert_eq!(error.key, "sentinel.addrs");
    }

    #[test]
    fn static_workers_may_be_named() {
        let config = load(&[("HERD_GATEWAY_WORKERS", "w1=127.0.0.1:8081,127.0.0.1:8082")]).unwrap();
        let split: Vec<_> = config
            .workers
            .iter()
            .map(|w| split_static_worker(w))
            .collect();
        assert_eq!(
            split,
            [
                ("w1", "127.0.0.1:8081"),
                ("127.0.0.1:8082", "127.0.0.1:8082")
            ]
        );
        for bad in ["=127.0.0.1:1", "w 1=127.0.0.1:1", "w1=nowhere"] {
            let error = load(&[("HERD_GATEWAY_WORKERS", bad)]).unwrap_err();
            assert_eq!(error.key, "workers[0]", "{bad}: {error}");
        }
        let error = load(&[("HERD_GATEWAY_WORKERS", "w1=127.0.0.1:1,w1=127.0.0.1:2")]).unwrap_err();
        assert_eq!(error.key, "workers[1]", "{error}");
        assert!(error.to_string().contains("twice"), "{error}");
    }

    #[test]
    fn bad_worker_address_names_its_index() {
        let error = load(&[("HERD_GATEWAY_WORKERS", "127.0.0.1:8081,nowhere")]).unwrap_err();
        assert_eq!(error.key, "workers[1]", "{error}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        for (var, value, key) in [
            ("HERD_GATEWAY_HEALTH__FALL", "0", "health.fall"),
            ("HERD_GATEWAY_HEALTH__JITTER", "0.9", "health.jitter"),
            (
                "HERD_GATEWAY_RETRY__MAX_ATTEMPTS",
                "0",
                "retry.max_attempts",
            ),
            ("HERD_GATEWAY_HEALTH__PATH", "readyz", "health.path"),
            (
                "HERD_GATEWAY_BALANCING__ALGORITHM",
                "random",
                "balancing.algorithm",
            ),
            ("HERD_GATEWAY_TIMEOUTS__CONNECT", "soon", "timeouts.connect"),
            ("HERD_GATEWAY_HEDGING__FACTOR", "0.5", "hedging.factor"),
            (
                "HERD_GATEWAY_HEDGING__MAX_DELAY",
                "10ms",
                "hedging.max_delay",
            ),
            ("HERD_GATEWAY_HEDGING__DELAY", "1ns", "hedging.delay"),
            ("HERD_GATEWAY_THREADS", "5000", "threads"),
            ("HERD_GATEWAY_THREADS", "-1", "threads"),
            (
                "HERD_GATEWAY_LIMITS__MAX_HEADER_BYTES",
                "10",
                "limits.max_header_bytes",
            ),
            (
                "HERD_GATEWAY_TIMEOUTS__REQUEST_HEAD",
                "10ms",
                "timeouts.request_head",
            ),
            (
                "HERD_GATEWAY_TIMEOUTS__CLIENT_SEND",
                "0s",
                "timeouts.client_send",
            ),
            (
                "HERD_GATEWAY_TIMEOUTS__TUNNEL_IDLE",
                "1ms",
                "timeouts.tunnel_idle",
            ),
            (
                "HERD_GATEWAY_LIMITS__MAX_CONNECTIONS_PER_CLIENT",
                "-1",
                "limits.max_connections_per_client",
            ),
        ] {
            let error = load(&[(var, value)]).unwrap_err();
            assert_eq!(error.key, key, "{var}={value}: {error}");
        }
    }

    #[test]
    fn threads_default_to_one_per_cpu() {
        let config = load(&[]).unwrap();
        assert_eq!(config.threads, 0);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(config.serving_threads(), cpus);
        let config = load(&[("HERD_GATEWAY_THREADS", "3")]).unwrap();
        assert_eq!(config.serving_threads(), 3);
    }

    #[test]
    fn max_ejection_below_base_is_rejected() {
        let error = load(&[("HERD_GATEWAY_HEALTH__PASSIVE__MAX_EJECTION", "100ms")]).unwrap_err();
        assert_eq!(error.key, "health.passive.max_ejection");
    }

    #[test]
    fn worker_addresses_need_a_port() {
        assert!(parse_worker_addr("127.0.0.1:8081").is_ok());
        assert!(parse_worker_addr("localhost:1").is_ok());
        assert!(parse_worker_addr("127.0.0.1").is_err());
        assert!(parse_worker_addr("127.0.0.1:0").is_err());
        assert!(parse_worker_addr("user@h:1").is_err());
        assert!(parse_worker_addr("h:1/path").is_err());
    }
}
