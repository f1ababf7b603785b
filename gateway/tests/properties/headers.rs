//! `headers.rs`: hop-by-hop stripping keeps exactly the end-to-end headers, in order; an
//! upgrade is seen exactly when `Connection` lists it; request ids are kept only when sane, and
//! the worker gets exactly one; and the `X-Forwarded-For` the worker gets keeps every hop before
//! ours.

use herd_gateway::headers::{
    FORWARDED_FOR, Forwarding, REQUEST_ID, forwarded_for, is_sane_request_id, request_id,
    strip_hop_by_hop, upgrade,
};
use herd_gateway::upstream::codec::{RequestFraming, encode_request_head};
use http::header::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::{config, field_value, header_map, plain_name};

/// Always hop-by-hop (RFC 9110 §7.6.1), plus `Upgrade`, which the gateway re-adds only for a
/// protocol switch.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => plain_name(),
        1 => prop::sample::select(HOP_BY_HOP.to_vec()).prop_map(String::from),
        1 => prop::sample::select(vec!["host", "cookie", "x-a", "x-b"]).prop_map(String::from),
    ]
}

/// A `Connection` value: options (names, `close`, `keep-alive`, `upgrade`) in any case, with
/// optional white space, empty elements and non-ASCII bytes between them.
fn connection_value() -> impl Strategy<Value = Vec<u8>> {
    let option = prop_oneof![
        3 => name().prop_map(String::into_bytes),
        1 => prop::sample::select(vec![&b"close"[..], b"Keep-Alive", b"UPGRADE", b"", b"\xff\xfe", b"caf\xe9"]).prop_map(<[u8]>::to_vec),
    ];
    (prop::collection::vec((option, any::<bool>()), 1..5)).prop_map(|options| {
        let mut value = Vec::new();
        for (i, (option, upper)) in options.into_iter().enumerate() {
            if i > 0 {
                value.extend_from_slice(if upper { b" ,\t" } else { b"," });
            }
            value.extend(if upper {
                option.to_ascii_uppercase()
            } else {
                option
            });
        }
        value.trim_ascii().to_vec()
    })
}

/// The options of every `Connection` line, lower case, by bytes (RFC 9110 §7.6.1).
fn options(headers: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .flat_map(|(_, v)| {
            v.split(|b| *b == b',')
                .map(|o| o.trim_ascii().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    (
        prop::collection::vec((name(), field_value()), 0..10),
        prop::collection::vec(connection_value(), 0..3),
    )
        .prop_map(|(mut headers, connection)| {
            headers.extend(
                connection
                    .into_iter()
                    .map(|v| ("connection".to_string(), v)),
            );
            headers
        })
}

/// The map's lines by name; the order of lines with different names carries no meaning (RFC
/// 9110 §5.3) and `HeaderMap::remove` does not keep it, that of one name's lines does.
fn lines(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut lines: Vec<_> = map
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    lines
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stripping_keeps_exactly_the_end_to_end_headers(headers in headers()) {
        let listed = options(&headers);
        let mut stripped = header_map(&headers);
        strip_hop_by_hop(&mut stripped);
        // What RFC 9110 §7.6.1 says stays.
        let expected: Vec<(String, Vec<u8>)> = lines(&header_map(&headers))
            .into_iter()
            .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
            .filter(|(n, _)| !listed.iter().any(|o| o == n.as_bytes()))
            .collect();
        prop_assert_eq!(lines(&stripped), expected);
    }

    #[test]
    fn an_upgrade_is_seen_exactly_when_connection_lists_it(
        headers in headers(),
        protocol in prop::option::of("[a-z0-9/.]{1,12}"),
    ) {
        let mut map = header_map(&headers);
        map.remove("upgrade");
        if let Some(protocol) = &protocol {
            map.insert("upgrade", HeaderValue::from_str(protocol).unwrap());
        }
        let asked = options(&headers).iter().any(|o| o == b"upgrade");
        prop_assert_eq!(
            upgrade(&map).map(|v| v.to_str().unwrap().to_string()),
            protocol.filter(|_| asked)
        );
    }

    #[test]
    fn request_ids_are_kept_only_when_sane(id in prop::option::of(field_value())) {
        let mut map = HeaderMap::new();
        if let Some(id) = &id {
            map.insert(REQUEST_ID, HeaderValue::from_bytes(id).unwrap());
        }
        let chosen = request_id(&map);
        prop_assert!(is_sane_request_id(chosen.as_bytes()));
        let sane = id.as_deref().is_some_and(|id| {
            !id.is_empty() && id.len() <= 128 && id.iter().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b))
        });
        prop_assert_eq!(sane, id.as_deref() == Some(chosen.as_bytes()));
        // The worker gets exactly one id: the chosen one.
        let client = forwarded_for([10, 0, 0, 1].into());
        let forwarding = Forwarding { request_id: &chosen, client: &client, over_tls: None, authority: None };
        let sent = encoded(&map, &forwarding);
        prop_assert_eq!(values(&sent, "x-request-id"), vec![chosen.as_bytes().to_vec()]);
    }

    #[test]
    fn forwarded_for_keeps_every_earlier_hop(
        earlier in prop::collection::vec(prop_oneof![
            "[0-9.]{1,15}".prop_map(String::into_bytes),
            "[0-9.]{1,7}, [0-9a-f:]{1,7}".prop_map(String::into_bytes),
            field_value(),
        ], 0..3),
        client in any::<[u8; 4]>(),
    ) {
        let mut map = HeaderMap::new();
        for hop in &earlier {
            map.append(FORWARDED_FOR, HeaderValue::from_bytes(hop).unwrap());
        }
        map.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let value = forwarded_for(client.into());
        let id = HeaderValue::from_static("r-1");
        let forwarding = Forwarding { request_id: &id, client: &value, over_tls: None, authority: None };
        let sent = encoded(&map, &forwarding);
        let client = std::net::IpAddr::from(client).to_string();
        let mut expected: Vec<&[u8]> = earlier.iter().map(|h| h.trim_ascii()).filter(|h| !h.is_empty()).collect();
        expected.push(client.as_bytes());
        prop_assert_eq!(values(&sent, "x-forwarded-for"), vec![expected.join(&b", "[..])]);
        prop_assert_eq!(values(&sent, "x-forwarded-proto"), vec![b"http".to_vec()]);
    }
}

/// The head the worker is sent for a `GET /` with `map`, parsed back into (name, value) lines.
fn encoded(map: &HeaderMap, forwarding: &Forwarding<'_>) -> Vec<(String, Vec<u8>)> {
    let mut out = bytes::BytesMut::new();
    let host = http::uri::Authority::from_static("127.0.0.1:1");
    encode_request_head(
        &mut out,
        &http::Method::GET,
        "/",
        map,
        None,
        RequestFraming::None,
        &host,
        forwarding,
    );
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut slots);
    assert!(request.parse(&out).expect("a valid head").is_complete());
    request
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect()
}

fn values(lines: &[(String, Vec<u8>)], name: &str) -> Vec<Vec<u8>> {
    lines
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}
