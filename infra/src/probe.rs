//! The failover prober: one request on a new connection every `interval`, each with its own
//! deadline, sent on schedule whether or not earlier ones finished — so the time resolution of a
//! takeover measurement is the interval. The same prober measures herd's gateway pair and
//! keepalived + HAProxy, so their figures compare (it does what the team's lab prober did).
//!
//! Every request is recorded ([`ProbeSample`]); [`summarize`] turns the samples and the moment a
//! fault was injected into the figures a drill reports.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Hard bound on the requests one probe run sends.
pub const MAX_REQUESTS: u64 = 20_000;

/// What to probe, how often, for how long.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// Where to connect.
    pub target: SocketAddr,
    /// Request path.
    pub path: String,
    /// Gap between requests.
    pub interval: Duration,
    /// How long to probe.
    pub duration: Duration,
    /// Deadline of one request (connect + whole response).
    pub timeout: Duration,
    /// The response header naming who answered (e.g. `x-herd-gateway`, `x-lb`).
    pub served_by_header: String,
}

/// One probe request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// Sequence number.
    pub seq: u64,
    /// When it was sent, seconds since the Unix epoch.
    pub sent: f64,
    /// When it finished.
    pub done: f64,
    /// Whether it got a 2xx.
    pub ok: bool,
    /// The served-by header's value, if any.
    pub served_by: String,
    /// The failure (`timeout`, `refused`, `reset`, `status 503`…), empty on success.
    pub error: String,
}

/// Runs the probe and returns every sample, in sequence order.
pub async fn run(spec: &ProbeSpec) -> Vec<ProbeSample> {
    let count =
        ((spec.duration.as_secs_f64() / spec.interval.as_secs_f64()) as u64).min(MAX_REQUESTS);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for seq in 0..count {
        tokio::time::sleep_until(started + spec.interval.mul_f64(seq as f64)).await;
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move { one(&spec, seq).await }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(sample) = task.await {
            samples.push(sample);
        }
    }
    samples
}

async fn one(spec: &ProbeSpec, seq: u64) -> ProbeSample {
    let sent = now();
    let result = tokio::time::timeout(spec.timeout, exchange(spec)).await;
    let (ok, served_by, error) = match result {
        Ok(Ok((status, served_by))) if (200..300).contains(&status) => {
            (true, served_by, String::new())
        }
        Ok(Ok((status, served_by))) => (false, served_by, format!("status {status}")),
        Ok(Err(error)) => (false, String::new(), error),
        Err(_) => (false, String::new(), "timeout".into()),
    };
    ProbeSample {
        seq,
        sent,
        done: now(),
        ok,
        served_by,
        error,
    }
}

async fn exchange(spec: &ProbeSpec) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(spec.target)
        .await
        .map_err(|error| io_kind(&error))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        spec.path, spec.target
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| io_kind(&error))?;
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            // A reset after the whole response arrived (by its Content-Length) loses nothing: a
            // real client has its answer. A reset before that is a failure.
            Err(error) if is_complete(&response) => {
                let _ = error;
                break;
            }
            Err(error) => return Err(io_kind(&error)),
        }
    }
    parse_head(&response, &spec.served_by_header).ok_or_else(|| "bad response".to_string())
}

/// Whether `response` holds a whole HTTP response according to its Content-Length.
fn is_complete(response: &[u8]) -> bool {
    let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let Ok(head) = std::str::from_utf8(&response[..end]) else {
        return false;
    };
    head.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .is_some_and(|length| response.len() >= end + 4 + length)
}

/// The status code and the served-by header of a raw HTTP response.
fn parse_head(response: &[u8], header: &str) -> Option<(u16, String)> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&response[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let served_by = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(header))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default();
    Some((status, served_by))
}

fn io_kind(error: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            "reset".into()
        }
        ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable".into(),
        _ => format!("io {}", error.kind()),
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What a probe run says about one injected fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSummary {
    /// Requests sent in all.
    pub sent: usize,
    /// Requests that failed in all.
    pub failed: usize,
    /// Failures by kind.
    pub failures: std::collections::BTreeMap<String, usize>,
    /// Who answered before the fault (the most frequent).
    pub served_before: String,
    /// Who answered after recovery (the most frequent after the fault).
    pub served_after: String,
    /// From the fault to the first success of a request sent after it, in milliseconds (the
    /// takeover time, to within one probe interval). `None`: no success after the fault.
    pub recovery_ms: Option<f64>,
    /// From the fault to the end of the last failed request, in milliseconds (0 with no failure
    /// after the fault).
    pub last_failure_ms: f64,
}

/// Summarizes `samples` around a fault injected at `fault_at` (seconds since the Unix epoch).
pub fn summarize(samples: &[ProbeSample], fault_at: f64) -> FaultSummary {
    let mut failures = std::collections::BTreeMap::new();
    for sample in samples.iter().filter(|s| !s.ok) {
        *failures.entry(sample.error.clone()).or_insert(0) += 1;
    }
    let most_frequent = |iter: &mut dyn Iterator<Item = &ProbeSample>| {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for sample in iter {
            *counts.entry(sample.served_by.as_str()).or_insert(0) += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, count)| *count)
            .map(|(name, _)| name.to_string())
            .unwrap_or_default()
    };
    let served_before = most_frequent(&mut samples.iter().filter(|s| s.ok && s.sent < fault_at));
    let served_after = most_frequent(&mut samples.iter().filter(|s| s.ok && s.sent >= fault_at));
    let recovery_ms = samples
        .iter()
        .filter(|s| s.ok && s.sent >= fault_at)
        .map(|s| (s.done - fault_at) * 1000.0)
        .reduce(f64::min);
    let last_failure_ms = samples
        .iter()
        .filter(|s| !s.ok && s.done >= fault_at)
        .map(|s| (s.done - fault_at) * 1000.0)
        .fold(0.0, f64::max);
    FaultSummary {
        sent: samples.len(),
        failed: samples.iter().filter(|s| !s.ok).count(),
        failures,
        served_before,
        served_after,
        recovery_ms,
        last_failure_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seq: u64, sent: f64, ok: bool, by: &str) -> ProbeSample {
        ProbeSample {
            seq,
            sent,
            done: sent + 0.002,
            ok,
            served_by: by.into(),
            error: if ok { String::new() } else { "refused".into() },
        }
    }

    #[test]
    fn summary_measures_recovery_from_the_fault() {
        let samples = vec![
            sample(0, 10.00, true, "gw1"),
            sample(1, 10.01, true, "gw1"),
            sample(2, 10.02, false, ""),
            sample(3, 10.03, false, ""),
            sample(4, 10.04, true, "gw2"),
            sample(5, 10.05, true, "gw2"),
            sample(6, 10.06, true, "gw2"),
        ];
        let summary = summarize(&samples, 10.015);
        assert_eq!(summary.sent, 7);
        assert_eq!(summary.failed, 2);
        assert_eq!(summary.failures["refused"], 2);
        assert_eq!(summary.served_before, "gw1");
        assert_eq!(summary.served_after, "gw2");
        let recovery = summary.recovery_ms.unwrap();
        assert!((recovery - 27.0).abs() < 0.01, "{recovery}");
        assert!((summary.last_failure_ms - 17.0).abs() < 0.01);
    }

    #[test]
    fn heads_parse_case_insensitively() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nX-Herd-Gateway: gw2\r\n\r\n{}";
        assert_eq!(
            parse_head(raw, "x-herd-gateway"),
            Some((503, "gw2".to_string()))
        );
        assert_eq!(parse_head(b"garbage", "x"), None);
    }

    #[test]
    fn completeness_follows_content_length() {
        assert!(is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
        ));
        assert!(!is_complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok"
        ));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\n\r\nok"));
        assert!(!is_complete(b"HTTP/1.1 200 OK\r\ncontent-"));
    }

    #[tokio::test]
    async fn probes_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nx-lb: one\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        let samples = run(&ProbeSpec {
            target,
            path: "/".into(),
            interval: Duration::from_millis(5),
            duration: Duration::from_millis(100),
            timeout: Duration::from_secs(1),
            served_by_header: "x-lb".into(),
        })
        .await;
        assert_eq!(samples.len(), 20);
        assert!(
            samples.iter().all(|s| s.ok && s.served_by == "one"),
            "{samples:?}"
        );
    }
}
