//! The push worker's events waiting for their turn: at most one per wallet, in the order their
//! wallets first came. Pure: no I/O, no clock of its own.
//!
//! A wallet's later event folds into the one already waiting: both would read the same
//! registration, window and queue when their turn came, and the push counts every message
//! queued by then. A wallet's event does not start while another of its events runs (reads
//! the store and records its window; without a window, also waits for a send slot and is
//! sent): its repeats fold while it runs, and one wallet never holds more than one of the
//! worker's places. Only an event that has not started
//! folds; once its turn came (it left through [`Waiting::next`]) the wallet's next event
//! waits on its own and starts when the running one is [`Waiting::done`], so nothing that
//! happens to a running event (a store that fails its lookups, a stop) takes a later one with
//! it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

/// One wallet's waiting event, folded from one or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// When its earliest event came: the push's latency runs from it.
    pub at: Instant,
    /// Push only if the wallet was not pushed at or after this (ms): `None` pushes.
    pub unless_pushed_since_ms: Option<i64>,
    /// Events folded into it besides the first.
    pub folded: u64,
}

impl Pending {
    /// Both events in one: pushed whenever either would have been (`None` if either pushes
    /// unconditionally, else the later bound: a push at or after it covers both).
    fn fold(&mut self, later: Pending) {
        self.at = self.at.min(later.at);
        self.folded += 1 + later.folded;
        self.unless_pushed_since_ms = match (self.unless_pushed_since_ms, later.unless_pushed_since_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
}

/// Events waiting, one per wallet.
#[derive(Default)]
pub struct Waiting {
    /// The wallets that may start, in the order they came (or their running event ended).
    order: VecDeque<String>,
    /// Every waiting event, startable or behind a running one of its wallet.
    by_conn: HashMap<String, Pending>,
    /// Wallets with an event running.
    running: HashSet<String>,
}

impl Waiting {
    /// Adds `conn`'s event; true if it folded into one already waiting.
    pub fn add(&mut self, conn: String, ev: Pending) -> bool {
        if let Some(p) = self.by_conn.get_mut(&conn) {
            p.fold(ev);
            return true;
        }
        if !self.running.contains(&conn) {
            self.order.push_back(conn.clone());
        }
        self.by_conn.insert(conn, ev);
        false
    }

    /// The event that may start and waited longest, taken out and counted running until
    /// [`Waiting::done`]: its wallet's next event waits on its own.
    pub fn next(&mut self) -> Option<(String, Pending)> {
        let conn = self.order.pop_front()?;
        let p = self.by_conn.remove(&conn).expect("every startable wallet is waiting");
        self.running.insert(conn.clone());
        Some((conn, p))
    }

    /// `conn`'s running event ended: its waiting one, if any, may start.
    pub fn done(&mut self, conn: &str) {
        if self.running.remove(conn) && self.by_conn.contains_key(conn) {
            self.order.push_back(conn.to_owned());
        }
    }

    /// Events waiting (one per wallet), startable or not.
    pub fn len(&self) -> usize {
        self.by_conn.len()
    }

    /// Events running ([`Waiting::next`] and not yet [`Waiting::done`]).
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ev(at: Instant, since: Option<i64>) -> Pending {
        Pending {
            at,
            unless_pushed_since_ms: since,
            folded: 0,
        }
    }

    fn folded(p: Pending, n: u64) -> Pending {
        Pending { folded: n, ..p }
    }

    #[test]
    fn a_wallets_events_fold_until_its_turn_and_start_once_the_running_one_ended() {
        let t = Instant::now();
        let mut w = Waiting::default();
        assert!(!w.add("a".into(), ev(t, None)));
        assert!(!w.add("b".into(), ev(t, None)));
        assert!(w.add("a".into(), ev(t + Duration::from_secs(1), None)));
        assert_eq!(w.len(), 2);
        assert_eq!(
            w.next(),
            Some(("a".into(), folded(ev(t, None), 1))),
            "first come, earliest time kept, one folded"
        );
        let t2 = t + Duration::from_secs(2);
        assert!(
            !w.add("a".into(), ev(t2, None)),
            "a started: its next event waits on its own"
        );
        assert!(w.add("a".into(), ev(t2, None)), "and folds its repeats");
        assert_eq!(w.next().unwrap().0, "b");
        assert_eq!(w.next(), None, "a's event waits while a's first runs");
        assert_eq!((w.len(), w.running()), (1, 2));
        w.done("b");
        assert_eq!(w.next(), None);
        w.done("a");
        assert_eq!(w.next(), Some(("a".into(), folded(ev(t2, None), 1))));
        w.done("a");
        assert_eq!((w.next(), w.len(), w.running()), (None, 0, 0));
        w.done("a");
        assert!(
            !w.add("a".into(), ev(t, None)),
            "a done: its next event may start at once"
        );
        assert_eq!(w.next().unwrap().0, "a");
    }

    #[test]
    fn a_folded_event_pushes_whenever_one_of_its_events_would() {
        let t = Instant::now();
        let folded = |a: Option<i64>, b: Option<i64>| {
            let mut w = Waiting::default();
            w.add("c".into(), ev(t, a));
            w.add("c".into(), ev(t, b));
            w.next().unwrap().1.unless_pushed_since_ms
        };
        assert_eq!(folded(Some(5), None), None);
        assert_eq!(folded(None, Some(5)), None);
        assert_eq!(folded(Some(5), Some(9)), Some(9));
        assert_eq!(folded(Some(9), Some(5)), Some(9));
    }
}
