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
//!
//! The AEAD's associated data is the `protected` member as sent (ASCII). Packing writes general
//! JSON with one `epk` in the protected header, `apv` always, `apu` for authcrypt; whether the
//! tag feeds the 1PU KDF is the caller's choice ([`Dialect`]) so a reply opens for its peer.

use askar_crypto::alg::{AesTypes, AnyKey, AnyKeyCreate, Chacha20Types, KeyAlg};
use askar_crypto::buffer::SecretBytes;
use askar_crypto::encrypt::KeyAeadInPlace;
use askar_crypto::kdf::concat::{ConcatKDFHash, ConcatKDFParams};
use askar_crypto::repr::ToSecretBytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use zeroize::Zeroizing;

use super::keys::{self, Agreement, Key};
use super::{V2Error, TYP_ENCRYPTED};
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

struct RecipientIn {
    kid: String,
    encrypted_key: Vec<u8>,
    epk: Option<Value>,
}

fn malformed(s: impl Into<String>) -> V2Error {
    V2Error::Malformed(s.into())
}

fn b64_field(v: &Value, name: &str) -> Result<Vec<u8>, V2Error> {
    let s = v
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(format!("missing {name}")))?;
    b64::decode(s).ok_or_else(|| malformed(format!("{name} is not base64url")))
}

fn header_str<'a>(h: &'a Value, name: &str) -> Option<&'a str> {
    h.get(name).and_then(Value::as_str)
}

/// `apv` as DIDComm v2 defines it: b64url(SHA-256(sorted kids joined by '.')).
pub fn apv_for(kids: &[&str]) -> Vec<u8> {
    let mut sorted: Vec<&str> = kids.to_vec();
    sorted.sort_unstable();
    Sha256::digest(sorted.join(".").as_bytes()).to_vec()
}

/// Opens a JWE given as bytes.
pub fn unpack(
    bytes: &[u8],
    our_key: &dyn Fn(&str) -> Option<Agreement>,
    sender_key: &dyn Fn(&str) -> Result<Key, V2Error>,
) -> Result<Opened, V2Error> {
    if bytes.len() > super::MAX_ENVELOPE_LEN {
        return Err(V2Error::TooLarge(bytes.len()));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|e| malformed(format!("not JSON: {e}")))?;
    unpack_value(&v, our_key, sender_key)
}

/// Opens a parsed JWE. `our_key` gives our private key for a kid; `sender_key` resolves an
/// authcrypt `skid` to the sender's public key agreement key (an error if the DID has no
/// such key).
pub fn unpack_value(
    v: &Value,
    our_key: &dyn Fn(&str) -> Option<Agreement>,
    sender_key: &dyn Fn(&str) -> Result<Key, V2Error>,
) -> Result<Opened, V2Error> {
    let protected_b64 = v
        .get("protected")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("missing protected"))?;
    if protected_b64.len() > MAX_PROTECTED_LEN {
        return Err(malformed("protected header too long"));
    }
    let protected: Value = b64::decode(protected_b64)
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .filter(Value::is_object)
        .ok_or_else(|| malformed("protected is not base64url JSON"))?;

    // Recipients: general (`recipients`) or flattened (`header` + `encrypted_key`).
    let mut recipients = Vec::new();
    if let Some(list) = v.get("recipients") {
        let list = list.as_array().ok_or_else(|| malformed("recipients is not an array"))?;
        if list.len() > MAX_RECIPIENTS {
            return Err(V2Error::TooManyRecipients(list.len()));
        }
        for r in list {
            recipients.push(read_recipient(r)?);
        }
    } else if v.get("encrypted_key").is_some() {
        recipients.push(read_recipient(v)?);
    }
    if recipients.is_empty() {
        return Err(malformed("no recipients"));
    }

    let alg_label = header_str(&protected, "alg")
        .or_else(|| v["recipients"][0]["header"]["alg"].as_str())
        .or_else(|| v["header"]["alg"].as_str())
        .ok_or_else(|| malformed("missing alg"))?;
    let alg = match alg_label {
        ALG_ANON => Alg::EcdhEsA256Kw,
        ALG_AUTH => Alg::Ecdh1PuA256Kw,
        other => return Err(V2Error::UnsupportedAlg(other.chars().take(40).collect())),
    };
    let enc_label = header_str(&protected, "enc").ok_or_else(|| malformed("missing enc"))?;
    let enc = Enc::parse(enc_label).ok_or_else(|| V2Error::UnsupportedAlg(enc_label.chars().take(40).collect()))?;

    let apu = match header_str(&protected, "apu") {
        Some(s) => Some(b64::decode(s).ok_or_else(|| malformed("apu is not base64url"))?),
        None => None,
    };
    let apv = match header_str(&protected, "apv") {
        Some(s) => Some(b64::decode(s).ok_or_else(|| malformed("apv is not base64url"))?),
        None => None,
    };
    if let Some(apv) = &apv {
        let kids: Vec<&str> = recipients.iter().map(|r| r.kid.as_str()).collect();
        if *apv != apv_for(&kids) {
            return Err(V2Error::ApvMismatch);
        }
    }

    let iv = b64_field(v, "iv")?;
    let ciphertext = b64_field(v, "ciphertext")?;
    let tag = b64_field(v, "tag")?;
    let (nonce_len, tag_len) = enc.sizes();
    if iv.len() != nonce_len {
        return Err(malformed(format!("iv must be {nonce_len} bytes for {}", enc.label())));
    }
    if tag.len() != tag_len {
        return Err(malformed(format!("tag must be {tag_len} bytes for {}", enc.label())));
    }

    // Which recipients are ours, before anything of the sender is resolved: an envelope that
    // is not for us costs no DID resolution, whatever its `skid` names.
    let held: Vec<(&RecipientIn, Agreement)> = recipients.iter().filter_map(|r| Some((r, our_key(&r.kid)?))).collect();
    if held.is_empty() {
        return Err(V2Error::UnknownKid);
    }
    let for_others = held.len() < recipients.len();

    // The sender, for authcrypt: skid (or apu) names a key agreement key of the sender's DID.
    let sender = match alg {
        Alg::EcdhEsA256Kw => None,
        Alg::Ecdh1PuA256Kw => {
            let skid = match (header_str(&protected, "skid"), &apu) {
                (Some(s), Some(apu)) => {
                    if apu.as_slice() != s.as_bytes() {
                        return Err(V2Error::ApuMismatch);
                    }
                    s.to_string()
                }
                (Some(s), None) => s.to_string(),
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
        let epk_json = r
            .epk
            .as_ref()
            .or_else(|| protected.get("epk"))
            .ok_or_else(|| malformed("missing epk"))?;
        let epk = keys::epk_from_jwk(epk_json)?;
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
            let kek = kek(&z, alg_label, apu_b, apv_b, cc)?;
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
            let mut buf = SecretBytes::with_capacity(ciphertext.len() + tag.len());
            buf.extend_from_slice(&ciphertext);
            buf.extend_from_slice(&tag);
            if cek.decrypt_in_place(&mut buf, &iv, protected_b64.as_bytes()).is_err() {
                return Err(V2Error::Decrypt);
            }
            return Ok(Opened {
                plaintext: buf.as_ref().to_vec(),
                recipient_kid: r.kid.clone(),
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

fn read_recipient(r: &Value) -> Result<RecipientIn, V2Error> {
    let header = r.get("header").ok_or_else(|| malformed("recipient without header"))?;
    let kid = header_str(header, "kid")
        .ok_or_else(|| malformed("recipient without kid"))?
        .to_string();
    if kid.len() > crate::didcomm::did::MAX_DID_LEN {
        return Err(malformed("kid too long"));
    }
    let encrypted_key = b64_field(r, "encrypted_key")?;
    if encrypted_key.len() > 128 {
        return Err(malformed("encrypted_key too long"));
    }
    Ok(RecipientIn {
        kid,
        encrypted_key,
        epk: header.get("epk").cloned(),
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
    let mut buf = SecretBytes::from_slice(plaintext);
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
    let jwe = json!({
        "protected": protected_b64,
        "recipients": out_recipients,
        "iv": b64::encode(&nonce),
        "ciphertext": b64::encode(ct),
        "tag": b64::encode(tag),
    });
    serde_json::to_vec(&jwe).map_err(|e| V2Error::Crypto(e.to_string()))
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
