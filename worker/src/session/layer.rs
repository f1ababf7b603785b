//! The tower layer that gives every request a [`Session`] and, after the handler, saves pending
//! changes and sets or clears the cookie.
//!
//! A failed save replaces the handler's response with the error's (503 when Redis is down, 413
//! when too large, 409 when the session ended meanwhile), so a client never sees a success that
//! was not stored.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{Request, header};
use tower::{Layer, Service};

use super::cookie;
use super::{CookieAction, Session, SessionStore};
use crate::error::ApiError;

/// Adds sessions to a service. Build it once from a [`SessionStore`].
#[derive(Debug, Clone)]
pub struct SessionLayer {
    store: SessionStore,
}

impl SessionLayer {
    /// Sessions kept in `store`.
    pub fn new(store: SessionStore) -> Self {
        SessionLayer { store }
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SessionService {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around an app.
#[derive(Debug, Clone)]
pub struct SessionService<S> {
    inner: S,
    store: SessionStore,
}

impl<S> Service<Request<Body>> for SessionService<S>
where
    S: Service<Request<Body>, Response = Response> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let store = self.store.clone();
        let https = cookie::is_https(request.headers());
        let session = Session::new(
            store.clone(),
            cookie::session_id(request.headers(), &store.config().cookie_name),
        );
        request.extensions_mut().insert(session.clone());
        // Handed to the inner service here, which `poll_ready` readied: no clone of it to take
        // into the future (tower's usual dance when the call is made later, inside it), and the
        // boxed future below holds the inner one, not the request and the service beside it
        // (docs/performance.md, section 51).
        let handled = self.inner.call(request);
        Box::pin(async move {
            let mut response = handled.await?;
            // The save is boxed: its state (compare-and-set attempts, the user index, the
            // retries' pauses) is 7 KB, and this future is moved into a box per request, read
            // or write; a request that saves pays one allocation instead.
            if session.is_dirty().await
                && let Err(error) = Box::pin(session.save()).await
            {
                response = ApiError::from(error).into_response();
            }
            let value = match session.cookie_action().await {
                Some(CookieAction::Set(id)) => Some(cookie::set(store.config(), &id, https)),
                Some(CookieAction::Clear) => Some(cookie::clear(store.config(), https)),
                None => None,
            };
            if let Some(value) = value {
                response.headers_mut().append(header::SET_COOKIE, value);
                // A response that sets a session cookie must never be cached by a proxy.
                response.headers_mut().insert(
                    header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
            }
            Ok(response)
        })
    }
}
