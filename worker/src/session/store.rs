//! The sessions' Redis side: one hash per session and the Lua scripts that read and change it
//! atomically.
//!
//! `{prefix}session:{tag}:{id}` holds `v` (version, +1 per save), `data` (JSON object), `user`,
//! `created`, `deadline` (absolute timeout, ms) and `seen` (last idle-TTL refresh, ms). Its TTL is
//! the idle timeout, capped by the deadline. After a regeneration the old key holds only
//! `moved_to` with a short TTL (the grace period). Scripts take time from Redis (`TIME`), so
//! workers with skewed clocks agree. Every key a script touches shares the session's hash tag
//! (see `herd_shared::keys`), so the scripts run on a Redis Cluster as on one Redis; the user
//! index lives in the user's slot and is kept in step around the scripts.
//!
//! Every call is bounded by the pool's timeouts plus an outer timeout, so a dead Redis is a quick
//! [`SessionError::Unavailable`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_shared::keys::Keys;
use herd_shared::resp;
use herd_shared::script::Script;

use super::SessionError;
use crate::config::SessionConfig;
use crate::metrics::{SessionOp, WorkerMetrics};
use crate::redis_link::RedisLink;

/// How long a write lease lasts if its holder never saves (crashed, stalled).
const LEASE: Duration = Duration::from_millis(300);

/// How long an id stays in a user's index before the index may drop it as dead: longer than
/// any save takes (a login adds the id first, then writes the session).
const INDEX_SETTLE: Duration = Duration::from_secs(60);

/// Shared by the scripts that follow an alias. ARGV[2] session key prefix, ARGV[3] hash-tag
/// length, ARGV[4] legacy key prefix ('' on a cluster: nothing to adopt there).
/// `skey` builds a session key like `Keys::session`; `adopt` moves a session stored under the
/// old layout (no hash tag) to its new key on first access (one Redis only, same server).
macro_rules! prelude {
    () => {
        r#"
local sprefix, taglen, legacy = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local function skey(id) return sprefix .. '{' .. string.sub(id, 1, taglen) .. '}:' .. id end
local function adopt(key, id)
  if legacy ~= '' and redis.call('EXISTS', key) == 0 and redis.call('EXISTS', legacy .. id) == 1 then
    redis.call('RENAME', legacy .. id, key)
    return true
  end
  return false
end
"#
    };
}

/// Reads a session, following a regeneration alias, enforcing the absolute timeout and
/// refreshing the idle TTL at most once per touch interval.
/// KEYS[1] session key. ARGV: id, (prelude: 2-4), touch ms, idle ms.
/// Returns {} when there is no live session, else {id, v, data, user, created}.
///
/// A live session costs one `HMGET` besides `TIME`: the alias field is read with the rest, and
/// a session of the old layout is looked for only when the key holds nothing.
const LOAD: &str = concat!(
    prelude!(),
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fields(key)
  return redis.call('HMGET', key, 'v', 'data', 'user', 'created', 'deadline', 'seen', 'moved_to')
end
local function read(key, id)
  local f = fields(key)
  if not f[1] and not f[7] and adopt(key, id) then f = fields(key) end
  return f
end
local key, id = KEYS[1], ARGV[1]
local f = read(key, id)
if f[7] then
  id = f[7]
  key = skey(id)
  f = read(key, id)
end
if not f[1] then return {} end
local deadline = tonumber(f[5])
if now >= deadline then
  redis.call('DEL', key)
  return {}
end
if now - tonumber(f[6]) >= tonumber(ARGV[5]) then
  redis.call('HSET', key, 'seen', now)
  redis.call('PEXPIRE', key, math.min(tonumber(ARGV[6]), deadline - now))
end
return {id, f[1], f[2], f[3] or '', f[4]}
"#
);

/// Compare-and-set save, optionally moving the session to a new id (regeneration).
/// KEYS[1] current key, KEYS[2] target key (= KEYS[1] unless regenerating; a regenerated id
/// keeps the hash tag, so both are in one slot), KEYS[3] the current key's write lease.
/// ARGV: expected version (0 = create), data, user ('' = none), idle ms, absolute ms, grace ms,
///       current id, target id, writer token, '1' to claim the lease on a conflict, lease ms.
/// Returns {'1', version, previous user} saved; {'-1'} conflict (moved or id taken) or
/// {'-1', id, v, data, user} (changed: the fresh session); {'-2'} gone; {'-3'} another writer
/// holds the lease. All strings.
///
/// The lease makes the retry fair: a writer that keeps losing claims it, other writers are
/// refused until it has saved (or the lease expired), so no writer starves. The user index is
/// not touched here (it lives in the user's slot): the store keeps it in step around the save.
const SAVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expected = tonumber(ARGV[1])
local cur, target = KEYS[1], KEYS[2]
local idle, absolute, grace = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cur_id, target_id = ARGV[7], ARGV[8]
local created, deadline, old_user = now, now + absolute, ''
if expected == 0 then
  if redis.call('EXISTS', target) == 1 then return {'-1'} end
else
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[9] then return {'-3'} end
  local f = redis.call('HMGET', cur, 'v', 'created', 'deadline', 'user', 'moved_to', 'data')
  if f[5] then return {'-1'} end
  if not f[1] then return {'-2'} end
  if tonumber(f[1]) ~= expected then
    if ARGV[10] == '1' then redis.call('SET', KEYS[3], ARGV[9], 'PX', ARGV[11]) end
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
  old_user = f[4] or ''
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
local user = ARGV[3]
-- The user in the same HSET when there is one: a call fewer for a logged-in session's save.
if user == '' then
  redis.call('HSET', target, 'v', v, 'data', ARGV[2], 'created', created, 'deadline', deadline, 'seen', now)
  redis.call('HDEL', target, 'user')
else
  redis.call('HSET', target, 'v', v, 'data', ARGV[2], 'created', created, 'deadline', deadline, 'seen', now, 'user', user)
end
redis.call('PEXPIRE', target, math.min(idle, deadline - now))
return {'1', tostring(v), old_user}
"#;

/// Destroys a session (and the one an alias points to).
/// KEYS[1] session key. ARGV: id, (prelude: 2-4).
/// Returns {id, user} of the session deleted (user '' when unbound), {} when there was none.
const DESTROY: &str = concat!(
    prelude!(),
    r#"
local key, id = KEYS[1], ARGV[1]
adopt(key, id)
local moved = redis.call('HGET', key, 'moved_to')
if moved then
  redis.call('DEL', key)
  id = moved
  key = skey(moved)
  adopt(key, id)
end
local user = redis.call('HGET', key, 'user')
if redis.call('DEL', key) == 0 then return {} end
return {id, user or ''}
"#
);

/// Adds a session id to a user's index (a sorted set scored by the time it was added) before
/// the session is bound, and lists ids old enough to be checked for life.
/// KEYS[1] index. ARGV: id, absolute ms, settle ms. Returns up to 64 ids added before
/// `now - settle`.
const INDEX_ADD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0, 64)
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
    /// The user it was bound to as loaded (decides whether the user's index needs the id).
    pub(crate) bound: Option<&'a str>,
    /// Identifies this save across its retries (for the write lease).
    pub(crate) token: &'a str,
    /// Claim the write lease if this attempt conflicts.
    pub(crate) claim: bool,
}

/// Sessions in Redis. Cheap to clone (one reference count): the session layer's service, and
/// with it the store, is cloned several times per request by axum and tower (cloned field by
/// field, it was a dozen allocations per request, docs/performance.md section 45).
#[derive(Clone)]
pub struct SessionStore {
    inner: Arc<Store>,
}

/// What a [`SessionStore`] shares among its clones.
#[derive(Clone)]
struct Store {
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
    index_add: Script,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("prefix", &self.inner.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// A store reached through `link`, with keys under `keys`. `call_timeout` bounds each Redis
    /// call (use the Redis connect timeout plus the command timeout).
    pub fn new(link: RedisLink, keys: Keys, config: SessionConfig, call_timeout: Duration) -> Self {
        let store = Store {
            link,
            keys,
            config,
            call_timeout,
            scripts: Arc::new(Scripts {
                load: Script::new(LOAD),
                save: Script::new(SAVE),
                destroy: Script::new(DESTROY),
                index_add: Script::new(INDEX_ADD),
            }),
            locks: SaveLocks::default(),
            metrics: Arc::default(),
        };
        SessionStore {
            inner: Arc::new(store),
        }
    }

    /// The store, counting its operations in `metrics` (the worker's `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        Arc::make_mut(&mut self.inner).metrics = metrics;
        self
    }

    /// Where the store counts its operations.
    pub(crate) fn metrics(&self) -> &WorkerMetrics {
        &self.inner.metrics
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
        self.inner
            .metrics
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
        &self.inner.config
    }

    /// The arguments every alias-following script starts with after the id (see `prelude!`).
    fn prelude_args(&self, invocation: &mut herd_shared::script::Invocation<'_>) {
        // Sessions of the old layout exist only on one Redis (cluster support came with the
        // new one), and only there can a script reach a key outside its slot to adopt it.
        let legacy = if self.inner.link.is_cluster() {
            String::new()
        } else {
            self.inner.keys.legacy_session("")
        };
        invocation
            .arg(self.inner.keys.session_prefix())
            .arg(herd_shared::keys::SESSION_TAG_LEN)
            .arg(legacy);
    }

    /// Runs one script invocation within the time bound.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &herd_shared::script::Invocation<'_>,
    ) -> Result<T, SessionError> {
        self.inner
            .link
            .invoke(invocation, self.inner.call_timeout)
            .await
            .map_err(SessionError::Unavailable)
    }

    /// Waits for this process's save lock of session `id`.
    pub(crate) async fn lock(&self, id: &str) -> SaveGuard {
        self.inner.locks.lock(id).await
    }

    /// Sessions with a save lock in use (for tests).
    #[cfg(test)]
    fn locked(&self) -> usize {
        self.inner.locks.0.lock().expect("save locks").len()
    }

    /// The live session stored under `id`, if any (touching its idle TTL when due).
    pub(crate) async fn load(&self, id: &str) -> Result<Option<Record>, SessionError> {
        self.measured(SessionOp::Load, self.load_from_redis(id))
            .await
    }

    async fn load_from_redis(&self, id: &str) -> Result<Option<Record>, SessionError> {
        // On a Redis Cluster `TIME` could go to another node than the session: the script
        // reads both on the session's node.
        if !self.inner.link.is_cluster()
            && let Some(record) = self.load_plainly(id).await?
        {
            return Ok(Some(record));
        }
        let mut invocation = self.inner.scripts.load.key(self.inner.keys.session(id));
        invocation.arg(id);
        self.prelude_args(&mut invocation);
        invocation
            .arg(millis(self.inner.config.touch_interval))
            .arg(millis(self.inner.config.idle_timeout));
        let fields: Vec<String> = self.call(&invocation).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let Ok([id, version, data, user, _created]) = <[String; 5]>::try_from(fields) else {
            return Err(SessionError::Corrupt("load reply".into()));
        };
        record(&id, &version, &data, &user).map(Some)
    }

    /// The common load without the script: Redis's clock and the session's fields in one round
    /// trip of two plain commands, `TIME` and `HMGET`, which cost Redis about a seventh of the
    /// load script (docs/performance.md, section 48). The session when it is live, no alias,
    /// and its idle TTL needs no touch yet: what the script would return, changing nothing.
    /// `None` when the script must decide (no such key, an alias, the old key layout, the
    /// absolute timeout passed, a touch due, a field that does not parse).
    async fn load_plainly(&self, id: &str) -> Result<Option<Record>, SessionError> {
        // Packed here rather than built as a redis-rs pipeline: the `Cmd`s, their packing and
        // the generic conversion of the replies were a fifth of a worker's instructions per
        // session request (docs/performance.md, section 51).
        let key = self.inner.keys.session(id);
        // The key's own head (`$N\r\n`) and end take at most 16 bytes beside it.
        let room = PLAIN_LOAD.len() + key.len() + 16 + PLAIN_LOAD_FIELDS.len();
        let mut packed = Vec::with_capacity(room);
        packed.extend_from_slice(PLAIN_LOAD);
        resp::pack_argument(&mut packed, key.as_bytes());
        packed.extend_from_slice(PLAIN_LOAD_FIELDS);
        // Read where the replies came, once (docs/performance.md, section 57).
        let read = |replies: &mut resp::Cursor<'_>| {
            let (now, fields) = clock_and_fields(replies)?;
            Some(self.live_record(id, now, fields))
        };
        match (self.inner.link)
            .exchange(&packed, 2, read, self.inner.call_timeout)
            .await
            .map_err(SessionError::Unavailable)?
        {
            Some(live) => live,
            None => Err(SessionError::Unavailable(
                "unexpected reply to TIME and HMGET".into(),
            )),
        }
    }

    /// What the plain load makes of Redis's clock (`now`, in milliseconds) and the session's
    /// `fields` (`None`: `HMGET` answered another number of them): the record when the session
    /// is live, no alias and needs no touch yet; `Ok(None)` when the script must decide.
    fn live_record(
        &self,
        id: &str,
        now: u64,
        fields: Option<PlainFields<'_>>,
    ) -> Result<Option<Record>, SessionError> {
        let Some(
            [
                Some(version),
                Some(data),
                user,
                _created,
                Some(deadline),
                Some(seen),
                None,
            ],
        ) = fields
        else {
            return Ok(None);
        };
        let (Ok(deadline), Ok(seen)) = (deadline.parse::<u64>(), seen.parse::<u64>()) else {
            return Ok(None);
        };
        if now >= deadline || now.saturating_sub(seen) >= millis(self.inner.config.touch_interval) {
            return Ok(None);
        }
        record(id, version, data, user.unwrap_or("")).map(Some)
    }

    /// One compare-and-set attempt, keeping the user's index in step: an id is added to its
    /// user's index *before* the session is bound to the user (so every bound session is
    /// indexed, even if this process dies half-way), and removed from the previous user's index
    /// after (a stale id there is harmless: it names a dead or unbound session).
    pub(crate) async fn save(&self, write: &Write<'_>) -> Result<SaveOutcome, SessionError> {
        self.measured(SessionOp::Save, self.save_to_redis(write))
            .await
    }

    async fn save_to_redis(&self, write: &Write<'_>) -> Result<SaveOutcome, SessionError> {
        let (current_id, expected) = write.current.unwrap_or((write.target, 0));
        let moves = current_id != write.target;
        let indexed = match write.user {
            Some(user) if expected == 0 || moves || write.bound != Some(user) => {
                Some(self.index_add(user, write.target).await?)
            }
            _ => None,
        };
        let mut invocation = self
            .inner
            .scripts
            .save
            .key(self.inner.keys.session(current_id));
        invocation
            .key(self.inner.keys.session(write.target))
            .key(self.inner.keys.session_lease(current_id))
            .arg(expected)
            .arg(write.data)
            .arg(write.user.unwrap_or(""))
            .arg(millis(self.inner.config.idle_timeout))
            .arg(millis(self.inner.config.absolute_timeout))
            .arg(millis(self.inner.config.regenerate_grace))
            .arg(current_id)
            .arg(write.target)
            .arg(write.token)
            .arg(if write.claim { "1" } else { "0" })
            .arg(millis(LEASE));
        let reply: Vec<String> = self.call(&invocation).await?;
        let corrupt = || SessionError::Corrupt(format!("save reply of {} fields", reply.len()));
        let outcome = match reply
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["1", version, previous] => {
                let version = version.parse().map_err(|_| corrupt())?;
                let previous = Some(*previous).filter(|user| !user.is_empty());
                self.after_save(write, current_id, previous, indexed).await;
                SaveOutcome::Saved(version)
            }
            ["-1"] => SaveOutcome::Conflict(None),
            ["-1", id, version, data, user] => {
                SaveOutcome::Conflict(Some(record(id, version, data, user)?))
            }
            ["-2"] => SaveOutcome::Gone,
            ["-3"] => SaveOutcome::Busy,
            _ => return Err(corrupt()),
        };
        Ok(outcome)
    }

    /// Index upkeep after a save: the previous user's index forgets the id, a binding that
    /// changed under us (the script saw another user than we loaded) is indexed now, and dead
    /// ids that settled are dropped. Best effort: a failure leaves only stale ids behind.
    async fn after_save(
        &self,
        write: &Write<'_>,
        current_id: &str,
        previous: Option<&str>,
        indexed: Option<Vec<String>>,
    ) {
        let moves = current_id != write.target;
        if let Some(previous) = previous
            && (moves || write.user != Some(previous))
        {
            let _ = self
                .command::<i64>(
                    redis::cmd("ZREM")
                        .arg(self.inner.keys.user_sessions(previous))
                        .arg(current_id),
                )
                .await;
        }
        let settled = match (indexed, write.user) {
            (Some(settled), _) => settled,
            (None, Some(user)) if previous != Some(user) => {
                self.index_add(user, write.target).await.unwrap_or_default()
            }
            _ => return,
        };
        let Some(user) = write.user else { return };
        for id in settled {
            let alive: Result<bool, _> = self
                .command(redis::cmd("EXISTS").arg(self.inner.keys.session(&id)))
                .await;
            if matches!(alive, Ok(false)) {
                let _ = self
                    .command::<i64>(
                        redis::cmd("ZREM")
                            .arg(self.inner.keys.user_sessions(user))
                            .arg(&id),
                    )
                    .await;
            }
        }
    }

    /// Adds `id` to `user`'s index; returns ids that settled long enough to be checked.
    async fn index_add(&self, user: &str, id: &str) -> Result<Vec<String>, SessionError> {
        let mut invocation = self
            .inner
            .scripts
            .index_add
            .key(self.inner.keys.user_sessions(user));
        invocation
            .arg(id)
            .arg(millis(self.inner.config.absolute_timeout))
            .arg(millis(INDEX_SETTLE));
        self.call(&invocation).await
    }

    /// One plain command within the time bound.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, SessionError> {
        let work = async {
            let mut connection = self
                .inner
                .link
                .pool()
                .get()
                .await
                .map_err(|e| SessionError::Unavailable(e.to_string()))?;
            cmd.query_async::<T>(&mut connection)
                .await
                .map_err(|e| SessionError::Unavailable(e.to_string()))
        };
        tokio::time::timeout(self.inner.call_timeout, work)
            .await
            .unwrap_or_else(|_| Err(SessionError::Unavailable("redis call timed out".into())))
    }

    /// Deletes the session stored under `id` (and the session an alias at `id` points to), and
    /// its id from its user's index.
    pub(crate) async fn destroy(&self, id: &str) -> Result<(), SessionError> {
        self.measured(SessionOp::Destroy, self.destroy_in_redis(id))
            .await
    }

    async fn destroy_in_redis(&self, id: &str) -> Result<(), SessionError> {
        if let Some((id, user)) = self.destroy_one(id).await? {
            self.command::<i64>(
                redis::cmd("ZREM")
                    .arg(self.inner.keys.user_sessions(&user))
                    .arg(&id),
            )
            .await?;
        }
        Ok(())
    }

    /// Runs DESTROY; the id and user of the session it deleted, if it was bound.
    async fn destroy_one(&self, id: &str) -> Result<Option<(String, String)>, SessionError> {
        let mut invocation = self.inner.scripts.destroy.key(self.inner.keys.session(id));
        invocation.arg(id);
        self.prelude_args(&mut invocation);
        let reply: Vec<String> = self.call(&invocation).await?;
        Ok(match <[String; 2]>::try_from(reply) {
            Ok([id, user]) if !user.is_empty() => Some((id, user)),
            _ => None,
        })
    }

    /// Log out everywhere: deletes every session of `user`; returns how many ids its index
    /// held.
    ///
    /// The index and the sessions live in different slots on a cluster, so this is not one
    /// script: it reads the index, destroys each session (following a regeneration alias, in
    /// the session's own slot), then removes exactly those ids from the index. Every session
    /// bound to `user` before this call began is in the index (ids are indexed before they are
    /// bound) and ends; a session cannot come back (a later save of it finds it gone). A login
    /// that runs concurrently with this call may survive it, as if it came just after.
    pub async fn destroy_user(&self, user: &str) -> Result<usize, SessionError> {
        self.measured(SessionOp::Destroy, self.destroy_user_in_redis(user))
            .await
    }

    async fn destroy_user_in_redis(&self, user: &str) -> Result<usize, SessionError> {
        let index = self.inner.keys.user_sessions(user);
        let mut ids: Vec<String> = self
            .command(redis::cmd("ZRANGE").arg(&index).arg(0).arg(-1))
            .await?;
        let legacy =
            (!self.inner.link.is_cluster()).then(|| self.inner.keys.legacy_user_sessions(user));
        if let Some(legacy) = &legacy {
            // The set of the layout before hash tags, on one Redis.
            let old: Vec<String> = self.command(redis::cmd("SMEMBERS").arg(legacy)).await?;
            ids.extend(old);
        }
        ids.sort();
        ids.dedup();
        for id in &ids {
            self.destroy_one(id).await?;
        }
        if !ids.is_empty() {
            self.command::<i64>(redis::cmd("ZREM").arg(&index).arg(&ids))
                .await?;
        }
        if let Some(legacy) = &legacy {
            self.command::<i64>(redis::cmd("DEL").arg(legacy)).await?;
        }
        Ok(ids.len())
    }

    /// Whether Redis answers a PING within the time bound.
    pub async fn ping(&self) -> bool {
        let work = async {
            let mut connection = self.inner.link.pool().get().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(self.inner.call_timeout, work).await,
            Ok(Some(_))
        )
    }
}

/// `TIME`, then `HMGET` (nine arguments) up to its key, packed: what
/// [`SessionStore::load_plainly`] sends before the session's key (`resp::pack_argument`).
const PLAIN_LOAD: &[u8] = b"*1\r\n$4\r\nTIME\r\n*9\r\n$5\r\nHMGET\r\n";

/// The fields [`SessionStore::load_plainly`] reads, packed as `HMGET`'s arguments after the key:
/// `v`, `data`, `user`, `created`, `deadline`, `seen`, `moved_to`.
const PLAIN_LOAD_FIELDS: &[u8] = b"$1\r\nv\r\n$4\r\ndata\r\n$4\r\nuser\r\n$7\r\ncreated\r\n\
    $8\r\ndeadline\r\n$4\r\nseen\r\n$8\r\nmoved_to\r\n";

/// How many fields the plain load asks for ([`PLAIN_LOAD_FIELDS`]).
const PLAIN_LOAD_FIELD_COUNT: usize = 7;

/// The fields of the plain load, as [`clock_and_fields`] reads them (`None`: not in the hash).
type PlainFields<'r> = [Option<&'r str>; PLAIN_LOAD_FIELD_COUNT];

/// The replies to `TIME` and `HMGET` of [`SessionStore::load_plainly`], read in place: Redis's
/// clock in milliseconds and the fields asked for (`None` when `HMGET` answered another number
/// of them: the script decides then, as it always did). `None` when they are not what those
/// commands answer.
fn clock_and_fields<'r>(replies: &mut resp::Cursor<'r>) -> Option<(u64, Option<PlainFields<'r>>)> {
    let number = |digits: &[u8]| std::str::from_utf8(digits).ok()?.parse::<u64>().ok();
    if replies.array()? != Some(2) {
        return None;
    }
    let seconds = number(replies.bulk()??)?;
    let micros = number(replies.bulk()??)?;
    let now = seconds.checked_mul(1000)?.checked_add(micros / 1000)?;
    let count = replies.array()??;
    let mut fields = [None; PLAIN_LOAD_FIELD_COUNT];
    for n in 0..count {
        let field = match replies.bulk()? {
            Some(bytes) => Some(std::str::from_utf8(bytes).ok()?),
            None => None,
        };
        if let Some(slot) = fields.get_mut(n) {
            *slot = field;
        }
    }
    let fields = (count == PLAIN_LOAD_FIELD_COUNT).then_some(fields);
    Some((now, fields))
}

/// A record from the strings a script (or the plain load) returned.
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

impl Outcome for () {
    fn outcome(&self) -> &'static str {
        "done"
    }
}

impl Outcome for usize {
    fn outcome(&self) -> &'static str {
        "done"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_load_is_packed_as_redis_rs_packs_its_commands() {
        let key = "herd:session:{ab}:abc";
        let mut ours = PLAIN_LOAD.to_vec();
        resp::pack_argument(&mut ours, key.as_bytes());
        ours.extend_from_slice(PLAIN_LOAD_FIELDS);
        let fields = [
            "v", "data", "user", "created", "deadline", "seen", "moved_to",
        ];
        let mut theirs = redis::pipe();
        theirs.cmd("TIME").cmd("HMGET").arg(key).arg(&fields);
        assert_eq!(ours, theirs.get_packed_pipeline());
        assert_eq!(fields.len(), PLAIN_LOAD_FIELD_COUNT, "the count read back");
    }

    #[test]
    fn the_plain_loads_replies_are_read_or_refused() {
        use redis::Value::{self, Array, BulkString, Int, Nil};
        /// What the plain load makes of `replies`, which must be all of them.
        fn clock_and_fields(replies: &[u8]) -> Option<(u64, Option<PlainFields<'_>>)> {
            match resp::read_replies(replies, 2, super::clock_and_fields) {
                Ok(Some((end, Ok(read)))) if end == replies.len() => read,
                _ => None,
            }
        }
        /// `replies` as Redis sends them (RESP2).
        fn sent(replies: &[Value]) -> Vec<u8> {
            fn put(out: &mut Vec<u8>, value: &Value) {
                match value {
                    Array(elements) => {
                        out.extend_from_slice(format!("*{}\r\n", elements.len()).as_bytes());
                        elements.iter().for_each(|element| put(out, element));
                    }
                    BulkString(bytes) => resp::pack_argument(out, bytes),
                    Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
                    Nil => out.extend_from_slice(b"$-1\r\n"),
                    other => unreachable!("{other:?}"),
                }
            }
            let mut out = Vec::new();
            replies.iter().for_each(|reply| put(&mut out, reply));
            out
        }
        let bulk = |text: &str| BulkString(text.as_bytes().to_vec());
        let clock = Array(vec![bulk("1765000000"), bulk("123456")]);
        let mut fields = vec![bulk("3"), Nil, bulk("u")];
        fields.extend((0..4).map(|_| Nil));
        let fields = Array(fields);
        let good = sent(&[clock.clone(), fields.clone()]);
        assert_eq!(
            clock_and_fields(&good),
            Some((
                1_765_000_000_123,
                Some([Some("3"), None, Some("u"), None, None, None, None])
            ))
        );
        // Another number of fields: read, and left to the script (as before replies were read
        // in place).
        assert_eq!(
            clock_and_fields(&sent(&[clock.clone(), Array(vec![bulk("3"), Nil])])),
            Some((1_765_000_000_123, None))
        );
        let refused = [
            vec![clock.clone()],
            vec![fields.clone(), clock.clone()],
            vec![Array(vec![bulk("1"), bulk("x")]), fields.clone()],
            vec![
                Array(vec![bulk(&u64::MAX.to_string()), bulk("0")]),
                fields.clone(),
            ],
            vec![clock.clone(), Array(vec![Int(3)])],
            vec![
                clock.clone(),
                Array((0..7).map(|_| BulkString(vec![0xff])).collect()),
            ],
            vec![clock.clone(), fields.clone(), Nil],
            vec![Nil],
        ];
        for replies in refused {
            assert_eq!(clock_and_fields(&sent(&replies)), None, "{replies:?}");
        }
        for cut in 0..good.len() {
            assert_eq!(clock_and_fields(&good[..cut]), None, "cut at {cut}");
        }
    }

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
