//! Reading the session id from the `Cookie` header and writing the `Set-Cookie` header.
//!
//! The cookie is always `HttpOnly`, `SameSite=Lax` and `Path=/`; `Secure` when configured or when
//! the request came over https (the gateway's `X-Forwarded-Proto`). No `Max-Age`: the server
//! enforces the timeouts, and a browser session cookie leaks less.

use http::{HeaderMap, HeaderValue, header};

use super::id;
use crate::config::SessionConfig;

/// The well-formed session id in the request's cookies, if any. Malformed values are ignored.
pub(crate) fn session_id(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .find(|value| id::is_well_formed(value))
        .map(str::to_string)
}

/// Whether the request came over https, directly or through the gateway.
pub(crate) fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` carrying `id`.
pub(crate) fn set(config: &SessionConfig, id: &str, https: bool) -> HeaderValue {
    build(config, id, https, false)
}

/// `Set-Cookie` that makes the browser forget the session cookie.
pub(crate) fn clear(config: &SessionConfig, https: bool) -> HeaderValue {
    build(config, "", https, true)
}

fn build(config: &SessionConfig, value: &str, https: bool, expire: bool) -> HeaderValue {
    let mut cookie = format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax",
        config.cookie_name
    );
    if let Some(domain) = &config.cookie_domain {
        cookie.push_str("; Domain=");
        cookie.push_str(domain);
    }
    if config.cookie_secure || https {
        cookie.push_str("; Secure");
    }
    if expire {
        cookie.push_str("; Max-Age=0");
    }
    // Name, domain (validated at start-up) and hex ids are all visible ASCII.
    HeaderValue::from_str(&cookie).expect("cookie is visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn cookie_has_the_safe_attributes() {
        let config = SessionConfig::default();
        let value = set(&config, "abc", false);
        let text = value.to_str().unwrap();
        assert!(text.starts_with("herd_session=abc;"), "{text}");
        for attribute in ["Path=/", "HttpOnly", "SameSite=Lax"] {
            assert!(text.contains(attribute), "{text}");
        }
        assert!(!text.contains("Secure"), "{text}");
        assert!(!text.contains("Domain"), "{text}");
        assert!(!text.contains("Max-Age"), "{text}");
    }

    #[test]
    fn secure_when_configured_or_over_https() {
        let mut config = SessionConfig::default();
        assert!(
            set(&config, "a", true)
                .to_str()
                .unwrap()
                .contains("; Secure")
        );
        config.cookie_secure = true;
        config.cookie_domain = Some("example.com".into());
        let text = set(&config, "a", false).to_str().unwrap().to_string();
        assert!(
            text.contains("; Secure") && text.contains("; Domain=example.com"),
            "{text}"
        );
        assert!(is_https(&headers(&[("x-forwarded-proto", "HTTPS")])));
        assert!(!is_https(&headers(&[("x-forwarded-proto", "http")])));
        assert!(!is_https(&headers(&[])));
    }

    #[test]
    fn clearing_expires_the_cookie() {
        let text = clear(&SessionConfig::default(), false)
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            text.starts_with("herd_session=;") && text.contains("Max-Age=0"),
            "{text}"
        );
    }

    #[test]
    fn only_well_formed_ids_are_read() {
        let good = id::generate();
        let found = session_id(
            &headers(&[("cookie", &format!("a=1; herd_session={good}; b=2"))]),
            "herd_session",
        );
        assert_eq!(found.as_deref(), Some(good.as_str()));
        let two_headers = headers(&[
            ("cookie", "x=1"),
            ("cookie", &format!("herd_session={good}")),
        ]);
        assert_eq!(
            session_id(&two_headers, "herd_session").as_deref(),
            Some(good.as_str())
        );
        for bad in [
            "herd_session=short",
            "herd_session=",
            "other=1",
            "herd_session",
        ] {
            assert_eq!(
                session_id(&headers(&[("cookie", bad)]), "herd_session"),
                None,
                "{bad}"
            );
        }
        assert_eq!(session_id(&headers(&[]), "herd_session"), None);
    }
}
