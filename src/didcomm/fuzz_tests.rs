//! Property tests: everything that reads network input survives arbitrary bytes and JSON
//! shaped like the real thing without panicking.

use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::keys::KeyPair;
use super::{b64, did, envelope, jws, message};

const KEYS: &[&str] = &[
    "protected",
    "iv",
    "ciphertext",
    "tag",
    "recipients",
    "header",
    "kid",
    "sender",
    "encrypted_key",
    "alg",
    "enc",
    "id",
    "type",
    "service",
    "serviceEndpoint",
    "recipientKeys",
    "routingKeys",
    "publicKeyBase58",
    "publicKeyMultibase",
    "publicKeyJwk",
    "authentication",
    "verificationMethod",
    "publicKey",
    "keyAgreement",
    "uri",
    "alsoKnownAs",
    "priority",
    "signatures",
    "signature",
    "jwk",
    "x",
    "crv",
    "kty",
    "sig_data",
    "signer",
    "@type",
    "@id",
    "~transport",
    "return_route",
    "~thread",
    "thid",
    "pthid",
    "t",
    "s",
    "r",
    "a",
];

fn key_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z~@]{0,8}",
    ]
}

fn string_strategy() -> impl Strategy<Value = String> {
    let kp = KeyPair::from_secret_bytes(&[1; 32]).unwrap();
    prop_oneof![
        3 => "[ -~]{0,40}",
        1 => Just(kp.verkey()),
        1 => Just(kp.did_key()),
        1 => Just("#key-1".to_owned()),
        1 => Just("did-communication".to_owned()),
        1 => Just("DIDCommMessaging".to_owned()),
        1 => Just("Ed25519VerificationKey2018".to_owned()),
        1 => Just("EdDSA".to_owned()),
        1 => Just("OKP".to_owned()),
        1 => Just("Ed25519".to_owned()),
        1 => Just("Authcrypt".to_owned()),
        1 => Just("xchacha20poly1305_ietf".to_owned()),
        1 => prop::collection::vec(any::<u8>(), 0..48).prop_map(|b| b64::encode(&b)),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        string_strategy().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key_strategy(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn enc_b64(b: &[u8], pad: bool) -> String {
    if pad {
        b64::encode_padded(b)
    } else {
        b64::encode(b)
    }
}

/// Envelopes shaped like RFC 0019 ones, addressed (sometimes) to a key we hold, with garbage
/// in the cryptographic fields: exercises every decryption step.
fn arb_envelope() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(&["Authcrypt", "Anoncrypt", "ECDH-1PU"][..]),
        prop::sample::select(&["xchacha20poly1305_ietf", "chacha20poly1305_ietf", "A256GCM"][..]),
        any::<bool>(),
        (bytes(100), prop::option::of(bytes(120)), prop::option::of(bytes(30))),
        (
            prop::sample::select(&[0usize, 11, 12, 13, 24, 30][..]),
            bytes(64),
            bytes(20),
        ),
        any::<bool>(),
        0usize..4,
    )
        .prop_map(|(alg, enc, ours, (ek, sender, iv), (nlen, ct, tag), pad, extra)| {
            let kid = if ours {
                KeyPair::from_secret_bytes(&[1; 32]).unwrap().verkey()
            } else {
                "3vQB7B6MrGQZaxCuFg4oh".to_owned()
            };
            let mut recips = vec![json!({
                "encrypted_key": enc_b64(&ek, pad),
                "header": {"kid": kid, "sender": sender.map(|s| enc_b64(&s, pad)),
                           "iv": iv.map(|s| enc_b64(&s, pad))}
            })];
            for _ in 0..extra {
                recips.push(json!({"encrypted_key": "", "header": {"kid": "x"}}));
            }
            let protected = json!({"enc": enc, "typ": "JWM/1.0", "alg": alg, "recipients": recips});
            serde_json::to_vec(&json!({
                "protected": enc_b64(protected.to_string().as_bytes(), pad),
                "iv": enc_b64(&vec![7u8; nlen], pad),
                "ciphertext": enc_b64(&ct, pad),
                "tag": enc_b64(&tag, pad),
            }))
            .unwrap()
        })
}

fn find_key(vk: &str) -> Option<KeyPair> {
    let kp = KeyPair::from_secret_bytes(&[1; 32]).unwrap();
    (vk == kp.verkey()).then_some(kp)
}

fn peer4_from_doc(doc: &Value) -> String {
    let mut raw = vec![0x80, 0x04];
    raw.extend_from_slice(doc.to_string().as_bytes());
    let enc = format!("z{}", bs58::encode(raw).into_string());
    let mut mh = vec![0x12, 0x20];
    mh.extend_from_slice(&Sha256::digest(enc.as_bytes()));
    format!("did:peer:4z{}:{enc}", bs58::encode(mh).into_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn envelope_random_bytes(b in bytes(512)) {
        let _ = envelope::recipient_kids(&b);
        let _ = envelope::unpack(&b, &find_key);
    }

    #[test]
    fn envelope_random_json(v in arb_json()) {
        let b = serde_json::to_vec(&v).unwrap();
        let _ = envelope::recipient_kids(&b);
        let _ = envelope::unpack(&b, &find_key);
        // A random protected header inside a well-formed outer object.
        let outer = json!({"protected": b64::encode(&b), "iv": "AAAAAAAAAAAAAAAA",
                           "ciphertext": "", "tag": "AAAAAAAAAAAAAAAAAAAAAA"});
        let ob = serde_json::to_vec(&outer).unwrap();
        let _ = envelope::recipient_kids(&ob);
        let _ = envelope::unpack(&ob, &find_key);
    }

    #[test]
    fn resolve_random_strings(s in "[ -~]{0,200}", prefix in prop::sample::select(
        &["", "did:key:z", "did:key:z6Mk", "did:peer:0z6Mk", "did:peer:1", "did:peer:2.V",
          "did:peer:2.Ez6LS", "did:peer:2.S", "did:peer:4z", "did:peer:4zQm", "did:sov:"][..]),
        doc in prop::option::of(arb_json())) {
        let d = format!("{prefix}{s}");
        let _ = did::resolve(&d, doc.as_ref());
        let _ = did::peer4_short_form(&d);
    }

    #[test]
    fn jws_and_messages_random(v in arb_json(), s in "[ -~]{0,80}") {
        let _ = jws::verify_attachment_base64(&s, &v);
        let _ = jws::verify_attachment_base64("ZGlk", &v);
        let _ = jws::verify_connection(&v);
        let _ = message::MessageType::parse(&s);
        let _ = message::thid(&v);
        let _ = message::pthid(&v);
        let _ = message::return_route(&v);
    }
}

// Crypto and base58 are slow in debug builds: fewer cases for these two.
proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn envelope_shaped_garbage(env in arb_envelope()) {
        let _ = envelope::recipient_kids(&env);
        let r = envelope::unpack(&env, &find_key);
        prop_assert!(r.is_err());
    }

    #[test]
    fn resolve_random_docs(doc in arb_json(), svc in arb_json()) {
        // Valid hash, arbitrary document: exercises the document interpretation.
        let _ = did::resolve(&peer4_from_doc(&doc), None);
        // did:peer:2 with an arbitrary service.
        let kp = KeyPair::from_secret_bytes(&[2; 32]).unwrap();
        let d = format!("did:peer:2.V{}.S{}", &kp.did_key()[8..], b64::encode(svc.to_string().as_bytes()));
        let _ = did::resolve(&d, None);
        // Legacy DID with an arbitrary attached doc.
        let _ = did::resolve("did:sov:3vQB7B6MrGQZaxCuFg4oh", Some(&doc));
        let _ = did::resolve("did:peer:1zQmZ", Some(&doc));
    }
}

#[test]
fn deep_json_does_not_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(envelope::unpack(deep.as_bytes(), &find_key).is_err());
    assert!(envelope::recipient_kids(deep.as_bytes()).is_err());
    let deep_header = json!({"protected": b64::encode(deep.as_bytes()), "iv": "", "ciphertext": "", "tag": ""});
    let b = serde_json::to_vec(&deep_header).unwrap();
    assert!(envelope::recipient_kids(&b).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn pack_unpack_roundtrip(
        plaintext in bytes(2048),
        seeds in prop::collection::vec(any::<[u8; 32]>(), 1..4),
        sender_seed in prop::option::of(any::<[u8; 32]>()),
        did_key_form in any::<bool>(),
        xchacha in any::<bool>(),
    ) {
        let keys: Vec<KeyPair> = seeds.iter().map(|s| KeyPair::from_secret_bytes(s).unwrap()).collect();
        let sender = sender_seed.map(|s| KeyPair::from_secret_bytes(&s).unwrap());
        let recips: Vec<String> = keys
            .iter()
            .map(|k| if did_key_form { k.did_key() } else { k.verkey() })
            .collect();
        let cipher = if xchacha {
            envelope::PayloadCipher::XChaCha20Poly1305
        } else {
            envelope::PayloadCipher::ChaCha20Poly1305
        };
        let env = envelope::pack_with(&plaintext, &recips, sender.as_ref(), cipher).unwrap();
        let kids = envelope::recipient_kids(&env).unwrap();
        prop_assert_eq!(kids.len(), keys.len());
        let last = keys.last().unwrap().clone();
        let u = envelope::unpack(&env, &|vk: &str| (vk == last.verkey()).then(|| last.clone())).unwrap();
        prop_assert_eq!(u.plaintext, plaintext);
        prop_assert_eq!(u.recipient_verkey, last.verkey());
        prop_assert_eq!(u.sender_verkey, sender.map(|s| s.verkey()));
    }

    #[test]
    fn message_type_reply_roundtrip(family in "[a-z_-]{1,20}", name in "[a-z_-]{1,20}",
                                    minor in 0u32..10, legacy in any::<bool>()) {
        let prefix = if legacy { message::LEGACY_PREFIX } else { message::DIDCOMM_PREFIX };
        let t = message::MessageType::parse(&format!("{prefix}{family}/1.{minor}/ping")).unwrap();
        let reply = message::MessageType::parse(&t.reply_type(&name)).unwrap();
        prop_assert_eq!(&reply.family, &family);
        prop_assert_eq!(&reply.name, &name);
        prop_assert_eq!(reply.legacy, legacy);
        prop_assert!(reply.is(&family, &name));
    }
}
