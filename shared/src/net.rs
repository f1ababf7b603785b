//! Listening sockets with the accept queue a server under load needs.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Accept-queue length herd's servers listen with (the kernel caps it at `net.core.somaxconn`).
/// tokio's `TcpListener::bind` uses 128, which a proxy or load generator opening a few hundred
/// connections at once overflows (they then hang in SYN retransmits); HAProxy and nginx use 4096.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (with `SO_REUSEADDR`, as `TcpListener::bind` does) and listens with a queue of
/// `backlog` connections.
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    bound(addr)?.listen(backlog)
}

/// [`listen`], with `TCP_NODELAY` set on the listening socket: on Linux every connection it
/// accepts starts with it set (the kernel copies it from the listener), so a server that wants
/// it on every connection needs no `setsockopt` per connection
/// ([`ACCEPTED_INHERIT_NO_DELAY`]).
pub fn listen_no_delay(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = bound(addr)?;
    socket.set_nodelay(true)?;
    socket.listen(backlog)
}

/// Whether connections accepted from a [`listen_no_delay`] listener have `TCP_NODELAY` set
/// already: on Linux (checked by this module's tests); elsewhere set it on each.
pub const ACCEPTED_INHERIT_NO_DELAY: bool = cfg!(target_os = "linux");

fn bound(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listens_on_a_free_port_and_accepts() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr);
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        assert!(accepted.is_ok() && connected.is_ok());
    }

    #[tokio::test]
    async fn connections_accepted_from_a_no_delay_listener_have_no_delay_set() {
        for (listener, no_delay) in [
            (
                listen_no_delay("127.0.0.1:0".parse().unwrap(), 16).unwrap(),
                ACCEPTED_INHERIT_NO_DELAY,
            ),
            (listen("127.0.0.1:0".parse().unwrap(), 16).unwrap(), false),
        ] {
            let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
            let (accepted, connected) = tokio::join!(listener.accept(), client);
            let (accepted, _) = accepted.unwrap();
            assert_eq!(accepted.nodelay().unwrap(), no_delay);
            drop(connected);
        }
    }
}
