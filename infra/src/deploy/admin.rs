//! The gateways' admin API, asked from the gateway's own machine (`curl` there, with the
//! admin header file `up` wrote): the API listens on the machine's loopback, and on netns and
//! ssh machines herd has no route to it from here anyway.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Machines, launch};
use crate::inventory::{Kind, Unit};
use crate::machine::{Machine, quote};

/// One worker as the active gateway sees it (`GET /api/workers`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct SeenWorker {
    /// Its id.
    pub id: String,
    /// Its address.
    #[serde(default)]
    pub addr: String,
    /// The machine it said it runs on.
    #[serde(default)]
    pub machine: String,
    /// `healthy`, `slow_start`, `draining`, `down`, `ejected`…
    pub state: String,
    /// Requests in flight.
    #[serde(default)]
    pub in_flight: u64,
    /// Times ejected by passive health.
    #[serde(default)]
    pub ejections: u64,
    /// Median latency over the dashboard's window (`GET /api/dashboard`; none without requests
    /// in the window).
    #[serde(default)]
    pub p50_ms: Option<f64>,
    /// 99th percentile latency over the same window.
    #[serde(default)]
    pub p99_ms: Option<f64>,
}

/// A gateway's view of the pair (`GET /api/failover`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
pub struct SeenGateway {
    /// `active`, `standby`, …
    #[serde(default)]
    pub role: Option<String>,
    /// The lease epoch it holds or last saw.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// Whether it holds the floating address.
    #[serde(default)]
    pub holds_address: Option<bool>,
    /// Whether its last lease call reached Redis.
    #[serde(default)]
    pub redis_reachable: Option<bool>,
    /// Its latest transition.
    #[serde(default)]
    pub last_transition: Option<serde_json::Value>,
}

/// `GET {path}` on `gateway`'s admin API, from its machine.
pub(super) fn get(machine: &dyn Machine, gateway: &Unit, path: &str) -> Result<String, String> {
    let admin = gateway.admin.ok_or("no admin listener")?;
    machine
        .run(&format!(
            "curl -sS --fail --max-time 2 -H @{} {}",
            quote(&format!("{}/etc/admin-header", machine.dir())),
            quote(&format!("http://{admin}{path}"))
        ))
        .map_err(|error| error.to_string())
}

/// The pair as gateway `gateway` sees it.
pub fn failover(machine: &dyn Machine, gateway: &Unit) -> Result<SeenGateway, String> {
    let body = get(machine, gateway, "/api/failover")?;
    serde_json::from_str(&body).map_err(|error| format!("/api/failover: {error}"))
}

/// The workers as gateway `gateway` sees them.
pub fn workers(machine: &dyn Machine, gateway: &Unit) -> Result<Vec<SeenWorker>, String> {
    let body = get(machine, gateway, "/api/workers")?;
    serde_json::from_str(&body).map_err(|error| format!("/api/workers: {error}"))
}

/// A worker's latency quantiles in ms (none: no request in the gateway's window).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Latency {
    /// Median.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
}

/// Each worker's latency quantiles by id, from the gateway's dashboard document
/// (`GET /api/dashboard`, admin token). The gateway computes them from the difference to its
/// oldest reading of the last 5 s, so the first ask after a quiet while has none: ask once,
/// wait a few hundred ms, ask again.
pub fn latencies(
    machine: &dyn Machine,
    gateway: &Unit,
) -> Result<BTreeMap<String, Latency>, String> {
    let body = get(machine, gateway, "/api/dashboard")?;
    let document: serde_json::Value =
        serde_json::from_str(&body).map_err(|error| format!("/api/dashboard: {error}"))?;
    Ok(worker_latencies(&document))
}

/// The latency quantiles of every worker in a dashboard document (`machines[].workers[]`).
pub fn worker_latencies(document: &serde_json::Value) -> BTreeMap<String, Latency> {
    document["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|machine| machine["workers"].as_array().into_iter().flatten())
        .filter_map(|worker| {
            Some((
                worker["id"].as_str()?.to_string(),
                Latency {
                    p50_ms: worker["p50_ms"].as_f64(),
                    p99_ms: worker["p99_ms"].as_f64(),
                },
            ))
        })
        .collect()
}

/// The active gateway: its machine and unit (the first that says `active`).
pub fn active<'a>(machines: &Machines, units: &'a [Unit]) -> Option<(String, &'a Unit)> {
    units
        .iter()
        .filter(|u| u.kind == Kind::Gateway)
        .find(|gateway| {
            machines
                .get(&gateway.machine)
                .and_then(|m| failover(m, gateway).ok())
                .is_some_and(|seen| seen.role.as_deref() == Some("active"))
        })
        .map(|gateway| (gateway.machine.clone(), gateway))
}

/// Waits up to `timeout` until `gateway` answers on its admin API (with `role`, when given);
/// the last error otherwise.
pub fn wait_answers(
    machine: &dyn Machine,
    gateway: &Unit,
    role: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match failover(machine, gateway) {
            Ok(seen) if role.is_none() || seen.role.as_deref() == role => return Ok(()),
            Ok(seen) => format!(
                "its role is {}, not {}",
                seen.role.as_deref().unwrap_or("unknown"),
                role.unwrap_or_default()
            ),
            Err(error) => error,
        };
        if !machine.alive(&launch(gateway)).unwrap_or(true) {
            return Err(format!("it exited ({last})"));
        }
        if Instant::now() > deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_read_per_worker_from_the_dashboard_document() {
        let document = serde_json::json!({"machines": [
            {"machine": "m1", "workers": [{"id": "a", "p50_ms": 1.5, "p99_ms": 9.25}]},
            {"machine": "m2", "workers": [{"id": "b", "p50_ms": null, "p99_ms": null}, {"p99_ms": 1}]},
        ]});
        let seen = worker_latencies(&document);
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen["a"],
            Latency {
                p50_ms: Some(1.5),
                p99_ms: Some(9.25)
            }
        );
        assert_eq!(seen["b"], Latency::default());
        assert!(worker_latencies(&serde_json::json!({})).is_empty());
    }
}
