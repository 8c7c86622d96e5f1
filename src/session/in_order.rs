//! Hand-offs of one connection, one at a time and in the order they were entered.
//!
//! A forward's hand-off ([`crate::protocols::Handed`]) used to run in a task of its own on
//! whichever HTTP worker took the forward; a sender that waited for the 202 of one forward
//! before posting the next could still see its wallet's socket get them in the other order,
//! both tasks racing to the registry and the session. The hand-offs of one connection now
//! form one queue: the first entered runs, and the one running takes whatever was entered
//! meanwhile, in that order, until none is left. A forward enters its hand-off before it is
//! answered, so forwards answered in order are handed in order. Peers' `Deliver` frames, read
//! in order off one link, enter the same queue.
//!
//! Must not: run two hand-offs of one connection at once; lose an entry (one entered while
//! the runner finds the queue empty and leaves either runs in that runner or starts a new
//! one); hold an entry for a connection nothing is being handed to.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};

/// The queues of the connections being handed to now, each run by one task.
pub struct InOrder<T>(Mutex<HashMap<String, VecDeque<T>>>);

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder(Mutex::default())
    }
}

impl<T> InOrder<T> {
    /// Enters `item` for `key`. `Some(item)`: nothing of `key` is running, the caller runs
    /// it and then what [`InOrder::next`] gives. `None`: the running one will.
    pub fn enter(&self, key: &str, item: T) -> Option<T> {
        let mut queues = self.0.lock();
        match queues.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(item);
                None
            }
            None => {
                queues.insert(key.to_owned(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// What was entered for `key` while the runner ran, in order; empty ends the run (the
    /// next entry starts another).
    pub fn next(&self, key: &str) -> VecDeque<T> {
        let mut queues = self.0.lock();
        let waiting = queues.get_mut(key).map(std::mem::take).unwrap_or_default();
        if waiting.is_empty() {
            queues.remove(key);
        }
        waiting
    }

    /// Connections with a hand-off running.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_entry_runs_and_later_ones_wait_for_it_in_order() {
        let q = InOrder::default();
        assert_eq!(q.enter("a", 1), Some(1));
        assert_eq!(q.enter("a", 2), None);
        assert_eq!(q.enter("b", 10), Some(10), "another connection does not wait");
        assert_eq!(q.enter("a", 3), None);
        assert_eq!(q.next("a"), [2, 3]);
        assert_eq!(q.enter("a", 4), None, "still running: the runner takes it");
        assert_eq!(q.next("a"), [4]);
        assert!(q.next("a").is_empty());
        assert_eq!(q.len(), 1, "a's run ended, b's has not");
        assert_eq!(q.enter("a", 5), Some(5), "a new run");
        assert!(q.next("a").is_empty());
        assert!(q.next("b").is_empty());
        assert!(q.is_empty());
    }

    /// Many threads enter while one runs: every entry is run exactly once, never two at once,
    /// and each thread's entries in the order it entered them.
    #[test]
    fn entries_from_many_threads_run_once_each_one_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let q = Arc::new(InOrder::default());
        let active = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let (q, active, ran) = (q.clone(), active.clone(), ran.clone());
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        let Some(first) = q.enter("k", (t, i)) else { continue };
                        let mut batch = VecDeque::from([first]);
                        while !batch.is_empty() {
                            for item in batch.drain(..) {
                                assert_eq!(active.fetch_add(1, SeqCst), 0, "two hand-offs at once");
                                ran.lock().push(item);
                                std::thread::yield_now();
                                active.fetch_sub(1, SeqCst);
                            }
                            batch = q.next("k");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(q.is_empty());
        let ran = ran.lock();
        assert_eq!(ran.len(), 8_000, "every entry ran once");
        for t in 0..4 {
            let mine: Vec<u32> = ran.iter().filter(|(th, _)| *th == t).map(|(_, i)| *i).collect();
            assert_eq!(
                mine,
                (0..2_000).collect::<Vec<_>>(),
                "thread {t}'s entries in its order"
            );
        }
    }
}
