//! Ed25519 keys and their textual forms: base58 verkeys (envelope `kid`s, `forward.to`) and
//! `did:key` (mediation messages, invitations). DIDComm v1 encrypts to the X25519 form of the
//! same keys; [`KeyPair`] caches that conversion because every unpack needs it.

use askar_crypto::alg::ed25519::Ed25519KeyPair;
use askar_crypto::alg::x25519::X25519KeyPair;
use askar_crypto::repr::{KeyPublicBytes, KeySecretBytes, ToSecretBytes};

use super::nacl;

/// Multicodec prefix of an Ed25519 public key (varint 0xed).
pub(crate) const ED25519_CODEC: [u8; 2] = [0xed, 0x01];
/// Multicodec prefix of an X25519 public key (varint 0xec).
pub(crate) const X25519_CODEC: [u8; 2] = [0xec, 0x01];

/// Longest key string we try to decode. Base58 decoding is quadratic, and a 32-byte key
/// with a multicodec prefix is under 50 characters; did:key with a fragment is under 120.
const MAX_KEY_STRING: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key must be 32 bytes, got {0}")]
    BadLength(usize),
    #[error("not base58: {0}")]
    NotBase58(String),
    #[error("unsupported key encoding: {0}")]
    Unsupported(String),
    #[error("not a valid ed25519 public key")]
    NotOnCurve,
    #[error("key string too long")]
    TooLong,
    #[error("a key of small order (X25519 with it gives all zeros)")]
    SmallOrder,
}

/// An Ed25519 key pair with its X25519 conversion and its base58 verkey (every unpack with a
/// key compares and returns the verkey: encoding it each time was two base58 encodings per
/// forward). The X25519 secret is also kept parsed for [`nacl`]'s multiplication.
#[derive(Clone)]
pub struct KeyPair {
    ed: Ed25519KeyPair,
    x_secret: nacl::Secret,
    x_public: [u8; 32],
    public: [u8; 32],
    verkey: std::sync::Arc<str>,
}

impl KeyPair {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut seed[..]);
        let kp = Self::from_secret_bytes(&seed).unwrap_or_else(|_| unreachable_seed());
        seed.fill(0);
        kp
    }

    /// From a 32-byte Ed25519 seed (the form askar, Credo and ACA-Py export).
    pub fn from_secret_bytes(b: &[u8]) -> Result<Self, KeyError> {
        if b.len() != 32 {
            return Err(KeyError::BadLength(b.len()));
        }
        let ed = Ed25519KeyPair::from_secret_bytes(b).map_err(|_| KeyError::BadLength(b.len()))?;
        let public = ed.with_public_bytes(to_array32).unwrap_or([0; 32]);
        let x = ed.to_x25519_keypair();
        let x_secret = x
            .to_secret_bytes()
            .ok()
            .and_then(|s| to_array32(s.as_ref()))
            .and_then(|s| nacl::Secret::from_bytes(&s))
            .ok_or_else(|| KeyError::Unsupported("an X25519 secret AWS-LC does not take".into()))?;
        let x_public = x25519_public_bytes(&x);
        let verkey = verkey_to_base58(&public).into();
        Ok(Self {
            ed,
            x_secret,
            x_public,
            public,
            verkey,
        })
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.ed.with_secret_bytes(|s| s.and_then(to_array32)).unwrap_or([0; 32])
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.public
    }

    pub fn verkey(&self) -> String {
        self.verkey.to_string()
    }

    /// The base58 verkey, borrowed.
    pub fn verkey_str(&self) -> &str {
        &self.verkey
    }

    pub fn did_key(&self) -> String {
        verkey_to_did_key(&self.public)
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        // A KeyPair always holds a secret (constructed only from secret bytes).
        self.ed.sign(msg).unwrap_or([0; 64])
    }

    /// askar's form of the X25519 key pair: the reference [`nacl`] is checked against (tests).
    #[cfg(test)]
    pub(crate) fn x25519(&self) -> X25519KeyPair {
        self.ed.to_x25519_keypair()
    }

    /// The X25519 secret, parsed for [`nacl`].
    pub(crate) fn x25519_secret(&self) -> &nacl::Secret {
        &self.x_secret
    }

    /// The X25519 public key (the Ed25519 key's Montgomery form).
    pub(crate) fn x25519_public(&self) -> &[u8; 32] {
        &self.x_public
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("verkey", &self.verkey())
            .finish_non_exhaustive()
    }
}

// `from_secret_bytes` only fails on a wrong length, and `generate` always passes 32 bytes.
#[cold]
fn unreachable_seed() -> KeyPair {
    unreachable!("32-byte seed rejected")
}

fn to_array32(b: &[u8]) -> Option<[u8; 32]> {
    b.try_into().ok()
}

/// Parse a verkey: base58 (32 bytes), `did:key:z6Mk...` (with or without `#fragment`), or a
/// bare multibase `z6Mk...` as found in did:peer:2. Rejects bytes that are not an Ed25519 point,
/// so later X25519 conversion cannot fail.
pub fn parse_verkey(s: &str) -> Result<[u8; 32], KeyError> {
    if s.len() > MAX_KEY_STRING {
        return Err(KeyError::TooLong);
    }
    let s = s.trim();
    let bytes = if let Some(rest) = s.strip_prefix("did:key:") {
        let mb = rest.split('#').next().unwrap_or(rest);
        decode_multikey(mb, ED25519_CODEC)?
    } else if s.starts_with("z6Mk") {
        decode_multikey(s, ED25519_CODEC)?
    } else {
        let b = bs58::decode(s)
            .into_vec()
            .map_err(|_| KeyError::NotBase58(truncate(s)))?;
        to_array32(&b).ok_or(KeyError::BadLength(b.len()))?
    };
    check_point(&bytes)?;
    Ok(bytes)
}

/// Decode a multibase (`z` = base58btc) multicodec key with the given codec prefix.
pub(crate) fn decode_multikey(mb: &str, codec: [u8; 2]) -> Result<[u8; 32], KeyError> {
    if mb.len() > MAX_KEY_STRING {
        return Err(KeyError::TooLong);
    }
    let b58 = mb
        .strip_prefix('z')
        .ok_or_else(|| KeyError::Unsupported(format!("multibase prefix of {}", truncate(mb))))?;
    let raw = bs58::decode(b58)
        .into_vec()
        .map_err(|_| KeyError::NotBase58(truncate(mb)))?;
    let key = raw
        .strip_prefix(&codec[..])
        .ok_or_else(|| KeyError::Unsupported(format!("multicodec of {}", truncate(mb))))?;
    to_array32(key).ok_or(KeyError::BadLength(key.len()))
}

pub(crate) fn encode_multikey(pk: &[u8; 32], codec: [u8; 2]) -> String {
    let mut raw = Vec::with_capacity(34);
    raw.extend_from_slice(&codec);
    raw.extend_from_slice(pk);
    format!("z{}", bs58::encode(raw).into_string())
}

fn check_point(pk: &[u8; 32]) -> Result<(), KeyError> {
    Ed25519KeyPair::from_public_bytes(pk)
        .map(|_| ())
        .map_err(|_| KeyError::NotOnCurve)
}

/// X25519 public key for an Ed25519 verkey (for envelopes and did:peer keyAgreement).
pub(crate) fn ed_to_x25519_public(pk: &[u8; 32]) -> Result<X25519KeyPair, KeyError> {
    let ed = Ed25519KeyPair::from_public_bytes(pk).map_err(|_| KeyError::NotOnCurve)?;
    Ok(ed.to_x25519_keypair())
}

/// Whether a message can be sealed to `verkey` (any form [`parse_verkey`] takes): false for a
/// key that does not parse, and for an Ed25519 point of small order, which passes
/// [`parse_verkey`] but whose X25519 form makes an all-zero shared secret that
/// [`super::nacl::seal`] refuses (the identity point among them). One X25519 agreement: for
/// keys a peer names once (a DID document's routing keys), not for every forward.
pub fn sealable(verkey: &str) -> bool {
    let Ok(pk) = parse_verkey(verkey) else {
        return false;
    };
    ed_to_x25519_public(&pk).is_ok_and(|x| super::nacl::seal(&x25519_public_bytes(&x), b"").is_some())
}

pub(crate) fn x25519_public_bytes(x: &X25519KeyPair) -> [u8; 32] {
    x.with_public_bytes(to_array32).unwrap_or([0; 32])
}

fn truncate(s: &str) -> String {
    s.chars().take(60).collect()
}

pub fn verkey_to_base58(pk: &[u8; 32]) -> String {
    bs58::encode(pk).into_string()
}

pub fn verkey_to_did_key(pk: &[u8; 32]) -> String {
    format!("did:key:{}", encode_multikey(pk, ED25519_CODEC))
}

/// Any accepted form (see [`parse_verkey`]) to base58.
pub fn normalize_verkey(s: &str) -> Result<String, KeyError> {
    parse_verkey(s).map(|pk| verkey_to_base58(&pk))
}

/// Ed25519 signature check (strict verification, as askar does).
pub fn verify(pk: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    match Ed25519KeyPair::from_public_bytes(pk) {
        Ok(k) => k.verify_signature(msg, sig),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 test vector 1.
    const SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const PUB: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    /// The Ed25519 identity point parses (it is on the curve) and converts to the all-zero
    /// X25519 key: nothing can be sealed to it. A real key can.
    #[test]
    fn a_key_of_small_order_is_not_sealable() {
        let identity = "4uQeVj5tqViQh7yWWGStvkEG1Zmhx6uasJtWCJziofM";
        assert!(parse_verkey(identity).is_ok());
        assert!(!sealable(identity));
        assert!(!sealable(&verkey_to_did_key(&parse_verkey(identity).unwrap())));
        assert!(!sealable("not a key"));
        assert!(sealable(&KeyPair::generate().verkey()));
    }

    #[test]
    fn rfc8032_vector_and_forms() {
        let seed = hex::decode(SEED).unwrap();
        let kp = KeyPair::from_secret_bytes(&seed).unwrap();
        assert_eq!(hex::encode(kp.public_bytes()), PUB);
        assert_eq!(kp.secret_bytes().to_vec(), seed);
        let sig = kp.sign(b"");
        assert_eq!(
            hex::encode(sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert!(verify(&kp.public_bytes(), b"", &sig));
        assert!(!verify(&kp.public_bytes(), b"x", &sig));
        assert!(!verify(&kp.public_bytes(), b"", &sig[..63]));

        let b58 = kp.verkey();
        let dk = kp.did_key();
        assert!(dk.starts_with("did:key:z6Mk"), "{dk}");
        assert_eq!(parse_verkey(&b58).unwrap(), kp.public_bytes());
        assert_eq!(parse_verkey(&dk).unwrap(), kp.public_bytes());
        let frag = format!("{dk}#{}", &dk[8..]);
        assert_eq!(normalize_verkey(&frag).unwrap(), b58);
        assert_eq!(normalize_verkey(&dk[8..]).unwrap(), b58);
    }

    #[test]
    fn known_did_key_from_capture() {
        // From the ACA-Py didexchange response capture: jwk.x and header kid name the same key.
        let pk = parse_verkey("did:key:z6MkjuBH9qApHqZMRNH1VzMuZWKQZsS465sy8rDsf3AvRQXN").unwrap();
        assert_eq!(
            crate::didcomm::b64::encode(&pk),
            "UO4lg1vsbXz6CINtNIOwm4sQ8BUrPjrIHT54itfX4U0"
        );
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(matches!(parse_verkey("0OIl"), Err(KeyError::NotBase58(_))));
        assert!(matches!(parse_verkey("abc"), Err(KeyError::BadLength(_))));
        assert!(matches!(parse_verkey(&"1".repeat(300)), Err(KeyError::TooLong)));
        // x25519 did:key is not a verkey
        assert!(parse_verkey("did:key:z6LSmZwZbdrDh9Ve3FYu6iKBMNWJj7mjMRtTsGwo1dutPhVD").is_err());
        assert!(KeyPair::from_secret_bytes(&[1; 31]).is_err());
    }

    #[test]
    fn debug_hides_secret() {
        let kp = KeyPair::from_secret_bytes(&[7; 32]).unwrap();
        let dbg = format!("{kp:?}");
        assert!(dbg.contains(&kp.verkey()));
        let secret_b58 = bs58::encode(kp.secret_bytes()).into_string();
        assert!(!dbg.contains(&secret_b58));
        assert!(!dbg.contains("7, 7, 7"));
        assert_ne!(KeyPair::generate().public_bytes(), kp.public_bytes());
    }
}
