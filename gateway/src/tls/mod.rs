//! TLS termination on a listener of its own (`[tls]`, docs/tls.md).
//!
//! ```text
//! tls.listen ─▶ serving thread accepts ─▶ Terminator::handshake ─▶ ClientIo<TlsStream> ─▶ h2_server / plain_http1 (+ hyper)
//!                                          │ a slot of tls.max_handshakes, all within tls.handshake_timeout
//!                                          └ certificate by SNI from the Resolver (swapped whole on reload)
//! ```
//!
//! - [`config`]: the `[tls]` section.
//! - [`certs`]: PEM chain and key loaded and checked (key matches, not expired) into a set.
//! - [`resolver`]: picks the certificate for a handshake; reload swaps the set atomically.
//! - [`reload`]: polls the files and listens for SIGHUP.
//! - [`redirect`]: the cleartext listener's optional redirect to https.
//!
//! Crypto provider: aws-lc-rs (rustls' default). Against *ring* it signs RSA and ECDSA faster
//! (the server's cost per full handshake), ships the X25519MLKEM768 hybrid key exchange and has
//! a FIPS build; what it costs is a longer first build of its C code (no CMake needed).
//!
//! Protocols: TLS 1.3 and 1.2 only, with rustls' suites — AEAD ciphers (AES-GCM,
//! ChaCha20-Poly1305) over ECDHE, nothing else exists in rustls. No renegotiation (rustls has
//! none). No 0-RTT: early data can be replayed by anyone who saw it, and a gateway in front of
//! arbitrary workers can't know which requests are safe to run twice.
//!
//! When `[tls]` is off nothing of this runs: the cleartext path is the one it was.

pub mod certs;
pub mod config;
pub mod redirect;
pub mod reload;
pub mod resolver;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herd_shared::config::ConfigError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use self::certs::CertSet;
pub use self::config::{SniCertificate, TlsConfig};
use self::reload::ReloadCounts;
use self::resolver::Resolver;

/// The crypto provider every TLS part of the gateway uses (see the module doc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// `tls.handshake_timeout` ran out (waiting for a slot included).
    #[error("handshake timed out")]
    TimedOut,
    /// The client sent something that is no acceptable TLS, or went away.
    #[error("handshake failed: {0}")]
    Failed(std::io::Error),
}

/// Handshake outcomes, for the metrics.
#[derive(Debug, Default)]
struct HandshakeCounts {
    ok: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

/// Everything the serving threads need to terminate TLS: the rustls configuration with the
/// certificate resolver, the handshake limits, and the HSTS header.
pub struct Terminator {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    provider: Arc<CryptoProvider>,
    handshakes: Arc<Semaphore>,
    handshake_timeout: Duration,
    hsts: Option<http::HeaderValue>,
    counts: Arc<HandshakeCounts>,
    reloads: Arc<ReloadCounts>,
    config: TlsConfig,
    /// The files' fingerprint when the first set was loaded (a change before the reload task
    /// first runs is still seen).
    loaded: u64,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshake_slots_free", &self.handshakes.available_permits())
            .finish_non_exhaustive()
    }
}

impl Terminator {
    /// Loads the certificates and builds the server configuration; the error names the key.
    pub fn new(config: &TlsConfig) -> Result<Self, ConfigError> {
        let provider = provider();
        let loaded = reload::fingerprint(config);
        let set = CertSet::load(config, &provider)?;
        let resolver = Arc::new(Resolver::new(set));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError::new("tls", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // 0-RTT stays off (rustls' default, said here so nobody turns it on by accident).
        server.max_early_data_size = 0;
        if !config.session_resumption {
            server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            server.send_tls13_tickets = 0;
        }
        // The server picks the cipher suite from its own order (AES-GCM first: AES-NI).
        server.ignore_client_order = true;
        Ok(Terminator {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            provider,
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            handshake_timeout: config.handshake_timeout,
            hsts: (!config.hsts.is_empty())
                .then(|| http::HeaderValue::from_str(&config.hsts).ok())
                .flatten(),
            counts: Arc::default(),
            reloads: Arc::default(),
            config: config.clone(),
            loaded,
        })
    }

    /// Runs the TLS handshake on a freshly accepted connection, within the handshake timeout
    /// and one of the handshake slots.
    pub async fn handshake(
        &self,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let attempt = async {
            // Closed never: the semaphore lives as long as `self`.
            let _slot = self.handshakes.acquire().await;
            self.acceptor.accept(stream).await
        };
        let result = match tokio::time::timeout(self.handshake_timeout, attempt).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(HandshakeError::Failed(error)),
            Err(_) => Err(HandshakeError::TimedOut),
        };
        let counter = match &result {
            Ok(_) => &self.counts.ok,
            Err(HandshakeError::Failed(_)) => &self.counts.failed,
            Err(HandshakeError::TimedOut) => &self.counts.timed_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// The `Strict-Transport-Security` value for responses over TLS, if configured.
    pub fn hsts(&self) -> Option<&http::HeaderValue> {
        self.hsts.as_ref()
    }

    /// The reload task (polling and SIGHUP), to spawn on a runtime; ends with `stop`. Call it
    /// within a runtime: SIGHUP is watched from this call on.
    pub fn reloader(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        reload::run(
            self.config.clone(),
            self.resolver.clone(),
            self.provider.clone(),
            self.reloads.clone(),
            reload::watch_hangup(),
            self.loaded,
            stop,
        )
    }

    /// The TLS metrics (certificate expiry, handshakes, reloads), read at scrape time.
    pub fn collector(&self) -> Box<dyn Collector> {
        Box::new(TlsCollector {
            resolver: self.resolver.clone(),
            counts: self.counts.clone(),
            reloads: self.reloads.clone(),
        })
    }
}

/// Reads the TLS state when `/metrics` is scraped.
#[derive(Debug)]
struct TlsCollector {
    resolver: Arc<Resolver>,
    counts: Arc<HandshakeCounts>,
    reloads: Arc<ReloadCounts>,
}

impl Collector for TlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let set = self.resolver.current();
        let mut expiry = encoder.encode_descriptor(
            "tls_certificate_expiry_timestamp_seconds",
            "When each served certificate expires (notAfter, Unix seconds), by name (default or its first SNI name)",
            None,
            MetricType::Gauge,
        )?;
        for cert in &set.all {
            expiry
                .encode_family(&[("name", cert.name.as_str())])?
                .encode_gauge(&cert.not_after)?;
        }
        let mut handshakes = encoder.encode_descriptor(
            "tls_handshakes",
            "TLS handshakes, by result (ok, failed, timeout)",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [
            ("ok", &self.counts.ok),
            ("failed", &self.counts.failed),
            ("timeout", &self.counts.timed_out),
        ] {
            handshakes
                .encode_family(&[("result", result)])?
                .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                &count.load(Ordering::Relaxed),
                None,
            )?;
        }
        let mut reloads = encoder.encode_descriptor(
            "tls_reloads",
            "Certificate reloads, by result (ok, refused)",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [("ok", &self.reloads.ok), ("refused", &self.reloads.failed)] {
            reloads
                .encode_family(&[("result", result)])?
                .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
                    &count.load(Ordering::Relaxed),
                    None,
                )?;
        }
        Ok(())
    }
}
