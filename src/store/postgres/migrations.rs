//! The schema: numbered migrations, applied at open under an advisory lock, and the creation
//! of a missing database.

use super::{pg_err, LOCK_NS, MIGRATION_LOCK};
use crate::store::{StoreError, StoreResult};

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
    (
        11,
        // A routed enqueue refuses a connection whose mediation the operator revoked (`Denied`)
        // whatever keys it still holds (outcome 4, no route): a forward that landed between a
        // revocation and the removal of the connection's keys, or after a removal that failed,
        // was queued and answered 2xx, and pickup never hands it out.
        //
        // `mailroom_mediation_denied` reads it from the stored record at enqueue, so every
        // writer keeps it right (older nodes too), existing rows included, with no DDL on
        // `mailroom_connections` (a column added there would rewrite the table under a lock
        // that stalls every node's connection lookups while it waits and runs, in a rolling
        // upgrade). The record is read as text, not as JSON: a NUL in it (a label from the network, written `\u0000`) makes
        // PostgreSQL's JSON types fail, which would fail the write or the whole batch. The
        // record is serde_json's compact `Connection` (no whitespace, fields in declaration
        // order), whose first `"mediation":"` is its own field: every field before it is a
        // string, a number, null or an array of strings, and no JSON string holds `":"`
        // unescaped (a `"` inside one is written `\"`), so nothing in them can look like it.
        //
        // `mailroom_enqueue` is replaced in place, with the same signature: older nodes and
        // `mailroom_enqueue_leased` call it by name. Only its route check changes.
        r#"
CREATE OR REPLACE FUNCTION mailroom_mediation_denied(data text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT substr(data, strpos(data, '"mediation":"'), 20) = '"mediation":"Denied"'
$$;
CREATE OR REPLACE FUNCTION mailroom_enqueue(
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
    -- Read after the connections' locks (a revocation takes the same lock): a key removed, or
    -- a mediation revoked, before them is seen.
    FOR r IN SELECT u.i FROM unnest(m_conn, m_key, m_routed) WITH ORDINALITY u(c, k, rt, i)
             WHERE u.rt AND (NOT EXISTS (SELECT 1 FROM mailroom_routing_keys rk
                                         WHERE rk.key = u.k AND rk.conn_id = conns[u.c])
                             OR EXISTS (SELECT 1 FROM mailroom_connections mc
                                        WHERE mc.id = conns[u.c]
                                          AND mailroom_mediation_denied(mc.data))) LOOP
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
        12,
        // Migration 11's first form (a development build of 2026-12-05 only) added a generated
        // column instead of this function: a database that applied it gets the function too.
        r#"
CREATE OR REPLACE FUNCTION mailroom_mediation_denied(data text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT substr(data, strpos(data, '"mediation":"'), 20) = '"mediation":"Denied"'
$$;
"#,
    ),
    (
        13,
        // A trailing push a node took is claimed until a deadline, apart from the window (an
        // event during the push schedules the next trailing push as before): a claim that
        // runs out without the push being marked done is taken again by any node, so a node
        // that dies or stops mid-push leaves the push to the others. The token names one
        // claim, so that ending it never ends a later claim of another node.
        r#"
ALTER TABLE mailroom_push_windows ADD COLUMN claimed_until_ms bigint, ADD COLUMN claim_token bigint;
CREATE INDEX mailroom_push_windows_claimed ON mailroom_push_windows (claimed_until_ms)
    WHERE claimed_until_ms IS NOT NULL;
"#,
    ),
    (
        14,
        // Leases by deadline, for `reclaim_expired_leases`: the leases that ran out, oldest
        // first, without reading those still running (`lease_due` is per connection, `owner`
        // holds every lease). Built without CONCURRENTLY, as migration 9's.
        r#"
CREATE INDEX mailroom_messages_lease_until ON mailroom_messages (lease_until_ms)
    WHERE lease_until_ms > 0;
"#,
    ),
    (
        15,
        // Authenticated messages seen (their sender and id, hashed), shared by every node: a
        // replayed message is refused on whichever node it is replayed to
        // (`Store::first_sight`); pruned once run out.
        r#"
CREATE TABLE mailroom_sights (digest bytea PRIMARY KEY, until_ms bigint NOT NULL);
CREATE INDEX mailroom_sights_until ON mailroom_sights (until_ms);
"#,
    ),
    (
        16,
        // The push a claim is of (`PushClaim::push_id`): kept when a claim that ran out is taken
        // again with no event since, so the webhook's `event_id` is the same on the retake.
        // `push_claim` is the claim it was written with: a node of an earlier version claims
        // without writing it, and its claim, taken again, is then a push of its own.
        r#"
ALTER TABLE mailroom_push_windows ADD COLUMN push_id bigint, ADD COLUMN push_claim bigint;
UPDATE mailroom_push_windows SET push_id = claim_token, push_claim = claim_token
    WHERE claim_token IS NOT NULL;
"#,
    ),
    (
        17,
        // Idle push windows, for the cleanup every trailing-push poll runs first (once a second
        // per node): without it that DELETE read the whole table, a row per wallet pushed
        // within the idle period, on every poll. Built without CONCURRENTLY, as migration 9's.
        r#"
CREATE INDEX mailroom_push_windows_idle ON mailroom_push_windows (last_push_ms)
    WHERE trailing_due_ms IS NULL AND claimed_until_ms IS NULL;
"#,
    ),
    (
        18,
        // Each queue's oldest message, for the status page's lists (`top_queues`, asked every
        // 10 s): one probe per connection. Ids do not follow receive times (concurrent
        // forwards, nodes' clocks, retries), so the first by id is not the oldest, and a
        // minimum over the queue read every queued message, past the statement timeout on a
        // large queue. Built without CONCURRENTLY, as migration 9's.
        r#"
CREATE INDEX mailroom_messages_conn_received ON mailroom_messages (conn_id, received_at_ms);
"#,
    ),
    (
        19,
        // The key that claimed a single-use invitation: its handshake's retry (the connection
        // not written after the claim, a store failure) claims it again; anyone else is
        // refused. NULL on a claim of an earlier version.
        r#"
ALTER TABLE mailroom_invitations ADD COLUMN claimed_by text;
"#,
    ),
    (
        20,
        // A node's run, marked while it runs (`Store::begin_node_run`, one row per node id)
        // and cleared by its clean stop: a row found at its next start is a run that died
        // (kill -9, OOM, a host lost), whose push events in memory were never written, and the
        // wallets owed a wake-up are woken (`Store::owed_wakes`).
        r#"
CREATE TABLE mailroom_node_runs (
    node_id text COLLATE "C" PRIMARY KEY,
    began_at timestamptz NOT NULL DEFAULT now()
);
"#,
    ),
];

/// Creates the database named in `cfg` through the `postgres` maintenance database, so a node
/// pointed at a fresh server (`.../mailroom`) starts without a manual step. Another node
/// creating it at the same time is fine. Over the store's own TLS (`tls`), as every connection.
pub(super) async fn create_database(cfg: &tokio_postgres::Config, tls: super::tls::PgTls) -> StoreResult<()> {
    let name = cfg
        .get_dbname()
        .or(cfg.get_user())
        .ok_or_else(|| StoreError::Unavailable("postgres url names no database".into()))?
        .to_owned();
    let mut admin = cfg.clone();
    admin.dbname("postgres");
    let (client, conn) = admin.connect(tls).await.map_err(pg_err)?;
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

pub(super) async fn migrate(mut client: deadpool_postgres::Object) -> StoreResult<()> {
    // READ COMMITTED, as every session of the store (`link.rs`), whatever the database's
    // default: the schema version is read after the lock, so a node that waited for another's
    // migrations sees them applied (from a snapshot taken before the lock it applied
    // migration 1 again and failed to start).
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(pg_err)?;
    // Another node applying a migration holds the lock (and a migration's DDL waits on
    // writers) for as long as it takes: the session's `lock_timeout` (`link.rs`) is not for
    // that wait.
    tx.batch_execute("SET LOCAL lock_timeout = 0").await.map_err(pg_err)?;
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

#[cfg(test)]
mod tests {
    use crate::store::{Connection, MediationState};

    /// Migration 11's `mailroom_mediation_denied`, in Rust: the record's first `"mediation":"` reads
    /// `"mediation":"Denied"`.
    fn reads_denied(record: &str) -> bool {
        record
            .find("\"mediation\":\"")
            .is_some_and(|i| record[i..].starts_with("\"mediation\":\"Denied\""))
    }

    /// The layout migration 11 relies on: in a stored connection (serde_json's compact
    /// output), the first `"mediation":"` is the connection's own field, whatever its other
    /// fields hold. Moving `extra` (or any field that can hold an object) before `mediation`
    /// in [`Connection`] breaks it.
    #[test]
    fn the_first_mediation_in_a_connection_record_is_its_own() {
        let lookalike = "\"mediation\":\"Denied\" \0 \\\"mediation\":\"Denied\"";
        for m in [
            MediationState::None,
            MediationState::Requested,
            MediationState::Granted,
            MediationState::Denied,
        ] {
            let c = Connection {
                id: lookalike.into(),
                created_at_ms: 1,
                updated_at_ms: 2,
                state: lookalike.into(),
                protocol: lookalike.into(),
                label: Some(lookalike.into()),
                our_verkey: lookalike.into(),
                our_did: Some(lookalike.into()),
                their_did: Some(lookalike.into()),
                their_verkeys: vec![lookalike.into()],
                their_endpoints: vec![lookalike.into()],
                their_routing_keys: vec![lookalike.into()],
                mediation: m,
                invitation_id: Some(lookalike.into()),
                thread_id: Some(lookalike.into()),
                extra: serde_json::json!({"mediation": "Denied", "x\"mediation": "Denied", "y": lookalike}),
            };
            let record = serde_json::to_string(&c).unwrap();
            assert_eq!(reads_denied(&record), m == MediationState::Denied, "{m:?}: {record}");
        }
    }
}
