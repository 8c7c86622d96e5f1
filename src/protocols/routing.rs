//! routing 1.0 `forward`: map `to` to the connection that registered that key, and commit the
//! inner message to the queue before the transport answers 2xx.

use super::{now_ms, ForwardResult, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::keys::normalize_verkey;
use crate::store::NewMessage;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub async fn forward(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let to = ctx.msg["to"]
        .as_str()
        .ok_or_else(|| HandleError::BadMessage("forward has no string `to`".into()))?;
    let to = normalize_verkey(to).map_err(|e| HandleError::BadMessage(format!("forward `to` {to:?}: {e}")))?;
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
    let conn = m
        .store
        .route(&to)
        .await?
        .ok_or_else(|| HandleError::UnknownRecipient(to.clone()))?;
    let dedup: [u8; 32] = Sha256::digest(&payload).into();
    let mut results = m
        .store
        .enqueue(
            vec![NewMessage {
                connection: conn.clone(),
                recipient_key: to,
                payload,
                received_at_ms: now_ms(),
                dedup_key: Some(dedup),
                expires_at_ms: None,
            }],
            &m.limits,
        )
        .await?;
    let enq = results
        .pop()
        .ok_or_else(|| HandleError::Internal("enqueue returned no result".into()))??;
    Ok(Outcome {
        forward: Some(ForwardResult::Queued {
            duplicate: enq.duplicate,
        }),
        queued_for: if enq.duplicate { vec![] } else { vec![conn] },
        ..Outcome::default()
    })
}
