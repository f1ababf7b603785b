//! TLS termination end to end: real clients (reqwest with rustls over h1 and h2, curl,
//! openssl s_client), SNI, reload, bad files, hostile handshakes. Certificates are made at test
//! time with rcgen under a throw-away CA.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;
use support::{Gateway, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use herd_gateway::GatewayConfig;
use herd_gateway::tls::SniCertificate;

/// A throw-away CA that signs leaf certificates.
struct Pki {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: tempfile::TempDir,
}

/// A leaf certificate written to files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "herd test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Pki {
            cert,
            key,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.cert.pem()).unwrap();
        path
    }

    /// A leaf for `names` with CN `cn`, written as `<file>.pem` / `<file>.key`.
    fn leaf(
        &self,
        file: &str,
        cn: &str,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        tweak(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        // Chain: leaf then CA, as a real deployment would serve it.
        replace(&leaf.cert, &(cert.pem() + &self.cert.pem()));
        replace(&leaf.key, &key.serialize_pem());
        leaf
    }
}

/// Writes `path` whole at once (temp file + rename), as renewal tools do.
fn replace(path: &Path, contents: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, contents).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// `[tls]` on 127.0.0.1:0 with `default` as the default certificate.
fn enable_tls(config: &mut GatewayConfig, default: &Leaf) {
    config.tls.enabled = true;
    config.tls.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.cert = default.cert.clone();
    config.tls.key = default.key.clone();
}

fn sni(names: &[&str], leaf: &Leaf) -> SniCertificate {
    SniCertificate {
        names: names.iter().map(|n| n.to_string()).collect(),
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
    }
}

/// A reqwest client trusting the test CA, resolving `names` to `addr`; `http1`: offer only
/// HTTP/1.1 (else ALPN offers h2 first).
fn client(pki: &Pki, names: &[&str], addr: SocketAddr, http1: bool) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = if http1 {
        vec![b"http/1.1".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .tls_info(true)
        .timeout(Duration::from_secs(5));
    if http1 {
        builder = builder.http1_only();
    }
    for name in names {
        builder = builder.resolve(name, addr);
    }
    builder.build().unwrap()
}

/// The leaf certificate the server presented for this response.
fn served(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("a TLS response carries its peer certificate")
        .to_vec()
}

async fn metrics(gw: &Gateway) -> String {
    reqwest::get(gw.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn sni_picks_the_certificate_over_h1_and_h2_and_workers_learn_https() {
    let pki = Pki::new();
    let default = pki.leaf("default", "default", &["default.test"], |p| {
        p.not_after = rcgen::date_time_ymd(2040, 1, 2);
    });
    let a = pki.leaf("a", "a.test", &["a.test"], |_| {});
    let wild = pki.leaf("wild", "wild", &["*.b.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &default);
        config.tls.sni = vec![sni(&["a.test"], &a), sni(&["*.b.test"], &wild)];
        config.tls.hsts = "max-age=600".into();
    })
    .await;
    let addr = gw.tls.unwrap();
    let port = addr.port();
    let names = ["a.test", "x.b.test", "default.test", "other.test"];
    for http1 in [true, false] {
        let c = client(&pki, &names, addr, http1);
        for (host, expected) in [
            ("a.test", &a),
            ("x.b.test", &wild),
            ("default.test", &default),
        ] {
            let response = c
                .get(format!("https://{host}:{port}/who?x=1"))
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!("{host} over {}: {e:?}", if http1 { "h1" } else { "h2" })
                });
            assert_eq!(response.status(), 200);
            assert_eq!(served(&response), expected.der, "certificate for {host}");
            let version = response.version();
            assert_eq!(
                version,
                if http1 {
                    reqwest::Version::HTTP_11
                } else {
                    reqwest::Version::HTTP_2
                }
            );
            assert_eq!(
                response.headers()["strict-transport-security"],
                "max-age=600"
            );
            let seen: serde_json::Value = response.json().await.unwrap();
            assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
            // HTTP/2's :authority reaches the HTTP/1.1 worker as its Host.
            assert_eq!(seen["headers"]["host"], format!("{host}:{port}"), "{seen}");
            assert_eq!(
                seen["headers"]["forwarded"], "for=127.0.0.1;proto=https",
                "{seen}"
            );
        }
    }
    // A name no entry lists is served the default certificate (and fails the name check).
    let c = client(&pki, &names, addr, true);
    let error = c
        .get(format!("https://other.test:{port}/"))
        .send()
        .await
        .unwrap_err();
    assert!(
        format!("{error:?}").contains("NotValidForName"),
        "{error:?}"
    );

    // Cleartext stays as it was: http, no HSTS, a client's Forwarded dropped.
    let plain = reqwest::Client::new()
        .get(gw.url("/x"))
        .header("forwarded", "for=1.2.3.4;proto=https")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get("strict-transport-security").is_none());
    let seen: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert!(seen["headers"].get("forwarded").is_none(), "{seen}");

    let text = metrics(&gw).await;
    assert!(
        text.contains(
            r#"herd_gateway_tls_certificate_expiry_timestamp_seconds{name="default"} 2209075200"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"herd_gateway_tls_certificate_expiry_timestamp_seconds{name="a.test"}"#),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn cleartext_redirects_to_https_when_asked() {
    let pki = Pki::new();
    let default = pki.leaf("default", "default", &["shop.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &default);
        config.tls.redirect_http = true;
    })
    .await;
    let port = gw.tls.unwrap().port();
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = plain
        .post(gw.url("/cart?item=2"))
        .header("host", "shop.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 308);
    assert_eq!(
        response.headers()["location"],
        format!("https://shop.test:{port}/cart?item=2").as_str()
    );
    assert_eq!(
        w1.hits.load(Ordering::Relaxed),
        0,
        "nothing proxied in cleartext"
    );
    gw.shutdown().await;
}

/// Runs a command with a bound on its time; returns (success, stdout + stderr).
fn run(command: &mut Command) -> (bool, String) {
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_see_the_right_certificate_and_versions() {
    let pki = Pki::new();
    let default = pki.leaf("default", "default-cn", &["default.test"], |_| {});
    let a = pki.leaf("a", "a-cn", &["a.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &default);
        config.tls.sni = vec![sni(&["a.test"], &a)];
    })
    .await;
    let addr = gw.tls.unwrap();
    let port = addr.port();
    let ca = pki.ca_file();
    let gw_addr = format!("127.0.0.1:{port}");
    let checks = tokio::task::spawn_blocking(move || {
        for http in ["--http1.1", "--http2"] {
            let (ok, text) = run(Command::new("curl").args([
                "-sS",
                "--max-time",
                "5",
                http,
                "--cacert",
                ca.to_str().unwrap(),
                "--resolve",
                &format!("a.test:{port}:127.0.0.1"),
                "-w",
                "\nversion=%{http_version}\n",
                &format!("https://a.test:{port}/curl"),
            ]));
            assert!(ok, "curl {http}: {text}");
            assert!(text.contains(r#""x-forwarded-proto":"https""#), "{text}");
            let version = if http == "--http2" {
                "version=2"
            } else {
                "version=1.1"
            };
            assert!(text.contains(version), "curl {http}: {text}");
        }
        let s_client = |args: &[&str]| {
            run(Command::new("timeout")
                .args(["5", "openssl", "s_client", "-connect", &gw_addr])
                .args(args))
        };
        for (version, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
            let (_, text) = s_client(&[version, "-servername", "a.test", "-brief"]);
            assert!(
                text.contains(&format!("Protocol version: {name}")),
                "{version}: {text}"
            );
            assert!(
                text.contains("CN=a-cn") || text.contains("CN = a-cn"),
                "{text}"
            );
        }
        let (_, text) = s_client(&["-servername", "nobody.test", "-brief"]);
        assert!(
            text.contains("default-cn"),
            "unknown name gets the default: {text}"
        );
        // TLS 1.1 (and older) is refused; OpenSSL may also refuse to offer it at its own
        // security level: either way no session is established.
        let (ok, text) = s_client(&["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-brief"]);
        assert!(!ok && !text.contains("Protocol version: TLSv1.1"), "{text}");
    });
    tokio::time::timeout(Duration::from_secs(60), checks)
        .await
        .expect("clients finish")
        .unwrap();
    gw.shutdown().await;
}

#[test]
fn bad_files_are_refused_at_start_with_exit_2_naming_the_key() {
    let pki = Pki::new();
    let good = pki.leaf("good", "good", &["good.test"], |_| {});
    let other = pki.leaf("other", "other", &["other.test"], |_| {});
    let expired = pki.leaf("expired", "expired", &["old.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = pki.dir.path().join("missing.pem");
    let cases: [(&Path, &Path, &str, &str); 5] = [
        (&missing, &good.key, "tls.cert", "cannot read"),
        (&garbage, &good.key, "tls.cert", "not a PEM certificate"),
        (&good.cert, &missing, "tls.key", "cannot read"),
        (&good.cert, &other.key, "tls.key", "does not match"),
        (&expired.cert, &expired.key, "tls.cert", "expired"),
    ];
    let binary = env!("CARGO_BIN_EXE_herd-gateway");
    for (index, (cert, key, expected_key, problem)) in cases.iter().enumerate() {
        let config = pki.dir.path().join(format!("gateway-{index}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nenabled = true\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
        .unwrap();
        let output = Command::new("timeout")
            .args(["10", binary, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "case {index}: {stderr}");
        let line = stderr.trim();
        assert_eq!(line.lines().count(), 1, "one line: {line}");
        assert!(
            line.starts_with(&format!("config error: {expected_key}: ")) && line.contains(problem),
            "case {index}: {line}"
        );
    }
    // An SNI entry's files are named by their index.
    let mut config = GatewayConfig::default();
    enable_tls(&mut config, &good);
    config.tls.sni = vec![sni(&["other.test"], &other), sni(&["old.test"], &expired)];
    let error = herd_shared::config::Validate::validate(&config).unwrap_err();
    assert_eq!(error.key, "tls.sni[1].cert", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_loses_nothing_and_a_broken_file_keeps_the_old_certificate() {
    let pki = Pki::new();
    let first = pki.leaf("site", "first", &["site.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &first);
        config.tls.reload_interval = Duration::from_millis(100);
    })
    .await;
    let addr = gw.tls.unwrap();
    let url = format!("https://site.test:{}/load", addr.port());

    // Bounded load: 4 keep-alive clients (2 over h1, 2 over h2) until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for index in 0..4 {
        let c = client(&pki, &["site.test"], addr, index % 2 == 0);
        let (stop, ok, url) = (stop.clone(), ok.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match c.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(response) => failures.push(format!("status {}", response.status())),
                    Err(error) => failures.push(format!("{error:?}")),
                }
            }
            failures
        }));
    }
    let wait_for = |target: u64| {
        let ok = ok.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while ok.load(Ordering::Relaxed) < target && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(50).await;

    // Renewal: same files, new key and certificate (the key lands first: one poll may see a
    // mismatched pair, which is refused, and the next one takes the complete pair).
    let second = pki.leaf("site", "second", &["site.test"], |_| {});
    let fresh = || client(&pki, &["site.test"], addr, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = fresh().get(&url).send().await.unwrap();
        if served(&response) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate is never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = ok.load(Ordering::Relaxed);
    wait_for(before + 50).await;

    // A broken file is refused; the current certificate stays.
    replace(
        &second.cert,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics(&gw)
        .await
        .contains(r#"herd_gateway_tls_reloads_total{result="refused"}"#)
        || metrics(&gw)
            .await
            .contains(r#"herd_gateway_tls_reloads_total{result="refused"} 0"#)
    {
        assert!(Instant::now() < deadline, "{}", metrics(&gw).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = fresh().get(&url).send().await.unwrap();
    assert_eq!(served(&response), second.der, "the old certificate is kept");

    stop.store(true, Ordering::Relaxed);
    let mut total_failures = Vec::new();
    for task in load {
        total_failures.extend(task.await.unwrap());
    }
    assert!(
        total_failures.is_empty(),
        "requests lost: {total_failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) >= 100);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates() {
    let pki = Pki::new();
    let first = pki.leaf("hup", "first", &["hup.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &first);
        config.tls.reload_interval = Duration::ZERO;
    })
    .await;
    let addr = gw.tls.unwrap();
    let url = format!("https://hup.test:{}/", addr.port());
    let c = || client(&pki, &["hup.test"], addr, true);
    assert_eq!(served(&c().get(&url).send().await.unwrap()), first.der);
    let second = pki.leaf("hup", "second", &["hup.test"], |_| {});
    // No polling: without the signal the old certificate stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served(&c().get(&url).send().await.unwrap()), first.der);
    nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while served(&c().get(&url).send().await.unwrap()) != second.der {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

/// Reads until the peer closes (or resets) the connection; `None` if it is still open after
/// `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_cut_and_do_not_starve_established_connections() {
    let pki = Pki::new();
    let default = pki.leaf("h", "h", &["h.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &default);
        config.tls.handshake_timeout = Duration::from_millis(500);
        config.tls.max_handshakes = 2;
    })
    .await;
    let addr = gw.tls.unwrap();
    let url = format!("https://h.test:{}/", addr.port());

    // An established keep-alive connection.
    let established = client(&pki, &["h.test"], addr, true);
    assert_eq!(established.get(&url).send().await.unwrap().status(), 200);

    // Garbage instead of a ClientHello: an alert at most, then closed, at once.
    let mut garbage = tokio::net::TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: h.test\r\n\r\n")
        .await
        .unwrap();
    // Closed by the TLS error, not by the handshake timeout: the metric below tells them apart
    // (no upper time bound here, the box may be busy).
    let cut = closed_within(&mut garbage, Duration::from_secs(5)).await;
    assert!(cut.is_some(), "garbage left open");

    // Silent clients take both handshake slots and are cut at the handshake timeout.
    let silent_opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Meanwhile a new handshake has no slot: it waits until the silent ones are cut (or its
    // own deadline), however fast it is itself.
    let waiting = client(&pki, &["h.test"], addr, true);
    let queued_url = url.clone();
    let queued = tokio::spawn(async move {
        let _ = waiting.get(queued_url).send().await;
        Instant::now()
    });
    // The established connection is served all the while.
    for _ in 0..10 {
        assert_eq!(established.get(&url).send().await.unwrap().status(), 200);
    }
    for mut stream in silent {
        let cut = closed_within(&mut stream, Duration::from_secs(5)).await;
        assert!(cut.is_some(), "slow handshake not cut");
    }
    // Timed from before the silent ones connected (the slots free 500 ms after their accept),
    // so a slow box can only make it longer; without a slot to wait for it took ~100 ms.
    let queued_until = queued.await.unwrap().duration_since(silent_opened);
    assert!(
        queued_until >= Duration::from_millis(450),
        "a handshake over tls.max_handshakes waits for a slot: done {queued_until:?} after the silent ones came"
    );
    let text = metrics(&gw).await;
    let timeouts: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"herd_gateway_tls_handshakes_total{result="timeout"} "#))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(timeouts >= 2, "{text}");
    assert!(
        text.contains(r#"herd_gateway_tls_handshakes_total{result="failed"} 1"#),
        "{text}"
    );
    // Still healthy afterwards.
    let fresh = client(&pki, &["h.test"], addr, true);
    assert_eq!(fresh.get(&url).send().await.unwrap().status(), 200);
    gw.shutdown().await;
}

/// A TLS connection over a connection limit is closed before its handshake (its client could
/// not read the cleartext refusal), without waiting for its ClientHello, and counted; once the
/// client's other connection closes, a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_over_the_per_client_cap_is_closed_before_its_handshake() {
    let pki = Pki::new();
    let default = pki.leaf("h", "h", &["h.test"], |_| {});
    let w1 = Upstream::start("w1").await;
    let gw = Gateway::start(&[&w1], |config| {
        enable_tls(config, &default);
        config.limits.max_connections_per_client = 1;
    })
    .await;
    let addr = gw.tls.unwrap();
    let url = format!("https://h.test:{}/", addr.port());
    // Its one keep-alive connection stays open in the client's pool.
    let holder = client(&pki, &["h.test"], addr, true);
    assert_eq!(holder.get(&url).send().await.unwrap().status(), 200);

    // A silent second connection: closed after the second looks (127 ms), not after the head
    // or handshake timeout, with nothing written to it.
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut received = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(5), over.read_to_end(&mut received)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "closed, nothing sent: {closed:?}"
    );
    assert!(received.is_empty(), "{received:?}");
    support::wait_until(Duration::from_secs(5), "the refusal counted", || async {
        metrics(&gw)
            .await
            .contains("herd_gateway_connections_refused_per_client_total 1")
    })
    .await;

    // The held connection still works; once it is closed, a new one is served.
    assert_eq!(holder.get(&url).send().await.unwrap().status(), 200);
    drop(holder);
    support::wait_until(
        Duration::from_secs(5),
        "a new TLS connection served",
        || async {
            let fresh = client(&pki, &["h.test"], addr, true);
            matches!(fresh.get(&url).send().await, Ok(response) if response.status() == 200)
        },
    )
    .await;
    gw.shutdown().await;
}
