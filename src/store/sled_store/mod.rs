//! The sled backend: embedded, one process.
//!
//! Layout (trees):
//! - `meta`: `identity` -> JSON; `dedup_pruned_before` -> i64 BE (see `prune_dedup`).
//! - `conns`: connection id -> JSON [`Connection`](super::Connection); `by_verkey`:
//!   `len16(verkey) verkey id` -> write sequence; `by_thread`: `len16(thread) thread id` ->
//!   write sequence. Written in the connection's transaction; several connections may share a
//!   thread, a lookup takes the most recently written one (as PostgreSQL does: a patch or a
//!   revocation stamps the thread entry again, as it bumps `written` there).
//! - `keys`: routing key -> connection id; `conn_keys`: `len16(conn) conn key` -> () (keys_of).
//! - `attempts`: id -> u32 BE, written when a message is leased (not flushed on its own).
//! - `devices`: connection id -> JSON [`Device`](super::Device); `push_windows`: connection id
//!   -> its push window (`encode_push_window`), written by the push calls (a few per push, off
//!   the forward path), kept in memory too (`Inner::push_windows`).
//! - `msgs`, `dedup`: where stores written before the queue log kept their messages and dedup
//!   records; moved into the log at open (`migrate_trees`), empty afterwards.
//!
//! The queue log (`queue_log.rs`, in `<path>/queue/`): append-only segment files holding
//! - queued messages, keyed by id, in a fixed layout (see `encode_msg`): header, connection,
//!   recipient key, dedup key, payload (JSON would double the size of binary payloads);
//! - dedup records of messages no longer queued: `len16(conn) key32 id received_at`. A queued
//!   message's record is its own dedup record (it holds its dedup key); a dedup record is
//!   written only when the message leaves the queue while its dedup entry is still in the
//!   window, in the append that removes the message (`kept_dedup`).
//!
//! Ingest writes one log record a forward and one append and `fdatasync` a batch; sled's insert
//! cost 11-15 us of CPU a message, whatever its size (docs/BENCHMARKS.md, "The queue log").
//! Removals are tombstones appended without a sync (at-least-once), but for an operator's
//! (`drop_queue`, `delete_connection`: synced before they answer); the supervisor thread
//! compacts the log (copies the live records of the oldest segment forward, deletes segments
//! that hold nothing live).
//!
//! The queue is indexed in memory (`Queues`: per connection, id -> size, time, lease), rebuilt
//! from the queue log and `attempts` at open. sled allows one process per database, so this
//! process's memory is the only place leases live: they are deliberately not persisted, a
//! restart makes every message pending again (at-least-once). `lease`, `ack`, `release` only
//! take the in-memory lock for their decision and never wait for a disk flush. A lease's byte
//! budget (`lease_upto`) is decided on the sizes the index holds: it reads the payloads it
//! leases and no other.
//!
//! Write path: every `enqueue` goes through one writer thread (`writer_loop`) that drains the
//! waiting requests (up to [`MAX_BATCH_MESSAGES`]), decides limits and dedup for all of them,
//! writes them, flushes once, publishes them in the index and answers every caller.
//!
//! Live path: leases and acknowledgements (`lease_upto`, `ack_leased`) run on one thread of
//! their own (`live_loop`), in turn, as they come: under load it stays awake and takes the next
//! job, where `spawn_blocking` woke and parked a pool thread per call (the pool grew to ~200
//! threads under a fan-out to 100 wallets, and they queued on sled's write lock while the
//! writer applied a batch). `lease_for_key_upto`, which may read the heads of many records from
//! disk (their recipient keys, never their payloads), stays on the blocking pool.
//!
//! Must not: run sled calls on an async runtime thread (they go to the live thread, to
//! `spawn_blocking` or to the writer thread). Calls that touch only the in-memory index
//! (`release`, `queue_stats`, the sweep's `pending_among`...) run on the caller's thread under
//! the index lock.
//!
//! Files: `inner.rs` (the open database: trees, open and index rebuild, reads, removals),
//! `writer.rs` (the writer thread and its batch), `index.rs` (the in-memory queue index),
//! `queue_log.rs` (the queue's segment files), `records.rs` (the on-disk encodings),
//! `supervisor.rs` (reopen after a write failure or a failed sync of the queue log, the queue
//! log's compaction), `store_trait.rs` (the [`Store`](super::Store) trait on all of it); this
//! file holds the handle, its threads and how calls reach them.

mod cap;
mod index;
mod inner;
mod queue_log;
mod records;
mod space;
mod store_trait;
mod supervisor;
mod writer;

use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{
    check_storable, storable, EnqueueLimits, Enqueued, MessageId, NewMessage, QueuedMessage, StoreError, StoreResult,
};
pub use cap::DEFAULT_MAX_QUEUED_MESSAGES;
use index::{LeaseBudget, Meta};
use inner::Inner;
use queue_log::QueueLog;
pub use space::DEFAULT_MIN_FREE_BYTES;
use supervisor::{supervisor_loop, Slot};
use writer::{writer_loop, EnqueueReq};

/// The pending messages of `conn` queued for `key` that a lease within `budget` takes, oldest
/// first: the keys of those whose tag matches ([`index::key_tag`]) are read from disk (the
/// heads of their records, [`Inner::msg_head`]), as many as it takes to fill the budget and no
/// more, outside the index's lock. Sizes come from the index.
fn matching_key(
    inner: &Inner,
    conn: &str,
    key: &str,
    now_ms: i64,
    mut budget: LeaseBudget,
) -> StoreResult<Vec<MessageId>> {
    let tag = index::key_tag(key);
    let pending: Vec<(MessageId, u64)> = {
        let q = inner.queues.lock();
        let Some(cq) = q.by_conn.get(conn) else {
            return Ok(Vec::new());
        };
        cq.msgs
            .iter()
            .filter(|(_, m)| m.pending(now_ms) && m.key_tag == tag)
            .map(|(id, m)| (*id, m.size))
            .collect()
    };
    let mut matching = Vec::new();
    for (id, size) in pending {
        if budget.spent() {
            break;
        }
        if inner.is_for_key(conn, id, key)? {
            if !budget.admits(size) {
                break;
            }
            budget.take(size);
            matching.push(id);
        }
    }
    Ok(matching)
}

/// Most messages the writer puts in one flush. Bounds the latency of the first caller of a
/// batch and the memory of one batch.
pub const MAX_BATCH_MESSAGES: usize = 2048;
/// Most payload bytes in one batch (a batch always takes at least one request).
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// Enqueue requests waiting for the writer; callers beyond it wait (backpressure).
pub const WRITER_CHANNEL: usize = 4096;

const MSG_FORMAT_V1: u8 = 1;
/// As v1 with the sender's expiry (`expires_at i64`) after `received_at`.
const MSG_FORMAT_V2: u8 = 2;
/// `Meta::expires_at_ms` of a message that never expires.
const NEVER: i64 = i64::MAX;
/// sled page cache when the config does not say (`store.sled_cache_mib`, 64).
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
const IDENTITY_KEY: &[u8] = b"identity";
/// The queue log's directory inside the database's (`queue_log.rs`).
const QUEUE_LOG_DIR: &str = "queue";
/// `meta` key: the latest cutoff [`Store::prune_dedup`] was called with (i64 BE). Dedup entries
/// older than it are past their window: the index rebuilt at open leaves them out, as the
/// process before it had pruned them (or was about to).
const DEDUP_PRUNED_BEFORE_KEY: &[u8] = b"dedup_pruned_before";
/// `meta` key: present while a node runs on the store ([`Store::begin_run`] sets it,
/// [`Store::end_run`] removes it). Found at the next start, that run ended without its stop.
const RUNNING_KEY: &[u8] = b"node_running";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("sled: {e}"))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("sled: {what}"))
}

/// The sled [`Store`](super::Store). Share one handle between in-process nodes by cloning an
/// `Arc` of it. Dropping the last handle stops the writer thread after it has flushed.
pub struct SledStore {
    slot: Arc<Slot>,
    tx: Option<mpsc::Sender<EnqueueReq>>,
    writer: Option<std::thread::JoinHandle<()>>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    /// The live path's thread (see [`SledStore::live`]).
    live: Option<std::sync::mpsc::Sender<LiveJob>>,
    live_thread: Option<std::thread::JoinHandle<()>>,
}

/// A lease or acknowledgement for the live path's thread.
type LiveJob = Box<dyn FnOnce() + Send + 'static>;

/// The live path's thread: runs its jobs one after the other, as they come. A job that panics
/// drops its reply (its caller gets an error); the thread goes on with the next.
fn live_loop(rx: std::sync::mpsc::Receiver<LiveJob>) {
    while let Ok(job) = rx.recv() {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("sled: a lease or acknowledgement panicked");
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop; joining makes the database lock free for a
        // reopen as soon as this returns.
        self.tx.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        self.live.take();
        if let Some(h) = self.live_thread.take() {
            let _ = h.join();
        }
        self.slot.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.supervisor.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// Stores open in this process, by canonical path: sled allows one open handle per directory,
/// so a second open of the same path (two in-process nodes) gets the same store.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<SledStore>>> {
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<SledStore>>>> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// Serialises opens, so two concurrent opens of one path do not both try sled's file lock.
fn opening() -> &'static tokio::sync::Mutex<()> {
    static OPENING: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    OPENING.get_or_init(Default::default)
}

/// How long an open waits for a store of the same path that is being dropped to let go of
/// sled's file lock.
const REOPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl SledStore {
    /// Opens or creates the database at `path`, or returns the store already open on it in this
    /// process. Used by [`super::open_sled`].
    pub async fn open_shared(path: &Path) -> StoreResult<Arc<SledStore>> {
        Self::open_shared_with_cache(path, DEFAULT_CACHE_BYTES).await
    }

    /// As [`SledStore::open_shared`], with sled's page cache bounded to `cache_bytes` (sled's
    /// own default is 1 GiB: a node's memory would grow towards it under steady traffic).
    pub async fn open_shared_with_cache(path: &Path, cache_bytes: u64) -> StoreResult<Arc<SledStore>> {
        Self::open_shared_with(path, cache_bytes, DEFAULT_MIN_FREE_BYTES, DEFAULT_MAX_QUEUED_MESSAGES).await
    }

    /// As [`SledStore::open_shared_with_cache`], refusing new messages while the disk holding
    /// `path` has less than `min_free_bytes` free (0: no reserve; see
    /// `store.min_free_disk_mib`) or while the node holds `max_queued_messages` queued (at
    /// least 1; see `store.max_queued_messages`). A store already open on `path` in this
    /// process keeps the settings it was opened with.
    pub async fn open_shared_with(
        path: &Path,
        cache_bytes: u64,
        min_free_bytes: u64,
        max_queued_messages: u64,
    ) -> StoreResult<Arc<SledStore>> {
        let path = path.to_owned();
        let key = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&path)?;
            path.canonicalize()
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        let _opening = opening().lock().await;
        if let Some(s) = registry().lock().get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        let store = loop {
            let cfg = sled::Config::new().path(&key).cache_capacity(cache_bytes);
            let opened =
                SledStore::open_config_with(cfg, queue_log::SEGMENT_BYTES, min_free_bytes, max_queued_messages);
            match opened.await {
                Ok(s) => break s,
                // The last handle of this path may be finishing its drop on another thread.
                Err(e) if e.to_string().contains("lock") && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let store = Arc::new(store);
        let mut reg = registry().lock();
        reg.retain(|_, w| w.strong_count() > 0);
        reg.insert(key, Arc::downgrade(&store));
        Ok(store)
    }

    /// Opens or creates the database at `path` (fails if it is open elsewhere).
    pub async fn open(path: &Path) -> StoreResult<SledStore> {
        let cfg = sled::Config::new().path(path).cache_capacity(DEFAULT_CACHE_BYTES);
        Self::open_config(cfg).await
    }

    /// Like [`SledStore::open`] without sled's periodic background flush, so that only the
    /// store's own flushes make data durable (the crash test proves `enqueue` flushes).
    #[cfg(test)]
    pub(crate) async fn open_without_background_flush(path: &Path) -> StoreResult<SledStore> {
        Self::open_config(sled::Config::new().path(path).flush_every_ms(None)).await
    }

    /// A database deleted when dropped (tests).
    pub async fn temporary() -> StoreResult<SledStore> {
        Self::open_config(sled::Config::new().temporary(true)).await
    }

    /// A store whose queue log closes its segments at `segment_bytes` (tests: compaction in a
    /// running store without writing 64 MiB segments).
    #[cfg(test)]
    pub(crate) async fn open_with_segment_bytes(path: &Path, segment_bytes: u64) -> StoreResult<SledStore> {
        let cfg = sled::Config::new().path(path);
        Self::open_config_with(cfg, segment_bytes, DEFAULT_MIN_FREE_BYTES, DEFAULT_MAX_QUEUED_MESSAGES).await
    }

    async fn open_config(cfg: sled::Config) -> StoreResult<SledStore> {
        let segment_bytes = queue_log::SEGMENT_BYTES;
        Self::open_config_with(cfg, segment_bytes, DEFAULT_MIN_FREE_BYTES, DEFAULT_MAX_QUEUED_MESSAGES).await
    }

    async fn open_config_with(
        cfg: sled::Config,
        segment_bytes: u64,
        min_free_bytes: u64,
        max_queued_messages: u64,
    ) -> StoreResult<SledStore> {
        let config = cfg.clone();
        let (inner, log) = tokio::task::spawn_blocking(move || -> StoreResult<(Inner, Arc<QueueLog>)> {
            let log = Arc::new(
                if cfg.temporary {
                    QueueLog::temporary()
                } else {
                    QueueLog::open_with(&cfg.get_path().join(QUEUE_LOG_DIR), segment_bytes, false)
                }
                .map_err(unavailable)?,
            );
            Ok((Inner::open(cfg, log.clone())?, log))
        })
        .await
        .map_err(unavailable)??;
        // A temporary database is gone with its handle: there is nothing to reopen.
        let dir = (!config.temporary).then(|| config.get_path());
        let slot = Arc::new(Slot {
            current: parking_lot::RwLock::new(Some(Arc::new(inner))),
            log,
            config,
            stop: std::sync::atomic::AtomicBool::new(false),
            reopens: std::sync::atomic::AtomicU64::new(0),
            carried: Mutex::new(HashMap::new()),
            runs: Mutex::new(0),
            space: space::Space::new(min_free_bytes),
            cap: cap::QueueCap::new(max_queued_messages),
            dir,
        });
        // A store opened on a full disk refuses new messages from the start.
        if let Some(d) = &slot.dir {
            slot.space.sample(d);
        }
        let (tx, rx) = mpsc::channel(WRITER_CHANNEL);
        let w = slot.clone();
        let writer = std::thread::Builder::new()
            .name("mailroom-sled-writer".into())
            .spawn(move || writer_loop(w, rx))
            .map_err(unavailable)?;
        let supervisor = match slot.dir {
            Some(_) => {
                let s = slot.clone();
                Some(
                    std::thread::Builder::new()
                        .name("mailroom-sled-supervisor".into())
                        .spawn(move || supervisor_loop(s))
                        .map_err(unavailable)?,
                )
            }
            None => None,
        };
        let (live, live_rx) = std::sync::mpsc::channel();
        let live_thread = std::thread::Builder::new()
            .name("mailroom-sled-live".into())
            .spawn(move || live_loop(live_rx))
            .map_err(unavailable)?;
        Ok(SledStore {
            slot,
            tx: Some(tx),
            writer: Some(writer),
            supervisor,
            live: Some(live),
            live_thread: Some(live_thread),
        })
    }

    /// `lease_upto` and `lease_for_key_upto`. Recipient keys live on disk only (the index
    /// holds sizes, leases and a 16-bit tag of the key): with a key, the pending ids whose tag
    /// matches are picked first, their keys read outside the lock ([`matching_key`]), then
    /// those still pending leased; without one, the
    /// first pending ids are leased in one pass under the lock. Either way the byte budget is
    /// decided on the sizes the index holds: only the payloads leased are read.
    #[allow(clippy::too_many_arguments)]
    async fn lease_filtered(
        &self,
        conn: &str,
        recipient_key: Option<&str>,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        check_storable("lease owner", owner)?;
        if !storable(conn) || max == 0 {
            return Ok(Vec::new());
        }
        let (conn, key) = (conn.to_owned(), recipient_key.map(str::to_owned));
        let owner = owner.to_owned();
        let filtered = key.is_some();
        let job = move |inner: &Inner| {
            let budget = LeaseBudget::new(max, max_bytes);
            let matching: Option<Vec<MessageId>> = match &key {
                None => None,
                Some(key) => Some(matching_key(inner, &conn, key, now_ms, budget)?),
            };
            let picked: Vec<(MessageId, u32)> = {
                let mut q = inner.queues.lock();
                let owner = q.owner_named(&owner);
                let Some(cq) = q.by_conn.get_mut(&conn) else {
                    return Ok(Vec::new());
                };
                let mut picked = Vec::with_capacity(max.min(cq.msgs.len()));
                let mut take = |id: MessageId, m: &mut Meta| {
                    if m.pending(now_ms) {
                        m.lease_until_ms = until_ms;
                        m.owner = Some(owner.clone());
                        m.attempts = m.attempts.saturating_add(1);
                        picked.push((id, m.attempts));
                    }
                };
                match matching {
                    None => {
                        let mut budget = budget;
                        for (id, m) in cq.msgs.iter_mut() {
                            if budget.spent() {
                                break;
                            }
                            if !m.pending(now_ms) {
                                continue;
                            }
                            if !budget.admits(m.size) {
                                break;
                            }
                            budget.take(m.size);
                            take(*id, m);
                        }
                    }
                    // Within the budget together (a message's size never changes); those
                    // leased by another meanwhile are left, and the lease takes fewer.
                    Some(ids) => {
                        for id in ids {
                            if let Some(m) = cq.msgs.get_mut(&id) {
                                take(id, m);
                            }
                        }
                    }
                }
                if !picked.is_empty() {
                    let conns = q.by_owner.entry(owner.clone()).or_default();
                    if !conns.contains(&conn) {
                        conns.insert(conn.clone());
                    }
                }
                picked
            };
            inner.load_leased(&conn, picked)
        };
        // A lease for one recipient key reads the pending messages' keys from disk, as many as
        // it takes: on the blocking pool, so it never holds up the other sessions' leases.
        if filtered {
            self.blocking(job).await
        } else {
            self.live(job).await
        }
    }

    /// Hands messages to the writer thread and waits for their batch to be durable.
    async fn submit(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
        routed: bool,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(EnqueueReq {
            msgs,
            limits: *limits,
            routed,
            reply,
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// As [`SledStore::blocking`], on the live path's own thread: leases and acknowledgements
    /// of every session, run in turn by one thread that stays awake while they keep coming,
    /// instead of a blocking-pool thread woken (and parked again) for each.
    async fn live<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    {
        let inner = self.slot.get()?;
        let (reply, rx) = oneshot::channel();
        let job: LiveJob = Box::new(move || {
            let _ = reply.send(inner.run(f));
        });
        self.live
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(job)
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Unavailable("sled: the live path's task failed".into()))?
    }

    /// Dedup records in the queue log (tests: what ingest and removals write).
    #[cfg(test)]
    pub(crate) fn dedup_tree_len_for_test(&self) -> usize {
        self.slot.log.count(records::KIND_DEDUP)
    }

    /// A job that panics on the live path's thread (tests).
    #[cfg(test)]
    pub(crate) async fn live_panic_for_test(&self) -> StoreResult<()> {
        self.live(|_| -> StoreResult<()> { panic!("a job that panics (test)") })
            .await
    }

    async fn blocking<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> StoreResult<T> + Send + 'static,
    {
        let inner = self.slot.get()?;
        tokio::task::spawn_blocking(move || inner.run(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("blocking task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::records::{dedup_tree_key, dedup_value, encode_id, encode_msg};
    use super::*;
    use crate::store::Store;

    /// No limits but a dedup window of `ms`.
    fn dedup_window(ms: i64) -> EnqueueLimits {
        EnqueueLimits {
            dedup_window_ms: ms,
            ..EnqueueLimits::UNLIMITED
        }
    }

    fn new_msg(conn: &str, payload: &str, at: i64, dedup: Option<u8>) -> NewMessage {
        NewMessage {
            connection: conn.to_owned(),
            recipient_key: format!("rk-{conn}"),
            payload: payload.as_bytes().to_vec(),
            received_at_ms: at,
            dedup_key: dedup.map(|k| [k; 32]),
            expires_at_ms: None,
            lease: None,
        }
    }

    /// A run that did not end (no `end_run`: a crash) is found by the next `begin_run`, once;
    /// in-process nodes sharing the store count as one run, ended by the last to stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_that_did_not_end_is_found_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let open = || SledStore::open_shared(dir.path());
        {
            let s = open().await.unwrap();
            assert_eq!(s.begin_run().await.unwrap(), Some(false), "a new store");
            // Dropped without end_run: a crash.
        }
        {
            let s = open().await.unwrap();
            assert_eq!(s.begin_run().await.unwrap(), Some(true), "the crash is found");
            assert_eq!(
                s.begin_run().await.unwrap(),
                Some(false),
                "a second node of this process"
            );
            s.end_run().await.unwrap();
            // The first node is still running when the process dies.
        }
        {
            let s = open().await.unwrap();
            assert_eq!(s.begin_run().await.unwrap(), Some(true), "one of two nodes stopped");
            s.end_run().await.unwrap();
        }
        let s = open().await.unwrap();
        assert_eq!(
            s.begin_run().await.unwrap(),
            Some(false),
            "the last run stopped cleanly"
        );
    }

    /// Push windows outlive a restart (the conformance check `push_windows_survive_a_reopen`),
    /// but after a run that did not stop, `begin_run` forgets when they last pushed: the
    /// node's wake-up pushes a wallet pushed just before the crash at once (its socket died
    /// with the run), while a trailing push scheduled before the crash is still taken.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_forgets_the_last_pushes_not_the_trailing_ones() {
        use crate::store::{NewClaim, PushSlot};
        const WINDOW: i64 = 60_000;
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let claim = || NewClaim::until(t0 + 30_000);
        {
            let s = SledStore::open(dir.path()).await.unwrap();
            assert_eq!(s.begin_run().await.unwrap(), Some(false));
            let c = claim();
            assert_eq!(
                s.push_event("pushed", t0, WINDOW, c, None).await.unwrap(),
                PushSlot::Now
            );
            assert!(s.push_done("pushed", c.token, None).await.unwrap());
            let c = claim();
            assert_eq!(
                s.push_event("trailing", t0, WINDOW, c, None).await.unwrap(),
                PushSlot::Now
            );
            assert!(s.push_done("trailing", c.token, None).await.unwrap());
            let folded = s.push_event("trailing", t0 + 1, WINDOW, claim(), None).await.unwrap();
            assert_eq!(folded, PushSlot::Trailing { due_ms: t0 + WINDOW });
            // Dropped without end_run: a crash.
        }
        let s = SledStore::open(dir.path()).await.unwrap();
        assert_eq!(s.begin_run().await.unwrap(), Some(true));
        let c = claim();
        let wake = s.push_event("pushed", t0 + 2, WINDOW, c, None).await.unwrap();
        assert_eq!(wake, PushSlot::Now, "the wake-up after the crash is put off");
        assert!(s.push_done("pushed", c.token, None).await.unwrap());
        let due = s.push_take_due(t0 + WINDOW, t0 + 2 * WINDOW, 0, 10).await.unwrap();
        let due: Vec<&str> = due.iter().map(|c| c.conn.as_str()).collect();
        assert_eq!(due, vec!["trailing"], "the trailing push is lost");
    }

    /// The database at `dir` opened raw, once the store dropped just before has let go of its
    /// lock: sled's flusher thread holds it a moment after the last handle is dropped (an open
    /// right then failed with WouldBlock, seen once under load).
    fn open_raw_when_free(dir: &std::path::Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return db,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("the database lock was not let go within 20 s: {e}"),
            }
        }
    }

    /// A push window record that cannot be read (a damaged value, a key that is not UTF-8) is
    /// forgotten at open, with a warning, and removed: the store opens, and the wallet's next
    /// event pushes at once. Before, the open failed and the node could not start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_push_window_is_forgotten_not_fatal() {
        use crate::store::{NewClaim, PushSlot};
        let dir = tempfile::tempdir().unwrap();
        drop(SledStore::open(dir.path()).await.unwrap());
        {
            let db = open_raw_when_free(dir.path());
            let t = db.open_tree("push_windows").unwrap();
            t.insert(b"damaged", &b"not 33 bytes"[..]).unwrap();
            t.insert(&[0xff, 0xfe][..], &[0u8; 33][..]).unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path())
            .await
            .expect("opens past damaged push windows");
        let now = 1_700_000_000_000;
        let slot = s.push_event("damaged", now, 60_000, NewClaim::until(now + 1), None);
        assert_eq!(slot.await.unwrap(), PushSlot::Now);
        drop(s);
        let db = open_raw_when_free(dir.path());
        let t = db.open_tree("push_windows").unwrap();
        let keys: Vec<Vec<u8>> = t.iter().keys().map(|k| k.unwrap().to_vec()).collect();
        assert_eq!(
            keys,
            vec![b"damaged".to_vec()],
            "the unreadable records removed, the new one kept"
        );
    }

    /// A database written before the queue log kept its messages and dedup records in the
    /// `msgs` and `dedup` trees: the first open moves them into the log, empties the trees,
    /// and the store serves them as before (queue, dedup window, new ids after the old ones).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_written_before_the_queue_log_is_moved_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let mut last_id = 0;
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let msgs = db.open_tree("msgs").unwrap();
            for i in 0..3u8 {
                let id = db.generate_id().unwrap() as i64 + 1;
                last_id = id;
                let m = new_msg("c", &format!("old-{i}"), t0 + i64::from(i), Some(i));
                msgs.insert(encode_id(id), encode_msg(&m)).unwrap();
            }
            // The dedup record of a message acknowledged before the upgrade.
            db.open_tree("dedup")
                .unwrap()
                .insert(dedup_tree_key("c", &[9; 32]), dedup_value(1_000, t0))
                .unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(dir.path()).await.unwrap();
        let got = s.lease("c", 10, "o", t0 + 10, t0 + 1_000).await.unwrap();
        let payloads: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(payloads, ["old-0", "old-1", "old-2"]);
        let lim = dedup_window(60_000);
        // A copy of the acknowledged message and of a queued one: duplicates; a new one is not.
        let r = s
            .enqueue(
                vec![
                    new_msg("c", "again", t0 + 20, Some(9)),
                    new_msg("c", "old-1 again", t0 + 20, Some(1)),
                    new_msg("c", "new", t0 + 20, Some(7)),
                ],
                &lim,
            )
            .await
            .unwrap();
        let r: Vec<Enqueued> = r.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            (r[0].duplicate, r[0].id, r[1].duplicate, r[2].duplicate),
            (true, 1_000, true, false)
        );
        assert!(r[2].id > last_id, "new id {} after the old ones ({last_id})", r[2].id);
        {
            let inner = s.slot.get().unwrap();
            assert!(inner.msgs.is_empty() && inner.dedup.is_empty(), "trees emptied");
        }
        drop(s);
        // Once more: served from the queue log alone.
        let s = SledStore::open(dir.path()).await.unwrap();
        assert_eq!(s.total_queued().await.unwrap(), 4);
        assert_eq!(s.dedup_tree_len_for_test(), 1);
    }

    /// The supervisor compacts the queue log of a running store: once most messages are
    /// acknowledged, the segments they filled are freed, and what is still queued is all there
    /// after a reopen (and nothing acknowledged comes back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_store_compacts_its_queue_log() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let segments = || {
            std::fs::read_dir(dir.path().join(QUEUE_LOG_DIR))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".qlog"))
                .count()
        };
        let s = SledStore::open_with_segment_bytes(dir.path(), 16 << 10).await.unwrap();
        for b in 0..20 {
            let batch = (0..30)
                .map(|i| new_msg("c", &format!("{:0>500}", b * 30 + i), t0, None))
                .collect();
            assert!(s
                .enqueue(batch, &EnqueueLimits::UNLIMITED)
                .await
                .unwrap()
                .iter()
                .all(|r| r.is_ok()));
        }
        let before = segments();
        assert!(before >= 10, "{before} segments for 600 messages of 500 bytes");
        let got = s.lease("c", 600, "o", t0, t0 + 60_000).await.unwrap();
        assert_eq!(got.len(), 600);
        let (kept, acked): (Vec<&QueuedMessage>, Vec<&QueuedMessage>) = got.iter().partition(|m| {
            let n = String::from_utf8_lossy(&m.payload)
                .trim_start_matches('0')
                .parse::<u32>();
            n.unwrap_or(0) % 20 == 0
        });
        let acked_ids: Vec<MessageId> = acked.iter().map(|m| m.id).collect();
        assert_eq!(s.ack_leased("c", &acked_ids).await.unwrap().len(), acked_ids.len());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while segments() > 4 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} segments left of {before} after 20 s",
                segments()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(s);
        let s = SledStore::open_with_segment_bytes(dir.path(), 16 << 10).await.unwrap();
        let again = s.lease("c", 600, "o", t0, t0 + 60_000).await.unwrap();
        assert_eq!(kept.len(), 30);
        let mut want: Vec<&Vec<u8>> = kept.iter().map(|m| &m.payload).collect();
        let mut have: Vec<&Vec<u8>> = again.iter().map(|m| &m.payload).collect();
        want.sort();
        have.sort();
        assert_eq!(have, want);
    }

    /// A queued message whose record was damaged on the disk in an older segment is lost
    /// alone, and the store says so ([`Store::queue_log`]: the `/status` and `/metrics`
    /// figures), where before only a log line did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_record_is_counted_in_the_queue_log_figures() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = EnqueueLimits::UNLIMITED;
        let s = SledStore::open(dir.path()).await.unwrap();
        let healthy = s.queue_log().await.unwrap().unwrap();
        assert_eq!((healthy.damaged_records, healthy.damaged_segments), (0, 0));
        assert!(s.enqueue(vec![new_msg("c", "A", t0, None)], &lim).await.unwrap()[0].is_ok());
        let (seg, b_at) = s.slot.log.tail_for_test();
        for p in ["B", "C"] {
            assert!(s.enqueue(vec![new_msg("c", p, t0, None)], &lim).await.unwrap()[0].is_ok());
        }
        drop(s);
        // Reopened once: the segment holding A, B and C is no longer the last.
        drop(SledStore::open(dir.path()).await.unwrap());
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&seg).unwrap();
            let at = b_at + 4 + 1 + 8 + 4 + 2;
            let mut byte = [0u8];
            f.read_exact_at(&mut byte, at).unwrap();
            f.write_all_at(&[byte[0] ^ 0x5a], at).unwrap();
        }
        let s = SledStore::open(dir.path()).await.unwrap();
        let log = s.queue_log().await.unwrap().unwrap();
        assert_eq!((log.damaged_records, log.damaged_segments), (1, 0), "{log:?}");
        assert!(log.bytes > 0);
        let got = s.lease("c", 10, "o", t0, t0 + 60_000).await.unwrap();
        let payloads: Vec<&[u8]> = got.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(payloads, [b"A", b"C"], "B alone is lost");
    }

    /// Queues `payloads` of connection `c` one enqueue each; returns where the record of each
    /// starts in the queue log: (segment file, offset of its header).
    async fn enqueue_each(s: &SledStore, payloads: &[&str], dedup: bool) -> Vec<(PathBuf, u64)> {
        let t0 = 1_700_000_000_000;
        let mut at = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            at.push(s.slot.log.tail_for_test());
            let m = new_msg("c", p, t0, dedup.then_some(i as u8));
            assert!(s.enqueue(vec![m], &dedup_window(60_000)).await.unwrap()[0].is_ok());
        }
        at
    }

    /// XORs byte `n` of the body of the record at `(seg, at)` with `x`, as damage on the disk
    /// while the store runs (it reads the file through the same page cache).
    fn damage_record(seg: &Path, at: u64, n: u64, x: u8) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(seg).unwrap();
        let at = at + 4 + 1 + 8 + 4 + n;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ x], at).unwrap();
    }

    fn payloads(got: &[QueuedMessage]) -> Vec<&[u8]> {
        got.iter().map(|m| &m.payload[..]).collect()
    }

    /// A queued message whose record was damaged on the disk while the store runs (its CRC no
    /// longer matches, or it no longer reads at all: EIO, a bad sector) is taken out of its
    /// queue by the lease that reads it, and counted: the lease returns the messages before and
    /// after it, and so does the next one once their lease runs out. Before, the lease failed
    /// as a whole, every later lease picked the same lowest ids and failed again: the queue
    /// was stalled for good. A reopen agrees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_damaged_while_running_is_set_aside_and_the_lease_goes_on() {
        for bad_sector in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let t0 = 1_700_000_000_000;
            let s = SledStore::open(dir.path()).await.unwrap();
            let at = enqueue_each(&s, &["A", "B", "C"], false).await;
            if bad_sector {
                let b = queued_ids(&s, "c")[1];
                s.slot.log.fail_reads_at((records::KIND_MSG, b), true);
                // Within the grace a record that does not read fails the lease, and is kept.
                assert!(s.lease("c", 3, "o", t0 - 2_000, t0 - 1_000).await.is_err());
                let log = s.queue_log().await.unwrap().unwrap();
                assert_eq!(log.damaged_records, 0, "{log:?}");
                assert_eq!(s.total_queued().await.unwrap(), 3);
                s.slot.log.set_unreadable_grace(std::time::Duration::ZERO);
            } else {
                // A byte of B's payload, the last of its record.
                let (seg, b_at) = &at[1];
                damage_record(seg, *b_at, 1 + 8 + 2 + 1 + 2 + 4 + 1, 0x5a);
            }
            let got = s.lease("c", 3, "o", t0, t0 + 1_000).await.unwrap();
            assert_eq!(payloads(&got), [b"A", b"C"]);
            let log = s.queue_log().await.unwrap().unwrap();
            assert_eq!((log.damaged_records, log.damaged_segments), (1, 0), "{log:?}");
            assert_eq!(s.total_queued().await.unwrap(), 2);
            let again = s.lease("c", 3, "o", t0 + 1_000, t0 + 2_000).await.unwrap();
            assert_eq!(payloads(&again), [b"A", b"C"], "the lease after expiry");
            drop(s);
            let s = SledStore::open(dir.path()).await.unwrap();
            assert_eq!(s.total_queued().await.unwrap(), 2);
            let got = s.lease("c", 3, "o", t0, t0 + 1_000).await.unwrap();
            assert_eq!(payloads(&got), [b"A", b"C"]);
        }
    }

    /// A lease and a pending count filtered by recipient key read only the heads of the
    /// records: one whose head does not read back (here its format byte) is taken out of its
    /// queue as by a lease, and the others are counted and delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_head_does_not_stall_a_pickup_filtered_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        let at = enqueue_each(&s, &["A", "B", "C"], false).await;
        let (seg, b_at) = &at[1];
        damage_record(seg, *b_at, 0, 0x40);
        let stats = s.pending_stats("c", Some("rk-c"), t0).await.unwrap();
        assert_eq!(stats.count, 2, "{stats:?}");
        let got = s.lease_for_key("c", "rk-c", 3, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"C"]);
        let log = s.queue_log().await.unwrap().unwrap();
        assert_eq!(log.damaged_records, 1, "{log:?}");
        assert_eq!(s.total_queued().await.unwrap(), 2);
    }

    /// A message leaving the queue (acknowledged, expired, dropped) whose head no longer reads
    /// back leaves without its dedup record: its removal, and the removal of the messages
    /// with it, do not fail for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_whose_head_is_damaged_can_still_be_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        let at = enqueue_each(&s, &["A", "B"], true).await;
        let got = s.lease("c", 2, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(got.len(), 2);
        let (seg, b_at) = &at[1];
        damage_record(seg, *b_at, 0, 0x40);
        assert_eq!(s.ack_leased("c", &ids_of(&got)).await.unwrap().len(), 2);
        assert_eq!(s.total_queued().await.unwrap(), 0);
        assert_eq!(s.dedup_tree_len_for_test(), 1, "A's dedup record; none for B");
    }

    fn ids_of(got: &[QueuedMessage]) -> Vec<MessageId> {
        got.iter().map(|m| m.id).collect()
    }

    /// The ids queued for `conn`, lowest first (read from the index: no record is read).
    fn queued_ids(s: &SledStore, conn: &str) -> Vec<MessageId> {
        let inner = s.slot.get().unwrap();
        let q = inner.queues.lock();
        q.by_conn
            .get(conn)
            .map_or(Vec::new(), |cq| cq.msgs.keys().copied().collect())
    }

    /// sled's files older than the queue log's (restored from a backup, or removed, without
    /// `queue/`): its id generator starts again, below the ids of the messages still queued.
    /// New messages get ids past them: before, the first new one took id 1 and replaced the
    /// queued message with that id in the log (lost), or shared it with another connection's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_queued_after_sleds_files_were_reset_do_not_reuse_the_logs_ids() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        {
            let s = SledStore::open(dir.path()).await.unwrap();
            enqueue_each(&s, &["A", "B", "C"], false).await;
        }
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name() != Some(std::ffi::OsStr::new(QUEUE_LOG_DIR)) {
                match path.is_dir() {
                    true => std::fs::remove_dir_all(&path).unwrap(),
                    false => std::fs::remove_file(&path).unwrap(),
                }
            }
        }
        let before = {
            let s = SledStore::open(dir.path()).await.unwrap();
            let before = queued_ids(&s, "c");
            assert_eq!(before.len(), 3);
            enqueue_each(&s, &["D", "E"], false).await;
            let got = s.lease("c", 10, "o", t0, t0 + 1_000).await.unwrap();
            assert_eq!(payloads(&got), [b"A", b"B", b"C", b"D", b"E"]);
            before
        };
        // And after another restart (sled's generator still behind): no id taken twice.
        let s = SledStore::open(dir.path()).await.unwrap();
        enqueue_each(&s, &["F"], false).await;
        let ids = queued_ids(&s, "c");
        assert_eq!(&ids[..3], &before[..]);
        assert_eq!(ids.len(), 6, "{ids:?}");
        let got = s.lease("c", 10, "o", t0 + 2_000, t0 + 3_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"B", b"C", b"D", b"E", b"F"]);
    }

    /// A pickup filtered by key reads the heads of the pending messages: one whose head does
    /// not read (EIO) is set aside, and the others are counted and delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_on_a_bad_sector_does_not_stall_a_pickup_filtered_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        enqueue_each(&s, &["A", "B", "C"], false).await;
        let b = queued_ids(&s, "c")[1];
        s.slot.log.fail_reads_at((records::KIND_MSG, b), true);
        s.slot.log.set_unreadable_grace(std::time::Duration::ZERO);
        let stats = s.pending_stats("c", Some("rk-c"), t0).await.unwrap();
        assert_eq!(stats.count, 2, "{stats:?}");
        let got = s.lease_for_key("c", "rk-c", 3, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"C"]);
        assert_eq!(s.queue_log().await.unwrap().unwrap().damaged_records, 1);
    }

    /// A pickup filtered by recipient key reads from disk only the heads of messages whose key
    /// tag matches: the other key's messages, whose reads would all fail here, are never read
    /// (none set aside as damaged), and the filter's answers are those of the key's messages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pickup_filtered_by_key_reads_no_head_of_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        let for_key = |key: &str, payload: &str| NewMessage {
            recipient_key: key.to_owned(),
            ..new_msg("c", payload, t0, None)
        };
        // Tags are keyed per process: the other key is one whose tag differs (1 in 65,536 don't).
        let other = (0..)
            .map(|i| format!("k-other-{i}"))
            .find(|k| index::key_tag(k) != index::key_tag("k-mine"))
            .unwrap();
        let msgs = vec![
            for_key(&other, "o1"),
            for_key("k-mine", "A"),
            for_key(&other, "o2"),
            for_key("k-mine", "B"),
            for_key(&other, "o3"),
        ];
        for r in s.enqueue(msgs, &dedup_window(60_000)).await.unwrap() {
            r.unwrap();
        }
        s.slot.log.set_unreadable_grace(std::time::Duration::ZERO);
        for (i, id) in queued_ids(&s, "c").into_iter().enumerate() {
            if i % 2 == 0 {
                s.slot.log.fail_reads_at((records::KIND_MSG, id), true);
            }
        }
        let stats = s.pending_stats("c", Some("k-mine"), t0).await.unwrap();
        assert_eq!(stats.count, 2, "{stats:?}");
        let got = s.lease_for_key("c", "k-mine", 10, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"B"]);
        assert_eq!(s.queue_log().await.unwrap().unwrap().damaged_records, 0);
    }

    /// A message leaving the queue (acknowledged, expired) whose head does not read (EIO)
    /// leaves without its dedup record: before, every acknowledgement of its batch and every
    /// expiry failed for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_on_a_bad_sector_can_still_be_acknowledged_or_expire() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        enqueue_each(&s, &["A", "B"], true).await;
        let expiring = NewMessage {
            expires_at_ms: Some(t0 + 10),
            ..new_msg("c", "X", t0, Some(9))
        };
        s.enqueue(vec![expiring], &dedup_window(60_000)).await.unwrap();
        let ids = queued_ids(&s, "c");
        let got = s.lease("c", 2, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"B"]);
        for id in &ids[1..] {
            s.slot.log.fail_reads_at((records::KIND_MSG, *id), true);
        }
        assert_eq!(s.ack_leased("c", &ids_of(&got)).await.unwrap().len(), 2);
        assert_eq!(s.expire_due(t0 + 20, 10).await.unwrap(), 1);
        assert_eq!(s.total_queued().await.unwrap(), 0);
        assert_eq!(s.dedup_tree_len_for_test(), 1, "A's dedup record; none for B or X");
    }

    /// A read that fails once (a transient error) is tried again: the message is delivered,
    /// not set aside.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_fails_once_still_delivers_the_message() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        enqueue_each(&s, &["A", "B", "C"], false).await;
        let b = queued_ids(&s, "c")[1];
        s.slot.log.fail_next_read_at((records::KIND_MSG, b));
        let got = s.lease("c", 3, "o", t0, t0 + 1_000).await.unwrap();
        assert_eq!(payloads(&got), [b"A", b"B", b"C"]);
        assert_eq!(s.queue_log().await.unwrap().unwrap().damaged_records, 0);
    }

    /// A queue log record that reads back whole but is of a kind, or a message format, this
    /// version does not know (a newer version wrote it) no longer keeps the store from opening:
    /// it is left out of the queue with a warning and counted, as an unreadable push window
    /// is, and kept in the log.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_of_an_unknown_kind_or_format_is_skipped_at_open() {
        use super::records::KIND_MSG;
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).await.unwrap();
        enqueue_each(&s, &["A", "B"], false).await;
        let log = s.slot.log.clone();
        log.append(&[((0x42, 1_000_000), &b"a kind to come"[..])], &[], true)
            .unwrap();
        log.append(&[((KIND_MSG, 1_000_001), &[9u8, 1, 2, 3][..])], &[], true)
            .unwrap();
        drop(log);
        drop(s);
        for _ in 0..2 {
            let s = SledStore::open(dir.path()).await.expect("opens past unknown records");
            assert_eq!(s.total_queued().await.unwrap(), 2);
            let log = s.queue_log().await.unwrap().unwrap();
            assert_eq!(log.damaged_records, 2, "{log:?}");
            assert_eq!(s.slot.log.count(0x42), 1, "kept in the log");
        }
    }

    /// After a failed fsync of an enqueue batch, the store answers no enqueue Ok (2xx) until
    /// its queue log was reopened from disk (the supervisor does it), `health` says so
    /// meanwhile, the index it rebuilds keeps the leases of what replay found, and what it
    /// answered Ok before and after is there after a restart, even when the disk never got the
    /// failed batch's pages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failed_sync_no_enqueue_is_answered_until_the_log_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = EnqueueLimits::UNLIMITED;
        let s = SledStore::open(dir.path()).await.unwrap();
        assert!(s.enqueue(vec![new_msg("c", "A", t0, None)], &lim).await.unwrap()[0].is_ok());
        assert_eq!(s.lease("c", 10, "o", t0, t0 + 60_000).await.unwrap().len(), 1);
        let log = s.slot.log.clone();
        let (seg, start) = log.tail_for_test();
        log.fail_next_sync();
        let b = s.enqueue(vec![new_msg("c", "B", t0, None)], &lim).await;
        assert!(matches!(b, Err(StoreError::Unavailable(_))), "{b:?}");
        // The disk never got B's pages (the room written ahead of the appends is zeros).
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            let len = f.metadata().unwrap().len().max(start + 4096);
            f.write_all_at(&vec![0u8; (len - start) as usize], start).unwrap();
        }
        assert!(
            s.health().await.is_err() || log.reopens_for_test() > 0,
            "healthy while the log is not trusted"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            assert!(std::time::Instant::now() < deadline, "writes never accepted again");
            let r = s.enqueue(vec![new_msg("c", "C", t0, None)], &lim).await;
            if matches!(&r, Ok(v) if v[0].is_ok()) {
                assert!(log.reopens_for_test() > 0, "C answered Ok before the log was reopened");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        s.health().await.unwrap();
        // The index is what replay found, with A's lease carried over: only C is pending.
        let pending = s.lease("c", 10, "o2", t0, t0 + 60_000).await.unwrap();
        let pending: Vec<&[u8]> = pending.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(pending, [b"C"]);
        assert_eq!(s.total_queued().await.unwrap(), 2);
        drop(log);
        drop(s);
        let s = SledStore::open(dir.path()).await.unwrap();
        let got = s.lease("c", 10, "o", t0, t0 + 60_000).await.unwrap();
        let payloads: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect();
        assert_eq!(payloads, ["A", "C"]);
    }

    /// A dedup entry holds its connection's name shared, not a copy per forward (~60 bytes
    /// each; at 1,000 forwards/s a 300 s window holds 300,000 of them): whether written by the
    /// writer or read back at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dedup_entries_share_their_connection_name() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = dedup_window(60_000);
        let names = |s: &SledStore| {
            let inner = s.slot.get().unwrap();
            let q = inner.queues.lock();
            let (name, _) = q.dedup.get_key_value("c").expect("c has dedup entries");
            let shared = q.dedup_order.iter().filter(|(_, n, _)| Arc::ptr_eq(n, name)).count();
            (q.dedup_order.len(), shared, Arc::strong_count(name))
        };
        {
            let s = SledStore::open(dir.path()).await.unwrap();
            for i in 0..5u8 {
                let batch = vec![new_msg("c", &format!("m{i}"), t0 + i64::from(i), Some(i))];
                s.enqueue(batch, &lim).await.unwrap();
            }
            assert_eq!(names(&s), (5, 5, 6));
        }
        let s = SledStore::open(dir.path()).await.unwrap();
        assert_eq!(names(&s), (5, 5, 6));
    }

    /// One `Meta` per queued message, 48 bytes (the owner's name behind one pointer: an
    /// `Arc<str>` took it to 56, and a B-tree leaf of them to the next allocation size); the
    /// messages an owner leased share its name with `by_owner`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_message_holds_48_bytes_of_lease_state_and_shares_its_owner_name() {
        assert_eq!(std::mem::size_of::<Meta>(), 48);
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).await.unwrap();
        let t0 = 1_700_000_000_000;
        let batch: Vec<NewMessage> = (0..5).map(|i| new_msg("c", &format!("m{i}"), t0 + i, None)).collect();
        s.enqueue(batch, &EnqueueLimits::UNLIMITED).await.unwrap();
        assert_eq!(s.lease("c", 3, "node-1/ws-7", t0, t0 + 60_000).await.unwrap().len(), 3);
        // A second lease, and messages queued already leased (the live path), by the same owner.
        assert_eq!(s.lease("c", 10, "node-1/ws-7", t0, t0 + 60_000).await.unwrap().len(), 2);
        let leased: Vec<NewMessage> = (5..7)
            .map(|i| NewMessage {
                lease: Some(crate::store::LeaseTo {
                    owner: "node-1/ws-7".into(),
                    until_ms: t0 + 60_000,
                }),
                ..new_msg("c", &format!("m{i}"), t0 + i, None)
            })
            .collect();
        s.enqueue(leased, &EnqueueLimits::UNLIMITED).await.unwrap();
        let inner = s.slot.get().unwrap();
        let q = inner.queues.lock();
        let (owner, conns) = q.by_owner.get_key_value("node-1/ws-7").expect("the owner is indexed");
        assert!(conns.contains("c"));
        let held: Vec<&index::Owner> = q.by_conn["c"].msgs.values().filter_map(|m| m.owner.as_ref()).collect();
        assert_eq!(held.len(), 7);
        assert!(held
            .iter()
            .all(|o| std::ptr::eq(o.as_ptr(), owner.as_ptr()) && &***o == "node-1/ws-7"));
    }

    /// A copy sent again after its window, before the prune dropped the first one's entry,
    /// replaces that entry: the first one's dedup record (written when it was acknowledged)
    /// goes with it, not at some later open; an open that finds two for one key keeps the later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_superseded_dedup_record_is_removed() {
        use super::records::{dedup_record, KIND_DEDUP};
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = dedup_window(1_000);
        let dedup_records = |s: &SledStore| s.slot.get().unwrap().log.count(KIND_DEDUP);
        let s = SledStore::open(dir.path()).await.unwrap();
        let first = s.enqueue(vec![new_msg("c", "m", t0, Some(7))], &lim).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .id;
        assert_eq!(s.lease("c", 10, "o", t0, t0 + 60_000).await.unwrap().len(), 1);
        assert_eq!(s.ack("c", &[first]).await.unwrap(), 1);
        assert_eq!(dedup_records(&s), 1, "acknowledged inside its window: its record stays");
        let again = s
            .enqueue(vec![new_msg("c", "m", t0 + 2_000, Some(7))], &lim)
            .await
            .unwrap();
        let second = again[0].as_ref().unwrap();
        assert!(!second.duplicate, "past the window: a new message");
        assert_eq!(dedup_records(&s), 0, "the superseded record is gone");
        // An older record for the same key (as a crash before the removal reached the disk
        // would leave): the open keeps the later entry and removes the older record.
        let log = s.slot.get().unwrap().log.clone();
        log.append(
            &[((KIND_DEDUP, 999), dedup_record("c", &[7; 32], 999, t0 - 10))],
            &[],
            true,
        )
        .unwrap();
        drop(log);
        drop(s);
        let s = SledStore::open(dir.path()).await.unwrap();
        assert_eq!(dedup_records(&s), 0);
        let dup = s
            .enqueue(vec![new_msg("c", "m", t0 + 2_500, Some(7))], &lim)
            .await
            .unwrap();
        let dup = dup[0].as_ref().unwrap();
        assert!(dup.duplicate);
        assert_eq!(dup.id, second.id);
    }

    /// A prune whose removal the queue log refuses (a full disk) changes nothing: the entries
    /// stay held and counted, their records stay in the log, and the next prune removes both.
    /// It never leaves records in the log that no entry names (kept until a restart, never
    /// pruned) nor a count below what the log holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_the_log_refused_leaves_the_entries_held() {
        let s = SledStore::temporary().await.unwrap();
        let t0 = 1_700_000_000_000;
        let batch: Vec<NewMessage> = (0..3).map(|i| new_msg("c", &format!("m{i}"), t0, Some(i))).collect();
        s.enqueue(batch, &dedup_window(60_000)).await.unwrap();
        let leased = s.lease("c", 10, "o", t0, t0 + 60_000).await.unwrap();
        let ids: Vec<MessageId> = leased.iter().map(|m| m.id).collect();
        assert_eq!(s.ack("c", &ids).await.unwrap(), 3);
        assert_eq!(
            s.dedup_tree_len_for_test(),
            3,
            "acknowledged in their window: records kept"
        );

        s.slot.log.fail_next_write();
        assert!(s.prune_dedup(t0 + 1, 100).await.is_err());
        assert_eq!(s.dedup_records().await.unwrap(), 3, "the failed prune dropped entries");
        assert_eq!(s.dedup_tree_len_for_test(), 3);
        let lim = dedup_window(60_000);
        let dup = s
            .enqueue(vec![new_msg("c", "m0", t0 + 10, Some(0))], &lim)
            .await
            .unwrap();
        assert!(dup[0].as_ref().unwrap().duplicate, "still in its window");

        assert_eq!(s.prune_dedup(t0 + 1, 100).await.unwrap(), 3, "the retry prunes them");
        assert_eq!(s.dedup_records().await.unwrap(), 0);
        assert_eq!(s.dedup_tree_len_for_test(), 0, "records left in the log");
    }

    /// Paging through the connections with mail costs what its pages hold, not a scan of every
    /// connection per page. Times printed, not asserted (`cargo test --lib
    /// paging_through_many_connections -- --nocapture`); the results are checked.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paging_through_many_connections() {
        const CONNS: usize = 20_000;
        let s = SledStore::temporary().await.unwrap();
        let t0 = 1_700_000_000_000;
        let names: Vec<String> = (0..CONNS).map(|i| format!("conn-{i:05}")).collect();
        for chunk in names.chunks(MAX_BATCH_MESSAGES) {
            let batch = chunk.iter().map(|c| new_msg(c, "m", t0, None)).collect();
            s.enqueue(batch, &EnqueueLimits::UNLIMITED).await.unwrap();
        }
        for page in [500, 100] {
            let started = std::time::Instant::now();
            let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
            loop {
                let got = s.connections_with_pending(t0, after.as_deref(), page).await.unwrap();
                let Some(last) = got.last() else { break };
                after = Some(last.clone());
                seen.extend(got);
                pages += 1;
            }
            println!(
                "connections_with_pending: {CONNS} connections, {pages} pages of {page}: {:?}",
                started.elapsed()
            );
            assert_eq!(seen, names);
        }
    }

    /// The pruning order rebuilt at open holds every entry once, oldest first, whatever the
    /// connections: a prune after a restart takes the oldest entries, up to its bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dedup_order_read_back_at_open_is_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = dedup_window(60_000);
        {
            let s = SledStore::open(dir.path()).await.unwrap();
            for i in 0..30u8 {
                let conn = ["a", "b", "c"][usize::from(i) % 3];
                let m = new_msg(conn, &format!("m{i}"), t0 + i64::from(29 - i), Some(i));
                s.enqueue(vec![m], &lim).await.unwrap();
            }
        }
        let s = SledStore::open(dir.path()).await.unwrap();
        let times = |s: &SledStore| {
            let inner = s.slot.get().unwrap();
            let q = inner.queues.lock();
            (
                q.dedup_order.iter().map(|(at, _, _)| at - t0).collect::<Vec<_>>(),
                q.dedup_count,
            )
        };
        assert_eq!(times(&s), ((0..30).collect::<Vec<_>>(), 30));
        assert_eq!(s.prune_dedup(t0 + 10, 100).await.unwrap(), 10);
        assert_eq!(s.prune_dedup(t0 + 20, 5).await.unwrap(), 5, "bounded");
        assert_eq!(times(&s), ((15..30).collect::<Vec<_>>(), 15));
    }

    /// A wall clock stepped back an hour: the forwards made after the step are pruned when
    /// their window ends, not an hour later behind those made before it (a prune stops at the
    /// first entry not yet due). Small disorder (within the slack) leaves the order as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dedup_records_made_after_the_clock_stepped_back_are_pruned_in_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let hour = 3_600_000;
        let lim = dedup_window(60_000);
        let s = SledStore::open(dir.path()).await.unwrap();
        for i in 0..6u8 {
            let at = if i < 3 { t0 + hour } else { t0 };
            let m = new_msg("a", &format!("m{i}"), at + i64::from(i), Some(i));
            s.enqueue(vec![m], &lim).await.unwrap();
        }
        assert_eq!(
            s.prune_dedup(t0 + 100, 100).await.unwrap(),
            3,
            "the 3 made after the step"
        );
        assert_eq!(s.prune_dedup(t0 + hour + 100, 100).await.unwrap(), 3);
        // Within the slack: no sort, the later entries wait at most that long.
        let t1 = t0 + 10 * hour;
        for (i, back) in [(6u8, 0), (7, index::DEDUP_ORDER_SLACK_MS)] {
            s.enqueue(vec![new_msg("a", &format!("m{i}"), t1 - back, Some(i))], &lim)
                .await
                .unwrap();
        }
        let inner = s.slot.get().unwrap();
        assert!(!inner.queues.lock().dedup_unsorted);
        assert_eq!(s.prune_dedup(t1 + 1, 100).await.unwrap(), 2);
    }

    /// A prune walks a bounded run of the pruning order under the queues' lock at a time: the
    /// entries of a deleted connection (skipped, as it removed them) go a run at a time, and
    /// one call still prunes up to its bound of the due entries behind them (less than its
    /// bound means none is left, as the node's prune loop reads it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_skips_a_bounded_run_of_removed_entries_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = dedup_window(60_000);
        let s = SledStore::open(dir.path()).await.unwrap();
        s.put_connection(&connection("gone")).await.unwrap();
        const GONE: usize = 3 * index::DEDUP_DUE_WALK_MIN;
        let msgs = (0..GONE)
            .map(|i| {
                let mut m = new_msg("gone", &format!("m{i}"), t0 + i as i64, None);
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(i as u64).to_be_bytes());
                m.dedup_key = Some(key);
                m
            })
            .collect();
        s.enqueue(msgs, &lim).await.unwrap();
        for i in 0..3u8 {
            s.enqueue(vec![new_msg("kept", &format!("k{i}"), t0 + GONE as i64, Some(i))], &lim)
                .await
                .unwrap();
        }
        s.delete_connection("gone").await.unwrap();
        let inner = s.slot.get().unwrap();
        let walked = inner.queues.lock().dedup_due(t0 + 1_000_000, 2);
        assert_eq!(walked.len(), index::DEDUP_DUE_WALK_MIN, "one walk is bounded");
        assert!(walked.iter().all(Option::is_none));
        assert_eq!(s.prune_dedup(t0 + 1_000_000, 2).await.unwrap(), 2);
        assert_eq!(inner.queues.lock().dedup_order.len(), 1);
        assert_eq!(s.prune_dedup(t0 + 1_000_000, 2).await.unwrap(), 1);
        assert_eq!(inner.queues.lock().dedup_order.len(), 0);
    }

    /// A pickup filtered by recipient key reads the heads of the pending messages' records, not
    /// their payloads: its status, its lease and the acknowledgement of a message whose dedup
    /// record it keeps read about as much whatever the payloads' size (a wallet asks for a
    /// status at will, and a queue holds up to 256 MiB). Only the messages it delivers are
    /// read whole. A head longer than the first read (a long key) takes a second one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pickup_filtered_by_key_reads_no_payload_it_does_not_deliver() {
        const N: u8 = 40;
        const PAYLOAD: u64 = 64 << 10;
        let s = SledStore::temporary().await.unwrap();
        let t0 = 1_700_000_000_000;
        let big = "x".repeat(PAYLOAD as usize);
        let long_key = "k".repeat(300);
        let batch: Vec<NewMessage> = (0..N)
            .map(|i| NewMessage {
                recipient_key: match i {
                    0 => long_key.clone(),
                    _ if i % 2 == 0 => "a".into(),
                    _ => "b".into(),
                },
                ..new_msg("c", &big, t0, Some(i))
            })
            .collect();
        let r = s.enqueue(batch, &dedup_window(60_000)).await.unwrap();
        assert!(r.iter().all(|r| r.is_ok()));
        let read = || s.slot.log.read_bytes_for_test();
        let per_head = 1024 * u64::from(N);

        let before = read();
        let st = s.pending_stats("c", Some("a"), t0).await.unwrap();
        assert_eq!(st.count, u64::from(N) / 2 - 1);
        let status = read() - before;
        assert!(status < per_head, "a status read {status} bytes for {N} messages");
        let before = read();
        assert_eq!(s.pending_stats("c", Some(&long_key), t0).await.unwrap().count, 1);
        assert!(read() - before < per_head, "a status read {} bytes", read() - before);

        let before = read();
        let got = s.lease_for_key("c", "b", 1, "o", t0, t0 + 60_000).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].recipient_key, "b");
        assert_eq!(got[0].payload.len() as u64, PAYLOAD);
        let lease = read() - before;
        assert!(
            (PAYLOAD..PAYLOAD + per_head).contains(&lease),
            "a lease of one message read {lease} bytes"
        );

        let before = read();
        assert_eq!(s.ack("c", &[got[0].id]).await.unwrap(), 1);
        assert!(
            read() - before < 1024,
            "an acknowledgement read {} bytes",
            read() - before
        );
        assert_eq!(s.dedup_tree_len_for_test(), 1, "its dedup record is kept");
    }

    /// A connection as `put_connection` takes it (tests).
    fn connection(id: &str) -> crate::store::Connection {
        serde_json::from_value(serde_json::json!({
            "id": id, "created_at_ms": 0, "updated_at_ms": 0, "state": "completed",
            "protocol": "didexchange/1.1", "label": null, "our_verkey": format!("our-{id}"),
            "our_did": null, "their_did": null, "their_verkeys": [format!("theirs-{id}")],
            "their_endpoints": [], "their_routing_keys": [], "mediation": "None",
            "invitation_id": null, "thread_id": null, "extra": null,
        }))
        .unwrap()
    }

    /// `drop_queue` and `delete_connection` answer once the removal of the messages is on disk:
    /// a power loss right after them (the queue log keeps what a sync covered, sled what it
    /// flushed) brings back none of the messages they removed, and no connection without them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_queue_and_a_deleted_connection_stay_gone_after_a_power_loss() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        s.put_connection(&connection("deleted")).await.unwrap();
        for c in ["dropped", "deleted", "kept"] {
            let batch = (0..3).map(|i| new_msg(c, &format!("{c}{i}"), t0, None)).collect();
            s.enqueue(batch, &EnqueueLimits::UNLIMITED).await.unwrap();
        }
        assert_eq!(s.drop_queue("dropped").await.unwrap(), 3);
        assert_eq!(s.delete_connection("deleted").await.unwrap().messages, 3);
        let (seg, written, synced) = s.slot.log.synced_tail_for_test();
        assert!(
            synced >= written,
            "answered with {} bytes of removals not synced",
            written - synced
        );
        drop(s);
        // The power loss: what no sync covered is gone.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(synced)
            .unwrap();
        let s = SledStore::open(dir.path()).await.unwrap();
        assert!(s.get_connection("deleted").await.unwrap().is_none());
        assert_eq!(s.total_queued().await.unwrap(), 3);
        assert_eq!(s.queue_stats("kept", t0).await.unwrap().pending, 3);
    }

    /// A `delete_connection` whose removal of the queue fails (here its sync) changes nothing:
    /// the connection and its messages are both still there, and a retry once the store is
    /// writable again removes both. It never leaves messages queued for a connection gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_delete_connection_leaves_the_connection_with_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let s = SledStore::open(dir.path()).await.unwrap();
        s.put_connection(&connection("c")).await.unwrap();
        let batch = (0..3).map(|i| new_msg("c", &format!("m{i}"), t0, None)).collect();
        s.enqueue(batch, &EnqueueLimits::UNLIMITED).await.unwrap();
        s.slot.log.fail_next_sync();
        let r = s.delete_connection("c").await;
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert!(
            s.get_connection("c").await.unwrap().is_some(),
            "the connection went alone"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let removed = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "the store never took writes again"
            );
            match s.delete_connection("c").await {
                Ok(r) => break r,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        assert!(removed.connection);
        assert_eq!(removed.messages, 3);
        assert_eq!(s.total_queued().await.unwrap(), 0);
    }

    /// An acknowledgement or an expiry whose removal the queue log refuses (a full disk) fails
    /// and changes nothing: the message is still queued, counted in its queue's figures and
    /// its limits, and the next call that succeeds removes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removal_the_log_refused_leaves_the_message_queued() {
        let s = SledStore::temporary().await.unwrap();
        let t0 = 1_700_000_000_000;
        let expiring = NewMessage {
            expires_at_ms: Some(t0 + 10),
            ..new_msg("c", "expiring", t0, None)
        };
        let batch = vec![
            new_msg("c", "old", t0 - 1_000, Some(1)),
            new_msg("c", "acked", t0, Some(2)),
            expiring,
        ];
        s.enqueue(batch, &dedup_window(60_000)).await.unwrap();
        let figures = |s: &SledStore| {
            let inner = s.slot.get().unwrap();
            let q = inner.queues.lock();
            (q.total, q.by_conn.get("c").map_or(0, |cq| cq.bytes))
        };
        let full = EnqueueLimits {
            max_messages: 3,
            ..EnqueueLimits::UNLIMITED
        };
        let leased = s.lease("c", 3, "o", t0, t0 + 60_000).await.unwrap();
        let acked = leased.iter().find(|m| m.payload == b"acked").unwrap().id;

        s.slot.log.fail_next_write();
        assert!(s.ack_leased("c", &[acked]).await.is_err());
        assert_eq!(figures(&s), (3, 16), "the failed acknowledgement hid the message");
        let r = s.enqueue(vec![new_msg("c", "more", t0, None)], &full).await.unwrap();
        assert!(matches!(r[0], Err(StoreError::QueueFull { .. })), "{:?}", r[0]);
        assert_eq!(s.ack_leased("c", &[acked]).await.unwrap().len(), 1);
        assert_eq!(figures(&s), (2, 11));

        s.slot.log.fail_next_write();
        assert!(s.expire_due(t0 + 20, 10).await.is_err());
        assert_eq!(figures(&s), (2, 11), "the failed expiry hid the message");
        assert_eq!(s.expire_due(t0 + 20, 10).await.unwrap(), 1);
        assert_eq!(figures(&s), (1, 3));

        s.slot.log.fail_next_write();
        assert!(s.expire(t0).await.is_err());
        assert_eq!(figures(&s), (1, 3), "the failed expire hid the message");
        assert_eq!(s.expire(t0).await.unwrap(), 1);
        assert_eq!(figures(&s), (0, 0));
        assert_eq!(
            s.dedup_records().await.unwrap(),
            1,
            "the acknowledged message's entry stays"
        );
    }

    /// A route read that fails in the writer (a sled I/O error) answers that message
    /// `Unavailable` (503: sent again), not `NoRoute` (404: final for a sender, the mail lost),
    /// and queues nothing for it; the other messages of the batch are decided as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_route_read_in_the_writer_is_unavailable_not_no_route() {
        let s = SledStore::temporary().await.unwrap();
        let t0 = 1_700_000_000_000;
        let lim = EnqueueLimits::UNLIMITED;
        let unreadable = format!("unreadable-{}", uuid::Uuid::new_v4());
        let readable = format!("readable-{}", uuid::Uuid::new_v4());
        for (c, k) in [("c", &unreadable), ("d", &readable)] {
            s.put_connection(&connection(c)).await.unwrap();
            s.update_keys(c, std::slice::from_ref(k), &[]).await.unwrap();
        }
        let routed = |conn: &str, key: &str, p: &str| NewMessage {
            recipient_key: key.to_owned(),
            ..new_msg(conn, p, t0, None)
        };
        let batch = || {
            vec![
                routed("c", &unreadable, "to c"),
                routed("d", &readable, "to d"),
                routed("c", &readable, "not c's"),
            ]
        };
        let hook = || {
            writer::FAIL_ROUTE_READS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        hook().push(unreadable.clone());
        let r = s.enqueue_routed(batch(), &lim).await;
        hook().retain(|k| k != &unreadable);
        let r = r.unwrap();
        assert!(matches!(r[0], Err(StoreError::Unavailable(_))), "{:?}", r[0]);
        assert!(r[1].is_ok(), "{:?}", r[1]);
        assert!(matches!(r[2], Err(StoreError::NoRoute)), "{:?}", r[2]);
        assert_eq!(s.queue_stats("c", t0).await.unwrap().pending, 0, "nothing queued for c");
        assert_eq!(s.queue_stats("d", t0).await.unwrap().pending, 1);
        // Readable again: the route was not forgotten.
        let r = s.enqueue_routed(batch(), &lim).await.unwrap();
        assert!(r[0].is_ok(), "{:?}", r[0]);
        assert_eq!(s.queue_stats("c", t0).await.unwrap().pending, 1);
    }

    /// The index's rebuild at open files each queue's messages in id order, not in the order
    /// the queue log holds them (compaction copies the oldest records forward, behind newer
    /// ones): such a backlog is not taken as received out of order, each of its messages held
    /// a second time in memory and read past by every `oldest_received_ms`. The one message
    /// received before lower ids is still found the oldest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_open_files_each_queue_in_id_order() {
        use super::records::KIND_MSG;
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let (c, first) = ("filed", 1_000_000);
        let s = SledStore::open(dir.path()).await.unwrap();
        let log = s.slot.get().unwrap().log.clone();
        // Highest id first; the seventh received before the six ids below it.
        for i in (0..10).rev() {
            let at = if i == 6 { t0 - 5 } else { t0 + i };
            let record = encode_msg(&new_msg(c, "m", at, None));
            log.append(&[((KIND_MSG, first + i), record)], &[], true).unwrap();
        }
        drop(log);
        drop(s);
        let s = SledStore::open(dir.path()).await.unwrap();
        let late = || s.slot.get().unwrap().queues.lock().by_conn[c].late_len();
        assert_eq!(late(), 1, "only the message received out of order");
        assert_eq!(s.oldest_received_ms().await.unwrap(), Some(t0 - 5));
        assert_eq!(
            s.top_queues(1).await.unwrap().oldest[0].oldest_received_ms,
            Some(t0 - 5)
        );
        assert_eq!(s.lease(c, 10, "o", t0, t0 + 60_000).await.unwrap().len(), 10);
        assert_eq!(s.ack(c, &[first + 6, first]).await.unwrap(), 2);
        assert_eq!(late(), 0);
        assert_eq!(s.oldest_received_ms().await.unwrap(), Some(t0 + 1));
    }

    /// Where a removal of a message in its dedup window is held while its connection is deleted
    /// (see [`a_dedup_record_written_while_its_connection_is_deleted_does_not_come_back`]).
    #[derive(Clone, Copy, Debug)]
    enum Race {
        /// The deletion runs whole between the removal's check and its append.
        DeleteBetweenCheckAndAppend,
        /// The removal appends and checks again after the deletion's append, before the
        /// deletion drops the entries from the index.
        AppendBetweenDeleteLogAndIndex,
    }

    /// Holds the next time `point` is reached for `conn`: returns (reached, let it go on).
    fn hold_at(point: &'static str, conn: &str) -> (tokio::sync::oneshot::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let hook: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = reached.send(());
            let _ = go_rx.recv();
        });
        inner::TEST_HOOKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((point, conn.to_owned(), hook));
        (reached_rx, go)
    }

    /// One run of the race: an acknowledgement (or, `by_expiry`, a sender's expiry) of a
    /// connection's message inside its dedup window decides to write the message's dedup
    /// record while `delete_connection` removes the connection and its dedup records.
    async fn dedup_record_race(race: Race, by_expiry: bool) {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_700_000_000_000;
        let lim = dedup_window(60_000);
        // Unique names: the hooks are the whole process's.
        let gone = format!("gone-{}", uuid::Uuid::new_v4());
        let other = format!("other-{}", uuid::Uuid::new_v4());
        let s = Arc::new(SledStore::open(dir.path()).await.unwrap());
        for c in [&gone, &other] {
            s.put_connection(&connection(c)).await.unwrap();
        }
        let doomed = NewMessage {
            expires_at_ms: Some(t0 + 1_000),
            ..new_msg(&gone, "g", t0, Some(1))
        };
        let batch = vec![
            doomed,
            new_msg(&other, "o1", t0, Some(2)),
            new_msg(&other, "o2", t0, Some(3)),
        ];
        s.enqueue(batch, &lim).await.unwrap();
        let leased = s.lease(&gone, 10, "o", t0, t0 + 60_000).await.unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(s.dedup_records().await.unwrap(), 3);

        let (checked, go_on) = hold_at(inner::KEPT_DEDUP_CHECKED, &gone);
        let removal = {
            let (s, gone, id) = (s.clone(), gone.clone(), leased[0].id);
            tokio::spawn(async move {
                match by_expiry {
                    true => s.expire_due(t0 + 1_000, 10).await.unwrap(),
                    false => s.ack(&gone, &[id]).await.unwrap(),
                }
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), checked)
            .await
            .expect("the removal reached its hook within 30 s")
            .expect("the removal writes the message's dedup record");
        let removed = match race {
            Race::DeleteBetweenCheckAndAppend => {
                let removed = s.delete_connection(&gone).await.unwrap();
                go_on.send(()).unwrap();
                removal.await.unwrap();
                removed
            }
            Race::AppendBetweenDeleteLogAndIndex => {
                let (logged, delete_on) = hold_at(inner::QUEUE_REMOVAL_LOGGED, &gone);
                let delete = {
                    let (s, gone) = (s.clone(), gone.clone());
                    tokio::spawn(async move { s.delete_connection(&gone).await.unwrap() })
                };
                tokio::time::timeout(std::time::Duration::from_secs(30), logged)
                    .await
                    .expect("the deletion reached its hook within 30 s")
                    .expect("the deletion's removal is in the log");
                go_on.send(()).unwrap();
                removal.await.unwrap();
                delete_on.send(()).unwrap();
                delete.await.unwrap()
            }
        };
        assert!(removed.connection);
        assert_eq!(removed.dedup_records, 1);
        assert_eq!(s.dedup_records().await.unwrap(), 2, "{race:?}: the other connection's");
        assert_eq!(
            s.dedup_tree_len_for_test(),
            0,
            "{race:?}: a dedup record no entry names is in the queue log"
        );
        drop(s);
        let s = SledStore::open(dir.path()).await.unwrap();
        assert_eq!(
            s.dedup_records().await.unwrap(),
            2,
            "{race:?}: the deleted connection's dedup record came back"
        );
    }

    /// `ack_leased` and `expire_due` do not hold the batch lock `delete_connection` holds: the
    /// dedup record one of them writes for a message of a connection being deleted may reach
    /// the queue log after the deletion's removal. It is removed again (the removal checks the
    /// index once more after its append), so it does not come back at the next open as a dedup
    /// entry of the deleted connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dedup_record_written_while_its_connection_is_deleted_does_not_come_back() {
        for race in [Race::DeleteBetweenCheckAndAppend, Race::AppendBetweenDeleteLogAndIndex] {
            for by_expiry in [false, true] {
                dedup_record_race(race, by_expiry).await;
            }
        }
    }

    /// At `store.max_queued_messages` (5 here) the node refuses new messages, whatever their
    /// connection, with `Full` naming the setting (507); a batch that would pass the bound has
    /// the messages past it refused, each in its place. A duplicate is still answered as one,
    /// pickups go on, and an acknowledgement or a sender's expiry makes room for the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_node_wide_bound_refuses_new_messages_until_room_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_shared_with(dir.path(), DEFAULT_CACHE_BYTES, 0, 5)
            .await
            .unwrap();
        let lim = dedup_window(600_000);
        let t0 = 1_700_000_000_000;
        let full = |r: &StoreResult<Enqueued>| matches!(r, Err(StoreError::Full(m)) if m.contains("store.max_queued_messages = 5"));
        for i in 0..3u8 {
            let expiring = NewMessage {
                expires_at_ms: (i == 2).then_some(t0 + 10),
                ..new_msg("a", &format!("a{i}"), t0, Some(i))
            };
            let out = s.enqueue(vec![expiring], &lim).await.unwrap();
            assert!(matches!(out[0], Ok(Enqueued { duplicate: false, .. })), "{out:?}");
        }
        let batch: Vec<NewMessage> = (0..3u8).map(|i| new_msg("b", &format!("b{i}"), t0, Some(i))).collect();
        let out = s.enqueue(batch.clone(), &lim).await.unwrap();
        assert!(out[0].is_ok() && out[1].is_ok() && full(&out[2]), "{out:?}");
        assert_eq!(s.total_queued().await.unwrap(), 5);
        let sixth = s.enqueue(vec![new_msg("c", "c0", t0, Some(9))], &lim).await.unwrap();
        assert!(full(&sixth[0]), "the sixth message, another connection's: {sixth:?}");
        let dup = s
            .enqueue(vec![new_msg("a", "a0", t0 + 1, Some(0))], &lim)
            .await
            .unwrap();
        assert!(
            matches!(dup[0], Ok(Enqueued { duplicate: true, .. })),
            "at the bound: {dup:?}"
        );
        let leased = s.lease("a", 1, "node-1/ws-1", t0, t0 + 60_000).await.unwrap();
        assert_eq!(leased.len(), 1, "pickups go on at the bound");
        assert_eq!(s.ack("a", &[leased[0].id]).await.unwrap(), 1);
        let next = s.enqueue(vec![new_msg("c", "c0", t0, Some(9))], &lim).await.unwrap();
        assert!(
            matches!(next[0], Ok(Enqueued { duplicate: false, .. })),
            "after an ack: {next:?}"
        );
        assert!(full(&s.enqueue(batch[2..].to_vec(), &lim).await.unwrap()[0]));
        assert_eq!(s.expire_due(t0 + 10, 10).await.unwrap(), 1);
        let after_expiry = s.enqueue(batch[2..].to_vec(), &lim).await.unwrap();
        assert!(after_expiry[0].is_ok(), "after an expiry: {after_expiry:?}");
        assert_eq!(s.total_queued().await.unwrap(), 5);
    }
}
