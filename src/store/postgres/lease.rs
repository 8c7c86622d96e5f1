//! The live path's leases: one task that leases for every waiting session in one statement.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::{BoundedPool, STATEMENT_TRIES};
use crate::store::{QueuedMessage, StoreError, StoreResult};

pub(super) struct LeaseReq {
    pub(super) conn: String,
    pub(super) key: Option<String>,
    pub(super) max: i64,
    /// The byte budget of [`Store::lease_upto`](crate::store::Store::lease_upto).
    pub(super) max_bytes: i64,
    pub(super) owner: String,
    pub(super) now_ms: i64,
    pub(super) until_ms: i64,
    pub(super) reply: oneshot::Sender<StoreResult<Vec<QueuedMessage>>>,
    /// As an enqueue's ([`super::writer::EnqueueReq`]): still waiting a statement timeout
    /// after it came, it is answered `Unavailable` without being sent.
    pub(super) deadline: tokio::time::Instant,
    /// Its connection's place among the [`MAX_WAITING_PER_CONN`] it may have in the task's
    /// window: held until the request is answered (or dropped), not until its caller stops
    /// waiting, so callers that went away cannot fill the window with their requests.
    pub(super) _turn: Turn,
}

/// Lease requests of one connection that may wait in the lease task (its channel and its
/// window) at once; more wait in the lease gate (`LeaseGate::enter`), in their callers, for
/// one of these to be answered.
///
/// Why: the window holds at most `2 * MAX_LEASE_BATCH` requests and a statement serves one
/// request per connection (two rows of one connection in one statement would lease the same
/// messages). One wallet sending hundreds of delivery-requests at once would otherwise fill
/// the window with its own connection, each statement serving one of them, and every other
/// wallet's lease would wait behind hundreds of statements, past its deadline. The extra
/// requests cannot be answered at once instead: [`Store::lease_upto`] leases at least one
/// message whenever one is pending, so an empty answer would break it; and merging them into
/// one row would mix their budgets, keys and owners. So they keep their place in line (the gate
/// is first come, first served) outside the shared window, and fail `Unavailable` only if their
/// deadline passes there, as they would have in the window.
///
/// [`Store::lease_upto`]: crate::store::Store::lease_upto
pub const MAX_WAITING_PER_CONN: usize = 4;

/// The per-connection bound of lease requests in the lease task ([`MAX_WAITING_PER_CONN`]):
/// one semaphore per connection that has a request in flight, forgotten with its last one.
#[derive(Default)]
pub(super) struct LeaseGate {
    conns: parking_lot::Mutex<HashMap<String, GateSlot>>,
}

struct GateSlot {
    /// Callers holding or waiting for one of `turns`.
    users: usize,
    turns: Arc<Semaphore>,
}

/// A connection's use of the [`LeaseGate`]: while it lives its connection's slot is kept; once
/// it holds a permit, the request it goes with may be handed to the lease task.
pub(super) struct Turn {
    gate: Arc<LeaseGate>,
    conn: String,
    permit: Option<OwnedSemaphorePermit>,
}

impl LeaseGate {
    /// A turn of `conn` to hand a lease request over, waiting (first come, first served) while
    /// the connection already has [`MAX_WAITING_PER_CONN`] requests in the lease task; by
    /// `deadline`, or `Unavailable`.
    pub(super) async fn enter(self: &Arc<Self>, conn: &str, deadline: tokio::time::Instant) -> StoreResult<Turn> {
        let turns = {
            let mut conns = self.conns.lock();
            let slot = conns.entry(conn.to_owned()).or_insert_with(|| GateSlot {
                users: 0,
                turns: Arc::new(Semaphore::new(MAX_WAITING_PER_CONN)),
            });
            slot.users += 1;
            slot.turns.clone()
        };
        let mut turn = Turn {
            gate: self.clone(),
            conn: conn.to_owned(),
            permit: None,
        };
        match tokio::time::timeout_at(deadline, turns.acquire_owned()).await {
            Ok(Ok(p)) => {
                turn.permit = Some(p);
                Ok(turn)
            }
            // The semaphore is never closed.
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Unavailable(format!(
                "postgres: this connection had {MAX_WAITING_PER_CONN} lease requests waiting for the \
                 whole store.statement_timeout_ms (it asks faster than the server answers)"
            ))),
        }
    }

    /// Connections with a request in flight (a test's view).
    #[cfg(test)]
    pub(super) fn conns_in_flight(&self) -> usize {
        self.conns.lock().len()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut conns = self.gate.conns.lock();
        if let Some(slot) = conns.get_mut(&self.conn) {
            slot.users -= 1;
            if slot.users == 0 {
                conns.remove(&self.conn);
            }
        }
    }
}

/// Leases every request waiting (at most [`MAX_LEASE_BATCH`], one per connection: a second
/// request for a connection waits for the next statement) in ONE statement, committed without
/// waiting for its WAL flush: leases are hints (a lease lost in a crash makes its message
/// pending again, delivered again: at-least-once, never a loss), so live delivery to many
/// wallets costs neither a statement nor a flush per wallet. The window holds at most
/// `2 * MAX_LEASE_BATCH` requests, of which at most [`MAX_WAITING_PER_CONN`] of one connection
/// ([`LeaseGate`]): every statement serves at least `2 * MAX_LEASE_BATCH / MAX_WAITING_PER_CONN`
/// connections when that many wait. A request whose caller went away is dropped unserved.
pub(super) async fn lease_task(pool: BoundedPool, mut rx: mpsc::Receiver<LeaseReq>) {
    let mut waiting: std::collections::VecDeque<LeaseReq> = std::collections::VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(r) => waiting.push_back(r),
                None => return,
            }
        }
        while waiting.len() < MAX_LEASE_BATCH * 2 {
            match rx.try_recv() {
                Ok(r) => waiting.push_back(r),
                Err(_) => break,
            }
        }
        let mut batch: Vec<LeaseReq> = Vec::new();
        let mut later = std::collections::VecDeque::new();
        let mut conns: std::collections::HashSet<String> = std::collections::HashSet::new();
        let now = tokio::time::Instant::now();
        while let Some(r) = waiting.pop_front() {
            if r.reply.is_closed() {
                // Its caller went away: leasing for nobody would only hold messages up.
                continue;
            } else if now >= r.deadline {
                let _ = r.reply.send(Err(StoreError::Unavailable(
                    "postgres: the lease queue did not reach this request within store.statement_timeout_ms (the server is slow or unreachable)".into(),
                )));
            } else if batch.len() < MAX_LEASE_BATCH && conns.insert(r.conn.clone()) {
                batch.push(r);
            } else {
                later.push_back(r);
            }
        }
        waiting = later;
        if batch.is_empty() {
            continue;
        }
        match lease_batch(&pool, &batch).await {
            Ok(mut out) => {
                for (req, msgs) in batch.into_iter().zip(out.drain(..)) {
                    let _ = req.reply.send(Ok(msgs));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "postgres lease batch failed");
                let msg = e.to_string();
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
            }
        }
    }
}

/// Most lease requests in one statement.
pub const MAX_LEASE_BATCH: usize = 256;

/// [`Store::pending_stats`]: the two branches a lease reads (migration 9's partial indexes of
/// pending messages and of leases that can run out), counted; `$3` a recipient key or NULL.
pub(crate) const PENDING_STATS_SQL: &str = "SELECT count(*), min(received_at_ms) FROM ( \
       SELECT m.received_at_ms, m.expires_at_ms, m.recipient_key FROM mailroom_messages m \
       WHERE m.conn_id = $1 AND m.lease_until_ms = 0 \
       UNION ALL \
       SELECT m.received_at_ms, m.expires_at_ms, m.recipient_key FROM mailroom_messages m \
       WHERE m.conn_id = $1 AND m.lease_until_ms > 0 AND m.lease_until_ms <= $2) p \
     WHERE (p.expires_at_ms IS NULL OR p.expires_at_ms > $2) AND ($3::text IS NULL OR p.recipient_key = $3)";

/// The statement of [`lease_batch`]: one row per request in `$1..$7` (connection, recipient
/// key or NULL, limit, now, lease deadline, owner, byte budget). `cfg` runs first (every request
/// row joins it); `set_config(.., true)` lasts until this statement's own commit, which then does
/// not wait for the flush. Each request takes its oldest pending messages (index `pending`) and
/// its oldest leases that ran out (index `lease_due`), at most its limit of each, skipping rows
/// another statement holds; of those, oldest first, it leases at most its limit, stopping before
/// the first whose payload (`size`, its stored length) would take the running sum past its
/// budget, but always the first. The running sum is a window function, which PostgreSQL
/// refuses beside `FOR UPDATE` in one query level: the candidates are locked in `cand`, summed
/// in `picked`. A candidate locked and not picked is left as it was (its lock ends with the
/// statement), and no payload is read but those leased (`RETURNING`). Messages leased and not
/// yet due are never read (migration 9).
pub(crate) const LEASE_SQL: &str =
    "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS v), \
             req AS ( \
               SELECT r.* FROM cfg, unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[], \
                 $7::int8[]) WITH ORDINALITY AS r(conn, key, lim, now_ms, until_ms, owner, max_bytes, i)), \
             cand AS ( \
               SELECT p.id, p.size, req.i, req.lim, req.max_bytes, req.until_ms, req.owner \
               FROM req CROSS JOIN LATERAL ( \
                 SELECT m.id, m.size FROM mailroom_messages m \
                 WHERE m.conn_id = req.conn AND m.lease_until_ms = 0 \
                   AND (req.key IS NULL OR m.recipient_key = req.key) \
                   AND (m.expires_at_ms IS NULL OR m.expires_at_ms > req.now_ms) \
                 ORDER BY m.id LIMIT req.lim FOR UPDATE SKIP LOCKED) p \
               UNION ALL \
               SELECT d.id, d.size, req.i, req.lim, req.max_bytes, req.until_ms, req.owner \
               FROM req CROSS JOIN LATERAL ( \
                 SELECT m.id, m.size FROM mailroom_messages m \
                 WHERE m.conn_id = req.conn AND m.lease_until_ms > 0 AND m.lease_until_ms <= req.now_ms \
                   AND (req.key IS NULL OR m.recipient_key = req.key) \
                   AND (m.expires_at_ms IS NULL OR m.expires_at_ms > req.now_ms) \
                 ORDER BY m.id LIMIT req.lim FOR UPDATE SKIP LOCKED) d), \
             picked AS ( \
               SELECT id, i, until_ms, owner FROM ( \
                 SELECT cand.*, row_number() OVER w AS n, sum(cand.size) OVER w AS bytes FROM cand \
                 WINDOW w AS (PARTITION BY i ORDER BY id ROWS UNBOUNDED PRECEDING)) c \
               WHERE n <= lim AND (n = 1 OR bytes <= max_bytes)) \
             UPDATE mailroom_messages m \
             SET lease_until_ms = picked.until_ms, lease_owner = picked.owner, attempts = m.attempts + 1 \
             FROM picked WHERE m.id = picked.id \
             RETURNING picked.i, m.id, m.conn_id, m.recipient_key, m.payload, m.received_at_ms, m.attempts";

/// One statement for `batch`, within the statement timeout (a lease batch on a silent link
/// fails, and the sessions waiting on it try again later, rather than hold their leases up).
async fn lease_batch(pool: &BoundedPool, batch: &[LeaseReq]) -> StoreResult<Vec<Vec<QueuedMessage>>> {
    let c = pool.get().await?;
    let q = c.run(c.prepare_cached(LEASE_SQL)).await?;
    let conns: Vec<&str> = batch.iter().map(|r| r.conn.as_str()).collect();
    let keys: Vec<Option<&str>> = batch.iter().map(|r| r.key.as_deref()).collect();
    let lims: Vec<i64> = batch.iter().map(|r| r.max).collect();
    let nows: Vec<i64> = batch.iter().map(|r| r.now_ms).collect();
    let untils: Vec<i64> = batch.iter().map(|r| r.until_ms).collect();
    let owners: Vec<&str> = batch.iter().map(|r| r.owner.as_str()).collect();
    let budgets: Vec<i64> = batch.iter().map(|r| r.max_bytes).collect();
    let mut tries = 1;
    let rows = loop {
        match c
            .run(c.query(&q, &[&conns, &keys, &lims, &nows, &untils, &owners, &budgets]))
            .await
        {
            Ok(rows) => break rows,
            Err(e) if tries < STATEMENT_TRIES && e.is_transient() => {
                tracing::warn!(error = %e, "postgres lease batch retried");
                tries += 1;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut out: Vec<Vec<QueuedMessage>> = batch.iter().map(|_| Vec::new()).collect();
    for r in rows {
        let i = r.get::<_, i64>(0);
        let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)) else {
            return Err(StoreError::Corrupt(format!("postgres: lease row for request {i}")));
        };
        slot.push(QueuedMessage {
            id: r.get(1),
            connection: r.get(2),
            recipient_key: r.get(3),
            payload: r.get(4),
            received_at_ms: r.get(5),
            attempts: r.get::<_, i32>(6).max(0) as u32,
        });
    }
    for v in &mut out {
        v.sort_unstable_by_key(|m| m.id);
    }
    Ok(out)
}
