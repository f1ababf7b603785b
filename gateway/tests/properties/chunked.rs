//! The chunked-body decoder (`codec::ChunkedDecoder`): any chunking of a body, with extensions,
//! leading zeros, trailers and any split into reads, decodes to the body; garbage never panics
//! it; a chunk-size line is accepted exactly when RFC 9112 §7.1 allows it; sizes near
//! `u64::MAX` neither overflow nor wrap.

use bytes::BytesMut;
use herd_gateway::upstream::codec::{Chunk, ChunkedDecoder};
use proptest::prelude::*;

use super::{config, pieces};

/// What feeding some reads to a decoder gave.
#[derive(Debug, PartialEq)]
struct Outcome {
    body: Vec<u8>,
    done: bool,
    error: bool,
    /// Bytes after the end: left in the buffer, and the reads not yet fed.
    rest: Vec<u8>,
}

/// Feeds `reads` one after another, taking everything the decoder gives after each.
fn decode(reads: &[Vec<u8>]) -> Outcome {
    let mut decoder = ChunkedDecoder::new();
    let mut buffer = BytesMut::new();
    let mut body = Vec::new();
    let total: usize = reads.iter().map(Vec::len).sum();
    for (i, read) in reads.iter().enumerate() {
        buffer.extend_from_slice(read);
        // Each step takes bytes or stops: more steps than bytes would be a loop.
        for _ in 0..=total + 2 {
            match decoder.next(&mut buffer) {
                Ok(Chunk::Data(data)) => {
                    assert!(!data.is_empty(), "no empty data chunks");
                    body.extend_from_slice(&data);
                }
                Ok(Chunk::NeedMore) => break,
                Ok(Chunk::End) => {
                    let mut rest = buffer.to_vec();
                    rest.extend(reads[i + 1..].concat());
                    return Outcome {
                        body,
                        done: decoder.is_done(),
                        error: false,
                        rest,
                    };
                }
                Err(_) => {
                    return Outcome {
                        body,
                        done: false,
                        error: true,
                        rest: Vec::new(),
                    };
                }
            }
        }
    }
    assert!(body.len() <= total);
    Outcome {
        body,
        done: decoder.is_done(),
        error: false,
        rest: Vec::new(),
    }
}

/// A chunk extension as RFC 9112 §7.1.1 spells it: BWS `;` BWS name [BWS `=` BWS value].
fn extension() -> impl Strategy<Value = String> {
    let bws = prop::sample::select(vec!["", " ", "\t", " \t"]);
    (
        bws.clone(),
        bws,
        "[a-z0-9!#$%&'*+.^_`|~-]{1,8}",
        prop::option::of(prop_oneof!["[a-zA-Z0-9.-]{1,8}", "\"[a-z ;=]{0,8}\""]),
    )
        .prop_map(|(before, after, name, value)| match value {
            Some(value) => format!("{before};{after}{name}={value}"),
            None => format!("{before};{after}{name}"),
        })
}

/// A body, how it is cut into chunks, and how each size line is written.
fn chunked_body() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (
        prop::collection::vec(any::<u8>(), 0..600),
        prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        prop::collection::vec((0usize..3, any::<bool>(), prop::option::of(extension())), 9),
        prop::collection::vec(("x-[a-z]{1,6}", "[ -~]{0,10}"), 0..3),
    )
        .prop_map(|(body, cuts, lines, trailers)| {
            let mut wire = Vec::new();
            let chunks = pieces(&body, &cuts);
            let last = [Vec::new()];
            for (chunk, (zeros, upper, ext)) in chunks
                .iter()
                .filter(|c| !c.is_empty())
                .chain(&last)
                .zip(lines.iter().cycle())
            {
                let size = if *upper {
                    format!("{:X}", chunk.len())
                } else {
                    format!("{:x}", chunk.len())
                };
                wire.extend_from_slice("0".repeat(*zeros).as_bytes());
                wire.extend_from_slice(size.as_bytes());
                wire.extend_from_slice(ext.as_deref().unwrap_or("").as_bytes());
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(chunk);
                if !chunk.is_empty() {
                    wire.extend_from_slice(b"\r\n");
                }
            }
            for (name, value) in trailers {
                wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            (body, wire)
        })
}

/// Whether `line` (without its CRLF) is a chunk-size line RFC 9112 §7.1 allows, with at most 15
/// significant hex digits (the decoder's bound, far above any body it will see).
fn valid_size_line(line: &[u8]) -> bool {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let significant = line[..digits].iter().skip_while(|b| **b == b'0').count();
    let rest = &line[digits..];
    let after_bws = rest
        .iter()
        .skip_while(|b| matches!(b, b' ' | b'\t'))
        .copied()
        .collect::<Vec<_>>();
    let no_controls = line.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    digits > 0 && significant <= 15 && no_controls && (after_bws.is_empty() || after_bws[0] == b';')
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_chunking_and_any_reads_decode_to_the_body(
        (body, wire) in chunked_body(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut wire = wire;
        wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        let outcome = decode(&pieces(&wire, &cuts));
        prop_assert!(!outcome.error);
        prop_assert!(outcome.done);
        prop_assert_eq!(outcome.body, body);
        prop_assert_eq!(&outcome.rest[..], b"HTTP/1.1 200 OK\r\n", "the next response stays");
    }

    #[test]
    fn garbage_never_panics_and_never_gives_more_than_it_got(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..400),
            prop::collection::vec(prop::sample::select(b"0123456789abcdefABCDEF;= \t\r\n+-xz\"".to_vec()), 0..400),
        ],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let whole = decode(std::slice::from_ref(&bytes));
        let split = decode(&pieces(&bytes, &cuts));
        // However it is read, the same bytes give the same outcome.
        prop_assert_eq!(&split.body, &whole.body);
        prop_assert_eq!((split.done, split.error), (whole.done, whole.error));
    }

    #[test]
    fn a_size_line_is_accepted_exactly_when_the_rfc_allows_it(
        line in prop::collection::vec(prop::sample::select(b"0123456789abcdefABCDEFG+- \t;=x\"\n\r\x00\x7f".to_vec()), 1..24),
    ) {
        prop_assume!(!line.windows(2).any(|w| w == b"\r\n"));
        let mut wire = line.clone();
        wire.extend_from_slice(b"\r\n");
        let outcome = decode(&[wire]);
        prop_assert_eq!(!outcome.error, valid_size_line(&line), "{:?}", String::from_utf8_lossy(&line));
    }

    #[test]
    fn sizes_near_u64_max_never_overflow(
        size in prop_oneof![u64::MAX - 4096..=u64::MAX, (1u64 << 59)..(1u64 << 60), 64u64..=u64::MAX],
        data in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut wire = format!("{size:x}\r\n").into_bytes();
        wire.extend_from_slice(&data);
        let outcome = decode(&[wire]);
        if size >= 1 << 60 {
            prop_assert!(outcome.error, "16 hex digits are refused");
        } else {
            // Accepted: the data so far is passed on, and the decoder waits for the rest.
            prop_assert!(!outcome.error && !outcome.done);
            prop_assert_eq!(outcome.body, data);
        }
    }
}
