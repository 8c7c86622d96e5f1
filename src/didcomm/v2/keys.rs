//! Keys of DIDComm v2 peers: X25519, P-256, P-384 (key agreement), Ed25519, P-256, secp256k1
//! (signing), read from multibase multicodec (did:peer, did:key), JWK and base58 forms.
//! Every public key is checked on its curve by askar-crypto when it is read.

use askar_crypto::alg::{AnyKey, AnyKeyCreate, EcCurves, KeyAlg};
use askar_crypto::jwk::{FromJwk, ToJwk};
use askar_crypto::kdf::KeyExchange;
use askar_crypto::repr::{ToPublicBytes, ToSecretBytes};
use serde_json::Value;
use std::sync::Arc;
use zeroize::Zeroizing;

use super::V2Error;
use crate::didcomm::nacl;

/// A public or private key of any supported type.
pub type Key = Arc<AnyKey>;

/// One of our private key-agreement keys, as a JWE's ECDH uses it. An X25519 secret is also
/// held parsed for AWS-LC, whose multiplication takes under half of askar's
/// ([`crate::didcomm::nacl`]); P-256 and P-384 stay askar's.
#[derive(Clone)]
pub struct Agreement {
    key: Key,
    x25519: Option<nacl::Secret>,
}

impl Agreement {
    /// From a private key (a key without its secret can only be an ECDH's public side).
    pub fn new(key: Key) -> Agreement {
        let x25519 = if key.algorithm() == KeyAlg::X25519 {
            key.to_secret_bytes()
                .ok()
                .and_then(|s| <[u8; 32]>::try_from(s.as_ref()).ok().map(Zeroizing::new))
                .and_then(|b| nacl::Secret::from_bytes(&b))
        } else {
            None
        };
        Agreement { key, x25519 }
    }

    /// A fresh key on `alg`'s curve (a JWE's `epk`).
    pub fn generate(alg: KeyAlg) -> Result<Agreement, V2Error> {
        if alg != KeyAlg::X25519 {
            return generate(alg).map(Agreement::new);
        }
        let (secret, public) =
            nacl::Secret::generate().ok_or_else(|| V2Error::Crypto("X25519 key generation failed".into()))?;
        Ok(Agreement {
            // Our own fresh key: no small-order check (one multiplication) needed.
            key: Arc::<AnyKey>::from_public_bytes(alg, &public).map_err(|e| V2Error::Crypto(e.to_string()))?,
            x25519: Some(secret),
        })
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Z, the ECDH shared secret with `theirs` (on our curve: the caller checks). An all-zero
    /// X25519 result (a key of small order) is refused, as RFC 8037 section 3.2 requires.
    pub fn exchange(&self, theirs: &AnyKey) -> Result<Zeroizing<Vec<u8>>, V2Error> {
        let Some(ours) = &self.x25519 else {
            return self
                .key
                .key_exchange_bytes(theirs)
                .map(|z| Zeroizing::new(z.as_ref().to_vec()))
                .map_err(|e| V2Error::Crypto(format!("key agreement: {e}")));
        };
        let public: [u8; 32] = theirs
            .to_public_bytes()
            .ok()
            .and_then(|p| p.as_ref().try_into().ok())
            .ok_or_else(|| V2Error::CurveMismatch("not an X25519 public key".into()))?;
        ours.agree(&public)
            .map(|z| Zeroizing::new(z.to_vec()))
            .ok_or_else(|| V2Error::Crypto("key agreement with an X25519 key of small order".into()))
    }
}

impl std::fmt::Debug for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agreement({})", curve_name(self.key.algorithm()))
    }
}

const MAX_KEY_STRING: usize = 256;

/// Multicodec prefixes (unsigned varints) of the public key types v2 peers put in DIDs.
const CODECS: &[(&[u8], KeyAlg)] = &[
    (&[0xed, 0x01], KeyAlg::Ed25519),
    (&[0xec, 0x01], KeyAlg::X25519),
    (&[0xe7, 0x01], KeyAlg::EcCurve(EcCurves::Secp256k1)),
    (&[0x80, 0x24], KeyAlg::EcCurve(EcCurves::Secp256r1)),
    (&[0x81, 0x24], KeyAlg::EcCurve(EcCurves::Secp384r1)),
];

fn bad(what: &str, s: &str) -> V2Error {
    V2Error::BadKey(format!("{what}: {}", s.chars().take(60).collect::<String>()))
}

/// A multibase (`z`, base58btc) multicodec public key.
pub fn from_multibase(mb: &str) -> Result<Key, V2Error> {
    if mb.len() > MAX_KEY_STRING {
        return Err(bad("key string too long", mb));
    }
    let raw = mb
        .strip_prefix('z')
        .and_then(|s| bs58::decode(s).into_vec().ok())
        .ok_or_else(|| bad("not base58btc multibase", mb))?;
    for (codec, alg) in CODECS {
        if let Some(pk) = raw.strip_prefix(*codec) {
            return from_public_bytes(*alg, pk).map_err(|_| bad("not a point on its curve", mb));
        }
    }
    Err(bad("unsupported multicodec", mb))
}

/// Multibase multicodec form of a public key (X25519, Ed25519, or compressed EC).
pub fn to_multibase(key: &AnyKey) -> Result<String, V2Error> {
    let alg = key.algorithm();
    let codec = CODECS
        .iter()
        .find(|(_, a)| *a == alg)
        .map(|(c, _)| *c)
        .ok_or_else(|| V2Error::BadKey(format!("no multicodec for {}", alg.as_str())))?;
    let pk = key.to_public_bytes().map_err(|e| V2Error::BadKey(e.to_string()))?;
    let mut raw = codec.to_vec();
    raw.extend_from_slice(&pk);
    Ok(format!("z{}", bs58::encode(raw).into_string()))
}

/// A peer's public key from its raw bytes; an X25519 key of small order is refused
/// (see `refuse_small_order`).
pub fn from_public_bytes(alg: KeyAlg, pk: &[u8]) -> Result<Key, V2Error> {
    let key =
        Arc::<AnyKey>::from_public_bytes(alg, pk).map_err(|e| V2Error::BadKey(format!("{}: {e}", alg.as_str())))?;
    refuse_small_order(key)
}

/// Refuses an X25519 public key of small order (RFC 7748 section 6.1: every exchange with it
/// gives the all-zero secret). Such a key in a peer's DID document would be taken, and packing
/// to it fail after a handler had acted: it is dropped from the document instead, and an
/// `epk` of it refused. One multiplication by a clamped scalar (a multiple of 8, so it sends
/// exactly the small-order points to zero).
fn refuse_small_order(key: Key) -> Result<Key, V2Error> {
    if key.algorithm() != KeyAlg::X25519 {
        return Ok(key);
    }
    static PROBE: std::sync::OnceLock<Option<nacl::Secret>> = std::sync::OnceLock::new();
    let public: Option<[u8; 32]> = key.to_public_bytes().ok().and_then(|p| p.as_ref().try_into().ok());
    let probe = PROBE.get_or_init(|| nacl::Secret::from_bytes(&[0x5a; 32]));
    match (public, probe) {
        (Some(p), Some(probe)) if probe.agree(&p).is_some() => Ok(key),
        _ => Err(V2Error::BadKey("X25519 key of small order".into())),
    }
}

/// The other did:key forms of one X25519 key: for an Ed25519 did:key, its X25519 form and the
/// Ed25519 key of the other sign (which converts to the same X25519 key); for an X25519
/// did:key, the Ed25519 keys that convert to it. Empty for anything else. A recipient DID
/// registered in one form claims them all: a forward to any of them reaches its holder.
pub fn did_key_equivalents(did: &str) -> Vec<String> {
    use curve25519_dalek::edwards::CompressedEdwardsY;
    use curve25519_dalek::montgomery::MontgomeryPoint;
    let Some(k) = did.strip_prefix("did:key:").and_then(|mb| from_multibase(mb).ok()) else {
        return Vec::new();
    };
    let Ok(pk) = k.to_public_bytes() else {
        return Vec::new();
    };
    let Ok(raw) = <[u8; 32]>::try_from(&pk[..]) else {
        return Vec::new();
    };
    let encode = |alg: KeyAlg, bytes: &[u8; 32]| {
        from_public_bytes(alg, bytes)
            .and_then(|k| to_multibase(&k))
            .ok()
            .map(|mb| format!("did:key:{mb}"))
    };
    let x = match k.algorithm() {
        KeyAlg::Ed25519 => match CompressedEdwardsY(raw).decompress() {
            Some(p) => p.to_montgomery(),
            None => return Vec::new(),
        },
        KeyAlg::X25519 => MontgomeryPoint(raw),
        _ => return Vec::new(),
    };
    let mut out: Vec<String> = Vec::new();
    if k.algorithm() == KeyAlg::Ed25519 {
        out.extend(encode(KeyAlg::X25519, x.as_bytes()));
    }
    for sign in [0u8, 1] {
        if let Some(e) = x.to_edwards(sign).map(|p| p.compress().to_bytes()) {
            if e != raw || k.algorithm() != KeyAlg::Ed25519 {
                out.extend(encode(KeyAlg::Ed25519, &e));
            }
        }
    }
    out.retain(|d| d != did);
    out.dedup();
    out
}

/// A JWK (public, or private with `d`). NIST points are checked on-curve.
/// A JWE's ephemeral key from its JWK, unchecked for small order: the exchange with it
/// refuses an all-zero secret ([`Agreement::exchange`]), which spares a multiplication on
/// every message.
pub fn epk_from_jwk(jwk: &Value) -> Result<Key, V2Error> {
    jwk_key(jwk)
}

/// A peer's public key from its JWK; an X25519 key of small order is refused.
pub fn from_jwk(jwk: &Value) -> Result<Key, V2Error> {
    jwk_key(jwk).and_then(refuse_small_order)
}

fn jwk_key(jwk: &Value) -> Result<Key, V2Error> {
    if !jwk.is_object() {
        return Err(V2Error::BadKey("JWK is not an object".into()));
    }
    let s = jwk.to_string();
    if s.len() > 4 * MAX_KEY_STRING {
        return Err(V2Error::BadKey("JWK too long".into()));
    }
    Arc::<AnyKey>::from_jwk(&s).map_err(|e| {
        V2Error::BadKey(format!(
            "JWK {} {}: {e}",
            jwk["kty"].as_str().unwrap_or("?"),
            jwk["crv"].as_str().unwrap_or("?")
        ))
    })
}

/// The public JWK of a key, as a JSON object.
pub fn to_public_jwk(key: &AnyKey) -> Result<Value, V2Error> {
    let s = key.to_jwk_public(None).map_err(|e| V2Error::BadKey(e.to_string()))?;
    serde_json::from_str(&s).map_err(|e| V2Error::BadKey(e.to_string()))
}

/// A fresh private key of the algorithm.
pub fn generate(alg: KeyAlg) -> Result<Key, V2Error> {
    Arc::<AnyKey>::random(alg).map_err(|e| V2Error::Crypto(e.to_string()))
}

/// A private key from its secret bytes (32-byte Ed25519 seed, X25519 scalar, EC scalar).
pub fn from_secret_bytes(alg: KeyAlg, secret: &[u8]) -> Result<Key, V2Error> {
    Arc::<AnyKey>::from_secret_bytes(alg, secret).map_err(|e| V2Error::BadKey(e.to_string()))
}

/// The X25519 key of an Ed25519 one (did:key's keyAgreement).
pub fn ed25519_to_x25519(key: &Key) -> Result<Key, V2Error> {
    let x = key
        .convert_key(KeyAlg::X25519)
        .map_err(|e| V2Error::BadKey(e.to_string()))?;
    refuse_small_order(x)
}

/// The JOSE curve name of a key agreement key.
pub fn curve_name(alg: KeyAlg) -> &'static str {
    match alg {
        KeyAlg::X25519 => "X25519",
        KeyAlg::Ed25519 => "Ed25519",
        KeyAlg::EcCurve(EcCurves::Secp256r1) => "P-256",
        KeyAlg::EcCurve(EcCurves::Secp384r1) => "P-384",
        KeyAlg::EcCurve(EcCurves::Secp256k1) => "secp256k1",
        _ => "other",
    }
}

/// Whether a key can do ECDH in a DIDComm v2 JWE.
pub fn is_agreement_alg(alg: KeyAlg) -> bool {
    matches!(
        alg,
        KeyAlg::X25519 | KeyAlg::EcCurve(EcCurves::Secp256r1) | KeyAlg::EcCurve(EcCurves::Secp384r1)
    )
}
