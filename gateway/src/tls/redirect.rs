//! `tls.redirect_http`: the cleartext listener sends every request to the same URL over https
//! (308, so a POST stays a POST) instead of proxying it.

use http::{HeaderValue, Request, Response, StatusCode, header};

use crate::body::ResponseBody;

/// Where to send cleartext clients: the https port (left out of URLs when 443).
#[derive(Debug, Clone, Copy)]
pub struct Redirect {
    /// Port of `tls.listen`.
    pub https_port: u16,
}

impl Redirect {
    /// The 308 for `request`: same host (from `Host` or the URI's authority), same path and
    /// query, scheme https. A request without a usable host gets a 400.
    pub fn respond<B>(&self, request: &Request<B>) -> Response<ResponseBody> {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .or_else(|| request.uri().authority().map(http::uri::Authority::as_str))
            .and_then(|value| value.parse::<http::uri::Authority>().ok());
        let Some(host) = host else {
            return plain(StatusCode::BAD_REQUEST, None);
        };
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let location = match self.https_port {
            443 => format!("https://{}{path}", host.host()),
            port => format!("https://{}:{port}{path}", bracketed(host.host())),
        };
        match HeaderValue::from_str(&location) {
            Ok(location) => plain(StatusCode::PERMANENT_REDIRECT, Some(location)),
            Err(_) => plain(StatusCode::BAD_REQUEST, None),
        }
    }
}

/// An IPv6 host as it goes before a port; `Authority::host` already keeps the brackets, so
/// this only guards a bare address.
fn bracketed(host: &str) -> std::borrow::Cow<'_, str> {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]").into()
    } else {
        host.into()
    }
}

fn plain(status: StatusCode, location: Option<HeaderValue>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(redirect: Redirect, host: &str, target: &str) -> (StatusCode, Option<String>) {
        let request = Request::builder()
            .uri(target)
            .header(header::HOST, host)
            .body(())
            .unwrap();
        let response = redirect.respond(&request);
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().unwrap().to_string());
        (response.status(), location)
    }

    #[test]
    fn keeps_host_path_and_query_and_drops_port_443() {
        let standard = Redirect { https_port: 443 };
        assert_eq!(
            location(standard, "shop.example:80", "/cart?x=1"),
            (
                StatusCode::PERMANENT_REDIRECT,
                Some("https://shop.example/cart?x=1".into())
            )
        );
        let other = Redirect { https_port: 8443 };
        assert_eq!(
            location(other, "shop.example", "/"),
            (
                StatusCode::PERMANENT_REDIRECT,
                Some("https://shop.example:8443/".into())
            )
        );
        assert_eq!(location(other, "bad host", "/").0, StatusCode::BAD_REQUEST);
    }
}
