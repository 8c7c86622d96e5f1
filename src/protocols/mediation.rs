//! coordinate-mediation 1.0, mediator side: mediate-request -> grant, keylist-update ->
//! keylist-update-response, keylist-query -> keylist.
//!
//! A key another connection already holds is refused (`client_error`): Credo's and ACA-Py's
//! mediators accept it and then drop every forward to it while the sender gets 200. So is one
//! a DIDComm v2 connection holds as a did:key (in any of its forms).

use super::v2::routing::held_as_did_key;
use super::{problem, HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::keys::normalize_verkey;
use crate::store::{ConnectionPatch, KeyUpdate, MediationState};
use serde_json::{json, Value};
use std::collections::HashSet;

/// Keys a single keylist-update may carry.
pub const MAX_UPDATES: usize = 1000;

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
    let mut after = current.clone();
    for k in remove {
        after.remove(k);
    }
    after.extend(add.iter().cloned());
    let max = m.max_keys_per_connection;
    Ok((after.len() > max && after.len() > current.len()).then_some(after.len()))
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
    // A key another connection holds as a DIDComm v2 recipient DID (a did:key form of it) is
    // refused as one it holds in base58 (the store sees only the exact string).
    // Looked up on adds only, never on a forward.
    let (mut checked, mut held_as_did) = (HashSet::new(), HashSet::new());
    for (_, n, a) in &items {
        if let (Ok(k), "add") = (n, a.as_str()) {
            if checked.insert(k) && held_as_did_key(m, &conn.id, k).await?.is_some() {
                held_as_did.insert(k.clone());
            }
        }
    }
    let add: Vec<String> = items
        .iter()
        .filter(|(_, n, a)| a == "add" && n.as_ref().is_ok_and(|k| !held_as_did.contains(k)))
        .filter_map(|(_, n, _)| n.clone().ok())
        .collect();
    let remove: Vec<String> = items
        .iter()
        .filter(|(_, n, a)| a == "remove" && n.is_ok())
        .filter_map(|(_, n, _)| n.clone().ok())
        .collect();
    if let Some(would_hold) = keys_over_limit(m, &conn.id, &add, &remove).await? {
        // Refused whole: every update `server_error` (RFC 0211), then a report saying why.
        let updated: Vec<Value> = items
            .iter()
            .map(|(raw, _, action)| json!({ "recipient_key": raw, "action": action, "result": "server_error" }))
            .collect();
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
    let results = m.store.update_keys(&conn.id, &add, &remove).await?;
    let mut updated = Vec::new();
    for (raw, norm, action) in &items {
        let result = match (norm, action.as_str()) {
            (Err(_), _) => "client_error",
            (Ok(_), a) if a != "add" && a != "remove" => "client_error",
            (Ok(k), "add") if held_as_did.contains(k) => {
                tracing::warn!(connection = %conn.id, key = %k, "keylist-update refused: key held by another connection as a DID");
                "client_error"
            }
            (Ok(k), _) => match results.iter().find(|(rk, _)| rk == k).map(|(_, r)| r) {
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
            },
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
