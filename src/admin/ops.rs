//! Operator actions on the admin listener (issue 11): remove a connection everywhere in the
//! cluster, drop its queue, revoke its mediation, drain and undrain the node, mint an
//! invitation, reload the config.
//!
//! Every action writes one audit line (tracing target `mailroom::audit`) whatever it answers,
//! a refusal (401 without the token), a failure (404, 400, 415, 503) or a success: who (the
//! token's label when a token guards the listener, else the peer address; `unauthenticated`
//! on a 401), what, on which connection, the status, the outcome and when. Each action is
//! written as a function of the state that returns its [`Outcome`]; [`operator`] checks the
//! token, runs it and writes the line, so no return path can skip it.

use super::{unauthorized, AdminState};
use crate::protocols::{now_ms, oob};
use crate::registry::{CloseAll, CloseConn, Count, OpenAgain};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage as _, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// WebSocket close code for sessions an operator action ends (1008: policy violation; the
/// wallet must not simply reconnect and carry on).
pub const OPERATOR_CLOSE_CODE: u16 = 1008;

/// What an operator action answered: its status and JSON body, as its audit line records them.
pub struct Outcome {
    status: StatusCode,
    body: Value,
    /// What the audit line records instead of `body`, when the body holds what a log must not
    /// (a fresh invitation: whoever reads it can connect).
    logged: Option<Value>,
}

impl Outcome {
    fn ok(body: Value) -> Outcome {
        Outcome::new(StatusCode::OK, body)
    }

    fn new(status: StatusCode, body: Value) -> Outcome {
        Outcome {
            status,
            body,
            logged: None,
        }
    }

    /// An answer `{"error": error, "reason": reason}`.
    fn refused(status: StatusCode, error: &str, reason: impl std::fmt::Display) -> Outcome {
        Outcome::new(status, json!({"error": error, "reason": reason.to_string()}))
    }

    fn not_found(id: &str) -> Outcome {
        Outcome::refused(StatusCode::NOT_FOUND, "not-found", format!("no connection {id}"))
    }
}

/// Runs the operator action `action` (on `connection`, if it acts on one): 401 without the
/// listener's token, else what `act` answers. Either way it writes the action's audit line:
/// a refused or failed action is an operator's act too, and a run of 401s is someone trying
/// tokens. `act` is not polled before the token is checked.
async fn operator(
    req: &HttpRequest,
    st: &AdminState,
    action: &str,
    connection: Option<&str>,
    act: impl Future<Output = Outcome>,
) -> HttpResponse {
    if let Some(refused) = unauthorized(req, st) {
        if let Some(not_written) = st.refused_audit.admit(std::time::Instant::now()) {
            let mut outcome = json!({"error": "unauthorized"});
            if not_written > 0 {
                outcome["refused_not_written_before"] = json!(not_written);
            }
            audit(req, st, false, action, connection, StatusCode::UNAUTHORIZED, &outcome);
        }
        return refused;
    }
    let outcome = act.await;
    let logged = outcome.logged.as_ref().unwrap_or(&outcome.body);
    audit(req, st, true, action, connection, outcome.status, logged);
    HttpResponse::build(outcome.status).json(outcome.body)
}

/// Audit lines of refused (401) actions written at most: a burst of this many, then one a
/// second ([`RefusedAudit`]).
const REFUSED_AUDIT_BURST: u32 = 20;
const REFUSED_AUDIT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The budget of audit lines for refused actions. Anyone who reaches the admin listener can
/// send 401s as fast as it answers them, and each wrote a line: a loop of wrong tokens filled
/// the node's log (and its disk) at thousands of lines a second. Lines beyond the budget are
/// counted, and the next line written says how many were not (`refused_not_written_before`);
/// every refusal also counts in `mailroom_rejected_total{reason="admin-unauthorized"}`
/// ([`super::unauthorized`]).
/// Actions that showed the token are always written.
#[derive(Default)]
pub(super) struct RefusedAudit(parking_lot::Mutex<RefusedBudget>);

#[derive(Default)]
struct RefusedBudget {
    /// Lines written at once from here: refilled one per [`REFUSED_AUDIT_EVERY`] since `at`.
    spent: u32,
    at: Option<std::time::Instant>,
    not_written: u64,
}

impl RefusedAudit {
    /// Whether a refused action's line is written at `now`: `Some(lines not written since the
    /// last one)`, or `None` (counted).
    pub(super) fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut b = self.0.lock();
        let at = *b.at.get_or_insert(now);
        let refilled = (now.saturating_duration_since(at).as_millis() / REFUSED_AUDIT_EVERY.as_millis()) as u32;
        if refilled > 0 {
            b.spent = b.spent.saturating_sub(refilled);
            b.at = Some(at + REFUSED_AUDIT_EVERY * refilled);
        }
        if b.spent >= REFUSED_AUDIT_BURST {
            b.not_written += 1;
            return None;
        }
        b.spent += 1;
        Some(std::mem::take(&mut b.not_written))
    }
}

/// Who acts: the token's label when a token guards the listener, else the peer address; one
/// who showed no valid token is `unauthenticated`, whatever the listener's token.
fn who(req: &HttpRequest, st: &AdminState, authenticated: bool) -> String {
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    if !authenticated {
        return format!("unauthenticated ({peer})");
    }
    let admin = st.reloader.live().admin;
    match admin.token.filter(|t| !t.is_empty()) {
        Some(_) => format!("{} ({peer})", admin.token_label.as_deref().unwrap_or("admin-token")),
        None => peer,
    }
}

fn audit(
    req: &HttpRequest,
    st: &AdminState,
    authenticated: bool,
    action: &str,
    connection: Option<&str>,
    status: StatusCode,
    outcome: &Value,
) {
    tracing::info!(
        target: "mailroom::audit",
        who = %who(req, st, authenticated),
        action,
        connection = connection.unwrap_or("-"),
        status = status.as_u16(),
        outcome = %outcome,
        at_ms = now_ms(),
        node = %st.shared.mediator.node_id,
        "operator action"
    );
}

fn store_error(e: crate::store::StoreError) -> Outcome {
    match e {
        crate::store::StoreError::Invalid(r) => Outcome::refused(StatusCode::BAD_REQUEST, "bad-request", r),
        e => Outcome::refused(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", e),
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
    operator(&req, &st, "delete-connection", Some(&id), remove_connection(&st, &id)).await
}

async fn remove_connection(st: &AdminState, id: &str) -> Outcome {
    let removed = match st.shared.mediator.store.delete_connection(id).await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    // After the store: a session that reconnects meanwhile finds no connection any more.
    let (here, peers) = close_everywhere(st, id, "connection removed by the mediator's operator").await;
    Outcome::ok(json!({
        "id": id,
        "removed": removed,
        "sessions_closed_here": here,
        "close_requested_on": peers,
    }))
}

/// `DELETE /connections/{id}/queue`: drops its queued messages (counted, not shown), and
/// closes its sessions on every node: a live session holds what was handed to it (leased to
/// its node, written once the wallet acknowledges what it has) and would still deliver it,
/// the message an operator drops being most often the one the wallet cannot take. The wallet
/// reconnects to the queue as dropped.
pub async fn drop_queue(req: HttpRequest, st: web::Data<AdminState>, id: web::Path<String>) -> HttpResponse {
    operator(&req, &st, "drop-queue", Some(&id), empty_queue(&st, &id)).await
}

async fn empty_queue(st: &AdminState, id: &str) -> Outcome {
    let store = &st.shared.mediator.store;
    match store.get_connection(id).await {
        Ok(Some(_)) => {}
        Ok(None) => return Outcome::not_found(id),
        Err(e) => return store_error(e),
    }
    let dropped = match store.drop_queue(id).await {
        Ok(dropped) => dropped,
        Err(e) => return store_error(e),
    };
    let (here, peers) = close_everywhere(st, id, "queue dropped by the mediator's operator").await;
    Outcome::ok(json!({
        "id": id,
        "dropped": dropped,
        "sessions_closed_here": here,
        "close_requested_on": peers,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MediationChange {
    state: String,
}

/// `POST /connections/{id}/mediation` with `{"state": "denied"}` (as `application/json`):
/// revokes mediation. Its routing keys go with the state, in one store step (forwards to them
/// get 404 from then on), keylist-update and pickup get problem reports, a new mediate-request
/// is denied, and its sessions close on every node.
pub async fn set_mediation(
    req: HttpRequest,
    st: web::Data<AdminState>,
    id: web::Path<String>,
    body: web::Payload,
) -> HttpResponse {
    let json = req.content_type().eq_ignore_ascii_case("application/json");
    let act = async {
        match action_body(&st, body).await {
            Ok(body) => revoke(&st, &id, json, &body).await,
            Err(refused) => refused,
        }
    };
    operator(&req, &st, "revoke-mediation", Some(&id), act).await
}

/// Bytes an operator action's body may hold (`{"state": "denied"}`, `{"multi_use": true}`).
const ACTION_BODY_MAX: usize = 4096;

/// Reads an operator action's body, once [`operator`] checked the token (the action's future is
/// not polled before): whole within [`super::MIN_CLIENT_TIMEOUT`] (or `limits.client_timeout_ms`
/// when longer), at most [`ACTION_BODY_MAX`] bytes. Before, the handlers took the body as an
/// extractor, read before the handler ran: anyone who reached the listener could send a head
/// declaring a body and never send it, and hold one of its connections for as long as they
/// liked; the listener's 256 held that way, `/health` and `/ready` went unanswered and the
/// load balancer or orchestrator took the node out.
async fn action_body(st: &AdminState, body: web::Payload) -> Result<web::Bytes, Outcome> {
    let limit = Duration::from_millis(st.shared.cfg.limits.client_timeout_ms).max(super::MIN_CLIENT_TIMEOUT);
    match tokio::time::timeout(limit, body.to_bytes_limited(ACTION_BODY_MAX)).await {
        Ok(Ok(Ok(bytes))) => Ok(bytes),
        Ok(Ok(Err(_))) => Err(Outcome::refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("an operator action's body is at most {ACTION_BODY_MAX} bytes"),
        )),
        Ok(Err(e)) => Err(Outcome::refused(StatusCode::BAD_REQUEST, "bad-request", e)),
        Err(_) => Err(Outcome::refused(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            format!(
                "the body was not whole within {} ms of the request's head",
                limit.as_millis()
            ),
        )),
    }
}

/// The revocation `body` asks for; `json`: whether it came as `application/json`. Anything
/// else is refused (415): a web page can send a form or `text/plain` to another origin
/// without asking, but JSON only after a CORS preflight the admin never answers.
async fn revoke(st: &AdminState, id: &str, json: bool, body: &[u8]) -> Outcome {
    if !json {
        return Outcome::refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send {\"state\": \"denied\"} as Content-Type: application/json",
        );
    }
    let change: MediationChange = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::refused(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("expected {{\"state\": \"denied\"}}: {e}"),
            )
        }
    };
    if change.state != "denied" {
        return Outcome::refused(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("state {:?} cannot be set by an operator: only \"denied\"", change.state),
        );
    }
    // One store step: the state and the keys change together, under the connection's enqueue
    // lock. A forward decided before it was queued before it; every later one finds no route
    // (404), on every node, whatever its route cache holds. A failure (503) is all or
    // nothing: never a denied connection that still takes forwards; trying again is safe.
    let removed = match st.shared.mediator.store.revoke_mediation(id, now_ms()).await {
        Ok(Some(keys)) => keys.len(),
        Ok(None) => return Outcome::not_found(id),
        Err(e) => return store_error(e),
    };
    let (here, peers) = close_everywhere(st, id, "mediation revoked by the mediator's operator").await;
    Outcome::ok(json!({
        "id": id,
        "mediation": "denied",
        "routing_keys_removed": removed,
        "sessions_closed_here": here,
        "close_requested_on": peers,
    }))
}

/// The drain state for `/status`. `empty` once nothing waits on the node: no session, no
/// socket (each holds its slot until its leases are given back), no HTTP request being
/// answered, and nothing its HTTP pickups delivered still leased awaiting acknowledgement
/// (`http_leases_held`, read in the store only while draining; see
/// [`crate::session::HttpLeases`]).
pub async fn drain_json(st: &AdminState) -> Value {
    let since = st.drained_at_ms.load(Ordering::SeqCst);
    let draining = st.shared.draining.load(Ordering::SeqCst);
    let sessions = st.shared.registry.send(Count).await.unwrap_or(0);
    let sockets = st.shared.open_sockets.load(Ordering::Relaxed);
    let http = &st.shared.http_leases;
    let http_requests = http.requests();
    let http_held = if draining {
        Some(http.held(st.shared.mediator.store.as_ref(), now_ms()).await)
    } else {
        None
    };
    json!({
        "draining": draining,
        "since_ms": if since > 0 { Some(since) } else { None },
        "sessions": sessions,
        "open_sockets": sockets,
        "http_requests": http_requests,
        "http_leases_held": http_held,
        "empty": draining && sessions == 0 && sockets == 0 && http_held == Some(false),
    })
}

/// `POST /drain`: not ready on `/ready`, no new WebSockets, every WebSocket closed with 1001
/// (wallets reconnect through the load balancer to another node); requests in flight and
/// HTTP POSTs are still answered. `/status` `drain.empty` says when no session is left, the
/// closed sessions' leases are given back (each socket's slot is held until then), and what
/// HTTP pickups here delivered is acknowledged or its lease ran out.
pub async fn drain(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    operator(&req, &st, "drain", None, drain_now(&st)).await
}

async fn drain_now(st: &AdminState) -> Outcome {
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
    let mut body = drain_json(st).await;
    body["sessions_closed"] = json!(closed);
    Outcome::ok(body)
}

/// `POST /undrain`: ready again, accepts sessions again; `409` once the node is stopping (an
/// undrain then reopened a node on its way down: sessions bound on it were dropped unclosed).
pub async fn undrain(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    operator(&req, &st, "undrain", None, undrain_now(&st)).await
}

async fn undrain_now(st: &AdminState) -> Outcome {
    let stopping = || {
        Outcome::new(
            StatusCode::CONFLICT,
            json!({"error": "the node is stopping: it cannot be undrained"}),
        )
    };
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
    Outcome::ok(drain_json(st).await)
}

#[derive(Deserialize, Default)]
struct NewInvitation {
    /// Multi-use invitations admit any number of connections; single-use (the default) one.
    #[serde(default)]
    multi_use: bool,
}

/// `POST /invitations`: a fresh out-of-band invitation, single-use unless the body asks
/// `{"multi_use": true}`.
pub async fn new_invitation(req: HttpRequest, st: web::Data<AdminState>, body: web::Payload) -> HttpResponse {
    let act = async {
        match action_body(&st, body).await {
            Ok(body) => mint_invitation(&st, &body).await,
            Err(refused) => refused,
        }
    };
    operator(&req, &st, "create-invitation", None, act).await
}

/// The invitation goes in the answer only: its audit line names its id, not its URL (whoever
/// reads the log could otherwise take a single-use invitation first).
async fn mint_invitation(st: &AdminState, body: &[u8]) -> Outcome {
    let opts: NewInvitation = if body.is_empty() {
        NewInvitation::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(o) => o,
            Err(e) => return Outcome::refused(StatusCode::BAD_REQUEST, "bad-request", e),
        }
    };
    let m = &st.shared.mediator;
    let id = uuid::Uuid::new_v4().to_string();
    if let Err(e) = m.store.put_invitation(&id, !opts.multi_use, now_ms()).await {
        return Outcome::refused(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", e);
    }
    let inv = oob::invitation(m, &id);
    let mut outcome = Outcome::new(
        StatusCode::CREATED,
        json!({
            "invitation_url": oob::invitation_url(m, &inv),
            "invitation": inv,
            "multi_use": opts.multi_use,
        }),
    );
    outcome.logged = Some(json!({"invitation": id, "multi_use": opts.multi_use}));
    outcome
}

/// `POST /reload`: re-reads the peer list from the config file (as SIGHUP does).
pub async fn reload(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    operator(&req, &st, "reload", None, reload_now(&st)).await
}

async fn reload_now(st: &AdminState) -> Outcome {
    // It reads the file (and the push credentials): off the admin listener's only worker.
    let reloader = st.reloader.clone();
    let res = web::block(move || reloader.reload()).await;
    match res.map_err(|e| anyhow::anyhow!("{e}")).and_then(|r| r) {
        Ok(r) => Outcome::ok(json!({
            "reloaded": true,
            "peers": r.peers,
            "secret_changed": r.secret_changed,
            "admin_token_changed": r.admin_token_changed,
            "restart_needed": r.restart_needed,
        })),
        Err(e) => Outcome::refused(StatusCode::BAD_REQUEST, "reload-refused", format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn refused_actions_are_written_in_a_burst_then_one_a_second_and_the_rest_counted() {
        let audit = RefusedAudit::default();
        let t0 = Instant::now();
        for i in 0..REFUSED_AUDIT_BURST {
            assert_eq!(audit.admit(t0), Some(0), "line {i} of the burst");
        }
        for _ in 0..10 {
            assert_eq!(audit.admit(t0 + Duration::from_millis(999)), None);
        }
        // A second on: one line, which says how many were not written.
        assert_eq!(audit.admit(t0 + Duration::from_secs(1)), Some(10));
        assert_eq!(audit.admit(t0 + Duration::from_millis(1_500)), None);
        assert_eq!(audit.admit(t0 + Duration::from_secs(2)), Some(1));
        // Quiet for a while: a whole burst again.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..REFUSED_AUDIT_BURST {
            assert_eq!(audit.admit(later), Some(0));
        }
        assert_eq!(audit.admit(later), None);
    }
}
