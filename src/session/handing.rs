//! The task that runs one connection's hand-offs ([`super::Shared::hand_off_in_order`]): which
//! of those waiting it joins into one.
//!
//! Must not: join hand-offs for two nodes; join more than a batch of messages; join for a peer
//! more than one `Deliver` frame carries (the frame would be refused at the link and every
//! message of it released, where each hand-off alone would have been sent).

use crate::cluster::proto;
use crate::protocols::Handed;
use crate::store::QueuedMessage;
use std::collections::VecDeque;

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
    pub fn take(&self, waiting: &mut VecDeque<Handed>) -> Option<Handed> {
        let mut h = waiting.pop_front()?;
        let mut bytes = carried(&h.msgs);
        while let Some(next) = waiting.front() {
            let more = carried(&next.msgs);
            let msgs = h.msgs.len() + next.msgs.len();
            if next.node != h.node || !self.fits(&h.node, msgs, bytes.saturating_add(more)) {
                break;
            }
            h.msgs.extend(waiting.pop_front().expect("front checked").msgs);
            bytes = bytes.saturating_add(more);
        }
        Some(h)
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

/// What messages carry in a `Deliver` frame, as a forward's hand-off is measured
/// ([`crate::protocols::Holders::holder`]): payloads and recipient keys.
fn carried(msgs: &[QueuedMessage]) -> usize {
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

    /// The hand-offs `join` makes of `waiting`, each as the ids of its messages.
    fn runs(join: &Join, waiting: Vec<Handed>) -> Vec<Vec<i64>> {
        let mut waiting = VecDeque::from(waiting);
        std::iter::from_fn(|| join.take(&mut waiting))
            .map(|h| h.msgs.iter().map(|m| m.id).collect())
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
}
