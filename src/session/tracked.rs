//! Work a request or a socket starts that must outlive it: the wake-up or push of a queued
//! message, a hand-off, a session's give-back.
//!
//! Started on an HTTP worker's own arbiter, such a task died with it: a stopping node stops
//! its workers as soon as their last connection ends, and a forward answered 202 just before
//! left its wallet neither woken nor pushed, while the stop was recorded as clean. These run
//! on the node's main arbiter instead, which lives until the stop is over, and the stop waits
//! for them ([`Tracked::idle`]) before it stops the push worker.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Tasks on the node's main arbiter, counted until they end.
pub struct Tracked {
    main: actix_rt::ArbiterHandle,
    running: Arc<Running>,
}

#[derive(Default)]
struct Running {
    count: AtomicUsize,
    none_left: Notify,
}

/// Counts one task until it is dropped (ended, or its arbiter gone).
struct Counted(Arc<Running>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

impl Tracked {
    /// Tracks tasks on the current arbiter: call it on the node's main one.
    pub fn on_current_arbiter() -> Tracked {
        Tracked {
            main: actix_rt::Arbiter::current(),
            running: Arc::default(),
        }
    }

    /// Runs `task` on the main arbiter, counted until it ends.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.running.count.fetch_add(1, Ordering::SeqCst);
        let counted = Counted(self.running.clone());
        // Not taken (the main arbiter is gone: the node has stopped): dropped, and uncounted.
        let _ = self.main.spawn(async move {
            let _counted = counted;
            task.await;
        });
    }

    /// How many are running.
    pub fn running(&self) -> usize {
        self.running.count.load(Ordering::SeqCst)
    }

    /// Waits until none is running, at most `within`; whether none is.
    pub async fn idle(&self, within: Duration) -> bool {
        let wait = async {
            loop {
                let none_left = self.running.none_left.notified();
                tokio::pin!(none_left);
                // Registered before the count is read: an end in between is not missed.
                none_left.as_mut().enable();
                if self.running() == 0 {
                    return;
                }
                none_left.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
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

    /// A task started from another arbiter's thread runs on the tracker's, and outlives the
    /// arbiter it was started from (as an HTTP worker's stops before the node's).
    #[actix_rt::test]
    async fn a_task_outlives_the_arbiter_that_started_it() {
        let t = Arc::new(Tracked::on_current_arbiter());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
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
