//! Fuzzes `codec::ChunkedDecoder`: no input panics or loops it, it never gives more body than
//! it got, and the same bytes give the same body and outcome however they are split into reads.
#![no_main]

use bytes::BytesMut;
use herd_gateway::upstream::codec::{Chunk, ChunkedDecoder};
use libfuzzer_sys::fuzz_target;

/// Feeds `reads` in turn; the body, and how it ended (`End`, `NeedMore` or an error).
fn decode(reads: &[&[u8]]) -> (Vec<u8>, &'static str) {
    let mut decoder = ChunkedDecoder::new();
    let mut buffer = BytesMut::new();
    let mut body = Vec::new();
    let total: usize = reads.iter().map(|r| r.len()).sum();
    for read in reads {
        buffer.extend_from_slice(read);
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= total + 2, "the decoder made no progress");
            match decoder.next(&mut buffer) {
                Ok(Chunk::Data(data)) => body.extend_from_slice(&data),
                Ok(Chunk::NeedMore) => break,
                Ok(Chunk::End) => return (body, "end"),
                Err(_) => return (body, "error"),
            }
        }
    }
    assert!(body.len() <= total);
    (body, "more")
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    let cut = usize::from(control) * bytes.len() / 256;
    let whole = decode(&[bytes]);
    let split = decode(&[&bytes[..cut], &bytes[cut..]]);
    assert_eq!(whole, split);
});
