//! DIDComm v2 unpack: the `is_v2` probe the node runs first on every inbound envelope, then
//! JWE (anoncrypt ECDH-ES, authcrypt ECDH-1PU, every key wrap and content encryption), JWS and
//! plaintext, with the DIDs of `skid`/`kid` resolved as the node resolves them.
//!
//! The keyring is every private key of the captured Veramo/Indicio fixtures
//! (`fuzz/seeds/v2_keys.json`, written by `examples/fuzz_seeds.rs`), so the captured
//! envelopes open and mutations start past the key unwrap.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailroom::didcomm::v2::keys::Agreement;
use mailroom::didcomm::v2::{self, did, keys};

fn keyring() -> &'static HashMap<String, Agreement> {
    static K: OnceLock<HashMap<String, Agreement>> = OnceLock::new();
    K.get_or_init(|| {
        let v: serde_json::Value = serde_json::from_str(include_str!("../seeds/v2_keys.json")).expect("keys json");
        v.as_object()
            .expect("kid -> jwk")
            .iter()
            .filter_map(|(kid, jwk)| keys::from_jwk(jwk).ok().map(|k| (kid.clone(), Agreement::new(k))))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let ring = keyring();
    let _ = v2::is_v2(data);
    if let Ok(u) = v2::unpack(data, &|kid| ring.get(kid).cloned(), &did::resolve_key) {
        let _ = u.authenticated_did();
    }
});
