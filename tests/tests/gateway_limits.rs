//! A gateway that runs out of file descriptors: it keeps serving the connections it has, waits
//! instead of spinning on failed accepts, and serves the queued connections as soon as some
//! close. The limit is lowered on the real gateway process with `prlimit`. And a client at its
//! connection cap that swaps all its connections while the gateway is stopped (SIGSTOP) is served
//! on the new ones.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use herd_tests::cluster::{Cluster, ClusterOptions};
use nix::sys::signal::Signal;

const REQUEST: &[u8] = b"GET /work?ms=0 HTTP/1.1\r\nhost: gateway\r\n\r\n";

/// Sends one request on `stream` and waits up to `limit` for the start of a response.
fn answered(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    stream.write_all(REQUEST).ok()?;
    read_head(stream)
}

/// Reads until the end of a response head (the demo's small bodies come with it).
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(read) => head.extend_from_slice(&buffer[..read]),
        }
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// User + system CPU seconds of process `pid`, all threads.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_out_of_file_descriptors_waits_and_serves_the_queue_when_some_close() {
    let cluster = Cluster::start(ClusterOptions {
        workers: 1,
        ..ClusterOptions::default()
    })
    .await;
    let pid = cluster.gateway.process.pid();
    let public = cluster.gateway.public;

    // One warm connection to the worker in the pool, then room for a few client connections.
    let mut first = TcpStream::connect(public).unwrap();
    let head = answered(&mut first, Duration::from_secs(5)).expect("a first answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let limit = open_files(pid) + 6;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit runs");
    assert!(status.success(), "prlimit failed: {status}");

    // Open connections until one is not accepted (it waits in the kernel's queue).
    let mut held = vec![first];
    let queued = loop {
        assert!(held.len() < 40, "never ran out at a limit of {limit} files");
        let mut stream = TcpStream::connect(public).unwrap();
        match answered(&mut stream, Duration::from_secs(1)) {
            Some(head) => {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                held.push(stream);
            }
            None => break stream,
        }
    };

    // Out of descriptors with a connection queued: accepting fails over and over. The gateway
    // must wait between tries, not spin a core on them.
    let (cpu_before, since) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let busy = (cpu_seconds(pid) - cpu_before) / since.elapsed().as_secs_f64();
    assert!(
        busy < 0.3,
        "the gateway spun at {:.0} % of a core",
        busy * 100.0
    );
    // And it says so without flooding its log: a line per accept loop (each serving thread and
    // the admin listener) every few seconds, not one per try.
    let log = std::fs::read_to_string(cluster.gateway.process.log_path()).unwrap();
    let lines = log.matches("accept failed").count();
    let loops = std::thread::available_parallelism().unwrap().get() + 1;
    assert!(
        (1..=2 * loops).contains(&lines),
        "{lines} 'accept failed' lines for {loops} accept loops"
    );

    // The connections it has still work.
    let head = answered(&mut held[1], Duration::from_secs(5)).expect("a held connection works");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // Closing some lets the queued connection in, and its request is answered, not lost.
    held.truncate(1);
    let mut queued = queued;
    queued
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let head = read_head(&mut queued).expect("the queued request is answered");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Continues a stopped process when dropped, also when the test fails while it is stopped.
struct Continue<'a>(&'a herd::process::Process);

impl Drop for Continue<'_> {
    fn drop(&mut self) {
        // No assertion here: a panic while unwinding would abort the test binary.
        let _ = self.0.signal(Signal::SIGCONT);
    }
}

/// A client at its connection cap (`limits.max_connections_per_client`) that closes all its
/// connections and at once opens as many new ones is served on every new one: connections it
/// closed no longer count, even when the gateway finds the new connections and the old ones'
/// ends in one batch. The gateway is stopped (SIGSTOP) while the client swaps its connections,
/// so that it does, as a gateway held to a CPU quota did under `herd bench proxy
/// --proxy-cpus` (where it answered 429 to a load that followed another). The cap still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_swaps_its_connections_at_its_cap_is_served_on_the_new_ones() {
    const CAP: usize = 64;
    let cluster = Cluster::start(ClusterOptions {
        workers: 1,
        gateway_env: vec![(
            "HERD_GATEWAY_LIMITS__MAX_CONNECTIONS_PER_CLIENT".into(),
            CAP.to_string(),
        )],
        ..ClusterOptions::default()
    })
    .await;
    let public = cluster.gateway.public;
    let open = |count: usize| -> Vec<TcpStream> {
        (0..count)
            .map(|_| TcpStream::connect(public).unwrap())
            .collect()
    };

    for round in 0..3 {
        let mut old = open(CAP);
        for stream in &mut old {
            let head = answered(stream, Duration::from_secs(5)).expect("an answer");
            assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        }
        let stopped = Continue(&cluster.gateway.process);
        cluster.gateway.process.signal(Signal::SIGSTOP).unwrap();
        drop(old);
        let mut new = open(CAP);
        for stream in &mut new {
            stream.write_all(REQUEST).unwrap();
        }
        // The ends and the new connections all wait in the kernel for the gateway.
        std::thread::sleep(Duration::from_millis(200));
        drop(stopped);
        let mut statuses = std::collections::BTreeMap::<String, usize>::new();
        for stream in &mut new {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let status = read_head(stream)
                .and_then(|head| head.split(' ').nth(1).map(str::to_owned))
                .unwrap_or_else(|| "no answer".into());
            *statuses.entry(status).or_default() += 1;
        }
        assert_eq!(
            statuses,
            [("200".to_owned(), CAP)].into(),
            "round {round}: the new connections' answers"
        );

        // With the new ones held, the cap holds: one more gets a 429.
        let mut over = TcpStream::connect(public).unwrap();
        let head = answered(&mut over, Duration::from_secs(5)).expect("an answer");
        assert!(head.starts_with("HTTP/1.1 429"), "round {round}: {head}");
    }
}
