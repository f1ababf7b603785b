//! A drill's report: the figures drawn from the samples, what the gateways counted, the verdict
//! against the documented targets, and its three renderings (terminal, Markdown, JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::Kind;
use super::target::GatewayInfo;
use super::traffic::{Failure, Op, Sample, SessionCheck};

/// PASS, FAIL, or not applicable to this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every target met.
    Pass,
    /// A target missed (or the drill could not run as it should).
    Fail,
    /// The cluster can't have this fault (e.g. no standby gateway).
    NotApplicable,
}

impl Outcome {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::NotApplicable => "N/A",
        }
    }
}

/// Requests sent and failed, by failure kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Requests sent.
    pub sent: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Failed, by kind (`refused`, `timeout`, `5xx`, `other`).
    pub by_kind: BTreeMap<&'static str, usize>,
}

impl Counts {
    fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Counts {
        let mut counts = Counts::default();
        for sample in samples {
            counts.sent += 1;
            if let Some(failure) = sample.failure {
                counts.failed += 1;
                *counts.by_kind.entry(failure.name()).or_insert(0) += 1;
            }
        }
        counts
    }

    fn kinds(&self) -> String {
        if self.by_kind.is_empty() {
            return String::new();
        }
        let kinds: Vec<String> = Failure::ALL
            .iter()
            .filter_map(|k| {
                self.by_kind
                    .get(k.name())
                    .map(|n| format!("{} {n}", k.name()))
            })
            .collect();
        format!(" ({})", kinds.join(", "))
    }
}

/// What one gateway counted during the drill (after minus before; a gateway that restarted
/// counts from its restart).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewaySaw {
    /// Its name.
    pub name: String,
    /// Its role at the end (`active`, `standby`, … or `unknown`).
    pub role: String,
    /// Its failover epoch before and after.
    pub epoch: (Option<u64>, Option<u64>),
    /// Role changes.
    pub role_changes: u64,
    /// Retries to another worker.
    pub retries: u64,
    /// Workers taken out of service (down, ejected, unreachable).
    pub ejections: u64,
    /// Whether its admin API answered after the drill.
    pub answered: bool,
}

/// The sum of every sample of `family` in Prometheus text whose labels contain all of `labels`.
fn metric_sum(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels.iter().all(|label| rest.contains(label)) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// The hedge delay a gateway's `/metrics` text says it uses now (0: hedging off).
pub fn hedge_delay(text: &str) -> Option<Duration> {
    metric_sum(text, "herd_gateway_hedge_delay_seconds", &[])
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// When a gateway whose `/metrics` text this is last became active, as its
/// `herd_gateway_failover_last_transition_timestamp_seconds{to="active"}` says.
pub fn became_active_at(text: &str) -> Option<std::time::SystemTime> {
    metric_sum(
        text,
        "herd_gateway_failover_last_transition_timestamp_seconds",
        &["to=\"active\""],
    )
    .and_then(|s| Duration::try_from_secs_f64(s).ok())
    .filter(|since| !since.is_zero())
    .and_then(|since| std::time::UNIX_EPOCH.checked_add(since))
}

/// Milliseconds from the fault (at `fault_at`, wall clock) to the moment a gateway other than
/// `faulted` last became active, after the fault: when the standby took the role over (and,
/// with a floating address, announced it). `None` when none did.
pub fn took_over_ms(
    after: &[GatewayInfo],
    faulted: &str,
    fault_at: std::time::SystemTime,
) -> Option<f64> {
    after
        .iter()
        .filter(|gateway| gateway.name != faulted)
        .filter_map(|gateway| became_active_at(gateway.metrics.as_deref()?))
        .filter_map(|at| at.duration_since(fault_at).ok())
        .min()
        .map(ms)
}

/// How long users waited around a hung worker: the quick idempotent requests (not the slow
/// burst) sent before the fault, and those sent while it was in place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HangWait {
    /// p99 of the quick idempotent requests sent before the fault: the normal latency.
    pub normal_p99: Duration,
    /// The longest wait of a quick idempotent request sent while the worker was hung.
    pub longest: Duration,
}

/// The 99th percentile of `sorted` (zero when empty).
fn p99(sorted: &[Duration]) -> Duration {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * 0.99).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// [`HangWait`] for a fault in place from `fault_at` to `undone_at`.
pub fn hang_wait(samples: &[Sample], fault_at: Duration, undone_at: Duration) -> HangWait {
    let quick = |s: &&Sample| s.op.idempotent() && s.op != Op::GetSlow;
    let mut before: Vec<Duration> = samples
        .iter()
        .filter(quick)
        .filter(|s| s.sent_at < fault_at)
        .map(|s| s.latency)
        .collect();
    before.sort();
    let normal_p99 = p99(&before);
    let longest = samples
        .iter()
        .filter(quick)
        .filter(|s| s.sent_at >= fault_at && s.sent_at < undone_at)
        .map(|s| s.latency)
        .max()
        .unwrap_or_default();
    HangWait {
        normal_p99,
        longest,
    }
}

/// Requests that met the fault: in flight at some moment from `from` to `until` (sent by
/// `until`, answered from `from` on). None means the drill tested nothing (`--rate 1` over a
/// 300 ms Redis restart).
pub fn met_the_fault(samples: &[Sample], from: Duration, until: Duration) -> usize {
    samples
        .iter()
        .filter(|s| s.sent_at <= until && s.done_at() >= from)
        .count()
}

/// Requests in flight to worker `id`, as a gateway's `/metrics` text says.
pub fn in_flight(text: &str, id: &str) -> Option<f64> {
    let label = format!("worker=\"{id}\"");
    metric_sum(text, "herd_gateway_worker_in_flight", &[&label])
}

fn role_of(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| l.starts_with("herd_gateway_failover_role{"))
        .find(|l| l.ends_with(" 1"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_string)
}

/// The samples of `family` in Prometheus text whose labels contain all of `labels`: each
/// series' labels (`{…}`, empty without) and value.
fn metric_series<'a>(text: &'a str, family: &str, labels: &[&str]) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(family)?;
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            if !labels.iter().all(|label| rest.contains(label)) {
                return None;
            }
            let (series, value) = rest.rsplit_once(' ')?;
            Some((series.trim(), value.parse::<f64>().ok()?))
        })
        .collect()
}

/// How much the counters of `family` (those with all of `labels`) went up from `before` to
/// `after`, series by series. A series lower than before counted from zero again (its gateway
/// restarted): all of it is new. A series gone since (a worker removed from the registry takes
/// its series with it) adds nothing: summing the family instead read such a drop as a restart.
fn counter_increase(
    before: Option<&str>,
    after: Option<&str>,
    family: &str,
    labels: &[&str],
) -> u64 {
    let Some(after) = after else {
        return 0;
    };
    let before = before
        .map(|text| metric_series(text, family, labels))
        .unwrap_or_default();
    metric_series(after, family, labels)
        .into_iter()
        .map(|(series, now)| {
            let then = before
                .iter()
                .find(|(old, _)| *old == series)
                .map_or(0.0, |(_, value)| *value);
            let increase = if now >= then { now - then } else { now };
            increase as u64
        })
        .sum()
}

/// What each gateway saw between `before` and `after`.
pub fn gateways_saw(before: &[GatewayInfo], after: &[GatewayInfo]) -> Vec<GatewaySaw> {
    after
        .iter()
        .map(|now| {
            let old = before
                .iter()
                .find(|b| b.name == now.name)
                .and_then(|b| b.metrics.as_deref());
            let new = now.metrics.as_deref();
            let increase = |family, labels: &[&str]| counter_increase(old, new, family, labels);
            let epoch = |text: Option<&str>| {
                metric_sum(text?, "herd_gateway_failover_epoch", &[]).map(|v| v as u64)
            };
            // Summed over workers by the gateway, so a worker ejected and then restarted under
            // a new incarnation (its own series dropped) still counts; the per-worker family
            // for a gateway from before that sum.
            let family =
                if new.is_some_and(|text| text.contains("herd_gateway_state_changes_total")) {
                    "herd_gateway_state_changes_total"
                } else {
                    "herd_gateway_worker_state_changes_total"
                };
            let ejections = ["to=\"down\"", "to=\"ejected\"", "to=\"unreachable\""]
                .iter()
                .map(|to| increase(family, &[to]))
                .sum();
            GatewaySaw {
                name: now.name.clone(),
                role: new
                    .and_then(role_of)
                    .unwrap_or_else(|| if now.active { "active" } else { "unknown" }.into()),
                epoch: (epoch(old), epoch(new)),
                role_changes: increase("herd_gateway_failover_transitions_total", &[]),
                retries: increase("herd_gateway_retries_total", &[]),
                ejections,
                answered: new.is_some(),
            }
        })
        .collect()
}

/// A drill's full report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The drill.
    pub drill: Kind,
    /// The cluster it ran on.
    pub cluster: String,
    /// What it set out to show.
    pub hypothesis: String,
    /// The fault, as injected (`SIGKILL worker w1 (pid 123)`), and how it was undone.
    pub fault: String,
    /// Seconds from the load's start to the fault.
    pub fault_at_s: f64,
    /// Seconds from the load's start to the undoing (if it was undone during the load).
    pub undone_at_s: Option<f64>,
    /// Load length in seconds and rate.
    pub duration_s: f64,
    /// Requests per second.
    pub rate: u32,
    /// All requests.
    pub requests: Counts,
    /// By method (`GET`, `POST`).
    pub by_method: BTreeMap<&'static str, Counts>,
    /// Failed idempotent requests (GETs).
    pub idempotent_failed: usize,
    /// Milliseconds from the fault to the first success of a request sent after it (via
    /// another gateway for the gateway drills).
    pub first_success_ms: Option<f64>,
    /// Milliseconds from the fault until every request succeeds again.
    pub recovery_ms: Option<f64>,
    /// Gateway drills: milliseconds from the fault to the moment another gateway last became
    /// active, by its own clock, as its metrics say after the load (a floating address is
    /// claimed and announced just before). `None` when the gateway that is not the faulted one
    /// did not become active after the fault (or has since handed the role back).
    pub took_over_ms: Option<f64>,
    /// Longest request, in milliseconds.
    pub max_latency_ms: f64,
    /// p99 latency in milliseconds.
    pub p99_ms: f64,
    /// The gateway's request timeout, in milliseconds (no request may wait longer).
    pub request_timeout_ms: f64,
    /// Sessions checked / lost.
    pub sessions: SessionCheck,
    /// What the gateways counted.
    pub gateways: Vec<GatewaySaw>,
    /// Requests answered per worker.
    pub by_worker: BTreeMap<String, usize>,
    /// The first failed requests, one by one (all of them in `requests`).
    pub failed_requests: Vec<FailedRequest>,
    /// Other facts (a drained worker that had to be killed, a restore that failed…).
    pub notes: Vec<String>,
    /// PASS / FAIL / N/A.
    pub verdict: Outcome,
    /// Why (every missed target), or what was met.
    pub reason: String,
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// A failed request, as a report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct FailedRequest {
    /// `GET` / `POST`.
    pub method: &'static str,
    /// What it asked for.
    pub path: &'static str,
    /// When it was sent, in milliseconds from the fault (negative: before it).
    pub sent_from_fault_ms: f64,
    /// How long until it failed.
    pub latency_ms: f64,
    /// The gateway that answered, if one did.
    pub gateway: Option<String>,
    /// Its kind (`refused`, `timeout`, `5xx`, `other`).
    pub kind: &'static str,
    /// What the client saw: the error with its causes, or the status.
    pub detail: String,
}

impl FailedRequest {
    /// One line of a text report.
    fn line(&self) -> String {
        format!(
            "{} {} sent {:+} ms from the fault, failed after {} ms via {}: {}",
            self.method,
            self.path,
            self.sent_from_fault_ms,
            self.latency_ms,
            self.gateway.as_deref().unwrap_or("-"),
            self.detail,
        )
    }
}

/// The first `limit` failed requests: a failed drill says what failed, not only how many.
pub fn failed_requests(samples: &[Sample], fault_at: Duration, limit: usize) -> Vec<FailedRequest> {
    samples
        .iter()
        .filter_map(|s| Some((s, s.failure?)))
        .take(limit)
        .map(|(s, failure)| FailedRequest {
            method: s.op.method(),
            path: s.op.path(),
            sent_from_fault_ms: if s.sent_at >= fault_at {
                ms(s.sent_at - fault_at)
            } else {
                -ms(fault_at - s.sent_at)
            },
            latency_ms: ms(s.latency),
            gateway: s.gateway.clone(),
            kind: failure.name(),
            detail: s.detail.clone().unwrap_or_default(),
        })
        .collect()
}

/// Figures of the samples around a fault at `fault_at`.
pub struct Figures {
    /// All requests.
    pub requests: Counts,
    /// By method.
    pub by_method: BTreeMap<&'static str, Counts>,
    /// Failed idempotent requests.
    pub idempotent_failed: usize,
    /// Fault → first success (sent after it), from `other_than`'s gateway when given.
    pub first_success: Option<Duration>,
    /// Fault → every request succeeds from then on.
    pub recovery: Option<Duration>,
    /// Requests were still failing when the load ended: a failure after the fault and no
    /// success (through any gateway) sent after it.
    pub failing_at_end: bool,
    /// Slowest request.
    pub max_latency: Duration,
    /// p99.
    pub p99: Duration,
    /// Answers per worker.
    pub by_worker: BTreeMap<String, usize>,
}

/// Computes the figures; `other_than` is the gateway that was faulted (a success only counts
/// as recovery when another one answered it).
pub fn figures(samples: &[Sample], fault_at: Duration, other_than: Option<&str>) -> Figures {
    let mut by_method = BTreeMap::new();
    for method in ["GET", "POST"] {
        let counts = Counts::of(samples.iter().filter(|s| s.op.method() == method));
        if counts.sent > 0 {
            by_method.insert(method, counts);
        }
    }
    let ok_after = |s: &&Sample| {
        s.failure.is_none()
            && s.sent_at >= fault_at
            && other_than.is_none_or(|g| s.gateway.as_deref() != Some(g))
    };
    let first_success = samples
        .iter()
        .filter(ok_after)
        .map(|s| s.done_at().saturating_sub(fault_at))
        .min();
    // The last failure touching the fault's time; recovery is the first success sent after it.
    let last_failure = samples
        .iter()
        .filter(|s| s.failure.is_some() && s.done_at() >= fault_at)
        .map(|s| s.sent_at)
        .max();
    let failing_at_end = last_failure.is_some_and(|last| {
        !samples
            .iter()
            .any(|s| s.failure.is_none() && s.sent_at > last)
    });
    let recovery = match last_failure {
        None => first_success,
        Some(last) => samples
            .iter()
            .filter(ok_after)
            .filter(|s| s.sent_at > last)
            .map(|s| s.done_at().saturating_sub(fault_at))
            .min(),
    };
    let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    latencies.sort();
    let p99 = p99(&latencies);
    let mut by_worker = BTreeMap::new();
    for sample in samples.iter().filter(|s| s.failure.is_none()) {
        let worker = sample.worker.clone().unwrap_or_else(|| "-".into());
        *by_worker.entry(worker).or_insert(0) += 1;
    }
    Figures {
        requests: Counts::of(samples.iter()),
        by_method,
        idempotent_failed: samples
            .iter()
            .filter(|s| s.op.idempotent() && s.failure.is_some())
            .count(),
        first_success,
        recovery,
        failing_at_end,
        max_latency: latencies.last().copied().unwrap_or_default(),
        p99,
        by_worker,
    }
}

/// The targets of issue 12 (docs/drills.md), as numbers.
pub mod targets {
    use std::time::Duration;
    /// gateway-kill: first success via the standby within this.
    pub const GATEWAY_KILL_FIRST_SUCCESS: Duration = Duration::from_millis(500);
    /// gateway-machine-loss: first success via the standby within this.
    pub const GATEWAY_MACHINE_LOSS_FIRST_SUCCESS: Duration = Duration::from_secs(1);
}

/// Judges the figures against `kind`'s targets; returns the verdict and its reason.
pub fn judge(
    kind: Kind,
    figures: &Figures,
    sessions: &SessionCheck,
    request_timeout: Duration,
    extra_failures: &[String],
) -> (Outcome, String) {
    let mut missed: Vec<String> = extra_failures.to_vec();
    // Every idempotent request is a GET.
    let get_kinds = figures
        .by_method
        .get("GET")
        .map(Counts::kinds)
        .unwrap_or_default();
    let first_success_target = match kind {
        Kind::GatewayKill => Some(targets::GATEWAY_KILL_FIRST_SUCCESS),
        Kind::GatewayMachineLoss => Some(targets::GATEWAY_MACHINE_LOSS_FIRST_SUCCESS),
        _ => None,
    };
    match first_success_target {
        Some(target) => match figures.first_success {
            Some(first) if first <= target => {}
            Some(first) => missed.push(format!(
                "first success via the standby after {:.0} ms (target < {} ms)",
                ms(first),
                target.as_millis()
            )),
            None => missed.push("no request succeeded via the standby after the fault".into()),
        },
        None if figures.idempotent_failed > 0 => missed.push(format!(
            "{} idempotent requests failed{} (target 0)",
            figures.idempotent_failed, get_kinds
        )),
        None => {}
    }
    if figures.first_success.is_none() && first_success_target.is_none() {
        missed.push("no request succeeded after the fault".into());
    }
    if figures.failing_at_end {
        // Failed writes count here too: users who cannot write at the end saw it break.
        missed.push(
            "requests were still failing when the load ended (no success sent after the last \
             failure)"
                .into(),
        );
    }
    if sessions.lost > 0 {
        missed.push(format!(
            "{} of {} sessions lost ({} acknowledged cart writes missing; target 0)",
            sessions.lost, sessions.checked, sessions.writes_missing
        ));
    }
    if figures.max_latency > request_timeout {
        missed.push(format!(
            "a request waited {:.0} ms, longer than the gateway's request timeout ({} ms)",
            ms(figures.max_latency),
            request_timeout.as_millis()
        ));
    }
    if missed.is_empty() {
        let met = match first_success_target {
            Some(target) => format!(
                "first success via the standby {:.0} ms after the fault (< {} ms), {} sessions intact",
                figures.first_success.map(ms).unwrap_or_default(),
                target.as_millis(),
                sessions.checked
            ),
            None => format!(
                "0 failed idempotent requests, {} sessions intact, no request over {} ms",
                sessions.checked,
                request_timeout.as_millis()
            ),
        };
        (Outcome::Pass, met)
    } else {
        (Outcome::Fail, missed.join("; "))
    }
}

impl Report {
    /// The report for a drill that could not apply to this cluster.
    pub fn not_applicable(kind: Kind, cluster: String, why: String) -> Report {
        Report {
            drill: kind,
            cluster,
            hypothesis: kind.hypothesis(),
            fault: "none (not applicable)".into(),
            fault_at_s: 0.0,
            undone_at_s: None,
            duration_s: 0.0,
            rate: 0,
            requests: Counts::default(),
            by_method: BTreeMap::new(),
            idempotent_failed: 0,
            first_success_ms: None,
            recovery_ms: None,
            took_over_ms: None,
            max_latency_ms: 0.0,
            p99_ms: 0.0,
            request_timeout_ms: 0.0,
            sessions: SessionCheck::default(),
            gateways: Vec::new(),
            by_worker: BTreeMap::new(),
            failed_requests: Vec::new(),
            notes: Vec::new(),
            verdict: Outcome::NotApplicable,
            reason: format!("not applicable: {why}"),
        }
    }

    /// Fills the figures in.
    pub fn set_figures(&mut self, figures: &Figures) {
        self.requests = figures.requests.clone();
        self.by_method = figures.by_method.clone();
        self.idempotent_failed = figures.idempotent_failed;
        self.first_success_ms = figures.first_success.map(ms);
        self.recovery_ms = figures.recovery.map(ms);
        self.max_latency_ms = ms(figures.max_latency);
        self.p99_ms = ms(figures.p99);
        self.by_worker = figures.by_worker.clone();
    }

    /// The report for a terminal: one screen, the verdict last.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "herd drill {} — {}", self.drill.name(), self.cluster);
        let _ = writeln!(out, "hypothesis: {}", self.hypothesis);
        if self.requests.sent > 0 {
            let undone = self
                .undone_at_s
                .map(|u| format!(", undone at {u:.1} s"))
                .unwrap_or_default();
            let _ = writeln!(out, "fault:      {}", self.fault);
            let _ = writeln!(
                out,
                "            at {:.1} s{undone}, into {:.0} s of load at {} req/s",
                self.fault_at_s, self.duration_s, self.rate
            );
            let _ = writeln!(
                out,
                "requests:   {} sent, {} failed{}",
                self.requests.sent,
                self.requests.failed,
                self.requests.kinds()
            );
            for (method, counts) in &self.by_method {
                let _ = writeln!(
                    out,
                    "  {method:<4}      {} sent, {} failed{}",
                    counts.sent,
                    counts.failed,
                    counts.kinds()
                );
            }
            let shown = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.0} ms"));
            let _ = writeln!(
                out,
                "recovery:   first success {} after the fault, all succeeding after {}",
                shown(self.first_success_ms),
                shown(self.recovery_ms)
            );
            if let Some(took_over) = self.took_over_ms {
                let _ = writeln!(
                    out,
                    "takeover:   the other gateway active {took_over:.0} ms after the fault"
                );
            }
            let _ = writeln!(
                out,
                "latency:    max {:.0} ms, p99 {:.0} ms (gateway request timeout {:.0} ms)",
                self.max_latency_ms, self.p99_ms, self.request_timeout_ms
            );
            let _ = writeln!(
                out,
                "sessions:   {} checked, {} lost ({} of {} acknowledged writes missing)",
                self.sessions.checked,
                self.sessions.lost,
                self.sessions.writes_missing,
                self.sessions.writes_acknowledged
            );
            for gateway in &self.gateways {
                let epoch = |e: Option<u64>| e.map_or("-".into(), |e| e.to_string());
                let _ = writeln!(
                    out,
                    "gateway {}: {}{}, ejections {}, retries {}, role changes {}, epoch {} → {}",
                    gateway.name,
                    gateway.role,
                    if gateway.answered {
                        ""
                    } else {
                        " (admin API silent)"
                    },
                    gateway.ejections,
                    gateway.retries,
                    gateway.role_changes,
                    epoch(gateway.epoch.0),
                    epoch(gateway.epoch.1)
                );
            }
            if !self.by_worker.is_empty() {
                let workers: Vec<String> = self
                    .by_worker
                    .iter()
                    .map(|(w, n)| format!("{w} {n}"))
                    .collect();
                let _ = writeln!(out, "answered by: {}", workers.join(", "));
            }
        }
        for failed in &self.failed_requests {
            let _ = writeln!(out, "failed:     {}", failed.line());
        }
        if self.requests.failed > self.failed_requests.len() {
            let more = self.requests.failed - self.failed_requests.len();
            let _ = writeln!(out, "failed:     {more} more");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note:       {note}");
        }
        let _ = writeln!(out, "VERDICT: {} — {}", self.verdict.name(), self.reason);
        out
    }

    /// The same as Markdown (`--out`).
    pub fn markdown(&self) -> String {
        format!(
            "## herd drill {}: {}\n\n```text\n{}```\n",
            self.drill.name(),
            self.verdict.name(),
            self.text()
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::drill::traffic::Op;

    fn sample(
        sent_ms: u64,
        latency_ms: u64,
        op: Op,
        failure: Option<Failure>,
        gateway: &str,
    ) -> Sample {
        Sample {
            sent_at: Duration::from_millis(sent_ms),
            latency: Duration::from_millis(latency_ms),
            op,
            failure,
            gateway: Some(gateway.into()),
            worker: Some("w1".into()),
            detail: failure.map(|f| f.name().to_string()),
        }
    }

    #[test]
    fn the_takeover_is_when_another_gateway_last_became_active() {
        let gateway = |name: &str, text: &str| GatewayInfo {
            name: name.into(),
            machine: "m".into(),
            active: false,
            metrics: Some(text.into()),
        };
        let fault = UNIX_EPOCH + Duration::from_millis(1_000_000_000);
        let after = [
            // The faulted one came back (as standby after an earlier takeover): not it.
            gateway(
                "gw1",
                "herd_gateway_failover_last_transition_timestamp_seconds{from=\"standby\",to=\"active\"} 1000001.0\n",
            ),
            gateway(
                "gw2",
                "# HELP x\nherd_gateway_failover_last_transition_timestamp_seconds{from=\"standby\",to=\"active\"} 1000000.3125\n",
            ),
        ];
        assert_eq!(took_over_ms(&after, "gw1", fault), Some(312.5));
        // Its last change was to standby, or before the fault: no takeover to show.
        let stepped_down = [gateway(
            "gw2",
            "herd_gateway_failover_last_transition_timestamp_seconds{from=\"active\",to=\"standby\"} 1000000.3\n",
        )];
        assert_eq!(took_over_ms(&stepped_down, "gw1", fault), None);
        let earlier = [gateway(
            "gw2",
            "herd_gateway_failover_last_transition_timestamp_seconds{from=\"standby\",to=\"active\"} 999999.0\n",
        )];
        assert_eq!(took_over_ms(&earlier, "gw1", fault), None);
        let silent = [GatewayInfo {
            metrics: None,
            ..gateway("gw2", "")
        }];
        assert_eq!(took_over_ms(&silent, "gw1", fault), None);
        let odd = [gateway(
            "gw2",
            "herd_gateway_failover_last_transition_timestamp_seconds{from=\"standby\",to=\"active\"} 1e300\n",
        )];
        assert_eq!(took_over_ms(&odd, "gw1", fault), None, "no panic either");
    }

    #[test]
    fn in_flight_reads_one_workers_gauge() {
        let text = "# TYPE herd_gateway_worker_in_flight gauge\n\
                    herd_gateway_worker_in_flight{worker=\"w1\"} 0\n\
                    herd_gateway_worker_in_flight{worker=\"w12\"} 7\n\
                    herd_gateway_worker_in_flight{worker=\"w2\"} 4\n";
        assert_eq!(in_flight(text, "w2"), Some(4.0));
        assert_eq!(in_flight(text, "w1"), Some(0.0));
        assert_eq!(in_flight(text, "w3"), None);
    }

    #[test]
    fn failed_requests_are_listed_from_the_fault_up_to_the_limit() {
        let samples = [
            sample(900, 5, Op::GetCart, Some(Failure::Other), "gw1"),
            sample(1000, 5, Op::GetWork, None, "gw1"),
            sample(1010, 2, Op::AddItem, Some(Failure::Status5xx), "gw2"),
            sample(1020, 2, Op::GetWork, Some(Failure::Timeout), "gw2"),
        ];
        let listed = failed_requests(&samples, Duration::from_secs(1), 2);
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].path, "/cart");
        assert_eq!(listed[0].sent_from_fault_ms, -100.0);
        assert_eq!(listed[0].kind, "other");
        assert_eq!(listed[1].method, "POST");
        assert_eq!(listed[1].sent_from_fault_ms, 10.0);
        assert_eq!(listed[1].gateway.as_deref(), Some("gw2"));
        assert_eq!(
            listed[1].line(),
            "POST /cart/items sent +10 ms from the fault, failed after 2 ms via gw2: 5xx"
        );
    }

    #[test]
    fn recovery_is_measured_from_the_fault_to_the_first_success_after_the_last_failure() {
        let samples = vec![
            sample(900, 10, Op::GetWork, None, "gw1"),
            sample(1000, 50, Op::GetCart, Some(Failure::Other), "gw1"),
            sample(1100, 10, Op::GetWork, None, "gw1"),
            sample(1200, 10, Op::GetCart, Some(Failure::Refused), "gw1"),
            sample(1300, 20, Op::AddItem, None, "gw2"),
        ];
        let f = figures(&samples, Duration::from_millis(1000), None);
        assert_eq!(f.first_success, Some(Duration::from_millis(110)));
        assert_eq!(f.recovery, Some(Duration::from_millis(320)));
        assert_eq!(f.idempotent_failed, 2);
        assert_eq!(f.requests.by_kind["refused"], 1);
        assert_eq!(f.by_method["POST"].sent, 1);
        // Only another gateway's answers count as recovery for a gateway drill.
        let f = figures(&samples, Duration::from_millis(1000), Some("gw1"));
        assert_eq!(f.first_success, Some(Duration::from_millis(320)));
    }

    #[test]
    fn verdicts_name_the_missed_target() {
        let samples = vec![
            sample(1000, 10, Op::GetCart, Some(Failure::Status5xx), "gw1"),
            sample(1100, 10, Op::GetWork, None, "gw1"),
        ];
        let f = figures(&samples, Duration::from_millis(1000), None);
        let sessions = SessionCheck {
            checked: 5,
            ..Default::default()
        };
        let (outcome, reason) = judge(
            Kind::WorkerKill,
            &f,
            &sessions,
            Duration::from_secs(15),
            &[],
        );
        assert_eq!(outcome, Outcome::Fail);
        assert!(
            reason.contains("1 idempotent requests failed (5xx 1)"),
            "{reason}"
        );
        let lost = SessionCheck {
            checked: 5,
            lost: 2,
            writes_acknowledged: 9,
            writes_missing: 3,
        };
        let ok = vec![sample(1100, 10, Op::GetWork, None, "gw1")];
        let f = figures(&ok, Duration::from_millis(1000), None);
        let (outcome, reason) = judge(Kind::RedisRestart, &f, &lost, Duration::from_secs(15), &[]);
        assert_eq!(outcome, Outcome::Fail);
        assert!(reason.contains("2 of 5 sessions lost"), "{reason}");
        let (outcome, _) = judge(
            Kind::WorkerHang,
            &f,
            &sessions,
            Duration::from_secs(15),
            &[],
        );
        assert_eq!(outcome, Outcome::Pass);
    }

    #[test]
    fn writes_still_failing_when_the_load_ends_fail_the_drill() {
        // Reads recover, writes never do (Redis read-only after a restart, say): no idempotent
        // request failed, yet users cannot write at the end.
        let samples = vec![
            sample(1000, 10, Op::AddItem, Some(Failure::Status5xx), "gw1"),
            sample(1100, 10, Op::GetCart, None, "gw1"),
            sample(1200, 10, Op::AddItem, Some(Failure::Status5xx), "gw1"),
        ];
        let f = figures(&samples, Duration::from_millis(1000), None);
        assert!(f.failing_at_end);
        assert_eq!(f.recovery, None);
        assert_eq!(f.idempotent_failed, 0);
        let sessions = SessionCheck {
            checked: 5,
            ..Default::default()
        };
        let judged = |f: &Figures| {
            judge(
                Kind::RedisRestart,
                f,
                &sessions,
                Duration::from_secs(15),
                &[],
            )
        };
        let (outcome, reason) = judged(&f);
        assert_eq!(outcome, Outcome::Fail);
        assert!(
            reason.contains("still failing when the load ended"),
            "{reason}"
        );
        // A write that failed at the fault, and successes after it, is a recovery.
        let recovered = [&samples[..2], &[sample(1300, 10, Op::AddItem, None, "gw2")]].concat();
        let f = figures(&recovered, Duration::from_millis(1000), None);
        assert!(!f.failing_at_end);
        assert_eq!(judged(&f).0, Outcome::Pass);
    }

    #[test]
    fn the_wait_around_a_hung_worker_counts_quick_gets_sent_while_it_hung() {
        let samples = vec![
            sample(100, 4, Op::GetWork, None, "gw1"),
            sample(200, 9, Op::GetCart, None, "gw1"),
            // While hung (1000..2000): a GET that waited, a write that waited longer (not hedged,
            // not counted), the slow burst of worker-kill (not counted).
            sample(1000, 1190, Op::GetWork, None, "gw1"),
            sample(1010, 1500, Op::AddItem, None, "gw1"),
            sample(1020, 1300, Op::GetSlow, None, "gw1"),
            // After SIGCONT.
            sample(2100, 3000, Op::GetCart, None, "gw1"),
        ];
        let wait = hang_wait(
            &samples,
            Duration::from_millis(1000),
            Duration::from_millis(2000),
        );
        assert_eq!(wait.normal_p99, Duration::from_millis(9));
        assert_eq!(wait.longest, Duration::from_millis(1190));
        let text = "# TYPE herd_gateway_hedge_delay_seconds gauge\n\
                    herd_gateway_hedge_delay_seconds 0.05\n";
        assert_eq!(hedge_delay(text), Some(Duration::from_millis(50)));
        assert_eq!(hedge_delay("herd_gateway_up 1\n"), None);
    }

    #[test]
    fn gateway_counters_come_from_the_metrics_text() {
        let before =
            "herd_gateway_retries_total{reason=\"connect\"} 2\nherd_gateway_failover_epoch 3\n";
        let after = "herd_gateway_retries_total{reason=\"connect\"} 5\nherd_gateway_retries_total{reason=\"timeout\"} 1\n\
            herd_gateway_worker_state_changes_total{worker=\"w1\",to=\"down\",source=\"active\"} 1\n\
            herd_gateway_failover_role{role=\"active\"} 1\nherd_gateway_failover_role{role=\"standby\"} 0\n\
            herd_gateway_failover_epoch 4\nherd_gateway_failover_transitions_total 1\n";
        let info = |text: &str| GatewayInfo {
            name: "gw1".into(),
            metrics: Some(text.into()),
            ..Default::default()
        };
        let saw = gateways_saw(&[info(before)], &[info(after)]);
        assert_eq!(saw[0].retries, 4);
        assert_eq!(saw[0].ejections, 1);
        assert_eq!(saw[0].role, "active");
        assert_eq!(saw[0].epoch, (Some(3), Some(4)));
        assert_eq!(saw[0].role_changes, 1);
    }

    #[test]
    fn a_removed_workers_counters_are_no_restart_and_a_restart_counts_from_zero() {
        let change = |worker: &str, n: u32| {
            format!(
                "herd_gateway_worker_state_changes_total{{worker=\"{worker}\",to=\"ejected\",source=\"passive\"}} {n}\n"
            )
        };
        let info = |text: String| GatewayInfo {
            name: "gw1".into(),
            metrics: Some(text),
            ..Default::default()
        };
        // w2 (3 ejections) left the registry and took its series along; w1 was ejected once more.
        let before = change("w1", 1) + &change("w2", 3);
        let after = change("w1", 2);
        let saw = gateways_saw(&[info(before.clone())], &[info(after)]);
        assert_eq!(
            saw[0].ejections, 1,
            "summed, 4 -> 2 read as a restart and reported 2"
        );
        // The gateway restarted: a series lower than before counted from zero, all of it new.
        let restarted = change("w2", 1);
        let saw = gateways_saw(&[info(before)], &[info(restarted)]);
        assert_eq!(saw[0].ejections, 1);
    }

    #[test]
    fn a_worker_ejected_then_restarted_as_a_new_incarnation_still_counts() {
        // Its own series went with its old incarnation; the sum over workers stays.
        let before = "herd_gateway_state_changes_total{to=\"ejected\",source=\"passive\"} 2\n\
            herd_gateway_worker_state_changes_total{worker=\"w3\",to=\"ejected\",source=\"passive\"} 2\n";
        let after = "herd_gateway_state_changes_total{to=\"ejected\",source=\"passive\"} 3\n\
            herd_gateway_state_changes_total{to=\"unreachable\",source=\"active\"} 1\n";
        let info = |text: &str| GatewayInfo {
            name: "gw1".into(),
            metrics: Some(text.into()),
            ..Default::default()
        };
        let saw = gateways_saw(&[info(before)], &[info(after)]);
        assert_eq!(saw[0].ejections, 2);
    }

    #[test]
    fn only_requests_in_flight_during_the_fault_met_it() {
        let samples = [
            sample(0, 100, Op::GetWork, None, "gw1"), // over before the fault
            sample(900, 200, Op::GetWork, None, "gw1"), // in flight as it struck
            sample(1150, 10, Op::GetWork, None, "gw1"), // sent during it
            sample(1400, 10, Op::GetWork, None, "gw1"), // sent after it was undone
        ];
        let from = Duration::from_millis(1000);
        let until = Duration::from_millis(1300);
        assert_eq!(met_the_fault(&samples, from, until), 2);
        assert_eq!(met_the_fault(&samples[..1], from, until), 0);
    }
}
