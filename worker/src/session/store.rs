//! The sessions' Redis side: one hash per session and the Lua scripts that read and change it
//! atomically.
//!
//! `{prefix}session:{id}` holds `v` (version, +1 per save), `data` (JSON object), `user`,
//! `created`, `deadline` (absolute timeout, ms) and `seen` (last idle-TTL refresh, ms). Its TTL is
//! the idle timeout, capped by the deadline. After a regeneration the old key holds only
//! `moved_to` with a short TTL (the grace period). Scripts take time from Redis (`TIME`), so
//! workers with skewed clocks agree. They build the alias and user-index keys from the prefix
//! passed in, which is fine on one Redis (or Sentinel) but not on Redis Cluster.
//!
//! Every call is bounded by the pool's timeouts plus an outer timeout, so a dead Redis is a quick
//! [`SessionError::Unavailable`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_shared::keys::Keys;
use redis::Script;

use super::SessionError;
use crate::config::SessionConfig;
use crate::metrics::{SessionOp, WorkerMetrics};
use crate::redis_link::RedisLink;

/// How long a write lease lasts if its holder never saves (crashed, stalled).
const LEASE: Duration = Duration::from_millis(300);

/// Reads a session, following a regeneration alias, enforcing the absolute timeout and
/// refreshing the idle TTL at most once per touch interval.
/// KEYS[1] session key. ARGV: id, session key prefix, touch ms, idle ms.
/// Returns {} when there is no live session, else {id, v, data, user, created}.
const LOAD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, id = KEYS[1], ARGV[1]
local moved = redis.call('HGET', key, 'moved_to')
if moved then
  id = moved
  key = ARGV[2] .. moved
end
local f = redis.call('HMGET', key, 'v', 'data', 'user', 'created', 'deadline', 'seen')
if not f[1] then return {} end
local deadline = tonumber(f[5])
if now >= deadline then
  redis.call('DEL', key)
  return {}
end
if now - tonumber(f[6]) >= tonumber(ARGV[3]) then
  redis.call('HSET', key, 'seen', now)
  redis.call('PEXPIRE', key, math.min(tonumber(ARGV[4]), deadline - now))
end
return {id, f[1], f[2], f[3] or '', f[4]}
"#;

/// Compare-and-set save, optionally moving the session to a new id (regeneration).
/// KEYS[1] current key, KEYS[2] target key (= KEYS[1] unless regenerating), KEYS[3] the current
/// key's write lease.
/// ARGV: expected version (0 = create), data, user ('' = none), idle ms, absolute ms, grace ms,
///       current id, target id, session key prefix, user index key prefix, writer token,
///       '1' to claim the lease on a conflict, lease ms.
/// Returns {'1', version} saved; {'-1'} conflict (moved or id taken) or {'-1', id, v, data, user}
/// (changed: the fresh session); {'-2'} gone; {'-3'} another writer holds the lease. All strings.
///
/// The lease makes the retry fair: a writer that keeps losing claims it, other writers are
/// refused until it has saved (or the lease expired), so no writer starves.
const SAVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expected = tonumber(ARGV[1])
local cur, target = KEYS[1], KEYS[2]
local idle, absolute, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cur_id, target_id = ARGV[7], ARGV[8]
local sprefix, uprefix = ARGV[9], ARGV[10]
local created, deadline, old_user = now, now + absolute, false
if expected == 0 then
  if redis.call('EXISTS', target) == 1 then return {'-1'} end
else
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[11] then return {'-3'} end
  local f = redis.call('HMGET', cur, 'v', 'created', 'deadline', 'user', 'moved_to', 'data')
  if f[5] then return {'-1'} end
  if not f[1] then return {'-2'} end
  if tonumber(f[1]) ~= expected then
    if ARGV[12] == '1' then redis.call('SET', KEYS[3], ARGV[11], 'PX', ARGV[13]) end
    -- Hand back the fresh session, saving the caller a reload before it retries.
    return {'-1', cur_id, f[1], f[6], f[4] or ''}
  end
  if holder then redis.call('DEL', KEYS[3]) end
  deadline = tonumber(f[3])
  if now >= deadline then
    redis.call('DEL', cur)
    return {'-2'}
  end
  created = tonumber(f[2])
  old_user = f[4]
  if cur ~= target then
    if redis.call('EXISTS', target) == 1 then return {'-1'} end
    -- A regenerated id starts a new absolute lifetime.
    created, deadline = now, now + absolute
    redis.call('DEL', cur)
    if grace > 0 then
      redis.call('HSET', cur, 'moved_to', target_id)
      redis.call('PEXPIRE', cur, grace)
    end
  end
end
local v = expected + 1
redis.call('HSET', target, 'v', v, 'data', ARGV[2], 'created', created, 'deadline', deadline, 'seen', now)
local user = ARGV[3]
if user == '' then
  redis.call('HDEL', target, 'user')
else
  redis.call('HSET', target, 'user', user)
end
redis.call('PEXPIRE', target, math.min(idle, deadline - now))
if old_user and (old_user ~= user or cur ~= target) then
  redis.call('SREM', uprefix .. old_user, cur_id)
end
if user ~= '' then
  local index = uprefix .. user
  -- Clean the index of ids that died (expired or destroyed) while adding this one.
  local members
  if redis.call('SCARD', index) <= 64 then
    members = redis.call('SMEMBERS', index)
  else
    members = redis.call('SRANDMEMBER', index, 64)
  end
  for _, m in ipairs(members) do
    if redis.call('EXISTS', sprefix .. m) == 0 then redis.call('SREM', index, m) end
  end
  redis.call('SADD', index, target_id)
  if redis.call('PTTL', index) < absolute then redis.call('PEXPIRE', index, absolute) end
end
return {'1', tostring(v)}
"#;

/// Destroys a session (and the one an alias points to), removing it from its user's index.
/// KEYS[1] session key. ARGV: id, session key prefix, user index key prefix.
const DESTROY: &str = r#"
local key, id = KEYS[1], ARGV[1]
local moved = redis.call('HGET', key, 'moved_to')
if moved then
  redis.call('DEL', key)
  id = moved
  key = ARGV[2] .. moved
end
local user = redis.call('HGET', key, 'user')
redis.call('DEL', key)
if user then redis.call('SREM', ARGV[3] .. user, id) end
return 1
"#;

/// Destroys every session of a user. KEYS[1] user index key. ARGV: session key prefix.
const DESTROY_USER: &str = r#"
local ids = redis.call('SMEMBERS', KEYS[1])
for _, id in ipairs(ids) do redis.call('DEL', ARGV[1] .. id) end
redis.call('DEL', KEYS[1])
return #ids
"#;

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    /// The id it is stored under (differs from the asked one after following an alias).
    pub(crate) id: String,
    /// Version for compare-and-set.
    pub(crate) version: u64,
    /// The data object.
    pub(crate) data: serde_json::Map<String, serde_json::Value>,
    /// The user it is bound to.
    pub(crate) user: Option<String>,
}

/// What one compare-and-set attempt did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SaveOutcome {
    /// Written; the new version.
    Saved(u64),
    /// Someone else changed (or moved) it first, or the new id is taken: retry on the fresh
    /// session (included when the script could read it, else reload).
    Conflict(Option<Record>),
    /// The session no longer exists (logged out, expired): never resurrect it.
    Gone,
    /// Another writer holds the session's write lease: pause, then retry unchanged.
    Busy,
}

/// One save attempt.
#[derive(Debug)]
pub(crate) struct Write<'a> {
    /// The id the session was loaded under (None: a new session).
    pub(crate) current: Option<(&'a str, u64)>,
    /// The id to store it under (a new one when new or regenerating).
    pub(crate) target: &'a str,
    /// Serialized data object.
    pub(crate) data: &'a str,
    /// Bound user, if any.
    pub(crate) user: Option<&'a str>,
    /// Identifies this save across its retries (for the write lease).
    pub(crate) token: &'a str,
    /// Claim the write lease if this attempt conflicts.
    pub(crate) claim: bool,
}

/// Sessions in Redis.
#[derive(Clone)]
pub struct SessionStore {
    link: RedisLink,
    keys: Keys,
    config: SessionConfig,
    /// Outer bound on one Redis round trip, on top of the pool's own timeouts.
    call_timeout: Duration,
    scripts: Arc<Scripts>,
    locks: SaveLocks,
    metrics: Arc<WorkerMetrics>,
}

/// Per-session locks inside this process, held while saving: concurrent requests of one session
/// on this worker queue up instead of conflicting in Redis, so the compare-and-set only contends
/// with other workers (a handful) and its bounded retry suffices.
#[derive(Clone, Default)]
struct SaveLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>);

/// Holds one session's save lock (a one-permit semaphore); forgets the lock when nobody else
/// waits for it — also when its own wait is cancelled (the request was dropped).
pub(crate) struct SaveGuard {
    locks: SaveLocks,
    id: String,
    lock: Option<Arc<tokio::sync::Semaphore>>,
    /// Whether the permit is held (false while waiting).
    held: bool,
}

impl SaveLocks {
    async fn lock(&self, id: &str) -> SaveGuard {
        let lock = self
            .0
            .lock()
            .expect("save locks")
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(1)))
            .clone();
        let mut guard = SaveGuard {
            locks: self.clone(),
            id: id.to_string(),
            lock: Some(lock),
            held: false,
        };
        // Waits through a borrow: if this future is dropped meanwhile, the guard's drop (which
        // runs after the wait's) still forgets the lock.
        let semaphore = guard.lock.as_ref().expect("set above");
        semaphore.acquire().await.expect("never closed").forget();
        guard.held = true;
        guard
    }
}

impl Drop for SaveGuard {
    fn drop(&mut self) {
        let mut map = self.locks.0.lock().expect("save locks");
        let lock = self.lock.take();
        if let Some(lock) = &lock
            && self.held
        {
            lock.add_permits(1);
        }
        drop(lock);
        // Only the map holds it now: nobody waits, so forget it (keeps the map small).
        if map
            .get(&self.id)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            map.remove(&self.id);
        }
    }
}

struct Scripts {
    load: Script,
    save: Script,
    destroy: Script,
    destroy_user: Script,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// A store reached through `link`, with keys under `keys`. `call_timeout` bounds each Redis
    /// call (use the Redis connect timeout plus the command timeout).
    pub fn new(link: RedisLink, keys: Keys, config: SessionConfig, call_timeout: Duration) -> Self {
        SessionStore {
            link,
            keys,
            config,
            call_timeout,
            scripts: Arc::new(Scripts {
                load: Script::new(LOAD),
                save: Script::new(SAVE),
                destroy: Script::new(DESTROY),
                destroy_user: Script::new(DESTROY_USER),
            }),
            locks: SaveLocks::default(),
            metrics: Arc::default(),
        }
    }

    /// The store, counting its operations in `metrics` (the worker's `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where the store counts its operations.
    pub(crate) fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// Runs one Redis operation: timed and counted in the metrics, and inside a client span
    /// (with the outcome) when tracing is on.
    async fn measured<T, F>(&self, op: SessionOp, work: F) -> Result<T, SessionError>
    where
        F: std::future::Future<Output = Result<T, SessionError>>,
        T: Outcome,
    {
        let span = herd_shared::telemetry::in_traced_request().then(|| {
            tracing::info_span!(
                target: herd_shared::telemetry::TRACE_TARGET,
                "redis session",
                otel.name = op.span_name(),
                otel.kind = "client",
                db.system = "redis",
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        });
        let started = tokio::time::Instant::now();
        let result = herd_shared::telemetry::in_span(span.clone(), work).await;
        self.metrics
            .session_op(op, result.is_ok(), started.elapsed());
        if let Some(span) = span {
            match &result {
                Ok(value) => span.record("outcome", value.outcome()),
                Err(error) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("outcome", tracing::field::display(error))
                }
            };
        }
        result
    }

    /// The session settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    fn session_prefix(&self) -> String {
        self.keys.session("")
    }

    fn user_prefix(&self) -> String {
        self.keys.user_sessions("")
    }

    /// Runs one script invocation within the time bound.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, SessionError> {
        self.link
            .invoke(invocation, self.call_timeout)
            .await
            .map_err(SessionError::Unavailable)
    }

    /// Waits for this process's save lock of session `id`.
    pub(crate) async fn lock(&self, id: &str) -> SaveGuard {
        self.locks.lock(id).await
    }

    /// Sessions with a save lock in use (for tests).
    #[cfg(test)]
    fn locked(&self) -> usize {
        self.locks.0.lock().expect("save locks").len()
    }

    /// The live session stored under `id`, if any (touching its idle TTL when due).
    pub(crate) async fn load(&self, id: &str) -> Result<Option<Record>, SessionError> {
        self.measured(SessionOp::Load, self.load_from_redis(id))
            .await
    }

    async fn load_from_redis(&self, id: &str) -> Result<Option<Record>, SessionError> {
        let mut invocation = self.scripts.load.key(self.keys.session(id));
        invocation
            .arg(id)
            .arg(self.session_prefix())
            .arg(millis(self.config.touch_interval))
            .arg(millis(self.config.idle_timeout));
        let fields: Vec<String> = self.call(&invocation).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let Ok([id, version, data, user, _created]) = <[String; 5]>::try_from(fields) else {
            return Err(SessionError::Corrupt("load reply".into()));
        };
        record(&id, &version, &data, &user).map(Some)
    }

    /// One compare-and-set attempt.
    pub(crate) async fn save(&self, write: &Write<'_>) -> Result<SaveOutcome, SessionError> {
        self.measured(SessionOp::Save, self.save_to_redis(write))
            .await
    }

    async fn save_to_redis(&self, write: &Write<'_>) -> Result<SaveOutcome, SessionError> {
        let (current_id, expected) = write.current.unwrap_or((write.target, 0));
        let mut invocation = self.scripts.save.key(self.keys.session(current_id));
        invocation
            .key(self.keys.session(write.target))
            .arg(expected)
            .arg(write.data)
            .arg(write.user.unwrap_or(""))
            .arg(millis(self.config.idle_timeout))
            .arg(millis(self.config.absolute_timeout))
            .arg(millis(self.config.regenerate_grace))
            .arg(current_id)
            .arg(write.target)
            .key(format!("{}:lease", self.keys.session(current_id)))
            .arg(self.session_prefix())
            .arg(self.user_prefix())
            .arg(write.token)
            .arg(if write.claim { "1" } else { "0" })
            .arg(millis(LEASE));
        let reply: Vec<String> = self.call(&invocation).await?;
        let corrupt = || SessionError::Corrupt(format!("save reply of {} fields", reply.len()));
        match reply
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["1", version] => Ok(SaveOutcome::Saved(version.parse().map_err(|_| corrupt())?)),
            ["-1"] => Ok(SaveOutcome::Conflict(None)),
            ["-1", id, version, data, user] => Ok(SaveOutcome::Conflict(Some(record(
                id, version, data, user,
            )?))),
            ["-2"] => Ok(SaveOutcome::Gone),
            ["-3"] => Ok(SaveOutcome::Busy),
            _ => Err(corrupt()),
        }
    }

    /// Deletes the session stored under `id` (and the session an alias at `id` points to).
    pub(crate) async fn destroy(&self, id: &str) -> Result<(), SessionError> {
        let mut invocation = self.scripts.destroy.key(self.keys.session(id));
        invocation
            .arg(id)
            .arg(self.session_prefix())
            .arg(self.user_prefix());
        self.measured(SessionOp::Destroy, self.call::<i64>(&invocation))
            .await
            .map(drop)
    }

    /// Log out everywhere: deletes every session of `user`; returns how many there were.
    pub async fn destroy_user(&self, user: &str) -> Result<usize, SessionError> {
        let mut invocation = self.scripts.destroy_user.key(self.keys.user_sessions(user));
        invocation.arg(self.session_prefix());
        let count: i64 = self
            .measured(SessionOp::Destroy, self.call(&invocation))
            .await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Whether Redis answers a PING within the time bound.
    pub async fn ping(&self) -> bool {
        let work = async {
            let mut connection = self.link.pool().get().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(self.call_timeout, work).await,
            Ok(Some(_))
        )
    }
}

/// A record from the strings a script returned.
fn record(id: &str, version: &str, data: &str, user: &str) -> Result<Record, SessionError> {
    let version = version
        .parse()
        .map_err(|_| SessionError::Corrupt("version".into()))?;
    let data = match serde_json::from_str(data) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => return Err(SessionError::Corrupt("data".into())),
    };
    Ok(Record {
        id: id.to_string(),
        version,
        data,
        user: Some(user.to_string()).filter(|user| !user.is_empty()),
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What a span records as the outcome of a store operation.
trait Outcome {
    fn outcome(&self) -> &'static str;
}

impl Outcome for Option<Record> {
    fn outcome(&self) -> &'static str {
        if self.is_some() { "found" } else { "missing" }
    }
}

impl Outcome for SaveOutcome {
    fn outcome(&self) -> &'static str {
        match self {
            SaveOutcome::Saved(_) => "saved",
            SaveOutcome::Conflict(_) => "conflict",
            SaveOutcome::Gone => "gone",
            SaveOutcome::Busy => "busy",
        }
    }
}

impl Outcome for i64 {
    fn outcome(&self) -> &'static str {
        "done"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SessionStore {
        let config = herd_shared::redis::RedisConfig::default();
        SessionStore::new(
            RedisLink::new(&config).unwrap(),
            config.keys(),
            SessionConfig::default(),
            Duration::from_millis(100),
        )
    }

    #[tokio::test]
    async fn save_locks_serialize_one_session_and_are_forgotten() {
        let store = store();
        let first = store.lock("a").await;
        // Another session is independent.
        let other = store.lock("b").await;
        let waiting = tokio::spawn({
            let store = store.clone();
            async move {
                let _second = store.lock("a").await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the second save of `a` waits");
        drop(first);
        waiting.await.unwrap();
        drop(other);
        assert_eq!(store.locked(), 0);
    }

    #[tokio::test]
    async fn a_waiter_dropped_as_the_lock_frees_leaves_nothing_behind() {
        // A request whose client went away is dropped while its save waits for the lock.
        let store = store();
        let first = store.lock("a").await;
        let waiting = tokio::spawn({
            let store = store.clone();
            async move {
                let _second = store.lock("a").await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The lock passes to the waiter, which is dropped before it ever runs again.
        drop(first);
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        assert_eq!(store.locked(), 0, "no lock left behind for `a`");
        // And the session can still be locked.
        drop(store.lock("a").await);
        assert_eq!(store.locked(), 0);
    }
}
