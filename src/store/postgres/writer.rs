//! The write path: writer tasks that commit every waiting enqueue request in one statement.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

use super::{lock_key, pg_err, BoundedPool, LOCK_NS, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, STATEMENT_TRIES};
use crate::store::{check_message, EnqueueLimits, Enqueued, NewMessage, StoreError, StoreResult};

pub(super) struct EnqueueReq {
    pub(super) msgs: Vec<NewMessage>,
    pub(super) limits: EnqueueLimits,
    /// Queue each message only while its recipient key routes to its connection.
    pub(super) routed: bool,
    pub(super) reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
    /// A statement timeout after it was handed over: still waiting for its turn then, it is
    /// answered `Unavailable` without being sent (it never reached the server: nothing to
    /// deduplicate), so a call waits at most its turn and its own batch.
    pub(super) deadline: tokio::time::Instant,
}

impl EnqueueReq {
    /// Its messages and their payload bytes.
    fn size(&self) -> (usize, usize) {
        (self.msgs.len(), self.msgs.iter().map(|m| m.payload.len()).sum())
    }

    /// Answers `self` if its turn came too late; gives it back otherwise.
    fn in_time(self) -> Option<EnqueueReq> {
        if tokio::time::Instant::now() < self.deadline {
            return Some(self);
        }
        let _ = self.reply.send(Err(StoreError::Unavailable(
            "postgres: the write queue did not reach this forward within store.statement_timeout_ms (the server is slow or unreachable)".into(),
        )));
        None
    }
}

pub(super) async fn writer_task(pool: BoundedPool, rx: Arc<AsyncMutex<mpsc::Receiver<EnqueueReq>>>) {
    // Lock keys found stuck (held by a transaction older than `lock_timeout`), until a batch
    // that holds them finds them free: later batches skip them at once instead of waiting for
    // the lock timeout again.
    let mut stuck: HashSet<i32> = HashSet::new();
    // The request that did not fit in the last batch: the first of the next one.
    let mut carried: Option<EnqueueReq> = None;
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let first = match carried.take().and_then(EnqueueReq::in_time) {
                Some(r) => r,
                None => loop {
                    let Some(r) = rx.recv().await else {
                        return;
                    };
                    if let Some(r) = r.in_time() {
                        break r;
                    }
                },
            };
            gather(first, &mut rx, &mut carried)
        };
        match commit_batch(&pool, &batch, &mut stuck).await {
            Ok(outcomes) => {
                for (req, out) in batch.into_iter().zip(outcomes) {
                    let _ = req.reply.send(Ok(out));
                }
            }
            // The input of one request (a value past one of PostgreSQL's own limits) failed
            // the whole statement: each request alone, so that one sender's bad input is
            // refused to that sender only, and the others are queued.
            Err(StoreError::Invalid(e)) if batch.len() > 1 => {
                tracing::warn!(error = %e, requests = batch.len(), "postgres enqueue batch refused as invalid: each request again alone");
                for req in batch {
                    let out = commit_batch(&pool, std::slice::from_ref(&req), &mut stuck)
                        .await
                        .and_then(|mut o| {
                            o.pop()
                                .ok_or_else(|| StoreError::Corrupt("postgres: outcomes missing".into()))
                        });
                    if let Err(e) = &out {
                        tracing::warn!(error = %e, "postgres enqueue request failed");
                    }
                    let _ = req.reply.send(out);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "postgres enqueue batch failed");
                for req in batch {
                    // Its class kept: an `Invalid` batch is not the server's failure, nor worth a retry.
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The requests of one batch: `first`, then those waiting in `rx` while they fit within
/// [`MAX_BATCH_MESSAGES`] and [`MAX_BATCH_BYTES`] (a request is measured before it joins,
/// so one large forward never takes a batch past them: with `store.max_envelope_bytes` raised,
/// a batch could otherwise near PostgreSQL's 1 GB limit on a parameter). A request that does
/// not fit is left in `carried`, the first of the next batch; one larger than the limits
/// alone is a batch of its own. Requests whose deadline passed are answered on the way.
fn gather(first: EnqueueReq, rx: &mut mpsc::Receiver<EnqueueReq>, carried: &mut Option<EnqueueReq>) -> Vec<EnqueueReq> {
    let mut size = first.size();
    let mut batch = vec![first];
    while size.0 < MAX_BATCH_MESSAGES && size.1 < MAX_BATCH_BYTES {
        let Ok(r) = rx.try_recv() else { break };
        let Some(r) = r.in_time() else { continue };
        let (n, bytes) = r.size();
        if size.0.saturating_add(n) > MAX_BATCH_MESSAGES || size.1.saturating_add(bytes) > MAX_BATCH_BYTES {
            *carried = Some(r);
            break;
        }
        size = (size.0 + n, size.1 + bytes);
        batch.push(r);
    }
    batch
}

/// A whole batch in one statement, `mailroom_enqueue` (migration 8), run outside an explicit
/// transaction: one round trip and one commit for every request waiting. Input the store
/// cannot hold is refused here, alone; the function decides the rest.
///
/// Within the statement timeout (`bounded.rs`). When the server ended the statement's wait for
/// a connection's lock (`lock_timeout`: a session that froze or lost its link holds it), the
/// locks held by others are read and the batch runs again without their connections, whose
/// messages alone are refused (`Unavailable`, 503 upstream): one stuck connection does not
/// stop the forwards to every other one that share its batches, on any node.
async fn commit_batch(
    pool: &BoundedPool,
    batch: &[EnqueueReq],
    stuck: &mut HashSet<i32>,
) -> StoreResult<Vec<Vec<StoreResult<Enqueued>>>> {
    let mut slots: Vec<Vec<Option<StoreResult<Enqueued>>>> = Vec::with_capacity(batch.len());
    let mut sent: Vec<(&NewMessage, &EnqueueReq)> = Vec::new();
    for req in batch {
        let mut out = Vec::with_capacity(req.msgs.len());
        for m in &req.msgs {
            match check_message(m) {
                Err(e) => out.push(Some(Err(e))),
                Ok(()) => {
                    out.push(None);
                    sent.push((m, req));
                }
            }
        }
        slots.push(out);
    }
    if sent.is_empty() {
        return Ok(fill(slots, &mut std::iter::empty()));
    }
    let c = pool.get().await?;
    // Lock keys another session holds past `lock_timeout`: those found stuck by an earlier
    // batch, if they still are; else read once, after the first lock timeout of this batch.
    let mut held: HashSet<i32> = HashSet::new();
    if !stuck.is_empty() {
        let mut ours: Vec<i32> = sent.iter().map(|(m, _)| lock_key(&m.connection)).collect();
        ours.retain(|k| stuck.contains(k));
        ours.sort_unstable();
        ours.dedup();
        if !ours.is_empty() {
            let h = stuck_locks(&c, &ours).await?;
            stuck.retain(|k| !ours.contains(k) || h.contains(k));
            held.extend(h);
        }
    }
    let is_held = |held: &HashSet<i32>, m: &NewMessage| held.contains(&lock_key(&m.connection));
    let mut probed = false;
    let mut tries = 1;
    // Built again only when the probe below takes connections out of the batch.
    let mut args: Option<Args> = None;
    let outcomes = loop {
        let a = match &args {
            Some(a) => a,
            None => {
                let kept: Vec<(&NewMessage, &EnqueueReq)> =
                    sent.iter().copied().filter(|(m, _)| !is_held(&held, m)).collect();
                if kept.is_empty() {
                    break Vec::new();
                }
                args.insert(Args::new(&kept))
            }
        };
        let q = c.run(c.prepare_cached(a.sql())).await?;
        match c.run(c.query_one(&q, &a.params())).await {
            Ok(row) => break a.outcomes(&row)?,
            // The statement is its own transaction: aborted, it left nothing behind.
            Err(e) if tries < STATEMENT_TRIES && e.is_transient() => {
                tracing::warn!(error = %e, "postgres enqueue batch retried");
                tries += 1;
            }
            Err(e) if !probed && e.is_lock_timeout() => {
                probed = true;
                let h = stuck_locks(&c, &a.locks).await?;
                tracing::warn!(
                    error = %e,
                    held = h.len(),
                    "postgres enqueue batch waited too long for a connection's lock: tried again \
                     without the connections whose lock another session holds"
                );
                stuck.extend(h.iter().copied());
                held.extend(h);
                args = None;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut outcomes = outcomes.into_iter();
    let mut all = sent.iter().map(|(m, _)| {
        if is_held(&held, m) {
            Err(StoreError::Unavailable(
                "postgres: another session holds this connection's queue lock (lock_timeout passed)".into(),
            ))
        } else {
            outcomes
                .next()
                .unwrap_or_else(|| Err(StoreError::Corrupt("postgres: outcome missing".into())))
        }
    });
    Ok(fill(slots, &mut all))
}

/// Which of `keys` (connections' enqueue locks) another session holds in a transaction older
/// than `lock_timeout` while not itself waiting for a lock: a session that froze or lost its
/// link (idle in its transaction), or a long operator delete. Another node's batch holds its
/// lower keys while it waits on the stuck one, and any batch holds its keys for milliseconds:
/// counting those would refuse healthy connections with the stuck one.
async fn stuck_locks(c: &super::bounded::Conn, keys: &[i32]) -> StoreResult<Vec<i32>> {
    let rows = c
        .run(c.query(
            "SELECT k FROM unnest($2::int4[]) k WHERE EXISTS ( \
               SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
               WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND l.classid = ($1::int4::int8 & 4294967295)::oid AND l.objid = (k::int8 & 4294967295)::oid \
                 AND l.pid <> pg_backend_pid() \
                 AND a.wait_event_type IS DISTINCT FROM 'Lock' \
                 AND a.xact_start <= now() - current_setting('lock_timeout')::interval)",
            &[&LOCK_NS, &keys],
        ))
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The arguments of `mailroom_enqueue` for some messages of a batch.
struct Args<'a> {
    n: usize,
    leased: bool,
    conns: Vec<&'a str>,
    locks: Vec<i32>,
    m_conn: Vec<i32>,
    m_key: Vec<&'a str>,
    m_payload: Vec<&'a [u8]>,
    m_at: Vec<i64>,
    m_exp: Vec<Option<i64>>,
    m_dedup: Vec<Option<Vec<u8>>>,
    m_group: Vec<i32>,
    m_window: Vec<i64>,
    m_max_n: Vec<i64>,
    m_max_b: Vec<i64>,
    m_routed: Vec<bool>,
    m_lease_until: Vec<Option<i64>>,
    m_lease_owner: Vec<Option<&'a str>>,
}

impl<'a> Args<'a> {
    fn new(sent: &[(&'a NewMessage, &'a EnqueueReq)]) -> Args<'a> {
        let mut conns: Vec<&str> = sent.iter().map(|(m, _)| m.connection.as_str()).collect();
        conns.sort_unstable();
        conns.dedup();
        let mut locks: Vec<i32> = conns.iter().map(|c| lock_key(c)).collect();
        locks.sort_unstable();
        locks.dedup();
        let conn_ix: HashMap<&str, i32> = conns.iter().enumerate().map(|(i, c)| (*c, i as i32 + 1)).collect();
        let mut groups: HashMap<(&str, [u8; 32]), i32> = HashMap::new();
        let n = sent.len();
        let mut a = Args {
            n,
            leased: false,
            conns: Vec::new(),
            locks,
            m_conn: Vec::with_capacity(n),
            m_key: Vec::with_capacity(n),
            m_payload: Vec::with_capacity(n),
            m_at: Vec::with_capacity(n),
            m_exp: Vec::with_capacity(n),
            m_dedup: Vec::with_capacity(n),
            m_group: Vec::with_capacity(n),
            m_window: Vec::with_capacity(n),
            m_max_n: Vec::with_capacity(n),
            m_max_b: Vec::with_capacity(n),
            m_routed: Vec::with_capacity(n),
            m_lease_until: Vec::with_capacity(n),
            m_lease_owner: Vec::with_capacity(n),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (m, req) in sent {
            let c = m.connection.as_str();
            a.m_conn.push(conn_ix[c]);
            a.m_key.push(m.recipient_key.as_str());
            a.m_payload.push(m.payload.as_slice());
            a.m_at.push(m.received_at_ms);
            a.m_exp.push(m.expires_at_ms);
            a.m_dedup.push(m.dedup_key.map(|k| k.to_vec()));
            a.m_group.push(match m.dedup_key {
                Some(k) => {
                    let next = groups.len() as i32 + 1;
                    *groups.entry((c, k)).or_insert(next)
                }
                None => 0,
            });
            a.m_window.push(req.limits.dedup_window_ms);
            a.m_max_n.push(clamp(req.limits.max_messages));
            a.m_max_b.push(clamp(req.limits.max_bytes));
            a.m_routed.push(req.routed);
            a.m_lease_until.push(m.lease.as_ref().map(|l| l.until_ms));
            a.m_lease_owner.push(m.lease.as_ref().map(|l| l.owner.as_str()));
        }
        a.leased = a.m_lease_until.iter().any(Option::is_some);
        a.conns = conns;
        a
    }

    fn sql(&self) -> &'static str {
        if self.leased {
            "SELECT * FROM mailroom_enqueue_leased($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        } else {
            "SELECT * FROM mailroom_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        }
    }

    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        let mut p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &self.conns,
            &self.locks,
            &self.m_conn,
            &self.m_key,
            &self.m_payload,
            &self.m_at,
            &self.m_exp,
            &self.m_dedup,
            &self.m_group,
            &self.m_window,
            &self.m_max_n,
            &self.m_max_b,
            &self.m_routed,
        ];
        if self.leased {
            p.push(&self.m_lease_until);
            p.push(&self.m_lease_owner);
        }
        p
    }

    /// The function's answer: one outcome per message, in input order.
    fn outcomes(&self, row: &tokio_postgres::Row) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        let n = self.n;
        let o_id: Vec<Option<i64>> = row.try_get(0).map_err(pg_err)?;
        let o_outcome: Vec<i16> = row.try_get(1).map_err(pg_err)?;
        let o_n: Vec<Option<i64>> = row.try_get(2).map_err(pg_err)?;
        let o_b: Vec<Option<i64>> = row.try_get(3).map_err(pg_err)?;
        if o_id.len() != n || o_outcome.len() != n || o_n.len() != n || o_b.len() != n {
            return Err(StoreError::Corrupt(format!(
                "postgres: mailroom_enqueue answered {} outcomes for {n} messages",
                o_outcome.len()
            )));
        }
        Ok((0..n)
            .map(|i| {
                let id = o_id[i].unwrap_or(0);
                let c = |v: Option<i64>| v.unwrap_or(0).max(0) as u64;
                match o_outcome[i] {
                    0 => Ok(Enqueued { id, duplicate: false }),
                    1 | 2 => Ok(Enqueued { id, duplicate: true }),
                    3 => Err(StoreError::QueueFull {
                        pending: c(o_n[i]),
                        bytes: c(o_b[i]),
                    }),
                    4 => Err(StoreError::NoRoute),
                    o => Err(StoreError::Corrupt(format!("postgres: mailroom_enqueue outcome {o}"))),
                }
            })
            .collect())
    }
}

/// Puts the function's outcomes, in order, into the slots the Rust checks left open.
fn fill(
    slots: Vec<Vec<Option<StoreResult<Enqueued>>>>,
    outcomes: &mut dyn Iterator<Item = StoreResult<Enqueued>>,
) -> Vec<Vec<StoreResult<Enqueued>>> {
    slots
        .into_iter()
        .map(|out| {
            out.into_iter()
                .map(|s| match s {
                    Some(r) => r,
                    None => outcomes
                        .next()
                        .unwrap_or_else(|| Err(StoreError::Corrupt("postgres: outcome missing".into()))),
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward request of `payload` bytes, answered into the receiver it comes with.
    fn req(payload: usize) -> (EnqueueReq, oneshot::Receiver<StoreResult<Vec<StoreResult<Enqueued>>>>) {
        let (reply, rx) = oneshot::channel();
        let m = NewMessage {
            connection: "c".into(),
            recipient_key: "k".into(),
            payload: vec![0; payload],
            received_at_ms: 0,
            dedup_key: None,
            expires_at_ms: None,
            lease: None,
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
        let r = EnqueueReq {
            msgs: vec![m],
            limits: EnqueueLimits::UNLIMITED,
            routed: false,
            reply,
            deadline,
        };
        (r, rx)
    }

    /// Every batch the writer would take from `sizes` (payload bytes of one-message requests,
    /// all waiting at once), as the payload sizes of each.
    fn batches(sizes: &[usize]) -> Vec<Vec<usize>> {
        let (tx, mut rx) = mpsc::channel(sizes.len().max(1));
        let mut answers = Vec::new();
        for &n in sizes {
            let (r, a) = req(n);
            answers.push(a);
            tx.try_send(r)
                .unwrap_or_else(|_| panic!("the channel holds every request"));
        }
        let mut carried = None;
        let mut out = Vec::new();
        loop {
            let first = match carried.take() {
                Some(r) => r,
                None => match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                },
            };
            let batch = gather(first, &mut rx, &mut carried);
            out.push(batch.iter().map(|r| r.size().1).collect());
        }
        out
    }

    /// About 15 MiB of forwards, then one larger than the rest of the batch's room, then more:
    /// the large one starts the next batch instead of taking this one past
    /// [`MAX_BATCH_BYTES`]; one larger than the limit alone is a batch of its own; nothing is
    /// lost or reordered.
    #[test]
    fn a_batch_never_grows_past_its_byte_limit() {
        const MIB: usize = 1 << 20;
        let mut sizes = vec![MIB; 15];
        sizes.push(3 * MIB);
        sizes.push(MIB);
        sizes.push(MAX_BATCH_BYTES + MIB);
        sizes.push(MIB);
        let got = batches(&sizes);
        for b in &got {
            let bytes: usize = b.iter().sum();
            assert!(
                bytes <= MAX_BATCH_BYTES || b.len() == 1,
                "a batch of {bytes} bytes (limit {MAX_BATCH_BYTES}): {got:?}"
            );
        }
        assert_eq!(got.concat(), sizes, "every request, in order");
        assert_eq!(
            got,
            vec![
                vec![MIB; 15],
                vec![3 * MIB, MIB],
                vec![MAX_BATCH_BYTES + MIB],
                vec![MIB]
            ]
        );
    }

    /// The same bound in messages: a request is counted before it joins.
    #[test]
    fn a_batch_never_grows_past_its_message_limit() {
        let (tx, mut rx) = mpsc::channel(4);
        let (mut a, _a) = req(1);
        a.msgs = vec![a.msgs[0].clone(); MAX_BATCH_MESSAGES - 1];
        let (mut b, _b) = req(1);
        b.msgs = vec![b.msgs[0].clone(); 2];
        tx.try_send(b).unwrap_or_else(|_| panic!("room for one"));
        let mut carried = None;
        let batch = gather(a, &mut rx, &mut carried);
        assert_eq!(batch.len(), 1);
        assert_eq!(carried.map(|r| r.msgs.len()), Some(2));
    }
}
