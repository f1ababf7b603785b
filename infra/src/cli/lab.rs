//! `herd lab failover-compare`: herd's gateway pair against keepalived + HAProxy, same lab, same
//! prober, same faults, one run (see [`crate::lab::compare`]).

use super::{CliError, EXIT_FAILED, EXIT_OK, FailoverCompareArgs, say};
use crate::lab::compare;

/// Runs the comparison and prints the table; exit 1 if a run produced no figures.
pub(super) fn failover_compare(args: &FailoverCompareArgs) -> Result<u8, CliError> {
    if !crate::deps::is_root() {
        return Err(CliError::Lab(
            "network namespaces need root; run it as root (e.g. sudo)".into(),
        ));
    }
    let temp;
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = std::env::temp_dir().join(format!("herd-lab-{}", std::process::id()));
            temp
        }
    };
    std::fs::create_dir_all(&log_dir)
        .map_err(|e| CliError::Lab(format!("{}: {e}", log_dir.display())))?;
    say(format!(
        "failover comparison: {} pairs × 2 faults, {:?} each; logs in {}",
        compare::pairs().len(),
        args.duration,
        log_dir.display()
    ));
    let rows = compare::run(&log_dir, args.duration);
    let table = compare::table(&rows);
    say(&table);
    if let Some(out) = &args.out {
        std::fs::write(out, &table)
            .map_err(|e| CliError::Lab(format!("{}: {e}", out.display())))?;
    }
    if args.log_dir.is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    Ok(if rows.iter().all(|row| row.run.is_some()) {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}
