//! The PostgreSQL backend: one database shared by every node of a cluster.
//!
//! Tables (all prefixed `mailroom_`, text keys in the "C" collation so ordering is bytewise, as
//! on sled): `meta` (identity), `connections` (+ `connection_verkeys` index), `routing_keys`,
//! `messages` (the queue; lease columns on the row), `dedup` (outlives its message until
//! [`Store::expire`]). Migrations are numbered and applied at open inside a transaction holding
//! an advisory lock, so nodes starting together apply each one once.
//!
//! Concurrency across nodes:
//! - `lease` picks rows with `FOR UPDATE SKIP LOCKED`: two leasers never get the same message.
//! - `enqueue` takes a transaction-scoped advisory lock per connection (in sorted order, so
//!   batches never deadlock) before checking limits and dedup and allocating ids: limits and
//!   dedup hold across nodes, and ids of one connection grow in commit order.
//! - `expire` skips rows locked by others (they go at the next call) and never waits on them.
//! - `ack`, `release`, `release_owner` lock their rows in id order; `update_keys` takes sorted
//!   advisory locks on its keys first. Writers therefore never deadlock each other; a
//!   single-statement write aborted anyway (deadlock victim, serialization failure) is retried.
//!
//! `open` creates the database if it does not exist (via the `postgres` maintenance database).
//!
//! Write path: enqueues go through a channel to [`WRITER_TASKS`] writer tasks; each drains the
//! waiting requests into one transaction with multi-row inserts (`unnest` arrays) and one
//! `COMMIT`, then answers every caller.
//!
//! Must not: block the runtime (everything is async over a deadpool pool).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};
use tokio_postgres::NoTls;

use super::{
    check_connection, check_storable, storable, ConnId, Connection, ConnectionPatch, Device, EnqueueLimits, Enqueued,
    Identity, InvitationUse, KeyUpdate, MessageId, NewMessage, PushSlot, QueueStats, QueueSummary, QueuedMessage,
    Removed, Store, StoreError, StoreResult, TopQueues,
};

/// Most messages in one enqueue transaction.
pub const MAX_BATCH_MESSAGES: usize = 1024;
/// Most payload bytes in one enqueue transaction (a batch always takes one request).
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// Enqueue requests waiting for a writer; callers beyond it wait (backpressure).
pub const WRITER_CHANNEL: usize = 4096;
/// Enqueue transactions in flight at once from one node. One: the channel fills while it
/// commits, and the next batch takes everything (measured: 2 writers halve throughput, as
/// their batches wait on each other's connection locks).
pub const WRITER_TASKS: usize = 1;
/// Tries of a single-statement write aborted as a deadlock victim.
pub const STATEMENT_TRIES: u32 = 3;
/// How long a caller waits for a pooled connection before `Unavailable`.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// First key of every advisory lock this crate takes ("mail").
const LOCK_NS: i32 = 0x6d61_696c;
/// Second key of the migration lock (connection locks use a hash of the id).
const MIGRATION_LOCK: i32 = 0;
/// First key of routing-key locks (second: a hash of the key).
const KEY_LOCK_NS: i32 = LOCK_NS + 1;

pub(crate) const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE mailroom_meta (k text COLLATE "C" PRIMARY KEY, v text NOT NULL);
CREATE SEQUENCE mailroom_connection_writes;
CREATE TABLE mailroom_connections (
    id text COLLATE "C" PRIMARY KEY,
    thread_id text COLLATE "C",
    written bigint NOT NULL,
    data text NOT NULL
);
CREATE INDEX mailroom_connections_thread ON mailroom_connections (thread_id);
CREATE TABLE mailroom_connection_verkeys (
    verkey text COLLATE "C" NOT NULL,
    conn_id text COLLATE "C" NOT NULL REFERENCES mailroom_connections (id) ON DELETE CASCADE,
    PRIMARY KEY (verkey, conn_id)
);
CREATE INDEX mailroom_connection_verkeys_conn ON mailroom_connection_verkeys (conn_id);
CREATE TABLE mailroom_routing_keys (
    key text COLLATE "C" PRIMARY KEY,
    conn_id text COLLATE "C" NOT NULL
);
CREATE INDEX mailroom_routing_keys_conn ON mailroom_routing_keys (conn_id, key);
CREATE SEQUENCE mailroom_message_ids;
CREATE TABLE mailroom_messages (
    id bigint PRIMARY KEY,
    conn_id text COLLATE "C" NOT NULL,
    recipient_key text NOT NULL,
    payload bytea NOT NULL,
    size bigint NOT NULL,
    received_at_ms bigint NOT NULL,
    lease_until_ms bigint NOT NULL DEFAULT 0,
    lease_owner text,
    attempts integer NOT NULL DEFAULT 0
);
CREATE INDEX mailroom_messages_conn ON mailroom_messages (conn_id, id);
CREATE INDEX mailroom_messages_received ON mailroom_messages (received_at_ms);
CREATE INDEX mailroom_messages_owner ON mailroom_messages (lease_owner)
    WHERE lease_owner IS NOT NULL;
CREATE TABLE mailroom_dedup (
    conn_id text COLLATE "C" NOT NULL,
    key bytea NOT NULL,
    msg_id bigint NOT NULL,
    received_at_ms bigint NOT NULL,
    PRIMARY KEY (conn_id, key)
);
CREATE INDEX mailroom_dedup_received ON mailroom_dedup (received_at_ms);
"#,
    ),
    (
        2,
        r#"
CREATE TABLE mailroom_invitations (
    id text COLLATE "C" PRIMARY KEY,
    single_use boolean NOT NULL,
    used boolean NOT NULL DEFAULT false,
    created_at_ms bigint NOT NULL
);
"#,
    ),
    (
        3,
        // Per-connection queue counters kept by statement triggers, so the limit check of an
        // enqueue batch reads one row per connection instead of counting its whole queue.
        // Rows are locked in connection order to keep concurrent statements deadlock-free.
        r#"
CREATE TABLE mailroom_queue_counts (
    conn_id text COLLATE "C" PRIMARY KEY,
    n bigint NOT NULL,
    bytes bigint NOT NULL
);
-- Nodes of an older version may still be writing: hold their inserts and deletes until the
-- triggers exist, so the seeded counters cannot miss a row.
LOCK TABLE mailroom_messages IN SHARE ROW EXCLUSIVE MODE;
INSERT INTO mailroom_queue_counts (conn_id, n, bytes)
    SELECT conn_id, count(*), coalesce(sum(size), 0) FROM mailroom_messages GROUP BY conn_id;
CREATE FUNCTION mailroom_counts_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    FOR r IN SELECT conn_id, count(*) AS n, coalesce(sum(size), 0) AS bytes
             FROM added GROUP BY conn_id ORDER BY conn_id LOOP
        INSERT INTO mailroom_queue_counts (conn_id, n, bytes) VALUES (r.conn_id, r.n, r.bytes)
        ON CONFLICT (conn_id) DO UPDATE
        SET n = mailroom_queue_counts.n + excluded.n, bytes = mailroom_queue_counts.bytes + excluded.bytes;
    END LOOP;
    RETURN NULL;
END $$;
CREATE FUNCTION mailroom_counts_removed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    FOR r IN SELECT conn_id, count(*) AS n, coalesce(sum(size), 0) AS bytes
             FROM removed GROUP BY conn_id ORDER BY conn_id LOOP
        UPDATE mailroom_queue_counts SET n = n - r.n, bytes = bytes - r.bytes WHERE conn_id = r.conn_id;
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER mailroom_messages_added AFTER INSERT ON mailroom_messages
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION mailroom_counts_added();
CREATE TRIGGER mailroom_messages_removed AFTER DELETE ON mailroom_messages
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION mailroom_counts_removed();
"#,
    ),
    (
        4,
        // A peer key names one connection (lookups by authcrypt sender must be unambiguous):
        // keep the most recently written holder of each key, as lookups answered before.
        // Counters seeded by a migration 3 that ran beside older writers may have drifted:
        // recount them with writers held off.
        r#"
LOCK TABLE mailroom_connection_verkeys IN SHARE ROW EXCLUSIVE MODE;
DELETE FROM mailroom_connection_verkeys v USING mailroom_connections c
    WHERE c.id = v.conn_id AND EXISTS (
        SELECT 1 FROM mailroom_connection_verkeys v2
        JOIN mailroom_connections c2 ON c2.id = v2.conn_id
        WHERE v2.verkey = v.verkey AND c2.written > c.written);
ALTER TABLE mailroom_connection_verkeys DROP CONSTRAINT mailroom_connection_verkeys_pkey;
ALTER TABLE mailroom_connection_verkeys ADD PRIMARY KEY (verkey);
LOCK TABLE mailroom_messages IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE mailroom_queue_counts IN EXCLUSIVE MODE;
DELETE FROM mailroom_queue_counts;
INSERT INTO mailroom_queue_counts (conn_id, n, bytes)
    SELECT conn_id, count(*), coalesce(sum(size), 0) FROM mailroom_messages GROUP BY conn_id;
"#,
    ),
    (
        5,
        // Push notifications (issue 7): one device registration per connection, removed with
        // the connection.
        r#"
CREATE TABLE mailroom_devices (
    conn_id text COLLATE "C" PRIMARY KEY REFERENCES mailroom_connections (id) ON DELETE CASCADE,
    service text NOT NULL,
    token text NOT NULL,
    platform text,
    updated_at_ms bigint NOT NULL
);
"#,
    ),
    (
        6,
        // Push windows shared by every node: one push now and one trailing push per window
        // and wallet, cluster-wide; a trailing push survives the node that scheduled it.
        r#"
CREATE TABLE mailroom_push_windows (
    conn_id text COLLATE "C" PRIMARY KEY,
    last_push_ms bigint NOT NULL,
    trailing_due_ms bigint
);
CREATE INDEX mailroom_push_windows_due ON mailroom_push_windows (trailing_due_ms)
    WHERE trailing_due_ms IS NOT NULL;
"#,
    ),
    (
        7,
        // The sender's expiry of a message (DIDComm v2 `expires_time`, ms): never leased after
        // it; `expire_due` deletes expired rows, earliest first. Rows of older writers have none.
        r#"
ALTER TABLE mailroom_messages ADD COLUMN expires_at_ms bigint;
CREATE INDEX mailroom_messages_expires ON mailroom_messages (expires_at_ms)
    WHERE expires_at_ms IS NOT NULL;
"#,
    ),
];

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::Unavailable(format!("postgres: {} ({})", db.message(), db.code().code())),
        None => {
            let mut msg = format!("postgres: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            StoreError::Unavailable(msg)
        }
    }
}

/// Deadlock victim or serialization failure: the statement had no effect and may run again.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
        || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("postgres pool: {e}"))
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("postgres json: {e}"))
}

/// Advisory lock key of a connection or routing key: FNV-1a of it. Collisions only serialise
/// two unrelated writers.
fn lock_key(conn: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in conn.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

struct EnqueueReq {
    msgs: Vec<NewMessage>,
    limits: EnqueueLimits,
    reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
}

/// The PostgreSQL [`Store`].
pub struct PgStore {
    pool: Pool,
    tx: mpsc::Sender<EnqueueReq>,
}

impl PgStore {
    /// Connects with a pool of `pool_size` connections and applies pending migrations.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<PgStore> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("postgres url: {e}")))?;
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(pool_size.max(WRITER_TASKS + 1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))?;
        let client = match pool.get().await {
            Err(deadpool_postgres::PoolError::Backend(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
            {
                create_database(&cfg).await?;
                pool.get().await.map_err(pool_err)?
            }
            r => r.map_err(pool_err)?,
        };
        migrate(client).await?;
        let (tx, rx) = mpsc::channel(WRITER_CHANNEL);
        let rx = Arc::new(AsyncMutex::new(rx));
        for _ in 0..WRITER_TASKS {
            tokio::spawn(writer_task(pool.clone(), rx.clone()));
        }
        Ok(PgStore { pool, tx })
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    /// One statement in its own transaction, tried again (at most [`STATEMENT_TRIES`] times)
    /// when PostgreSQL aborted it as a deadlock victim or serialization failure. Every
    /// multi-row write locks rows in id order, so this is a second line of defence.
    async fn execute_retrying(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<u64> {
        let c = self.client().await?;
        let q = c.prepare_cached(sql).await.map_err(pg_err)?;
        let mut tries = 1;
        loop {
            match c.execute(&q, params).await {
                Ok(n) => return Ok(n),
                Err(e) if tries < STATEMENT_TRIES && is_transient(&e) => {
                    tracing::warn!(error = %e, "postgres statement retried");
                    tries += 1;
                }
                Err(e) => return Err(pg_err(e)),
            }
        }
    }
}

/// Creates the database named in `cfg` through the `postgres` maintenance database, so a node
/// pointed at a fresh server (`.../mailroom`) starts without a manual step. Another node
/// creating it at the same time is fine.
async fn create_database(cfg: &tokio_postgres::Config) -> StoreResult<()> {
    let name = cfg
        .get_dbname()
        .or(cfg.get_user())
        .ok_or_else(|| StoreError::Unavailable("postgres url names no database".into()))?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(NoTls).await.map_err(pg_err)?;
    let conn = tokio::spawn(conn);
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let r = client.batch_execute(&format!("CREATE DATABASE {quoted}")).await;
    drop(client);
    let _ = conn.await;
    match r {
        Ok(()) => {
            tracing::info!(database = %name, "created store database");
            Ok(())
        }
        // Created by someone else meanwhile (a racing CREATE surfaces as a catalog unique
        // violation rather than duplicate_database).
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(pg_err(e)),
    }
}

async fn migrate(mut client: deadpool_postgres::Object) -> StoreResult<()> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS mailroom_schema (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(pg_err)?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM mailroom_schema", &[])
        .await
        .map_err(pg_err)?;
    let current: i32 = row.get(0);
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.batch_execute(sql).await.map_err(pg_err)?;
            tx.execute("INSERT INTO mailroom_schema (version) VALUES ($1)", &[version])
                .await
                .map_err(pg_err)?;
            tracing::info!(version, "applied store migration");
        }
    }
    tx.commit().await.map_err(pg_err)
}

async fn writer_task(pool: Pool, rx: Arc<AsyncMutex<mpsc::Receiver<EnqueueReq>>>) {
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

/// One transaction for a whole batch: lock the connections, read their counts and dedup
/// records, decide every message, insert, commit.
async fn commit_batch(pool: &Pool, batch: &[EnqueueReq]) -> StoreResult<Vec<Vec<StoreResult<Enqueued>>>> {
    let mut conns: Vec<&str> = batch
        .iter()
        .flat_map(|r| r.msgs.iter().map(|m| m.connection.as_str()))
        .filter(|c| storable(c))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    conns.sort_unstable();
    let mut lock_keys: Vec<i32> = conns.iter().map(|c| lock_key(c)).collect();
    lock_keys.sort_unstable();
    lock_keys.dedup();
    let dedup_keys: Vec<Vec<u8>> = batch
        .iter()
        .flat_map(|r| r.msgs.iter().filter_map(|m| m.dedup_key.map(|k| k.to_vec())))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();

    let mut client = pool.get().await.map_err(pool_err)?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let lock = tx
        .prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM (SELECT unnest($2::int4[]) AS k) s")
        .await
        .map_err(pg_err)?;
    tx.execute(&lock, &[&LOCK_NS, &lock_keys]).await.map_err(pg_err)?;

    let counts_q = tx
        .prepare_cached("SELECT conn_id, n, bytes FROM mailroom_queue_counts WHERE conn_id = ANY($1)")
        .await
        .map_err(pg_err)?;
    let dedup_q = tx
        .prepare_cached(
            "SELECT conn_id, key, msg_id, received_at_ms FROM mailroom_dedup \
             WHERE conn_id = ANY($1) AND key = ANY($2)",
        )
        .await
        .map_err(pg_err)?;
    // Both reads go out in one pipeline.
    let count_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&conns];
    let (count_rows, dedup_rows) = tokio::try_join!(tx.query(&counts_q, &count_params), async {
        if dedup_keys.is_empty() {
            Ok(Vec::new())
        } else {
            tx.query(&dedup_q, &[&conns, &dedup_keys]).await
        }
    })
    .map_err(pg_err)?;
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for row in count_rows {
        let c: String = row.get(0);
        let n: i64 = row.get(1);
        let b: i64 = row.get(2);
        counts.insert(c, (n as u64, b as u64));
    }
    let mut dedup: HashMap<(String, [u8; 32]), (MessageId, i64)> = HashMap::new();
    for row in dedup_rows {
        let c: String = row.get(0);
        let k: Vec<u8> = row.get(1);
        let Ok(k) = <[u8; 32]>::try_from(k.as_slice()) else {
            continue;
        };
        dedup.insert((c, k), (row.get(2), row.get(3)));
    }

    // Decide. Accepted messages get a placeholder id (their index), replaced below.
    enum Slot {
        Done(StoreResult<Enqueued>),
        New(usize),
        /// Duplicate of a message accepted earlier in this batch.
        DupOfNew(usize),
    }
    let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(batch.len());
    let mut accepted: Vec<&NewMessage> = Vec::new();
    let mut local_dedup: HashMap<(&str, [u8; 32]), (usize, i64)> = HashMap::new();
    for req in batch {
        let mut out = Vec::with_capacity(req.msgs.len());
        for m in &req.msgs {
            let conn = m.connection.as_str();
            if let Err(e) =
                check_storable("connection id", conn).and_then(|_| check_storable("recipient key", &m.recipient_key))
            {
                out.push(Slot::Done(Err(e)));
                continue;
            }
            if let Some(dk) = m.dedup_key {
                if req.limits.dedup_window_ms > 0 {
                    let start = m.received_at_ms.saturating_sub(req.limits.dedup_window_ms);
                    if let Some((i, at)) = local_dedup.get(&(conn, dk)) {
                        if *at >= start {
                            out.push(Slot::DupOfNew(*i));
                            continue;
                        }
                    } else if let Some((id, at)) = dedup.get(&(conn.to_owned(), dk)) {
                        if *at >= start {
                            out.push(Slot::Done(Ok(Enqueued {
                                id: *id,
                                duplicate: true,
                            })));
                            continue;
                        }
                    }
                }
            }
            let (n, b) = counts.get(conn).copied().unwrap_or((0, 0));
            let size = m.payload.len() as u64;
            if n >= req.limits.max_messages || b.saturating_add(size) > req.limits.max_bytes {
                out.push(Slot::Done(Err(StoreError::QueueFull { pending: n, bytes: b })));
                continue;
            }
            let e = counts.entry(conn.to_owned()).or_insert((0, 0));
            e.0 += 1;
            e.1 += size;
            if let Some(dk) = m.dedup_key {
                local_dedup.insert((conn, dk), (accepted.len(), m.received_at_ms));
            }
            out.push(Slot::New(accepted.len()));
            accepted.push(m);
        }
        slots.push(out);
    }

    let mut ids: Vec<MessageId> = Vec::new();
    if !accepted.is_empty() {
        let ids_q = tx
            .prepare_cached("SELECT nextval('mailroom_message_ids') FROM generate_series(1, $1::int8)")
            .await
            .map_err(pg_err)?;
        ids = tx
            .query(&ids_q, &[&(accepted.len() as i64)])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect();
        ids.sort_unstable();
        let insert = tx
            .prepare_cached(
                "INSERT INTO mailroom_messages \
                   (id, conn_id, recipient_key, payload, size, received_at_ms, expires_at_ms) \
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::bytea[], $5::int8[], $6::int8[], \
                   $7::int8[])",
            )
            .await
            .map_err(pg_err)?;
        let c: Vec<&str> = accepted.iter().map(|m| m.connection.as_str()).collect();
        let rk: Vec<&str> = accepted.iter().map(|m| m.recipient_key.as_str()).collect();
        let p: Vec<&[u8]> = accepted.iter().map(|m| m.payload.as_slice()).collect();
        let sz: Vec<i64> = accepted.iter().map(|m| m.payload.len() as i64).collect();
        let at: Vec<i64> = accepted.iter().map(|m| m.received_at_ms).collect();
        let exp: Vec<Option<i64>> = accepted.iter().map(|m| m.expires_at_ms).collect();
        // Dedup records: the latest copy of each (connection, key) in the batch.
        let mut latest: HashMap<(&str, [u8; 32]), (MessageId, i64)> = HashMap::new();
        for (i, m) in accepted.iter().enumerate() {
            if let Some(dk) = m.dedup_key {
                latest.insert((m.connection.as_str(), dk), (ids[i], m.received_at_ms));
            }
        }
        let upsert = tx
            .prepare_cached(
                "INSERT INTO mailroom_dedup (conn_id, key, msg_id, received_at_ms) \
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[], $4::int8[]) \
                     ON CONFLICT (conn_id, key) DO UPDATE \
                     SET msg_id = excluded.msg_id, received_at_ms = excluded.received_at_ms",
            )
            .await
            .map_err(pg_err)?;
        let mut dc = Vec::new();
        let mut dk = Vec::new();
        let mut di = Vec::new();
        let mut da = Vec::new();
        for ((c, k), (id, at)) in latest {
            dc.push(c);
            dk.push(k.to_vec());
            di.push(id);
            da.push(at);
        }
        // Both writes go out in one pipeline.
        let insert_params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [&ids, &c, &rk, &p, &sz, &at, &exp];
        tokio::try_join!(tx.execute(&insert, &insert_params), async {
            if dc.is_empty() {
                Ok(0)
            } else {
                tx.execute(&upsert, &[&dc, &dk, &di, &da]).await
            }
        })
        .map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)?;

    Ok(slots
        .into_iter()
        .map(|out| {
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
        })
        .collect())
}

fn decode_conn(data: &str) -> StoreResult<Connection> {
    serde_json::from_str(data).map_err(json_err)
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn health(&self) -> StoreResult<()> {
        if self.tx.is_closed() {
            return Err(StoreError::Closed);
        }
        let c = self.client().await?;
        c.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }

    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity> {
        let c = self.client().await?;
        let v = serde_json::to_string(&candidate).map_err(json_err)?;
        // ON CONFLICT waits for a concurrent insert to commit; the SELECT then sees the winner.
        c.execute(
            "INSERT INTO mailroom_meta (k, v) VALUES ('identity', $1) ON CONFLICT (k) DO NOTHING",
            &[&v],
        )
        .await
        .map_err(pg_err)?;
        let row = c
            .query_one("SELECT v FROM mailroom_meta WHERE k = 'identity'", &[])
            .await
            .map_err(pg_err)?;
        serde_json::from_str(row.get::<_, &str>(0)).map_err(json_err)
    }

    async fn put_connection(&self, conn: &Connection) -> StoreResult<()> {
        check_connection(conn)?;
        let data = serde_json::to_string(conn).map_err(json_err)?;
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let upsert = tx
            .prepare_cached(
                "INSERT INTO mailroom_connections (id, thread_id, written, data) \
                 VALUES ($1, $2, nextval('mailroom_connection_writes'), $3) \
                 ON CONFLICT (id) DO UPDATE SET thread_id = excluded.thread_id, \
                 written = excluded.written, data = excluded.data",
            )
            .await
            .map_err(pg_err)?;
        tx.execute(&upsert, &[&conn.id, &conn.thread_id, &data])
            .await
            .map_err(pg_err)?;
        tx.execute(
            "DELETE FROM mailroom_connection_verkeys WHERE conn_id = $1",
            &[&conn.id],
        )
        .await
        .map_err(pg_err)?;
        if !conn.their_verkeys.is_empty() {
            // The key's primary key makes the claim atomic across nodes; a conflicting insert
            // waits for the other transaction and then inserts nothing.
            let mut keys = conn.their_verkeys.clone();
            keys.sort();
            keys.dedup();
            let inserted = tx
                .execute(
                    "INSERT INTO mailroom_connection_verkeys (verkey, conn_id) \
                     SELECT unnest($2::text[]), $1 ON CONFLICT (verkey) DO NOTHING",
                    &[&conn.id, &keys],
                )
                .await
                .map_err(pg_err)?;
            if inserted < keys.len() as u64 {
                let row = tx
                    .query_opt(
                        "SELECT verkey FROM mailroom_connection_verkeys \
                         WHERE verkey = ANY($1) AND conn_id <> $2 LIMIT 1",
                        &[&keys, &conn.id],
                    )
                    .await
                    .map_err(pg_err)?;
                let key = row.map(|r| r.get::<_, String>(0)).unwrap_or_default();
                // Dropping the transaction rolls it back: nothing of this write stays.
                return Err(StoreError::KeyTaken(key));
            }
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn put_invitation(&self, id: &str, single_use: bool, created_at_ms: i64) -> StoreResult<()> {
        check_storable("invitation id", id)?;
        let c = self.client().await?;
        c.execute(
            "INSERT INTO mailroom_invitations (id, single_use, created_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
            &[&id, &single_use, &created_at_ms],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    async fn use_invitation(&self, id: &str) -> StoreResult<InvitationUse> {
        if !storable(id) {
            return Ok(InvitationUse::Unknown);
        }
        let c = self.client().await?;
        // One statement: the claim of a single-use invitation is atomic across nodes.
        let claimed = c
            .execute(
                "UPDATE mailroom_invitations SET used = true WHERE id = $1 AND single_use AND NOT used",
                &[&id],
            )
            .await
            .map_err(pg_err)?;
        if claimed == 1 {
            return Ok(InvitationUse::FirstUse);
        }
        let row = c
            .query_opt("SELECT single_use FROM mailroom_invitations WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?;
        Ok(match row.map(|r| r.get::<_, bool>(0)) {
            None => InvitationUse::Unknown,
            Some(true) => InvitationUse::AlreadyUsed,
            Some(false) => InvitationUse::MultiUse,
        })
    }

    async fn update_connection(&self, id: &str, patch: &ConnectionPatch) -> StoreResult<Option<Connection>> {
        if !storable(id) {
            return Ok(None);
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // Row lock: concurrent patches of one connection apply one after the other.
        let Some(row) = tx
            .query_opt("SELECT data FROM mailroom_connections WHERE id = $1 FOR UPDATE", &[&id])
            .await
            .map_err(pg_err)?
        else {
            return Ok(None);
        };
        let data: String = row.get(0);
        let mut conn: Connection = serde_json::from_str(&data).map_err(json_err)?;
        patch.apply(&mut conn);
        let data = serde_json::to_string(&conn).map_err(json_err)?;
        tx.execute(
            "UPDATE mailroom_connections SET data = $2, written = nextval('mailroom_connection_writes') WHERE id = $1",
            &[&id, &data],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(Some(conn))
    }

    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        if !storable(id) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached("SELECT data FROM mailroom_connections WHERE id = $1")
            .await
            .map_err(pg_err)?;
        match c.query_opt(&q, &[&id]).await.map_err(pg_err)? {
            Some(row) => Ok(Some(decode_conn(row.get(0))?)),
            None => Ok(None),
        }
    }

    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>> {
        if !storable(verkey) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT c.data FROM mailroom_connection_verkeys v \
                 JOIN mailroom_connections c ON c.id = v.conn_id \
                 WHERE v.verkey = $1",
            )
            .await
            .map_err(pg_err)?;
        match c.query_opt(&q, &[&verkey]).await.map_err(pg_err)? {
            Some(row) => Ok(Some(decode_conn(row.get(0))?)),
            None => Ok(None),
        }
    }

    async fn connection_by_thread(&self, thid: &str) -> StoreResult<Option<Connection>> {
        if !storable(thid) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT data FROM mailroom_connections WHERE thread_id = $1 \
                 ORDER BY written DESC LIMIT 1",
            )
            .await
            .map_err(pg_err)?;
        match c.query_opt(&q, &[&thid]).await.map_err(pg_err)? {
            Some(row) => Ok(Some(decode_conn(row.get(0))?)),
            None => Ok(None),
        }
    }

    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>> {
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT data FROM mailroom_connections WHERE ($1::text IS NULL OR id > $1) \
                 ORDER BY id LIMIT $2",
            )
            .await
            .map_err(pg_err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // No stored id holds a NUL: cutting `after` there keeps the same order position.
        let after = after.map(|a| a.split('\0').next().unwrap_or(""));
        c.query(&q, &[&after, &limit])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| decode_conn(r.get(0)))
            .collect()
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
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // Share-lock the connection row: it cannot vanish while its keys change.
        if tx
            .query_opt("SELECT 1 FROM mailroom_connections WHERE id = $1 FOR SHARE", &[&conn])
            .await
            .map_err(pg_err)?
            .is_none()
        {
            return Err(StoreError::NotFound);
        }
        // Lock every key involved, in one global order: two updates touching the same keys in
        // different orders would otherwise deadlock on each other's inserted rows.
        let mut locks: Vec<i32> = add.iter().chain(remove).map(|k| lock_key(k)).collect();
        locks.sort_unstable();
        locks.dedup();
        let lock = tx
            .prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM (SELECT unnest($2::int4[]) AS k) s")
            .await
            .map_err(pg_err)?;
        tx.execute(&lock, &[&KEY_LOCK_NS, &locks]).await.map_err(pg_err)?;
        let ins = tx
            .prepare_cached(
                "INSERT INTO mailroom_routing_keys (key, conn_id) VALUES ($1, $2) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .await
            .map_err(pg_err)?;
        let holder = tx
            .prepare_cached("SELECT conn_id FROM mailroom_routing_keys WHERE key = $1")
            .await
            .map_err(pg_err)?;
        let del = tx
            .prepare_cached("DELETE FROM mailroom_routing_keys WHERE key = $1 AND conn_id = $2")
            .await
            .map_err(pg_err)?;
        let mut out = Vec::with_capacity(add.len() + remove.len());
        for k in add {
            let mut r = KeyUpdate::HeldByOther;
            // The unique key makes this atomic; the loop covers a holder that removed the key
            // between our insert and our read.
            for _ in 0..3 {
                if tx.execute(&ins, &[k, &conn]).await.map_err(pg_err)? == 1 {
                    r = KeyUpdate::Added;
                    break;
                }
                if let Some(row) = tx.query_opt(&holder, &[k]).await.map_err(pg_err)? {
                    r = if row.get::<_, &str>(0) == conn {
                        KeyUpdate::AlreadyAdded
                    } else {
                        KeyUpdate::HeldByOther
                    };
                    break;
                }
            }
            out.push((k.clone(), r));
        }
        for k in remove {
            let n = tx.execute(&del, &[k, &conn]).await.map_err(pg_err)?;
            let r = if n == 1 {
                KeyUpdate::Removed
            } else {
                KeyUpdate::NotFound
            };
            out.push((k.clone(), r));
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(out)
    }

    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        if !storable(conn) {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached("SELECT key FROM mailroom_routing_keys WHERE conn_id = $1 ORDER BY key")
            .await
            .map_err(pg_err)?;
        Ok(c.query(&q, &[&conn])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        if !storable(recipient_key) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached("SELECT conn_id FROM mailroom_routing_keys WHERE key = $1")
            .await
            .map_err(pg_err)?;
        Ok(c.query_opt(&q, &[&recipient_key])
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0)))
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EnqueueReq {
                msgs,
                limits: *limits,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        check_storable("lease owner", owner)?;
        if !storable(conn) || max == 0 {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "WITH picked AS ( \
                   SELECT id FROM mailroom_messages \
                   WHERE conn_id = $1 AND lease_until_ms <= $2 \
                     AND (expires_at_ms IS NULL OR expires_at_ms > $2) \
                   ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE mailroom_messages m \
                 SET lease_until_ms = $4, lease_owner = $5, attempts = m.attempts + 1 \
                 FROM picked WHERE m.id = picked.id \
                 RETURNING m.id, m.recipient_key, m.payload, m.received_at_ms, m.attempts",
            )
            .await
            .map_err(pg_err)?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let mut out: Vec<QueuedMessage> = c
            .query(&q, &[&conn, &now_ms, &max, &until_ms, &owner])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| QueuedMessage {
                id: r.get(0),
                connection: conn.to_owned(),
                recipient_key: r.get(1),
                payload: r.get(2),
                received_at_ms: r.get(3),
                attempts: r.get::<_, i32>(4).max(0) as u32,
            })
            .collect();
        out.sort_unstable_by_key(|m| m.id);
        Ok(out)
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
        check_storable("lease owner", owner)?;
        if !storable(conn) || !storable(recipient_key) || max == 0 {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "WITH picked AS ( \
                   SELECT id FROM mailroom_messages \
                   WHERE conn_id = $1 AND lease_until_ms <= $2 AND recipient_key = $6 \
                     AND (expires_at_ms IS NULL OR expires_at_ms > $2) \
                   ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 UPDATE mailroom_messages m \
                 SET lease_until_ms = $4, lease_owner = $5, attempts = m.attempts + 1 \
                 FROM picked WHERE m.id = picked.id \
                 RETURNING m.id, m.recipient_key, m.payload, m.received_at_ms, m.attempts",
            )
            .await
            .map_err(pg_err)?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let mut out: Vec<QueuedMessage> = c
            .query(&q, &[&conn, &now_ms, &max, &until_ms, &owner, &recipient_key])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| QueuedMessage {
                id: r.get(0),
                connection: conn.to_owned(),
                recipient_key: r.get(1),
                payload: r.get(2),
                received_at_ms: r.get(3),
                attempts: r.get::<_, i32>(4).max(0) as u32,
            })
            .collect();
        out.sort_unstable_by_key(|m| m.id);
        Ok(out)
    }

    async fn queue_stats_for_key(&self, conn: &str, recipient_key: &str, now_ms: i64) -> StoreResult<QueueStats> {
        if !storable(conn) || !storable(recipient_key) {
            return Ok(QueueStats::default());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT count(*) FILTER (WHERE lease_until_ms <= $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                        count(*) FILTER (WHERE lease_until_ms > $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                        coalesce(sum(size), 0)::int8, min(received_at_ms) \
                 FROM mailroom_messages WHERE conn_id = $1 AND recipient_key = $3",
            )
            .await
            .map_err(pg_err)?;
        let r = c
            .query_one(&q, &[&conn, &now_ms, &recipient_key])
            .await
            .map_err(pg_err)?;
        Ok(QueueStats {
            pending: r.get::<_, i64>(0) as u64,
            leased: r.get::<_, i64>(1) as u64,
            bytes: r.get::<_, i64>(2) as u64,
            oldest_received_ms: r.get(3),
        })
    }

    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        if !storable(conn) || ids.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE conn_id = $1 AND id = ANY($2) \
                   ORDER BY id FOR UPDATE) \
                 RETURNING lease_until_ms",
            )
            .await
            .map_err(pg_err)?;
        let mut tries = 1;
        loop {
            match c.query(&q, &[&conn, &ids]).await {
                Ok(rows) => return Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect()),
                Err(e) if tries < STATEMENT_TRIES && is_transient(&e) => {
                    tracing::warn!(error = %e, "postgres statement retried");
                    tries += 1;
                }
                Err(e) => return Err(pg_err(e)),
            }
        }
    }

    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64> {
        if !storable(conn) || !storable(owner) || ids.is_empty() {
            return Ok(0);
        }
        self.execute_retrying(
            "UPDATE mailroom_messages SET lease_until_ms = 0, lease_owner = NULL WHERE id IN ( \
               SELECT id FROM mailroom_messages \
               WHERE conn_id = $1 AND id = ANY($2) AND lease_owner = $3 \
               ORDER BY id FOR UPDATE)",
            &[&conn, &ids, &owner],
        )
        .await
    }

    async fn release_owner(&self, owner: &str) -> StoreResult<u64> {
        if !storable(owner) {
            return Ok(0);
        }
        self.execute_retrying(
            "UPDATE mailroom_messages SET lease_until_ms = 0, lease_owner = NULL WHERE id IN ( \
               SELECT id FROM mailroom_messages WHERE lease_owner = $1 ORDER BY id FOR UPDATE)",
            &[&owner],
        )
        .await
    }

    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats> {
        if !storable(conn) {
            return Ok(QueueStats::default());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT count(*) FILTER (WHERE lease_until_ms <= $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                        count(*) FILTER (WHERE lease_until_ms > $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                        coalesce(sum(size), 0)::int8, min(received_at_ms) \
                 FROM mailroom_messages WHERE conn_id = $1",
            )
            .await
            .map_err(pg_err)?;
        let r = c.query_one(&q, &[&conn, &now_ms]).await.map_err(pg_err)?;
        Ok(QueueStats {
            pending: r.get::<_, i64>(0) as u64,
            leased: r.get::<_, i64>(1) as u64,
            bytes: r.get::<_, i64>(2) as u64,
            oldest_received_ms: r.get(3),
        })
    }

    async fn total_queued(&self) -> StoreResult<u64> {
        let c = self.client().await?;
        let r = c
            .query_one("SELECT count(*) FROM mailroom_messages", &[])
            .await
            .map_err(pg_err)?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>> {
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT DISTINCT conn_id FROM mailroom_messages \
                 WHERE lease_until_ms <= $1 AND conn_id > $2 \
                   AND (expires_at_ms IS NULL OR expires_at_ms > $1) ORDER BY conn_id LIMIT $3",
            )
            .await
            .map_err(pg_err)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.filter(|a| storable(a)).unwrap_or("");
        Ok(c.query(&q, &[&now_ms, &after, &limit])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn pending_among(&self, conns: &[ConnId], now_ms: i64) -> StoreResult<Vec<ConnId>> {
        let conns: Vec<&str> = conns.iter().map(String::as_str).filter(|c| storable(c)).collect();
        if conns.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached(
                "SELECT DISTINCT conn_id FROM mailroom_messages \
                 WHERE conn_id = ANY($1) AND lease_until_ms <= $2 \
                   AND (expires_at_ms IS NULL OR expires_at_ms > $2)",
            )
            .await
            .map_err(pg_err)?;
        Ok(c.query(&q, &[&conns, &now_ms])
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.execute_retrying(
            "DELETE FROM mailroom_dedup WHERE ctid IN ( \
               SELECT ctid FROM mailroom_dedup WHERE received_at_ms < $1 \
               ORDER BY received_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&before_ms, &max],
        )
        .await
    }

    async fn dedup_records(&self) -> StoreResult<u64> {
        let c = self.client().await?;
        let r = c
            .query_one("SELECT count(*) FROM mailroom_dedup", &[])
            .await
            .map_err(pg_err)?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        // Rows locked by a leaser or an ack right now are skipped, never waited on: they
        // expire at the next call.
        let n = self
            .execute_retrying(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE received_at_ms < $1 \
                   ORDER BY id FOR UPDATE SKIP LOCKED)",
                &[&received_before_ms],
            )
            .await?;
        self.execute_retrying(
            "DELETE FROM mailroom_dedup WHERE received_at_ms < $1",
            &[&received_before_ms],
        )
        .await?;
        Ok(n)
    }

    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        // As `expire`: rows locked right now go at the next call.
        self.execute_retrying(
            "DELETE FROM mailroom_messages WHERE id IN ( \
               SELECT id FROM mailroom_messages WHERE expires_at_ms <= $1 \
               ORDER BY expires_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&now_ms, &max],
        )
        .await
    }

    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>> {
        let c = self.client().await?;
        let r = c
            .query_one("SELECT min(received_at_ms) FROM mailroom_messages", &[])
            .await
            .map_err(pg_err)?;
        Ok(r.get::<_, Option<i64>>(0))
    }

    async fn flush(&self) -> StoreResult<()> {
        // Every write commits before it returns.
        Ok(())
    }

    async fn device_of(&self, conn: &str) -> StoreResult<Option<Device>> {
        if !storable(conn) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .prepare_cached("SELECT service, token, platform, updated_at_ms FROM mailroom_devices WHERE conn_id = $1")
            .await
            .map_err(pg_err)?;
        let Some(row) = c.query_opt(&q, &[&conn]).await.map_err(pg_err)? else {
            return Ok(None);
        };
        let service: String = row.get(0);
        let service = serde_json::from_value(serde_json::Value::String(service.clone()))
            .map_err(|_| StoreError::Corrupt(format!("postgres: device service {service:?}")))?;
        Ok(Some(Device {
            service,
            token: row.get(1),
            platform: row.get(2),
            updated_at_ms: row.get(3),
        }))
    }

    async fn set_device(&self, conn: &str, device: Option<&Device>) -> StoreResult<()> {
        check_storable("connection id", conn)?;
        match device {
            Some(d) => {
                check_storable("device token", &d.token)?;
                if let Some(p) = &d.platform {
                    check_storable("device platform", p)?;
                }
                // The foreign key refuses a device of a connection that does not exist.
                let n = self
                    .execute_retrying(
                        "INSERT INTO mailroom_devices (conn_id, service, token, platform, updated_at_ms) \
                         SELECT id, $2, $3, $4, $5 FROM mailroom_connections WHERE id = $1 \
                         ON CONFLICT (conn_id) DO UPDATE SET service = excluded.service, token = excluded.token, \
                         platform = excluded.platform, updated_at_ms = excluded.updated_at_ms",
                        &[&conn, &d.service.as_str(), &d.token, &d.platform, &d.updated_at_ms],
                    )
                    .await?;
                if n == 0 {
                    return Err(StoreError::NotFound);
                }
            }
            None => {
                self.execute_retrying("DELETE FROM mailroom_devices WHERE conn_id = $1", &[&conn])
                    .await?;
                let c = self.client().await?;
                let exists = c
                    .query_opt("SELECT 1 FROM mailroom_connections WHERE id = $1", &[&conn])
                    .await
                    .map_err(pg_err)?;
                if exists.is_none() {
                    return Err(StoreError::NotFound);
                }
            }
        }
        Ok(())
    }

    async fn forget_device_token(&self, conn: &str, token: &str) -> StoreResult<bool> {
        if !storable(conn) || !storable(token) {
            return Ok(false);
        }
        let n = self
            .execute_retrying(
                "DELETE FROM mailroom_devices WHERE conn_id = $1 AND token = $2",
                &[&conn, &token],
            )
            .await?;
        Ok(n > 0)
    }

    async fn push_event(&self, conn: &str, now_ms: i64, window_ms: i64) -> StoreResult<PushSlot> {
        check_storable("connection id", conn)?;
        let c = self.client().await?;
        // push_window_step in one statement: the row lock orders concurrent events.
        let q = c
            .prepare_cached(
                "INSERT INTO mailroom_push_windows AS w (conn_id, last_push_ms, trailing_due_ms) VALUES ($1, $2, NULL) \
                 ON CONFLICT (conn_id) DO UPDATE SET \
                 trailing_due_ms = CASE WHEN $2 < w.last_push_ms + $3 \
                     THEN coalesce(w.trailing_due_ms, w.last_push_ms + $3) ELSE NULL END, \
                 last_push_ms = CASE WHEN $2 < w.last_push_ms + $3 THEN w.last_push_ms ELSE $2 END \
                 RETURNING trailing_due_ms",
            )
            .await
            .map_err(pg_err)?;
        let row = c.query_one(&q, &[&conn, &now_ms, &window_ms]).await.map_err(pg_err)?;
        Ok(match row.get::<_, Option<i64>>(0) {
            Some(due_ms) => PushSlot::Trailing { due_ms },
            None => PushSlot::Now,
        })
    }

    async fn push_take_due(&self, now_ms: i64, idle_before_ms: i64, limit: usize) -> StoreResult<Vec<ConnId>> {
        let c = self.client().await?;
        let take = c
            .prepare_cached(
                "UPDATE mailroom_push_windows SET trailing_due_ms = NULL, last_push_ms = $1 \
                 WHERE conn_id IN (SELECT conn_id FROM mailroom_push_windows \
                     WHERE trailing_due_ms <= $1 ORDER BY trailing_due_ms LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING conn_id",
            )
            .await
            .map_err(pg_err)?;
        let rows = c
            .query(&take, &[&now_ms, &(limit.min(i64::MAX as usize) as i64)])
            .await
            .map_err(pg_err)?;
        c.execute(
            "DELETE FROM mailroom_push_windows WHERE trailing_due_ms IS NULL AND last_push_ms < $1",
            &[&idle_before_ms],
        )
        .await
        .map_err(pg_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        if !storable(id) {
            return Ok(Removed::default());
        }
        let mut c = self.client().await?;
        let mut tries = 1;
        loop {
            match PgStore::delete_connection_once(&mut c, id).await {
                Err(e) if tries < STATEMENT_TRIES && is_transient(&e) => {
                    tracing::warn!(error = %e, "postgres delete_connection retried");
                    tries += 1;
                }
                r => return r.map_err(pg_err),
            }
        }
    }

    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        if !storable(conn) {
            return Ok(0);
        }
        // Rows a leaser or an acknowledgement holds right now are waited for (not skipped):
        // the operator is told every message is gone.
        self.execute_retrying(
            "DELETE FROM mailroom_messages WHERE id IN ( \
               SELECT id FROM mailroom_messages WHERE conn_id = $1 ORDER BY id FOR UPDATE)",
            &[&conn],
        )
        .await
    }

    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        let limit = limit.min(1000) as i64;
        let c = self.client().await?;
        // The counters give the deepest queues without counting rows; the oldest message of
        // each connection comes from the (conn_id, id) index (ids grow with arrival).
        let deepest = c
            .query(
                "SELECT q.conn_id, q.n, (SELECT min(received_at_ms) FROM mailroom_messages m \
                     WHERE m.conn_id = q.conn_id) \
                 FROM mailroom_queue_counts q WHERE q.n > 0 ORDER BY q.n DESC, q.conn_id LIMIT $1",
                &[&limit],
            )
            .await
            .map_err(pg_err)?;
        let oldest = c
            .query(
                "SELECT o.conn_id, coalesce(q.n, 0), o.at FROM ( \
                     SELECT conn_id, min(received_at_ms) AS at FROM mailroom_messages \
                     GROUP BY conn_id ORDER BY at, conn_id LIMIT $1) o \
                 LEFT JOIN mailroom_queue_counts q ON q.conn_id = o.conn_id ORDER BY o.at, o.conn_id",
                &[&limit],
            )
            .await
            .map_err(pg_err)?;
        let summary = |r: &tokio_postgres::Row| QueueSummary {
            connection: r.get(0),
            depth: r.get::<_, i64>(1).max(0) as u64,
            oldest_received_ms: r.get(2),
        };
        Ok(TopQueues {
            deepest: deepest.iter().map(summary).collect(),
            oldest: oldest.iter().map(summary).collect(),
        })
    }
}

impl PgStore {
    async fn delete_connection_once(
        c: &mut deadpool_postgres::Object,
        id: &str,
    ) -> Result<Removed, tokio_postgres::Error> {
        let tx = c.transaction().await?;
        // The enqueue lock of the connection: no batch can add a message to it meanwhile.
        tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(id)])
            .await?;
        // The row lock: key updates (which share-lock the row) wait, then find no connection.
        let conn = tx
            .query_opt("SELECT id FROM mailroom_connections WHERE id = $1 FOR UPDATE", &[&id])
            .await?;
        let peer_keys = tx
            .execute("DELETE FROM mailroom_connection_verkeys WHERE conn_id = $1", &[&id])
            .await?;
        let device = tx
            .execute("DELETE FROM mailroom_devices WHERE conn_id = $1", &[&id])
            .await?;
        let routing_keys = tx
            .execute("DELETE FROM mailroom_routing_keys WHERE conn_id = $1", &[&id])
            .await?;
        let messages = tx
            .execute(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE conn_id = $1 ORDER BY id FOR UPDATE)",
                &[&id],
            )
            .await?;
        let dedup_records = tx
            .execute("DELETE FROM mailroom_dedup WHERE conn_id = $1", &[&id])
            .await?;
        tx.execute("DELETE FROM mailroom_queue_counts WHERE conn_id = $1 AND n = 0", &[&id])
            .await?;
        tx.execute("DELETE FROM mailroom_push_windows WHERE conn_id = $1", &[&id])
            .await?;
        let connection = tx
            .execute("DELETE FROM mailroom_connections WHERE id = $1", &[&id])
            .await?;
        tx.commit().await?;
        Ok(Removed {
            connection: conn.is_some() && connection == 1,
            peer_keys,
            routing_keys,
            messages,
            dedup_records,
            device: device == 1,
        })
    }
}
