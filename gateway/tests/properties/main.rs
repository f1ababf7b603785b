//! Property tests of the gateway's HTTP/1 wire code and header rules: the response-head parser,
//! the chunked-body decoder, the request-head encoder and `headers.rs`, each against generated
//! inputs and a small model written from RFC 9112 / RFC 9110 rather than from the code.
//!
//! `cargo test -p herd-gateway --test properties` runs [`DEFAULT_CASES`] cases per property (a
//! few seconds in all); `PROPTEST_CASES=20000 cargo test --release -p herd-gateway --test
//! properties` is the longer run (see docs/fuzzing.md). A failure prints the smallest input
//! proptest shrank it to; such an input becomes a unit test next to the code it broke.

mod chunked;
mod headers;
mod request;
mod response;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

/// Cases per property when `PROPTEST_CASES` is not set: keeps `cargo test` fast.
const DEFAULT_CASES: u32 = 64;

/// The configuration every property here runs with: [`DEFAULT_CASES`], or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = DEFAULT_CASES;
    }
    // Regressions are kept as unit tests by the code they broke, not in files proptest writes.
    config.failure_persistence = None;
    config
}

/// A header name token (RFC 9110 §5.1), lower case, that is none of the names the code under
/// test treats specially (they get their own generators).
fn plain_name() -> impl Strategy<Value = String> {
    "x-[a-z0-9!#$%&'*+.^_`|~-]{1,12}"
}

/// A header value: visible ASCII, obs-text and inner spaces/tabs (RFC 9110 §5.5), no leading or
/// trailing white space (a parser may trim it).
fn field_value() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => 0x21u8..=0x7e,
        1 => 0x80u8..=0xff,
        1 => Just(b' '),
        1 => Just(b'\t'),
    ];
    prop::collection::vec(byte, 0..24).prop_map(|mut value| {
        let trimmed = value.trim_ascii().len();
        let start = value
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(0);
        value.drain(..start);
        value.truncate(trimmed);
        value
    })
}

/// A header map of these lines, in order.
fn header_map(headers: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
        map.append(name, HeaderValue::from_bytes(value).unwrap());
    }
    map
}

/// Splits `bytes` at the given fractions of its length (sorted, deduplicated).
fn pieces(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}
