//! Helpers for the worker and session tests: watching the registry's `events` channel, reading
//! the session cookie, and a cookie-less client so tests choose exactly which cookie to send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Name of the demo app's session cookie (the worker's default `session.cookie_name`).
pub const SESSION_COOKIE: &str = "herd_session";

/// Every notice published on `{prefix}events` since [`EventLog::subscribe`], collected by a
/// background thread that stops when the log is dropped.
#[derive(Debug)]
pub struct EventLog {
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLog {
    /// Subscribes to `{prefix}events` on `redis_url`; returns once the subscription is active.
    pub fn subscribe(redis_url: &str, prefix: &str) -> EventLog {
        let client = ::redis::Client::open(redis_url).expect("valid redis url");
        let mut connection = client.get_connection().expect("connect to test redis");
        let channel = format!("{prefix}events");
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let events = events.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                connection
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("read timeout");
                let mut pubsub = connection.as_pubsub();
                pubsub.subscribe(&channel).expect("subscribe");
                let _ = ready_tx.send(());
                while !stop.load(Ordering::Relaxed) {
                    match pubsub.get_message() {
                        Ok(message) => {
                            let payload: String = message.get_payload().unwrap_or_default();
                            let value =
                                serde_json::from_str(&payload).unwrap_or(Value::String(payload));
                            events.lock().expect("event log").push(value);
                        }
                        Err(error) if error.is_timeout() => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("subscribed to events");
        EventLog {
            events,
            stop,
            thread: Some(thread),
        }
    }

    /// The notices so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("event log").clone()
    }

    /// Waits (bounded) for a notice `kind` (`join`, `drain`, `leave`) about worker `id`.
    pub async fn wait_for(&self, kind: &str, id: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(event) = self
                .events()
                .into_iter()
                .find(|event| matches(event, kind, id))
            {
                return event;
            }
            assert!(
                started.elapsed() < timeout,
                "no `{kind}` event for {id} within {timeout:?}; saw {:?}",
                self.events()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many notices `kind` about `id` were seen.
    pub fn count(&self, kind: &str, id: &str) -> usize {
        self.events()
            .iter()
            .filter(|event| matches(event, kind, id))
            .count()
    }
}

fn matches(event: &Value, kind: &str, id: &str) -> bool {
    event["event"] == kind && (event["id"] == id || event["worker"]["id"] == id)
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The session id a response sets (`Some("")` when it clears the cookie).
pub fn set_session_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| {
            value
                .split(';')
                .next()
                .and_then(|pair| pair.trim().strip_prefix(&format!("{SESSION_COOKIE}=")))
                .map(str::to_string)
        })
}

/// The whole `Set-Cookie` header for the session cookie, to check its attributes.
pub fn set_cookie_header(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find(|value| value.starts_with(&format!("{SESSION_COOKIE}=")))
        .map(str::to_string)
}

/// `herd_session=ID`, the `Cookie` header of a session.
pub fn cookie(id: &str) -> String {
    format!("{SESSION_COOKIE}={id}")
}

/// A client without a cookie store: tests send the session cookie they mean.
pub fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .expect("client builds")
}

/// A process started by a test helper; SIGKILLed and reaped on drop (also on panic).
#[derive(Debug)]
pub struct Spawned {
    child: std::process::Child,
    /// The port it listens on.
    pub port: u16,
}

impl Spawned {
    /// kill -9 now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many replicas and other sentinels the sentinel on loopback `port` knows for `master`
/// (`None`: no answer).
pub fn sentinel_knows(port: u16, master: &str) -> Option<(usize, usize)> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut con = client
        .get_connection_with_timeout(Duration::from_millis(300))
        .ok()?;
    let replicas: Vec<::redis::Value> = ::redis::cmd("SENTINEL")
        .arg("replicas")
        .arg(master)
        .query(&mut con)
        .ok()?;
    let sentinels: Vec<::redis::Value> = ::redis::cmd("SENTINEL")
        .arg("sentinels")
        .arg(master)
        .query(&mut con)
        .ok()?;
    Some((replicas.len(), sentinels.len()))
}

/// A free loopback port (bound and released; the caller binds it right away).
pub fn free_port() -> u16 {
    herd::ports::free_port().expect("free port")
}

/// A 3-worker cluster whose workers drain quickly on SIGTERM (1 s minimum, 500 ms quiet), so
/// drain tests don't wait the default 2 s.
pub fn quick_drain_cluster() -> crate::cluster::ClusterOptions {
    crate::cluster::ClusterOptions {
        workers: 3,
        worker_env: vec![
            ("HERD_WORKER_DRAIN__MIN".into(), "1s".into()),
            ("HERD_WORKER_DRAIN__QUIET".into(), "500ms".into()),
        ],
        ..crate::cluster::ClusterOptions::default()
    }
}

/// Logs `user` in through the cluster's gateway; returns the session id from the cookie.
pub async fn login(
    client: &reqwest::Client,
    cluster: &crate::cluster::Cluster,
    user: &str,
) -> String {
    let response = client
        .post(cluster.gateway.url("/login"))
        .json(&serde_json::json!({ "user": user }))
        .send()
        .await
        .expect("login request");
    assert_eq!(response.status(), 200);
    set_session_cookie(&response).expect("session cookie")
}

/// Starts `redis-server` on a free port with `args` (e.g. `--replicaof`, or a config file and
/// `--sentinel`), logs in `dir`, and waits until it answers PING.
pub fn spawn_redis(
    dir: &std::path::Path,
    name: &str,
    config: Option<&str>,
    args: &[&str],
) -> Spawned {
    let port = free_port();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let mut command = std::process::Command::new("redis-server");
    if let Some(text) = config {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, text.replace("{port}", &port.to_string())).expect("config file");
        command.arg(path);
    }
    command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
    if config.is_none() {
        command
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
    }
    command
        .args(args)
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    let child = command.spawn().expect("redis-server on PATH");
    let spawned = Spawned { child, port };
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("url");
    let started = Instant::now();
    loop {
        let pong = client
            .get_connection_with_timeout(Duration::from_millis(200))
            .and_then(|mut con| ::redis::cmd("PING").query::<String>(&mut con));
        if pong.is_ok() {
            return spawned;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
