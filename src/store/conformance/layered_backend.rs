//! The stack a node puts over its store (`src/node.rs`): the route cache over the latency
//! histograms over sled. The wrappers pass most calls through
//! ([`store_pass_through!`](crate::store_pass_through)); the whole suite on them shows that each
//! passed call reaches the same method of the store.

use super::*;

pub struct LayeredBackend {
    sled: sled_backend::SledBackend,
}

#[async_trait::async_trait]
impl Backend for LayeredBackend {
    async fn open(&self) -> Arc<dyn Store> {
        let latency = metered::latency_family();
        route_cache::RouteCache::wrap(metered::Metered::wrap(self.sled.open().await, latency))
    }
}

pub async fn run<F, Fut>(check: F)
where
    F: FnOnce(Arc<dyn Backend>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let b = Arc::new(LayeredBackend {
        sled: sled_backend::SledBackend {
            dir: tempfile::tempdir().expect("tempdir"),
        },
    });
    rethrow(run_check(b, check).await);
}

/// A route cached on this node that another node's keylist change made stale (its
/// `RoutesChanged` frame lost) is forgotten once a keylist update here finds that the cached
/// holder no longer holds the key: the next lookup reads the store. (A proven DID's takeover
/// decides with `route`; it would otherwise keep removing the key from the wrong connection.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_route_is_forgotten_when_an_update_finds_the_key_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The store both nodes share; this node sees it through its route cache.
    let shared = sled_backend::SledBackend { dir }.open().await;
    let here = route_cache::RouteCache::wrap(shared.clone());
    let (a, b) = (new_conn(&shared).await, new_conn(&shared).await);
    let k = vec!["key-k".to_string()];
    shared.update_keys(&a, &k, &[]).await.unwrap();
    assert_eq!(here.route(&k[0]).await.unwrap(), Some(a.clone()));
    // Another node moves the key from a to b; this node is not told.
    shared.update_keys(&a, &[], &k).await.unwrap();
    shared.update_keys(&b, &k, &[]).await.unwrap();
    assert_eq!(here.route(&k[0]).await.unwrap(), Some(a.clone()), "cached");
    let out = here.update_keys(&a, &[], &k).await.unwrap();
    assert_eq!(out, vec![(k[0].clone(), KeyUpdate::NotFound)]);
    assert_eq!(here.route(&k[0]).await.unwrap(), Some(b.clone()));
    // An addition refused as held by another connection forgets the key too.
    let c = new_conn(&shared).await;
    shared.update_keys(&b, &[], &k).await.unwrap();
    shared.update_keys(&c, &k, &[]).await.unwrap();
    assert_eq!(here.route(&k[0]).await.unwrap(), Some(b.clone()), "cached");
    let out = here.update_keys(&a, &k, &[]).await.unwrap();
    assert_eq!(out, vec![(k[0].clone(), KeyUpdate::HeldByOther)]);
    assert_eq!(here.route(&k[0]).await.unwrap(), Some(c));
}

/// A forward refused for a stale cached route (the key moved off its cached holder by another
/// node, whose `RoutesChanged` frame was lost) forgets every cached route of that holder: its
/// other keys may have moved too (a DID's other form), and the forward's one retry must find
/// them fresh. Before, only the refused key was forgotten: the retry met the other stale
/// route, and the sender was answered 404 although another connection holds the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_route_refused_forgets_the_holders_other_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = sled_backend::SledBackend { dir }.open().await;
    let here = route_cache::RouteCache::wrap(shared.clone());
    let (a, b) = (new_conn(&shared).await, new_conn(&shared).await);
    let (long, short) = ("did-long-form".to_string(), "did-short-form".to_string());
    let keys = vec![long.clone(), short.clone()];
    shared.update_keys(&a, &keys, &[]).await.unwrap();
    for k in &keys {
        assert_eq!(here.route(k).await.unwrap(), Some(a.clone()));
    }
    // Another node: a removes both forms, b registers the short one; this node is not told.
    shared.update_keys(&a, &[], &keys).await.unwrap();
    shared.update_keys(&b, std::slice::from_ref(&short), &[]).await.unwrap();
    let to = |conn: &str, key: &str| NewMessage {
        recipient_key: key.to_owned(),
        ..msg(conn, "m", T0)
    };
    let r = here
        .enqueue_routed(vec![to(&a, &long)], &EnqueueLimits::UNLIMITED)
        .await
        .unwrap();
    assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
    assert_eq!(
        here.route(&short).await.unwrap(),
        Some(b),
        "read again, not the stale a"
    );
}

/// A store whose own `lease` and `lease_for_key` count their calls (as a test's fault injector
/// holds or hides them): the rest is the store it wraps.
struct CountsLeases {
    inner: Arc<dyn Store>,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Store for CountsLeases {
    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.lease(conn, max, owner, now_ms, until_ms).await
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
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner
            .lease_for_key(conn, recipient_key, max, owner, now_ms, until_ms)
            .await
    }
    crate::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease_upto,
        ack_leased, release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats,
        total_queued, connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log,
        begin_run, end_run, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms, flush,
        device_of, set_device, forget_device_token, push_event, push_take_due, push_done, first_sight,
        forget_sight, prune_sights, delete_connection, delete_unmediated, revoke_mediation, drop_queue,
        top_queues,
    );
}

/// `lease` and `lease_for_key` are provided methods (no byte budget), yet the node's wrappers
/// pass them on as themselves: a store under the stack with a `lease` of its own (the tests'
/// fault injectors) still gets the calls made to `lease`, while `lease_upto` reaches the
/// store's own `lease_upto`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_s_wrappers_pass_lease_on_as_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counted = Arc::new(CountsLeases {
        inner: sled_backend::SledBackend { dir }.open().await,
        calls: Default::default(),
    });
    let stack = route_cache::RouteCache::wrap(metered::Metered::wrap(counted.clone(), metered::latency_family()));
    let c = new_conn(&counted.inner).await;
    let id = enqueue_ok(&counted.inner, (0..3).map(|i| msg(&c, &format!("m{i}"), T0)).collect()).await;
    let calls = || counted.calls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        ids(&stack.lease(&c, 1, "o", T0, T0 + 1_000).await.unwrap()),
        vec![id[0]]
    );
    let key = format!("rk-{c}");
    let l = stack.lease_for_key(&c, &key, 1, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[1]]);
    assert_eq!(calls(), 2);
    let l = stack.lease_upto(&c, 10, 1, "o", T0, T0 + 1_000).await.unwrap();
    assert_eq!(ids(&l), vec![id[2]]);
    assert_eq!(calls(), 2, "lease_upto is a method of its own");
}
