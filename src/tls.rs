//! TLS client settings shared by the node's outbound HTTPS: push providers and agents' own
//! endpoints. Trust: the webpki roots (Mozilla's) plus what the operator adds in a PEM file.

use std::path::Path;
use std::sync::Arc;

/// The certificates of a PEM file (DER each), for `setting` (named in every error). A file
/// without one is refused: trusting nothing extra is said by leaving the setting out.
pub fn pem_certs(path: &Path, setting: &str) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("{setting} {}: {e}", path.display()))?;
        out.push(c.as_ref().to_vec());
    }
    if out.is_empty() {
        return Err(format!("{setting} {}: no certificate in it", path.display()));
    }
    Ok(out)
}

/// A client configuration verifying servers against the webpki roots and `extra_roots`
/// (DER), offering `alpn` in that order.
pub fn client_config(
    extra_roots: &[Vec<u8>],
    alpn: &[&[u8]],
    setting: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_roots {
        roots
            .add(rustls_pki_types::CertificateDer::from(der.clone()))
            .map_err(|e| format!("{setting}: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(tls))
}
