//! The operator CLI end to end, through the real `herd` binary: `herd up --detach` starts a
//! cluster that serves a login and a cart through the URL it records, `herd status` says it is
//! healthy, and `herd down` leaves no process running; a foreground `herd up` stops everything
//! and exits 0 on Ctrl-C (SIGINT).
//!
//! Every test holds a [`Guard`] that, however the test ends, runs `herd down` and then SIGKILLs
//! any process it has seen in the state file that still runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use herd::binaries;
use herd::pid::ProcessId;
use herd::state::{State, StateDir};
use herd_tests::{client, temp_dir, wait_until};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// Longest a `herd` command may take (builds nothing; starts at most a cluster).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Cleans up after a test, also when it panics: `herd down`, then SIGKILL for anything left.
struct Guard {
    state_dir: PathBuf,
    /// Every process seen in the state file (plus a foreground `herd up`).
    seen: Vec<ProcessId>,
    foreground: Option<Child>,
}

impl Guard {
    fn new(state_dir: &Path) -> Self {
        Guard {
            state_dir: state_dir.to_path_buf(),
            seen: Vec::new(),
            foreground: None,
        }
    }

    /// Remembers every process of `state`.
    fn remember(&mut self, state: &State) {
        for member in &state.members {
            if !self.seen.contains(&member.process) {
                self.seen.push(member.process);
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.foreground.take()
            && child.try_wait().ok().flatten().is_none()
        {
            // A foreground `herd up` stops its cluster on SIGTERM; SIGKILL if it doesn't exit.
            let _ = herd::process::signal_pid(child.id(), Signal::SIGTERM);
            let exited = herd::pid::wait(Duration::from_secs(40), || {
                child.try_wait().ok().flatten().is_some()
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = Command::new(herd_binary())
            .arg("down")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for process in &self.seen {
            process.signal(Signal::SIGKILL);
        }
    }
}

fn herd_binary() -> PathBuf {
    binaries::locate(binaries::HERD).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs `herd ARGS…` to completion (bounded) and returns its output.
async fn herd(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(herd_binary())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
        Ok(output) => output.expect("herd runs"),
        Err(_) => panic!(
            "`herd {}` did not finish in {COMMAND_TIMEOUT:?}",
            args.join(" ")
        ),
    }
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn load_state(dir: &Path) -> Option<State> {
    StateDir::new(dir)
        .unwrap()
        .load()
        .expect("state file readable")
}

/// Logs in and adds two items through `url`; returns the workers that answered.
async fn login_and_fill_cart(url: &str) -> Vec<String> {
    let user = client();
    let login = user
        .post(format!("{url}/login"))
        .json(&json!({"user": "ann"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "login: {:?}", login.text().await);
    let mut workers = Vec::new();
    for item in ["apple", "pear"] {
        let added = user
            .post(format!("{url}/cart/items"))
            .json(&json!({"item": item, "qty": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), 200, "adding {item}");
        workers.push(
            added.headers()["x-herd-worker"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    let cart: Value = user
        .get(format!("{url}/cart"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items: Vec<&str> = cart["items"]
        .as_array()
        .expect("cart has items")
        .iter()
        .filter_map(|item| item["item"].as_str())
        .collect();
    assert_eq!(items, ["apple", "pear"], "cart: {cart}");
    workers
}

fn assert_nothing_runs(state: &State) {
    let running: Vec<String> = state
        .members
        .iter()
        .filter(|m| m.process.is_running())
        .map(|m| format!("{} (pid {})", m.name, m.process.pid))
        .collect();
    assert!(running.is_empty(), "still running: {running:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_up_serves_then_down_leaves_no_process() {
    let dir = temp_dir();
    let state_dir = dir.path().join("state");
    let state_arg = state_dir.to_str().unwrap();
    let mut guard = Guard::new(&state_dir);

    let up = herd(&[
        "up",
        "--detach",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--state-dir",
        state_arg,
    ])
    .await;
    let state = load_state(&state_dir);
    if let Some(state) = &state {
        guard.remember(state);
    }
    assert!(up.status.success(), "herd up --detach: {}", describe(&up));
    let state = state.expect("herd up --detach wrote the state file");
    assert_eq!(
        state.members.len(),
        7,
        "supervisor + redis + 3 workers + 2 gateways"
    );
    assert!(state.detached);
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        stdout.contains(&format!("herd is up: {}", state.public_url)),
        "{}",
        describe(&up)
    );
    let token = std::fs::read_to_string(state_dir.join("admin-token")).unwrap();
    assert_eq!(token.trim(), state.admin_token);

    let workers = login_and_fill_cart(&state.public_url).await;
    assert!(workers.iter().all(|w| w.starts_with('w')), "{workers:?}");

    let status = herd(&["status", "--state-dir", state_arg]).await;
    assert_eq!(status.status.code(), Some(0), "{}", describe(&status));
    assert!(String::from_utf8_lossy(&status.stdout).contains("all 7 processes are healthy"));

    // The three workers share the machine's CPUs: at least one serving thread each.
    if std::env::var_os("HERD_WORKER_THREADS").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let expected = format!("HERD_WORKER_THREADS={}", (cpus / 3).max(1));
        let workers: Vec<_> = state
            .members
            .iter()
            .filter(|m| m.name.starts_with("worker-"))
            .collect();
        assert_eq!(workers.len(), 3);
        for member in workers {
            let environ = std::fs::read(format!("/proc/{}/environ", member.process.pid)).unwrap();
            assert!(
                environ.split(|b| *b == 0).any(|v| v == expected.as_bytes()),
                "{} was started without {expected}",
                member.name
            );
        }
    }

    // A second `herd up` on the same state directory is refused while the first one runs.
    let again = herd(&[
        "up",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--state-dir",
        state_arg,
    ])
    .await;
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("herd down"));

    let down = herd(&["down", "--state-dir", state_arg]).await;
    assert!(down.status.success(), "herd down: {}", describe(&down));
    assert_nothing_runs(&state);
    assert!(
        load_state(&state_dir).is_none(),
        "the state file is removed"
    );

    let status = herd(&["status", "--state-dir", state_arg]).await;
    assert_eq!(status.status.code(), Some(3), "{}", describe(&status));
    let down = herd(&["down", "--state-dir", state_arg]).await;
    assert!(down.status.success(), "a second down: {}", describe(&down));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_up_stops_everything_on_sigint() {
    let dir = temp_dir();
    let state_dir = dir.path().join("state");
    let mut guard = Guard::new(&state_dir);
    let out_path = dir.path().join("herd-up.out");
    let child = Command::new(herd_binary())
        .args(["up", "--port", "0", "--admin-port", "0", "--state-dir"])
        .arg(&state_dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(dir.path().join("herd-up.err")).unwrap())
        .spawn()
        .expect("herd up starts");
    let herd_pid = child.id();
    guard.foreground = Some(child);
    let output = || {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            std::fs::read_to_string(&out_path).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("herd-up.err")).unwrap_or_default()
        )
    };

    // Up means: the banner is printed (the state file is written just before it).
    wait_until(
        COMMAND_TIMEOUT,
        "herd up prints that the cluster is up",
        || {
            let printed = std::fs::read_to_string(&out_path)
                .unwrap_or_default()
                .contains("herd is up");
            // Our own unreaped child shows as a zombie once it has exited: not running.
            let exited_early = !printed && !ProcessId::of(herd_pid).is_running();
            let text = if exited_early {
                output()
            } else {
                String::new()
            };
            async move {
                assert!(!exited_early, "herd up exited early:\n{text}");
                printed
            }
        },
    )
    .await;
    let state = load_state(&state_dir).expect("state file while up");
    guard.remember(&state);
    assert!(!state.detached);
    assert_eq!(state.supervisor().map(|s| s.process.pid), Some(herd_pid));
    login_and_fill_cart(&state.public_url).await;

    herd::process::signal_pid(herd_pid, Signal::SIGINT).unwrap();
    let child = guard.foreground.as_mut().unwrap();
    let exited = tokio::task::block_in_place(|| {
        herd::pid::wait(COMMAND_TIMEOUT, || {
            child.try_wait().ok().flatten().is_some()
        })
    });
    assert!(exited, "herd up did not exit after SIGINT:\n{}", output());
    let status = child.try_wait().unwrap().unwrap();
    assert!(status.success(), "herd up exit {status}:\n{}", output());
    assert_nothing_runs(&state);
    assert!(
        load_state(&state_dir).is_none(),
        "the state file is removed"
    );
    assert!(output().contains("nothing left running"), "{}", output());
}
