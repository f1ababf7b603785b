//! `[gateways.tls]` of an inventory end to end, through the real `herd` binary on netns
//! machines (two gateway hosts, a worker + Redis host, a client host):
//! - `herd up --inventory` copies a certificate made here (ECDSA P-256, signed by a throw-away
//!   CA) to both gateway machines; an HTTPS request from the client host to the floating address
//!   is served with it, the client trusting only the test CA;
//! - a renewed certificate goes live with `herd tls push --inventory` (files copied again,
//!   SIGHUP), on both gateways; a broken one (key of another certificate) is refused by both,
//!   which keep serving the renewed one, and push exits 1;
//! - kill -9 of the active gateway: HTTPS through the floating address is served by the standby
//!   with the same (renewed) certificate;
//! - `herd down` leaves no process and no namespace;
//! - a missing key file is refused before anything starts (exit 2, one line).
//!
//! Needs root (network namespaces), like CI. Namespaces are `herdinv-hit{pid}-…`; everything
//! is removed also when the test fails ([`Cleanup`]).

use herd_tests::inventory::{Cleanup, alive, herd, kill_group, namespaces_with, recorded_pids};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;

/// The segment of this test's namespaces (other inventory tests use 10.211-10.213).
const NET: &str = "10.231.0";

/// A throw-away CA and the leaf certificates it signs, as PEM files in `dir`.
struct Pki {
    ca: rcgen::Certificate,
    key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "herd inventory test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki { ca, key }
    }

    /// A new ECDSA P-256 leaf for `names` (CN `cn`), written to `cert` (chain: leaf, CA) and
    /// `key` by rename, as renewal tools do; returns its DER.
    fn leaf(&self, cn: &str, names: &[&str], cert: &Path, key: &Path) -> Vec<u8> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = params.signed_by(&leaf_key, &self.ca, &self.key).unwrap();
        for (path, text) in [
            (cert, leaf.pem() + &self.ca.pem()),
            (key, leaf_key.serialize_pem()),
        ] {
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, text).unwrap();
            std::fs::rename(&temp, path).unwrap();
        }
        leaf.der().to_vec()
    }
}

/// One HTTPS answer: which gateway answered and the certificate it served.
#[derive(Debug, Clone, PartialEq)]
struct Served {
    gateway: String,
    certificate: Vec<u8>,
}

/// Up to `count` HTTPS GETs of `url` from inside `netns`, trusting only `ca` (DER), until
/// `stop` says a result is enough; every result (an error text for a failed request).
fn https_from(
    netns: &str,
    ca: Vec<u8>,
    url: String,
    count: usize,
    stop: fn(&Served) -> bool,
) -> Vec<Result<Served, String>> {
    herd::netns::run_in_netns(netns, move || async move {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca)).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut seen = Vec::new();
        for _ in 0..count {
            // A new client (connection, full handshake) per request: each one sees whichever
            // gateway holds the address now, and the certificate it serves now.
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .tls_info(true)
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let answer = match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(Served {
                    gateway: r
                        .headers()
                        .get("x-herd-gateway")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string(),
                    certificate: r
                        .extensions()
                        .get::<reqwest::tls::TlsInfo>()
                        .and_then(|info| info.peer_certificate())
                        .unwrap_or_default()
                        .to_vec(),
                }),
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(format!("{e:?}")),
            };
            let done = answer.as_ref().is_ok_and(stop);
            if answer.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen.push(answer);
            if done {
                break;
            }
        }
        seen
    })
    .expect("enter the client namespace")
}

/// The inventory: gateways gw1 (preferred) and gw2 with `[gateways.tls]` on 8443, one worker and
/// Redis on m1, and a client host.
fn inventory(name: &str) -> String {
    format!(
        r#"
name = "{name}"
[[machines]]
name = "gw1"
address = "{NET}.11"
transport = "netns"
[[machines]]
name = "gw2"
address = "{NET}.12"
transport = "netns"
[[machines]]
name = "m1"
address = "{NET}.21"
transport = "netns"
[[machines]]
name = "client"
address = "{NET}.100"
transport = "netns"
max_workers = 0
[redis]
machine = "m1"
[gateways]
machines = ["gw1", "gw2"]
preferred = "gw1"
floating_address = "{NET}.10"
[gateways.tls]
port = 8443
cert = "certs/site.pem"
key = "certs/site.key"
hsts = "max-age=600"
[[images]]
name = "demo"
per_machine = 1
machines = ["m1"]
"#
    )
}

#[test]
fn both_gateways_serve_the_inventorys_certificate_renewals_are_pushed_and_the_standby_takes_over() {
    assert!(
        herd::deps::is_root(),
        "inventory tests need root for network namespaces (run the suite as root, as CI does)"
    );
    let began = Instant::now();
    let dir = herd_tests::temp_dir();
    let name = format!("hit{}", std::process::id() % 100_000);
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let (cert, key) = (certs.join("site.pem"), certs.join("site.key"));
    let pki = Pki::new();
    let first = pki.leaf("site v1", &[&format!("{NET}.10"), "site.test"], &cert, &key);
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, inventory(&name)).unwrap();
    let state = dir.path().join("state");
    let (file, state) = (file.to_str().unwrap(), state.to_str().unwrap());
    let prefix = format!("herdinv-{name}-");
    let root = Path::new(state).join(format!("inventory-{name}"));
    let mut cleanup = Cleanup {
        netns: None,
        down: ["down", "--inventory", file, "--state-dir", state]
            .map(String::from)
            .to_vec(),
        roots: vec![root.clone()],
        pids: BTreeSet::new(),
        prefix: prefix.clone(),
    };

    let up = herd(&["up", "--inventory", file, "--state-dir", state]);
    cleanup.pids.extend(recorded_pids(&root));
    assert!(up.status.success(), "herd up failed");
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(
        stderr.contains(&format!(
            "both gateways serve HTTPS on port 8443 with the same certificates: https://{NET}.10:8443"
        )),
        "{stderr}"
    );
    // Both machines hold the files, the key readable by its owner only.
    for gw in ["gw1", "gw2"] {
        use std::os::unix::fs::PermissionsExt;
        let copy = root.join(gw).join("tls");
        assert_eq!(
            std::fs::read(copy.join("default.pem")).unwrap(),
            std::fs::read(&cert).unwrap()
        );
        let mode = std::fs::metadata(copy.join("default.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{gw}'s key");
    }

    let client = format!("{prefix}client");
    let ca = pki.ca.der().to_vec();
    let url = format!("https://{NET}.10:8443/work?ms=1");
    let answers = https_from(&client, ca.clone(), url.clone(), 5, |_| false);
    for answer in &answers {
        let served = answer.as_ref().expect("HTTPS through the floating address");
        assert_eq!(served.gateway, "gw1", "the preferred gateway is active");
        assert_eq!(served.certificate, first, "the inventory's certificate");
    }
    // Cleartext stays open beside it.
    let plain = herd::netns::run_in_netns(&client, || async {
        herd_tests::client()
            .get(format!("http://{NET}.10:8080/work?ms=1"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string())
    })
    .unwrap();
    assert_eq!(plain, Ok(200));

    // Renewal: new files here, pushed to both gateways, live without a restart.
    let renewed = pki.leaf("site v2", &[&format!("{NET}.10"), "site.test"], &cert, &key);
    assert_ne!(renewed, first);
    let push = herd(&["tls", "push", "--inventory", file, "--state-dir", state]);
    assert!(push.status.success(), "herd tls push failed");
    let said = String::from_utf8_lossy(&push.stdout);
    for gw in ["gw1", "gw2"] {
        assert!(
            said.contains(&format!("{gw}: files copied, certificates reloaded")),
            "{said}"
        );
    }
    let answers = https_from(&client, ca.clone(), url.clone(), 2, |_| false);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|s| s.certificate == renewed)),
        "the renewed certificate is served: {answers:?}"
    );

    // A broken renewal (a key that is not the certificate's) is refused by both gateways, which
    // keep serving the renewed certificate; push says so and exits 1.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    pki.leaf(
        "other",
        &["other.test"],
        &other.join("c.pem"),
        &other.join("k.pem"),
    );
    std::fs::copy(other.join("k.pem"), &key).unwrap();
    let push = herd(&["tls", "push", "--inventory", file, "--state-dir", state]);
    assert_eq!(push.status.code(), Some(1), "a refused push fails");
    let said = String::from_utf8_lossy(&push.stdout);
    for gw in ["gw1", "gw2"] {
        assert!(
            said.contains(&format!(
                "{gw}: files copied, but the gateway REFUSED them and keeps the old certificates: tls.key: "
            )) && said.contains(&format!("{gw}/tls/default.key does not match the certificate")),
            "{said}"
        );
    }
    let answers = https_from(&client, ca.clone(), url.clone(), 2, |_| false);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|s| s.certificate == renewed)),
        "still the renewed certificate: {answers:?}"
    );

    // kill -9 the active gateway (its supervisor first, so that it is not restarted).
    let run = root.join("gw1/run");
    let pid = |file: &str| -> u32 {
        std::fs::read_to_string(run.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (supervisor, gateway) = (pid("gateway-gw1.pid"), pid("gateway-gw1.child"));
    kill_group(supervisor);
    kill_group(gateway);
    let killed = Instant::now();
    let answers = https_from(&client, ca.clone(), url.clone(), 150, |s| {
        s.gateway == "gw2"
    });
    let taken_over = killed.elapsed();
    let last = answers.last().expect("at least one request");
    let served = last.as_ref().expect("HTTPS served after the kill");
    assert_eq!(served.gateway, "gw2", "the standby took over: {answers:?}");
    assert_eq!(
        served.certificate, renewed,
        "the standby serves the same certificate"
    );
    println!(
        "HTTPS served by the standby {:.2} s after kill -9 of the active ({} requests failed meanwhile)",
        taken_over.as_secs_f64(),
        answers.iter().filter(|a| a.is_err()).count()
    );
    let answers = https_from(&client, ca, url, 3, |_| false);
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|s| s.gateway == "gw2")),
        "{answers:?}"
    );

    let pids = recorded_pids(&root);
    cleanup.pids.extend(&pids);
    let down = herd(&["down", "--inventory", file, "--state-dir", state]);
    assert!(down.status.success(), "herd down failed");
    let left: Vec<_> = cleanup.pids.iter().filter(|p| alive(**p)).collect();
    assert!(left.is_empty(), "still running after down: {left:?}");
    assert_eq!(namespaces_with(&prefix), Vec::<String>::new());
    println!("whole test: {:.1} s", began.elapsed().as_secs_f64());
}

#[test]
fn a_missing_key_file_is_refused_with_exit_2_and_one_line_before_anything_starts() {
    let dir = herd_tests::temp_dir();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let pki = Pki::new();
    pki.leaf(
        "site",
        &["site.test"],
        &certs.join("site.pem"),
        &certs.join("other.key"),
    );
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, inventory("hitbad")).unwrap();
    let state = dir.path().join("state");
    let (file, state_arg) = (file.to_str().unwrap(), state.to_str().unwrap());
    for args in [
        &["up", "--inventory", file, "--state-dir", state_arg][..],
        &["tls", "push", "--inventory", file, "--state-dir", state_arg],
    ] {
        let out = herd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("inventory.toml: gateways.tls: key ")
                && stderr.contains("site.key: No such file or directory"),
            "{stderr}"
        );
    }
    assert!(!state.exists(), "nothing was started or written");
    assert!(namespaces_with("herdinv-hitbad-").is_empty());
}
