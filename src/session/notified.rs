//! What this node told each peer (or failed to tell it) of mail queued for a session the
//! directory named on that peer, kept until the peer is found up or down: a peer that failed
//! took those sessions with it, and its mail would then wake nobody. The node that takes the
//! failed peer over wakes every wallet the peer held, but only with what was queued before
//! it did; the other nodes find the peer down a little later (up to a heartbeat apart), and
//! what they notified it of meanwhile is theirs to wake ([`Notified::down`]).
//!
//! A peer reached again is no proof that it got what it missed: its session of the wallet
//! may have ended meanwhile, with its `Disown` lost on the same link, and then no sweep of
//! its own wakes or pushes anyone. What a notification to it could not carry is notified
//! again (a session woken, or the wallet pushed) on the next one that goes out
//! ([`Notified::sent`]), and what it was told lately too once its link comes back
//! ([`Notified::relinked`]): a notification queued on a link that then closed was lost too.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Per peer: see the module.
pub struct Notified {
    /// How long a sent notification is kept: a peer dead without closing its link takes
    /// notifications until it is found down, at most a failure timeout (and a tick) after it
    /// died.
    window_ms: i64,
    /// Most connections kept per peer, of each kind.
    max: usize,
    /// Bumped by every [`Notified::down`] (under `state`'s lock; read without it).
    epoch: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_peer: HashMap<String, Notes>,
    /// peer -> the epoch it was last found down at: a notification whose outcome was read
    /// before that (it raced the peer's failure) is not kept, the caller pushes now.
    down_at: HashMap<String, u64>,
}

#[derive(Default)]
struct Notes {
    /// Notifications that could not be sent (no link, or its queue full): connection -> the
    /// latest one's time (ms).
    failed: HashMap<String, i64>,
    /// Notifications sent within the window: connection -> the latest one's time.
    sent: HashMap<String, i64>,
    /// The same, in the order sent, to drop them as they leave the window.
    order: VecDeque<(i64, String)>,
    /// When [`Notified::sent`] last took the failed ones out to notify again: at most once a
    /// window, or a link whose queue stays full would have every notification that gets through
    /// start another round of retries (a store read each), which refill it.
    retried_at: Option<i64>,
}

impl State {
    /// The notes of `peer` for a notification whose outcome was read after `epoch`; `None`
    /// when the peer was found down since.
    fn notes(&mut self, peer: &str, epoch: u64) -> Option<&mut Notes> {
        if self.down_at.get(peer).is_some_and(|d| *d > epoch) {
            return None;
        }
        if !self.by_peer.contains_key(peer) {
            self.by_peer.insert(peer.to_string(), Notes::default());
        }
        self.by_peer.get_mut(peer)
    }
}

impl Notes {
    /// The failed notifications, and those sent since `since`: each connection once, sorted,
    /// with its latest time.
    fn into_wake(self, since: i64) -> Vec<(String, i64)> {
        let mut latest = self.failed;
        for (c, at) in self.sent.into_iter().filter(|(_, at)| *at >= since) {
            let t = latest.entry(c).or_insert(at);
            *t = (*t).max(at);
        }
        let mut conns: Vec<(String, i64)> = latest.into_iter().collect();
        conns.sort_unstable();
        conns
    }

    /// Drops the oldest sent notification.
    fn drop_oldest(&mut self) {
        if let Some((at, c)) = self.order.pop_front() {
            if self.sent.get(&c) == Some(&at) {
                self.sent.remove(&c);
            }
        }
    }
}

impl Notified {
    pub fn new(window_ms: i64, max: usize) -> Notified {
        Notified {
            window_ms,
            max: max.max(1),
            epoch: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        }
    }

    /// Where notifications stand now: pass it to [`Notified::sent`] or [`Notified::failed`]
    /// with the outcome of a notification read after this.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// A notification of `conn` went out to `peer` at `now_ms` (its outcome read after
    /// `epoch`). The oldest are dropped past `max` within the window. `None` when it is not
    /// kept: the peer was found down meanwhile, and the caller pushes the wallet now. Else the
    /// connections whose notification to the peer could not be sent before (other than
    /// `conn`), each with its latest time, taken out at most once a window: the caller notifies
    /// them again, now that one goes out (see the module).
    pub fn sent(&self, peer: &str, conn: &str, now_ms: i64, epoch: u64) -> Option<Vec<(String, i64)>> {
        let mut st = self.state.lock();
        let notes = st.notes(peer, epoch)?;
        notes.failed.remove(conn);
        // Nothing to hash or free on the way of a forward when none failed.
        let due = !matches!(notes.retried_at, Some(t) if now_ms.saturating_sub(t) < self.window_ms);
        let unsent: Vec<(String, i64)> = if notes.failed.is_empty() || !due {
            Vec::new()
        } else {
            notes.retried_at = Some(now_ms);
            std::mem::take(&mut notes.failed).into_iter().collect()
        };
        let before = now_ms.saturating_sub(self.window_ms);
        while notes.order.front().is_some_and(|(at, _)| *at < before) || notes.order.len() >= self.max {
            notes.drop_oldest();
        }
        notes.sent.insert(conn.to_string(), now_ms);
        notes.order.push_back((now_ms, conn.to_string()));
        Some(unsent)
    }

    /// A notification of `conn` to `peer` could not be sent at `now_ms` (its outcome read
    /// after `epoch`). Whether it is kept: `false` when the peer was found down meanwhile, or
    /// once `max` are, and the caller pushes the wallet now (a push too many, never none).
    pub fn failed(&self, peer: &str, conn: &str, now_ms: i64, epoch: u64) -> bool {
        let mut st = self.state.lock();
        let Some(notes) = st.notes(peer, epoch) else {
            return false;
        };
        if let Some(t) = notes.failed.get_mut(conn) {
            *t = (*t).max(now_ms);
            return true;
        }
        if notes.failed.len() >= self.max {
            return false;
        }
        notes.failed.insert(conn.to_string(), now_ms);
        true
    }

    /// `peer` was found down at `now_ms`: the connections to wake (those whose notification
    /// failed, and those notified within the window), each once, sorted, with the time of its
    /// latest notification; the peer's notes are dropped.
    pub fn down(&self, peer: &str, now_ms: i64) -> Vec<(String, i64)> {
        let mut st = self.state.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        st.down_at.insert(peer.to_string(), epoch);
        let Some(notes) = st.by_peer.remove(peer) else {
            return Vec::new();
        };
        drop(st);
        notes.into_wake(now_ms.saturating_sub(self.window_ms))
    }

    /// A link to `peer` came up at `now_ms` (the peer up again, or its link back after one
    /// closed while it stayed up): the connections to notify again, as [`Notified::down`]
    /// returns them, since what could not be sent, and what was queued on a link that then
    /// closed, never reached it. The peer's notes are dropped; notifying again keeps them anew.
    pub fn relinked(&self, peer: &str, now_ms: i64) -> Vec<(String, i64)> {
        let Some(notes) = self.state.lock().by_peer.remove(peer) else {
            return Vec::new();
        };
        notes.into_wake(now_ms.saturating_sub(self.window_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: &str, t: i64) -> (String, i64) {
        (c.to_string(), t)
    }

    #[test]
    fn a_peer_found_down_wakes_what_it_failed_to_take_and_what_it_took_lately() {
        let n = Notified::new(1_000, 3);
        let e = n.epoch();
        assert!(n.sent("p", "early", 0, e).is_some());
        assert!(n.sent("p", "late", 5_000, e).is_some());
        assert!(n.failed("q", "unsent", 7, e) && n.failed("q", "unsent", 9, e));
        assert!(n.sent("p", "late", 5_500, e).is_some());
        assert_eq!(
            n.down("p", 5_800),
            [at("late", 5_500)],
            "what it took a window ago is not woken; the latest notification's time"
        );
        assert!(n.down("p", 5_800).is_empty(), "dropped once down");
        assert_eq!(
            n.down("q", 100_000),
            [at("unsent", 9)],
            "a failed notification is kept however long"
        );
    }

    #[test]
    fn a_notification_that_raced_the_peer_found_down_is_not_kept() {
        let n = Notified::new(1_000, 10);
        let before = n.epoch();
        assert!(n.sent("p", "a", 0, before).is_some());
        assert_eq!(n.down("p", 10), [at("a", 0)]);
        assert!(
            n.sent("p", "b", 11, before).is_none(),
            "read before it was found down: pushed now"
        );
        assert!(!n.failed("p", "b", 11, before));
        let after = n.epoch();
        assert!(
            n.sent("p", "c", 12, after).is_some(),
            "read after: kept (the peer is up again)"
        );
        assert!(
            n.sent("q", "d", 12, before).is_some(),
            "another peer's down changes nothing here"
        );
    }

    #[test]
    fn what_could_not_be_sent_is_notified_again_by_the_next_that_goes_out() {
        let n = Notified::new(1_000, 10);
        let e = n.epoch();
        assert!(n.failed("p", "a", 0, e) && n.failed("p", "b", 3, e) && n.failed("q", "c", 4, e));
        assert_eq!(
            n.sent("p", "b", 10, e),
            Some(vec![at("a", 0)]),
            "a, not b, which this one carries; not q's"
        );
        assert_eq!(n.sent("p", "d", 11, e), Some(vec![]), "taken once");
        // Failed again within the window: left for the next round (a queue that stays full
        // must not start a round at each notification that gets through).
        assert!(n.failed("p", "e", 12, e));
        assert_eq!(
            n.sent("p", "f", 13, e),
            Some(vec![]),
            "within a window of the last round"
        );
        assert_eq!(n.sent("p", "g", 1_010, e), Some(vec![at("e", 12)]), "a window on");
        assert_eq!(
            n.down("p", 1_020),
            [at("g", 1_010)],
            "a and e are the caller's now; b, d and f left the window"
        );
        assert_eq!(n.down("q", 20), [at("c", 4)]);
    }

    #[test]
    fn a_link_back_notifies_again_what_failed_and_what_went_out_lately() {
        let n = Notified::new(1_000, 10);
        let e = n.epoch();
        assert!(n.sent("p", "old", 0, e).is_some());
        assert!(n.sent("p", "lost", 5_000, e).is_some());
        assert!(n.failed("p", "unsent", 5_100, e));
        assert!(n.failed("q", "other", 5_100, e));
        assert_eq!(
            n.relinked("p", 5_200),
            [at("lost", 5_000), at("unsent", 5_100)],
            "what went out a window ago reached the peer before its link closed"
        );
        assert!(n.relinked("p", 5_300).is_empty(), "dropped");
        assert!(n.down("p", 5_300).is_empty());
        assert_eq!(n.down("q", 5_300), [at("other", 5_100)]);
    }

    #[test]
    fn at_most_max_per_peer_are_kept() {
        let n = Notified::new(10, 2);
        let e = n.epoch();
        assert!(n.failed("p", "a", 0, e) && n.failed("p", "b", 0, e) && n.failed("p", "a", 0, e));
        assert!(!n.failed("p", "c", 0, e), "full: the caller pushes now");
        assert!(n.sent("q", "x", 0, e).is_some() && n.sent("q", "y", 5, e).is_some());
        assert!(
            n.sent("q", "z", 6, e).is_some(),
            "full within the window: the oldest dropped"
        );
        assert_eq!(n.down("q", 7), [at("y", 5), at("z", 6)]);
        assert!(
            n.sent("r", "x", 0, e).is_some() && n.sent("r", "x", 1, e).is_some() && n.sent("r", "y", 20, e).is_some()
        );
        assert_eq!(n.down("r", 21), [at("y", 20)], "out of the window: dropped");
    }
}
