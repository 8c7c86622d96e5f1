//! Accepting and dialing: the handshake that turns a socket into a link, the dialer's
//! backoff, and the bound on handshakes in progress.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::admission::{Admission, Admit, Named, SlotId};
use super::link_task::run_link;
use super::{bump, Handshaking, Refusal, Shared, BACKOFF_CAP, BACKOFF_START, MAX_PENDING_HANDSHAKES};
use crate::cluster::codec::CodecError;
use crate::cluster::handshake::{self, Established, HandshakeError, Role};
use crate::cluster::membership::MemberEvent;

/// Accepts peer connections until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown_rx.clone();
    // Each pending handshake's slot holds the sender of its cancel signal: dropping it (an
    // eviction) ends that handshake and closes its socket.
    let pending: Arc<Mutex<Admission<oneshot::Sender<()>>>> =
        Arc::new(Mutex::new(Admission::new(MAX_PENDING_HANDSHAKES)));
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
        let source = addr.ip().to_canonical();
        let protected = shared
            .state
            .lock()
            .peers
            .values()
            .any(|p| p.addr.ip().to_canonical() == source);
        let (cancel, cancelled) = oneshot::channel();
        let slot = match pending.lock().admit(source, protected, cancel) {
            Admit::Yes { id, evicted } => {
                if evicted.is_some() {
                    bump(&shared.counters.handshakes_evicted);
                    debug!(%addr, "cluster handshake admitted in place of an older pending one");
                }
                id
            }
            Admit::No => {
                let why = "every pending cluster handshake is a configured peer's";
                log_refused(&shared, addr, Refusal::NoSlot, &why);
                continue;
            }
        };
        let me = shared.clone();
        let pending = pending.clone();
        shared.spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut stream = stream;
            let now = me.secret();
            let gen = now.gen;
            // Counted (for `leave`) once the peer's `Hello` names a configured node, not while a
            // stranger's socket sits silent.
            let counted = Mutex::new(None);
            let res = {
                let local = local_params(&me, &now.secret);
                let check = |n: &str| {
                    let ok = {
                        // Counted under the lock `leave` sets `left` under.
                        let st = me.state.lock();
                        let ok = !st.left && st.members.is_configured(n);
                        if ok {
                            *counted.lock() = Some(me.handshaking());
                        }
                        ok
                    };
                    if ok {
                        name_slot(&me, &pending, slot, n);
                    }
                    ok
                };
                // The dialer proved the secret: no newer `Hello` or socket takes its slot.
                let proven = || {
                    pending.lock().prove(slot);
                };
                let handshake = tokio::time::timeout(
                    me.settings.handshake_timeout,
                    handshake::accept_with_keys(&mut stream, &local, &now.keys, check, proven),
                );
                tokio::select! {
                    r = handshake => r.unwrap_or(Err(HandshakeError::Timeout)),
                    // Evicted by a newer socket (admission.rs): the socket closes here.
                    _ = cancelled => Err(HandshakeError::Evicted),
                }
            };
            pending.lock().release(slot);
            match res {
                Ok(Established { peer, channel }) => {
                    debug!(%addr, peer = %peer, "inbound cluster link authenticated");
                    // Counted by `check`, which named this peer.
                    let counted = counted.into_inner().unwrap_or_else(|| me.handshaking());
                    run_link(me, stream, channel, peer, false, gen, counted).await;
                }
                // A flood evicts many: counted, and not a warning each.
                Err(HandshakeError::Evicted) => debug!(%addr, "pending cluster handshake evicted"),
                Err(e) => {
                    me.count_handshake_error(&e);
                    log_refused(&me, addr, Refusal::from(&e), &e);
                }
            }
        });
    }
}

/// Marks the pending handshake in `slot` as naming configured peer `peer` (its `Hello` did),
/// so idle sockets from the same address no longer evict it (`admission.rs`). If that
/// address holds as many named as it may, the oldest of them not yet proven gives way (its
/// socket closes: a `Hello` proves nothing); if every one is proven, it stays unnamed.
fn name_slot(shared: &Shared, pending: &Mutex<Admission<oneshot::Sender<()>>>, slot: SlotId, peer: &str) {
    let named = pending.lock().name(slot, peer);
    match named {
        // Dropping the evicted slot's cancel sender (here, out of the lock) ends its handshake.
        Named::Yes { evicted: Some(_) } => {
            bump(&shared.counters.handshakes_evicted);
            debug!(
                peer,
                "cluster handshake naming a peer took an older one's unproven slot"
            );
        }
        Named::Yes { evicted: None } => {}
        Named::No => debug!(
            peer,
            "cluster handshake naming a peer left unnamed: every one its address may hold is proven"
        ),
    }
}

/// Logs an inbound connection from `addr` refused for `why` (`reason`): as a warning at most
/// once a second per kind from a configured peer's address, once in ten seconds per kind from
/// any other ([`Shared::warn_refused_now`]), else at debug. Whoever can reach the cluster port
/// can have one refused per connection it opens, from a peer's address too (its machine, its
/// NAT, every node on loopback).
fn log_refused(shared: &Shared, addr: SocketAddr, why: Refusal, reason: &dyn std::fmt::Display) {
    match shared.warn_refused_now(addr.ip(), why) {
        Some(0) => warn!(%addr, %reason, "inbound cluster connection refused"),
        Some(n) => warn!(
            %addr,
            %reason,
            "inbound cluster connection refused ({n} more refused since the last warning)"
        ),
        None => debug!(%addr, %reason, "inbound cluster connection refused"),
    }
}

/// This node's side of a handshake, proving `secret` ([`Shared::secret`], read as the
/// handshake starts, with the keys the handshake is run with: `handshake::run_with_keys`).
fn local_params<'a>(shared: &'a Shared, secret: &'a [u8]) -> handshake::Local<'a> {
    handshake::Local {
        cluster: &shared.settings.cluster_name,
        node: &shared.settings.node_id,
        secret,
        max_frame: shared.settings.max_frame,
    }
}

/// Keeps one link to `peer` open: dials when there is none, with exponential backoff.
pub(super) async fn dial_loop(shared: Arc<Shared>, peer: String, mut stop: watch::Receiver<()>) {
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
            Ok((stream, est, gen, counted)) => {
                let t = Instant::now();
                run_link(shared.clone(), stream, est.channel, peer.clone(), true, gen, counted).await;
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

/// A link to `peer` at `addr`, with the generation of the secret its handshake proved.
/// The handshake is counted (for `leave`) from the TCP connect on: a peer that cannot be reached
/// holds up no leave.
async fn dial(
    shared: &Arc<Shared>,
    peer: &str,
    addr: SocketAddr,
) -> Result<(TcpStream, Established, u64, Handshaking), HandshakeError> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await.map_err(CodecError::from)?;
        let counted = {
            let st = shared.state.lock();
            if st.left {
                let left = std::io::Error::other("this node left the cluster");
                return Err(CodecError::from(left).into());
            }
            shared.handshaking()
        };
        let _ = stream.set_nodelay(true);
        let now = shared.secret();
        let gen = now.gen;
        let local = local_params(shared, &now.secret);
        let accept = |n: &str| n == peer;
        let est = handshake::run_with_keys(&mut stream, &local, &now.keys, Role::Dialer, Some(peer), accept).await?;
        Ok((stream, est, gen, counted))
    };
    tokio::time::timeout(shared.settings.handshake_timeout, fut)
        .await
        .unwrap_or(Err(HandshakeError::Timeout))
}
