//! The [`Store`] trait on sled.

use std::ops::Bound;

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

use super::index::Owner;
use super::inner::PushWindow;
use super::records::{
    conn_key_entry, conn_prefix, decode_conn, encode_id, encode_push_window, latest_of, pair_key, tx_err,
};
use super::{corrupt, unavailable, SledStore, DEDUP_PRUNED_BEFORE_KEY, IDENTITY_KEY, RUNNING_KEY};
use crate::store::{
    check_connection, check_storable, storable, ConnId, Connection, ConnectionPatch, Device, EnqueueLimits, Enqueued,
    Identity, InvitationUse, KeyUpdate, MediationState, MessageId, NewClaim, NewMessage, PendingStats, PushClaim,
    PushSlot, QueueStats, QueueSummary, QueuedMessage, Removed, Store, StoreError, StoreResult, TopQueues,
};

/// Marks `c` as the most recently written holder of its thread id (`seq`, from
/// `generate_id`), in the transaction that writes its record: every write of a connection
/// (put, patch, revocation) counts, as PostgreSQL's `written` does, so both backends answer
/// [`Store::connection_by_thread`] alike.
fn stamp_thread(
    by_thread: &sled::transaction::TransactionalTree,
    c: &Connection,
    seq: &[u8; 8],
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if let Some(t) = &c.thread_id {
        by_thread.insert(pair_key(t, &c.id), &seq[..])?;
    }
    Ok(())
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
        if self.slot.log.poisoned() {
            // Until the supervisor has reopened it from disk (no flush clears it).
            return Err(StoreError::Unavailable(
                "sled: a sync of the queue log failed: writes refused until it is reopened from disk".into(),
            ));
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
        let mut c = c.clone();
        self.blocking(move |inner| {
            let _g = inner.meta_lock.lock();
            // Every connection write holds meta_lock: the check and the write are one step.
            for k in &c.their_verkeys {
                if inner.holder_other_than(k, &c.id)? {
                    return Err(StoreError::KeyTaken(k.clone()));
                }
            }
            let old = inner.get_conn(&c.id)?;
            // A revocation is final: a record read before it (a DID rotation) written back
            // after it stays denied.
            if old.as_ref().is_some_and(|o| o.mediation == MediationState::Denied) {
                c.mediation = MediationState::Denied;
            }
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
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
            inner.note_mediation(&c.id, Some(c.mediation));
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

    async fn use_invitation(&self, id: &str, claimant: &str) -> StoreResult<InvitationUse> {
        if !storable(id) {
            return Ok(InvitationUse::Unknown);
        }
        let (id, claimant) = (id.to_owned(), claimant.to_owned());
        self.blocking(move |inner| {
            let _g = inner.meta_lock.lock();
            let Some(v) = inner.invitations.get(id.as_bytes()).map_err(unavailable)? else {
                return Ok(InvitationUse::Unknown);
            };
            // [single_use, used, the first claimant's key...] (a claim of an earlier version
            // names no claimant: nobody's retry).
            match (v.first().copied(), v.get(1).copied()) {
                (Some(1), Some(0)) => {
                    let mut claimed = vec![1u8, 1];
                    claimed.extend_from_slice(claimant.as_bytes());
                    inner.invitations.insert(id.as_bytes(), claimed).map_err(unavailable)?;
                    inner.flush()?;
                    Ok(InvitationUse::FirstUse)
                }
                (Some(1), _) if !claimant.is_empty() && v.get(2..) == Some(claimant.as_bytes()) => {
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
            let before = c.their_verkeys.clone();
            patch.apply(&mut c);
            let gone: Vec<&String> = before.iter().filter(|k| !c.their_verkeys.contains(k)).collect();
            let added: Vec<&String> = c.their_verkeys.iter().filter(|k| !before.contains(k)).collect();
            check_connection(&c)?;
            for k in &added {
                if inner.holder_other_than(k, &id)? {
                    return Err(StoreError::KeyTaken((*k).clone()));
                }
            }
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
            let seq = inner.db.generate_id().map_err(unavailable)?.to_be_bytes();
            (&inner.conns, &inner.by_verkey, &inner.by_thread)
                .transaction(|(conns, by_verkey, by_thread)| {
                    for k in &gone {
                        by_verkey.remove(pair_key(k, &id))?;
                    }
                    for k in &added {
                        by_verkey.insert(pair_key(k, &id), &seq[..])?;
                    }
                    stamp_thread(by_thread, &c, &seq)?;
                    conns.insert(id.as_bytes(), bytes.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            inner.note_mediation(&id, Some(c.mediation));
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
            let Some(c) = inner.get_conn(&conn)? else {
                return Err(StoreError::NotFound);
            };
            // Under the lock `update_connection` and `revoke_mediation` take: a revocation is
            // seen or comes after.
            let revoked = c.mediation == MediationState::Denied;
            let cid = conn.as_bytes();
            let out = (&inner.keys, &inner.conn_keys)
                .transaction(|(keys, conn_keys)| {
                    let mut out = Vec::with_capacity(add.len() + remove.len());
                    for k in &add {
                        let r = match keys.get(k.as_bytes())? {
                            _ if revoked => KeyUpdate::Revoked,
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

    async fn route_long_forms(&self, short: &str, limit: usize) -> StoreResult<Vec<(String, ConnId)>> {
        if !storable(short) || limit == 0 {
            return Ok(Vec::new());
        }
        let prefix = format!("{short}:");
        self.blocking(move |inner| {
            let mut out = Vec::new();
            for kv in inner.keys.scan_prefix(prefix.as_bytes()) {
                let (k, v) = kv.map_err(unavailable)?;
                let conn = String::from_utf8(v.to_vec()).map_err(|_| corrupt("route"))?;
                if inner.denied.read().contains(&conn) {
                    continue;
                }
                let key = String::from_utf8(k.to_vec()).map_err(|_| corrupt("key"))?;
                out.push((key, conn));
                if out.len() == limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.slot.space.check()?;
        self.submit(msgs, limits, false).await
    }

    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        self.slot.space.check()?;
        self.submit(msgs, limits, true).await
    }

    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_filtered(conn, None, max, max_bytes, owner, now_ms, until_ms)
            .await
    }

    async fn lease_for_key_upto(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_filtered(conn, Some(recipient_key), max, max_bytes, owner, now_ms, until_ms)
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
            // With a key, only the messages whose tag matches it can be for it.
            let tag = recipient_key.map(super::index::key_tag);
            let pending = cq
                .msgs
                .iter()
                .filter(|(_, m)| m.pending(now_ms) && tag.map_or(true, |t| m.key_tag == t))
                .map(|(id, m)| (*id, m.received_at_ms));
            let Some(key) = recipient_key else {
                return Ok(pending.fold(PendingStats::default(), |s, (_, received)| s.and(received)));
            };
            (pending.collect(), key.to_owned())
        };
        // A filter: the recipient key of each pending message whose tag matches is on disk, in
        // its record's head (the tag tells the others apart in memory).
        let conn = conn.to_owned();
        self.blocking(move |inner| {
            let mut s = PendingStats::default();
            for (id, received) in pending {
                if inner.is_for_key(&conn, id, &key)? {
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
            // What to remove is read first, and the index changed only once the removal is in
            // the queue log: a failed append leaves the messages queued and counted.
            let (queued, with_dedup) = {
                let q = inner.queues.lock();
                let Some(cq) = q.by_conn.get(&conn) else {
                    return Ok(Vec::new());
                };
                let (mut queued, mut with_dedup) = (Vec::new(), Vec::new());
                for id in ids {
                    if let Some(m) = cq.msgs.get(&id) {
                        queued.push(id);
                        if m.dedup {
                            with_dedup.push(id);
                        }
                    }
                }
                (queued, with_dedup)
            };
            let kept = inner.forget_acked(&queued, &with_dedup)?;
            let mut q = inner.queues.lock();
            // Checked again once written, under the lock that drops entries: a record whose
            // entry went meanwhile (its connection deleted, pruned, replaced) is removed again.
            let unheld: Vec<MessageId> = kept
                .iter()
                .filter(|k| !q.holds_dedup(&conn, &k.key, k.id))
                .map(|k| k.id)
                .collect();
            let leases = queued
                .into_iter()
                .filter_map(|id| q.remove_msg(&conn, id))
                .map(|m| m.lease_until_ms)
                .collect();
            drop(q);
            inner.drop_unheld(&unheld);
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

    async fn reclaim_expired_leases(&self, now_ms: i64, max: usize) -> StoreResult<Vec<crate::store::Reclaimed>> {
        // Memory only.
        let inner = self.slot.get()?;
        let conns = inner.queues.lock().reclaim_expired(now_ms, max);
        Ok(conns)
    }

    async fn release_owners_under(&self, prefix: &str, until_at_most_ms: i64) -> StoreResult<Vec<ConnId>> {
        if prefix.is_empty() {
            return Ok(Vec::new());
        }
        let inner = self.slot.get()?;
        let mut q = inner.queues.lock();
        let owners: Vec<Owner> = q.by_owner.keys().filter(|o| o.starts_with(prefix)).cloned().collect();
        let mut conns = Vec::new();
        for o in &owners {
            q.release_owner_in(o, until_at_most_ms, |c, n| {
                if n > 0 {
                    conns.push(c.clone());
                }
            });
        }
        conns.sort_unstable();
        conns.dedup();
        Ok(conns)
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
            // From the cursor, in id order: a page reads its own queues and those it skips
            // (nothing deliverable), not every queue.
            let lower = match &after {
                Some(a) => Bound::Excluded(a.as_str()),
                None => Bound::Unbounded,
            };
            Ok(q.by_conn
                .range::<str, _>((lower, Bound::Unbounded))
                .filter(|(_, cq)| cq.msgs.values().any(|m| m.pending(now_ms)))
                .take(limit)
                .map(|(c, _)| c.clone())
                .collect())
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
            // One prune at a time: the entries it read at the front of the pruning order are
            // still there when it drops them (enqueues only push at the back).
            let _p = inner.prune_lock.lock();
            inner.queues.lock().sort_dedup_if_stepped(std::time::Instant::now());
            // Read first, and the index changed only once the removal is in the queue log (as
            // `ack_leased`, `remove_queue`): a failed append leaves every entry held, counted
            // and pruned by the next call, not records in the log no index entry names.
            // Rounds of a bounded walk each (the entries of a deleted connection are skipped a
            // run at a time, the queues' lock let go between runs), until `max` are pruned or
            // none is due: less than `max` means nothing due is left, as the node's loop reads it.
            let mut pruned = 0;
            let mut newer_cutoff = false;
            while (pruned as usize) < max {
                let read = inner.queues.lock().dedup_due(before_ms, max - pruned as usize);
                if read.is_empty() {
                    break;
                }
                let ids: Vec<MessageId> = read.iter().flatten().copied().collect();
                // Most entries are of queued messages and have no dedup record (removing a key
                // that is not in the queue log writes nothing).
                inner.log_removal(&[], &[], &ids, false)?;
                let mut q = inner.queues.lock();
                pruned += q.drop_dedup(&read);
                newer_cutoff |= before_ms > q.dedup_pruned_before;
                q.dedup_pruned_before = q.dedup_pruned_before.max(before_ms);
            }
            let n = pruned;
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

    async fn queue_log(&self) -> StoreResult<Option<crate::store::QueueLogStats>> {
        // Memory only (the log's segment table, the index's count).
        let log = &self.slot.log;
        let (damaged_records, damaged_segments) = log.damage();
        let space = &self.slot.space;
        // The index's count, under its lock for a moment: at the node's bound on queued
        // messages new ones are refused as under the disk reserve.
        let at_bound = self
            .slot
            .get()
            .is_ok_and(|inner| self.slot.cap.refuses(inner.queues.lock().total));
        Ok(Some(crate::store::QueueLogStats {
            bytes: log.bytes(),
            damaged_records,
            damaged_segments,
            disk_free_bytes: space.free(),
            disk_reserve_bytes: space.reserve(),
            refusing_new_messages: space.refusing() || at_bound,
        }))
    }

    async fn begin_run(&self) -> StoreResult<Option<bool>> {
        // The count is held across the write, so a stop cannot remove the mark before it is set.
        let slot = self.slot.clone();
        self.blocking(move |inner| {
            let mut runs = slot.runs.lock();
            if *runs > 0 {
                *runs += 1;
                return Ok(Some(false));
            }
            let unfinished = inner
                .meta
                .insert(RUNNING_KEY, &[1u8][..])
                .map_err(unavailable)?
                .is_some();
            // Best effort: the wake-all after a crash must run even if the windows could not
            // be reset (a wallet pushed just before the crash then waits for its window).
            if unfinished {
                if let Err(e) = inner.forget_last_pushes() {
                    tracing::warn!("sled: push windows not reset after the unfinished run: {e}");
                }
            }
            inner.meta.flush().map_err(unavailable)?;
            *runs = 1;
            Ok(Some(unfinished))
        })
        .await
    }

    async fn end_run(&self) -> StoreResult<()> {
        let slot = self.slot.clone();
        self.blocking(move |inner| {
            let mut runs = slot.runs.lock();
            *runs = runs.saturating_sub(1);
            if *runs == 0 {
                inner.meta.remove(RUNNING_KEY).map_err(unavailable)?;
                inner.meta.flush().map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn dedup_records(&self) -> StoreResult<u64> {
        Ok(self.slot.get()?.queues.lock().dedup_count)
    }

    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        self.blocking(move |inner| {
            // Read first, removed from the index once the removal is in the queue log (as
            // `ack_leased`).
            let (old, old_dedup) = {
                let q = inner.queues.lock();
                let mut old: Vec<(ConnId, MessageId)> = Vec::new();
                for (conn, cq) in &q.by_conn {
                    for (id, m) in &cq.msgs {
                        if m.received_at_ms < received_before_ms {
                            old.push((conn.clone(), *id));
                        }
                    }
                }
                let mut old_dedup: Vec<(std::sync::Arc<str>, [u8; 32], MessageId)> = Vec::new();
                for (conn, d) in &q.dedup {
                    for (key, (id, at)) in d {
                        if *at < received_before_ms {
                            old_dedup.push((conn.clone(), *key, *id));
                        }
                    }
                }
                (old, old_dedup)
            };
            let ids: Vec<MessageId> = old.iter().map(|(_, id)| *id).collect();
            let dedup_ids: Vec<MessageId> = old_dedup.iter().map(|(_, _, id)| *id).collect();
            inner.log_removal(&[], &ids, &dedup_ids, false)?;
            let removed = {
                let mut guard = inner.queues.lock();
                let q = &mut *guard;
                let removed = old
                    .iter()
                    .filter(|(conn, id)| q.remove_msg(conn, *id).is_some())
                    .count();
                for (conn, key, id) in &old_dedup {
                    let Some(d) = q.dedup.get_mut(&**conn) else { continue };
                    // Only the entry this removal wrote off: not a later copy's.
                    if d.get(key).is_some_and(|(held, _)| held == id) {
                        d.remove(key);
                        q.dedup_count -= 1;
                        if d.is_empty() {
                            q.dedup.remove(&**conn);
                        }
                    }
                }
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
                removed
            };
            let mut a = sled::Batch::default();
            for id in &ids {
                a.remove(&encode_id(*id));
            }
            // After the removal: a count whose message is gone is dropped at the next open.
            inner.attempts.apply_batch(a).map_err(unavailable)?;
            Ok(removed as u64)
        })
        .await
    }

    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.blocking(move |inner| {
            // Read first, removed from the index once the removal is in the queue log (as
            // `ack_leased`).
            let (due, with_dedup) = {
                let q = inner.queues.lock();
                let (mut due, mut with_dedup) = (Vec::new(), Vec::new());
                for ((at, id), conn) in q.expiring.range(..=(now_ms, MessageId::MAX)).take(max) {
                    due.push((*at, *id, conn.clone()));
                    if q.by_conn
                        .get(conn)
                        .and_then(|cq| cq.msgs.get(id))
                        .is_some_and(|m| m.dedup)
                    {
                        with_dedup.push(*id);
                    }
                }
                (due, with_dedup)
            };
            let ids: Vec<MessageId> = due.iter().map(|(_, id, _)| *id).collect();
            let kept = inner.forget_acked(&ids, &with_dedup)?;
            let mut q = inner.queues.lock();
            // As `ack_leased`: records whose entry went while they were written are removed.
            let unheld: Vec<MessageId> = kept
                .iter()
                .filter(|k| !q.holds_dedup(&k.conn, &k.key, k.id))
                .map(|k| k.id)
                .collect();
            let mut removed = 0;
            for (at, id, conn) in due {
                match q.remove_msg(&conn, id) {
                    Some(_) => removed += 1,
                    // Gone meanwhile (its removal took the entry), or an entry with no message:
                    // it must not hold a place at the front for ever.
                    None => {
                        q.expiring.remove(&(at, id));
                    }
                }
            }
            drop(q);
            inner.drop_unheld(&unheld);
            Ok(removed)
        })
        .await
    }

    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>> {
        // Memory only; each queue keeps what finds its oldest without reading all of it.
        let inner = self.slot.get()?;
        let q = inner.queues.lock();
        Ok(q.by_conn.values().filter_map(|cq| cq.oldest_received_ms()).min())
    }

    async fn flush(&self) -> StoreResult<()> {
        self.blocking(|inner| inner.flush_all()).await
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

    async fn push_event(
        &self,
        conn: &str,
        now_ms: i64,
        window_ms: i64,
        claim: NewClaim,
        unless_pushed_since_ms: Option<i64>,
    ) -> StoreResult<PushSlot> {
        check_storable("connection id", conn)?;
        let conn = conn.to_owned();
        self.blocking(move |inner| {
            let slot = {
                let mut w = inner.push_windows.lock();
                let old = w.get(&conn).copied();
                if let (Some(since), Some(p)) = (unless_pushed_since_ms, old) {
                    if p.last_push_ms >= since {
                        return Ok(PushSlot::PushedSince);
                    }
                }
                let state = old.map(|p| (p.last_push_ms, p.trailing_due_ms));
                let ((last_push_ms, trailing_due_ms), due) = super::super::push_window_step(state, now_ms, window_ms);
                // Folded: the claim of a push in flight is not the window's, kept as it is. Now:
                // this push is claimed.
                let (slot, claim, push_id) = match due {
                    Some(due_ms) => (
                        PushSlot::Trailing { due_ms },
                        old.and_then(|p| p.claim),
                        old.map_or(0, |p| p.push_id),
                    ),
                    None => (PushSlot::Now, Some((claim.until_ms, claim.token)), claim.token),
                };
                let new = PushWindow {
                    last_push_ms,
                    trailing_due_ms,
                    claim,
                    push_id,
                };
                // An event folded into a trailing push already scheduled changes nothing: no write.
                let changed = old != Some(new);
                if changed {
                    inner
                        .windows
                        .insert(conn.as_bytes(), &encode_push_window(&new)[..])
                        .map_err(unavailable)?;
                    w.insert(conn, new);
                }
                slot
            };
            // Not flushed here (sled's own flush follows within its interval, a clean stop
            // flushes, and after a crash every wallet with mail is pushed at once): a flush of
            // the whole database per push event would bound the push worker by fsyncs.
            Ok(slot)
        })
        .await
    }

    async fn push_take_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        idle_before_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<PushClaim>> {
        let token = super::super::new_push_claim_token();
        self.blocking(move |inner| {
            let due = {
                let mut w = inner.push_windows.lock();
                // Due: scheduled by the window, or claimed by a caller that never said it was done.
                let mut due: Vec<(i64, ConnId)> = w
                    .iter()
                    .filter_map(|(c, p)| {
                        let at = [p.trailing_due_ms, p.claim.map(|(until, _)| until)]
                            .into_iter()
                            .flatten()
                            .filter(|t| *t <= now_ms)
                            .min()?;
                        Some((at, c.clone()))
                    })
                    .collect();
                due.sort();
                due.truncate(limit);
                // A claim that ran out with no event since is the same push again; a trailing
                // push is a new one.
                let taken: Vec<(ConnId, PushWindow)> = due
                    .iter()
                    .map(|(_, c)| {
                        let p = w[c];
                        let same = p.trailing_due_ms.is_none() && p.claim.is_some_and(|(until, _)| until <= now_ms);
                        let push_id = if same && p.push_id != 0 { p.push_id } else { token };
                        let taken = PushWindow {
                            last_push_ms: now_ms,
                            trailing_due_ms: None,
                            claim: Some((claim_until_ms, token)),
                            push_id,
                        };
                        (c.clone(), taken)
                    })
                    .collect();
                // A window taken now is not idle (it holds a claim).
                let idle: Vec<ConnId> = w
                    .iter()
                    .filter(|(_, p)| {
                        p.trailing_due_ms.is_none() && p.claim.is_none() && p.last_push_ms < idle_before_ms
                    })
                    .map(|(c, _)| c.clone())
                    .collect();
                if !taken.is_empty() || !idle.is_empty() {
                    // One batch, before the memory changes: all of it or nothing.
                    let mut b = sled::Batch::default();
                    for (c, p) in &taken {
                        b.insert(c.as_bytes(), &encode_push_window(p)[..]);
                    }
                    for c in &idle {
                        b.remove(c.as_bytes());
                    }
                    inner.windows.apply_batch(b).map_err(unavailable)?;
                }
                for (c, p) in &taken {
                    w.insert(c.clone(), *p);
                }
                for c in &idle {
                    w.remove(c);
                }
                taken
            };
            // Not flushed (as `push_event`): claims lost in a crash are pushed by the wake-all
            // after it; a flush failing after the claims were taken would lose them until they
            // ran out.
            Ok(due
                .into_iter()
                .map(|(conn, p)| PushClaim {
                    conn,
                    token,
                    push_id: p.push_id,
                })
                .collect())
        })
        .await
    }

    async fn push_done(&self, conn: &str, token: i64, reopen_ms: Option<i64>) -> StoreResult<bool> {
        let conn = conn.to_owned();
        self.blocking(move |inner| {
            let mut w = inner.push_windows.lock();
            let Some(p) = w
                .get(&conn)
                .copied()
                .filter(|p| p.claim.is_some_and(|(_, t)| t == token))
            else {
                return Ok(false);
            };
            let ended = match reopen_ms {
                None => PushWindow { claim: None, ..p },
                Some(r) => PushWindow {
                    claim: None,
                    last_push_ms: p.last_push_ms.saturating_sub(r),
                    trailing_due_ms: p.trailing_due_ms.map(|d| d.min(p.last_push_ms)),
                    ..p
                },
            };
            // Not flushed: an end lost in a crash lets the claim run out and the push go once
            // more, as a node that died before ending it does (sled's own flush follows soon).
            inner
                .windows
                .insert(conn.as_bytes(), &encode_push_window(&ended)[..])
                .map_err(unavailable)?;
            w.insert(conn, ended);
            Ok(true)
        })
        .await
    }

    async fn first_sight(&self, digest: &[u8; 32], now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        let digest = *digest;
        self.blocking(move |inner| {
            let _g = inner.sights_lock.lock();
            let held = match inner.sights.get(digest).map_err(unavailable)? {
                Some(v) => Some(sight_until(&v)?),
                None => None,
            };
            if held.is_some_and(|until| until > now_ms) {
                return Ok(false);
            }
            // Not flushed: a sight lost in a crash lets one replay through in the moment before
            // it (sled's own flush follows within its interval). The due key is written first
            // and the replaced one removed last: a crash between leaves a due key too many
            // (pruned), never a record no due key names (kept for ever).
            inner
                .sights_due
                .insert(sight_due_key(until_ms, &digest), &[][..])
                .map_err(unavailable)?;
            inner
                .sights
                .insert(digest, &until_ms.to_be_bytes()[..])
                .map_err(unavailable)?;
            if let Some(old) = held.filter(|&old| old != until_ms) {
                inner
                    .sights_due
                    .remove(sight_due_key(old, &digest))
                    .map_err(unavailable)?;
            }
            Ok(true)
        })
        .await
    }

    async fn forget_sight(&self, digest: &[u8; 32], until_ms: i64) -> StoreResult<()> {
        let digest = *digest;
        self.blocking(move |inner| {
            let _g = inner.sights_lock.lock();
            let Some(v) = inner.sights.get(digest).map_err(unavailable)? else {
                return Ok(());
            };
            if sight_until(&v)? == until_ms {
                inner.sights.remove(digest).map_err(unavailable)?;
                inner
                    .sights_due
                    .remove(sight_due_key(until_ms, &digest))
                    .map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn prune_sights(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        self.blocking(move |inner| {
            // Keys sort by until_ms (big-endian, never negative for a real time): the records
            // that ran out come first. The lock is taken per chunk: sights wait for one chunk,
            // not for the whole prune.
            const CHUNK: usize = 256;
            let mut pruned = 0usize;
            while pruned < max {
                let _g = inner.sights_lock.lock();
                let mut in_chunk = 0;
                for kv in inner.sights_due.iter().take(CHUNK.min(max - pruned)) {
                    let (k, _) = kv.map_err(unavailable)?;
                    let (until, digest) = k.split_at(8);
                    let until = i64::from_be_bytes(until.try_into().map_err(|_| corrupt("sight due key"))?);
                    if until > now_ms {
                        break;
                    }
                    // The record is this one unless a later sight replaced it (it then has its
                    // own due key).
                    if inner
                        .sights
                        .get(digest)
                        .map_err(unavailable)?
                        .is_some_and(|v| v.as_ref() == until.to_be_bytes())
                    {
                        inner.sights.remove(digest).map_err(unavailable)?;
                    }
                    inner.sights_due.remove(&k).map_err(unavailable)?;
                    in_chunk += 1;
                }
                pruned += in_chunk;
                if in_chunk < CHUNK {
                    break;
                }
            }
            Ok(pruned as u64)
        })
        .await
    }

    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        self.delete_connection_if(id, true, |_| true).await
    }

    async fn delete_unmediated(&self, id: &str, created_before_ms: i64) -> StoreResult<bool> {
        let removed = self
            // Not flushed on its own (sled's own flush follows within its period): a removal
            // lost to a crash is made again by the next round, and under a stream of
            // handshakes one sync per removal, under the enqueue lock, would stall forwards.
            .delete_connection_if(id, false, move |c| {
                c.is_some_and(|c| c.mediation == MediationState::None && c.created_at_ms < created_before_ms)
            })
            .await?;
        Ok(removed.connection)
    }

    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>> {
        if !storable(id) {
            return Ok(None);
        }
        let id = id.to_owned();
        let patch = ConnectionPatch {
            mediation: Some(MediationState::Denied),
            updated_at_ms,
            ..ConnectionPatch::default()
        };
        self.blocking(move |inner| {
            // Lock order: batch (enqueues) then meta (connection and key writes). A batch is
            // decided and answered wholly before this, or after it (and finds it denied).
            let _b = inner.batch_lock.lock();
            let _g = inner.meta_lock.lock();
            let Some(mut c) = inner.get_conn(&id)? else {
                return Ok(None);
            };
            patch.apply(&mut c);
            let bytes = serde_json::to_vec(&c).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))?;
            let prefix = conn_prefix(&id);
            let mut keys = Vec::new();
            for kv in inner.conn_keys.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(unavailable)?;
                let key = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| corrupt("key"))?;
                keys.push(key.to_owned());
            }
            let seq = inner.db.generate_id().map_err(unavailable)?.to_be_bytes();
            (&inner.conns, &inner.keys, &inner.conn_keys, &inner.by_thread)
                .transaction(|(conns, rkeys, conn_keys, by_thread)| {
                    stamp_thread(by_thread, &c, &seq)?;
                    for k in &keys {
                        // Only while it still names this connection (it always does under meta_lock).
                        if rkeys.get(k.as_bytes())?.is_some_and(|h| h.as_ref() == id.as_bytes()) {
                            rkeys.remove(k.as_bytes())?;
                        }
                        conn_keys.remove(conn_key_entry(&id, k))?;
                    }
                    conns.insert(id.as_bytes(), bytes.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            inner.note_mediation(&id, Some(c.mediation));
            inner.flush()?;
            Ok(Some(keys))
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
                oldest_received_ms: cq.oldest_received_ms(),
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

/// The `until_ms` of a sight record.
fn sight_until(v: &[u8]) -> StoreResult<i64> {
    Ok(i64::from_be_bytes(v.try_into().map_err(|_| corrupt("sight record"))?))
}

/// A sight's key in `sights_due`: until_ms (big-endian) ++ digest.
fn sight_due_key(until_ms: i64, digest: &[u8; 32]) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&until_ms.to_be_bytes());
    k[8..].copy_from_slice(digest);
    k
}

impl SledStore {
    /// Removes connection `id` and everything of it, when `only` accepts the record as it is
    /// under the locks of the removal ([`Store::delete_connection`], [`Store::delete_unmediated`]);
    /// `flush`: on disk before it answers (its queue's removal always is).
    async fn delete_connection_if(
        &self,
        id: &str,
        flush: bool,
        only: impl FnOnce(Option<&Connection>) -> bool + Send + 'static,
    ) -> StoreResult<Removed> {
        if !storable(id) {
            return Ok(Removed::default());
        }
        let id = id.to_owned();
        self.blocking(move |inner| {
            // Lock order: batch (enqueues) then meta (connection and key writes).
            let _b = inner.batch_lock.lock();
            let _g = inner.meta_lock.lock();
            let old = inner.get_conn(&id)?;
            if !only(old.as_ref()) {
                return Ok(Removed::default());
            }
            let prefix = conn_prefix(&id);
            let mut keys = Vec::new();
            for kv in inner.conn_keys.scan_prefix(&prefix) {
                let (k, _) = kv.map_err(unavailable)?;
                keys.push(k[prefix.len()..].to_vec());
            }
            let had_device = inner.devices.contains_key(id.as_bytes()).map_err(unavailable)?;
            // The queue first (its removal synced): a failure after it leaves the connection with
            // an empty queue, which a retry removes. The other order could leave its messages
            // queued with no connection: never leased again, counted against the limits for ever.
            let (messages, dedup_records) = inner.remove_queue(&id, true)?;
            // Held over the removal: an event cannot write the window back between the two.
            let mut push_windows = inner.push_windows.lock();
            (
                &inner.conns,
                &inner.by_verkey,
                &inner.by_thread,
                &inner.keys,
                &inner.conn_keys,
                &inner.devices,
                &inner.windows,
            )
                .transaction(|(conns, by_verkey, by_thread, rkeys, conn_keys, devices, windows)| {
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
                    windows.remove(id.as_bytes())?;
                    conns.remove(id.as_bytes())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(tx_err)?;
            inner.note_mediation(&id, None);
            push_windows.remove(&id);
            drop(push_windows);
            if flush {
                inner.flush()?;
            }
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
}
