//! DIDComm v2 JWE (JSON serialization, general and flattened).
//!
//! - anoncrypt: `ECDH-ES+A256KW` with `A256CBC-HS512`, `A256GCM` or `XC20P`;
//! - authcrypt: `ECDH-1PU+A256KW` with `A256CBC-HS512`, KDF per draft-madden-jose-ecdh-1pu-04
//!   (the content tag feeds the KDF). Read too: Veramo's 1PU without the tag in the KDF (its
//!   did-jwt "v3", for every enc) and its `A256GCM` / `XC20P` authcrypt.
//! - curves X25519, P-256, P-384; every point is checked on its curve when read; `epk`, the
//!   recipient's and the sender's keys must share a curve.
//! - `apu` (when present) must be b64url(`skid`); `apv` (when present) must be b64url(SHA-256
//!   of the sorted recipient kids joined by `.`). Veramo sends neither: absent is accepted.
//! - Veramo's `ECDH-ES+XC20PKW` / `ECDH-1PU+XC20PKW` are not DIDComm v2: refused.
//! - `zip` and `crit` are refused in any header: nothing here decompresses, and no JWE
//!   extension is implemented (RFC 7516 sections 4.1.3, 4.1.13).
//!
//! Read as typed members borrowed from the envelope, never as a JSON tree ([`super::json`]);
//! one recipient entry is tried per key of ours, whatever number name it.
//!
//! The AEAD's associated data is the `protected` member as sent (ASCII). Packing writes general
//! JSON with one `epk` in the protected header, `apv` always, `apu` for authcrypt; whether the
//! tag feeds the 1PU KDF is the caller's choice ([`Dialect`]) so a reply opens for its peer.

use askar_crypto::alg::{AesTypes, AnyKey, AnyKeyCreate, Chacha20Types, KeyAlg};
use askar_crypto::buffer::SecretBytes;
use askar_crypto::encrypt::KeyAeadInPlace;
use askar_crypto::kdf::concat::{ConcatKDFHash, ConcatKDFParams};
use askar_crypto::repr::ToSecretBytes;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::sync::Arc;
use zeroize::Zeroizing;

use super::keys::{self, Agreement, Key};
use super::{json, V2Error, TYP_ENCRYPTED};
use crate::didcomm::b64;

/// Most recipients read from one JWE.
pub const MAX_RECIPIENTS: usize = 32;
/// Longest `protected` member read (base64 characters).
pub const MAX_PROTECTED_LEN: usize = 16 * 1024;

pub const ALG_ANON: &str = "ECDH-ES+A256KW";
pub const ALG_AUTH: &str = "ECDH-1PU+A256KW";

/// Content encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    A256CbcHs512,
    A256Gcm,
    Xc20p,
}

impl Enc {
    pub fn label(self) -> &'static str {
        match self {
            Enc::A256CbcHs512 => "A256CBC-HS512",
            Enc::A256Gcm => "A256GCM",
            Enc::Xc20p => "XC20P",
        }
    }
    pub fn parse(s: &str) -> Option<Enc> {
        match s {
            "A256CBC-HS512" => Some(Enc::A256CbcHs512),
            "A256GCM" => Some(Enc::A256Gcm),
            "XC20P" => Some(Enc::Xc20p),
            _ => None,
        }
    }
    pub(super) fn key_alg(self) -> KeyAlg {
        match self {
            Enc::A256CbcHs512 => KeyAlg::Aes(AesTypes::A256CbcHs512),
            Enc::A256Gcm => KeyAlg::Aes(AesTypes::A256Gcm),
            Enc::Xc20p => KeyAlg::Chacha20(Chacha20Types::XC20P),
        }
    }
    /// (nonce, tag) lengths.
    fn sizes(self) -> (usize, usize) {
        match self {
            Enc::A256CbcHs512 => (16, 32),
            Enc::A256Gcm => (12, 16),
            Enc::Xc20p => (24, 16),
        }
    }
}

/// Key management.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    /// anoncrypt
    EcdhEsA256Kw,
    /// authcrypt
    Ecdh1PuA256Kw,
}

impl Alg {
    pub fn label(self) -> &'static str {
        match self {
            Alg::EcdhEsA256Kw => ALG_ANON,
            Alg::Ecdh1PuA256Kw => ALG_AUTH,
        }
    }
}

/// How a JWE was made; replies are packed the same way so the peer can open them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    pub alg: Alg,
    pub enc: Enc,
    /// 1PU only: the content tag fed the KDF (draft-04, the spec). `false`: Veramo's form.
    pub tag_in_kdf: bool,
}

impl Dialect {
    /// The spec's authcrypt.
    pub const AUTHCRYPT: Dialect = Dialect {
        alg: Alg::Ecdh1PuA256Kw,
        enc: Enc::A256CbcHs512,
        tag_in_kdf: true,
    };
    /// The spec's anoncrypt default.
    pub const ANONCRYPT: Dialect = Dialect {
        alg: Alg::EcdhEsA256Kw,
        enc: Enc::A256CbcHs512,
        tag_in_kdf: false,
    };
}

/// A successfully opened JWE.
#[derive(Debug, Clone)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    pub recipient_kid: String,
    pub sender_kid: Option<String>,
    pub dialect: Dialect,
    /// `apv` was present, and it names the envelope's recipients (checked): a recipient's
    /// entry cannot be renamed to another recipient's key.
    pub recipients_bound: bool,
    /// Some recipient is not one of our keys: others can open it too (and send it on).
    pub for_others: bool,
}

/// A JWE as sent, its members borrowed from its bytes: each checked to be JSON, none built
/// into a tree (a member of megabytes of `[0,0,...]` costs its own bytes, not 16-32 times
/// them). `header` and `encrypted_key` are the flattened form's one recipient.
#[derive(serde::Deserialize)]
struct JweIn<'a> {
    #[serde(borrow)]
    protected: Option<&'a RawValue>,
    #[serde(borrow)]
    recipients: Option<&'a RawValue>,
    #[serde(borrow)]
    header: Option<&'a RawValue>,
    #[serde(borrow)]
    encrypted_key: Option<&'a RawValue>,
    #[serde(borrow)]
    iv: Option<&'a RawValue>,
    #[serde(borrow)]
    ciphertext: Option<&'a RawValue>,
    #[serde(borrow)]
    tag: Option<&'a RawValue>,
    /// The shared unprotected header: read only for what [`refuse_unimplemented`] refuses.
    #[serde(borrow)]
    unprotected: Option<&'a RawValue>,
}

/// One entry of `recipients`.
#[derive(serde::Deserialize, Default)]
struct RecipientJson<'a> {
    #[serde(borrow)]
    header: Option<&'a RawValue>,
    #[serde(borrow)]
    encrypted_key: Option<&'a RawValue>,
}

/// A recipient's unprotected header.
#[derive(serde::Deserialize, Default)]
struct HeaderJson<'a> {
    #[serde(borrow)]
    kid: Option<&'a RawValue>,
    #[serde(borrow)]
    alg: Option<&'a RawValue>,
    #[serde(borrow)]
    epk: Option<&'a RawValue>,
    #[serde(borrow)]
    zip: Option<&'a RawValue>,
    #[serde(borrow)]
    crit: Option<&'a RawValue>,
}

/// The shared unprotected header: only what is refused there.
#[derive(serde::Deserialize, Default)]
struct UnprotectedJson<'a> {
    #[serde(borrow)]
    zip: Option<&'a RawValue>,
    #[serde(borrow)]
    crit: Option<&'a RawValue>,
}

/// The protected header: what it says, borrowed from its decoded bytes.
#[derive(serde::Deserialize, Default)]
struct ProtectedJson<'a> {
    #[serde(borrow)]
    alg: Option<&'a RawValue>,
    #[serde(borrow)]
    enc: Option<&'a RawValue>,
    #[serde(borrow)]
    apu: Option<&'a RawValue>,
    #[serde(borrow)]
    apv: Option<&'a RawValue>,
    #[serde(borrow)]
    skid: Option<&'a RawValue>,
    #[serde(borrow)]
    epk: Option<&'a RawValue>,
    #[serde(borrow)]
    zip: Option<&'a RawValue>,
    #[serde(borrow)]
    crit: Option<&'a RawValue>,
}

struct RecipientIn<'a> {
    kid: Cow<'a, str>,
    alg: Option<Cow<'a, str>>,
    encrypted_key: Vec<u8>,
    epk: Option<&'a RawValue>,
}

/// Longest `epk` JWK read (JSON text): a P-384 key is about 200 bytes.
const MAX_EPK_LEN: usize = 4 * 1024;

fn malformed(s: impl Into<String>) -> V2Error {
    V2Error::Malformed(s.into())
}

/// Refuses the header parameters this reader does not implement, in any header they appear
/// in: `zip` (RFC 7516 section 4.1.3) compresses the plaintext, which would be read as
/// "not JSON" with no word of why; `crit` (section 4.1.13) names extensions a recipient must
/// understand or refuse the JWE, and none is implemented here, so any `crit` is refused.
fn refuse_unimplemented(zip: Option<&RawValue>, crit: Option<&RawValue>) -> Result<(), V2Error> {
    if zip.is_some() {
        return Err(V2Error::UnsupportedAlg(
            "zip (a compressed plaintext is not read: send it uncompressed)".into(),
        ));
    }
    if crit.is_some() {
        return Err(V2Error::UnsupportedAlg(
            "crit (no JWE extension is implemented: send the JWE without crit)".into(),
        ));
    }
    Ok(())
}

/// A member's string decoded from base64url; refused when missing or not a string.
fn b64_member(raw: Option<&RawValue>, name: &str) -> Result<Vec<u8>, V2Error> {
    let s = json::opt_str(raw).ok_or_else(|| malformed(format!("missing {name}")))?;
    b64::decode(&s).ok_or_else(|| malformed(format!("{name} is not base64url")))
}

/// An `epk` JWK (a short object, so its tree is small).
fn epk_key(raw: &RawValue) -> Result<Key, V2Error> {
    if raw.get().len() > MAX_EPK_LEN {
        return Err(V2Error::BadKey("epk JWK too long".into()));
    }
    let jwk: Value = serde_json::from_str(raw.get()).map_err(|e| malformed(format!("epk: {e}")))?;
    keys::epk_from_jwk(&jwk)
}

/// The ciphertext decoded (as [`b64::decode`] reads base64) into a buffer with room for `room`
/// bytes more: the tag is appended for the in-place decryption without copying a ciphertext
/// of megabytes again.
fn decode_with_room(s: &str, room: usize) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::{alphabet, Engine};
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let mut out = Vec::with_capacity(base64::decoded_len_estimate(s.len()) + room + 1);
    for alphabet in [&alphabet::URL_SAFE, &alphabet::STANDARD] {
        out.clear();
        if GeneralPurpose::new(alphabet, config).decode_vec(s, &mut out).is_ok() {
            return Some(out);
        }
    }
    None
}

/// `apv` as DIDComm v2 defines it: b64url(SHA-256(sorted kids joined by '.')).
pub fn apv_for(kids: &[&str]) -> Vec<u8> {
    let mut sorted: Vec<&str> = kids.to_vec();
    sorted.sort_unstable();
    Sha256::digest(sorted.join(".").as_bytes()).to_vec()
}

/// Opens a JWE (JSON, general or flattened) given as bytes. `our_key` gives our private key
/// for a kid; `sender_key` resolves an authcrypt `skid` to the sender's public key agreement
/// key (an error if the DID has no such key).
pub fn unpack(
    bytes: &[u8],
    our_key: &dyn Fn(&str) -> Option<Agreement>,
    sender_key: &dyn Fn(&str) -> Result<Key, V2Error>,
) -> Result<Opened, V2Error> {
    if bytes.len() > super::MAX_ENVELOPE_LEN {
        return Err(V2Error::TooLarge(bytes.len()));
    }
    if !json::looks_like_object(bytes) {
        return Err(malformed("not a JSON object"));
    }
    let v: JweIn = serde_json::from_slice(bytes).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let protected_b64 = json::opt_str(v.protected).ok_or_else(|| malformed("missing protected"))?;
    if protected_b64.len() > MAX_PROTECTED_LEN {
        return Err(malformed("protected header too long"));
    }
    let protected_raw = b64::decode(&protected_b64)
        .filter(|raw| json::looks_like_object(raw))
        .ok_or_else(|| malformed("protected is not base64url JSON"))?;
    let protected: ProtectedJson =
        serde_json::from_slice(&protected_raw).map_err(|_| malformed("protected is not base64url JSON"))?;
    refuse_unimplemented(protected.zip, protected.crit)?;
    if let Some(u) = v.unprotected {
        let u: UnprotectedJson = json::object_or_default(u).map_err(|e| malformed(format!("unprotected: {e}")))?;
        refuse_unimplemented(u.zip, u.crit)?;
    }

    // Recipients: general (`recipients`) or flattened (`header` + `encrypted_key`).
    let mut recipients = Vec::new();
    if let Some(list) = v.recipients {
        let list = json::list(list, MAX_RECIPIENTS).ok_or_else(|| malformed("recipients is not an array"))?;
        if list.len > MAX_RECIPIENTS {
            return Err(V2Error::TooManyRecipients(list.len));
        }
        for r in list.first {
            let r: RecipientJson = json::object_or_default(r).map_err(|e| malformed(format!("recipient: {e}")))?;
            recipients.push(read_recipient(r.header, r.encrypted_key)?);
        }
    } else if v.encrypted_key.is_some() {
        recipients.push(read_recipient(v.header, v.encrypted_key)?);
    }
    let Some(first) = recipients.first() else {
        return Err(malformed("no recipients"));
    };

    let alg_label = json::opt_str(protected.alg)
        .or_else(|| first.alg.clone())
        .ok_or_else(|| malformed("missing alg"))?;
    let alg = match alg_label.as_ref() {
        ALG_ANON => Alg::EcdhEsA256Kw,
        ALG_AUTH => Alg::Ecdh1PuA256Kw,
        other => return Err(V2Error::UnsupportedAlg(other.chars().take(40).collect())),
    };
    let enc_label = json::opt_str(protected.enc).ok_or_else(|| malformed("missing enc"))?;
    let enc = Enc::parse(&enc_label).ok_or_else(|| V2Error::UnsupportedAlg(enc_label.chars().take(40).collect()))?;

    let apu = match json::opt_str(protected.apu) {
        Some(s) => Some(b64::decode(&s).ok_or_else(|| malformed("apu is not base64url"))?),
        None => None,
    };
    let apv = match json::opt_str(protected.apv) {
        Some(s) => Some(b64::decode(&s).ok_or_else(|| malformed("apv is not base64url"))?),
        None => None,
    };
    if let Some(apv) = &apv {
        let kids: Vec<&str> = recipients.iter().map(|r| r.kid.as_ref()).collect();
        if *apv != apv_for(&kids) {
            return Err(V2Error::ApvMismatch);
        }
    }

    let iv = b64_member(v.iv, "iv")?;
    // Checked now, decoded once a content key is unwrapped: an envelope not for us, or whose
    // key does not unwrap, costs no copy of its ciphertext.
    let ciphertext_b64 = json::opt_str(v.ciphertext).ok_or_else(|| malformed("missing ciphertext"))?;
    let tag = b64_member(v.tag, "tag")?;
    let (nonce_len, tag_len) = enc.sizes();
    if iv.len() != nonce_len {
        return Err(malformed(format!("iv must be {nonce_len} bytes for {}", enc.label())));
    }
    if tag.len() != tag_len {
        return Err(malformed(format!("tag must be {tag_len} bytes for {}", enc.label())));
    }

    // Which recipients are ours, before anything of the sender is resolved: an envelope that
    // is not for us costs no DID resolution, whatever its `skid` names.
    let (held, for_others) = ours_to_try(&recipients, our_key);
    if held.is_empty() {
        return Err(V2Error::UnknownKid);
    }

    // The sender, for authcrypt: skid (or apu) names a key agreement key of the sender's DID.
    let sender = match alg {
        Alg::EcdhEsA256Kw => None,
        Alg::Ecdh1PuA256Kw => {
            let skid = match (json::opt_str(protected.skid), &apu) {
                (Some(s), Some(apu)) => {
                    if apu.as_slice() != s.as_bytes() {
                        return Err(V2Error::ApuMismatch);
                    }
                    s.into_owned()
                }
                (Some(s), None) => s.into_owned(),
                (None, Some(apu)) => String::from_utf8(apu.clone()).map_err(|_| V2Error::ApuMismatch)?,
                (None, None) => return Err(malformed("authcrypt without skid")),
            };
            let key = sender_key(&skid)?;
            Some((skid, key))
        }
    };

    let mut last_err = V2Error::UnknownKid;
    for (r, ours) in held {
        // A256KW of a 256-bit (A256GCM, XC20P) or 512-bit (A256CBC-HS512) content key.
        let want_len = if enc == Enc::A256CbcHs512 { 72 } else { 40 };
        if r.encrypted_key.len() != want_len {
            return Err(V2Error::AlgEncMismatch {
                alg: alg_label.to_string(),
                enc: enc.label().to_string(),
            });
        }
        let epk_json = r.epk.or(protected.epk).ok_or_else(|| malformed("missing epk"))?;
        let epk = epk_key(epk_json)?;
        let curve = ours.key().algorithm();
        if epk.algorithm() != curve {
            return Err(V2Error::CurveMismatch(format!(
                "epk is {}, recipient key is {}",
                keys::curve_name(epk.algorithm()),
                keys::curve_name(curve)
            )));
        }
        if let Some((_, sk)) = &sender {
            if sk.algorithm() != curve {
                return Err(V2Error::CurveMismatch(format!(
                    "sender key is {}, recipient key is {}",
                    keys::curve_name(sk.algorithm()),
                    keys::curve_name(curve)
                )));
            }
        }
        // Z once: ECDH-ES's Ze, or ECDH-1PU's Ze || Zs (whichever way its KDF is then read).
        let mut z = ours.exchange(&epk)?;
        if let Some((_, sk)) = &sender {
            z.extend_from_slice(&ours.exchange(sk)?);
        }
        let apu_b = apu.as_deref().unwrap_or(&[]);
        let apv_b = apv.as_deref().unwrap_or(&[]);
        let attempts: &[bool] = match alg {
            Alg::EcdhEsA256Kw => &[false],
            Alg::Ecdh1PuA256Kw => &[true, false],
        };
        for &with_tag in attempts {
            let cc = if with_tag { tag.as_slice() } else { &[] };
            let kek = kek(&z, &alg_label, apu_b, apv_b, cc)?;
            let mut cek = SecretBytes::from_slice(&r.encrypted_key);
            if kek.decrypt_in_place(&mut cek, &[], &[]).is_err() {
                last_err = V2Error::Decrypt;
                continue;
            }
            let cek =
                Arc::<AnyKey>::from_secret_bytes(enc.key_alg(), cek.as_ref()).map_err(|_| V2Error::AlgEncMismatch {
                    alg: alg_label.to_string(),
                    enc: enc.label().to_string(),
                })?;
            let mut buf =
                decode_with_room(&ciphertext_b64, tag.len()).ok_or_else(|| malformed("ciphertext is not base64url"))?;
            buf.extend_from_slice(&tag);
            // Decrypted in place: the plaintext is the ciphertext's own buffer.
            let mut buf = SecretBytes::from(buf);
            if cek.decrypt_in_place(&mut buf, &iv, protected_b64.as_bytes()).is_err() {
                return Err(V2Error::Decrypt);
            }
            return Ok(Opened {
                plaintext: buf.into_vec(),
                recipient_kid: r.kid.to_string(),
                sender_kid: sender.as_ref().map(|(s, _)| s.clone()),
                dialect: Dialect {
                    alg,
                    enc,
                    tag_in_kdf: alg == Alg::Ecdh1PuA256Kw && with_tag,
                },
                recipients_bound: apv.is_some(),
                for_others,
            });
        }
    }
    Err(last_err)
}

/// The entries to try, each with our key it names, and whether some entry names a key not
/// ours (others can open the envelope too). Each kid is looked up once, and one entry is
/// tried per key of ours (the first naming it): a sender wraps the content key once for each
/// key, so a second entry for a key already tried is only a copy that costs a key exchange
/// (or two, for authcrypt) and opens nothing. Without this, an envelope of 32 entries naming
/// our key with made-up wrapped keys cost 32 exchanges (64 for authcrypt), anonymously.
fn ours_to_try<'r, 'a>(
    recipients: &'r [RecipientIn<'a>],
    our_key: &dyn Fn(&str) -> Option<Agreement>,
) -> (Vec<(&'r RecipientIn<'a>, Agreement)>, bool) {
    let mut looked_up: Vec<(&str, Option<Agreement>)> = Vec::new();
    let mut held: Vec<(&RecipientIn, Agreement)> = Vec::new();
    let mut for_others = false;
    for r in recipients {
        let ours = match looked_up.iter().find(|(kid, _)| *kid == r.kid.as_ref()) {
            Some((_, ours)) => ours.clone(),
            None => {
                let ours = our_key(&r.kid);
                looked_up.push((&r.kid, ours.clone()));
                ours
            }
        };
        match ours {
            None => for_others = true,
            Some(k) if !held.iter().any(|(_, h)| same_key(h, &k)) => held.push((r, k)),
            Some(_) => {}
        }
    }
    (held, for_others)
}

/// Whether two of our keys are one (looked up under two of its names).
fn same_key(a: &Agreement, b: &Agreement) -> bool {
    use askar_crypto::repr::ToPublicBytes;
    Arc::ptr_eq(a.key(), b.key())
        || matches!((a.key().to_public_bytes(), b.key().to_public_bytes()), (Ok(x), Ok(y)) if x == y)
}

fn read_recipient<'a>(
    header: Option<&'a RawValue>,
    encrypted_key: Option<&'a RawValue>,
) -> Result<RecipientIn<'a>, V2Error> {
    let header = header.ok_or_else(|| malformed("recipient without header"))?;
    let header: HeaderJson =
        json::object_or_default(header).map_err(|e| malformed(format!("recipient header: {e}")))?;
    refuse_unimplemented(header.zip, header.crit)?;
    let kid = json::opt_str(header.kid).ok_or_else(|| malformed("recipient without kid"))?;
    if kid.len() > crate::didcomm::did::MAX_DID_LEN {
        return Err(malformed("kid too long"));
    }
    let encrypted_key = b64_member(encrypted_key, "encrypted_key")?;
    if encrypted_key.len() > 128 {
        return Err(malformed("encrypted_key too long"));
    }
    Ok(RecipientIn {
        kid,
        alg: json::opt_str(header.alg),
        encrypted_key,
        epk: header.epk,
    })
}

/// The A256KW key from Z: ECDH-ES's (`z` = Ze, RFC 7518 section 4.6.2) or ECDH-1PU's (`z` =
/// Ze || Zs, and `cc_tag` the content's tag when it feeds the KDF, draft-madden-jose-ecdh-1pu-04
/// section 2.3): one pass of the Concat KDF with SHA-256, as askar derives both.
pub(super) fn kek(z: &[u8], alg: &str, apu: &[u8], apv: &[u8], cc_tag: &[u8]) -> Result<Key, V2Error> {
    if cc_tag.len() > 128 {
        return Err(malformed("tag too long for the key derivation"));
    }
    let mut pub_info = Vec::with_capacity(8 + cc_tag.len());
    pub_info.extend_from_slice(&256u32.to_be_bytes()); // the key's length in bits
    if !cc_tag.is_empty() {
        pub_info.extend_from_slice(&(cc_tag.len() as u32).to_be_bytes());
        pub_info.extend_from_slice(cc_tag);
    }
    let mut kdf = ConcatKDFHash::<Sha256>::new();
    kdf.start_pass();
    kdf.hash_message(z);
    kdf.hash_params(ConcatKDFParams {
        alg: alg.as_bytes(),
        apu,
        apv,
        pub_info: &pub_info,
        prv_info: &[],
    });
    let key = Zeroizing::new(<[u8; 32]>::from(kdf.finish_pass()));
    Arc::<AnyKey>::from_secret_bytes(KeyAlg::Aes(AesTypes::A256Kw), key.as_slice())
        .map_err(|e| V2Error::Crypto(format!("key derivation: {e}")))
}

/// Packs `plaintext` for `recipients` (kid, public key agreement key; one curve for all).
/// `sender` (skid, private key) makes it authcrypt (`dialect.alg` must then be 1PU).
pub fn pack(
    plaintext: &[u8],
    recipients: &[(String, Key)],
    sender: Option<(&str, &Agreement)>,
    dialect: Dialect,
) -> Result<Vec<u8>, V2Error> {
    let mut owned = Vec::with_capacity(plaintext.len() + PACK_ROOM);
    owned.extend_from_slice(plaintext);
    pack_owned(owned, recipients, sender, dialect)
}

/// Room a plaintext buffer needs past its end for [`pack_owned`] to encrypt it in place: the
/// padding of A256CBC-HS512 (up to 16 bytes) and the longest tag (32).
pub const PACK_ROOM: usize = 64;

/// [`pack`] of a plaintext the caller gives up: encrypted in its own buffer (give it
/// [`PACK_ROOM`] bytes of spare capacity, or the buffer grows by a copy), and the ciphertext
/// written into the JWE as base64 without a string of its own. A delivery of megabytes is
/// packed with its plaintext and the JWE alive at once, nothing more.
pub fn pack_owned(
    plaintext: Vec<u8>,
    recipients: &[(String, Key)],
    sender: Option<(&str, &Agreement)>,
    dialect: Dialect,
) -> Result<Vec<u8>, V2Error> {
    let first = recipients.first().ok_or_else(|| malformed("no recipients"))?;
    if recipients.len() > MAX_RECIPIENTS {
        return Err(V2Error::TooManyRecipients(recipients.len()));
    }
    let curve = first.1.algorithm();
    if !keys::is_agreement_alg(curve) {
        return Err(V2Error::BadKey(format!(
            "{} is not a key agreement key",
            keys::curve_name(curve)
        )));
    }
    if recipients.iter().any(|(_, k)| k.algorithm() != curve) {
        return Err(V2Error::CurveMismatch("recipients on different curves".into()));
    }
    match (sender.is_some(), dialect.alg) {
        (true, Alg::Ecdh1PuA256Kw) | (false, Alg::EcdhEsA256Kw) => {}
        _ => return Err(malformed("authcrypt needs a sender and ECDH-1PU; anoncrypt neither")),
    }
    if let Some((_, sk)) = sender {
        if sk.key().algorithm() != curve {
            return Err(V2Error::CurveMismatch(
                "sender key and recipients on different curves".into(),
            ));
        }
    }
    let alg_label = dialect.alg.label();
    let epk = Agreement::generate(curve)?;
    let kids: Vec<&str> = recipients.iter().map(|(k, _)| k.as_str()).collect();
    let apv = apv_for(&kids);
    let mut ph = Map::new();
    ph.insert("typ".into(), TYP_ENCRYPTED.into());
    ph.insert("alg".into(), alg_label.into());
    ph.insert("enc".into(), dialect.enc.label().into());
    ph.insert("apv".into(), b64::encode(&apv).into());
    let apu = sender.map(|(skid, _)| skid.as_bytes().to_vec()).unwrap_or_default();
    if let Some((skid, _)) = sender {
        ph.insert("skid".into(), skid.into());
        ph.insert("apu".into(), b64::encode(&apu).into());
    }
    ph.insert("epk".into(), keys::to_public_jwk(epk.key())?);
    let protected_b64 = b64::encode(Value::Object(ph).to_string().as_bytes());

    let cek = keys::generate(dialect.enc.key_alg())?;
    let (nonce_len, tag_len) = dialect.enc.sizes();
    let mut nonce = vec![0u8; nonce_len];
    askar_crypto::random::fill_random(&mut nonce);
    let mut buf = SecretBytes::from(plaintext);
    let ct_len = cek
        .encrypt_in_place(&mut buf, &nonce, protected_b64.as_bytes())
        .map_err(|e| V2Error::Crypto(e.to_string()))?;
    let (ct, tag) = buf.as_ref().split_at(ct_len);
    if tag.len() != tag_len {
        return Err(V2Error::Crypto("unexpected tag length".into()));
    }
    let cek_bytes = cek.to_secret_bytes().map_err(|e| V2Error::Crypto(e.to_string()))?;

    let mut out_recipients = Vec::with_capacity(recipients.len());
    for (kid, rk) in recipients {
        let mut z = epk.exchange(rk)?;
        if let Some((_, sk)) = sender {
            z.extend_from_slice(&sk.exchange(rk)?);
        }
        let cc: &[u8] = if sender.is_some() && dialect.tag_in_kdf {
            tag
        } else {
            &[]
        };
        let kek = kek(&z, alg_label, &apu, &apv, cc)?;
        let mut wrapped = SecretBytes::from_slice(cek_bytes.as_ref());
        kek.encrypt_in_place(&mut wrapped, &[], &[])
            .map_err(|e| V2Error::Crypto(format!("key wrap: {e}")))?;
        out_recipients.push(json!({ "header": { "kid": kid }, "encrypted_key": b64::encode(wrapped.as_ref()) }));
    }
    let jwe = JweOut {
        ciphertext: Base64(ct),
        iv: b64::encode(&nonce),
        protected: &protected_b64,
        recipients: out_recipients,
        tag: b64::encode(tag),
    };
    let mut out = Vec::with_capacity(ct.len() / 3 * 4 + 4 + protected_b64.len() + 256 * (1 + recipients.len()));
    serde_json::to_writer(&mut out, &jwe).map_err(|e| V2Error::Crypto(e.to_string()))?;
    Ok(out)
}

/// A packed JWE, its members in the order a JSON object of them was always written in (sorted).
#[derive(serde::Serialize)]
struct JweOut<'a> {
    ciphertext: Base64<'a>,
    iv: String,
    protected: &'a str,
    recipients: Vec<Value>,
    tag: String,
}

/// Bytes written as an unpadded base64url string straight into the output (serde_json's
/// `collect_str` streams a `Display`), never as a `String` of their own.
struct Base64<'a>(&'a [u8]);

impl serde::Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        s.collect_str(&base64::display::Base64Display::new(self.0, &URL_SAFE_NO_PAD))
    }
}

/// The kids a JWE is addressed to (for routing decisions before decrypting).
pub fn recipient_kids(v: &Value) -> Vec<String> {
    if let Some(list) = v.get("recipients").and_then(Value::as_array) {
        return list
            .iter()
            .take(MAX_RECIPIENTS)
            .filter_map(|r| r["header"]["kid"].as_str().map(str::to_string))
            .collect();
    }
    v["header"]["kid"]
        .as_str()
        .map(|k| vec![k.to_string()])
        .unwrap_or_default()
}

#[cfg(test)]
mod kdf_tests {
    use super::*;
    use askar_crypto::alg::EcCurves;
    use askar_crypto::kdf::{ecdh_1pu::Ecdh1PU, ecdh_es::EcdhEs};

    fn bytes(k: &Key) -> Vec<u8> {
        k.to_secret_bytes().unwrap().as_ref().to_vec()
    }

    fn askar_kek(kdf: impl askar_crypto::kdf::KeyDerivation) -> Vec<u8> {
        bytes(&Arc::<AnyKey>::from_key_derivation(KeyAlg::Aes(AesTypes::A256Kw), kdf).unwrap())
    }

    /// Z from AWS-LC (X25519) or askar (P-256, P-384) and our Concat KDF give askar's key
    /// encryption key, both ways, for ECDH-ES and for ECDH-1PU with and without the tag.
    #[test]
    fn kek_is_askars() {
        let (alg_es, alg_1pu, apu, apv, tag) = (ALG_ANON, ALG_AUTH, b"did:a#1", b"apv-bytes", [7u8; 16]);
        for curve in [
            KeyAlg::X25519,
            KeyAlg::EcCurve(EcCurves::Secp256r1),
            KeyAlg::EcCurve(EcCurves::Secp384r1),
        ] {
            for _ in 0..8 {
                let eph = Agreement::generate(curve).unwrap();
                let (recip, sender) = (keys::generate(curve).unwrap(), keys::generate(curve).unwrap());
                // `eph` is what `pack` makes: for X25519 only AWS-LC holds its secret, so askar
                // reads it as a public key (the receiving side) and Z both ways must agree.
                let recip_pub = keys::from_jwk(&keys::to_public_jwk(&recip).unwrap()).unwrap();
                let (ours_r, ours_s) = (Agreement::new(recip.clone()), Agreement::new(sender.clone()));

                // Receiving: Ze (and Zs) with the recipient's secret.
                let ze = ours_r.exchange(eph.key()).unwrap();
                let want = askar_kek(EcdhEs::new(
                    eph.key().as_ref(),
                    recip.as_ref(),
                    alg_es.as_bytes(),
                    apu,
                    apv,
                    true,
                ));
                assert_eq!(bytes(&kek(&ze, alg_es, apu, apv, &[]).unwrap()), want, "{curve:?} ES");
                let mut z = ze.clone();
                z.extend_from_slice(&ours_r.exchange(&sender).unwrap());
                for cc in [&tag[..], &[]] {
                    let want = askar_kek(Ecdh1PU::new(
                        eph.key().as_ref(),
                        sender.as_ref(),
                        recip.as_ref(),
                        alg_1pu.as_bytes(),
                        apu,
                        apv,
                        cc,
                        true,
                    ));
                    assert_eq!(bytes(&kek(&z, alg_1pu, apu, apv, cc).unwrap()), want, "{curve:?} 1PU");
                }

                // Sending: the same Z from the other side.
                let mut z2 = eph.exchange(&recip_pub).unwrap();
                assert_eq!(*z2, *ze, "{curve:?} Ze both ways");
                z2.extend_from_slice(&ours_s.exchange(&recip_pub).unwrap());
                assert_eq!(*z2, *z, "{curve:?} Ze || Zs both ways");
            }
        }
    }

    /// RFC 8037 appendix A.6: the ECDH-ES shared secret of its X25519 keys, through AWS-LC.
    #[test]
    fn rfc8037_x25519_vector() {
        let eph = keys::from_jwk(&serde_json::json!({"kty":"OKP","crv":"X25519",
            "d":"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo",
            "x":"hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"}))
        .unwrap();
        let bob = keys::from_jwk(&serde_json::json!({"kty":"OKP","crv":"X25519",
            "x":"3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08"}))
        .unwrap();
        let z = Agreement::new(eph).exchange(&bob).unwrap();
        assert_eq!(
            crate::didcomm::b64::encode(&z),
            crate::didcomm::b64::encode(&[
                0x4a, 0x5d, 0x9d, 0x5b, 0xa4, 0xce, 0x2d, 0xe1, 0x72, 0x8e, 0x3b, 0xf4, 0x80, 0x35, 0x0f, 0x25, 0xe0,
                0x7e, 0x21, 0xc9, 0x47, 0xd1, 0x9e, 0x33, 0x76, 0xf0, 0x9b, 0x3c, 0x1e, 0x16, 0x17, 0x42
            ])
        );
    }
}
