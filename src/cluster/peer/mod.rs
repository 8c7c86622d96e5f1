//! The tokio side of the cluster: the listener, one dialer per configured peer, one task per
//! link (reader + writer + heartbeats), the failure-detector tick, and the shared core that
//! feeds the pure state machines and carries out their effects.
//!
//! Owns: sockets, timers, per-link bounded queues, counters, task lifetimes. Must not decide
//! anything the state machines decide (liveness, link choice, ownership): it only translates
//! frames and timers into their events and their effects into I/O and [`ClusterEvent`]s.
//!
//! Locking: one `parking_lot::Mutex<State>` guards the directory, membership and the link
//! handles. It is held only for synchronous work (state updates, `try_send` into queues),
//! never across an `.await`, and never for work that grows with the directory: the registry
//! actor and every forward on the HTTP workers wait on it as OS threads. A peer's resync, the
//! removal of a failed peer's claims and the snapshot a link starts with go [`DIR_SLICE`]
//! claims per hold (the directory's sliced events), releasing the lock fairly in between.
//! Enqueuing a directory frame happens under it, and a link is installed (so gets every frame
//! enqueued afterwards) before its snapshot is read: "snapshot, then the changes queued after
//! it" holds, a change made while the snapshot is read being sent in it, after it, or both.
//!
//! Files: `connect.rs` (the listener and the dialers: sockets to authenticated links),
//! `link_task.rs` (one link's reader, writer and heartbeats); this file holds the shared core.

mod admission;
mod connect;
mod link_task;
mod room;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

use super::directory::{DirEffect, DirEvent, Directory};
use super::handshake::{ClusterKeys, HandshakeError};
use super::membership::{LinkId, MemberEffect, MemberEvent, Membership};
use super::proto::Frame;
use super::{ClusterEvent, PeerConfig};
use connect::dial_loop;

pub(crate) use connect::accept_loop;
pub use link_task::resync_chunks;
pub(crate) use room::{HeldRoom, PeerRoom, HELD_PER_MESSAGE};

/// Frames of this node's `Deliver`s (`max_frame` bytes each) that may wait in one peer's send
/// queue, in bytes: `peer_queue` bounds the queue in frames, and a `Deliver` may take up to
/// `max_frame` (1 MiB by default), so a peer whose link stops reading (its wallets' sockets
/// stalled) would otherwise have this node hold `peer_queue` of them (4 GiB at the defaults).
/// The peer itself takes no more than [`room::DELIVER_BUDGET_FRAMES`] frames of them into its
/// room at a time (then its link waits): more queued here would only wait behind them. Past
/// it, `hand_off` refuses and the caller releases the messages to the store, as for a full
/// queue. Kept in the peer's slot, across its links.
pub(crate) const SEND_BUDGET_FRAMES: usize = room::DELIVER_BUDGET_FRAMES;

/// Connections accepted but not yet authenticated, at most (a flood of idle sockets must not
/// starve real peers of file descriptors or tasks; `admission.rs` decides who waits).
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Frames written before one flush, at most (keeps heartbeats timely under load).
const WRITE_BATCH: usize = 64;
/// First reconnect delay; doubles up to `BACKOFF_CAP`, with jitter.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Claims a resync, a sweep or a snapshot handles per hold of the cluster lock, at most:
/// under 1 ms in a release build at the ~2.7 us a claim of a resync costs
/// (docs/BENCHMARKS.md), where one resync of a million claims held it for seconds. The
/// slices' own cost (a lock, a yield) is noise beside that.
pub(crate) const DIR_SLICE: usize = 256;

/// Settings resolved from `ClusterConfig` at start.
pub(crate) struct Settings {
    pub node_id: String,
    pub cluster_name: String,
    pub heartbeat_interval: Duration,
    pub failure_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_frame: usize,
    pub peer_queue: usize,
    pub max_peer_claims: usize,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub notifications_sent: AtomicU64,
    pub notifications_received: AtomicU64,
    pub notifications_failed: AtomicU64,
    pub frames_rejected: AtomicU64,
    pub auth_failures: AtomicU64,
    pub version_mismatches: AtomicU64,
    pub queue_drops: AtomicU64,
    pub events_dropped: AtomicU64,
    pub routes_changed_received: AtomicU64,
    pub handoffs_sent: AtomicU64,
    pub handoffs_received: AtomicU64,
    pub handoffs_failed: AtomicU64,
    pub handoffs_unconfirmed: AtomicU64,
    pub handshakes_evicted: AtomicU64,
    pub link_waits: AtomicU64,
    pub handoffs_refused: AtomicU64,
    pub claims_ahead: AtomicU64,
}

/// A snapshot of the link's counters (`Counters`) for status output.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub notifications_sent: u64,
    pub notifications_received: u64,
    pub notifications_failed: u64,
    pub frames_rejected: u64,
    pub auth_failures: u64,
    /// Peers refused because they speak another cluster protocol version (also counted in
    /// `auth_failures`): a node of an older or newer release in the cluster.
    pub version_mismatches: u64,
    /// Frames dropped because a peer's send queue was full (directory frames are recovered
    /// by a resync; notifications by the sweep).
    pub queue_drops: u64,
    /// `ClusterEvent::MessageQueued` dropped because the node's event channel was full.
    pub events_dropped: u64,
    /// `RoutesChanged` frames received (peers' keylist removals: cached routes forgotten).
    pub routes_changed_received: u64,
    /// Messages sent to the node of their wallet's live session in `Deliver` frames, and
    /// received in them from peers.
    pub handoffs_sent: u64,
    pub handoffs_received: u64,
    /// Messages whose `Deliver` frame could not be queued (no link, queue full, over
    /// `max_frame`, the peer's send budget of 8 frames spent: its link is not read) or sent:
    /// the sender released them and woke the owner as for any new message.
    pub handoffs_failed: u64,
    /// Messages in `Deliver` frames written to a link that ended before the peer answered a
    /// later ping: the peer may never have read them, so the sender released them (a release
    /// gives back only what is still leased to the peer's hand-off owner).
    pub handoffs_unconfirmed: u64,
    /// Pending inbound handshakes closed to make room for a newer connection: the source
    /// address held too many unnamed, or the table was full (a flood of idle sockets on the
    /// cluster port, when it grows). A newer `Hello` takes no handshake's place: it proves
    /// nothing.
    pub handshakes_evicted: u64,
    /// Times a link stopped reading until this node had room for what its peer sent: the
    /// messages of `Deliver` frames not yet taken by their sessions held the peer's budget
    /// (`room::DELIVER_BUDGET_FRAMES` frames), or the node's event queue was full. The peer's
    /// queue to this node fills meanwhile and it falls back to the store, as on a full link;
    /// a wait past the failure timeout closes the link.
    pub link_waits: u64,
    /// Messages of peers' `Deliver` frames for a connection already holding its share of the
    /// peer's room on this node (its session slow to take them): released to the store at
    /// once (the wallet woken, its session drains them), not waited for.
    pub handoffs_refused: u64,
    /// Peers' claims (`Own` frames, claims of resyncs) ignored for an epoch over a day ahead
    /// of this node's clock (`directory::plausible_epoch`; also counted in
    /// `frames_rejected`): a peer whose clock runs ahead, or, when they come from every peer,
    /// this node's clock running behind (its sessions' wallets are then not reached from the
    /// others' nodes). Logged as a warning at most once a minute per link, and as an error
    /// once per link when every claim of a peer's resync is so.
    pub claims_ahead: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            notifications_sent: g(&self.notifications_sent),
            notifications_received: g(&self.notifications_received),
            notifications_failed: g(&self.notifications_failed),
            frames_rejected: g(&self.frames_rejected),
            auth_failures: g(&self.auth_failures),
            version_mismatches: g(&self.version_mismatches),
            queue_drops: g(&self.queue_drops),
            events_dropped: g(&self.events_dropped),
            routes_changed_received: g(&self.routes_changed_received),
            handoffs_sent: g(&self.handoffs_sent),
            handoffs_received: g(&self.handoffs_received),
            handoffs_failed: g(&self.handoffs_failed),
            handoffs_unconfirmed: g(&self.handoffs_unconfirmed),
            handshakes_evicted: g(&self.handshakes_evicted),
            link_waits: g(&self.link_waits),
            handoffs_refused: g(&self.handoffs_refused),
            claims_ahead: g(&self.claims_ahead),
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// How often a link warns of peers' claims from over a day ahead ([`CounterSnapshot::claims_ahead`]):
/// a node whose clock is behind gets one with every session a peer opens.
pub(crate) const AHEAD_WARN_EVERY: Duration = Duration::from_secs(60);

/// A frame queued for a link, with the room a `Deliver` holds in its peer's send budget
/// ([`SEND_BUDGET_FRAMES`]): given back when the frame is dropped, once written (or given up).
pub(crate) struct Outgoing {
    pub frame: Frame,
    _room: Option<OwnedSemaphorePermit>,
}

impl From<Frame> for Outgoing {
    fn from(frame: Frame) -> Outgoing {
        Outgoing { frame, _room: None }
    }
}

/// The installed link of a peer, as seen by everyone but its own task.
pub(crate) struct LinkHandle {
    pub id: LinkId,
    pub tx: mpsc::Sender<Outgoing>,
    /// Set when a directory frame could not be queued: the writer then replaces the queued
    /// directory frames with a full resync.
    resync: Arc<Notify>,
    /// Asks the writer to flush, send `Leave` and end the link.
    leave: Arc<Notify>,
    /// Dropped with the handle: ends the link task.
    _close: oneshot::Sender<()>,
}

pub(crate) struct PeerSlot {
    pub addr: SocketAddr,
    pub link: Option<LinkHandle>,
    /// Room for the peer's hand-offs waiting here, kept across its links.
    pub room: Arc<room::PeerRoom>,
    /// Room for this node's hand-offs waiting in the peer's send queue, in bytes
    /// ([`SEND_BUDGET_FRAMES`]), kept across its links (a frame moved from a replaced link
    /// to the new one keeps its room).
    pub sending: Arc<Semaphore>,
    /// Dropped when the peer is removed from the config: stops its dialer.
    _dialer_stop: watch::Sender<()>,
}

pub(crate) struct State {
    pub dir: Directory,
    pub members: Membership,
    pub peers: HashMap<String, PeerSlot>,
    pub last_epoch: u64,
    /// `leave()` or `shutdown()` was called: accept and dial nothing any more.
    pub left: bool,
    /// `leave()` was called: a link that comes up from now on carries a `Leave`. After a
    /// shutdown alone (which stands for a crash) it carries nothing.
    pub leaving: bool,
    /// The cluster secret a handshake started now proves ([`Shared::set_secret`]).
    pub secret: Arc<zeroize::Zeroizing<Vec<u8>>>,
    /// Its keys, derived before they were set here: handshakes and admin reads take them from
    /// here and derive nothing.
    pub keys: Arc<ClusterKeys>,
    /// Bumped when the secret changes: a handshake that started with an older one installs no
    /// link.
    pub secret_gen: u64,
    /// Operator close requests of the last [`RECENT_CLOSE_TTL`], sent again on every link that
    /// comes up: a peer that was cut off when one was made, or whose link died with it queued,
    /// still closes those sessions once it is back. Repeating one is harmless.
    pub recent_closes: VecDeque<(Instant, Frame)>,
    /// Peers this node takes over from (failed, or whose resync dropped claims), whose claims
    /// are being swept: the sessions left with no owner so far. [`ClusterEvent::SessionsLost`]
    /// goes out when the sweep ends, if it left any (or leases are to be released).
    pub lost: HashMap<String, Lost>,
    /// Peers found down whose take-over fell to another node (a lower id up then), with what
    /// they left, for [`UNCLAIMED_KEPT_TIMEOUTS`] failure timeouts: should that node fail too
    /// before it took them over, nobody else would, and once this node takes over
    /// ([`Shared::take_over_unclaimed`]) it takes them over as well. One per configured peer,
    /// with no more conns than the peer's claims.
    pub unclaimed: HashMap<String, Unclaimed>,
}

/// What a failed peer left, gathered while its claims are swept.
#[derive(Default)]
pub(crate) struct Lost {
    pub conns: Vec<String>,
    pub release_leases: bool,
}

/// What a failed peer taken over elsewhere left ([`State::unclaimed`]): when this node found it
/// down, and the sessions its sweep left with no owner.
pub(crate) struct Unclaimed {
    since: Instant,
    conns: Vec<String>,
}

/// Failure timeouts a peer's [`Unclaimed`] record is kept. The node it fell to finds the peer
/// down about when this one does (both time the same silence, a heartbeat or a tick apart),
/// then takes it over in a sweep and a few store calls: one still up this long after did it,
/// one found down sooner may not have (a take-over done twice is harmless: the releases find
/// nothing left, the wallets may be pushed twice).
const UNCLAIMED_KEPT_TIMEOUTS: u32 = 4;

/// How long an operator close request is repeated to peers whose link comes up.
pub const RECENT_CLOSE_TTL: Duration = Duration::from_secs(600);
/// Close requests kept for repetition at most (the oldest are forgotten first).
pub const RECENT_CLOSE_MAX: usize = 1024;

/// A handshake in progress ([`Shared::handshaking`]), counted until its link is installed,
/// refused, or told `Leave`. `ClusterHandle::leave` waits for these as for open links: when both
/// nodes dialled at once, the peer may install the link still in its handshake here and ignore
/// the `Leave` sent on the other, and a stop that cut that handshake off would leave the peer to
/// find this node down only at its failure timeout.
pub(super) struct Handshaking(Arc<Shared>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::SeqCst);
        self.0.link_ended.notify_waiters();
    }
}

pub(crate) struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    pub counters: Counters,
    events: mpsc::Sender<ClusterEvent>,
    next_link: AtomicU64,
    /// Handshakes in progress ([`Handshaking`]).
    handshakes: AtomicUsize,
    /// Woken when a link ends (dialers waiting for "no link" re-check).
    link_ended: Notify,
    /// Woken when directory sweeps are left to [`sweeper`].
    sweep_wanted: Notify,
    shutdown_tx: watch::Sender<bool>,
    pub shutdown_rx: watch::Receiver<bool>,
    /// Cloned into every task; `shutdown` waits until every clone is gone (mini-redis style).
    task_done: Mutex<Option<mpsc::Sender<()>>>,
    pub all_done: Mutex<Option<mpsc::Receiver<()>>>,
    pub stopped: AtomicBool,
    started: Instant,
    /// The runtime `start` ran on. Every task goes there, whichever thread calls the handle
    /// (an actix arbiter's runtime, or no runtime at all).
    rt: tokio::runtime::Handle,
    /// Events waiting for room in the node's channel, each in a task of its own
    /// ([`Shared::emit`]).
    emit_waiting: Arc<AtomicUsize>,
    /// When inbound connections refused so were last logged as a warning, and how many since
    /// ([`Shared::warn_refused_now`]).
    refused_warned: Mutex<RefusalWarnings>,
}

/// Events that wait for room in the node's full event channel, past which the ownership
/// changes a peer's frames bring are dropped ([`Shared::emit`]).
const EMIT_WAITING_MAX: usize = 4096;

/// Refused inbound connections are logged as warnings at most this often for each kind of
/// refusal (the others at debug, counted in the counters and in the next warning): anyone who
/// can reach the cluster port can have one refused per connection it opens. By kind, so that a
/// flood of strangers does not hide a configured peer refused for its secret or version.
pub(super) const REFUSED_WARN_EVERY: Duration = Duration::from_secs(10);

/// The same for connections from a configured peer's address, per address and kind: a peer
/// refused for its secret or version is seen within a second, whoever floods the port, and
/// a flood from its address (any process on its machine, its NAT) makes a line a second, not
/// one per connection.
pub(super) const PEER_REFUSED_WARN_EVERY: Duration = Duration::from_secs(1);

/// Why an inbound connection was refused, as its warnings are rate-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Refusal {
    /// Its handshake failed so.
    Handshake(std::mem::Discriminant<HandshakeError>),
    /// Every pending handshake it could have taken the place of was a configured peer's
    /// (`admission.rs`).
    NoSlot,
}

impl From<&HandshakeError> for Refusal {
    fn from(e: &HandshakeError) -> Refusal {
        Refusal::Handshake(std::mem::discriminant(e))
    }
}

/// When refused inbound connections were last warned of, per key: (the source address, for a
/// configured peer's; kind). Holds at most the kinds times one more than the configured
/// peers' addresses (those of peers removed since stay, a few bytes each).
#[derive(Default)]
pub(super) struct RefusalWarnings {
    last: HashMap<(Option<IpAddr>, Refusal), (Instant, u64)>,
}

impl RefusalWarnings {
    /// Whether a connection from `from` (`peer`: a configured peer's address) refused for
    /// `why` at `now` is warned of: the first of its kind from that peer's address in
    /// [`PEER_REFUSED_WARN_EVERY`], or from any other address in [`REFUSED_WARN_EVERY`]. With
    /// how many were refused so since the last warning, without one.
    fn note(&mut self, from: IpAddr, peer: bool, why: Refusal, now: Instant) -> Option<u64> {
        let (key, every) = if peer {
            ((Some(from), why), PEER_REFUSED_WARN_EVERY)
        } else {
            ((None, why), REFUSED_WARN_EVERY)
        };
        match self.last.get_mut(&key) {
            Some((at, since)) if now.saturating_duration_since(*at) < every => {
                *since += 1;
                None
            }
            Some((at, since)) => {
                *at = now;
                Some(std::mem::take(since))
            }
            None => {
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// The cluster secret in use, its generation and its keys, read at once ([`Shared::secret`]).
pub struct SecretNow {
    pub gen: u64,
    pub secret: Arc<zeroize::Zeroizing<Vec<u8>>>,
    pub keys: Arc<ClusterKeys>,
}

impl Shared {
    /// Must be called from within a tokio runtime (`ClusterHandle::start` is async).
    pub fn new(
        settings: Settings,
        secret: Vec<u8>,
        keys: Arc<ClusterKeys>,
        peers: &[PeerConfig],
        events: mpsc::Sender<ClusterEvent>,
    ) -> Arc<Shared> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        let state = State {
            dir: Directory::new(settings.node_id.clone()),
            members: Membership::new(settings.node_id.clone(), settings.failure_timeout)
                .with_heartbeat(settings.heartbeat_interval),
            peers: HashMap::new(),
            last_epoch: 0,
            left: false,
            leaving: false,
            secret: Arc::new(zeroize::Zeroizing::new(secret)),
            keys,
            secret_gen: 0,
            recent_closes: VecDeque::new(),
            lost: HashMap::new(),
            unclaimed: HashMap::new(),
        };
        let shared = Arc::new(Shared {
            settings,
            state: Mutex::new(state),
            counters: Counters::default(),
            events,
            next_link: AtomicU64::new(1),
            handshakes: AtomicUsize::new(0),
            link_ended: Notify::new(),
            sweep_wanted: Notify::new(),
            shutdown_tx,
            shutdown_rx,
            task_done: Mutex::new(Some(done_tx)),
            all_done: Mutex::new(Some(done_rx)),
            stopped: AtomicBool::new(false),
            started: Instant::now(),
            rt: tokio::runtime::Handle::current(),
            emit_waiting: Arc::default(),
            refused_warned: Mutex::default(),
        });
        shared.add_peers(peers);
        shared
    }

    /// Whether an inbound connection from `from` refused for `why` is logged as a warning:
    /// the first of its kind from that configured peer's address in
    /// [`PEER_REFUSED_WARN_EVERY`] (a peer refused for its secret or version must be seen,
    /// whoever floods the port), or from any other address in [`REFUSED_WARN_EVERY`]. With
    /// how many were refused so since the last warning (counted in the counters all the same).
    pub(super) fn warn_refused_now(&self, from: IpAddr, why: Refusal) -> Option<u64> {
        let from = from.to_canonical();
        let peer = self
            .state
            .lock()
            .peers
            .values()
            .any(|p| p.addr.ip().to_canonical() == from);
        self.refused_warned.lock().note(from, peer, why, Instant::now())
    }

    /// Spawns a task that `shutdown` will wait for. After shutdown began, does nothing.
    pub fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(done) = self.task_done.lock().clone() else {
            return;
        };
        self.rt.spawn(async move {
            fut.await;
            drop(done);
        });
    }

    /// Signals every task to stop and closes all links (peers see EOF, no `Leave`).
    pub fn signal_shutdown(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.shutdown_tx.send(true);
        self.task_done.lock().take();
        let mut st = self.state.lock();
        st.left = true;
        for slot in st.peers.values_mut() {
            slot.link = None;
        }
    }

    // ---- configuration ----------------------------------------------------------------

    /// Adds peers (slots, membership, dialers). Existing ids only get their address updated.
    pub fn add_peers(self: &Arc<Self>, peers: &[PeerConfig]) {
        let now = Instant::now();
        let mut to_dial = Vec::new();
        {
            let mut st = self.state.lock();
            for p in peers {
                if p.id == self.settings.node_id {
                    continue;
                }
                if let Some(slot) = st.peers.get_mut(&p.id) {
                    slot.addr = p.addr;
                    continue;
                }
                let (stop_tx, stop_rx) = watch::channel(());
                st.peers.insert(
                    p.id.clone(),
                    PeerSlot {
                        addr: p.addr,
                        link: None,
                        room: room::PeerRoom::new(self.settings.max_frame),
                        sending: Arc::new(Semaphore::new(SEND_BUDGET_FRAMES * self.settings.max_frame)),
                        _dialer_stop: stop_tx,
                    },
                );
                st.members.handle(MemberEvent::Added { peer: p.id.clone() }, now);
                to_dial.push((p.id.clone(), stop_rx));
            }
        }
        for (id, stop) in to_dial {
            let me = self.clone();
            self.spawn(dial_loop(me, id, stop));
        }
    }

    /// Replaces the peer set: adds new peers, removes missing ones (closing their link and
    /// forgetting their sessions), leaves the others' links untouched.
    /// The secret a handshake started now proves, its generation (for
    /// [`link_task::run_link`]: a link whose handshake proved an older one is not installed)
    /// and its keys: one snapshot.
    pub fn secret(&self) -> SecretNow {
        let st = self.state.lock();
        SecretNow {
            gen: st.secret_gen,
            secret: st.secret.clone(),
            keys: st.keys.clone(),
        }
    }

    /// Replaces the cluster secret (a reload of a rotated one): handshakes from now on prove
    /// the new one, every link up now (opened with the old one) is closed, and a handshake
    /// still running with the old one installs no link, so that a holder of the old secret (a
    /// node removed from the cluster, say) keeps no way in; peers link again once they have
    /// the new secret too. False, and nothing done, when it is the same secret. `keys` are the
    /// new secret's, derived by the caller: the old ones are dropped here with the old secret.
    pub fn set_secret(&self, secret: Vec<u8>, keys: Arc<ClusterKeys>) -> bool {
        let mut st = self.state.lock();
        if st.secret.as_slice() == secret.as_slice() {
            return false;
        }
        st.secret = Arc::new(zeroize::Zeroizing::new(secret));
        st.keys = keys;
        st.secret_gen += 1;
        for (peer, slot) in st.peers.iter_mut() {
            // Dropping the handle ends the link task (its end is handled as any link's).
            if slot.link.take().is_some() {
                info!(peer = %peer, "cluster link closed: the cluster secret changed");
            }
        }
        true
    }

    pub fn update_peers(self: &Arc<Self>, peers: &[PeerConfig]) {
        let now = Instant::now();
        {
            let mut st = self.state.lock();
            let removed: Vec<String> = st
                .peers
                .keys()
                .filter(|id| !peers.iter().any(|p| &p.id == *id))
                .cloned()
                .collect();
            for id in removed {
                info!(peer = %id, "cluster peer removed from config");
                let fx = st.members.handle(MemberEvent::Removed { peer: id.clone() }, now);
                self.apply_member_effects(&mut st, fx);
                self.forget(&mut st, &id);
                // Dropping the slot closes its link and stops its dialer.
                st.peers.remove(&id);
            }
        }
        self.add_peers(peers);
    }

    // ---- effects ----------------------------------------------------------------------

    pub fn emit(&self, ev: ClusterEvent) {
        match self.events.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                if matches!(ev, ClusterEvent::MessageQueued { .. }) {
                    // A wake-up only: the sweep covers it.
                    bump(&self.counters.events_dropped);
                    debug!("cluster event channel full, notification dropped");
                } else {
                    // Membership and ownership changes are rare and matter: wait for room,
                    // off the caller's path (may reorder with later events). A peer's frames
                    // can make ownership changes as fast as it writes them (an `Own` and a
                    // `Disown` of a session held here, again and again): past a bound those
                    // are dropped, as a wake-up is, rather than each holding a task (the
                    // session they would stop gives back what it holds when it ends). The
                    // others always wait: there are as many as links go down, and as this
                    // node's own hand-offs come back.
                    let droppable = matches!(ev, ClusterEvent::SessionMoved { .. });
                    let waiting = self.emit_waiting.fetch_add(1, Ordering::SeqCst);
                    if waiting >= EMIT_WAITING_MAX && droppable {
                        self.emit_waiting.fetch_sub(1, Ordering::SeqCst);
                        bump(&self.counters.events_dropped);
                        debug!("cluster event channel full, {waiting} events waiting for it: event dropped");
                        return;
                    }
                    let (tx, count) = (self.events.clone(), self.emit_waiting.clone());
                    self.rt.spawn(async move {
                        let _ = tx.send(ev).await;
                        count.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn apply_dir_effects(&self, fx: Vec<DirEffect>) {
        for e in fx {
            match e {
                DirEffect::SessionMoved { conn, node } => self.emit(ClusterEvent::SessionMoved { conn, node }),
                // Only sweeps orphan conns, and `sweep_step` reads those.
                DirEffect::Orphaned { .. } => {}
            }
        }
    }

    /// Drops every claim of `node`: the first slice now (a small directory is done at once),
    /// the rest by [`sweeper`].
    fn forget(&self, st: &mut State, node: &str) {
        st.dir.apply(DirEvent::Forget { node: node.to_string() });
        self.sweep_first(st, node);
    }

    /// The first step of `node`'s sweep now, the rest left to [`sweeper`].
    fn sweep_first(&self, st: &mut State, node: &str) {
        self.sweep_step(st, node);
        if st.dir.sweeping(node) {
            self.sweep_wanted.notify_one();
        }
    }

    /// Removes up to [`DIR_SLICE`] stale claims of `node`. When that ends the sweep of a
    /// failed peer this node takes over from, tells the node what the peer left.
    fn sweep_step(&self, st: &mut State, node: &str) {
        let fx = st.dir.apply(DirEvent::Sweep {
            node: node.to_string(),
            max: DIR_SLICE,
        });
        for e in fx {
            if let DirEffect::Orphaned { conn, .. } = e {
                if let Some(lost) = st.lost.get_mut(node) {
                    lost.conns.push(conn);
                } else if let Some(left) = st.unclaimed.get_mut(node) {
                    left.conns.push(conn);
                }
            }
        }
        if !st.dir.sweeping(node) {
            self.tell_lost(st, node);
        }
    }

    /// Tells the node what `node`, taken over here and its claims all swept, left.
    fn tell_lost(&self, st: &mut State, node: &str) {
        if let Some(lost) = st.lost.remove(node).filter(|l| l.release_leases || !l.conns.is_empty()) {
            self.emit(ClusterEvent::SessionsLost {
                node: node.to_string(),
                conns: lost.conns,
                release_leases: lost.release_leases,
            });
        }
    }

    /// This node takes over now (every lower id is down): the peers found down before, whose
    /// take-over fell to one of those, are taken over here too, as that node may have failed
    /// before it did (found down a moment after them: a correlated failure). Their wallets are
    /// woken; their leases are left to run out: this node found the peer down alone, maybe
    /// across a link cut between the two while the peer lives on for the rest of the cluster,
    /// and a release would deliver again what the peer's live sessions are delivering.
    fn take_over_unclaimed(&self, st: &mut State) {
        let keep = self.settings.failure_timeout.saturating_mul(UNCLAIMED_KEPT_TIMEOUTS);
        for (node, left) in std::mem::take(&mut st.unclaimed) {
            // Up again: it restarted and released its own leases; taking it over would take
            // those of its new sessions.
            if left.since.elapsed() > keep || st.members.is_up(&node) {
                continue;
            }
            info!(peer = %node, "cluster peer found down earlier, its take-over left to a node down now: taken over here");
            let lost = st.lost.entry(node.clone()).or_default();
            lost.conns.extend(left.conns);
            // A sweep still running tells when it ends, with the rest of its conns.
            if !st.dir.sweeping(&node) {
                self.tell_lost(st, &node);
            }
        }
    }

    /// Carries out membership effects other than `Install`/`Reject` (handled by the link
    /// task that caused them).
    fn apply_member_effects(&self, st: &mut State, fx: Vec<MemberEffect>) {
        for e in fx {
            match e {
                MemberEffect::Close { peer, link } => {
                    if let Some(slot) = st.peers.get_mut(&peer) {
                        if slot.link.as_ref().is_some_and(|l| l.id == link) {
                            // Dropping the handle ends the link task.
                            slot.link = None;
                        }
                    }
                }
                MemberEffect::Up { peer } => {
                    info!(peer = %peer, "cluster peer up");
                    st.unclaimed.remove(&peer);
                    self.emit(ClusterEvent::PeerUp { node: peer });
                }
                MemberEffect::Down { peer } => {
                    info!(peer = %peer, "cluster peer down");
                    st.dir.apply(DirEvent::Forget { node: peer.clone() });
                    self.emit(ClusterEvent::PeerDown {
                        node: peer.clone(),
                        taken_over_here: st.members.takes_over(),
                    });
                    // Forwards queued while the peer was failing were notified to it (or to
                    // nobody, its link gone) and woke no one, and what its sessions were
                    // delivering stays leased to it: one node takes over its leases and its
                    // wallets left without a session anywhere (the conns whose last claim its
                    // sweep removes), told when the sweep ends.
                    if st.members.takes_over() {
                        st.unclaimed.remove(&peer);
                        let release_leases = st.members.sees_half();
                        st.lost.entry(peer.clone()).or_default().release_leases |= release_leases;
                        self.sweep_first(st, &peer);
                        self.take_over_unclaimed(st);
                    } else {
                        // Another node takes over: what an earlier resync of the peer left to
                        // tell (its sweep still running) is that node's to tell now. This one
                        // keeps it, and what the sweep leaves, in case that node fails first.
                        let conns = st.lost.remove(&peer).map(|l| l.conns).unwrap_or_default();
                        let since = Instant::now();
                        st.unclaimed.insert(peer.clone(), Unclaimed { since, conns });
                        self.sweep_first(st, &peer);
                    }
                }
                MemberEffect::Install { .. } | MemberEffect::Reject { .. } => {}
            }
        }
    }

    /// Runs the directory sweeps left to it, a slice per lock hold, until there are none.
    pub async fn sweeper(self: Arc<Self>) {
        let mut shutdown = self.shutdown_rx.clone();
        loop {
            tokio::select! {
                _ = self.sweep_wanted.notified() => {}
                _ = shutdown.changed() => return,
            }
            loop {
                {
                    let mut st = self.state.lock();
                    let Some(node) = st.dir.sweeps().into_iter().next() else {
                        break;
                    };
                    self.sweep_step(&mut st, &node);
                    MutexGuard::unlock_fair(st);
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// Periodic failure detection.
    pub fn tick(&self) {
        let mut st = self.state.lock();
        let fx = st.members.handle(MemberEvent::Tick, Instant::now());
        self.apply_member_effects(&mut st, fx);
        let keep = self.settings.failure_timeout.saturating_mul(UNCLAIMED_KEPT_TIMEOUTS);
        st.unclaimed.retain(|_, left| left.since.elapsed() <= keep);
    }

    // ---- directory operations from the handle -----------------------------------------

    /// Epochs are `unix_ms << 16 | counter`, strictly increasing on this node, and above any
    /// epoch known for the conn so a newer session wins even against a clock running ahead.
    pub fn announce(&self, conn: &str) -> u64 {
        let mut st = self.state.lock();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // Saturating: peers' epochs are checked (plausible_epoch), this is the second line.
        let epoch = (now_ms << 16)
            .max(st.last_epoch.saturating_add(1))
            .max(st.dir.max_epoch(conn).saturating_add(1));
        st.last_epoch = epoch;
        let fx = st.dir.apply(DirEvent::Own {
            conn: conn.to_string(),
            node: self.settings.node_id.clone(),
            epoch,
        });
        self.apply_dir_effects(fx);
        self.broadcast_dir(
            &st,
            Frame::Own {
                conn: conn.to_string(),
                epoch,
            },
        );
        epoch
    }

    pub fn withdraw(&self, conn: &str, epoch: u64) {
        let mut st = self.state.lock();
        st.dir.apply(DirEvent::Disown {
            conn: conn.to_string(),
            node: self.settings.node_id.clone(),
            epoch,
        });
        self.broadcast_dir(
            &st,
            Frame::Disown {
                conn: conn.to_string(),
                epoch,
            },
        );
    }

    /// Queues a directory frame on every link; a full queue triggers a resync of that link
    /// instead of silently diverging.
    fn broadcast_dir(&self, st: &State, f: Frame) {
        for (id, slot) in &st.peers {
            if let Some(link) = &slot.link {
                if let Err(mpsc::error::TrySendError::Full(_)) = link.tx.try_send(f.clone().into()) {
                    bump(&self.counters.queue_drops);
                    debug!(peer = %id, "peer queue full, directory frame replaced by a resync");
                    link.resync.notify_one();
                }
            }
        }
    }

    /// Queues an operator close request on every open link (returns the peers it was queued
    /// for) and repeats it on every link that comes up in the next [`RECENT_CLOSE_TTL`].
    pub fn broadcast_close(&self, frame: Frame) -> Vec<String> {
        let mut st = self.state.lock();
        let now = Instant::now();
        while st.recent_closes.len() >= RECENT_CLOSE_MAX
            || st
                .recent_closes
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RECENT_CLOSE_TTL)
        {
            st.recent_closes.pop_front();
        }
        st.recent_closes.push_back((now, frame.clone()));
        Self::queue_on_links(&st, &frame)
    }

    /// Queues `frame` on every open link, once (a hint: a peer without a link now misses
    /// it); returns the peers it was queued for.
    pub fn broadcast(&self, frame: &Frame) -> Vec<String> {
        let st = self.state.lock();
        Self::queue_on_links(&st, frame)
    }

    /// Queues `frame` on every open link; returns the peers it was queued for.
    fn queue_on_links(st: &State, frame: &Frame) -> Vec<String> {
        st.peers
            .iter()
            .filter(|(_, s)| {
                s.link
                    .as_ref()
                    .is_some_and(|l| l.tx.try_send(frame.clone().into()).is_ok())
            })
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// The node holding `conn`'s live session, this one included: the directory's owner,
    /// unless that is a peer found down (its claims not all swept from the directory yet) or
    /// removed from the peer list, whose sessions are gone with it.
    pub fn live_owner(&self, conn: &str) -> Option<String> {
        let st = self.state.lock();
        Self::live_owner_in(&st, &self.settings.node_id, conn).map(str::to_owned)
    }

    fn live_owner_in<'a>(st: &'a State, me: &str, conn: &str) -> Option<&'a str> {
        let (n, _) = st.dir.owner(conn)?;
        (n == me || (st.members.is_up(n) && st.peers.contains_key(n))).then_some(n)
    }

    pub fn notify(&self, conn: &str) -> super::NotifyOutcome {
        use super::NotifyOutcome;
        let st = self.state.lock();
        let owner = match Self::live_owner_in(&st, &self.settings.node_id, conn) {
            None => return NotifyOutcome::NoOwner,
            Some(n) if n == self.settings.node_id => return NotifyOutcome::Local,
            Some(n) => n.to_string(),
        };
        let sent = st
            .peers
            .get(&owner)
            .and_then(|s| s.link.as_ref())
            .is_some_and(|l| l.tx.try_send(Frame::Queued { conn: conn.to_string() }.into()).is_ok());
        if sent {
            bump(&self.counters.notifications_sent);
            NotifyOutcome::Sent(owner)
        } else {
            bump(&self.counters.notifications_failed);
            debug!(peer = %owner, "notification not sent (no link or queue full)");
            NotifyOutcome::Failed(owner)
        }
    }

    /// The node holding `conn`'s session, if a `Deliver` whose messages carry `len` bytes
    /// (payloads and recipient keys) can reach it: this node, or a peer with a link up and
    /// the frame within `max_frame`.
    pub fn holder(&self, conn: &str, len: usize) -> Option<String> {
        let st = self.state.lock();
        let (owner, _) = st.dir.owner(conn)?;
        if owner == self.settings.node_id {
            return Some(owner.to_string());
        }
        let fits = len.saturating_add(super::proto::DELIVER_OVERHEAD) <= self.settings.max_frame;
        let linked = st.peers.get(owner).is_some_and(|s| s.link.is_some());
        (fits && linked).then(|| owner.to_string())
    }

    /// Queues a `Deliver` frame to `node`; false when it cannot be queued (no link, queue
    /// full, the frame over `max_frame`, or the peer's send budget spent: [`SEND_BUDGET_FRAMES`]),
    /// and the caller releases the messages.
    pub fn hand_off(&self, node: &str, conn: &str, msgs: Vec<super::proto::HandedMsg>) -> bool {
        let n = msgs.len() as u64;
        let frame = Frame::Deliver {
            conn: conn.to_string(),
            msgs,
        };
        // Measured, not estimated: every message repeats its recipient key (a v2 DID may take
        // kilobytes), and a frame the link cannot seal would be dropped by the writer.
        let len = super::proto::encoded_len(&frame).unwrap_or(usize::MAX);
        let fits = len <= self.settings.max_frame;
        if !fits {
            debug!(peer = %node, len, max = self.settings.max_frame, "hand-off too large for one frame, released");
        }
        let st = self.state.lock();
        let sent = fits
            && st.peers.get(node).is_some_and(|s| {
                let Some(l) = &s.link else { return false };
                // Its room in the peer's send budget travels with it and is given back once it
                // is written: a peer that reads nothing holds that much here, not `peer_queue`
                // frames of `max_frame` bytes.
                let room = u32::try_from(len)
                    .ok()
                    .and_then(|n| s.sending.clone().try_acquire_many_owned(n).ok());
                let Some(room) = room else {
                    debug!(peer = %node, len, "peer's send budget spent (its link is not read), hand-off released");
                    return false;
                };
                l.tx.try_send(Outgoing {
                    frame,
                    _room: Some(room),
                })
                .is_ok()
            });
        let c = if sent {
            &self.counters.handoffs_sent
        } else {
            &self.counters.handoffs_failed
        };
        c.fetch_add(n, Ordering::Relaxed);
        sent
    }

    /// Queues `Leave` on every link; returns how many links were asked.
    pub fn begin_leave(&self) -> usize {
        let mut st = self.state.lock();
        st.left = true;
        st.leaving = true;
        let mut n = 0;
        for slot in st.peers.values() {
            if let Some(l) = &slot.link {
                l.leave.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Counts a handshake in progress until the guard is dropped. Take it under the state lock,
    /// having seen `left` false: `begin_leave` sets `left` under the same lock, so a leave
    /// either finds this handshake counted or stops it from starting.
    pub(super) fn handshaking(self: &Arc<Self>) -> Handshaking {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        Handshaking(self.clone())
    }

    /// Handshakes in progress: links that may yet come up, and must then carry a `Leave`.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    pub fn links_open(&self) -> usize {
        self.state.lock().peers.values().filter(|s| s.link.is_some()).count()
    }

    pub fn link_ended(&self) -> &Notify {
        &self.link_ended
    }

    fn micros(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    fn count_handshake_error(&self, e: &HandshakeError) {
        if e.is_version_mismatch() {
            bump(&self.counters.version_mismatches);
        }
        if e.is_auth_failure() {
            bump(&self.counters.auth_failures);
        } else if e.is_bad_input() {
            bump(&self.counters.frames_rejected);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused connections are warned of at most once per interval and key, the next
    /// warning saying how many were refused since; keys are counted apart. Before, every
    /// connection from a configured peer's address refused made a warning: a flood from that
    /// address (its machine, its NAT, every node on loopback) made one line per connection.
    #[test]
    fn refusals_are_warned_once_per_interval_and_key() {
        let mut w = RefusalWarnings::default();
        let t0 = Instant::now();
        let every = PEER_REFUSED_WARN_EVERY;
        let peer: IpAddr = [10, 0, 0, 2].into();
        let other_peer: IpAddr = [10, 0, 0, 3].into();
        let stranger: IpAddr = [10, 0, 0, 9].into();
        let closed = Refusal::from(&HandshakeError::Closed);
        let timeout = Refusal::from(&HandshakeError::Timeout);
        assert_eq!(closed, Refusal::from(&HandshakeError::Closed), "one kind per variant");
        assert_eq!(w.note(peer, true, closed, t0), Some(0), "the first is warned of");
        for i in 1..=1000 {
            let at = t0 + every.mul_f64(0.999 * f64::from(i) / 1000.0);
            assert_eq!(
                w.note(peer, true, closed, at),
                None,
                "refusal {i} from the peer's address"
            );
        }
        // Another kind, another peer's address or a stranger: warned of apart.
        assert_eq!(w.note(peer, true, timeout, t0), Some(0));
        assert_eq!(w.note(other_peer, true, closed, t0), Some(0));
        assert_eq!(w.note(stranger, false, closed, t0), Some(0));
        assert_eq!(w.note(stranger, false, Refusal::NoSlot, t0), Some(0));
        // A second on, the next from the peer's address is warned of, with how many were not.
        assert_eq!(w.note(peer, true, closed, t0 + every), Some(1000));
        assert_eq!(w.note(peer, true, closed, t0 + every), None);
        assert_eq!(w.note(peer, true, closed, t0 + 2 * every), Some(1));
        // A clock read out of order (two threads) counts, and warns of nothing early.
        assert_eq!(w.note(peer, true, closed, t0), None);
        // Strangers share one key per kind, whatever their address, for ten seconds.
        assert_eq!(w.note([10, 0, 0, 10].into(), false, closed, t0 + every), None);
        assert_eq!(w.note(stranger, false, closed, t0 + REFUSED_WARN_EVERY), Some(1));
        assert_eq!(w.last.len(), 5, "one entry per key");
    }
}
