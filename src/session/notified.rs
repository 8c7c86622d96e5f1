//! What this node told each peer (or failed to tell it) of mail queued for a session the
//! directory named on that peer, kept until the peer is found up or down: a peer that failed
//! took those sessions with it, and its mail would then wake nobody. The node that takes the
//! failed peer over wakes every wallet the peer held, but only with what was queued before
//! it did; the other nodes find the peer down a little later (up to a heartbeat apart), and
//! what they notified it of meanwhile is theirs to wake ([`Notified::down`]).

use std::collections::{HashMap, VecDeque};

use parking_lot::Mutex;

/// Per peer: see the module.
pub struct Notified {
    /// How long a sent notification is kept: a peer dead without closing its link takes
    /// notifications until it is found down, at most a failure timeout (and a tick) after it
    /// died.
    window_ms: i64,
    /// Most connections kept per peer, of each kind.
    max: usize,
    by_peer: Mutex<HashMap<String, Notes>>,
}

#[derive(Default)]
struct Notes {
    /// Notifications that could not be sent (no link, or its queue full): the first's time.
    failed: HashMap<String, i64>,
    /// Notifications sent, oldest first, with when (ms).
    sent: VecDeque<(i64, String)>,
}

impl Notified {
    pub fn new(window_ms: i64, max: usize) -> Notified {
        Notified {
            window_ms,
            max,
            by_peer: Mutex::new(HashMap::new()),
        }
    }

    /// A notification of `conn` went out to `peer` at `now_ms`. The peer is reachable: what
    /// could not be sent to it before is its own sweep's to deliver.
    pub fn sent(&self, peer: &str, conn: &str, now_ms: i64) {
        let mut by_peer = self.by_peer.lock();
        let notes = match by_peer.get_mut(peer) {
            Some(n) => n,
            None => by_peer.entry(peer.to_string()).or_default(),
        };
        notes.failed.clear();
        let since = now_ms.saturating_sub(self.window_ms);
        while notes.sent.front().is_some_and(|(at, _)| *at < since) || notes.sent.len() >= self.max {
            notes.sent.pop_front();
        }
        notes.sent.push_back((now_ms, conn.to_string()));
    }

    /// A notification of `conn` to `peer` could not be sent at `now_ms`. Whether it is kept:
    /// `false` once `max` are, and the caller pushes the wallet now (a push too many, never
    /// none).
    pub fn failed(&self, peer: &str, conn: &str, now_ms: i64) -> bool {
        let mut by_peer = self.by_peer.lock();
        let notes = match by_peer.get_mut(peer) {
            Some(n) => n,
            None => by_peer.entry(peer.to_string()).or_default(),
        };
        if notes.failed.len() >= self.max && !notes.failed.contains_key(conn) {
            return false;
        }
        notes.failed.entry(conn.to_string()).or_insert(now_ms);
        true
    }

    /// `peer` was found down at `now_ms`: the connections to wake (those whose notification
    /// failed, and those notified within the window), each once, sorted, with the time of its
    /// first notification kept; the peer forgotten.
    pub fn down(&self, peer: &str, now_ms: i64) -> Vec<(String, i64)> {
        let Some(notes) = self.by_peer.lock().remove(peer) else {
            return Vec::new();
        };
        let since = now_ms.saturating_sub(self.window_ms);
        let mut first = notes.failed;
        for (at, c) in notes.sent.into_iter().filter(|(at, _)| *at >= since) {
            let t = first.entry(c).or_insert(at);
            *t = (*t).min(at);
        }
        let mut conns: Vec<(String, i64)> = first.into_iter().collect();
        conns.sort_unstable();
        conns
    }

    /// Forgets `peer`: it is up again (its sweep wakes its sessions), or this node takes it
    /// over (its take-over wakes every wallet the peer held).
    pub fn forget(&self, peer: &str) {
        self.by_peer.lock().remove(peer);
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
        n.sent("p", "early", 0);
        n.sent("p", "late", 5_000);
        assert!(n.failed("q", "unsent", 7) && n.failed("q", "unsent", 9));
        n.sent("p", "late", 5_500);
        assert_eq!(
            n.down("p", 5_800),
            [at("late", 5_000)],
            "what it took a window ago is not woken; the first notification's time is kept"
        );
        assert!(n.down("p", 5_800).is_empty(), "forgotten once down");
        assert_eq!(
            n.down("q", 100_000),
            [at("unsent", 7)],
            "a failed notification is kept however long"
        );
    }

    #[test]
    fn a_peer_reached_again_or_taken_over_is_forgotten() {
        let n = Notified::new(1_000, 10);
        assert!(n.failed("p", "a", 0));
        n.sent("p", "b", 10);
        assert_eq!(n.down("p", 20), [at("b", 10)], "reached again: its sweep wakes a");
        assert!(n.failed("p", "c", 30));
        n.forget("p");
        assert!(n.down("p", 40).is_empty());
    }

    #[test]
    fn at_most_max_per_peer_are_kept() {
        let n = Notified::new(1_000_000, 2);
        assert!(n.failed("p", "a", 0) && n.failed("p", "b", 0) && n.failed("p", "a", 0));
        assert!(!n.failed("p", "c", 0), "full: the caller pushes now");
        for (i, c) in ["x", "y", "z"].iter().enumerate() {
            n.sent("q", c, i as i64);
        }
        assert_eq!(n.down("q", 3), [at("y", 1), at("z", 2)]);
    }
}
