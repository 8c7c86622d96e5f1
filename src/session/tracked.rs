//! Work a request or a socket starts that must outlive it: the wake-up or push of a queued
//! message, a hand-off, a session's give-back.
//!
//! Such a task runs on the HTTP worker that started it, beside its request. A stopping node
//! stops its workers as soon as their last connection ends, which dropped what they still
//! ran: a forward answered 202 just before left its wallet neither woken nor pushed, while the
//! stop was recorded as clean. So every task is counted until it ends, and once the node
//! stops ([`Tracked::move_to_main`]) new ones run on the node's main arbiter, which lives
//! until the stop is over: the stop waits for those started on the workers
//! ([`Tracked::idle_on_workers`]) before it stops the listeners, and for all of them
//! ([`Tracked::idle`]) before it stops the push worker. (Running every task on the main
//! arbiter from the start cost 8-12% of ingest and fan-out: one cross-thread hop per forward.)

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Tasks counted until they end: on the worker that starts them, then on the main arbiter.
pub struct Tracked {
    main: actix_rt::ArbiterHandle,
    on_workers: Arc<Running>,
    on_main: Arc<Running>,
    to_main: AtomicBool,
}

#[derive(Default)]
struct Running {
    count: AtomicUsize,
    none_left: Notify,
    /// Someone waits for none left ([`Running::idle`], only at the stop): the last task out
    /// wakes it. Not otherwise: a wake-up per task cost a lock on every forward.
    watched: AtomicBool,
}

impl Running {
    /// Counts one task in; it is counted out when the guard drops.
    fn count_in(self: &Arc<Self>) -> Counted {
        self.count.fetch_add(1, Ordering::SeqCst);
        Counted(self.clone())
    }

    async fn idle(&self, within: Duration) -> bool {
        // Set before the count is read below (both SeqCst): a task that ends after that read
        // sees it, and wakes this wait.
        self.watched.store(true, Ordering::SeqCst);
        let wait = async {
            loop {
                let none_left = self.none_left.notified();
                tokio::pin!(none_left);
                // Registered before the count is read: an end in between is not missed.
                none_left.as_mut().enable();
                if self.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                none_left.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }
}

/// Counts one task until it is dropped (ended, or its arbiter gone).
struct Counted(Arc<Running>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.watched.load(Ordering::SeqCst) {
            self.0.none_left.notify_waiters();
        }
    }
}

impl Tracked {
    /// Tracks tasks; the main arbiter is the current one: call it on the node's main one.
    pub fn on_current_arbiter() -> Tracked {
        Tracked {
            main: actix_rt::Arbiter::current(),
            on_workers: Arc::default(),
            on_main: Arc::default(),
            to_main: AtomicBool::new(false),
        }
    }

    /// Runs `task` on the current arbiter, or on the main one once the node stops; counted
    /// until it ends.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // Counted before the flag is read (both SeqCst): a stop that set the flag and then
        // found no task on the workers cannot miss one started there after its look.
        let here = self.on_workers.count_in();
        // Off an arbiter (no local task set to run it), it goes to the main one too.
        if !self.to_main.load(Ordering::SeqCst) && actix_rt::Arbiter::try_current().is_some() {
            actix_rt::spawn(async move {
                let _counted = here;
                task.await;
            });
            return;
        }
        drop(here);
        let counted = self.on_main.count_in();
        // Not taken (the main arbiter is gone: the node has stopped): dropped, and uncounted.
        let _ = self.main.spawn(async move {
            let _counted = counted;
            task.await;
        });
    }

    /// The node stops: tasks started from now on run on the main arbiter.
    pub fn move_to_main(&self) {
        self.to_main.store(true, Ordering::SeqCst);
    }

    /// How many are running.
    pub fn running(&self) -> usize {
        self.on_workers.count.load(Ordering::SeqCst) + self.on_main.count.load(Ordering::SeqCst)
    }

    /// Waits until no task started on a worker is running, at most `within`; whether none
    /// is. After [`Tracked::move_to_main`] none starts there any more.
    pub async fn idle_on_workers(&self, within: Duration) -> bool {
        self.on_workers.idle(within).await
    }

    /// Waits until none is running anywhere, at most `within`; whether none is.
    pub async fn idle(&self, within: Duration) -> bool {
        let started = tokio::time::Instant::now();
        self.on_workers.idle(within).await && self.on_main.idle(within.saturating_sub(started.elapsed())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn waits_for_its_tasks_and_no_longer() {
        let t = Tracked::on_current_arbiter();
        assert!(t.idle(Duration::from_millis(10)).await, "none at first");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        t.spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(t.running(), 1);
        assert!(!t.idle(Duration::from_millis(50)).await, "one still running");
        tx.send(()).unwrap();
        assert!(t.idle(Duration::from_secs(5)).await);
        assert_eq!(t.running(), 0);
    }

    /// Once the node stops, a task started from another arbiter's thread runs on the
    /// tracker's, and outlives the arbiter it was started from (as an HTTP worker's stops
    /// before the node's).
    #[actix_rt::test]
    async fn a_task_outlives_the_arbiter_that_started_it() {
        let t = Arc::new(Tracked::on_current_arbiter());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        t.move_to_main();
        let worker = actix_rt::Arbiter::new();
        let t2 = t.clone();
        assert!(worker.spawn(async move {
            t2.spawn(async move {
                let _ = rx.await;
                let _ = done_tx.send(());
            });
            actix_rt::Arbiter::current().stop();
        }));
        worker.join().unwrap();
        tx.send(()).unwrap();
        done_rx.await.expect("the task ran after its starter's arbiter stopped");
        assert!(t.idle(Duration::from_secs(5)).await);
    }
}
