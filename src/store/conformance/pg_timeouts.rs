//! The store link's bounds against the real server: a link that goes silent (a proxy that
//! swallows every byte both ways while the TCP connections stay up, as a partition behind a
//! NAT or a frozen database host looks to the node), a connection's enqueue lock held by a
//! session that froze in its transaction, and the session settings the server applies.
//!
//! Every store call here runs under a test timeout well above the store's own bound: before
//! the bounds, these calls waited for as long as the link stayed silent (for ever, behind the
//! proxy) or the lock stayed held.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::pg_backend::{admin, drop_test_db, server_url, test_db_name};
use super::*;
use crate::store::postgres::{lock_key, LOCK_NS};

/// Far above every bound the store is opened with here, far below the kernel's timeouts.
const HUNG: Duration = Duration::from_secs(20);

/// `f`, or a panic naming `what` if it takes [`HUNG`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(HUNG, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HUNG:?} (hung)"))
}

/// Runs `check(db)` on its own task with a fresh database, then drops it even on failure.
async fn with_db<F, Fut>(check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let db = test_db_name();
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create test database");
    let r = tokio::spawn(check(db.clone())).await;
    drop_test_db(&db).await;
    rethrow(r);
}

/// A TCP proxy to the server whose links can go silent: while `silent` is set, every byte
/// either way is read and dropped and no connection is closed.
struct SilentProxy {
    port: u16,
    silent: Arc<AtomicBool>,
}

impl SilentProxy {
    async fn start() -> SilentProxy {
        let cfg: tokio_postgres::Config = server_url().parse().expect("MAILROOM_TEST_PG is a postgres:// URL");
        let Some(tokio_postgres::config::Host::Tcp(host)) = cfg.get_hosts().first() else {
            panic!("the silent-link checks need a TCP host in {}", server_url());
        };
        let target = format!("{host}:{}", cfg.get_ports().first().copied().unwrap_or(5432));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent = Arc::new(AtomicBool::new(false));
        let s = silent.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (s, target) = (s.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_rd, in_wr) = inbound.into_split();
                    let (out_rd, out_wr) = outbound.into_split();
                    tokio::select! {
                        _ = pipe(in_rd, out_wr, s.clone()) => {}
                        _ = pipe(out_rd, in_wr, s) => {}
                    }
                });
            }
        });
        SilentProxy { port, silent }
    }

    /// `server_url()` through the proxy, to database `db`, with `params`.
    fn url(&self, db: &str, params: &str) -> String {
        let base = server_url();
        let creds_end = base.rfind('@').map_or(base.find("://").unwrap() + 3, |i| i + 1);
        format!("{}127.0.0.1:{}/{db}?{params}", &base[..creds_end], self.port)
    }

    fn go_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either ends; drops what it reads while `silent` is set.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !silent.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn open_bounded(url: &str, statement_timeout: Duration) -> Arc<dyn Store> {
    open_postgres_with(url, 2, statement_timeout)
        .await
        .unwrap_or_else(|e| panic!("open the store: {e}"))
}

/// A raw session of the test (not the store's), in database `db`.
async fn raw_session(db: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(&format!("{}/{db}", server_url()), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

fn unavailable<T: std::fmt::Debug>(r: &StoreResult<T>) -> bool {
    matches!(r, Err(StoreError::Unavailable(_)))
}

/// The link goes silent: health, an enqueue batch and a lease batch each fail with
/// `Unavailable` within the statement timeout instead of waiting for the link. Once it
/// speaks again, the very next calls succeed: no connection left waiting went back to the
/// pool (its stale answer would have gone to the next caller, or the caller would have waited
/// behind it), and what was queued before is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_link_fails_calls_within_the_statement_timeout_and_never_reuses_their_connections() {
    with_db(|db| async move {
        let proxy = SilentProxy::start().await;
        let t = Duration::from_secs(1);
        let s = open_bounded(&proxy.url(&db, "sslmode=disable"), t).await;
        let c = new_conn(&s).await;
        enqueue_ok(&s, vec![msg(&c, "before", T0)]).await;
        s.health().await.unwrap();

        proxy.go_silent(true);
        let started = Instant::now();
        let (health, enq, lease) = within(
            "calls on a silent link",
            futures_util::future::join3(
                s.health(),
                s.enqueue(vec![msg(&c, "during", T0 + 1)], &EnqueueLimits::UNLIMITED),
                s.lease(&c, 10, "n1", T0, T0 + 60_000),
            ),
        )
        .await;
        let took = started.elapsed();
        assert!(unavailable(&health), "{health:?}");
        assert!(unavailable(&enq), "{enq:?}");
        assert!(unavailable(&lease), "{lease:?}");
        // Each call is bounded by 1 s; they ran side by side.
        assert!(took < Duration::from_secs(5), "the calls took {took:?}");

        proxy.go_silent(false);
        // The first call after the link is back answers: it does not get a connection that
        // still waits for an answer swallowed by the silence.
        within("health once the link is back", s.health()).await.unwrap();
        within("an enqueue once the link is back", async {
            enqueue_ok(&s, vec![msg(&c, "after", T0 + 2)]).await
        })
        .await;
        let got = within(
            "a lease once the link is back",
            s.lease(&c, 10, "n1", T0 + 3, T0 + 60_000),
        )
        .await
        .unwrap();
        let payloads: Vec<&[u8]> = got.iter().map(|m| m.payload.as_slice()).collect();
        // "during" was refused (503): whether it committed is the sender's retry's business
        // (dedup); here it did not reach the server at all.
        assert_eq!(payloads, vec![&b"before"[..], &b"after"[..]]);
    })
    .await;
}

/// `n` calls made at once by `call(store, connection, i)` on a store whose link goes silent
/// (statement timeout 2 s), each refused: the slowest answer, checked within two statement
/// timeouts and a half (`what` names the calls).
async fn slowest_on_a_silent_link<F, Fut, T>(db: &str, n: usize, what: &str, call: F)
where
    F: Fn(Arc<dyn Store>, String, usize) -> Fut,
    Fut: Future<Output = StoreResult<T>>,
    T: std::fmt::Debug,
{
    let proxy = SilentProxy::start().await;
    let t = Duration::from_secs(2);
    let s = open_bounded(&proxy.url(db, "sslmode=disable"), t).await;
    let c = new_conn(&s).await;
    proxy.go_silent(true);
    let calls = (0..n).map(|i| {
        let started = Instant::now();
        let r = call(s.clone(), c.clone(), i);
        async move { (r.await, started.elapsed()) }
    });
    let answers = within(what, futures_util::future::join_all(calls)).await;
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    assert!(
        answers.iter().all(|(r, _)| unavailable(r)),
        "{what}: all refused, the link is silent"
    );
    assert!(
        slowest < t * 5 / 2,
        "{what}: one waited {slowest:?} (statement timeout {t:?}), behind every statement before it"
    );
}

/// More forwards wait on a silent link than one batch takes (1,024 messages): each is answered
/// within its turn and its own batch (twice the statement timeout), not after every batch
/// before it timed out in turn (the backlog of a node taking forwards faster than a batch per
/// statement timeout grew without bound, holding every payload meanwhile). Those whose turn
/// came after their timeout are answered without being sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_waiting_on_a_silent_link_are_answered_within_two_statement_timeouts() {
    with_db(|db| async move {
        // Three batches' worth, each forward its own call.
        let n = 3 * crate::store::postgres::MAX_BATCH_MESSAGES;
        slowest_on_a_silent_link(&db, n, "forwards on a silent link", |s, c, i| async move {
            s.enqueue(vec![msg(&c, &format!("m{i}"), T0)], &EnqueueLimits::UNLIMITED)
                .await
        })
        .await;
    })
    .await;
}

/// The same for leases: one connection's requests go one per lease statement, so four of them
/// on a silent link waited four statement timeouts; each is now answered within two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_waiting_on_a_silent_link_are_answered_within_two_statement_timeouts() {
    with_db(|db| async move {
        slowest_on_a_silent_link(&db, 4, "leases on a silent link", |s, c, i| async move {
            s.lease(&c, 10, &format!("n1/ws/{i}"), T0, T0 + 60_000).await
        })
        .await;
    })
    .await;
}

/// A session that froze in a transaction holds connection X's enqueue lock: an enqueue batch
/// holding messages for X and for Y answers X's with `Unavailable` once the server's lock
/// timeout (half the statement timeout) passes, and queues Y's. Before, the batch waited for
/// the lock as long as it was held, and every forward of the node (one writer, batches of
/// every connection) with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_batch_refuses_only_the_connection_whose_lock_another_session_holds() {
    with_db(|db| async move {
        // A lock timeout of 3 s: far above what the second refusal below may take on a
        // loaded box, so that one tells "checked the lock" from "waited for it again".
        let t = Duration::from_secs(6);
        let s = open_bounded(&format!("{}/{db}", server_url()), t).await;
        let (x, y) = (new_conn(&s).await, new_conn(&s).await);
        let holder = raw_session(&db).await;
        holder.batch_execute("BEGIN").await.unwrap();
        holder
            .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(&x)])
            .await
            .unwrap();

        let started = Instant::now();
        let r = within(
            "an enqueue while X's lock is held",
            s.enqueue(
                vec![msg(&x, "x1", T0), msg(&y, "y1", T0), msg(&x, "x2", T0)],
                &EnqueueLimits::UNLIMITED,
            ),
        )
        .await
        .expect("the batch itself is answered");
        let took = started.elapsed();
        assert!(unavailable(&r[0]) && unavailable(&r[2]), "{r:?}");
        assert!(r[1].is_ok(), "{r:?}");
        assert!(took < t + Duration::from_secs(1), "answered after {took:?}");
        // X alone: refused too, and at once: the writer remembers X's lock stuck and checks
        // it is still held rather than wait for the lock timeout (3 s) again.
        let started = Instant::now();
        let r = within(
            "an enqueue for X alone",
            s.enqueue(vec![msg(&x, "x3", T0)], &EnqueueLimits::UNLIMITED),
        )
        .await
        .unwrap();
        assert!(unavailable(&r[0]), "{r:?}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "waited {took:?} again for a lock known stuck"
        );

        holder.batch_execute("ROLLBACK").await.unwrap();
        enqueue_ok(&s, vec![msg(&x, "x4", T0 + 1)]).await;
        let of = |v: Vec<QueuedMessage>| v.into_iter().map(|m| m.payload).collect::<Vec<_>>();
        assert_eq!(
            of(s.lease(&x, 10, "n1", T0 + 2, T0 + 60_000).await.unwrap()),
            vec![b"x4".to_vec()]
        );
        assert_eq!(
            of(s.lease(&y, 10, "n1", T0 + 2, T0 + 60_000).await.unwrap()),
            vec![b"y1".to_vec()]
        );
    })
    .await;
}

/// Waits (a test bound of [`HUNG`]) until a session of `db` waits for the enqueue lock of
/// `conn`; false if none did.
async fn waits_for_lock(watcher: &tokio_postgres::Client, conn: &str) -> bool {
    let deadline = Instant::now() + HUNG;
    while Instant::now() < deadline {
        let n: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND objsubid = 2 AND objid = ($1::int4::int8 & 4294967295)::oid",
                &[&lock_key(conn)],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Only a lock its holder keeps without waiting itself is taken for stuck. While a batch waits
/// on X's lock (a frozen session holds it), another node's batch holds Y's lock and waits on
/// X too, as every batch with X does (keys are taken in order): when the first batch looks at
/// the locks, Y is held by a waiter that will give it up at its own lock timeout. The batch,
/// rerun without X, waits for Y and queues it. Before, every lock held at that instant
/// counted: Y's forwards were refused with X's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_a_waiting_batch_is_not_taken_for_a_stuck_one() {
    with_db(|db| async move {
        // lock_timeout 3 s: the batch waits that long on X before it looks at the locks, and
        // may take until 6 s in all.
        let s = open_bounded(&format!("{}/{db}", server_url()), Duration::from_secs(6)).await;
        // X's lock sorts before Y's: the batch waits on X while Y is free.
        let (x, y) = loop {
            let (a, b) = (new_conn(&s).await, new_conn(&s).await);
            match lock_key(&a).cmp(&lock_key(&b)) {
                std::cmp::Ordering::Less => break (a, b),
                std::cmp::Ordering::Greater => break (b, a),
                std::cmp::Ordering::Equal => {}
            }
        };
        let frozen = raw_session(&db).await;
        frozen.batch_execute("BEGIN").await.unwrap();
        frozen
            .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(&x)])
            .await
            .unwrap();
        let (other, watcher) = (raw_session(&db).await, raw_session(&db).await);
        let store = s.clone();
        let (mx, my) = (msg(&x, "x1", T0), msg(&y, "y1", T0));
        let batch = tokio::spawn(async move { store.enqueue(vec![mx, my], &EnqueueLimits::UNLIMITED).await });
        assert!(waits_for_lock(&watcher, &x).await, "the batch waits on X");
        // The other node's batch: Y's lock, then a wait on X that its own lock timeout ends
        // between the first batch's look at the locks (3 s) and its deadline (6 s).
        other.batch_execute("SET lock_timeout = '4s'; BEGIN").await.unwrap();
        other
            .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(&y)])
            .await
            .unwrap();
        let waiting = tokio::spawn(async move {
            let r = other
                .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(&x)])
                .await;
            other.batch_execute("ROLLBACK").await.unwrap();
            r.is_err()
        });
        let r = within("the batch", batch)
            .await
            .unwrap()
            .expect("the batch itself is answered");
        assert!(unavailable(&r[0]), "X's lock is stuck: {r:?}");
        assert!(r[1].is_ok(), "Y's lock was held by a batch waiting itself: {r:?}");
        assert!(within("the other batch", waiting).await.unwrap(), "it gave up on X");
        frozen.batch_execute("ROLLBACK").await.unwrap();
    })
    .await;
}

/// A node that froze (or lost its link) inside a transaction holding X's enqueue lock: the
/// server ends that session once it has been idle in the transaction for three statement
/// timeouts, the lock goes with it, and X's forwards are queued again (from any node). Its
/// sessions carry the server-side timeouts derived from the statement timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_in_a_transaction_is_ended_by_the_server_and_its_locks_freed() {
    with_db(|db| async move {
        let url = format!("{}/{db}", server_url());
        let frozen = PgStore::open_with(&url, 2, Duration::from_secs(1)).await.unwrap();
        let session = frozen.session_for_test().await;
        let show = |name: &'static str| {
            let session = &session;
            async move {
                let row = session.query_one(&format!("SHOW {name}"), &[]).await.unwrap();
                row.get::<_, String>(0)
            }
        };
        assert_eq!(show("lock_timeout").await, "500ms");
        assert_eq!(show("idle_in_transaction_session_timeout").await, "3s");

        let other = open_bounded(&url, Duration::from_secs(2)).await;
        let x = new_conn(&other).await;
        session.batch_execute("BEGIN").await.unwrap();
        session
            .execute("SELECT pg_advisory_xact_lock($1, $2)", &[&LOCK_NS, &lock_key(&x)])
            .await
            .unwrap();
        // The node freezes here: its transaction sends nothing more.
        let started = Instant::now();
        let r = within(
            "an enqueue while the frozen session holds X's lock",
            other.enqueue(vec![msg(&x, "refused", T0)], &EnqueueLimits::UNLIMITED),
        )
        .await
        .unwrap();
        assert!(unavailable(&r[0]), "{r:?}");
        let queued = within("X's enqueues once the server ended the frozen session", async {
            loop {
                let r = other
                    .enqueue(vec![msg(&x, "queued", T0)], &EnqueueLimits::UNLIMITED)
                    .await
                    .unwrap();
                if r[0].is_ok() {
                    return started.elapsed();
                }
                assert!(unavailable(&r[0]), "{r:?}");
            }
        })
        .await;
        assert!(queued >= Duration::from_secs(2), "the lock went after {queued:?}");
        // The frozen session is gone: its next statement fails.
        let err = session.batch_execute("SELECT 1").await.unwrap_err();
        assert!(
            err.is_closed() || err.to_string().contains("idle-in-transaction"),
            "{err}"
        );
    })
    .await;
}

/// The URL's own settings win: a `lock_timeout` in its `options` is the session's, the idle
/// transaction timeout still follows the statement timeout; the default statement timeout
/// gives 5 s and 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_timeouts_of_the_url_options_win() {
    with_db(|db| async move {
        let show = |s: deadpool_postgres::Object, name: &'static str| async move {
            s.query_one(&format!("SHOW {name}"), &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        };
        let url = format!("{}/{db}", server_url());
        let default = PgStore::open(&url, 2).await.unwrap();
        assert_eq!(show(default.session_for_test().await, "lock_timeout").await, "5s");
        assert_eq!(
            show(default.session_for_test().await, "idle_in_transaction_session_timeout").await,
            "30s"
        );
        let own = PgStore::open_with(
            &format!("{url}?options=-c%20lock_timeout%3D7000"),
            2,
            Duration::from_secs(4),
        )
        .await
        .unwrap();
        assert_eq!(show(own.session_for_test().await, "lock_timeout").await, "7s");
        assert_eq!(
            show(own.session_for_test().await, "idle_in_transaction_session_timeout").await,
            "12s"
        );
    })
    .await;
}
