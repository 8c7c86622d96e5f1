//! Cluster link security, over real TCP on 127.0.0.1:0.
//!
//! An on-path proxy sits between n1 (which dials) and n2 (whose own dials go nowhere, so the
//! proxied link is the only one). It parses the records n1 sends (preamble, then `u32`
//! length-prefixed records) and, when armed, attacks the next one: flips a bit, injects a
//! record recorded from an earlier link, replays, reorders, truncates (with a consistent
//! length, or by cutting the connection mid-record). Each attack must close the link, change
//! nothing in n2's directory (checked while the proxy keeps the link down, before a resync
//! could repair anything), and the link must come back by itself once the proxy lets it.
//!
//! Heartbeats are slow here (one ping each way at link start, then nothing for a minute), so
//! after the start of a link the only records n1 sends are those the test provokes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mailroom::cluster::proto::{self, Frame, Hello};
use mailroom::cluster::{
    codec, handshake, link, ClusterConfig, ClusterEvent, ClusterHandle, Entry, NotifyOutcome, PeerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "correct-horse-battery-staple-7f3a9c";
const CLUSTER: &str = "linktest";

// ---- log capture ------------------------------------------------------------------------

/// Everything every test in this binary logs, at TRACE.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(w.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

// ---- helpers ----------------------------------------------------------------------------

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn peer(id: &str, addr: SocketAddr) -> Vec<PeerConfig> {
    vec![PeerConfig { id: id.into(), addr }]
}

fn quiet_cfg(id: &str, peers: Vec<PeerConfig>) -> ClusterConfig {
    let mut c = ClusterConfig::new(id, CLUSTER, SECRET, peers);
    c.heartbeat_interval = Duration::from_secs(60);
    c.failure_timeout = Duration::from_secs(300);
    c
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn connected(h: &ClusterHandle, peer: &str) -> bool {
    h.status().peers.iter().any(|p| p.id == peer && p.connected)
}

fn owner(h: &ClusterHandle, conn: &str) -> Option<String> {
    h.owner_of(conn)
}

fn directory(h: &ClusterHandle) -> Vec<Entry> {
    let mut d = h.status().directory;
    d.sort_by(|a, b| a.conn.cmp(&b.conn));
    d
}

// ---- the on-path proxy ------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// Flip one bit in the middle of the next record.
    FlipBit,
    /// Send the record marked on an earlier link, at the same position in this one.
    InjectMarked,
    /// Forward the next record and the one after it, then that first one again.
    Replay,
    /// Hold the next record, forward the one after it, then the held one.
    Reorder,
    /// Forward the next record cut to half its body, with its length prefix rewritten to match.
    Truncate,
    /// Forward the header and half the body of the next record, then close the connection.
    Cut,
}

#[derive(Default)]
struct ProxyState {
    /// Records n1 sent on each link through the proxy (after the 6-byte preamble), whole.
    sessions: Vec<Vec<Vec<u8>>>,
    /// The next record forwarded gets marked: (session, index).
    mark_next: bool,
    marked: Option<(usize, usize)>,
    attack: Option<Attack>,
    /// Set once an attack was carried out; new connections are then dropped until `resume`.
    paused: bool,
    fired: usize,
    /// For `InjectMarked`: the index the injected record took in its new link.
    injected_at: Option<usize>,
}

struct Proxy {
    addr: SocketAddr,
    st: Arc<Mutex<ProxyState>>,
    /// Wakes the live link's forwarder (attacks that need no record from n1).
    poke: Arc<Notify>,
    cut: Arc<Notify>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let (l, addr) = bind().await;
        let st = Arc::new(Mutex::new(ProxyState::default()));
        let poke = Arc::new(Notify::new());
        let cut = Arc::new(Notify::new());
        let (st2, poke2, cut2) = (st.clone(), poke.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else { return };
                if st2.lock().unwrap().paused {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let session = {
                    let mut s = st2.lock().unwrap();
                    s.sessions.push(Vec::new());
                    s.sessions.len() - 1
                };
                let (st, poke, cut) = (st2.clone(), poke2.clone(), cut2.clone());
                tokio::spawn(relay(client, server, session, st, poke, cut));
            }
        });
        Proxy { addr, st, poke, cut }
    }

    fn arm(&self, a: Attack) {
        let mut s = self.st.lock().unwrap();
        s.attack = Some(a);
        drop(s);
        self.poke.notify_waiters();
    }

    fn mark_next(&self) {
        self.st.lock().unwrap().mark_next = true;
    }

    fn fired(&self) -> usize {
        self.st.lock().unwrap().fired
    }

    fn resume(&self) {
        self.st.lock().unwrap().paused = false;
    }

    /// Records n1 sent on the current (last) link.
    fn forwarded(&self) -> usize {
        self.st.lock().unwrap().sessions.last().map_or(0, |s| s.len())
    }

    fn links(&self) -> usize {
        self.st.lock().unwrap().sessions.len()
    }

    /// Closes the live link (both sides), as a network fault would.
    fn cut_link(&self) {
        self.cut.notify_waiters();
    }
}

/// Reads n1's records and hands them to the forwarder; ends on EOF or error.
async fn read_records(mut r: tokio::net::tcp::OwnedReadHalf, tx: mpsc::Sender<Vec<u8>>) {
    let mut pre = [0u8; 6];
    if r.read_exact(&mut pre).await.is_err() || tx.send(pre.to_vec()).await.is_err() {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            return;
        }
        let n = u32::from_be_bytes(len) as usize;
        let mut rec = len.to_vec();
        rec.resize(4 + n, 0);
        if r.read_exact(&mut rec[4..]).await.is_err() || tx.send(rec).await.is_err() {
            return;
        }
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    session: usize,
    st: Arc<Mutex<ProxyState>>,
    poke: Arc<Notify>,
    cut: Arc<Notify>,
) {
    let (cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let back = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    };
    let (tx, mut rx) = mpsc::channel(1024);
    let reader = read_records(cr, tx);
    let forward = async move {
        // The preamble is not a record.
        let Some(pre) = rx.recv().await else { return };
        if sw.write_all(&pre).await.is_err() {
            return;
        }
        let mut pending: Option<(Attack, Vec<u8>)> = None;
        loop {
            let poked = poke.notified();
            // Attacks that need no record from n1 fire at once.
            let inject = {
                let mut s = st.lock().unwrap();
                if s.attack == Some(Attack::InjectMarked) {
                    s.attack = None;
                    s.fired += 1;
                    s.paused = true;
                    let (ms, mi) = s.marked.expect("a record was marked on an earlier link");
                    assert!(ms < session, "the marked record is from an earlier link");
                    let rec = s.sessions[ms][mi].clone();
                    s.injected_at = Some(s.sessions[session].len());
                    Some(rec)
                } else {
                    None
                }
            };
            if let Some(rec) = inject {
                if sw.write_all(&rec).await.is_err() {
                    return;
                }
                continue;
            }
            let rec = tokio::select! {
                r = rx.recv() => match r { Some(r) => r, None => return },
                _ = poked => continue,
            };
            let out: Vec<Vec<u8>> = {
                let mut s = st.lock().unwrap();
                let idx = s.sessions[session].len();
                s.sessions[session].push(rec.clone());
                if s.mark_next {
                    s.mark_next = false;
                    s.marked = Some((session, idx));
                }
                match (pending.take(), s.attack) {
                    (Some((Attack::Replay, first)), _) => {
                        s.fired += 1;
                        s.paused = true;
                        vec![rec, first]
                    }
                    (Some((Attack::Reorder, first)), _) => {
                        s.fired += 1;
                        s.paused = true;
                        vec![rec, first]
                    }
                    (Some(_), _) => unreachable!(),
                    (None, Some(a @ (Attack::Replay | Attack::Reorder))) => {
                        s.attack = None;
                        pending = Some((a, rec.clone()));
                        if a == Attack::Replay {
                            vec![rec]
                        } else {
                            vec![]
                        }
                    }
                    (None, Some(Attack::FlipBit)) => {
                        s.attack = None;
                        s.fired += 1;
                        s.paused = true;
                        let mut r = rec;
                        let mid = 4 + (r.len() - 4) / 2;
                        r[mid] ^= 0x04;
                        vec![r]
                    }
                    (None, Some(Attack::Truncate)) => {
                        s.attack = None;
                        s.fired += 1;
                        s.paused = true;
                        let body = (rec.len() - 4) / 2;
                        let mut r = (body as u32).to_be_bytes().to_vec();
                        r.extend_from_slice(&rec[4..4 + body]);
                        vec![r]
                    }
                    (None, Some(Attack::Cut)) => {
                        s.attack = None;
                        s.fired += 1;
                        s.paused = true;
                        let half = 4 + (rec.len() - 4) / 2;
                        // An empty record after a partial one: cut the connection.
                        vec![rec[..half].to_vec(), vec![]]
                    }
                    (None, _) => vec![rec],
                }
            };
            for r in out {
                if r.is_empty() {
                    let _ = sw.flush().await;
                    return;
                }
                if sw.write_all(&r).await.is_err() {
                    return;
                }
            }
        }
    };
    // Whichever side ends first closes both connections.
    tokio::select! {
        _ = back => {}
        _ = reader => {}
        _ = forward => {}
        _ = cut.notified() => {}
    }
}

// ---- the rig ----------------------------------------------------------------------------

struct Rig {
    n1: ClusterHandle,
    n2: ClusterHandle,
    proxy: Proxy,
    _ev1: mpsc::Receiver<ClusterEvent>,
    ev2: mpsc::Receiver<ClusterEvent>,
    /// Where n2 thinks n1 is: bound (so no other test gets the port) but never answering, so
    /// n2's own dials never make a link and the proxied one is the only one.
    _hole: TcpListener,
}

/// Records n1 sends on a fresh link before it falls quiet: hello, noise, welcome, one resync,
/// its ping and its pong.
const SETTLED: usize = 6;

impl Rig {
    /// n1 dials n2 through the proxy; n1 owns "a", n2 owns "b", both known on both sides.
    async fn start() -> Rig {
        logs();
        let (l1, _) = bind().await;
        let (l2, a2) = bind().await;
        let proxy = Proxy::start(a2).await;
        // No link until both sessions exist, so every link starts with the same records.
        proxy.st.lock().unwrap().paused = true;
        let (tx1, _ev1) = mpsc::channel(1024);
        let (tx2, ev2) = mpsc::channel(1024);
        let n1 = ClusterHandle::start(quiet_cfg("n1", peer("n2", proxy.addr)), l1, tx1)
            .await
            .unwrap();
        let (hole, hole_addr) = bind().await;
        let n2 = ClusterHandle::start(quiet_cfg("n2", peer("n1", hole_addr)), l2, tx2)
            .await
            .unwrap();
        n1.announce_session("a");
        n2.announce_session("b");
        proxy.resume();
        wait_until("a and b known on both sides", || {
            owner(&n2, "a").as_deref() == Some("n1") && owner(&n1, "b").as_deref() == Some("n2")
        })
        .await;
        let rig = Rig {
            n1,
            n2,
            proxy,
            _ev1,
            ev2,
            _hole: hole,
        };
        rig.settle().await;
        rig
    }

    /// Waits until the live link is up and n1 has sent everything a link starts with.
    async fn settle(&self) {
        wait_until("link settled", || {
            self.proxy.forwarded() >= SETTLED && connected(&self.n1, "n2") && connected(&self.n2, "n1")
        })
        .await;
        assert_eq!(self.proxy.forwarded(), SETTLED, "n1 is quiet once its link started");
    }

    /// n2's view of n1's claims is n1's own.
    fn n2_agrees(&self) -> bool {
        let mine = |h: &ClusterHandle, node: &str| -> Vec<Entry> {
            directory(h).into_iter().filter(|e| e.node == node).collect()
        };
        mine(&self.n1, "n1") == mine(&self.n2, "n1")
    }
}

/// Runs `attack` on a settled link and checks: n2 drops the link (counting the record when it
/// failed authentication), its directory is exactly what it was before, n1 is not declared
/// down, and once the proxy lets connections through again the link comes back by itself
/// and carries frames.
async fn attack_drops_the_link_and_changes_nothing(attack: Attack) {
    let mut rig = Rig::start().await;
    let (n1, n2) = (&rig.n1, &rig.n2);
    let rejected0 = n2.status().counters.frames_rejected;

    let dir_before;
    match attack {
        Attack::FlipBit | Attack::Truncate | Attack::Cut => {
            dir_before = directory(n2);
            rig.proxy.arm(attack);
            n1.announce_session("x");
        }
        Attack::Reorder => {
            dir_before = directory(n2);
            rig.proxy.arm(attack);
            n1.announce_session("o1");
            n1.announce_session("o2");
        }
        Attack::Replay => {
            // Own r, then Disown r, then Own r again from the attacker: r would be back.
            dir_before = directory(n2);
            rig.proxy.arm(attack);
            let e = n1.announce_session("r");
            wait_until("n2 sees r", || owner(n2, "r").as_deref() == Some("n1")).await;
            n1.withdraw_session("r", e);
        }
        Attack::InjectMarked => {
            // Link 1 carries Own s1 (marked) and Disown s1; link 2 gets that Own s1 injected at
            // the same position, so only its keys differ from what n2 expects there.
            rig.proxy.mark_next();
            let e = n1.announce_session("s1");
            wait_until("n2 sees s1", || owner(n2, "s1").as_deref() == Some("n1")).await;
            n1.withdraw_session("s1", e);
            wait_until("n2 forgets s1", || owner(n2, "s1").is_none()).await;
            let links = rig.proxy.links();
            rig.proxy.cut_link();
            wait_until("second link", || rig.proxy.links() > links).await;
            rig.settle().await;
            wait_until("n2 agrees with n1", || rig.n2_agrees()).await;
            dir_before = directory(n2);
            rig.proxy.arm(attack);
        }
    }
    let links_at_attack = rig.proxy.links();
    wait_until("attack carried out", || rig.proxy.fired() == 1).await;
    if attack == Attack::InjectMarked {
        let s = rig.proxy.st.lock().unwrap();
        assert_eq!(
            s.injected_at,
            s.marked.map(|m| m.1),
            "the injected record took the counter it had on its own link"
        );
    }
    if attack != Attack::Cut {
        wait_until("n2 rejects the record", || {
            n2.status().counters.frames_rejected > rejected0
        })
        .await;
    }
    // The proxy lets no new connection through yet: the link is down on both sides.
    wait_until("link dropped", || !connected(n1, "n2") && !connected(n2, "n1")).await;
    assert_eq!(directory(n2), dir_before, "{attack:?} changed n2's directory");
    for conn in ["x", "o1", "o2", "r", "s1"] {
        assert_eq!(owner(n2, conn), None, "{attack:?}: {conn}");
    }
    assert_eq!(owner(n2, "a").as_deref(), Some("n1"));
    assert_eq!(owner(n1, "b").as_deref(), Some("n2"));

    // The link comes back by itself.
    rig.proxy.resume();
    wait_until("link back", || {
        rig.proxy.links() > links_at_attack && connected(n1, "n2") && connected(n2, "n1")
    })
    .await;
    n1.announce_session("after");
    wait_until("frames flow again", || owner(n2, "after").as_deref() == Some("n1")).await;
    wait_until("n2 agrees with n1", || rig.n2_agrees()).await;
    while let Ok(ev) = rig.ev2.try_recv() {
        assert!(
            !matches!(ev, ClusterEvent::PeerDown { .. }),
            "{attack:?}: n1 was declared down"
        );
    }
    rig.n1.shutdown().await;
    rig.n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_drops_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::FlipBit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_from_another_link_drops_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::InjectMarked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_record_drops_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::Replay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_records_drop_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::Reorder).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_record_drops_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::Truncate).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_record_drops_the_link() {
    attack_drops_the_link_and_changes_nothing(Attack::Cut).await;
}

/// Nothing after the handshake is readable on the wire: not a connection id, not a frame tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_reads_no_connection_id() {
    let rig = Rig::start().await;
    let conn = "did:example:wallet-7q2x-conn-id-visible?";
    rig.n1.announce_session(conn);
    wait_until("n2 sees it", || owner(&rig.n2, conn).as_deref() == Some("n1")).await;
    let wire: Vec<u8> = rig.proxy.st.lock().unwrap().sessions.concat().concat();
    assert!(wire.len() > 200);
    assert!(!wire.windows(8).any(|w| w == &conn.as_bytes()[..8]));
    assert!(!wire.windows(4).any(|w| w == b"conn"));
    rig.n1.shutdown().await;
    rig.n2.shutdown().await;
}

// ---- versions ---------------------------------------------------------------------------

fn old_hello(node: &str) -> Vec<u8> {
    // Version 3's preamble (the release before the stretched PSK); its Hello has the same
    // bytes in every version.
    hello_after(b"MLRM\x00\x03", CLUSTER, node)
}

/// `preamble`, then a `Hello` naming `cluster` and `node`: what a dialer sends first.
fn hello_after(preamble: &[u8], cluster: &str, node: &str) -> Vec<u8> {
    let mut b = preamble.to_vec();
    let hello = Frame::Hello(Hello {
        cluster: cluster.into(),
        node: node.into(),
        nonce: [9; 32],
    });
    b.extend(codec::encode_record(&hello, 1 << 20).unwrap());
    b
}

/// Where [`lone_node`]'s peer is.
const PEER_IP: &str = "127.0.0.2";

/// A node n1 whose one configured peer (`peer_id`, at the listener returned, which accepts
/// nothing unless the test does) is never up: the node, its address to connect to, the
/// peer's listener and the node's events (kept open while the test runs).
async fn lone_node(peer_id: &str) -> (ClusterHandle, SocketAddr, TcpListener, mpsc::Receiver<ClusterEvent>) {
    let (l1, a1) = bind().await;
    // The peer on an address of its own: strangers connect from 127.0.0.1.
    let l_peer = TcpListener::bind(PEER_IP.to_string() + ":0").await.unwrap();
    let a_peer = l_peer.local_addr().unwrap();
    let (tx, ev) = mpsc::channel(64);
    let n1 = ClusterHandle::start(quiet_cfg("n1", peer(peer_id, a_peer)), l1, tx)
        .await
        .unwrap();
    (n1, a1, l_peer, ev)
}

/// Reads what a current node answers an old one: its preamble, its hello, then a refusal.
async fn read_refusal(s: &mut TcpStream) -> String {
    let read = async {
        let pre = codec::read_preamble(s).await.unwrap();
        assert_eq!(pre, proto::preamble());
        assert_eq!(&pre[4..], &proto::PROTOCOL_VERSION.to_be_bytes());
        assert!(matches!(
            codec::read_frame(s, 1 << 20).await.unwrap(),
            Some(Frame::Hello(_))
        ));
        let Some(Frame::Refused { reason }) = codec::read_frame(s, 1 << 20).await.unwrap() else {
            panic!("no refusal")
        };
        // Then it closes (a reset is fine: it did not read all we sent).
        assert!(
            !matches!(codec::read_frame(s, 1 << 20).await, Ok(Some(_))),
            "then it closes"
        );
        reason
    };
    tokio::time::timeout(WAIT, read).await.expect("an answer in time")
}

/// A node of the previous protocol version (3) is refused with a reason both sides can read, in either
/// direction, logged and counted; nothing it says after its preamble is read as a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_the_previous_version_is_refused_with_a_reason() {
    logs();
    let (n1, a1, l_old, _ev) = lone_node("old").await;

    // The old node dials us.
    let mut s = TcpStream::connect(a1).await.unwrap();
    s.write_all(&old_hello("old")).await.unwrap();
    let reason = read_refusal(&mut s).await;
    assert!(reason.contains("this node speaks 4, you speak 3"), "{reason}");
    wait_until("counted", || n1.status().counters.version_mismatches >= 1).await;

    // We dial the old node.
    let before = n1.status().counters.version_mismatches;
    let (mut s, _) = l_old.accept().await.unwrap();
    s.write_all(&old_hello("old")).await.unwrap();
    let reason = read_refusal(&mut s).await;
    assert!(reason.contains("this node speaks 4, you speak 3"), "{reason}");
    wait_until("counted", || n1.status().counters.version_mismatches > before).await;
    let c = n1.status().counters;
    assert!(
        c.auth_failures >= c.version_mismatches,
        "a version refusal is a refused peer"
    );
    assert!(!connected(&n1, "old"));
    wait_until("logged", || {
        captured().contains("peer speaks cluster protocol version 3, this node speaks 4")
    })
    .await;
    n1.shutdown().await;
}

/// A socket that opens and then says nothing is closed at the handshake's own bound, not at the
/// failure timeout (300 s here; up to an hour is allowed): until then it holds one of the few
/// slots of unauthenticated sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_let_go_at_the_handshake_bound() {
    let (n1, a1, _peer, _ev) = lone_node("n2").await;
    let mut s = TcpStream::connect(a1).await.unwrap();
    let opened = Instant::now();
    let mut sink = Vec::new();
    // What the node sends first (its preamble and hello), then the close.
    let read = tokio::time::timeout(
        mailroom::cluster::HANDSHAKE_TIMEOUT_MAX + Duration::from_secs(5),
        s.read_to_end(&mut sink),
    )
    .await;
    assert!(
        read.is_ok(),
        "the silent socket was still open after {:?}",
        opened.elapsed()
    );
    n1.shutdown().await;
}

/// Strangers refused one after another (each naming another cluster, with a 1,000-character
/// name) make one warning in the first ten seconds, not one each: the rest are logged at debug
/// and counted. A refusal of another kind, or from a configured peer's address, is still
/// warned at once. No line repeats the whole name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_strangers_make_one_warning_not_one_each() {
    logs();
    let (n1, a1, _peer, _ev) = lone_node("n2").await;
    let tag = format!("flood-{}", uuid_like());
    let name = format!("{tag}{}", "x".repeat(1000));
    let hello = hello_after(&proto::preamble(), &name, "n2");
    const STRANGERS: u64 = 200;
    let before = n1.status().counters.auth_failures;
    let flood = Instant::now();
    for _ in 0..STRANGERS {
        let mut s = TcpStream::connect(a1).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    }
    wait_until("every stranger refused", || {
        n1.status().counters.auth_failures >= before + STRANGERS
    })
    .await;
    wait_until("every refusal logged", || {
        captured().lines().filter(|l| l.contains(&tag)).count() as u64 >= STRANGERS
    })
    .await;
    let took = flood.elapsed();
    // The same refusal from the configured peer's address: warned whatever the flood.
    let from_peer = format!("{tag}-peer");
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{PEER_IP}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(a1).await.unwrap();
    s.write_all(&hello_after(&proto::preamble(), &from_peer, "n2"))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    // Refused for another reason (our cluster, a node id not configured): warned at once,
    // whatever the flood before it.
    let other = format!("{tag}-other");
    let mut s = TcpStream::connect(a1).await.unwrap();
    s.write_all(&hello_after(&proto::preamble(), CLUSTER, &other))
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
    let warned = |l: &str| l.contains(" WARN ");
    for (what, mark) in [("the other refusal", &other), ("the peer's refusal", &from_peer)] {
        wait_until(&format!("{what} warned"), || {
            captured().lines().any(|l| l.contains(mark.as_str()) && warned(l))
        })
        .await;
    }
    let logged = captured();
    let ours: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains(&tag) && !l.contains(&other) && !l.contains(&from_peer))
        .collect();
    let warnings = ours.iter().filter(|l| warned(l)).count() as u64;
    // One per ten seconds: one, unless the box was slow enough to take ten seconds.
    let allowed = 1 + took.as_secs() / 10;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} warnings for {STRANGERS} refusals in {took:?}"
    );
    assert!(!logged.contains(&name), "a log line repeats the stranger's whole name");
    n1.shutdown().await;
}

/// A name no other test of this binary logs.
fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

// ---- secrets ----------------------------------------------------------------------------

/// The secret, the PSK derived from it and the link keys appear in no log line (at TRACE)
/// and no `Debug` output, whatever happens: links up, refused peers, tampered records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_never_appears_in_logs() {
    let rig = Rig::start().await;
    // A peer with another secret, refused.
    let mut s = TcpStream::connect(rig.proxy.addr).await;
    if let Ok(ref mut s) = s {
        let local = handshake::Local {
            cluster: CLUSTER,
            node: "n1",
            secret: b"another-secret-entirely",
            max_frame: 1 << 20,
        };
        let _ = handshake::run(s, &local, handshake::Role::Dialer, Some("n2"), |_| true).await;
    }
    // A tampered record.
    rig.proxy.arm(Attack::FlipBit);
    rig.n1.announce_session("x");
    wait_until("tamper seen", || rig.n2.status().counters.frames_rejected >= 1).await;
    rig.proxy.resume();
    // Configs and link ends, through Debug, into the log.
    let cfg = quiet_cfg("n1", vec![]);
    let file: mailroom::config::Config = toml::from_str(&format!("[cluster]\nsecret = \"{SECRET}\"\n")).unwrap();
    tracing::info!(?cfg, ?file, "configs");
    let (la, aa) = bind().await;
    let acceptor = tokio::spawn(async move {
        let (s, _) = la.accept().await.unwrap();
        let local = handshake::Local {
            cluster: CLUSTER,
            node: "n2",
            secret: SECRET.as_bytes(),
            max_frame: 1 << 20,
        };
        link::open(s, &local, handshake::Role::Acceptor, None, |_| true)
            .await
            .unwrap()
    });
    let local = handshake::Local {
        cluster: CLUSTER,
        node: "n1",
        secret: SECRET.as_bytes(),
        max_frame: 1 << 20,
    };
    let ours = link::open(
        TcpStream::connect(aa).await.unwrap(),
        &local,
        handshake::Role::Dialer,
        Some("n2"),
        |_| true,
    )
    .await
    .unwrap();
    let theirs = acceptor.await.unwrap();
    tracing::info!(?local, ?ours, ?theirs, "link ends");
    wait_until("link back", || connected(&rig.n2, "n1")).await;

    let log = captured();
    assert!(
        log.contains("cluster link up") && log.contains("link ends"),
        "capture works"
    );
    assert!(log.contains("<redacted>"));
    let psk = *handshake::ClusterKeys::derive(SECRET.as_bytes(), CLUSTER).psk();
    use base64::Engine as _;
    for needle in [
        SECRET.to_string(),
        SECRET[..12].to_string(),
        hex::encode(psk),
        hex::encode(&psk[..8]),
        base64::engine::general_purpose::STANDARD.encode(psk),
        format!("{:?}", &psk[..8]),
        format!("{:?}", &SECRET.as_bytes()[..8]),
    ] {
        assert!(!log.contains(&needle), "{needle:?} found in the logs");
    }
    rig.n1.shutdown().await;
    rig.n2.shutdown().await;
}

// ---- cost -------------------------------------------------------------------------------

/// Notifications per second over one link (n1 -> n2), as fast as the link takes them.
/// A measurement, not a check: `cargo test --release --test cluster_link -- --ignored
/// --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_of_one_link() {
    const N: u64 = 300_000;
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = ClusterConfig::new("n1", "bench", "bench-secret", peer("n2", a2));
    c1.peer_queue = 65_536;
    let mut c2 = ClusterConfig::new("n2", "bench", "bench-secret", peer("n1", a1));
    c2.peer_queue = 65_536;
    let (tx1, _ev1) = mpsc::channel(1024);
    let (tx2, mut ev2) = mpsc::channel::<ClusterEvent>(1 << 16);
    let n1 = ClusterHandle::start(c1, l1, tx1).await.unwrap();
    let n2 = ClusterHandle::start(c2, l2, tx2).await.unwrap();
    tokio::spawn(async move { while ev2.recv().await.is_some() {} });
    n2.announce_session("c");
    wait_until("n1 sees n2's session", || n1.owner_of("c").as_deref() == Some("n2")).await;

    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < N {
        match n1.notify_queued("c") {
            NotifyOutcome::Sent(_) => sent += 1,
            // Queue full: wait instead of spinning on the link's own worker threads.
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "bounded");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while n2.status().counters.notifications_received < N {
        assert!(Instant::now() < deadline, "not all notifications arrived");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "throughput: {N} notifications over one link in {secs:.3} s = {:.0}/s (failed on n1: {})",
        N as f64 / secs,
        n1.status().counters.notifications_failed
    );
    n1.shutdown().await;
    n2.shutdown().await;
}

// ---- text and clocks of authenticated peers ---------------------------------------------

/// A link to `n1` at `addr` as its configured peer `node` (the test speaks for it).
async fn link_as(addr: SocketAddr, node: &str) -> link::Link<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    let local = handshake::Local {
        cluster: CLUSTER,
        node,
        secret: SECRET.as_bytes(),
        max_frame: ClusterConfig::DEFAULT_MAX_FRAME,
    };
    link::open(s, &local, handshake::Role::Dialer, Some("n1"), |_| true)
        .await
        .unwrap()
}

/// Sends a `Queued` for `marker` and waits for the node to pass it on: frames are handled in
/// order, so every frame sent before it was.
async fn handled_up_to(link: &mut link::Link<TcpStream>, ev: &mut mpsc::Receiver<ClusterEvent>, marker: &str) {
    link.writer.send(&Frame::Queued { conn: marker.into() }).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Some(ClusterEvent::MessageQueued { conn })) if conn == marker => return,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => panic!("{marker} not handled within {WAIT:?}"),
        }
    }
}

/// A node whose clock is more than a day behind sees every claim of its healthy peers as
/// from over a day ahead, and ignores them all. It used to warn once per `Own` (once per
/// session a peer opened), each time blaming the peer, and said nothing of a resync's. Now a
/// resync whose every claim is so makes one error per link naming this node's clock, the
/// `Own`s after it at most one warning a minute, and every claim so ignored is counted
/// (`claims_ahead`, in the admin `/cluster` view's counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_behind_says_so_once_per_link() {
    logs();
    const PEER: &str = "clock-ahead";
    let (n1, a1, _peer, mut ev) = lone_node(PEER).await;
    let mut link = link_as(a1, PEER).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let in_two_days = (now_ms + 2 * 24 * 3600 * 1000) << 16;
    let resync = || Frame::Resync {
        claims: (0..50)
            .map(|i| proto::Claim {
                conn: format!("c{i}"),
                epoch: in_two_days + i,
            })
            .collect(),
        last: true,
    };
    let started = Instant::now();
    link.writer.send(&resync()).await.unwrap();
    for i in 0..20 {
        let own = Frame::Own {
            conn: format!("o{i}"),
            epoch: in_two_days,
        };
        link.writer.write_frame(&own).await.unwrap();
    }
    // Again: said once per link.
    link.writer.send(&resync()).await.unwrap();
    handled_up_to(&mut link, &mut ev, "clock-marker").await;
    assert!(directory(&n1).is_empty(), "{:?}", directory(&n1));
    assert_eq!(n1.status().counters.claims_ahead, 120, "every claim ignored is counted");
    let logged = captured();
    let of_peer: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains(&format!("peer=\"{PEER}\"")))
        .collect();
    let errors: Vec<&&str> = of_peer.iter().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("this node's clock may be behind"), "{}", errors[0]);
    let warnings = of_peer
        .iter()
        .filter(|l| l.contains(" WARN ") && l.contains("day ahead"))
        .count() as u64;
    let allowed = 1 + started.elapsed().as_secs() / 60;
    assert!(
        (1..=allowed).contains(&warnings),
        "{warnings} warnings for 20 claims from over a day ahead"
    );
    n1.shutdown().await;
}

/// A peer's `Refused` after the handshake (a frame of up to `max_frame` bytes of its text) is
/// logged as refusals in the handshake are: cut, its control characters escaped, so a newline
/// of its own starts no log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_the_handshake_is_logged_cut_and_escaped() {
    logs();
    const PEER: &str = "refuser";
    let (n1, a1, _peer, _ev) = lone_node(PEER).await;
    let mut link = link_as(a1, PEER).await;
    let tag = uuid_like();
    let reason = format!("{tag}\nFORGED-{tag} a line of the peer's own{}", "y".repeat(10_000));
    link.writer.send(&Frame::Refused { reason }).await.unwrap();
    wait_until("the link's end logged", || {
        captured().contains(&format!("peer closed the link: {tag}"))
    })
    .await;
    let logged = captured();
    assert!(
        !logged.lines().any(|l| l.starts_with(&format!("FORGED-{tag}"))),
        "the peer's newline started a log line"
    );
    assert!(logged.contains(&format!("{tag}\\nFORGED-{tag}")), "escaped");
    assert!(!logged.contains(&"y".repeat(1_000)), "logged whole");
    n1.shutdown().await;
}
