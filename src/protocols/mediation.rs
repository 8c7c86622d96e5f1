//! coordinate-mediation 1.0, mediator side: mediate-request -> grant, keylist-update ->
//! keylist-update-response, keylist-query -> keylist.
//!
//! A key another connection already holds is refused (`client_error`): Credo's and ACA-Py's
//! mediators accept it and then drop every forward to it while the sender gets 200. So is one
//! a DIDComm v2 connection holds as a did:key (in any of its forms). An update naming one key
//! twice (in any form) is refused whole: the store applies its adds before its removes.

use super::v2::routing::held_as_did_key;
use super::{problem, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::keys::normalize_verkey;
use crate::store::{ConnectionPatch, KeyUpdate, MediationState};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;

/// Keys a single keylist-update may carry.
pub const MAX_UPDATES: usize = 1000;
/// Keys of one keylist-update looked up at once for whether another connection holds them as
/// a did:key ([`held_as_did_key`]).
const HELD_LOOKUPS_AT_ONCE: usize = 4;
/// Keys over the limit an update may be and still have its adds looked up: a few of them may be
/// held by another connection (refused on their own, not counted); past that many over, it is
/// refused without a lookup.
const LIMIT_RECHECK_MAX: usize = 8;

/// The number of keys `conn` would hold after `add` and `remove`, when that passes
/// `limits.max_keys_per_connection` and grows the list (a list already over a lowered limit may
/// still shrink or swap keys). A key another connection holds counts as added: the estimate
/// errs towards refusing. Not atomic with the update: concurrent updates of one connection
/// may pass the limit by at most one message's updates each.
pub async fn keys_over_limit(
    m: &Mediator,
    conn: &str,
    add: &[String],
    remove: &[String],
) -> Result<Option<usize>, HandleError> {
    if add.is_empty() {
        return Ok(None);
    }
    let current: HashSet<String> = m.store.keys_of(conn).await?.into_iter().collect();
    Ok(over_limit_from(&current, add, remove, m.max_keys_per_connection))
}

/// [`keys_over_limit`] of a connection holding `current`.
fn over_limit_from(current: &HashSet<String>, add: &[String], remove: &[String], max: usize) -> Option<usize> {
    let mut after: HashSet<&String> = current.iter().collect();
    for k in remove {
        after.remove(k);
    }
    after.extend(add);
    (after.len() > max && after.len() > current.len()).then_some(after.len())
}

/// Why a keylist update was refused for the limit, for the problem report and the log.
pub fn over_limit_reason(would_hold: usize, max: usize) -> String {
    format!(
        "keylist update refused, nothing applied: it would give this connection {would_hold} keys, over \
         limits.max_keys_per_connection = {max} (remove keys, or add fewer)"
    )
}

pub async fn mediate_request(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?;
    let conn = if matches!(conn.mediation, MediationState::Granted | MediationState::Denied) {
        // Read again (a wallet asks once per start): a connection the operator deleted or
        // revoked while this was handled gets no grant.
        m.store
            .get_connection(&conn.id)
            .await?
            .ok_or(HandleError::NoConnection)?
    } else {
        let patch = ConnectionPatch {
            mediation: Some(MediationState::Granted),
            updated_at_ms: super::now_ms(),
            ..ConnectionPatch::default()
        };
        // The stored state after the patch: a revocation that landed meanwhile stands.
        m.store
            .update_connection(&conn.id, &patch)
            .await?
            .ok_or(HandleError::NoConnection)?
    };
    if conn.mediation == MediationState::Denied {
        // Revoked by the operator (admin `POST /connections/{id}/mediation`): it stays so.
        tracing::info!(connection = %conn.id, "mediate-request of a connection whose mediation was revoked: denied");
        return Ok(Outcome {
            replies: vec![ctx.reply("mediate-deny")],
            connection: Some(conn),
            ..Outcome::default()
        });
    }
    if ctx.conn.as_ref().map(|c| c.mediation) != Some(MediationState::Granted) {
        tracing::info!(connection = %conn.id, "mediation granted");
    }
    let mut grant = ctx.reply("mediate-grant");
    grant["endpoint"] = json!(m.public_url);
    grant["routing_keys"] = json!([m.keys.routing.did_key()]);
    Ok(Outcome {
        replies: vec![grant],
        connection: Some(conn),
        ..Outcome::default()
    })
}

/// The refusal to send when the connection has no mediation, if it has none.
fn refuse_without_mediation(ctx: &Inbound) -> Option<Outcome> {
    match &ctx.conn {
        Some(c) if c.mediation == MediationState::Granted => None,
        _ => Some(problem::report(
            ctx,
            "request_not_accepted",
            "this connection has no mediation granted: send mediate-request first",
        )),
    }
}

pub async fn keylist_update(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?;
    if let Some(refusal) = refuse_without_mediation(ctx) {
        return Ok(refusal);
    }
    let Some(updates) = ctx.msg["updates"].as_array() else {
        return Ok(problem::report(
            ctx,
            "invalid_message",
            "keylist-update needs an `updates` array",
        ));
    };
    if updates.len() > MAX_UPDATES {
        return Ok(problem::report(
            ctx,
            "invalid_message",
            "too many updates in one keylist-update",
        ));
    }
    // (original form as sent, normalized, action)
    let mut items: Vec<(String, Result<String, String>, String)> = Vec::new();
    for u in updates {
        let raw = u["recipient_key"].as_str().unwrap_or_default().to_string();
        let action = u["action"].as_str().unwrap_or_default().to_string();
        let norm = normalize_verkey(&raw).map_err(|e| e.to_string());
        items.push((raw, norm, action));
    }
    // The store applies every add, then every remove: `[remove K, add K]` left K unregistered
    // while both were answered `no_change`, and the wallet believed K routed. An update naming
    // a key twice (in any form: a verkey and its did:key are one key) is refused whole.
    let mut named = HashSet::new();
    for (raw, n, a) in &items {
        if let (Ok(k), "add" | "remove") = (n, a.as_str()) {
            if !named.insert(k.as_str()) {
                let why = format!(
                    "keylist-update refused, nothing applied: it names the key {} more than once (an update applies \
                     its adds before its removes, not in order): send one update per key",
                    crate::didcomm::message::clip(raw, 80)
                );
                return Ok(problem::report(ctx, "invalid_message", &why));
            }
        }
    }
    let named_by = |action: &str| -> Vec<String> {
        items
            .iter()
            .filter(|(_, _, a)| a == action)
            .filter_map(|(_, n, _)| n.clone().ok())
            .collect()
    };
    let (adds, remove) = (named_by("add"), named_by("remove"));
    let current: HashSet<String> = if adds.is_empty() {
        HashSet::new()
    } else {
        m.store.keys_of(&conn.id).await?.into_iter().collect()
    };
    // A key another connection holds as a DIDComm v2 recipient DID (a did:key form of it) is
    // refused as one it holds in base58 (the store sees only the exact string). Looked up on
    // adds only, never on a forward; not for a key this connection holds already (its add
    // changes nothing). A key costs six lookups, which the route cache answers only for a held
    // key: a few keys are looked up at once, and only a few, so that one update does not take
    // the store's pool to itself.
    let held_elsewhere = || {
        futures_util::stream::iter(adds.iter().filter(|k| !current.contains(*k)))
            .map(|k| async move { Ok::<_, HandleError>(held_as_did_key(m, &conn.id, k).await?.map(|_| k)) })
            .buffer_unordered(HELD_LOOKUPS_AT_ONCE)
            .try_filter_map(|held| async move { Ok(held) })
            .try_collect::<HashSet<&String>>()
    };
    // The limit first, from the keys the connection holds (read once): an update well over it
    // looks nothing else up. One a few keys over is looked up first: the keys it names that
    // another connection holds are refused on their own, and do not count.
    let max = m.max_keys_per_connection;
    let held_as_did = match over_limit_from(&current, &adds, &remove, max) {
        None => held_elsewhere().await?,
        Some(would_hold) => {
            let held = if would_hold - max <= LIMIT_RECHECK_MAX {
                held_elsewhere().await?
            } else {
                HashSet::new()
            };
            let left: Vec<String> = adds.iter().filter(|k| !held.contains(k)).cloned().collect();
            match over_limit_from(&current, &left, &remove, max) {
                None => held,
                Some(would_hold) => {
                    // Refused whole: every update `server_error` (RFC 0211), then a report saying why.
                    let refused = |(raw, _, action): &(String, Result<String, String>, String)| json!({ "recipient_key": raw, "action": action, "result": "server_error" });
                    let updated: Vec<Value> = items.iter().map(refused).collect();
                    let mut reply = ctx.reply("keylist-update-response");
                    reply["updated"] = Value::Array(updated);
                    let why = over_limit_reason(would_hold, m.max_keys_per_connection);
                    let report = problem::report(ctx, "keylist_limit", &why);
                    let mut replies = vec![reply];
                    replies.extend(report.replies);
                    return Ok(Outcome {
                        replies,
                        ..Outcome::default()
                    });
                }
            }
        }
    };
    let add: Vec<String> = adds.iter().filter(|k| !held_as_did.contains(k)).cloned().collect();
    let results = m.store.update_keys(&conn.id, &add, &remove).await?;
    // Every add's result, then every remove's; each key is named once, so each entry finds its own.
    let (added, removed) = results.split_at(add.len().min(results.len()));
    let mut updated = Vec::new();
    for (raw, norm, action) in &items {
        let result = match (norm, action.as_str()) {
            (Err(_), _) => "client_error",
            (Ok(_), a) if a != "add" && a != "remove" => "client_error",
            (Ok(k), "add") if held_as_did.contains(k) => {
                tracing::warn!(connection = %conn.id, key = %k, "keylist-update refused: key held by another connection as a DID");
                "client_error"
            }
            (Ok(k), a) => {
                let own = if a == "add" { added } else { removed };
                match own.iter().find(|(rk, _)| rk == k).map(|(_, r)| r) {
                    Some(KeyUpdate::Added) | Some(KeyUpdate::Removed) => "success",
                    Some(KeyUpdate::AlreadyAdded) | Some(KeyUpdate::NotFound) => "no_change",
                    Some(KeyUpdate::Revoked) => {
                        tracing::info!(connection = %conn.id, key = %k, "keylist-update refused: mediation revoked meanwhile");
                        "client_error"
                    }
                    Some(KeyUpdate::HeldByOther) => {
                        tracing::warn!(connection = %conn.id, key = %k, "keylist-update refused: key held by another connection");
                        "client_error"
                    }
                    None => "server_error",
                }
            }
        };
        updated.push(json!({ "recipient_key": raw, "action": action, "result": result }));
    }
    let mut reply = ctx.reply("keylist-update-response");
    reply["updated"] = Value::Array(updated);
    Ok(Outcome {
        replies: vec![reply],
        ..Outcome::default()
    })
}

pub async fn keylist_query(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?;
    if let Some(refusal) = refuse_without_mediation(ctx) {
        return Ok(refusal);
    }
    let keys = m.store.keys_of(&conn.id).await?;
    let offset = ctx.msg["paginate"]["offset"].as_u64().unwrap_or(0) as usize;
    let limit = ctx.msg["paginate"]["limit"]
        .as_u64()
        .map(|l| l as usize)
        .unwrap_or(keys.len());
    let page: Vec<Value> = keys
        .iter()
        .skip(offset)
        .take(limit)
        .map(|k| {
            let did_key = crate::didcomm::keys::parse_verkey(k)
                .map(|b| crate::didcomm::keys::verkey_to_did_key(&b))
                .unwrap_or_else(|_| k.clone());
            json!({ "recipient_key": did_key })
        })
        .collect();
    let mut reply = ctx.reply("keylist");
    reply["pagination"] =
        json!({ "count": page.len(), "offset": offset, "remaining": keys.len().saturating_sub(offset + page.len()) });
    reply["keys"] = Value::Array(page);
    Ok(Outcome {
        replies: vec![reply],
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::{granted_connection_for_test, mediator_for_test};

    /// A keylist-update of `conn` adding `key`: its result.
    async fn add(m: &Mediator, conn: &crate::store::Connection, key: &str) -> String {
        let msg = json!({
            "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
            "@id": "u-1",
            "updates": [{ "recipient_key": key, "action": "add" }],
        });
        let ctx = Inbound::for_test(msg, Some("theirs"), Some(conn));
        let out = keylist_update(m, &ctx).await.unwrap();
        out.replies[0]["updated"][0]["result"].as_str().unwrap().to_string()
    }

    /// The replies to a keylist-update of `conn` carrying `updates` (action, key) in order.
    async fn keylist(m: &Mediator, conn: &crate::store::Connection, updates: &[(&str, String)]) -> Vec<Value> {
        let updates: Vec<Value> = updates
            .iter()
            .map(|(a, k)| json!({ "recipient_key": k, "action": a }))
            .collect();
        let msg = json!({
            "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
            "@id": "u-1",
            "updates": updates,
        });
        let ctx = Inbound::for_test(msg, Some("theirs"), Some(conn));
        keylist_update(m, &ctx).await.unwrap().replies
    }

    /// The `result`s of a keylist-update-response.
    fn results(reply: &Value) -> Vec<&str> {
        assert_eq!(crate::client::type_name(reply), "keylist-update-response", "{reply}");
        reply["updated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["result"].as_str().unwrap())
            .collect()
    }

    /// A store counting its `route` lookups.
    struct CountingRoutes {
        inner: std::sync::Arc<dyn crate::store::Store>,
        routes: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::store::Store for CountingRoutes {
        async fn route(&self, recipient_key: &str) -> crate::store::StoreResult<Option<crate::store::ConnId>> {
            self.routes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.route(recipient_key).await
        }
        crate::store_pass_through!(inner:
            backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
            use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
            list_connections, update_keys, keys_of, route_long_forms, enqueue, enqueue_routed, lease,
            lease_upto, ack_leased, release, release_owner, release_owners_under, reclaim_expired_leases,
            queue_stats, total_queued, connections_with_pending, pending_among, prune_dedup,
            dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
            expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token,
            push_event, push_take_due, push_done, first_sight, forget_sight, prune_sights,
            delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
        );
    }

    /// Whether another connection holds a key as a did:key costs six store lookups per key,
    /// none cached for a key nobody holds (a thousand-key update was 6,000 of them, one after
    /// the other). A key the connection holds already, in any form, is not looked up (its add
    /// changes nothing), and an update refused for `limits.max_keys_per_connection` looks up
    /// nothing: before, both paid the full cost.
    #[actix_rt::test]
    async fn held_keys_and_updates_over_the_limit_cost_no_lookups() {
        let counting = std::sync::Arc::new(CountingRoutes {
            inner: std::sync::Arc::new(crate::store::SledStore::temporary().await.unwrap()),
            routes: Default::default(),
        });
        let mut cfg = crate::config::Config::single_node_default();
        cfg.limits.max_keys_per_connection = 10;
        let m = Mediator::new(
            counting.clone(),
            crate::protocols::MediatorKeys::generate(),
            &cfg,
            "n1",
            "http://127.0.0.1:1",
        );
        let c1 = granted_connection_for_test("c1", "ours", "theirs");
        m.store.put_connection(&c1).await.unwrap();
        let lookups = || counting.routes.swap(0, std::sync::atomic::Ordering::SeqCst);
        let keys: Vec<KeyPair> = (0..8).map(|_| KeyPair::generate()).collect();
        let adds = |form: fn(&KeyPair) -> String| keys.iter().map(|k| ("add", form(k))).collect::<Vec<_>>();
        let r = keylist(&m, &c1, &adds(KeyPair::verkey)).await;
        assert_eq!(results(&r[0]), ["success"; 8]);
        assert!(lookups() > 0, "new keys are looked up");
        for form in [KeyPair::verkey, KeyPair::did_key] {
            let r = keylist(&m, &c1, &adds(form)).await;
            assert_eq!(results(&r[0]), ["no_change"; 8]);
            assert_eq!(lookups(), 0, "a re-add of the connection's own keys looks nothing up");
        }
        let far: Vec<(&str, String)> = (0..2 + LIMIT_RECHECK_MAX + 1)
            .map(|_| ("add", KeyPair::generate().verkey()))
            .collect();
        let r = keylist(&m, &c1, &far).await;
        assert_eq!(results(&r[0]), vec!["server_error"; far.len()]);
        assert_eq!(crate::client::type_name(&r[1]), "problem-report", "{}", r[1]);
        assert_eq!(lookups(), 0, "an update well over the limit looks nothing up");
        // A few over: looked up, and refused as no key it names is held elsewhere.
        let more: Vec<(&str, String)> = (0..3).map(|_| ("add", KeyPair::generate().verkey())).collect();
        let r = keylist(&m, &c1, &more).await;
        assert_eq!(results(&r[0]), ["server_error"; 3]);
        assert_eq!(m.store.keys_of(&c1.id).await.unwrap().len(), 8);
    }

    /// A key another connection holds as a DID is refused on its own and does not count
    /// towards the limit: an update one key under it with such a key and a new one adds the
    /// new one. (Checking the limit before the lookups refused both for a while.)
    #[actix_rt::test]
    async fn a_key_held_elsewhere_as_a_did_does_not_count_towards_the_limit() {
        let (m, c1) = mediator_for_test().await;
        let c2 = granted_connection_for_test("c2", "ours2", "theirs2");
        m.store.put_connection(&c2).await.unwrap();
        let max = m.max_keys_per_connection;
        let held: Vec<String> = (0..max - 1).map(|_| KeyPair::generate().verkey()).collect();
        m.store.update_keys(&c1.id, &held, &[]).await.unwrap();
        let theirs = KeyPair::generate();
        m.store.update_keys(&c2.id, &[theirs.did_key()], &[]).await.unwrap();
        let new = KeyPair::generate();
        let r = keylist(&m, &c1, &[("add", new.verkey()), ("add", theirs.verkey())]).await;
        assert_eq!(results(&r[0]), ["success", "client_error"], "{r:?}");
        assert_eq!(m.store.keys_of(&c1.id).await.unwrap().len(), max);
    }

    /// The store applies an update's adds before its removes, whatever their order:
    /// `[remove K, add K]` on a held K unregistered it while both entries were answered
    /// `no_change` (each was given the first result found for its key), so the wallet believed
    /// K routed and forwards to it were refused. An update naming a key twice, in any form, is
    /// refused whole with a reason; one naming each key once gets each entry's own result.
    #[actix_rt::test]
    async fn an_update_naming_a_key_twice_is_refused_whole() {
        let (m, c1) = mediator_for_test().await;
        let (k, k2, k3) = (KeyPair::generate(), KeyPair::generate(), KeyPair::generate());
        assert_eq!(add(&m, &c1, &k.verkey()).await, "success");
        for updates in [
            vec![("remove", k.verkey()), ("add", k.verkey())],
            vec![("remove", k.did_key()), ("add", k.verkey())],
            vec![("add", k.verkey()), ("add", k.did_key())],
            vec![("add", k2.verkey()), ("remove", k2.did_key())],
            vec![("add", k3.verkey()), ("remove", k2.verkey()), ("remove", k2.verkey())],
        ] {
            let r = keylist(&m, &c1, &updates).await;
            assert_eq!(r.len(), 1, "{r:?}");
            assert_eq!(
                crate::client::type_name(&r[0]),
                "problem-report",
                "{updates:?}: {}",
                r[0]
            );
            assert_eq!(r[0]["description"]["code"], "invalid_message");
            let why = r[0]["description"]["en"].as_str().unwrap();
            assert!(
                why.contains("more than once") && why.contains("nothing applied"),
                "{why}"
            );
        }
        assert_eq!(m.store.keys_of(&c1.id).await.unwrap(), [k.verkey()], "nothing applied");
        // Each key once: each entry's own result, in the order sent.
        let r = keylist(
            &m,
            &c1,
            &[("remove", k.did_key()), ("add", k2.verkey()), ("add", "x".into())],
        )
        .await;
        assert_eq!(results(&r[0]), ["success", "success", "client_error"]);
        assert_eq!(m.store.keys_of(&c1.id).await.unwrap(), [k2.verkey()]);
    }

    /// A key a connection holds as a DIDComm v2 recipient DID, in any did:key form of it, is
    /// refused to another connection in base58 (the form v1 stores); the holder itself may
    /// add it.
    #[actix_rt::test]
    async fn a_key_held_as_a_did_key_by_another_connection_is_refused() {
        let (m, c1) = mediator_for_test().await;
        let c2 = granted_connection_for_test("c2", "ours", "theirs-2");
        m.store.put_connection(&c2).await.unwrap();
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect();
        let held = |k: &KeyPair, i: usize| {
            let dk = k.did_key();
            match i {
                0 => dk,
                1 => format!("{dk}#{}", &dk["did:key:".len()..]),
                _ => crate::didcomm::v2::keys::did_key_equivalents(&dk)
                    .into_iter()
                    .find(|d| d.starts_with("did:key:z6LS"))
                    .unwrap(),
            }
        };
        for (i, k) in keys.iter().enumerate() {
            let form = held(k, i);
            let r = m
                .store
                .update_keys(&c1.id, std::slice::from_ref(&form), &[])
                .await
                .unwrap();
            assert_eq!(r[0].1, KeyUpdate::Added, "{form}");
            for key in [k.verkey(), k.did_key()] {
                assert_eq!(add(&m, &c2, &key).await, "client_error", "{form}: {key}");
            }
            assert_eq!(add(&m, &c1, &k.verkey()).await, "success", "{form}");
        }
        assert!(m.store.keys_of(&c2.id).await.unwrap().is_empty());
        // Free once the holder dropped it.
        let form = held(&keys[0], 0);
        m.store
            .update_keys(&c1.id, &[], std::slice::from_ref(&form))
            .await
            .unwrap();
        m.store.update_keys(&c1.id, &[], &[keys[0].verkey()]).await.unwrap();
        assert_eq!(add(&m, &c2, &keys[0].verkey()).await, "success");
    }
}
