//! The `Date` header value the gateway puts on answers that come without one (its own
//! HTTP/1.1 server's raw heads, `crate::plain_http1`; HTTP/2 answers, `crate::h2_server`): made
//! once a second per thread, a clone after that (a reference count).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;

thread_local! {
    /// The second it was made in, and the value.
    static MADE: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
}

/// The current time as a `Date` value ("Sun, 06 Nov 1994 08:49:37 GMT").
pub(crate) fn now() -> HeaderValue {
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    MADE.with_borrow_mut(|made| match made {
        Some((made_at, value)) if *made_at == second => value.clone(),
        _ => {
            let text = Bytes::from(httpdate::fmt_http_date(now));
            let value = HeaderValue::from_maybe_shared(text)
                .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
            *made = Some((second, value.clone()));
            value
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_date_is_now_and_made_once_a_second() {
        let first = now();
        let parsed = httpdate::parse_http_date(first.to_str().unwrap()).unwrap();
        let off = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(off < Duration::from_secs(2), "{first:?}");
        let second = now();
        // The same second (almost always): the same bytes, shared.
        if second == first {
            assert_eq!(first.as_bytes().as_ptr(), second.as_bytes().as_ptr());
        }
    }
}
