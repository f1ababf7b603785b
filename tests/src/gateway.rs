//! One herd-gateway process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use herd::binaries;
use herd::process::{Process, Spec};

/// How long a gateway gets to print its listening lines.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The admin token test gateways use.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// How to start a gateway.
#[derive(Debug, Clone, Default)]
pub struct GatewayOptions {
    /// Static workers (`host:port`).
    pub workers: Vec<SocketAddr>,
    /// Redis URL and prefix, to discover registered workers.
    pub registry: Option<(String, String)>,
    /// Extra `HERD_GATEWAY_…` variables (full names).
    pub env: Vec<(String, String)>,
}

impl GatewayOptions {
    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running gateway; killed on drop.
#[derive(Debug)]
pub struct TestGateway {
    /// The process.
    pub process: Process,
    /// Public listener.
    pub public: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// HTTPS listener, when `HERD_GATEWAY_TLS__ENABLED=true` is among the options' variables.
    pub tls: Option<SocketAddr>,
}

impl TestGateway {
    /// Starts a gateway with logs in `log_dir` and waits until both listeners are bound.
    pub fn start(options: &GatewayOptions, log_dir: &Path) -> Self {
        let program = binaries::locate(binaries::GATEWAY).unwrap_or_else(|error| panic!("{error}"));
        let workers = options
            .workers
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut spec = Spec::new("gateway", program, log_dir)
            .env("HERD_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("HERD_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0")
            .env("HERD_GATEWAY_ADMIN__TOKEN", ADMIN_TOKEN)
            .env("HERD_LOG", "info")
            .arg("--log-format")
            .arg("json");
        if !workers.is_empty() {
            spec = spec.env("HERD_GATEWAY_WORKERS", workers);
        }
        if let Some((url, prefix)) = &options.registry {
            spec = spec
                .env("HERD_GATEWAY_REGISTRY__ENABLED", "true")
                .env("HERD_GATEWAY_REDIS__URL", url)
                .env("HERD_GATEWAY_REDIS__PREFIX", prefix);
        }
        for (key, value) in &options.env {
            spec = spec.env(key, value);
        }
        let tls = options
            .env
            .iter()
            .any(|(key, value)| key == "HERD_GATEWAY_TLS__ENABLED" && value == "true");
        let roles: &[&str] = if tls {
            &["public", "admin", "tls"]
        } else {
            &["public", "admin"]
        };
        let process = Process::spawn_and_wait(&spec, roles, START_TIMEOUT)
            .unwrap_or_else(|error| panic!("gateway did not start: {error}"));
        let public = process.addr("public").expect("waited for public");
        let admin = process.addr("admin").expect("waited for admin");
        let tls = process.addr("tls");
        TestGateway {
            process,
            public,
            admin,
            tls,
        }
    }

    /// `http://PUBLIC{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// `http://ADMIN{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}
