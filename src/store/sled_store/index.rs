//! The in-memory queue index: per connection, message id -> size, time, lease; the dedup
//! entries and their pruning order; leases by owner; sender expiries.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use super::NEVER;
use crate::store::{ConnId, MessageId};

/// How many entries of the pruning order [`Queues::dedup_due`] reads per entry it is asked for,
/// at most, and at least [`DEDUP_DUE_WALK_MIN`] (the rest of a walk is skipped entries, popped
/// by the same prune).
pub(super) const DEDUP_DUE_WALK: usize = 4;
pub(super) const DEDUP_DUE_WALK_MIN: usize = 1024;
/// How far (ms) a dedup record may be older than the one made before it with the pruning
/// order left as it is ([`Queues::push_dedup`]): forwards of one batch, or of two writers,
/// taken with the same clock a moment apart. Their pruning waits at most this long.
pub(super) const DEDUP_ORDER_SLACK_MS: i64 = 1_000;
/// How often a prune sorts the pruning order at most, while a step of the clock keeps it out
/// of order ([`Queues::sort_dedup_if_stepped`]).
pub(super) const DEDUP_RESORT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// A lease owner's name, shared by the messages it leased and [`Queues::by_owner`]: one
/// pointer in each message's [`Meta`] (an `Arc<str>` is two), which keeps `Meta` at 48 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Owner(Arc<Box<str>>);

impl Owner {
    pub(super) fn new(name: &str) -> Owner {
        Owner(Arc::new(name.into()))
    }
}

impl std::ops::Deref for Owner {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Owner {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Per-message lease state, in memory only: one per queued message (48 bytes).
#[derive(Clone, Debug)]
pub(super) struct Meta {
    pub(super) size: u64,
    pub(super) received_at_ms: i64,
    /// 0: never leased or released. Pending when `<= now`.
    pub(super) lease_until_ms: i64,
    pub(super) owner: Option<Owner>,
    pub(super) attempts: u32,
    /// The sender's expiry ([`NEVER`] when none): expired, hence never delivered, when `<= now`.
    pub(super) expires_at_ms: i64,
    /// The message record holds a dedup key (see `keep_dedup`).
    pub(super) dedup: bool,
    /// [`key_tag`] of the message's recipient key: a pickup filtered by recipient key reads
    /// from disk only the heads whose tag matches (one in 65,536 of the others), where it read
    /// every pending message's head for each status or delivery request. In the padding
    /// `Meta` had: it stays 48 bytes.
    pub(super) key_tag: u16,
}

// One per queued message: its size is the index's memory per message.
const _: () = assert!(std::mem::size_of::<Meta>() == 48);

/// A 16-bit tag of a recipient key ([`Meta::key_tag`]), keyed once per process (the index is
/// built again from disk at every open, so no tag outlives the process): a sender cannot pick
/// keys whose tags collide with another's.
pub(super) fn key_tag(key: &str) -> u16 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(key) as u16
}

impl Meta {
    pub(super) fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }
    /// Deliverable now: not leased and not expired.
    pub(super) fn pending(&self, now_ms: i64) -> bool {
        self.lease_until_ms <= now_ms && !self.expired(now_ms)
    }
    pub(super) fn leased(&self, now_ms: i64) -> bool {
        self.lease_until_ms > now_ms && !self.expired(now_ms)
    }
}

/// What one lease may still take ([`Store::lease_upto`](crate::store::Store::lease_upto)): at
/// most `max` messages whose payloads sum to at most `max_bytes`, but always a first one (a
/// message larger than the budget goes alone). Sizes come from [`Meta::size`], so a lease
/// decides without reading a payload it will not hand out.
#[derive(Clone, Copy, Debug)]
pub(super) struct LeaseBudget {
    messages_left: usize,
    max_bytes: u64,
    bytes: u64,
    taken: bool,
}

impl LeaseBudget {
    pub(super) fn new(max: usize, max_bytes: usize) -> LeaseBudget {
        LeaseBudget {
            messages_left: max,
            max_bytes: u64::try_from(max_bytes).unwrap_or(u64::MAX),
            bytes: 0,
            taken: false,
        }
    }

    /// No message more fits, whatever its size.
    pub(super) fn spent(&self) -> bool {
        self.messages_left == 0
    }

    /// Whether a message of `size` payload bytes fits next. A lease stops at the first that
    /// does not (oldest first: it never skips one to take a smaller one behind it).
    pub(super) fn admits(&self, size: u64) -> bool {
        !self.spent() && (!self.taken || self.bytes.saturating_add(size) <= self.max_bytes)
    }

    /// Counts a message of `size` bytes taken (after [`LeaseBudget::admits`] said it fits).
    pub(super) fn take(&mut self, size: u64) {
        self.messages_left = self.messages_left.saturating_sub(1);
        self.bytes = self.bytes.saturating_add(size);
        self.taken = true;
    }
}

#[derive(Default, Debug)]
pub(super) struct ConnQueue {
    pub(super) msgs: BTreeMap<MessageId, Meta>,
    pub(super) bytes: u64,
    /// The highest (id, received_at_ms) a message taken in order had (kept when it leaves).
    /// The messages in order (those of `msgs` not in `late`) were received in id order, so the
    /// first of them is their oldest ([`ConnQueue::oldest_received_ms`]).
    in_order_to: Option<(MessageId, i64)>,
    /// (received_at_ms, id) of the queued messages not taken in order: received before one
    /// with a lower id (concurrent forwards, retries, hand-backs reach the writer out of
    /// receive order). Few (one clock for the whole store; a clock stepped back makes those
    /// received until it catches up late): an empty set allocates nothing.
    late: BTreeSet<(i64, MessageId)>,
}

/// Files message `id` received at `received_ms` in its queue's `in_order_to` and `late`: in
/// order when its id and time are at least those of every message taken in order before it,
/// else late.
fn file(
    in_order_to: &mut Option<(MessageId, i64)>,
    late: &mut BTreeSet<(i64, MessageId)>,
    id: MessageId,
    received_ms: i64,
) {
    match *in_order_to {
        Some((last_id, last_ms)) if id <= last_id || received_ms < last_ms => {
            late.insert((received_ms, id));
        }
        _ => *in_order_to = Some((id, received_ms)),
    }
}

impl ConnQueue {
    /// Files every message of the queue again, in id order: at open, the queue log gives them
    /// in the order it holds them, and compaction copies the oldest forward (filed in that
    /// order, a backlog copied forward would all be late).
    fn file_in_id_order(&mut self) {
        let ConnQueue {
            msgs,
            in_order_to,
            late,
            ..
        } = self;
        late.clear();
        *in_order_to = None;
        for (id, m) in msgs.iter() {
            file(in_order_to, late, *id, m.received_at_ms);
        }
    }

    /// Messages not taken in order (tests).
    #[cfg(test)]
    pub(super) fn late_len(&self) -> usize {
        self.late.len()
    }

    /// When the oldest queued message (leased or not) was received, `None` when there is none,
    /// without reading the whole queue (the queue-age gauge and the status page read it for
    /// every queue). Ids follow the order messages reach the writer, not receive order, so the
    /// first id is not always the oldest: the oldest is the first message's time or the oldest
    /// late one's. (Ids grow as messages are filed, so every message in order after the first
    /// was received no earlier than it, or than any late one filed before it.)
    pub(super) fn oldest_received_ms(&self) -> Option<i64> {
        let first = self.msgs.first_key_value().map(|(_, m)| m.received_at_ms);
        let late = self.late.first().map(|(at, _)| *at);
        match (first, late) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One connection's dedup entries: dedup key -> (id, received_at_ms).
pub(super) type DedupEntries = HashMap<[u8; 32], (MessageId, i64)>;

#[derive(Default, Debug)]
pub(super) struct Queues {
    /// Queues with messages, in id order: a page of
    /// [`Store::connections_with_pending`](crate::store::Store::connections_with_pending) is a
    /// range read from its cursor (a hash map made every page a scan and a sort of every
    /// queue: paging through them all cost their number squared).
    pub(super) by_conn: BTreeMap<ConnId, ConnQueue>,
    pub(super) total: u64,
    /// conn -> dedup key -> (id, received_at_ms). The connection's name is shared with its
    /// `dedup_order` entries (one per forward in the window: a copy each cost ~60 bytes).
    pub(super) dedup: HashMap<Arc<str>, DedupEntries>,
    /// Dedup records in the order they were made, for [`Store::prune_dedup`]. An entry whose
    /// record was replaced (a later copy) or removed since is skipped when it is reached.
    pub(super) dedup_order: VecDeque<(i64, Arc<str>, [u8; 32])>,
    /// An entry was pushed more than [`DEDUP_ORDER_SLACK_MS`] older than the one before it
    /// (the wall clock was stepped back, or had been ahead): a prune sorts the order first
    /// ([`Queues::sort_dedup_if_stepped`]).
    pub(super) dedup_unsorted: bool,
    /// When a prune last sorted the pruning order ([`Queues::sort_dedup_if_stepped`]).
    pub(super) dedup_sorted_at: Option<std::time::Instant>,
    pub(super) dedup_count: u64,
    /// The latest cutoff of [`Store::prune_dedup`] (persisted as `DEDUP_PRUNED_BEFORE_KEY`).
    pub(super) dedup_pruned_before: i64,
    /// The connection whose dedup entries a removal of its queue is dropping
    /// (`Inner::remove_queue`, one at a time under the batch lock): set before that removal
    /// is appended to the queue log, cleared when the index drops them. No record of them is
    /// held meanwhile ([`Queues::holds_dedup`]).
    pub(super) dedup_dropping: Option<ConnId>,
    /// owner -> connections where it leased messages (a superset: pruned by `expire` and
    /// `release_owner`), so `release_owner` scans only those queues.
    pub(super) by_owner: HashMap<Owner, std::collections::HashSet<ConnId>>,
    /// Messages with a sender's expiry, by (expiry, id) -> connection, for
    /// [`Store::expire_due`]. Kept exact: every removal of such a message removes its entry.
    pub(super) expiring: BTreeMap<(i64, MessageId), ConnId>,
}

impl Queues {
    /// Returns every message leased by `owner` to pending; how many.
    pub(super) fn release_owner(&mut self, owner: &str) -> u64 {
        let mut n = 0;
        self.release_owner_in(owner, i64::MAX, |_, released| n += released);
        n
    }

    /// As [`Queues::release_owner`], telling `released` each queue and how many it released
    /// there.
    /// Only leases that run out at or before `until_at_most_ms` go back; the owner keeps the
    /// others (and its entry in [`Queues::by_owner`] for their queues).
    pub(super) fn release_owner_in(
        &mut self,
        owner: &str,
        until_at_most_ms: i64,
        mut released: impl FnMut(&ConnId, u64),
    ) {
        let Some((name, conns)) = self.by_owner.remove_entry(owner) else {
            return;
        };
        let mut still = std::collections::HashSet::new();
        for c in conns {
            let Some(cq) = self.by_conn.get_mut(&c) else {
                continue;
            };
            let mut n = 0;
            for m in cq.msgs.values_mut() {
                if m.owner.as_deref() == Some(owner) {
                    if m.lease_until_ms <= until_at_most_ms {
                        m.owner = None;
                        m.lease_until_ms = 0;
                        n += 1;
                    } else {
                        still.insert(c.clone());
                    }
                }
            }
            released(&c, n);
        }
        if !still.is_empty() {
            self.by_owner.insert(name, still);
        }
    }

    /// [`Store::reclaim_expired_leases`](crate::store::Store::reclaim_expired_leases): at most
    /// `max` messages whose lease ran out by `now_ms` (and not past the sender's expiry) back to
    /// pending; their connections, each once, with the fewest deliveries among them. Reads each
    /// queue [`Queues::by_owner`] names once (those where a lease was taken since their owner
    /// last let go, or since the last pass), and drops from that index the queues where an owner
    /// no longer holds a message, as [`Store::expire`](crate::store::Store::expire) does: the
    /// HTTP and hand-off owners are never released as a whole.
    pub(super) fn reclaim_expired(&mut self, now_ms: i64, max: usize) -> Vec<crate::store::Reclaimed> {
        let Queues { by_conn, by_owner, .. } = self;
        let mut out = Vec::new();
        // Queues read: the owners still holding a message there.
        let mut holders: HashMap<ConnId, Vec<Owner>> = HashMap::new();
        let mut n = 0;
        for conn in by_owner.values().flatten() {
            if n >= max {
                break;
            }
            if holders.contains_key(conn) {
                continue;
            }
            let mut held: Vec<Owner> = Vec::new();
            let mut fewest: Option<u32> = None;
            if let Some(cq) = by_conn.get_mut(conn) {
                for m in cq.msgs.values_mut() {
                    if m.owner.is_none() {
                        continue;
                    }
                    if n < max && m.lease_until_ms <= now_ms && !m.expired(now_ms) {
                        m.owner = None;
                        m.lease_until_ms = 0;
                        n += 1;
                        fewest = Some(fewest.map_or(m.attempts, |f| f.min(m.attempts)));
                    } else if let Some(o) = &m.owner {
                        if !held.contains(o) {
                            held.push(o.clone());
                        }
                    }
                }
            }
            if let Some(attempts) = fewest {
                out.push(crate::store::Reclaimed {
                    conn: conn.clone(),
                    attempts,
                });
            }
            holders.insert(conn.clone(), held);
        }
        by_owner.retain(|owner, conns| {
            conns.retain(|c| match holders.get(c) {
                Some(held) => held.contains(owner),
                None => true,
            });
            !conns.is_empty()
        });
        out
    }

    /// The name [`Queues::by_owner`] holds for `owner`, shared, or a new one: every message an
    /// owner leases holds the same name, not one per lease.
    pub(super) fn owner_named(&self, owner: &str) -> Owner {
        match self.by_owner.get_key_value(owner) {
            Some((o, _)) => o.clone(),
            None => Owner::new(owner),
        }
    }

    pub(super) fn insert(&mut self, conn: &str, id: MessageId, meta: Meta) {
        self.insert_filed(conn, id, meta, true);
    }

    /// As [`Queues::insert`], for the index's rebuild at open: the message is not filed in
    /// its queue's receive order until [`Queues::file_in_id_order`], once all are read.
    pub(super) fn insert_unfiled(&mut self, conn: &str, id: MessageId, meta: Meta) {
        self.insert_filed(conn, id, meta, false);
    }

    /// Files every queue in receive order ([`ConnQueue::oldest_received_ms`]), in id order,
    /// after the messages were inserted with [`Queues::insert_unfiled`].
    pub(super) fn file_in_id_order(&mut self) {
        for cq in self.by_conn.values_mut() {
            cq.file_in_id_order();
        }
    }

    fn insert_filed(&mut self, conn: &str, id: MessageId, meta: Meta, filed: bool) {
        let q = match self.by_conn.get_mut(conn) {
            Some(q) => q,
            None => self.by_conn.entry(conn.to_owned()).or_default(),
        };
        q.bytes += meta.size;
        if meta.expires_at_ms != NEVER {
            self.expiring.insert((meta.expires_at_ms, id), conn.to_owned());
        }
        let received_ms = meta.received_at_ms;
        match q.msgs.insert(id, meta) {
            None => self.total += 1,
            Some(old) => {
                q.late.remove(&(old.received_at_ms, id));
            }
        }
        if filed {
            file(&mut q.in_order_to, &mut q.late, id, received_ms);
        }
    }

    /// Leases and attempt counts held in memory only (see [`Slot`]).
    pub(super) fn leases(&self) -> Leases {
        let mut out = HashMap::new();
        for cq in self.by_conn.values() {
            for (id, m) in &cq.msgs {
                if m.lease_until_ms != 0 || m.attempts != 0 {
                    out.insert(*id, (m.lease_until_ms, m.owner.clone(), m.attempts));
                }
            }
        }
        out
    }

    /// Restores [`Queues::leases`] on an index rebuilt from disk (messages gone meanwhile
    /// are skipped).
    pub(super) fn carry_leases(&mut self, mut leases: Leases) {
        if leases.is_empty() {
            return;
        }
        let Queues { by_conn, by_owner, .. } = self;
        for (conn, cq) in by_conn.iter_mut() {
            for (id, m) in cq.msgs.iter_mut() {
                if let Some((until, owner, attempts)) = leases.remove(id) {
                    m.lease_until_ms = until;
                    m.attempts = m.attempts.max(attempts);
                    if let Some(o) = &owner {
                        by_owner.entry(o.clone()).or_default().insert(conn.clone());
                    }
                    m.owner = owner;
                }
            }
        }
    }

    /// Records a dedup entry read from disk at open (from a queued message or a `dedup`
    /// record); of two for the same key, the later arrival names the copy. Returns the id of
    /// the other one, superseded. The pruning order is made once all are read
    /// ([`Queues::order_dedup`]).
    pub(super) fn note_dedup(&mut self, conn: &str, key: [u8; 32], id: MessageId, at: i64) -> Option<MessageId> {
        let (_, d) = self.dedup_of(conn);
        if d.get(&key).is_some_and(|(_, a)| *a >= at) {
            return Some(id);
        }
        d.insert(key, (id, at)).map(|(old, _)| old)
    }

    /// The dedup count and pruning order of the entries read at open: one allocation of the
    /// exact size, sorted in place (entries of the same time are pruned together: their order
    /// among themselves does not matter), not a buffer grown by doubling and a sort's scratch
    /// (what they outgrow stays with the allocator after the open).
    pub(super) fn order_dedup(&mut self) {
        let total = self.dedup.values().map(HashMap::len).sum();
        let mut order = VecDeque::with_capacity(total);
        for (name, d) in &self.dedup {
            order.extend(d.iter().map(|(key, (_, at))| (*at, name.clone(), *key)));
        }
        order.make_contiguous().sort_unstable_by_key(|e| e.0);
        self.dedup_count = total as u64;
        self.dedup_order = order;
        self.dedup_unsorted = false;
    }

    /// Adds a dedup record made at `at` (its message's `received_at_ms`) to the end of the
    /// pruning order. A prune stops at the first entry not yet due, so the order must stay
    /// oldest first: an entry older than the last by more than [`DEDUP_ORDER_SLACK_MS`] (the
    /// wall clock stepped back) marks the order for a sort. Without it, the entries made before
    /// the step (or while the clock ran ahead) held back the pruning of every entry behind
    /// them for as long as the step: memory grew by that much of the window's forwards.
    pub(super) fn push_dedup(&mut self, at: i64, name: Arc<str>, key: [u8; 32]) {
        if self
            .dedup_order
            .back()
            .is_some_and(|(last, _, _)| at < last.saturating_sub(DEDUP_ORDER_SLACK_MS))
        {
            self.dedup_unsorted = true;
        }
        self.dedup_order.push_back((at, name, key));
    }

    /// Sorts the pruning order, oldest first, when a step of the clock left it out of order
    /// ([`Queues::push_dedup`]), at most once per [`DEDUP_RESORT_EVERY`]: until the wall
    /// clock passes the entries made before a step back, every entry pushed is older than
    /// them, so a sort at every prune would sort the whole order every few seconds for as
    /// long as the step; at most once a minute, the entries held back past their window are
    /// at most a minute's. Called by a prune before it reads the order, under its lock (a sort
    /// between its read and its drop would pop entries it did not read).
    pub(super) fn sort_dedup_if_stepped(&mut self, now: std::time::Instant) {
        let due = self
            .dedup_sorted_at
            .map_or(true, |at| now.saturating_duration_since(at) >= DEDUP_RESORT_EVERY);
        if due && std::mem::take(&mut self.dedup_unsorted) {
            self.dedup_sorted_at = Some(now);
            tracing::info!(
                entries = self.dedup_order.len(),
                "sled: the wall clock stepped back: the dedup records' pruning order is sorted again"
            );
            self.dedup_order.make_contiguous().sort_unstable_by_key(|e| e.0);
        }
    }

    /// What a prune with cutoff `before_ms` removes, at most `max` entries, read without
    /// changing anything: for each entry it reads at the front of the pruning order, the id
    /// of the record it removes, `None` for an entry replaced by a later copy or removed since
    /// (skipped). The index changes only once the removal is in the queue log
    /// ([`Queues::drop_dedup`]). It reads at most [`DEDUP_DUE_WALK`] entries per entry asked
    /// for (at least [`DEDUP_DUE_WALK_MIN`]): the entries of a deleted connection (up to a
    /// window's forwards) are skipped a bounded run at a time, not in one walk under the
    /// queues' lock.
    pub(super) fn dedup_due(&self, before_ms: i64, max: usize) -> Vec<Option<MessageId>> {
        let mut read = Vec::new();
        let mut n = 0;
        let walk = max.saturating_mul(DEDUP_DUE_WALK).max(DEDUP_DUE_WALK_MIN);
        for (at, conn, key) in &self.dedup_order {
            if n >= max || read.len() >= walk || *at >= before_ms {
                break;
            }
            let id = match self.dedup.get(&**conn).and_then(|d| d.get(key)) {
                Some((id, a)) if a == at => Some(*id),
                _ => None,
            };
            n += usize::from(id.is_some());
            read.push(id);
        }
        read
    }

    /// Drops the entries [`Queues::dedup_due`] read (`read`, the front of the pruning order:
    /// only a prune pops it, one at a time), once their removal is in the queue log. An entry
    /// replaced or removed meanwhile is left to what replaced it. Returns how many it dropped.
    pub(super) fn drop_dedup(&mut self, read: &[Option<MessageId>]) -> u64 {
        let mut n = 0;
        for want in read {
            let Some((at, conn, key)) = self.dedup_order.pop_front() else {
                break;
            };
            let Some(d) = self.dedup.get_mut(&*conn) else { continue };
            if !d.get(&key).is_some_and(|(id, a)| *a == at && Some(*id) == *want) {
                continue;
            }
            d.remove(&key);
            if d.is_empty() {
                self.dedup.remove(&*conn);
            }
            self.dedup_count -= 1;
            n += 1;
        }
        n
    }

    /// Whether the dedup entry of `key` in `conn` is held for message `id`, so the dedup record
    /// of that message belongs in the queue log: not pruned, not replaced by a later copy,
    /// and its connection's entries not being dropped ([`Queues::dedup_dropping`]). Asked by a
    /// removal before it writes the record and again once it is written (the entry may go in
    /// between: the record is then removed again).
    pub(super) fn holds_dedup(&self, conn: &str, key: &[u8; 32], id: MessageId) -> bool {
        self.dedup_dropping.as_deref() != Some(conn)
            && self
                .dedup
                .get(conn)
                .and_then(|d| d.get(key))
                .is_some_and(|(held, _)| *held == id)
    }

    /// The dedup entries of `conn` (made empty when it has none) and the connection's name as
    /// they hold it, for its `dedup_order` entries.
    pub(super) fn dedup_of(&mut self, conn: &str) -> (Arc<str>, &mut DedupEntries) {
        let name = match self.dedup.get_key_value(conn) {
            Some((name, _)) => name.clone(),
            None => Arc::from(conn),
        };
        let d = self.dedup.entry(name.clone()).or_default();
        (name, d)
    }

    /// Removes message `id` of `conn` from the index (its queue's bytes, the total, its expiry
    /// entry; the queue when it is left empty); returns its lease state, `None` when it is not
    /// there (any more). Called once its removal is in the queue log, never before.
    pub(super) fn remove_msg(&mut self, conn: &str, id: MessageId) -> Option<Meta> {
        let cq = self.by_conn.get_mut(conn)?;
        let m = cq.msgs.remove(&id)?;
        cq.bytes -= m.size;
        cq.late.remove(&(m.received_at_ms, id));
        if cq.msgs.is_empty() {
            self.by_conn.remove(conn);
        }
        self.total -= 1;
        self.unindex(id, &m);
        Some(m)
    }

    /// Removes message `id` of `conn`, lost (its record does not read back), as
    /// [`Queues::remove_msg`] does, and its dedup entry: a copy the sender sends again is then
    /// queued, not taken for a duplicate of a message never delivered. Its entry is found by a
    /// scan of the connection's entries (rare: damage on the disk).
    pub(super) fn remove_lost(&mut self, conn: &str, id: MessageId) -> Option<Meta> {
        let m = self.remove_msg(conn, id)?;
        if m.dedup {
            if let Some(d) = self.dedup.get_mut(conn) {
                let before = d.len();
                d.retain(|_, (held, _)| *held != id);
                self.dedup_count -= (before - d.len()) as u64;
                if d.is_empty() {
                    self.dedup.remove(conn);
                }
            }
        }
        Some(m)
    }

    /// The connection whose queue holds message `id`, by a scan of the queues (for a message
    /// the queue log lost, known by its id alone).
    pub(super) fn conn_of(&self, id: MessageId) -> Option<ConnId> {
        self.by_conn
            .iter()
            .find(|(_, cq)| cq.msgs.contains_key(&id))
            .map(|(conn, _)| conn.clone())
    }

    /// Drops the expiry entry of a message just removed from its queue.
    pub(super) fn unindex(&mut self, id: MessageId, meta: &Meta) {
        if meta.expires_at_ms != NEVER {
            self.expiring.remove(&(meta.expires_at_ms, id));
        }
    }
}

/// Leases of messages (id -> lease until, owner, attempts), carried over a reopen.
pub(super) type Leases = HashMap<MessageId, (i64, Option<Owner>, u32)>;

#[cfg(test)]
mod tests {
    use super::{LeaseBudget, Queues, DEDUP_RESORT_EVERY};
    use std::time::{Duration, Instant};

    /// While a step of the clock keeps every new entry older than those made before it, a
    /// prune sorts the pruning order at most once per `DEDUP_RESORT_EVERY`, not at every prune
    /// (a sort of the whole order every few seconds, for as long as the step).
    #[test]
    fn the_pruning_order_is_sorted_at_most_once_a_minute_while_the_clock_catches_up() {
        let mut q = Queues::default();
        let name: std::sync::Arc<str> = "c".into();
        let times = |q: &Queues| q.dedup_order.iter().map(|e| e.0).collect::<Vec<_>>();
        q.push_dedup(10_000, name.clone(), [1; 32]);
        q.push_dedup(0, name.clone(), [2; 32]);
        let t0 = Instant::now();
        q.sort_dedup_if_stepped(t0);
        assert_eq!(times(&q), [0, 10_000]);
        q.push_dedup(1, name.clone(), [3; 32]);
        assert!(q.dedup_unsorted, "still older than the entry made before the step");
        q.sort_dedup_if_stepped(t0 + Duration::from_secs(5));
        assert_eq!(times(&q), [0, 10_000, 1], "not sorted again within the minute");
        q.sort_dedup_if_stepped(t0 + DEDUP_RESORT_EVERY);
        assert_eq!(times(&q), [0, 1, 10_000]);
        assert!(!q.dedup_unsorted);
    }

    /// Takes sizes from `sizes` while the budget admits them: what a lease of them leases.
    fn taken(mut b: LeaseBudget, sizes: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for &size in sizes {
            if !b.admits(size) {
                break;
            }
            b.take(size);
            out.push(size);
        }
        out
    }

    #[test]
    fn a_lease_budget_stops_before_the_message_that_would_pass_it() {
        assert_eq!(taken(LeaseBudget::new(10, 4), &[1, 3, 1, 10]), vec![1, 3]);
        assert_eq!(taken(LeaseBudget::new(10, 4), &[1, 10, 1]), vec![1]);
    }

    #[test]
    fn a_lease_budget_always_admits_a_first_message_however_large() {
        assert_eq!(taken(LeaseBudget::new(10, 4), &[10, 1]), vec![10]);
        assert_eq!(taken(LeaseBudget::new(10, 0), &[0, 0]), vec![0, 0]);
        assert_eq!(taken(LeaseBudget::new(10, 4), &[10, 0]), vec![10], "already past it");
    }

    #[test]
    fn a_lease_budget_keeps_its_message_count_and_no_count_takes_nothing() {
        assert_eq!(taken(LeaseBudget::new(2, usize::MAX), &[1, 1, 1]), vec![1, 1]);
        assert!(taken(LeaseBudget::new(0, usize::MAX), &[1]).is_empty());
        assert_eq!(
            taken(LeaseBudget::new(3, usize::MAX), &[u64::MAX, u64::MAX, 1]),
            vec![u64::MAX, u64::MAX, 1],
            "no budget: sizes never overflow it"
        );
    }
}
