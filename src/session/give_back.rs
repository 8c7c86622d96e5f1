//! What a WebSocket session gives back: the leases of its owner and the messages handed to
//! it, as it stops delivering, and what a request of a session that stopped meanwhile leased.
//! And what the node's HTTP pickups hold leased ([`HttpLeases`]), which a drained node waits
//! for before it says it is empty.
//!
//! A lease is a store write: dropping the future that asked for it does not undo it. So a
//! request read from a socket runs to its end apart from the session ([`handle_detached`]),
//! and one that ends after its session's release gives back what it took itself.

use super::upgrade::SocketSlot;
use super::Shared;
use crate::protocols::{now_ms, HandleError, Outcome, TransportKind};
use crate::store::{QueuedMessage, StoreResult};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Most connections a socket records as lent for ([`SocketEnd::lent_for`]): a wallet's socket
/// serves one connection, or a few sharing it.
pub(super) const MAX_LENT: usize = 64;

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
    /// them and wakes `conn` (its wallet is told of the messages given back). At most
    /// [`MAX_LENT`] are recorded: the release at the end is by owner and takes every lease
    /// whatever the list holds; only connections past it are not woken at once (a session of
    /// theirs is woken by the sweep, `delivery.sweep_interval_ms`; one without a session is not
    /// pushed for what was given back). No wallet's socket serves that many; a socket rebound
    /// from connection to connection (anyone may make thousands) grew the list without bound,
    /// and the check of each rebind along with it.
    pub(super) fn lent_for(&self, conn: &str) {
        let mut lent = self.lent.lock();
        if lent.len() < MAX_LENT && !lent.iter().any(|c| c == conn) {
            lent.push(conn.to_owned());
        }
    }

    /// The connections recorded so far ([`SocketEnd::lent_for`]) but `bound`, kept: a
    /// superseded socket gives back its owner's leases and goes on (it may lease again).
    pub(super) fn lent_besides(&self, bound: &str) -> Vec<String> {
        self.lent.lock().iter().filter(|c| *c != bound).cloned().collect()
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
/// nothing (it held nothing, or the store failed), messages may still be pending for `conn`:
/// queued while it held the wallet's session, so their forwards woke it and pushed nobody,
/// yet never taken by it (a quiet session takes nothing, a live one waits on its window).
/// Then they count as newly queued
/// ([`Shared::queued_new`]): another session of the wallet is woken, or the wallet pushed;
/// else, with no session anywhere, it would never be. (A forward another node took once the
/// session was gone pushed the wallet already, and this may push it again. Not "unless
/// pushed since the end": a push is recorded when it is claimed, and one claimed while the
/// session still looked live is dropped unsent.)
pub(super) async fn session_ended(shared: &Arc<Shared>, conn: &str, released: StoreResult<u64>) {
    match released {
        Ok(n) if n > 0 => return gave_back(shared, conn, Ok(n)).await,
        Ok(_) => {}
        // Nothing given back: what it held goes back as its leases run out (and their reclaim
        // wakes the wallet), but what was pending and never taken is seen to below, or a store
        // error at the end of a quiet session left its wallet unwoken.
        Err(e) => tracing::warn!(connection = %conn, "leases not released (they expire): {e}"),
    }
    wake_if_pending(shared, conn).await;
}

/// A socket rebound from `conn` to another connection: the messages handed to it for `conn`
/// (`handed`, leased to the node's hand-off owner) go back, and `conn` is dealt with as at a
/// session's end ([`session_ended`]; `held`: the socket held the wallet's session, else as
/// [`gave_back`]). Before, only what was handed went back and
/// woke anyone: mail queued for `conn` while the socket held it and never taken (a quiet
/// socket, or spilled back) woke this socket, pushed nobody, and after the rebind nobody
/// until new mail came. (Its own leases for `conn` stay until they are acknowledged, run out,
/// or the socket gives back its owner's: `conn` is recorded for that, see `lent_besides`.)
pub(super) async fn left(shared: &Arc<Shared>, conn: &str, handed: &[i64], held: bool) {
    let released = match handed {
        [] => Ok(0),
        ids => {
            shared.metrics.handed("returned", ids.len() as u64);
            let handoff = crate::protocols::handoff_owner(&shared.mediator.node_id);
            shared.mediator.store.release(conn, ids, &handoff).await
        }
    };
    if held {
        session_ended(shared, conn, released).await
    } else {
        gave_back(shared, conn, released).await
    }
}

/// A socket's owner gave back its leases (`released`): the connections other than the bound
/// one that it leased for (`lent`: [`SocketEnd::lent_for`]) are woken too when anything went
/// back (the store does not say whose), or pushed. Before, a superseded socket woke only its
/// bound connection: one it had left (rebound) got its delivery back pending with nobody
/// told, and no lease's reclaim to tell it either, until new mail came.
pub(super) async fn wake_lent(shared: &Arc<Shared>, lent: &[String], released: &StoreResult<u64>) {
    if lent.is_empty() || !matches!(released, Ok(n) if *n > 0) {
        return;
    }
    // Only those with mail pending now: the release was of the owner's leases, whoever's they
    // were, and a wallet with nothing given back is not pushed (a count of 0).
    let pending = match shared.mediator.store.pending_among(lent, now_ms()).await {
        Ok(pending) => pending,
        Err(e) => {
            tracing::warn!("queues of connections a socket left not read, each woken: {e}");
            lent.to_vec()
        }
    };
    for c in &pending {
        shared.queued_new(c).await;
    }
}

/// Whoever holds `conn` is woken, or its wallet pushed, if messages of it are pending.
async fn wake_if_pending(shared: &Arc<Shared>, conn: &str) {
    let conns = [conn.to_string()];
    match shared.mediator.store.pending_among(&conns, now_ms()).await {
        Ok(pending) if !pending.is_empty() => shared.queued_new(conn).await,
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(connection = %conn, "queue of a session that ended (or left it) not read, nobody woken: {e}")
        }
    }
}

/// Gives back what a session that stops delivering holds: its own leases (`owner`) and the
/// messages handed to it (leased to the node's hand-off owner). How many went back.
///
/// Each step is tried whatever became of the other, and what went back counts even when a
/// step failed: its caller wakes the wallets for it ([`gave_back`], [`session_ended`]), and
/// for an error it wakes nobody. Before, a store error on one step returned at once: the other
/// step's messages stayed leased, and those that did go back to pending were nobody's news (no
/// push, no session woken) until new mail came. The error is returned when nothing went back,
/// else logged here (what it kept leased goes back as its lease runs out, and its reclaim
/// wakes the wallet).
pub(super) async fn release_all(shared: &Arc<Shared>, conn: &str, owner: &str, handed: &[i64]) -> StoreResult<u64> {
    let store = &shared.mediator.store;
    let own = store.release_owner(owner).await;
    let handed = match handed {
        [] => Ok(0),
        ids => {
            let handoff = crate::protocols::handoff_owner(&shared.mediator.node_id);
            store.release(conn, ids, &handoff).await
        }
    };
    match (own, handed) {
        (Ok(a), Ok(b)) => Ok(a + b),
        (Ok(n), Err(e)) | (Err(e), Ok(n)) if n > 0 => {
            tracing::warn!(connection = %conn, released = n, "some leases not released (they expire): {e}");
            Ok(n)
        }
        (Err(e), Err(other)) => {
            tracing::warn!(connection = %conn, "leases not released (they expire): {other}");
            Err(e)
        }
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => Err(e),
    }
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

/// Connections [`HttpLeases`] keeps apart at most; past it, the leases of new ones are kept
/// as one deadline, the latest (a drain then waits for it: longer, never too short).
const HTTP_LEASES_MAX: usize = 100_000;
/// How often, at most, [`HttpLeases`] past [`HTTP_LEASES_PRUNE_FROM`] connections forgets the
/// leases that ran out (each time it reads them all): it keeps about a lease's worth of
/// pickups, not every connection that ever picked up over HTTP.
const HTTP_LEASES_PRUNE_EVERY_MS: i64 = 1_000;
const HTTP_LEASES_PRUNE_FROM: usize = 1_024;
/// Store reads one [`HttpLeases::held`] makes at most: a `/status` during a drain answers in
/// the time of a few reads, not one per wallet that picked up over HTTP in the last lease.
const HTTP_LEASES_READS_MAX: usize = 64;

/// What this node's HTTP requests hold: the requests being answered, and the connections
/// whose messages their pickups leased (pickup 2.0 and 3.0 deliveries over HTTP, leased to
/// [`Shared::http_owner`] until acknowledged, on any node, or until the lease runs out),
/// each with the end of its latest lease. A drained node says `empty` (`/status`) only once
/// none of it is left ([`HttpLeases::held`]); before, it counted sessions only. A pickup
/// being answered needs the node: stopped other than gracefully, the answer is lost and its
/// messages wait for their lease. One answered does not (its acknowledgement may reach any
/// node, and a lease that runs out is taken back by any node's sweep), but the stop gives
/// its messages back (`node::run`) as deliveries to make again: the wallet about to
/// acknowledge them gets them twice, and is pushed for them. A drain that waits lets the
/// acknowledgement land; at most `delivery.lease_ms` after the last pickup here.
#[derive(Default)]
pub struct HttpLeases {
    requests: AtomicUsize,
    leased: parking_lot::Mutex<Leased>,
}

#[derive(Default)]
struct Leased {
    /// connection -> when its latest HTTP lease runs out.
    by_conn: std::collections::HashMap<String, i64>,
    /// When the latest lease of the connections past [`HTTP_LEASES_MAX`] runs out.
    beyond: i64,
    pruned_at: i64,
}

/// An HTTP request being answered ([`HttpLeases::request`]), counted until dropped.
pub struct HttpRequestCounted<'a>(&'a HttpLeases);

impl Drop for HttpRequestCounted<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HttpLeases {
    /// Counts an HTTP request in until the guard drops: whatever it leases is recorded
    /// ([`HttpLeases::leased`]) before, so a lease taken and not yet recorded is not missed.
    pub fn request(&self) -> HttpRequestCounted<'_> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        HttpRequestCounted(self)
    }

    /// HTTP requests being answered now.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// A pickup over HTTP leased messages of `conn` until `until_ms` at the latest.
    pub fn leased(&self, conn: &str, until_ms: i64, now_ms: i64) {
        let mut l = self.leased.lock();
        if let Some(u) = l.by_conn.get_mut(conn) {
            *u = (*u).max(until_ms);
            return;
        }
        if l.by_conn.len() >= HTTP_LEASES_PRUNE_FROM && now_ms.saturating_sub(l.pruned_at) >= HTTP_LEASES_PRUNE_EVERY_MS
        {
            l.by_conn.retain(|_, u| *u > now_ms);
            l.pruned_at = now_ms;
        }
        if l.by_conn.len() >= HTTP_LEASES_MAX {
            l.beyond = l.beyond.max(until_ms);
            return;
        }
        l.by_conn.insert(conn.to_owned(), until_ms);
    }

    /// The connections whose HTTP leases may be held at `now_ms`, each with its deadline
    /// (those that ran out are forgotten); `None` when one past [`HTTP_LEASES_MAX`] may be.
    fn outstanding(&self, now_ms: i64) -> Option<Vec<(String, i64)>> {
        let mut l = self.leased.lock();
        if l.beyond > now_ms {
            return None;
        }
        l.by_conn.retain(|_, u| *u > now_ms);
        Some(l.by_conn.iter().map(|(c, u)| (c.clone(), *u)).collect())
    }

    /// `conn` has no lease left that was recorded by `until_ms`: forgotten, unless a lease
    /// recorded since runs out later.
    fn forget(&self, conn: &str, until_ms: i64) {
        let mut l = self.leased.lock();
        if l.by_conn.get(conn) == Some(&until_ms) {
            l.by_conn.remove(conn);
        }
    }

    /// Whether anything of this node's HTTP requests may still be held at `now_ms`: a request
    /// being answered, or a lease not run out of a connection with messages leased in the
    /// store. The store does not say to whom, so a connection whose messages another node's
    /// session leased keeps this one waiting until its own deadline (later, never lost). A
    /// connection found with none is forgotten; a store error counts as held. Stops at the
    /// first one held: a store read for each connection only once they are all acknowledged.
    pub async fn held(&self, store: &dyn crate::store::Store, now_ms: i64) -> bool {
        // The requests before the leases: a request counted out has recorded its lease.
        if self.requests() > 0 {
            return true;
        }
        let Some(conns) = self.outstanding(now_ms) else {
            return true;
        };
        let more = conns.len() > HTTP_LEASES_READS_MAX;
        for (conn, until) in conns.into_iter().take(HTTP_LEASES_READS_MAX) {
            match store.queue_stats(&conn, now_ms).await {
                Ok(q) if q.leased == 0 => self.forget(&conn, until),
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(connection = %conn, "HTTP leases not read, counted as held: {e}");
                    return true;
                }
            }
        }
        // Those not read yet are held as far as this call knows; the next reads on from here
        // (each one found acknowledged is forgotten).
        more
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket records each connection it leased for once, and at most [`MAX_LENT`] of them.
    #[test]
    fn a_socket_records_at_most_max_lent_connections() {
        let end = SocketEnd::default();
        for i in 0..3 * MAX_LENT {
            end.lent_for(&format!("c{}", i % (2 * MAX_LENT)));
            end.lent_for("c0");
        }
        let lent = end.lent_besides("c1");
        assert_eq!(lent.len(), MAX_LENT - 1);
        assert_eq!(lent[0], "c0");
        assert_eq!(end.close().len(), MAX_LENT);
    }

    #[test]
    fn an_http_lease_is_outstanding_until_it_runs_out_and_the_latest_counts() {
        let h = HttpLeases::default();
        h.leased("c1", 1_000, 0);
        h.leased("c1", 900, 100);
        h.leased("c2", 2_000, 100);
        let mut o = h.outstanding(999).unwrap();
        o.sort();
        assert_eq!(o, vec![("c1".to_string(), 1_000), ("c2".to_string(), 2_000)]);
        assert_eq!(h.outstanding(1_000).unwrap(), vec![("c2".to_string(), 2_000)]);
        assert_eq!(h.outstanding(2_000).unwrap(), vec![]);
    }

    #[test]
    fn a_connection_leased_again_since_it_was_read_is_not_forgotten() {
        let h = HttpLeases::default();
        h.leased("c1", 1_000, 0);
        h.leased("c1", 1_500, 500);
        h.forget("c1", 1_000);
        assert_eq!(h.outstanding(600).unwrap(), vec![("c1".to_string(), 1_500)]);
        h.forget("c1", 1_500);
        assert_eq!(h.outstanding(600).unwrap(), vec![]);
    }

    #[test]
    fn past_the_bound_new_connections_share_one_deadline() {
        let h = HttpLeases::default();
        for i in 0..HTTP_LEASES_MAX {
            h.leased(&format!("c{i}"), 1_000, 0);
        }
        // Full of leases not run out: the next one is kept as the deadline of all past it.
        h.leased("late", 5_000, 10);
        assert!(h.outstanding(4_999).is_none(), "held until the latest runs out");
        assert_eq!(h.outstanding(5_000).map(|o| o.len()), Some(0));
        // Once they ran out, a new connection is kept apart again.
        h.leased("later", 9_000, 6_000);
        assert_eq!(h.outstanding(6_000).unwrap(), vec![("later".to_string(), 9_000)]);
    }

    #[test]
    fn a_request_is_counted_until_it_ends() {
        let h = HttpLeases::default();
        let r = h.request();
        let r2 = h.request();
        assert_eq!(h.requests(), 2);
        drop(r);
        drop(r2);
        assert_eq!(h.requests(), 0);
    }

    /// A drain's `/status` reads at most [`HTTP_LEASES_READS_MAX`] connections: with more
    /// recorded, it answers held and the next one reads on from there.
    #[actix_rt::test]
    async fn held_reads_a_bounded_number_of_connections_a_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open_sled(&dir.path().join("data")).await.unwrap();
        let h = HttpLeases::default();
        for i in 0..HTTP_LEASES_READS_MAX + 10 {
            h.leased(&format!("c{i}"), 10_000, 0);
        }
        assert!(h.held(store.as_ref(), 1).await, "10 not read yet");
        assert_eq!(h.outstanding(1).unwrap().len(), 10, "those read forgotten");
        assert!(!h.held(store.as_ref(), 1).await);
    }
}
