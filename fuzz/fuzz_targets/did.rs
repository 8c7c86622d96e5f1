//! DID resolution on arbitrary input: v1's `did::resolve` (did:peer:2/4, did:key, did:sov and
//! legacy DIDs with an attached RFC 0067 doc, short-form did:peer:4 against a known long form),
//! v2's `did::resolve`/`resolve_key` (did:peer:2, did:peer:4, did:key), and the key forms
//! they read (base58 verkeys, multibase multicodec keys).
//!
//! Input: a DID (or DID URL), optionally followed by a newline and a JSON document to attach.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::didcomm::v2::did::{self as did2, Purpose};
use mailroom::didcomm::{did, keys};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (name, attached) = match s.split_once('\n') {
        Some((d, doc)) => (d, serde_json::from_str::<serde_json::Value>(doc).ok()),
        None => (s, None),
    };
    if let Ok(doc) = did::resolve(name, attached.as_ref()) {
        let _ = doc.recipient_keys.len() + doc.routing_keys.len() + doc.endpoints.len();
    }
    if name.starts_with("did:peer:4") {
        let _ = did::peer4_short_form(name);
    }
    if let Ok(doc) = did2::resolve(name) {
        let _ = doc.agreement_keys();
        let _ = doc.didcomm_services().count();
        let _ = did2::to_json(&doc);
        for m in &doc.methods {
            let _ = doc.key(&m.id, Purpose::Authentication);
        }
    }
    let _ = did2::resolve_key(name, Purpose::KeyAgreement);
    let _ = did2::resolve_key(name, Purpose::Authentication);
    if let Some(doc) = &attached {
        let _ = did2::interpret(name, &[], doc);
    }
    let _ = keys::parse_verkey(name);
    let _ = keys::normalize_verkey(name);
    let _ = mailroom::didcomm::v2::keys::from_multibase(name);
});
