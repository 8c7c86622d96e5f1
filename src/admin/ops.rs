//! Operator actions on the admin listener (issue 11): remove a connection everywhere in the
//! cluster, drop its queue, revoke its mediation, drain and undrain the node.
//!
//! Every action writes one audit line (tracing target `mailroom::audit`): who (the token's
//! label when a token guards the listener, else the peer address), what, on which connection,
//! the outcome and when.

use super::{unauthorized, AdminState};
use crate::protocols::now_ms;
use crate::registry::{CloseAll, CloseConn, Count, OpenAgain};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// WebSocket close code for sessions an operator action ends (1008: policy violation; the
/// wallet must not simply reconnect and carry on).
pub const OPERATOR_CLOSE_CODE: u16 = 1008;

/// Who acts: the token's label when a token guards the listener, else the peer address.
fn who(req: &HttpRequest, st: &AdminState) -> String {
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let admin = st.reloader.live().admin;
    match admin.token.filter(|t| !t.is_empty()) {
        Some(_) => format!("{} ({peer})", admin.token_label.as_deref().unwrap_or("admin-token")),
        None => peer,
    }
}

fn audit(req: &HttpRequest, st: &AdminState, action: &str, connection: Option<&str>, outcome: &Value) {
    tracing::info!(
        target: "mailroom::audit",
        who = %who(req, st),
        action,
        connection = connection.unwrap_or("-"),
        outcome = %outcome,
        at_ms = now_ms(),
        node = %st.shared.mediator.node_id,
        "operator action"
    );
}

fn store_error(e: crate::store::StoreError) -> HttpResponse {
    match e {
        crate::store::StoreError::Invalid(r) => {
            HttpResponse::BadRequest().json(json!({"error": "bad-request", "reason": r}))
        }
        e => HttpResponse::ServiceUnavailable().json(json!({"error": "store-unavailable", "reason": e.to_string()})),
    }
}

/// Closes the sessions of `conn` here and asks every peer to close theirs. Returns (closed
/// here, peers asked).
async fn close_everywhere(st: &AdminState, conn: &str, reason: &str) -> (usize, Vec<String>) {
    let here = st
        .shared
        .registry
        .send(CloseConn {
            conn: conn.to_string(),
            code: OPERATOR_CLOSE_CODE,
            reason: reason.to_string(),
            except: None,
        })
        .await
        .unwrap_or(0);
    let peers = st
        .shared
        .cluster
        .as_ref()
        .map(|c| c.close_sessions_everywhere(conn, reason))
        .unwrap_or_default();
    (here, peers)
}

/// `DELETE /connections/{id}`: the connection, its keys, queue, dedup records and device
/// registration leave the store; its sessions close on every node. Idempotent.
pub async fn delete_connection(req: HttpRequest, st: web::Data<AdminState>, id: web::Path<String>) -> HttpResponse {
    guard!(req, st);
    let removed = match st.shared.mediator.store.delete_connection(&id).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    // After the store: a session that reconnects meanwhile finds no connection any more.
    let (here, peers) = close_everywhere(&st, &id, "connection removed by the mediator's operator").await;
    let body = json!({
        "id": id.as_str(),
        "removed": removed,
        "sessions_closed_here": here,
        "close_requested_on": peers,
    });
    audit(&req, &st, "delete-connection", Some(&id), &body);
    HttpResponse::Ok().json(body)
}

/// `DELETE /connections/{id}/queue`: drops its queued messages (counted, not shown).
pub async fn drop_queue(req: HttpRequest, st: web::Data<AdminState>, id: web::Path<String>) -> HttpResponse {
    guard!(req, st);
    let store = &st.shared.mediator.store;
    match store.get_connection(&id).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return HttpResponse::NotFound()
                .json(json!({"error": "not-found", "reason": format!("no connection {id}")}))
        }
        Err(e) => return store_error(e),
    }
    let dropped = match store.drop_queue(&id).await {
        Ok(n) => n,
        Err(e) => return store_error(e),
    };
    let body = json!({"id": id.as_str(), "dropped": dropped});
    audit(&req, &st, "drop-queue", Some(&id), &body);
    HttpResponse::Ok().json(body)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MediationChange {
    state: String,
}

/// `POST /connections/{id}/mediation` with `{"state": "denied"}`: revokes mediation. Its
/// routing keys go with the state, in one store step (forwards to them get 404 from then on),
/// keylist-update and pickup get problem reports, a new mediate-request is denied, and its
/// sessions close on every node.
pub async fn set_mediation(
    req: HttpRequest,
    st: web::Data<AdminState>,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    guard!(req, st);
    let change: MediationChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": "bad-request", "reason": format!("expected {{\"state\": \"denied\"}}: {e}")}))
        }
    };
    if change.state != "denied" {
        return HttpResponse::BadRequest().json(json!({"error": "bad-request", "reason": format!("state {:?} cannot be set by an operator: only \"denied\"", change.state)}));
    }
    // One store step: the state and the keys change together, under the connection's enqueue
    // lock. A forward decided before it was queued before it; every later one finds no route
    // (404), on every node, whatever its route cache holds. A failure (503) is all or
    // nothing: never a denied connection that still takes forwards; trying again is safe.
    let removed = match st.shared.mediator.store.revoke_mediation(&id, now_ms()).await {
        Ok(Some(keys)) => keys.len(),
        Ok(None) => {
            return HttpResponse::NotFound()
                .json(json!({"error": "not-found", "reason": format!("no connection {id}")}))
        }
        Err(e) => return store_error(e),
    };
    let (here, peers) = close_everywhere(&st, &id, "mediation revoked by the mediator's operator").await;
    let body = json!({
        "id": id.as_str(),
        "mediation": "denied",
        "routing_keys_removed": removed,
        "sessions_closed_here": here,
        "close_requested_on": peers,
    });
    audit(&req, &st, "revoke-mediation", Some(&id), &body);
    HttpResponse::Ok().json(body)
}

/// The drain state for `/status`.
pub async fn drain_json(st: &AdminState) -> Value {
    let since = st.drained_at_ms.load(Ordering::SeqCst);
    let draining = st.shared.draining.load(Ordering::SeqCst);
    let sessions = st.shared.registry.send(Count).await.unwrap_or(0);
    let sockets = st.shared.open_sockets.load(Ordering::Relaxed);
    json!({
        "draining": draining,
        "since_ms": if since > 0 { Some(since) } else { None },
        "sessions": sessions,
        "open_sockets": sockets,
        "empty": draining && sessions == 0 && sockets == 0,
    })
}

/// `POST /drain`: not ready on `/ready`, no new WebSockets, every WebSocket closed with 1001
/// (wallets reconnect through the load balancer to another node); requests in flight and
/// HTTP POSTs are still answered. `/status` `drain.empty` says when no session is left and the
/// closed sessions' leases are given back (each socket's slot is held until then).
pub async fn drain(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    guard!(req, st);
    let was = st.shared.draining.swap(true, Ordering::SeqCst);
    if !was {
        st.drained_at_ms.store(now_ms(), Ordering::SeqCst);
    }
    let closed = st
        .shared
        .registry
        .send(CloseAll {
            code: 1001,
            reason: "mediator node draining: reconnect".into(),
            for_good: false,
        })
        .await
        .unwrap_or(0);
    let mut body = drain_json(&st).await;
    body["sessions_closed"] = json!(closed);
    audit(&req, &st, "drain", None, &body);
    HttpResponse::Ok().json(body)
}

/// `POST /undrain`: ready again, accepts sessions again; `409` once the node is stopping (an
/// undrain then reopened a node on its way down: sessions bound on it were dropped unclosed).
pub async fn undrain(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    guard!(req, st);
    let stopping = || HttpResponse::Conflict().json(json!({"error": "the node is stopping: it cannot be undrained"}));
    if st.shared.stopping.load(Ordering::SeqCst) {
        return stopping();
    }
    st.shared.draining.store(false, Ordering::SeqCst);
    // The stop sets `stopping` before `draining`: one that began since the check above is
    // seen here, and its draining kept (its registry close is for good either way).
    if st.shared.stopping.load(Ordering::SeqCst) {
        st.shared.draining.store(true, Ordering::SeqCst);
        return stopping();
    }
    st.drained_at_ms.store(0, Ordering::SeqCst);
    let _ = st.shared.registry.send(OpenAgain).await;
    let body = drain_json(&st).await;
    audit(&req, &st, "undrain", None, &body);
    HttpResponse::Ok().json(body)
}
