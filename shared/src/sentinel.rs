//! A Redis pool that follows the master through Redis Sentinel, for processes whose Redis calls
//! all go through a [`RedisPool`] (the gateway's registry and failover lease).
//!
//! [`following_pool`] builds a [`RedisPool::Sentinel`]: a pool for the master's current address
//! that is replaced whole when the sentinels name another master (`SENTINEL
//! get-master-addr-by-name`, asked every `sentinel.poll`). The asking task starts on the pool's
//! first use (building the pool needs no runtime) and ends when the last handle of the pool is
//! dropped. Same reasoning as the worker's `redis_link`: the crate's own Sentinel clients ask only
//! when a connection is made, and pooled connections to a demoted master keep answering PING, so
//! writes would fail (READONLY) until each connection broke.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::AsyncConnectionConfig;
use serde::Deserialize;

use crate::config::{ConfigError, check};
use crate::redis::{RedisConfig, RedisPool};
use crate::redis_pool::Pool;

/// `[sentinel]`: where the sentinels are and which master to follow.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    /// Sentinel addresses (`host:port`); empty (default) means no Sentinel: `redis.url` is used
    /// directly.
    pub addrs: Vec<String>,
    /// Name of the monitored master (`mymaster` by default).
    pub master: String,
    /// How often the sentinels are asked where the master is (default 250ms).
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
}

impl Default for SentinelConfig {
    fn default() -> Self {
        SentinelConfig {
            addrs: Vec::new(),
            master: "mymaster".into(),
            poll: Duration::from_millis(250),
        }
    }
}

impl SentinelConfig {
    /// Whether Sentinel is in use.
    pub fn enabled(&self) -> bool {
        !self.addrs.is_empty()
    }

    /// Validates under `section` (e.g. `sentinel`), so errors name the full key.
    pub fn validate_in(&self, section: &str) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        for (index, addr) in self.addrs.iter().enumerate() {
            let ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::new(
                    format!("{section}.addrs[{index}]"),
                    format!("{addr:?} is not host:port"),
                ));
            }
        }
        check::not_empty(&format!("{section}.master"), &self.master)?;
        check::at_least(
            &format!("{section}.poll"),
            self.poll,
            Duration::from_millis(10),
        )
    }
}

/// The swappable pool behind [`RedisPool::Sentinel`].
pub struct SentinelPool {
    current: Mutex<(String, Pool)>,
    redis: RedisConfig,
    sentinel: SentinelConfig,
    following: AtomicBool,
}

impl SentinelPool {
    /// The pool of the master in use, starting the follower on first use.
    pub(crate) fn pool(self: &Arc<Self>) -> Pool {
        if !self.following.swap(true, Ordering::AcqRel)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(follow(Arc::downgrade(self)));
        }
        self.current.lock().expect("not poisoned").1.clone()
    }

    /// `host:port` of the master in use.
    pub fn address(&self) -> String {
        self.current.lock().expect("not poisoned").0.clone()
    }

    /// Points the pool at `address` if it is not there already; whether it moved.
    fn point_at(&self, address: &str) -> bool {
        if self.address() == address {
            return false;
        }
        let config = RedisConfig {
            url: with_address(&self.redis.url, address),
            ..self.redis.clone()
        };
        match config.single_pool() {
            Ok(pool) => {
                *self.current.lock().expect("not poisoned") = (address.to_string(), pool);
                true
            }
            Err(error) => {
                tracing::warn!(master = address, error = %error, "sentinel: cannot build a pool");
                false
            }
        }
    }
}

/// A pool for `redis.url`'s password and database on the master the sentinels name; until they
/// first answer, on `redis.url`'s own address.
pub fn following_pool(
    redis: &RedisConfig,
    sentinel: &SentinelConfig,
) -> Result<RedisPool, redis::RedisError> {
    let pool = redis.single_pool()?;
    Ok(RedisPool::Sentinel(Arc::new(SentinelPool {
        current: Mutex::new((address_of(&redis.url).unwrap_or_default(), pool)),
        redis: redis.clone(),
        sentinel: sentinel.clone(),
        following: AtomicBool::new(false),
    })))
}

/// Asks `sentinel.addrs` in order for the master's `host:port`; `None` when none answers.
pub async fn ask(redis: &RedisConfig, sentinel: &SentinelConfig) -> Option<String> {
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(redis.connect_timeout))
        .set_response_timeout(Some(redis.command_timeout));
    for addr in &sentinel.addrs {
        let one = async {
            let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
            let mut con = client
                .get_multiplexed_async_connection_with_config(&connection)
                .await
                .ok()?;
            let reply: Option<(String, String)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&sentinel.master)
                .query_async(&mut con)
                .await
                .ok()?;
            reply.map(|(host, port)| format!("{host}:{port}"))
        };
        let bound = redis.connect_timeout + redis.command_timeout;
        if let Ok(Some(master)) = tokio::time::timeout(bound, one).await {
            return Some(master);
        }
    }
    None
}

/// Asks the sentinels at once and then every `poll`, while the pool is in use anywhere.
async fn follow(pool: Weak<SentinelPool>) {
    let mut silent = false;
    loop {
        let (redis, sentinel) = match pool.upgrade() {
            Some(pool) => (pool.redis.clone(), pool.sentinel.clone()),
            None => return,
        };
        let asked = ask(&redis, &sentinel).await;
        let Some(pool) = pool.upgrade() else { return };
        match asked {
            Some(master) => {
                silent = false;
                let from = pool.address();
                if pool.point_at(&master) {
                    tracing::warn!(from = %from, to = %master, name = %sentinel.master, "sentinel: master moved; switched");
                }
            }
            None if !silent => {
                silent = true;
                tracing::warn!(name = %sentinel.master, "sentinel: no sentinel answered");
            }
            None => {}
        }
        drop(pool);
        tokio::time::sleep(sentinel.poll).await;
    }
}

/// `host:port` of a `redis://[user:pass@]host:port[/db]` URL.
pub fn address_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    Some(rest.split('/').next()?.to_string())
}

/// `url` with its `host:port` replaced by `address`.
pub fn with_address(url: &str, address: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return format!("redis://{address}/");
    };
    let (auth, host_and_path) = match rest.rsplit_once('@') {
        Some((auth, host)) => (format!("{auth}@"), host),
        None => (String::new(), rest),
    };
    let path = host_and_path
        .find('/')
        .map_or("", |index| &host_and_path[index..]);
    format!("{scheme}://{auth}{address}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_replaced_and_password_and_database_kept() {
        assert_eq!(
            with_address("redis://:pw@10.0.0.1:6379/3", "10.0.0.2:6380"),
            "redis://:pw@10.0.0.2:6380/3"
        );
        assert_eq!(
            address_of("redis://:pw@10.0.0.1:6379/3").as_deref(),
            Some("10.0.0.1:6379")
        );
    }

    #[test]
    fn bad_sentinel_settings_name_the_key() {
        let config = SentinelConfig {
            addrs: vec!["10.0.0.1:26379".into(), "nope".into()],
            ..SentinelConfig::default()
        };
        assert_eq!(
            config.validate_in("sentinel").unwrap_err().key,
            "sentinel.addrs[1]"
        );
        SentinelConfig::default().validate_in("sentinel").unwrap();
    }
}
