//! Test support: small hyper upstreams and an in-process gateway, all on 127.0.0.1:0.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use herd_gateway::{GatewayConfig, Listeners};

/// How an upstream behaves; switchable while it runs.
#[derive(Debug, Default)]
pub struct Behavior {
    /// Never answer anything (a SIGSTOPped process, seen from outside).
    pub hang: AtomicBool,
    /// `/readyz` answers this status (0 = 200).
    pub ready_status: AtomicU16,
    /// Every other path answers this status (0 = 200).
    pub status: AtomicU16,
    /// `/slow` waits this many milliseconds before it answers (a request stuck in a busy
    /// worker's queue while the worker answers others); 0: at once.
    pub slow_ms: AtomicU64,
}

/// A small HTTP server that says who it is and echoes what it got.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub behavior: Arc<Behavior>,
    /// Requests seen on paths other than /readyz.
    pub hits: Arc<AtomicU64>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let behavior = Arc::new(Behavior::default());
        let hits = Arc::new(AtomicU64::new(0));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (b, h, t, n) = (
            behavior.clone(),
            hits.clone(),
            tasks.clone(),
            name.to_string(),
        );
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (b, h, n) = (b.clone(), h.clone(), n.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let (b, h, n) = (b.clone(), h.clone(), n.clone());
                    async move { Ok::<_, Infallible>(answer(request, &b, &h, &n).await) }
                });
                let connection = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                t.lock().unwrap().push(connection.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Upstream {
            name: name.into(),
            addr,
            behavior,
            hits,
            tasks,
        }
    }

    /// Like kill -9: the listener and every connection close at once — returns once every
    /// task is gone (an aborted task is dropped only when the runtime gets to it; until then
    /// its listener still completes handshakes, which a killed process never does).
    pub async fn kill(&self) {
        let tasks = self.abort();
        while !tasks.iter().all(AbortHandle::is_finished) {
            tokio::task::yield_now().await;
        }
    }

    fn abort(&self) -> Vec<AbortHandle> {
        let tasks: Vec<AbortHandle> = self.tasks.lock().unwrap().drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        tasks
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn answer(
    request: Request<Incoming>,
    b: &Behavior,
    hits: &AtomicU64,
    name: &str,
) -> Response<Full<Bytes>> {
    if b.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let path = request.uri().path().to_string();
    let slow_ms = b.slow_ms.load(Ordering::SeqCst);
    if path == "/slow" && slow_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(slow_ms)).await;
    }
    let status = if path == "/readyz" {
        b.ready_status.load(Ordering::SeqCst)
    } else {
        hits.fetch_add(1, Ordering::SeqCst);
        b.status.load(Ordering::SeqCst)
    };
    let status = if status == 0 { 200 } else { status };
    let headers: BTreeMap<String, String> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let method = request.method().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if path == "/echo" {
        return Response::builder()
            .status(status)
            .header("x-herd-worker", name)
            .body(Full::new(body))
            .unwrap();
    }
    let json = serde_json::json!({
        "worker": name, "method": method, "path": path, "headers": headers, "body_len": body.len(),
    });
    Response::builder()
        .status(status)
        .header("x-herd-worker", name)
        .header("content-type", "application/json")
        .header("connection", "x-upstream-hop")
        .header("x-upstream-hop", "1")
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap()
}

/// A gateway running in-process.
pub struct Gateway {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The TLS listener, when `[tls]` is on.
    pub tls: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway over `workers` with test-friendly timings, adjusted by `tweak`.
    pub async fn start(workers: &[&Upstream], tweak: impl FnOnce(&mut GatewayConfig)) -> Gateway {
        let mut config = GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..GatewayConfig::default()
        };
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        config.admin.token = "test-token".into();
        config.workers = workers.iter().map(|u| u.addr.to_string()).collect();
        config.health.interval = Duration::from_millis(100);
        config.health.timeout = Duration::from_millis(100);
        config.timeouts.request = Duration::from_secs(5);
        tweak(&mut config);
        let listeners = Listeners::bind(&config).await.unwrap();
        let public = listeners.public.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let tls = listeners.tls.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            herd_gateway::run(listeners, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Gateway {
            public,
            admin,
            tls,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Stops the gateway and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("gateway stops")
                .unwrap();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// An answer as the tests look at it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn worker(&self) -> String {
        self.headers
            .get("x-herd-worker")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("an answer within 30 s")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Answer {
    send(client, "GET", url, &[], Bytes::new()).await
}

/// An HTTP/2 (prior knowledge) client connection to `addr`: its sender, and the task driving
/// the connection (it ends when the connection closes).
pub async fn http2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

/// Polls `condition` every 10 ms until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A worker's state as the admin API reports it.
pub async fn worker_state(gateway: &Gateway, id: &str) -> String {
    let answer = send(
        &client(),
        "GET",
        &gateway.admin_url("/api/workers"),
        &[("authorization", "Bearer test-token")],
        Bytes::new(),
    )
    .await;
    let list = answer.json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .map(|w| w["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

/// One field of a worker in the admin API's list.
pub async fn worker_field(gateway: &Gateway, id: &str, field: &str) -> serde_json::Value {
    let answer = send(
        &client(),
        "GET",
        &gateway.admin_url("/api/workers"),
        &[("authorization", "Bearer test-token")],
        Bytes::new(),
    )
    .await;
    answer
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == id)
        .map(|w| w[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// A client's TLS session with a gateway ([`TestTls::connect`]).
pub type TlsClient = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// `[tls]` for a test gateway: a CA and a leaf for `localhost` it signed, as files, and a
/// client config trusting the CA that offers only HTTP/1.1 over ALPN.
pub struct TestTls {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl TestTls {
    pub fn generate() -> TestTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("leaf.pem"), dir.path().join("leaf.key"));
        std::fs::write(&cert, leaf.pem() + &ca.pem()).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from(ca.der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        TestTls {
            _dir: dir,
            cert,
            key,
            client: Arc::new(client),
        }
    }

    /// Turns `[tls]` on in `config`, on 127.0.0.1:0 with the leaf.
    pub fn enable(&self, config: &mut GatewayConfig) {
        config.tls.enabled = true;
        config.tls.listen = "127.0.0.1:0".parse().unwrap();
        config.tls.cert = self.cert.clone();
        config.tls.key = self.key.clone();
    }

    /// A TLS session with `gateway`'s TLS listener, for `localhost`.
    pub async fn connect(&self, gateway: &Gateway) -> TlsClient {
        let tcp = tokio::net::TcpStream::connect(gateway.tls.expect("a TLS listener"))
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, tcp)
            .await
            .unwrap()
    }
}
