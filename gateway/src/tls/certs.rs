//! Certificates from PEM files: a chain and its key, checked to belong together and to be
//! still valid, gathered into the [`CertSet`] the handshake picks from.
//!
//! Parsing uses rustls-pki-types' PEM reader (rustls-pemfile is unmaintained and now only
//! wraps it). A loaded set is immutable; a reload builds a new one and swaps it in whole
//! (`crate::tls::resolver`), so a handshake never sees half of a renewal.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use herd_shared::config::ConfigError;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsConfig;

/// One certificate as served: the chain with its signing key, and when it expires.
#[derive(Debug)]
pub struct Loaded {
    /// Name in metrics and logs: `default`, or the first host name of its `[[tls.sni]]` entry.
    pub name: String,
    /// Chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// The leaf's `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
}

/// Every certificate of the configuration, indexed by the host names they serve.
#[derive(Debug)]
pub struct CertSet {
    /// Served when no name matches (or the client sends none).
    pub default: Arc<Loaded>,
    /// Exact host names (lower case).
    exact: HashMap<String, Arc<Loaded>>,
    /// `*.suffix` entries by suffix (lower case, without the `*.`).
    wildcard: HashMap<String, Arc<Loaded>>,
    /// All certificates, default first (for the expiry metric).
    pub all: Vec<Arc<Loaded>>,
}

impl CertSet {
    /// Reads and checks every file of `config`; the error names the key of the first bad one.
    pub fn load(config: &TlsConfig, provider: &CryptoProvider) -> Result<Self, ConfigError> {
        let now = unix_now();
        let default = Arc::new(load_one(
            "default",
            &config.cert,
            &config.key,
            ("tls.cert", "tls.key"),
            provider,
            now,
        )?);
        let mut set = CertSet {
            default: default.clone(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            all: vec![default],
        };
        for (index, entry) in config.sni.iter().enumerate() {
            let keys = (
                format!("tls.sni[{index}].cert"),
                format!("tls.sni[{index}].key"),
            );
            let name = entry.names.first().cloned().unwrap_or_default();
            let loaded = Arc::new(load_one(
                &name,
                &entry.cert,
                &entry.key,
                (&keys.0, &keys.1),
                provider,
                now,
            )?);
            for host in &entry.names {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) => set.wildcard.insert(suffix.to_string(), loaded.clone()),
                    None => set.exact.insert(host, loaded.clone()),
                };
            }
            set.all.push(loaded);
        }
        Ok(set)
    }

    /// The certificate for the server name a client asked for: an exact name, then a wildcard
    /// one label deep, then the default.
    pub fn pick(&self, server_name: Option<&str>) -> &Arc<Loaded> {
        let Some(name) = server_name else {
            return &self.default;
        };
        // rustls hands over names already checked as DNS names; lower-case them to compare.
        let name = name.to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if let Some(found) = self.exact.get(name) {
            return found;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

/// Loads one chain and key; `keys` are the config keys of the two files, for errors.
fn load_one(
    name: &str,
    cert_path: &Path,
    key_path: &Path,
    keys: (&str, &str),
    provider: &CryptoProvider,
    now: i64,
) -> Result<Loaded, ConfigError> {
    let (cert_key, key_key) = keys;
    let cert_pem = std::fs::read(cert_path).map_err(|e| {
        ConfigError::new(
            cert_key,
            format!("cannot read {}: {e}", cert_path.display()),
        )
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::new(
                cert_key,
                format!(
                    "{} is not a PEM certificate chain: {e}",
                    cert_path.display()
                ),
            )
        })?;
    let Some(leaf) = chain.first() else {
        return Err(ConfigError::new(
            cert_key,
            format!("{} holds no CERTIFICATE block", cert_path.display()),
        ));
    };
    let not_after = not_after(leaf).ok_or_else(|| {
        ConfigError::new(
            cert_key,
            format!(
                "{}: cannot read the certificate's validity",
                cert_path.display()
            ),
        )
    })?;
    if not_after <= now {
        return Err(ConfigError::new(
            cert_key,
            format!(
                "{}: the certificate expired at {} (unix seconds)",
                cert_path.display(),
                not_after
            ),
        ));
    }
    let key_pem = std::fs::read(key_path).map_err(|e| {
        ConfigError::new(key_key, format!("cannot read {}: {e}", key_path.display()))
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        ConfigError::new(
            key_key,
            format!(
                "{} holds no usable PEM private key: {e}",
                key_path.display()
            ),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        let problem = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            ),
            other => format!("{}: unusable key: {other}", key_path.display()),
        };
        ConfigError::new(key_key, problem)
    })?;
    Ok(Loaded {
        name: name.to_string(),
        key: Arc::new(certified),
        not_after,
    })
}

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The `notAfter` of an X.509 certificate, in Unix seconds; `None` when the DER is not shaped
/// like one.
///
/// A few lines of DER walking instead of an X.509 crate: only this one field is needed, and
/// rustls has already checked nothing else about our own certificate that we rely on.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (certificate, _) = der_element(cert.as_ref(), 0x30)?;
    let (mut tbs, _) = der_element(certificate, 0x30)?;
    // version [0] EXPLICIT, absent in v1 certificates.
    if tbs.first() == Some(&0xa0) {
        tbs = der_element(tbs, 0xa0)?.1;
    }
    let (_, rest) = der_element(tbs, 0x02)?; // serialNumber
    let (_, rest) = der_element(rest, 0x30)?; // signature
    let (_, rest) = der_element(rest, 0x30)?; // issuer
    let (validity, _) = der_element(rest, 0x30)?;
    let (_, after) = der_any_time(validity)?; // notBefore
    let (not_after, _) = der_any_time(after)?;
    Some(not_after)
}

/// Splits `input` into the content of its first element (which must have `tag`) and the rest.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let bytes = usize::from(len & 0x7f);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let mut value = 0usize;
        for &b in &rest[..bytes] {
            value = (value << 8) | usize::from(b);
        }
        rest = &rest[bytes..];
        value
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Reads a UTCTime or GeneralizedTime element; returns it in Unix seconds and the rest.
fn der_any_time(input: &[u8]) -> Option<(i64, &[u8])> {
    let tag = *input.first()?;
    let (text, rest) = der_element(input, tag)?;
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest_digits) = match (tag, digits.len()) {
        // UTCTime: YYMMDDHHMMSS, years 50..99 are 19xx (RFC 5280 §4.1.2.5.1).
        (0x17, 12) => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSS.
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |at: usize| -> Option<i64> { rest_digits.get(at..at + 2)?.parse().ok() };
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second, rest))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_unix_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2038, 1, 19), 24_855);
    }

    #[test]
    fn both_time_encodings_are_read() {
        let utc = [&[0x17, 13][..], b"491231235959Z"].concat();
        assert_eq!(der_any_time(&utc).unwrap().0, 2_524_607_999);
        let generalized = [&[0x18, 15][..], b"20500101000000Z"].concat();
        assert_eq!(der_any_time(&generalized).unwrap().0, 2_524_608_000);
        let bad = [&[0x17, 13][..], b"491331235959Z"].concat();
        assert_eq!(der_any_time(&bad), None);
    }

    /// A self-signed certificate for `names`, written to `dir` as `<file>.pem` / `.key`.
    fn write_cert(
        dir: &Path,
        file: &str,
        names: &[&str],
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn names_pick_exact_then_one_label_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "default", &["default.test"]);
        let (a_cert, a_key) = write_cert(dir.path(), "a", &["a.test"]);
        let (w_cert, w_key) = write_cert(dir.path(), "w", &["*.b.test"]);
        let config = TlsConfig {
            enabled: true,
            cert,
            key,
            sni: vec![
                crate::tls::SniCertificate {
                    names: vec!["A.test".into()],
                    cert: a_cert,
                    key: a_key,
                },
                crate::tls::SniCertificate {
                    names: vec!["*.b.test".into()],
                    cert: w_cert,
                    key: w_key,
                },
            ],
            ..TlsConfig::default()
        };
        let set = CertSet::load(&config, &crate::tls::provider()).unwrap();
        let pick = |name: Option<&str>| set.pick(name).name.clone();
        assert_eq!(pick(Some("a.test")), "A.test");
        assert_eq!(pick(Some("A.TEST.")), "A.test", "case and a trailing dot");
        assert_eq!(pick(Some("x.b.test")), "*.b.test");
        assert_eq!(
            pick(Some("b.test")),
            "default",
            "a wildcard does not match its apex"
        );
        assert_eq!(pick(Some("y.x.b.test")), "default", "nor two labels deep");
        assert_eq!(pick(None), "default");
        assert_eq!(set.all.len(), 3);
        // rcgen's default validity ends in 4096 (GeneralizedTime).
        assert_eq!(set.default.not_after, 67_090_118_400);
    }

    #[test]
    fn garbage_is_no_certificate() {
        assert_eq!(
            not_after(&CertificateDer::from(vec![0x30, 0x82, 0xff])),
            None
        );
        assert_eq!(not_after(&CertificateDer::from(vec![])), None);
    }
}
