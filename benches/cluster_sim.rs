//! Adding nodes, past this machine, by simulation: the cluster layer's pure state machines
//! (`Directory`, `Membership`) for 16, 32 and 64 nodes and 1,000,000 sessions in one process
//! (see `cluster_sim/sim.rs` for the model). Prints the tables docs/BENCHMARKS.md quotes.
//!
//!   cargo bench --locked --bench cluster_sim               # 16, 32, 64 nodes, 1M sessions
//!   cargo bench --locked --bench cluster_sim -- --quick    # 100k sessions, 5k on the dead node
//!   scripts/bench.sh cluster-sim                           # the same, through the bench script
//!
//! Knobs (environment): SIM_NODES=16,32,64  SIM_SESSIONS=1000000  SIM_DEAD=50000
//! SIM_LATENCY_US=250 (one-way, per frame)  SIM_SPREAD_MS=1000 (the dead node's wallets
//! reconnect uniformly over this window)  SIM_FULL=2 (nodes that keep a real directory),
//! SIM_RUN=1 (run when started without `--bench`, as `cargo test` starts bench targets).
//!
//! Memory is measured with a counting global allocator (bytes requested from the allocator,
//! live, and live allocations) around the construction of one node's directory, and as the
//! growth of glibc's `mallinfo2` in-use bytes over the same construction (what malloc really
//! hands out, with its per-chunk header and rounding).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mailroom::cluster::directory::{DirEvent, Directory};
use mailroom::cluster::handshake::{self, Local, Role};
use mailroom::cluster::proto::{self, Claim, Frame};
use mailroom::cluster::resync_chunks;

#[path = "cluster_sim/sim.rs"]
mod sim;

use sim::{conn_id, node_name, wire_len, Costs, Params, Rng, Sim};

struct Counting;

static BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            BYTES.fetch_add(l.size(), Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        ALLOCS.fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            BYTES.fetch_add(new, Ordering::Relaxed);
            BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// glibc's `struct mallinfo2` (glibc >= 2.33).
#[repr(C)]
#[allow(dead_code)]
struct Mallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

extern "C" {
    fn mallinfo2() -> Mallinfo2;
}

/// Bytes malloc has handed out, chunk headers and rounding included (what the process really
/// pays for its live allocations, unlike the requested sizes the counting allocator sees).
fn malloc_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { mallinfo2() };
    m.uordblks + m.hblkhd
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ns(d: Duration, n: usize) -> u64 {
    (d.as_nanos() / n.max(1) as u128) as u64
}

const MIB: f64 = 1024.0 * 1024.0;

/// The nodes that die are the last two; each holds `dead` conns (`0..dead` and
/// `dead..2*dead`), the other conns are spread round-robin over the others.
fn holder(n: usize, dead: usize) -> impl Fn(usize) -> usize {
    move |i| match i / dead.max(1) {
        0 => n - 1,
        1 => n - 2,
        _ => i % (n - 2),
    }
}

struct DirFigures {
    bytes_per_entry: f64,
    allocs_per_entry: f64,
    alloc_mib: f64,
    malloc_mib: f64,
}

/// Builds one node's directory of every conn, measures its memory, then the CPU time of each
/// operation on it. Returns the figures and the costs for the simulation.
fn measure_directory(n: usize, conns: &[String], dead: usize, costs: &mut Costs) -> DirFigures {
    let h = holder(n, dead);
    let names: Vec<String> = (0..n).map(node_name).collect();
    // Measured from before the events are built to after they are consumed (the strings they
    // carry are moved in and dropped): only what the directory keeps remains.
    let (b0, a0, r0) = (
        BYTES.load(Ordering::Relaxed),
        ALLOCS.load(Ordering::Relaxed),
        malloc_in_use(),
    );
    let events: Vec<DirEvent> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| DirEvent::Own {
            conn: c.clone(),
            node: names[h(i)].clone(),
            epoch: (1_700_000_000_000u64 << 16) + i as u64,
        })
        .collect();
    let mut d = Directory::new(node_name(0));
    for ev in events {
        d.apply(ev);
    }
    let (b1, a1, r1) = (
        BYTES.load(Ordering::Relaxed),
        ALLOCS.load(Ordering::Relaxed),
        malloc_in_use(),
    );
    let len = conns.len() as f64;
    let bytes = (b1 - b0) as f64;
    let fig = DirFigures {
        bytes_per_entry: bytes / len,
        allocs_per_entry: (a1 - a0) as f64 / len,
        alloc_mib: bytes / MIB,
        malloc_mib: r1.saturating_sub(r0) as f64 / MIB,
    };

    // CPU per operation on a directory of this size.
    let mut rng = Rng::new(7);
    let fresh: Vec<String> = (0..20_000).map(|_| conn_id(&mut rng)).collect();
    let epoch = (1_800_000_000_000u64) << 16;
    let evs: Vec<DirEvent> = fresh
        .iter()
        .map(|c| DirEvent::Own {
            conn: c.clone(),
            node: names[1].clone(),
            epoch,
        })
        .collect();
    let t = Instant::now();
    for ev in evs {
        d.apply(ev);
    }
    costs.apply_own = ns(t.elapsed(), fresh.len());
    let evs: Vec<DirEvent> = fresh
        .iter()
        .map(|c| DirEvent::Disown {
            conn: c.clone(),
            node: names[1].clone(),
            epoch,
        })
        .collect();
    let t = Instant::now();
    for ev in evs {
        d.apply(ev);
    }
    costs.apply_disown = ns(t.elapsed(), fresh.len());
    // A resync of a peer that replaces the same claims (a link that flapped).
    let claims = d.claims_of(&names[1]);
    let k = claims.len();
    let t = Instant::now();
    d.apply(DirEvent::Resync {
        node: names[1].clone(),
        claims,
    });
    costs.resync_per_claim = ns(t.elapsed(), k);
    // The victim's death.
    let t = Instant::now();
    d.apply(DirEvent::NodeGone {
        node: names[n - 1].clone(),
    });
    costs.node_gone_per_claim = ns(t.elapsed(), dead);
    fig
}

/// Seal/open CPU through a real link (handshake over an in-memory stream), and a check that
/// `sim::wire_len` matches the bytes `Sealer::seal` really produces.
fn measure_link(costs: &mut Costs) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (a, b) = rt.block_on(async {
        let (mut sa, mut sb) = tokio::io::duplex(1 << 16);
        let la = Local {
            cluster: "sim",
            node: "node-00",
            secret: b"s",
            max_frame: 1 << 20,
        };
        let lb = Local {
            cluster: "sim",
            node: "node-01",
            secret: b"s",
            max_frame: 1 << 20,
        };
        let ta = handshake::run(&mut sa, &la, Role::Dialer, Some("node-01"), |_| true);
        let tb = handshake::run(&mut sb, &lb, Role::Acceptor, None, |_| true);
        let (a, b) = tokio::join!(ta, tb);
        (a.expect("handshake"), b.expect("handshake"))
    });
    let (_, mut seal) = a.channel.split();
    let (mut open, _) = b.channel.split();
    let mut rng = Rng::new(3);
    let own = Frame::Own {
        conn: conn_id(&mut rng),
        epoch: (1_700_000_000_000u64 << 16) | 5,
    };
    let k = 100_000;
    let mut buf = Vec::new();
    let t = Instant::now();
    for _ in 0..k {
        buf.extend_from_slice(seal.seal(&own).expect("seal"));
    }
    costs.seal_small = ns(t.elapsed(), k);
    assert_eq!(
        buf.len(),
        k * wire_len(proto::encode(&own).expect("encode").len()),
        "wire_len disagrees with link.rs"
    );
    let t = Instant::now();
    rt.block_on(async {
        let mut r = &buf[..];
        for _ in 0..k {
            open.read_frame(&mut r).await.expect("open").expect("frame");
        }
    });
    costs.open_small = ns(t.elapsed(), k);
    // One ~1 MiB resync chunk, sealed and opened 16 times.
    let claims: Vec<(String, u64)> = (0..30_000).map(|i| (conn_id(&mut rng), i)).collect();
    let big = resync_chunks(claims, 1 << 20).remove(0);
    let len = proto::encode(&big).expect("encode").len();
    let mut buf = Vec::new();
    let reps = 16;
    let t = Instant::now();
    for _ in 0..reps {
        buf.extend_from_slice(seal.seal(&big).expect("seal"));
    }
    costs.seal_per_byte_ps = (t.elapsed().as_nanos() * 1000 / (len * reps) as u128) as u64;
    assert_eq!(buf.len(), reps * wire_len(len), "wire_len disagrees with link.rs");
    let t = Instant::now();
    rt.block_on(async {
        let mut r = &buf[..];
        for _ in 0..reps {
            open.read_frame(&mut r).await.expect("open").expect("frame");
        }
    });
    costs.open_per_byte_ps = (t.elapsed().as_nanos() * 1000 / (len * reps) as u128) as u64;
}

/// One node death and its wallets' reconnection.
struct Death {
    spread_ms: u64,
    routing_ms: f64,
    /// Routing converged this long after the last wallet reconnected.
    lag_ms: f64,
    cleanup_ms: f64,
    own_frames: u64,
    wire_mib: f64,
    busiest_cpu_ms: f64,
    agree: Result<(), String>,
}

struct SimFigures {
    own_frames: f64,
    own_wire: f64,
    disown_frames: f64,
    disown_wire: f64,
    queued_frames: f64,
    queued_wire: f64,
    flap_frames: u64,
    flap_wire: u64,
    flap_claims: u64,
    flap_ms: f64,
    hb_frames_per_s: f64,
    deaths: Vec<Death>,
    join_frames: u64,
    join_wire_mib: f64,
    join_claims: u64,
    join_apply_ms: f64,
}

fn ms(t: u64) -> f64 {
    t as f64 / 1e6
}

fn run_sim(n: usize, conns: &[String], dead: usize, costs: Costs, full: usize) -> SimFigures {
    let mut p = Params::new(n);
    p.full = full;
    p.costs = costs;
    p.latency = Duration::from_micros(env("SIM_LATENCY_US", 250));
    let spread = env("SIM_SPREAD_MS", 1000u64) * 1_000_000;
    let mut s = Sim::new(p);
    s.preload(conns, holder(n, dead));
    let sec = 1_000_000_000u64;
    s.run_until(sec);

    // Heartbeats: frames per node per second, steady state.
    let hb0 = s.stats.heartbeat.frames;
    s.run_until(2 * sec);
    let hb_frames_per_s = (s.stats.heartbeat.frames - hb0) as f64 / n as f64;

    // Opens, closes, notifications.
    let ops = 1000;
    let mut rng = Rng::new(11);
    let fresh: Vec<(usize, String)> = (0..ops)
        .map(|_| (s.rng.below(n as u64 - 1) as usize, conn_id(&mut rng)))
        .collect();
    let before = s.stats.clone();
    for (a, c) in &fresh {
        s.open(*a, c);
    }
    let after_open = s.stats.clone();
    for (a, c) in &fresh {
        s.close(*a, c);
    }
    let after_close = s.stats.clone();
    for _ in 0..ops {
        let c = &conns[s.rng.below(conns.len() as u64) as usize];
        s.notify(0, c);
    }
    let after_notify = s.stats.clone();
    s.run_until(2 * sec + sec / 2);
    let per = |x: u64, y: u64| (x - y) as f64 / ops as f64;

    // A link flaps between node 0 (full) and node 1; node 1's sessions change meanwhile.
    s.cut(0, 1);
    let mine: Vec<String> = s.nodes[1].own.keys().take(100).cloned().collect();
    for c in &mine {
        s.close(1, c);
    }
    for _ in 0..100 {
        let c = conn_id(&mut rng);
        s.open(1, &c);
    }
    let r0 = s.stats.clone();
    let t_up = s.now();
    s.link_up(0, 1);
    let r1 = s.stats.clone();
    s.run_until(3 * sec);
    let flap_ms = ms(s.nodes[0].last_resync_done.saturating_sub(t_up));
    if let Some(bad) = s.check(3).first() {
        panic!("directories disagree before the node dies: {bad}");
    }

    // The last node dies, its wallets reconnect to random survivors over `spread`; then the
    // one before it dies and its wallets all reconnect at the same instant.
    let mut deaths = Vec::new();
    let mut t0 = 3 * sec;
    for (victim, spread) in [(n - 1, spread), (n - 2, 0)] {
        let lost: Vec<String> = s.nodes[victim].own.keys().cloned().collect();
        s.watch = lost.iter().map(|c| (c.clone(), ())).collect();
        let cpu0: Vec<u64> = s.nodes.iter().map(|x| x.cpu_ns).collect();
        let st0 = s.stats.clone();
        s.kill(victim, true);
        let mut last = t0;
        for c in lost {
            let at = t0 + s.rng.below(spread.max(1));
            last = last.max(at);
            let to = loop {
                let to = s.rng.below(n as u64) as usize;
                if s.nodes[to].alive {
                    break to;
                }
            };
            s.schedule_open(at, to, c);
        }
        let end = t0 + spread + s.p.failure_timeout.as_nanos() as u64 + 2 * sec;
        s.run_until(end);
        let survivors: Vec<usize> = (0..n).filter(|&i| s.nodes[i].alive).collect();
        let routing = survivors
            .iter()
            .map(|&i| s.nodes[i].last_watched_apply)
            .max()
            .unwrap_or(t0);
        let cleanup = survivors
            .iter()
            .map(|&i| s.nodes[i].down_at[victim].map_or(u64::MAX, |t| t - t0))
            .max()
            .unwrap_or(0);
        let busiest = survivors
            .iter()
            .map(|&i| s.nodes[i].cpu_ns - cpu0[i])
            .max()
            .unwrap_or(0);
        let bad = s.check(3);
        deaths.push(Death {
            spread_ms: spread / 1_000_000,
            routing_ms: ms(routing.saturating_sub(t0)),
            lag_ms: ms(routing.saturating_sub(last)),
            cleanup_ms: ms(cleanup),
            own_frames: s.stats.own.frames - st0.own.frames,
            wire_mib: (s.stats.own.wire_bytes - st0.own.wire_bytes) as f64 / MIB,
            busiest_cpu_ms: ms(busiest),
            agree: if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) },
        });
        t0 = end;
    }

    // A node (re)joins: every peer sends it its claims.
    let mut join_frames = 0u64;
    let mut join_wire = 0u64;
    let mut join_claims = 0u64;
    for i in 1..n - 2 {
        let mut v: Vec<(String, u64)> = s.nodes[i].own.iter().map(|(c, e)| (c.clone(), *e)).collect();
        v.sort();
        join_claims += v.len() as u64;
        for f in resync_chunks(v, s.p.max_frame) {
            join_frames += 1;
            join_wire += wire_len(proto::encode(&f).expect("encode").len()) as u64;
        }
    }
    let join_apply = join_claims * costs.resync_per_claim + join_wire * costs.open_per_byte_ps / 1000;

    SimFigures {
        own_frames: per(after_open.own.frames, before.own.frames),
        own_wire: per(after_open.own.wire_bytes, before.own.wire_bytes),
        disown_frames: per(after_close.disown.frames, after_open.disown.frames),
        disown_wire: per(after_close.disown.wire_bytes, after_open.disown.wire_bytes),
        queued_frames: per(after_notify.queued.frames, after_close.queued.frames),
        queued_wire: per(after_notify.queued.wire_bytes, after_close.queued.wire_bytes),
        flap_frames: r1.resync.frames - r0.resync.frames,
        flap_wire: r1.resync.wire_bytes - r0.resync.wire_bytes,
        flap_claims: r1.resync_claims - r0.resync_claims,
        flap_ms,
        hb_frames_per_s,
        deaths,
        join_frames,
        join_wire_mib: join_wire as f64 / MIB,
        join_claims,
        join_apply_ms: ms(join_apply),
    }
}

fn main() {
    // `cargo test` runs bench targets without `--bench`, in debug: not the place for this.
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("SIM_RUN").is_none() {
        println!("cluster_sim: run with `cargo bench --bench cluster_sim` (or SIM_RUN=1); skipped");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let nodes: Vec<usize> = std::env::var("SIM_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 32, 64]);
    let sessions: usize = env("SIM_SESSIONS", if quick { 100_000 } else { 1_000_000 });
    let dead: usize = env("SIM_DEAD", if quick { 5_000 } else { 50_000 });
    let full: usize = env("SIM_FULL", if quick { 1 } else { 2 });
    let started = Instant::now();
    println!(
        "cluster simulation: {sessions} sessions, {dead} on the node that dies, nodes {nodes:?}, \
         {full} full director{} per run",
        if full == 1 { "y" } else { "ies" }
    );

    let mut costs = Costs::default();
    measure_link(&mut costs);
    let mut rng = Rng::new(42);
    let conns: Vec<String> = (0..sessions).map(|_| conn_id(&mut rng)).collect();

    let mut rows = Vec::new();
    for &n in &nodes {
        assert!(n >= 3, "at least 3 nodes");
        assert!(2 * dead < sessions, "SIM_DEAD must be below SIM_SESSIONS / 2");
        let mut c = costs;
        let d = measure_directory(n, &conns, dead, &mut c);
        let t = Instant::now();
        let f = run_sim(n, &conns, dead, c, full);
        eprintln!("  {n} nodes simulated in {:.1} s", t.elapsed().as_secs_f64());
        rows.push((n, d, c, f));
    }

    let own = Frame::Own {
        conn: conns[0].clone(),
        epoch: (1_700_000_000_000u64 << 16) | 5,
    };
    let own_len = proto::encode(&own).map_or(0, |b| b.len());
    let claim_len = proto::encode(&Frame::Resync {
        claims: vec![Claim {
            conn: conns[0].clone(),
            epoch: (1_700_000_000_000u64 << 16) | 5,
        }],
        last: true,
    })
    .map_or(0, |b| b.len())
        - 3;
    println!();
    println!(
        "Per-frame CPU on this machine (real code): seal {} ns / open {} ns per small frame \
         (Own: {} B proto, {} B record, {} B on the link); large frames {:.2} / {:.2} ns per byte.",
        costs.seal_small,
        costs.open_small,
        own_len,
        own_len + 4,
        wire_len(own_len),
        costs.seal_per_byte_ps as f64 / 1000.0,
        costs.open_per_byte_ps as f64 / 1000.0
    );
    println!("A claim in a resync: {claim_len} B (uuid conn + varint epoch).");
    println!();
    println!("| nodes | links n(n-1)/2 | dir B/entry (alloc) | allocs/entry | dir MiB/node (alloc) | dir MiB/node (malloc) | Own apply ns | Disown ns | Resync ns/claim | NodeGone ns/claim |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, d, c, _) in &rows {
        println!(
            "| {n} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {} |",
            n * (n - 1) / 2,
            d.bytes_per_entry,
            d.allocs_per_entry,
            d.alloc_mib,
            d.malloc_mib,
            c.apply_own,
            c.apply_disown,
            c.resync_per_claim,
            c.node_gone_per_claim
        );
    }
    println!();
    println!("| nodes | frames/open | B/open (link) | frames/close | B/close (link) | frames/notification | B/notification | heartbeat frames/s per node |");
    println!("|---|---|---|---|---|---|---|---|");
    for (n, _, _, f) in &rows {
        println!(
            "| {n} | {:.2} | {:.0} | {:.2} | {:.0} | {:.3} | {:.1} | {:.0} |",
            f.own_frames, f.own_wire, f.disown_frames, f.disown_wire, f.queued_frames, f.queued_wire, f.hb_frames_per_s
        );
    }
    println!();
    println!("| nodes | link flap: resync frames (both ways) | claims | MiB on the link | receiver done after (ms, sim) | node joins: frames received | claims | MiB | apply (ms CPU) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n, _, _, f) in &rows {
        println!(
            "| {n} | {} | {} | {:.2} | {:.1} | {} | {} | {:.1} | {:.0} |",
            f.flap_frames,
            f.flap_claims,
            f.flap_wire as f64 / MIB,
            f.flap_ms,
            f.join_frames,
            f.join_claims,
            f.join_wire_mib,
            f.join_apply_ms
        );
    }
    println!();
    let lat = env("SIM_LATENCY_US", 250u64);
    let spread = env("SIM_SPREAD_MS", 1000u64);
    println!(
        "Node death: a node holding {dead} sessions dies (its peers read EOF); its wallets reconnect \
         to random survivors, spread over {spread} ms, then (a second node of {dead}) all at once. \
         {lat} us one-way per frame; failure timeout 3 s, heartbeat 500 ms. Times are simulated \
         (latency + queueing behind each node's measured CPU per frame), from the crash; \
         busiest CPU = the most any survivor spent on cluster frames from the crash to 2 s after \
         the failure timeout."
    );
    println!("| nodes | reconnects over (ms) | routing converged (ms) | after the last reconnect (ms) | dead node's claims dropped everywhere (ms) | cluster hops on the critical path | Own frames | MiB | busiest survivor CPU (ms) | directories = truth |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (n, _, _, f) in &rows {
        for d in &f.deaths {
            println!(
                "| {n} | {} | {:.1} | {:.1} | {:.1} | 1 (one-way Own) | {} | {:.1} | {:.1} | {} |",
                d.spread_ms,
                d.routing_ms,
                d.lag_ms,
                d.cleanup_ms,
                d.own_frames,
                d.wire_mib,
                d.busiest_cpu_ms,
                match &d.agree {
                    Ok(()) => "yes".to_string(),
                    Err(e) => format!("NO: {e}"),
                }
            );
        }
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if rows.iter().any(|r| r.3.deaths.iter().any(|d| d.agree.is_err())) {
        std::process::exit(1);
    }
}
