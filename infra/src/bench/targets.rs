//! What `herd bench proxy` measures: the upstreams (herd-workers, plus Redis for the session
//! scenario) and the targets in front of them — the upstream itself ("direct"), herd-gateway,
//! HAProxy and nginx, all on free loopback ports.
//!
//! HAProxy and nginx run unprivileged-style from configs written into the work directory from the
//! templates `infra/bench/haproxy.cfg.in` and `infra/bench/nginx.conf.in` (compiled in; the
//! comments there say how they differ from herd's settings). Each target listens twice: HTTP/1.1
//! and HTTP/2 cleartext with prior knowledge (herd-gateway and the workers take both on one port).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::cpu_budget::CpuBudget;
use super::sample::{self, Usage};
use super::{BenchError, http, write_file};
use crate::binaries;
use crate::deps::{self, HAPROXY, Program};
use crate::ports::free_port;
use crate::process::{Process, Spec};
use crate::redis_server::RedisServer;

/// nginx, the other reference proxy.
pub const NGINX: Program = Program {
    command: "nginx",
    package: "nginx",
};

/// How long a process gets to come up and answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// One readiness or setup request's bound.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Redis key prefix of the benchmark's sessions.
const PREFIX: &str = "bench:";

/// Which target a run loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Straight to the first upstream: the baseline.
    Direct,
    /// herd-gateway with its defaults.
    Herd,
    /// herd-gateway with one serving thread (`threads = 1`) instead of one per CPU: what a
    /// gateway sharing a small machine with busy workers may be better off with (not in the
    /// default targets).
    #[value(name = "herd-1t")]
    #[serde(rename = "herd-1t")]
    HerdOneThread,
    /// herd-gateway with `adaptive_threads = false`: every serving thread takes connections
    /// and none moves (what herd did before docs/performance.md section 12; not in the default
    /// targets).
    #[value(name = "herd-fixed")]
    #[serde(rename = "herd-fixed")]
    HerdFixedThreads,
    /// herd-gateway exporting OpenTelemetry traces, 1 % of requests sampled, to an OTLP/HTTP sink
    /// the benchmark runs (not in the default targets).
    #[value(name = "herd-trace-1")]
    #[serde(rename = "herd-trace-1")]
    HerdTrace1,
    /// herd-gateway exporting every request's spans (100 % sampling) to the same sink.
    #[value(name = "herd-trace-100")]
    #[serde(rename = "herd-trace-100")]
    HerdTrace100,
    /// HAProxy (anchor hapE).
    Haproxy,
    /// nginx (anchor ngx1ka512).
    Nginx,
}

impl TargetKind {
    /// Every target, in the order runs go.
    pub const ALL: [TargetKind; 4] = [
        TargetKind::Direct,
        TargetKind::Herd,
        TargetKind::Haproxy,
        TargetKind::Nginx,
    ];

    /// Its name in tables and file names.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Herd => "herd",
            TargetKind::HerdOneThread => "herd-1t",
            TargetKind::HerdFixedThreads => "herd-fixed",
            TargetKind::HerdTrace1 => "herd-trace-1",
            TargetKind::HerdTrace100 => "herd-trace-100",
            TargetKind::Haproxy => "haproxy",
            TargetKind::Nginx => "nginx",
        }
    }

    /// Whether it is a herd-gateway (in one of its configurations).
    pub fn is_herd(self) -> bool {
        !matches!(
            self,
            TargetKind::Direct | TargetKind::Haproxy | TargetKind::Nginx
        )
    }
}

/// Which server the upstreams run (`herd bench proxy --upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
pub enum UpstreamServer {
    /// herd-worker (axum): the hello app, or the demo app with Redis for the session scenario.
    #[default]
    #[value(name = "herd-worker")]
    #[serde(rename = "herd-worker")]
    HerdWorker,
    /// A minimal hyper server (`herd bench upstream`): hello on every path, no identity
    /// headers, no routing; no session scenario.
    #[serde(rename = "hyper")]
    Hyper,
    /// Node.js's own http server (infra/bench/node-hello.js, built in): hello on every path with
    /// Node's default headers, `Connection: keep-alive` and `Keep-Alive` on every answer, as
    /// Express apps answer; no session scenario. Needs node (installed with apt-get as root).
    #[serde(rename = "node")]
    Node,
}

impl UpstreamServer {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamServer::HerdWorker => "herd-worker",
            UpstreamServer::Hyper => "hyper",
            UpstreamServer::Node => "node",
        }
    }
}

/// Which app the upstreams serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamApp {
    /// herd-worker's hello app: no Redis.
    Hello,
    /// The demo app with sessions in a private Redis.
    Demo,
    /// The minimal hyper server of `herd bench upstream` (see [`super::upstream`]).
    PlainHyper,
    /// Node.js's http server running [`NODE_HELLO`].
    Node,
}

/// The Node.js upstream's script (infra/bench/node-hello.js), written into the run's directory.
const NODE_HELLO: &str = include_str!("../../bench/node-hello.js");

/// The upstream workers (and Redis for the demo app), stopped when dropped.
#[derive(Debug)]
pub struct Upstreams {
    workers: Vec<Process>,
    /// Dropped after the workers (field order).
    redis: Option<RedisServer>,
    addrs: Vec<SocketAddr>,
}

impl Upstreams {
    /// Starts `count` workers serving `app` on free loopback ports; for the demo app first a
    /// private redis-server with its data in `dir`.
    pub fn start(app: UpstreamApp, count: usize, dir: &Path) -> Result<Self, BenchError> {
        let program = match app {
            UpstreamApp::PlainHyper => binaries::locate(binaries::HERD)?,
            UpstreamApp::Hello | UpstreamApp::Demo => binaries::locate(binaries::WORKER)?,
            UpstreamApp::Node => deps::ensure(deps::NODE)?,
        };
        let redis = match app {
            UpstreamApp::Demo => Some(RedisServer::start(None, dir, dir)?),
            UpstreamApp::Hello | UpstreamApp::PlainHyper | UpstreamApp::Node => None,
        };
        let script = dir.join("node-hello.js");
        if app == UpstreamApp::Node {
            write_file(&script, NODE_HELLO)?;
        }
        let mut workers = Vec::with_capacity(count);
        let mut addrs = Vec::with_capacity(count);
        for index in 1..=count {
            let id = format!("up{index}");
            if matches!(app, UpstreamApp::PlainHyper | UpstreamApp::Node) {
                let spec = if app == UpstreamApp::Node {
                    Spec::new(format!("node-{id}"), &program, dir)
                        .arg(script.display().to_string())
                        .env("PORT", "0")
                } else {
                    Spec::new(format!("hyper-{id}"), &program, dir).args_from([
                        "bench",
                        "upstream",
                        "--listen",
                        "127.0.0.1:0",
                    ])
                };
                let process = Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?;
                addrs.push(process.addr("public").ok_or_else(|| {
                    BenchError::Setup(format!("{} upstream {id} announced no address", spec.name))
                })?);
                workers.push(process);
                continue;
            }
            let mut spec = Spec::new(format!("worker-{id}"), &program, dir)
                .env("HERD_WORKER_LISTEN", "127.0.0.1:0")
                .env("HERD_WORKER_ID", &id)
                .env("HERD_WORKER_MACHINE", "bench")
                .env("HERD_WORKER_REGISTRY__ENABLED", "false")
                .env("HERD_LOG", "warn")
                .arg("--log-format")
                .arg("json");
            spec = match &redis {
                None => spec.env("HERD_WORKER_APP", "hello"),
                Some(redis) => spec
                    .env("HERD_WORKER_APP", "demo")
                    .env("HERD_WORKER_REDIS__URL", redis.url())
                    .env("HERD_WORKER_REDIS__PREFIX", PREFIX),
            };
            let process = Process::spawn_and_wait(&spec, &["public"], START_TIMEOUT)?;
            let addr = process
                .addr("public")
                .ok_or_else(|| BenchError::Setup(format!("{id} announced no address")))?;
            addrs.push(addr);
            workers.push(process);
        }
        let upstreams = Upstreams {
            workers,
            redis,
            addrs,
        };
        for worker in 0..upstreams.workers.len() {
            upstreams.wait_ready(worker)?;
        }
        Ok(upstreams)
    }

    fn wait_ready(&self, index: usize) -> Result<(), BenchError> {
        let addr = self.addrs[index];
        wait_for(START_TIMEOUT, &format!("worker {addr} /readyz"), || {
            http::status(addr, "/readyz", REQUEST_TIMEOUT) == Some(200)
        })
    }

    /// The workers' addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// CPU seconds the upstream side (every worker, and Redis) has spent so far; `None` when
    /// one of them cannot be read in `/proc`.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let redis = self.redis.as_ref().and_then(RedisServer::pid);
        let groups: Vec<u32> = self.workers.iter().map(Process::pid).chain(redis).collect();
        sample::groups_usage(&groups)
            .into_iter()
            .map(|usage| (usage.processes > 0).then_some(usage.cpu_seconds))
            .sum()
    }

    /// Logs in as `user` on the first worker (`POST /login`) and returns the `Cookie` header
    /// value of the new session.
    pub fn login(&self, user: &str) -> Result<String, BenchError> {
        let body = format!(r#"{{"user":"{user}"}}"#);
        let reply = http::request(
            self.addrs[0],
            "POST",
            "/login",
            &[("content-type", "application/json")],
            Some(&body),
            REQUEST_TIMEOUT,
        )
        .map_err(|error| BenchError::Setup(format!("login failed: {error}")))?;
        if reply.status != 200 {
            return Err(BenchError::Setup(format!(
                "login answered {}: {}",
                reply.status, reply.body
            )));
        }
        reply
            .header_values("set-cookie")
            .filter_map(|cookie| cookie.split(';').next())
            .find(|pair| pair.contains('='))
            .map(str::to_string)
            .ok_or_else(|| BenchError::Setup("login set no cookie".into()))
    }
}

/// A running target.
#[derive(Debug)]
pub struct Target {
    /// Which one.
    pub kind: TargetKind,
    /// HTTP/1.1 address.
    pub h1: SocketAddr,
    /// HTTP/2 cleartext (prior knowledge) address.
    pub h2: SocketAddr,
    /// HTTPS address, in a TLS scenario (not for direct).
    pub tls: Option<SocketAddr>,
    /// The proxy's process (group); `None` for direct.
    process: Option<Process>,
    /// The CPU budget the proxy is held to (`--proxy-cpus`). Declared after `process`, so
    /// dropped after it (Rust drops fields in order): the cgroup is removed once the proxy is
    /// killed.
    budget: Option<CpuBudget>,
}

impl Target {
    /// The upstream itself.
    pub fn direct(upstreams: &Upstreams) -> Target {
        let addr = upstreams.addrs()[0];
        Target {
            kind: TargetKind::Direct,
            h1: addr,
            h2: addr,
            tls: None,
            process: None,
            budget: None,
        }
    }

    /// Starts `kind` in front of `upstreams`, with its config and logs in `dir` (and an HTTPS
    /// listener with `tls`), and waits until it forwards `GET /healthz` with a 200. With a
    /// `budget`, the proxy starts inside it (and keeps it; removed with the target): HAProxy
    /// then runs one thread, as nginx runs one worker and herd-gateway picks one serving thread
    /// for a budget of a CPU or less.
    pub fn start(
        kind: TargetKind,
        upstreams: &Upstreams,
        dir: &Path,
        tls: Option<&TlsFiles>,
        budget: Option<CpuBudget>,
    ) -> Result<Target, BenchError> {
        let mut target = match kind {
            TargetKind::Direct => return Ok(Target::direct(upstreams)),
            TargetKind::Herd
            | TargetKind::HerdOneThread
            | TargetKind::HerdFixedThreads
            | TargetKind::HerdTrace1
            | TargetKind::HerdTrace100 => {
                start_gateway(kind, upstreams, dir, tls, budget.as_ref())?
            }
            TargetKind::Haproxy | TargetKind::Nginx => {
                // A free port can be taken before the proxy binds it: try again with others.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match start_reference(kind, upstreams, dir, tls, budget.as_ref()) {
                        Ok(target) => break target,
                        Err(BenchError::Process(error))
                            if attempt < 3 && error.to_string().contains("in use") =>
                        {
                            continue;
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
        };
        target.budget = budget;
        Ok(target)
    }

    /// The CPU budget the proxy is held to, if any.
    pub fn budget(&self) -> Option<&CpuBudget> {
        self.budget.as_ref()
    }

    /// CPU and memory of the proxy's processes now; `None` for direct.
    pub fn usage(&self) -> Option<Usage> {
        self.process
            .as_ref()
            .map(|process| sample::group_usage(process.pid()))
    }

    /// Whether the proxy still runs (always true for direct).
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_none_or(|process| process.try_wait().is_none())
    }

    /// The end of the proxy's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|process| process.log_tail(10))
            .unwrap_or_default()
    }
}

/// herd-gateway (the variant `kind`) over the upstreams; with `tls`, also on an HTTPS
/// listener. The tracing variants export spans at their sample ratio to an OTLP sink of the
/// benchmark's own.
fn start_gateway(
    kind: TargetKind,
    upstreams: &Upstreams,
    dir: &Path,
    tls: Option<&TlsFiles>,
    budget: Option<&CpuBudget>,
) -> Result<Target, BenchError> {
    let program = binaries::locate(binaries::GATEWAY)?;
    let workers: Vec<String> = upstreams.addrs().iter().map(ToString::to_string).collect();
    let tracing = match kind {
        TargetKind::HerdTrace1 => Some("0.01"),
        TargetKind::HerdTrace100 => Some("1.0"),
        _ => None,
    };
    let name = match kind {
        TargetKind::Herd => "herd-gateway",
        other => other.name(),
    };
    let mut spec = Spec::new(name, program, dir);
    let mut roles = vec!["public", "admin"];
    if let Some(tls) = tls {
        spec = spec
            .env("HERD_GATEWAY_TLS__ENABLED", "true")
            .env("HERD_GATEWAY_TLS__LISTEN", "127.0.0.1:0")
            .env("HERD_GATEWAY_TLS__CERT", tls.cert.display().to_string())
            .env("HERD_GATEWAY_TLS__KEY", tls.key.display().to_string())
            .env(
                "HERD_GATEWAY_TLS__SESSION_RESUMPTION",
                tls.resumption.to_string(),
            )
            // wrk opens c connections at once; don't let the cap queue them.
            .env("HERD_GATEWAY_TLS__MAX_HANDSHAKES", "1024");
        roles.push("tls");
    }
    let mut spec = spec
        .env("HERD_GATEWAY_LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_ADMIN__LISTEN", "127.0.0.1:0")
        .env("HERD_GATEWAY_WORKERS", workers.join(","))
        .env("HERD_GATEWAY_REGISTRY__ENABLED", "false")
        .env("HERD_LOG", "warn")
        .arg("--log-format")
        .arg("json");
    if kind == TargetKind::HerdOneThread {
        spec = spec.env("HERD_GATEWAY_THREADS", "1");
    }
    if kind == TargetKind::HerdFixedThreads {
        spec = spec.env("HERD_GATEWAY_ADAPTIVE_THREADS", "false");
    }
    if let Some(ratio) = tracing {
        let sink =
            otlp_sink().map_err(|source| BenchError::io("start the OTLP sink in", dir, source))?;
        spec = spec
            .env("HERD_GATEWAY_TRACING__ENABLED", "true")
            .env("HERD_GATEWAY_TRACING__ENDPOINT", format!("http://{sink}"))
            .env("HERD_GATEWAY_TRACING__SAMPLE_RATIO", ratio);
    }
    if let Some(budget) = budget {
        spec = budget.start_inside(spec);
    }
    let mut process = Process::spawn_and_wait(&spec, &roles, START_TIMEOUT)?;
    let public = process.addr("public").expect("waited for public");
    let tls_addr = tls.and_then(|_| process.addr("tls"));
    let admin = process.addr("admin").expect("waited for admin");
    process.wait_until(START_TIMEOUT, |_| {
        http::status(admin, "/readyz", REQUEST_TIMEOUT) == Some(200)
            && http::status(public, "/healthz", REQUEST_TIMEOUT) == Some(200)
    })?;
    Ok(Target {
        kind,
        h1: public,
        h2: public,
        tls: tls_addr,
        process: Some(process),
        budget: None,
    })
}

/// HAProxy or nginx from its template.
fn start_reference(
    kind: TargetKind,
    upstreams: &Upstreams,
    dir: &Path,
    tls: Option<&TlsFiles>,
    budget: Option<&CpuBudget>,
) -> Result<Target, BenchError> {
    let port_error = |source| BenchError::io("find a free port for", dir, source);
    let h1 = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(port_error)?));
    let h2 = SocketAddr::from(([127, 0, 0, 1], free_port().map_err(port_error)?));
    let tls_addr = match tls {
        Some(_) => Some(SocketAddr::from((
            [127, 0, 0, 1],
            free_port().map_err(port_error)?,
        ))),
        None => None,
    };
    let tls_listener = tls.zip(tls_addr);
    let mut spec = match kind {
        TargetKind::Haproxy => {
            let program = deps::ensure(HAPROXY)?;
            let config = dir.join("haproxy.cfg");
            write_file(
                &config,
                &haproxy_config(&dir.join("haproxy.pid"), h1, h2, upstreams.addrs())
                    .replace("{TLS}", &tls_listener.map(haproxy_tls).unwrap_or_default())
                    // No session cache either when resumption is off (TLS 1.2 ids, 1.3 tickets).
                    .replace(
                        "tune.ssl.cachesize 20000",
                        if tls.is_some_and(|tls| !tls.resumption) {
                            "tune.ssl.cachesize 0"
                        } else {
                            "tune.ssl.cachesize 20000"
                        },
                    )
                    // One CPU or less: one thread (nginx runs one worker, herd one thread).
                    .replace(
                        HAPROXY_THREADS,
                        if budget.is_some() {
                            "nbthread 1"
                        } else {
                            HAPROXY_THREADS
                        },
                    ),
            )?;
            Spec::new("haproxy", program, dir)
                .arg("-db")
                .arg("-f")
                .arg(config.display().to_string())
        }
        TargetKind::Nginx => {
            let program = deps::ensure(NGINX)?;
            let prefix = dir.join("nginx");
            for sub in ["", "body", "proxy", "fcgi", "uwsgi", "scgi"] {
                let path = prefix.join(sub);
                std::fs::create_dir_all(&path)
                    .map_err(|source| BenchError::io("create", &path, source))?;
            }
            let config = dir.join("nginx.conf");
            let nginx = nginx_config(&prefix, h1, h2, upstreams.addrs())
                .replace("{TLS}", &tls_listener.map(nginx_tls).unwrap_or_default());
            write_file(&config, &nginx)?;
            Spec::new("nginx", program, dir)
                .arg("-c")
                .arg(config.display().to_string())
                .arg("-p")
                .arg(prefix.display().to_string())
                .arg("-e")
                .arg(prefix.join("startup-error.log").display().to_string())
        }
        TargetKind::Direct
        | TargetKind::Herd
        | TargetKind::HerdOneThread
        | TargetKind::HerdFixedThreads
        | TargetKind::HerdTrace1
        | TargetKind::HerdTrace100 => {
            return Err(BenchError::Setup(format!(
                "{} is not started from a template",
                kind.name()
            )));
        }
    };
    if let Some(budget) = budget {
        spec = budget.start_inside(spec);
    }
    let mut process = Process::spawn(&spec)?;
    process.wait_until(START_TIMEOUT, |_| {
        http::status(h1, "/healthz", REQUEST_TIMEOUT) == Some(200)
    })?;
    Ok(Target {
        kind,
        h1,
        h2,
        tls: tls_addr,
        process: Some(process),
        budget: None,
    })
}

/// The certificate key type of a TLS scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA over P-256.
    EcdsaP256,
    /// RSA, 2048 bits.
    Rsa2048,
}

/// One self-signed certificate and its key, served by every proxy of a TLS scenario.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate.
    pub cert: std::path::PathBuf,
    /// PEM private key (PKCS#8).
    pub key: std::path::PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub combined: std::path::PathBuf,
    /// Whether servers may resume sessions (off in the handshake scenarios).
    pub resumption: bool,
}

impl TlsFiles {
    /// Makes a certificate for `bench.test` with `openssl req` in `dir`.
    pub fn make(key: KeyKind, resumption: bool, dir: &Path) -> Result<Self, BenchError> {
        let cert = dir.join("tls-cert.pem");
        let key_file = dir.join("tls-key.pem");
        let new_key: &[&str] = match key {
            KeyKind::EcdsaP256 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            KeyKind::Rsa2048 => &["-newkey", "rsa:2048"],
        };
        let output = std::process::Command::new("openssl")
            .arg("req")
            .arg("-x509")
            .args(new_key)
            .args(["-nodes", "-days", "2", "-subj", "/CN=bench.test"])
            .args(["-addext", "subjectAltName=DNS:bench.test"])
            .arg("-keyout")
            .arg(&key_file)
            .arg("-out")
            .arg(&cert)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| BenchError::io("run openssl req in", dir, source))?;
        if !output.status.success() {
            return Err(BenchError::Setup(format!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let combined = dir.join("tls-combined.pem");
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| BenchError::io("read", path, source))
        };
        write_file(&combined, &(read(&cert)? + &read(&key_file)?))?;
        Ok(TlsFiles {
            cert,
            key: key_file,
            combined,
            resumption,
        })
    }
}

/// HAProxy's HTTPS listener: TLS 1.2+ with OpenSSL's defaults, ALPN as herd's, resumption as
/// asked.
fn haproxy_tls((tls, addr): (&TlsFiles, SocketAddr)) -> String {
    let no_resumption = if tls.resumption {
        ""
    } else {
        " no-tls-tickets"
    };
    format!(
        "    bind {addr} ssl crt {} alpn h2,http/1.1 ssl-min-ver TLSv1.2{no_resumption} backlog 4096",
        tls.combined.display()
    )
}

/// nginx's HTTPS server: TLS 1.2+ with OpenSSL's defaults, resumption as asked.
fn nginx_tls((tls, addr): (&TlsFiles, SocketAddr)) -> String {
    let resumption = if tls.resumption {
        "ssl_session_cache shared:SSL:10m;"
    } else {
        "ssl_session_cache off; ssl_session_tickets off;"
    };
    format!(
        "    server {{
        listen {addr} ssl http2 backlog=4096;
        ssl_certificate {};
        ssl_certificate_key {};
        ssl_protocols TLSv1.2 TLSv1.3;
        {resumption}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}",
        tls.cert.display(),
        tls.key.display()
    )
}

/// HAProxy's threads in `infra/bench/haproxy.cfg.in` (one under a CPU budget).
const HAPROXY_THREADS: &str = "nbthread 2";

/// HAProxy's configuration from `infra/bench/haproxy.cfg.in`.
fn haproxy_config(pid: &Path, h1: SocketAddr, h2: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            format!(
                "    server up{} {addr} check inter 500ms fall 2 rise 2\n",
                i + 1
            )
        })
        .collect();
    include_str!("../../bench/haproxy.cfg.in")
        .replace("{PID}", &pid.display().to_string())
        .replace("{PORT}", &h1.port().to_string())
        .replace("{H2PORT}", &h2.port().to_string())
        .replace("{SERVERS}", servers.trim_end())
}

/// nginx's configuration from `infra/bench/nginx.conf.in`, with its files under `prefix`.
fn nginx_config(prefix: &Path, h1: SocketAddr, h2: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let servers: String = upstreams
        .iter()
        .map(|addr| format!("        server {addr} max_fails=1 fail_timeout=10s;\n"))
        .collect();
    include_str!("../../bench/nginx.conf.in")
        .replace("{DIR}", &prefix.display().to_string())
        .replace("{PORT}", &h1.port().to_string())
        .replace("{H2PORT}", &h2.port().to_string())
        .replace("{SERVERS}", servers.trim_end())
}

/// Polls `ready` every 50 ms until it holds; an error naming `what` after `timeout`.
fn wait_for(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), BenchError> {
    let started = std::time::Instant::now();
    while !ready() {
        if started.elapsed() > timeout {
            return Err(BenchError::Setup(format!(
                "{what} not ready after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// An OTLP/HTTP sink on a free loopback port: reads each export request and answers 200 without
/// decoding it, so the traced gateway pays for making and sending its spans, as with a real
/// collector, and the sink costs next to nothing. Its threads end with the benchmark process.
fn otlp_sink() -> std::io::Result<SocketAddr> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("otlp-sink".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = std::thread::Builder::new().spawn(move || {
                    let Ok(mut writer) = stream.try_clone() else {
                        return;
                    };
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    // One export request per loop; the connection is kept alive.
                    loop {
                        let mut length = 0usize;
                        loop {
                            line.clear();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            let header = line.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        if std::io::copy(
                            &mut (&mut reader).take(length as u64),
                            &mut std::io::sink(),
                        )
                        .is_err()
                            || writer
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        })?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Every placeholder is filled, and nowhere else (a placeholder in a comment would put
    /// server lines into it).
    fn assert_filled(config: &str) {
        for placeholder in ["{PID}", "{PORT}", "{H2PORT}", "{SERVERS}", "{DIR}"] {
            assert!(
                !config.contains(placeholder),
                "{placeholder} left in:\n{config}"
            );
        }
        for line in config
            .lines()
            .filter(|line| line.trim_start().starts_with('#'))
        {
            assert!(!line.contains("127.0.0.1"), "filled into a comment: {line}");
        }
    }

    #[test]
    fn tls_listeners_use_the_certificate_and_resumption_setting() {
        let files = |resumption| TlsFiles {
            cert: "/tmp/x/c.pem".into(),
            key: "/tmp/x/k.pem".into(),
            combined: "/tmp/x/ck.pem".into(),
            resumption,
        };
        let off = files(false);
        let haproxy = haproxy_config(Path::new("/p"), addr(1), addr(2), &[addr(3)])
            .replace("{TLS}", &haproxy_tls((&off, addr(8443))));
        assert!(
            haproxy.contains(
                "bind 127.0.0.1:8443 ssl crt /tmp/x/ck.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2 no-tls-tickets"
            ),
            "{haproxy}"
        );
        let nginx = nginx_config(Path::new("/n"), addr(1), addr(2), &[addr(3)])
            .replace("{TLS}", &nginx_tls((&off, addr(8443))));
        for line in [
            "listen 127.0.0.1:8443 ssl http2",
            "ssl_certificate /tmp/x/c.pem;",
            "ssl_certificate_key /tmp/x/k.pem;",
            "ssl_session_cache off; ssl_session_tickets off;",
            "proxy_set_header Connection \"\";",
        ] {
            assert!(nginx.contains(line), "{line} missing:\n{nginx}");
        }
        assert!(nginx_tls((&files(true), addr(8443))).contains("ssl_session_cache shared"));
        assert!(!nginx.contains("{TLS}") && !haproxy.contains("{TLS}"));
    }

    #[test]
    fn haproxy_config_lists_both_upstreams_and_listeners() {
        let config = haproxy_config(
            Path::new("/tmp/x/haproxy.pid"),
            addr(8001),
            addr(8002),
            &[addr(9001), addr(9002)],
        );
        assert_filled(&config);
        assert!(
            config.contains("bind 127.0.0.1:8001 backlog 4096"),
            "{config}"
        );
        assert!(
            config.contains("bind 127.0.0.1:8002 proto h2 backlog 4096"),
            "{config}"
        );
        assert!(config.contains("    server up1 127.0.0.1:9001 check inter 500ms fall 2 rise 2\n    server up2 127.0.0.1:9002 check"), "{config}");
        assert!(config.contains("http-reuse always"));
        // What a CPU budget replaces with one thread.
        assert_eq!(config.matches(HAPROXY_THREADS).count(), 1, "{config}");
    }

    #[test]
    fn nginx_config_lists_both_upstreams_and_listeners() {
        let config = nginx_config(
            Path::new("/tmp/x/nginx"),
            addr(8001),
            addr(8002),
            &[addr(9001), addr(9002)],
        );
        assert_filled(&config);
        assert!(
            config.contains("listen 127.0.0.1:8001 backlog=4096;"),
            "{config}"
        );
        assert!(
            config.contains("listen 127.0.0.1:8002 http2 backlog=4096;"),
            "{config}"
        );
        assert!(
            config.contains("server 127.0.0.1:9002 max_fails=1 fail_timeout=10s;"),
            "{config}"
        );
        assert!(config.contains("pid /tmp/x/nginx/nginx.pid;"), "{config}");
        assert!(config.contains("keepalive 512;"));
    }
}
