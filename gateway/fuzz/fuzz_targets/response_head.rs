//! Fuzzes `codec::parse_response`: no input panics it, a parse takes only the head off the
//! buffer, and the same bytes read in two pieces parse as they do in one.
#![no_main]

use bytes::BytesMut;
use herd_gateway::upstream::codec::{Parsed, parse_response};
use http::Method;
use libfuzzer_sys::fuzz_target;

/// One parse; checks what it left in the buffer.
fn parse(bytes: &[u8], method: &Method, upgrade: bool, raw: bool) -> String {
    let mut buffer = BytesMut::from(bytes);
    let parsed = parse_response(&mut buffer, method, upgrade, raw);
    match &parsed {
        Ok(Parsed::Complete(..)) => assert!(bytes.ends_with(&buffer)),
        Ok(Parsed::Interim(length)) => assert!(*length <= bytes.len() && buffer == bytes),
        _ => assert_eq!(&buffer[..], bytes),
    }
    format!("{parsed:?}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let method = if control & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let upgrade = control & 2 != 0;
    let raw = control & 4 != 0;
    let whole = parse(bytes, &method, upgrade, raw);
    // A reader sees a prefix first: if that is already a whole head, it must be this one.
    let cut = usize::from(control >> 3) * bytes.len() / 32;
    let first = parse(&bytes[..cut], &method, upgrade, raw);
    if first.starts_with("Ok(Complete") || first.starts_with("Ok(Interim") {
        assert_eq!(first, whole);
    } else if first.starts_with("Err") {
        // A prefix refused is refused whole (inputs stay far below the 64 KiB head limit, the
        // one refusal that more bytes could turn into a head).
        assert!(whole.starts_with("Err"), "{first} then {whole}");
    }
});
