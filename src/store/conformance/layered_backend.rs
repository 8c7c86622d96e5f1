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
