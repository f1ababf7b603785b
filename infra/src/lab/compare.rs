//! The failover comparison: the same two faults — (a) kill -9 the active proxy process, (b) the
//! active machine's link down — against herd's gateway pair and against keepalived + HAProxy, in
//! the same lab, with the same prober, in one run. `herd lab failover-compare` prints the table.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Serialize;

use super::{FaultRun, Lab, LabOptions, Pair};

/// The injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// kill -9 of the active proxy process (herd-gateway or haproxy).
    ProxyKill,
    /// The active machine's link goes down.
    MachineLoss,
}

impl Fault {
    /// Both faults.
    pub const ALL: [Fault; 2] = [Fault::ProxyKill, Fault::MachineLoss];

    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Fault::ProxyKill => "(a) kill -9 active proxy",
            Fault::MachineLoss => "(b) active machine link down",
        }
    }
}

/// One pair under one fault.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    /// Which pair.
    pub pair: String,
    /// Which fault.
    pub fault: Fault,
    /// What users saw.
    pub run: Option<FaultRun>,
    /// Why there are no figures, if there aren't.
    pub error: Option<String>,
}

/// The pairs compared: herd, keepalived with default adverts, keepalived VRRPv3 at 0.1 s.
pub fn pairs() -> Vec<(String, Pair)> {
    vec![
        ("herd".into(), Pair::Herd),
        (
            "keepalived v2 advert 1s + HAProxy".into(),
            Pair::Keepalived {
                version: 2,
                advert_int: 1.0,
            },
        ),
        (
            "keepalived v3 advert 0.1s + HAProxy".into(),
            Pair::Keepalived {
                version: 3,
                advert_int: 0.1,
            },
        ),
    ]
}

/// Runs every pair under every fault (a fresh lab each time), probing for `duration` with the
/// fault at 2 s. Logs go under `log_dir`.
pub fn run(log_dir: &Path, duration: Duration) -> Vec<CompareRow> {
    let mut rows = Vec::new();
    for (name, pair) in pairs() {
        for fault in Fault::ALL {
            let dir = log_dir.join(format!(
                "{}-{:?}",
                name.split_whitespace().next().unwrap_or("pair"),
                fault
            ));
            let row = match one(&dir, pair.clone(), fault, duration) {
                Ok(run) => CompareRow {
                    pair: name.clone(),
                    fault,
                    run: Some(run),
                    error: None,
                },
                Err(error) => CompareRow {
                    pair: name.clone(),
                    fault,
                    run: None,
                    error: Some(error),
                },
            };
            eprintln!("{} / {}: {}", row.pair, fault.label(), describe(&row));
            rows.push(row);
        }
    }
    rows
}

fn one(dir: &Path, pair: Pair, fault: Fault, duration: Duration) -> Result<FaultRun, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let lab = Lab::start(
        LabOptions {
            pair,
            ..LabOptions::default()
        },
        dir,
    )
    .map_err(|e| e.to_string())?;
    if !lab.wait_serving("gw1", Duration::from_secs(30)) {
        return Err("gw1 never served through the floating address".into());
    }
    // Let health checks settle (HAProxy rise, keepalived's first adverts) before the fault.
    std::thread::sleep(Duration::from_secs(2));
    Ok(
        lab.probe_through(duration, Duration::from_secs(2), |lab| match fault {
            Fault::ProxyKill => {
                if let Err(error) = lab.signal_gateway(0, Signal::SIGKILL) {
                    tracing::warn!(%error, "the fault was not injected");
                }
            }
            Fault::MachineLoss => {
                let _ = lab.topology().link_down("gw1");
            }
        }),
    )
}

fn describe(row: &CompareRow) -> String {
    match (&row.run, &row.error) {
        (Some(run), _) => format!(
            "recovery {} ms, failed {}, max holders {}",
            run.summary
                .recovery_ms
                .map_or("never".to_string(), |ms| format!("{ms:.0}")),
            run.summary.failed,
            run.max_holders
        ),
        (None, Some(error)) => format!("error: {error}"),
        (None, None) => "no figures".into(),
    }
}

/// The comparison as a Markdown table.
pub fn table(rows: &[CompareRow]) -> String {
    let mut out = String::from(
        "| pair | fault | first success via standby (ms) | failed requests | failures | max holders |\n|---|---|---|---|---|---|\n",
    );
    for row in rows {
        match &row.run {
            Some(run) => out.push_str(&format!(
                "| {} | {} | {} | {} | {:?} | {} |\n",
                row.pair,
                row.fault.label(),
                run.summary
                    .recovery_ms
                    .map_or("never".to_string(), |ms| format!("{ms:.0}")),
                run.summary.failed,
                run.summary.failures,
                run.max_holders
            )),
            None => out.push_str(&format!(
                "| {} | {} | error: {} | | | |\n",
                row.pair,
                row.fault.label(),
                row.error.as_deref().unwrap_or("-")
            )),
        }
    }
    out
}
