//! A live lease that lands after its session closed: the session's end gives its leases back
//! (`release_owner`), but a lease still in flight then may take the message again for the gone
//! socket, where it would stay until the lease ran out. A store wrapper holds one session's
//! lease until that release has happened, so the race is played every time.

mod common;

use async_trait::async_trait;
use common::*;
use mailroom::client::{basic_message, Sender};
use mailroom::config::Strategy;
use mailroom::node::{self, NodeOptions};
use mailroom::store::*;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The node's store, except that once armed, the next `lease` waits for a `release_owner`.
struct GatedLeases {
    inner: Arc<dyn Store>,
    armed: AtomicBool,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    released: Notify,
    gated_lease_done: Notify,
}

#[async_trait]
impl Store for GatedLeases {
    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return self.inner.lease(conn, max, owner, now_ms, until_ms).await;
        }
        // Like the real stores (a thread of their own), the held lease happens whether or not
        // its caller still waits for it.
        let (gate, inner) = (self.gate.clone(), self.inner.clone());
        let (conn, owner) = (conn.to_owned(), owner.to_owned());
        tokio::spawn(async move {
            gate.released.notified().await;
            let r = inner.lease(&conn, max, &owner, now_ms, until_ms).await;
            gate.gated_lease_done.notify_one();
            r
        })
        .await
        .expect("held lease")
    }
    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        let r = self.inner.release_owner(owner).await;
        self.gate.released.notify_one();
        r
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, enqueue, enqueue_routed, ack_leased, release,
        release_owners_under,
        queue_stats, total_queued, connections_with_pending, pending_among, prune_dedup,
        dedup_records, queue_log_bytes, lease_for_key, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due,
        delete_connection, drop_queue, top_queues,
    );
}

#[actix_rt::test]
async fn a_lease_in_flight_when_its_session_closes_gives_the_message_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 60_000; // only the session's end can free it in time
    let gated = Arc::new(GatedLeases {
        inner: open_sled(&dir.path().join("data")).await.unwrap(),
        armed: AtomicBool::new(false),
        gate: Arc::default(),
    });
    let l = node::bind_ephemeral(&mut cfg, "n1", false).unwrap();
    let n = node::spawn(
        cfg,
        "n1",
        l,
        NodeOptions {
            store: Some(gated.clone()),
            config_path: None,
        },
    )
    .unwrap();
    let (a, k) = mailroom::client::Agent::onboard(&invitation(&n).await).await.unwrap();
    let live = || pickup("live-delivery-change", json!({"live_delivery": true}));

    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(&a, &mut ws, &live()).await;
    let g = a.grant.clone().unwrap();
    Sender::new()
        .forward(&n.public_url(), &basic_message("once"), &k.verkey(), &g.routing_keys)
        .await
        .unwrap();
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
