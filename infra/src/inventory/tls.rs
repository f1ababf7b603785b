//! `[gateways.tls]`: HTTPS on both gateways of the pair, with the same certificates.
//!
//! The inventory names the certificate chain and key files on this box (and optional SNI
//! certificates); `herd up --inventory` copies them to both gateway machines and writes the
//! gateway's `[tls]` section pointing at the copies ([`crate::deploy::tls`]), so whichever
//! gateway holds the floating address serves the same certificate. A renewal is the same copy
//! again plus the gateway's own hot reload (`herd tls push --inventory FILE`).
//!
//! Here: the types, the paths made absolute, and the checks that need no machine — every file
//! exists, is readable and holds the PEM block it should — so a bad entry is refused (exit 2,
//! one line) before anything starts. Whether a key matches its certificate, or a certificate
//! has expired, the gateway itself checks at start (and refuses to start, exit 2, which `herd
//! up` reports with the gateway's log).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Inventory, Unit};

/// `[gateways.tls]`: what both gateways' `[tls]` get.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayTls {
    /// The HTTPS port, on the same address as the cleartext listener (every address with a
    /// floating address, else the machine's own).
    #[serde(default = "default_tls_port")]
    pub port: u16,
    /// PEM certificate chain (leaf first) on this box, relative to the inventory file.
    pub cert: PathBuf,
    /// PEM private key on this box (copied with mode 0600).
    pub key: PathBuf,
    /// One certificate per group of host names, chosen by SNI.
    #[serde(default)]
    pub sni: Vec<TlsSni>,
    /// The cleartext port answers with a 308 redirect to https instead of proxying.
    #[serde(default)]
    pub redirect_http: bool,
    /// `Strict-Transport-Security` value for responses over TLS (empty: none).
    #[serde(default)]
    pub hsts: String,
}

fn default_tls_port() -> u16 {
    8443
}

/// `[[gateways.tls.sni]]`: a certificate for some host names.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSni {
    /// Host names (exact, or `*.example.com`).
    pub names: Vec<String>,
    /// PEM certificate chain on this box.
    pub cert: PathBuf,
    /// PEM private key on this box.
    pub key: PathBuf,
}

/// One file to copy to both gateway machines: where it is here, its name in the machine's
/// `tls/` directory, and whether it is a private key (mode 0600).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFile {
    /// The file on this box.
    pub local: PathBuf,
    /// Its name in `{dir}/tls/` on a gateway machine.
    pub name: String,
    /// A private key: copied with mode 0600.
    pub private: bool,
}

impl GatewayTls {
    /// Every file to copy, with its name on the machines: `default.pem` / `default.key`, then
    /// `sni-{n}.pem` / `sni-{n}.key` in the order of `sni`.
    pub fn files(&self) -> Vec<TlsFile> {
        let pair = |prefix: String, cert: &Path, key: &Path| {
            [
                TlsFile {
                    local: cert.to_path_buf(),
                    name: format!("{prefix}.pem"),
                    private: false,
                },
                TlsFile {
                    local: key.to_path_buf(),
                    name: format!("{prefix}.key"),
                    private: true,
                },
            ]
        };
        let mut files = pair("default".into(), &self.cert, &self.key).to_vec();
        for (index, sni) in self.sni.iter().enumerate() {
            files.extend(pair(format!("sni-{index}"), &sni.cert, &sni.key));
        }
        files
    }

    /// The gateway's `[tls]` section for a gateway whose cleartext listener is `public` and
    /// whose copies of the files are in `tls_dir`.
    pub fn gateway_config(&self, public: SocketAddr, tls_dir: &str) -> String {
        #[derive(serde::Serialize)]
        struct Section<'a> {
            tls: Tls<'a>,
        }
        #[derive(serde::Serialize)]
        struct Tls<'a> {
            enabled: bool,
            listen: String,
            cert: String,
            key: String,
            redirect_http: bool,
            hsts: &'a str,
            sni: Vec<Sni<'a>>,
        }
        #[derive(serde::Serialize)]
        struct Sni<'a> {
            names: &'a [String],
            cert: String,
            key: String,
        }
        let section = Section {
            tls: Tls {
                enabled: true,
                listen: self.listen(public).to_string(),
                cert: format!("{tls_dir}/default.pem"),
                key: format!("{tls_dir}/default.key"),
                redirect_http: self.redirect_http,
                hsts: &self.hsts,
                sni: self
                    .sni
                    .iter()
                    .enumerate()
                    .map(|(index, sni)| Sni {
                        names: &sni.names,
                        cert: format!("{tls_dir}/sni-{index}.pem"),
                        key: format!("{tls_dir}/sni-{index}.key"),
                    })
                    .collect(),
            },
        };
        let body = toml::to_string(&section).expect("plain strings and booleans serialize");
        format!("# Written by `herd up --inventory` from [gateways.tls].\n{body}")
    }

    /// The HTTPS listener beside cleartext listener `public`.
    pub fn listen(&self, public: SocketAddr) -> SocketAddr {
        SocketAddr::new(public.ip(), self.port)
    }

    /// Makes every path absolute against `base` (the inventory file's directory).
    pub(super) fn absolute(&mut self, base: &Path) {
        let absolute = |file: &mut PathBuf| {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        };
        absolute(&mut self.cert);
        absolute(&mut self.key);
        for sni in &mut self.sni {
            absolute(&mut sni.cert);
            absolute(&mut sni.key);
        }
    }
}

/// The HTTPS listener of gateway `unit`, when the inventory has `[gateways.tls]`.
pub fn tls_listener(inventory: &Inventory, unit: &Unit) -> Option<SocketAddr> {
    (unit.kind == super::Kind::Gateway)
        .then_some(inventory.gateways.tls.as_ref())
        .flatten()
        .map(|tls| tls.listen(unit.listen))
}

/// Checks `[gateways.tls]`: ports, SNI names, the HSTS value, and every file readable and
/// holding its PEM block. `(entry, problem)` like the other checks.
pub(super) fn validate(inventory: &Inventory) -> Result<(), (String, String)> {
    let Some(tls) = &inventory.gateways.tls else {
        return Ok(());
    };
    let fail = |entry: &str, problem: String| Err((entry.to_string(), problem));
    let entry = "gateways.tls";
    let gateways = &inventory.gateways;
    for (key, port) in [
        ("port", gateways.port),
        ("admin_port", gateways.admin_port),
        ("peer_port", gateways.peer_port),
    ] {
        if tls.port == port {
            return fail(
                entry,
                format!("port {port} is the gateways' {key} too (HTTPS needs a port of its own)"),
            );
        }
    }
    // The environment would override the section the gateways get from [gateways.tls].
    if let Some(key) = gateways
        .env
        .keys()
        .find(|k| k.starts_with("HERD_GATEWAY_TLS__"))
    {
        return fail(
            "gateways.env",
            format!("{key} conflicts with [gateways.tls]: set it there"),
        );
    }
    if tls.port == 0 {
        return fail(entry, "port 0 is not allowed".into());
    }
    if tls.hsts.chars().any(char::is_control) {
        return fail(entry, "hsts may not contain control characters".into());
    }
    file(entry, "cert", &tls.cert, Pem::Certificate)?;
    file(entry, "key", &tls.key, Pem::PrivateKey)?;
    let mut seen = std::collections::BTreeSet::new();
    for (index, sni) in tls.sni.iter().enumerate() {
        let entry = format!("gateways.tls.sni[{index}]");
        if sni.names.is_empty() {
            return fail(
                &entry,
                "names is empty: list the host names it serves".into(),
            );
        }
        for name in &sni.names {
            if !is_host_pattern(name) {
                return fail(
                    &entry,
                    format!("`{name}` is not a host name or *.host name"),
                );
            }
            if !seen.insert(name.to_ascii_lowercase()) {
                return fail(&entry, format!("`{name}` is listed twice"));
            }
        }
        file(&entry, "cert", &sni.cert, Pem::Certificate)?;
        file(&entry, "key", &sni.key, Pem::PrivateKey)?;
    }
    Ok(())
}

/// What a file must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    Certificate,
    PrivateKey,
}

/// Longest certificate or key file read (a chain is a few kB; this is a file mixed up).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// The file at `path` opens, reads and holds the PEM block of `kind`.
fn file(entry: &str, key: &str, path: &Path, kind: Pem) -> Result<(), (String, String)> {
    let problem = |what: String| {
        Err((
            entry.to_string(),
            format!("{key} {}: {what}", path.display()),
        ))
    };
    if path.as_os_str().is_empty() {
        return Err((entry.to_string(), format!("{key} must name a PEM file")));
    }
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|file| {
        if file.metadata()?.is_dir() {
            return Err(std::io::Error::other("is a directory"));
        }
        file.take(MAX_PEM_BYTES).read_to_string(&mut text)
    });
    if let Err(error) = read {
        return problem(error.to_string());
    }
    let has = |label: &str| text.contains(&format!("-----BEGIN {label}-----"));
    let ok = match kind {
        Pem::Certificate => has("CERTIFICATE"),
        Pem::PrivateKey => has("PRIVATE KEY") || has("RSA PRIVATE KEY") || has("EC PRIVATE KEY"),
    };
    if !ok {
        return problem(match kind {
            Pem::Certificate => "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            Pem::PrivateKey => "holds no PEM private key (-----BEGIN … PRIVATE KEY-----)".into(),
        });
    }
    Ok(())
}

/// A DNS host name, optionally with one leading `*.` label (as the gateway takes them).
fn is_host_pattern(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::super::{load, plan};
    use super::*;

    const INVENTORY: &str = r#"
name = "lab"
[[machines]]
name = "gw1"
address = "10.77.0.11"
transport = "netns"
[[machines]]
name = "gw2"
address = "10.77.0.12"
transport = "netns"
[[machines]]
name = "m1"
address = "10.77.0.21"
transport = "netns"
[redis]
machine = "m1"
[gateways]
machines = ["gw1", "gw2"]
floating_address = "10.77.0.10"
[gateways.tls]
cert = "certs/site.pem"
key = "certs/site.key"
hsts = "max-age=600"
[[gateways.tls.sni]]
names = ["api.example.com", "*.api.example.com"]
cert = "/abs/api.pem"
key = "certs/api.key"
[[images]]
name = "demo"
per_machine = 1
machines = ["m1"]
"#;

    /// A directory with the inventory (`INVENTORY` with `from` replaced by `to`) and good
    /// PEM-looking files; returns the load result as one line.
    fn load_with(from: &str, to: &str) -> (tempfile::TempDir, Result<Inventory, String>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
        for (name, text) in [
            ("site.pem", cert),
            ("site.key", key),
            ("api.pem", cert),
            ("api.key", key),
        ] {
            std::fs::write(dir.path().join("certs").join(name), text).unwrap();
        }
        assert!(INVENTORY.contains(from), "{from}");
        let api = dir.path().join("certs/api.pem");
        let text = INVENTORY
            .replacen(from, to, 1)
            .replace("/abs/api.pem", api.to_str().unwrap());
        let file = dir.path().join("inv.toml");
        std::fs::write(&file, text).unwrap();
        let result = load(&file).map_err(|e| e.to_string());
        (dir, result)
    }

    #[test]
    fn the_files_are_found_next_to_the_inventory_and_both_gateways_get_https() {
        let (dir, inventory) = load_with("", "");
        let inventory = inventory.unwrap();
        let tls = inventory.gateways.tls.as_ref().unwrap();
        assert_eq!(tls.port, 8443, "default");
        assert_eq!(tls.cert, dir.path().join("certs/site.pem"));
        assert_eq!(tls.sni[0].key, dir.path().join("certs/api.key"));
        assert_eq!(tls.sni[0].cert, dir.path().join("certs/api.pem"));
        let files = tls.files();
        let names: Vec<(&str, bool)> = files.iter().map(|f| (f.name.as_str(), f.private)).collect();
        assert_eq!(
            names,
            [
                ("default.pem", false),
                ("default.key", true),
                ("sni-0.pem", false),
                ("sni-0.key", true)
            ]
        );
        let units = plan(&inventory, "t");
        let listeners: Vec<SocketAddr> = units
            .iter()
            .filter_map(|u| tls_listener(&inventory, u))
            .collect();
        assert_eq!(
            listeners,
            [
                "0.0.0.0:8443".parse().unwrap(),
                "0.0.0.0:8443".parse().unwrap()
            ],
            "both gateways, on every address like the cleartext listener"
        );
    }

    #[test]
    fn the_gateway_section_names_the_copies_on_the_machine() {
        let (_dir, inventory) = load_with("", "");
        let inventory = inventory.unwrap();
        let tls = inventory.gateways.tls.as_ref().unwrap();
        let text = tls.gateway_config("0.0.0.0:8080".parse().unwrap(), "/opt/herd/lab/tls");
        let value: toml::Value = toml::from_str(&text).unwrap();
        let section = &value["tls"];
        assert_eq!(section["enabled"].as_bool(), Some(true));
        assert_eq!(section["listen"].as_str(), Some("0.0.0.0:8443"));
        assert_eq!(
            section["cert"].as_str(),
            Some("/opt/herd/lab/tls/default.pem")
        );
        assert_eq!(
            section["key"].as_str(),
            Some("/opt/herd/lab/tls/default.key")
        );
        assert_eq!(section["hsts"].as_str(), Some("max-age=600"));
        assert_eq!(section["redirect_http"].as_bool(), Some(false));
        let sni = &section["sni"][0];
        assert_eq!(sni["cert"].as_str(), Some("/opt/herd/lab/tls/sni-0.pem"));
        assert_eq!(sni["key"].as_str(), Some("/opt/herd/lab/tls/sni-0.key"));
        assert_eq!(sni["names"][1].as_str(), Some("*.api.example.com"));
    }

    #[test]
    fn missing_unreadable_or_wrong_files_are_refused_naming_the_entry() {
        let error = |from: &str, to: &str| {
            let (_dir, result) = load_with(from, to);
            let error = result.unwrap_err();
            assert!(!error.contains('\n'), "one line: {error}");
            error
        };
        let e = error("certs/site.pem", "certs/gone.pem");
        assert!(
            e.contains("inv.toml: gateways.tls: cert ") && e.contains("gone.pem: No such file"),
            "{e}"
        );
        let e = error("certs/api.key", "certs/site.pem");
        assert!(
            e.contains("gateways.tls.sni[0]: key ") && e.contains("holds no PEM private key"),
            "{e}"
        );
        let e = error("key = \"certs/site.key\"", "key = \"certs\"");
        assert!(
            e.contains("gateways.tls: key ") && e.contains("directory"),
            "{e}"
        );
        let e = error("hsts = \"max-age=600\"", "port = 9090");
        assert!(
            e.contains("port 9090 is the gateways' admin_port too"),
            "{e}"
        );
        let e = error("machines = [\"m1\"]", "port = 8443\nmachines = [\"gw1\"]");
        assert_eq!(
            e.rsplit_once("inv.toml: ").unwrap().1,
            "gateways: port clash on machine gw1: gateway-gw1 https 0.0.0.0:8443 and worker-demo-gw1-1 public 10.77.0.11:8443"
        );
        let e = error("\"*.api.example.com\"", "\"api..example.com\"");
        assert!(e.contains("gateways.tls.sni[0]: `api..example.com`"), "{e}");
        let e = error(
            "floating_address = \"10.77.0.10\"",
            "floating_address = \"10.77.0.10\"\nenv = { HERD_GATEWAY_TLS__HSTS = \"x\" }",
        );
        assert!(
            e.contains("gateways.env: HERD_GATEWAY_TLS__HSTS conflicts with [gateways.tls]"),
            "{e}"
        );
        let e = error("hsts = \"max-age=600\"", "hst = \"x\"");
        assert!(e.contains("unknown field `hst`"), "{e}");
    }
}
