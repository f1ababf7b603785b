//! Sessions in Redis that any axum app can use: a tower layer ([`SessionLayer`]) and an extractor
//! ([`Session`]).
//!
//! Nothing touches Redis until a handler first reads or changes the session; a request that never
//! does costs nothing. Changes are recorded as operations and saved once, at the end of the request
//! (or earlier with [`Session::save`]), by a compare-and-set on the session's version. When another
//! request (on any worker) saved first, the fresh session is loaded and the *operations* are
//! applied again — [`Session::update`] re-runs its closure on the fresh value — so no update is
//! lost. Design and trade-offs: `docs/sessions.md`.
//!
//! ```no_run
//! use axum::{Json, Router, routing::post};
//! use herd_worker::session::Session;
//!
//! async fn visit(session: Session) -> Result<Json<u64>, herd_worker::ApiError> {
//!     // Runs again on the fresh count if another request saved first: no lost increments.
//!     session.update("visits", |visits: &mut u64| *visits += 1).await?;
//!     session.save().await?;
//!     Ok(Json(session.get("visits").await?.unwrap_or(0)))
//! }
//!
//! let app: Router = Router::new().route("/visit", post(visit));
//! // herd_worker::server::run(listener, config, app, shutdown) adds the session layer.
//! ```

mod cookie;
mod id;
mod layer;
mod store;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use http::request::Parts;
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use layer::{SessionLayer, SessionService};
pub use store::SessionStore;
use store::{Record, SaveOutcome, Write};

use crate::error::ApiError;

/// Why a session operation failed. [`ApiError`] turns each into a status and JSON body.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Redis could not be reached or did not answer in time (503 + Retry-After).
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// The change would make the stored session larger than the limit; nothing was saved (413).
    #[error("session of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Size the session would have had.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Concurrent changes kept winning for every retry (409).
    #[error("session changed concurrently too often")]
    Contended,
    /// The session was logged out or expired while the request ran; it is not resurrected. Also
    /// a regeneration asked through an old id during its grace, which is refused (409).
    #[error("session ended while the request ran")]
    Ended,
    /// A value could not be (de)serialized as the requested type.
    #[error("session value `{key}`: {source}")]
    Codec {
        /// The data key.
        key: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// Redis returned something this code never writes.
    #[error("corrupt session record: {0}")]
    Corrupt(String),
    /// The handler asked for a session but the session layer is not installed.
    #[error("session layer missing")]
    Missing,
}

type UpdateFn = Arc<dyn Fn(Option<Value>) -> Result<Option<Value>, SessionError> + Send + Sync>;

/// One recorded change, applied again to the fresh data after a conflict.
#[derive(Clone)]
enum Op {
    Set(String, Value),
    Remove(String),
    Update(String, UpdateFn),
    Clear,
    User(Option<String>),
}

/// What the request currently sees: the stored session (or an empty new one) with its changes.
#[derive(Debug, Clone, Default)]
struct View {
    /// Stored id and version; None for a session not yet stored.
    stored: Option<(String, u64)>,
    data: Map<String, Value>,
    user: Option<String>,
    /// The user as stored when loaded (None for a new session).
    stored_user: Option<String>,
    /// Reached through a regeneration alias (an old id during its grace): such a request may
    /// read and change the session but never regenerate it, or it would obtain the new id.
    via_alias: bool,
}

/// What to do with the cookie in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CookieAction {
    Set(String),
    Clear,
}

#[derive(Default)]
struct State {
    view: Option<View>,
    ops: Vec<Op>,
    regenerate: bool,
    cookie: Option<CookieAction>,
}

struct Inner {
    store: SessionStore,
    /// The well-formed id the client sent, if any (it may be unknown to Redis).
    cookie_id: Option<String>,
    state: tokio::sync::Mutex<State>,
}

/// The current request's session. Cheap to clone; all clones share one state.
///
/// Extract it in a handler (`session: Session`) under a [`SessionLayer`].
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    fn new(store: SessionStore, cookie_id: Option<String>) -> Self {
        Session {
            inner: Arc::new(Inner {
                store,
                cookie_id,
                state: tokio::sync::Mutex::new(State::default()),
            }),
        }
    }

    /// Loads the session on first access.
    async fn loaded<'a>(&self, state: &'a mut State) -> Result<&'a mut View, SessionError> {
        if state.view.is_none() {
            let view = match &self.inner.cookie_id {
                Some(id) => self
                    .inner
                    .store
                    .load(id)
                    .await?
                    .map(|record| View::loaded(record, id)),
                None => None,
            };
            state.view = Some(view.unwrap_or_default());
        }
        Ok(state.view.as_mut().expect("just loaded"))
    }

    async fn record(&self, op: Op) -> Result<(), SessionError> {
        let mut state = self.inner.state.lock().await;
        let view = self.loaded(&mut state).await?;
        view.apply(&op)?;
        state.ops.push(op);
        Ok(())
    }

    /// The value under `key`, if any.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SessionError> {
        let mut state = self.inner.state.lock().await;
        let view = self.loaded(&mut state).await?;
        view.data
            .get(key)
            .map(|value| serde_json::from_value(value.clone()))
            .transpose()
            .map_err(|source| SessionError::Codec {
                key: key.into(),
                source,
            })
    }

    /// Sets `key` to `value` (if another request changes the same key concurrently, the later
    /// save wins for this key; other keys are kept).
    pub async fn insert<T: Serialize>(&self, key: &str, value: T) -> Result<(), SessionError> {
        let value = serde_json::to_value(value).map_err(|source| SessionError::Codec {
            key: key.into(),
            source,
        })?;
        self.record(Op::Set(key.into(), value)).await
    }

    /// Removes `key`.
    pub async fn remove(&self, key: &str) -> Result<(), SessionError> {
        self.record(Op::Remove(key.into())).await
    }

    /// Read-modify-write of `key` (starting from `T::default()` when absent). If another request
    /// saves first, `change` runs again on the fresh value, so concurrent updates all take
    /// effect. `change` may therefore run more than once; keep it free of side effects.
    pub async fn update<T, F>(&self, key: &str, change: F) -> Result<(), SessionError>
    where
        T: Serialize + DeserializeOwned + Default,
        F: Fn(&mut T) + Send + Sync + 'static,
    {
        let name = key.to_string();
        let update: UpdateFn = Arc::new(move |old: Option<Value>| {
            let codec = |source| SessionError::Codec {
                key: name.clone(),
                source,
            };
            let mut value: T = match old {
                Some(old) => serde_json::from_value(old).map_err(codec)?,
                None => T::default(),
            };
            change(&mut value);
            serde_json::to_value(value).map(Some).map_err(codec)
        });
        self.record(Op::Update(key.into(), update)).await
    }

    /// Removes every key (the user binding stays).
    pub async fn clear(&self) -> Result<(), SessionError> {
        self.record(Op::Clear).await
    }

    /// The user this session is bound to (for "log out everywhere").
    pub async fn user(&self) -> Result<Option<String>, SessionError> {
        let mut state = self.inner.state.lock().await;
        Ok(self.loaded(&mut state).await?.user.clone())
    }

    /// Binds the session to `user` (or unbinds it), keeping the user's session index in step.
    pub async fn set_user(&self, user: Option<&str>) -> Result<(), SessionError> {
        self.record(Op::User(user.map(str::to_string))).await
    }

    /// Gives the session a new id at the next save, keeping its data (call it on login). The old
    /// id keeps working for `session.regenerate_grace`, then dies; a request made with the old id
    /// meanwhile cannot regenerate (its save fails with [`SessionError::Ended`]).
    pub async fn regenerate(&self) {
        self.inner.state.lock().await.regenerate = true;
    }

    /// Deletes the session now (logout). The response clears the cookie; a later change in the
    /// same request starts a new session.
    pub async fn destroy(&self) -> Result<(), SessionError> {
        let mut state = self.inner.state.lock().await;
        let stored = match &state.view {
            Some(view) => view.stored.as_ref().map(|(id, _)| id.clone()),
            None => self.inner.cookie_id.clone(),
        };
        // The cookie id too: it may be an alias of the stored one.
        let mut ids: Vec<&String> = stored.iter().chain(self.inner.cookie_id.iter()).collect();
        ids.dedup();
        for id in ids {
            self.inner.store.destroy(id).await?;
        }
        *state = State {
            view: Some(View::default()),
            cookie: Some(CookieAction::Clear),
            ..State::default()
        };
        Ok(())
    }

    /// Log out everywhere: deletes every session bound to `user`, this one included.
    pub async fn destroy_user(&self, user: &str) -> Result<usize, SessionError> {
        let count = self.inner.store.destroy_user(user).await?;
        let mut state = self.inner.state.lock().await;
        *state = State {
            view: Some(View::default()),
            cookie: Some(CookieAction::Clear),
            ..State::default()
        };
        Ok(count)
    }

    /// The session's id as stored (None while it is new and unsaved).
    pub async fn id(&self) -> Option<String> {
        let state = self.inner.state.lock().await;
        state
            .view
            .as_ref()
            .and_then(|view| view.stored.as_ref().map(|(id, _)| id.clone()))
    }

    /// Saves pending changes now (the layer otherwise saves at the end of the request). After
    /// it returns, reads see the merged session as stored. On error nothing was written and the
    /// pending changes are dropped.
    pub async fn save(&self) -> Result<(), SessionError> {
        let mut state = self.inner.state.lock().await;
        if state.ops.is_empty() && !state.regenerate {
            return Ok(());
        }
        // One span around the whole save: its compare-and-set attempts are its children, and
        // each conflict is an event on it.
        let span = herd_shared::telemetry::in_traced_request().then(|| {
            tracing::info_span!(
                target: herd_shared::telemetry::TRACE_TARGET,
                "session save",
                conflicts = tracing::field::Empty,
            )
        });
        let result = herd_shared::telemetry::in_span(span, self.save_locked(&mut state)).await;
        if result.is_err() {
            // Drop the unsaved changes: a retry of the request starts from what is stored.
            state.ops.clear();
            state.regenerate = false;
            state.view = None;
        }
        result
    }

    async fn save_locked(&self, state: &mut State) -> Result<(), SessionError> {
        let store = &self.inner.store;
        let config = store.config();
        self.loaded(state).await?;
        let stored_id = state
            .view
            .as_ref()
            .and_then(|view| view.stored.as_ref().map(|(id, _)| id.clone()));
        let _lock = match &stored_id {
            Some(id) => Some(store.lock(id).await),
            None => None,
        };
        let token = id::generate();
        let started = tokio::time::Instant::now();
        let mut conflicts = 0u32;
        let mut busy = 0u32;
        loop {
            let view = state.view.as_ref().expect("loaded above");
            if state.regenerate && view.via_alias {
                // Whoever holds the old id must not get a fresh id for the session it was
                // moved away from (the grace is for in-flight requests, not for logins).
                return Err(SessionError::Ended);
            }
            let data = Value::Object(view.data.clone()).to_string();
            let size = data.len() + view.user.as_ref().map_or(0, String::len);
            if size > config.max_bytes {
                return Err(SessionError::TooLarge {
                    size,
                    limit: config.max_bytes,
                });
            }
            let target = match (&view.stored, state.regenerate) {
                (Some((stored, _)), false) => stored.clone(),
                // A new id keeps the old one's hash tag: the alias left behind shares its slot.
                (Some((stored, _)), true) => id::regenerate(stored),
                (None, _) => id::generate(),
            };
            let write = Write {
                current: view
                    .stored
                    .as_ref()
                    .map(|(stored, version)| (stored.as_str(), *version)),
                target: &target,
                data: &data,
                user: view.user.as_deref(),
                bound: view.stored_user.as_deref(),
                token: &token,
                claim: conflicts >= CLAIM_AFTER,
            };
            // Only a new or regenerated id goes into a cookie: a request under an alias (the
            // old id during the grace) must not obtain the new id.
            let new_id = view
                .stored
                .as_ref()
                .is_none_or(|(stored, _)| *stored != target);
            match store.save(&write).await? {
                SaveOutcome::Saved(version) => {
                    let view = state.view.as_mut().expect("loaded above");
                    view.stored = Some((target.clone(), version));
                    state.ops.clear();
                    state.regenerate = false;
                    if new_id {
                        state.cookie = Some(CookieAction::Set(target));
                    }
                    return Ok(());
                }
                SaveOutcome::Gone => return Err(SessionError::Ended),
                SaveOutcome::Busy => {
                    store.metrics().session_busy();
                    // Another writer that kept losing has priority; it saves within a round trip
                    // or two. Wait for it, within a time budget.
                    if started.elapsed() >= BUSY_BUDGET {
                        break;
                    }
                    backoff(busy.min(4)).await;
                    busy += 1;
                }
                SaveOutcome::Conflict(fresh) => {
                    conflicts += 1;
                    store.metrics().session_conflict();
                    if herd_shared::telemetry::in_traced_request() {
                        let span = tracing::Span::current();
                        span.record("conflicts", conflicts);
                        tracing::debug!(target: herd_shared::telemetry::TRACE_TARGET, conflicts, "compare-and-set conflict: retrying on fresh data");
                    }
                    if conflicts >= config.max_retries {
                        break;
                    }
                    // With the fresh session in hand, retry at once: pausing would only let the
                    // other writers win again. Pause when a reload is needed or after many tries.
                    let pause = fresh.is_none() || conflicts >= QUICK_RETRIES;
                    let via_alias = view.via_alias;
                    let fresh = match (fresh, &view.stored) {
                        (Some(record), _) => View::from(record),
                        // Moved by a concurrent regeneration: now reached through an alias.
                        (None, Some((stored, _))) => match store.load(stored).await? {
                            Some(record) => View::loaded(record, stored),
                            None => return Err(SessionError::Ended),
                        },
                        // A new session whose random id was taken: try another id.
                        (None, None) => View::default(),
                    };
                    let mut view = fresh;
                    view.via_alias |= via_alias;
                    for op in &state.ops {
                        view.apply(op)?;
                    }
                    state.view = Some(view);
                    if pause {
                        backoff(conflicts).await;
                    }
                }
            }
        }
        tracing::warn!(
            conflicts,
            busy,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "session save gave up after conflicts"
        );
        Err(SessionError::Contended)
    }

    /// Whether there are changes not yet saved.
    async fn is_dirty(&self) -> bool {
        let state = self.inner.state.lock().await;
        !state.ops.is_empty() || state.regenerate
    }

    /// The cookie the response must carry, if any.
    async fn cookie_action(&self) -> Option<CookieAction> {
        self.inner.state.lock().await.cookie.clone()
    }
}

/// Conflicts retried without a pause when the script returned the fresh session.
const QUICK_RETRIES: u32 = 8;
/// After this many conflicts a save claims the session's write lease (see `store.rs`).
const CLAIM_AFTER: u32 = 3;
/// Longest a save waits in total for other writers' leases.
const BUSY_BUDGET: Duration = Duration::from_secs(3);

/// Random, growing pause between compare-and-set attempts, so contending requests spread out.
async fn backoff(attempt: u32) {
    let cap_us = 200u64 << attempt.min(6);
    let pause = rand::rng().random_range(0..=cap_us);
    tokio::time::sleep(Duration::from_micros(pause)).await;
}

impl From<Record> for View {
    fn from(record: Record) -> Self {
        View {
            stored: Some((record.id, record.version)),
            data: record.data,
            stored_user: record.user.clone(),
            user: record.user,
            via_alias: false,
        }
    }
}

impl View {
    /// The view of `record`, loaded by asking for `asked` (an alias when the ids differ).
    fn loaded(record: Record, asked: &str) -> Self {
        View {
            via_alias: record.id != asked,
            ..View::from(record)
        }
    }
}

impl View {
    fn apply(&mut self, op: &Op) -> Result<(), SessionError> {
        match op {
            Op::Set(key, value) => {
                self.data.insert(key.clone(), value.clone());
            }
            Op::Remove(key) => {
                self.data.remove(key);
            }
            Op::Update(key, change) => match change(self.data.get(key).cloned())? {
                Some(value) => {
                    self.data.insert(key.clone(), value);
                }
                None => {
                    self.data.remove(key);
                }
            },
            Op::Clear => self.data.clear(),
            Op::User(user) => self.user.clone_from(user),
        }
        Ok(())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(ApiError::Session(SessionError::Missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_replay_on_fresh_data() {
        let mut view = View::default();
        let push: UpdateFn = Arc::new(|old| {
            let mut list: Vec<u32> = old
                .map(|v| serde_json::from_value(v).unwrap())
                .unwrap_or_default();
            list.push(7);
            Ok(Some(serde_json::to_value(list).unwrap()))
        });
        let ops = vec![
            Op::Set("a".into(), Value::from(1)),
            Op::Update("list".into(), push),
            Op::Remove("gone".into()),
            Op::User(Some("ann".into())),
        ];
        // Someone else stored list=[1] and gone=true meanwhile: the replay keeps their list item.
        view.data.insert("list".into(), serde_json::json!([1]));
        view.data.insert("gone".into(), Value::Bool(true));
        for op in &ops {
            view.apply(op).unwrap();
        }
        assert_eq!(
            Value::Object(view.data.clone()),
            serde_json::json!({"a": 1, "list": [1, 7]})
        );
        assert_eq!(view.user.as_deref(), Some("ann"));
        view.apply(&Op::Clear).unwrap();
        assert!(view.data.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_bounded() {
        let started = tokio::time::Instant::now();
        for attempt in 0..100 {
            backoff(attempt).await;
        }
        // 100 pauses of at most 12.8 ms each.
        assert!(started.elapsed() <= Duration::from_millis(1_280));
    }
}
