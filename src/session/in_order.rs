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
//! A runner holds its entries in a [`Run`]: dropped before the run ended (its task dropped
//! with its HTTP worker at shutdown while other workers serve, or a panic), the run ends
//! itself and gives back what it had not started, instead of leaving its connection's later
//! hand-offs to wait for a runner that is gone.
//!
//! Must not: run two hand-offs of one connection at once; lose an entry (one entered while
//! the runner finds the queue empty and leaves either runs in that runner or starts a new
//! one; one left by a dropped runner is given back); hold an entry for a connection nothing
//! is being handed to.

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

    /// Ends `key`'s run before its runner took every entry (the runner was dropped, or
    /// panicked): what was entered meanwhile, in order, for the caller to give back. The next
    /// entry for `key` starts another run.
    pub fn abandon(&self, key: &str) -> VecDeque<T> {
        self.0.lock().remove(key).unwrap_or_default()
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

/// The entries of one run, held by the task that runs them: the first, then those entered
/// meanwhile ([`Run::waiting`]). Dropped before the run ended, it ends the run in its
/// [`InOrder`] and gives `abandoned` the entries not taken yet (the one being run is the
/// runner's own).
pub struct Run<'a, T, F: FnOnce(VecDeque<T>)> {
    queues: &'a InOrder<T>,
    key: String,
    waiting: VecDeque<T>,
    /// Taken when the run ends, normally (nothing left: `next` removed the key) or not.
    abandoned: Option<F>,
}

impl<'a, T, F: FnOnce(VecDeque<T>)> Run<'a, T, F> {
    /// The run of `key` that `first` starts (the entry [`InOrder::enter`] gave back).
    pub fn new(queues: &'a InOrder<T>, key: String, first: T, abandoned: F) -> Self {
        Run {
            queues,
            key,
            waiting: VecDeque::from([first]),
            abandoned: Some(abandoned),
        }
    }

    /// The entries not run yet, in order, never empty: the caller takes from the front. Once
    /// they are taken, those entered meanwhile ([`InOrder::next`]); `None` when none were, and
    /// the run has ended.
    pub fn waiting(&mut self) -> Option<&mut VecDeque<T>> {
        self.abandoned.as_ref()?;
        if self.waiting.is_empty() {
            self.waiting = self.queues.next(&self.key);
        }
        if self.waiting.is_empty() {
            self.abandoned = None;
            return None;
        }
        Some(&mut self.waiting)
    }
}

impl<T, F: FnOnce(VecDeque<T>)> Drop for Run<'_, T, F> {
    fn drop(&mut self) {
        let Some(abandoned) = self.abandoned.take() else {
            return;
        };
        let mut left = std::mem::take(&mut self.waiting);
        left.extend(self.queues.abandon(&self.key));
        abandoned(left);
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

    #[test]
    fn an_abandoned_run_ends_and_the_next_entry_starts_another() {
        let q = InOrder::default();
        assert_eq!(q.enter("a", 1), Some(1));
        assert_eq!(q.enter("a", 2), None);
        // The runner of 1 is gone.
        assert_eq!(q.abandon("a"), [2], "what waited, to give back");
        assert_eq!(q.enter("a", 3), Some(3), "a new run, not a wait for nobody");
        assert!(q.abandon("b").is_empty());
    }

    /// What a dropped run gave back, in order.
    type GivenBack = Arc<Mutex<Vec<u32>>>;

    /// The entries a runner is given back when its run is dropped, and what records them.
    fn given_back() -> (GivenBack, impl FnOnce(VecDeque<u32>)) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        (got, move |left: VecDeque<u32>| g.lock().extend(left))
    }

    #[test]
    fn a_run_dropped_before_it_ended_gives_back_what_it_had_not_taken() {
        let q = InOrder::default();
        let (got, back) = given_back();
        let first = q.enter("a", 1).unwrap();
        let mut run = Run::new(&q, "a".into(), first, back);
        assert_eq!(run.waiting().unwrap().pop_front(), Some(1), "being run");
        assert_eq!(q.enter("a", 2), None);
        assert_eq!(q.enter("a", 3), None);
        assert_eq!(run.waiting().unwrap().pop_front(), Some(2), "being run");
        assert_eq!(q.enter("a", 4), None);
        drop(run);
        assert_eq!(*got.lock(), [3, 4], "taken but not started, then entered meanwhile");
        assert_eq!(q.enter("a", 5), Some(5), "the next entry starts a run");
    }

    #[test]
    fn a_run_that_ended_gives_nothing_back_nor_ends_the_next_run() {
        let q = InOrder::default();
        let (got, back) = given_back();
        let first = q.enter("a", 1).unwrap();
        let mut run = Run::new(&q, "a".into(), first, back);
        assert_eq!(run.waiting().unwrap().pop_front(), Some(1));
        assert!(run.waiting().is_none(), "nothing entered meanwhile: ended");
        assert_eq!(q.enter("a", 2), Some(2), "another run");
        assert!(run.waiting().is_none(), "an ended run takes nothing of the next");
        drop(run);
        assert!(got.lock().is_empty());
        assert_eq!(q.enter("a", 3), None, "the next run still runs");
    }

    /// A runner task whose hand-off never completes, dropped (aborted, as a stopping arbiter
    /// drops its tasks) or panicking: the entries waiting for it are given back, and the next
    /// entry runs.
    #[tokio::test]
    async fn a_runner_task_aborted_or_panicking_leaves_no_entry_behind() {
        for panics in [false, true] {
            let q = Arc::new(InOrder::default());
            let (got, back) = given_back();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let first = q.enter("a", 1).unwrap();
            let runner = tokio::spawn({
                let q = q.clone();
                async move {
                    let mut run = Run::new(&*q, "a".into(), first, back);
                    let _ = started_tx.send(run.waiting().and_then(VecDeque::pop_front));
                    if panics {
                        panic!("a hand-off panicked");
                    }
                    std::future::pending::<()>().await;
                }
            });
            assert_eq!(q.enter("a", 2), None, "waits for the runner");
            if !panics {
                assert_eq!(started.await.unwrap(), Some(1), "the first hand-off is running");
                runner.abort();
            }
            let end = runner.await.unwrap_err();
            assert_eq!(end.is_panic(), panics);
            assert_eq!(*got.lock(), [2], "panics: {panics}");
            assert_eq!(q.enter("a", 3), Some(3), "panics: {panics}");
        }
    }
}
