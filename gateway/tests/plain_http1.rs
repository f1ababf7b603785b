//! The gateway's own HTTP/1.1 server (`plain_http1`), from a raw client socket: pipelined
//! requests in order, HEAD, chunked and empty answers, a head in pieces, `Connection: close`,
//! small bodies read with their head, other bodies handed to hyper in the middle of a
//! keep-alive connection, and the gateway's own error answers. The worker is a raw socket too, so the answers are exactly these
//! bytes.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::Gateway;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIG: usize = 1 << 20;

/// Answers of `raw_worker` with lines about the worker's own connection, as Node.js (first two),
/// Apache (third) and others send them: the path, and the header lines (body: `ok`, chunked
/// where they say so). The worker closes its connection after an answer that says
/// `Connection: close`.
const CONNECTION_LINES: &[(&str, &str)] = &[
    (
        "/conn/chunked",
        "Content-Type: text/plain\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n",
    ),
    (
        "/conn/node",
        "Content-Type: text/plain\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
    ),
    (
        "/conn/apache",
        "Keep-Alive: timeout=5, max=100\r\nConnection: Keep-Alive\r\nX-Worker: Raw\r\nContent-Length: 2\r\n",
    ),
    (
        "/conn/middle",
        "X-Worker: Raw\r\nconnection:  keep-alive \r\nContent-Length: 2\r\n",
    ),
    (
        "/conn/close",
        "X-Worker: Raw\r\nContent-Length: 2\r\nConnection: close\r\n",
    ),
    // `close` is an option, not a header's name: a header named so stays, either way.
    (
        "/conn/close-header",
        "Connection: close\r\nClose: x\r\nX-Worker: Raw\r\nContent-Length: 2\r\n",
    ),
    // Through the map: two runs apart, a token naming a header.
    (
        "/conn/apart",
        "Connection: keep-alive\r\nX-Worker: Raw\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n",
    ),
    (
        "/conn/secret",
        "Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nX-Worker: Raw\r\nContent-Length: 2\r\n",
    ),
];

/// A worker answering by path with fixed bytes: `CONNECTION_LINES`, `/chunked` ("hello world" in two chunks, 30 ms
/// apart), `/204`, `/as-sent`, `/keep-alive`, `/bare-lf` (heads to write through or not),
/// `/big` (1 MiB of `x`), `/echo` (the request's body), anything else its own path as the body.
async fn raw_worker() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    let Some((method, path, body, head)) =
                        read_request(&mut stream, &mut buffer).await
                    else {
                        return;
                    };
                    if path == "/chunked" {
                        // The rest comes later: the gateway cannot know the length, and chunks.
                        let first =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                        if stream.write_all(first).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        if stream.write_all(b"6\r\n world\r\n0\r\n\r\n").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if let Some((_, lines)) = CONNECTION_LINES
                        .iter()
                        .find(|(answers, _)| *answers == path)
                    {
                        let chunked = lines.contains("Transfer-Encoding: chunked");
                        let body = if chunked { "2\r\nok\r\n" } else { "ok" };
                        let answer = format!("HTTP/1.1 200 OK\r\n{lines}\r\n{body}");
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        if chunked {
                            // The rest later (a streamed body): the gateway cannot know its
                            // length, and chunks it again for the client.
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            if stream.write_all(b"0\r\n\r\n").await.is_err() {
                                return;
                            }
                        }
                        if lines.to_ascii_lowercase().contains("connection: close") {
                            return; // as it said it would
                        }
                        continue;
                    }
                    if path == "/slow" {
                        tokio::time::sleep(Duration::from_millis(400)).await;
                    }
                    if path == "/until-close" {
                        // No length: the body runs until the worker closes; the gateway chunks it.
                        let answer = b"HTTP/1.1 200 OK\r\nX-Worker: Raw\r\n\r\nuntil close";
                        let _ = stream.write_all(answer).await;
                        return;
                    }
                    if path == "/identity" || path == "/short" {
                        // A stale length beside Transfer-Encoding, with what looks like a second
                        // answer in the body; or fewer bytes than declared. Then the worker closes.
                        let answer: &[u8] = if path == "/identity" {
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b"
                        };
                        let _ = stream.write_all(answer).await;
                        return;
                    }
                    let answer = match path.as_str() {
                        "/204" => b"HTTP/1.1 204 No Content\r\nx-worker: raw\r\n\r\n".to_vec(),
                        // The request head as the worker got it.
                        _ if path.starts_with("/head") => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
                            head.len()
                        )
                        .into_bytes(),
                        // Written through as they are: the worker's spelling, its own date and
                        // request id, a value with a tab.
                        "/as-sent" => b"HTTP/1.1 201 Created\r\nX-Worker: Raw\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nx-request-id: from-worker\r\nx-note: a\tb\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                        // Not written through: a hop-by-hop header to take out, the gateway's
                        // own header, bare LF line ends (all, or one), a length not in its
                        // plain form.
                        "/keep-alive" => b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=5\r\nx-worker: raw\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                        "/spoof" => b"HTTP/1.1 200 OK\r\nX-Herd-Gateway: spoofed\r\nx-worker: raw\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                        "/bare-lf" => b"HTTP/1.1 200 OK\nx-worker: raw\ncontent-length: 2\n\nok".to_vec(),
                        "/mixed-lf" => b"HTTP/1.1 200 OK\r\nx-worker: raw\ncontent-length: 2\r\n\r\nok".to_vec(),
                        "/long-zero" => b"HTTP/1.1 200 OK\r\nx-worker: raw\r\ncontent-length: 00\r\n\r\n".to_vec(),
                        "/big" => {
                            let mut answer =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n")
                                    .into_bytes();
                            answer.resize(answer.len() + BIG, b'x');
                            answer
                        }
                        "/echo" => {
                            let mut answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            answer.extend_from_slice(&body);
                            answer
                        }
                        _ if method == "HEAD" => {
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", path.len())
                                .into_bytes()
                        }
                        _ => format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-worker: raw\r\n\r\n{path}",
                            path.len()
                        )
                        .into_bytes(),
                    };
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one request (head and `Content-Length` body): method, path, body, and the head as it
/// came.
async fn read_request(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> Option<(String, String, Vec<u8>, String)> {
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
            while buffer.len() < end + 4 + length {
                read_some(stream, buffer).await?;
            }
            let body = buffer[end + 4..end + 4 + length].to_vec();
            buffer.drain(..end + 4 + length);
            let mut words = head.split(' ');
            let method = words.next()?.to_string();
            let path = words.next()?.to_string();
            return Some((method, path, body, head));
        }
        read_some(stream, buffer).await?;
    }
}

async fn read_some(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16384];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
        .await
        .expect("bytes within 5 s")
        .ok()?;
    if read == 0 {
        return None;
    }
    buffer.extend_from_slice(&chunk[..read]);
    Some(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A header's value in a head (first match, any case).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One response read from a client connection: its head, and its body (decoded when chunked;
/// none for a HEAD).
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).unwrap().parse().unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }
}

async fn read_answer(stream: &mut TcpStream, buffer: &mut Vec<u8>, head_only: bool) -> Answer {
    let end = loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            break end;
        }
        read_some(stream, buffer)
            .await
            .expect("a whole response head");
    };
    let head = String::from_utf8_lossy(&buffer[..end]).to_string();
    buffer.drain(..end + 4);
    let mut body = Vec::new();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head_only || status == 204 || status == 304 {
        return Answer { head, body };
    }
    if header(&head, "transfer-encoding") == Some("chunked") {
        loop {
            let line_end = loop {
                if let Some(at) = find(buffer, b"\r\n") {
                    break at;
                }
                read_some(stream, buffer).await.expect("a chunk size");
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buffer[..line_end]).unwrap(), 16)
                .unwrap();
            while buffer.len() < line_end + 2 + size + 2 {
                read_some(stream, buffer).await.expect("a chunk");
            }
            body.extend_from_slice(&buffer[line_end + 2..line_end + 2 + size]);
            buffer.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Answer { head, body };
            }
        }
    }
    let length: usize = header(&head, "content-length")
        .expect("a length")
        .parse()
        .unwrap();
    while buffer.len() < length {
        read_some(stream, buffer).await.expect("the whole body");
    }
    body.extend(buffer.drain(..length));
    Answer { head, body }
}

async fn gateway() -> Gateway {
    let worker = raw_worker().await;
    Gateway::start(&[], |c| {
        c.workers = vec![worker.to_string()];
        c.health.path = "/ok".into();
    })
    .await
}

/// [`gateway`], with a request path that buffers bodies up to 16 bytes: larger ones stream, as
/// hyper reads them.
async fn gateway_buffering_16_bytes() -> Gateway {
    let worker = raw_worker().await;
    Gateway::start(&[], move |c| {
        c.workers = vec![worker.to_string()];
        c.health.path = "/ok".into();
        c.retry.buffer_body_bytes = 16;
    })
    .await
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: gateway\r\n\r\n")
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_head_and_chunked_ones_keep_their_framing() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    // Five requests in one write: the answers come in order, each framed right (a stray byte
    // of one would break the next).
    let requests = [
        get("/a"),
        "HEAD /bb HTTP/1.1\r\nhost: gateway\r\n\r\n".into(),
        get("/chunked"),
        get("/204"),
        get("/ccc"),
    ];
    stream
        .write_all(requests.concat().as_bytes())
        .await
        .unwrap();
    let a = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(
        (a.status(), a.body.as_slice()),
        (200, &b"/a"[..]),
        "{}",
        a.head
    );
    assert_eq!(a.header("x-worker"), Some("raw"));
    assert!(a.header("x-herd-gateway").is_some(), "{}", a.head);
    assert!(a.header("x-request-id").is_some(), "{}", a.head);
    let head = read_answer(&mut stream, &mut buffer, true).await;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.header("content-length"),
        Some("3"),
        "HEAD keeps the worker's length: {}",
        head.head
    );
    let chunked = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(
        chunked.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        chunked.head
    );
    assert_eq!(chunked.body, b"hello world");
    let empty = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(empty.status(), 204);
    assert_eq!(empty.header("content-length"), None, "{}", empty.head);
    let c = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(c.body, b"/ccc");
    assert!(buffer.is_empty(), "nothing after the last answer");
    gw.shutdown().await;
}

#[tokio::test]
async fn a_head_in_pieces_and_a_big_body_arrive_whole() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(b"GET /big HTT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"P/1.1\r\nhost: gate").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(b"way\r\n\r\n").await.unwrap();
    let big = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(big.status(), 200);
    assert_eq!(big.header("content-length"), Some("1048576"));
    assert_eq!(big.body.len(), BIG);
    assert!(big.body.iter().all(|&b| b == b'x'));
    gw.shutdown().await;
}

/// Whether the gateway's own server still serves `stream`: it writes a worker's head through in
/// the worker's spelling (`X-Worker: Raw`), where hyper's server writes names in lower case.
async fn own_server_serves(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    stream.write_all(get("/as-sent").as_bytes()).await.unwrap();
    let answer = read_answer(stream, buffer, false).await;
    assert_eq!(answer.body, b"ok");
    answer.head.contains("\r\nX-Worker: Raw\r\n")
}

#[tokio::test]
async fn a_small_body_sent_with_its_head_is_read_by_the_gateways_own_server() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    // A POST with its body and a GET behind it, in one write; an empty body; a GET with a body.
    let post = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 5\r\n\r\nhello";
    stream
        .write_all(format!("{post}{}", get("/after")).as_bytes())
        .await
        .unwrap();
    let echoed = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(
        (echoed.status(), echoed.body.as_slice()),
        (200, &b"hello"[..])
    );
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.body,
        b"/after"
    );
    for (request, body) in [
        (
            "POST /echo HTTP/1.1\r\nhost: gateway\r\nContent-Length: 0\r\n\r\n",
            "",
        ),
        (
            "GET /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 3\r\n\r\nabc",
            "abc",
        ),
    ] {
        stream.write_all(request.as_bytes()).await.unwrap();
        let echoed = read_answer(&mut stream, &mut buffer, false).await;
        assert_eq!(echoed.body, body.as_bytes(), "{request:?}");
    }
    assert!(own_server_serves(&mut stream, &mut buffer).await);

    // A body larger than one read (8 KiB), in one write: what is there is read without waiting.
    let big = "b".repeat(20_000);
    let post =
        format!("POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 20000\r\n\r\n{big}");
    stream.write_all(post.as_bytes()).await.unwrap();
    let echoed = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(echoed.body, big.as_bytes());
    assert!(own_server_serves(&mut stream, &mut buffer).await);

    // What the worker gets: the client's lines as sent but its length, then the gateway's own
    // lines and one length, the gateway's; through the map (a line to strip), the same headers.
    for (extra, raw) in [
        ("", true),
        ("X-Secret: s\r\nConnection: X-Secret\r\n", false),
    ] {
        let post = format!(
            "POST /head-of-post HTTP/1.1\r\nHost: gw\r\n{extra}Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        stream.write_all(post.as_bytes()).await.unwrap();
        let head =
            String::from_utf8(read_answer(&mut stream, &mut buffer, false).await.body).unwrap();
        if raw {
            assert!(
                head.starts_with(
                    "POST /head-of-post HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nx-request-id: "
                ),
                "{head:?}"
            );
        } else {
            assert!(
                head.contains("\r\ncontent-type: application/json\r\n"),
                "{head:?}"
            );
            assert!(!head.to_ascii_lowercase().contains("secret"), "{head:?}");
        }
        assert_eq!(
            head.to_ascii_lowercase().matches("content-length:").count(),
            1,
            "{head:?}"
        );
        assert!(head.ends_with("\r\ncontent-length: 2"), "{head:?}");
    }
    assert!(own_server_serves(&mut stream, &mut buffer).await);
    gw.shutdown().await;
}

/// A body written right after its head, in a write of its own (as Python's `http.client` and
/// so `requests` send every request with a body), is waited for a moment and served by the
/// gateway's own server: it went to hyper whenever the head was read before the body came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_written_right_after_its_head_is_read_by_the_gateways_own_server() {
    let gw = gateway().await;
    let public = gw.public;
    let heads = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(public).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut heads = Vec::new();
        for _ in 0..20 {
            stream
                .write_all(b"POST /as-sent HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n")
                .unwrap();
            // Long enough for the gateway to read the head alone; within the wait (2 ms).
            std::thread::sleep(Duration::from_micros(500));
            stream.write_all(b"{\"user\":\"a\"}").unwrap();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            while !answer.ends_with(b"\r\n\r\nok") {
                let read = stream.read(&mut chunk).unwrap();
                assert!(read > 0, "closed: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&chunk[..read]);
            }
            heads.push(String::from_utf8_lossy(&answer).into_owned());
        }
        heads
    })
    .await
    .unwrap();
    // Most, not all: on a busy machine this thread may wake too late for the wait. Without it,
    // next to none (the head is read alone).
    let own = heads
        .iter()
        .filter(|head| head.contains("\r\nX-Worker: Raw\r\n"))
        .count();
    assert!(
        own >= heads.len() / 2,
        "{own} of {} by the own server",
        heads.len()
    );
    gw.shutdown().await;
}

/// A client whose requests are all left to hyper (chunked uploads here) stays with hyper once
/// the own server, given the connection back, served nothing before the next such request; one
/// that sends a plain request between two uploads gets the own server back after each.
#[tokio::test]
async fn a_connection_of_uploads_only_stays_with_hyper_and_one_of_mixed_requests_does_not() {
    let gw = gateway().await;
    let chunked = "POST /echo HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let upload = async |stream: &mut TcpStream, buffer: &mut Vec<u8>| {
        stream.write_all(chunked.as_bytes()).await.unwrap();
        assert_eq!(read_answer(stream, buffer, false).await.body, b"hello");
    };
    let mut mixed = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    for round in 0..3 {
        upload(&mut mixed, &mut buffer).await;
        assert!(
            own_server_serves(&mut mixed, &mut buffer).await
                || own_server_serves(&mut mixed, &mut buffer).await,
            "round {round}: given back"
        );
    }
    let mut uploads_only = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    for _ in 0..3 {
        upload(&mut uploads_only, &mut buffer).await;
    }
    for _ in 0..3 {
        assert!(!own_server_serves(&mut uploads_only, &mut buffer).await);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_body_not_whole_with_its_head_goes_to_hyper_and_the_connection_goes_on() {
    let gw = gateway_buffering_16_bytes().await;
    let cases: [(&str, &[&str]); 3] = [
        // The body after a pause: the head alone was read.
        (
            "head, then the body",
            &[
                "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 5\r\n\r\n",
                "hello",
            ],
        ),
        // Over what the request path buffers (16 bytes here): it streams, as hyper reads it.
        (
            "larger than the buffer",
            &[
                "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 17\r\n\r\nseventeen bytes!!",
            ],
        ),
        (
            "chunked",
            &[
                "POST /echo HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ],
        ),
    ];
    for (case, pieces) in cases {
        let mut stream = TcpStream::connect(gw.public).await.unwrap();
        let mut buffer = Vec::new();
        assert!(own_server_serves(&mut stream, &mut buffer).await, "{case}");
        for piece in pieces {
            stream.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let echoed = read_answer(&mut stream, &mut buffer, false).await;
        let expected: &[u8] = if case == "larger than the buffer" {
            b"seventeen bytes!!"
        } else {
            b"hello"
        };
        assert_eq!(
            (echoed.status(), echoed.body.as_slice()),
            (200, expected),
            "{case}: {}",
            echoed.head
        );
        // Hyper gives the connection back once between requests (two tries: a GET that came
        // before hyper looked for its next request is hyper's to serve).
        assert!(
            own_server_serves(&mut stream, &mut buffer).await
                || own_server_serves(&mut stream, &mut buffer).await,
            "{case}: the own server serves on"
        );
        stream.write_all(get("/last").as_bytes()).await.unwrap();
        assert_eq!(
            read_answer(&mut stream, &mut buffer, false).await.body,
            b"/last",
            "{case}"
        );
    }
    // Two lengths in one line: left to hyper, and refused by the request path as before.
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    let list = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 5, 5\r\n\r\nhello";
    stream.write_all(list.as_bytes()).await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.status(),
        400
    );
    gw.shutdown().await;
}

/// Uploads hyper read (a body after its head, one larger than the request path buffers, a
/// chunked one): once answered, their idle connections close at once when the gateway stops, as
/// after a GET. They waited for the drain timeout (10 s), as if a body might still be unread.
#[tokio::test]
async fn idle_connections_hyper_read_an_upload_on_close_at_once_when_the_gateway_stops() {
    let gw = gateway_buffering_16_bytes().await;
    let uploads: [&[&str]; 3] = [
        &[
            "PUT /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 5\r\n\r\n",
            "hello",
        ],
        &["PUT /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 17\r\n\r\nseventeen bytes!!"],
        &[
            "PUT /echo HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ],
    ];
    let mut idle = Vec::new();
    for pieces in uploads {
        let mut stream = TcpStream::connect(gw.public).await.unwrap();
        let mut buffer = Vec::new();
        for piece in pieces {
            stream.write_all(piece.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let echoed = read_answer(&mut stream, &mut buffer, false).await;
        assert_eq!(echoed.status(), 200, "{pieces:?}: {}", echoed.head);
        idle.push(stream);
    }
    // Give each connection's task its read, the one that finds it between requests.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    gw.shutdown().await;
    let stopped = started.elapsed();
    for mut stream in idle {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
            .await
            .expect("closed")
            .unwrap();
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    assert!(
        stopped < Duration::from_secs(2),
        "stopped after {stopped:?}"
    );
}

#[tokio::test]
async fn connection_close_closes_after_the_answer() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    stream
        .write_all(b"GET /bye HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let bye = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(bye.body, b"/bye");
    assert_eq!(bye.header("connection"), Some("close"), "{}", bye.head);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s");
    assert!(matches!(read, Ok(0)), "{read:?} {rest:?}");

    // A client without keep-alive (a connection per request): its head still goes through as
    // its lines, without the `Connection` line (the worker connection is the gateway's own),
    // and its connection closes after the answer, which says so.
    for connection in ["Connection: close", "connection:  CLOSE "] {
        let mut stream = TcpStream::connect(gw.public).await.unwrap();
        let mut buffer = Vec::new();
        let request =
            format!("GET /head HTTP/1.1\r\nHost: gw\r\n{connection}\r\nUser-Agent: t/1\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        let worker_got = String::from_utf8(answer.body.clone()).unwrap();
        assert!(
            worker_got
                .starts_with("GET /head HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\nx-request-id: "),
            "raw, the line left out: {worker_got:?}"
        );
        assert!(
            !worker_got.to_ascii_lowercase().contains("close"),
            "{worker_got:?}"
        );
        assert_eq!(
            answer.header("connection"),
            Some("close"),
            "{}",
            answer.head
        );
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s");
        assert!(matches!(read, Ok(0)), "{read:?} {rest:?}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn the_gateways_own_answers_are_framed_and_dated() {
    // No worker at all: the gateway answers 503 itself.
    let gw = Gateway::start(&[], |c| c.workers = Vec::new()).await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(get("/").as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(answer.status(), 503, "{}", answer.head);
    assert!(
        answer
            .head
            .starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{}",
        answer.head
    );
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str())
    );
    let date = answer.header("date").expect("a Date header");
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(json["error"].is_string(), "{json}");
    // A request without Host is the request path's 400, on the same connection.
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.status(),
        400
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_worker_body_that_breaks_its_framing_never_reaches_the_next_answer() {
    let gw = gateway().await;
    // `Transfer-Encoding` beside `Content-Length`: the length is stale, the body is everything
    // until the worker closes, and goes to the client as one body.
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(get("/identity").as_bytes()).await.unwrap();
    let identity = read_answer(&mut stream, &mut buffer, false).await;
    assert_ne!(
        identity.header("content-length"),
        Some("5"),
        "{}",
        identity.head
    );
    assert!(
        identity.body.ends_with(b"evil"),
        "{:?}",
        String::from_utf8_lossy(&identity.body)
    );
    stream.write_all(get("/next").as_bytes()).await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.body,
        b"/next"
    );

    // Fewer bytes than declared: the client's connection is cut after what came, and nothing
    // else is ever read as part of that body.
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    stream
        .write_all(format!("{}{}", get("/short"), get("/after")).as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("only ten b"), "{text}");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_answer_written_after_the_gateway_began_to_stop_says_connection_close() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    // Begun before the stop, answered after it: the client must not reuse the connection.
    stream.write_all(get("/slow").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(gw.shutdown());
    let slow = read_answer(&mut stream, &mut buffer, false).await;
    assert_eq!(slow.body, b"/slow");
    assert_eq!(slow.header("connection"), Some("close"), "{}", slow.head);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_worker_head_is_written_through_as_sent_when_nothing_in_it_must_change() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    stream.write_all(get("/as-sent").as_bytes()).await.unwrap();
    let answer = read_answer(&mut stream, &mut buffer, false).await;
    assert!(answer.head.starts_with("HTTP/1.1 201 Created\r\nX-Worker: Raw\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nx-request-id: from-worker\r\nx-note: a\tb\r\nContent-Length: 2\r\n"), "{}", answer.head);
    assert_eq!(answer.body, b"ok");
    // The gateway adds its own headers, and no second date, length or request id.
    assert!(answer.header("x-herd-gateway").is_some(), "{}", answer.head);
    for name in ["date", "content-length", "x-request-id"] {
        let count = answer
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .count();
        assert_eq!(count, 1, "{name}: {}", answer.head);
    }
    assert!(
        !answer.head.contains("transfer-encoding"),
        "{}",
        answer.head
    );

    // A hop-by-hop header is taken out, the gateway's own replaces the worker's, bare LF line
    // ends become CRLF.
    for path in [
        "/keep-alive",
        "/spoof",
        "/bare-lf",
        "/mixed-lf",
        "/long-zero",
    ] {
        stream.write_all(get(path).as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        let body: &[u8] = if path == "/long-zero" { b"" } else { b"ok" };
        assert_eq!(answer.body, body, "{path}");
        let gateways: Vec<&str> = answer
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("x-herd-gateway:"))
            .collect();
        assert_eq!(gateways.len(), 1, "{path}: {}", answer.head);
        assert!(!gateways[0].contains("spoofed"), "{path}: {}", answer.head);
        let lengths: Vec<&str> = answer
            .head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(
            lengths,
            [format!("content-length: {}", body.len())],
            "{path}: {}",
            answer.head
        );
        assert_eq!(
            answer.header("x-worker"),
            Some("raw"),
            "{path}: {}",
            answer.head
        );
        assert!(
            answer.header("keep-alive").is_none(),
            "{path}: {}",
            answer.head
        );
        let bare = answer.head.replace("\r\n", "");
        assert!(!bare.contains('\n'), "{path}: CRLF only: {:?}", answer.head);
        assert!(
            answer.header("x-request-id").is_some(),
            "{path}: {}",
            answer.head
        );
    }
    // A raw head without a length: the body is chunked after the worker's lines.
    let mut other = TcpStream::connect(gw.public).await.unwrap();
    let mut other_buffer = Vec::new();
    other
        .write_all(get("/until-close").as_bytes())
        .await
        .unwrap();
    let answer = read_answer(&mut other, &mut other_buffer, false).await;
    assert!(
        answer
            .head
            .starts_with("HTTP/1.1 200 OK\r\nX-Worker: Raw\r\n"),
        "{}",
        answer.head
    );
    assert_eq!(
        answer.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        answer.head
    );
    assert_eq!(answer.body, b"until close");

    // The connection still carries answers after all of them.
    stream.write_all(get("/next").as_bytes()).await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.body,
        b"/next"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_worker_heads_lines_about_its_own_connection_are_left_out_and_the_rest_written_through() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    // Written through (the worker's spelling kept) without the connection's lines, wherever
    // they are; after the worker's `Connection: close` too, and the client's connection stays
    // open all along (each answer below comes on it).
    for (path, kept) in [
        (
            "/conn/node",
            "Content-Type: text/plain\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n",
        ),
        ("/conn/chunked", "Content-Type: text/plain\r\n"),
        ("/conn/apache", "X-Worker: Raw\r\nContent-Length: 2\r\n"),
        ("/conn/middle", "X-Worker: Raw\r\nContent-Length: 2\r\n"),
        ("/conn/close", "X-Worker: Raw\r\nContent-Length: 2\r\n"),
        (
            "/conn/close-header",
            "Close: x\r\nX-Worker: Raw\r\nContent-Length: 2\r\n",
        ),
        (
            "/conn/node",
            "Content-Type: text/plain\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n",
        ),
    ] {
        stream.write_all(get(path).as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        let expected = format!("HTTP/1.1 200 OK\r\n{kept}x-request-id: ");
        assert!(
            answer.head.starts_with(&expected),
            "{path}: {}",
            answer.head
        );
        assert_eq!(answer.body, b"ok", "{path}");
        let lower = answer.head.to_ascii_lowercase();
        assert!(
            !lower.contains("connection") && !lower.contains("keep-alive"),
            "{path}: {}",
            answer.head
        );
        // One framing: the worker's length, or (streamed) the gateway's own chunked coding.
        let framings: Vec<&str> = answer
            .head
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.starts_with("content-length:") || l.starts_with("transfer-encoding:")
            })
            .collect();
        let expected = if path == "/conn/chunked" {
            ["transfer-encoding: chunked"]
        } else {
            ["Content-Length: 2"]
        };
        assert_eq!(framings, expected, "{path}: {}", answer.head);
    }
    // Through the map: stripped, with what a `Connection` names.
    for path in ["/conn/apart", "/conn/secret"] {
        stream.write_all(get(path).as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        assert_eq!(answer.body, b"ok", "{path}");
        assert!(
            answer.head.contains("\r\nx-worker: Raw\r\n"),
            "the map's way: {path}: {}",
            answer.head
        );
        let lower = answer.head.to_ascii_lowercase();
        for gone in ["connection", "keep-alive", "x-secret"] {
            assert!(!lower.contains(gone), "{path}: {gone}: {}", answer.head);
        }
    }
    stream.write_all(get("/next").as_bytes()).await.unwrap();
    assert_eq!(
        read_answer(&mut stream, &mut buffer, false).await.body,
        b"/next"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_plain_request_head_reaches_the_worker_as_sent_when_nothing_in_it_must_change() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    let mut worker_got = async |request: &str| {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        (answer.head, String::from_utf8(answer.body).unwrap())
    };
    // As sent: the client's spelling, its order, a value with a tab; then what the gateway adds.
    let (_, head) = worker_got(
        "GET /head?q=1 HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\nX-Custom: A\tb\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert!(
        head.starts_with("GET /head?q=1 HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\nX-Custom: A\tb\r\nAccept: */*\r\nx-request-id: "),
        "{head:?}"
    );
    assert!(
        head.ends_with("\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http"),
        "{head:?}"
    );
    assert_eq!(
        head.to_ascii_lowercase().matches("host:").count(),
        1,
        "{head:?}"
    );

    // A browser's `Connection: keep-alive` (wherever it is, any case) is the one line a raw
    // head leaves out: the others go as sent, in their order.
    let (_, head) =
        worker_got("GET /head HTTP/1.1\r\nConnection: keep-alive\r\nHost: gw\r\n\r\n").await;
    assert!(
        head.starts_with("GET /head HTTP/1.1\r\nHost: gw\r\nx-request-id: "),
        "the line first, only Host besides: {head:?}"
    );
    for (connection, at_end) in [
        ("Connection: keep-alive\r\n", false),
        ("connection:  Keep-Alive \r\n", false),
        ("Connection: keep-alive\r\n", true),
    ] {
        let request = if at_end {
            format!("GET /head HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\n{connection}\r\n")
        } else {
            format!(
                "GET /head HTTP/1.1\r\nHost: gw\r\n{connection}User-Agent: t/1\r\nAccept: */*\r\n\r\n"
            )
        };
        let (_, head) = worker_got(&request).await;
        let expected = if at_end {
            "GET /head HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\nx-request-id: "
        } else {
            "GET /head HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\nAccept: */*\r\nx-request-id: "
        };
        assert!(head.starts_with(expected), "{request:?} -> {head:?}");
        assert!(
            !head.to_ascii_lowercase().contains("keep-alive"),
            "{head:?}"
        );
    }

    // Through the map: a hop-by-hop header is stripped (also a second `Connection`, or one
    // naming another header), forwarding headers extended, the client's sane request id kept
    // (once), bare LF line ends made CRLF.
    for request in [
        "GET /head HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\nConnection: X-Secret\r\nX-Secret: s\r\n\r\n",
        "GET /head HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n",
    ] {
        let (_, head) = worker_got(request).await;
        let lower = head.to_ascii_lowercase();
        assert!(
            !lower.contains("connection") && !lower.contains("x-secret"),
            "{request:?} -> {head:?}"
        );
        assert!(
            head.starts_with("GET /head HTTP/1.1\r\nhost: gw\r\n"),
            "the map's way: {head:?}"
        );
    }
    let (_, head) = worker_got(
        "GET /head HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n",
    )
    .await;
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("connection") && !lower.contains("keep-alive"),
        "{head:?}"
    );
    let (_, head) = worker_got(
        "GET /head HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 10.0.0.1\r\nX-Request-Id: abc-1\r\n\r\n",
    )
    .await;
    assert!(
        head.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
        "{head:?}"
    );
    assert_eq!(
        head.to_ascii_lowercase().matches("x-request-id").count(),
        1,
        "{head:?}"
    );
    assert!(head.contains("x-request-id: abc-1\r\n"), "{head:?}");
    // A client's forwarding headers and `TE` are not the gateway's: replaced, stripped.
    let (_, head) = worker_got(
        "GET /head HTTP/1.1\r\nHost: gw\r\nX-Forwarded-Proto: https\r\nForwarded: for=1.2.3.4\r\nTE: trailers\r\n\r\n",
    )
    .await;
    let lower = head.to_ascii_lowercase();
    assert!(lower.ends_with("\r\nx-forwarded-proto: http"), "{head:?}");
    assert_eq!(lower.matches("x-forwarded-proto").count(), 1, "{head:?}");
    assert!(
        !lower.contains("forwarded: for=") && !lower.contains("\r\nte:"),
        "{head:?}"
    );
    let (_, head) = worker_got("GET /head HTTP/1.1\nHost: gw\nX-Custom: lf\n\n").await;
    assert!(head.contains("\r\nx-custom: lf\r\n"), "{head:?}");
    assert!(!head.replace("\r\n", "").contains('\n'), "{head:?}");

    // Two Hosts: the request path's 400, not forwarded.
    let (answer, body) = worker_got("GET /head HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}{body}");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_forwarding_lines_of_a_proxy_in_front_are_left_out_of_a_raw_head_and_read() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    let mut sent = async |request: &str| {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        (answer.head, String::from_utf8(answer.body).unwrap())
    };
    let id_of = |head: &str| header(head, "x-request-id").unwrap().to_owned();

    // A cloud load balancer's head: its forwarding lines left out where they are, the others
    // as sent (the client's spelling: the raw way), the hops before the gateway's kept.
    let (answer, head) = sent(
        "GET /head HTTP/1.1\r\nX-Forwarded-For: 203.0.113.7, 10.0.0.2\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nHost: gw\r\nX-Amzn-Trace-Id: Root=1-abc\r\nConnection: keep-alive\r\nUser-Agent: t/1\r\n\r\n",
    )
    .await;
    let id = id_of(&answer);
    assert_eq!(
        head,
        format!(
            "GET /head HTTP/1.1\r\nX-Forwarded-Port: 443\r\nHost: gw\r\nX-Amzn-Trace-Id: Root=1-abc\r\nUser-Agent: t/1\r\nx-request-id: {id}\r\nx-forwarded-for: 203.0.113.7, 10.0.0.2, 127.0.0.1\r\nx-forwarded-proto: http"
        ),
    );

    // The client's sane request id is the request's: the worker and the client see it once.
    let (answer, head) = sent(
        "GET /head HTTP/1.1\r\nHost: gw\r\nX-Request-Id: lb-42\r\nAccept: */*\r\nX-Request-Id: second\r\nForwarded: for=192.0.2.1\r\n\r\n",
    )
    .await;
    assert_eq!(id_of(&answer), "lb-42");
    assert_eq!(
        head,
        "GET /head HTTP/1.1\r\nHost: gw\r\nAccept: */*\r\nx-request-id: lb-42\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http"
    );
    // One that is not sane is replaced by a new one; an empty X-Forwarded-For adds no hop.
    for odd in [
        "X-Request-Id: has space\r\n",
        "X-Request-Id:\r\nX-Forwarded-For: \r\n",
    ] {
        let (answer, head) = sent(&format!("GET /head HTTP/1.1\r\nHost: gw\r\n{odd}\r\n")).await;
        let id = id_of(&answer);
        assert!(!id.is_empty() && !id.contains(' '), "{answer:?}");
        assert_eq!(
            head,
            format!(
                "GET /head HTTP/1.1\r\nHost: gw\r\nx-request-id: {id}\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http"
            ),
            "{odd:?}"
        );
    }

    // Through the map (names in lower case, `Host` first), the same lines for the worker: more
    // than three runs left out, and two X-Forwarded-For lines (their hops joined in order).
    let (answer, head) = sent(
        "GET /head HTTP/1.1\r\nConnection: keep-alive\r\nA: 1\r\nForwarded: x\r\nB: 2\r\nX-Forwarded-Proto: https\r\nC: 3\r\nX-Request-Id: r-4\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert_eq!(id_of(&answer), "r-4");
    assert_eq!(
        head,
        "GET /head HTTP/1.1\r\nhost: gw\r\na: 1\r\nb: 2\r\nc: 3\r\nx-request-id: r-4\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http"
    );
    let (_, head) = sent(
        "GET /head HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n",
    )
    .await;
    assert!(
        head.starts_with("GET /head HTTP/1.1\r\nhost: gw\r\n"),
        "{head:?}"
    );
    assert!(
        head.ends_with(
            "\r\nx-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nx-forwarded-proto: http"
        ),
        "{head:?}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_raw_answer_carries_the_request_id_its_worker_was_sent_and_the_gateways_name_once() {
    let gw = gateway().await;
    let mut stream = TcpStream::connect(gw.public).await.unwrap();
    let mut buffer = Vec::new();
    // The worker's `/head` answer has no request id of its own: the gateway adds the one it sent
    // the worker, whether it made it (a raw request head) or the client sent it (a head that
    // took the header map).
    for (request, client_id) in [
        ("GET /head HTTP/1.1\r\nHost: gw\r\n\r\n", None),
        (
            "GET /head HTTP/1.1\r\nHost: gw\r\nX-Request-Id: client-7\r\n\r\n",
            Some("client-7"),
        ),
    ] {
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream, &mut buffer, false).await;
        let worker_got = String::from_utf8(answer.body.clone()).unwrap();
        let sent = header(&worker_got, "x-request-id").expect("the worker got a request id");
        assert_eq!(answer.header("x-request-id"), Some(sent), "{}", answer.head);
        if let Some(id) = client_id {
            assert_eq!(sent, id);
        }
        let lower = answer.head.to_ascii_lowercase();
        assert_eq!(lower.matches("x-request-id:").count(), 1, "{}", answer.head);
        assert_eq!(
            lower.matches("x-herd-gateway:").count(),
            1,
            "{}",
            answer.head
        );
    }
}

/// Over TLS the plain requests are this server's too: the worker's head is written through as
/// it sent it (names in its case, which hyper's writer would have lowercased), the connection
/// carries the next request, and a request with a body (hyper's, from then on) is served on it
/// as well.
#[tokio::test]
async fn over_tls_plain_requests_are_served_by_the_gateways_own_server_too() {
    let tls = support::TestTls::generate();
    let worker = raw_worker().await;
    let gw = Gateway::start(&[], |c| {
        c.workers = vec![worker.to_string()];
        c.health.path = "/ok".into();
        tls.enable(c);
    })
    .await;
    let mut session = tls.connect(&gw).await;
    let mut received = Vec::new();
    session.write_all(get("/as-sent").as_bytes()).await.unwrap();
    let head = read_tls_until(&mut session, &mut received, "\r\n\r\nok").await;
    assert!(
        head.starts_with("HTTP/1.1 201 Created\r\nX-Worker: Raw\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\nx-herd-gateway: "), "{head}");
    session.write_all(get("/next").as_bytes()).await.unwrap();
    let next = read_tls_until(&mut session, &mut received, "/next").await;
    assert!(next.starts_with("HTTP/1.1 200 OK\r\n"), "{next}");
    let post = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 4\r\n\r\nbody";
    session.write_all(post.as_bytes()).await.unwrap();
    let echoed = read_tls_until(&mut session, &mut received, "\r\n\r\nbody").await;
    assert!(echoed.starts_with("HTTP/1.1 200 OK\r\n"), "{echoed}");
    session.write_all(get("/after").as_bytes()).await.unwrap();
    read_tls_until(&mut session, &mut received, "/after").await;
    // A chunked upload goes to hyper, which gives the session back to the own server after it
    // (two tries: a GET that came before hyper looked for its next request is hyper's).
    let chunked = "POST /echo HTTP/1.1\r\nhost: gateway\r\ntransfer-encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n";
    session.write_all(chunked.as_bytes()).await.unwrap();
    let echoed = read_tls_until(&mut session, &mut received, "\r\n\r\nbody").await;
    assert!(echoed.starts_with("HTTP/1.1 200 OK\r\n"), "{echoed}");
    let mut raw = false;
    for _ in 0..2 {
        session.write_all(get("/as-sent").as_bytes()).await.unwrap();
        let head = read_tls_until(&mut session, &mut received, "\r\n\r\nok").await;
        raw |= head.contains("\r\nX-Worker: Raw\r\n");
    }
    assert!(raw, "the own server serves on after the upload");
    gw.shutdown().await;
}

/// Reads from `session` until what came ends with `end`; returns it and clears `received`.
async fn read_tls_until(
    session: &mut support::TlsClient,
    received: &mut Vec<u8>,
    end: &str,
) -> String {
    let mut chunk = [0u8; 4096];
    while !received.ends_with(end.as_bytes()) {
        let read = tokio::time::timeout(Duration::from_secs(5), session.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{end:?} within 5 s: {}", String::from_utf8_lossy(received)))
            .unwrap();
        assert!(
            read > 0,
            "closed before {end:?}: {}",
            String::from_utf8_lossy(received)
        );
        received.extend_from_slice(&chunk[..read]);
    }
    String::from_utf8(std::mem::take(received)).unwrap()
}
