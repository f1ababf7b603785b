//! The demo app's session calls, made straight to one worker with a chosen cookie (no cookie
//! jar): log in, read, add to the cart, and the cart's item names. Shared by the session tests
//! on one Redis and on Redis Cluster.

use serde_json::{Value, json};

use crate::worker::TestWorker;
use crate::worker_support::{cookie, set_session_cookie};

/// `POST /login` as `user` on `worker`, with session `id` if given; returns the id the
/// response's cookie sets (a rotated one when `id` was given).
pub async fn login(
    client: &reqwest::Client,
    worker: &TestWorker,
    user: &str,
    id: Option<&str>,
) -> String {
    let mut request = client
        .post(worker.url("/login"))
        .json(&json!({ "user": user }));
    if let Some(id) = id {
        request = request.header("cookie", cookie(id));
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    set_session_cookie(&response).expect("login sets the session cookie")
}

/// `GET path` on `worker` with session `id`: status and JSON body (`Null` when not JSON).
pub async fn get_json(
    client: &reqwest::Client,
    worker: &TestWorker,
    path: &str,
    id: &str,
) -> (u16, Value) {
    let response = client
        .get(worker.url(path))
        .header("cookie", cookie(id))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `POST /cart/items` (one `item`) on `worker` with session `id`: status and JSON body; status
/// 0 when the request got no answer at all (a worker or Redis killed under it).
pub async fn add_item(
    client: &reqwest::Client,
    worker: &TestWorker,
    id: &str,
    item: &str,
) -> (u16, Value) {
    let sent = client
        .post(worker.url("/cart/items"))
        .header("cookie", cookie(id))
        .json(&json!({ "item": item, "qty": 1 }))
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// The item names of a cart (`GET /cart`'s body), in cart order; none when it has no items.
pub fn item_names(cart: &Value) -> Vec<String> {
    cart["items"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .map(|line| line["item"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}
