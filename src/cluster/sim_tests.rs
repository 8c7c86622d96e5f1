//! A simulated cluster for the directory protocol: nodes with real [`Directory`]s, FIFO links
//! that can be cut, healed and overflowed, random announces and withdrawals. After every link
//! is healed and drained, every node must know exactly the claims each other node holds.
//!
//! It checks the composition the runtime relies on: Own/Disown in FIFO order per link, a full
//! resync as the first thing on a new link, and "drop queued directory frames, send a resync"
//! when a queue overflows. As the runtime does, a sender reads its snapshot a page at a time
//! while its own claims change (the frames of those changes queued after the snapshot), a
//! receiver applies a resync in chunks as its frames arrive and removes what it left stale
//! in sweep steps between other events, and a peer declared down is forgotten in sweep steps.

use proptest::prelude::*;

use super::directory::{Cursor, DirEvent, Directory};

const N: usize = 3;

#[derive(Debug, Clone)]
enum Msg {
    Own(String, u64),
    Disown(String, u64),
    Resync(Vec<(String, u64)>, bool),
}

/// Claims per resync frame and per snapshot page: tiny, so resyncs take several of each.
const PAGE: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Announce(usize, u8),
    Withdraw(usize, u8),
    Deliver(usize, usize),
    Cut(usize, usize, bool),
    Heal(usize, usize),
    Overflow(usize, usize),
    /// Reads the next page of the snapshot `a` is taking for `b`.
    Page(usize, usize),
    /// A sweep step of `a` on `b`'s claims.
    Sweep(usize, usize, usize),
}

/// One direction of a link: what the writer wrote (resyncs, and queued frames it took),
/// in order, and its queue.
#[derive(Debug, Clone, Default)]
struct Link {
    wire: std::collections::VecDeque<Msg>,
    queue: std::collections::VecDeque<Msg>,
}

/// A snapshot a sender is reading, page by page: its link's frames wait behind it.
#[derive(Debug, Clone, Default)]
struct Snap {
    next: Option<Cursor>,
    claims: Vec<(String, u64)>,
}

struct Sim {
    nodes: Vec<Directory>,
    /// queues[a][b]: frames from a to b; None while the link is cut.
    queues: Vec<Vec<Option<Link>>>,
    /// snaps[a][b]: the snapshot a is reading for b, if any.
    snaps: Vec<Vec<Option<Snap>>>,
    /// resyncing[b][a]: b is taking a resync from a.
    resyncing: Vec<Vec<bool>>,
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
            snaps: vec![vec![None; N]; N],
            resyncing: vec![vec![false; N]; N],
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
            if let Some(l) = &mut self.queues[a][b] {
                l.queue.push_back(m.clone());
            }
        }
    }

    fn heal(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            if self.queues[x][y].is_none() {
                self.queues[x][y] = Some(Default::default());
                self.snaps[x][y] = Some(Snap::default());
                self.page(x, y);
            }
        }
    }

    /// Reads one page of `a`'s snapshot for `b`; once complete, it goes before every frame
    /// queued while it was read.
    fn page(&mut self, a: usize, b: usize) {
        let Some(snap) = &mut self.snaps[a][b] else {
            return;
        };
        let (page, next) = self.nodes[a].page(&name(a), snap.next, PAGE);
        snap.claims.extend(page);
        snap.next = next;
        if next.is_some() {
            return;
        }
        let claims = std::mem::take(&mut snap.claims);
        self.snaps[a][b] = None;
        if let Some(l) = &mut self.queues[a][b] {
            l.wire
                .extend(claims.chunks(PAGE).map(|c| Msg::Resync(c.to_vec(), false)));
            l.wire.push_back(Msg::Resync(Vec::new(), true));
        }
    }

    /// Ends every sweep of `a`, as the reader does before taking a new resync.
    fn finish_sweep(&mut self, a: usize, of: usize) {
        while self.nodes[a].sweeping(&name(of)) {
            self.nodes[a].apply(DirEvent::Sweep { node: name(of), max: 1 });
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
                let reading = self.snaps[a][b].is_some();
                let Some(l) = self.queues[a][b].as_mut() else {
                    return;
                };
                // While it reads a snapshot the writer takes nothing from its queue.
                if l.wire.is_empty() && !reading {
                    if let Some(m) = l.queue.pop_front() {
                        l.wire.push_back(m);
                    }
                }
                let Some(m) = l.wire.pop_front() else {
                    return;
                };
                let node = name(a);
                let ev = match m {
                    Msg::Own(conn, epoch) => DirEvent::Own { conn, node, epoch },
                    Msg::Disown(conn, epoch) => DirEvent::Disown { conn, node, epoch },
                    Msg::Resync(claims, last) => {
                        if !self.resyncing[b][a] {
                            self.finish_sweep(b, a);
                            self.nodes[b].apply(DirEvent::ResyncBegin { node: node.clone() });
                            self.resyncing[b][a] = true;
                        }
                        self.nodes[b].apply(DirEvent::ResyncChunk {
                            node: node.clone(),
                            claims,
                        });
                        if last {
                            self.resyncing[b][a] = false;
                            self.nodes[b].apply(DirEvent::ResyncEnd { node });
                        }
                        return;
                    }
                };
                self.nodes[b].apply(ev);
            }
            Op::Cut(a, b, declared_down) => {
                for (x, y) in [(a, b), (b, a)] {
                    self.queues[x][y] = None;
                    self.snaps[x][y] = None;
                    // A resync cut short stays as far as it went.
                    self.resyncing[x][y] = false;
                }
                if declared_down {
                    self.nodes[a].apply(DirEvent::Forget { node: name(b) });
                    self.nodes[b].apply(DirEvent::Forget { node: name(a) });
                }
            }
            Op::Heal(a, b) => self.heal(a, b),
            Op::Overflow(a, b) => {
                if self.queues[a][b].is_some() && self.snaps[a][b].is_none() {
                    // Queued directory frames are dropped; the snapshot goes before the rest.
                    if let Some(l) = &mut self.queues[a][b] {
                        l.queue.clear();
                    }
                    self.snaps[a][b] = Some(Snap::default());
                    self.page(a, b);
                }
            }
            Op::Page(a, b) => self.page(a, b),
            Op::Sweep(a, b, max) => {
                self.nodes[a].apply(DirEvent::Sweep { node: name(b), max });
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
                    if self.snaps[a][b].is_some() {
                        self.page(a, b);
                        moved = true;
                    } else if self.queues[a][b]
                        .as_ref()
                        .is_some_and(|l| !l.wire.is_empty() || !l.queue.is_empty())
                    {
                        self.apply(Op::Deliver(a, b));
                        moved = true;
                    }
                }
            }
            if !moved {
                break;
            }
        }
        for a in 0..N {
            for b in 0..N {
                self.finish_sweep(a, b);
            }
        }
    }
}

fn arb_op() -> impl Strategy<Value = Op> {
    // Two distinct nodes, drawn without rejections (many ops per case draw pairs).
    let pair = (0..N, 1..N).prop_map(|(a, d)| (a, (a + d) % N));
    prop_oneof![
        3 => (0..N, 0u8..5).prop_map(|(a, c)| Op::Announce(a, c)),
        2 => (0..N, 0u8..5).prop_map(|(a, c)| Op::Withdraw(a, c)),
        6 => pair.clone().prop_map(|(a, b)| Op::Deliver(a, b)),
        1 => (pair.clone(), any::<bool>()).prop_map(|((a, b), d)| Op::Cut(a, b, d)),
        1 => pair.clone().prop_map(|(a, b)| Op::Heal(a, b)),
        1 => pair.clone().prop_map(|(a, b)| Op::Overflow(a, b)),
        3 => pair.clone().prop_map(|(a, b)| Op::Page(a, b)),
        2 => (pair, 1usize..3).prop_map(|((a, b), m)| Op::Sweep(a, b, m)),
    ]
}

proptest! {
    #[test]
    fn directories_converge_after_healing(ops in proptest::collection::vec(arb_op(), 0..160)) {
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
