//! `herd status --inventory FILE`: the machines (reachable? which supervisor?), every unit
//! (running?), the gateway pair as each gateway sees itself, and the workers as the active
//! gateway sees them. A table for people, JSON for scripts.

use serde::Serialize;

use super::admin::{self, SeenGateway, SeenWorker};
use super::{Options, connect, launch};
use crate::inventory::{Inventory, Kind};

/// The shortest window the per-worker latency quantiles are measured over.
const LATENCY_WINDOW: std::time::Duration = std::time::Duration::from_millis(500);

/// One machine.
#[derive(Debug, Clone, Serialize)]
pub struct MachineStatus {
    /// Its name.
    pub name: String,
    /// Its transport.
    pub transport: crate::inventory::Transport,
    /// Its address.
    pub address: String,
    /// Whether herd reached it.
    pub reachable: bool,
    /// Its supervisor, when reachable.
    pub supervisor: Option<crate::machine::Supervisor>,
}

/// One unit.
#[derive(Debug, Clone, Serialize)]
pub struct UnitStatus {
    /// Its name.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its machine.
    pub machine: String,
    /// Its main listener.
    pub listen: String,
    /// Whether its process runs (`None`: machine unreachable).
    pub running: Option<bool>,
}

/// One gateway of the pair.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayStatus {
    /// Its machine.
    pub machine: String,
    /// What its admin API said (`None`: no answer).
    pub seen: Option<SeenGateway>,
}

/// The whole inventory's status.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The inventory's name.
    pub name: String,
    /// Where users reach it (floating address or the active gateway).
    pub public_url: Option<String>,
    /// The active gateway's machine.
    pub active: Option<String>,
    /// Machines.
    pub machines: Vec<MachineStatus>,
    /// Units.
    pub units: Vec<UnitStatus>,
    /// Gateways.
    pub gateways: Vec<GatewayStatus>,
    /// Workers as the active gateway sees them.
    pub workers: Vec<SeenWorker>,
    /// With Sentinel: the master the sentinels agree on, each sentinel and each data node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_sentinel: Option<super::sentinel::SentinelStatus>,
}

impl Status {
    /// Whether every unit runs, a gateway is active and sees every worker healthy, and (with
    /// Sentinel) Redis is settled on one master that every node follows.
    pub fn healthy(&self) -> bool {
        let workers = self.units.iter().filter(|u| u.kind == Kind::Worker).count();
        self.units.iter().all(|u| u.running == Some(true))
            && self.active.is_some()
            && self
                .redis_sentinel
                .as_ref()
                .is_none_or(|s| s.settled().is_some())
            && self
                .workers
                .iter()
                .filter(|w| w.state == "healthy" || w.state == "slow_start")
                .count()
                >= workers
    }

    /// Whether nothing of the cluster runs.
    pub fn nothing_runs(&self) -> bool {
        self.units.iter().all(|u| u.running != Some(true))
    }

    /// The table people read.
    pub fn table(&self) -> String {
        let mut out = format!(
            "inventory {}: {}\n\nMACHINE         TRANSPORT  ADDRESS          REACHABLE  SUPERVISOR\n",
            self.name,
            match (&self.public_url, &self.active) {
                (Some(url), Some(active)) => format!("{url} (active gateway on {active})"),
                _ => "no active gateway".to_string(),
            }
        );
        for m in &self.machines {
            out.push_str(&format!(
                "{:<15} {:<10} {:<16} {:<10} {}\n",
                m.name,
                format!("{:?}", m.transport).to_lowercase(),
                m.address,
                if m.reachable { "yes" } else { "NO" },
                m.supervisor
                    .map_or("-".to_string(), |s| format!("{s:?}").to_lowercase())
            ));
        }
        out.push_str("\nGATEWAY         ROLE       EPOCH  HOLDS ADDRESS  REDIS\n");
        for g in &self.gateways {
            let seen = g.seen.clone().unwrap_or_default();
            let flag = |b: Option<bool>| b.map_or("-", |b| if b { "yes" } else { "no" });
            out.push_str(&format!(
                "{:<15} {:<10} {:<6} {:<14} {}\n",
                g.machine,
                seen.role.as_deref().unwrap_or("no answer"),
                seen.epoch.map_or("-".into(), |e| e.to_string()),
                flag(seen.holds_address),
                match seen.redis_reachable {
                    Some(true) => "reachable",
                    Some(false) => "UNREACHABLE",
                    None => "-",
                }
            ));
        }
        out.push_str("\nUNIT                      MACHINE         RUNNING  STATE (active gateway)  IN-FLIGHT  EJECTIONS  P50      P99\n");
        for u in &self.units {
            let seen = self
                .workers
                .iter()
                .find(|w| format!("worker-{}", w.id) == u.name);
            let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}ms"));
            out.push_str(&format!(
                "{:<25} {:<15} {:<8} {:<23} {:<10} {:<10} {:<8} {}\n",
                u.name,
                u.machine,
                match u.running {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "?",
                },
                match (u.kind, seen) {
                    (Kind::Worker, Some(w)) => w.state.clone(),
                    (Kind::Worker, None) => "not seen".into(),
                    _ => "-".into(),
                },
                seen.map_or("-".into(), |w| w.in_flight.to_string()),
                seen.map_or("-".into(), |w| w.ejections.to_string()),
                ms(seen.and_then(|w| w.p50_ms)),
                ms(seen.and_then(|w| w.p99_ms)),
            ));
        }
        if let Some(sentinel) = &self.redis_sentinel {
            out.push_str(&sentinel.table());
        }
        out
    }
}

/// Collects the status of `inventory`.
pub fn collect(inventory: &Inventory, options: &Options) -> Status {
    let machines = connect(inventory, options);
    // With the workers `herd scale` / `herd rollout` recorded on the machines.
    let units = super::scale::units(inventory, "", &machines);
    let mut reachable = std::collections::BTreeMap::new();
    let machine_status = inventory
        .machines
        .iter()
        .map(|entry| {
            let machine = machines.get(&entry.name);
            let up = machine.is_some_and(|m| m.reachable());
            reachable.insert(entry.name.clone(), up);
            MachineStatus {
                name: entry.name.clone(),
                transport: entry.transport,
                address: entry.address.to_string(),
                reachable: up,
                supervisor: machine.filter(|_| up).map(|m| m.supervisor()),
            }
        })
        .collect();
    let reach = |name: &str| {
        machines
            .get(name)
            .filter(|_| reachable.get(name).copied().unwrap_or(false))
    };
    let unit_status = units
        .iter()
        .map(|unit| UnitStatus {
            name: unit.name.clone(),
            kind: unit.kind,
            machine: unit.machine.clone(),
            listen: unit.listen.to_string(),
            running: reach(&unit.machine).map(|m| m.alive(&launch(unit)).unwrap_or(false)),
        })
        .collect();
    let gateways = units
        .iter()
        .filter(|u| u.kind == Kind::Gateway)
        .map(|gateway| GatewayStatus {
            machine: gateway.machine.clone(),
            seen: reach(&gateway.machine).and_then(|m| admin::failover(m, gateway).ok()),
        })
        .collect::<Vec<_>>();
    let active = gateways
        .iter()
        .find(|g| g.seen.as_ref().and_then(|s| s.role.as_deref()) == Some("active"))
        .map(|g| g.machine.clone());
    let active_gateway = active.as_ref().and_then(|name| {
        let gateway = units
            .iter()
            .find(|u| u.kind == Kind::Gateway && &u.machine == name)?;
        Some((reach(name)?, gateway))
    });
    // Latency quantiles are differences between two readings of the gateway's counters: the
    // first ask gives it a reading to compare with (unless someone asked within 5 s), the
    // second, at least LATENCY_WINDOW later, has the figures.
    let began = std::time::Instant::now();
    if let Some((machine, gateway)) = active_gateway {
        let _ = admin::latencies(machine, gateway);
    }
    let mut workers = active_gateway
        .and_then(|(machine, gateway)| admin::workers(machine, gateway).ok())
        .unwrap_or_default();
    if let Some((machine, gateway)) = active_gateway {
        std::thread::sleep(LATENCY_WINDOW.saturating_sub(began.elapsed()));
        if let Ok(latencies) = admin::latencies(machine, gateway) {
            for worker in &mut workers {
                if let Some(latency) = latencies.get(&worker.id) {
                    (worker.p50_ms, worker.p99_ms) = (latency.p50_ms, latency.p99_ms);
                }
            }
        }
    }
    Status {
        name: inventory.name.clone(),
        public_url: active.as_ref().map(|a| super::public_url(inventory, a)),
        active,
        machines: machine_status,
        units: unit_status,
        gateways,
        workers,
        redis_sentinel: super::sentinel::status(inventory, options),
    }
}
