//! The node-wide budget for messages not yet whole: `POST /` bodies being read, WebSocket
//! frames being received, and WebSocket messages sent in fragments. Each is bounded on its
//! own (`limits.max_envelope_bytes`, `limits.max_ws_frame_bytes`) and in time
//! (`limits.message_timeout_ms`, the heartbeat), but a client opening many connections and
//! finishing none of its messages held one limit's worth on each: gigabytes, with sessions
//! and connections to spare. Together they now hold at most [`BUDGET_MESSAGES`] of the larger
//! limit; past it a message is refused (a body 503, a socket closed 1013: try again later).
//!
//! A message of at most [`FREE_BYTES`] is never counted: nearly every message a mediator
//! gets is that small, and those are whole within a read or two.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Messages up to this size are not counted.
pub const FREE_BYTES: usize = 16 << 10;

/// The budget, in the larger of `limits.max_envelope_bytes` and `limits.max_ws_frame_bytes`.
pub const BUDGET_MESSAGES: usize = 16;

/// Bytes of unfinished messages the node holds, and how many it may.
#[derive(Debug)]
pub struct Unfinished {
    held: AtomicUsize,
    limit: usize,
}

impl Unfinished {
    /// A budget of [`BUDGET_MESSAGES`] messages of `largest` bytes.
    pub fn new(largest: usize) -> Unfinished {
        Unfinished {
            held: AtomicUsize::new(0),
            limit: largest.saturating_mul(BUDGET_MESSAGES),
        }
    }

    /// Takes `n` bytes of the budget, if it has them.
    pub fn try_take(&self, n: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.limit {
            self.held.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back `n` bytes taken.
    pub fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// A share of the budget, given back when dropped.
pub struct Share {
    of: Arc<Unfinished>,
    bytes: usize,
}

impl Share {
    /// `bytes` of `of` for one message (nothing taken for one of at most [`FREE_BYTES`]);
    /// `None` when the budget does not have them.
    pub fn take(of: &Arc<Unfinished>, bytes: usize) -> Option<Share> {
        let bytes = if bytes > FREE_BYTES { bytes } else { 0 };
        if bytes > 0 && !of.try_take(bytes) {
            return None;
        }
        Some(Share { of: of.clone(), bytes })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.of.give(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_out_of_one_budget_and_go_back_when_dropped() {
        let b = Arc::new(Unfinished::new(100 << 10));
        let small = Share::take(&b, FREE_BYTES).expect("small messages are free");
        assert_eq!(b.held(), 0);
        let shares: Vec<Share> = (0..BUDGET_MESSAGES)
            .map(|_| Share::take(&b, 100 << 10).expect("within the budget"))
            .collect();
        assert!(Share::take(&b, FREE_BYTES + 1).is_none(), "past it");
        assert_eq!(b.held(), BUDGET_MESSAGES * (100 << 10), "a refusal takes nothing");
        drop(shares);
        drop(small);
        assert_eq!(b.held(), 0);
        assert!(Share::take(&b, 100 << 10).is_some());
    }
}
