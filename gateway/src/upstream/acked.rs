//! How far the worker's TCP has acknowledged a connection's bytes: whether a request that met a
//! connection its worker had closed provably never reached the worker's program.
//!
//! A worker's kernel acknowledges bytes once they are in its socket, read or not, and its FIN
//! acknowledges everything it had received when it was sent. So when the worker's FIN comes
//! before any answer and the worker's TCP acknowledged not one byte of the request, the request
//! arrived after the worker had closed its side of the connection (idle, shutting down, or after
//! an answer): no program read it, and even a POST can go to another worker. That is the race of
//! a worker closing a kept-alive connection just as the gateway sends on it, which without this
//! ended a POST in a 502 (docs/security.md, "A POST that met a closed connection"). A reset with
//! no FIN before it proves nothing: a program that read part of a request and died before its
//! kernel's delayed acknowledgement went out resets the connection as well, and Linux reads no
//! acknowledgement off a reset.
//!
//! The count is Linux's `TCP_INFO` `tcpi_bytes_acked` (kernel 4.1 and later), read only on that
//! failure path: one `getsockopt`, nothing per request. Neither std, socket2 (rust-lang/socket2#362)
//! nor nix offers `TCP_INFO`, hence the one `unsafe` block of the workspace, here.

use std::os::fd::AsRawFd;

/// Bytes of an established connection's data, from the first, that the peer's TCP acknowledged;
/// `None` where the kernel does not say (older than 4.1, or the call failed). (The kernel's count
/// includes the SYN, which takes a sequence number of its own: one less is the data's.)
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
pub(super) fn bytes_acked(socket: &impl AsRawFd) -> Option<u64> {
    const SIZE: usize = std::mem::size_of::<libc::tcp_info>();
    const ACKED_END: usize = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    let mut length = SIZE as libc::socklen_t;
    #[allow(unsafe_code)]
    // SAFETY: `tcp_info` holds integers only, so all zeroes is a valid value; `getsockopt` writes
    // at most `length` bytes into it and sets `length` to how many it wrote.
    let (info, result) = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let result = libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut length,
        );
        (info, result)
    };
    (result == 0 && length as usize >= ACKED_END).then(|| info.tcpi_bytes_acked.saturating_sub(1))
}

/// Elsewhere nothing says (libc's `tcp_info` has the count on Linux's gnu and musl targets only):
/// every request that met a closed connection may have been read.
#[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
pub(super) fn bytes_acked(_socket: &impl AsRawFd) -> Option<u64> {
    None
}

#[cfg(all(
    test,
    target_os = "linux",
    any(target_env = "gnu", target_env = "musl")
))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn counts_what_the_peer_took_and_not_what_met_a_closed_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(bytes_acked(&client), Some(0), "nothing sent yet");

        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        server.write_all(b"ok").unwrap(); // its segment acknowledges the five bytes
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(bytes_acked(&client), Some(5));

        // The peer closes; what is sent after its FIN meets a closed socket: a reset, no ack.
        drop(server);
        let mut end = [0u8; 1];
        assert_eq!(client.read(&mut end).unwrap(), 0, "the peer's FIN");
        client.write_all(b"late").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50)); // the reset is in
        assert_eq!(
            bytes_acked(&client),
            Some(5),
            "the late bytes were never taken"
        );
    }
}
