//! The RESP2 reply reader (`herd_shared::resp`) against redis-rs's own parser, the reference it
//! replaced on herd's connections: generated replies read the same, whole or in any reads, and
//! arbitrary bytes never panic and are read as redis-rs reads them; and replies read in place
//! (`resp::read_replies`) are an answer only when read to exactly their end, whatever the reader
//! takes. proptest's 256 cases per property unless `PROPTEST_CASES` says otherwise
//! (docs/fuzzing.md).

use herd_shared::resp::{self, Cursor, Framer};
use proptest::collection::vec;
use proptest::prelude::*;

/// One RESP2 reply of the kinds Redis sends herd, nested up to four arrays deep.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        "[ -~]{0,16}".prop_map(|text| format!("+{text}\r\n").into_bytes()),
        Just(b"+OK\r\n".to_vec()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        Just(b"$-1\r\n".to_vec()),
        Just(b"*-1\r\n".to_vec()),
        vec(any::<u8>(), 0..40).prop_map(|bytes| {
            let mut reply = format!("${}\r\n", bytes.len()).into_bytes();
            reply.extend(bytes);
            reply.extend(b"\r\n");
            reply
        }),
        "(ERR|NOSCRIPT|READONLY|LOADING|WRONGTYPE|MOVED|X)( [ -~]{0,16})?"
            .prop_map(|text| format!("-{text}\r\n").into_bytes()),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        vec(inner, 0..6).prop_map(|items| {
            let mut reply = format!("*{}\r\n", items.len()).into_bytes();
            items.into_iter().for_each(|item| reply.extend(item));
            reply
        })
    })
}

/// Bytes that look like RESP often enough to get past the first line.
fn resp_like() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop::sample::select(b"+-:$*\r\n\r\n0123456789-ab OK".to_vec()),
        0..48,
    )
}

proptest! {
    // As in the gateway's properties: no regression files; a failure prints the shrunk input,
    // which becomes a unit test beside the code it broke.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_generated_reply_reads_as_redis_rs_reads_it(bytes in reply()) {
        let theirs = redis::parse_redis_value(&bytes).expect("redis-rs reads it");
        let (ours, used) = resp::parse(&bytes).unwrap().expect("whole");
        prop_assert_eq!(ours, theirs);
        prop_assert_eq!(used, bytes.len());
    }

    #[test]
    fn a_reply_in_any_reads_is_found_whole_exactly_at_its_end(
        bytes in reply(),
        cuts in vec(any::<prop::sample::Index>(), 0..6),
        next in resp_like(),
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len())).collect();
        cuts.sort_unstable();
        let mut framer = Framer::default();
        for cut in cuts {
            prop_assert_eq!(framer.advance(&bytes[..cut]).unwrap(), None);
            prop_assert_eq!(resp::parse(&bytes[..cut]).unwrap(), None);
        }
        // Whatever follows it (the next reply's first bytes) changes nothing.
        let mut stream = bytes.clone();
        stream.extend(next);
        prop_assert_eq!(framer.advance(&stream).unwrap(), Some(bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_the_framer_agrees(bytes in vec(any::<u8>(), 0..200)) {
        let parsed = resp::parse(&bytes);
        let framed = Framer::default().advance(&bytes);
        if let Ok(Some((_, used))) = parsed {
            prop_assert_eq!(framed.unwrap(), Some(used));
        }
    }

    /// `replies_end` (the packed exchange's look through replies, nothing built) ends a reply
    /// where `parse` does, refuses what it refuses, and finds a server error exactly when the
    /// parsed value holds one.
    #[test]
    fn replies_end_agrees_with_parse(bytes in resp_like()) {
        agree(&bytes)?;
    }

    /// The same over arbitrary bytes (non-UTF-8 lines, errors anywhere).
    #[test]
    fn replies_end_agrees_with_parse_on_any_bytes(bytes in vec(any::<u8>(), 0..200)) {
        agree(&bytes)?;
    }

    #[test]
    fn resp_like_bytes_read_as_redis_rs_reads_them(bytes in resp_like()) {
        let ours = resp::parse(&bytes);
        // What redis-rs reads whole, we read the same; what we read whole, it reads the same.
        if let Ok(theirs) = redis::parse_redis_value(&bytes) {
            prop_assert_eq!(ours.as_ref().ok().cloned().flatten().map(|(value, _)| value), Some(theirs));
        }
        if let Ok(Some((value, used))) = ours {
            prop_assert_eq!(redis::parse_redis_value(&bytes[..used]).ok(), Some(value));
            prop_assert_eq!(Framer::default().advance(&bytes).unwrap(), Some(used));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Replies read in place end where they end, whatever the reader reads (`tokens` values, as
    /// many or as few as it likes): an answer means exactly the replies asked for were read,
    /// and a connection's next call starts at the next reply. A reader of every value answers
    /// whenever the replies hold only kinds the cursor reads, and nothing answers before the
    /// last byte has come.
    #[test]
    fn replies_read_in_place_end_where_they_end(
        replies in vec(reply(), 1..4),
        tokens in 0usize..40,
        next in resp_like(),
    ) {
        let count = replies.len();
        let end = replies.iter().map(Vec::len).sum::<usize>();
        let mut bytes = replies.concat();
        bytes.extend(next);
        let some_tokens = |cursor: &mut Cursor<'_>| read_tokens(cursor, tokens);
        let (ended, _) = resp::read_replies(&bytes, count, some_tokens).unwrap().expect("whole");
        prop_assert_eq!(ended, end);
        let (ended, answer) = resp::read_replies(&bytes, count, |cursor| {
            (0..count).try_for_each(|_| read_value(cursor))
        })
        .unwrap()
        .expect("whole");
        prop_assert_eq!(ended, end);
        let cursor_kinds = replies.iter().all(|reply| {
            let (value, _) = resp::parse(reply).unwrap().unwrap();
            cursor_reads(&value)
        });
        prop_assert_eq!(answer.is_ok_and(|read| read.is_some()), cursor_kinds);
        for cut in [0, end / 2, end - 1] {
            prop_assert!(resp::read_replies(&bytes[..cut], count, some_tokens).unwrap().is_none());
        }
    }
}

/// Reads `tokens` values the cursor knows, an array's header counting as one.
fn read_tokens(cursor: &mut Cursor<'_>, tokens: usize) -> Option<()> {
    for _ in 0..tokens {
        let read =
            cursor.array().is_some() || cursor.bulk().is_some() || cursor.integer().is_some();
        if !read {
            return None;
        }
    }
    Some(())
}

/// Reads one whole value, an array with all its elements.
fn read_value(cursor: &mut Cursor<'_>) -> Option<()> {
    if let Some(elements) = cursor.array() {
        return (0..elements.unwrap_or(0)).try_for_each(|_| read_value(cursor));
    }
    if cursor.bulk().is_some() || cursor.integer().is_some() {
        return Some(());
    }
    None
}

/// Whether a cursor reads `value`: bulk strings, integers and nil, in arrays at most four deep
/// (`redis::Value::Nil` is a nil bulk string or a nil array: both are read).
fn cursor_reads(value: &redis::Value) -> bool {
    fn within(value: &redis::Value, depth: usize) -> bool {
        match value {
            redis::Value::BulkString(_) | redis::Value::Int(_) | redis::Value::Nil => true,
            redis::Value::Array(values) => {
                depth < 4 && values.iter().all(|value| within(value, depth + 1))
            }
            _ => false,
        }
    }
    within(value, 0)
}

/// `replies_end` and `parse` agree on `bytes`' first reply: the same end, the same refusal, and
/// a server error found exactly when the parsed value holds one.
fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    fn has_error(value: &redis::Value) -> bool {
        match value {
            redis::Value::ServerError(_) => true,
            redis::Value::Array(values) => values.iter().any(has_error),
            _ => false,
        }
    }
    match (resp::parse(bytes), resp::replies_end(bytes, 1)) {
        (Ok(Some((value, used))), Ok(Some((end, error)))) => {
            prop_assert_eq!(end, used);
            prop_assert_eq!(error.is_some(), has_error(&value));
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (parsed, ended) => prop_assert!(false, "parse {:?}, replies_end {:?}", parsed, ended),
    }
    Ok(())
}
