//! Mutual authentication of a new cluster connection.
//!
//! Owns: the handshake sequence and the transcript MAC. Must not touch cluster state: it gets
//! a predicate saying which node ids are acceptable and returns the authenticated peer id.
//!
//! Sequence (both sides run it at once, on every new TCP connection):
//! 1. write preamble (`MLRM` + u16 version) and `Hello { cluster, node, nonce }`;
//! 2. read the peer's preamble and `Hello`; refuse a wrong magic/version/cluster, an unknown
//!    or unexpected node id, or our own id;
//! 3. write `Proof { mac }` where `mac = HMAC-SHA256(secret, transcript || prover-role)`;
//! 4. read the peer's `Proof`, verify it in constant time, write `Welcome`;
//! 5. read the peer's `Welcome`. Only then is the link up, so a side whose proof was refused
//!    never believes it is connected.
//!
//! The secret never travels. The transcript binds the cluster name, both node ids in
//! dialer/acceptor order and both nonces, and the prover's role, so a proof cannot be
//! replayed on another connection nor reflected back in the other direction.
//! Not provided: confidentiality or per-frame integrity after the handshake (see the module
//! docs of `mod.rs`).

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError};
use super::proto::{self, Frame, Hello, PreambleCheck, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

const DOMAIN: &[u8] = b"mailroom-cluster-v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We opened the TCP connection.
    Dialer,
    /// We accepted it.
    Acceptor,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"dialer",
            Role::Acceptor => b"acceptor",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a mailroom cluster peer (bad magic)")]
    BadMagic,
    #[error("protocol version {got} not supported (we speak {})", proto::PROTOCOL_VERSION)]
    Version { got: u16 },
    #[error("peer is in cluster {got:?}, not ours")]
    WrongCluster { got: String },
    #[error("unknown node id {got:?}")]
    UnknownNode { got: String },
    #[error("dialed {expected:?} but {got:?} answered")]
    UnexpectedNode { expected: String, got: String },
    #[error("peer claims our own node id")]
    SelfConnect,
    #[error("peer failed to prove the cluster secret")]
    BadProof,
    #[error("peer refused us: {0}")]
    PeerRefused(String),
    #[error("unexpected {0} frame during handshake")]
    Unexpected(&'static str),
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("handshake timed out")]
    Timeout,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl HandshakeError {
    /// A refusal for identity or secret reasons (the `auth_failures` counter).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            HandshakeError::Version { .. }
                | HandshakeError::WrongCluster { .. }
                | HandshakeError::UnknownNode { .. }
                | HandshakeError::UnexpectedNode { .. }
                | HandshakeError::SelfConnect
                | HandshakeError::BadProof
                | HandshakeError::PeerRefused(_)
        )
    }

    /// Bytes that are not our protocol at all (the `frames_rejected` counter).
    pub fn is_bad_input(&self) -> bool {
        match self {
            HandshakeError::BadMagic | HandshakeError::Unexpected(_) => true,
            HandshakeError::Codec(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// Our side of the handshake.
pub struct Local<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub secret: &'a [u8],
    pub max_frame: usize,
}

/// Computes the proof that `prover` knows `secret` for this transcript.
#[allow(clippy::too_many_arguments)]
pub fn proof(
    secret: &[u8],
    cluster: &str,
    dialer: &str,
    acceptor: &str,
    dialer_nonce: &[u8; NONCE_LEN],
    acceptor_nonce: &[u8; NONCE_LEN],
    prover: Role,
) -> [u8; 32] {
    transcript(secret, cluster, dialer, acceptor, dialer_nonce, acceptor_nonce, prover)
        .finalize()
        .into_bytes()
        .into()
}

fn transcript(
    secret: &[u8],
    cluster: &str,
    dialer: &str,
    acceptor: &str,
    dialer_nonce: &[u8; NONCE_LEN],
    acceptor_nonce: &[u8; NONCE_LEN],
    prover: Role,
) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(DOMAIN);
    // Length-prefix variable fields so ("ab","c") and ("a","bc") differ.
    for field in [cluster.as_bytes(), dialer.as_bytes(), acceptor.as_bytes()] {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac.update(dialer_nonce);
    mac.update(acceptor_nonce);
    mac.update(prover.tag());
    mac
}

/// Runs the handshake on a fresh connection. `accept_node` says whether a claimed peer id is
/// acceptable (configured); `expected` is the id a dialer meant to reach. Returns the peer id.
///
/// On refusal it tries to tell the peer why with a `Refused` frame, then returns the error;
/// the caller logs it and drops the connection. No timeout inside: wrap it.
pub async fn run<S, F>(
    stream: &mut S,
    local: &Local<'_>,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
) -> Result<String, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
{
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);

    let hello = Frame::Hello(Hello {
        cluster: local.cluster.to_string(),
        node: local.node.to_string(),
        nonce,
    });
    let mut first = proto::preamble().to_vec();
    first.extend(codec::encode_record(&hello, local.max_frame)?);
    stream.write_all(&first).await.map_err(CodecError::from)?;
    stream.flush().await.map_err(CodecError::from)?;

    let pre = codec::read_preamble(stream).await?;
    match proto::check_preamble(&pre) {
        PreambleCheck::Ok => {}
        PreambleCheck::BadMagic => return Err(HandshakeError::BadMagic),
        PreambleCheck::Version(got) => {
            return refuse(stream, local, HandshakeError::Version { got }).await;
        }
    }

    let peer = match next(stream, local).await? {
        Frame::Hello(h) => h,
        other => return Err(HandshakeError::Unexpected(other.kind())),
    };
    if peer.cluster != local.cluster {
        let e = HandshakeError::WrongCluster { got: peer.cluster };
        return refuse(stream, local, e).await;
    }
    if peer.node == local.node {
        return refuse(stream, local, HandshakeError::SelfConnect).await;
    }
    if let Some(exp) = expected {
        if peer.node != exp {
            let e = HandshakeError::UnexpectedNode {
                expected: exp.to_string(),
                got: peer.node,
            };
            return refuse(stream, local, e).await;
        }
    }
    if !accept_node(&peer.node) {
        let e = HandshakeError::UnknownNode { got: peer.node };
        return refuse(stream, local, e).await;
    }

    let (dialer, acceptor, dn, an) = match role {
        Role::Dialer => (local.node, peer.node.as_str(), &nonce, &peer.nonce),
        Role::Acceptor => (peer.node.as_str(), local.node, &peer.nonce, &nonce),
    };
    let mine = proof(local.secret, local.cluster, dialer, acceptor, dn, an, role);
    send(stream, local, &Frame::Proof { mac: mine }).await?;

    let theirs = match next(stream, local).await? {
        Frame::Proof { mac } => mac,
        other => return Err(HandshakeError::Unexpected(other.kind())),
    };
    let peer_role = match role {
        Role::Dialer => Role::Acceptor,
        Role::Acceptor => Role::Dialer,
    };
    // `verify_slice` compares in constant time.
    if transcript(local.secret, local.cluster, dialer, acceptor, dn, an, peer_role)
        .verify_slice(&theirs)
        .is_err()
    {
        return refuse(stream, local, HandshakeError::BadProof).await;
    }
    send(stream, local, &Frame::Welcome).await?;
    match next(stream, local).await? {
        Frame::Welcome => Ok(peer.node),
        other => Err(HandshakeError::Unexpected(other.kind())),
    }
}

/// Reads the next handshake frame, turning a `Refused` and a close into errors.
async fn next<S: AsyncRead + Unpin>(stream: &mut S, local: &Local<'_>) -> Result<Frame, HandshakeError> {
    match codec::read_frame(stream, local.max_frame).await? {
        None => Err(HandshakeError::Closed),
        Some(Frame::Refused { reason }) => Err(HandshakeError::PeerRefused(reason)),
        Some(f) => Ok(f),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, local: &Local<'_>, f: &Frame) -> Result<(), HandshakeError> {
    codec::write_frame(stream, f, local.max_frame).await?;
    stream.flush().await.map_err(CodecError::from)?;
    Ok(())
}

/// Best effort: tell the peer why, then fail with `err`.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    local: &Local<'_>,
    err: HandshakeError,
) -> Result<String, HandshakeError> {
    let reason = match &err {
        // Do not tell an unauthenticated stranger more than needed.
        HandshakeError::BadProof => "authentication failed".to_string(),
        other => other.to_string(),
    };
    let _ = send(stream, local, &Frame::Refused { reason }).await;
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local<'a>(cluster: &'a str, node: &'a str, secret: &'a [u8]) -> Local<'a> {
        Local {
            cluster,
            node,
            secret,
            max_frame: 4096,
        }
    }

    async fn pair(
        a: Local<'static>,
        b: Local<'static>,
        known_by_b: &'static [&'static str],
    ) -> (Result<String, HandshakeError>, Result<String, HandshakeError>) {
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let expected_b = b.node;
        let ta = tokio::spawn(async move { run(&mut sa, &a, Role::Dialer, Some(expected_b), |_| true).await });
        let tb = tokio::spawn(async move { run(&mut sb, &b, Role::Acceptor, None, |n| known_by_b.contains(&n)).await });
        (ta.await.unwrap(), tb.await.unwrap())
    }

    #[tokio::test]
    async fn good_handshake() {
        let (a, b) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        assert_eq!(a.unwrap(), "n2");
        assert_eq!(b.unwrap(), "n1");
    }

    #[tokio::test]
    async fn wrong_secret_refused_on_both_sides() {
        let (a, b) = pair(local("c", "n1", b"bad"), local("c", "n2", b"s"), &["n1"]).await;
        // Both sides verify the other's proof; each finds it wrong.
        assert!(matches!(
            a,
            Err(HandshakeError::BadProof) | Err(HandshakeError::PeerRefused(_))
        ));
        assert!(matches!(b, Err(HandshakeError::BadProof)));
        assert!(a.unwrap_err().is_auth_failure());
    }

    #[tokio::test]
    async fn wrong_cluster_refused() {
        let (a, b) = pair(local("x", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        assert!(matches!(b, Err(HandshakeError::WrongCluster { .. })));
        assert!(a.is_err());
    }

    #[tokio::test]
    async fn unknown_node_refused() {
        let (a, b) = pair(local("c", "n9", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        assert!(matches!(b, Err(HandshakeError::UnknownNode { .. })));
        // Refused, or the write of its proof failed because the acceptor hung up first.
        assert!(a.is_err());
    }

    #[tokio::test]
    async fn dialer_refuses_an_impostor_at_the_address() {
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let ta = tokio::spawn(async move {
            let l = local("c", "n1", b"s");
            run(&mut sa, &l, Role::Dialer, Some("n2"), |_| true).await
        });
        let tb = tokio::spawn(async move {
            let l = local("c", "n3", b"s");
            run(&mut sb, &l, Role::Acceptor, None, |_| true).await
        });
        assert!(matches!(ta.await.unwrap(), Err(HandshakeError::UnexpectedNode { .. })));
        assert!(tb.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn garbage_is_bad_magic() {
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let t = tokio::spawn(async move {
            let l = local("c", "n2", b"s");
            run(&mut sb, &l, Role::Acceptor, None, |_| true).await
        });
        sa.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let e = t.await.unwrap().unwrap_err();
        assert!(matches!(e, HandshakeError::BadMagic));
        assert!(e.is_bad_input());
    }

    #[tokio::test]
    async fn the_secret_never_travels() {
        use tokio::io::AsyncReadExt;
        const SECRET: &[u8] = b"a-secret-nobody-may-see-on-the-wire";
        let (mut a, a_mid) = tokio::io::duplex(4096);
        let (b_mid, mut b) = tokio::io::duplex(4096);
        let (mut a_r, mut a_w) = tokio::io::split(a_mid);
        let (mut b_r, mut b_w) = tokio::io::split(b_mid);
        // Relay both directions, recording every byte.
        let fwd = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(n) = a_r.read(&mut buf).await {
                if n == 0 || b_w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            seen
        });
        let back = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while let Ok(n) = b_r.read(&mut buf).await {
                if n == 0 || a_w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            seen
        });
        let ta = tokio::spawn(async move {
            let l = local("c", "n1", SECRET);
            let r = run(&mut a, &l, Role::Dialer, Some("n2"), |_| true).await;
            drop(a);
            r
        });
        let tb = tokio::spawn(async move {
            let l = local("c", "n2", SECRET);
            let r = run(&mut b, &l, Role::Acceptor, None, |_| true).await;
            drop(b);
            r
        });
        assert_eq!(ta.await.unwrap().unwrap(), "n2");
        assert_eq!(tb.await.unwrap().unwrap(), "n1");
        let mut wire = fwd.await.unwrap();
        wire.extend(back.await.unwrap());
        assert!(wire.len() > 2 * (6 + 32 + 32));
        assert!(!wire.windows(SECRET.len()).any(|w| w == SECRET));
        assert!(!wire.windows(8).any(|w| w == &SECRET[..8]));
    }

    #[test]
    fn proof_binds_every_field() {
        let n1 = [1u8; 32];
        let n2 = [2u8; 32];
        let base = proof(b"s", "c", "a", "b", &n1, &n2, Role::Dialer);
        assert_ne!(base, proof(b"t", "c", "a", "b", &n1, &n2, Role::Dialer));
        assert_ne!(base, proof(b"s", "d", "a", "b", &n1, &n2, Role::Dialer));
        assert_ne!(base, proof(b"s", "c", "b", "a", &n1, &n2, Role::Dialer));
        assert_ne!(base, proof(b"s", "c", "a", "b", &n2, &n1, Role::Dialer));
        assert_ne!(base, proof(b"s", "c", "a", "b", &n1, &n2, Role::Acceptor));
        assert_ne!(
            proof(b"s", "c", "ab", "c", &n1, &n2, Role::Dialer),
            proof(b"s", "ca", "b", "c", &n1, &n2, Role::Dialer)
        );
    }
}
