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
//! never across an `.await`. Taking a resync snapshot and enqueuing directory frames both
//! happen under it, which is what makes "snapshot, then the queued changes after it" exact.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use tokio::io::BufWriter;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tracing::{debug, info, warn};

use super::codec::CodecError;
use super::directory::{plausible_epoch, DirEffect, DirEvent, Directory};
use super::handshake::{self, Established, HandshakeError, Role};
use super::link::{LinkReader, LinkWriter, SecureChannel};
use super::membership::{LinkId, MemberEffect, MemberEvent, Membership};
use super::proto::{Claim, Frame};
use super::{ClusterEvent, PeerConfig};

/// Connections accepted but not yet authenticated, at most (a flood of idle sockets must not
/// starve real peers of file descriptors or tasks).
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Frames written before one flush, at most (keeps heartbeats timely under load).
const WRITE_BATCH: usize = 64;
/// First reconnect delay; doubles up to `BACKOFF_CAP`, with jitter.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Settings resolved from `ClusterConfig` at start.
pub(crate) struct Settings {
    pub node_id: String,
    pub cluster_name: String,
    pub secret: Vec<u8>,
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
}

/// A snapshot of [`Counters`] for status output.
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
    /// Messages whose `Deliver` frame could not be queued (no link, queue full): the sender
    /// released them and woke the owner as for any new message.
    pub handoffs_failed: u64,
    /// Messages in `Deliver` frames written to a link that ended before the peer answered a
    /// later ping: the peer may never have read them, so the sender released them (a release
    /// gives back only what is still leased to the peer's hand-off owner).
    pub handoffs_unconfirmed: u64,
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
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// The installed link of a peer, as seen by everyone but its own task.
pub(crate) struct LinkHandle {
    pub id: LinkId,
    pub tx: mpsc::Sender<Frame>,
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
    /// Dropped when the peer is removed from the config: stops its dialer.
    _dialer_stop: watch::Sender<()>,
}

pub(crate) struct State {
    pub dir: Directory,
    pub members: Membership,
    pub peers: HashMap<String, PeerSlot>,
    pub last_epoch: u64,
    /// `leave()` was called: accept and dial nothing any more.
    pub left: bool,
    /// Operator close requests of the last [`RECENT_CLOSE_TTL`], sent again on every link that
    /// comes up: a peer that was cut off when one was made, or whose link died with it queued,
    /// still closes those sessions once it is back. Repeating one is harmless.
    pub recent_closes: VecDeque<(Instant, Frame)>,
}

/// How long an operator close request is repeated to peers whose link comes up.
pub const RECENT_CLOSE_TTL: Duration = Duration::from_secs(600);
/// Close requests kept for repetition at most (the oldest are forgotten first).
pub const RECENT_CLOSE_MAX: usize = 1024;

pub(crate) struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    pub counters: Counters,
    events: mpsc::Sender<ClusterEvent>,
    next_link: AtomicU64,
    /// Woken when a link ends (dialers waiting for "no link" re-check).
    link_ended: Notify,
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
}

impl Shared {
    /// Must be called from within a tokio runtime (`ClusterHandle::start` is async).
    pub fn new(settings: Settings, peers: &[PeerConfig], events: mpsc::Sender<ClusterEvent>) -> Arc<Shared> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        let state = State {
            dir: Directory::new(settings.node_id.clone()),
            members: Membership::new(settings.node_id.clone(), settings.failure_timeout),
            peers: HashMap::new(),
            last_epoch: 0,
            left: false,
            recent_closes: VecDeque::new(),
        };
        let shared = Arc::new(Shared {
            settings,
            state: Mutex::new(state),
            counters: Counters::default(),
            events,
            next_link: AtomicU64::new(1),
            link_ended: Notify::new(),
            shutdown_tx,
            shutdown_rx,
            task_done: Mutex::new(Some(done_tx)),
            all_done: Mutex::new(Some(done_rx)),
            stopped: AtomicBool::new(false),
            started: Instant::now(),
            rt: tokio::runtime::Handle::current(),
        });
        shared.add_peers(peers);
        shared
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
                st.dir.apply(DirEvent::NodeGone { node: id.clone() });
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
                    // off the caller's path (may reorder with later events).
                    let tx = self.events.clone();
                    self.rt.spawn(async move {
                        let _ = tx.send(ev).await;
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
                    self.emit(ClusterEvent::PeerUp { node: peer });
                }
                MemberEffect::Down { peer } => {
                    info!(peer = %peer, "cluster peer down");
                    let held = st.dir.claims_of(&peer);
                    st.dir.apply(DirEvent::NodeGone { node: peer.clone() });
                    self.emit(ClusterEvent::PeerDown { node: peer.clone() });
                    // Forwards queued while the peer was failing were notified to it (or to
                    // nobody, its link gone) and woke no one, and what its sessions were
                    // delivering stays leased to it: one node takes over its leases and its
                    // wallets left without a session anywhere.
                    if st.members.takes_over() {
                        let conns: Vec<String> = held
                            .into_iter()
                            .map(|(c, _)| c)
                            .filter(|c| st.dir.owner(c).is_none())
                            .collect();
                        let release_leases = st.members.sees_half();
                        self.emit(ClusterEvent::SessionsLost {
                            node: peer,
                            conns,
                            release_leases,
                        });
                    }
                }
                MemberEffect::Install { .. } | MemberEffect::Reject { .. } => {}
            }
        }
    }

    /// Periodic failure detection.
    pub fn tick(&self) {
        let mut st = self.state.lock();
        let fx = st.members.handle(MemberEvent::Tick, Instant::now());
        self.apply_member_effects(&mut st, fx);
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
                if let Err(mpsc::error::TrySendError::Full(_)) = link.tx.try_send(f.clone()) {
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
            .filter(|(_, s)| s.link.as_ref().is_some_and(|l| l.tx.try_send(frame.clone()).is_ok()))
            .map(|(id, _)| id.to_string())
            .collect()
    }

    pub fn notify(&self, conn: &str) -> super::NotifyOutcome {
        use super::NotifyOutcome;
        let st = self.state.lock();
        let owner = match st.dir.owner(conn) {
            None => return NotifyOutcome::NoOwner,
            Some((n, _)) if n == self.settings.node_id => return NotifyOutcome::Local,
            Some((n, _)) => n.to_string(),
        };
        let sent = st
            .peers
            .get(&owner)
            .and_then(|s| s.link.as_ref())
            .is_some_and(|l| l.tx.try_send(Frame::Queued { conn: conn.to_string() }).is_ok());
        if sent {
            bump(&self.counters.notifications_sent);
            NotifyOutcome::Sent(owner)
        } else {
            bump(&self.counters.notifications_failed);
            debug!(peer = %owner, "notification not sent (no link or queue full)");
            NotifyOutcome::Failed(owner)
        }
    }

    /// The node holding `conn`'s session, if a `Deliver` of `len` payload bytes can reach it:
    /// this node, or a peer with a link up and the frame within `max_frame`.
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
    /// full), and the caller releases the messages.
    pub fn hand_off(&self, node: &str, conn: &str, msgs: Vec<super::proto::HandedMsg>) -> bool {
        let n = msgs.len() as u64;
        let st = self.state.lock();
        let sent = st.peers.get(node).and_then(|s| s.link.as_ref()).is_some_and(|l| {
            l.tx.try_send(Frame::Deliver {
                conn: conn.to_string(),
                msgs,
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
        let mut n = 0;
        for slot in st.peers.values() {
            if let Some(l) = &slot.link {
                l.leave.notify_one();
                n += 1;
            }
        }
        n
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

// ---- tasks ---------------------------------------------------------------------------

/// Accepts peer connections until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown_rx.clone();
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // e.g. out of file descriptors: back off instead of spinning.
                warn!(error = %e, "cluster accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.state.lock().left {
            continue; // dropped: we are leaving
        }
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            warn!(%addr, "too many cluster handshakes in progress, connection dropped");
            continue;
        };
        let me = shared.clone();
        shared.spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut stream = stream;
            let res = {
                let local = local_params(&me);
                let check = |n: &str| me.state.lock().members.is_configured(n);
                tokio::time::timeout(
                    me.settings.handshake_timeout,
                    handshake::run(&mut stream, &local, Role::Acceptor, None, check),
                )
                .await
                .unwrap_or(Err(HandshakeError::Timeout))
            };
            drop(permit);
            match res {
                Ok(Established { peer, channel }) => {
                    debug!(%addr, peer = %peer, "inbound cluster link authenticated");
                    run_link(me, stream, channel, peer, false).await;
                }
                Err(e) => {
                    me.count_handshake_error(&e);
                    warn!(%addr, reason = %e, "inbound cluster connection refused");
                }
            }
        });
    }
}

fn local_params(shared: &Shared) -> handshake::Local<'_> {
    handshake::Local {
        cluster: &shared.settings.cluster_name,
        node: &shared.settings.node_id,
        secret: &shared.settings.secret,
        max_frame: shared.settings.max_frame,
    }
}

/// Keeps one link to `peer` open: dials when there is none, with exponential backoff.
async fn dial_loop(shared: Arc<Shared>, peer: String, mut stop: watch::Receiver<()>) {
    let mut shutdown = shared.shutdown_rx.clone();
    let mut backoff = BACKOFF_START;
    loop {
        if stop.has_changed().is_err() {
            return; // our slot was dropped (peer removed, maybe re-added with a new dialer)
        }
        let addr = {
            let st = shared.state.lock();
            if st.left || *shutdown.borrow() {
                return;
            }
            let Some(slot) = st.peers.get(&peer) else {
                return; // removed from config
            };
            if slot.link.is_some() {
                None
            } else {
                Some(slot.addr)
            }
        };
        let Some(addr) = addr else {
            // An inbound link serves this peer; re-check when a link ends.
            tokio::select! {
                _ = shared.link_ended.notified() => {}
                _ = tokio::time::sleep(shared.settings.heartbeat_interval) => {}
                r = stop.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            continue;
        };
        let res = tokio::select! {
            r = dial(&shared, &peer, addr) => r,
            r = stop.changed() => if r.is_err() { return } else { continue },
            _ = shutdown.changed() => return,
        };
        shared
            .state
            .lock()
            .members
            .handle(MemberEvent::DialAttempted { peer: peer.clone() }, Instant::now());
        match res {
            Ok((stream, est)) => {
                let t = Instant::now();
                run_link(shared.clone(), stream, est.channel, peer.clone(), true).await;
                // Only a link that held for a while proves the peer healthy; one that dies
                // right after the handshake keeps backing off.
                if t.elapsed() >= shared.settings.failure_timeout {
                    backoff = BACKOFF_START;
                }
            }
            Err(e) => {
                shared.count_handshake_error(&e);
                if e.is_auth_failure() || e.is_bad_input() {
                    warn!(peer = %peer, %addr, reason = %e, "cluster peer refused");
                } else {
                    debug!(peer = %peer, %addr, reason = %e, "cluster dial failed");
                }
            }
        }
        // Jitter in [50%, 100%] so restarted nodes do not dial in lockstep.
        let delay = backoff.mul_f64(rand::thread_rng().gen_range(0.5..=1.0));
        backoff = (backoff * 2).min(BACKOFF_CAP);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = stop.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

async fn dial(shared: &Shared, peer: &str, addr: SocketAddr) -> Result<(TcpStream, Established), HandshakeError> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.map_err(CodecError::from)?;
        let _ = stream.set_nodelay(true);
        let local = local_params(shared);
        let est = handshake::run(&mut stream, &local, Role::Dialer, Some(peer), |n| n == peer).await?;
        Ok((stream, est))
    };
    tokio::time::timeout(shared.settings.handshake_timeout, fut)
        .await
        .unwrap_or(Err(HandshakeError::Timeout))
}

/// `Deliver` frames written to one link and not yet known to be read: the peer reads frames in
/// order and answers each ping, so a pong proves it read every frame written before its ping.
/// What is left when the link ends may have been lost in a socket buffer; the sender releases
/// it rather than leave it leased to the peer's hand-off owner until the lease runs out.
#[derive(Default)]
struct Unconfirmed {
    /// The `t` of the last ping written.
    last_ping: u64,
    /// (`last_ping` when written, connection, message ids), oldest first.
    frames: std::collections::VecDeque<(u64, String, Vec<i64>)>,
}

/// Most `Deliver` frames [`Unconfirmed`] keeps per link: a peer that keeps its link alive
/// with other frames but answers no ping cannot make it grow without bound (the oldest are
/// forgotten: lost, they would wait for their lease, as before pongs were counted).
const MAX_UNCONFIRMED: usize = 16_384;

impl Unconfirmed {
    fn written(&mut self, f: &Frame) {
        match f {
            Frame::Deliver { conn, msgs } => {
                if self.frames.len() >= MAX_UNCONFIRMED {
                    self.frames.pop_front();
                }
                let ids = msgs.iter().map(|m| m.id).collect();
                self.frames.push_back((self.last_ping, conn.clone(), ids));
            }
            Frame::Ping { t } => self.last_ping = *t,
            _ => {}
        }
    }

    /// The peer answered the ping `t`: it read every frame written before it.
    fn pong(&mut self, t: u64) {
        while self.frames.front().is_some_and(|(after, _, _)| *after < t) {
            self.frames.pop_front();
        }
    }
}

/// Runs one authenticated link until it ends, then tells membership. Every frame goes through
/// `channel`, the keys of this link's handshake.
async fn run_link(shared: Arc<Shared>, stream: TcpStream, channel: SecureChannel, peer: String, we_dialed: bool) {
    let link = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(shared.settings.peer_queue);
    let resync = Arc::new(Notify::new());
    let leave = Arc::new(Notify::new());
    let (close_tx, close_rx) = oneshot::channel();
    let unconfirmed = Arc::new(parking_lot::Mutex::new(Unconfirmed::default()));

    // Install (or not) and take the first snapshot under one lock.
    let snapshot = {
        let mut st = shared.state.lock();
        if st.left {
            return;
        }
        let fx = st.members.handle(
            MemberEvent::LinkUp {
                peer: peer.clone(),
                link,
                we_dialed,
            },
            Instant::now(),
        );
        let installed = fx
            .iter()
            .any(|e| matches!(e, MemberEffect::Install { link: l, .. } if *l == link));
        // Close the replaced link first, then emit Up.
        shared.apply_member_effects(&mut st, fx);
        if installed {
            if let Some(slot) = st.peers.get_mut(&peer) {
                slot.link = Some(LinkHandle {
                    id: link,
                    tx: tx.clone(),
                    resync: resync.clone(),
                    leave: leave.clone(),
                    _close: close_tx,
                });
            }
            let now = Instant::now();
            for (_, f) in st
                .recent_closes
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= RECENT_CLOSE_TTL)
            {
                if tx.try_send(f.clone()).is_err() {
                    bump(&shared.counters.queue_drops);
                }
            }
            Some(st.dir.claims_of(&shared.settings.node_id))
        } else {
            None
        }
    };
    let (rd, wr) = stream.into_split();
    let (rd, mut wr) = channel.into_link(rd, BufWriter::new(wr));
    let Some(snapshot) = snapshot else {
        debug!(peer = %peer, link, "duplicate cluster link closed");
        let f = Frame::Refused {
            reason: "duplicate link".into(),
        };
        let _ = wr.send(&f).await;
        return;
    };
    info!(peer = %peer, link, we_dialed, "cluster link up");

    let mut shutdown = shared.shutdown_rx.clone();
    let reason: String = tokio::select! {
        r = read_loop(&shared, rd, &peer, link, tx, &unconfirmed) => match r {
            Ok(why) => why.to_string(),
            Err(e) => e,
        },
        r = write_loop(&shared, &mut wr, &mut rx, snapshot, &resync, &leave, &unconfirmed) => match r {
            Ok(why) => why.to_string(),
            Err(e) => format!("write failed: {e}"),
        },
        _ = close_rx => "closed by membership".to_string(),
        _ = shutdown.changed() => "shutdown".to_string(),
    };
    let mut returned = Vec::new();
    {
        let mut st = shared.state.lock();
        st.members.handle(
            MemberEvent::LinkClosed {
                peer: peer.clone(),
                link,
            },
            Instant::now(),
        );
        if let Some(slot) = st.peers.get_mut(&peer) {
            if slot.link.as_ref().is_some_and(|l| l.id == link) {
                slot.link = None;
            }
            // Replaced by another link: hand it the wake-ups and hand-offs we did not get to
            // send (directory frames are covered by the resync the new link starts with).
            rx.close();
            while let Ok(f) = rx.try_recv() {
                if !matches!(f, Frame::Queued { .. } | Frame::Deliver { .. }) {
                    continue;
                }
                let back = match slot.link.as_ref() {
                    Some(l) => l.tx.try_send(f).err().map(|e| e.into_inner()),
                    None => Some(f),
                };
                match back {
                    None => {}
                    Some(Frame::Deliver { conn, msgs }) => {
                        let n = msgs.len() as u64;
                        shared.counters.handoffs_failed.fetch_add(n, Ordering::Relaxed);
                        returned.push((conn, msgs.into_iter().map(|m| m.id).collect()));
                    }
                    Some(_) => bump(&shared.counters.notifications_failed),
                }
            }
        }
    }
    // Hand-offs written but never confirmed read: released too (a release gives back only
    // what is still leased to the peer's hand-off owner, so a frame the peer did read and
    // whose messages its session took or acknowledged loses nothing; its session does not
    // write a message twice, see `session::ws`).
    for (_, conn, ids) in std::mem::take(&mut unconfirmed.lock().frames) {
        shared
            .counters
            .handoffs_unconfirmed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        returned.push((conn, ids));
    }
    // Hand-offs that never left: this node releases them (they would wait for their lease).
    for (conn, ids) in returned {
        shared.emit(ClusterEvent::HandOffReturned {
            node: peer.clone(),
            conn,
            ids,
        });
    }
    shared.link_ended.notify_waiters();
    info!(peer = %peer, link, reason = %reason, "cluster link closed");
}

/// Reads frames until the link ends. `Ok` is a normal end, `Err` a reason worth a warning.
async fn read_loop(
    shared: &Shared,
    mut rd: LinkReader<OwnedReadHalf>,
    peer: &str,
    link: LinkId,
    tx: mpsc::Sender<Frame>,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
) -> Result<&'static str, String> {
    let mut resync: Vec<(String, u64)> = Vec::new();
    loop {
        let frame = match rd.read_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok("peer closed the connection"),
            Err(e) => {
                if e.is_bad_input() {
                    bump(&shared.counters.frames_rejected);
                    warn!(peer = %peer, reason = %e, "bad frame from cluster peer, closing link");
                }
                return Err(e.to_string());
            }
        };
        let now = Instant::now();
        let mut st = shared.state.lock();
        if st.members.link_of(peer) != Some(link) {
            // Replaced or closed; its task is about to end. Its frames no longer count.
            return Ok("link replaced");
        }
        st.members.handle(
            MemberEvent::Heard {
                peer: peer.to_string(),
                link,
            },
            now,
        );
        match frame {
            Frame::Ping { t } => {
                // If the queue is full the peer still hears our own pings.
                let _ = tx.try_send(Frame::Pong { t });
            }
            Frame::Pong { t } => {
                unconfirmed.lock().pong(t);
                let rtt = Duration::from_micros(shared.micros().saturating_sub(t));
                st.members.handle(
                    MemberEvent::Rtt {
                        peer: peer.to_string(),
                        link,
                        rtt,
                    },
                    now,
                );
            }
            Frame::Own { conn, epoch } => {
                if !plausible_epoch(epoch, unix_ms()) {
                    bump(&shared.counters.frames_rejected);
                    warn!(peer, conn = %conn, epoch, "claim with an epoch from beyond a day ahead ignored");
                    continue;
                }
                let (claims, has) = st.dir.claims_by(peer, &conn);
                let cap = shared.settings.max_peer_claims;
                if claims >= cap && !has {
                    bump(&shared.counters.frames_rejected);
                    warn!(peer, "claim over {cap} claims of one peer ignored");
                    continue;
                }
                let fx = st.dir.apply(DirEvent::Own {
                    conn,
                    node: peer.to_string(),
                    epoch,
                });
                shared.apply_dir_effects(fx);
            }
            Frame::Disown { conn, epoch } => {
                st.dir.apply(DirEvent::Disown {
                    conn,
                    node: peer.to_string(),
                    epoch,
                });
            }
            Frame::Resync { claims, last } => {
                let cap = shared.settings.max_peer_claims;
                if resync.len() + claims.len() > cap {
                    bump(&shared.counters.frames_rejected);
                    return Err(format!("resync over {cap} claims"));
                }
                let now = unix_ms();
                let sent = claims.len();
                let kept: Vec<(String, u64)> = claims
                    .into_iter()
                    .filter(|c| plausible_epoch(c.epoch, now))
                    .map(|c| (c.conn, c.epoch))
                    .collect();
                let dropped = sent - kept.len();
                resync.extend(kept);
                if dropped > 0 {
                    // Counted, not precise per claim: one frame held implausible epochs.
                    bump(&shared.counters.frames_rejected);
                }
                if last {
                    let fx = st.dir.apply(DirEvent::Resync {
                        node: peer.to_string(),
                        claims: std::mem::take(&mut resync),
                    });
                    shared.apply_dir_effects(fx);
                }
            }
            Frame::Queued { conn } => {
                bump(&shared.counters.notifications_received);
                shared.emit(ClusterEvent::MessageQueued { conn });
            }
            Frame::Deliver { conn, msgs } => {
                shared
                    .counters
                    .handoffs_received
                    .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                shared.emit(ClusterEvent::Delivered { conn, msgs });
            }
            Frame::CloseSessions { conn, reason } => {
                shared.emit(ClusterEvent::CloseSessions { conn, reason });
            }
            Frame::RoutesChanged { conn, keys } => {
                bump(&shared.counters.routes_changed_received);
                shared.emit(ClusterEvent::RoutesChanged { conn, keys });
            }
            Frame::Leave => {
                let fx = st.members.handle(
                    MemberEvent::Left {
                        peer: peer.to_string(),
                        link,
                    },
                    now,
                );
                shared.apply_member_effects(&mut st, fx);
                return Ok("peer left the cluster");
            }
            Frame::Refused { reason } => {
                return Err(format!("peer closed the link: {reason}"));
            }
            other @ (Frame::Hello(_) | Frame::Proof { .. } | Frame::Welcome | Frame::Noise { .. }) => {
                bump(&shared.counters.frames_rejected);
                return Err(format!("unexpected {} frame after handshake", other.kind()));
            }
        }
    }
}

/// The sending half of a link as `run_link` uses it.
type Writer = LinkWriter<BufWriter<OwnedWriteHalf>>;

/// Writes the initial resync, then queued frames, heartbeats and resyncs until the link ends.
async fn write_loop(
    shared: &Shared,
    wr: &mut Writer,
    rx: &mut mpsc::Receiver<Frame>,
    snapshot: Vec<(String, u64)>,
    resync: &Notify,
    leave: &Notify,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
) -> Result<&'static str, CodecError> {
    let max = shared.settings.max_frame;
    write_resync(wr, snapshot, max).await?;
    wr.flush().await?;
    let mut hb = tokio::time::interval(shared.settings.heartbeat_interval);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            f = rx.recv() => {
                let Some(f) = f else { return Ok("link handle dropped") };
                write_tracked(wr, unconfirmed, &f).await?;
                for _ in 1..WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(f) => write_tracked(wr, unconfirmed, &f).await?,
                        Err(_) => break,
                    }
                }
                wr.flush().await?;
            }
            _ = hb.tick() => {
                write_tracked(wr, unconfirmed, &Frame::Ping { t: shared.micros() }).await?;
                wr.flush().await?;
            }
            _ = resync.notified() => {
                // Queued directory frames predate the snapshot: drop them, keep the rest.
                let (snapshot, keep) = {
                    let st = shared.state.lock();
                    let mut keep = Vec::new();
                    while let Ok(f) = rx.try_recv() {
                        if !matches!(f, Frame::Own { .. } | Frame::Disown { .. } | Frame::Resync { .. }) {
                            keep.push(f);
                        }
                    }
                    (st.dir.claims_of(&shared.settings.node_id), keep)
                };
                write_resync(wr, snapshot, max).await?;
                for f in &keep {
                    write_tracked(wr, unconfirmed, f).await?;
                }
                wr.flush().await?;
            }
            _ = leave.notified() => {
                while let Ok(f) = rx.try_recv() {
                    write_tracked(wr, unconfirmed, &f).await?;
                }
                write_tracked(wr, unconfirmed, &Frame::Leave).await?;
                wr.flush().await?;
                let _ = wr.shutdown().await;
                return Ok("we left the cluster");
            }
        }
    }
}

/// [`write_one`], noting a `Deliver` or a ping as written ([`Unconfirmed`]); a frame whose
/// write failed counts as written (it may be half on the wire, and the link ends).
async fn write_tracked(
    wr: &mut Writer,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
    f: &Frame,
) -> Result<(), CodecError> {
    let r = write_one(wr, f).await;
    unconfirmed.lock().written(f);
    r
}

/// Writes one frame; a frame too large to send (an absurd conn id) is logged and skipped
/// rather than taking the link down.
async fn write_one(wr: &mut Writer, f: &Frame) -> Result<(), CodecError> {
    match wr.write_frame(f).await {
        Err(CodecError::TooLarge { len, max }) => {
            warn!(kind = f.kind(), len, max, "cluster frame too large to send, skipped");
            Ok(())
        }
        r => r,
    }
}

/// Sends our claims in chunks that each fit in a frame; the last chunk has `last: true`.
async fn write_resync(wr: &mut Writer, claims: Vec<(String, u64)>, max: usize) -> Result<(), CodecError> {
    for chunk in resync_chunks(claims, max) {
        write_one(wr, &chunk).await?;
    }
    Ok(())
}

/// Splits claims into `Resync` frames whose encoding stays under `max` bytes: a claim costs at
/// most its conn length + 9 (varint length) + 9 (varint epoch); a frame adds at most 11.
/// A claim that cannot fit in any frame is dropped with a warning.
pub fn resync_chunks(claims: Vec<(String, u64)>, max: usize) -> Vec<Frame> {
    let budget = max.saturating_sub(16);
    let mut out = Vec::new();
    let mut cur: Vec<Claim> = Vec::new();
    let mut size = 0;
    for (conn, epoch) in claims {
        let cost = conn.len() + 18;
        if cost > budget {
            warn!(len = conn.len(), "conn id too long for a resync frame, skipped");
            continue;
        }
        if size + cost > budget {
            out.push(Frame::Resync {
                claims: std::mem::take(&mut cur),
                last: false,
            });
            size = 0;
        }
        size += cost;
        cur.push(Claim { conn, epoch });
    }
    out.push(Frame::Resync {
        claims: cur,
        last: true,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::proto;

    fn deliver(conn: &str, id: i64) -> Frame {
        Frame::Deliver {
            conn: conn.into(),
            msgs: vec![proto::HandedMsg {
                id,
                recipient_key: "k".into(),
                payload: vec![1],
                received_at_ms: 1,
            }],
        }
    }

    fn left(u: &Unconfirmed) -> Vec<i64> {
        u.frames.iter().flat_map(|(_, _, ids)| ids.clone()).collect()
    }

    #[test]
    fn a_pong_confirms_only_the_frames_written_before_its_ping() {
        let mut u = Unconfirmed::default();
        u.written(&deliver("c", 1));
        u.written(&Frame::Ping { t: 10 });
        u.written(&deliver("c", 2));
        u.written(&Frame::Ping { t: 20 });
        u.written(&deliver("c", 3));
        // An older ping's answer confirms only what came before that ping.
        u.pong(10);
        assert_eq!(left(&u), vec![2, 3]);
        // A late or repeated pong confirms nothing more.
        u.pong(10);
        assert_eq!(left(&u), vec![2, 3]);
        u.pong(20);
        assert_eq!(left(&u), vec![3], "written after the last ping: unconfirmed");
        u.written(&Frame::Queued { conn: "c".into() });
        assert_eq!(left(&u), vec![3], "only Deliver frames are kept");
    }

    #[test]
    fn a_peer_that_never_answers_cannot_grow_the_record_without_bound() {
        let mut u = Unconfirmed::default();
        for id in 0..(MAX_UNCONFIRMED as i64 + 10) {
            u.written(&deliver("c", id));
        }
        assert_eq!(u.frames.len(), MAX_UNCONFIRMED);
        assert_eq!(left(&u)[0], 10, "the oldest are forgotten");
    }

    #[test]
    fn resync_chunks_fit_and_end_with_last() {
        let claims: Vec<(String, u64)> = (0..1000)
            .map(|i| (format!("conn-{i:05}-{}", "x".repeat(i % 50)), u64::MAX - i as u64))
            .collect();
        let frames = resync_chunks(claims.clone(), 2048);
        assert!(frames.len() > 1);
        let mut seen = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            assert!(proto::encode(f).unwrap().len() <= 2048);
            let Frame::Resync { claims, last } = f else {
                panic!("not a resync")
            };
            assert_eq!(*last, i + 1 == frames.len());
            seen.extend(claims.iter().map(|c| (c.conn.clone(), c.epoch)));
        }
        assert_eq!(seen, claims);
    }

    #[test]
    fn empty_resync_is_one_last_frame() {
        assert_eq!(
            resync_chunks(vec![], 1024),
            vec![Frame::Resync {
                claims: vec![],
                last: true
            }]
        );
    }
}
