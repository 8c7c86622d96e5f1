//! The writer thread: every `enqueue` goes through it; it gathers the waiting requests
//! (group commit), decides limits and dedup for all of them, writes them, flushes once,
//! publishes them in the index and answers every caller.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::cap::QueueCap;
use super::index::{key_tag, Meta, Owner};
use super::inner::Inner;
use super::records::{MsgBody, KIND_DEDUP, KIND_MSG};
use super::supervisor::Slot;
use super::{unavailable, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, NEVER};
use crate::store::{check_message, EnqueueLimits, Enqueued, MessageId, NewMessage, StoreError, StoreResult};

pub(super) struct EnqueueReq {
    pub(super) msgs: Vec<NewMessage>,
    pub(super) limits: EnqueueLimits,
    /// Queue each message only while its recipient key routes to its connection.
    pub(super) routed: bool,
    pub(super) reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
}

/// The route check of one message of a routed enqueue.
enum Route {
    /// Its recipient key routes to its connection (or the enqueue is not routed).
    Held,
    /// The key routes elsewhere or nowhere, or the connection's mediation is revoked.
    Gone,
    /// The key could not be read: no answer either way.
    Unreadable(StoreError),
}

/// Recipient keys whose route read fails in the writer (tests: a sled read error). Keyed by
/// the key, not a flag on the store, so tests running beside it in this process are untouched.
#[cfg(test)]
pub(super) static FAIL_ROUTE_READS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl Inner {
    /// The connection holding `key`, read for the writer's route check.
    fn route_read(&self, key: &str) -> sled::Result<Option<sled::IVec>> {
        #[cfg(test)]
        if FAIL_ROUTE_READS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|k| k == key)
        {
            return Err(sled::Error::Io(std::io::Error::other("route read fails (test)")));
        }
        self.keys.get(key.as_bytes())
    }

    /// One batch of the writer: decide, write, flush once, publish, answer. A message is
    /// refused ([`StoreError::Full`]) when the node already holds `cap`'s bound, counting the
    /// messages accepted before it in this batch; duplicates queue nothing and pass.
    fn write_batch(&self, batch: Vec<EnqueueReq>, cap: &QueueCap) {
        enum Slot {
            Done(StoreResult<Enqueued>),
            /// Accepted: index into `accepted`.
            New(usize),
            /// Duplicate of a message accepted earlier in this batch.
            DupOfNew(usize),
        }
        // 0. Routes asked for, read before the index lock (sled serves them from memory): the
        // key is still the connection's, and its mediation is not revoked (a revocation holds
        // `batch_lock`: it lands wholly before or after this batch).
        // A read that fails is no answer: that message is `Unavailable` (503, sent again), not
        // `NoRoute` (404, final for the sender: the mail would be lost); the others go on.
        let denied = self.denied.read();
        let routes: Vec<Vec<Route>> = batch
            .iter()
            .map(|req| {
                req.msgs
                    .iter()
                    .map(|m| {
                        if !req.routed {
                            return Route::Held;
                        }
                        match self.route_read(&m.recipient_key) {
                            Err(e) => Route::Unreadable(unavailable(e)),
                            Ok(Some(holder)) if holder.as_ref() == m.connection.as_bytes() => {
                                if !denied.is_empty() && denied.contains(m.connection.as_str()) {
                                    Route::Gone
                                } else {
                                    Route::Held
                                }
                            }
                            Ok(_) => Route::Gone,
                        }
                    })
                    .collect()
            })
            .collect();
        drop(denied);
        if routes.iter().flatten().any(|r| matches!(r, Route::Unreadable(_))) {
            tracing::error!("sled: a route read failed in the writer; its messages answered 503");
            // As a failed read of `Inner::run`: the supervisor probes the handle.
            self.write_failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        // 1. Decide under the index lock (memory only), counting the batch's own additions.
        let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(batch.len());
        let mut accepted: Vec<&NewMessage> = Vec::new();
        {
            let q = self.queues.lock();
            let mut added: HashMap<&str, (u64, u64)> = HashMap::new();
            let mut local_dedup: HashMap<(&str, [u8; 32]), (usize, i64)> = HashMap::new();
            for (req, routes) in batch.iter().zip(routes) {
                let mut out = Vec::with_capacity(req.msgs.len());
                for (m, route) in req.msgs.iter().zip(routes) {
                    let conn = m.connection.as_str();
                    if let Err(e) = check_message(m) {
                        out.push(Slot::Done(Err(e)));
                        continue;
                    }
                    match route {
                        Route::Held => {}
                        Route::Gone => {
                            out.push(Slot::Done(Err(StoreError::NoRoute)));
                            continue;
                        }
                        Route::Unreadable(e) => {
                            out.push(Slot::Done(Err(e)));
                            continue;
                        }
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
                    // Node-wide (after the connection's own bound, which says more to the sender).
                    if let Err(e) = cap.admit(q.total + accepted.len() as u64) {
                        out.push(Slot::Done(Err(e)));
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
            cap.observe(q.total + accepted.len() as u64);
        }

        // 2. Ids, write, one flush: without the index lock (leases and acks go on meanwhile).
        let written = (|| -> StoreResult<Vec<MessageId>> {
            let ids = accepted
                .iter()
                .map(|_| self.next_id())
                .collect::<StoreResult<Vec<_>>>()?;
            // One append and one sync for the batch (the queue log, not a sled tree: sled's
            // insert alone cost 11-15 us a message). No caller is answered before the sync; a
            // message recovered without its batch-mates was simply not answered (its sender
            // sends again: at-least-once). A message's record holds its dedup key: no dedup
            // record while it is queued (`kept_dedup`).
            // Each message encoded once, straight into the append's buffer.
            let puts: Vec<((u8, MessageId), MsgBody)> = ids
                .iter()
                .zip(&accepted)
                .map(|(id, m)| ((KIND_MSG, *id), MsgBody(m)))
                .collect();
            // A failure is marked below. A failed sync poisons the log: it refuses every append
            // (503) until the supervisor has reopened it from disk and rebuilt the index.
            self.log.append(&puts, &[], true).map_err(unavailable)?;
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
        // Dedup entries this batch replaced (a copy sent again after its window, before the
        // prune dropped the entry): the records of the acknowledged ones are removed below.
        let mut superseded = Vec::new();
        {
            let mut q = self.queues.lock();
            for (m, id) in accepted.iter().zip(&ids) {
                let owner: Option<Owner> = m.lease.as_ref().map(|l| q.owner_named(&l.owner));
                let meta = Meta {
                    size: m.payload.len() as u64,
                    received_at_ms: m.received_at_ms,
                    lease_until_ms: m.lease.as_ref().map_or(0, |l| l.until_ms),
                    owner: owner.clone(),
                    attempts: u32::from(m.lease.is_some()),
                    expires_at_ms: m.expires_at_ms.unwrap_or(NEVER),
                    dedup: m.dedup_key.is_some(),
                    key_tag: key_tag(&m.recipient_key),
                };
                q.insert(&m.connection, *id, meta);
                if let Some(o) = owner {
                    let conns = q.by_owner.entry(o).or_default();
                    if !conns.contains(&m.connection) {
                        conns.insert(m.connection.clone());
                    }
                }
                if let Some(dk) = m.dedup_key {
                    let (name, d) = q.dedup_of(&m.connection);
                    match d.insert(dk, (*id, m.received_at_ms)) {
                        None => q.dedup_count += 1,
                        Some((old, _)) => superseded.push((KIND_DEDUP, old)),
                    }
                    q.push_dedup(m.received_at_ms, name, dk);
                }
            }
        }
        if !superseded.is_empty() {
            // Not synced (as an acknowledgement's removal): a record that survives a crash is
            // superseded again at the next open. A still-queued message has no such record:
            // nothing written for it.
            if let Err(e) = self.log.remove(&superseded) {
                tracing::warn!(error = %e, "sled: superseded dedup records stay until the next open");
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
/// costs about the same whatever its size (measured when sled's I/O pool did it; now one
/// `fdatasync` of the queue log), and a loaded node flushed ~1.4 forwards at a time: a 1 ms wait
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

pub(super) fn writer_loop(slot: Arc<Slot>, mut rx: mpsc::Receiver<EnqueueReq>) {
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
        inner.write_batch(batch, &slot.cap);
        busy = !rx.is_empty();
    }
    if let Ok(inner) = slot.get() {
        if let Err(e) = inner.flush_all() {
            tracing::error!(error = %e, "sled final flush failed");
        }
    }
}
