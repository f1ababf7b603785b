//! A gateway that runs out of file descriptors: it keeps serving the connections it has, waits
//! instead of spinning on failed accepts, and serves the queued connections as soon as some
//! close. The limit is lowered on the real gateway process with `prlimit`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use herd_tests::cluster::{Cluster, ClusterOptions};

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
