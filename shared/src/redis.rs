//! Redis connection settings and the client every herd process uses: one Redis (`redis.url`,
//! possibly found through Sentinel by the worker) or a Redis Cluster (`redis.cluster`).
//!
//! Every call to Redis is bounded: connecting and waiting for a reply each have a timeout, and
//! waiting for a pooled connection has the pool's (or, for the worker's calls, which bound
//! themselves, the call's own: [`RedisPool::get_in_bounded_call`]), so a Redis outage turns
//! into a quick error (and a 503 for users) instead of a hang.
//!
//! On a cluster the client is the `redis` crate's `cluster_async` connection: it learns the slot
//! map from the seeds, follows `MOVED` (and refreshes the map) and `ASK` redirects, and
//! reconnects to promoted replicas. It is one multiplexed handle to every master, shared by all
//! callers (the crate says cluster connections need no pooling; deadpool-redis' cluster pool
//! cannot set the connect and response timeouts herd bounds every call with).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster_async::ClusterConnection;
use serde::Deserialize;

use crate::config::{ConfigError, Validate, check};
use crate::keys::Keys;
use crate::redis_pool::{Connections, Pool};

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0` (password as `redis://:secret@host:port`).
    /// Leave at the default when `cluster` is set.
    pub url: String,
    /// Redis Cluster seed nodes (`redis://host:port`, a few masters suffice: the rest of the
    /// cluster is learned from them). Empty (default): no cluster, use `url`.
    pub cluster: Vec<String>,
    /// Prefix of every key herd writes, so clusters sharing one Redis never meet.
    pub prefix: String,
    /// Largest number of pooled connections (each is multiplexed, so a few go a long way).
    pub pool_size: usize,
    /// Longest wait for a TCP connection to Redis.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for one reply (and, but in the worker's calls, for a free pooled connection:
    /// those wait up to their own bound, `connect_timeout + command_timeout`).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

/// `redis.url`'s default.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379/0";

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: DEFAULT_URL.into(),
            cluster: Vec::new(),
            prefix: "herd:".into(),
            pool_size: 16,
            connect_timeout: Duration::from_millis(500),
            command_timeout: Duration::from_millis(500),
        }
    }
}

impl RedisConfig {
    /// Validates under `section` (e.g. `redis`), so errors name the full key.
    pub fn validate_in(&self, section: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        match redis::Client::open(self.url.as_str()) {
            Err(error) => {
                return Err(ConfigError::new(
                    key("url"),
                    format!("not a valid Redis URL: {error}"),
                ));
            }
            Ok(client)
                if client.get_connection_info().redis_settings().protocol()
                    != redis::ProtocolVersion::RESP2 =>
            {
                return Err(ConfigError::new(
                    key("url"),
                    "herd speaks RESP2 to Redis: take `protocol=` out of the URL",
                ));
            }
            Ok(_) => {}
        }
        if !self.cluster.is_empty() && self.url != DEFAULT_URL {
            return Err(ConfigError::new(
                key("cluster"),
                format!(
                    "set either {} (one Redis) or {} (Redis Cluster), not both",
                    key("url"),
                    key("cluster")
                ),
            ));
        }
        for (index, seed) in self.cluster.iter().enumerate() {
            let problem = match redis::Client::open(seed.as_str()) {
                Err(error) => Some(format!("not a valid Redis URL: {error}")),
                // A cluster has only database 0.
                Ok(client) if client.get_connection_info().redis_settings().db() != 0 => {
                    Some("a cluster has only database 0".to_string())
                }
                Ok(_) => None,
            };
            if let Some(problem) = problem {
                return Err(ConfigError::new(
                    format!("{}[{index}]", key("cluster")),
                    format!("{seed:?}: {problem}"),
                ));
            }
        }
        if self.prefix.contains(['{', '}']) {
            return Err(ConfigError::new(
                key("prefix"),
                "must not contain `{` or `}`: herd's keys carry their own Redis Cluster hash tags",
            ));
        }
        check::range(&key("pool_size"), self.pool_size, 1, 1024)?;
        check::at_least(
            &key("connect_timeout"),
            self.connect_timeout,
            Duration::from_millis(1),
        )?;
        check::at_least(
            &key("command_timeout"),
            self.command_timeout,
            Duration::from_millis(1),
        )?;
        Ok(())
    }

    /// The key schema under this configuration's prefix.
    pub fn keys(&self) -> Keys {
        Keys::new(self.prefix.clone())
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster.is_empty()
    }

    /// Builds the client: a pool for one Redis, or the cluster client. Connections are made
    /// lazily, so this succeeds while Redis is down; calls then fail within the configured
    /// timeouts until it is back.
    pub fn pool(&self) -> Result<RedisPool, redis::RedisError> {
        if self.is_cluster() {
            let client = redis::cluster::ClusterClientBuilder::new(self.cluster.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.command_timeout)
                // Redirects and reconnects after a failover fit in the outer call bound.
                .overall_response_timeout(Some(self.connect_timeout + self.command_timeout))
                .retries(4)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .build()?;
            return Ok(RedisPool::Cluster(Arc::new(ClusterPool {
                client,
                connection: tokio::sync::Mutex::new(None),
                connect_timeout: self.connect_timeout,
            })));
        }
        self.single_pool().map(RedisPool::Single)
    }

    /// The pool for `url` (one Redis).
    pub fn single_pool(&self) -> Result<Pool, redis::RedisError> {
        let manager = Connections::new(self.url.as_str(), self.command_timeout)?;
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.command_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.command_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime and timeouts always builds");
        Ok(pool)
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No pooled connection to the one Redis (down or too slow).
    #[error("no Redis connection: {0}")]
    Pool(#[from] deadpool::managed::PoolError<redis::RedisError>),
    /// The cluster could not be reached (no seed answered, or no slot map yet).
    #[error("no Redis Cluster connection: {0}")]
    Cluster(#[from] redis::RedisError),
    /// Connecting took longer than `connect_timeout`.
    #[error("no Redis Cluster connection within the connect timeout")]
    Timeout,
}

/// The cluster client and its one shared connection, made on first use (and again after a
/// failed attempt), so a process starts while the cluster is down.
pub struct ClusterPool {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::Mutex<Option<ClusterConnection>>,
    connect_timeout: Duration,
}

/// How a process reaches Redis: a pool of connections to one server, or a cluster client.
#[derive(Clone)]
pub enum RedisPool {
    /// One Redis (or the master Sentinel points at).
    Single(Pool),
    /// A Redis Cluster.
    Cluster(Arc<ClusterPool>),
    /// The master the sentinels name, followed as it moves ([`crate::sentinel`]).
    Sentinel(Arc<crate::sentinel::SentinelPool>),
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisPool::Single(_) => f.write_str("RedisPool::Single"),
            RedisPool::Cluster(_) => f.write_str("RedisPool::Cluster"),
            RedisPool::Sentinel(pool) => write!(f, "RedisPool::Sentinel({})", pool.address()),
        }
    }
}

impl RedisPool {
    /// The pool's connections and waiters, for metrics; `None` on a cluster, which has one
    /// shared multiplexed connection and no pool.
    pub fn status(&self) -> Option<crate::redis_pool::Status> {
        match self {
            RedisPool::Single(pool) => Some(pool.status()),
            RedisPool::Cluster(_) => None,
            RedisPool::Sentinel(pool) => Some(pool.pool().status()),
        }
    }

    /// A connection: pooled for one Redis, the shared multiplexed handle for a cluster. Waiting
    /// for a pooled connection and checking it are bounded by the pool's timeouts.
    pub async fn get(&self) -> Result<RedisConnection, ConnectError> {
        self.checkout(false).await
    }

    /// A connection, for a call its caller bounds with a timeout of its own (each of the
    /// worker's `RedisLink` calls): waiting for a pooled connection and checking it run without
    /// the pool's timers, two per checkout that the caller's bound makes redundant. The wait is
    /// bounded by the caller alone (a caller whose pool may be replaced, as `RedisLink`'s when
    /// the master moves, closes the old one to end its waits); the check's `PING` and a new
    /// connection's first round trip keep the connection's response timeout, connecting the
    /// pool's create timeout.
    pub async fn get_in_bounded_call(&self) -> Result<RedisConnection, ConnectError> {
        self.checkout(true).await
    }

    async fn checkout(&self, caller_bounds: bool) -> Result<RedisConnection, ConnectError> {
        let timeouts = |pool: &Pool| {
            let timeouts = pool.timeouts();
            if caller_bounds {
                deadpool::managed::Timeouts {
                    wait: None,
                    recycle: None,
                    ..timeouts
                }
            } else {
                timeouts
            }
        };
        match self {
            RedisPool::Single(pool) => Ok(RedisConnection::Single(
                pool.timeout_get(&timeouts(pool)).await?,
            )),
            RedisPool::Sentinel(sentinel) => {
                let pool = sentinel.pool();
                Ok(RedisConnection::Single(
                    pool.timeout_get(&timeouts(&pool)).await?,
                ))
            }
            RedisPool::Cluster(cluster) => {
                let mut slot = cluster.connection.lock().await;
                if let Some(connection) = slot.as_ref() {
                    return Ok(RedisConnection::Cluster(connection.clone()));
                }
                let connection = tokio::time::timeout(
                    cluster.connect_timeout * 2,
                    cluster.client.get_async_connection(),
                )
                .await
                .map_err(|_| ConnectError::Timeout)??;
                *slot = Some(connection.clone());
                Ok(RedisConnection::Cluster(connection))
            }
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisPool::Cluster(_))
    }
}

/// One connection from a [`RedisPool`]; runs commands, pipelines and scripts on either kind.
/// On a cluster, a command or script goes to the master of its (first) key's slot; a pipeline
/// must keep to one slot. Commands packed by hand ([`RedisConnection::exchange_packed`]) go to a
/// single Redis only.
pub enum RedisConnection {
    /// Pooled connection to one Redis.
    Single(crate::redis_pool::Connection),
    /// The cluster handle.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Sends commands packed by the caller ([`crate::resp::pack_command`], or by hand) and
    /// has `read` read their `replies` replies in place, in one round trip, for hot paths that
    /// send fixed commands ([`crate::resp::Cursor`]; see
    /// [`WireConnection::exchange_packed`](crate::redis_wire::WireConnection::exchange_packed)).
    /// A single Redis only: a cluster routes each command by its keys, which packed bytes do not
    /// show.
    pub async fn exchange_packed<T>(
        &mut self,
        packed: &[u8],
        replies: usize,
        read: impl FnMut(&mut crate::resp::Cursor<'_>) -> Option<T>,
    ) -> redis::RedisResult<Option<T>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.exchange_packed(packed, replies, read).await
            }
            RedisConnection::Cluster(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "packed commands go to a single Redis, not to a cluster",
            ))),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(cmd, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(cmd, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

impl Validate for RedisConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_in("redis")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RedisConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_url_names_the_key() {
        let config = RedisConfig {
            url: "http://nope".into(),
            ..RedisConfig::default()
        };
        let error = config.validate_in("redis").unwrap_err();
        assert_eq!(error.key, "redis.url");
    }

    #[test]
    fn a_url_asking_for_resp3_names_the_key() {
        let config = RedisConfig {
            url: "redis://127.0.0.1:6379/0?protocol=resp3".into(),
            ..RedisConfig::default()
        };
        let error = config.validate_in("redis").unwrap_err();
        assert_eq!(error.key, "redis.url");
        assert!(error.to_string().contains("RESP2"), "{error}");
    }

    #[test]
    fn url_and_cluster_together_name_the_key() {
        let config = RedisConfig {
            url: "redis://10.0.0.1:6379/0".into(),
            cluster: vec!["redis://10.0.0.2:7000".into()],
            ..RedisConfig::default()
        };
        let error = config.validate_in("redis").unwrap_err();
        assert_eq!(error.key, "redis.cluster");
        assert!(error.to_string().contains("redis.url"), "{error}");
    }

    #[test]
    fn bad_cluster_seeds_name_the_entry() {
        let mut config = RedisConfig {
            cluster: vec!["redis://10.0.0.2:7000".into(), "http://x".into()],
            ..RedisConfig::default()
        };
        assert_eq!(
            config.validate_in("redis").unwrap_err().key,
            "redis.cluster[1]"
        );
        config.cluster[1] = "redis://10.0.0.3:7000/2".into();
        assert_eq!(
            config.validate_in("redis").unwrap_err().key,
            "redis.cluster[1]"
        );
        config.cluster[1] = "redis://10.0.0.3:7000".into();
        config.validate_in("redis").unwrap();
        assert!(config.is_cluster());
    }

    #[tokio::test]
    async fn cluster_client_builds_without_redis_and_fails_fast() {
        let config = RedisConfig {
            cluster: vec!["redis://127.0.0.1:1".into()],
            ..RedisConfig::default()
        };
        let pool = config.pool().unwrap();
        let started = std::time::Instant::now();
        assert!(pool.get().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn pool_builds_without_redis_and_fails_fast() {
        let config = RedisConfig {
            url: "redis://127.0.0.1:1/0".into(),
            ..RedisConfig::default()
        };
        let pool = config.pool().unwrap();
        let started = std::time::Instant::now();
        assert!(pool.get().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
