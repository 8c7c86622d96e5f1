//! PostgreSQL nodes (real processes) killed with SIGKILL while the push event of a forward they
//! accepted (committed, answered 2xx) was in their memory only: its push window was never
//! written, so no claim was left for another node to take over. The wallet is pushed all the
//! same: by the node when it starts again after the run that did not stop, or by the peer that
//! takes the dead node over (a node that never comes back).
//!
//! The window in which the event is in memory only is held open by the test: it holds the
//! wallet's push window row (an uncommitted insert of its own), so the node's write of the
//! event waits on the row lock until the node is killed.

mod common;
#[path = "common/push.rs"]
#[allow(dead_code)]
mod standin;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, Agent, Sender};
use mailroom::config::NodeEntry;
use mailroom::didcomm::message::new_id;
use serde_json::{json, Value};
use standin::StandIn;
use std::time::{Duration, Instant};

const TOKEN: &str = "owed-after-kill-9-token";

/// A config for `nodes` (a cluster when they have cluster addresses) on the database at `url`,
/// pushing to `si` (FCM, a 60 s window).
fn write_config(dir: &std::path::Path, name: &str, url: &str, si: &StandIn, nodes: &[NodeEntry]) -> std::path::PathBuf {
    let push = si
        .push_toml(60, &["proj-a"], false)
        .replace("[[fcm]]", "[[push.fcm]]")
        .replace("[apns]", "[push.apns]");
    let mut text = format!(
        "[cluster]\nname = \"crash\"\nsecret = \"{SECRET}\"\nheartbeat_ms = 100\nfailure_timeout_ms = 800\n\n\
         [store]\nbackend = \"postgres\"\nurl = \"{url}\"\npool_size = 4\n\n\
         [delivery]\nsweep_interval_ms = 200\n\n"
    );
    for n in nodes {
        text.push_str(&format!("[[node]]\nid = \"{}\"\nlisten = \"{}\"\n", n.id, n.listen));
        if let Some(c) = &n.cluster {
            text.push_str(&format!("cluster = \"{c}\"\n"));
        }
        text.push_str(&format!("admin = \"{}\"\n\n", n.admin));
    }
    text.push_str(&format!("[push]\n{push}\n"));
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, &text).unwrap();
    mailroom::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    path
}

fn entry(id: &str, cluster: bool) -> NodeEntry {
    NodeEntry {
        id: id.into(),
        listen: free_addr(),
        cluster: cluster.then(free_addr),
        admin: free_addr(),
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A wallet onboarded through `p`, its device registered (FCM, [`TOKEN`]), offline.
async fn registered_wallet(p: &NodeProcess, url: &str) -> Wallet {
    registered_wallet_with(p, url, TOKEN).await
}

/// [`registered_wallet`] with the device token `token`.
async fn registered_wallet_with(p: &NodeProcess, url: &str, token: &str) -> Wallet {
    let (a, k) = Agent::onboard(&invitation_at(&p.public_url()).await).await.unwrap();
    let ack: Value = a
        .request(&json!({
            "@type": "https://didcomm.org/push-notifications-fcm/1.0/set-device-info",
            "@id": new_id(),
            "device_token": token,
            "device_platform": "android",
            "~transport": { "return_route": "all" },
        }))
        .await
        .unwrap()
        .expect("a reply to set-device-info");
    assert_eq!(
        ack["@type"], "https://didcomm.org/push-notifications-fcm/1.0/ack",
        "{ack}"
    );
    let conn: String = connect(url)
        .await
        .query_one("SELECT conn_id FROM mailroom_devices WHERE token = $1", &[&token])
        .await
        .unwrap()
        .get(0);
    Wallet { agent: a, key: k, conn }
}

/// The backends of the test's database waiting on a lock to write a push window.
async fn window_writes_waiting(db: &tokio_postgres::Client) -> Vec<i32> {
    db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' \
         AND query LIKE '%mailroom_push_windows%'",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// An offline wallet with a device registration.
struct Wallet {
    agent: Agent,
    key: mailroom::didcomm::keys::KeyPair,
    conn: String,
}

/// Holds the push window of `w` (an uncommitted row of the test's own, on a connection to the
/// database at `url`), forwards a message to the wallet through `p` (answered 202), waits until
/// `p`'s write of the push event waits on that row, and kills `p` (SIGKILL): the event dies in
/// its memory. Once the dead node's statement has ended (its `lock_timeout`, 5 s), the row is
/// let go with nothing written; nobody pushed the wallet meanwhile.
async fn kill_with_the_push_event_unwritten(p: &mut NodeProcess, url: &str, si: &StandIn, w: &Wallet) {
    let holder = connect(url).await;
    let watcher = connect(url).await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "INSERT INTO mailroom_push_windows (conn_id, last_push_ms) VALUES ($1, 0)",
            &[&w.conn],
        )
        .await
        .unwrap();
    let routing = w.agent.grant.clone().unwrap().routing_keys;
    let code = Sender::new()
        .forward(
            &p.public_url(),
            &basic_message("queued before the crash"),
            &w.key.verkey(),
            &routing,
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "the forward is accepted");
    let dead = eventually("the node's write of the push event waiting on the window", || async {
        let pids = window_writes_waiting(&watcher).await;
        (!pids.is_empty()).then_some(pids)
    })
    .await;
    p.kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while window_writes_waiting(&watcher)
        .await
        .iter()
        .any(|pid| dead.contains(pid))
    {
        assert!(
            Instant::now() < deadline,
            "the dead node's write still waits after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tokens_pushed(si, TOKEN) == 0, "nobody pushed the wallet yet");
    holder.batch_execute("ROLLBACK").await.unwrap();
}

/// Pushes the stand-in received for `token`.
fn tokens_pushed(si: &StandIn, token: &str) -> usize {
    si.state
        .hits("fcm:")
        .iter()
        .filter(|h| h.body["message"]["token"] == token)
        .count()
}

/// The push at the stand-in, for [`TOKEN`].
async fn pushed(si: &StandIn) {
    let hits = eventually("the wallet's push at the stand-in", || async {
        let h: Vec<_> = si
            .state
            .hits("fcm:")
            .into_iter()
            .filter(|h| h.body["message"]["token"] == TOKEN)
            .collect();
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert!(hits[0].problems.is_empty(), "{:?}", hits[0].problems);
}

/// A lone PostgreSQL node is killed while the push event of a forward it answered 202 is in
/// its memory only. Started again with the same id, it finds its run unfinished (its mark in
/// the store) and pushes the wallet owed a wake-up. Before, a PostgreSQL node's restart only
/// released its leases: the wallet slept with its mail queued.
#[actix_rt::test]
async fn a_node_restarted_after_kill_9_pushes_the_wallet_whose_event_died_with_it() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let first = entry("n1", false);
    let config = write_config(dir.path(), "first", &db.url, &si, std::slice::from_ref(&first));
    let mut p = NodeProcess::spawn(&config, &first, &dir.path().join("n1-first.log"));
    p.wait_ready().await;
    let w = registered_wallet(&p, &db.url).await;
    kill_with_the_push_event_unwritten(&mut p, &db.url, &si, &w).await;

    // The same node id, on addresses of its own (a port the dead run bound may be taken).
    let again = entry("n1", false);
    let config = write_config(dir.path(), "again", &db.url, &si, std::slice::from_ref(&again));
    let log = dir.path().join("n1-again.log");
    let mut p = NodeProcess::spawn(&config, &again, &log);
    p.wait_ready().await;
    pushed(&si).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("waking the wallets owed a wake-up"),
        "the restart says what it wakes:\n{text}"
    );
    assert_eq!(
        get_json(&format!("{}/status", p.admin_url())).await["store"]["previous_run_unfinished"],
        json!(true)
    );
    assert!(p.terminate().success(), "a clean stop");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("left marked"), "the clean stop clears the mark:\n{text}");
}

/// Two PostgreSQL nodes; n1 is killed while the push event of a forward it answered 202 is in
/// its memory only, and never comes back. n2, taking n1 over, pushes the wallet owed a
/// wake-up. Before, a take-over woke only the sessions n1 held and the leases it released.
#[actix_rt::test]
async fn the_peer_that_takes_over_a_node_killed_9_pushes_the_wallet_whose_event_died_with_it() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes = [entry("n1", true), entry("n2", true)];
    let config = write_config(dir.path(), "cluster", &db.url, &si, &nodes);
    let mut n1 = NodeProcess::spawn(&config, &nodes[0], &dir.path().join("n1.log"));
    let mut n2 = NodeProcess::spawn(&config, &nodes[1], &dir.path().join("n2.log"));
    n1.wait_ready().await;
    n2.wait_ready().await;
    let w = registered_wallet(&n2, &db.url).await;
    // A wallet asleep for long: pushed once for its mail, which it never fetched, its push
    // window since forgotten as idle (as after 2 minutes): nothing says it was pushed, and
    // its mail is old. It is owed nothing: pushed at each take-over, every such wallet of a
    // cluster would be woken again for old mail at each deploy step.
    let sleeper = registered_wallet_with(&n2, &db.url, "asleep-for-long").await;
    let routing = sleeper.agent.grant.clone().unwrap().routing_keys;
    let code = Sender::new()
        .forward(
            &n2.public_url(),
            &basic_message("old mail"),
            &sleeper.key.verkey(),
            &routing,
        )
        .await
        .unwrap();
    assert_eq!(code, 202);
    eventually("the sleeper's push", || async {
        (tokens_pushed(&si, "asleep-for-long") == 1).then_some(())
    })
    .await;
    let sql = connect(&db.url).await;
    sql.execute("DELETE FROM mailroom_push_windows WHERE conn_id = $1", &[&sleeper.conn])
        .await
        .unwrap();
    sql.execute(
        "UPDATE mailroom_messages SET received_at_ms = received_at_ms - 3600000 WHERE conn_id = $1",
        &[&sleeper.conn],
    )
    .await
    .unwrap();
    kill_with_the_push_event_unwritten(&mut n1, &db.url, &si, &w).await;
    pushed(&si).await;
    // The take-over's wake-up is over once it says how many it woke: one.
    let log = dir.path().join("n2.log");
    let line = eventually("n2's owed wake-up done", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("wallets owed a wake-up woken after a failed peer"))
            .map(str::to_owned)
    })
    .await;
    assert!(line.contains("wallets=1"), "{line}");
    assert_eq!(
        tokens_pushed(&si, "asleep-for-long"),
        1,
        "the sleeper is not pushed again"
    );
    n2.kill9();
}
