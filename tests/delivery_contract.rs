//! The delivery contract under conditions a busy production mediator meets: a live wallet is
//! reached by the sweep however many offline wallets hold older mail; dedup records do not
//! outlive their window (memory stays flat); one socket cannot flood its node with messages
//! being handled at once.

mod common;

use common::cluster::live_socket;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsEvent};
use mailroom::config::Strategy;
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use mailroom::store::{EnqueueLimits, NewMessage, QueuedMessage, Store, StoreResult};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;

/// A live wallet whose wake-up was lost (the message is written to the store behind the
/// node's back, as when a notification is dropped or a lease runs out) is found by the next
/// sweep, even with 10,001 offline wallets holding older messages in the same store.
#[actix_rt::test]
async fn the_sweep_reaches_a_live_wallet_behind_many_older_offline_queues() {
    let (dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let conn = common::cluster::a_connection_id(&n).await;
    let mut ws = live_socket(&a, &n).await;

    // The node's own store: an in-process open of the same path is the same store.
    let store = mailroom::store::open_sled(&dir.path().join("data")).await.unwrap();
    let long_ago = mailroom::protocols::now_ms() - 3_600_000;
    let offline: Vec<NewMessage> = (0..10_001)
        .map(|i| NewMessage {
            // Ids before any uuid, and older: first in any whole-store order.
            connection: format!("!offline-{i:05}"),
            recipient_key: "k".into(),
            payload: b"{}".to_vec(),
            received_at_ms: long_ago + i,
            dedup_key: None,
            expires_at_ms: None,
            lease: None,
        })
        .collect();
    for chunk in offline.chunks(2000) {
        for r in store.enqueue(chunk.to_vec(), &EnqueueLimits::UNLIMITED).await.unwrap() {
            r.unwrap();
        }
    }
    let sender = KeyPair::generate();
    let inner = envelope::pack(
        &serde_json::to_vec(&basic_message("lost wake-up")).unwrap(),
        &[k.verkey()],
        Some(&sender),
    )
    .unwrap();
    let r = store
        .enqueue(
            vec![NewMessage {
                connection: conn.clone(),
                recipient_key: k.verkey(),
                payload: inner,
                received_at_ms: mailroom::protocols::now_ms(),
                dedup_key: None,
                expires_at_ms: None,
                lease: None,
            }],
            &EnqueueLimits::UNLIMITED,
        )
        .await
        .unwrap();
    r[0].as_ref().unwrap();

    // Only the sweep can deliver it (nothing told the session).
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&d), "delivery", "{d}");
    assert_eq!(contents(&a, &d), vec!["lost wake-up".to_string()]);
}

/// One dedup record per forward, even once acknowledged, would grow memory with traffic;
/// they go once their window has passed, with no message expiry at all (`ttl = 0`). The
/// window is 5 s: the gauge (refreshed every quarter window) counts the records for about that
/// long after the last forward, room for a loaded box to read it before they go.
#[actix_rt::test]
async fn dedup_records_are_pruned_once_their_window_passes() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.limits.dedup_window_secs = 5;
        c.limits.message_ttl_secs = 0;
    })
    .await;
    let routing = a.grant.clone().unwrap().routing_keys;
    let sender = Sender::new();
    for i in 0..30 {
        let s = sender
            .forward(&n.public_url(), &basic_message(&format!("m{i}")), &k.verkey(), &routing)
            .await
            .unwrap();
        assert_eq!(s, 202);
    }
    assert_eq!(queue_depth(&n).await, 30);
    eventually("the dedup gauge counts the records", || async {
        (metric(&n, "mailroom_dedup_records").await? >= 1.0).then_some(())
    })
    .await;
    eventually("every record pruned after its window", || async {
        (metric(&n, "mailroom_dedup_records").await? == 0.0).then_some(())
    })
    .await;
    assert_eq!(queue_depth(&n).await, 30, "pruning dedup records touches no message");
}

/// `limits.max_ws_inflight`: messages beyond it are answered `busy`, not queued up as tasks;
/// every message gets exactly one answer.
#[actix_rt::test]
async fn a_socket_cannot_have_more_messages_in_flight_than_its_limit() {
    let (_dir, n, a, _k) = node_with_wallet(Strategy::QueueOnly, |c| c.limits.max_ws_inflight = 1).await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let total = 40;
    for i in 0..total {
        let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": format!("p{i}"), "response_requested": true, "~transport": {"return_route": "all"}});
        ws.send_envelope(a.pack(&ping).unwrap(), true).await.unwrap();
    }
    let (mut pongs, mut busy) = (0, 0);
    while pongs + busy < total {
        match ws.next(WAIT).await.unwrap() {
            WsEvent::Envelope(f) => match serde_json::from_slice::<Value>(&f) {
                Ok(v) if v["error"] == "busy" => busy += 1,
                _ => {
                    let (m, _) = a.unpack(&f).expect("a packed reply");
                    assert_eq!(type_name(&m), "ping_response", "{m}");
                    pongs += 1;
                }
            },
            WsEvent::Closed(r) => panic!("closed: {r:?}"),
        }
    }
    assert!(
        busy >= 1,
        "40 back-to-back messages with a limit of 1 in flight: none refused"
    );
    assert!(pongs >= 1);
}

/// A wallet whose socket stays open but takes nothing (an app its OS froze, its receive
/// window shut) holds its session for `limits.ws_write_stall_ms`, not for as long as the TCP
/// connection lives: then the node closes the socket, the deliveries leased to it go back at
/// once (the lease here would run 30 s), and the wallet's next socket gets every message.
/// The limit is 10 s: the next socket reads a ~600 KB delivery, then opens it before it reads
/// again (~0.5 s in a debug build on an idle box, several times that on a loaded one), and a
/// pause past the limit would have the node give that socket up too.
#[actix_rt::test]
async fn a_socket_that_takes_nothing_is_given_up_and_its_leases_go_back() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.ws_write_stall_ms = 10_000;
        c.limits.max_queue_bytes = 1 << 30;
        c.delivery.lease_ms = 30_000;
    })
    .await;
    let frozen = live_socket(&a, &n).await;
    let status = format!("{}/status", n.admin_url());
    assert_eq!(get_json(&status).await["sessions"], 1);

    let total = overfill(&n, &a, &k, "m").await;

    // The node gives the frozen socket up (before: its session waited on it for good), and
    // counts it.
    eventually("the frozen socket's session to end, counted", || async {
        let stalled = metric(
            &n,
            r#"mailroom_rejected_total{reason="ws-write-stall",didcomm="unknown"}"#,
        )
        .await;
        (get_json(&status).await["sessions"] == 0 && stalled == Some(1.0)).then_some(())
    })
    .await;

    // Everything reaches the wallet's next socket, long before a lease could have run out.
    receive_all(&n, &a, total, 4).await;
    drop(frozen);
}

/// Reads `total` messages on a new live socket of `a`, acknowledging each delivery; they are
/// told apart by the first `tag` characters of their content.
async fn receive_all(n: &mailroom::node::RunningNode, a: &Agent, total: usize, tag: usize) {
    let mut ws = live_socket(a, n).await;
    let mut seen = HashSet::new();
    while seen.len() < total {
        let m = ws_next_message(a, &mut ws).await;
        match type_name(&m) {
            "delivery" => {
                let mut ids = Vec::new();
                for (id, inner) in a.open_delivery(&m).unwrap() {
                    seen.insert(inner["content"].as_str().unwrap()[..tag].to_string());
                    ids.push(id);
                }
                let ack = pickup("messages-received", json!({ "message_id_list": ids }));
                ws.send_envelope(a.pack(&ack).unwrap(), true).await.unwrap();
            }
            "status" => {}
            other => panic!("unexpected {other}: {m}"),
        }
    }
}

/// Forwards for a wallet whose socket takes nothing wait for its session in a budget
/// (8 x `limits.max_envelope_bytes`, 2 of them per connection): past it they are queued for
/// the session to lease, not held in memory. Before, every forward accepted while the session
/// waited on its socket was held, with its payload, until the session took it: up to the
/// connection's queue limit, for each such session. Nothing is lost either way.
#[actix_rt::test]
async fn hand_offs_waiting_for_a_frozen_socket_are_bounded() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.ws_write_stall_ms = 10_000;
        c.limits.max_envelope_bytes = 128 * 1024;
        c.delivery.lease_ms = 30_000;
    })
    .await;
    let frozen = live_socket(&a, &n).await;
    let g = a.grant.clone().expect("mediated");
    let pad = "x".repeat(40_000);
    let sender = Sender::new();
    let total = 150;
    for i in 0..total {
        let m = basic_message(&format!("{i:03} {pad}"));
        let st = sender
            .forward(&n.public_url(), &m, &k.verkey(), &g.routing_keys)
            .await
            .unwrap();
        assert_eq!(st, 202, "forward {i}");
    }
    let no_room = metric(&n, r#"mailroom_handoffs_total{to="no-room"}"#)
        .await
        .unwrap_or(0.0);
    assert!(no_room > 0.0, "the frozen socket's hand-offs kept within the budget");

    // Once the node gives the frozen socket up, everything reaches the next one, once.
    let status = format!("{}/status", n.admin_url());
    eventually("the frozen socket's session to end", || async {
        (get_json(&status).await["sessions"] == 0).then_some(())
    })
    .await;
    receive_all(&n, &a, total, 3).await;
    drop(frozen);
}

/// One wallet that freezes its socket (open, reading nothing, its session waiting on it)
/// delays no other wallet on the node: a second wallet's live delivery arrives while the
/// first one's messages still wait behind its full socket.
#[actix_rt::test]
async fn a_frozen_socket_delays_no_other_wallet() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_queue_bytes = 1 << 30
    })
    .await;
    let (b, kb) = Agent::onboard(&invitation(&n).await).await.expect("second wallet");
    let frozen = live_socket(&a, &n).await;
    let mut ws_b = live_socket(&b, &n).await;

    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    let a_conn = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["routing_keys"].to_string().contains(&k.verkey()))
        .expect("the first wallet's connection")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a_queue = format!("{}/connections/{a_conn}", n.admin_url());

    // More than the first wallet's socket holds: its session stops where the socket is full,
    // with messages still pending behind it.
    overfill(&n, &a, &k, "a").await;
    eventually("the first wallet's session to stop behind its full socket", || async {
        (get_json(&a_queue).await["queue"]["pending"].as_u64()? > 0).then_some(())
    })
    .await;

    let gb = b.grant.clone().unwrap();
    let st = Sender::new()
        .forward(&n.public_url(), &basic_message("for b"), &kb.verkey(), &gb.routing_keys)
        .await
        .unwrap();
    assert_eq!(st, 202);
    let d = ws_next_message(&b, &mut ws_b).await;
    assert_eq!(type_name(&d), "delivery", "{d}");
    assert_eq!(contents(&b, &d), vec!["for b".to_string()]);
    // The first wallet's socket was still full all along: messages wait behind it.
    assert!(get_json(&a_queue).await["queue"]["pending"].as_u64().unwrap() > 0);
    drop(frozen);
}

/// Forwards more to `a` than a socket's kernel buffers hold (the node's send buffer grows to
/// 4 MiB, a client that reads nothing keeps its receive buffer near 128 KiB): 120 messages of
/// 60 KB, `{tag}000` .. `{tag}119` then padding; a live delivery of 10 is ~1 MB. How many.
async fn overfill(n: &mailroom::node::RunningNode, a: &Agent, k: &KeyPair, tag: &str) -> usize {
    let g = a.grant.clone().expect("mediated");
    let pad = "x".repeat(60_000);
    let sender = Sender::new();
    let total = 120;
    for i in 0..total {
        let m = basic_message(&format!("{tag}{i:03} {pad}"));
        let st = sender
            .forward(&n.public_url(), &m, &k.verkey(), &g.routing_keys)
            .await
            .unwrap();
        assert_eq!(st, 202, "forward {i}");
    }
    total
}

/// On a node without a cluster, a forward for a wallet with a live session here is queued
/// leased to the node and written to the session as it is accepted, with no lease of its
/// own; left unacknowledged when the socket closes, it comes again at once on the wallet's
/// next socket (the lease would run 60 s).
#[actix_rt::test]
async fn a_forward_for_a_live_session_here_needs_no_lease_and_comes_again_at_once() {
    let (_dir, n, mut a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 60_000;
        c.delivery.sweep_interval_ms = 600_000;
    })
    .await;
    let routing = a.grant.clone().unwrap().routing_keys;
    let mut ws = live_socket(&a, &n).await;
    let lease_calls = r#"mailroom_store_seconds_count{op="lease"}"#;
    let leases = metric(&n, lease_calls).await.unwrap_or(0.0);
    let sender = Sender::new();
    // One at a time (each one, leased, would take a lease of its own); the last one is left
    // unacknowledged.
    for i in 0..5 {
        let st = sender
            .forward(
                &n.public_url(),
                &basic_message(&format!("handed {i}")),
                &k.verkey(),
                &routing,
            )
            .await
            .unwrap();
        assert_eq!(st, 202);
        let d = ws_next_message(&a, &mut ws).await;
        assert_eq!(type_name(&d), "delivery", "{d}");
        assert_eq!(contents(&a, &d), vec![format!("handed {i}")]);
        if i < 4 {
            // Over HTTP, as Credo does: an acknowledgement on the socket starts a lease.
            a.endpoint = n.public_url();
            a.request(&pickup(
                "messages-received",
                json!({ "message_id_list": delivery_ids(&a, &d) }),
            ))
            .await
            .unwrap();
        }
    }
    // At most the two the session's binding started (an empty queue) can land meanwhile.
    let more = metric(&n, lease_calls).await.unwrap_or(0.0) - leases;
    assert!(more <= 2.0, "{more} leases for 5 handed deliveries");
    // Counted once the session has taken the message, which may be after the wallet read it.
    eventually("five hand-offs to the session counted", || async {
        let handed = metric(&n, r#"mailroom_handoffs_total{to="local"}"#).await;
        (handed == Some(5.0)).then_some(())
    })
    .await;
    ws.close().await;

    let mut ws = live_socket(&a, &n).await;
    let d = loop {
        let d = ws_next_message(&a, &mut ws).await;
        if type_name(&d) == "delivery" {
            break d;
        }
    };
    assert_eq!(contents(&a, &d), vec!["handed 4".to_string()]);
    assert_eq!(metric(&n, r#"mailroom_handoffs_total{to="returned"}"#).await, None);
}

/// With no sweep only a wake-up delivers: a wallet with two live sockets here that closes one
/// still gets new messages at once on the other, whether the forward hands them to its
/// session (the default strategy) or wakes it (`queue-only`). A wake-up asks the registry only
/// while a session here is counted in for the connection (`registry::LocalHolders`); a count
/// that went with the first socket would leave the message in the queue.
#[actix_rt::test]
async fn a_wallet_keeps_live_delivery_on_its_other_socket_when_one_closes() {
    for strategy in [Strategy::QueueAndLiveModeDelivery, Strategy::QueueOnly] {
        let (_dir, n, a, k) = node_with_wallet(strategy, |c| c.delivery.sweep_interval_ms = 600_000).await;
        let routing = a.grant.clone().unwrap().routing_keys;
        let first = live_socket(&a, &n).await;
        let mut second = live_socket(&a, &n).await;
        first.close().await;
        eventually("the node let go of the first socket", || async {
            let v = get_json(&format!("{}/sessions", n.admin_url())).await;
            (v["sessions"].as_array().unwrap().len() == 1).then_some(())
        })
        .await;
        let st = Sender::new()
            .forward(
                &n.public_url(),
                &basic_message("to the other socket"),
                &k.verkey(),
                &routing,
            )
            .await
            .unwrap();
        assert_eq!(st, 202);
        let d = ws_next_message(&a, &mut second).await;
        assert_eq!(type_name(&d), "delivery", "{strategy:?}: {d}");
        assert_eq!(
            contents(&a, &d),
            vec!["to the other socket".to_string()],
            "{strategy:?}"
        );
        second.close().await;
    }
}

/// The node's store, except that once armed, the next `enqueue_routed` commits and then fails
/// as if its answer were lost (a PostgreSQL batch answered 503 at its deadline that committed
/// after all; a node that stopped between its commit and its answer): the forward is refused
/// and nobody is woken for the message it queued. Counts the calls of `queue_stats` (it reads
/// a connection's whole queue) and of `pending_among` for one connection (what a repeated
/// forward asks).
struct CommitsThenFails {
    inner: std::sync::Arc<dyn mailroom::store::Store>,
    armed: std::sync::atomic::AtomicBool,
    queue_stats_calls: std::sync::atomic::AtomicUsize,
    pending_among_one_calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl mailroom::store::Store for CommitsThenFails {
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> mailroom::store::StoreResult<Vec<mailroom::store::StoreResult<mailroom::store::Enqueued>>> {
        let r = self.inner.enqueue_routed(msgs, limits).await;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            r?;
            return Err(mailroom::store::StoreError::Unavailable("the answer was lost".into()));
        }
        r
    }
    async fn queue_stats(&self, conn: &str, now_ms: i64) -> mailroom::store::StoreResult<mailroom::store::QueueStats> {
        self.queue_stats_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.queue_stats(conn, now_ms).await
    }
    async fn pending_among(&self, conns: &[String], now_ms: i64) -> mailroom::store::StoreResult<Vec<String>> {
        if conns.len() == 1 {
            self.pending_among_one_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.pending_among(conns, now_ms).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, lease, lease_upto, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases,
        total_queued, connections_with_pending, prune_dedup,
        dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due, push_done,
        first_sight, forget_sight, prune_sights,
        delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
    );
}

/// A forward whose first try queued its message but was refused (its answer lost) woke nobody;
/// the sender's retry is a duplicate, and it wakes the wallet: here an agent with an HTTP
/// endpoint of its own gets the message POSTed at once, not at the sweep's endpoint retry
/// (an hour away in this test). A repeated forward asks whether its queue holds pending
/// messages without reading the whole queue (`queue_stats`): retries are cheap however long the
/// wallet's queue.
#[actix_rt::test]
async fn a_retried_forward_whose_first_try_was_queued_wakes_the_wallet() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let posts = Arc::new(AtomicUsize::new(0));
    let p = posts.clone();
    let (sink, handle) = endpoint_stub(move |_| {
        p.fetch_add(1, Ordering::SeqCst);
        202
    });

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.sweep_interval_ms = 3_600_000;
    let store = Arc::new(CommitsThenFails {
        inner: mailroom::store::open_sled(&dir.path().join("data")).await.unwrap(),
        armed: Default::default(),
        queue_stats_calls: Default::default(),
        pending_among_one_calls: Default::default(),
    });
    let n = start_on(&cfg, store.clone());
    let mut a = connect_replying_to(&n, &sink).await;
    eventually("the didexchange response POSTed", || async {
        (posts.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    a.mediate().await.unwrap();
    let k = a.new_recipient_key();
    a.keylist_update(&[k.did_key()], &[]).await.unwrap();

    let g = a.grant.clone().unwrap();
    let env = Sender::new()
        .forward_envelope(&basic_message("retried"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let ct = "application/didcomm-envelope-enc";
    store.armed.store(true, Ordering::SeqCst);
    let (st, body) = post_raw(&n.public_url(), ct, env.clone()).await;
    assert_eq!(st, 503, "the first try is refused: {body}");
    assert_eq!(queue_depth(&n).await, 1, "but its message was queued");
    let (st, body) = post_raw(&n.public_url(), ct, env.clone()).await;
    assert_eq!(st, 202, "the retry: {body}");
    eventually("the message POSTed to the agent's endpoint", || async {
        (posts.load(Ordering::SeqCst) == 2 && queue_depth(&n).await == 0).then_some(())
    })
    .await;
    assert_eq!(queue_depth(&n).await, 0, "queued once, delivered once");

    const MORE: usize = 20;
    for _ in 0..MORE {
        let (st, body) = post_raw(&n.public_url(), ct, env.clone()).await;
        assert_eq!(st, 202, "a later retry: {body}");
    }
    let asked =
        || store.queue_stats_calls.load(Ordering::SeqCst) + store.pending_among_one_calls.load(Ordering::SeqCst);
    eventually("every repeated forward asked about its queue", || async {
        (asked() > MORE).then_some(())
    })
    .await;
    assert_eq!(
        store.queue_stats_calls.load(Ordering::SeqCst),
        0,
        "no repeated forward read its whole queue"
    );
    assert_eq!(posts.load(Ordering::SeqCst), 2, "nothing pending: nothing more POSTed");
    handle.stop(true).await;
}

/// A stop is not held up by a wallet whose socket takes nothing, not even the close frame (its
/// session would hold its slot for `limits.ws_write_stall_ms`, a minute here): the socket is
/// given up `wsio::STOP_GRACE` (3 s) into the stop, and the stop ends well within one phase's
/// grace (`node::SHUTDOWN_GRACE`), owing nothing. It took 25 s before (two phases of 10 s, the
/// third cut by `node::STOP_DEADLINE`), and 30 s and more before the deadline. An idle HTTP
/// connection held open by a client does not hold it up either.
#[actix_rt::test]
async fn a_frozen_socket_does_not_hold_up_the_stop() {
    let (dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_queue_bytes = 1 << 30;
    })
    .await;
    let frozen = live_socket(&a, &n).await;
    overfill(&n, &a, &k, "m").await;
    let idle = std::net::TcpStream::connect(n.public_addr).unwrap();
    let started = std::time::Instant::now();
    n.stop().unwrap();
    let took = started.elapsed();
    assert!(took < mailroom::node::SHUTDOWN_GRACE, "the stop took {took:?}");
    drop((frozen, idle));
    // The stop owed nothing: it recorded its clean end (an owing one leaves the store marked,
    // and the next start wakes every wallet with mail pending).
    let store = mailroom::store::open_sled(&dir.path().join("data")).await.unwrap();
    assert_eq!(
        store.begin_run().await.unwrap(),
        Some(false),
        "the stop left the store marked as running"
    );
}

/// A live wallet that stops acknowledging while senders flood it: what its session holds back
/// for the closed window is bounded (here 4 batches of 5), the rest goes back to the queue
/// (counted as hand-offs `returned`), and once the wallet acknowledges every message reaches
/// it, once, in the order the forwards were answered, those answered while the queue still
/// held older ones too. Before, the session held every handed message in memory, up to the
/// wallet's whole queue quota.
#[actix_rt::test]
async fn a_flood_for_a_wallet_that_does_not_acknowledge_is_held_back_bounded_and_in_order() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.batch_size = 5;
        // Only an acknowledgement opens the window; no lease runs out during the test.
        c.delivery.live_ack_wait_ms = 60_000;
        c.delivery.lease_ms = 600_000;
    })
    .await;
    let sender = Sender::new();
    let forward = |text: String| forward_202(&n, &a, &k, &sender, text);
    let mut ws = live_socket(&a, &n).await;
    // The wallet acknowledges on its socket once, so the window applies; then m1 goes out and
    // is not acknowledged: the window is closed.
    forward("m0".into()).await;
    let d0 = ws_next_message(&a, &mut ws).await;
    assert_eq!(contents(&a, &d0), vec!["m0".to_string()]);
    assert_eq!(
        ack_on_socket(&a, &mut ws, &delivery_ids(&a, &d0)).await,
        Vec::<Vec<String>>::new()
    );
    forward("m1".into()).await;
    let d1 = ws_next_message(&a, &mut ws).await;
    assert_eq!(contents(&a, &d1), vec!["m1".to_string()]);
    for i in 2..=101 {
        forward(format!("m{i}")).await;
    }
    eventually("all but 4 batches went back to the queue", || async {
        let returned = metric(&n, r#"mailroom_handoffs_total{to="returned"}"#)
            .await
            .unwrap_or(0.0);
        (returned >= 80.0).then_some(())
    })
    .await;
    assert_eq!(queue_depth(&n).await, 101, "m1..m101 queued (m1 out, unacknowledged)");

    // Acknowledged from now on. Forwards answered while older messages still wait in the
    // queue go there too, not ahead of them.
    let mut got = contents(&a, &d1);
    let mut to_ack = delivery_ids(&a, &d1);
    let mut more_sent = false;
    while got.len() < 106 {
        if got.len() > 1 && !more_sent {
            more_sent = true;
            for i in 102..=106 {
                forward(format!("m{i}")).await;
            }
        }
        if !to_ack.is_empty() {
            let ack = pickup("messages-received", json!({ "message_id_list": to_ack }));
            ws.send_envelope(a.pack(&ack).unwrap(), true).await.unwrap();
            to_ack = Vec::new();
        }
        let m = ws_next_message(&a, &mut ws).await;
        match type_name(&m) {
            "delivery" => {
                to_ack = delivery_ids(&a, &m);
                got.extend(contents(&a, &m));
            }
            "status" => {}
            other => panic!("unexpected {other}: {m}"),
        }
    }
    let want: Vec<String> = (1..=106).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in the order the forwards were answered");
    ws.close().await;
}

/// A wallet that comes back to a backlog gets it oldest first, and forwards answered while the
/// backlog still drains come after it, not in between: live mode (a wallet that does not
/// acknowledge on its socket gets every delivery at once) and implicit pickup alike.
#[actix_rt::test]
async fn forwards_answered_while_a_backlog_drains_come_after_it() {
    for live in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = backlog_config(dir.path());
        let n = start(&cfg);
        backlog_then_more(&n, live, 100, 50).await;
    }
}

/// The same with a slow store (each lease takes 100 ms): more forwards are handed to the
/// session while the backlog drains than it holds (4 batches), so the rest wait in the queue,
/// behind the backlog and behind those it holds.
#[actix_rt::test]
async fn forwards_answered_while_a_slow_backlog_drains_come_after_it() {
    for live in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = backlog_config(dir.path());
        let store = Arc::new(SlowLeases {
            inner: mailroom::store::open_sled(&dir.path().join("data")).await.unwrap(),
            lease_ms: std::sync::atomic::AtomicU64::new(0),
        });
        let n = start_on(&cfg, store.clone());
        store.lease_ms.store(100, std::sync::atomic::Ordering::SeqCst);
        backlog_then_more(&n, live, 40, 40).await;
    }
}

/// The backlog tests' node: batches of 5, and no lease runs out during a test.
fn backlog_config(dir: &std::path::Path) -> mailroom::config::Config {
    let mut cfg = test_config(dir, Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.batch_size = 5;
    cfg.delivery.lease_ms = 600_000;
    cfg
}

/// The node's store, except that each lease takes `lease_ms` longer.
struct SlowLeases {
    inner: Arc<dyn Store>,
    lease_ms: std::sync::atomic::AtomicU64,
}

#[async_trait::async_trait]
impl Store for SlowLeases {
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let slow = self.lease_ms.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(slow)).await;
        self.inner
            .lease_upto(conn, max, max_bytes, owner, now_ms, until_ms)
            .await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued, connections_with_pending,
        pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token,
        push_event, push_take_due, push_done, delete_connection, delete_unmediated, drop_queue, top_queues,
        first_sight, forget_sight, prune_sights, update_keys, revoke_mediation, );
}

/// A wallet onboarded on `n` gets `backlog` messages queued while it is away, connects (live
/// mode, or implicit pickup), and `more` are forwarded one after the other while the backlog
/// drains: it gets all of them once, in the order they were answered.
async fn backlog_then_more(n: &mailroom::node::RunningNode, live: bool, backlog: usize, more: usize) {
    let (a, k) = Agent::onboard(&invitation(n).await).await.expect("onboarding");
    let sender = Sender::new();
    let forward = |text: String| forward_202(n, &a, &k, &sender, text);
    for i in 0..backlog {
        forward(format!("m{i:03}")).await;
    }
    let mut ws = if live {
        live_socket(&a, n).await
    } else {
        // Bound by a message with return route `all`: implicit pickup.
        let mut ws = a.websocket(&ws_url(n)).await.unwrap();
        let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": mailroom::didcomm::message::new_id(), "response_requested": true, "~transport": {"return_route": "all"}});
        ws.send_envelope(a.pack(&ping).unwrap(), true).await.unwrap();
        ws
    };
    let total = backlog + more;
    let sending = async {
        for i in backlog..total {
            forward(format!("m{i:03}")).await;
        }
    };
    let receiving = async {
        let mut got = Vec::new();
        while got.len() < total {
            let m = ws_next_message(&a, &mut ws).await;
            match type_name(&m) {
                "delivery" => got.extend(contents(&a, &m)),
                "message" => got.push(m["content"].as_str().unwrap().to_string()),
                _ => {}
            }
        }
        got
    };
    let ((), got) = futures_util::join!(sending, receiving);
    let want: Vec<String> = (0..total).map(|i| format!("m{i:03}")).collect();
    assert_eq!(got, want, "live: {live}: every message once, oldest first");
}

/// Forwards a basic message `text` to `a`'s key `k` through `n`, which must answer 202.
async fn forward_202(n: &mailroom::node::RunningNode, a: &Agent, k: &KeyPair, sender: &Sender, text: String) {
    let routing = a.grant.clone().unwrap().routing_keys;
    let st = sender
        .forward(&n.public_url(), &basic_message(&text), &k.verkey(), &routing)
        .await
        .unwrap();
    assert_eq!(st, 202, "{text}");
}

/// Implicit pickup has no acknowledgement, yet a wallet whose socket is gone while the node's
/// writes to it still succeed (half-open after a network change, the app frozen) loses
/// nothing written to it: a message is removed only once the wallet's end answered a ping
/// sent after it, and a socket that ends first gives it back. Before, it was removed as soon
/// as it was written, and a wallet lost all its mail until the node timed the socket out.
#[actix_rt::test]
async fn an_implicit_socket_that_reads_nothing_loses_nothing() {
    // Only the socket's end gives its messages back in time: a lease running out while the
    // forwards go in would write them to it again.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 30_000;
    })
    .await;
    let sender = Sender::new();
    let mut gone = a.websocket(&ws_url(&n)).await.unwrap();
    assert_eq!(
        type_name(&ws_request(&a, &mut gone, &binding_ping()).await),
        "ping_response"
    );
    // From here on the socket reads nothing (nor answers a ping).
    for i in 0..5 {
        forward_202(&n, &a, &k, &sender, format!("m{i}")).await;
    }
    let written = r#"mailroom_delivered_total{path="implicit",didcomm="v1"}"#;
    eventually("all five written down the socket", || async {
        (metric(&n, written).await == Some(5.0)).then_some(())
    })
    .await;
    drop(gone);

    // The wallet's next socket gets them all.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws.send_envelope(a.pack(&binding_ping()).unwrap(), true).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = ws_next_message(&a, &mut ws).await;
        if type_name(&m) == "message" {
            got.push(m["content"].as_str().unwrap().to_string());
        }
    }
    got.sort();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    // Read on (the pings answered): confirmed, and removed.
    read_on_until_depth(&n, &mut ws, 0, "the messages read removed").await;
}

/// What an implicit-pickup socket was written and has not confirmed reading is bounded (1,000
/// messages or 1 MiB): a wallet that comes back to a backlog over a slow link gets it as it
/// reads, not all at once. Before, the whole backlog was leased and written at once, and a
/// wallet that could not read it before its leases ran out got it again (and the socket was
/// closed when the confirming pong took longer than 60 s).
#[actix_rt::test]
async fn an_implicit_socket_gets_a_backlog_as_it_confirms_reading_it() {
    let (dir, n, a, _k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.ws_write_stall_ms = 60_000;
        // Longer than the backlog takes: none is written again for a lease run out unconfirmed.
        c.delivery.lease_ms = 60_000;
    })
    .await;
    let conn = common::cluster::a_connection_id(&n).await;
    let store = mailroom::store::open_sled(&dir.path().join("data")).await.unwrap();
    const BACKLOG: usize = 1_500;
    let now = mailroom::protocols::now_ms();
    let backlog: Vec<NewMessage> = (0..BACKLOG)
        .map(|i| NewMessage {
            connection: conn.clone(),
            recipient_key: "k".into(),
            payload: format!("{{\"n\":{i}}}").into_bytes(),
            received_at_ms: now,
            dedup_key: None,
            expires_at_ms: None,
            lease: None,
        })
        .collect();
    for r in store.enqueue(backlog, &EnqueueLimits::UNLIMITED).await.unwrap() {
        r.unwrap();
    }

    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let mut ping = binding_ping();
    ping["response_requested"] = json!(false);
    ws.send_envelope(a.pack(&ping).unwrap(), true).await.unwrap();
    let written = r#"mailroom_delivered_total{path="implicit",didcomm="v1"}"#;
    let count = || async { metric(&n, written).await.unwrap_or(0.0) as usize };
    eventually("the backlog written up to the bound", || async {
        (count().await >= 1_000).then_some(())
    })
    .await;
    // Read nothing, confirm nothing: nothing more is written (a while to be sure of it).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let before_reading = count().await;
    assert!(before_reading < BACKLOG, "{before_reading} written unconfirmed");

    // Read (the pings answered as they come): the rest follows, each message once.
    let mut seen = HashSet::new();
    while seen.len() < BACKLOG {
        match ws.next(WAIT).await.unwrap() {
            WsEvent::Envelope(e) => {
                let m: Value = serde_json::from_slice(&e).unwrap();
                assert!(seen.insert(m["n"].as_u64().unwrap()), "{m} twice");
            }
            WsEvent::Closed(r) => panic!("closed: {r:?}"),
        }
    }
    read_on_until_depth(&n, &mut ws, 0, "the backlog read removed").await;
}

/// Forwards handed to an implicit socket as they arrive, not leased by its drain, keep within
/// the same bound of written and unconfirmed: held back until the pong that makes room (and
/// past what may be held, back to the queue). Before, each was written at once, however much
/// the wallet had not confirmed, and a slow link was written more than it could read in a lease.
#[actix_rt::test]
async fn forwards_handed_to_an_implicit_socket_that_reads_nothing_are_bounded_too() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.ws_write_stall_ms = 60_000;
        // Longer than the forwards take: none is written again for a lease run out unread.
        c.delivery.lease_ms = 120_000;
    })
    .await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws.send_envelope(a.pack(&binding_ping()).unwrap(), true).await.unwrap();
    // The ping's response: bound, and caught up (an empty queue), so forwards are handed.
    let pong = ws_next_message(&a, &mut ws).await;
    assert!(pong["@type"].as_str().unwrap().ends_with("ping_response"), "{pong}");

    // About 3 KB each: the 1 MiB bound is reached at about 350.
    const TOTAL: usize = 600;
    let g = a.grant.clone().expect("mediated");
    let sender = Sender::new();
    let pad = "x".repeat(2_000);
    for i in 0..TOTAL {
        let m = basic_message(&format!("{i:03} {pad}"));
        let st = sender
            .forward(&n.public_url(), &m, &k.verkey(), &g.routing_keys)
            .await
            .unwrap();
        assert_eq!(st, 202, "forward {i}");
    }
    let handed = |to: &'static str| {
        let n = &n;
        async move {
            metric(n, &format!("mailroom_handoffs_total{{to=\"{to}\"}}"))
                .await
                .unwrap_or(0.0) as usize
        }
    };
    eventually("every forward handed to the session or queued for it", || async {
        (handed("local").await + handed("no-room").await >= TOTAL).then_some(())
    })
    .await;
    let written = metric(&n, r#"mailroom_delivered_total{path="implicit",didcomm="v1"}"#)
        .await
        .unwrap_or(0.0) as usize;
    assert!(written < TOTAL, "all {written} handed written at once, none confirmed");

    // Read (the pings answered as they come): everything arrives, each message once.
    let mut seen = HashSet::new();
    while seen.len() < TOTAL {
        match ws.next(WAIT).await.unwrap() {
            WsEvent::Envelope(e) => {
                let m = a.unpack(&e).unwrap().0;
                let n: usize = m["content"].as_str().unwrap()[..3].parse().unwrap();
                assert!(seen.insert(n), "{n} twice");
            }
            WsEvent::Closed(r) => panic!("closed: {r:?}"),
        }
    }
    read_on_until_depth(&n, &mut ws, 0, "everything read removed").await;
}
