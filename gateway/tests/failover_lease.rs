//! The gateway pair's lease against a real redis-server: only one holder, take-over only of the
//! exact lease of a peer seen dying, expiry frees it, release only by the holder, and a Redis
//! outage is a quick error (so the active keeps serving), never a hang.

use std::time::{Duration, Instant};

use herd_gateway::failover::lease::{Lease, LeaseOutcome, LeaseStore};
use herd_shared::keys::Keys;
use herd_shared::redis::RedisConfig;

fn held(outcome: LeaseOutcome) -> Lease {
    match outcome {
        LeaseOutcome::Held(lease) => lease,
        other => panic!("expected to hold the lease, got {other:?}"),
    }
}

#[tokio::test]
async fn the_lease_has_one_holder_and_a_fencing_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let server = herd::redis_server::RedisServer::start(None, dir.path(), dir.path()).unwrap();
    let config = RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    };
    let store = LeaseStore::new(
        config.pool().unwrap(),
        &Keys::new("lease-test:"),
        Duration::from_millis(300),
    );

    let a = held(store.acquire("a", None, 0).await.unwrap());
    assert_eq!(a.epoch, 1);
    assert_eq!(
        store.acquire("b", None, 0).await.unwrap(),
        LeaseOutcome::HeldBy(a.clone()),
        "nobody takes a held lease"
    );
    let stale = Lease {
        holder: "a".into(),
        epoch: 0,
    };
    assert_eq!(
        store.acquire("b", Some(&stale), 0).await.unwrap(),
        LeaseOutcome::HeldBy(a.clone()),
        "a stale take-over value takes nothing"
    );
    assert_eq!(
        store.renew(&a).await.unwrap(),
        LeaseOutcome::Held(a.clone())
    );

    let b = held(store.acquire("b", Some(&a), 0).await.unwrap());
    assert_eq!(
        b,
        Lease {
            holder: "b".into(),
            epoch: 2
        },
        "exact take-over, new epoch"
    );
    assert_eq!(
        store.renew(&a).await.unwrap(),
        LeaseOutcome::HeldBy(b.clone()),
        "the old holder learns it lost"
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.renew(&b).await.unwrap(),
        LeaseOutcome::Free,
        "expired"
    );
    let a2 = held(store.acquire("a", None, 0).await.unwrap());
    assert_eq!(a2.epoch, 3);
    store.release(&b).await.unwrap();
    assert_eq!(
        store.renew(&a2).await.unwrap(),
        LeaseOutcome::Held(a2.clone()),
        "only the holder releases"
    );
    store.release(&a2).await.unwrap();
    assert_eq!(store.renew(&a2).await.unwrap(), LeaseOutcome::Free);

    drop(server);
    let started = Instant::now();
    assert!(store.renew(&a2).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a Redis outage is a quick error"
    );
}

#[tokio::test]
async fn a_redis_that_lost_its_data_never_hands_out_a_seen_epoch_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = herd::redis_server::RedisServer::start(None, dir.path(), dir.path()).unwrap();
    let config = RedisConfig {
        url: server.url(),
        ..RedisConfig::default()
    };
    let pool = config.pool().unwrap();
    let store = LeaseStore::new(
        pool.clone(),
        &Keys::new("lease-test:"),
        Duration::from_millis(300),
    );
    let first = held(store.acquire("a", None, 0).await.unwrap());
    store.release(&first).await.unwrap();
    let second = held(store.acquire("a", None, first.epoch).await.unwrap());
    assert_eq!(second.epoch, 2);
    store.release(&second).await.unwrap();

    // Redis restarts empty (no persistence): the counter is gone.
    let mut connection = pool.get().await.unwrap();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .unwrap();
    drop(connection);

    let after = held(store.acquire("b", None, second.epoch).await.unwrap());
    assert_eq!(after.epoch, 3, "above every epoch the gateway has seen");
    store.release(&after).await.unwrap();
    let next = held(store.acquire("a", None, 0).await.unwrap());
    assert_eq!(next.epoch, 4, "and the counter goes on from there");
}

/// On a Redis Cluster the lease and the epoch share the `{gateway}` slot. The master of that
/// slot is killed: while its replica is not yet promoted nobody can renew (the active keeps
/// serving on its own, see DESIGN.md); after the promotion a lease and epoch that had reached
/// the replica (`WAIT`) are still there, so the holder renews and the next epoch is above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_lease_survives_a_failover_of_its_cluster_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        herd::redis_cluster::RedisCluster::start(3, 1, dir.path(), Duration::from_millis(1_000))
            .unwrap();
    let config = RedisConfig {
        cluster: cluster.seeds(),
        command_timeout: Duration::from_millis(300),
        ..RedisConfig::default()
    };
    let keys = Keys::new("lease-test:");
    let store = LeaseStore::new(config.pool().unwrap(), &keys, Duration::from_secs(10));
    let first = held(store.acquire("a", None, 0).await.unwrap());
    assert_eq!(first.epoch, 1);

    // The master of the `{gateway}` slot, and a write of ours there confirmed by its replica
    // (replication is ordered: the lease went first).
    let any = cluster.nodes()[0].port();
    let slot: u16 = cluster
        .node_cli(any, &["cluster", "keyslot", &keys.gateway_lease()])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let master = cluster
        .masters()
        .unwrap()
        .into_iter()
        .find(|(_, _, ranges)| {
            ranges.iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                (a.parse::<u16>().unwrap()..=b.parse().unwrap()).contains(&slot)
            })
        })
        .map(|(port, _, _)| port)
        .unwrap();
    let probe = format!("{}probe", keys.gateway_epoch());
    let mut acked = 0;
    for _ in 0..10 {
        let reply = cluster
            .node_cli(
                master,
                &[
                    "eval",
                    "redis.call('SET', KEYS[1], 1) return 1",
                    "1",
                    &probe,
                ],
            )
            .unwrap();
        assert_eq!(reply.trim(), "1");
        acked = cluster
            .node_cli(master, &["wait", "1", "1000"])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if acked == 1 {
            break;
        }
    }
    assert_eq!(acked, 1, "the replica has the lease");

    cluster.kill(master);
    let killed = Instant::now();
    let mut failed = 0;
    let renewed = loop {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no promotion within 15 s"
        );
        match store.renew(&first).await {
            Ok(outcome) => break outcome,
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "lease shard failover: renewals failed for {:?} ({failed} attempts), then {renewed:?}",
        killed.elapsed()
    );
    assert_eq!(
        renewed,
        LeaseOutcome::Held(first.clone()),
        "the replicated lease survived"
    );
    // Right after the promotion a call can still fail (seen once in 46 runs; the error was not
    // kept: most likely the nodes still agreeing on the new master while the client loads the
    // release script, which the new master never ran, on every master its slot map names). The
    // gateway tries such a call again at a later tick (a hand-over whose release failed stays
    // active until then), as here.
    let released = Instant::now();
    while let Err(error) = store.release(&first).await {
        assert!(
            released.elapsed() < Duration::from_secs(10),
            "no release within 10 s of the promotion: {error}"
        );
        println!("release after the promotion failed, again: {error}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = loop {
        match store.acquire("b", None, 0).await {
            // Taken by an attempt whose answer was lost: the lease is b's all the same.
            Ok(LeaseOutcome::Held(lease) | LeaseOutcome::HeldBy(lease)) if lease.holder == "b" => {
                break lease;
            }
            Ok(other) => panic!("expected b to hold the lease, got {other:?}"),
            Err(error) => {
                assert!(
                    released.elapsed() < Duration::from_secs(10),
                    "no acquire within 10 s of the promotion: {error}"
                );
                println!("acquire after the promotion failed, again: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(next.epoch, 2, "the replicated epoch survived");
}
