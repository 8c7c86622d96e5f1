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
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn health(&self) -> StoreResult<()> {
        self.inner.health().await
    }
    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity> {
        self.inner.identity_get_or_create(candidate).await
    }
    async fn put_connection(&self, c: &Connection) -> StoreResult<()> {
        self.inner.put_connection(c).await
    }
    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.inner.get_connection(id).await
    }
    async fn put_invitation(&self, id: &str, single_use: bool, created_at_ms: i64) -> StoreResult<()> {
        self.inner.put_invitation(id, single_use, created_at_ms).await
    }
    async fn use_invitation(&self, id: &str) -> StoreResult<InvitationUse> {
        self.inner.use_invitation(id).await
    }
    async fn update_connection(&self, id: &str, patch: &ConnectionPatch) -> StoreResult<Option<Connection>> {
        self.inner.update_connection(id, patch).await
    }
    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>> {
        self.inner.connection_by_their_verkey(verkey).await
    }
    async fn connection_by_thread(&self, thid: &str) -> StoreResult<Option<Connection>> {
        self.inner.connection_by_thread(thid).await
    }
    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>> {
        self.inner.list_connections(after, limit).await
    }
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        self.inner.update_keys(conn, add, remove).await
    }
    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        self.inner.keys_of(conn).await
    }
    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        self.inner.route(recipient_key).await
    }
    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.inner.enqueue(msgs, limits).await
    }
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.inner.enqueue_routed(msgs, limits).await
    }
    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        self.inner.ack_leased(conn, ids).await
    }
    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64> {
        self.inner.release(conn, ids, owner).await
    }
    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats> {
        self.inner.queue_stats(conn, now_ms).await
    }
    async fn total_queued(&self) -> StoreResult<u64> {
        self.inner.total_queued().await
    }
    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>> {
        self.inner.connections_with_pending(now_ms, after, limit).await
    }
    async fn pending_among(&self, conns: &[ConnId], now_ms: i64) -> StoreResult<Vec<ConnId>> {
        self.inner.pending_among(conns, now_ms).await
    }
    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64> {
        self.inner.prune_dedup(before_ms, max).await
    }
    async fn dedup_records(&self) -> StoreResult<u64> {
        self.inner.dedup_records().await
    }
    async fn lease_for_key(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.inner
            .lease_for_key(conn, recipient_key, max, owner, now_ms, until_ms)
            .await
    }
    async fn queue_stats_for_key(&self, conn: &str, recipient_key: &str, now_ms: i64) -> StoreResult<QueueStats> {
        self.inner.queue_stats_for_key(conn, recipient_key, now_ms).await
    }
    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        self.inner.expire(received_before_ms).await
    }
    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.inner.expire_due(now_ms, max).await
    }
    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>> {
        self.inner.oldest_received_ms().await
    }
    async fn flush(&self) -> StoreResult<()> {
        self.inner.flush().await
    }
    async fn device_of(&self, conn: &str) -> StoreResult<Option<Device>> {
        self.inner.device_of(conn).await
    }
    async fn set_device(&self, conn: &str, device: Option<&Device>) -> StoreResult<()> {
        self.inner.set_device(conn, device).await
    }
    async fn forget_device_token(&self, conn: &str, token: &str) -> StoreResult<bool> {
        self.inner.forget_device_token(conn, token).await
    }
    async fn push_event(&self, conn: &str, now_ms: i64, window_ms: i64) -> StoreResult<PushSlot> {
        self.inner.push_event(conn, now_ms, window_ms).await
    }
    async fn push_take_due(&self, now_ms: i64, idle_before_ms: i64, limit: usize) -> StoreResult<Vec<ConnId>> {
        self.inner.push_take_due(now_ms, idle_before_ms, limit).await
    }
    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        self.inner.delete_connection(id).await
    }
    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        self.inner.drop_queue(conn).await
    }
    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        self.inner.top_queues(limit).await
    }
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
