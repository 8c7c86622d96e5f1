//! The live window of a WebSocket session in pickup 2.0 live mode
//! (`delivery.live_ack_wait_ms`): while a partial delivery (fewer messages than
//! `delivery.batch_size`) is unacknowledged on the socket, new messages wait in the queue and
//! the next delivery carries all of them once the wallet acknowledges: one pack, one
//! acknowledgement (an envelope the node opens), one status reply and one lease for several
//! messages instead of one each. Under load that is most of a live message's cost; at a
//! wallet's usual pace (nothing unacknowledged when the next message comes) nothing waits, and
//! full deliveries (a backlog) never hold the next one back, so a backlog streams.
//!
//! The window applies only to a wallet that acknowledges on the socket. Credo 0.6.3 sends its
//! `messages-received` over HTTP, and some wallets never send one: a delivery unacknowledged
//! here for the wait turns the window off until the next acknowledgement on the socket, so
//! such wallets get every delivery at once, as without a window. Leases are not touched: an
//! unacknowledged message still comes again when its lease runs out.
//!
//! Pure: no actix, no clock of its own (callers pass `Instant`s).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LiveWindow {
    /// How long new messages may wait for an acknowledgement (zero: the window is off).
    wait: Duration,
    /// Deliveries out, oldest first: when each was written, how many of its messages are
    /// unacknowledged, and whether it was partial (only those hold the next delivery back).
    unacked: VecDeque<Sent>,
    /// The wallet acknowledges on this socket: the window applies.
    acks_here: bool,
}

#[derive(Debug)]
struct Sent {
    at: Instant,
    left: u64,
    partial: bool,
}

impl LiveWindow {
    pub fn new(wait: Duration) -> LiveWindow {
        LiveWindow {
            wait,
            unacked: VecDeque::new(),
            acks_here: false,
        }
    }

    /// A delivery of `messages` was written to the socket at `at`; `partial`: it held fewer
    /// than a batch (the queue had no more).
    pub fn sent(&mut self, at: Instant, messages: u64, partial: bool) {
        if self.wait.is_zero() {
            return;
        }
        self.unacked.push_back(Sent {
            at,
            left: messages,
            partial,
        });
    }

    /// `n` messages were acknowledged on this socket: the oldest deliveries leave the window
    /// (a delivery acknowledged in part keeps its place for the rest).
    pub fn acknowledged(&mut self, mut n: u64) {
        self.acks_here = true;
        while let Some(d) = self.unacked.front_mut() {
            if n < d.left {
                d.left -= n;
                return;
            }
            n -= d.left;
            self.unacked.pop_front();
        }
    }

    /// `None` when a delivery may go out at `now`; else how long until the window reopens at
    /// the latest (an acknowledgement reopens it sooner).
    pub fn closed_for(&mut self, now: Instant) -> Option<Duration> {
        while let Some(d) = self.unacked.front() {
            if now.saturating_duration_since(d.at) < self.wait {
                break;
            }
            self.unacked.pop_front();
            self.acks_here = false;
        }
        if !self.acks_here {
            return None;
        }
        let held_by = self.unacked.iter().find(|d| d.partial)?;
        Some(self.wait.saturating_sub(now.saturating_duration_since(held_by.at)))
    }

    /// Nothing of this socket awaits an acknowledgement any more (live mode changed, or its
    /// leases were given back).
    pub fn clear(&mut self) {
        self.unacked.clear();
    }
}

/// Adds messages handed to the session to those held back for the window, keeping queue
/// order (`id` grows with arrival). The hand-offs of one node come in order
/// (`session::in_order`), but those of two nodes (forwards for one wallet accepted on both)
/// interleave; held back, they go out together, oldest first.
pub fn hold_in_queue_order<T>(held: &mut Vec<T>, msgs: impl IntoIterator<Item = T>, id: impl Fn(&T) -> i64) {
    let sorted_before = held.len();
    held.extend(msgs);
    if held[sorted_before.saturating_sub(1)..]
        .windows(2)
        .any(|w| id(&w[0]) > id(&w[1]))
    {
        // Stable, and linear on the usual input: two sorted runs.
        held.sort_by_key(|m| id(m));
    }
}

/// Batches of handed messages a live session holds back while its window is closed.
pub const HELD_BACK_BATCHES: usize = 4;
/// Payload bytes a live session holds back while its window is closed.
pub const HELD_BACK_MAX_BYTES: usize = 4 << 20;

/// What of `held` (in queue order) passes the bounds: the newest messages past `max_msgs`, or
/// past `max_bytes` of payload, taken out. A wallet that does not acknowledge must not make the
/// node hold its whole queue in memory (up to its quota, 256 MiB by default); what is taken out
/// goes back to the queue, leased again once the window opens, after the older ones held.
pub fn take_excess<T>(held: &mut Vec<T>, max_msgs: usize, max_bytes: usize, bytes: impl Fn(&T) -> usize) -> Vec<T> {
    let mut total = 0usize;
    let keep = held
        .iter()
        .take(max_msgs)
        .take_while(|m| {
            total = total.saturating_add(bytes(m));
            total <= max_bytes
        })
        .count();
    held.split_off(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_messages_are_bounded_newest_out() {
        let mut held: Vec<(i64, usize)> = (1..=10).map(|i| (i, 100)).collect();
        let out = take_excess(&mut held, 4, 10_000, |m| m.1);
        assert_eq!(held.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(out.iter().map(|m| m.0).collect::<Vec<_>>(), vec![5, 6, 7, 8, 9, 10]);
        let out = take_excess(&mut held, 4, 250, |m| m.1);
        assert_eq!(held.iter().map(|m| m.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(out.len(), 2);
        assert!(
            take_excess(&mut held, 4, 250, |m| m.1).is_empty(),
            "within bounds: nothing"
        );
        let mut big = vec![(1, 300)];
        assert_eq!(
            take_excess(&mut big, 4, 250, |m| m.1).len(),
            1,
            "one past the bytes alone"
        );
    }

    const WAIT: Duration = Duration::from_millis(250);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A window whose wallet has acknowledged on the socket once already.
    fn acknowledging() -> LiveWindow {
        let mut w = LiveWindow::new(WAIT);
        w.acknowledged(0);
        w
    }

    #[test]
    fn a_wallet_that_never_acknowledges_here_is_never_held() {
        let (mut w, t) = (LiveWindow::new(WAIT), Instant::now());
        for i in 0..10 {
            assert_eq!(w.closed_for(t + ms(i)), None, "delivery {i}");
            w.sent(t + ms(i), 1, true);
        }
    }

    #[test]
    fn once_it_acknowledges_here_a_partial_delivery_holds_the_next_until_acknowledged() {
        let (mut w, t) = (LiveWindow::new(WAIT), Instant::now());
        w.sent(t, 1, true);
        w.acknowledged(1);
        assert_eq!(w.closed_for(t + ms(1)), None);
        w.sent(t + ms(1), 3, true);
        assert_eq!(w.closed_for(t + ms(11)), Some(WAIT - ms(10)));
        // In part: the delivery keeps its place for the rest.
        w.acknowledged(2);
        assert!(w.closed_for(t + ms(12)).is_some());
        w.acknowledged(1);
        assert_eq!(w.closed_for(t + ms(13)), None);
    }

    #[test]
    fn full_deliveries_never_hold_the_next_back() {
        let (mut w, t) = (acknowledging(), Instant::now());
        for i in 0..5 {
            assert_eq!(w.closed_for(t + ms(i)), None, "full delivery {i}");
            w.sent(t + ms(i), 10, false);
        }
        // The backlog's last, partial delivery holds; acknowledging everything frees it.
        w.sent(t + ms(5), 4, true);
        assert!(w.closed_for(t + ms(6)).is_some());
        w.acknowledged(54);
        assert!(w.unacked.is_empty());
        assert_eq!(w.closed_for(t + ms(7)), None);
    }

    #[test]
    fn a_delivery_unacknowledged_for_the_wait_turns_the_window_off_until_the_next_acknowledgement() {
        let (mut w, t) = (acknowledging(), Instant::now());
        w.sent(t, 1, true);
        assert!(w.closed_for(t + WAIT - ms(1)).is_some());
        assert_eq!(w.closed_for(t + WAIT), None);
        // Off: the wallet now acknowledges elsewhere (or not at all), nothing is held.
        for i in 0..5 {
            w.sent(t + WAIT + ms(i), 1, true);
            assert_eq!(w.closed_for(t + WAIT + ms(i)), None);
        }
        // An acknowledgement on the socket turns it on again.
        w.acknowledged(5);
        w.sent(t + WAIT + ms(10), 1, true);
        assert!(w.closed_for(t + WAIT + ms(11)).is_some());
    }

    #[test]
    fn hand_offs_that_overtook_each_other_are_held_in_queue_order() {
        let mut held = Vec::new();
        hold_in_queue_order(&mut held, [1, 2], |m| *m);
        hold_in_queue_order(&mut held, [4], |m| *m);
        hold_in_queue_order(&mut held, [3], |m| *m);
        hold_in_queue_order(&mut held, [6, 5], |m| *m);
        hold_in_queue_order(&mut held, [7], |m| *m);
        assert_eq!(held, vec![1, 2, 3, 4, 5, 6, 7]);
        hold_in_queue_order(&mut held, [], |m| *m);
        assert_eq!(held, vec![1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_zero_wait_is_no_window() {
        let (mut w, t) = (LiveWindow::new(Duration::ZERO), Instant::now());
        w.acknowledged(0);
        w.sent(t, 1, true);
        assert_eq!(w.closed_for(t), None);
        assert!(w.unacked.is_empty(), "nothing is tracked");
    }

    #[test]
    fn cleared_nothing_is_held() {
        let (mut w, t) = (acknowledging(), Instant::now());
        w.sent(t, 1, true);
        assert!(w.closed_for(t).is_some());
        w.clear();
        assert_eq!(w.closed_for(t), None);
    }
}
