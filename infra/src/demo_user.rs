//! What a drill's or a lab run's user does first with the demo app: log in through the public
//! address and put one item in the cart, so that a session lost later shows as a missing item.

use std::net::SocketAddr;

use serde_json::json;

/// Logs `user` in through `target` (`POST /login`) and adds `item` to the cart; returns the
/// session cookie (`name=value`).
pub async fn log_in_with_item(
    client: &reqwest::Client,
    target: SocketAddr,
    user: &str,
    item: &str,
) -> Result<String, String> {
    let login = client
        .post(format!("http://{target}/login"))
        .json(&json!({ "user": user }))
        .send()
        .await
        .map_err(|e| format!("login through {target}: {e}"))?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or_else(|| format!("login answered {} without a cookie", login.status()))?
        .to_string();
    let added = client
        .post(format!("http://{target}/cart/items"))
        .header("cookie", &cookie)
        .json(&json!({ "item": item, "qty": 1 }))
        .send()
        .await
        .map_err(|e| format!("first cart write: {e}"))?;
    if !added.status().is_success() {
        return Err(format!("first cart write answered {}", added.status()));
    }
    Ok(cookie)
}
