//! The wallets owed a wake-up ([`Store::owed_wakes`]): on PostgreSQL, a forward to an offline
//! wallet is committed and answered 2xx, and its push event then waits in the memory of the
//! node that accepted it (its push channel, its turn in the worker, its device lookup) until
//! the push window records it. A node that dies in between (kill -9, OOM, a host lost) leaves
//! the wallet asleep with mail queued, and no claim for another node to take over. Those
//! wallets are found in the store (a device, mail received after their last push, no push due
//! or claimed) and woken: by the node's own start after such a run
//! ([`wake_after_unclean_stop`]), and by the node that takes over a failed peer
//! ([`wake_owed`]), for a peer that never comes back.
//!
//! Only for mail received lately: within the time an idle push window is kept
//! ([`crate::push::PushHandle::windows_kept_ms`], 2 minutes by default) less a margin for
//! the nodes' clocks (`CLOCK_MARGIN_MS`).
//! A wallet pushed for such mail still has its window, which says so; past that, a wallet
//! without a window may have been pushed long ago (its window forgotten), and every sleeping
//! wallet with old mail would be pushed again at each take-over. An event is in a node's memory
//! for seconds (minutes only while the store does not answer its device lookup), and a failed
//! peer is taken over within `cluster.failure_timeout_ms`; a node restarted later than that
//! after its crash, with no peer to take it over, leaves older events unwoken.

/// Taken off the windows' keep: the nodes' clocks may differ by up to the store's bound on skew.
const CLOCK_MARGIN_MS: i64 = 5_000;

use super::{asked_until_answered, wake_all_pending, EndpointTry, Shared, WAKE_PENDING_CHUNK};
use crate::protocols::now_ms;
use crate::store::Store;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Each wallet of [`Store::owed_wakes`], page after page, treated as if a message were queued
/// now ([`Shared::queued_new`]: its session woken wherever it is, else pushed), pushed only if
/// nobody pushed it since its newest message was received: several nodes waking the same
/// wallets (a restart and a peer's take-over) push each once. `store` is the node's store
/// below its route cache (which passes on only the methods it lists). Nothing else would wake
/// these wallets, so a store that fails is tried again (every `delivery.sweep_interval_ms`,
/// from where it failed) until the node stops. `None`: the store does not track what is owed
/// (sled); else how many wallets it woke, and whether it reached them all (false: the node
/// began to stop).
pub async fn wake_owed(shared: &Arc<Shared>, store: &Arc<dyn Store>) -> Option<(usize, bool)> {
    let mut after: Option<String> = None;
    let mut woken = 0;
    // Without push, no window is written: every wallet with mail is one nobody pushed.
    let recent_ms = shared
        .push
        .get()
        .map_or(i64::MAX, |p| p.windows_kept_ms().saturating_sub(CLOCK_MARGIN_MS).max(0));
    let since = now_ms().saturating_sub(recent_ms);
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return Some((woken, false));
        }
        let asked = asked_until_answered(shared, "wallets owed a wake-up", || {
            store.owed_wakes(now_ms(), after.as_deref(), WAKE_PENDING_CHUNK)
        });
        let page = match asked.await {
            Some(Some(page)) => page,
            Some(None) => return None,
            None => return Some((woken, false)),
        };
        for o in page.owed.iter().filter(|o| o.newest_received_ms > since) {
            shared
                .queued_new_unless_pushed_since(&o.connection, Some(o.newest_received_ms), EndpointTry::New)
                .await;
            woken += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Some((woken, true)),
        }
    }
}

/// After a run of this node that ended without its stop ([`Store::begin_node_run`] said so):
/// the wallets owed a wake-up where the store tracks them ([`wake_owed`]; PostgreSQL), every
/// wallet with mail pending where it does not ([`wake_all_pending`]; sled, whose deliveries
/// were in the dead node's memory). How many it woke, and whether it reached them all.
pub async fn wake_after_unclean_stop(shared: &Arc<Shared>, store: &Arc<dyn Store>) -> (usize, bool) {
    match wake_owed(shared, store).await {
        Some(done) => done,
        None => wake_all_pending(shared).await,
    }
}
