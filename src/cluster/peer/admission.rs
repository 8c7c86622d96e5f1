//! Which accepted sockets may wait in the handshake: a bounded table of pending handshakes
//! that a flood of idle sockets cannot fill against real peers.
//!
//! Anyone who reaches the cluster port can open sockets and send nothing; each waits up to
//! the handshake timeout before it is dropped. With a plain bound (refuse when full), 64
//! such sockets, reopened as they time out, kept every real peer out: no link, so no live
//! hand-off and no directory between nodes. The table makes that flood cost its sender:
//! - **A source address holds at most [`PER_SOURCE`] slots.** A newcomer over it takes the
//!   slot of that address's oldest pending socket: one host floods only itself, and a real
//!   peer sharing its address (NAT, the same machine) still gets in, its handshake being the
//!   newest for the few milliseconds it lasts.
//! - **When the table is full, a newcomer takes the oldest slot of the address holding the
//!   most**, so every new address gets in while any address holds more than one.
//! - **Configured peers' addresses are protected**: a socket from an address no configured
//!   peer has never takes a slot from one that is, so a flood from many other addresses
//!   cannot evict a real peer's handshake, only each other's.
//!
//! Pure: no sockets, no clock (the order of admission is the age). The caller keeps one
//! value `T` per slot (a cancel handle) and drops the socket of every evicted slot.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Pending handshakes per source address, at most.
pub(crate) const PER_SOURCE: usize = 8;

/// A slot's handle, to release it when its handshake ends.
pub(crate) type SlotId = u64;

/// The outcome of [`Admission::admit`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit<T> {
    /// The socket may run its handshake; `evicted` is the handle of the slot it took, whose
    /// socket the caller must drop.
    Yes { id: SlotId, evicted: Option<T> },
    /// Every slot is held by configured peers' addresses and the newcomer is not one.
    No,
}

struct Slot<T> {
    source: IpAddr,
    protected: bool,
    handle: T,
}

/// The pending-handshake table. It holds at most `capacity` slots (64 on the cluster
/// port), so a scan of them per accepted socket is cheap beside the socket itself.
pub(crate) struct Admission<T> {
    capacity: usize,
    next: SlotId,
    /// Slots in admission order (the id grows), so the first of a source is its oldest.
    slots: BTreeMap<SlotId, Slot<T>>,
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
            self.oldest_of(source)
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
                handle,
            },
        );
        *self.per_source.entry(source).or_insert(0) += 1;
        Admit::Yes { id, evicted }
    }

    /// Frees a slot (its handshake ended, or it was evicted); returns its handle if it was
    /// still held.
    pub fn release(&mut self, id: SlotId) -> Option<T> {
        let slot = self.slots.remove(&id)?;
        if let Some(n) = self.per_source.get_mut(&slot.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&slot.source);
            }
        }
        Some(slot.handle)
    }

    /// Pending handshakes held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    fn held_by(&self, source: IpAddr) -> usize {
        self.per_source.get(&source).copied().unwrap_or(0)
    }

    fn oldest_of(&self, source: IpAddr) -> Option<SlotId> {
        self.slots.iter().find(|(_, s)| s.source == source).map(|(id, _)| *id)
    }

    /// The slot a newcomer takes from a full table: the oldest of the source holding the
    /// most slots, among unprotected sources first; a protected source's only when the
    /// newcomer is protected too.
    fn victim(&self, newcomer_protected: bool) -> Option<SlotId> {
        let busiest = |protected: bool| {
            self.slots
                .values()
                .filter(|s| s.protected == protected)
                .map(|s| s.source)
                .max_by_key(|ip| (self.held_by(*ip), std::cmp::Reverse(self.oldest_of(*ip))))
        };
        let source = busiest(false).or_else(|| newcomer_protected.then(|| busiest(true)).flatten())?;
        self.oldest_of(source)
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
}
