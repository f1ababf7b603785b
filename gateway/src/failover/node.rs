//! One gateway of the pair: the decisions (pure functions, unit-tested) and the loop that acts on
//! them (lease in Redis, floating address, hooks, status).
//!
//! ```text
//!              lease acquired (peer's process seen dying, or peer silent + lease expired,
//!              or no active at all)                  ──────────────▶
//!   ┌─────────┐                                                        ┌────────┐
//!   │ standby │                                                        │ active │
//!   └─────────┘  ◀──────────────  a newer epoch seen (Redis or peer),
//!                                 or hand-over (to the preferred peer with preempt, or to
//!                                 a ready standby on a graceful stop)
//! ```
//!
//! Redis unreachable: nothing changes. The active keeps serving (it can't renew, but nobody can
//! take the lease either), and a standby never takes over without the lease.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::Role;
use super::address::{Announcement, FloatingAddress, run_hook};
use super::config::FailoverConfig;
use super::lease::{Lease, LeaseOutcome, LeaseStore};
use super::peer::{Heartbeat, PeerEvent};

/// How often the active refreshes the floating address's kernel lifetime.
const ADDRESS_REFRESH: Duration = Duration::from_millis(1000);
/// How long a gateway that handed the role over stays out of the race for it.
const HAND_OVER_YIELD: Duration = Duration::from_secs(2);
/// How long a gateway that handed the role over keeps serving on the address after the new
/// active claimed it: until the new holder's gratuitous ARPs (0, 0.1, 0.5 s) have moved every
/// client. Both gateways serve correctly meanwhile, so holding it twice briefly costs nothing,
/// while dropping it before a client has moved loses that client's new connections.
const HAND_OVER_LINGER: Duration = Duration::from_secs(1);
/// How long a gateway stopping gracefully waits for its peer to take the role over before it
/// drops the address anyway (the peer takes the free lease at its next tick: 100 ms at defaults).
const SHUTDOWN_HAND_OVER: Duration = Duration::from_secs(3);
/// How long a gateway stopping gracefully stays active after the SIGTERM before it closes its
/// idle client connections: from the SIGTERM on every response says `Connection: close`, so the
/// connections clients are using close cleanly after their next response meanwhile, and fewer
/// are left to close from our side (which races with a request sent just then).
const SHUTDOWN_DRAIN: Duration = Duration::from_millis(200);
/// How long after closing its idle client connections a gateway stopping gracefully lets the
/// role go: the clients see the connections closed (and stop picking them) before the peer's
/// gratuitous ARP moves them. A connection a client still held then would reach the peer, which
/// knows nothing of it, and be reset under the client's next request.
const SHUTDOWN_IDLE_CLOSED: Duration = Duration::from_millis(50);
/// How long a gateway whose hand-over failed (the preferred peer never took the role, e.g. it
/// can't reach Redis) refuses to hand over again: else the role would bounce every yield.
const HAND_OVER_BACKOFF: Duration = Duration::from_secs(30);

/// A count of workers this gateway can send to right now (from its health view).
pub type HealthyCount = std::sync::Arc<dyn Fn() -> usize + Send + Sync>;

/// What the admin API and metrics show about the pair.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FailoverStatus {
    /// This gateway's id.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// The epoch of the lease it holds (active) or last saw.
    pub epoch: u64,
    /// Whether the floating address is on this host.
    pub holds_address: bool,
    /// Whether the last lease call reached Redis.
    pub redis_reachable: bool,
    /// The peer as last heard.
    pub peer: PeerStatus,
    /// Transitions since start.
    pub transitions: u64,
    /// The latest transition.
    pub last_transition: Option<Transition>,
}

/// The peer, as seen from here.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct PeerStatus {
    /// Its id, once heard.
    pub id: Option<String>,
    /// Its role, as it last said.
    pub role: Option<Role>,
    /// Heard from within the peer timeout.
    pub reachable: bool,
    /// Milliseconds since its last heartbeat.
    pub last_heard_ms: Option<u64>,
    /// Workers it said it can send to.
    pub healthy_workers: usize,
}

/// One role change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Transition {
    /// Role before.
    pub from: Role,
    /// Role after.
    pub to: Role,
    /// Why, in words.
    pub reason: String,
    /// Epoch after.
    pub epoch: u64,
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// The peer as the decisions need it.
#[derive(Debug, Clone, Default)]
struct PeerView {
    last: Option<(Heartbeat, Instant)>,
    /// The lease the peer held when its process was seen to stop.
    died_holding: Option<Lease>,
}

impl PeerView {
    fn fresh(&self, now: Instant, timeout: Duration) -> Option<&Heartbeat> {
        self.last
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) < timeout)
            .map(|(heartbeat, _)| heartbeat)
    }
}

/// Whether a standby should try for the lease now, and with which peer lease it may take over.
/// `None`: don't try. `Some(None)`: try if the lease is free. `Some(Some(l))`: try, and take
/// over `l` too (its holder's process was seen to stop).
fn standby_attempt(
    peer: &PeerView,
    now: Instant,
    peer_timeout: Duration,
    healthy: usize,
    yield_until: Option<Instant>,
) -> Option<Option<Lease>> {
    // A dead active's exact lease first, even while yielding: the yield lets a live preferred
    // peer win the race, and that peer has just died holding the role.
    if let Some(lease) = &peer.died_holding {
        return Some(Some(lease.clone()));
    }
    if yield_until.is_some_and(|until| now < until) {
        return None;
    }
    match peer.fresh(now, peer_timeout) {
        // A live active peer: never compete with it.
        Some(heartbeat) if heartbeat.role == Role::Active => None,
        // Both standby: let the one that can serve take the role.
        Some(heartbeat) if healthy == 0 && heartbeat.healthy_workers > 0 => None,
        // No active in sight: try; the lease decides, so at most one wins.
        _ => Some(None),
    }
}

/// Whether the active should hand the role to its preferred peer that asks for it.
fn should_hand_over(config: &FailoverConfig, heartbeat: &Heartbeat) -> bool {
    config.preempt && !config.preferred && heartbeat.wants_active && heartbeat.healthy_workers > 0
}

/// The gateway's side of the pair.
pub struct Node {
    /// Cancelled on shutdown when clients' idle connections should close: before the role
    /// goes to a ready peer (whose gratuitous ARP moves the address), else before the address
    /// leaves this host.
    address_leaving: tokio_util::sync::CancellationToken,
    id: String,
    config: FailoverConfig,
    leases: LeaseStore,
    address: Option<FloatingAddress>,
    healthy: HealthyCount,
    status: watch::Sender<FailoverStatus>,
    outgoing: watch::Sender<Heartbeat>,
    role: Role,
    lease: Option<Lease>,
    last_epoch: u64,
    holds_address: bool,
    /// The gratuitous ARP of our latest claim, while it runs; dropped when we give the role up.
    announcement: Option<Announcement>,
    peer: PeerView,
    yield_until: Option<Instant>,
    /// After a hand-over: when to take the address off this host.
    release_address_at: Option<Instant>,
    /// A hand-over is under way: the preferred peer hasn't reported itself active yet.
    handing_over: bool,
    /// After a failed hand-over: no new one before then.
    no_hand_over_until: Option<Instant>,
    healthy_since: Option<Instant>,
    last_refresh: Option<Instant>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("lease", &self.lease)
            .finish()
    }
}

impl Node {
    /// A node named `id` that starts as standby.
    pub fn new(
        id: String,
        config: FailoverConfig,
        leases: LeaseStore,
        healthy: HealthyCount,
        status: watch::Sender<FailoverStatus>,
        outgoing: watch::Sender<Heartbeat>,
    ) -> Self {
        let address = config.address.clone().map(FloatingAddress::new);
        Node {
            address_leaving: tokio_util::sync::CancellationToken::new(),
            id,
            config,
            leases,
            address,
            healthy,
            status,
            outgoing,
            role: Role::Standby,
            lease: None,
            announcement: None,
            last_epoch: 0,
            holds_address: false,
            peer: PeerView::default(),
            yield_until: None,
            release_address_at: None,
            handing_over: false,
            no_hand_over_until: None,
            healthy_since: None,
            last_refresh: None,
        }
    }

    /// See [`Node::address_leaving`]: cancelled on shutdown when the address is about to leave.
    pub fn address_leaving(&self) -> tokio_util::sync::CancellationToken {
        self.address_leaving.clone()
    }

    /// Runs until `shutdown`, then gives up the address and the lease if held.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<PeerEvent>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        if let Some(address) = &self.address {
            address.prepare_host();
            // An address left by an earlier run of ours that died must not linger.
            if let Err(error) = address.release().await {
                warn!(%error, "cannot remove a stale floating address");
            }
        }
        let mut ticks = tokio::time::interval(self.config.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.run_until(&mut ticks, &mut events, shutdown).await;
        if self.role == Role::Active && self.peer_can_take_over(Instant::now()) {
            // Still the active, serving as before, while the connections in use drain; then
            // the idle rest is closed while the address is only ours.
            let drained = tokio::time::sleep(SHUTDOWN_DRAIN);
            self.run_until(&mut ticks, &mut events, drained).await;
            self.address_leaving.cancel();
            let seen_closed = tokio::time::sleep(SHUTDOWN_IDLE_CLOSED);
            self.run_until(&mut ticks, &mut events, seen_closed).await;
        }
        if self.role == Role::Active && self.peer_can_take_over(Instant::now()) {
            self.hand_over_on_shutdown(&mut events).await;
        }
        self.address_leaving.cancel();
        // Stepping down on shutdown: say so on the peer link first, so the standby stops
        // deferring to us at its next tick instead of when our process is gone.
        if self.role == Role::Active {
            self.transition(Role::Standby, "shutting down".into());
        }
        if self.holds_address || self.address.is_some() {
            self.drop_address().await;
        }
        if let Some(lease) = self.lease.take() {
            let _ = self.leases.release(&lease).await;
        }
        info!(gateway = %self.id, "failover: stopped, address and lease released");
    }

    /// Does the node's work (lease and address at every tick, the peer's heartbeats as they come)
    /// until `until` completes.
    async fn run_until(
        &mut self,
        ticks: &mut tokio::time::Interval,
        events: &mut mpsc::Receiver<PeerEvent>,
        until: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => return,
                _ = ticks.tick() => self.tick(Instant::now()).await,
                Some(event) = events.recv() => {
                    let urgent = matches!(event, PeerEvent::Closed { .. });
                    self.on_peer_event(event, Instant::now()).await;
                    // A peer that just died is acted on now, not at the next tick.
                    if urgent {
                        self.tick(Instant::now()).await;
                    }
                }
            }
        }
    }

    /// Whether the peer is heard, standby and able to serve (it has healthy workers).
    fn peer_can_take_over(&self, now: Instant) -> bool {
        self.peer
            .fresh(now, self.config.peer_timeout)
            .is_some_and(|heartbeat| {
                heartbeat.role == Role::Standby && heartbeat.healthy_workers > 0
            })
    }

    /// A graceful stop of the active, with a standby ready, after its idle client connections
    /// were closed: the failback path. Release the lease, keep serving on the address (the
    /// caller keeps accepting) until the peer says it is active, then linger while its
    /// announcements move the clients. At most
    /// [`SHUTDOWN_HAND_OVER`] plus the linger; without an answer the caller drops the address
    /// as before.
    async fn hand_over_on_shutdown(&mut self, events: &mut mpsc::Receiver<PeerEvent>) {
        let started = Instant::now();
        self.hand_over(started, "handing over to the standby (graceful stop)")
            .await;
        if self.role == Role::Active {
            // The lease could not be released (Redis away): nobody can take over anyway.
            return;
        }
        let deadline = started + SHUTDOWN_HAND_OVER;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(PeerEvent::Heartbeat(heartbeat, at))) => {
                    let took_over =
                        heartbeat.role == Role::Active && heartbeat.epoch > self.last_epoch;
                    if took_over {
                        self.last_epoch = heartbeat.epoch;
                    }
                    self.peer.last = Some((heartbeat, at));
                    self.publish(Instant::now());
                    if took_over {
                        info!(gateway = %self.id, "failover: the peer took the role over; lingering on the address");
                        tokio::time::sleep(HAND_OVER_LINGER).await;
                        return;
                    }
                }
                Ok(Some(PeerEvent::Closed { .. }) | None) | Err(_) => {
                    warn!(gateway = %self.id, "failover: the peer did not take the role over in time; dropping the address");
                    return;
                }
            }
        }
    }

    async fn on_peer_event(&mut self, event: PeerEvent, now: Instant) {
        match event {
            PeerEvent::Heartbeat(heartbeat, at) => {
                self.peer.died_holding = None;
                let newer = heartbeat.role == Role::Active && heartbeat.epoch > self.last_epoch;
                if newer {
                    // A hand-over of ours, if any, is complete: the peer has the role.
                    self.handing_over = false;
                }
                if newer && self.role == Role::Active {
                    let reason = format!(
                        "peer {} is active with newer epoch {}",
                        heartbeat.id, heartbeat.epoch
                    );
                    self.last_epoch = heartbeat.epoch;
                    self.step_down(reason).await;
                } else if newer && self.holds_address && self.release_address_at.is_none() {
                    // We handed over and the peer has the role: let its announcements move every
                    // client before the address leaves this host.
                    self.last_epoch = heartbeat.epoch;
                    self.release_address_at = Some(now + HAND_OVER_LINGER);
                } else if self.role == Role::Active
                    && should_hand_over(&self.config, &heartbeat)
                    && self.no_hand_over_until.is_none_or(|until| now >= until)
                {
                    self.hand_over(now, "handing over to the preferred peer (preempt)")
                        .await;
                } else if newer {
                    // A standby shows (and tells its peer) the epoch it last saw.
                    self.last_epoch = heartbeat.epoch;
                }
                self.peer.last = Some((heartbeat, at));
            }
            PeerEvent::Closed { last } => {
                if last.role == Role::Active {
                    info!(peer = %last.id, epoch = last.epoch, "failover: active peer's link closed");
                    self.peer.died_holding = Some(Lease {
                        holder: last.id.clone(),
                        epoch: last.epoch,
                    });
                }
                // Whatever it said last is no longer true.
                self.peer.last = None;
            }
        }
    }

    async fn tick(&mut self, now: Instant) {
        let healthy = (self.healthy)();
        self.healthy_since = match (healthy > 0, self.healthy_since) {
            (true, None) => Some(now),
            (true, since) => since,
            (false, _) => None,
        };
        if self
            .release_address_at
            .is_some_and(|at| now >= at && self.role == Role::Standby)
        {
            self.release_address_at = None;
            self.drop_address().await;
        }
        match self.role {
            Role::Active => self.tick_active(now).await,
            Role::Standby => self.tick_standby(now, healthy).await,
        }
        self.send_heartbeat(now, healthy);
        self.publish(now);
    }

    async fn tick_active(&mut self, now: Instant) {
        let Some(lease) = self.lease.clone() else {
            return;
        };
        match self.leases.renew(&lease).await {
            Ok(LeaseOutcome::Held(_)) => self.set_redis(true),
            Ok(LeaseOutcome::HeldBy(other)) => {
                self.set_redis(true);
                self.last_epoch = self.last_epoch.max(other.epoch);
                self.step_down(format!(
                    "lease taken by {} with epoch {}",
                    other.holder, other.epoch
                ))
                .await;
                return;
            }
            Ok(LeaseOutcome::Free) => {
                // Our lease lapsed (a stall longer than its TTL) and nobody took it: take it again.
                self.set_redis(true);
                match self.leases.acquire(&self.id, None, self.last_epoch).await {
                    Ok(LeaseOutcome::Held(fresh)) => {
                        warn!(gateway = %self.id, epoch = fresh.epoch, "failover: lease had lapsed; re-acquired");
                        self.last_epoch = fresh.epoch;
                        self.lease = Some(fresh);
                    }
                    Ok(LeaseOutcome::HeldBy(other)) => {
                        self.step_down(format!("lease lapsed and {} took it", other.holder))
                            .await;
                        return;
                    }
                    Ok(LeaseOutcome::Free) | Err(_) => {}
                }
            }
            // Redis away: keep serving. Nobody can take the lease while it is away either.
            Err(error) => {
                if self.redis_reachable() {
                    warn!(%error, "failover: cannot renew the lease; still active while Redis is away");
                }
                self.set_redis(false);
            }
        }
        let refresh_due = self
            .last_refresh
            .is_none_or(|at| now.saturating_duration_since(at) >= ADDRESS_REFRESH);
        if refresh_due {
            if let Some(address) = &self.address
                && let Err(error) = address.refresh().await
            {
                warn!(%error, "failover: cannot refresh the floating address");
            }
            self.last_refresh = Some(now);
        }
    }

    async fn tick_standby(&mut self, now: Instant, healthy: usize) {
        let Some(take_over) = standby_attempt(
            &self.peer,
            now,
            self.config.peer_timeout,
            healthy,
            self.yield_until,
        ) else {
            return;
        };
        let peer_heard = self.peer.fresh(now, self.config.peer_timeout).is_some();
        let reason = match (&take_over, peer_heard) {
            (Some(lease), _) => format!("active peer {} stopped (its link closed)", lease.holder),
            (None, true) => {
                "no active gateway: the peer is standby and the lease is free".to_string()
            }
            (None, false) => "peer silent and the lease is free".to_string(),
        };
        match self
            .leases
            .acquire(&self.id, take_over.as_ref(), self.last_epoch)
            .await
        {
            Ok(LeaseOutcome::Held(lease)) => {
                self.set_redis(true);
                self.become_active(lease, reason).await;
            }
            Ok(LeaseOutcome::HeldBy(other)) => {
                self.set_redis(true);
                self.last_epoch = self.last_epoch.max(other.epoch);
                // The lease moved on since the peer died (it restarted, say): nothing to take over.
                self.peer.died_holding = None;
            }
            Ok(LeaseOutcome::Free) => self.set_redis(true),
            Err(_) => self.set_redis(false),
        }
    }

    async fn become_active(&mut self, lease: Lease, reason: String) {
        if std::mem::take(&mut self.handing_over) {
            warn!(gateway = %self.id, "failover: the preferred peer never took the role; no hand-over for a while");
            self.no_hand_over_until = Some(Instant::now() + HAND_OVER_BACKOFF);
        }
        self.release_address_at = None;
        self.last_epoch = lease.epoch;
        self.lease = Some(lease);
        self.peer.died_holding = None;
        self.yield_until = None;
        if let Some(address) = &self.address {
            match address.claim().await {
                Ok(announcement) => {
                    self.holds_address = true;
                    self.announcement = Some(announcement);
                }
                Err(error) => warn!(%error, "failover: cannot claim the floating address"),
            }
            self.last_refresh = Some(Instant::now());
        }
        self.transition(Role::Active, reason);
        self.run_role_hook();
    }

    async fn step_down(&mut self, reason: String) {
        self.lease = None;
        self.drop_address().await;
        self.transition(Role::Standby, reason);
        self.run_role_hook();
    }

    /// Gives the role to the peer (the preferred one, or the standby on a graceful stop) without a
    /// gap: release the lease, keep serving on the address until the peer reports itself active,
    /// and stay out of the race meanwhile.
    async fn hand_over(&mut self, now: Instant, reason: &str) {
        if let Some(lease) = self.lease.take()
            && let Err(error) = self.leases.release(&lease).await
        {
            warn!(%error, "failover: hand-over could not release the lease; staying active");
            self.lease = Some(lease);
            return;
        }
        // The address stays (we serve on it until the peer's announcements moved every client),
        // but our own announcements stop: a late one would pull clients back to us.
        self.announcement = None;
        self.yield_until = Some(now + HAND_OVER_YIELD);
        self.handing_over = true;
        self.transition(Role::Standby, reason.into());
        self.run_role_hook();
    }

    /// Starts the operator hook of the role just taken (`on_active` / `on_standby`), if any.
    fn run_role_hook(&self) {
        let hook = match self.role {
            Role::Active => &self.config.on_active,
            Role::Standby => &self.config.on_standby,
        };
        if let Some(hook) = hook {
            run_hook(
                hook,
                self.role.as_str(),
                self.last_epoch,
                &self.id,
                self.config.hook_timeout,
            );
        }
    }

    async fn drop_address(&mut self) {
        self.release_address_at = None;
        self.announcement = None;
        if let Some(address) = &self.address
            && let Err(error) = address.release().await
        {
            warn!(%error, "failover: cannot remove the floating address");
        }
        self.holds_address = false;
    }

    fn transition(&mut self, to: Role, reason: String) {
        let from = self.role;
        self.role = to;
        info!(
            gateway = %self.id,
            from = from.as_str(),
            to = to.as_str(),
            epoch = self.last_epoch,
            reason = %reason,
            "failover: role changed"
        );
        let at_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.status.send_modify(|status| {
            status.role = to;
            status.epoch = self.last_epoch;
            status.transitions += 1;
            status.last_transition = Some(Transition {
                from,
                to,
                reason,
                epoch: self.last_epoch,
                at_unix_ms,
            });
        });
        self.send_heartbeat(Instant::now(), (self.healthy)());
    }

    fn send_heartbeat(&self, now: Instant, healthy: usize) {
        let peer_active = self
            .peer
            .fresh(now, self.config.peer_timeout)
            .is_some_and(|heartbeat| heartbeat.role == Role::Active);
        let warmed_up = self
            .healthy_since
            .is_some_and(|since| now.saturating_duration_since(since) >= self.config.preempt_delay);
        let wants_active = self.config.preempt
            && self.config.preferred
            && self.role == Role::Standby
            && peer_active
            && warmed_up;
        self.outgoing.send_replace(Heartbeat {
            id: self.id.clone(),
            role: self.role,
            epoch: self.last_epoch,
            healthy_workers: healthy,
            wants_active,
        });
    }

    fn set_redis(&self, reachable: bool) {
        self.status.send_if_modified(|status| {
            let changed = status.redis_reachable != reachable;
            status.redis_reachable = reachable;
            changed
        });
    }

    fn redis_reachable(&self) -> bool {
        self.status.borrow().redis_reachable
    }

    fn publish(&self, now: Instant) {
        let peer = match &self.peer.last {
            Some((heartbeat, at)) => PeerStatus {
                id: Some(heartbeat.id.clone()),
                role: Some(heartbeat.role),
                reachable: now.saturating_duration_since(*at) < self.config.peer_timeout,
                last_heard_ms: Some(
                    u64::try_from(now.saturating_duration_since(*at).as_millis())
                        .unwrap_or(u64::MAX),
                ),
                healthy_workers: heartbeat.healthy_workers,
            },
            None => PeerStatus::default(),
        };
        self.status.send_modify(|status| {
            status.role = self.role;
            status.epoch = self.last_epoch;
            status.holds_address = self.holds_address;
            status.peer = peer;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(role: Role, healthy: usize) -> Heartbeat {
        Heartbeat {
            id: "gw2".into(),
            role,
            epoch: 3,
            healthy_workers: healthy,
            wants_active: false,
        }
    }

    const TIMEOUT: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn a_standby_never_competes_with_a_live_active_peer() {
        let now = Instant::now();
        let peer = PeerView {
            last: Some((heartbeat(Role::Active, 2), now)),
            died_holding: None,
        };
        assert_eq!(standby_attempt(&peer, now, TIMEOUT, 2, None), None);
        // Still heard 499 ms ago: still alive.
        assert_eq!(
            standby_attempt(&peer, now + Duration::from_millis(499), TIMEOUT, 2, None),
            None
        );
        // Silent for the timeout: try, and let Redis decide (no take-over of its lease).
        assert_eq!(
            standby_attempt(&peer, now + TIMEOUT, TIMEOUT, 2, None),
            Some(None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_peers_exact_lease_may_be_taken_over_at_once() {
        let now = Instant::now();
        let lease = Lease {
            holder: "gw2".into(),
            epoch: 3,
        };
        let peer = PeerView {
            last: None,
            died_holding: Some(lease.clone()),
        };
        assert_eq!(
            standby_attempt(&peer, now, TIMEOUT, 0, None),
            Some(Some(lease.clone()))
        );
        // Also right after handing the role over to it: it took the role and died.
        let yielding = Some(now + Duration::from_secs(2));
        assert_eq!(
            standby_attempt(&peer, now, TIMEOUT, 1, yielding),
            Some(Some(lease))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_yielding_gateway_stays_out_and_the_healthier_standby_goes_first() {
        let now = Instant::now();
        let silent = PeerView::default();
        let later = now + Duration::from_secs(1);
        assert_eq!(standby_attempt(&silent, now, TIMEOUT, 1, Some(later)), None);
        assert_eq!(
            standby_attempt(&silent, later, TIMEOUT, 1, Some(later)),
            Some(None)
        );
        let healthy_standby_peer = PeerView {
            last: Some((heartbeat(Role::Standby, 3), now)),
            died_holding: None,
        };
        assert_eq!(
            standby_attempt(&healthy_standby_peer, now, TIMEOUT, 0, None),
            None
        );
        assert_eq!(
            standby_attempt(&healthy_standby_peer, now, TIMEOUT, 1, None),
            Some(None)
        );
    }

    fn standby_node() -> (Node, watch::Receiver<Heartbeat>) {
        let redis = herd_shared::redis::RedisConfig {
            url: "redis://127.0.0.1:1/0".into(),
            ..herd_shared::redis::RedisConfig::default()
        };
        let leases = LeaseStore::new(
            redis.pool().unwrap(),
            &herd_shared::keys::Keys::new("test:"),
            Duration::from_millis(700),
        );
        let (status, _) = watch::channel(FailoverStatus {
            id: "gw1".into(),
            role: Role::Standby,
            epoch: 0,
            holds_address: false,
            redis_reachable: true,
            peer: PeerStatus::default(),
            transitions: 0,
            last_transition: None,
        });
        let (outgoing, outgoing_rx) = watch::channel(heartbeat(Role::Standby, 0));
        let healthy: HealthyCount = std::sync::Arc::new(|| 1);
        let node = Node::new(
            "gw1".into(),
            FailoverConfig::default(),
            leases,
            healthy,
            status,
            outgoing,
        );
        (node, outgoing_rx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_shows_the_epoch_of_the_active_it_hears() {
        let (mut node, outgoing) = standby_node();
        let mut active = heartbeat(Role::Active, 2);
        active.epoch = 9;
        let now = Instant::now();
        node.on_peer_event(PeerEvent::Heartbeat(active, now), now)
            .await;
        node.tick(now).await;
        assert_eq!(node.role, Role::Standby);
        assert_eq!(node.status.borrow().epoch, 9);
        assert_eq!(outgoing.borrow().epoch, 9);
    }

    #[tokio::test]
    async fn a_failed_hand_over_is_not_repeated_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let server = herd::redis_server::RedisServer::start(None, dir.path(), dir.path()).unwrap();
        let redis = herd_shared::redis::RedisConfig {
            url: server.url(),
            ..herd_shared::redis::RedisConfig::default()
        };
        let config = FailoverConfig {
            preempt: true,
            ..FailoverConfig::default()
        };
        let leases = LeaseStore::new(
            redis.pool().unwrap(),
            &herd_shared::keys::Keys::new("hand-over-test:"),
            config.lease_ttl,
        );
        let (mut node, _outgoing) = standby_node();
        node.config = config;
        node.leases = leases;
        let standby = |wants_active| {
            let mut peer = heartbeat(Role::Standby, 2);
            peer.wants_active = wants_active;
            PeerEvent::Heartbeat(peer, Instant::now())
        };
        node.tick(Instant::now()).await;
        assert_eq!(node.role, Role::Active);
        // The preferred peer asks; we hand over.
        node.on_peer_event(standby(true), Instant::now()).await;
        assert_eq!(node.role, Role::Standby);
        // It never takes the role (it can't reach Redis, say): after the yield we take it back.
        tokio::time::sleep(HAND_OVER_YIELD + Duration::from_millis(50)).await;
        node.on_peer_event(standby(false), Instant::now()).await;
        node.tick(Instant::now()).await;
        assert_eq!(node.role, Role::Active);
        // It asks again at once: no second round of the same.
        node.on_peer_event(standby(true), Instant::now()).await;
        assert_eq!(node.role, Role::Active, "the role bounces every yield");
        assert_eq!(node.status.borrow().transitions, 3);
    }

    #[test]
    fn hand_over_only_with_preempt_to_a_healthy_asking_peer() {
        let mut config = FailoverConfig {
            preempt: true,
            ..FailoverConfig::default()
        };
        let mut asking = heartbeat(Role::Standby, 2);
        asking.wants_active = true;
        assert!(should_hand_over(&config, &asking));
        assert!(!should_hand_over(&config, &heartbeat(Role::Standby, 2)));
        asking.healthy_workers = 0;
        assert!(!should_hand_over(&config, &asking));
        asking.healthy_workers = 2;
        config.preempt = false;
        assert!(!should_hand_over(&config, &asking));
        config.preempt = true;
        config.preferred = true;
        assert!(
            !should_hand_over(&config, &asking),
            "the preferred one never yields"
        );
    }
}
