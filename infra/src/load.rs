//! A bounded HTTP load: a fixed request rate for a fixed time over a fixed number of connections,
//! recording every request's outcome. Drills and end-to-end tests use it to tell exactly what users
//! would have seen while a fault was injected.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// How much load, for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests per second over all connections.
    pub rate: u32,
    /// How long to send.
    pub duration: Duration,
    /// Parallel clients (each one reuses its keep-alive connections).
    pub concurrency: usize,
    /// Longest wait for one response before it counts as failed.
    pub timeout: Duration,
}

impl Plan {
    /// The most requests this plan can send (its bound).
    pub fn max_requests(&self) -> u64 {
        (f64::from(self.rate) * self.duration.as_secs_f64()).ceil() as u64
    }
}

/// The failure recorded for a load client whose task panicked (it sends nothing after).
pub const CLIENT_PANICKED: &str = "load client panicked";

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, from the start of the load.
    pub sent_at: Duration,
    /// How long until the response (or failure).
    pub latency: Duration,
    /// `None` on success, else the kind of failure (`status 502`, `timeout`, `connect`, …).
    pub failure: Option<String>,
    /// The `x-herd-worker` header of the response, if any.
    pub worker: Option<String>,
    /// The method sent.
    pub method: String,
}

/// Everything a load run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every request, in completion order.
    pub samples: Vec<Sample>,
}

impl Report {
    /// Requests sent.
    pub fn sent(&self) -> usize {
        self.samples.len()
    }

    /// Requests that failed.
    pub fn failed(&self) -> usize {
        self.samples.iter().filter(|s| s.failure.is_some()).count()
    }

    /// Failed requests by kind.
    pub fn failures_by_kind(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for failure in self.samples.iter().filter_map(|s| s.failure.as_ref()) {
            *kinds.entry(failure.clone()).or_insert(0) += 1;
        }
        kinds
    }

    /// Successful responses by worker.
    pub fn by_worker(&self) -> BTreeMap<String, usize> {
        let mut workers = BTreeMap::new();
        for sample in self.samples.iter().filter(|s| s.failure.is_none()) {
            let worker = sample.worker.clone().unwrap_or_else(|| "-".into());
            *workers.entry(worker).or_insert(0) += 1;
        }
        workers
    }

    /// The slowest request.
    pub fn max_latency(&self) -> Duration {
        self.samples
            .iter()
            .map(|s| s.latency)
            .max()
            .unwrap_or_default()
    }

    /// The `q` quantile (0..=1) of latency over all requests.
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut latencies: Vec<Duration> = self.samples.iter().map(|s| s.latency).collect();
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        latencies.sort();
        let index = ((latencies.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        latencies[index]
    }

    /// One line for humans: sent, failed by kind, p50/p99/max latency.
    pub fn summary(&self) -> String {
        format!(
            "sent {} failed {} {:?} p50 {:?} p99 {:?} max {:?}",
            self.sent(),
            self.failed(),
            self.failures_by_kind(),
            self.latency_quantile(0.5),
            self.latency_quantile(0.99),
            self.max_latency()
        )
    }
}

/// Runs `plan`, building request number `n` with `request(client, n)`. Returns when every request
/// has finished; never runs longer than `duration + timeout` (plus scheduling).
pub async fn run<F>(plan: &Plan, client: &reqwest::Client, request: F) -> Report
where
    F: Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let samples = Arc::new(Mutex::new(Vec::with_capacity(plan.max_requests() as usize)));
    let started = Instant::now();
    let concurrency = plan.concurrency.max(1);
    let per_client_rate = (f64::from(plan.rate) / concurrency as f64).max(0.001);
    let gap = Duration::from_secs_f64(1.0 / per_client_rate);
    let mut tasks = Vec::with_capacity(concurrency);
    for index in 0..concurrency {
        let client = client.clone();
        let request = Arc::clone(&request);
        let samples = Arc::clone(&samples);
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            // Spread the clients' first requests over one gap so the load is even.
            let offset = gap.mul_f64(index as f64 / concurrency as f64);
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, gap);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = index as u64;
            loop {
                ticks.tick().await;
                let sent_at = started.elapsed();
                if sent_at >= plan.duration {
                    break;
                }
                let builder = request(&client, n).timeout(plan.timeout);
                n += concurrency as u64;
                let method = builder
                    .try_clone()
                    .and_then(|b| b.build().ok())
                    .map(|r| r.method().to_string())
                    .unwrap_or_default();
                let sample = send(builder, sent_at, started, method).await;
                samples.lock().await.push(sample);
            }
        }));
    }
    let mut panicked = 0;
    for task in tasks {
        if task.await.is_err() {
            panicked += 1;
        }
    }
    let mut samples = std::mem::take(&mut *samples.lock().await);
    // A client that panicked sent no more: its request in flight is one no one saw answered,
    // and a drill must not pass on the load that was left.
    samples.extend((0..panicked).map(|_| Sample {
        sent_at: started.elapsed(),
        latency: Duration::ZERO,
        failure: Some(CLIENT_PANICKED.into()),
        worker: None,
        method: String::new(),
    }));
    Report { samples }
}

async fn send(
    builder: reqwest::RequestBuilder,
    sent_at: Duration,
    started: Instant,
    method: String,
) -> Sample {
    let result = builder.send().await;
    let (failure, worker) = match result {
        Ok(response) => {
            let worker = response
                .headers()
                .get("x-herd-worker")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let status = response.status();
            // Read the whole body: a response cut mid-body is a failure users would see.
            let body = response.bytes().await;
            let failure = match (status.is_server_error(), body) {
                (true, _) => Some(format!("status {}", status.as_u16())),
                (false, Err(error)) => Some(classify(&error)),
                (false, Ok(_)) => None,
            };
            (failure, worker)
        }
        Err(error) => (Some(classify(&error)), None),
    };
    Sample {
        sent_at,
        latency: started.elapsed().saturating_sub(sent_at),
        failure,
        worker,
        method,
    }
}

fn classify(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".into()
    } else if error.is_connect() {
        "connect".into()
    } else if error.is_body() || error.is_decode() {
        "body".into()
    } else {
        "request".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ms: u64, failure: Option<&str>) -> Sample {
        Sample {
            sent_at: Duration::ZERO,
            latency: Duration::from_millis(ms),
            failure: failure.map(str::to_string),
            worker: Some("w1".into()),
            method: "GET".into(),
        }
    }

    #[tokio::test]
    async fn a_client_that_panics_is_a_failure() {
        let plan = Plan {
            rate: 200,
            duration: Duration::from_millis(200),
            concurrency: 2,
            timeout: Duration::from_secs(1),
        };
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        // Port 1 on loopback: refused at once. Client 1 panics on its second request.
        let report = run(&plan, &client, |c, n| {
            assert_ne!(n, 3, "a bug in the load's request builder");
            c.get("http://127.0.0.1:1/")
        })
        .await;
        assert_eq!(report.failures_by_kind().get(CLIENT_PANICKED), Some(&1));
        assert_eq!(report.failed(), report.sent());
    }

    #[test]
    fn report_counts_and_quantiles() {
        let report = Report {
            samples: vec![
                sample(1, None),
                sample(2, None),
                sample(3, Some("status 502")),
                sample(100, Some("timeout")),
            ],
        };
        assert_eq!(report.sent(), 4);
        assert_eq!(report.failed(), 2);
        assert_eq!(report.failures_by_kind()["timeout"], 1);
        assert_eq!(report.by_worker()["w1"], 2);
        assert_eq!(report.max_latency(), Duration::from_millis(100));
        assert_eq!(report.latency_quantile(0.0), Duration::from_millis(1));
    }

    #[test]
    fn plan_bound_is_rate_times_duration() {
        let plan = Plan {
            rate: 500,
            duration: Duration::from_secs(3),
            concurrency: 8,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(plan.max_requests(), 1500);
    }
}
