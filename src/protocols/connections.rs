//! connections 1.0, responder side (RFC 0160): request -> response with a signed
//! `connection~sig` holding the mediator's legacy DID and DID document.

use super::didexchange::new_connection;
use super::{HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::{did, jws, message};
use serde_json::json;

pub async fn request(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let c = &ctx.msg["connection"];
    let their_did = c["DID"]
        .as_str()
        .or_else(|| c["did"].as_str())
        .ok_or_else(|| HandleError::BadMessage("connections request has no connection.DID".into()))?;
    let doc_json = c.get("DIDDoc").or_else(|| c.get("did_doc"));
    super::didexchange::before_resolving(ctx)?;
    let doc = did::resolve(their_did, doc_json)
        .map_err(|e| HandleError::BadMessage(format!("cannot resolve {}: {e}", message::clip(their_did, 80))))?;
    super::didexchange::usable_doc(their_did, &doc)?;
    let sender = super::didexchange::proven_unheld_sender(m, ctx, &doc).await?;
    super::oob::claim(m, ctx, &sender).await?;
    let mut conn = new_connection(m, ctx, "connections/1.0", their_did, &doc, &sender);
    let ours = did::legacy_did_from_verkey(&m.keys.did_key.public_bytes());
    let our_doc = did::legacy_diddoc(
        &ours,
        &m.keys.did_key.verkey(),
        &[m.public_url.clone(), m.public_ws_url.clone()],
        &[],
    );
    conn.our_did = Some(ours.clone());
    let mut response = ctx.reply("response");
    response["connection~sig"] = jws::sign_connection(&json!({ "DID": ours, "DIDDoc": our_doc }), &m.keys.did_key);
    m.store.put_connection(&conn).await?;
    tracing::info!(connection = %conn.id, "connections 1.0 request accepted");
    Ok(Outcome {
        replies: vec![response],
        connection: Some(conn),
        ..Outcome::default()
    })
}
