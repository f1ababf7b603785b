//! The response-head parser (`codec::parse_response`): no input panics it, a head parses the
//! same however it is split across reads, and generated heads give back their status, headers,
//! framing and keep-alive as RFC 9112 §6.3 and §9.3 say.

use bytes::BytesMut;
use herd_gateway::upstream::codec::{Parsed, ResponseFraming, parse_response};
use http::Method;
use proptest::prelude::*;

use super::{config, field_value, plain_name};

/// How a generated response frames its body.
#[derive(Debug, Clone)]
enum Framing {
    None,
    /// `Content-Length` on one or more lines (the same value), or as the list `n, n`.
    Length {
        length: u64,
        lines: usize,
        as_list: bool,
    },
    /// `Transfer-Encoding` codings (the last one decides), perhaps with a `Content-Length`.
    Codings {
        codings: Vec<&'static str>,
        with_length: Option<u64>,
    },
}

/// A generated response head and what RFC 9112 says about it.
#[derive(Debug, Clone)]
struct Head {
    http10: bool,
    status: u16,
    reason: String,
    method: Method,
    headers: Vec<(String, Vec<u8>)>,
    framing: Framing,
    /// `Connection` options sent, if any (the last line).
    connection: Option<&'static str>,
    /// Where a `Keep-Alive` line goes, if any: first, or right before the `Connection` line.
    keep_alive_line: Option<KeepAliveLine>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeepAliveLine {
    First,
    BeforeConnection,
}

impl Head {
    fn wire(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.{} {} {}\r\n",
            u8::from(!self.http10),
            self.status,
            self.reason
        )
        .into_bytes();
        let mut put = |name: &str, value: &[u8]| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        if self.keep_alive_line == Some(KeepAliveLine::First) {
            put("Keep-Alive", b"timeout=5, max=100");
        }
        for (name, value) in &self.headers {
            put(name, value);
        }
        match &self.framing {
            Framing::None => {}
            Framing::Length {
                length,
                lines,
                as_list,
            } => {
                if *as_list {
                    put("Content-Length", format!("{length}, {length}").as_bytes());
                }
                for _ in 0..*lines {
                    put("content-length", length.to_string().as_bytes());
                }
            }
            Framing::Codings {
                codings,
                with_length,
            } => {
                put("Transfer-Encoding", codings.join(", ").as_bytes());
                if let Some(length) = with_length {
                    put("content-length", length.to_string().as_bytes());
                }
            }
        }
        if self.keep_alive_line == Some(KeepAliveLine::BeforeConnection) {
            put("keep-alive", b"timeout=5");
        }
        if let Some(options) = self.connection {
            put("connection", options.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The framing RFC 9112 §6.3 gives this answer.
    fn expected_framing(&self) -> ResponseFraming {
        if self.method == Method::HEAD || self.status == 204 || self.status == 304 {
            return ResponseFraming::Empty;
        }
        match &self.framing {
            Framing::Codings { codings, .. } if codings.last() == Some(&"chunked") => {
                ResponseFraming::Chunked
            }
            Framing::Codings { .. } | Framing::None => ResponseFraming::UntilClose,
            Framing::Length { length: 0, .. } => ResponseFraming::Empty,
            Framing::Length { length, .. } => ResponseFraming::Length(*length),
        }
    }

    /// Whether the connection may carry another request (RFC 9112 §9.3, §6.1, §6.3 item 3).
    fn expected_keep_alive(&self) -> bool {
        let options = self.connection.unwrap_or("").to_ascii_lowercase();
        let close = options.split(',').any(|o| o.trim() == "close");
        let keep = options.split(',').any(|o| o.trim() == "keep-alive");
        let suspect = matches!(
            &self.framing,
            Framing::Codings { with_length, .. } if with_length.is_some() || self.http10
        );
        self.expected_framing() != ResponseFraming::UntilClose
            && !suspect
            && !close
            && (!self.http10 || keep)
    }
}

fn head() -> impl Strategy<Value = Head> {
    let status = prop_oneof![
        4 => 200u16..=599,
        1 => prop::sample::select(vec![100u16, 102, 103, 204, 304]),
    ];
    let framing = prop_oneof![
        Just(Framing::None),
        (0u64..=u64::MAX, 1usize..=3, any::<bool>()).prop_map(|(length, lines, as_list)| {
            Framing::Length {
                length,
                lines,
                as_list,
            }
        }),
        (
            // Chunked alone often: what a raw head may leave out.
            prop_oneof![
                Just(vec!["chunked"]),
                prop::collection::vec(prop::sample::select(vec!["gzip", "chunked", "br"]), 1..=3),
            ],
            prop::option::of(0u64..1000),
        )
            .prop_map(|(codings, with_length)| Framing::Codings {
                codings,
                with_length
            }),
    ];
    (
        any::<bool>(),
        status,
        "[A-Za-z ]{0,12}",
        prop::sample::select(vec![Method::GET, Method::HEAD, Method::POST]),
        prop::collection::vec((plain_name(), field_value()), 0..8),
        framing,
        prop::sample::select(vec![
            None,
            Some("close"),
            Some("keep-alive"),
            Some("Keep-Alive, x-a"),
            Some("x-a , CLOSE"),
            Some(" close "),
        ]),
        prop::sample::select(vec![
            None,
            Some(KeepAliveLine::First),
            Some(KeepAliveLine::BeforeConnection),
        ]),
    )
        .prop_map(
            |(http10, status, reason, method, headers, framing, connection, keep_alive_line)| {
                Head {
                    http10,
                    status,
                    reason,
                    method,
                    headers,
                    framing,
                    connection,
                    keep_alive_line,
                }
            },
        )
}

/// Bytes that look enough like a response head to reach past the status line.
fn near_head() -> impl Strategy<Value = Vec<u8>> {
    let start = prop::sample::select(vec![
        &b""[..],
        b"HTTP/1.1 ",
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.0 101 x\r\n",
        b"HTTP/1.1 204 \r\ncontent-length: ",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: ",
    ]);
    let byte = prop_oneof![
        4 => prop::sample::select(b"HTP/1.0 \r\n:,;-=ckdehlnorstu\t".to_vec()),
        1 => any::<u8>(),
    ];
    (start, prop::collection::vec(byte, 0..200)).prop_map(|(start, rest)| {
        let mut bytes = start.to_vec();
        bytes.extend(rest);
        bytes
    })
}

/// One parse of `bytes`; the buffer's state afterwards must match the outcome.
fn parse(bytes: &[u8], method: &Method, upgrade: bool) -> Result<Parsed, ()> {
    parse_as(bytes, method, upgrade, false)
}

/// [`parse`], the header lines kept raw (for the gateway's own HTTP/1.1 server) when `raw`.
fn parse_as(bytes: &[u8], method: &Method, upgrade: bool, raw: bool) -> Result<Parsed, ()> {
    let mut buffer = BytesMut::from(bytes);
    let parsed = parse_response(&mut buffer, method, upgrade, raw).map_err(|_| ());
    match &parsed {
        Ok(Parsed::Complete(_, _)) => assert!(bytes.ends_with(&buffer), "only the head is taken"),
        Ok(Parsed::Interim(length)) => {
            assert!(*length <= bytes.len());
            assert_eq!(&buffer[..], bytes, "an interim head is left for the caller");
        }
        _ => assert_eq!(&buffer[..], bytes, "nothing taken"),
    }
    parsed
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop_oneof![near_head(), prop::collection::vec(any::<u8>(), 0..300)],
        method in prop::sample::select(vec![Method::GET, Method::HEAD]),
        upgrade in any::<bool>(),
    ) {
        let _ = parse(&bytes, &method, upgrade);
    }

    #[test]
    fn generated_heads_round_trip(head in head(), body in prop::collection::vec(any::<u8>(), 0..16)) {
        let wire = head.wire();
        let mut bytes = wire.clone();
        bytes.extend_from_slice(&body);
        let parsed = parse(&bytes, &head.method, false);
        if (100..200).contains(&head.status) {
            prop_assert!(matches!(parsed, Ok(Parsed::Interim(n)) if n == wire.len()), "{parsed:?}");
            return Ok(());
        }
        let Ok(Parsed::Complete(parsed, _)) = parsed else {
            return Err(TestCaseError::fail(format!("{parsed:?}")));
        };
        prop_assert_eq!(parsed.status.as_u16(), head.status);
        prop_assert_eq!(parsed.version == http::Version::HTTP_10, head.http10);
        prop_assert_eq!(parsed.framing, head.expected_framing());
        prop_assert_eq!(parsed.keep_alive, head.expected_keep_alive());
        for (name, value) in &head.headers {
            prop_assert!(
                parsed.headers.get_all(name.as_str()).iter().any(|v| v.as_bytes() == &value[..]),
                "{name} lost"
            );
        }
        let plain = parsed.headers.keys().filter(|n| n.as_str().starts_with("x-")).count();
        let distinct: std::collections::HashSet<_> = head.headers.iter().map(|(n, _)| n).collect();
        prop_assert_eq!(plain, distinct.len());
        if parsed.framing == ResponseFraming::Chunked {
            prop_assert!(!parsed.headers.contains_key("content-length"), "stale length dropped");
        }
    }

    #[test]
    fn a_raw_head_forwards_what_the_map_forwards(
        bytes in prop_oneof![
            head().prop_map(|head| head.wire()),
            near_head(),
        ],
        method in prop::sample::select(vec![Method::GET, Method::HEAD]),
    ) {
        // The gateway's own HTTP/1.1 server writes a worker's header lines through when they
        // need nothing taken out (`RawHead`); hyper's path writes the map after
        // `strip_hop_by_hop`. Both must accept the same heads and send a client the same headers.
        let mapped = parse_as(&bytes, &method, false, false);
        let raw = parse_as(&bytes, &method, false, true);
        let (mapped, raw) = match (mapped, raw) {
            (Ok(Parsed::Complete(mapped, _)), Ok(Parsed::Complete(raw, _))) => (mapped, raw),
            (mapped, raw) => {
                prop_assert_eq!(format!("{mapped:?}"), format!("{raw:?}"));
                return Ok(());
            }
        };
        prop_assert_eq!((mapped.status, mapped.framing, mapped.keep_alive), (raw.status, raw.framing, raw.keep_alive));
        let mut headers = mapped.headers.clone();
        herd_gateway::headers::strip_hop_by_hop(&mut headers);
        let Some(head) = raw.raw.as_ref() else {
            // Kept as a map: the same map.
            prop_assert_eq!(format!("{:?}", mapped.headers), format!("{:?}", raw.headers));
            return Ok(());
        };
        prop_assert!(raw.headers.is_empty());
        prop_assert!(method != Method::HEAD);
        let from_map: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        // What a client reads from the forwarded lines.
        let text = [b"HTTP/1.1 200 OK\r\n", &head.runs().concat()[..], b"\r\n"].concat();
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut client = httparse::Response::new(&mut slots);
        prop_assert!(matches!(client.parse(&text), Ok(httparse::Status::Complete(n)) if n == text.len()));
        let from_raw: Vec<(String, Vec<u8>)> = client
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
            .collect();
        // The map groups a name's values at its first place; compare per name, in order.
        let grouped = |pairs: &[(String, Vec<u8>)]| {
            let mut by_name: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
            for (name, value) in pairs {
                by_name.entry(name.clone()).or_default().push(value.clone());
            }
            by_name
        };
        prop_assert_eq!(grouped(&from_map), grouped(&from_raw));
        prop_assert_eq!(head.has_request_id, headers.contains_key("x-request-id"));
        prop_assert_eq!(head.has_date, headers.contains_key("date"));
        prop_assert_eq!(head.has_content_length, headers.contains_key("content-length"));
    }

    #[test]
    fn a_head_split_anywhere_parses_as_the_whole(head in head()) {
        let wire = head.wire();
        let whole = format!("{:?}", parse(&wire, &head.method, false));
        // Read in two pieces, cut anywhere: every prefix shorter than the head asks for more and
        // takes nothing, so the head then parses exactly as in one piece.
        for cut in 0..wire.len() {
            prop_assert!(matches!(parse(&wire[..cut], &head.method, false), Ok(Parsed::Partial)), "cut at {cut}");
        }
        prop_assert_eq!(format!("{:?}", parse(&wire, &head.method, false)), whole);
    }
}
