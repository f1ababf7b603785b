//! A client that hangs up while its request is in flight cancels it at the worker: the gateway
//! closes the worker connection the request used, at once, not when the worker answers or the
//! response-header timeout runs out. Checked for each phase a request can wait in: for the
//! response head (bodiless and with a body, buffered or streamed) and while the response body
//! streams; and that pipelined requests are not taken for a hang-up. Each passed against hyper's
//! own check before the gateway took it over.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Gateway, TestTls, TlsClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// What the scripted worker saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// A request (its first line), with all of its body.
    Request(String),
    /// The gateway closed the connection of the request before.
    Closed,
}

/// How the scripted worker answers a request.
#[derive(Clone, Copy)]
enum Answer {
    /// Never: it waits until the gateway closes the connection.
    Never,
    /// A response head and the first chunk of a chunked body, then nothing.
    StallMidBody,
    /// `200`, with the request's first line as the body, after `ms` milliseconds.
    After(u64),
}

/// A worker that answers `/readyz` and every other request as `answer` says, and reports what
/// it sees.
async fn scripted_worker(answer: Answer) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_scripted(stream, answer, seen.clone()));
        }
    });
    (addr, reports)
}

async fn serve_scripted(mut stream: TcpStream, answer: Answer, seen: mpsc::UnboundedSender<Seen>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).to_string();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        while buffer.len() < end + 4 + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
        buffer.drain(..end + 4 + length);
        let first_line = head.lines().next().unwrap_or_default().to_string();
        if first_line.starts_with("GET /readyz") {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            if stream.write_all(ok).await.is_err() {
                return;
            }
            continue;
        }
        let _ = seen.send(Seen::Request(first_line.clone()));
        match answer {
            Answer::Never => {}
            Answer::StallMidBody => {
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
            }
            Answer::After(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let body = first_line.as_bytes();
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                let sent = stream.write_all(head.as_bytes()).await.is_ok()
                    && stream.write_all(body).await.is_ok();
                if !sent {
                    return;
                }
                continue;
            }
        }
        // Waits for the gateway to close (or reset) the connection.
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    let _ = seen.send(Seen::Closed);
                    return;
                }
                Ok(_) => {}
            }
        }
    }
}

/// A gateway in front of `worker` alone that waits up to a minute for a response head, with no
/// retries or hedges: only a client's hang-up can end a request early.
async fn gateway_before(worker: SocketAddr) -> Gateway {
    Gateway::start(&[], |c| {
        c.workers.push(worker.to_string());
        c.timeouts.response_header = Duration::from_secs(60);
        c.timeouts.request = Duration::from_secs(60);
        c.hedging.enabled = false;
        c.retry.max_attempts = 1;
    })
    .await
}

/// The worker's next report, within 5 s.
async fn next(reports: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    timeout(Duration::from_secs(5), reports.recv())
        .await
        .expect("a report from the worker within 5 s")
        .expect("the worker runs")
}

/// Sends `request`, waits until the worker has it, hangs up as `hang_up` does (which may keep
/// the socket, half-closed, until the end), and checks that the gateway closes the worker
/// connection soon after.
async fn hang_up_while_waiting(
    request: Vec<u8>,
    answer: Answer,
    hang_up: impl AsyncFnOnce(TcpStream) -> Option<TcpStream>,
) {
    let (worker, mut reports) = scripted_worker(answer).await;
    let gw = gateway_before(worker).await;
    let mut client = TcpStream::connect(gw.public).await.unwrap();
    client.write_all(&request).await.unwrap();
    assert!(matches!(next(&mut reports).await, Seen::Request(_)));
    if matches!(answer, Answer::StallMidBody) {
        // The response head and the first chunk reached the client: it waits mid-body.
        read_until(&mut client, b"hello").await;
    }
    let kept = hang_up(client).await;
    assert_eq!(
        next(&mut reports).await,
        Seen::Closed,
        "the worker connection is closed once the client hangs up"
    );
    drop(kept);
    gw.shutdown().await;
}

/// Reads from `client` until what came holds `expected` (within 5 s).
async fn read_until(client: &mut (impl AsyncRead + Unpin), expected: &[u8]) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.windows(expected.len()).any(|w| w == expected) {
        let read = timeout(Duration::from_secs(5), client.read(&mut chunk))
            .await
            .expect("the bytes awaited within 5 s")
            .unwrap();
        assert!(
            read > 0,
            "closed before {:?}",
            String::from_utf8_lossy(expected)
        );
        got.extend_from_slice(&chunk[..read]);
    }
}

const GET: &[u8] = b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n";

async fn close(client: TcpStream) -> Option<TcpStream> {
    drop(client);
    None
}

async fn reset(client: TcpStream) -> Option<TcpStream> {
    client.set_zero_linger().unwrap();
    drop(client);
    None
}

/// Half-closes: the socket stays open for reading until the check is done.
async fn shut_down_writing(mut client: TcpStream) -> Option<TcpStream> {
    client.shutdown().await.unwrap();
    Some(client)
}

#[tokio::test]
async fn a_get_waiting_for_its_response_is_cancelled_when_the_client_closes() {
    hang_up_while_waiting(GET.to_vec(), Answer::Never, close).await;
}

#[tokio::test]
async fn a_get_waiting_for_its_response_is_cancelled_when_the_client_resets() {
    hang_up_while_waiting(GET.to_vec(), Answer::Never, reset).await;
}

#[tokio::test]
async fn a_client_that_shuts_down_its_sending_side_cancels_its_request() {
    // The gateway reads a half-close as a hang-up, as hyper's own check did (HTTP/1.1 clients
    // do not half-close to wait for an answer).
    hang_up_while_waiting(GET.to_vec(), Answer::Never, shut_down_writing).await;
}

#[tokio::test]
async fn a_post_with_a_buffered_body_is_cancelled_when_the_client_closes() {
    let mut request = b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n".to_vec();
    request.extend_from_slice(&[b'b'; 1000]);
    hang_up_while_waiting(request, Answer::Never, close).await;
}

#[tokio::test]
async fn a_post_with_a_streamed_body_is_cancelled_when_the_client_closes() {
    // Over `retry.buffer_body_bytes` (64 KiB by default): streamed to the worker as it comes.
    let length = 1024 * 1024;
    let mut request =
        format!("POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n\r\n").into_bytes();
    request.extend_from_slice(&vec![b's'; length]);
    hang_up_while_waiting(request, Answer::Never, close).await;
}

#[tokio::test]
async fn a_response_body_stalled_mid_way_is_cancelled_when_the_client_closes() {
    hang_up_while_waiting(GET.to_vec(), Answer::StallMidBody, close).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_not_taken_for_a_hang_up() {
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_before(worker).await;
    let mut client = TcpStream::connect(gw.public).await.unwrap();
    client
        .write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(matches!(next(&mut reports).await, Seen::Request(_)));
    // Sent while the first waits for its worker: on the socket, where the watch sees them.
    let behind = [
        b"POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc".as_slice(),
        b"GET /third HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ]
    .concat();
    client.write_all(&behind).await.unwrap();
    let answers = read_all(&mut client).await;
    assert_in_order(&answers, &["GET /first", "POST /second", "GET /third"]);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_half_close_behind_pipelined_requests_cancels_only_the_last_as_before() {
    // hyper's own check did not look while it held bytes of a next request, and looked again
    // for the last one: the watch does the same (the bytes of the later requests are read with
    // the first's head, out of the peek's sight).
    half_close_behind_pipelined(
        &[
            "GET /first HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET /second HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET /third HTTP/1.1\r\nhost: x\r\n\r\n",
        ],
        &["GET /first", "GET /second"],
    )
    .await;
}

#[tokio::test]
async fn a_half_close_behind_pipelined_requests_with_bodies_cancels_only_the_last_as_before() {
    half_close_behind_pipelined(
        &[
            "POST /first HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
            "POST /second HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
            "GET /third HTTP/1.1\r\nhost: x\r\n\r\n",
        ],
        &["POST /first", "POST /second"],
    )
    .await;
}

/// Sends `requests` in one write and half-closes; the answers are those of `answered` (first
/// lines, in order), and the last request gets none.
async fn half_close_behind_pipelined(requests: &[&str], answered: &[&str]) {
    let (worker, _reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_before(worker).await;
    let mut client = TcpStream::connect(gw.public).await.unwrap();
    client
        .write_all(requests.concat().as_bytes())
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let answers = read_all(&mut client).await;
    assert_in_order(&answers, answered);
    let last = requests.last().unwrap().lines().next().unwrap();
    let last = last.trim_end_matches(" HTTP/1.1");
    assert!(!answers.contains(last), "{last} got no answer: {answers}");
    gw.shutdown().await;
}

/// Everything the gateway sends until it closes the connection (within 10 s).
async fn read_all(client: &mut TcpStream) -> String {
    let mut answers = String::new();
    timeout(Duration::from_secs(10), client.read_to_string(&mut answers))
        .await
        .expect("the connection closed within 10 s")
        .unwrap();
    answers
}

/// `answers` holds one 200 for each of `firsts` (the requests' first lines, which the worker
/// echoes), in that order, and no other.
fn assert_in_order(answers: &str, firsts: &[&str]) {
    let at: Vec<usize> = firsts
        .iter()
        .map(|line| {
            answers
                .find(line)
                .unwrap_or_else(|| panic!("{line} answered: {answers}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {answers}");
    assert_eq!(
        answers.matches("HTTP/1.1 200").count(),
        firsts.len(),
        "{answers}"
    );
}

// ---- Over TLS: the gateway's own server reads through the session to notice a hang-up ----

/// [`gateway_before`], with `[tls]` on: returns the gateway and a connected TLS client.
async fn tls_gateway_before(worker: SocketAddr, tls: &TestTls) -> (Gateway, TlsClient) {
    let gw = Gateway::start(&[], |c| {
        c.workers.push(worker.to_string());
        c.timeouts.response_header = Duration::from_secs(60);
        c.timeouts.request = Duration::from_secs(60);
        c.hedging.enabled = false;
        c.retry.max_attempts = 1;
        tls.enable(c);
    })
    .await;
    let client = tls.connect(&gw).await;
    (gw, client)
}

/// [`hang_up_while_waiting`] over TLS.
async fn tls_hang_up_while_waiting(
    answer: Answer,
    hang_up: impl AsyncFnOnce(TlsClient) -> Option<TlsClient>,
) {
    let tls = TestTls::generate();
    let (worker, mut reports) = scripted_worker(answer).await;
    let (gw, mut client) = tls_gateway_before(worker, &tls).await;
    client.write_all(GET).await.unwrap();
    assert!(matches!(next(&mut reports).await, Seen::Request(_)));
    if matches!(answer, Answer::StallMidBody) {
        read_until(&mut client, b"hello").await;
    }
    let kept = hang_up(client).await;
    assert_eq!(
        next(&mut reports).await,
        Seen::Closed,
        "the worker connection is closed once the TLS client hangs up"
    );
    drop(kept);
    gw.shutdown().await;
}

/// Closes the socket without ending the session (as browsers do).
async fn tls_drop(client: TlsClient) -> Option<TlsClient> {
    drop(client);
    None
}

/// Ends the session (`close_notify`) and keeps the socket open (as a client that closes the
/// session first, and the connection later).
async fn tls_close_notify(mut client: TlsClient) -> Option<TlsClient> {
    client.get_mut().1.send_close_notify();
    client.flush().await.unwrap();
    Some(client)
}

async fn tls_reset(client: TlsClient) -> Option<TlsClient> {
    let (tcp, _) = client.into_inner();
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    None
}

#[tokio::test]
async fn over_tls_a_get_waiting_for_its_response_is_cancelled_when_the_client_closes() {
    tls_hang_up_while_waiting(Answer::Never, tls_drop).await;
}

#[tokio::test]
async fn over_tls_a_get_waiting_for_its_response_is_cancelled_by_the_clients_close_notify() {
    tls_hang_up_while_waiting(Answer::Never, tls_close_notify).await;
}

#[tokio::test]
async fn over_tls_a_get_waiting_for_its_response_is_cancelled_when_the_client_resets() {
    tls_hang_up_while_waiting(Answer::Never, tls_reset).await;
}

#[tokio::test]
async fn over_tls_a_response_body_stalled_mid_way_is_cancelled_when_the_client_closes() {
    tls_hang_up_while_waiting(Answer::StallMidBody, tls_drop).await;
}

#[tokio::test]
async fn over_tls_pipelined_requests_are_answered_in_order_not_taken_for_a_hang_up() {
    let tls = TestTls::generate();
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let (gw, mut client) = tls_gateway_before(worker, &tls).await;
    // Sent while the first waits for its worker: read by the watch, kept for their turn.
    let behind = [
        b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n".as_slice(),
        b"POST /third HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
        b"GET /fourth HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ]
    .concat();
    send_behind_a_waiting_request(&mut client, &mut reports, &behind).await;
    let mut answers = String::new();
    // The gateway ends the session after the last answer with its `close_notify`: a clean end
    // (a socket closed without one is an error to rustls).
    timeout(Duration::from_secs(10), client.read_to_string(&mut answers))
        .await
        .expect("the connection closed within 10 s")
        .unwrap_or_else(|error| panic!("a clean end of the session: {error}; read: {answers}"));
    assert_in_order(
        &answers,
        &["GET /first", "GET /second", "POST /third", "GET /fourth"],
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn over_tls_a_response_body_stalled_mid_way_is_cancelled_by_the_clients_close_notify() {
    tls_hang_up_while_waiting(Answer::StallMidBody, tls_close_notify).await;
}

#[tokio::test]
async fn over_tls_a_key_update_while_waiting_is_not_taken_for_a_hang_up() {
    let tls = TestTls::generate();
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let (gw, mut client) = tls_gateway_before(worker, &tls).await;
    client
        .write_all(b"GET /waited HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(matches!(next(&mut reports).await, Seen::Request(_)));
    // TLS 1.3 traffic keys renewed while the request waits: records, but no bytes of a request.
    client.get_mut().1.refresh_traffic_keys().unwrap();
    client.flush().await.unwrap();
    let mut answer = String::new();
    timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
        .await
        .expect("the answer within 10 s")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("GET /waited HTTP/1.1"), "{answer}");
    gw.shutdown().await;
}

#[tokio::test]
async fn over_tls_a_session_the_client_ends_between_requests_is_ended_with_close_notify() {
    let tls = TestTls::generate();
    let (worker, _reports) = scripted_worker(Answer::After(0)).await;
    let (gw, mut client) = tls_gateway_before(worker, &tls).await;
    client
        .write_all(b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, b"GET /one HTTP/1.1").await;
    // The client ends the session; the gateway answers with its own `close_notify` (as hyper
    // did), so the client reads a clean end, not a truncation.
    client.get_mut().1.send_close_notify();
    client.flush().await.unwrap();
    let mut rest = [0u8; 64];
    let read = timeout(Duration::from_secs(5), client.read(&mut rest))
        .await
        .expect("the end of the session within 5 s");
    assert!(matches!(read, Ok(0)), "{read:?}");
    gw.shutdown().await;
}

/// A gateway in front of `worker` whose head timeout (1 s) is far shorter than its idle one.
async fn gateway_with_head_timeout(worker: SocketAddr, tls: Option<&TestTls>) -> Gateway {
    Gateway::start(&[], |c| {
        c.workers.push(worker.to_string());
        c.timeouts.request_head = Duration::from_secs(1);
        c.timeouts.client_idle = Duration::from_secs(30);
        c.hedging.enabled = false;
        c.retry.max_attempts = 1;
        if let Some(tls) = tls {
            tls.enable(c);
        }
    })
    .await
}

/// Sends `GET /first`, then `behind` while the worker has it.
async fn send_behind_a_waiting_request(
    client: &mut (impl AsyncWrite + Unpin),
    reports: &mut mpsc::UnboundedReceiver<Seen>,
    behind: &[u8],
) {
    client
        .write_all(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(matches!(next(reports).await, Seen::Request(_)));
    client.write_all(behind).await.unwrap();
    client.flush().await.unwrap();
}

/// The start of a next head, sent while the request before waits for its worker, is due within
/// the head timeout from that request's answer on: it is not an idle connection's (30 s here).
async fn a_head_begun_while_waiting_is_due_within_the_head_timeout(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    reports: &mut mpsc::UnboundedReceiver<Seen>,
) {
    send_behind_a_waiting_request(&mut client, reports, b"GET /second HTTP/1.1\r\nho").await;
    read_until(&mut client, b"GET /first HTTP/1.1").await;
    let answered = Instant::now();
    let mut rest = Vec::new();
    let closed = timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    let after = answered.elapsed();
    assert!(
        closed.is_ok() && after < Duration::from_millis(2500),
        "the half-sent head cut about 1 s after the answer, not at the idle timeout: \
         still open after {after:?}"
    );
    assert!(
        after >= Duration::from_millis(700),
        "cut {after:?} after the answer, before the head timeout (1 s)"
    );
}

/// A whole next request, sent while the request before waits, is answered in its turn, and the
/// connection then waits under the idle timeout (30 s here), not the head timeout (1 s): the
/// next head the watch read was parsed, nothing of another is left.
async fn after_a_whole_next_request_the_connection_idles_under_the_idle_timeout(
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    reports: &mut mpsc::UnboundedReceiver<Seen>,
) {
    let second = b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n";
    send_behind_a_waiting_request(&mut client, reports, second).await;
    read_until(&mut client, b"GET /second HTTP/1.1").await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    client
        .write_all(b"GET /third HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("still open 1.6 s after the last answer (head timeout 1 s, idle 30 s)");
    client.flush().await.unwrap();
    read_until(&mut client, b"GET /third HTTP/1.1").await;
}

#[tokio::test]
async fn a_head_begun_while_the_request_before_waits_gets_the_head_timeout() {
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_with_head_timeout(worker, None).await;
    let client = TcpStream::connect(gw.public).await.unwrap();
    a_head_begun_while_waiting_is_due_within_the_head_timeout(client, &mut reports).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn over_tls_a_head_begun_while_the_request_before_waits_gets_the_head_timeout() {
    let tls = TestTls::generate();
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_with_head_timeout(worker, Some(&tls)).await;
    let client = tls.connect(&gw).await;
    a_head_begun_while_waiting_is_due_within_the_head_timeout(client, &mut reports).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn after_a_whole_request_sent_while_one_waits_the_connection_idles_under_client_idle() {
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_with_head_timeout(worker, None).await;
    let client = TcpStream::connect(gw.public).await.unwrap();
    after_a_whole_next_request_the_connection_idles_under_the_idle_timeout(client, &mut reports)
        .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn over_tls_after_a_whole_request_sent_while_one_waits_the_connection_idles_under_client_idle()
 {
    let tls = TestTls::generate();
    let (worker, mut reports) = scripted_worker(Answer::After(300)).await;
    let gw = gateway_with_head_timeout(worker, Some(&tls)).await;
    let client = tls.connect(&gw).await;
    after_a_whole_next_request_the_connection_idles_under_the_idle_timeout(client, &mut reports)
        .await;
    gw.shutdown().await;
}
