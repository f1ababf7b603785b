//! Processes known only by their pid: the ones an earlier `herd up` started and recorded in the
//! state file. Checking and stopping them must never hit the wrong process.
//!
//! Two traps make `kill(pid, 0)` alone unreliable here. A detached process's parent is gone, and
//! whoever adopted it (PID 1 in a container, say) may never reap it, so a stopped process can
//! linger as a zombie that `kill` still finds. And a pid can be reused by an unrelated process
//! after ours has exited. So a [`ProcessId`] carries the process's start time from
//! `/proc/<pid>/stat` too, and a zombie or a process with another start time counts as gone.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::process;

/// How often [`stop_all`] looks whether its processes have exited.
const POLL: Duration = Duration::from_millis(20);
/// How long [`stop_all`] waits for a process to vanish after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A process identified by pid and start time, so that a reused pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    /// The pid.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), when known.
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

impl ProcessId {
    /// The process `pid` as it is now (its start time is read at once).
    pub fn of(pid: u32) -> Self {
        ProcessId {
            pid,
            start_ticks: proc_stat(pid).map(|stat| stat.start_ticks),
        }
    }

    /// Whether this very process still runs: it exists, is not a zombie, and started when it
    /// did when it was recorded.
    pub fn is_running(&self) -> bool {
        match proc_stat(self.pid) {
            Some(stat) => {
                !stat.zombie
                    && self
                        .start_ticks
                        .is_none_or(|ticks| ticks == stat.start_ticks)
            }
            // No /proc entry: either gone, or /proc is not mounted (then ask the kernel).
            None => !proc_mounted() && process::is_alive(self.pid),
        }
    }

    /// Sends `signal` if the process still runs; a process that has gone is not an error.
    pub fn signal(&self, signal: Signal) {
        if self.is_running() {
            let _ = process::signal_pid(self.pid, signal);
        }
    }
}

/// What [`stop_all`] did to one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running to begin with.
    NotRunning,
    /// It exited after SIGTERM, within the grace period.
    Exited,
    /// It ignored SIGTERM for the whole grace period and was killed.
    Killed,
    /// It still runs even after SIGKILL (e.g. it belongs to another user).
    Survived,
}

/// Stops all `processes` together: SIGTERM to each (with SIGCONT, in case one is stopped), waits
/// up to `grace` for all of them, then SIGKILL for the rest. Returns one outcome per process, in
/// order. Signalling them all first lets them drain in parallel.
pub fn stop_all(processes: &[ProcessId], grace: Duration) -> Vec<Stopped> {
    let mut outcomes: Vec<Stopped> = processes
        .iter()
        .map(|process| {
            if process.is_running() {
                process.signal(Signal::SIGCONT);
                process.signal(Signal::SIGTERM);
                Stopped::Exited
            } else {
                Stopped::NotRunning
            }
        })
        .collect();
    let any_running = |wanted: Stopped, outcomes: &[Stopped]| {
        processes
            .iter()
            .zip(outcomes)
            .any(|(process, outcome)| *outcome == wanted && process.is_running())
    };
    wait(grace, || !any_running(Stopped::Exited, &outcomes));
    for (process, outcome) in processes.iter().zip(outcomes.iter_mut()) {
        if *outcome == Stopped::Exited && process.is_running() {
            process.signal(Signal::SIGKILL);
            *outcome = Stopped::Killed;
        }
    }
    wait(KILL_WAIT, || !any_running(Stopped::Killed, &outcomes));
    for (process, outcome) in processes.iter().zip(outcomes.iter_mut()) {
        if *outcome == Stopped::Killed && process.is_running() {
            *outcome = Stopped::Survived;
        }
    }
    outcomes
}

/// Polls `done` until it holds or `timeout` passes; returns whether it held.
pub fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if done() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The two fields of `/proc/<pid>/stat` we need.
struct ProcStat {
    zombie: bool,
    start_ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `pid (comm) state ppid … starttime …`. The command name may contain spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state); starttime is field 22.
    let state = fields.first()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        zombie: matches!(*state, "Z" | "X" | "x"),
        start_ticks,
    })
}

fn proc_mounted() -> bool {
    std::path::Path::new("/proc/self/stat").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn parses_stat_lines_with_awkward_names() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let stat = parse_stat(line).unwrap();
        assert!(!stat.zombie);
        assert_eq!(stat.start_ticks, 987654);
        let zombie = "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0";
        assert!(parse_stat(zombie).unwrap().zombie);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn this_process_runs_and_a_reused_pid_does_not_count() {
        let me = ProcessId::of(std::process::id());
        assert!(me.start_ticks.is_some());
        assert!(me.is_running());
        let other_start = ProcessId {
            pid: me.pid,
            start_ticks: me.start_ticks.map(|ticks| ticks + 1),
        };
        assert!(!other_start.is_running());
    }

    #[test]
    fn a_zombie_is_not_running_and_stop_all_terminates() {
        let mut exited = Command::new("true").spawn().unwrap();
        let zombie = ProcessId::of(exited.id());
        // Not reaped yet: a zombie, once it has exited.
        assert!(wait(Duration::from_secs(5), || !zombie.is_running()));
        exited.wait().unwrap();

        let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
        let id = ProcessId::of(sleeper.id());
        assert!(id.is_running());
        let outcomes = stop_all(&[id, zombie], Duration::from_secs(5));
        assert_eq!(outcomes, vec![Stopped::Exited, Stopped::NotRunning]);
        sleeper.wait().unwrap();
    }
}
