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
//!    `Frame::Noise` records: `-> psk, e` then `<- e, ee`. The PSK comes from the secret
//!    through [`ClusterKeys`] (Argon2id, then HMAC-SHA256); the prologue binds the
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
//! recorded). A recorded handshake still lets an offline guesser test guesses of the secret
//! (one PSK-keyed tag per handshake), but each guess costs an Argon2id evaluation (19 MiB,
//! two passes) rather than one HMAC: billions a second become tens per core. A short or
//! well-known secret is still found (`Config::warnings` says so): choose a long random one.

use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use super::codec::{self, CodecError};
use super::link::SecureChannel;
use super::proto::{self, Frame, Hello, PreambleCheck, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

/// The prologue's label (unchanged since version 2: the version itself is in the preamble,
/// which both sides check before the handshake).
const DOMAIN: &[u8] = b"mailroom-cluster-v2";

/// The Argon2id salt's label (the cluster name follows it, length-prefixed), and the labels of
/// the keys expanded from the master key: [`ClusterKeys`].
const MASTER_LABEL: &[u8] = b"mailroom-cluster-v4 master key";
const PSK_LABEL: &[u8] = b"mailroom-cluster-v4 noise psk";
const ADMIN_READ_LABEL: &[u8] = b"mailroom-cluster-v4 admin read";

/// Argon2id's cost: OWASP's recommendation (m = 19 MiB, t = 2, p = 1). Tens of milliseconds,
/// paid once per (secret, cluster) by a node: at start and when a reload changes the secret.
const ARGON2_M_KIB: u32 = 19 * 1024;
const ARGON2_T: u32 = 2;
const ARGON2_P: u32 = 1;

/// The keys a cluster's secret yields, from one master key: `Argon2id(secret, salt =
/// MASTER_LABEL || u32 len || cluster)`, stretched so that a recorded Noise message or an
/// `x-mailroom-peer` header lets an offline guesser test a few dozen guesses a second per
/// core, not billions; then one HMAC-SHA256 of it per key, each under its own label. The
/// master key is zeroized once the keys are expanded; the keys when the last holder drops
/// them. `Debug` shows none of them.
pub struct ClusterKeys {
    psk: Zeroizing<[u8; 32]>,
    admin_read: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKeys(<redacted>)")
    }
}

impl ClusterKeys {
    /// Derives the keys of `cluster` from `secret`: an Argon2id evaluation (tens of ms, 19 MiB),
    /// so not on an async worker, and once, not per handshake or request: a node's state holds
    /// the keys of its secret (`peer::Shared::secret`), derived when its cluster starts or a
    /// reload changes the secret, never on a remote party's behalf.
    pub fn derive(secret: &[u8], cluster: &str) -> ClusterKeys {
        #[cfg(test)]
        {
            let mut d = DERIVATIONS.lock().unwrap_or_else(|e| e.into_inner());
            match d.iter_mut().find(|(c, _)| c == cluster) {
                Some((_, n)) => *n += 1,
                None => d.push((cluster.to_string(), 1)),
            }
        }
        let mut salt = Vec::with_capacity(MASTER_LABEL.len() + 4 + cluster.len());
        salt.extend_from_slice(MASTER_LABEL);
        salt.extend_from_slice(&(cluster.len() as u32).to_be_bytes());
        salt.extend_from_slice(cluster.as_bytes());
        // Constants within Argon2's ranges; the salt is longer than its 8-byte minimum and the
        // secret and salt shorter than its 4 GiB maximum (a config file's string).
        let params = argon2::Params::new(ARGON2_M_KIB, ARGON2_T, ARGON2_P, Some(32)).expect("valid Argon2 parameters");
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params.clone());
        // Its working memory holds what the master key is computed from: zeroized after.
        let mut memory = Zeroizing::new(vec![argon2::Block::default(); params.block_count()]);
        let mut master = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into_with_memory(secret, &salt, &mut master[..], memory.as_mut_slice())
            .expect("Argon2 takes this secret and salt");
        ClusterKeys {
            psk: expand(&master, PSK_LABEL),
            admin_read: expand(&master, ADMIN_READ_LABEL),
        }
    }

    /// The Noise PSK of the cluster's links.
    pub fn psk(&self) -> &[u8; 32] {
        &self.psk
    }

    /// The key of the signatures on peers' admin reads ([`super::admin_read`]).
    pub fn admin_read(&self) -> &[u8; 32] {
        &self.admin_read
    }
}

fn expand(master: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(master).expect("HMAC takes any key length");
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// Derivations of each cluster name so far (tests: a handshake or an admin read of a node
/// derives nothing, whoever dials it and whenever its secret is reloaded).
#[cfg(test)]
static DERIVATIONS: std::sync::Mutex<Vec<(String, usize)>> = std::sync::Mutex::new(Vec::new());

/// How many times keys of `cluster` were derived in this process ([`ClusterKeys::derive`]).
#[cfg(test)]
pub(crate) fn derivations(cluster: &str) -> usize {
    let d = DERIVATIONS.lock().unwrap_or_else(|e| e.into_inner());
    d.iter().find(|(c, _)| c == cluster).map_or(0, |(_, n)| *n)
}

/// [`ClusterKeys::derive`] on the blocking pool, for async code: a node's when its cluster
/// starts, a program's (`Local::secret`, [`run`]) for each handshake.
pub async fn derive_off_thread(secret: &[u8], cluster: &str) -> std::io::Result<Arc<ClusterKeys>> {
    let (secret, cluster) = (Zeroizing::new(secret.to_vec()), cluster.to_string());
    tokio::task::spawn_blocking(move || Arc::new(ClusterKeys::derive(&secret, &cluster)))
        .await
        .map_err(std::io::Error::other)
}

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
///
/// The keys of `local.secret` are derived for this call, once the peer's `Hello` is accepted
/// (Argon2id, on the blocking pool): for programs and tests. A node holds its keys and calls
/// [`run_with_keys`].
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
    run_keyed(stream, local, None, role, expected, accept_node).await
}

/// [`run`] with `keys`, those of `local.secret` derived beforehand: derives nothing.
pub async fn run_with_keys<S, F>(
    stream: &mut S,
    local: &Local<'_>,
    keys: &ClusterKeys,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
{
    run_keyed(stream, local, Some(keys.psk()), role, expected, accept_node).await
}

/// [`run`], with the PSK `psk` in place of the one `local.secret` yields when given (a node's,
/// [`run_with_keys`]; tests of a peer whose keys come from the same secret another way).
async fn run_keyed<S, F>(
    stream: &mut S,
    local: &Local<'_>,
    psk: Option<&[u8; 32]>,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
{
    run_noted(stream, local, psk, role, expected, accept_node, || {}).await
}

/// [`run_with_keys`] as the acceptor, calling `proven` once the dialer's first Noise message
/// opened: the dialer holds the secret (a recorded message does not open, as the prologue
/// binds this side's fresh nonce). The accept loop gives a pending handshake standing then.
pub(crate) async fn accept_with_keys<S, F, P>(
    stream: &mut S,
    local: &Local<'_>,
    keys: &ClusterKeys,
    accept_node: F,
    proven: P,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
    P: FnOnce(),
{
    let psk = Some(keys.psk());
    run_noted(stream, local, psk, Role::Acceptor, None, accept_node, proven).await
}

/// [`run_keyed`], calling `proven` as [`accept_with_keys`] says (an acceptor only).
async fn run_noted<S, F, P>(
    stream: &mut S,
    local: &Local<'_>,
    psk: Option<&[u8; 32]>,
    role: Role,
    expected: Option<&str>,
    accept_node: F,
    proven: P,
) -> Result<Established, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(&str) -> bool,
    P: FnOnce(),
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
    // A node's keys were derived when its cluster started (or its secret was reloaded). A
    // program's (`link::open`) are derived for this handshake, off this thread.
    let keys;
    let psk = match psk {
        Some(psk) => psk,
        None => {
            keys = derive_off_thread(local.secret, local.cluster)
                .await
                .map_err(|e| HandshakeError::Noise(format!("deriving the cluster keys: {e}")))?;
            keys.psk()
        }
    };
    let builder = snow::Builder::new(NOISE_PARAMS.parse().map_err(noise_err)?)
        .prologue(&prologue)
        .psk(0, psk);
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
            proven();
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
        let psk = *ClusterKeys::derive(b"hunter2-hunter2", "c").psk();
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
        let psk = *ClusterKeys::derive(SECRET, "c").psk();
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
    }

    /// The PSK of protocol version 3: one HMAC of the secret, which a recorded handshake let
    /// an offline guesser test at billions of guesses a second.
    fn v3_psk(secret: &[u8], cluster: &str) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret).unwrap();
        mac.update(b"mailroom-cluster-v2 psk");
        mac.update(&(cluster.len() as u32).to_be_bytes());
        mac.update(cluster.as_bytes());
        mac.finalize().into_bytes().into()
    }

    #[test]
    fn the_keys_are_stretched_and_bound_to_secret_and_cluster() {
        let k = ClusterKeys::derive(b"s", "c");
        // Pinned: a change to the key schedule is a change of protocol version. Checked against
        // the reference implementation (libargon2 through Python's argon2-cffi, then hmac).
        assert_eq!(
            hex::encode(k.psk()),
            "04df1b2c66013a6a273e787b6d34c769666d62853165c52d67a541119600668a"
        );
        assert_ne!(k.psk(), ClusterKeys::derive(b"t", "c").psk(), "another secret");
        assert_ne!(k.psk(), ClusterKeys::derive(b"s", "d").psk(), "another cluster");
        assert_ne!(
            ClusterKeys::derive(b"s", "ab").psk(),
            ClusterKeys::derive(b"sa", "b").psk(),
            "the cluster name is length-prefixed"
        );
        assert_ne!(k.psk(), &v3_psk(b"s", "c"), "not version 3's unstretched PSK");
        assert_ne!(k.psk(), k.admin_read(), "one key per use");
        assert_eq!(
            ClusterKeys::derive(b"s", "c").psk(),
            k.psk(),
            "the same secret, the same keys"
        );
        assert_eq!(format!("{k:?}"), "ClusterKeys(<redacted>)");
    }

    /// A peer holding the same secret whose keys come from it another way (a version-3 node's
    /// unstretched PSK, past the preamble) is refused: both sides fail each other's proof.
    #[tokio::test]
    async fn a_peer_with_the_v3_psk_of_the_same_secret_cannot_link() {
        let (mut sa, mut sb) = tokio::io::duplex(4096);
        let old = v3_psk(b"s", "c");
        let ta = tokio::spawn(async move {
            let l = local("c", "n1", b"s");
            run_keyed(&mut sa, &l, Some(&old), Role::Dialer, Some("n2"), |_| true).await
        });
        let tb = tokio::spawn(async move {
            let l = local("c", "n2", b"s");
            run(&mut sb, &l, Role::Acceptor, None, |n| n == "n1").await
        });
        assert!(matches!(tb.await.unwrap(), Err(HandshakeError::BadProof)));
        assert!(matches!(
            ta.await.unwrap(),
            Err(HandshakeError::BadProof) | Err(HandshakeError::PeerRefused(_))
        ));
    }
}
