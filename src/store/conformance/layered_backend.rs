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
