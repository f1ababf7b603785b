//! The certificate a handshake gets: picked by SNI from the current [`CertSet`], which a reload
//! replaces atomically (`ArcSwap`: a handshake reads it without a lock, and one in progress
//! keeps the set it started with).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::CertSet;

/// The current certificates, for rustls.
#[derive(Debug)]
pub struct Resolver {
    current: ArcSwap<CertSet>,
}

impl Resolver {
    /// Serves `set` until [`Resolver::swap`].
    pub fn new(set: CertSet) -> Self {
        Resolver {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// Replaces every certificate at once; handshakes from now on see the new ones.
    pub fn swap(&self, set: CertSet) {
        self.current.store(Arc::new(set));
    }

    /// The certificates served now.
    pub fn current(&self) -> Arc<CertSet> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .load()
                .pick(client_hello.server_name())
                .key
                .clone(),
        )
    }
}
