//! An authenticated peer is still not trusted blindly: a claim with an epoch no clock can
//! produce (`u64::MAX`) is ignored instead of pinning the session and overflowing the next
//! local epoch, and one peer cannot grow this node's directory past `max_peer_claims`.
//! Real TCP on 127.0.0.1:0; the test speaks as a configured peer ("ghost") with the secret,
//! over the encrypted link (`cluster::link`).

use std::time::Duration;

use mailroom::cluster::proto::Frame;
use mailroom::cluster::{handshake, link, ClusterConfig, ClusterEvent, ClusterHandle, PeerConfig};
use tokio::net::{TcpListener, TcpStream};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_epochs_and_claim_floods_are_refused() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // The ghost's configured address is closed: n1's own dials fail, ours is the only link.
    let ghost_addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let mut cfg = ClusterConfig::new(
        "n1",
        "test",
        "s3cret",
        vec![PeerConfig {
            id: "ghost".into(),
            addr: ghost_addr,
        }],
    );
    cfg.heartbeat_interval = Duration::from_millis(100);
    // The test answers no pings: keep the link up for the whole test on a loaded machine.
    cfg.failure_timeout = Duration::from_secs(60);
    cfg.max_peer_claims = 3;
    let max = cfg.max_frame;
    let (tx, mut ev) = tokio::sync::mpsc::channel(1024);
    let n1 = ClusterHandle::start(cfg, l, tx).await.unwrap();

    let s = TcpStream::connect(addr).await.unwrap();
    let local = handshake::Local {
        cluster: "test",
        node: "ghost",
        secret: b"s3cret",
        max_frame: max,
    };
    let link = link::open(s, &local, handshake::Role::Dialer, Some("n1"), |_| true).await;
    let mut link = link.unwrap();
    assert_eq!(link.peer, "n1");
    let rejected_before = n1.status().counters.frames_rejected;

    let now_epoch = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64)
        << 16;
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
