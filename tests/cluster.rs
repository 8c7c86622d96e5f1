//! Clusters of real nodes (in-process, real TCP between them) on the real PostgreSQL at
//! 127.0.0.1:5432, a fresh database per test: the credo-ts #1625 scenario, session moves,
//! cut links, refused peers, and a node added at runtime.

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsClient, WsEvent};
use mailroom::cluster::proto::Frame;
use mailroom::didcomm::keys::KeyPair;
use mailroom::node::RunningNode;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

/// Sweeps so slow that only cluster notifications can deliver within the test's wait.
const NO_SWEEP: u64 = 600_000;

/// After the last expected message, the socket must stay quiet this long before duplicates
/// are counted: a duplicate that comes later than the last original arrives inside it.
const SETTLE: Duration = Duration::from_secs(2);

/// Reads deliveries until `want` distinct contents arrived; acknowledges each over HTTP on
/// `ack_via`, as Credo 0.6.3 does. Then drains: keeps reading until the socket was quiet for
/// `SETTLE`, and finally sends a trust ping on the socket and reads up to its answer, so every
/// delivery the node wrote before that point is counted. Returns (contents in order,
/// duplicates).
async fn receive(a: &mut Agent, ws: &mut WsClient, ack_via: &str, want: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut uniq = HashSet::new();
    let mut dups = 0;
    let mut take = |a: &Agent, d: &serde_json::Value, ids: &mut Vec<String>| {
        for (id, m) in a.open_delivery(d).unwrap() {
            ids.push(id);
            let c = m["content"].as_str().unwrap().to_string();
            if !uniq.insert(c.clone()) {
                dups += 1;
            }
            seen.push(c);
        }
        uniq.len()
    };
    let mut have = 0;
    while have < want {
        let d = ws_next_message(a, ws).await;
        if type_name(&d) != "delivery" {
            continue;
        }
        let mut ids = Vec::new();
        have = take(a, &d, &mut ids);
        ack(a, ack_via, ids).await;
    }
    // Settle: whatever still arrives is counted (and acknowledged) too.
    loop {
        match ws.next(SETTLE).await {
            Err(e) if e.to_string().contains("nothing received") => break,
            Err(e) => panic!("socket error while settling: {e}"),
            Ok(WsEvent::Closed(r)) => panic!("socket closed while settling: {r:?}"),
            Ok(WsEvent::Envelope(e)) => {
                let d = a.unpack(&e).expect("unpacks").0;
                if type_name(&d) == "delivery" {
                    let mut ids = Vec::new();
                    take(a, &d, &mut ids);
                    ack(a, ack_via, ids).await;
                }
            }
        }
    }
    // A positive end marker: the ping's answer; deliveries written before it are counted.
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": mailroom::didcomm::message::new_id(), "response_requested": true, "~transport": {"return_route": "all"}});
    ws.send_envelope(a.pack(&ping).unwrap(), true).await.unwrap();
    loop {
        let d = ws_next_message(a, ws).await;
        match type_name(&d) {
            "ping_response" => break,
            "delivery" => {
                let mut ids = Vec::new();
                take(a, &d, &mut ids);
                ack(a, ack_via, ids).await;
            }
            _ => {}
        }
    }
    (seen, dups)
}

async fn ack(a: &mut Agent, via: &str, ids: Vec<String>) {
    a.endpoint = via.to_string();
    a.request(&pickup("messages-received", json!({"message_id_list": ids})))
        .await
        .unwrap();
}

async fn forward_via(node: &RunningNode, routing: &[String], key: &KeyPair, text: &str) -> u16 {
    Sender::new()
        .forward(&node.public_url(), &basic_message(text), &key.verkey(), routing)
        .await
        .unwrap()
}

/// A wallet onboarded on `home`, with its live socket there once `others` see `home` as the
/// owner of its session.
struct LiveWallet {
    a: Agent,
    k: KeyPair,
    conn: String,
    routing: Vec<String>,
    ws: WsClient,
}

/// Two nodes behind the proxies that cut or swallow their link (300 ms sweeps), and a wallet
/// live on n1.
async fn proxied_pair_with_wallet() -> (ProxiedPair, LiveWallet) {
    let pair = ProxiedPair::start(300).await;
    let w = live_wallet(&pair.n1, &[&pair.n2]).await;
    (pair, w)
}

async fn live_wallet(home: &RunningNode, others: &[&RunningNode]) -> LiveWallet {
    let inv = invitation(home).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    let conn = a_connection_id(home).await;
    let routing = a.grant.clone().unwrap().routing_keys;
    let ws = live_socket(&a, home).await;
    wait_owner(others, &conn, &home.node_id).await;
    LiveWallet {
        a,
        k,
        conn,
        routing,
        ws,
    }
}

/// Two nodes (no sweep) and a wallet live on n1, which n2 sees holding its session.
async fn pair_with_live_wallet() -> (TestCluster, LiveWallet) {
    let f = cluster_of(2, NO_SWEEP).await;
    let w = live_wallet(&f.nodes[0], &[&f.nodes[1]]).await;
    (f, w)
}

/// credo-ts #1625: the wallet's socket is on node 1; forwards land on nodes 2 and 3; every
/// one is delivered live through node 1 without the wallet reconnecting. Then the session
/// moves to node 2 and forwards on node 1 follow it there.
#[actix_rt::test]
async fn forwards_on_other_nodes_reach_the_live_session_and_follow_it_when_it_moves() {
    let f = cluster_of(3, NO_SWEEP).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let LiveWallet {
        mut a,
        k,
        conn,
        routing,
        mut ws,
    } = live_wallet(n1, &[n2, n3]).await;
    for i in 0..10 {
        assert_eq!(forward_via(n2, &routing, &k, &format!("via-n2-{i}")).await, 202);
        assert_eq!(forward_via(n3, &routing, &k, &format!("via-n3-{i}")).await, 202);
    }
    let (got, dups) = receive(&mut a, &mut ws, &n2.public_url(), 20).await;
    assert_eq!(dups, 0, "{got:?}");
    ws.close().await;

    // The wallet reconnects through the load balancer and lands on node 2.
    let mut ws2 = live_socket(&a, n2).await;
    wait_owner(&[n1, n3], &conn, "n2").await;
    for i in 0..10 {
        assert_eq!(forward_via(n1, &routing, &k, &format!("moved-{i}")).await, 202);
    }
    let (got, dups) = receive(&mut a, &mut ws2, &n3.public_url(), 10).await;
    assert_eq!(dups, 0);
    assert!(got.iter().all(|c| c.starts_with("moved-")), "{got:?}");
    let st = get_json(&format!("{}/status", n1.admin_url())).await;
    assert_eq!(st["sessions"], 0, "nothing is held for the dead session on node 1");
    assert_eq!(queue_depth(n1).await, 0);
}

/// An acknowledgement makes nothing deliverable (leases are per message, with no cap per
/// connection), so Credo-style acknowledgements over HTTP on another node than the wallet's
/// socket send no notification: each would cost the socket's node a lease, a PostgreSQL round
/// trip. Every forward still arrives live.
#[actix_rt::test]
async fn acknowledgements_over_http_on_another_node_wake_no_session() {
    let (f, mut w) = pair_with_live_wallet().await;
    let (n1, n2) = (&f.nodes[0], &f.nodes[1]);
    for i in 0..5 {
        assert_eq!(forward_via(n1, &w.routing, &w.k, &format!("m{i}")).await, 202);
    }
    let (got, dups) = receive(&mut w.a, &mut w.ws, &n2.public_url(), 5).await;
    assert_eq!(dups, 0, "{got:?}");
    assert_eq!(queue_depth(n1).await, 0, "every delivery was acknowledged on n2");
    assert_eq!(cluster_counter(n2, "notifications_sent").await, 0);
    assert_eq!(cluster_counter(n1, "notifications_received").await, 0);
    w.ws.close().await;
}

/// The link between two nodes is cut: delivery still completes through the sweep; the link
/// heals and the directory is resynchronised.
#[actix_rt::test]
async fn a_cut_link_only_delays_delivery_and_heals() {
    let (pair, mut w) = proxied_pair_with_wallet().await;
    let (n1, n2) = (&pair.n1, &pair.n2);

    pair.cut();
    eventually("n2 sees n1 down", || async {
        (!peer_connected(n2, "n1").await).then_some(())
    })
    .await;
    for i in 0..5 {
        assert_eq!(forward_via(n2, &w.routing, &w.k, &format!("cut-{i}")).await, 202);
    }
    // n2 may find n1 down and take it over meanwhile, giving back what n1's session was
    // delivering: a message may come twice (at least once), never not at all.
    let (got, dups) = receive(&mut w.a, &mut w.ws, &n1.public_url(), 5).await;
    let want: HashSet<String> = (0..5).map(|i| format!("cut-{i}")).collect();
    assert_eq!(got.iter().cloned().collect::<HashSet<_>>(), want);
    assert!(dups <= 5, "each at most twice (the take-over's give-back): {got:?}");

    pair.restore();
    eventually("link healed", || async { peer_connected(n2, "n1").await.then_some(()) }).await;
    wait_owner(&[n2], &w.conn, "n1").await;
    assert_eq!(queue_depth(n1).await, 0);
}

/// A `Deliver` frame written to a link that dies before the peer reads it (its bytes vanish
/// on the way, as in a socket buffer of a link that breaks): the sender, which cannot know
/// whether the peer read it, releases its messages when the link ends, and the wallet gets
/// them through the sweep on its node, not when their 30 s hand-off lease runs out. A frame
/// the peer did read is confirmed by the answer to a later ping and not released.
#[actix_rt::test]
async fn a_handoff_lost_with_its_link_is_released_not_left_to_its_lease() {
    let (pair, mut w) = proxied_pair_with_wallet().await;
    let (n1, n2) = (&pair.n1, &pair.n2);
    // Read by n1 and confirmed: never released.
    assert_eq!(forward_via(n2, &w.routing, &w.k, "before").await, 202);
    let (got, _) = receive(&mut w.a, &mut w.ws, &n1.public_url(), 1).await;
    assert_eq!(got, vec!["before".to_string()]);

    pair.swallow_n2_to_n1();
    let sent = cluster_counter(n2, "handoffs_sent").await;
    assert_eq!(forward_via(n2, &w.routing, &w.k, "lost on the wire").await, 202);
    // Handed off after the answer (the forward's follow-up runs in a task of its own).
    eventually("handed to n1 in a Deliver frame", || async {
        (cluster_counter(n2, "handoffs_sent").await == sent + 1).then_some(())
    })
    .await;
    // n1 hears nothing from n2 and closes the link after its failure timeout.
    eventually("the link ends", || async {
        (!peer_connected(n2, "n1").await).then_some(())
    })
    .await;
    let (got, dups) = receive(&mut w.a, &mut w.ws, &n1.public_url(), 1).await;
    assert_eq!(got, vec!["lost on the wire".to_string()]);
    assert_eq!(dups, 0);
    assert_eq!(cluster_counter(n2, "handoffs_unconfirmed").await, 1);

    pair.stop_swallowing();
    eventually("link healed", || async { peer_connected(n2, "n1").await.then_some(()) }).await;
    assert_eq!(queue_depth(n1).await, 0);
}

/// The other way round: n2's `Deliver` reaches n1, whose session writes it to the wallet, but
/// n1's answers to n2's pings vanish, so n2 cannot know it was read and releases it when the
/// link ends. The wallet has the message and has not acknowledged it yet: n1's sweep leases it
/// again for the session, which does not write what it already wrote.
#[actix_rt::test]
async fn a_released_handoff_its_session_already_wrote_is_not_written_twice() {
    let (pair, w) = proxied_pair_with_wallet().await;
    let LiveWallet {
        mut a,
        k,
        conn,
        routing,
        mut ws,
    } = w;
    let (n1, n2) = (&pair.n1, &pair.n2);
    pair.swallow_n1_to_n2();
    assert_eq!(forward_via(n2, &routing, &k, "once").await, 202);
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&d), "delivery", "{d}");
    let ids = delivery_ids(&a, &d);
    eventually(
        "n2 ends the link and releases the frame it cannot know was read",
        || async { (cluster_counter(n2, "handoffs_unconfirmed").await == 1).then_some(()) },
    )
    .await;
    let (pg, task) = tokio_postgres::connect(&pair.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    actix_rt::spawn(task);
    eventually("n1's session leased it again", || async {
        let row = pg
            .query_one("SELECT lease_owner FROM mailroom_messages WHERE conn_id = $1", &[&conn])
            .await
            .unwrap();
        let owner: Option<String> = row.get(0);
        owner.is_some_and(|o| o.contains("/ws/")).then_some(())
    })
    .await;
    // A positive marker: the answer to this ping comes next, with no second delivery before it.
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": mailroom::didcomm::message::new_id(), "response_requested": true, "~transport": {"return_route": "all"}});
    let next = ws_request(&a, &mut ws, &ping).await;
    assert_eq!(type_name(&next), "ping_response", "written twice: {next}");
    ack(&mut a, &n1.public_url(), ids).await;
    assert_eq!(queue_depth(n1).await, 0);
    pair.stop_swallowing();
}

/// A peer with the wrong secret, or naming another cluster, is refused and counted; the
/// cluster keeps working.
#[actix_rt::test]
async fn peers_with_a_wrong_secret_or_cluster_name_are_refused() {
    let f = cluster_of(3, NO_SWEEP).await;
    let n1 = &f.nodes[0];
    let store = open_shared_store(&{
        let mut c = mailroom::config::Config::single_node_default();
        c.store.backend = "postgres".into();
        c.store.url = Some(f.db.url.clone());
        c
    })
    .await;
    for (secret, name) in [("not-the-secret", "test"), (SECRET, "other-cluster")] {
        let mut rogue_cfg = mailroom::config::Config::single_node_default();
        rogue_cfg.nodes.clear();
        rogue_cfg.cluster.secret = Some(secret.into());
        rogue_cfg.cluster.name = name.into();
        rogue_cfg.cluster.heartbeat_ms = 100;
        rogue_cfg.cluster.failure_timeout_ms = 800;
        let l = bind_listeners();
        // The rogue claims to be n3 and dials n1.
        rogue_cfg.nodes.push(entry("n3", &l));
        rogue_cfg.nodes.push(mailroom::config::NodeEntry {
            id: "n1".into(),
            listen: n1.public_addr.to_string(),
            cluster: Some(n1.cluster_addr.unwrap().to_string()),
            admin: n1.admin_addr.to_string(),
        });
        let before = cluster_json(n1).await["cluster"]["counters"]["auth_failures"]
            .as_u64()
            .unwrap_or(0);
        let rogue = start_node(&rogue_cfg, "n3", l, &store, None);
        eventually("n1 counts the refused handshake", || async {
            let now = cluster_json(n1).await["cluster"]["counters"]["auth_failures"]
                .as_u64()
                .unwrap_or(0);
            (now > before).then_some(())
        })
        .await;
        assert!(!peer_connected(&rogue, "n1").await, "the rogue never gets a link");
        drop(rogue);
    }
    // Still a working cluster.
    let LiveWallet {
        mut a,
        k,
        routing,
        mut ws,
        ..
    } = live_wallet(n1, &[&f.nodes[1]]).await;
    forward_via(&f.nodes[1], &routing, &k, "after-rogues").await;
    let (got, dups) = receive(&mut a, &mut ws, &n1.public_url(), 1).await;
    assert_eq!((got.len(), dups), (1, 0), "{got:?}");
}

/// A fourth node joins a running cluster through the reload: its sessions get notifications
/// from the others, what was in flight is not lost, and its admin listener is as out of
/// agents' reach as the others'.
#[actix_rt::test]
async fn a_node_added_by_reload_gets_notifications() {
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    let (mut cfg, mut ls) = bind_cluster(4, &db.url, NO_SWEEP);
    let l4 = ls.pop().unwrap();
    let e4 = cfg.nodes.pop().unwrap();
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let store = open_shared_store(&cfg).await;
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        nodes.push(start_node(&cfg, &format!("n{}", i + 1), l, &store, Some(path.clone())));
    }
    // A wallet with messages in flight on the old cluster.
    let inv = invitation(&nodes[0]).await;
    let (mut a, k) = Agent::onboard(&inv).await.unwrap();
    let conn = a_connection_id(&nodes[0]).await;
    let routing = a.grant.clone().unwrap().routing_keys;
    for i in 0..3 {
        forward_via(&nodes[1], &routing, &k, &format!("before-{i}")).await;
    }
    // Scale out: the file gains n4; n4 starts; the others reload.
    cfg.nodes.push(e4);
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let n4 = start_node(&cfg, "n4", l4, &store, Some(path.clone()));
    for n in &nodes {
        let (st, body) = post_raw(&format!("{}/reload", n.admin_url()), "application/json", vec![]).await;
        assert_eq!(st, 200, "{body}");
        assert!(body.contains("\"peers\":3"), "{body}");
    }
    for n in &nodes {
        eventually("links to n4", || async { peer_connected(n, "n4").await.then_some(()) }).await;
    }
    // The new node's admin listener is refused to agents' endpoints as the others' are: an
    // agent connecting through n1 with n4's tokenless `/drain` as its endpoint drains nothing.
    let refused = endpoint_posts(&nodes[0], "refused").await;
    connect_replying_to(&nodes[0], &format!("{}/drain", n4.admin_url())).await;
    eventually("the POST to n4's admin refused", || async {
        (endpoint_posts(&nodes[0], "refused").await > refused).then_some(())
    })
    .await;
    assert_eq!(endpoint_posts(&nodes[0], "ok").await, 0);
    let (st, body) = get_status(&format!("{}/ready", n4.admin_url()), None).await;
    assert_eq!(st, 200, "n4 is not drained: {body}");
    let mut ws = live_socket(&a, &n4).await;
    wait_owner(&[&nodes[0], &nodes[1], &nodes[2]], &conn, "n4").await;
    for (i, n) in nodes.iter().enumerate() {
        forward_via(n, &routing, &k, &format!("after-{i}")).await;
    }
    let (got, dups) = receive(&mut a, &mut ws, &n4.public_url(), 6).await;
    assert_eq!(dups, 0);
    let got: HashSet<String> = got.into_iter().collect();
    for want in ["before-0", "before-1", "before-2", "after-0", "after-1", "after-2"] {
        assert!(got.contains(want), "{want} missing from {got:?}");
    }
    // A bad file is refused and changes nothing.
    std::fs::write(&path, "not = [valid").unwrap();
    let (st, _) = post_raw(&format!("{}/reload", nodes[0].admin_url()), "application/json", vec![]).await;
    assert_eq!(st, 400);
    assert!(peer_connected(&nodes[0], "n4").await);
}

/// Writes `cfg` to `path` and starts nodes n1.. on `ls` from it (on one shared store), as a
/// reload reads it again.
async fn start_from_file(
    cfg: &mailroom::config::Config,
    ls: Vec<mailroom::node::Listeners>,
    path: &std::path::Path,
) -> Vec<RunningNode> {
    std::fs::write(path, toml::to_string(cfg).unwrap()).unwrap();
    let store = open_shared_store(cfg).await;
    ls.into_iter()
        .enumerate()
        .map(|(i, l)| start_node(cfg, &format!("n{}", i + 1), l, &store, Some(path.to_path_buf())))
        .collect()
}

/// A rotated cluster secret, reloaded, is in use at once: the node closes its links (opened
/// with the old one) and links again only with nodes that reloaded it too, so a holder of the
/// old secret (a node removed for good) keeps no way in. Other changed `[cluster]` settings are
/// named as needing a restart, not reported as reloaded.
#[actix_rt::test]
async fn a_rotated_secret_is_applied_at_the_reload_and_the_old_one_links_no_more() {
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    let (mut cfg, ls) = bind_cluster(2, &db.url, NO_SWEEP);
    let nodes = start_from_file(&cfg, ls, &path).await;
    eventually("n1 linked to n2", || async {
        peer_connected(&nodes[0], "n2").await.then_some(())
    })
    .await;
    let reload = |n: &RunningNode| {
        let url = format!("{}/reload", n.admin_url());
        async move {
            let (st, body) = post_raw(&url, "application/json", vec![]).await;
            assert_eq!(st, 200, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    // The same file: nothing changes.
    let r = reload(&nodes[0]).await;
    assert_eq!(
        (
            r["secret_changed"].as_bool(),
            r["restart_needed"].as_array().map(Vec::len)
        ),
        (Some(false), Some(0)),
        "{r}"
    );
    // n1 reloads a new secret (and a new heartbeat, which needs a restart); n2 still has the old one.
    cfg.cluster.secret = Some("a-rotated-cluster-secret".into());
    cfg.cluster.heartbeat_ms += 100;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let failures = cluster_counter(&nodes[0], "auth_failures").await;
    let r = reload(&nodes[0]).await;
    assert_eq!(r["secret_changed"], true, "{r}");
    assert_eq!(r["restart_needed"], serde_json::json!(["cluster.heartbeat_ms"]), "{r}");
    eventually("n2's old secret refused by n1", || async {
        (cluster_counter(&nodes[0], "auth_failures").await > failures).then_some(())
    })
    .await;
    assert!(
        !peer_connected(&nodes[0], "n2").await,
        "n1 kept a link opened with the old secret"
    );
    // n2 reloads it too: they link again.
    let r = reload(&nodes[1]).await;
    assert_eq!(r["secret_changed"], true, "{r}");
    eventually("n1 and n2 linked again", || async {
        (peer_connected(&nodes[0], "n2").await && peer_connected(&nodes[1], "n1").await).then_some(())
    })
    .await;
}

/// POSTs `url` with `token` as its bearer token; the status and body.
async fn post_with_token(url: &str, token: &str) -> (u16, String) {
    let mut res = client()
        .post(url)
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send_body(Vec::<u8>::new())
        .await
        .expect("request");
    let body = res
        .body()
        .limit(1 << 20)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    (res.status().as_u16(), body)
}

/// The admin token never leaves the node: gathering the peers' histories, it signs the read
/// with the cluster secret instead, so whatever listens at a peer's configured admin address
/// (here a socket the test holds for a third node never started) learns nothing it can use,
/// and a node's own history is read only with the token or a configured peer's signature. A
/// rotated token is applied by the reload (the old one is refused from then on), and a
/// setting a reload cannot apply is named as needing a restart.
#[actix_rt::test]
async fn the_admin_token_stays_on_its_node_and_a_reload_rotates_it() {
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    let (mut cfg, ls) = bind_cluster(2, &db.url, NO_SWEEP);
    cfg.admin.token = Some("old-token".into());
    let snoop = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unused = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    cfg.nodes.push(mailroom::config::NodeEntry {
        id: "n3".into(),
        listen: unused(),
        cluster: Some(unused()),
        admin: snoop.local_addr().unwrap().to_string(),
    });
    let nodes = start_from_file(&cfg, ls, &path).await;
    let history = format!("{}/history", nodes[0].admin_url());
    let (snooped, _) = tokio::join!(
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            // The request's head, read to its blank line; WAIT at most.
            snoop.set_nonblocking(true).unwrap();
            let deadline = std::time::Instant::now() + WAIT;
            let mut s = loop {
                match snoop.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => panic!("n1 never read n3's history: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            String::from_utf8_lossy(&head).into_owned()
        }),
        async {
            let (st, body) = get_status(&history, Some("old-token")).await;
            assert_eq!(st, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let n2 = v["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "n2").cloned();
            assert_eq!(
                n2.map(|n| n["reachable"].clone()),
                Some(json!(true)),
                "n2's history read with n1's signature: {body}"
            );
        }
    );
    let snooped = snooped.unwrap().to_lowercase();
    assert!(snooped.starts_with("get /history?scope=node"), "{snooped}");
    assert!(
        !snooped.contains("old-token") && !snooped.contains("authorization"),
        "the token left the node: {snooped}"
    );
    assert!(snooped.contains("x-mailroom-peer: n1 "), "{snooped}");
    // A node's own history: the token, or a configured peer's signature; nothing else.
    let own = format!("{}/history?scope=node", nodes[1].admin_url());
    assert_eq!(get_status(&own, None).await.0, 401);
    let forged = client()
        .get(&own)
        .insert_header((
            "x-mailroom-peer",
            format!("n1 {} {}", mailroom::protocols::now_ms(), "00".repeat(32)),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 401, "a forged signature");
    // The token rotated in the file, and a setting a reload cannot apply changed too.
    cfg.admin.token = Some("new-token".into());
    cfg.limits.max_sessions += 1;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let (st, body) = post_with_token(&format!("{}/reload", nodes[0].admin_url()), "old-token").await;
    assert_eq!(st, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["admin_token_changed"], true, "{r}");
    assert_eq!(r["restart_needed"], json!(["limits.max_sessions"]), "{r}");
    let status = format!("{}/status", nodes[0].admin_url());
    assert_eq!(
        get_status(&status, Some("old-token")).await.0,
        401,
        "the old token still works"
    );
    assert_eq!(get_status(&status, Some("new-token")).await.0, 200);
    // The scheme in any case (RFC 7235).
    let lower = client()
        .get(&status)
        .insert_header(("Authorization", "bearer new-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
}

/// One of this node's cluster counters (`/cluster`), e.g. `routes_changed_received`.
async fn cluster_counter(n: &RunningNode, name: &str) -> u64 {
    cluster_json(n).await["cluster"]["counters"][name].as_u64().unwrap_or(0)
}

/// Routes are cached on each node. A key removed through one node is forgotten by the other
/// (a `RoutesChanged` frame), and a forward right after the removal queues nothing for the
/// connection that lost it. A route a node keeps because it never heard of a removal (made in
/// the store directly, no frame) still queues nothing: the store checks the route when it
/// queues.
#[actix_rt::test]
async fn a_removed_key_is_never_routed_to_its_old_connection_from_any_node() {
    let db = FreshDb::create().await;
    let (cfg, ls) = bind_cluster(2, &db.url, NO_SWEEP);
    let store = open_shared_store(&cfg).await;
    let mut ls = ls.into_iter();
    let n1 = start_node(&cfg, "n1", ls.next().unwrap(), &store, None);
    let n2 = start_node(&cfg, "n2", ls.next().unwrap(), &store, None);
    for (n, p) in [(&n1, "n2"), (&n2, "n1")] {
        eventually("cluster links up", || async {
            peer_connected(n, p).await.then_some(())
        })
        .await;
    }
    let inv = invitation(&n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    let conn = a_connection_id(&n1).await;
    let routing = a.grant.clone().unwrap().routing_keys;
    // n2 looks the route up and caches it.
    assert_eq!(forward_via(&n2, &routing, &k, "before").await, 202);
    assert_eq!(queue_depth(&n2).await, 1);

    // Removed through n1: n2 is told, and a forward on n2 right away finds no route.
    let heard = cluster_counter(&n2, "routes_changed_received").await;
    a.keylist_update(&[], &[k.verkey()]).await.unwrap();
    assert_eq!(forward_via(&n2, &routing, &k, "after removal").await, 404);
    assert_eq!(queue_depth(&n2).await, 1, "nothing queued for the old connection");
    eventually("n2 heard of the removal", || async {
        (cluster_counter(&n2, "routes_changed_received").await > heard).then_some(())
    })
    .await;

    // A route n2 caches again, then removed behind every node's back: still refused.
    let key = k.verkey();
    let shared = store.clone();
    let (c, kk) = (conn.clone(), key.clone());
    background_runtime()
        .spawn(async move { shared.update_keys(&c, &[kk], &[]).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(forward_via(&n2, &routing, &k, "re-added").await, 202);
    assert_eq!(queue_depth(&n2).await, 2);
    let shared = store.clone();
    background_runtime()
        .spawn(async move { shared.update_keys(&conn, &[], &[key]).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(forward_via(&n2, &routing, &k, "stale route").await, 404);
    assert_eq!(queue_depth(&n2).await, 2, "nothing queued through the stale route");
    drop((n1, n2));
    let _ = db;
}

/// This node's `mailroom_store_seconds_count{op="..."}`: how many store calls of one kind it
/// made.
async fn store_calls(n: &RunningNode, op: &str) -> u64 {
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    let name = format!("mailroom_store_seconds_count{{op=\"{op}\"}}");
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// A forward for a wallet whose live session is on another node is queued leased to that
/// node and travels with its notification (a `Deliver` frame): the session's node writes it
/// out with no lease of its own, one PostgreSQL round trip less between the POST and the
/// wallet.
#[actix_rt::test]
async fn a_forward_for_a_live_session_elsewhere_travels_with_its_notification() {
    let (f, mut w) = pair_with_live_wallet().await;
    let (n1, n2) = (&f.nodes[0], &f.nodes[1]);
    // One at a time: each one, leased, would take a lease of its own.
    let leases = store_calls(n1, "lease").await;
    for i in 0..10 {
        assert_eq!(forward_via(n2, &w.routing, &w.k, &format!("m{i}")).await, 202);
        let d = ws_next_message(&w.a, &mut w.ws).await;
        assert_eq!(type_name(&d), "delivery", "{d}");
        assert_eq!(contents(&w.a, &d), vec![format!("m{i}")]);
        let ids = delivery_ids(&w.a, &d);
        ack(&mut w.a, &n2.public_url(), ids).await;
    }
    assert_eq!(cluster_counter(n2, "handoffs_sent").await, 10);
    assert_eq!(cluster_counter(n1, "handoffs_received").await, 10);
    assert_eq!(cluster_counter(n2, "notifications_sent").await, 0);
    // At most the two the session's binding started (an empty queue) can land meanwhile.
    let more = store_calls(n1, "lease").await - leases;
    assert!(more <= 2, "n1 leased {more} times for 10 handed deliveries");
    assert_eq!(queue_depth(n1).await, 0, "every delivery was acknowledged");
    w.ws.close().await;
}

/// A delivery handed to a session is leased to its node, not to the session: when the wallet
/// drops the socket without acknowledging it, the node gives it back at once, and the wallet
/// gets it again as it reconnects elsewhere, long before the lease (30 s) would run out.
/// With sweeps (300 ms): the give-back may reach n1's directory before the new session's
/// claim does, after that session's first drain, and then the sweep delivers it.
#[actix_rt::test]
async fn a_handed_delivery_left_unacknowledged_comes_again_at_once_elsewhere() {
    let f = cluster_of(2, 300).await;
    let LiveWallet {
        a,
        k,
        conn,
        routing,
        mut ws,
    } = live_wallet(&f.nodes[0], &[&f.nodes[1]]).await;
    let (n1, n2) = (&f.nodes[0], &f.nodes[1]);
    assert_eq!(forward_via(n2, &routing, &k, "unacknowledged").await, 202);
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&d), "delivery", "{d}");
    assert_eq!(contents(&a, &d), vec!["unacknowledged".to_string()]);
    assert_eq!(cluster_counter(n1, "handoffs_received").await, 1);
    ws.close().await;

    let started = std::time::Instant::now();
    let mut ws2 = live_socket(&a, n2).await;
    wait_owner(&[n1], &conn, "n2").await;
    let d = ws_next_message(&a, &mut ws2).await;
    assert_eq!(type_name(&d), "delivery", "{d}");
    assert_eq!(contents(&a, &d), vec!["unacknowledged".to_string()]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "given back at once, not when the 30 s lease ran out: {:?}",
        started.elapsed()
    );
    ws2.close().await;
}

/// Two wallets live on the same node, forwards for both accepted by another: every `Deliver`
/// frame reaches the session of the connection whose key the forward was sent to, and no
/// other (each wallet opens only what was packed for it, so a stray would not even unpack).
#[actix_rt::test]
async fn handed_deliveries_reach_only_their_own_wallet() {
    let f = cluster_of(2, NO_SWEEP).await;
    let (n1, n2) = (&f.nodes[0], &f.nodes[1]);
    let mut wa = live_wallet(n1, &[n2]).await;
    let inv = invitation(n1).await;
    let (mut b, kb) = Agent::onboard(&inv).await.unwrap();
    let conns = get_json(&format!("{}/connections", n1.admin_url())).await;
    let conn_b = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .find(|c| *c != wa.conn)
        .expect("the second wallet's connection");
    let routing_b = b.grant.clone().unwrap().routing_keys;
    let mut ws_b = live_socket(&b, n1).await;
    wait_owner(&[n2], &conn_b, "n1").await;
    for i in 0..5 {
        assert_eq!(forward_via(n2, &wa.routing, &wa.k, &format!("a{i}")).await, 202);
        assert_eq!(forward_via(n2, &routing_b, &kb, &format!("b{i}")).await, 202);
    }
    let (got_a, dups_a) = receive(&mut wa.a, &mut wa.ws, &n2.public_url(), 5).await;
    let (got_b, dups_b) = receive(&mut b, &mut ws_b, &n2.public_url(), 5).await;
    assert_eq!((dups_a, dups_b), (0, 0));
    assert!(got_a.iter().all(|c| c.starts_with('a')), "{got_a:?}");
    assert!(got_b.iter().all(|c| c.starts_with('b')), "{got_b:?}");
    assert_eq!(cluster_counter(n2, "handoffs_sent").await, 10);
    wa.ws.close().await;
    ws_b.close().await;
}

/// n1 of a two-node cluster whose n2 is the test (a link as n2 over the real handshake; n2's
/// own listeners dropped), and a wallet onboarded on n1.
struct PeerLinked {
    db: FreshDb,
    store: std::sync::Arc<dyn mailroom::store::Store>,
    n1: RunningNode,
    n2: mailroom::cluster::link::Link<tokio::net::TcpStream>,
    a: Agent,
    k: KeyPair,
    conn: String,
}

/// [`PeerLinked`], with `tweak` applied to the config. n2 answers no heartbeats: n1 keeps its
/// link up for a minute.
async fn node_with_peer_link(tweak: impl FnOnce(&mut mailroom::config::Config)) -> PeerLinked {
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, NO_SWEEP);
    cfg.cluster.failure_timeout_ms = 60_000;
    tweak(&mut cfg);
    let store = open_shared_store(&cfg).await;
    let mut ls = ls.into_iter();
    let n1 = start_node(&cfg, "n1", ls.next().unwrap(), &store, None);
    drop(ls);
    let (a, k) = Agent::onboard(&invitation(&n1).await).await.unwrap();
    let conn = a_connection_id(&n1).await;
    let n2 = link_as_peer(&cfg, &n1, "n2").await;
    PeerLinked {
        db,
        store,
        n1,
        n2,
        a,
        k,
        conn,
    }
}

/// A peer takes a wallet's session, then reads nothing more from its link (its own sockets
/// stalled, say). This node hands it the wallet's forwards only until the peer's send budget
/// is spent (a few 64 KiB frames), not until its queue of 4096 frames is (each up to
/// `max_frame`, 4 GiB at the defaults); past it, they go back to the store, pending, for the
/// wallet's next session to take. Nothing is lost: those handed off are leased to n2's
/// hand-off owner (and given back when its link ends), the others are pending.
#[actix_rt::test]
async fn forwards_for_a_peer_that_reads_nothing_go_back_to_the_store() {
    const FORWARDS: u64 = 160;
    let PeerLinked {
        db,
        store,
        n1,
        mut n2,
        a,
        k,
        conn,
    } = node_with_peer_link(|c| c.cluster.max_frame_bytes = 64 * 1024).await;
    let routing = a.grant.clone().unwrap().routing_keys;
    let epoch = (mailroom::protocols::now_ms() as u64) << 16;
    n2.writer
        .send(&Frame::Own {
            conn: conn.clone(),
            epoch,
        })
        .await
        .unwrap();
    wait_owner(&[&n1], &conn, "n2").await;
    // ~56 KB inner envelopes: one per `Deliver` frame of at most 64 KiB.
    let text = "x".repeat(40_000);
    for i in 0..FORWARDS {
        assert_eq!(forward_via(&n1, &routing, &k, &format!("{i} {text}")).await, 202);
    }
    let (sent, failed) = eventually("every forward handed off or given back", || async {
        let sent = cluster_counter(&n1, "handoffs_sent").await;
        let failed = cluster_counter(&n1, "handoffs_failed").await;
        (sent + failed == FORWARDS).then_some((sent, failed))
    })
    .await;
    eprintln!("{sent} of {FORWARDS} forwards handed to a peer that reads nothing");
    assert!(
        failed > 0,
        "all {FORWARDS} forwards queued for a peer that reads nothing"
    );
    eventually("the forwards not handed off are pending again", || async {
        let q = store.queue_stats(&conn, mailroom::protocols::now_ms()).await.unwrap();
        (q.pending == failed && q.leased == sent).then_some(())
    })
    .await;
    let now = mailroom::protocols::now_ms();
    let leased = store.lease(&conn, 1_000, "test", now, now + 600_000).await.unwrap();
    assert_eq!(leased.len() as u64, failed, "what is pending is leasable");
    drop((n1, n2));
    let _ = db;
}

/// A peer's operator closes a wallet's sessions everywhere with a reason of its own, as long as
/// a frame allows: the wallet's socket here closes with a valid close frame, its reason cut to
/// the 123 bytes a close frame carries. Before, the whole reason went into the frame, a control
/// frame of 10 KB that the wallet's client refused.
#[actix_rt::test]
async fn a_peers_long_close_reason_closes_the_wallets_socket_with_a_valid_frame() {
    let PeerLinked {
        db,
        n1,
        mut n2,
        a,
        conn,
        ..
    } = node_with_peer_link(|_| {}).await;
    let mut ws = live_socket(&a, &n1).await;
    let reason = format!("revoked: {}", "é".repeat(5_000));
    n2.writer.send(&Frame::CloseSessions { conn, reason }).await.unwrap();
    let closed = loop {
        match ws.next(WAIT).await.expect("a valid close frame") {
            WsEvent::Closed(r) => break r.expect("a close reason"),
            WsEvent::Envelope(_) => continue,
        }
    };
    assert_eq!(u16::from(closed.code), mailroom::admin::OPERATOR_CLOSE_CODE);
    let why = closed.description.unwrap_or_default();
    assert!(why.len() <= 123, "a close reason of {} bytes", why.len());
    assert!(why.starts_with("revoked: é") && why.ends_with('…'), "{why:?}");
    drop((n1, n2));
    let _ = db;
}
