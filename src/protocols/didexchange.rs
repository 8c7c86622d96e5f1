//! didexchange 1.0/1.1, responder side.
//!
//! The response carries `~thread.pthid` (the invitation id) beside `thid`: ACA-Py 1.7 cannot
//! complete the exchange without it. 1.1 answers with the mediator's did:peer:4 and a
//! `did_rotate~attach` signed by the invitation key; 1.0 with a legacy DID and a signed
//! `did_doc~attach`.

use super::{now_ms, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::did::{self, ResolvedDoc};
use crate::didcomm::{envelope, jws, keys, message};
use crate::store::{self, Connection, ConnectionPatch, MediationState};
use base64::Engine;
use serde_json::{json, Value};

/// Characters of a peer's `label` kept with its connection (the rest is dropped).
pub const MAX_LABEL_CHARS: usize = 256;
/// Transport endpoints (http(s), ws(s)) of a peer's document kept with its connection, the
/// first by priority.
pub const MAX_KEPT_ENDPOINTS: usize = 4;

/// Reads the DID document a request attaches (base64 or inline JSON), if any.
pub(crate) fn attached_doc(att: &Value) -> Result<Option<Value>, HandleError> {
    if att.is_null() {
        return Ok(None);
    }
    let data = &att["data"];
    if let Some(j) = data.get("json") {
        return Ok(Some(j.clone()));
    }
    if let Some(b) = data["base64"].as_str() {
        let bytes = decode_b64_any(b).ok_or_else(|| HandleError::BadMessage("did_doc~attach is not base64".into()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| HandleError::BadMessage(format!("did_doc~attach is not JSON: {e}")))?;
        return Ok(Some(v));
    }
    Err(HandleError::BadMessage(
        "did_doc~attach has neither data.json nor data.base64".into(),
    ))
}

pub fn decode_b64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [URL_SAFE_NO_PAD, URL_SAFE, STANDARD, STANDARD_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s.trim()).ok())
}

/// What a handshake request is refused for before its DID document is resolved (the one
/// costly step of a handshake, and done before any proof): an anoncrypted request (or one
/// authcrypted for several recipients, [`HandleError::SharedAuthcrypt`]) proves no key, so no
/// document it presents could pass [`proven_sender`]; an `@id` or `~thread.pthid`
/// longer than [`message::MAX_ID_LEN`] would be kept with the connection (its thread and its
/// invitation) for as long as it lives.
pub(crate) fn before_resolving(ctx: &Inbound) -> Result<(), HandleError> {
    if ctx.sender_verkey.is_none() {
        return Err(match ctx.shared_authcrypt {
            Some(n) => HandleError::SharedAuthcrypt(n),
            None => HandleError::Unproven,
        });
    }
    let long = |what: &str, s: &str| {
        (s.len() > message::MAX_ID_LEN).then(|| {
            HandleError::BadMessage(format!(
                "{what} is longer than {} bytes ({})",
                message::MAX_ID_LEN,
                s.len()
            ))
        })
    };
    if let Some(e) = long("@id", &ctx.id()) {
        return Err(e);
    }
    if let Some(e) = message::pthid(&ctx.msg).and_then(|p| long("~thread.pthid", &p)) {
        return Err(e);
    }
    // The request's @id is stored as the connection's thread id; a NUL there (PostgreSQL text
    // holds none) was refused by the store only after the invitation was claimed, and a
    // single-use invitation was used up by a request that made no connection.
    if !store::storable(&ctx.id()) {
        return Err(HandleError::BadMessage("@id contains a NUL character".into()));
    }
    Ok(())
}

/// What a resolved DID document must offer before a connection is made with it: a key to pack
/// replies for, and no more routing keys than a reply sent to its endpoint can be wrapped for
/// ([`envelope::MAX_ROUTING_KEYS`]). Stored with more, every such reply failed to pack for as
/// long as the connection lived.
pub(crate) fn usable_doc(their_did: &str, doc: &ResolvedDoc) -> Result<(), HandleError> {
    if doc.recipient_keys.is_empty() {
        return Err(HandleError::BadMessage(format!(
            "{} has no recipient keys",
            message::clip(their_did, 80)
        )));
    }
    if doc.routing_keys.len() > envelope::MAX_ROUTING_KEYS {
        return Err(HandleError::BadMessage(format!(
            "{} lists {} routing keys: replies can be wrapped for at most {}",
            message::clip(their_did, 80),
            doc.routing_keys.len(),
            envelope::MAX_ROUTING_KEYS
        )));
    }
    // A routing key no one can seal to (a point of small order: its X25519 form makes an
    // all-zero shared secret, refused by `nacl::seal`) failed every reply sent to the
    // connection's endpoint as surely as too many keys did.
    if let Some(k) = doc.routing_keys.iter().find(|k| !keys::sealable(k)) {
        return Err(HandleError::BadMessage(format!(
            "{} lists the routing key {}, which no message can be sealed to (a point of small order)",
            message::clip(their_did, 80),
            message::clip(k, 60)
        )));
    }
    Ok(())
}

/// The authcrypt sender key of a handshake request, when the DID document it presents lists
/// it: the sender proved it holds a key of that document. Anything else (anoncrypt, or a
/// document listing keys the sender did not prove, such as another wallet's) is refused.
pub(crate) fn proven_sender(ctx: &Inbound, doc: &ResolvedDoc) -> Result<String, HandleError> {
    match &ctx.sender_verkey {
        Some(s) if doc.recipient_keys.contains(s) => Ok(s.clone()),
        _ => Err(HandleError::Unproven),
    }
}

/// The proven sender key of a handshake request ([`proven_sender`]), once no key its document
/// lists, the sender's own included, belongs to a connection (409 `key-taken`): checked before
/// the invitation is claimed, so a refused request leaves a single-use invitation unused. The
/// sender's key is the one a handshake stores: skipped here, the store refused it only after
/// the claim, and a key that already had a connection used up the invitation it named.
pub(crate) async fn proven_unheld_sender(
    m: &Mediator,
    ctx: &Inbound,
    doc: &ResolvedDoc,
) -> Result<String, HandleError> {
    let sender = proven_sender(ctx, doc)?;
    // The sender's connection, if it has one, was found by its key before the handler ran.
    if ctx.conn.is_some() {
        return Err(HandleError::KeyTaken(sender));
    }
    for k in doc.recipient_keys.iter().filter(|k| **k != sender) {
        if m.store.connection_by_their_verkey(k).await?.is_some() {
            return Err(HandleError::KeyTaken(k.clone()));
        }
    }
    Ok(sender)
}

/// Builds the connection record for a peer whose DID document we resolved. Its only key is
/// the one it proved (`sender`): the other keys of the document are claims nothing backs, and
/// stored they would make the connection the holder of a key another agent may present later
/// (its own connection then refused as `key-taken`, or its messages read as this peer's).
pub(crate) fn new_connection(
    m: &Mediator,
    ctx: &Inbound,
    protocol: &str,
    their_did: &str,
    doc: &ResolvedDoc,
    sender: &str,
) -> Connection {
    let their_verkeys = vec![sender.to_string()];
    let now = now_ms();
    Connection {
        id: uuid::Uuid::new_v4().to_string(),
        created_at_ms: now,
        updated_at_ms: now,
        state: "responded".into(),
        protocol: protocol.into(),
        // Shown in logs and on the admin pages: a label is a name, not a payload.
        label: ctx.msg["label"]
            .as_str()
            .map(|l| message::clip(l, MAX_LABEL_CHARS).to_string()),
        our_verkey: m.keys.did_key.verkey(),
        our_did: None,
        their_did: Some(their_did.to_string()),
        their_verkeys,
        their_endpoints: doc
            .endpoints
            .iter()
            .filter(|e| {
                e.starts_with("http://")
                    || e.starts_with("https://")
                    || e.starts_with("ws://")
                    || e.starts_with("wss://")
            })
            .take(MAX_KEPT_ENDPOINTS)
            .cloned()
            .collect(),
        their_routing_keys: doc.routing_keys.clone(),
        mediation: MediationState::None,
        invitation_id: message::pthid(&ctx.msg),
        thread_id: Some(ctx.id()),
        extra: json!({}),
    }
}

pub async fn request(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let version = ctx.mtype.as_ref().map(|t| t.version.clone()).unwrap_or_default();
    let their_did = ctx.msg["did"]
        .as_str()
        .ok_or_else(|| HandleError::BadMessage("didexchange request has no `did`".into()))?;
    let attached = attached_doc(&ctx.msg["did_doc~attach"])?;
    before_resolving(ctx)?;
    let doc = did::resolve(their_did, attached.as_ref())
        .map_err(|e| HandleError::BadMessage(format!("cannot resolve {}: {e}", message::clip(their_did, 80))))?;
    usable_doc(their_did, &doc)?;
    let sender = proven_unheld_sender(m, ctx, &doc).await?;
    super::oob::claim(m, ctx, &sender).await?;
    let mut conn = new_connection(m, ctx, &format!("didexchange/{version}"), their_did, &doc, &sender);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut response = ctx.reply("response");
    response["~thread"] = json!({ "thid": ctx.id() });
    if let Some(p) = message::pthid(&ctx.msg) {
        response["~thread"]["pthid"] = json!(p);
    }
    if version == "1.0" {
        // 1.0 peers expect a DID with its document attached and signed.
        let legacy = did::legacy_did_from_verkey(&m.keys.did_key.public_bytes());
        let doc = did::legacy_diddoc(
            &legacy,
            &m.keys.did_key.verkey(),
            &[m.public_url.clone(), m.public_ws_url.clone()],
            &[],
        );
        let data = b64.encode(doc.to_string());
        response["did"] = json!(legacy);
        response["did_doc~attach"] = json!({
            "@id": message::new_id(),
            "mime-type": "application/json",
            "data": { "base64": data, "jws": jws::sign_attachment_base64(&data, &m.keys.did_key) },
        });
        conn.our_did = Some(legacy);
    } else {
        let data = b64.encode(&m.did);
        response["did"] = json!(m.did);
        response["did_rotate~attach"] = json!({
            "@id": message::new_id(),
            "mime-type": "text/string",
            "data": { "base64": data, "jws": jws::sign_attachment_base64(&data, &m.keys.did_key) },
        });
        conn.our_did = Some(m.did.clone());
    }
    // Refused (409) when a key of the document belongs to another connection.
    m.store.put_connection(&conn).await?;
    tracing::info!(connection = %conn.id, label = conn.label.as_deref().unwrap_or(""), their_did = %short(their_did), "didexchange request accepted");
    Ok(Outcome {
        replies: vec![response],
        connection: Some(conn),
        ..Outcome::default()
    })
}

/// `complete` acts on the connection whose proven key authcrypted it, and only on the
/// exchange that connection started: an anoncrypted `complete` naming someone else's thread
/// takes over nothing.
pub async fn complete(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?.clone();
    if conn.thread_id.as_deref() != Some(ctx.thid().as_str()) {
        return Err(HandleError::BadMessage(
            "didexchange complete names a thread this connection did not start".into(),
        ));
    }
    // A patch, not a write of the copy loaded when the message arrived: Credo sends
    // mediate-request right behind `complete`, and its grant must not be overwritten.
    let patch = ConnectionPatch {
        state: Some("completed".into()),
        updated_at_ms: now_ms(),
        ..ConnectionPatch::default()
    };
    let conn = m.store.update_connection(&conn.id, &patch).await?.unwrap_or(conn);
    Ok(Outcome {
        connection: Some(conn),
        ..Outcome::default()
    })
}

/// The first 48 characters of an untrusted DID, for logs.
fn short(did: &str) -> &str {
    message::clip(did, 48)
}

#[cfg(test)]
mod tests {
    use super::short;
    use crate::config::Config;
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::{HandleError, Inbound, Mediator, MediatorKeys};
    use crate::store::{SledStore, Store};
    use serde_json::{json, Value};
    use std::sync::Arc;

    async fn mediator() -> Mediator {
        let store: Arc<dyn Store> = Arc::new(SledStore::temporary().await.unwrap());
        let cfg = Config::single_node_default();
        Mediator::new(store, MediatorKeys::generate(), &cfg, "n1", "http://127.0.0.1:1")
    }

    fn inbound(msg: Value, sender: Option<&str>) -> Inbound {
        Inbound::for_test(msg, sender, None)
    }

    fn refused(r: Result<crate::protocols::Outcome, HandleError>) -> HandleError {
        match r {
            Ok(o) => panic!("accepted: {:?}", o.replies),
            Err(e) => e,
        }
    }

    /// An inline document whose routing keys name one more other DID than a document may.
    fn costly_doc(did: &str, verkey: &str) -> Value {
        let others: Vec<String> = (60..65u8)
            .map(|s| {
                let k = KeyPair::from_secret_bytes(&[s; 32]).unwrap();
                format!("did:peer:2.V{}#key-1", k.did_key().trim_start_matches("did:key:"))
            })
            .collect();
        let mut doc = crate::didcomm::did::legacy_diddoc(did, verkey, &["http://x.example".into()], &[]);
        doc["service"][0]["routingKeys"] = json!(others);
        doc
    }

    /// An anoncrypted handshake proves no key: it is refused before its DID is resolved, so a
    /// DID that would be costly or fail to resolve gets the same 403 as any other.
    #[tokio::test]
    async fn an_anoncrypted_handshake_is_refused_before_resolving() {
        let m = mediator().await;
        let kp = KeyPair::generate();
        let legacy = crate::didcomm::did::legacy_did_from_verkey(&kp.public_bytes());
        let doc = costly_doc(&legacy, &kp.verkey());
        for did in ["did:peer:4zQmNot:zAHash", "did:web:example.org", legacy.as_str()] {
            let req = json!({
                "@type": "https://didcomm.org/didexchange/1.0/request", "@id": "1", "did": did,
                "did_doc~attach": { "data": { "json": doc } },
            });
            let e = refused(super::request(&m, &inbound(req, None)).await);
            assert!(matches!(e, HandleError::Unproven), "didexchange {did}: {e}");
            let req = json!({
                "@type": "https://didcomm.org/connections/1.0/request", "@id": "1",
                "connection": { "DID": did, "DIDDoc": doc },
            });
            let e = refused(crate::protocols::connections::request(&m, &inbound(req, None)).await);
            assert!(matches!(e, HandleError::Unproven), "connections {did}: {e}");
        }
        // Authcrypted by the document's key, the same document is resolved and refused for
        // what it names.
        let req = json!({
            "@type": "https://didcomm.org/didexchange/1.0/request", "@id": "1", "did": legacy,
            "did_doc~attach": { "data": { "json": doc } },
        });
        let e = refused(super::request(&m, &inbound(req, Some(&kp.verkey()))).await);
        assert!(
            matches!(e, HandleError::BadMessage(ref r) if r.contains("too many external DID references")),
            "{e}"
        );
    }

    /// Credo 0.6.3's and ACA-Py 1.7's captured requests, authcrypted by their DID's key, are
    /// still accepted.
    #[tokio::test]
    async fn real_peers_requests_are_accepted() {
        let m = mediator().await;
        for (path, key) in [
            (
                "credo/didexchange_1.1_request.json",
                "A755GLWNcun5UxspcZQBtncYVnFCp8TZqHcezFhodTfh",
            ),
            (
                "acapy/mediator_in_01_didexchange-1.1-request.json",
                "DSmqZ8gfFkg51wozanTxMENp9cyHFYnq5fDSSWE3phb2",
            ),
        ] {
            let full = format!("{}/tests/fixtures/didcomm/{path}", env!("CARGO_MANIFEST_DIR"));
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap();
            let msg = v.get("plaintext").unwrap_or(&v).clone();
            let out = super::request(&m, &inbound(msg, Some(key)))
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(out.replies.len(), 1, "{path}");
            assert_eq!(out.connection.unwrap().their_verkeys, vec![key.to_string()]);
        }
    }

    /// Credo 0.6.3's captured didexchange 1.1 request, and the key that authcrypted it.
    fn credo_request() -> (Value, &'static str) {
        let path = "credo/didexchange_1.1_request.json";
        let full = format!("{}/tests/fixtures/didcomm/{path}", env!("CARGO_MANIFEST_DIR"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap();
        let msg = v.get("plaintext").unwrap_or(&v).clone();
        (msg, "A755GLWNcun5UxspcZQBtncYVnFCp8TZqHcezFhodTfh")
    }

    /// A label is kept to its first 256 characters (it is logged and shown on the admin
    /// pages), and an unsupported `@type` is echoed in the refusal only in part.
    #[tokio::test]
    async fn a_long_label_or_type_is_kept_short() {
        let m = mediator().await;
        let (mut msg, key) = credo_request();
        msg["label"] = json!("é".repeat(100_000));
        let out = super::request(&m, &inbound(msg, Some(key))).await.unwrap();
        assert_eq!(out.connection.unwrap().label, Some("é".repeat(super::MAX_LABEL_CHARS)));

        let t = format!("https://didcomm.org/{}/1.0/x", "y".repeat(100_000));
        let e = refused(crate::protocols::problem::unknown_type(
            &m,
            &inbound(json!({"@type": t}), None),
        ));
        assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
    }

    /// What a request makes its connection keep is bounded: an `@id` (the connection's thread)
    /// or a `~thread.pthid` (its invitation) longer than an id is refused, and of the
    /// document's endpoints only the first few of an URL's length are kept. Before, one request
    /// could make a record of megabytes, read again on every message of its connection.
    #[tokio::test]
    async fn a_request_cannot_make_its_connection_record_large() {
        let m = mediator().await;
        let (msg, key) = credo_request();
        let long = "i".repeat(crate::didcomm::message::MAX_ID_LEN + 1);
        let mut req = msg.clone();
        req["@id"] = json!(long);
        let e = refused(super::request(&m, &inbound(req, Some(key))).await);
        assert!(matches!(e, HandleError::BadMessage(ref r) if r.contains("@id")), "{e}");
        let mut req = msg.clone();
        req["~thread"]["pthid"] = json!(long);
        let e = refused(super::request(&m, &inbound(req, Some(key))).await);
        assert!(
            matches!(e, HandleError::BadMessage(ref r) if r.contains("pthid")),
            "{e}"
        );

        let kp = KeyPair::generate();
        let legacy = crate::didcomm::did::legacy_did_from_verkey(&kp.public_bytes());
        let mut endpoints = vec![format!("https://x.example/{}", "p".repeat(100_000))];
        endpoints.extend((0..4).map(|i| format!("didcomm:other/{i}")));
        endpoints.extend((0..10).map(|i| format!("https://e{i}.example/")));
        let doc = crate::didcomm::did::legacy_diddoc(&legacy, &kp.verkey(), &endpoints, &[]);
        let req = json!({
            "@type": "https://didcomm.org/didexchange/1.0/request", "@id": "1", "did": legacy,
            "did_doc~attach": { "data": { "json": doc } },
        });
        let out = super::request(&m, &inbound(req, Some(&kp.verkey()))).await.unwrap();
        let kept = out.connection.unwrap().their_endpoints;
        assert_eq!(kept.len(), super::MAX_KEPT_ENDPOINTS, "{kept:?}");
        assert!(kept.iter().all(|e| e.starts_with("https://e")), "{kept:?}");
    }

    #[test]
    fn short_never_cuts_a_character() {
        let did = format!("{}é{}", "a".repeat(47), "b".repeat(10));
        assert_eq!(short(&did), format!("{}é", "a".repeat(47)));
        assert_eq!(short("did:key:z"), "did:key:z");
        let crafted = format!("{}€tail", "x".repeat(47));
        assert!(short(&crafted).ends_with('€'));
    }
}
