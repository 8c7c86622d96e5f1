//! routing 2.0 `forward`: `body.next` (a DID, a DID URL, or a did:key in its Ed25519 or X25519
//! form) names a recipient DID some connection registered; every attachment is queued for it
//! before the transport answers 2xx. An `expires_time` in the past is refused; a later one is
//! stored with each queued attachment (earliest of the forward's and, for an attachment the
//! mediator can read as a plaintext message, its own): the queue never delivers it afterwards.

use super::Inbound;
use crate::didcomm::v2::{did, keys};
use crate::protocols::{now_ms, ForwardResult, Handed, HandleError, Mediator, Outcome};
use crate::store::{MessageId, NewMessage, QueuedMessage, StoreError};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Most attachments queued from one forward.
pub const MAX_ATTACHMENTS: usize = 16;

/// The connection that registered `next`, and the recipient DID it registered.
async fn route(m: &Mediator, next: &str) -> Result<Option<(String, String)>, HandleError> {
    let d = did::did_of(next.trim()).to_string();
    if let Some(c) = m.store.route(&d).await? {
        return Ok(Some((c, d)));
    }
    // The same key in another did:key form (an Ed25519 did:key also names its X25519 key).
    if let Some((c, alt)) = held_in_another_form(m, &d).await? {
        return Ok(Some((c, alt)));
    }
    // Registered with a fragment by an older client.
    if next != d {
        if let Some(c) = m.store.route(next).await? {
            return Ok(Some((c, next.to_string())));
        }
    }
    Ok(None)
}

/// The connection holding `did` (a did:key) registered in another of its forms
/// ([`keys::did_key_equivalents`]), with or without a fragment, and the form it registered.
pub(super) async fn held_in_another_form(m: &Mediator, did: &str) -> Result<Option<(String, String)>, HandleError> {
    for alt in keys::did_key_equivalents(did) {
        let mb = alt.trim_start_matches("did:key:").to_string();
        for form in [format!("{alt}#{mb}"), alt] {
            if let Some(c) = m.store.route(&form).await? {
                return Ok(Some((c, form)));
            }
        }
    }
    Ok(None)
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
    let atts = ctx.msg["attachments"]
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| HandleError::BadMessage("forward has no attachments".into()))?;
    if atts.len() > MAX_ATTACHMENTS {
        return Err(HandleError::BadMessage(format!(
            "at most {MAX_ATTACHMENTS} attachments per forward"
        )));
    }
    let mut payloads = Vec::with_capacity(atts.len());
    for a in atts {
        let data = &a["data"];
        let p = match (data.get("json"), data.get("base64").and_then(Value::as_str)) {
            (Some(j @ Value::Object(_)), _) => {
                serde_json::to_vec(j).map_err(|e| HandleError::Internal(e.to_string()))?
            }
            (_, Some(b)) => crate::didcomm::b64::decode(b)
                .ok_or_else(|| HandleError::BadMessage("forward attachment base64 is not base64".into()))?,
            _ => {
                return Err(HandleError::BadMessage(
                    "forward attachment has neither data.json nor data.base64".into(),
                ))
            }
        };
        payloads.push(p);
    }
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
                payload: payload.clone(),
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
                payload,
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
