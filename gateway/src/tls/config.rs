//! `[tls]`: the HTTPS listener, its certificates and the limits on handshakes.
//!
//! Only the shape of the section is checked here ([`TlsConfig::validate`]); whether the files
//! exist, parse, match and are still valid is checked by loading them
//! ([`crate::tls::certs::CertSet::load`]), which [`crate::config::GatewayConfig`]'s validation
//! does at start so that a bad file exits 2 with one line naming its key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use herd_shared::config::{ConfigError, check};
use serde::Deserialize;

/// `[tls]`: TLS termination on a listener of its own (off by default).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve HTTPS on `tls.listen`. The cleartext listener (`listen`) stays open beside it.
    pub enabled: bool,
    /// The HTTPS listener.
    pub listen: SocketAddr,
    /// PEM file with the default certificate chain (leaf first), served when the client sends
    /// no server name or one no `[[tls.sni]]` entry lists.
    pub cert: PathBuf,
    /// PEM file with the default certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// One certificate per group of host names, chosen by the name the client asks for (SNI).
    pub sni: Vec<SniCertificate>,
    /// How often the certificate and key files are read again to pick up a renewal; 0 turns
    /// the polling off (SIGHUP still reloads).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Longest time from accepting a TLS connection to the end of its handshake, waiting for a
    /// handshake slot included; a slower client is disconnected.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, over all serving threads; more wait (within
    /// `tls.handshake_timeout`), so a flood of handshakes can't take all the CPU from
    /// established connections.
    pub max_handshakes: usize,
    /// The cleartext listener answers every request with a 308 redirect to the same URL over
    /// https instead of proxying it.
    pub redirect_http: bool,
    /// Let clients resume earlier sessions (TLS 1.2 session ids, TLS 1.3 tickets backed by a
    /// 256-entry in-memory cache per process): a resumed handshake skips the certificate
    /// signature. Off forces a full handshake every time (the benchmark's handshake scenario).
    pub session_resumption: bool,
    /// `Strict-Transport-Security` value added to every response sent over TLS (e.g.
    /// `max-age=31536000`); empty: none.
    pub hsts: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            cert: PathBuf::new(),
            key: PathBuf::new(),
            sni: Vec::new(),
            reload_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            redirect_http: false,
            session_resumption: true,
            hsts: String::new(),
        }
    }
}

/// `[[tls.sni]]`: a certificate for some host names.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// Host names this certificate is served for: exact (`api.example.com`) or one leading
    /// wildcard label (`*.example.com`, which matches `a.example.com`, not `example.com`).
    pub names: Vec<String>,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl TlsConfig {
    /// Checks the section's shape (files are checked by loading them). `public` is the
    /// cleartext listener, which the HTTPS one must not share.
    pub fn validate(&self, public: SocketAddr) -> Result<(), ConfigError> {
        if !self.enabled {
            if self.redirect_http {
                return Err(ConfigError::new(
                    "tls.redirect_http",
                    "needs tls.enabled = true (nothing to redirect to)",
                ));
            }
            return Ok(());
        }
        // Port 0 (tests): the OS picks two different ports.
        if self.listen == public && public.port() != 0 {
            return Err(ConfigError::new(
                "tls.listen",
                "must differ from listen (cleartext keeps its own listener)",
            ));
        }
        if self.cert.as_os_str().is_empty() {
            return Err(ConfigError::new("tls.cert", "must name a PEM file"));
        }
        if self.key.as_os_str().is_empty() {
            return Err(ConfigError::new("tls.key", "must name a PEM file"));
        }
        let mut seen = std::collections::HashSet::new();
        for (index, entry) in self.sni.iter().enumerate() {
            if entry.names.is_empty() {
                return Err(ConfigError::new(
                    format!("tls.sni[{index}].names"),
                    "must list at least one host name",
                ));
            }
            for name in &entry.names {
                if !is_host_pattern(name) {
                    return Err(ConfigError::new(
                        format!("tls.sni[{index}].names"),
                        format!("{name:?} is not a host name or *.host name"),
                    ));
                }
                if !seen.insert(name.to_ascii_lowercase()) {
                    return Err(ConfigError::new(
                        format!("tls.sni[{index}].names"),
                        format!("{name:?} is listed twice"),
                    ));
                }
            }
        }
        if !self.reload_interval.is_zero() {
            check::at_least(
                "tls.reload_interval",
                self.reload_interval,
                Duration::from_millis(100),
            )?;
        }
        check::at_least(
            "tls.handshake_timeout",
            self.handshake_timeout,
            Duration::from_millis(100),
        )?;
        check::range("tls.max_handshakes", self.max_handshakes, 1, 1_000_000)?;
        if !self.hsts.is_empty() && http::HeaderValue::from_str(&self.hsts).is_err() {
            return Err(ConfigError::new(
                "tls.hsts",
                "must be a valid header value such as max-age=31536000",
            ));
        }
        Ok(())
    }
}

/// Whether `name` is a DNS host name, optionally with one leading `*.` label.
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
    use super::*;

    fn enabled() -> TlsConfig {
        TlsConfig {
            enabled: true,
            cert: "c.pem".into(),
            key: "k.pem".into(),
            ..TlsConfig::default()
        }
    }

    fn public() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }

    #[test]
    fn off_by_default_and_redirect_needs_it_on() {
        assert_eq!(TlsConfig::default().validate(public()), Ok(()));
        let redirect = TlsConfig {
            redirect_http: true,
            ..TlsConfig::default()
        };
        assert_eq!(
            redirect.validate(public()).unwrap_err().key,
            "tls.redirect_http"
        );
    }

    #[test]
    fn each_bad_key_is_named() {
        let key = |config: TlsConfig| config.validate(public()).unwrap_err().key;
        assert_eq!(
            key(TlsConfig {
                cert: PathBuf::new(),
                ..enabled()
            }),
            "tls.cert"
        );
        assert_eq!(
            key(TlsConfig {
                key: PathBuf::new(),
                ..enabled()
            }),
            "tls.key"
        );
        assert_eq!(
            key(TlsConfig {
                listen: public(),
                ..enabled()
            }),
            "tls.listen"
        );
        let sni = |names: &[&str]| SniCertificate {
            names: names.iter().map(|n| n.to_string()).collect(),
            cert: "a.pem".into(),
            key: "a.key".into(),
        };
        assert_eq!(
            key(TlsConfig {
                sni: vec![sni(&["a.example"]), sni(&["b..example"])],
                ..enabled()
            }),
            "tls.sni[1].names"
        );
        assert_eq!(
            key(TlsConfig {
                sni: vec![sni(&["a.example"]), sni(&["A.example"])],
                ..enabled()
            }),
            "tls.sni[1].names"
        );
        assert_eq!(
            key(TlsConfig {
                sni: vec![sni(&[])],
                ..enabled()
            }),
            "tls.sni[0].names"
        );
        assert_eq!(
            key(TlsConfig {
                max_handshakes: 0,
                ..enabled()
            }),
            "tls.max_handshakes"
        );
        assert_eq!(
            key(TlsConfig {
                hsts: "max-age=1\n".into(),
                ..enabled()
            }),
            "tls.hsts"
        );
        let ok = TlsConfig {
            sni: vec![sni(&["*.example.com", "example.com"])],
            ..enabled()
        };
        assert_eq!(ok.validate(public()), Ok(()));
    }
}
