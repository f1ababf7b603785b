//! The dashboard's JSON: everything on the page in one document, with rates computed from the
//! counters the gateway keeps anyway.
//!
//! Nothing here runs per request. Each poll reads the per-worker atomics (responses by class,
//! sampled latency buckets) and the gateway-wide counters from the same Prometheus text
//! `/metrics` serves, and keeps a short history of those readings (one per second at most,
//! [`WINDOW`] long). Rates and quantiles are the difference between now and the oldest reading
//! in the window, so two browser tabs polling at once see the same figures and an idle
//! dashboard costs nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::balancer::latency::{BUCKETS, quantile};
use crate::balancer::worker::{ADMIN_DRAIN, REGISTRY_DRAIN};
use crate::balancer::{Balancer, Status};
use crate::events::Events;
use crate::failover::FailoverStatus;
use crate::metrics::Metrics;

/// How far back rates and quantiles look.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Readings closer together than this are not kept (polls faster than 1/s reuse the history).
const MIN_STEP: Duration = Duration::from_secs(1);
/// Events sent with each poll.
const EVENTS_SHOWN: usize = 50;
/// The kinds of `herd_gateway_errors_total` answered with a 5xx (see `crate::error`): the others
/// (400, 408, 413, 429, 431, 499) are the client's doing and no sign of a sick cluster.
pub const SERVER_ERROR_KINDS: [&str; 5] = [
    "no_worker_available",
    "workers_busy",
    "too_many_connections",
    "bad_gateway",
    "upstream_timeout",
];

/// Counter readings at one instant.
#[derive(Debug, Clone)]
pub struct Reading {
    at: Instant,
    requests: f64,
    gateway_errors: f64,
    retries: f64,
    budget_refused: f64,
    /// The served certificates' expiry (name, notAfter in Unix seconds); empty without TLS.
    certificates: Vec<(String, f64)>,
    workers: HashMap<String, WorkerReading>,
}

#[derive(Debug, Clone)]
struct WorkerReading {
    /// Responses by class (1xx … 5xx, error), as in `balancer::worker::CLASSES`.
    responses: [u64; 6],
    latency: [u64; BUCKETS],
}

impl WorkerReading {
    fn answers(&self) -> u64 {
        self.responses.iter().sum()
    }

    /// 5xx answers plus attempts that got no answer at all.
    fn errors(&self) -> u64 {
        self.responses[4] + self.responses[5]
    }
}

/// Reads the counters now.
pub fn read(balancer: &Balancer, metrics: &Metrics) -> Reading {
    let text = metrics.render();
    let workers = balancer
        .workers()
        .workers
        .iter()
        .map(|w| {
            let responses =
                std::array::from_fn(|i| w.counters.responses[i].load(Ordering::Relaxed));
            let reading = WorkerReading {
                responses,
                latency: w.latency.snapshot(),
            };
            (w.id().to_string(), reading)
        })
        .collect();
    Reading {
        at: Instant::now(),
        requests: sum_of(&text, "herd_gateway_request_duration_seconds_count", None),
        gateway_errors: SERVER_ERROR_KINDS
            .iter()
            .map(|kind| {
                sum_of(
                    &text,
                    "herd_gateway_errors_total",
                    Some(&format!("kind=\"{kind}\"")),
                )
            })
            .sum(),
        retries: sum_of(&text, "herd_gateway_retries_total", None),
        budget_refused: sum_of(
            &text,
            "herd_gateway_retries_refused_total",
            Some("limit=\"budget\""),
        ),
        certificates: certificates(&text),
        workers,
    }
}

/// Every `herd_gateway_tls_certificate_expiry_timestamp_seconds{name="…"}` sample in
/// Prometheus text: (name, notAfter).
fn certificates(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest =
                line.strip_prefix("herd_gateway_tls_certificate_expiry_timestamp_seconds{name=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` in Prometheus text (whose labels contain `label`, when
/// given).
fn sum_of(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.chars().next()? {
                '{' => rest.split_once("} ")?,
                ' ' => ("", &rest[1..]),
                _ => return None,
            };
            if label.is_some_and(|l| !labels.contains(l)) {
                return None;
            }
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// The recent readings.
#[derive(Debug, Default)]
pub struct History {
    readings: VecDeque<Reading>,
}

impl History {
    /// Keeps `now` if the last kept reading is old enough, drops the readings no longer needed,
    /// and returns the base for rates: the newest reading at least [`WINDOW`] old (or the oldest
    /// there is), if it is older than `now` by enough to divide by.
    pub fn base_for(&mut self, now: &Reading) -> Option<Reading> {
        let keep = self
            .readings
            .back()
            .is_none_or(|last| now.at.duration_since(last.at) >= MIN_STEP);
        if keep {
            self.readings.push_back(now.clone());
        }
        while self.readings.len() > 1 && now.at.duration_since(self.readings[1].at) >= WINDOW {
            self.readings.pop_front();
        }
        self.readings
            .front()
            .filter(|oldest| now.at.duration_since(oldest.at) >= Duration::from_millis(200))
            .cloned()
    }
}

/// Everything the page shows, as JSON.
pub fn document(
    balancer: &Balancer,
    events: &Events,
    failover: Option<&FailoverStatus>,
    now: &Reading,
    base: Option<&Reading>,
) -> Value {
    let seconds = base
        .map(|b| now.at.duration_since(b.at).as_secs_f64())
        .unwrap_or(0.0);
    let rate = |new: f64, old: f64| {
        if seconds > 0.0 {
            ((new - old).max(0.0) / seconds * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    let clock = balancer.clock().now();
    let slow_ns = balancer.selector().slow_start_ns();

    let mut machines: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut worker_5xx = 0.0;
    let mut before_5xx = 0.0;
    for worker in balancer.workers().workers.iter() {
        let Some(reading) = now.workers.get(worker.id()) else {
            continue;
        };
        let old = base.and_then(|b| b.workers.get(worker.id()));
        worker_5xx += reading.responses[4] as f64;
        before_5xx += old.map_or(0.0, |o| o.responses[4] as f64);
        let zero = [0u64; BUCKETS];
        let old_latency = old.map_or(&zero, |o| &o.latency);
        let ms = |q| {
            base.and_then(|_| quantile(old_latency, &reading.latency, q))
                .map(|s| (s * 1e5).round() / 100.0)
        };
        let status = worker.status(clock, slow_ns);
        let flags = worker.flags();
        let entry = json!({
            "id": worker.id(),
            "addr": worker.spec.addr,
            "state": status.as_str(),
            "draining": flags & (ADMIN_DRAIN | REGISTRY_DRAIN) != 0,
            "slow_start": status == Status::SlowStart,
            "weight": worker.weight(),
            "in_flight": worker.in_flight(),
            "req_per_s": rate(reading.answers() as f64, old.map_or(0.0, |o| o.answers() as f64)),
            "errors_per_s": rate(reading.errors() as f64, old.map_or(0.0, |o| o.errors() as f64)),
            "errors_total": reading.errors(),
            "p50_ms": ms(0.5),
            "p99_ms": ms(0.99),
            "ewma_ms": (worker.ewma.get(clock) / 1e4).round() / 100.0,
            "ejections": worker.counters.ejections.load(Ordering::Relaxed),
            "last_change": worker.last_change(),
        });
        let machine = if worker.spec.machine.is_empty() {
            "(static)".to_string()
        } else {
            worker.spec.machine.clone()
        };
        machines.entry(machine).or_default().push(entry);
    }
    let machines: Vec<Value> = machines
        .into_iter()
        .map(|(machine, workers)| json!({"machine": machine, "workers": workers}))
        .collect();

    let old = |f: fn(&Reading) -> f64| base.map_or(f(now), f);
    let requests = rate(now.requests, old(|r| r.requests));
    let errors = rate(
        now.gateway_errors + worker_5xx,
        old(|r| r.gateway_errors) + before_5xx,
    );
    let refused = rate(now.budget_refused, old(|r| r.budget_refused));
    let (serving, panic) = balancer.serving();
    let pair = match failover {
        Some(status) => {
            let mut value = serde_json::to_value(status).unwrap_or(Value::Null);
            value["enabled"] = Value::Bool(true);
            value
        }
        None => json!({"enabled": false}),
    };
    json!({
        "now_ms": crate::balancer::worker::unix_ms(),
        "window_s": (seconds * 10.0).round() / 10.0,
        "gateway": {
            "ready": balancer.is_ready(),
            "workers": now.workers.len(),
            "healthy": balancer.healthy_count(),
            "serving": serving,
            "panic": panic,
        },
        "pair": pair,
        "redis": {
            "registry": events.registry_reachability(),
            "lease": failover.map(|s| s.redis_reachable),
        },
        "totals": {
            "req_per_s": requests,
            "errors_per_s": errors,
            "error_rate": if requests > 0.0 { ((errors / requests).min(1.0) * 1e4).round() / 1e4 } else { 0.0 },
            "retries_per_s": rate(now.retries, old(|r| r.retries)),
            "retries_total": now.retries,
            "budget_refused_per_s": refused,
            "budget_refused_total": now.budget_refused,
            "budget": if refused > 0.0 { "exhausted" } else { "ok" },
        },
        "tls": {
            "certificates": now.certificates.iter().map(|(name, not_after)| json!({
                "name": name,
                "expires_unix_s": not_after,
                "days_left": ((not_after - crate::balancer::worker::unix_ms() as f64 / 1e3) / 86_400.0 * 10.0).round() / 10.0,
            })).collect::<Vec<_>>(),
        },
        "machines": machines,
        "events": events.recent(EVENTS_SHOWN),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_prometheus_samples_by_name_and_label() {
        let text = "# HELP x\n\
            herd_gateway_retries_total{reason=\"connect\"} 3\n\
            herd_gateway_retries_total{reason=\"status\"} 4\n\
            herd_gateway_retries_refused_total{limit=\"budget\"} 2\n\
            herd_gateway_retries_refused_total{limit=\"max_attempts\"} 5\n\
            herd_gateway_request_duration_seconds_count 10\n\
            herd_gateway_request_duration_seconds_count_other 99\n";
        assert_eq!(sum_of(text, "herd_gateway_retries_total", None), 7.0);
        assert_eq!(
            sum_of(
                text,
                "herd_gateway_retries_refused_total",
                Some("limit=\"budget\"")
            ),
            2.0
        );
        assert_eq!(
            sum_of(text, "herd_gateway_request_duration_seconds_count", None),
            10.0
        );
        assert_eq!(sum_of(text, "herd_gateway_nothing", None), 0.0);
    }

    fn reading(at: Instant, requests: f64) -> Reading {
        Reading {
            at,
            requests,
            gateway_errors: 0.0,
            retries: 0.0,
            budget_refused: 0.0,
            certificates: Vec::new(),
            workers: HashMap::new(),
        }
    }

    #[test]
    fn reads_each_certificates_expiry_by_name() {
        let text = "# HELP herd_gateway_tls_certificate_expiry_timestamp_seconds x\n\
            herd_gateway_tls_certificate_expiry_timestamp_seconds{name=\"default\"} 1900000000\n\
            herd_gateway_tls_certificate_expiry_timestamp_seconds{name=\"*.b.test\"} 1800000000\n\
            herd_gateway_tls_handshakes_total{result=\"ok\"} 3\n";
        assert_eq!(
            certificates(text),
            [
                ("default".to_string(), 1.9e9),
                ("*.b.test".to_string(), 1.8e9)
            ]
        );
        assert!(certificates("herd_gateway_requests 1\n").is_empty());
    }

    #[test]
    fn history_keeps_one_reading_a_second_within_the_window() {
        let start = Instant::now();
        let mut history = History::default();
        assert!(history.base_for(&reading(start, 0.0)).is_none());
        // Too soon after the first: not kept, the first is the base.
        let base = history
            .base_for(&reading(start + Duration::from_millis(500), 5.0))
            .unwrap();
        assert_eq!(base.requests, 0.0);
        for s in 1..=8 {
            history.base_for(&reading(start + Duration::from_secs(s), s as f64 * 10.0));
        }
        // At 8.5 s with a 5 s window the base is the newest reading at least 5 s old: 3 s.
        let base = history
            .base_for(&reading(start + Duration::from_millis(8_500), 85.0))
            .unwrap();
        assert_eq!(base.requests, 30.0);
        assert!(history.readings.len() <= 6);
    }
}
