//! The recent events an operator wants to see on the dashboard: workers joining and leaving,
//! drains, ejections and health flips, the gateway pair's role changes, Redis coming and going.
//!
//! A bounded ring in memory ([`CAPACITY`] events, oldest dropped first), fed where those things
//! already happen (the balancer's [`crate::balancer::Notifier`], the registry loop, the failover
//! status watch). None of them is on the request path: an event costs one short mutex hold, and
//! they arrive at most a few per second even when a cluster is in trouble. Logs keep the full
//! history; the ring only answers "what just happened?" without a log search.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use serde::Serialize;
use tokio::sync::watch;

use crate::balancer::worker::unix_ms;
use crate::failover::FailoverStatus;

/// Events kept; older ones are dropped (a few minutes of a busy incident, a few KB).
pub const CAPACITY: usize = 200;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    /// A worker's membership or routing state.
    Worker,
    /// This gateway's role in the failover pair.
    Failover,
    /// Whether the gateway reaches Redis (registry).
    Redis,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Increases by one per event since start, so a reader can tell what is new.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What the event is about.
    pub subject: Subject,
    /// Which one: a worker id, this gateway's failover id, or `registry`.
    pub name: String,
    /// The new state (`added`, `ejected`, `active`, `unreachable`, …).
    pub what: String,
    /// Why, in words.
    pub reason: String,
}

/// Whether the registry reaches Redis, as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// No registry configured, or no answer yet.
    Unknown,
    /// The last call answered.
    Reachable,
    /// The last call failed.
    Unreachable,
}

/// The ring of recent events, plus the registry's Redis reachability it sees go by.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    registry: AtomicU8,
}

#[derive(Debug, Default)]
struct Ring {
    next_seq: u64,
    events: VecDeque<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            ring: Mutex::new(Ring::default()),
            registry: AtomicU8::new(0),
        }
    }
}

impl Events {
    /// Records one event, dropping the oldest when full.
    pub fn push(&self, subject: Subject, name: &str, what: &str, reason: &str) {
        self.push_at(unix_ms(), subject, name, what, reason);
    }

    fn push_at(&self, at_ms: u64, subject: Subject, name: &str, what: &str, reason: &str) {
        let mut ring = self.ring.lock().unwrap();
        ring.next_seq += 1;
        let event = Event {
            seq: ring.next_seq,
            at_ms,
            subject,
            name: name.to_string(),
            what: what.to_string(),
            reason: reason.to_string(),
        };
        if ring.events.len() == CAPACITY {
            ring.events.pop_front();
        }
        ring.events.push_back(event);
    }

    /// The most recent `limit` events, newest first.
    pub fn recent(&self, limit: usize) -> Vec<Event> {
        let ring = self.ring.lock().unwrap();
        ring.events.iter().rev().take(limit).cloned().collect()
    }

    /// The registry reached Redis (`true`) or failed to (`false`, with the error); an event
    /// only when that changes.
    pub fn registry_redis(&self, reachable: bool, reason: &str) {
        let new = if reachable {
            Reachability::Reachable
        } else {
            Reachability::Unreachable
        };
        let old = self.registry.swap(new as u8, Ordering::Relaxed);
        if old != new as u8 {
            let what = if reachable {
                "reachable"
            } else {
                "unreachable"
            };
            self.push(Subject::Redis, "registry", what, reason);
        }
    }

    /// The registry's Redis reachability as last seen.
    pub fn registry_reachability(&self) -> Reachability {
        match self.registry.load(Ordering::Relaxed) {
            x if x == Reachability::Reachable as u8 => Reachability::Reachable,
            x if x == Reachability::Unreachable as u8 => Reachability::Unreachable,
            _ => Reachability::Unknown,
        }
    }

    /// `herd_gateway_registry_redis_reachable` for `/metrics`, read at scrape time.
    pub fn collector(self: &Arc<Self>) -> RegistryCollector {
        RegistryCollector {
            events: self.clone(),
        }
    }

    /// Records every role change of the failover node from now on (a task that ends with the
    /// node's status channel). Changes coalesced by the watch channel are still counted: the
    /// event says how many transitions it stands for.
    pub fn follow_failover(self: &Arc<Self>, mut status: watch::Receiver<FailoverStatus>) {
        let events = self.clone();
        let mut seen = status.borrow().transitions;
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                let current = status.borrow_and_update().clone();
                events.note_failover(&current, &mut seen);
            }
        });
    }

    /// Records the transitions in `status` newer than `seen`.
    fn note_failover(&self, status: &FailoverStatus, seen: &mut u64) {
        if status.transitions <= *seen {
            return;
        }
        let missed = status.transitions - *seen - 1;
        *seen = status.transitions;
        if let Some(last) = &status.last_transition {
            let reason = if missed > 0 {
                format!("{} (and {missed} earlier change(s))", last.reason)
            } else {
                last.reason.clone()
            };
            let what = format!("{} -> {}", last.from.as_str(), last.to.as_str());
            self.push_at(
                last.at_unix_ms,
                Subject::Failover,
                &status.id,
                &what,
                &reason,
            );
        }
    }
}

/// Shows whether the registry reaches Redis: 1 or 0, absent until the registry has tried (or
/// when it is off), so an alert on `== 0` stays quiet for gateways without a registry.
#[derive(Debug)]
pub struct RegistryCollector {
    events: Arc<Events>,
}

impl Collector for RegistryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let value = match self.events.registry_reachability() {
            Reachability::Unknown => return Ok(()),
            Reachability::Reachable => 1,
            Reachability::Unreachable => 0,
        };
        encoder
            .encode_descriptor(
                "registry_redis_reachable",
                "1 while the worker registry's last Redis call answered",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&value)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::{PeerStatus, Role, Transition};

    #[test]
    fn the_ring_keeps_the_newest_events() {
        let events = Events::default();
        for n in 0..CAPACITY + 5 {
            events.push(Subject::Worker, &format!("w{n}"), "added", "joined");
        }
        let recent = events.recent(usize::MAX);
        assert_eq!(recent.len(), CAPACITY);
        assert_eq!(recent[0].name, format!("w{}", CAPACITY + 4));
        assert_eq!(recent[0].seq, CAPACITY as u64 + 5);
        assert_eq!(recent.last().unwrap().name, "w5");
        assert_eq!(events.recent(3).len(), 3);
    }

    #[test]
    fn redis_reachability_makes_events_on_changes_only() {
        let events = Events::default();
        assert_eq!(events.registry_reachability(), Reachability::Unknown);
        events.registry_redis(true, "answered");
        events.registry_redis(true, "answered");
        events.registry_redis(false, "connection refused");
        events.registry_redis(false, "connection refused");
        assert_eq!(events.registry_reachability(), Reachability::Unreachable);
        let whats: Vec<String> = events.recent(10).into_iter().map(|e| e.what).collect();
        assert_eq!(whats, ["unreachable", "reachable"]);
    }

    #[test]
    fn redis_reachability_is_a_metric_once_known() {
        let events = Arc::new(Events::default());
        let metrics = crate::metrics::Metrics::new();
        metrics.register_collector(Box::new(events.collector()));
        assert!(!metrics.render().contains("registry_redis_reachable"));
        events.registry_redis(false, "refused");
        let text = metrics.render();
        assert!(
            text.contains("herd_gateway_registry_redis_reachable 0"),
            "{text}"
        );
        events.registry_redis(true, "answered");
        assert!(
            metrics
                .render()
                .contains("herd_gateway_registry_redis_reachable 1")
        );
    }

    #[test]
    fn failover_transitions_become_events() {
        let events = Events::default();
        let mut status = FailoverStatus {
            id: "gw1".into(),
            role: Role::Active,
            epoch: 3,
            holds_address: true,
            redis_reachable: true,
            peer: PeerStatus::default(),
            transitions: 0,
            last_transition: None,
        };
        let mut seen = 0;
        events.note_failover(&status, &mut seen);
        assert!(events.recent(10).is_empty());
        status.transitions = 3;
        status.last_transition = Some(Transition {
            from: Role::Standby,
            to: Role::Active,
            reason: "peer silent".into(),
            epoch: 3,
            at_unix_ms: 42,
        });
        events.note_failover(&status, &mut seen);
        events.note_failover(&status, &mut seen);
        let recent = events.recent(10);
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].what, "standby -> active");
        assert_eq!(recent[0].reason, "peer silent (and 2 earlier change(s))");
        assert_eq!(recent[0].at_ms, 42);
    }
}
