//! The store link's TLS: libpq's `sslmode` and `sslrootcert`, read from the store URL, and the
//! tokio-postgres connector (tokio-rustls, rustls with ring as push uses it) that every
//! connection of the store goes through: the pool, and the maintenance connection that creates
//! the database.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and verifies nothing itself.
//! [`PgLink::from_url`] takes `sslmode` and `sslrootcert` out of the URL, hands tokio-postgres
//! the rest with the mode it knows (`verify-ca` and `verify-full` negotiate as `require`), and
//! the rustls verifier checks what libpq checks:
//!
//! | `sslmode` | TLS | certificate |
//! | --- | --- | --- |
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | not verified |
//! | `require` | always, or no connection | not verified |
//! | `verify-ca` | always | chain to `sslrootcert`'s certificates (else the webpki roots) |
//! | `verify-full` | always | as `verify-ca`, and the URL's host name |
//!
//! As libpq does, a `sslrootcert` named with `prefer` or `require` is used: the chain is
//! verified (libpq's documented compatibility behaviour of `require`). Unlike libpq, a
//! `verify-*` mode without `sslrootcert` uses the webpki (Mozilla) roots rather than
//! `~/.postgresql/root.crt`. The key=value form of a connection string is passed to
//! tokio-postgres as it is (its own three modes); the verifying modes need the URL form, the
//! only one `store.url` accepts.
//!
//! Channel binding (`tls-server-end-point`, RFC 5929) is offered for SCRAM, as libpq does: a
//! server that authenticates with SCRAM then detects a man in the middle even when the
//! certificate is not verified.
//!
//! Must not: open sockets (tokio-postgres does), read any other URL parameter (`link.rs` reads
//! the socket's).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslNegotiation;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode` values this store supports (`allow` is not one of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres negotiates: the verifying modes need TLS, as `require` does.
    fn negotiated(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// A store URL read for connecting: tokio-postgres's config (the TLS mode it knows set) and
/// the connector every connection of the store uses.
pub struct PgLink {
    pub config: tokio_postgres::Config,
    pub tls: PgTls,
}

impl PgLink {
    /// Reads `url` (a `postgres://` URL, or a key=value string tokio-postgres reads as it is),
    /// and `sslrootcert`'s certificates. The error names what is wrong, never the URL (it
    /// may hold a password).
    pub fn from_url(url: &str) -> Result<PgLink, String> {
        let (rest, mode, rootcert) = take_tls_params(url)?;
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}{}", super::causes(&e)))?;
        let mode = match mode {
            Some(m) => m,
            None => match config.get_ssl_mode() {
                tokio_postgres::config::SslMode::Disable => SslMode::Disable,
                tokio_postgres::config::SslMode::Prefer => SslMode::Prefer,
                _ => SslMode::Require,
            },
        };
        if config.get_ssl_negotiation() == SslNegotiation::Direct && matches!(mode, SslMode::Disable | SslMode::Prefer)
        {
            return Err(format!(
                "sslmode={} may not be used with sslnegotiation=direct (use require, verify-ca or verify-full)",
                mode.as_str()
            ));
        }
        config.ssl_mode(mode.negotiated());
        let tls = PgTls::new(mode, rootcert)?;
        Ok(PgLink { config, tls })
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL's query (the last of each
/// wins, as in tokio-postgres). Returns the URL without them; a string of another form as it
/// is, with neither.
fn take_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<PathBuf>), String> {
    let (rest, taken) = super::take_url_params(url, &["sslmode", "sslrootcert"])?;
    let (mut mode, mut rootcert) = (None, None);
    for (name, value) in taken {
        match name {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            _ => rootcert = Some(PathBuf::from(value)),
        }
    }
    Ok((rest, mode, rootcert))
}

/// The certificates of a PEM file (a CA bundle may hold several).
fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for der in crate::tls::pem_certs(path, "sslrootcert")? {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("sslrootcert {}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The tokio-postgres connector of the store (cheap to clone: one rustls config shared).
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    rootcert: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
    /// TLS sessions established so far (the start-up log says whether `prefer` got one).
    sessions: Arc<AtomicU64>,
    /// Added to a failed handshake's error: what was checked, against what.
    context: Arc<str>,
}

impl PgTls {
    fn new(mode: SslMode, rootcert: Option<PathBuf>) -> Result<PgTls, String> {
        let roots = match (&rootcert, mode) {
            (Some(p), _) => Some(read_roots(p)?),
            (None, SslMode::VerifyCa | SslMode::VerifyFull) => Some(
                webpki_roots::TLS_SERVER_ROOTS
                    .iter()
                    .cloned()
                    .collect::<RootCertStore>(),
            ),
            (None, _) => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Verifier {
            roots: roots.map(Arc::new),
            check_name: mode == SslMode::VerifyFull,
            algs: provider.signature_verification_algorithms,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // What libpq 17 sends; a PostgreSQL 17 server requires it with sslnegotiation=direct.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        let mut tls = PgTls {
            mode,
            rootcert,
            config: Arc::new(config),
            sessions: Arc::new(AtomicU64::new(0)),
            context: Arc::from(""),
        };
        tls.context = Arc::from(format!("sslmode={}: {}", mode.as_str(), tls.describe()));
        Ok(tls)
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// TLS sessions this connector (and its clones) established.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// What the link does, for the start-up log.
    pub fn describe(&self) -> String {
        let roots = match &self.rootcert {
            Some(p) => format!("the certificates of {}", p.display()),
            None => "the webpki (Mozilla) roots".to_owned(),
        };
        let chain = |what: &str| match &self.rootcert {
            Some(_) => format!("{what}, certificate chain verified against {roots}"),
            None => format!("{what}, certificate not verified (encryption against passive listeners only)"),
        };
        match self.mode {
            SslMode::Disable => "plaintext".to_owned(),
            SslMode::Prefer => chain("TLS when the server offers it, else plaintext"),
            SslMode::Require => chain("TLS"),
            SslMode::VerifyCa => format!("TLS, certificate chain verified against {roots}"),
            SslMode::VerifyFull => format!("TLS, certificate chain verified against {roots}, and the host name"),
        }
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    /// Never fails: tokio-postgres asks before it knows whether TLS will be used (a Unix
    /// socket has no host name), so a bad name fails the handshake instead.
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        Ok(PgTlsConnect {
            name: ServerName::try_from(domain.to_owned()).map_err(|_| domain.to_owned()),
            config: self.config.clone(),
            sessions: self.sessions.clone(),
            context: self.context.clone(),
        })
    }
}

/// One connection's handshake.
pub struct PgTlsConnect {
    name: Result<ServerName<'static>, String>,
    config: Arc<rustls::ClientConfig>,
    sessions: Arc<AtomicU64>,
    context: Arc<str>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.map_err(|n| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{n:?} is not a host name or IP address to check the server's certificate against"),
                )
            })?;
            let s = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("{e} ({})", self.context)))?;
            self.sessions.fetch_add(1, Ordering::Relaxed);
            Ok(PgTlsStream(s))
        })
    }
}

/// A TLS connection to PostgreSQL.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let end_entity = self.0.get_ref().1.peer_certificates().and_then(|c| c.first());
        match end_entity.and_then(|c| tls_server_end_point(c)) {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929's `tls-server-end-point`: the server certificate hashed with its signature's hash
/// (SHA-256 for MD5 and SHA-1), as PostgreSQL computes it. `None` (SCRAM without channel
/// binding) for a signature PostgreSQL cannot bind to either (Ed25519, RSA-PSS) or a
/// certificate it cannot read.
fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const RSA: [u8; 8] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA: [u8; 6] = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04]; // 1.2.840.10045.4
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let oid = signature_algorithm(cert)?;
    let hash = if let Some(rsa) = oid.strip_prefix(&RSA[..]) {
        match rsa {
            // md5WithRSAEncryption, sha1WithRSAEncryption, sha256WithRSAEncryption
            [0x04] | [0x05] | [0x0b] => Hash::Sha256,
            [0x0c] => Hash::Sha384,
            [0x0d] => Hash::Sha512,
            _ => return None,
        }
    } else if let Some(ecdsa) = oid.strip_prefix(&ECDSA[..]) {
        match ecdsa {
            // ecdsa-with-SHA1, ecdsa-with-SHA256
            [0x01] | [0x03, 0x02] => Hash::Sha256,
            [0x03, 0x03] => Hash::Sha384,
            [0x03, 0x04] => Hash::Sha512,
            _ => return None,
        }
    } else {
        return None;
    };
    Some(match hash {
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The OID of a DER certificate's `signatureAlgorithm` (the field after `tbsCertificate`).
fn signature_algorithm(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, cert, _) = der_element(cert)? else {
        return None;
    };
    let (0x30, _tbs, rest) = der_element(cert)? else {
        return None;
    };
    let (0x30, alg, _) = der_element(rest)? else {
        return None;
    };
    let (0x06, oid, _) = der_element(alg)? else {
        return None;
    };
    Some(oid)
}

/// The first DER element of `der`: (tag, contents, what follows). `None` when malformed.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The DNS names a certificate is valid for (a test's `verify-full` host): every string it
/// holds (subject, subjectAltName) that rustls accepts as a name of it.
#[cfg(test)]
pub(crate) fn dns_names_valid_for(cert: &[u8]) -> Vec<String> {
    fn strings(der: &[u8], out: &mut Vec<String>) {
        let mut rest = der;
        while let Some((tag, body, next)) = der_element(rest) {
            match tag {
                // Constructed (SEQUENCE, SET, explicit tags), or an extension's OCTET STRING.
                t if t & 0x20 != 0 || t == 0x04 => strings(body, out),
                // UTF8String, PrintableString, IA5String, a subjectAltName's dNSName.
                0x0c | 0x13 | 0x16 | 0x82 => out.extend(std::str::from_utf8(body).ok().map(str::to_owned)),
                _ => {}
            }
            rest = next;
        }
    }
    let der = CertificateDer::from(cert);
    let Ok(parsed) = ParsedCertificate::try_from(&der) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    strings(cert, &mut found);
    found.retain(|s| {
        matches!(ServerName::try_from(s.as_str()), Ok(n @ ServerName::DnsName(_)) if verify_server_name(&parsed, &n).is_ok())
    });
    found.dedup();
    found
}

/// libpq's checks: none (`roots` absent), the chain, or the chain and the name. The handshake's
/// own signature is always checked (the server proves it holds the certificate's key).
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algs.all)?;
            if self.check_name {
                verify_server_name(&cert, server_name)?;
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, Option<SslMode>, Option<PathBuf>) {
        take_tls_params(url).unwrap()
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_url_and_the_rest_kept() {
        assert_eq!(
            split("postgres://u:p@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20b.pem"),
            (
                "postgres://u:p@h:5432/db?application_name=x".to_owned(),
                Some(SslMode::VerifyFull),
                Some(PathBuf::from("/etc/ca b.pem"))
            )
        );
        assert_eq!(
            split("postgresql://h/db?sslmode=disable"),
            ("postgresql://h/db".to_owned(), Some(SslMode::Disable), None)
        );
        // The last one wins, as in tokio-postgres.
        assert_eq!(
            split("postgres://h?sslmode=require&sslmode=verify-ca").1,
            Some(SslMode::VerifyCa)
        );
        // A '?' in the password is not the query.
        assert_eq!(
            split("postgres://u:a?sslmode=disable@h/db?sslmode=require"),
            (
                "postgres://u:a?sslmode=disable@h/db".to_owned(),
                Some(SslMode::Require),
                None
            )
        );
        assert_eq!(split("postgres://h/db"), ("postgres://h/db".to_owned(), None, None));
        assert_eq!(
            split("host=h sslmode=require"),
            ("host=h sslmode=require".to_owned(), None, None)
        );
    }

    #[test]
    fn the_mode_is_read_from_the_url_and_bad_values_are_refused() {
        let mode = |u: &str| PgLink::from_url(u).map(|l| (l.tls.mode(), l.config.get_ssl_mode()));
        use tokio_postgres::config::SslMode as Pg;
        assert_eq!(mode("postgres://h/db").unwrap(), (SslMode::Prefer, Pg::Prefer));
        assert_eq!(
            mode("postgres://h/db?sslmode=disable").unwrap(),
            (SslMode::Disable, Pg::Disable)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-ca").unwrap(),
            (SslMode::VerifyCa, Pg::Require)
        );
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-full").unwrap(),
            (SslMode::VerifyFull, Pg::Require)
        );
        assert_eq!(mode("host=h sslmode=require").unwrap(), (SslMode::Require, Pg::Require));
        let err = |u: &str| PgLink::from_url(u).err().unwrap();
        assert!(err("postgres://h/db?sslmode=bogus").contains("sslmode \"bogus\" is not one of"));
        assert!(err("postgres://h/db?sslmode=allow").contains("sslmode \"allow\""));
        assert!(err("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .contains("sslrootcert: cannot read /nonexistent/ca.pem"));
        assert!(err("postgres://h/db?sslnegotiation=direct").contains("sslnegotiation=direct"));
        assert!(err("postgres://h/db?sslcert=/x.pem").contains("sslcert"));
        // Never the URL, which may hold a password.
        assert!(!err("postgres://u:hunter2@h/db?sslmode=bogus").contains("hunter2"));
    }

    #[test]
    fn a_rootcert_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let url = format!("postgres://h/db?sslmode=verify-ca&sslrootcert={}", p.display());
        assert!(PgLink::from_url(&url).err().unwrap().contains("no certificate in it"));
        let cert = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
        std::fs::write(&p, cert.cert.pem()).unwrap();
        let link = PgLink::from_url(&url).unwrap();
        assert!(link
            .tls
            .describe()
            .contains(&format!("verified against the certificates of {}", p.display())));
    }

    #[test]
    fn channel_binding_hashes_with_the_signature_hash() {
        for (alg, len) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, Some(32)),
            (&rcgen::PKCS_ECDSA_P384_SHA384, Some(48)),
            (&rcgen::PKCS_ED25519, None),
        ] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["db.example".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let der = cert.der().as_ref();
            let got = tls_server_end_point(der);
            assert_eq!(got.as_ref().map(Vec::len), len, "{alg:?}");
            match len {
                Some(32) => assert_eq!(got.unwrap(), sha2::Sha256::digest(der).to_vec()),
                Some(48) => assert_eq!(got.unwrap(), sha2::Sha384::digest(der).to_vec()),
                _ => {}
            }
        }
        // RSA with SHA-1 binds with SHA-256; a truncated certificate binds to nothing.
        let alg = |oid: &[u8]| {
            let mut a = vec![0x06, oid.len() as u8];
            a.extend_from_slice(oid);
            let mut alg = vec![0x30, a.len() as u8];
            alg.extend(a);
            let mut body = vec![0x30, 0x00];
            body.extend(alg);
            let mut cert = vec![0x30, body.len() as u8];
            cert.extend(body);
            cert
        };
        let sha1_rsa = alg(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05]);
        assert_eq!(
            tls_server_end_point(&sha1_rsa).unwrap(),
            sha2::Sha256::digest(&sha1_rsa).to_vec()
        );
        let sha512_rsa = alg(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]);
        assert_eq!(tls_server_end_point(&sha512_rsa).unwrap().len(), 64);
        for cut in 0..sha1_rsa.len() {
            assert_eq!(tls_server_end_point(&sha1_rsa[..cut]), None, "{cut}");
        }
    }
}
