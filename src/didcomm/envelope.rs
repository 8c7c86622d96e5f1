//! RFC 0019 encryption envelopes (DIDComm v1 "pack"): authcrypt and anoncrypt, plus the
//! routing 1.0 forward wrapping used to send through mediators.
//!
//! Wire facts (checked against Credo 0.6.3 and ACA-Py 1.7 captures and their askar code):
//! - Both label the payload cipher `xchacha20poly1305_ietf` but generate a ChaCha20-Poly1305
//!   (IETF, **12-byte** nonce) content key and decrypt with that algorithm whatever the label
//!   says (Credo `didcommV1Unpack` and ACA-Py `askar/didcomm/v1.py` both build a `C20P` key).
//!   Credo 0.6 (`DidCommEnvelopeService.decryptDidcommV1Message`) also *rejects* any other
//!   `enc` label. The spec'd indy-sdk form is XChaCha20-Poly1305 with a 24-byte nonce. So
//!   unpack chooses the AEAD by nonce length, and pack writes the label real peers write with a
//!   12-byte nonce: the only form both of them can open.
//! - `kid`s are base58 verkeys (Credo matches them by string equality with base58).
//! - ACA-Py pads base64 and writes `"sender": null, "iv": null` for anoncrypt; Credo does not.
//! - The AEAD's associated data is the `protected` field exactly as sent (its ASCII bytes).

use askar_crypto::alg::chacha20::{Chacha20Key, C20P, XC20P};
use askar_crypto::encrypt::KeyAeadInPlace;
use askar_crypto::repr::KeySecretBytes;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use zeroize::Zeroizing;

use super::b64;
use super::keys::{self, KeyPair};
use super::nacl;

mod box_keys;
pub use box_keys::BoxKeys;

/// Most recipients we read from one envelope. Real peers send 1-3 (one per recipient key of
/// the target's service); anything near this is abuse.
pub const MAX_RECIPIENTS: usize = 32;
/// Longest `protected` header we decode (base64 characters). 32 authcrypt recipients need
/// about 12 KiB.
pub const MAX_PROTECTED_LEN: usize = 64 * 1024;
/// Deepest chain of mediators [`wrap_forward`] will wrap for.
pub const MAX_ROUTING_KEYS: usize = 8;

/// The `enc` label real peers write (see module docs about the actual cipher).
pub const ENC_LABEL: &str = "xchacha20poly1305_ietf";
/// Also accepted on unpack: a label some implementations use for the 12-byte variant.
const ENC_LABEL_C20P: &str = "chacha20poly1305_ietf";
pub const TYP: &str = "JWM/1.0";
pub const FORWARD_TYPE: &str = "https://didcomm.org/routing/1.0/forward";

const TAG_LEN: usize = 16;
const CBOX_NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not a JSON object with protected, iv, ciphertext and tag")]
    NotJson,
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope algorithm: {0}")]
    UnsupportedAlg(String),
    #[error("too many recipients in envelope ({0}, at most {MAX_RECIPIENTS})")]
    TooManyRecipients(usize),
    #[error("no recipient key of this envelope is known here")]
    NoMatchingKey,
    #[error("could not decrypt the envelope")]
    Decrypt,
    #[error("invalid key {key}: {source}")]
    InvalidKey { key: String, source: keys::KeyError },
    #[error("no recipients given")]
    NoRecipients,
    #[error("encryption failed: {0}")]
    Crypto(String),
}

/// Result of a successful unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub plaintext: Vec<u8>,
    /// Base58 verkey of ours that the envelope was opened with.
    pub recipient_verkey: String,
    /// Base58 verkey of the sender for authcrypt; `None` for anoncrypt.
    pub sender_verkey: Option<String>,
    /// How many recipients the envelope was packed for. Every recipient of an envelope gets
    /// the same content key, and the `protected` header (the payload's AAD) does not change
    /// with the payload: any co-recipient can write a new payload under the sender's header,
    /// which still opens as the sender's. An authcrypt proves its sender only to the one
    /// recipient of a single-recipient envelope.
    pub recipients: usize,
}

#[derive(Serialize)]
struct Outer {
    protected: String,
    iv: String,
    ciphertext: String,
    tag: String,
}

/// The envelope as read: borrowed where the JSON has no escapes, so reading a large
/// ciphertext copies nothing.
#[derive(Deserialize)]
struct OuterIn<'a> {
    #[serde(borrow)]
    protected: Cow<'a, str>,
    #[serde(borrow)]
    iv: Cow<'a, str>,
    #[serde(borrow)]
    ciphertext: Cow<'a, str>,
    #[serde(borrow)]
    tag: Cow<'a, str>,
}

/// Just the header, for [`recipient_kids`].
#[derive(Deserialize)]
struct OuterHeader<'a> {
    #[serde(borrow)]
    protected: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ProtectedIn {
    enc: String,
    alg: String,
    recipients: Vec<RecipientIn>,
}

#[derive(Deserialize)]
struct RecipientIn {
    encrypted_key: String,
    header: RecipientHeaderIn,
}

#[derive(Deserialize)]
struct RecipientHeaderIn {
    kid: String,
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    iv: Option<String>,
}

#[derive(Serialize)]
struct ProtectedOut<'a> {
    enc: &'a str,
    typ: &'a str,
    alg: &'a str,
    recipients: Vec<RecipientOut>,
}

#[derive(Serialize)]
struct RecipientOut {
    encrypted_key: String,
    header: RecipientHeaderOut,
}

#[derive(Serialize)]
struct RecipientHeaderOut {
    kid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iv: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Alg {
    Authcrypt,
    Anoncrypt,
}

fn parse_protected(protected: &str) -> Result<(Alg, Vec<RecipientIn>), EnvelopeError> {
    if protected.len() > MAX_PROTECTED_LEN {
        return Err(EnvelopeError::Malformed(format!(
            "protected header longer than {MAX_PROTECTED_LEN} bytes"
        )));
    }
    let raw = b64::decode(protected).ok_or_else(|| EnvelopeError::Malformed("protected is not base64".into()))?;
    let prot: ProtectedIn = serde_json::from_slice(&raw)
        .map_err(|e| EnvelopeError::Malformed(format!("protected header: {}", short(&e.to_string()))))?;
    let alg = match prot.alg.as_str() {
        "Authcrypt" => Alg::Authcrypt,
        "Anoncrypt" => Alg::Anoncrypt,
        other => return Err(EnvelopeError::UnsupportedAlg(format!("alg {}", short(other)))),
    };
    if prot.enc != ENC_LABEL && prot.enc != ENC_LABEL_C20P {
        return Err(EnvelopeError::UnsupportedAlg(format!("enc {}", short(&prot.enc))));
    }
    if prot.recipients.is_empty() {
        return Err(EnvelopeError::Malformed("no recipients".into()));
    }
    if prot.recipients.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::TooManyRecipients(prot.recipients.len()));
    }
    Ok((alg, prot.recipients))
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The recipient `kid`s of an envelope, as base58 verkeys, without any cryptography: what a
/// mediator needs to route a forward's inner message. `kid`s that are not verkeys are skipped;
/// if none is left the envelope is malformed.
pub fn recipient_kids(envelope: &[u8]) -> Result<Vec<String>, EnvelopeError> {
    let outer: OuterHeader = serde_json::from_slice(envelope).map_err(|_| EnvelopeError::NotJson)?;
    let (_, recipients) = parse_protected(&outer.protected)?;
    let kids: Vec<String> = recipients
        .iter()
        .filter_map(|r| keys::normalize_verkey(&r.header.kid).ok())
        .collect();
    if kids.is_empty() {
        return Err(EnvelopeError::Malformed("no recipient kid is a verkey".into()));
    }
    Ok(kids)
}

/// Open an envelope with the first recipient whose key `find_key` (called with base58
/// verkeys) returns.
pub fn unpack(envelope: &[u8], find_key: &dyn Fn(&str) -> Option<KeyPair>) -> Result<Unpacked, EnvelopeError> {
    unpack_cached(envelope, find_key, None)
}

/// [`unpack`] with the authcrypt box keys taken from (and kept in) `cache`.
pub fn unpack_cached(
    envelope: &[u8],
    find_key: &dyn Fn(&str) -> Option<KeyPair>,
    cache: Option<&BoxKeys>,
) -> Result<Unpacked, EnvelopeError> {
    let outer: OuterIn = serde_json::from_slice(envelope).map_err(|_| EnvelopeError::NotJson)?;
    let (alg, recipients) = parse_protected(&outer.protected)?;
    let (recipient, key) = recipients
        .iter()
        .find_map(|r| {
            // A `kid` written as one of our base58 verkeys is found as it is: decoding it (base58
            // and an Ed25519 point decompression) is only needed for other forms of a key.
            let kid = r.header.kid.as_str();
            if let Some(key) = find_key(kid).filter(|k| k.verkey_str() == kid) {
                return Some((r, key));
            }
            let vk = keys::normalize_verkey(kid).ok()?;
            if vk == kid {
                return None;
            }
            let key = find_key(&vk)?;
            // Guard against a lookup that returns a different key than asked for.
            (key.verkey_str() == vk).then_some((r, key))
        })
        .ok_or(EnvelopeError::NoMatchingKey)?;

    // Cheap checks before any public-key cryptography.
    let nonce = b64::decode(&outer.iv).ok_or_else(|| EnvelopeError::Malformed("iv is not base64".into()))?;
    let tag = b64::decode(&outer.tag).ok_or_else(|| EnvelopeError::Malformed("tag is not base64".into()))?;
    if tag.len() != TAG_LEN {
        return Err(EnvelopeError::Malformed(format!("tag must be {TAG_LEN} bytes")));
    }
    let mut buf =
        b64::decode(&outer.ciphertext).ok_or_else(|| EnvelopeError::Malformed("ciphertext is not base64".into()))?;
    buf.extend_from_slice(&tag);
    if nonce.len() != 12 && nonce.len() != 24 {
        return Err(EnvelopeError::Malformed(format!(
            "iv must be 12 or 24 bytes, got {}",
            nonce.len()
        )));
    }
    let encrypted_key = b64::decode(&recipient.encrypted_key)
        .ok_or_else(|| EnvelopeError::Malformed("encrypted_key is not base64".into()))?;
    let seal_open =
        |sealed: &[u8]| nacl::seal_open(key.x25519_secret(), key.x25519_public(), sealed).ok_or(EnvelopeError::Decrypt);
    let (cek, sender_verkey) = match alg {
        Alg::Authcrypt => {
            let (Some(sender), Some(iv)) = (&recipient.header.sender, &recipient.header.iv) else {
                return Err(EnvelopeError::Malformed(
                    "authcrypt recipient needs sender and iv".into(),
                ));
            };
            let sender = b64::decode(sender).ok_or_else(|| EnvelopeError::Malformed("sender is not base64".into()))?;
            let nonce = b64::decode(iv).ok_or_else(|| EnvelopeError::Malformed("recipient iv is not base64".into()))?;
            if nonce.len() != CBOX_NONCE_LEN {
                return Err(EnvelopeError::Malformed(format!(
                    "recipient iv must be {CBOX_NONCE_LEN} bytes"
                )));
            }
            let remembered = cache.and_then(|c| c.opened_sender(&key, &sender));
            let sender_pk = match remembered {
                Some(pk) => pk,
                None => {
                    let sender_vk_bytes = seal_open(&sender)?;
                    let sender_vk = std::str::from_utf8(&sender_vk_bytes)
                        .map_err(|_| EnvelopeError::Malformed("sender is not a verkey".into()))?;
                    keys::parse_verkey(sender_vk)
                        .map_err(|_| EnvelopeError::Malformed("sender is not an ed25519 verkey".into()))?
                }
            };
            let (pair, fresh) = box_keys::lookup(cache, &key, &sender_pk)
                .map_err(|_| EnvelopeError::Malformed("sender is not an ed25519 verkey".into()))?;
            let cek = Zeroizing::new(pair.open(&encrypted_key, &nonce).ok_or(EnvelopeError::Decrypt)?);
            if let Some(c) = cache {
                if fresh {
                    c.insert(&key, &sender_pk, pair);
                }
                if remembered.is_none() {
                    c.remember_sender(&key, &sender, sender_pk);
                }
            }
            (cek, Some(keys::verkey_to_base58(&sender_pk)))
        }
        Alg::Anoncrypt => (seal_open(&encrypted_key)?, None),
    };

    let aad = outer.protected.as_bytes();
    match nonce.len() {
        12 => Chacha20Key::<C20P>::from_secret_bytes(cek.as_ref())
            .map_err(|_| EnvelopeError::Decrypt)?
            .decrypt_in_place(&mut buf, &nonce, aad),
        24 => Chacha20Key::<XC20P>::from_secret_bytes(cek.as_ref())
            .map_err(|_| EnvelopeError::Decrypt)?
            .decrypt_in_place(&mut buf, &nonce, aad),
        n => return Err(EnvelopeError::Malformed(format!("iv must be 12 or 24 bytes, got {n}"))),
    }
    .map_err(|_| EnvelopeError::Decrypt)?;

    Ok(Unpacked {
        plaintext: buf,
        recipient_verkey: key.verkey(),
        sender_verkey,
        recipients: recipients.len(),
    })
}

/// Which payload cipher [`pack_with`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadCipher {
    /// ChaCha20-Poly1305 IETF, 12-byte nonce: what Credo and ACA-Py send and open.
    ChaCha20Poly1305,
    /// XChaCha20-Poly1305 IETF, 24-byte nonce: the indy-sdk form of RFC 0019. Real askar-based
    /// peers cannot open it; kept for tests and old agents.
    XChaCha20Poly1305,
}

/// Pack `plaintext` for every recipient (base58 or did:key); authcrypt when `sender` is given,
/// anoncrypt otherwise. Returns the envelope JSON.
pub fn pack(
    plaintext: &[u8],
    recipient_verkeys: &[String],
    sender: Option<&KeyPair>,
) -> Result<Vec<u8>, EnvelopeError> {
    pack_with(plaintext, recipient_verkeys, sender, PayloadCipher::ChaCha20Poly1305)
}

/// [`pack`] with a choice of payload cipher.
pub fn pack_with(
    plaintext: &[u8],
    recipient_verkeys: &[String],
    sender: Option<&KeyPair>,
    cipher: PayloadCipher,
) -> Result<Vec<u8>, EnvelopeError> {
    pack_cached(plaintext, recipient_verkeys, sender, cipher, None)
}

/// [`pack_with`] with the authcrypt box keys taken from (and kept in) `cache`.
pub fn pack_cached(
    plaintext: &[u8],
    recipient_verkeys: &[String],
    sender: Option<&KeyPair>,
    cipher: PayloadCipher,
    cache: Option<&BoxKeys>,
) -> Result<Vec<u8>, EnvelopeError> {
    if recipient_verkeys.is_empty() {
        return Err(EnvelopeError::NoRecipients);
    }
    if recipient_verkeys.len() > MAX_RECIPIENTS {
        return Err(EnvelopeError::TooManyRecipients(recipient_verkeys.len()));
    }
    let crypto = |e: askar_crypto::Error| EnvelopeError::Crypto(e.to_string());
    let mut cek = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut cek[..]);

    let mut recipients = Vec::with_capacity(recipient_verkeys.len());
    for rk in recipient_verkeys {
        let invalid = |source| EnvelopeError::InvalidKey { key: short(rk), source };
        let pk = keys::parse_verkey(rk).map_err(invalid)?;
        let kid = keys::verkey_to_base58(&pk);
        let rec = match sender {
            Some(sender) => {
                let (pair, fresh) = box_keys::lookup(cache, sender, &pk).map_err(invalid)?;
                let enc_sender = pair.sealed_sender(sender).map_err(invalid)?.to_owned();
                let mut nonce = [0u8; CBOX_NONCE_LEN];
                rand::Rng::fill(&mut rand::rngs::OsRng, &mut nonce[..]);
                let enc_cek = pair.seal(&cek, &nonce);
                if let (true, Some(c)) = (fresh, cache) {
                    c.insert(sender, &pk, pair);
                }
                RecipientOut {
                    encrypted_key: b64::encode(enc_cek.as_ref()),
                    header: RecipientHeaderOut {
                        kid,
                        sender: Some(enc_sender),
                        iv: Some(b64::encode(&nonce)),
                    },
                }
            }
            None => RecipientOut {
                encrypted_key: b64::encode(
                    &nacl::seal(
                        &keys::x25519_public_bytes(&keys::ed_to_x25519_public(&pk).map_err(invalid)?),
                        &cek,
                    )
                    .ok_or_else(|| EnvelopeError::Crypto("X25519 with a key of small order".into()))?,
                ),
                header: RecipientHeaderOut {
                    kid,
                    sender: None,
                    iv: None,
                },
            },
        };
        recipients.push(rec);
    }

    let protected = ProtectedOut {
        enc: ENC_LABEL,
        typ: TYP,
        alg: if sender.is_some() { "Authcrypt" } else { "Anoncrypt" },
        recipients,
    };
    let protected_json = serde_json::to_vec(&protected).map_err(|e| EnvelopeError::Crypto(e.to_string()))?;
    let protected_b64 = b64::encode(&protected_json);

    let mut buf = plaintext.to_vec();
    let nonce: Vec<u8> = match cipher {
        PayloadCipher::ChaCha20Poly1305 => {
            let mut n = vec![0u8; 12];
            rand::Rng::fill(&mut rand::rngs::OsRng, &mut n[..]);
            Chacha20Key::<C20P>::from_secret_bytes(&cek)
                .map_err(crypto)?
                .encrypt_in_place(&mut buf, &n, protected_b64.as_bytes())
                .map_err(crypto)?;
            n
        }
        PayloadCipher::XChaCha20Poly1305 => {
            let mut n = vec![0u8; 24];
            rand::Rng::fill(&mut rand::rngs::OsRng, &mut n[..]);
            Chacha20Key::<XC20P>::from_secret_bytes(&cek)
                .map_err(crypto)?
                .encrypt_in_place(&mut buf, &n, protected_b64.as_bytes())
                .map_err(crypto)?;
            n
        }
    };
    cek.fill(0);
    // encrypt_in_place appends the tag; the envelope carries it separately.
    let tag_start = buf.len().saturating_sub(TAG_LEN);
    let tag = buf.split_off(tag_start);
    let outer = Outer {
        protected: protected_b64,
        iv: b64::encode(&nonce),
        ciphertext: b64::encode(&buf),
        tag: b64::encode(&tag),
    };
    serde_json::to_vec(&outer).map_err(|e| EnvelopeError::Crypto(e.to_string()))
}

/// Wrap an already-packed message for delivery through mediators (routing 1.0 forward),
/// innermost routing key first as RFC 0094/Credo do: the first routing key's mediator gets a
/// forward `to` the recipient, the next one a forward `to` the first routing key, and so on.
/// Every layer is anoncrypt. Returns the outermost envelope; with no routing keys, `packed`
/// unchanged.
pub fn wrap_forward(packed: &[u8], to_verkey: &str, routing_keys: &[String]) -> Result<Vec<u8>, EnvelopeError> {
    if routing_keys.len() > MAX_ROUTING_KEYS {
        return Err(EnvelopeError::Malformed(format!(
            "more than {MAX_ROUTING_KEYS} routing keys"
        )));
    }
    let mut to = keys::normalize_verkey(to_verkey).map_err(|source| EnvelopeError::InvalidKey {
        key: short(to_verkey),
        source,
    })?;
    let mut current = packed.to_vec();
    for rk in routing_keys {
        let msg: serde_json::Value = serde_json::from_slice(&current).map_err(|_| EnvelopeError::NotJson)?;
        let forward = serde_json::json!({
            "@type": FORWARD_TYPE,
            "@id": super::message::new_id(),
            "to": to,
            "msg": msg,
        });
        let plaintext = serde_json::to_vec(&forward).map_err(|e| EnvelopeError::Crypto(e.to_string()))?;
        current = pack(&plaintext, std::slice::from_ref(rk), None)?;
        to = keys::normalize_verkey(rk).map_err(|source| EnvelopeError::InvalidKey { key: short(rk), source })?;
    }
    Ok(current)
}

/// Pack for a recipient's keys and wrap for its mediators in one go, as Credo's
/// `packMessage` does: `pack` to every recipient key, then [`wrap_forward`] with the first
/// recipient key as the forward `to`. Typically called with a resolved DID's
/// `recipient_keys` and `routing_keys`.
pub fn pack_for(
    plaintext: &[u8],
    recipient_keys: &[String],
    routing_keys: &[String],
    sender: Option<&KeyPair>,
) -> Result<Vec<u8>, EnvelopeError> {
    let first = recipient_keys.first().ok_or(EnvelopeError::NoRecipients)?;
    let packed = pack(plaintext, recipient_keys, sender)?;
    wrap_forward(&packed, first, routing_keys)
}

#[cfg(test)]
mod tests;
