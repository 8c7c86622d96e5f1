//! The sled backend: embedded, one process.
//!
//! Layout (trees):
//! - `meta`: `identity` -> JSON; `dedup_pruned_before` -> i64 BE (see `prune_dedup`).
//! - `conns`: connection id -> JSON [`Connection`]; `by_verkey`: `len16(verkey) verkey id` ->
//!   write sequence; `by_thread`: `len16(thread) thread id` -> write sequence. Written in the
//!   connection's transaction; several connections may share a key, a lookup takes the most
//!   recently written one (as PostgreSQL does).
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
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{mpsc, oneshot};

use super::{
    check_connection, check_storable, storable, ConnId, Connection, ConnectionPatch, Device, EnqueueLimits, Enqueued,
    Identity, InvitationUse, KeyUpdate, MessageId, NewMessage, PendingStats, PushSlot, QueueStats, QueueSummary,
    QueuedMessage, Removed, Store, StoreError, StoreResult, TopQueues,
};

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

/// Per-message lease state, in memory only.
#[derive(Clone, Debug)]
struct Meta {
    size: u64,
    received_at_ms: i64,
    /// 0: never leased or released. Pending when `<= now`.
    lease_until_ms: i64,
    owner: Option<Arc<str>>,
    attempts: u32,
    /// The sender's expiry ([`NEVER`] when none): expired, hence never delivered, when `<= now`.
    expires_at_ms: i64,
    /// The message record holds a dedup key (see `keep_dedup`).
    dedup: bool,
}

impl Meta {
    fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }
    /// Deliverable now: not leased and not expired.
    fn pending(&self, now_ms: i64) -> bool {
        self.lease_until_ms <= now_ms && !self.expired(now_ms)
    }
    fn leased(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms && !self.expired(now_ms)
    }
}

#[derive(Default, Debug)]
struct ConnQueue {
    msgs: BTreeMap<MessageId, Meta>,
    bytes: u64,
}

#[derive(Default, Debug)]
struct Queues {
    by_conn: HashMap<ConnId, ConnQueue>,
    total: u64,
    /// conn -> dedup key -> (id, received_at_ms)
    dedup: HashMap<ConnId, HashMap<[u8; 32], (MessageId, i64)>>,
    /// Dedup records in the order they were made, for [`Store::prune_dedup`]. An entry whose
    /// record was replaced (a later copy) or removed since is skipped when it is reached.
    dedup_order: VecDeque<(i64, ConnId, [u8; 32])>,
    dedup_count: u64,
    /// The latest cutoff of [`Store::prune_dedup`] (persisted as `DEDUP_PRUNED_BEFORE_KEY`).
    dedup_pruned_before: i64,
    /// owner -> connections where it leased messages (a superset: pruned by `expire` and
    /// `release_owner`), so `release_owner` scans only those queues.
    by_owner: HashMap<Arc<str>, std::collections::HashSet<ConnId>>,
    /// Messages with a sender's expiry, by (expiry, id) -> connection, for
    /// [`Store::expire_due`]. Kept exact: every removal of such a message removes its entry.
    expiring: BTreeMap<(i64, MessageId), ConnId>,
}

impl Queues {
    /// Returns every message leased by `owner` to pending; how many.
    fn release_owner(&mut self, owner: &str) -> u64 {
        let Some(conns) = self.by_owner.remove(owner) else {
            return 0;
        };
        let mut n = 0;
        for c in conns {
            let Some(cq) = self.by_conn.get_mut(&c) else {
                continue;
            };
            for m in cq.msgs.values_mut() {
                if m.owner.as_deref() == Some(owner) {
                    m.owner = None;
                    m.lease_until_ms = 0;
                    n += 1;
                }
            }
        }
        n
    }

    fn insert(&mut self, conn: &str, id: MessageId, meta: Meta) {
        let q = match self.by_conn.get_mut(conn) {
            Some(q) => q,
            None => self.by_conn.entry(conn.to_owned()).or_default(),
        };
        q.bytes += meta.size;
        if meta.expires_at_ms != NEVER {
            self.expiring.insert((meta.expires_at_ms, id), conn.to_owned());
        }
        if q.msgs.insert(id, meta).is_none() {
            self.total += 1;
        }
    }

    /// Leases and attempt counts held in memory only (see [`Slot`]).
    fn leases(&self) -> Leases {
        let mut out = HashMap::new();
        for cq in self.by_conn.values() {
            for (id, m) in &cq.msgs {
                if m.lease_until_ms != 0 || m.attempts != 0 {
                    out.insert(*id, (m.lease_until_ms, m.owner.clone(), m.attempts));
                }
            }
        }
        out
    }

    /// Restores [`Queues::leases`] on an index rebuilt from disk (messages gone meanwhile
    /// are skipped).
    fn carry_leases(&mut self, mut leases: Leases) {
        if leases.is_empty() {
            return;
        }
        let Queues { by_conn, by_owner, .. } = self;
        for (conn, cq) in by_conn.iter_mut() {
            for (id, m) in cq.msgs.iter_mut() {
                if let Some((until, owner, attempts)) = leases.remove(id) {
                    m.lease_until_ms = until;
                    m.attempts = m.attempts.max(attempts);
                    if let Some(o) = &owner {
                        by_owner.entry(o.clone()).or_default().insert(conn.clone());
                    }
                    m.owner = owner;
                }
            }
        }
    }

    /// Records a dedup entry read from disk at open (from a queued message or a `dedup`
    /// record); of two for the same key, the later arrival names the copy.
    fn note_dedup(&mut self, conn: &str, key: [u8; 32], id: MessageId, at: i64) {
        let d = match self.dedup.get_mut(conn) {
            Some(d) => d,
            None => self.dedup.entry(conn.to_owned()).or_default(),
        };
        if d.get(&key).is_some_and(|(_, a)| *a >= at) {
            return;
        }
        d.insert(key, (id, at));
        self.dedup_order.push_back((at, conn.to_owned(), key));
    }

    /// Drops the expiry entry of a message just removed from its queue.
    fn unindex(&mut self, id: MessageId, meta: &Meta) {
        if meta.expires_at_ms != NEVER {
            self.expiring.remove(&(meta.expires_at_ms, id));
        }
    }
}

struct Inner {
    db: sled::Db,
    meta: sled::Tree,
    conns: sled::Tree,
    by_verkey: sled::Tree,
    by_thread: sled::Tree,
    keys: sled::Tree,
    conn_keys: sled::Tree,
    msgs: sled::Tree,
    attempts: sled::Tree,
    dedup: sled::Tree,
    /// invitation id -> [single_use, used]
    invitations: sled::Tree,
    /// connection id -> JSON [`Device`] (push registration).
    devices: sled::Tree,
    /// Push windows: connection -> (last push, trailing push due). Memory only (one process
    /// holds a sled store; in-process nodes share it): a restart forgets a pending trailing
    /// push.
    push_windows: Mutex<HashMap<ConnId, (i64, Option<i64>)>>,
    /// Serialises connection and key writes (transactions then never conflict).
    meta_lock: Mutex<()>,
    queues: Mutex<Queues>,
    /// The last flush failed (disk full, I/O error): [`Store::health`] says so until a flush
    /// succeeds again, so `/ready` turns a load balancer away while writes cannot land.
    write_failed: std::sync::atomic::AtomicBool,
    /// Held by the writer over a whole batch (decide, write, publish) and by the removal of a
    /// queue: a removal never lands between a batch's decision and its publication.
    batch_lock: Mutex<()>,
}

struct EnqueueReq {
    msgs: Vec<NewMessage>,
    limits: EnqueueLimits,
    /// Queue each message only while its recipient key routes to its connection.
    routed: bool,
    reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
}

/// The sled [`Store`]. Share one handle between in-process nodes by cloning an `Arc` of it.
/// Dropping the last handle stops the writer thread after it has flushed.
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
struct Slot {
    current: parking_lot::RwLock<Option<Arc<Inner>>>,
    config: sled::Config,
    /// The database's directory (None: temporary), where the space probe is written.
    dir: Option<PathBuf>,
    stop: std::sync::atomic::AtomicBool,
    /// Reopens done (a log line each).
    reopens: std::sync::atomic::AtomicU64,
    /// Leases taken from the handle being replaced, for the next one.
    carried: Mutex<Leases>,
}

impl Slot {
    fn get(&self) -> StoreResult<Arc<Inner>> {
        self.current
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("sled: reopening the database after a write failure".into()))
    }

    /// One supervision step: nothing while writes succeed; after a failed write, a flush that
    /// succeeds clears it, else the database is reopened once space is back.
    fn supervise(&self) {
        let current = self.current.read().clone();
        if let Some(inner) = current {
            if !inner.write_failed.load(std::sync::atomic::Ordering::SeqCst) || inner.flush().is_ok() {
                return;
            }
            if !self.space_back() {
                return;
            }
            tracing::warn!("sled: writes still fail after an I/O error (sled latches it): reopening the database");
            *self.carried.lock() = inner.queues.lock().leases();
            drop(inner);
            let Some(mut old) = self.current.write().take() else {
                return;
            };
            // Calls in flight hold the old handle for one call each: wait for them to let go
            // (sled's file lock is released with the last handle).
            loop {
                match Arc::try_unwrap(old) {
                    Ok(inner) => break drop(inner),
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

    /// Opens the database again (the old handle is gone); on failure the next step retries.
    fn reopen(&self) {
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        let inner = loop {
            match Inner::open(self.config.clone()) {
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

fn supervisor_loop(slot: Arc<Slot>) {
    while !slot.stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::park_timeout(SUPERVISE_EVERY);
        if !slot.stop.load(std::sync::atomic::Ordering::SeqCst) {
            slot.supervise();
        }
    }
}

/// Leases of messages (id -> lease until, owner, attempts), carried over a reopen.
type Leases = HashMap<MessageId, (i64, Option<Arc<str>>, u32)>;

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

impl Inner {
    /// Runs a store call on this handle; after an I/O error, marks the handle for the
    /// supervisor (a write may have failed outside a flush: it probes with one).
    fn run<T>(&self, f: impl FnOnce(&Inner) -> StoreResult<T>) -> StoreResult<T> {
        let r = f(self);
        if matches!(&r, Err(StoreError::Unavailable(_))) {
            self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    fn open(cfg: sled::Config) -> StoreResult<Inner> {
        let db = cfg.open().map_err(unavailable)?;
        let t = |name: &str| db.open_tree(name).map_err(unavailable);
        let inner = Inner {
            meta: t("meta")?,
            conns: t("conns")?,
            by_verkey: t("by_verkey")?,
            by_thread: t("by_thread")?,
            keys: t("keys")?,
            conn_keys: t("conn_keys")?,
            msgs: t("msgs")?,
            attempts: t("attempts")?,
            dedup: t("dedup")?,
            invitations: t("invitations")?,
            devices: t("devices")?,
            push_windows: Mutex::new(HashMap::new()),
            db,
            meta_lock: Mutex::new(()),
            queues: Mutex::new(Queues::default()),
            write_failed: std::sync::atomic::AtomicBool::new(false),
            batch_lock: Mutex::new(()),
        };
        inner.fold_verkey_index()?;
        inner.rebuild_index()?;
        Ok(inner)
    }

    /// Stores written before peer keys were unique may list one key under several connections:
    /// keep the most recently written holder (what lookups answered then), drop the others, so
    /// lookups are unambiguous from now on.
    fn fold_verkey_index(&self) -> StoreResult<()> {
        let mut stale = Vec::new();
        let mut best: Option<(Vec<u8>, u64, sled::IVec)> = None;
        for kv in self.by_verkey.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let seq = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("index seq"))?);
            if k.len() < 2 {
                return Err(corrupt("verkey index key"));
            }
            let n = u16::from_be_bytes([k[0], k[1]]) as usize;
            let prefix = k.get(..2 + n).ok_or_else(|| corrupt("verkey index key"))?.to_vec();
            match &mut best {
                Some((p, s, key)) if *p == prefix => {
                    if seq > *s {
                        stale.push(std::mem::replace(key, k));
                        *s = seq;
                    } else {
                        stale.push(k);
                    }
                }
                _ => best = Some((prefix, seq, k)),
            }
        }
        if !stale.is_empty() {
            tracing::warn!(
                entries = stale.len(),
                "peer keys listed by several connections: kept the latest holder of each"
            );
            let mut b = sled::Batch::default();
            for k in stale {
                b.remove(k);
            }
            self.by_verkey.apply_batch(b).map_err(unavailable)?;
            self.flush()?;
        }
        Ok(())
    }

    /// Rebuilds the in-memory queue index from disk. Leases start empty: every message is
    /// pending after a restart.
    fn rebuild_index(&self) -> StoreResult<()> {
        let mut q = Queues::default();
        // Entries pruned before (a queued message's too: its record holds its dedup key) stay
        // pruned: a store holding millions of messages for offline wallets does not load an
        // entry for each at open only to prune them again.
        let pruned_before = match self.meta.get(DEDUP_PRUNED_BEFORE_KEY).map_err(unavailable)? {
            Some(v) => i64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("dedup_pruned_before"))?),
            None => i64::MIN,
        };
        q.dedup_pruned_before = pruned_before;
        let mut stale = Vec::new();
        let mut attempts: HashMap<MessageId, u32> = HashMap::new();
        for kv in self.attempts.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let id = decode_id(&k)?;
            let n = u32::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("attempts"))?);
            attempts.insert(id, n);
        }
        for kv in self.msgs.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let id = decode_id(&k)?;
            let m = decode_msg(&v)?;
            if let Some(dk) = m.dedup_key.filter(|_| m.received_at_ms >= pruned_before) {
                q.note_dedup(m.connection, dk, id, m.received_at_ms);
            }
            q.insert(
                m.connection,
                id,
                Meta {
                    size: m.payload.len() as u64,
                    received_at_ms: m.received_at_ms,
                    lease_until_ms: 0,
                    owner: None,
                    attempts: attempts.get(&id).copied().unwrap_or(0),
                    expires_at_ms: m.expires_at_ms.unwrap_or(NEVER),
                    dedup: m.dedup_key.is_some(),
                },
            );
        }
        for kv in self.dedup.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let (conn, key) = decode_dedup_key(&k)?;
            if v.len() != 16 {
                return Err(corrupt("dedup value"));
            }
            let id = i64::from_be_bytes(v[..8].try_into().expect("length checked"));
            let at = i64::from_be_bytes(v[8..].try_into().expect("length checked"));
            if at < pruned_before {
                // Written by an acknowledgement racing the prune that dropped its entry.
                stale.push(k);
                continue;
            }
            q.note_dedup(&conn, key, id, at);
        }
        for k in stale {
            self.dedup.remove(k).map_err(unavailable)?;
        }
        q.dedup_count = q.dedup.values().map(|d| d.len() as u64).sum();
        q.dedup_order.make_contiguous().sort_by_key(|e| e.0);
        *self.queues.lock() = q;
        Ok(())
    }

    fn next_id(&self) -> StoreResult<MessageId> {
        // sled persists its id generator and skips ahead after a crash: ids never repeat.
        let id = self.db.generate_id().map_err(unavailable)?;
        i64::try_from(id + 1).map_err(|_| corrupt("id space exhausted"))
    }

    fn get_conn(&self, id: &str) -> StoreResult<Option<Connection>> {
        match self.conns.get(id.as_bytes()).map_err(unavailable)? {
            Some(v) => Ok(Some(decode_conn(&v)?)),
            None => Ok(None),
        }
    }

    fn flush(&self) -> StoreResult<()> {
        let r = self.db.flush();
        self.write_failed.store(r.is_err(), std::sync::atomic::Ordering::SeqCst);
        r.map_err(unavailable).map(|_| ())
    }

    /// Reads the messages just leased (id, attempts) and records their attempt counts.
    fn load_leased(&self, picked: Vec<(MessageId, u32)>) -> StoreResult<Vec<QueuedMessage>> {
        let mut out = Vec::with_capacity(picked.len());
        for (id, n) in picked {
            // A message acked or expired meanwhile is simply not returned.
            let Some(v) = self.msgs.get(encode_id(id)).map_err(unavailable)? else {
                continue;
            };
            let m = decode_msg(&v)?;
            out.push(QueuedMessage {
                id,
                connection: m.connection.to_owned(),
                recipient_key: m.recipient_key.to_owned(),
                payload: m.payload.to_vec(),
                received_at_ms: m.received_at_ms,
                attempts: n,
            });
            // One record each, not a `sled::Batch`: see `forget_acked`. Not flushed: losing
            // an attempt count only under-reports redeliveries.
            self.attempts
                .insert(encode_id(id), &n.to_be_bytes())
                .map_err(unavailable)?;
        }
        Ok(out)
    }

    /// Removes acknowledged messages from disk, one record at a time and not flushed (an
    /// acknowledgement lost in a crash redelivers: at-least-once).
    ///
    /// Not a `sled::Batch`: sled 0.34 writes out and syncs its current log buffer before and
    /// after every batch (`PageCache::pin_log`), i.e. two `pwrite` + `sync_file_range` per
    /// batch on sled's I/O threads. A live delivery applied three batches (the lease's attempt
    /// count, then the ack's message and attempt removals): ~6 synced writes per message,
    /// a quarter of the node's CPU in the live fan-out (docs/BENCHMARKS.md). Single records go
    /// into the current buffer and reach the disk with the writer's next flush. Attempt counts go
    /// first: sled recovers a prefix of its log, so a crash never leaves a count whose message
    /// is gone (a message whose count is gone is delivered again with its count restarted).
    ///
    /// `with_dedup`: those of `ids` whose record holds a dedup key ([`Meta::dedup`]); their
    /// dedup records are kept first (`keep_dedup`).
    fn forget_acked(&self, ids: &[MessageId], with_dedup: &[MessageId]) -> StoreResult<()> {
        self.keep_dedup(with_dedup)?;
        for id in ids {
            self.attempts.remove(encode_id(*id)).map_err(unavailable)?;
        }
        for id in ids {
            self.msgs.remove(encode_id(*id)).map_err(unavailable)?;
        }
        Ok(())
    }

    /// Writes the `dedup` record of messages about to leave the queue (acknowledged, expired by
    /// their sender, dropped by an operator) whose dedup entry is still held, i.e. not yet
    /// pruned: a copy sent again within the window is still a duplicate after a restart.
    /// While a message is queued its own record is its dedup record, so ingest writes one
    /// record per forward, not two, and a message that outlives its window (a wallet offline
    /// longer than it) never has one. Called before the messages' removal: sled recovers a
    /// prefix of its log, so a removal that survives a crash has its dedup record. Not flushed
    /// (as the removal is not): a record lost in a crash is one whose message comes back.
    ///
    /// A prune that lands between the check and the insert leaves a record with no entry;
    /// the next open deletes it (older than the persisted prune cutoff).
    fn keep_dedup(&self, ids: &[MessageId]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = self.msgs.get(encode_id(*id)).map_err(unavailable)? {
                records.push((*id, v));
            }
        }
        let keep: Vec<(Vec<u8>, Vec<u8>)> = {
            let q = self.queues.lock();
            let mut keep = Vec::with_capacity(records.len());
            for (id, v) in &records {
                let m = decode_msg(v)?;
                let Some(dk) = m.dedup_key else { continue };
                if q.dedup
                    .get(m.connection)
                    .and_then(|d| d.get(&dk))
                    .is_some_and(|(held, _)| held == id)
                {
                    keep.push((dedup_tree_key(m.connection, &dk), dedup_value(*id, m.received_at_ms)));
                }
            }
            keep
        };
        for (k, v) in keep {
            self.dedup.insert(k, v).map_err(unavailable)?;
        }
        Ok(())
    }

    /// One batch of the writer: decide, write, flush once, publish, answer.
    /// Deletes every queued message of `conn` (and, with `dedup`, its dedup records). The caller
    /// holds `batch_lock`. Returns (messages, dedup records) removed.
    fn remove_queue(&self, conn: &str, dedup: bool) -> StoreResult<(u64, u64)> {
        let (ids, with_dedup, dedup_n) = {
            let mut q = self.queues.lock();
            let mut with_dedup = Vec::new();
            let ids: Vec<MessageId> = match q.by_conn.remove(conn) {
                Some(cq) => {
                    for (id, m) in &cq.msgs {
                        q.unindex(*id, m);
                        if m.dedup {
                            with_dedup.push(*id);
                        }
                    }
                    cq.msgs.into_keys().collect()
                }
                None => Vec::new(),
            };
            q.total -= ids.len() as u64;
            let mut dedup_n = 0;
            if dedup {
                if let Some(d) = q.dedup.remove(conn) {
                    dedup_n = d.len() as u64;
                    q.dedup_count -= dedup_n;
                }
            }
            (ids, with_dedup, dedup_n)
        };
        if !dedup {
            // The queue goes, its dedup entries stay (as after an acknowledgement).
            self.keep_dedup(&with_dedup)?;
        }
        let mut b = sled::Batch::default();
        for id in &ids {
            b.remove(&encode_id(*id));
        }
        let mut a = sled::Batch::default();
        for id in &ids {
            a.remove(&encode_id(*id));
        }
        self.msgs.apply_batch(b).map_err(unavailable)?;
        self.attempts.apply_batch(a).map_err(unavailable)?;
        if dedup {
            let mut d = sled::Batch::default();
            for kv in self.dedup.scan_prefix(conn_prefix(conn)) {
                let (k, _) = kv.map_err(unavailable)?;
                d.remove(k);
            }
            self.dedup.apply_batch(d).map_err(unavailable)?;
        }
        Ok((ids.len() as u64, dedup_n))
    }

    fn write_batch(&self, batch: Vec<EnqueueReq>) {
        enum Slot {
            Done(StoreResult<Enqueued>),
            /// Accepted: index into `accepted`.
            New(usize),
            /// Duplicate of a message accepted earlier in this batch.
            DupOfNew(usize),
        }
        // 0. Routes asked for, read before the index lock (sled serves them from memory).
        let routes_gone: Vec<Vec<bool>> = batch
            .iter()
            .map(|req| {
                req.msgs
                    .iter()
                    .map(|m| {
                        req.routed
                            && !matches!(self.keys.get(m.recipient_key.as_bytes()),
                                Ok(Some(holder)) if holder.as_ref() == m.connection.as_bytes())
                    })
                    .collect()
            })
            .collect();
        // 1. Decide under the index lock (memory only), counting the batch's own additions.
        let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(batch.len());
        let mut accepted: Vec<&NewMessage> = Vec::new();
        {
            let q = self.queues.lock();
            let mut added: HashMap<&str, (u64, u64)> = HashMap::new();
            let mut local_dedup: HashMap<(&str, [u8; 32]), (usize, i64)> = HashMap::new();
            for (req, gone) in batch.iter().zip(&routes_gone) {
                let mut out = Vec::with_capacity(req.msgs.len());
                for (m, gone) in req.msgs.iter().zip(gone) {
                    let conn = m.connection.as_str();
                    if let Err(e) = check_storable("connection id", conn)
                        .and_then(|_| check_storable("recipient key", &m.recipient_key))
                    {
                        out.push(Slot::Done(Err(e)));
                        continue;
                    }
                    if *gone {
                        out.push(Slot::Done(Err(StoreError::NoRoute)));
                        continue;
                    }
                    // Dedup first: a duplicate is answered even when the queue is full.
                    if let (Some(dk), true) = (m.dedup_key, req.limits.dedup_window_ms > 0) {
                        let start = m.received_at_ms.saturating_sub(req.limits.dedup_window_ms);
                        if let Some((i, at)) = local_dedup.get(&(conn, dk)) {
                            if *at >= start {
                                out.push(Slot::DupOfNew(*i));
                                continue;
                            }
                        } else if let Some((id, at)) = q.dedup.get(conn).and_then(|d| d.get(&dk)) {
                            if *at >= start {
                                out.push(Slot::Done(Ok(Enqueued {
                                    id: *id,
                                    duplicate: true,
                                })));
                                continue;
                            }
                        }
                    }
                    let (have_n, have_b) = q
                        .by_conn
                        .get(conn)
                        .map(|c| (c.msgs.len() as u64, c.bytes))
                        .unwrap_or((0, 0));
                    let added = added.entry(conn).or_insert((0, 0));
                    let (n, b) = (have_n + added.0, have_b + added.1);
                    let size = m.payload.len() as u64;
                    if n >= req.limits.max_messages || b.saturating_add(size) > req.limits.max_bytes {
                        out.push(Slot::Done(Err(StoreError::QueueFull { pending: n, bytes: b })));
                        continue;
                    }
                    added.0 += 1;
                    added.1 += size;
                    if let Some(dk) = m.dedup_key {
                        local_dedup.insert((conn, dk), (accepted.len(), m.received_at_ms));
                    }
                    out.push(Slot::New(accepted.len()));
                    accepted.push(m);
                }
                slots.push(out);
            }
        }

        // 2. Ids, write, one flush: without the index lock (leases and acks go on meanwhile).
        let written = (|| -> StoreResult<Vec<MessageId>> {
            let ids = accepted
                .iter()
                .map(|_| self.next_id())
                .collect::<StoreResult<Vec<_>>>()?;
            // Single records, not a `sled::Batch`: a batch writes out sled's log buffer before
            // and after itself (`forget_acked`), two log writes besides the flush below, and
            // nothing here needs the batch's all-or-nothing: no caller is answered before the
            // flush, and a message recovered without its batch-mates was simply not answered
            // (its sender sends again: at-least-once). A message's record holds its dedup key:
            // no `dedup` record while it is queued (`keep_dedup`).
            for (m, id) in accepted.iter().zip(&ids) {
                self.msgs.insert(encode_id(*id), encode_msg(m)).map_err(unavailable)?;
            }
            self.flush()?;
            Ok(ids)
        })();

        // 3. Publish to the index only once durable, then answer.
        let ids = match written {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "sled enqueue batch failed");
                self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
                let msg = e.to_string();
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
                return;
            }
        };
        {
            let mut q = self.queues.lock();
            for (m, id) in accepted.iter().zip(&ids) {
                let owner: Option<Arc<str>> = m.lease.as_ref().map(|l| Arc::from(l.owner.as_str()));
                let meta = Meta {
                    size: m.payload.len() as u64,
                    received_at_ms: m.received_at_ms,
                    lease_until_ms: m.lease.as_ref().map_or(0, |l| l.until_ms),
                    owner: owner.clone(),
                    attempts: u32::from(m.lease.is_some()),
                    expires_at_ms: m.expires_at_ms.unwrap_or(NEVER),
                    dedup: m.dedup_key.is_some(),
                };
                q.insert(&m.connection, *id, meta);
                if let Some(o) = owner {
                    let conns = q.by_owner.entry(o).or_default();
                    if !conns.contains(&m.connection) {
                        conns.insert(m.connection.clone());
                    }
                }
                if let Some(dk) = m.dedup_key {
                    let d = match q.dedup.get_mut(m.connection.as_str()) {
                        Some(d) => d,
                        None => q.dedup.entry(m.connection.clone()).or_default(),
                    };
                    if d.insert(dk, (*id, m.received_at_ms)).is_none() {
                        q.dedup_count += 1;
                    }
                    q.dedup_order.push_back((m.received_at_ms, m.connection.clone(), dk));
                }
            }
        }
        let results = slots.into_iter().map(|out| {
            out.into_iter()
                .map(|s| match s {
                    Slot::Done(r) => r,
                    Slot::New(i) => Ok(Enqueued {
                        id: ids[i],
                        duplicate: false,
                    }),
                    Slot::DupOfNew(i) => Ok(Enqueued {
                        id: ids[i],
                        duplicate: true,
                    }),
                })
                .collect()
        });
        for (req, out) in batch.into_iter().zip(results) {
            let _ = req.reply.send(Ok(out));
        }
    }
}

/// Group commit: the longest a busy writer waits for more requests before its flush. Every flush
/// costs the same thread hand-offs whatever its size (sled hands it to its I/O pool, whose
/// every waiting thread wakes), and a loaded node flushed ~1.4 forwards at a time: a 1 ms wait
/// in steps took ~10 % off its CPU per forward and its p99, at +0.5 ms to a forward's median at
/// 3,000/s (docs/BENCHMARKS.md, "Group commit that waits only while requests arrive").
const LINGER_MAX: std::time::Duration = std::time::Duration::from_millis(1);
/// The writer waits in steps of this and stops at the first step that brings no request.
const LINGER_STEP: std::time::Duration = std::time::Duration::from_micros(250);

/// The requests one flush will carry, and their size against the batch limits.
struct Gathered {
    reqs: Vec<EnqueueReq>,
    msgs: usize,
    bytes: usize,
}

impl Gathered {
    fn new(first: EnqueueReq) -> Gathered {
        let mut g = Gathered {
            reqs: Vec::new(),
            msgs: 0,
            bytes: 0,
        };
        g.push(first);
        g
    }

    fn push(&mut self, r: EnqueueReq) {
        self.msgs += r.msgs.len();
        self.bytes += r.msgs.iter().map(|m| m.payload.len()).sum::<usize>();
        self.reqs.push(r);
    }

    fn full(&self) -> bool {
        self.msgs >= MAX_BATCH_MESSAGES || self.bytes >= MAX_BATCH_BYTES
    }

    /// Takes the requests already waiting, up to the batch limits; whether it took any.
    fn drain(&mut self, rx: &mut mpsc::Receiver<EnqueueReq>) -> bool {
        let had = self.reqs.len();
        while !self.full() {
            match rx.try_recv() {
                Ok(r) => self.push(r),
                Err(_) => break,
            }
        }
        self.reqs.len() > had
    }
}

fn writer_loop(slot: Arc<Slot>, mut rx: mpsc::Receiver<EnqueueReq>) {
    // Requests arrived while the previous batch was written and flushed: more are on their way
    // (being unpacked), and waiting a little lets one flush carry them. A lone caller, who waits
    // for this very flush before sending again, never makes the writer wait.
    let mut busy = false;
    while let Some(first) = rx.blocking_recv() {
        let mut g = Gathered::new(first);
        g.drain(&mut rx);
        if busy {
            let until = std::time::Instant::now() + LINGER_MAX;
            while !g.full() && std::time::Instant::now() < until {
                std::thread::sleep(LINGER_STEP);
                if !g.drain(&mut rx) {
                    break;
                }
            }
        }
        let batch = g.reqs;
        // The handle of this batch only: the supervisor may replace it between batches.
        let inner = match slot.get() {
            Ok(inner) => inner,
            Err(e) => {
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Unavailable(e.to_string())));
                }
                continue;
            }
        };
        let _g = inner.batch_lock.lock();
        inner.write_batch(batch);
        busy = !rx.is_empty();
    }
    if let Ok(inner) = slot.get() {
        if let Err(e) = inner.flush() {
            tracing::error!(error = %e, "sled final flush failed");
        }
    }
}

// ---- encodings ----

fn encode_id(id: MessageId) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

fn decode_id(k: &[u8]) -> StoreResult<MessageId> {
    let b: [u8; 8] = k.try_into().map_err(|_| corrupt("message id"))?;
    Ok(u64::from_be_bytes(b) as i64)
}

fn push_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// `v1 | received_at i64 | len16 conn | conn | len16 rkey | rkey | 0 or 1+key32 | payload`, or
/// with a sender's expiry `v2 | received_at i64 | expires_at i64 | ...` (the rest as v1).
fn encode_msg(m: &NewMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 16 + 4 + m.connection.len() + m.recipient_key.len() + 33 + m.payload.len());
    match m.expires_at_ms {
        None => {
            out.push(MSG_FORMAT_V1);
            out.extend_from_slice(&m.received_at_ms.to_be_bytes());
        }
        Some(e) => {
            out.push(MSG_FORMAT_V2);
            out.extend_from_slice(&m.received_at_ms.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
    }
    push_str16(&mut out, &m.connection);
    push_str16(&mut out, &m.recipient_key);
    match &m.dedup_key {
        Some(k) => {
            out.push(1);
            out.extend_from_slice(k);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&m.payload);
    out
}

struct MsgRef<'a> {
    received_at_ms: i64,
    expires_at_ms: Option<i64>,
    connection: &'a str,
    recipient_key: &'a str,
    dedup_key: Option<[u8; 32]>,
    payload: &'a [u8],
}

fn decode_msg(v: &[u8]) -> StoreResult<MsgRef<'_>> {
    fn take<'a>(v: &mut &'a [u8], n: usize) -> StoreResult<&'a [u8]> {
        if v.len() < n {
            return Err(corrupt("message truncated"));
        }
        let (a, b) = v.split_at(n);
        *v = b;
        Ok(a)
    }
    fn take_str<'a>(v: &mut &'a [u8]) -> StoreResult<&'a str> {
        let n = u16::from_be_bytes(take(v, 2)?.try_into().expect("2 bytes")) as usize;
        std::str::from_utf8(take(v, n)?).map_err(|_| corrupt("message string"))
    }
    let mut v = v;
    let format = take(&mut v, 1)?[0];
    if format != MSG_FORMAT_V1 && format != MSG_FORMAT_V2 {
        return Err(corrupt("unknown message format"));
    }
    let received_at_ms = i64::from_be_bytes(take(&mut v, 8)?.try_into().expect("8 bytes"));
    let expires_at_ms = if format == MSG_FORMAT_V2 {
        Some(i64::from_be_bytes(take(&mut v, 8)?.try_into().expect("8 bytes")))
    } else {
        None
    };
    let connection = take_str(&mut v)?;
    let recipient_key = take_str(&mut v)?;
    let dedup_key = match take(&mut v, 1)?[0] {
        0 => None,
        1 => Some(take(&mut v, 32)?.try_into().expect("32 bytes")),
        _ => return Err(corrupt("dedup flag")),
    };
    Ok(MsgRef {
        received_at_ms,
        expires_at_ms,
        connection,
        recipient_key,
        dedup_key,
        payload: v,
    })
}

fn dedup_tree_key(conn: &str, key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len() + 32);
    push_str16(&mut out, conn);
    out.extend_from_slice(key);
    out
}

fn decode_dedup_key(k: &[u8]) -> StoreResult<(String, [u8; 32])> {
    if k.len() < 2 {
        return Err(corrupt("dedup key"));
    }
    let n = u16::from_be_bytes([k[0], k[1]]) as usize;
    if k.len() != 2 + n + 32 {
        return Err(corrupt("dedup key length"));
    }
    let conn = std::str::from_utf8(&k[2..2 + n]).map_err(|_| corrupt("dedup conn"))?;
    let key: [u8; 32] = k[2 + n..].try_into().expect("length checked");
    Ok((conn.to_owned(), key))
}

fn dedup_value(id: MessageId, at: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&at.to_be_bytes());
    v
}

/// `len16(a) a b`: keys of multi-valued indexes (a -> several b), scanned by `len16(a) a`.
fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + a.len() + b.len());
    push_str16(&mut out, a);
    out.extend_from_slice(b.as_bytes());
    out
}

/// The connection written last among those a multi-valued index lists under `key`.
fn latest_of(tree: &sled::Tree, key: &str) -> StoreResult<Option<String>> {
    let prefix = conn_prefix(key);
    let mut best: Option<(u64, String)> = None;
    for kv in tree.scan_prefix(&prefix) {
        let (k, v) = kv.map_err(unavailable)?;
        let seq = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("index seq"))?);
        if best.as_ref().map_or(true, |(s, _)| seq > *s) {
            let id = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| corrupt("index id"))?;
            best = Some((seq, id.to_owned()));
        }
    }
    Ok(best.map(|(_, id)| id))
}

fn conn_key_entry(conn: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len() + key.len());
    push_str16(&mut out, conn);
    out.extend_from_slice(key.as_bytes());
    out
}

fn conn_prefix(conn: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len());
    push_str16(&mut out, conn);
    out
}

fn decode_conn(v: &[u8]) -> StoreResult<Connection> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))
}

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => unavailable(e),
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    fn backend(&self) -> &'static str {
        "sled"
    }

    async fn health(&self) -> StoreResult<()> {
        match &self.tx {
            Some(tx) if !tx.is_closed() => {}
            _ => return Err(StoreError::Closed),
        }
        if self.slot.get()?.write_failed.load(std::sync::atomic::Ordering::SeqCst) {
            // Probe: a flush that succeeds again clears the failure.
            self.blocking(|inner| inner.flush()).await?;
        }
        Ok(())
    }

    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity> {
        self.blocking(move |inner| {
            let bytes = serde_json::to_vec(&candidate).map_err(|e| StoreError::Corrupt(format!("identity: {e}")))?;
            let r = inner
                .meta
                .compare_and_swap(IDENTITY_KEY, None as Option<&[u8]>, Some(bytes))
                .map_err(unavailable)?;
            match r {
                Ok(()) => {
                    inner.flush()?;
                    Ok(candidate)
                }
                Err(cas) => {
                    let cur = cas.current.ok_or_else(|| corrupt("identity vanished"))?;
                    serde_json::from_slice(&cur).map_err(|e| StoreError::Corrupt(format!("identity: {e}")))
                }
            }
        })
        .await
    }

    async fn put_connection(&self, c: &Connection) -> StoreResult<()> {
        check_connection(c)?;
        let c = c.clone();
        self.blocking(move |inner| {
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
            let _g = inner.meta_lock.lock();
            // Every connection write holds meta_lock: the check and the write are one step.
            for k in &c.their_verkeys {
                let prefix = conn_prefix(k);
                for kv in inner.by_verkey.scan_prefix(&prefix) {
                    let (key, _) = kv.map_err(unavailable)?;
                    if &key[prefix.len()..] != c.id.as_bytes() {
                        return Err(StoreError::KeyTaken(k.clone()));
                    }
                }
            }
            let old = inner.get_conn(&c.id)?;
            let seq = inner.db.generate_id().map_err(unavailable)?.to_be_bytes();
            let id = c.id.as_bytes();
            (&inner.conns, &inner.by_verkey, &inner.by_thread)
                .transaction(|(conns, by_verkey, by_thread)| {
                    if let Some(old) = &old {
                        for k in &old.their_verkeys {
                            by_verkey.remove(pair_key(k, &c.id))?;
                        }
                        if let Some(t) = &old.thread_id {
                            by_thread.remove(pair_key(t, &c.id))?;
                        }
                    }
                    for k in &c.their_verkeys {
                        by_verkey.insert(pair_key(k, &c.id), &seq[..])?;
                    }
                    if let Some(t) = &c.thread_id {
                        by_thread.insert(pair_key(t, &c.id), &seq[..])?;
                    }
                    conns.insert(id, bytes.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            inner.flush()
        })
        .await
    }

    async fn put_invitation(&self, id: &str, single_use: bool, _created_at_ms: i64) -> StoreResult<()> {
        check_storable("invitation id", id)?;
        let id = id.to_owned();
        self.blocking(move |inner| {
            inner
                .invitations
                .insert(id.as_bytes(), &[u8::from(single_use), 0][..])
                .map_err(unavailable)?;
            inner.flush()
        })
        .await
    }

    async fn use_invitation(&self, id: &str) -> StoreResult<InvitationUse> {
        if !storable(id) {
            return Ok(InvitationUse::Unknown);
        }
        let id = id.to_owned();
        self.blocking(move |inner| {
            let _g = inner.meta_lock.lock();
            let Some(v) = inner.invitations.get(id.as_bytes()).map_err(unavailable)? else {
                return Ok(InvitationUse::Unknown);
            };
            match (v.first().copied(), v.get(1).copied()) {
                (Some(1), Some(0)) => {
                    inner
                        .invitations
                        .insert(id.as_bytes(), &[1u8, 1][..])
                        .map_err(unavailable)?;
                    inner.flush()?;
                    Ok(InvitationUse::FirstUse)
                }
                (Some(1), _) => Ok(InvitationUse::AlreadyUsed),
                _ => Ok(InvitationUse::MultiUse),
            }
        })
        .await
    }

    async fn update_connection(&self, id: &str, patch: &ConnectionPatch) -> StoreResult<Option<Connection>> {
        if !storable(id) {
            return Ok(None);
        }
        let (id, patch) = (id.to_owned(), patch.clone());
        self.blocking(move |inner| {
            // The same lock as put_connection: read, patch and write are one step.
            let _g = inner.meta_lock.lock();
            let Some(mut c) = inner.get_conn(&id)? else {
                return Ok(None);
            };
            patch.apply(&mut c);
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
            inner.conns.insert(id.as_bytes(), bytes).map_err(unavailable)?;
            inner.flush()?;
            Ok(Some(c))
        })
        .await
    }

    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        if !storable(id) {
            return Ok(None);
        }
        let id = id.to_owned();
        self.blocking(move |inner| inner.get_conn(&id)).await
    }

    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>> {
        if !storable(verkey) {
            return Ok(None);
        }
        let verkey = verkey.to_owned();
        self.blocking(move |inner| {
            let Some(id) = latest_of(&inner.by_verkey, &verkey)? else {
                return Ok(None);
            };
            // The index is maintained in the connection's transaction; checking again keeps a
            // stale entry from ever returning the wrong connection.
            Ok(inner.get_conn(&id)?.filter(|c| c.their_verkeys.contains(&verkey)))
        })
        .await
    }

    async fn connection_by_thread(&self, thid: &str) -> StoreResult<Option<Connection>> {
        if !storable(thid) {
            return Ok(None);
        }
        let thid = thid.to_owned();
        self.blocking(move |inner| {
            let Some(id) = latest_of(&inner.by_thread, &thid)? else {
                return Ok(None);
            };
            Ok(inner
                .get_conn(&id)?
                .filter(|c| c.thread_id.as_deref() == Some(thid.as_str())))
        })
        .await
    }

    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>> {
        let after = after.map(|s| s.as_bytes().to_vec());
        self.blocking(move |inner| {
            let lower = match &after {
                Some(a) => Bound::Excluded(a.as_slice()),
                None => Bound::Unbounded,
            };
            let mut out = Vec::new();
            for kv in inner.conns.range::<&[u8], _>((lower, Bound::Unbounded)).take(limit) {
                let (_, v) = kv.map_err(unavailable)?;
                out.push(decode_conn(&v)?);
            }
            Ok(out)
        })
        .await
    }

    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        check_storable("connection id", conn)?;
        for k in add.iter().chain(remove) {
            check_storable("routing key", k)?;
        }
        let conn = conn.to_owned();
        let add = add.to_vec();
        let remove = remove.to_vec();
        self.blocking(move |inner| {
            let _g = inner.meta_lock.lock();
            if !inner.conns.contains_key(conn.as_bytes()).map_err(unavailable)? {
                return Err(StoreError::NotFound);
            }
            let cid = conn.as_bytes();
            let out = (&inner.keys, &inner.conn_keys)
                .transaction(|(keys, conn_keys)| {
                    let mut out = Vec::with_capacity(add.len() + remove.len());
                    for k in &add {
                        let r = match keys.get(k.as_bytes())? {
                            None => {
                                keys.insert(k.as_bytes(), cid)?;
                                conn_keys.insert(conn_key_entry(&conn, k), &[][..])?;
                                KeyUpdate::Added
                            }
                            Some(holder) if holder.as_ref() == cid => KeyUpdate::AlreadyAdded,
                            Some(_) => KeyUpdate::HeldByOther,
                        };
                        out.push((k.clone(), r));
                    }
                    for k in &remove {
                        let r = match keys.get(k.as_bytes())? {
                            Some(holder) if holder.as_ref() == cid => {
                                keys.remove(k.as_bytes())?;
                                conn_keys.remove(conn_key_entry(&conn, k))?;
                                KeyUpdate::Removed
                            }
                            _ => KeyUpdate::NotFound,
                        };
                        out.push((k.clone(), r));
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(out)
                })
                .map_err(tx_err)?;
            inner.flush()?;
            Ok(out)
        })
        .await
    }

    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        if !storable(conn) {
            return Ok(Vec::new());
        }
        let conn = conn.to_owned();
        self.blocking(move |inner| {
            let prefix = conn_prefix(&conn);
            let mut out = Vec::new();
            for kv in inner.conn_keys.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(unavailable)?;
                let key = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| corrupt("key"))?;
                out.push(key.to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        if !storable(recipient_key) {
            return Ok(None);
        }
        let key = recipient_key.to_owned();
        self.blocking(
            move |inner| match inner.keys.get(key.as_bytes()).map_err(unavailable)? {
                Some(v) => Ok(Some(String::from_utf8(v.to_vec()).map_err(|_| corrupt("route"))?)),
                None => Ok(None),
            },
        )
        .await
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.submit(msgs, limits, false).await
    }

    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.submit(msgs, limits, true).await
    }

    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_filtered(conn, None, max, owner, now_ms, until_ms).await
    }

    async fn lease_for_key(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_filtered(conn, Some(recipient_key), max, owner, now_ms, until_ms)
            .await
    }

    async fn pending_stats(&self, conn: &str, recipient_key: Option<&str>, now_ms: i64) -> StoreResult<PendingStats> {
        // Every pickup acknowledgement is answered with a status: without a filter this is
        // memory only, on the caller's thread (a blocking-pool hand-off cost two thread
        // wake-ups per acknowledgement).
        let (pending, key): (Vec<(MessageId, i64)>, String) = {
            let inner = self.slot.get()?;
            let q = inner.queues.lock();
            let Some(cq) = q.by_conn.get(conn) else {
                return Ok(PendingStats::default());
            };
            let pending = cq
                .msgs
                .iter()
                .filter(|(_, m)| m.pending(now_ms))
                .map(|(id, m)| (*id, m.received_at_ms));
            let Some(key) = recipient_key else {
                return Ok(pending.fold(PendingStats::default(), |s, (_, received)| s.and(received)));
            };
            (pending.collect(), key.to_owned())
        };
        // A filter: each pending message's recipient key is on disk.
        self.blocking(move |inner| {
            let mut s = PendingStats::default();
            for (id, received) in pending {
                let Some(v) = inner.msgs.get(encode_id(id)).map_err(unavailable)? else {
                    continue;
                };
                if decode_msg(&v)?.recipient_key == key {
                    s = s.and(received);
                }
            }
            Ok(s)
        })
        .await
    }

    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        if !storable(conn) || ids.is_empty() {
            return Ok(Vec::new());
        }
        let conn = conn.to_owned();
        let ids = ids.to_vec();
        self.live(move |inner| {
            let (removed, leases, with_dedup) = {
                let mut guard = inner.queues.lock();
                let q = &mut *guard;
                let Some(cq) = q.by_conn.get_mut(&conn) else {
                    return Ok(Vec::new());
                };
                let (mut removed, mut leases, mut with_dedup) = (Vec::new(), Vec::new(), Vec::new());
                for id in ids {
                    if let Some(m) = cq.msgs.remove(&id) {
                        cq.bytes -= m.size;
                        if m.expires_at_ms != NEVER {
                            q.expiring.remove(&(m.expires_at_ms, id));
                        }
                        removed.push(id);
                        leases.push(m.lease_until_ms);
                        if m.dedup {
                            with_dedup.push(id);
                        }
                    }
                }
                q.total -= removed.len() as u64;
                if cq.msgs.is_empty() {
                    q.by_conn.remove(&conn);
                }
                (removed, leases, with_dedup)
            };
            inner.forget_acked(&removed, &with_dedup)?;
            Ok(leases)
        })
        .await
    }

    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64> {
        // Memory only (leases are not persisted): no blocking thread.
        let inner = self.slot.get()?;
        let mut q = inner.queues.lock();
        let Some(cq) = q.by_conn.get_mut(conn) else {
            return Ok(0);
        };
        let mut n = 0;
        for id in ids {
            if let Some(m) = cq.msgs.get_mut(id) {
                if m.owner.as_deref() == Some(owner) {
                    m.owner = None;
                    m.lease_until_ms = 0;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        // Memory only.
        let inner = self.slot.get()?;
        let n = inner.queues.lock().release_owner(owner);
        Ok(n)
    }

    async fn release_owners_under(&self, prefix: &str) -> StoreResult<u64> {
        if prefix.is_empty() {
            return Ok(0);
        }
        let inner = self.slot.get()?;
        let mut q = inner.queues.lock();
        let owners: Vec<Arc<str>> = q.by_owner.keys().filter(|o| o.starts_with(prefix)).cloned().collect();
        Ok(owners.iter().map(|o| q.release_owner(o)).sum())
    }

    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats> {
        // Memory only: no blocking-pool hand-off (two thread wake-ups).
        let inner = self.slot.get()?;
        let q = inner.queues.lock();
        let Some(cq) = q.by_conn.get(conn) else {
            return Ok(QueueStats::default());
        };
        let mut s = QueueStats {
            bytes: cq.bytes,
            ..Default::default()
        };
        for m in cq.msgs.values() {
            if m.pending(now_ms) {
                s.pending += 1;
            } else if m.leased(now_ms) {
                s.leased += 1;
            }
            s.oldest_received_ms = Some(match s.oldest_received_ms {
                Some(o) => o.min(m.received_at_ms),
                None => m.received_at_ms,
            });
        }
        Ok(s)
    }

    async fn total_queued(&self) -> StoreResult<u64> {
        // Memory only: no need for a blocking thread.
        Ok(self.slot.get()?.queues.lock().total)
    }

    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>> {
        let after = after.map(str::to_owned);
        self.blocking(move |inner| {
            let q = inner.queues.lock();
            let mut found: Vec<&str> = q
                .by_conn
                .iter()
                .filter(|(c, _)| after.as_deref().map_or(true, |a| c.as_str() > a))
                .filter(|(_, cq)| cq.msgs.values().any(|m| m.pending(now_ms)))
                .map(|(c, _)| c.as_str())
                .collect();
            found.sort_unstable();
            Ok(found.into_iter().take(limit).map(str::to_owned).collect())
        })
        .await
    }

    async fn pending_among(&self, conns: &[ConnId], now_ms: i64) -> StoreResult<Vec<ConnId>> {
        // Memory only: no need for a blocking thread.
        let inner = self.slot.get()?;
        let q = inner.queues.lock();
        Ok(conns
            .iter()
            .filter(|c| {
                q.by_conn
                    .get(c.as_str())
                    .is_some_and(|cq| cq.msgs.values().any(|m| m.pending(now_ms)))
            })
            .cloned()
            .collect())
    }

    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64> {
        self.blocking(move |inner| {
            let (removed, newer_cutoff) = {
                let mut guard = inner.queues.lock();
                let q = &mut *guard;
                let mut removed = Vec::new();
                let newer_cutoff = before_ms > q.dedup_pruned_before;
                q.dedup_pruned_before = q.dedup_pruned_before.max(before_ms);
                // Entries skipped below are popped once each: the work stays linear in records.
                while removed.len() < max {
                    match q.dedup_order.front() {
                        Some((at, _, _)) if *at < before_ms => {}
                        _ => break,
                    }
                    let (at, conn, key) = q.dedup_order.pop_front().expect("front checked");
                    let Some(d) = q.dedup.get_mut(&conn) else { continue };
                    // Replaced by a later copy: that one has its own entry further on.
                    if d.get(&key).map(|(_, a)| *a) != Some(at) {
                        continue;
                    }
                    d.remove(&key);
                    if d.is_empty() {
                        q.dedup.remove(&conn);
                    }
                    q.dedup_count -= 1;
                    removed.push(dedup_tree_key(&conn, &key));
                }
                (removed, newer_cutoff)
            };
            let n = removed.len() as u64;
            // Single records (see `forget_acked`); most entries are of queued messages and have
            // no record (removing a missing key writes nothing).
            for k in removed {
                inner.dedup.remove(k).map_err(unavailable)?;
            }
            if newer_cutoff {
                // Not flushed: a cutoff lost in a crash only loads entries the next prune drops.
                inner
                    .meta
                    .insert(DEDUP_PRUNED_BEFORE_KEY, &before_ms.to_be_bytes())
                    .map_err(unavailable)?;
            }
            Ok(n)
        })
        .await
    }

    async fn dedup_records(&self) -> StoreResult<u64> {
        Ok(self.slot.get()?.queues.lock().dedup_count)
    }

    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        self.blocking(move |inner| {
            let (removed, dedup_removed) = {
                let mut guard = inner.queues.lock();
                let q = &mut *guard;
                let mut removed = Vec::new();
                let expiring = &mut q.expiring;
                q.by_conn.retain(|_, cq| {
                    cq.msgs.retain(|id, m| {
                        if m.received_at_ms < received_before_ms {
                            cq.bytes -= m.size;
                            if m.expires_at_ms != NEVER {
                                expiring.remove(&(m.expires_at_ms, *id));
                            }
                            removed.push(*id);
                            false
                        } else {
                            true
                        }
                    });
                    !cq.msgs.is_empty()
                });
                q.total -= removed.len() as u64;
                let mut dedup_removed = Vec::new();
                let count = &mut q.dedup_count;
                q.dedup.retain(|conn, d| {
                    d.retain(|k, (_, at)| {
                        if *at < received_before_ms {
                            dedup_removed.push(dedup_tree_key(conn, k));
                            *count -= 1;
                            false
                        } else {
                            true
                        }
                    });
                    !d.is_empty()
                });
                // Prune the owner index down to queues where the owner still holds a message.
                let by_conn = &q.by_conn;
                q.by_owner.retain(|owner, conns| {
                    conns.retain(|c| {
                        by_conn
                            .get(c)
                            .is_some_and(|cq| cq.msgs.values().any(|m| m.owner.as_deref() == Some(&**owner)))
                    });
                    !conns.is_empty()
                });
                (removed, dedup_removed)
            };
            let mut b = sled::Batch::default();
            let mut a = sled::Batch::default();
            for id in &removed {
                b.remove(&encode_id(*id));
                a.remove(&encode_id(*id));
            }
            let mut d = sled::Batch::default();
            for k in dedup_removed {
                d.remove(k);
            }
            inner.msgs.apply_batch(b).map_err(unavailable)?;
            inner.attempts.apply_batch(a).map_err(unavailable)?;
            inner.dedup.apply_batch(d).map_err(unavailable)?;
            Ok(removed.len() as u64)
        })
        .await
    }

    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.blocking(move |inner| {
            let (removed, with_dedup) = {
                let mut guard = inner.queues.lock();
                let q = &mut *guard;
                let (mut removed, mut with_dedup) = (Vec::new(), Vec::new());
                while removed.len() < max {
                    let Some((&(at, id), _)) = q.expiring.first_key_value() else {
                        break;
                    };
                    if at > now_ms {
                        break;
                    }
                    let conn = q.expiring.remove(&(at, id)).expect("first key just read");
                    let Some(cq) = q.by_conn.get_mut(&conn) else { continue };
                    let Some(m) = cq.msgs.remove(&id) else { continue };
                    cq.bytes -= m.size;
                    if cq.msgs.is_empty() {
                        q.by_conn.remove(&conn);
                    }
                    q.total -= 1;
                    removed.push(id);
                    if m.dedup {
                        with_dedup.push(id);
                    }
                }
                (removed, with_dedup)
            };
            inner.forget_acked(&removed, &with_dedup)?;
            Ok(removed.len() as u64)
        })
        .await
    }

    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>> {
        // Memory only; each queue's first entry is its oldest (ids grow with arrival).
        let inner = self.slot.get()?;
        let q = inner.queues.lock();
        Ok(q.by_conn
            .values()
            .filter_map(|cq| cq.msgs.values().next().map(|m| m.received_at_ms))
            .min())
    }

    async fn flush(&self) -> StoreResult<()> {
        self.blocking(|inner| inner.flush()).await
    }

    async fn device_of(&self, conn: &str) -> StoreResult<Option<Device>> {
        if !storable(conn) {
            return Ok(None);
        }
        let conn = conn.to_owned();
        self.blocking(
            move |inner| match inner.devices.get(conn.as_bytes()).map_err(unavailable)? {
                Some(v) => serde_json::from_slice(&v)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("device: {e}"))),
                None => Ok(None),
            },
        )
        .await
    }

    async fn set_device(&self, conn: &str, device: Option<&Device>) -> StoreResult<()> {
        check_storable("connection id", conn)?;
        let conn = conn.to_owned();
        let bytes = device
            .map(|d| serde_json::to_vec(d).map_err(|e| StoreError::Corrupt(format!("device: {e}"))))
            .transpose()?;
        self.blocking(move |inner| {
            // Under the connection lock: a connection removed meanwhile cannot keep a device.
            let _g = inner.meta_lock.lock();
            if !inner.conns.contains_key(conn.as_bytes()).map_err(unavailable)? {
                return Err(StoreError::NotFound);
            }
            match bytes {
                Some(b) => inner.devices.insert(conn.as_bytes(), b).map_err(unavailable)?,
                None => inner.devices.remove(conn.as_bytes()).map_err(unavailable)?,
            };
            inner.flush()
        })
        .await
    }

    async fn forget_device_token(&self, conn: &str, token: &str) -> StoreResult<bool> {
        if !storable(conn) {
            return Ok(false);
        }
        let (conn, token) = (conn.to_owned(), token.to_owned());
        self.blocking(move |inner| {
            let _g = inner.meta_lock.lock();
            let Some(v) = inner.devices.get(conn.as_bytes()).map_err(unavailable)? else {
                return Ok(false);
            };
            let d: Device = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(format!("device: {e}")))?;
            if d.token != token {
                return Ok(false);
            }
            inner.devices.remove(conn.as_bytes()).map_err(unavailable)?;
            inner.flush()?;
            Ok(true)
        })
        .await
    }

    async fn push_event(&self, conn: &str, now_ms: i64, window_ms: i64) -> StoreResult<PushSlot> {
        check_storable("connection id", conn)?;
        let inner = self.slot.get()?;
        let mut w = inner.push_windows.lock();
        let (state, slot) = super::push_window_step(w.get(conn).copied(), now_ms, window_ms);
        w.insert(conn.to_owned(), state);
        Ok(slot)
    }

    async fn push_take_due(&self, now_ms: i64, idle_before_ms: i64, limit: usize) -> StoreResult<Vec<ConnId>> {
        let inner = self.slot.get()?;
        let mut w = inner.push_windows.lock();
        let mut due: Vec<(i64, ConnId)> = w
            .iter()
            .filter_map(|(c, (_, d))| d.filter(|d| *d <= now_ms).map(|d| (d, c.clone())))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, c) in &due {
            w.insert(c.clone(), (now_ms, None));
        }
        w.retain(|_, (last, d)| d.is_some() || *last >= idle_before_ms);
        Ok(due.into_iter().map(|(_, c)| c).collect())
    }

    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        if !storable(id) {
            return Ok(Removed::default());
        }
        let id = id.to_owned();
        self.blocking(move |inner| {
            // Lock order: batch (enqueues) then meta (connection and key writes).
            let _b = inner.batch_lock.lock();
            let _g = inner.meta_lock.lock();
            let old = inner.get_conn(&id)?;
            let prefix = conn_prefix(&id);
            let mut keys = Vec::new();
            for kv in inner.conn_keys.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(unavailable)?;
                keys.push(k[prefix.len()..].to_vec());
            }
            let had_device = inner.devices.contains_key(id.as_bytes()).map_err(unavailable)?;
            (
                &inner.conns,
                &inner.by_verkey,
                &inner.by_thread,
                &inner.keys,
                &inner.conn_keys,
                &inner.devices,
            )
                .transaction(|(conns, by_verkey, by_thread, rkeys, conn_keys, devices)| {
                    if let Some(old) = &old {
                        for k in &old.their_verkeys {
                            by_verkey.remove(pair_key(k, &id))?;
                        }
                        if let Some(t) = &old.thread_id {
                            by_thread.remove(pair_key(t, &id))?;
                        }
                    }
                    for k in &keys {
                        // Only while it still names this connection (it always does under meta_lock).
                        if rkeys.get(k)?.is_some_and(|h| h.as_ref() == id.as_bytes()) {
                            rkeys.remove(k.as_slice())?;
                        }
                        let mut entry = prefix.clone();
                        entry.extend_from_slice(k);
                        conn_keys.remove(entry)?;
                    }
                    devices.remove(id.as_bytes())?;
                    conns.remove(id.as_bytes())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            let (messages, dedup_records) = inner.remove_queue(&id, true)?;
            inner.push_windows.lock().remove(&id);
            inner.flush()?;
            Ok(Removed {
                connection: old.is_some(),
                peer_keys: old.as_ref().map_or(0, |c| c.their_verkeys.len() as u64),
                routing_keys: keys.len() as u64,
                messages,
                dedup_records,
                device: had_device,
            })
        })
        .await
    }

    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        if !storable(conn) {
            return Ok(0);
        }
        let conn = conn.to_owned();
        self.blocking(move |inner| {
            let _b = inner.batch_lock.lock();
            let (n, _) = inner.remove_queue(&conn, false)?;
            inner.flush()?;
            Ok(n)
        })
        .await
    }

    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        // Memory only.
        let inner = self.slot.get()?;
        let q = inner.queues.lock();
        let all: Vec<QueueSummary> = q
            .by_conn
            .iter()
            .map(|(c, cq)| QueueSummary {
                connection: c.clone(),
                depth: cq.msgs.len() as u64,
                oldest_received_ms: cq.msgs.values().next().map(|m| m.received_at_ms),
            })
            .collect();
        drop(q);
        let mut deepest = all.clone();
        deepest.sort_by(|a, b| b.depth.cmp(&a.depth).then_with(|| a.connection.cmp(&b.connection)));
        deepest.truncate(limit);
        let mut oldest = all;
        oldest.sort_by(|a, b| {
            a.oldest_received_ms
                .cmp(&b.oldest_received_ms)
                .then_with(|| a.connection.cmp(&b.connection))
        });
        oldest.truncate(limit);
        Ok(TopQueues { deepest, oldest })
    }
}
