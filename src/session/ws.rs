//! A WebSocket session actor (actix-web-actors; keep it in this file so a move to actix-ws
//! touches one place).
//!
//! The socket binds to a connection when that connection sends a message on it with
//! return-route `all` (`thread` only brings that thread's replies back); from then on it is registered with the registry, which wakes it when a
//! message is queued. A woken session drains from the store itself:
//! - pickup 2.0 live mode: `delivery` messages, leased until messages-received;
//! - otherwise (implicit pickup, `DirectDelivery`): the raw forwarded messages, deleted once
//!   the wallet's end answered a ping sent after them (`session/confirm.rs`), as is a pickup 1.0
//!   batch written back on the socket.
//!
//! The handshake and the socket are not here: [`super::upgrade`] accepts the socket, and
//! [`super::wsio`] reads its frames (the context's `StreamHandler`) and writes its output.
//!
//! Binary and text frames are accepted; replies are text frames. Heartbeats: a ping every
//! `HEARTBEAT`, closed after `CLIENT_TIMEOUT` without a pong or frame.

use super::confirm::Confirming;
use super::give_back::{gave_back, give_back_msgs, left, release_all, session_ended, wake_lent, SocketEnd};
use super::live_window::{hold_in_queue_order, take_excess, LiveWindow, HELD_BACK_BATCHES, HELD_BACK_MAX_BYTES};
use super::upgrade::SocketSlot;
use super::Shared;
use crate::config::Strategy;
use crate::didcomm::message::ReturnRoute;
use crate::protocols::{now_ms, pickup, Outcome};
use crate::registry::{Register, Signal, Unregister, Wake};
use crate::store::QueuedMessage;
use crate::store::{Connection, MediationState};
use actix::prelude::*;
use actix_web_actors::ws;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

const HEARTBEAT: Duration = Duration::from_secs(15);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive unreadable frames before the socket is closed (policy violation).
const MAX_BAD_FRAMES: u32 = 20;
/// A message begun in fragments: its bytes so far, counted in the node's budget for
/// unfinished messages ([`super::unfinished`]; 16 x the larger message limit, 64 MiB by
/// default). Real clients send a message in one frame; a fragment that would take the node
/// past the budget closes its socket (1013, try again later).
struct Partial {
    /// Which one it is on this socket (its deadline's check names it).
    seq: u64,
    buf: BytesMut,
    /// Its deadline's timer, cancelled as soon as the message is whole or refused: one timer
    /// per socket at most, not one per fragmented message for `limits.message_timeout_ms`.
    deadline: SpawnHandle,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Not bound, or bound without anything to push (QueueOnly).
    Quiet,
    /// Raw forwarded messages pushed as they arrive (implicit pickup / DirectDelivery).
    Implicit,
    /// pickup 2.0 live mode.
    Live,
}

pub struct WsSession {
    id: u64,
    shared: Arc<Shared>,
    /// The bound connection: one copy per node, shared by its sessions ([`super::held`]).
    conn: Option<Arc<Connection>>,
    mode: Mode,
    /// Use the legacy `did:sov:` prefix for live deliveries: the wallet turned live mode on
    /// with it (read off the status answering it, whose prefix mirrors the request's as every
    /// reply's does, `Inbound::reply`).
    legacy: bool,
    last_seen: Instant,
    /// When a forward on this socket last queued new mail (or the socket opened): a socket
    /// bound to no connection is closed once this is `limits.unbound_socket_idle_secs` old
    /// ([`WsSession::watch_unbound`]).
    last_forward: Instant,
    /// When the bound connection's mediation was last read in the store (`now_ms`): a drain
    /// reads it again once half a lease has passed ([`WsSession::drain`]).
    mediation_read_ms: i64,
    draining: bool,
    wake_again: bool,
    bad_frames: u32,
    /// A message begun in fragments, if any ([`WsSession::on_frame_part`]).
    partial: Option<Partial>,
    /// Messages begun in fragments on this socket so far.
    partial_seq: u64,
    /// Registered with the registry for `conn` (false once a newer session elsewhere
    /// superseded this one, until it binds again).
    registered: bool,
    /// Messages of this socket being handled now (`limits.max_ws_inflight`).
    inflight: usize,
    /// Live deliveries out and not yet acknowledged on this socket.
    window: LiveWindow,
    /// A drain waits for the window: a timer to reopen it is set.
    window_timer: bool,
    /// Its place under `limits.max_sessions`, shared with the requests it reads (they may end
    /// after it): a socket closed and reopened does not multiply the work in flight.
    slot: Arc<SocketSlot>,
    /// Set when the session has stopped: a lease still in flight then gives its messages back
    /// (see [`WsSession::drain`]); and what its requests leased for (a pickup over return
    /// route `thread`, say, while not bound to that connection): its end releases the owner
    /// for those too.
    end: Arc<SocketEnd>,
    /// What was handed to this session ([`Signal::HandOff`]); boxed, and only once something
    /// is: an idle session holds one pointer for it.
    handed: Option<Box<HandedHere>>,
    /// How many hand-backs ([`WsSession::spill`], leased messages given back) were ever begun:
    /// kept apart from `handed`, which a rebind drops while they run.
    spills_begun: u64,
    /// The lowest id of each hand-back still on its way to the queue (a spill, or leased
    /// messages given back), counted: a lease may have read past those not yet released.
    returning: std::collections::BTreeMap<i64, usize>,
    /// The lowest id of the hand-backs begun since the current drain began: its leased
    /// messages from there on wait (given back) behind them, as behind those on their way
    /// when it began ([`lease_floor`]).
    returning_floor: i64,
    /// Times the session began delivering (bound, live mode turned on): a lease begun before
    /// the last of them cannot tell that the queue caught up ([`HandedHere::catching_up`]).
    queue_news: u64,
    /// Written with no acknowledgement to wait for (implicit pickup, a pickup 1.0 batch), and
    /// removed once a ping sent after it is answered; boxed, and only once something is.
    confirming: Option<Box<Confirming>>,
    /// A drain waits for a pong: as much as may be is written and unconfirmed.
    wake_on_pong: bool,
}

/// Messages handed to a session, leased to the node's hand-off owner, not to the session.
#[derive(Default)]
struct HandedHere {
    /// Written, with their lease deadline: released when the session ends (those acknowledged
    /// meanwhile release nothing).
    written: std::collections::VecDeque<(i64, i64)>,
    /// Handed in live mode, waiting for the live window, in queue order: they go out as it
    /// opens, before anything is leased. Bounded ([`take_excess`]): past the bounds the newest
    /// go back to the queue.
    held_back: Vec<QueuedMessage>,
    /// Some went back to the queue: later hand-offs follow them there (held here they would go
    /// out before them), until a drain that began with none still going back, and during which
    /// none began, finds the queue caught up.
    spilled: bool,
    /// The queue may hold messages older than those handed now (the backlog of a session that
    /// began delivering: bound, or live mode turned on): handed messages are held back,
    /// bounded, until a drain finds the queue caught up, and go out after it. Written at once
    /// they would go out before the older ones.
    catching_up: bool,
}

/// A hand-back ([`WsSession::spill`], [`WsSession::give_back_leased`]) was released in the
/// store: the lowest id it took back.
#[derive(Message)]
#[rtype(result = "()")]
struct SpillReleased {
    lowest: i64,
}

/// Why a drain leased nothing.
enum Drained {
    Store(crate::store::StoreError),
    /// The bound connection's mediation was revoked (read in the store).
    Revoked,
    /// The bound connection's peer DID is another one now (a DIDComm v2 rotation): this
    /// socket was bound by the old one. Holds the DID the store names now.
    Rotated(Option<String>),
}

impl WsSession {
    pub(super) fn new(shared: Arc<Shared>, slot: SocketSlot) -> WsSession {
        let live_ack_wait = Duration::from_millis(shared.cfg.delivery.live_ack_wait_ms);
        WsSession {
            id: shared.next_session_id(),
            shared,
            conn: None,
            mode: Mode::Quiet,
            legacy: false,
            last_seen: Instant::now(),
            last_forward: Instant::now(),
            mediation_read_ms: 0,
            draining: false,
            wake_again: false,
            bad_frames: 0,
            partial: None,
            partial_seq: 0,
            registered: false,
            inflight: 0,
            window: LiveWindow::new(live_ack_wait),
            window_timer: false,
            slot: Arc::new(slot),
            end: Arc::default(),
            handed: None,
            returning: std::collections::BTreeMap::new(),
            returning_floor: i64::MAX,
            queue_news: 0,
            confirming: None,
            wake_on_pong: false,
            spills_begun: 0,
        }
    }

    fn owner(&self) -> String {
        self.shared.session_owner(self.id)
    }

    fn conn_id(&self) -> &str {
        self.conn.as_ref().map(|c| c.id.as_str()).unwrap_or("-")
    }

    fn on_envelope(&mut self, bytes: Bytes, ctx: &mut ws::WebsocketContext<Self>) {
        self.last_seen = Instant::now();
        // A client that writes faster than its messages are handled would otherwise grow this
        // session's tasks (and store load) without bound.
        let max = self.shared.cfg.limits.max_ws_inflight;
        if self.inflight >= max {
            self.shared
                .metrics
                .rejected("busy", crate::protocols::v2::envelope_label(&bytes));
            ctx.text(
                serde_json::json!({
                    "error": "busy",
                    "reason": format!("{max} messages of this socket are being handled (limits.max_ws_inflight): send again"),
                })
                .to_string(),
            );
            return;
        }
        self.inflight += 1;
        let version = crate::protocols::v2::envelope_label(&bytes);
        // Started now and run apart from the session: it ends even if the session stops
        // meanwhile, and then gives back what it leased (see `give_back::handle_detached`).
        let task = super::give_back::handle_detached(
            self.shared.clone(),
            bytes,
            self.owner(),
            self.end.clone(),
            self.slot.clone(),
        );
        // ctx.spawn, not ctx.wait: heartbeats and deliveries go on while the store works.
        ctx.spawn(
            task.into_actor(self)
                .map(move |res, act, ctx| act.handled(res, version, ctx)),
        );
    }

    fn handled(
        &mut self,
        res: Result<Outcome, crate::protocols::HandleError>,
        version: &'static str,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        self.inflight -= 1;
        match res {
            Ok(out) => {
                self.bad_frames = 0;
                if out.forward == Some(crate::protocols::ForwardResult::Queued { duplicate: false }) {
                    self.last_forward = Instant::now();
                }
                self.apply(out, ctx);
            }
            Err(e) => {
                self.shared.metrics.rejected(e.code(), version);
                tracing::info!(
                    connection = self.conn_id(),
                    session = self.id,
                    code = e.code(),
                    "frame refused: {e}"
                );
                match &e {
                    // A DIDComm v2 refusal: its problem report, packed for the sender.
                    crate::protocols::HandleError::Problem { packed, .. } => {
                        ctx.text(String::from_utf8_lossy(packed).into_owned())
                    }
                    _ => ctx.text(e.body().to_string()),
                }
                // Decided on the refusal's kind by its code, which a DIDComm v2 refusal (a
                // `Problem`: the report packed for its sender) keeps from the error it reports.
                // Input the store cannot hold (`unstorable`) is the sender's, no outage.
                let code = e.code();
                let outage = code == "store-unavailable";
                if outage && !self.registered {
                    // Nothing is bound to this socket yet (its binding message is the one
                    // refused): a wallet would wait on it for deliveries that never come.
                    // 1013 (try again later) makes it reconnect and ask again. A forward
                    // refused for the disk reserve binds nothing, and closing would not help.
                    close_with(ctx, ws::CloseCode::Again, "store unavailable: reconnect and try again");
                    return;
                }
                // Refusals for the node's state (a full queue, the disk reserve) are not the
                // client's bad frames: a sender forwarding over its socket through such an
                // episode is answered each time, never closed for it.
                let ours = matches!(code, "queue-full" | "store-full");
                if !ours {
                    self.bad_frames += 1;
                }
                if self.bad_frames >= MAX_BAD_FRAMES {
                    close_with(ctx, ws::CloseCode::Policy, "too many refused messages");
                }
            }
        }
    }

    fn apply(&mut self, out: Outcome, ctx: &mut ws::WebsocketContext<Self>) {
        let shared = self.shared.clone();
        if out.acked > 0 {
            shared.metrics.acknowledged(out.acked, &out.ack_lags_ms);
        }
        if !out.leased.is_empty() {
            let v = out
                .connection
                .as_ref()
                .map(crate::protocols::v2::version_label)
                .unwrap_or("v1");
            shared.metrics.delivered("pickup", v, out.leased.len() as u64);
        }
        // Replies come back here with any return route; only `all` (RFC 0092: every message
        // for the sender) makes the socket a delivery channel. `thread` asks for that thread's
        // replies, nothing queued. (DIDComm v2 answers as `all`.)
        let wants_route = !matches!(out.return_route, ReturnRoute::None);
        // A connection whose mediation was revoked gets nothing of its queue (pickup refuses
        // it too): the socket does not deliver for it, and one still bound to it (its node
        // missed the revocation's close) closes after its replies, as the revocation closes it
        // (or at its next drain past half a lease, whichever comes first).
        let mut revoked_here = false;
        if let Some(conn) = &out.connection {
            if conn.mediation == MediationState::Denied {
                revoked_here = self.registered && self.conn.as_ref().is_some_and(|h| h.id == conn.id);
            } else if out.return_route == ReturnRoute::All && !crate::protocols::v2::is_ephemeral(conn) {
                // A v2 reply address that is not a stored connection binds nothing.
                self.bind(conn, ctx);
            }
        }
        // Only the connection the socket delivers for steers how it delivers.
        let bound_to_sender = self.registered
            && out
                .connection
                .as_ref()
                .is_some_and(|c| self.conn.as_ref().is_some_and(|h| h.id == c.id));
        if let Some(live) = out.live_mode.filter(|_| bound_to_sender) {
            let was_live = self.mode == Mode::Live;
            self.mode = if live {
                Mode::Live
            } else {
                self.conn.as_ref().map_or(Mode::Quiet, |c| self.idle_mode(c))
            };
            self.window.clear();
            if live {
                self.legacy = replies_legacy(&out.replies);
                // What queued before live mode goes out before what is handed from now on.
                self.catch_up();
                ctx.notify(Wake);
            } else if was_live && self.mode == Mode::Implicit {
                // What the live window held goes out raw now, not at the next hand-off.
                ctx.notify(Wake);
            } else if was_live && self.mode == Mode::Quiet {
                // A quiet socket never writes what the live window held back: it goes back to
                // the queue at once (status counts it, a delivery-request takes it), not at its
                // hand-off lease's end, to be written after the wallet acknowledged it there.
                // Later hand-offs follow it there once live mode is back, as after a spill.
                let h = self.handed.get_or_insert_with(Box::default);
                h.spilled = true;
                let held = std::mem::take(&mut h.held_back);
                if !held.is_empty() {
                    self.spill(held, ctx);
                }
            }
        }
        // Acknowledged on the socket that delivers: its window moves on. An acknowledgement
        // elsewhere wakes nobody (it makes nothing deliverable; see `session::http`).
        if out.acked > 0 && bound_to_sender {
            self.window.acknowledged(out.acked);
            ctx.notify(Wake);
        }
        // Whether `replies[0]` went out on this socket (a pickup 1.0 batch is removed only
        // then, once confirmed read), and its size.
        let mut returned = false;
        let mut returned_bytes = 0;
        if let Some(conn) = out.connection.clone() {
            if wants_route {
                // A stopping socket writes nothing more.
                let open = ctx.state() == ActorState::Running;
                for (i, r) in out.replies.iter().enumerate() {
                    match shared.mediator.pack_for(&conn, r) {
                        Ok(p) => {
                            if i == 0 && open {
                                returned = true;
                                returned_bytes = p.len();
                            }
                            ctx.text(String::from_utf8_lossy(&p).into_owned());
                        }
                        Err(e) => tracing::warn!(connection = %conn.id, "reply not packed: {e}"),
                    }
                }
            } else if !out.replies.is_empty() {
                let replies = out.replies;
                let s = shared.clone();
                actix_rt::spawn(async move { super::outbound::send_replies(&s, &conn, &replies).await });
            }
        }
        if let Some(b) = out.ack_on_return {
            if returned {
                // Removed once the wallet's end confirms it read it; given back with the
                // socket's leases (or those of its requests) if it never does.
                shared.metrics.delivered("pickup", "v1", b.ids.len() as u64);
                self.confirm_written(&b.conn, b.ids, returned_bytes, ctx);
            } else {
                let owner = self.owner();
                // Holds the socket's slot: a stopping node waits for it.
                let slot = self.slot.clone();
                actix_rt::spawn(async move {
                    let _slot = slot;
                    shared.settle_batch(b, &owner, false).await
                });
            }
        }
        if revoked_here {
            self.close_revoked(ctx);
        }
    }

    /// Closes the socket of a connection whose mediation was revoked, as the revocation does.
    fn close_revoked(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        close_with(
            ctx,
            ws::CloseCode::from(crate::admin::OPERATOR_CLOSE_CODE),
            "mediation revoked (or the connection removed) by the mediator's operator",
        );
    }

    /// What this socket pushes for `conn` when not in live mode, by strategy. A DIDComm v2
    /// wallet gets nothing raw: v2 answers every message on its socket (as return route
    /// `all`), so any message a wallet sent there (a status poll, a ping, live mode turned
    /// off) would otherwise have its queue written raw and removed unacknowledged; pickup
    /// 3.0 removes only what `messages-received` names.
    fn idle_mode(&self, conn: &Connection) -> Mode {
        if conn.protocol == crate::protocols::v2::PROTOCOL {
            return Mode::Quiet;
        }
        match self.shared.cfg.delivery.strategy {
            Strategy::QueueOnly => Mode::Quiet,
            Strategy::QueueAndLiveModeDelivery | Strategy::DirectDelivery => Mode::Implicit,
        }
    }

    fn bind(&mut self, conn: &Connection, ctx: &mut ws::WebsocketContext<Self>) {
        if self.shared.draining.load(Ordering::Relaxed) && !self.registered {
            // The node drains: no new session here; the wallet reconnects elsewhere.
            close_with(ctx, ws::CloseCode::Away, "mediator node draining: reconnect");
            return;
        }
        let same = self.conn.as_ref().map(|c| c.id == conn.id).unwrap_or(false);
        if same && self.registered {
            if self.conn.as_deref() != Some(conn) {
                self.let_go();
                self.conn = Some(self.shared.held.hold(conn));
            }
            return;
        }
        match self.conn.as_ref() {
            // Superseded, and speaking again: bind anew (a newer epoch takes ownership back).
            Some(old) if old.id == conn.id => {}
            // Rebound to another connection: still one session.
            Some(old) => {
                let old = old.id.clone();
                self.shared.registry.do_send(Unregister {
                    conn: old.clone(),
                    session: self.id,
                });
                self.leave(&old);
            }
            None => {
                self.shared.metrics.sessions.inc();
            }
        }
        // Counted in for a connection while registered for it (here: rebound to another).
        if self.registered {
            if let Some(old) = &self.conn {
                self.shared.bound.count_out(&old.id);
            }
        }
        self.let_go();
        self.registered = true;
        self.shared.registry.do_send(Register {
            conn: conn.id.clone(),
            session: self.id,
            to: ctx.address().recipient(),
        });
        if self.mode == Mode::Quiet {
            self.mode = self.idle_mode(conn);
        }
        self.conn = Some(self.shared.held.hold(conn));
        // Read again at the first drain: the message that binds read the connection before
        // it was handled, and a revocation committed since (its close reaching the registry
        // before this session's `Register`) would otherwise go unseen for half a lease.
        self.mediation_read_ms = 0;
        // After the `Register` above and before the drain below (see `LocalHolders`).
        self.shared.bound.count_in(&conn.id);
        // Anything already queued goes out now, before what is handed from now on.
        self.catch_up();
        ctx.notify(Wake);
    }

    /// The queue may hold messages older than those handed from now on: they wait for it.
    fn catch_up(&mut self) {
        self.handed.get_or_insert_with(Box::default).catching_up = true;
        self.queue_news += 1;
    }

    /// The socket delivers for another connection from now on: nothing of `old`'s delivery
    /// carries over (its live window, its mode: the new connection did not ask for live mode),
    /// and the messages handed to this socket for `old`, written or held back, go back to it
    /// at once; when it held `old`'s session (registered), `old` is woken if mail is pending
    /// for it, as at a session's end ([`left`]). (Deliveries this session leased for `old` go
    /// back as their lease runs out or the session ends or is superseded; one still being
    /// leased goes back as it lands, see `push`.) `old` is recorded as lent for: the session's
    /// end, or its supersession, which releases every lease of its owner, wakes `old` too,
    /// else a wallet given back a delivery it never acknowledged would not be told (pushed)
    /// until new mail came.
    fn leave(&mut self, old: &str) {
        self.window.clear();
        self.mode = Mode::Quiet;
        self.end.lent_for(old);
        let ids = self.handed_ids();
        let held = self.registered;
        if ids.is_empty() && !held {
            return;
        }
        let (shared, old) = (self.shared.clone(), old.to_string());
        // After the `Unregister` sent for `old` (and its count out, in `bind`): the wake-up
        // finds no session of it here.
        self.shared
            .tracked
            .spawn(async move { left(&shared, &old, &ids, held).await });
    }

    /// Gives the bound connection's shared copy back (the last session of it frees it).
    fn let_go(&mut self) {
        if let Some(c) = self.conn.take() {
            self.shared.held.let_go(c);
        }
    }

    /// Whether a live delivery may go out now ([`LiveWindow`]); when not, a timer drains again
    /// as the window's wait runs out (an acknowledgement on the socket wakes it sooner).
    fn window_open(&mut self, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let Some(wait) = self.window.closed_for(Instant::now()) else {
            return true;
        };
        if !self.window_timer {
            self.window_timer = true;
            ctx.run_later(wait, |act, ctx| {
                act.window_timer = false;
                act.drain(ctx);
            });
        }
        false
    }

    /// Writes the handed messages waiting for the live window, a batch at a time while it is
    /// open (a full batch holds nothing back), even while a lease runs.
    fn send_held(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let batch = self.shared.mediator.batch_size.max(1);
        while self
            .handed
            .as_ref()
            .is_some_and(|h| !h.held_back.is_empty() && !h.catching_up)
        {
            if self.mode == Mode::Live && !self.window_open(ctx) {
                return;
            }
            if self.unconfirmed_full() {
                self.wake_on_pong = true;
                return;
            }
            let held = &mut self.handed.as_mut().expect("checked above").held_back;
            let msgs: Vec<QueuedMessage> = held.drain(..held.len().min(batch)).collect();
            self.push(msgs, true, ctx);
        }
    }

    /// Leases one batch and pushes it; schedules the next batch while batches come back full.
    fn drain(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        if self.mode == Mode::Quiet || self.conn.is_none() || !self.registered {
            return;
        }
        self.send_held(ctx);
        if self.draining {
            self.wake_again = true;
            return;
        }
        if self.mode == Mode::Live && !self.window_open(ctx) {
            return;
        }
        if self.unconfirmed_full() {
            // As much as may be is written and unconfirmed: the pong that confirms some of
            // it drains again ([`WsSession::on_pong`]).
            self.wake_on_pong = true;
            return;
        }
        self.draining = true;
        self.wake_again = false;
        // Nothing on its way back to the queue as this lease begins: if it comes back short
        // and no hand-back began meanwhile, the queue has caught up with what went back.
        let clean_start = self.returning.is_empty();
        let spills_before = self.spills_begun;
        let returning_at_start: Vec<i64> = self.returning.keys().copied().collect();
        self.returning_floor = i64::MAX;
        let news_before = self.queue_news;
        let shared = self.shared.clone();
        let conn_id = self.conn.as_ref().expect("checked above").id.clone();
        let bound_did = self.conn.as_ref().and_then(|c| c.their_did.clone());
        let leased_for = conn_id.clone();
        let owner = self.owner();
        let batch = shared.mediator.batch_size;
        let lease_ms = shared.mediator.lease_ms;
        let end = self.end.clone();
        // A revocation this node missed (its close frame lost to a cut link) is found here,
        // reading the connection in the store at most once per half lease: deliveries in
        // flight at the revocation that come back when their lease runs out find it (those
        // given back sooner, by a closing session or a take-over, may go out first).
        let read_mediation = now_ms().saturating_sub(self.mediation_read_ms) >= lease_ms / 2;
        // The lease runs detached: a session that stops meanwhile drops this future but not
        // the store's lease, which may land after `stopped` released the owner's messages.
        // Then the lease gives them back itself (`closed` is set before that release), or
        // they would stay leased to a gone socket until the lease ran out.
        // The socket's slot is held until the lease lands: a stopping node waits for every
        // slot before its workers stop (a lease dropped with its worker stays leased to a gone
        // socket until it runs out).
        let slot = self.slot.clone();
        let fut = async move {
            let leased = actix_rt::spawn(async move {
                let _slot = slot;
                let store = &shared.mediator.store;
                let mut read_at = None;
                if read_mediation {
                    let at = now_ms();
                    match store.get_connection(&conn_id).await {
                        Ok(Some(c)) if c.mediation == MediationState::Denied => return Err(Drained::Revoked),
                        // Bound by a DID the connection rotated away from: its close went
                        // missing, or the socket bound with a record read before the rotation.
                        Ok(Some(c)) if c.their_did != bound_did => return Err(Drained::Rotated(c.their_did)),
                        Ok(Some(_)) => read_at = Some(at),
                        Ok(None) => return Err(Drained::Revoked),
                        Err(e) => return Err(Drained::Store(e)),
                    }
                }
                let now = now_ms();
                let max_bytes = shared.mediator.delivery_max_bytes;
                let r = store
                    .lease_upto(&conn_id, batch, max_bytes, &owner, now, now.saturating_add(lease_ms))
                    .await;
                if let Ok(msgs) = &r {
                    if !msgs.is_empty() && end.closed() {
                        let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
                        let released = store.release(&conn_id, &ids, &owner).await;
                        gave_back(&shared, &conn_id, released).await;
                    }
                }
                r.map(|m| (m, read_at)).map_err(Drained::Store)
            });
            leased.await.unwrap_or_else(|e| {
                Err(Drained::Store(crate::store::StoreError::Unavailable(format!(
                    "lease task: {e}"
                ))))
            })
        };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.draining = false;
            let msgs = match res {
                Ok((m, read_at)) => {
                    if let Some(t) = read_at {
                        act.mediation_read_ms = t;
                    }
                    m
                }
                Err(Drained::Store(e)) => {
                    tracing::warn!(connection = act.conn_id(), "drain: store: {e}");
                    if act.wake_again || act.handed.as_ref().is_some_and(|h| h.catching_up) {
                        // What is handed meanwhile waits for a drain that finds the queue
                        // caught up: tried again, not left to the next hand-off or its lease.
                        let again = Duration::from_millis(act.shared.cfg.delivery.sweep_interval_ms);
                        ctx.run_later(again, |_, ctx| ctx.notify(Wake));
                    }
                    return;
                }
                Err(Drained::Revoked) => {
                    tracing::info!(connection = act.conn_id(), "mediation revoked: socket closed");
                    act.close_revoked(ctx);
                    return;
                }
                // The socket that carried the rotation is bound by the new DID since this drain
                // began (its handler wrote the store, then rebound it): it was not bound by the
                // old one, it stays; what it did not lease is leased by the next drain.
                Err(Drained::Rotated(now)) if act.conn.as_ref().is_some_and(|c| c.their_did == now) => {
                    ctx.notify(Wake);
                    return;
                }
                Err(Drained::Rotated(_)) => {
                    tracing::info!(connection = act.conn_id(), "bound by a DID rotated away: socket closed");
                    close_with(
                        ctx,
                        ws::CloseCode::from(crate::admin::OPERATOR_CLOSE_CODE),
                        super::ROTATED_REASON,
                    );
                    return;
                }
            };
            // Full: it took its count or its bytes, and more may wait.
            let bytes: usize = msgs.iter().map(|q| q.payload.len()).sum();
            let full = act.shared.mediator.lease_may_be_cut(msgs.len(), bytes, batch);
            let leased_max = msgs.iter().map(|q| q.id).max();
            // The oldest message held here, once held messages the queue got back meanwhile (a
            // peer released a hand-off it could not confirm, or its hand-off lease ran out) are
            // left to this lease: written from it, not from both.
            let oldest_held = act.handed.as_mut().and_then(|h| {
                if !msgs.is_empty() && !h.held_back.is_empty() {
                    let leased: std::collections::HashSet<i64> = msgs.iter().map(|q| q.id).collect();
                    h.held_back.retain(|m| !leased.contains(&m.id));
                }
                h.held_back.first().map(|m| m.id)
            });
            // Leased messages older than every held one and than every hand-back on its way to
            // the queue (this lease may have read past one not yet released) go out now; the
            // others after those.
            let returning = lease_floor(&returning_at_start, act.returning_floor, &msgs);
            let floor = oldest_held.unwrap_or(i64::MAX).min(returning);
            let (msgs, newer): (Vec<QueuedMessage>, Vec<QueuedMessage>) = msgs.into_iter().partition(|q| q.id < floor);
            // Caught up: the queue had nothing more (a short lease, begun with nothing on its
            // way back to it, none begun since, and after the session last began delivering),
            // or it had nothing older than what is held here (the lease read past it).
            let news_same = act.queue_news == news_before;
            let clean = clean_start && !full && news_same && act.spills_begun == spills_before;
            let read_past_held = news_same && oldest_held.is_some_and(|h| leased_max.is_some_and(|m| m > h));
            let caught_up = clean || read_past_held;
            if let Some(h) = act.handed.as_mut() {
                if clean {
                    h.spilled = false;
                }
                if caught_up {
                    h.catching_up = false;
                }
            }
            let msgs = act.not_written_yet(msgs);
            if !msgs.is_empty() {
                act.push(msgs, false, ctx);
            }
            if caught_up {
                // What was handed meanwhile is newer than anything the queue held: after it.
                act.send_held(ctx);
            }
            if let Some(first) = newer.first().map(|q| q.id) {
                let held_left = act.handed.as_ref().is_some_and(|h| !h.held_back.is_empty());
                // (A hand-back begun since the floor was read counts too.)
                if held_left || returning.min(act.returning_floor) <= first {
                    // Held ones still wait for the window, or a hand-back older than these may
                    // reach the queue after this lease read it: these follow them, leased again.
                    act.give_back_leased(&leased_for, newer, ctx);
                } else {
                    let newer = act.not_written_yet(newer);
                    act.push(newer, false, ctx);
                }
            }
            if full || act.wake_again {
                ctx.notify(Wake);
            }
        }));
    }

    /// Gives back messages this session leased for `conn` and will not write now: released,
    /// and the session woken for them, in a task the stop waits for. On its way like a spill.
    fn give_back_leased(&mut self, conn: &str, msgs: Vec<QueuedMessage>, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(lowest) = msgs.iter().map(|q| q.id).min() else {
            return;
        };
        let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
        self.returning_begins(lowest);
        let (shared, owner, conn) = (self.shared.clone(), self.owner(), conn.to_string());
        let addr = ctx.address();
        self.shared.tracked.spawn(async move {
            let released = shared.mediator.store.release(&conn, &ids, &owner).await;
            // Before the wake-up below: the drain it starts must not find it still on its way
            // (and give back what it leases behind it again).
            addr.do_send(SpillReleased { lowest });
            gave_back(&shared, &conn, released).await;
        });
    }

    /// A hand-back whose lowest id is `lowest` begins: until it is released, no lease counts
    /// as finding the queue caught up, and none writes what it read from `lowest` on.
    fn returning_begins(&mut self, lowest: i64) {
        self.spills_begun += 1;
        *self.returning.entry(lowest).or_default() += 1;
        self.returning_floor = self.returning_floor.min(lowest);
    }

    /// Leased messages less those handed to this session and written less than half a lease
    /// ago, unacknowledged: a peer that lost its link released a `Deliver` it could not know
    /// we read (`cluster::peer`), and the wallet has them already. One written longer ago is
    /// written again (its hand-off lease ran out: redelivery as for any lease). The lease
    /// taken now goes back with the session like any other.
    fn not_written_yet(&self, mut msgs: Vec<QueuedMessage>) -> Vec<QueuedMessage> {
        let Some(h) = self
            .handed
            .as_ref()
            .filter(|h| !h.written.is_empty() && !msgs.is_empty())
        else {
            return msgs;
        };
        // A set of the batch (small), not of everything written (thousands on a busy socket).
        let recent = now_ms().saturating_add(self.shared.mediator.lease_ms / 2);
        let leased: std::collections::HashSet<i64> = msgs.iter().map(|q| q.id).collect();
        let again: std::collections::HashSet<i64> = h
            .written
            .iter()
            .filter(|(id, until)| *until > recent && leased.contains(id))
            .map(|(id, _)| *id)
            .collect();
        msgs.retain(|q| !again.contains(&q.id));
        msgs
    }

    /// Writes leased messages out as the session's mode says. `handed`: they came with a
    /// notification, leased to the node's hand-off owner ([`Signal::HandOff`]), not by this
    /// session.
    fn push(&mut self, mut msgs: Vec<QueuedMessage>, handed: bool, ctx: &mut ws::WebsocketContext<Self>) {
        // Only the bound connection's messages go out here, packed for its key: a lease taken
        // for a connection the socket has left since (rebound) goes back to that connection.
        // (Split only then: nearly always every message is the bound connection's.)
        let ours = |q: &QueuedMessage| self.conn.as_ref().is_some_and(|c| c.id == q.connection);
        let others: Vec<QueuedMessage> = if msgs.iter().all(ours) {
            Vec::new()
        } else {
            let (mine, others) = msgs.into_iter().partition(ours);
            msgs = mine;
            others
        };
        if !others.is_empty() {
            let owner = if handed {
                crate::protocols::handoff_owner(&self.shared.mediator.node_id)
            } else {
                self.owner()
            };
            self.shared
                .tracked
                .spawn(give_back_msgs(self.shared.clone(), owner, handed, others));
        }
        let Some(conn) = self.conn.clone().filter(|_| !msgs.is_empty()) else {
            return;
        };
        let shared = self.shared.clone();
        let redelivered = msgs.iter().filter(|q| q.attempts > 1).count() as u64;
        shared.metrics.redelivered.inc_by(redelivered);
        let mode = if self.registered { self.mode } else { Mode::Quiet };
        if handed && mode != Mode::Quiet {
            // Given back when the session ends, written or not (a lease of the session's own
            // goes back with its owner; one acknowledged or confirmed meanwhile is gone).
            let now = now_ms();
            let written = &mut self.handed.get_or_insert_with(Box::default).written;
            while written.front().is_some_and(|(_, until)| *until <= now) {
                written.pop_front();
            }
            let until = now.saturating_add(shared.mediator.lease_ms);
            written.extend(msgs.iter().map(|q| (q.id, until)));
        }
        match mode {
            Mode::Live => {
                let delivery = if conn.protocol == crate::protocols::v2::PROTOCOL {
                    crate::protocols::v2::pickup::live_delivery(&shared.mediator, &conn, &msgs)
                } else {
                    pickup::live_delivery(self.legacy, &msgs)
                };
                match shared.mediator.pack_for(&conn, &delivery) {
                    Ok(p) => {
                        ctx.text(String::from_utf8_lossy(&p).into_owned());
                        let bytes = msgs.iter().map(|q| q.payload.len()).sum();
                        let partial = !shared
                            .mediator
                            .lease_may_be_cut(msgs.len(), bytes, shared.mediator.batch_size);
                        self.window.sent(Instant::now(), msgs.len() as u64, partial);
                        shared
                            .metrics
                            .delivered("live", crate::protocols::v2::version_label(&conn), msgs.len() as u64);
                    }
                    Err(e) => tracing::warn!(connection = %conn.id, "delivery not packed: {e}"),
                }
            }
            Mode::Implicit => {
                for q in &msgs {
                    ctx.text(String::from_utf8_lossy(&q.payload).into_owned());
                }
                shared.metrics.delivered(
                    "implicit",
                    crate::protocols::v2::version_label(&conn),
                    msgs.len() as u64,
                );
                // Implicit pickup has no acknowledgement: removed once a ping sent after the
                // messages is answered (a half-open socket swallows nothing).
                let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
                let bytes = msgs.iter().map(|q| q.payload.len()).sum();
                self.confirm_written(&conn.id, ids, bytes, ctx);
            }
            Mode::Quiet if handed => {
                let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
                let c = conn.id.clone();
                shared.hand_back_later(c, ids);
            }
            Mode::Quiet => {
                // Mode changed (or superseded) while leasing: given back, and whoever holds
                // the wallet now woken (or the wallet pushed): a session elsewhere that bound
                // meanwhile found these leased, and may have ended since.
                let ids: Vec<i64> = msgs.iter().map(|q| q.id).collect();
                let c = conn.id.clone();
                let owner = self.owner();
                let s = shared.clone();
                shared.tracked.spawn(async move {
                    let released = s.mediator.store.release(&c, &ids, &owner).await;
                    gave_back(&s, &c, released).await;
                });
            }
        }
    }

    /// Closes the socket once it has been bound to no connection, and forwarded no new mail,
    /// for `limits.unbound_socket_idle_secs`; a bound socket is a wallet's, idle as long as it
    /// likes. Pings keep a socket open against the heartbeat's timeout, not against this: a
    /// client holding sockets with pings alone kept `max_sessions` full, and every wallet out.
    fn watch_unbound(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let idle = Duration::from_secs(self.shared.cfg.limits.unbound_socket_idle_secs);
        let wait = idle.saturating_sub(self.last_forward.elapsed());
        ctx.run_later(wait, move |act, ctx| {
            if act.conn.is_some() {
                return;
            }
            if act.last_forward.elapsed() < idle {
                return act.watch_unbound(ctx);
            }
            act.shared.metrics.rejected("ws-unbound-idle", "unknown");
            tracing::info!(session = act.id, "socket bound to no connection closed: no new mail forwarded for {} s (limits.unbound_socket_idle_secs)", idle.as_secs());
            let why = format!(
                "bound to no connection, and no new mail forwarded, for {} s: reconnect with a message to send",
                idle.as_secs()
            );
            close_with(ctx, ws::CloseCode::Policy, why);
        });
    }

    /// An implicit socket has as much written and unconfirmed as may be
    /// ([`Confirming::full`]): nothing more goes out to it, leased or handed, until a pong.
    fn unconfirmed_full(&self) -> bool {
        self.mode == Mode::Implicit && self.confirming.as_ref().is_some_and(|c| c.full())
    }

    /// `ids` of `conn` were written with no acknowledgement to wait for: a ping follows them
    /// (unless one is on its way already: its pong sends the next), and its pong removes them.
    fn confirm_written(&mut self, conn: &str, ids: Vec<i64>, bytes: usize, ctx: &mut ws::WebsocketContext<Self>) {
        let c = self.confirming.get_or_insert_with(Box::default);
        if let Some(ping) = c.written(conn, ids, bytes, Instant::now()) {
            ctx.ping(&ping);
        }
    }

    /// A pong: what the ping it answers followed was read by the wallet's end, and is removed.
    fn on_pong(&mut self, payload: &[u8], ctx: &mut ws::WebsocketContext<Self>) {
        let Some(c) = self.confirming.as_mut() else {
            return;
        };
        let (done, next) = c.pong(payload, Instant::now());
        if let Some(ping) = next {
            ctx.ping(&ping);
        }
        let room = !c.full();
        if c.is_empty() {
            self.confirming = None;
        }
        if room && std::mem::take(&mut self.wake_on_pong) {
            ctx.notify(Wake);
        }
        for (conn, ids) in done {
            let store = self.shared.mediator.store.clone();
            self.shared.tracked.spawn(async move {
                if let Err(e) = store.ack(&conn, &ids).await {
                    tracing::warn!(connection = %conn, "delivery not removed (delivered again as its lease runs out): {e}");
                }
            });
        }
    }

    fn on_frame_part(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let max = self.shared.cfg.limits.max_ws_frame_bytes;
        let (first, last, b) = match item {
            actix_http::ws::Item::FirstText(b) | actix_http::ws::Item::FirstBinary(b) => (true, false, b),
            actix_http::ws::Item::Continue(b) => (false, false, b),
            actix_http::ws::Item::Last(b) => (false, true, b),
        };
        if first {
            self.drop_partial(Some(ctx));
            self.partial_seq += 1;
            let seq = self.partial_seq;
            // Whole within `limits.message_timeout_ms` of its first fragment, whatever
            // else (pings) the socket sends meanwhile.
            let timeout = Duration::from_millis(self.shared.cfg.limits.message_timeout_ms);
            let deadline = ctx.run_later(timeout, move |act, ctx| {
                if act.partial.as_ref().is_some_and(|p| p.seq == seq) {
                    act.drop_partial(None);
                    let why = format!(
                        "a message sent in fragments was not whole within limits.message_timeout_ms = {}",
                        act.shared.cfg.limits.message_timeout_ms
                    );
                    act.refuse_and_close(ctx, "message-timeout", ws::CloseCode::Policy, why);
                }
            });
            self.partial = Some(Partial {
                seq,
                buf: BytesMut::new(),
                deadline,
            });
        } else if self.partial.is_none() {
            ctx.text(r#"{"error":"bad-frame","reason":"continuation without a first frame"}"#);
            return;
        }
        let held = self.partial.as_ref().map_or(0, |p| p.buf.len());
        if held + b.len() > max {
            self.drop_partial(Some(ctx));
            self.close_too_big(ctx);
            return;
        }
        // The node-wide budget, taken before the bytes are kept.
        if !self.shared.unfinished.try_take(b.len()) {
            self.drop_partial(Some(ctx));
            let why =
                "the node holds as many unfinished fragmented messages as it takes: send again later, or in one frame";
            self.refuse_and_close(ctx, "ws-fragments-budget", ws::CloseCode::Again, why.into());
            return;
        }
        let p = self.partial.as_mut().expect("set or checked above");
        p.buf.extend_from_slice(&b);
        if last {
            let p = self.partial.take().expect("checked above");
            self.shared.unfinished.give(p.buf.len());
            ctx.cancel_future(p.deadline);
            self.on_envelope(p.buf.freeze(), ctx);
        }
    }

    /// Lets go of a message begun in fragments, of its part of the node's budget and (given
    /// the context: not once the actor has stopped) of its deadline's timer.
    fn drop_partial(&mut self, ctx: Option<&mut ws::WebsocketContext<Self>>) {
        if let Some(p) = self.partial.take() {
            self.shared.unfinished.give(p.buf.len());
            if let Some(ctx) = ctx {
                ctx.cancel_future(p.deadline);
            }
        }
    }

    fn close_too_big(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let why = format!(
            "message larger than limits.max_ws_frame_bytes = {}",
            self.shared.cfg.limits.max_ws_frame_bytes
        );
        self.refuse_and_close(ctx, "frame-too-big", ws::CloseCode::Size, why);
    }

    /// Closes the socket for what its client sent, counted under `reason`.
    fn refuse_and_close(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reason: &str,
        code: ws::CloseCode,
        why: String,
    ) {
        self.shared.metrics.rejected(reason, "unknown");
        ctx.close(Some(ws::CloseReason {
            code,
            description: Some(why),
        }));
        ctx.stop();
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.watch_unbound(ctx);
        ctx.run_interval(HEARTBEAT, |act, ctx| {
            if act.last_seen.elapsed() > CLIENT_TIMEOUT {
                tracing::info!(connection = act.conn_id(), session = act.id, "session timed out");
                ctx.stop();
                return;
            }
            // A client that talks but never answers the ping confirming what it was written
            // would hold those messages leased, and delivered again, for as long as it talks.
            if act
                .confirming
                .as_ref()
                .and_then(|c| c.waiting_since())
                .is_some_and(|t| t.elapsed() > CLIENT_TIMEOUT)
            {
                tracing::info!(
                    connection = act.conn_id(),
                    session = act.id,
                    "pings not answered: socket closed"
                );
                close_with(ctx, ws::CloseCode::Policy, "pings not answered (RFC 6455 5.5.2)");
                return;
            }
            // The confirming ping again, if one waits: a client may answer only the latest.
            match act.confirming.as_ref().and_then(|c| c.awaited()) {
                Some(p) => ctx.ping(&p),
                None => ctx.ping(b""),
            }
        });
        self.shared.registry.do_send(crate::registry::Opened {
            session: self.id,
            to: ctx.address().recipient(),
        });
        tracing::debug!(session = self.id, "socket opened");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        // Before the release below: a lease in flight now gives its messages back itself.
        let lent = self.end.close();
        self.drop_partial(None);
        self.shared.registry.do_send(crate::registry::Gone { session: self.id });
        let bound = self.conn.as_ref().map(|c| c.id.clone());
        if let Some(conn_id) = &bound {
            if self.registered {
                self.shared.bound.count_out(conn_id);
            }
            self.let_go();
            self.shared.metrics.sessions.dec();
            self.shared.registry.do_send(Unregister {
                conn: conn_id.clone(),
                session: self.id,
            });
            tracing::info!(connection = %conn_id, session = self.id, "session closed");
        }
        let lent: Vec<String> = lent.into_iter().filter(|c| bound.as_ref() != Some(c)).collect();
        if bound.is_none() && lent.is_empty() {
            return;
        }
        // Unacknowledged deliveries become deliverable again at once; a session that held the
        // wallet's session (registered) leaves nothing pending unwoken (`session_ended`); the
        // other connections it leased for are woken too (`wake_lent`).
        let registered = self.registered;
        let owner = self.owner();
        let shared = self.shared.clone();
        let handed = self.handed_ids();
        // The socket's place under `limits.max_sessions` is held until its leases are given
        // back: a drained node says `empty` (`/status`) only once nothing of its sessions is
        // leased, so an operator who stops it then leaves no delivery waiting for `lease_ms`.
        let slot = self.slot.clone();
        // Counted: a stopping node waits for it before its workers stop.
        self.shared.tracked.spawn(async move {
            let _slot = slot;
            let released = match &bound {
                Some(c) => release_all(&shared, c, &owner, &handed).await,
                None => shared.mediator.store.release_owner(&owner).await,
            };
            wake_lent(&shared, &lent, &released).await;
            match &bound {
                Some(c) if registered => session_ended(&shared, c, released).await,
                Some(c) => gave_back(&shared, c, released).await,
                None => {
                    if let Err(e) = released {
                        tracing::warn!("leases of a closed session not released (they expire): {e}");
                    }
                }
            }
        });
    }
}

impl Handler<Wake> for WsSession {
    type Result = ();
    fn handle(&mut self, _: Wake, ctx: &mut Self::Context) {
        self.drain(ctx);
    }
}

impl Handler<SpillReleased> for WsSession {
    type Result = ();
    fn handle(&mut self, m: SpillReleased, ctx: &mut Self::Context) {
        if let std::collections::btree_map::Entry::Occupied(mut e) = self.returning.entry(m.lowest) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.drain(ctx);
    }
}

impl Handler<Signal> for WsSession {
    type Result = ();
    fn handle(&mut self, m: Signal, ctx: &mut Self::Context) {
        match m {
            Signal::Wake => self.drain(ctx),
            Signal::HandOff(offered) => {
                if let Some(msgs) = offered.take() {
                    self.take_handed(msgs, ctx);
                }
            }
            Signal::Superseded => self.superseded(),
            Signal::Close(c) => {
                close_with(ctx, ws::CloseCode::from(c.code), c.reason);
            }
        }
    }
}

impl WsSession {
    /// Messages handed to this session, leased to the node's hand-off owner: written now,
    /// held back while the live window is closed, or given back when this session does not
    /// deliver (unbound, superseded, or queue-only).
    fn take_handed(&mut self, msgs: Vec<QueuedMessage>, ctx: &mut ws::WebsocketContext<Self>) {
        let ours = self
            .conn
            .as_ref()
            .is_some_and(|c| msgs.iter().all(|m| m.connection == c.id));
        if !ours || !self.registered || self.mode == Mode::Quiet {
            let Some(conn) = msgs.first().map(|m| m.connection.clone()) else {
                return;
            };
            let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
            self.shared.hand_back_later(conn, ids);
            return;
        }
        {
            let room = !self.unconfirmed_full();
            let h = self.handed.get_or_insert_with(Box::default);
            if h.spilled {
                // Older ones wait in the queue: these go there too, and out in queue order.
                self.spill(msgs, ctx);
                return;
            }
            if self.mode == Mode::Implicit && room && !h.catching_up && h.held_back.is_empty() {
                // Nothing older in the queue nor held here, and room unconfirmed: out at once
                // (else held back, as a drain waits, for the pong that makes room).
                self.push(msgs, true, ctx);
                return;
            }
            // Through the window (live mode), after the queue caught up, as a lease's messages go.
            hold_in_queue_order(&mut h.held_back, msgs, |m| m.id);
            self.send_held(ctx);
            // What the closed window holds back is bounded (a wallet that does not acknowledge
            // must not have its queue held in this node's memory): the newest past the bounds
            // go back to the queue, leased once the window opens, after those held here.
            let max = self.shared.mediator.batch_size.max(1) * HELD_BACK_BATCHES;
            if let Some(h) = self.handed.as_mut() {
                let out = take_excess(&mut h.held_back, max, HELD_BACK_MAX_BYTES, |m| m.payload.len());
                if !out.is_empty() {
                    h.spilled = true;
                    self.spill(out, ctx);
                }
            }
        }
    }

    /// Hands messages handed to this session back to the queue (released from the node's
    /// hand-off owner, in a task the stop waits for), then drains: the window leases them.
    fn spill(&mut self, msgs: Vec<QueuedMessage>, ctx: &mut ws::WebsocketContext<Self>) {
        let Some(conn) = msgs.first().map(|m| m.connection.clone()) else {
            return;
        };
        let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
        let lowest = ids.iter().copied().min().expect("not empty: checked above");
        self.returning_begins(lowest);
        let addr = ctx.address();
        let shared = self.shared.clone();
        self.shared.tracked.spawn(async move {
            // Told before the wake-up, as in `give_back_leased`.
            let node = shared.mediator.node_id.clone();
            shared
                .hand_back_then(&node, &conn, &ids, || addr.do_send(SpillReleased { lowest }))
                .await;
        });
    }

    /// The ids of handed messages this session wrote or holds back (leased to the node's
    /// hand-off owner), forgotten here: the session gives them back as it stops delivering.
    fn handed_ids(&mut self) -> Vec<i64> {
        let Some(h) = self.handed.take() else {
            return Vec::new();
        };
        let mut ids: Vec<i64> = h.written.into_iter().map(|(id, _)| id).collect();
        ids.extend(h.held_back.into_iter().map(|m| m.id));
        ids
    }

    /// A newer session on another node owns the connection now.
    fn superseded(&mut self) {
        if !self.registered {
            return;
        }
        self.registered = false;
        if let Some(c) = &self.conn {
            self.shared.bound.count_out(&c.id);
        }
        // Its leases go back below: nothing of this socket awaits an acknowledgement.
        self.window.clear();
        let handed = self.handed_ids();
        let Some(conn) = self.conn.as_ref().map(|c| c.id.clone()) else {
            return;
        };
        tracing::info!(connection = %conn, session = self.id, "superseded by a newer session on another node: delivery stopped here");
        // Leases of this session go back at once, and the new owner is told; so are the
        // other connections it leased for (`leave`, a pickup over return route `thread`):
        // every lease of its owner goes back, theirs too.
        let owner = self.owner();
        let shared = self.shared.clone();
        let lent = self.end.lent_besides(&conn);
        self.shared.tracked.spawn(async move {
            let released = release_all(&shared, &conn, &owner, &handed).await;
            wake_lent(&shared, &lent, &released).await;
            gave_back(&shared, &conn, released).await;
        });
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match msg {
            Ok(m) => m,
            Err(ws::ProtocolError::Overflow) => {
                self.close_too_big(ctx);
                return;
            }
            Err(ws::ProtocolError::Io(e)) if e.get_ref().is_some_and(|r| r.is::<super::wsio::BudgetSpent>()) => {
                self.refuse_and_close(ctx, "ws-fragments-budget", ws::CloseCode::Again, e.to_string());
                return;
            }
            Err(e) => {
                tracing::info!(
                    connection = self.conn_id(),
                    session = self.id,
                    "WebSocket protocol error: {e}"
                );
                close_with(ctx, ws::CloseCode::Protocol, e.to_string());
                return;
            }
        };
        self.last_seen = Instant::now();
        match msg {
            ws::Message::Text(t) => self.on_envelope(t.into_bytes(), ctx),
            ws::Message::Binary(b) => self.on_envelope(b, ctx),
            ws::Message::Continuation(item) => self.on_frame_part(item, ctx),
            ws::Message::Ping(p) => ctx.pong(&p),
            ws::Message::Pong(p) => self.on_pong(&p, ctx),
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }
}

/// Closes the socket with `code` and `why` (cut to fit: [`fit_close_reason`]), and stops the
/// session.
fn close_with(ctx: &mut ws::WebsocketContext<WsSession>, code: ws::CloseCode, why: impl Into<String>) {
    ctx.close(Some(ws::CloseReason {
        code,
        description: Some(fit_close_reason(why.into())),
    }));
    ctx.stop();
}

/// The longest close reason a WebSocket close frame carries, in bytes (RFC 6455 5.5: a control
/// frame holds at most 125 bytes, 2 of them the code).
pub(crate) const MAX_CLOSE_REASON: usize = 123;

/// `why`, cut on a character boundary to [`MAX_CLOSE_REASON`] bytes with an ellipsis when it
/// is longer: actix-http writes a longer reason as given, an invalid frame the wallet's library
/// may fail the connection on (reasons come from operators, peers and errors, not only from
/// constants).
pub(crate) fn fit_close_reason(mut why: String) -> String {
    if why.len() > MAX_CLOSE_REASON {
        let cut = (0..=MAX_CLOSE_REASON - '…'.len_utf8())
            .rev()
            .find(|&i| why.is_char_boundary(i))
            .unwrap_or(0);
        why.truncate(cut);
        why.push('…');
    }
    why
}

/// Whether replies use the legacy `did:sov:...;spec/` prefix (they mirror the message they
/// answer: [`crate::protocols::Inbound::reply`]).
fn replies_legacy(replies: &[serde_json::Value]) -> bool {
    replies.iter().any(|r| {
        r["@type"]
            .as_str()
            .is_some_and(|t| t.starts_with(crate::didcomm::message::LEGACY_PREFIX))
    })
}

/// The lowest id a drain's leased messages must stay under: that of every hand-back on its way
/// to the queue when the drain began (`at_start`) whose lowest message the lease did not read,
/// and of those begun since (`begun_since`). A hand-back is one store write: a lease that read
/// its lowest message read it after the hand-back reached the queue, so it holds nothing back
/// (its `SpillReleased` may not be handled yet). Counted, it had the lease give back what it
/// read, and the next drain, begun with that give-back on its way, read the same message and
/// gave it back again: a loop that wrote nothing (a v2 wallet turning live delivery off and
/// on while a message was handed to it, seen once in CI).
fn lease_floor(at_start: &[i64], begun_since: i64, leased: &[QueuedMessage]) -> i64 {
    at_start
        .iter()
        .copied()
        .filter(|lowest| !leased.iter().any(|q| q.id == *lowest))
        .fold(begun_since, i64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_is_cut_to_what_a_close_frame_carries() {
        assert_eq!(
            fit_close_reason("x".repeat(123)),
            "x".repeat(123),
            "one that fits is kept"
        );
        for long in ["x".repeat(124), "é".repeat(100), format!("{}€", "x".repeat(122))] {
            let r = fit_close_reason(long.clone());
            assert!(r.len() <= MAX_CLOSE_REASON, "{} bytes", r.len());
            assert!(r.ends_with('…') && long.starts_with(r.trim_end_matches('…')), "{r:?}");
        }
    }

    fn queued(ids: &[i64]) -> Vec<QueuedMessage> {
        ids.iter()
            .map(|&id| QueuedMessage {
                id,
                connection: "c".into(),
                recipient_key: "k".into(),
                payload: Vec::new(),
                received_at_ms: 0,
                attempts: 1,
            })
            .collect()
    }

    #[test]
    fn a_hand_back_the_lease_read_holds_nothing_back() {
        // Given back (lowest 112) and read again by the next lease: it reached the queue.
        assert_eq!(lease_floor(&[112], i64::MAX, &queued(&[112, 113, 114])), i64::MAX);
        // One whose lowest message the lease did not read may still be on its way.
        assert_eq!(lease_floor(&[112], i64::MAX, &queued(&[113, 114])), 112);
        assert_eq!(lease_floor(&[100, 112], i64::MAX, &queued(&[112, 113])), 100);
        // Begun while the lease ran: always waited for.
        assert_eq!(lease_floor(&[112], 90, &queued(&[112])), 90);
        assert_eq!(lease_floor(&[], i64::MAX, &queued(&[1])), i64::MAX);
    }
}
