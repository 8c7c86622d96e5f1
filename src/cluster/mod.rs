//! The cluster subsystem: an authenticated TCP peer protocol between mailroom nodes, the
//! session directory (which node holds the live session of which connection) and
//! message-queued notifications.
//!
//! Owns: everything on the cluster port. The rest of the node sees only [`ClusterHandle`]
//! and the [`ClusterEvent`]s it sends; it must not reach into the submodules' state.
//! Must not touch the store, the registry or actix: a notification is only a wake-up, the
//! queue in the store stays the truth, and a periodic sweep elsewhere covers every loss.
//!
//! Layers (each testable alone):
//! - [`proto`]: wire types and the only use of bincode; pinned by fixed-bytes tests.
//! - [`codec`]: `u32` big-endian length + payload framing, capped at `max_frame` (handshake).
//! - [`handshake`]: preamble (`MLRM` + version), `Hello`s, then a Noise NNpsk0 handshake
//!   keyed by the cluster secret.
//! - [`link`]: every frame after the handshake, sealed with that handshake's keys.
//! - [`directory`], [`membership`]: pure state machines, `(state, event, now) -> effects`.
//! - `peer`: the tokio tasks (listener, dialers with backoff, links with heartbeats, the
//!   failure-detector tick) that feed those state machines and carry out their effects.
//!
//! Limits: frame size (`max_frame`, at most [`proto::MAX_FRAME_CEILING`]), per-link send queue
//! (`peer_queue` frames; full queues drop and count, directory changes then fall back to a
//! resync; of them, this node's hand-offs not yet written hold at most 8 frames of `max_frame`
//! bytes per peer, `peer::SEND_BUDGET_FRAMES`, past which a hand-off is refused and its
//! messages released to the store),
//! pending handshakes (64, at most 8 per source address; a newcomer evicts the oldest of the
//! busiest source, never a configured peer's for an unknown source), claims per peer (1,000,000) and bytes per claimed connection id
//! ([`proto::MAX_CONN_ID`], 128: longer claims are ignored), directory work per hold of the
//! cluster lock (`peer::DIR_SLICE` claims: a large resync or a failed peer's claims are
//! handled in slices, so forwards and session binds never wait for a whole one), peers' hand-offs
//! held on this node until their sessions take them (8 frames per peer, 2 of them per
//! connection, [`Held`]; a frame past a connection's share is handed back to the store) and
//! peers' events waiting for the node (its event channel): past either, the link reads nothing
//! more until there is room, and the peer's queue to this node fills.
//!
//! Use from the node:
//!
//! ```no_run
//! # async fn demo(listener: tokio::net::TcpListener) -> std::io::Result<()> {
//! use mailroom::cluster::{ClusterConfig, ClusterEvent, ClusterHandle, NotifyOutcome};
//! let (tx, mut events) = tokio::sync::mpsc::channel(1024);
//! let cfg = ClusterConfig::new("n1", "local", "change-me", vec![/* the other nodes */]);
//! let cluster = ClusterHandle::start(cfg, listener, tx).await?;
//! // a session of connection "conn-1" opened here:
//! let epoch = cluster.announce_session("conn-1");
//! // a message for "conn-2" was committed to the store:
//! match cluster.notify_queued("conn-2") {
//!     NotifyOutcome::Local => { /* wake the local session */ }
//!     NotifyOutcome::Sent(_) | NotifyOutcome::Failed(_) | NotifyOutcome::NoOwner => {}
//! }
//! while let Some(ev) = events.recv().await {
//!     if let ClusterEvent::MessageQueued { conn } = ev { let _ = conn; /* wake its session */ }
//! #   break;
//! }
//! cluster.withdraw_session("conn-1", epoch); // that session ended
//! cluster.leave().await; // on shutdown, after closing sessions
//! # Ok(()) }
//! ```
//!
//! Security: peers prove knowledge of the shared secret (a Noise PSK derived from it); the
//! secret never travels. Every frame after the handshake is encrypted and authenticated with
//! keys fresh per link and per direction, under a counter: an on-path attacker reads nothing
//! (not even connection ids) and any altered, injected, replayed, reordered or truncated
//! record closes the link (counted in `frames_rejected`; the dialer reconnects). What it
//! still sees: that nodes talk, when, and how much. Node ids are authenticated by the secret
//! only: every holder of the secret can speak as any configured node, so a node that leaves for
//! good should take the secret with it: [`ClusterHandle::set_secret`] (a reload) rotates it and
//! closes every link opened with the old one. The secret and keys never appear in logs or
//! `Debug` output.

pub mod admin_read;
pub mod codec;
pub mod directory;
pub mod handshake;
pub mod link;
pub mod membership;
mod peer;
pub mod proto;
#[cfg(test)]
mod sim_tests;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use directory::Entry;
pub use peer::{resync_chunks, CounterSnapshot};

use peer::{Settings, Shared};

/// Another node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub id: String,
    pub addr: SocketAddr,
}

/// `Debug` shows every field but the secret.
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's id; must be unique in the cluster and listed in every peer's config.
    pub node_id: String,
    /// Peers naming another cluster are refused.
    pub cluster_name: String,
    /// Shared secret every node proves knowledge of; never sent, never logged; it keys the
    /// link encryption (see [`handshake`]).
    pub secret: String,
    /// All OTHER nodes.
    pub peers: Vec<PeerConfig>,
    /// How often each link sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A peer heard from for no longer than this is declared down and its sessions dropped.
    pub failure_timeout: Duration,
    /// Largest frame accepted or sent, in bytes (clamped to [`proto::MAX_FRAME_CEILING`]).
    pub max_frame: usize,
    /// Frames queued per peer link before new ones are dropped (and counted).
    pub peer_queue: usize,
    /// Most session claims one peer may hold in this node's directory (`Own` frames beyond
    /// it are ignored and counted; a larger resync closes the link).
    pub max_peer_claims: usize,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_id", &self.node_id)
            .field("cluster_name", &self.cluster_name)
            .field("secret", &"<redacted>")
            .field("peers", &self.peers)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("failure_timeout", &self.failure_timeout)
            .field("max_frame", &self.max_frame)
            .field("peer_queue", &self.peer_queue)
            .field("max_peer_claims", &self.max_peer_claims)
            .finish()
    }
}

impl ClusterConfig {
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(500);
    pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_secs(3);
    pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
    pub const DEFAULT_PEER_QUEUE: usize = 1024;
    pub const DEFAULT_MAX_PEER_CLAIMS: usize = 1_000_000;
    /// Most frames `peer_queue` may hold: far beyond any use, far below the channel's own
    /// ceiling (`usize::MAX >> 3` permits, past which creating it panics).
    pub const MAX_PEER_QUEUE: usize = 1 << 20;

    /// A config with the documented defaults for the tunables.
    pub fn new(
        node_id: impl Into<String>,
        cluster_name: impl Into<String>,
        secret: impl Into<String>,
        peers: Vec<PeerConfig>,
    ) -> Self {
        ClusterConfig {
            node_id: node_id.into(),
            cluster_name: cluster_name.into(),
            secret: secret.into(),
            peers,
            heartbeat_interval: Self::DEFAULT_HEARTBEAT,
            failure_timeout: Self::DEFAULT_FAILURE_TIMEOUT,
            max_frame: Self::DEFAULT_MAX_FRAME,
            peer_queue: Self::DEFAULT_PEER_QUEUE,
            max_peer_claims: Self::DEFAULT_MAX_PEER_CLAIMS,
        }
    }

    /// Checks the config; the error names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.is_empty() {
            return Err("cluster node_id is empty".into());
        }
        if self.cluster_name.is_empty() {
            return Err("cluster name is empty".into());
        }
        if self.secret.is_empty() {
            return Err("cluster secret is empty".into());
        }
        validate_peers(&self.node_id, &self.peers)?;
        if self.heartbeat_interval.is_zero() {
            return Err("cluster heartbeat_interval must be > 0".into());
        }
        if self.failure_timeout <= self.heartbeat_interval {
            return Err("cluster failure_timeout must exceed heartbeat_interval".into());
        }
        if self.max_frame < 1024 || self.max_frame > proto::MAX_FRAME_CEILING {
            return Err(format!(
                "cluster max_frame must be in 1024..={}",
                proto::MAX_FRAME_CEILING
            ));
        }
        if self.peer_queue == 0 || self.peer_queue > Self::MAX_PEER_QUEUE {
            return Err(format!("cluster peer_queue must be in 1..={}", Self::MAX_PEER_QUEUE));
        }
        Ok(())
    }
}

fn validate_peers(node_id: &str, peers: &[PeerConfig]) -> Result<(), String> {
    for (i, p) in peers.iter().enumerate() {
        if p.id.is_empty() {
            return Err("cluster peer with an empty id".into());
        }
        if p.id == node_id {
            return Err(format!("cluster peer {:?} is this node", p.id));
        }
        if peers[..i].iter().any(|q| q.id == p.id) {
            return Err(format!("cluster peer {:?} listed twice", p.id));
        }
    }
    Ok(())
}

/// What the cluster tells the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A peer queued a message for `conn`, whose session this node holds: drain its queue.
    MessageQueued { conn: String },
    /// A link to the peer came up: the peer up again, or its link back after one closed while
    /// the peer stayed up (what was notified to it meanwhile may never have reached it).
    PeerUp { node: String },
    /// The peer is gone (silent past the failure timeout, left, or removed); its sessions
    /// are dropped from the directory (at once for a few thousand, else in slices in the
    /// background, see `peer::DIR_SLICE`). `taken_over_here`: this node takes over what the
    /// peer left (a [`ClusterEvent::SessionsLost`] follows when the peer left sessions no
    /// node holds, or leases to release).
    PeerDown { node: String, taken_over_here: bool },
    /// A peer failed, or its resync no longer named sessions it had claimed (it restarted
    /// before it was found failed), and this node is the one that takes over what it left
    /// (see [`membership::Membership::takes_over`]): the wallets of `conns`, whose sessions it
    /// held and which no node held once its claims were removed, are woken (push) when they
    /// have mail queued; sent once those claims are removed (not at all when none was left
    /// and no lease is to be released); with `release_leases` (this node sees half the cluster up:
    /// [`membership::Membership::sees_half`]) the messages leased to it (its sessions' and its
    /// hand-offs') go back to pending first.
    SessionsLost {
        node: String,
        conns: Vec<String>,
        release_leases: bool,
    },
    /// Another node took ownership of a conn we hold (a newer session there): close our
    /// session? The node decides.
    SessionMoved { conn: String, node: String },
    /// A peer's operator removed `conn` or revoked its mediation: close its sessions here.
    CloseSessions { conn: String, reason: String },
    /// A peer removed routing `keys` of `conn` (all of them when empty): forget cached routes.
    RoutesChanged { conn: String, keys: Vec<String> },
    /// A peer handed messages of `conn` to this node's session ([`proto::Frame::Deliver`]):
    /// they are leased to this node's hand-off owner; write them out, or release them. Keep
    /// `held` until a session took them (or they were released): it holds their room in the
    /// link's budget, and the link reads no further `Deliver` frame while the budget is spent.
    Delivered {
        conn: String,
        msgs: Vec<proto::HandedMsg>,
        held: Held,
    },
    /// Messages this node handed to `node` never left (the link closed first): release
    /// them (leased to `node`'s hand-off owner) and wake whoever holds `conn` now.
    HandOffReturned { node: String, conn: String, ids: Vec<i64> },
}

/// The room the messages of one `Deliver` frame take in its link's budget
/// ([`ClusterEvent::Delivered`]), given back when the last clone is dropped. A peer's hand-offs
/// wait on this node for its sessions (one writing to a slow socket takes them late); without a
/// budget a peer could have this node hold any number of frames in memory. Spent, the link
/// reads nothing until room comes back, and the peer's own queue to this node fills and it
/// releases its hand-offs to the store instead, as for a link that is down.
#[derive(Clone)]
pub struct Held(Option<Arc<peer::HeldRoom>>);

impl Held {
    /// Holds no room (a hand-off made on this node).
    pub fn nothing() -> Held {
        Held(None)
    }

    pub(crate) fn room(room: peer::HeldRoom) -> Held {
        Held(Some(Arc::new(room)))
    }

    /// The bytes of the budget held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, |r| r.bytes)
    }
}

/// Room for hand-offs waiting for sessions on this node, as a peer's `Deliver` frames have on
/// their link: a budget of [`LOCAL_ROOM_UNITS`] units, 2 of which one connection may hold (so
/// it takes 8 sessions on slow sockets to spend it; then every forward for a session here is
/// queued for it to lease, one store round trip more, until one of them takes its own). The
/// forwards accepted here take room from one such budget
/// ([`crate::session::Shared::hand_off_in_order`]): a session writing to a slow socket takes
/// its hand-offs late, and without a budget what waits for it would only be bounded by its
/// connection's queue limits, for every such session at once.
pub struct Room(Arc<peer::PeerRoom>);

/// Units of [`Room`]'s budget.
pub const LOCAL_ROOM_UNITS: usize = 16;

impl Room {
    /// A budget of [`LOCAL_ROOM_UNITS`] `unit`s (at most 16 MiB each, so 256 MiB in all).
    pub fn new(unit: usize) -> Room {
        Room(peer::PeerRoom::sized(unit.clamp(1, 16 << 20), LOCAL_ROOM_UNITS, 2))
    }

    /// Room for messages of `conn` carrying `bytes` (payloads and recipient keys), if its
    /// share and the budget have it now; given back when the [`Held`] is dropped. Each message
    /// is counted with its record and its own copy of `conn`, as a peer's are.
    pub fn try_hold(&self, conn: &str, bytes: usize, messages: usize) -> Option<Held> {
        let per_message = peer::HELD_PER_MESSAGE.saturating_add(conn.len());
        let need = self.0.need(bytes.saturating_add(messages.saturating_mul(per_message)));
        self.0.try_take(conn, need).ok().map(Held::room)
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Held({} bytes)", self.bytes())
    }
}

/// Events compare by what they say, not by the room they hold.
impl PartialEq for Held {
    fn eq(&self, _: &Held) -> bool {
        true
    }
}

impl Eq for Held {}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum NotifyOutcome {
    /// This node holds the session: wake it locally.
    Local,
    /// No node holds a session of this conn (or the one named is down or removed).
    NoOwner,
    /// The notification is on its way to the owner.
    Sent(String),
    /// The owner is up but unreachable right now (no link, or its queue is full): counted in
    /// `notifications_failed`; the node that notified notifies it again with its next
    /// notification to the owner or once its link is back (`Shared::peer_up`), or, the owner
    /// found down later, wakes the wallet (`Shared::peer_down`), or the node that takes the
    /// owner over does.
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub id: String,
    pub addr: SocketAddr,
    pub connected: bool,
    /// Considered alive by the failure detector (may be briefly true with no link).
    pub up: bool,
    pub last_heartbeat_age_ms: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub handshake_attempted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node: String,
    pub peers: Vec<PeerStatus>,
    pub directory: Vec<Entry>,
    pub counters: CounterSnapshot,
}

/// The node's handle on the cluster. Cheap to clone; every method is non-blocking except
/// `start`, `leave` and `shutdown`. Dropping the last clone shuts the cluster down (without
/// `Leave`), so forgotten handles do not leave tasks and sockets behind.
#[derive(Clone)]
pub struct ClusterHandle {
    shared: Arc<Shared>,
    _last: Arc<ShutdownOnDrop>,
}

/// Held only by handles (tasks hold `Shared` directly), so it drops with the last handle.
struct ShutdownOnDrop(Arc<Shared>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.signal_shutdown();
    }
}

/// How long `leave` waits for peers to be told (links open, and handshakes that may yet bring
/// one up).
const LEAVE_GRACE: Duration = Duration::from_secs(2);
/// How long `shutdown` waits for the cluster's tasks to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The longest a link's handshake may take (a dial's TCP connect included), whatever the
/// failure timeout: a socket that says nothing holds one of the few unauthenticated slots
/// (and a dial to a peer that accepts and then hangs holds that peer's dial loop) no longer.
/// A handshake is three messages; between cluster nodes it takes milliseconds.
pub const HANDSHAKE_TIMEOUT_MAX: Duration = Duration::from_secs(5);

impl ClusterHandle {
    /// Starts the listener on `listener`, dials every configured peer and returns at once
    /// (links come up in the background; see [`ClusterHandle::handshake_attempted`]).
    pub async fn start(
        cfg: ClusterConfig,
        listener: TcpListener,
        events: mpsc::Sender<ClusterEvent>,
    ) -> std::io::Result<ClusterHandle> {
        cfg.validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let settings = Settings {
            node_id: cfg.node_id.clone(),
            cluster_name: cfg.cluster_name.clone(),
            heartbeat_interval: cfg.heartbeat_interval,
            failure_timeout: cfg.failure_timeout,
            // Long enough for a loaded peer, short enough that a silent socket is let go.
            handshake_timeout: cfg.failure_timeout.clamp(Duration::from_secs(1), HANDSHAKE_TIMEOUT_MAX),
            max_frame: cfg.max_frame,
            peer_queue: cfg.peer_queue,
            max_peer_claims: cfg.max_peer_claims.max(1),
        };
        if let Some(w) = crate::config::cluster_secret_warning(&cfg.secret) {
            tracing::warn!("{w}");
        }
        // The keys, derived now and off this thread (Argon2id, tens of ms), held beside the
        // secret: every handshake and admin read of this node takes them from there.
        let keys = handshake::derive_off_thread(cfg.secret.as_bytes(), &cfg.cluster_name).await?;
        let shared = Shared::new(settings, cfg.secret.clone().into_bytes(), keys, &cfg.peers, events);
        shared.spawn(peer::accept_loop(shared.clone(), listener));
        shared.spawn(shared.clone().sweeper());
        let ticker = shared.clone();
        shared.spawn(async move {
            let period = (ticker.settings.failure_timeout / 8).min(ticker.settings.heartbeat_interval);
            let mut iv = tokio::time::interval(period);
            let mut shutdown = ticker.shutdown_rx.clone();
            loop {
                tokio::select! {
                    _ = iv.tick() => ticker.tick(),
                    _ = shutdown.changed() => return,
                }
            }
        });
        tracing::info!(node = %cfg.node_id, peers = cfg.peers.len(), "cluster started");
        Ok(ClusterHandle {
            _last: Arc::new(ShutdownOnDrop(shared.clone())),
            shared,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.settings.node_id
    }

    /// Records that this node holds a live session of `conn` and tells every peer. Returns
    /// the epoch to pass to [`ClusterHandle::withdraw_session`] when that session ends.
    pub fn announce_session(&self, conn: &str) -> u64 {
        self.shared.announce(conn)
    }

    /// The session announced at `epoch` ended. A newer session of the same conn (announced
    /// later, with a higher epoch) is not affected.
    pub fn withdraw_session(&self, conn: &str, epoch: u64) {
        self.shared.withdraw(conn, epoch)
    }

    pub fn owner_of(&self, conn: &str) -> Option<String> {
        self.shared.state.lock().dir.owner(conn).map(|(n, _)| n.to_string())
    }

    /// [`ClusterHandle::owner_of`], but none where the directory still names a peer found
    /// down or removed (its claims not all swept yet): whether a live session is anywhere.
    pub fn live_owner_of(&self, conn: &str) -> Option<String> {
        self.shared.live_owner(conn)
    }

    /// Records that `node` claims `conn` with an epoch above every other claim, as its `Own`
    /// frame would (tests of what this node does when a session moves away).
    #[cfg(test)]
    pub(crate) fn claim_for_test(&self, conn: &str, node: &str) {
        let mut st = self.shared.state.lock();
        let epoch = st.dir.max_epoch(conn) + 1;
        st.dir.apply(directory::DirEvent::Own {
            conn: conn.to_string(),
            node: node.to_string(),
            epoch,
        });
    }

    /// The largest frame a link carries (`cluster.max_frame`): what a `Deliver` must fit.
    pub fn max_frame(&self) -> usize {
        self.shared.settings.max_frame
    }

    /// The node holding `conn`'s live session (this one included), if a `Deliver` frame whose
    /// messages carry `len` bytes (payloads and recipient keys, which every message repeats)
    /// can reach it now.
    pub fn holder(&self, conn: &str, len: usize) -> Option<String> {
        self.shared.holder(conn, len)
    }

    /// Sends messages of `conn`, queued leased to `node`'s hand-off owner, to `node` (a
    /// peer). False when the frame could not be queued (no link, queue full, larger than
    /// `max_frame`, or the peer's send budget spent: the hand-offs queued for it and not yet
    /// written hold 8 frames of `max_frame` bytes, a link that is not read holds no more):
    /// the caller releases them.
    pub fn hand_off(&self, node: &str, conn: &str, msgs: Vec<proto::HandedMsg>) -> bool {
        self.shared.hand_off(node, conn, msgs)
    }

    /// Wakes the owner of `conn`: sends `Queued` to that node only.
    pub fn notify_queued(&self, conn: &str) -> NotifyOutcome {
        self.shared.notify(conn)
    }

    /// Asks every connected peer to close its live sessions of `conn` with `reason` (an
    /// operator action). Returns the peers the request was queued for; a peer whose link is
    /// down, or comes back within ten minutes, gets it again when its link comes up.
    pub fn close_sessions_everywhere(&self, conn: &str, reason: &str) -> Vec<String> {
        self.shared.broadcast_close(proto::Frame::CloseSessions {
            conn: conn.to_string(),
            reason: reason.to_string(),
        })
    }

    /// Asks every connected peer, once, to close `conn`'s sessions: not repeated on links that
    /// come up later, as [`Self::close_sessions_everywhere`] is (a DID rotation's close,
    /// repeated minutes later, would close the wallet's sockets of its new DID).
    pub fn close_sessions_once(&self, conn: &str, reason: &str) -> Vec<String> {
        self.shared.broadcast(&proto::Frame::CloseSessions {
            conn: conn.to_string(),
            reason: reason.to_string(),
        })
    }

    /// Tells every connected peer that `conn` lost routing `keys` (all of its keys when
    /// empty), so their route caches forget them. Best effort: a peer that misses it finds out
    /// when its stale route is refused at queue time.
    pub fn routes_changed(&self, conn: &str, keys: &[String]) -> Vec<String> {
        self.shared.broadcast(&proto::Frame::RoutesChanged {
            conn: conn.to_string(),
            keys: keys.to_vec(),
        })
    }

    /// Reload: dials new peers, closes and forgets removed ones, keeps the other links.
    /// An invalid list (duplicates, this node) is refused with a log and changes nothing.
    pub fn update_peers(&self, peers: Vec<PeerConfig>) {
        if let Err(e) = validate_peers(&self.shared.settings.node_id, &peers) {
            tracing::warn!(reason = %e, "cluster peer update refused");
            return;
        }
        if self.shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        self.shared.update_peers(&peers);
    }

    /// This node's signature on its read of `peer`'s admin API at `path` ([`admin_read`]): the
    /// value of the [`admin_read::HEADER`] header.
    pub fn sign_admin_read(&self, peer: &str, path: &str) -> String {
        let s = &self.shared.settings;
        admin_read::sign(&self.keys(), &s.node_id, peer, peer::unix_ms(), path)
    }

    /// The keys of the secret in use, derived when the cluster started or the secret was
    /// reloaded: held by the node's state, never derived here.
    fn keys(&self) -> Arc<handshake::ClusterKeys> {
        self.shared.secret().keys
    }

    /// The configured peer whose valid signature `header` is on a read of `path` now.
    pub fn verify_admin_read(&self, header: &str, path: &str) -> Option<String> {
        let s = &self.shared.settings;
        let configured = |n: &str| n != s.node_id && self.shared.state.lock().peers.contains_key(n);
        admin_read::verify(header, &self.keys(), &s.node_id, path, peer::unix_ms(), configured).map(str::to_owned)
    }

    /// Makes `secret` the cluster secret (a rotated one, reloaded): handshakes from now on
    /// prove it, and every link up now is closed (opened with the old one); peers link again
    /// once they have it too. False, and nothing done, when it is the secret in use. An empty
    /// secret is refused (false).
    ///
    /// Derives the new secret's keys before it swaps them in with it (Argon2id: tens of ms,
    /// 19 MiB), so the handshakes and admin reads after it find them: call it where blocking is
    /// allowed (a reload runs on the blocking pool, `web::block`); a test's call from an async
    /// one costs that once. The old secret's keys go with it.
    pub fn set_secret(&self, secret: &str) -> bool {
        if secret.is_empty() || self.shared.stopped.load(Ordering::SeqCst) {
            return false;
        }
        if self.shared.secret().secret.as_slice() == secret.as_bytes() {
            return false;
        }
        if let Some(w) = crate::config::cluster_secret_warning(secret) {
            tracing::warn!("{w}");
        }
        let keys = handshake::ClusterKeys::derive(secret.as_bytes(), &self.shared.settings.cluster_name);
        self.shared.set_secret(secret.as_bytes().to_vec(), Arc::new(keys))
    }

    /// What this node knows of the cluster. The directory is read a slice at a time (not
    /// one snapshot: a row may be a little older than another).
    pub fn status(&self) -> ClusterStatus {
        let mut directory = Vec::new();
        self.each_directory_page(|rows| directory.extend(rows));
        directory.sort_by(|a, b| a.conn.cmp(&b.conn));
        ClusterStatus {
            node: self.shared.settings.node_id.clone(),
            peers: self.peers(),
            directory,
            counters: self.shared.counters.snapshot(),
        }
    }

    /// The directory a slice at a time, the lock released between slices.
    fn each_directory_page(&self, mut f: impl FnMut(Vec<Entry>)) {
        let mut shard = Some(0);
        while let Some(s) = shard {
            let (rows, next) = self.shared.state.lock().dir.entries_page(s);
            f(rows);
            shard = next;
        }
    }

    /// Sessions per node in the directory (what the status page shows; [`ClusterHandle::status`]
    /// copies every entry).
    pub fn sessions_per_node(&self) -> std::collections::BTreeMap<String, usize> {
        let mut per = std::collections::BTreeMap::new();
        self.each_directory_page(|rows| {
            for e in rows {
                *per.entry(e.node).or_default() += 1;
            }
        });
        per
    }

    /// The counters of [`ClusterHandle::status`], alone.
    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    /// The peers of [`ClusterHandle::status`], without the directory: what a caller that
    /// counts links needs.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        let st = self.shared.state.lock();
        let mut peers: Vec<PeerStatus> = st
            .peers
            .iter()
            .map(|(id, slot)| {
                let v = st.members.view(id).unwrap_or_default();
                PeerStatus {
                    id: id.clone(),
                    addr: slot.addr,
                    connected: slot.link.is_some(),
                    up: v.up,
                    last_heartbeat_age_ms: v
                        .last_heard
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    rtt_ms: v.rtt.map(|d| d.as_secs_f64() * 1000.0),
                    handshake_attempted: v.attempted,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        peers
    }

    /// True once every configured peer was tried at least once (for `/ready`).
    pub fn handshake_attempted(&self) -> bool {
        self.shared.state.lock().members.all_attempted()
    }

    /// Graceful exit: every peer gets `Leave` (and drops our sessions at once), then
    /// everything stops as in [`ClusterHandle::shutdown`].
    pub async fn leave(&self) {
        let asked = self.shared.begin_leave();
        tracing::info!(links = asked, "leaving the cluster");
        let deadline = tokio::time::Instant::now() + LEAVE_GRACE;
        // Handshakes first: one that ends after this read is installed (counted by
        // `links_open`) or has already carried its `Leave`.
        while self.shared.handshakes() > 0 || self.shared.links_open() > 0 {
            let ended = self.shared.link_ended().notified();
            if tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = ended => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            })
            .await
            .is_err()
            {
                tracing::warn!("links or handshakes still open when the leave's grace ran out");
                break;
            }
        }
        self.shutdown().await;
    }

    /// Stops accepting, dialing and heartbeating, closes every link (peers notice via EOF and
    /// the failure timeout), and waits for the tasks to end (bounded). Idempotent.
    pub async fn shutdown(&self) {
        self.shared.signal_shutdown();
        let rx = self.shared.all_done.lock().take();
        if let Some(mut rx) = rx {
            if tokio::time::timeout(SHUTDOWN_GRACE, rx.recv()).await.is_err() {
                tracing::warn!("cluster tasks did not stop within the grace period");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ClusterConfig {
        ClusterConfig::new(
            "n1",
            "c",
            "s",
            vec![PeerConfig {
                id: "n2".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
            }],
        )
    }

    #[test]
    fn validate_catches_bad_configs() {
        assert!(cfg().validate().is_ok());
        let mut c = cfg();
        c.peers.push(c.peers[0].clone());
        assert!(c.validate().unwrap_err().contains("twice"));
        let mut c = cfg();
        c.peers[0].id = "n1".into();
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.failure_timeout = c.heartbeat_interval;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.max_frame = proto::MAX_FRAME_CEILING + 1;
        assert!(c.validate().is_err());
        let mut c = cfg();
        c.secret.clear();
        assert!(c.validate().is_err());
        // A channel of more than `usize::MAX >> 3` slots panics when the link task makes it.
        let mut c = cfg();
        c.peer_queue = usize::MAX;
        assert!(c.validate().unwrap_err().contains("peer_queue"));
        c.peer_queue = ClusterConfig::MAX_PEER_QUEUE;
        assert!(c.validate().is_ok());
    }

    /// A socket that sits silent on the cluster port, or a peer whose address takes no
    /// connection, is no handshake a leave waits for: only one whose `Hello` named a configured
    /// peer, or a dial that reached its peer, is counted.
    #[tokio::test]
    async fn a_silent_socket_is_no_handshake_a_leave_waits_for() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let h = ClusterHandle::start(cfg(), l, tx).await.unwrap();
        let mut stranger = tokio::net::TcpStream::connect(addr).await.unwrap();
        // n1 took the socket and began its side: it wrote its `Hello`.
        stranger.read_exact(&mut [0u8; 1]).await.unwrap();
        assert_eq!(h.shared.handshakes(), 0);
        h.shutdown().await;
    }

    /// Keys are derived at start and on a reload that changes the secret, nowhere else: not by
    /// a handshake that read the secret before the reload (before, it missed a cache the reload
    /// had emptied and derived again, one Argon2id per such socket, and put the old secret's
    /// keys back), nor by one after it, nor by an admin read.
    #[tokio::test]
    async fn handshakes_and_admin_reads_across_a_reload_derive_nothing() {
        use handshake::{run_with_keys, ClusterKeys, Local, Role};
        const CLUSTER: &str = "derive-count";
        let (old, new) = ("an-old-cluster-secret", "a-new-cluster-secret");
        let (old_keys, new_keys) = (
            ClusterKeys::derive(old.as_bytes(), CLUSTER),
            ClusterKeys::derive(new.as_bytes(), CLUSTER),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let mut c = cfg();
        c.cluster_name = CLUSTER.into();
        c.secret = old.into();
        let before = handshake::derivations(CLUSTER);
        let h = ClusterHandle::start(c.clone(), l, tx).await.unwrap();
        assert_eq!(handshake::derivations(CLUSTER), before + 1, "at start");
        let n2 = |secret: &'static str| Local {
            cluster: CLUSTER,
            node: "n2",
            secret: secret.as_bytes(),
            max_frame: c.max_frame,
        };

        // A socket whose handshake read the old secret (n1 sent its `Hello`), then a reload.
        let mut early = tokio::net::TcpStream::connect(addr).await.unwrap();
        early.peek(&mut [0u8; 1]).await.unwrap();
        assert!(h.set_secret(new));
        assert_eq!(handshake::derivations(CLUSTER), before + 2, "the reload's");
        // It runs to its end with the old keys (and installs no link: the generation moved).
        let r = run_with_keys(&mut early, &n2(old), &old_keys, Role::Dialer, Some("n1"), |n| n == "n1").await;
        assert!(r.is_ok(), "{r:?}");
        // A handshake begun after the reload proves the new secret.
        let mut late = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = run_with_keys(&mut late, &n2(new), &new_keys, Role::Dialer, Some("n1"), |n| n == "n1").await;
        assert!(r.is_ok(), "{r:?}");
        // Admin reads, both ways, with the new keys.
        let theirs = admin_read::sign(&new_keys, "n2", "n1", peer::unix_ms(), "/status");
        assert_eq!(h.verify_admin_read(&theirs, "/status").as_deref(), Some("n2"));
        let ours = h.sign_admin_read("n2", "/status");
        assert!(admin_read::verify(&ours, &new_keys, "n2", "/status", peer::unix_ms(), |n| n == "n1").is_some());
        assert_eq!(handshake::derivations(CLUSTER), before + 2, "nothing more");
        // The old secret's keys are gone from the node's state.
        assert_eq!(h.shared.secret().keys.psk(), new_keys.psk());
        h.shutdown().await;
    }
}
