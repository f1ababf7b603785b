//! A worker draining on SIGTERM behind the gateway, under load: the gateway stops sending (drain
//! notice, `/readyz` 503), the worker finishes what it has, and no request fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herd_tests::cluster::Cluster;
use herd_tests::worker_support::{cookie, login, plain_client, quick_drain_cluster};
use nix::sys::signal::Signal;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_draining_under_load_fails_no_request() {
    let mut cluster = Cluster::start(quick_drain_cluster()).await;
    let client = plain_client();
    let id = login(&client, &cluster, "ann").await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let loaders: Vec<_> = (0..6)
        .map(|k| {
            let (client, stop, ok, failures) =
                (client.clone(), stop.clone(), ok.clone(), failures.clone());
            let (work, items, id) = (
                cluster.gateway.url("/work?ms=1"),
                cluster.gateway.url("/cart/items"),
                id.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                // Bounded in count and time.
                while !stop.load(Ordering::Relaxed)
                    && n < 5_000
                    && started.elapsed() < Duration::from_secs(20)
                {
                    let request = if n.is_multiple_of(4) {
                        client
                            .post(&items)
                            .header("cookie", cookie(&id))
                            .json(&json!({ "item": format!("l{k}-{n}") }))
                    } else {
                        client.get(&work)
                    };
                    match request.send().await {
                        Ok(response) if response.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => failures
                            .lock()
                            .unwrap()
                            .push(format!("status {}", response.status())),
                        Err(error) => failures.lock().unwrap().push(error.to_string()),
                    }
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.worker("w2").signal(Signal::SIGTERM);
    let exit = tokio::task::block_in_place(|| {
        cluster
            .worker("w2")
            .process
            .wait_exit(Duration::from_secs(15))
    });
    let exit = exit.expect("w2 exits after draining");
    assert!(exit.success(), "{exit:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        loader.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let served = ok.load(Ordering::Relaxed);
    eprintln!("drain under load: {served} ok, {} failed", failures.len());
    assert!(served > 100, "the load ran: {served}");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
