//! The [`Store`] trait on PostgreSQL.

use super::bounded::{Conn, Failed};

/// `$once` (a statement's future, made again for each try) run up to [`STATEMENT_TRIES`]
/// times while it fails for a transient reason (a serialization failure, a deadlock, a
/// connection lost); its last answer.
macro_rules! retried {
    ($what:literal, $once:expr) => {{
        let mut tries = 1;
        loop {
            match $once.await {
                Err(e) if tries < STATEMENT_TRIES && e.is_transient() => {
                    tracing::warn!(error = %e, concat!("postgres ", $what, " retried"));
                    tries += 1;
                }
                r => break r,
            }
        }
    }};
}

use super::{decode_conn, json_err, lock_key, PgStore, KEY_LOCK_NS, LOCK_NS, PENDING_STATS_SQL, STATEMENT_TRIES};
use crate::store::{
    check_connection, check_storable, storable, ConnId, Connection, ConnectionPatch, Device, EnqueueLimits, Enqueued,
    Identity, InvitationUse, KeyUpdate, MediationState, MessageId, NewClaim, NewMessage, Owed, OwedPage, PendingStats,
    PushClaim, PushSlot, QueueStats, QueueSummary, QueuedMessage, Removed, Store, StoreError, StoreResult, TopQueues,
};

/// [`Store::top_queues`]'s deepest queues (`$1` of them), from the counters, each with its
/// oldest message: the first row of the connection in the (conn_id, received_at_ms) index
/// (migration 18), read as the first of a range of connection ids that holds one. With an
/// equality the planner may walk the index of every message's receive time instead, filtering
/// on the connection (it does when the statistics find few connections), which reads through
/// every message of the other queues received before this one's oldest.
pub(crate) const TOP_DEEPEST_SQL: &str = "SELECT q.conn_id, q.n, f.at FROM ( \
         SELECT conn_id, n FROM mailroom_queue_counts WHERE n > 0 \
         ORDER BY n DESC, conn_id LIMIT $1) q \
     LEFT JOIN LATERAL (SELECT m.received_at_ms AS at FROM mailroom_messages m \
         WHERE m.conn_id >= q.conn_id AND m.conn_id <= q.conn_id \
         ORDER BY m.conn_id, m.received_at_ms LIMIT 1) f ON true \
     ORDER BY q.n DESC, q.conn_id";

/// [`Store::top_queues`]'s queues whose oldest message is oldest (`$1` of them): one probe of
/// the (conn_id, received_at_ms) index per connection with mail, as [`TOP_DEEPEST_SQL`]'s.
pub(crate) const TOP_OLDEST_SQL: &str = "SELECT q.conn_id, q.n, f.at FROM mailroom_queue_counts q \
     CROSS JOIN LATERAL (SELECT m.received_at_ms AS at FROM mailroom_messages m \
         WHERE m.conn_id >= q.conn_id AND m.conn_id <= q.conn_id \
         ORDER BY m.conn_id, m.received_at_ms LIMIT 1) f \
     WHERE q.n > 0 ORDER BY f.at, q.conn_id LIMIT $1";

/// [`Store::owed_wakes`]: `$2` device registrations after `$1` in id order, each with the
/// receipt of its newest message deliverable at `$3` when its wallet is owed a wake-up (else
/// NULL). One probe of the (conn_id, received_at_ms) index (migration 18) per registration,
/// newest first, stopping at the first deliverable message (past the newest ones leased to a
/// session), and none for a window with a push due or claimed; a bounded statement whatever the
/// queues' depths. The revocation is read only for a wallet otherwise owed.
pub(crate) const OWED_WAKES_SQL: &str = "SELECT d.conn_id, \
         CASE WHEN f.at IS NOT NULL AND (w.last_push_ms IS NULL OR f.at > w.last_push_ms) \
             AND NOT EXISTS (SELECT 1 FROM mailroom_connections c \
                 WHERE c.id = d.conn_id AND mailroom_mediation_denied(c.data)) \
         THEN f.at END \
     FROM (SELECT conn_id FROM mailroom_devices WHERE ($1::text IS NULL OR conn_id > $1) \
         ORDER BY conn_id LIMIT $2) d \
     LEFT JOIN mailroom_push_windows w ON w.conn_id = d.conn_id \
     LEFT JOIN LATERAL (SELECT m.received_at_ms AS at FROM mailroom_messages m \
         WHERE m.conn_id >= d.conn_id AND m.conn_id <= d.conn_id \
             AND w.trailing_due_ms IS NULL AND w.claimed_until_ms IS NULL \
             AND (m.lease_until_ms = 0 OR m.lease_until_ms <= $3) \
             AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $3) \
         ORDER BY m.conn_id DESC, m.received_at_ms DESC LIMIT 1) f ON true \
     ORDER BY d.conn_id";

/// The server's clock plus the skew allowed a node (`$n`, [`max_skew_ms`]), in ms: the latest
/// push a window may record. A node whose clock ran ahead wrote its own time there, and once
/// back every event read the wallet as pushed in the future (its trailing push due that far
/// out): what the windows hold or are given is read and written as at most this.
macro_rules! server_cap {
    ($n:literal) => {
        concat!(
            "(floor(extract(epoch FROM statement_timestamp()) * 1000)::int8 + $",
            $n,
            ")"
        )
    };
}

/// A window's last push as [`server_cap`] bounds it (`w` the row as it was).
macro_rules! last_push {
    ($n:literal) => {
        concat!("LEAST(w.last_push_ms, ", server_cap!($n), ")")
    };
}

/// [`super::MAX_CLOCK_SKEW`] in ms, the parameter of [`server_cap`].
fn max_skew_ms() -> i64 {
    i64::try_from(super::MAX_CLOCK_SKEW.as_millis()).unwrap_or(i64::MAX)
}

/// Rows one statement of [`Store::expire`] deletes, or of [`Store::release_owners_under`]
/// releases, at most.
const EXPIRE_BATCH: i64 = 10_000;

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn health(&self) -> StoreResult<()> {
        // The writer tasks (forwards) or the lease task (live delivery, pickup) ended: the node
        // cannot do its work whatever the server says.
        if self.tx.is_closed() || self.lease_tx.is_closed() {
            return Err(StoreError::Closed);
        }
        // The round trip reads the server's clock: a node whose own is off would misjudge
        // every lease deadline (`clock.rs`).
        self.check_clock().await
    }

    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity> {
        let c = self.client().await?;
        let v = serde_json::to_string(&candidate).map_err(json_err)?;
        // ON CONFLICT waits for a concurrent insert to commit; the SELECT then sees the winner.
        c.run(c.execute(
            "INSERT INTO mailroom_meta (k, v) VALUES ('identity', $1) ON CONFLICT (k) DO NOTHING",
            &[&v],
        ))
        .await?;
        let row = c
            .run(c.query_one("SELECT v FROM mailroom_meta WHERE k = 'identity'", &[]))
            .await?;
        serde_json::from_str(row.get::<_, &str>(0)).map_err(json_err)
    }

    async fn put_connection(&self, conn: &Connection) -> StoreResult<()> {
        check_connection(conn)?;
        let mut c = self.client().await?;
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        // A revocation is final: a record read before it (a DID rotation) written back after
        // it stays denied. The row lock orders this write with `revoke_mediation`'s.
        let denied = b
            .run(tx.query_opt(
                "SELECT mailroom_mediation_denied(data) FROM mailroom_connections WHERE id = $1 FOR UPDATE",
                &[&conn.id],
            ))
            .await?
            .is_some_and(|r| r.get::<_, bool>(0));
        let data = if denied && conn.mediation != MediationState::Denied {
            let mut kept = conn.clone();
            kept.mediation = MediationState::Denied;
            serde_json::to_string(&kept)
        } else {
            serde_json::to_string(conn)
        }
        .map_err(json_err)?;
        let upsert = b
            .run(tx.prepare_cached(
                "INSERT INTO mailroom_connections (id, thread_id, written, data) \
                 VALUES ($1, $2, nextval('mailroom_connection_writes'), $3) \
                 ON CONFLICT (id) DO UPDATE SET thread_id = excluded.thread_id, \
                 written = excluded.written, data = excluded.data",
            ))
            .await?;
        b.run(tx.execute(&upsert, &[&conn.id, &conn.thread_id, &data])).await?;
        b.run(tx.execute(
            "DELETE FROM mailroom_connection_verkeys WHERE conn_id = $1",
            &[&conn.id],
        ))
        .await?;
        if !conn.their_verkeys.is_empty() {
            // The key's primary key makes the claim atomic across nodes; a conflicting insert
            // waits for the other transaction and then inserts nothing.
            let mut keys = conn.their_verkeys.clone();
            keys.sort();
            keys.dedup();
            let inserted = b
                .run(tx.execute(
                    "INSERT INTO mailroom_connection_verkeys (verkey, conn_id) \
                     SELECT unnest($2::text[]), $1 ON CONFLICT (verkey) DO NOTHING",
                    &[&conn.id, &keys],
                ))
                .await?;
            if inserted < keys.len() as u64 {
                let row = b
                    .run(tx.query_opt(
                        "SELECT verkey FROM mailroom_connection_verkeys \
                         WHERE verkey = ANY($1) AND conn_id <> $2 LIMIT 1",
                        &[&keys, &conn.id],
                    ))
                    .await?;
                let key = row.map(|r| r.get::<_, String>(0)).unwrap_or_default();
                // Dropping the transaction rolls it back: nothing of this write stays.
                return Err(StoreError::KeyTaken(key));
            }
        }
        Ok(b.run(tx.commit()).await?)
    }

    async fn put_invitation(&self, id: &str, single_use: bool, created_at_ms: i64) -> StoreResult<()> {
        check_storable("invitation id", id)?;
        let c = self.client().await?;
        c.run(c.execute(
            "INSERT INTO mailroom_invitations (id, single_use, created_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
            &[&id, &single_use, &created_at_ms],
        ))
        .await?;
        Ok(())
    }

    async fn use_invitation(&self, id: &str, claimant: &str) -> StoreResult<InvitationUse> {
        if !storable(id) {
            return Ok(InvitationUse::Unknown);
        }
        let c = self.client().await?;
        // One statement: the claim of a single-use invitation is atomic across nodes; its
        // first claimant's retry claims it again (a claim of an earlier version names none).
        let claimed = c
            .run(c.execute(
                "UPDATE mailroom_invitations SET used = true, claimed_by = $2 \
                 WHERE id = $1 AND single_use AND (NOT used OR claimed_by = $2)",
                &[&id, &claimant],
            ))
            .await?;
        if claimed == 1 {
            return Ok(InvitationUse::FirstUse);
        }
        let row = c
            .run(c.query_opt("SELECT single_use FROM mailroom_invitations WHERE id = $1", &[&id]))
            .await?;
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
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        // Row lock: concurrent patches of one connection apply one after the other.
        let Some(row) = b
            .run(tx.query_opt("SELECT data FROM mailroom_connections WHERE id = $1 FOR UPDATE", &[&id]))
            .await?
        else {
            return Ok(None);
        };
        let data: String = row.get(0);
        let mut conn: Connection = serde_json::from_str(&data).map_err(json_err)?;
        let before = conn.their_verkeys.clone();
        patch.apply(&mut conn);
        check_connection(&conn)?;
        let data = serde_json::to_string(&conn).map_err(json_err)?;
        b.run(tx.execute(
            "UPDATE mailroom_connections SET data = $2, written = nextval('mailroom_connection_writes') WHERE id = $1",
            &[&id, &data],
        ))
        .await?;
        let gone: Vec<&str> = before
            .iter()
            .filter(|k| !conn.their_verkeys.contains(k))
            .map(String::as_str)
            .collect();
        let added: Vec<&String> = conn.their_verkeys.iter().filter(|k| !before.contains(k)).collect();
        if !gone.is_empty() {
            b.run(tx.execute(
                "DELETE FROM mailroom_connection_verkeys WHERE conn_id = $1 AND verkey = ANY($2)",
                &[&id, &gone],
            ))
            .await?;
        }
        for k in added {
            // As in `put_connection`: the key's primary key makes the claim atomic across
            // nodes; dropping the transaction rolls the whole patch back.
            let n = b
                .run(tx.execute(
                    "INSERT INTO mailroom_connection_verkeys (verkey, conn_id) VALUES ($1, $2) \
                     ON CONFLICT (verkey) DO NOTHING",
                    &[k, &id],
                ))
                .await?;
            if n == 0 {
                return Err(StoreError::KeyTaken(k.clone()));
            }
        }
        b.run(tx.commit()).await?;
        Ok(Some(conn))
    }

    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        if !storable(id) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached("SELECT data FROM mailroom_connections WHERE id = $1"))
            .await?;
        match c.run(c.query_opt(&q, &[&id])).await? {
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
            .run(c.prepare_cached(
                "SELECT c.data FROM mailroom_connection_verkeys v \
                 JOIN mailroom_connections c ON c.id = v.conn_id \
                 WHERE v.verkey = $1",
            ))
            .await?;
        match c.run(c.query_opt(&q, &[&verkey])).await? {
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
            .run(c.prepare_cached(
                "SELECT data FROM mailroom_connections WHERE thread_id = $1 \
                 ORDER BY written DESC LIMIT 1",
            ))
            .await?;
        match c.run(c.query_opt(&q, &[&thid])).await? {
            Some(row) => Ok(Some(decode_conn(row.get(0))?)),
            None => Ok(None),
        }
    }

    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>> {
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached(
                "SELECT data FROM mailroom_connections WHERE ($1::text IS NULL OR id > $1) \
                 ORDER BY id LIMIT $2",
            ))
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // No stored id holds a NUL: cutting `after` there keeps the same order position.
        let after = after.map(|a| a.split('\0').next().unwrap_or(""));
        c.run(c.query(&q, &[&after, &limit]))
            .await?
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
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        // Share-lock the connection row: it cannot vanish while its keys change, and a
        // revocation (`revoke_mediation` or a patch, which lock the row for update) is seen or
        // comes after.
        let Some(row) = b
            .run(tx.query_opt(
                "SELECT data FROM mailroom_connections WHERE id = $1 FOR SHARE",
                &[&conn],
            ))
            .await?
        else {
            return Err(StoreError::NotFound);
        };
        let data: String = row.get(0);
        let revoked = decode_conn(&data)?.mediation == MediationState::Denied;
        // Lock every key involved, in one global order: two updates touching the same keys in
        // different orders would otherwise deadlock on each other's inserted rows.
        let mut locks: Vec<i32> = add.iter().chain(remove).map(|k| lock_key(k)).collect();
        locks.sort_unstable();
        locks.dedup();
        let lock = b
            .run(tx.prepare_cached("SELECT pg_advisory_xact_lock($1, k) FROM (SELECT unnest($2::int4[]) AS k) s"))
            .await?;
        b.run(tx.execute(&lock, &[&KEY_LOCK_NS, &locks])).await?;
        let ins = b
            .run(tx.prepare_cached(
                "INSERT INTO mailroom_routing_keys (key, conn_id) VALUES ($1, $2) \
                 ON CONFLICT (key) DO NOTHING",
            ))
            .await?;
        let holder = b
            .run(tx.prepare_cached("SELECT conn_id FROM mailroom_routing_keys WHERE key = $1"))
            .await?;
        let del = b
            .run(tx.prepare_cached("DELETE FROM mailroom_routing_keys WHERE key = $1 AND conn_id = $2"))
            .await?;
        let mut out = Vec::with_capacity(add.len() + remove.len());
        for k in add {
            if revoked {
                out.push((k.clone(), KeyUpdate::Revoked));
                continue;
            }
            let mut r = KeyUpdate::HeldByOther;
            // The unique key makes this atomic; the loop covers a holder that removed the key
            // between our insert and our read.
            for _ in 0..3 {
                if b.run(tx.execute(&ins, &[k, &conn])).await? == 1 {
                    r = KeyUpdate::Added;
                    break;
                }
                if let Some(row) = b.run(tx.query_opt(&holder, &[k])).await? {
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
            let n = b.run(tx.execute(&del, &[k, &conn])).await?;
            let r = if n == 1 {
                KeyUpdate::Removed
            } else {
                KeyUpdate::NotFound
            };
            out.push((k.clone(), r));
        }
        b.run(tx.commit()).await?;
        Ok(out)
    }

    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>> {
        if !storable(conn) {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached("SELECT key FROM mailroom_routing_keys WHERE conn_id = $1 ORDER BY key"))
            .await?;
        Ok(c.run(c.query(&q, &[&conn])).await?.iter().map(|r| r.get(0)).collect())
    }

    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>> {
        if !storable(recipient_key) {
            return Ok(None);
        }
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached("SELECT conn_id FROM mailroom_routing_keys WHERE key = $1"))
            .await?;
        Ok(c.run(c.query_opt(&q, &[&recipient_key])).await?.map(|r| r.get(0)))
    }

    async fn route_long_forms(&self, short: &str, limit: usize) -> StoreResult<Vec<(String, ConnId)>> {
        if !storable(short) || limit == 0 {
            return Ok(Vec::new());
        }
        // `key` is the primary key, in the "C" collation (byte order): the keys starting with
        // `short:` are the range [`short:`, `short;`), an index range scan (':' + 1 = ';').
        let (from, to) = (format!("{short}:"), format!("{short};"));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached(
                "SELECT rk.key, rk.conn_id FROM mailroom_routing_keys rk \
                 WHERE rk.key >= $1 AND rk.key < $2 \
                 AND NOT EXISTS (SELECT 1 FROM mailroom_connections c \
                                 WHERE c.id = rk.conn_id AND mailroom_mediation_denied(c.data)) \
                 ORDER BY rk.key LIMIT $3",
            ))
            .await?;
        Ok(c.run(c.query(&q, &[&from, &to, &limit]))
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
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
        if !storable(conn) || !recipient_key.map_or(true, storable) {
            return Ok(PendingStats::default());
        }
        let c = self.client().await?;
        let q = c.run(c.prepare_cached(PENDING_STATS_SQL)).await?;
        let r = c.run(c.query_one(&q, &[&conn, &now_ms, &recipient_key])).await?;
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
            .run(c.prepare_cached(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE conn_id = $1 AND id = ANY($2) \
                   ORDER BY id FOR UPDATE) \
                 RETURNING lease_until_ms",
            ))
            .await?;
        let mut tries = 1;
        loop {
            match c.run(c.query(&q, &[&conn, &ids])).await {
                Ok(rows) => return Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect()),
                Err(e) if tries < STATEMENT_TRIES && e.is_transient() => {
                    tracing::warn!(error = %e, "postgres statement retried");
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
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

    async fn reclaim_expired_leases(&self, now_ms: i64, max: usize) -> StoreResult<Vec<crate::store::Reclaimed>> {
        // Deadlines are judged on this node's clock: one ahead of the others would take back
        // their live leases (the messages go out twice). While it is off (logged once as it
        // turns, and `/ready` fails), leases are left to the nodes whose clocks agree with the
        // server's. One round trip per sweep pass.
        match self.check_clock().await {
            Err(StoreError::Unavailable(_)) if self.clock.is_skewed() => return Ok(Vec::new()),
            r => r?,
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let c = self.client().await?;
        // Rows another statement holds (a lease taking them again, an acknowledgement) are
        // skipped: what they leave goes at a later call.
        let q = c
            .run(c.prepare_cached(
                "UPDATE mailroom_messages m SET lease_until_ms = 0, lease_owner = NULL \
                 WHERE m.id IN (SELECT id FROM mailroom_messages \
                     WHERE lease_until_ms > 0 AND lease_until_ms <= $1 \
                       AND (expires_at_ms IS NULL OR expires_at_ms > $1) \
                     ORDER BY lease_until_ms LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING m.conn_id, m.attempts",
            ))
            .await?;
        let mut fewest: std::collections::BTreeMap<ConnId, u32> = std::collections::BTreeMap::new();
        for r in c.run(c.query(&q, &[&now_ms, &max])).await? {
            let attempts = r.get::<_, i32>(1).max(0) as u32;
            let e = fewest.entry(r.get(0)).or_insert(attempts);
            *e = (*e).min(attempts);
        }
        Ok(fewest
            .into_iter()
            .map(|(conn, attempts)| crate::store::Reclaimed { conn, attempts })
            .collect())
    }

    async fn release_owners_under(&self, prefix: &str, until_at_most_ms: i64) -> StoreResult<Vec<ConnId>> {
        if prefix.is_empty() || !storable(prefix) {
            return Ok(Vec::new());
        }
        // `starts_with`, not LIKE: node ids may hold `_`, a LIKE wildcard. The partial index
        // of leased rows bounds the scan to messages with an owner (in flight, or leased once
        // and neither acknowledged nor leased again since: those are pending already). A row
        // leased again while this waits for its lock is read again, deadline included.
        //
        // In batches of [`EXPIRE_BATCH`], in id order from where the last one ended: one
        // statement over every lease of a node that held many (a node serving thousands of
        // wallets, its deliveries lagging) locked them all at once and, past its timeout,
        // rolled all of it back, at every try. A batch that fails after others committed ends
        // the call with what those released (their wallets are woken; the rest run out and are
        // taken back, waking theirs), never with an error that would leave them unwoken.
        let batch = EXPIRE_BATCH;
        let mut after = i64::MIN;
        let mut released: std::collections::BTreeSet<ConnId> = std::collections::BTreeSet::new();
        loop {
            let rows = match self
                .query_retrying_bulk(
                    "WITH r AS (UPDATE mailroom_messages SET lease_until_ms = 0, lease_owner = NULL WHERE id IN ( \
                       SELECT id FROM mailroom_messages \
                       WHERE lease_owner IS NOT NULL AND starts_with(lease_owner, $1) AND lease_until_ms <= $2 \
                         AND id > $3 \
                       ORDER BY id LIMIT $4 FOR UPDATE) \
                     RETURNING id, conn_id) \
                     SELECT conn_id, count(*)::int8, max(id) FROM r GROUP BY conn_id",
                    &[&prefix, &until_at_most_ms, &after, &batch],
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) if !released.is_empty() => {
                    tracing::warn!(
                        wallets = released.len(),
                        "leases released in part (the rest run out and are taken back): {e}"
                    );
                    break;
                }
                Err(e) => return Err(e),
            };
            let mut n = 0;
            for r in &rows {
                n += r.get::<_, i64>(1);
                after = after.max(r.get(2));
                released.insert(r.get(0));
            }
            // Until a batch finds none: one can come back short with more after it (a row
            // leased again while it waited for the lock drops out of the update).
            if n == 0 {
                break;
            }
        }
        Ok(released.into_iter().collect())
    }

    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats> {
        if !storable(conn) {
            return Ok(QueueStats::default());
        }
        let c = self.client().await?;
        let q = c
            .run(c.prepare_cached(
                "SELECT \
                 count(*) FILTER (WHERE lease_until_ms <= $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                 count(*) FILTER (WHERE lease_until_ms > $2 AND NOT coalesce(expires_at_ms <= $2, false)), \
                 coalesce(sum(size), 0)::int8, min(received_at_ms) \
                 FROM mailroom_messages WHERE conn_id = $1",
            ))
            .await?;
        let r = c.run(c.query_one(&q, &[&conn, &now_ms])).await?;
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
            // The per-connection counters the triggers keep (a count over the messages read
            // every queued row, at every /metrics scrape).
            .run(c.query_one("SELECT COALESCE(sum(n), 0)::bigint FROM mailroom_queue_counts", &[]))
            .await?;
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
            .run(c.prepare_cached(
                // The connections with mail, in id order from the counters' primary key, each
                // probed as `pending_among` does (a pending message, or a lease run out): a
                // DISTINCT over the messages read every queued row when fewer than `limit`
                // connections had any, past the statement timeout on a large queue.
                "SELECT q.conn_id FROM mailroom_queue_counts q \
                 WHERE q.conn_id > $2 AND q.n > 0 \
                   AND (EXISTS (SELECT 1 FROM mailroom_messages m \
                          WHERE m.conn_id = q.conn_id AND m.lease_until_ms = 0 \
                            AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $1)) \
                        OR EXISTS (SELECT 1 FROM mailroom_messages m \
                          WHERE m.conn_id = q.conn_id AND m.lease_until_ms > 0 AND m.lease_until_ms <= $1 \
                            AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $1))) \
                 ORDER BY q.conn_id LIMIT $3",
            ))
            .await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.filter(|a| storable(a)).unwrap_or("");
        Ok(c.run(c.query(&q, &[&now_ms, &after, &limit]))
            .await?
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
            .run(c.prepare_cached(
                // Per connection, the first pending message or lease that ran out (the
                // indexes of migration 9): never a count of its whole queue.
                "SELECT DISTINCT c FROM unnest($1::text[]) AS c \
                 WHERE EXISTS (SELECT 1 FROM mailroom_messages m \
                   WHERE m.conn_id = c AND m.lease_until_ms = 0 \
                     AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $2)) \
                 OR EXISTS (SELECT 1 FROM mailroom_messages m \
                   WHERE m.conn_id = c AND m.lease_until_ms > 0 AND m.lease_until_ms <= $2 \
                     AND (m.expires_at_ms IS NULL OR m.expires_at_ms > $2))",
            ))
            .await?;
        Ok(c.run(c.query(&q, &[&conns, &now_ms]))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64> {
        // `before_ms` is this node's clock: one ahead would delete records every node still
        // counts on (a sender's retry queued twice). While it is off the others prune.
        if self.clock.is_skewed() {
            return Ok(0);
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.execute_retrying(
            "DELETE FROM mailroom_dedup WHERE ctid IN ( \
               SELECT ctid FROM mailroom_dedup WHERE received_at_ms < $1 \
               ORDER BY received_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&before_ms, &max],
        )
        .await
    }

    async fn queue_log(&self) -> StoreResult<Option<crate::store::QueueLogStats>> {
        // The queue is in the database, not on this node.
        Ok(None)
    }

    async fn begin_run(&self) -> StoreResult<Option<bool>> {
        // Leases are rows: a restarted node releases its own (`release_owners_under`).
        Ok(None)
    }

    async fn end_run(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn begin_node_run(&self, node_id: &str) -> StoreResult<Option<bool>> {
        check_storable("node id", node_id)?;
        // The mark of this node's run, kept until its clean stop: found here, the run before
        // died. (A retry whose first try committed finds its own mark: one wake-up too many.)
        let marked = self
            .execute_retrying(
                "INSERT INTO mailroom_node_runs (node_id) VALUES ($1) ON CONFLICT (node_id) DO NOTHING",
                &[&node_id],
            )
            .await?;
        Ok(Some(marked == 0))
    }

    async fn end_node_run(&self, node_id: &str) -> StoreResult<()> {
        check_storable("node id", node_id)?;
        self.execute_retrying("DELETE FROM mailroom_node_runs WHERE node_id = $1", &[&node_id])
            .await?;
        Ok(())
    }

    async fn owed_wakes(&self, now_ms: i64, after: Option<&str>, limit: usize) -> StoreResult<Option<OwedPage>> {
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        // No stored id holds a NUL: cutting `after` there keeps the same order position.
        let after = after.map(|a| a.split('\0').next().unwrap_or(""));
        let c = self.client().await?;
        let q = c.run(c.prepare_cached(OWED_WAKES_SQL)).await?;
        let rows = c.run(c.query(&q, &[&after, &limit, &now_ms])).await?;
        let next = match rows.last() {
            Some(r) if rows.len() as i64 == limit => Some(r.get::<_, String>(0)),
            _ => None,
        };
        let owed = rows
            .iter()
            .filter_map(|r| {
                r.get::<_, Option<i64>>(1).map(|at| Owed {
                    connection: r.get(0),
                    newest_received_ms: at,
                })
            })
            .collect();
        Ok(Some(OwedPage { owed, next }))
    }

    async fn dedup_records(&self) -> StoreResult<u64> {
        // Counted while the table is small; past 100,000 rows (one a forward, kept a day) the
        // planner's estimate, as a count read the whole table every few seconds on every node.
        let c = self.client().await?;
        let r = c
            .run(c.query_one(
                "SELECT CASE WHEN t.reltuples < 100000 THEN (SELECT count(*) FROM mailroom_dedup) \
                 ELSE t.reltuples::bigint END FROM pg_class t WHERE t.oid = 'mailroom_dedup'::regclass",
                &[],
            ))
            .await?;
        Ok(r.get::<_, i64>(0).max(0) as u64)
    }

    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64> {
        // By this node's clock: one ahead would delete messages early. The others expire.
        if self.clock.is_skewed() {
            return Ok(0);
        }
        // In batches: one statement over everything expired (a TTL shortened, a sweep that
        // was down) locked every row at once, and past its timeout rolled all of it back,
        // at every call. Rows locked by a leaser or an ack right now are skipped, never
        // waited on: they expire at the next call.
        let batch = EXPIRE_BATCH;
        let mut n = 0;
        loop {
            let deleted = self
                .execute_retrying_bulk(
                    "DELETE FROM mailroom_messages WHERE id IN ( \
                       SELECT id FROM mailroom_messages WHERE received_at_ms < $1 \
                       ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&received_before_ms, &batch],
                )
                .await?;
            n += deleted;
            if deleted < batch as u64 {
                break;
            }
        }
        loop {
            let deleted = self
                .execute_retrying_bulk(
                    "DELETE FROM mailroom_dedup WHERE ctid IN ( \
                       SELECT ctid FROM mailroom_dedup WHERE received_at_ms < $1 \
                       LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&received_before_ms, &batch],
                )
                .await?;
            if deleted < batch as u64 {
                break;
            }
        }
        Ok(n)
    }

    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        if self.clock.is_skewed() {
            return Ok(0);
        }
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
            .run(c.query_one("SELECT min(received_at_ms) FROM mailroom_messages", &[]))
            .await?;
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
            .run(c.prepare_cached(
                "SELECT service, token, platform, updated_at_ms FROM mailroom_devices WHERE conn_id = $1",
            ))
            .await?;
        let Some(row) = c.run(c.query_opt(&q, &[&conn])).await? else {
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
                    .run(c.query_opt("SELECT 1 FROM mailroom_connections WHERE id = $1", &[&conn]))
                    .await?;
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

    async fn push_event(
        &self,
        conn: &str,
        now_ms: i64,
        window_ms: i64,
        claim: NewClaim,
        unless_pushed_since_ms: Option<i64>,
    ) -> StoreResult<PushSlot> {
        check_storable("connection id", conn)?;
        // The window is every node's, read and written by this node's clock.
        self.clock.guard("push window")?;
        let c = self.client().await?;
        // push_window_step in one statement: the row lock orders concurrent events. An event
        // that pushes now claims the push (every SET reads the row as it was).
        let q = c
            .run(c.prepare_cached(concat!(
                "INSERT INTO mailroom_push_windows AS w \
                     (conn_id, last_push_ms, trailing_due_ms, claimed_until_ms, claim_token, push_id, push_claim) \
                 VALUES ($1, LEAST($2, ",
                server_cap!(7),
                "), NULL, $4, $5, $5, $5) \
                 ON CONFLICT (conn_id) DO UPDATE SET \
                 trailing_due_ms = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 \
                     THEN LEAST(coalesce(w.trailing_due_ms, ",
                last_push!(7),
                " + $3), ",
                server_cap!(7),
                " + $3) \
                     ELSE NULL END, \
                 claimed_until_ms = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 THEN w.claimed_until_ms ELSE $4 END, \
                 claim_token = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 THEN w.claim_token ELSE $5 END, \
                 push_id = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 THEN w.push_id ELSE $5 END, \
                 push_claim = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 THEN w.push_claim ELSE $5 END, \
                 last_push_ms = CASE WHEN $2 < ",
                last_push!(7),
                " + $3 THEN ",
                last_push!(7),
                " \
                     ELSE LEAST($2, ",
                server_cap!(7),
                ") END \
                 WHERE $6::bigint IS NULL OR ",
                last_push!(7),
                " < $6 \
                 RETURNING trailing_due_ms"
            )))
            .await?;
        let row = c
            .run(c.query_opt(
                &q,
                &[
                    &conn,
                    &now_ms,
                    &window_ms,
                    &claim.until_ms,
                    &claim.token,
                    &unless_pushed_since_ms,
                    &max_skew_ms(),
                ],
            ))
            .await?;
        // No row: the update's condition failed, the wallet was pushed since.
        Ok(match row.map(|r| r.get::<_, Option<i64>>(0)) {
            None => PushSlot::PushedSince,
            Some(Some(due_ms)) => PushSlot::Trailing { due_ms },
            Some(None) => PushSlot::Now,
        })
    }

    async fn push_take_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        idle_before_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<PushClaim>> {
        // Claims and windows every node reads, written by this node's clock.
        self.clock.guard("push window")?;
        let c = self.client().await?;
        // Idle windows first: a failure here claims nothing (after the claim, it would leave
        // the claimed pushes to no task until their claims ran out).
        c.run(c.execute(super::FORGET_IDLE_PUSH_WINDOWS, &[&idle_before_ms]))
            .await?;
        let token = crate::store::new_push_claim_token();
        // Due: scheduled by the window, or claimed by a node that never said it was done. The
        // claim is a column of its own: push_event writes it only for a push it lets through.
        let take = c
            .run(c.prepare_cached(concat!(
                "UPDATE mailroom_push_windows \
                 SET trailing_due_ms = NULL, last_push_ms = LEAST($1, ",
                server_cap!(5),
                "), \
                     claimed_until_ms = $3, claim_token = $4, \
                     push_id = CASE WHEN trailing_due_ms IS NULL AND claimed_until_ms <= $1 \
                         AND push_claim = claim_token THEN push_id ELSE $4 END, \
                     push_claim = $4 \
                 WHERE conn_id IN (SELECT conn_id FROM mailroom_push_windows \
                     WHERE trailing_due_ms <= $1 OR claimed_until_ms <= $1 \
                     ORDER BY least(trailing_due_ms, claimed_until_ms) LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING conn_id, push_id"
            )))
            .await?;
        let rows = c
            .run(c.query(
                &take,
                &[
                    &now_ms,
                    &(limit.min(i64::MAX as usize) as i64),
                    &claim_until_ms,
                    &token,
                    &max_skew_ms(),
                ],
            ))
            .await?;
        Ok(rows
            .iter()
            .map(|r| PushClaim {
                conn: r.get(0),
                token,
                push_id: r.get(1),
            })
            .collect())
    }

    async fn push_done(&self, conn: &str, token: i64, reopen_ms: Option<i64>) -> StoreResult<bool> {
        if !storable(conn) {
            return Ok(false);
        }
        // Every SET reads the row as it was (the last push of the claim, for the trailing push).
        let n = self
            .execute_retrying(
                "UPDATE mailroom_push_windows SET claimed_until_ms = NULL, claim_token = NULL, \
                     last_push_ms = CASE WHEN $3::bigint IS NULL THEN last_push_ms ELSE last_push_ms - $3 END, \
                     trailing_due_ms = CASE WHEN $3::bigint IS NULL OR trailing_due_ms IS NULL THEN trailing_due_ms \
                         ELSE LEAST(trailing_due_ms, last_push_ms) END \
                 WHERE conn_id = $1 AND claim_token = $2",
                &[&conn, &token, &reopen_ms],
            )
            .await?;
        Ok(n > 0)
    }

    async fn first_sight(&self, digest: &[u8; 32], now_ms: i64, until_ms: i64) -> StoreResult<bool> {
        // One statement, atomic across nodes: of concurrent sights one inserts (or replaces a
        // record that ran out); the others find it held and change nothing. Run out by this
        // node's clock: one ahead would take a record still held as run out (a captured
        // message acts again).
        self.clock.guard("replay record")?;
        let digest = &digest[..];
        let n = self
            .execute_retrying(
                "INSERT INTO mailroom_sights (digest, until_ms) VALUES ($1, $3) \
                 ON CONFLICT (digest) DO UPDATE SET until_ms = excluded.until_ms \
                 WHERE mailroom_sights.until_ms <= $2",
                &[&digest, &now_ms, &until_ms],
            )
            .await?;
        Ok(n == 1)
    }

    async fn forget_sight(&self, digest: &[u8; 32], until_ms: i64) -> StoreResult<()> {
        // Refused by the same guard as `first_sight`, which then wrote nothing: the record
        // there (until_ms is the message's, so a copy's matches the original's) is another
        // call's, which a copy sent to a skewed node would otherwise delete, to act again on
        // a node that is not.
        if self.clock.is_skewed() {
            return Ok(());
        }
        let digest = &digest[..];
        self.execute_retrying(
            "DELETE FROM mailroom_sights WHERE digest = $1 AND until_ms = $2",
            &[&digest, &until_ms],
        )
        .await?;
        Ok(())
    }

    async fn prune_sights(&self, now_ms: i64, max: usize) -> StoreResult<u64> {
        // One ahead would forget replay records still held (a captured message acts again).
        if self.clock.is_skewed() {
            return Ok(0);
        }
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.execute_retrying(
            "DELETE FROM mailroom_sights WHERE ctid IN ( \
               SELECT ctid FROM mailroom_sights WHERE until_ms <= $1 \
               ORDER BY until_ms LIMIT $2 FOR UPDATE SKIP LOCKED)",
            &[&now_ms, &max],
        )
        .await
    }

    async fn delete_connection(&self, id: &str) -> StoreResult<Removed> {
        if !storable(id) {
            return Ok(Removed::default());
        }
        // It deletes the connection's whole queue.
        let mut c = self.pool.get_bulk().await?;
        retried!("delete_connection", PgStore::delete_connection_once(&mut c, id, None)).map_err(StoreError::from)
    }

    async fn delete_unmediated(&self, id: &str, created_before_ms: i64) -> StoreResult<bool> {
        if !storable(id) || self.clock.is_skewed() {
            return Ok(false);
        }
        let mut c = self.client().await?;
        let removed = retried!(
            "delete_unmediated",
            PgStore::delete_connection_once(&mut c, id, Some(created_before_ms))
        )
        .map_err(StoreError::from)?;
        Ok(removed.connection)
    }

    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>> {
        if !storable(id) {
            return Ok(None);
        }
        let patch = ConnectionPatch {
            mediation: Some(MediationState::Denied),
            updated_at_ms,
            ..ConnectionPatch::default()
        };
        let mut c = self.client().await?;
        retried!("revoke_mediation", PgStore::revoke_mediation_once(&mut c, id, &patch)).map_err(StoreError::from)?
    }

    async fn drop_queue(&self, conn: &str) -> StoreResult<u64> {
        if !storable(conn) {
            return Ok(0);
        }
        let mut c = self.pool.get_bulk().await?;
        retried!("drop_queue", PgStore::drop_queue_once(&mut c, conn)).map_err(StoreError::from)
    }

    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues> {
        let limit = limit.min(1000) as i64;
        let c = self.client().await?;
        // Both lists from the counters (one row per connection that ever had mail), never a
        // scan of the queue: the status page asks every 10 s, and a GROUP BY over the messages
        // (or a minimum over a deep queue's rows) passed the statement timeout on millions of
        // them, and went on running on the server at every poll. Each queue's oldest message
        // is one probe of an index (migration 18). The oldest list probes every connection
        // with mail, once each: its cost grows with those connections (~30 µs each), not with
        // their messages.
        let deepest = c.run(c.query(TOP_DEEPEST_SQL, &[&limit])).await?;
        let oldest = c.run(c.query(TOP_OLDEST_SQL, &[&limit])).await?;
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
    /// One try of [`Store::revoke_mediation`]: the outer error is PostgreSQL's or the bound's
    /// (transient ones are tried again), the inner one the record's.
    async fn revoke_mediation_once(
        c: &mut Conn,
        id: &str,
        patch: &ConnectionPatch,
    ) -> Result<StoreResult<Option<Vec<String>>>, Failed> {
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        // The enqueue lock of the connection (`mailroom_enqueue` takes it before its route
        // check): a batch routed to it commits before this, or decides after it and finds it
        // denied and its keys gone.
        b.run(tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(id)]))
            .await?;
        // The row lock: key updates (which share-lock the row) wait, then find it denied.
        let Some(row) = b
            .run(tx.query_opt("SELECT data FROM mailroom_connections WHERE id = $1 FOR UPDATE", &[&id]))
            .await?
        else {
            return Ok(Ok(None));
        };
        let mut conn = match decode_conn(row.get(0)) {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        patch.apply(&mut conn);
        let data = match serde_json::to_string(&conn) {
            Ok(d) => d,
            Err(e) => return Ok(Err(json_err(e))),
        };
        b.run(tx.execute(
            "UPDATE mailroom_connections SET data = $2, written = nextval('mailroom_connection_writes') WHERE id = $1",
            &[&id, &data],
        ))
        .await?;
        let mut keys: Vec<String> = b
            .run(tx.query(
                "DELETE FROM mailroom_routing_keys WHERE conn_id = $1 RETURNING key",
                &[&id],
            ))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        keys.sort_unstable();
        b.run(tx.commit()).await?;
        Ok(Ok(Some(keys)))
    }

    /// One try of [`Store::drop_queue`]. The operator is told every message is gone, so none
    /// may survive the DELETE: it runs under the connection's enqueue lock (a batch that
    /// inserted messages and has not committed yet is waited for, then deleted with the rest;
    /// a later one queues after the drop), and waits for the rows a leaser or an
    /// acknowledgement holds right now (not skipped).
    async fn drop_queue_once(c: &mut Conn, conn: &str) -> Result<u64, Failed> {
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        b.run(tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(conn)]))
            .await?;
        let n = b
            .run(tx.execute(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE conn_id = $1 ORDER BY id FOR UPDATE)",
                &[&conn],
            ))
            .await?;
        b.run(tx.commit()).await?;
        Ok(n)
    }

    /// Removes connection `id` and everything of it; with `unmediated_before`, only while its
    /// record (read under the row lock) has no mediation and was made before then.
    async fn delete_connection_once(c: &mut Conn, id: &str, unmediated_before: Option<i64>) -> Result<Removed, Failed> {
        let b = c.bound();
        let tx = b.run(c.transaction()).await?;
        // The enqueue lock of the connection: no batch can add a message to it meanwhile.
        b.run(tx.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(id)]))
            .await?;
        // The row lock: key updates (which share-lock the row) wait, then find no connection.
        let conn = b
            .run(tx.query_opt("SELECT data FROM mailroom_connections WHERE id = $1 FOR UPDATE", &[&id]))
            .await?;
        if let Some(before) = unmediated_before {
            // A record that does not read is not collected.
            let collectable = conn.as_ref().is_some_and(|row| {
                serde_json::from_str::<Connection>(row.get::<_, &str>(0))
                    .is_ok_and(|c| c.mediation == MediationState::None && c.created_at_ms < before)
            });
            if !collectable {
                b.run(tx.rollback()).await?;
                return Ok(Removed::default());
            }
        }
        let peer_keys = b
            .run(tx.execute("DELETE FROM mailroom_connection_verkeys WHERE conn_id = $1", &[&id]))
            .await?;
        let device = b
            .run(tx.execute("DELETE FROM mailroom_devices WHERE conn_id = $1", &[&id]))
            .await?;
        let routing_keys = b
            .run(tx.execute("DELETE FROM mailroom_routing_keys WHERE conn_id = $1", &[&id]))
            .await?;
        let messages = b
            .run(tx.execute(
                "DELETE FROM mailroom_messages WHERE id IN ( \
                   SELECT id FROM mailroom_messages WHERE conn_id = $1 ORDER BY id FOR UPDATE)",
                &[&id],
            ))
            .await?;
        let dedup_records = b
            .run(tx.execute("DELETE FROM mailroom_dedup WHERE conn_id = $1", &[&id]))
            .await?;
        b.run(tx.execute("DELETE FROM mailroom_queue_counts WHERE conn_id = $1 AND n = 0", &[&id]))
            .await?;
        b.run(tx.execute("DELETE FROM mailroom_push_windows WHERE conn_id = $1", &[&id]))
            .await?;
        let connection = b
            .run(tx.execute("DELETE FROM mailroom_connections WHERE id = $1", &[&id]))
            .await?;
        b.run(tx.commit()).await?;
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
