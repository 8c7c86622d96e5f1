//! Fresh envelopes for the cross-check with an independent implementation (issue 14, item 6).
//!
//! The committed vectors (tests/fixtures/didcomm) prove what `pack()` wrote when they were
//! made; these tests make new ones from today's `pack()` (fresh keys, fresh plaintexts) for
//! `scripts/envelope-crosscheck.sh`, which has ACA-Py's own Python RFC 0019 code (PyNaCl, the
//! venv scripts/interop-setup.sh installs) open them, and then has Rust open what Python
//! packed. Both are `#[ignore]`: they need files from the other side. Run by that script:
//!
//!   MAILROOM_CROSSCHECK_OUT=f.json cargo test --test envelope_crosscheck -- --ignored --exact pack_fresh_envelopes
//!   MAILROOM_CROSSCHECK_IN=g.json cargo test --test envelope_crosscheck -- --ignored --exact unpack_python_envelopes

use mailroom::didcomm::envelope::{pack, pack_with, unpack, wrap_forward, PayloadCipher};
use mailroom::didcomm::keys::KeyPair;
use rand::{Rng, RngCore};
use serde_json::{json, Value};

const NAMES: [&str; 5] = ["sender", "recipient1", "recipient2", "recipient3", "mediator"];

fn env_path(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} must name the file (run by scripts/envelope-crosscheck.sh)"))
}

/// A DIDComm message with a random body: ASCII or not, short or several kB.
fn plaintext(rng: &mut impl Rng, i: usize) -> String {
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz ABC 0123456789 \"\\/{}[]:, grüße 你好 ✓ 🚀 \t\n"
        .chars()
        .collect();
    let len = match i % 3 {
        0 => rng.gen_range(1..40),
        1 => rng.gen_range(200..1200),
        _ => rng.gen_range(3000..9000),
    };
    let content: String = (0..len).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
    json!({
        "@type": "https://didcomm.org/basicmessage/1.0/message",
        "@id": uuid::Uuid::new_v4().to_string(),
        "content": content,
    })
    .to_string()
}

#[test]
#[ignore]
fn pack_fresh_envelopes() {
    let out = env_path("MAILROOM_CROSSCHECK_OUT");
    let mut rng = rand::thread_rng();
    let mut seeds = serde_json::Map::new();
    let mut keys = std::collections::BTreeMap::new();
    for n in NAMES {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        seeds.insert(n.into(), json!(hex::encode(seed)));
        keys.insert(n, KeyPair::from_secret_bytes(&seed).unwrap());
    }
    let k = |n: &str| keys[n].clone();
    let vk = |ns: &[&str]| ns.iter().map(|n| k(n).verkey()).collect::<Vec<_>>();
    let dk = |ns: &[&str]| ns.iter().map(|n| k(n).did_key()).collect::<Vec<_>>();
    let sender = k("sender");
    let mut vectors = Vec::new();
    let mut i = 0;
    let push =
        |vectors: &mut Vec<Value>, name: &str, recips: &[&str], from: Option<&KeyPair>, pt: &str, env: Vec<u8>| {
            vectors.push(json!({
                "name": name,
                "recipients": recips,
                "sender_verkey": from.map(KeyPair::verkey),
                "plaintext": pt,
                "envelope": serde_json::from_slice::<Value>(&env).unwrap(),
            }));
        };
    for round in 0..3 {
        let r1 = ["recipient1"];
        let r12 = ["recipient1", "recipient2"];
        let r123 = ["recipient1", "recipient2", "recipient3"];
        let mut next = || {
            i += 1;
            plaintext(&mut rng, i)
        };
        let pt = next();
        let env = pack(pt.as_bytes(), &vk(&r1), Some(&sender)).unwrap();
        push(
            &mut vectors,
            &format!("authcrypt_1_{round}"),
            &r1,
            Some(&sender),
            &pt,
            env,
        );
        let pt = next();
        let env = pack(pt.as_bytes(), &vk(&r12), None).unwrap();
        push(&mut vectors, &format!("anoncrypt_2_{round}"), &r12, None, &pt, env);
        let pt = next();
        let env = pack(pt.as_bytes(), &dk(&r123), Some(&sender)).unwrap();
        push(
            &mut vectors,
            &format!("authcrypt_3_did_key_{round}"),
            &r123,
            Some(&sender),
            &pt,
            env,
        );
        let pt = next();
        let env = pack_with(
            pt.as_bytes(),
            &vk(&r12),
            Some(&sender),
            PayloadCipher::XChaCha20Poly1305,
        )
        .unwrap();
        push(
            &mut vectors,
            &format!("xchacha_authcrypt_2_{round}"),
            &r12,
            Some(&sender),
            &pt,
            env,
        );
        let pt = next();
        let env = pack_with(pt.as_bytes(), &vk(&r1), None, PayloadCipher::XChaCha20Poly1305).unwrap();
        push(
            &mut vectors,
            &format!("xchacha_anoncrypt_1_{round}"),
            &r1,
            None,
            &pt,
            env,
        );
        // What a mediator receives: the inner authcrypt wrapped in an anoncrypt forward.
        let pt = next();
        let inner = pack(pt.as_bytes(), &vk(&r1), Some(&sender)).unwrap();
        let outer = wrap_forward(&inner, &k("recipient1").did_key(), &[k("mediator").did_key()]).unwrap();
        let mut v = json!({
            "name": format!("forward_via_mediator_{round}"),
            "recipients": ["mediator"],
            "sender_verkey": sender.verkey(),
            "plaintext": pt,
            "envelope": serde_json::from_slice::<Value>(&outer).unwrap(),
        });
        v["forward_via"] = json!("mediator");
        v["forward_to"] = json!("recipient1");
        vectors.push(v);
    }
    let verkeys: serde_json::Map<String, Value> = NAMES.iter().map(|n| (n.to_string(), json!(k(n).verkey()))).collect();
    let file = json!({
        "generator": "tests/envelope_crosscheck.rs pack_fresh_envelopes (today's pack())",
        "seeds_hex": seeds,
        "verkeys": verkeys,
        "vectors": vectors,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&file).unwrap()).unwrap();
    println!(
        "wrote {} fresh envelopes to {out}",
        file["vectors"].as_array().unwrap().len()
    );
}

#[test]
#[ignore]
fn unpack_python_envelopes() {
    let path = env_path("MAILROOM_CROSSCHECK_IN");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let seeds = file["seeds_hex"].as_object().expect("seeds_hex");
    let key = |n: &str| KeyPair::from_secret_bytes(&hex::decode(seeds[n].as_str().unwrap()).unwrap()).unwrap();
    for (n, vk) in file["verkeys"].as_object().expect("verkeys") {
        assert_eq!(&json!(key(n).verkey()), vk, "{n}: same seed, same verkey");
    }
    let vectors = file["vectors"].as_array().expect("vectors");
    assert!(vectors.len() >= 6, "too few envelopes from Python: {}", vectors.len());
    for v in vectors {
        let name = v["name"].as_str().unwrap();
        let env = serde_json::to_vec(&v["envelope"]).unwrap();
        for r in v["recipients"].as_array().unwrap() {
            let kp = key(r.as_str().unwrap());
            let found = kp.clone();
            let u = unpack(&env, &move |kid: &str| (kid == found.verkey()).then(|| found.clone()))
                .unwrap_or_else(|e| panic!("{name}: Rust cannot open Python's envelope for {r}: {e}"));
            assert_eq!(
                String::from_utf8(u.plaintext).unwrap(),
                v["plaintext"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(u.sender_verkey.as_deref(), v["sender_verkey"].as_str(), "{name}");
            assert_eq!(u.recipient_verkey, kp.verkey(), "{name}");
        }
    }
    println!("opened {} envelopes packed by Python", vectors.len());
}
