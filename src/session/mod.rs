//! Transports: the public listener's HTTP POST and WebSocket sessions, and outbound delivery
//! to agents that have an HTTP endpoint of their own. The only module that knows
//! actix-web-actors (in [`ws`], started by [`upgrade`]).
//!
//! [`Shared`] is what every transport needs: the mediator, the registry, the cluster handle,
//! limits and metrics. Its [`Shared::queued_new`] decides how a newly queued message reaches its
//! wallet: a local session, the owning node over the cluster, or the agent's own endpoint.

mod confirm;
pub mod egress;
mod give_back;
mod handing;
pub mod held;
pub mod http;
mod in_order;
pub mod listener;
pub mod live_window;
pub mod notified;
pub mod outbound;
pub mod owed;
pub mod pace;
pub mod tracked;
pub mod unfinished;
pub mod upgrade;
pub mod watchdog;
pub mod ws;
pub mod wsio;

pub use give_back::HttpLeases;

use crate::cluster::{ClusterHandle, Held, NotifyOutcome};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocols::{handoff_owner, now_ms, AckOnReturn, Handed, Mediator};
use crate::registry::{
    CloseConn, IsLocal, LocalConns, LocalHolders, Offered, Registry, SessionFor, Signal, WakeLocal, WakeMany,
};
use crate::store::{MediationState, QueuedMessage};
use actix::{Addr, Recipient};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Entries of the connection -> endpoint cache before it is cleared.
const ENDPOINT_CACHE_MAX: usize = 200_000;
/// Local connections asked about per store call of the sweep.
const SWEEP_CHUNK: usize = 1_000;
/// Connections with pending messages retried at their endpoints per sweep pass (a cursor
/// walks the rest in later passes).
const ENDPOINT_PAGE: usize = 10_000;
/// Sweep passes per retry of endpoint delivery ([`Shared::sweep`] `with_endpoints`).
pub const ENDPOINT_RETRY_EVERY: u64 = 10;
/// The longest the sweep waits before it retries an endpoint whose drains keep failing
/// (after drains that failed in a row): ten minutes.
pub const ENDPOINT_RETRY_MAX_MS: i64 = 600_000;
/// Most messages whose lease ran out taken back by one pass of the sweep (the rest at the next).
const RECLAIM_BATCH: usize = 1_000;
/// Deliveries of a message after which its lease running out pushes its wallet no more
/// ([`Shared::reclaim_expired_leases`]).
pub const RECLAIM_PUSHES: u32 = 3;
/// How long a hand-off waits for the session here to take it ([`Shared::hand_local`]): a
/// session that runs takes it within milliseconds; one held by a socket its wallet stopped
/// reading does not until its write stall (`limits.ws_write_stall_ms`) gives it up.
pub const HAND_LOCAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How a hand-off went, for the run of its connection's hand-offs.
pub enum Handing {
    /// Taken by a session or a link, or released.
    Done,
    /// This session here did not take it within [`HAND_LOCAL_WAIT`] (or did not take an
    /// earlier one): released.
    Slow(Recipient<Signal>),
}
/// Connections asked about in one store call by [`wake_pending`].
const WAKE_PENDING_CHUNK: usize = 500;
/// Most connections [`Shared::notified`] keeps per peer, of each kind; past it, a failed
/// notification pushes at once (a push too many, never none).
const NOTIFIED_MAX: usize = 100_000;

/// Why a connection's queue is tried at its endpoint ([`Shared::deliver_to_endpoint`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndpointTry {
    /// New mail: a forward queued it, or a session, a hand-off or a node left it. Waits
    /// while the endpoint itself keeps failing; while it only refuses messages, goes at once
    /// with the messages never tried ([`outbound::drain_to_endpoint`]'s `new_only`).
    New,
    /// Mail tried before: leases that ran out, the sweep. Waits while the endpoint backs off.
    Again,
}

/// Whether [`Shared::deliver_to_endpoint`] started a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndpointStart {
    /// Started, or nothing to start: no endpoint, or a drain of the connection under way here.
    Done,
    /// Put off: the endpoint backs off after failed drains. The sweep tries it when that ends.
    BackingOff,
    /// Put off: the node's `limits.max_endpoint_drains` are all under way. The sweep's next
    /// pass tries it (and goes on each pass while drains are lacking).
    NoSlot,
}

/// How an endpoint's drains have gone lately ([`Shared::endpoint_tried`]).
#[derive(Clone, Copy, Debug)]
struct Backoff {
    /// Drains that failed (or had messages refused) in a row.
    failures: u32,
    /// When the sweep may try the endpoint again: an `Instant`, as it never leaves the node
    /// (a wall clock stepped back an hour held every endpoint that failed just before for an
    /// hour more).
    next: std::time::Instant,
    /// The last failure was the endpoint's own (no answer, 5xx, 408, 429), not a refusal of
    /// some messages: new mail waits too.
    endpoint_wide: bool,
}

pub struct Shared {
    pub mediator: Arc<Mediator>,
    pub registry: Addr<Registry>,
    pub cluster: Option<ClusterHandle>,
    pub cfg: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// WebSocket sessions open on this node (bound or not), for `limits.max_sessions`.
    pub open_sockets: AtomicUsize,
    /// Bytes of messages not yet whole (POST bodies, WebSocket frames and fragmented
    /// messages), all connections of the node together ([`unfinished`]).
    pub unfinished: Arc<unfinished::Unfinished>,
    next_session: AtomicU64,
    /// Connections whose queue is being POSTed to their endpoint by this node.
    endpoint_busy: Mutex<HashSet<String>>,
    /// Drains to endpoints under way on this node, all connections together
    /// (`limits.max_endpoint_drains`): each holds a socket for up to
    /// `delivery.endpoint_timeout_ms` and a batch of leased payload. Taken with `try_acquire`:
    /// a drain that finds none is not started (its messages stay queued, not leased) and left
    /// to the sweep, so a flood of endpoints that never answer holds at most this many.
    endpoint_drains: Arc<tokio::sync::Semaphore>,
    /// connection -> its own HTTP endpoint, if any. Endpoints are fixed when a connection is
    /// made, so this never goes stale; it spares a store read on every forward to an offline
    /// wallet (almost every forward). A revoked connection's is forgotten when a drain finds
    /// it revoked. Cleared when it reaches `ENDPOINT_CACHE_MAX`.
    endpoint_cache: Mutex<std::collections::HashMap<String, Option<String>>>,
    /// Set once shutdown starts: new sockets are refused.
    pub draining: AtomicBool,
    /// Set once the node stops (for good: `POST /undrain` is refused from then on), with
    /// [`Shared::begin_stop`].
    pub stopping: AtomicBool,
    /// Woken when the stop begins: sockets waiting for their client to take bytes are given up
    /// [`wsio::STOP_GRACE`] into the stop.
    stop_begun: tokio::sync::Notify,
    /// When the stop began ([`Shared::begin_stop`]).
    stop_begun_at: std::sync::OnceLock<tokio::time::Instant>,
    /// Where the endpoint retry of the sweep goes on from (connection id order).
    endpoint_cursor: Mutex<Option<String>>,
    /// The last endpoint retry stopped short, every drain slot taken: the next sweep pass goes
    /// on with it, not the next endpoint pass ([`ENDPOINT_RETRY_EVERY`] passes later), so a
    /// backlog of connections (after a restart or an outage) is served at the pace drains
    /// finish, not `limits.max_endpoint_drains` connections an endpoint pass.
    endpoint_pass_unfinished: AtomicBool,
    /// connection -> how its endpoint's drains have gone lately: the retries of an endpoint
    /// that keeps failing (or refusing messages) back off, so a dead or hostile endpoint is
    /// not POSTed every retry period, nor every lease period, for the queue's whole TTL. Leases
    /// that run out wait for it as the sweep does, and so do forwards while the endpoint
    /// itself fails ([`EndpointTry`]). Cleared when it reaches `ENDPOINT_CACHE_MAX`.
    endpoint_backoff: Mutex<std::collections::HashMap<String, Backoff>>,
    /// The push worker, when `[push]` is configured (set once by the node at start).
    pub push: std::sync::OnceLock<crate::push::PushHandle>,
    /// How the run before this one on the store ended, as [`Store::begin_run`] answered it
    /// (set once by the node at start; `None` inside: not tracked, or not known).
    ///
    /// [`Store::begin_run`]: crate::store::Store::begin_run
    pub previous_run: std::sync::OnceLock<Option<bool>>,
    /// The wake-up owed after a run that did not stop has not finished: the store stays
    /// marked at the stop (see [`wake_all_pending`]).
    pub wake_owed: AtomicBool,
    /// The connection records bound sessions hold: one copy per connection, whatever the
    /// number of its sessions.
    pub held: held::Held,
    /// The connections bound sessions here hold, counted by the sessions themselves: a
    /// wake-up asks the registry only when one is (see [`LocalHolders`]).
    pub bound: Arc<LocalHolders>,
    /// Outbound POSTs to agents' endpoints: where they may connect, and their client.
    pub egress: Arc<egress::Egress>,
    /// The bound on replies POSTed to agents' endpoints.
    pub replies: outbound::ReplySlots,
    /// Hand-offs running, per connection: one at a time, in the order entered.
    handing: in_order::InOrder<handing::Entry>,
    /// Room the hand-offs of forwards accepted here take while they wait for a session here
    /// ([`crate::cluster::Room`], in units of `limits.max_envelope_bytes`).
    local_room: crate::cluster::Room,
    /// What this node notified each peer of, to wake once the peer is found down
    /// ([`Shared::peer_down`]).
    notified: notified::Notified,
    /// Work a request or a socket starts that must outlive it (wake-ups, hand-offs,
    /// give-backs): counted, and waited for at the stop (see [`tracked`]).
    pub tracked: tracked::Tracked,
    /// The HTTP requests being answered and what their pickups leased: a drained node is
    /// empty only once none is left.
    pub http_leases: HttpLeases,
}

impl Shared {
    pub fn new(
        mediator: Arc<Mediator>,
        registry: Addr<Registry>,
        cluster: Option<ClusterHandle>,
        cfg: Arc<Config>,
        metrics: Arc<Metrics>,
        bound: Arc<LocalHolders>,
        egress: egress::Egress,
    ) -> Shared {
        // A peer is found down at most a failure timeout (and a tick) after it died.
        let window_ms = 2 * cfg.cluster.failure_timeout_ms.min(i64::MAX as u64 / 4) as i64;
        let notified = notified::Notified::new(window_ms, NOTIFIED_MAX);
        let local_room = crate::cluster::Room::new(cfg.limits.max_envelope_bytes);
        let largest = cfg.limits.max_envelope_bytes.max(cfg.limits.max_ws_frame_bytes);
        let unfinished = Arc::new(unfinished::Unfinished::new(largest));
        let endpoint_drains = Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_endpoint_drains));
        Shared {
            mediator,
            registry,
            cluster,
            cfg,
            metrics,
            open_sockets: AtomicUsize::new(0),
            unfinished,
            next_session: AtomicU64::new(1),
            endpoint_busy: Mutex::new(HashSet::new()),
            endpoint_drains,
            endpoint_cache: Mutex::new(std::collections::HashMap::new()),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop_begun: tokio::sync::Notify::new(),
            stop_begun_at: std::sync::OnceLock::new(),
            endpoint_cursor: Mutex::new(None),
            endpoint_pass_unfinished: AtomicBool::new(false),
            endpoint_backoff: Mutex::new(std::collections::HashMap::new()),
            push: std::sync::OnceLock::new(),
            previous_run: std::sync::OnceLock::new(),
            wake_owed: AtomicBool::new(false),
            held: held::Held::default(),
            bound,
            egress: Arc::new(egress),
            replies: outbound::ReplySlots::default(),
            handing: in_order::InOrder::default(),
            local_room,
            notified,
            tracked: tracked::Tracked::on_current_arbiter(),
            http_leases: HttpLeases::default(),
        }
    }

    /// This node found `peer` down ([`crate::cluster::ClusterEvent::PeerDown`]): the
    /// connections to wake ([`Shared::wake_notified`]) of what it notified the peer of
    /// ([`notified::Notified::down`]), unless this node takes the peer over, whose take-over
    /// wakes every wallet the peer held. Called in the order of the cluster's events, so a
    /// `PeerUp` after it finds nothing of before.
    pub fn peer_down(&self, peer: &str, taken_over_here: bool) -> Vec<(String, i64)> {
        let conns = self.notified.down(peer, now_ms());
        if taken_over_here {
            return Vec::new();
        }
        conns
    }

    /// A link to `peer` came up (the peer up again, or its link back after one closed while
    /// it stayed up): what this node could not notify it of, or queued on a link that then
    /// closed, is notified again now ([`notified::Notified::relinked`]). The peer's sweep
    /// wakes only the sessions it still holds: one that ended meanwhile, its `Disown` lost
    /// with the link, leaves a wallet that nobody would wake or push.
    pub fn peer_up(self: &Arc<Self>, peer: &str) {
        self.wake_again(self.notified.relinked(peer, now_ms()));
    }

    /// Treats the wallets of `conns` that have mail pending as queued now (their session
    /// woken, or the wallet pushed unless pushed since the time given with it), off the
    /// caller's path.
    fn wake_again(self: &Arc<Self>, conns: Vec<(String, i64)>) {
        if conns.is_empty() {
            return;
        }
        let s = self.clone();
        self.tracked.spawn(async move {
            let latest: std::collections::HashMap<String, i64> = conns.into_iter().collect();
            let ids: Vec<String> = latest.keys().cloned().collect();
            wake_pending_with(&s, &ids, |c| latest.get(c).copied()).await;
        });
    }

    /// Wakes the wallets of `conns` (each with the time this node last notified a peer now
    /// found down of its mail) that have mail pending, once the node that takes the peer over
    /// has had [`notified_wake_after_ms`] to find it down too and wake its wallets: each is
    /// treated as queued now, but pushed only if nobody pushed it since that notification (the
    /// take-over did, for mail queued before it). Without a push window
    /// (`min_interval_secs = 0`) nothing records a push, and it is pushed (maybe twice).
    pub async fn wake_notified(self: &Arc<Self>, conns: Vec<(String, i64)>) {
        let after = notified_wake_after_ms(&self.cfg);
        tokio::time::sleep(std::time::Duration::from_millis(after as u64)).await;
        let latest: std::collections::HashMap<String, i64> = conns.into_iter().collect();
        let ids: Vec<String> = latest.keys().cloned().collect();
        wake_pending_with(self, &ids, |c| latest.get(c).copied()).await;
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Lease owner for deliveries over HTTP (they expire, or are acknowledged).
    pub fn http_owner(&self) -> String {
        crate::protocols::lease_owner(&self.mediator.node_id, "http")
    }

    /// Lease owner of one WebSocket session (released when the session ends).
    pub fn session_owner(&self, session: u64) -> String {
        let holder = format!("ws/{}/{session}", std::process::id());
        crate::protocols::lease_owner(&self.mediator.node_id, &holder)
    }

    /// A pickup 1.0 batch ([`AckOnReturn`], leased to `owner`) after its transport wrote it
    /// back on the request's return route (`returned`): removed, as pickup 1.0 has no
    /// acknowledgement. Not written back (no route, not packed, the socket gone): given back
    /// to the queue, and whoever holds the wallet's session woken. Over HTTP a batch counts as
    /// written back once it is in the response: a client that drops the response loses it
    /// (pickup 1.0 has no acknowledgement; 2.0 and 3.0 have).
    pub async fn settle_batch(self: &Arc<Self>, batch: AckOnReturn, owner: &str, returned: bool) {
        let store = &self.mediator.store;
        let conn = batch.conn.as_str();
        if returned {
            if let Err(e) = store.ack(conn, &batch.ids).await {
                tracing::warn!(connection = %conn, "batch not removed (delivered again as its lease runs out): {e}");
            }
            return;
        }
        match store.release(conn, &batch.ids, owner).await {
            // Woken, not pushed: the wallet asked for the batch just now (a batch-pickup with
            // no return route would otherwise push it at every poll).
            Ok(n) if n > 0 => {
                self.reach(conn, EndpointTry::New).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(connection = %conn, "batch not given back (its lease runs out): {e}"),
        }
    }

    /// What a handled message queued (`Outcome::queued_for`, `Outcome::handed`,
    /// `Outcome::repeated`, taken out of `out`): the messages handed to their wallet's session
    /// (entered now, before the message is answered, so that forwards answered in order are
    /// handed in order), the other wallets woken in a task off the request's path.
    pub fn after_forward(self: &Arc<Self>, out: &mut crate::protocols::Outcome) {
        if let Some(h) = out.handed.take() {
            self.hand_off_in_order(h);
        }
        if out.queued_for.is_empty() && out.repeated.is_none() {
            return;
        }
        let s = self.clone();
        let queued = std::mem::take(&mut out.queued_for);
        let repeated = out.repeated.take();
        // Counted: a stopping node waits for it before its workers stop.
        self.tracked.spawn(async move {
            for c in queued {
                s.queued_new(&c).await;
            }
            if let Some(c) = repeated {
                s.queued_again(&c).await;
            }
        });
    }

    /// A forward repeated messages already queued for `conn` ([`Outcome::repeated`]): its
    /// wallet is woken, or pushed, as for a new message if its queue holds pending ones (none
    /// pending: delivered meanwhile, or leased to a session, which has them). Asked with
    /// [`Store::pending_among`](crate::store::Store::pending_among), which stops at the first
    /// pending message: a sender retrying into a long queue does not have it counted each time.
    ///
    /// [`Outcome::repeated`]: crate::protocols::Outcome::repeated
    async fn queued_again(self: &Arc<Self>, conn: &str) {
        let conns = [conn.to_owned()];
        match self.mediator.store.pending_among(&conns, now_ms()).await {
            Ok(pending) if !pending.is_empty() => self.queued_new(conn).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(connection = %conn, "repeated forward: queue not read, nobody woken: {e}"),
        }
    }

    /// The node stops, for good: new sockets are refused, `POST /undrain` too, and a socket
    /// whose client takes none of its bytes (not even the close frame) is given up after
    /// [`wsio::STOP_GRACE`], not `limits.ws_write_stall_ms`.
    pub fn begin_stop(&self) {
        let _ = self.stop_begun_at.set(tokio::time::Instant::now());
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_begun.notify_waiters();
    }

    /// Resolves [`wsio::STOP_GRACE`] after the stop began ([`Shared::begin_stop`]), however
    /// long the caller has waited already.
    pub(crate) async fn stop_grace_over(&self) {
        loop {
            let begun = self.stop_begun.notified();
            tokio::pin!(begun);
            // Registered before the flag is read: a stop beginning in between still wakes it.
            begun.as_mut().enable();
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            begun.await;
        }
        let begun_at = self
            .stop_begun_at
            .get()
            .copied()
            .unwrap_or_else(tokio::time::Instant::now);
        tokio::time::sleep_until(begun_at + wsio::STOP_GRACE).await;
    }

    /// Hands `h` off after the hand-offs of its connection entered before it
    /// (`session::in_order`): a task runs them one at a time, joining those for the same node into
    /// one hand-off of up to a batch, and for a peer up to one frame (`session::handing`).
    ///
    /// A hand-off to a session here holds room in the node's budget for them until it is
    /// done; one that finds none (its connection holds its share, or the budget is spent:
    /// sessions writing to slow sockets) goes back to the queue at once, and the session
    /// leases it from there. (A hand-off to a peer holds room on that peer's side.)
    pub fn hand_off_in_order(self: &Arc<Self>, h: Handed) {
        if h.node != self.mediator.node_id {
            return self.hand_off_held_in_order(h, Held::nothing());
        }
        match self
            .local_room
            .try_hold(&h.conn, handing::carried(&h.msgs), h.msgs.len())
        {
            Some(held) => self.hand_off_held_in_order(h, held),
            None => {
                self.metrics.handed("no-room", h.msgs.len() as u64);
                // Released in its turn: not before the hand-offs entered before it reach the
                // session (released now, a drain could write it ahead of them).
                self.enter_hand_off(handing::Entry::release(h));
            }
        }
    }

    /// [`Shared::hand_off_in_order`] of messages a peer handed to this node, holding `held` (their
    /// room in the budget of the link they came on) until they are handed.
    pub fn hand_off_held_in_order(self: &Arc<Self>, h: Handed, held: Held) {
        let held = if held.bytes() == 0 { Vec::new() } else { vec![held] };
        self.enter_hand_off(handing::Entry::hand(h, held));
    }

    /// Enters `entry` in its connection's hand-offs, starting their runner if none runs.
    fn enter_hand_off(self: &Arc<Self>, entry: handing::Entry) {
        let conn = entry.h.conn.clone();
        let Some(first) = self.handing.enter(&conn, entry) else {
            return;
        };
        let s = self.clone();
        self.tracked.spawn(async move {
            let join = handing::Join {
                local_node: &s.mediator.node_id,
                batch: s.mediator.batch_size.max(1),
                max_frame: s.cluster.as_ref().map(ClusterHandle::max_frame),
            };
            let mut run = s.run_of(conn, first);
            // The session here that did not take a hand-off within [`HAND_LOCAL_WAIT`]: the
            // run's later ones for it go back to the queue without waiting too (a newer
            // session of the wallet here is tried as usual).
            let mut slow: Option<Recipient<Signal>> = None;
            while let Some(e) = run.waiting().and_then(|w| join.take(w)) {
                if e.release {
                    let ids: Vec<i64> = e.h.msgs.iter().map(|m| m.id).collect();
                    s.hand_back(&e.h.node, &e.h.conn, &ids).await;
                } else if let Handing::Slow(session) = s.hand_off(e.h, slow.as_ref()).await {
                    slow = Some(session);
                }
                drop(e.held);
            }
        });
    }

    /// The run of `conn`'s hand-offs that `first` starts. Dropped before it ends (its task
    /// dropped with its HTTP worker's arbiter, or a panic), the hand-offs it had not started
    /// are handed back ([`handing::hand_back_abandoned`]) and the next one starts another run;
    /// the one it was running waits for its lease (a session may have taken it).
    fn run_of(
        self: &Arc<Self>,
        conn: String,
        first: handing::Entry,
    ) -> in_order::Run<'_, handing::Entry, impl FnOnce(std::collections::VecDeque<handing::Entry>)> {
        let s = self.clone();
        in_order::Run::new(&self.handing, conn, first, move |left| {
            handing::hand_back_abandoned(s, left)
        })
    }

    /// A new message was queued for `conn` (a forward this node accepted, deliveries a closed
    /// session left unacknowledged, messages pending when the session that held the wallet
    /// here ended, or a peer's notification that found no session here): wake whoever holds
    /// its session, and when no node holds one, push the wallet. Only the node that queued the
    /// message, or that it woke or notified, calls this, so one node pushes per queued event.
    pub async fn queued_new(self: &Arc<Self>, conn: &str) {
        self.queued_new_unless_pushed_since(conn, None, EndpointTry::New).await;
    }

    /// [`Shared::queued_new`], pushing only if the wallet was not pushed since
    /// `unless_pushed_since_ms` ([`crate::push::PushHandle::queued_unless_pushed_since`]);
    /// `why` the mail is tried at an endpoint.
    async fn queued_new_unless_pushed_since(
        self: &Arc<Self>,
        conn: &str,
        unless_pushed_since_ms: Option<i64>,
        why: EndpointTry,
    ) {
        if !self.reach(conn, why).await {
            if let Some(p) = self.push.get() {
                p.queued_unless_pushed_since(conn, unless_pushed_since_ms);
            }
        }
    }

    /// Forwards queued leased to the node of their wallet's live session
    /// ([`crate::protocols::Outcome::handed`]) go to it: to the session here, or in a `Deliver`
    /// frame to the peer. What no session takes is released and woken as any new message.
    /// `slow`: a session here that did not take an earlier one in time ([`Handing::Slow`]),
    /// not waited for again.
    pub async fn hand_off(self: &Arc<Self>, h: Handed, slow: Option<&Recipient<Signal>>) -> Handing {
        let Handed { node, conn, msgs } = h;
        if node == self.mediator.node_id {
            return self.hand_local(&conn, msgs, slow).await;
        }
        let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
        let frame = msgs
            .into_iter()
            .map(|m| crate::cluster::proto::HandedMsg {
                id: m.id,
                recipient_key: m.recipient_key,
                payload: m.payload,
                received_at_ms: m.received_at_ms,
            })
            .collect();
        if self.cluster.as_ref().is_some_and(|c| c.hand_off(&node, &conn, frame)) {
            self.metrics.handed("peer", ids.len() as u64);
        } else {
            self.hand_back(&node, &conn, &ids).await;
        }
        Handing::Done
    }

    /// Messages of `conn` handed to this node (by a forward here or a peer's `Deliver`): to
    /// the session that holds it here, else released. [`Handing::Slow`]: that session did not
    /// take them within [`HAND_LOCAL_WAIT`] (they were taken back and released), or it is
    /// `slow` (they were released without asking it).
    pub async fn hand_local(
        self: &Arc<Self>,
        conn: &str,
        msgs: Vec<QueuedMessage>,
        slow: Option<&Recipient<Signal>>,
    ) -> Handing {
        let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
        let session = self
            .registry
            .send(SessionFor { conn: conn.to_string() })
            .await
            .ok()
            .flatten();
        let mut handing = Handing::Done;
        let taken = match session {
            Some(s) if slow == Some(&s) => {
                self.metrics.handed("slow", ids.len() as u64);
                handing = Handing::Slow(s);
                false
            }
            Some(s) => {
                // Offered, and taken back unless the session took them within the bound: a
                // session runs only when its socket takes bytes (`wsio`), and one whose wallet
                // stopped reading (a phone that changed networks without a FIN) would hold this
                // connection's later hand-offs behind it, to this node's session and to peers
                // alike, until its write stall gave it up: its wallet, back on another socket,
                // would get nothing live meanwhile. Taken back, they are released, and whichever
                // session holds the wallet leases them. A mailbox dropped with its session
                // answers an error: every message is either in a session's hands or released.
                let offered = Offered::new(msgs);
                match tokio::time::timeout(HAND_LOCAL_WAIT, s.send(Signal::HandOff(offered.clone()))).await {
                    Ok(r) => r.is_ok() && offered.take().is_none(),
                    Err(_) if offered.take().is_some() => {
                        self.metrics.handed("slow", ids.len() as u64);
                        handing = Handing::Slow(s);
                        false
                    }
                    // Taken just as the wait ended.
                    Err(_) => true,
                }
            }
            None => false,
        };
        if taken {
            self.metrics.handed("local", ids.len() as u64);
        } else {
            self.hand_back(&self.mediator.node_id, conn, &ids).await;
        }
        handing
    }

    /// [`Shared::hand_back`] of messages handed to this node, in a task of its own that the
    /// stop waits for ([`Shared::tracked`]).
    pub fn hand_back_later(self: &Arc<Self>, conn: String, ids: Vec<i64>) {
        let s = self.clone();
        self.tracked
            .spawn(async move { s.hand_back(&s.mediator.node_id, &conn, &ids).await });
    }

    /// Messages handed to `node` that no session there took: released (they were leased to
    /// `node`'s hand-off owner), then whoever holds the wallet's session is woken, or the
    /// wallet pushed, as for a new message. Unreleased, they wait for their lease to run out.
    pub async fn hand_back(self: &Arc<Self>, node: &str, conn: &str, ids: &[i64]) {
        self.hand_back_then(node, conn, ids, || {}).await
    }

    /// [`Shared::hand_back`], calling `released` once the store answered, before anyone is
    /// woken.
    pub async fn hand_back_then(self: &Arc<Self>, node: &str, conn: &str, ids: &[i64], released: impl FnOnce()) {
        self.metrics.handed("returned", ids.len() as u64);
        let r = self.mediator.store.release(conn, ids, &handoff_owner(node)).await;
        released();
        match r {
            Ok(n) if n > 0 => self.queued_new(conn).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(connection = %conn, "hand-off not released (its lease runs out): {e}"),
        }
    }

    /// Wakes the session of `conn` here or on its owner node; else delivers to the agent's
    /// own endpoint, if any (`why`: see [`EndpointTry`]). Whether some node holds a session of
    /// it. The registry is asked only when a session here is counted in for `conn`
    /// ([`LocalHolders`]).
    async fn reach(self: &Arc<Self>, conn: &str, why: EndpointTry) -> bool {
        if self.bound.holds(conn)
            && self
                .registry
                .send(WakeLocal { conn: conn.to_string() })
                .await
                .unwrap_or(false)
        {
            return true;
        }
        if let Some(c) = &self.cluster {
            let epoch = self.notified.epoch();
            match c.notify_queued(conn) {
                NotifyOutcome::Sent(peer) => {
                    self.metrics.notifications_sent.inc();
                    // Not kept (the peer was found down meanwhile): pushed now. What could
                    // not be sent to it before is notified again now that one goes out.
                    if let Some(unsent) = self.notified.sent(&peer, conn, now_ms(), epoch) {
                        self.wake_again(unsent);
                        return true;
                    }
                }
                NotifyOutcome::Failed(peer) => {
                    self.metrics.notifications_failed.inc();
                    // Notified again with the next notification that goes out to the peer
                    // or when its link comes back; failed, woken from here once it is found
                    // down.
                    if self.notified.failed(&peer, conn, now_ms(), epoch) {
                        return true;
                    }
                }
                NotifyOutcome::Local | NotifyOutcome::NoOwner => {}
            }
        }
        self.deliver_to_endpoint(conn, why).await;
        false
    }

    /// POSTs a connection's queue to its own HTTP endpoint, if it has one (ACA-Py-style
    /// mediation clients). One drain per connection per node at a time; leases keep nodes
    /// apart. Put off, the messages staying queued for the sweep, while the endpoint backs off
    /// ([`EndpointTry`]) or while the node's `limits.max_endpoint_drains` are all under way
    /// (counted as `deferred` in `mailroom_endpoint_posts_total`).
    async fn deliver_to_endpoint(self: &Arc<Self>, conn: &str, why: EndpointTry) -> EndpointStart {
        let cached = self.endpoint_cache.lock().get(conn).cloned();
        // Whether the connection's mediation must still be read (a cached endpoint).
        let read = cached.is_some();
        let endpoint = match cached {
            Some(e) => e,
            None => {
                let Ok(Some(c)) = self.mediator.store.get_connection(conn).await else {
                    return EndpointStart::Done;
                };
                let e = c
                    .http_endpoint()
                    .filter(|_| c.mediation != MediationState::Denied)
                    .map(str::to_string);
                let mut cache = self.endpoint_cache.lock();
                if cache.len() >= ENDPOINT_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(conn.to_string(), e.clone());
                e
            }
        };
        let Some(endpoint) = endpoint else {
            return EndpointStart::Done;
        };
        let new_only = match self.endpoint_gate(conn, why) {
            Some(new_only) => new_only,
            None => {
                self.metrics.endpoint_post("deferred");
                return EndpointStart::BackingOff;
            }
        };
        if !self.endpoint_busy.lock().insert(conn.to_string()) {
            return EndpointStart::Done;
        }
        let Ok(slot) = self.endpoint_drains.clone().try_acquire_owned() else {
            self.endpoint_busy.lock().remove(conn);
            self.metrics.endpoint_post("deferred");
            // The next sweep pass tries again, not the next endpoint pass.
            self.endpoint_pass_unfinished.store(true, Ordering::Relaxed);
            tracing::debug!(connection = %conn, "endpoint delivery put off: the node's {} drains are under way (limits.max_endpoint_drains)", self.cfg.limits.max_endpoint_drains);
            return EndpointStart::NoSlot;
        };
        let this = self.clone();
        let conn = conn.to_string();
        actix_rt::spawn(async move {
            let _slot = slot;
            // A connection whose mediation was revoked (on any node, after its endpoint was
            // cached here) gets nothing of its queue, as pickup refuses it: read in the store,
            // once per drain. Revocation is for good, so its endpoint is forgotten here.
            let granted = match read {
                false => Ok(Some(true)),
                true => this
                    .mediator
                    .store
                    .get_connection(&conn)
                    .await
                    .map(|c| c.map(|c| c.mediation != MediationState::Denied)),
            };
            match granted {
                Ok(Some(true)) => {
                    let drained = outbound::drain_to_endpoint(&this, &conn, &endpoint, new_only).await;
                    this.endpoint_tried(&conn, drained, new_only);
                }
                Ok(_) => {
                    this.endpoint_cache.lock().insert(conn.clone(), None);
                }
                Err(e) => tracing::warn!(connection = %conn, "endpoint delivery: store: {e}"),
            }
            this.endpoint_busy.lock().remove(&conn);
        });
        EndpointStart::Done
    }

    /// Messages delivered and never acknowledged whose lease ran out (picked up over HTTP by a
    /// wallet that went offline before acknowledging, or left by a session or node that could
    /// not give them back) go back to pending, and their wallets are woken, or pushed, as for a
    /// new message: nobody else would tell a wallet with no session. The store hands each
    /// message to one caller (two nodes may each take some of one wallet's: the push window
    /// folds their pushes). A wallet is pushed for them only while one of them has been
    /// delivered at most [`RECLAIM_PUSHES`] times: a message its wallet takes and never
    /// acknowledges (one it cannot read) wakes its sessions, but does not push it every lease.
    pub async fn reclaim_expired_leases(self: &Arc<Self>) {
        match self
            .mediator
            .store
            .reclaim_expired_leases(now_ms(), RECLAIM_BATCH)
            .await
        {
            Ok(reclaimed) => {
                // Tried before: an endpoint that backs off is not tried again every lease.
                for r in reclaimed {
                    if r.attempts <= RECLAIM_PUSHES {
                        self.queued_new_unless_pushed_since(&r.conn, None, EndpointTry::Again)
                            .await;
                    } else {
                        self.reach(&r.conn, EndpointTry::Again).await;
                    }
                }
            }
            Err(e) => tracing::warn!("sweep: leases that ran out not taken back: {e}"),
        }
    }

    /// One pass of the sweep: wake local sessions of connections with deliverable messages
    /// (a lost notification or an expired lease only delays delivery by one period), and
    /// retry endpoint delivery for connections nobody holds a session for.
    ///
    /// The wake-up half asks the store about the connections this node holds sessions of,
    /// never the whole store: however many offline wallets hold older messages (normal with a
    /// 30-day TTL), a live wallet is reached within one period.
    pub async fn sweep(self: &Arc<Self>, with_endpoints: bool) {
        let local = self.registry.send(LocalConns).await.unwrap_or_default();
        let now = now_ms();
        for chunk in local.chunks(SWEEP_CHUNK) {
            match self.mediator.store.pending_among(chunk, now).await {
                Ok(p) if p.is_empty() => {}
                Ok(p) => {
                    let _ = self.registry.send(WakeMany { conns: p }).await;
                }
                Err(e) => {
                    tracing::warn!("sweep: store unavailable: {e}");
                    return;
                }
            }
        }
        if with_endpoints || self.endpoint_pass_unfinished.load(Ordering::Relaxed) {
            self.retry_endpoints(now).await;
        }
    }

    /// Records how a drain to `conn`'s endpoint ended: after a failure (or messages refused)
    /// the sweep waits its own retry period, doubled for each one in a row up to
    /// [`ENDPOINT_RETRY_MAX_MS`], before it tries again; a drain that emptied the queue
    /// forgets them. A drain of new messages only (`new_only`) that delivered them changes
    /// nothing: the messages tried before it left alone (or still leased, refused) wait for
    /// their retry.
    fn endpoint_tried(&self, conn: &str, drained: outbound::Drained, new_only: bool) {
        let now = std::time::Instant::now();
        let mut backoff = self.endpoint_backoff.lock();
        let endpoint_wide = match drained {
            outbound::Drained::Empty | outbound::Drained::Held if new_only => return,
            outbound::Drained::Empty | outbound::Drained::Held => {
                backoff.remove(conn);
                return;
            }
            outbound::Drained::Refused => false,
            outbound::Drained::Failed => true,
        };
        if backoff.len() >= ENDPOINT_CACHE_MAX && !backoff.contains_key(conn) {
            backoff.clear();
        }
        let period = i64::try_from(self.cfg.delivery.sweep_interval_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(ENDPOINT_RETRY_EVERY as i64);
        let entry = backoff.entry(conn.to_string()).or_insert(Backoff {
            failures: 0,
            next: now,
            endpoint_wide,
        });
        entry.failures = entry.failures.saturating_add(1);
        let wait = period
            .saturating_mul(1i64 << (entry.failures - 1).min(30))
            .min(ENDPOINT_RETRY_MAX_MS);
        entry.next = now + std::time::Duration::from_millis(wait.max(0) as u64);
        entry.endpoint_wide = endpoint_wide;
    }

    /// Whether the sweep should leave `conn`'s endpoint alone for now ([`Shared::endpoint_tried`]).
    fn endpoint_backing_off(&self, conn: &str) -> bool {
        let now = std::time::Instant::now();
        self.endpoint_backoff.lock().get(conn).is_some_and(|b| b.next > now)
    }

    /// Whether `conn`'s endpoint may be tried now for `why`: `None` while it backs off
    /// ([`Shared::endpoint_tried`]), but for new mail to an endpoint that only refused
    /// messages, which goes at once with the messages never tried (`Some(true)`: the drain's
    /// `new_only`); `Some(false)`: a drain of everything.
    fn endpoint_gate(&self, conn: &str, why: EndpointTry) -> Option<bool> {
        let now = std::time::Instant::now();
        match self.endpoint_backoff.lock().get(conn) {
            Some(b) if b.next > now => (why == EndpointTry::New && !b.endpoint_wide).then_some(true),
            _ => Some(false),
        }
    }

    /// Retries endpoint delivery for a page of connections with pending messages that no
    /// node holds a session of, except those backing off after failed drains; the cursor goes
    /// round all of them over successive passes. A pass that finds every drain slot of the
    /// node taken (`limits.max_endpoint_drains`) stops there, and the next goes on from it.
    async fn retry_endpoints(self: &Arc<Self>, now: i64) {
        let after = self.endpoint_cursor.lock().clone();
        let pending = match self
            .mediator
            .store
            .connections_with_pending(now, after.as_deref(), ENDPOINT_PAGE)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("sweep: store unavailable: {e}");
                return;
            }
        };
        let mut next = if pending.len() < ENDPOINT_PAGE {
            None
        } else {
            pending.last().cloned()
        };
        // The last connection of the page dealt with, for a pass that stops short.
        let mut last = after;
        let mut unfinished = false;
        for conn in pending {
            if self.endpoint_backing_off(&conn) {
                last = Some(conn);
                continue;
            }
            if self
                .registry
                .send(IsLocal { conn: conn.clone() })
                .await
                .unwrap_or(false)
            {
                last = Some(conn);
                continue;
            }
            if let Some(c) = &self.cluster {
                if c.owner_of(&conn).is_some() {
                    last = Some(conn);
                    continue;
                }
            }
            if self.deliver_to_endpoint(&conn, EndpointTry::Again).await == EndpointStart::NoSlot {
                // Every drain slot is taken: the next pass goes on from this connection, not
                // past the rest of the page.
                next = last;
                unfinished = true;
                break;
            }
            last = Some(conn);
        }
        *self.endpoint_cursor.lock() = next;
        self.endpoint_pass_unfinished.store(unfinished, Ordering::Relaxed);
    }
}

/// [`crate::protocols::Holders`] of a node: the cluster's directory, or without a cluster
/// the sessions held here. Nothing is handed under `queue-only`: a session there delivers
/// only in live mode, which another node cannot see.
pub struct NodeHolders {
    pub node_id: String,
    pub cluster: Option<ClusterHandle>,
    pub local: Arc<LocalHolders>,
    pub strategy: crate::config::Strategy,
    /// Where a rotation's closes go ([`crate::protocols::Holders::rotated`]).
    pub registry: Addr<Registry>,
}

/// Why a session bound by a DID that rotated away is closed (1008, as an operator's close: the
/// socket must not carry on as it was; the wallet reconnects as its new DID).
pub const ROTATED_REASON: &str = "the DID of this connection rotated: reconnect as the new DID";

/// The session whose lease owner is `owner` ([`Shared::session_owner`]) on `node`, if it is
/// one of this process's WebSocket sessions.
pub fn session_of_owner(node: &str, owner: &str) -> Option<u64> {
    let holder = owner.strip_prefix(&crate::protocols::node_owners(node))?;
    let session = holder.strip_prefix(&format!("ws/{}/", std::process::id()))?;
    session.parse().ok()
}

impl crate::protocols::Holders for NodeHolders {
    fn holder(&self, conn: &str, len: usize) -> Option<String> {
        if self.strategy == crate::config::Strategy::QueueOnly {
            return None;
        }
        match &self.cluster {
            Some(c) => c.holder(conn, len),
            None => self.local.holds(conn).then(|| self.node_id.clone()),
        }
    }

    fn rotated(&self, conn: &str, kept_owner: &str) {
        self.registry.do_send(CloseConn {
            conn: conn.to_string(),
            code: crate::admin::OPERATOR_CLOSE_CODE,
            reason: ROTATED_REASON.into(),
            except: session_of_owner(&self.node_id, kept_owner),
        });
        // The transport that carried the rotation is on this node: every session elsewhere
        // was bound by the old DID. Once, not repeated to links that come up later; a session
        // that missed it (or bound by the old DID after it) closes at its drain's re-read of
        // the connection (`ws.rs`, `Drained::Rotated`).
        if let Some(c) = &self.cluster {
            c.close_sessions_once(conn, ROTATED_REASON);
        }
    }
}

/// [`crate::push::Presence`] over this node's registry and the cluster directory: a wallet is
/// online when a session of it is bound here or announced by any node.
pub struct NodePresence {
    pub registry: Addr<Registry>,
    pub cluster: Option<ClusterHandle>,
}

impl crate::push::Presence for NodePresence {
    fn online<'a>(&'a self, conn: &'a str) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            if self
                .registry
                .send(IsLocal { conn: conn.to_string() })
                .await
                .unwrap_or(false)
            {
                return true;
            }
            // As a notification finds it: a session of a node found down or removed (its claims
            // not all swept from the directory yet) died with it, and its wallet needs a push.
            self.cluster
                .as_ref()
                .map(|c| c.live_owner_of(conn).is_some())
                .unwrap_or(false)
        })
    }
}

/// The wallets of `conns` that have mail pending, each treated as if a message were queued now
/// ([`Shared::queued_new`]: its session woken wherever it is, else the wallet pushed): what a
/// failed peer, a restart or a failed notification left with nobody told. A store that fails
/// is asked again, every `delivery.sweep_interval_ms`, until the node begins to stop: nothing
/// else would wake those wallets.
pub async fn wake_pending(shared: &Arc<Shared>, conns: &[String]) {
    wake_pending_with(shared, conns, |_| None).await;
}

/// Every wallet with mail pending and mediation not revoked, each treated as if a message
/// were queued now, as [`wake_pending`] does: after a run of this node that ended without its
/// stop, on a store that kept its deliveries in memory (sled), nothing tells whose sessions
/// were live, and their sockets died with it. Nothing else will wake those wallets, so a
/// store that fails is tried again (every `delivery.sweep_interval_ms`, from where it
/// failed), and an operator's drain does not end it (it wakes sessions elsewhere, or pushes):
/// only the node's stop does. Returns how many wallets it woke, and whether it reached them
/// all (false: the node began to stop).
pub async fn wake_all_pending(shared: &Arc<Shared>) -> (usize, bool) {
    let mut after: Option<String> = None;
    let mut woken = 0;
    let store = &shared.mediator.store;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return (woken, false);
        }
        let asked = asked_until_answered(shared, "wallets with mail pending", || {
            store.connections_with_pending(now_ms(), after.as_deref(), WAKE_PENDING_CHUNK)
        });
        let Some(page) = asked.await else {
            return (woken, false);
        };
        for c in &page {
            let asked = asked_until_answered(shared, "wallets with mail pending", || store.get_connection(c));
            let Some(conn) = asked.await else {
                return (woken, false);
            };
            // A revoked connection keeps its queue and its device: pickup refuses it.
            if conn.is_some_and(|conn| conn.mediation == MediationState::Denied) {
                continue;
            }
            shared.queued_new(c).await;
            woken += 1;
        }
        if page.len() < WAKE_PENDING_CHUNK {
            return (woken, true);
        }
        after = page.last().cloned();
    }
}

/// What `ask` gets from the store, asked again every `delivery.sweep_interval_ms` while the
/// store fails (a failover, a pool timeout), from the wake-ups nothing else would do: None
/// once the node begins to stop.
pub(super) async fn asked_until_answered<T, F, Fut>(shared: &Shared, what: &str, mut ask: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::store::StoreResult<T>>,
{
    let again = std::time::Duration::from_millis(shared.cfg.delivery.sweep_interval_ms);
    loop {
        match ask().await {
            Ok(answer) => return Some(answer),
            Err(e) => {
                // The wait ends as the stop begins (the stop waits for the wake-ups it
                // tracks), registered before the flag is read: a stop in between ends it too.
                let begun = shared.stop_begun.notified();
                tokio::pin!(begun);
                begun.as_mut().enable();
                if shared.stopping.load(Ordering::SeqCst) {
                    return None;
                }
                tracing::warn!("{what}: store unavailable, tried again in {again:?}: {e}");
                tokio::select! {
                    _ = begun => return None,
                    _ = tokio::time::sleep(again) => {}
                }
            }
        }
    }
}

/// [`wake_pending`], each wallet pushed only if not pushed since `since(conn)`, if any.
async fn wake_pending_with(shared: &Arc<Shared>, conns: &[String], since: impl Fn(&str) -> Option<i64>) {
    let store = &shared.mediator.store;
    for chunk in conns.chunks(WAKE_PENDING_CHUNK) {
        // Asked again while the store fails: these wallets' mail is pending with no lease (a
        // failed peer's, or the run before's, given back), and no other wake-up reaches them.
        let asked = asked_until_answered(shared, "wallets to wake", || store.pending_among(chunk, now_ms()));
        let Some(pending) = asked.await else {
            tracing::warn!(wallets = conns.len(), "wallets left untold: the node stops");
            return;
        };
        for c in pending {
            shared
                .queued_new_unless_pushed_since(&c, since(&c), EndpointTry::New)
                .await;
        }
    }
}

/// How long after finding a peer down a node that does not take it over waits before it wakes
/// the wallets it notified the peer of ([`Shared::wake_notified`]): twice the failure timeout,
/// for the node that takes over to find the peer down (a heartbeat apart at most) and push
/// for what was queued before it, however slow its directory sweep.
pub fn notified_wake_after_ms(cfg: &Config) -> i64 {
    cfg.cluster.failure_timeout_ms.min(i64::MAX as u64 / 4) as i64 * 2
}
