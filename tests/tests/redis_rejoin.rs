//! The start script of a Sentinel data node (`infra/src/deploy/rejoin.rs`), run for real on
//! loopback: a master, two replicas and three sentinels.
//! - A master killed (kill -9) and started again at once through the script never answers as a
//!   master: it waits for the sentinels' failover, then rejoins as a replica of the master they
//!   name. Started directly, as its supervisor used to, it answers as a master at once: the
//!   window in which it acknowledged writes that the promotion then discarded.
//! - A first start (no marker) is not held back.
//! - An error reply from an address in the sentinel list (here a data node) is skipped.
//! - A restarted master whose replicas are all down starts as the master once its bound has
//!   passed: no failover can come.
//!
//! Sentinel timings are herd's defaults (`down_after_ms` 1000, failover timeout 10 s): shorter
//! ones made the sentinels flap between masters on a loaded 2-core box.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herd::deploy::rejoin;
use herd_tests::temp_dir;
use herd_tests::worker_support::{free_port, sentinel_knows, spawn_redis};

const SENTINEL_CONF: &str = "port {port}
bind 127.0.0.1
sentinel monitor m 127.0.0.1 MASTER_PORT 2
sentinel down-after-milliseconds m 1000
sentinel failover-timeout m 10000
sentinel parallel-syncs m 1
";

/// A data node started through the start script; killed (kill -9) when dropped.
struct ScriptNode {
    child: Child,
    port: u16,
}

impl ScriptNode {
    /// Runs the script in `dir` (where `run/` is) for a node on `port`, waiting at most
    /// `wait_secs` for the sentinels to name another master.
    fn start(dir: &Path, port: u16, sentinels: &str, wait_secs: u32) -> ScriptNode {
        let script = dir.join(rejoin::SCRIPT_FILE);
        std::fs::write(&script, rejoin::SCRIPT).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("node-{port}.log")))
            .unwrap();
        let child = Command::new("sh")
            .arg(&script)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .args(["--repl-diskless-sync-delay", "0"])
            .current_dir(dir)
            .env("HERD_REDIS_SERVER", "redis-server")
            .env(rejoin::SENTINELS_ENV, sentinels)
            .env("HERD_REDIS_SENTINEL_MASTER", "m")
            .env("HERD_REDIS_SELF", format!("127.0.0.1:{port}"))
            .env("HERD_REDIS_REJOIN_WAIT", wait_secs.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("sh runs");
        ScriptNode { child, port }
    }

    fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join(format!("node-{}.log", self.port))).unwrap_or_default()
    }
}

impl Drop for ScriptNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `INFO replication` of the node on `port` (`None`: no answer).
fn replication(port: u16) -> Option<BTreeMap<String, String>> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .ok()?;
    let text: String = redis::cmd("INFO").arg("replication").query(&mut con).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The master the sentinel on `port` names.
fn named_master(port: u16) -> Option<u16> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(200))
        .ok()?;
    let (_, master_port): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg("m")
        .query(&mut con)
        .ok()?;
    Some(master_port)
}

fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let began = Instant::now();
    while !done() {
        assert!(began.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_first_start_is_not_held_back() {
    let dir = temp_dir();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    let port = free_port();
    // No sentinel answers (nothing listens there): a first start does not ask.
    let node = ScriptNode::start(dir.path(), port, &format!("127.0.0.1:{}", free_port()), 30);
    wait_for(Duration::from_secs(10), "the node answers", || {
        replication(port).is_some()
    });
    assert_eq!(replication(port).unwrap()["role"], "master");
    assert!(dir.path().join(rejoin::STARTED).exists(), "marker left");
    assert!(!node.log(dir.path()).contains("herd-redis-node"), "no wait");
}

#[test]
fn a_restarted_master_rejoins_as_a_replica_and_never_answers_as_master() {
    let dir = temp_dir();
    let dir = dir.path();
    std::fs::create_dir(dir.join("run")).unwrap();
    let master_port = free_port();
    // The master as `herd up` starts it: through the script, first start.
    let master = ScriptNode::start(dir, master_port, "127.0.0.1:1", 30);
    wait_for(Duration::from_secs(10), "the master answers", || {
        replication(master_port).is_some()
    });
    let replicas: Vec<_> = (1..=2)
        .map(|n| {
            spawn_redis(
                dir,
                &format!("replica{n}"),
                None,
                &[
                    "--replicaof",
                    "127.0.0.1",
                    &master_port.to_string(),
                    "--repl-diskless-sync-delay",
                    "0",
                ],
            )
        })
        .collect();
    let conf = SENTINEL_CONF.replace("MASTER_PORT", &master_port.to_string());
    let sentinels: Vec<_> = (1..=3)
        .map(|n| spawn_redis(dir, &format!("sentinel{n}"), Some(&conf), &["--sentinel"]))
        .collect();
    let sentinel_ports: Vec<u16> = sentinels.iter().map(|s| s.port).collect();
    // A data node first: it answers `SENTINEL ...` with an error reply, which must be skipped.
    let sentinel_addrs = std::iter::once(replicas[0].port)
        .chain(sentinel_ports.iter().copied())
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    wait_for(
        Duration::from_secs(20),
        "the sentinels see both replicas and each other",
        || {
            sentinel_ports
                .iter()
                .all(|p| matches!(sentinel_knows(*p, "m"), Some((r, s)) if r >= 2 && s >= 2))
        },
    );

    // kill -9, and the supervisor starts it again at once.
    drop(master);
    let restarted = ScriptNode::start(dir, master_port, &sentinel_addrs, 60);
    let began = Instant::now();
    let mut answers_as_master = Vec::new();
    let new_master = loop {
        if let Some(info) = replication(master_port) {
            if info["role"] == "master" {
                answers_as_master.push(began.elapsed().as_secs_f64());
            } else if info["master_link_status"] == "up" {
                break info["master_port"].parse::<u16>().unwrap();
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the restarted node did not rejoin as a linked replica; its log:\n{}",
            restarted.log(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "restarted master rejoined as a replica of port {new_master} after {:.2} s",
        began.elapsed().as_secs_f64()
    );
    assert!(
        answers_as_master.is_empty(),
        "the restarted node answered as a master (s after the restart): {answers_as_master:?}; its log:\n{}",
        restarted.log(dir)
    );
    assert!(
        replicas.iter().any(|r| r.port == new_master),
        "it follows a promoted replica"
    );
    assert!(
        sentinel_ports
            .iter()
            .any(|p| named_master(*p) == Some(new_master)),
        "the sentinels name the master it follows"
    );
    let log = restarted.log(dir);
    assert!(
        log.contains("waiting for them to name another master"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "127.0.0.1 {new_master} as the master: rejoining as its replica"
        )),
        "{log}"
    );

    // Now the new master and every replica die; the new master restarts first. No replica is
    // left to promote: it waits out its bound (3 s here), then starts as the master it was.
    let mut replicas = replicas;
    drop(restarted);
    for replica in &mut replicas {
        replica.kill();
    }
    let again = ScriptNode::start(dir, new_master, &sentinel_addrs, 3);
    wait_for(
        Duration::from_secs(20),
        "the restarted master answers",
        || replication(new_master).is_some(),
    );
    assert_eq!(replication(new_master).unwrap()["role"], "master");
    let log = again.log(dir);
    assert!(
        log.contains("no failover within 3 s") && log.contains("starting as configured"),
        "{log}"
    );
}
