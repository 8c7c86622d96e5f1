//! An authenticated peer is still not trusted blindly: a claim with an epoch no clock can
//! produce (`u64::MAX`) is ignored instead of pinning the session and overflowing the next
//! local epoch, and one peer cannot grow this node's directory past `max_peer_claims`.
//! Nor can it stall the node: a large resync is applied a slice at a time, so the node's own
//! directory lookups never wait long for the cluster lock.
//! Real TCP on 127.0.0.1:0; the test speaks as a configured peer ("ghost") with the secret,
//! over the encrypted link (`cluster::link`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailroom::cluster::proto::{Claim, Frame};
use mailroom::cluster::{handshake, link, ClusterConfig, ClusterEvent, ClusterHandle, PeerConfig};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

async fn wait_queued(ev: &mut tokio::sync::mpsc::Receiver<ClusterEvent>, conn: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::MessageQueued { conn: c })) if c == conn => return,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("no Queued {conn} within {WAIT:?}"),
        }
    }
}

type GhostLink = link::Link<TcpStream>;

/// Starts node "n1" whose only peer is "ghost", and opens the ghost's link to it: the test
/// speaks as that peer. `tune` adjusts n1's config.
async fn ghost_and_node(
    tune: impl FnOnce(&mut ClusterConfig),
) -> (ClusterHandle, mpsc::Receiver<ClusterEvent>, GhostLink) {
    let (n1, ev, addr, max) = node_with_ghost(1024, tune).await;
    let link = ghost_link(addr, max).await.unwrap();
    (n1, ev, link)
}

/// Starts node "n1" whose only peer is "ghost" (configured at a closed address on
/// 127.0.0.1: n1's own dials fail, so the ghost's link is the only one), with room for
/// `events` events in its channel. Returns n1, its events, its cluster address and its
/// `max_frame`.
async fn node_with_ghost(
    events: usize,
    tune: impl FnOnce(&mut ClusterConfig),
) -> (ClusterHandle, mpsc::Receiver<ClusterEvent>, SocketAddr, usize) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ghost_addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut cfg = ghost_config(ghost_addr);
    tune(&mut cfg);
    let max = cfg.max_frame;
    let (tx, ev) = mpsc::channel(events);
    let n1 = ClusterHandle::start(cfg, l, tx).await.unwrap();
    (n1, ev, addr, max)
}

/// n1's config, whose only peer is "ghost" at `ghost`.
fn ghost_config(ghost: SocketAddr) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(
        "n1",
        "test",
        "s3cret",
        vec![PeerConfig {
            id: "ghost".into(),
            addr: ghost,
        }],
    );
    cfg.heartbeat_interval = Duration::from_millis(100);
    // The test answers no pings: keep the link up for the whole test on a loaded machine.
    cfg.failure_timeout = Duration::from_secs(60);
    cfg
}

/// The ghost's link to n1 at `addr`, from 127.0.0.1.
async fn ghost_link(addr: SocketAddr, max_frame: usize) -> Result<GhostLink, handshake::HandshakeError> {
    let s = TcpStream::connect(addr).await.unwrap();
    let local = handshake::Local {
        cluster: "test",
        node: "ghost",
        secret: b"s3cret",
        max_frame,
    };
    let link = link::open(s, &local, handshake::Role::Dialer, Some("n1"), |_| true).await?;
    assert_eq!(link.peer, "n1");
    Ok(link)
}

fn now_epoch() -> u64 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64)
        << 16
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_epochs_and_claim_floods_are_refused() {
    let (n1, mut ev, mut link) = ghost_and_node(|c| c.max_peer_claims = 3).await;
    let rejected_before = n1.status().counters.frames_rejected;

    let now_epoch = now_epoch();
    let own = |conn: &str, epoch: u64| Frame::Own {
        conn: conn.into(),
        epoch,
    };
    let frames = [
        own("pinned", u64::MAX),
        own("c0", now_epoch),
        own("c1", now_epoch),
        own("c2", now_epoch),
        own("c3", now_epoch),     // over max_peer_claims: ignored
        own("c0", now_epoch + 1), // a claim it holds may move on
        // Frames are handled in order: this one arriving means every one above was handled.
        Frame::Queued { conn: "marker".into() },
    ];
    for f in &frames {
        link.writer.write_frame(f).await.unwrap();
    }
    link.writer.flush().await.unwrap();
    wait_queued(&mut ev, "marker").await;

    assert_eq!(n1.owner_of("pinned"), None, "an epoch no clock can make is ignored");
    for c in ["c0", "c1", "c2"] {
        assert_eq!(n1.owner_of(c).as_deref(), Some("ghost"), "{c}");
    }
    assert_eq!(n1.owner_of("c3"), None, "the peer's claims are capped");
    assert_eq!(
        n1.status().counters.frames_rejected,
        rejected_before + 2,
        "both refusals are counted"
    );
    // The link stays up for well-formed frames, and a local session of the conn the peer
    // tried to pin is owned here (no overflow, no panic).
    n1.announce_session("pinned");
    assert_eq!(n1.owner_of("pinned").as_deref(), Some("n1"));
    link.writer.send(&Frame::Queued { conn: "after".into() }).await.unwrap();
    wait_queued(&mut ev, "after").await;
    n1.shutdown().await;
}

/// Claims in the resync of `resync_does_not_stall_directory_lookups`. Sized so that applying
/// them in one go (as before the slices) holds the cluster lock for well over a second in a
/// debug build: 1.5-2 s measured here, against 30-150 ms for the worst slice.
const BIG_RESYNC: usize = 300_000;
/// The slowest directory lookup while the resync is applied, as a share of the time the
/// whole resync took in the same run (not an absolute time: a loaded machine stretches both).
/// One hold for the whole apply (as before the slices) waits most of that time; a slice is a
/// few milliseconds of CPU in a debug build, against seconds for the whole.
const MAX_LOOKUP_SHARE: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_does_not_stall_directory_lookups() {
    let (n1, mut ev, mut link) = ghost_and_node(|_| {}).await;
    let epoch = now_epoch();
    // A first, smaller resync whose claims the big one drops: those go in bounded batches too.
    let old: Vec<(String, u64)> = (0..BIG_RESYNC / 2).map(|i| (format!("old-{i:08}"), epoch)).collect();
    for f in mailroom::cluster::resync_chunks(old, 1024 * 1024) {
        link.writer.write_frame(&f).await.unwrap();
    }
    link.writer.send(&Frame::Queued { conn: "first".into() }).await.unwrap();
    wait_queued(&mut ev, "first").await;
    assert_eq!(n1.owner_of("old-00000000").as_deref(), Some("ghost"));

    // A std thread asks the directory over and over, as an HTTP worker forwarding does.
    let stop = Arc::new(AtomicBool::new(false));
    let timer = {
        let (n1, stop) = (n1.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut worst, mut calls) = (Duration::ZERO, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = n1.owner_of("x");
                worst = worst.max(t.elapsed());
                calls += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (worst, calls)
        })
    };
    let claims: Vec<(String, u64)> = (0..BIG_RESYNC).map(|i| (format!("new-{i:08}"), epoch)).collect();
    let started = Instant::now();
    for f in mailroom::cluster::resync_chunks(claims, 1024 * 1024) {
        link.writer.write_frame(&f).await.unwrap();
    }
    // Frames are handled in order: the marker means the whole resync was taken in.
    link.writer
        .send(&Frame::Queued { conn: "marker".into() })
        .await
        .unwrap();
    wait_queued(&mut ev, "marker").await;
    // The old claims go in the background: wait until they are gone.
    let deadline = Instant::now() + WAIT;
    while n1.owner_of("old-00000000").is_some() || n1.owner_of(&format!("old-{:08}", BIG_RESYNC / 2 - 1)).is_some() {
        assert!(Instant::now() < deadline, "old claims not removed within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    assert_eq!(n1.owner_of("new-00000000").as_deref(), Some("ghost"));
    assert_eq!(
        n1.owner_of(&format!("new-{:08}", BIG_RESYNC - 1)).as_deref(),
        Some("ghost")
    );
    assert_eq!(n1.status().directory.len(), BIG_RESYNC);

    // The peer leaves: its claims go in slices too, and the node hears of every session it
    // held once they are all gone.
    let started = Instant::now();
    link.writer.send(&Frame::Leave).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let lost = loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::SessionsLost { node, conns, .. })) if node == "ghost" => break conns,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("no SessionsLost within {WAIT:?}"),
        }
    };
    let gone = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (worst, calls) = timer.join().unwrap();
    eprintln!(
        "resync of {BIG_RESYNC} claims applied in {took:?}, forgotten in {gone:?}; {calls} lookups, the slowest {worst:?}"
    );
    assert_eq!(lost.len(), BIG_RESYNC, "every session the peer held is reported");
    assert!(n1.status().directory.is_empty());
    assert!(
        worst * MAX_LOOKUP_SHARE <= took,
        "a directory lookup waited {worst:?} for the cluster lock, over 1/{MAX_LOOKUP_SHARE} of the {took:?} the resync took"
    );
    n1.shutdown().await;
}

/// The conns of `n`'s directory, each cut to 20 characters (for assertion messages).
fn conns(n: &ClusterHandle) -> Vec<String> {
    n.status()
        .directory
        .iter()
        .map(|e| e.conn.chars().take(20).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_with_oversized_connection_ids_are_refused() {
    let (n1, mut ev, mut link) = ghost_and_node(|_| {}).await;
    let rejected_before = n1.status().counters.frames_rejected;
    let epoch = now_epoch();
    // Connection ids are UUIDs: a 512 KiB one would be kept twice in the directory, and a
    // peer could send thousands.
    let huge = |i: usize| format!("{i}-{}", "x".repeat(512 * 1024));
    for i in 0..4 {
        link.writer
            .write_frame(&Frame::Own { conn: huge(i), epoch })
            .await
            .unwrap();
    }
    link.writer
        .write_frame(&Frame::Disown { conn: huge(0), epoch })
        .await
        .unwrap();
    link.writer.send(&Frame::Queued { conn: "owns".into() }).await.unwrap();
    wait_queued(&mut ev, "owns").await;
    assert!(conns(&n1).is_empty(), "claims kept: {:?}", conns(&n1));
    assert_eq!(
        n1.status().counters.frames_rejected,
        rejected_before + 5,
        "each frame with an oversized id is counted"
    );

    // In a resync, the long one goes and the others stay; the frame is counted once.
    let resync = Frame::Resync {
        claims: vec![
            Claim {
                conn: "fine".into(),
                epoch,
            },
            Claim { conn: huge(8), epoch },
            Claim {
                conn: "z".repeat(129),
                epoch,
            },
            // The longest accepted.
            Claim {
                conn: "k".repeat(128),
                epoch,
            },
            Claim {
                conn: "also-fine".into(),
                epoch,
            },
        ],
        last: true,
    };
    link.writer.write_frame(&resync).await.unwrap();
    link.writer
        .send(&Frame::Queued { conn: "resync".into() })
        .await
        .unwrap();
    wait_queued(&mut ev, "resync").await;
    assert_eq!(
        conns(&n1),
        ["also-fine", "fine", &"k".repeat(20)],
        "only the ids of at most 128 bytes are kept"
    );
    assert_eq!(n1.status().counters.frames_rejected, rejected_before + 6);
    n1.shutdown().await;
}

/// An idle socket from `source` (any 127.0.0.0/8 address) to `addr`: it sends nothing.
async fn idle_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((Ipv4Addr::from(source), 0))).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Anyone who reaches the cluster port can open sockets and send nothing. Each used to hold
/// one of the 64 pending-handshake slots for the whole handshake timeout (60 s here), and a
/// real peer arriving while they were full was dropped: 64 idle sockets, reopened as they
/// timed out, kept every link down. Now a source holds at most 8 slots and a newcomer takes
/// the oldest slot of the busiest source: neither idle sockets from 40 other addresses nor
/// more from the peer's own address (the same host) keep it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_do_not_keep_a_peer_out() {
    let (n1, _ev, addr, max) = node_with_ghost(1024, |_| {}).await;
    let mut flood = Vec::new();
    for k in 2..42u8 {
        for _ in 0..4 {
            flood.push(idle_from([127, 0, 0, k], addr).await);
        }
    }
    for _ in 0..16 {
        flood.push(idle_from([127, 0, 0, 1], addr).await);
    }
    // The node accepts in order, so by the time it answers the ghost every idle socket above
    // has been admitted (and most evicted).
    let link = tokio::time::timeout(WAIT, ghost_link(addr, max))
        .await
        .expect("the peer's handshake finishes")
        .expect("the peer is let in");
    drop(link);
    // 176 idle sockets and the peer's for 64 slots: at least 113 were evicted (all idle
    // ones: the peer's finished its handshake), and their sockets closed.
    let evictions = flood.len() + 1 - 64;
    assert!(
        n1.status().counters.handshakes_evicted >= evictions as u64,
        "evicted {} of {}",
        n1.status().counters.handshakes_evicted,
        evictions
    );
    let deadline = Instant::now() + WAIT;
    let mut closed = vec![false; flood.len()];
    while closed.iter().filter(|c| **c).count() < evictions {
        assert!(Instant::now() < deadline, "evicted sockets stay open");
        for (s, c) in flood.iter().zip(closed.iter_mut()).filter(|(_, c)| !**c) {
            let mut buf = [0u8; 64];
            *c = match s.try_read(&mut buf) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n1.shutdown().await;
}

/// A peer that restarts before it is found failed (killed, back within the failure timeout)
/// never goes Down here: its resync simply no longer names the sessions it lost. Mail
/// forwarded to those wallets meanwhile was notified to the peer and woke nobody, so this
/// node, the one that takes over, is told which sessions were lost (and pushes the wallets
/// that have mail), as for a failed peer. Before, only a peer found failed was taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_a_resync_no_longer_names_are_taken_over() {
    let (n1, mut ev, mut link) = ghost_and_node(|_| {}).await;
    let epoch = now_epoch();
    let claim = |conn: &str| Claim {
        conn: conn.into(),
        epoch,
    };
    let resync = |claims| Frame::Resync { claims, last: true };
    link.writer
        .send(&resync(vec![claim("kept"), claim("lost")]))
        .await
        .unwrap();
    link.writer.send(&Frame::Queued { conn: "first".into() }).await.unwrap();
    wait_queued(&mut ev, "first").await;
    assert_eq!(n1.owner_of("lost").as_deref(), Some("ghost"));
    // The ghost "restarted": its next resync holds only what its new incarnation has.
    link.writer.send(&resync(vec![claim("kept")])).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::SessionsLost {
                node,
                conns,
                release_leases,
            })) => {
                assert_eq!(node, "ghost");
                assert_eq!(conns, ["lost"], "only the sessions it no longer names");
                assert!(!release_leases, "the peer is up: its leases are its own");
                break;
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("no SessionsLost within {WAIT:?}"),
        }
    }
    assert_eq!(n1.owner_of("lost"), None);
    assert_eq!(n1.owner_of("kept").as_deref(), Some("ghost"));
    // A resync that drops nothing tells nothing.
    link.writer.send(&resync(vec![claim("kept")])).await.unwrap();
    link.writer.send(&Frame::Queued { conn: "last".into() }).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ev.recv()).await {
            Ok(Some(ClusterEvent::MessageQueued { conn })) if conn == "last" => break,
            Ok(Some(ClusterEvent::SessionsLost { conns, .. })) => panic!("told of {conns:?}"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("no Queued within {WAIT:?}"),
        }
    }
    n1.shutdown().await;
}

/// A takeover is decided when a peer fails, by the nodes up then. n1 would have taken over from
/// n9 at its resync (n0 not up yet), which dropped nothing: nothing to tell; then n0, lower, came
/// up: when n9 fails, n0 takes over, and n1 must not also tell of n9's lost sessions (it did:
/// the resync's takeover left an entry behind that n9's failure then filled, and two nodes
/// pushed the same wallets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_noted_at_a_resync_is_not_reused_when_the_peer_later_fails() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = || async { TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap() };
    let peers = vec![
        PeerConfig {
            id: "n0".into(),
            addr: closed().await,
        },
        PeerConfig {
            id: "n9".into(),
            addr: closed().await,
        },
    ];
    let mut cfg = ClusterConfig::new("n1", "test", "s3cret", peers);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.failure_timeout = Duration::from_secs(60);
    let max = cfg.max_frame;
    let (tx, mut ev) = mpsc::channel(1024);
    let n1 = ClusterHandle::start(cfg, l, tx).await.unwrap();
    let link_as = |node: &'static str| async move {
        let s = TcpStream::connect(addr).await.unwrap();
        let local = handshake::Local {
            cluster: "test",
            node,
            secret: b"s3cret",
            max_frame: max,
        };
        link::open(s, &local, handshake::Role::Dialer, Some("n1"), |_| true)
            .await
            .unwrap()
    };
    // n9 alone: its resync names no session and drops nothing; then a session opens there.
    let mut n9 = link_as("n9").await;
    n9.writer
        .send(&Frame::Resync {
            claims: vec![],
            last: true,
        })
        .await
        .unwrap();
    let own = Frame::Own {
        conn: "c1".into(),
        epoch: now_epoch(),
    };
    n9.writer.send(&own).await.unwrap();
    n9.writer
        .send(&Frame::Queued {
            conn: "after-resync".into(),
        })
        .await
        .unwrap();
    wait_queued(&mut ev, "after-resync").await;
    assert_eq!(n1.owner_of("c1").as_deref(), Some("n9"));
    // n0 comes up.
    let mut n0 = link_as("n0").await;
    n0.writer
        .send(&Frame::Resync {
            claims: vec![],
            last: true,
        })
        .await
        .unwrap();
    n0.writer.send(&Frame::Queued { conn: "n0-up".into() }).await.unwrap();
    wait_queued(&mut ev, "n0-up").await;
    // n9 fails (leaves): n0, lower, takes over; n1 sweeps n9's claims and tells nothing.
    n9.writer.send(&Frame::Leave).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::PeerDown { node, .. })) if node == "n9" => break,
            Ok(Some(ClusterEvent::SessionsLost { node, conns, .. })) => {
                panic!("n1 took over from {node} ({conns:?}) though n0 is up")
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("n9 not down within {WAIT:?}"),
        }
    }
    n0.writer
        .send(&Frame::Queued {
            conn: "after-down".into(),
        })
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, ev.recv()).await {
            Ok(Some(ClusterEvent::MessageQueued { conn })) if conn == "after-down" => break,
            Ok(Some(ClusterEvent::SessionsLost { node, conns, .. })) => {
                panic!("n1 took over from {node} ({conns:?}) though n0 is up")
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("no Queued within {WAIT:?}"),
        }
    }
    assert_eq!(n1.owner_of("c1"), None, "n9's claim swept");
    n1.shutdown().await;
}

/// Every frame that names a connection refuses an id over 128 bytes, as claims do (ids are
/// UUIDs: a long one would travel on into events, logs and per-connection queues); and a pong
/// to a ping never sent (one from this node's future) confirms nothing. Each is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_naming_an_oversized_connection_id_and_future_pongs_are_refused() {
    let (n1, mut ev, mut link) = ghost_and_node(|_| {}).await;
    let rejected_before = n1.status().counters.frames_rejected;
    let huge = "x".repeat(129);
    for f in [
        Frame::Queued { conn: huge.clone() },
        Frame::Deliver {
            conn: huge.clone(),
            msgs: vec![],
        },
        Frame::CloseSessions {
            conn: huge.clone(),
            reason: "r".into(),
        },
        Frame::RoutesChanged {
            conn: huge.clone(),
            keys: vec![],
        },
        Frame::Pong { t: u64::MAX },
    ] {
        link.writer.write_frame(&f).await.unwrap();
    }
    link.writer
        .send(&Frame::Queued { conn: "marker".into() })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let e = tokio::time::timeout_at(deadline, ev.recv())
            .await
            .expect("the marker")
            .expect("events");
        let named = match &e {
            ClusterEvent::MessageQueued { conn } if conn == "marker" => break,
            ClusterEvent::MessageQueued { conn }
            | ClusterEvent::Delivered { conn, .. }
            | ClusterEvent::CloseSessions { conn, .. }
            | ClusterEvent::RoutesChanged { conn, .. } => conn.clone(),
            _ => continue,
        };
        assert_ne!(named, huge, "an oversized id went on as an event");
    }
    assert_eq!(n1.status().counters.frames_rejected, rejected_before + 5);
    n1.shutdown().await;
}

/// One `Deliver` frame of `PAYLOAD` bytes from the ghost: message `id` for `conn`.
fn deliver(conn: &str, id: i64, payload: usize) -> Frame {
    let msgs = vec![mailroom::cluster::proto::HandedMsg {
        id,
        recipient_key: "key".into(),
        payload: vec![7; payload],
        received_at_ms: 1,
    }];
    Frame::Deliver {
        conn: conn.into(),
        msgs,
    }
}

/// A peer's hand-offs wait on this node until their sessions take them (a session writing to a
/// slow socket takes them late): together they may hold no more than the peer's budget (8
/// frames), and one connection no more than its share (2 frames): a frame past it is handed
/// back to the store at once (`HandOffReturned` to this node, which releases and wakes), so
/// one slow wallet does not stop the link for the others. Past the budget the link reads
/// nothing more until the node hands some on. Nothing is lost: every message arrives, or
/// comes back, and each connection's arrive in order. Here the node's hand-offs are the
/// events the test holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_hand_offs_waiting_on_the_node_stay_within_its_budget_and_a_slow_wallets_share() {
    const FRAME: usize = 16 * 1024;
    const BUDGET: usize = 8 * FRAME;
    const SHARE: usize = 2 * FRAME;
    const PAYLOAD: usize = 12 * 1024;
    // What the node counts a frame as: payload, key, connection id ("slow", the longest here)
    // and its per-message allowance.
    const NEED: usize = PAYLOAD + 3 + 4 + 128;
    const FRAMES: i64 = 60;
    let (n1, mut ev, link) = ghost_and_node(|c| c.max_frame = FRAME).await;
    // Every other message is for one wallet ("slow"), the rest spread over five.
    let conn_of = |id: i64| {
        if id % 2 == 1 {
            "slow".to_string()
        } else {
            format!("c{}", id % 5)
        }
    };
    let mut writer = link.writer;
    let ghost = tokio::spawn(async move {
        for id in 1..=FRAMES {
            writer.send(&deliver(&conn_of(id), id, PAYLOAD)).await.unwrap();
        }
        writer
    });
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    let mut held: Vec<(String, usize, mailroom::cluster::Held)> = Vec::new();
    let mut delivered = std::collections::BTreeMap::<String, Vec<i64>>::new();
    let mut returned = Vec::new();
    let mut waited = false;
    // What was held when the test last handed everything on, until it next does: a frame the
    // node judged (and returned) just before that moment reports after it, and may report
    // after a delivery the node judged once the room came. The test drops what it held one by
    // one: the node may judge against some of it and some held since, so the two together
    // bound what it saw.
    let mut before_clear: Vec<(String, usize)> = Vec::new();
    while (delivered.values().map(Vec::len).sum::<usize>() + returned.len()) < FRAMES as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{delivered:?} delivered, {returned:?} returned"
        );
        match tokio::time::timeout(Duration::from_millis(300), ev.recv()).await {
            Ok(Some(ClusterEvent::Delivered { conn, msgs, held: room })) => {
                let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
                delivered
                    .entry(conn.clone())
                    .or_default()
                    .extend(msgs.iter().map(|m| m.id));
                held.push((conn.clone(), bytes, room));
                let all: usize = held.iter().map(|(_, b, _)| b).sum();
                let of_conn: usize = held.iter().filter(|(c, _, _)| *c == conn).map(|(_, b, _)| b).sum();
                assert!(
                    all <= BUDGET,
                    "{all} bytes of hand-offs waiting on the node, over the {BUDGET}-byte budget"
                );
                assert!(
                    of_conn <= SHARE,
                    "{of_conn} bytes waiting for {conn}, over its {SHARE}-byte share"
                );
            }
            Ok(Some(ClusterEvent::HandOffReturned { node, conn, ids })) => {
                assert_eq!(
                    (node.as_str(), conn.as_str()),
                    ("n1", "slow"),
                    "only the slow wallet's hand-offs come back"
                );
                let of_conn: usize = held.iter().filter(|(c, _, _)| *c == conn).map(|(_, b, _)| b).sum();
                let of_conn_before: usize = before_clear.iter().filter(|(c, _)| *c == conn).map(|(_, b)| b).sum();
                assert!(
                    of_conn + of_conn_before + PAYLOAD > SHARE,
                    "handed back with room in its share"
                );
                returned.extend(ids);
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("events ended"),
            Err(_) => {
                let room: usize = held.iter().map(|(_, _, r)| r.bytes()).sum();
                if room + NEED <= BUDGET {
                    continue; // room left: the next frame is on its way
                }
                // The budget is spent and the link waits: hand everything on.
                waited = true;
                before_clear = held.iter().map(|(c, b, _)| (c.clone(), *b)).collect();
                held.clear();
            }
        }
    }
    assert!(waited, "the link never waited for room");
    assert!(!returned.is_empty(), "the slow wallet never went past its share");
    assert!(returned.iter().all(|id| id % 2 == 1));
    for (conn, ids) in &delivered {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{conn}'s hand-offs out of order: {ids:?}"
        );
    }
    assert!(n1.status().counters.link_waits > 0 && n1.status().counters.handoffs_refused == returned.len() as u64);
    tokio::time::timeout(WAIT, ghost)
        .await
        .expect("the ghost wrote everything")
        .unwrap();
    n1.shutdown().await;
}

/// A link kept waiting on this node (its sessions or its event queue stuck) is not counted as
/// the peer's silence: the peer is not found down for it. Past twice the failure timeout the
/// node closes the link (the peer gives back what it handed off, and links again), so a peer
/// that died meanwhile is not hidden for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_kept_waiting_by_the_node_is_closed_and_its_peer_not_found_down() {
    const FRAME: usize = 16 * 1024;
    // Well over any stall of a loaded 2-core machine: the node marks the link heard every
    // heartbeat while it waits, and after the close the peer is up until the failure timeout
    // runs out, so a stall of the process as long as this would find the peer down falsely.
    let failure = Duration::from_secs(5);
    let (n1, mut ev, link) = ghost_and_node(|c| {
        c.max_frame = FRAME;
        c.failure_timeout = failure;
    })
    .await;
    let (mut reader, mut writer) = (link.reader, link.writer);
    // Twelve frames for twelve wallets: past the budget of eight frames (ten of these), held
    // by the test for good.
    let ghost = tokio::spawn(async move {
        for id in 1..=12 {
            if writer.send(&deliver(&format!("c{id}"), id, 12 * 1024)).await.is_err() {
                break;
            }
        }
        writer
    });
    let started = Instant::now();
    let reader_done = tokio::spawn(async move { while let Ok(Some(_)) = reader.read_frame().await {} });
    let mut held = Vec::new();
    let give_up = tokio::time::Instant::now() + failure * 2 + WAIT;
    let closed = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(give_up) => panic!("the link was never closed"),
            e = ev.recv() => match e.expect("events") {
                ClusterEvent::PeerDown { .. } => panic!("the peer was found down while the node kept its link waiting"),
                other => held.push(other),
            },
            _ = async {
                while !reader_done.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } => break started.elapsed(),
        }
    };
    assert!(
        closed >= failure * 2 - Duration::from_millis(200),
        "closed after {closed:?}"
    );
    let st = n1.status();
    assert!(st.peers.iter().any(|p| p.id == "ghost" && p.up), "{:?}", st.peers);
    assert!(st.counters.link_waits > 0);
    drop((held, ghost));
    n1.shutdown().await;
}

/// A peer's events wait for room in the node's event channel with the link reading nothing
/// meanwhile: the node holds no more of them than the channel (it spawned a task per event
/// that found the channel full, each holding what the peer sent), and they reach the node in
/// the order they were sent, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_events_wait_for_room_in_the_nodes_channel() {
    const CAP: usize = 4;
    const FRAMES: usize = 300;
    let (n1, mut ev, addr, max) = node_with_ghost(CAP, |_| {}).await;
    let mut link = ghost_link(addr, max).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ev.recv())
            .await
            .expect("the ghost up")
            .expect("events")
        {
            ClusterEvent::PeerUp { .. } => break,
            _ => continue,
        }
    }
    for i in 0..FRAMES {
        let f = Frame::RoutesChanged {
            conn: format!("c{i}"),
            keys: vec!["k".repeat(100)],
        };
        link.writer.write_frame(&f).await.unwrap();
    }
    link.writer.flush().await.unwrap();
    // Read as far as the channel lets the link go (a full channel, one frame waiting)...
    let read = || n1.status().counters.routes_changed_received as usize;
    let deadline = Instant::now() + WAIT;
    while read() < CAP + 1 {
        assert!(Instant::now() < deadline, "only {} frames read", read());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and no further, however long the node leaves its events unread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(read() <= CAP + 1, "{} frames read with room for {CAP} events", read());
    assert!(n1.status().counters.link_waits > 0);
    let mut i = 0;
    while i < FRAMES {
        if let ClusterEvent::RoutesChanged { conn, .. } = tokio::time::timeout(WAIT, ev.recv())
            .await
            .expect("every event")
            .expect("events")
        {
            assert_eq!(conn, format!("c{i}"), "events out of order or lost");
            i += 1;
        }
    }
    n1.shutdown().await;
}

/// A handshake that started with the old secret and ends after a rotation
/// (`ClusterHandle::set_secret`) installs no link: its holder (a node removed for good, say)
/// cannot slip in by keeping a handshake open across the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_begun_before_a_rotation_installs_no_link() {
    let (n1, _ev, addr, max) = node_with_ghost(1024, |_| {}).await;
    let s = TcpStream::connect(addr).await.unwrap();
    // n1 has taken the socket and begun its side (with the secret of now) once it writes.
    s.peek(&mut [0u8; 1]).await.unwrap();
    assert!(n1.set_secret("a-rotated-secret"));
    assert!(
        !n1.set_secret("a-rotated-secret"),
        "the same secret again changes nothing"
    );
    let local = handshake::Local {
        cluster: "test",
        node: "ghost",
        secret: b"s3cret",
        max_frame: max,
    };
    let mut link = link::open(s, &local, handshake::Role::Dialer, Some("n1"), |_| true)
        .await
        .expect("the handshake n1 began with the old secret completes");
    match tokio::time::timeout(WAIT, link.reader.read_frame())
        .await
        .expect("n1 answers")
    {
        Ok(Some(Frame::Refused { reason })) => assert!(reason.contains("secret changed"), "{reason}"),
        other => panic!("the link was not refused: {other:?}"),
    }
    assert!(
        !n1.status().peers.iter().any(|p| p.connected),
        "{:?}",
        n1.status().peers
    );
    // A new handshake with the old secret fails.
    assert!(ghost_link(addr, max).await.is_err());
    n1.shutdown().await;
}

/// Starts n1 with the ghost as its one peer, listening at `ghost` (n1 dials it).
async fn node_dialing_ghost(ghost: SocketAddr) -> (ClusterHandle, mpsc::Receiver<ClusterEvent>, usize) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cfg = ghost_config(ghost);
    let max = cfg.max_frame;
    let (tx, ev) = mpsc::channel(1024);
    (ClusterHandle::start(cfg, l, tx).await.unwrap(), ev, max)
}

/// Polls `leave` once: n1 has begun to leave (the timer is polled after the future), and
/// returns the rest of it.
async fn begin_leave(n1: &ClusterHandle) -> std::pin::Pin<Box<impl std::future::Future<Output = ()> + '_>> {
    let mut leaving = Box::pin(n1.leave());
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut leaving).await.is_err(),
        "leave is not over at its first poll"
    );
    leaving
}

fn ghost_local(max: usize) -> handshake::Local<'static> {
    handshake::Local {
        cluster: "test",
        node: "ghost",
        secret: b"s3cret",
        max_frame: max,
    }
}

/// A link still in its handshake when the node leaves carries the `Leave` once it is up. When
/// both nodes dial at once, the peer may keep that link and ignore the `Leave` sent on the
/// other one. `leave` used to see no link open and stop at once, cutting off its own dial:
/// the peer then found the node down only at its failure timeout
/// (`cluster_tcp::leave_drops_entries_at_once` failed so under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_the_node_dialled_before_it_left_carries_the_leave() {
    let ghost = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (n1, _ev, max) = node_dialing_ghost(ghost.local_addr().unwrap()).await;
    let (s, _) = ghost.accept().await.unwrap();
    // n1 is in its handshake once it has written its `Hello`.
    s.peek(&mut [0u8; 1]).await.unwrap();
    let leaving = begin_leave(&n1).await;
    let local = ghost_local(max);
    let ghost = async {
        let mut link = link::open(s, &local, handshake::Role::Acceptor, None, |n| n == "n1")
            .await
            .expect("the handshake under way when n1 began to leave completes");
        tokio::time::timeout(WAIT, link.reader.read_frame())
            .await
            .expect("n1 sends a frame or closes")
    };
    let ((), frame) = tokio::join!(leaving, ghost);
    let f = frame.expect("a frame").expect("n1 closed the link without a frame");
    assert_eq!(f, Frame::Leave);
}

/// A peer whose `Hello` reaches the node after it began to leave is refused: it can install no
/// link the node would then leave without a word. Before, the handshake completed and the
/// node dropped the link silently; the peer found it down only at its failure timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_saying_hello_after_the_node_began_to_leave_is_refused() {
    let (n1, _ev, addr, max) = node_with_ghost(1024, |_| {}).await;
    let s = TcpStream::connect(addr).await.unwrap();
    s.peek(&mut [0u8; 1]).await.unwrap();
    let leaving = begin_leave(&n1).await;
    let local = ghost_local(max);
    let ghost = link::open(s, &local, handshake::Role::Dialer, Some("n1"), |n| n == "n1");
    let ((), opened) = tokio::join!(leaving, ghost);
    assert!(opened.is_err(), "a link was opened with a node that left");
}

/// A peer that makes ownership changes as fast as it writes frames (an `Own` and a `Disown` of
/// a session held here, again and again) while the node takes no events: past a bound the
/// changes are dropped and counted, as wake-ups are. Before, each one the full channel could
/// not take waited in a task of its own, so a peer could grow the node's tasks and memory
/// without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_changes_a_peer_floods_wait_in_bounded_numbers() {
    // Room for one event, never read.
    let (n1, _ev, addr, max) = node_with_ghost(1, |_| {}).await;
    let mut link = ghost_link(addr, max).await.unwrap();
    n1.announce_session("c");
    let base = now_epoch() + (1 << 20);
    const PAIRS: u64 = 10_000;
    for i in 0..PAIRS {
        let epoch = base + 2 * i;
        link.writer
            .write_frame(&Frame::Own {
                conn: "c".into(),
                epoch,
            })
            .await
            .unwrap();
        link.writer
            .write_frame(&Frame::Disown {
                conn: "c".into(),
                epoch,
            })
            .await
            .unwrap();
    }
    let last = Frame::Own {
        conn: "marker".into(),
        epoch: base + 2 * PAIRS,
    };
    link.writer.write_frame(&last).await.unwrap();
    link.writer.flush().await.unwrap();
    // Frames are handled in order: the marker's claim means every pair was.
    let deadline = Instant::now() + WAIT;
    while n1.owner_of("marker").is_none() {
        assert!(Instant::now() < deadline, "the peer's frames handled within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = n1.status().counters.events_dropped;
    assert!(
        dropped >= PAIRS - 4_096 - 2,
        "past the bound the changes are dropped, not each held in a task: {dropped} dropped"
    );
}

/// A hand-off of one message `id` of `payload` bytes (what the node's forwards make of one).
fn handed(id: i64, payload: usize) -> Vec<mailroom::cluster::proto::HandedMsg> {
    vec![mailroom::cluster::proto::HandedMsg {
        id,
        recipient_key: "key".into(),
        payload: vec![7; payload],
        received_at_ms: 1,
    }]
}

/// Frame size and message size of the send-budget tests: one ~60 KB message per frame.
const SEND_FRAME: usize = 64 * 1024;
const SEND_PAYLOAD: usize = 60_000;

/// n1 with the ghost holding a session of "c" and then reading nothing from its link (its own
/// wallets' sockets stalled, say): everything n1 sends it stays in n1's queue and socket.
async fn ghost_holding_c_reading_nothing() -> (ClusterHandle, mpsc::Receiver<ClusterEvent>, GhostLink) {
    let (n1, ev, mut link) = ghost_and_node(|c| {
        c.max_frame = SEND_FRAME;
        c.peer_queue = 4096;
    })
    .await;
    link.writer
        .send(&Frame::Own {
            conn: "c".into(),
            epoch: now_epoch(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while n1.owner_of("c").as_deref() != Some("ghost") {
        assert!(Instant::now() < deadline, "the ghost's claim taken within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (n1, ev, link)
}

/// This node's queue to a peer is bounded in bytes, not only in frames: a peer that reads
/// nothing had it hold `peer_queue` (4096) hand-offs of up to `max_frame` each (4 GiB at the
/// defaults). Now the hand-offs waiting for it hold a send budget of a few frames
/// (`SEND_BUDGET_FRAMES` of `max_frame`, given back as each is written), and past it
/// `hand_off` refuses, counted in `handoffs_failed`: the caller releases the messages to the
/// store, as for a full queue (`cluster::forwards_for_a_peer_that_reads_nothing_go_back_to_the_store`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_reads_nothing_holds_a_bounded_number_of_bytes_of_hand_offs() {
    const HAND_OFFS: i64 = 1024;
    /// The budget (8 frames) and the frame being written, as the loop runs faster than the
    /// writer: the first refusal comes within a few dozen.
    const FIRST_REFUSAL_BY: i64 = 48;
    /// What may be queued in all: the budget, given back as the writer moves frames into the
    /// socket, whose buffers take in up to ~4 MB on Linux (`tcp_wmem`'s ceiling) before the
    /// write blocks: some 80 frames of ~60 KB.
    const AT_MOST: usize = 160;
    let (n1, _ev, link) = ghost_holding_c_reading_nothing().await;
    let failed_before = n1.status().counters.handoffs_failed;
    let mut queued = Vec::new();
    let mut first_refused = None;
    for id in 1..=HAND_OFFS {
        if n1.hand_off("ghost", "c", handed(id, SEND_PAYLOAD)) {
            queued.push(id);
        } else {
            first_refused.get_or_insert(id);
        }
    }
    let first = first_refused.expect("a refusal: all 1024 hand-offs queued for a peer that reads nothing");
    eprintln!(
        "first hand-off refused: #{first}; {} of {HAND_OFFS} queued",
        queued.len()
    );
    assert!(first <= FIRST_REFUSAL_BY, "the first refusal came at hand-off #{first}");
    assert!(queued.len() <= AT_MOST, "{} hand-offs queued", queued.len());
    assert_eq!(
        n1.status().counters.handoffs_failed - failed_before,
        HAND_OFFS as u64 - queued.len() as u64,
        "every refusal counted"
    );
    drop(link);
    n1.shutdown().await;
}

/// A peer removed from the config by a reload took the hand-offs still queued for it along with
/// its slot: the end of its link gave back only those written to the socket, and the queued
/// ones stayed leased to its hand-off owner until the lease ran out. Every one comes back now
/// (`HandOffReturned`), written or still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_offs_queued_for_a_peer_removed_by_a_reload_come_back() {
    let (n1, mut ev, link) = ghost_holding_c_reading_nothing().await;
    let queued: std::collections::BTreeSet<i64> = (1..=200)
        .filter(|&id| n1.hand_off("ghost", "c", handed(id, SEND_PAYLOAD)))
        .collect();
    assert!(!queued.is_empty());
    n1.update_peers(vec![]);
    let mut back = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while back != queued {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::HandOffReturned { node, conn, ids })) => {
                assert_eq!((node.as_str(), conn.as_str()), ("ghost", "c"));
                back.extend(ids);
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                let lost: Vec<_> = queued.difference(&back).collect();
                panic!("hand-offs never given back: {lost:?}");
            }
        }
    }
    drop(link);
    n1.shutdown().await;
}
