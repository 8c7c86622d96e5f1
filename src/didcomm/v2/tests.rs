//! Vectors from the DIDComm v2 spec appendix, envelopes captured from Veramo 7.0.1 and Indicio
//! didcomm-messaging 0.1.1, every alg/enc/curve round trip, and each bad input.

use super::did::{self, Purpose};
use super::jwe::{self, Alg, Dialect, Enc};
use super::keys::{self, Agreement, Key};
use super::*;
use askar_crypto::alg::{EcCurves, KeyAlg};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture_dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/didcomm/v2")
        .join(sub)
}

fn load(sub: &str, name: &str) -> Value {
    let p = fixture_dir(sub).join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"))).unwrap()
}

fn fixtures(sub: &str) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(fixture_dir(sub))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".json") && !n.starts_with('_'))
        .map(|n| (n.clone(), load(sub, &n)))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Private keys by kid from a fixture's `recipient_keys`.
fn secrets(list: &Value) -> HashMap<String, Key> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|k| {
                    (
                        k["kid"].as_str().unwrap().to_string(),
                        keys::from_jwk(&k["private_jwk"]).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unpack_with(env: &[u8], ours: &HashMap<String, Key>) -> Result<Unpacked, V2Error> {
    unpack(
        env,
        &|kid| ours.get(kid).cloned().map(Agreement::new),
        &did::resolve_key,
    )
}

fn plain(u: &Unpacked) -> Value {
    serde_json::from_slice(&u.plaintext).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Spec vectors

struct Spec {
    bob: HashMap<String, Key>,
    alice: HashMap<String, Key>,
    vectors: Value,
}

fn spec() -> Spec {
    let v = load("spec", "vectors.json");
    let map = |o: &Value| -> HashMap<String, Key> {
        o.as_object()
            .unwrap()
            .iter()
            .map(|(k, j)| (k.clone(), keys::from_jwk(j).unwrap()))
            .collect()
    };
    Spec {
        bob: map(&v["bob_secrets"]),
        alice: map(&v["alice_public"]),
        vectors: v["vectors"].clone(),
    }
}

fn spec_unpack(s: &Spec, name: &str) -> Result<Unpacked, V2Error> {
    spec_open(s, &serde_json::to_vec(&s.vectors[name]).unwrap())
}

/// Opens `env` as Bob, with Alice's keys resolving her DID.
fn spec_open(s: &Spec, env: &[u8]) -> Result<Unpacked, V2Error> {
    let alice = s.alice.clone();
    unpack(
        env,
        &|kid| s.bob.get(kid).cloned().map(Agreement::new),
        &move |kid, _purpose| {
            alice
                .get(kid)
                .cloned()
                .ok_or_else(|| V2Error::UnknownSender(kid.into()))
        },
    )
}

#[test]
fn spec_vectors_open() {
    let s = spec();
    for (name, recip, sender, signer, enc) in [
        (
            "anoncrypt_X25519_XC20P",
            "did:example:bob#key-x25519-1",
            None,
            None,
            Enc::Xc20p,
        ),
        (
            "anoncrypt_P384_A256CBC-HS512",
            "did:example:bob#key-p384-1",
            None,
            None,
            Enc::A256CbcHs512,
        ),
        (
            "authcrypt_X25519_A256CBC-HS512",
            "did:example:bob#key-x25519-1",
            Some("did:example:alice#key-x25519-1"),
            None,
            Enc::A256CbcHs512,
        ),
        (
            "signed_EdDSA_authcrypt_P256_A256CBC-HS512",
            "did:example:bob#key-p256-1",
            Some("did:example:alice#key-p256-1"),
            Some("did:example:alice#key-1"),
            Enc::A256CbcHs512,
        ),
    ] {
        let u = spec_unpack(&s, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(plain(&u)["id"], "1234567890", "{name}");
        assert_eq!(u.recipient_kid.as_deref(), Some(recip), "{name}");
        assert_eq!(u.sender_kid.as_deref(), sender, "{name}");
        assert_eq!(u.signer_kid.as_deref(), signer, "{name}");
        let d = u.dialect.unwrap();
        assert_eq!(d.enc, enc, "{name}");
        // The spec's authcrypt is draft-04: the tag feeds the KDF.
        assert_eq!(d.tag_in_kdf, sender.is_some(), "{name}");
    }
    let u = spec_unpack(&s, "signed_EdDSA").unwrap();
    assert_eq!(u.signer_kid.as_deref(), Some("did:example:alice#key-1"));
    assert_eq!(plain(&u)["body"]["messagespecificattribute"], "and its value");
}

#[test]
fn spec_authcrypt_refused_without_the_tag_in_the_kdf_when_tampered() {
    // Flip one byte of the tag: neither KDF variant opens it, and the error says so.
    let s = spec();
    let mut v = s.vectors["authcrypt_X25519_A256CBC-HS512"].clone();
    v["tag"] = json!(flip_b64(v["tag"].as_str().unwrap()));
    let r = spec_open(&s, &serde_json::to_vec(&v).unwrap());
    assert_eq!(r.unwrap_err(), V2Error::Decrypt);
}

fn flip_b64(s: &str) -> String {
    let mut raw = crate::didcomm::b64::decode(s).unwrap();
    raw[0] ^= 1;
    crate::didcomm::b64::encode(&raw)
}

// ---------------------------------------------------------------------------------------------
// Captured peer envelopes

#[test]
fn every_captured_envelope_opens_or_is_refused_clearly() {
    let mut opened = 0;
    for peer in ["veramo", "indicio"] {
        for (name, f) in fixtures(peer) {
            let kind = f["kind"].as_str().unwrap_or_default();
            let Some(env) = f["envelope"].as_str() else { continue };
            if !matches!(
                kind,
                "anoncrypt" | "authcrypt" | "forward" | "client-message" | "jws" | "plaintext"
            ) {
                continue;
            }
            let ours = secrets(&f["recipient_keys"]);
            let r = unpack_with(env.as_bytes(), &ours);
            let alg = f["protected"]["alg"].as_str().unwrap_or_default();
            if alg.contains("XC20PKW") {
                assert!(
                    matches!(r, Err(V2Error::UnsupportedAlg(ref a)) if a.contains("XC20PKW")),
                    "{peer}/{name}: {r:?}"
                );
                continue;
            }
            let u = r.unwrap_or_else(|e| panic!("{peer}/{name}: {e}"));
            opened += 1;
            let got = plain(&u);
            let want = match kind {
                "forward" => f["forward_plaintext"].clone(),
                _ => f["plaintext"].clone(),
            };
            if want.is_object() {
                assert_eq!(got["id"], want["id"], "{peer}/{name}");
                assert_eq!(got["type"], want["type"], "{peer}/{name}");
            }
            match kind {
                "authcrypt" => {
                    let skid = f["protected"]["skid"].as_str().unwrap();
                    assert_eq!(u.sender_kid.as_deref(), Some(skid), "{peer}/{name}");
                    // Veramo leaves the tag out of the 1PU KDF; Indicio follows draft-04.
                    assert_eq!(u.dialect.unwrap().tag_in_kdf, peer == "indicio", "{peer}/{name}");
                    // So only Indicio's proves its sender (Veramo's has no apv either).
                    assert_eq!(u.authcrypt_binds_sender(), peer == "indicio", "{peer}/{name}");
                }
                "jws" => assert!(u.signer_kid.is_some(), "{peer}/{name}"),
                "anoncrypt" => assert!(u.sender_kid.is_none(), "{peer}/{name}"),
                _ => {}
            }
            // A forward: the inner envelope opens for the final recipient.
            if kind == "forward" {
                let finals = secrets(&f["final_recipient_keys"]);
                // What the mediator forwards: the attachment of the forward it opened.
                let data = &got["attachments"][0]["data"];
                let inner = match data.get("json") {
                    Some(j) => serde_json::to_vec(j).unwrap(),
                    None => crate::didcomm::b64::decode(data["base64"].as_str().unwrap()).unwrap(),
                };
                let u2 = unpack_with(&inner, &finals).unwrap_or_else(|e| panic!("{peer}/{name} inner: {e}"));
                assert_eq!(plain(&u2)["id"], f["inner_plaintext"]["id"], "{peer}/{name}");
            }
        }
    }
    assert!(opened >= 25, "only {opened} fixtures opened");
}

// ---------------------------------------------------------------------------------------------
// Round trips: every alg x enc x curve, both 1PU KDF forms.

fn keypair(alg: KeyAlg) -> Key {
    keys::generate(alg).unwrap()
}

#[test]
fn round_trip_every_alg_enc_curve() {
    let curves = [
        KeyAlg::X25519,
        KeyAlg::EcCurve(EcCurves::Secp256r1),
        KeyAlg::EcCurve(EcCurves::Secp384r1),
    ];
    for curve in curves {
        let bob = keypair(curve);
        let alice = keypair(curve);
        let bob_pub = keys::from_jwk(&keys::to_public_jwk(&bob).unwrap()).unwrap();
        let alice_pub = keys::from_jwk(&keys::to_public_jwk(&alice).unwrap()).unwrap();
        let ours: HashMap<String, Key> = [("did:example:bob#1".to_string(), bob.clone())].into();
        for enc in [Enc::A256CbcHs512, Enc::A256Gcm, Enc::Xc20p] {
            let msg = json!({"id": "x", "type": "t", "body": {"curve": keys::curve_name(curve), "enc": enc.label()}});
            let bytes = serde_json::to_vec(&msg).unwrap();
            let recips = vec![("did:example:bob#1".to_string(), bob_pub.clone())];
            // anoncrypt
            let d = Dialect {
                alg: Alg::EcdhEsA256Kw,
                enc,
                tag_in_kdf: false,
            };
            let env = jwe::pack(&bytes, &recips, None, d).unwrap();
            let u = jwe::unpack(&env, &|k| ours.get(k).cloned().map(Agreement::new), &|_| unreachable!()).unwrap();
            assert_eq!(u.plaintext, bytes);
            assert_eq!(u.dialect, d);
            // authcrypt, with and without the tag in the KDF
            for tag_in_kdf in [true, false] {
                let d = Dialect {
                    alg: Alg::Ecdh1PuA256Kw,
                    enc,
                    tag_in_kdf,
                };
                let env = jwe::pack(
                    &bytes,
                    &recips,
                    Some(("did:example:alice#1", &Agreement::new(alice.clone()))),
                    d,
                )
                .unwrap();
                let ap = alice_pub.clone();
                let u = jwe::unpack(&env, &|k| ours.get(k).cloned().map(Agreement::new), &move |k| {
                    assert_eq!(k, "did:example:alice#1");
                    Ok(ap.clone())
                })
                .unwrap_or_else(|e| panic!("{} {} {tag_in_kdf}: {e}", keys::curve_name(curve), enc.label()));
                assert_eq!(u.plaintext, bytes);
                assert_eq!(u.dialect, d);
                assert_eq!(u.sender_kid.as_deref(), Some("did:example:alice#1"));
            }
        }
    }
}

#[test]
fn jws_round_trip_and_refusals() {
    for alg in [
        KeyAlg::Ed25519,
        KeyAlg::EcCurve(EcCurves::Secp256r1),
        KeyAlg::EcCurve(EcCurves::Secp256k1),
    ] {
        let k = keypair(alg);
        let jws = jws::sign(b"{\"id\":\"1\",\"type\":\"t\"}", "did:example:a#1", &k).unwrap();
        let kk = k.clone();
        let (payload, kid) = jws::verify(&jws, &move |_| Ok(kk.clone())).unwrap();
        assert_eq!(payload, b"{\"id\":\"1\",\"type\":\"t\"}");
        assert_eq!(kid, "did:example:a#1");
        // Another key of the same type: refused.
        let other = keypair(alg);
        let e = jws::verify(&jws, &move |_| Ok(other.clone())).unwrap_err();
        assert!(matches!(e, V2Error::Signature(_)), "{e:?}");
        // Payload changed: refused.
        let mut bad = jws.clone();
        bad["payload"] = json!(crate::didcomm::b64::encode(b"{\"id\":\"2\"}"));
        let kk = k.clone();
        assert!(jws::verify(&bad, &move |_| Ok(kk.clone())).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Bad inputs

fn x25519_env(enc: Enc) -> (Vec<u8>, HashMap<String, Key>) {
    let bob = keypair(KeyAlg::X25519);
    let pub_ = keys::from_jwk(&keys::to_public_jwk(&bob).unwrap()).unwrap();
    let env = jwe::pack(
        br#"{"id":"1","type":"t"}"#,
        &[("did:example:bob#1".to_string(), pub_)],
        None,
        Dialect {
            alg: Alg::EcdhEsA256Kw,
            enc,
            tag_in_kdf: false,
        },
    )
    .unwrap();
    (env, [("did:example:bob#1".to_string(), bob)].into())
}

fn with_protected(env: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(env).unwrap();
    let raw = crate::didcomm::b64::decode(v["protected"].as_str().unwrap()).unwrap();
    let mut p: Value = serde_json::from_slice(&raw).unwrap();
    f(&mut p);
    v["protected"] = json!(crate::didcomm::b64::encode(p.to_string().as_bytes()));
    serde_json::to_vec(&v).unwrap()
}

fn open(env: &[u8], ours: &HashMap<String, Key>) -> Result<Unpacked, V2Error> {
    unpack_with(env, ours)
}

#[test]
fn bad_inputs_are_refused_with_clear_errors() {
    let (env, ours) = x25519_env(Enc::A256Gcm);
    assert!(open(&env, &ours).is_ok());

    // Tampered tag, ciphertext, protected header.
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    v["tag"] = json!(flip_b64(v["tag"].as_str().unwrap()));
    assert_eq!(
        open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err(),
        V2Error::Decrypt
    );
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    v["ciphertext"] = json!(flip_b64(v["ciphertext"].as_str().unwrap()));
    assert_eq!(
        open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err(),
        V2Error::Decrypt
    );
    let typ_changed = with_protected(&env, |p| p["typ"] = json!("application/other"));
    assert_eq!(open(&typ_changed, &ours).unwrap_err(), V2Error::Decrypt);

    // An ephemeral key of small order (here zero: every shared secret with it is all zeros,
    // which anyone could compute) is refused before any key is unwrapped (RFC 8037 section 3.2).
    let zero_epk = with_protected(&env, |p| p["epk"]["x"] = json!(crate::didcomm::b64::encode(&[0u8; 32])));
    let e = open(&zero_epk, &ours).unwrap_err();
    assert!(matches!(e, V2Error::Crypto(ref m) if m.contains("small order")), "{e}");

    // Unknown kid.
    let none = HashMap::new();
    assert_eq!(open(&env, &none).unwrap_err(), V2Error::UnknownKid);

    // Wrong or unsupported alg / enc, and a pair that does not fit.
    let e = open(&with_protected(&env, |p| p["alg"] = json!("ECDH-ES+A128KW")), &ours).unwrap_err();
    assert!(
        matches!(e, V2Error::UnsupportedAlg(ref a) if a == "ECDH-ES+A128KW"),
        "{e}"
    );
    let e = open(&with_protected(&env, |p| p["alg"] = json!("RSA-OAEP")), &ours).unwrap_err();
    assert!(matches!(e, V2Error::UnsupportedAlg(_)), "{e}");
    let e = open(&with_protected(&env, |p| p["enc"] = json!("A128GCM")), &ours).unwrap_err();
    assert!(matches!(e, V2Error::UnsupportedAlg(ref a) if a == "A128GCM"), "{e}");
    // A256GCM content labelled XC20P: the iv does not fit the enc.
    let e = open(&with_protected(&env, |p| p["enc"] = json!("XC20P")), &ours).unwrap_err();
    assert!(matches!(e, V2Error::Malformed(ref m) if m.contains("iv")), "{e}");
    // A256GCM content labelled A256CBC-HS512: iv and key size do not fit.
    let e = open(&with_protected(&env, |p| p["enc"] = json!("A256CBC-HS512")), &ours).unwrap_err();
    assert!(
        matches!(e, V2Error::Malformed(_) | V2Error::AlgEncMismatch { .. }),
        "{e}"
    );
    // ECDH-1PU without a sender.
    let e = open(&with_protected(&env, |p| p["alg"] = json!("ECDH-1PU+A256KW")), &ours).unwrap_err();
    assert!(matches!(e, V2Error::Malformed(ref m) if m.contains("skid")), "{e}");

    // apv that does not name the recipients.
    let e = open(
        &with_protected(&env, |p| p["apv"] = json!(crate::didcomm::b64::encode(b"x"))),
        &ours,
    )
    .unwrap_err();
    assert_eq!(e, V2Error::ApvMismatch);

    // epk on another curve than the recipient key, and a P-256 point off its curve.
    let p256 = keys::to_public_jwk(&keypair(KeyAlg::EcCurve(EcCurves::Secp256r1))).unwrap();
    let e = open(&with_protected(&env, |p| p["epk"] = p256.clone()), &ours).unwrap_err();
    assert!(matches!(e, V2Error::CurveMismatch(_)), "{e}");
    let mut off = p256.clone();
    let mut y = crate::didcomm::b64::decode(off["y"].as_str().unwrap()).unwrap();
    y[31] ^= 1;
    off["y"] = json!(crate::didcomm::b64::encode(&y));
    let e = open(&with_protected(&env, |p| p["epk"] = off.clone()), &ours).unwrap_err();
    assert!(matches!(e, V2Error::BadKey(ref m) if m.contains("P-256")), "{e}");
    let e = keys::from_jwk(&off).unwrap_err();
    assert!(matches!(e, V2Error::BadKey(_)));

    // Oversized, not JSON, too many recipients, garbage base64.
    let big = vec![b' '; MAX_ENVELOPE_LEN + 1];
    assert_eq!(open(&big, &ours).unwrap_err(), V2Error::TooLarge(MAX_ENVELOPE_LEN + 1));
    assert!(matches!(open(b"not json", &ours).unwrap_err(), V2Error::NotV2(_)));
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    let r = v["recipients"][0].clone();
    v["recipients"] = Value::Array(vec![r; jwe::MAX_RECIPIENTS + 1]);
    assert_eq!(
        open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err(),
        V2Error::TooManyRecipients(jwe::MAX_RECIPIENTS + 1)
    );
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    v["iv"] = json!("!!!");
    assert!(matches!(
        open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err(),
        V2Error::Malformed(_)
    ));
}

/// `env` (anoncrypt to one recipient whose key `ours` holds) sealed again with its protected
/// header changed by `edit`: unlike [`with_protected`], a JWE that decrypts, so what a header
/// says is tested, not the tag.
fn resealed(env: &[u8], ours: &HashMap<String, Key>, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    use askar_crypto::alg::{AnyKey, AnyKeyCreate};
    use askar_crypto::buffer::SecretBytes;
    use askar_crypto::encrypt::KeyAeadInPlace;
    use std::sync::Arc;
    let b64 = crate::didcomm::b64::encode;
    let unb64 = |v: &Value| crate::didcomm::b64::decode(v.as_str().unwrap()).unwrap();
    let mut v: Value = serde_json::from_slice(env).unwrap();
    let mut p: Value = serde_json::from_slice(&unb64(&v["protected"])).unwrap();
    let ours = Agreement::new(ours[v["recipients"][0]["header"]["kid"].as_str().unwrap()].clone());
    let z = ours.exchange(&keys::from_jwk(&p["epk"]).unwrap()).unwrap();
    let kek = jwe::kek(&z, jwe::ALG_ANON, &[], &unb64(&p["apv"]), &[]).unwrap();
    let mut cek = SecretBytes::from_slice(&unb64(&v["recipients"][0]["encrypted_key"]));
    kek.decrypt_in_place(&mut cek, &[], &[]).unwrap();
    let enc = Enc::parse(p["enc"].as_str().unwrap()).unwrap();
    let cek = Arc::<AnyKey>::from_secret_bytes(enc.key_alg(), cek.as_ref()).unwrap();
    let iv = unb64(&v["iv"]);
    let mut buf = SecretBytes::from_slice(&[unb64(&v["ciphertext"]), unb64(&v["tag"])].concat());
    cek.decrypt_in_place(&mut buf, &iv, v["protected"].as_str().unwrap().as_bytes())
        .unwrap();
    edit(&mut p);
    let protected = b64(p.to_string().as_bytes());
    let ct_len = cek.encrypt_in_place(&mut buf, &iv, protected.as_bytes()).unwrap();
    let (ct, tag) = buf.as_ref().split_at(ct_len);
    v["protected"] = json!(protected);
    v["ciphertext"] = json!(b64(ct));
    v["tag"] = json!(b64(tag));
    serde_json::to_vec(&v).unwrap()
}

/// `zip` and `crit` are refused, not ignored, in whichever header they come: a compressed
/// plaintext opened as it is was refused as "not JSON" with no word of why, and RFC 7516
/// section 4.1.13 has a recipient refuse a `crit` naming what it does not understand (all of
/// it: no extension is implemented here). Each of these JWEs decrypts; only its header stops it.
#[test]
fn zip_and_crit_are_refused_in_every_header() {
    let (env, ours) = x25519_env(Enc::A256CbcHs512);
    assert!(open(&resealed(&env, &ours, |_| {}), &ours).is_ok(), "resealed opens");
    let refused_for = |e: V2Error, name: &str| {
        assert!(
            matches!(e, V2Error::UnsupportedAlg(ref a) if a.starts_with(name)),
            "{name}: {e}"
        );
        assert!(e.to_string().contains(name), "{e}");
    };
    // In the protected header.
    let zipped = resealed(&env, &ours, |p| p["zip"] = json!("DEF"));
    refused_for(open(&zipped, &ours).unwrap_err(), "zip");
    for crit in [json!(["exp"]), json!(["b64"]), json!([])] {
        let e = open(&resealed(&env, &ours, |p| p["crit"] = crit.clone()), &ours).unwrap_err();
        refused_for(e, "crit");
    }
    // In a recipient's header, or the shared unprotected one (RFC 7516 wants both protected:
    // refused there too, not read as absent).
    for (name, place) in [
        ("zip", "recipient"),
        ("crit", "recipient"),
        ("zip", "unprotected"),
        ("crit", "unprotected"),
    ] {
        let mut v: Value = serde_json::from_slice(&env).unwrap();
        let value = if name == "zip" { json!("DEF") } else { json!(["exp"]) };
        if place == "recipient" {
            v["recipients"][0]["header"][name] = value;
        } else {
            v["unprotected"] = json!({ name: value });
        }
        let e = open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err();
        refused_for(e, name);
    }
}

/// DIDComm v2's sender identity protection (an authcrypt anoncrypted again) opens as the
/// inner authcrypt's sender, bound as a top-level one is, and answered in its dialect. Every
/// other nesting is refused saying which layer is wrong: an anoncrypt inside proves nobody
/// and must not pass for a sender-protected message; a third layer is not read; the inner
/// layer opens only with our keys.
#[test]
fn a_sender_protected_authcrypt_opens_as_its_inner_sender_and_no_other_nesting() {
    let a = Agreement::new(keypair(KeyAlg::X25519));
    let a_did = did::create_peer2(std::slice::from_ref(a.key()), &[], &[]).unwrap();
    let skid = format!("{a_did}#key-1");
    let r = keypair(KeyAlg::X25519);
    let to = [("r#1".to_string(), r.clone())];
    let ours: HashMap<String, Key> = [("r#1".to_string(), r)].into();
    let auth_to = |p: &[u8], to: &[(String, Key)]| jwe::pack(p, to, Some((&skid, &a)), Dialect::AUTHCRYPT).unwrap();
    let auth = |p: &[u8]| auth_to(p, &to);
    let anon = |p: &[u8]| jwe::pack(p, &to, None, Dialect::ANONCRYPT).unwrap();
    let msg = br#"{"id":"1","type":"t"}"#;

    let u = unpack_with(&anon(&auth(msg)), &ours).unwrap();
    assert_eq!(plain(&u)["id"], "1");
    assert_eq!(u.sender_kid.as_deref(), Some(skid.as_str()));
    assert_eq!(u.authenticated_did(), Some(a_did.as_str()));
    assert_eq!(u.recipient_kid.as_deref(), Some("r#1"));
    assert_eq!(u.dialect, Some(Dialect::AUTHCRYPT));
    assert!(u.authcrypt_binds_sender() && !u.for_others);

    let nested = |env: Vec<u8>, why: &str| {
        let e = unpack_with(&env, &ours).unwrap_err();
        assert!(matches!(e, V2Error::Nested(ref m) if m.contains(why)), "{why}: {e}");
    };
    nested(anon(&anon(msg)), "inner layer must be authcrypt");
    nested(anon(&anon(&auth(msg))), "inner layer must be authcrypt");
    nested(auth(&auth(msg)), "outer layer must be anoncrypt");
    nested(auth(&anon(msg)), "outer layer must be anoncrypt");
    nested(anon(&auth(&anon(msg))), "third JWE layer");
    nested(anon(&auth(&anon(&auth(msg)))), "third JWE layer");
    let elsewhere = keypair(KeyAlg::X25519);
    let not_ours = auth_to(msg, &[("x#1".to_string(), elsewhere.clone())]);
    nested(anon(&not_ours), "inner layer: no recipient kid");
    // Either layer for others too: others could send it on.
    let both = [to[0].clone(), ("x#1".to_string(), elsewhere)];
    let u = unpack_with(&anon(&auth_to(msg, &both)), &ours).unwrap();
    assert!(u.for_others);
    let outer_both = jwe::pack(&auth(msg), &both, None, Dialect::ANONCRYPT).unwrap();
    assert!(unpack_with(&outer_both, &ours).unwrap().for_others);
}

#[test]
fn skid_must_be_a_key_agreement_key_of_the_senders_did() {
    // Veramo's authcrypt (no apu): point skid at the sender's Ed25519 authentication key, then
    // at a DID that does not exist in the envelope's DID: refused before decrypting.
    let f = load("veramo", "authcrypt_ECDH-1PU_A256KW_A256CBC-HS512_X25519.json");
    let ours = secrets(&f["recipient_keys"]);
    let env = f["envelope"].as_str().unwrap().as_bytes().to_vec();
    assert!(open(&env, &ours).is_ok());
    let skid = f["protected"]["skid"].as_str().unwrap().to_string();
    let did_part = did::did_of(&skid).to_string();
    let auth_kid = format!("{did_part}#key-2");
    let e = open(&with_protected(&env, |p| p["skid"] = json!(auth_kid)), &ours).unwrap_err();
    assert!(matches!(e, V2Error::UnknownSender(_)), "{e}");
    let e = open(
        &with_protected(&env, |p| p["skid"] = json!(format!("{did_part}#key-9"))),
        &ours,
    )
    .unwrap_err();
    assert!(matches!(e, V2Error::UnknownSender(_)), "{e}");
    // Another real DID's agreement key: the sender's key is wrong, so nothing opens.
    let other = did::create_peer2(&[keypair(KeyAlg::X25519)], &[], &[]).unwrap();
    let e = open(
        &with_protected(&env, |p| p["skid"] = json!(format!("{other}#key-1"))),
        &ours,
    )
    .unwrap_err();
    assert_eq!(e, V2Error::Decrypt);

    // Indicio's (apu = skid): a skid that disagrees with apu is refused.
    let f = load("indicio", "authcrypt_ECDH-1PU_A256KW_A256CBC-HS512_X25519_askar.json");
    let ours = secrets(&f["recipient_keys"]);
    let env = f["envelope"].as_str().unwrap().as_bytes().to_vec();
    assert!(open(&env, &ours).is_ok());
    let e = open(
        &with_protected(&env, |p| p["skid"] = json!(format!("{other}#key-1"))),
        &ours,
    )
    .unwrap_err();
    assert_eq!(e, V2Error::ApuMismatch);
}

#[test]
fn is_v2_tells_the_versions_apart() {
    let (env, _) = x25519_env(Enc::Xc20p);
    assert!(is_v2(&env));
    let f = load("veramo", "jws_EdDSA.json");
    assert!(is_v2(f["envelope"].as_str().unwrap().as_bytes()));
    let f = load("veramo", "plaintext.json");
    assert!(is_v2(f["envelope"].as_str().unwrap().as_bytes()));
    let v1_env = crate::didcomm::envelope::pack(
        b"{}",
        &[crate::didcomm::keys::KeyPair::generate().verkey()],
        Some(&crate::didcomm::keys::KeyPair::generate()),
    )
    .unwrap();
    assert!(!is_v2(&v1_env));
    assert!(!is_v2(
        br#"{"@type":"https://didcomm.org/trust_ping/1.0/ping","@id":"1"}"#
    ));
    assert!(!is_v2(b"garbage"));
}

// ---------------------------------------------------------------------------------------------
// DIDs

#[test]
fn captured_dids_resolve_to_their_documents() {
    let mut checked = 0;
    for peer in ["veramo", "indicio"] {
        for (name, f) in fixtures(peer) {
            if f["kind"] != "did" {
                continue;
            }
            let d = f["did"].as_str().unwrap();
            if d.starts_with("did:peer:0") {
                assert!(did::resolve(d).is_err(), "{name}: did:peer:0 is not supported");
                continue;
            }
            if d.starts_with("did:key:zQ3s") {
                // secp256k1 did:key: authentication only.
                let doc = did::resolve(d).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(doc.authentication.len(), 1);
                assert!(doc.key_agreement.is_empty());
                continue;
            }
            let doc = match f["long_form"].as_str() {
                // A short-form did:peer:4 alone has no document; its long form does.
                Some(long) => {
                    assert!(did::resolve(d).is_err(), "{name}");
                    let doc = did::resolve(long).unwrap();
                    assert!(doc.is(d), "{name}");
                    doc
                }
                None => did::resolve(d).unwrap_or_else(|e| panic!("{peer}/{name}: {e}")),
            };
            let want = &f["document"];
            // Every keyAgreement key of the peer's document is ours with the same id and key.
            let want_ka: Vec<String> = want["keyAgreement"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            assert_eq!(doc.key_agreement.len(), want_ka.len(), "{peer}/{name}");
            for r in &want_ka {
                let kid = if r.starts_with('#') {
                    format!("{d}{r}")
                } else {
                    r.clone()
                };
                let m = doc
                    .key(&kid, Purpose::KeyAgreement)
                    .unwrap_or_else(|| panic!("{peer}/{name}: {kid}"));
                let vm = want["verificationMethod"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|vm| vm["id"].as_str() == Some(r.as_str()))
                    .unwrap();
                let want_key = match vm.get("publicKeyMultibase") {
                    Some(mb) => keys::from_multibase(mb.as_str().unwrap()).unwrap(),
                    None => keys::from_jwk(&vm["publicKeyJwk"]).unwrap(),
                };
                assert_eq!(
                    keys::to_public_jwk(&m.key).unwrap(),
                    keys::to_public_jwk(&want_key).unwrap(),
                    "{peer}/{name}"
                );
            }
            // Services: same uris in the same order.
            let want_uris: Vec<String> = want["service"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| match &s["serviceEndpoint"] {
                            Value::String(u) => Some(u.clone()),
                            Value::Object(o) => o.get("uri").and_then(Value::as_str).map(str::to_string),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let got: Vec<String> = doc.services.iter().map(|s| s.uri.clone()).collect();
            assert_eq!(got, want_uris, "{peer}/{name}");
            if let Some(short) = f["short_form"].as_str() {
                assert!(doc.is(short));
                assert!(doc.key(&format!("{short}#key-2"), Purpose::KeyAgreement).is_some());
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked}");
}

#[test]
fn service_uri_that_is_a_did_and_legacy_ids() {
    let f = load("veramo", "did_peer2_service_uri_did.json");
    let doc = did::resolve(f["did"].as_str().unwrap()).unwrap();
    let s = doc.didcomm_services().next().unwrap();
    assert!(s.uri_is_did());
    let mediator = did::resolve(&s.uri).unwrap();
    assert!(mediator.didcomm_services().next().unwrap().uri.starts_with("http"));

    // Legacy SICPA ids: `#` + the multibase key without its `z`.
    let x = keypair(KeyAlg::X25519);
    let d = did::create_peer2(
        std::slice::from_ref(&x),
        &[keypair(KeyAlg::Ed25519)],
        &[("http://example.org".into(), vec![])],
    )
    .unwrap();
    let doc = did::resolve(&d).unwrap();
    let mb = keys::to_multibase(&x).unwrap();
    assert!(doc.key(&format!("{d}#{}", &mb[1..]), Purpose::KeyAgreement).is_some());
    assert!(doc.key(&format!("{d}#key-1"), Purpose::KeyAgreement).is_some());
    assert!(doc.key(&format!("{d}#key-2"), Purpose::KeyAgreement).is_none());
    assert!(doc.key(&format!("{d}#key-2"), Purpose::Authentication).is_some());
    assert_eq!(doc.services[0].accept, vec!["didcomm/v2".to_string()]);

    // Legacy service shape: string endpoint, accept and routingKeys beside it.
    let legacy = json!({"t": "dm", "s": "https://m.example", "r": ["did:key:z6LSabc#z6LSabc"], "a": ["didcomm/v2"]});
    let d2 = format!(
        "did:peer:2.E{}.S{}",
        mb,
        crate::didcomm::b64::encode(legacy.to_string().as_bytes())
    );
    let doc = did::resolve(&d2).unwrap();
    assert_eq!(doc.services[0].uri, "https://m.example");
    assert_eq!(
        doc.services[0].routing_keys,
        vec!["did:key:z6LSabc#z6LSabc".to_string()]
    );

    // did:key X25519 and Ed25519.
    let dk = format!("did:key:{mb}");
    assert!(did::resolve_key(&format!("{dk}#{mb}"), Purpose::KeyAgreement).is_ok());
    assert!(did::resolve_key(&dk, Purpose::KeyAgreement).is_ok());
    assert!(did::resolve_key(&dk, Purpose::Authentication).is_err());
    let ed = keypair(KeyAlg::Ed25519);
    let edk = format!("did:key:{}", keys::to_multibase(&ed).unwrap());
    let doc = did::resolve(&edk).unwrap();
    assert_eq!(doc.key_agreement.len(), 1);
    assert_eq!(doc.methods[doc.key_agreement[0]].key.algorithm(), KeyAlg::X25519);

    // Refusals: unknown method, bad purpose, garbage keys, query in a service uri.
    assert!(did::resolve("did:web:example.org").is_err());
    assert!(did::resolve("did:peer:2.Xz6LS").is_err());
    assert!(did::resolve("did:peer:2.Ez6LSnot-a-key").is_err());
    let q = did::create_peer2(&[x], &[], &[("http://h/?a=b>".into(), vec![])]).unwrap();
    assert!(did::resolve(&q).is_ok());
    assert!(!did::veramo_readable(&q));
    assert!(did::veramo_readable(&d));
}

/// `from_prior` is a compact JWT: signed by an authentication key of a did:peer:2, verified
/// through the DID; a tampered claim, a foreign key or a wrong shape is refused.
#[test]
fn from_prior_jwt_round_trip_and_forgeries() {
    let auth = keys::generate(KeyAlg::Ed25519).unwrap();
    let agree = keys::generate(KeyAlg::X25519).unwrap();
    let d = did::create_peer2(&[agree], std::slice::from_ref(&auth), &[]).unwrap();
    let kid = format!("{d}#key-2");
    let claims = json!({ "iss": d, "sub": "did:example:new", "iat": 1_700_000_000 });
    let jwt = jws::sign_jwt(&claims, &kid, &auth).unwrap();
    assert_eq!(jwt.split('.').count(), 3);
    let resolve = |k: &str| did::resolve_key(k, Purpose::Authentication);
    let (got, signer) = jws::verify_jwt(&jwt, &resolve).unwrap();
    assert_eq!((got, signer), (claims.clone(), kid.clone()));
    // Another claim under the same signature.
    let parts: Vec<&str> = jwt.split('.').collect();
    let forged_claims = crate::didcomm::b64::encode(
        json!({ "iss": d, "sub": "did:example:attacker", "iat": 1 })
            .to_string()
            .as_bytes(),
    );
    let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
    assert!(jws::verify_jwt(&forged, &resolve).is_err());
    // Signed by another key while naming this DID's.
    let other = keys::generate(KeyAlg::Ed25519).unwrap();
    assert!(jws::verify_jwt(&jws::sign_jwt(&claims, &kid, &other).unwrap(), &resolve).is_err());
    for bad in [
        "",
        "a.b",
        "a.b.c.d",
        &format!("{jwt}.x"),
        &"a".repeat(jws::MAX_JWT_LEN + 1),
    ] {
        assert!(jws::verify_jwt(bad, &resolve).is_err(), "{bad:.40}");
    }
}

#[test]
fn the_did_key_forms_of_one_key_name_each_other() {
    use super::keys::{did_key_equivalents, ed25519_to_x25519, generate, to_multibase};
    use askar_crypto::alg::KeyAlg;
    for _ in 0..16 {
        let e = generate(KeyAlg::Ed25519).unwrap();
        let x = ed25519_to_x25519(&e).unwrap();
        let (de, dx) = (
            format!("did:key:{}", to_multibase(&e).unwrap()),
            format!("did:key:{}", to_multibase(&x).unwrap()),
        );
        let of_e = did_key_equivalents(&de);
        assert!(of_e.contains(&dx), "{de}: {of_e:?}");
        assert!(!of_e.contains(&de));
        assert_eq!(
            of_e.len(),
            2,
            "the X25519 form and the other sign's Ed25519 key: {of_e:?}"
        );
        let of_x = did_key_equivalents(&dx);
        assert!(of_x.contains(&de), "{dx}: {of_x:?}");
        assert_eq!(of_x.len(), 2, "both signs: {of_x:?}");
        // The other sign's Ed25519 key converts to the same X25519 key.
        for other in of_e.iter().filter(|d| **d != dx) {
            assert!(did_key_equivalents(other).contains(&dx));
        }
    }
    assert!(did_key_equivalents("did:peer:2.Ez6LS").is_empty());
    assert!(did_key_equivalents("did:key:znotakey").is_empty());
}

// ---------------------------------------------------------------------------------------------
// What an envelope can make us resolve

/// A valid long-form did:peer:4 (v1's shape, which v2 reads too) of more than `len` bytes.
fn long_peer4(len: usize) -> String {
    let kp = crate::didcomm::keys::KeyPair::from_secret_bytes(&[50; 32]).unwrap();
    let pad = "a".repeat(len * 1000 / 1366);
    let d = crate::didcomm::did::create_peer4(&kp.verkey(), &[format!("http://p.example/{pad}")], &[]);
    assert!(d.len() > len);
    d
}

#[test]
fn an_authcrypt_jwe_not_for_us_resolves_no_skid() {
    let bob = keypair(KeyAlg::X25519);
    let alice = keypair(KeyAlg::X25519);
    let bob_pub = keys::from_jwk(&keys::to_public_jwk(&bob).unwrap()).unwrap();
    // skid: a did:peer:4 over the peer-DID cap (and costly to decode).
    let skid = format!("{}#key-2", long_peer4(4_300));
    let env = jwe::pack(
        br#"{"id":"1","type":"t"}"#,
        &[("did:example:bob#1".to_string(), bob_pub)],
        Some((&skid, &Agreement::new(alice))),
        Dialect::AUTHCRYPT,
    )
    .unwrap();
    let nobody = |_: &str| -> Option<Agreement> { None };
    let e = jwe::unpack(&env, &nobody, &|k| {
        panic!("resolved {k:.40} for an envelope not for us")
    })
    .unwrap_err();
    assert_eq!(e, V2Error::UnknownKid);
    // Through the real resolver: still the not-for-us refusal, not the skid's.
    let none = HashMap::new();
    assert_eq!(open(&env, &none).unwrap_err(), V2Error::UnknownKid);
    // For us, the skid is resolved and refused for its length.
    let ours: HashMap<String, Key> = [("did:example:bob#1".to_string(), bob)].into();
    let e = open(&env, &ours).unwrap_err();
    assert!(matches!(e, V2Error::Did(ref m) if m.contains("at most 4096")), "{e}");
}

#[test]
fn a_jws_signature_is_checked_before_its_kid_is_resolved() {
    let k = keypair(KeyAlg::Ed25519);
    let mut jws = jws::sign(br#"{"id":"1","type":"t"}"#, "did:example:a#1", &k).unwrap();
    jws["signatures"][0]["signature"] = json!(crate::didcomm::b64::encode(&[1u8; 10]));
    let unresolved = |kid: &str| -> Result<Key, V2Error> { panic!("resolved {kid}") };
    let e = jws::verify(&jws, &unresolved).unwrap_err();
    assert!(matches!(e, V2Error::Signature(ref m) if m.contains("64 bytes")), "{e}");
    // Eight bad signatures, none resolved.
    let one = jws["signatures"][0].clone();
    jws["signatures"] = Value::Array(vec![one; jws::MAX_SIGNATURES]);
    assert!(jws::verify(&jws, &unresolved).is_err());
}

#[test]
fn one_envelope_resolves_each_did_once_and_a_few_at_most() {
    let cache = did::DocCache::default();
    let kids = did::EnvelopeKeys::new(Some(&cache));
    let dids: Vec<String> = (0..did::MAX_DIDS_PER_ENVELOPE + 1)
        .map(|_| did::create_peer2(&[keypair(KeyAlg::X25519)], &[keypair(KeyAlg::Ed25519)], &[]).unwrap())
        .collect();
    for d in &dids[..did::MAX_DIDS_PER_ENVELOPE] {
        // The same DID under several names counts once.
        for _ in 0..3 {
            kids.resolve_key(&format!("{d}#key-1"), Purpose::KeyAgreement).unwrap();
            kids.resolve_key(&format!("{d}#key-2"), Purpose::Authentication)
                .unwrap();
        }
    }
    let e = kids
        .resolve_key(
            &format!("{}#key-1", dids[did::MAX_DIDS_PER_ENVELOPE]),
            Purpose::KeyAgreement,
        )
        .unwrap_err();
    assert!(
        matches!(e, V2Error::Did(ref m) if m.contains("more than 4 DIDs")),
        "{e}"
    );
    assert_eq!(cache.len(), did::MAX_DIDS_PER_ENVELOPE);
    // A DID that does not resolve is not tried again, and is not cached.
    let bad = "did:peer:2.Ez6LSnot-a-key";
    let kids = did::EnvelopeKeys::new(Some(&cache));
    assert!(kids
        .resolve_key(&format!("{bad}#key-1"), Purpose::KeyAgreement)
        .is_err());
    assert!(kids
        .resolve_key(&format!("{bad}#key-1"), Purpose::KeyAgreement)
        .is_err());
    assert_eq!(cache.len(), did::MAX_DIDS_PER_ENVELOPE);
}

#[test]
fn the_doc_cache_resolves_a_did_once_and_stays_bounded() {
    let cache = did::DocCache::new(2, 1 << 20);
    let a = did::create_peer2(&[keypair(KeyAlg::X25519)], &[], &[]).unwrap();
    let first = cache.resolve(&a).unwrap();
    let again = cache.resolve(&format!("{a}#key-1")).unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again));
    for _ in 0..3 {
        let d = did::create_peer2(&[keypair(KeyAlg::X25519)], &[], &[]).unwrap();
        cache.resolve(&d).unwrap();
        assert!(cache.len() <= 2);
    }
    // By bytes too: a document larger than the whole cache is resolved, never kept.
    let tiny = did::DocCache::new(100, 64);
    tiny.resolve(&a).unwrap();
    assert!(tiny.is_empty());
}

#[test]
fn peer_dids_over_the_cap_are_refused_and_ours_fits() {
    let e = did::resolve(&long_peer4(crate::didcomm::did::MAX_PEER_DID_LEN)).unwrap_err();
    assert!(
        matches!(e, V2Error::Did(ref m) if m.contains("did:peer:4") && m.contains("at most 4096")),
        "{e}"
    );
    // The mediator's own v2 DID (as `V2Identity::derive` makes it) with the longest public URL
    // the config accepts.
    let url = format!("https://{}", "m".repeat(crate::config::MAX_PUBLIC_URL_LEN - 8));
    let services = vec![(url.clone(), vec![]), (crate::config::ws_url(&url), vec![])];
    let ours = did::create_peer2(&[keypair(KeyAlg::X25519)], &[keypair(KeyAlg::Ed25519)], &services).unwrap();
    assert!(ours.len() <= crate::didcomm::did::MAX_PEER_DID_LEN, "{}", ours.len());
    assert!(did::resolve(&ours).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Why Veramo's authcrypt proves no sender: a co-recipient forges it.

/// One recipient of a Veramo-form authcrypt (no tag in the 1PU key derivation, no `apv`)
/// unwraps the content key from its own entry and makes new content under the sender's own
/// protected header. The other recipient's entry still opens it, as the sender's: whoever
/// shares a message with the mediator (a wallet whose DID document lists the mediator's key
/// as one of its own) could speak to the mediator as the sender. Such an envelope opens, and
/// [`Unpacked::authcrypt_binds_sender`] says it proves nobody; the spec's form does.
#[test]
fn a_co_recipient_forges_an_authcrypt_that_binds_no_sender() {
    use askar_crypto::alg::{AnyKey, AnyKeyCreate};
    use askar_crypto::buffer::SecretBytes;
    use askar_crypto::encrypt::KeyAeadInPlace;
    use std::sync::Arc;

    let f = load(
        "veramo",
        "authcrypt_ECDH-1PU_A256KW_A256CBC-HS512_X25519_two_recipients.json",
    );
    let env: Value = serde_json::from_str(f["envelope"].as_str().unwrap()).unwrap();
    let keys_by_kid = secrets(&f["recipient_keys"]);
    let entries = env["recipients"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let kid_of = |e: &Value| e["header"]["kid"].as_str().unwrap().to_string();
    let (forger, victim_entry) = (&entries[0], &entries[1]);
    let protected_b64 = env["protected"].as_str().unwrap();
    let protected = &f["protected"];
    let skid = protected["skid"].as_str().unwrap();

    // The forger opens its own entry: the content key.
    let own = Agreement::new(keys_by_kid[&kid_of(forger)].clone());
    let epk = keys::from_jwk(&protected["epk"]).unwrap();
    let sender = did::resolve_key(skid, Purpose::KeyAgreement).unwrap();
    let mut z = own.exchange(&epk).unwrap();
    z.extend_from_slice(&own.exchange(&sender).unwrap());
    let kek = jwe::kek(&z, "ECDH-1PU+A256KW", &[], &[], &[]).unwrap();
    let mut cek =
        SecretBytes::from_slice(&crate::didcomm::b64::decode(forger["encrypted_key"].as_str().unwrap()).unwrap());
    kek.decrypt_in_place(&mut cek, &[], &[]).unwrap();
    let cek = Arc::<AnyKey>::from_secret_bytes(Enc::A256CbcHs512.key_alg(), cek.as_ref()).unwrap();

    // New content of its choosing, under the sender's header, for the other recipient only.
    let sender_did = skid.split('#').next().unwrap();
    let chosen = json!({
        "id": "forged", "type": "https://didcomm.org/messagepickup/3.0/messages-received",
        "from": sender_did, "body": { "message_id_list": ["1", "2", "3"] },
    });
    let iv = [7u8; 16];
    let mut buf = SecretBytes::from_slice(&serde_json::to_vec(&chosen).unwrap());
    let ct_len = cek.encrypt_in_place(&mut buf, &iv, protected_b64.as_bytes()).unwrap();
    let (ct, tag) = buf.as_ref().split_at(ct_len);
    let b64 = crate::didcomm::b64::encode;
    let forged = json!({
        "protected": protected_b64, "recipients": [victim_entry],
        "iv": b64(&iv), "ciphertext": b64(ct), "tag": b64(tag),
    });
    let victim: HashMap<String, Key> = [(kid_of(victim_entry), keys_by_kid[&kid_of(victim_entry)].clone())].into();
    let u = unpack_with(&serde_json::to_vec(&forged).unwrap(), &victim).expect("the forgery opens");
    assert_eq!(plain(&u)["id"], "forged");
    assert_eq!(u.sender_kid.as_deref(), Some(skid), "it names the real sender");
    assert!(!u.authcrypt_binds_sender(), "and proves nobody");

    // The spec's form (tag in the derivation, apv) proves its sender.
    let a = Agreement::new(keypair(KeyAlg::X25519));
    let a_did = did::create_peer2(std::slice::from_ref(a.key()), &[], &[]).unwrap();
    let r = keypair(KeyAlg::X25519);
    let env = jwe::pack(
        b"{\"id\":\"1\",\"type\":\"t\"}",
        &[("r#1".to_string(), r.clone())],
        Some((&format!("{a_did}#key-1"), &a)),
        Dialect::AUTHCRYPT,
    )
    .unwrap();
    let ours: HashMap<String, Key> = [("r#1".to_string(), r)].into();
    assert!(unpack_with(&env, &ours).unwrap().authcrypt_binds_sender());
}

/// A peer DID that lists an X25519 key of small order beside a good one is refused when it is
/// resolved, so nothing is ever packed to that key (packing to it failed after the handler
/// had acted: a connection made, then a 500). Both key forms.
#[test]
fn a_peer_did_with_a_small_order_x25519_key_is_refused() {
    let good = keypair(KeyAlg::X25519);
    let auth = keypair(KeyAlg::Ed25519);
    let good_did = did::create_peer2(std::slice::from_ref(&good), std::slice::from_ref(&auth), &[]).unwrap();
    // The same DID with a second agreement key: the X25519 multicodec and 32 zero bytes.
    let mut raw = vec![0xec, 0x01];
    raw.extend_from_slice(&[0u8; 32]);
    let zero_mb = format!("z{}", bs58::encode(&raw).into_string());
    assert!(matches!(keys::from_multibase(&zero_mb), Err(V2Error::BadKey(_))));
    let zero_jwk = json!({"kty": "OKP", "crv": "X25519", "x": crate::didcomm::b64::encode(&[0u8; 32])});
    assert!(matches!(keys::from_jwk(&zero_jwk), Err(V2Error::BadKey(ref m)) if m.contains("small order")));
    let (head, tail) = good_did.split_once(".V").unwrap();
    let with_zero = format!("{head}.E{zero_mb}.V{tail}");
    // did:peer:2 keys are read as the DID is: the DID is refused whole, so its sender is
    // refused (400) before anything acts.
    assert!(matches!(did::resolve(&with_zero), Err(V2Error::BadKey(_))));
    assert!(did::resolve(&good_did).is_ok());
    // A good key is taken in both forms.
    assert!(keys::from_multibase(&keys::to_multibase(&good).unwrap()).is_ok());
    assert!(keys::from_jwk(&keys::to_public_jwk(&good).unwrap()).is_ok());
}

// ---------------------------------------------------------------------------------------------
// What one envelope can make us compute

/// An anoncrypt JWE for Bob's key under each of `kids` (all naming that key), with every
/// entry's wrapped key but the last replaced by random bytes of the right length: only the
/// last opens. Returns the envelope and Bob's key.
fn many_entries_for_one_key(kids: &[&str]) -> (Vec<u8>, Key) {
    let bob = keypair(KeyAlg::X25519);
    let bob_pub = keys::from_jwk(&keys::to_public_jwk(&bob).unwrap()).unwrap();
    let recips: Vec<(String, Key)> = kids.iter().map(|k| (k.to_string(), bob_pub.clone())).collect();
    let env = jwe::pack(br#"{"id":"1","type":"t"}"#, &recips, None, Dialect::ANONCRYPT).unwrap();
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    let entries = v["recipients"].as_array_mut().unwrap();
    let last = entries.len() - 1;
    for e in &mut entries[..last] {
        let mut junk = [0u8; 72];
        askar_crypto::random::fill_random(&mut junk);
        e["encrypted_key"] = json!(crate::didcomm::b64::encode(&junk));
    }
    (serde_json::to_vec(&v).unwrap(), bob)
}

/// 32 recipient entries naming our key, their wrapped keys made up: each was a key exchange
/// (two for authcrypt) before the envelope was refused, ~30 times a real envelope's cost, from
/// anyone. Each kid is looked up once and one entry is tried per key of ours, so the one entry
/// that would open, last, is never reached.
#[test]
fn a_jwe_naming_our_key_many_times_costs_one_key_exchange() {
    let one = vec!["did:example:bob#1"; jwe::MAX_RECIPIENTS];
    let two: Vec<&str> = (0..jwe::MAX_RECIPIENTS)
        .map(|i| {
            if i % 2 == 0 {
                "did:example:bob#1"
            } else {
                "did:example:bob#x"
            }
        })
        .collect();
    for (kids, distinct) in [(one, 1), (two, 2)] {
        let (env, bob) = many_entries_for_one_key(&kids);
        let lookups = std::cell::Cell::new(0);
        let ours = |kid: &str| {
            lookups.set(lookups.get() + 1);
            kid.starts_with("did:example:bob#").then(|| Agreement::new(bob.clone()))
        };
        let e = jwe::unpack(&env, &ours, &|_| unreachable!()).unwrap_err();
        assert_eq!(e, V2Error::Decrypt, "{distinct} kids");
        assert_eq!(lookups.get(), distinct, "each kid is looked up once");
    }
    // The same envelope whose first entry is the good one opens, as any real one does.
    let (env, bob) = many_entries_for_one_key(&["did:example:bob#1"]);
    let u = jwe::unpack(&env, &|_| Some(Agreement::new(bob.clone())), &|_| unreachable!()).unwrap();
    assert_eq!(u.plaintext, br#"{"id":"1","type":"t"}"#);
    assert!(!u.for_others);
}

/// A kid `X?anything` (no fragment) resolves to X's first key of the purpose, so the message
/// is X's: its sender is X, not a new identity per query string that X's one key could make.
#[test]
fn a_kid_with_a_query_authenticates_as_the_did_alone() {
    let alice_x = keypair(KeyAlg::X25519);
    let alice_ed = keypair(KeyAlg::Ed25519);
    let alice = did::create_peer2(std::slice::from_ref(&alice_x), std::slice::from_ref(&alice_ed), &[]).unwrap();
    let bob = keypair(KeyAlg::X25519);
    let bob_pub = keys::from_jwk(&keys::to_public_jwk(&bob).unwrap()).unwrap();
    let ours: HashMap<String, Key> = [("did:example:bob#1".to_string(), bob)].into();
    let msg = br#"{"id":"1","type":"t"}"#;
    let queried = format!("{alice}?anything=1");

    // Authcrypt whose skid carries the query.
    let env = jwe::pack(
        msg,
        &[("did:example:bob#1".to_string(), bob_pub)],
        Some((&queried, &Agreement::new(alice_x))),
        Dialect::AUTHCRYPT,
    )
    .unwrap();
    let u = open(&env, &ours).unwrap();
    assert_eq!(u.sender_kid.as_deref(), Some(queried.as_str()));
    assert_eq!(u.authenticated_did(), Some(alice.as_str()));

    // A JWS whose kid carries it.
    let jws = jws::sign(msg, &queried, &alice_ed).unwrap();
    let u = open(&serde_json::to_vec(&jws).unwrap(), &ours).unwrap();
    assert_eq!(u.signer_kid.as_deref(), Some(queried.as_str()));
    assert_eq!(u.authenticated_did(), Some(alice.as_str()));
}

/// Envelopes are read member by member, never into a JSON tree: a member that is not one the
/// reading needs (here a list of a million numbers beside a JWE, a JWS and a plaintext) is
/// skipped, and what is read is what a tree would give.
#[test]
fn an_envelope_is_read_by_the_members_it_needs_and_the_rest_skipped() {
    let zeros = format!("[{}0]", "0,".repeat(1_000_000));
    let with_pad = |env: &[u8]| {
        let text = std::str::from_utf8(env).unwrap();
        format!(r#"{{"pad": {zeros}, {}"#, &text.trim_start()[1..]).into_bytes()
    };
    let (env, ours) = x25519_env(Enc::A256CbcHs512);
    let u = open(&with_pad(&env), &ours).unwrap();
    assert_eq!(plain(&u)["id"], "1");
    let k = keypair(KeyAlg::Ed25519);
    let kk = k.clone();
    let jws = serde_json::to_vec(&jws::sign(br#"{"id":"2","type":"t"}"#, "did:example:a#1", &k).unwrap()).unwrap();
    let (payload, kid) = jws::verify_slice(&with_pad(&jws), &move |_| Ok(kk.clone())).unwrap();
    assert_eq!(
        (payload.as_slice(), kid.as_str()),
        (&br#"{"id":"2","type":"t"}"#[..], "did:example:a#1")
    );
    let u = open(&with_pad(br#"{"id":"3","type":"t"}"#), &ours).unwrap();
    assert_eq!(plain(&u)["id"], "3");
    // Members of the wrong shape are refused as before, and an array is no JWE.
    let mut v: Value = serde_json::from_slice(&env).unwrap();
    v["recipients"] = json!({ "header": {} });
    assert_eq!(
        open(&serde_json::to_vec(&v).unwrap(), &ours).unwrap_err(),
        V2Error::Malformed("recipients is not an array".into())
    );
    v["recipients"] = json!([["did:example:bob#1"]]);
    assert!(matches!(
        open(&serde_json::to_vec(&v).unwrap(), &ours),
        Err(V2Error::Malformed(_))
    ));
    assert!(matches!(open(b"[\"ciphertext\"]", &ours), Err(V2Error::NotV2(_))));
}
