//! A lease that lands after its session closed: the session's end gives its leases back
//! (`release_owner`), but a lease still in flight then (a drain's, or a request's) may take the
//! message again for the gone socket, where it would stay until the lease ran out. A store
//! wrapper holds one session's lease until that release has happened (or until the test opens
//! it), so the race is played every time. Also: a socket rebound to another connection while
//! it holds or leases messages of the first, and a request's lease whose answer never reached
//! its session (stopped first, at a write stall).

mod common;

use async_trait::async_trait;
use common::cluster::live_socket;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsClient};
use mailroom::config::Strategy;
use mailroom::node;
use mailroom::store::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// The node's store, except that once armed, the next `lease` waits for a `release_owner` (or
/// for the test to open the gate: `gate.released`).
struct GatedLeases {
    inner: Arc<dyn Store>,
    armed: AtomicBool,
    gate: Arc<Gate>,
    /// Once set, `release_owner` waits for `gate.release_gate` (and says it started).
    hold_releases: AtomicBool,
}

#[derive(Default)]
struct Gate {
    released: Notify,
    release_started: Notify,
    /// Held releases wait until the test opens it (then every one goes on).
    release_gate: Notify,
    release_open: AtomicBool,
    gated_lease_started: Notify,
    gated_lease_done: Notify,
}

#[async_trait]
impl Store for GatedLeases {
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return self
                .inner
                .lease_upto(conn, max, max_bytes, owner, now_ms, until_ms)
                .await;
        }
        // Like the real stores (a thread of their own), the held lease happens whether or not
        // its caller still waits for it.
        let (gate, inner) = (self.gate.clone(), self.inner.clone());
        let (conn, owner) = (conn.to_owned(), owner.to_owned());
        gate.gated_lease_started.notify_one();
        tokio::spawn(async move {
            gate.released.notified().await;
            let r = inner.lease_upto(&conn, max, max_bytes, &owner, now_ms, until_ms).await;
            gate.gated_lease_done.notify_one();
            r
        })
        .await
        .expect("held lease")
    }
    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        if self.hold_releases.load(Ordering::SeqCst) {
            self.gate.release_started.notify_one();
            loop {
                let opened = self.gate.release_gate.notified();
                tokio::pin!(opened);
                opened.as_mut().enable();
                if self.gate.release_open.load(Ordering::SeqCst) {
                    break;
                }
                opened.await;
            }
        }
        let r = self.inner.release_owner(owner).await;
        self.gate.released.notify_one();
        r
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, ack_leased, release,
        release_owners_under, reclaim_expired_leases,
        queue_stats, total_queued, connections_with_pending, pending_among, prune_dedup,
        dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due, push_done,
        first_sight, forget_sight, prune_sights,
        delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues, );
}

/// A node on a [`GatedLeases`] store (unarmed), with leases of 60 s: only a release can give
/// a leased message back within a test.
async fn gated_node(strategy: Strategy) -> (tempfile::TempDir, node::RunningNode, Arc<GatedLeases>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), strategy);
    cfg.delivery.lease_ms = 60_000;
    let inner = open_sled(&dir.path().join("data")).await.unwrap();
    let gated = Arc::new(GatedLeases {
        inner,
        armed: AtomicBool::new(false),
        gate: Arc::default(),
        hold_releases: AtomicBool::new(false),
    });
    let n = start_on(&cfg, gated.clone());
    (dir, n, gated)
}

#[actix_rt::test]
async fn a_lease_in_flight_when_its_session_closes_gives_the_message_back() {
    let (_dir, n, gated) = gated_node(Strategy::QueueAndLiveModeDelivery).await;
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let live = || pickup("live-delivery-change", json!({"live_delivery": true}));

    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(&a, &mut ws, &live()).await;
    forward_one(&n, &a, &k, "once").await;
    let first = a.open_delivery(&ws_next_message(&a, &mut ws).await).unwrap();
    // The session leases again (live mode asked once more) and that lease is held until the
    // session has closed and released what it held, unacknowledged.
    gated.armed.store(true, Ordering::SeqCst);
    let status = ws_request(&a, &mut ws, &live()).await;
    assert_eq!(type_name(&status), "status");
    ws.close().await;
    tokio::time::timeout(WAIT, gated.gate.gated_lease_done.notified())
        .await
        .expect("the held lease ran after the session's release");

    let mut ws2 = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(&a, &mut ws2, &live()).await;
    let again = a.open_delivery(&ws_next_message(&a, &mut ws2).await).unwrap();
    assert_eq!(
        again[0].0, first[0].0,
        "the same queue entry, not left leased to the closed socket"
    );
    a.request(&pickup("messages-received", json!({"message_id_list": [again[0].0]})))
        .await
        .unwrap();
    assert_eq!(queue_depth(&n).await, 0);
}

fn ping(id: &str) -> serde_json::Value {
    json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": id, "response_requested": true,
        "~transport": {"return_route": "all"}})
}

/// The next frame on `ws`, opened by `b`: its ping response, not a delivery (nor anything `b`
/// cannot open).
async fn next_is_pong_of(b: &Agent, ws: &mut WsClient) {
    let m = ws_next_message(b, ws).await;
    assert_eq!(type_name(&m), "ping_response", "on B's socket: {m}");
}

#[actix_rt::test]
async fn a_lease_for_a_connection_the_socket_left_goes_back_to_that_connection() {
    // The socket leases for A, then B speaks on it with return route (it rebinds to B), then
    // A's lease lands: A's message must neither go out packed for B nor stay leased to a
    // socket that no longer delivers A.
    let (_dir, n, gated) = gated_node(Strategy::QueueAndLiveModeDelivery).await;
    let inv = invitation(&n).await;
    let (a, ka) = Agent::onboard(&inv).await.unwrap();
    let (b, _kb) = Agent::onboard(&inv).await.unwrap();
    let g = a.grant.clone().unwrap();
    Sender::new()
        .forward(&n.public_url(), &basic_message("for-a"), &ka.verkey(), &g.routing_keys)
        .await
        .unwrap();
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    gated.armed.store(true, Ordering::SeqCst);
    let live = || pickup("live-delivery-change", json!({"live_delivery": true}));
    let status = ws_request(&a, &mut ws, &live()).await;
    assert_eq!(type_name(&status), "status", "{status}");
    // A's lease is held; B rebinds the socket.
    ws.send_envelope(b.pack(&ping("b1")).unwrap(), true).await.unwrap();
    next_is_pong_of(&b, &mut ws).await;
    gated.gate.released.notify_one();
    tokio::time::timeout(WAIT, gated.gate.gated_lease_done.notified())
        .await
        .expect("the held lease ran");
    ws.send_envelope(b.pack(&ping("b2")).unwrap(), true).await.unwrap();
    next_is_pong_of(&b, &mut ws).await;
    // A's message is A's again at once (its lease would hold it for 60 s).
    let mut ws_a = live_socket(&a, &n).await;
    let d = ws_next_message(&a, &mut ws_a).await;
    assert_eq!(contents(&a, &d), vec!["for-a"], "{d}");
    ws.send_envelope(b.pack(&ping("b3")).unwrap(), true).await.unwrap();
    next_is_pong_of(&b, &mut ws).await;
}

#[actix_rt::test]
async fn messages_handed_to_a_socket_go_back_when_it_rebinds_to_another_connection() {
    // A live delivery handed to the socket (leased to the node's hand-off owner) waits for A's
    // acknowledgement; B then rebinds the socket. The socket no longer delivers A: what it was
    // handed for A goes back to A at once, not when the hand-off lease runs out.
    let (_dir, n, _gated) = gated_node(Strategy::QueueAndLiveModeDelivery).await;
    let inv = invitation(&n).await;
    let (a, ka) = Agent::onboard(&inv).await.unwrap();
    let (b, _kb) = Agent::onboard(&inv).await.unwrap();
    let mut ws = live_socket(&a, &n).await;
    let g = a.grant.clone().unwrap();
    Sender::new()
        .forward(&n.public_url(), &basic_message("handed"), &ka.verkey(), &g.routing_keys)
        .await
        .unwrap();
    let d = ws_next_message(&a, &mut ws).await;
    let first = delivery_ids(&a, &d);
    ws.send_envelope(b.pack(&ping("b1")).unwrap(), true).await.unwrap();
    next_is_pong_of(&b, &mut ws).await;
    let mut ws_a = live_socket(&a, &n).await;
    let again = ws_next_message(&a, &mut ws_a).await;
    assert_eq!(delivery_ids(&a, &again), first, "{again}");
}

#[actix_rt::test]
async fn a_lease_taken_by_a_request_after_its_session_closed_gives_the_message_back() {
    // A delivery-request over a socket leases for that socket; when the socket closes before
    // the lease lands, the session's release has already run: the request's completion gives
    // the message back itself.
    let (_dir, n, gated) = gated_node(Strategy::QueueOnly).await;
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    forward_one(&n, &a, &k, "asked").await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    // Bound (QueueOnly: nothing is pushed), so the session's end releases its owner.
    let pong = ws_request(&a, &mut ws, &ping("p")).await;
    assert_eq!(type_name(&pong), "ping_response");
    gated.armed.store(true, Ordering::SeqCst);
    let ask = || pickup("delivery-request", json!({"limit": 10}));
    ws.send_envelope(a.pack(&ask()).unwrap(), true).await.unwrap();
    tokio::time::timeout(WAIT, gated.gate.gated_lease_started.notified())
        .await
        .expect("the delivery-request leases");
    ws.close().await;
    tokio::time::timeout(WAIT, gated.gate.gated_lease_done.notified())
        .await
        .expect("the held lease ran after the session's release");
    let got = eventually("the message back after the session's end", || async {
        let mut ws2 = a.websocket(&ws_url(&n)).await.unwrap();
        let r = ws_request(&a, &mut ws2, &ask()).await;
        ws2.close().await;
        (type_name(&r) == "delivery").then(|| contents(&a, &r))
    })
    .await;
    assert_eq!(got, vec!["asked"]);
}

#[actix_rt::test]
async fn a_delivery_over_a_socket_it_did_not_bind_comes_back_when_the_socket_closes() {
    // return_route "thread" brings the delivery back on the socket without binding it: the
    // socket's end still gives back what it leased, as a bound socket's does.
    let (_dir, n, _gated) = gated_node(Strategy::QueueAndLiveModeDelivery).await;
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    forward_one(&n, &a, &k, "lent").await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let mut ask = pickup("delivery-request", json!({"limit": 10}));
    ask["~transport"] = json!({"return_route": "thread"});
    let d = ws_request(&a, &mut ws, &ask).await;
    assert_eq!(contents(&a, &d), vec!["lent"], "{d}");
    ws.close().await; // without messages-received
    let again = eventually("the delivery back after the socket closed", || async {
        let r = a
            .request(&pickup("delivery-request", json!({"limit": 10})))
            .await
            .unwrap()?;
        (type_name(&r) == "delivery").then(|| delivery_ids(&a, &r))
    })
    .await;
    assert_eq!(again, delivery_ids(&a, &d));
}

/// The `in_flight` (leased) count of connection `conn`.
async fn in_flight(n: &node::RunningNode, conn: &str) -> u64 {
    let c = get_json(&format!("{}/connections/{conn}", n.admin_url())).await;
    c["queue"]["in_flight"].as_u64().expect("in_flight")
}

#[actix_rt::test]
async fn a_lease_whose_answer_never_reached_its_stalled_session_goes_back_at_its_end() {
    // A delivery-request over return route `thread` leases on a socket it does not bind. Its
    // answer waits for the session's actor, which runs no more: its writer is blocked on a
    // client that reads nothing. The write stall then drops the session before the answer is
    // applied. The request recorded the connection it leased for as it ended, so the session's
    // end gives the lease back; before, only the applied answer recorded it, and the message
    // stayed leased to the gone socket for `lease_ms`.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 600_000;
    // Long enough for the test to see the writer blocked and open the gate before it.
    cfg.limits.ws_write_stall_ms = 5_000;
    // The held delivery-request is the socket's one request in flight: every frame after it
    // is answered `busy` on the socket at once, unhandled (nothing else leases, nothing else's
    // answer needs the actor).
    cfg.limits.max_ws_inflight = 1;
    let gated = Arc::new(GatedLeases {
        inner: open_sled(&dir.path().join("data")).await.unwrap(),
        armed: AtomicBool::new(false),
        gate: Arc::default(),
        hold_releases: AtomicBool::new(false),
    });
    // The socket is full after little of the node's output.
    let l = listeners_with_small_send_buffer(&mut cfg, 4 << 10);
    let opts = node::NodeOptions {
        store: Some(gated.clone()),
        config_path: None,
    };
    let n = node::spawn(cfg, "n1", l, opts).unwrap();
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    forward_one(&n, &a, &k, "lent").await;
    let conn = common::cluster::a_connection_id(&n).await;

    let mut deaf = deaf_socket(n.public_addr).await;
    gated.armed.store(true, Ordering::SeqCst);
    let mut ask = pickup("delivery-request", json!({"limit": 10}));
    ask["~transport"] = json!({"return_route": "thread"});
    deaf.write_all(&masked_frame(&a.pack(&ask).unwrap())).await.unwrap();
    tokio::time::timeout(WAIT, gated.gate.gated_lease_started.notified())
        .await
        .expect("the delivery-request leases");
    // Frames of one byte, each answered `busy` (about 100 bytes): far more than the socket's
    // buffers hold. Written by a task (the node stops reading them once its writer blocks),
    // which keeps the socket open until the end of the test.
    const FRAMES: usize = 20_000;
    let frames: Vec<u8> = (0..FRAMES).flat_map(|_| masked_frame(b"x")).collect();
    let flood = tokio::spawn(async move {
        let _ = deaf.write_all(&frames).await;
        deaf
    });
    // The actor answers busy frames only while its writer takes its output: the count stops
    // short of them all once the writer is blocked.
    let answered = eventually("the session's writer to block on the full socket", || async {
        let before = rejected(&n, "busy").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = rejected(&n, "busy").await;
        (before > 0.0 && before == after).then_some(after)
    })
    .await;
    assert!(
        answered < FRAMES as f64,
        "every frame was answered: the socket never filled ({answered})"
    );
    println!("busy answers before the writer blocked: {answered}");
    // The held lease lands now, its answer queued for an actor that will not run again.
    gated.gate.released.notify_one();
    tokio::time::timeout(WAIT, gated.gate.gated_lease_done.notified())
        .await
        .expect("the held lease ran");
    eventually("the session dropped at the write stall", || async {
        (rejected(&n, "ws-write-stall").await >= 1.0).then_some(())
    })
    .await;
    // Well before lease_ms (600 s): given back by the session's end.
    eventually("the lease given back by the stalled session's end", || async {
        (in_flight(&n, &conn).await == 0).then_some(())
    })
    .await;
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .expect("an answer");
    assert_eq!(contents(&a, &d), vec!["lent"], "{d}");
    drop(flood);
}

/// A drained node says `empty` only once the leases of its closed sessions are given back: an
/// operator who stops it then leaves no delivery leased to a socket that is gone (it would
/// wait for `lease_ms`, and a wallet with no session anywhere would not be pushed for it).
#[actix_rt::test]
async fn a_drained_node_is_empty_only_once_its_sessions_leases_are_given_back() {
    let (_dir, n, gated) = gated_node(Strategy::QueueAndLiveModeDelivery).await;
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let mut ws = live_socket(&a, &n).await;
    forward_one(&n, &a, &k, "unacked").await;
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(contents(&a, &d), vec!["unacked"]);
    gated.hold_releases.store(true, Ordering::SeqCst);
    let conn = common::cluster::a_connection_id(&n).await;
    let (st, _) = post_raw(&format!("{}/drain", n.admin_url()), "application/json", Vec::new()).await;
    assert_eq!(st, 200);
    tokio::time::timeout(WAIT, gated.gate.release_started.notified())
        .await
        .expect("the closed session gives its leases back");
    let drain = |s: serde_json::Value| s["drain"].clone();
    let held = eventually("the session gone from the registry", || async {
        let s = drain(get_json(&format!("{}/status", n.admin_url())).await);
        (s["sessions"] == 0).then_some(s)
    })
    .await;
    // Opened before any assertion: a failing test must not leave the node's release waiting.
    gated.gate.release_open.store(true, Ordering::SeqCst);
    gated.gate.release_gate.notify_waiters();
    assert_eq!(held["empty"], false, "leases still held: {held}");
    eventually("empty once the leases are back", || async {
        let s = drain(get_json(&format!("{}/status", n.admin_url())).await);
        (s["empty"] == true).then_some(())
    })
    .await;
    let c = get_json(&format!("{}/connections/{conn}", n.admin_url())).await;
    assert_eq!(c["queue"]["pending"], 1, "pending again: {c}");
    assert_eq!(c["queue"]["in_flight"], 0, "leased to nobody: {c}");
}

/// The node's store, except that the first `release_owners_under` (the start's release of the
/// leases of the run before) waits until the test opens it, then says it is done.
struct SlowStartRelease {
    inner: Arc<dyn Store>,
    first: AtomicBool,
    open: Notify,
    done: Notify,
}

#[async_trait]
impl Store for SlowStartRelease {
    async fn release_owners_under(&self, prefix: &str, until_at_most_ms: i64) -> StoreResult<Vec<ConnId>> {
        if !self.first.swap(false, Ordering::SeqCst) {
            return self.inner.release_owners_under(prefix, until_at_most_ms).await;
        }
        self.open.notified().await;
        let r = self.inner.release_owners_under(prefix, until_at_most_ms).await;
        self.done.notify_one();
        r
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased,
        release, release_owner, reclaim_expired_leases,
        queue_stats, total_queued, connections_with_pending, pending_among, prune_dedup,
        dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due, push_done,
        first_sight, forget_sight, prune_sights,
        delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
    );
}

/// A store slow to release the leases of the run before a restart: the node serves after
/// `START_RELEASE_WAIT` (5 s) while that release goes on, under the same owner names as its
/// new sessions'. A message this run delivered on a live socket (leased to it, not yet
/// acknowledged) stays leased when that release lands. Before, the release freed it too and
/// the wake that follows wrote it to the wallet a second time.
#[actix_rt::test]
async fn the_start_release_of_the_run_before_leaves_this_runs_leases_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 60_000;
    let inner = open_sled(&dir.path().join("data")).await.unwrap();
    let slow = Arc::new(SlowStartRelease {
        inner: inner.clone(),
        first: AtomicBool::new(true),
        open: Notify::new(),
        done: Notify::new(),
    });
    let n = start_on(&cfg, slow.clone());
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let mut ws = live_socket(&a, &n).await;
    forward_one(&n, &a, &k, "once").await;
    let first = a.open_delivery(&ws_next_message(&a, &mut ws).await).unwrap();
    assert_eq!(first[0].1["content"], "once");
    let conn = inner
        .connection_by_their_verkey(&a.key.verkey())
        .await
        .unwrap()
        .unwrap()
        .id;
    assert_eq!(inner.queue_stats(&conn, now()).await.unwrap().leased, 1);

    let done = slow.done.notified();
    slow.open.notify_one();
    done.await;
    let st = inner.queue_stats(&conn, now()).await.unwrap();
    assert_eq!(
        (st.pending, st.leased),
        (0, 1),
        "the socket's lease, taken in this run, is not the run before's"
    );
}

fn now() -> i64 {
    mailroom::protocols::now_ms()
}

/// Forwards `text` to `k` of `a` (answered, whatever the status).
async fn forward_one(n: &node::RunningNode, a: &Agent, k: &mailroom::didcomm::keys::KeyPair, text: &str) {
    let g = a.grant.clone().unwrap();
    Sender::new()
        .forward(&n.public_url(), &basic_message(text), &k.verkey(), &g.routing_keys)
        .await
        .unwrap();
}
