//! The room a peer's hand-offs take on this node while they wait for their sessions
//! ([`crate::cluster::Held`]).
//!
//! A `Deliver` frame's messages wait on this node until the wallet's session takes them, and a
//! session writing to a slow socket takes them late. Each peer gets a budget of
//! [`DELIVER_BUDGET_FRAMES`] frames (`max_frame` each), kept across its links (a peer that
//! reconnects does not get a fresh one while its old link's hand-offs still wait), and one
//! connection may hold [`CONN_SHARE_FRAMES`] of it: a frame for a connection already holding
//! its share is refused (its messages released to the store, the wallet woken) rather than
//! waited for, so one slow wallet does not stop the link for every other. Only when the whole
//! budget is spent, many sessions slow at once, does the link wait.
//!
//! Must not: give room back before the hand-off holding it is done (the caller drops
//! [`crate::cluster::Held`] then); count a connection's room after it was given back; let a
//! peer hold more than its budget.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Frames of `Deliver` messages one peer may have waiting on this node for their sessions, in
/// `max_frame`s.
pub(crate) const DELIVER_BUDGET_FRAMES: usize = 8;
/// Frames of that budget one connection may hold.
pub(crate) const CONN_SHARE_FRAMES: usize = 2;
/// What a message of a `Deliver` frame takes on this node beside its payload, its recipient
/// key and its copy of the connection id (its record, the vector's slot): a frame of many
/// empty messages is not free.
pub(crate) const HELD_PER_MESSAGE: usize = 128;

/// The bytes the messages `msgs` of a `Deliver` frame for `conn` take on this node while they
/// wait for their session: payloads, recipient keys, and per message [`HELD_PER_MESSAGE`] and
/// the connection id, which the node copies into every message it makes of them (a peer's
/// frame of many empty messages for a 128-byte id is not 128 bytes).
pub(crate) fn held_bytes(conn: &str, msgs: &[crate::cluster::proto::HandedMsg]) -> usize {
    msgs.iter().fold(0usize, |n, m| {
        n.saturating_add(m.payload.len())
            .saturating_add(m.recipient_key.len())
            .saturating_add(conn.len())
            .saturating_add(HELD_PER_MESSAGE)
    })
}

/// One peer's budget.
pub(crate) struct PeerRoom {
    room: Arc<Semaphore>,
    /// Bytes held per connection (entries removed at zero).
    by_conn: Mutex<HashMap<String, usize>>,
    budget: usize,
    share: usize,
}

/// Why a frame gets no room now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// Its connection holds its share already: refuse the frame.
    ConnFull,
    /// The budget is spent: wait.
    Spent,
}

impl PeerRoom {
    pub fn new(max_frame: usize) -> Arc<PeerRoom> {
        PeerRoom::sized(max_frame, DELIVER_BUDGET_FRAMES, CONN_SHARE_FRAMES)
    }

    /// A budget of `frames` units of `unit` bytes, `share_frames` of which one connection may hold.
    pub fn sized(unit: usize, frames: usize, share_frames: usize) -> Arc<PeerRoom> {
        let budget = frames * unit;
        Arc::new(PeerRoom {
            room: Arc::new(Semaphore::new(budget)),
            by_conn: Mutex::default(),
            budget,
            share: share_frames * unit,
        })
    }

    /// The room `bytes` of a frame take in this budget (never more than all of it).
    pub fn need(&self, bytes: usize) -> usize {
        bytes.clamp(1, self.budget)
    }

    /// Room for `need` bytes of `conn` now, if its share and the budget have it.
    pub fn try_take(self: &Arc<Self>, conn: &str, need: usize) -> Result<HeldRoom, NoRoom> {
        if self.held_by(conn) > 0 && self.held_by(conn) + need > self.share {
            return Err(NoRoom::ConnFull);
        }
        match self.room.clone().try_acquire_many_owned(need as u32) {
            Ok(p) => Ok(self.held(conn, need, p)),
            Err(_) => Err(NoRoom::Spent),
        }
    }

    /// Room for `need` bytes of `conn`, once the budget has it (the caller checked the share).
    pub async fn take(self: &Arc<Self>, conn: &str, need: usize) -> HeldRoom {
        let p = self
            .room
            .clone()
            .acquire_many_owned(need as u32)
            .await
            .expect("the semaphore is never closed");
        self.held(conn, need, p)
    }

    fn held_by(&self, conn: &str) -> usize {
        self.by_conn.lock().get(conn).copied().unwrap_or(0)
    }

    fn held(self: &Arc<Self>, conn: &str, bytes: usize, permit: OwnedSemaphorePermit) -> HeldRoom {
        *self.by_conn.lock().entry(conn.to_owned()).or_default() += bytes;
        HeldRoom {
            _permit: permit,
            room: self.clone(),
            conn: conn.to_owned(),
            bytes,
        }
    }

    /// Bytes held now, all connections (tests).
    #[cfg(test)]
    fn held_now(&self) -> usize {
        self.budget - self.room.available_permits()
    }
}

/// Room held by one frame's messages; given back (to the budget and the connection's share)
/// when dropped.
pub(crate) struct HeldRoom {
    _permit: OwnedSemaphorePermit,
    room: Arc<PeerRoom>,
    conn: String,
    pub bytes: usize,
}

impl Drop for HeldRoom {
    fn drop(&mut self) {
        let mut by_conn = self.room.by_conn.lock();
        if let Some(n) = by_conn.get_mut(&self.conn) {
            *n = n.saturating_sub(self.bytes);
            if *n == 0 {
                by_conn.remove(&self.conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_holds_its_share_and_the_budget_bounds_them_all() {
        let r = PeerRoom::new(100);
        // One connection: a first frame always fits (up to the budget), then up to its share.
        let a1 = r.try_take("a", 150).unwrap();
        let a2 = r.try_take("a", 50).unwrap();
        assert_eq!(r.try_take("a", 1).err(), Some(NoRoom::ConnFull));
        // Others take the rest of the budget, then wait.
        let others: Vec<HeldRoom> = (0..3).map(|i| r.try_take(&format!("c{i}"), 200).unwrap()).collect();
        assert_eq!(r.held_now(), 800);
        assert_eq!(r.try_take("d", 1).err(), Some(NoRoom::Spent));
        // Given back, the room and the share come back.
        drop(a1);
        assert_eq!(r.held_now(), 650);
        assert!(r.try_take("a", 150).is_ok());
        drop((a2, others));
        assert_eq!(r.held_now(), 0);
        assert!(
            r.by_conn.lock().is_empty(),
            "no entry left for a connection holding nothing"
        );
    }

    /// Every message is counted with its own copy of the connection id: the node clones it
    /// into each (`node.rs`, the `Delivered` event), so 1,000 empty messages for a 128-byte id
    /// hold 128 KB of ids beside their records.
    #[test]
    fn a_deliver_frame_is_counted_with_the_connection_id_of_every_message() {
        let msg = |payload: usize, key: &str| crate::cluster::proto::HandedMsg {
            id: 1,
            recipient_key: key.into(),
            payload: vec![0; payload],
            received_at_ms: 1,
        };
        let conn = "c".repeat(128);
        assert_eq!(held_bytes(&conn, &[]), 0);
        assert_eq!(held_bytes(&conn, &[msg(10, "key")]), 10 + 3 + 128 + HELD_PER_MESSAGE);
        let empty: Vec<_> = (0..1000).map(|_| msg(0, "")).collect();
        assert_eq!(held_bytes(&conn, &empty), 1000 * (128 + HELD_PER_MESSAGE));
        assert_eq!(held_bytes("c", &empty), 1000 * (1 + HELD_PER_MESSAGE));
    }

    #[test]
    fn a_frame_larger_than_the_budget_takes_all_of_it() {
        let r = PeerRoom::new(10);
        assert_eq!(r.need(1_000_000), 80);
        assert_eq!(r.need(0), 1);
    }
}
