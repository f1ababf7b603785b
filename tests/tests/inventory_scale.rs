//! The operator plane over an inventory, end to end through the real `herd` binary on a 6-host
//! netns inventory (2 gateway hosts, 3 worker machines, a Redis host, plus a client host the
//! load comes from, through the floating address):
//! up (2 workers) → `scale 6` spread over the machines and `scale 3` (newest of the fullest
//! first) and `scale 4 --on m3`, under load with 0 failed requests → a rollout whose second
//! batch can't start, the first batch rolled back → a rollout (new binary path and env) under load with 0
//! failed → `status` shows each worker's p99, `status --watch` refreshes → `down` leaves no
//! process, namespace or record.
//!
//! Needs root (network namespaces), like CI. Namespaces are `herdinv-hio{pid}-*`; every
//! namespace and process is removed also when the test fails ([`Cleanup`]).

use herd_tests::inventory::{Cleanup, alive, herd, namespaces_with};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use herd::binaries;
use herd::load::{self, Plan, Report};
use serde_json::Value;

fn inventory(name: &str) -> String {
    let host = |name: &str, last: u8| {
        format!(
            "[[machines]]\nname = \"{name}\"\naddress = \"10.217.0.{last}\"\ntransport = \"netns\"\n"
        )
    };
    format!(
        "name = \"{name}\"\n{}{}{}{}{}{}{}max_workers = 0\n\
         [redis]\nmachine = \"db\"\n\
         [gateways]\nmachines = [\"gw1\", \"gw2\"]\nfloating_address = \"10.217.0.10\"\n\
         [[images]]\nname = \"demo\"\ntotal = 2\nmachines = [\"m1\", \"m2\", \"m3\"]\n",
        host("gw1", 11),
        host("gw2", 12),
        host("m1", 21),
        host("m2", 22),
        host("m3", 23),
        host("db", 5),
        host("client", 100),
    )
}

/// `GET /work?ms=2` at 100 req/s for `duration` from the client host through the floating
/// address, in the background.
fn load_from(netns: &str, duration: Duration) -> std::thread::JoinHandle<Report> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        herd::netns::run_in_netns(&netns, move || async move {
            let plan = Plan {
                rate: 100,
                duration,
                concurrency: 8,
                timeout: Duration::from_secs(5),
            };
            load::run(&plan, &herd_tests::client(), |c, _| {
                c.get("http://10.217.0.10:8080/work?ms=2")
            })
            .await
        })
        .expect("enter the client namespace")
    })
}

/// The worker units `herd status --json` lists, and the parsed document.
fn status(args: &[&str]) -> (Output, Value, BTreeSet<String>) {
    let output = herd(&[&["status", "--json"][..], args].concat());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    let workers = json["units"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["kind"] == "worker")
        .map(|u| u["name"].as_str().unwrap_or_default().to_string())
        .collect();
    (output, json, workers)
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| format!("worker-demo-{n}")).collect()
}

#[test]
fn scale_and_rollout_over_a_netns_inventory_under_load_fail_no_request() {
    assert!(
        herd::deps::is_root(),
        "inventory tests need root for network namespaces (run the suite as root, as CI does)"
    );
    let began = Instant::now();
    let dir = herd_tests::temp_dir();
    let name = format!("hio{}", std::process::id() % 1_000_000);
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, inventory(&name)).unwrap();
    let state = dir.path().join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let flags = ["--inventory", file, "--state-dir", state];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter().chain(&flags).map(|s| s.to_string()).collect()
    };
    let run = |args: &[&str]| {
        let all = with(args);
        herd(&all.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let prefix = format!("herdinv-{name}-");
    let root = Path::new(state).join(format!("inventory-{name}"));
    let mut cleanup = Cleanup {
        netns: None,
        down: with(&["down"]),
        roots: vec![root.clone()],
        pids: BTreeSet::new(),
        prefix: prefix.clone(),
    };
    let client = format!("{prefix}client");

    let early = run(&["scale", "3"]);
    assert_eq!(early.status.code(), Some(3), "no cluster yet: exit 3");
    let up = run(&["up"]);
    cleanup.remember();
    assert!(up.status.success(), "herd up failed");
    let (_, _, workers) = status(&flags);
    assert_eq!(workers, set(&["m1-1", "m2-1"]));

    // Scale 2 → 6 → 3, then one more on m3, under load.
    let load = load_from(&client, Duration::from_secs(9));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let grow = run(&["scale", "6"]);
    let grow_took = started.elapsed();
    cleanup.remember();
    assert!(grow.status.success(), "scale 6");
    assert!(
        String::from_utf8_lossy(&grow.stdout).contains("demo: 6 workers (m1 2, m2 2, m3 2)"),
        "spread over the machines"
    );
    let (out, json, workers) = status(&flags);
    assert_eq!(out.status.code(), Some(0), "healthy after scale 6");
    assert_eq!(
        workers,
        set(&["m1-1", "m1-2", "m2-1", "m2-2", "m3-1", "m3-2"])
    );
    assert_eq!(json["workers"].as_array().map(Vec::len), Some(6));
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let shrink = run(&["scale", "demo", "3"]);
    let shrink_took = started.elapsed();
    assert!(shrink.status.success(), "scale 3");
    let (_, _, workers) = status(&flags);
    assert_eq!(
        workers,
        set(&["m1-1", "m2-1", "m3-1"]),
        "the newest of the fullest machines went first"
    );
    let on = run(&["scale", "4", "--on", "m3"]);
    cleanup.remember();
    assert!(on.status.success(), "scale 4 --on m3");
    let report = load.join().unwrap();
    println!(
        "scale 2 -> 6 took {grow_took:?}, 6 -> 3 took {shrink_took:?}; load: {}; by worker {:?}",
        report.summary(),
        report.by_worker()
    );
    assert_eq!(report.failed(), 0, "{}", report.summary());
    let served = report.by_worker();
    assert!(
        served.contains_key("demo-m3-1") && served.contains_key("demo-m1-2"),
        "scaled workers took traffic: {served:?}"
    );
    let (out, _, workers) = status(&flags);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(workers, set(&["m1-1", "m2-1", "m3-1", "m3-2"]));

    // A rollout whose second batch fails: the new "binary" runs the worker except on m2. The
    // first batch (m1) is put back on the old command, the failing one stopped.
    let worker = binaries::locate(binaries::WORKER).unwrap();
    let wrapper = dir.path().join("not-on-m2.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n[ \"$HERD_WORKER_MACHINE\" = m2 ] && {{ echo 'm2 refuses to start' >&2; exit 3; }}\nexec {} \"$@\"\n",
            worker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let broken = run(&["rollout", "--binary", wrapper.to_str().unwrap()]);
    assert_eq!(broken.status.code(), Some(1), "a failed rollout exits 1");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&broken.stdout),
        String::from_utf8_lossy(&broken.stderr)
    );
    assert!(
        said.contains("m2 refuses to start"),
        "the worker's log: {said}"
    );
    assert!(said.contains("rolled back demo-m1-2"), "{said}");
    assert!(said.contains("aborted and rolled back"), "{said}");
    let (out, _, workers) = status(&flags);
    assert_eq!(out.status.code(), Some(0), "still healthy");
    assert_eq!(workers, set(&["m1-3", "m2-1", "m3-1", "m3-2"]));
    let link = std::fs::read_link(root.join("m1/link/worker-demo-m1-3")).unwrap();
    assert_eq!(link, worker, "m1 is back on the old executable");

    // A rollout under load: a new binary path and an env var, one worker at a time.
    let copy = dir.path().join("herd-worker-next");
    std::fs::copy(&worker, &copy).unwrap();
    let load = load_from(&client, Duration::from_secs(16));
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let rollout = run(&[
        "rollout",
        "demo",
        "--binary",
        copy.to_str().unwrap(),
        "--env",
        "ROLLOUT_MARK=2",
    ]);
    let rollout_took = started.elapsed();
    cleanup.remember();
    assert!(rollout.status.success(), "rollout");
    // The last new worker has served for a moment: a p99 needs requests in the window.
    std::thread::sleep(Duration::from_secs(1));
    let (out, json, workers) = status(&flags);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        workers,
        set(&["m1-4", "m2-2", "m3-3", "m3-4"]),
        "replaced on the same machines, with new ids"
    );
    let p99: Vec<f64> = json["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["p99_ms"].as_f64())
        .collect();
    // One answer in 4 is sampled, over at least 0.5 s: a worker that answered a handful may
    // show none.
    assert!(p99.len() >= 2, "a p99 for the workers under load: {json}");
    assert!(p99.iter().all(|ms| *ms > 0.0 && *ms < 5_000.0), "{p99:?}");
    let table = run(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("P99"), "{table}");
    let env = std::fs::read_to_string(root.join("m3/etc/worker-demo-m3-4.env")).unwrap();
    assert!(env.contains("ROLLOUT_MARK='2'"), "{env}");
    // The port of the worker it replaced was free again: ports stay in the image's range.
    assert!(
        env.contains("HERD_WORKER_LISTEN='10.217.0.23:8081'"),
        "{env}"
    );
    let link = std::fs::read_link(root.join("m3/link/worker-demo-m3-4")).unwrap();
    assert_eq!(link, copy);
    let report = load.join().unwrap();
    println!(
        "rollout took {rollout_took:?}; load: {}; by worker {:?}",
        report.summary(),
        report.by_worker()
    );
    assert!(
        rollout_took < Duration::from_secs(15),
        "the rollout outlasted the load"
    );
    assert_eq!(report.failed(), 0, "{}", report.summary());

    // status --watch redraws until Ctrl-C.
    let program = binaries::locate(binaries::HERD).unwrap();
    let watch = Command::new(&program)
        .args(with(&["status", "--watch"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let watched = watch.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&watched.stdout);
    assert!(
        screen.matches("\x1b[2J").count() >= 2,
        "refreshed: {screen}"
    );
    assert!(screen.contains("worker-demo-m3-4"), "{screen}");
    assert_eq!(watched.status.code(), Some(0), "Ctrl-C ends it, exit 0");

    // Down stops the scaled and rolled-out workers too, and forgets the records.
    cleanup.remember();
    let pids = cleanup.pids.clone();
    let down = run(&["down"]);
    assert!(down.status.success(), "down");
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
    for machine in ["m1", "m2", "m3"] {
        assert!(!root.join(machine).join("etc/workers.json").exists());
    }
    let after = run(&["status"]);
    assert_eq!(after.status.code(), Some(3), "nothing runs");
    println!("whole test: {:.1} s", began.elapsed().as_secs_f64());
}
