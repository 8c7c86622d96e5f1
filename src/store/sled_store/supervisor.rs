//! The supervisor: after a write failure (sled latches its first I/O error, the queue log
//! stops trusting its files after a failed sync), it waits for free space and reopens the
//! database in place, carrying the leases over.

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use super::index::Leases;
use super::inner::Inner;
use super::queue_log::QueueLog;
use super::REOPEN_WAIT;
use crate::store::{StoreError, StoreResult};

/// How often the supervisor looks for a failed write (and, after one, for space to reopen in).
const SUPERVISE_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// Free space the supervisor wants (written and synced in a probe file) before it reopens a
/// database whose writes failed: a couple of sled segments (512 KiB each by default).
const REOPEN_SPACE: usize = 2 << 20;

/// The open database, replaced in place after a write failure.
///
/// sled 0.34 latches the first I/O error of its log (`Config::global_error`, reset only by
/// `PageCache::start`): after a disk full, every later write and flush of that `Db` fails even
/// once space returns. The supervisor thread then waits for space (a probe file), drops the
/// poisoned handle (sled holds a file lock), reopens the database from disk and swaps it in.
/// Meanwhile calls fail with [`StoreError::Unavailable`] (forwards 503, `/ready` not ready);
/// nothing acknowledged is lost (an enqueue is answered only after its flush), leases in memory
/// are carried over to the reopened handle, and callers holding the [`SledStore`] (sessions,
/// the node) never see the swap.
///
/// The queue log latches a failed sync the same way ([`QueueLog::poisoned`]): a later sync of
/// the file would succeed whether or not the failed pages reach the disk, so a sync that
/// succeeds again proves nothing. The log refuses writes (enqueues answer 503, `health` fails)
/// until the supervisor has reopened it from disk ([`QueueLog::reopen`]) and the handle with
/// it: the index is rebuilt from what replay found, and the leases of the messages it found
/// carried over.
pub(super) struct Slot {
    pub(super) current: parking_lot::RwLock<Option<Arc<Inner>>>,
    /// The queue log: it outlives the handles a reopen replaces (reopened in place after a
    /// failed sync).
    pub(super) log: Arc<QueueLog>,
    pub(super) config: sled::Config,
    /// The database's directory (None: temporary), where the space probe is written.
    pub(super) dir: Option<PathBuf>,
    pub(super) stop: std::sync::atomic::AtomicBool,
    /// Reopens done (a log line each).
    pub(super) reopens: std::sync::atomic::AtomicU64,
    /// Leases taken from the handle being replaced, for the next one.
    pub(super) carried: Mutex<Leases>,
    /// Nodes of this process running on the store ([`Store::begin_run`](crate::store::Store::begin_run)).
    pub(super) runs: Mutex<usize>,
    /// The free-disk reserve, read every tick.
    pub(super) space: super::space::Space,
    /// The bound on queued messages (`store.max_queued_messages`), decided by the writer.
    pub(super) cap: super::cap::QueueCap,
}

impl Slot {
    pub(super) fn get(&self) -> StoreResult<Arc<Inner>> {
        self.current
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("sled: reopening the database after a write failure".into()))
    }

    /// One supervision step: nothing while writes succeed; after a failed write, a flush that
    /// succeeds clears it, else the database is reopened once space is back; after a failed
    /// sync of the queue log, the log and the database are reopened once space is back (no
    /// flush can clear it).
    fn supervise(&self) {
        let current = self.current.read().clone();
        if let Some(inner) = current {
            let poisoned = self.log.poisoned();
            if !poisoned && !inner.write_failed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            // Space first: a sync of the queue log succeeds on a full disk (nothing to write).
            if !self.space_back() {
                return;
            }
            if poisoned {
                tracing::warn!("queue log: a sync failed: reopening the database and its queue from disk");
            } else if inner.flush_all().is_ok() {
                return;
            } else {
                tracing::warn!("sled: writes still fail after an I/O error (sled latches it): reopening the database");
            }
            drop(inner);
            let Some(mut old) = self.current.write().take() else {
                return;
            };
            // Calls in flight hold the old handle for one call each: wait for them to let go
            // (sled's file lock is released with the last handle). The leases are read once
            // they have: one taken by a call in flight meanwhile is carried over too.
            loop {
                match Arc::try_unwrap(old) {
                    Ok(inner) => {
                        *self.carried.lock() = inner.queues.lock().leases();
                        break drop(inner);
                    }
                    Err(still) => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        } else if !self.space_back() {
            return;
        }
        self.reopen();
    }

    /// Opens the database again (the old handle is gone), after the queue log when a sync of it
    /// failed (the index is rebuilt from what its replay found); on failure the next step
    /// retries.
    pub(super) fn reopen(&self) {
        if let Err(e) = self.log.reopen() {
            tracing::warn!(error = %e, "queue log: reopen from disk failed (retried shortly)");
            return;
        }
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        let inner = loop {
            match Inner::open(self.config.clone(), self.log.clone()) {
                Ok(inner) => break inner,
                // sled's flusher thread may still hold the lock a moment after the drop.
                Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!("sled: reopen failed (retried shortly): {e}");
                    return;
                }
            }
        };
        inner
            .queues
            .lock()
            .carry_leases(std::mem::take(&mut *self.carried.lock()));
        let n = self.reopens.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        tracing::info!(reopens = n, "sled: database reopened, writes accepted again");
        *self.current.write() = Some(Arc::new(inner));
    }

    /// Says when the queue is back under its bound's seven eighths ([`super::cap::QueueCap`])
    /// without waiting for the next enqueue. Takes the index lock only while the bound is
    /// reached.
    fn observe_room(&self) {
        if !self.cap.reached() {
            return;
        }
        if let Some(inner) = self.current.read().clone() {
            let queued = inner.queues.lock().total;
            self.cap.observe(queued);
        }
    }

    /// Drops from the index the messages compaction found damaged ([`QueueLog::take_lost`]).
    /// A handle being reopened needs nothing: its index is rebuilt from the log.
    fn forget_lost(&self) {
        let lost = self.log.take_lost();
        if lost.is_empty() {
            return;
        }
        if let Some(inner) = self.current.read().clone() {
            inner.forget_lost(&lost);
        }
    }

    /// Whether the database's file system takes [`REOPEN_SPACE`] bytes again (a probe file
    /// written, synced and removed).
    fn space_back(&self) -> bool {
        use std::io::Write;
        let Some(dir) = &self.dir else {
            return true;
        };
        let probe = dir.join("mailroom-space-probe");
        let wrote = std::fs::File::create(&probe).and_then(|mut f| {
            f.write_all(&vec![0u8; REOPEN_SPACE])?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&probe);
        wrote.is_ok()
    }
}

/// Supervises, compacts the queue log (`QueueLog::compact`, then drops from the index what
/// it found damaged) and syncs its removals (`QueueLog::sync_if_unsynced`) every
/// [`SUPERVISE_EVERY`] until the store is dropped.
pub(super) fn supervisor_loop(slot: Arc<Slot>) {
    let stop = || slot.stop.load(std::sync::atomic::Ordering::SeqCst);
    while !stop() {
        std::thread::park_timeout(SUPERVISE_EVERY);
        if !stop() {
            if let Some(d) = &slot.dir {
                slot.space.sample(d);
            }
            slot.supervise();
            slot.observe_room();
            if slot.log.poisoned() {
                // Not reopened yet (no space, or the reopen failed): the log refuses both.
                continue;
            }
            if let Err(e) = slot.log.compact(&stop) {
                tracing::warn!(error = %e, "queue log: compaction failed (tried again shortly)");
            }
            // Also after a step that failed: it may have dropped damaged records before.
            slot.forget_lost();
            if let Err(e) = slot.log.sync_if_unsynced() {
                tracing::warn!(error = %e, "queue log: sync of removals failed (tried again shortly)");
            }
        }
    }
}
