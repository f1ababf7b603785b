//! `herd drill KIND`: runs one drill (or `all`) against the local cluster of `--state-dir`, a
//! fresh netns lab (`--lab`) or the cluster of an inventory (`--inventory FILE`), prints the report (text or `--json`), writes `--out`, and turns
//! the verdict into the exit code: 0 PASS, 1 FAIL or not applicable, 2 bad flags.

use std::fmt::Write as _;

use super::{CliError, DrillArgs, EXIT_FAILED, EXIT_OK, say, warn};
use crate::drill::inventory::InventoryCluster;
use crate::drill::lab::LabCluster;
use crate::drill::local::LocalCluster;
use crate::drill::{self, ClusterHandle, DrillError, Kind, Options, Outcome, Report};
use crate::state::StateDir;

/// Runs `herd drill`; returns the exit code.
pub(super) fn run(args: &DrillArgs) -> Result<u8, CliError> {
    let lab_env = args.validate()?;
    let options = Options {
        duration: args.duration,
        rate: args.rate,
        users: args.users as usize,
    };
    let kinds: Vec<Kind> = match args.kind {
        Kind::All => Kind::EVERY.to_vec(),
        kind => vec![kind],
    };
    drill::install_interrupt_handler();
    let temp_logs;
    let mut cluster: Box<dyn ClusterHandle> = if args.lab {
        if !crate::deps::is_root() {
            return Err(CliError::Drill(
                "--lab needs root (network namespaces); run it as root (e.g. sudo)".into(),
            ));
        }
        let log_dir = match &args.log_dir {
            Some(dir) => dir.clone(),
            None => {
                temp_logs = tempfile::Builder::new()
                    .prefix("herd-drill-")
                    .tempdir()
                    .map_err(|source| CliError::Os {
                        what: "create a log directory",
                        source,
                    })?;
                temp_logs.path().to_path_buf()
            }
        };
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| CliError::Drill(format!("{}: {e}", log_dir.display())))?;
        warn(format!(
            "herd drill: building the netns lab (logs in {})",
            log_dir.display()
        ));
        Box::new(
            LabCluster::start(&log_dir, lab_env)
                .map_err(|e| CliError::Drill(format!("the lab did not come up: {e}")))?,
        )
    } else if let Some(file) = &args.state.inventory {
        let (inventory, state_root) = super::inventory::load(&args.state)?;
        if inventory.uses_netns() && !crate::deps::is_root() {
            return Err(CliError::Drill(
                "the inventory has netns machines, which need root (network namespaces); run it as root (e.g. sudo)".into(),
            ));
        }
        Box::new(
            InventoryCluster::open(inventory, file, state_root)
                .map_err(|e| CliError::Drill(e.to_string()))?,
        )
    } else {
        let dir = StateDir::new(&args.state.state_dir)?;
        Box::new(LocalCluster::open(dir).map_err(|e| CliError::Drill(e.to_string()))?)
    };

    let mut reports = Vec::new();
    for kind in kinds {
        let report = match drill::run(cluster.as_mut(), kind, &options) {
            Ok(report) => report,
            Err(DrillError::Interrupted) => return Err(CliError::DrillInterrupted),
            Err(DrillError::Setup(why)) => {
                let mut report = Report::not_applicable(kind, cluster.describe(), String::new());
                report.verdict = Outcome::Fail;
                report.reason = format!("the drill could not run: {why}");
                report
            }
        };
        if !args.json {
            say(report.text());
        }
        reports.push(report);
    }
    drop(cluster);

    let failed = reports.iter().any(|r| match r.verdict {
        Outcome::Fail => true,
        // A single drill that can't apply is a failure to drill; in `all` it is listed.
        Outcome::NotApplicable => args.kind != Kind::All,
        Outcome::Pass => false,
    });
    let summary = (args.kind == Kind::All).then(|| summary(&reports, failed));
    if args.json {
        let value = match args.kind {
            Kind::All => serde_json::json!({
                "verdict": if failed { "fail" } else { "pass" },
                "drills": reports,
            }),
            _ => serde_json::to_value(&reports[0]).unwrap_or_default(),
        };
        say(value);
    } else if let Some(summary) = &summary {
        say(summary);
    }
    if let Some(out) = &args.out {
        let mut markdown = String::new();
        if let Some(summary) = &summary {
            let _ = write!(markdown, "# herd drill all\n\n```text\n{summary}\n```\n\n");
        }
        for report in &reports {
            markdown.push_str(&report.markdown());
            markdown.push('\n');
        }
        std::fs::write(out, markdown)
            .map_err(|e| CliError::Drill(format!("cannot write {}: {e}", out.display())))?;
    }
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}

/// One line per drill and the overall verdict.
fn summary(reports: &[Report], failed: bool) -> String {
    let mut out = String::from("drill                 verdict  reason\n");
    for report in reports {
        let _ = writeln!(
            out,
            "{:<21} {:<8} {}",
            report.drill.name(),
            report.verdict.name(),
            report.reason
        );
    }
    let count = |outcome| reports.iter().filter(|r| r.verdict == outcome).count();
    let _ = write!(
        out,
        "VERDICT: {} — {} passed, {} failed, {} not applicable (of {})",
        if failed { "FAIL" } else { "PASS" },
        count(Outcome::Pass),
        count(Outcome::Fail),
        count(Outcome::NotApplicable),
        reports.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_each_verdict_apart() {
        let report = |kind, verdict| {
            let mut report = Report::not_applicable(kind, "local".into(), "why".into());
            report.verdict = verdict;
            report
        };
        let reports = [
            report(Kind::WorkerKill, Outcome::Pass),
            report(Kind::RedisRestart, Outcome::NotApplicable),
            report(Kind::GatewayKill, Outcome::NotApplicable),
        ];
        let text = summary(&reports, false);
        assert!(
            text.ends_with("VERDICT: PASS — 1 passed, 0 failed, 2 not applicable (of 3)"),
            "{text}"
        );
        let text = summary(&[report(Kind::WorkerKill, Outcome::Fail)], true);
        assert!(
            text.ends_with("VERDICT: FAIL — 0 passed, 1 failed, 0 not applicable (of 1)"),
            "{text}"
        );
    }
}
