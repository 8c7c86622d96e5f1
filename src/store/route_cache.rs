//! Routes cached on the node: a [`Store`] wrapper that answers [`Store::route`] from memory
//! once a key was looked up, so a forward costs no store round trip for its route.
//!
//! The store stays the truth. Only positive answers are cached, and a cached route is only
//! ever used through [`Store::enqueue_routed`], which the store refuses (`NoRoute`) when the
//! key no longer routes to that connection: a stale entry costs a second lookup, never a
//! message queued for a connection that lost the key. Entries are forgotten when:
//! - this node removes keys ([`Store::update_keys`]) or a connection
//!   ([`Store::delete_connection`]): the change is also handed to the publisher (the node
//!   sends it to every peer as a cluster `RoutesChanged` frame);
//! - a peer says so ([`RouteCache::forget`], from that frame);
//! - a routed enqueue was refused with `NoRoute`.
//!
//! A lookup that an invalidation overtook is not cached (a generation number), and the cache
//! is cleared whole when it reaches its capacity.
//!
//! Must not: change any answer other than `route`'s timing; hold its lock across an await.

use super::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// Routes kept before the cache is cleared and starts over.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Called with `(connection, keys)` when this node removed routing keys of a connection (every
/// key of it when `keys` is empty).
pub type Publisher = Box<dyn Fn(&str, &[String]) + Send + Sync>;

#[derive(Default)]
struct State {
    routes: HashMap<String, ConnId>,
    /// Bumped by every invalidation.
    generation: u64,
}

pub struct RouteCache {
    inner: Arc<dyn Store>,
    state: Mutex<State>,
    capacity: usize,
    publisher: Mutex<Option<Arc<Publisher>>>,
}

impl RouteCache {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<RouteCache> {
        Self::with_capacity(inner, DEFAULT_CAPACITY)
    }

    pub fn with_capacity(inner: Arc<dyn Store>, capacity: usize) -> Arc<RouteCache> {
        Arc::new(RouteCache {
            inner,
            state: Mutex::new(State::default()),
            capacity: capacity.max(1),
            publisher: Mutex::new(None),
        })
    }

    /// Where this node's removals go (the cluster, once it is up).
    pub fn set_publisher(&self, p: Publisher) {
        *self.publisher.lock() = Some(Arc::new(p));
    }

    fn publish(&self, conn: &str, keys: &[String]) {
        let p = self.publisher.lock().clone();
        if let Some(p) = p {
            p(conn, keys);
        }
    }

    /// Forgets the cached routes of `keys` to `conn` (every route to `conn` when `keys` is
    /// empty). A route of one of those keys to another connection is forgotten too: it is
    /// as cheap to look up again as to reason about.
    pub fn forget(&self, conn: &str, keys: &[String]) {
        let mut st = self.state.lock();
        st.generation += 1;
        if keys.is_empty() {
            st.routes.retain(|_, c| c != conn);
        } else {
            for k in keys {
                st.routes.remove(k);
            }
        }
    }

    /// Routes held now.
    pub fn len(&self) -> usize {
        self.state.lock().routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait::async_trait]
impl Store for RouteCache {
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
        let r = self.inner.update_keys(conn, add, remove).await;
        // Whatever the outcome (an error leaves it unknown), no removed key stays cached.
        let gone: Vec<String> = match &r {
            Ok(out) => out
                .iter()
                .filter(|(_, u)| *u == KeyUpdate::Removed)
                .map(|(k, _)| k.clone())
                .collect(),
            Err(_) => remove.to_vec(),
        };
        if !gone.is_empty() {
            self.forget(conn, &gone);
            self.publish(conn, &gone);
        }
        r
    }
    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        self.inner.keys_of(conn).await
    }
    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        if let Some(c) = self.state.lock().routes.get(recipient_key) {
            return Ok(Some(c.clone()));
        }
        let generation = self.state.lock().generation;
        let r = self.inner.route(recipient_key).await?;
        if let Some(c) = &r {
            let mut st = self.state.lock();
            // A key forgotten while this lookup ran may have been answered before the change:
            // cache only answers that no invalidation overtook.
            if st.generation == generation {
                if st.routes.len() >= self.capacity {
                    st.routes.clear();
                }
                st.routes.insert(recipient_key.to_owned(), c.clone());
            }
        }
        Ok(r)
    }
    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.inner.enqueue(msgs, limits).await
    }
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        let sent: Vec<(ConnId, String)> = msgs
            .iter()
            .map(|m| (m.connection.clone(), m.recipient_key.clone()))
            .collect();
        let out = self.inner.enqueue_routed(msgs, limits).await?;
        for ((conn, key), r) in sent.iter().zip(&out) {
            if matches!(r, Err(StoreError::NoRoute)) {
                self.forget(conn, std::slice::from_ref(key));
            }
        }
        Ok(out)
    }
    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.inner.lease(conn, max, owner, now_ms, until_ms).await
    }
    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        self.inner.ack_leased(conn, ids).await
    }
    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64> {
        self.inner.release(conn, ids, owner).await
    }
    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        self.inner.release_owner(owner).await
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
        let r = self.inner.delete_connection(id).await;
        self.forget(id, &[]);
        self.publish(id, &[]);
        r
    }
    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        self.inner.drop_queue(conn).await
    }
    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        self.inner.top_queues(limit).await
    }
}
