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
//! waiting requests (at most [`MAX_BATCH_MESSAGES`]) into ONE statement, the server-side
//! function `mailroom_enqueue` (migration 8) called outside an explicit transaction: it takes
//! the connections' advisory locks, reads their counters and dedup records, checks the routes
//! of `enqueue_routed` messages, decides each message in input order, inserts the accepted ones
//! (`unnest` arrays) and their dedup records; the counter trigger runs inside the same
//! statement. One round trip and one commit per batch; every caller is answered after that
//! commit, and a failed batch fails every caller in it.
//!
//! Must not: block the runtime (everything is async over a deadpool pool).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};
use tokio_postgres::NoTls;

use super::{
    check_connection, check_storable, storable, ConnId, Connection, ConnectionPatch, Device, EnqueueLimits, Enqueued,
    Identity, InvitationUse, KeyUpdate, MessageId, NewMessage, PendingStats, PushSlot, QueueStats, QueueSummary,
    QueuedMessage, Removed, Store, StoreError, StoreResult, TopQueues,
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
    (
        8,
        // A whole enqueue batch in one statement (one round trip, one commit): lock the
        // batch's connections, read their counters and dedup records, check the routes asked
        // for, decide each message in input order as `commit_batch` did in Rust, insert the
        // accepted ones and their dedup records. The counters still follow from the insert
        // trigger (older nodes insert without this function). Arguments: the batch's
        // connections (sorted, distinct) and their advisory lock keys (sorted, distinct); per
        // message its connection (index into `conns`, from 1), recipient key, payload,
        // received time, sender's expiry (or NULL), dedup key (or NULL), dedup group (index of its (connection, dedup
        // key) among the batch's, from 1; 0 without a key), limits and whether its recipient
        // key must still route to its connection. Outcomes: 0 queued, 1 duplicate of a stored
        // message, 2 duplicate of a message of this batch, 3 queue full (`o_n`, `o_b`: what
        // the connection held), 4 no route.
        r#"
CREATE FUNCTION mailroom_enqueue(
    conns text[], locks int4[], m_conn int4[], m_key text[], m_payload bytea[], m_at int8[],
    m_exp int8[], m_dedup bytea[], m_group int4[], m_window int8[], m_max_n int8[], m_max_b int8[],
    m_routed boolean[],
    OUT o_id int8[], OUT o_outcome int2[], OUT o_n int8[], OUT o_b int8[])
LANGUAGE plpgsql AS $$
DECLARE
    cnt int := coalesce(array_length(m_conn, 1), 0);
    nc int := coalesce(array_length(conns, 1), 0);
    cn int8[] := array_fill(0::int8, ARRAY[nc]);
    cb int8[] := array_fill(0::int8, ARRAY[nc]);
    d_id int8[] := array_fill(NULL::int8, ARRAY[cnt]);
    d_at int8[] := array_fill(NULL::int8, ARRAY[cnt]);
    g_last int4[] := array_fill(0, ARRAY[coalesce((SELECT max(g) FROM unnest(m_group) g), 0)]);
    r record;
    x int;
    c int;
    g int;
    j int;
    sz int8;
BEGIN
    o_id := array_fill(NULL::int8, ARRAY[cnt]);
    o_outcome := array_fill(-1::int2, ARRAY[cnt]);
    o_n := array_fill(NULL::int8, ARRAY[cnt]);
    o_b := array_fill(NULL::int8, ARRAY[cnt]);
    PERFORM pg_advisory_xact_lock(1835100524, k) FROM unnest(locks) k;
    FOR r IN SELECT q.conn_id, q.n, q.bytes FROM mailroom_queue_counts q WHERE q.conn_id = ANY(conns) LOOP
        j := array_position(conns, r.conn_id);
        cn[j] := r.n;
        cb[j] := r.bytes;
    END LOOP;
    FOR r IN SELECT u.i, d.msg_id, d.received_at_ms
             FROM unnest(m_conn, m_dedup) WITH ORDINALITY u(c, k, i)
             JOIN mailroom_dedup d ON d.conn_id = conns[u.c] AND d.key = u.k
             WHERE u.k IS NOT NULL LOOP
        d_id[r.i] := r.msg_id;
        d_at[r.i] := r.received_at_ms;
    END LOOP;
    FOR r IN SELECT u.i FROM unnest(m_conn, m_key, m_routed) WITH ORDINALITY u(c, k, rt, i)
             WHERE u.rt AND NOT EXISTS (SELECT 1 FROM mailroom_routing_keys rk
                                        WHERE rk.key = u.k AND rk.conn_id = conns[u.c]) LOOP
        o_outcome[r.i] := 4;
    END LOOP;
    FOR x IN 1..cnt LOOP
        CONTINUE WHEN o_outcome[x] = 4;
        c := m_conn[x];
        g := m_group[x];
        IF g > 0 AND m_window[x] > 0 THEN
            j := g_last[g];
            IF j > 0 THEN
                IF m_at[j] >= m_at[x] - m_window[x] THEN
                    o_outcome[x] := 2;
                    o_id[x] := o_id[j];
                    CONTINUE;
                END IF;
            ELSIF d_id[x] IS NOT NULL AND d_at[x] >= m_at[x] - m_window[x] THEN
                o_outcome[x] := 1;
                o_id[x] := d_id[x];
                CONTINUE;
            END IF;
        END IF;
        sz := length(m_payload[x]);
        IF cn[c] >= m_max_n[x] OR sz > m_max_b[x] - cb[c] THEN
            o_outcome[x] := 3;
            o_n[x] := cn[c];
            o_b[x] := cb[c];
            CONTINUE;
        END IF;
        cn[c] := cn[c] + 1;
        cb[c] := cb[c] + sz;
        o_outcome[x] := 0;
        o_id[x] := nextval('mailroom_message_ids');
        IF g > 0 THEN
            g_last[g] := x;
        END IF;
    END LOOP;
    INSERT INTO mailroom_messages (id, conn_id, recipient_key, payload, size, received_at_ms, expires_at_ms)
        SELECT o_id[u.i], conns[u.c], u.k, u.p, length(u.p), u.at, u.exp
        FROM unnest(m_conn, m_key, m_payload, m_at, m_exp) WITH ORDINALITY u(c, k, p, at, exp, i)
        WHERE o_outcome[u.i] = 0;
    -- The latest queued copy of each (connection, dedup key).
    INSERT INTO mailroom_dedup (conn_id, key, msg_id, received_at_ms)
        SELECT conns[m_conn[l]], m_dedup[l], o_id[l], m_at[l] FROM unnest(g_last) l WHERE l > 0
        ON CONFLICT (conn_id, key) DO UPDATE
        SET msg_id = excluded.msg_id, received_at_ms = excluded.received_at_ms;
END $$;
"#,
    ),
    (
        9,
        // A lease reads only what it may take: pending messages (never leased, or released)
        // from `pending`, in id order, and leases that ran out from `lease_due`. Through
        // `(conn_id, id)` alone it read every message the connection held leased (and their
        // dead versions) before the first pending one: with acknowledgements lagging,
        // thousands per lease, and each lease slower than the one before. Built without
        // CONCURRENTLY (migrations run in one transaction): writes to the queue wait for it.
        r#"
CREATE INDEX mailroom_messages_pending ON mailroom_messages (conn_id, id)
    WHERE lease_until_ms = 0;
CREATE INDEX mailroom_messages_lease_due ON mailroom_messages (conn_id, lease_until_ms)
    WHERE lease_until_ms > 0;
"#,
    ),
    (
        10,
        // `mailroom_enqueue` whose messages may be queued leased (`NewMessage::lease`): per
        // message a lease deadline and owner, or NULLs for pending. Same transaction, same
        // round trip; the messages queued with a lease are leased right after their insert.
        // `mailroom_enqueue` stays as it was, for older nodes and batches without a lease.
        r#"
CREATE FUNCTION mailroom_enqueue_leased(
    conns text[], locks int4[], m_conn int4[], m_key text[], m_payload bytea[], m_at int8[],
    m_exp int8[], m_dedup bytea[], m_group int4[], m_window int8[], m_max_n int8[], m_max_b int8[],
    m_routed boolean[], m_lease_until int8[], m_lease_owner text[],
    OUT o_id int8[], OUT o_outcome int2[], OUT o_n int8[], OUT o_b int8[])
LANGUAGE plpgsql AS $$
BEGIN
    SELECT e.o_id, e.o_outcome, e.o_n, e.o_b INTO o_id, o_outcome, o_n, o_b
        FROM mailroom_enqueue(conns, locks, m_conn, m_key, m_payload, m_at, m_exp, m_dedup,
                              m_group, m_window, m_max_n, m_max_b, m_routed) e;
    UPDATE mailroom_messages m
        SET lease_until_ms = u.until_ms, lease_owner = u.owner, attempts = 1
        FROM unnest(o_id, o_outcome, m_lease_until, m_lease_owner) u(id, outcome, until_ms, owner)
        WHERE u.outcome = 0 AND u.until_ms IS NOT NULL AND m.id = u.id;
END $$;
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
    /// Queue each message only while its recipient key routes to its connection.
    routed: bool,
    reply: oneshot::Sender<StoreResult<Vec<StoreResult<Enqueued>>>>,
}

struct LeaseReq {
    conn: String,
    key: Option<String>,
    max: i64,
    owner: String,
    now_ms: i64,
    until_ms: i64,
    reply: oneshot::Sender<StoreResult<Vec<QueuedMessage>>>,
}

/// The PostgreSQL [`Store`].
pub struct PgStore {
    pool: Pool,
    tx: mpsc::Sender<EnqueueReq>,
    lease_tx: mpsc::Sender<LeaseReq>,
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
        let (lease_tx, lease_rx) = mpsc::channel(WRITER_CHANNEL);
        tokio::spawn(lease_task(pool.clone(), lease_rx));
        Ok(PgStore { pool, tx, lease_tx })
    }

    /// Hands messages to the writer task and waits for their batch to commit.
    async fn submit(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
        routed: bool,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(EnqueueReq {
                msgs,
                limits: *limits,
                routed,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// `lease` and `lease_for_key`: hands the request to the lease task, which leases every
    /// request waiting in one statement (see [`lease_task`]).
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
        if !storable(conn) || !recipient_key.map_or(true, storable) || max == 0 {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.lease_tx
            .send(LeaseReq {
                conn: conn.to_owned(),
                key: recipient_key.map(str::to_owned),
                max: i64::try_from(max).unwrap_or(i64::MAX),
                owner: owner.to_owned(),
                now_ms,
                until_ms,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
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

/// Leases every request waiting (at most [`MAX_LEASE_BATCH`], one per connection: a second
/// request for a connection waits for the next statement) in ONE statement, committed without
/// waiting for its WAL flush: leases are hints (a lease lost in a crash makes its message
/// pending again, delivered again: at-least-once, never a loss), so live delivery to many
/// wallets costs neither a statement nor a flush per wallet.
async fn lease_task(pool: Pool, mut rx: mpsc::Receiver<LeaseReq>) {
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
        while let Some(r) = waiting.pop_front() {
            if batch.len() < MAX_LEASE_BATCH && conns.insert(r.conn.clone()) {
                batch.push(r);
            } else {
                later.push_back(r);
            }
        }
        waiting = later;
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

/// The statement of [`lease_batch`]: one row per request in `$1..$6` (connection, recipient
/// key or NULL, limit, now, lease deadline, owner). `cfg` runs first (every request row joins
/// it); `set_config(.., true)` lasts until this statement's own commit, which then does not
/// wait for the flush. Each request takes its oldest pending messages (index `pending`) and its
/// oldest leases that ran out (index `lease_due`), at most its limit of each, skipping rows
/// another statement holds; the oldest `limit` of those are leased. Messages leased and not yet
/// due are never read (migration 9).
pub(crate) const LEASE_SQL: &str =
    "WITH cfg AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true) AS v), \
             req AS ( \
               SELECT r.* FROM cfg, unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::text[]) \
               WITH ORDINALITY AS r(conn, key, lim, now_ms, until_ms, owner, i)), \
             cand AS ( \
               SELECT p.id, req.i, req.lim, req.until_ms, req.owner FROM req CROSS JOIN LATERAL ( \
                 SELECT m.id FROM mailroom_messages m \
                 WHERE m.conn_id = req.conn AND m.lease_until_ms = 0 \
                   AND (req.key IS NULL OR m.recipient_key = req.key) \
                   AND (m.expires_at_ms IS NULL OR m.expires_at_ms > req.now_ms) \
                 ORDER BY m.id LIMIT req.lim FOR UPDATE SKIP LOCKED) p \
               UNION ALL \
               SELECT d.id, req.i, req.lim, req.until_ms, req.owner FROM req CROSS JOIN LATERAL ( \
                 SELECT m.id FROM mailroom_messages m \
                 WHERE m.conn_id = req.conn AND m.lease_until_ms > 0 AND m.lease_until_ms <= req.now_ms \
                   AND (req.key IS NULL OR m.recipient_key = req.key) \
                   AND (m.expires_at_ms IS NULL OR m.expires_at_ms > req.now_ms) \
                 ORDER BY m.id LIMIT req.lim FOR UPDATE SKIP LOCKED) d), \
             picked AS ( \
               SELECT id, i, until_ms, owner FROM ( \
                 SELECT cand.*, row_number() OVER (PARTITION BY i ORDER BY id) AS n FROM cand) c \
               WHERE n <= lim) \
             UPDATE mailroom_messages m \
             SET lease_until_ms = picked.until_ms, lease_owner = picked.owner, attempts = m.attempts + 1 \
             FROM picked WHERE m.id = picked.id \
             RETURNING picked.i, m.id, m.conn_id, m.recipient_key, m.payload, m.received_at_ms, m.attempts";

async fn lease_batch(pool: &Pool, batch: &[LeaseReq]) -> StoreResult<Vec<Vec<QueuedMessage>>> {
    let c = pool.get().await.map_err(pool_err)?;
    let q = c.prepare_cached(LEASE_SQL).await.map_err(pg_err)?;
    let conns: Vec<&str> = batch.iter().map(|r| r.conn.as_str()).collect();
    let keys: Vec<Option<&str>> = batch.iter().map(|r| r.key.as_deref()).collect();
    let lims: Vec<i64> = batch.iter().map(|r| r.max).collect();
    let nows: Vec<i64> = batch.iter().map(|r| r.now_ms).collect();
    let untils: Vec<i64> = batch.iter().map(|r| r.until_ms).collect();
    let owners: Vec<&str> = batch.iter().map(|r| r.owner.as_str()).collect();
    let mut tries = 1;
    let rows = loop {
        match c.query(&q, &[&conns, &keys, &lims, &nows, &untils, &owners]).await {
            Ok(rows) => break rows,
            Err(e) if tries < STATEMENT_TRIES && is_transient(&e) => {
                tracing::warn!(error = %e, "postgres lease batch retried");
                tries += 1;
            }
            Err(e) => return Err(pg_err(e)),
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
        if !storable(conn) || !recipient_key.map_or(true, storable) {
            return Ok(PendingStats::default());
        }
        let c = self.client().await?;
        let q = c.prepare_cached(PENDING_STATS_SQL).await.map_err(pg_err)?;
        let r = c
            .query_one(&q, &[&conn, &now_ms, &recipient_key])
            .await
            .map_err(pg_err)?;
        Ok(PendingStats {
            count: r.get::<_, i64>(0) as u64,
            oldest_received_ms: r.get(1),
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

    async fn release_owners_under(&self, prefix: &str) -> StoreResult<u64> {
        if prefix.is_empty() || !storable(prefix) {
            return Ok(0);
        }
        // `starts_with`, not LIKE: node ids may hold `_`, a LIKE wildcard. The partial index
        // of leased rows bounds the scan to messages with an owner (in flight, or leased once
        // and neither acknowledged nor leased again since: those are pending already).
        self.execute_retrying(
            "UPDATE mailroom_messages SET lease_until_ms = 0, lease_owner = NULL WHERE id IN ( \
               SELECT id FROM mailroom_messages \
               WHERE lease_owner IS NOT NULL AND starts_with(lease_owner, $1) ORDER BY id FOR UPDATE)",
            &[&prefix],
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
                "SELECT \
                 count(*) FILTER (WHERE lease_until_ms <= $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
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
                // Per connection, the first pending message or lease that ran out (the
                // indexes of migration 9): never a count of its whole queue.
                "SELECT DISTINCT c FROM unnest($1::text[]) AS c \
                 WHERE EXISTS (SELECT 1 FROM mailroom_messages m \
                   WHERE m.conn_id = c AND m.lease_until_ms = 0 \
                     AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $2)) \
                 OR EXISTS (SELECT 1 FROM mailroom_messages m \
                   WHERE m.conn_id = c AND m.lease_until_ms > 0 AND m.lease_until_ms <= $2 \
                     AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $2))",
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
