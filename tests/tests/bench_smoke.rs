//! `herd bench` end to end, through the real `herd` binary, kept short: `herd bench proxy` loads
//! every target (direct, herd-gateway, HAProxy, nginx) once for 1 s (and herd-gateway in front
//! of a plain hyper upstream over HTTP/1.1 and HTTP/2), `herd bench health`
//! registers 20 workers, and `herd bench soak` holds 500 connections for 15 s with one worker
//! killed; `infra/bench/ab-gateways.sh` compares gateway builds for 1 s a target. Each must
//! print its table with traffic, leave no process behind, and remove its temporary directory.
//!
//! Needs wrk, h2load, redis-server, haproxy and nginx (`infra/test.sh` installs them; as root `herd` installs them
//! itself when missing).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use herd::binaries;
use herd_tests::temp_dir;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Longest a bench command may take here (start-up, warm-up, runs, stop).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The tests of this file run two at a time (one per core of a CI machine); those that measure
/// what a proxy gets of the machine (its CPU budget, a fixed request rate) run alone.
static MACHINE: RwLock<()> = RwLock::new(());

/// Held by a test that may run beside another.
fn beside_others() -> RwLockReadGuard<'static, ()> {
    MACHINE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Held by a test that measures the machine: no other test of this file runs meanwhile.
fn alone() -> RwLockWriteGuard<'static, ()> {
    MACHINE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn herd_binary() -> PathBuf {
    binaries::locate(binaries::HERD).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs `herd ARGS…` to completion within [`COMMAND_TIMEOUT`].
fn herd(args: &[&str], tmp: &Path) -> Output {
    let mut command = Command::new(herd_binary());
    command.args(args);
    bounded(command, &format!("herd {}", args.join(" ")), tmp)
}

/// Runs `command` with `TMPDIR=tmp` to completion within [`COMMAND_TIMEOUT`]. On a timeout it
/// gets SIGTERM (herd and the bench scripts then stop everything they started), and SIGKILL if
/// that does not end it.
fn bounded(mut command: Command, what: &str, tmp: &Path) -> Output {
    let mut child: Child = command
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("herd starts");
    // Drain the pipes on threads so a chatty run can't block on a full pipe.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut text).map(|_| text)
    });
    let err = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut text).map(|_| text)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = herd::process::signal_pid(child.id(), Signal::SIGTERM);
            std::thread::sleep(Duration::from_secs(15));
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` did not finish in {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().expect("reader").unwrap_or_default(),
        stderr: err.join().expect("reader").unwrap_or_default(),
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

/// The cells of the Markdown table row whose first cell is `first`.
fn row<'a>(table: &'a str, first: &str) -> Option<Vec<&'a str>> {
    table.lines().find_map(|line| {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        (cells.first() == Some(&first)).then_some(cells)
    })
}

/// The row of `target` in `table` (a scenario's part of the `whole` output), checked to show
/// traffic and no errors.
fn served<'a>(table: &'a str, target: &str, whole: &str) -> Vec<&'a str> {
    let cells = row(table, target).unwrap_or_else(|| panic!("no {target} row:\n{whole}"));
    let rps: f64 = cells[2]
        .replace(',', "")
        .parse()
        .expect("req/s is a number");
    assert!(rps > 0.0, "{target}: no traffic\n{whole}");
    assert_eq!(cells.last(), Some(&"0 / 0"), "{target}: errors\n{whole}");
    cells
}

/// No directory named `herd-bench-*` is left in `tmp`.
fn assert_temp_dirs_removed(tmp: &Path) {
    let left: Vec<String> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("herd-bench-"))
        .collect();
    assert!(left.is_empty(), "temporary directories left: {left:?}");
}

/// No process started by the bench still runs: they all inherited `TMPDIR=tmp` from herd.
fn assert_no_process_left(tmp: &Path) {
    let running = started_by_bench(tmp);
    assert!(running.is_empty(), "still running: {running:?}");
}

/// The command lines of the processes that run with `TMPDIR=tmp` (what a bench given it started).
fn started_by_bench(tmp: &Path) -> Vec<String> {
    started_by_bench_with_pids(tmp)
        .into_iter()
        .map(|(_, command)| command)
        .collect()
}

/// [`started_by_bench`], with each one's pid.
fn started_by_bench_with_pids(tmp: &Path) -> Vec<(u32, String)> {
    let needle = format!("TMPDIR={}\0", tmp.display());
    let mut running = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if String::from_utf8_lossy(&environ).contains(&needle) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            running.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    running
}

/// Kills (SIGKILL) what still runs with `TMPDIR` set to its directory when dropped: a test that
/// fails because a bench left processes behind must not leave them too.
struct KillLeftovers<'a>(&'a Path);

impl Drop for KillLeftovers<'_> {
    fn drop(&mut self) {
        for (pid, _) in started_by_bench_with_pids(self.0) {
            let _ = herd::process::signal_pid(pid, Signal::SIGKILL);
        }
    }
}

#[test]
fn bench_proxy_measures_every_target_without_errors() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let json = dir.path().join("proxy.json");
    let out = dir.path().join("proxy.md");
    let output = herd(
        &[
            "bench",
            "proxy",
            "--duration",
            "1s",
            "--rounds",
            "1",
            "--concurrency",
            "8",
            "--scenarios",
            "hello",
            "--targets",
            "direct,herd,herd-1t,haproxy,nginx",
            "--out",
            out.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim_end(),
        table.trim_end()
    );
    for target in ["direct", "herd", "herd-1t", "haproxy", "nginx"] {
        let cells = served(&table, target, &table);
        assert_eq!(cells[1], "8", "{target}: concurrency\n{table}");
        if target != "direct" {
            let cpu: f64 = cells[6].parse().expect("CPU s / 10k is a number");
            assert!(cpu >= 0.0, "{target}: CPU\n{table}");
            let kernel: f64 = cells[8].parse().expect("kernel % is a number");
            assert!(
                (0.0..=100.0).contains(&kernel),
                "{target}: kernel %\n{table}"
            );
        }
    }
    assert!(table.contains("herd / haproxy req/s: c=8 "), "{table}");
    assert!(table.contains("herd / nginx req/s: c=8 "), "{table}");
    // Beside each target, what the upstreams and the load generator spent per request, and
    // how many CPUs were busy in all: every figure measured, the sum within the machine.
    let (_, split) = table
        .split_once("CPU µs per request over the machine")
        .unwrap_or_else(|| panic!("no CPU split of the machine:\n{table}"));
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    for target in ["direct", "herd", "herd-1t", "haproxy", "nginx"] {
        let cells = row(split, target).unwrap_or_else(|| panic!("no {target} split:\n{table}"));
        let number = |cell: &str| -> f64 {
            cell.parse()
                .unwrap_or_else(|_| panic!("{target}: {cell:?} is not a figure\n{table}"))
        };
        let proxy = if target == "direct" {
            0.0
        } else {
            number(cells[2])
        };
        let (upstream, load, all) = (number(cells[3]), number(cells[4]), number(cells[5]));
        assert!(
            target == "direct" || proxy > 0.0,
            "{target}: proxy\n{table}"
        );
        assert!(upstream > 0.0, "{target}: upstream side\n{table}");
        assert!(load > 0.0, "{target}: load generator\n{table}");
        // Each figure rounded to 0.1 on its own.
        assert!(
            (proxy + upstream + load - all).abs() < 0.2,
            "{target}: the parts make the whole\n{table}"
        );
        let busy = number(cells[6]);
        assert!(
            busy > 0.0 && busy < cpus + 0.5,
            "{target}: CPUs busy\n{table}"
        );
    }

    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = raw["results"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 5, "{raw}");
    for run in runs {
        assert!(run["requests"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(run["non_2xx"], 0, "{run}");
        assert_eq!(run["socket_errors"], 0, "{run}");
        if run["target"] != "direct" {
            let (cpu, system) = (&run["cpu_seconds"], &run["cpu_system_seconds"]);
            assert!(cpu.as_f64().unwrap() >= system.as_f64().unwrap(), "{run}");
        }
        // A second of full load: the workers spend several 10 ms ticks of it.
        assert!(run["upstream_cpu_seconds"].as_f64().unwrap() > 0.0, "{run}");
        assert!(run["load_cpu_seconds"].as_f64().unwrap() > 0.0, "{run}");
    }
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
}

/// Runs `herd bench proxy` on `scenario` through all three proxies (one round of 1 s at c=8);
/// checks that the table says what was `loaded`, that each proxy answered every request (no
/// error, no non-2xx), and that nothing was left behind. Returns the runs from the JSON.
fn every_proxy_serves(scenario: &str, loaded: &str) -> Vec<Value> {
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let json = dir.path().join(format!("{scenario}.json"));
    let output = herd(
        &[
            "bench",
            "proxy",
            "--duration",
            "1s",
            "--rounds",
            "1",
            "--concurrency",
            "8",
            "--scenarios",
            scenario,
            "--targets",
            "herd,haproxy,nginx",
            "--json",
            json.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(table.contains(loaded), "{table}");
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = raw["results"]["runs"].as_array().expect("runs").clone();
    assert_eq!(runs.len(), 3, "{raw}");
    for run in &runs {
        assert_eq!(run["scenario"], scenario, "{run}");
        assert!(run["requests"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(run["non_2xx"], 0, "{run}");
        assert_eq!(run["socket_errors"], 0, "{run}");
    }
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
    runs
}

/// The `api` scenario: every request a `POST` with a JSON body, through all three proxies; each
/// answers every one (no error, no non-2xx), and the table says what was loaded.
#[test]
fn bench_proxy_api_posts_a_body_through_every_proxy() {
    let _machine = beside_others();
    every_proxy_serves("api", "`POST /` with a 95-byte JSON body");
}

/// The `close` scenario: a new connection per request (`Connection: close`), through all three
/// proxies; each answers every one, and the table says what was loaded.
#[test]
fn bench_proxy_close_opens_a_connection_per_request_through_every_proxy() {
    let _machine = beside_others();
    every_proxy_serves(
        "close",
        "`GET /` with `Connection: close`, a new connection per request",
    );
}

/// The `page` scenario: every answer 64 KiB, carried whole by all three proxies (by the bytes
/// the load generator read).
#[test]
fn bench_proxy_page_carries_64_kib_answers_through_every_proxy() {
    let _machine = beside_others();
    for run in every_proxy_serves("page", "`GET /page` → hello app, a 64 KiB answer") {
        let requests = run["requests"].as_u64().unwrap();
        // Every answer the page and its head, through each proxy (wrk's exact count: its
        // report's `0.86GB` alone is ±5 MiB, a few hundred bytes an answer).
        let per_answer = run["bytes_read"].as_u64().unwrap() / requests;
        assert!(
            (65_536..67_584).contains(&per_answer),
            "{per_answer} bytes an answer: {run}"
        );
    }
}

/// The TLS scenarios: all three proxies terminate HTTPS with one certificate the bench makes,
/// over HTTP/1.1 (wrk) and over HTTP/2 negotiated with ALPN (h2load, h2 only: a proxy that
/// answered over HTTP/1.1 would fail the run), without errors.
#[test]
fn bench_proxy_measures_https_over_http1_and_http2() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let json = dir.path().join("proxy.json");
    let output = herd(
        &[
            "bench",
            "proxy",
            "--duration",
            "1s",
            "--warmup",
            "1s",
            "--rounds",
            "1",
            "--concurrency",
            "16",
            "--scenarios",
            "tls-ecdsa,tls-h2,browser",
            "--targets",
            "herd,haproxy,nginx",
            "--json",
            json.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    for scenario in ["### tls-ecdsa", "### tls-h2", "### browser"] {
        let table = text
            .split(scenario)
            .nth(1)
            .unwrap_or_else(|| panic!("no {scenario} table:\n{text}"));
        for target in ["herd", "haproxy", "nginx"] {
            served(table, target, &text);
        }
    }
    assert!(text.contains("HTTP/2 over TLS (ALPN h2)"), "{text}");
    assert!(text.contains("a browser's 13 request headers"), "{text}");
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = raw["results"]["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 9, "{raw}");
    for run in runs {
        assert!(run["error"].is_null(), "{run}");
        assert!(run["requests"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(run["non_2xx"], 0, "{run}");
        assert_eq!(run["socket_errors"], 0, "{run}");
    }
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
}

/// `--upstream node`: the proxies in front of Node.js's own http server, whose answers carry
/// `Connection: keep-alive` and `Keep-Alive` (as Express apps' do), served through both; the
/// session scenario is refused as with hyper, and HTTP/2 with the direct target (Node speaks
/// HTTP/1.1 only: it would read 0 req/s).
#[test]
fn bench_proxy_runs_in_front_of_a_node_upstream() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    refused_before_starting(&tmp, "node", "session", "--upstream node serves hello");
    refused_before_starting(&tmp, "node", "h2", "leave direct out of --targets");
    served_in_front_of(&tmp, "node", &["hello"]);
}

/// `--upstream hyper`: the proxies in front of a minimal hyper server (`herd bench upstream`)
/// instead of herd-worker, over HTTP/1.1 and HTTP/2; the session scenario, which needs the demo
/// app, is refused with a usage error before anything starts.
#[test]
fn bench_proxy_runs_in_front_of_a_plain_hyper_upstream() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    refused_before_starting(&tmp, "hyper", "hello,session", "--upstream herd-worker");
    served_in_front_of(&tmp, "hyper", &["hello", "h2"]);
}

/// `herd bench proxy --upstream UPSTREAM --scenarios SCENARIOS` is a usage error (exit 2) whose
/// message says `why`.
fn refused_before_starting(tmp: &Path, upstream: &str, scenarios: &str, why: &str) {
    let args = [
        "bench",
        "proxy",
        "--upstream",
        upstream,
        "--scenarios",
        scenarios,
    ];
    let refused = herd(&args, tmp);
    assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(why),
        "{}",
        describe(&refused)
    );
}

/// One short round of `scenarios` in front of `upstream`: direct and herd both serve, and
/// nothing the bench started is left.
fn served_in_front_of(tmp: &Path, upstream: &str, scenarios: &[&str]) {
    let joined = scenarios.join(",");
    let output = herd(
        &[
            "bench",
            "proxy",
            "--upstream",
            upstream,
            "--duration",
            "1s",
            "--rounds",
            "1",
            "--concurrency",
            "8",
            "--scenarios",
            &joined,
            "--targets",
            "direct,herd",
        ],
        tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        text.contains(&format!("2 upstreams ({upstream})")),
        "{text}"
    );
    for scenario in scenarios {
        let table = text
            .split(&format!("### {scenario}"))
            .nth(1)
            .unwrap_or_else(|| panic!("no {scenario} table:\n{text}"));
        for target in ["direct", "herd"] {
            served(table, target, &text);
        }
    }
    assert_temp_dirs_removed(tmp);
    assert_no_process_left(tmp);
}

/// `--proxy-cpus`: every proxy starts inside a cgroup held to a share of one CPU, uses about
/// all of it (so the budget, not the rest of the machine, bounds its req/s), and the cgroups are
/// gone afterwards; a budget out of range is a usage error before anything starts.
#[test]
fn bench_proxy_holds_every_proxy_to_the_same_cpu_budget() {
    let _machine = alone();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    for out_of_range in ["1.5", "0.05"] {
        let refused = herd(&["bench", "proxy", "--proxy-cpus", out_of_range], &tmp);
        assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("--proxy-cpus must be from 0.1 to 1"),
            "{}",
            describe(&refused)
        );
    }
    if let Err(why) = herd::bench::cpu_budget::can_be_made() {
        eprintln!("SKIPPED: no cgroup with the cpu controller can be made here: {why}");
        return;
    }

    let json = dir.path().join("budget.json");
    let output = herd(
        &[
            "bench",
            "proxy",
            "--proxy-cpus",
            "0.2",
            "--duration",
            "2s",
            "--rounds",
            "1",
            "--concurrency",
            "32",
            "--scenarios",
            "hello",
            "--targets",
            "direct,herd,haproxy,nginx",
            "--json",
            json.to_str().unwrap(),
        ],
        &tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(table.contains("Every proxy held to 0.2 CPU"), "{table}");
    let (_, budget) = table.split_once("CPU budget (medians)").unwrap_or_else(|| {
        panic!(
            "no budget table:
{table}"
        )
    });
    assert!(
        row(budget, "direct").is_none(),
        "direct is not held
{table}"
    );
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(raw["results"]["options"]["proxy_cpus"], 0.2, "{raw}");
    for run in raw["results"]["runs"].as_array().expect("runs") {
        assert_eq!(run["non_2xx"], 0, "{run}");
        assert_eq!(run["socket_errors"], 0, "{run}");
        if run["target"] == "direct" {
            assert!(run["budget_used"].is_null(), "{run}");
            continue;
        }
        // Held: at most its budget (two 10 ms ticks of rounding in 2 s); loaded with 32
        // connections it uses nearly all of it, and the quota holds it back in many of the
        // ~200 periods. Not in most: a proxy that drains its queue within a period (its load
        // generator and upstreams share two cores) is not held in that one; CI saw nginx held
        // in 48 % of the periods while using 96 % of its budget.
        let used = run["budget_used"].as_f64().unwrap();
        assert!((0.75..=1.1).contains(&used), "budget used {used}: {run}");
        assert!(run["throttled_share"].as_f64().unwrap() > 0.2, "{run}");
    }
    let left: Vec<String> = [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpu,cpuacct",
    ]
    .iter()
    .filter_map(|root| std::fs::read_dir(root).ok())
    .flat_map(|entries| entries.flatten())
    .map(|entry| entry.file_name().to_string_lossy().into_owned())
    .filter(|name| name.starts_with("herd-bench-"))
    .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
}

/// A `herd bench` killed with SIGKILL, which gives it no chance to stop anything, leaves no
/// process behind: the kernel kills what it started (`setpriv --pdeathsig`).
#[test]
fn a_bench_killed_with_sigkill_leaves_no_process_behind() {
    let _machine = beside_others();
    let tmp = temp_dir();
    let _leftovers = KillLeftovers(tmp.path());
    let mut bench = Command::new(herd_binary())
        .args([
            "bench",
            "proxy",
            "--targets",
            "herd",
            "--scenarios",
            "hello",
        ])
        .args(["--rounds", "1", "--duration", "30s", "--warmup", "0s"])
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("herd starts");
    // Until the load runs: two workers, the gateway and wrk.
    let started = Instant::now();
    let running = loop {
        let running = started_by_bench(tmp.path());
        // wrk itself, not `setpriv … wrk` before it has set its death signal and exec'd.
        let is_wrk = |command: &String| {
            let program = command.split(' ').next().unwrap_or("");
            program == "wrk" || program.ends_with("/wrk")
        };
        if running.iter().any(is_wrk) {
            break running;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60) && bench.try_wait().unwrap().is_none(),
            "the bench did not start its load: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        running
            .iter()
            .any(|command| command.contains("herd-gateway")),
        "{running:?}"
    );

    bench.kill().unwrap();
    bench.wait().unwrap();
    let killed = Instant::now();
    while !started_by_bench(tmp.path()).is_empty() && killed.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_no_process_left(tmp.path());
}

#[test]
fn bench_health_checks_twenty_registered_workers() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let output = herd(
        &["bench", "health", "--workers", "20", "--duration", "2s"],
        &tmp,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let cells = row(&table, "20").unwrap_or_else(|| panic!("no row for 20 workers:\n{table}"));
    assert_eq!(cells[1], "20", "every worker up\n{table}");
    assert_eq!(cells[3], "0", "no failed checks\n{table}");
    let cpu: f64 = cells[4].parse().expect("CPU % is a number");
    assert!((0.0..100.0).contains(&cpu), "{table}");
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
}

/// A short soak: 500 connections (50 active) for 15 s, one worker killed at 10 s and started
/// again. The command's mechanics are checked exactly: every connection open, traffic on active
/// and idle connections, the kill and the restart, a sample per second, no client socket and no
/// extra descriptor left in the gateway after the clients closed, everything stopped. The
/// verdict's other parts (RSS growth, failed requests) judge the gateway over a real soak, which
/// 15 s on a busy CI box can't; here the exit code must only agree with the printed verdict.
#[test]
fn bench_soak_holds_connections_through_a_worker_kill() {
    let _machine = beside_others();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let json = dir.path().join("soak.json");
    let output = herd(
        &[
            "bench",
            "soak",
            "--connections",
            "500",
            "--active",
            "50",
            "--rate",
            "100",
            "--duration",
            "15s",
            "--kill-every",
            "10s",
            "--idle-every",
            "5s",
            "--sample-every",
            "1s",
            "--json",
            json.to_str().unwrap(),
        ],
        &tmp,
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let passed = text.contains("\nverdict: PASS");
    assert!(
        passed || text.contains("\nverdict: FAIL"),
        "{}",
        describe(&output)
    );
    assert_eq!(
        output.status.code(),
        Some(if passed { 0 } else { 1 }),
        "{}",
        describe(&output)
    );
    assert!(row(&text, "start").is_some(), "{text}");
    assert!(row(&text, "closed").is_some(), "{text}");

    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let result = &raw["result"];
    let samples = result["samples"].as_array().expect("samples");
    assert!(samples.len() >= 14, "a sample a second: {result}");
    assert!(
        samples
            .iter()
            .all(|sample| sample["gateway"]["rss_kib"].as_u64() > Some(0)),
        "{result}"
    );
    assert_eq!(samples[0]["open"], 500, "every connection open: {result}");
    let most_clients = samples
        .iter()
        .filter_map(|sample| sample["gateway"]["client_sockets"].as_u64())
        .max();
    assert!(
        most_clients >= Some(500),
        "the gateway holds them: {result}"
    );
    assert_eq!(result["kills"], 1, "{result}");
    assert_eq!(result["restarts"], 1, "{result}");
    assert!(result["active_ok"].as_u64() > Some(500), "{result}");
    assert!(
        result["idle_ok"].as_u64() > Some(450),
        "every idle connection sent: {result}"
    );
    let end = &result["end"];
    assert_eq!(end["client_sockets"], 0, "{result}");
    let other = |reading: &Value| {
        reading["fds"].as_u64().unwrap()
            - reading["client_sockets"].as_u64().unwrap()
            - reading["upstream_sockets"].as_u64().unwrap()
    };
    assert!(
        other(end) <= other(&result["start"]) + 8,
        "descriptors back to the start: {result}"
    );
    assert_eq!(
        result["verdict"]["pass"].as_bool(),
        Some(passed),
        "{result}"
    );
    assert_temp_dirs_removed(&tmp);
    assert_no_process_left(&tmp);
}

/// `infra/bench/ab-gateways.sh`, the A/B script for gateway builds (docs/performance.md), kept
/// working: the session route against nginx with two gateways, HTTP/2 at a fixed rate against
/// HAProxy; each run prints every target's traffic, what the rest of the box spent per request
/// (the upstream side, the load generator), the medians and each target's CPU split, and leaves
/// nothing behind. A scenario it does not know is refused before anything starts.
#[test]
fn ab_gateways_script_compares_builds_on_the_session_route_h2_and_https() {
    let _machine = alone();
    let dir = temp_dir();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = root.join("infra/bench/ab-gateways.sh");
    let gateway = binaries::locate(binaries::GATEWAY).unwrap_or_else(|error| panic!("{error}"));
    let worker = binaries::locate(binaries::WORKER).unwrap_or_else(|error| panic!("{error}"));
    let ab = |env: &[(&str, &str)], gateways: &[&Path]| {
        let mut command = Command::new("bash");
        command
            .arg(&script)
            .args(["1", "1s", "16"])
            .args(gateways)
            .env("WORKER_BINARY", &worker)
            .envs(env.iter().copied());
        bounded(command, &format!("ab-gateways.sh {env:?}"), &tmp)
    };

    let refused = ab(&[("SCENARIO", "upload")], &[&gateway]);
    assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("SCENARIO: hello, session, h2 or tls"),
        "{}",
        describe(&refused)
    );

    let runs = [
        (vec![("SCENARIO", "session"), ("PEER", "nginx")], 2, "nginx"),
        (vec![("SCENARIO", "h2"), ("RATE", "2000")], 1, "haproxy"),
        // HTTPS/1.1: one certificate for the peer and the gateway, made by the script.
        (vec![("SCENARIO", "tls")], 1, "haproxy"),
        (vec![("SCENARIO", "tls"), ("PEER", "nginx")], 1, "nginx"),
    ];
    for (env, gateways, peer) in runs {
        let output = ab(&env, &vec![gateway.as_path(); gateways]);
        assert!(output.status.success(), "{env:?}: {}", describe(&output));
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let rounds: Vec<&str> = text.lines().filter(|l| l.starts_with("round 1 ")).collect();
        assert_eq!(rounds.len(), 1 + gateways, "{env:?}:\n{text}");
        assert!(
            rounds[0].starts_with(&format!("round 1  {peer} ")),
            "{text}"
        );
        let fixed_rate = env.contains(&("RATE", "2000"));
        // The number right after `label` in `line`.
        let figure = |line: &str, label: &str| -> f64 {
            line.split_once(label)
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("no {label} in {line:?}"))
        };
        for line in &rounds {
            let rps = figure(line, "req/s");
            assert!(rps > 0.0, "no traffic: {line}");
            // A fixed offered load: about 2000 req/s, whatever the target could take.
            assert!(!fixed_rate || (1500.0..2500.0).contains(&rps), "{line}");
            assert!(line.contains("switches/req"), "{line}");
            // The load generator's CPU is counted to the millisecond: never none for a second of
            // load.
            assert!(figure(line, "load generator µs/req") > 0.0, "{line}");
            // The workers and Redis, in 10 ms ticks: some at full load, maybe none at 2000 req/s.
            let upstream = figure(line, "upstream side µs/req");
            assert!(upstream > 0.0 || (fixed_rate && upstream == 0.0), "{line}");
            assert!(
                !line.contains("failed/errored") && !line.contains("Non-2xx"),
                "{line}"
            );
        }
        // Each gateway against the peer, and the second against the first.
        let medians = text.lines().filter(|l| l.contains("median: req/s")).count();
        assert_eq!(medians, if gateways == 2 { 3 } else { 1 }, "{text}");
        // Every target's CPU over the box, and what 1.2x the peer's req/s leaves each gateway.
        let splits = text
            .lines()
            .filter(|l| l.contains(" + upstream side "))
            .count();
        assert_eq!(splits, 1 + gateways, "{text}");
        // Each gateway: the CPU per request 1.2x would need, or that it is met (or beyond reach).
        let bound = format!("1.2x {peer}'s req/s ");
        let bounds = text
            .lines()
            .filter(|l| {
                l.contains(&bound)
                    && (l.contains("would need the proxy at") || l.contains("req/s met ("))
            })
            .count();
        assert_eq!(bounds, gateways, "{text}");
    }
    assert_no_process_left(&tmp);
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
