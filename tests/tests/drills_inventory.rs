//! `herd drill --inventory FILE`, end to end through the real `herd` binary, on a 5-host netns
//! inventory (two gateway hosts sharing a floating address, two worker machines, a Redis host):
//! - `herd up --inventory`, then `herd drill all --inventory` PASSes every drill — the workers
//!   killed, hung and cut off, the active gateway killed, cut off and stopped, Redis restarted,
//!   a worker added and one drained, all under load sent from the drill's own client namespace
//!   to the floating address — and leaves the cluster as it found it (`herd status` healthy);
//!   `herd down` then leaves no namespace (the drill's client one included) and no process;
//! - the same inventory with gateway retries and hedging off (`gateways.env`) makes
//!   `worker-kill` FAIL with the right reason: a drill that cannot fail is worthless; and Ctrl-C
//!   during a `worker-hang` exits 130 with the worker continued and the client namespace gone;
//! - `--inventory` with `--lab`, and a bad inventory file, are refused with exit 2.
//!
//! Needs root (network namespaces), like CI. Every namespace and process is removed also when a
//! test fails ([`Cleanup`]). Namespaces are `herdinv-hid…`; the tests run one at a time.

use herd_tests::drill_report::one_reset_at_the_move;
use herd_tests::inventory::{alive, kill_group, namespaces_with, recorded_pids};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herd::binaries;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Longest one `herd` command may take (a whole `drill all` included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(150);
/// Load per drill.
const DURATION: &str = "4s";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `herd ARGS…` to completion (bounded: SIGTERM after [`COMMAND_TIMEOUT`], which makes a
/// drill undo its fault and exit).
fn herd(args: &[&str]) -> Output {
    let program = binaries::locate(binaries::HERD).expect("herd is built (cargo build --bins)");
    let began = Instant::now();
    let child = Command::new(&program)
        .args(args)
        .env_remove("HERD_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herd starts");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let output = child.wait_with_output();
        let _ = done_tx.send(());
        output
    });
    if done_rx.recv_timeout(COMMAND_TIMEOUT).is_err() {
        let _ = herd::process::signal_pid(pid, Signal::SIGTERM);
    }
    let output = waiter.join().unwrap().expect("herd output");
    println!(
        "$ herd {}  ({:.1} s, exit {:?})\n{}{}",
        args.join(" "),
        began.elapsed().as_secs_f64(),
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        // The drill's progress line redraws with \r; the last state of each line is enough.
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .map(|l| l.rsplit('\r').next().unwrap_or(""))
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    );
    output
}

/// A 5-host netns inventory written to a temporary directory; brought down however the test
/// ends: `herd down`, then SIGKILL for every process ever recorded and removal of every
/// namespace with its prefix.
struct Cleanup {
    dir: tempfile::TempDir,
    name: String,
    pids: BTreeSet<u32>,
}

impl Cleanup {
    /// Writes inventory `hid{tag}{pid}` on segment `10.{subnet}.0.0/24`, gateways with `env`.
    fn new(tag: char, subnet: u8, env: &[(&str, &str)]) -> Cleanup {
        let name = format!("hid{tag}{}", std::process::id() % 100_000);
        let env: String = env
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\"\n"))
            .collect();
        let machine = |name: &str, octet: u8| {
            format!(
                "[[machines]]\nname = \"{name}\"\naddress = \"10.{subnet}.0.{octet}\"\ntransport = \"netns\"\n"
            )
        };
        let text = format!(
            "name = \"{name}\"\n{}{}{}{}{}\
             [redis]\nmachine = \"db\"\n\
             [gateways]\nmachines = [\"gw1\", \"gw2\"]\nfloating_address = \"10.{subnet}.0.10\"\n\
             [gateways.env]\n{env}\
             [[images]]\nname = \"demo\"\nper_machine = 2\nmachines = [\"m1\", \"m2\"]\n",
            machine("gw1", 11),
            machine("gw2", 12),
            machine("m1", 21),
            machine("m2", 22),
            machine("db", 5),
        );
        let dir = herd_tests::temp_dir();
        std::fs::write(dir.path().join("inventory.toml"), text).unwrap();
        Cleanup {
            dir,
            name,
            pids: BTreeSet::new(),
        }
    }

    fn file(&self) -> String {
        self.dir.path().join("inventory.toml").display().to_string()
    }

    fn state(&self) -> String {
        self.dir.path().join("state").display().to_string()
    }

    /// `--inventory FILE --state-dir DIR`.
    fn flags(&self) -> [String; 4] {
        [
            "--inventory".into(),
            self.file(),
            "--state-dir".into(),
            self.state(),
        ]
    }

    /// `herd ARGS… --inventory FILE --state-dir DIR`.
    fn herd(&self, args: &[&str]) -> Output {
        let flags = self.flags();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(flags.iter().map(String::as_str));
        herd(&all)
    }

    fn prefix(&self) -> String {
        format!("herdinv-{}-", self.name)
    }

    fn remember(&mut self) {
        let root = Path::new(&self.state()).join(format!("inventory-{}", self.name));
        self.pids.extend(recorded_pids(&root));
    }

    fn up(&mut self) {
        let up = self.herd(&["up"]);
        self.remember();
        assert!(up.status.success(), "herd up failed");
    }

    /// `herd drill KIND --json --duration 4s`: exit code and the report.
    fn drill(&self, kind: &str) -> (i32, Value) {
        let output = self.herd(&["drill", kind, "--json", "--duration", DURATION]);
        let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "no JSON report ({error}): {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), report)
    }

    /// `herd down`, then nothing of the inventory is left: no namespace, no process.
    fn down_leaves_nothing(&mut self) {
        self.remember();
        assert!(!self.pids.is_empty(), "pids were recorded");
        let down = self.herd(&["down"]);
        assert!(down.status.success(), "herd down failed");
        let left: Vec<_> = self.pids.iter().filter(|p| alive(**p)).collect();
        assert!(left.is_empty(), "still running after down: {left:?}");
        assert_eq!(
            namespaces_with(&self.prefix()),
            Vec::<String>::new(),
            "namespaces left"
        );
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.remember();
        if self.pids.iter().any(|p| alive(*p)) || !namespaces_with(&self.prefix()).is_empty() {
            let _ = self.herd(&["down"]);
        }
        for pid in self.pids.iter().filter(|p| alive(**p)) {
            kill_group(*pid);
        }
        for ns in namespaces_with(&self.prefix()) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}

fn require_root() -> bool {
    if herd::deps::is_root() {
        return true;
    }
    eprintln!("skipped: inventory drills need root (network namespaces), as CI has");
    false
}

fn assert_pass(kind: &str, report: &Value) {
    assert_eq!(report["verdict"], "pass", "{kind}: {report:#}");
    assert!(
        report["requests"]["sent"].as_u64().unwrap_or(0) > 0,
        "{kind}: {report:#}"
    );
    assert_eq!(report["sessions"]["checked"], 20, "{kind}: {report:#}");
    assert_eq!(report["sessions"]["lost"], 0, "{kind}: {report:#}");
}

#[test]
fn every_drill_passes_on_a_netns_inventory_and_down_leaves_nothing() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let began = Instant::now();
    let mut cluster = Cleanup::new('a', 241, &[]);
    cluster.up();

    let (code, report) = cluster.drill("all");
    let drills = report["drills"].as_array().expect("drills");
    let names: Vec<&str> = drills.iter().filter_map(|d| d["drill"].as_str()).collect();
    assert_eq!(
        names,
        [
            "worker-kill",
            "worker-hang",
            "machine-loss",
            "gateway-kill",
            "gateway-machine-loss",
            "gateway-stop",
            "redis-restart",
            "scale-up",
            "scale-down",
        ],
        "{report:#}"
    );
    let mut move_reset = false;
    for one in drills {
        let kind = one["drill"].as_str().unwrap_or_default();
        assert!(
            one["cluster"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&format!("inventory {}", cluster.name)),
            "{one:#}"
        );
        // As on the lab (tests/tests/drills.rs): one reset at the floating address's move is a
        // layer-2 limit, not a gateway fault; anything more still fails.
        if kind == "gateway-stop" && one["verdict"] == "fail" && one_reset_at_the_move(one) {
            eprintln!("gateway-stop: one request reset at the address's move: {one:#}");
            move_reset = true;
            continue;
        }
        assert_pass(kind, one);
    }
    if !move_reset {
        assert_eq!(report["verdict"], "pass", "{report:#}");
        assert_eq!(code, 0, "{report:#}");
    }
    // The machine drill cut a worker machine's link, the gateway drills moved the address
    // between two machines; the added worker took traffic.
    let scale_up = &drills[7];
    assert!(
        scale_up["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|note| note
                .as_str()
                .is_some_and(|n| n.contains("the added worker demo-m"))),
        "{scale_up:#}"
    );

    // Left as found: every unit runs and the active gateway sees every worker healthy; the
    // drill's client namespace is gone; the added worker is stopped.
    let status = cluster.herd(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "status says healthy");
    let json: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["workers"].as_array().unwrap().len(), 4, "{json:#}");
    assert!(
        !namespaces_with(&cluster.prefix()).contains(&format!("{}drill-client", cluster.prefix())),
        "the drill's client namespace is removed"
    );
    cluster.down_leaves_nothing();
    println!(
        "up, drill all, status, down: {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

#[test]
fn retries_and_hedging_off_fail_worker_kill_on_a_netns_inventory() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut cluster = Cleanup::new(
        'b',
        242,
        &[
            ("HERD_GATEWAY_RETRY__MAX_ATTEMPTS", "1"),
            // A hedge is a retry too (it answers for the killed worker's slow requests).
            ("HERD_GATEWAY_HEDGING__ENABLED", "false"),
        ],
    );
    cluster.up();
    let (code, report) = cluster.drill("worker-kill");
    assert_eq!(report["verdict"], "fail", "{report:#}");
    assert_eq!(code, 1, "{report:#}");
    let why = report["reason"].as_str().unwrap_or_default();
    assert!(why.contains("idempotent requests failed"), "{why}");
    interrupt_a_hang(&cluster);
    cluster.down_leaves_nothing();
}

/// Whether process `pid` is stopped (SIGSTOP): state `T` in `/proc/PID/stat`.
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// Runs a 20 s worker-hang, sends SIGINT while the worker is stopped (6 s into the load), and
/// checks that herd exits 130 with no worker left stopped and its client namespace removed.
fn interrupt_a_hang(cluster: &Cleanup) {
    let program = binaries::locate(binaries::HERD).expect("herd is built");
    let flags = cluster.flags();
    let mut child = Command::new(program)
        .args(["drill", "worker-hang", "--duration", "20s"])
        .args(&flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let root = Path::new(&cluster.state()).join(format!("inventory-{}", cluster.name));
    let stopped = herd::pid::wait(Duration::from_secs(20), || {
        recorded_pids(&root).into_iter().any(is_stopped)
    });
    let _ = herd::process::signal_pid(child.id(), Signal::SIGINT);
    let exited = herd::pid::wait(Duration::from_secs(30), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(stopped, "the drill never stopped a worker");
    assert_eq!(status.code(), Some(130), "{status:?}");
    let left: Vec<u32> = recorded_pids(&root)
        .into_iter()
        .filter(|p| is_stopped(*p))
        .collect();
    assert!(left.is_empty(), "left stopped: {left:?}");
    assert!(
        !namespaces_with(&cluster.prefix()).contains(&format!("{}drill-client", cluster.prefix())),
        "the drill's client namespace is removed on Ctrl-C"
    );
}

#[test]
fn inventory_with_lab_and_a_bad_inventory_exit_2() {
    let dir = herd_tests::temp_dir();
    let bad: PathBuf = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nno_such_key = 1\n").unwrap();
    let bad = bad.display().to_string();
    let output = herd(&["drill", "worker-kill", "--lab", "--inventory", &bad]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--lab and --inventory"),
        "names the flags"
    );
    let output = herd(&["drill", "worker-kill", "--inventory", &bad]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no_such_key"),
        "names the key"
    );
}
