//! messagepickup 1.0 (batch-pickup -> batch, noop) and 2.0 (status-request, delivery-request,
//! messages-received, live-delivery-change), mediator side, over any transport.
//!
//! 2.0 deliveries are leased to the transport's owner and deleted only on messages-received;
//! 1.0 batches have no acknowledgement: they are only handed out on the request's own transport
//! (return route), and deleted once the transport has written them there
//! ([`Outcome::ack_on_return`]).

use super::v2::raw;
use super::{now_ms, problem, rfc3339_ms, AckOnReturn, HandleError, Inbound, Mediator, Outcome, TransportKind};
use crate::didcomm::message::{self, ReturnRoute};
use crate::store::{Connection, MediationState, QueuedMessage};
use serde_json::{json, Value};

/// Most messages one delivery or batch carries, whatever the client asks for.
pub const MAX_BATCH: usize = 100;

pub async fn handle(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?.clone();
    if conn.mediation != MediationState::Granted {
        return Ok(problem::report(
            ctx,
            "request_not_accepted",
            "pickup needs mediation: this connection has none granted",
        ));
    }
    let t = ctx.mtype.as_ref().expect("dispatch matched a message type");
    let major = t.version.split('.').next().unwrap_or("");
    match (major, t.name.as_str()) {
        ("1", "batch-pickup") => batch_pickup(m, ctx, &conn).await,
        ("1", "noop") | ("2", "noop") => Ok(Outcome::default()),
        ("2", "status-request") => Ok(Outcome {
            replies: vec![status(m, ctx, &conn, None).await?],
            ..Outcome::default()
        }),
        ("2", "delivery-request") => delivery_request(m, ctx, &conn).await,
        ("2", "messages-received") => messages_received(m, ctx, &conn).await,
        ("2", "live-delivery-change") => live_delivery_change(m, ctx, &conn).await,
        _ => problem::unknown_type(m, ctx),
    }
}

/// The `recipient_key` a status-request or delivery-request names (base58 or did:key), as the
/// queue stores keys (base58).
fn recipient_filter(ctx: &Inbound) -> Result<Option<String>, HandleError> {
    match ctx.msg.get("recipient_key") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(k)) => crate::didcomm::keys::normalize_verkey(k)
            .map(Some)
            .map_err(|e| HandleError::BadMessage(format!("recipient_key {:?}: {e}", message::clip(k, 80)))),
        Some(_) => Err(HandleError::BadMessage("recipient_key is not a string".into())),
    }
}

/// A pickup 2.0 `status` for `conn` (for the `recipient_key` it names, if any).
pub async fn status(m: &Mediator, ctx: &Inbound, conn: &Connection, live: Option<bool>) -> Result<Value, HandleError> {
    let filter = recipient_filter(ctx)?;
    let stats = m.store.pending_stats(&conn.id, filter.as_deref(), now_ms()).await?;
    let mut s = ctx.reply("status");
    s["message_count"] = json!(stats.count);
    if let Some(o) = stats.oldest_received_ms {
        s["oldest_received_time"] = json!(rfc3339_ms(o));
    }
    if let Some(l) = live {
        s["live_delivery"] = json!(l);
    }
    if let Some(k) = ctx.msg["recipient_key"].as_str() {
        s["recipient_key"] = json!(k);
    }
    Ok(s)
}

/// The pickup 2.0 `delivery` message for leased queue entries; attachment ids are queue ids.
pub fn delivery_message(prefix_of: &Inbound, msgs: &[QueuedMessage]) -> Value {
    let mut d = prefix_of.reply("delivery");
    d["~attach"] = Value::Array(msgs.iter().map(attachment).collect());
    d
}

/// A standalone `delivery` (live mode pushes, no inbound message to answer).
pub fn live_delivery(legacy: bool, msgs: &[QueuedMessage]) -> Value {
    let prefix = if legacy {
        crate::didcomm::message::LEGACY_PREFIX
    } else {
        crate::didcomm::message::DIDCOMM_PREFIX
    };
    json!({
        "@type": format!("{prefix}messagepickup/2.0/delivery"),
        "@id": crate::didcomm::message::new_id(),
        "~attach": msgs.iter().map(attachment).collect::<Vec<_>>(),
    })
}

/// A queue id as it appears in attachments and `message_id_list`: zero-padded to 12 digits,
/// since Credo validates batch ids against `[-_./a-zA-Z0-9]{8,64}`.
pub fn external_id(id: i64) -> String {
    format!("{id:012}")
}

fn attachment(q: &QueuedMessage) -> Value {
    json!({ "@id": external_id(q.id), "lastmod_time": rfc3339_ms(q.received_at_ms), "data": attachment_data(&q.payload) })
}

/// Leases the messages the request asks for (`field`: its count) to the transport's owner.
async fn lease_requested(
    m: &Mediator,
    ctx: &Inbound,
    conn: &Connection,
    field: &str,
) -> Result<Vec<QueuedMessage>, HandleError> {
    let filter = recipient_filter(ctx)?;
    lease_batch(m, conn, ctx.msg[field].as_u64(), filter.as_deref(), &ctx.lease_owner).await
}

async fn delivery_request(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    // Without a return route the delivery would be POSTed to the connection's endpoint; a
    // wallet has none, so it would go nowhere while its messages, leased, looked gone from the
    // queue for `delivery.lease_ms`. Refused as batch-pickup refuses it: nothing leased. So
    // too for a connection whose DID document lists routing keys: its endpoint is its own
    // mediator's, the delivery would be wrapped for each (a third larger at each wrap: up to
    // ~10x `delivery_max_bytes` per request for eight) and queued there again, not picked up.
    if ctx.return_route == ReturnRoute::None && (conn.http_endpoint().is_none() || !conn.their_routing_keys.is_empty())
    {
        return Ok(problem::report(
            ctx,
            "delivery_not_possible",
            "delivery-request needs ~transport.return_route from a connection without an HTTP endpoint, or one reached through mediators (routing keys): its delivery could not reach the wallet",
        ));
    }
    let msgs = lease_requested(m, ctx, conn, "limit").await?;
    if msgs.is_empty() {
        return Ok(Outcome {
            replies: vec![status(m, ctx, conn, None).await?],
            ..Outcome::default()
        });
    }
    Ok(Outcome {
        replies: vec![delivery_message(ctx, &msgs)],
        leased: msgs.iter().map(|q| q.id).collect(),
        ..Outcome::default()
    })
}

async fn messages_received(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let acked = ack_received(m, conn, &ctx.msg["message_id_list"]).await?;
    Ok(Outcome {
        replies: vec![status(m, ctx, conn, None).await?],
        ..acked
    })
}

async fn live_delivery_change(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    let Some(live) = ctx.msg["live_delivery"].as_bool() else {
        return Ok(problem::report(
            ctx,
            "invalid_message",
            "live-delivery-change needs a boolean live_delivery",
        ));
    };
    // `thread` would bring back this thread's replies only: the socket would not deliver.
    if ctx.transport != TransportKind::WebSocket || ctx.return_route != ReturnRoute::All {
        return Ok(problem::report(
            ctx,
            "delivery_not_possible",
            "live delivery needs a WebSocket session with return_route all",
        ));
    }
    Ok(Outcome {
        replies: vec![status(m, ctx, conn, Some(live)).await?],
        live_mode: Some(live),
        ..Outcome::default()
    })
}

async fn batch_pickup(m: &Mediator, ctx: &Inbound, conn: &Connection) -> Result<Outcome, HandleError> {
    // pickup 1.0 has no acknowledgement: a batch sent anywhere but back on this transport (to
    // an endpoint that may fail, or to none: wallets have none) would be lost. Nothing leased.
    if ctx.return_route == ReturnRoute::None {
        return Ok(problem::report(
            ctx,
            "delivery_not_possible",
            "batch-pickup needs ~transport.return_route: a batch (never acknowledged) is only handed back on the transport that asked for it",
        ));
    }
    let msgs = lease_requested(m, ctx, conn, "batch_size").await?;
    let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
    let mut batch = ctx.reply("batch");
    batch["messages~attach"] = Value::Array(
        msgs.iter()
            .map(|q| {
                // Not JSON a parser reads (queued before forwards were checked strictly):
                // as text, as before.
                let message = payload_json(&q.payload)
                    .unwrap_or_else(|| Value::String(String::from_utf8_lossy(&q.payload).into_owned()));
                // RFC 0212 names the id `@id`; Credo reads (and validates) `id`: write both.
                json!({ "@id": external_id(q.id), "id": external_id(q.id), "message": message })
            })
            .collect(),
    );
    // Leased, not removed: the transport removes them once the batch is written back.
    Ok(Outcome {
        replies: vec![batch],
        ack_on_return: (!ids.is_empty()).then(|| AckOnReturn {
            conn: conn.id.clone(),
            ids,
        }),
        ..Outcome::default()
    })
}

// ---------------------------------------------------------------------------------------------
// The queue side of pickup, shared by 2.0 (here) and 3.0 (`v2::pickup`): the versions differ
// only in the shapes of their messages, not in what they do to the queue.
// ---------------------------------------------------------------------------------------------

/// Most JSON values of a queued payload embedded in a v1 delivery as a tree: a v1 JWE holds 5,
/// and what is queued is a JWE. A payload read into a tree costs 16-32 times its bytes, and
/// anyone can queue one (an anonymous forward): past this it is embedded as the text it is
/// ([`raw`], written in place when the reply is packed), never as a tree. Up to it, as a tree:
/// what every v1 delivery wrote before, byte for byte (members sorted, no spaces).
pub const MAX_PAYLOAD_VALUES: usize = 1024;

/// A queued payload as JSON to embed in a v1 delivery, if it is JSON a parser reads: a tree
/// of at most [`MAX_PAYLOAD_VALUES`] values, else its text as it is ([`raw::json`]). A 1.0
/// batch's `message` and a 2.0 attachment's `data.json` stay JSON past that size: Credo
/// validates `message` as an object and refuses a whole batch over one string, and a batch
/// is removed once written back, so its other messages were lost with it.
fn payload_json(payload: &[u8]) -> Option<Value> {
    use crate::didcomm::v2::json::{strict, value_within, within_depth};
    // One read per payload on every delivery: a small one as a tree (a real parse), its depth
    // then checked on the tree (a tree of few values may still nest too deep for the wallet's
    // parser once the delivery wraps it); a larger one strictly, without a tree.
    match value_within(payload, MAX_PAYLOAD_VALUES) {
        Some(tree) => within_depth(&tree).then_some(tree),
        None => strict(payload).ok().map(raw::json),
    }
}

/// A queued payload as a v1 attachment's `data`: `json` when it is JSON a parser reads
/// ([`payload_json`]), else unpadded base64url (not JSON, or queued before forwards were
/// checked strictly: [`crate::didcomm::v2::json::strict`]).
pub(crate) fn attachment_data(payload: &[u8]) -> Value {
    match payload_json(payload) {
        Some(v) => json!({ "json": v }),
        None => json!({ "base64": crate::didcomm::b64::encode(payload) }),
    }
}

/// Leases up to `limit` messages (the client's number, else the configured batch size;
/// capped at [`MAX_BATCH`]), and at most [`Mediator::delivery_max_bytes`] of them (at least
/// one), to the transport's owner; with a filter only that recipient's
/// messages are leased: the others are neither touched nor counted as attempts.
pub(crate) async fn lease_batch(
    m: &Mediator,
    conn: &Connection,
    limit: Option<u64>,
    filter: Option<&str>,
    owner: &str,
) -> Result<Vec<QueuedMessage>, HandleError> {
    let n = limit.unwrap_or(m.batch_size as u64).clamp(1, MAX_BATCH as u64) as usize;
    let now = now_ms();
    let until = now.saturating_add(m.lease_ms);
    Ok(match filter {
        Some(k) => {
            m.store
                .lease_for_key_upto(&conn.id, k, n, m.delivery_max_bytes, owner, now, until)
                .await?
        }
        None => {
            m.store
                .lease_upto(&conn.id, n, m.delivery_max_bytes, owner, now, until)
                .await?
        }
    })
}

/// The queue ids of a `message_id_list` (strings or numbers; others ignored), the first
/// 10 x [`MAX_BATCH`] of them, each once: on sled every id acknowledged reads its message's
/// head from disk and logs a record, and a list naming one leased id a thousand times cost a
/// thousand of each.
fn received_ids(message_id_list: &Value) -> Vec<i64> {
    let mut ids: Vec<i64> = message_id_list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_i64()))
        .take(10 * MAX_BATCH)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// messages-received: deletes the messages of `message_id_list` (queue ids as strings or
/// numbers, at most 10 x [`MAX_BATCH`]) leased on `conn`. Returns the [`Outcome`] fields it
/// fills: how many were acknowledged, and each one's delivery -> acknowledgement lag.
pub(crate) async fn ack_received(
    m: &Mediator,
    conn: &Connection,
    message_id_list: &Value,
) -> Result<Outcome, HandleError> {
    let ids = received_ids(message_id_list);
    let leases = if ids.is_empty() {
        Vec::new()
    } else {
        m.store.ack_leased(&conn.id, &ids).await?
    };
    // Delivered when leased: lease deadline minus the lease length.
    let now = now_ms();
    let ack_lags_ms = leases
        .iter()
        .filter(|l| **l > 0)
        .map(|l| now.saturating_sub(l.saturating_sub(m.lease_ms)).max(0))
        .collect();
    Ok(Outcome {
        acked: leases.len() as u64,
        ack_lags_ms,
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::NewMessage;

    use crate::protocols::mediator_for_test as mediator;

    /// An id named again and again is acknowledged once; strings and numbers name the same id;
    /// what is neither is ignored.
    #[test]
    fn received_ids_name_each_message_once() {
        let many: Vec<Value> = (0..1000).map(|_| json!("7")).collect();
        assert_eq!(received_ids(&json!(many)), vec![7]);
        assert_eq!(received_ids(&json!(["3", 1, 3, "x", null, 2, "1"])), vec![1, 2, 3]);
        assert_eq!(received_ids(&json!("7")), Vec::<i64>::new());
    }

    async fn queue(m: &Mediator, conn: &Connection, n: usize) {
        let msgs = (0..n)
            .map(|i| NewMessage {
                connection: conn.id.clone(),
                recipient_key: "rk".into(),
                payload: format!("{{\"n\":{i}}}").into_bytes(),
                received_at_ms: now_ms(),
                dedup_key: None,
                expires_at_ms: None,
                lease: None,
            })
            .collect();
        for r in m
            .store
            .enqueue(msgs, &crate::store::EnqueueLimits::UNLIMITED)
            .await
            .unwrap()
        {
            r.unwrap();
        }
    }

    fn inbound(name: &str, route: ReturnRoute, transport: TransportKind, conn: &Connection) -> Inbound {
        let msg =
            json!({"@type": format!("https://didcomm.org/messagepickup/{name}"), "@id": "i", "live_delivery": true});
        let mut ctx = Inbound::for_test(msg, Some("theirs"), Some(conn));
        ctx.return_route = route;
        ctx.transport = transport;
        ctx
    }

    fn is_problem(out: &Outcome) -> bool {
        out.replies.len() == 1 && out.replies[0]["@type"].as_str().unwrap().ends_with("/problem-report")
    }

    /// A JWE object as a sender wrote it: not in serde_json's key order, with spaces.
    const JWE: &str = r#"{ "protected": "p", "iv": "i", "ciphertext": "c", "tag": "t" }"#;

    /// A JWE-shaped payload holding 2,000 JSON values: more than is ever read into a tree.
    fn many_values() -> String {
        format!(r#"{{"ciphertext": "c", "a": [{}0]}}"#, "0,".repeat(1997))
    }

    /// Text of JSON's grammar that parsers refuse, as forwards queued before they were checked
    /// strictly may hold (one past the tree's size, too).
    fn unreadable() -> Vec<String> {
        vec![
            r#"{"ciphertext": "c", "n": 1e400}"#.into(),
            format!(r#"{{"ciphertext": "\ud800", "a": [{}0]}}"#, "0,".repeat(1997)),
        ]
    }

    /// A queued payload alone in `n` messages with ids 1, 2, ...: `payloads` in order.
    async fn queue_payloads(m: &Mediator, conn: &Connection, payloads: &[&str]) {
        let msgs = payloads
            .iter()
            .map(|p| NewMessage {
                connection: conn.id.clone(),
                recipient_key: "rk".into(),
                payload: p.as_bytes().to_vec(),
                received_at_ms: now_ms(),
                dedup_key: None,
                expires_at_ms: None,
                lease: None,
            })
            .collect();
        let limits = crate::store::EnqueueLimits::UNLIMITED;
        for r in m.store.enqueue(msgs, &limits).await.unwrap() {
            r.unwrap();
        }
    }

    /// `reply` as its wallet reads it: packed for it by [`Mediator::pack_for`], opened.
    fn as_delivered(m: &Mediator, c: &Connection, reply: &Value) -> Value {
        let wallet = crate::didcomm::keys::KeyPair::generate();
        let mut conn = c.clone();
        conn.their_verkeys = vec![wallet.verkey()];
        let packed = m.pack_for(&conn, reply).unwrap();
        let opened =
            crate::didcomm::envelope::unpack(&packed, &|k| (k == wallet.verkey()).then(|| wallet.clone())).unwrap();
        serde_json::from_slice(&opened.plaintext).expect("the wallet parses what it gets")
    }

    /// A queued JWE goes as `data.json`, a tree as it always went (same bytes); one of more
    /// JSON values than a JWE ever holds (queued by anyone with an anonymous forward) as its
    /// own text, never read into a tree; what is not JSON a parser reads as base64.
    #[test]
    fn a_payload_is_embedded_as_json_a_tree_only_when_small() {
        let tree = serde_json::from_str::<Value>(JWE).unwrap();
        assert_eq!(attachment_data(JWE.as_bytes()), json!({ "json": tree }));
        let reply = json!({ "~attach": [{ "data": attachment_data(JWE.as_bytes()) }] });
        assert_eq!(raw::to_vec(&reply, 0).unwrap(), serde_json::to_vec(&reply).unwrap());

        let many = many_values();
        let reply = json!({ "~attach": [{ "data": attachment_data(many.as_bytes()) }] });
        let out = String::from_utf8(raw::to_vec(&reply, 0).unwrap()).unwrap();
        assert_eq!(out, format!(r#"{{"~attach":[{{"data":{{"json":{many}}}}}]}}"#));

        for p in unreadable().iter().map(String::as_bytes).chain([&b"not json"[..]]) {
            assert_eq!(attachment_data(p), json!({ "base64": crate::didcomm::b64::encode(p) }));
        }
    }

    /// Credo 0.6.3 validates each `message` of a batch as an object: one string refused the
    /// whole batch, and a batch is removed once written back, so the others were lost.
    #[tokio::test]
    async fn every_message_of_a_batch_is_an_object_however_many_values_it_holds() {
        let (m, c) = mediator().await;
        let many = many_values();
        queue_payloads(&m, &c, &[&many, JWE]).await;
        let ctx = inbound("1.0/batch-pickup", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        let batch = as_delivered(&m, &c, &out.replies[0]);
        let got = batch["messages~attach"].as_array().unwrap();
        assert_eq!(got.len(), 2, "{batch}");
        assert!(got.iter().all(|a| a["message"].is_object()), "{batch}");
        assert_eq!(got[0]["message"], serde_json::from_str::<Value>(&many).unwrap());
        assert_eq!(got[1]["message"], serde_json::from_str::<Value>(JWE).unwrap());
    }

    #[tokio::test]
    async fn a_delivery_embeds_a_payload_of_many_values_as_json() {
        let (m, c) = mediator().await;
        let many = many_values();
        queue_payloads(&m, &c, &[&many, JWE]).await;
        let ctx = inbound("2.0/delivery-request", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        let delivery = as_delivered(&m, &c, &out.replies[0]);
        let got = delivery["~attach"].as_array().unwrap();
        assert_eq!(got.len(), 2, "{delivery}");
        assert_eq!(got[0]["data"]["json"], serde_json::from_str::<Value>(&many).unwrap());
        assert_eq!(got[1]["data"]["json"], serde_json::from_str::<Value>(JWE).unwrap());
    }

    /// Queued before forwards were checked strictly: delivered as base64 (2.0) or as the text
    /// a batch always carried it as (1.0), in a reply the wallet still parses.
    #[tokio::test]
    async fn a_payload_a_parser_refuses_is_never_written_as_json() {
        let (m, c) = mediator().await;
        let bad = unreadable();
        queue_payloads(&m, &c, &[&bad[0], &bad[1], JWE]).await;
        let ctx = inbound("2.0/delivery-request", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        let delivery = as_delivered(&m, &c, &out.replies[0]);
        for (i, p) in bad.iter().enumerate() {
            let b64 = delivery["~attach"][i]["data"]["base64"].as_str().unwrap();
            assert_eq!(crate::didcomm::b64::decode(b64).unwrap(), p.as_bytes());
        }
        assert_eq!(m.store.release_owner("n1/http").await.unwrap(), 3);
        let ctx = inbound("1.0/batch-pickup", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        let batch = as_delivered(&m, &c, &out.replies[0]);
        for (i, p) in bad.iter().enumerate() {
            assert_eq!(batch["messages~attach"][i]["message"], json!(p));
        }
        assert!(batch["messages~attach"][2]["message"].is_object());
    }

    #[tokio::test]
    async fn live_mode_needs_return_route_all() {
        let (m, c) = mediator().await;
        for route in [ReturnRoute::None, ReturnRoute::Thread("i".into())] {
            let ctx = inbound("2.0/live-delivery-change", route, TransportKind::WebSocket, &c);
            let out = handle(&m, &ctx).await.unwrap();
            assert!(is_problem(&out) && out.live_mode.is_none(), "{:?}", out.replies);
        }
        let ctx = inbound(
            "2.0/live-delivery-change",
            ReturnRoute::All,
            TransportKind::WebSocket,
            &c,
        );
        assert_eq!(handle(&m, &ctx).await.unwrap().live_mode, Some(true));
    }

    #[tokio::test]
    async fn a_batch_is_leased_for_its_return_route_never_removed_here() {
        let (m, c) = mediator().await;
        queue(&m, &c, 2).await;
        let stats = |m: &Mediator| {
            let store = m.store.clone();
            async move { store.queue_stats("c1", now_ms()).await.unwrap() }
        };
        // No return route: refused, nothing leased.
        let ctx = inbound("1.0/batch-pickup", ReturnRoute::None, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        assert!(is_problem(&out) && out.ack_on_return.is_none(), "{:?}", out.replies);
        assert_eq!((stats(&m).await.pending, stats(&m).await.leased), (2, 0));
        // With one: the batch, its messages leased to the transport's owner until written.
        let ctx = inbound("1.0/batch-pickup", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        assert_eq!(out.replies[0]["messages~attach"].as_array().unwrap().len(), 2);
        let back = out.ack_on_return.expect("ids to remove once returned");
        assert_eq!((back.conn.as_str(), back.ids.len()), ("c1", 2));
        assert_eq!((stats(&m).await.pending, stats(&m).await.leased), (0, 2));
        assert_eq!(m.store.release_owner("n1/http").await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_delivery_request_with_nowhere_to_send_its_delivery_leases_nothing() {
        let (m, c) = mediator().await;
        queue(&m, &c, 2).await;
        let leased = |m: &Mediator| {
            let store = m.store.clone();
            async move { store.queue_stats("c1", now_ms()).await.unwrap().leased }
        };
        // No return route and no endpoint (a wallet): refused, nothing leased.
        let ctx = inbound("2.0/delivery-request", ReturnRoute::None, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        assert!(is_problem(&out) && out.leased.is_empty(), "{:?}", out.replies);
        assert_eq!(leased(&m).await, 0);
        // An agent with an HTTP endpoint gets its delivery POSTed there: leased until
        // messages-received, as over a return route.
        let mut agent = c.clone();
        agent.their_endpoints = vec!["didcomm:transport/queue".into(), "https://agent.example/didcomm".into()];
        let ctx = inbound("2.0/delivery-request", ReturnRoute::None, TransportKind::Http, &agent);
        let out = handle(&m, &ctx).await.unwrap();
        assert_eq!((out.leased.len(), leased(&m).await), (2, 2), "{:?}", out.replies);
        assert_eq!(m.store.release_owner("n1/http").await.unwrap(), 2);
        // The same agent reached through mediators (routing keys): its endpoint is its own
        // mediator's, where a delivery wrapped for each is queued again: refused, nothing leased.
        let mut behind = agent.clone();
        behind.their_routing_keys = vec![crate::didcomm::keys::KeyPair::generate().verkey()];
        let ctx = inbound("2.0/delivery-request", ReturnRoute::None, TransportKind::Http, &behind);
        let out = handle(&m, &ctx).await.unwrap();
        assert!(is_problem(&out) && out.leased.is_empty(), "{:?}", out.replies);
        assert_eq!(leased(&m).await, 0);
        // A return route: leased for it.
        let ctx = inbound("2.0/delivery-request", ReturnRoute::All, TransportKind::Http, &c);
        let out = handle(&m, &ctx).await.unwrap();
        assert_eq!(out.leased.len(), 2, "{:?}", out.replies);
    }
}
