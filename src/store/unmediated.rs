//! The collection of connections nobody uses (`limits.unmediated_connection_ttl_secs`).
//!
//! Anyone can make a connection: a DID exchange with a fresh key costs nothing, and each one is
//! a durable record. A wallet asks for mediation right after it connects (Credo and ACA-Py in
//! the same run), so a connection still without mediation a day later is of no use to anybody;
//! left, a stream of handshakes would grow the store for ever. [`collect`] walks the
//! connections a page at a time and removes those, each with [`Store::delete_unmediated`],
//! which checks again under the store's locks: a mediation granted meanwhile, on any node,
//! keeps its connection.

use super::{MediationState, Store, StoreResult};

/// Connections read per store call of the walk.
pub const PAGE: usize = 500;

/// Walks at most `pages` pages of connections from `cursor` (connection id order; `None`:
/// from the first) and removes those without mediation made before `created_before_ms`.
/// Moves `cursor` on (back to `None` at the end, for the next round). Returns how many were
/// removed.
pub async fn collect(
    store: &dyn Store,
    cursor: &mut Option<String>,
    created_before_ms: i64,
    pages: usize,
) -> StoreResult<u64> {
    let mut removed = 0;
    for _ in 0..pages {
        let page = store.list_connections(cursor.as_deref(), PAGE).await?;
        for c in &page {
            if c.mediation == MediationState::None
                && c.created_at_ms < created_before_ms
                && store.delete_unmediated(&c.id, created_before_ms).await?
            {
                removed += 1;
            }
        }
        *cursor = match page.last() {
            Some(last) if page.len() == PAGE => Some(last.id.clone()),
            _ => None,
        };
        if cursor.is_none() {
            break;
        }
        tokio::task::yield_now().await;
    }
    Ok(removed)
}
