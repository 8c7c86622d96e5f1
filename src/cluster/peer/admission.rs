//! Which accepted sockets may wait in the handshake: a bounded table of pending handshakes
//! that a flood of idle sockets cannot fill against real peers.
//!
//! Anyone who reaches the cluster port can open sockets and send nothing; each waits up to
//! the handshake timeout before it is dropped. With a plain bound (refuse when full), 64
//! such sockets, reopened as they time out, kept every real peer out: no link, so no live
//! hand-off and no directory between nodes. The table makes that flood cost its sender:
//! - **A source address holds at most [`PER_SOURCE`] unnamed slots.** A newcomer over it
//!   takes the slot of that address's oldest unnamed socket: one host floods only itself.
//! - **A slot whose `Hello` named a configured peer is named** ([`Admission::name`]), and no
//!   newcomer takes it from its source's share: a real peer sharing its address with a flood
//!   (NAT, the same machine, every node on loopback, a container gateway) keeps its handshake
//!   however fast the flood reconnects. Before, its handshake became its address's oldest
//!   within milliseconds and was evicted, so once its links dropped none came back.
//! - **A named slot gains standing once its handshake proves the secret** ([`Admission::prove`]:
//!   the acceptor opened the dialer's first Noise message); until then a `Hello`, sent in
//!   clear, proves nothing (node ids are no secret: every acceptor sends its own). A source
//!   holds at most [`NAMED_PER_PEER`] named slots per peer id and [`NAMED_PER_SOURCE`] in
//!   all; a `Hello` past either takes the oldest *unproven* named slot in its way (naming
//!   that peer; past the source's bound, naming the peer it names most), never a proven one,
//!   and stays unnamed, in its source's share, if every one is proven. So `Hello`s that stall
//!   after naming a peer keep it out no longer than its next dial: its `Hello` takes the
//!   oldest of them. Before, a `Hello` past the bound stayed unnamed behind them, and a flood
//!   of idle sockets from the address evicted it before its Noise round trip ended: the link
//!   never came up. (Before that, each newer `Hello` replaced the older: looping them evicted
//!   the peer's handshake within every round trip.) What remains: a host sharing the peer's
//!   address that sends [`NAMED_PER_PEER`] `Hello`s naming it between the peer's `Hello` and
//!   its first Noise message (about one round trip) still evicts that handshake.
//! - **When the table is full, a newcomer takes the oldest unnamed slot of the address
//!   holding the most**, so every new address gets in while any address holds more than one.
//! - **Configured peers' addresses are protected**: a socket from an address no configured
//!   peer has never takes a slot from one that is (it may take another such address's named
//!   slot), so a flood from many other addresses cannot evict a real peer's handshake, only
//!   each other's. A socket from
//!   a peer's address may take, in this order, another address's unnamed then named slot,
//!   then a peer address's unnamed slot; never a peer address's named slot.
//!
//! Pure: no sockets, no clock (the order of admission is the age). The caller keeps one
//! value `T` per slot (a cancel handle) and drops the socket of every evicted slot.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Pending unnamed handshakes per source address, at most.
pub(crate) const PER_SOURCE: usize = 8;

/// Pending handshakes one source address may hold named for one peer id, at most: a real
/// peer has one dial under way at a time (two while a stalled one times out); past it the
/// oldest unproven one gives way.
pub(crate) const NAMED_PER_PEER: usize = 4;

/// Pending handshakes one source address may hold named, at most, for every peer id
/// together: a quarter of the cluster port's table (64), so one address (its named and its
/// [`PER_SOURCE`] unnamed slots) cannot fill it, and room for 16 peers sharing an address
/// (every node on one host) to dial at once. Past it the oldest unproven slot naming the
/// peer the address names most gives way.
pub(crate) const NAMED_PER_SOURCE: usize = 16;

/// A slot's handle, to release it when its handshake ends.
pub(crate) type SlotId = u64;

/// The outcome of [`Admission::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<T> {
    /// The socket may run its handshake; `evicted` is the handle of the slot it took, whose
    /// socket the caller must drop.
    Yes { id: SlotId, evicted: Option<T> },
    /// Every slot this newcomer may take is held: by configured peers' addresses (and it is
    /// not one), or named.
    No,
}

/// The outcome of [`Admission::name`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Named<T> {
    /// The slot is named; `evicted` is the handle of the unproven named slot it took, whose
    /// socket the caller must drop.
    Yes { evicted: Option<T> },
    /// The slot stays unnamed: no longer held, named already, or every named slot in its
    /// way is proven.
    No,
}

struct Slot<T> {
    source: IpAddr,
    protected: bool,
    /// The configured peer its `Hello` named, once it did.
    named: Option<String>,
    /// Its handshake proved the secret ([`Admission::prove`]): no `Hello` and no newcomer
    /// takes it.
    proven: bool,
    handle: T,
}

/// The pending-handshake table. It holds at most `capacity` slots (64 on the cluster
/// port), so a scan of them per accepted socket is cheap beside the socket itself.
pub(crate) struct Admission<T> {
    capacity: usize,
    next: SlotId,
    /// Slots in admission order (the id grows), so the first of a source is its oldest.
    slots: BTreeMap<SlotId, Slot<T>>,
    /// Unnamed slots per source: the share [`PER_SOURCE`] bounds.
    per_source: HashMap<IpAddr, usize>,
}

impl<T> Admission<T> {
    pub fn new(capacity: usize) -> Self {
        Admission {
            capacity: capacity.max(1),
            next: 0,
            slots: BTreeMap::new(),
            per_source: HashMap::new(),
        }
    }

    /// Admits a socket from `source` (`protected`: a configured peer's address), evicting
    /// another pending socket if the table or the source's share is full.
    pub fn admit(&mut self, source: IpAddr, protected: bool, handle: T) -> Admit<T> {
        let source = source.to_canonical();
        let evicted = if self.held_by(source) >= PER_SOURCE {
            self.oldest_unnamed_of(source)
        } else if self.slots.len() >= self.capacity {
            match self.victim(protected) {
                Some(id) => Some(id),
                None => return Admit::No,
            }
        } else {
            None
        };
        let evicted = evicted.and_then(|id| self.release(id));
        let id = self.next;
        self.next += 1;
        self.slots.insert(
            id,
            Slot {
                source,
                protected,
                named: None,
                proven: false,
                handle,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        Admit::Yes { id, evicted }
    }

    /// Marks slot `id` as named: its `Hello` named `peer`, a configured node of this
    /// cluster. It leaves its source's share, so a flood of newer sockets from the same
    /// address no longer evicts it. If that source holds [`NAMED_PER_PEER`] slots named
    /// `peer`, the oldest unproven of them gives way; else if it holds [`NAMED_PER_SOURCE`]
    /// named slots, the oldest unproven naming the peer it names most (ties: the older).
    /// If every one in the way is proven, the slot stays unnamed ([`Named::No`]).
    pub fn name(&mut self, id: SlotId, peer: &str) -> Named<T> {
        let source = match self.slots.get(&id) {
            Some(slot) if slot.named.is_none() => slot.source,
            _ => return Named::No,
        };
        // Per peer id this source names: its named slots, and its oldest unproven one.
        let mut named: HashMap<&str, (usize, Option<SlotId>)> = HashMap::new();
        let mut all = 0;
        for (sid, s) in self.slots.iter().filter(|(_, s)| s.source == source) {
            if let Some(p) = s.named.as_deref() {
                all += 1;
                let e = named.entry(p).or_insert((0, None));
                e.0 += 1;
                if !s.proven && e.1.is_none() {
                    e.1 = Some(*sid);
                }
            }
        }
        let in_way = match named.get(peer) {
            Some(&(n, oldest)) if n >= NAMED_PER_PEER => Some(oldest),
            _ if all >= NAMED_PER_SOURCE => Some(
                named
                    .values()
                    .filter_map(|&(n, oldest)| Some((n, oldest?)))
                    .max_by_key(|&(n, oldest)| (n, Reverse(oldest)))
                    .map(|(_, oldest)| oldest),
            ),
            _ => None,
        };
        let evicted = match in_way {
            None => None,
            Some(None) => return Named::No,
            Some(Some(victim)) => self.release(victim),
        };
        self.leave_share(source);
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.named = Some(peer.to_string());
        }
        Named::Yes { evicted }
    }

    /// Marks named slot `id` as proven: its handshake proved the secret, so no newer `Hello`
    /// and no newcomer takes it. False if `id` is no longer held or not named.
    pub fn prove(&mut self, id: SlotId) -> bool {
        match self.slots.get_mut(&id) {
            Some(slot) if slot.named.is_some() => {
                slot.proven = true;
                true
            }
            _ => false,
        }
    }

    /// Frees a slot (its handshake ended, or it was evicted); returns its handle if it was
    /// still held.
    pub fn release(&mut self, id: SlotId) -> Option<T> {
        let slot = self.slots.remove(&id)?;
        if slot.named.is_none() {
            self.leave_share(slot.source);
        }
        Some(slot.handle)
    }

    /// Pending handshakes held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Unnamed slots held by `source`: its share.
    fn held_by(&self, source: IpAddr) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    /// Takes one unnamed slot off `source`'s share.
    fn leave_share(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    fn oldest_unnamed_of(&self, source: IpAddr) -> Option<SlotId> {
        self.slots
            .iter()
            .find(|(_, s)| s.source == source && s.named.is_none())
            .map(|(id, _)| *id)
    }

    /// The slot a newcomer takes from a full table: unnamed slots of unprotected sources
    /// first, then their named slots; then, for a protected newcomer only, unnamed slots of
    /// protected ones. Never a proven slot, nor a protected source's named slot: that may be a real peer's
    /// handshake under way, and only its own end (proof, refusal, the handshake timeout)
    /// ends it. An unprotected newcomer may take an unprotected
    /// named slot: a `Hello` naming a peer proves nothing yet, and else stalled `Hello`s from
    /// many addresses that are no peer's filled the table for good, and a real peer dialing
    /// from an address other than its configured one (a pod behind a service address, NAT)
    /// was refused every time.
    fn victim(&self, newcomer_protected: bool) -> Option<SlotId> {
        // (protected, named) of the slots each tier holds, in the order they are taken.
        let tiers: &[(bool, bool)] = if newcomer_protected {
            &[(false, false), (false, true), (true, false)]
        } else {
            &[(false, false), (false, true)]
        };
        tiers.iter().find_map(|&(protected, named)| {
            self.oldest_of_busiest(|s| s.protected == protected && s.named.is_some() == named && !s.proven)
        })
    }

    /// Among the slots `in_tier`, the oldest of the source holding the most of them; a tie
    /// goes to the source whose oldest is older.
    fn oldest_of_busiest(&self, in_tier: impl Fn(&Slot<T>) -> bool) -> Option<SlotId> {
        // Per source: slots in the tier and the oldest of them (ids come in admission order).
        let mut held: HashMap<IpAddr, (usize, SlotId)> = HashMap::new();
        for (id, slot) in self.slots.iter().filter(|(_, s)| in_tier(s)) {
            held.entry(slot.source).or_insert((0, *id)).0 += 1;
        }
        held.into_values()
            .max_by_key(|&(n, oldest)| (n, Reverse(oldest)))
            .map(|(_, oldest)| oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn admitted(a: Admit<u32>) -> (SlotId, Option<u32>) {
        match a {
            Admit::Yes { id, evicted } => (id, evicted),
            Admit::No => panic!("refused"),
        }
    }

    /// Names slot `id`, taking no other slot: whether it is named.
    fn named(t: &mut Admission<u32>, id: SlotId, peer: &str) -> bool {
        match t.name(id, peer) {
            Named::Yes { evicted } => {
                assert_eq!(evicted, None, "naming {id} took another named slot");
                true
            }
            Named::No => false,
        }
    }

    #[test]
    fn a_source_over_its_share_evicts_its_own_oldest() {
        let mut t = Admission::new(64);
        for h in 0..PER_SOURCE as u32 {
            assert_eq!(admitted(t.admit(ip(1), false, h)).1, None);
        }
        // The next from the same source takes its oldest slot, never another source's.
        t.admit(ip(2), false, 100);
        assert_eq!(admitted(t.admit(ip(1), false, 8)).1, Some(0));
        assert_eq!(admitted(t.admit(ip(1), false, 9)).1, Some(1));
        assert_eq!(t.len(), PER_SOURCE + 1);
    }

    #[test]
    fn a_full_table_evicts_from_the_busiest_source_and_spares_peers() {
        let mut t = Admission::new(8);
        let peer = ip(9);
        let (peer_slot, _) = admitted(t.admit(peer, true, 900));
        for h in 0..4 {
            t.admit(ip(1), false, 100 + h);
        }
        for h in 0..3 {
            t.admit(ip(2), false, 200 + h);
        }
        assert_eq!(t.len(), 8);
        // The busiest unprotected source (ip 1, 4 slots) loses its oldest.
        assert_eq!(admitted(t.admit(ip(3), false, 300)).1, Some(100));
        // Ties (3 and 3) go to the source whose oldest slot is older: ip 1's 101 predates
        // ip 2's 200.
        assert_eq!(admitted(t.admit(ip(3), false, 301)).1, Some(101));
        assert_eq!(admitted(t.admit(ip(4), false, 400)).1, Some(200));
        // Many newcomers from other sources never take the configured peer's slot.
        for h in 0..50 {
            let (_, evicted) = admitted(t.admit(ip(100 + h), false, 1000 + h as u32));
            assert_ne!(evicted, Some(900));
        }
        assert_eq!(
            t.release(peer_slot),
            Some(900),
            "the peer's handshake was never evicted"
        );
    }

    #[test]
    fn only_a_peer_may_evict_a_peer() {
        let mut t = Admission::new(2);
        t.admit(ip(1), true, 1);
        t.admit(ip(2), true, 2);
        assert_eq!(t.admit(ip(3), false, 3), Admit::No);
        assert_eq!(
            admitted(t.admit(ip(2), true, 4)).1,
            Some(1),
            "the oldest of the busiest"
        );
    }

    /// A peer sharing its address with a flood (every node on loopback, NAT, a container
    /// gateway): before, its handshake became that address's oldest slot within
    /// milliseconds and the flood evicted it, so the peer never linked again. Once its
    /// `Hello` named a configured peer, only unnamed sockets of the flood are evicted.
    #[test]
    fn a_named_slot_outlasts_a_flood_from_its_own_address() {
        let mut t = Admission::new(64);
        let shared_ip = ip(1);
        for h in 0..PER_SOURCE as u32 {
            admitted(t.admit(shared_ip, true, h));
        }
        // The peer's socket: over the share, it takes the oldest idle slot, then names n1.
        let (peer_slot, evicted) = admitted(t.admit(shared_ip, true, 900));
        assert_eq!(evicted, Some(0));
        assert!(named(&mut t, peer_slot, "n1"));
        // Named, it left the share: the first idle socket takes its place there, and every
        // later one evicts the oldest idle socket.
        assert_eq!(admitted(t.admit(shared_ip, true, 1000)).1, None);
        for h in 1..10 * PER_SOURCE as u32 {
            let (_, evicted) = admitted(t.admit(shared_ip, true, 1000 + h));
            assert!(
                evicted.is_some_and(|e| e != 900),
                "an idle socket is evicted in its place, not {evicted:?}"
            );
        }
        assert_eq!(t.len(), PER_SOURCE + 1, "the share still bounds the unnamed ones");
        assert_eq!(t.release(peer_slot), Some(900), "the named handshake was never evicted");
    }

    /// A `Hello` is sent in clear: anyone sharing a peer's address can send one naming it
    /// (node ids are no secret). Before, each newer one replaced the older named slot, so a
    /// loop of them evicted the peer's handshake within every round trip and the link never
    /// came up. Now a `Hello` past the source's room for that peer never takes a proven slot:
    /// its socket stays unnamed, in its source's share, and newer sockets evict it.
    #[test]
    fn an_unproven_hello_never_evicts_a_proven_slot() {
        let mut t = Admission::new(64);
        let real = admitted(t.admit(ip(1), true, 900)).0;
        assert!(named(&mut t, real, "n2"));
        assert!(t.prove(real));
        for h in 1..NAMED_PER_PEER as u32 {
            let id = admitted(t.admit(ip(1), true, 900 + h)).0;
            assert!(named(&mut t, id, "n2"), "room for {NAMED_PER_PEER} naming n2");
            assert!(t.prove(id));
        }
        // A flood of `Hello`s naming n2 from the same address: none is named, none evicts a
        // proven slot; they evict each other within the address's unnamed share.
        for h in 0..10 * PER_SOURCE as u32 {
            let (id, evicted) = admitted(t.admit(ip(1), true, h));
            assert!(!named(&mut t, id, "n2"), "no room left for n2 at this address");
            assert!(
                !matches!(evicted, Some(e) if e >= 900),
                "an unnamed socket of the flood is evicted, not {evicted:?}"
            );
        }
        assert_eq!(t.len(), NAMED_PER_PEER + PER_SOURCE);
        // Another peer id or another address has room of its own.
        let other_peer = admitted(t.admit(ip(1), true, 50)).0;
        assert!(named(&mut t, other_peer, "n3"));
        let other_source = admitted(t.admit(ip(2), true, 51)).0;
        assert!(named(&mut t, other_source, "n2"));
        assert!(!named(&mut t, other_source, "n3"), "named once");
        assert_eq!(
            t.release(real),
            Some(900),
            "the first handshake naming n2 was never evicted"
        );
        // Its end makes room for the next `Hello` naming n2.
        let next = admitted(t.admit(ip(1), true, 60)).0;
        assert!(named(&mut t, next, "n2"));
        assert!(!named(&mut t, real, "n2"), "no longer held");
        assert!(!t.prove(real), "no longer held");
        assert!(!t.prove(other_peer - 1), "not named");
        for id in [next, other_peer, other_source] {
            assert!(t.release(id).is_some());
        }
    }

    #[test]
    fn named_slots_leave_the_share_once() {
        let mut t = Admission::new(64);
        let a = admitted(t.admit(ip(1), true, 1)).0;
        let b = admitted(t.admit(ip(1), true, 2)).0;
        assert!(named(&mut t, a, "n1"));
        assert!(named(&mut t, b, "n1"));
        assert!(!named(&mut t, a, "n1"), "named once");
        for id in [a, b] {
            assert!(t.release(id).is_some());
        }
        assert_eq!(t.len(), 0);
        assert!(t.per_source.is_empty(), "a named slot left its share once");
    }

    #[test]
    fn a_full_table_gives_named_slots_only_to_a_peers_address() {
        let mut t = Admission::new(3);
        let stranger = admitted(t.admit(ip(1), false, 1)).0;
        let peer = admitted(t.admit(ip(9), true, 2)).0;
        admitted(t.admit(ip(9), true, 3));
        named(&mut t, stranger, "n1");
        named(&mut t, peer, "n1");
        // A peer's address takes a stranger's named slot before its own unnamed one...
        assert_eq!(admitted(t.admit(ip(8), true, 5)).1, Some(1));
        // ...then the unnamed ones, and never a peer address's named slot.
        assert_eq!(admitted(t.admit(ip(8), true, 6)).1, Some(3));
        assert_eq!(admitted(t.admit(ip(8), true, 7)).1, Some(5));
        assert_eq!(admitted(t.admit(ip(8), true, 8)).1, Some(6));
        // Named, or a peer's address: nothing a stranger may take but a stranger's.
        assert_eq!(t.admit(ip(2), false, 9), Admit::No);
        assert_eq!(t.release(peer), Some(2));
    }

    /// Stalled `Hello`s naming peers, from addresses that are no peer's, do not fill the
    /// table for good: a newcomer from another such address (a real peer dialing from an
    /// address other than its configured one) takes the oldest of them.
    #[test]
    fn named_slots_of_strangers_do_not_lock_the_table() {
        let mut t = Admission::new(4);
        for i in 0..4u8 {
            let id = admitted(t.admit(ip(i + 1), false, u32::from(i))).0;
            named(&mut t, id, "n1");
        }
        assert_eq!(admitted(t.admit(ip(50), false, 99)).1, Some(0));
    }

    #[test]
    fn release_frees_the_slot_and_the_share() {
        let mut t = Admission::new(64);
        let ids: Vec<SlotId> = (0..PER_SOURCE as u32)
            .map(|h| admitted(t.admit(ip(1), false, h)).0)
            .collect();
        assert_eq!(t.release(ids[3]), Some(3));
        assert_eq!(t.release(ids[3]), None, "released once");
        assert_eq!(admitted(t.admit(ip(1), false, 50)).1, None, "the share has room again");
        // IPv4-mapped IPv6 is the same source as its IPv4 form.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(admitted(t.admit(mapped, false, 51)).1, Some(0));
        for id in ids {
            t.release(id);
        }
        t.release(PER_SOURCE as SlotId);
        t.release(PER_SOURCE as SlotId + 1);
        assert_eq!(t.len(), 0);
        assert!(t.per_source.is_empty());
    }

    /// `Hello`s from a peer's address that named it and then stalled (held open until the
    /// handshake timeout, reopened) keep it out no longer: the peer's `Hello` takes the
    /// oldest of them. Before, it stayed unnamed behind them, and a flood of idle sockets from
    /// the address evicted it before its Noise round trip ended: the link never came up.
    #[test]
    fn a_hello_takes_the_oldest_unproven_slot_naming_its_peer() {
        let mut t = Admission::new(64);
        let stalled: Vec<SlotId> = (0..NAMED_PER_PEER as u32)
            .map(|h| {
                let id = admitted(t.admit(ip(1), true, h)).0;
                assert!(named(&mut t, id, "n1"));
                id
            })
            .collect();
        let real = admitted(t.admit(ip(1), true, 900)).0;
        assert_eq!(
            t.name(real, "n1"),
            Named::Yes { evicted: Some(0) },
            "the oldest gives way"
        );
        // A flood of idle sockets from the address does not take it.
        for h in 0..10 * PER_SOURCE as u32 {
            let (_, evicted) = admitted(t.admit(ip(1), true, 1000 + h));
            assert!(!matches!(evicted, Some(e) if e < 1000), "{evicted:?}");
        }
        // Proven, no `Hello` takes it: the stalled ones give way in their order, then none.
        assert!(t.prove(real));
        for h in 1..NAMED_PER_PEER as u32 {
            let id = admitted(t.admit(ip(1), true, 100 + h)).0;
            assert_eq!(t.name(id, "n1"), Named::Yes { evicted: Some(h) });
            assert!(t.prove(id));
        }
        let late = admitted(t.admit(ip(1), true, 200)).0;
        assert_eq!(t.name(late, "n1"), Named::No, "every slot naming n1 is proven");
        assert_eq!(t.release(real), Some(900));
        assert!(t.release(stalled[0]).is_none(), "taken");
    }

    /// One address cannot fill the table with named slots: 64 pending handshakes naming 16
    /// peers (4 each) from one address (every node on loopback) refused every other address.
    /// Past [`NAMED_PER_SOURCE`] a `Hello` takes the oldest unproven slot naming the peer the
    /// address names most, so a flood naming other peers keeps no peer out either.
    #[test]
    fn a_source_holds_at_most_its_named_slots() {
        let mut t = Admission::new(64);
        let peers: Vec<String> = (0..NAMED_PER_SOURCE).map(|p| format!("n{p}")).collect();
        let mut h = 0;
        for _ in 0..NAMED_PER_PEER {
            for p in &peers {
                let id = admitted(t.admit(ip(1), true, h)).0;
                h += 1;
                let r = t.name(id, p);
                if id < NAMED_PER_SOURCE as SlotId {
                    assert_eq!(r, Named::Yes { evicted: None });
                } else {
                    // Every peer has one: the oldest gives way.
                    assert_eq!(
                        r,
                        Named::Yes {
                            evicted: Some(h - 1 - NAMED_PER_SOURCE as u32)
                        }
                    );
                }
            }
        }
        // Named and unnamed together, one address holds a bounded part of the table.
        for _ in 0..PER_SOURCE {
            admitted(t.admit(ip(1), true, h));
            h += 1;
        }
        assert_eq!(t.len(), NAMED_PER_SOURCE + PER_SOURCE);
        for a in 2..=40 {
            assert!(matches!(t.admit(ip(a), true, 5000), Admit::Yes { evicted: None, .. }));
        }
        // Past the bound, the peer named most gives way first: a peer named once keeps its
        // slot while another is named more.
        let mut t = Admission::new(64);
        let real = admitted(t.admit(ip(1), true, 900)).0;
        assert!(named(&mut t, real, "n1"));
        for h in 0..NAMED_PER_SOURCE as u32 - 1 {
            let id = admitted(t.admit(ip(1), true, h)).0;
            assert!(named(&mut t, id, &format!("p{}", h % 4)));
        }
        for h in 0..4 * NAMED_PER_SOURCE as u32 {
            let id = admitted(t.admit(ip(1), true, 100 + h)).0;
            let Named::Yes { evicted } = t.name(id, &format!("p{}", h % 4)) else {
                panic!("an unproven slot gives way");
            };
            assert!(evicted.is_some_and(|e| e != 900), "{evicted:?}");
        }
        assert_eq!(t.release(real), Some(900), "n1's handshake was never taken");
        // Proven, none gives way.
        let mut t = Admission::new(64);
        for h in 0..NAMED_PER_SOURCE as u32 {
            let id = admitted(t.admit(ip(1), true, h)).0;
            assert!(named(&mut t, id, &format!("p{h}")));
            assert!(t.prove(id));
        }
        let id = admitted(t.admit(ip(1), true, 99)).0;
        assert_eq!(t.name(id, "n1"), Named::No);
    }

    /// A newcomer to a full table never takes a proven slot, even a stranger's.
    #[test]
    fn a_full_table_spares_proven_slots() {
        let mut t = Admission::new(2);
        let a = admitted(t.admit(ip(1), false, 1)).0;
        let b = admitted(t.admit(ip(2), false, 2)).0;
        assert!(named(&mut t, a, "n1"));
        assert!(named(&mut t, b, "n1"));
        assert!(t.prove(a));
        let (c, evicted) = admitted(t.admit(ip(3), false, 3));
        assert_eq!(evicted, Some(2), "the unproven one");
        assert!(!t.prove(b), "taken");
        assert!(named(&mut t, c, "n1"));
        assert!(t.prove(c));
        assert_eq!(t.admit(ip(4), false, 4), Admit::No);
    }
}
