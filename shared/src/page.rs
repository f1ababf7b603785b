//! The long answer of the benchmarks' upstreams: `GET /page` on herd-worker's hello app, on
//! `herd bench upstream` and on infra/bench/node-hello.js is [`BYTES`] of text, what a page or
//! an API's list weighs, where every other path answers a few bytes (`herd bench proxy
//! --scenarios page`; docs/performance.md, section 36).

/// The path that answers the page.
pub const PATH: &str = "/page";

/// How long the page is: 64 KiB.
pub const BYTES: usize = 64 * 1024;

/// The page: `hello\n` over and over, [`BYTES`] long (made once by each server).
pub fn body() -> Vec<u8> {
    b"hello\n".iter().copied().cycle().take(BYTES).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_its_length_of_hello_lines() {
        let page = body();
        assert_eq!(page.len(), BYTES);
        assert!(page.starts_with(b"hello\nhello\n"));
        assert!(page.chunks(6).all(|line| b"hello\n".starts_with(line)));
    }
}
