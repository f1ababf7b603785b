//! Membership from Redis: workers that register themselves, and their join / drain / leave notices.
//!
//! Two sources, because each covers the other's gap:
//! - the `{prefix}events` channel tells us at once when a worker joins, drains or leaves;
//! - a full read of the `{prefix}worker:*` entries every `poll_interval` catches missed notices
//!   (the subscription was down) and entries that expired (a worker killed without a goodbye).
//!
//! An entry missing from a read is removed only after it has stayed missing for
//! `missing_grace`, so a Redis restart that lost every entry (workers re-register at their next
//! heartbeat) does not empty the table. When Redis is unreachable, nothing is removed: the gateway
//! keeps the membership it knows and keeps serving.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use herd_shared::keys::Keys;
use herd_shared::redis::{RedisConfig, RedisConnection, RedisPool};
use herd_shared::registry::{Event, WorkerRecord, WorkerState};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::worker::{Origin, WorkerSpec};
use super::{Balancer, ChangeSource, Table};
use crate::config::RegistryConfig;

/// Why reading the registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connection (Redis down or too slow).
    #[error("{0}")]
    Connect(#[from] herd_shared::redis::ConnectError),
    /// A command failed.
    #[error("Redis command failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// The whole read took too long.
    #[error("Redis did not answer in time")]
    Timeout,
}

/// Reads every registry entry (SCAN + HGETALL in one pipeline). Unreadable entries are skipped.
/// On a cluster the entries are spread over the masters: each master is scanned, and each entry
/// read from its own slot.
pub async fn fetch(pool: &RedisPool, keys: &Keys) -> Result<Vec<WorkerRecord>, RegistryError> {
    let mut conn = pool.get().await?;
    let mut names: Vec<String> = Vec::new();
    let cluster = match &mut conn {
        RedisConnection::Cluster(cluster) => Some(cluster.clone()),
        RedisConnection::Single(_) => None,
    };
    match cluster {
        None => scan(Target::Single(&mut conn), keys, &mut names).await?,
        Some(mut cluster) => {
            for (host, port) in masters(&mut cluster).await? {
                let route =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                scan(Target::Node(&mut cluster, route), keys, &mut names).await?;
            }
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let hashes: Vec<HashMap<String, String>> = if pool.is_cluster() {
        // One slot per entry: the cluster client sends these concurrently on its multiplexed
        // connections.
        let reads = names.iter().map(|name| {
            let mut conn = conn_clone(&conn);
            async move {
                redis::cmd("HGETALL")
                    .arg(name)
                    .query_async::<HashMap<String, String>>(&mut conn)
                    .await
            }
        });
        futures_util::future::try_join_all(reads).await?
    } else {
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("HGETALL").arg(name);
        }
        pipe.query_async(&mut conn).await?
    };
    let mut records = Vec::with_capacity(hashes.len());
    for (name, fields) in names.iter().zip(hashes) {
        if fields.is_empty() {
            continue; // expired between SCAN and HGETALL
        }
        match WorkerRecord::from_fields(&fields) {
            Ok(record) => records.push(record),
            Err(error) => warn!(key = %name, error = %error, "unreadable registry entry skipped"),
        }
    }
    Ok(records)
}

/// A second handle on the same connection (cluster handles are cheap clones).
fn conn_clone(conn: &RedisConnection) -> ClusterConnection {
    match conn {
        RedisConnection::Cluster(cluster) => cluster.clone(),
        RedisConnection::Single(_) => unreachable!("only called on a cluster"),
    }
}

/// Where a SCAN runs: the one Redis, or one node of a cluster.
enum Target<'a> {
    Single(&'a mut RedisConnection),
    Node(&'a mut ClusterConnection, RoutingInfo),
}

/// SCANs one server for registry entries.
async fn scan(
    mut target: Target<'_>,
    keys: &Keys,
    names: &mut Vec<String>,
) -> Result<(), RegistryError> {
    let mut cursor: u64 = 0;
    // Bounded: a SCAN over a keyspace of any size ends; the cap only guards a broken server.
    for _ in 0..100_000 {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(keys.worker_pattern())
            .arg("COUNT")
            .arg(200);
        let reply = match &mut target {
            Target::Single(conn) => cmd.query_async::<redis::Value>(&mut **conn).await?,
            Target::Node(cluster, route) => cluster.route_command(cmd, route.clone()).await?,
        };
        let (next, batch): (u64, Vec<String>) =
            redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
        names.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(())
}

/// `(host, port)` of every master, from `CLUSTER SLOTS`.
async fn masters(cluster: &mut ClusterConnection) -> Result<Vec<(String, u16)>, RegistryError> {
    let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(cluster)
        .await?;
    let mut masters = Vec::new();
    for range in slots {
        // [start, end, [host, port, id, ...], replicas...]
        let Some(master) = range.into_iter().nth(2) else {
            continue;
        };
        let Ok((host, port)): Result<(String, u16), _> = redis::from_redis_value(match master {
            redis::Value::Array(mut fields) if fields.len() >= 2 => {
                fields.truncate(2);
                redis::Value::Array(fields)
            }
            other => other,
        }) else {
            continue;
        };
        if !masters.contains(&(host.clone(), port)) {
            masters.push((host, port));
        }
    }
    Ok(masters)
}

/// Applies registry knowledge to the balancer; keeps what it needs between reads.
#[derive(Debug)]
pub struct Reconciler {
    balancer: Arc<Balancer>,
    missing_grace: Duration,
    /// When a registered worker was first seen missing from a full read.
    missing_since: HashMap<String, Instant>,
    /// Address of each id seen, so notices about a worker that is also listed statically (by
    /// address) reach its entry.
    addr_of: HashMap<String, String>,
    /// Records as the last full read applied them. Every worker rewrites its entry at each
    /// heartbeat, so a full read finds the same thousand records again and again; applying one
    /// again changes nothing as long as nothing else touched membership since. So an unchanged
    /// record is skipped, unless an event arrived or the table changed (admin API, expiry) in
    /// between, which empties this.
    applied: HashMap<String, WorkerRecord>,
    /// The table as the last full read left it (weak: only its identity is needed).
    applied_to: Weak<Table>,
}

impl Reconciler {
    /// A reconciler for `balancer`.
    pub fn new(balancer: Arc<Balancer>, missing_grace: Duration) -> Self {
        Reconciler {
            balancer,
            missing_grace,
            missing_since: HashMap::new(),
            addr_of: HashMap::new(),
            applied: HashMap::new(),
            applied_to: Weak::new(),
        }
    }

    /// Brings the table in line with a full read of the registry.
    pub fn sync(&mut self, records: &[WorkerRecord]) {
        let present: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        if !std::ptr::eq(
            self.applied_to.as_ptr(),
            Arc::as_ptr(&self.balancer.workers()),
        ) {
            self.applied.clear();
        }
        // Records no longer present are forgotten, so one that comes back is applied again.
        self.applied.retain(|id, _| present.contains(id.as_str()));
        for record in records {
            if !self.missing_since.is_empty() {
                self.missing_since.remove(&record.id);
            }
            if self.applied.get(&record.id) == Some(record) {
                continue;
            }
            self.apply(record);
            self.applied.insert(record.id.clone(), record.clone());
        }
        let now = Instant::now();
        for worker in self.balancer.workers().workers.iter() {
            if !matches!(worker.spec.origin, Origin::Registry { .. })
                || present.contains(worker.id())
            {
                continue;
            }
            let since = *self
                .missing_since
                .entry(worker.id().to_string())
                .or_insert(now);
            if now.duration_since(since) >= self.missing_grace {
                self.missing_since.remove(worker.id());
                let _ = self.balancer.remove(
                    worker.id(),
                    ChangeSource::Registry,
                    "registry entry expired",
                );
            }
        }
        self.missing_since
            .retain(|id, _| self.balancer.find(id).is_some());
        self.applied_to = Arc::downgrade(&self.balancer.workers());
    }

    /// Applies one notice.
    pub fn event(&mut self, event: Event) {
        // A notice may change what a record would do (a drain flag, a worker gone): the next
        // full read applies every record again.
        self.applied.clear();
        match event {
            Event::Join { worker } => {
                self.missing_since.remove(&worker.id);
                self.apply(&worker);
            }
            Event::Drain { id } => {
                if let Some(worker) = self.lookup(&id) {
                    self.balancer
                        .registry_drain(&worker, true, "worker announced draining");
                }
            }
            Event::Leave { id } => {
                if let Some(worker) = self.balancer.find(&id)
                    && matches!(worker.spec.origin, Origin::Registry { .. })
                {
                    let _ = self
                        .balancer
                        .remove(&id, ChangeSource::Registry, "worker left");
                } else if let Some(worker) = self.lookup(&id) {
                    // A statically listed worker leaving: stop sending; active checks take over.
                    self.balancer.registry_drain(&worker, true, "worker left");
                }
            }
        }
    }

    /// The worker an id refers to: by id, or the static entry with its address.
    fn lookup(&self, id: &str) -> Option<Arc<super::Worker>> {
        self.balancer.find(id).or_else(|| {
            let addr = self.addr_of.get(id)?;
            self.balancer.find(addr)
        })
    }

    fn apply(&mut self, record: &WorkerRecord) {
        self.addr_of.insert(record.id.clone(), record.addr.clone());
        let draining = record.state == WorkerState::Draining;
        let origin = Origin::Registry {
            started_ms: record.started_ms,
        };
        if let Some(worker) = self.balancer.find(&record.id) {
            let same = worker.spec.origin == origin && worker.spec.addr == record.addr;
            if same || worker.spec.origin == Origin::Static {
                worker.set_weight(record.weight);
                let reason = if draining {
                    "registry entry says draining"
                } else {
                    "registry entry says ready"
                };
                self.balancer.registry_drain(&worker, draining, reason);
                return;
            }
            // Same id, new incarnation (restarted, maybe elsewhere): replace the entry.
            let _ = self.balancer.remove(
                &record.id,
                ChangeSource::Registry,
                "re-registered as a new incarnation",
            );
        }
        if let Some(worker) = self.balancer.find(&record.addr)
            && worker.spec.origin == Origin::Static
        {
            // Listed statically too: the registry only adds its drain notices.
            let reason = if draining {
                "registry entry says draining"
            } else {
                "registry entry says ready"
            };
            self.balancer.registry_drain(&worker, draining, reason);
            return;
        }
        if draining {
            return; // never add a worker that is on its way out
        }
        let spec = WorkerSpec {
            id: record.id.clone(),
            addr: record.addr.clone(),
            machine: record.machine.clone(),
            weight: record.weight,
            origin,
        };
        match self.balancer.add(spec) {
            Ok(_) => {}
            Err(super::MembershipError::Removed(id)) => {
                debug!(worker = %id, "registered worker ignored: removed by an operator");
            }
            Err(error) => warn!(worker = %record.id, error = %error, "registered worker not added"),
        }
    }
}

/// Follows the registry until `shutdown` fires. Never gives up: Redis outages are logged once and
/// retried every `reconnect_delay`.
pub async fn run(
    balancer: Arc<Balancer>,
    pool: Result<RedisPool, redis::RedisError>,
    redis_config: RedisConfig,
    config: RegistryConfig,
    shutdown: CancellationToken,
) {
    let keys = redis_config.keys();
    let channel = keys.events();
    // The pool comes from the caller: with `[sentinel]` it follows the master as it moves.
    let pool = match pool {
        Ok(pool) => pool,
        Err(error) => {
            warn!(error = %error, "registry disabled: bad Redis settings");
            return;
        }
    };
    // Notices are plain PUBLISHes, which a Redis Cluster forwards to every node: subscribing on
    // any one node hears them all. On a cluster the subscription moves to the next seed
    // whenever it breaks (that node died or was cut off). With Sentinel the subscription stays
    // on `redis.url` (the first master): a demoted master still hears PUBLISHes through
    // replication, and a dead one leaves the poll, which follows the master, to find changes.
    let urls = if redis_config.is_cluster() {
        redis_config.cluster.clone()
    } else {
        vec![redis_config.url.clone()]
    };
    let mut clients = Vec::with_capacity(urls.len());
    for url in &urls {
        match redis::Client::open(url.as_str()) {
            Ok(client) => clients.push(client),
            Err(error) => {
                warn!(error = %error, "registry disabled: bad Redis URL");
                return;
            }
        }
    }
    let mut attempt = 0usize;
    let read_timeout = redis_config.connect_timeout + redis_config.command_timeout * 2;
    let mut reconciler = Reconciler::new(balancer, config.missing_grace);
    let mut outage = false;
    let poll = async |reconciler: &mut Reconciler, outage: &mut bool| match tokio::time::timeout(
        read_timeout,
        fetch(&pool, &keys),
    )
    .await
    {
        Ok(Ok(records)) => {
            reconciler
                .balancer
                .notifier()
                .events()
                .registry_redis(true, "the registry answered");
            if *outage {
                info!(workers = records.len(), "registry reachable again");
                *outage = false;
            }
            reconciler.sync(&records);
        }
        Ok(Err(error)) => note_outage(&reconciler.balancer, outage, &error),
        Err(_) => note_outage(&reconciler.balancer, outage, &RegistryError::Timeout),
    };

    while !shutdown.is_cancelled() {
        let client = &clients[attempt % clients.len()];
        attempt = attempt.wrapping_add(1);
        let subscribed = tokio::time::timeout(read_timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let mut pubsub = match subscribed {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                note_outage(
                    &reconciler.balancer,
                    &mut outage,
                    &RegistryError::Redis(error),
                );
                poll(&mut reconciler, &mut outage).await;
                wait(&shutdown, config.reconnect_delay).await;
                continue;
            }
            Err(_) => {
                note_outage(&reconciler.balancer, &mut outage, &RegistryError::Timeout);
                wait(&shutdown, config.reconnect_delay).await;
                continue;
            }
        };
        debug!(channel = %channel, "subscribed to registry events");
        // Subscribed first, read second: nothing announced in between is lost.
        poll(&mut reconciler, &mut outage).await;
        let mut ticker = tokio::time::interval(config.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else {
                        warn!("registry events subscription lost; reconnecting");
                        break;
                    };
                    let payload: String = match message.get_payload() {
                        Ok(payload) => payload,
                        Err(error) => {
                            warn!(error = %error, "unreadable registry event skipped");
                            continue;
                        }
                    };
                    match Event::from_json(&payload) {
                        Ok(event) => {
                            debug!(event = %payload, "registry event");
                            reconciler.event(event);
                        }
                        Err(error) => warn!(error = %error, payload = %payload, "unknown registry event skipped"),
                    }
                }
                _ = ticker.tick() => poll(&mut reconciler, &mut outage).await,
                _ = shutdown.cancelled() => return,
            }
        }
        drop(messages);
        wait(&shutdown, config.reconnect_delay).await;
    }
}

fn note_outage(balancer: &Balancer, outage: &mut bool, error: &RegistryError) {
    balancer
        .notifier()
        .events()
        .registry_redis(false, &error.to_string());
    if !*outage {
        warn!(error = %error, "registry unreachable; keeping the known workers");
        *outage = true;
    } else {
        debug!(error = %error, "registry still unreachable");
    }
}

async fn wait(shutdown: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::Status;
    use crate::config::GatewayConfig;
    use crate::metrics::Metrics;

    fn record(id: &str, port: u16, state: WorkerState) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            addr: format!("127.0.0.1:{port}"),
            machine: "m".into(),
            weight: 100,
            version: "1".into(),
            started_ms: 1,
            state,
        }
    }

    fn reconciler(statics: &[&str]) -> Reconciler {
        let balancer = Arc::new(Balancer::new(
            &GatewayConfig::default(),
            Arc::new(Metrics::new()),
            Box::new(|_, _| {}),
        ));
        for addr in statics {
            balancer.add(balancer.static_spec(addr)).unwrap();
        }
        Reconciler::new(balancer, Duration::from_secs(2))
    }

    fn ids(r: &Reconciler) -> Vec<String> {
        r.balancer
            .workers()
            .workers
            .iter()
            .map(|w| w.id().to_string())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn join_drain_leave() {
        let mut r = reconciler(&[]);
        r.event(Event::Join {
            worker: record("w1", 1, WorkerState::Ready),
        });
        assert_eq!(ids(&r), vec!["w1"]);
        r.event(Event::Drain { id: "w1".into() });
        let w1 = r.balancer.find("w1").unwrap();
        assert_eq!(w1.status(r.balancer.clock().now(), 0), Status::Draining);
        r.event(Event::Leave { id: "w1".into() });
        assert!(ids(&r).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_go_after_the_grace_only() {
        let mut r = reconciler(&["127.0.0.1:9"]);
        r.sync(&[
            record("w1", 1, WorkerState::Ready),
            record("w2", 2, WorkerState::Ready),
        ]);
        assert_eq!(ids(&r), vec!["127.0.0.1:9", "w1", "w2"]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(ids(&r).len(), 3, "missing once is not gone");
        tokio::time::advance(Duration::from_secs(2)).await;
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(ids(&r), vec!["127.0.0.1:9", "w1"], "static workers stay");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reappearing_entry_cancels_the_removal() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        r.sync(&[]);
        tokio::time::advance(Duration::from_secs(1)).await;
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(ids(&r), vec!["w1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_entries_are_flagged_and_never_added() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Draining)]);
        assert!(ids(&r).is_empty());
        r.sync(&[record("w2", 2, WorkerState::Ready)]);
        r.sync(&[record("w2", 2, WorkerState::Draining)]);
        let w2 = r.balancer.find("w2").unwrap();
        assert_eq!(w2.status(r.balancer.clock().now(), 0), Status::Draining);
        r.sync(&[record("w2", 2, WorkerState::Ready)]);
        assert_ne!(w2.status(r.balancer.clock().now(), 0), Status::Draining);
    }

    #[tokio::test(start_paused = true)]
    async fn a_statically_listed_worker_gets_registry_drain_notices() {
        let mut r = reconciler(&["127.0.0.1:5"]);
        r.sync(&[record("w5", 5, WorkerState::Ready)]);
        assert_eq!(ids(&r), vec!["127.0.0.1:5"], "no duplicate entry");
        r.event(Event::Drain { id: "w5".into() });
        let w = r.balancer.find("127.0.0.1:5").unwrap();
        assert_eq!(w.status(r.balancer.clock().now(), 0), Status::Draining);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_incarnation_replaces_the_old_entry() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        let old = r.balancer.find("w1").unwrap();
        let mut again = record("w1", 7, WorkerState::Ready);
        again.started_ms = 2;
        r.event(Event::Join { worker: again });
        let new = r.balancer.find("w1").unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert_eq!(new.spec.addr, "127.0.0.1:7");
        assert!(old.cancel.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_records_are_not_applied_again() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        let w1 = r.balancer.find("w1").unwrap();
        // A change no record made: a re-applied record would set the weight back to 100.
        w1.set_weight(7);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(
            w1.weight(),
            7,
            "skipped: same record, nothing happened in between"
        );
        let mut heavier = record("w1", 1, WorkerState::Ready);
        heavier.weight = 300;
        r.sync(&[heavier]);
        assert_eq!(w1.weight(), 300, "a changed record is applied");
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_in_between_makes_the_next_read_apply_everything() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        r.event(Event::Drain { id: "w1".into() });
        let w1 = r.balancer.find("w1").unwrap();
        assert_eq!(w1.status(r.balancer.clock().now(), 0), Status::Draining);
        // The entry still says ready (as before this change, the full read has the last word).
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_ne!(w1.status(r.balancer.clock().now(), 0), Status::Draining);
    }

    #[tokio::test(start_paused = true)]
    async fn a_membership_change_in_between_makes_the_next_read_apply_everything() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        // Removed by something other than the registry reader (not an operator: no tombstone).
        r.balancer
            .remove("w1", ChangeSource::Registry, "test")
            .unwrap();
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(ids(&r), vec!["w1"], "the unchanged record added it back");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_that_went_and_came_back_is_applied_again() {
        let mut r = reconciler(&[]);
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        r.sync(&[]);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.sync(&[]);
        assert!(ids(&r).is_empty());
        r.sync(&[record("w1", 1, WorkerState::Ready)]);
        assert_eq!(ids(&r), vec!["w1"]);
    }
}
