//! `[failover]`: the gateway pair's settings.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use herd_shared::config::{ConfigError, check};
use serde::Deserialize;

/// How this gateway pairs with its peer. Off by default: a single gateway needs none of it.
/// The gateway's top-level `id` is its name in the pair (the lease holds `{id}:{epoch}`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Take part in an active / standby pair.
    pub enabled: bool,
    /// Where this gateway listens for its peer's link (TCP).
    pub listen: SocketAddr,
    /// The peer's link address.
    pub peer: Option<SocketAddr>,
    /// The preferred active: with `preempt`, it takes the role back once it is healthy again.
    pub preferred: bool,
    /// Whether the preferred gateway takes the role back after it returns.
    pub preempt: bool,
    /// How often heartbeats go to the peer and the lease is renewed.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which the peer counts as unreachable.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// Lifetime of the lease in Redis; the standby can take over no sooner after the active's
    /// last renewal (unless the peer link showed the active's process die).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Minimum time a returning preferred gateway must have had healthy workers before it takes
    /// the role back.
    #[serde(with = "humantime_serde")]
    pub preempt_delay: Duration,
    /// The floating address, claimed by the active on a Linux interface.
    pub address: Option<FloatingAddressConfig>,
    /// Commands run on becoming active / standby (cloud API, DNS…): `sh -c`, with `HERD_ROLE`,
    /// `HERD_EPOCH` and `HERD_GATEWAY_ID` in the environment.
    pub on_active: Option<String>,
    /// Command run on stepping down to standby.
    pub on_standby: Option<String>,
    /// The longest a hook may run; then it is killed (with everything it started) and the
    /// failure logged.
    #[serde(with = "humantime_serde")]
    pub hook_timeout: Duration,
}

/// A floating IPv4 address on a local interface.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FloatingAddressConfig {
    /// The address users reach the gateway pair on.
    pub ip: Ipv4Addr,
    /// Prefix length of the subnet.
    #[serde(default = "default_prefix_len")]
    pub prefix_len: u8,
    /// The interface to put it on.
    #[serde(default = "default_interface")]
    pub interface: String,
    /// How long the kernel keeps the address without a refresh, in whole seconds: a holder that
    /// dies without removing it loses it after this long.
    #[serde(default = "default_lifetime")]
    pub lifetime_secs: u32,
}

fn default_prefix_len() -> u8 {
    24
}

fn default_interface() -> String {
    "eth0".into()
}

fn default_lifetime() -> u32 {
    3
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 7946)),
            peer: None,
            preferred: false,
            preempt: false,
            heartbeat_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_millis(500),
            lease_ttl: Duration::from_millis(700),
            preempt_delay: Duration::from_secs(2),
            address: None,
            on_active: None,
            on_standby: None,
            hook_timeout: Duration::from_secs(10),
        }
    }
}

impl FailoverConfig {
    /// Checks the section (keys named `failover.…`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.peer.is_none() {
            return Err(ConfigError::new(
                "failover.peer",
                "required when failover is enabled (the other gateway's link address)",
            ));
        }
        check::at_least(
            "failover.heartbeat_interval",
            self.heartbeat_interval,
            Duration::from_millis(10),
        )?;
        if self.peer_timeout < self.heartbeat_interval * 3 {
            return Err(ConfigError::new(
                "failover.peer_timeout",
                "must be at least 3 × heartbeat_interval, or one late heartbeat looks like a failure",
            ));
        }
        if self.lease_ttl < self.heartbeat_interval * 3 {
            return Err(ConfigError::new(
                "failover.lease_ttl",
                "must be at least 3 × heartbeat_interval (the lease is renewed every heartbeat)",
            ));
        }
        check::at_least(
            "failover.hook_timeout",
            self.hook_timeout,
            Duration::from_millis(100),
        )?;
        if self.address.is_none() && self.on_active.is_none() {
            return Err(ConfigError::new(
                "failover.address",
                "required when failover is enabled, unless failover.on_active moves the address \
                 (otherwise taking over moves nothing)",
            ));
        }
        if let Some(address) = &self.address {
            check::range("failover.address.prefix_len", address.prefix_len, 1, 32)?;
            check::not_empty("failover.address.interface", &address.interface)?;
            check::range(
                "failover.address.lifetime_secs",
                address.lifetime_secs,
                2,
                3600,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> FailoverConfig {
        FailoverConfig {
            enabled: true,
            peer: Some(SocketAddr::from(([10, 0, 0, 2], 7946))),
            address: Some(FloatingAddressConfig {
                ip: Ipv4Addr::new(10, 0, 0, 10),
                prefix_len: 24,
                interface: "eth0".into(),
                lifetime_secs: 3,
            }),
            ..FailoverConfig::default()
        }
    }

    #[test]
    fn defaults_are_valid_and_off() {
        assert!(!FailoverConfig::default().enabled);
        FailoverConfig::default().validate().unwrap();
        enabled().validate().unwrap();
    }

    #[test]
    fn problems_name_their_key() {
        let mut config = enabled();
        config.peer = None;
        assert_eq!(config.validate().unwrap_err().key, "failover.peer");
        let mut config = enabled();
        config.peer_timeout = Duration::from_millis(150);
        assert_eq!(config.validate().unwrap_err().key, "failover.peer_timeout");
        let mut config = enabled();
        config.hook_timeout = Duration::from_millis(50);
        assert_eq!(config.validate().unwrap_err().key, "failover.hook_timeout");
    }

    #[test]
    fn a_pair_must_move_something() {
        let mut config = enabled();
        config.address = None;
        assert_eq!(config.validate().unwrap_err().key, "failover.address");
        config.on_active = Some("/usr/local/bin/move-dns".into());
        config.validate().unwrap();
    }
}
