//! The worker registry: what a worker writes about itself in Redis, and the notices it publishes.
//!
//! A worker keeps `{prefix}worker:{id}` (a hash) alive with a heartbeat that refreshes its TTL, and
//! publishes an [`Event`] on `{prefix}events` when it joins, starts draining or leaves, so gateways
//! react at once instead of at their next poll. Gateways read both; neither side writes the other's
//! part.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Whether a registered worker wants new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Takes new requests.
    Ready,
    /// Finishing its in-flight requests; send it nothing new.
    Draining,
}

impl WorkerState {
    /// The name stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// One worker's registry entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique worker id (also sent as `x-herd-worker`).
    pub id: String,
    /// `host:port` where gateways reach the worker.
    pub addr: String,
    /// Name of the machine the worker runs on.
    pub machine: String,
    /// Relative share of traffic for weighted balancing.
    pub weight: u32,
    /// Version of the worker's app.
    pub version: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Ready or draining.
    pub state: WorkerState,
}

/// Why a stored registry entry could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("registry entry field `{field}`: {problem}")]
pub struct RecordError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl WorkerRecord {
    /// The hash fields stored in Redis.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("addr", self.addr.clone()),
            ("machine", self.machine.clone()),
            ("weight", self.weight.to_string()),
            ("version", self.version.clone()),
            ("started_ms", self.started_ms.to_string()),
            ("state", self.state.as_str().to_string()),
        ]
    }

    /// Reads an entry back from its hash fields.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, RecordError> {
        let get = |field: &'static str| {
            fields.get(field).cloned().ok_or(RecordError {
                field,
                problem: "missing".into(),
            })
        };
        let number = |field: &'static str| -> Result<u64, RecordError> {
            get(field)?.parse().map_err(|_| RecordError {
                field,
                problem: "not a number".into(),
            })
        };
        let state = match get("state")?.as_str() {
            "ready" => WorkerState::Ready,
            "draining" => WorkerState::Draining,
            other => {
                return Err(RecordError {
                    field: "state",
                    problem: format!("unknown state {other:?}"),
                });
            }
        };
        Ok(WorkerRecord {
            id: get("id")?,
            addr: get("addr")?,
            machine: get("machine")?,
            weight: u32::try_from(number("weight")?).map_err(|_| RecordError {
                field: "weight",
                problem: "too large".into(),
            })?,
            version: get("version")?,
            started_ms: number("started_ms")?,
            state,
        })
    }
}

/// A notice on the `{prefix}events` channel (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A worker is ready for traffic.
    Join {
        /// The worker's entry.
        worker: WorkerRecord,
    },
    /// A worker stops taking new requests and finishes its in-flight ones.
    Drain {
        /// The worker's id.
        id: String,
    },
    /// A worker has left (its entry is deleted).
    Leave {
        /// The worker's id.
        id: String,
    },
}

impl Event {
    /// The JSON published on the channel.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events always serialize")
    }

    /// Parses a published notice.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WorkerRecord {
        WorkerRecord {
            id: "w1".into(),
            addr: "127.0.0.1:8081".into(),
            machine: "m1".into(),
            weight: 100,
            version: "0.1.0".into(),
            started_ms: 1_700_000_000_000,
            state: WorkerState::Ready,
        }
    }

    #[test]
    fn record_round_trips_through_hash_fields() {
        let fields: HashMap<String, String> = record()
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(WorkerRecord::from_fields(&fields).unwrap(), record());
    }

    #[test]
    fn bad_fields_are_reported_not_panicked_on() {
        let mut fields: HashMap<String, String> = record()
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        fields.insert("weight".into(), "heavy".into());
        assert_eq!(
            WorkerRecord::from_fields(&fields).unwrap_err().field,
            "weight"
        );
        fields.remove("addr");
        assert!(WorkerRecord::from_fields(&fields).is_err());
    }

    #[test]
    fn events_round_trip_as_json() {
        for event in [
            Event::Join { worker: record() },
            Event::Drain { id: "w1".into() },
            Event::Leave { id: "w1".into() },
        ] {
            assert_eq!(Event::from_json(&event.to_json()).unwrap(), event);
        }
        assert!(Event::from_json("{\"event\":\"explode\"}").is_err());
    }
}
