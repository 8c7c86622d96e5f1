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

use std::collections::{BTreeMap, HashMap};

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
    Own { conn: String, node: String, epoch: u64 },
    Disown { conn: String, node: String, epoch: u64 },
    NodeGone { node: String },
    Resync { node: String, claims: Vec<(String, u64)> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirEffect {
    /// `node` now owns `conn`, which the local node owned before this event: the local
    /// session is superseded (the node decides whether to close it).
    SessionMoved { conn: String, node: String },
}

/// How far a peer's clock may run ahead of ours before its epochs are refused.
pub const MAX_EPOCH_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// Whether a peer's epoch can be real: epochs are `unix_ms << 16 | counter`, so one beyond
/// `MAX_EPOCH_AHEAD_MS` from now is a broken or hostile peer (an `Own` at `u64::MAX` would
/// otherwise pin the conn forever and overflow the next local epoch).
pub fn plausible_epoch(epoch: u64, now_ms: u64) -> bool {
    epoch <= (now_ms.saturating_add(MAX_EPOCH_AHEAD_MS) << 16) | 0xffff
}

#[derive(Debug, Default, Clone)]
pub struct Directory {
    local: String,
    /// conn -> node -> epoch. BTreeMap keeps iteration (and status output) deterministic.
    claims: HashMap<String, BTreeMap<String, u64>>,
    /// node -> conn -> epoch, the same claims indexed by node (for NodeGone/Resync/snapshot).
    by_node: HashMap<String, HashMap<String, u64>>,
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

    /// The owner of `conn` and its epoch.
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

    /// The claims of one node (the local one for a resync).
    pub fn claims_of(&self, node: &str) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .by_node
            .get(node)
            .map(|m| m.iter().map(|(c, e)| (c.clone(), *e)).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// One row per conn: the winning claim. Sorted by conn.
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self
            .claims
            .iter()
            .filter_map(|(conn, c)| {
                Self::winner(c).map(|(node, epoch)| Entry {
                    conn: conn.clone(),
                    node: node.to_string(),
                    epoch,
                })
            })
            .collect();
        v.sort_by(|a, b| a.conn.cmp(&b.conn));
        v
    }

    /// How many conns `node` claims, and whether it claims `conn` (the bound on a peer's
    /// claims applies to new ones only).
    pub fn claims_by(&self, node: &str, conn: &str) -> (usize, bool) {
        match self.by_node.get(node) {
            Some(m) => (m.len(), m.contains_key(conn)),
            None => (0, false),
        }
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
                    .and_then(|m| m.get(&conn))
                    .is_some_and(|&e| e >= epoch);
                if !stale {
                    self.insert(&conn, &node, epoch);
                }
                self.moved(&conn, before, &mut fx);
            }
            DirEvent::Disown { conn, node, epoch } => {
                let matches = self
                    .by_node
                    .get(&node)
                    .and_then(|m| m.get(&conn))
                    .is_some_and(|&e| e == epoch);
                if matches {
                    self.remove(&conn, &node);
                }
                // Removing a claim never takes ownership away from the local node.
            }
            DirEvent::NodeGone { node } => {
                if let Some(m) = self.by_node.remove(&node) {
                    for conn in m.keys() {
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
                for conn in old.keys() {
                    if !new.contains_key(conn) {
                        self.remove_from_claims(conn, &node);
                    }
                }
                for (conn, epoch) in new {
                    let before = self.local_owns(&conn);
                    self.insert(&conn, &node, epoch);
                    self.moved(&conn, before, &mut fx);
                }
            }
        }
        fx
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

    fn insert(&mut self, conn: &str, node: &str, epoch: u64) {
        self.claims
            .entry(conn.to_string())
            .or_default()
            .insert(node.to_string(), epoch);
        self.by_node
            .entry(node.to_string())
            .or_default()
            .insert(conn.to_string(), epoch);
    }

    fn remove(&mut self, conn: &str, node: &str) {
        if let Some(m) = self.by_node.get_mut(node) {
            m.remove(conn);
            if m.is_empty() {
                self.by_node.remove(node);
            }
        }
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
        let b: usize = self.by_node.values().map(|c| c.len()).sum();
        a == b
            && self.claims.values().all(|c| !c.is_empty())
            && self.by_node.values().all(|c| !c.is_empty())
            && self.by_node.iter().all(|(n, m)| {
                m.iter()
                    .all(|(c, e)| self.claims.get(c).and_then(|x| x.get(n)) == Some(e))
            })
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
