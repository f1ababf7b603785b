//! The users of a drill and what they see: log users in, run an open-loop load of idempotent GETs
//! and session writes through the public address while the fault is injected, then check that
//! every acknowledged cart write is still in its session.
//!
//! The load is open-loop (a request is sent on every tick whether or not earlier ones have
//! answered), as real users are: a hung connection does not slow the load down and hide the
//! fault. Writes to one session never overlap (a user with a write in flight gets a GET
//! instead), so a missing item can only mean a lost write, not a race between two of ours.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

/// The header that names the gateway that answered.
const SERVED_BY: &str = "x-herd-gateway";
/// The header that names the worker that answered.
const WORKER: &str = "x-herd-worker";
/// Attempts per session check (a check that can't reach the cluster is retried a little: the
/// cluster has been given time to settle, but a check is not the drill's measurement).
const CHECK_ATTEMPTS: usize = 3;

/// What a request was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `GET /cart` with the session cookie (idempotent, reads the session).
    GetCart,
    /// `GET /work?ms=1` (idempotent, no session).
    GetWork,
    /// `POST /cart/items` (a session write; not idempotent, so never retried by the gateway).
    AddItem,
    /// `GET /work?ms=0&sleep_ms=2000`: a slow idempotent request (a wait, no CPU), sent in a burst just before a worker is
    /// killed so that the kill catches requests in flight, as a crash under real load does.
    GetSlow,
}

impl Op {
    /// The HTTP method.
    pub fn method(self) -> &'static str {
        match self {
            Op::GetCart | Op::GetWork | Op::GetSlow => "GET",
            Op::AddItem => "POST",
        }
    }

    /// The path it requests.
    pub fn path(self) -> &'static str {
        match self {
            Op::GetCart => "/cart",
            Op::GetWork => "/work?ms=1",
            Op::GetSlow => "/work?ms=0&sleep_ms=2000",
            Op::AddItem => "/cart/items",
        }
    }

    /// Whether a gateway may retry it (and users may expect it never to fail).
    pub fn idempotent(self) -> bool {
        self != Op::AddItem
    }
}

/// How a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The connection was refused or the host unreachable (not a connection reset as it
    /// opened: that is `Other`).
    Refused,
    /// No complete response within the client's timeout.
    Timeout,
    /// A 5xx status.
    Status5xx,
    /// Any other transport failure (connection reset, response cut short).
    Other,
}

impl Failure {
    /// Every kind, in report order.
    pub const ALL: [Failure; 4] = [
        Failure::Refused,
        Failure::Timeout,
        Failure::Status5xx,
        Failure::Other,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Timeout => "timeout",
            Failure::Status5xx => "5xx",
            Failure::Other => "other",
        }
    }
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the load's start.
    pub sent_at: Duration,
    /// How long until the whole response (or the failure).
    pub latency: Duration,
    /// What it was.
    pub op: Op,
    /// `None` when it succeeded.
    pub failure: Option<Failure>,
    /// The gateway that answered (`x-herd-gateway`).
    pub gateway: Option<String>,
    /// The worker that answered (`x-herd-worker`).
    pub worker: Option<String>,
    /// What went wrong, as the client saw it (the error chain, or the status), when it failed.
    pub detail: Option<String>,
}

impl Sample {
    /// When it finished, from the load's start.
    pub fn done_at(&self) -> Duration {
        self.sent_at + self.latency
    }
}

/// A logged-in user and the cart writes the cluster acknowledged for it.
#[derive(Debug)]
pub struct User {
    /// `name=value` of the session cookie.
    pub cookie: String,
    /// Items whose `POST /cart/items` was answered 2xx.
    pub acknowledged: Mutex<Vec<String>>,
    /// Whether a write of this user is in flight.
    busy: AtomicBool,
}

/// Live counters for the progress line, and the drill's request for a burst of slow requests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests the load should send at once: see [`Counters::burst`].
    burst_wanted: std::sync::atomic::AtomicU32,
    /// Of which kind.
    burst_op: Mutex<Option<Op>>,
    /// Wakes the load for a burst at once, not at its next tick (a second away at `--rate 1`).
    burst_asked: tokio::sync::Notify,
    /// Requests finished.
    pub done: AtomicU64,
    /// Of which failed.
    pub failed: AtomicU64,
}

impl Counters {
    /// Asks the load for `count` requests `op` now, all at once (GETs only: a burst skips the
    /// session bookkeeping of writes).
    pub fn burst(&self, count: u32, op: Op) {
        debug_assert!(op.idempotent());
        *self.burst_op.lock().unwrap_or_else(|e| e.into_inner()) = Some(op);
        self.burst_wanted.store(count, Ordering::SeqCst);
        self.burst_asked.notify_one();
    }
}

/// What the session check found.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SessionCheck {
    /// Sessions checked.
    pub checked: usize,
    /// Sessions missing at least one acknowledged write (or gone altogether).
    pub lost: usize,
    /// Acknowledged writes over all sessions.
    pub writes_acknowledged: usize,
    /// Acknowledged writes not found.
    pub writes_missing: usize,
}

/// The load's shape.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Where users send requests.
    pub target: SocketAddr,
    /// Requests per second.
    pub rate: u32,
    /// How long to send.
    pub duration: Duration,
    /// Longest wait for one response before it counts as a timeout.
    pub timeout: Duration,
}

/// Runs `work` on a thread of its own with a tokio runtime, inside network namespace `netns`
/// when given (so its sockets belong to the lab's client host).
pub fn spawn_in<F, Fut, T>(
    netns: Option<String>,
    work: F,
) -> std::thread::JoinHandle<Result<T, String>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        if let Some(netns) = netns {
            let path = format!("/var/run/netns/{netns}");
            let namespace =
                std::fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
            nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot enter {netns}: {e}"))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        Ok(runtime.block_on(work()))
    })
}

/// [`spawn_in`] and wait for it.
pub fn run_in<F, Fut, T>(netns: Option<String>, work: F) -> Result<T, String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    match spawn_in(netns, work).join() {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .expect("a reqwest client with plain options builds")
}

/// Logs `count` users in (`POST /login`), each adding one item to its cart; returns them.
pub async fn log_in(target: SocketAddr, count: usize, tag: String) -> Result<Vec<User>, String> {
    let client = client(Duration::from_secs(5));
    let mut users = Vec::with_capacity(count);
    for n in 0..count {
        let item = format!("login-{n}");
        let user = format!("drill-{tag}-{n}");
        let cookie = crate::demo_user::log_in_with_item(&client, target, &user, &item).await?;
        users.push(User {
            cookie,
            acknowledged: Mutex::new(vec![item]),
            busy: AtomicBool::new(false),
        });
    }
    Ok(users)
}

/// Sends the load of `plan` from `origin` on, until its duration is over or `stop` is set;
/// returns every request's outcome once the last one has finished.
pub async fn run_load(
    plan: LoadPlan,
    users: Arc<Vec<User>>,
    origin: Instant,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Vec<Sample> {
    let client = client(plan.timeout);
    let gap = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let mut ticks = tokio::time::interval(gap);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut tasks = tokio::task::JoinSet::new();
    // What each request task was and when it was sent, for one that panics (`gather`).
    let mut begun = HashMap::new();
    let mut n: u64 = 0;
    // The bound: one request per tick, for `duration` at most.
    let max_requests = (f64::from(plan.rate) * plan.duration.as_secs_f64()).ceil() as u64;
    while n < max_requests {
        let burst = tokio::select! {
            biased;
            () = counters.burst_asked.notified() => true,
            _ = ticks.tick() => false,
        };
        let sent_at = origin.elapsed();
        if sent_at >= plan.duration || stop.load(Ordering::SeqCst) {
            break;
        }
        let burst_op = *counters.burst_op.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..counters.burst_wanted.swap(0, Ordering::SeqCst) {
            let op = burst_op.unwrap_or(Op::GetWork);
            let (client, users, counters) =
                (client.clone(), Arc::clone(&users), Arc::clone(&counters));
            let target = plan.target;
            let task = tasks.spawn(async move {
                let sample = send(&client, target, op, &users[0], 0, origin).await;
                counters.done.fetch_add(1, Ordering::Relaxed);
                if sample.failure.is_some() {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                }
                sample
            });
            begun.insert(task.id(), (op, sent_at));
        }
        if burst {
            continue;
        }
        let user_index = ((n / 4) as usize) % users.len().max(1);
        let mut op = match n % 4 {
            0 => Op::AddItem,
            1 | 3 => Op::GetCart,
            _ => Op::GetWork,
        };
        if op == Op::AddItem && users[user_index].busy.swap(true, Ordering::SeqCst) {
            op = Op::GetWork;
        }
        let (client, users, counters) = (client.clone(), Arc::clone(&users), Arc::clone(&counters));
        let target = plan.target;
        let task = tasks.spawn(async move {
            let sample = send(&client, target, op, &users[user_index], n, origin).await;
            if op == Op::AddItem {
                users[user_index].busy.store(false, Ordering::SeqCst);
            }
            counters.done.fetch_add(1, Ordering::Relaxed);
            if sample.failure.is_some() {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            sample
        });
        begun.insert(task.id(), (op, sent_at));
        n += 1;
    }
    gather(tasks, &begun, origin).await
}

/// Every request's sample, in the order they were sent. A request whose task panicked (a bug in
/// this load, not the cluster) is a failure of kind "other": users of a real client would have
/// seen nothing come back, and a drill must not pass on the requests that were left.
async fn gather(
    mut tasks: tokio::task::JoinSet<Sample>,
    begun: &HashMap<tokio::task::Id, (Op, Duration)>,
    origin: Instant,
) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(begun.len());
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(sample) => samples.push(sample),
            Err(error) => {
                let (op, sent_at) = begun
                    .get(&error.id())
                    .copied()
                    .unwrap_or((Op::GetWork, Duration::ZERO));
                samples.push(Sample {
                    sent_at,
                    latency: origin.elapsed().saturating_sub(sent_at),
                    op,
                    failure: Some(Failure::Other),
                    gateway: None,
                    worker: None,
                    detail: Some(format!("the request's task failed: {error}")),
                });
            }
        }
    }
    samples.sort_by_key(|s| s.sent_at);
    samples
}

async fn send(
    client: &reqwest::Client,
    target: SocketAddr,
    op: Op,
    user: &User,
    n: u64,
    origin: Instant,
) -> Sample {
    let sent_at = origin.elapsed();
    let item = format!("item-{n}");
    let request = match op {
        Op::GetCart => client
            .get(format!("http://{target}{}", op.path()))
            .header("cookie", &user.cookie),
        Op::GetWork | Op::GetSlow => client.get(format!("http://{target}{}", op.path())),
        Op::AddItem => client
            .post(format!("http://{target}{}", op.path()))
            .header("cookie", &user.cookie)
            .json(&json!({"item": item, "qty": 1})),
    };
    let (failure, gateway, worker) = match request.send().await {
        Ok(response) => {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let (gateway, worker) = (header(SERVED_BY), header(WORKER));
            let status = response.status();
            // Read the whole body: a response cut mid-body is a failure users would see.
            let failure = match response.bytes().await {
                Err(error) => Some(failure_of(&error)),
                Ok(_) if status.is_server_error() => Some((Failure::Status5xx, status.to_string())),
                Ok(_) if !status.is_success() => Some((Failure::Other, status.to_string())),
                Ok(_) => None,
            };
            (failure, gateway, worker)
        }
        Err(error) => (Some(failure_of(&error)), None, None),
    };
    let (failure, detail) = failure.unzip();
    if op == Op::AddItem && failure.is_none() {
        user.acknowledged
            .lock()
            .expect("acknowledged lock")
            .push(item);
    }
    Sample {
        sent_at,
        latency: origin.elapsed().saturating_sub(sent_at),
        op,
        failure,
        gateway,
        worker,
        detail,
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message is only the
/// outermost, "error sending request").
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// A failed request's kind and its error with its causes.
fn failure_of(error: &reqwest::Error) -> (Failure, String) {
    let detail = chain(error);
    (
        classify(error.is_timeout(), error.is_connect(), &detail),
        detail,
    )
}

/// The kind of a failed request from its error (`detail`: its causes, [`chain`]). A
/// connection reset as it opened is a connect error to reqwest, but nothing refused it: a
/// listener took it and something reset it (a gateway's floating address moving under it), so
/// it is `other`, as a reset after sending is.
fn classify(timeout: bool, connect: bool, detail: &str) -> Failure {
    if timeout {
        Failure::Timeout
    } else if connect && !detail.contains("reset by peer") {
        Failure::Refused
    } else {
        Failure::Other
    }
}

/// Sends `count` quick `GET /work?ms=0` to `target`, one after the other, ignoring the answers.
pub async fn trickle(target: SocketAddr, count: usize) {
    let client = client(Duration::from_secs(1));
    for _ in 0..count {
        let _ = client
            .get(format!("http://{target}/work?ms=0"))
            .send()
            .await;
    }
}

/// Reads every user's cart and counts the acknowledged writes that are missing.
pub async fn check_sessions(target: SocketAddr, users: Arc<Vec<User>>) -> SessionCheck {
    let client = client(Duration::from_secs(5));
    let mut check = SessionCheck::default();
    for user in users.iter() {
        let expected = user.acknowledged.lock().expect("acknowledged lock").clone();
        let mut cart = None;
        for _ in 0..CHECK_ATTEMPTS {
            cart = read_cart(&client, target, &user.cookie).await;
            if cart.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let present: Vec<String> = cart
            .as_ref()
            .and_then(|cart| cart["items"].as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item["item"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let missing = expected
            .iter()
            .filter(|item| !present.contains(item))
            .count();
        check.checked += 1;
        check.writes_acknowledged += expected.len();
        check.writes_missing += missing;
        if missing > 0 {
            check.lost += 1;
        }
    }
    check
}

async fn read_cart(client: &reqwest::Client, target: SocketAddr, cookie: &str) -> Option<Value> {
    let response = client
        .get(format!("http://{target}/cart"))
        .header("cookie", cookie)
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_task_that_panics_is_a_failure_not_a_missing_sample() {
        let origin = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut begun = HashMap::new();
        let fine = Sample {
            sent_at: Duration::from_millis(1),
            latency: Duration::from_millis(2),
            op: Op::GetCart,
            failure: None,
            gateway: Some("gw1".into()),
            worker: Some("w1".into()),
            detail: None,
        };
        let task = tasks.spawn(async move { fine });
        begun.insert(task.id(), (Op::GetCart, Duration::from_millis(1)));
        let task = tasks.spawn(async { panic!("a bug in the load") });
        begun.insert(task.id(), (Op::AddItem, Duration::from_millis(5)));
        let samples = gather(tasks, &begun, origin).await;
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].failure, None);
        assert_eq!(samples[1].failure, Some(Failure::Other));
        assert_eq!(samples[1].op, Op::AddItem);
        assert_eq!(samples[1].sent_at, Duration::from_millis(5));
    }

    #[test]
    fn a_connection_reset_as_it_opened_is_not_a_refusal() {
        let refused = "error sending request: client error (Connect): tcp connect error: \
                       Connection refused (os error 111)";
        let reset = "error sending request: client error (Connect): tcp connect error: \
                     Connection reset by peer (os error 104)";
        assert_eq!(classify(false, true, refused), Failure::Refused);
        assert_eq!(classify(false, true, reset), Failure::Other);
        assert_eq!(classify(true, true, reset), Failure::Timeout);
        assert_eq!(classify(false, false, reset), Failure::Other);
    }

    #[test]
    fn an_error_is_described_with_its_causes() {
        let inner = std::io::Error::other("connection closed before message completed");
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            chain(&Outer(inner)),
            "error sending request: connection closed before message completed"
        );
    }
}
