//! The admin listener: liveness, readiness, metrics, and the operator's JSON API.
//!
//! | route | auth | what |
//! |---|---|---|
//! | `GET /healthz` | none | 200: the process is alive |
//! | `GET /readyz` | none | 200 when a healthy, reachable, routable worker exists, else 503; says how many workers serve |
//! | `GET /metrics` | none | Prometheus text |
//! | `GET /api/workers` | bearer | JSON list of workers with state, load and counters |
//! | `POST /api/workers/{id}/drain`, `/undrain` | bearer | operator drain |
//! | `DELETE /api/workers/{id}` | bearer | remove a worker |
//! | `GET /api/failover` | bearer | the pair: role, epoch, peer, last transition and why |
//! | `GET /dashboard`, `GET /api/dashboard` | token → cookie, or bearer | the live dashboard (see [`crate::dashboard`]) |
//!
//! With no `admin.token` configured, every `/api/*` call answers 401 saying so.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::balancer::{Balancer, ChangeSource, MembershipError, Origin, Worker};
use crate::body::ResponseBody;
use crate::dashboard::Dashboard;
use crate::error::json_error;
use crate::failover::FailoverStatus;
use crate::headers;
use crate::metrics::Metrics;

/// Serves the admin listener.
#[derive(Debug)]
pub struct Admin {
    balancer: Arc<Balancer>,
    metrics: Arc<Metrics>,
    token: String,
    failover: Option<watch::Receiver<FailoverStatus>>,
    dashboard: Dashboard,
}

impl Admin {
    /// An admin API over `balancer`; an empty `token` disables `/api/*`.
    pub fn new(balancer: Arc<Balancer>, metrics: Arc<Metrics>, token: String) -> Self {
        Admin {
            dashboard: Dashboard::new(balancer.clone(), metrics.clone(), token.clone()),
            balancer,
            metrics,
            token,
            failover: None,
        }
    }

    /// Shows the failover node's status at `/api/failover` (when the gateway is one of a pair).
    pub fn with_failover(mut self, status: Option<watch::Receiver<FailoverStatus>>) -> Self {
        self.dashboard.set_failover(status.clone());
        self.failover = status;
        self
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, request: &Request<B>) -> Response<ResponseBody> {
        let path = request.uri().path();
        let method = request.method();
        if let Some(response) = self.dashboard.handle(request) {
            return response;
        }
        match (method, path) {
            (&Method::GET, "/healthz") => json_ok(StatusCode::OK, &json!({"status": "alive"})),
            (&Method::GET, "/readyz") => {
                let ready = self.balancer.is_ready();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let (serving, panic) = self.balancer.serving();
                json_ok(
                    status,
                    &json!({
                        "ready": ready,
                        "workers": self.balancer.workers().workers.len(),
                        "healthy": self.balancer.healthy_count(),
                        "serving": serving,
                        "panic": panic,
                    }),
                )
            }
            (&Method::GET, "/metrics") => {
                let mut response =
                    Response::new(ResponseBody::full(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            _ if path.starts_with("/api/") => {
                if let Some(refusal) = self.refuse_unauthorized(request) {
                    return refusal;
                }
                self.api(method, path)
            }
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    /// The 401 for a request without the right bearer token; `None` lets it through.
    fn refuse_unauthorized<B>(&self, request: &Request<B>) -> Option<Response<ResponseBody>> {
        if self.token.is_empty() {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "admin_token_not_configured",
                "no admin token is configured (set admin.token); the API is disabled",
            ));
        }
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), self.token.as_bytes()) => None,
            _ => {
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid bearer token is required",
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(response)
            }
        }
    }

    fn api(&self, method: &Method, path: &str) -> Response<ResponseBody> {
        let rest = path.trim_start_matches("/api/");
        if rest == "workers" {
            return if method == Method::GET {
                let now = self.balancer.clock().now();
                let slow = self.balancer.selector().slow_start_ns();
                let list: Vec<Value> = self
                    .balancer
                    .workers()
                    .workers
                    .iter()
                    .map(|w| worker_json(w, now, slow))
                    .collect();
                json_ok(StatusCode::OK, &Value::Array(list))
            } else {
                method_not_allowed()
            };
        }
        if rest == "failover" {
            if method != Method::GET {
                return method_not_allowed();
            }
            return match &self.failover {
                Some(status) => {
                    let status = status.borrow().clone();
                    let mut body = serde_json::to_value(&status).unwrap_or(Value::Null);
                    body["enabled"] = Value::Bool(true);
                    json_ok(StatusCode::OK, &body)
                }
                None => json_ok(StatusCode::OK, &json!({"enabled": false})),
            };
        }
        let Some(rest) = rest.strip_prefix("workers/") else {
            return error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint");
        };
        let (id, action) = match rest.rsplit_once('/') {
            Some((id, action @ ("drain" | "undrain"))) => (id, Some(action)),
            _ => (rest, None),
        };
        let Some(id) = percent_decode(id) else {
            return error(StatusCode::BAD_REQUEST, "bad_request", "bad worker id");
        };
        let result = match (method, action) {
            (&Method::POST, Some(action)) => self.balancer.admin_drain(&id, action == "drain"),
            (&Method::DELETE, None) => {
                self.balancer
                    .remove(&id, ChangeSource::Admin, "removed by operator")
            }
            (&Method::GET, None) => self
                .balancer
                .find(&id)
                .ok_or_else(|| MembershipError::Unknown(id.clone())),
            _ => return method_not_allowed(),
        };
        match result {
            Ok(worker) => {
                let now = self.balancer.clock().now();
                let slow = self.balancer.selector().slow_start_ns();
                json_ok(StatusCode::OK, &worker_json(&worker, now, slow))
            }
            Err(MembershipError::Unknown(_)) => error(
                StatusCode::NOT_FOUND,
                "unknown_worker",
                "no worker with this id",
            ),
            Err(other) => error(StatusCode::CONFLICT, "conflict", &other.to_string()),
        }
    }
}

/// One worker as the API shows it.
fn worker_json(worker: &Worker, now: u64, slow_start_ns: u64) -> Value {
    let flags = worker.flags();
    let responses: serde_json::Map<String, Value> = crate::balancer::worker::CLASSES
        .iter()
        .zip(worker.counters.responses.iter())
        .map(|(class, count)| (class.to_string(), json!(count.load(Ordering::Relaxed))))
        .collect();
    use crate::balancer::worker::{ACTIVE_DOWN, ADMIN_DRAIN, EJECTED, REGISTRY_DRAIN, UNREACHABLE};
    json!({
        "id": worker.id(),
        "addr": worker.spec.addr,
        "machine": worker.spec.machine,
        "origin": match worker.spec.origin { Origin::Static => "static", Origin::Registry { .. } => "registry" },
        "state": worker.status(now, slow_start_ns),
        "weight": worker.weight(),
        "in_flight": worker.in_flight(),
        "ewma_ms": worker.ewma.get(now) / 1e6,
        "responses": responses,
        "ejections": worker.counters.ejections.load(Ordering::Relaxed),
        "check_failures": worker.counters.check_failures.load(Ordering::Relaxed),
        "flags": {
            "admin_drain": flags & ADMIN_DRAIN != 0,
            "registry_draining": flags & REGISTRY_DRAIN != 0,
            "active_down": flags & ACTIVE_DOWN != 0,
            "ejected": flags & EJECTED != 0,
            "unreachable": flags & UNREACHABLE != 0,
        },
        "last_change": worker.last_change(),
    })
}

fn json_ok(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<ResponseBody> {
    let id = headers::new_request_id();
    json_error(status, kind, message, id.to_str().unwrap_or("-"))
}

fn method_not_allowed() -> Response<ResponseBody> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
}

/// Compares without an early exit, so the token can't be guessed byte by byte from timings.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes `%XX` escapes in a path segment.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn admin(token: &str) -> Admin {
        let (balancer, metrics) = crate::balancer::with_one_worker();
        Admin::new(balancer, metrics, token.into())
    }

    fn request(method: Method, path: &str, token: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(()).unwrap()
    }

    async fn json(response: Response<ResponseBody>) -> Value {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn failover_status_needs_the_token_and_says_when_off() {
        let a = admin("secret");
        let response = a.handle(&request(Method::GET, "/api/failover", None));
        assert_eq!(response.status(), 401);
        let response = a.handle(&request(Method::GET, "/api/failover", Some("secret")));
        assert_eq!(response.status(), 200);
        assert_eq!(json(response).await["enabled"], false);
    }

    #[tokio::test]
    async fn api_needs_the_token() {
        let a = admin("secret");
        let response = a.handle(&request(Method::GET, "/api/workers", None));
        assert_eq!(response.status(), 401);
        assert_eq!(json(response).await["error"], "unauthorized");
        let response = a.handle(&request(Method::GET, "/api/workers", Some("wrong")));
        assert_eq!(response.status(), 401);
        let response = a.handle(&request(Method::GET, "/api/workers", Some("secret")));
        assert_eq!(response.status(), 200);
        let list = json(response).await;
        assert_eq!(list[0]["id"], "127.0.0.1:8081");
        assert_eq!(list[0]["state"], "slow_start");
    }

    #[tokio::test]
    async fn without_a_configured_token_the_api_is_off() {
        let a = admin("");
        let response = a.handle(&request(Method::GET, "/api/workers", Some("")));
        assert_eq!(response.status(), 401);
        let body = json(response).await;
        assert_eq!(body["error"], "admin_token_not_configured");
        assert!(body["request_id"].is_string());
    }

    #[tokio::test]
    async fn drain_undrain_remove() {
        let a = admin("t");
        let path = "/api/workers/127.0.0.1%3A8081/drain";
        let response = a.handle(&request(Method::POST, path, Some("t")));
        assert_eq!(response.status(), 200);
        assert_eq!(json(response).await["state"], "drained");
        assert_eq!(
            a.handle(&request(Method::GET, "/readyz", None)).status(),
            503
        );
        let response = a.handle(&request(
            Method::POST,
            "/api/workers/127.0.0.1:8081/undrain",
            Some("t"),
        ));
        assert_eq!(json(response).await["last_change"]["what"], "undrained");
        assert_eq!(
            a.handle(&request(Method::GET, "/readyz", None)).status(),
            200
        );
        let response = a.handle(&request(
            Method::DELETE,
            "/api/workers/127.0.0.1:8081",
            Some("t"),
        ));
        assert_eq!(json(response).await["state"], "removed");
        let response = a.handle(&request(
            Method::DELETE,
            "/api/workers/127.0.0.1:8081",
            Some("t"),
        ));
        assert_eq!(response.status(), 404);
    }

    #[tokio::test]
    async fn open_endpoints() {
        let a = admin("");
        assert_eq!(
            a.handle(&request(Method::GET, "/healthz", None)).status(),
            200
        );
        let response = a.handle(&request(Method::GET, "/metrics", None));
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains("herd_gateway_worker_in_flight{worker=\"127.0.0.1:8081\"} 0"),
            "{text}"
        );
        assert!(text.contains("herd_gateway_request_duration_seconds_bucket"));
        assert_eq!(a.handle(&request(Method::GET, "/nope", None)).status(), 404);
    }

    #[test]
    fn helpers() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(percent_decode("a%3Ab").as_deref(), Some("a:b"));
        assert_eq!(percent_decode("a%3"), None);
    }
}
