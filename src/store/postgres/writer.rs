//! The write path: writer tasks that commit every waiting enqueue request in one statement.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

use super::{is_transient, lock_key, pg_err, pool_err, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, STATEMENT_TRIES};
use crate::store::{check_storable, EnqueueLimits, Enqueued, NewMessage, StoreError, StoreResult};

pub(super) struct EnqueueReq {
    pub(super) msgs: Vec<NewMessage>,
    pub(super) limits: EnqueueLimits,
    /// Queue each message only while its recipient key routes to its connection.
    pub(super) routed: bool,
    pub(super) reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
}

pub(super) async fn writer_task(pool: Pool, rx: Arc<AsyncMutex<mpsc::Receiver<EnqueueReq>>>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut n = first.msgs.len();
            let mut bytes: usize = first.msgs.iter().map(|m| m.payload.len()).sum();
            let mut batch = vec![first];
            while n < MAX_BATCH_MESSAGES && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        n += r.msgs.len();
                        bytes += r.msgs.iter().map(|m| m.payload.len()).sum::<usize>();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        match commit_batch(&pool, &batch).await {
            Ok(outcomes) => {
                for (req, out) in batch.into_iter().zip(outcomes) {
                    let _ = req.reply.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "postgres enqueue batch failed");
                let msg = e.to_string();
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

/// A whole batch in one statement, `mailroom_enqueue` (migration 8), run outside an explicit
/// transaction: one round trip and one commit for every request waiting. Input the store
/// cannot hold is refused here, alone; the function decides the rest.
async fn commit_batch(pool: &Pool, batch: &[EnqueueReq]) -> StoreResult<Vec<Vec<StoreResult<Enqueued>>>> {
    let mut slots: Vec<Vec<Option<StoreResult<Enqueued>>>> = Vec::with_capacity(batch.len());
    let mut sent: Vec<(&NewMessage, &EnqueueReq)> = Vec::new();
    for req in batch {
        let mut out = Vec::with_capacity(req.msgs.len());
        for m in &req.msgs {
            match check_storable("connection id", &m.connection)
                .and_then(|_| check_storable("recipient key", &m.recipient_key))
            {
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
    let mut conns: Vec<&str> = sent.iter().map(|(m, _)| m.connection.as_str()).collect();
    conns.sort_unstable();
    conns.dedup();
    let mut locks: Vec<i32> = conns.iter().map(|c| lock_key(c)).collect();
    locks.sort_unstable();
    locks.dedup();
    let conn_ix: HashMap<&str, i32> = conns.iter().enumerate().map(|(i, c)| (*c, i as i32 + 1)).collect();
    let mut groups: HashMap<(&str, [u8; 32]), i32> = HashMap::new();
    let n = sent.len();
    let (mut m_conn, mut m_key, mut m_payload, mut m_at) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut m_exp: Vec<Option<i64>> = Vec::with_capacity(n);
    let (mut m_dedup, mut m_group, mut m_window) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut m_max_n, mut m_max_b, mut m_routed) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for (m, req) in &sent {
        let c = m.connection.as_str();
        m_conn.push(conn_ix[c]);
        m_key.push(m.recipient_key.as_str());
        m_payload.push(m.payload.as_slice());
        m_at.push(m.received_at_ms);
        m_exp.push(m.expires_at_ms);
        m_dedup.push(m.dedup_key.map(|k| k.to_vec()));
        m_group.push(match m.dedup_key {
            Some(k) => {
                let next = groups.len() as i32 + 1;
                *groups.entry((c, k)).or_insert(next)
            }
            None => 0,
        });
        m_window.push(req.limits.dedup_window_ms);
        m_max_n.push(clamp(req.limits.max_messages));
        m_max_b.push(clamp(req.limits.max_bytes));
        m_routed.push(req.routed);
    }
    let m_lease_until: Vec<Option<i64>> = sent.iter().map(|(m, _)| m.lease.as_ref().map(|l| l.until_ms)).collect();
    let m_lease_owner: Vec<Option<&str>> = sent
        .iter()
        .map(|(m, _)| m.lease.as_ref().map(|l| l.owner.as_str()))
        .collect();
    let leased = m_lease_until.iter().any(Option::is_some);
    let client = pool.get().await.map_err(pool_err)?;
    let q = client
        .prepare_cached(if leased {
            "SELECT * FROM mailroom_enqueue_leased($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        } else {
            "SELECT * FROM mailroom_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        })
        .await
        .map_err(pg_err)?;
    let all: [&(dyn tokio_postgres::types::ToSql + Sync); 15] = [
        &conns,
        &locks,
        &m_conn,
        &m_key,
        &m_payload,
        &m_at,
        &m_exp,
        &m_dedup,
        &m_group,
        &m_window,
        &m_max_n,
        &m_max_b,
        &m_routed,
        &m_lease_until,
        &m_lease_owner,
    ];
    let params = if leased { &all[..] } else { &all[..13] };
    let mut tries = 1;
    let row = loop {
        match client.query_one(&q, params).await {
            Ok(row) => break row,
            // The statement is its own transaction: aborted, it left nothing behind.
            Err(e) if tries < STATEMENT_TRIES && is_transient(&e) => {
                tracing::warn!(error = %e, "postgres enqueue batch retried");
                tries += 1;
            }
            Err(e) => return Err(pg_err(e)),
        }
    };
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
    let mut outcomes = (0..n).map(|i| {
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
    });
    Ok(fill(slots, &mut outcomes))
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
