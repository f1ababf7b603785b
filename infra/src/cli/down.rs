//! `herd down`: stop the cluster recorded in the state file, in order (gateway, workers, Redis;
//! SIGTERM, then SIGKILL after a grace period), say what was stopped, and remove the state file.
//!
//! A cluster supervised by a foreground `herd up` is stopped by that `herd up` (SIGTERM to it),
//! since it holds the processes and stops them the same way; whatever is still running after
//! that is stopped here.

use std::time::Duration;

use super::cluster::{GATEWAY_GRACE, REDIS_GRACE, WORKER_GRACE};
use super::{CliError, EXIT_OK, StateDirArgs};
use crate::pid::{self, Stopped};
use crate::state::{Kind, State, StateDir};

/// How long a foreground `herd up` gets to stop its cluster: every grace period in a row, plus
/// some slack.
const SUPERVISOR_GRACE: Duration = Duration::from_secs(
    GATEWAY_GRACE.as_secs() + WORKER_GRACE.as_secs() + REDIS_GRACE.as_secs() + 5,
);

/// Runs `herd down`; returns the exit code.
pub(crate) fn run(args: &StateDirArgs) -> Result<u8, CliError> {
    let dir = StateDir::new(&args.state_dir)?;
    let Some(state) = dir.load()? else {
        super::say(format!(
            "no herd cluster is running (no state file at {}); nothing to stop",
            dir.state_file().display()
        ));
        return Ok(EXIT_OK);
    };
    let mut stopped = 0;
    // Set when a foreground `herd up` stopped the servers itself: then they are gone by now,
    // and listing each as "not running" would only confuse.
    let mut supervisor_stopped = false;
    if let Some(supervisor) = state.supervisor().filter(|s| s.process.is_running()) {
        let pid = supervisor.process.pid;
        let who = if state.detached {
            "the background supervisor (`herd supervise`)"
        } else {
            "the foreground `herd up`"
        };
        super::say(format!("asking {who} (pid {pid}) to stop its cluster"));
        match pid::stop_all(&[supervisor.process], SUPERVISOR_GRACE)[0] {
            Stopped::Exited => super::say(format!("{who} (pid {pid}) stopped its cluster")),
            other => super::say(format!(
                "{who} (pid {pid}) did not stop in time ({other:?}); stopping its cluster here"
            )),
        }
        stopped += 1;
        supervisor_stopped = true;
    }
    let (count, survivors) = stop_servers(&state, supervisor_stopped);
    stopped += count;
    if !survivors.is_empty() {
        return Err(CliError::Survivors(survivors.join(", ")));
    }
    dir.clear()?;
    if stopped == 0 {
        super::say("nothing was running any more; removed the stale state file");
    } else {
        super::say(format!("herd cluster in {} stopped", dir.root().display()));
    }
    Ok(EXIT_OK)
}

/// Stops the servers recorded in `state` in order (gateways, workers, Redis), a line per
/// process; returns how many were stopped and the ones that survived even SIGKILL. With `quiet`,
/// members that are already gone are not mentioned.
pub(crate) fn stop_servers(state: &State, quiet: bool) -> (usize, Vec<String>) {
    let mut stopped = 0;
    let mut survivors = Vec::new();
    for (kind, members) in state.stop_groups() {
        let grace = match kind {
            Kind::Gateway => GATEWAY_GRACE,
            Kind::Worker => WORKER_GRACE,
            Kind::Redis | Kind::Supervisor => REDIS_GRACE,
        };
        let ids: Vec<_> = members.iter().map(|m| m.process).collect();
        for (member, outcome) in members.iter().zip(pid::stop_all(&ids, grace)) {
            let (name, pid) = (&member.name, member.process.pid);
            match outcome {
                Stopped::NotRunning if quiet => {}
                Stopped::NotRunning => super::say(format!("{name} (pid {pid}) was not running")),
                Stopped::Exited => super::say(format!("stopped {name} (pid {pid})")),
                Stopped::Killed => super::say(format!(
                    "killed {name} (pid {pid}): it did not exit within {}s of SIGTERM",
                    grace.as_secs()
                )),
                Stopped::Survived => survivors.push(format!("{name} (pid {pid})")),
            }
            if matches!(outcome, Stopped::Exited | Stopped::Killed) {
                stopped += 1;
            }
        }
    }
    (stopped, survivors)
}
