//! The open database: its trees, the queue log, the in-memory index, and what one handle does
//! on disk (open and rebuild, reads, removals). The batch write is in `writer.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::index::{key_tag, Meta, Queues};
use super::queue_log::{Key, QueueLog};
use super::records::{
    decode_conn, decode_dedup_key, decode_dedup_record, decode_id, decode_mediation, decode_msg, decode_push_window,
    dedup_record, encode_id, encode_push_window, msg_head_len, KIND_DEDUP, KIND_MSG,
};
use super::{corrupt, unavailable, DEDUP_PRUNED_BEFORE_KEY, NEVER};
use crate::store::{ConnId, Connection, MediationState, MessageId, QueuedMessage, StoreError, StoreResult};

/// Bytes of a message record's head read at first ([`Inner::msg_head`]): enough for the usual
/// connection ids and keys; a longer head takes one more read.
const HEAD_READ: usize = 256;

/// A read of the queue log as a store error: what does not read back, or does not read at all
/// (a bad sector: [`QueueLog::get`]), is `Corrupt`; anything else is transient.
fn log_read_err(e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => StoreError::Corrupt(format!("sled: {e}")),
        _ => unavailable(e),
    }
}

/// Logs a message leaving the queue whose record's head does not read back: it leaves
/// without the dedup record it may have kept ([`Inner::kept_dedup`]).
fn unreadable_dedup(id: MessageId, why: &str) {
    tracing::warn!(
        id,
        error = why,
        "sled: a message leaving the queue does not read back: no dedup record kept for it"
    );
}

/// A dedup record a removal writes for a message leaving the queue inside its window
/// ([`Inner::kept_dedup`]): key `(KIND_DEDUP, id)`, body `record`.
pub(super) struct Kept {
    pub(super) id: MessageId,
    pub(super) conn: ConnId,
    pub(super) key: [u8; 32],
    pub(super) record: Vec<u8>,
}

/// Test hook points (see [`TEST_HOOKS`]): an acknowledgement has decided to write a dedup
/// record and not yet appended it; a queue's removal is in the log, not yet out of the index.
#[cfg(test)]
pub(super) const KEPT_DEDUP_CHECKED: &str = "kept dedup checked";
#[cfg(test)]
pub(super) const QUEUE_REMOVAL_LOGGED: &str = "queue removal logged";

/// Run once, the first time their point is reached for their connection (tests: a race made
/// deterministic). Keyed by connection, so tests running beside it in this process are
/// untouched.
#[cfg(test)]
#[allow(clippy::type_complexity)]
pub(super) static TEST_HOOKS: std::sync::Mutex<Vec<(&'static str, String, Box<dyn FnOnce() + Send>)>> =
    std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn test_hook(point: &'static str, conn: &str) {
    let hook = {
        let mut hooks = TEST_HOOKS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = hooks.iter().position(|(p, c, _)| *p == point && c == conn);
        at.map(|i| hooks.remove(i).2)
    };
    if let Some(f) = hook {
        f();
    }
}

/// The push window of one connection ([`crate::store::push_window_step`]) and the claim of
/// the trailing push a node took from it ([`crate::store::Store::push_take_due`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PushWindow {
    pub(super) last_push_ms: i64,
    pub(super) trailing_due_ms: Option<i64>,
    /// (claimed until, claim token).
    pub(super) claim: Option<(i64, i64)>,
    /// [`crate::store::PushClaim::push_id`] of the last push claimed (0 before the first).
    pub(super) push_id: i64,
}

pub(super) struct Inner {
    pub(super) db: sled::Db,
    pub(super) meta: sled::Tree,
    pub(super) conns: sled::Tree,
    pub(super) by_verkey: sled::Tree,
    pub(super) by_thread: sled::Tree,
    pub(super) keys: sled::Tree,
    pub(super) conn_keys: sled::Tree,
    /// Queued messages and dedup records of stores written before the queue log: moved into
    /// it at open (`migrate_trees`), empty afterwards.
    pub(super) msgs: sled::Tree,
    pub(super) attempts: sled::Tree,
    pub(super) dedup: sled::Tree,
    /// Queued messages ([`KIND_MSG`]) and the dedup records of messages that left the queue
    /// inside their window ([`KIND_DEDUP`]). Shared by the handles a reopen replaces.
    pub(super) log: Arc<QueueLog>,
    /// invitation id -> [single_use, used]
    pub(super) invitations: sled::Tree,
    /// connection id -> JSON [`Device`] (push registration).
    pub(super) devices: sled::Tree,
    /// Push windows, as `windows` holds them (read back at open; in-process nodes share
    /// them). Every change is written to `windows` first, under this lock: the disk holds them
    /// in the order they were decided, and a write that fails changes nothing.
    pub(super) push_windows: Mutex<HashMap<ConnId, PushWindow>>,
    /// connection id -> push window ([`super::records::encode_push_window`]): a restart keeps
    /// the windows, so a wallet pushed a moment ago is not pushed again at once, and a
    /// trailing push scheduled (or a claim held) is still taken.
    pub(super) windows: sled::Tree,
    /// Sights of authenticated messages ([`crate::store::Store::first_sight`]): digest ->
    /// until_ms (big-endian).
    pub(super) sights: sled::Tree,
    /// The same records by when they run out: until_ms (big-endian) ++ digest -> nothing, for
    /// [`crate::store::Store::prune_sights`].
    pub(super) sights_due: sled::Tree,
    /// Serialises the writes of `sights` and `sights_due` (one record is two keys).
    pub(super) sights_lock: Mutex<()>,
    /// Serialises connection and key writes (transactions then never conflict).
    pub(super) meta_lock: Mutex<()>,
    /// Connections whose mediation is revoked ([`MediationState::Denied`]), as `conns` holds
    /// them: the writer's route check refuses them without decoding a record per message.
    /// Changed under `meta_lock` by every connection write, once `conns` holds it; rebuilt at
    /// open.
    pub(super) denied: RwLock<HashSet<ConnId>>,
    pub(super) queues: Mutex<Queues>,
    /// The last flush failed (disk full, I/O error): [`Store::health`] says so until a flush
    /// succeeds again, so `/ready` turns a load balancer away while writes cannot land.
    pub(super) write_failed: std::sync::atomic::AtomicBool,
    /// Held by the writer over a whole batch (decide, write, publish) and by the removal of a
    /// queue: a removal never lands between a batch's decision and its publication.
    pub(super) batch_lock: Mutex<()>,
    /// Held by [`crate::store::Store::prune_dedup`] from its read of the pruning order to its change of the
    /// index: two prunes never read the same entries.
    pub(super) prune_lock: Mutex<()>,
    /// The highest message id handed out, or found in the queue log at open ([`Inner::next_id`]).
    pub(super) last_id: std::sync::atomic::AtomicI64,
}

impl Inner {
    /// Runs a store call on this handle; after an I/O error, marks the handle for the
    /// supervisor (a write may have failed outside a flush: it probes with one).
    pub(super) fn run<T>(&self, f: impl FnOnce(&Inner) -> StoreResult<T>) -> StoreResult<T> {
        let r = f(self);
        if matches!(&r, Err(StoreError::Unavailable(_))) {
            self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    pub(super) fn open(cfg: sled::Config, log: Arc<QueueLog>) -> StoreResult<Inner> {
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
            windows: t("push_windows")?,
            sights: t("sights")?,
            sights_due: t("sights_due")?,
            sights_lock: Mutex::new(()),
            log,
            push_windows: Mutex::new(HashMap::new()),
            db,
            meta_lock: Mutex::new(()),
            denied: RwLock::new(HashSet::new()),
            queues: Mutex::new(Queues::default()),
            write_failed: std::sync::atomic::AtomicBool::new(false),
            batch_lock: Mutex::new(()),
            prune_lock: Mutex::new(()),
            last_id: std::sync::atomic::AtomicI64::new(0),
        };
        inner.fold_verkey_index()?;
        inner.migrate_trees()?;
        inner.rebuild_index()?;
        inner.load_denied()?;
        inner.load_push_windows()?;
        Ok(inner)
    }

    /// After a run that did not stop (a crash): forgets when each window last pushed, keeps
    /// its trailing push and claim (still owed). The node then wakes every wallet with mail
    /// pending at once, as their sockets died with that run; a window remembering a push made
    /// just before the crash would put that wake-up off to its trailing push, up to a window
    /// later. Written before the memory changes, as every window change.
    pub(super) fn forget_last_pushes(&self) -> StoreResult<()> {
        let mut w = self.push_windows.lock();
        let forgotten: Vec<(ConnId, PushWindow)> = w
            .iter()
            .map(|(c, p)| {
                let p = PushWindow {
                    last_push_ms: i64::MIN,
                    ..*p
                };
                (c.clone(), p)
            })
            .collect();
        let mut b = sled::Batch::default();
        for (c, p) in &forgotten {
            b.insert(c.as_bytes(), &encode_push_window(p)[..]);
        }
        self.windows.apply_batch(b).map_err(unavailable)?;
        w.extend(forgotten);
        Ok(())
    }

    /// Reads the push windows back from `windows`. A record that cannot be read is left out
    /// and removed, with a warning: losing one window costs at most a push too many (the
    /// store still opens; a damaged window must not keep the node from starting).
    fn load_push_windows(&self) -> StoreResult<()> {
        let mut windows = HashMap::new();
        let mut damaged = sled::Batch::default();
        let mut n_damaged = 0usize;
        for kv in self.windows.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            match (String::from_utf8(k.to_vec()), decode_push_window(&v)) {
                (Ok(conn), Ok(w)) => {
                    windows.insert(conn, w);
                }
                (conn, w) => {
                    let why = w.err().map_or_else(|| "key not UTF-8".to_string(), |e| e.to_string());
                    tracing::warn!(connection = ?conn.ok(), error = %why, "sled: unreadable push window, forgotten");
                    damaged.remove(k);
                    n_damaged += 1;
                }
            }
        }
        if n_damaged > 0 {
            if let Err(e) = self.windows.apply_batch(damaged) {
                tracing::warn!(error = %e, "sled: unreadable push windows not removed (read past again at the next open)");
            }
        }
        *self.push_windows.lock() = windows;
        Ok(())
    }

    /// Reads which connections are denied (one pass over the connections, their mediation
    /// only). A record that cannot be read is left out, with a warning: it routes as before.
    fn load_denied(&self) -> StoreResult<()> {
        let mut denied = HashSet::new();
        for kv in self.conns.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let id = String::from_utf8_lossy(&k);
            match decode_mediation(&v) {
                Ok(MediationState::Denied) => {
                    denied.insert(id.into_owned());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(connection = %id, error = %e, "sled: unreadable connection record"),
            }
        }
        *self.denied.write() = denied;
        Ok(())
    }

    /// Records the mediation state `conns` now holds for `id` (its writer holds `meta_lock`).
    pub(super) fn note_mediation(&self, id: &str, mediation: Option<MediationState>) {
        // Read first: nearly every write changes nothing here, and the writer reads the set
        // under the batch lock.
        let deny = mediation == Some(MediationState::Denied);
        if self.denied.read().contains(id) == deny {
            return;
        }
        let mut denied = self.denied.write();
        if deny {
            denied.insert(id.to_owned());
        } else {
            denied.remove(id);
        }
    }

    /// Moves the queued messages and dedup records of a store written before the queue log
    /// into it (synced), then empties their trees. A crash in between leaves records in both:
    /// the next open moves them again, and the later copy of a key is the one kept.
    fn migrate_trees(&self) -> StoreResult<()> {
        if self.msgs.is_empty() && self.dedup.is_empty() {
            return Ok(());
        }
        let mut moved = 0usize;
        let mut chunk: Vec<(Key, Vec<u8>)> = Vec::new();
        let put = |chunk: &mut Vec<(Key, Vec<u8>)>| -> StoreResult<()> {
            let puts: Vec<(Key, &[u8])> = chunk.iter().map(|(k, v)| (*k, &v[..])).collect();
            self.log.append(&puts, &[], true).map_err(unavailable)?;
            chunk.clear();
            Ok(())
        };
        for kv in self.msgs.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            chunk.push(((KIND_MSG, decode_id(&k)?), v.to_vec()));
            moved += 1;
            if chunk.len() >= 1024 {
                put(&mut chunk)?;
            }
        }
        for kv in self.dedup.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            if v.len() != 16 {
                return Err(corrupt("dedup value"));
            }
            let (conn, key) = decode_dedup_key(&k)?;
            let id = i64::from_be_bytes(v[..8].try_into().expect("length checked"));
            let at = i64::from_be_bytes(v[8..].try_into().expect("length checked"));
            chunk.push(((KIND_DEDUP, id), dedup_record(&conn, &key, id, at)));
            moved += 1;
            if chunk.len() >= 1024 {
                put(&mut chunk)?;
            }
        }
        put(&mut chunk)?;
        self.msgs.clear().map_err(unavailable)?;
        self.dedup.clear().map_err(unavailable)?;
        self.flush()?;
        tracing::info!(records = moved, "sled: moved the queue into the queue log");
        Ok(())
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
        let mut unreadable = Vec::new();
        let mut attempts: HashMap<MessageId, u32> = HashMap::new();
        for kv in self.attempts.iter() {
            let (k, v) = kv.map_err(unavailable)?;
            let id = decode_id(&k)?;
            let n = u32::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("attempts"))?);
            attempts.insert(id, n);
        }
        let mut last_id = 0;
        self.log
            .for_each(|(kind, id), v| {
                last_id = last_id.max(id);
                let r = match kind {
                    KIND_MSG => decode_msg(v).map(|m| {
                        if let Some(dk) = m.dedup_key.filter(|_| m.received_at_ms >= pruned_before) {
                            if let Some(old) = q.note_dedup(m.connection, dk, id, m.received_at_ms) {
                                stale.push((KIND_DEDUP, old));
                            }
                        }
                        q.insert_unfiled(
                            m.connection,
                            id,
                            Meta {
                                size: m.payload.len() as u64,
                                received_at_ms: m.received_at_ms,
                                lease_until_ms: 0,
                                owner: None,
                                // Taken: what is left at the end belongs to no queued message.
                                attempts: attempts.remove(&id).unwrap_or(0),
                                expires_at_ms: m.expires_at_ms.unwrap_or(NEVER),
                                dedup: m.dedup_key.is_some(),
                                key_tag: key_tag(m.recipient_key),
                            },
                        );
                    }),
                    KIND_DEDUP => decode_dedup_record(v).map(|(conn, key, id, at)| {
                        if at < pruned_before {
                            // Written by an acknowledgement racing the prune that dropped its entry.
                            stale.push((KIND_DEDUP, id));
                        } else if let Some(old) = q.note_dedup(&conn, key, id, at) {
                            // A copy sent again after its window: the one it replaced.
                            stale.push((KIND_DEDUP, old));
                        }
                    }),
                    other => Err(corrupt(&format!("queue log record kind {other}"))),
                };
                if let Err(e) = r {
                    unreadable.push(((kind, id), e));
                }
                Ok(())
            })
            .map_err(log_read_err)?;
        for (key, e) in &unreadable {
            self.skip_unreadable(*key, e);
        }
        self.log.remove(&stale).map_err(unavailable)?;
        // Attempt counts of messages gone (their removal reached the queue log, the count's
        // removal did not reach sled before a crash).
        for id in attempts.keys() {
            self.attempts.remove(encode_id(*id)).map_err(unavailable)?;
        }
        q.order_dedup();
        q.file_in_id_order();
        *self.queues.lock() = q;
        if self.last_id.fetch_max(last_id, std::sync::atomic::Ordering::SeqCst) < last_id
            && self.db.generate_id().map_err(unavailable)? < last_id as u64
        {
            tracing::warn!(
                last_id,
                "sled: the database is older than the queue log (restored or removed without queue/): new message ids go past the log's"
            );
        }
        Ok(())
    }

    /// Leaves out of the index a queue log record that reads back whole (its CRC matches) but
    /// that this version cannot decode: a kind or a message format it does not know (written
    /// by a newer version), or a body it cannot parse. Logged and counted
    /// ([`QueueLog::note_unreadable`]), as an unreadable push window is: one such record must
    /// not keep the store from opening, and the node from starting. The record stays in the
    /// log (a newer version opened again reads it), found again at each open.
    fn skip_unreadable(&self, (kind, id): Key, e: &StoreError) {
        tracing::warn!(
            kind,
            id,
            error = %e,
            "sled: a queue log record this version cannot read: left out of the queue (kept in the log)"
        );
        self.log.note_unreadable((kind, id));
    }

    /// A new message id. sled persists its id generator and skips ahead after a crash, so its
    /// ids never repeat; but its files may be older than the queue log's (restored from a
    /// backup, or removed, without `queue/`): its ids would then start again below the ids of
    /// messages still queued, and a new message would replace one in the log (lost) or share
    /// its id with another connection's (delivered to it, acknowledged by it). So an id is
    /// also above every id the log held at open ([`Inner::rebuild_index`]) and every id handed
    /// out since: sled's while it is, else the next one past them.
    pub(super) fn next_id(&self) -> StoreResult<MessageId> {
        use std::sync::atomic::Ordering::SeqCst;
        let id = self.db.generate_id().map_err(unavailable)?;
        let id = i64::try_from(id + 1).map_err(|_| corrupt("id space exhausted"))?;
        // Every id handed out is at most `last_id` once it is handed out: one above it is new.
        if self.last_id.fetch_max(id, SeqCst) < id {
            return Ok(id);
        }
        Ok(self.last_id.fetch_add(1, SeqCst) + 1)
    }

    /// Whether a connection other than `id` holds peer key `key` (read under `meta_lock`, the
    /// lock of every connection write, for the answer to hold until the caller writes).
    pub(super) fn holder_other_than(&self, key: &str, id: &str) -> StoreResult<bool> {
        let prefix = super::records::conn_prefix(key);
        for kv in self.by_verkey.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(unavailable)?;
            if &k[prefix.len()..] != id.as_bytes() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub(super) fn get_conn(&self, id: &str) -> StoreResult<Option<Connection>> {
        match self.conns.get(id.as_bytes()).map_err(unavailable)? {
            Some(v) => Ok(Some(decode_conn(&v)?)),
            None => Ok(None),
        }
    }

    /// Flushes sled (the queue log's synced appends are on disk when they return). A failure
    /// marks the handle; only [`Inner::flush_all`] clears the mark, as a sled flush that
    /// succeeds says nothing of the queue log's writes.
    pub(super) fn flush(&self) -> StoreResult<()> {
        let r = self.db.flush();
        if r.is_err() {
            self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r.map_err(unavailable).map(|_| ())
    }

    /// Flushes sled and syncs the queue log (removals appended since its last synced append);
    /// when both succeed, clears a failure mark (the supervisor's probe, after free space). A
    /// queue log poisoned by a failed sync refuses the sync: only its reopen clears that.
    pub(super) fn flush_all(&self) -> StoreResult<()> {
        self.flush()?;
        let r = self.log.sync();
        self.write_failed.store(r.is_err(), std::sync::atomic::Ordering::SeqCst);
        r.map_err(unavailable)
    }

    /// A queued message's record.
    pub(super) fn msg_record(&self, id: MessageId) -> StoreResult<Option<Vec<u8>>> {
        self.log.get((KIND_MSG, id)).map_err(log_read_err)
    }

    /// The head of a queued message's record: all of it but the payload ([`decode_msg`] reads
    /// it with an empty one). What a pickup filtered by recipient key reads of every pending
    /// message, and an acknowledgement of the messages whose dedup record it keeps: it must
    /// not read their payloads (up to the queue's bytes, 256 MiB by default, per call).
    pub(super) fn msg_head(&self, id: MessageId) -> StoreResult<Option<Vec<u8>>> {
        let mut want = HEAD_READ;
        loop {
            let Some(mut v) = self.log.get_head((KIND_MSG, id), want).map_err(log_read_err)? else {
                return Ok(None);
            };
            let need = msg_head_len(&v)?;
            if need <= v.len() {
                v.truncate(need);
                return Ok(Some(v));
            }
            if v.len() < want {
                return Err(corrupt("message truncated"));
            }
            // More than `want`: each turn reads more, up to the longest head there is.
            want = need;
        }
    }

    /// Whether message `id` of `conn` is for recipient key `key`, read from its record's head
    /// ([`Inner::msg_head`]); false when it is gone, or was set aside as unreadable
    /// ([`Inner::or_set_aside`]): a pickup filtered by key goes on with the other messages.
    pub(super) fn is_for_key(&self, conn: &str, id: MessageId, key: &str) -> StoreResult<bool> {
        let Some(Some(v)) = self.or_set_aside(conn, id, self.msg_head(id))? else {
            return Ok(false);
        };
        let m = self.or_set_aside(conn, id, decode_msg(&v))?;
        Ok(m.is_some_and(|m| m.recipient_key == key))
    }

    /// Appends dedup records `keep` and removes `msgs` and `dedups` (message ids) from the
    /// queue log, in this order and in one write; with `sync`, returns once they are on disk,
    /// else not synced (see `forget_acked`).
    pub(super) fn log_removal(
        &self,
        keep: &[Kept],
        msgs: &[MessageId],
        dedups: &[MessageId],
        sync: bool,
    ) -> StoreResult<()> {
        let puts: Vec<(Key, &[u8])> = keep.iter().map(|k| ((KIND_DEDUP, k.id), &k.record[..])).collect();
        let removes: Vec<Key> = msgs
            .iter()
            .map(|id| (KIND_MSG, *id))
            .chain(dedups.iter().map(|id| (KIND_DEDUP, *id)))
            .collect();
        let r = self.log.append(&puts, &removes, sync);
        if r.is_err() {
            self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r.map_err(unavailable)
    }

    /// Reads the messages of `conn` just leased (id, attempts) and records their attempt
    /// counts. A message whose record does not read back (or does not read: a bad sector) is
    /// set aside ([`Inner::or_set_aside`]) and the others are returned.
    pub(super) fn load_leased(&self, conn: &str, picked: Vec<(MessageId, u32)>) -> StoreResult<Vec<QueuedMessage>> {
        let mut out = Vec::with_capacity(picked.len());
        for (id, n) in picked {
            // A message acked or expired meanwhile is simply not returned.
            let Some(Some(v)) = self.or_set_aside(conn, id, self.msg_record(id))? else {
                continue;
            };
            let Some(m) = self.or_set_aside(conn, id, decode_msg(&v))? else {
                continue;
            };
            out.push(QueuedMessage {
                id,
                connection: m.connection.to_owned(),
                recipient_key: m.recipient_key.to_owned(),
                payload: m.payload.to_vec(),
                received_at_ms: m.received_at_ms,
                attempts: n,
            });
            // One record each, not a `sled::Batch`: see `forget_acked`. Not flushed: losing
            // an attempt count only under-reports redeliveries. A count that cannot be written
            // fails the lease (its messages go back as it runs out): sled 0.34 latches an I/O
            // error until it is reopened, and a failed call is what has the supervisor reopen
            // it. Logged and let go instead, the node went on delivering on a latched sled, and
            // after a full disk a wallet's acknowledgements piled up unanswered (tests/outage.rs).
            self.attempts
                .insert(encode_id(id), &n.to_be_bytes())
                .map_err(unavailable)?;
        }
        Ok(out)
    }

    /// `read`, a read of message `id` of `conn` (its record, its head, or their decoding), or
    /// `None` when it failed as [`StoreError::Corrupt`] and the message was set aside
    /// ([`Inner::set_aside_unreadable`]): the caller goes on with the other messages.
    pub(super) fn or_set_aside<T>(&self, conn: &str, id: MessageId, read: StoreResult<T>) -> StoreResult<Option<T>> {
        match read {
            Err(StoreError::Corrupt(why)) => {
                self.set_aside_unreadable(conn, id, &why)?;
                Ok(None)
            }
            read => read.map(Some),
        }
    }

    /// Takes message `id` of `conn`, whose record did not read back (`why`), out of its queue.
    /// Else one unreadable record fails every lease of the queue for good: a lease picks the
    /// lowest pending ids, the same ones each time, and its caller cannot release ids it never
    /// got, so the other messages of the batch are never delivered.
    ///
    /// A record damaged on the disk is removed from the queue log too (a tombstone: a reopen
    /// agrees) and counted as damage ([`QueueLog::drop_damaged`]). One that reads back whole
    /// but does not decode (a format this version does not know) stays in the log, as at
    /// open ([`Inner::skip_unreadable`]), and is counted. Nothing changes when it reads back
    /// and decodes now (a read that failed once: the message is delivered when its lease runs
    /// out), or when it is gone (acknowledged meanwhile). Its dedup entry goes with it: a copy
    /// sent again is queued, not taken for a duplicate of what was lost.
    fn set_aside_unreadable(&self, conn: &str, id: MessageId, why: &str) -> StoreResult<()> {
        let key = (KIND_MSG, id);
        if !self.log.drop_damaged(key).map_err(unavailable)? {
            match self.msg_record(id) {
                Ok(Some(v)) if decode_msg(&v).is_err() => self.log.note_unreadable(key),
                Ok(_) | Err(StoreError::Corrupt(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        tracing::error!(
            connection = conn,
            id,
            error = why,
            "sled: a queued message does not read back: taken out of its queue (lost), the others are delivered"
        );
        self.queues.lock().remove_lost(conn, id);
        self.forget_attempts(&[id]);
        Ok(())
    }

    /// Drops from the index the messages the queue log dropped as damaged on its own
    /// (compaction found their records damaged: [`QueueLog::take_lost`]): nothing of them can
    /// be delivered, and else they would stay counted and leased for nothing. Their queue is
    /// found by a scan of the queues (rare: damage on the disk). A message not in the index
    /// (removed meanwhile) is passed over.
    pub(super) fn forget_lost(&self, lost: &[Key]) {
        let ids: Vec<MessageId> = lost
            .iter()
            .filter(|(kind, _)| *kind == KIND_MSG)
            .map(|(_, id)| *id)
            .collect();
        if ids.is_empty() {
            return;
        }
        {
            let mut q = self.queues.lock();
            for id in &ids {
                if let Some(conn) = q.conn_of(*id) {
                    q.remove_lost(&conn, *id);
                }
            }
        }
        tracing::error!(
            messages = ids.len(),
            "sled: queued messages whose records were damaged on the disk taken out of their queues (lost)"
        );
        self.forget_attempts(&ids);
    }

    /// Removes the attempt counts of messages gone for good; a failure is logged only (a count
    /// whose message is gone is dropped at the next open).
    fn forget_attempts(&self, ids: &[MessageId]) {
        for id in ids {
            if let Err(e) = self.attempts.remove(encode_id(*id)) {
                tracing::warn!(error = %e, "sled: an attempt count of a removed message stays until the next open");
                break;
            }
        }
    }

    /// Removes acknowledged messages from disk, not synced (an acknowledgement lost in a crash
    /// redelivers: at-least-once). The caller drops them from the index only once this
    /// succeeded: a message whose removal failed (a full disk) must stay queued and counted.
    /// Returns the dedup records it wrote: the caller checks them against the index once it
    /// holds the queues' lock again ([`Queues::holds_dedup`], [`Inner::drop_unheld`]).
    ///
    /// Attempt counts are single sled records, not a `sled::Batch`: sled 0.34 writes out and
    /// syncs its current log buffer before and after every batch (`PageCache::pin_log`), two
    /// `pwrite` + `sync_file_range` per batch on sled's I/O threads; a live delivery applied
    /// three batches, a quarter of the node's CPU in the live fan-out (docs/BENCHMARKS.md).
    /// Single records reach the disk with sled's next flush. A count whose message is gone
    /// (the queue log's removal landed, sled's did not) is dropped at the next open.
    ///
    /// `with_dedup`: those of `ids` whose record holds a dedup key ([`Meta::dedup`]); their
    /// dedup records are written in the same append, before the removals (`kept_dedup`).
    pub(super) fn forget_acked(&self, ids: &[MessageId], with_dedup: &[MessageId]) -> StoreResult<Vec<Kept>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keep = self.kept_dedup(with_dedup)?;
        #[cfg(test)]
        for k in &keep {
            test_hook(KEPT_DEDUP_CHECKED, &k.conn);
        }
        self.log_removal(&keep, ids, &[], false)?;
        // After the removal: a count left by a failure here is dropped at the next open, where
        // one removed before a failed append would under-report a message still queued. Not an
        // error once the removal is in the log: the caller must then drop the messages from the
        // index, or they would stay counted against the queue's quota and leased for nothing.
        self.forget_attempts(ids);
        Ok(keep)
    }

    /// Removes from the queue log the dedup records a removal wrote ([`Inner::forget_acked`])
    /// that the index no longer holds once they were written (`unheld`, found under the queues'
    /// lock after the append): the connection was deleted, the entry pruned or replaced between
    /// the check and the append. Else such a record would be in no index (never pruned, copied
    /// forward by compaction) and come back at the next open, a deleted connection's included.
    /// Not synced, as the append it undoes. A failure is not the removal's: logged, and the
    /// record is dropped by the next open (older than the prune cutoff) or pruned after it.
    pub(super) fn drop_unheld(&self, unheld: &[MessageId]) {
        if unheld.is_empty() {
            return;
        }
        if let Err(e) = self.log_removal(&[], &[], unheld, false) {
            tracing::warn!(error = %e, "sled: dedup records of removed entries stay until the next open");
        }
    }

    /// The dedup records of messages about to leave the queue (acknowledged, expired by their
    /// sender, dropped by an operator) whose dedup entry is still held, i.e. not yet pruned: a
    /// copy sent again within the window is still a duplicate after a restart. While a
    /// message is queued its own record is its dedup record, so ingest writes one record per
    /// forward, not two, and a message that outlives its window (a wallet offline longer than
    /// it) never has one. Written in the append that removes the messages: the queue log
    /// recovers a prefix, so a removal that survives a crash has its dedup record.
    ///
    /// A removal of the entry (a prune, a deletion of the connection, a later copy) that lands
    /// between the check and the append leaves a record with no entry: the caller checks again
    /// after the append and removes it ([`Inner::drop_unheld`]).
    pub(super) fn kept_dedup(&self, ids: &[MessageId]) -> StoreResult<Vec<Kept>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            match self.msg_head(*id) {
                Ok(Some(v)) => records.push((*id, v)),
                Ok(None) => {}
                // Leaving the queue anyway: without its dedup record, not stuck in the queue
                // (every removal of it, and of the messages removed with it, would fail). A
                // head on a bad sector arrives here too ([`QueueLog::get_head`]).
                Err(StoreError::Corrupt(why)) => unreadable_dedup(*id, &why),
                Err(e) => return Err(e),
            }
        }
        let q = self.queues.lock();
        let mut keep = Vec::with_capacity(records.len());
        for (id, v) in &records {
            let m = match decode_msg(v) {
                Ok(m) => m,
                Err(e) => {
                    unreadable_dedup(*id, &e.to_string());
                    continue;
                }
            };
            let Some(dk) = m.dedup_key else { continue };
            if q.holds_dedup(m.connection, &dk, *id) {
                keep.push(Kept {
                    id: *id,
                    conn: m.connection.to_owned(),
                    key: dk,
                    record: dedup_record(m.connection, &dk, *id, m.received_at_ms),
                });
            }
        }
        Ok(keep)
    }

    /// Deletes every queued message of `conn` (and, with `dedup`, its dedup records). The caller
    /// holds `batch_lock`. Returns (messages, dedup records) removed, once their removal is on
    /// disk: an operator told a queue is gone must not see it come back after a power loss,
    /// and a deleted connection must not come back without its messages' removal (they would
    /// be counted for ever, never leased).
    pub(super) fn remove_queue(&self, conn: &str, dedup: bool) -> StoreResult<(u64, u64)> {
        // What to remove is read first, and the index changed only once the removal is on disk:
        // a failed append must not leave messages live in the log and missing from the index
        // (uncounted, never delivered, and skipped by a retry of this call).
        let (ids, with_dedup, dedup_ids) = {
            let mut q = self.queues.lock();
            if dedup {
                // Until the index drops them: an acknowledgement appending one of their
                // records meanwhile (after this removal's append) removes it again.
                q.dedup_dropping = Some(conn.to_owned());
            }
            let (mut ids, mut with_dedup) = (Vec::new(), Vec::new());
            if let Some(cq) = q.by_conn.get(conn) {
                for (id, m) in &cq.msgs {
                    ids.push(*id);
                    if m.dedup {
                        with_dedup.push(*id);
                    }
                }
            }
            let dedup_ids: Vec<MessageId> = match q.dedup.get(conn) {
                Some(d) if dedup => d.values().map(|(id, _)| *id).collect(),
                _ => Vec::new(),
            };
            (ids, with_dedup, dedup_ids)
        };
        // Without `dedup` the queue goes and its dedup entries stay (as after an
        // acknowledgement).
        let logged = if dedup {
            self.log_removal(&[], &ids, &dedup_ids, true)
        } else {
            self.kept_dedup(&with_dedup)
                .and_then(|keep| self.log_removal(&keep, &ids, &dedup_ids, true))
        };
        if let Err(e) = logged {
            if dedup {
                self.queues.lock().dedup_dropping = None;
            }
            return Err(e);
        }
        #[cfg(test)]
        test_hook(QUEUE_REMOVAL_LOGGED, conn);
        let removed = self.unindex_queue(conn, dedup);
        let mut a = sled::Batch::default();
        for id in &ids {
            a.remove(&encode_id(*id));
        }
        // After the removal: a count whose message is gone is dropped at the next open.
        self.attempts.apply_batch(a).map_err(unavailable)?;
        Ok(removed)
    }

    /// Drops the queue of `conn` (and, with `dedup`, its dedup entries) from the index, once
    /// their removal is on disk; returns (messages, dedup entries) dropped. Only messages this
    /// removal wrote off can be there: the caller holds `batch_lock`, no enqueue adds one.
    fn unindex_queue(&self, conn: &str, dedup: bool) -> (u64, u64) {
        let mut q = self.queues.lock();
        let mut messages = 0;
        if let Some(cq) = q.by_conn.remove(conn) {
            for (id, m) in &cq.msgs {
                q.unindex(*id, m);
            }
            messages = cq.msgs.len() as u64;
            q.total -= messages;
        }
        let mut entries = 0;
        if dedup {
            q.dedup_dropping = None;
            if let Some(d) = q.dedup.remove(conn) {
                entries = d.len() as u64;
                q.dedup_count -= entries;
            }
        }
        (messages, entries)
    }
}
