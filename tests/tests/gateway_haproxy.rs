//! The kill -9 and SIGSTOP drills against herd-gateway and against HAProxy 2.6, over the same kind
//! of workers (4 real herd-workers each run), with the same bounded load (500 req/s for 6 s, 9 GETs
//! to 1 POST, 16 keep-alive clients, 10 s client timeout), in one run (issue 3, item 9).
//!
//! HAProxy is configured as the issue says: `option httpchk GET /readyz`, `check inter 1s fall 2
//! rise 2`, `retries 3`, `option redispatch`, `retry-on conn-failure empty-response
//! response-timeout`; both proxies wait 2 s for a worker's response headers
//! (`timeout server 2s` / `timeouts.response_header=2s`); everything else is each one's default.
//!
//! A manual comparison, not part of the normal suite (it takes about a minute and needs haproxy):
//!
//! ```text
//! cargo build --bins
//! cargo test -p herd-tests --test gateway_haproxy -- --ignored --nocapture
//! ```
//!
//! It prints a Markdown table of failed requests per drill and proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herd::load::{self, Plan, Report};
use herd::process::{Process, Spec};
use herd_tests::gateway::{GatewayOptions, TestGateway};
use herd_tests::redis::TestRedis;
use herd_tests::worker::{TestWorker, WorkerOptions};
use herd_tests::{client, temp_dir, unique_prefix, wait_until};
use nix::sys::signal::Signal;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill9,
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Front {
    Herd,
    Haproxy,
}

/// Whatever serves the public address; stopped when dropped.
#[allow(dead_code)] // held only for its Drop
enum Running {
    Herd(TestGateway),
    Haproxy(Process),
}

fn haproxy_config(port: u16, workers: &[SocketAddr]) -> String {
    let servers: String = workers
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            format!(
                "    server w{} {addr} check inter 1s fall 2 rise 2\n",
                i + 1
            )
        })
        .collect();
    format!(
        "global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 2s
    timeout check 1s
    timeout http-keep-alive 30s
    http-reuse always
    retries 3
    option redispatch
    retry-on conn-failure empty-response response-timeout

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
    option httpchk GET /readyz
{servers}"
    )
}

fn start_front(front: Front, workers: &[SocketAddr], dir: &Path) -> (Running, String) {
    match front {
        Front::Herd => {
            let options = GatewayOptions {
                workers: workers.to_vec(),
                registry: None,
                env: vec![("HERD_GATEWAY_TIMEOUTS__RESPONSE_HEADER".into(), "2s".into())],
            };
            let gateway = TestGateway::start(&options, dir);
            let url = gateway.url("");
            (Running::Herd(gateway), url)
        }
        Front::Haproxy => {
            let program = herd::deps::find("haproxy").expect("haproxy is installed");
            let port = herd::ports::free_port().expect("a free port");
            let config = dir.join("haproxy.cfg");
            std::fs::write(&config, haproxy_config(port, workers)).expect("write haproxy.cfg");
            let spec = Spec::new("haproxy", program, dir)
                .arg("-db")
                .arg("-f")
                .arg(config.display().to_string());
            let process = Process::spawn(&spec).expect("haproxy starts");
            (
                Running::Haproxy(process),
                format!("http://127.0.0.1:{port}"),
            )
        }
    }
}

async fn drill(redis: &TestRedis, front: Front, fault: Fault) -> Report {
    let dir = temp_dir();
    let prefix = unique_prefix();
    let mut workers: Vec<TestWorker> = (1..=4)
        .map(|n| {
            let options = WorkerOptions::new(format!("w{n}"), redis.url(), &prefix);
            TestWorker::start(&options, dir.path())
        })
        .collect();
    let addrs: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let (_running, url) = start_front(front, &addrs, dir.path());
    let http = client();
    let probe = format!("{url}/work?ms=1");
    wait_until(Duration::from_secs(10), "the proxy answers", || {
        let request = http.get(&probe).send();
        async move { matches!(request.await, Ok(r) if r.status().is_success()) }
    })
    .await;
    // Let the first health checks settle on both proxies.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let plan = Plan {
        rate: 500,
        duration: Duration::from_secs(6),
        concurrency: 16,
        timeout: Duration::from_secs(10),
    };
    let load = tokio::spawn({
        let http = http.clone();
        async move {
            load::run(&plan, &http, move |client, n| {
                if n % 10 == 9 {
                    client
                        .post(format!("{url}/login"))
                        .json(&serde_json::json!({ "user": format!("user{n}") }))
                } else {
                    client.get(format!("{url}/work?ms=1"))
                }
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match fault {
        Fault::Kill9 => workers[1].kill9(),
        Fault::Stop => workers[1].signal(Signal::SIGSTOP),
    }
    let report = load.await.expect("load ran");
    if fault == Fault::Stop {
        workers[1].signal(Signal::SIGCONT);
    }
    report
}

fn failed(report: &Report, method: &str) -> usize {
    report
        .samples
        .iter()
        .filter(|s| s.method == method && s.failure.is_some())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "manual comparison with HAProxy (about a minute); run with --ignored"]
async fn kill_and_stop_drills_herd_vs_haproxy() {
    let redis = TestRedis::start();
    let mut rows = Vec::new();
    for fault in [Fault::Kill9, Fault::Stop] {
        for front in [Front::Herd, Front::Haproxy] {
            let report = drill(&redis, front, fault).await;
            println!("{fault:?} {front:?}: {}", report.summary());
            rows.push(format!(
                "| {} | {} | {} | {} | {} | {} | {:?} | {:?} |",
                match fault {
                    Fault::Kill9 => "kill -9",
                    Fault::Stop => "SIGSTOP",
                },
                match front {
                    Front::Herd => "herd-gateway",
                    Front::Haproxy => "HAProxy",
                },
                report.sent(),
                report.failed(),
                failed(&report, "GET"),
                failed(&report, "POST"),
                report.failures_by_kind(),
                report.max_latency(),
            ));
        }
    }
    println!();
    println!(
        "| drill | proxy | sent | failed | failed GET | failed POST | failures by kind | max latency |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
