//! The gateway pair: an active gateway serves the public address, a standby takes over when the
//! active's process or machine dies — sub-second, without a split brain, without flapping.
//!
//! Three voters: the two gateways and Redis as witness.
//! - [`peer`]: direct heartbeats over TCP; a closed connection means the peer's process died.
//! - [`lease`]: `{prefix}gateway:lease` = `{id}:{epoch}` with a TTL, changed only by Lua scripts;
//!   `{prefix}gateway:epoch` is the fencing epoch.
//! - [`node`]: the decisions. A standby takes over only when it has lost the active (its link
//!   closed, or it fell silent) AND it wins the lease with a new epoch. An active steps down as
//!   soon as it sees a newer epoch. While Redis is away, nothing changes.
//! - [`address`]: taking the address over (Linux floating IP + gratuitous ARP, or hooks).
//! - [`config`]: the `[failover]` section.
//!
//! The standby runs the whole gateway (health checks, registry) all along, so it serves at full
//! speed from its first request.

pub mod address;
pub mod config;
pub mod lease;
pub mod node;
pub mod peer;

use std::future::Future;

use herd_shared::keys::Keys;
use herd_shared::redis::RedisPool as Pool;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use config::{FailoverConfig, FloatingAddressConfig};
pub use node::{FailoverStatus, HealthyCount, PeerStatus, Transition};

/// A gateway's role in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Waits, health view warm, ready to take over.
    Standby,
    /// Holds the lease and the public address.
    Active,
}

impl Role {
    /// `standby` or `active`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standby => "standby",
            Role::Active => "active",
        }
    }
}

/// Why failover could not start.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The peer link's listener could not be bound.
    #[error("failover.listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// This host cannot announce the floating address (see
    /// [`address::FloatingAddress::check_host`]).
    #[error("{0}")]
    CannotAnnounce(String),
}

/// A started failover node.
#[derive(Debug)]
pub struct Started {
    /// Its status, for the admin API and metrics.
    pub status: watch::Receiver<FailoverStatus>,
    /// Ends once the node has given up the address and the lease after `shutdown`.
    pub stopped: tokio::task::JoinHandle<()>,
    /// Cancelled after `shutdown` when clients' idle connections should close: an active with a
    /// ready standby does it before it lets the role go (so before the standby's gratuitous
    /// ARP moves the address); otherwise just before the address leaves this host.
    pub address_leaving: tokio_util::sync::CancellationToken,
}

/// Starts gateway `id`'s side of the pair. It stops, releasing the address and the lease, when
/// `shutdown` completes.
pub async fn start(
    id: &str,
    config: FailoverConfig,
    pool: Pool,
    keys: &Keys,
    healthy: HealthyCount,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Started, FailoverError> {
    if let Some(address) = &config.address {
        address::FloatingAddress::new(address.clone())
            .check_host()
            .await
            .map_err(FailoverError::CannotAnnounce)?;
    }
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| FailoverError::Bind {
                addr: config.listen,
                source,
            })?;
    let (status_tx, status_rx) = watch::channel(FailoverStatus {
        id: id.to_string(),
        role: Role::Standby,
        epoch: 0,
        holds_address: false,
        redis_reachable: true,
        peer: PeerStatus::default(),
        transitions: 0,
        last_transition: None,
    });
    let (outgoing_tx, outgoing_rx) = watch::channel(peer::Heartbeat {
        id: id.to_string(),
        role: Role::Standby,
        epoch: 0,
        healthy_workers: 0,
        wants_active: false,
    });
    let (events_tx, events_rx) = mpsc::channel(64);
    if let Some(peer_addr) = config.peer {
        peer::spawn(
            listener,
            peer_addr,
            config.heartbeat_interval,
            outgoing_rx,
            events_tx,
        );
    }
    let leases = lease::LeaseStore::new(pool, keys, config.lease_ttl);
    let node = node::Node::new(
        id.to_string(),
        config,
        leases,
        healthy,
        status_tx,
        outgoing_tx,
    );
    let address_leaving = node.address_leaving();
    let stopped = tokio::spawn(node.run(events_rx, shutdown));
    Ok(Started {
        status: status_rx,
        stopped,
        address_leaving,
    })
}
