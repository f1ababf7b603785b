//! Certificate reload: the files are read again every `tls.reload_interval` (when their bytes
//! changed) and on SIGHUP; a set that loads and checks whole replaces the current one, anything
//! else is refused with a log line and the old set stays.
//!
//! Content, not mtime: a renewal tool that writes the key and then the chain (or copies with
//! preserved times) is seen either way, and a half-written pair is refused by the key check and
//! picked up at the next tick once complete. Open connections are not touched: TLS keeps the
//! certificate of the handshake it did; only new handshakes see the new one.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::certs::CertSet;
use super::config::TlsConfig;
use super::resolver::Resolver;

/// Reload outcomes, for the metrics.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    /// New sets swapped in.
    pub ok: AtomicU64,
    /// Changed files refused (the old set kept).
    pub failed: AtomicU64,
}

/// Why a reload was tried.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Poll,
    Signal,
}

/// SIGHUP, watched from now on (before the reload task first runs, so a signal sent right
/// after start is not lost — nor, by default, fatal); `None` when it can't be.
pub fn watch_hangup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            warn!(error = %error, "cannot watch SIGHUP; certificates reload by polling only");
            None
        }
    }
}

/// Watches the files and `hangup` until `stop`; runs on the caller's runtime. `last`: the
/// files' [`fingerprint`] when the current set was loaded.
pub async fn run(
    config: TlsConfig,
    resolver: Arc<Resolver>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    counts: Arc<ReloadCounts>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut last: u64,
    stop: CancellationToken,
) {
    let poll = !config.reload_interval.is_zero();
    let mut ticks = tokio::time::interval(if poll {
        config.reload_interval
    } else {
        std::time::Duration::from_secs(3600)
    });
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        let trigger = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick(), if poll => Trigger::Poll,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            } => Trigger::Signal,
        };
        let now = fingerprint(&config);
        if matches!(trigger, Trigger::Poll) && now == last {
            continue;
        }
        // Blocking file reads, a few KB each: fine on this runtime (admin, not client traffic).
        match CertSet::load(&config, &provider) {
            Ok(set) => {
                let names: Vec<&str> = set.all.iter().map(|c| c.name.as_str()).collect();
                info!(trigger = ?trigger, certificates = ?names, "TLS certificates reloaded");
                resolver.swap(set);
                counts.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                warn!(
                    trigger = ?trigger,
                    key = %error.key,
                    problem = %error.problem,
                    "new TLS certificate refused; still serving the previous one"
                );
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        // A refused change is not retried until the files change again (one line per change).
        last = now;
    }
}

/// A hash of every certificate and key file's bytes (unreadable files hash as absent).
pub fn fingerprint(config: &TlsConfig) -> u64 {
    let mut hasher = DefaultHasher::new();
    let files = [(&config.cert, &config.key)]
        .into_iter()
        .chain(config.sni.iter().map(|entry| (&entry.cert, &entry.key)));
    for (cert, key) in files {
        std::fs::read(cert).ok().hash(&mut hasher);
        std::fs::read(key).ok().hash(&mut hasher);
    }
    hasher.finish()
}
