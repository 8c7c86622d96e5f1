//! Real `mailroom` processes on PostgreSQL: kill -9 of the node that holds the wallet's
//! session while forwards stream in, and graceful shutdown (SIGTERM) of it. The wallet
//! reconnects to another node and receives every forward that was answered 2xx, and what the
//! killed node delivered unacknowledged without waiting for its leases to run out (given back
//! by the peer that takes it over, or by the node itself when it restarts).

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsEvent};
use mailroom::config::NodeEntry;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

fn write_config(dir: &std::path::Path, db_url: &str, nodes: &[NodeEntry], lease_ms: u64) -> std::path::PathBuf {
    let mut text = format!(
        "[cluster]\nname = \"proc\"\nsecret = \"{SECRET}\"\nheartbeat_ms = 100\nfailure_timeout_ms = 800\n\n\
         [store]\nbackend = \"postgres\"\nurl = \"{db_url}\"\npool_size = 4\n\n\
         [delivery]\nsweep_interval_ms = 200\nlease_ms = {lease_ms}\n\n"
    );
    for n in nodes {
        text.push_str(&format!(
            "[[node]]\nid = \"{}\"\nlisten = \"{}\"\ncluster = \"{}\"\nadmin = \"{}\"\n\n",
            n.id,
            n.listen,
            n.cluster.as_deref().unwrap(),
            n.admin
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Sends SIGTERM to `p` and waits (bounded) for it to exit 0, then checks that the node really
/// received the signal: its log says so. A signal that was never delivered, or a node that
/// exits for another reason, fails here rather than passing as a "graceful shutdown".
async fn sigterm_and_wait(p: &mut NodeProcess, log: &std::path::Path) {
    let pid = p.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid} failed: {sent:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {pid} still running 60 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        text.contains("SIGTERM received"),
        "the node's log does not show the SIGTERM:\n{text}"
    );
}

/// `n` node processes of one cluster on a fresh database, all ready, and a wallet onboarded
/// through node 1.
struct Nodes {
    _db: FreshDb,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    entries: Vec<NodeEntry>,
    procs: Vec<NodeProcess>,
    wallet: Agent,
    key: mailroom::didcomm::keys::KeyPair,
}

impl Nodes {
    async fn start(n: usize, lease_ms: u64) -> Nodes {
        let db = FreshDb::create().await;
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<NodeEntry> = (1..=n)
            .map(|i| NodeEntry {
                id: format!("n{i}"),
                listen: free_addr(),
                cluster: Some(free_addr()),
                admin: free_addr(),
            })
            .collect();
        let config = write_config(dir.path(), &db.url, &entries, lease_ms);
        let procs: Vec<NodeProcess> = entries
            .iter()
            .map(|e| NodeProcess::spawn(&config, e, &dir.path().join(format!("{}.log", e.id))))
            .collect();
        for p in &procs {
            p.wait_ready().await;
        }
        let inv = {
            let v = get_json(&format!("{}/invitation", procs[0].public_url())).await;
            mailroom::client::Invitation::parse(&v["invitation"]).unwrap()
        };
        let (wallet, key) = Agent::onboard(&inv).await.unwrap();
        Nodes {
            _db: db,
            dir,
            config,
            entries,
            procs,
            wallet,
            key,
        }
    }
}

/// Collects what a live socket delivers until every one of `texts` has come; panics if it
/// stays silent for 30 s first. Status answers are skipped.
async fn receive_all(a: &Agent, ws: &mut mailroom::client::WsClient, texts: &[String], what: &str) {
    let want: HashSet<String> = texts.iter().cloned().collect();
    let mut got = HashSet::new();
    while got != want {
        match ws.next(Duration::from_secs(30)).await {
            Ok(WsEvent::Envelope(e)) => {
                let (m, _) = a.unpack(&e).unwrap();
                match type_name(&m) {
                    "status" => {}
                    "delivery" => got.extend(contents(a, &m)),
                    other => panic!("unexpected {other}: {m}"),
                }
            }
            other => panic!("{what}: {} of the {} delivered: {other:?}", got.len(), want.len()),
        }
    }
}

async fn run_failover(graceful: bool) {
    let Nodes {
        _db,
        dir,
        mut procs,
        wallet: mut a,
        key: k,
        ..
    } = Nodes::start(2, 2000).await;
    let p2 = procs.pop().unwrap();
    let mut p1 = procs.pop().unwrap();
    let n1_log = dir.path().join("n1.log");
    let routing = a.grant.clone().unwrap().routing_keys;
    let mut ws = live_socket_at(&a, &p1.ws_url()).await;

    // A sender streams 100 forwards into node 2, 5 ms apart.
    let sender_url = p2.public_url();
    let verkey = k.verkey();
    let sending = actix_rt::spawn(async move {
        let s = Sender::new();
        let mut accepted = Vec::new();
        for i in 0..100 {
            let text = format!("f{i}");
            if let Ok(202) = s.forward(&sender_url, &basic_message(&text), &verkey, &routing).await {
                accepted.push(text);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        accepted
    });

    let mut received: Vec<String> = Vec::new();
    let mut killed = false;
    let mut reconnected = false;
    let mut ack_url = p1.public_url();
    loop {
        // Mid-stream (or, on a slow machine, once the sender is done: the kill must happen).
        if !killed && (received.len() >= 20 || sending.is_finished()) {
            if graceful {
                sigterm_and_wait(&mut p1, &n1_log).await;
            } else {
                p1.kill9();
            }
            killed = true;
        }
        match ws.next(Duration::from_secs(20)).await {
            Ok(WsEvent::Envelope(e)) => {
                let (m, _) = a.unpack(&e).unwrap();
                if type_name(&m) != "delivery" {
                    continue;
                }
                let mut ids = Vec::new();
                for (id, inner) in a.open_delivery(&m).unwrap() {
                    ids.push(id);
                    received.push(inner["content"].as_str().unwrap().to_string());
                }
                a.endpoint = ack_url.clone();
                // The node may be gone between the delivery and the ack: that is the point.
                let _ = a
                    .request(&pickup("messages-received", json!({"message_id_list": ids})))
                    .await;
            }
            other if killed => {
                if graceful {
                    // The node closes the session itself, with a close frame saying "going
                    // away" (1001), before it exits: not a dropped TCP link, not silence.
                    match &other {
                        Ok(WsEvent::Closed(Some(r))) => {
                            assert_eq!(u16::from(r.code), 1001, "graceful close says going away: {r:?}")
                        }
                        Ok(WsEvent::Closed(None)) => {
                            panic!("the socket ended without a close frame (expected code 1001)")
                        }
                        other => panic!("expected a close frame with code 1001, got {other:?}"),
                    }
                }
                // Reconnect through "the load balancer": node 2.
                ack_url = p2.public_url();
                ws = a.websocket(&p2.ws_url()).await.unwrap();
                let st = ws_request(
                    &a,
                    &mut ws,
                    &pickup("live-delivery-change", json!({"live_delivery": true})),
                )
                .await;
                assert_eq!(type_name(&st), "status");
                reconnected = true;
            }
            Ok(WsEvent::Closed(r)) => panic!("socket closed before the kill: {r:?}"),
            Err(e) => panic!("no delivery: {e} (received {})", received.len()),
        }
        // Once the old socket's end was read (deliveries buffered before the kill come first,
        // then, on SIGTERM, the close frame the checks above are about) and the wallet is on
        // node 2, the loop below collects the rest. Waiting here for the sender as well could
        // read a quiet node 2 socket for 20 s (its last forward delivered while the sender
        // still slept) and take that silence for the missing close frame.
        if reconnected {
            break;
        }
    }
    assert!(killed && reconnected);
    let accepted = sending.await.unwrap();
    let mut uniq: HashSet<String> = received.iter().cloned().collect();
    while !accepted.iter().all(|t| uniq.contains(t)) {
        match ws.next(Duration::from_secs(20)).await.expect("remaining deliveries") {
            WsEvent::Envelope(e) => {
                let (m, _) = a.unpack(&e).unwrap();
                if type_name(&m) != "delivery" {
                    continue;
                }
                let mut ids = Vec::new();
                for (id, inner) in a.open_delivery(&m).unwrap() {
                    ids.push(id);
                    let c = inner["content"].as_str().unwrap().to_string();
                    received.push(c.clone());
                    uniq.insert(c);
                }
                a.endpoint = p2.public_url();
                a.request(&pickup("messages-received", json!({"message_id_list": ids})))
                    .await
                    .unwrap();
            }
            WsEvent::Closed(r) => panic!("node 2 closed the socket: {r:?}"),
        }
    }
    let dups = received.len() - uniq.len();
    println!(
        "failover ({}): {} forwards accepted, {} delivered, {} duplicates",
        if graceful { "SIGTERM" } else { "kill -9" },
        accepted.len(),
        uniq.len(),
        dups
    );
    assert!(accepted.len() >= 95, "node 2 kept accepting: {}", accepted.len());
    drop(p2);
}

#[actix_rt::test]
async fn kill_9_of_the_session_node_loses_no_accepted_forward() {
    run_failover(false).await;
}

#[actix_rt::test]
async fn sigterm_closes_sessions_with_1001_and_loses_nothing() {
    run_failover(true).await;
}

/// What the killed node's session delivered and never saw acknowledged (forwards sent to it and
/// forwards handed to it by node 2) was leased to it for `lease_ms`, far longer than the test
/// waits. Node 2 takes over the failed peer when it notices (the 0.8 s failure timeout) and
/// gives them back: the wallet, reconnected to node 2, gets them again within seconds.
#[actix_rt::test]
async fn kill_9_gives_back_what_the_dead_node_delivered_unacknowledged() {
    let Nodes {
        _db,
        dir: _dir,
        mut procs,
        wallet: a,
        key: k,
        ..
    } = Nodes::start(2, 600_000).await;
    let p2 = procs.pop().unwrap();
    let mut p1 = procs.pop().unwrap();
    let routing = a.grant.clone().unwrap().routing_keys;
    // A new message for each socket (a copy of one is refused as a replay).
    let live = || pickup("live-delivery-change", json!({"live_delivery": true}));
    let mut ws = a.websocket(&p1.ws_url()).await.unwrap();
    assert_eq!(type_name(&ws_request(&a, &mut ws, &live()).await), "status");

    let s = Sender::new();
    let texts: Vec<String> = (0..6).map(|i| format!("in flight {i}")).collect();
    for (i, t) in texts.iter().enumerate() {
        let node = if i % 2 == 0 { &p1 } else { &p2 };
        let code = s
            .forward(&node.public_url(), &basic_message(t), &k.verkey(), &routing)
            .await
            .unwrap();
        assert_eq!(code, 202, "{t}");
    }
    // Delivered live on node 1, never acknowledged.
    receive_all(&a, &mut ws, &texts, "node 1's live deliveries").await;
    p1.kill9();
    let killed = std::time::Instant::now();
    drop(ws);

    let mut ws = a.websocket(&p2.ws_url()).await.unwrap();
    ws.send_envelope(a.pack(&live()).unwrap(), true).await.unwrap();
    receive_all(&a, &mut ws, &texts, "node 2 gave back what node 1 left unacknowledged").await;
    println!(
        "kill -9: {} unacknowledged deliveries given back {} ms after the kill (failure timeout 800 ms, lease 600 s)",
        texts.len(),
        killed.elapsed().as_millis()
    );
    drop(p2);
}

/// A node killed with deliveries in flight, restarted before any peer took them over (here it
/// has none): as it starts it gives back every lease it held before, not only its hand-offs.
/// The messages were queued while the wallet was away, so its session leased them itself
/// (`<node>/ws/...`), not as hand-offs (`<node>/handoff`).
#[actix_rt::test]
async fn a_node_restarted_after_kill_9_gives_back_its_own_deliveries() {
    let Nodes {
        _db,
        dir,
        config,
        entries,
        mut procs,
        wallet: a,
        key: k,
    } = Nodes::start(1, 600_000).await;
    let mut p1 = procs.pop().unwrap();
    let routing = a.grant.clone().unwrap().routing_keys;
    let s = Sender::new();
    let texts: Vec<String> = (0..4).map(|i| format!("queued {i}")).collect();
    for t in &texts {
        let code = s
            .forward(&p1.public_url(), &basic_message(t), &k.verkey(), &routing)
            .await
            .unwrap();
        assert_eq!(code, 202, "{t}");
    }
    // A new message for each socket (a copy of one is refused as a replay).
    let live = || pickup("live-delivery-change", json!({"live_delivery": true}));
    let mut ws = a.websocket(&p1.ws_url()).await.unwrap();
    ws.send_envelope(a.pack(&live()).unwrap(), true).await.unwrap();
    receive_all(&a, &mut ws, &texts, "the session's first drain").await;
    p1.kill9();
    drop(ws);

    let p1 = NodeProcess::spawn(&config, &entries[0], &dir.path().join("n1-restarted.log"));
    p1.wait_ready().await;
    let mut ws = a.websocket(&p1.ws_url()).await.unwrap();
    ws.send_envelope(a.pack(&live()).unwrap(), true).await.unwrap();
    receive_all(
        &a,
        &mut ws,
        &texts,
        "the restarted node gave back what it left unacknowledged",
    )
    .await;
    drop(p1);
}

/// Sends `sig` (`TERM`, `INT`) to the node process `p`, the child this test started.
fn send_signal(p: &NodeProcess, sig: &str) {
    let pid = p.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -{sig} {pid} failed: {sent:?}");
}

/// The exit of `p`, which must come within `bound` (`what` names what it waits for).
async fn exit_within(p: &mut NodeProcess, bound: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(s) = p.child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {} still running {bound:?} after {what}",
            p.child.id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until the node's log at `log` holds `needle`; the log's text.
async fn log_shows(log: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node's log never said {needle:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A one-node cluster on the store at `url`, its config and log in `dir`, started as a
/// process: the process and its log file.
fn spawn_lone_node(dir: &std::path::Path, url: &str) -> (NodeProcess, std::path::PathBuf) {
    let entry = NodeEntry {
        id: "n1".into(),
        listen: free_addr(),
        cluster: Some(free_addr()),
        admin: free_addr(),
    };
    let config = write_config(dir, url, std::slice::from_ref(&entry), 30_000);
    let log = dir.join("n1.log");
    (NodeProcess::spawn(&config, &entry, &log), log)
}

/// SIGTERM to a node still starting (a rolling update, `podman stop` of a node whose store is
/// slow to open) stops the start and exits 0, saying so; until the handlers were installed
/// before the start, the signal's default action ended the process (no exit code), and a
/// store already marked as running took that for a crash at the next start. The store here is
/// a server that accepts the connection and never answers: the node waits in its store's open
/// (PostgreSQL's pool waits 10 s), and the test signals it once it has connected.
#[actix_rt::test]
async fn sigterm_during_start_up_stops_the_start_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("postgres://postgres@{}/mailroom", silent.local_addr().unwrap());
    let (mut p, log) = spawn_lone_node(dir.path(), &url);
    // The node has connected to its store: it is opening it, well before it serves.
    let (_held, _) = tokio::time::timeout(Duration::from_secs(60), silent.accept())
        .await
        .expect("the node connects to its store within 60 s")
        .unwrap();
    send_signal(&p, "TERM");
    let status = exit_within(&mut p, Duration::from_secs(30), "SIGTERM during start-up").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM during start-up exits 0, not by the signal nor by the store's failure: {status:?}\n{text}"
    );
    assert!(
        text.contains("SIGTERM received during start-up: stopping"),
        "the node's log does not say it stopped during start-up:\n{text}"
    );
    assert!(!text.contains("mailroom node ready"), "it never served:\n{text}");
}

/// A TCP relay to the test's PostgreSQL that can be frozen: from then on nothing passes either
/// way and every connection, old or new, is held open unanswered (a server that hangs, not one
/// that is down).
struct FreezableRelay {
    addr: std::net::SocketAddr,
    freeze: tokio::sync::watch::Sender<bool>,
}

impl FreezableRelay {
    async fn start(upstream: &'static str) -> FreezableRelay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (freeze, frozen) = tokio::sync::watch::channel(false);
        actix_rt::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let mut frozen = frozen.clone();
                actix_rt::spawn(async move {
                    if !*frozen.borrow() {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut up) => return,
                                _ = frozen.wait_for(|f| *f) => {}
                            }
                            // Frozen: both ends stay open, silent, until the test ends.
                            std::future::pending::<()>().await;
                            drop(up);
                        }
                    }
                    std::future::pending::<()>().await;
                    drop(inbound);
                });
            }
        });
        FreezableRelay { addr, freeze }
    }

    fn freeze(&self) {
        self.freeze.send_replace(true);
    }
}

/// A second SIGTERM while the node stops ends the process at once, exit 143 (128 + SIGTERM),
/// with a line in its log, instead of waiting out a stop held up by its store. The store
/// hangs (its link frozen) once the node serves, so the stop's give-back waits for its 10 s
/// grace: without the second signal the process would run that long.
#[actix_rt::test]
async fn a_second_sigterm_during_the_stop_exits_at_once_with_143() {
    let db = FreshDb::create().await;
    let relay = FreezableRelay::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@{}/{}", relay.addr, db.name);
    let dir = tempfile::tempdir().unwrap();
    let (mut p, log) = spawn_lone_node(dir.path(), &url);
    p.wait_ready().await;
    relay.freeze();
    send_signal(&p, "TERM");
    // The first signal was taken: the stop has begun (and waits on the frozen store).
    log_shows(&log, "shutting down").await;
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "the stop did not wait for the frozen store"
    );
    send_signal(&p, "TERM");
    let status = exit_within(&mut p, Duration::from_secs(5), "a second SIGTERM").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(143),
        "a second SIGTERM exits 143: {status:?}\n{text}"
    );
    assert!(
        text.contains("second SIGTERM received"),
        "the node's log does not show the second SIGTERM:\n{text}"
    );
}
