//! The sled backend: embedded, one process.
//!
//! Layout (trees):
//! - `meta`: `identity` -> JSON; `dedup_pruned_before` -> i64 BE (see `prune_dedup`).
//! - `conns`: connection id -> JSON [`Connection`](super::Connection); `by_verkey`:
//!   `len16(verkey) verkey id` -> write sequence; `by_thread`: `len16(thread) thread id` ->
//!   write sequence. Written in the connection's transaction; several connections may share a
//!   key, a lookup takes the most recently written one (as PostgreSQL does).
//! - `keys`: routing key -> connection id; `conn_keys`: `len16(conn) conn key` -> () (keys_of).
//! - `msgs`: id (u64 BE) -> fixed layout (see `encode_msg`): header, connection, recipient
//!   key, dedup key, payload. JSON would double the size of binary payloads.
//! - `attempts`: id -> u32 BE, written when a message is leased (not flushed on its own).
//! - `dedup`: `len16(conn) key32` -> id (i64 BE) + received_at (i64 BE): the dedup records of
//!   messages no longer queued. A queued message's record is its own message record (which holds
//!   its dedup key); the `dedup` record is written only when the message leaves the queue while
//!   its dedup entry is still in the window (`keep_dedup`). Ingest writes one record a forward.
//!
//! The queue is indexed in memory (`Queues`: per connection, id -> size, time, lease), rebuilt
//! from `msgs`/`attempts`/`dedup` at open. sled allows one process per database, so this
//! process's memory is the only place leases live: they are deliberately not persisted, a
//! restart makes every message pending again (at-least-once). `lease`, `ack`, `release` only
//! take the in-memory lock for their decision and never wait for a disk flush.
//!
//! Write path: every `enqueue` goes through one writer thread (`writer_loop`) that drains the
//! waiting requests (up to [`MAX_BATCH_MESSAGES`]), decides limits and dedup for all of them,
//! writes them, flushes once, publishes them in the index and answers every caller.
//!
//! Live path: leases and acknowledgements (`lease`, `ack_leased`) run on one thread of their
//! own (`live_loop`), in turn, as they come: under load it stays awake and takes the next job,
//! where `spawn_blocking` woke and parked a pool thread per call (the pool grew to ~200 threads
//! under a fan-out to 100 wallets, and they queued on sled's write lock while the writer
//! applied a batch). `lease_for_key`, which may read many messages from disk, stays on the
//! blocking pool.
//!
//! Must not: run sled calls on an async runtime thread (they go to the live thread, to
//! `spawn_blocking` or to the writer thread). Calls that touch only the in-memory index
//! (`release`, `queue_stats`, the sweep's `pending_among`...) run on the caller's thread under
//! the index lock.
//!
//! Files: `inner.rs` (the open database: trees, open and index rebuild, reads, removals),
//! `writer.rs` (the writer thread and its batch), `index.rs` (the in-memory queue index),
//! `records.rs` (the on-disk encodings), `supervisor.rs` (reopen after a write failure),
//! `store_trait.rs` (the [`Store`](super::Store) trait on all of it); this file holds the
//! handle, its threads and how calls reach them.

mod index;
mod inner;
mod records;
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
use index::Meta;
use inner::Inner;
use records::{decode_msg, encode_id};
use supervisor::{supervisor_loop, Slot};
use writer::{writer_loop, EnqueueReq};

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
/// `meta` key: the latest cutoff [`Store::prune_dedup`] was called with (i64 BE). Dedup entries
/// older than it are past their window: the index rebuilt at open leaves them out, as the
/// process before it had pruned them (or was about to).
const DEDUP_PRUNED_BEFORE_KEY: &[u8] = b"dedup_pruned_before";

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
            match SledStore::open_config(sled::Config::new().path(&key).cache_capacity(cache_bytes)).await {
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

    async fn open_config(cfg: sled::Config) -> StoreResult<SledStore> {
        let config = cfg.clone();
        let inner = tokio::task::spawn_blocking(move || Inner::open(cfg))
            .await
            .map_err(unavailable)??;
        // A temporary database is gone with its handle: there is nothing to reopen.
        let dir = (!config.temporary).then(|| config.get_path());
        let slot = Arc::new(Slot {
            current: parking_lot::RwLock::new(Some(Arc::new(inner))),
            config,
            stop: std::sync::atomic::AtomicBool::new(false),
            reopens: std::sync::atomic::AtomicU64::new(0),
            carried: Mutex::new(HashMap::new()),
            dir,
        });
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

    /// `lease` and `lease_for_key`. Recipient keys live on disk only (the index holds sizes
    /// and leases): with a key, the pending ids are picked first, their keys read outside the
    /// lock, then those still pending leased; without one, the first pending ids are leased in
    /// one pass under the lock.
    async fn lease_filtered(
        &self,
        conn: &str,
        recipient_key: Option<&str>,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        check_storable("lease owner", owner)?;
        if !storable(conn) || max == 0 {
            return Ok(Vec::new());
        }
        let (conn, key) = (conn.to_owned(), recipient_key.map(str::to_owned));
        let owner: Arc<str> = Arc::from(owner);
        let filtered = key.is_some();
        let job = move |inner: &Inner| {
            let matching: Option<Vec<MessageId>> = match &key {
                None => None,
                Some(key) => {
                    let pending: Vec<MessageId> = {
                        let q = inner.queues.lock();
                        let Some(cq) = q.by_conn.get(&conn) else {
                            return Ok(Vec::new());
                        };
                        cq.msgs
                            .iter()
                            .filter(|(_, m)| m.pending(now_ms))
                            .map(|(id, _)| *id)
                            .collect()
                    };
                    let mut matching = Vec::new();
                    for id in pending {
                        if matching.len() >= max {
                            break;
                        }
                        if let Some(v) = inner.msgs.get(encode_id(id)).map_err(unavailable)? {
                            if decode_msg(&v)?.recipient_key == key.as_str() {
                                matching.push(id);
                            }
                        }
                    }
                    Some(matching)
                }
            };
            let picked: Vec<(MessageId, u32)> = {
                let mut q = inner.queues.lock();
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
                        return 1;
                    }
                    0
                };
                match matching {
                    None => {
                        let mut n = 0;
                        for (id, m) in cq.msgs.iter_mut() {
                            if n >= max {
                                break;
                            }
                            n += take(*id, m);
                        }
                    }
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
            inner.load_leased(picked)
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

    /// Records in the `dedup` tree (tests: what ingest and removals write).
    #[cfg(test)]
    pub(crate) fn dedup_tree_len_for_test(&self) -> usize {
        self.slot.get().expect("store open").dedup.len()
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
