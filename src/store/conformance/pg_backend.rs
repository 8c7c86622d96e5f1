//! The suite on PostgreSQL, each check in a database of its own (dropped afterwards), and
//! PostgreSQL's own checks: a missing database is created, migrations (once, under concurrent
//! opens; migration 4's repairs; migration 11 on connections denied before it), and the plans
//! of a lease and a pickup status.

use super::*;
use crate::store::postgres::MAX_CLOCK_SKEW;

/// Server URL without database; the checks make their own database on it.
pub(super) fn server_url() -> String {
    std::env::var("MAILROOM_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub(super) async fn admin() -> tokio_postgres::Client {
    let url = format!("{}/postgres", server_url());
    let (client, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url} ({e}); the PostgreSQL conformance tests \
             need it. Start it with `pg_ctlcluster --skip-systemctl-redirect \
             $(ls /etc/postgresql) main start` or set MAILROOM_TEST_PG"
        ),
    };
    tokio::spawn(conn);
    client
}

/// Drops test databases left by test processes that died before their cleanup (killed on
/// a timeout): `mailroom_test_<pid>_<hex>` whose pid no longer runs on this machine.
async fn drop_leftovers(admin: &tokio_postgres::Client) {
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datname LIKE 'mailroom\\_test\\_%'",
            &[],
        )
        .await
        .expect("list test databases");
    for r in rows {
        let name: String = r.get(0);
        let mut parts = name.trim_start_matches("mailroom_test_").splitn(2, '_');
        let (Some(pid), Some(rand)) = (parts.next(), parts.next()) else {
            continue;
        };
        let well_formed =
            pid.chars().all(|c| c.is_ascii_digit()) && rand.len() == 32 && rand.chars().all(|c| c.is_ascii_hexdigit());
        if well_formed && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            // Another run may be dropping it at the same moment: ignore errors.
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// `mailroom_test_<pid>_<random>` (a later run drops it if this process dies first).
pub(super) fn test_db_name() -> String {
    format!("mailroom_test_{}_{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

pub(super) async fn drop_test_db(name: &str) {
    admin()
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop test database");
}

/// `sql` run under `EXPLAIN ANALYZE` (in a transaction rolled back: a lease's update is
/// not kept): the rows its plan removed by filter, and the plan.
async fn rows_removed_by_filter(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> (u64, String) {
    db.batch_execute("BEGIN").await.unwrap();
    let plan: Vec<String> = db
        .query(&format!("EXPLAIN (ANALYZE, FORMAT TEXT) {sql}"), params)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    db.batch_execute("ROLLBACK").await.unwrap();
    let removed = plan
        .iter()
        .filter_map(|l| l.trim().strip_prefix("Rows Removed by Filter: "))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    (removed, plan.join("\n"))
}

pub struct PgBackend {
    pub url: String,
}

#[async_trait::async_trait]
impl Backend for PgBackend {
    async fn open(&self) -> Arc<dyn Store> {
        open_postgres(&self.url, 8).await.expect("open postgres store")
    }
}

/// Creates `mailroom_test_<pid>_<random>`, runs the check, drops the database.
pub async fn run<F, Fut>(check: F)
where
    F: FnOnce(Arc<dyn Backend>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = test_db_name();
    let admin = admin().await;
    drop_leftovers(&admin).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let b = Arc::new(PgBackend {
        url: format!("{}/{name}", server_url()),
    });
    let r = run_check(b, check).await;
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("drop test database");
    rethrow(r);
}

/// Runs `check` with the URL of a database of its own (a node's first open creates it), in a
/// task of its own, so that a failed assertion still drops the database afterwards.
pub(super) async fn in_own_db<F, Fut>(check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let name = test_db_name();
    let r = tokio::spawn(check(format!("{}/{name}", server_url()))).await;
    drop_test_db(&name).await;
    if let Err(e) = r {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A node pointed at a database that does not exist yet creates it (several at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_database_is_created() {
    let name = test_db_name();
    let url = format!("{}/{name}", server_url());
    let (a, b) = tokio::join!(open_postgres(&url, 2), open_postgres(&url, 2));
    let r = async {
        let (a, b) = (a?, b?);
        a.health().await?;
        let c = new_id();
        a.put_connection(&conn(&c)).await?;
        assert!(b.get_connection(&c).await?.is_some());
        Ok::<_, StoreError>(())
    }
    .await;
    drop_test_db(&name).await;
    r.unwrap();
}

/// A store written by an older version (one peer key listed by two connections; queue
/// counters that drifted while migration 3 ran beside older writers) is repaired by
/// migration 4: the latest holder keeps the key, counters are recounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_4_makes_keys_unique_and_recounts_queues() {
    let name = test_db_name();
    let admin = admin().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let url = format!("{}/{name}", server_url());
    let r = async move {
        let (c, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        migrate_to(&c, 3).await;
        let mut old = conn("old");
        old.their_verkeys = vec!["vk".into(), "vk-old".into()];
        let mut new = conn("new");
        new.their_verkeys = vec!["vk".into()];
        for (c_, written) in [(&old, 1i64), (&new, 2)] {
            c.execute(
                "INSERT INTO mailroom_connections (id, thread_id, written, data) VALUES ($1, NULL, $2, $3)",
                &[&c_.id, &written, &serde_json::to_string(c_).unwrap()],
            )
            .await
            .unwrap();
        }
        c.batch_execute(
            "INSERT INTO mailroom_connection_verkeys VALUES ('vk', 'old'), ('vk', 'new'), ('vk-old', 'old'); \
             INSERT INTO mailroom_messages (id, conn_id, recipient_key, payload, size, received_at_ms) \
               VALUES (nextval('mailroom_message_ids'), 'new', 'rk', '\\x00', 1, 0), (nextval('mailroom_message_ids'), 'new', 'rk', '\\x0000', 2, 0); \
             UPDATE mailroom_queue_counts SET n = 7, bytes = 70",
        )
        .await
        .unwrap();
        let s = open_postgres(&url, 2).await.unwrap();
        assert_eq!(s.connection_by_their_verkey("vk").await.unwrap().unwrap().id, "new");
        assert_eq!(s.connection_by_their_verkey("vk-old").await.unwrap().unwrap().id, "old");
        assert!(matches!(s.put_connection(&old).await, Err(StoreError::KeyTaken(_))));
        // Counters recounted: 2 queued, so a limit of 3 takes exactly one more.
        let lim = EnqueueLimits {
            max_messages: 3,
            ..EnqueueLimits::UNLIMITED
        };
        let r = s
            .enqueue(vec![msg("new", "a", T0), msg("new", "b", T0)], &lim)
            .await
            .unwrap();
        assert!(r[0].is_ok(), "{:?}", r[0]);
        assert!(
            matches!(r[1], Err(StoreError::QueueFull { pending: 3, .. })),
            "{:?}",
            r[1]
        );
    };
    let r = tokio::spawn(r).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop test database");
    r.unwrap();
}

/// Applies the store's migrations up to `version` only, as a node of that release did.
async fn migrate_to(c: &tokio_postgres::Client, version: i32) {
    c.batch_execute(
        "CREATE TABLE mailroom_schema (version integer PRIMARY KEY, \
         applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    for (v, sql) in super::super::postgres::MIGRATIONS.iter().filter(|(v, _)| *v <= version) {
        c.batch_execute(sql).await.unwrap();
        c.execute("INSERT INTO mailroom_schema (version) VALUES ($1)", &[v])
            .await
            .unwrap();
    }
}

/// A store written before migration 11, where a revocation whose key removal failed left a
/// denied connection holding its key (every forward to it was answered 2xx and never
/// delivered): once migrated, routed messages to it are refused. A granted connection whose
/// record merely reads like a denied one (its label, its extra data, a NUL) is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_11_refuses_connections_denied_before_it() {
    in_own_db(|url| async move {
        let name = url.rsplit('/').next().expect("a database name");
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let (c, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        migrate_to(&c, 10).await;
        let mut denied = conn("denied");
        denied.mediation = MediationState::Denied;
        denied.label = Some("a NUL: \0".into());
        let mut lookalike = conn("lookalike");
        lookalike.mediation = MediationState::Granted;
        lookalike.label = Some("\"mediation\":\"Denied\" \0".into());
        lookalike.extra = serde_json::json!({"mediation": "Denied", "x\"mediation": "Denied"});
        for (i, c_) in [&denied, &lookalike].into_iter().enumerate() {
            c.execute(
                "INSERT INTO mailroom_connections (id, thread_id, written, data) VALUES ($1, NULL, $2, $3)",
                &[&c_.id, &(i as i64), &serde_json::to_string(c_).unwrap()],
            )
            .await
            .unwrap();
            c.execute(
                "INSERT INTO mailroom_routing_keys (key, conn_id) VALUES ($1, $2)",
                &[&format!("rk-{}", c_.id), &c_.id],
            )
            .await
            .unwrap();
        }
        let s = open_postgres(&url, 2).await.unwrap();
        let r = s
            .enqueue_routed(
                vec![
                    msg("denied", "to the denied", T0),
                    msg("lookalike", "to the granted", T0),
                ],
                &EnqueueLimits::UNLIMITED,
            )
            .await
            .unwrap();
        assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
        assert!(r[1].is_ok(), "{:?}", r[1]);
        assert_eq!(s.total_queued().await.unwrap(), 1);
        // The revocation that failed then can be done again: it removes the key.
        assert_eq!(
            s.revoke_mediation("denied", T0).await.unwrap(),
            Some(vec!["rk-denied".to_owned()])
        );
        assert_eq!(s.route("rk-denied").await.unwrap(), None);
    })
    .await;
}

/// A lease reads the connection's pending messages and its leases that ran out, never the
/// messages it holds leased and not yet due (migration 9): with 1,999 of them ahead of the
/// one pending message, the statement's plan removes (almost) no row by filter. Through the
/// `(conn_id, id)` index alone it read all 1,999 first, on every lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_reads_messages_leased_and_not_due() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let c = new_conn(&s).await;
        let m = (0..2000).map(|i| msg(&c, &format!("{i}"), T0)).collect();
        enqueue_ok(&s, m).await;
        assert_eq!(s.lease(&c, 1999, "A", T0, T0 + 60_000).await.unwrap().len(), 1999);
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        let (removed, plan) = rows_removed_by_filter(
            &db,
            super::super::postgres::LEASE_SQL,
            &[
                &vec![c.as_str()],
                &vec![None::<&str>],
                &vec![10i64],
                &vec![T0 + 1],
                &vec![T0 + 1000],
                &vec!["B"],
                &vec![i64::MAX],
            ],
        )
        .await;
        assert!(removed < 50, "the lease read {removed} rows it could not take:\n{plan}");
        // And it takes the one pending message, then the first of those whose lease ran out.
        let got = s.lease(&c, 10, "B", T0 + 1, T0 + 1000).await.unwrap();
        assert_eq!(
            got.iter().map(|q| q.payload.clone()).collect::<Vec<_>>(),
            vec![b"1999".to_vec()]
        );
        let due = s.lease(&c, 2, "C", T0 + 60_000, T0 + 61_000).await.unwrap();
        assert_eq!(
            due.iter().map(|q| q.payload.clone()).collect::<Vec<_>>(),
            vec![b"0".to_vec(), b"1".to_vec()]
        );
        assert!(due.iter().all(|q| q.attempts == 2));
    })
    .await;
}

/// The pickup status that answers every acknowledgement reads what a lease reads, never
/// the messages held leased and not due: with 1,999 of them beside one pending message
/// its plan removes (almost) no row by filter. Counting the whole queue read all 1,999.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pickup_status_never_reads_messages_leased_and_not_due() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let c = new_conn(&s).await;
        let m = (0..2000).map(|i| msg(&c, &format!("{i}"), T0 + i)).collect();
        enqueue_ok(&s, m).await;
        assert_eq!(s.lease(&c, 1999, "A", T0, T0 + 60_000).await.unwrap().len(), 1999);
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        for key in [None, Some(format!("rk-{c}"))] {
            let (removed, plan) = rows_removed_by_filter(
                &db,
                super::super::postgres::PENDING_STATS_SQL,
                &[&c.as_str(), &(T0 + 1), &key.as_deref()],
            )
            .await;
            assert!(
                removed < 50,
                "the status ({key:?}) read {removed} rows it does not count:\n{plan}"
            );
        }
        assert_eq!(
            s.pending_stats(&c, None, T0 + 1).await.unwrap(),
            PendingStats {
                count: 1,
                oldest_received_ms: Some(T0 + 1999)
            }
        );
    })
    .await;
}

/// Several pools (nodes) open one fresh database at once: migrations apply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_open_migrates_once() {
    run(|b| async move {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.open().await }));
        }
        let mut stores = Vec::new();
        for t in tasks {
            stores.push(t.await.unwrap());
        }
        for s in &stores {
            s.health().await.unwrap();
            assert_eq!(s.backend(), "postgres");
        }
        // Two nodes on one queue: leases never overlap across pools either.
        let c = new_conn(&stores[0]).await;
        let m = (0..50).map(|i| msg(&c, &format!("{i}"), T0)).collect();
        enqueue_ok(&stores[1], m).await;
        let (a, b2) = tokio::join!(
            stores[2].lease(&c, 50, "n2", T0, T0 + 1000),
            stores[3].lease(&c, 50, "n3", T0, T0 + 1000)
        );
        let (a, b2) = (a.unwrap(), b2.unwrap());
        assert_eq!(a.len() + b2.len(), 50);
        let ia: HashSet<_> = ids(&a).into_iter().collect();
        assert!(ids(&b2).iter().all(|i| !ia.contains(i)));
    })
    .await
}

/// The idle-window cleanup every trailing-push poll runs first reads the idle windows only
/// (migration 17): with 2,000 windows holding a claim beside one idle, its plan removes no row
/// by filter. Before, it read the whole table on every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_window_cleanup_reads_only_idle_windows() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        for i in 0..2000 {
            s.push_event(&format!("busy-{i}"), T0, 1000, NewClaim::until(T0 + 60_000), None)
                .await
                .unwrap();
        }
        let idle = NewClaim::until(T0 + 60_000);
        s.push_event("idle", T0, 1000, idle, None).await.unwrap();
        assert!(s.push_done("idle", idle.token, None).await.unwrap());
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        db.batch_execute("ANALYZE mailroom_push_windows").await.unwrap();
        let before = T0 + 1;
        let (removed, plan) =
            rows_removed_by_filter(&db, crate::store::postgres::FORGET_IDLE_PUSH_WINDOWS, &[&before]).await;
        assert!(removed < 10, "{removed} rows read and dropped:\n{plan}");
        assert!(plan.contains("mailroom_push_windows_idle"), "{plan}");
    })
    .await;
}

/// The trailing-push poll forgets idle windows before it claims: when that cleanup fails, no
/// push is claimed (claimed and then failed, the claims would belong to no task until they
/// ran out, minutes later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_idle_cleanup_claims_no_trailing_push() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let c = "trailing-conn";
        s.push_event(c, T0, 1000, NewClaim::until(T0 + 60_000), None)
            .await
            .unwrap();
        s.push_event(c, T0 + 10, 1000, NewClaim::until(T0 + 60_000), None)
            .await
            .unwrap();
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        db.batch_execute(
            "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'injected: no deletes'; END $$; \
             CREATE TRIGGER refuse_delete BEFORE DELETE ON mailroom_push_windows \
             FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();",
        )
        .await
        .unwrap();
        let due = T0 + 1000;
        assert!(s.push_take_due(due, due + 60_000, T0, 10).await.is_err());
        db.batch_execute("DROP TRIGGER refuse_delete ON mailroom_push_windows")
            .await
            .unwrap();
        let taken = s.push_take_due(due + 1, due + 60_000, T0, 10).await.unwrap();
        assert_eq!(
            taken.iter().map(|t| t.conn.as_str()).collect::<Vec<_>>(),
            vec![c],
            "the failed poll claimed nothing: the next one takes the push"
        );
    })
    .await;
}

/// A claim written by a node of an earlier version (`claim_token` without `push_claim`),
/// taken again once it ran out, is a push of its own: it does not take the id of the push the
/// window held before (a webhook receiver would drop it as a repeat of that one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_an_earlier_version_made_is_not_taken_as_an_earlier_push() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let c = "upgraded-conn";
        let first = NewClaim::until(T0 + 1_000);
        s.push_event(c, T0, 1000, first, None).await.unwrap();
        assert!(s.push_done(c, first.token, None).await.unwrap());
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        // An earlier version's push_event: a new push claimed, push_id and push_claim untouched.
        db.execute(
            "UPDATE mailroom_push_windows SET last_push_ms = $2, claimed_until_ms = $3, claim_token = 4242 \
             WHERE conn_id = $1",
            &[&c, &(T0 + 5_000), &(T0 + 6_000)],
        )
        .await
        .unwrap();
        let taken = s.push_take_due(T0 + 6_000, T0 + 70_000, 0, 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        assert_ne!(taken[0].push_id, first.token, "not the push before it");
        assert_eq!(taken[0].push_id, taken[0].token);
        // Taken again by this version, it is the same push.
        let again = s.push_take_due(T0 + 70_000, T0 + 140_000, 0, 10).await.unwrap();
        assert_eq!(again[0].push_id, taken[0].push_id);
    })
    .await;
}

/// `drop_queue` takes the connection's enqueue lock: a batch that has inserted its messages
/// and not committed when the drop begins is waited for and dropped with the rest, never left
/// behind a drop that said the queue was gone. The batch is a transaction holding the lock (as
/// `mailroom_enqueue` does) with one message inserted, committed once the drop has either
/// finished or waits for a lock (the enqueue lock; without it, the queue counter's row the
/// insert updated, after which its DELETE's snapshot missed the message).
/// A raw client of `url` holding `conn`'s advisory lock (the one a batch, a revocation or a
/// removal takes) in a transaction it leaves open: `COMMIT` or `ROLLBACK` on it lets go.
async fn holding_conn_lock(url: &str, conn: &str) -> tokio_postgres::Client {
    use super::super::postgres::{lock_key, LOCK_NS};
    let (db, conn_task) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn_task);
    db.batch_execute("BEGIN").await.unwrap();
    db.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(conn)])
        .await
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_queue_drops_a_batch_committing_meanwhile() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let c = new_conn(&s).await;
        enqueue_ok(&s, vec![msg(&c, "before", T0)]).await;
        let db = holding_conn_lock(&url, &c).await;
        db.execute(
            "INSERT INTO mailroom_messages (id, conn_id, recipient_key, payload, size, received_at_ms) \
             VALUES (nextval('mailroom_message_ids'), $1, 'k', '\\x00', 1, $2)",
            &[&c, &T0],
        )
        .await
        .unwrap();
        let dropping = tokio::spawn({
            let (s, c) = (s.clone(), c.clone());
            async move { s.drop_queue(&c).await.unwrap() }
        });
        // Watched from a session outside any transaction: `db`'s would read the others'
        // activity once, at its first look, for the rest of its transaction.
        let (watch, watch_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(watch_task);
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while !dropping.is_finished() {
            let waiting: i64 = watch
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the drop neither finished nor waited");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        db.batch_execute("COMMIT").await.unwrap();
        assert_eq!(dropping.await.unwrap(), 2, "the drop did not count the batch's message");
        assert_eq!(
            s.queue_stats(&c, T0).await.unwrap().pending,
            0,
            "a message survived the drop"
        );
    })
    .await;
}

/// A database of the test's own whose default isolation level an operator raised (`ALTER
/// DATABASE ... SET default_transaction_isolation = 'repeatable read'`, for other clients): its
/// URL.
async fn repeatable_read_db(url: &str) {
    let name = url.rsplit('/').next().expect("a database name");
    let admin = admin().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
        ))
        .await
        .unwrap();
}

/// Waits until `n` sessions of the database at `url` wait on a lock, while none of `tasks` has
/// finished. Asked on a connection of its own, outside any transaction: a session reads the
/// activity of the others once per transaction.
async fn until_waiting_on_a_lock(url: &str, n: i64, tasks: &[&tokio::task::JoinHandle<impl Sized>]) {
    let (watch, conn_task) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn_task);
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "finished without waiting for the lock"
        );
        let waiting: i64 = watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{waiting} of {n} sessions wait for the lock");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Under a repeatable-read default, a forward whose batch waits for the connection's lock while
/// the connection's mediation is revoked (the revocation holds that lock, as
/// `revoke_mediation` does) finds no route once it has the lock. Its route check read a
/// snapshot of before the lock: it was queued, answered 2xx, and never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_under_a_repeatable_read_default() {
    in_own_db(|url| async move {
        repeatable_read_db(&url).await;
        let s = open_postgres(&url, 2).await.unwrap();
        let c = new_conn(&s).await;
        s.update_keys(&c, &[format!("rk-{c}")], &[]).await.unwrap();
        let mut denied = s.get_connection(&c).await.unwrap().unwrap();
        denied.mediation = MediationState::Denied;
        let db = holding_conn_lock(&url, &c).await;
        let forward = tokio::spawn({
            let (s, c) = (s.clone(), c.clone());
            async move {
                s.enqueue_routed(vec![msg(&c, "after the revocation", T0)], &EnqueueLimits::UNLIMITED)
                    .await
            }
        });
        until_waiting_on_a_lock(&url, 1, &[&forward]).await;
        db.execute(
            "UPDATE mailroom_connections SET data = $2 WHERE id = $1",
            &[&c, &serde_json::to_string(&denied).unwrap()],
        )
        .await
        .unwrap();
        db.execute("DELETE FROM mailroom_routing_keys WHERE conn_id = $1", &[&c])
            .await
            .unwrap();
        db.batch_execute("COMMIT").await.unwrap();
        let r = forward.await.unwrap().unwrap();
        assert!(matches!(r[0], Err(StoreError::NoRoute)), "{:?}", r[0]);
        assert_eq!(s.total_queued().await.unwrap(), 0, "queued for a denied connection");
    })
    .await;
}

/// Under a repeatable-read default, two nodes opening a fresh database at once both start: the
/// one that waited for the other's migrations reads the schema's version after the lock. From
/// a snapshot of before it, it applied migration 1 again ("relation already exists").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_under_a_repeatable_read_default() {
    use super::super::postgres::{LOCK_NS, MIGRATION_LOCK};
    in_own_db(|url| async move {
        repeatable_read_db(&url).await;
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        db.batch_execute("BEGIN").await.unwrap();
        db.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &MIGRATION_LOCK])
            .await
            .unwrap();
        let open = || {
            let url = url.clone();
            tokio::spawn(async move { open_postgres(&url, 2).await })
        };
        let (a, b) = (open(), open());
        until_waiting_on_a_lock(&url, 2, &[&a, &b]).await;
        db.batch_execute("COMMIT").await.unwrap();
        for s in [a.await.unwrap(), b.await.unwrap()] {
            let s = s.expect("a node opening the store beside another");
            s.health().await.unwrap();
        }
    })
    .await;
}

/// A node's leases past one batch of `release_owners_under` all go back, and the connections
/// of every batch are named: 25,000 leases of `n1/` owners (10,000 a batch), the second
/// connection's all after the first 15,000, beside one lease of another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_owners_under_releases_past_one_batch() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let (a, b) = (new_conn(&s).await, new_conn(&s).await);
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        db.execute(
            "INSERT INTO mailroom_messages \
               (id, conn_id, recipient_key, payload, size, received_at_ms, lease_until_ms, lease_owner, attempts) \
             SELECT nextval('mailroom_message_ids'), CASE WHEN i <= 15000 THEN $1 ELSE $2 END, 'k', '\\x00', 1, $3::int8, \
               $3::int8 + 60000, CASE WHEN i = 20000 THEN 'n2/http' ELSE 'n1/ws/' || i END, 1 \
             FROM generate_series(1, 25001) i",
            &[&a, &b, &T0],
        )
        .await
        .unwrap();
        let mut both = vec![a.clone(), b.clone()];
        both.sort();
        assert_eq!(s.release_owners_under("n1/", i64::MAX).await.unwrap(), both);
        let owners: Vec<String> = db
            .query(
                "SELECT lease_owner FROM mailroom_messages WHERE lease_owner IS NOT NULL",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            owners,
            vec!["n2/http".to_owned()],
            "every n1/ lease released, n2's kept"
        );
        assert_eq!(s.queue_stats(&b, T0).await.unwrap().pending, 10_000);
    })
    .await;
}

/// The status page's lists (`top_queues`, asked every 10 s) read one message per connection
/// with mail, never a whole queue: with 2,000 messages queued for one connection beside two
/// small queues, each statement's plan reads at most three rows of the messages (returned or
/// filtered out). Before, the
/// oldest list grouped every queued message and the deepest one took a minimum over each deep
/// queue's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_lists_read_one_message_per_queue() {
    in_own_db(|url| async move {
        let s = open_postgres(&url, 2).await.unwrap();
        let (deep, old, young) = (new_conn(&s).await, new_conn(&s).await, new_conn(&s).await);
        enqueue_ok(
            &s,
            (0..1999).map(|i| msg(&deep, &format!("{i}"), T0 + 10 + i)).collect(),
        )
        .await;
        // Queued last, received before the others of its queue.
        enqueue_ok(&s, vec![msg(&deep, "late", T0 + 5)]).await;
        enqueue_ok(&s, vec![msg(&old, "a", T0), msg(&old, "b", T0 + 1)]).await;
        enqueue_ok(&s, vec![msg(&young, "c", T0 + 5000)]).await;
        let top = s.top_queues(10).await.unwrap();
        let summary = |v: &[QueueSummary]| {
            v.iter()
                .map(|q| (q.connection.clone(), q.depth, q.oldest_received_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            summary(&top.deepest),
            vec![
                (deep.clone(), 2000, Some(T0 + 5)),
                (old.clone(), 2, Some(T0)),
                (young.clone(), 1, Some(T0 + 5000))
            ]
        );
        assert_eq!(
            summary(&top.oldest),
            vec![
                (old.clone(), 2, Some(T0)),
                (deep.clone(), 2000, Some(T0 + 5)),
                (young.clone(), 1, Some(T0 + 5000))
            ]
        );
        let (db, conn_task) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn_task);
        db.batch_execute("ANALYZE mailroom_messages; ANALYZE mailroom_queue_counts")
            .await
            .unwrap();
        for sql in [
            super::super::postgres::TOP_DEEPEST_SQL,
            super::super::postgres::TOP_OLDEST_SQL,
        ] {
            let plan: Vec<String> = db
                .query(&format!("EXPLAIN (ANALYZE, FORMAT TEXT) {sql}"), &[&10i64])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Rows the plan's scans of the messages read (returned, or removed by a filter),
            // over all their loops.
            let field = |l: &str, name: &str| -> u64 {
                let v = &l[l.find(name).unwrap() + name.len()..];
                v[..v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len())]
                    .parse()
                    .unwrap()
            };
            let (mut read, mut loops) = (0, None);
            for l in &plan {
                if l.contains("(actual") {
                    let actual = &l[l.find("(actual").unwrap()..];
                    loops = l.contains(" on mailroom_messages ").then(|| field(actual, " loops="));
                    read += loops.map_or(0, |n| n * field(actual, " rows="));
                } else if l.contains("Rows Removed by Filter: ") {
                    read += loops.map_or(0, |n| n * field(l, "Rows Removed by Filter: "));
                }
            }
            assert!(read <= 3, "{read} messages read:\n{}", plan.join("\n"));
        }
    })
    .await;
}

/// The node's clock now, as the store's callers read it (PostgreSQL runs on this machine).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A node whose clock steps (an hour ahead, ten minutes behind) acts on no row every node
/// shares by it, from its next call on (no health check between): the passes that delete by
/// the node's clock delete nothing, and leases, hand-off leases, push windows and replay
/// records answer `Unavailable` as in an outage. Before, a node stepped ahead deleted dedup and replay
/// records and messages early and took other nodes' live leases. Within the bound, or once
/// its clock is fixed, each call does its work (what the refusal stands between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_steps_acts_on_no_shared_row_by_it() {
    in_own_db(|url| async move {
        let pg = Arc::new(PgStore::open(&url, 2).await.unwrap());
        let s: Arc<dyn Store> = pg.clone();
        let x = new_conn(&s).await;
        let bare = new_conn(&s).await;
        let expiring = NewMessage {
            expires_at_ms: Some(T0 + 10),
            ..dmsg(&x, "a", T0, 1)
        };
        enqueue_ok(&s, vec![expiring, msg(&x, "b", T0)]).await;
        assert!(s.first_sight(&[7; 32], T0, T0 + 10).await.unwrap());
        let later = T0 + 1_000_000;
        let handed = || NewMessage {
            lease: Some(LeaseTo {
                owner: "handoff:n2".into(),
                until_ms: later + 30_000,
            }),
            ..msg(&x, "c", later)
        };
        let bound = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap();
        for shift in [3_600_000, -600_000] {
            pg.shift_clock_for_test(shift);
            assert_eq!(s.prune_dedup(later, 100).await.unwrap(), 0, "{shift}: dedup");
            assert_eq!(s.prune_sights(later, 100).await.unwrap(), 0, "{shift}: sights");
            assert_eq!(s.expire_due(later, 100).await.unwrap(), 0, "{shift}: expires_time");
            assert_eq!(s.expire(later).await.unwrap(), 0, "{shift}: TTL");
            assert!(!s.delete_unmediated(&bare, later).await.unwrap(), "{shift}: unmediated");
            let unavailable = |what: &str, r: StoreResult<String>| match r {
                Err(StoreError::Unavailable(why)) => assert!(why.contains("clock skew"), "{why}"),
                r => panic!("{shift}: {what}: {r:?}"),
            };
            let lease = s.lease(&x, 10, "n1/x", later, later + 30_000).await;
            unavailable("lease", lease.map(|v| format!("{v:?}")));
            let hand = s.enqueue(vec![handed()], &EnqueueLimits::UNLIMITED).await;
            unavailable("hand-off", hand.map(|v| format!("{v:?}")));
            let push = s
                .push_event(&x, later, 60_000, NewClaim::until(later + 30_000), None)
                .await;
            unavailable("push_event", push.map(|v| format!("{v:?}")));
            let take = s.push_take_due(later, later + 30_000, 0, 10).await;
            unavailable("push_take_due", take.map(|v| format!("{v:?}")));
            let sight = s.first_sight(&[7; 32], later, later + 10).await;
            unavailable("first_sight", sight.map(|v| format!("{v:?}")));
            // What a refused first_sight's caller does next: it forgets nothing, since the
            // record there is another call's (a copy's until_ms is the original's).
            s.forget_sight(&[7; 32], T0 + 10).await.unwrap();
        }
        // Off by less than the bound: a synced node is never refused.
        pg.shift_clock_for_test(bound / 2);
        assert_eq!(s.prune_dedup(later, 100).await.unwrap(), 1);
        assert!(s.first_sight(&[8; 32], later, later + 10).await.unwrap());
        assert_eq!(
            s.prune_sights(later, 100).await.unwrap(),
            1,
            "the record forget_sight left"
        );
        assert_eq!(s.expire_due(later, 100).await.unwrap(), 1);
        assert_eq!(s.lease(&x, 10, "n1/x", later, later + 30_000).await.unwrap().len(), 1);
        enqueue_ok(&s, vec![handed()]).await;
        assert!(s.delete_unmediated(&bare, later).await.unwrap());
        assert_eq!(s.expire(later + 1).await.unwrap(), 2);
        assert!(matches!(
            s.push_event(&x, later, 60_000, NewClaim::until(later + 30_000), None)
                .await,
            Ok(PushSlot::Now)
        ));
        s.push_take_due(later, later + 30_000, 0, 10).await.unwrap();
    })
    .await;
}

/// A push window never holds a last push past the server's clock plus [`MAX_CLOCK_SKEW`]: a
/// node that ran ahead wrote its own time there, and once back every event read the wallet as
/// pushed in the future, its trailing push an hour out (an offline wallet left unwoken for an
/// hour). Neither a time given ahead (the event that pushes) nor one already held (written
/// before) puts the next event's trailing push past the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_window_written_ahead_does_not_silence_the_wallet() {
    in_own_db(|url| async move {
        let pg = Arc::new(PgStore::open(&url, 2).await.unwrap());
        let s: Arc<dyn Store> = pg.clone();
        let (x, y) = (new_conn(&s).await, new_conn(&s).await);
        let (hour, window) = (3_600_000, 60_000);
        let slack = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap() + 5_000;
        // The event that pushes, given a time an hour ahead.
        let ahead = wall_ms() + hour;
        let r = s.push_event(&x, ahead, window, NewClaim::until(ahead + 1), None).await;
        assert!(matches!(r, Ok(PushSlot::Now)), "{r:?}");
        // A window written an hour ahead before (by a node whose clock was).
        let db = pg.session_for_test().await;
        db.execute(
            "INSERT INTO mailroom_push_windows (conn_id, last_push_ms) VALUES ($1, $2)",
            &[&y, &(wall_ms() + hour)],
        )
        .await
        .unwrap();
        for c in [&x, &y] {
            let now = wall_ms();
            match s.push_event(c, now, window, NewClaim::until(now + 1), None).await {
                Ok(PushSlot::Trailing { due_ms }) => {
                    assert!(due_ms <= now + window + slack, "{c}: due {} ms out", due_ms - now)
                }
                Ok(PushSlot::Now) => {}
                r => panic!("{c}: {r:?}"),
            }
        }
        // A take given a time an hour ahead.
        let now = wall_ms();
        let taken = s.push_take_due(now + hour, now + hour + 1, 0, 10).await.unwrap();
        assert_eq!(taken.len(), 2, "both trailing pushes taken");
        let now = wall_ms();
        match s.push_event(&x, now, window, NewClaim::until(now + 1), None).await {
            Ok(PushSlot::Trailing { due_ms }) => assert!(due_ms <= now + window + slack, "due {} ms out", due_ms - now),
            r => panic!("after a take ahead: {r:?}"),
        }
    })
    .await;
}

/// A node whose clock is off past the bound still queues forwards (refusing them would stop
/// every one), but writes their received time in the server's time: behind by more than the
/// message TTL, its message is not deleted at once by a synced node's TTL sweep (lost after
/// its sender was answered) and is leased from there, and its dedup record is found by a copy
/// the synced node queues now; ahead, its dedup record does not make a copy queued by a
/// synced node after the window a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_off_queues_messages_in_the_servers_time() {
    in_own_db(|url| async move {
        let skewed = Arc::new(PgStore::open(&url, 2).await.unwrap());
        let a: Arc<dyn Store> = skewed.clone();
        let b: Arc<dyn Store> = Arc::new(PgStore::open(&url, 2).await.unwrap());
        let x = new_conn(&b).await;
        let (ttl, hour, window) = (30 * 24 * 3_600_000_i64, 3_600_000_i64, 60_000_i64);
        let limits = EnqueueLimits {
            dedup_window_ms: window,
            ..EnqueueLimits::UNLIMITED
        };
        let slack = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap() + 5_000;
        // Behind by the TTL and an hour: the times it reads are a TTL and an hour old.
        let behind = -(ttl + hour);
        skewed.shift_clock_for_test(behind);
        let late = a
            .enqueue(vec![dmsg(&x, "late", wall_ms() + behind, 1)], &limits)
            .await
            .unwrap();
        assert!(matches!(late[..], [Ok(Enqueued { duplicate: false, .. })]), "{late:?}");
        assert_eq!(
            b.expire(wall_ms() - ttl).await.unwrap(),
            0,
            "the synced node's TTL sweep"
        );
        let now = wall_ms();
        let copy = b.enqueue(vec![dmsg(&x, "late", now, 1)], &limits).await.unwrap();
        assert!(
            matches!(copy[..], [Ok(Enqueued { duplicate: true, .. })]),
            "a copy now: {copy:?}"
        );
        let leased = b.lease(&x, 10, "n2/x", now, now + 30_000).await.unwrap();
        assert_eq!(leased.iter().map(|m| &m.payload[..]).collect::<Vec<_>>(), [b"late"]);
        let at = leased[0].received_at_ms;
        assert!(
            (at - now).abs() <= slack,
            "received {} ms from the server's time",
            at - now
        );
        // Ahead by an hour: a copy the synced node queues once the window has passed is queued.
        skewed.shift_clock_for_test(hour);
        enqueue_ok(&a, vec![dmsg(&x, "early", wall_ms() + hour, 2)]).await;
        let after = wall_ms() + window + slack;
        let copy = b.enqueue(vec![dmsg(&x, "early", after, 2)], &limits).await.unwrap();
        assert!(
            matches!(copy[..], [Ok(Enqueued { duplicate: false, .. })]),
            "after the window: {copy:?}"
        );
    })
    .await;
}
