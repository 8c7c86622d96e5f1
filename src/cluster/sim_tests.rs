//! A simulated cluster for the directory protocol: nodes with real [`Directory`]s, FIFO links
//! that can be cut, healed and overflowed, random announces and withdrawals. After every link
//! is healed and drained, every node must know exactly the claims each other node holds.
//!
//! It checks the composition the runtime relies on: Own/Disown in FIFO order per link, a full
//! resync as the first thing on a new link, and "drop queued directory frames, send a resync"
//! when a queue overflows.

use proptest::prelude::*;

use super::directory::{DirEvent, Directory};

const N: usize = 3;

#[derive(Debug, Clone)]
enum Msg {
    Own(String, u64),
    Disown(String, u64),
    Resync(Vec<(String, u64)>),
}

#[derive(Debug, Clone)]
enum Op {
    Announce(usize, u8),
    Withdraw(usize, u8),
    Deliver(usize, usize),
    Cut(usize, usize, bool),
    Heal(usize, usize),
    Overflow(usize, usize),
}

struct Sim {
    nodes: Vec<Directory>,
    /// queues[a][b]: frames from a to b; None while the link is cut.
    queues: Vec<Vec<Option<std::collections::VecDeque<Msg>>>>,
    clock: u64,
}

fn name(i: usize) -> String {
    format!("n{i}")
}

impl Sim {
    fn new() -> Self {
        let mut s = Sim {
            nodes: (0..N).map(|i| Directory::new(name(i))).collect(),
            queues: vec![vec![None; N]; N],
            clock: 0,
        };
        for a in 0..N {
            for b in 0..N {
                if a != b {
                    s.heal(a, b);
                }
            }
        }
        s
    }

    fn own_claims(&self, a: usize) -> Vec<(String, u64)> {
        self.nodes[a].claims_of(&name(a))
    }

    fn send_all(&mut self, a: usize, m: Msg) {
        for b in 0..N {
            if let Some(q) = &mut self.queues[a][b] {
                q.push_back(m.clone());
            }
        }
    }

    fn heal(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            if self.queues[x][y].is_none() {
                let snap = self.own_claims(x);
                self.queues[x][y] = Some([Msg::Resync(snap)].into());
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Announce(a, c) => {
                let conn = format!("c{c}");
                self.clock += 1;
                let epoch = self.clock.max(self.nodes[a].max_epoch(&conn) + 1);
                self.clock = epoch;
                self.nodes[a].apply(DirEvent::Own {
                    conn: conn.clone(),
                    node: name(a),
                    epoch,
                });
                self.send_all(a, Msg::Own(conn, epoch));
            }
            Op::Withdraw(a, c) => {
                let conn = format!("c{c}");
                let mine = self.own_claims(a).into_iter().find(|(x, _)| *x == conn);
                if let Some((_, epoch)) = mine {
                    self.nodes[a].apply(DirEvent::Disown {
                        conn: conn.clone(),
                        node: name(a),
                        epoch,
                    });
                    self.send_all(a, Msg::Disown(conn, epoch));
                }
            }
            Op::Deliver(a, b) => {
                let Some(m) = self.queues[a][b].as_mut().and_then(|q| q.pop_front()) else {
                    return;
                };
                let node = name(a);
                let ev = match m {
                    Msg::Own(conn, epoch) => DirEvent::Own { conn, node, epoch },
                    Msg::Disown(conn, epoch) => DirEvent::Disown { conn, node, epoch },
                    Msg::Resync(claims) => DirEvent::Resync { node, claims },
                };
                self.nodes[b].apply(ev);
            }
            Op::Cut(a, b, declared_down) => {
                self.queues[a][b] = None;
                self.queues[b][a] = None;
                if declared_down {
                    self.nodes[a].apply(DirEvent::NodeGone { node: name(b) });
                    self.nodes[b].apply(DirEvent::NodeGone { node: name(a) });
                }
            }
            Op::Heal(a, b) => self.heal(a, b),
            Op::Overflow(a, b) => {
                let snap = self.own_claims(a);
                if let Some(q) = &mut self.queues[a][b] {
                    q.clear();
                    q.push_back(Msg::Resync(snap));
                }
            }
        }
    }

    fn settle(&mut self) {
        for a in 0..N {
            for b in 0..N {
                if a != b {
                    self.heal(a, b);
                }
            }
        }
        loop {
            let mut moved = false;
            for a in 0..N {
                for b in 0..N {
                    if self.queues[a][b].as_ref().is_some_and(|q| !q.is_empty()) {
                        self.apply(Op::Deliver(a, b));
                        moved = true;
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }
}

fn arb_op() -> impl Strategy<Value = Op> {
    let pair = (0..N, 0..N).prop_filter("distinct", |(a, b)| a != b);
    prop_oneof![
        3 => (0..N, 0u8..5).prop_map(|(a, c)| Op::Announce(a, c)),
        2 => (0..N, 0u8..5).prop_map(|(a, c)| Op::Withdraw(a, c)),
        6 => pair.clone().prop_map(|(a, b)| Op::Deliver(a, b)),
        1 => (pair.clone(), any::<bool>()).prop_map(|((a, b), d)| Op::Cut(a, b, d)),
        1 => pair.clone().prop_map(|(a, b)| Op::Heal(a, b)),
        1 => pair.prop_map(|(a, b)| Op::Overflow(a, b)),
    ]
}

proptest! {
    #[test]
    fn directories_converge_after_healing(ops in proptest::collection::vec(arb_op(), 0..120)) {
        let mut sim = Sim::new();
        for op in ops {
            sim.apply(op);
        }
        sim.settle();
        for x in 0..N {
            for y in 0..N {
                prop_assert_eq!(
                    sim.nodes[x].claims_of(&name(y)),
                    sim.own_claims(y),
                    "node {} about node {}", x, y
                );
            }
        }
        // ... hence every node names the same owner for every conn.
        for c in 0u8..5 {
            let conn = format!("c{c}");
            let o0 = sim.nodes[0].owner(&conn).map(|(n, e)| (n.to_string(), e));
            for x in 1..N {
                let ox = sim.nodes[x].owner(&conn).map(|(n, e)| (n.to_string(), e));
                prop_assert_eq!(&ox, &o0);
            }
        }
    }
}
