//! Real-TCP, in-process tests of the cluster subsystem: nodes on 127.0.0.1:0, conditions
//! awaited with timeouts (no fixed sleeps), a tiny TCP proxy to cut and restore links.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mailroom::cluster::proto::{self, Frame, HandedMsg, Hello};
use mailroom::cluster::{codec, handshake, ClusterConfig, ClusterEvent, ClusterHandle, NotifyOutcome, PeerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const HEARTBEAT: Duration = Duration::from_millis(100);
/// The failure timeout of every node (50 heartbeats). Long enough that a loaded 2-core machine
/// never finds a live peer down: after a stall of the process, the membership tick may run
/// before the link readers take in the heartbeats queued meanwhile, so a stall as long as the
/// timeout would be a false PeerDown (a test that waits for PeerDown waits that much longer).
/// Also long enough that a crash's closed link is noticed well inside it.
const FAILURE: Duration = Duration::from_secs(5);
/// Bound on every wait: generous, a condition normally holds long before.
const WAIT: Duration = Duration::from_secs(30);

struct Node {
    h: ClusterHandle,
    ev: mpsc::Receiver<ClusterEvent>,
}

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn peers(list: &[(&str, SocketAddr)]) -> Vec<PeerConfig> {
    list.iter()
        .map(|(id, addr)| PeerConfig {
            id: id.to_string(),
            addr: *addr,
        })
        .collect()
}

fn cfg(id: &str, peers: Vec<PeerConfig>) -> ClusterConfig {
    cfg_with(id, peers, FAILURE)
}

fn cfg_with(id: &str, peers: Vec<PeerConfig>, failure: Duration) -> ClusterConfig {
    let mut c = ClusterConfig::new(id, "test", "s3cret", peers);
    c.heartbeat_interval = HEARTBEAT;
    c.failure_timeout = failure;
    c
}

async fn start(cfg: ClusterConfig, l: TcpListener) -> Node {
    let (tx, ev) = mpsc::channel(1024);
    let h = ClusterHandle::start(cfg, l, tx).await.unwrap();
    Node { h, ev }
}

/// Starts `ids.len()` fully meshed nodes.
async fn mesh(ids: &[&str]) -> (Vec<Node>, Vec<SocketAddr>) {
    mesh_with(ids, FAILURE).await
}

async fn mesh_with(ids: &[&str], failure: Duration) -> (Vec<Node>, Vec<SocketAddr>) {
    let mut ls = Vec::new();
    for _ in ids {
        ls.push(bind().await);
    }
    let addrs: Vec<SocketAddr> = ls.iter().map(|(_, a)| *a).collect();
    let mut nodes = Vec::new();
    for (i, (l, _)) in ls.into_iter().enumerate() {
        let others: Vec<(&str, SocketAddr)> = ids
            .iter()
            .zip(&addrs)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (id, a))| (*id, *a))
            .collect();
        nodes.push(start(cfg_with(ids[i], peers(&others), failure), l).await);
    }
    (nodes, addrs)
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_event(
    rx: &mut mpsc::Receiver<ClusterEvent>,
    what: &str,
    mut pred: impl FnMut(&ClusterEvent) -> bool,
) -> ClusterEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event channel closed waiting for: {what}"),
            Err(_) => panic!("timed out waiting for event: {what}"),
        }
    }
}

fn connected(n: &Node, peer: &str) -> bool {
    n.h.status().peers.iter().any(|p| p.id == peer && p.connected)
}

fn all_connected(nodes: &[Node]) -> bool {
    nodes.iter().all(|n| {
        let s = n.h.status();
        s.peers.len() == nodes.len() - 1 && s.peers.iter().all(|p| p.connected)
    })
}

fn queued(conn: &str) -> impl FnMut(&ClusterEvent) -> bool + '_ {
    move |e| matches!(e, ClusterEvent::MessageQueued { conn: c } if c == conn)
}

fn owner_is(n: &Node, conn: &str, node: Option<&str>) -> bool {
    n.h.owner_of(conn).as_deref() == node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_notify_the_owner_only_and_follow_moves_and_crashes() {
    let (mut nodes, _) = mesh(&["n1", "n2", "n3"]).await;
    wait_until("full mesh", || all_connected(&nodes)).await;
    wait_until("handshakes attempted", || {
        nodes.iter().all(|n| n.h.handshake_attempted())
    })
    .await;

    let e1 = nodes[0].h.announce_session("c1");
    wait_until("n2, n3 see n1 owning c1", || {
        owner_is(&nodes[1], "c1", Some("n1")) && owner_is(&nodes[2], "c1", Some("n1"))
    })
    .await;

    assert_eq!(nodes[1].h.notify_queued("c1"), NotifyOutcome::Sent("n1".into()));
    assert_eq!(nodes[2].h.notify_queued("c1"), NotifyOutcome::Sent("n1".into()));
    wait_event(&mut nodes[0].ev, "first Queued on n1", queued("c1")).await;
    wait_event(&mut nodes[0].ev, "second Queued on n1", queued("c1")).await;
    // Targeted, not broadcast: nobody else received a notification.
    assert_eq!(nodes[0].h.status().counters.notifications_received, 2);
    assert_eq!(nodes[1].h.status().counters.notifications_received, 0);
    assert_eq!(nodes[2].h.status().counters.notifications_received, 0);
    assert_eq!(nodes[1].h.status().counters.notifications_sent, 1);

    assert_eq!(nodes[0].h.notify_queued("c1"), NotifyOutcome::Local);
    assert_eq!(nodes[0].h.notify_queued("nobody"), NotifyOutcome::NoOwner);

    // The wallet reconnects through n2: a newer epoch there wins everywhere.
    let e2 = nodes[1].h.announce_session("c1");
    assert!(e2 > e1);
    wait_until("everyone sees n2 owning c1", || {
        nodes.iter().all(|n| owner_is(n, "c1", Some("n2")))
    })
    .await;
    wait_event(
        &mut nodes[0].ev,
        "SessionMoved on n1",
        |e| matches!(e, ClusterEvent::SessionMoved { conn, node } if conn == "c1" && node == "n2"),
    )
    .await;
    assert_eq!(nodes[2].h.notify_queued("c1"), NotifyOutcome::Sent("n2".into()));
    wait_event(&mut nodes[1].ev, "Queued on n2", queued("c1")).await;
    assert_eq!(nodes[0].h.status().counters.notifications_received, 2);

    // n1's old session ends late: it must not remove n2's newer one.
    nodes[0].h.withdraw_session("c1", e1);
    nodes[1].h.withdraw_session("c1", e1); // stale epoch for n2's claim: ignored
    let e3 = nodes[2].h.announce_session("probe"); // a marker behind the withdrawals
    wait_until("probe seen", || owner_is(&nodes[0], "probe", Some("n3"))).await;
    wait_until("probe seen on n2", || owner_is(&nodes[1], "probe", Some("n3"))).await;
    assert!(nodes.iter().all(|n| owner_is(n, "c1", Some("n2"))));
    nodes[2].h.withdraw_session("probe", e3);

    // Status, as the admin endpoint will serialize it.
    let v = serde_json::to_value(nodes[0].h.status()).unwrap();
    assert_eq!(v["node"], "n1");
    let ps = v["peers"].as_array().unwrap();
    assert_eq!(ps.len(), 2);
    for p in ps {
        assert_eq!(p["connected"], true);
        assert_eq!(p["handshake_attempted"], true);
        assert!(p["id"].is_string() && p["addr"].is_string());
        assert!(p["last_heartbeat_age_ms"].as_u64().unwrap() < FAILURE.as_millis() as u64);
        assert!(p.get("rtt_ms").is_some());
    }
    let dir = v["directory"].as_array().unwrap();
    assert!(dir
        .iter()
        .any(|e| e["conn"] == "c1" && e["node"] == "n2" && e["epoch"] == e2));
    for k in [
        "notifications_sent",
        "notifications_received",
        "notifications_failed",
        "frames_rejected",
        "auth_failures",
    ] {
        assert!(v["counters"][k].is_u64(), "{k}");
    }

    // Crash of n1 (no Leave): n2 and n3 mark it down within the failure timeout and drop its
    // sessions.
    nodes[0].h.announce_session("c9");
    wait_until("c9 seen", || {
        owner_is(&nodes[1], "c9", Some("n1")) && owner_is(&nodes[2], "c9", Some("n1"))
    })
    .await;
    let failed_before = nodes[1].h.status().counters.notifications_failed;
    let t0 = Instant::now();
    nodes[0].h.shutdown().await;
    // Link gone but the failure timeout not yet over: the owner is known, unreachable. With a
    // 5 s failure timeout the closed link is seen long before n1 can be declared down.
    wait_until("n2 sees the link closed", || !connected(&nodes[1], "n1")).await;
    let closed_after = t0.elapsed();
    assert!(
        owner_is(&nodes[1], "c9", Some("n1")),
        "n1 dropped from n2's directory {closed_after:?} after the crash, before its failure timeout"
    );
    // The peer's status turns before its link's sender is taken down: a notification queued in
    // between is still sent (into the link being dropped, as one sent just before the crash
    // would be; seen once in CI). Asked until the node finds n1 unreachable, which it must
    // well before the failure timeout (after it, n1 owns nothing and the answer is NoOwner).
    wait_until("n2 finds n1 unreachable", || {
        nodes[1].h.notify_queued("c9") == NotifyOutcome::Failed("n1".into())
    })
    .await;
    assert_eq!(nodes[1].h.status().counters.notifications_failed, failed_before + 1);
    let [_, n2, n3] = &mut nodes[..] else { unreachable!() };
    for n in [n2, n3] {
        wait_event(
            &mut n.ev,
            "PeerDown n1",
            |e| matches!(e, ClusterEvent::PeerDown { node, .. } if node == "n1"),
        )
        .await;
        assert!(owner_is(n, "c9", None));
        assert!(n.h.status().directory.iter().all(|e| e.node != "n1"));
    }
    // A crash is not a Leave: down only once the failure timeout ran out since the last
    // heartbeat n2 heard (at most one interval, plus some jitter, before t0). No upper bound
    // on wall time: waiting for PeerDown is bounded by WAIT.
    assert!(
        t0.elapsed() >= FAILURE - HEARTBEAT * 3,
        "n1 declared down {:?} after its crash, before the failure timeout",
        t0.elapsed()
    );
    wait_until("n2 and n3 still linked", || {
        connected(&nodes[1], "n3") && connected(&nodes[2], "n2")
    })
    .await;
    nodes[1].h.shutdown().await;
    nodes[2].h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_drops_entries_at_once() {
    let (mut ls, mut addrs) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (l, a) = bind().await;
        ls.push(l);
        addrs.push(a);
    }
    // A failure timeout far longer than the test: only Leave can explain a quick PeerDown.
    let mut c1 = cfg("n1", peers(&[("n2", addrs[1])]));
    let mut c2 = cfg("n2", peers(&[("n1", addrs[0])]));
    c1.failure_timeout = Duration::from_secs(60);
    c2.failure_timeout = Duration::from_secs(60);
    let l2 = ls.pop().unwrap();
    let l1 = ls.pop().unwrap();
    let n1 = start(c1, l1).await;
    let mut n2 = start(c2, l2).await;
    n1.h.announce_session("a");
    wait_until("n2 sees a", || owner_is(&n2, "a", Some("n1"))).await;
    let t0 = Instant::now();
    n1.h.leave().await;
    wait_event(
        &mut n2.ev,
        "PeerDown after Leave",
        |e| matches!(e, ClusterEvent::PeerDown { node, .. } if node == "n1"),
    )
    .await;
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "PeerDown {:?} after Leave: not from the 60 s failure timeout",
        t0.elapsed()
    );
    assert!(owner_is(&n2, "a", None));
    n2.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_wrong_cluster_are_refused_while_the_rest_works() {
    let mut ls = Vec::new();
    for _ in 0..4 {
        ls.push(bind().await);
    }
    let a: Vec<SocketAddr> = ls.iter().map(|x| x.1).collect();
    let all = |me: usize| {
        let ids = ["n1", "n2", "n3", "n4"];
        peers(&(0..4).filter(|&j| j != me).map(|j| (ids[j], a[j])).collect::<Vec<_>>())
    };
    let mut it = ls.into_iter().map(|x| x.0);
    let mut n1 = start(cfg("n1", all(0)), it.next().unwrap()).await;
    let n2 = start(cfg("n2", all(1)), it.next().unwrap()).await;
    let mut bad_secret = cfg("n3", all(2));
    bad_secret.secret = "wrong".into();
    let n3 = start(bad_secret, it.next().unwrap()).await;
    let mut bad_cluster = cfg("n4", all(3));
    bad_cluster.cluster_name = "other".into();
    let n4 = start(bad_cluster, it.next().unwrap()).await;

    wait_until("n1 <-> n2", || connected(&n1, "n2") && connected(&n2, "n1")).await;
    wait_until("refusals counted on n1 and n2", || {
        n1.h.status().counters.auth_failures >= 2 && n2.h.status().counters.auth_failures >= 2
    })
    .await;
    wait_until("every peer tried", || n1.h.handshake_attempted()).await;
    for n in [&n1, &n2] {
        assert!(!connected(n, "n3") && !connected(n, "n4"));
    }
    assert!(!connected(&n3, "n1") && !connected(&n4, "n1"));
    assert!(n3.h.status().counters.auth_failures >= 1);
    assert!(n4.h.status().counters.auth_failures >= 1);

    // The good pair still works.
    n1.h.announce_session("x");
    wait_until("n2 sees x", || owner_is(&n2, "x", Some("n1"))).await;
    assert_eq!(n2.h.notify_queued("x"), NotifyOutcome::Sent("n1".into()));
    wait_event(&mut n1.ev, "Queued x", queued("x")).await;
    // Refused nodes never got n1's sessions.
    assert!(owner_is(&n3, "x", None) && owner_is(&n4, "x", None));
    for n in [n1, n2, n3, n4] {
        n.h.shutdown().await;
    }
}

/// Reads until the server closes the connection; true if it did within the wait.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // our peer's preamble/hello/refusal
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_bad_frames_close_that_connection_only() {
    let mut ls = Vec::new();
    for _ in 0..3 {
        ls.push(bind().await);
    }
    let addrs: Vec<SocketAddr> = ls.iter().map(|x| x.1).collect();
    // "ghost" is configured on n1 but never runs (its port is closed): the test speaks as it.
    let ghost_addr = bind().await.1;
    let mut it = ls.into_iter().map(|x| x.0);
    let mut nodes = vec![
        start(
            cfg(
                "n1",
                peers(&[("n2", addrs[1]), ("n3", addrs[2]), ("ghost", ghost_addr)]),
            ),
            it.next().unwrap(),
        )
        .await,
        start(
            cfg("n2", peers(&[("n1", addrs[0]), ("n3", addrs[2])])),
            it.next().unwrap(),
        )
        .await,
        start(
            cfg("n3", peers(&[("n1", addrs[0]), ("n2", addrs[1])])),
            it.next().unwrap(),
        )
        .await,
    ];
    let mesh_ok = |nodes: &[Node]| {
        connected(&nodes[0], "n2")
            && connected(&nodes[0], "n3")
            && connected(&nodes[1], "n3")
            && connected(&nodes[1], "n1")
            && connected(&nodes[2], "n1")
            && connected(&nodes[2], "n2")
    };
    wait_until("mesh", || mesh_ok(&nodes)).await;

    // 1. Not our protocol at all.
    let mut s = TcpStream::connect(addrs[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(closed_by_server(&mut s).await);

    // 2. Right preamble, then an absurd length.
    let mut s = TcpStream::connect(addrs[0]).await.unwrap();
    let mut pre = mailroom::cluster::proto::preamble().to_vec();
    pre.extend_from_slice(&[0xff; 4]);
    s.write_all(&pre).await.unwrap();
    assert!(closed_by_server(&mut s).await);

    wait_until("both rejections counted", || {
        nodes[0].h.status().counters.frames_rejected >= 2
    })
    .await;

    // 2a. Before authentication, a length a handshake frame never has (under the link's
    //     max_frame, over what a Hello or a Noise message can be): refused at once, not
    //     awaited until the handshake times out.
    let mut s = TcpStream::connect(addrs[0]).await.unwrap();
    let mut pre = mailroom::cluster::proto::preamble().to_vec();
    pre.extend_from_slice(&((handshake::HANDSHAKE_FRAME_MAX + 1) as u32).to_be_bytes());
    s.write_all(&pre).await.unwrap();
    wait_until("a handshake frame over its cap counted", || {
        nodes[0].h.status().counters.frames_rejected >= 3
    })
    .await;
    assert!(closed_by_server(&mut s).await);

    // 2b. A future protocol version: refused as an auth failure, with a reason, and closed.
    let before = nodes[0].h.status().counters.auth_failures;
    let mut s = TcpStream::connect(addrs[0]).await.unwrap();
    s.write_all(&[b'M', b'L', b'R', b'M', 0, 99]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    wait_until("version refusal counted", || {
        nodes[0].h.status().counters.auth_failures > before
    })
    .await;

    // 3. An authenticated peer (the ghost's identity, with the secret) then sending an
    //    oversize frame: n1 closes that link only.
    let mut s = TcpStream::connect(addrs[0]).await.unwrap();
    let local = handshake::Local {
        cluster: "test",
        node: "ghost",
        secret: b"s3cret",
        max_frame: 1 << 20,
    };
    let res = handshake::run(&mut s, &local, handshake::Role::Dialer, Some("n1"), |_| true).await;
    assert_eq!(res.unwrap().peer, "n1");
    wait_until("ghost link installed", || connected(&nodes[0], "ghost")).await;
    s.write_all(&(16u32 << 20).to_be_bytes()).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    wait_until("oversize frame counted", || {
        nodes[0].h.status().counters.frames_rejected >= 4
    })
    .await;

    wait_until("ghost link closed", || !connected(&nodes[0], "ghost")).await;

    // Everything else still works.
    assert!(mesh_ok(&nodes));
    nodes[0].h.announce_session("g");
    wait_until("g seen", || {
        owner_is(&nodes[1], "g", Some("n1")) && owner_is(&nodes[2], "g", Some("n1"))
    })
    .await;
    assert_eq!(nodes[1].h.notify_queued("g"), NotifyOutcome::Sent("n1".into()));
    wait_event(&mut nodes[0].ev, "Queued g", queued("g")).await;
    for n in &nodes {
        n.h.shutdown().await;
    }
}

/// A TCP proxy that can cut every connection through it and refuse new ones until reopened.
struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

async fn proxy(target: SocketAddr) -> Proxy {
    let (l, addr) = bind().await;
    let (open, rx) = watch::channel(true);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            if !*rx.borrow() {
                continue; // dropped: link is cut
            }
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = rx.wait_for(|open| !*open) => {}
                }
            });
        }
    });
    Proxy { addr, open }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_then_restored_resyncs() {
    let mut ls = Vec::new();
    for _ in 0..3 {
        ls.push(bind().await);
    }
    let a: Vec<SocketAddr> = ls.iter().map(|x| x.1).collect();
    // n1 and n2 reach each other only through proxies; n3 directly.
    let p12 = proxy(a[1]).await;
    let p21 = proxy(a[0]).await;
    let mut it = ls.into_iter().map(|x| x.0);
    let mut n1 = start(cfg("n1", peers(&[("n2", p12.addr), ("n3", a[2])])), it.next().unwrap()).await;
    let mut n2 = start(cfg("n2", peers(&[("n1", p21.addr), ("n3", a[2])])), it.next().unwrap()).await;
    let n3 = start(cfg("n3", peers(&[("n1", a[0]), ("n2", a[1])])), it.next().unwrap()).await;
    let nodes_ok = |n1: &Node, n2: &Node, n3: &Node| {
        connected(n1, "n2")
            && connected(n1, "n3")
            && connected(n2, "n1")
            && connected(n2, "n3")
            && connected(n3, "n1")
            && connected(n3, "n2")
    };
    wait_until("mesh", || nodes_ok(&n1, &n2, &n3)).await;
    n1.h.announce_session("s1");
    wait_until("n2 sees s1", || owner_is(&n2, "s1", Some("n1"))).await;

    // Cut.
    p12.open.send_replace(false);
    p21.open.send_replace(false);
    wait_event(
        &mut n2.ev,
        "n2: PeerDown n1",
        |e| matches!(e, ClusterEvent::PeerDown { node, .. } if node == "n1"),
    )
    .await;
    wait_event(
        &mut n1.ev,
        "n1: PeerDown n2",
        |e| matches!(e, ClusterEvent::PeerDown { node, .. } if node == "n2"),
    )
    .await;
    assert!(owner_is(&n2, "s1", None));
    assert_eq!(n2.h.notify_queued("s1"), NotifyOutcome::NoOwner);
    // n3 is unaffected and still knows s1's owner.
    wait_until("n3 still linked to both", || {
        connected(&n3, "n1") && connected(&n3, "n2")
    })
    .await;
    assert!(owner_is(&n3, "s1", Some("n1")));
    // A session announced during the cut reaches n2 only by the resync.
    n1.h.announce_session("s2");

    // Restore: reconnect (backoff capped at 2 s) and resync.
    p12.open.send_replace(true);
    p21.open.send_replace(true);
    wait_event(
        &mut n2.ev,
        "n2: PeerUp n1",
        |e| matches!(e, ClusterEvent::PeerUp { node } if node == "n1"),
    )
    .await;
    wait_until("n2 sees n1's sessions again", || {
        owner_is(&n2, "s1", Some("n1")) && owner_is(&n2, "s2", Some("n1"))
    })
    .await;
    // Both redialed: one of two links that came up at once may be closing for the other (a
    // notification that finds no link then is answered Failed; one more Queued is harmless).
    wait_until("s2 notified to n1", || {
        n2.h.notify_queued("s2") == NotifyOutcome::Sent("n1".into())
    })
    .await;
    wait_event(&mut n1.ev, "Queued s2", queued("s2")).await;
    for n in [n1, n2, n3] {
        n.h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_peers_adds_and_removes_nodes_at_runtime() {
    let ids = ["n1", "n2", "n3"];
    let (mut nodes, addrs) = mesh(&ids).await;
    wait_until("mesh", || all_connected(&nodes)).await;

    let (l4, a4) = bind().await;
    let mut n4 = start(
        cfg("n4", peers(&[("n1", addrs[0]), ("n2", addrs[1]), ("n3", addrs[2])])),
        l4,
    )
    .await;
    for (i, n) in nodes.iter().enumerate() {
        let mut ps: Vec<(&str, SocketAddr)> = ids
            .iter()
            .zip(&addrs)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (id, a))| (*id, *a))
            .collect();
        ps.push(("n4", a4));
        n.h.update_peers(peers(&ps));
    }
    wait_until("n4 joined", || {
        ["n1", "n2", "n3"].iter().all(|p| connected(&n4, p)) && nodes.iter().all(|n| connected(n, "n4"))
    })
    .await;
    // Existing links were kept (no PeerDown among the original three).
    for n in nodes.iter_mut() {
        while let Ok(e) = n.ev.try_recv() {
            assert!(!matches!(e, ClusterEvent::PeerDown { .. }), "{e:?}");
        }
    }

    n4.h.announce_session("c4");
    wait_until("everyone sees c4 on n4", || {
        nodes.iter().all(|n| owner_is(n, "c4", Some("n4")))
    })
    .await;
    assert_eq!(nodes[0].h.notify_queued("c4"), NotifyOutcome::Sent("n4".into()));
    wait_event(&mut n4.ev, "Queued c4 on n4", queued("c4")).await;

    // Remove n4 from n1's config: link closed, its sessions forgotten, n1 keeps the others.
    let ps = peers(&[("n2", addrs[1]), ("n3", addrs[2])]);
    nodes[0].h.update_peers(ps);
    assert!(owner_is(&nodes[0], "c4", None));
    assert!(nodes[0].h.status().peers.iter().all(|p| p.id != "n4"));
    wait_until("n4 sees the link to n1 gone", || !connected(&n4, "n1")).await;
    wait_until("n1 still linked to n2 and n3", || {
        connected(&nodes[0], "n2") && connected(&nodes[0], "n3")
    })
    .await;
    // n1 now refuses n4 as an unknown node.
    wait_until("n1 refuses n4", || nodes[0].h.status().counters.auth_failures >= 1).await;
    assert!(!connected(&nodes[0], "n4"));
    for n in nodes.iter().chain([&n4]) {
        n.h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_peer_queues_fall_back_to_a_resync() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = cfg("n1", peers(&[("n2", a2)]));
    c1.peer_queue = 1; // nearly every directory frame overflows
    let n1 = start(c1, l1).await;
    let n2 = start(cfg("n2", peers(&[("n1", a1)])), l2).await;
    wait_until("linked", || connected(&n1, "n2") && connected(&n2, "n1")).await;

    let epochs: Vec<u64> = (0..500).map(|i| n1.h.announce_session(&format!("q{i:03}"))).collect();
    for (i, e) in epochs.iter().enumerate().take(250) {
        n1.h.withdraw_session(&format!("q{i:03}"), *e);
    }
    let want: Vec<String> = (250..500).map(|i| format!("q{i:03}")).collect();
    wait_until("n2 converges on exactly n1's live sessions", || {
        let got: Vec<String> =
            n2.h.status()
                .directory
                .into_iter()
                .filter(|e| e.node == "n1")
                .map(|e| e.conn)
                .collect();
        got == want
    })
    .await;
    assert!(n1.h.status().counters.queue_drops > 0);

    // The handle works from a thread with no tokio runtime (e.g. a config-reload thread).
    let (dead_l, dead) = bind().await;
    drop(dead_l);
    let h = n1.h.clone();
    std::thread::spawn(move || {
        h.update_peers(peers(&[("n2", a2), ("n3", dead)]));
        assert_eq!(h.notify_queued("q499"), NotifyOutcome::Local);
    })
    .join()
    .unwrap();
    wait_until("n3 dialed from the runtime", || {
        n1.h.status()
            .peers
            .iter()
            .any(|p| p.id == "n3" && p.handshake_attempted)
    })
    .await;
    wait_until("n1 still linked to n2", || connected(&n1, "n2")).await;
    n1.h.shutdown().await;
    n2.h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_node() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let n1 = start(cfg("n1", peers(&[("n2", a2)])), l1).await;
    let mut n2 = start(cfg("n2", peers(&[("n1", a1)])), l2).await;
    wait_until("linked", || connected(&n2, "n1")).await;
    let clone = n1.h.clone();
    drop(n1);
    // A clone keeps it alive. The link may be down for a moment even so: when both nodes
    // dialed at once, the one dialed by the higher id is closed once the other is up.
    assert!(TcpStream::connect(a1).await.is_ok());
    wait_until("n2 linked to n1 with one handle left", || connected(&n2, "n1")).await;
    drop(clone);
    wait_event(
        &mut n2.ev,
        "PeerDown after drop",
        |e| matches!(e, ClusterEvent::PeerDown { node, .. } if node == "n1"),
    )
    .await;
    wait_until("listener closed", || {
        std::net::TcpStream::connect_timeout(&a1, Duration::from_millis(100)).is_err()
    })
    .await;
    n2.h.shutdown().await;
}

/// `n` messages of `payload` bytes each for a recipient key of `key` bytes.
fn handed(n: usize, key: usize, payload: usize) -> Vec<HandedMsg> {
    (0..n)
        .map(|i| HandedMsg {
            id: i as i64 + 1,
            recipient_key: format!("did:peer:2.{}", "k".repeat(key)),
            payload: vec![7; payload],
            received_at_ms: 1,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_too_large_for_one_frame_is_refused_at_once() {
    const MAX_FRAME: usize = 64 * 1024;
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = cfg("n1", peers(&[("n2", a2)]));
    let mut c2 = cfg("n2", peers(&[("n1", a1)]));
    c1.max_frame = MAX_FRAME;
    c2.max_frame = MAX_FRAME;
    let n1 = start(c1, l1).await;
    let mut n2 = start(c2, l2).await;
    wait_until("linked", || connected(&n1, "n2") && connected(&n2, "n1")).await;
    n2.h.announce_session("c");
    wait_until("n1 sees n2 own c", || owner_is(&n1, "c", Some("n2"))).await;

    // A forward of 16 attachments of 3,000 bytes to a v2 recipient with an 8 KiB DID: the
    // payloads and the overhead fit in a frame, the DID repeated in every message does not.
    let msgs = handed(16, 8 * 1024, 3000);
    let payloads: usize = msgs.iter().map(|m| m.payload.len()).sum();
    let carried: usize = msgs.iter().map(|m| m.payload.len() + m.recipient_key.len()).sum();
    assert_eq!(n1.h.holder("c", payloads).as_deref(), Some("n2"), "payloads alone fit");
    assert_eq!(n1.h.holder("c", carried), None, "payloads and keys do not");
    // Handed anyway: refused now, so the caller releases them at once (it was counted sent,
    // dropped by the writer, and left leased to n2 until its lease ran out).
    assert!(!n1.h.hand_off("n2", "c", msgs), "a frame over max_frame is not queued");
    let c = n1.h.status().counters;
    assert_eq!((c.handoffs_sent, c.handoffs_failed), (0, 16));

    // What fits still goes.
    assert!(n1.h.hand_off("n2", "c", handed(2, 64, 3000)));
    wait_event(
        &mut n2.ev,
        "Delivered on n2",
        |e| matches!(e, ClusterEvent::Delivered { conn, msgs, .. } if conn == "c" && msgs.len() == 2),
    )
    .await;
    assert_eq!(n1.h.status().counters.handoffs_sent, 2);
    n1.h.shutdown().await;
    n2.h.shutdown().await;
}

/// Idle sockets per round of [`flooding_proxy`]: one more than the 8 pending handshakes a
/// source address may hold unnamed (`PER_SOURCE` in `admission.rs`).
const FLOOD_ROUND: usize = 9;

/// A proxy to `target` standing for a flood from the dialer's own address (127.0.0.1, as
/// every node on loopback, a NAT or a container gateway) that reconnects faster than a
/// handshake runs, at its worst and without a race: it passes the dialer's `Hello` on, reads
/// the target's, then opens [`FLOOD_ROUND`] idle sockets to `target` and waits until the
/// target evicted the first of them (so every older unnamed handshake from 127.0.0.1 too),
/// and only then lets the handshake go on. Abort it to close every socket it holds.
fn flooding_proxy(l: TcpListener, target: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut idle = Vec::new();
        while let Ok((mut from, _)) = l.accept().await {
            let Ok(mut to) = TcpStream::connect(target).await else {
                continue;
            };
            // The dialer's preamble and `Hello`: it sends nothing more before the answer.
            let mut hello = [0u8; 4096];
            let mut answer = [0u8; 4096];
            let Ok(n @ 1..) = from.read(&mut hello).await else {
                continue;
            };
            if to.write_all(&hello[..n]).await.is_err() {
                continue;
            }
            // The target's preamble and `Hello`: it reads the dialer's right after writing it.
            let Ok(m @ 1..) = to.read(&mut answer).await else {
                continue;
            };
            let round = idle.len();
            for _ in 0..FLOOD_ROUND {
                idle.push(TcpStream::connect(target).await.unwrap());
            }
            // At the latest after the wait; the test checks that the target evicted some.
            closed_by_server(&mut idle[round]).await;
            if from.write_all(&answer[..m]).await.is_ok() {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                });
            }
        }
    })
}

/// A peer sharing its address with a flood of idle sockets still links. Before, its
/// handshake became that address's oldest pending one within milliseconds and a flood
/// reconnecting faster than `PER_SOURCE` per handshake evicted it every time: once links
/// dropped, none came back. Now its `Hello`, naming a configured peer, keeps its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_links_through_a_flood_from_its_own_address() {
    let (l1, _) = bind().await;
    let (l2, a2) = bind().await;
    let (lp, ap) = bind().await;
    // n2 cannot dial n1 (nothing listens there): only n1's dials, through the flood, link.
    let dead = bind().await.1;
    let flood = flooding_proxy(lp, a2);
    let n1 = start(cfg("n1", peers(&[("n2", ap)])), l1).await;
    let n2 = start(cfg("n2", peers(&[("n1", dead)])), l2).await;
    wait_until("n1 <-> n2 through the flood", || {
        connected(&n1, "n2") && connected(&n2, "n1")
    })
    .await;
    assert!(n2.h.status().counters.handshakes_evicted >= 1, "the flood ran");
    flood.abort();
    n1.h.shutdown().await;
    n2.h.shutdown().await;
}

/// `Hello`s naming the dialer per round of [`hello_flooding_proxy`]: more than one address
/// may hold pending for one peer, named (`NAMED_PER_PEER` in `admission.rs`, 4) and unnamed
/// (`PER_SOURCE`, 8) together.
const HELLO_ROUND: usize = 16;

/// A proxy to `target` standing for a host sharing the dialer's address (127.0.0.1: every
/// node on loopback, a NAT, a container gateway) that sends `Hello`s naming the dialer, in
/// clear as the dialer does (node ids are no secret: every acceptor sends its own). At its
/// worst and without a race: it passes the handshake on until the target answered the
/// dialer's Noise message (so it read and named the dialer's `Hello`), and holds that answer
/// while it sends [`HELLO_ROUND`] `Hello`s naming `dialer`, keeping every other socket open
/// and closing the rest once sent, waiting until the target let each go (so it read its
/// `Hello`). Only then does the handshake go on. Counts its rounds in `rounds`.
fn hello_flooding_proxy(
    l: TcpListener,
    target: SocketAddr,
    dialer: &'static str,
    rounds: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let forged = Frame::Hello(Hello {
            cluster: "test".into(),
            node: dialer.into(),
            nonce: [7; 32],
        });
        let mut hello = proto::preamble().to_vec();
        hello.extend(codec::encode_record(&forged, 1 << 20).unwrap());
        let mut held = Vec::new();
        'accept: while let Ok((mut from, _)) = l.accept().await {
            let Ok(mut to) = TcpStream::connect(target).await else {
                continue;
            };
            let mut buf = [0u8; 4096];
            // Each side sends nothing more before the other's answer: the dialer's preamble
            // and `Hello`, the target's, the dialer's Noise message, the target's.
            for step in 0..3 {
                let (r, w) = if step % 2 == 0 {
                    (&mut from, &mut to)
                } else {
                    (&mut to, &mut from)
                };
                let Ok(n @ 1..) = r.read(&mut buf).await else {
                    continue 'accept;
                };
                if w.write_all(&buf[..n]).await.is_err() {
                    continue 'accept;
                }
            }
            let Ok(answer @ 1..) = to.read(&mut buf).await else {
                continue;
            };
            for i in 0..HELLO_ROUND {
                let mut s = TcpStream::connect(target).await.unwrap();
                s.write_all(&hello).await.unwrap();
                if i % 2 == 0 {
                    held.push(s);
                } else {
                    let _ = s.shutdown().await;
                    closed_by_server(&mut s).await;
                }
            }
            rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if from.write_all(&buf[..answer]).await.is_ok() {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
                });
            }
        }
    })
}

/// A host sharing a peer's address that sends `Hello`s naming that peer does not keep it
/// out. Before, each such `Hello` replaced the peer's pending handshake (a source held one
/// named slot per peer, the newest winning): a loop of them evicted the peer's handshake
/// within every round trip, the link never came up, and after the failure timeout each node
/// took the other over. A `Hello` proves nothing: now it never takes a named slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_naming_a_peer_from_its_address_do_not_keep_it_out() {
    let (l1, _) = bind().await;
    let (l2, a2) = bind().await;
    let (lp, ap) = bind().await;
    // n2 cannot dial n1 (nothing listens there): only n1's dials, through the flood, link.
    let dead = bind().await.1;
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = hello_flooding_proxy(lp, a2, "n1", rounds.clone());
    let n1 = start(cfg("n1", peers(&[("n2", ap)])), l1).await;
    let n2 = start(cfg("n2", peers(&[("n1", dead)])), l2).await;
    wait_until("n1 <-> n2 through the Hellos naming n1", || {
        connected(&n1, "n2") && connected(&n2, "n1")
    })
    .await;
    assert!(rounds.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the flood ran");
    flood.abort();
    n1.h.shutdown().await;
    n2.h.shutdown().await;
}

/// `Hello`s naming a peer held per address at once (`NAMED_PER_PEER` in `admission.rs`).
const STALLED: usize = 4;

/// Keeps `n` sockets to `target` that each sent a `Hello` naming `dialer` (in clear, as anyone
/// sharing the dialer's address can) and then stall, reopened as the target closes them (at
/// its handshake timeout; a second later when evicted before it). `held` counts those whose `Hello` the target answered. Abort it to
/// close them.
fn stalled_hellos(
    target: SocketAddr,
    dialer: &'static str,
    n: usize,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let forged = Frame::Hello(Hello {
        cluster: "test".into(),
        node: dialer.into(),
        nonce: [9; 32],
    });
    let mut hello = proto::preamble().to_vec();
    hello.extend(codec::encode_record(&forged, 1 << 20).unwrap());
    tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (hello, held) = (hello.clone(), held.clone());
            tasks.spawn(async move {
                loop {
                    let opened = Instant::now();
                    let mut s = TcpStream::connect(target).await.unwrap();
                    s.write_all(&hello).await.unwrap();
                    // The target's preamble and `Hello`: it reads ours right after.
                    let mut buf = [0u8; 1024];
                    if !matches!(s.read(&mut buf).await, Ok(1..)) {
                        continue;
                    }
                    held.fetch_add(1, SeqCst);
                    closed_by_server(&mut s).await;
                    held.fetch_sub(1, SeqCst);
                    // Closed at the handshake timeout: reopened at once. Closed well before
                    // it (evicted by a newer `Hello`, the peer's): reopened after a pause, as
                    // one back at once would take the peer's slot in turn within the round
                    // trip README names as what remains (a race on a loaded box, not what
                    // this tests).
                    if opened.elapsed() < FAILURE.min(mailroom::cluster::HANDSHAKE_TIMEOUT_MAX) / 2 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    })
}

/// `Hello`s naming a peer from its address that stall (held until the handshake timeout,
/// then reopened), sent before the peer dials, together with a flood of idle sockets from
/// the address, do not keep it out. Before, they held every named slot its address may hold
/// for it, so its `Hello` stayed unnamed, among the idle sockets, and the flood evicted it
/// before its Noise round trip ended: the link never came up. Now its `Hello` takes the
/// oldest of them (none proved the secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_hellos_naming_a_peer_before_it_dials_do_not_keep_it_out() {
    use std::sync::atomic::Ordering::SeqCst;
    let (l1, _) = bind().await;
    let (l2, a2) = bind().await;
    let (lp, ap) = bind().await;
    // n2 cannot dial n1 (nothing listens there): only n1's dials, through the flood, link.
    let dead = bind().await.1;
    let n2 = start(cfg("n2", peers(&[("n1", dead)])), l2).await;
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stalled = stalled_hellos(a2, "n1", STALLED, held.clone());
    wait_until("the stalled Hellos naming n1 are held", || held.load(SeqCst) == STALLED).await;
    let flood = flooding_proxy(lp, a2);
    let n1 = start(cfg("n1", peers(&[("n2", ap)])), l1).await;
    wait_until("n1 <-> n2 through the stalled Hellos and the flood", || {
        connected(&n1, "n2") && connected(&n2, "n1")
    })
    .await;
    assert!(n2.h.status().counters.handshakes_evicted >= 1, "the flood ran");
    flood.abort();
    stalled.abort();
    n1.h.shutdown().await;
    n2.h.shutdown().await;
}

/// n2 fails and n3 leaves its take-over to n1 (the lowest id up); n1 then fails too, before
/// it took n2 over (its events here are never acted on). Once n3 finds n1 down it is the
/// lowest id up, and takes over n2 as well as n1: the wallet whose session n2 held is woken,
/// rather than left to nobody. n2's leases are left to run out: n3 found n2 down alone, and n2
/// may live on for the others across a cut link (a release would deliver its mail twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_peer_is_taken_over_when_the_node_it_fell_to_fails_too() {
    let (mut nodes, _) = mesh(&["n1", "n2", "n3", "n4"]).await;
    wait_until("full mesh", || all_connected(&nodes)).await;
    nodes[1].h.announce_session("w");
    wait_until("everyone sees n2 owning w", || {
        [0, 2, 3].iter().all(|&i| owner_is(&nodes[i], "w", Some("n2")))
    })
    .await;

    nodes[1].h.shutdown().await;
    wait_event(
        &mut nodes[2].ev,
        "PeerDown n2 on n3, left to n1",
        |e| matches!(e, ClusterEvent::PeerDown { node, taken_over_here: false } if node == "n2"),
    )
    .await;
    assert!(owner_is(&nodes[2], "w", None), "n2's claims swept on n3");
    nodes[0].h.shutdown().await;

    wait_event(
        &mut nodes[2].ev,
        "PeerDown n1 on n3, taken over there",
        |e| matches!(e, ClusterEvent::PeerDown { node, taken_over_here: true } if node == "n1"),
    )
    .await;
    let ev = wait_event(
        &mut nodes[2].ev,
        "SessionsLost n2 on n3",
        |e| matches!(e, ClusterEvent::SessionsLost { node, .. } if node == "n2"),
    )
    .await;
    let ClusterEvent::SessionsLost {
        conns, release_leases, ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(conns, vec!["w".to_string()]);
    assert!(
        !release_leases,
        "found down by n3 alone, before the take-over fell to it"
    );
    wait_event(
        &mut nodes[3].ev,
        "PeerDown n1 on n4, left to n3",
        |e| matches!(e, ClusterEvent::PeerDown { node, taken_over_here: false } if node == "n1"),
    )
    .await;
    nodes[2].h.shutdown().await;
    nodes[3].h.shutdown().await;
}
