//! Sessions on a real Redis Cluster (3 masters + 3 replicas started by the harness, workers with
//! `redis.cluster`): concurrent additions to one session over several workers, login rotation
//! and "log out everywhere" across slots, a master killed under load, and a slot moved under load.
//!
//! The tests run one at a time (each starts 6 redis-servers and 3 workers on a 2-core box).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd::redis_cluster::RedisCluster;
use herd_shared::keys::Keys;
use herd_tests::gateway::{GatewayOptions, TestGateway};
use herd_tests::session_calls::{add_item, get_json, item_names, login};
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::worker_support::{cookie, plain_client};
use herd_tests::{temp_dir, unique_prefix};
use serde_json::{Value, json};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Setup {
    workers: Vec<TestWorker>,
    cluster: RedisCluster,
    keys: Keys,
    _dir: tempfile::TempDir,
}

fn setup(workers: usize) -> Setup {
    let dir = temp_dir();
    let cluster = RedisCluster::start(3, 1, dir.path(), Duration::from_millis(1_000))
        .unwrap_or_else(|error| panic!("cannot start the Redis Cluster: {error}"));
    let prefix = unique_prefix();
    let seeds = cluster.seeds().join(",");
    let workers = (1..=workers)
        .map(|i| {
            let options = WorkerOptions::new(format!("w{i}"), "", &prefix)
                .env("HERD_WORKER_REDIS__CLUSTER", &seeds)
                .env("HERD_WORKER_REDIS__COMMAND_TIMEOUT", "1s");
            TestWorker::start(&options, dir.path())
        })
        .collect();
    Setup {
        workers,
        cluster,
        keys: Keys::new(prefix),
        _dir: dir,
    }
}

impl Setup {
    /// The slot of `key` and the port of the master serving it.
    fn placement(&self, key: &str) -> (u16, u16) {
        let port = self.cluster.nodes()[0].port();
        let port = self
            .cluster
            .nodes()
            .iter()
            .find(|node| node.is_running())
            .map_or(port, |node| node.port());
        let slot: u16 = self
            .cluster
            .node_cli(port, &["cluster", "keyslot", key])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (slot, self.master_of(slot))
    }

    fn master_of(&self, slot: u16) -> u16 {
        for (port, _, ranges) in self.cluster.masters().unwrap() {
            if in_ranges(&ranges, slot) {
                return port;
            }
        }
        panic!("slot {slot} has no master")
    }

    fn master_id(&self, port: u16) -> String {
        self.cluster
            .masters()
            .unwrap()
            .into_iter()
            .find(|(p, _, _)| *p == port)
            .map(|(_, id, _)| id)
            .expect("a master on that port")
    }
}

/// Whether `slot` is in one of `ranges` (`CLUSTER NODES` form: `0-5460`, `7`).
fn in_ranges(ranges: &[String], slot: u16) -> bool {
    ranges.iter().any(|range| {
        let (start, end) = range.split_once('-').unwrap_or((range, range));
        (start.parse().unwrap_or(u16::MAX)..=end.parse().unwrap_or(0)).contains(&slot)
    })
}

/// The cart's item names as a set.
fn cart_items(cart: &Value) -> BTreeSet<String> {
    item_names(cart).into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additions_rotation_and_log_out_everywhere_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let setup = setup(3);
    let client = plain_client();
    let workers = &setup.workers;

    // 200 concurrent additions to one session, spread over 3 workers, 50 in flight.
    let id = login(&client, &workers[0], "ann", None).await;
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(50));
    let mut tasks = Vec::new();
    for n in 0..200 {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        let url = workers[n % 3].url("/cart/items");
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let status = client
                .post(url)
                .header("cookie", cookie(&id))
                .json(&json!({ "item": format!("i{n:03}"), "qty": 1 }))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            drop(permit);
            status
        }));
    }
    let mut statuses: HashMap<u16, usize> = HashMap::new();
    for task in tasks {
        *statuses.entry(task.await.unwrap()).or_default() += 1;
    }
    println!(
        "200 additions over 3 workers on the cluster: {statuses:?} in {:?}",
        started.elapsed()
    );
    assert_eq!(statuses.get(&200), Some(&200), "{statuses:?}");
    let (_, cart) = get_json(&client, &workers[1], "/cart", &id).await;
    assert_eq!(cart_items(&cart).len(), 200, "no addition lost");

    // Rotation on login: the new id keeps the hash tag, so session, alias and lease share a slot.
    let rotated = login(&client, &workers[1], "ann", Some(&id)).await;
    assert_ne!(rotated, id);
    let (old_slot, _) = setup.placement(&setup.keys.session(&id));
    let (new_slot, _) = setup.placement(&setup.keys.session(&rotated));
    assert_eq!(old_slot, new_slot);
    assert_eq!(
        setup.placement(&setup.keys.session_lease(&rotated)).0,
        new_slot
    );
    let (status, cart) = get_json(&client, &workers[2], "/cart", &id).await;
    assert_eq!(
        (status, cart_items(&cart).len()),
        (200, 200),
        "old id reaches the new session in its grace"
    );
    assert_eq!(
        add_item(&client, &workers[2], &id, "via-alias").await.0,
        200
    );
    let (_, cart) = get_json(&client, &workers[0], "/cart", &rotated).await;
    assert!(
        cart_items(&cart).contains("via-alias"),
        "a change through the alias lands"
    );

    // Another session of ann on another master, and bob's.
    let (_, home) = setup.placement(&setup.keys.session(&rotated));
    let mut elsewhere = None;
    for _ in 0..30 {
        let other = login(&client, &workers[2], "ann", None).await;
        if setup.placement(&setup.keys.session(&other)).1 != home {
            elsewhere = Some(other);
            break;
        }
    }
    let elsewhere = elsewhere.expect("a session on another master within 30 logins");
    let bob = login(&client, &workers[0], "bob", None).await;
    let index = setup.keys.user_sessions("ann");
    assert_ne!(
        setup.placement(&index).0,
        0,
        "the index has a slot of its own"
    );

    let response = client
        .post(workers[0].url("/logout-everywhere"))
        .header("cookie", cookie(&rotated))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for ended in [&id, &rotated, &elsewhere] {
        assert_eq!(
            get_json(&client, &workers[1], "/me", ended).await.0,
            401,
            "{ended} ended"
        );
    }
    assert_eq!(
        get_json(&client, &workers[1], "/me", &bob).await.0,
        200,
        "bob untouched"
    );

    // A gateway with no static workers finds all three through the registry on the cluster
    // (entries spread over the masters, scanned on each).
    let dir = temp_dir();
    let gateway = TestGateway::start(
        &GatewayOptions::default()
            .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
            .env(
                "HERD_GATEWAY_REDIS__CLUSTER",
                setup.cluster.seeds().join(","),
            )
            .env("HERD_GATEWAY_REDIS__PREFIX", setup.keys.prefix()),
        dir.path(),
    );
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        if let Ok(response) = client.get(gateway.url("/healthz")).send().await
            && let Some(worker) = response.headers().get("x-herd-worker")
        {
            seen.insert(worker.to_str().unwrap_or_default().to_string());
        }
        if seen.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        seen.len(),
        3,
        "workers reached through the gateway: {seen:?}"
    );
}

/// One loader: adds items to its session in a loop until `stop`; records (item, status, when).
type Log = Vec<(String, u16, Duration)>;

async fn load(
    client: reqwest::Client,
    url: String,
    id: String,
    name: String,
    origin: Instant,
    stop: tokio_util_stop::Stop,
) -> Log {
    let mut log = Vec::new();
    let mut n = 0u32;
    // Bounded by `stop` (set by the test within seconds) and a hard cap.
    while !stop.is_set() && n < 5_000 {
        let item = format!("{name}-{n}");
        let status = client
            .post(&url)
            .header("cookie", cookie(&id))
            .json(&json!({ "item": item, "qty": 1 }))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        log.push((item, status, origin.elapsed()));
        n += 1;
        if status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    log
}

/// A stop flag shared by the loaders.
mod tokio_util_stop {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub(crate) struct Stop(Arc<AtomicBool>);

    impl Stop {
        pub(crate) fn set(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        pub(crate) fn is_set(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}

/// Sessions and loaders over all three masters.
struct Loaded {
    ids: Vec<String>,
    masters: Vec<u16>,
}

async fn sessions_on_every_master(setup: &Setup, client: &reqwest::Client, n: usize) -> Loaded {
    let mut ids = Vec::new();
    let mut masters = Vec::new();
    for i in 0..n {
        let id = login(client, &setup.workers[i % 3], &format!("u{i}"), None).await;
        assert_eq!(
            add_item(client, &setup.workers[i % 3], &id, "before")
                .await
                .0,
            200
        );
        masters.push(setup.placement(&setup.keys.session(&id)).1);
        ids.push(id);
    }
    Loaded { ids, masters }
}

/// Makes every write acknowledged so far reach a replica: a write of our own on each master,
/// then `WAIT 1` (replication is ordered, so the workers' earlier writes are in as well).
async fn wait_replicated(setup: &Setup) {
    for (port, _, ranges) in setup.cluster.masters().unwrap() {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        let mut con = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        // A key in this master's slots.
        let mut key = None;
        for n in 0..100_000 {
            let candidate = format!("wait-probe-{n}");
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&candidate)
                .query_async(&mut con)
                .await
                .unwrap();
            if in_ranges(&ranges, slot) {
                key = Some(candidate);
                break;
            }
        }
        let key = key.expect("a key on this master");
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .query_async(&mut con)
            .await
            .unwrap();
        // Right after `--cluster create` a replica may still be syncing: ask again.
        let mut acked = 0;
        for _ in 0..10 {
            acked = redis::cmd("WAIT")
                .arg(1)
                .arg(1_000)
                .query_async(&mut con)
                .await
                .unwrap();
            if acked == 1 {
                break;
            }
        }
        assert_eq!(acked, 1i64, "master {port}: replica acknowledged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_only_unreplicated_writes_of_its_shard() {
    let _serial = SERIAL.lock().await;
    let mut setup = setup(3);
    let client = plain_client();
    let loaded = sessions_on_every_master(&setup, &client, 9).await;
    wait_replicated(&setup).await;
    let victim = loaded.masters[0];
    assert!(
        loaded.masters.iter().any(|m| *m != victim),
        "sessions on other masters too: {:?}",
        loaded.masters
    );

    let origin = Instant::now();
    let stop = tokio_util_stop::Stop::default();
    let loaders: Vec<_> = loaded
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            tokio::spawn(load(
                client.clone(),
                setup.workers[i % 3].url("/cart/items"),
                id.clone(),
                format!("s{i}"),
                origin,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed_at = origin.elapsed();
    setup.cluster.kill(victim);
    // Promotion: node timeout 1 s, then the replica's election.
    let cluster = &setup.cluster;
    let promoted = tokio::task::block_in_place(|| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if cluster.wait_ready(Duration::from_millis(500)).is_ok()
                && cluster
                    .masters()
                    .is_ok_and(|m| m.len() == 3 && m.iter().all(|(p, _, _)| *p != victim))
            {
                return Some(started.elapsed());
            }
        }
        None
    });
    let promoted = promoted.expect("replica promoted within 15 s");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.set();
    let mut logs = Vec::new();
    for loader in loaders {
        logs.push(loader.await.unwrap());
    }

    // Every session is back, with everything written before the WAIT.
    let mut lost_on_victim = 0;
    let mut acked_on_victim_after_wait = 0;
    let mut failed_window: (Option<Duration>, Option<Duration>) = (None, None);
    let mut failures_elsewhere = 0;
    for (i, id) in loaded.ids.iter().enumerate() {
        let (status, cart) = get_json(&client, &setup.workers[0], "/cart", id).await;
        assert_eq!(status, 200, "session {i} back after the promotion");
        let stored = cart_items(&cart);
        assert!(
            stored.contains("before"),
            "session {i}: WAIT-confirmed write kept"
        );
        let on_victim = loaded.masters[i] == victim;
        for (item, status, at) in &logs[i] {
            if *status != 200 {
                if on_victim {
                    failed_window.0 = Some(failed_window.0.map_or(*at, |s: Duration| s.min(*at)));
                    failed_window.1 = Some(failed_window.1.map_or(*at, |e: Duration| e.max(*at)));
                } else {
                    failures_elsewhere += 1;
                    println!("other shard, session {i}: {status} at {at:?}");
                }
                continue;
            }
            if on_victim {
                acked_on_victim_after_wait += 1;
                if !stored.contains(item) {
                    lost_on_victim += 1;
                }
            } else {
                assert!(
                    stored.contains(item),
                    "session {i} on an untouched shard lost {item}"
                );
            }
        }
    }
    let statuses: usize = logs.iter().map(Vec::len).sum();
    println!(
        "master kill: killed at {killed_at:?}, promoted {promoted:?} later; {statuses} requests; \
         failed shard: failures from {:?} to {:?}, {acked_on_victim_after_wait} acknowledged \
         additions after the WAIT, {lost_on_victim} of them lost; other shards: {failures_elsewhere} failed requests",
        failed_window.0, failed_window.1
    );
    assert_eq!(failures_elsewhere, 0, "sessions on other shards untouched");
    // Writes after the promotion land again: the last addition of every victim session is ok.
    for (i, log) in logs.iter().enumerate() {
        if loaded.masters[i] == victim {
            assert_eq!(
                log.last().map(|(_, s, _)| *s),
                Some(200),
                "session {i} writable again"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_under_load_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let setup = setup(3);
    let client = plain_client();
    let loaded = sessions_on_every_master(&setup, &client, 6).await;
    let (slot, from) = setup.placement(&setup.keys.session(&loaded.ids[0]));
    let to = setup
        .cluster
        .masters()
        .unwrap()
        .into_iter()
        .map(|(port, _, _)| port)
        .find(|port| *port != from)
        .unwrap();
    let (from_id, to_id) = (setup.master_id(from), setup.master_id(to));

    let origin = Instant::now();
    let stop = tokio_util_stop::Stop::default();
    let loaders: Vec<_> = loaded
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            tokio::spawn(load(
                client.clone(),
                setup.workers[i % 3].url("/cart/items"),
                id.clone(),
                format!("s{i}"),
                origin,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cluster = &setup.cluster;
    let slot_text = slot.to_string();
    let moved = tokio::task::block_in_place(|| {
        let started = Instant::now();
        // The hot session's slot, by hand: IMPORTING / MIGRATING, a pause under load in that
        // state (ASK and TRYAGAIN), MIGRATE its keys, then hand the slot over everywhere.
        cluster
            .node_cli(
                to,
                &["cluster", "setslot", &slot_text, "importing", &from_id],
            )
            .unwrap();
        cluster
            .node_cli(
                from,
                &["cluster", "setslot", &slot_text, "migrating", &to_id],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for _ in 0..100 {
            let keys = cluster
                .node_cli(from, &["cluster", "getkeysinslot", &slot_text, "100"])
                .unwrap();
            let keys: Vec<&str> = keys.split_whitespace().collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["migrate", "127.0.0.1", "", "", "0", "5000", "keys"];
            let to_port = to.to_string();
            args[2] = &to_port;
            args.extend(keys);
            cluster.node_cli(from, &args).unwrap();
        }
        for node in cluster.nodes().iter().filter(|n| n.is_running()) {
            cluster
                .node_cli(
                    node.port(),
                    &["cluster", "setslot", &slot_text, "node", &to_id],
                )
                .unwrap();
        }
        // And a range of 300 more slots the usual way.
        cluster
            .cli(&[
                "--cluster".into(),
                "reshard".into(),
                format!("127.0.0.1:{from}"),
                "--cluster-from".into(),
                from_id.clone(),
                "--cluster-to".into(),
                to_id.clone(),
                "--cluster-slots".into(),
                "300".into(),
                "--cluster-yes".into(),
            ])
            .unwrap();
        started.elapsed()
    });
    assert_eq!(setup.master_of(slot), to, "the slot moved");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.set();
    let mut failed = 0;
    let mut acked = 0;
    for (i, loader) in loaders.into_iter().enumerate() {
        let log = loader.await.unwrap();
        let (status, cart) = get_json(&client, &setup.workers[1], "/cart", &loaded.ids[i]).await;
        assert_eq!(status, 200);
        let stored = cart_items(&cart);
        for (item, status, _) in &log {
            if *status == 200 {
                acked += 1;
                assert!(
                    stored.contains(item),
                    "session {i}: acknowledged {item} lost"
                );
            } else {
                failed += 1;
            }
        }
    }
    println!(
        "resharding under load: slot {slot} + 300 slots moved in {moved:?}; {acked} acknowledged additions, all kept; {failed} failed requests"
    );
}
