//! coordinate-mediation 2.0 and 3.0 over one keylist: mediate-request -> mediate-grant
//! (`routing_did` sent as an array: both real clients read `routing_did[0]`), 2.0
//! keylist-update / keylist-query, 3.0 recipient-update / recipient-query. Registered
//! recipient DIDs are the connection's routing keys, each in the one form it is stored and
//! routed under ([`Recipient`]: a DID URL as its DID, a did:peer:4 as its short form).
//! recipient-update answers each DID as the wallet named it; recipient-query and
//! keylist-query list the stored forms (the short form of a did:peer:4 is in its own
//! document's `alsoKnownAs`: the wallet knows it), a page at a time (`paginate`).

use super::recipient::Recipient;
use super::{Inbound, PROTOCOL};
use crate::protocols::{now_ms, HandleError, Mediator, Outcome};
use crate::store::{Connection, KeyUpdate, MediationState};
use serde_json::{json, Value};

/// Most keylist updates read from one message.
pub const MAX_UPDATES: usize = 100;

pub async fn handle(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    match (ctx.major(), ctx.name.as_str()) {
        (_, "mediate-request") => mediate_request(m, ctx).await,
        (2, "keylist-update") | (3, "recipient-update") => update(m, ctx).await,
        (2, "keylist-query") | (3, "recipient-query") => query(m, ctx).await,
        _ => Err(ctx.unsupported()),
    }
}

async fn mediate_request(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let sender = ctx.sender.clone().ok_or(HandleError::Unproven)?;
    let conn = match &ctx.conn {
        // Read again (a wallet asks once per start): a connection the operator deleted or
        // revoked while this was handled gets no grant.
        Some(c) if matches!(c.mediation, MediationState::Granted | MediationState::Denied) => {
            m.store.get_connection(&c.id).await?.ok_or(HandleError::NoConnection)?
        }
        // The stored state after the patch: a revocation that landed meanwhile stands.
        Some(c) => m
            .store
            .update_connection(
                &c.id,
                &crate::store::ConnectionPatch {
                    mediation: Some(MediationState::Granted),
                    updated_at_ms: now_ms(),
                    ..Default::default()
                },
            )
            .await?
            // Deleted by the operator while this was handled: no grant for it.
            .ok_or(HandleError::NoConnection)?,
        None => create(m, ctx, &sender).await?,
    };
    if conn.mediation == MediationState::Denied {
        // Revoked by the operator (admin `POST /connections/{id}/mediation`): it stays so,
        // as in v1.
        tracing::info!(connection = %conn.id, "v2 mediate-request of a connection whose mediation was revoked: denied");
        return Ok(Outcome {
            replies: vec![ctx.reply(m, "mediate-deny", json!({}))],
            connection: Some(conn),
            ..Outcome::default()
        });
    }
    let grant = ctx.reply(m, "mediate-grant", json!({ "routing_did": [m.v2.did] }));
    Ok(Outcome {
        replies: vec![grant],
        connection: Some(conn),
        ..Outcome::default()
    })
}

async fn create(m: &Mediator, ctx: &Inbound, sender: &str) -> Result<Connection, HandleError> {
    let now = now_ms();
    let conn = Connection {
        id: uuid::Uuid::new_v4().to_string(),
        created_at_ms: now,
        updated_at_ms: now,
        state: "completed".into(),
        protocol: PROTOCOL.into(),
        label: None,
        our_verkey: m.v2.agreement_kid.clone(),
        our_did: Some(m.v2.did.clone()),
        their_did: Some(sender.to_string()),
        their_verkeys: vec![sender.to_string()],
        their_endpoints: vec![],
        their_routing_keys: vec![],
        mediation: MediationState::Granted,
        invitation_id: None,
        // Kept only when it is an id's length (it is informational for v2).
        thread_id: Some(ctx.thid()).filter(|t| t.len() <= crate::didcomm::message::MAX_ID_LEN),
        extra: json!({ "didcomm": "v2" }),
    };
    match m.store.put_connection(&conn).await {
        Ok(()) => Ok(conn),
        // Two requests of one DID at once (two nodes): the first one's record wins.
        Err(crate::store::StoreError::KeyTaken(_)) => m
            .store
            .connection_by_their_verkey(sender)
            .await?
            .ok_or_else(|| HandleError::Internal("connection vanished".into())),
        Err(e) => Err(e.into()),
    }
}

fn granted(ctx: &Inbound) -> Result<&Connection, HandleError> {
    let c = ctx.require_conn()?;
    if c.mediation != MediationState::Granted {
        return Err(HandleError::BadMessage(
            "no mediation granted to this DID: send mediate-request".into(),
        ));
    }
    Ok(c)
}

/// Why adding `r` for connection `conn` is refused before the store sees it, if it is: a
/// did:peer:3, or a DID another connection holds in another form (a long form an earlier
/// version stored, too: [`super::routing::held_in_another_form`]; a did:key's key held as a
/// DIDComm v1 verkey: [`super::routing::held_as_verkey`]; the store refuses one held in the
/// form `r` is stored under).
async fn add_refusal(m: &Mediator, conn: &str, r: &Recipient) -> Result<Option<String>, HandleError> {
    if r.unlinkable() {
        return Ok(Some(
            "a did:peer:3 is not taken as a recipient (it cannot be linked to its did:peer:2): register the did:peer:2"
                .into(),
        ));
    }
    let held = match super::routing::held_in_another_form(m, r).await? {
        Some((c, form)) if c != conn => Some(form),
        _ => super::routing::held_as_verkey(m, conn, &r.canonical)
            .await?
            .map(|(_, verkey)| verkey),
    };
    Ok(held.map(|form| {
        format!(
            "the DID is registered by another connection as {}",
            form.chars().take(80).collect::<String>()
        )
    }))
}

/// Takes the recipient DID `r`, which the sender of this message proved it controls (it
/// authenticated the message as `r`, or a `from_prior` rotated it to `r`), from any other
/// connection that merely registered it. First come first served let a wallet that learned a
/// DID (a contact told of a rotation) register it first: the rotation was then refused, and
/// mail for the DID queued for the squatter, who could acknowledge it away. A connection whose
/// own DID `r` is keeps it (the caller refuses then, as before). Mail already queued for the
/// squatter stays in its queue.
pub(super) async fn take_proven(m: &Mediator, taker: &str, r: &Recipient) -> Result<(), HandleError> {
    // A route cached on this node may name a connection that no longer holds the DID (it moved
    // on another node): the removal then finds nothing, the cache forgets it, and the holder is
    // looked up once more.
    for _ in 0..2 {
        if !take_from_holders(m, taker, r).await? {
            break;
        }
    }
    Ok(())
}

/// One pass of [`take_proven`]: whether a holder it found no longer held the DID.
async fn take_from_holders(m: &Mediator, taker: &str, r: &Recipient) -> Result<bool, HandleError> {
    let mut held = Vec::new();
    if let Some(c) = m.store.route(&r.canonical).await? {
        held.push((c, r.canonical.clone()));
    }
    if let Some(hit) = super::routing::held_in_another_form(m, r).await? {
        held.push(hit);
    }
    // Its key as a DIDComm v1 wallet registered it (a did:key proven is its key's).
    if let Some(hit) = super::routing::held_as_verkey(m, taker, &r.canonical).await? {
        held.push(hit);
    }
    let mut stale = false;
    for (holder, form) in held {
        if holder == taker {
            continue;
        }
        let owns = m
            .store
            .get_connection(&holder)
            .await?
            .and_then(|c| c.their_did)
            .and_then(|d| Recipient::parse(&d).ok())
            .is_some_and(|d| d.canonical == r.canonical);
        if owns {
            continue;
        }
        // The holder (read from the node's route cache) may be gone, deleted meanwhile: a
        // stale route, not this sender's fault.
        let out = match m.store.update_keys(&holder, &[], std::slice::from_ref(&form)).await {
            Err(crate::store::StoreError::NotFound) => {
                stale = true;
                continue;
            }
            r => r?,
        };
        if out.iter().any(|(_, u)| *u == crate::store::KeyUpdate::NotFound) {
            stale = true;
            continue;
        }
        tracing::warn!(connection = %holder, by = %taker, recipient = %r.named, "a recipient DID registered by a connection that never proved it was taken by the one that did");
    }
    Ok(stale)
}

/// Every form of `r` connection `conn` may hold, to remove: [`Recipient::stored_forms`], and
/// the long form an earlier version stored that `conn` holds, found from the short form (it
/// routes the short form to `conn`).
async fn removal_forms(m: &Mediator, conn: &str, r: &Recipient) -> Result<Vec<String>, HandleError> {
    let mut forms = r.stored_forms();
    if let Some((c, long)) = super::routing::held_as_long_form(m, r).await? {
        if c == conn && !forms.contains(&long) {
            forms.push(long);
        }
    }
    Ok(forms)
}

/// The `updated` entries of a keylist update, in update order, each naming its DID as the
/// wallet did. `remove` pairs each removed DID with its forms removed; `results` are the
/// store's: one per added key, then one per removed form.
fn answers(add: &[Recipient], remove: &[(Recipient, Vec<String>)], results: &[(String, KeyUpdate)]) -> Vec<Value> {
    let (added, removed) = results.split_at(add.len().min(results.len()));
    let mut removed = removed.iter().map(|(_, u)| *u);
    let adds = add.iter().zip(added).map(|(r, (_, u))| ("add", r, *u));
    let removes: Vec<_> = remove
        .iter()
        .map(|(r, forms)| {
            let forms: Vec<KeyUpdate> = removed.by_ref().take(forms.len()).collect();
            ("remove", r, removal(&forms))
        })
        .collect();
    adds.chain(removes)
        .map(|(action, r, u)| {
            let result = match u {
                KeyUpdate::Added | KeyUpdate::Removed => "success",
                KeyUpdate::AlreadyAdded | KeyUpdate::NotFound => "no_change",
                KeyUpdate::HeldByOther | KeyUpdate::Revoked => "client_error",
            };
            json!({ "recipient_did": r.named, "action": action, "result": result })
        })
        .collect()
}

/// The outcome of removing a DID stored in several forms: removed if one form was.
fn removal(forms: &[KeyUpdate]) -> KeyUpdate {
    forms
        .iter()
        .copied()
        .find(|u| *u != KeyUpdate::NotFound)
        .unwrap_or(KeyUpdate::NotFound)
}

async fn update(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = granted(ctx)?;
    let updates = ctx.msg["body"]["updates"]
        .as_array()
        .ok_or_else(|| HandleError::BadMessage("updates must be an array".into()))?;
    if updates.len() > MAX_UPDATES {
        return Err(HandleError::BadMessage(format!(
            "at most {MAX_UPDATES} updates per message"
        )));
    }
    // The store applies every add, then every remove: an update naming a DID twice (in any
    // form) is refused before any of it acts (as v1's is).
    let mut named = std::collections::HashSet::new();
    for u in updates {
        let raw = u["recipient_did"].as_str().or_else(|| u["recipient_key"].as_str());
        if let (Some(Ok(r)), Some("add" | "remove")) = (raw.map(Recipient::parse), u["action"].as_str()) {
            if !named.insert(r.canonical) {
                return Err(HandleError::BadMessage(format!(
                    "the update names {} more than once (adds are applied before removes, not in order): send one \
                     update per DID",
                    r.named.chars().take(80).collect::<String>()
                )));
            }
        }
    }
    let (mut add, mut remove, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    // The sender's own DID, which this message proved it controls.
    let own = ctx.sender.as_deref().and_then(|s| Recipient::parse(s).ok());
    for u in updates {
        // 3.0 and 2.0 both say `recipient_did`; some 2.0 clients wrote `recipient_key`.
        let raw = u["recipient_did"]
            .as_str()
            .or_else(|| u["recipient_key"].as_str())
            .unwrap_or_default();
        let action = u["action"].as_str().unwrap_or_default().to_string();
        let refused = || json!({ "recipient_did": raw, "action": action, "result": "client_error" });
        match (Recipient::parse(raw), action.as_str()) {
            (Ok(r), "add") => {
                if own.as_ref().is_some_and(|o| o.canonical == r.canonical) {
                    take_proven(m, &conn.id, &r).await?;
                }
                match add_refusal(m, &conn.id, &r).await? {
                    Some(why) => {
                        tracing::warn!(connection = %conn.id, recipient = %r.named, "recipient update refused: {why}");
                        bad.push(refused())
                    }
                    None => add.push(r),
                }
            }
            (Ok(r), "remove") => remove.push(r),
            (Err(e), "add" | "remove") => {
                tracing::info!(connection = %conn.id, "recipient update refused: {e}");
                bad.push(refused())
            }
            _ => bad.push(refused()),
        }
    }
    let add_keys: Vec<String> = add.iter().map(|r| r.canonical.clone()).collect();
    // A DID is removed in every form it may be stored in (a long form stored by an earlier
    // version, too).
    let mut removals = Vec::with_capacity(remove.len());
    for r in remove {
        let forms = removal_forms(m, &conn.id, &r).await?;
        removals.push((r, forms));
    }
    let remove_keys: Vec<String> = removals.iter().flat_map(|(_, forms)| forms.iter().cloned()).collect();
    if let Some(would_hold) = super::super::mediation::keys_over_limit(m, &conn.id, &add_keys, &remove_keys).await? {
        return Ok(over_limit(m, ctx, updates, would_hold));
    }
    let results = m.store.update_keys(&conn.id, &add_keys, &remove_keys).await?;
    let mut updated = answers(&add, &removals, &results);
    updated.extend(bad);
    let (name, body) = if ctx.major() == 2 {
        ("keylist-update-response", json!({ "updated": updated }))
    } else {
        // The spec says `updated`; Veramo 7.0.1 reads `updates` (what its own mediator writes).
        (
            "recipient-update-response",
            json!({ "updated": updated, "updates": updated }),
        )
    };
    Ok(Outcome {
        replies: vec![ctx.reply(m, name, body)],
        ..Outcome::default()
    })
}

/// An update that would pass `limits.max_keys_per_connection`, refused whole: every update
/// answered `server_error`, the response's `comment` saying why, then a problem-report 2.0
/// saying it too. The response is what a wallet over HTTP gets: its one reply goes in the
/// HTTP response and the report, with no endpoint to post it to, is dropped; over a
/// WebSocket both arrive.
fn over_limit(m: &Mediator, ctx: &Inbound, updates: &[Value], would_hold: usize) -> Outcome {
    let updated: Vec<Value> = updates
        .iter()
        .map(|u| {
            let raw = u["recipient_did"]
                .as_str()
                .or_else(|| u["recipient_key"].as_str())
                .unwrap_or_default();
            // The action as a string, or null: never whatever the sender wrote there.
            json!({ "recipient_did": raw, "action": u["action"].as_str(), "result": "server_error" })
        })
        .collect();
    let why = super::super::mediation::over_limit_reason(would_hold, m.max_keys_per_connection);
    tracing::info!(connection = %ctx.conn.as_ref().map(|c| c.id.as_str()).unwrap_or("-"), "v2 {why}");
    let name = if ctx.major() == 2 {
        "keylist-update-response"
    } else {
        "recipient-update-response"
    };
    let body = if ctx.major() == 2 {
        json!({ "updated": updated, "comment": why })
    } else {
        json!({ "updated": updated, "updates": updated, "comment": why })
    };
    let mut report = ctx.reply(
        m,
        "problem-report",
        json!({ "code": "e.p.req.keylist-limit", "comment": why }),
    );
    // A problem report names the thread it is about as its parent.
    report["type"] = json!(format!("{}report-problem/2.0/problem-report", super::PREFIX));
    if let Some(o) = report.as_object_mut() {
        o.remove("thid");
    }
    report["pthid"] = json!(ctx.shown_thid());
    Outcome {
        replies: vec![ctx.reply(m, name, body), report],
        ..Outcome::default()
    }
}

/// Most keys one answer lists, whatever `paginate.limit` asks, and what it lists when it asks
/// none (the spec sets no default page): the default `limits.max_keys_per_connection`, so a
/// wallet of ordinary DIDs (a did:key is ~56 bytes) reads its whole keylist in one query
/// without paging, as before answers were paged. What bounds an answer is
/// [`MAX_PAGE_BYTES`]; the answer's `pagination.remaining` says when more are left.
pub const MAX_PAGE: usize = 1000;
/// Most bytes one answer's list holds (its entries as JSON). Keys are recipient DIDs of up to
/// `did::MAX_DID_LEN` (8 KiB) each: 1,000 of them made one ~300-byte query an ~8 MB reply
/// (~11 MB encrypted), repeatable at will. 512 KiB is some 60 of the longest DIDs (thousands
/// of did:keys, so [`MAX_PAGE`] is what binds for usual keylists) and stays under ~1 MB once
/// encrypted (base64url adds a third).
pub const MAX_PAGE_BYTES: usize = 512 * 1024;

/// The `body.paginate` of a keylist-query or recipient-query: `(offset, limit)`, the limit
/// at most [`MAX_PAGE`], and that when none is asked. A value that is not a non-negative
/// integer (negative, a string, a fraction) is ignored (as DIDComm v1's keylist-query ignores
/// it): the answer's `pagination` says what the page is, so a wallet can page on from it.
fn paginate(body: &Value) -> (usize, usize) {
    let read = |k: &str| {
        body["paginate"][k]
            .as_u64()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    };
    let offset = read("offset").unwrap_or(0);
    let limit = read("limit").unwrap_or(MAX_PAGE).min(MAX_PAGE);
    (offset, limit)
}

/// The page of `keys` (sorted, as the store lists them) from `offset`: at most `limit`
/// entries and [`MAX_PAGE_BYTES`] of them, but at least one while any remain and `limit` is
/// not 0 (one DID is far under the bound: paging always moves on). With it the `pagination`
/// object of coordinate-mediation 2.0 and 3.0: `count` listed here, the `offset` asked, and
/// the keys `remaining` after this page (the next page's offset is `offset + count`). An
/// offset past the end is an empty page with none remaining, as in v1.
fn page(keys: &[String], offset: usize, limit: usize) -> (Vec<Value>, Value) {
    let mut list = Vec::new();
    // The list's brackets.
    let mut bytes = 2;
    for k in keys.iter().skip(offset).take(limit) {
        let entry = json!({ "recipient_did": k });
        // Its JSON and the comma after it.
        let size = entry.to_string().len() + 1;
        if !list.is_empty() && bytes + size > MAX_PAGE_BYTES {
            break;
        }
        bytes += size;
        list.push(entry);
    }
    let remaining = keys.len().saturating_sub(offset.saturating_add(list.len()));
    let pagination = json!({ "count": list.len(), "offset": offset, "remaining": remaining });
    (list, pagination)
}

/// keylist-query (2.0) and recipient-query (3.0): one page of the connection's keys (see
/// [`page`]), never the whole keylist at once.
async fn query(m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let conn = granted(ctx)?;
    let keys = m.store.keys_of(&conn.id).await?;
    let (offset, limit) = paginate(&ctx.msg["body"]);
    let (list, pagination) = page(&keys, offset, limit);
    let reply = if ctx.major() == 2 {
        ctx.reply(m, "keylist", json!({ "keys": list, "pagination": pagination }))
    } else {
        ctx.reply(m, "recipient", json!({ "dids": list, "pagination": pagination }))
    };
    Ok(Outcome {
        replies: vec![reply],
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::did::{create_peer4, peer4_short_form};
    use crate::didcomm::keys::KeyPair;
    use crate::protocols::{granted_connection_for_test, mediator_for_test, TransportKind};

    /// A recipient-update of `conn` (`(DID, action)` each), answered: `(DID, result)` each.
    async fn recipient_update(
        m: &Mediator,
        conn: &Connection,
        updates: &[(&str, &str)],
    ) -> Result<Vec<(String, String)>, HandleError> {
        let updates: Vec<Value> = updates
            .iter()
            .map(|(d, a)| json!({ "recipient_did": d, "action": a }))
            .collect();
        let out = update(m, &recipient_update_of(conn, updates)).await?;
        Ok(out.replies[0]["body"]["updated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                let s = |k: &str| u[k].as_str().unwrap().to_string();
                (s("recipient_did"), s("result"))
            })
            .collect())
    }

    /// A recipient-update 3.0 of `conn`'s wallet holding `updates` as they are.
    fn recipient_update_of(conn: &Connection, updates: Vec<Value>) -> Inbound {
        let type_str = "https://didcomm.org/coordinate-mediation/3.0/recipient-update";
        let msg = json!({ "id": "u-1", "type": type_str, "body": { "updates": updates } });
        Inbound {
            plaintext: serde_json::to_vec(&msg).unwrap(),
            msg,
            type_str: type_str.into(),
            family: "coordinate-mediation".into(),
            version: "3.0".into(),
            name: "recipient-update".into(),
            sender: Some("did:example:wallet".into()),
            conn: Some(conn.clone()),
            dialect: None,
            transport: TransportKind::Http,
            lease_owner: "n1/test".into(),
        }
    }

    /// A keylist-query (`major` 2) or recipient-query (3) of `conn`'s wallet with `body`.
    fn query_of(conn: &Connection, major: u32, body: Value) -> Inbound {
        let (version, name) = if major == 2 {
            ("2.0", "keylist-query")
        } else {
            ("3.0", "recipient-query")
        };
        let type_str = format!("https://didcomm.org/coordinate-mediation/{version}/{name}");
        let msg = json!({ "id": "q-1", "type": type_str, "body": body });
        Inbound {
            plaintext: serde_json::to_vec(&msg).unwrap(),
            msg,
            type_str,
            family: "coordinate-mediation".into(),
            version: version.into(),
            name: name.into(),
            sender: Some("did:example:wallet".into()),
            conn: Some(conn.clone()),
            dialect: None,
            transport: TransportKind::Http,
            lease_owner: "n1/test".into(),
        }
    }

    /// A query of `conn` with `body`, answered: the DIDs listed, the `pagination` object, and
    /// the list's size as JSON.
    async fn queried(m: &Mediator, conn: &Connection, major: u32, body: Value) -> (Vec<String>, Value, usize) {
        let out = query(m, &query_of(conn, major, body)).await.unwrap();
        let reply = &out.replies[0];
        let (name, list) = if major == 2 {
            ("keylist", "keys")
        } else {
            ("recipient", "dids")
        };
        assert!(reply["type"].as_str().unwrap().ends_with(name), "{}", reply["type"]);
        let list = &reply["body"][list];
        let dids = list
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["recipient_did"].as_str().unwrap().to_string())
            .collect();
        (dids, reply["body"]["pagination"].clone(), list.to_string().len())
    }

    /// `conn` holding `n` recipient DIDs `did:example:NNNN<pad>`: them, sorted as stored.
    async fn holding(m: &Mediator, conn: &Connection, n: usize, pad: usize) -> Vec<String> {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("did:example:{i:04}{}", "x".repeat(pad)))
            .collect();
        m.store.update_keys(&conn.id, &keys, &[]).await.unwrap();
        let stored = m.store.keys_of(&conn.id).await.unwrap();
        assert_eq!(stored.len(), n);
        stored
    }

    /// Pages through `conn`'s keylist `limit` at a time (None: the default page), checking
    /// each page's `pagination`: every DID listed, in order.
    async fn paged_through(m: &Mediator, conn: &Connection, major: u32, limit: Option<usize>) -> Vec<String> {
        let (mut all, mut offset) = (Vec::new(), 0);
        loop {
            let body = match limit {
                Some(l) => json!({ "paginate": { "limit": l, "offset": offset } }),
                None => json!({ "paginate": { "offset": offset } }),
            };
            let (dids, p, _) = queried(m, conn, major, body).await;
            assert_eq!(p["offset"], offset, "{p}");
            assert_eq!(p["count"], dids.len(), "{p}");
            assert!(
                !dids.is_empty() || p["remaining"] == 0,
                "an empty page while keys remain: {p}"
            );
            offset += dids.len();
            all.extend(dids);
            if p["remaining"] == 0 {
                return all;
            }
            assert!(all.len() <= 10_000, "paging does not end");
        }
    }

    /// A query names no `paginate`: one page of at most [`MAX_PAGE`], saying how many remain
    /// (a connection of 1,000 DIDs of 8 KiB answered every one, ~8 MB for a ~300-byte query).
    #[actix_rt::test]
    async fn a_query_answers_one_page_and_says_what_remains() {
        let (m, c1) = mediator_for_test().await;
        let keys = holding(&m, &c1, MAX_PAGE + 250, 0).await;
        for major in [2, 3] {
            let (dids, p, _) = queried(&m, &c1, major, json!({})).await;
            assert_eq!(dids, keys[..MAX_PAGE], "{major}.0");
            assert_eq!(
                p,
                json!({ "count": MAX_PAGE, "offset": 0, "remaining": 250 }),
                "{major}.0"
            );
            let (dids, p, _) = queried(&m, &c1, major, json!({ "paginate": { "limit": 30, "offset": 30 } })).await;
            assert_eq!(dids, keys[30..60], "{major}.0");
            assert_eq!(
                p,
                json!({ "count": 30, "offset": 30, "remaining": MAX_PAGE + 190 }),
                "{major}.0"
            );
        }
    }

    /// Paging through with offsets lists every DID exactly once, in the 2.0 and 3.0 forms, at
    /// any page size (one past the keylist's size too).
    #[actix_rt::test]
    async fn paging_through_lists_every_key_exactly_once() {
        let (m, c1) = mediator_for_test().await;
        let keys = holding(&m, &c1, 250, 0).await;
        for major in [2, 3] {
            for limit in [None, Some(1), Some(70), Some(100), Some(251), Some(5000)] {
                let got = paged_through(&m, &c1, major, limit).await;
                assert_eq!(got, keys, "{major}.0, limit {limit:?}");
            }
        }
    }

    /// A page of the longest DIDs stays within [`MAX_PAGE_BYTES`], even the default page of
    /// 100 (~800 KiB of them), and paging through still lists every one.
    #[actix_rt::test]
    async fn a_page_of_long_dids_stays_within_the_byte_bound() {
        let (m, c1) = mediator_for_test().await;
        let long = crate::didcomm::did::MAX_DID_LEN - "did:example:0000".len();
        let keys = holding(&m, &c1, 100, long).await;
        assert_eq!(keys[0].len(), crate::didcomm::did::MAX_DID_LEN);
        for major in [2, 3] {
            for body in [json!({}), json!({ "paginate": { "limit": MAX_PAGE, "offset": 0 } })] {
                let (dids, p, bytes) = queried(&m, &c1, major, body).await;
                assert!(bytes <= MAX_PAGE_BYTES, "{major}.0: a list of {bytes} bytes");
                assert!(!dids.is_empty() && dids.len() < 100, "{major}.0: {} listed", dids.len());
                assert_eq!(p["remaining"], 100 - dids.len(), "{p}");
            }
            assert_eq!(paged_through(&m, &c1, major, Some(MAX_PAGE)).await, keys, "{major}.0");
        }
    }

    /// `paginate` values that are not non-negative integers are ignored (every key listed, up
    /// to [`MAX_PAGE`]), as v1's keylist-query ignores them; an offset past the end is an empty page with none
    /// remaining; a limit of 0 lists nothing and says how many there are; a limit over
    /// [`MAX_PAGE`] lists at most that.
    #[actix_rt::test]
    async fn bad_paginate_values_answer_as_in_v1() {
        let (m, c1) = mediator_for_test().await;
        let keys = holding(&m, &c1, 250, 0).await;
        let first = json!({ "count": 250, "offset": 0, "remaining": 0 });
        for major in [2, 3] {
            for paginate in [
                json!({ "limit": -5, "offset": -1 }),
                json!({ "limit": "all", "offset": "0" }),
                json!({ "limit": 1.5, "offset": null }),
                json!("everything"),
            ] {
                let (dids, p, _) = queried(&m, &c1, major, json!({ "paginate": paginate })).await;
                assert_eq!((dids.as_slice(), &p), (&keys[..], &first), "{major}.0: {paginate}");
            }
            let (dids, p, _) = queried(&m, &c1, major, json!({ "paginate": { "limit": 10, "offset": 9999 } })).await;
            assert!(dids.is_empty());
            assert_eq!(p, json!({ "count": 0, "offset": 9999, "remaining": 0 }));
            let past = json!({ "paginate": { "limit": 10, "offset": u64::MAX } });
            assert_eq!(queried(&m, &c1, major, past).await.1["remaining"], 0);
            let (dids, p, _) = queried(&m, &c1, major, json!({ "paginate": { "limit": 0, "offset": 0 } })).await;
            assert!(dids.is_empty());
            assert_eq!(p, json!({ "count": 0, "offset": 0, "remaining": 250 }));
        }
        let many: Vec<String> = (0..MAX_PAGE + 200).map(|i| format!("did:example:{i:05}")).collect();
        let (offset, limit) = paginate(&json!({ "paginate": { "limit": 100_000, "offset": 0 } }));
        let (list, p) = page(&many, offset, limit);
        assert_eq!(list.len(), MAX_PAGE);
        assert_eq!(p, json!({ "count": MAX_PAGE, "offset": 0, "remaining": 200 }));
    }

    /// An update refused for the key limit echoes each action as a string or null, never what
    /// the sender wrote there (an object written into the reply as it is).
    #[actix_rt::test]
    async fn an_update_over_the_key_limit_echoes_only_string_actions() {
        let (m, c1) = mediator_for_test().await;
        let forged = json!({ "$mailroom:raw-json": "{\"ciphertext\": 1e400}" });
        let dk = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        let updates = vec![
            json!({ "recipient_did": dk, "action": "add" }),
            json!({ "recipient_did": dk, "action": forged }),
            json!({ "recipient_did": dk, "action": [1, 2] }),
        ];
        let ctx = recipient_update_of(&c1, updates.clone());
        let out = over_limit(&m, &ctx, &updates, m.max_keys_per_connection + 1);
        let actions: Vec<&Value> = out.replies[0]["body"]["updated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| &u["action"])
            .collect();
        assert_eq!(actions, [&json!("add"), &Value::Null, &Value::Null]);
    }

    fn answered(d: &str, result: &str) -> (String, String) {
        (d.to_string(), result.to_string())
    }

    /// c1 holds a did:peer:4's long form as an earlier version stored it: c2 cannot register
    /// the short form (the form senders use after first contact), c1 can; removing the short
    /// form removes the long form it routes by.
    #[actix_rt::test]
    async fn a_short_form_is_refused_while_another_connection_holds_its_legacy_long_form() {
        let (m, c1) = mediator_for_test().await;
        let c2 = granted_connection_for_test("c2", "ours", "theirs-2");
        m.store.put_connection(&c2).await.unwrap();
        let long = create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let short = peer4_short_form(&long).unwrap();
        m.store
            .update_keys(&c1.id, std::slice::from_ref(&long), &[])
            .await
            .unwrap();

        // One form per update: an update naming a DID twice is refused whole.
        for form in [short.clone(), format!("{short}#key-1")] {
            let got = recipient_update(&m, &c2, &[(&form, "add")]).await.unwrap();
            assert_eq!(got, [answered(&form, "client_error")]);
        }
        assert!(m.store.keys_of(&c2.id).await.unwrap().is_empty());

        let got = recipient_update(&m, &c1, &[(&short, "add")]).await.unwrap();
        assert_eq!(got, [answered(&short, "success")]);
        let got = recipient_update(&m, &c1, &[(&short, "remove")]).await.unwrap();
        assert_eq!(got, [answered(&short, "success")]);
        assert!(m.store.keys_of(&c1.id).await.unwrap().is_empty());
        // Only the long form held: removing the short form removes it.
        m.store
            .update_keys(&c1.id, std::slice::from_ref(&long), &[])
            .await
            .unwrap();
        let got = recipient_update(&m, &c1, &[(&short, "remove")]).await.unwrap();
        assert_eq!(got, [answered(&short, "success")]);
        assert!(m.store.keys_of(&c1.id).await.unwrap().is_empty());
        // Free now.
        let got = recipient_update(&m, &c2, &[(&short, "add")]).await.unwrap();
        assert_eq!(got, [answered(&short, "success")]);
    }

    /// A did:key whose Ed25519 key another connection holds as a DIDComm v1 base58 verkey is
    /// refused, in its Ed25519 and its X25519 form; the holder itself may add it.
    #[actix_rt::test]
    async fn a_did_key_whose_key_another_connection_holds_in_base58_is_refused() {
        let (m, c1) = mediator_for_test().await;
        let c2 = granted_connection_for_test("c2", "ours", "theirs-2");
        m.store.put_connection(&c2).await.unwrap();
        let k = KeyPair::generate();
        m.store.update_keys(&c1.id, &[k.verkey()], &[]).await.unwrap();
        let dk = k.did_key();
        let dx = crate::didcomm::v2::keys::did_key_equivalents(&dk)
            .into_iter()
            .find(|d| d.starts_with("did:key:z6LS"))
            .unwrap();
        let got = recipient_update(&m, &c2, &[(&dk, "add"), (&dx, "add")]).await.unwrap();
        assert_eq!(got, [answered(&dk, "client_error"), answered(&dx, "client_error")]);
        assert!(m.store.keys_of(&c2.id).await.unwrap().is_empty());
        let got = recipient_update(&m, &c1, &[(&dk, "add")]).await.unwrap();
        assert_eq!(got, [answered(&dk, "success")]);
    }

    /// A DID holding a NUL (which the store cannot hold) is that entry's client_error: the
    /// rest of the update is applied and answered.
    #[actix_rt::test]
    async fn a_did_holding_a_nul_is_refused_alone() {
        let (m, c1) = mediator_for_test().await;
        let dk = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        for action in ["add", "remove"] {
            let got = recipient_update(&m, &c1, &[("did:x\u{0}", action), (dk, action)])
                .await
                .unwrap();
            assert_eq!(got, [answered(dk, "success"), answered("did:x\u{0}", "client_error")]);
        }
    }

    #[test]
    fn updates_are_answered_as_named_and_a_removal_in_any_stored_form_is_one() {
        let long = create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let short = peer4_short_form(&long).unwrap();
        let r = Recipient::parse(&format!("{long}#key-1")).unwrap();
        let dk = Recipient::parse("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK").unwrap();
        let add = [r.clone()];
        let remove = [r.clone(), dk.clone(), r.clone()].map(|r| {
            let forms = r.stored_forms();
            (r, forms)
        });
        let results = [
            (short.clone(), KeyUpdate::Added),
            // The long form, stored by an earlier version: removed with the DID.
            (short.clone(), KeyUpdate::NotFound),
            (long.clone(), KeyUpdate::Removed),
            (dk.named.clone(), KeyUpdate::NotFound),
            (short.clone(), KeyUpdate::NotFound),
            (long.clone(), KeyUpdate::NotFound),
        ];
        let got: Vec<(String, String, String)> = answers(&add, &remove, &results)
            .iter()
            .map(|u| {
                let s = |k: &str| u[k].as_str().unwrap().to_string();
                (s("recipient_did"), s("action"), s("result"))
            })
            .collect();
        let want = |d: &str, a: &str, r: &str| (d.to_string(), a.to_string(), r.to_string());
        assert_eq!(
            got,
            [
                want(&long, "add", "success"),
                want(&long, "remove", "success"),
                want(&dk.named, "remove", "no_change"),
                want(&long, "remove", "no_change"),
            ]
        );
    }
}
