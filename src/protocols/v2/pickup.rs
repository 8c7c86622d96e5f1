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
    status_of(m, ctx, conn, filter, live).await
}

/// A status of `conn`'s queue, narrowed to `filter` ([`recipient_filter`]).
async fn status_of(
    m: &Mediator,
    ctx: &Inbound,
    conn: &Connection,
    filter: Option<String>,
    live: Option<bool>,
) -> Result<Value, HandleError> {
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

/// Deletes the messages acknowledged, answered with a status. What the status needs of the
/// message (its `recipient_did`) is read first: a refusal deletes nothing. Once the messages
/// are deleted the answer says so (`acked`: a socket's window frees them), whatever the
/// status: one the store cannot give now is not made a refusal of what was done, and the
/// wallet (waiting for an answer) gets a problem report saying so in its place.
async fn messages_received(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let filter = recipient_filter(m, ctx, conn).await?;
    let acked = ack_received(m, conn, &ctx.msg["body"]["message_id_list"]).await?;
    let replies = match status_of(m, ctx, conn, filter, None).await {
        Ok(s) => vec![s],
        Err(e) => {
            tracing::warn!(
                connection = %conn.id,
                acked = acked.acked,
                "v2 messages-received acknowledged, its status not read: {e}"
            );
            let comment = format!(
                "{} message(s) acknowledged; the queue's status could not be read",
                acked.acked
            );
            vec![super::problem_report(
                m,
                ctx,
                conn.their_did.as_deref(),
                "e.p.me.res.unavailable",
                &comment,
            )]
        }
    };
    Ok(Outcome { replies, ..acked })
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
    use crate::store::{NewMessage, Store, StoreError, StoreResult};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A messages-received 3.0 of `conn`'s wallet with `body`.
    fn received_of(conn: &Connection, body: Value) -> Inbound {
        let type_str = "https://didcomm.org/messagepickup/3.0/messages-received";
        let msg = json!({ "id": "r-1", "type": type_str, "body": body });
        Inbound {
            plaintext: serde_json::to_vec(&msg).unwrap(),
            msg,
            type_str: type_str.into(),
            family: "messagepickup".into(),
            version: "3.0".into(),
            name: "messages-received".into(),
            sender: Some("did:example:wallet".into()),
            conn: Some(conn.clone()),
            dialect: None,
            transport: TransportKind::WebSocket,
            lease_owner: "n1/test".into(),
        }
    }

    /// One message queued for `conn` and delivered (leased): its external id.
    async fn delivered_one(m: &Mediator, conn: &Connection) -> String {
        let msg = NewMessage {
            connection: conn.id.clone(),
            recipient_key: "did:example:r".into(),
            payload: b"{}".to_vec(),
            received_at_ms: now_ms(),
            dedup_key: None,
            expires_at_ms: None,
            lease: None,
        };
        let limits = crate::store::EnqueueLimits::UNLIMITED;
        for r in m.store.enqueue(vec![msg], &limits).await.unwrap() {
            r.unwrap();
        }
        let leased = lease_batch(m, conn, None, None, "n1/test").await.unwrap();
        assert_eq!(leased.len(), 1);
        external_id(leased[0].id)
    }

    /// A messages-received whose `recipient_did` is refused deletes nothing: the wallet's
    /// corrected acknowledgement still finds its messages.
    #[actix_rt::test]
    async fn a_refused_messages_received_deletes_nothing() {
        let (m, conn) = mediator_for_test().await;
        let id = delivered_one(&m, &conn).await;
        let bad = received_of(&conn, json!({ "message_id_list": [id], "recipient_did": "x" }));
        match handle(&m, &bad).await {
            Err(HandleError::BadMessage(why)) => assert!(why.contains("not a DID"), "{why}"),
            other => panic!("{:?}", other.map(|o| o.acked)),
        }
        let out = handle(&m, &received_of(&conn, json!({ "message_id_list": [id] })))
            .await
            .unwrap();
        assert_eq!(out.acked, 1, "the message was still there to acknowledge");
        assert_eq!(out.replies[0]["body"]["message_count"], 0);
    }

    /// A sled store whose `pending_stats` fails while `down` is set.
    struct StatsDown {
        inner: Arc<dyn Store>,
        down: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for StatsDown {
        async fn pending_stats(
            &self,
            conn: &str,
            recipient_key: Option<&str>,
            now_ms: i64,
        ) -> StoreResult<crate::store::PendingStats> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("the test took it away".into()));
            }
            self.inner.pending_stats(conn, recipient_key, now_ms).await
        }
        crate::store_pass_through!(inner:
            backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
            use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
            list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease,
            lease_upto, ack_leased, release, release_owner, release_owners_under, reclaim_expired_leases,
            total_queued, connections_with_pending, pending_among, queue_stats, prune_dedup,
            dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, expire,
            expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token, push_event,
            push_take_due, push_done, first_sight, forget_sight, prune_sights,
            delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
        );
    }

    /// Messages acknowledged are answered as acknowledged (a socket's window frees them) when
    /// the status after it cannot be read: a problem report saying so answers in its place.
    #[actix_rt::test]
    async fn an_acknowledgement_whose_status_fails_is_still_an_acknowledgement() {
        let (m0, conn) = mediator_for_test().await;
        let store = Arc::new(StatsDown {
            inner: m0.store.clone(),
            down: AtomicBool::new(false),
        });
        let cfg = crate::config::Config::single_node_default();
        let m = Mediator::new(store.clone(), m0.keys.clone(), &cfg, "n1", "http://127.0.0.1:1");
        let id = delivered_one(&m, &conn).await;
        store.down.store(true, Ordering::SeqCst);
        let out = handle(&m, &received_of(&conn, json!({ "message_id_list": [id] })))
            .await
            .unwrap();
        assert_eq!(out.acked, 1);
        assert_eq!(out.replies.len(), 1, "the wallet is answered: {:?}", out.replies);
        assert_eq!(
            out.replies[0]["body"]["code"], "e.p.me.res.unavailable",
            "{}",
            out.replies[0]
        );
        store.down.store(false, Ordering::SeqCst);
        let out = handle(&m, &received_of(&conn, json!({ "message_id_list": [id] })))
            .await
            .unwrap();
        assert_eq!((out.acked, &out.replies[0]["body"]["message_count"]), (0, &json!(0)));
    }

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
