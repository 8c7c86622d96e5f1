//! The admin listener: health, readiness, status of the node and the cluster, sessions,
//! connections, fresh invitations, Prometheus metrics.
//!
//! A bearer token (`[admin] token`) guards every route but `/health`, `/ready` and the status
//! page `/` (whose data calls are guarded) when set;
//! the config refuses an admin address off loopback without one. Without a token, every route
//! answers only requests naming a loopback host, sent by no page of another origin and
//! through no proxy ([`loopback`]). The listener's server, with its slow-client protection
//! and connection cap, is [`serve`]'s.

pub mod history;
pub mod loopback;
pub mod page;
mod server;

pub use server::{serve, MIN_CLIENT_TIMEOUT};

use crate::protocols::now_ms;
use crate::registry::{Count, ListSessions};
use crate::session::Shared;
use actix_web::{web, HttpMessage as _, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct AdminState {
    pub shared: Arc<Shared>,
    pub ready: Arc<AtomicBool>,
    pub started: Instant,
    pub addr: SocketAddr,
    pub reloader: Arc<crate::node::Reloader>,
    /// When an operator drained the node (`POST /drain`); 0 when not drained.
    pub drained_at_ms: AtomicI64,
    /// Rates of the last hour (see [`history`]).
    pub history: Arc<history::History>,
    /// The store's health as `/ready` last asked it, and when (see [`READY_HEALTH_KEPT`]).
    ready_health: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// How many audit lines of refused (401) operator actions may be written now.
    refused_audit: ops::RefusedAudit,
    /// How many lines of requests a tokenless listener refused (403, [`loopback`]) may be
    /// written now: a budget of its own, so a page looping cross-site requests does not take
    /// the 401 audit lines' one.
    refused_loopback: ops::RefusedAudit,
}

/// How long `/ready` answers the store's health from its last check. `/ready` takes no token
/// (load balancers probe it), and on PostgreSQL a health check is a statement on a connection
/// of the pool that forwards use: without this, a flood of probes would take the pool from
/// them. Concurrent probes wait for the one check under way.
pub const READY_HEALTH_KEPT: std::time::Duration = std::time::Duration::from_secs(1);

impl AdminState {
    pub fn new(
        shared: Arc<Shared>,
        ready: Arc<AtomicBool>,
        addr: SocketAddr,
        reloader: Arc<crate::node::Reloader>,
    ) -> AdminState {
        AdminState {
            shared,
            ready,
            started: Instant::now(),
            addr,
            reloader,
            drained_at_ms: AtomicI64::new(0),
            history: Arc::new(history::History::default()),
            ready_health: tokio::sync::Mutex::new(None),
            refused_audit: ops::RefusedAudit::default(),
            refused_loopback: ops::RefusedAudit::default(),
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig, st: Arc<AdminState>) {
    cfg.app_data(web::Data::from(st)).service(
        web::scope("")
            .wrap(actix_web::middleware::from_fn(loopback::guard))
            .configure(routes),
    );
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(page::index))
        .route("/health", web::get().to(health))
        .route("/ready", web::get().to(ready))
        .route("/status", web::get().to(status))
        .route("/cluster", web::get().to(cluster))
        .route("/sessions", web::get().to(sessions))
        .route("/connections", web::get().to(connections))
        .route("/connections/{id}", web::get().to(connection))
        .route("/connections/{id}", web::delete().to(ops::delete_connection))
        .route("/connections/{id}/queue", web::delete().to(ops::drop_queue))
        .route("/connections/{id}/mediation", web::post().to(ops::set_mediation))
        .route("/history", web::get().to(history_view))
        .route("/drain", web::post().to(ops::drain))
        .route("/undrain", web::post().to(ops::undrain))
        .route("/invitations", web::post().to(ops::new_invitation))
        .route("/reload", web::post().to(ops::reload))
        .route("/metrics", web::get().to(metrics));
}

/// The admin token in force for one request, as [`loopback::guard`] read it when the request
/// came in (kept in the request's extensions). Every check of the request uses this one
/// reading: read again, a reload between the guard and the handler that removed the token
/// would let the request through with neither check (the guard skipped the loopback checks
/// for the token, the handler then found no token to ask for).
#[derive(Clone)]
struct RequestToken(Option<String>);

/// The admin token in force for `req`: the guard's reading ([`RequestToken`]); read now only
/// for a request the guard did not see (none: it wraps every route).
fn request_token(req: &HttpRequest, st: &AdminState) -> Option<String> {
    match req.extensions().get::<RequestToken>() {
        Some(RequestToken(t)) => t.clone(),
        None => st.reloader.admin_token(),
    }
}

/// `None` when the request may proceed, else the 401 to send (counted in
/// `mailroom_rejected_total{reason="admin-unauthorized"}`: someone trying tokens shows there,
/// on reads as on operator actions).
fn unauthorized(req: &HttpRequest, st: &AdminState) -> Option<HttpResponse> {
    // The token in force when the request came in: a reload may have replaced the start's.
    let token = request_token(req, st)?;
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    if given.is_some_and(|g| same_secret(g, &token)) {
        None
    } else {
        st.shared.metrics.rejected("admin-unauthorized", "unknown");
        Some(
            HttpResponse::Unauthorized()
                .insert_header(("WWW-Authenticate", "Bearer"))
                .json(json!({"error": "unauthorized", "reason": "a valid bearer token is required"})),
        )
    }
}

/// The credentials of an `Authorization: Bearer <token>` header (the scheme in any case,
/// RFC 7235).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

/// Whether `given` is `secret`, compared in time that depends on neither (their SHA-256
/// digests, compared whole): not even the secret's length shows.
fn same_secret(given: &str, secret: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(secret.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

macro_rules! guard {
    ($req:expr, $st:expr) => {
        if let Some(r) = unauthorized(&$req, &$st) {
            return r;
        }
    };
}

mod ops;
pub use ops::OPERATOR_CLOSE_CODE;

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn ready(st: web::Data<AdminState>) -> HttpResponse {
    let store_ok = {
        let mut kept = st.ready_health.lock().await;
        match *kept {
            Some((at, ok)) if at.elapsed() < READY_HEALTH_KEPT => ok,
            _ => {
                let ok = st.shared.mediator.store.health().await.is_ok();
                *kept = Some((Instant::now(), ok));
                ok
            }
        }
    };
    let listening = st.ready.load(Ordering::SeqCst);
    let cluster_ok = st
        .shared
        .cluster
        .as_ref()
        .map(|c| c.handshake_attempted())
        .unwrap_or(true);
    // Draining (an operator's `POST /drain`, or shutdown): the load balancer must stop
    // sending wallets here.
    let draining = st.shared.draining.load(Ordering::SeqCst);
    let ok = store_ok && listening && cluster_ok && !draining;
    let body = json!({"ready": ok, "store": store_ok, "listeners": listening, "cluster_handshake_attempted": cluster_ok, "draining": draining});
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn status_json(st: &AdminState) -> Value {
    let sh = &st.shared;
    let sessions = sh.registry.send(Count).await.unwrap_or(0);
    let store = &sh.mediator.store;
    let (queued, store_health) = match (store.total_queued().await, store.health().await) {
        (Ok(q), Ok(())) => (json!(q), json!("ok")),
        (q, h) => (
            json!(q.ok()),
            json!(h.err().map(|e| e.to_string()).unwrap_or_else(|| "ok".into())),
        ),
    };
    // The queue on this node's disk (sled), with the damage found there: null on PostgreSQL.
    let queue_log = store.queue_log().await.ok().flatten();
    let peers: Value = match &sh.cluster {
        Some(c) => serde_json::to_value(c.peers()).unwrap_or(json!([])),
        None => json!([]),
    };
    json!({
        "node": sh.mediator.node_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": st.started.elapsed().as_secs(),
        "public_url": sh.mediator.public_url,
        "strategy": format!("{:?}", sh.mediator.strategy),
        "peers": peers,
        "sessions": sessions,
        "open_sockets": sh.open_sockets.load(Ordering::Relaxed),
        "queued": queued,
        "store": {
            "backend": store.backend(),
            "health": store_health,
            "queue_log": queue_log,
            // The run before this one on the store ended without its stop (null: not tracked).
            "previous_run_unfinished": sh.previous_run.get().copied().flatten(),
        },
        "push": push_json(sh),
        "drain": ops::drain_json(st).await,
    })
}

/// Push notifications of this node: whether they are on, and the counters since start.
fn push_json(sh: &crate::session::Shared) -> Value {
    let m = &sh.metrics.push;
    let by_result = |result: &str| -> u64 {
        ["fcm", "apns", "webhook"]
            .iter()
            .map(|p| {
                m.total
                    .get_or_create(&crate::push::ProviderResult {
                        provider: (*p).into(),
                        result: result.into(),
                    })
                    .get()
            })
            .sum()
    };
    json!({
        "enabled": sh.push.get().is_some(),
        "sent": { "fcm": m.sent("fcm"), "apns": m.sent("apns"), "webhook": m.sent("webhook") },
        "failed": by_result("failed") + by_result("gave_up"),
        "retried": by_result("retry"),
        "coalesced": m.coalesced.get(),
        "dropped_tokens": m.dropped_tokens.get(),
    })
}

async fn status(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    guard!(req, st);
    HttpResponse::Ok().json(status_json(&st).await)
}

#[derive(serde::Deserialize)]
struct ClusterQuery {
    /// `false`: sessions per node instead of the directory's every entry (the status page,
    /// polling every 2 s, needs only the counts; a directory holds up to `max_sessions`
    /// entries per node).
    directory: Option<bool>,
}

async fn cluster(req: HttpRequest, st: web::Data<AdminState>, q: web::Query<ClusterQuery>) -> HttpResponse {
    guard!(req, st);
    let me = status_json(&st).await;
    let cluster = st.shared.cluster.as_ref().map(|c| {
        if q.directory == Some(false) {
            json!({
                "node": st.shared.mediator.node_id,
                "peers": c.peers(),
                "sessions_per_node": c.sessions_per_node(),
                "counters": c.counters(),
            })
        } else {
            serde_json::to_value(c.status()).unwrap_or(Value::Null)
        }
    });
    HttpResponse::Ok().json(json!({ "node": st.shared.mediator.node_id, "self": me, "cluster": cluster }))
}

async fn sessions(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    guard!(req, st);
    let list = st.shared.registry.send(ListSessions).await.unwrap_or_default();
    HttpResponse::Ok().json(json!({ "node": st.shared.mediator.node_id, "sessions": list }))
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

async fn connection_json(st: &AdminState, c: &crate::store::Connection) -> Value {
    let store = &st.shared.mediator.store;
    let keys = store.keys_of(&c.id).await.unwrap_or_default();
    let now = now_ms();
    let q = store.queue_stats(&c.id, now).await.ok();
    let device = store.device_of(&c.id).await.ok().flatten();
    json!({
        "id": c.id,
        "state": c.state,
        "protocol": c.protocol,
        "label": c.label,
        "their_did": c.their_did,
        "their_endpoints": c.their_endpoints,
        "mediation": format!("{:?}", c.mediation).to_lowercase(),
        "routing_keys": keys,
        "queue": q.map(|q| json!({
            "depth": q.pending + q.leased,
            "pending": q.pending,
            "in_flight": q.leased,
            "bytes": q.bytes,
            "oldest_age_ms": q.oldest_received_ms.map(|o| now - o),
        })),
        "created_at_ms": c.created_at_ms,
        // The token wakes the wallet: only its first characters are shown.
        "push": device.map(|d| json!({
            "service": d.service.as_str(),
            "platform": d.platform,
            "token": crate::push::redact(&d.token),
            "updated_at_ms": d.updated_at_ms,
        })),
    })
}

async fn connections(req: HttpRequest, st: web::Data<AdminState>, page: web::Query<Page>) -> HttpResponse {
    guard!(req, st);
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    match st
        .shared
        .mediator
        .store
        .list_connections(page.after.as_deref(), limit)
        .await
    {
        Ok(list) => {
            let mut out = Vec::with_capacity(list.len());
            for c in &list {
                out.push(connection_json(&st, c).await);
            }
            let next = if list.len() == limit {
                list.last().map(|c| c.id.clone())
            } else {
                None
            };
            HttpResponse::Ok().json(json!({ "connections": out, "next": next }))
        }
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "store-unavailable", "reason": e.to_string()}))
        }
    }
}

async fn connection(req: HttpRequest, st: web::Data<AdminState>, id: web::Path<String>) -> HttpResponse {
    guard!(req, st);
    match st.shared.mediator.store.get_connection(&id).await {
        Ok(Some(c)) => HttpResponse::Ok().json(connection_json(&st, &c).await),
        Ok(None) => {
            HttpResponse::NotFound().json(json!({"error": "not-found", "reason": format!("no connection {id}")}))
        }
        Err(e) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "store-unavailable", "reason": e.to_string()}))
        }
    }
}

async fn metrics(req: HttpRequest, st: web::Data<AdminState>) -> HttpResponse {
    guard!(req, st);
    let sh = &st.shared;
    if let Ok(q) = sh.mediator.store.total_queued().await {
        sh.metrics.queue_depth.set(q as i64);
    }
    if let Ok(Some(log)) = sh.mediator.store.queue_log().await {
        let gauge = |n: u64| n.min(i64::MAX as u64) as i64;
        sh.metrics.queue_log_bytes.set(gauge(log.bytes));
        sh.metrics.queue_log_damaged_records.set(gauge(log.damaged_records));
        sh.metrics.queue_log_damaged_segments.set(gauge(log.damaged_segments));
        sh.metrics
            .store_disk_free_bytes
            .set(gauge(log.disk_free_bytes.unwrap_or(0)));
        sh.metrics
            .store_refusing_new_messages
            .set(i64::from(log.refusing_new_messages));
    }
    if let Ok(oldest) = sh.mediator.store.oldest_received_ms().await {
        let age = oldest.map(|o| (now_ms() - o).max(0) as f64 / 1000.0).unwrap_or(0.0);
        sh.metrics.oldest_message_age.set(age);
    }
    if let Some(c) = &sh.cluster {
        let up = c.peers().iter().filter(|p| p.connected).count();
        sh.metrics.peers_up.set(up as i64);
    }
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(sh.metrics.encode())
}

/// Samples this node's counters into its history once a second, for as long as the node runs.
pub fn spawn_history_sampler(st: Arc<AdminState>) {
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let totals = history::Totals::from_metrics_text(&st.shared.metrics.encode());
            st.history.sample(now_ms(), totals);
        }
    });
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// `node`: this node's own history only (what peers ask each other); default: the cluster.
    scope: Option<String>,
}

async fn node_history_json(st: &AdminState) -> Value {
    json!({
        "id": st.shared.mediator.node_id,
        "reachable": true,
        "sessions": st.shared.registry.send(Count).await.unwrap_or(0),
        "drain": ops::drain_json(st).await,
        "history": st.history.snapshot(),
    })
}

/// Where this node reaches a peer's admin listener configured at `admin`: a peer that binds
/// it on every address (`0.0.0.0:9002`, `[::]:9002`) is reached at the address its cluster
/// link is dialed at (`cluster`), on the admin port. Dialed as written, `0.0.0.0` is this
/// machine, not the peer's.
fn peer_admin_addr(admin: &str, cluster: Option<&str>) -> String {
    let unspecified = admin
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified());
    // The cluster address's host, as written: an IP (`[v6]` with its brackets) or a name.
    let host = cluster
        .and_then(|c| c.rsplit_once(':'))
        .map(|(host, _)| host)
        .filter(|h| !h.is_empty() && !matches!(*h, "0.0.0.0" | "[::]"));
    match (unspecified, host, admin.rsplit_once(':')) {
        (true, Some(host), Some((_, port))) => format!("{host}:{port}"),
        _ => admin.to_owned(),
    }
}

/// The path of a node's own history, which peers read ([`cluster::admin_read`]).
///
/// [`cluster::admin_read`]: crate::cluster::admin_read
const NODE_HISTORY: &str = "/history?scope=node";

/// The longest this node waits for a peer's whole history ([`peer_history`]).
const PEER_HISTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A peer's own history from its admin listener, or why it could not be read. The request
/// carries this node's signature ([`crate::cluster::ClusterHandle::sign_admin_read`]), never
/// the admin token: whatever listens at the address configured (over plain http) gets no
/// credential it can replay elsewhere, but can test guesses of the cluster secret offline
/// against the signature, each at Argon2id's cost (`cluster::handshake::ClusterKeys`): a
/// short secret is still found, hence the warning about one. Any
/// answer but a 2xx (a redirect included) is the peer unreachable: a redirect is not
/// followed, or whatever listens there would aim this node's signed read, from inside the
/// cluster's network, at any address it names.
///
/// The whole read, from the connection to the body's last byte, takes at most
/// [`PEER_HISTORY_TIMEOUT`]: awc's own timeout ends at the answer's head, and a peer (or
/// whatever listens at its address) that sent a head and then no body would hold this
/// node's `GET /history` for good.
async fn peer_history(id: &str, admin: &str, cluster: &crate::cluster::ClusterHandle) -> Value {
    let url = format!("http://{admin}{NODE_HISTORY}");
    // (`admin` is where this node reaches the peer's admin listener: [`peer_admin_addr`].)
    let client = awc::Client::builder()
        .timeout(PEER_HISTORY_TIMEOUT)
        .disable_redirects()
        .finish();
    let req = client.get(&url).insert_header((
        crate::cluster::admin_read::HEADER,
        cluster.sign_admin_read(id, NODE_HISTORY),
    ));
    let read = async {
        let mut r = req.send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("HTTP {}", r.status()));
        }
        r.json::<Value>().limit(4 << 20).await.map_err(|e| e.to_string())
    };
    let res = match tokio::time::timeout(PEER_HISTORY_TIMEOUT, read).await {
        Ok(res) => res,
        Err(_) => Err(format!("no whole answer within {PEER_HISTORY_TIMEOUT:?}")),
    };
    match res {
        Ok(v) => v,
        Err(e) => json!({"id": id, "reachable": false, "error": e}),
    }
}

/// Whether `req` is a configured peer's signed read of this node's history.
fn signed_by_peer(req: &HttpRequest, st: &AdminState) -> bool {
    let (Some(c), Some(h)) = (
        &st.shared.cluster,
        req.headers()
            .get(crate::cluster::admin_read::HEADER)
            .and_then(|v| v.to_str().ok()),
    ) else {
        return false;
    };
    let path = req.uri().path_and_query().map_or("", |p| p.as_str());
    path == NODE_HISTORY && c.verify_admin_read(h, path).is_some()
}

/// `GET /history`: rates of the last hour per node and for the cluster, the ten deepest and ten
/// oldest queues with their labels, sessions per node, drain state, links.
async fn history_view(req: HttpRequest, st: web::Data<AdminState>, q: web::Query<HistoryQuery>) -> HttpResponse {
    let node_only = q.scope.as_deref() == Some("node");
    // A peer gathering the cluster's histories signs its read; everyone else shows the token.
    let peer_read = node_only && signed_by_peer(&req, &st);
    if !peer_read {
        guard!(req, st);
    }
    let me = node_history_json(&st).await;
    if node_only {
        return HttpResponse::Ok().json(me);
    }
    let sh = &st.shared;
    let nodes = st.reloader.live().nodes;
    let fetched =
        match &sh.cluster {
            Some(c) => {
                let peers = nodes.iter().filter(|n| n.id != sh.mediator.node_id);
                futures_util::future::join_all(peers.map(|n| async move {
                    peer_history(&n.id, &peer_admin_addr(&n.admin, n.cluster.as_deref()), c).await
                }))
                .await
            }
            None => Vec::new(),
        };
    let mut nodes = vec![me];
    nodes.extend(fetched);
    let parsed: Vec<history::NodeHistory> = nodes
        .iter()
        .filter_map(|n| serde_json::from_value(n["history"].clone()).ok())
        .collect();
    let cluster = history::sum(&parsed.iter().collect::<Vec<_>>());
    let store = &sh.mediator.store;
    let now = now_ms();
    let queues = match store.top_queues(10).await {
        Ok(top) => {
            let mut labels = std::collections::HashMap::new();
            for s in top.deepest.iter().chain(&top.oldest) {
                if !labels.contains_key(&s.connection) {
                    let l = store
                        .get_connection(&s.connection)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|c| c.label);
                    labels.insert(s.connection.clone(), l);
                }
            }
            let show = |v: &Vec<crate::store::QueueSummary>| -> Vec<Value> {
                v.iter()
                    .map(|s| {
                        json!({
                            "connection": s.connection,
                            "label": labels.get(&s.connection).cloned().flatten(),
                            "depth": s.depth,
                            "oldest_age_ms": s.oldest_received_ms.map(|o| (now - o).max(0)),
                        })
                    })
                    .collect()
            };
            json!({"deepest": show(&top.deepest), "oldest": show(&top.oldest)})
        }
        Err(e) => json!({"error": e.to_string()}),
    };
    let links = sh
        .cluster
        .as_ref()
        .map(|c| serde_json::to_value(c.peers()).unwrap_or(json!([])))
        .unwrap_or(json!([]));
    HttpResponse::Ok().json(json!({
        "node": sh.mediator.node_id,
        "nodes": nodes,
        "cluster": cluster,
        "queues": queues,
        "links": links,
    }))
}

#[cfg(test)]
mod tests {
    use super::peer_admin_addr;

    #[test]
    fn a_peers_admin_bound_on_every_address_is_reached_where_its_link_is() {
        assert_eq!(peer_admin_addr("0.0.0.0:9002", Some("10.0.0.2:7002")), "10.0.0.2:9002");
        assert_eq!(peer_admin_addr("[::]:9002", Some("[fd00::2]:7002")), "[fd00::2]:9002");
        // As written otherwise.
        assert_eq!(peer_admin_addr("10.0.0.9:9002", Some("10.0.0.2:7002")), "10.0.0.9:9002");
        assert_eq!(peer_admin_addr("0.0.0.0:9002", Some("0.0.0.0:7002")), "0.0.0.0:9002");
        assert_eq!(peer_admin_addr("0.0.0.0:9002", None), "0.0.0.0:9002");
        // A name, as in a container network.
        assert_eq!(
            peer_admin_addr("0.0.0.0:9002", Some("mailroom-2:7002")),
            "mailroom-2:9002"
        );
    }
}
