//! Durable state of a mediator node, behind one trait: [`Store`].
//!
//! Owns: the mediator identity, connections (and their indexes by peer verkey and by thread),
//! routing keys (recipient key -> connection) and the per-connection message queue with leases,
//! dedup, limits and expiry. Two backends implement the same contract:
//! - [`sled_store::SledStore`]: embedded, one process (several in-process nodes may share one
//!   handle by cloning the `Arc`).
//! - [`postgres::PgStore`]: shared by every node of a multi-machine cluster.
//!
//! Must not touch: sockets other than the database, the cluster, actix. No other module of the
//! crate names sled or SQL; they go through [`Store`].
//!
//! One conformance suite (`conformance/`) runs the same checks on both backends, so a caller
//! can rely on the behaviour described on each method whatever the backend, and on the stack a
//! node puts over its store ([`route_cache`] over [`metered`] over sled), whose wrappers pass
//! what they do not change through [`store_pass_through!`](crate::store_pass_through).
//!
//! # Write path and group commit
//! `enqueue` returns only when its messages are durable. Both backends funnel enqueues through
//! one writer (a thread for sled, a task for PostgreSQL) that drains every request waiting in
//! its channel, writes them together and makes them durable once (one `fsync` for sled; for
//! PostgreSQL one statement, `mailroom_enqueue`, that locks, checks dedup, limits and routes,
//! inserts and commits the whole batch), then answers every caller. Concurrent callers
//! therefore share the cost of durability. A failed batch fails each of its callers (the outer
//! `Err`): none is told its message is queued.
//!
//! Measured on the 2-core development machine (shared, load average ~6 during the runs), each
//! caller enqueueing one ~40-byte message per call and waiting for durability:
//!
//! | build   | backend    | concurrent callers (connections) | enqueue msg/s | lease(100)+ack msg/s |
//! |---------|------------|----------------------------------|---------------|----------------------|
//! | release | sled       | 64 (16)                          | ~50,000       | ~78,000              |
//! | release | sled       | 256 (64)                         | ~105,000      | ~80,000              |
//! | release | PostgreSQL | 64 (16)                          | ~6,700        | ~13,000              |
//! | release | PostgreSQL | 256 (64)                         | ~14,000       | ~12,000              |
//! | debug   | sled       | 64 (8)                           | 12,000-22,000 |                      |
//! | debug   | PostgreSQL | 64 (8)                           | 4,000-8,000   |                      |
//!
//! Debug figures come from `conformance::group_commit_throughput` (printed by
//! `cargo test --lib store -- --nocapture`); release ones from a one-off build of this module
//! with the same loop plus a drain (lease 100, ack) from one task. PostgreSQL 15 on the same
//! machine, `fsync` and `synchronous_commit` on. One enqueue per call with one caller gets one
//! flush per message: group commit needs concurrency to pay off, which a mediator under load has.
//!
//! # Semantics shared by both backends
//! - A message is *pending* when it is not leased or its lease ran out (`lease_until <= now`),
//!   *leased* otherwise. Leases are a delivery hint, never a loss: an expired lease makes the
//!   message deliverable again (at-least-once).
//! - Queue limits count every queued message of the connection, pending or leased. An enqueue is
//!   refused with [`StoreError::QueueFull`] when the connection already holds `max_messages`, or
//!   when adding the message would put it over `max_bytes`. Nothing queued is ever dropped to
//!   make room.
//! - Dedup records outlive the message they point at (an acknowledged message that is sent again
//!   within the window is still a duplicate: the sender retried after we answered). A record
//!   names the latest queued copy of its `(connection, key)`. They are pruned once their window
//!   has passed by [`Store::prune_dedup`] (the node calls it every few seconds, bounded per
//!   call), and by [`Store::expire`]. A duplicate is answered even when the queue is full.
//! - A peer key (`Connection::their_verkeys`) belongs to one connection only:
//!   [`Store::put_connection`] refuses a key another connection holds
//!   ([`StoreError::KeyTaken`]), so [`Store::connection_by_their_verkey`] is unambiguous.
//! - `enqueue` does not check that the connection exists (the caller routed to it).
//!   `enqueue_routed` checks the route, and refuses a connection whose mediation is revoked
//!   ([`MediationState::Denied`]) even while it still holds the key: pickup never hands out
//!   what such a connection holds, so its sender must not be told the message is queued.
//! - Durability beyond `enqueue`: connection, key and identity writes are durable when they
//!   return. `lease`, `ack` and `release` are not flushed one by one on sled; PostgreSQL commits
//!   each `ack` and `release`, and leases every lease request waiting (of many connections) in
//!   one statement whose commit does not wait for the WAL flush. After a crash an acknowledged
//!   message may come back, and a leased one may be pending again (at-least-once, never a loss).
//! - sled keeps leases in memory only: after a restart every message is pending. PostgreSQL
//!   keeps them on the row until they run out or their owner releases them.
//! - A message with `expires_at_ms <= now` (the sender's expiry, [`NewMessage::expires_at_ms`])
//!   is *expired*: never leased, neither pending nor leased in stats and sweeps (its bytes still
//!   count towards limits) until [`Store::expire_due`] deletes it.
//! - Ids, keys and owners holding a NUL or longer than [`MAX_TEXT_LEN`] bytes are refused with
//!   [`StoreError::Invalid`] (per message in `enqueue`); lookups of them find nothing.
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod conformance;
pub mod metered;
pub mod pass_through;
pub mod postgres;
pub mod route_cache;
pub mod sled_store;
pub mod unmediated;

pub use postgres::PgStore;
pub use sled_store::SledStore;

/// Connection id: a uuid string.
pub type ConnId = String;
/// Queue message id: monotonically increasing per store (gaps allowed, never reused).
pub type MessageId = i64;

/// The mediator's own identity. Opaque to the store: the node keeps its keys in `secrets`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub created_at_ms: i64,
    pub secrets: serde_json::Value,
}

/// A change to the fields of a connection that protocols update on their own. Applied
/// atomically by [`Store::update_connection`], so two messages of one peer handled at once
/// (didexchange `complete` and `mediate-request`, back to back from Credo, possibly on two
/// nodes) cannot overwrite each other's field with a stale copy of the record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionPatch {
    pub state: Option<String>,
    pub mediation: Option<MediationState>,
    /// A DID rotation (DIDComm v2 `from_prior`), `(old, new)`: the peer's DID becomes `new`,
    /// which replaces `old` among its peer keys (or joins them). The peer-key index follows;
    /// a `new` another connection holds refuses the whole patch with
    /// [`StoreError::KeyTaken`]. Made here, not by writing back a record read before, so a
    /// connection deleted meanwhile stays deleted.
    pub rotate_did: Option<(String, String)>,
    pub updated_at_ms: i64,
}

impl Connection {
    /// The agent's own HTTP(S) endpoint, if its DID document has one (wallets have none):
    /// where what has no return route is POSTed.
    pub fn http_endpoint(&self) -> Option<&str> {
        self.their_endpoints
            .iter()
            .map(String::as_str)
            .find(|e| e.starts_with("http://") || e.starts_with("https://"))
    }
}

impl ConnectionPatch {
    pub fn apply(&self, c: &mut Connection) {
        if let Some(s) = &self.state {
            c.state = s.clone();
        }
        if let Some((old, new)) = &self.rotate_did {
            c.their_did = Some(new.clone());
            let mut keys: Vec<String> = Vec::with_capacity(c.their_verkeys.len() + 1);
            for k in c.their_verkeys.drain(..) {
                let k = if k == *old { new.clone() } else { k };
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            if !keys.contains(new) {
                keys.push(new.clone());
            }
            c.their_verkeys = keys;
        }
        // A revocation is final: a grant read before it (a mediate-request racing with the
        // operator's `POST /connections/{id}/mediation`) does not undo it. Applied under the
        // backend's lock, so it holds whichever lands first.
        if let Some(m) = self.mediation {
            if c.mediation != MediationState::Denied {
                c.mediation = m;
            }
        }
        c.updated_at_ms = c.updated_at_ms.max(self.updated_at_ms);
    }
}

/// What a handshake may do with the invitation it names (`~thread.pthid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvitationUse {
    /// Not recorded (the public multi-use invitation, or one this store never issued).
    Unknown,
    /// A recorded multi-use invitation.
    MultiUse,
    /// A single-use invitation, claimed now by this handshake (or before by the same key).
    FirstUse,
    /// A single-use invitation someone already used: refuse.
    AlreadyUsed,
}

/// Mediation state of a connection (coordinate-mediation 1.0). `Denied` (revoked by the
/// operator) is final, and a routed enqueue ([`Store::enqueue_routed`]) refuses a denied
/// connection whatever keys it still holds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum MediationState {
    #[default]
    None,
    Requested,
    Granted,
    Denied,
}

/// An agent that connected to us.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Connection {
    pub id: ConnId,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// "requested" | "responded" | "completed"
    pub state: String,
    /// "didexchange/1.1", "connections/1.0", ...
    pub protocol: String,
    pub label: Option<String>,
    /// base58: which of our keys the peer talks to.
    pub our_verkey: String,
    pub our_did: Option<String>,
    pub their_did: Option<String>,
    /// base58 recipient keys of the peer (the authcrypt sender is one of them). Indexed:
    /// [`Store::connection_by_their_verkey`].
    pub their_verkeys: Vec<String>,
    pub their_endpoints: Vec<String>,
    pub their_routing_keys: Vec<String>,
    pub mediation: MediationState,
    pub invitation_id: Option<String>,
    /// Indexed: [`Store::connection_by_thread`].
    pub thread_id: Option<String>,
    /// Room for protocol data (did doc etc.).
    pub extra: serde_json::Value,
}

/// The push service a wallet registered its device with (the protocol it used).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum PushService {
    /// push-notifications-fcm 1.0 (RFC 0734): Firebase Cloud Messaging.
    Fcm,
    /// push-notifications-apns 1.0 (RFC 0699): Apple Push Notification service.
    Apns,
}

impl PushService {
    pub fn as_str(self) -> &'static str {
        match self {
            PushService::Fcm => "fcm",
            PushService::Apns => "apns",
        }
    }
}

/// The device registration of a connection: where to wake the wallet when mail is queued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Device {
    pub service: PushService,
    /// The provider's device token (a secret of the wallet: shown redacted by the admin API).
    pub token: String,
    /// `device_platform` of push-notifications-fcm (`"android"`, `"ios"`, ...), if sent.
    pub platform: Option<String>,
    pub updated_at_ms: i64,
}

/// A connection some of whose leases ran out and were taken back
/// ([`Store::reclaim_expired_leases`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reclaimed {
    pub conn: ConnId,
    /// The fewest deliveries ([`QueuedMessage::attempts`]) among its messages taken back.
    pub attempts: u32,
}

/// The queue log of a node that keeps its queue on its own disk ([`Store::queue_log`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueLogStats {
    /// Bytes of its segments.
    pub bytes: u64,
    /// Records found damaged on the disk since the node started and skipped (each a queued
    /// message or a removal lost), in any segment (in the last one, when a whole record
    /// follows: not a torn append), or found damaged while the log runs.
    pub damaged_records: u64,
    /// Segments found damaged: cut at a damaged record no whole record followed where its
    /// length points (the records after it lost; the segment as it was kept aside,
    /// `NNNN.qlog.damaged`, when the copy could be made), or missing between two others (no
    /// copy: each missing number counts).
    pub damaged_segments: u64,
    /// Bytes free on the disk holding the store, as last read (every 200 ms).
    pub disk_free_bytes: Option<u64>,
    /// The free-disk reserve (`store.min_free_disk_mib`), bytes; 0: none.
    pub disk_reserve_bytes: u64,
    /// Whether new messages are refused ([`StoreError::Full`]): the disk's free space is
    /// under the reserve, or the node holds `store.max_queued_messages`.
    pub refusing_new_messages: bool,
}

/// What a queued event does to a wallet's push window (see [`Store::push_event`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushSlot {
    /// Push now: the window restarts at this event. The push is claimed, under the caller's
    /// [`NewClaim`], as a trailing push taken by [`Store::push_take_due`] is.
    Now,
    /// Folded into the trailing push due at `due_ms` (scheduled by this event or an earlier one).
    Trailing { due_ms: i64 },
    /// Not recorded: the wallet was pushed at or after the event's `unless_pushed_since_ms`
    /// (another node woke it for this mail already).
    PushedSince,
}

/// A push one node took (a trailing push from [`Store::push_take_due`], an immediate one from
/// [`Store::push_event`]): the node holds a claim on it until [`Store::push_done`] ends the
/// claim or its deadline passes, after which any node takes the push again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushClaim {
    pub conn: ConnId,
    /// Names this claim, and no later claim of the same wallet (by this node or another):
    /// [`Store::push_done`] ends the claim only while it is still this one.
    pub token: i64,
    /// Names the push: the token of the claim that first took it. A claim that ran out and is
    /// taken again, with no new event since, is the same push again and keeps it (the webhook's
    /// `event_id` is derived from it, so a receiver drops the repeat); a push a new event asked
    /// for is a new one.
    pub push_id: i64,
}

/// A fresh [`PushClaim::token`] (random: claims of different nodes never share one).
pub(crate) fn new_push_claim_token() -> i64 {
    rand::random()
}

/// The claim an event that pushes now takes in [`Store::push_event`], named by its caller
/// before the call: a caller that sees an error (the store may have committed all the same)
/// pushes at once and then ends the claim by its token, else the stored claim would push the
/// wallet a second time once it ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewClaim {
    pub until_ms: i64,
    /// The claim's [`PushClaim::token`].
    pub token: i64,
}

impl NewClaim {
    /// A claim until `until_ms` under a fresh token.
    pub fn until(until_ms: i64) -> NewClaim {
        NewClaim {
            until_ms,
            token: new_push_claim_token(),
        }
    }
}

/// One step of a push window, the rule both backends implement: `state` is `(last push,
/// trailing push due)`; returns the next state and, for an event folded into the trailing
/// push, when that push is due (`None`: push now). An event inside the window schedules (or
/// joins) one trailing push at the window's end; an event after it pushes now and drops a
/// trailing push not yet taken (this push is it).
pub fn push_window_step(
    state: Option<(i64, Option<i64>)>,
    now_ms: i64,
    window_ms: i64,
) -> ((i64, Option<i64>), Option<i64>) {
    match state {
        Some((last, due)) if now_ms < last + window_ms => {
            let due = due.unwrap_or(last + window_ms);
            ((last, Some(due)), Some(due))
        }
        _ => ((now_ms, None), None),
    }
}

/// A message to queue for a connection.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub connection: ConnId,
    pub recipient_key: String,
    /// The inner JWE, as received.
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
    /// Hash of the inner message; see [`EnqueueLimits::dedup_window_ms`].
    pub dedup_key: Option<[u8; 32]>,
    /// When the sender said the message stops being worth delivering (DIDComm v2
    /// `expires_time`, in ms). From then on it is never leased nor counted as deliverable, and
    /// [`Store::expire_due`] deletes it. `None`: only the TTL sweep ([`Store::expire`]) applies.
    pub expires_at_ms: Option<i64>,
    /// Queue it leased (its first lease, `attempts` 1) instead of pending: the node holding the
    /// wallet's live session gets it with the notification and writes it out with no lease of
    /// its own (see `protocols::handoff_owner`). Released, acknowledged or run out like any
    /// lease. `None`: pending.
    pub lease: Option<LeaseTo>,
}

/// A lease given with the message as it is queued ([`NewMessage::lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTo {
    pub owner: String,
    pub until_ms: i64,
}

/// Per-call limits of [`Store::enqueue`] (they come from config).
#[derive(Clone, Copy, Debug)]
pub struct EnqueueLimits {
    pub max_messages: u64,
    pub max_bytes: u64,
    /// A message whose `(connection, dedup_key)` was enqueued at most this long before its
    /// `received_at_ms` is not queued again.
    pub dedup_window_ms: i64,
}

impl EnqueueLimits {
    /// No limits, no dedup window.
    pub const UNLIMITED: EnqueueLimits = EnqueueLimits {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        dedup_window_ms: 0,
    };
}

/// Outcome of one queued message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub id: MessageId,
    /// The message was a duplicate of `id`, which was queued earlier; nothing new was queued.
    pub duplicate: bool,
}

/// A message handed out by [`Store::lease_upto`] (and [`Store::lease`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedMessage {
    pub id: MessageId,
    pub connection: ConnId,
    pub recipient_key: String,
    pub payload: Vec<u8>,
    pub received_at_ms: i64,
    /// How many times the message was leased, this lease included (> 1: a redelivery).
    pub attempts: u32,
}

/// Queue of one connection at a given time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub pending: u64,
    pub leased: u64,
    /// Payload bytes of every queued message, pending or leased.
    pub bytes: u64,
    pub oldest_received_ms: Option<i64>,
}

/// What a pickup status reports of a queue: the messages a lease could take now (pending, or
/// leased and the lease ran out; never those past the sender's expiry) and when the oldest of
/// them was received. Messages leased and not yet due are not read to tell it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingStats {
    pub count: u64,
    pub oldest_received_ms: Option<i64>,
}

impl PendingStats {
    /// These figures with one more message, received at `received_ms`.
    pub fn and(self, received_ms: i64) -> PendingStats {
        PendingStats {
            count: self.count + 1,
            oldest_received_ms: Some(self.oldest_received_ms.map_or(received_ms, |o| o.min(received_ms))),
        }
    }
}

/// Per-key result of [`Store::update_keys`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyUpdate {
    Added,
    AlreadyAdded,
    Removed,
    /// Removal of a key this connection does not hold (also when another connection holds it:
    /// a removal never tells one connection about another's keys).
    NotFound,
    /// Addition of a key another connection holds: refused.
    HeldByOther,
    /// Addition to a connection whose mediation the operator revoked: refused, checked with
    /// the revocation's own lock, so a keylist update racing with it cannot leave a key behind.
    Revoked,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or failed (I/O, pool, connection lost).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The connection's queue is at its limit; nothing was queued and nothing dropped.
    /// `pending` counts every queued message of the connection (leased ones too).
    #[error("queue full: {pending} messages, {bytes} bytes queued")]
    QueueFull { pending: u64, bytes: u64 },
    /// The connection (or other named object) does not exist.
    #[error("not found")]
    NotFound,
    /// [`Store::enqueue_routed`]: the message's recipient key no longer routes to the
    /// connection it was sent for, or that connection's mediation was revoked; nothing was
    /// queued.
    #[error("no route: the recipient key is no longer registered by that connection")]
    NoRoute,
    #[error("conflict: {0}")]
    Conflict(String),
    /// A peer key of the connection being written is held by another connection; nothing
    /// was written.
    #[error("key {0} belongs to another connection")]
    KeyTaken(String),
    /// Input the store cannot hold: a NUL character, or more than [`MAX_TEXT_LEN`] bytes, in an
    /// id or key. Refused before anything is written; lookups of such input find nothing.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Stored data could not be decoded.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The store is shutting down (its writer stopped).
    #[error("store closed")]
    Closed,
    /// New messages are refused: the disk holding the store has less free space than its
    /// reserve (sled, `store.min_free_disk_mib`), or the node holds as many queued messages as
    /// it may (sled, `store.max_queued_messages`). Pickups and acknowledgements go on, so the
    /// queue can empty. Nothing was written.
    #[error("store full: {0}")]
    Full(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Longest id, key or owner name the store accepts (sled keeps their lengths in 16 bits).
pub const MAX_TEXT_LEN: usize = u16::MAX as usize;

/// Whether `s` can be stored as an id or key by every backend (PostgreSQL text cannot hold NUL;
/// a NUL from the network must be a refusal of that input, never a failed batch of others).
pub(crate) fn storable(s: &str) -> bool {
    s.len() <= MAX_TEXT_LEN && !s.as_bytes().contains(&0)
}

pub(crate) fn check_storable(what: &str, s: &str) -> StoreResult<()> {
    if storable(s) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} contains a NUL character or is longer than {MAX_TEXT_LEN} bytes"
        )))
    }
}

/// Checks the text of a message before it is queued: its connection, its recipient key and the
/// owner of the lease it is queued under. A message that fails is refused alone (`Invalid`);
/// it must not reach a batch, where (on PostgreSQL) a NUL fails every message of it.
pub(crate) fn check_message(m: &NewMessage) -> StoreResult<()> {
    check_storable("connection id", &m.connection)?;
    check_storable("recipient key", &m.recipient_key)?;
    match &m.lease {
        Some(l) => check_storable("lease owner", &l.owner),
        None => Ok(()),
    }
}

/// Checks the ids and indexed keys of a connection before it is written.
pub(crate) fn check_connection(c: &Connection) -> StoreResult<()> {
    check_storable("connection id", &c.id)?;
    if let Some(t) = &c.thread_id {
        check_storable("thread id", t)?;
    }
    for k in &c.their_verkeys {
        check_storable("their verkey", k)?;
    }
    Ok(())
}

/// Durable state of a mediator. Every method is safe to call concurrently, from many tasks and
/// (for PostgreSQL) from many nodes. No method blocks the async runtime.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// "sled" | "postgres"
    fn backend(&self) -> &'static str;

    /// Ok when the backend answers (PostgreSQL: a round trip, and the node's clock within
    /// [`postgres::MAX_CLOCK_SKEW`] of the server's: leases are timed by the nodes' clocks; sled: the
    /// writer is alive).
    async fn health(&self) -> StoreResult<()>;

    /// Returns the stored identity, storing `candidate` first if there is none. Race-free: when
    /// several callers (or nodes) race, the first writer wins and all get the same identity.
    async fn identity_get_or_create(&self, candidate: Identity) -> StoreResult<Identity>;

    /// Inserts or replaces a connection and maintains its indexes (their verkeys, thread id).
    /// Refused with [`StoreError::KeyTaken`] (nothing written) when one of `their_verkeys` is
    /// held by another connection: a peer key names one connection, atomically across every
    /// node sharing the store. A stored connection whose mediation is `Denied` stays denied
    /// whatever `c` says (a revocation is final, also against a record read before it).
    async fn put_connection(&self, c: &Connection) -> StoreResult<()>;
    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>>;
    /// Records an invitation the admin API issued.
    async fn put_invitation(&self, id: &str, single_use: bool, created_at_ms: i64) -> StoreResult<()>;
    /// Claims an invitation for a handshake by `claimant` (the key the handshake proved); a
    /// single-use one is claimed once, atomically across every node sharing the store, and
    /// stays its first claimant's: the same claimant claiming again gets
    /// [`InvitationUse::FirstUse`] (the retry of a handshake whose connection was not written,
    /// a store failure after the claim), anyone else [`InvitationUse::AlreadyUsed`].
    async fn use_invitation(&self, id: &str, claimant: &str) -> StoreResult<InvitationUse>;
    /// Applies `patch` to the stored connection atomically; `None` when there is none
    /// (nothing written: a patch never creates a connection). Its peer keys changed by the
    /// patch move in the peer-key index as [`Store::put_connection`] moves them, and the same
    /// [`StoreError::KeyTaken`] refuses it (nothing written).
    async fn update_connection(&self, id: &str, patch: &ConnectionPatch) -> StoreResult<Option<Connection>>;
    /// The connection one of whose `their_verkeys` is `verkey` (at most one: see
    /// [`Store::put_connection`]).
    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>>;
    /// The connection whose `thread_id` is `thid`. Thread ids come from the peer and may
    /// repeat: of several connections naming it, the one most recently written (by
    /// [`Store::put_connection`], [`Store::update_connection`] or [`Store::revoke_mediation`]),
    /// on every backend.
    async fn connection_by_thread(&self, thid: &str) -> StoreResult<Option<Connection>>;
    /// Connections ordered by id, strictly after `after`, at most `limit` (pagination).
    async fn list_connections(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Connection>>;

    /// Adds then removes routing keys of `conn`; atomic per key. Results in input order: every
    /// `add` first, then every `remove`. `Err(NotFound)` if the connection does not exist.
    async fn update_keys(&self, conn: &str, add: &[String], remove: &[String])
        -> StoreResult<Vec<(String, KeyUpdate)>>;
    /// Routing keys of `conn`, sorted.
    async fn keys_of(&self, conn: &str) -> StoreResult<Vec<String>>;
    /// The connection that registered `recipient_key`. Hot path.
    async fn route(&self, recipient_key: &str) -> StoreResult<Option<ConnId>>;
    /// Routing keys that start with `short` followed by `:` (`short:...`; not `short` itself,
    /// nor `shortx:...`), each with the connection holding it, in key order, at most `limit`.
    /// A key held by a connection whose mediation is revoked ([`MediationState::Denied`]) is
    /// left out: a routed enqueue refuses it anyway. The caller finds did:peer:4 long forms an
    /// earlier version stored from their short form with it, and checks each key it gets (any
    /// string was stored as given then, so a key of that shape proves nothing). An index
    /// range scan, not a scan of every key.
    async fn route_long_forms(&self, short: &str, limit: usize) -> StoreResult<Vec<(String, ConnId)>>;

    /// Queues messages, each for its own connection, FIFO by arrival. One outcome per message,
    /// in input order: `Ok(Enqueued)`, `Err(QueueFull)`, or (sled, the node-wide bound)
    /// `Err(Full)`. Every `Ok` is durable when this returns. The outer `Err` means nothing is
    /// known to be durable.
    async fn enqueue(&self, msgs: Vec<NewMessage>, limits: &EnqueueLimits) -> StoreResult<Vec<StoreResult<Enqueued>>>;
    /// As [`Store::enqueue`], for messages whose connection came from [`Store::route`] of
    /// their `recipient_key` (possibly a cached, stale answer): each is queued only if that key
    /// is still a routing key of its connection, and that connection's mediation is not
    /// revoked ([`MediationState::Denied`]), when its batch is decided; else its outcome is
    /// `Err(StoreError::NoRoute)` and nothing of it is written. A key removed (or moved to
    /// another connection), or a connection denied, before this call started is never queued
    /// for. The route is checked before dedup and limits.
    async fn enqueue_routed(
        &self,
        msgs: Vec<NewMessage>,
        limits: &EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<Enqueued>>>;

    /// Leases up to `max` pending messages of `conn`, oldest first, to `owner` until `until_ms`.
    /// Concurrent leasers (tasks or nodes) never get the same message. Bounded by count only:
    /// [`Store::lease_upto`] with no byte budget.
    async fn lease(
        &self,
        conn: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_upto(conn, max, usize::MAX, owner, now_ms, until_ms).await
    }
    /// As [`Store::lease`], stopping before the first message whose payload would take the
    /// payload bytes leased past `max_bytes`, but always leasing one message when any is
    /// pending (a message larger than `max_bytes` goes alone). A delivery holds what it leases
    /// in memory, and copies it as it packs it: counted in messages only, one delivery-request
    /// could load a whole queue (limits.max_queue_bytes) of large payloads. The messages after
    /// the stop are not leased, not read and their attempts not counted; being oldest first,
    /// the stop never skips a message to take a smaller one behind it.
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>>;
    /// Deletes messages of `conn` (leased or not); ids of other connections are ignored.
    /// Returns how many were deleted.
    async fn ack(&self, conn: &str, ids: &[MessageId]) -> StoreResult<u64> {
        Ok(self.ack_leased(conn, ids).await?.len() as u64)
    }
    /// As [`Store::ack`], returning the lease deadline (`lease_until_ms`, 0 if never leased)
    /// of each deleted message: the node derives the acknowledgement lag from it.
    async fn ack_leased(&self, conn: &str, ids: &[MessageId]) -> StoreResult<Vec<i64>>;
    /// Returns messages of `conn` leased by `owner` to pending; a lease another owner holds
    /// (the message was leased again after this owner's ran out) is left alone. Returns how
    /// many were released.
    async fn release(&self, conn: &str, ids: &[MessageId], owner: &str) -> StoreResult<u64>;
    /// Returns every message leased by `owner` to pending (session or node shutdown).
    async fn release_owner(&self, owner: &str) -> StoreResult<u64>;
    /// Returns to pending at most `max` messages whose lease ran out by `now_ms` (delivered and
    /// never acknowledged: over HTTP, by a session or node that could not give them back) and
    /// whose sender's expiry has not passed, and names their connections, each once, with the
    /// fewest deliveries among its messages taken back. Concurrent callers (tasks or nodes) never
    /// reclaim the same message. The node wakes or pushes those wallets: a lease that runs out
    /// is otherwise seen only by the next lease of its queue.
    async fn reclaim_expired_leases(&self, now_ms: i64, max: usize) -> StoreResult<Vec<Reclaimed>>;
    /// As [`Store::release_owner`] for every owner whose name starts with `prefix` (a node's
    /// owners are `<node>/...`: a failed node's leases, or this node's before it restarted),
    /// of the leases that run out at or before `until_at_most_ms` (`i64::MAX`: all of them).
    /// Owner names repeat across a node's runs, so a lease taken since it restarted must be
    /// told apart by its deadline: it runs out later than any lease taken before, and is kept. An empty prefix releases nothing. Returns the connections
    /// whose messages it released, each once (their wallets are woken or pushed: nobody else
    /// will).
    async fn release_owners_under(&self, prefix: &str, until_at_most_ms: i64) -> StoreResult<Vec<ConnId>>;
    async fn queue_stats(&self, conn: &str, now_ms: i64) -> StoreResult<QueueStats>;
    /// Messages queued in the whole store, pending or leased.
    async fn total_queued(&self) -> StoreResult<u64>;
    /// Connections that have messages deliverable at `now_ms`, in id order, strictly after
    /// `after`, at most `limit`: a cursor, so repeated calls reach every connection however
    /// many there are (endpoint retries page through them).
    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>>;
    /// Those of `conns` that have messages deliverable at `now_ms` (the sweep asks about the
    /// connections whose sessions this node holds). Order unspecified.
    async fn pending_among(&self, conns: &[ConnId], now_ms: i64) -> StoreResult<Vec<ConnId>>;
    /// Deletes at most `max` dedup records made before `before_ms` (their window has passed).
    /// Returns how many were deleted; call again while it returns `max`.
    async fn prune_dedup(&self, before_ms: i64, max: usize) -> StoreResult<u64>;
    /// Dedup records held (the `mailroom_dedup_records` gauge; PostgreSQL: its estimate past
    /// 100,000).
    async fn dedup_records(&self) -> StoreResult<u64>;
    /// The queue on this node's own disk: the sled store's queue log (the
    /// `mailroom_queue_log_*` gauges, `/status`); `None` where the queue is not on this node
    /// (PostgreSQL).
    async fn queue_log(&self) -> StoreResult<Option<QueueLogStats>>;
    /// Marks the store in use by a running node, durably. `Some(true)`: the run before ended
    /// without [`Store::end_run`] (a crash, `kill -9`, power lost): what its sessions were
    /// delivering was never acknowledged, nor its wallets woken. `None`: not tracked, as the
    /// store's leases outlive the process (PostgreSQL: [`Store::release_owners_under`]
    /// finds what a node had in flight). Several nodes of one process on one store count as
    /// one run. A node calls [`Store::begin_node_run`], which names it: PostgreSQL keeps a
    /// mark per node there, and answers `None` here.
    async fn begin_run(&self) -> StoreResult<Option<bool>>;
    /// The running node stops cleanly (called last, once it gave back what it delivered).
    async fn end_run(&self) -> StoreResult<()>;
    /// [`Store::begin_run`] for the node `node_id`, the call a node makes. By default
    /// [`Store::begin_run`] (sled: one mark for the store, every node of the process one run).
    /// PostgreSQL marks the run of `node_id`, durably, apart from every other node's (several
    /// nodes, of one process or many, share one database): `Some(true)` when the last run of
    /// `node_id` never ended by [`Store::end_node_run`] (a crash, `kill -9`, a host lost): push
    /// events its forwards left in its memory were never written, and the wallets owed a
    /// wake-up ([`Store::owed_wakes`]) are woken; `Some(false)` otherwise.
    async fn begin_node_run(&self, _node_id: &str) -> StoreResult<Option<bool>> {
        self.begin_run().await
    }
    /// [`Store::end_run`] for the node `node_id`: clears the mark [`Store::begin_node_run`]
    /// set. By default [`Store::end_run`].
    async fn end_node_run(&self, _node_id: &str) -> StoreResult<()> {
        self.end_run().await
    }
    /// The wallets owed a wake-up, a page of them: connections with a device registration
    /// whose newest message deliverable at `now_ms` (pending, or its lease run out; not past
    /// its sender's expiry) was received after their push window's last push (or that were
    /// never pushed, or whose window was forgotten), with no trailing push due and no push
    /// claimed in their window (a claim or a due push is any node's to send), and mediation
    /// not revoked. Such a wallet's push event was in a node's memory only (its push channel,
    /// waiting for its turn, its device lookup) when that node died: nobody else would wake it.
    ///
    /// A cursor over the registrations in connection id order: at most `limit` of them are
    /// read after `after` (one bounded statement), and [`OwedPage::next`] says where the next
    /// page starts (`None`: the last page). `Ok(None)`: the store does not track what is owed
    /// (the default; sled, whose node wakes every wallet with mail pending after a run that
    /// did not stop, as its `begin_run` asks, and is not shared by nodes that take over a peer).
    async fn owed_wakes(&self, _now_ms: i64, _after: Option<&str>, _limit: usize) -> StoreResult<Option<OwedPage>> {
        Ok(None)
    }
    /// Deletes messages received before `received_before_ms` (leased or not) and dedup records
    /// as old. Returns how many messages were deleted.
    async fn expire(&self, received_before_ms: i64) -> StoreResult<u64>;
    /// Deletes at most `max` messages whose sender's expiry (`expires_at_ms`) is at or before
    /// `now_ms`, leased or not, earliest expiry first. Returns how many; call again while it
    /// returns `max`. Dedup records stay (a retried forward is still a duplicate).
    async fn expire_due(&self, now_ms: i64, max: usize) -> StoreResult<u64>;
    /// Makes every write so far durable (acks and leases are not flushed one by one).
    /// When the oldest queued message (leased or not) was received: the queue-age gauge.
    async fn oldest_received_ms(&self) -> StoreResult<Option<i64>>;
    async fn flush(&self) -> StoreResult<()>;

    // ---- push notifications (issue 7) ----

    /// The device registration of `conn`, if any.
    async fn device_of(&self, conn: &str) -> StoreResult<Option<Device>>;
    /// Registers (`Some`) or unregisters (`None`) the device of `conn`, replacing any earlier
    /// registration; durable when it returns. `Err(NotFound)` when the connection does not
    /// exist (a registration never outlives its connection: removing the connection removes it).
    async fn set_device(&self, conn: &str, device: Option<&Device>) -> StoreResult<()>;
    /// Removes the registration of `conn` only while its token is still `token` (a provider
    /// called that token dead; a newer registration of the wallet is kept). Returns whether
    /// it removed one.
    async fn forget_device_token(&self, conn: &str, token: &str) -> StoreResult<bool>;
    /// Records a queued event in the push window of `conn`, shared by every node of the
    /// store, by [`push_window_step`]: one caller cluster-wide gets `Now` per window; the
    /// others' events are folded into one trailing push. Atomic across nodes. `Now` comes with
    /// the claim `claim` on the push (replacing any claim the window held): ended
    /// by [`Store::push_done`] once the push is sent, else taken again by
    /// [`Store::push_take_due`] once it runs out, so a node that dies before its push is sent
    /// leaves it to the others. With `unless_pushed_since_ms`, an event of a wallet whose
    /// window last pushed at or after it changes nothing and is [`PushSlot::PushedSince`]
    /// (in the same atomic step).
    async fn push_event(
        &self,
        conn: &str,
        now_ms: i64,
        window_ms: i64,
        claim: NewClaim,
        unless_pushed_since_ms: Option<i64>,
    ) -> StoreResult<PushSlot>;
    /// Claims trailing pushes due at `now_ms`, each for exactly one caller across nodes, at
    /// most `limit`, earliest first. A push is due when its window scheduled it at or before
    /// `now_ms`, or when an earlier claim on it ran out (its deadline is at or before `now_ms`)
    /// without [`Store::push_done`]: a node that dies, stops or fails before its push is sent
    /// leaves it to the others. The claim lasts until `claim_until_ms`; it is kept apart from
    /// the window, so events during the push schedule the next trailing push as usual (and
    /// that push, once due, is claimed again, replacing this claim). The window of each push
    /// taken restarts at `now_ms` and drops a trailing push it had scheduled (the push taken
    /// now is that one). Forgets windows with nothing scheduled and no claim whose last push is
    /// before `idle_before_ms`.
    async fn push_take_due(
        &self,
        now_ms: i64,
        claim_until_ms: i64,
        idle_before_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<PushClaim>>;
    /// Ends the claim `token` on the push of `conn` (the push was sent, or given up for
    /// good), only while it is still that claim: a later claim, by this node or another,
    /// stays. Returns whether it ended one.
    ///
    /// With `reopen_ms` (the window's length): the push sent nothing (the wallet was back, or
    /// had nothing queued), so it does not count as one. The window's last push moves back by
    /// `reopen_ms` (the next event pushes at once, as if this push had not been taken), and a
    /// trailing push scheduled since is due at once. Without it, a wallet that came back and
    /// went again waited up to a window for the wake-up of its next message. (`reopen_ms` is
    /// the caller's window length: during a rolling change of `min_interval_secs` a window
    /// moves back by the new length.)
    async fn push_done(&self, conn: &str, token: i64, reopen_ms: Option<i64>) -> StoreResult<bool>;

    // ---- replay protection ----

    /// Records the sight of one authenticated message, named by `digest` (of its sender and
    /// its id: [`crate::protocols::replay`]), to be kept until `until_ms`. `true` the first
    /// time; `false` while a record of it is held that has not run out by `now_ms`: the
    /// message was received before, and this is a replay (or a retry of one that was
    /// handled). Atomic across callers and every node sharing the store: of concurrent calls
    /// with one digest, one gets `true`. A record that ran out is replaced (`true`); a record
    /// is never shortened by a later sight.
    async fn first_sight(&self, digest: &[u8; 32], now_ms: i64, until_ms: i64) -> StoreResult<bool>;
    /// Forgets the record of `digest` made until `until_ms`, only while it is still that
    /// record: its message failed for a reason its sender may retry (the store was
    /// unavailable), so the retry is handled, not refused as a replay.
    async fn forget_sight(&self, digest: &[u8; 32], until_ms: i64) -> StoreResult<()>;
    /// Deletes at most `max` records that ran out by `now_ms`, earliest first. Returns how
    /// many; call again while it returns `max`.
    async fn prune_sights(&self, now_ms: i64, max: usize) -> StoreResult<u64>;

    // ---- pickup filters (pickup 2.0 `recipient_key`, pickup 3.0 `recipient_did`) ----

    /// As [`Store::lease`], only messages of `conn` queued for `recipient_key`: bounded by
    /// count only, [`Store::lease_for_key_upto`] with no byte budget.
    async fn lease_for_key(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        self.lease_for_key_upto(conn, recipient_key, max, usize::MAX, owner, now_ms, until_ms)
            .await
    }
    /// As [`Store::lease_upto`], only messages of `conn` queued for `recipient_key`: the
    /// budget counts those alone, and messages for other keys are never touched.
    #[allow(clippy::too_many_arguments)]
    async fn lease_for_key_upto(
        &self,
        conn: &str,
        recipient_key: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>>;
    /// The pickup status of `conn` (only of its messages queued for `recipient_key`, if given)
    /// at `now_ms`. Every pickup acknowledgement is answered with one, so it costs what a
    /// lease costs: the messages it counts, never those leased and not due.
    async fn pending_stats(&self, conn: &str, recipient_key: Option<&str>, now_ms: i64) -> StoreResult<PendingStats>;
    // ---- operator actions (issue 11) ----

    /// Removes connection `id` and everything that names it: its peer keys and thread index,
    /// its routing keys (a later forward to one finds no route), its queued messages (pending
    /// and leased), its dedup records, its device registration and push window. Atomic with
    /// respect to enqueues and key updates of the connection on every node sharing the store.
    /// Idempotent: removing a connection that does not exist (any more) returns zero counts.
    async fn delete_connection(&self, id: &str) -> StoreResult<Removed>;
    /// [`Store::delete_connection`] of `id` only while it has no mediation
    /// ([`MediationState::None`]: never granted, never revoked) and was made before
    /// `created_before_ms`, checked under the same locks as the removal: a mediation granted
    /// on any node meanwhile keeps it. Whether it was removed. The collection of connections
    /// nobody uses (`limits.unmediated_connection_ttl_secs`).
    async fn delete_unmediated(&self, id: &str, created_before_ms: i64) -> StoreResult<bool>;
    /// Revokes the mediation of connection `id` (the operator's action): its state becomes
    /// [`MediationState::Denied`] (final: see [`ConnectionPatch::apply`]) and every routing key
    /// it holds is removed, in one step that is atomic with respect to enqueues and key updates
    /// of the connection on every node sharing the store. A routed enqueue decided before it
    /// is queued (and answered) before it; one decided after it finds no route. Returns the
    /// keys removed (sorted; none when it was revoked already), `None` when there is no such
    /// connection. Idempotent; revoking again removes any key a connection denied some other
    /// way still holds.
    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>>;
    /// Deletes every queued message of `conn` (pending or leased); the connection, its keys and
    /// its dedup records stay (a retried forward is still a duplicate). Returns how many.
    async fn drop_queue(&self, conn: &str) -> StoreResult<u64>;
    /// The `limit` connections with the most queued messages (most first, ties by id) and the
    /// `limit` whose oldest queued message is oldest (oldest first): the status page's lists.
    async fn top_queues(&self, limit: usize) -> StoreResult<TopQueues>;
}

/// What [`Store::delete_connection`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Removed {
    pub connection: bool,
    pub peer_keys: u64,
    pub routing_keys: u64,
    /// Queued messages, pending and leased.
    pub messages: u64,
    pub dedup_records: u64,
    pub device: bool,
}

/// One connection's queue in [`TopQueues`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueueSummary {
    pub connection: ConnId,
    /// Queued messages, pending and leased.
    pub depth: u64,
    pub oldest_received_ms: Option<i64>,
}

/// A wallet owed a wake-up ([`Store::owed_wakes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owed {
    pub connection: ConnId,
    /// When its newest deliverable message was received: it is pushed unless pushed since.
    pub newest_received_ms: i64,
}

/// A page of [`Store::owed_wakes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwedPage {
    /// The wallets owed a wake-up among the registrations read, in connection id order.
    pub owed: Vec<Owed>,
    /// The last registration read, where the next page starts; `None` once every one was.
    pub next: Option<ConnId>,
}

/// See [`Store::top_queues`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TopQueues {
    pub deepest: Vec<QueueSummary>,
    pub oldest: Vec<QueueSummary>,
}

/// Opens (or creates) the sled store at `path`. Opening a path already open in this process
/// returns the same store (in-process nodes share it).
pub async fn open_sled(path: &std::path::Path) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(SledStore::open_shared(path).await?)
}

/// As [`open_sled`] with sled's page cache bounded to `cache_bytes` (`store.sled_cache_mib`).
pub async fn open_sled_with_cache(path: &std::path::Path, cache_bytes: u64) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(SledStore::open_shared_with_cache(path, cache_bytes).await?)
}

/// As [`open_sled_with_cache`], refusing new messages while the disk has less than
/// `min_free_bytes` free (`store.min_free_disk_mib`; 0: no reserve) or while the node holds
/// `max_queued_messages` queued (`store.max_queued_messages`).
pub async fn open_sled_with(
    path: &std::path::Path,
    cache_bytes: u64,
    min_free_bytes: u64,
    max_queued_messages: u64,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(SledStore::open_shared_with(path, cache_bytes, min_free_bytes, max_queued_messages).await?)
}

/// Connects to PostgreSQL, applies migrations (idempotent, safe when nodes start together).
pub async fn open_postgres(url: &str, pool_size: usize) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(PgStore::open(url, pool_size).await?))
}

/// As [`open_postgres`], every call waiting at most `statement_timeout` for PostgreSQL
/// (`store.statement_timeout_ms`; see [`PgStore::open_with`]).
pub async fn open_postgres_with(
    url: &str,
    pool_size: usize,
    statement_timeout: std::time::Duration,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    Ok(std::sync::Arc::new(
        PgStore::open_with(url, pool_size, statement_timeout).await?,
    ))
}
