//! routing 1.0 `forward`: map `to` to the connection that registered that key, and commit the
//! inner message to the queue before the transport answers 2xx.

use super::{now_ms, ForwardResult, Handed, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::keys::normalize_verkey;
use crate::didcomm::message::{self, MessageType};
use crate::didcomm::v2::json;
use crate::store::{NewMessage, QueuedMessage, StoreError};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// A routing 1.0 forward read from its plaintext without building a JSON tree: `to` and `msg`
/// as they were sent. The queued payload is `msg`'s own bytes (a JWE object as the sender wrote
/// it, or the content of a JWE string), never a re-serialization.
#[derive(serde::Deserialize)]
pub struct RawForward<'a> {
    #[serde(rename = "@type", borrow)]
    type_: Option<Cow<'a, str>>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow)]
    msg: Option<&'a RawValue>,
}

impl<'a> RawForward<'a> {
    /// `plaintext` read as a forward, if it is a JSON object whose `@type` is routing's
    /// `forward` of major version 1 (any minor version and prefix [`MessageType::parse`]
    /// reads, as the dispatch does).
    pub fn peek(plaintext: &'a [u8]) -> Option<RawForward<'a>> {
        let f: RawForward<'a> = serde_json::from_slice(plaintext).ok()?;
        let t = MessageType::parse(f.type_.as_deref()?)?;
        t.is("routing", "forward").then_some(f)
    }

    /// The forward in `plaintext`, whatever its `@type` says (the dispatch has read it).
    fn parse(plaintext: &'a [u8]) -> Result<RawForward<'a>, HandleError> {
        serde_json::from_slice(plaintext).map_err(|e| HandleError::BadMessage(format!("forward: {e}")))
    }

    /// `to`, a string.
    fn to(&self) -> Result<Cow<'a, str>, HandleError> {
        let bad = || HandleError::BadMessage("forward has no string `to`".into());
        serde_json::from_str::<Cow<'a, str>>(self.to.ok_or_else(bad)?.get()).map_err(|_| bad())
    }

    /// What is queued: `msg`, a JWE as an object (with `ciphertext` or `protected`) or as a
    /// string holding one. Either is JSON a parser reads ([`json::strict`]): `msg` was read
    /// only for its grammar, which passes a lone surrogate, a number out of range and nesting
    /// of any depth; queued, such a payload made every delivery holding it unreadable to the
    /// wallet (a 1.0 batch embeds it as JSON, or else as a string Credo refuses the batch for).
    fn payload(&self) -> Result<Vec<u8>, HandleError> {
        let bad = || HandleError::BadMessage("forward `msg` is not an encrypted message".into());
        let raw = self.msg.ok_or_else(bad)?.get();
        match raw.as_bytes().first() {
            Some(b'{') => jwe(raw.as_bytes()).map(|()| raw.as_bytes().to_vec()),
            Some(b'"') => match serde_json::from_str::<Cow<'_, str>>(raw) {
                Ok(s) => jwe(s.as_bytes()).map(|()| s.into_owned().into_bytes()),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

/// Whether `text` is a JWE object (with `ciphertext` or `protected`) that a parser reads: one
/// strict pass that notes the members as it goes (a forward's `msg` is on every forward's path).
fn jwe(text: &[u8]) -> Result<(), HandleError> {
    let bad = || HandleError::BadMessage("forward `msg` is not an encrypted message".into());
    match json::strict_members(text, &["ciphertext", "protected"]) {
        Ok(Some(found)) if found != 0 => Ok(()),
        Ok(_) => Err(bad()),
        Err(e) => Err(HandleError::BadMessage(format!(
            "forward `msg` is not JSON a parser reads: {e}"
        ))),
    }
}

/// A forward that came through the dispatch (an authcrypted one: see [`Mediator::handle`]).
pub async fn forward(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    queue(m, &RawForward::parse(&ctx.plaintext)?).await
}

/// Queues the forward's `msg` for the connection that registered `to`.
pub async fn queue(m: &Mediator, f: &RawForward<'_>) -> Result<Outcome, HandleError> {
    let to_sent = f.to()?;
    let raw_to = to_sent.as_ref();
    let normalize = |to: &str| {
        normalize_verkey(to)
            .map_err(|e| HandleError::BadMessage(format!("forward `to` {:?}: {e}", message::clip(to, 80))))
    };
    // A `to` in base58 is looked up as written (below) before it is decoded: decoding costs a
    // base58 round trip and an Ed25519 point decompression per forward.
    let plain = looks_base58(raw_to);
    let to_checked = if plain { None } else { Some(normalize(raw_to)?) };
    let payload = f.payload()?;
    let dedup: [u8; 32] = Sha256::digest(&payload).into();
    let received_at_ms = now_ms();
    // Routing keys of DIDComm v1 are stored normalized (base58 verkeys, see mediation), and
    // DIDComm v2 ones are DIDs: a base58 `to` the store routes is a normalized verkey. Any other
    // is decoded and normalized as before; a `to` that normalizes to itself is not looked up
    // twice.
    let (to, mut first) = match to_checked {
        Some(to) => (to, None),
        None => match m.store.route(raw_to).await? {
            Some(conn) => (raw_to.to_string(), Some(Some(conn))),
            None => {
                let to = normalize(raw_to)?;
                let first = (to == raw_to).then_some(None);
                (to, first)
            }
        },
    };
    // The route may come from the node's cache: the store refuses it (`NoRoute`) if the key
    // left that connection meanwhile, and the cache then forgets it, so the second lookup
    // reads the store. Two refusals in a row: the key is changing right now; no route.
    let mut tries = 0;
    let (conn, enq, handoff) = loop {
        tries += 1;
        let route = match first.take() {
            Some(r) => r,
            None => m.store.route(&to).await?,
        };
        let conn = route.ok_or_else(|| HandleError::UnknownRecipient(to.clone()))?;
        let handoff = m.handoff(&conn, payload.len() + to.len(), received_at_ms);
        let msg = NewMessage {
            connection: conn.clone(),
            recipient_key: to.clone(),
            payload: payload.clone(),
            received_at_ms,
            dedup_key: Some(dedup),
            expires_at_ms: None,
            lease: handoff.as_ref().map(|(_, l)| l.clone()),
        };
        let mut results = m.store.enqueue_routed(vec![msg], &m.limits).await?;
        match results
            .pop()
            .ok_or_else(|| HandleError::Internal("enqueue returned no result".into()))?
        {
            Err(StoreError::NoRoute) if tries < 2 => continue,
            Err(StoreError::NoRoute) => return Err(HandleError::UnknownRecipient(to)),
            r => break (conn, r?, handoff),
        }
    };
    let mut out = Outcome {
        forward: Some(ForwardResult::Queued {
            duplicate: enq.duplicate,
        }),
        ..Outcome::default()
    };
    match handoff {
        _ if enq.duplicate => out.repeated = Some(conn),
        Some((node, _)) => {
            out.handed = Some(Handed {
                node,
                msgs: vec![QueuedMessage {
                    id: enq.id,
                    connection: conn.clone(),
                    recipient_key: to,
                    payload,
                    received_at_ms,
                    attempts: 1,
                }],
                conn,
            })
        }
        None => out.queued_for.push(conn),
    }
    Ok(out)
}

/// Whether `s` could be a base58 verkey as written (32 bytes are 32-44 base58 characters).
fn looks_base58(s: &str) -> bool {
    (32..=44).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() && !matches!(b, b'0' | b'O' | b'I' | b'l'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::didcomm::envelope;
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::{MediatorKeys, TransportKind};
    use crate::store::{SledStore, Store};
    use std::sync::Arc;

    /// A JWE object as a sender may write it: not in serde_json's key order, with spaces.
    const JWE: &str = r#"{ "protected": "eyJ0eXAiOiJKV00vMS4wIn0", "iv": "aXY", "ciphertext": "Y3Q", "tag": "dGFn" }"#;
    const FORWARD: &str = "https://didcomm.org/routing/1.0/forward";

    fn plaintext(ty: &str, to: &str, msg: &str) -> Vec<u8> {
        format!(r#"{{"@type": "{ty}", "@id": "f1", "to": {to}, "msg": {msg}}}"#).into_bytes()
    }

    #[test]
    fn peek_reads_forwards_of_either_prefix_and_nothing_else() {
        let key = "\"8HH5gYEeNc3z7PYXmd54d4x6qAfCNrqQqEB3nS7Zfu7K\"";
        assert!(RawForward::peek(&plaintext(FORWARD, key, JWE)).is_some());
        let legacy = "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/routing/1.0/forward";
        assert!(RawForward::peek(&plaintext(legacy, key, JWE)).is_some());
        let ping = "https://didcomm.org/trust_ping/1.0/ping";
        assert!(RawForward::peek(&plaintext(ping, key, JWE)).is_none());
        let minor = "https://didcomm.org/routing/1.3/forward";
        assert!(RawForward::peek(&plaintext(minor, key, JWE)).is_some());
        let major = "https://didcomm.org/routing/2.0/forward";
        assert!(
            RawForward::peek(&plaintext(major, key, JWE)).is_none(),
            "another protocol"
        );
        assert!(RawForward::peek(br#"{"@type": 7, "to": "k", "msg": {}}"#).is_none());
        assert!(RawForward::peek(br#"{"to": "k", "msg": {}}"#).is_none());
        assert!(RawForward::peek(b"[1, 2]").is_none());
        assert!(RawForward::peek(b"not json").is_none());
    }

    #[test]
    fn payload_is_msg_as_sent() {
        let pt = plaintext(FORWARD, "\"k\"", JWE);
        let f = RawForward::peek(&pt).unwrap();
        // Byte for byte: a re-serialization would sort the keys and drop the spaces.
        assert_eq!(f.payload().unwrap(), JWE.as_bytes());
        // A JWE sent as a JSON string is queued as its content.
        let s = serde_json::to_string(JWE).unwrap();
        let pt = plaintext(FORWARD, "\"k\"", &s);
        assert_eq!(RawForward::peek(&pt).unwrap().payload().unwrap(), JWE.as_bytes());
        assert_eq!(&*RawForward::peek(&pt).unwrap().to().unwrap(), "k");
    }

    #[test]
    fn refuses_what_is_not_a_forward_of_a_jwe() {
        for msg in [r#"{"hello": 1}"#, r#""""#, "7", "null", "[]", r#"{"ciphertext": null}"#] {
            let pt = plaintext(FORWARD, "\"k\"", msg);
            let f = RawForward::peek(&pt).unwrap_or_else(|| panic!("msg {msg}: read as a forward"));
            match f.payload() {
                Err(HandleError::BadMessage(_)) => {}
                other => panic!(
                    "msg {msg}: {:?}",
                    other.map(|p| String::from_utf8_lossy(&p).into_owned())
                ),
            }
        }
        // Not JSON at all: no forward to read (the dispatch answers it as before).
        assert!(RawForward::peek(&plaintext(FORWARD, "\"k\"", r#"{"ciphertext": 1"#)).is_none());
        for to in ["7", "null", "{}", r#"["k"]"#] {
            let pt = plaintext(FORWARD, to, JWE);
            let f = RawForward::peek(&pt).unwrap();
            assert!(matches!(f.to(), Err(HandleError::BadMessage(_))), "to {to}");
        }
        let no_to = format!(r#"{{"@type": "{FORWARD}", "msg": {JWE}}}"#);
        assert!(RawForward::peek(no_to.as_bytes()).unwrap().to().is_err());
        let no_msg = format!(r#"{{"@type": "{FORWARD}", "to": "k"}}"#);
        assert!(RawForward::peek(no_msg.as_bytes()).unwrap().payload().is_err());
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        // serde_json skips raw and ignored values with a loop, and reads the strict check's
        // values only 128 deep: a plaintext nested 200,000 deep (inside a MiB envelope) is
        // refused, not a stack overflow.
        let deep = format!(r#"{{"ciphertext": {}{}}}"#, "[".repeat(200_000), "]".repeat(200_000));
        let pt = plaintext(FORWARD, "\"k\"", &deep);
        let f = RawForward::peek(&pt).unwrap();
        assert!(matches!(f.payload(), Err(HandleError::BadMessage(why)) if why.contains("parser reads")));
        let pt = plaintext(FORWARD, &"[".repeat(200_000), JWE);
        assert!(RawForward::peek(&pt).is_none());
    }

    #[test]
    fn a_msg_a_parser_refuses_is_not_queued_as_an_object_or_inside_a_string() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for bad in [
            r#"{"ciphertext": "\ud800", "protected": "p"}"#.to_string(),
            r#"{"ciphertext": "c", "n": 1e400}"#.to_string(),
            format!(r#"{{"ciphertext": "c", "a": {deep}}}"#),
        ] {
            assert!(serde_json::from_str::<&RawValue>(&bad).is_ok(), "{bad}");
            for msg in [bad.clone(), serde_json::to_string(&bad).unwrap()] {
                let pt = plaintext(FORWARD, "\"k\"", &msg);
                match RawForward::peek(&pt).unwrap().payload() {
                    Err(HandleError::BadMessage(why)) => assert!(why.contains("parser reads"), "{msg}: {why}"),
                    other => panic!("{msg}: {:?}", other.map(|p| p.len())),
                }
            }
        }
        // A string holding what is not a JWE object is not one either.
        for inner in ["not json", "[1, 2]", r#"{"hello": 1}"#] {
            let pt = plaintext(FORWARD, "\"k\"", &serde_json::to_string(inner).unwrap());
            assert!(RawForward::peek(&pt).unwrap().payload().is_err(), "{inner}");
        }
    }

    /// Anoncrypted (read by `peek`) and authcrypted (through the dispatch) forwards queue the
    /// same bytes: the `msg` the sender wrote.
    #[tokio::test]
    async fn both_paths_queue_msg_as_sent() {
        let store: Arc<dyn Store> = Arc::new(SledStore::temporary().await.unwrap());
        let keys = MediatorKeys::generate();
        let m = Mediator::new(
            store.clone(),
            keys.clone(),
            &Config::single_node_default(),
            "n1",
            "http://127.0.0.1:1",
        );
        let peer = KeyPair::generate();
        let conn = crate::protocols::granted_connection_for_test("c1", &keys.did_key.verkey(), &peer.verkey());
        store.put_connection(&conn).await.unwrap();
        let wallet = KeyPair::generate().verkey();
        store
            .update_keys("c1", std::slice::from_ref(&wallet), &[])
            .await
            .unwrap();
        let routing = [keys.routing.verkey()];
        for (i, sender) in [None, Some(&peer)].into_iter().enumerate() {
            let jwe = JWE.replace("Y3Q", &format!("Y3Q{i}"));
            let pt = plaintext(FORWARD, &format!("\"{wallet}\""), &jwe);
            let env = envelope::pack(&pt, &routing, sender).unwrap();
            let out = m.handle(&env, TransportKind::Http, "n1/http").await.unwrap();
            assert_eq!(out.forward, Some(ForwardResult::Queued { duplicate: false }));
            assert_eq!(out.queued_for, vec!["c1".to_string()]);
            // An authcrypted forward still names the connection its sender key belongs to.
            assert_eq!(out.connection.map(|c| c.id), sender.map(|_| "c1".to_string()));
            let got = store.lease("c1", 10, "t", now_ms(), now_ms() + 60_000).await.unwrap();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].payload, jwe.as_bytes());
            store.ack("c1", &[got[0].id]).await.unwrap();
        }
    }
}
