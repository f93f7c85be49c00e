//! HTTPS on the listener with rustls (`[server.tls]`): WeChat posts only to ports 80 and 443,
//! and this spares a TLS proxy. The certificate is held in a resolver so that a reload (SIGHUP)
//! swaps it for new connections while open ones keep theirs.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Reads a PEM certificate chain and its private key (PKCS#8, PKCS#1 or SEC1) and checks that
/// they belong together. The error names the file, never the key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = load_roots(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a PEM private key from {}: {e}", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(certified)
}

/// Reads the PEM certificates of `file`: a chain to serve, or the CA a TLS peer's certificate
/// must chain to.
pub fn load_roots(file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read a PEM certificate from {}: {e}", file.display()))?;
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", file.display()));
    }
    Ok(roots)
}

/// The current certificate, swapped on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(certified: Arc<CertifiedKey>) -> Self {
        Self {
            current: ArcSwap::new(certified),
        }
    }

    /// New connections get `certified` from now on.
    pub fn set(&self, certified: Arc<CertifiedKey>) {
        self.current.store(certified);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The acceptor for the listener: HTTP/1.1 over TLS 1.2 or 1.3, the certificate from
/// `resolver`.
pub fn acceptor(resolver: Arc<CertResolver>) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
