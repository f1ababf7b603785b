//! One worker's health-check connection: a long-lived HTTP/1.1 keep-alive connection owned by the
//! worker's check task, a request built once, and the answer's status line read with `httparse`.
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
//! `Content-Length` or chunked body — arrived, nothing more, and neither side asked to close.
//! Otherwise the next check connects afresh. A kept connection the worker closed while idle is
//! noticed before the request is written (or, racing with it, when nothing at all came back) and
//! replaced by a new one within the same check, as the pooled client did: an idle close is not a
//! failed check. A fresh connection gets no second try.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CheckFailure;

/// Longest response head read before giving up (hyper's default limit is of this order too).
const MAX_HEAD: usize = 16 * 1024;
/// Largest body skipped to keep a connection; anything bigger costs a reconnect, not a failure.
const MAX_KEPT_BODY: usize = 64 * 1024;
/// Most headers a check answer may carry.
const MAX_HEADERS: usize = 64;

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
    buf: Vec<u8>,
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
            buf: Vec::with_capacity(512),
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
        let mut start = 0; // where the current response head begins (after skipped 1xx heads)
        loop {
            if self.buf.len() > start {
                match parse(&self.buf[start..])? {
                    Parsed::Partial => {}
                    Parsed::Informational(head_len) => {
                        start += head_len;
                        continue;
                    }
                    Parsed::Final {
                        status,
                        head_len,
                        framing,
                        keep_alive,
                    } => {
                        let rest = &self.buf[start + head_len..];
                        let reusable = keep_alive && framing.is_complete(rest);
                        return Ok(Answer { status, reusable });
                    }
                }
                if self.buf.len() - start > MAX_HEAD {
                    return Err(Failure::Garbage("response head too large".into()));
                }
            }
            self.buf.reserve(512);
            let read = conn.stream.read_buf(&mut self.buf).await;
            match read {
                Ok(0) if self.buf.is_empty() => {
                    return Err(Failure::NoAnswer(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(0) => {
                    return Err(Failure::Broken(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of the answer",
                    )));
                }
                Ok(_) => {}
                Err(e) if self.buf.is_empty() => return Err(Failure::NoAnswer(e)),
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

/// How the body after a final head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (or a framing we don't follow): never reusable.
    UntilClose,
}

impl Framing {
    /// Whether `rest` is exactly the whole body: then the connection is clean for the next check.
    fn is_complete(self, rest: &[u8]) -> bool {
        match self {
            Framing::Empty => rest.is_empty(),
            Framing::Length(n) => rest.len() == n,
            Framing::Chunked => chunked_len(rest) == Some(rest.len()),
            Framing::UntilClose => false,
        }
    }
}

#[derive(Debug)]
enum Parsed {
    Partial,
    /// A 1xx head (not 101) of this length; the final answer follows.
    Informational(usize),
    Final {
        status: u16,
        head_len: usize,
        framing: Framing,
        keep_alive: bool,
    },
}

/// Parses one response head at the start of `bytes`.
fn parse(bytes: &[u8]) -> Result<Parsed, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(Failure::Garbage(e.to_string())),
    };
    let status = response.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Informational(head_len));
    }
    // HTTP/1.0 answers close unless told otherwise; we simply don't keep them.
    let mut keep_alive = response.version == Some(1);
    let mut framing = if status == 204 || status == 304 {
        Framing::Empty
    } else {
        Framing::UntilClose
    };
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut other_coding = false;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            match (parsed, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err(Failure::Garbage("bad content-length".into())),
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the last coding; anything else we can't delimit.
            let value = String::from_utf8_lossy(header.value);
            let last = value.rsplit(',').next().unwrap_or("").trim();
            chunked = last.eq_ignore_ascii_case("chunked");
            other_coding = !chunked;
        } else if header.name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(header.value);
            if value
                .split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("close"))
            {
                keep_alive = false;
            }
        }
    }
    if framing != Framing::Empty {
        framing = if other_coding {
            Framing::UntilClose
        } else if chunked {
            Framing::Chunked
        } else {
            match length {
                Some(n) if n <= MAX_KEPT_BODY => Framing::Length(n),
                Some(_) => Framing::UntilClose,
                None => Framing::UntilClose,
            }
        };
    }
    if status == 101 {
        keep_alive = false; // the connection is no longer HTTP
    }
    Ok(Parsed::Final {
        status,
        head_len,
        framing,
        keep_alive,
    })
}

/// Length of a complete chunked body (chunks, last chunk, trailers, final CRLF) at the start of
/// `bytes`, or None when it is incomplete, malformed or larger than we skip.
fn chunked_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let (size_len, size) = match httparse::parse_chunk_size(&bytes[at..]) {
            Ok(httparse::Status::Complete(found)) => found,
            _ => return None,
        };
        at += size_len;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).ok().filter(|&s| s <= MAX_KEPT_BODY)?;
        if bytes.len() < at + size + 2 || &bytes[at + size..at + size + 2] != b"\r\n" {
            return None;
        }
        at += size + 2;
        if at > MAX_KEPT_BODY {
            return None;
        }
    }
    // Trailer fields, then an empty line.
    loop {
        let line_end = bytes[at..].windows(2).position(|w| w == b"\r\n")?;
        at += line_end + 2;
        if line_end == 0 {
            return Some(at);
        }
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

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let fake = Fake::start(|_| {
            Reply::Answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        })
        .await;
        let mut session = fake.session();
        for _ in 0..3 {
            assert_eq!(session.check().await, Ok(()));
        }
        assert_eq!(session.connects(), 3);
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
    fn chunked_bodies_are_measured() {
        assert_eq!(chunked_len(b"0\r\n\r\n"), Some(5));
        assert_eq!(chunked_len(b"2\r\nok\r\n0\r\n\r\n"), Some(12));
        assert_eq!(chunked_len(b"2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"), Some(20));
        assert_eq!(chunked_len(b"2\r\nok\r\n0\r\n"), None, "incomplete");
        assert_eq!(chunked_len(b"2\r\nokxx0\r\n\r\n"), None, "malformed");
    }
}
