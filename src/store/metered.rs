//! A [`Store`] wrapper that times every call into a histogram labelled by operation
//! (`mailroom_store_seconds{op="enqueue"}`), whatever the backend. The node wraps its store
//! in it; nothing else changes.

use super::*;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

pub type StoreLatency = Family<OpLabel, Histogram, fn() -> Histogram>;

/// 50 us .. ~1.6 s.
pub fn latency_family() -> StoreLatency {
    Family::new_with_constructor(|| {
        Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.00005, 2.0, 16,
        ))
    })
}

pub struct Metered {
    inner: Arc<dyn Store>,
    latency: StoreLatency,
}

impl Metered {
    pub fn wrap(inner: Arc<dyn Store>, latency: StoreLatency) -> Arc<dyn Store> {
        Arc::new(Metered { inner, latency })
    }

    async fn timed<T>(&self, op: &'static str, f: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = f.await;
        self.latency
            .get_or_create(&OpLabel { op })
            .observe(start.elapsed().as_secs_f64());
        out
    }
}

#[async_trait::async_trait]
impl Store for Metered {
    // Gauges and names, not store work: passed on untimed.
    crate::store_pass_through!(inner: backend, dedup_records, queue_log, begin_run, end_run, begin_node_run, end_node_run);
    async fn owed_wakes(&self, now_ms: i64, after: Option<&str>, limit: usize) -> StoreResult<Option<OwedPage>> {
        self.timed("owed_wakes", self.inner.owed_wakes(now_ms, after, limit))
            .await
    }
    async fn health(&self) -> StoreResult<()> {
        self.timed("health", self.inner.health()).await
    }
    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity> {
        self.timed("identity", self.inner.identity_get_or_create(candidate))
            .await
    }
    async fn put_connection(&self, c: &Connection) -> StoreResult<()> {
        self.timed("put_connection", self.inner.put_connection(c)).await
    }
    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        self.timed("get_connection", self.inner.get_connection(id)).await
    }
    async fn put_invitation(&self, id: &str, single_use: bool, created_at_ms: i64) -> StoreResult<()> {
        self.timed(
            "put_invitation",
            self.inner.put_invitation(id, single_use, created_at_ms),
        )
        .await
    }
    async fn use_invitation(&self, id: &str, claimant: &str) -> StoreResult<InvitationUse> {
        self.timed("use_invitation", self.inner.use_invitation(id, claimant))
            .await
    }
    async fn update_connection(&self, id: &str, patch: &ConnectionPatch) -> StoreResult<Option<Connection>> {
        self.timed("update_connection", self.inner.update_connection(id, patch))
            .await
    }
    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>> {
        self.timed("connection_by_verkey", self.inner.connection_by_their_verkey(verkey))
            .await
    }
    async fn connection_by_thread(&self, thid: &str) -> StoreResult<Option<Connection>> {
        self.timed("connection_by_thread", self.inner.connection_by_thread(thid))
            .await
    }
    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>> {
        self.timed("list_connections", self.inner.list_connections(after, limit))
            .await
    }
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        self.timed("update_keys", self.inner.update_keys(conn, add, remove))
            .await
    }
    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        self.timed("keys_of", self.inner.keys_of(conn)).await
    }
    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        self.timed("route", self.inner.route(recipient_key)).await
    }
    async fn route_long_forms(&self, short: &str, limit: usize) -> StoreResult<Vec<(String, ConnId)>> {
        self.timed("route_long_forms", self.inner.route_long_forms(short, limit))
            .await
    }
    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.timed("enqueue", self.inner.enqueue(msgs, limits)).await
    }
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.timed("enqueue", self.inner.enqueue_routed(msgs, limits)).await
    }
    // `lease` and `lease_for_key` are passed on as themselves (a store under this one may
    // have its own), and timed under the same labels as the `_upto` calls.
    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.timed("lease", self.inner.lease(conn, max, owner, now_ms, until_ms))
            .await
    }
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.timed(
            "lease",
            self.inner.lease_upto(conn, max, max_bytes, owner, now_ms, until_ms),
        )
        .await
    }
    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        self.timed("ack", self.inner.ack_leased(conn, ids)).await
    }
    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64> {
        self.timed("release", self.inner.release(conn, ids, owner)).await
    }
    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        self.timed("release_owner", self.inner.release_owner(owner)).await
    }
    async fn release_owners_under(&self, prefix: &str, until_at_most_ms: i64) -> StoreResult<Vec<ConnId>> {
        self.timed(
            "release_owner",
            self.inner.release_owners_under(prefix, until_at_most_ms),
        )
        .await
    }
    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats> {
        self.timed("queue_stats", self.inner.queue_stats(conn, now_ms)).await
    }
    async fn total_queued(&self) -> StoreResult<u64> {
        self.timed("total_queued", self.inner.total_queued()).await
    }
    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>> {
        self.timed(
            "connections_with_pending",
            self.inner.connections_with_pending(now_ms, after, limit),
        )
        .await
    }
    async fn reclaim_expired_leases(&self, now_ms: i64, max: usize) -> StoreResult<Vec<crate::store::Reclaimed>> {
        self.timed("reclaim_expired_leases", self.inner.reclaim_expired_leases(now_ms, max))
            .await
    }
    async fn pending_among(&self, conns: &[ConnId], now_ms: i64) -> StoreResult<Vec<ConnId>> {
        self.timed("pending_among", self.inner.pending_among(conns, now_ms))
            .await
    }
    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64> {
        self.timed("prune_dedup", self.inner.prune_dedup(before_ms, max)).await
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
        self.timed(
            "lease_for_key",
            self.inner
                .lease_for_key(conn, recipient_key, max, owner, now_ms, until_ms),
        )
        .await
    }
    async fn lease_for_key_upto(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.timed(
            "lease_for_key",
            self.inner
                .lease_for_key_upto(conn, recipient_key, max, max_bytes, owner, now_ms, until_ms),
        )
        .await
    }
    async fn pending_stats(&self, conn: &str, recipient_key: Option<&str>, now_ms: i64) -> StoreResult<PendingStats> {
        self.timed("pending_stats", self.inner.pending_stats(conn, recipient_key, now_ms))
            .await
    }
    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        self.timed("expire", self.inner.expire(received_before_ms)).await
    }
    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.timed("expire_due", self.inner.expire_due(now_ms, max)).await
    }
    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>> {
        self.timed("oldest_received", self.inner.oldest_received_ms()).await
    }
    async fn flush(&self) -> StoreResult<()> {
        self.timed("flush", self.inner.flush()).await
    }
    async fn device_of(&self, conn: &str) -> StoreResult<Option<Device>> {
        self.timed("device_of", self.inner.device_of(conn)).await
    }
    async fn set_device(&self, conn: &str, device: Option<&Device>) -> StoreResult<()> {
        self.timed("set_device", self.inner.set_device(conn, device)).await
    }
    async fn forget_device_token(&self, conn: &str, token: &str) -> StoreResult<bool> {
        self.timed("forget_device_token", self.inner.forget_device_token(conn, token))
            .await
    }
    async fn push_event(
        &self,
        conn: &str,
        now_ms: i64,
        window_ms: i64,
        claim: NewClaim,
        unless_pushed_since_ms: Option<i64>,
    ) -> StoreResult<PushSlot> {
        self.timed(
            "push_event",
            self.inner
                .push_event(conn, now_ms, window_ms, claim, unless_pushed_since_ms),
        )
        .await
    }
    async fn push_take_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        idle_before_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<PushClaim>> {
        self.timed(
            "push_take_due",
            self.inner.push_take_due(now_ms, claim_until_ms, idle_before_ms, limit),
        )
        .await
    }
    async fn push_done(&self, conn: &str, token: i64, reopen_ms: Option<i64>) -> StoreResult<bool> {
        self.timed("push_done", self.inner.push_done(conn, token, reopen_ms))
            .await
    }

    async fn first_sight(&self, digest: &[u8; 32], now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        self.timed("first_sight", self.inner.first_sight(digest, now_ms, until_ms))
            .await
    }

    async fn forget_sight(&self, digest: &[u8; 32], until_ms: i64) -> StoreResult<()> {
        self.timed("forget_sight", self.inner.forget_sight(digest, until_ms))
            .await
    }

    async fn prune_sights(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.timed("prune_sights", self.inner.prune_sights(now_ms, max)).await
    }
    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        self.timed("delete_connection", self.inner.delete_connection(id)).await
    }
    async fn delete_unmediated(&self, id: &str, created_before_ms: i64) -> StoreResult<bool> {
        self.timed("delete_unmediated", self.inner.delete_unmediated(id, created_before_ms))
            .await
    }
    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>> {
        self.timed("revoke_mediation", self.inner.revoke_mediation(id, updated_at_ms))
            .await
    }
    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        self.timed("drop_queue", self.inner.drop_queue(conn)).await
    }
    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        self.timed("top_queues", self.inner.top_queues(limit)).await
    }
}
