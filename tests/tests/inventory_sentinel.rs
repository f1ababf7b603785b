//! `herd up|status|down --inventory` with Redis Sentinel, end to end on netns machines: the
//! master and two replicas on three machines, a sentinel on each, workers on the same three,
//! the gateway pair on two more, and a client host. Users log in through the floating address;
//! then a bounded load (GET /cart and POST /cart/items) runs
//! - while herd fails the master over on purpose ([`herd::deploy::sentinel::failover`]): no
//!   idempotent GET fails and every acknowledged cart write is still there afterwards;
//! - while the master's redis-server is killed (kill -9): Sentinel promotes a replica, the old
//!   master's start script holds it back until then and it rejoins as a replica, every session
//!   survives; what can be lost is a write the master acknowledged but had not yet sent to a
//!   replica — measured and printed, with the failed requests of the window.
//!
//! Then `down` leaves no process and no namespace. Needs root (network namespaces), like CI.
//! Namespaces are `herdinv-his{pid}-*`; everything is removed also when the test fails.

use herd_tests::inventory::{Cleanup, alive, herd, namespaces_with, recorded_pids};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use herd::deploy::{Options, sentinel};
use serde_json::{Value, json};

/// Logged-in users.
const USERS: usize = 16;
/// Concurrent request loops of the load.
const LOOPS: usize = 8;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/examples")
}

/// A client without a cookie jar: each request carries the one session cookie it is given (a
/// jar would send the last login's cookie along and log the other users out).
fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client builds")
}

/// What the load saw.
#[derive(Debug, Default)]
struct Outcome {
    gets: usize,
    failed_gets: Vec<String>,
    writes: usize,
    failed_writes: Vec<String>,
    /// Acknowledged cart writes: user index → items.
    acked: BTreeMap<usize, Vec<String>>,
    /// When each acknowledged write was answered.
    acked_at: BTreeMap<String, Instant>,
}

/// Each of `LOOPS` loops takes its own users (`loop`, `loop + LOOPS`, ...) in turn and sends
/// GET /cart and POST /cart/items alternately, until `stop`; each item name is unique.
async fn load(
    url: String,
    cookies: Arc<Vec<String>>,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let client = plain_client();
    let tasks: Vec<_> = (0..LOOPS)
        .map(|lane| {
            let (client, url, cookies, stop) =
                (client.clone(), url.clone(), cookies.clone(), stop.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mine: Vec<usize> = (lane..cookies.len()).step_by(LOOPS).collect();
                let mut n = 0usize;
                // Bounded: at most this many rounds even if `stop` never came.
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    let user = mine[n % mine.len()];
                    let cookie = &cookies[user];
                    if n.is_multiple_of(2) {
                        out.gets += 1;
                        match client
                            .get(format!("{url}/cart"))
                            .header("cookie", cookie)
                            .send()
                            .await
                        {
                            Ok(r) if r.status().is_success() => {}
                            Ok(r) => out.failed_gets.push(format!("status {}", r.status())),
                            Err(e) => out.failed_gets.push(e.to_string()),
                        }
                    } else {
                        out.writes += 1;
                        let item = format!("{tag}-{lane}-{n}");
                        match client
                            .post(format!("{url}/cart/items"))
                            .header("cookie", cookie)
                            .json(&json!({ "item": item, "qty": 1 }))
                            .send()
                            .await
                        {
                            Ok(r) if r.status().is_success() => {
                                out.acked_at.insert(item.clone(), Instant::now());
                                out.acked.entry(user).or_default().push(item);
                            }
                            Ok(r) => out.failed_writes.push(format!("status {}", r.status())),
                            Err(e) => out.failed_writes.push(e.to_string()),
                        }
                    }
                    n += 1;
                }
                out
            })
        })
        .collect();
    let mut total = Outcome::default();
    for task in tasks {
        let out = task.await.unwrap();
        total.gets += out.gets;
        total.failed_gets.extend(out.failed_gets);
        total.writes += out.writes;
        total.failed_writes.extend(out.failed_writes);
        for (user, items) in out.acked {
            total.acked.entry(user).or_default().extend(items);
        }
        total.acked_at.extend(out.acked_at);
    }
    total
}

/// Every user's cart items (`None` for a user whose session is gone or who got no answer).
async fn carts(url: String, cookies: Arc<Vec<String>>) -> Vec<Option<BTreeSet<String>>> {
    let client = plain_client();
    let mut all = Vec::new();
    for cookie in cookies.iter() {
        let cart = match client
            .get(format!("{url}/cart"))
            .header("cookie", cookie)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json::<Value>().await.ok().map(|v| {
                v["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|line| line["item"].as_str().map(str::to_string))
                    .collect()
            }),
            _ => None,
        };
        all.push(cart);
    }
    all
}

/// Runs the load from the client namespace for `duration`, calling `fault` (on this thread)
/// `fault_at` after it starts; returns what the load saw and what `fault` returned.
fn load_with<T>(
    client_ns: &str,
    url: &str,
    cookies: &Arc<Vec<String>>,
    tag: &'static str,
    fault_at: Duration,
    duration: Duration,
    fault: impl FnOnce() -> T,
) -> (Outcome, T) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ns, url2, cookies2, stop2) = (
        client_ns.to_string(),
        url.to_string(),
        cookies.clone(),
        stop.clone(),
    );
    let began = Instant::now();
    let loader = std::thread::spawn(move || {
        herd::netns::run_in_netns(&ns, move || load(url2, cookies2, tag, stop2))
            .expect("enter the client namespace")
    });
    std::thread::sleep(fault_at);
    let result = fault();
    std::thread::sleep(duration.saturating_sub(began.elapsed()));
    stop.store(true, Ordering::Relaxed);
    (loader.join().expect("load thread"), result)
}

/// Acknowledged writes missing from the carts, with when each was acknowledged.
fn lost(outcome: &Outcome, carts: &[Option<BTreeSet<String>>]) -> Vec<(String, Instant)> {
    let mut lost = Vec::new();
    for (user, items) in &outcome.acked {
        for item in items {
            if !carts[*user].as_ref().is_some_and(|c| c.contains(item)) {
                lost.push((item.clone(), outcome.acked_at[item]));
            }
        }
    }
    lost
}

#[test]
fn sentinel_failover_and_master_kill_under_load() {
    assert!(
        herd::deps::is_root(),
        "inventory tests need root for network namespaces (run the suite as root, as CI does)"
    );
    let test_began = Instant::now();
    let dir = herd_tests::temp_dir();
    let name = format!("his{}", std::process::id() % 1_000_000);
    let text = std::fs::read_to_string(examples().join("netns-sentinel.toml"))
        .unwrap()
        .replace("name = \"sent\"", &format!("name = \"{name}\""));
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, &text).unwrap();
    let state = dir.path().join("state");
    let (file_s, state_s) = (file.to_str().unwrap(), state.to_str().unwrap());
    let prefix = format!("herdinv-{name}-");
    let root = state.join(format!("inventory-{name}"));
    let mut cleanup = Cleanup {
        netns: None,
        down: ["down", "--inventory", file_s, "--state-dir", state_s]
            .map(String::from)
            .to_vec(),
        roots: vec![root.clone()],
        pids: BTreeSet::new(),
        prefix: prefix.clone(),
    };

    let up = herd(&["up", "--inventory", file_s, "--state-dir", state_s]);
    cleanup.pids.extend(recorded_pids(&root));
    assert!(up.status.success(), "herd up failed");
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(stdout.contains("3 workers healthy"), "{stdout}");
    let inventory = herd::inventory::load(&file).unwrap();
    let options = Options {
        state_root: root.clone(),
        token: String::new(),
    };

    // Status shows the master and the sentinels.
    let status = herd(&[
        "status",
        "--inventory",
        file_s,
        "--state-dir",
        state_s,
        "--json",
    ]);
    assert_eq!(
        status.status.code(),
        Some(0),
        "healthy, Redis settled on one master"
    );
    let json: Value = serde_json::from_slice(&status.stdout).unwrap();
    let redis = &json["redis_sentinel"];
    assert_eq!(redis["master"][1], "r1", "{redis}");
    assert_eq!(redis["sentinels"].as_array().unwrap().len(), 3);
    let table = herd(&["status", "--inventory", file_s, "--state-dir", state_s]);
    assert!(
        String::from_utf8_lossy(&table.stdout)
            .contains("REDIS (Sentinel master `herd`): master on r1 (10.219.0.21:6379)")
    );

    // Users log in through the floating address.
    let client_ns = format!("{prefix}client");
    let url = "http://10.219.0.10:8080".to_string();
    let target: SocketAddr = "10.219.0.10:8080".parse().unwrap();
    let cookies: Vec<String> = herd::netns::run_in_netns(&client_ns, move || async move {
        let client = plain_client();
        let mut cookies = Vec::new();
        for user in 0..USERS {
            cookies.push(
                herd::demo_user::log_in_with_item(
                    &client,
                    target,
                    &format!("his-user-{user}"),
                    "seed",
                )
                .await
                .expect("log in"),
            );
        }
        cookies
    })
    .unwrap();
    let cookies = Arc::new(cookies);

    // 1. A planned failover under load: nothing fails that may not, nothing acknowledged is lost.
    let (outcome, report) = load_with(
        &client_ns,
        &url,
        &cookies,
        "f",
        Duration::from_secs(1),
        Duration::from_secs(4),
        || sentinel::failover(&inventory, &options, Duration::from_secs(30)),
    );
    let report = report.expect("failover");
    let after = herd::netns::run_in_netns(&client_ns, {
        let (url, cookies) = (url.clone(), cookies.clone());
        move || carts(url, cookies)
    })
    .unwrap();
    let lost_f = lost(&outcome, &after);
    println!(
        "SENTINEL FAILOVER {} ({}) -> {} ({}): writes paused {:?}, sentinels named the new master after {:?}, old master a replica again after {:?}; load: {} GETs ({} failed), {} writes ({} acknowledged, {} failed: {:?}), {} acknowledged writes lost",
        report.from.1,
        report.from.0,
        report.to.1,
        report.to.0,
        report.writes_paused,
        report.promoted_after,
        report.settled_after,
        outcome.gets,
        outcome.failed_gets.len(),
        outcome.writes,
        outcome.acked_at.len(),
        outcome.failed_writes.len(),
        outcome.failed_writes.iter().take(3).collect::<Vec<_>>(),
        lost_f.len()
    );
    assert!(
        after
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.contains("seed"))),
        "every session survives: {after:?}"
    );
    assert!(
        outcome.failed_gets.is_empty(),
        "failed GETs: {:?}",
        outcome.failed_gets
    );
    assert!(lost_f.is_empty(), "acknowledged writes lost: {lost_f:?}");
    assert!(outcome.gets > 50 && outcome.acked_at.len() > 20, "load ran");
    assert_ne!(report.from.1, report.to.1);
    // The gateways follow the master too: the active one keeps renewing its lease (700 ms TTL)
    // on the new master. One still on the demoted master could renew nothing, and the lease
    // would lapse there for good.
    let (new_ip, new_port) = report.to.0.split_once(':').unwrap();
    let lease_on_new_master = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{prefix}{}", report.to.1)])
            .args(["redis-cli", "--raw", "-h", new_ip, "-p", new_port])
            .args(["GET", "herd:{gateway}:lease"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The lease the new master had from before the promotion expires within its TTL; after a
    // second only a gateway writing to the new master can have put one there. Three reads that
    // find gw1's lease (the box may be busy: the lease may lapse and be taken again meanwhile).
    let began = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|(_, l): &&(f64, String)| l.starts_with("gw1:"))
        .count()
        < 3
    {
        seen.push((began.elapsed().as_secs_f64(), lease_on_new_master()));
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the active gateway does not hold its lease on the new master (s, lease): {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "the active gateway's lease on the new master (s after the failover, lease): {seen:?}"
    );

    // 1b. `herd drill redis-restart --inventory` on a Sentinel inventory is that planned
    // failover, judged: 0 failed idempotent requests, no session lost.
    let drill = herd(&[
        "drill",
        "redis-restart",
        "--json",
        "--duration",
        "4s",
        "--inventory",
        file_s,
        "--state-dir",
        state_s,
    ]);
    let report: serde_json::Value = serde_json::from_slice(&drill.stdout).expect("a JSON report");
    assert_eq!(report["verdict"], "pass", "{report:#}");
    assert_eq!(drill.status.code(), Some(0), "{report:#}");
    assert!(
        report["fault"]
            .as_str()
            .unwrap()
            .contains("failed over by Sentinel"),
        "{report:#}"
    );
    assert_eq!(report["sessions"]["lost"], 0, "{report:#}");

    // 2. The master's process killed (kill -9) under load: Sentinel fails over by itself.
    let master = sentinel::wait_agreement(&inventory, &options, Duration::from_secs(20))
        .expect("settled after the failover");
    let master_machine = inventory
        .machines
        .iter()
        .find(|m| master.starts_with(&format!("{}:", m.address)))
        .unwrap()
        .name
        .clone();
    let child_file = root.join(&master_machine).join("run/redis.child");
    let (outcome, killed_at) = load_with(
        &client_ns,
        &url,
        &cookies,
        "k",
        Duration::from_secs(1),
        Duration::from_secs(5),
        || {
            let pid: i32 = std::fs::read_to_string(&child_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            Instant::now()
        },
    );
    let new_master = sentinel::wait_agreement(&inventory, &options, Duration::from_secs(30))
        .expect("settled after the kill: a replica promoted, the old master back as a replica");
    let settled = killed_at.elapsed();
    let after = herd::netns::run_in_netns(&client_ns, {
        let (url, cookies) = (url.clone(), cookies.clone());
        move || carts(url, cookies)
    })
    .unwrap();
    let lost_k = lost(&outcome, &after);
    // Acknowledged relative to the kill: negative before it.
    let relative = |at: Instant| {
        if at >= killed_at {
            (at - killed_at).as_secs_f64()
        } else {
            -(killed_at - at).as_secs_f64()
        }
    };
    println!(
        "kill -9 of the master on {master_machine} ({master}): new master {new_master}, all settled {:.1} s after the kill; load: {} GETs ({} failed: {:?}), {} writes ({} acknowledged, {} failed), {} acknowledged writes lost (acknowledged at {:?} s from the kill)",
        settled.as_secs_f64(),
        outcome.gets,
        outcome.failed_gets.len(),
        outcome.failed_gets.iter().take(3).collect::<Vec<_>>(),
        outcome.writes,
        outcome.acked_at.len(),
        outcome.failed_writes.len(),
        lost_k.len(),
        lost_k
            .iter()
            .map(|(_, at)| relative(*at))
            .collect::<Vec<_>>(),
    );
    let wrong: Vec<f64> = lost_k
        .iter()
        .map(|(_, at)| relative(*at))
        .filter(|at| !(-0.5..=0.0).contains(at))
        .collect();
    if new_master == master || !wrong.is_empty() {
        // For the record of a failed run: what each data node and sentinel logged.
        for machine in ["r1", "r2", "r3"] {
            for file in [
                "redis.log",
                "redis.out",
                "redis-sentinel.out",
                "redis-sentinel.log",
            ] {
                let path = root.join(machine).join("log").join(file);
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                println!("==== {machine} {file} (last {} lines)", tail.len());
                for line in tail.iter().rev() {
                    println!("{line}");
                }
            }
        }
    }
    assert_ne!(new_master, master, "a replica was promoted");
    // Its supervisor restarted the killed node through its start script, which held it back
    // until the sentinels named the new master and then made it that master's replica: it
    // never came back as a master that could acknowledge writes the promotion would discard.
    let node_log =
        std::fs::read_to_string(root.join(&master_machine).join("log/redis.log")).unwrap();
    assert!(
        node_log.contains(&format!(
            "the sentinels name {} as the master: rejoining as its replica",
            new_master.replace(':', " ")
        )),
        "{node_log}"
    );
    assert!(
        after
            .iter()
            .all(|c| c.as_ref().is_some_and(|c| c.contains("seed"))),
        "every session survives the kill: {after:?}"
    );
    // What a kill -9 can lose: writes the master acknowledged just before it died and had not
    // yet sent to a replica (asynchronous replication; the lag is milliseconds here). Nothing
    // acknowledged after the kill (by the new master) and nothing from long before may be lost.
    assert!(
        wrong.is_empty(),
        "acknowledged writes lost that were not in flight at the kill (s from the kill): {wrong:?}"
    );
    // Writes work again on the new master.
    let writes_again = herd::netns::run_in_netns(&client_ns, {
        let (url, cookie) = (url.clone(), cookies[0].clone());
        move || async move {
            plain_client()
                .post(format!("{url}/cart/items"))
                .header("cookie", cookie)
                .json(&json!({ "item": "after", "qty": 1 }))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    })
    .unwrap();
    assert_eq!(writes_again.ok(), Some(200));

    // 3. Down leaves nothing.
    cleanup.pids.extend(recorded_pids(&root));
    let pids = cleanup.pids.clone();
    let down = herd(&["down", "--inventory", file_s, "--state-dir", state_s]);
    assert!(down.status.success(), "herd down failed");
    let left: Vec<_> = pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
    println!(
        "the whole test took {:.1} s",
        test_began.elapsed().as_secs_f64()
    );
}
