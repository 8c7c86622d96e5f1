//! The PostgreSQL backend: one database shared by every node of a cluster.
//!
//! Tables (all prefixed `mailroom_`, text keys in the "C" collation so ordering is bytewise, as
//! on sled): `meta` (identity), `connections` (+ `connection_verkeys` index), `routing_keys`,
//! `messages` (the queue; lease columns on the row), `dedup` (outlives its message until
//! [`Store::expire`](super::Store::expire)). Migrations are numbered and applied at open inside
//! a transaction holding an advisory lock, so nodes starting together apply each one once.
//!
//! Concurrency across nodes:
//! - `lease` picks rows with `FOR UPDATE SKIP LOCKED`: two leasers never get the same message.
//!   Its byte budget (`lease_upto`) is a running sum of the rows' stored `size` over the rows
//!   it locked: those past the budget stay locked, untouched, until its commit, and a leaser of
//!   the same connection on another node meanwhile skips them.
//! - `enqueue` takes a transaction-scoped advisory lock per connection (in sorted order, so
//!   batches never deadlock) before checking limits and dedup and allocating ids: limits and
//!   dedup hold across nodes, and ids of one connection grow in commit order.
//! - `expire` skips rows locked by others (they go at the next call) and never waits on them.
//! - `revoke_mediation` and `delete_connection` take the connection's enqueue lock, then its
//!   row: an enqueue batch routed to it is decided wholly before or wholly after them. The
//!   route check of a batch refuses a connection whose mediation is revoked (the function
//!   `mailroom_mediation_denied`, migration 11), whatever keys it still holds.
//! - `ack`, `release`, `release_owner` lock their rows in id order; `update_keys` takes sorted
//!   advisory locks on its keys first. Writers therefore never deadlock each other; a
//!   single-statement write aborted anyway (deadlock victim, serialization failure) is retried.
//!
//! `open` creates the database if it does not exist (via the `postgres` maintenance database).
//!
//! Every connection (the pool's, the maintenance one) goes through one TLS connector built
//! from the URL's `sslmode` and `sslrootcert`, with libpq's meaning (`tls.rs`).
//!
//! Bounds (`store.statement_timeout_ms`, 10 s by default): every call waits at most that long
//! for a pooled connection and its statements' answers, then fails with `Unavailable` and
//! closes a connection left waiting (`bounded.rs`); the server ends a lock wait at half of it
//! and a transaction idle for three times it (a node that froze or lost its link in one);
//! keepalives and `TCP_USER_TIMEOUT` close a socket whose peer stopped acknowledging within
//! 30 s (`link.rs`). An enqueue batch whose wait for a connection's lock ends is tried again
//! without that connection, whose messages alone are refused. Opening the store (the first
//! connection, migrations) is bounded by the pool's create timeout only.
//!
//! Write path: enqueues go through a channel to [`WRITER_TASKS`] writer tasks; each drains the
//! waiting requests (at most [`MAX_BATCH_MESSAGES`]) into ONE statement, the server-side
//! function `mailroom_enqueue` (migration 8, its route check extended by migration 11) called
//! outside an explicit transaction: it takes the connections' advisory locks, reads their
//! counters and dedup records, checks the routes of `enqueue_routed` messages (the key still
//! registered by the connection, the connection's mediation not revoked), decides each message
//! in input order, inserts the accepted ones
//! (`unnest` arrays) and their dedup records; the counter trigger runs inside the same
//! statement. One round trip and one commit per batch; every caller is answered after that
//! commit, and a failed batch fails every caller in it with the class of its error (a batch
//! refused as `Invalid`, one request's value past a limit of PostgreSQL's, is tried again
//! request by request, so that only that request is refused). A request is measured before
//! it joins a batch: no batch passes [`MAX_BATCH_MESSAGES`] or [`MAX_BATCH_BYTES`] unless it
//! holds that request alone.
//!
//! Must not: block the runtime (everything is async over a deadpool pool).
//!
//! Files: `migrations.rs` (the schema), `writer.rs` (the write path), `lease.rs` (the live
//! path's leases), `store_trait.rs` (the [`Store`](super::Store) trait), `tls.rs` (the link's
//! TLS), `link.rs` (the link's socket and session timeouts), `bounded.rs` (the bound of every
//! call), `clock.rs` (the node's clock against the server's, checked by the health check, the
//! sweep and a task of its own, followed between checks, reported past [`MAX_CLOCK_SKEW`], and
//! refusing leases and push windows meanwhile, and writing queued messages' received times in the
//! server's); this file holds the handle, its tasks and the errors and locks they share.

mod bounded;
mod clock;
mod lease;
mod link;
mod migrations;
mod store_trait;
mod tls;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot, Mutex as AsyncMutex};

use super::{
    check_storable, storable, Connection, EnqueueLimits, Enqueued, NewMessage, QueuedMessage, StoreError, StoreResult,
};
use bounded::BoundedPool;
pub use bounded::BULK_TIMEOUT;
use clock::Clock;
pub use clock::MAX_CLOCK_SKEW;
use lease::{lease_task, LeaseGate, LeaseReq};
pub use link::{KEEPALIVES_COUNT, KEEPALIVES_IDLE, KEEPALIVES_INTERVAL, TCP_USER_TIMEOUT};
use migrations::{create_database, migrate};
#[cfg(test)]
pub(crate) use tls::dns_names_valid_for;
use tls::PgLink;
pub use tls::SslMode;
use writer::{writer_task, EnqueueReq};

#[cfg(test)]
pub(crate) use lease::LEASE_SQL;
pub(crate) use lease::PENDING_STATS_SQL;
pub use lease::{MAX_LEASE_BATCH, MAX_WAITING_PER_CONN};
#[cfg(test)]
pub(crate) use migrations::MIGRATIONS;
#[cfg(test)]
pub(crate) use store_trait::{TOP_DEEPEST_SQL, TOP_OLDEST_SQL};

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
/// How long a caller waits for a pooled connection before `Unavailable` (the statement
/// timeout bounds it too).
pub const POOL_WAIT: Duration = Duration::from_secs(10);
/// `store.statement_timeout_ms`'s default: how long a call waits for PostgreSQL.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// First key of every advisory lock this crate takes ("mail").
pub(crate) const LOCK_NS: i32 = 0x6d61_696c;
/// Forgets the push windows idle since before `$1` (nothing scheduled, no claim): run by every
/// trailing-push poll, on the partial index of migration 17.
pub(crate) const FORGET_IDLE_PUSH_WINDOWS: &str = "DELETE FROM mailroom_push_windows \
     WHERE trailing_due_ms IS NULL AND claimed_until_ms IS NULL AND last_push_ms < $1";
/// Second key of the migration lock (connection locks use a hash of the id).
pub(crate) const MIGRATION_LOCK: i32 = 0;
/// First key of routing-key locks (second: a hash of the key).
const KEY_LOCK_NS: i32 = LOCK_NS + 1;

fn pg_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        // A value past one of PostgreSQL's own limits (a key longer than a btree entry holds,
        // ~2.7 KB): the input's, and no retry will store it.
        Some(db) if *db.code() == tokio_postgres::error::SqlState::PROGRAM_LIMIT_EXCEEDED => StoreError::Invalid(
            format!("too long for PostgreSQL: {} ({})", db.message(), db.code().code()),
        ),
        Some(db) => StoreError::Unavailable(format!("postgres: {} ({})", db.message(), db.code().code())),
        None => StoreError::Unavailable(format!("postgres: {e}{}", causes(&e))),
    }
}

/// ": cause: its cause..." of an error whose `Display` leaves them out (tokio-postgres's and
/// deadpool's do: "error performing TLS handshake" alone does not say the certificate's name
/// was wrong).
fn causes(e: &dyn std::error::Error) -> String {
    let mut msg = String::new();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// A connection that failed in its TLS handshake (tokio-postgres says no more than that).
fn is_tls_handshake(e: &tokio_postgres::Error) -> bool {
    e.to_string().starts_with("error performing TLS handshake")
}

/// Deadlock victim or serialization failure: the statement had no effect and may run again.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.code(), Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
        || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    // The backend's error is in deadpool's message already: only its causes are added.
    let causes = match &e {
        deadpool_postgres::PoolError::Backend(b) => causes(b),
        deadpool_postgres::PoolError::PostCreateHook(HookError::Backend(b)) => causes(b),
        _ => String::new(),
    };
    StoreError::Unavailable(format!("postgres pool: {e}{causes}"))
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("postgres json: {e}"))
}

/// Advisory lock key of a connection or routing key: FNV-1a of it. Collisions only serialise
/// two unrelated writers.
pub(crate) fn lock_key(conn: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in conn.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// URL parameters taken out of a store URL: (name, percent-decoded value), in order.
type Taken = Vec<(&'static str, String)>;

/// Takes the parameters named in `wanted` out of a `postgres://` URL's query: the URL without
/// them, and each one taken (its name in `wanted`, its value percent-decoded), in order. A
/// string of another form comes back as it is, with none.
fn take_url_params(url: &str, wanted: &[&'static str]) -> Result<(String, Taken), String> {
    let Some(prefix) = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|p| url.starts_with(p))
    else {
        return Ok((url.to_owned(), Vec::new()));
    };
    // Where tokio-postgres looks for the query: after the credentials, which end at the
    // first '@' (a password may hold a '?').
    let after_prefix = &url[prefix.len()..];
    let creds_end = after_prefix.find('@').map_or(0, |i| i + 1);
    let Some(q) = after_prefix[creds_end..].find('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let query_at = prefix.len() + creds_end + q;
    let (base, query) = (&url[..query_at], &url[query_at + 1..]);
    let decode = |what: &str, s: &str| {
        urlencoding::decode(s)
            .map(|v| v.into_owned())
            .map_err(|_| format!("{what} is not UTF-8 once percent-decoded"))
    };
    let (mut taken, mut kept) = (Vec::new(), Vec::new());
    for param in query.split('&') {
        let key = param
            .split_once('=')
            .map(|(k, _)| decode("a parameter name", k))
            .transpose()?;
        let name = key.as_deref().and_then(|k| wanted.iter().find(|w| **w == k));
        match (name, param.split_once('=')) {
            (Some(name), Some((_, v))) => taken.push((*name, decode(name, v)?)),
            // Anything else (malformed ones included) is tokio-postgres's to read or refuse.
            _ => kept.push(param),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

/// A store URL read as [`PgStore::open`] reads it: TLS (`tls.rs`), then the socket's settings
/// (`link.rs`), with libpq's meaning; the rest is tokio-postgres's.
fn read_url(url: &str) -> Result<PgLink, String> {
    let (rest, socket) = link::take_socket_params(url)?;
    let mut link = PgLink::from_url(&rest)?;
    socket.apply(&mut link.config);
    Ok(link)
}

/// Hands `req` to the `what` task's queue by `deadline` (a statement timeout after the call
/// came), or refuses it: a full queue means the server is slow or unreachable.
async fn hand_over<R>(tx: &mpsc::Sender<R>, req: R, deadline: tokio::time::Instant, what: &str) -> StoreResult<()> {
    match tokio::time::timeout_at(deadline, tx.send(req)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(StoreError::Closed),
        Err(_) => Err(StoreError::Unavailable(format!(
            "postgres: the {what} queue is full (the server is slow or unreachable)"
        ))),
    }
}

/// Checks the node's clock every [`clock::CLOCK_CHECK_EVERY`] while the store is open: a
/// drift, or a step of the server's clock, is found within it even on a node nobody polls.
async fn clock_task(pool: BoundedPool, clock: std::sync::Weak<Clock>) {
    let mut tick = tokio::time::interval(clock::CLOCK_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(clock) = clock.upgrade() else { return };
        // A failed round trip is the health check's to report.
        if let Ok(c) = pool.get().await {
            let _ = clock.check(&c).await;
        }
    }
}

/// The PostgreSQL [`Store`](super::Store).
pub struct PgStore {
    pool: BoundedPool,
    tx: mpsc::Sender<EnqueueReq>,
    lease_tx: mpsc::Sender<LeaseReq>,
    /// At most [`MAX_WAITING_PER_CONN`] lease requests of one connection in the lease task.
    lease_gate: Arc<LeaseGate>,
    /// The node's clock against the server's, checked with every health check and every
    /// [`clock::CLOCK_CHECK_EVERY`] (a task holding it weakly: it ends with the store).
    clock: Arc<Clock>,
}

impl PgStore {
    /// As [`PgStore::open_with`], with the default statement timeout.
    pub async fn open(url: &str, pool_size: usize) -> StoreResult<PgStore> {
        Self::open_with(url, pool_size, DEFAULT_STATEMENT_TIMEOUT).await
    }

    /// Connects with a pool of `pool_size` connections and applies pending migrations. The
    /// URL's `sslmode` and `sslrootcert` apply to every connection (see [`check_url`]), and so
    /// do the socket's keepalives and user timeout. Every later call waits at most
    /// `statement_timeout` for PostgreSQL; the server ends lock waits and idle transactions
    /// of the store's sessions by it (see the module's header).
    pub async fn open_with(url: &str, pool_size: usize, statement_timeout: Duration) -> StoreResult<PgStore> {
        let PgLink { config: mut cfg, tls } =
            read_url(url).map_err(|e| StoreError::Unavailable(format!("postgres url: {e}")))?;
        let setup: Arc<str> = Arc::from(link::session_setup(&cfg, statement_timeout));
        let mut pool = Self::pool(&cfg, &tls, pool_size, &setup)?;
        let mut first = pool.get().await;
        if tls.mode() == SslMode::Prefer {
            if let Err(deadpool_postgres::PoolError::Backend(e)) = &first {
                if is_tls_handshake(e) {
                    // libpq's `prefer` tries plaintext when the TLS handshake fails (a
                    // certificate rustls cannot read: X.509 v1, RSA under 2048 bits, P-521).
                    tracing::warn!(
                        "TLS handshake with PostgreSQL failed ({e}{}): sslmode=prefer goes on in plaintext, as libpq does (sslmode=require or verify-full refuses that)",
                        causes(e)
                    );
                    cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                    pool = Self::pool(&cfg, &tls, pool_size, &setup)?;
                    first = pool.get().await;
                }
            }
        }
        let client = match first {
            Err(deadpool_postgres::PoolError::Backend(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) =>
            {
                create_database(&cfg, tls.clone()).await?;
                pool.get().await.map_err(pool_err)?
            }
            r => r.map_err(pool_err)?,
        };
        let encrypted = tls.sessions() > 0;
        tracing::info!(
            sslmode = tls.mode().as_str(),
            encrypted,
            "store link to PostgreSQL: {}",
            tls.describe()
        );
        if tls.mode() == SslMode::Prefer && !encrypted {
            tracing::warn!(
                "the store link to PostgreSQL is plaintext (the server offers no TLS, or its \
                 handshake failed); sslmode=require or verify-full in store.url refuses that"
            );
        }
        migrate(client).await?;
        let pool = BoundedPool::new(pool, statement_timeout);
        let (tx, rx) = mpsc::channel(WRITER_CHANNEL);
        let rx = Arc::new(AsyncMutex::new(rx));
        for _ in 0..WRITER_TASKS {
            tokio::spawn(writer_task(pool.clone(), rx.clone()));
        }
        let (lease_tx, lease_rx) = mpsc::channel(WRITER_CHANNEL);
        tokio::spawn(lease_task(pool.clone(), lease_rx));
        let store = PgStore {
            pool,
            tx,
            lease_tx,
            lease_gate: Arc::default(),
            clock: Arc::default(),
        };
        // A skewed clock is logged by the check and reported by every health check until it
        // is fixed; a failed round trip shows in the first health check too.
        let _ = store.check_clock().await;
        tokio::spawn(clock_task(store.pool.clone(), Arc::downgrade(&store.clock)));
        Ok(store)
    }

    /// The connection pool of a store link; each new connection runs `setup` (the session's
    /// isolation level and server-side timeouts) before its first use.
    fn pool(cfg: &tokio_postgres::Config, tls: &tls::PgTls, pool_size: usize, setup: &Arc<str>) -> StoreResult<Pool> {
        let mgr = Manager::from_config(
            cfg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let mut builder = Pool::builder(mgr)
            .max_size(pool_size.max(WRITER_TASKS + 1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT));
        if !setup.is_empty() {
            let setup = setup.clone();
            builder = builder.post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                let setup = setup.clone();
                Box::pin(async move { client.batch_execute(&setup).await.map_err(HookError::Backend) })
            }));
        }
        builder
            .build()
            .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))
    }

    /// Hands messages to the writer task and waits for their batch to commit.
    ///
    /// While the node's clock is past [`MAX_CLOCK_SKEW`], each message's `received_at_ms` is
    /// written in the server's time ([`Clock::server_time_of`]): every node's TTL sweep deletes
    /// by it, and `mailroom_enqueue` compares it with the dedup records (and writes it into
    /// them). As read on a node behind by the TTL, another node's sweep would delete the
    /// message at once, after its sender was answered; ahead, a later copy from a synced node
    /// would be taken for a duplicate past the window. Queued messages, unlike leases, are
    /// not refused meanwhile: the skew is measured, and refusing would stop every forward.
    async fn submit(
        &self,
        mut msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
        routed: bool,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        // A hand-off's lease (`NewMessage::lease`) is a deadline by this node's clock, as any.
        if msgs.iter().any(|m| m.lease.is_some()) {
            self.clock.guard("hand-off lease")?;
        }
        for m in &mut msgs {
            m.received_at_ms = self.clock.server_time_of(m.received_at_ms);
        }
        let (reply, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.pool.statement_timeout();
        let req = EnqueueReq {
            msgs,
            limits: *limits,
            routed,
            reply,
            deadline,
        };
        hand_over(&self.tx, req, deadline, "write").await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// `lease_upto` and `lease_for_key_upto`: hands the request to the lease task, which leases
    /// every request waiting in one statement (see [`lease_task`]).
    #[allow(clippy::too_many_arguments)]
    async fn lease_filtered(
        &self,
        conn: &str,
        recipient_key: Option<&str>,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        check_storable("lease owner", owner)?;
        if !storable(conn) || !recipient_key.map_or(true, storable) || max == 0 {
            return Ok(Vec::new());
        }
        // Deadlines every node compares, judged and written by this node's clock: one ahead
        // takes others' live leases, one behind writes deadlines already run out for them.
        self.clock.guard("lease")?;
        let deadline = tokio::time::Instant::now() + self.pool.statement_timeout();
        let turn = self.lease_gate.enter(conn, deadline).await?;
        let (reply, rx) = oneshot::channel();
        let req = LeaseReq {
            conn: conn.to_owned(),
            key: recipient_key.map(str::to_owned),
            max: i64::try_from(max).unwrap_or(i64::MAX),
            max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            owner: owner.to_owned(),
            now_ms,
            until_ms,
            reply,
            deadline,
            _turn: turn,
        };
        hand_over(&self.lease_tx, req, deadline, "lease").await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A connection of the store's pool, set up as every one is (a test acting as a node that
    /// froze in a transaction).
    #[cfg(test)]
    pub(crate) async fn session_for_test(&self) -> deadpool_postgres::Object {
        self.pool.get_unbounded().await
    }

    /// One round trip: the server answers, and the node's clock is within [`MAX_CLOCK_SKEW`]
    /// of the server's (`clock.rs`), else `Unavailable` saying which.
    async fn check_clock(&self) -> StoreResult<()> {
        let c = self.client().await?;
        self.clock.check(&c).await
    }

    /// Moves this store's view of the node's clock by `ms` (a node whose clock is off): what
    /// the clock check compares with the server's.
    #[cfg(test)]
    pub(crate) fn shift_clock_for_test(&self, ms: i64) {
        self.clock.shift_for_test(ms);
    }

    /// Connections with lease requests in flight (the lease gate forgets the others).
    #[cfg(test)]
    pub(crate) fn lease_gate_conns_for_test(&self) -> usize {
        self.lease_gate.conns_in_flight()
    }

    /// A pooled connection for one call, bounded by the statement timeout.
    async fn client(&self) -> StoreResult<bounded::Conn> {
        self.pool.get().await
    }

    /// One statement in its own transaction, tried again (at most [`STATEMENT_TRIES`] times)
    /// when PostgreSQL aborted it as a deadlock victim or serialization failure. Every
    /// multi-row write locks rows in id order, so this is a second line of defence.
    async fn execute_retrying(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<u64> {
        Self::execute_retrying_on(self.client().await?, sql, params).await
    }

    /// As [`PgStore::execute_retrying`], for a statement that returns rows and may write many
    /// ([`BULK_TIMEOUT`]).
    async fn query_retrying_bulk(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<Vec<tokio_postgres::Row>> {
        let c = self.pool.get_bulk().await?;
        let obj: &deadpool_postgres::Object = &c;
        Self::retrying_on(&c, sql, |q| async move { obj.query(&q, params).await }).await
    }

    /// As [`PgStore::execute_retrying`], for a statement that may delete a whole queue
    /// ([`BULK_TIMEOUT`]).
    async fn execute_retrying_bulk(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<u64> {
        Self::execute_retrying_on(self.pool.get_bulk().await?, sql, params).await
    }

    async fn execute_retrying_on(
        c: bounded::Conn,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> StoreResult<u64> {
        let obj: &deadpool_postgres::Object = &c;
        Self::retrying_on(&c, sql, |q| async move { obj.execute(&q, params).await }).await
    }

    /// Prepares `sql` on `c` and runs `attempt` with it, again (at most [`STATEMENT_TRIES`]
    /// times in all) while PostgreSQL aborts it as a deadlock victim or serialization failure.
    async fn retrying_on<T, Fut>(
        c: &bounded::Conn,
        sql: &str,
        mut attempt: impl FnMut(tokio_postgres::Statement) -> Fut,
    ) -> StoreResult<T>
    where
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let q = c.run(c.prepare_cached(sql)).await?;
        let mut tries = 1;
        loop {
            match c.run(attempt(q.clone())).await {
                Ok(v) => return Ok(v),
                Err(e) if tries < STATEMENT_TRIES && e.is_transient() => {
                    tracing::warn!(error = %e, "postgres statement retried");
                    tries += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Checks a store URL as [`PgStore::open`] reads it, without connecting: its syntax, its
/// `sslmode` (disable, prefer, require, verify-ca, verify-full), that its `sslrootcert` is
/// a readable PEM file of certificates, and its socket settings (`keepalives*`,
/// `tcp_user_timeout`). The error never quotes the URL (it may hold a password).
pub fn check_url(url: &str) -> Result<SslMode, String> {
    read_url(url).map(|l| l.tls.mode())
}

fn decode_conn(data: &str) -> StoreResult<Connection> {
    serde_json::from_str(data).map_err(json_err)
}
