//! messagepickup 3.0 (and 4.0: same messages) over v1's queue: status-request -> status,
//! delivery-request -> delivery (attachments in `data.json`, ids = queue ids) or status when
//! empty, messages-received -> status, live-delivery-change (WebSocket only). Deliveries are
//! leased to the transport's owner and deleted on messages-received, as in pickup 2.0.
//! `recipient_did` narrows a delivery to messages forwarded for that DID (a did:peer:4 named
//! in either form).

use super::recipient::Recipient;
use super::Inbound;
use crate::protocols::pickup::{ack_received, external_id, lease_batch};
use crate::protocols::{now_ms, HandleError, Mediator, Outcome, TransportKind};
use crate::store::{Connection, MediationState, QueuedMessage};
use serde_json::{json, Value};

pub async fn handle(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?.clone();
    if conn.mediation != MediationState::Granted {
        return Err(HandleError::BadMessage(
            "pickup needs mediation: send mediate-request first".into(),
        ));
    }
    match ctx.name.as_str() {
        "status-request" => Ok(Outcome {
            replies: vec![status(m, ctx, &conn, None).await?],
            ..Outcome::default()
        }),
        "delivery-request" => delivery_request(m, ctx, &conn).await,
        "messages-received" => messages_received(m, ctx, &conn).await,
        "live-delivery-change" => live_delivery_change(m, ctx, &conn).await,
        _ => Err(ctx.unsupported()),
    }
}

/// The recipient DID of `recipient_did`, in the form its messages are queued under.
async fn recipient_filter(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Option<String>, HandleError> {
    match ctx.msg["body"]["recipient_did"].as_str() {
        Some(named) => queued_form(m, conn, &Recipient::parse(named)?).await.map(Some),
        None => Ok(None),
    }
}

/// The form of `r` the messages of `conn` for it are queued under: the form `conn` registered
/// it in (a long form an earlier version stored, as named or found from the short form, else
/// the canonical one).
async fn queued_form(m: &Mediator, conn: &Connection, r: &Recipient) -> Result<String, HandleError> {
    let mine = |c: Option<String>| c.as_deref() == Some(conn.id.as_str());
    if let Some(legacy) = r.legacy() {
        if mine(m.store.route(legacy).await?) {
            return Ok(legacy.to_string());
        }
    }
    if r.peer4_short().is_some() && !mine(m.store.route(&r.canonical).await?) {
        if let Some((c, long)) = super::routing::held_as_long_form(m, r).await? {
            if c == conn.id {
                return Ok(long);
            }
        }
    }
    Ok(r.canonical.clone())
}

async fn status(m: &Mediator, ctx: &Inbound, conn: &Connection, live: Option<bool>) -> Result<Value, HandleError> {
    let filter = recipient_filter(m, ctx, conn).await?;
    let stats = m.store.pending_stats(&conn.id, filter.as_deref(), now_ms()).await?;
    let mut body = json!({ "message_count": stats.count });
    if let Some(o) = stats.oldest_received_ms {
        body["oldest_received_time"] = json!(o / 1000);
    }
    if let Some(l) = live {
        body["live_delivery"] = json!(l);
    }
    if let Some(r) = filter {
        body["recipient_did"] = json!(r);
    }
    Ok(ctx.reply(m, "status", body))
}

/// A queued message as a delivery's attachment: its payload embedded as it is ([`super::raw`]),
/// never as a tree of its JSON.
fn attachment(q: &QueuedMessage) -> Value {
    json!({ "id": external_id(q.id), "media_type": crate::didcomm::v2::TYP_ENCRYPTED, "data": super::raw::attachment_data(&q.payload) })
}

/// A standalone `delivery` pushed in live mode.
pub fn live_delivery(m: &Mediator, conn: &Connection, msgs: &[QueuedMessage]) -> Value {
    let mut d = json!({
        "id": crate::didcomm::message::new_id(),
        "type": format!("{}messagepickup/3.0/delivery", super::PREFIX),
        "from": m.v2.did,
        "created_time": now_ms() / 1000,
        "body": {},
        "attachments": msgs.iter().map(attachment).collect::<Vec<_>>(),
    });
    if let Some(t) = &conn.their_did {
        d["to"] = json!([t]);
    }
    d
}

async fn delivery_request(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let filter = recipient_filter(m, ctx, conn).await?;
    let msgs = lease_batch(
        m,
        conn,
        ctx.msg["body"]["limit"].as_u64(),
        filter.as_deref(),
        &ctx.lease_owner,
    )
    .await?;
    if msgs.is_empty() {
        return Ok(Outcome {
            replies: vec![status(m, ctx, conn, None).await?],
            ..Outcome::default()
        });
    }
    let mut body = json!({});
    if let Some(f) = &filter {
        body["recipient_did"] = json!(f);
    }
    let mut d = ctx.reply(m, "delivery", body);
    d["attachments"] = Value::Array(msgs.iter().map(attachment).collect());
    Ok(Outcome {
        replies: vec![d],
        leased: msgs.iter().map(|q| q.id).collect(),
        ..Outcome::default()
    })
}

async fn messages_received(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let acked = ack_received(m, conn, &ctx.msg["body"]["message_id_list"]).await?;
    Ok(Outcome {
        replies: vec![status(m, ctx, conn, None).await?],
        ..acked
    })
}

async fn live_delivery_change(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let Some(live) = ctx.msg["body"]["live_delivery"].as_bool() else {
        return Err(HandleError::BadMessage(
            "live-delivery-change needs a boolean body.live_delivery".into(),
        ));
    };
    if live && ctx.transport != TransportKind::WebSocket {
        return Err(HandleError::BadMessage(format!(
            "{}: live delivery needs a WebSocket",
            super::LIVE_MODE_NOT_SUPPORTED
        )));
    }
    Ok(Outcome {
        replies: vec![status(m, ctx, conn, Some(live)).await?],
        live_mode: Some(live),
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::did::{create_peer4, peer4_short_form};
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::mediator_for_test;

    #[actix_rt::test]
    async fn a_did_peer_4_filter_names_the_form_its_messages_are_queued_under() {
        let (m, conn) = mediator_for_test().await;
        let long = create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let short = peer4_short_form(&long).unwrap();
        let r = Recipient::parse(&long).unwrap();
        let named_short = Recipient::parse(&short).unwrap();
        // Registered now: stored, and queued for, as the short form.
        assert_eq!(queued_form(&m, &conn, &r).await.unwrap(), short);
        assert_eq!(queued_form(&m, &conn, &named_short).await.unwrap(), short);
        // Registered as the long form by an earlier version: its messages are queued under it.
        m.store
            .update_keys(&conn.id, std::slice::from_ref(&long), &[])
            .await
            .unwrap();
        assert_eq!(queued_form(&m, &conn, &r).await.unwrap(), long);
        // Named as the short form, which that long form routes to this connection.
        assert_eq!(queued_form(&m, &conn, &named_short).await.unwrap(), long);
    }
}
