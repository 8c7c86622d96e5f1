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
