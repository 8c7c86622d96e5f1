//! routing 2.0 `forward`: `body.next` (a DID, a DID URL, a did:key in its Ed25519 or X25519
//! form, a did:peer:4 in its long or short form) names a recipient DID some connection
//! registered, looked up in the form it is stored under ([`Recipient`]); every attachment is
//! queued for it before the transport answers 2xx. An `expires_time` in the past is refused;
//! a later one is stored with each queued attachment (earliest of the forward's and, for an
//! attachment the mediator can read as a plaintext message, its own): the queue never
//! delivers it afterwards.

use super::recipient::{is_long_form_of, refuse_control_characters, Recipient};
use super::Inbound;
use crate::didcomm::keys::{normalize_verkey, parse_verkey, verkey_to_did_key};
use crate::didcomm::v2::{did, json, keys};
use crate::protocols::{now_ms, ForwardResult, Handed, HandleError, Mediator, Outcome};
use crate::store::{MessageId, NewMessage, QueuedMessage, StoreError};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// Most attachments queued from one forward.
pub const MAX_ATTACHMENTS: usize = 16;

/// Most stored keys `<short>:...` read to find the long form of a did:peer:4 short form an
/// earlier version stored. Those versions stored any string as given, so keys of that shape
/// whose hash does not match (only written before, and only skipped now) may come first.
const LONG_FORMS_READ: usize = 32;

/// The connection that registered `next`, and the form of the recipient DID it registered.
/// Refused: a did:peer:4 long form whose hash does not match its document.
async fn route(m: &Mediator, next: &str) -> Result<Option<(String, String)>, HandleError> {
    let refused = |e| match e {
        HandleError::BadMessage(why) => HandleError::BadMessage(format!("forward body.next: {why}")),
        e => e,
    };
    // Not only the DID: the fragment of an old client's key is looked up too.
    refuse_control_characters(next.trim()).map_err(refused)?;
    let r = Recipient::of(did::did_of(next.trim())).map_err(refused)?;
    // A long form an earlier version stored routes to the connection that registered it: its
    // short form, registered since by another, does not take its mail over.
    if let Some(hit) = held_in_legacy_form(m, &r).await? {
        return Ok(Some(hit));
    }
    if let Some(c) = m.store.route(&r.canonical).await? {
        return Ok(Some((c, r.canonical)));
    }
    // Not registered as its short form: the long form an earlier version stored, found from
    // the short form, routes to its holder (senders use the short form after first contact).
    if let Some(hit) = held_as_long_form(m, &r).await? {
        return Ok(Some(hit));
    }
    // The same key in another did:key form (an Ed25519 did:key also names its X25519 key).
    if let Some((c, alt)) = held_in_did_key_form(m, &r.canonical).await? {
        return Ok(Some((c, alt)));
    }
    // Registered with a fragment by an older client.
    if next != r.named {
        if let Some(c) = m.store.route(next).await? {
            return Ok(Some((c, next.to_string())));
        }
    }
    Ok(None)
}

/// The connection holding `r` in a form other than the one it is stored under now, and that
/// form: the long form an earlier version stored (as named, or found from the short form), or
/// another did:key form of its key.
pub(super) async fn held_in_another_form(m: &Mediator, r: &Recipient) -> Result<Option<(String, String)>, HandleError> {
    if let Some(hit) = held_in_legacy_form(m, r).await? {
        return Ok(Some(hit));
    }
    if let Some(hit) = held_as_long_form(m, r).await? {
        return Ok(Some(hit));
    }
    held_in_did_key_form(m, &r.canonical).await
}

/// The connection holding a long form of the did:peer:4 `r` (in either form) that an earlier
/// version stored, found from its short form (a stored key `<short>:...` whose hash matches
/// its document), and that form. A revoked connection's key is not found.
pub(super) async fn held_as_long_form(m: &Mediator, r: &Recipient) -> Result<Option<(String, String)>, HandleError> {
    let Some(short) = r.peer4_short() else {
        return Ok(None);
    };
    Ok(m.store
        .route_long_forms(short, LONG_FORMS_READ)
        .await?
        .into_iter()
        .find(|(key, _)| is_long_form_of(key, short))
        .map(|(key, c)| (c, key)))
}

/// The connection holding `r` in the long form an earlier version stored, and that form.
async fn held_in_legacy_form(m: &Mediator, r: &Recipient) -> Result<Option<(String, String)>, HandleError> {
    let Some(legacy) = r.legacy() else {
        return Ok(None);
    };
    Ok(m.store.route(legacy).await?.map(|c| (c, legacy.to_string())))
}

/// The connection holding `did` (a did:key) registered in another of its forms
/// ([`keys::did_key_equivalents`]), with or without a fragment, and the form it registered.
async fn held_in_did_key_form(m: &Mediator, did: &str) -> Result<Option<(String, String)>, HandleError> {
    held_among(m, keys::did_key_equivalents(did), None).await
}

/// The first of the did:keys `dids` held by a connection other than `except`, with or without
/// a fragment (as an older client registered it), and the form it holds.
async fn held_among(
    m: &Mediator,
    dids: Vec<String>,
    except: Option<&str>,
) -> Result<Option<(String, String)>, HandleError> {
    for did in dids {
        let mb = did.trim_start_matches("did:key:").to_string();
        for form in [format!("{did}#{mb}"), did] {
            match m.store.route(&form).await? {
                Some(c) if except != Some(c.as_str()) => return Ok(Some((c, form))),
                _ => {}
            }
        }
    }
    Ok(None)
}

/// The connection other than `conn` holding an Ed25519 key of the did:key `did` (its own, or
/// one of [`keys::did_key_equivalents`]: an X25519 did:key names two) as the base58 verkey
/// DIDComm v1 stores, and that verkey. v1 and v2 keep one keylist, but each stores a key in its
/// own form: without this, a v2 connection could register a v1 wallet's key as a did:key and
/// take the v2 forwards to it. Looked up for keylist adds only, never on a forward.
pub(super) async fn held_as_verkey(
    m: &Mediator,
    conn: &str,
    did: &str,
) -> Result<Option<(String, String)>, HandleError> {
    if !did.starts_with("did:key:") {
        return Ok(None);
    }
    let mut dids = vec![did.to_string()];
    dids.extend(keys::did_key_equivalents(did));
    for d in dids {
        // An X25519 did:key has no verkey of its own.
        let Ok(verkey) = normalize_verkey(&d) else {
            continue;
        };
        match m.store.route(&verkey).await? {
            Some(c) if c != conn => return Ok(Some((c, verkey))),
            _ => {}
        }
    }
    Ok(None)
}

/// [`held_as_verkey`] the other way: the connection other than `conn` holding the Ed25519 key
/// `verkey` (base58, as DIDComm v1 stores it) as a DIDComm v2 recipient DID, in any did:key form
/// of it (its did:key, its X25519 did:key, the other Ed25519 did:key converting to that; each
/// with or without a fragment), and that form. For v1 keylist adds only, never on a forward.
pub(crate) async fn held_as_did_key(
    m: &Mediator,
    conn: &str,
    verkey: &str,
) -> Result<Option<(String, String)>, HandleError> {
    let Ok(pk) = parse_verkey(verkey) else {
        return Ok(None);
    };
    let did = verkey_to_did_key(&pk);
    let mut dids = keys::did_key_equivalents(&did);
    dids.insert(0, did);
    held_among(m, dids, Some(conn)).await
}

/// `expires_time` (seconds since the epoch) of a message, in ms.
fn expires_ms(v: &Value) -> Option<i64> {
    v.get("expires_time")
        .and_then(Value::as_i64)
        .map(|s| s.saturating_mul(1000))
}

/// `expires_time` of an attachment that is a plaintext message; an encrypted one has none the
/// mediator can see (the fields of a JWE are skipped without being copied).
fn attachment_expires_ms(payload: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Plain {
        expires_time: Option<i64>,
    }
    serde_json::from_slice::<Plain>(payload)
        .ok()?
        .expires_time
        .map(|s| s.saturating_mul(1000))
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A forward's `attachments`, read from its plaintext as sent: no JSON tree of them is built
/// (a megabyte of `[0,0,...]` read as one takes 16-32 megabytes, from anyone).
#[derive(serde::Deserialize)]
struct ForwardIn<'a> {
    #[serde(borrow)]
    attachments: Option<&'a RawValue>,
}

/// An attachment's `data`, as sent.
#[derive(serde::Deserialize, Default)]
struct DataIn<'a> {
    #[serde(borrow)]
    json: Option<&'a RawValue>,
    #[serde(borrow)]
    base64: Option<&'a RawValue>,
}

/// An attachment of a forward, as sent.
#[derive(serde::Deserialize, Default)]
struct AttachmentIn<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// What a forward queues: each attachment's `data.json` (an object) as the sender wrote it,
/// byte for byte (never a re-serialization) and borrowed from the plaintext, or its
/// `data.base64` decoded.
fn attachment_payloads(plaintext: &[u8]) -> Result<Vec<Cow<'_, [u8]>>, HandleError> {
    let f: ForwardIn =
        serde_json::from_slice(plaintext).map_err(|e| HandleError::BadMessage(format!("forward: {e}")))?;
    let atts = f
        .attachments
        .and_then(|a| json::list(a, MAX_ATTACHMENTS))
        .filter(|l| l.len > 0)
        .ok_or_else(|| HandleError::BadMessage("forward has no attachments".into()))?;
    if atts.len > MAX_ATTACHMENTS {
        return Err(HandleError::BadMessage(format!(
            "at most {MAX_ATTACHMENTS} attachments per forward"
        )));
    }
    atts.first.into_iter().map(attachment_payload).collect()
}

/// One attachment's payload: `data.json` if it is an object, else `data.base64` if it is a
/// string. A `data.json` that parsers refuse (a lone surrogate, a number out of range, nesting
/// past 128: [`json::strict`]) is refused: written byte for byte into every delivery of the
/// wallet, it would make each unreadable, and come back first in every batch.
fn attachment_payload(a: &RawValue) -> Result<Cow<'_, [u8]>, HandleError> {
    let neither = || HandleError::BadMessage("forward attachment has neither data.json nor data.base64".into());
    let a: AttachmentIn = json::object_or_default(a).map_err(|_| neither())?;
    let data: DataIn = a
        .data
        .map(json::object_or_default)
        .transpose()
        .map_err(|_| neither())?
        .unwrap_or_default();
    match (data.json.filter(|j| json::is_object(j)), json::opt_str(data.base64)) {
        (Some(j), _) => json::strict(j.get().as_bytes())
            .map(|j| Cow::Borrowed(j.get().as_bytes()))
            .map_err(|e| {
                HandleError::BadMessage(format!("forward attachment data.json is not JSON a parser reads: {e}"))
            }),
        (None, Some(b)) => crate::didcomm::b64::decode(&b)
            .map(Cow::Owned)
            .ok_or_else(|| HandleError::BadMessage("forward attachment base64 is not base64".into())),
        (None, None) => Err(neither()),
    }
}

pub async fn forward(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let next = ctx.msg["body"]["next"]
        .as_str()
        .ok_or_else(|| HandleError::BadMessage("forward has no string body.next".into()))?;
    if next.len() > crate::didcomm::did::MAX_DID_LEN {
        return Err(HandleError::BadMessage("forward body.next too long".into()));
    }
    let now = now_ms();
    let forward_expires = expires_ms(&ctx.msg);
    if let Some(exp) = forward_expires {
        if exp <= now {
            return Err(HandleError::BadMessage(format!(
                "forward expired at {} (expires_time, seconds): not queued",
                exp / 1000
            )));
        }
    }
    let payloads = attachment_payloads(&ctx.plaintext)?;
    // As routing 1.0: a cached route refused at queue time (`NoRoute`) is looked up again once.
    let mut tries = 0;
    let queued = loop {
        tries += 1;
        let (conn, recipient) = route(m, next)
            .await?
            .ok_or_else(|| HandleError::UnknownRecipient(next.chars().take(200).collect()))?;
        // Every handed message repeats the recipient (a DID of up to 8 KiB).
        let carried = payloads.iter().map(|p| p.len() + recipient.len()).sum();
        let handoff = m.handoff(&conn, carried, now);
        let msgs = payloads
            .iter()
            .map(|payload| NewMessage {
                connection: conn.clone(),
                recipient_key: recipient.clone(),
                dedup_key: Some(Sha256::digest(payload).into()),
                expires_at_ms: earliest(forward_expires, attachment_expires_ms(payload)),
                payload: payload.to_vec(),
                received_at_ms: now,
                lease: handoff.as_ref().map(|(_, l)| l.clone()),
            })
            .collect();
        let results = m.store.enqueue_routed(msgs, &m.limits).await?;
        if results.iter().any(|r| matches!(r, Err(StoreError::NoRoute))) {
            if tries < 2 {
                continue;
            }
            return Err(HandleError::UnknownRecipient(next.chars().take(200).collect()));
        }
        break (conn, recipient, results, handoff);
    };
    let (conn, recipient, results, handoff) = queued;
    if results.iter().any(Result::is_err) {
        // Refused in part (one attachment over the queue's limits): the sender is told, and
        // retries (the ones queued already are duplicates then). Those queued already were
        // leased to the hand-off owner of the wallet's live session, and no hand-off goes
        // out with a refusal: given back, its node's sweep delivers them within a period
        // instead of at the end of the lease.
        if let Some((_, lease)) = &handoff {
            let ids: Vec<MessageId> = results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .filter(|e| !e.duplicate)
                .map(|e| e.id)
                .collect();
            if !ids.is_empty() {
                if let Err(e) = m.store.release(&conn, &ids, &lease.owner).await {
                    tracing::warn!(connection = %conn, "queued attachments not given back (their lease runs out): {e}");
                }
            }
        }
        let refused = results.into_iter().find_map(Result::err);
        return Err(refused.map_or_else(|| HandleError::Internal("refusal lost".into()), Into::into));
    }
    let mut out = Outcome::default();
    let mut all_dup = true;
    let mut handed = Vec::new();
    for (r, payload) in results.into_iter().zip(payloads) {
        let e = r?;
        all_dup &= e.duplicate;
        if e.duplicate {
            // Queued by an earlier try (one refused in part gave its attachments back
            // without waking anyone).
            out.repeated = Some(conn.clone());
        }
        if handoff.is_some() && !e.duplicate {
            handed.push(QueuedMessage {
                id: e.id,
                connection: conn.clone(),
                recipient_key: recipient.clone(),
                payload: payload.into_owned(),
                received_at_ms: now,
                attempts: 1,
            });
        }
    }
    out.forward = Some(ForwardResult::Queued { duplicate: all_dup });
    match handoff {
        _ if all_dup => {}
        Some((node, _)) => {
            out.handed = Some(Handed {
                node,
                conn,
                msgs: handed,
            })
        }
        None => out.queued_for.push(conn),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::did::{create_peer4, peer4_short_form};
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::{granted_connection_for_test, mediator_for_test};

    /// A mediator whose connections `c1` and `c2` registered `c1_keys` and `c2_keys` as they are
    /// (as an earlier version stored them).
    async fn mediator_with(c1_keys: &[String], c2_keys: &[String]) -> Mediator {
        let (m, _) = mediator_for_test().await;
        let c2 = granted_connection_for_test("c2", "ours", "theirs-2");
        m.store.put_connection(&c2).await.unwrap();
        for (c, keys) in [("c1", c1_keys), ("c2", c2_keys)] {
            let r = m.store.update_keys(c, keys, &[]).await.unwrap();
            assert!(r.iter().all(|(_, u)| *u == crate::store::KeyUpdate::Added), "{r:?}");
        }
        m
    }

    fn peer4() -> (String, String) {
        let long = create_peer4(&KeyPair::generate().verkey(), &["https://w.example".into()], &[]);
        let short = peer4_short_form(&long).unwrap();
        (long, short)
    }

    fn hit(c: &str, form: &str) -> Option<(String, String)> {
        Some((c.to_string(), form.to_string()))
    }

    fn forward_with(attachments: &str) -> Vec<u8> {
        format!(r#"{{"id": "f", "type": "https://didcomm.org/routing/2.0/forward", "attachments": {attachments}}}"#)
            .into_bytes()
    }

    fn refusal(plaintext: &[u8]) -> String {
        match attachment_payloads(plaintext) {
            Err(HandleError::BadMessage(why)) => why,
            other => panic!("{:?}", other.map(|p| p.len())),
        }
    }

    #[test]
    fn a_forward_queues_each_attachment_as_the_sender_wrote_it() {
        // Not in serde_json's key order, with spaces: a re-serialization would change it.
        let jwe = r#"{ "protected": "p", "iv": "i",  "ciphertext": "c", "tag": "t" }"#;
        let b64 = crate::didcomm::b64::encode(b"opaque");
        let pt = forward_with(&format!(
            r#"[{{"id": "a", "data": {{"json": {jwe}}}}}, {{"data": {{"json": "s", "base64": "{b64}"}}}}]"#
        ));
        let got = attachment_payloads(&pt).unwrap();
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Cow::Borrowed(b) if *b == jwe.as_bytes()));
        assert_eq!(&*got[1], b"opaque");
    }

    #[test]
    fn a_forward_without_attachments_it_can_queue_is_refused() {
        for (atts, why) in [
            ("[]", "no attachments"),
            ("null", "no attachments"),
            (r#"{"data": {}}"#, "no attachments"),
            ("[7]", "neither data.json nor data.base64"),
            (r#"[["data"]]"#, "neither data.json nor data.base64"),
            (r#"[{"data": {"json": [1]}}]"#, "neither data.json nor data.base64"),
            (r#"[{"data": 7}]"#, "neither data.json nor data.base64"),
            (r#"[{"data": {"base64": "!!"}}]"#, "not base64"),
        ] {
            let got = refusal(&forward_with(atts));
            assert!(got.contains(why), "{atts}: {got}");
        }
        let many = format!("[{}]", vec![r#"{"data": {"json": {}}}"#; MAX_ATTACHMENTS + 1].join(","));
        assert!(refusal(&forward_with(&many)).contains("at most 16"));
        let no_member = br#"{"id": "f", "type": "https://didcomm.org/routing/2.0/forward"}"#;
        assert!(refusal(no_member).contains("no attachments"));
    }

    #[test]
    fn a_forward_whose_json_a_parser_refuses_is_refused_whole() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for bad in [
            r#"{"ciphertext": "c", "n": 1e400}"#.to_string(),
            r#"{"ciphertext": "\ud800"}"#.to_string(),
            format!(r#"{{"ciphertext": "c", "a": {deep}}}"#),
        ] {
            // Beside a good one: nothing of the forward is queued.
            let atts = format!(r#"[{{"data": {{"json": {{"ciphertext": "ok"}}}}}}, {{"data": {{"json": {bad}}}}}]"#);
            let got = refusal(&forward_with(&atts));
            assert!(got.contains("not JSON a parser reads"), "{bad}: {got}");
        }
    }

    #[actix_rt::test]
    async fn a_did_peer_4_routes_as_its_short_form_in_either_form() {
        let (long, short) = peer4();
        let m = mediator_with(std::slice::from_ref(&short), &[]).await;
        for next in [
            long.clone(),
            format!("{long}#key-1"),
            short.clone(),
            format!("{short}#key-1"),
        ] {
            assert_eq!(route(&m, &next).await.unwrap(), hit("c1", &short), "{next}");
        }
        // Another DID's document under this one's hash.
        let (other_long, _) = peer4();
        let forged = format!("{short}:{}", other_long.rsplit(':').next().unwrap());
        match route(&m, &forged).await {
            Err(HandleError::BadMessage(why)) => assert!(why.contains("hash does not match"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[actix_rt::test]
    async fn a_next_holding_a_control_character_is_refused() {
        let m = mediator_with(&[], &[]).await;
        for next in ["did:x\u{0}", "did:x:a#key-1\u{0}", "did:x:a\u{1b}"] {
            match route(&m, next).await {
                Err(HandleError::BadMessage(why)) => assert!(why.contains("control character"), "{why}"),
                other => panic!("{next:?}: {other:?}"),
            }
        }
    }

    #[actix_rt::test]
    async fn a_long_form_stored_by_an_earlier_version_still_routes_to_its_holder() {
        let (long, short) = peer4();
        // c1 registered the long form before recipients had one form; c2 registered the short
        // form since (nothing links it to the long form it holds no record of).
        let m = mediator_with(std::slice::from_ref(&long), std::slice::from_ref(&short)).await;
        assert_eq!(route(&m, &long).await.unwrap(), hit("c1", &long));
        assert_eq!(route(&m, &format!("{long}#key-1")).await.unwrap(), hit("c1", &long));
        assert_eq!(route(&m, &short).await.unwrap(), hit("c2", &short));
        // Adding the DID in either form is checked against the long form held.
        let r = super::super::recipient::Recipient::parse(&long).unwrap();
        assert_eq!(held_in_another_form(&m, &r).await.unwrap(), hit("c1", &long));
    }

    #[actix_rt::test]
    async fn a_short_form_nobody_registered_routes_to_the_holder_of_its_legacy_long_form() {
        let (long, short) = peer4();
        // Stored as given by an earlier version, sorted before the long form: keys that only
        // look like a long form of it (made-up documents under its hash).
        let (other_long, _) = peer4();
        let other_doc = other_long.rsplit(':').next().unwrap();
        let forged = [format!("{short}:0"), format!("{short}:1{}", &other_doc[1..])];
        assert!(forged.iter().all(|f| *f < long), "{forged:?}");
        // c1 registered the long form before recipients had one form; nobody the short form.
        let m = mediator_with(std::slice::from_ref(&long), &forged).await;
        for next in [short.clone(), format!("{short}#key-1"), long.clone()] {
            assert_eq!(route(&m, &next).await.unwrap(), hit("c1", &long), "{next}");
        }
        let r = Recipient::parse(&short).unwrap();
        assert_eq!(held_in_another_form(&m, &r).await.unwrap(), hit("c1", &long));
        assert_eq!(held_as_long_form(&m, &r).await.unwrap(), hit("c1", &long));
        // Another did:peer:4 whose short form is a prefix of this one's is not it.
        let prefix = Recipient::parse(&short[..short.len() - 1]).unwrap();
        assert_eq!(route(&m, &prefix.named).await.unwrap(), None);
        assert_eq!(held_in_another_form(&m, &prefix).await.unwrap(), None);
    }
}
