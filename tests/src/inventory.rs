//! Helpers for the tests that run `herd` over an inventory of netns machines: run the `herd`
//! binary, find the processes herd recorded under a state directory, and undo everything a test
//! started — `herd down`, then SIGKILL for whatever still runs, then the namespaces — also when
//! the test fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use nix::sys::signal::Signal;

/// Runs `herd ARGS` (inside network namespace `netns` when given), prints the command, its
/// time and its output (shown when a test fails), and returns the output.
pub fn herd_in(netns: Option<&str>, args: &[&str]) -> Output {
    let program =
        herd::binaries::locate(herd::binaries::HERD).expect("herd is built (cargo build --bins)");
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&program);
            c
        }
        None => Command::new(&program),
    };
    let began = Instant::now();
    let output = command
        .args(args)
        .env_remove("HERD_STATE_DIR")
        .output()
        .expect("run herd");
    println!(
        "$ herd {}  ({:.2} s, {})\n{}{}",
        args.join(" "),
        began.elapsed().as_secs_f64(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `herd ARGS` on this host's network: see [`herd_in`].
pub fn herd(args: &[&str]) -> Output {
    herd_in(None, args)
}

/// Every pid in the pid files of the machine directories under `root` (`{machine}/run/*`).
pub fn recorded_pids(root: &Path) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    let Ok(machines) = std::fs::read_dir(root) else {
        return pids;
    };
    for machine in machines.flatten() {
        let Ok(files) = std::fs::read_dir(machine.path().join("run")) else {
            continue;
        };
        for file in files.flatten() {
            if let Some(pid) = std::fs::read_to_string(file.path())
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                pids.insert(pid);
            }
        }
    }
    pids
}

/// Whether `pid` runs (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit(") ").next().map(|rest| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The network namespaces whose names start with `prefix`.
pub fn namespaces_with(prefix: &str) -> Vec<String> {
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// SIGKILL to `pid` and to its process group (herd's supervisors lead a group).
pub fn kill_group(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
}

/// Undoes an inventory test: `herd DOWN…` (in `netns` when given) if anything still runs or a
/// namespace is left, SIGKILL for every pid in `pids` (plus those recorded under `roots`) still
/// running, and removal of every namespace starting with `prefix`.
pub fn undo(
    down: &[&str],
    netns: Option<&str>,
    roots: &[PathBuf],
    pids: &mut BTreeSet<u32>,
    prefix: &str,
) {
    for root in roots {
        pids.extend(recorded_pids(root));
    }
    if pids.iter().any(|p| alive(*p)) || !namespaces_with(prefix).is_empty() {
        let _ = herd_in(netns, down);
    }
    for pid in pids.iter().filter(|p| alive(**p)) {
        kill_group(*pid);
    }
    for ns in namespaces_with(prefix) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}

/// [`undo`] when dropped: what an inventory test keeps to clean up after itself.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// `herd` arguments that stop the cluster (`down --inventory FILE --state-dir DIR`).
    pub down: Vec<String>,
    /// The namespace `herd down` runs in (`None`: this host).
    pub netns: Option<String>,
    /// State directories whose recorded pids are killed if still running.
    pub roots: Vec<PathBuf>,
    /// Pids seen so far (those recorded under `roots` are added when dropped).
    pub pids: BTreeSet<u32>,
    /// Namespaces starting with it are removed.
    pub prefix: String,
}

impl Cleanup {
    /// Adds the pids recorded under `roots` now (before a step that replaces processes).
    pub fn remember(&mut self) {
        for root in &self.roots {
            self.pids.extend(recorded_pids(root));
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let down: Vec<&str> = self.down.iter().map(String::as_str).collect();
        undo(
            &down,
            self.netns.as_deref(),
            &self.roots,
            &mut self.pids,
            &self.prefix,
        );
    }
}
