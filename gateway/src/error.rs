//! Errors of the request path, and the one place where they become responses.
//!
//! [`UpstreamError`] is what went wrong with one attempt at one worker. It carries the two facts
//! the retry decision needs — did the request reach the worker, and is another attempt safe —
//! as fields, never as string matching. [`GatewayError`] is why the gateway answers a request
//! itself; [`GatewayError::to_response`] maps every kind to a status and a short JSON body, so
//! the mapping lives here and nowhere else.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ResponseBody;
pub use crate::upstream::{UpstreamError, UpstreamErrorKind};

/// nginx's non-standard status for a client that went away first, used in logs and metrics.
pub fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// Why the gateway answers a request itself.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No worker can take new requests (none healthy and routable, or all tried).
    #[error("no worker available")]
    NoWorker,
    /// Every candidate is at its in-flight limit.
    #[error("all workers at their in-flight limit")]
    AllBusy,
    /// The open-connection limit is reached.
    #[error("too many client connections")]
    TooManyConnections,
    /// The client's address is at `limits.max_connections_per_client`.
    #[error("too many connections from this client address")]
    TooManyClientConnections,
    /// The last attempt failed and no retry was possible.
    #[error("worker failed: {0}")]
    Upstream(UpstreamError),
    /// The whole-request deadline passed while waiting for a worker.
    #[error("timed out waiting for a worker")]
    UpstreamTimeout,
    /// The client was too slow sending its request.
    #[error("client too slow sending the request")]
    ClientTimeout,
    /// The client closed its connection before its request was complete (nginx's 499); logged
    /// and counted, the answer goes nowhere.
    #[error("client closed the request: {0}")]
    ClientGone(String),
    /// The request body is over `limits.max_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The request head is over `limits.max_header_bytes`.
    #[error("request headers too large")]
    HeadersTooLarge,
    /// The request body could not be read from the client.
    #[error("could not read the request body: {0}")]
    ClientBody(String),
    /// The request is not something the gateway can forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

impl GatewayError {
    /// Status, snake_case kind and a short message for the client.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            GatewayError::NoWorker => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_worker_available",
                "no worker can take this request right now",
            ),
            GatewayError::AllBusy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "workers_busy",
                "every worker is at its in-flight limit",
            ),
            GatewayError::TooManyConnections => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "the gateway is at its connection limit",
            ),
            GatewayError::ClientGone(_) => (
                client_closed_request(),
                "client_closed_request",
                "the client closed the request",
            ),
            GatewayError::TooManyClientConnections => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections_from_client",
                "this client address has too many open connections",
            ),
            GatewayError::Upstream(error) if !error.reached => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_worker_available",
                "no worker could be reached",
            ),
            GatewayError::Upstream(error) if error.kind == UpstreamErrorKind::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the worker did not answer in time",
            ),
            GatewayError::Upstream(_) => (
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the worker failed to answer",
            ),
            GatewayError::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "no worker answered in time",
            ),
            GatewayError::ClientTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request was not received in time",
            ),
            GatewayError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is too large",
            ),
            GatewayError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "the request headers are too large",
            ),
            GatewayError::ClientBody(_) => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the request body could not be read",
            ),
            GatewayError::BadRequest(message) => (StatusCode::BAD_REQUEST, "bad_request", message),
        }
    }

    /// Whether the gateway answers before reading the client's whole request body, so the
    /// connection cannot carry another request.
    pub fn body_left_unread(&self) -> bool {
        matches!(
            self,
            GatewayError::BodyTooLarge
                | GatewayError::HeadersTooLarge
                | GatewayError::ClientTimeout
                | GatewayError::ClientBody(_)
                | GatewayError::ClientGone(_)
                | GatewayError::BadRequest(_)
        )
    }

    /// The client's response: status plus `{"error","message","request_id"}`.
    pub fn to_response(&self, request_id: &str) -> Response<ResponseBody> {
        let (status, kind, message) = self.parts();
        json_error(status, kind, message, request_id)
    }
}

/// A JSON error response (also used by the admin API).
pub fn json_error(
    status: StatusCode,
    kind: &str,
    message: &str,
    request_id: &str,
) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "error": kind,
        "message": message,
        "request_id": request_id,
    });
    let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(value) = HeaderValue::from_str(request_id) {
        headers.insert(crate::headers::REQUEST_ID, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: UpstreamErrorKind, reached: bool) -> UpstreamError {
        UpstreamError {
            kind,
            reached,
            detail: String::new(),
        }
    }

    #[test]
    fn each_kind_has_its_status() {
        let cases = [
            (GatewayError::NoWorker, 503),
            (GatewayError::AllBusy, 503),
            (GatewayError::TooManyConnections, 503),
            (GatewayError::TooManyClientConnections, 429),
            (
                GatewayError::Upstream(err(UpstreamErrorKind::Connect, false)),
                503,
            ),
            (
                GatewayError::Upstream(err(UpstreamErrorKind::Reset, true)),
                502,
            ),
            (GatewayError::Upstream(UpstreamError::timeout()), 504),
            (GatewayError::UpstreamTimeout, 504),
            (GatewayError::ClientTimeout, 408),
            (GatewayError::ClientGone("eof".into()), 499),
            (GatewayError::BodyTooLarge, 413),
            (GatewayError::HeadersTooLarge, 431),
            (GatewayError::BadRequest("x"), 400),
        ];
        for (error, status) in cases {
            assert_eq!(error.parts().0.as_u16(), status, "{error}");
        }
    }

    #[tokio::test]
    async fn error_body_is_json_with_the_request_id() {
        use http_body_util::BodyExt;
        let response = GatewayError::NoWorker.to_response("abc-1");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["content-type"], "application/json");
        assert_eq!(response.headers()["x-request-id"], "abc-1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "no_worker_available");
        assert_eq!(json["request_id"], "abc-1");
        assert!(json["message"].as_str().unwrap().len() > 5);
    }
}
