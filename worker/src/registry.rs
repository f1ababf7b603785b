//! The worker's own entry in the Redis registry: join, heartbeat, drain, leave.
//!
//! Every heartbeat rewrites `{prefix}worker:{id}` (fields from [`WorkerRecord::to_fields`]) and its
//! TTL in one script, which also publishes the current notice (`join`, or `drain` once draining)
//! on `{prefix}events` whenever the entry was missing — at start, and again after Redis lost it
//! (restart, expiry during an outage). So gateways hear about the worker at once in every case.
//! While Redis is down the worker keeps serving and keeps trying.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herd_shared::keys::Keys;
use herd_shared::registry::{Event, WorkerRecord, WorkerState};
use herd_shared::script::Script;
use tokio_util::sync::CancellationToken;

use crate::config::RegistryConfig;
use crate::metrics::WorkerMetrics;
use crate::redis_link::RedisLink;

/// KEYS[1] entry. ARGV: ttl ms, channel, notice, '1' to publish even if the entry existed,
/// then field/value pairs. Returns 1 when the notice was published.
const BEAT: &str = r#"
local existed = redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if existed == 0 or ARGV[4] == '1' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

/// KEYS[1] entry. ARGV: channel, notice.
const LEAVE: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"#;

/// Why a registry write failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis could not be reached or did not answer in time.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug)]
struct Status {
    record: WorkerRecord,
    /// Whether the drain notice has been published.
    drain_announced: bool,
    /// Whether the last write succeeded (to log only changes).
    healthy: Option<bool>,
}

/// This worker's registration.
pub struct Registry {
    link: RedisLink,
    keys: Keys,
    config: RegistryConfig,
    call_timeout: Duration,
    status: Mutex<Status>,
    beat: Script,
    leave: Script,
    metrics: Arc<WorkerMetrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("key", &self.key())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Registration of `record` (state ready) through `link`.
    pub fn new(
        link: RedisLink,
        keys: Keys,
        config: RegistryConfig,
        call_timeout: Duration,
        record: WorkerRecord,
    ) -> Self {
        Registry {
            link,
            keys,
            config,
            call_timeout,
            status: Mutex::new(Status {
                record,
                drain_announced: false,
                healthy: None,
            }),
            beat: Script::new(BEAT),
            leave: Script::new(LEAVE),
            metrics: Arc::default(),
        }
    }

    /// The registry, counting its heartbeats in `metrics` (the worker's `/metrics`).
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    fn key(&self) -> String {
        let id = self.status.lock().expect("registry lock").record.id.clone();
        self.keys.worker(&id)
    }

    async fn run_script(
        &self,
        invocation: &herd_shared::script::Invocation<'_>,
    ) -> Result<i64, RegistryError> {
        self.link
            .invoke(invocation, self.call_timeout)
            .await
            .map_err(RegistryError::Unavailable)
    }

    /// Writes the entry once; publishes the current notice if the entry was missing (or the
    /// drain is not yet announced).
    pub async fn beat(&self) -> Result<(), RegistryError> {
        let (record, notice, force) = {
            let status = self.status.lock().expect("registry lock");
            let record = status.record.clone();
            let (notice, force) = match record.state {
                WorkerState::Ready => (
                    Event::Join {
                        worker: record.clone(),
                    },
                    false,
                ),
                WorkerState::Draining => (
                    Event::Drain {
                        id: record.id.clone(),
                    },
                    !status.drain_announced,
                ),
            };
            (record, notice, force)
        };
        let mut invocation = self.beat.key(self.keys.worker(&record.id));
        invocation
            .arg(u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(self.keys.events())
            .arg(notice.to_json())
            .arg(if force { "1" } else { "0" });
        for (field, value) in record.to_fields() {
            invocation.arg(field).arg(value);
        }
        let result = self.run_script(&invocation).await;
        self.metrics.heartbeat(result.is_ok());
        let mut status = self.status.lock().expect("registry lock");
        match &result {
            Ok(published) => {
                if *published == 1 {
                    tracing::info!(worker = %record.id, state = record.state.as_str(), "registry: entry written, notice published");
                }
                if record.state == WorkerState::Draining {
                    status.drain_announced = true;
                }
                if status.healthy != Some(true) {
                    tracing::debug!(worker = %record.id, "registry: heartbeat ok");
                }
                status.healthy = Some(true);
            }
            Err(error) => {
                if status.healthy != Some(false) {
                    tracing::warn!(worker = %record.id, error = %error, "registry: heartbeat failed; will keep trying");
                }
                status.healthy = Some(false);
            }
        }
        result.map(drop)
    }

    /// Heartbeats every `registry.heartbeat` until `stop`.
    pub async fn heartbeat(&self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = stop.cancelled() => return,
            }
            // A beat already sent is finished, never dropped: dropped, it could still reach
            // Redis after the `leave` that follows the stop and bring the entry back.
            let _ = self.beat().await;
        }
    }

    /// Switches the entry to draining and announces it (best effort; the heartbeat retries).
    pub async fn drain(&self) -> Result<(), RegistryError> {
        self.status.lock().expect("registry lock").record.state = WorkerState::Draining;
        self.beat().await
    }

    /// Deletes the entry and announces the departure.
    pub async fn leave(&self) -> Result<(), RegistryError> {
        let id = self.status.lock().expect("registry lock").record.id.clone();
        let mut invocation = self.leave.key(self.keys.worker(&id));
        invocation
            .arg(self.keys.events())
            .arg(Event::Leave { id: id.clone() }.to_json());
        let result = self.run_script(&invocation).await;
        match &result {
            Ok(_) => tracing::info!(worker = %id, "registry: left"),
            Err(error) => {
                tracing::warn!(worker = %id, error = %error, "registry: could not leave; the entry will expire")
            }
        }
        result.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A stand-in for Redis that answers every command with `:1`, holding back the answer to
    /// scripts (the heartbeat) for `delay`.
    async fn slow_redis(delay: Duration) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    // RESP requests: `*N`, then `$len` + value for each of the N arguments.
                    while let Ok(Some(head)) = lines.next_line().await {
                        let count: usize = head.trim_start_matches('*').parse().unwrap_or(0);
                        let mut args = Vec::new();
                        for _ in 0..count * 2 {
                            args.push(lines.next_line().await.unwrap().unwrap_or_default());
                        }
                        let command = args.get(1).cloned().unwrap_or_default().to_uppercase();
                        if command.starts_with("EVAL") {
                            tokio::time::sleep(delay).await;
                        }
                        if write.write_all(b":1\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn stopping_the_heartbeat_lets_a_beat_in_flight_finish() {
        let addr = slow_redis(Duration::from_millis(400)).await;
        let redis = herd_shared::redis::RedisConfig {
            url: format!("redis://{addr}/0"),
            ..Default::default()
        };
        let registry = Registry::new(
            RedisLink::new(&redis).unwrap(),
            redis.keys(),
            RegistryConfig::default(),
            Duration::from_secs(2),
            WorkerRecord {
                id: "w1".into(),
                addr: "127.0.0.1:1".into(),
                machine: "m".into(),
                weight: 100,
                version: "0".into(),
                started_ms: 0,
                state: WorkerState::Ready,
            },
        );
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let heartbeat = async {
            registry.heartbeat(stop.clone()).await;
            started.elapsed()
        };
        let stopper = async {
            // The first beat goes out at once; stop while Redis holds its answer.
            tokio::time::sleep(Duration::from_millis(150)).await;
            stop.cancel();
        };
        let (stopped_after, ()) = tokio::join!(heartbeat, stopper);
        assert!(
            stopped_after >= Duration::from_millis(400),
            "the heartbeat returned with its beat still in flight: {stopped_after:?}"
        );
        assert_eq!(
            registry.status.lock().unwrap().healthy,
            Some(true),
            "the beat completed"
        );
    }
}
