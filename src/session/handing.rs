//! The task that runs one connection's hand-offs ([`super::Shared::hand_off_in_order`]): which
//! of those waiting it joins into one, and what becomes of those it leaves when it is dropped.
//!
//! Must not: join hand-offs for two nodes; join more than a batch of messages; join for a peer
//! more than one `Deliver` frame carries (the frame would be refused at the link and every
//! message of it released, where each hand-off alone would have been sent); leave the
//! hand-offs of a dropped runner leased to nobody while a runtime can still give them back.

use super::Shared;
use crate::cluster::{proto, Held};
use crate::protocols::Handed;
use crate::store::QueuedMessage;
use std::collections::VecDeque;
use std::sync::Arc;

/// A hand-off waiting its turn, with the room its messages hold in their link's budget when
/// a peer sent them ([`crate::cluster::ClusterEvent::Delivered`]): given back once the hand-off
/// is done, not when it is taken off the queue.
pub(super) struct Entry {
    pub h: Handed,
    pub held: Vec<Held>,
    /// Found no room ([`crate::cluster::Room`]): its messages (payloads dropped) go back to the
    /// queue in their turn, after the hand-offs entered before them, instead of being handed.
    pub release: bool,
}

impl Entry {
    /// A hand-off of `h` holding `held`.
    pub fn hand(h: Handed, held: Vec<Held>) -> Entry {
        Entry {
            h,
            held,
            release: false,
        }
    }

    /// A hand-off that found no room: its messages' ids only, to release in their turn.
    pub fn release(mut h: Handed) -> Entry {
        for m in &mut h.msgs {
            m.payload = Vec::new();
            m.recipient_key = String::new();
        }
        Entry {
            h,
            held: Vec::new(),
            release: true,
        }
    }
}

/// How far the runner joins consecutive hand-offs of one connection for the same node.
pub(super) struct Join<'a> {
    /// This node: a hand-off to it goes to a session here, in no frame.
    pub local_node: &'a str,
    /// Messages in one hand-off, at most (`delivery.batch_size`, at least 1).
    pub batch: usize,
    /// The cluster's frame limit (`cluster.max_frame`); `None` without a cluster.
    pub max_frame: Option<usize>,
}

impl Join<'_> {
    /// The first hand-off of `waiting` with those right after it that join it, taken out of
    /// `waiting`, in order; `None` when nothing waits.
    pub fn take(&self, waiting: &mut VecDeque<Entry>) -> Option<Entry> {
        let mut e = waiting.pop_front()?;
        let mut bytes = carried(&e.h.msgs);
        while let Some(next) = waiting.front() {
            let more = carried(&next.h.msgs);
            let msgs = e.h.msgs.len() + next.h.msgs.len();
            if next.release != e.release
                || next.h.node != e.h.node
                || !self.fits(&e.h.node, msgs, bytes.saturating_add(more))
            {
                break;
            }
            let next = waiting.pop_front().expect("front checked");
            e.h.msgs.extend(next.h.msgs);
            e.held.extend(next.held);
            bytes = bytes.saturating_add(more);
        }
        Some(e)
    }

    /// Whether one hand-off to `node` may hold `msgs` messages that carry `bytes`
    /// ([`carried`]): a batch at most, and for a peer one frame at most.
    fn fits(&self, node: &str, msgs: usize, bytes: usize) -> bool {
        if msgs > self.batch {
            return false;
        }
        if node == self.local_node {
            return true;
        }
        self.max_frame
            .map_or(true, |max| proto::deliver_len_at_most(msgs, bytes) <= max)
    }
}

/// Hand-offs a runner left when it was dropped before its run ended: handed back
/// ([`Shared::hand_back`]: released, their wallet woken) in a task on the system arbiter,
/// which outlives the HTTP workers' arbiters and runs what a wake-up spawns. With no system
/// left (the node is stopping), they wait for their lease to run out.
pub(super) fn hand_back_abandoned(shared: Arc<Shared>, left: VecDeque<Entry>) {
    if left.is_empty() {
        return;
    }
    let messages: usize = left.iter().map(|e| e.h.msgs.len()).sum();
    // Only their ids are needed now: their payloads (and their room) go at once.
    let left: Vec<(String, String, Vec<i64>)> = left
        .into_iter()
        .map(|e| (e.h.node, e.h.conn, e.h.msgs.iter().map(|m| m.id).collect()))
        .collect();
    let hand_back = async move {
        for (node, conn, ids) in left {
            shared.hand_back(&node, &conn, &ids).await;
        }
    };
    let spawned = actix_rt::System::try_current().is_some_and(|sys| sys.arbiter().spawn(hand_back));
    if !spawned {
        tracing::warn!(
            messages,
            "hand-offs of a stopped runner not handed back (they wait for their lease)"
        );
    }
}

/// What messages carry in a `Deliver` frame, as a forward's hand-off is measured
/// ([`crate::protocols::Holders::holder`]): payloads and recipient keys.
pub(super) fn carried(msgs: &[QueuedMessage]) -> usize {
    msgs.iter().map(|m| m.payload.len() + m.recipient_key.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;

    /// A hand-off to `node` of one message per size in `sizes` (ids from `first`).
    fn handed(node: &str, first: i64, sizes: &[usize]) -> Handed {
        let msgs = sizes
            .iter()
            .zip(first..)
            .map(|(&size, id)| QueuedMessage {
                id,
                connection: "c".into(),
                recipient_key: "k".into(),
                payload: vec![0; size],
                received_at_ms: 1,
                attempts: 1,
            })
            .collect();
        Handed {
            node: node.into(),
            conn: "c".into(),
            msgs,
        }
    }

    fn entry(h: Handed) -> Entry {
        Entry::hand(h, Vec::new())
    }

    /// The hand-offs `join` makes of `waiting`, each as the ids of its messages.
    fn runs(join: &Join, waiting: Vec<Handed>) -> Vec<Vec<i64>> {
        let mut waiting: VecDeque<Entry> = waiting.into_iter().map(entry).collect();
        std::iter::from_fn(|| join.take(&mut waiting))
            .map(|e| e.h.msgs.iter().map(|m| m.id).collect())
            .collect()
    }

    const ONE_MIB_FRAME: Join = Join {
        local_node: "here",
        batch: 10,
        max_frame: Some(MIB),
    };

    #[test]
    fn two_forwards_that_fit_a_frame_each_but_not_together_go_in_two() {
        let w = vec![handed("peer", 1, &[600 * KIB]), handed("peer", 2, &[600 * KIB])];
        assert_eq!(runs(&ONE_MIB_FRAME, w), [vec![1], vec![2]]);
    }

    #[test]
    fn small_forwards_for_one_node_join_up_to_a_batch() {
        let w = (0..25).map(|i| handed("peer", i, &[100])).collect();
        assert_eq!(
            runs(&ONE_MIB_FRAME, w),
            [(0..10).collect::<Vec<_>>(), (10..20).collect(), (20..25).collect()]
        );
    }

    #[test]
    fn a_join_stops_at_the_frame_and_goes_on_after_it() {
        let w = vec![
            handed("peer", 1, &[300 * KIB, 300 * KIB]),
            handed("peer", 3, &[300 * KIB]),
            handed("peer", 4, &[300 * KIB]),
            handed("peer", 5, &[1]),
        ];
        assert_eq!(runs(&ONE_MIB_FRAME, w), [vec![1, 2, 3], vec![4, 5]]);
    }

    #[test]
    fn a_local_hand_off_has_no_frame_but_a_batch() {
        let w = (0..12).map(|i| handed("here", i, &[600 * KIB])).collect();
        assert_eq!(
            runs(&ONE_MIB_FRAME, w),
            [(0..10).collect::<Vec<_>>(), (10..12).collect()]
        );
    }

    #[test]
    fn hand_offs_for_two_nodes_never_join_and_keep_their_order() {
        let w = vec![
            handed("peer", 1, &[1]),
            handed("here", 2, &[1]),
            handed("here", 3, &[1]),
            handed("peer", 4, &[1]),
        ];
        assert_eq!(runs(&ONE_MIB_FRAME, w), [vec![1], vec![2, 3], vec![4]]);
    }

    #[test]
    fn a_forward_over_the_frame_alone_is_still_handed_alone() {
        // `holder` let it through (or it is local to the peer that sent it): not joined, not
        // dropped; the link decides.
        let w = vec![handed("peer", 1, &[2 * MIB]), handed("peer", 2, &[1])];
        assert_eq!(runs(&ONE_MIB_FRAME, w), [vec![1], vec![2]]);
    }

    /// A node's [`Shared`] (node `n1`, no cluster) on a temporary store holding connection
    /// `c1`, and `n` messages of `c1` queued leased to `n1`'s hand-off owner, as forwards for
    /// its live session queue them.
    async fn node_with_handed(n: usize) -> (Arc<Shared>, Vec<QueuedMessage>) {
        use actix::Actor;
        let (m, _) = crate::protocols::mediator_for_test().await;
        let until_ms = crate::protocols::now_ms() + m.lease_ms;
        let new: Vec<crate::store::NewMessage> = (0..n)
            .map(|i| crate::store::NewMessage {
                connection: "c1".into(),
                recipient_key: "k".into(),
                payload: vec![i as u8],
                received_at_ms: 1,
                dedup_key: None,
                expires_at_ms: None,
                lease: Some(crate::store::LeaseTo {
                    owner: crate::protocols::handoff_owner("n1"),
                    until_ms,
                }),
            })
            .collect();
        let queued = m.store.enqueue(new.clone(), &m.limits).await.unwrap();
        let msgs = queued
            .into_iter()
            .zip(new)
            .map(|(q, new)| QueuedMessage {
                id: q.unwrap().id,
                connection: new.connection,
                recipient_key: new.recipient_key,
                payload: new.payload,
                received_at_ms: new.received_at_ms,
                attempts: 1,
            })
            .collect();
        let cfg = crate::config::Config::single_node_default();
        let egress =
            super::super::egress::Egress::new(Default::default(), std::time::Duration::from_secs(1), &[]).unwrap();
        let shared = Shared::new(
            Arc::new(m),
            crate::registry::Registry::new(None).start(),
            None,
            Arc::new(cfg),
            Arc::new(crate::metrics::Metrics::new()),
            Arc::default(),
            egress,
        );
        (Arc::new(shared), msgs)
    }

    /// A runner dropped before its run ended (its arbiter stopped, or it panicked) while a
    /// hand-off of its connection waited: the connection's next hand-off starts a run, and the
    /// waiting one's messages are released at once (deliverable), not left leased for
    /// `lease_ms`; the one being run stays the runner's.
    #[actix_rt::test]
    async fn a_dropped_runner_hands_back_what_waited_and_the_next_hand_off_runs() {
        let (s, msgs) = node_with_handed(2).await;
        let to_n1 = |m: &QueuedMessage| Handed {
            node: "n1".into(),
            conn: "c1".into(),
            msgs: vec![m.clone()],
        };
        let first = s.handing.enter("c1", entry(to_n1(&msgs[0]))).unwrap();
        let mut run = s.run_of("c1".into(), first);
        assert!(run.waiting().unwrap().pop_front().is_some(), "being run");
        assert!(
            s.handing.enter("c1", entry(to_n1(&msgs[1]))).is_none(),
            "waits for the runner"
        );
        drop(run);
        assert!(
            s.handing.enter("c1", entry(to_n1(&msgs[1]))).is_some(),
            "the next hand-off starts a run"
        );
        let store = &s.mediator.store;
        for _ in 0..10_000 {
            if store
                .queue_stats("c1", crate::protocols::now_ms())
                .await
                .unwrap()
                .pending
                > 0
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        let q = store.queue_stats("c1", crate::protocols::now_ms()).await.unwrap();
        assert_eq!((q.pending, q.leased), (1, 1), "the waiting one released");
    }
}
