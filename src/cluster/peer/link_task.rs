//! One link's task: its reader and writer, heartbeats and resyncs, and the `Deliver` frames
//! the peer has not yet confirmed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, error, info, warn};

use parking_lot::MutexGuard;

use super::room::{held_bytes, NoRoom, PeerRoom};
use super::{
    bump, unix_ms, Handshaking, LinkHandle, Outgoing, Shared, AHEAD_WARN_EVERY, DIR_SLICE, RECENT_CLOSE_TTL,
    WRITE_BATCH,
};
use crate::cluster::codec::CodecError;
use crate::cluster::directory::{plausible_epoch, DirEvent};
use crate::cluster::handshake::{shown_upto, SHOWN_REASON_MAX};
use crate::cluster::link::{LinkReader, LinkWriter, SecureChannel};
use crate::cluster::membership::{LinkId, MemberEffect, MemberEvent};
use crate::cluster::proto::{Claim, Frame, MAX_CONN_ID};
use crate::cluster::{ClusterEvent, Held};
use crate::session::ws::{fit_close_reason, MAX_CLOSE_REASON};

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

    /// Forgets the newest record of `f` (a `Deliver` noted, then not sent after all).
    fn unwrite(&mut self, f: &Frame) {
        if let Frame::Deliver { conn, msgs } = f {
            let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
            if let Some(i) = self.frames.iter().rposition(|(_, c, i)| c == conn && *i == ids) {
                self.frames.remove(i);
            }
        }
    }

    /// The peer answered the ping `t`: it read every frame written before it.
    fn pong(&mut self, t: u64) {
        while self.frames.front().is_some_and(|(after, _, _)| *after < t) {
            self.frames.pop_front();
        }
    }
}

/// What one link saw of its peer's claims from over a day ahead of this node's clock
/// ([`plausible_epoch`]). A node whose clock is more than a day behind sees every healthy peer's
/// claims so: that is said once per link, and the claims it ignores are warned of at most every
/// [`AHEAD_WARN_EVERY`] (and counted, `claims_ahead`), not once per session a peer opens.
#[derive(Default)]
struct Ahead {
    /// Claims of the resync in progress kept, and ignored as from over a day ahead.
    resync_kept: usize,
    resync_ahead: usize,
    /// That this node's clock may be behind the peer's was logged (once per link).
    said_behind: bool,
    /// When an `Own` from over a day ahead was last warned of, and how many were ignored since.
    warned: Option<Instant>,
    since: u64,
}

impl Ahead {
    /// Whether an `Own` from over a day ahead is warned of now; if so, with how many were
    /// ignored since the last warning.
    fn warn_now(&mut self, now: Instant) -> Option<u64> {
        match self.warned {
            Some(at) if now.duration_since(at) < AHEAD_WARN_EVERY => {
                self.since += 1;
                None
            }
            _ => {
                self.warned = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }

    /// Counts one frame of a resync: `kept` claims, `ahead` ignored as from over a day ahead.
    fn resync_frame(&mut self, first: bool, kept: usize, ahead: usize) {
        if first {
            (self.resync_kept, self.resync_ahead) = (0, 0);
        }
        self.resync_kept += kept;
        self.resync_ahead += ahead;
    }

    /// The resync ended: when every claim of it was from over a day ahead, it is this node's
    /// clock that is most likely wrong (a peer's own sessions cannot all be from tomorrow).
    fn resync_ended(&mut self, peer: &str) {
        let (kept, ahead) = (
            std::mem::take(&mut self.resync_kept),
            std::mem::take(&mut self.resync_ahead),
        );
        if ahead == 0 {
            return;
        }
        if kept > 0 {
            warn!(
                peer,
                ignored = ahead,
                kept,
                "resync claims with an epoch over a day ahead of this node's clock ignored: the peer's clock runs ahead, or this node's is behind"
            );
        } else if !std::mem::replace(&mut self.said_behind, true) {
            error!(
                peer,
                claims = ahead,
                "every claim of the peer's resync has an epoch over a day ahead of this node's clock: this node's clock may be behind the peer's (check its time sync); until then the sessions the peer holds are ignored here"
            );
        } else {
            debug!(
                peer,
                claims = ahead,
                "every claim of the peer's resync is from over a day ahead, again"
            );
        }
    }
}

/// What a peer's close reason becomes in the close frames of its wallets' sockets (and logs):
/// control characters escaped ([`shown_upto`]), cut to what a close frame carries
/// ([`fit_close_reason`]).
fn close_reason(reason: &str) -> String {
    fit_close_reason(shown_upto(reason, MAX_CLOSE_REASON))
}

/// What `run_link` found when it came to install its link.
enum Admitted {
    Up(Arc<PeerRoom>),
    /// This node stopped: the link carries a `Leave` if it left (`true`), nothing after a
    /// shutdown alone.
    Left(bool),
    Refused(&'static str),
}

/// Runs one authenticated link until it ends, then tells membership. Every frame goes through
/// `channel`, the keys of this link's handshake. `pending` counts the handshake until the link
/// is installed, refused, or has carried this node's `Leave`.
pub(super) async fn run_link(
    shared: Arc<Shared>,
    stream: TcpStream,
    channel: SecureChannel,
    peer: String,
    we_dialed: bool,
    secret_gen: u64,
    pending: Handshaking,
) {
    let link = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(shared.settings.peer_queue);
    let resync = Arc::new(Notify::new());
    let leave = Arc::new(Notify::new());
    let (close_tx, close_rx) = oneshot::channel();
    let unconfirmed = Arc::new(parking_lot::Mutex::new(Unconfirmed::default()));

    // Install (or not). The writer reads the snapshot afterwards, with every change made from
    // now on queued on this link too.
    let admitted = {
        let mut st = shared.state.lock();
        if st.left {
            Admitted::Left(st.leaving)
        } else if st.secret_gen != secret_gen {
            // Its handshake proved a secret replaced meanwhile (`Shared::set_secret`): refused
            // as the links opened with it were closed.
            Admitted::Refused("the cluster secret changed during the handshake")
        } else {
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
            // Back after a link closed while the peer stayed up (a closed link finds it down
            // only at the failure timeout): the node is told, as of a peer up again, so it
            // notifies again what it could not send the peer, or queued on the link that closed
            // (its queue dropped below with nobody to take it). That peer's session may have
            // ended meanwhile, its `Disown` lost with the link: the peer's sweep would not
            // wake that wallet, and the resync that drops its claim tells only the node that
            // takes a failed peer over.
            // A link replacing one still installed too (a half-open socket the peer redialed
            // first, or both sides dialing at once): what was written on the one replaced may
            // not have been read.
            let relinked = installed && !fx.iter().any(|e| matches!(e, MemberEffect::Up { .. }));
            // Close the replaced link first, then emit Up.
            shared.apply_member_effects(&mut st, fx);
            let mut room = None;
            if installed {
                if let Some(slot) = st.peers.get_mut(&peer) {
                    room = Some(slot.room.clone());
                    slot.link = Some(LinkHandle {
                        id: link,
                        tx: tx.clone(),
                        resync: resync.clone(),
                        leave: leave.clone(),
                        _close: close_tx,
                    });
                }
                let now = Instant::now();
                if relinked {
                    shared.emit(ClusterEvent::PeerUp { node: peer.clone() });
                }
                for (_, f) in st
                    .recent_closes
                    .iter()
                    .filter(|(t, _)| now.duration_since(*t) <= RECENT_CLOSE_TTL)
                {
                    if tx.try_send(f.clone().into()).is_err() {
                        bump(&shared.counters.queue_drops);
                    }
                }
            }
            room.map_or(Admitted::Refused("duplicate link"), Admitted::Up)
        }
    };
    let (rd, wr) = stream.into_split();
    let (rd, mut wr) = channel.into_link(rd, BufWriter::new(wr));
    let room = match admitted {
        Admitted::Up(room) => room,
        // This node left while the link was being set up. The peer may have preferred this
        // link to the one the `Leave` went out on (both sides dialled at once) and ignore frames
        // of the other: tell it here too, or it finds this node down only at its failure
        // timeout. After a shutdown alone (which stands for a crash) it is told nothing.
        Admitted::Left(leaving) => {
            if leaving {
                let _ = tokio::time::timeout(shared.settings.heartbeat_interval, wr.send(&Frame::Leave)).await;
            }
            drop(pending);
            return;
        }
        Admitted::Refused(reason) => {
            drop(pending);
            debug!(peer = %peer, link, reason, "cluster link closed");
            let f = Frame::Refused { reason: reason.into() };
            let _ = wr.send(&f).await;
            return;
        }
    };
    // Installed: counted by `links_open` from here.
    drop(pending);
    info!(peer = %peer, link, we_dialed, "cluster link up");

    let mut shutdown = shared.shutdown_rx.clone();
    let reason: String = tokio::select! {
        r = read_loop(&shared, rd, &peer, link, tx, &unconfirmed, &room) => match r {
            Ok(why) => why.to_string(),
            Err(e) => e,
        },
        r = write_loop(&shared, &peer, &mut wr, &mut rx, &resync, &leave, &unconfirmed) => match r {
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
        // Replaced by another link: the link that takes over, if any. None when the link just
        // ended, or the peer was removed from the config (its slot is gone, and with it
        // whatever would have sent what is left here).
        let next = st.peers.get_mut(&peer).and_then(|slot| {
            if slot.link.as_ref().is_some_and(|l| l.id == link) {
                slot.link = None;
            }
            slot.link.as_ref().map(|l| l.tx.clone())
        });
        // Hand the next link the wake-ups and hand-offs we did not get to send (directory
        // frames are covered by the resync the new link starts with); with none, they go back.
        rx.close();
        while let Ok(o) = rx.try_recv() {
            if !matches!(o.frame, Frame::Queued { .. } | Frame::Deliver { .. }) {
                continue;
            }
            let back = match &next {
                Some(tx) => tx.try_send(o).err().map(|e| e.into_inner()),
                None => Some(o),
            };
            match back.map(|o| o.frame) {
                None => {}
                Some(Frame::Deliver { conn, msgs }) => {
                    let n = msgs.len() as u64;
                    shared.counters.handoffs_failed.fetch_add(n, Ordering::Relaxed);
                    returned.push((conn, msgs.into_iter().map(|m| m.id).collect()));
                }
                // A wake-up: the node notifies it again when a link to the peer comes back
                // (`PeerUp`), or wakes it once the peer is found down.
                Some(_) => bump(&shared.counters.notifications_failed),
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
    tx: mpsc::Sender<Outgoing>,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
    room: &Arc<PeerRoom>,
) -> Result<&'static str, String> {
    // Claims taken in the peer's resync in progress, if one is.
    let mut resync: Option<usize> = None;
    let mut ahead = Ahead::default();
    loop {
        let frame = match rd.read_frame().await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok("peer closed the connection"),
            Err(e) => {
                if let CodecError::TooLarge { max, .. } = e {
                    // A peer sends frames up to its own limit: the link fails again at each redial.
                    bump(&shared.counters.frames_rejected);
                    warn!(peer = %peer, reason = %e, "cluster frame from peer over this node's cluster.max_frame_bytes ({max}), closing link: every node of a cluster must have the same cluster.max_frame_bytes");
                } else if e.is_bad_input() {
                    bump(&shared.counters.frames_rejected);
                    warn!(peer = %peer, reason = %e, "bad frame from cluster peer, closing link");
                }
                return Err(e.to_string());
            }
        };
        if let Frame::Resync { claims, last } = frame {
            // Slice by slice, the lock released in between.
            if let Some(why) = take_resync(shared, peer, link, &mut resync, &mut ahead, claims, last).await? {
                return Ok(why);
            }
            continue;
        }
        // What the peer sent for the node (not a wake-up, which may be dropped), sent to it
        // once the cluster lock is released.
        let mut for_node = None;
        {
            let now = Instant::now();
            let mut st = shared.state.lock();
            if !heard(&mut st, peer, link) {
                // Replaced or closed; its task is about to end. Its frames no longer count.
                return Ok("link replaced");
            }
            // Every frame naming a connection: ids are UUIDs, and an oversized one would travel
            // on into the directory, events, logs and per-connection queues (a resync's claims
            // are checked where they are read).
            if let Frame::Queued { conn }
            | Frame::Deliver { conn, .. }
            | Frame::CloseSessions { conn, .. }
            | Frame::RoutesChanged { conn, .. }
            | Frame::Own { conn, .. }
            | Frame::Disown { conn, .. } = &frame
            {
                if conn.len() > MAX_CONN_ID {
                    bump(&shared.counters.frames_rejected);
                    warn!(
                        peer,
                        len = conn.len(),
                        kind = frame.kind(),
                        "frame naming a connection id over {MAX_CONN_ID} bytes ignored"
                    );
                    continue;
                }
            }
            match frame {
                Frame::Ping { t } => {
                    // If the queue is full the peer still hears our own pings.
                    let _ = tx.try_send(Frame::Pong { t }.into());
                }
                // A pong answers a ping this node sent: one from its future would confirm (and so
                // never give back) every hand-off not yet answered.
                Frame::Pong { t } if t > shared.micros() => {
                    bump(&shared.counters.frames_rejected);
                    warn!(peer, t, "pong to a ping never sent ignored");
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
                        bump(&shared.counters.claims_ahead);
                        if let Some(since) = ahead.warn_now(now) {
                            warn!(
                                peer,
                                conn = %shown_upto(&conn, MAX_CONN_ID),
                                epoch,
                                ignored_since_last_warning = since,
                                "claim with an epoch over a day ahead of this node's clock ignored: the peer's clock runs ahead, or this node's is behind"
                            );
                        }
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
                // Taken above, outside this lock.
                Frame::Resync { .. } => {}
                Frame::Queued { conn } => {
                    bump(&shared.counters.notifications_received);
                    shared.emit(ClusterEvent::MessageQueued { conn });
                }
                Frame::Deliver { conn, msgs } => {
                    shared
                        .counters
                        .handoffs_received
                        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                    for_node = Some(ClusterEvent::Delivered {
                        conn,
                        msgs,
                        held: Held::nothing(),
                    });
                }
                Frame::CloseSessions { conn, reason } => {
                    // Goes into the close frames of the wallets' sockets, and into logs.
                    let reason = close_reason(&reason);
                    for_node = Some(ClusterEvent::CloseSessions { conn, reason });
                }
                Frame::RoutesChanged { conn, keys } => {
                    bump(&shared.counters.routes_changed_received);
                    for_node = Some(ClusterEvent::RoutesChanged { conn, keys });
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
                    return Err(format!(
                        "peer closed the link: {}",
                        shown_upto(&reason, SHOWN_REASON_MAX)
                    ));
                }
                other @ (Frame::Hello(_) | Frame::Proof { .. } | Frame::Welcome | Frame::Noise { .. }) => {
                    bump(&shared.counters.frames_rejected);
                    return Err(format!("unexpected {} frame after handshake", other.kind()));
                }
            }
        }
        if let Some(ev) = for_node {
            match to_node(shared, peer, link, room, ev).await {
                Ok(()) => {}
                Err(why) if why == REPLACED => return Ok(REPLACED),
                Err(why) => return Err(why),
            }
        }
    }
}

/// Why a link's task ends when another link of its peer took its place.
const REPLACED: &str = "link replaced";

/// Sends `ev`, which the peer sent, to the node: a `Delivered` first takes its room in the
/// peer's budget ([`PeerRoom`]; past its connection's share it is handed back at once instead),
/// and every event waits for room in the node's event channel. The link reads nothing
/// meanwhile, so a peer cannot have this node hold more than its budget and the channel,
/// where spawning a task per event (as before) held whatever it sent. `Err` ends the link: it
/// was replaced meanwhile, or this node had no room for longer than the failure timeout. A
/// node that stopped taking events drops it.
async fn to_node(
    shared: &Shared,
    peer: &str,
    link: LinkId,
    room: &Arc<PeerRoom>,
    mut ev: ClusterEvent,
) -> Result<(), String> {
    if let ClusterEvent::Delivered { conn, msgs, held } = &mut ev {
        let bytes = held_bytes(conn, msgs);
        let need = room.need(bytes);
        let taken = match room.try_take(conn, need) {
            Ok(r) => r,
            Err(NoRoom::ConnFull) => {
                // This wallet's session is slow: its messages go back to the store and it
                // drains them from there, while the link goes on for the others.
                shared
                    .counters
                    .handoffs_refused
                    .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                debug!(peer, connection = %conn, "hand-offs past the connection's share handed back to the store");
                ev = ClusterEvent::HandOffReturned {
                    node: shared.settings.node_id.clone(),
                    conn: std::mem::take(conn),
                    ids: msgs.iter().map(|m| m.id).collect(),
                };
                return send_to_node(shared, peer, link, ev).await;
            }
            Err(NoRoom::Spent) => {
                bump(&shared.counters.link_waits);
                debug!(
                    peer,
                    bytes, "the peer's hand-offs wait for their sessions: the link waits for room"
                );
                waiting_on_this_node(shared, peer, link, room.take(conn, need)).await?
            }
        };
        *held = Held::room(taken);
    }
    send_to_node(shared, peer, link, ev).await
}

/// Puts `ev` in the node's event channel, waiting for room there.
async fn send_to_node(shared: &Shared, peer: &str, link: LinkId, ev: ClusterEvent) -> Result<(), String> {
    let ev = match shared.events.try_send(ev) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        Err(mpsc::error::TrySendError::Full(ev)) => ev,
    };
    bump(&shared.counters.link_waits);
    debug!(peer, "node's event channel full: the link waits for room");
    let permit = match waiting_on_this_node(shared, peer, link, shared.events.reserve()).await? {
        Ok(p) => p,
        Err(_) => return Ok(()), // the node stopped taking events
    };
    permit.send(ev);
    Ok(())
}

/// Waits for `room` (this node making room for what the peer sent) without counting the wait
/// as the peer's silence: the link reads nothing meanwhile, the peer's frames wait in the
/// socket, and the failure detector would otherwise find a live peer down (its links closed,
/// its sessions' wallets pushed) for this node's own slowness. For twice the failure timeout at
/// most: past it the link is closed (the peer gives back what it handed off unconfirmed, and
/// links again), so that a peer that died meanwhile is found down one failure timeout late at
/// most. `Err`: the link was replaced meanwhile (checked once more when room came), or the
/// wait was too long.
async fn waiting_on_this_node<T>(
    shared: &Shared,
    peer: &str,
    link: LinkId,
    room: impl std::future::Future<Output = T>,
) -> Result<T, String> {
    tokio::pin!(room);
    let mut tick = tokio::time::interval(shared.settings.heartbeat_interval);
    let longest = shared.settings.failure_timeout * 2;
    let give_up = tokio::time::sleep(longest);
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            r = &mut room => {
                return if heard(&mut shared.state.lock(), peer, link) {
                    Ok(r)
                } else {
                    Err(REPLACED.into())
                };
            }
            _ = tick.tick() => {
                if !heard(&mut shared.state.lock(), peer, link) {
                    return Err(REPLACED.into());
                }
            }
            _ = &mut give_up => {
                return Err(format!(
                    "this node had no room for the peer's frames for {longest:?} (its sessions or its event queue are stuck)"
                ));
            }
        }
    }
}

/// Takes one `Resync` frame of the peer, [`DIR_SLICE`] claims per hold of the cluster lock:
/// `ResyncBegin` on its first frame, its claims in chunks, and on `last` the removal of the
/// claims it no longer names, in slices too. The reader reads nothing else meanwhile, so the
/// peer's later `Own`/`Disown` apply after. `Ok(Some(why))` ends the link normally.
///
/// Bounds: one resync names at most `max_peer_claims` claims (more closes the link, as
/// before). What was left of a sweep of the peer's claims is finished before a resync begins,
/// so its claims here (old ones not yet removed and the new set) stay under twice the bound.
/// Resyncs cut short by a closed link leave their claims for the next one to sort out; should
/// those pile up past twice the bound, new conns in a chunk are ignored (and counted), as an
/// `Own` past the bound is, rather than grow the directory. Claims with connection ids over
/// [`MAX_CONN_ID`] bytes are ignored (and the frame counted), so the bytes a peer's claims
/// take here are bounded too; nothing of a resync is held between its frames but the count.
async fn take_resync(
    shared: &Shared,
    peer: &str,
    link: LinkId,
    taken: &mut Option<usize>,
    ahead: &mut Ahead,
    claims: Vec<Claim>,
    last: bool,
) -> Result<Option<&'static str>, String> {
    if !heard(&mut shared.state.lock(), peer, link) {
        return Ok(Some("link replaced"));
    }
    let cap = shared.settings.max_peer_claims;
    let so_far = taken.unwrap_or(0);
    if so_far + claims.len() > cap {
        bump(&shared.counters.frames_rejected);
        return Err(format!("resync over {cap} claims"));
    }
    let now = unix_ms();
    let sent = claims.len();
    let (mut implausible, mut long) = (0, 0);
    let kept: Vec<(String, u64)> = claims
        .into_iter()
        .filter(|c| {
            let ok_len = c.conn.len() <= MAX_CONN_ID;
            let ok_epoch = plausible_epoch(c.epoch, now);
            long += usize::from(!ok_len);
            implausible += usize::from(ok_len && !ok_epoch);
            ok_len && ok_epoch
        })
        .map(|c| (c.conn, c.epoch))
        .collect();
    // Counted, not precise per claim: one frame held implausible epochs, or long ids.
    if implausible > 0 {
        bump(&shared.counters.frames_rejected);
        shared
            .counters
            .claims_ahead
            .fetch_add(implausible as u64, Ordering::Relaxed);
    }
    ahead.resync_frame(taken.is_none(), kept.len(), implausible);
    if long > 0 {
        bump(&shared.counters.frames_rejected);
        warn!(
            peer,
            ignored = long,
            "resync claims with connection ids over {MAX_CONN_ID} bytes ignored"
        );
    }
    debug_assert_eq!(kept.len() + implausible + long, sent);
    if taken.is_none() {
        if let Some(why) = finish_sweep(shared, peer, link).await {
            return Ok(Some(why));
        }
        let mut st = shared.state.lock();
        if !heard(&mut st, peer, link) {
            return Ok(Some("link replaced"));
        }
        st.dir.apply(DirEvent::ResyncBegin { node: peer.to_string() });
    }
    *taken = Some(so_far + sent);
    let mut kept = kept.into_iter();
    let mut ignored = 0;
    loop {
        let mut part: Vec<(String, u64)> = kept.by_ref().take(DIR_SLICE).collect();
        if part.is_empty() {
            break;
        }
        {
            let mut st = shared.state.lock();
            // The time this takes is ours, not the peer's silence.
            if !heard(&mut st, peer, link) {
                return Ok(Some("link replaced"));
            }
            let room = (2 * cap).saturating_sub(st.dir.count_of(peer));
            if part.len() > room {
                let mut fresh = 0;
                let before = part.len();
                part.retain(|(c, _)| {
                    st.dir.claims_by(peer, c).1 || {
                        fresh += 1;
                        fresh <= room
                    }
                });
                ignored += before - part.len();
            }
            let fx = st.dir.apply(DirEvent::ResyncChunk {
                node: peer.to_string(),
                claims: part,
            });
            shared.apply_dir_effects(fx);
            MutexGuard::unlock_fair(st);
        }
        tokio::task::yield_now().await;
    }
    if ignored > 0 {
        bump(&shared.counters.frames_rejected);
        warn!(
            peer,
            ignored, "resync claims past twice {cap} claims of one peer ignored"
        );
    }
    if last {
        *taken = None;
        ahead.resync_ended(peer);
        {
            let mut st = shared.state.lock();
            if !heard(&mut st, peer, link) {
                return Ok(Some("link replaced"));
            }
            st.dir.apply(DirEvent::ResyncEnd { node: peer.to_string() });
            // The claims the resync no longer names are sessions the peer lost without a
            // `Disown` reaching us (it restarted before it was found failed, or the frames
            // died with a link): mail forwarded to them meanwhile was notified to the peer
            // and woke nobody. The node that takes over is told, as for a failed peer. Only
            // while a sweep will run: the sweep's end takes the entry out, and one left behind
            // (nothing to sweep) would be filled by the peer's failure later, when another
            // node, lower and up by then, takes over (two nodes told, two pushes).
            if st.dir.sweeping(peer) && st.members.takes_over_from(peer) {
                st.lost.entry(peer.to_string()).or_default();
            }
        }
        return Ok(finish_sweep(shared, peer, link).await);
    }
    Ok(None)
}

/// Records that `link` is alive now, if it is still `peer`'s link (false: replaced or closed).
fn heard(st: &mut super::State, peer: &str, link: LinkId) -> bool {
    if st.members.link_of(peer) != Some(link) {
        return false;
    }
    st.members.handle(
        MemberEvent::Heard {
            peer: peer.to_string(),
            link,
        },
        Instant::now(),
    );
    true
}

/// Removes the stale claims of `peer`, a slice per lock hold, before the reader goes on.
/// `Some` if the link was replaced meanwhile (the sweeper then finishes the job).
async fn finish_sweep(shared: &Shared, peer: &str, link: LinkId) -> Option<&'static str> {
    loop {
        {
            let mut st = shared.state.lock();
            if !st.dir.sweeping(peer) {
                return None;
            }
            if !heard(&mut st, peer, link) {
                shared.sweep_wanted.notify_one();
                return Some("link replaced");
            }
            shared.sweep_step(&mut st, peer);
            MutexGuard::unlock_fair(st);
        }
        tokio::task::yield_now().await;
    }
}

/// The sending half of a link as `run_link` uses it.
type Writer = LinkWriter<BufWriter<OwnedWriteHalf>>;

/// Writes the initial resync, then queued frames, heartbeats and resyncs until the link ends.
async fn write_loop(
    shared: &Shared,
    peer: &str,
    wr: &mut Writer,
    rx: &mut mpsc::Receiver<Outgoing>,
    resync: &Notify,
    leave: &Notify,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
) -> Result<&'static str, CodecError> {
    let max = shared.settings.max_frame;
    let returned = |conn: &str, ids: Vec<i64>| {
        shared
            .counters
            .handoffs_failed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        shared.emit(ClusterEvent::HandOffReturned {
            node: peer.to_string(),
            conn: conn.to_string(),
            ids,
        });
    };
    let returned: &(dyn Fn(&str, Vec<i64>) + Sync) = &returned;
    write_resync(wr, local_claims(shared).await, max).await?;
    wr.flush().await?;
    let mut hb = tokio::time::interval(shared.settings.heartbeat_interval);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            o = rx.recv() => {
                let Some(o) = o else { return Ok("link handle dropped") };
                // Each frame's room in the send budget is given back once it is written.
                write_tracked(wr, unconfirmed, returned, &o.frame).await?;
                drop(o);
                for _ in 1..WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(o) => write_tracked(wr, unconfirmed, returned, &o.frame).await?,
                        Err(_) => break,
                    }
                }
                wr.flush().await?;
            }
            _ = hb.tick() => {
                write_tracked(wr, unconfirmed, returned, &Frame::Ping { t: shared.micros() }).await?;
                wr.flush().await?;
            }
            _ = resync.notified() => {
                // Queued directory frames predate the snapshot read after: drop them, keep
                // the rest. Frames queued from now on are written after the snapshot.
                let mut keep = Vec::new();
                while let Ok(o) = rx.try_recv() {
                    if !matches!(o.frame, Frame::Own { .. } | Frame::Disown { .. } | Frame::Resync { .. }) {
                        keep.push(o);
                    }
                }
                // Out of the queue, so noted at once: if the link ends before they are
                // written, they are released with the rest, not left to their lease.
                for o in &keep {
                    unconfirmed.lock().written(&o.frame);
                }
                write_resync(wr, local_claims(shared).await, max).await?;
                for o in keep {
                    write_noted(wr, unconfirmed, returned, &o.frame).await?;
                }
                wr.flush().await?;
            }
            _ = leave.notified() => {
                while let Ok(o) = rx.try_recv() {
                    write_tracked(wr, unconfirmed, returned, &o.frame).await?;
                }
                write_tracked(wr, unconfirmed, returned, &Frame::Leave).await?;
                wr.flush().await?;
                let _ = wr.shutdown().await;
                return Ok("we left the cluster");
            }
        }
    }
}

/// This node's claims, read [`DIR_SLICE`] at a time (`Directory::page`): every claim held
/// throughout is in it; one made or ended meanwhile was also queued on the link as an
/// `Own`/`Disown`, which the peer applies after the snapshot. A conn may come twice (the
/// peer keeps its highest epoch).
async fn local_claims(shared: &Shared) -> Vec<(String, u64)> {
    let node = &shared.settings.node_id;
    let mut out = Vec::new();
    let mut from = None;
    loop {
        let (page, next) = {
            let st = shared.state.lock();
            let r = st.dir.page(node, from, DIR_SLICE);
            MutexGuard::unlock_fair(st);
            r
        };
        out.extend(page);
        match next {
            Some(c) => from = Some(c),
            None => return out,
        }
        tokio::task::yield_now().await;
    }
}

/// [`write_one`], noting a `Deliver` or a ping as written ([`Unconfirmed`]) before the write
/// starts: a write cancelled half-way (the link ended while the socket was full) or failed
/// may have put the frame on the wire, and what may have gone is released when the link ends
/// rather than left leased to the peer until the lease runs out. A `Deliver` too large to
/// send is not written: its messages go to `returned` (back to the node at once,
/// [`ClusterEvent::HandOffReturned`]; `Shared::hand_off` measures frames, so this is a
/// second line).
async fn write_tracked<W: AsyncWrite + Unpin>(
    wr: &mut LinkWriter<W>,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
    returned: &(dyn Fn(&str, Vec<i64>) + Sync),
    f: &Frame,
) -> Result<(), CodecError> {
    unconfirmed.lock().written(f);
    write_noted(wr, unconfirmed, returned, f).await
}

/// [`write_tracked`] for a frame already noted.
async fn write_noted<W: AsyncWrite + Unpin>(
    wr: &mut LinkWriter<W>,
    unconfirmed: &parking_lot::Mutex<Unconfirmed>,
    returned: &(dyn Fn(&str, Vec<i64>) + Sync),
    f: &Frame,
) -> Result<(), CodecError> {
    let r = write_one(wr, f).await;
    if let (Ok(false), Frame::Deliver { conn, msgs }) = (&r, f) {
        unconfirmed.lock().unwrite(f);
        returned(conn, msgs.iter().map(|m| m.id).collect());
    }
    r.map(|_| ())
}

/// Writes one frame; a frame too large to send (an absurd conn id) is logged and skipped
/// rather than taking the link down: `Ok(false)`.
async fn write_one<W: AsyncWrite + Unpin>(wr: &mut LinkWriter<W>, f: &Frame) -> Result<bool, CodecError> {
    match wr.write_frame(f).await {
        Err(CodecError::TooLarge { len, max }) => {
            warn!(kind = f.kind(), len, max, "cluster frame too large to send, skipped");
            Ok(false)
        }
        r => r.map(|()| true),
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

    /// A `Deliver` counts as written from the moment its write starts: a write that never
    /// ends (the peer reads nothing, the link is then dropped) still leaves it to be released
    /// when the link ends. One too large to send is taken back and returned at once.
    #[tokio::test]
    async fn a_deliver_is_noted_before_its_write_and_taken_back_if_never_sent() {
        let (sender, _receiver) = crate::cluster::link::test_pair(1 << 20, 1 << 20);
        let (stream, _peer) = tokio::io::duplex(64); // the peer never reads
        let (r, w) = tokio::io::split(stream);
        let (_reader, mut wr) = sender.into_link(r, w);
        let u = parking_lot::Mutex::new(Unconfirmed::default());
        let returned = std::sync::Mutex::new(Vec::new());
        let back = |conn: &str, ids: Vec<i64>| returned.lock().unwrap().push((conn.to_string(), ids));
        let mut big = deliver("c", 7);
        if let Frame::Deliver { msgs, .. } = &mut big {
            msgs[0].payload = vec![0; 100_000];
        }
        let write = write_tracked(&mut wr, &u, &back, &big);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), write).await.is_err(),
            "the write cannot finish: nothing reads"
        );
        assert_eq!(left(&u.lock()), vec![7], "noted although its write never ended");

        let (sender, _receiver) = crate::cluster::link::test_pair(64, 64);
        let (stream, _peer) = tokio::io::duplex(1 << 16);
        let (r, w) = tokio::io::split(stream);
        let (_reader, mut wr) = sender.into_link(r, w);
        let u = parking_lot::Mutex::new(Unconfirmed::default());
        u.lock().written(&deliver("c", 1));
        write_tracked(&mut wr, &u, &back, &big).await.unwrap();
        assert_eq!(left(&u.lock()), vec![1], "the frame too large to send is not kept");
        assert_eq!(*returned.lock().unwrap(), vec![("c".to_string(), vec![7])]);
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

    /// A peer's close reason fits a WebSocket close frame: at most 123 bytes whatever its
    /// characters, cut on a character boundary, its control characters escaped.
    #[test]
    fn a_peers_close_reason_fits_a_close_frame() {
        assert_eq!(close_reason("removed by the operator"), "removed by the operator");
        for long in [
            "x".repeat(10_000),
            "é".repeat(5_000),
            "\n".repeat(300),
            format!("{}€", "x".repeat(122)),
        ] {
            let r = close_reason(&long);
            assert!(r.len() <= MAX_CLOSE_REASON, "{} bytes", r.len());
            assert!(r.ends_with('…') && r.len() > MAX_CLOSE_REASON - 4, "{r:?}");
            assert!(!r.contains('\n'));
        }
        assert_eq!(
            close_reason(&"x".repeat(123)),
            "x".repeat(123),
            "one that fits is kept whole"
        );
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
