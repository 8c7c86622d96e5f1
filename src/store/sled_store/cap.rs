//! The node-wide bound on queued messages (`store.max_queued_messages`): at it, new messages
//! are refused and everything else goes on.
//!
//! Every queued message holds memory for as long as it is queued: its entry in the index (its
//! id and 48-byte [`super::index::Meta`] in a B-tree leaf: ~110 bytes, leaves filled in id
//! order end about half full), its record's location in the queue log's live set (24-48
//! bytes), its dedup entry while it is in the window, its expiry entry when its sender set one:
//! ~250-350 bytes of RSS a queued message measured (docs/BENCHMARKS.md), more right after a
//! restart. The per-connection bounds (`limits.max_queue_messages`) do not bound their sum:
//! anyone may open connections, forwards fill each one to its bound, and the messages stay up
//! to the TTL. At this bound the writer refuses new messages with [`StoreError::Full`] (507,
//! as under the free-disk reserve, [`super::space`]); pickups, acknowledgements and expiry go
//! on and make room, and the next message that fits is queued. A duplicate queues nothing: it
//! is still answered as a duplicate.
//!
//! The count is the index's ([`super::index::Queues::total`]), decided by the writer under the
//! index lock with its batch's own additions, so the bound is exact. Said once when it is
//! reached and once when the queue is back under seven eighths of it (read by the writer and
//! the supervisor's tick), not at every refusal: a node held at the bound by forwards that
//! take each freed place would otherwise log at every acknowledgement.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

use crate::store::{StoreError, StoreResult};

/// The bound when none is configured: room for a production node's honest load (a thousand
/// connections at the default `limits.max_queue_messages` of 10,000, or 100,000 wallets with
/// 100 messages each) in ~2.5-3.5 GiB of RSS, where the node would otherwise grow until the
/// kernel kills it.
pub const DEFAULT_MAX_QUEUED_MESSAGES: u64 = 10_000_000;

pub(super) struct QueueCap {
    /// Most messages the node holds queued (at least 1: the config refuses 0).
    max: u64,
    /// Whether the bound was reached and the queue has not yet gone back under seven eighths
    /// of it (the log lines' state; refusals are decided on the count alone).
    reached: AtomicBool,
}

impl QueueCap {
    pub(super) fn new(max: u64) -> QueueCap {
        QueueCap {
            max,
            reached: AtomicBool::new(false),
        }
    }

    /// `Ok` when one more message fits beside the `queued` ones, else `Err(Full)` naming the
    /// setting (said once, when the bound is first reached).
    pub(super) fn admit(&self, queued: u64) -> StoreResult<()> {
        if queued < self.max {
            return Ok(());
        }
        if !self.reached.swap(true, SeqCst) {
            tracing::warn!(
                queued,
                max_queued_messages = self.max,
                "sled: the node holds store.max_queued_messages queued messages: new messages refused (507), pickups and acknowledgements go on"
            );
        }
        Err(StoreError::Full(format!(
            "the node holds {queued} queued messages, its bound (store.max_queued_messages = {}): try later",
            self.max
        )))
    }

    /// Notes that `queued` messages are held: once under seven eighths of the bound after it
    /// was reached, says so (once).
    pub(super) fn observe(&self, queued: u64) {
        if queued < self.max - self.max / 8 && self.reached.load(SeqCst) && self.reached.swap(false, SeqCst) {
            tracing::info!(
                queued,
                max_queued_messages = self.max,
                "sled: queued messages back under seven eighths of store.max_queued_messages: room for new messages"
            );
        }
    }

    /// Whether a new message would be refused beside the `queued` ones now.
    pub(super) fn refuses(&self, queued: u64) -> bool {
        queued >= self.max
    }

    /// Whether the bound was reached and the queue has not gone back under seven eighths of it.
    pub(super) fn reached(&self) -> bool {
        self.reached.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_at_the_bound_and_says_so_once_until_room_is_back() {
        let c = QueueCap::new(16);
        assert!(c.admit(15).is_ok());
        assert!(!c.reached());
        let e = c.admit(16).unwrap_err();
        assert!(
            matches!(e, StoreError::Full(ref m) if m.contains("store.max_queued_messages = 16")),
            "{e}"
        );
        assert!(c.reached());
        assert!(c.admit(15).is_ok(), "one place freed: the next message is queued");
        c.observe(14);
        assert!(c.reached(), "not said back until under seven eighths");
        c.observe(13);
        assert!(!c.reached());
        let one = QueueCap::new(1);
        assert!(one.admit(0).is_ok());
        assert!(one.admit(1).is_err());
        one.observe(1);
        assert!(one.reached());
        one.observe(0);
        assert!(!one.reached());
    }
}
