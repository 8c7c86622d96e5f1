//! routing 1.0 `forward`: map `to` to the connection that registered that key, and commit the
//! inner message to the queue before the transport answers 2xx.

use super::{now_ms, ForwardResult, Handed, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::keys::normalize_verkey;
use crate::store::{NewMessage, QueuedMessage, StoreError};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub async fn forward(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let raw_to = ctx.msg["to"]
        .as_str()
        .ok_or_else(|| HandleError::BadMessage("forward has no string `to`".into()))?;
    let normalize =
        |to: &str| normalize_verkey(to).map_err(|e| HandleError::BadMessage(format!("forward `to` {to:?}: {e}")));
    // A `to` in base58 is looked up as written (below) before it is decoded: decoding costs a
    // base58 round trip and an Ed25519 point decompression per forward.
    let plain = looks_base58(raw_to);
    let to_checked = if plain { None } else { Some(normalize(raw_to)?) };
    let payload = match &ctx.msg["msg"] {
        v @ Value::Object(o) if o.contains_key("ciphertext") || o.contains_key("protected") => {
            serde_json::to_vec(v).map_err(|e| HandleError::Internal(e.to_string()))?
        }
        Value::String(s) if !s.is_empty() => s.as_bytes().to_vec(),
        _ => {
            return Err(HandleError::BadMessage(
                "forward `msg` is not an encrypted message".into(),
            ))
        }
    };
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
        let handoff = m.handoff(&conn, payload.len(), received_at_ms);
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
        _ if enq.duplicate => {}
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
