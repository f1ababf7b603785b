//! `herd bench proxy`: herd-gateway, HAProxy and nginx in front of the same two upstreams, and
//! the first upstream on its own ("direct", the baseline for added latency), in one run.
//!
//! For each scenario: start the upstreams and every target, read each proxy's idle memory, warm
//! each target up, then for each round, for each concurrency, for each target in turn (so a slow
//! patch of the shared machine hits every target alike), one bounded load run. Each run records
//! the load generator's figures and the proxy's CPU seconds and memory (see [`super::sample`]).
//! Everything is stopped before the next scenario starts. With `proxy_cpus` every proxy starts
//! inside a CPU budget of its own ([`super::cpu_budget`]), so that it alone bounds req/s. With
//! `rate` the load comes at a steady pace instead of as fast as answers come (h2load `--rps`;
//! `--h1` for the HTTP/1.1 scenarios): light load, where the CPU per request is what counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cpu_budget::CpuBudget;
use super::loadgen::{Generator, Load, LoadResult, Tools};
use super::targets::{
    KeyKind, Target, TargetKind, TlsFiles, UpstreamApp, UpstreamServer, Upstreams,
};
use super::{BenchError, Stop, sample};

/// Upstream workers behind every proxy.
pub const UPSTREAMS: usize = 2;

/// The body of the `api` scenario's requests: an order, as a shop's API takes one.
pub const API_BODY: &str = r#"{"user":"ann","items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}],"note":"leave at the door"}"#;

/// What a scenario loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// HTTP/1.1 `GET /` of the hello app (no Redis).
    Hello,
    /// HTTP/1.1 `GET /` of the hello app with `Connection: close`: a new TCP connection per
    /// request, as clients without keep-alive make them (scripts, HTTP/1.0 clients, checkers).
    Close,
    /// HTTP/1.1 `GET /me` of the demo app with a session cookie (a Redis read per request).
    Session,
    /// HTTP/1.1 `POST /` of the hello app with a small JSON body ([`API_BODY`]), as an API's
    /// requests come (wrk, through a script).
    Api,
    /// HTTP/1.1 `GET /page` of the hello app: a 64 KiB answer (`herd_shared::page`), what a
    /// page or an API's list weighs.
    Page,
    /// HTTP/2 cleartext (prior knowledge) `GET /` of the hello app, with h2load.
    H2,
    /// HTTPS keep-alive `GET /` of the hello app, ECDSA P-256 certificate (wrk).
    TlsEcdsa,
    /// HTTPS keep-alive `GET /` of the hello app, RSA 2048 certificate (wrk).
    TlsRsa,
    /// A new HTTPS connection per request (full handshake, no resumption), ECDSA P-256.
    TlsEcdsaHandshake,
    /// A new HTTPS connection per request (full handshake, no resumption), RSA 2048.
    TlsRsaHandshake,
    /// HTTP/2 over TLS (ALPN h2), keep-alive `GET /` of the hello app, ECDSA P-256, with
    /// h2load: what browsers speak to a site.
    TlsH2,
    /// [`Scenario::TlsH2`] with what a browser sends on every request ([`BROWSER_HEADERS`]:
    /// 13 lines, cookies among them, 651 bytes as HTTP/1.1 lines): the headers a proxy decodes,
    /// keeps and passes on for each request of a real site, which h2load's own (none but the
    /// pseudo-headers) leave out.
    Browser,
}

/// The request headers of the `browser` scenario: Chrome 131 on Linux loading a page of a shop
/// it has cookies for, as its developer tools show them.
pub const BROWSER_HEADERS: [&str; 13] = [
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.9",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Referer: https://shop.example.com/cart",
    "sec-ch-ua: \"Chromium\";v=\"131\", \"Not_A Brand\";v=\"24\"",
    "sec-ch-ua-mobile: ?0",
    "sec-ch-ua-platform: \"Linux\"",
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Upgrade-Insecure-Requests: 1",
    "Cookie: herd_session=3f9a1c2e8b7d4f60a5e1c9b2d7f3a8e4; _ga=GA1.1.1234567890.1733400000; theme=dark",
];

impl Scenario {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Hello => "hello",
            Scenario::Close => "close",
            Scenario::Session => "session",
            Scenario::Api => "api",
            Scenario::Page => "page",
            Scenario::H2 => "h2",
            Scenario::TlsEcdsa => "tls-ecdsa",
            Scenario::TlsRsa => "tls-rsa",
            Scenario::TlsEcdsaHandshake => "tls-ecdsa-handshake",
            Scenario::TlsRsaHandshake => "tls-rsa-handshake",
            Scenario::TlsH2 => "tls-h2",
            Scenario::Browser => "browser",
        }
    }

    /// The certificate key of a TLS scenario, and whether each request makes a new connection.
    pub fn tls(self) -> Option<(KeyKind, bool)> {
        match self {
            Scenario::Hello
            | Scenario::Close
            | Scenario::Session
            | Scenario::Api
            | Scenario::Page
            | Scenario::H2 => None,
            Scenario::TlsEcdsa | Scenario::TlsH2 | Scenario::Browser => {
                Some((KeyKind::EcdsaP256, false))
            }
            Scenario::TlsRsa => Some((KeyKind::Rsa2048, false)),
            Scenario::TlsEcdsaHandshake => Some((KeyKind::EcdsaP256, true)),
            Scenario::TlsRsaHandshake => Some((KeyKind::Rsa2048, true)),
        }
    }

    /// One line saying what is loaded, for the table's heading (the report adds the load
    /// generator).
    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Hello => "HTTP/1.1 `GET /` → hello app",
            Scenario::Close => {
                "HTTP/1.1 `GET /` with `Connection: close`, a new connection per request → hello \
                 app"
            }
            Scenario::Session => {
                "HTTP/1.1 `GET /me` with a session cookie → demo app, session read from Redis"
            }
            Scenario::Api => "HTTP/1.1 `POST /` with a 95-byte JSON body → hello app",
            Scenario::Page => "HTTP/1.1 `GET /page` → hello app, a 64 KiB answer",
            Scenario::H2 => "HTTP/2 cleartext, prior knowledge, `GET /` → hello app",
            Scenario::TlsEcdsa => "HTTPS keep-alive `GET /` → hello app, ECDSA P-256",
            Scenario::TlsRsa => "HTTPS keep-alive `GET /` → hello app, RSA 2048",
            Scenario::TlsEcdsaHandshake => {
                "HTTPS, new connection + full handshake per request, ECDSA P-256"
            }
            Scenario::TlsRsaHandshake => {
                "HTTPS, new connection + full handshake per request, RSA 2048"
            }
            Scenario::TlsH2 => {
                "HTTP/2 over TLS (ALPN h2), keep-alive `GET /` → hello app, ECDSA P-256"
            }
            Scenario::Browser => {
                "HTTP/2 over TLS (ALPN h2), `GET /` with a browser's 13 request headers and its \
                 cookies → hello app, ECDSA P-256"
            }
        }
    }

    fn app(self, server: UpstreamServer) -> UpstreamApp {
        match (self, server) {
            (Scenario::Session, _) => UpstreamApp::Demo,
            (_, UpstreamServer::HerdWorker) => UpstreamApp::Hello,
            (_, UpstreamServer::Hyper) => UpstreamApp::PlainHyper,
            (_, UpstreamServer::Node) => UpstreamApp::Node,
        }
    }

    /// The load generator, as fast as answers come (`rate` `None`) or at a steady rate.
    pub fn generator(self, rate: Option<u32>) -> Generator {
        match (self, rate) {
            (Scenario::H2 | Scenario::TlsH2 | Scenario::Browser, _) => Generator::H2load,
            (_, None) => Generator::Wrk,
            (_, Some(_)) => Generator::H2loadHttp1,
        }
    }

    /// Whether every request opens a connection of its own: h2load keeps its connections, so
    /// such a scenario has no steady-rate run.
    fn connection_per_request(self) -> bool {
        matches!(self, Scenario::Close) || self.tls().is_some_and(|(_, handshake)| handshake)
    }

    fn path(self) -> &'static str {
        match self {
            Scenario::Session => "/me",
            Scenario::Page => herd_shared::page::PATH,
            _ => "/",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyOptions {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Targets, in the order each round visits them.
    pub targets: Vec<TargetKind>,
    /// Requests in flight per run.
    pub concurrency: Vec<u32>,
    /// Length of one run.
    #[serde(serialize_with = "as_seconds")]
    pub duration: Duration,
    /// Warm-up per target before the first round (0 = none).
    #[serde(serialize_with = "as_seconds")]
    pub warmup: Duration,
    /// Rounds; the table shows the median over them.
    pub rounds: u32,
    /// Load generator threads.
    pub threads: u32,
    /// HTTP/2 streams per connection in the h2 scenario.
    pub h2_streams: u32,
    /// What the upstreams run.
    pub upstream: UpstreamServer,
    /// The CPU budget every proxy is held to (`--proxy-cpus`, see [`super::cpu_budget`]);
    /// `None`: as much as it takes.
    pub proxy_cpus: Option<f64>,
    /// Requests a second in all, at a steady pace (`--rate`); `None`: as many as the targets
    /// answer.
    pub rate: Option<u32>,
}

fn as_seconds<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

/// One load run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The scenario.
    pub scenario: Scenario,
    /// Round number, from 1.
    pub round: u32,
    /// Requests in flight.
    pub concurrency: u32,
    /// The target.
    pub target: TargetKind,
    /// What the load generator reported.
    #[serde(flatten)]
    pub load: LoadResult,
    /// The proxy's CPU seconds during the run (all its processes); `None` for direct.
    pub cpu_seconds: Option<f64>,
    /// Of those, the seconds spent in the kernel (system time).
    pub cpu_system_seconds: Option<f64>,
    /// The upstream side's CPU seconds during the run (the workers, and Redis): on one machine
    /// they share the CPUs with the proxy and the load generator.
    pub upstream_cpu_seconds: Option<f64>,
    /// The load generator's CPU seconds (`None` where `/proc/self/stat` could not be read).
    pub load_cpu_seconds: Option<f64>,
    /// The proxy's CPU over its budget for the run's length, 0 to 1 (`--proxy-cpus` only):
    /// near 1, the budget bound the run's req/s; well below, the rest of the machine did.
    pub budget_used: Option<f64>,
    /// The share of the quota's periods with work in which the proxy used all of its share and
    /// waited (`--proxy-cpus` only).
    pub throttled_share: Option<f64>,
    /// The proxy's RSS right after the run, KiB.
    pub rss_end_kib: Option<u64>,
    /// The proxy's peak RSS so far (VmHWM), KiB.
    pub rss_peak_kib: Option<u64>,
    /// Why the run produced no figures (the load generator failed or overran its bound).
    pub error: Option<String>,
}

impl Run {
    /// Whether the run produced figures.
    pub fn succeeded(&self) -> bool {
        self.error.is_none()
    }

    /// CPU seconds per 10 000 requests.
    pub fn cpu_per_10k(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.load.requests > 0).then(|| cpu * 10_000.0 / self.load.requests as f64)
    }

    /// `seconds` of CPU over the run's requests, in µs per request.
    fn per_request_us(&self, seconds: f64) -> Option<f64> {
        (self.load.requests > 0).then(|| seconds * 1e6 / self.load.requests as f64)
    }

    /// The upstream side's CPU µs per request.
    pub fn upstream_us(&self) -> Option<f64> {
        self.per_request_us(self.upstream_cpu_seconds?)
    }

    /// The load generator's CPU µs per request.
    pub fn load_us(&self) -> Option<f64> {
        self.per_request_us(self.load_cpu_seconds?)
    }

    /// The kernel's share of the run's CPU time, 0 to 1.
    pub fn kernel_share(&self) -> Option<f64> {
        let (cpu, system) = (self.cpu_seconds?, self.cpu_system_seconds?);
        (cpu > 0.0).then(|| (system / cpu).min(1.0))
    }
}

/// Everything one `herd bench proxy` measured.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyResults {
    /// The options it ran with.
    pub options: ProxyOptions,
    /// Each proxy's RSS after start, before any load, KiB, per scenario.
    pub idle_rss_kib: BTreeMap<Scenario, BTreeMap<TargetKind, u64>>,
    /// Every run, in the order they ran.
    pub runs: Vec<Run>,
    /// The herd-gateway executable the herd targets ran (`HERD_BIN_DIR` may pick a
    /// profile-guided build, `infra/build-pgo.sh`); `None` without a herd target.
    pub gateway: Option<PathBuf>,
}

impl ProxyResults {
    /// Runs that produced no figures.
    pub fn failed_runs(&self) -> usize {
        self.runs.iter().filter(|run| !run.succeeded()).count()
    }
}

/// Runs every scenario of `options`, with configs and logs in `dir`; `progress` gets a line per
/// step.
pub fn run(
    options: &ProxyOptions,
    dir: &Path,
    stop: &Stop,
    progress: &mut dyn FnMut(String),
) -> Result<ProxyResults, BenchError> {
    if options.targets.is_empty() || options.concurrency.is_empty() || options.rounds == 0 {
        return Err(BenchError::Usage(
            "need at least one target, one concurrency and one round".into(),
        ));
    }
    if options.upstream != UpstreamServer::HerdWorker
        && options.scenarios.contains(&Scenario::Session)
    {
        return Err(BenchError::Usage(format!(
            "--upstream {} serves hello on every path: it has no sessions, so the session scenario needs --upstream herd-worker",
            options.upstream.name()
        )));
    }
    if options.rate.is_some()
        && let Some(scenario) = (options.scenarios.iter()).find(|s| s.connection_per_request())
    {
        return Err(BenchError::Usage(format!(
            "--rate runs with h2load, which keeps its connections, so the {} scenario (a new connection per request) has no steady-rate run: leave it out, or drop --rate",
            scenario.name()
        )));
    }
    if let Some(rate) = options.rate {
        check_rate(rate, options)?;
    }
    let h2_scenario = (options.scenarios.iter()).find(|s| s.generator(None) == Generator::H2load);
    if let Some(scenario) = h2_scenario
        && options.upstream == UpstreamServer::Node
        && options.targets.contains(&TargetKind::Direct)
    {
        return Err(BenchError::Usage(format!(
            "--upstream node speaks HTTP/1.1 only, so the {} scenario has no direct baseline (HTTP/2 straight to an upstream): leave direct out of --targets, or use --upstream hyper",
            scenario.name()
        )));
    }
    let tools = Tools::ensure(
        (options.scenarios.iter())
            .any(|scenario| scenario.generator(options.rate) != Generator::Wrk),
    )?;
    let mut results = ProxyResults {
        options: options.clone(),
        idle_rss_kib: BTreeMap::new(),
        runs: Vec::new(),
        gateway: if options.targets.iter().any(|target| target.is_herd()) {
            Some(crate::binaries::locate(crate::binaries::GATEWAY)?)
        } else {
            None
        },
    };
    for &scenario in &options.scenarios {
        stop.check()?;
        let scenario_dir = dir.join(scenario.name());
        std::fs::create_dir_all(&scenario_dir)
            .map_err(|source| BenchError::io("create", &scenario_dir, source))?;
        run_scenario(
            scenario,
            options,
            &tools,
            &scenario_dir,
            stop,
            progress,
            &mut results,
        )?;
    }
    Ok(results)
}

/// Whether `rate` holds at every scenario and concurrency of `options`: h2load sends each
/// connection's first request at once and paces the rest, so a connection's share must be at
/// least one request a second (at `--rate 1 --concurrency 64` it sent 64 a second).
fn check_rate(rate: u32, options: &ProxyOptions) -> Result<(), BenchError> {
    for &scenario in &options.scenarios {
        let generator = scenario.generator(Some(rate));
        for &concurrency in &options.concurrency {
            let connections = generator.connections(concurrency, options.h2_streams);
            if rate < connections {
                return Err(BenchError::Usage(format!(
                    "--rate {rate} is less than one request a second on each of the {connections} connections of the {} scenario at concurrency {concurrency}: h2load sends every connection's first request at once, so the rate would not hold; lower --concurrency or raise --rate",
                    scenario.name()
                )));
            }
        }
    }
    Ok(())
}

fn run_scenario(
    scenario: Scenario,
    options: &ProxyOptions,
    tools: &Tools,
    dir: &Path,
    stop: &Stop,
    progress: &mut dyn FnMut(String),
    results: &mut ProxyResults,
) -> Result<(), BenchError> {
    progress(format!(
        "{}: starting upstreams and targets",
        scenario.name()
    ));
    let upstreams = Upstreams::start(scenario.app(options.upstream), UPSTREAMS, dir)?;
    let mut headers = match scenario {
        Scenario::Session => vec![format!("Cookie: {}", upstreams.login("bench")?)],
        Scenario::Browser => BROWSER_HEADERS.map(String::from).to_vec(),
        // wrk opens a new connection after each answer that closes its own.
        Scenario::Close => vec!["Connection: close".into()],
        _ => Vec::new(),
    };
    // One certificate for all three proxies; a handshake scenario closes every connection
    // after its response (wrk then reconnects) and turns session resumption off everywhere.
    let tls = match scenario.tls() {
        Some((key, handshake)) => {
            if handshake {
                headers.push("Connection: close".into());
            }
            Some(TlsFiles::make(key, !handshake, dir)?)
        }
        None => None,
    };
    let mut targets = Vec::new();
    for &kind in &options.targets {
        stop.check()?;
        let budget = match options.proxy_cpus {
            Some(cpus) if kind != TargetKind::Direct => {
                let cgroup = format!("herd-bench-{}-{}", std::process::id(), kind.name());
                Some(CpuBudget::create(&cgroup, cpus)?)
            }
            _ => None,
        };
        targets.push(Target::start(kind, &upstreams, dir, tls.as_ref(), budget)?);
    }
    // Let the proxies' first health checks and connection set-up pass before reading memory.
    stop.sleep(Duration::from_millis(500))?;
    let idle = results.idle_rss_kib.entry(scenario).or_default();
    for target in &targets {
        if let Some(usage) = target.usage() {
            idle.insert(target.kind, usage.rss_kib);
        }
    }
    let load_for = |target: &Target, concurrency: u32, duration: Duration| {
        let (scheme, addr) = match (scenario, target.tls) {
            (Scenario::H2, _) => ("http", target.h2),
            (_, Some(tls)) if scenario.tls().is_some() => ("https", tls),
            _ => ("http", target.h1),
        };
        Load {
            url: format!("{scheme}://{addr}{}", scenario.path()),
            concurrency,
            duration,
            threads: options.threads,
            headers: headers.clone(),
            h2_streams: options.h2_streams,
            body: (scenario == Scenario::Api).then_some(API_BODY),
            rate: options.rate,
        }
    };
    let generator = scenario.generator(options.rate);
    if !options.warmup.is_zero() {
        let busiest = options.concurrency.iter().copied().max().unwrap_or(64);
        for target in &targets {
            progress(format!(
                "{}: warming up {} ({:?})",
                scenario.name(),
                target.kind.name(),
                options.warmup
            ));
            let name = format!("warmup-{}", target.kind.name());
            match tools.run(
                generator,
                &load_for(target, busiest, options.warmup),
                &name,
                dir,
                stop,
            ) {
                Ok(_) => {}
                Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
                // Not measured: say so and go on; the measured runs will show the trouble.
                Err(error) => progress(format!(
                    "{}: warm-up of {} failed: {error}",
                    scenario.name(),
                    target.kind.name()
                )),
            }
        }
    }
    for round in 1..=options.rounds {
        for &concurrency in &options.concurrency {
            for target in &mut targets {
                stop.check()?;
                let name = format!("r{round}-c{concurrency}-{}", target.kind.name());
                let before = target.usage();
                let upstream_before = upstreams.cpu_seconds();
                let load_before = sample::reaped_children_seconds();
                let throttling_before = target.budget().and_then(CpuBudget::throttling);
                let started = Instant::now();
                let outcome = tools.run(
                    generator,
                    &load_for(target, concurrency, options.duration),
                    &name,
                    dir,
                    stop,
                );
                let elapsed = started.elapsed().as_secs_f64();
                let after = target.usage();
                let throttled_share = throttling_before
                    .zip(target.budget().and_then(CpuBudget::throttling))
                    .and_then(|(before, after)| after.share_since(before));
                let upstream_cpu_seconds = upstream_before
                    .zip(upstreams.cpu_seconds())
                    .map(|(before, after)| (after - before).max(0.0));
                let load_cpu_seconds = load_before
                    .zip(sample::reaped_children_seconds())
                    .map(|(before, after)| (after - before).max(0.0));
                // One failed run (e.g. a load generator that hangs on a target) is recorded and
                // reported; the other targets are still measured.
                let (load, error) = match outcome {
                    Ok(load) => (load, None),
                    Err(BenchError::Interrupted) => return Err(BenchError::Interrupted),
                    Err(error) => (LoadResult::default(), Some(error.to_string())),
                };
                if !target.is_running() {
                    return Err(BenchError::Setup(format!(
                        "{} exited during {name}; last log lines:\n{}",
                        target.kind.name(),
                        target.log_tail()
                    )));
                }
                let cpu_seconds = before
                    .zip(after)
                    .map(|(before, after)| (after.cpu_seconds - before.cpu_seconds).max(0.0));
                let budget_used = target
                    .budget()
                    .zip(cpu_seconds)
                    .filter(|_| elapsed > 0.0)
                    .map(|(budget, cpu)| cpu / (budget.cpus() * elapsed));
                let run = Run {
                    scenario,
                    round,
                    concurrency,
                    target: target.kind,
                    cpu_seconds,
                    cpu_system_seconds: before.zip(after).map(|(before, after)| {
                        (after.system_seconds - before.system_seconds).max(0.0)
                    }),
                    upstream_cpu_seconds,
                    load_cpu_seconds,
                    budget_used,
                    throttled_share,
                    rss_end_kib: after.map(|usage| usage.rss_kib),
                    rss_peak_kib: after.map(|usage| usage.peak_kib),
                    load,
                    error,
                };
                match &run.error {
                    None => progress(format!(
                        "{} round {round} c={concurrency} {}: {:.0} req/s, p99 {:.2} ms, errors {}",
                        scenario.name(),
                        target.kind.name(),
                        run.load.rps,
                        run.load.p99_ms,
                        run.load.errors()
                    )),
                    Some(error) => progress(format!(
                        "{} round {round} c={concurrency} {}: FAILED: {error}",
                        scenario.name(),
                        target.kind.name()
                    )),
                }
                results.runs.push(run);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_headers_are_header_lines_a_proxy_passes_on() {
        let mut names = std::collections::HashSet::new();
        for line in BROWSER_HEADERS {
            let (name, value) = line.split_once(": ").expect("name: value");
            hyper::http::HeaderName::from_bytes(name.as_bytes()).expect("a header name");
            hyper::http::HeaderValue::from_str(value).expect("a header value");
            let name = name.to_ascii_lowercase();
            // Nothing the proxies handle themselves (hop-by-hop, framing, the target).
            let own = [
                "connection",
                "host",
                "content-length",
                "transfer-encoding",
                "te",
            ];
            assert!(!own.contains(&name.as_str()), "{name}");
            assert!(names.insert(name), "twice");
        }
        let bytes: usize = BROWSER_HEADERS.iter().map(|line| line.len() + 2).sum();
        assert_eq!(bytes, 651, "as the scenario's doc says");
        assert_eq!(Scenario::Browser.generator(None), Generator::H2load);
        assert_eq!(Scenario::Browser.tls(), Some((KeyKind::EcdsaP256, false)));
    }

    #[test]
    fn the_json_names_a_scenario_as_the_command_line_does() {
        for scenario in <Scenario as clap::ValueEnum>::value_variants() {
            let json = serde_json::to_value(scenario).unwrap();
            assert_eq!(json, scenario.name(), "{scenario:?}");
            let flag = clap::ValueEnum::to_possible_value(scenario).unwrap();
            assert_eq!(flag.get_name(), scenario.name(), "{scenario:?}");
        }
    }

    #[test]
    fn a_steady_rate_runs_every_scenario_with_h2load() {
        assert_eq!(Scenario::Hello.generator(None), Generator::Wrk);
        assert_eq!(Scenario::Hello.generator(Some(400)), Generator::H2loadHttp1);
        assert_eq!(
            Scenario::TlsEcdsa.generator(Some(400)),
            Generator::H2loadHttp1
        );
        assert_eq!(Scenario::H2.generator(Some(400)), Generator::H2load);
        let steady: Vec<Scenario> = <Scenario as clap::ValueEnum>::value_variants()
            .iter()
            .copied()
            .filter(|s| !s.connection_per_request())
            .collect();
        assert!(!steady.contains(&Scenario::Close));
        assert!(!steady.contains(&Scenario::TlsRsaHandshake));
        assert!(steady.contains(&Scenario::TlsRsa) && steady.contains(&Scenario::Session));
    }

    #[test]
    fn a_steady_rate_needs_a_request_a_second_on_every_connection() {
        let options = ProxyOptions {
            scenarios: vec![Scenario::H2, Scenario::Hello],
            targets: vec![TargetKind::Herd],
            concurrency: vec![8, 64],
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            rounds: 1,
            threads: 1,
            h2_streams: 8,
            upstream: UpstreamServer::HerdWorker,
            proxy_cpus: None,
            rate: Some(8),
        };
        let message = check_rate(8, &options).unwrap_err().to_string();
        // HTTP/1.1 at c=64 is 64 connections.
        assert!(
            message.contains("64 connections of the hello scenario"),
            "{message}"
        );
        let h2_only = ProxyOptions {
            scenarios: vec![Scenario::H2],
            ..options.clone()
        };
        // h2 at c=64 is 8 connections of 8 streams: 8 a second holds, 7 does not.
        assert!(check_rate(8, &h2_only).is_ok());
        assert!(check_rate(7, &h2_only).is_err());
        let dir = tempfile::tempdir().unwrap();
        let error = run(&options, dir.path(), &Stop::default(), &mut |_| {}).unwrap_err();
        assert!(error.to_string().contains("--rate 8"), "{error}");
    }

    #[test]
    fn a_steady_rate_refuses_a_connection_per_request() {
        let options = ProxyOptions {
            scenarios: vec![Scenario::Hello, Scenario::TlsEcdsaHandshake],
            targets: vec![TargetKind::Herd],
            concurrency: vec![4],
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            rounds: 1,
            threads: 1,
            h2_streams: 1,
            upstream: UpstreamServer::HerdWorker,
            proxy_cpus: None,
            rate: Some(400),
        };
        let dir = tempfile::tempdir().unwrap();
        let error = run(&options, dir.path(), &Stop::default(), &mut |_| {}).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("tls-ecdsa-handshake"), "{message}");
        assert!(message.contains("--rate"), "{message}");
    }
}
