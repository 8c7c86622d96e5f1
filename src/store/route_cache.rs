//! Routes cached on the node: a [`Store`] wrapper that answers [`Store::route`] from memory
//! once a key was looked up, so a forward costs no store round trip for its route.
//!
//! The store stays the truth. Only positive answers are cached, and a forward uses a cached
//! route only through [`Store::enqueue_routed`], which the store refuses (`NoRoute`) when the
//! key no longer routes to that connection: a stale entry costs a second lookup, never a
//! message queued for a connection that lost the key. (Keylist handling that decides with a
//! route, a proven DID's takeover, looks again when the store answers that the cached holder
//! no longer holds the key.) Entries are forgotten when:
//! - a keylist update here answers a key removed, not found, held by another connection or
//!   already held;
//! - this node removes keys ([`Store::update_keys`]), a connection
//!   ([`Store::delete_connection`]) or a connection's mediation ([`Store::revoke_mediation`]):
//!   the change is also handed to the publisher (the node sends it to every peer as a cluster
//!   `RoutesChanged` frame);
//! - a peer says so ([`RouteCache::forget`], from that frame);
//! - a routed enqueue was refused with `NoRoute` (the key left, or the connection's mediation
//!   was revoked: the store decides at enqueue, so a cached route never delivers to either).
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
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        let r = self.inner.update_keys(conn, add, remove).await;
        // Whatever the outcome (an error leaves it unknown), no removed key stays cached; the
        // peers are told of those removed here.
        let gone: Vec<String> = match &r {
            Ok(out) => out
                .iter()
                .filter(|(_, u)| *u == KeyUpdate::Removed)
                .map(|(k, _)| k.clone())
                .collect(),
            Err(_) => remove.to_vec(),
        };
        // Nor does any key whose answer says the cache may be wrong about it: a removal that
        // found nothing (the key moved on another node, and its `RoutesChanged` frame was
        // lost), an addition refused as held by another connection or already held.
        let doubtful: Vec<String> = match &r {
            Ok(out) => out
                .iter()
                .filter(|(_, u)| {
                    matches!(
                        u,
                        KeyUpdate::NotFound | KeyUpdate::HeldByOther | KeyUpdate::AlreadyAdded
                    )
                })
                .map(|(k, _)| k.clone())
                .chain(gone.iter().cloned())
                .collect(),
            Err(_) => remove.iter().chain(add).cloned().collect(),
        };
        if !doubtful.is_empty() {
            self.forget(conn, &doubtful);
        }
        if !gone.is_empty() {
            self.publish(conn, &gone);
        }
        r
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
        for ((conn, _), r) in sent.iter().zip(&out) {
            if matches!(r, Err(StoreError::NoRoute)) {
                // Every route of that connection, not only the refused one: a change this node
                // missed (its `RoutesChanged` frame lost) may have moved its other keys too
                // (a DID's other form), and a forward's retry must find them fresh, or it
                // answers the sender 404 and the mail is lost. Rare: the frames keep it fresh.
                self.forget(conn, &[]);
            }
        }
        Ok(out)
    }
    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        let r = self.inner.delete_connection(id).await;
        self.forget(id, &[]);
        self.publish(id, &[]);
        r
    }
    async fn delete_unmediated(&self, id: &str, created_before_ms: i64) -> StoreResult<bool> {
        // A connection without mediation holds no routing key: nothing of it is cached.
        self.inner.delete_unmediated(id, created_before_ms).await
    }
    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>> {
        let r = self.inner.revoke_mediation(id, updated_at_ms).await;
        // Whatever the outcome: the store refuses the connection from now on anyway, this
        // spares the lookups that would learn it.
        self.forget(id, &[]);
        self.publish(id, &[]);
        r
    }
    crate::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route_long_forms, enqueue, lease, lease_upto, ack_leased, release, release_owner,
        release_owners_under, reclaim_expired_leases, queue_stats,
        total_queued, connections_with_pending, pending_among, prune_dedup, dedup_records,
        queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms, flush,
        device_of, set_device, forget_device_token, push_event, push_take_due, push_done, drop_queue,
        first_sight, forget_sight, prune_sights,
        top_queues,
    );
}
