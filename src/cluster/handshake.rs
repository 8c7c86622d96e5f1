//! Mutual authentication of a new cluster connection, and the keys of its encrypted link.
//!
//! Owns: the handshake sequence, the prologue and the PSK derivation. Must not touch cluster
//! state: it gets a predicate saying which node ids are acceptable and returns the
//! authenticated peer id with the link's keys ([`Established`]).
//!
//! Sequence (both sides run it at once, on every new TCP connection):
//! 1. write preamble (`MLRM` + u16 version) and `Hello { cluster, node, nonce }` in clear;
//! 2. read the peer's preamble and `Hello`; refuse a wrong magic/version/cluster, an unknown
//!    or unexpected node id, or our own id (with a `Refused { reason }` frame, in clear, that
//!    a node of any version can read);
//! 3. run `Noise_NNpsk0_25519_ChaChaPoly_SHA256` (the dialer initiates) inside
//!    `Frame::Noise` records: `-> psk, e` then `<- e, ee`. The PSK is
//!    `HMAC-SHA256(secret, "mailroom-cluster-v2 psk" || cluster)`; the prologue binds the
//!    protocol version, the cluster name, both node ids in dialer/acceptor order and both
//!    nonces, so a side whose view of the `Hello`s differs, or that lacks the secret, fails to
//!    open the other's Noise message and refuses with "authentication failed";
//! 4. each side sends `Welcome` as its first encrypted frame and reads the peer's. Only then
//!    is the link up, so a side whose keys differ never believes it is connected.
//!
//! What authenticates a node id: only the shared secret. Any holder of the secret can claim
//! any configured id (as before: the secret is the cluster's membership credential); an
//! on-path attacker without it can neither complete a handshake nor alter the ids in one.
//! The secret and the PSK never travel; the ephemeral Diffie-Hellman makes the link keys
//! fresh per link (and secret even from a later thief of the secret, for links it only
//! recorded). A recorded handshake tells an offline guesser as much as before (one PSK-keyed
//! tag per handshake): choose a long random secret.

use std::fmt;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::{self, CodecError};
use super::link::SecureChannel;
use super::proto::{self, Frame, Hello, PreambleCheck, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Binds every derivation to this protocol version.
const DOMAIN: &[u8] = b"mailroom-cluster-v2";

/// The Noise protocol of the link. NN: no static keys (the nodes have none); psk0: both sides
/// must hold the cluster's PSK from the first message on.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_SHA256";

/// Largest handshake message of `NOISE_PARAMS` (32-byte ephemeral key + 16-byte tag), with room.
const NOISE_MSG_MAX: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// We opened the TCP connection (the Noise initiator).
    Dialer,
    /// We accepted it (the Noise responder).
    Acceptor,
}

/// Longest part of a name a peer claims (cluster, node id) that an error repeats: before it
/// proved the secret, a peer is anyone, and its `Hello` may carry 16 KiB of them, for every
/// log line and refusal that names it.
const SHOWN_NAME_MAX: usize = 64;

/// Longest part of a peer's `Refused` reason an error repeats (ours are under it).
pub(crate) const SHOWN_REASON_MAX: usize = 256;

/// `name` as an error shows it: at most [`SHOWN_NAME_MAX`] characters, then `…`
/// ([`shown_upto`]).
fn shown(name: &str) -> String {
    shown_upto(name, SHOWN_NAME_MAX)
}

/// What a peer sent, as an error (and so a log line) shows it: at most `max` characters, then
/// `…`, with control characters escaped: a peer that has not proved the secret is anyone, and
/// a newline of its own would start a log line it wrote.
pub(crate) fn shown_upto(text: &str, max: usize) -> String {
    let (kept, more) = match text.char_indices().nth(max) {
        Some((cut, _)) => (&text[..cut], "…"),
        None => (text, ""),
    };
    let mut out = String::with_capacity(kept.len() + more.len());
    for c in kept.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push_str(more);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a mailroom cluster peer (bad magic)")]
    BadMagic,
    #[error(
        "peer speaks cluster protocol version {got}, this node speaks {}: every node of a cluster must run the same protocol version",
        proto::PROTOCOL_VERSION
    )]
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
    #[error("a newer connection took this pending handshake's place (too many pending)")]
    Evicted,
    #[error("noise: {0}")]
    Noise(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl HandshakeError {
    /// A refusal for identity, secret or version reasons (the `auth_failures` counter).
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

    /// The peer speaks another protocol version (also counted in `version_mismatches`).
    pub fn is_version_mismatch(&self) -> bool {
        matches!(self, HandshakeError::Version { .. })
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

/// Our side of the handshake. Its `Debug` never shows the secret.
pub struct Local<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub secret: &'a [u8],
    pub max_frame: usize,
}

impl fmt::Debug for Local<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Local")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .field("secret", &"<redacted>")
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

/// A completed handshake: who the peer is, and the keys of the link to it.
#[derive(Debug)]
pub struct Established {
    pub peer: String,
    /// Both directions, each past the `Welcome` the handshake exchanged.
    pub channel: SecureChannel,
}

/// The 32-byte Noise PSK of a cluster: HMAC-SHA256 keyed with the secret (any length), over a
/// label and the cluster name, so two clusters sharing a secret still have distinct keys.
pub fn derive_psk(secret: &[u8], cluster: &str) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(DOMAIN);
    mac.update(b" psk");
    mac.update(&(cluster.len() as u32).to_be_bytes());
    mac.update(cluster.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The Noise prologue: what both sides saw in clear, which the handshake then authenticates.
/// Variable fields are length-prefixed so ("ab","c") and ("a","bc") differ.
pub fn prologue(
    cluster: &str,
    dialer: &str,
    acceptor: &str,
    dialer_nonce: &[u8; NONCE_LEN],
    acceptor_nonce: &[u8; NONCE_LEN],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(DOMAIN.len() + 12 + cluster.len() + dialer.len() + acceptor.len() + 2 * NONCE_LEN);
    p.extend_from_slice(DOMAIN);
    for field in [cluster.as_bytes(), dialer.as_bytes(), acceptor.as_bytes()] {
        p.extend_from_slice(&(field.len() as u32).to_be_bytes());
        p.extend_from_slice(field);
    }
    p.extend_from_slice(dialer_nonce);
    p.extend_from_slice(acceptor_nonce);
    p
}

fn noise_err(e: snow::Error) -> HandshakeError {
    HandshakeError::Noise(e.to_string())
}

/// Runs the handshake on a fresh connection. `accept_node` says whether a claimed peer id is
/// acceptable (configured); `expected` is the id a dialer meant to reach. Returns the peer id
/// and the link's keys: every later frame on `stream` must go through them (see `link.rs`).
///
/// On refusal it tries to tell the peer why with a `Refused` frame, then returns the error;
/// the caller logs it and drops the connection. No timeout inside: wrap it.
pub async fn run<S, F>(
    stream: &mut S,
    local: &Local<'_>,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
) -> Result<Established, HandshakeError>
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
        let e = HandshakeError::WrongCluster {
            got: shown(&peer.cluster),
        };
        return refuse(stream, local, e).await;
    }
    if peer.node == local.node {
        return refuse(stream, local, HandshakeError::SelfConnect).await;
    }
    if let Some(exp) = expected {
        if peer.node != exp {
            let e = HandshakeError::UnexpectedNode {
                expected: exp.to_string(),
                got: shown(&peer.node),
            };
            return refuse(stream, local, e).await;
        }
    }
    if !accept_node(&peer.node) {
        let e = HandshakeError::UnknownNode { got: shown(&peer.node) };
        return refuse(stream, local, e).await;
    }

    let (dialer, acceptor, dn, an) = match role {
        Role::Dialer => (local.node, peer.node.as_str(), &nonce, &peer.nonce),
        Role::Acceptor => (peer.node.as_str(), local.node, &peer.nonce, &nonce),
    };
    let prologue = prologue(local.cluster, dialer, acceptor, dn, an);
    let psk = zeroize::Zeroizing::new(derive_psk(local.secret, local.cluster));
    let builder = snow::Builder::new(NOISE_PARAMS.parse().map_err(noise_err)?)
        .prologue(&prologue)
        .psk(0, &psk[..]);
    let mut msg = [0u8; NOISE_MSG_MAX];
    let mut payload = [0u8; NOISE_MSG_MAX];
    let hs = match role {
        Role::Dialer => {
            let mut hs = builder.build_initiator().map_err(noise_err)?;
            let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
            send(stream, local, &Frame::Noise { msg: msg[..n].to_vec() }).await?;
            let theirs = match next(stream, local).await? {
                Frame::Noise { msg } => msg,
                other => return Err(HandshakeError::Unexpected(other.kind())),
            };
            if theirs.len() > NOISE_MSG_MAX || hs.read_message(&theirs, &mut payload).is_err() {
                return refuse(stream, local, HandshakeError::BadProof).await;
            }
            hs
        }
        Role::Acceptor => {
            let mut hs = builder.build_responder().map_err(noise_err)?;
            let theirs = match next(stream, local).await? {
                Frame::Noise { msg } => msg,
                other => return Err(HandshakeError::Unexpected(other.kind())),
            };
            if theirs.len() > NOISE_MSG_MAX || hs.read_message(&theirs, &mut payload).is_err() {
                return refuse(stream, local, HandshakeError::BadProof).await;
            }
            let n = hs.write_message(&[], &mut msg).map_err(noise_err)?;
            send(stream, local, &Frame::Noise { msg: msg[..n].to_vec() }).await?;
            hs
        }
    };
    let transport = hs.into_stateless_transport_mode().map_err(noise_err)?;
    let mut channel = SecureChannel::new(transport, local.max_frame);

    // Key confirmation: each side's first encrypted frame is `Welcome`.
    let (opener, sealer) = channel.parts();
    let rec = sealer.seal(&Frame::Welcome)?;
    stream.write_all(rec).await.map_err(CodecError::from)?;
    stream.flush().await.map_err(CodecError::from)?;
    match opener.read_frame(stream).await {
        Ok(Some(Frame::Welcome)) => Ok(Established {
            peer: peer.node,
            channel,
        }),
        Ok(Some(Frame::Refused { reason })) => Err(HandshakeError::PeerRefused(shown_upto(&reason, SHOWN_REASON_MAX))),
        Ok(Some(other)) => Err(HandshakeError::Unexpected(other.kind())),
        Ok(None) => Err(HandshakeError::Closed),
        // The peer holds other keys: it did not derive them from our handshake.
        Err(CodecError::Unauthentic) => Err(HandshakeError::BadProof),
        Err(e) => Err(e.into()),
    }
}

/// Largest frame read before the peer is authenticated: a `Hello` (cluster name, node id, a
/// nonce), a Noise message or a `Refused` reason is well under it. A link's `max_frame` (up to
/// 8 MiB) applies only once the peer proved it holds the secret.
pub const HANDSHAKE_FRAME_MAX: usize = 16 * 1024;

/// Reads the next handshake frame, turning a `Refused` and a close into errors.
async fn next<S: AsyncRead + Unpin>(stream: &mut S, local: &Local<'_>) -> Result<Frame, HandshakeError> {
    match codec::read_frame(stream, local.max_frame.min(HANDSHAKE_FRAME_MAX)).await? {
        None => Err(HandshakeError::Closed),
        Some(Frame::Refused { reason }) => Err(HandshakeError::PeerRefused(shown_upto(&reason, SHOWN_REASON_MAX))),
        Some(f) => Ok(f),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, local: &Local<'_>, f: &Frame) -> Result<(), HandshakeError> {
    codec::write_frame(stream, f, local.max_frame).await?;
    stream.flush().await.map_err(CodecError::from)?;
    Ok(())
}

/// Best effort: tell the peer why, then fail with `err`.
async fn refuse<S: AsyncWrite + Unpin, T>(
    stream: &mut S,
    local: &Local<'_>,
    err: HandshakeError,
) -> Result<T, HandshakeError> {
    let reason = match &err {
        // Do not tell an unauthenticated stranger more than needed.
        HandshakeError::BadProof => "authentication failed".to_string(),
        // Worded for the reader: the old node logs it as "peer refused us: ...".
        HandshakeError::Version { got } => format!(
            "cluster protocol version mismatch: this node speaks {}, you speak {got}; every node of a cluster must run the same protocol version",
            proto::PROTOCOL_VERSION
        ),
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
    ) -> (Result<Established, HandshakeError>, Result<Established, HandshakeError>) {
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let expected_b = b.node;
        let ta = tokio::spawn(async move { run(&mut sa, &a, Role::Dialer, Some(expected_b), |_| true).await });
        let tb = tokio::spawn(async move { run(&mut sb, &b, Role::Acceptor, None, |n| known_by_b.contains(&n)).await });
        (ta.await.unwrap(), tb.await.unwrap())
    }

    /// A stranger's `Refused` reaches the logs cut short, on one line: before, 16 KiB of its
    /// text, newlines included, went into the node's warning as it was sent.
    #[tokio::test]
    async fn a_strangers_refusal_is_shown_short_and_on_one_line() {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let me = Local {
            max_frame: HANDSHAKE_FRAME_MAX,
            ..local("c", "n1", b"s")
        };
        let dial = tokio::spawn(async move { run(&mut ours, &me, Role::Dialer, Some("n2"), |_| true).await });
        let reason = format!("x\nFORGED {}", "A".repeat(16_000));
        codec::write_preamble(&mut theirs).await.unwrap();
        codec::write_frame(&mut theirs, &Frame::Refused { reason }, HANDSHAKE_FRAME_MAX)
            .await
            .unwrap();
        let Err(HandshakeError::PeerRefused(shown)) = dial.await.unwrap() else {
            panic!("refused");
        };
        assert!(shown.starts_with("x\\nFORGED AAA"), "{shown:.80}");
        assert!(!shown.contains('\n'));
        // The newline shown as two characters, then `…`.
        assert_eq!(shown.chars().count(), SHOWN_REASON_MAX + 2, "cut, then …");
    }

    #[tokio::test]
    async fn good_handshake() {
        let (a, b) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        assert_eq!(a.unwrap().peer, "n2");
        assert_eq!(b.unwrap().peer, "n1");
    }

    #[tokio::test]
    async fn both_sides_hold_the_same_keys_one_per_direction() {
        let (a, b) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        let (mut a_open, mut a_seal) = a.unwrap().channel.split();
        let (mut b_open, mut b_seal) = b.unwrap().channel.split();
        let to_b = a_seal.seal(&Frame::Queued { conn: "x".into() }).unwrap().to_vec();
        let to_a = b_seal.seal(&Frame::Queued { conn: "x".into() }).unwrap().to_vec();
        // Same plaintext, same counter, other direction: other bytes.
        assert_ne!(to_a, to_b);
        let got = b_open.read_frame(&mut &to_b[..]).await.unwrap();
        assert_eq!(got, Some(Frame::Queued { conn: "x".into() }));
        let got = a_open.read_frame(&mut &to_a[..]).await.unwrap();
        assert_eq!(got, Some(Frame::Queued { conn: "x".into() }));
        // A record sent one way cannot be reflected back the other way.
        let (mut a_open2, _) = {
            let (a, _b) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
            a.unwrap().channel.split()
        };
        assert!(a_open2.read_frame(&mut &to_b[..]).await.is_err());
    }

    #[tokio::test]
    async fn every_link_has_fresh_keys() {
        let seal_one = |e: Established| {
            let (_, mut s) = e.channel.split();
            s.seal(&Frame::Leave).unwrap().to_vec()
        };
        let (a1, _) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        let (a2, _) = pair(local("c", "n1", b"s"), local("c", "n2", b"s"), &["n1"]).await;
        assert_ne!(seal_one(a1.unwrap()), seal_one(a2.unwrap()));
    }

    #[tokio::test]
    async fn debug_output_hides_the_secret() {
        let l = local("c", "n1", b"hunter2-hunter2");
        assert!(!format!("{l:?}").contains("hunter2"));
        let psk = derive_psk(b"hunter2-hunter2", "c");
        let (a, _) = pair(
            local("c", "n1", b"hunter2-hunter2"),
            local("c", "n2", b"hunter2-hunter2"),
            &["n1"],
        )
        .await;
        let dbg = format!("{:?}", a.unwrap());
        assert!(dbg.contains("n2") && dbg.contains("sent: 1"), "{dbg}");
        assert!(!dbg.contains("hunter2") && !dbg.contains(&hex::encode(psk)), "{dbg}");
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
        assert_eq!(ta.await.unwrap().unwrap().peer, "n2");
        assert_eq!(tb.await.unwrap().unwrap().peer, "n1");
        let mut wire = fwd.await.unwrap();
        wire.extend(back.await.unwrap());
        assert!(wire.len() > 2 * (6 + 32 + 32));
        assert!(!wire.windows(SECRET.len()).any(|w| w == SECRET));
        assert!(!wire.windows(8).any(|w| w == &SECRET[..8]));
        let psk = derive_psk(SECRET, "c");
        assert!(!wire.windows(8).any(|w| w == &psk[..8]));
    }

    #[test]
    fn prologue_and_psk_bind_every_field() {
        let n1 = [1u8; 32];
        let n2 = [2u8; 32];
        let base = prologue("c", "a", "b", &n1, &n2);
        assert_ne!(base, prologue("d", "a", "b", &n1, &n2));
        assert_ne!(base, prologue("c", "b", "a", &n1, &n2));
        assert_ne!(base, prologue("c", "a", "b", &n2, &n1));
        assert_ne!(prologue("c", "ab", "c", &n1, &n2), prologue("ca", "b", "c", &n1, &n2));
        assert_ne!(derive_psk(b"s", "c"), derive_psk(b"t", "c"));
        assert_ne!(derive_psk(b"s", "c"), derive_psk(b"s", "d"));
    }
}
