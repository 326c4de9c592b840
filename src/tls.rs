//! The process's TLS crypto provider: rustls (through reqwest, for upstreams and S3) is built
//! without one, so ring's is installed once before the first client is made.

use std::sync::Once;

static PROVIDER: Once = Once::new();

/// Installs ring as the process-wide rustls provider (once; another part of the process having
/// installed one already is fine).
pub fn install_provider() {
    PROVIDER.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
