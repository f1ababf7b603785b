//! The Markdown tables of `herd bench`: per scenario, the median over rounds of every
//! (target, concurrency), the latency herd adds over going direct, the proxies' CPU per request
//! and memory, what the rest of the machine spent per request beside each (the upstreams, the
//! load generator), with a CPU budget how much of it each proxy used, then herd's throughput
//! (not at a steady rate, where every target serves the same) and CPU per request as ratios of
//! HAProxy's and nginx's (and the range of those ratios round by round).

use std::fmt::Write;

use super::health::HealthResult;
use super::proxy::{ProxyResults, Run, Scenario};
use super::targets::TargetKind;

/// The median of `values` (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

/// The medians of one (scenario, target, concurrency).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The target.
    pub target: TargetKind,
    /// Requests in flight.
    pub concurrency: u32,
    /// Runs the medians are over (those that produced figures).
    pub runs: usize,
    /// Runs that produced no figures.
    pub failed: usize,
    /// Median req/s.
    pub rps: f64,
    /// Median p50, ms.
    pub p50_ms: f64,
    /// Median p99, ms.
    pub p99_ms: f64,
    /// Median CPU seconds per 10k requests (proxies only).
    pub cpu_per_10k: Option<f64>,
    /// Median share of that CPU time spent in the kernel, 0 to 1 (proxies only).
    pub kernel_share: Option<f64>,
    /// Median CPU µs per request of the upstream side (workers, Redis).
    pub upstream_us: Option<f64>,
    /// Median CPU µs per request of the load generator.
    pub load_us: Option<f64>,
    /// Median share of its CPU budget the proxy used (`--proxy-cpus`).
    pub budget_used: Option<f64>,
    /// Median share of the quota's periods in which the proxy was held back (`--proxy-cpus`).
    pub throttled_share: Option<f64>,
    /// Largest RSS at the end of a run, KiB.
    pub rss_end_kib: Option<u64>,
    /// Largest peak RSS (VmHWM), KiB.
    pub rss_peak_kib: Option<u64>,
    /// Non-2xx responses, summed over the runs.
    pub non_2xx: u64,
    /// Socket errors, summed over the runs.
    pub socket_errors: u64,
}

impl Row {
    /// The proxy's median CPU µs per request (proxies only).
    pub fn cpu_us(&self) -> Option<f64> {
        self.cpu_per_10k.map(|cpu| cpu * 100.0)
    }
}

/// The rows of `scenario`, in target order, then by concurrency.
pub fn rows(results: &ProxyResults, scenario: Scenario) -> Vec<Row> {
    let mut rows = Vec::new();
    for &target in &results.options.targets {
        for &concurrency in &results.options.concurrency {
            let all: Vec<&Run> = results
                .runs
                .iter()
                .filter(|r| {
                    r.scenario == scenario && r.target == target && r.concurrency == concurrency
                })
                .collect();
            if all.is_empty() {
                continue;
            }
            let runs: Vec<&Run> = all.iter().copied().filter(|r| r.succeeded()).collect();
            let of =
                |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
            let cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_per_10k()).collect();
            let kernel: Vec<f64> = runs.iter().filter_map(|r| r.kernel_share()).collect();
            let upstream: Vec<f64> = runs.iter().filter_map(|r| r.upstream_us()).collect();
            let load: Vec<f64> = runs.iter().filter_map(|r| r.load_us()).collect();
            let budget: Vec<f64> = runs.iter().filter_map(|r| r.budget_used).collect();
            let throttled: Vec<f64> = runs.iter().filter_map(|r| r.throttled_share).collect();
            rows.push(Row {
                target,
                concurrency,
                runs: runs.len(),
                failed: all.len() - runs.len(),
                rps: of(&|r| r.load.rps).unwrap_or(0.0),
                p50_ms: of(&|r| r.load.p50_ms).unwrap_or(0.0),
                p99_ms: of(&|r| r.load.p99_ms).unwrap_or(0.0),
                cpu_per_10k: median(&cpu),
                kernel_share: median(&kernel),
                upstream_us: median(&upstream),
                load_us: median(&load),
                budget_used: median(&budget),
                throttled_share: median(&throttled),
                rss_end_kib: runs.iter().filter_map(|r| r.rss_end_kib).max(),
                rss_peak_kib: runs.iter().filter_map(|r| r.rss_peak_kib).max(),
                non_2xx: runs.iter().map(|r| r.load.non_2xx).sum(),
                socket_errors: runs.iter().map(|r| r.load.socket_errors).sum(),
            });
        }
    }
    rows
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "—".into(), |kib| format!("{:.1}", kib as f64 / 1024.0))
}

fn thousands(value: f64) -> String {
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The whole proxy report: one table per scenario, then the ratios.
pub fn proxy_markdown(results: &ProxyResults) -> String {
    let options = &results.options;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "herd bench proxy: {} round(s) × {:?} per run, {} load threads, {} upstreams ({}), {} CPUs (herd-gateway: one serving thread each); medians over rounds\n",
        options.rounds,
        options.duration,
        options.threads,
        super::proxy::UPSTREAMS,
        options.upstream.name(),
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
    );
    if let Some(rate) = options.rate {
        let _ = writeln!(
            out,
            "A steady {rate} requests a second in all, spread over the connections (c; h2load `--rps`, `--h1` for HTTP/1.1): every target serves the same, so CPU per request and latency are the figures.\n"
        );
    }
    if let Some(gateway) = &results.gateway {
        let _ = writeln!(out, "herd-gateway: `{}`\n", gateway.display());
    }
    if let Some(cpus) = options.proxy_cpus {
        let _ = writeln!(
            out,
            "Every proxy held to {cpus} CPU (a cgroup CPU quota per {} ms): req/s is what that much CPU serves, where a proxy used its whole budget (see \"budget used\"); p99 includes the waits for the next share. Direct is not held.\n",
            super::cpu_budget::PERIOD.as_millis()
        );
    }
    for &scenario in &options.scenarios {
        let rows = rows(results, scenario);
        if rows.is_empty() {
            continue;
        }
        let idle = results.idle_rss_kib.get(&scenario);
        let pace = if options.rate.is_some() {
            ", steady rate"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "### {} — {} ({}{pace})\n",
            scenario.name(),
            scenario.describe(),
            scenario.generator(options.rate).label()
        );
        let _ = writeln!(
            out,
            "| target | c | req/s | p50 ms | p99 ms | p99 added vs direct ms | CPU s / 10k req | CPU µs / req | kernel % of CPU | RSS MiB idle / end / peak | non-2xx / socket errors |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in &rows {
            let failed = match row.failed {
                0 => String::new(),
                n => format!(" ({n} run{} failed)", if n == 1 { "" } else { "s" }),
            };
            if row.runs == 0 {
                let _ = writeln!(
                    out,
                    "| {} | {} | failed | — | — | — | — | — | — | — | —{failed} |",
                    row.target.name(),
                    row.concurrency
                );
                continue;
            }
            let direct = rows.iter().find(|r| {
                r.target == TargetKind::Direct && r.concurrency == row.concurrency && r.runs > 0
            });
            let added = match (row.target, direct) {
                (TargetKind::Direct, _) | (_, None) => "—".to_string(),
                (_, Some(direct)) => format!("{:+.2}", row.p99_ms - direct.p99_ms),
            };
            let (cpu, us) = match (row.cpu_per_10k, row.cpu_us()) {
                (Some(cpu), Some(us)) => (format!("{cpu:.3}"), format!("{us:.1}")),
                _ => ("—".into(), "—".into()),
            };
            let kernel = row
                .kernel_share
                .map_or_else(|| "—".to_string(), |share| format!("{:.0}", share * 100.0));
            let rss = if row.target == TargetKind::Direct {
                "—".to_string()
            } else {
                format!(
                    "{} / {} / {}",
                    mib(idle.and_then(|idle| idle.get(&row.target)).copied()),
                    mib(row.rss_end_kib),
                    mib(row.rss_peak_kib)
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} / {}{failed} |",
                row.target.name(),
                row.concurrency,
                thousands(row.rps),
                row.p50_ms,
                row.p99_ms,
                added,
                cpu,
                us,
                kernel,
                rss,
                row.non_2xx,
                row.socket_errors
            );
        }
        machine_split(&mut out, &rows);
        if options.proxy_cpus.is_some() {
            budget_table(&mut out, &rows);
        }
        let mut ratios = Vec::new();
        // At a steady rate every target serves the same req/s.
        let metrics: &[Metric] = match options.rate {
            None => &[Metric::Rps, Metric::CpuPerRequest],
            Some(_) => &[Metric::CpuPerRequest],
        };
        for &metric in metrics {
            for peer in [TargetKind::Haproxy, TargetKind::Nginx] {
                if let Some(line) = ratio_line(results, &rows, scenario, metric, peer) {
                    ratios.push(line);
                }
            }
        }
        if !ratios.is_empty() {
            let _ = writeln!(out, "\n{}", ratios.join("; "));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "c: requests in flight. CPU: the proxy's run time over all its processes and threads during the run, as the scheduler counts it (ns); kernel %: the system time's share of it (10 ms ticks). RSS: summed over its processes, after start (idle), after the run (end), highest (peak, VmHWM). Non-2xx: wrk counts status ≥ 400, h2load anything but 2xx."
    );
    out
}

/// A figure herd is compared on, as a ratio of a peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    /// Requests a second.
    Rps,
    /// The proxy's CPU per request (seconds per 10 000 requests, as rows and runs keep it).
    CpuPerRequest,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::Rps => "req/s",
            Metric::CpuPerRequest => "CPU per request",
        }
    }

    fn of_row(self, row: &Row) -> Option<f64> {
        match self {
            Metric::Rps => Some(row.rps),
            Metric::CpuPerRequest => row.cpu_per_10k,
        }
    }

    fn of_run(self, run: &Run) -> Option<f64> {
        match self {
            Metric::Rps => Some(run.load.rps),
            Metric::CpuPerRequest => run.cpu_per_10k(),
        }
    }
}

/// `herd / PEER METRIC: c=64 0.93× (rounds 0.90–0.97), …`: herd's median over `peer`'s at each
/// concurrency, and the spread of the round-by-round ratios. `None` where they never both ran.
fn ratio_line(
    results: &ProxyResults,
    rows: &[Row],
    scenario: Scenario,
    metric: Metric,
    peer: TargetKind,
) -> Option<String> {
    let parts: Vec<String> = (results.options.concurrency.iter())
        .filter_map(|&c| {
            let median = |target| {
                rows.iter()
                    .find(|r| r.target == target && r.concurrency == c && r.runs > 0)
                    .and_then(|r| metric.of_row(r))
            };
            let (herd, other) = (median(TargetKind::Herd)?, median(peer)?);
            let spread = match round_ratios(results, scenario, c, peer, metric).as_slice() {
                [first, .., last] => format!(" (rounds {first:.2}–{last:.2})"),
                _ => String::new(),
            };
            (other > 0.0).then(|| format!("c={c} {:.2}×{spread}", herd / other))
        })
        .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "herd / {} {}: {}",
            peer.name(),
            metric.label(),
            parts.join(", ")
        )
    })
}

/// herd's `metric` over `peer`'s in each round where both ran (interleaved, so a slow patch of
/// the machine hits both), sorted.
fn round_ratios(
    results: &ProxyResults,
    scenario: Scenario,
    concurrency: u32,
    peer: TargetKind,
    metric: Metric,
) -> Vec<f64> {
    let figure = |target, round| {
        results
            .runs
            .iter()
            .find(|r| {
                r.scenario == scenario
                    && r.concurrency == concurrency
                    && r.target == target
                    && r.round == round
                    && r.succeeded()
            })
            .and_then(|r| metric.of_run(r))
    };
    let mut ratios: Vec<f64> = (1..=results.options.rounds)
        .filter_map(|round| Some((figure(TargetKind::Herd, round)?, figure(peer, round)?)))
        .filter(|&(_, other)| other > 0.0)
        .map(|(herd, other)| herd / other)
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios
}

/// The CPU per request of every part of the machine beside each target, and how many CPUs were
/// busy in all: on one machine the proxy, the upstreams and the load generator share the CPUs,
/// so where they are all busy, req/s is the CPUs over the sum, and a proxy's share of it bounds
/// how much faster than a peer it can be.
fn machine_split(out: &mut String, rows: &[Row]) {
    if rows.iter().all(|row| row.load_us.is_none()) {
        return;
    }
    let _ = writeln!(
        out,
        "\nCPU µs per request over the machine (medians): the proxy, the upstream side (workers, Redis), the load generator\n"
    );
    let _ = writeln!(
        out,
        "| target | c | proxy | upstream side | load generator | all | CPUs busy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let figure = |value: Option<f64>| value.map_or_else(|| "—".to_string(), |v| format!("{v:.1}"));
    for row in rows.iter().filter(|row| row.runs > 0) {
        let proxy = row.cpu_us();
        let all = match (row.target, proxy, row.upstream_us, row.load_us) {
            (TargetKind::Direct, _, Some(upstream), Some(load)) => Some(upstream + load),
            (_, Some(proxy), Some(upstream), Some(load)) => Some(proxy + upstream + load),
            _ => None,
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.target.name(),
            row.concurrency,
            figure(proxy),
            figure(row.upstream_us),
            figure(row.load_us),
            figure(all),
            all.map_or_else(
                || "—".to_string(),
                |all| format!("{:.2}", all * row.rps / 1e6)
            ),
        );
    }
}

/// How much of its CPU budget each proxy used, and how often the quota held it back: a run
/// whose proxy used less than [`BUDGET_BOUND`] of its budget was bound by the rest of the
/// machine, not by the budget, and is marked so.
fn budget_table(out: &mut String, rows: &[Row]) {
    let _ = writeln!(
        out,
        "\nThe proxy's CPU budget (medians): used (its CPU over the budget for the run's length), and the share of the quota's periods in which it used its whole share and waited\n"
    );
    let _ = writeln!(
        out,
        "| target | c | budget used % | held back % of periods |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let percent =
        |value: Option<f64>| value.map_or_else(|| "—".to_string(), |v| format!("{:.0}", v * 100.0));
    for row in rows
        .iter()
        .filter(|row| row.runs > 0 && row.target != TargetKind::Direct)
    {
        let unbound = match row.budget_used {
            Some(used) if used < BUDGET_BOUND => {
                " (not bound by its budget: the rest of the machine held req/s)"
            }
            _ => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {}{unbound} | {} |",
            row.target.name(),
            row.concurrency,
            percent(row.budget_used),
            percent(row.throttled_share),
        );
    }
}

/// The share of its budget under which a proxy is taken as not bound by it.
const BUDGET_BOUND: f64 = 0.9;

/// The health-check cost report.
pub fn health_markdown(result: &HealthResult) -> String {
    let mut out = String::new();
    let checks = match (result.checks_per_sec, result.expected_checks_per_sec) {
        (Some(observed), _) => format!("{observed:.0}"),
        (None, expected) => format!("n/a (expected {expected:.0})"),
    };
    let _ = writeln!(
        out,
        "herd bench health: {} registered workers, {:?} without client traffic, default health settings\n",
        result.workers, result.duration
    );
    let _ = writeln!(
        out,
        "| workers | up | checks/s | failed checks | gateway CPU % of one core | CPU s | RSS MiB (end / peak) |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        out,
        "| {} | {} | {} | {} | {:.2} | {:.2} | {} / {} |",
        result.workers,
        result.up,
        checks,
        result.check_failures,
        result.cpu_percent,
        result.cpu_seconds,
        mib(Some(result.rss_kib)),
        mib(Some(result.peak_kib))
    );
    let verdict = if result.cpu_percent < 5.0 {
        "met"
    } else {
        "NOT met"
    };
    let _ = if result.workers == 1000 {
        writeln!(
            out,
            "\ntarget (< 5 % of a core for 1000 workers): {verdict} ({:.2} %)",
            result.cpu_percent
        )
    } else {
        writeln!(
            out,
            "\ntarget: < 5 % of a core for 1000 workers; this run: {:.2} % for {} (≈ {:.2} % per 1000 if it grows linearly)",
            result.cpu_percent,
            result.workers,
            result.cpu_percent * 1000.0 / f64::from(result.workers.max(1))
        )
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::loadgen::LoadResult;
    use crate::bench::proxy::ProxyOptions;
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn health_table_and_verdict() {
        let mut result = HealthResult {
            workers: 1000,
            up: 1000,
            duration: Duration::from_secs(10),
            cpu_seconds: 0.3,
            cpu_percent: 3.0,
            rss_kib: 20_480,
            peak_kib: 30_720,
            checks_per_sec: None,
            expected_checks_per_sec: 2000.0,
            check_failures: 0,
        };
        let table = health_markdown(&result);
        assert!(
            table.contains("| 1000 | 1000 | n/a (expected 2000) | 0 | 3.00 | 0.30 | 20.0 / 30.0 |"),
            "{table}"
        );
        assert!(
            table.contains("(< 5 % of a core for 1000 workers): met (3.00 %)"),
            "{table}"
        );
        result.workers = 20;
        result.checks_per_sec = Some(39.6);
        result.cpu_percent = 0.5;
        let table = health_markdown(&result);
        assert!(table.contains("| 20 | 1000 | 40 |"), "{table}");
        assert!(table.contains("≈ 25.00 % per 1000"), "{table}");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
    }

    /// Options of a hello run at c=64, 10 s per run.
    fn hello_at_64(targets: Vec<TargetKind>, rounds: u32, proxy_cpus: Option<f64>) -> ProxyOptions {
        ProxyOptions {
            scenarios: vec![Scenario::Hello],
            targets,
            concurrency: vec![64],
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            rounds,
            threads: 2,
            h2_streams: 1,
            upstream: crate::bench::targets::UpstreamServer::HerdWorker,
            proxy_cpus,
            rate: None,
        }
    }

    fn run(target: TargetKind, round: u32, rps: f64, p99: f64) -> Run {
        Run {
            scenario: Scenario::Hello,
            round,
            concurrency: 64,
            target,
            load: LoadResult {
                requests: (rps * 10.0) as u64,
                rps,
                p50_ms: 1.0,
                p99_ms: p99,
                non_2xx: 0,
                socket_errors: 0,
                bytes_read: (rps * 10.0) as u64 * 200,
            },
            cpu_seconds: (target != TargetKind::Direct).then_some(5.0),
            cpu_system_seconds: (target != TargetKind::Direct).then_some(3.75),
            upstream_cpu_seconds: Some(2.0),
            load_cpu_seconds: Some(1.0),
            budget_used: None,
            throttled_share: None,
            rss_end_kib: (target != TargetKind::Direct).then_some(10_240),
            rss_peak_kib: (target != TargetKind::Direct).then_some(20_480),
            error: None,
        }
    }

    #[test]
    fn table_has_medians_added_latency_and_ratios() {
        let results = ProxyResults {
            options: hello_at_64(
                vec![
                    TargetKind::Direct,
                    TargetKind::Herd,
                    TargetKind::Haproxy,
                    TargetKind::Nginx,
                ],
                3,
                None,
            ),
            idle_rss_kib: BTreeMap::from([(
                Scenario::Hello,
                BTreeMap::from([(TargetKind::Herd, 5120)]),
            )]),
            runs: vec![
                run(TargetKind::Direct, 1, 50_000.0, 2.0),
                run(TargetKind::Direct, 2, 40_000.0, 3.0),
                run(TargetKind::Direct, 3, 60_000.0, 1.0),
                run(TargetKind::Herd, 1, 20_000.0, 5.0),
                run(TargetKind::Haproxy, 1, 25_000.0, 4.0),
                Run {
                    error: Some("h2load overran".into()),
                    ..run(TargetKind::Nginx, 1, 0.0, 0.0)
                },
            ],
            gateway: Some("/opt/herd/pgo/herd-gateway".into()),
        };
        let rows = rows(&results, Scenario::Hello);
        assert_eq!(rows.len(), 4);
        assert_eq!((rows[3].runs, rows[3].failed), (0, 1));
        assert_eq!(rows[0].rps, 50_000.0);
        assert_eq!(rows[0].runs, 3);
        let table = proxy_markdown(&results);
        assert!(
            table.contains("herd-gateway: `/opt/herd/pgo/herd-gateway`"),
            "the table says which gateway build ran: {table}"
        );
        assert!(
            table.contains("| direct | 64 | 50,000 | 1.00 | 2.00 | — | — | — | — | — | 0 / 0 |"),
            "{table}"
        );
        // 5 CPU s for 200k requests = 0.25 s / 10k = 25 µs per request, 3.75 s of it the kernel's.
        assert!(table.contains("| herd | 64 | 20,000 | 1.00 | 5.00 | +3.00 | 0.250 | 25.0 | 75 | 5.0 / 10.0 / 20.0 | 0 / 0 |"), "{table}");
        assert!(
            table.contains("herd / haproxy req/s: c=64 0.80×"),
            "{table}"
        );
        // 25 µs a request against HAProxy's 20 (the same CPU for 25k requests a second).
        assert!(
            table.contains("herd / haproxy CPU per request: c=64 1.25×"),
            "{table}"
        );
        assert!(!table.contains("A steady"), "{table}");
        // Beside herd: 2 s of the upstreams' CPU and 1 s of the load generator's for 200k
        // requests, 10 and 5 µs each; 40 µs in all at 20k req/s keep 0.8 CPUs busy. Direct's
        // medians over its three rounds (400k-600k requests): 4 and 2 µs.
        assert!(
            table.contains("| herd | 64 | 25.0 | 10.0 | 5.0 | 40.0 | 0.80 |"),
            "{table}"
        );
        assert!(
            table.contains("| direct | 64 | — | 4.0 | 2.0 | 6.0 | 0.30 |"),
            "{table}"
        );
        // nginx's one run failed: no figures, so no row in the split.
        let (_, split) = table.split_once("over the machine").unwrap();
        assert!(!split.contains("| nginx |"), "{table}");
        assert!(
            !table.contains("budget"),
            "no budget, no budget table: {table}"
        );
    }

    #[test]
    fn a_steady_rate_compares_cpu_per_request_not_req_per_second() {
        let mut options = hello_at_64(vec![TargetKind::Herd, TargetKind::Nginx], 2, None);
        options.rate = Some(400);
        // herd 5 CPU s for 4 000 requests in round 1, 4 s in round 2; nginx 4 s in both.
        let at = |target, round, cpu| Run {
            cpu_seconds: Some(cpu),
            ..run(target, round, 400.0, 1.0)
        };
        let results = ProxyResults {
            options,
            idle_rss_kib: BTreeMap::new(),
            runs: vec![
                at(TargetKind::Herd, 1, 5.0),
                at(TargetKind::Nginx, 1, 4.0),
                at(TargetKind::Herd, 2, 4.0),
                at(TargetKind::Nginx, 2, 4.0),
            ],
            gateway: None,
        };
        let table = proxy_markdown(&results);
        assert!(table.contains("A steady 400 requests a second"), "{table}");
        assert!(
            table.contains("hello app (h2load --h1, steady rate)"),
            "{table}"
        );
        assert!(!table.contains("req/s: c="), "{table}");
        assert!(
            table.contains("herd / nginx CPU per request: c=64 1.12× (rounds 1.00–1.25)"),
            "{table}"
        );
    }

    #[test]
    fn a_cpu_budget_gets_its_table_and_unbound_runs_are_marked() {
        let held = |target, used, throttled| Run {
            budget_used: Some(used),
            throttled_share: Some(throttled),
            ..run(target, 1, 20_000.0, 5.0)
        };
        let results = ProxyResults {
            options: hello_at_64(
                vec![TargetKind::Direct, TargetKind::Herd, TargetKind::Haproxy],
                2,
                Some(0.25),
            ),
            idle_rss_kib: BTreeMap::new(),
            runs: vec![
                run(TargetKind::Direct, 1, 50_000.0, 2.0),
                held(TargetKind::Herd, 0.984, 0.4),
                held(TargetKind::Haproxy, 0.5, 0.0),
                run(TargetKind::Herd, 2, 30_000.0, 5.0),
                run(TargetKind::Haproxy, 2, 20_000.0, 5.0),
            ],
            gateway: None,
        };
        let table = proxy_markdown(&results);
        assert!(table.contains("Every proxy held to 0.25 CPU"), "{table}");
        // Medians 25k / 20k; per round 20k / 20k and 30k / 20k.
        assert!(
            table.contains("herd / haproxy req/s: c=64 1.25× (rounds 1.00–1.50)"),
            "{table}"
        );
        assert!(table.contains("| herd | 64 | 98 | 40 |"), "{table}");
        assert!(
            table.contains("| haproxy | 64 | 50 (not bound by its budget"),
            "{table}"
        );
        let (_, budget) = table.split_once("CPU budget (medians)").unwrap();
        assert!(
            !budget.contains("| direct |"),
            "direct is not held: {table}"
        );
    }
}
