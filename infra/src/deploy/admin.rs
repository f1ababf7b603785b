//! The gateways' admin API, asked from the gateway's own machine (`curl` there, with the
//! admin header file `up` wrote): the API listens on the machine's loopback, and on netns and
//! ssh machines herd has no route to it from here anyway.

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
