//! Sessions through the gateway: concurrent changes of one session spread over three workers all
//! take effect.

use std::collections::BTreeSet;
use std::sync::Arc;

use herd_tests::cluster::Cluster;
use herd_tests::worker_support::{cookie, login, plain_client, quick_drain_cluster};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cart_additions_through_the_gateway_are_all_kept() {
    const ADDITIONS: usize = 240;
    const IN_FLIGHT: usize = 48;
    let cluster = Cluster::start(quick_drain_cluster()).await;
    let client = plain_client();
    let id = login(&client, &cluster, "ann").await;

    let url = cluster.gateway.url("/cart/items");
    let semaphore = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for n in 0..ADDITIONS {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let (client, url, id) = (client.clone(), url.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .header("cookie", cookie(&id))
                .json(&json!({ "item": format!("item-{n}"), "qty": 1 }))
                .send()
                .await
                .unwrap();
            drop(permit);
            let worker = response
                .headers()
                .get("x-herd-worker")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (response.status().as_u16(), worker)
        }));
    }
    let mut served_by = BTreeSet::new();
    for task in tasks {
        let (status, worker) = task.await.unwrap();
        assert_eq!(status, 200, "served by {worker}");
        served_by.insert(worker);
    }
    assert!(
        served_by.len() >= 3,
        "spread over ≥ 3 workers: {served_by:?}"
    );
    let cart: Value = client
        .get(cluster.gateway.url("/cart"))
        .header("cookie", cookie(&id))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: BTreeSet<String> = cart["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["item"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = (0..ADDITIONS).map(|n| format!("item-{n}")).collect();
    assert_eq!(names, expected, "every addition is in the cart");
}
