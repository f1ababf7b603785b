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
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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
}
