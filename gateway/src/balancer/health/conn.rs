//! One worker's health-check connection: a long-lived HTTP/1.1 keep-alive connection owned by the
//! worker's check task, a request built once, and the answer read with the proxy's own HTTP/1
//! parser ([`crate::upstream::codec`]), so a check and a proxied request frame a worker's answer
//! by the same rules (RFC 9112 §6.3).
//!
//! Why not the pooled hyper client: with a thousand workers checked twice a second, the client's
//! per-check work (URI and request building, the pool's lookup and bookkeeping, a connection task
//! per worker with its own wake-ups) was most of the gateway's idle CPU. Here a check is one
//! `write` of prepared bytes and one or two `read`s into a reused buffer, in the check task itself.
//!
//! What counts is unchanged: only a 2xx status passes. Connect errors, a close or reset before the
//! answer, and anything that is not an HTTP/1.x response fail the check; the caller bounds it with
//! the check timeout (dropping a check midway drops its connection, so a late answer is never
//! mistaken for the next one's).
//!
//! The connection is kept only while it is known to be clean: the whole answer — head and a
//! `Content-Length` or chunked body of at most 64 KiB — arrived with the head, nothing more, and
//! the codec says the connection may carry another exchange (no `close`, HTTP/1.0 only with
//! `keep-alive`, no suspect framing such as both `Content-Length` and `Transfer-Encoding`).
//! Otherwise the next check connects afresh. A kept connection the worker closed while idle is
//! noticed before the request is written (or, racing with it, when nothing at all came back) and
//! replaced by a new one within the same check, as the pooled client did: an idle close is not a
//! failed check. A fresh connection gets no second try.

use std::io;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckFailure;
use crate::upstream::codec::{self, Chunk, ChunkedDecoder, Parsed, ResponseFraming};

/// Longest response head read before giving up (hyper's default limit is of this order too).
const MAX_HEAD: usize = 16 * 1024;
/// Largest body skipped to keep a connection; anything bigger costs a reconnect, not a failure.
const MAX_KEPT_BODY: usize = 64 * 1024;

/// A worker's check state: its prepared request and, between checks, its open connection.
#[derive(Debug)]
pub struct Session {
    /// `host:port` as configured: resolved on each connect, so DNS changes are followed.
    authority: String,
    /// `GET <path> HTTP/1.1` with `Host` and `User-Agent`, built once.
    request: Box<[u8]>,
    /// The open connection, taken out during a check and put back only when it ended cleanly.
    conn: Option<Conn>,
    /// Response bytes; reused across checks and connections.
    buf: BytesMut,
    /// Connections opened so far (tests and diagnostics).
    connects: u64,
}

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
}

/// Why a check did not pass, before it is put into words.
#[derive(Debug)]
enum Failure {
    /// Could not connect (refused, unreachable, name not resolved).
    Connect(io::Error),
    /// The connection failed or closed before any byte of an answer (retried once when reused).
    NoAnswer(io::Error),
    /// The connection failed or closed partway through the answer.
    Broken(io::Error),
    /// The bytes were not an HTTP/1.x response.
    Garbage(String),
    /// A well-formed answer with a non-2xx status.
    Status(u16),
}

impl Failure {
    /// The failure as the health machine sees it: in words, and whether the connect was refused.
    fn into_check(self) -> CheckFailure {
        let refused = matches!(&self, Failure::Connect(e) if matches!(
            e.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
        ));
        CheckFailure {
            reason: self.describe(),
            refused,
        }
    }

    fn describe(self) -> String {
        match self {
            Failure::Connect(e) => format!("connection failed: {e}"),
            Failure::NoAnswer(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                "request failed: connection closed before an answer".into()
            }
            Failure::NoAnswer(e) | Failure::Broken(e) => format!("request failed: {e}"),
            Failure::Garbage(what) => format!("request failed: invalid HTTP answer ({what})"),
            Failure::Status(code) => format!("answered {code}"),
        }
    }
}

/// How the answer ended, for deciding whether the connection can serve the next check.
struct Answer {
    status: u16,
    reusable: bool,
}

impl Session {
    /// A session for the worker at `authority` (`host:port`), checking `path`.
    pub fn new(authority: &str, path: &str) -> Self {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: herd-gateway-health\r\n\r\n"
        );
        Session {
            authority: authority.to_string(),
            request: request.into_bytes().into_boxed_slice(),
            conn: None,
            buf: BytesMut::with_capacity(512),
            connects: 0,
        }
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// One check: Ok on a 2xx answer, otherwise why not. Cancel-safe in the sense the caller
    /// needs: dropped midway, it leaves no connection behind.
    pub async fn check(&mut self) -> Result<(), CheckFailure> {
        let kept = self.conn.take().and_then(Conn::still_open);
        let reused = kept.is_some();
        let mut conn = match kept {
            Some(conn) => conn,
            None => self.connect().await.map_err(Failure::into_check)?,
        };
        let mut outcome = self.exchange(&mut conn).await;
        if reused && matches!(outcome, Err(Failure::NoAnswer(_))) {
            // The worker closed the idle connection as we wrote: one try on a new one.
            conn = self.connect().await.map_err(Failure::into_check)?;
            outcome = self.exchange(&mut conn).await;
        }
        let answer = outcome.map_err(Failure::into_check)?;
        if answer.reusable {
            self.conn = Some(conn);
        }
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(Failure::Status(answer.status).into_check())
        }
    }

    async fn connect(&mut self) -> Result<Conn, Failure> {
        self.connects += 1;
        let stream = match self.authority.parse::<SocketAddr>() {
            Ok(addr) => TcpStream::connect(addr).await,
            // A name: every address it resolves to, in order (the connect fails with the last
            // error); resolving goes through the blocking pool, but only on a (re)connect.
            Err(_) => TcpStream::connect(self.authority.as_str()).await,
        }
        .map_err(Failure::Connect)?;
        // The request is one small write answered before the next: Nagle would only delay it.
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream })
    }

    /// Writes the request and reads one answer on `conn`.
    async fn exchange(&mut self, conn: &mut Conn) -> Result<Answer, Failure> {
        conn.stream
            .write_all(&self.request)
            .await
            .map_err(Failure::NoAnswer)?;
        self.buf.clear();
        // Whether any byte of an answer came (skipped 1xx heads included): a close before that
        // is `NoAnswer` (retried once on a reused connection), after it `Broken`.
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                match codec::parse_response(&mut self.buf, &Method::GET, false, false) {
                    Ok(Parsed::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(Failure::Garbage("response head too large".into()));
                    }
                    Ok(Parsed::Partial) => {}
                    Ok(Parsed::Interim(head_len)) => {
                        self.buf.advance(head_len);
                        continue;
                    }
                    Ok(Parsed::Complete(head, _)) => {
                        // `buf` now holds what came after the head.
                        let reusable = head.keep_alive && whole_body(head.framing, &mut self.buf);
                        return Ok(Answer {
                            status: head.status.as_u16(),
                            reusable,
                        });
                    }
                    Err(e) => return Err(Failure::Garbage(e.0.to_string())),
                }
            }
            self.buf.reserve(512);
            let read = conn.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if !answered => {
                    return Err(Failure::NoAnswer(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => {
                    return Err(Failure::Broken(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of the answer",
                    )));
                }
                Ok(_) => answered = true,
                Err(e) if !answered => return Err(Failure::NoAnswer(e)),
                Err(e) => return Err(Failure::Broken(e)),
            }
        }
    }
}

impl Conn {
    /// The connection if it looks usable: nothing has arrived on it since the last answer (no
    /// close, no reset, no stray bytes). Costs at most one non-blocking read.
    fn still_open(self) -> Option<Conn> {
        let mut probe = [0u8; 1];
        match self.stream.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(self),
            _ => None,
        }
    }
}

/// Whether `rest`, the bytes that came with the head, is exactly the whole body framed as
/// `framing` and at most [`MAX_KEPT_BODY`]: then the connection is clean for the next check.
/// A body still on its way, a malformed one or extra bytes only cost a new connection (the check
/// is decided by the status); `rest` may be consumed.
fn whole_body(framing: ResponseFraming, rest: &mut BytesMut) -> bool {
    match framing {
        ResponseFraming::Empty => rest.is_empty(),
        ResponseFraming::Length(n) => n <= MAX_KEPT_BODY as u64 && rest.len() as u64 == n,
        ResponseFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            let mut body = 0;
            loop {
                match decoder.next(rest) {
                    Ok(Chunk::Data(data)) => {
                        body += data.len();
                        if body > MAX_KEPT_BODY {
                            return false;
                        }
                    }
                    Ok(Chunk::End) => return rest.is_empty(),
                    Ok(Chunk::NeedMore) | Err(_) => return false,
                }
            }
        }
        ResponseFraming::UntilClose => false,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    /// What the scripted worker does with the n-th request it reads (counted over all
    /// connections).
    #[derive(Clone)]
    pub(crate) enum Reply {
        /// Writes these bytes and waits for the next request.
        Answer(&'static [u8]),
        /// Writes these bytes and closes the connection at once.
        AnswerAndClose(&'static [u8]),
        /// Closes the connection without answering.
        Close,
        /// Never answers (a SIGSTOPped process, seen from outside).
        Hang,
    }

    /// A scripted worker on 127.0.0.1:0 that counts connections and requests.
    pub(crate) struct Fake {
        pub(crate) addr: SocketAddr,
        pub(crate) accepted: Arc<AtomicUsize>,
        pub(crate) requests: Arc<AtomicUsize>,
    }

    impl Fake {
        pub(crate) async fn start(reply: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Fake {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(AtomicUsize::new(0));
            let reply = Arc::new(reply);
            let (a, r) = (accepted.clone(), requests.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    a.fetch_add(1, Ordering::SeqCst);
                    let (reply, r) = (reply.clone(), r.clone());
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = BufReader::new(read).lines();
                        loop {
                            // A request: lines up to the empty one.
                            let mut first = true;
                            loop {
                                match lines.next_line().await {
                                    Ok(Some(line)) if line.is_empty() => break,
                                    Ok(Some(line)) => {
                                        if first {
                                            assert_eq!(line, "GET /readyz HTTP/1.1");
                                            first = false;
                                        }
                                    }
                                    _ => return,
                                }
                            }
                            let n = r.fetch_add(1, Ordering::SeqCst);
                            match reply(n) {
                                Reply::Answer(bytes) => {
                                    if write.write_all(bytes).await.is_err() {
                                        return;
                                    }
                                }
                                Reply::AnswerAndClose(bytes) => {
                                    let _ = write.write_all(bytes).await;
                                    return;
                                }
                                Reply::Close => return,
                                Reply::Hang => {
                                    std::future::pending::<()>().await;
                                }
                            }
                        }
                    });
                }
            });
            Fake {
                addr,
                accepted,
                requests,
            }
        }

        fn session(&self) -> Session {
            Session::new(&self.addr.to_string(), "/readyz")
        }
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";

    #[tokio::test]
    async fn one_connection_serves_many_checks() {
        let fake = Fake::start(|_| Reply::Answer(OK)).await;
        let mut session = fake.session();
        for _ in 0..20 {
            assert_eq!(session.check().await, Ok(()));
        }
        assert_eq!(fake.requests.load(Ordering::SeqCst), 20);
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1, "keep-alive reused");
        assert_eq!(session.connects(), 1);
    }

    #[tokio::test]
    async fn chunked_and_empty_bodies_keep_the_connection() {
        let fake = Fake::start(|n| {
            Reply::Answer(match n % 3 {
                0 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nok\n\r\n0\r\n\r\n",
                1 => b"HTTP/1.1 204 No Content\r\n\r\n",
                _ => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            })
        })
        .await;
        let mut session = fake.session();
        for _ in 0..9 {
            assert_eq!(session.check().await, Ok(()));
        }
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_worker_closing_between_checks_is_not_a_failure() {
        // Answers, announcing nothing, then closes the connection.
        let fake = Fake::start(|_| Reply::AnswerAndClose(OK)).await;
        let mut session = fake.session();
        for _ in 0..4 {
            assert_eq!(session.check().await, Ok(()));
            // Let the close arrive before the next check (the common case).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 4);
        assert_eq!(
            fake.requests.load(Ordering::SeqCst),
            4,
            "closed ones were not written to"
        );
    }

    #[tokio::test]
    async fn a_close_racing_with_the_request_gets_one_more_try() {
        // Every second request on a connection is answered with a close, without the answer.
        let fake = Fake::start(|n| {
            if n == 1 {
                Reply::Close
            } else {
                Reply::Answer(OK)
            }
        })
        .await;
        let mut session = fake.session();
        assert_eq!(session.check().await, Ok(()));
        // No pause: the next request is written on the kept connection right away; the worker
        // reads it and closes. The check must still pass, on a new connection.
        assert_eq!(session.check().await, Ok(()));
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 2);
    }

    /// Three checks against a worker that always answers `answer`, each passing: how many
    /// connections they took.
    async fn connects_for_three_passes(answer: &'static [u8]) -> u64 {
        let fake = Fake::start(move |_| Reply::Answer(answer)).await;
        let mut session = fake.session();
        for _ in 0..3 {
            assert_eq!(session.check().await, Ok(()));
        }
        session.connects()
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(connects_for_three_passes(answer).await, 3);
    }

    #[tokio::test]
    async fn non_2xx_fails_and_keeps_the_connection() {
        let fake = Fake::start(|n| {
            Reply::Answer(if n == 1 {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\ndraining\n"
            } else {
                OK
            })
        })
        .await;
        let mut session = fake.session();
        assert_eq!(session.check().await, Ok(()));
        assert_eq!(session.check().await, Err("answered 503".into()));
        assert_eq!(session.check().await, Ok(()));
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_close_without_answer_on_a_fresh_connection_fails() {
        let fake = Fake::start(|_| Reply::Close).await;
        let mut session = fake.session();
        let error = session.check().await.unwrap_err();
        assert!(error.contains("closed before an answer"), "{error}");
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 1, "no second try");
    }

    #[tokio::test]
    async fn garbage_fails() {
        for garbage in [
            &b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..],
            b"HTTP/1.1 2OO OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        ] {
            let fake = Fake::start(move |_| Reply::Answer(garbage)).await;
            let mut session = fake.session();
            let error = session.check().await.unwrap_err();
            assert!(error.contains("invalid HTTP answer"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_truncated_answer_fails() {
        let fake = Fake::start(|_| Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-le")).await;
        let mut session = fake.session();
        // The fake then waits for the next request; close it from our side by timing out.
        let result = tokio::time::timeout(Duration::from_millis(200), session.check()).await;
        assert!(result.is_err(), "a partial head is not an answer");
        assert!(
            session.conn.is_none(),
            "a check dropped midway leaves no connection"
        );
    }

    #[tokio::test]
    async fn refused_fails_as_a_connect_error() {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let mut session = Session::new(&addr.to_string(), "/readyz");
        let error = session.check().await.unwrap_err();
        assert!(error.starts_with("connection failed"), "{error}");
        assert!(error.refused, "a refusal is told apart from other failures");
    }

    #[tokio::test]
    async fn unclean_endings_are_not_reused() {
        // No length: delimited by close. Extra bytes after the body: out of step.
        let fake = Fake::start(|n| {
            Reply::Answer(if n % 2 == 0 {
                b"HTTP/1.1 200 OK\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"
            })
        })
        .await;
        let mut session = fake.session();
        for _ in 0..4 {
            assert_eq!(session.check().await, Ok(()));
        }
        assert_eq!(session.connects(), 4);
    }

    #[test]
    fn whole_bodies_are_recognised() {
        let whole = |framing, bytes: &[u8]| whole_body(framing, &mut BytesMut::from(bytes));
        assert!(whole(ResponseFraming::Chunked, b"0\r\n\r\n"));
        assert!(whole(ResponseFraming::Chunked, b"2\r\nok\r\n0\r\n\r\n"));
        assert!(whole(
            ResponseFraming::Chunked,
            b"2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"
        ));
        assert!(
            !whole(ResponseFraming::Chunked, b"2\r\nok\r\n0\r\n"),
            "incomplete"
        );
        assert!(
            !whole(ResponseFraming::Chunked, b"2\r\nokxx0\r\n\r\n"),
            "malformed"
        );
        assert!(
            !whole(ResponseFraming::Chunked, b"0\r\n\r\nX"),
            "extra bytes"
        );
        assert!(whole(ResponseFraming::Length(2), b"ok"));
        assert!(!whole(ResponseFraming::Length(3), b"ok"));
        assert!(whole(ResponseFraming::Empty, b""));
        assert!(!whole(ResponseFraming::UntilClose, b""));
        let big = MAX_KEPT_BODY + 1;
        let mut chunked = format!("{big:x}\r\n").into_bytes();
        chunked.extend(std::iter::repeat_n(b'a', big));
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        assert!(
            !whole(ResponseFraming::Chunked, &chunked),
            "too large to skip"
        );
        assert!(!whole(ResponseFraming::Length(big as u64), &chunked[..big]));
    }

    /// Where the checker's old parser and the proxy's disagreed, the check now follows RFC 9112
    /// §6.3 as the proxy does.
    #[tokio::test]
    async fn content_length_follows_rfc_9112() {
        // `+3` is not `1*DIGIT`: the old `usize` parse took it (the check passed).
        let fake =
            Fake::start(|_| Reply::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\nok\n"))
                .await;
        let error = fake.session().check().await.unwrap_err();
        assert!(error.contains("invalid HTTP answer"), "{error}");

        // A list of identical values is that value (§6.3 item 5): the old parser refused it.
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\nok\n";
        assert_eq!(
            connects_for_three_passes(answer).await,
            1,
            "whole body: kept"
        );

        // Transfer-Encoding overrides Content-Length, and such an answer "ought to be handled as
        // an error" (§6.3 item 3): it counts, but its connection is not kept (the old parser
        // kept it).
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n3\r\nok\n\r\n0\r\n\r\n";
        assert_eq!(connects_for_three_passes(answer).await, 3);
    }

    #[tokio::test]
    async fn an_unasked_protocol_switch_fails() {
        let fake = Fake::start(|_| {
            Reply::Answer(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n")
        })
        .await;
        let mut session = fake.session();
        let error = session.check().await.unwrap_err();
        assert!(error.contains("unexpected protocol switch"), "{error}");
        assert!(session.conn.is_none());
    }
}
