//! Redis connection settings and the pooled client every herd process uses.
//!
//! Every call to Redis is bounded: connecting, waiting for a pooled connection and waiting for a
//! reply each have a timeout, so a Redis outage turns into a quick error (and a 503 for users)
//! instead of a hang.

use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;
use serde::Deserialize;

use crate::config::{ConfigError, Validate, check};
use crate::keys::Keys;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL, e.g. `redis://127.0.0.1:6379/0` (password as `redis://:secret@host:port`).
    pub url: String,
    /// Prefix of every key herd writes, so clusters sharing one Redis never meet.
    pub prefix: String,
    /// Largest number of pooled connections (each is multiplexed, so a few go a long way).
    pub pool_size: usize,
    /// Longest wait for a TCP connection to Redis.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for one reply (or for a free pooled connection).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/0".into(),
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
        if let Err(error) = redis::Client::open(self.url.as_str()) {
            return Err(ConfigError::new(
                key("url"),
                format!("not a valid Redis URL: {error}"),
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

    /// Builds the connection pool. Connections are made lazily, so this succeeds while Redis is
    /// down; calls then fail within the configured timeouts until it is back.
    pub fn pool(&self) -> Result<Pool, redis::RedisError> {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout));
        let manager = Manager::new_with_config(self.url.as_str(), connection)?;
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .wait_timeout(Some(self.command_timeout))
            .create_timeout(Some(self.connect_timeout))
            .recycle_timeout(Some(self.command_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a pool with a runtime and timeouts always builds");
        Ok(pool)
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
