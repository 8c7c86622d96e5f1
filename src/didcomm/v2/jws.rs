//! DIDComm v2 signed messages (JWS JSON, general and flattened): EdDSA (Ed25519), ES256
//! (P-256), ES256K (secp256k1). Used for signed messages and `from_prior`.

use askar_crypto::alg::{EcCurves, KeyAlg};
use askar_crypto::sign::{KeySigVerify, KeySign};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::borrow::Cow;

use super::keys::Key;
use super::{json, V2Error, TYP_SIGNED};
use crate::didcomm::b64;

/// Most signatures read from one JWS.
pub const MAX_SIGNATURES: usize = 8;
/// Length of an EdDSA, ES256 or ES256K signature (JWS form: `r || s` for ECDSA).
const SIGNATURE_LEN: usize = 64;

fn sig_err(s: impl Into<String>) -> V2Error {
    V2Error::Signature(s.into())
}

/// The key algorithm a JWS `alg` requires.
pub fn alg_key(alg: &str) -> Option<KeyAlg> {
    match alg {
        "EdDSA" => Some(KeyAlg::Ed25519),
        "ES256" => Some(KeyAlg::EcCurve(EcCurves::Secp256r1)),
        "ES256K" => Some(KeyAlg::EcCurve(EcCurves::Secp256k1)),
        _ => None,
    }
}

fn key_jws_alg(alg: KeyAlg) -> Option<&'static str> {
    match alg {
        KeyAlg::Ed25519 => Some("EdDSA"),
        KeyAlg::EcCurve(EcCurves::Secp256r1) => Some("ES256"),
        KeyAlg::EcCurve(EcCurves::Secp256k1) => Some("ES256K"),
        _ => None,
    }
}

/// One signature of a JWS: its members as strings (absent when missing or not strings).
struct SigIn<'a> {
    protected: Option<Cow<'a, str>>,
    signature: Option<Cow<'a, str>>,
    /// `header.kid`, where the protected header names none.
    header_kid: Option<Cow<'a, str>>,
}

impl<'a> SigIn<'a> {
    fn of_value(s: &'a Value) -> SigIn<'a> {
        let str_of = |v: &'a Value| v.as_str().map(Cow::Borrowed);
        SigIn {
            protected: s.get("protected").and_then(str_of),
            signature: s.get("signature").and_then(str_of),
            header_kid: s.get("header").and_then(|h| h.get("kid")).and_then(str_of),
        }
    }
}

/// A JWS as sent (general with `signatures`, or flattened), its members borrowed from its
/// bytes: checked to be JSON, none built into a tree.
#[derive(serde::Deserialize, Default)]
struct JwsIn<'a> {
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    signatures: Option<&'a RawValue>,
    #[serde(borrow)]
    protected: Option<&'a RawValue>,
    #[serde(borrow)]
    signature: Option<&'a RawValue>,
    #[serde(borrow)]
    header: Option<&'a RawValue>,
}

/// A signature's unprotected header, or the protected one: the members read here.
#[derive(serde::Deserialize, Default)]
struct HeaderIn<'a> {
    #[serde(borrow)]
    alg: Option<&'a RawValue>,
    #[serde(borrow)]
    kid: Option<&'a RawValue>,
}

/// `raw` read as `T` if it is a JSON object, else `T`'s default (nothing in it).
fn read_or_default<'a, T: serde::Deserialize<'a> + Default>(raw: Option<&'a RawValue>) -> T {
    raw.and_then(|r| json::object_or_default(r).ok()).unwrap_or_default()
}

impl<'a> JwsIn<'a> {
    /// This JWS's own members read as its one signature (the flattened form).
    fn flattened(&self) -> SigIn<'a> {
        let header: HeaderIn = read_or_default(self.header);
        SigIn {
            protected: json::opt_str(self.protected),
            signature: json::opt_str(self.signature),
            header_kid: json::opt_str(header.kid),
        }
    }
}

/// Verifies a JWS; returns the payload and the kid of the (first valid) signature.
/// `resolve` finds the signer's public key by its kid (a DID URL).
pub fn verify(jws: &Value, resolve: &dyn Fn(&str) -> Result<Key, V2Error>) -> Result<(Vec<u8>, String), V2Error> {
    let payload_b64 = jws
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| sig_err("missing payload"))?;
    let sigs: Vec<SigIn> = match jws.get("signatures") {
        Some(Value::Array(a)) => a.iter().take(MAX_SIGNATURES + 1).map(SigIn::of_value).collect(),
        Some(_) => return Err(sig_err("signatures is not an array")),
        None => vec![SigIn::of_value(jws)],
    };
    verify_signatures(payload_b64, &sigs, resolve)
}

/// [`verify`] of a JWS given as bytes, read without a JSON tree.
pub fn verify_slice(
    bytes: &[u8],
    resolve: &dyn Fn(&str) -> Result<Key, V2Error>,
) -> Result<(Vec<u8>, String), V2Error> {
    if !json::looks_like_object(bytes) {
        return Err(sig_err("not a JSON object"));
    }
    let jws: JwsIn = serde_json::from_slice(bytes).map_err(|e| sig_err(format!("not JSON: {e}")))?;
    let payload_b64 = json::opt_str(jws.payload).ok_or_else(|| sig_err("missing payload"))?;
    let sigs: Vec<SigIn> = match jws.signatures {
        Some(raw) => {
            let list = json::list(raw, MAX_SIGNATURES + 1).ok_or_else(|| sig_err("signatures is not an array"))?;
            list.first
                .into_iter()
                .map(|s| {
                    let s: JwsIn = read_or_default(Some(s));
                    s.flattened()
                })
                .collect()
        }
        None => vec![jws.flattened()],
    };
    verify_signatures(&payload_b64, &sigs, resolve)
}

fn verify_signatures(
    payload_b64: &str,
    sigs: &[SigIn],
    resolve: &dyn Fn(&str) -> Result<Key, V2Error>,
) -> Result<(Vec<u8>, String), V2Error> {
    let payload = b64::decode(payload_b64).ok_or_else(|| sig_err("payload is not base64url"))?;
    if sigs.is_empty() || sigs.len() > MAX_SIGNATURES {
        return Err(sig_err("between 1 and 8 signatures required"));
    }
    let mut last = sig_err("no signature");
    for s in sigs {
        match verify_one(payload_b64, s, resolve) {
            Ok(kid) => return Ok((payload, kid)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn verify_one(payload_b64: &str, s: &SigIn, resolve: &dyn Fn(&str) -> Result<Key, V2Error>) -> Result<String, V2Error> {
    let protected_b64 = s.protected.as_deref().ok_or_else(|| sig_err("missing protected"))?;
    let protected_raw = b64::decode(protected_b64)
        .filter(|raw| json::looks_like_object(raw))
        .ok_or_else(|| sig_err("protected is not base64url JSON"))?;
    let protected: HeaderIn =
        serde_json::from_slice(&protected_raw).map_err(|_| sig_err("protected is not base64url JSON"))?;
    let alg = json::opt_str(protected.alg).ok_or_else(|| sig_err("missing alg"))?;
    let want = alg_key(&alg).ok_or_else(|| V2Error::UnsupportedAlg(alg.chars().take(40).collect()))?;
    let kid = json::opt_str(protected.kid)
        .or_else(|| s.header_kid.clone())
        .ok_or_else(|| sig_err("missing kid"))?;
    // Everything that can be checked without the signer's key is, before its DID is resolved.
    let sig = s
        .signature
        .as_deref()
        .and_then(b64::decode)
        .ok_or_else(|| sig_err("signature is not base64url"))?;
    if sig.len() != SIGNATURE_LEN {
        return Err(sig_err(format!("an {alg} signature is {SIGNATURE_LEN} bytes")));
    }
    let key = resolve(&kid)?;
    if key.algorithm() != want {
        return Err(sig_err(format!(
            "{alg} signature by a {} key",
            key.algorithm().as_str()
        )));
    }
    let input = format!("{protected_b64}.{payload_b64}");
    match key.verify_signature(input.as_bytes(), &sig, None) {
        Ok(true) => Ok(kid.into_owned()),
        _ => Err(sig_err(format!("signature by {kid} does not verify"))),
    }
}

/// Signs `payload` as a general JWS with one signature by `key` (named `kid`).
pub fn sign(payload: &[u8], kid: &str, key: &Key) -> Result<Value, V2Error> {
    let alg = key_jws_alg(key.algorithm()).ok_or_else(|| V2Error::UnsupportedAlg(key.algorithm().as_str().into()))?;
    let protected = b64::encode(
        json!({ "typ": TYP_SIGNED, "alg": alg, "kid": kid })
            .to_string()
            .as_bytes(),
    );
    let payload_b64 = b64::encode(payload);
    let input = format!("{protected}.{payload_b64}");
    let sig = key
        .create_signature(input.as_bytes(), None)
        .map_err(|e| V2Error::Crypto(e.to_string()))?;
    Ok(json!({
        "payload": payload_b64,
        "signatures": [{ "protected": protected, "signature": b64::encode(sig.as_ref()), "header": { "kid": kid } }],
    }))
}

/// Longest compact JWT read (`from_prior`).
pub const MAX_JWT_LEN: usize = 8 * 1024;

/// Signs `claims` as a compact JWT (`header.payload.signature`, header `typ: JWT`) by `key`,
/// named `kid`: the form of a DIDComm v2 `from_prior`.
pub fn sign_jwt(claims: &Value, kid: &str, key: &Key) -> Result<String, V2Error> {
    let alg = key_jws_alg(key.algorithm()).ok_or_else(|| V2Error::UnsupportedAlg(key.algorithm().as_str().into()))?;
    let header = b64::encode(json!({ "typ": "JWT", "alg": alg, "kid": kid }).to_string().as_bytes());
    let payload = b64::encode(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    let sig = key
        .create_signature(input.as_bytes(), None)
        .map_err(|e| V2Error::Crypto(e.to_string()))?;
    Ok(format!("{input}.{}", b64::encode(sig.as_ref())))
}

/// Verifies a compact JWT (the header names the signer's `kid`); returns its claims (a JSON
/// object) and that kid. `resolve` finds the public key of a kid, as for [`verify`].
pub fn verify_jwt(jwt: &str, resolve: &dyn Fn(&str) -> Result<Key, V2Error>) -> Result<(Value, String), V2Error> {
    if jwt.len() > MAX_JWT_LEN {
        return Err(sig_err(format!("JWT longer than {MAX_JWT_LEN} bytes")));
    }
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(sig_err("a compact JWT has three parts"));
    };
    let as_jws = json!({ "protected": header, "payload": payload, "signature": signature });
    let (claims, kid) = verify(&as_jws, resolve)?;
    let claims: Value = serde_json::from_slice(&claims)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| sig_err("JWT claims are not a JSON object"))?;
    Ok((claims, kid))
}
