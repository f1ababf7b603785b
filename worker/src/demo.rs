//! The demo app: a login that creates a session, a cart kept in it, and an endpoint with tunable
//! CPU cost for scaling drills. It is also the example of how an app uses [`Session`].
//!
//! | route | does |
//! |---|---|
//! | `POST /login {"user":"ann"}` | binds the session to the user, new session id |
//! | `GET /me` | `{"user":…}`, 401 when not logged in |
//! | `POST /cart/items {"item":"apple","qty":1}` | adds to the cart, returns it |
//! | `GET /cart` | `{"items":[{"item":"apple","qty":1},…]}` |
//! | `POST /logout` | ends this session |
//! | `POST /logout-everywhere` | ends every session of the user |
//! | `GET /work?ms=20` | burns about `ms` of CPU (0–1000) |
//! | `GET /work?ms=0&sleep_ms=2000` | waits `sleep_ms` first (0–10000), burning nothing |

use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Query, Request};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::session::Session;

/// Longest CPU burn `/work` accepts, in milliseconds.
pub const MAX_WORK_MS: u64 = 1_000;
/// Longest wait `/work` accepts before its burn, in milliseconds.
pub const MAX_SLEEP_MS: u64 = 10_000;
const MAX_USER_LEN: usize = 64;
const MAX_ITEM_LEN: usize = 100;
const MAX_QTY: u32 = 1_000;
/// Largest request body the demo routes read (their JSON is tiny); more is a 413.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Serves the demo app on `listener` until `shutdown`, then drains (what the binary runs).
pub async fn run<F>(
    listener: tokio::net::TcpListener,
    config: crate::config::WorkerConfig,
    shutdown: F,
) -> Result<(), crate::server::WorkerError>
where
    F: std::future::Future<Output = ()> + Send,
{
    crate::server::run(listener, config, router(), shutdown).await
}

/// The demo app's routes (run them with [`crate::server::run`], which adds sessions).
pub fn router() -> Router {
    Router::new()
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/cart", get(cart))
        .route("/cart/items", post(add_item))
        .route("/logout", post(logout))
        .route("/logout-everywhere", post(logout_everywhere))
        .route("/work", get(work))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}

/// `Json<T>` whose rejections are herd's JSON errors (400 bad JSON, 422 wrong shape).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(request, state).await?;
        Ok(JsonBody(value))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    user: String,
}

/// One cart line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// What.
    pub item: String,
    /// How many.
    pub qty: u32,
}

/// The cart as stored in the session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    /// Lines in the order first added.
    pub items: Vec<Line>,
}

impl Cart {
    /// Adds `qty` of `item`, merging with an existing line.
    pub fn add(&mut self, item: &str, qty: u32) {
        match self.items.iter_mut().find(|line| line.item == item) {
            Some(line) => line.qty = line.qty.saturating_add(qty),
            None => self.items.push(Line {
                item: item.into(),
                qty,
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddItem {
    item: String,
    #[serde(default = "one")]
    qty: u32,
}

fn one() -> u32 {
    1
}

async fn login(
    session: Session,
    JsonBody(login): JsonBody<Login>,
) -> Result<Json<Value>, ApiError> {
    let user = login.user.trim();
    if user.is_empty()
        || user.len() > MAX_USER_LEN
        || !user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
    {
        return Err(ApiError::Unprocessable(format!(
            "user must be 1–{MAX_USER_LEN} characters of letters, digits, _ - . @"
        )));
    }
    // A new id on login (no fixation); the data (e.g. a cart filled before login) is kept —
    // unless the session belonged to another user, whose data must not pass to this one.
    if session.user().await?.is_some_and(|current| current != user) {
        session.clear().await?;
    }
    session.regenerate().await;
    session.set_user(Some(user)).await?;
    session.insert("user", user).await?;
    session.save().await?;
    Ok(Json(json!({ "user": user })))
}

async fn logged_in(session: &Session) -> Result<String, ApiError> {
    session
        .get::<String>("user")
        .await?
        .ok_or(ApiError::NotLoggedIn)
}

async fn me(session: Session) -> Result<Json<Value>, ApiError> {
    let user = logged_in(&session).await?;
    Ok(Json(json!({ "user": user })))
}

async fn cart(session: Session) -> Result<Json<Cart>, ApiError> {
    logged_in(&session).await?;
    Ok(Json(session.get("cart").await?.unwrap_or_default()))
}

async fn add_item(
    session: Session,
    JsonBody(add): JsonBody<AddItem>,
) -> Result<Json<Cart>, ApiError> {
    logged_in(&session).await?;
    let item = add.item.trim().to_string();
    if item.is_empty() || item.len() > MAX_ITEM_LEN {
        return Err(ApiError::Unprocessable(format!(
            "item must be 1–{MAX_ITEM_LEN} characters"
        )));
    }
    if add.qty == 0 || add.qty > MAX_QTY {
        return Err(ApiError::Unprocessable(format!("qty must be 1–{MAX_QTY}")));
    }
    let qty = add.qty;
    // Re-applied to the fresh cart if another request saved first: no lost additions.
    session
        .update("cart", move |cart: &mut Cart| cart.add(&item, qty))
        .await?;
    session.save().await?;
    Ok(Json(session.get("cart").await?.unwrap_or_default()))
}

async fn logout(session: Session) -> Result<Json<Value>, ApiError> {
    session.destroy().await?;
    Ok(Json(json!({ "logged_out": true })))
}

async fn logout_everywhere(session: Session) -> Result<Json<Value>, ApiError> {
    let user = logged_in(&session).await?;
    let sessions = session.destroy_user(&user).await?;
    Ok(Json(json!({ "logged_out": true, "sessions": sessions })))
}

#[derive(Debug, Deserialize)]
struct WorkQuery {
    ms: Option<String>,
    sleep_ms: Option<String>,
}

/// A millisecond count from the query: `default` when absent, a 400 naming `name` when it is
/// not an integer up to `max`.
fn millis(text: Option<&str>, name: &str, default: u64, max: u64) -> Result<u64, ApiError> {
    let Some(text) = text else {
        return Ok(default);
    };
    text.parse::<u64>()
        .ok()
        .filter(|ms| *ms <= max)
        .ok_or_else(|| {
            ApiError::bad_request("bad_query", format!("{name} must be an integer 0–{max}"))
        })
}

async fn work(
    query: Result<Query<WorkQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let ms = millis(query.ms.as_deref(), "ms", 10, MAX_WORK_MS)?;
    let sleep_ms = millis(query.sleep_ms.as_deref(), "sleep_ms", 0, MAX_SLEEP_MS)?;
    // A wait holds a request in flight without loading the machine (the worker-kill drill's
    // slow requests: burning CPU for them slowed the drill's own look at the cluster).
    if sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
    }
    // Burn on the blocking pool so a long burn never stalls the async workers.
    let spent = tokio::task::spawn_blocking(move || burn(Duration::from_millis(ms)))
        .await
        .unwrap_or_default();
    Ok(Json(
        json!({ "ms": ms, "spent_us": spent.as_micros() as u64 }),
    ))
}

/// Spins for about `duration` of wall time doing arithmetic; returns the time spent.
fn burn(duration: Duration) -> Duration {
    let started = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while started.elapsed() < duration {
        for _ in 0..1_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
    started.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WorkerConfig;
    use axum::body::Body;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    /// The demo app with sessions on a Redis that is not there (port 1): routes that need no
    /// session work, session routes fail cleanly.
    fn app() -> Router {
        let config = WorkerConfig {
            redis: herd_shared::redis::RedisConfig {
                url: "redis://127.0.0.1:1/0".into(),
                connect_timeout: Duration::from_millis(200),
                command_timeout: Duration::from_millis(200),
                ..Default::default()
            },
            ..WorkerConfig::default()
        };
        let store = crate::server::session_store(&config).unwrap();
        router().layer(crate::session::SessionLayer::new(store))
    }

    async fn call(request: http::Request<Body>) -> (StatusCode, http::HeaderMap, Value) {
        let response = app().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status, parts.headers, value)
    }

    fn post(path: &str, body: &str) -> http::Request<Body> {
        http::Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    #[tokio::test]
    async fn work_burns_and_rejects_bad_values() {
        let (status, _, body) = call(
            http::Request::get("/work?ms=5")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(body["spent_us"].as_u64().unwrap() >= 5_000, "{body}");
        let started = Instant::now();
        let (status, _, body) = call(
            http::Request::get("/work?ms=0&sleep_ms=30")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(started.elapsed() >= Duration::from_millis(30));
        for bad in [
            "/work?ms=abc",
            "/work?ms=-1",
            "/work?ms=100000",
            "/work?sleep_ms=x",
            "/work?sleep_ms=10001",
        ] {
            let (status, _, body) =
                call(http::Request::get(bad).body(Body::empty()).unwrap()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body["error"], "bad_query", "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_json_is_a_json_error() {
        let (status, _, body) = call(post("/login", "{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "bad_json");
        let (status, _, body) = call(post("/login", r#"{"name":"ann"}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["error"], "invalid_body");
        let (status, _, body) = call(post("/login", r#"{"user":"a b"}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }

    #[tokio::test]
    async fn huge_bodies_are_a_short_413_json() {
        let huge = format!(r#"{{"user":"{}"}}"#, "a".repeat(3 * 1024 * 1024));
        let (status, _, body) = call(post("/login", &huge)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body:.200}");
        assert_eq!(body["error"], "body_too_large");
        // Under the limit, an error that quotes the input still stays short.
        let field = "x".repeat(10_000);
        let (status, _, body) = call(post("/login", &format!(r#"{{"{field}":1}}"#))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            body["message"].as_str().unwrap().chars().count() <= 201,
            "{body:.300}"
        );
    }

    #[tokio::test]
    async fn anonymous_me_needs_no_redis() {
        // No cookie: nothing to load, so no Redis call and a clean 401.
        let (status, headers, body) =
            call(http::Request::get("/me").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "not_logged_in");
        assert!(headers.get("set-cookie").is_none());
    }

    #[tokio::test]
    async fn redis_down_is_a_fast_503_with_retry_after() {
        let started = Instant::now();
        let (status, headers, body) = call(post("/login", r#"{"user":"ann"}"#)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
        assert_eq!(body["error"], "session_store_unavailable");
        assert!(
            headers.get("set-cookie").is_none(),
            "no cookie for a session never stored"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let id = "ab".repeat(24);
        let request = http::Request::get("/cart")
            .header("cookie", format!("herd_session={id}"))
            .body(Body::empty())
            .unwrap();
        let (status, headers, _) = call(request).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
    }

    #[test]
    fn cart_merges_lines() {
        let mut cart = Cart::default();
        cart.add("apple", 1);
        cart.add("pear", 2);
        cart.add("apple", 3);
        assert_eq!(
            cart.items,
            vec![
                Line {
                    item: "apple".into(),
                    qty: 4
                },
                Line {
                    item: "pear".into(),
                    qty: 2
                }
            ]
        );
    }
}
