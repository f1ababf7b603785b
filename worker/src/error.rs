//! Errors as clients see them: the one place where a failure becomes an HTTP status and a short
//! JSON body `{"error":"<kind>","message":"<short>"}`.
//!
//! Handlers and the session layer return [`ApiError`]; details go to the log here, never to the
//! client. Redis trouble is a 503 with `Retry-After`, never a 500.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::session::SessionError;

/// Seconds a client is told to wait when Redis is unavailable.
const RETRY_AFTER_SECS: &str = "1";
/// Longest `message` sent to a client, in characters.
const MAX_MESSAGE_CHARS: usize = 200;

/// A request that failed, with what the client should be told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong (bad JSON, bad query value): 400.
    #[error("{message}")]
    BadRequest {
        /// snake_case kind for the `error` field.
        kind: &'static str,
        /// Short explanation.
        message: String,
    },
    /// The request body is larger than the route accepts: 413.
    #[error("request body too large")]
    BodyTooLarge,
    /// The body parsed but does not fit the expected shape: 422.
    #[error("{0}")]
    Unprocessable(String),
    /// The route needs a logged-in session: 401.
    #[error("not logged in")]
    NotLoggedIn,
    /// No such route: 404.
    #[error("no such route")]
    NotFound,
    /// The route exists but not for this method: 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// A bug (a handler panicked): 500, details only in the log.
    #[error("internal error")]
    Internal,
    /// A session operation failed.
    #[error(transparent)]
    Session(#[from] SessionError),
}

impl ApiError {
    /// A 400 with the given kind.
    pub fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            kind,
            message: message.into(),
        }
    }

    /// Status, kind and client message.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::BadRequest { kind, message } => {
                (StatusCode::BAD_REQUEST, kind, message.clone())
            }
            ApiError::BodyTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is too large".into(),
            ),
            ApiError::Unprocessable(message) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                message.clone(),
            ),
            ApiError::NotLoggedIn => (
                StatusCode::UNAUTHORIZED,
                "not_logged_in",
                "log in first".into(),
            ),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", "no such route".into()),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route".into(),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error".into(),
            ),
            ApiError::Session(error) => match error {
                SessionError::Unavailable(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session_store_unavailable",
                    "session store unavailable, retry shortly".into(),
                ),
                SessionError::TooLarge { limit, .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "session_too_large",
                    format!("the session would exceed {limit} bytes; nothing was changed"),
                ),
                SessionError::Contended => (
                    StatusCode::CONFLICT,
                    "session_contended",
                    "too many concurrent changes to this session; retry".into(),
                ),
                SessionError::Ended => (
                    StatusCode::CONFLICT,
                    "session_ended",
                    "the session ended (logged out or expired) while this request ran".into(),
                ),
                SessionError::Codec { .. } | SessionError::Corrupt(_) | SessionError::Missing => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error".into(),
                ),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, mut message) = self.parts();
        // Parser messages can quote the client's input (an unknown field's name): keep it short.
        if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
            message.truncate(cut);
            message.push('…');
        }
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), kind, error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), kind, error = %self, "request refused");
        }
        let mut response =
            (status, Json(json!({ "error": kind, "message": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::BodyTooLarge;
        }
        match rejection {
            JsonRejection::JsonDataError(error) => ApiError::Unprocessable(error.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::bad_request(
                "bad_content_type",
                "expected Content-Type: application/json",
            ),
            other => ApiError::bad_request("bad_json", other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::bad_request("bad_query", rejection.body_text())
    }
}

/// The JSON 404 for unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn redis_trouble_is_a_503_with_retry_after() {
        let response = ApiError::Session(SessionError::Unavailable("connection refused".into()))
            .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = body(response).await;
        assert_eq!(body["error"], "session_store_unavailable");
        assert!(
            !body["message"].as_str().unwrap().contains("refused"),
            "no internals: {body}"
        );
    }

    #[tokio::test]
    async fn too_large_is_a_413_json() {
        let response = ApiError::Session(SessionError::TooLarge {
            size: 9000,
            limit: 4096,
        })
        .into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body(response).await["error"], "session_too_large");
    }
}
