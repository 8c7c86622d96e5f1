//! A discrete-event simulation of a mailroom cluster built from the real pure state machines:
//! [`Directory`] and [`Membership`] per node, [`Frame`]s sized by the real `proto` encoding and
//! split by the real `resync_chunks`, delivered through in-memory FIFO links with a simulated
//! one-way latency. No sockets, no clocks, no threads: simulated time is a `u64` of
//! nanoseconds and every node is one server that handles its frames in arrival order, each
//! costing the CPU time measured on the real code (the bench measures it; tests pass zeros).
//!
//! It wires the machines the way `src/cluster/peer/` does:
//! - a session open: `Own` applied locally, then one `Own` frame on every installed link;
//! - a session close: `Disown` locally, one `Disown` frame on every installed link;
//! - a notification: one `Queued` frame to the owner the local directory names (none if local);
//! - a link that comes up: `LinkUp` into membership; if installed, the local node's claims as
//!   `Resync` chunks first, then whatever is queued after;
//! - a frame from a link that is no longer the installed one is ignored;
//! - heartbeats: a `Ping` per link per interval, answered by a `Pong`; every frame is `Heard`;
//! - a tick every `min(failure_timeout / 8, heartbeat)`; membership's `Down` drops the peer's
//!   claims (`NodeGone`).
//!
//! Only "full" nodes hold a real [`Directory`] (a million-session directory per node does not
//! fit 64 times in one machine); the others keep their own sessions only and are modelled for
//! timing and frame counts. Every node receives the same frames, so a full node stands for all.
//! Checks (`check`) run on full nodes only.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use mailroom::cluster::directory::{DirEvent, Directory};
use mailroom::cluster::link::MAX_RECORD;
use mailroom::cluster::membership::{LinkId, MemberEffect, MemberEvent, Membership};
use mailroom::cluster::proto::{self, Frame};
use mailroom::cluster::resync_chunks;

/// CPU nanoseconds per operation, measured on the real code (see the bench's `measure_costs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Costs {
    /// Seal (encode + encrypt) one small frame, per link it is sent on.
    pub seal_small: u64,
    /// Open (decrypt + decode) one small frame.
    pub open_small: u64,
    /// Seal / open per byte of a large frame (resync chunks), in picoseconds.
    pub seal_per_byte_ps: u64,
    pub open_per_byte_ps: u64,
    /// `Directory::apply(Own)` / `apply(Disown)` on a directory of the simulated size.
    pub apply_own: u64,
    pub apply_disown: u64,
    /// `Directory::apply(Resync)` per claim, `apply(NodeGone)` per claim of the gone node.
    pub resync_per_claim: u64,
    pub node_gone_per_claim: u64,
}

#[derive(Debug, Clone)]
pub struct Params {
    pub nodes: usize,
    /// Nodes `0..full` keep a real directory (0 = every node).
    pub full: usize,
    pub latency: Duration,
    pub heartbeat: Duration,
    pub failure_timeout: Duration,
    pub max_frame: usize,
    pub costs: Costs,
    pub seed: u64,
}

impl Params {
    pub fn new(nodes: usize) -> Self {
        Params {
            nodes,
            full: 0,
            latency: Duration::from_micros(250),
            heartbeat: Duration::from_millis(500),
            failure_timeout: Duration::from_secs(3),
            max_frame: 1 << 20,
            costs: Costs::default(),
            seed: 1,
        }
    }
}

/// Frames and bytes sent, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub frames: u64,
    /// `proto` encoding + the 4-byte length of `codec::encode_record`.
    pub record_bytes: u64,
    /// Bytes on the encrypted link (`link.rs`: per record 4 length + 1 flag + 16 tag).
    pub wire_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub own: Count,
    pub disown: Count,
    pub resync: Count,
    pub queued: Count,
    pub heartbeat: Count,
    pub resync_claims: u64,
}

impl Stats {
    fn slot(&mut self, f: &Frame) -> &mut Count {
        match f {
            Frame::Own { .. } => &mut self.own,
            Frame::Disown { .. } => &mut self.disown,
            Frame::Resync { .. } => &mut self.resync,
            Frame::Queued { .. } => &mut self.queued,
            _ => &mut self.heartbeat,
        }
    }
}

/// Bytes of one frame on the encrypted link, per `link.rs`'s record format.
pub fn wire_len(payload: usize) -> usize {
    let chunk = MAX_RECORD - 16 - 1;
    let records = payload.div_ceil(chunk).max(1);
    payload + records * (4 + 1 + 16)
}

pub fn node_name(i: usize) -> String {
    format!("node-{i:02}")
}

/// A uuid-shaped connection id, as the store makes them (`uuid::Uuid::new_v4().to_string()`).
pub fn conn_id(rng: &mut Rng) -> String {
    let a = rng.next();
    let b = rng.next();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// splitmix64: deterministic, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub struct Node {
    pub id: String,
    pub alive: bool,
    pub members: Membership,
    pub dir: Option<Directory>,
    /// The sessions this node holds: conn -> epoch (what its own claims must be).
    pub own: HashMap<String, u64>,
    last_epoch: u64,
    busy_until: u64,
    /// Resync chunks received so far per peer (as `read_loop` accumulates them).
    resync_buf: Vec<Vec<(String, u64)>>,
    /// Simulated CPU time spent.
    pub cpu_ns: u64,
    /// When this node last applied a claim of one of the watched conns (see `watch`).
    pub last_watched_apply: u64,
    /// When membership declared each peer down.
    pub down_at: Vec<Option<u64>>,
    /// When this node last finished applying a complete resync.
    pub last_resync_done: u64,
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        link: LinkId,
        frame: Frame,
    },
    Heartbeat(usize),
    Tick(usize),
    /// The peer's end of a link was closed (EOF reached `to`).
    Closed {
        to: usize,
        from: usize,
        link: LinkId,
    },
    /// A wallet opens a session on a node.
    Open {
        node: usize,
        conn: String,
    },
}

/// A hook on delivery, for tests that break the transport on purpose.
pub type DeliverFilter = fn(&Frame) -> bool;

pub struct Sim {
    pub p: Params,
    pub nodes: Vec<Node>,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    /// Last arrival time per directed link: links are FIFO.
    last_arrival: Vec<Vec<u64>>,
    next_link: LinkId,
    base: Instant,
    pub stats: Stats,
    /// Conns whose claims are timed by `last_watched_apply`.
    pub watch: HashMap<String, ()>,
    /// Frames for which this returns false are lost in transit (tests only).
    pub deliver_filter: Option<DeliverFilter>,
    pub rng: Rng,
}

impl Sim {
    /// A cluster of `p.nodes` nodes, every pair linked (links installed, no resync sent: the
    /// directories start empty and are filled by `preload` or by opens).
    pub fn new(p: Params) -> Self {
        let n = p.nodes;
        let base = Instant::now();
        let full = if p.full == 0 { n } else { p.full.min(n) };
        let nodes = (0..n)
            .map(|i| {
                let mut m = Membership::new(node_name(i), p.failure_timeout);
                for j in 0..n {
                    if j != i {
                        m.handle(MemberEvent::Added { peer: node_name(j) }, base);
                    }
                }
                Node {
                    id: node_name(i),
                    alive: true,
                    members: m,
                    dir: (i < full).then(|| Directory::new(node_name(i))),
                    own: HashMap::new(),
                    last_epoch: 0,
                    busy_until: 0,
                    resync_buf: vec![Vec::new(); n],
                    cpu_ns: 0,
                    last_watched_apply: 0,
                    down_at: vec![None; n],
                    last_resync_done: 0,
                }
            })
            .collect();
        let seed = p.seed;
        let mut s = Sim {
            p,
            nodes,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            last_arrival: vec![vec![0; n]; n],
            next_link: 1,
            base,
            stats: Stats::default(),
            watch: HashMap::new(),
            deliver_filter: None,
            rng: Rng::new(seed),
        };
        for a in 0..n {
            for b in a + 1..n {
                let link = s.next_link;
                s.next_link += 1;
                s.nodes[a].members.handle(
                    MemberEvent::LinkUp {
                        peer: node_name(b),
                        link,
                        we_dialed: true,
                    },
                    base,
                );
                s.nodes[b].members.handle(
                    MemberEvent::LinkUp {
                        peer: node_name(a),
                        link,
                        we_dialed: false,
                    },
                    base,
                );
            }
        }
        let tick = s.tick_period();
        let hb = s.p.heartbeat.as_nanos() as u64;
        for i in 0..n {
            // Spread the nodes' timers so they do not all fire at once.
            let off = s.rng.below(hb);
            s.push(off, Ev::Heartbeat(i));
            let off = s.rng.below(tick);
            s.push(off, Ev::Tick(i));
        }
        s
    }

    fn tick_period(&self) -> u64 {
        (self.p.failure_timeout / 8).min(self.p.heartbeat).as_nanos() as u64
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    fn instant(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Fills the cluster with sessions as if every open had been announced and delivered:
    /// node `holder(i)` holds conn `i`. Directory frames are not counted (this is the state
    /// before the experiment).
    pub fn preload(&mut self, conns: &[String], holder: impl Fn(usize) -> usize) {
        for (i, c) in conns.iter().enumerate() {
            let h = holder(i);
            let epoch = self.next_epoch(h, c);
            self.nodes[h].own.insert(c.clone(), epoch);
            for n in &mut self.nodes {
                if let Some(d) = &mut n.dir {
                    d.apply(DirEvent::Own {
                        conn: c.clone(),
                        node: node_name(h),
                        epoch,
                    });
                }
            }
        }
    }

    fn next_epoch(&mut self, node: usize, conn: &str) -> u64 {
        // As `Shared::announce`: unix_ms << 16, above this node's last and the conn's max.
        let now_ms = 1_700_000_000_000 + self.now / 1_000_000;
        let n = &mut self.nodes[node];
        let known = n.dir.as_ref().map_or(0, |d| d.max_epoch(conn));
        let epoch = (now_ms << 16)
            .max(n.last_epoch.saturating_add(1))
            .max(known.saturating_add(1));
        n.last_epoch = epoch;
        epoch
    }

    /// CPU time of node `i` starting at `at` (or when it is free): returns when it is done.
    fn work(&mut self, i: usize, at: u64, cost: u64) -> u64 {
        let n = &mut self.nodes[i];
        let start = at.max(n.busy_until);
        n.busy_until = start + cost;
        n.cpu_ns += cost;
        n.busy_until
    }

    /// Sends `f` from `a` to `b` on the link `a` has installed, leaving once `a` has sealed it.
    fn send(&mut self, a: usize, b: usize, f: Frame) {
        let Some(link) = self.nodes[a].members.link_of(&node_name(b)) else {
            return;
        };
        let payload = proto::encode(&f).expect("encodable").len();
        let c = self.stats.slot(&f);
        c.frames += 1;
        c.record_bytes += payload as u64 + 4;
        c.wire_bytes += wire_len(payload) as u64;
        if let Frame::Resync { claims, .. } = &f {
            self.stats.resync_claims += claims.len() as u64;
        }
        let k = self.p.costs;
        let cost = if payload > 256 {
            payload as u64 * k.seal_per_byte_ps / 1000
        } else {
            k.seal_small
        };
        let sent = self.work(a, self.now, cost);
        let arrive = (sent + self.p.latency.as_nanos() as u64).max(self.last_arrival[a][b]);
        self.last_arrival[a][b] = arrive;
        self.push(
            arrive,
            Ev::Deliver {
                to: b,
                from: a,
                link,
                frame: f,
            },
        );
    }

    fn broadcast(&mut self, a: usize, f: &Frame) {
        for b in 0..self.nodes.len() {
            if b != a {
                self.send(a, b, f.clone());
            }
        }
    }

    /// A wallet opens a session of `conn` on node `a` now (`Shared::announce`).
    pub fn open(&mut self, a: usize, conn: &str) -> u64 {
        let epoch = self.next_epoch(a, conn);
        self.nodes[a].own.insert(conn.to_string(), epoch);
        let k = self.p.costs.apply_own;
        self.work(a, self.now, k);
        let id = node_name(a);
        if let Some(d) = &mut self.nodes[a].dir {
            d.apply(DirEvent::Own {
                conn: conn.to_string(),
                node: id,
                epoch,
            });
        }
        self.broadcast(
            a,
            &Frame::Own {
                conn: conn.to_string(),
                epoch,
            },
        );
        epoch
    }

    /// A wallet will open a session of `conn` on node `a` at time `at`.
    pub fn schedule_open(&mut self, at: u64, a: usize, conn: String) {
        self.push(at.max(self.now), Ev::Open { node: a, conn });
    }

    /// The session of `conn` on node `a` ends (`Shared::withdraw`).
    pub fn close(&mut self, a: usize, conn: &str) {
        let Some(epoch) = self.nodes[a].own.remove(conn) else {
            return;
        };
        let k = self.p.costs.apply_disown;
        self.work(a, self.now, k);
        let id = node_name(a);
        if let Some(d) = &mut self.nodes[a].dir {
            d.apply(DirEvent::Disown {
                conn: conn.to_string(),
                node: id,
                epoch,
            });
        }
        self.broadcast(
            a,
            &Frame::Disown {
                conn: conn.to_string(),
                epoch,
            },
        );
    }

    /// A message for `conn` was queued on node `a` (`Shared::notify`): the owner `a`'s directory
    /// names gets a `Queued`. Returns whether a frame was sent. Needs a full node.
    pub fn notify(&mut self, a: usize, conn: &str) -> bool {
        let owner = {
            let d = self.nodes[a].dir.as_ref().expect("notify needs a full node");
            d.owner(conn).map(|(n, _)| n.to_string())
        };
        match owner {
            Some(o) if o != self.nodes[a].id => {
                let b = self.index(&o);
                self.send(a, b, Frame::Queued { conn: conn.to_string() });
                true
            }
            _ => false,
        }
    }

    pub fn index(&self, id: &str) -> usize {
        id.strip_prefix("node-")
            .and_then(|s| s.parse().ok())
            .expect("a simulated node id")
    }

    /// The process of node `v` dies: it stops, and its peers read EOF on its links (a machine
    /// that vanishes sends nothing: `eof = false`, the peers only see silence).
    pub fn kill(&mut self, v: usize, eof: bool) {
        self.nodes[v].alive = false;
        for b in 0..self.nodes.len() {
            if b == v {
                continue;
            }
            if let Some(link) = self.nodes[b].members.link_of(&node_name(v)) {
                if eof {
                    let at = self.now + self.p.latency.as_nanos() as u64;
                    self.push(at, Ev::Closed { to: b, from: v, link });
                }
            }
        }
    }

    /// The link between `a` and `b` breaks (both see EOF now); no one is declared down unless
    /// it stays cut past the failure timeout.
    pub fn cut(&mut self, a: usize, b: usize) {
        let now = self.instant(self.now);
        for (x, y) in [(a, b), (b, a)] {
            if let Some(link) = self.nodes[x].members.link_of(&node_name(y)) {
                self.nodes[x].members.handle(
                    MemberEvent::LinkClosed {
                        peer: node_name(y),
                        link,
                    },
                    now,
                );
            }
            self.nodes[x].resync_buf[y].clear();
        }
    }

    /// A new link between `a` and `b` (dialed by `a`) finishes its handshake on both sides:
    /// each installs it and sends its claims first (`run_link` + `write_loop`).
    pub fn link_up(&mut self, a: usize, b: usize) {
        let link = self.next_link;
        self.next_link += 1;
        let now = self.instant(self.now);
        for (x, y, dialed) in [(a, b, true), (b, a, false)] {
            let fx = self.nodes[x].members.handle(
                MemberEvent::LinkUp {
                    peer: node_name(y),
                    link,
                    we_dialed: dialed,
                },
                now,
            );
            let installed = fx
                .iter()
                .any(|e| matches!(e, MemberEffect::Install { link: l, .. } if *l == link));
            if installed {
                for f in resync_chunks(self.snapshot(x), self.p.max_frame) {
                    self.send(x, y, f);
                }
            }
        }
    }

    /// A node's own claims as the real node takes them for a resync: from its directory when it
    /// has one (`claims_of(local)`), from its session list otherwise.
    fn snapshot(&self, x: usize) -> Vec<(String, u64)> {
        let n = &self.nodes[x];
        match &n.dir {
            Some(d) => d.claims_of(&n.id),
            None => {
                let mut v: Vec<_> = n.own.iter().map(|(c, e)| (c.clone(), *e)).collect();
                v.sort();
                v
            }
        }
    }

    /// Runs events until simulated time `until` (ns).
    pub fn run_until(&mut self, until: u64) {
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > until {
                break;
            }
            self.queue.pop();
            let ev = self.events.remove(&seq).expect("queued event");
            self.now = at;
            self.handle(ev);
        }
        self.now = self.now.max(until);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Heartbeat(i) => {
                if !self.nodes[i].alive {
                    return;
                }
                for b in 0..self.nodes.len() {
                    if b != i {
                        self.send(i, b, Frame::Ping { t: self.now / 1000 });
                    }
                }
                self.push(self.now + self.p.heartbeat.as_nanos() as u64, Ev::Heartbeat(i));
            }
            Ev::Tick(i) => {
                if !self.nodes[i].alive {
                    return;
                }
                let at = self.instant(self.now);
                let fx = self.nodes[i].members.handle(MemberEvent::Tick, at);
                self.member_effects(i, fx);
                self.push(self.now + self.tick_period(), Ev::Tick(i));
            }
            Ev::Closed { to, from, link } => {
                if !self.nodes[to].alive {
                    return;
                }
                let at = self.instant(self.now);
                self.nodes[to].members.handle(
                    MemberEvent::LinkClosed {
                        peer: node_name(from),
                        link,
                    },
                    at,
                );
            }
            Ev::Deliver { to, from, link, frame } => self.deliver(to, from, link, frame),
            Ev::Open { node, conn } => {
                if self.nodes[node].alive {
                    self.open(node, &conn);
                }
            }
        }
    }

    fn member_effects(&mut self, i: usize, fx: Vec<MemberEffect>) {
        for e in fx {
            if let MemberEffect::Down { peer } = e {
                let p = self.index(&peer);
                let held = self.nodes[i]
                    .dir
                    .as_ref()
                    .map_or_else(|| self.nodes[p].own.len(), |d| d.claims_by(&peer, "").0);
                let cost = held as u64 * self.p.costs.node_gone_per_claim;
                let done = self.work(i, self.now, cost);
                self.nodes[i].down_at[p] = Some(done);
                if let Some(d) = &mut self.nodes[i].dir {
                    d.apply(DirEvent::NodeGone { node: peer });
                }
            }
        }
    }

    fn deliver(&mut self, to: usize, from: usize, link: LinkId, frame: Frame) {
        if !self.nodes[to].alive {
            return;
        }
        if let Some(keep) = self.deliver_filter {
            if !keep(&frame) {
                return;
            }
        }
        let peer = node_name(from);
        // `read_loop`: frames of a link that is no longer the installed one do not count.
        if self.nodes[to].members.link_of(&peer) != Some(link) {
            return;
        }
        let k = self.p.costs;
        let cost = match &frame {
            Frame::Own { .. } => k.open_small + k.apply_own,
            Frame::Disown { .. } => k.open_small + k.apply_disown,
            Frame::Resync { claims, last } => {
                let bytes = proto::encode(&frame).map_or(0, |b| b.len()) as u64;
                let buffered = self.nodes[to].resync_buf[from].len() + claims.len();
                bytes * k.open_per_byte_ps / 1000 + if *last { buffered as u64 * k.resync_per_claim } else { 0 }
            }
            _ => k.open_small,
        };
        let done = self.work(to, self.now, cost);
        let at = self.instant(done);
        self.nodes[to].members.handle(
            MemberEvent::Heard {
                peer: peer.clone(),
                link,
            },
            at,
        );
        match frame {
            Frame::Ping { t } => self.send(to, from, Frame::Pong { t }),
            Frame::Own { conn, epoch } => {
                if self.watch.contains_key(&conn) {
                    self.nodes[to].last_watched_apply = done;
                }
                if let Some(d) = &mut self.nodes[to].dir {
                    d.apply(DirEvent::Own {
                        conn,
                        node: peer,
                        epoch,
                    });
                }
            }
            Frame::Disown { conn, epoch } => {
                if let Some(d) = &mut self.nodes[to].dir {
                    d.apply(DirEvent::Disown {
                        conn,
                        node: peer,
                        epoch,
                    });
                }
            }
            Frame::Resync { claims, last } => {
                let buf = &mut self.nodes[to].resync_buf[from];
                buf.extend(claims.into_iter().map(|c| (c.conn, c.epoch)));
                if last {
                    self.nodes[to].last_resync_done = done;
                    let buf = &mut self.nodes[to].resync_buf[from];
                    let claims = std::mem::take(buf);
                    if let Some(d) = &mut self.nodes[to].dir {
                        d.apply(DirEvent::Resync { node: peer, claims });
                    }
                }
            }
            _ => {}
        }
    }

    /// Every live node's view against the truth (each node's `own`): for every full live node
    /// and every other live node, the claims it keeps of it are exactly that node's sessions,
    /// it keeps none of a dead node, and it names the right owner for every live session.
    /// Returns one line per disagreement (at most `max`).
    pub fn check(&self, max: usize) -> Vec<String> {
        let mut bad = Vec::new();
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].alive).collect();
        let mut truth: HashMap<&str, (&str, u64)> = HashMap::new();
        for &i in &live {
            for (c, e) in &self.nodes[i].own {
                let cur = truth.entry(c.as_str()).or_insert((self.nodes[i].id.as_str(), *e));
                if (*e, self.nodes[i].id.as_str()) > (cur.1, cur.0) {
                    *cur = (self.nodes[i].id.as_str(), *e);
                }
            }
        }
        for &x in &live {
            let Some(d) = &self.nodes[x].dir else { continue };
            if d.len() != truth.len() {
                bad.push(format!(
                    "{}: {} conns in the directory, {} live sessions",
                    self.nodes[x].id,
                    d.len(),
                    truth.len()
                ));
            }
            for y in 0..self.nodes.len() {
                let (held, _) = d.claims_by(&self.nodes[y].id, "");
                let want = if self.nodes[y].alive {
                    self.nodes[y].own.len()
                } else {
                    0
                };
                if held != want {
                    bad.push(format!(
                        "{} keeps {} claims of {} ({}), which holds {}",
                        self.nodes[x].id,
                        held,
                        self.nodes[y].id,
                        if self.nodes[y].alive { "up" } else { "dead" },
                        want
                    ));
                }
            }
            for (c, (n, e)) in &truth {
                if d.owner(c) != Some((*n, *e)) {
                    bad.push(format!(
                        "{}: owner of {c} is {:?}, should be ({n}, {e})",
                        self.nodes[x].id,
                        d.owner(c)
                    ));
                }
                if bad.len() >= max {
                    return bad;
                }
            }
        }
        bad.truncate(max);
        bad
    }
}
