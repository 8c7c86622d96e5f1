//! The node's protocol entry point, `Mediator::handle`: what every inbound HTTP body and
//! WebSocket frame goes through (v2 probe, v1 unpack, plaintext JSON, `@type` dispatch to
//! routing, DID exchange, connections, coordinate-mediation, pickup 1.0/2.0, trust ping,
//! discover-features, push, problem reports, and the v2 families).
//!
//! The store is a temporary sled store holding one connection (the vectors' `sender`, with
//! mediation granted), so messages from it reach the handlers that need a connection.
//!
//! Input: byte 0 says how the rest reaches `handle` (low bits: as the envelope itself, or
//! as a plaintext authcrypted by the connection's key, or anoncrypted, to the mediator; bit 4:
//! over WebSocket rather than HTTP).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use mailroom::config::Config;
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use mailroom::protocols::{Mediator, MediatorKeys, TransportKind};
use mailroom::store::{Connection, MediationState, SledStore, Store};

fn kp(hex: &str) -> KeyPair {
    let seed: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex seed"))
        .collect();
    KeyPair::from_secret_bytes(&seed).expect("32-byte seed")
}

struct World {
    rt: tokio::runtime::Runtime,
    mediator: Mediator,
    sender: KeyPair,
    to: Vec<String>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The throwaway keys of tests/fixtures/didcomm/rust_vectors.json.
        let keys = MediatorKeys {
            did_key: kp("d6ce7211ecf3be14a8798ad907f4709e337350e458345cfdda2bc649fe75db5b"),
            routing: kp("9d73e48a653c5ddf7e4a99f2ca772fbebdae50f2f49a854c6cedcb6b4d7a3976"),
        };
        let sender = kp("72fde0b58d03272fd13486bfe9913ce98a600da3aff14b3e3c1bd2d67f5c4055");
        let to = vec![keys.did_key.verkey()];
        let mediator = rt.block_on(async {
            let store: Arc<dyn Store> = Arc::new(SledStore::temporary().await.expect("temporary sled store"));
            store
                .put_connection(&Connection {
                    id: "fuzz-conn".into(),
                    created_at_ms: 1,
                    updated_at_ms: 1,
                    state: "completed".into(),
                    protocol: "didexchange/1.1".into(),
                    label: Some("fuzz".into()),
                    our_verkey: keys.did_key.verkey(),
                    our_did: None,
                    their_did: Some(sender.did_key()),
                    their_verkeys: vec![sender.verkey()],
                    their_endpoints: vec![],
                    their_routing_keys: vec![],
                    mediation: MediationState::Granted,
                    invitation_id: None,
                    thread_id: None,
                    extra: serde_json::json!({}),
                })
                .await
                .expect("put connection");
            let cfg = Config::single_node_default();
            Mediator::new(store, keys, &cfg, "n1", "http://127.0.0.1:1")
        });
        World {
            rt,
            mediator,
            sender,
            to,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let w = world();
    let env = match mode % 4 {
        0 | 3 => rest.to_vec(),
        1 => envelope::pack(rest, &w.to, Some(&w.sender)).expect("pack"),
        _ => envelope::pack(rest, &w.to, None).expect("pack"),
    };
    let transport = if mode & 0x10 != 0 {
        TransportKind::WebSocket
    } else {
        TransportKind::Http
    };
    // Any outcome but a panic is fine: errors become problem reports or HTTP refusals.
    let _ = w.rt.block_on(w.mediator.handle(&env, transport, "fuzz-session"));
});
