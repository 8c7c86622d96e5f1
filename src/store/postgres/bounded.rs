//! The node's bound on every call to PostgreSQL: taking a pooled connection and each statement
//! run on it must be done within `store.statement_timeout_ms` of the call's start, or the call
//! fails with `Unavailable` (503 upstream). A link that went silent (a partition, a NAT or
//! firewall that dropped its state, a frozen database host) otherwise holds a statement until
//! the kernel gives up on the socket: ~15 minutes with data unacknowledged, 2 hours idle.
//!
//! A connection that had a statement in flight when its call ended (the deadline passed, or the
//! caller went away) is closed, never returned to the pool: its answer may still come, and the
//! link under it may be dead, so the next caller would wait on it in turn. An enqueue batch
//! that timed out may still have committed: a sender's retry is then a duplicate (dedup).
//!
//! Must not: retry (callers decide what may run again), or map errors other than the timeout.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio::time::Instant;

use super::{pg_err, pool_err};
use crate::store::StoreError;

/// The pool and the bound of every call through it.
#[derive(Clone)]
pub(super) struct BoundedPool {
    pool: Pool,
    statement_timeout: Duration,
}

/// The bound of the calls that may delete a whole queue (an operator's delete of a connection
/// or of its queue, the TTL sweep): the time the server needs for a million rows, not one
/// round trip. A dead link still frees them, sooner through the socket's own timeouts
/// (`link.rs`).
pub const BULK_TIMEOUT: Duration = Duration::from_secs(600);

impl BoundedPool {
    pub(super) fn new(pool: Pool, statement_timeout: Duration) -> BoundedPool {
        BoundedPool {
            pool,
            statement_timeout,
        }
    }

    /// How long one call waits for PostgreSQL (`store.statement_timeout_ms`).
    pub(super) fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// A connection for one call bounded by the statement timeout.
    pub(super) async fn get(&self) -> Result<Conn, StoreError> {
        self.get_within(self.statement_timeout).await
    }

    /// A connection for one call that may delete a whole queue ([`BULK_TIMEOUT`]).
    pub(super) async fn get_bulk(&self) -> Result<Conn, StoreError> {
        self.get_within(self.statement_timeout.max(BULK_TIMEOUT)).await
    }

    /// A connection of the pool, unbounded: a test's session of the store as it is set up.
    #[cfg(test)]
    pub(super) async fn get_unbounded(&self) -> Object {
        self.pool.get().await.expect("a pooled connection")
    }

    async fn get_within(&self, limit: Duration) -> Result<Conn, StoreError> {
        let deadline = Instant::now() + limit;
        let obj = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(r) => r.map_err(pool_err)?,
            Err(_) => return Err(Failed::TimedOut(limit).into()),
        };
        Ok(Conn {
            obj: Some(obj),
            bound: Bound {
                deadline,
                limit,
                in_flight: Arc::new(AtomicBool::new(false)),
            },
        })
    }
}

/// A pooled connection for one call. Dropped with a statement in flight, it is closed instead
/// of going back to the pool.
pub(super) struct Conn {
    /// `None` only inside `drop`.
    obj: Option<Object>,
    bound: Bound,
}

impl Conn {
    /// The bound of this call, apart from the connection: a transaction borrows the connection
    /// mutably while its statements are bounded.
    pub(super) fn bound(&self) -> Bound {
        self.bound.clone()
    }

    /// `f`, a statement on this connection, within the call's deadline.
    pub(super) async fn run<T>(&self, f: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, Failed> {
        self.bound.run(f).await
    }
}

impl Deref for Conn {
    type Target = Object;

    fn deref(&self) -> &Object {
        // Set at construction, taken only by `drop`.
        self.obj.as_ref().expect("a connection until dropped")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Object {
        self.obj.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.bound.in_flight.load(Ordering::Acquire) {
            if let Some(obj) = self.obj.take() {
                // Out of the pool, then dropped: deadpool-postgres aborts the connection's task,
                // which closes the socket.
                drop(Object::take(obj));
                tracing::warn!("postgres connection closed: a statement on it got no answer in time");
            }
        }
    }
}

/// The deadline of one call, and whether a statement of it is still waiting for its answer.
#[derive(Clone)]
pub(super) struct Bound {
    deadline: Instant,
    limit: Duration,
    in_flight: Arc<AtomicBool>,
}

impl Bound {
    /// `f`, a statement, within the call's deadline. Past it the statement is abandoned and
    /// its connection marked for closing (see [`Conn`]).
    pub(super) async fn run<T>(&self, f: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, Failed> {
        self.in_flight.store(true, Ordering::Release);
        match tokio::time::timeout_at(self.deadline, f).await {
            Ok(r) => {
                self.in_flight.store(false, Ordering::Release);
                r.map_err(Failed::Pg)
            }
            Err(_) => Err(Failed::TimedOut(self.limit)),
        }
    }
}

/// A statement that failed: PostgreSQL's error, or no answer in time.
#[derive(Debug)]
pub(super) enum Failed {
    Pg(tokio_postgres::Error),
    TimedOut(Duration),
}

impl Failed {
    /// A deadlock victim or serialization failure: the statement had no effect and may run
    /// again.
    pub(super) fn is_transient(&self) -> bool {
        matches!(self, Failed::Pg(e) if super::is_transient(e))
    }

    /// The server's `lock_timeout` ended the statement: another session held a lock it needed
    /// for that long. The statement had no effect.
    pub(super) fn is_lock_timeout(&self) -> bool {
        matches!(self, Failed::Pg(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE))
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Pg(e) => write!(f, "{e}"),
            Failed::TimedOut(d) => write!(f, "no answer within {} ms", d.as_millis()),
        }
    }
}

impl From<Failed> for StoreError {
    fn from(f: Failed) -> StoreError {
        match f {
            Failed::Pg(e) => pg_err(e),
            Failed::TimedOut(d) => StoreError::Unavailable(format!(
                "postgres: no answer within {} ms (store.statement_timeout_ms); the connection is closed",
                d.as_millis()
            )),
        }
    }
}
