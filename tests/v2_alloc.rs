//! A DIDComm v2 forward and the delivery of what it queued cost a small multiple of the
//! attachment's size, never a JSON tree of it: `{"a":[0,0,0,...]}` of 4 MiB (two million
//! numbers) read into a `serde_json::Value` takes 64-128 MB, and anyone can send one (an
//! anoncrypted forward needs no sender). A test binary of its own: it counts every allocation
//! of the process (the peak of live bytes, a copy inside `realloc` included).

use mailroom::config::Config;
use mailroom::didcomm::v2::jwe::{self, Dialect};
use mailroom::didcomm::v2::keys::{self, Agreement};
use mailroom::didcomm::v2::{did, TYP_ENCRYPTED};
use mailroom::protocols::{ForwardResult, Mediator, MediatorKeys, TransportKind};
use mailroom::store::{Connection, MediationState, SledStore, Store};
use serde_json::json;
use serde_json::value::RawValue;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Both blocks count until the old one is given back (a realloc may copy).
        grow(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The peak of live bytes over what was live when `f` started.
async fn peak_over<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f.await;
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// The attachment every scenario carries: a JSON object of two million numbers, 4 MiB.
fn zeros_object() -> String {
    let n = 2 * 1024 * 1024;
    let mut s = String::with_capacity(2 * n + 32);
    s.push_str(r#"{"ciphertext":"x","a":["#);
    for _ in 0..n - 1 {
        s.push_str("0,");
    }
    s.push_str("0]}");
    s
}

/// A mediator, and a v2 wallet's connection (mediation granted) that registered its own DID
/// as a recipient; the wallet's key agreement key.
async fn mediator_and_wallet() -> (Mediator, Connection, Agreement) {
    let store: Arc<dyn Store> = Arc::new(SledStore::temporary().await.unwrap());
    let m = Mediator::new(
        store.clone(),
        MediatorKeys::generate(),
        &Config::single_node_default(),
        "n1",
        "http://127.0.0.1:1",
    );
    let x = keys::generate(askar_crypto::alg::KeyAlg::X25519).unwrap();
    let wallet = did::create_peer2(std::slice::from_ref(&x), &[], &[]).unwrap();
    let conn = Connection {
        id: "w1".into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        state: "completed".into(),
        protocol: mailroom::protocols::v2::PROTOCOL.into(),
        label: None,
        our_verkey: String::new(),
        our_did: None,
        their_did: Some(wallet.clone()),
        their_verkeys: vec![wallet.clone()],
        their_endpoints: vec![],
        their_routing_keys: vec![],
        mediation: MediationState::Granted,
        invitation_id: None,
        thread_id: None,
        extra: json!({}),
    };
    store.put_connection(&conn).await.unwrap();
    store
        .update_keys("w1", std::slice::from_ref(&wallet), &[])
        .await
        .unwrap();
    (m, conn, Agreement::new(x))
}

/// A routing 2.0 forward to `next` carrying `attachment` as `data.json`, anoncrypted to `m`.
fn anoncrypted_forward(m: &Mediator, next: &str, attachment: &str) -> Vec<u8> {
    let head = json!({
        "id": "f1", "type": "https://didcomm.org/routing/2.0/forward", "to": [m.v2.did],
        "body": { "next": next },
    })
    .to_string();
    let plaintext = format!(
        r#"{},"attachments":[{{"id":"a1","media_type":"{TYP_ENCRYPTED}","data":{{"json":{attachment}}}}}]}}"#,
        head.strip_suffix('}').unwrap()
    );
    let mdoc = did::resolve(&m.v2.did).unwrap();
    jwe::pack(plaintext.as_bytes(), &mdoc.agreement_keys(), None, Dialect::ANONCRYPT).unwrap()
}

/// One scenario at a time: the counts are the whole process's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` alone in the process, on a runtime of its own.
fn alone(f: impl std::future::Future<Output = ()>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn an_anonymous_forward_of_a_4_mib_attachment_costs_a_few_times_its_size() {
    alone(async {
        let (m, conn, _) = mediator_and_wallet().await;
        let attachment = zeros_object();
        let env = anoncrypted_forward(&m, conn.their_did.as_deref().unwrap(), &attachment);
        let (out, peak) = peak_over(m.handle(&env, TransportKind::Http, "n1/http")).await;
        let out = out.unwrap();
        assert_eq!(out.forward, Some(ForwardResult::Queued { duplicate: false }));
        let size = attachment.len();
        assert!(
            peak <= 4 * size,
            "handling a forward of a {size}-byte attachment peaked at {peak} bytes more ({:.1}x)",
            peak as f64 / size as f64
        );
        // Queued as the sender wrote it.
        let now = mailroom::protocols::now_ms();
        let got = m.store.lease("w1", 10, "t", now, now + 60_000).await.unwrap();
        assert_eq!(got.len(), 1);
        assert!(got[0].payload == attachment.as_bytes(), "queued bytes differ");
    })
}

/// What an envelope or its message carries beside what is read costs its bytes, not a tree:
/// a JWE with a member of two million numbers opens, and a forward whose body holds them is
/// refused after a few thousand values.
#[test]
fn members_nobody_reads_cost_no_tree_in_an_envelope_or_a_message() {
    alone(async {
        let (m, conn, _) = mediator_and_wallet().await;
        let zeros = zeros_object();
        let next = conn.their_did.as_deref().unwrap();
        let env = anoncrypted_forward(&m, next, r#"{"ciphertext":"small"}"#);
        let padded = format!(r#"{{"pad":{zeros},{}"#, &std::str::from_utf8(&env).unwrap()[1..]);
        let (out, peak) = peak_over(m.handle(padded.as_bytes(), TransportKind::Http, "n1/http")).await;
        assert_eq!(out.unwrap().forward, Some(ForwardResult::Queued { duplicate: false }));
        assert!(peak <= zeros.len(), "a padded envelope peaked at {peak} bytes more");

        let head = json!({
            "id": "f2", "type": "https://didcomm.org/routing/2.0/forward", "to": [m.v2.did],
            "attachments": [{ "id": "a1", "data": { "json": { "ciphertext": "small" } } }],
        })
        .to_string();
        let plaintext = format!(
            r#"{},"body":{{"next":"{next}","pad":{zeros}}}}}"#,
            head.strip_suffix('}').unwrap()
        );
        let mdoc = did::resolve(&m.v2.did).unwrap();
        let env = jwe::pack(plaintext.as_bytes(), &mdoc.agreement_keys(), None, Dialect::ANONCRYPT).unwrap();
        let (out, peak) = peak_over(m.handle(&env, TransportKind::Http, "n1/http")).await;
        let why = out.map(|o| o.forward).unwrap_err().to_string();
        assert!(why.contains("JSON values"), "{why}");
        assert!(peak <= 2 * zeros.len(), "a padded body peaked at {peak} bytes more");
    })
}

#[test]
fn a_delivery_of_a_4_mib_payload_is_built_and_packed_in_a_few_times_its_size() {
    alone(async {
        let (m, conn, wallet_key) = mediator_and_wallet().await;
        let payload = zeros_object();
        let msgs = vec![mailroom::store::QueuedMessage {
            id: 7,
            connection: conn.id.clone(),
            recipient_key: conn.their_did.clone().unwrap(),
            payload: payload.clone().into_bytes(),
            received_at_ms: 0,
            attempts: 1,
        }];
        // The wallet's DID resolved once, as for any reply (cached by the node).
        m.pack_for(&conn, &json!({ "id": "warm", "type": "t" })).unwrap();
        let (packed, peak) = peak_over(async {
            let delivery = mailroom::protocols::v2::pickup::live_delivery(&m, &conn, &msgs);
            m.pack_for(&conn, &delivery).unwrap()
        })
        .await;
        let size = payload.len();
        assert!(
            peak <= 4 * size,
            "building and packing a delivery of a {size}-byte payload peaked at {peak} bytes more ({:.1}x)",
            peak as f64 / size as f64
        );
        // The wallet opens it and finds the payload as it was queued, byte for byte.
        let kid = did::resolve(conn.their_did.as_deref().unwrap())
            .unwrap()
            .agreement_keys()[0]
            .0
            .clone();
        let opened = jwe::unpack(&packed, &|k| (k == kid).then(|| wallet_key.clone()), &|k| {
            did::resolve_key(k, did::Purpose::KeyAgreement)
        })
        .unwrap();
        #[derive(serde::Deserialize)]
        struct Delivery<'a> {
            #[serde(borrow)]
            attachments: Vec<Attachment<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Attachment<'a> {
            id: String,
            #[serde(borrow)]
            data: Data<'a>,
        }
        #[derive(serde::Deserialize)]
        struct Data<'a> {
            #[serde(borrow)]
            json: &'a RawValue,
        }
        let d: Delivery = serde_json::from_slice(&opened.plaintext).unwrap();
        assert_eq!(d.attachments.len(), 1);
        assert_eq!(d.attachments[0].id, "000000000007");
        assert!(d.attachments[0].data.json.get() == payload, "delivered bytes differ");
    })
}
