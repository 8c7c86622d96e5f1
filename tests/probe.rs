//! `mailroom probe` against a real mailroom node: every check passes (the binary, as an
//! operator runs it), the exit codes for bad arguments, and nodes on a store that breaks one
//! behaviour: the checks of that behaviour must FAIL (a check that cannot fail proves nothing).

mod common;

use common::{start, start_on, test_config};
use mailroom::config::Strategy;
use mailroom::store::*;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mailroom");

/// Every check the probe runs, in its order (a check that silently stops running is a failure).
const CHECKS: &[&str] = &[
    "onboarding-didexchange",
    "onboarding-connections",
    "discover-features",
    "mediation",
    "keylist-update",
    "keylist-query",
    "forward",
    "pickup-2.0-status",
    "pickup-2.0-delivery",
    "pickup-2.0-messages-received",
    "pickup-1.0-batch",
    "redelivery",
    "live-mode-ws",
    "redelivery-session-end",
    "live-mode-ack",
    "implicit-ws",
    "isolation-read",
    "isolation-ack",
    "isolation-forward",
    "key-takeover",
    "replay",
    "malformed-garbage",
    "malformed-truncated",
    "malformed-wrong-key",
    "malformed-unknown-type",
    "malformed-huge",
];

/// The probe's stdout (printed, with its stderr, for a failing test's log).
fn shown(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The names of the checks the report holds, in order.
fn ran(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("PASS ")
                .or_else(|| l.strip_prefix("FAIL "))
                .or_else(|| l.strip_prefix("SKIP "))?;
            Some(rest.split(':').next().unwrap_or(rest))
        })
        .collect()
}

/// The verdict (`PASS`, `FAIL`, `SKIP`) of check `name` in the report, if it ran.
fn verdict<'a>(stdout: &'a str, name: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| {
        let (v, rest) = l.split_once(' ')?;
        let n = rest.split(':').next().unwrap_or(rest);
        (matches!(v, "PASS" | "FAIL" | "SKIP") && n == name).then_some(v)
    })
}

async fn probe(args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(BIN)
            .arg("probe")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the probe finishes within 240 s")
    .expect("the probe starts")
}

#[actix_rt::test]
async fn every_check_passes_against_mailroom() {
    let dir = tempfile::tempdir().unwrap();
    // test_config: 2 s leases, so `redelivery` (over HTTP, after the lease) takes ~2 s.
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[
        &url,
        "--redelivery-wait-secs",
        "15",
        "--huge-bytes",
        &(6usize << 20).to_string(),
    ])
    .await;
    let stdout = shown(&out);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(ran(&stdout), CHECKS, "the checks that ran, in order");
    let not_passed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("FAIL ") || l.starts_with("SKIP "))
        .collect();
    assert!(
        not_passed.is_empty(),
        "against mailroom every check passes: {not_passed:#?}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("{} passed, 0 failed, 0 skipped", CHECKS.len()).as_str())
    );
    assert_eq!(out.status.code(), Some(0));
    // The probe tidies after itself: every key it registered removed, every message it was
    // handed acknowledged; only the connections stay (DIDComm v1 cannot end one).
    let left = lines
        .iter()
        .find(|l| l.starts_with("left on the mediator: "))
        .expect("a line saying what the probe left");
    assert!(
        left.contains("; 0 of ") && left.contains(" 0 message(s) handed out and not acknowledged, 0 waiting"),
        "{left}"
    );
    // The node is still serving after the malformed inputs.
    let inv = common::invitation(&n).await;
    mailroom::client::Agent::onboard(&inv)
        .await
        .expect("a wallet still onboards");
    n.stop().unwrap();
}

#[actix_rt::test]
async fn bad_urls_and_arguments_exit_64() {
    for args in [
        &["not a url"][..],
        &["ftp://127.0.0.1/x"][..],
        &["http://127.0.0.1:9/?oob=%%%"][..],
        &["http://127.0.0.1:9/?oob=bm90IGpzb24"][..],
        &[][..],
        &["http://127.0.0.1:9/", "--timeout-secs", "soon"][..],
        // Past what the probe's waits and body can hold (they overflowed, or took all memory).
        &["http://127.0.0.1:9/", "--redelivery-wait-secs", "18446744073709551615"][..],
        &["http://127.0.0.1:9/", "--timeout-secs", "0"][..],
        &["http://127.0.0.1:9/", "--huge-bytes", "18446744073709551615"][..],
    ] {
        let out = probe(args).await;
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// An invitation endpoint nobody answers, or one answering 5xx: the mediator is down or failing,
/// which the report says (`FAIL invitation`, exit 1). 64 is kept for a probe misused (a bad
/// URL, arguments): scripts/probe-peers.sh stops on it as "the probe broke".
#[actix_rt::test]
async fn an_invitation_endpoint_that_is_down_or_failing_is_a_fail_not_a_usage_error() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let failing = format!("http://{}/invitation", listener.local_addr().unwrap());
    let server = HttpServer::new(|| {
        App::new().default_service(web::to(|| async {
            HttpResponse::ServiceUnavailable().body("<html>down</html>")
        }))
    })
    .listen(listener)
    .unwrap()
    .workers(1)
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    // Nothing listens on the discard port.
    for url in ["http://127.0.0.1:9/invitation", failing.as_str()] {
        let out = probe(&[url, "--timeout-secs", "5"]).await;
        let stdout = shown(&out);
        assert_eq!(verdict(&stdout, "invitation"), Some("FAIL"), "{url}");
        assert_eq!(stdout.lines().last(), Some("0 passed, 1 failed, 0 skipped"), "{url}");
        assert_eq!(out.status.code(), Some(1), "{url}");
    }
    handle.stop(true).await;
}

/// A store whose pickup 2.0 acknowledgement (`ack_leased`, what messages-received calls)
/// answers as if it deleted the messages and deletes nothing. Every other call, implicit and
/// pickup 1.0 removals (`ack`) among them, goes to the real store.
struct AckRemovesNothing {
    inner: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl Store for AckRemovesNothing {
    async fn ack_leased(&self, _conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        Ok(vec![0; ids.len()])
    }
    async fn ack(&self, conn: &str, ids: &[MessageId]) -> StoreResult<u64> {
        self.inner.ack(conn, ids).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto,
        release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run,
        lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues,
    );
}

/// A node on `wrap(its own sled store)`, with the test config's 2 s leases.
async fn node_on(
    dir: &std::path::Path,
    wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
) -> mailroom::node::RunningNode {
    let cfg = test_config(dir, Strategy::QueueAndLiveModeDelivery);
    let store = mailroom::store::open_sled(&cfg.store.path).await.expect("sled opens");
    start_on(&cfg, wrap(store))
}

/// Right after a delivery every message is out on lease: the count is 0 and a delivery-request
/// returns nothing whether or not messages-received removed anything. The ack checks must
/// wait until the unacknowledged message comes back, and see the acknowledged one stay away.
#[actix_rt::test]
async fn acks_that_remove_nothing_fail_the_ack_checks() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_on(dir.path(), |inner| Arc::new(AckRemovesNothing { inner })).await;
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--redelivery-wait-secs", "15", "--only", "pickup-2.0,live-mode"]).await;
    let stdout = shown(&out);
    for check in ["pickup-2.0-messages-received", "live-mode-ack"] {
        assert_eq!(verdict(&stdout, check), Some("FAIL"), "{check}");
    }
    // Only the acknowledgements are broken: delivery itself still passes.
    for check in ["pickup-2.0-status", "pickup-2.0-delivery", "live-mode-ws"] {
        assert_eq!(verdict(&stdout, check), Some("PASS"), "{check}");
    }
    assert_eq!(out.status.code(), Some(1));
    n.stop().unwrap();
}

/// A store whose pickup filter by recipient key (RFC 0685's `recipient_key`: `lease_for_key`,
/// and `pending_stats` with a key) forgets the connection asking: it serves the queue of
/// whichever connection holds the key. Each behaviour can be broken alone.
struct FilterIgnoresConn {
    inner: Arc<dyn Store>,
    leases: bool,
    counts: bool,
}

impl FilterIgnoresConn {
    /// The connection holding `key`, else `conn` (what a query on the key alone reads).
    async fn holder(&self, conn: &str, key: &str) -> StoreResult<String> {
        Ok(self.inner.route(key).await?.unwrap_or_else(|| conn.to_string()))
    }
}

#[async_trait::async_trait]
impl Store for FilterIgnoresConn {
    async fn lease_for_key_upto(
        &self,
        conn: &str,
        key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let conn = if self.leases {
            self.holder(conn, key).await?
        } else {
            conn.to_string()
        };
        self.inner
            .lease_for_key_upto(&conn, key, max, max_bytes, owner, now_ms, until_ms)
            .await
    }
    async fn pending_stats(&self, conn: &str, key: Option<&str>, now_ms: i64) -> StoreResult<PendingStats> {
        let conn = match key {
            Some(k) if self.counts => self.holder(conn, k).await?,
            _ => conn.to_string(),
        };
        self.inner.pending_stats(&conn, key, now_ms).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto,
        ack_leased, release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats,
        total_queued, connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log,
        begin_run, end_run, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues, );
}

/// B asking with `recipient_key` set to A's key, while A's message waits, must see nothing: a
/// filter that forgets the connection hands B A's queue (its count, or its messages).
#[actix_rt::test]
async fn a_recipient_key_filter_that_forgets_the_connection_fails_isolation_read() {
    for (leases, counts) in [(true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let n = node_on(dir.path(), |inner| {
            Arc::new(FilterIgnoresConn { inner, leases, counts })
        })
        .await;
        let url = format!("{}/invitation", n.public_url());
        let out = probe(&[&url, "--only", "isolation-read"]).await;
        let stdout = shown(&out);
        assert_eq!(
            verdict(&stdout, "isolation-read"),
            Some("FAIL"),
            "leases {leases}, counts {counts}"
        );
        assert!(stdout.contains("recipient_key set to A's key"), "{stdout}");
        assert_eq!(out.status.code(), Some(1));
        n.stop().unwrap();
    }
}

/// A store that leaks late: each forward is queued for its own connection and, as a copy, for
/// the last connection that registered a key (B, in isolation-forward and key-takeover), where
/// no lease finds it (the sweep's or another node's delivery that has not come yet). Only B's
/// status can see it.
struct LateLeakToB {
    inner: Arc<dyn Store>,
    last_adder: std::sync::Mutex<Option<String>>,
    /// Connections holding a copy: their leases come back empty.
    unleased: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl LateLeakToB {
    fn hides(&self, conn: &str) -> bool {
        self.unleased.lock().unwrap().contains(conn)
    }
}

#[async_trait::async_trait]
impl Store for LateLeakToB {
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        if !add.is_empty() {
            *self.last_adder.lock().unwrap() = Some(conn.to_string());
        }
        self.inner.update_keys(conn, add, remove).await
    }
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>> {
        let last = self.last_adder.lock().unwrap().clone();
        let copies: Vec<NewMessage> = match last {
            Some(b) => msgs
                .iter()
                .filter(|m| m.connection != b)
                .map(|m| NewMessage {
                    connection: b.clone(),
                    dedup_key: None,
                    lease: None,
                    ..m.clone()
                })
                .collect(),
            None => Vec::new(),
        };
        let queued = self.inner.enqueue_routed(msgs, limits).await?;
        for c in &copies {
            self.unleased.lock().unwrap().insert(c.connection.clone());
        }
        if !copies.is_empty() {
            self.inner.enqueue(copies, &EnqueueLimits::UNLIMITED).await?;
        }
        Ok(queued)
    }
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now: i64,
        until: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        if self.hides(conn) {
            return Ok(Vec::new());
        }
        self.inner.lease_upto(conn, max, max_bytes, owner, now, until).await
    }
    async fn lease_for_key_upto(
        &self,
        conn: &str,
        key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now: i64,
        until: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        if self.hides(conn) {
            return Ok(Vec::new());
        }
        self.inner
            .lease_for_key_upto(conn, key, max, max_bytes, owner, now, until)
            .await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, ack_leased,
        release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run,
        pending_stats, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues, );
}

/// isolation-forward and key-takeover watch B for a fixed window; a leak delivered after it
/// (by the sweep, from another node) would pass unseen. B's status-request at the end of the
/// watch still sees it waiting in B's queue.
#[actix_rt::test]
async fn a_leak_still_waiting_in_b_s_queue_after_the_watch_fails_isolation_forward_and_key_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_on(dir.path(), |inner| {
        Arc::new(LateLeakToB {
            inner,
            last_adder: Default::default(),
            unleased: Default::default(),
        })
    })
    .await;
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--only", "isolation-forward,key-takeover"]).await;
    let stdout = shown(&out);
    for check in ["isolation-forward", "key-takeover"] {
        assert_eq!(verdict(&stdout, check), Some("FAIL"), "{check}");
    }
    assert!(stdout.contains("once the watch was over"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
    n.stop().unwrap();
}

/// A store from which nothing can be leased (pickup hands nothing out, no session pushes):
/// a mediator that takes messages and lets no one have them.
struct NothingLeases {
    inner: Arc<dyn Store>,
}

#[async_trait::async_trait]
impl Store for NothingLeases {
    async fn lease_upto(
        &self,
        _: &str,
        _: usize,
        _: usize,
        _: &str,
        _: i64,
        _: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        Ok(Vec::new())
    }
    async fn lease_for_key_upto(
        &self,
        _: &str,
        _: &str,
        _: usize,
        _: usize,
        _: &str,
        _: i64,
        _: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        Ok(Vec::new())
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, ack_leased,
        release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run,
        pending_stats, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues, );
}

/// RFC 0685: what arrives while live mode is off MUST be queued (Credo's mediator does that, and
/// pushes to a return-route socket only under DirectDelivery); RFC 0092's return route lets a
/// mediator push or not. So a mediator that queues instead of pushing on the implicit socket is
/// SKIP "not offered", not FAIL, when the message can be picked up; FAIL when it cannot.
#[actix_rt::test]
async fn a_mediator_that_queues_for_pickup_instead_of_pushing_skips_implicit_ws() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueOnly));
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--only", "implicit-ws", "--timeout-secs", "5"]).await;
    let stdout = shown(&out);
    assert_eq!(verdict(&stdout, "implicit-ws"), Some("SKIP"));
    assert!(
        stdout.contains("SKIP implicit-ws: not offered (queues for pickup)"),
        "{stdout}"
    );
    // A SKIP fails no run: onboarding passed, nothing failed.
    assert!(stdout
        .lines()
        .last()
        .is_some_and(|l| l.ends_with(" 0 failed, 1 skipped")));
    assert_eq!(out.status.code(), Some(0));
    n.stop().unwrap();

    // Neither pushed nor handed out by any pickup: the mediator loses the wallet's mail.
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), Strategy::QueueOnly);
    let store = mailroom::store::open_sled(&cfg.store.path).await.expect("sled opens");
    let n = start_on(&cfg, Arc::new(NothingLeases { inner: store }));
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--only", "implicit-ws", "--timeout-secs", "5"]).await;
    let stdout = shown(&out);
    assert_eq!(verdict(&stdout, "implicit-ws"), Some("FAIL"));
    assert_eq!(out.status.code(), Some(1));
    n.stop().unwrap();
}

/// Once a handshake worked, a wallet that cannot onboard (here: its keylist add fails) is the
/// mediator failing: every check it blocks FAILs, and the run exits 1, also when `--only`
/// leaves none of the onboarding checks in it.
#[actix_rt::test]
async fn key_adds_that_fail_fail_every_check_past_onboarding() {
    let dir = tempfile::tempdir().unwrap();
    let n = node_on(dir.path(), |inner| {
        Arc::new(KeyAddsBreak {
            inner,
            only_held_keys: false,
            how: Breaks::Errs,
        })
    })
    .await;
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--redelivery-wait-secs", "15"]).await;
    let stdout = shown(&out);
    assert_eq!(ran(&stdout), CHECKS, "the checks that ran, in order");
    let onboarding = [
        "onboarding-didexchange",
        "onboarding-connections",
        "discover-features",
        "mediation",
    ];
    for check in CHECKS {
        let want = if onboarding.contains(check) { "PASS" } else { "FAIL" };
        assert_eq!(verdict(&stdout, check), Some(want), "{check}");
    }
    assert_eq!(out.status.code(), Some(1));

    let out = probe(&[&url, "--only", "forward,pickup"]).await;
    let stdout = shown(&out);
    assert!(!ran(&stdout).is_empty());
    for check in ran(&stdout) {
        assert_eq!(verdict(&stdout, check), Some("FAIL"), "{check}");
    }
    assert_eq!(out.status.code(), Some(1), "nothing could be checked: not a success");
    n.stop().unwrap();
}

/// An invitation that offers only handshakes the probe does not speak: no wallet can onboard,
/// every line is a SKIP, and that is not a success.
#[actix_rt::test]
async fn no_wallet_onboarding_exits_1() {
    use base64::Engine;
    let key = mailroom::didcomm::keys::KeyPair::generate();
    let inv = serde_json::json!({
        "@type": "https://didcomm.org/out-of-band/1.1/invitation",
        "@id": "no-handshake-spoken",
        "handshake_protocols": ["https://didcomm.org/didexchange/9.0"],
        "services": [{"id": "#inline", "type": "did-communication", "serviceEndpoint": "http://127.0.0.1:9/",
                      "recipientKeys": [key.did_key()], "routingKeys": []}],
    });
    let oob = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(inv.to_string());
    let out = probe(&[&format!("http://127.0.0.1:9/?oob={oob}")]).await;
    let stdout = shown(&out);
    assert!(!ran(&stdout).is_empty());
    assert!(stdout
        .lines()
        .all(|l| !l.starts_with("PASS ") && !l.starts_with("FAIL ")));
    assert_eq!(out.status.code(), Some(1));
}

/// The replay check FAILs a mediator that handles a copy of a wallet's message again: here
/// mailroom with its replay window off (`limits.replay_window_secs = 0`).
#[actix_rt::test]
async fn replay_fails_a_mediator_that_answers_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.replay_window_secs = 0;
    let n = start(&cfg);
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[&url, "--only", "replay"]).await;
    let stdout = shown(&out);
    assert_eq!(verdict(&stdout, "replay"), Some("FAIL"), "{stdout}");
    assert!(stdout.contains("answered again"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
    n.stop().unwrap();
}

/// How a wrapped store call fails: at once (the node answers 5xx), or after longer than the
/// probe waits for an answer (a timeout, then the error).
#[derive(Clone, Copy, Debug)]
enum Breaks {
    Errs,
    Hangs(Duration),
}

impl Breaks {
    async fn fail<T>(self, what: &str) -> StoreResult<T> {
        if let Breaks::Hangs(d) = self {
            tokio::time::sleep(d).await;
        }
        Err(StoreError::Unavailable(format!("injected: {what}")))
    }
}

/// A store whose keylist-update adds break (err or hang, `how`): every add (as when the
/// database refuses writes: every wallet connects and gets mediation, none can register a
/// key), or with `only_held_keys` only an add of a key another connection holds
/// (key-takeover's B), instead of the refusal mailroom answers. Removals and every other call
/// go through.
struct KeyAddsBreak {
    inner: Arc<dyn Store>,
    only_held_keys: bool,
    how: Breaks,
}

#[async_trait::async_trait]
impl Store for KeyAddsBreak {
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        for k in add {
            if !self.only_held_keys || self.inner.route(k).await?.is_some_and(|holder| holder != conn) {
                return self.how.fail("a key add").await;
            }
        }
        self.inner.update_keys(conn, add, remove).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased,
        release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run,
        lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues,
    );
}

/// B's keylist-update adding A's key that fails (a 5xx) or is never answered (a timeout) is no
/// refusal: key-takeover must not pass on it, although forwards to A's key still reach A.
#[actix_rt::test]
async fn a_takeover_attempt_that_errs_or_times_out_does_not_pass_key_takeover() {
    for how in [Breaks::Errs, Breaks::Hangs(Duration::from_secs(5))] {
        let dir = tempfile::tempdir().unwrap();
        let n = node_on(dir.path(), |inner| {
            Arc::new(KeyAddsBreak {
                inner,
                only_held_keys: true,
                how,
            })
        })
        .await;
        let url = format!("{}/invitation", n.public_url());
        let out = probe(&[&url, "--only", "key-takeover", "--timeout-secs", "3"]).await;
        let stdout = shown(&out);
        assert_eq!(verdict(&stdout, "key-takeover"), Some("FAIL"), "{how:?}");
        assert!(stdout.contains("not answered"), "{how:?}: {stdout}");
        assert_eq!(out.status.code(), Some(1), "{how:?}");
        n.stop().unwrap();
    }
}

/// A store on which acknowledging messages the connection never leased (isolation-ack's B
/// acknowledging A's ids) errs or hangs; the connection's own acknowledgements go through.
struct ForeignAckBreaks {
    inner: Arc<dyn Store>,
    how: Breaks,
    leased: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<MessageId>>>,
}

impl ForeignAckBreaks {
    fn leased(&self, conn: &str, msgs: &[QueuedMessage]) {
        let mut l = self.leased.lock().unwrap();
        l.entry(conn.to_string()).or_default().extend(msgs.iter().map(|m| m.id));
    }
}

#[async_trait::async_trait]
impl Store for ForeignAckBreaks {
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now: i64,
        until: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let got = self.inner.lease_upto(conn, max, max_bytes, owner, now, until).await?;
        self.leased(conn, &got);
        Ok(got)
    }
    async fn lease_for_key_upto(
        &self,
        conn: &str,
        key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now: i64,
        until: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let got = self
            .inner
            .lease_for_key_upto(conn, key, max, max_bytes, owner, now, until)
            .await?;
        self.leased(conn, &got);
        Ok(got)
    }
    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>> {
        let own = {
            let l = self.leased.lock().unwrap();
            l.get(conn).is_some_and(|mine| ids.iter().any(|i| mine.contains(i)))
        };
        if !own && !ids.is_empty() {
            return self.how.fail("an ack of messages the connection never leased").await;
        }
        self.inner.ack_leased(conn, ids).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease,
        release, release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        connections_with_pending, pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run,
        lease_for_key, pending_stats, expire, expire_due, oldest_received_ms, flush, device_of, set_device,
        forget_device_token, push_event, push_take_due, push_done, delete_connection, delete_unmediated, revoke_mediation,
        first_sight, forget_sight, prune_sights,
        drop_queue, top_queues,
    );
}

/// B's messages-received with A's ids that fails (a 5xx) or is never answered (a timeout) says
/// nothing of what the mediator did with it: isolation-ack must not pass on it.
#[actix_rt::test]
async fn a_foreign_ack_that_errs_or_times_out_does_not_pass_isolation_ack() {
    for how in [Breaks::Errs, Breaks::Hangs(Duration::from_secs(5))] {
        let dir = tempfile::tempdir().unwrap();
        let n = node_on(dir.path(), |inner| {
            Arc::new(ForeignAckBreaks {
                inner,
                how,
                leased: Default::default(),
            })
        })
        .await;
        let url = format!("{}/invitation", n.public_url());
        let out = probe(&[
            &url,
            "--only",
            "isolation-read,isolation-ack",
            "--timeout-secs",
            "3",
            "--redelivery-wait-secs",
            "15",
        ])
        .await;
        let stdout = shown(&out);
        assert_eq!(verdict(&stdout, "isolation-read"), Some("PASS"), "{how:?}");
        assert_eq!(verdict(&stdout, "isolation-ack"), Some("FAIL"), "{how:?}");
        assert!(stdout.contains("not answered"), "{how:?}: {stdout}");
        assert_eq!(out.status.code(), Some(1), "{how:?}");
        n.stop().unwrap();
    }
}
