//! DIDComm v1 envelope unpack (RFC 0019 authcrypt/anoncrypt JWE), as the node runs it on every
//! inbound HTTP body and WebSocket frame that is not v2: recipient lookup, key unwrap, content
//! decryption, then the plaintext's `@type`.
//!
//! The keyring holds the throwaway keys of `tests/fixtures/didcomm/rust_vectors.json`, so the
//! vector seeds open all the way and mutations start from envelopes that decrypt.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::message;

const SEEDS_HEX: &[&str] = &[
    "d6ce7211ecf3be14a8798ad907f4709e337350e458345cfdda2bc649fe75db5b",
    "9d73e48a653c5ddf7e4a99f2ca772fbebdae50f2f49a854c6cedcb6b4d7a3976",
    "0db529999cf31a131dc0b3e6b3a98aa11e46c7712bd2dfa63d402df0f5837833",
    "dafc362b36e4e243d2ab51eb889ce9c185d3319c4233508216a2df0573ca9f89",
    "72fde0b58d03272fd13486bfe9913ce98a600da3aff14b3e3c1bd2d67f5c4055",
];

fn keyring() -> &'static [(String, KeyPair)] {
    static K: OnceLock<Vec<(String, KeyPair)>> = OnceLock::new();
    K.get_or_init(|| {
        SEEDS_HEX
            .iter()
            .map(|h| {
                let seed: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex seed"))
                    .collect();
                let kp = KeyPair::from_secret_bytes(&seed).expect("32-byte seed");
                (kp.verkey(), kp)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let ring = keyring();
    let _ = envelope::recipient_kids(data);
    let find = |kid: &str| ring.iter().find(|(v, _)| v == kid).map(|(_, k)| k.clone());
    if let Ok(u) = envelope::unpack(data, &find) {
        if let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&u.plaintext) {
            let _ = message::message_type(&msg);
            let _ = message::return_route(&msg);
        }
    }
});
