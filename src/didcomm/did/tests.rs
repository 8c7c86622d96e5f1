use super::*;
use crate::didcomm::keys::KeyPair;

fn fixture(path: &str) -> Value {
    let full = format!("{}/tests/fixtures/didcomm/{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn capture_did(path: &str) -> String {
    let v = fixture(path);
    let msg = v.get("plaintext").unwrap_or(&v);
    msg["did"].as_str().unwrap().to_owned()
}

#[test]
fn did_key() {
    let kp = KeyPair::from_secret_bytes(&[4; 32]).unwrap();
    let r = resolve(&kp.did_key(), None).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert!(r.routing_keys.is_empty() && r.endpoints.is_empty());
    assert_eq!(r.doc["id"], kp.did_key());
    // did:peer:0 is the same key
    let p0 = kp.did_key().replace("did:key:", "did:peer:0");
    assert_eq!(resolve(&p0, None).unwrap().recipient_keys, vec![kp.verkey()]);
    assert!(resolve("did:key:z6LSmZwZbdrDh9Ve3FYu6iKBMNWJj7mjMRtTsGwo1dutPhVD", None).is_err());
}

#[test]
fn credo_peer4_from_captures() {
    let did = capture_did("credo/didexchange_1.1_response.json");
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.id, did);
    assert_eq!(r.recipient_keys, vec!["5CEyBuFE2sRPbvfzaMJvA9qiAdoGPG4etCubexwB1VTJ"]);
    assert!(r.routing_keys.is_empty());
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:3035", "ws://127.0.0.1:3035"]);
    let short_form = peer4_short_form(&did).unwrap();
    assert_eq!(short_form, "did:peer:4zQmNdzJkKbRvb4mr3o9AeKVKL5tABUtQ1eaHbimmaqS99uE");
    assert_eq!(r.doc["alsoKnownAs"][0], short_form.as_str());

    let did = capture_did("credo/didexchange_1.1_request.json");
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.recipient_keys, vec!["A755GLWNcun5UxspcZQBtncYVnFCp8TZqHcezFhodTfh"]);
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:3036"]);
}

#[test]
fn acapy_peer4_from_captures() {
    let r = resolve(&capture_did("acapy/mediator_in_01_didexchange-1.1-request.json"), None).unwrap();
    assert_eq!(r.recipient_keys, vec!["DSmqZ8gfFkg51wozanTxMENp9cyHFYnq5fDSSWE3phb2"]);
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:8030"]);

    // Mediated: the routing key is a did:key reference, as in ACA-Py's mediate-grant.
    let r = resolve(&capture_did("acapy/sender_in_01_didexchange-1.1-response.json"), None).unwrap();
    assert_eq!(r.recipient_keys, vec!["6wWnbHuAzQ9VarmrisCV2R6AwF1fahd9oZH4uJvq6kJW"]);
    assert_eq!(r.routing_keys, vec!["47ozuVPcRimDWjRT6rH4Gmf1YppBEAX767Xn8dDD95mp"]);
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:8020"]);

    let r = resolve(
        &capture_did("acapy/recipient_in_01_didexchange-1.1-response.json"),
        None,
    )
    .unwrap();
    assert_eq!(r.recipient_keys, vec!["4Q4ivmgJNpr1dJ4v48UYtidRC4f4sTCU8UJH8au33Srx"]);
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:8020", "ws://127.0.0.1:8022"]);
}

#[test]
fn acapy_peer2_from_captures() {
    // ACA-Py's own DID (two services, priorities 0 and 1).
    let r = resolve(
        &capture_did("acapy/client_didexchange_request_reply_plaintext.json"),
        None,
    )
    .unwrap();
    assert_eq!(r.recipient_keys, vec!["BzEFLJBKNqgWsnpZeSRfgMAoz4Yh2bZ9R3izrYiaR7b5"]);
    assert_eq!(r.endpoints, vec!["http://127.0.0.1:8020", "ws://127.0.0.1:8022"]);
    assert_eq!(r.doc["service"][0]["type"], "did-communication");
    assert_eq!(r.doc["service"][0]["serviceEndpoint"], "http://127.0.0.1:8020");

    // The scripted client's DID: queue endpoint only -> no endpoints. Its key is the kid
    // ACA-Py encrypted its reply to.
    let r = resolve(&capture_did("acapy/client_didexchange_request_plaintext.json"), None).unwrap();
    assert_eq!(r.recipient_keys, vec!["B7esQk7m8d7XdiYtSE3KhWW9NmAuqXcSH9JfVaaLFr6z"]);
    assert!(r.endpoints.is_empty());
    let reply = serde_json::to_vec(&fixture(
        "acapy/client_didexchange_request_reply_envelope_from_acapy.json",
    ))
    .unwrap();
    assert_eq!(
        crate::didcomm::envelope::recipient_kids(&reply).unwrap(),
        r.recipient_keys
    );
}

fn peer2_service(json: &str) -> String {
    b64::encode(json.as_bytes())
}

#[test]
fn peer2_abbreviated_and_full_services() {
    let kp = KeyPair::from_secret_bytes(&[5; 32]).unwrap();
    let mediator = KeyPair::from_secret_bytes(&[6; 32]).unwrap();
    let v = kp.did_key().trim_start_matches("did:key:").to_owned();
    // Abbreviated DIDCommMessaging service with a nested endpoint object, as the 2023 spec
    // writes it; no recipientKeys -> the authentication key.
    let abbreviated = peer2_service(&format!(
        r#"{{"t":"dm","s":{{"uri":"https://m.example/","a":["didcomm/aip2;env=rfc19"],"r":["{}"]}}}}"#,
        mediator.did_key()
    ));
    let did = format!("did:peer:2.V{v}.S{abbreviated}");
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.routing_keys, vec![mediator.verkey()]);
    assert_eq!(r.endpoints, vec!["https://m.example/"]);
    assert_eq!(r.doc["service"][0]["type"], "DIDCommMessaging");
    assert_eq!(r.doc["service"][0]["id"], "#service");

    // Full (unabbreviated) legacy service with padded base64 and a did:key#frag routing key.
    let full = b64::encode_padded(
        format!(
            r##"{{"type":"did-communication","serviceEndpoint":"http://a.example","recipientKeys":["#key-1"],"routingKeys":["{0}#{1}"],"priority":0}}"##,
            mediator.did_key(),
            mediator.did_key().trim_start_matches("did:key:")
        )
        .as_bytes(),
    );
    let did = format!("did:peer:2.V{v}.S{full}");
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.routing_keys, vec![mediator.verkey()]);
    assert_eq!(r.endpoints, vec!["http://a.example"]);

    // Garbage
    for bad in [
        "did:peer:2",
        "did:peer:2.",
        "did:peer:2.Qz6Mk",
        "did:peer:2.Vnotakey.S!!!",
        "did:peer:2.V.S",
    ] {
        assert!(resolve(bad, None).is_err(), "{bad}");
    }
}

#[test]
fn peer4_hash_is_checked_and_short_form_needs_long() {
    let did = capture_did("credo/didexchange_1.1_response.json");
    let short_form = peer4_short_form(&did).unwrap();
    // Corrupt one character of the hash, then of the document.
    let mut chars: Vec<char> = did.chars().collect();
    chars[15] = if chars[15] == 'a' { 'b' } else { 'a' };
    let bad_hash: String = chars.iter().collect();
    assert!(matches!(
        resolve(&bad_hash, None),
        Err(DidError::HashMismatch | DidError::Malformed(_))
    ));
    let mut chars: Vec<char> = did.chars().collect();
    let n = chars.len() - 5;
    chars[n] = if chars[n] == 'a' { 'b' } else { 'a' };
    let bad_doc: String = chars.iter().collect();
    assert!(matches!(resolve(&bad_doc, None), Err(DidError::HashMismatch)));
    assert!(peer4_short_form(&bad_doc).is_err());

    assert!(matches!(resolve(&short_form, None), Err(DidError::NeedsLongForm)));
    let r = resolve(&short_form, Some(&Value::String(did.clone()))).unwrap();
    assert_eq!(r.recipient_keys, vec!["5CEyBuFE2sRPbvfzaMJvA9qiAdoGPG4etCubexwB1VTJ"]);
    let r2 = resolve(&short_form, Some(&json!({"id": short_form, "alsoKnownAs": [did]}))).unwrap();
    assert_eq!(r2, r);
    // A long form of another DID does not help.
    let other = capture_did("credo/didexchange_1.1_request.json");
    assert!(matches!(
        resolve(&short_form, Some(&Value::String(other))),
        Err(DidError::NeedsLongForm)
    ));
}

#[test]
fn create_peer4_roundtrip() {
    let kp = KeyPair::from_secret_bytes(&[8; 32]).unwrap();
    let m = KeyPair::from_secret_bytes(&[9; 32]).unwrap();
    let eps = vec![
        "https://mailroom.example".to_owned(),
        "wss://mailroom.example/ws".to_owned(),
    ];
    let did = create_peer4(&kp.verkey(), &eps, &[m.did_key()]);
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.routing_keys, vec![m.verkey()]);
    assert_eq!(r.endpoints, eps);
    // Same shape as Credo's own: key in authentication, X25519 in keyAgreement.
    assert_eq!(r.doc["authentication"][0]["type"], "Ed25519VerificationKey2018");
    assert_eq!(r.doc["keyAgreement"][0]["type"], "X25519KeyAgreementKey2019");
    assert_eq!(r.doc["service"][0]["recipientKeys"][0], "#key-1");
    assert!(peer4_short_form(&did).unwrap().starts_with("did:peer:4zQm"));
    // Deterministic
    assert_eq!(did, create_peer4(&kp.verkey(), &eps, &[m.did_key()]));
}

#[test]
fn legacy_inline_doc() {
    let kp = KeyPair::from_secret_bytes(&[10; 32]).unwrap();
    let m = KeyPair::from_secret_bytes(&[11; 32]).unwrap();
    let did = legacy_did_from_verkey(&kp.public_bytes());
    let doc = legacy_diddoc(&did, &kp.verkey(), &["http://x.example".into()], &[m.did_key()]);
    let r = resolve(&did, Some(&doc)).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.routing_keys, vec![m.verkey()]);
    assert_eq!(r.endpoints, vec!["http://x.example"]);
    assert_eq!(doc["service"][0]["routingKeys"][0], m.verkey().as_str());
    assert!(matches!(resolve(&did, None), Err(DidError::NeedsDoc(_))));

    // A connections 1.0 doc as old ACA-Py/AFJ sent it: did:sov ids, key refs "did#1" in
    // recipientKeys, authentication by reference.
    let doc = json!({
        "@context": "https://w3id.org/did/v1",
        "id": format!("did:sov:{did}"),
        "publicKey": [{"id": format!("did:sov:{did}#1"), "type": "Ed25519VerificationKey2018",
                       "controller": format!("did:sov:{did}"), "publicKeyBase58": kp.verkey()}],
        "authentication": [{"type": "Ed25519SignatureAuthentication2018",
                            "publicKey": format!("did:sov:{did}#1")}],
        "service": [
            {"id": "did:sov:x;queue", "type": "IndyAgent", "priority": 0,
             "recipientKeys": [format!("did:sov:{did}#1")], "routingKeys": [],
             "serviceEndpoint": "didcomm:transport/queue"},
            {"id": "did:sov:x;indy", "type": "IndyAgent", "priority": 1,
             "recipientKeys": [kp.verkey()], "routingKeys": [m.verkey()],
             "serviceEndpoint": "https://y.example"}
        ]
    });
    let r = resolve(&did, Some(&doc)).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.routing_keys, vec![m.verkey()]);
    assert_eq!(r.endpoints, vec!["https://y.example"]);
    let r2 = resolve(&format!("did:sov:{did}"), Some(&doc)).unwrap();
    assert_eq!(r2.recipient_keys, r.recipient_keys);

    // A doc for another DID is refused.
    let other = legacy_did_from_verkey(&m.public_bytes());
    assert!(resolve(&other, Some(&doc)).is_err());
    // A doc whose recipient key reference dangles is refused.
    let mut bad = doc.clone();
    bad["service"][1]["recipientKeys"] = json!(["#nope"]);
    assert!(resolve(&did, Some(&bad)).is_err());
}

#[test]
fn peer1_needs_doc() {
    assert!(matches!(resolve("did:peer:1zQmZ", None), Err(DidError::NeedsDoc(_))));
    let kp = KeyPair::from_secret_bytes(&[12; 32]).unwrap();
    let doc = json!({
        "id": "did:peer:1zQmZ",
        "publicKey": [{"id": "#1", "type": "Ed25519VerificationKey2018", "publicKeyBase58": kp.verkey()}],
        "service": [{"type": "did-communication", "serviceEndpoint": "http://p.example",
                     "recipientKeys": ["#1"]}]
    });
    let r = resolve("did:peer:1zQmZ", Some(&doc)).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    assert_eq!(r.endpoints, vec!["http://p.example"]);
}

#[test]
fn unsupported_methods() {
    for d in ["did:web:example.com", "did:peer:9abc", "", "did:", "hello world"] {
        assert!(resolve(d, None).is_err(), "{d}");
    }
    assert!(matches!(
        resolve(&"did:peer:2.".repeat(5000), None),
        Err(DidError::TooLong)
    ));
}

#[test]
fn recipient_key_pointing_at_key_agreement_maps_to_ed25519() {
    // Credo dereferences a recipientKeys entry that names the X25519 keyAgreement key to the
    // Ed25519 key it was converted from.
    let kp = KeyPair::from_secret_bytes(&[13; 32]).unwrap();
    let did = create_peer4(&kp.verkey(), &["http://z.example".into()], &[]);
    let mut doc = resolve(&did, None).unwrap().doc;
    doc["service"][0]["recipientKeys"] = json!(["#key-2"]);
    doc.as_object_mut().unwrap().remove("id");
    doc.as_object_mut().unwrap().remove("alsoKnownAs");
    let did2 = {
        let mut raw = JSON_CODEC.to_vec();
        raw.extend_from_slice(doc.to_string().as_bytes());
        let enc = format!("z{}", bs58::encode(raw).into_string());
        let mut mh = SHA256_MULTIHASH.to_vec();
        mh.extend_from_slice(&Sha256::digest(enc.as_bytes()));
        format!("did:peer:4z{}:{enc}", bs58::encode(mh).into_string())
    };
    let r = resolve(&did2, None).unwrap();
    assert_eq!(r.recipient_keys, vec![kp.verkey()]);
    // Short form resolved through the long one keeps the short id.
    let short_form = peer4_short_form(&did2).unwrap();
    let r = resolve(&short_form, Some(&Value::String(did2.clone()))).unwrap();
    assert_eq!(r.id, short_form);
    assert_eq!(r.doc["id"], did2.as_str());
}

// ---------------------------------------------------------------------------------------------
// Caps on what one document may make us resolve

/// A long-form did:peer:4 of about `len` bytes for `kp` (its one service's endpoint pads it).
fn peer4_of_len(kp: &KeyPair, len: usize) -> String {
    let make = |pad: usize| create_peer4(&kp.verkey(), &[format!("http://p.example/{}", "a".repeat(pad))], &[]);
    // base58 writes ~1.366 characters per byte; one correction lands within a few bytes.
    let mut pad = len.saturating_sub(make(0).len()) * 1000 / 1366;
    let got = make(pad).len();
    pad = (pad as isize + (len as isize - got as isize) * 1000 / 1366).max(0) as usize;
    make(pad)
}

/// A legacy DID with an inline doc of 16 services whose recipientKeys, routingKeys and
/// nested serviceEndpoint.routingKeys each list 8 references from `refs` (cycled).
fn doc_naming(refs: &[String]) -> (String, Value) {
    let kp = KeyPair::from_secret_bytes(&[20; 32]).unwrap();
    let did = legacy_did_from_verkey(&kp.public_bytes());
    let mut doc = legacy_diddoc(&did, &kp.verkey(), &["http://x.example".into()], &[]);
    let mut next = refs.iter().cycle();
    let mut eight = || -> Vec<String> { (0..8).map(|_| next.next().unwrap().clone()).collect() };
    let services: Vec<Value> = (0..MAX_SERVICES)
        .map(|i| {
            json!({
                "id": format!("{did};s{i}"), "type": "did-communication", "priority": i,
                "recipientKeys": [kp.verkey()],
                "routingKeys": eight(),
                "serviceEndpoint": { "uri": "http://x.example", "routingKeys": eight() },
            })
        })
        .collect();
    doc["service"] = Value::Array(services);
    // The recipient keys too, as the attack writes them (our key stays first).
    for s in doc["service"].as_array_mut().unwrap() {
        let mut rk = vec![json!(kp.verkey())];
        rk.extend(eight().into_iter().take(7).map(Value::String));
        s["recipientKeys"] = Value::Array(rk);
    }
    (did, doc)
}

fn malformed_reason(r: Result<ResolvedDoc, DidError>) -> String {
    match r {
        Err(DidError::Malformed(why)) => why,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn a_document_naming_an_8_kib_did_in_every_key_is_refused() {
    // The review's document: 16 services x 24 key references, each into a valid ~8 KiB
    // did:peer:4 (hash and all). It used to cost one 8 KiB base58 decode per reference.
    let big = peer4_of_len(&KeyPair::from_secret_bytes(&[21; 32]).unwrap(), 8_150);
    assert!(
        big.len() > MAX_NESTED_DID_LEN && big.len() <= MAX_DID_LEN,
        "{}",
        big.len()
    );
    let (did, doc) = doc_naming(&[format!("{big}#key-1")]);
    let started = std::time::Instant::now();
    let why = malformed_reason(resolve(&did, Some(&doc)));
    assert!(why.contains("names a DID of") && why.contains("at most 4096"), "{why}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    // Alone, such a DID is refused too (a peer DID over the cap).
    let why = malformed_reason(resolve(&big, None));
    assert!(why.contains("did:peer:4") && why.contains("at most 4096"), "{why}");
}

#[test]
fn at_most_four_other_dids_each_resolved_once() {
    let peer2 = |seed: u8| {
        let k = KeyPair::from_secret_bytes(&[seed; 32]).unwrap();
        let v = k.did_key().trim_start_matches("did:key:").to_owned();
        (format!("did:peer:2.V{v}#key-1"), k.verkey())
    };
    // Five distinct DIDs across the services: refused, whichever key names the fifth.
    let five: Vec<(String, String)> = (30..35).map(peer2).collect();
    let refs: Vec<String> = five.iter().map(|(r, _)| r.clone()).collect();
    let (did, doc) = doc_naming(&refs);
    let why = malformed_reason(resolve(&did, Some(&doc)));
    assert!(why.contains("too many external DID references"), "{why}");

    // Four, each named in 92 of the 368 references: resolved, one routing key each.
    let (did, doc) = doc_naming(&refs[..4]);
    let r = resolve(&did, Some(&doc)).unwrap();
    let want: Vec<String> = five[..4].iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(r.routing_keys, want);

    // Memoised: one ~3.9 KiB did:peer:4 named 368 times is decoded once (four decodes would
    // already be over MAX_RESOLVE_DID_BYTES).
    let mediator = KeyPair::from_secret_bytes(&[36; 32]).unwrap();
    let long = peer4_of_len(&mediator, 3_900);
    assert!(long.len() <= MAX_NESTED_DID_LEN && 4 * long.len() > MAX_RESOLVE_DID_BYTES);
    let (did, doc) = doc_naming(&[format!("{long}#key-1")]);
    let r = resolve(&did, Some(&doc)).unwrap();
    assert_eq!(r.routing_keys, vec![mediator.verkey()]);
}

#[test]
fn total_did_bytes_per_document_are_capped() {
    // Four distinct DIDs, each under the per-DID cap, more than the per-document budget.
    let refs: Vec<String> = (40..44)
        .map(|s| {
            format!(
                "{}#key-1",
                peer4_of_len(&KeyPair::from_secret_bytes(&[s; 32]).unwrap(), 3_500)
            )
        })
        .collect();
    let (did, doc) = doc_naming(&refs);
    let why = malformed_reason(resolve(&did, Some(&doc)));
    assert!(why.contains("bytes of DIDs decoded"), "{why}");
}

#[test]
fn a_did_peer_4_hash_longer_than_a_multihash_is_not_decoded() {
    let did = format!("did:peer:4z{}:zabc", "Q".repeat(4000));
    let why = malformed_reason(resolve(&did, None));
    assert!(why.contains("sha2-256 multihash"), "{why}");
    assert!(peer4_short_form(&did).is_err());
}

/// Every peer DID of the real peers' captures is far under the caps and resolves; a real
/// mediator's DID named as a routing key (a wallet routing through it) resolves too.
#[test]
fn real_peer_dids_are_well_under_the_caps() {
    fn dids(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if s.starts_with("did:peer:") => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| dids(x, out)),
            Value::Object(o) => o.values().for_each(|x| dids(x, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for peer in ["credo", "acapy"] {
        let dir = format!("{}/tests/fixtures/didcomm/{peer}", env!("CARGO_MANIFEST_DIR"));
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            dids(&fixture(&format!("{peer}/{name}")), &mut found);
        }
    }
    let longest = found.iter().map(String::len).max().unwrap();
    assert!((800..1000).contains(&longest), "{longest}");
    assert!(4 * longest <= MAX_PEER_DID_LEN);
    for d in found
        .iter()
        .filter(|d| d.starts_with("did:peer:2.") || d.matches(':').count() == 3)
    {
        resolve(d, None).unwrap_or_else(|e| panic!("{d}: {e}"));
    }

    let mediator = capture_did("credo/didexchange_1.1_response.json");
    let kp = KeyPair::from_secret_bytes(&[45; 32]).unwrap();
    let did = create_peer4(
        &kp.verkey(),
        &["http://w.example".into()],
        &[format!("{mediator}#key-1")],
    );
    let r = resolve(&did, None).unwrap();
    assert_eq!(r.routing_keys, vec!["5CEyBuFE2sRPbvfzaMJvA9qiAdoGPG4etCubexwB1VTJ"]);
}

/// The mediator's own did:peer:4 stays under the cap peers' DIDs are held to with the
/// longest `cluster.public_url` the config accepts.
#[test]
fn our_did_with_the_longest_public_url_is_under_the_cap() {
    let kp = KeyPair::from_secret_bytes(&[46; 32]).unwrap();
    let url = format!("https://{}", "m".repeat(crate::config::MAX_PUBLIC_URL_LEN - 8));
    let ws = crate::config::ws_url(&url);
    let did = create_peer4(&kp.verkey(), &[url, ws], &[]);
    assert!(did.len() <= MAX_PEER_DID_LEN, "{}", did.len());
    assert_eq!(resolve(&did, None).unwrap().recipient_keys, vec![kp.verkey()]);
}
