//! Signed attachments: the JWS on an attachment's `data.base64` (didexchange 1.1
//! `did_rotate~attach`, 1.0 `did_doc~attach`), and the connections 1.0 `connection~sig`
//! (RFC 0160, `ed25519Sha512_single`).

use serde_json::{json, Value};

use super::b64;
use super::keys::{self, KeyPair};

/// `@type`s of the connections 1.0 signature decorator (new and legacy prefix).
pub const SIG_TYPE: &str = "https://didcomm.org/signature/1.0/ed25519Sha512_single";
const SIG_TYPE_LEGACY: &str = "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/signature/1.0/ed25519Sha512_single";

/// Most signatures read from one general-form JWS (Credo 0.6.3 writes the same one twice).
pub const MAX_SIGNATURES: usize = 8;
/// Longest signed payload we decode (base64 characters). Attached DID docs are a few KiB.
pub const MAX_SIGNED_LEN: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwsError {
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("unsupported signature algorithm: {0}")]
    UnsupportedAlg(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("the signatures name different keys")]
    KeyMismatch,
    #[error("bad signer key: {0}")]
    Key(#[from] keys::KeyError),
}

fn malformed(s: &str) -> JwsError {
    JwsError::Malformed(s.to_owned())
}

/// The JWS payload segment for attachment data: unpadded base64url of the decoded bytes,
/// which is what both Credo (re-encodes the bytes) and ACA-Py (converts the string to
/// urlsafe and unpads it) sign, whatever padding or alphabet `data.base64` used.
fn payload_segment(data_base64: &str) -> Result<String, JwsError> {
    if data_base64.len() > MAX_SIGNED_LEN {
        return Err(malformed("attachment data too large"));
    }
    let bytes = b64::decode(data_base64).ok_or_else(|| malformed("data.base64 is not base64"))?;
    Ok(b64::encode(&bytes))
}

/// Sign attachment data; returns the `jws` object to put beside `base64` in `data`, in the
/// flattened form ACA-Py writes (Credo and ACA-Py both verify flattened and general forms).
pub fn sign_attachment_base64(data_base64: &str, key: &KeyPair) -> Value {
    let did_key = key.did_key();
    let protected = json!({
        "alg": "EdDSA",
        "jwk": {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64::encode(&key.public_bytes()),
            "kid": did_key,
        }
    });
    let protected_b64 = b64::encode(protected.to_string().as_bytes());
    // Our own data: if it is not base64, sign the string re-encoded so the output is at least
    // self-consistent; callers always pass base64 they produced.
    let payload = payload_segment(data_base64).unwrap_or_else(|_| b64::encode(data_base64.as_bytes()));
    let sig = key.sign(format!("{protected_b64}.{payload}").as_bytes());
    json!({
        "header": {"kid": did_key},
        "protected": protected_b64,
        "signature": b64::encode(&sig),
    })
}

/// Verify the `jws` of attachment data (flattened or general form; every signature must
/// verify and name the same key). Returns the signer's base58 verkey.
pub fn verify_attachment_base64(data_base64: &str, jws: &Value) -> Result<String, JwsError> {
    let payload = payload_segment(data_base64)?;
    let sigs: Vec<&Value> = match jws.get("signatures") {
        Some(Value::Array(a)) => {
            if a.len() > MAX_SIGNATURES {
                return Err(malformed("too many signatures"));
            }
            a.iter().collect()
        }
        Some(_) => return Err(malformed("signatures is not an array")),
        None => vec![jws],
    };
    if sigs.is_empty() {
        return Err(malformed("no signatures"));
    }
    let mut signer: Option<[u8; 32]> = None;
    for sig in sigs {
        let pk = verify_one(&payload, sig)?;
        match signer {
            Some(prev) if prev != pk => return Err(JwsError::KeyMismatch),
            _ => signer = Some(pk),
        }
    }
    signer
        .map(|pk| keys::verkey_to_base58(&pk))
        .ok_or_else(|| malformed("no signatures"))
}

fn verify_one(payload: &str, sig: &Value) -> Result<[u8; 32], JwsError> {
    let protected_b64 = sig
        .get("protected")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("protected missing"))?;
    if protected_b64.len() > 16 * 1024 {
        return Err(malformed("protected too large"));
    }
    let protected: Value = b64::decode(protected_b64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| malformed("protected is not base64 JSON"))?;
    match protected.get("alg").and_then(Value::as_str) {
        Some("EdDSA") => {}
        other => {
            return Err(JwsError::UnsupportedAlg(
                other.unwrap_or("none").chars().take(40).collect(),
            ))
        }
    }
    let jwk_key = match protected.get("jwk") {
        Some(jwk) => {
            if jwk.get("kty").and_then(Value::as_str) != Some("OKP")
                || jwk.get("crv").and_then(Value::as_str) != Some("Ed25519")
            {
                return Err(JwsError::UnsupportedAlg("jwk is not an Ed25519 OKP key".into()));
            }
            let x = jwk
                .get("x")
                .and_then(Value::as_str)
                .and_then(b64::decode)
                .ok_or_else(|| malformed("jwk.x is not base64"))?;
            let pk: [u8; 32] = x.try_into().map_err(|_| malformed("jwk.x is not 32 bytes"))?;
            Some(pk)
        }
        None => None,
    };
    let kid = sig
        .get("header")
        .and_then(|h| h.get("kid"))
        .or_else(|| protected.get("kid"))
        .and_then(Value::as_str);
    let kid_key = match kid {
        Some(k) if k.starts_with("did:key:") => Some(keys::parse_verkey(k)?),
        _ => None,
    };
    let pk = match (jwk_key, kid_key) {
        (Some(a), Some(b)) if a != b => return Err(JwsError::KeyMismatch),
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => return Err(malformed("no signing key (jwk or did:key kid)")),
    };
    let signature = sig
        .get("signature")
        .and_then(Value::as_str)
        .and_then(b64::decode)
        .ok_or_else(|| malformed("signature is not base64"))?;
    let input = format!("{protected_b64}.{payload}");
    if keys::verify(&pk, input.as_bytes(), &signature) {
        Ok(pk)
    } else {
        Err(JwsError::BadSignature)
    }
}

/// Connections 1.0 `connection~sig` over `connection`, timestamped now.
pub fn sign_connection(connection: &Value, key: &KeyPair) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    sign_connection_at(connection, key, u64::try_from(now).unwrap_or(0))
}

/// [`sign_connection`] with an explicit timestamp (seconds, as ACA-Py writes it; Credo writes
/// milliseconds; verifiers ignore it). Fields are padded base64url: old ACA-Py decodes them
/// with Python's `urlsafe_b64decode`, which needs padding, and Credo accepts either.
pub fn sign_connection_at(connection: &Value, key: &KeyPair, timestamp: u64) -> Value {
    let mut sig_data = timestamp.to_be_bytes().to_vec();
    sig_data.extend_from_slice(connection.to_string().as_bytes());
    let sig = key.sign(&sig_data);
    json!({
        "@type": SIG_TYPE,
        "signature": b64::encode_padded(&sig),
        "sig_data": b64::encode_padded(&sig_data),
        "signer": key.verkey(),
    })
}

/// Verify a `connection~sig`; returns the signed connection object and the signer's base58
/// verkey. The caller must still check that the signer is the key it expected (the
/// invitation key).
pub fn verify_connection(sig: &Value) -> Result<(Value, String), JwsError> {
    match sig.get("@type").and_then(Value::as_str) {
        Some(SIG_TYPE) | Some(SIG_TYPE_LEGACY) => {}
        other => {
            return Err(JwsError::UnsupportedAlg(
                other.unwrap_or("none").chars().take(80).collect(),
            ))
        }
    }
    let field = |name: &str| -> Result<Vec<u8>, JwsError> {
        let s = sig
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| JwsError::Malformed(format!("{name} missing")))?;
        if s.len() > MAX_SIGNED_LEN {
            return Err(JwsError::Malformed(format!("{name} too large")));
        }
        b64::decode(s).ok_or_else(|| JwsError::Malformed(format!("{name} is not base64")))
    };
    let sig_data = field("sig_data")?;
    let signature = field("signature")?;
    let signer = sig
        .get("signer")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("signer missing"))?;
    let pk = keys::parse_verkey(signer)?;
    if !keys::verify(&pk, &sig_data, &signature) {
        return Err(JwsError::BadSignature);
    }
    let json_part = sig_data
        .get(8..)
        .ok_or_else(|| malformed("sig_data shorter than its timestamp"))?;
    let connection: Value = serde_json::from_slice(json_part).map_err(|_| malformed("signed data is not JSON"))?;
    Ok((connection, keys::verkey_to_base58(&pk)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> Value {
        let full = format!("{}/tests/fixtures/didcomm/{path}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
    }

    #[test]
    fn sign_then_verify() {
        let kp = KeyPair::from_secret_bytes(&[3; 32]).unwrap();
        let data = b64::encode_padded(b"did:peer:4zQm...");
        let jws = sign_attachment_base64(&data, &kp);
        assert_eq!(jws["header"]["kid"], kp.did_key());
        assert_eq!(verify_attachment_base64(&data, &jws).unwrap(), kp.verkey());
        // The same data in another base64 flavour verifies too.
        assert_eq!(
            verify_attachment_base64(&b64::encode(b"did:peer:4zQm..."), &jws).unwrap(),
            kp.verkey()
        );
        // Other data does not.
        assert!(matches!(
            verify_attachment_base64(&b64::encode(b"did:peer:4zQn..."), &jws),
            Err(JwsError::BadSignature)
        ));
        // Tampered signature.
        let mut bad = jws.clone();
        let mut s = b64::decode(bad["signature"].as_str().unwrap()).unwrap();
        s[10] ^= 0x20;
        bad["signature"] = b64::encode(&s).into();
        assert!(matches!(
            verify_attachment_base64(&data, &bad),
            Err(JwsError::BadSignature)
        ));
        // A kid naming another key than the jwk.
        let other = KeyPair::from_secret_bytes(&[4; 32]).unwrap();
        let mut bad = jws.clone();
        bad["header"]["kid"] = other.did_key().into();
        assert!(matches!(
            verify_attachment_base64(&data, &bad),
            Err(JwsError::KeyMismatch)
        ));
        // General form with two signatures by different keys.
        let general = json!({"signatures": [jws, sign_attachment_base64(&data, &other)]});
        assert!(matches!(
            verify_attachment_base64(&data, &general),
            Err(JwsError::KeyMismatch)
        ));
    }

    #[test]
    fn verifies_credo_did_rotate_capture() {
        let msg = &fixture("credo/didexchange_1.1_response.json")["plaintext"];
        let att = &msg["did_rotate~attach"]["data"];
        let data = att["base64"].as_str().unwrap();
        // It signs the DID string.
        assert_eq!(b64::decode(data).unwrap(), msg["did"].as_str().unwrap().as_bytes());
        let signer = verify_attachment_base64(data, &att["jws"]).unwrap();
        assert_eq!(
            signer,
            keys::normalize_verkey("did:key:z6MktTJbkn7GPdLmreuRke9TCTimNHGinCzVBHBDEUfyjQb3").unwrap()
        );
        // Tampered data.
        let mut d = b64::decode(data).unwrap();
        d[12] ^= 1;
        assert!(matches!(
            verify_attachment_base64(&b64::encode(&d), &att["jws"]),
            Err(JwsError::BadSignature)
        ));
    }

    #[test]
    fn verifies_acapy_did_rotate_captures() {
        for f in [
            "acapy/client_didexchange_request_reply_plaintext.json",
            "acapy/sender_in_01_didexchange-1.1-response.json",
            "acapy/recipient_in_01_didexchange-1.1-response.json",
        ] {
            let msg = fixture(f);
            let att = &msg["did_rotate~attach"]["data"];
            let data = att["base64"].as_str().unwrap();
            assert_eq!(b64::decode(data).unwrap(), msg["did"].as_str().unwrap().as_bytes());
            let signer = verify_attachment_base64(data, &att["jws"]).unwrap();
            let kid = att["jws"]["header"]["kid"].as_str().unwrap();
            assert_eq!(signer, keys::normalize_verkey(kid).unwrap(), "{f}");
        }
    }

    #[test]
    fn connection_sig_roundtrip() {
        let kp = KeyPair::from_secret_bytes(&[5; 32]).unwrap();
        let conn = json!({"DID": "abc", "DIDDoc": {"id": "abc"}});
        let sig = sign_connection_at(&conn, &kp, 1_700_000_000);
        assert_eq!(sig["@type"], SIG_TYPE);
        let data = b64::decode(sig["sig_data"].as_str().unwrap()).unwrap();
        assert_eq!(&data[..8], &1_700_000_000u64.to_be_bytes());
        let (c, signer) = verify_connection(&sig).unwrap();
        assert_eq!(c, conn);
        assert_eq!(signer, kp.verkey());
        let (c, _) = verify_connection(&sign_connection(&conn, &kp)).unwrap();
        assert_eq!(c, conn);

        // Tampered data, wrong signer, legacy type, unpadded encodings.
        let mut bad = sig.clone();
        let mut d = data.clone();
        d[9] ^= 1;
        bad["sig_data"] = b64::encode(&d).into();
        assert!(matches!(verify_connection(&bad), Err(JwsError::BadSignature)));
        let mut bad = sig.clone();
        bad["signer"] = KeyPair::from_secret_bytes(&[6; 32]).unwrap().verkey().into();
        assert!(matches!(verify_connection(&bad), Err(JwsError::BadSignature)));
        let mut legacy = sig.clone();
        legacy["@type"] = SIG_TYPE_LEGACY.into();
        legacy["sig_data"] = b64::encode(&data).into();
        assert!(verify_connection(&legacy).is_ok());
        let mut other = sig;
        other["@type"] = "https://didcomm.org/signature/1.0/other".into();
        assert!(matches!(verify_connection(&other), Err(JwsError::UnsupportedAlg(_))));
    }
}
