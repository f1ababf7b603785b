//! Free loopback ports, for programs that must be told their port before they start
//! (redis-server, the gateway pair's failover link, benchmark peers).
//!
//! A port picked by binding port 0 comes from the kernel's ephemeral range, the same range every
//! outgoing connection takes its local port from: between the moment it is picked and the moment
//! its program binds it, any connection on the machine may take it (CI saw a gateway exit with
//! "address in use" that way). So ports here are picked at random *below* the ephemeral range,
//! where the kernel hands out nothing by itself, checked free by a bind, and never handed out
//! twice by one process. Another program may still bind one first; callers report a bind failure.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::sync::Mutex;

use rand::Rng;

/// Lowest port handed out: above the well-known and most registered service ports.
const LOWEST: u16 = 10_000;
/// Where the ephemeral range starts when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;
/// Candidates tried before giving up.
const ATTEMPTS: usize = 500;

/// Ports this process has handed out (so two callers never get the same one).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that is free now and that the kernel will not give to an outgoing
/// connection.
pub fn free_port() -> std::io::Result<u16> {
    free_port_in(LOWEST..ephemeral_start())
}

/// A free port in `range` (see [`free_port`]); falls back to the kernel's pick when the range is
/// empty (an ephemeral range starting below [`LOWEST`]).
pub fn free_port_in(range: Range<u16>) -> std::io::Result<u16> {
    if range.is_empty() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        return Ok(listener.local_addr()?.port());
    }
    let mut rng = rand::rng();
    for _ in 0..ATTEMPTS {
        let port = rng.random_range(range.clone());
        if claim(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "no free port in {}..{} after {ATTEMPTS} tries",
            range.start, range.end
        ),
    ))
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

/// Takes `port` for this process if no one else has it.
fn claim(port: u16) -> bool {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    if handed_out.contains(&port) || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return false;
    }
    handed_out.insert(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_handed_out_twice() {
        let start = ephemeral_start();
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        if start > LOWEST {
            assert!(ports.iter().all(|&p| (LOWEST..start).contains(&p)));
        }
    }

    #[test]
    fn a_port_someone_listens_on_is_not_handed_out() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        assert!(!claim(port));
        assert_ne!(free_port_in(port..port + 1).ok(), Some(port));
    }
}
