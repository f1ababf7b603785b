//! Free loopback ports, for programs that can't be told to pick their own (redis-server).

use std::net::{Ipv4Addr, TcpListener};

/// A port on 127.0.0.1 that was free a moment ago. Another process may still take it before the
/// caller binds it, so callers retry on a bind failure.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}
