//! Wire types of the cluster peer protocol, and the only place that knows bincode.
//!
//! Owns: the [`Frame`] enum, the connection preamble ([`MAGIC`], [`PROTOCOL_VERSION`]) and the
//! bytes <-> frame conversion ([`encode`], [`decode`]). Must not touch sockets, clocks or any
//! cluster state: framing lives in `codec.rs`, logic in `directory.rs` / `membership.rs`.
//!
//! Compatibility rule: the encoding is bincode 2 "standard" (varint integers, enum variants as
//! varint indexes). Variants are only ever appended, never reordered or removed, and any change
//! that alters the bytes of an existing frame bumps [`PROTOCOL_VERSION`]. The fixed-bytes tests
//! below fail when the format drifts, which is the point: update them only together with the
//! version.

use serde::{Deserialize, Serialize};

/// First four bytes every side writes on a new connection, before any frame.
pub const MAGIC: [u8; 4] = *b"MLRM";

/// Version of this wire format, written as u16 big-endian right after [`MAGIC`].
///
/// History: 1 = HMAC challenge-response, then plain frames; 2 = Noise NNpsk0 handshake, then
/// every frame encrypted and authenticated (`link.rs`); 3 = `Deliver` (messages handed to the
/// node of their wallet's session, sent for every such forward: a version-2 node would close
/// the link on each); 4 = the PSK from the secret stretched with Argon2id
/// (`handshake::ClusterKeys`; a version-3 node's PSK is one HMAC of the secret, so the two
/// could not link anyway). A node refuses any other version with a `Refused` frame naming both
/// versions.
pub const PROTOCOL_VERSION: u16 = 4;

/// The raw preamble: magic + big-endian version. Kept outside bincode so a peer speaking a
/// different format version is still recognised and refused with a clear reason.
pub const PREAMBLE_LEN: usize = 6;

/// Hard ceiling for the configurable frame size (`ClusterConfig::max_frame` is clamped to it).
pub const MAX_FRAME_CEILING: usize = 8 * 1024 * 1024;

/// bincode's own allocation/read budget while decoding one frame. It counts in-memory sizes,
/// which exceed encoded sizes (a varint u64 is claimed as 8 bytes), hence the headroom over
/// [`MAX_FRAME_CEILING`]; the input slice itself is already capped by the codec. A frame is
/// decoded under the smallest of [`decode`]'s tiers that fits its length.
const DECODE_LIMIT: usize = 64 * 1024 * 1024;

/// Length of the handshake nonce.
pub const NONCE_LEN: usize = 32;

/// Longest connection id a claim (`Own`, `Disown`, a `Resync` entry) may carry; a receiver
/// refuses longer ones. A node's connection ids are UUIDs (36 bytes); without a bound, the
/// claim cap (a count) would let one peer fill this node's directory, which keeps each id
/// twice, with ids of almost a whole frame.
pub const MAX_CONN_ID: usize = 128;

/// One session claim as carried in a resync: `conn` is held by the sending node at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub conn: String,
    pub epoch: u64,
}

/// First frame of the handshake, sent by both sides right after the preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: String,
    pub node: String,
    pub nonce: [u8; NONCE_LEN],
}

/// Everything that travels on a cluster link after the preamble: `Hello`, `Noise` and
/// `Refused` in clear during the handshake, every other frame inside the encrypted link.
///
/// Frames after the handshake carry no node id: the sender is always the authenticated peer
/// at the other end of the link, so a node can only ever speak for itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Handshake step 1 (both directions).
    Hello(Hello),
    /// Version 1's HMAC proof. Retired in version 2 (never sent, refused if received); kept so
    /// the variants after it keep their indexes.
    Proof { mac: [u8; 32] },
    /// The first encrypted frame each side sends: it derived the same keys; the link is up.
    Welcome,
    /// Sent before closing a connection that is refused (handshake or duplicate link).
    Refused { reason: String },
    /// Heartbeat. `t` is opaque to the receiver (the sender's clock, for RTT).
    Ping { t: u64 },
    /// Heartbeat answer, echoing `t`.
    Pong { t: u64 },
    /// The sender now holds a live session of `conn`, at `epoch`.
    Own { conn: String, epoch: u64 },
    /// The sender no longer holds the session of `conn` it announced at `epoch`.
    Disown { conn: String, epoch: u64 },
    /// One chunk of the sender's full set of claims; on `last`, the receiver replaces every
    /// claim it knew from the sender with the union of the chunks.
    Resync { claims: Vec<Claim>, last: bool },
    /// A message was queued for `conn`, whose session the receiver holds: wake it up.
    Queued { conn: String },
    /// The sender leaves the cluster gracefully: drop its claims now.
    Leave,
    /// One Noise handshake message (see `handshake.rs`), in clear.
    Noise { msg: Vec<u8> },
    /// An operator removed `conn` (or revoked its mediation): close every live session of it
    /// the receiver holds, telling the wallet `reason`. Sent to every peer, not only the
    /// owner the sender knows of, so a directory out of date misses none.
    CloseSessions { conn: String, reason: String },
    /// `conn` no longer holds the routing `keys` (every key it held, when `keys` is empty: the
    /// connection was removed): forget cached routes of them. Only a cache hint, sent to every
    /// peer: the store stays the truth, and a forward checks its route when it queues.
    RoutesChanged { conn: String, keys: Vec<String> },
    /// Messages queued for `conn`, whose live session the receiver holds, already leased to
    /// the receiver's hand-off owner: write them to that session (no lease, no store read),
    /// or release them when it has none. The sender releases a frame the link took but the
    /// peer did not confirm (a pong to a later ping) when the link ends (`peer::Unconfirmed`).
    Deliver { conn: String, msgs: Vec<HandedMsg> },
}

/// One message of a [`Frame::Deliver`]: as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedMsg {
    pub id: i64,
    pub recipient_key: String,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
}

/// Bytes a [`Frame::Deliver`] adds to what its messages carry (payloads and recipient keys):
/// ids, times and lengths of up to 16 messages, the connection id. A forward is leased to its
/// session's node only when those fit `max_frame` with it ([`crate::cluster::ClusterHandle::holder`]);
/// the frame itself is measured before it is queued.
pub const DELIVER_OVERHEAD: usize = 4096;

/// At most what one [`HandedMsg`] adds to a [`Frame::Deliver`] besides its payload and
/// recipient key: its id, its receipt time and the two lengths, varints of at most 9 bytes.
pub const HANDED_MSG_FIELDS: usize = 4 * 9;

/// At most the encoded length of a [`Frame::Deliver`] of `msgs` messages that carry `carried`
/// bytes (payloads and recipient keys), whatever their number: hand-offs are joined into one
/// frame only within `max_frame` by this measure (`session::handing`).
pub fn deliver_len_at_most(msgs: usize, carried: usize) -> usize {
    carried
        .saturating_add(DELIVER_OVERHEAD)
        .saturating_add(msgs.saturating_mul(HANDED_MSG_FIELDS))
}

impl Frame {
    /// Short name for logs and counters, never the payload (conn ids are not secrets, but
    /// logs should not grow with the size of a resync).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Proof { .. } => "proof",
            Frame::Welcome => "welcome",
            Frame::Refused { .. } => "refused",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Own { .. } => "own",
            Frame::Disown { .. } => "disown",
            Frame::Resync { .. } => "resync",
            Frame::Queued { .. } => "queued",
            Frame::Leave => "leave",
            Frame::Noise { .. } => "noise",
            Frame::CloseSessions { .. } => "close-sessions",
            Frame::RoutesChanged { .. } => "routes-changed",
            Frame::Deliver { .. } => "deliver",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("frame could not be encoded: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes a frame. Fails only for frames the format cannot represent, which none of ours are;
/// callers still get an error instead of a panic.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    bincode::serde::encode_to_vec(frame, config()).map_err(|e| ProtoError::Encode(e.to_string()))
}

/// The length of [`encode`]'s output, without building it.
pub fn encoded_len(frame: &Frame) -> Result<usize, ProtoError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(frame, &mut size, config()).map_err(|e| ProtoError::Encode(e.to_string()))?;
    Ok(size.bytes_written)
}

/// Decodes exactly one frame from `bytes`; any leftover byte is an error (a frame is the whole
/// payload of one length-prefixed record).
///
/// bincode allocates a string or byte buffer of the length the input claims once that length
/// is within its limit, before it finds the input too short for it: under one 64 MiB limit,
/// six bytes from a stranger at the cluster port (a `Hello` whose name claims 63 MiB) had the
/// node allocate and zero 63 MiB. Nothing a frame of `n` bytes holds claims more than `8 n`
/// (a one-byte varint is claimed as its 8-byte integer), so each frame is decoded under the
/// first limit of 8 times a tier that its length fits.
pub fn decode(bytes: &[u8]) -> Result<Frame, ProtoError> {
    const KIB: usize = 1024;
    match bytes.len() {
        n if n <= KIB => decode_under::<{ 8 * KIB }>(bytes),
        n if n <= 16 * KIB => decode_under::<{ 128 * KIB }>(bytes),
        n if n <= 256 * KIB => decode_under::<{ 2 * KIB * KIB }>(bytes),
        _ => decode_under::<DECODE_LIMIT>(bytes),
    }
}

fn decode_under<const LIMIT: usize>(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(bytes, config).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(ProtoError::TrailingBytes(bytes.len() - used));
    }
    Ok(frame)
}

/// The 6-byte preamble this build writes.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let v = PROTOCOL_VERSION.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
}

/// What a received preamble says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreambleCheck {
    Ok,
    BadMagic,
    Version(u16),
}

pub fn check_preamble(p: &[u8; PREAMBLE_LEN]) -> PreambleCheck {
    if p[..4] != MAGIC {
        return PreambleCheck::BadMagic;
    }
    let v = u16::from_be_bytes([p[4], p[5]]);
    if v == PROTOCOL_VERSION {
        PreambleCheck::Ok
    } else {
        PreambleCheck::Version(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(f: &Frame) -> Vec<u8> {
        encode(f).expect("encodable")
    }

    // Fixed bytes: these pin the wire format of PROTOCOL_VERSION 4. If one fails, the format
    // changed: bump PROTOCOL_VERSION and update the vectors deliberately.
    #[test]
    fn preamble_bytes() {
        assert_eq!(preamble(), [b'M', b'L', b'R', b'M', 0, 4]);
        assert_eq!(check_preamble(&preamble()), PreambleCheck::Ok);
        assert_eq!(check_preamble(b"GET / "), PreambleCheck::BadMagic);
        // A version-1 node (plain frames after an HMAC handshake) is refused, not misread.
        assert_eq!(
            check_preamble(&[b'M', b'L', b'R', b'M', 0, 1]),
            PreambleCheck::Version(1)
        );
        // A version-2 node (no `Deliver`) is refused too.
        assert_eq!(
            check_preamble(&[b'M', b'L', b'R', b'M', 0, 2]),
            PreambleCheck::Version(2)
        );
        // A version-3 node (its PSK one HMAC of the secret), and a later one.
        assert_eq!(
            check_preamble(&[b'M', b'L', b'R', b'M', 0, 3]),
            PreambleCheck::Version(3)
        );
        assert_eq!(
            check_preamble(&[b'M', b'L', b'R', b'M', 0, 5]),
            PreambleCheck::Version(5)
        );
    }

    #[test]
    fn fixed_bytes_hello() {
        let f = Frame::Hello(Hello {
            cluster: "c".into(),
            node: "n1".into(),
            nonce: [7; 32],
        });
        let mut want = vec![0u8, 1, b'c', 2, b'n', b'1'];
        want.extend_from_slice(&[7; 32]);
        assert_eq!(bytes(&f), want);
    }

    #[test]
    fn fixed_bytes_small_frames() {
        assert_eq!(bytes(&Frame::Proof { mac: [0xab; 32] })[..2], [1, 0xab]);
        assert_eq!(bytes(&Frame::Proof { mac: [0xab; 32] }).len(), 33);
        assert_eq!(bytes(&Frame::Refused { reason: "no".into() }), vec![3, 2, b'n', b'o']);
        assert_eq!(bytes(&Frame::Ping { t: 5 }), vec![4, 5]);
        // varint: values >= 251 take a marker byte (251 = u16) + little-endian payload
        assert_eq!(bytes(&Frame::Pong { t: 300 }), vec![5, 251, 0x2c, 0x01]);
        assert_eq!(bytes(&Frame::Leave), vec![10]);
        assert_eq!(bytes(&Frame::Noise { msg: vec![1, 2] }), vec![11, 2, 1, 2]);
        assert_eq!(bytes(&Frame::Welcome), vec![2]);
    }

    #[test]
    fn fixed_bytes_directory_frames() {
        let epoch = (1_700_000_000_000u64 << 16) | 3;
        let mut own = vec![6u8, 2, b'c', b'1', 253];
        own.extend_from_slice(&epoch.to_le_bytes());
        assert_eq!(
            bytes(&Frame::Own {
                conn: "c1".into(),
                epoch
            }),
            own
        );
        assert_eq!(
            bytes(&Frame::Disown {
                conn: "c1".into(),
                epoch: 1
            }),
            vec![7, 2, b'c', b'1', 1]
        );
        assert_eq!(
            bytes(&Frame::Resync {
                claims: vec![Claim {
                    conn: "a".into(),
                    epoch: 2
                }],
                last: true
            }),
            vec![8, 1, 1, b'a', 2, 1]
        );
        assert_eq!(bytes(&Frame::Queued { conn: "xy".into() }), vec![9, 2, b'x', b'y']);
    }

    #[test]
    fn fixed_bytes_routes_changed() {
        // Appended after CloseSessions (index 12): earlier frames keep their bytes.
        assert_eq!(
            bytes(&Frame::RoutesChanged {
                conn: "c".into(),
                keys: vec!["k1".into(), "k".into()]
            }),
            vec![13, 1, b'c', 2, 2, b'k', b'1', 1, b'k']
        );
        assert_eq!(
            bytes(&Frame::RoutesChanged {
                conn: "c".into(),
                keys: vec![]
            }),
            vec![13, 1, b'c', 0]
        );
        // Appended after RoutesChanged: index 14; i64s are zigzag varints (1 -> 2, 2 -> 4).
        assert_eq!(
            bytes(&Frame::Deliver {
                conn: "c".into(),
                msgs: vec![HandedMsg {
                    id: 1,
                    recipient_key: "k".into(),
                    payload: vec![7],
                    received_at_ms: 2,
                }]
            }),
            vec![14, 1, b'c', 1, 2, 1, b'k', 1, 7, 4]
        );
    }

    /// The measure hand-offs are joined by is never below the frame's own length, however many
    /// messages and whatever their ids, times and sizes.
    #[test]
    fn deliver_len_at_most_bounds_the_encoded_frame() {
        for (n, size) in [(1, 0), (16, 70_000), (1_000, 0), (1_000, 300)] {
            let msgs: Vec<HandedMsg> = (0..n)
                .map(|i| HandedMsg {
                    id: i64::MAX - i as i64,
                    recipient_key: "k".repeat(size / 2 + 1),
                    payload: vec![0; size],
                    received_at_ms: i64::MIN,
                })
                .collect();
            let carried = msgs.iter().map(|m| m.payload.len() + m.recipient_key.len()).sum();
            let frame = Frame::Deliver {
                conn: "c".repeat(64),
                msgs,
            };
            let len = encoded_len(&frame).unwrap();
            assert!(len <= deliver_len_at_most(n, carried), "{n} messages of {size}: {len}");
        }
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut b = bytes(&Frame::Leave);
        b.push(0);
        assert!(matches!(decode(&b), Err(ProtoError::TrailingBytes(1))));
    }

    #[test]
    fn unknown_variant_and_truncation_refused() {
        assert!(decode(&[12]).is_err());
        assert!(decode(&[11]).is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&[6, 9, b'a']).is_err());
    }

    #[test]
    fn huge_claimed_lengths_refused_without_allocating() {
        // Queued { conn } claiming a u64::MAX-long string.
        let mut b = vec![9u8, 255];
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&b).is_err());
        // Resync claiming 2^32 claims with almost no bytes behind it.
        let mut b = vec![8u8, 252];
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        assert!(decode(&b).is_err());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9:_./-]{0,40}").expect("valid regex")
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (arb_string(), arb_string(), any::<[u8; 32]>())
                .prop_map(|(cluster, node, nonce)| { Frame::Hello(Hello { cluster, node, nonce }) }),
            any::<[u8; 32]>().prop_map(|mac| Frame::Proof { mac }),
            arb_string().prop_map(|reason| Frame::Refused { reason }),
            any::<u64>().prop_map(|t| Frame::Ping { t }),
            any::<u64>().prop_map(|t| Frame::Pong { t }),
            (arb_string(), any::<u64>()).prop_map(|(conn, epoch)| Frame::Own { conn, epoch }),
            (arb_string(), any::<u64>()).prop_map(|(conn, epoch)| Frame::Disown { conn, epoch }),
            (
                proptest::collection::vec(
                    (arb_string(), any::<u64>()).prop_map(|(conn, epoch)| Claim { conn, epoch }),
                    0..20
                ),
                any::<bool>()
            )
                .prop_map(|(claims, last)| Frame::Resync { claims, last }),
            arb_string().prop_map(|conn| Frame::Queued { conn }),
            (arb_string(), proptest::collection::vec(arb_string(), 0..8))
                .prop_map(|(conn, keys)| Frame::RoutesChanged { conn, keys }),
            (
                arb_string(),
                proptest::collection::vec(
                    (
                        any::<i64>(),
                        arb_string(),
                        proptest::collection::vec(any::<u8>(), 0..64),
                        any::<i64>()
                    ),
                    0..4
                )
            )
                .prop_map(|(conn, msgs)| Frame::Deliver {
                    conn,
                    msgs: msgs
                        .into_iter()
                        .map(|(id, recipient_key, payload, received_at_ms)| HandedMsg {
                            id,
                            recipient_key,
                            payload,
                            received_at_ms
                        })
                        .collect(),
                }),
            Just(Frame::Welcome),
            Just(Frame::Leave),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|msg| Frame::Noise { msg }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(f in arb_frame()) {
            let b = encode(&f).unwrap();
            prop_assert_eq!(encoded_len(&f).unwrap(), b.len());
            prop_assert_eq!(decode(&b).unwrap(), f);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&b);
        }

        #[test]
        fn mutated_frames_never_panic(f in arb_frame(), i in any::<usize>(), x in any::<u8>()) {
            let mut b = encode(&f).unwrap();
            if !b.is_empty() {
                let n = b.len();
                b[i % n] = x;
            }
            let _ = decode(&b);
        }
    }
}
