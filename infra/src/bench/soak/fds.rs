//! A process's memory and open file descriptors from `/proc`, with its TCP sockets sorted by
//! what they are: client connections (local port = the gateway's public port), connections to
//! workers (remote port = a worker's port), and the rest (listeners, Redis, admin, files).
//!
//! `/proc/PID/fd/*` links name a socket as `socket:[INODE]`; `/proc/PID/net/tcp` lists every
//! IPv4 TCP socket of the process's network namespace with its addresses and inode, so the two
//! together say which of the process's descriptors is which connection.

use std::collections::HashSet;
use std::fs;

use serde::Serialize;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Reading {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub peak_kib: u64,
    /// Open file descriptors.
    pub fds: u32,
    /// Established client connections (sockets on the public port, listener excluded).
    pub client_sockets: u32,
    /// Connections to workers.
    pub upstream_sockets: u32,
}

impl Reading {
    /// Descriptors that are neither client nor worker connections: listeners, Redis, files,
    /// epoll, timers. A leak of anything per-connection shows here or in `client_sockets`.
    pub fn other_fds(&self) -> u32 {
        self.fds
            .saturating_sub(self.client_sockets)
            .saturating_sub(self.upstream_sockets)
    }
}

/// Reads process `pid`: memory, descriptors, and its sockets sorted by `public_port` and
/// `worker_ports`. A process that is gone reads as all zeros.
pub fn read(pid: u32, public_port: u16, worker_ports: &[u16]) -> Reading {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mut inodes = HashSet::new();
    let mut fds = 0;
    if let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            fds += 1;
            if let Some(inode) = fs::read_link(entry.path())
                .ok()
                .and_then(|link| socket_inode(&link.to_string_lossy()))
            {
                inodes.insert(inode);
            }
        }
    }
    let tcp = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let mut reading = Reading {
        rss_kib: status_kib(&status, "VmRSS:").unwrap_or(0),
        peak_kib: status_kib(&status, "VmHWM:").unwrap_or(0),
        fds,
        ..Reading::default()
    };
    for socket in tcp.lines().skip(1).filter_map(parse_tcp_line) {
        if !inodes.contains(&socket.inode) {
            continue;
        }
        if socket.local_port == public_port && socket.state != LISTEN {
            reading.client_sockets += 1;
        } else if worker_ports.contains(&socket.remote_port) {
            reading.upstream_sockets += 1;
        }
    }
    reading
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: u8 = 0x0A;

/// The fields of one `/proc/net/tcp` line that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    state: u8,
    inode: u64,
}

/// Parses `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …`, where
/// addresses are `HEXIP:HEXPORT`.
fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    Some(TcpSocket {
        local_port: port(fields.get(1)?)?,
        remote_port: port(fields.get(2)?)?,
        state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// A `kB` line of `/proc/PID/status`, e.g. `VmRSS:   12345 kB`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_lines_and_socket_links() {
        let line = "   3: 0100007F:1F90 0200007F:A0C2 01 00000000:00000000 00:00000000 00000000     0        0 424242 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_tcp_line(line),
            Some(TcpSocket {
                local_port: 8080,
                remote_port: 0xA0C2,
                state: 1,
                inode: 424_242
            })
        );
        assert_eq!(parse_tcp_line("  sl  local_address rem_address"), None);
        assert_eq!(socket_inode("socket:[99]"), Some(99));
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("anon_inode:[eventpoll]"), None);
    }

    /// This test process's own connections are found and sorted: a listener (other), two
    /// accepted connections on it (client), and one connection to a second listener (upstream).
    #[test]
    fn own_sockets_are_sorted() {
        use std::net::{TcpListener, TcpStream};
        let public = TcpListener::bind("127.0.0.1:0").unwrap();
        let worker = TcpListener::bind("127.0.0.1:0").unwrap();
        let public_port = public.local_addr().unwrap().port();
        let worker_port = worker.local_addr().unwrap().port();
        let before = read(std::process::id(), public_port, &[worker_port]);
        let _c1 = TcpStream::connect(public.local_addr().unwrap()).unwrap();
        let _c2 = TcpStream::connect(public.local_addr().unwrap()).unwrap();
        let _a1 = public.accept().unwrap();
        let _a2 = public.accept().unwrap();
        let _up = TcpStream::connect(worker.local_addr().unwrap()).unwrap();
        let after = read(std::process::id(), public_port, &[worker_port]);
        // Other tests of this binary run in parallel and open descriptors of their own, so only
        // the sockets on these two ports are compared exactly.
        assert_eq!(before.client_sockets, 0, "{before:?}");
        assert_eq!(after.client_sockets, 2, "{after:?}");
        assert_eq!(after.upstream_sockets, 1, "{after:?}");
        // A lower bound only: the other tests open and close descriptors between the readings.
        assert!(
            after.fds >= 7,
            "the two listeners and five connections: {after:?}"
        );
        assert!(
            after.rss_kib > 0 && after.peak_kib >= after.rss_kib,
            "{after:?}"
        );
        assert_eq!(read(u32::MAX - 1, 1, &[]), Reading::default());
    }
}
