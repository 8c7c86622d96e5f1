//! Outbound HTTP: replies and queued messages POSTed to an agent's own endpoint.
//!
//! A queued message stays in the store until its POST succeeds (2xx): it is leased while
//! in flight and acknowledged right after its 2xx, or released on failure for the sweep to
//! retry. Every POST goes through the node's [`egress`] client: no redirect is followed, and
//! an endpoint resolving only to addresses the node may not reach (a listener of the cluster,
//! the store, link-local) fails like an unreachable one.

use super::egress::{self, Egress};
use super::Shared;
use crate::protocols::now_ms;
use crate::store::Connection;
use serde_json::Value;
use std::sync::Arc;

pub const ENVELOPE_CONTENT_TYPE: &str = "application/didcomm-envelope-enc";

/// Why a POST to an agent's endpoint did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// Every address of the endpoint is one this node may not connect to.
    #[error("POST {url}: {refused}")]
    Refused { url: String, refused: egress::Refused },
    /// No answer: the name did not resolve, the connection failed, the time ran out.
    #[error("POST {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// An answer other than 2xx (a redirect included: none is followed).
    #[error("POST {url}: HTTP {status}{}", if (300..400).contains(.status) { " (redirects are not followed)" } else { "" })]
    Status { url: String, status: u16 },
}

impl PostError {
    /// The `result` label of `mailroom_endpoint_posts_total`.
    fn result(&self) -> &'static str {
        match self {
            PostError::Refused { .. } => "refused",
            _ => "failed",
        }
    }

    /// Whether the endpoint, not the message, failed: no answer, a refused address, a 5xx,
    /// 408 or 429. The rest of a batch is not tried after such a failure (each would fail
    /// the same way, and a drain would cost the endpoint a POST per message); a 4xx answer
    /// about one message does not stop the others.
    fn endpoint_wide(&self) -> bool {
        match self {
            PostError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => true,
        }
    }
}

/// How a drain of a connection's queue to its endpoint ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// The queue had nothing more to lease (or the store could not be read), and everything
    /// the drain leased was delivered.
    Empty,
    /// The queue had nothing more to lease, but a drain of new messages only left messages
    /// tried before leased, unsent ([`drain_to_endpoint`]): they wait for the sweep.
    Held,
    /// The endpoint refused messages alone (a 4xx about each): they stay leased, to be tried
    /// again once their lease has run out, on the sweep's schedule.
    Refused,
    /// The endpoint itself failed: what is left stays queued for a later try.
    Failed,
}

/// POSTs one envelope with the node's outbound client; Ok on a 2xx answer.
pub async fn post_envelope(egress: &Arc<Egress>, url: &str, body: Vec<u8>) -> Result<(), PostError> {
    let res = egress
        .client()
        .post(url)
        .insert_header(("Content-Type", ENVELOPE_CONTENT_TYPE))
        .send_body(body)
        .await
        .map_err(|e| match egress::refusal(&e) {
            Some(r) => PostError::Refused {
                url: url.to_string(),
                refused: r.clone(),
            },
            None => PostError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            },
        })?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(PostError::Status {
            url: url.to_string(),
            status: res.status().as_u16(),
        })
    }
}

/// [`post_envelope`], counted in `mailroom_endpoint_posts_total`.
async fn post_counted(shared: &Shared, url: &str, body: Vec<u8>) -> Result<(), PostError> {
    let res = post_envelope(&shared.egress, url, body).await;
    shared
        .metrics
        .endpoint_post(res.as_ref().err().map_or("ok", PostError::result));
    res
}

/// Reply POSTs under way on the node at once ([`ReplySlots`]): each may hold a socket for
/// `delivery.endpoint_timeout_ms`.
pub const REPLY_POSTS_MAX: usize = 256;
/// Reply POSTs one connection may have under way at once ([`ReplySlots`]).
pub const REPLY_POSTS_PER_CONNECTION: usize = 2;
/// Reply sends one connection may have waiting or under way ([`ReplySlots`]).
pub const REPLIES_PER_CONNECTION: usize = 256;
/// Reply sends the node may have waiting or under way, all connections together
/// ([`ReplySlots`]).
pub const REPLIES_MAX: usize = 4096;
/// Reply sends a connection may have waiting or under way in the last quarter of the node's
/// [`REPLIES_MAX`] ([`ReplySlots`]).
pub const REPLIES_ALWAYS: usize = 4;
/// Past this many reply sends on the node, only a connection with fewer than
/// [`REPLIES_ALWAYS`] of its own gets in (up to [`REPLIES_MAX`]).
const REPLIES_SHARED: usize = REPLIES_MAX / 4 * 3;

/// The bound on replies POSTed to agents' endpoints. Every message that asks for a reply
/// without a return route (a trust ping, say; ACA-Py's whole onboarding) is answered by a
/// POST that may hold a socket for the endpoint's timeout: an endpoint that accepts and never
/// answers, and a stream of pings, held a socket each without bound, until the node ran out
/// of descriptors and refused its wallets. A connection has at most
/// [`REPLY_POSTS_PER_CONNECTION`] POSTs under way (the rest of its replies wait their turn, in
/// order) and [`REPLIES_PER_CONNECTION`] sends waiting or under way (past that its replies are
/// dropped, counted as `dropped` in `mailroom_endpoint_posts_total`); the node at most
/// [`REPLY_POSTS_MAX`] POSTs, so one tarpit takes two of them, not all, and
/// [`REPLIES_MAX`] sends waiting or under way, of which the last quarter only for connections
/// with fewer than [`REPLIES_ALWAYS`] sends of their own. The node's bound holds whatever the
/// number of connections: it let every connection with fewer than [`REPLIES_ALWAYS`] in past
/// it, and connections are free to make (a didexchange request each, naming an endpoint that
/// never answers): a flood of them grew the waiting sends, each a task holding its
/// connection and replies, without bound.
pub struct ReplySlots {
    posts: tokio::sync::Semaphore,
    per_conn: parking_lot::Mutex<std::collections::HashMap<String, (usize, Arc<tokio::sync::Semaphore>)>>,
    /// Sends waiting or under way, all connections together (changed under `per_conn`'s lock).
    total: std::sync::atomic::AtomicUsize,
}

impl Default for ReplySlots {
    fn default() -> Self {
        ReplySlots {
            posts: tokio::sync::Semaphore::new(REPLY_POSTS_MAX),
            per_conn: Default::default(),
            total: Default::default(),
        }
    }
}

/// A connection's place among its reply sends; given back on drop.
struct ReplyTurn<'a> {
    slots: &'a ReplySlots,
    conn: &'a str,
    /// The connection's POSTs under way.
    posts: Arc<tokio::sync::Semaphore>,
}

impl ReplySlots {
    fn enter<'a>(&'a self, conn: &'a str) -> Option<ReplyTurn<'a>> {
        let mut m = self.per_conn.lock();
        // Past the node's bound only a connection with few sends of its own gets in: a few
        // connections holding their 256 each do not drop everyone else's replies.
        let own = m.get(conn).map_or(0, |(n, _)| *n);
        let total = self.total.load(std::sync::atomic::Ordering::Relaxed);
        if total >= REPLIES_MAX || (own >= REPLIES_ALWAYS && total >= REPLIES_SHARED) {
            return None;
        }
        let (n, posts) = m
            .entry(conn.to_owned())
            .or_insert_with(|| (0, Arc::new(tokio::sync::Semaphore::new(REPLY_POSTS_PER_CONNECTION))));
        if *n >= REPLIES_PER_CONNECTION {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(ReplyTurn {
            slots: self,
            conn,
            posts: posts.clone(),
        })
    }
}

impl Drop for ReplyTurn<'_> {
    fn drop(&mut self) {
        let mut m = self.slots.per_conn.lock();
        self.slots.total.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((n, _)) = m.get_mut(self.conn) {
            *n -= 1;
            if *n == 0 {
                m.remove(self.conn);
            }
        }
    }
}

/// Sends replies that could not go back on the inbound transport (no return-route) to the
/// connection's own endpoint, within the node's [`ReplySlots`]. Agents without one (wallets)
/// only ever use return-route.
pub async fn send_replies(shared: &Arc<Shared>, conn: &Connection, replies: &[Value]) {
    let Some(endpoint) = conn.http_endpoint() else {
        if !replies.is_empty() {
            tracing::debug!(connection = %conn.id, "no return route and no endpoint: {} replies dropped", replies.len());
        }
        return;
    };
    if replies.is_empty() {
        return;
    }
    let Some(turn) = shared.replies.enter(&conn.id) else {
        for _ in replies {
            shared.metrics.endpoint_post("dropped");
        }
        tracing::debug!(connection = %conn.id, "reply sends at their bound (this connection's {REPLIES_PER_CONNECTION}, or the node's {REPLIES_MAX}): {} replies dropped", replies.len());
        return;
    };
    // The connection's turn first, then the node's: a connection waiting for its own turn
    // holds none of the node's.
    let (Ok(_mine), Ok(_node)) = (turn.posts.acquire().await, shared.replies.posts.acquire().await) else {
        return;
    };
    for r in replies {
        match shared.mediator.pack_for_endpoint(conn, r) {
            Ok(packed) => match post_counted(shared, endpoint, packed).await {
                Ok(()) => {}
                Err(e @ PostError::Refused { .. }) => {
                    tracing::warn!(connection = %conn.id, "reply not delivered, its endpoint is refused: {e}")
                }
                Err(e) => tracing::warn!(connection = %conn.id, "reply not delivered: {e}"),
            },
            Err(e) => tracing::warn!(connection = %conn.id, "reply not packed: {e}"),
        }
    }
}

/// Drains a connection's queue to its endpoint, a batch at a time, until it is empty or the
/// endpoint fails (no answer, a 5xx, 408 or 429: what the batch then left unsent is given
/// back). Each message is acknowledged as soon as the endpoint answers it 2xx: a batch whose
/// later POSTs are slow does not leave a delivered message to be leased again. A message the
/// endpoint refuses alone (a 4xx about it) stays leased, and the drain goes on past it: it
/// does not hold the others back, and is tried again when its lease runs out (not POSTed
/// again by this drain, nor by the next forward's).
///
/// `new_only` (a forward to a connection whose endpoint refused messages lately): only
/// messages on their first delivery are POSTed; those tried before are given back unsent when
/// the drain ends, for the sweep to try on its schedule ([`Drained::Held`]), so that forwards
/// do not make the endpoint refuse them again at their pace. (Left leased, as they were, a
/// forward every few seconds kept them leased, and the sweep's drain at the end of the backoff
/// missed them.)
///
/// A message is POSTed only while its lease outlasts the POST's timeout: one whose lease would
/// run out meanwhile may be reclaimed and delivered by another node or session, so it is given
/// back and leased again instead of sent twice. (With `endpoint_timeout_ms` at or above
/// `lease_ms` no lease covers a POST: each lease then takes one message.)
pub async fn drain_to_endpoint(shared: &Arc<Shared>, conn: &str, endpoint: &str, new_only: bool) -> Drained {
    let owner = crate::protocols::lease_owner(&shared.mediator.node_id, "endpoint");
    let mut held_back = Vec::new();
    let drained = drain_leasing(shared, conn, endpoint, new_only, &owner, &mut held_back).await;
    if !held_back.is_empty() {
        if let Err(e) = shared.mediator.store.release(conn, &held_back, &owner).await {
            tracing::warn!(connection = %conn, "endpoint delivery: messages held back stay leased until their lease runs out: {e}");
        }
    }
    drained
}

/// [`drain_to_endpoint`], leasing to `owner`; the messages a `new_only` drain held back are
/// left leased in `held_back`, for the caller to give back.
async fn drain_leasing(
    shared: &Arc<Shared>,
    conn: &str,
    endpoint: &str,
    new_only: bool,
    owner: &str,
    held_back: &mut Vec<i64>,
) -> Drained {
    let store = &shared.mediator.store;
    let post_timeout_ms = i64::try_from(shared.cfg.delivery.endpoint_timeout_ms).unwrap_or(i64::MAX);
    let batch_size = if post_timeout_ms >= shared.mediator.lease_ms {
        1
    } else {
        shared.mediator.batch_size
    };
    // Refused alone, or held back (`new_only`): left leased (a lease that takes one again, its
    // last run out meanwhile, does not POST it).
    let mut rejected = std::collections::HashSet::new();
    let (mut refused_any, mut held_any) = (false, false);
    loop {
        let now = now_ms();
        let until = now.saturating_add(shared.mediator.lease_ms);
        let max_bytes = shared.mediator.delivery_max_bytes;
        let batch = match store.lease_upto(conn, batch_size, max_bytes, owner, now, until).await {
            Ok(b) if b.iter().any(|q| !rejected.contains(&q.id)) => b,
            Ok(_) if refused_any => return Drained::Refused,
            Ok(_) if held_any => return Drained::Held,
            Ok(_) => return Drained::Empty,
            Err(e) => {
                tracing::warn!(connection = %conn, "endpoint delivery: store: {e}");
                return if refused_any { Drained::Refused } else { Drained::Empty };
            }
        };
        let mut failed = Vec::new();
        let mut late = Vec::new();
        for (i, q) in batch.iter().enumerate() {
            if rejected.contains(&q.id) {
                continue;
            }
            if new_only && q.attempts > 1 {
                rejected.insert(q.id);
                held_back.push(q.id);
                held_any = true;
                continue;
            }
            if i > 0 && now_ms().saturating_add(post_timeout_ms) >= until {
                late.extend(unrefused(&batch[i..], &rejected));
                break;
            }
            if q.attempts > 1 {
                shared.metrics.redelivered.inc();
            }
            match post_counted(shared, endpoint, q.payload.clone()).await {
                Ok(()) => {
                    // At once: the rest of the batch may take its POSTs' whole timeouts.
                    if let Err(e) = store.ack(conn, &[q.id]).await {
                        tracing::warn!(connection = %conn, "delivered at the endpoint but not removed (delivered again as its lease runs out): {e}");
                    }
                    shared.metrics.delivered("endpoint", "v1", 1);
                }
                Err(e @ PostError::Refused { .. }) => {
                    tracing::warn!(connection = %conn, "endpoint delivery refused, kept queued: {e}");
                    failed.extend(unrefused(&batch[i..], &rejected));
                    break;
                }
                Err(e) if e.endpoint_wide() => {
                    tracing::info!(connection = %conn, "endpoint delivery failed, kept queued: {e}");
                    failed.extend(unrefused(&batch[i..], &rejected));
                    break;
                }
                Err(e) => {
                    tracing::info!(connection = %conn, "endpoint refused a message, kept queued: {e}");
                    rejected.insert(q.id);
                    refused_any = true;
                }
            }
        }
        if !late.is_empty() {
            // Given back unsent: the next lease takes them again (or another holder has).
            let _ = store.release(conn, &late, owner).await;
        }
        if !failed.is_empty() {
            let _ = store.release(conn, &failed, owner).await;
            return Drained::Failed;
        }
    }
}

/// The ids of `left` but those `refused` alone (left leased: see [`drain_to_endpoint`]).
fn unrefused(left: &[crate::store::QueuedMessage], refused: &std::collections::HashSet<i64>) -> Vec<i64> {
    left.iter().map(|q| q.id).filter(|id| !refused.contains(id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's bound holds however many connections ask: before, every connection with
    /// fewer than `REPLIES_ALWAYS` sends got in past it, and connections are free to make.
    #[test]
    fn reply_sends_stay_within_the_node_bound_whatever_the_connections() {
        let slots = ReplySlots::default();
        let conns: Vec<String> = (0..2 * REPLIES_MAX).map(|i| format!("c{i}")).collect();
        let mut turns = Vec::new();
        for c in &conns {
            for _ in 0..REPLIES_ALWAYS {
                if let Some(t) = slots.enter(c) {
                    turns.push(t);
                }
            }
        }
        assert_eq!(turns.len(), REPLIES_MAX);
        drop(turns);
        // One connection alone fills the shared part only; the rest stays for connections
        // with few sends of their own.
        let busy: Vec<_> = (0..REPLIES_PER_CONNECTION)
            .flat_map(|_| conns[..REPLIES_MAX / REPLIES_PER_CONNECTION].iter())
            .filter_map(|c| slots.enter(c))
            .collect();
        assert_eq!(busy.len(), REPLIES_SHARED);
        assert!(
            slots.enter(&conns[0]).is_none(),
            "a busy connection waits past the shared part"
        );
        assert!(slots.enter("quiet").is_some(), "a quiet one gets in");
    }
}
