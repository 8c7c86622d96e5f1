//! What a WebSocket session gives back: the leases of its owner and the messages handed to
//! it, as it stops delivering, and what a request of a session that stopped meanwhile leased.
//!
//! A lease is a store write: dropping the future that asked for it does not undo it. So a
//! request read from a socket runs to its end apart from the session ([`handle_detached`]),
//! and one that ends after its session's release gives back what it took itself.

use super::upgrade::SocketSlot;
use super::Shared;
use crate::protocols::{now_ms, HandleError, Outcome, TransportKind};
use crate::store::{QueuedMessage, StoreResult};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a socket's requests, run apart from it ([`handle_detached`]), and the socket's own
/// end (`stopped`) tell each other, whichever comes first.
#[derive(Default)]
pub(super) struct SocketEnd {
    /// Set by the session's `stopped`, before it releases its owner's leases.
    pub(super) closed: AtomicBool,
    /// The connections requests of this socket leased for, recorded before they look at
    /// `closed`: the socket's end releases its owner for them, and wakes them, even when a
    /// request's answer never reached the session (it stopped first).
    lent: parking_lot::Mutex<Vec<String>>,
}

impl SocketEnd {
    pub(super) fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Marks the socket closed and takes what its requests leased for.
    pub(super) fn close(&self) -> Vec<String> {
        self.closed.store(true, Ordering::SeqCst);
        std::mem::take(&mut *self.lent.lock())
    }

    /// Records `conn` as one this socket's owner holds leases for: the socket's end releases
    /// them and wakes `conn` (its wallet is told of the messages given back).
    pub(super) fn lent_for(&self, conn: &str) {
        let mut lent = self.lent.lock();
        if !lent.iter().any(|c| c == conn) {
            lent.push(conn.to_owned());
        }
    }
}

/// Handles one envelope read from a socket whose lease owner is `owner`, in a task of its own
/// started now. The forwards it queued wake their wallets' sessions whatever becomes of the
/// socket (they are taken out of the outcome). `end.closed` is set by the session's `stopped`,
/// before it releases `owner`: a request ending after that releases `owner` again, or
/// what it leased would stay leased to a gone socket until the lease ran out. A request ending
/// before it records what it leased for in `end`, for `stopped` to release (its answer may
/// never reach a session that stops first). `slot`, the socket's place under
/// `limits.max_sessions`, is held until the request ends.
pub(super) fn handle_detached(
    shared: Arc<Shared>,
    bytes: bytes::Bytes,
    owner: String,
    end: Arc<SocketEnd>,
    slot: Arc<SocketSlot>,
) -> impl std::future::Future<Output = Result<Outcome, HandleError>> {
    let task = actix_rt::spawn(async move {
        let _slot = slot;
        let mut res = shared.mediator.handle(&bytes, TransportKind::WebSocket, &owner).await;
        if let Ok(out) = &mut res {
            forwarded(&shared, out);
            // Leased for the socket's owner: a pickup 2.0 delivery, or a pickup 1.0 batch
            // (removed once the socket confirms it read it, given back if it ends first).
            let leased = !out.leased.is_empty() || out.ack_on_return.is_some();
            if let (true, Some(c)) = (leased, &out.connection) {
                end.lent_for(&c.id);
            }
        }
        if end.closed() {
            let conn = res
                .as_ref()
                .ok()
                .and_then(|o| o.connection.as_ref())
                .map(|c| c.id.clone());
            let released = shared.mediator.store.release_owner(&owner).await;
            match conn {
                Some(c) => gave_back(&shared, &c, released).await,
                None => {
                    if let Err(e) = released {
                        tracing::warn!("leases of a closed session not released (they expire): {e}");
                    }
                }
            }
        }
        res
    });
    // The task runs from here on, whether or not this future is ever polled.
    async move {
        task.await
            .unwrap_or_else(|e| Err(HandleError::Internal(format!("handler task: {e}"))))
    }
}

/// The forwards a message queued: counted, and their wallets' sessions woken (or the messages
/// handed to them).
fn forwarded(shared: &Arc<Shared>, out: &mut Outcome) {
    if out.forward.is_some() {
        shared.metrics.forwards_received.inc();
        let queued = out.queued_for.len() + usize::from(out.handed.is_some());
        shared.metrics.forwards_queued.inc_by(queued as u64);
    }
    shared.after_forward(out);
}

/// Leases of `conn` were given back (`released`: how many; a session closed, was superseded
/// or stopped delivering for `conn`): whoever holds the connection now is woken, or the wallet
/// pushed.
pub(super) async fn gave_back(shared: &Arc<Shared>, conn: &str, released: StoreResult<u64>) {
    match released {
        Ok(n) if n > 0 => {
            tracing::info!(connection = %conn, released = n, "unacknowledged deliveries given back");
            shared.queued_new(conn).await;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(connection = %conn, "leases not released (they expire): {e}"),
    }
}

/// A session registered for `conn` ended, having given back `released` leases
/// ([`release_all`]): what it gave back is dealt with by [`gave_back`]. When it gave back
/// nothing, messages may still be pending for `conn`: queued while it held the wallet's
/// session, so their forwards woke it and pushed nobody, yet never taken by it (a quiet
/// session takes nothing, a live one waits on its window). Then they count as newly queued
/// ([`Shared::queued_new`]): another session of the wallet is woken, or the wallet pushed;
/// else, with no session anywhere, it would never be. (A forward another node took once the
/// session was gone pushed the wallet already, and this may push it again. Not "unless
/// pushed since the end": a push is recorded when it is claimed, and one claimed while the
/// session still looked live is dropped unsent.)
pub(super) async fn session_ended(shared: &Arc<Shared>, conn: &str, released: StoreResult<u64>) {
    if !matches!(released, Ok(0)) {
        return gave_back(shared, conn, released).await;
    }
    let conns = [conn.to_string()];
    match shared.mediator.store.pending_among(&conns, now_ms()).await {
        Ok(pending) if !pending.is_empty() => shared.queued_new(conn).await,
        Ok(_) => {}
        Err(e) => tracing::warn!(connection = %conn, "queue of a closed session not read, nobody woken: {e}"),
    }
}

/// Gives back what a session that stops delivering holds: its own leases (`owner`) and the
/// messages handed to it (leased to the node's hand-off owner). How many went back.
pub(super) async fn release_all(shared: &Arc<Shared>, conn: &str, owner: &str, handed: &[i64]) -> StoreResult<u64> {
    let store = &shared.mediator.store;
    let mut n = store.release_owner(owner).await?;
    if !handed.is_empty() {
        let handoff = crate::protocols::handoff_owner(&shared.mediator.node_id);
        n += store.release(conn, handed, &handoff).await?;
    }
    Ok(n)
}

/// Leased messages a session will not write (their connection is not the one it delivers
/// for now), leased to `owner` (the node's hand-off owner when `handed`): given back under
/// their own connections, and whoever holds each woken.
pub(super) async fn give_back_msgs(shared: Arc<Shared>, owner: String, handed: bool, msgs: Vec<QueuedMessage>) {
    let mut by_conn: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for q in msgs {
        by_conn.entry(q.connection).or_default().push(q.id);
    }
    for (conn, ids) in by_conn {
        if handed {
            shared.hand_back(&shared.mediator.node_id, &conn, &ids).await;
        } else {
            let released = shared.mediator.store.release(&conn, &ids, &owner).await;
            gave_back(&shared, &conn, released).await;
        }
    }
}
