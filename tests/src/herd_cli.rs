//! A local cluster run by the real `herd` binary, for tests of the operator commands (`up`,
//! `scale`, `rollout`, `status`, the supervisor): [`HerdCluster::up`] runs `herd up --detach` on
//! free ports in a temp state directory; dropping it runs `herd down` and then SIGKILLs every
//! process the state file ever named, also when the test panics.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use herd::binaries;
use herd::pid::ProcessId;
use herd::state::{Member, State, StateDir};
use nix::sys::signal::Signal;

/// Longest a `herd` command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// A cluster started with `herd up --detach`.
pub struct HerdCluster {
    _dir: tempfile::TempDir,
    /// Its state directory.
    pub state_dir: PathBuf,
    seen: std::sync::Mutex<Vec<ProcessId>>,
}

impl HerdCluster {
    /// `herd up --detach --workers N` on free ports; panics with herd's output if it fails.
    pub async fn up(workers: u16) -> HerdCluster {
        let dir = crate::temp_dir();
        let state_dir = dir.path().join("state");
        let cluster = HerdCluster {
            _dir: dir,
            state_dir,
            seen: std::sync::Mutex::new(Vec::new()),
        };
        let workers = workers.to_string();
        let up = cluster
            .herd(&[
                "up",
                "--detach",
                "--workers",
                &workers,
                "--port",
                "0",
                "--admin-port",
                "0",
            ])
            .await;
        assert!(up.status.success(), "herd up --detach: {}", describe(&up));
        cluster.state();
        cluster
    }

    /// Runs `herd ARGS… --state-dir DIR` to completion (bounded).
    pub async fn herd(&self, args: &[&str]) -> Output {
        let run = tokio::process::Command::new(herd_binary())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
            Ok(output) => output.expect("herd runs"),
            Err(_) => panic!(
                "`herd {}` did not finish in {COMMAND_TIMEOUT:?}",
                args.join(" ")
            ),
        };
        if self.state_dir.join("state.json").exists() {
            self.state();
        }
        output
    }

    /// The state file now (and remembers its processes for the clean-up).
    pub fn state(&self) -> State {
        let state = StateDir::new(&self.state_dir)
            .unwrap()
            .load()
            .expect("state file readable")
            .expect("state file present");
        let mut seen = self.seen.lock().unwrap();
        for member in &state.members {
            if !seen.contains(&member.process) {
                seen.push(member.process);
            }
        }
        state
    }

    /// The recorded member called `name`.
    pub fn member(&self, name: &str) -> Member {
        self.state()
            .members
            .into_iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no member {name} in the state file"))
    }

    /// The public URL.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.state().public_url)
    }

    /// The worker ids the active gateway sends traffic to, sorted (from `herd status --json`).
    pub async fn serving_workers(&self) -> Vec<String> {
        let status = self.herd(&["status", "--json"]).await;
        let report: serde_json::Value = serde_json::from_slice(&status.stdout)
            .unwrap_or_else(|error| panic!("status --json: {error}: {}", describe(&status)));
        let mut ids: Vec<String> = report["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .filter(|w| matches!(w["state"].as_str(), Some("healthy" | "slow_start")))
            .filter_map(|w| w["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    /// A log file of the cluster.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.state_dir.join("logs").join(name)).unwrap_or_default()
    }
}

impl Drop for HerdCluster {
    fn drop(&mut self) {
        let _ = Command::new(herd_binary())
            .arg("down")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for process in self.seen.lock().unwrap().iter() {
            process.signal(Signal::SIGKILL);
        }
    }
}

/// The `herd` executable beside the test's.
pub fn herd_binary() -> PathBuf {
    binaries::locate(binaries::HERD).unwrap_or_else(|error| panic!("{error}"))
}

/// Exit code and output of a command, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
