//! The worker's configuration: what `herd-worker` reads from its TOML file and `HERD_WORKER_…`
//! environment variables, with defaults, validated once at start-up.
//!
//! Every key is documented in `worker/README.md`. Durations are humantime strings (`250ms`, `3s`).

/// `[sentinel]`: the same keys as the gateway's (see [`herd_shared::sentinel::SentinelConfig`]).
pub use herd_shared::sentinel::SentinelConfig;
use std::net::SocketAddr;
use std::time::Duration;

use herd_shared::config::{ConfigError, Validate, check};
use herd_shared::redis::RedisConfig;
use herd_shared::telemetry::TracingConfig;
use serde::Deserialize;

/// Environment prefix of the worker's settings.
pub const ENV_PREFIX: &str = "HERD_WORKER";

/// Keys whose environment value is a comma-separated list (`HERD_WORKER_SENTINEL__ADDRS=a:1,b:2`).
/// Never leave this empty: with an empty list the `config` crate splits *every* string value
/// into a list (`HERD_WORKER_ID=w1` would become `["w1"]`).
pub const ENV_LIST_KEYS: &[&str] = &["sentinel.addrs", "redis.cluster"];

/// Which app the `herd-worker` binary serves.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum App {
    /// The demo app: login, cart, work — sessions and registry in Redis.
    #[default]
    Demo,
    /// `200 hello` on every path, no Redis at all: the upstream of proxy benchmarks.
    Hello,
}

/// Everything a worker process is configured with.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Which app the binary serves (`demo` or `hello`).
    pub app: App,
    /// Unique worker id; default `{machine}-{port}`.
    pub id: Option<String>,
    /// Name of the machine; default the host name.
    pub machine: Option<String>,
    /// Address to listen on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// `host:port` gateways use to reach this worker; default the bound address.
    pub advertise: Option<String>,
    /// Relative share of traffic for weighted balancing.
    pub weight: u32,
    /// Threads serving requests (the async runtime's worker threads); 0 = one per CPU.
    pub threads: usize,
    /// Redis connection (sessions and registry).
    pub redis: RedisConfig,
    /// Finding the Redis master through Sentinel (off when `addrs` is empty).
    pub sentinel: SentinelConfig,
    /// Registration in the Redis registry.
    pub registry: RegistryConfig,
    /// Sessions: cookie and timeouts.
    pub session: SessionConfig,
    /// Graceful drain on SIGTERM.
    pub drain: DrainConfig,
    /// Readiness checking.
    pub health: HealthConfig,
    /// OpenTelemetry trace export (`[tracing]`; off by default).
    pub tracing: TracingConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            app: App::Demo,
            id: None,
            machine: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            advertise: None,
            weight: 100,
            threads: 0,
            redis: RedisConfig::default(),
            sentinel: SentinelConfig::default(),
            registry: RegistryConfig::default(),
            session: SessionConfig::default(),
            drain: DrainConfig::default(),
            health: HealthConfig::default(),
            tracing: TracingConfig::default(),
        }
    }
}

/// `[registry]`: the worker's own entry in `{prefix}worker:{id}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Register at all (off for a worker listed statically in the gateway's config).
    pub enabled: bool,
    /// How often the entry's TTL is refreshed.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// TTL of the entry: how long a dead worker stays listed.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            enabled: true,
            heartbeat: Duration::from_secs(1),
            ttl: Duration::from_secs(3),
        }
    }
}

/// `[session]`: the session cookie, timeouts and limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Name of the session cookie.
    pub cookie_name: String,
    /// `Domain` attribute of the cookie; none means host-only.
    pub cookie_domain: Option<String>,
    /// Always mark the cookie `Secure` (it is also set when `X-Forwarded-Proto: https`).
    pub cookie_secure: bool,
    /// Idle timeout: a session unused this long is gone (sliding TTL in Redis).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Absolute timeout: a session older than this is gone, however active.
    #[serde(with = "humantime_serde")]
    pub absolute_timeout: Duration,
    /// A read refreshes the idle TTL at most once per this interval (spares Redis).
    #[serde(with = "humantime_serde")]
    pub touch_interval: Duration,
    /// After the id is regenerated (login), the old id keeps working this long.
    #[serde(with = "humantime_serde")]
    pub regenerate_grace: Duration,
    /// Largest stored session (data and user, serialized), in bytes.
    pub max_bytes: usize,
    /// How often a save is retried after a concurrent change before giving up (409).
    pub max_retries: u32,
    /// Session reads and writes (the plain load, the scripts) go pipelined over one Redis
    /// connection per serving thread, shared by all requests (fewer system calls for Redis and
    /// the worker); `false`: each takes a pooled connection of its own. No effect on a Redis
    /// Cluster.
    pub pipelined: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie_name: "herd_session".into(),
            cookie_domain: None,
            cookie_secure: false,
            idle_timeout: Duration::from_secs(30 * 60),
            absolute_timeout: Duration::from_secs(24 * 3600),
            touch_interval: Duration::from_secs(60),
            regenerate_grace: Duration::from_secs(10),
            max_bytes: 64 * 1024,
            max_retries: 32,
            pipelined: true,
        }
    }
}

/// `[drain]`: how a worker leaves on SIGTERM / SIGINT without failing requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Keep serving at least this long after announcing the drain, so every gateway has seen it.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// Then stop once no new request has arrived for this long.
    #[serde(with = "humantime_serde")]
    pub quiet: Duration,
    /// Stop taking new requests after this long, whatever still arrives.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Longest wait for in-flight requests once new ones are refused.
    #[serde(with = "humantime_serde")]
    pub in_flight_timeout: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            min: Duration::from_secs(2),
            quiet: Duration::from_millis(500),
            max: Duration::from_secs(30),
            in_flight_timeout: Duration::from_secs(30),
        }
    }
}

/// `[health]`: how readiness is decided.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often Redis is pinged; `/readyz` answers from the last result at once.
    #[serde(with = "humantime_serde")]
    pub redis_interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            redis_interval: Duration::from_millis(500),
        }
    }
}

impl Validate for WorkerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // Both are sent as response headers and stored in the registry.
        for (key, value) in [("id", &self.id), ("machine", &self.machine)] {
            if let Some(value) = value {
                check::not_empty(key, value)?;
                if !value.chars().all(|c| c.is_ascii_graphic()) || value.len() > 200 {
                    return Err(ConfigError::new(
                        key,
                        "must be up to 200 visible ASCII characters (no spaces)",
                    ));
                }
            }
        }
        if let Some(advertise) = &self.advertise
            && advertise
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
        {
            return Err(ConfigError::new("advertise", "must be host:port"));
        }
        check::range("weight", self.weight, 1, 10_000)?;
        check::range("threads", self.threads, 0, 1024)?;
        self.redis.validate_in("redis")?;
        self.tracing.validate_in("tracing")?;
        for addr in &self.sentinel.addrs {
            if addr
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError::new(
                    "sentinel.addrs",
                    format!("`{addr}` is not host:port"),
                ));
            }
        }
        if self.sentinel.enabled() && self.redis.is_cluster() {
            return Err(ConfigError::new(
                "sentinel.addrs",
                "set either sentinel.addrs (Sentinel) or redis.cluster (Redis Cluster), not both",
            ));
        }
        check::not_empty("sentinel.master", &self.sentinel.master)?;
        check::at_least(
            "sentinel.poll",
            self.sentinel.poll,
            Duration::from_millis(10),
        )?;

        if self.app == App::Hello && self.registry.enabled {
            // The hello app has no Redis link: it could never heartbeat.
            return Err(ConfigError::new(
                "registry.enabled",
                "must be false with app = \"hello\", which uses no Redis (HERD_WORKER_REGISTRY__ENABLED=false)",
            ));
        }
        let ms = Duration::from_millis;
        check::at_least("registry.heartbeat", self.registry.heartbeat, ms(10))?;
        if self.registry.ttl <= self.registry.heartbeat {
            return Err(ConfigError::new(
                "registry.ttl",
                "must be longer than registry.heartbeat (about 3 heartbeats)",
            ));
        }

        let s = &self.session;
        check::not_empty("session.cookie_name", &s.cookie_name)?;
        if !s
            .cookie_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::new(
                "session.cookie_name",
                "may contain only letters, digits, `_` and `-`",
            ));
        }
        if let Some(domain) = &s.cookie_domain
            // Sent in every Set-Cookie header: only visible ASCII can be, and `;` `,` would split
            // the attribute.
            && (domain.is_empty()
                || !domain
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != ';' && c != ','))
        {
            return Err(ConfigError::new("session.cookie_domain", "not a domain"));
        }
        check::at_least(
            "session.idle_timeout",
            s.idle_timeout,
            Duration::from_secs(1),
        )?;
        check::at_least(
            "session.absolute_timeout",
            s.absolute_timeout,
            s.idle_timeout,
        )?;
        if s.touch_interval >= s.idle_timeout {
            return Err(ConfigError::new(
                "session.touch_interval",
                "must be shorter than session.idle_timeout",
            ));
        }
        check::range("session.max_bytes", s.max_bytes, 256, 16 * 1024 * 1024)?;
        check::range("session.max_retries", s.max_retries, 1, 1000)?;

        let d = &self.drain;
        check::at_least("drain.quiet", d.quiet, ms(10))?;
        check::at_least("drain.max", d.max, d.min)?;
        check::at_least("drain.in_flight_timeout", d.in_flight_timeout, ms(1))?;
        check::at_least("health.redis_interval", self.health.redis_interval, ms(10))?;
        Ok(())
    }
}

impl WorkerConfig {
    /// Fills in the defaults that depend on the bound address: machine, id and advertised address.
    pub fn identity(&self, bound: SocketAddr) -> Identity {
        let machine = self.machine.clone().unwrap_or_else(host_name);
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| format!("{machine}-{}", bound.port()));
        let advertise = self.advertise.clone().unwrap_or_else(|| bound.to_string());
        Identity {
            id,
            machine,
            advertise,
        }
    }
}

/// Who this worker is, once its address is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Worker id (`x-herd-worker`).
    pub id: String,
    /// Machine name (`x-herd-machine`).
    pub machine: String,
    /// `host:port` gateways use.
    pub advertise: String,
}

/// The host name, from the kernel; `localhost` when it can't be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_shared::config::{Source, load_with_env};
    use std::collections::HashMap;

    fn load_env(pairs: &[(&str, &str)]) -> Result<WorkerConfig, ConfigError> {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_with_env(
            &Source {
                file: None,
                env_prefix: ENV_PREFIX,
                env_list_keys: ENV_LIST_KEYS,
            },
            Some(env),
        )
    }

    #[test]
    fn defaults_are_valid() {
        WorkerConfig::default().validate().unwrap();
        let config = load_env(&[]).unwrap();
        assert_eq!(config, WorkerConfig::default());
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let config = load_env(&[
            ("HERD_WORKER_LISTEN", "127.0.0.1:0"),
            ("HERD_WORKER_ID", "w1"),
            ("HERD_WORKER_MACHINE", "m1"),
            ("HERD_WORKER_REDIS__URL", "redis://127.0.0.1:6390/0"),
            ("HERD_WORKER_REDIS__PREFIX", "t123:"),
            ("HERD_WORKER_REGISTRY__ENABLED", "false"),
            ("HERD_WORKER_SESSION__IDLE_TIMEOUT", "10m"),
            ("HERD_WORKER_DRAIN__QUIET", "200ms"),
            (
                "HERD_WORKER_SENTINEL__ADDRS",
                "127.0.0.1:26379,127.0.0.1:26380",
            ),
        ])
        .unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.id.as_deref(), Some("w1"));
        assert_eq!(config.redis.prefix, "t123:");
        assert!(!config.registry.enabled);
        assert_eq!(config.session.idle_timeout, Duration::from_secs(600));
        assert_eq!(config.drain.quiet, Duration::from_millis(200));
        assert_eq!(
            config.sentinel.addrs,
            vec!["127.0.0.1:26379", "127.0.0.1:26380"]
        );
        assert!(config.sentinel.enabled());
    }

    #[test]
    fn a_cluster_excludes_sentinel_and_url() {
        let config = load_env(&[(
            "HERD_WORKER_REDIS__CLUSTER",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
        )])
        .unwrap();
        assert_eq!(config.redis.cluster.len(), 2);
        let both = load_env(&[
            ("HERD_WORKER_REDIS__CLUSTER", "redis://127.0.0.1:7000"),
            ("HERD_WORKER_SENTINEL__ADDRS", "127.0.0.1:26379"),
        ])
        .unwrap_err();
        assert_eq!(both.key, "sentinel.addrs");
        let both = load_env(&[
            ("HERD_WORKER_REDIS__CLUSTER", "redis://127.0.0.1:7000"),
            ("HERD_WORKER_REDIS__URL", "redis://127.0.0.1:6390/0"),
        ])
        .unwrap_err();
        assert_eq!(both.key, "redis.cluster");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("HERD_WORKER_LISTEN", "nowhere", "listen"),
            ("HERD_WORKER_WEIGHT", "0", "weight"),
            ("HERD_WORKER_THREADS", "5000", "threads"),
            ("HERD_WORKER_THREADS", "-1", "threads"),
            ("HERD_WORKER_REGISTRY__TTL", "1s", "registry.ttl"),
            (
                "HERD_WORKER_SESSION__COOKIE_NAME",
                "a b",
                "session.cookie_name",
            ),
            (
                "HERD_WORKER_SESSION__TOUCH_INTERVAL",
                "2h",
                "session.touch_interval",
            ),
            (
                "HERD_WORKER_SESSION__ABSOLUTE_TIMEOUT",
                "1s",
                "session.absolute_timeout",
            ),
            (
                "HERD_WORKER_SESSION__PIPELINED",
                "sometimes",
                "session.pipelined",
            ),
            ("HERD_WORKER_DRAIN__MAX", "1s", "drain.max"),
            ("HERD_WORKER_DRAIN__QUIET", "later", "drain.quiet"),
            ("HERD_WORKER_REDIS__URL", "http://x", "redis.url"),
            ("HERD_WORKER_ADVERTISE", "nohost", "advertise"),
            ("HERD_WORKER_SESSION__BOGUS", "1", "session.bogus"),
            ("HERD_WORKER_SENTINEL__ADDRS", "a:1,nope", "sentinel.addrs"),
            (
                "HERD_WORKER_REDIS__CLUSTER",
                "redis://a:1,ftp://b",
                "redis.cluster[1]",
            ),
            ("HERD_WORKER_REDIS__PREFIX", "h{x}:", "redis.prefix"),
            ("HERD_WORKER_ID", "w 1", "id"),
            ("HERD_WORKER_MACHINE", "mäschine", "machine"),
            (
                "HERD_WORKER_SESSION__COOKIE_DOMAIN",
                "exa\u{1}mple.com",
                "session.cookie_domain",
            ),
            (
                "HERD_WORKER_SESSION__COOKIE_DOMAIN",
                "exämple.com",
                "session.cookie_domain",
            ),
        ];
        for (var, value, key) in cases {
            let error = load_env(&[(var, value)]).unwrap_err();
            assert_eq!(&error.key, key, "{var}={value}: {error}");
        }
    }

    #[test]
    fn hello_app_needs_the_registry_off() {
        let error = load_env(&[("HERD_WORKER_APP", "hello")]).unwrap_err();
        assert_eq!(error.key, "registry.enabled", "{error}");
        assert!(error.problem.contains("hello"), "{error}");
        let config = load_env(&[
            ("HERD_WORKER_APP", "hello"),
            ("HERD_WORKER_REGISTRY__ENABLED", "false"),
        ])
        .unwrap();
        assert_eq!(config.app, App::Hello);
        assert_eq!(load_env(&[]).unwrap().app, App::Demo);
        let error = load_env(&[("HERD_WORKER_APP", "hallo")]).unwrap_err();
        assert_eq!(error.key, "app", "{error}");
    }

    #[test]
    fn identity_defaults_follow_the_bound_address() {
        let config = WorkerConfig {
            machine: Some("m1".into()),
            ..WorkerConfig::default()
        };
        let identity = config.identity("127.0.0.1:4567".parse().unwrap());
        assert_eq!(identity.id, "m1-4567");
        assert_eq!(identity.advertise, "127.0.0.1:4567");
        let named = WorkerConfig {
            id: Some("w9".into()),
            advertise: Some("10.0.0.2:80".into()),
            ..config
        };
        let identity = named.identity("0.0.0.0:1".parse().unwrap());
        assert_eq!(
            (identity.id.as_str(), identity.advertise.as_str()),
            ("w9", "10.0.0.2:80")
        );
        assert!(
            !WorkerConfig::default()
                .identity("127.0.0.1:1".parse().unwrap())
                .machine
                .is_empty()
        );
    }
}
