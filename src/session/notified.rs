//! What this node told each peer (or failed to tell it) of mail queued for a session the
//! directory named on that peer, kept until the peer is found up or down: a peer that failed
//! took those sessions with it, and its mail would then wake nobody. The node that takes the
//! failed peer over wakes every wallet the peer held, but only with what was queued before
//! it did; the other nodes find the peer down a little later (up to a heartbeat apart), and
//! what they notified it of meanwhile is theirs to wake ([`Notified::down`]).

use std::collections::{HashMap, HashSet};

use parking_lot::Mutex;

/// Per peer: see the module.
pub struct Notified {
    /// How long a sent notification is kept: a peer dead without closing its link takes
    /// notifications until it is found down, at most a failure timeout (and a tick) after it
    /// died.
    window_ms: i64,
    /// Most connections kept per peer, of each kind.
    max: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    by_peer: HashMap<String, Notes>,
    /// Peers found down and not up since: a notification recorded for one after [`Notified::down`]
    /// took its notes (it raced the peer's failure) is not kept, the caller pushes now.
    down: HashSet<String>,
}

#[derive(Default)]
struct Notes {
    /// Notifications that could not be sent (no link, or its queue full): connection -> the
    /// latest one's time (ms).
    failed: HashMap<String, i64>,
    /// Notifications sent: connection -> the latest one's time. Those older than the window
    /// are dropped when the map is full.
    sent: HashMap<String, i64>,
}

impl Notes {
    /// Records `conn` at `now_ms` in `map`, keeping at most `max` (after dropping those before
    /// `prune_before`, if any). Whether it is kept.
    fn note(map: &mut HashMap<String, i64>, conn: &str, now_ms: i64, max: usize, prune_before: Option<i64>) -> bool {
        if let Some(t) = map.get_mut(conn) {
            *t = (*t).max(now_ms);
            return true;
        }
        if map.len() >= max {
            if let Some(before) = prune_before {
                map.retain(|_, at| *at >= before);
            }
            if map.len() >= max {
                return false;
            }
        }
        map.insert(conn.to_string(), now_ms);
        true
    }
}

impl Notified {
    pub fn new(window_ms: i64, max: usize) -> Notified {
        Notified {
            window_ms,
            max,
            state: Mutex::new(State::default()),
        }
    }

    /// A notification of `conn` went out to `peer` at `now_ms`. The peer is reachable: what
    /// could not be sent to it before is its own sweep's to deliver. Whether it is kept:
    /// `false` when the peer was found down meanwhile or `max` are kept within the window,
    /// and the caller pushes the wallet now (a push too many, never none).
    pub fn sent(&self, peer: &str, conn: &str, now_ms: i64) -> bool {
        let mut st = self.state.lock();
        if st.down.contains(peer) {
            return false;
        }
        let notes = st.by_peer.entry(peer.to_string()).or_default();
        notes.failed.clear();
        let before = now_ms.saturating_sub(self.window_ms);
        Notes::note(&mut notes.sent, conn, now_ms, self.max, Some(before))
    }

    /// A notification of `conn` to `peer` could not be sent at `now_ms`. Whether it is kept,
    /// as for [`Notified::sent`].
    pub fn failed(&self, peer: &str, conn: &str, now_ms: i64) -> bool {
        let mut st = self.state.lock();
        if st.down.contains(peer) {
            return false;
        }
        let notes = st.by_peer.entry(peer.to_string()).or_default();
        Notes::note(&mut notes.failed, conn, now_ms, self.max, None)
    }

    /// `peer` was found down at `now_ms`: the connections to wake (those whose notification
    /// failed, and those notified within the window), each once, sorted, with the time of its
    /// latest notification; the peer is marked down until [`Notified::forget`].
    pub fn down(&self, peer: &str, now_ms: i64) -> Vec<(String, i64)> {
        let mut st = self.state.lock();
        st.down.insert(peer.to_string());
        let Some(notes) = st.by_peer.remove(peer) else {
            return Vec::new();
        };
        drop(st);
        let since = now_ms.saturating_sub(self.window_ms);
        let mut latest = notes.failed;
        for (c, at) in notes.sent.into_iter().filter(|(_, at)| *at >= since) {
            let t = latest.entry(c).or_insert(at);
            *t = (*t).max(at);
        }
        let mut conns: Vec<(String, i64)> = latest.into_iter().collect();
        conns.sort_unstable();
        conns
    }

    /// Forgets `peer`: it is up again (its sweep wakes its sessions), or this node takes it
    /// over (its take-over wakes every wallet the peer held). `up`: it is up again.
    pub fn forget(&self, peer: &str, up: bool) {
        let mut st = self.state.lock();
        st.by_peer.remove(peer);
        if up {
            st.down.remove(peer);
        } else {
            st.down.insert(peer.to_string());
        }
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
        assert!(n.sent("p", "early", 0));
        assert!(n.sent("p", "late", 5_000));
        assert!(n.failed("q", "unsent", 7) && n.failed("q", "unsent", 9));
        assert!(n.sent("p", "late", 5_500));
        assert_eq!(
            n.down("p", 5_800),
            [at("late", 5_500)],
            "what it took a window ago is not woken; the latest notification's time"
        );
        assert!(n.down("p", 5_800).is_empty(), "forgotten once down");
        assert_eq!(
            n.down("q", 100_000),
            [at("unsent", 9)],
            "a failed notification is kept however long"
        );
    }

    #[test]
    fn a_notification_that_raced_the_peer_found_down_is_not_kept() {
        let n = Notified::new(1_000, 10);
        assert!(n.sent("p", "a", 0));
        assert_eq!(n.down("p", 10), [at("a", 0)]);
        assert!(!n.sent("p", "b", 11), "the caller pushes now");
        assert!(!n.failed("p", "b", 11));
        n.forget("p", true);
        assert!(n.sent("p", "c", 12), "up again");
        n.forget("p", false);
        assert!(!n.failed("p", "d", 13), "taken over here: down too");
    }

    #[test]
    fn a_peer_reached_again_or_taken_over_is_forgotten() {
        let n = Notified::new(1_000, 10);
        assert!(n.failed("p", "a", 0));
        assert!(n.sent("p", "b", 10));
        assert_eq!(n.down("p", 20), [at("b", 10)], "reached again: its sweep wakes a");
        n.forget("p", true);
        assert!(n.failed("p", "c", 30));
        n.forget("p", false);
        assert!(n.down("p", 40).is_empty());
    }

    #[test]
    fn at_most_max_per_peer_are_kept() {
        let n = Notified::new(10, 2);
        assert!(n.failed("p", "a", 0) && n.failed("p", "b", 0) && n.failed("p", "a", 0));
        assert!(!n.failed("p", "c", 0), "full: the caller pushes now");
        assert!(n.sent("q", "x", 0) && n.sent("q", "y", 5));
        assert!(!n.sent("q", "z", 6), "full within the window");
        assert!(n.sent("q", "z", 11), "x is out of the window: dropped for z");
        assert_eq!(n.down("q", 12), [at("y", 5), at("z", 11)]);
    }
}
