//! The session directory: which node holds the live session of which connection.
//!
//! Owns: a pure state machine over claims `(conn, node, epoch)`; `apply(event) -> effects`.
//! Must not touch sockets, clocks, channels or the wire format: the runtime in `mod.rs` turns
//! frames and membership changes into [`DirEvent`]s and acts on [`DirEffect`]s.
//!
//! Rules:
//! - Every node keeps at most one claim per conn; a node's `Own` replaces its own claim only
//!   with a newer epoch (a late, stale `Own` is ignored).
//! - `Disown` removes a node's claim only if the epoch matches (a late `Disown` of an older
//!   session cannot remove a newer one).
//! - The owner of a conn is the claim with the highest `(epoch, node)`: newer epoch wins, the
//!   node id breaks (practically impossible) ties so every node picks the same owner.
//! - Claims of other nodes are kept under the winner, so when the newest session ends the
//!   older, still-live one is found again without waiting for a sweep.
//! - `NodeGone` drops every claim of a node (down, left, removed from config); `Resync`
//!   replaces every claim of a node with its full set.
//!
//! Bounded steps: `NodeGone` and `Resync` cost time in proportion to a node's claims (a
//! peer may hold a million), and the runtime applies events under the cluster lock that every
//! forward waits on. So both also come in slices, each costing at most what its caller
//! chooses: `ResyncBegin`, `ResyncChunk`s, `ResyncEnd` (the resync), `Forget` (the
//! `NodeGone`), then `Sweep`s that remove what they left stale, a bounded number of claims
//! per step. Generations make that exact: every claim of a node carries the generation of the
//! node's resync that last confirmed it (`ResyncBegin` starts a new one, a chunk or an `Own`
//! marks a claim with it), `ResyncEnd` and `Forget` mark every claim of an older generation
//! stale, and sweeps remove stale claims. Until its sweep reaches it a stale claim still
//! counts for [`Directory::owner`] (kept a little longer: at worst a delay), but is absent for
//! everything the node says next, so once the sweeps are done the directory is exactly what
//! the one-shot `Resync`/`NodeGone` would have made of the same events. A claim the resync
//! re-sent is never stale, so it is never removed early.

use std::collections::{BTreeMap, HashMap};

use indexmap::IndexMap;
use serde::Serialize;

/// One row of the directory as shown in status output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub conn: String,
    pub node: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEvent {
    Own {
        conn: String,
        node: String,
        epoch: u64,
    },
    Disown {
        conn: String,
        node: String,
        epoch: u64,
    },
    /// Drops every claim of `node` at once (cost: its claims).
    NodeGone {
        node: String,
    },
    /// Replaces every claim of `node` with `claims` at once (cost: old and new claims).
    Resync {
        node: String,
        claims: Vec<(String, u64)>,
    },
    /// A resync of `node` starts: the claims it sends from now on (and those it owns meanwhile)
    /// belong to it; the others go stale at `ResyncEnd`. Costs nothing.
    ResyncBegin {
        node: String,
    },
    /// Part of the claims of `node`'s resync (cost: `claims`). Applied at once, as `Resync`
    /// would (a claim's epoch is the resync's, the highest when a conn comes twice).
    ResyncChunk {
        node: String,
        claims: Vec<(String, u64)>,
    },
    /// `node`'s resync is complete: every claim of it not sent (or owned) since
    /// `ResyncBegin` is stale, for `Sweep`s to remove. Costs nothing.
    ResyncEnd {
        node: String,
    },
    /// `NodeGone` in slices: every claim of `node` is stale, for `Sweep`s to remove; what it
    /// claims afterwards stays. Costs nothing.
    Forget {
        node: String,
    },
    /// Removes stale claims of `node`, looking at `max` claims at most (one is enough to make
    /// progress). [`Directory::sweeping`] says whether more is to be done.
    Sweep {
        node: String,
        max: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEffect {
    /// `node` now owns `conn`, which the local node owned before this event: the local
    /// session is superseded (the node decides whether to close it).
    SessionMoved { conn: String, node: String },
    /// A sweep removed `node`'s claim of `conn`, and no node claims `conn` any more.
    Orphaned { conn: String, node: String },
}

/// How far a peer's clock may run ahead of ours before its epochs are refused.
pub const MAX_EPOCH_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Whether a peer's epoch can be real: epochs are `unix_ms << 16 | counter`, so one beyond
/// `MAX_EPOCH_AHEAD_MS` from now is a broken or hostile peer (an `Own` at `u64::MAX` would
/// otherwise pin the conn forever and overflow the next local epoch).
pub fn plausible_epoch(epoch: u64, now_ms: u64) -> bool {
    epoch <= (now_ms.saturating_add(MAX_EPOCH_AHEAD_MS) << 16) | 0xffff
}

/// One claim of a node: its epoch and the generation of the resync that last confirmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    epoch: u64,
    gen: u64,
}

/// A removal of stale claims in progress: the claims of a generation below `below` that
/// `cursor` has not passed yet are still to be looked at.
#[derive(Debug, Clone, Copy)]
struct Sweep {
    below: u64,
    cursor: Cursor,
}

/// Where a scan of one node's claims stands ([`Directory::page`], sweeps): scans go through
/// the shards from the last to the first, and through each from its top position down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    shard: usize,
    /// Positions of `shard` below this one are still to be scanned.
    end: usize,
}

impl Cursor {
    const START: Cursor = Cursor {
        shard: SHARDS - 1,
        end: usize::MAX,
    };
}

/// One node's claims, by conn, in [`SHARDS`] `IndexMap`s (by the same hash as
/// [`Directory`]'s conns, so that a growing map moves a 64th of them at once). Every removal
/// is a `swap_remove`, so a scan by position that walks each map downwards can stop, let the
/// maps change, and go on: an entry moved by a removal comes from the top, already scanned
/// or added since.
#[derive(Debug, Clone)]
struct Claimed(Vec<IndexMap<String, Mark>>);

impl Default for Claimed {
    fn default() -> Self {
        Claimed((0..SHARDS).map(|_| IndexMap::new()).collect())
    }
}

impl Claimed {
    fn get(&self, conn: &str) -> Option<&Mark> {
        self.0[Shards::of(conn)].get(conn)
    }

    /// Sets the claim of `conn`, in place if there is one (a scan in progress relies on it).
    fn set(&mut self, conn: &str, m: Mark) {
        let shard = &mut self.0[Shards::of(conn)];
        match shard.get_mut(conn) {
            Some(old) => *old = m,
            None => {
                shard.insert(conn.to_string(), m);
            }
        }
    }

    fn swap_remove(&mut self, conn: &str) {
        self.0[Shards::of(conn)].swap_remove(conn);
    }

    fn contains_key(&self, conn: &str) -> bool {
        self.0[Shards::of(conn)].contains_key(conn)
    }

    fn len(&self) -> usize {
        self.0.iter().map(IndexMap::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(IndexMap::is_empty)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Mark)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    /// Scans from `from`, calling `f` on each claim, `max` claims at most; `f` returns whether
    /// to remove it. Returns where to go on from, or `None` when the scan is complete.
    fn scan(&mut self, from: Cursor, max: usize, mut f: impl FnMut(&String, &Mark) -> bool) -> Option<Cursor> {
        Self::walk(from, max, |shard, at| {
            let m = &mut self.0[shard];
            if let Some(i) = at {
                if m.get_index(i).is_some_and(|(k, v)| f(k, v)) {
                    // The last entry moves to i: scanned already, or added since.
                    m.swap_remove_index(i);
                }
            }
            m.len()
        })
    }

    /// [`Claimed::scan`] that removes nothing.
    fn look(&self, from: Cursor, max: usize, mut f: impl FnMut(&String, &Mark)) -> Option<Cursor> {
        Self::walk(from, max, |shard, at| {
            let m = &self.0[shard];
            if let Some((k, v)) = at.and_then(|i| m.get_index(i)) {
                f(k, v);
            }
            m.len()
        })
    }

    /// The cursor arithmetic of a scan: `visit(shard, Some(i))` looks at position `i` of
    /// `shard`; every call returns the length of `shard` then.
    fn walk(from: Cursor, max: usize, mut visit: impl FnMut(usize, Option<usize>) -> usize) -> Option<Cursor> {
        let mut c = from;
        let mut looked = 0;
        loop {
            let mut i = c.end.min(visit(c.shard, None));
            while i > 0 && looked < max {
                i -= 1;
                looked += 1;
                visit(c.shard, Some(i));
            }
            if i > 0 {
                return Some(Cursor { shard: c.shard, end: i });
            }
            if c.shard == 0 {
                return None;
            }
            c = Cursor {
                shard: c.shard - 1,
                end: usize::MAX,
            };
            if looked >= max {
                return Some(c);
            }
        }
    }
}

/// The claims of one node.
#[derive(Debug, Clone, Default)]
struct NodeClaims {
    claims: Claimed,
    /// The generation of the node's latest resync.
    gen: u64,
    sweep: Option<Sweep>,
}

impl NodeClaims {
    /// Stale: left out of a completed resync (or forgotten), not yet removed by the sweep.
    fn stale(&self, m: &Mark) -> bool {
        self.sweep.is_some_and(|s| m.gen < s.below)
    }

    /// The live (not stale) claim of `conn`.
    fn live(&self, conn: &str) -> Option<&Mark> {
        self.claims.get(conn).filter(|m| !self.stale(m))
    }
}

/// Maps `claims` is split into, by a hash of the conn.
const SHARDS: usize = 64;

/// conn -> node -> epoch, split in [`SHARDS`] maps: a hash map grows by moving everything it
/// holds at once, which for a million conns would be one long stall of the runtime's lock;
/// a shard holds a 64th of them.
#[derive(Debug, Clone)]
struct Shards(Vec<HashMap<String, BTreeMap<String, u64>>>);

impl Default for Shards {
    fn default() -> Self {
        Shards((0..SHARDS).map(|_| HashMap::new()).collect())
    }
}

impl Shards {
    /// The shard of `conn`. Shard `k` takes a share of the conns in proportion to
    /// `2^(k/SHARDS)`: the shards' sizes spread over one doubling, so as the directory grows
    /// they reach their growth points (powers of two) one after the other, not all within a
    /// few slices as equal shards would. A peer choosing conns that share a shard only makes
    /// that shard as large as one unsplit map would be.
    fn of(conn: &str) -> usize {
        static BOUNDS: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
        let bounds = BOUNDS.get_or_init(|| {
            let w: Vec<f64> = (0..SHARDS).map(|k| (k as f64 / SHARDS as f64).exp2()).collect();
            let total: f64 = w.iter().sum();
            w.iter()
                .scan(0.0, |acc, x| {
                    *acc += x;
                    Some((*acc / total * u64::MAX as f64) as u64)
                })
                .collect()
        });
        // FNV-1a, then a mixer so that the high bits depend on every byte.
        let mut h = conn.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        bounds.partition_point(|&b| b < h).min(SHARDS - 1)
    }

    fn get(&self, conn: &str) -> Option<&BTreeMap<String, u64>> {
        self.0[Self::of(conn)].get(conn)
    }

    fn get_mut(&mut self, conn: &str) -> Option<&mut BTreeMap<String, u64>> {
        self.0[Self::of(conn)].get_mut(conn)
    }

    fn entry(&mut self, conn: &str) -> &mut BTreeMap<String, u64> {
        self.0[Self::of(conn)].entry(conn.to_string()).or_default()
    }

    fn remove(&mut self, conn: &str) {
        self.0[Self::of(conn)].remove(conn);
    }

    fn contains_key(&self, conn: &str) -> bool {
        self.0[Self::of(conn)].contains_key(conn)
    }

    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(HashMap::is_empty)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &BTreeMap<String, u64>)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &BTreeMap<String, u64>> {
        self.0.iter().flat_map(|m| m.values())
    }
}

#[derive(Debug, Default, Clone)]
pub struct Directory {
    local: String,
    /// conn -> node -> epoch. BTreeMap keeps iteration (and status output) deterministic.
    claims: Shards,
    /// node -> its claims, the same claims indexed by node (for NodeGone/Resync/snapshot).
    /// An entry is dropped when it holds no claim and has no sweep in progress.
    by_node: HashMap<String, NodeClaims>,
}

impl Directory {
    pub fn new(local: impl Into<String>) -> Self {
        Directory {
            local: local.into(),
            ..Default::default()
        }
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    /// The owner of `conn` and its epoch (a stale claim counts until its sweep removes it).
    pub fn owner(&self, conn: &str) -> Option<(&str, u64)> {
        Self::winner(self.claims.get(conn)?)
    }

    fn winner(claims: &BTreeMap<String, u64>) -> Option<(&str, u64)> {
        claims
            .iter()
            .max_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
            .map(|(n, e)| (n.as_str(), *e))
    }

    /// Highest epoch any node claims for `conn` (0 if none). A new local claim must exceed it
    /// so that a node whose clock runs behind still wins with a session that is newer.
    pub fn max_epoch(&self, conn: &str) -> u64 {
        self.claims
            .get(conn)
            .and_then(|c| c.values().max().copied())
            .unwrap_or(0)
    }

    /// The live claims of one node, sorted (cost: all of them; the runtime uses
    /// [`Directory::page`]).
    pub fn claims_of(&self, node: &str) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .by_node
            .get(node)
            .map(|n| {
                n.claims
                    .iter()
                    .filter(|(_, m)| !n.stale(m))
                    .map(|(c, m)| (c.clone(), m.epoch))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The live claims among the next `max` claims of `node`, for a scan in slices: start with
    /// `from: None`, go on from the cursor returned until it is `None`. Changes between the
    /// calls are allowed: every claim held throughout the scan is returned at least once (a
    /// claim may come twice, the second time with the epoch it has then), claims added
    /// meanwhile may be missed.
    pub fn page(&self, node: &str, from: Option<Cursor>, max: usize) -> (Vec<(String, u64)>, Option<Cursor>) {
        let Some(n) = self.by_node.get(node) else {
            return (Vec::new(), None);
        };
        let mut page = Vec::new();
        let next = n.claims.look(from.unwrap_or(Cursor::START), max.max(1), |c, m| {
            if !n.stale(m) {
                page.push((c.clone(), m.epoch));
            }
        });
        (page, next)
    }

    /// One row per conn: the winning claim. Sorted by conn.
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = Self::rows(self.claims.iter()).collect();
        v.sort_by(|a, b| a.conn.cmp(&b.conn));
        v
    }

    /// [`Directory::entries`] in slices, unsorted: the rows of one shard (a 64th of the
    /// conns), then where to go on (start with 0), `None` after the last.
    pub fn entries_page(&self, shard: usize) -> (Vec<Entry>, Option<usize>) {
        let Some(m) = self.claims.0.get(shard) else {
            return (Vec::new(), None);
        };
        let next = (shard + 1 < SHARDS).then_some(shard + 1);
        (Self::rows(m.iter()).collect(), next)
    }

    fn rows<'a>(
        claims: impl Iterator<Item = (&'a String, &'a BTreeMap<String, u64>)> + 'a,
    ) -> impl Iterator<Item = Entry> + 'a {
        claims.filter_map(|(conn, c)| {
            Self::winner(c).map(|(node, epoch)| Entry {
                conn: conn.clone(),
                node: node.to_string(),
                epoch,
            })
        })
    }

    /// How many claims `node` has here (stale ones not yet swept included), and whether it
    /// claims `conn` (the bound on a peer's claims applies to new ones only).
    pub fn claims_by(&self, node: &str, conn: &str) -> (usize, bool) {
        match self.by_node.get(node) {
            Some(n) => (n.claims.len(), n.claims.contains_key(conn)),
            None => (0, false),
        }
    }

    /// How many claims `node` has here, stale ones not yet swept included.
    pub fn count_of(&self, node: &str) -> usize {
        self.by_node.get(node).map_or(0, |n| n.claims.len())
    }

    /// Whether stale claims of `node` wait for a `Sweep`.
    pub fn sweeping(&self, node: &str) -> bool {
        self.by_node.get(node).is_some_and(|n| n.sweep.is_some())
    }

    /// The nodes whose stale claims wait for a `Sweep`.
    pub fn sweeps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .by_node
            .iter()
            .filter(|(_, n)| n.sweep.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }

    /// Number of conns with at least one claim.
    pub fn len(&self) -> usize {
        self.claims.len()
    }

    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    pub fn apply(&mut self, ev: DirEvent) -> Vec<DirEffect> {
        let mut fx = Vec::new();
        match ev {
            DirEvent::Own { conn, node, epoch } => {
                let before = self.local_owns(&conn);
                let stale = self
                    .by_node
                    .get(&node)
                    .and_then(|n| n.live(&conn))
                    .is_some_and(|m| m.epoch >= epoch);
                if !stale {
                    self.insert(&conn, &node, epoch);
                }
                self.moved(&conn, before, &mut fx);
            }
            DirEvent::Disown { conn, node, epoch } => {
                let matches = self
                    .by_node
                    .get(&node)
                    .and_then(|n| n.claims.get(&conn))
                    .is_some_and(|m| m.epoch == epoch);
                if matches {
                    self.remove(&conn, &node);
                }
                // Removing a claim never takes ownership away from the local node.
            }
            DirEvent::NodeGone { node } => {
                if let Some(n) = self.by_node.remove(&node) {
                    for (conn, _) in n.claims.iter() {
                        self.remove_from_claims(conn, &node);
                    }
                }
            }
            DirEvent::Resync { node, claims } => {
                if node == self.local {
                    // Only the local node speaks for itself, through Own/Disown.
                    return fx;
                }
                let mut new: HashMap<String, u64> = HashMap::with_capacity(claims.len());
                for (conn, epoch) in claims {
                    let e = new.entry(conn).or_insert(epoch);
                    *e = (*e).max(epoch);
                }
                let old = self.by_node.remove(&node).unwrap_or_default();
                for (conn, _) in old.claims.iter() {
                    if !new.contains_key(conn) {
                        self.remove_from_claims(conn, &node);
                    }
                }
                // A new generation: nothing of the node is stale after a full replacement.
                let gen = old.gen + 1;
                self.by_node.insert(
                    node.clone(),
                    NodeClaims {
                        gen,
                        ..Default::default()
                    },
                );
                for (conn, epoch) in new {
                    let before = self.local_owns(&conn);
                    self.insert(&conn, &node, epoch);
                    self.moved(&conn, before, &mut fx);
                }
                self.drop_if_idle(&node);
            }
            DirEvent::ResyncBegin { node } => {
                if node == self.local {
                    return fx;
                }
                if let Some(n) = self.by_node.get_mut(&node) {
                    n.gen += 1;
                }
            }
            DirEvent::ResyncChunk { node, claims } => {
                if node == self.local {
                    return fx;
                }
                for (conn, epoch) in claims {
                    let before = self.local_owns(&conn);
                    // Sent twice in this resync: the highest epoch, as `Resync` keeps.
                    let epoch = match self.by_node.get(&node) {
                        Some(n) => match n.claims.get(&conn) {
                            Some(m) if m.gen == n.gen => m.epoch.max(epoch),
                            _ => epoch,
                        },
                        None => epoch,
                    };
                    self.insert(&conn, &node, epoch);
                    self.moved(&conn, before, &mut fx);
                }
            }
            DirEvent::ResyncEnd { node } => {
                if node != self.local {
                    self.mark_stale(&node);
                }
            }
            DirEvent::Forget { node } => {
                if let Some(n) = self.by_node.get_mut(&node) {
                    n.gen += 1;
                }
                self.mark_stale(&node);
            }
            DirEvent::Sweep { node, max } => self.sweep(&node, max.max(1), &mut fx),
        }
        fx
    }

    /// Every claim of `node` of a generation before its current one is stale from now on.
    fn mark_stale(&mut self, node: &str) {
        if let Some(n) = self.by_node.get_mut(node) {
            n.sweep = (!n.claims.is_empty()).then_some(Sweep {
                below: n.gen,
                cursor: Cursor::START,
            });
        }
        self.drop_if_idle(node);
    }

    fn sweep(&mut self, node: &str, max: usize, fx: &mut Vec<DirEffect>) {
        let Some(n) = self.by_node.get_mut(node) else {
            return;
        };
        let Some(s) = n.sweep else {
            return;
        };
        let mut removed = Vec::new();
        // Moved by a removal: scanned already, or added since (so confirmed, not stale).
        let next = n.claims.scan(s.cursor, max, |conn, m| {
            let stale = m.gen < s.below;
            if stale {
                removed.push(conn.clone());
            }
            stale
        });
        n.sweep = next.map(|cursor| Sweep { cursor, ..s });
        for conn in removed {
            self.remove_from_claims(&conn, node);
            if !self.claims.contains_key(&conn) {
                fx.push(DirEffect::Orphaned {
                    conn,
                    node: node.to_string(),
                });
            }
        }
        self.drop_if_idle(node);
    }

    fn drop_if_idle(&mut self, node: &str) {
        if self
            .by_node
            .get(node)
            .is_some_and(|n| n.claims.is_empty() && n.sweep.is_none())
        {
            self.by_node.remove(node);
        }
    }

    fn local_owns(&self, conn: &str) -> bool {
        self.owner(conn).is_some_and(|(n, _)| n == self.local)
    }

    fn moved(&self, conn: &str, local_owned_before: bool, fx: &mut Vec<DirEffect>) {
        if !local_owned_before {
            return;
        }
        if let Some((node, _)) = self.owner(conn) {
            if node != self.local {
                fx.push(DirEffect::SessionMoved {
                    conn: conn.to_string(),
                    node: node.to_string(),
                });
            }
        }
    }

    /// Sets `node`'s claim of `conn`, confirmed by its current generation.
    fn insert(&mut self, conn: &str, node: &str, epoch: u64) {
        self.claims.entry(conn).insert(node.to_string(), epoch);
        let n = self.by_node.entry(node.to_string()).or_default();
        let gen = n.gen;
        n.claims.set(conn, Mark { epoch, gen });
    }

    fn remove(&mut self, conn: &str, node: &str) {
        if let Some(n) = self.by_node.get_mut(node) {
            n.claims.swap_remove(conn);
        }
        self.drop_if_idle(node);
        self.remove_from_claims(conn, node);
    }

    fn remove_from_claims(&mut self, conn: &str, node: &str) {
        if let Some(c) = self.claims.get_mut(conn) {
            c.remove(node);
            if c.is_empty() {
                self.claims.remove(conn);
            }
        }
    }

    /// Checks that both indexes hold the same claims (tests).
    #[cfg(test)]
    fn consistent(&self) -> bool {
        let a: usize = self.claims.values().map(|c| c.len()).sum();
        let b: usize = self.by_node.values().map(|n| n.claims.len()).sum();
        a == b
            && self.claims.values().all(|c| !c.is_empty())
            && self.by_node.values().all(|n| !n.claims.is_empty() || n.sweep.is_some())
            && self.by_node.iter().all(|(id, n)| {
                n.claims
                    .iter()
                    .all(|(c, m)| self.claims.get(c).and_then(|x| x.get(id)) == Some(&m.epoch))
            })
    }

    /// Runs every sweep to its end (tests).
    #[cfg(test)]
    fn settle(&mut self) -> Vec<DirEffect> {
        let mut fx = Vec::new();
        for node in self.sweeps() {
            while self.sweeping(&node) {
                fx.extend(self.apply(DirEvent::Sweep {
                    node: node.clone(),
                    max: 7,
                }));
            }
        }
        fx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_from_far_ahead_are_implausible() {
        let now = 1_700_000_000_000u64;
        assert!(plausible_epoch(now << 16, now));
        assert!(plausible_epoch(((now + 3_600_000) << 16) | 7, now));
        assert!(!plausible_epoch((now + MAX_EPOCH_AHEAD_MS + 1) << 16, now));
        assert!(!plausible_epoch(u64::MAX, now));
    }

    #[test]
    fn claims_by_counts_a_nodes_claims() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 1));
        d.apply(own("b", "n2", 1));
        assert_eq!(d.claims_by("n2", "a"), (2, true));
        assert_eq!(d.claims_by("n2", "c"), (2, false));
        assert_eq!(d.claims_by("n3", "a"), (0, false));
    }
    use proptest::prelude::*;

    fn own(conn: &str, node: &str, epoch: u64) -> DirEvent {
        DirEvent::Own {
            conn: conn.into(),
            node: node.into(),
            epoch,
        }
    }
    fn disown(conn: &str, node: &str, epoch: u64) -> DirEvent {
        DirEvent::Disown {
            conn: conn.into(),
            node: node.into(),
            epoch,
        }
    }

    #[test]
    fn newer_epoch_wins() {
        let mut d = Directory::new("n1");
        d.apply(own("c", "n2", 5));
        d.apply(own("c", "n3", 7));
        assert_eq!(d.owner("c"), Some(("n3", 7)));
        // an older claim arriving late does not take over
        d.apply(own("c", "n2", 6));
        assert_eq!(d.owner("c"), Some(("n3", 7)));
        // the same node's stale own is ignored
        d.apply(own("c", "n3", 1));
        assert_eq!(d.owner("c"), Some(("n3", 7)));
    }

    #[test]
    fn stale_disown_ignored() {
        let mut d = Directory::new("n1");
        d.apply(own("c", "n2", 5));
        d.apply(own("c", "n2", 9));
        d.apply(disown("c", "n2", 5));
        assert_eq!(d.owner("c"), Some(("n2", 9)));
        d.apply(disown("c", "n2", 9));
        assert_eq!(d.owner("c"), None);
        assert!(d.is_empty());
    }

    #[test]
    fn older_live_session_found_again_after_newest_ends() {
        let mut d = Directory::new("n1");
        d.apply(own("c", "n2", 5));
        d.apply(own("c", "n3", 7));
        d.apply(disown("c", "n3", 7));
        assert_eq!(d.owner("c"), Some(("n2", 5)));
    }

    #[test]
    fn session_moved_only_when_local_loses() {
        let mut d = Directory::new("n1");
        assert!(d.apply(own("c", "n1", 5)).is_empty());
        assert!(d.apply(own("c", "n2", 4)).is_empty());
        assert_eq!(
            d.apply(own("c", "n2", 6)),
            vec![DirEffect::SessionMoved {
                conn: "c".into(),
                node: "n2".into()
            }]
        );
        // already moved: no repeat
        assert!(d.apply(own("c", "n3", 8)).is_empty());
        assert!(d.apply(own("x", "n3", 8)).is_empty());
    }

    #[test]
    fn peer_down_drops_its_entries_only() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 1));
        d.apply(own("b", "n2", 1));
        d.apply(own("b", "n3", 0));
        d.apply(own("c", "n1", 1));
        d.apply(DirEvent::NodeGone { node: "n2".into() });
        assert_eq!(d.owner("a"), None);
        assert_eq!(d.owner("b"), Some(("n3", 0)));
        assert_eq!(d.owner("c"), Some(("n1", 1)));
        assert!(d.consistent());
    }

    #[test]
    fn resync_replaces() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 1));
        d.apply(own("b", "n2", 1));
        d.apply(own("b", "n3", 3));
        let fx = d.apply(DirEvent::Resync {
            node: "n2".into(),
            claims: vec![("b".into(), 4), ("c".into(), 2)],
        });
        assert!(fx.is_empty());
        assert_eq!(d.owner("a"), None);
        assert_eq!(d.owner("b"), Some(("n2", 4)));
        assert_eq!(d.owner("c"), Some(("n2", 2)));
        assert_eq!(d.claims_of("n2"), vec![("b".into(), 4), ("c".into(), 2)]);
        assert!(d.consistent());
        // a resync claiming to be from the local node is ignored
        d.apply(DirEvent::Resync {
            node: "n1".into(),
            claims: vec![("z".into(), 1)],
        });
        assert_eq!(d.owner("z"), None);
    }

    #[test]
    fn resync_can_move_a_local_session() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n1", 5));
        let fx = d.apply(DirEvent::Resync {
            node: "n2".into(),
            claims: vec![("a".into(), 6)],
        });
        assert_eq!(fx.len(), 1);
    }

    #[test]
    fn max_epoch_covers_all_claims() {
        let mut d = Directory::new("n1");
        assert_eq!(d.max_epoch("a"), 0);
        d.apply(own("a", "n2", 9));
        d.apply(own("a", "n3", 4));
        assert_eq!(d.max_epoch("a"), 9);
    }

    fn chunk(node: &str, claims: &[(&str, u64)]) -> DirEvent {
        DirEvent::ResyncChunk {
            node: node.into(),
            claims: claims.iter().map(|(c, e)| (c.to_string(), *e)).collect(),
        }
    }
    fn begin(node: &str) -> DirEvent {
        DirEvent::ResyncBegin { node: node.into() }
    }
    fn end(node: &str) -> DirEvent {
        DirEvent::ResyncEnd { node: node.into() }
    }
    fn sweep(node: &str, max: usize) -> DirEvent {
        DirEvent::Sweep { node: node.into(), max }
    }

    #[test]
    fn a_resync_in_chunks_replaces_as_one_resync_does() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 1));
        d.apply(own("b", "n2", 1));
        d.apply(own("b", "n3", 3));
        d.apply(begin("n2"));
        d.apply(chunk("n2", &[("b", 4)]));
        // Not sent yet, not removed: a claim kept a little longer.
        assert_eq!(d.owner("a"), Some(("n2", 1)));
        d.apply(chunk("n2", &[("c", 2), ("c", 1)]));
        d.apply(end("n2"));
        assert!(d.sweeping("n2"));
        // Stale, but counted until the sweep removes it.
        assert_eq!(d.owner("a"), Some(("n2", 1)));
        assert_eq!(d.claims_of("n2"), vec![("b".into(), 4), ("c".into(), 2)]);
        let fx = d.apply(sweep("n2", 1));
        assert!(d.consistent());
        let fx: Vec<_> = fx.into_iter().chain(d.settle()).collect();
        let mut paged = Vec::new();
        let mut shard = Some(0);
        while let Some(s) = shard {
            let (rows, next) = d.entries_page(s);
            paged.extend(rows);
            shard = next;
        }
        paged.sort_by(|a, b| a.conn.cmp(&b.conn));
        assert_eq!(paged, d.entries());
        assert_eq!(
            fx,
            vec![DirEffect::Orphaned {
                conn: "a".into(),
                node: "n2".into()
            }]
        );
        assert!(!d.sweeping("n2"));
        assert_eq!(d.owner("a"), None);
        assert_eq!(d.owner("b"), Some(("n2", 4)));
        assert_eq!(d.owner("c"), Some(("n2", 2)));
        assert!(d.consistent());
        // From the local node: ignored, as a one-shot resync is.
        d.apply(begin("n1"));
        d.apply(chunk("n1", &[("z", 1)]));
        d.apply(end("n1"));
        assert_eq!(d.owner("z"), None);
        assert!(d.sweeps().is_empty());
    }

    #[test]
    fn a_sweep_looks_at_no_more_claims_than_asked() {
        let mut d = Directory::new("n1");
        for i in 0..100 {
            d.apply(own(&format!("c{i:03}"), "n2", 1));
        }
        d.apply(DirEvent::Forget { node: "n2".into() });
        let mut steps = 0;
        while d.sweeping("n2") {
            let before = d.len();
            d.apply(sweep("n2", 10));
            assert!(before - d.len() <= 10);
            steps += 1;
        }
        // Ten full steps, and maybe one that finds the last shards empty.
        assert!((10..=11).contains(&steps), "{steps} steps");
        assert!(d.is_empty());
        assert!(d.consistent());
    }

    #[test]
    fn forget_keeps_what_the_node_claims_afterwards() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 5));
        d.apply(own("b", "n2", 5));
        d.apply(DirEvent::Forget { node: "n2".into() });
        // Back at once, with a new session of `a` and the same (late) claim of `b`.
        d.apply(own("a", "n2", 6));
        d.apply(own("b", "n2", 5));
        d.apply(own("c", "n2", 1));
        d.settle();
        assert_eq!(
            d.claims_of("n2"),
            vec![("a".into(), 6), ("b".into(), 5), ("c".into(), 1)]
        );
        assert!(d.consistent());
    }

    #[test]
    fn a_resync_cut_short_loses_nothing_and_the_next_one_cleans_up() {
        let mut d = Directory::new("n1");
        d.apply(own("a", "n2", 1));
        d.apply(own("b", "n2", 1));
        // The link ends mid-resync: nothing is stale (no end), the partial set stays.
        d.apply(begin("n2"));
        d.apply(chunk("n2", &[("c", 1)]));
        assert!(!d.sweeping("n2"));
        // The next link's resync names `b` only.
        d.apply(begin("n2"));
        d.apply(chunk("n2", &[("b", 1)]));
        d.apply(end("n2"));
        d.settle();
        assert_eq!(d.claims_of("n2"), vec![("b".into(), 1)]);
        assert!(d.consistent());
    }

    #[test]
    fn pages_cover_the_claims_of_a_node() {
        let mut d = Directory::new("n1");
        for i in 0..10 {
            d.apply(own(&format!("c{i}"), "n1", i));
        }
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let (page, next) = d.page("n1", before, 3);
            assert!(page.len() <= 3);
            seen.extend(page);
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, d.claims_of("n1"));
        assert_eq!(d.page("n9", None, 3), (vec![], None));
    }

    fn arb_event() -> impl Strategy<Value = DirEvent> {
        let conn = prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(String::from);
        let node = prop_oneof![Just("n1"), Just("n2"), Just("n3")].prop_map(String::from);
        prop_oneof![
            (conn.clone(), node.clone(), 0u64..6).prop_map(|(conn, node, epoch)| DirEvent::Own { conn, node, epoch }),
            (conn.clone(), node.clone(), 0u64..6).prop_map(|(conn, node, epoch)| DirEvent::Disown {
                conn,
                node,
                epoch
            }),
            node.clone().prop_map(|node| DirEvent::NodeGone { node }),
            (node, proptest::collection::vec((conn, 0u64..6), 0..4))
                .prop_map(|(node, claims)| DirEvent::Resync { node, claims }),
        ]
    }

    proptest! {
        #[test]
        fn indexes_stay_consistent(evs in proptest::collection::vec(arb_event(), 0..60)) {
            let mut d = Directory::new("n1");
            for ev in evs {
                d.apply(ev);
                prop_assert!(d.consistent());
            }
        }

        #[test]
        fn owns_commute(mut evs in proptest::collection::vec(
            ("[abc]", "n[123]", 0u64..6), 0..30), seed in any::<u64>()) {
            let apply = |evs: &[(String, String, u64)]| {
                let mut d = Directory::new("n0");
                for (c, n, e) in evs {
                    d.apply(own(c, n, *e));
                }
                d.entries()
            };
            let a = apply(&evs);
            // a deterministic shuffle
            let n = evs.len();
            if n > 1 {
                let mut s = seed;
                for i in (1..n).rev() {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    evs.swap(i, (s >> 33) as usize % (i + 1));
                }
            }
            prop_assert_eq!(a, apply(&evs));
        }

        /// The sliced events end where the one-shot ones do: `Resync` as `ResyncBegin`,
        /// chunks and `ResyncEnd`, `NodeGone` as `Forget`, with sweeps of any size run at any
        /// point after, between later events; every claim a resync sent stays through it.
        #[test]
        fn sliced_events_end_where_one_shot_events_do(
            evs in proptest::collection::vec(arb_event(), 0..60),
            cuts in proptest::collection::vec(1usize..4, 60),
            sweeps in proptest::collection::vec((0usize..3, 0usize..4), 60),
        ) {
            let nodes = ["n1", "n2", "n3"];
            let mut one = Directory::new("n1");
            let mut sliced = Directory::new("n1");
            for (i, ev) in evs.into_iter().enumerate() {
                one.apply(ev.clone());
                match ev {
                    DirEvent::Resync { node, claims } => {
                        sliced.apply(DirEvent::ResyncBegin { node: node.clone() });
                        let mut sent: Vec<(String, u64)> = Vec::new();
                        for part in claims.chunks(cuts[i]) {
                            sliced.apply(DirEvent::ResyncChunk { node: node.clone(), claims: part.to_vec() });
                            sent.extend_from_slice(part);
                            prop_assert!(sliced.consistent());
                            // Nothing sent so far is missing (a sweep of earlier events may run).
                            sliced.apply(DirEvent::Sweep { node: node.clone(), max: 1 });
                            if node != "n1" {
                                for (c, _) in &sent {
                                    prop_assert!(sliced.claims.get(c).is_some_and(|m| m.contains_key(&node)));
                                }
                            }
                        }
                        sliced.apply(DirEvent::ResyncEnd { node });
                    }
                    DirEvent::NodeGone { node } => {
                        sliced.apply(DirEvent::Forget { node });
                    }
                    ev => {
                        sliced.apply(ev);
                    }
                }
                let (n, max) = sweeps[i];
                if max > 0 {
                    sliced.apply(DirEvent::Sweep { node: nodes[n].to_string(), max });
                }
                prop_assert!(sliced.consistent());
            }
            sliced.settle();
            prop_assert!(sliced.consistent());
            prop_assert!(sliced.sweeps().is_empty());
            prop_assert_eq!(one.entries(), sliced.entries());
            for n in nodes {
                prop_assert_eq!(one.claims_of(n), sliced.claims_of(n));
                prop_assert_eq!(one.claims_by(n, "a"), sliced.claims_by(n, "a"));
            }
        }

        /// A scan in pages, with the node's own claims changing between pages (epochs only
        /// grow, as the node's do), returns every claim held throughout.
        #[test]
        fn a_scan_in_pages_misses_no_claim_held_throughout(
            init in proptest::collection::vec(0u8..30, 0..30),
            changes in proptest::collection::vec(proptest::collection::vec((0u8..30, any::<bool>()), 0..4), 0..40),
            size in 1usize..5,
        ) {
            let mut d = Directory::new("n1");
            let mut epoch = 0;
            for c in init {
                epoch += 1;
                d.apply(own(&format!("c{c}"), "n1", epoch));
            }
            let mut kept: std::collections::BTreeSet<String> =
                d.claims_of("n1").into_iter().map(|(c, _)| c).collect();
            let mut seen = std::collections::BTreeSet::new();
            let mut before = None;
            let mut changes = changes.into_iter();
            loop {
                let (page, next) = d.page("n1", before, size);
                seen.extend(page.into_iter().map(|(c, _)| c));
                let Some(n) = next else { break };
                before = Some(n);
                for (c, add) in changes.next().unwrap_or_default() {
                    let conn = format!("c{c}");
                    epoch += 1;
                    if add {
                        d.apply(own(&conn, "n1", epoch));
                    } else if let Some((_, e)) = d.claims_of("n1").into_iter().find(|(x, _)| *x == conn) {
                        d.apply(disown(&conn, "n1", e));
                        kept.remove(&conn);
                    }
                }
            }
            prop_assert!(kept.is_subset(&seen), "missed {:?}", kept.difference(&seen).collect::<Vec<_>>());
        }

        #[test]
        fn node_gone_leaves_nothing_of_it(evs in proptest::collection::vec(arb_event(), 0..40)) {
            let mut d = Directory::new("n1");
            for ev in evs {
                d.apply(ev);
            }
            d.apply(DirEvent::NodeGone { node: "n2".into() });
            prop_assert!(d.entries().iter().all(|e| e.node != "n2"));
            prop_assert!(d.claims_of("n2").is_empty());
        }
    }
}
