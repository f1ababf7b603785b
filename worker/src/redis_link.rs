//! The worker's way to Redis: a connection pool that follows the master through Redis Sentinel
//! when `[sentinel]` is configured, or the cluster client when `redis.cluster` is.
//!
//! Without Sentinel it is just the pool for `redis.url` (or the cluster client, which follows
//! failovers and resharding itself). With Sentinel, a background task asks the
//! sentinels (`SENTINEL get-master-addr-by-name`) every `sentinel.poll`; when the master moves, a
//! new pool for the new address replaces the old one (in-flight calls finish on the old one, new
//! calls use the new one). `redis.url` still supplies the password and database; its host and port
//! are replaced by the master's.
//!
//! Why our own polling rather than the `redis` crate's Sentinel client (or deadpool-redis'
//! Sentinel pool): those ask the sentinels when a connection is *made*; pooled connections to the
//! old master stay in the pool, and a demoted master still answers them (and a PING), so
//! writes keep failing (READONLY) until each connection breaks. Swapping the whole pool when the
//! answer changes moves every new call at once, and the poll doubles as a health signal.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use herd_shared::redis::{RedisConfig, RedisPool};
use herd_shared::redis_line::{Line, LineError, Lines};
use herd_shared::resp::Cursor;
use herd_shared::script::Invocation;
use herd_shared::sentinel::{address_of, with_address};
use redis::{AsyncConnectionConfig, Value};
use tokio_util::sync::CancellationToken;

use crate::config::SentinelConfig;

/// First pause before asking the pool again for a connection Redis refused.
const RECONNECT_PAUSE_MIN: Duration = Duration::from_millis(10);
/// Longest pause between those attempts (the call's timeout bounds them all).
const RECONNECT_PAUSE_MAX: Duration = Duration::from_millis(100);

/// A shared, swappable Redis pool.
#[derive(Clone)]
pub struct RedisLink {
    pool: Arc<ArcSwap<RedisPool>>,
    /// `host:port` the pool connects to.
    address: Arc<ArcSwap<String>>,
    config: RedisConfig,
    /// The connection shared by packed calls ([`RedisLink::exchange`]), pipelined; `None` on a
    /// cluster, or when turned off ([`RedisLink::without_shared_line`]).
    lines: Arc<ArcSwapOption<Lines>>,
    /// Wakes [`RedisLink::follow`] before its next poll: a call met a replica (`READONLY`),
    /// so the master has most likely moved.
    ask_now: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("address", &**self.address.load())
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// A link to `config.url` (connections are made lazily; this succeeds while Redis is down).
    pub fn new(config: &RedisConfig) -> Result<Self, redis::RedisError> {
        Ok(RedisLink {
            pool: Arc::new(ArcSwap::from_pointee(config.pool()?)),
            address: Arc::new(ArcSwap::from_pointee(
                address_of(&config.url).unwrap_or_default(),
            )),
            lines: Arc::new(ArcSwapOption::from(lines_for(config)?.map(Arc::new))),
            config: config.clone(),
            ask_now: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// This link with packed calls each on a pooled connection of their own, not pipelined on
    /// one shared connection.
    pub fn without_shared_line(self) -> Self {
        self.lines.store(None);
        self
    }

    /// Runs one script invocation within `timeout` (a wait for a connection included): on the
    /// shared line ([`herd_shared::redis_line`]), pipelined behind other calls, or on a pooled
    /// connection of the current master when there is no line (a cluster, or turned off). The
    /// error is a short text: callers wrap it in their own "Redis unavailable" error.
    ///
    /// When no connection can be had (Redis refuses, e.g. while it restarts), it tries again
    /// after a short pause until `timeout`: nothing was sent, so trying again is safe, and a
    /// restart (~100 ms, `herd drill redis-restart`) then costs users a slower request instead
    /// of a 503. So does a `LOADING` answer (a Redis just restarted accepts connections while
    /// it reads its append-only file back, and runs nothing meanwhile), and a `READONLY` one (the
    /// node was demoted to a replica: the script's first write was refused, so nothing was
    /// written; the sentinels are asked at once and the call goes again to the master they
    /// name). Any other failure after the script was sent is returned at once: it may have run
    /// (on the line too: a line that breaks before the reply came is not tried again for a
    /// script, as it is for the reads of [`RedisLink::exchange`]).
    pub async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &Invocation<'_>,
        timeout: std::time::Duration,
    ) -> Result<T, String> {
        self.call(Call::Script(invocation), timeout).await
    }

    /// Sends `pipeline` (plain commands, in one round trip) as [`RedisLink::invoke`] sends a
    /// script: the same timeout, and the same tries again while no connection can be had or
    /// Redis is loading.
    pub async fn query<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
        timeout: std::time::Duration,
    ) -> Result<T, String> {
        self.call(Call::Pipeline(pipeline), timeout).await
    }

    /// Commands packed by the caller ([`herd_shared::resp::pack_command`], or by hand), sent in
    /// one round trip as a script is sent; `read` reads their `replies` replies in place
    /// ([`herd_shared::resp::Cursor`]) and makes the answer of them (`Ok(None)`: they were not
    /// what it expected). For hot paths on a single Redis: a cluster refuses them
    /// (`RedisConnection::exchange_packed`). Idempotent commands only (reads): they go on the
    /// shared line ([`herd_shared::redis_line`]), pipelined behind other calls, and are sent
    /// again when it broke before their replies came.
    pub async fn exchange<T: Send>(
        &self,
        packed: &[u8],
        replies: usize,
        read: impl Fn(&mut Cursor<'_>) -> Option<T> + Sync,
        timeout: std::time::Duration,
    ) -> Result<Option<T>, String> {
        let mut answer = None;
        // The answer leaves through `answer`: `call` returns what redis-rs converts, the same
        // for every kind of call, and here that is only whether `read` understood the replies.
        let mut read_into = |cursor: &mut Cursor<'_>| {
            answer = read(cursor);
            answer.is_some()
        };
        let understood: bool = self
            .call(Call::Packed(packed, replies, &mut read_into), timeout)
            .await?;
        Ok(answer.filter(|_| understood))
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        mut call: Call<'_, '_>,
        timeout: std::time::Duration,
    ) -> Result<T, String> {
        let mut last = String::new();
        let work = async {
            let mut pause = RECONNECT_PAUSE_MIN;
            loop {
                let outcome = match (&mut call, self.lines.load_full()) {
                    (Call::Packed(packed, replies, read), Some(lines)) => {
                        on_line(lines.line(), packed, *replies, &mut **read).await
                    }
                    (Call::Script(invocation), Some(lines)) => {
                        script_on_line(lines.line(), invocation).await
                    }
                    _ => match self.pool().get_in_bounded_call().await {
                        Ok(mut connection) => Ok(on_connection(&mut call, &mut connection).await),
                        Err(error) => Err(error.to_string()),
                    },
                };
                match outcome {
                    Ok(Err(error)) if is_loading(&error) => last = error.to_string(),
                    Ok(Err(error)) if is_read_only(&error) => {
                        last = error.to_string();
                        self.ask_now.notify_one();
                    }
                    Ok(result) => return result.map_err(|e| e.to_string()),
                    // No connection (nothing sent), or the shared line broke under a read:
                    // again after a pause, within the call's bound.
                    Err(error) => last = error,
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
            }
        };
        // Boxed: the call's state (a pool checkout, the script's EVALSHA and its NOSCRIPT
        // fallback, the back-off) is 3.4 KB, and unboxed it is part of every future that awaits
        // a session, each of which is moved into a box of its own by the layers above (axum
        // boxes every route's future): one allocation here instead of copying it five times.
        match tokio::time::timeout(timeout, Box::pin(work)).await {
            Ok(result) => result,
            Err(_) if last.is_empty() => Err("redis call timed out".into()),
            Err(_) => Err(format!("redis unreachable: {last}")),
        }
    }

    /// What the shared lines did so far (since the last Sentinel switch, which makes new ones);
    /// `None` when packed calls take pooled connections.
    pub fn line_stats(&self) -> Option<herd_shared::redis_line::LineStats> {
        self.lines.load().as_ref().map(|lines| lines.stats())
    }

    /// The current pool (a cheap handle).
    pub fn pool(&self) -> RedisPool {
        RedisPool::clone(&self.pool.load())
    }

    /// Whether this link is to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.config.is_cluster()
    }

    /// `host:port` of the Redis in use.
    pub fn address(&self) -> String {
        String::clone(&self.address.load())
    }

    /// Points the link at `address` (`host:port`) if it is not there already. Returns whether
    /// it moved.
    fn point_at(&self, address: &str) -> bool {
        if *self.address.load_full() == address {
            return false;
        }
        let config = RedisConfig {
            url: with_address(&self.config.url, address),
            ..self.config.clone()
        };
        match config.single_pool() {
            Ok(pool) => {
                let old = self.pool.swap(Arc::new(RedisPool::Single(pool)));
                self.address.store(Arc::new(address.to_string()));
                // A new line to the new master (unless lines are off); calls already on the old
                // one finish there, as calls on the old pool's connections do.
                if self.lines.load().is_some() {
                    match lines_for(&config) {
                        Ok(lines) => self.lines.store(lines.map(Arc::new)),
                        Err(error) => {
                            tracing::warn!(master = address, error = %error, "sentinel: cannot make a line; packed calls take pooled connections");
                            self.lines.store(None);
                        }
                    }
                }
                // A call waiting for one of the old master's connections (a checkout in a
                // bounded call waits as long as the call may) gets "closed" at once and tries
                // again on the new pool; the old connections in use are dropped when given back.
                if let RedisPool::Single(old) = &*old {
                    old.close();
                }
                true
            }
            Err(error) => {
                tracing::warn!(master = address, error = %error, "sentinel: cannot build a pool");
                false
            }
        }
    }

    /// Asks the sentinels, in order, for the master's address; `None` when none answers.
    pub async fn ask_sentinels(&self, sentinel: &SentinelConfig) -> Option<String> {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(self.config.command_timeout));
        for addr in &sentinel.addrs {
            let ask = async {
                let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
                let mut con = client
                    .get_multiplexed_async_connection_with_config(&connection)
                    .await
                    .ok()?;
                let reply: Option<(String, String)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&sentinel.master)
                    .query_async(&mut con)
                    .await
                    .ok()?;
                reply.map(|(host, port)| format!("{host}:{port}"))
            };
            let bound = self.config.connect_timeout + self.config.command_timeout;
            if let Ok(Some(master)) = tokio::time::timeout(bound, ask).await {
                return Some(master);
            }
        }
        None
    }

    /// Finds the master once (at start-up).
    pub async fn resolve(&self, sentinel: &SentinelConfig) -> bool {
        match self.ask_sentinels(sentinel).await {
            Some(master) => {
                self.point_at(&master);
                tracing::info!(master = %master, name = %sentinel.master, "sentinel: master found");
                true
            }
            None => {
                tracing::warn!(name = %sentinel.master, "sentinel: no sentinel answered; will keep asking");
                false
            }
        }
    }

    /// Follows the master every `sentinel.poll`, and at once when a call met a replica, until
    /// `stop`.
    pub async fn follow(self, sentinel: SentinelConfig, stop: CancellationToken) {
        let mut silent = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(sentinel.poll) => {}
                () = self.ask_now.notified() => {}
                () = stop.cancelled() => return,
            }
            let asked = tokio::select! {
                asked = self.ask_sentinels(&sentinel) => asked,
                () = stop.cancelled() => return,
            };
            match asked {
                Some(master) => {
                    silent = false;
                    let from = self.address();
                    if self.point_at(&master) {
                        tracing::warn!(from = %from, to = %master, name = %sentinel.master, "sentinel: master moved; switched");
                    }
                }
                None if !silent => {
                    silent = true;
                    tracing::warn!(name = %sentinel.master, "sentinel: no sentinel answered");
                }
                None => {}
            }
        }
    }
}

/// Runs `call` on a pooled `connection`.
async fn on_connection<T: redis::FromRedisValue>(
    call: &mut Call<'_, '_>,
    connection: &mut herd_shared::redis::RedisConnection,
) -> redis::RedisResult<T> {
    match call {
        Call::Script(invocation) => invocation.to_redis().invoke_async::<T>(connection).await,
        Call::Pipeline(pipeline) => pipeline.query_async::<T>(connection).await,
        Call::Packed(packed, replies, read) => {
            let read = |cursor: &mut Cursor<'_>| (**read)(cursor).then_some(());
            let understood = connection.exchange_packed(packed, *replies, read).await?;
            understood_as(understood.is_some())
        }
    }
}

/// Runs packed commands on the shared `line`: Redis's answer, or why there was none to be had
/// (no connection, nothing sent; or the line broke before the replies came, and these are
/// reads: [`RedisLink::exchange`]).
async fn on_line<T: redis::FromRedisValue>(
    line: &Line,
    packed: &[u8],
    replies: usize,
    read: &mut (dyn FnMut(&mut Cursor<'_>) -> bool + Send),
) -> Result<redis::RedisResult<T>, String> {
    let sent = match line.send(packed, replies).await {
        Ok(sent) => sent,
        Err(error @ (LineError::Empty | LineError::Miscounted { .. })) => {
            return Ok(Err(error.into()));
        }
        Err(error) => return Err(error.to_string()),
    };
    let read = |cursor: &mut Cursor<'_>| read(cursor).then_some(());
    match sent.read(read).await {
        Ok(answer) => Ok(answer.and_then(|understood| understood_as(understood.is_some()))),
        Err(error @ LineError::TimedOut(_)) => Ok(Err(error.into())),
        Err(error) => Err(error.to_string()),
    }
}

/// Runs a script call on the shared `line`: by its SHA1, and with its code when Redis does not
/// have it (`NOSCRIPT`: it restarted, or its scripts were flushed), as redis-rs does on a
/// pooled connection. `Err` only when nothing was sent (no connection): the caller tries again.
async fn script_on_line<T: redis::FromRedisValue>(
    line: &Line,
    invocation: &Invocation<'_>,
) -> Result<redis::RedisResult<T>, String> {
    let mut reply = one_on_line(line, &invocation.pack_by_hash()).await?;
    if matches!(&reply, Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
    {
        reply = one_on_line(line, &invocation.pack_with_code()).await?;
    }
    Ok(reply.and_then(|value| T::from_redis_value(value).map_err(redis::RedisError::from)))
}

/// One command (a script's) on the shared `line` and its reply. `Err` when no connection could
/// be had (nothing sent); a line that broke after the command was appended is Redis's error,
/// returned, never sent again: the script may have run.
async fn one_on_line(line: &Line, packed: &[u8]) -> Result<redis::RedisResult<Value>, String> {
    let sent = match line.send(packed, 1).await {
        Ok(sent) => sent,
        Err(error @ LineError::Connect(_)) => return Err(error.to_string()),
        Err(error) => return Ok(Err(error.into())),
    };
    Ok(match sent.read(|cursor| cursor.value()).await {
        // An error inside the reply (a script's array holding one) is the call's error, as
        // redis-rs makes it on a pooled connection.
        Ok(reply) => reply.and_then(|value| {
            value
                .ok_or_else(|| {
                    (
                        redis::ErrorKind::Client,
                        "a script reply herd does not read",
                    )
                        .into()
                })
                .and_then(Value::extract_error)
        }),
        Err(error) => Err(error.into()),
    })
}

/// Whether a packed call's reader understood the replies, as redis-rs's integer (which
/// `bool`, what [`RedisLink::exchange`] asks for, converts): one generic way out for every
/// kind of call.
fn understood_as<T: redis::FromRedisValue>(understood: bool) -> redis::RedisResult<T> {
    T::from_redis_value(redis::Value::Int(i64::from(understood))).map_err(redis::RedisError::from)
}

/// The shared lines for `config`'s Redis, one per CPU (the most serving threads a worker
/// runs); none for a cluster.
fn lines_for(config: &RedisConfig) -> Result<Option<Lines>, redis::RedisError> {
    if config.is_cluster() {
        return Ok(None);
    }
    let client = redis::Client::open(config.url.as_str())?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    Ok(Some(Lines::new(
        client.get_connection_info(),
        config.connect_timeout,
        config.command_timeout,
        cpus,
    )))
}

/// How long the first resolution may take before serving anyway.
pub const FIRST_RESOLVE: Duration = Duration::from_secs(2);

/// Whether Redis answered `READONLY` (a replica refused a write; it ran nothing).
fn is_read_only(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

/// Whether Redis answered `LOADING` (it is reading its data back after a start and ran
/// nothing).
fn is_loading(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
}

/// What [`RedisLink`] sends in one call.
enum Call<'c, 's> {
    Script(&'c Invocation<'s>),
    Pipeline(&'c redis::Pipeline),
    /// Packed commands, how many replies they get, and what reads them: whether it
    /// understood them ([`RedisLink::exchange`]).
    Packed(
        &'c [u8],
        usize,
        &'c mut (dyn FnMut(&mut Cursor<'_>) -> bool + Send),
    ),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_auth_and_database() {
        assert_eq!(
            with_address("redis://:secret@10.0.0.1:6379/3", "10.0.0.9:7000"),
            "redis://:secret@10.0.0.9:7000/3"
        );
        assert_eq!(with_address("redis://h:1", "x:2"), "redis://x:2");
        assert_eq!(address_of("redis://u:p@h:1/0").as_deref(), Some("h:1"));
        assert_eq!(address_of("redis://h:1").as_deref(), Some("h:1"));
    }

    /// A stand-in Redis on 127.0.0.1 that answers every script call `LOADING` `loading` times,
    /// then `:7`; `PING x` with `x`, anything else `+OK`. Returns its address and the count of
    /// script calls it saw.
    async fn loading_redis(loading: usize) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        stand_in_redis(move |command, seen| {
            Some(if seen < loading {
                "-LOADING Redis is loading the dataset in memory\r\n".into()
            } else if command == "HMGET" {
                "*2\r\n$1\r\nv\r\n$-1\r\n".to_string()
            } else {
                ":7\r\n".to_string()
            })
        })
        .await
    }

    /// A stand-in Redis on 127.0.0.1: `answer(command, calls seen before)` answers each call
    /// (`EVALSHA`, `EVAL`, `HMGET`), or hangs up (`None`); `TIME` gets a fixed time, `PING x`
    /// `x`, anything else `+OK`. Returns its address and the count of calls it saw.
    async fn stand_in_redis(
        answer: impl Fn(&str, usize) -> Option<String> + Send + Sync + 'static,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut read = BufReader::new(read);
                    let mut line = String::new();
                    loop {
                        // `*N` then N × (`$len`, bytes).
                        line.clear();
                        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let count: usize = line.trim()[1..].parse().unwrap_or(0);
                        let mut args = Vec::new();
                        for _ in 0..count {
                            line.clear();
                            read.read_line(&mut line).await.unwrap();
                            let len: usize = line.trim()[1..].parse().unwrap();
                            let mut bytes = vec![0; len + 2];
                            read.read_exact(&mut bytes).await.unwrap();
                            args.push(String::from_utf8_lossy(&bytes[..len]).into_owned());
                        }
                        let reply = match args.first().map(|a| a.to_uppercase()).as_deref() {
                            Some(command @ ("EVALSHA" | "EVAL" | "HMGET")) => {
                                match answer(command, seen.fetch_add(1, Ordering::SeqCst)) {
                                    Some(reply) => reply,
                                    None => return,
                                }
                            }
                            Some("TIME") => "*2\r\n$10\r\n1765000000\r\n$1\r\n0\r\n".into(),
                            Some("PING") if args.len() > 1 => {
                                format!("${}\r\n{}\r\n", args[1].len(), args[1])
                            }
                            _ => "+OK\r\n".to_string(),
                        };
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (address, calls)
    }

    /// Scripts go on the shared line: a script Redis does not have (`NOSCRIPT`) is sent again
    /// with its code (`EVAL`) on the line; one whose line broke after it was sent is not sent
    /// again (it may have run), where a read on the same line is.
    #[tokio::test]
    async fn a_script_on_the_line_is_loaded_when_missing_and_never_sent_twice() {
        let (address, calls) = stand_in_redis(|command, _| {
            Some(match command {
                "EVALSHA" => "-NOSCRIPT No matching script. Please use EVAL.\r\n".into(),
                _ => ":7\r\n".into(),
            })
        })
        .await;
        let link = RedisLink::new(&RedisConfig {
            url: format!("redis://{address}/0"),
            ..RedisConfig::default()
        })
        .unwrap();
        let script = herd_shared::script::Script::new("return 7");
        let answer = link
            .invoke::<i64>(&script.key("k"), Duration::from_secs(5))
            .await;
        assert_eq!(answer, Ok(7));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        let stats = link.line_stats().expect("a shared line");
        assert_eq!((stats.calls, stats.connects), (2, 1), "both on the line");

        // A Redis that hangs up on every call.
        let (address, calls) = stand_in_redis(|_, _| None).await;
        let link = RedisLink::new(&RedisConfig {
            url: format!("redis://{address}/0"),
            ..RedisConfig::default()
        })
        .unwrap();
        let error = link
            .invoke::<i64>(&script.key("k"), Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(error.contains("broke"), "{error}");
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a script whose line broke is not sent again"
        );
        let mut packed = Vec::new();
        herd_shared::resp::pack_command(&mut packed, &[b"HMGET", b"k", b"f"]);
        let read = |replies: &mut Cursor<'_>| replies.array().map(drop);
        let error = link
            .exchange(&packed, 1, read, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(error.contains("broke"), "{error}");
        assert!(
            calls.load(std::sync::atomic::Ordering::SeqCst) > 2,
            "a read is sent again"
        );
    }

    /// When the master moves (Sentinel), a call waiting for one of the old master's pooled
    /// connections goes on at once on the new master, not after its own bound in the old queue.
    #[tokio::test]
    async fn a_call_waiting_on_the_old_masters_pool_moves_with_the_master() {
        let (old, _) = loading_redis(0).await;
        let (new, calls) = loading_redis(0).await;
        // Scripts on pooled connections (the shared line does not wait for the pool).
        let link = RedisLink::new(&RedisConfig {
            url: format!("redis://{old}/0"),
            pool_size: 1,
            ..RedisConfig::default()
        })
        .unwrap()
        .without_shared_line();
        let held = link
            .pool()
            .get()
            .await
            .expect("the old pool's only connection");
        let script = herd_shared::script::Script::new("return 7");
        let waiting = tokio::spawn({
            let link = link.clone();
            async move {
                link.invoke::<i64>(&script.key("k"), Duration::from_secs(60))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "waits for the held connection");
        assert!(link.point_at(&new));
        let answered = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("moved with the master, long before its bound")
            .unwrap();
        assert_eq!(answered, Ok(7));
        assert_eq!(
            calls.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "on the new master"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_packed_exchange_waits_for_a_loading_redis_too() {
        let (address, calls) = loading_redis(2).await;
        let link = RedisLink::new(&RedisConfig {
            url: format!("redis://{address}/0"),
            ..RedisConfig::default()
        })
        .unwrap();
        let mut packed = Vec::new();
        herd_shared::resp::pack_command(&mut packed, &[b"TIME"]);
        herd_shared::resp::pack_command(&mut packed, &[b"HMGET", b"k", b"f"]);
        // The replies, as the fake Redis sends them: `*2 $10 1765000000 $1 0`, `*2 $1 v $-1`.
        let read = |replies: &mut Cursor<'_>| {
            let owned = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
            Some([
                replies.array()??.to_string(),
                owned(replies.bulk()??),
                owned(replies.bulk()??),
                replies.array()??.to_string(),
                owned(replies.bulk()??),
                format!("{:?}", replies.bulk()?),
            ])
        };
        let answer = link
            .exchange(&packed, 2, read, Duration::from_secs(5))
            .await;
        assert_eq!(
            answer,
            Ok(Some(
                ["2", "1765000000", "0", "2", "v", "None"].map(String::from)
            ))
        );
        // The two LOADING answers were tried again, the third went through.
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_redis_still_loading_its_data_is_waited_for_within_the_timeout() {
        let (address, calls) = loading_redis(3).await;
        let config = RedisConfig {
            url: format!("redis://{address}/0"),
            ..RedisConfig::default()
        };
        let link = RedisLink::new(&config).unwrap();
        let script = herd_shared::script::Script::new("return 7");
        let answer: Result<i64, String> = link
            .invoke(&script.prepare_invoke(), Duration::from_secs(5))
            .await;
        assert_eq!(answer, Ok(7));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
        // Still loading when the time is up: the LOADING answer is the error.
        let (address, _) = loading_redis(usize::MAX).await;
        let link = RedisLink::new(&RedisConfig {
            url: format!("redis://{address}/0"),
            ..RedisConfig::default()
        })
        .unwrap();
        let answer: Result<i64, String> = link
            .invoke(&script.prepare_invoke(), Duration::from_millis(300))
            .await;
        let error = answer.unwrap_err();
        assert!(
            error.contains("LOADING") || error.contains("loading"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_pool_is_swapped_when_the_master_moves() {
        let link = RedisLink::new(&RedisConfig::default()).unwrap();
        assert_eq!(link.address(), "127.0.0.1:6379");
        assert!(!link.point_at("127.0.0.1:6379"));
        assert!(link.point_at("127.0.0.1:7000"));
        assert_eq!(link.address(), "127.0.0.1:7000");
    }
}
