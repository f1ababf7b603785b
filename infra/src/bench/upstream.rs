//! `herd bench upstream`: a minimal hyper server, the plain upstream of `herd bench proxy
//! --upstream hyper`.
//!
//! Users' apps are not herd-worker, and a proxy can look better or worse in front of one upstream
//! than another (its response head, its keep-alive habits). This one is as plain as a Rust HTTP
//! server gets: hyper-util's HTTP/1.1 + HTTP/2-cleartext server on one port, on tokio's default
//! multi-threaded runtime. Every request is answered `200 text/plain "hello\n"` (the hello
//! app's body, without its identity headers and axum routing), whatever its path, except
//! `/page`: 64 KiB of hello lines, as the hello app answers it (`herd_shared::page`). It
//! announces its port the way herd's own processes do
//! (`{"event":"listening","role":"public","addr":…}` on stdout) and runs until it is killed.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The body of every answer (the same as herd-worker's hello app).
pub const BODY: &[u8] = b"hello\n";

/// How long accepting pauses after a failed accept (e.g. out of file descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// Binds `listen`, announces the bound address on stdout and serves until the process is killed.
pub fn run(listen: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await.map_err(|error| {
            std::io::Error::new(error.kind(), format!("cannot listen on {listen}: {error}"))
        })?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            r#"{{"event":"listening","role":"public","addr":"{}"}}"#,
            listener.local_addr()?
        )?;
        out.flush()?;
        drop(out);
        serve(listener).await;
        Ok(())
    })
}

/// Serves every connection accepted on `listener`, HTTP/1.1 or HTTP/2, forever.
pub async fn serve(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(error = %error, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}

/// The page (`herd_shared::page`), made once.
static PAGE: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| Bytes::from(herd_shared::page::body()));

async fn hello(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if request.uri().path() == herd_shared::page::PATH {
        PAGE.clone()
    } else {
        Bytes::from_static(BODY)
    };
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;

    async fn get(addr: SocketAddr, path: &str, http2: bool) -> (u16, String, Bytes) {
        let client = Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build::<_, Empty<Bytes>>(HttpConnector::new());
        let response = client
            .get(format!("http://{addr}{path}").parse().unwrap())
            .await
            .expect("answered");
        let status = response.status().as_u16();
        let content_type = response.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, body)
    }

    #[tokio::test]
    async fn every_path_says_hello_over_http1_and_http2() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener));
        for (path, http2) in [("/", false), ("/readyz", false), ("/a/b?c=d", true)] {
            let (status, content_type, body) = get(addr, path, http2).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(content_type, "text/plain; charset=utf-8");
            assert_eq!(&body[..], BODY);
        }
        for http2 in [false, true] {
            let (status, _, body) = get(addr, "/page", http2).await;
            assert_eq!(status, 200);
            assert_eq!(body, herd_shared::page::body());
        }
        server.abort();
    }
}
