//! DIDComm v2 signed messages (JWS JSON, general and flattened): EdDSA (Ed25519), ES256
//! (P-256), ES256K (secp256k1). Used for signed messages and `from_prior`.

use askar_crypto::alg::{EcCurves, KeyAlg};
use askar_crypto::sign::{KeySigVerify, KeySign};
use serde_json::{json, Value};

use super::keys::Key;
use super::{V2Error, TYP_SIGNED};
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

/// Verifies a JWS; returns the payload and the kid of the (first valid) signature.
/// `resolve` finds the signer's public key by its kid (a DID URL).
pub fn verify(jws: &Value, resolve: &dyn Fn(&str) -> Result<Key, V2Error>) -> Result<(Vec<u8>, String), V2Error> {
    let payload_b64 = jws
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| sig_err("missing payload"))?;
    let payload = b64::decode(payload_b64).ok_or_else(|| sig_err("payload is not base64url"))?;
    let sigs: Vec<&Value> = match jws.get("signatures") {
        Some(Value::Array(a)) => a.iter().take(MAX_SIGNATURES + 1).collect(),
        Some(_) => return Err(sig_err("signatures is not an array")),
        None => vec![jws],
    };
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

fn verify_one(payload_b64: &str, s: &Value, resolve: &dyn Fn(&str) -> Result<Key, V2Error>) -> Result<String, V2Error> {
    let protected_b64 = s
        .get("protected")
        .and_then(Value::as_str)
        .ok_or_else(|| sig_err("missing protected"))?;
    let protected: Value = b64::decode(protected_b64)
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .filter(Value::is_object)
        .ok_or_else(|| sig_err("protected is not base64url JSON"))?;
    let alg = protected["alg"].as_str().ok_or_else(|| sig_err("missing alg"))?;
    let want = alg_key(alg).ok_or_else(|| V2Error::UnsupportedAlg(alg.chars().take(40).collect()))?;
    let kid = protected["kid"]
        .as_str()
        .or_else(|| s["header"]["kid"].as_str())
        .ok_or_else(|| sig_err("missing kid"))?;
    // Everything that can be checked without the signer's key is, before its DID is resolved.
    let sig = s
        .get("signature")
        .and_then(Value::as_str)
        .and_then(b64::decode)
        .ok_or_else(|| sig_err("signature is not base64url"))?;
    if sig.len() != SIGNATURE_LEN {
        return Err(sig_err(format!("an {alg} signature is {SIGNATURE_LEN} bytes")));
    }
    let key = resolve(kid)?;
    if key.algorithm() != want {
        return Err(sig_err(format!(
            "{alg} signature by a {} key",
            key.algorithm().as_str()
        )));
    }
    let input = format!("{protected_b64}.{payload_b64}");
    match key.verify_signature(input.as_bytes(), &sig, None) {
        Ok(true) => Ok(kid.to_string()),
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
