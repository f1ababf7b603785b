//! The live dashboard on the admin port: one HTML page, its CSS and JS (embedded in the binary,
//! no CDN, no framework), and the JSON document the page polls once a second.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /dashboard` | cookie | the page; without a valid cookie a token form (401) |
//! | `GET /dashboard?token=T` | the token | sets the session cookie, redirects to `/dashboard` |
//! | `POST /dashboard/login` | bearer | sets the session cookie (what the token form does) |
//! | `GET /dashboard/logout` | none | clears the cookie |
//! | `GET /dashboard/app.js`, `/dashboard/app.css` | none | the assets (no data in them) |
//! | `GET /api/dashboard` | bearer or cookie | the JSON (see [`snapshot`]) |
//!
//! **Why polling, not server-sent events.** The admin listener answers each request at once
//! from a synchronous handler and drains its connections on shutdown within a grace period; a
//! stream per open tab would need a task and a timer per tab and would hold shutdown up. One
//! small JSON a second is cheap (the counters are read, never walked per request), works
//! through any proxy, and is the same document `curl` sees.
//!
//! **Why a cookie.** A browser cannot add a bearer header to a page load. The cookie holds a
//! random session value made at start (not the token itself), is `HttpOnly` (no script reads
//! it) and `SameSite=Strict` (no other site's page sends it), and is accepted for the read-only
//! routes only: drain and remove still need the bearer token. A restart ends every session.

pub mod snapshot;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;
use tokio::sync::watch;

use crate::balancer::Balancer;
use crate::body::ResponseBody;
use crate::failover::FailoverStatus;
use crate::metrics::Metrics;
use snapshot::History;

/// The session cookie's name.
pub const COOKIE: &str = "herd_dashboard";
/// How long a browser keeps the session (it also ends when the gateway restarts).
const COOKIE_MAX_AGE_S: u32 = 12 * 3600;

const PAGE: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Scripts and styles from this origin only, no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes and state.
#[derive(Debug)]
pub struct Dashboard {
    balancer: Arc<Balancer>,
    metrics: Arc<Metrics>,
    token: String,
    /// The cookie value this process hands out; empty when there is no token (no sessions).
    session: String,
    failover: Option<watch::Receiver<FailoverStatus>>,
    history: Mutex<History>,
}

impl Dashboard {
    /// A dashboard over `balancer`, guarded by the admin `token` (empty: off).
    pub fn new(balancer: Arc<Balancer>, metrics: Arc<Metrics>, token: String) -> Self {
        let session = if token.is_empty() {
            String::new()
        } else {
            format!("{:032x}", rand::random::<u128>())
        };
        Dashboard {
            balancer,
            metrics,
            token,
            session,
            failover: None,
            history: Mutex::new(History::default()),
        }
    }

    /// Shows the failover pair, and records its role changes as events from now on (spawns a
    /// task: call inside the runtime).
    pub fn set_failover(&mut self, status: Option<watch::Receiver<FailoverStatus>>) {
        if let Some(status) = &status {
            self.balancer
                .notifier()
                .events()
                .follow_failover(status.clone());
        }
        self.failover = status;
    }

    /// Answers a dashboard route; `None` when `request` is for another admin route.
    pub fn handle<B>(&self, request: &Request<B>) -> Option<Response<ResponseBody>> {
        let path = request.uri().path();
        let method = request.method();
        let response = match (method, path) {
            (&Method::GET, "/dashboard" | "/dashboard/") => self.page(request),
            (&Method::POST, "/dashboard/login") => {
                if self.bearer_ok(request) {
                    with_cookie(empty(StatusCode::NO_CONTENT), &self.session_cookie())
                } else {
                    json_response(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "unauthorized", "message": "wrong admin token"}),
                    )
                }
            }
            (&Method::GET, "/dashboard/logout") => {
                let clear = format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict");
                with_cookie(redirect("/dashboard"), &clear)
            }
            (&Method::GET, "/dashboard/app.js") => asset(SCRIPT, "text/javascript; charset=utf-8"),
            (&Method::GET, "/dashboard/app.css") => asset(STYLE, "text/css; charset=utf-8"),
            (&Method::GET, "/api/dashboard") => {
                if self.bearer_ok(request) || self.cookie_ok(request) {
                    self.json()
                } else {
                    json_response(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "unauthorized", "message": "a valid bearer token or dashboard session is required"}),
                    )
                }
            }
            (_, "/api/dashboard") => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "message": "GET only"}),
            ),
            _ if path.starts_with("/dashboard/") => json_response(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "message": "no such dashboard route"}),
            ),
            _ => return None,
        };
        Some(response)
    }

    fn page<B>(&self, request: &Request<B>) -> Response<ResponseBody> {
        if self.token.is_empty() {
            return html(
                StatusCode::UNAUTHORIZED,
                &LOGIN.replace(
                    "<!--message-->",
                    "No admin token is configured (set admin.token): the dashboard is off.",
                ),
            );
        }
        if let Some(presented) = query_param(request.uri().query().unwrap_or(""), "token") {
            if constant_time_eq(presented.as_bytes(), self.token.as_bytes()) {
                // Redirect so the token leaves the address bar and the history.
                return with_cookie(redirect("/dashboard"), &self.session_cookie());
            }
            return html(
                StatusCode::UNAUTHORIZED,
                &LOGIN.replace("<!--message-->", "Wrong token."),
            );
        }
        if self.cookie_ok(request) {
            html(StatusCode::OK, PAGE)
        } else {
            html(StatusCode::UNAUTHORIZED, LOGIN)
        }
    }

    fn json(&self) -> Response<ResponseBody> {
        let now = snapshot::read(&self.balancer, &self.metrics);
        let base = self.history.lock().unwrap().base_for(&now);
        let failover = self.failover.as_ref().map(|s| s.borrow().clone());
        let events = self.balancer.notifier().events();
        let document = snapshot::document(
            &self.balancer,
            events,
            failover.as_ref(),
            &now,
            base.as_ref(),
        );
        json_response(StatusCode::OK, document)
    }

    fn session_cookie(&self) -> String {
        format!(
            "{COOKIE}={}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly; SameSite=Strict",
            self.session
        )
    }

    fn bearer_ok<B>(&self, request: &Request<B>) -> bool {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        !self.token.is_empty()
            && presented.is_some_and(|t| constant_time_eq(t.as_bytes(), self.token.as_bytes()))
    }

    fn cookie_ok<B>(&self, request: &Request<B>) -> bool {
        if self.session.is_empty() {
            return false;
        }
        request
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| {
                name == COOKIE && constant_time_eq(value.as_bytes(), self.session.as_bytes())
            })
    }
}

/// The value of `name` in a query string, `%XX` and `+` decoded; `None` when absent or not
/// UTF-8.
fn query_param(query: &str, name: &str) -> Option<String> {
    let raw = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)?
        .1;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Compares without an early exit, so a secret can't be guessed byte by byte from timings.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn empty(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    response
}

fn redirect(to: &'static str) -> Response<ResponseBody> {
    let mut response = empty(StatusCode::SEE_OTHER);
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    response
}

fn with_cookie(mut response: Response<ResponseBody>, cookie: &str) -> Response<ResponseBody> {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn html(status: StatusCode, body: &str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The token may be in this page's address: never send it on as a referrer.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(body: &'static str, content_type: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn dashboard(token: &str) -> Dashboard {
        let (balancer, metrics) = crate::balancer::with_one_worker();
        Dashboard::new(balancer, metrics, token.into())
    }

    fn get(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    async fn text(response: Response<ResponseBody>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn cookie_of(response: &Response<ResponseBody>) -> String {
        let set = response.headers()[header::SET_COOKIE].to_str().unwrap();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        set.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn the_token_in_the_address_becomes_a_cookie() {
        let d = dashboard("s3cret+/");
        // No cookie: the token form, and no data.
        let response = d.handle(&get("/dashboard", &[])).unwrap();
        assert_eq!(response.status(), 401);
        assert!(text(response).await.contains("<form"));
        let response = d.handle(&get("/api/dashboard", &[])).unwrap();
        assert_eq!(response.status(), 401);
        // A wrong token: refused.
        let response = d.handle(&get("/dashboard?token=nope", &[])).unwrap();
        assert_eq!(response.status(), 401);
        assert!(!response.headers().contains_key(header::SET_COOKIE));
        // The right one (URL-encoded): a cookie that is not the token, and a redirect.
        let response = d
            .handle(&get("/dashboard?token=s3cret%2B%2F", &[]))
            .unwrap();
        assert_eq!(response.status(), 303);
        assert_eq!(response.headers()[header::LOCATION], "/dashboard");
        let cookie = cookie_of(&response);
        assert!(!cookie.contains("s3cret"), "{cookie}");
        let response = d
            .handle(&get("/dashboard", &[("cookie", &cookie)]))
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        assert!(text(response).await.contains("app.js"));
        let response = d
            .handle(&get(
                "/api/dashboard",
                &[("cookie", &format!("a=b; {cookie}"))],
            ))
            .unwrap();
        assert_eq!(response.status(), 200);
        // Another gateway's (or a forged) session is refused.
        let response = d
            .handle(&get("/api/dashboard", &[("cookie", "herd_dashboard=00")]))
            .unwrap();
        assert_eq!(response.status(), 401);
    }

    #[tokio::test]
    async fn login_with_the_bearer_token() {
        let d = dashboard("t");
        let login = |auth: &str| {
            Request::builder()
                .method(Method::POST)
                .uri("/dashboard/login")
                .header("authorization", auth)
                .body(())
                .unwrap()
        };
        assert_eq!(d.handle(&login("Bearer x")).unwrap().status(), 401);
        let response = d.handle(&login("Bearer t")).unwrap();
        assert_eq!(response.status(), 204);
        let cookie = cookie_of(&response);
        let response = d
            .handle(&get("/dashboard", &[("cookie", &cookie)]))
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    #[tokio::test]
    async fn without_a_token_the_dashboard_is_off() {
        let d = dashboard("");
        let response = d.handle(&get("/dashboard?token=", &[])).unwrap();
        assert_eq!(response.status(), 401);
        assert!(text(response).await.contains("admin.token"));
        let response = d
            .handle(&get("/api/dashboard", &[("cookie", "herd_dashboard=")]))
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = d
            .handle(&get("/api/dashboard", &[("authorization", "Bearer ")]))
            .unwrap();
        assert_eq!(response.status(), 401);
    }

    #[tokio::test]
    async fn the_json_shows_workers_totals_and_events() {
        let d = dashboard("t");
        let response = d
            .handle(&get("/api/dashboard", &[("authorization", "Bearer t")]))
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
        let worker = &body["machines"][0]["workers"][0];
        assert_eq!(body["machines"][0]["machine"], "(static)");
        assert_eq!(worker["id"], "127.0.0.1:8081");
        assert_eq!(worker["state"], "slow_start");
        assert_eq!(worker["slow_start"], true);
        assert_eq!(body["pair"]["enabled"], false);
        assert_eq!(body["redis"]["registry"], "unknown");
        assert_eq!(body["totals"]["budget"], "ok");
        assert_eq!(body["events"][0]["name"], "127.0.0.1:8081");
        assert_eq!(body["events"][0]["what"], "added");
        // A drain shows up as an event and in the worker's row.
        d.balancer.admin_drain("127.0.0.1:8081", true).unwrap();
        let response = d
            .handle(&get("/api/dashboard", &[("authorization", "Bearer t")]))
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&text(response).await).unwrap();
        assert_eq!(body["machines"][0]["workers"][0]["state"], "drained");
        assert_eq!(body["machines"][0]["workers"][0]["draining"], true);
        assert_eq!(body["events"][0]["what"], "drained");
    }

    #[tokio::test]
    async fn with_tls_each_certificates_expiry_is_shown() {
        let d = dashboard("t");
        let body = |d: &Dashboard| {
            let response = d
                .handle(&get("/api/dashboard", &[("authorization", "Bearer t")]))
                .unwrap();
            async { serde_json::from_str::<serde_json::Value>(&text(response).await).unwrap() }
        };
        assert_eq!(body(&d).await["tls"]["certificates"], serde_json::json!([]));
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["gw.test".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2040, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        let config = crate::tls::TlsConfig {
            enabled: true,
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            ..Default::default()
        };
        std::fs::write(&config.cert, cert.pem()).unwrap();
        std::fs::write(&config.key, key.serialize_pem()).unwrap();
        let terminator = crate::tls::Terminator::new(&config).unwrap();
        d.metrics.register_collector(terminator.collector());
        let body = body(&d).await;
        let shown = &body["tls"]["certificates"][0];
        assert_eq!(shown["name"], "default");
        // 2 January 2040, 00:00 UTC.
        assert_eq!(shown["expires_unix_s"], 2_209_075_200.0);
        assert!(shown["days_left"].as_f64().unwrap() > 4000.0, "{shown}");
    }

    #[tokio::test]
    async fn the_pair_and_its_role_changes_are_shown() {
        use crate::failover::{PeerStatus, Role, Transition};
        let mut d = dashboard("t");
        let mut status = FailoverStatus {
            id: "gw1".into(),
            role: Role::Standby,
            epoch: 4,
            holds_address: false,
            redis_reachable: true,
            peer: PeerStatus {
                id: Some("gw2".into()),
                role: Some(Role::Active),
                reachable: true,
                last_heard_ms: Some(10),
                healthy_workers: 1,
            },
            transitions: 0,
            last_transition: None,
        };
        let (tx, rx) = watch::channel(status.clone());
        d.set_failover(Some(rx));
        let body = |d: &Dashboard| {
            let response = d
                .handle(&get("/api/dashboard", &[("authorization", "Bearer t")]))
                .unwrap();
            async move { serde_json::from_str::<serde_json::Value>(&text(response).await).unwrap() }
        };
        let json = body(&d).await;
        assert_eq!(json["pair"]["enabled"], true);
        assert_eq!(json["pair"]["role"], "standby");
        assert_eq!(json["pair"]["peer"]["reachable"], true);
        assert_eq!(json["redis"]["lease"], true);
        // The peer goes silent; this gateway takes over.
        status.role = Role::Active;
        status.epoch = 5;
        status.transitions = 1;
        status.redis_reachable = false;
        status.last_transition = Some(Transition {
            from: Role::Standby,
            to: Role::Active,
            reason: "peer silent and the lease is free".into(),
            epoch: 5,
            at_unix_ms: 1_000,
        });
        tx.send(status).unwrap();
        let mut seen = false;
        for _ in 0..1000 {
            let json = body(&d).await;
            if json["events"][0]["subject"] == "failover" {
                assert_eq!(json["events"][0]["what"], "standby -> active");
                assert_eq!(
                    json["events"][0]["reason"],
                    "peer silent and the lease is free"
                );
                assert_eq!(json["pair"]["role"], "active");
                assert_eq!(json["pair"]["last_transition"]["epoch"], 5);
                assert_eq!(json["redis"]["lease"], false);
                seen = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(seen, "the role change never became an event");
    }

    #[test]
    fn other_routes_are_left_to_the_admin_api() {
        let d = dashboard("t");
        assert!(d.handle(&get("/api/workers", &[])).is_none());
        assert!(d.handle(&get("/metrics", &[])).is_none());
        assert_eq!(
            d.handle(&get("/dashboard/nope", &[])).unwrap().status(),
            404
        );
        assert_eq!(
            query_param("a=1&token=x%20y+z", "token").as_deref(),
            Some("x y z")
        );
        assert_eq!(query_param("a=1", "token"), None);
        assert_eq!(query_param("token=%zz", "token"), None);
    }
}
