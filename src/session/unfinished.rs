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

/// One message's share of the budget: the bytes it holds, charged once they pass
/// [`FREE_BYTES`] (all of them then), as they arrive, never what a header merely declares
/// (sixteen headers declaring 4 MiB each, and never followed by their bytes, took the whole
/// budget for the cost of a few hundred bytes). Given back when dropped or cleared.
pub struct Share {
    of: Arc<Unfinished>,
    /// Bytes held by the message.
    held: usize,
    /// Bytes taken from the budget for it: 0, or `held` once it passed [`FREE_BYTES`].
    charged: usize,
}

impl Share {
    /// A share of `of` for one message, holding nothing yet.
    pub fn of(of: &Arc<Unfinished>) -> Share {
        Share {
            of: of.clone(),
            held: 0,
            charged: 0,
        }
    }

    /// The message holds `total` bytes now (more or fewer than before); false when the budget
    /// does not have them (the share stays as it was).
    pub fn hold(&mut self, total: usize) -> bool {
        let want = if total > FREE_BYTES { total } else { 0 };
        if want > self.charged {
            if !self.of.try_take(want - self.charged) {
                return false;
            }
        } else {
            self.of.give(self.charged - want);
        }
        self.held = total;
        self.charged = want;
        true
    }

    /// `n` more bytes of the message arrived ([`Share::hold`]).
    pub fn grow(&mut self, n: usize) -> bool {
        self.hold(self.held.saturating_add(n))
    }

    /// The message is whole (or dropped): its bytes are given back.
    pub fn clear(&mut self) {
        self.hold(0);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_charged_what_they_hold_past_the_free_bytes_and_give_it_back() {
        let b = Arc::new(Unfinished::new(100 << 10));
        let mut small = Share::of(&b);
        assert!(small.hold(FREE_BYTES), "small messages are free");
        assert_eq!(b.held(), 0);
        let mut shares: Vec<Share> = (0..BUDGET_MESSAGES)
            .map(|_| {
                let mut s = Share::of(&b);
                assert!(s.grow(60 << 10) && s.grow(40 << 10), "within the budget");
                s
            })
            .collect();
        assert_eq!(b.held(), BUDGET_MESSAGES * (100 << 10));
        let mut more = Share::of(&b);
        assert!(more.grow(FREE_BYTES), "free");
        assert!(!more.grow(1), "past the budget");
        assert_eq!(b.held(), BUDGET_MESSAGES * (100 << 10), "a refusal takes nothing");
        shares[0].clear();
        assert!(more.grow(1), "room again");
        drop(shares);
        drop(more);
        small.clear();
        assert_eq!(b.held(), 0);
    }
}
