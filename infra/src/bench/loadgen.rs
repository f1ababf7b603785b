//! The load generators of `herd bench`: `wrk` (HTTP/1.1 keep-alive) and `h2load` (HTTP/2
//! cleartext, prior knowledge; and HTTP/1.1 at a steady rate, which wrk cannot send), run as
//! bounded child processes, and the parsers of their output.
//!
//! wrk prints its own latency percentiles (`--latency`). h2load prints none, so it writes one
//! line per request to `--log-file` (start time, status, elapsed µs) and the percentiles are
//! computed from that.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, Stop};
use crate::deps::{self, Program};
use crate::process::{Process, Spec};

/// wrk, the HTTP/1.1 load generator.
pub const WRK: Program = Program {
    command: "wrk",
    package: "wrk",
};

/// h2load, the HTTP/2 load generator.
pub const H2LOAD: Program = Program {
    command: "h2load",
    package: "nghttp2-client",
};

/// How long a load run may take beyond its duration before it is killed.
const OVERRUN: Duration = Duration::from_secs(20);

/// One load run to make.
#[derive(Debug, Clone)]
pub struct Load {
    /// Full URL, e.g. `http://127.0.0.1:8080/`.
    pub url: String,
    /// Requests in flight at once (wrk connections; h2load connections × streams).
    pub concurrency: u32,
    /// How long to send.
    pub duration: Duration,
    /// Load generator threads.
    pub threads: u32,
    /// Extra request headers (`name: value`).
    pub headers: Vec<String>,
    /// HTTP/2 streams per connection (h2load only).
    pub h2_streams: u32,
    /// A JSON body: every request a `POST` with it (`GET` without).
    pub body: Option<&'static str>,
    /// Requests a second in all, spread evenly over the connections (h2load `--rps`, per
    /// connection); `None`: each connection sends as soon as it can.
    pub rate: Option<u32>,
}

/// What a load generator reported for one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadResult {
    /// Requests completed.
    pub requests: u64,
    /// Requests per second over the run.
    pub rps: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Responses that were not a success (wrk: status ≥ 400; h2load: not 2xx).
    pub non_2xx: u64,
    /// Connect, read, write errors and timeouts (h2load: failed + errored + timed out requests).
    pub socket_errors: u64,
    /// Bytes the generator read, exactly (wrk: heads and bodies, from its script's `done`, else
    /// its `… MB read` to two decimals; h2load: its traffic total, HTTP/2 framing included):
    /// over `requests`, about how long an answer was. 0 when the count is missing.
    pub bytes_read: u64,
}

impl LoadResult {
    /// Every error kind together.
    pub fn errors(&self) -> u64 {
        self.non_2xx + self.socket_errors
    }
}

/// Which load generator runs the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// wrk over HTTP/1.1.
    Wrk,
    /// h2load over HTTP/2: h2c, or h2 negotiated with ALPN for an `https` URL.
    H2load,
    /// h2load over HTTP/1.1 (`--h1`, also over TLS): how a steady rate of HTTP/1.1 requests is
    /// sent.
    H2loadHttp1,
}

impl Generator {
    /// How it is named in a table's heading.
    pub fn label(self) -> &'static str {
        match self {
            Generator::Wrk => "wrk",
            Generator::H2load => "h2load",
            Generator::H2loadHttp1 => "h2load --h1",
        }
    }

    /// Requests in flight on one connection: HTTP/1.1 has one, HTTP/2 `h2_streams`.
    pub fn streams(self, h2_streams: u32) -> u32 {
        match self {
            Generator::H2load => h2_streams.max(1),
            Generator::Wrk | Generator::H2loadHttp1 => 1,
        }
    }

    /// The connections that carry `concurrency` requests in flight.
    pub fn connections(self, concurrency: u32, h2_streams: u32) -> u32 {
        (concurrency / self.streams(h2_streams)).max(1)
    }
}

/// The load generators' executables, found (or installed) once.
#[derive(Debug, Clone)]
pub struct Tools {
    wrk: PathBuf,
    h2load: Option<PathBuf>,
}

impl Tools {
    /// Finds wrk, and h2load when `need_h2` (installing them with apt-get when missing).
    pub fn ensure(need_h2: bool) -> Result<Self, BenchError> {
        Ok(Tools {
            wrk: deps::ensure(WRK)?,
            h2load: if need_h2 {
                Some(deps::ensure(H2LOAD)?)
            } else {
                None
            },
        })
    }

    /// Runs `load` with `generator`; `name` names its output files in `dir`. Bounded: killed
    /// after the duration plus a margin, or at once when `stop` is raised.
    pub fn run(
        &self,
        generator: Generator,
        load: &Load,
        name: &str,
        dir: &Path,
        stop: &Stop,
    ) -> Result<LoadResult, BenchError> {
        let seconds = load.duration.as_secs_f64().ceil().max(1.0) as u64;
        match generator {
            Generator::Wrk => {
                if load.rate.is_some() {
                    return Err(BenchError::Usage(
                        "wrk sends as fast as answers come; a steady rate needs h2load".into(),
                    ));
                }
                let mut spec = Spec::new(name, &self.wrk, dir)
                    .arg(format!("-t{}", load.threads.min(load.concurrency).max(1)))
                    .arg(format!("-c{}", load.concurrency))
                    .arg(format!("-d{seconds}s"))
                    .arg("--latency")
                    .arg("--timeout")
                    .arg("5s");
                for header in &load.headers {
                    spec = spec.arg("-H").arg(header.clone());
                }
                let script = dir.join(format!("{name}.lua"));
                super::write_file(&script, &wrk_script(load.body))?;
                let spec = spec
                    .arg("-s")
                    .arg(script.display().to_string())
                    .arg(&load.url);
                let output = run_bounded(&spec, load.duration + OVERRUN, stop)?;
                parse_wrk(&output).ok_or_else(|| BenchError::Output {
                    tool: "wrk",
                    output: output.chars().take(2000).collect(),
                })
            }
            Generator::H2load | Generator::H2loadHttp1 => {
                let program = self
                    .h2load
                    .as_ref()
                    .ok_or_else(|| BenchError::Usage("h2load was not prepared".into()))?;
                let http1 = generator == Generator::H2loadHttp1;
                let streams = generator.streams(load.h2_streams);
                let connections = generator.connections(load.concurrency, load.h2_streams);
                let threads = load.threads.min(connections).max(1);
                let log = dir.join(format!("{name}.requests"));
                let mut spec = Spec::new(name, program, dir)
                    .arg("-t")
                    .arg(threads.to_string())
                    .arg("-c")
                    .arg(connections.to_string())
                    .arg("-m")
                    .arg(streams.to_string())
                    .arg("-D")
                    .arg(seconds.to_string())
                    .arg("-T")
                    .arg("5")
                    .arg("--log-file")
                    .arg(log.display().to_string());
                if let Some(rate) = load.rate {
                    spec = spec.arg(format!("--rps={}", per_connection_rate(rate, connections)));
                }
                let over_tls = load.url.starts_with("https://");
                if http1 {
                    spec = spec.arg("--h1");
                } else if over_tls {
                    // h2 only: a proxy that does not negotiate it fails the run instead of
                    // being measured over HTTP/1.1.
                    spec = spec.arg("--npn-list=h2");
                }
                for header in &load.headers {
                    spec = spec.arg("-H").arg(header.clone());
                }
                if let Some(body) = load.body {
                    let file = dir.join(format!("{name}.body"));
                    super::write_file(&file, body)?;
                    spec = spec
                        .arg("-d")
                        .arg(file.display().to_string())
                        .arg("-H")
                        .arg("Content-Type: application/json");
                }
                let spec = spec.arg(&load.url);
                let output = run_bounded(&spec, load.duration + OVERRUN, stop)?;
                let mut result = parse_h2load(&output).ok_or_else(|| BenchError::Output {
                    tool: "h2load",
                    output: output.chars().take(2000).collect(),
                })?;
                if over_tls && !http1 && !negotiated_h2(&output) {
                    return Err(BenchError::Tool {
                        tool: name.to_string(),
                        status: "h2 was not negotiated over TLS (ALPN)".into(),
                        log: output.chars().take(2000).collect(),
                    });
                }
                let requests = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                let (p50, p99) = h2load_percentiles(&requests);
                result.p50_ms = p50;
                result.p99_ms = p99;
                Ok(result)
            }
        }
    }
}

/// Each connection's share of `rate` requests a second, as h2load's `--rps` takes it (a
/// decimal; h2load paces each connection on its own).
fn per_connection_rate(rate: u32, connections: u32) -> String {
    let share = f64::from(rate) / f64::from(connections.max(1));
    let text = format!("{share:.6}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The line wrk's script prints at the end: the exact count of bytes read (its report rounds
/// them to two decimals of a unit: `0.86GB` is ±5 MiB, a few hundred bytes an answer).
const EXACT_BYTES: &str = "bytes read exactly:";

/// The wrk script of a run: it prints the exact bytes read when wrk is done ([`EXACT_BYTES`]),
/// and with a `body` makes every request a `POST` of it as JSON. Only static settings and
/// `done`: wrk builds the request once and runs no Lua per request.
pub fn wrk_script(body: Option<&str>) -> String {
    let mut script = format!(
        "function done(summary, latency, requests)\n  io.write(string.format(\"{EXACT_BYTES} %.0f\\n\", summary.bytes))\nend\n"
    );
    if let Some(body) = body {
        script.push_str(&wrk_post_script(body));
    }
    script
}

/// wrk settings that make every request a `POST` of `body` as JSON (wrk sends head and body
/// in one write, as clients send a small body).
fn wrk_post_script(body: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = {}\n",
        lua_string(body)
    )
}

/// `text` as a quoted Lua string: every byte but printable ASCII, `"` and `\\` as a decimal
/// escape, so the string is exactly `text` (a long bracket would end at a `]]` in it and drop a
/// first newline).
fn lua_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for byte in text.bytes() {
        if (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\' {
            quoted.push(char::from(byte));
        } else {
            quoted.push_str(&format!("\\{byte:03}"));
        }
    }
    quoted.push('"');
    quoted
}

/// Runs `spec` to completion within `bound` (its process group is killed otherwise, or when
/// `stop` is raised) and returns its stdout.
fn run_bounded(spec: &Spec, bound: Duration, stop: &Stop) -> Result<String, BenchError> {
    let mut process = Process::spawn(spec)?;
    let started = Instant::now();
    let out = spec.log_dir.join(format!("{}.out", spec.name));
    loop {
        if let Some(status) = process.try_wait() {
            let output = std::fs::read_to_string(&out).unwrap_or_default();
            if !status.success() {
                return Err(BenchError::Tool {
                    tool: spec.name.clone(),
                    status: status.to_string(),
                    log: format!("{}\n{}", output.trim(), process.log_tail(10)),
                });
            }
            return Ok(output);
        }
        if stop.raised() {
            process.kill();
            return Err(BenchError::Interrupted);
        }
        if started.elapsed() > bound {
            process.kill();
            return Err(BenchError::Tool {
                tool: spec.name.clone(),
                status: format!("still running after {bound:?}, killed"),
                log: process.log_tail(10),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A wrk duration (`512.00us`, `1.23ms`, `2.00s`, `1.00m`) in milliseconds.
fn wrk_time_ms(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(value * factor)
}

/// wrk's byte counts (`12.79MB`, `555.43KB`, `980.00B`: powers of 1024) in bytes.
fn wrk_bytes(text: &str) -> Option<u64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let power = ["B", "KB", "MB", "GB", "TB"]
        .iter()
        .position(|u| *u == unit)?;
    Some((value * 1024f64.powi(power as i32)).round() as u64)
}

/// Parses wrk's report (run with `--latency`). `None` when a figure it always prints is missing.
pub fn parse_wrk(output: &str) -> Option<LoadResult> {
    let mut result = LoadResult::default();
    let (mut have_rps, mut have_requests) = (false, false);
    let mut in_distribution = false;
    let mut exact_bytes = None;
    for line in output.lines() {
        if let Some(count) = line.strip_prefix(EXACT_BYTES) {
            exact_bytes = Some(count.trim().parse().ok()?);
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", "Distribution", ..] => in_distribution = true,
            [percent, value] if in_distribution && percent.ends_with('%') => match *percent {
                "50%" => result.p50_ms = wrk_time_ms(value)?,
                "99%" => result.p99_ms = wrk_time_ms(value)?,
                _ => {}
            },
            [count, "requests", "in", rest @ ..] => {
                result.requests = count.parse().ok()?;
                // "80313 requests in 1.10s, 12.79MB read"
                if let [_, read, "read"] = rest {
                    result.bytes_read = wrk_bytes(read).unwrap_or(0);
                }
                have_requests = true;
                in_distribution = false;
            }
            ["Requests/sec:", rps] => {
                result.rps = rps.parse().ok()?;
                have_rps = true;
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 12"
                result.socket_errors = rest
                    .iter()
                    .filter_map(|word| word.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => {
                result.non_2xx = count.parse().ok()?;
            }
            _ => {}
        }
    }
    if let Some(exact) = exact_bytes {
        result.bytes_read = exact;
    }
    (have_rps && have_requests).then_some(result)
}

/// Parses h2load's summary (req/s, request and status counts); the latency percentiles come
/// from its request log ([`h2load_percentiles`]). `None` when a figure is missing.
pub fn parse_h2load(output: &str) -> Option<LoadResult> {
    let mut result = LoadResult::default();
    let (mut have_rps, mut have_requests) = (false, false);
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 2.00s, 12345.50 req/s, 1.23MB/s"
            let rps = rest.split(", ").nth(1)?.strip_suffix(" req/s")?;
            result.rps = rps.parse().ok()?;
            have_rps = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "24691 total, 24755 started, 24691 done, 24691 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(", ") {
                let (count, what) = part.split_once(' ')?;
                let count: u64 = count.parse().ok()?;
                match what {
                    "done" => {
                        result.requests = count;
                        have_requests = true;
                    }
                    "errored" | "timeout" => result.socket_errors += count,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("traffic: ") {
            // "1.65MB (1729977) total, 461.18KB (472249) headers (…), 306.94KB (314310) data"
            let exact = rest.split_once('(')?.1.split_once(')')?.0;
            result.bytes_read = exact.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // "24691 2xx, 0 3xx, 0 4xx, 0 5xx"
            for part in rest.split(", ") {
                let (count, class) = part.split_once(' ')?;
                if class != "2xx" {
                    result.non_2xx += count.parse::<u64>().ok()?;
                }
            }
        }
    }
    (have_rps && have_requests).then_some(result)
}

/// Whether h2load's output says the TLS connections negotiated h2 (`Application protocol: h2`).
pub fn negotiated_h2(output: &str) -> bool {
    output.lines().any(|line| {
        line.trim()
            .strip_prefix("Application protocol:")
            .map(str::trim)
            == Some("h2")
    })
}

/// p50 and p99 (ms) from h2load's `--log-file`: one line per request, tab-separated start time
/// (µs since the epoch), status code and elapsed µs.
pub fn h2load_percentiles(log: &str) -> (f64, f64) {
    let mut elapsed: Vec<u64> = log
        .lines()
        .filter_map(|line| line.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if elapsed.is_empty() {
        return (0.0, 0.0);
    }
    elapsed.sort_unstable();
    let at = |q: f64| {
        let index = ((elapsed.len() - 1) as f64 * q).round() as usize;
        elapsed[index] as f64 / 1_000.0
    };
    (at(0.50), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_shared_over_the_connections() {
        assert_eq!(per_connection_rate(400, 4), "100");
        assert_eq!(per_connection_rate(400, 3), "133.333333");
        assert_eq!(per_connection_rate(1, 8), "0.125");
        assert_eq!(per_connection_rate(1, 10_000), "0.0001");
        assert_eq!(per_connection_rate(7, 0), "7");
    }

    /// wrk 4.1.0 against a hello worker (captured).
    const WRK_OK: &str = r#"Running 1s test @ http://127.0.0.1:43557/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   196.25us  442.66us   8.15ms   94.09%
    Req/Sec    36.77k     3.08k   41.62k    68.18%
  Latency Distribution
     50%   97.00us
     75%  138.00us
     90%  373.00us
     99%    2.59ms
  80313 requests in 1.10s, 12.79MB read
Requests/sec:  73035.06
Transfer/sec:     11.63MB"#;

    /// wrk with herd's script against nginx serving a 64 KiB file (captured): the report says
    /// `3.28GB` (±5 MiB), the script's line the exact count.
    const WRK_EXACT: &str = r#"Running 1s test @ http://127.0.0.1:18999/page
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   157.66us   79.42us   3.16ms   92.23%
    Req/Sec    25.67k     6.10k   51.69k    95.24%
  Latency Distribution
     50%  160.00us
     75%  168.00us
     90%  178.00us
     99%  226.00us
  53537 requests in 1.10s, 3.28GB read
Requests/sec:  48709.06
Transfer/sec:      2.98GB
bytes read exactly: 3521610063
"#;

    /// wrk against a gateway whose only worker is gone: every answer a 503 (captured).
    const WRK_NON_2XX: &str = r#"Running 1s test @ http://127.0.0.1:37233/
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   313.94us  126.27us   3.26ms   79.38%
    Req/Sec    12.84k   711.68    14.19k    72.73%
  Latency Distribution
     50%  297.00us
     75%  366.00us
     90%  448.00us
     99%  748.00us
  28080 requests in 1.10s, 8.43MB read
  Non-2xx or 3xx responses: 28080
Requests/sec:  25524.37
Transfer/sec:      7.66MB"#;

    /// wrk against a server that closes every other connection unanswered (captured).
    const WRK_SOCKET_ERRORS: &str = r#"Running 1s test @ http://127.0.0.1:18977/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    27.51us   25.06us   0.93ms   97.04%
    Req/Sec    13.01k     1.13k   14.13k    81.82%
  Latency Distribution
     50%   23.00us
     75%   27.00us
     90%   33.00us
     99%  114.00us
  14219 requests in 1.10s, 555.43KB read
  Socket errors: connect 0, read 28439, write 0, timeout 0
Requests/sec:  12927.95
Transfer/sec:    505.00KB"#;

    /// h2load (nghttp2 1.52.0) against a hello worker, with its progress lines (captured).
    const H2LOAD_OK: &str = r#"starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
spawning thread #1: 4 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Warm-up started for thread #1.
Warm-up phase is over for thread #1.
Main benchmark duration is started for thread #1.
Warm-up started for thread #0.
progress: 25% of clients started
progress: 50% of clients started
progress: 75% of clients started
progress: 100% of clients started
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Application protocol: h2c
Main benchmark duration is over for thread #1. Stopping all clients.
Stopped all clients for thread #1
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 1.00s, 52385.00 req/s, 1.65MB/s
requests: 52385 total, 52393 started, 52385 done, 52385 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 52385 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.65MB (1729977) total, 461.18KB (472249) headers (space savings 93.17%), 306.94KB (314310) data
                     min         max         mean         sd        +/- sd
time for request:       19us      8.29ms       139us       186us    96.44%
time for connect:       58us       149us       107us        30us    62.50%
time to 1st byte:      376us       927us       736us       200us    87.50%
req/s           :    6439.40     6735.24     6547.36       86.85    75.00%"#;

    /// The summary of h2load against a gateway whose only worker is gone: every answer a 503 (captured).
    const H2LOAD_5XX: &str = r#"finished in 1.00s, 14458.00 req/s, 2.10MB/s
requests: 14458 total, 14460 started, 14458 done, 0 succeeded, 14458 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 14458 5xx
traffic: 2.10MB (2205838) total, 393.40KB (402846) headers (space savings 82.33%), 1.47MB (1542638) data
                     min         max         mean         sd        +/- sd
time for request:       43us      2.74ms       134us        50us    84.37%
time for connect:       88us       125us       106us        26us   100.00%
time to 1st byte:      667us       681us       674us         9us   100.00%
req/s           :    7220.11     7235.83     7227.97       11.12   100.00%"#;

    #[test]
    fn the_script_prints_the_exact_bytes_and_posts_the_body_as_it_is() {
        let done = "function done(summary, latency, requests)\n  \
                    io.write(string.format(\"bytes read exactly: %.0f\\n\", summary.bytes))\nend\n";
        assert_eq!(wrk_script(None), done);
        let body = crate::bench::proxy::API_BODY;
        let script = wrk_script(Some(body));
        let script = script.strip_prefix(done).expect("done first");
        assert!(script.starts_with("wrk.method = \"POST\"\n"), "{script}");
        assert!(script.contains("wrk.headers[\"Content-Type\"] = \"application/json\"\n"));
        // The JSON as a quoted string, its quotes escaped.
        let (_, rest) = script.split_once("wrk.body = ").unwrap();
        let expected = format!("\"{}\"\n", body.replace('"', "\\034"));
        assert_eq!(rest, expected);
        assert_eq!(body.len(), 95, "the scenario's description names its size");
        assert_eq!(lua_string("a]]b\n\\\u{e9}"), "\"a]]b\\010\\092\\195\\169\"");
    }

    #[test]
    fn parses_wrk() {
        let ok = parse_wrk(WRK_OK).unwrap();
        assert_eq!(ok.requests, 80313);
        assert_eq!(ok.rps, 73035.06);
        assert_eq!(ok.p50_ms, 0.097);
        assert_eq!(ok.p99_ms, 2.59);
        assert_eq!(ok.errors(), 0);
        assert_eq!(ok.bytes_read, (12.79f64 * 1024.0 * 1024.0).round() as u64);

        let non_2xx = parse_wrk(WRK_NON_2XX).unwrap();
        assert_eq!(
            (non_2xx.requests, non_2xx.non_2xx, non_2xx.socket_errors),
            (28080, 28080, 0)
        );
        assert_eq!(non_2xx.p99_ms, 0.748);

        let socket = parse_wrk(WRK_SOCKET_ERRORS).unwrap();
        assert_eq!((socket.non_2xx, socket.socket_errors), (0, 28439));
        assert_eq!(socket.rps, 12927.95);
        assert_eq!(socket.bytes_read, (555.43f64 * 1024.0).round() as u64);
        assert_eq!(wrk_bytes("980.00B"), Some(980));
        assert_eq!(wrk_bytes("1.50GB"), Some(1_610_612_736));
        assert_eq!(wrk_bytes("12.79XB"), None);

        // The script's exact count wins over the rounded one, a malformed one fails the parse.
        let exact = parse_wrk(WRK_EXACT).unwrap();
        assert_eq!((exact.requests, exact.bytes_read), (53537, 3_521_610_063));
        let malformed = WRK_EXACT.replace("exactly: 3521610063", "exactly: 3.5e9");
        assert_eq!(parse_wrk(&malformed), None);

        assert_eq!(
            parse_wrk("unable to connect to 127.0.0.1:1 Connection refused"),
            None
        );
    }

    #[test]
    fn parses_h2load() {
        let ok = parse_h2load(H2LOAD_OK).unwrap();
        assert_eq!((ok.requests, ok.rps), (52385, 52385.0));
        assert_eq!(ok.bytes_read, 1_729_977);
        assert_eq!(ok.errors(), 0);
        let failed = parse_h2load(H2LOAD_5XX).unwrap();
        assert_eq!(
            (failed.requests, failed.non_2xx, failed.socket_errors),
            (14458, 14458, 0)
        );
        assert_eq!(parse_h2load("starting benchmark...\n"), None);
    }

    /// h2load over TLS against herd-gateway (captured, trimmed): the protocol ALPN chose.
    const H2LOAD_TLS: &str = "TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
Application protocol: h2
finished in 2.00s, 73887.50 req/s, 4.35MB/s
requests: 147775 total, 147839 started, 147775 done, 147775 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 147775 2xx, 0 3xx, 0 4xx, 0 5xx";

    #[test]
    fn h2load_over_tls_must_have_negotiated_h2() {
        assert!(negotiated_h2(H2LOAD_TLS));
        assert_eq!(parse_h2load(H2LOAD_TLS).unwrap().requests, 147_775);
        let http1 = H2LOAD_TLS.replace("protocol: h2", "protocol: http/1.1");
        assert!(!negotiated_h2(&http1));
        let none = H2LOAD_TLS.replace(
            "Application protocol: h2",
            "No protocol negotiated. Fallback behaviour may be activated",
        );
        assert!(!negotiated_h2(&none));
        assert!(!negotiated_h2("Application protocol: h2c-14"));
    }

    #[test]
    fn wrk_times_have_units() {
        assert_eq!(wrk_time_ms("512.00us"), Some(0.512));
        assert_eq!(wrk_time_ms("1.25ms"), Some(1.25));
        assert_eq!(wrk_time_ms("2.00s"), Some(2000.0));
        assert_eq!(wrk_time_ms("1.00m"), Some(60_000.0));
        assert_eq!(wrk_time_ms("fast"), None);
    }

    #[test]
    fn h2load_percentiles_come_from_the_request_log() {
        let log: String = (1..=100)
            .map(|i| format!("1763780000000000\t200\t{}\n", i * 1000))
            .collect();
        let (p50, p99) = h2load_percentiles(&log);
        assert_eq!(p50, 51.0);
        assert_eq!(p99, 99.0);
        assert_eq!(h2load_percentiles(""), (0.0, 0.0));
    }
}
