//! The request-head encoder (`codec::encode_request_head`): what it writes, read back by
//! `httparse`, is the method, target, headers and framing it was given, with the gateway's own
//! forwarding headers in place of the client's; after `headers.rs`
//! stripping, no hop-by-hop or `Connection`-listed header reaches a worker; and a plain head the
//! gateway's own HTTP/1.1 server keeps as raw lines (`headers::RawRequestHead`) reaches a worker
//! as the same headers, with the same request id, as through the map.

use bytes::BytesMut;
use herd_gateway::headers::{
    Forwarding, OverTls, forwarded_for, is_sane_request_id, strip_hop_by_hop,
};
use herd_gateway::upstream::codec::{RequestFraming, encode_request_head};
use http::Method;
use http::uri::Authority;
use proptest::prelude::*;

use super::{config, field_value, header_map, plain_name};

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        prop::sample::select(vec![
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
            Method::PATCH
        ]),
        "[A-Z]{1,10}".prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap()),
    ]
}

fn framing() -> impl Strategy<Value = RequestFraming> {
    prop_oneof![
        Just(RequestFraming::None),
        any::<u64>().prop_map(RequestFraming::Length),
        Just(RequestFraming::Chunked),
    ]
}

/// Headers a client may send, framing and `Host` ones included.
fn client_headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        6 => plain_name(),
        1 => prop::sample::select(vec!["host", "content-length", "transfer-encoding", "expect", "cookie"]).prop_map(String::from),
        1 => prop::sample::select(vec!["x-forwarded-for", "x-forwarded-proto", "forwarded", "x-request-id"]).prop_map(String::from),
    ];
    prop::collection::vec((name, field_value()), 0..10)
}

/// The head's method, target and `(name, value)` lines, read by `httparse`.
fn read_back(wire: &[u8]) -> (String, String, Vec<(String, Vec<u8>)>) {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut slots);
    let status = request.parse(wire).expect("httparse reads what we wrote");
    assert_eq!(
        status,
        httparse::Status::Complete(wire.len()),
        "one whole head, nothing after"
    );
    assert_eq!(request.version, Some(1));
    let headers = request
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    (
        request.method.unwrap().to_string(),
        request.path.unwrap().to_string(),
        headers,
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn an_encoded_head_reads_back_the_same(
        method in method(),
        path in "/[a-zA-Z0-9/._~%!$&'()*+,;=:@?-]{0,40}",
        headers in client_headers(),
        framing in framing(),
        tls in any::<bool>(),
        authority in proptest::option::of("[a-z0-9.-]{1,20}(:[0-9]{1,5})?"),
    ) {
        let map = header_map(&headers);
        let fallback = Authority::from_static("10.0.0.1:8081");
        let mut out = BytesMut::from(&b"stale bytes"[..]);
        let client = forwarded_for([192, 0, 2, 9].into());
        let id = http::HeaderValue::from_static("gw-1");
        let over_tls = OverTls::new([192, 0, 2, 9].into());
        let forwarding = Forwarding {
            request_id: &id,
            client: &client,
            over_tls: tls.then_some(&over_tls),
            authority: authority.as_deref(),
        };
        encode_request_head(&mut out, &method, &path, &map, None, framing, &fallback, &forwarding);
        let (read_method, read_path, read_headers) = read_back(&out);
        prop_assert_eq!(read_method, method.as_str());
        prop_assert_eq!(read_path, path);

        // Expected: Host (the client's, else the request's authority, else the worker's), every other header but the framing
        // ones and those the gateway sets in the map's order, then the gateway's own: the request
        // id, X-Forwarded-For (the client's hops, then ours), X-Forwarded-Proto,
        // Forwarded over TLS, then the framing.
        let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
        if !map.contains_key("host") {
            let host = authority.as_deref().unwrap_or("10.0.0.1:8081");
            expected.push(("host".into(), host.as_bytes().to_vec()));
        }
        let mut hops: Vec<&[u8]> = Vec::new();
        for (name, value) in &map {
            match name.as_str() {
                "content-length" | "transfer-encoding" | "expect" | "x-forwarded-proto" | "forwarded"
                | "x-request-id" => {}
                "x-forwarded-for" => {
                    let hop = value.as_bytes().trim_ascii();
                    if !hop.is_empty() {
                        hops.push(hop);
                    }
                }
                _ => expected.push((name.to_string(), value.as_bytes().to_vec())),
            }
        }
        expected.push(("x-request-id".into(), b"gw-1".to_vec()));
        hops.push(b"192.0.2.9");
        expected.push(("x-forwarded-for".into(), hops.join(&b", "[..])));
        let proto: &[u8] = if tls { b"https" } else { b"http" };
        expected.push(("x-forwarded-proto".into(), proto.to_vec()));
        if tls {
            expected.push(("forwarded".into(), b"for=192.0.2.9;proto=https".to_vec()));
        }
        match framing {
            RequestFraming::None => {}
            RequestFraming::Length(n) => expected.push(("content-length".into(), n.to_string().into_bytes())),
            RequestFraming::Chunked => expected.push(("transfer-encoding".into(), b"chunked".to_vec())),
        }
        prop_assert_eq!(read_headers, expected);
    }

    #[test]
    fn no_hop_by_hop_or_connection_listed_header_is_forwarded(
        headers in client_headers(),
        hop in prop::collection::vec(
            prop::sample::select(vec!["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate"]),
            0..4,
        ),
        listed in prop::collection::vec((plain_name(), any::<bool>()), 0..4),
        junk in prop::sample::select(vec![&b""[..], b"close", b" \xff\xfe", b"keep-alive", b""]),
    ) {
        let mut headers = headers;
        // Some listed names are also sent (those must go), some only listed.
        for (name, sent) in &listed {
            if *sent {
                headers.push((name.clone(), b"1".to_vec()));
            }
        }
        for name in &hop {
            headers.push((name.to_string(), b"x".to_vec()));
        }
        let mut options: Vec<Vec<u8>> = listed.iter().map(|(n, _)| n.to_ascii_uppercase().into_bytes()).collect();
        options.push(junk.to_vec());
        headers.push(("connection".into(), options.join(&b", "[..])));
        let mut map = header_map(&headers);
        strip_hop_by_hop(&mut map);
        let mut out = BytesMut::new();
        let client = forwarded_for([192, 0, 2, 9].into());
        let id = http::HeaderValue::from_static("r-1");
        let forwarding = Forwarding { request_id: &id, client: &client, over_tls: None, authority: None };
        encode_request_head(&mut out, &Method::POST, "/", &map, None, RequestFraming::Length(1), &Authority::from_static("w:1"), &forwarding);
        let (_, _, forwarded) = read_back(&out);
        for (name, _) in &forwarded {
            prop_assert!(!hop.contains(&name.as_str()) || name == "transfer-encoding", "{name} forwarded");
            prop_assert!(name != "connection" && name != "upgrade" && name != "te");
            prop_assert!(!listed.iter().any(|(l, _)| l == name), "listed {name} forwarded");
        }
        // The gateway's own framing is the only transfer-encoding / content-length.
        prop_assert_eq!(forwarded.iter().filter(|(n, _)| n == "content-length").count(), 1);
        prop_assert!(!forwarded.iter().any(|(n, _)| n == "transfer-encoding"));
    }
}

/// A request head line as a client or a proxy in front sends it: a plain header, or one the
/// request path reads (`Connection`, the forwarding headers, the request id, `TE`), in any case
/// of its name, with white space around the value now and then.
fn request_line() -> impl Strategy<Value = (String, Vec<u8>)> {
    let read = prop::sample::select(vec![
        ("Connection", &b"keep-alive"[..]),
        ("connection", b" Keep-Alive "),
        ("Connection", b"close"),
        ("connection", b" Close"),
        ("Connection", b"keep-alive, X-Secret"),
        ("X-Secret", b"s"),
        ("X-Forwarded-For", b"203.0.113.7, 10.0.0.2"),
        ("x-forwarded-for", b""),
        ("X-Forwarded-For", b" 198.51.100.1\t"),
        ("X-Forwarded-Proto", b"https"),
        ("Forwarded", b"for=192.0.2.60;proto=http"),
        ("X-Request-Id", b"lb-42"),
        ("x-request-id", b"has space"),
        ("X-REQUEST-ID", b""),
        ("TE", b"trailers"),
    ])
    .prop_map(|(name, value)| (name.to_owned(), value.to_vec()));
    prop_oneof![
        3 => (plain_name(), field_value(), any::<bool>()).prop_map(|(name, value, upper)| {
            (if upper { name.to_ascii_uppercase() } else { name }, value)
        }),
        2 => read,
    ]
}

/// What a raw request head does with a line of `request_line`, by a model written from the rules
/// (docs/security.md): `Some(true)` left out, `Some(false)` kept, `None` the head needs the map.
fn left_out(name: &str, value: &[u8]) -> Option<bool> {
    match name.to_ascii_lowercase().as_str() {
        "connection" => {
            let option = value.trim_ascii();
            (option.eq_ignore_ascii_case(b"keep-alive") || option.eq_ignore_ascii_case(b"close"))
                .then_some(true)
        }
        "x-forwarded-for" | "x-forwarded-proto" | "forwarded" | "x-request-id"
        | "content-length" => Some(true),
        "te" => None,
        _ => Some(false),
    }
}

/// Whether a head of `lines` may be kept raw, by that model: nothing that needs the map, at
/// most one `X-Forwarded-For`, at most three runs of adjacent lines left out.
fn may_be_raw(lines: &[(String, Vec<u8>)]) -> bool {
    let mut runs = 0;
    let mut in_run = false;
    for (name, value) in lines {
        let Some(out) = left_out(name, value) else {
            return false;
        };
        runs += usize::from(out && !in_run);
        in_run = out;
    }
    let hops = lines
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-for"))
        .count();
    runs <= 3 && hops <= 1
}

/// Reads `wire` as the gateway's own HTTP/1.1 server does, raw (`keep_raw`) or through the map.
fn read_head(
    wire: &[u8],
    keep_raw: bool,
) -> Option<(
    http::Request<herd_gateway::body::ClientBody>,
    Option<herd_gateway::headers::RawRequestHead>,
)> {
    herd_gateway::plain_http1::read_head(&mut BytesMut::from(wire), keep_raw, 64)
}

/// The `(name, value)` lines of an encoded head, names in lower case, grouped by name (sorted:
/// a map's order of names changes as headers are removed from it), each name's values in order.
fn grouped(wire: &[u8]) -> Vec<(String, Vec<Vec<u8>>)> {
    let (_, _, lines) = read_back(wire);
    let mut groups: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for (name, value) in lines {
        let name = name.to_ascii_lowercase();
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, values)) => values.push(value),
            None => groups.push((name, vec![value])),
        }
    }
    groups.sort();
    groups
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_raw_request_head_forwards_what_the_map_forwards(
        before in prop::collection::vec(request_line(), 0..6),
        after in prop::collection::vec(request_line(), 0..6),
        tls in any::<bool>(),
        body_at in prop::option::of(0usize..13),
    ) {
        // The gateway's own HTTP/1.1 server keeps a plain request's lines raw when it may,
        // leaving out what the request path replaces or drops; hyper's path and a head the raw
        // way refuses go through the map. A worker must get the same headers either way, and
        // the request the same id.
        let mut lines: Vec<(String, Vec<u8>)> =
            before.into_iter().chain([("Host".to_owned(), b"gw".to_vec())]).chain(after).collect();
        // A small body sent with its head: its one `Content-Length` line anywhere among them.
        if let Some(at) = body_at {
            lines.insert(at.min(lines.len()), ("Content-Length".to_owned(), b"2".to_vec()));
        }
        let (framing, body) = match body_at {
            Some(_) => (RequestFraming::Length(2), &b"{}"[..]),
            None => (RequestFraming::None, &b""[..]),
        };
        let line = |(name, value): &(String, Vec<u8>)| [name.as_bytes(), b": ", value, b"\r\n"].concat();
        let wire = [&b"GET /p?q=1 HTTP/1.1\r\n"[..], &lines.iter().flat_map(line).collect::<Vec<u8>>(), b"\r\n", body].concat();
        let (mapped, none) = read_head(&wire, false).expect("a plain head");
        prop_assert!(none.is_none());
        let (raw_request, raw) = read_head(&wire, true).expect("a plain head");
        prop_assert_eq!(raw.is_some(), may_be_raw(&lines), "kept raw exactly when the rules say so");
        let Some(raw) = raw else {
            prop_assert_eq!(format!("{:?}", mapped.headers()), format!("{:?}", raw_request.headers()));
            return Ok(());
        };
        prop_assert!(raw_request.headers().is_empty());
        prop_assert_eq!(raw.size as usize, herd_gateway::headers::head_size(mapped.uri(), mapped.headers()));

        // The id: the client's first X-Request-Id when sane, on both ways.
        let sent = mapped.headers().get("x-request-id").filter(|id| is_sane_request_id(id.as_bytes()));
        let map_id = herd_gateway::headers::request_id(mapped.headers());
        let raw_id = raw.request_id();
        match sent {
            Some(sent) => {
                prop_assert_eq!(&map_id, sent);
                prop_assert_eq!(&raw_id, sent);
            }
            None => prop_assert!(is_sane_request_id(raw_id.as_bytes()) && raw_id != map_id),
        }

        let client = forwarded_for([192, 0, 2, 9].into());
        let id = http::HeaderValue::from_static("gw-1");
        let over_tls = OverTls::new([192, 0, 2, 9].into());
        let forwarding = Forwarding { request_id: &id, client: &client, over_tls: tls.then_some(&over_tls), authority: None };
        let fallback = Authority::from_static("10.0.0.1:8081");
        let mut headers = mapped.headers().clone();
        strip_hop_by_hop(&mut headers);
        let mut from_map = BytesMut::new();
        encode_request_head(&mut from_map, &Method::GET, "/p?q=1", &headers, None, framing, &fallback, &forwarding);
        let mut from_raw = BytesMut::new();
        encode_request_head(&mut from_raw, &Method::GET, "/p?q=1", &http::HeaderMap::new(), Some(&raw), framing, &fallback, &forwarding);
        prop_assert_eq!(grouped(&from_map), grouped(&from_raw));
        // And the raw way writes the client's other lines as sent, in their order, then the
        // gateway's own.
        let kept: Vec<u8> = lines.iter().filter(|(n, v)| left_out(n, v) == Some(false)).flat_map(line).collect();
        let expected = [&b"GET /p?q=1 HTTP/1.1\r\n"[..], &kept, b"x-request-id: gw-1\r\n"].concat();
        prop_assert!(from_raw.starts_with(&expected), "{:?}", String::from_utf8_lossy(&from_raw));
    }
}

#[test]
fn lines_are_left_out_and_read_at_any_of_64_places() {
    // The parser marks the lines it leaves out by their index in a `u64`: the last ones too.
    for (hops_at, id_at) in [(0, 63), (31, 32), (40, 62), (63, 0)] {
        let lines: Vec<String> = (0..64)
            .map(|index| match index {
                _ if index == hops_at => "X-Forwarded-For: 203.0.113.7\r\n".to_owned(),
                _ if index == id_at => "X-Request-Id: lb-7\r\n".to_owned(),
                10 => "Host: gw\r\n".to_owned(),
                _ => format!("X-{index}: {index}\r\n"),
            })
            .collect();
        let wire = format!("GET / HTTP/1.1\r\n{}\r\n", lines.concat());
        let (_, raw) = read_head(wire.as_bytes(), true).expect("a plain head");
        let raw = raw.expect("kept raw");
        assert_eq!(raw.request_id(), "lb-7");
        let client = forwarded_for([192, 0, 2, 9].into());
        let id = raw.request_id();
        let forwarding = Forwarding {
            request_id: &id,
            client: &client,
            over_tls: None,
            authority: None,
        };
        let mut out = BytesMut::new();
        let fallback = Authority::from_static("w:1");
        encode_request_head(
            &mut out,
            &Method::GET,
            "/",
            &http::HeaderMap::new(),
            Some(&raw),
            RequestFraming::None,
            &fallback,
            &forwarding,
        );
        let kept: String = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != hops_at && *i != id_at)
            .map(|(_, l)| l.as_str())
            .collect();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            format!(
                "GET / HTTP/1.1\r\n{kept}x-request-id: lb-7\r\nx-forwarded-for: 203.0.113.7, 192.0.2.9\r\nx-forwarded-proto: http\r\n\r\n"
            ),
            "{hops_at} {id_at}"
        );
    }
}

/// A `Content-Length` line as a client might send it, and the length the gateway's own HTTP/1.1
/// server may read a body by: digits only, one line (anything else is left to hyper).
fn content_length_line() -> impl Strategy<Value = (String, Option<u64>)> {
    prop_oneof![
        4 => (0u64..48).prop_map(|n| (format!("Content-Length: {n}"), Some(n))),
        1 => (0u64..48).prop_map(|n| (format!("content-length: 00{n}"), Some(n))),
        1 => prop::sample::select(vec![
            "Content-Length: +5",
            "Content-Length: -1",
            "Content-Length: 5, 5",
            "Content-Length: 5 5",
            "Content-Length: 0x10",
            "Content-Length: 99999999999999999999999",
            "Content-Length: 3\r\nContent-Length: 3",
            "Content-Length: 3\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 3",
        ])
        .prop_map(|line| (line.to_owned(), None)),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_body_is_read_whole_with_its_head_or_left_to_hyper_with_the_buffer_as_it_was(
        (line, length) in content_length_line(),
        body in prop::collection::vec(any::<u8>(), 48),
        have in 0usize..64,
        limit in 0u64..48,
        next in prop::sample::select(vec!["", "GET /next HTTP/1.1\r\nHost: gw\r\n\r\n", "G"]),
    ) {
        // The bytes a read may have brought: the head, `have` bytes behind it (part of the body,
        // or the body and the start of a next request).
        let head = format!("POST /p HTTP/1.1\r\nHost: gw\r\n{line}\r\n\r\n");
        let behind: Vec<u8> = body.iter().copied().chain(next.bytes()).take(have).collect();
        let wire = [head.as_bytes(), &behind].concat();
        let mut buffer = BytesMut::from(&wire[..]);
        let read = herd_gateway::plain_http1::read_head(&mut buffer, true, limit);
        match length {
            Some(n) if n <= limit && have >= n as usize => {
                let (request, raw) = read.expect("a body whole behind its head, within the limit");
                // Kept raw, its `Content-Length` line left out: the worker gets the client's
                // other lines and one length, the gateway's.
                let raw = raw.expect("a head with one Host and a plain length is kept raw");
                prop_assert!(request.headers().is_empty());
                let id = raw.request_id();
                let client = forwarded_for([192, 0, 2, 9].into());
                let forwarding = Forwarding { request_id: &id, client: &client, over_tls: None, authority: None };
                let mut out = BytesMut::new();
                let fallback = Authority::from_static("w:1");
                encode_request_head(&mut out, &Method::POST, "/p", &http::HeaderMap::new(), Some(&raw), RequestFraming::Length(n), &fallback, &forwarding);
                let (_, _, lines) = read_back(&out);
                let lengths: Vec<Vec<u8>> = lines
                    .iter()
                    .filter(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .map(|(_, value)| value.clone())
                    .collect();
                prop_assert_eq!(lengths, vec![n.to_string().into_bytes()]);
                prop_assert_eq!(&lines[0], &("Host".to_owned(), b"gw".to_vec()));
                match request.body() {
                    herd_gateway::body::ClientBody::Read(read) => {
                        prop_assert_eq!(&read[..], &body[..n as usize]);
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
                // What follows the body stays for the next request, byte for byte.
                prop_assert_eq!(&buffer[..], &behind[n as usize..]);
            }
            _ => {
                prop_assert!(read.is_none(), "{:?} with {} bytes behind, limit {}", line, have, limit);
                prop_assert_eq!(&buffer[..], &wire[..], "the buffer as it was, for hyper");
            }
        }
    }
}
