//! Scenarios `cluster`, `samenode`, `sweep`: live delivery latency across nodes.

use crate::{client::*, nodes::*, report::*, Didcomm, Opts};
use anyhow::{Context, Result};
use mailroom::client::WsEvent;
use mailroom::config::{Config, NodeEntry, Strategy};
use mailroom::node::{self, Listeners, NodeOptions, RunningNode};
use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// 3: cross-node live delivery latency (in-process nodes on PostgreSQL)
// ---------------------------------------------------------------------------------------------

pub(crate) struct Cluster {
    pub(crate) nodes: Vec<RunningNode>,
    pub(crate) db: Option<FreshDb>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first (they hold pool connections), then the database.
        for n in self.nodes.drain(..) {
            let _ = n.stop();
        }
        self.db.take();
    }
}

pub(crate) const SECRET: &str = "loadgen-cluster-secret";

/// `n` nodes on one fresh PostgreSQL database. With `cut`, every node's peer addresses point
/// at a closed port: no notifications, only the sweep delivers.
pub(crate) async fn start_cluster(o: &Opts, n: usize, cut: bool) -> Result<Cluster> {
    let db = FreshDb::create(&o.pg_admin).await?;
    let mut cfg = Config::single_node_default();
    cfg.nodes.clear();
    cfg.cluster.name = "loadgen".into();
    cfg.cluster.secret = Some(SECRET.into());
    cfg.store.backend = "postgres".into();
    cfg.store.url = Some(db.url());
    cfg.delivery.strategy = Strategy::QueueAndLiveModeDelivery;
    let mut ls = Vec::new();
    for i in 1..=n {
        let l = Listeners {
            public: TcpListener::bind("127.0.0.1:0")?,
            admin: TcpListener::bind("127.0.0.1:0")?,
            cluster: Some(TcpListener::bind("127.0.0.1:0")?),
        };
        cfg.nodes.push(NodeEntry {
            id: format!("n{i}"),
            listen: l.public.local_addr()?.to_string(),
            cluster: Some(l.cluster.as_ref().expect("bound").local_addr()?.to_string()),
            admin: l.admin.local_addr()?.to_string(),
        });
        ls.push(l);
    }
    if o.didcomm == Didcomm::V2 {
        // One v2 DID for the cluster (its services name this URL): a wallet onboarded on n1 is
        // routed through the same DID whichever node a forward reaches, as behind a load
        // balancer. v1 keeps each node's own URL in its invitation.
        cfg.cluster.public_url = Some(format!("http://{}", cfg.nodes[0].listen));
    }
    let store = open_shared_store(&cfg).await?;
    let mut c = Cluster {
        nodes: Vec::new(),
        db: Some(db),
    };
    for (i, l) in ls.into_iter().enumerate() {
        let id = format!("n{}", i + 1);
        let mut my = cfg.clone();
        if cut {
            for e in my.nodes.iter_mut().filter(|e| e.id != id) {
                e.cluster = Some(free_addr()?.to_string());
            }
        }
        c.nodes.push(node::spawn(
            my,
            &id,
            l,
            NodeOptions {
                store: Some(store.clone()),
                config_path: None,
            },
        )?);
    }
    if !cut {
        for a in &c.nodes {
            for b in &c.nodes {
                if a.node_id == b.node_id {
                    continue;
                }
                let url = format!("{}/status", a.admin_url());
                let peer = b.node_id.clone();
                wait_for("cluster links up", Duration::from_secs(30), || async {
                    let v = get_json(&url).await.ok()?;
                    v["peers"]
                        .as_array()?
                        .iter()
                        .any(|p| p["id"] == peer.as_str() && p["connected"] == true)
                        .then_some(())
                })
                .await?;
            }
        }
    }
    Ok(c)
}

pub(crate) struct LatencyResult {
    pub(crate) sent: usize,
    pub(crate) accepted: usize,
    pub(crate) delivered: usize,
    pub(crate) lat_us: Vec<u64>,
    pub(crate) before_2xx: usize,
    pub(crate) from_send_us: Vec<u64>,
    /// Delivery frames the socket read, and the store leases the socket's node took meanwhile.
    pub(crate) frames: usize,
    /// Per store operation on the socket's node (see [`HOME_OPS`]): how many ran meanwhile and
    /// their mean time in ms, from its `mailroom_store_seconds{op=...}`.
    pub(crate) home_ops: Vec<(&'static str, u64, f64)>,
    /// Empty when every accepted forward arrived; else why the receiver stopped waiting.
    pub(crate) ended: String,
    /// From the first scheduled POST to the last POST answered, in s: longer than the run's
    /// seconds when the box could not offer the rate (the senders fell behind their schedule).
    pub(crate) sending_secs: f64,
    /// The latest a POST left after its scheduled moment, in ms.
    pub(crate) max_late_ms: f64,
}

impl LatencyResult {
    /// A note when the senders could not keep the schedule (empty when they did, within 5%).
    pub(crate) fn slip_note(&self, secs: u64) -> String {
        if self.sending_secs <= secs as f64 * 1.05 {
            return String::new();
        }
        format!(
            "; the senders fell behind: the POSTs took {:.1} s for a {secs} s schedule (one left {:.0} ms late): the box did not offer the rate, and latencies count from each POST as it left",
            self.sending_secs, self.max_late_ms
        )
    }
}

/// Forwards POSTed to `via` at `rate`/s for `secs`; the wallet's live socket is on `home`;
/// latency = delivery frame read on the socket - POST's 2xx read. Deliveries are acknowledged
/// with messages-received over HTTP to `home`, as Credo 0.6.3 does, one in flight at a time:
/// the ids read while one is out go in the next (Credo sends one per delivery; a wallet sent
/// one message per delivery, at this rate, would be bound by its own acknowledgements).
/// Where a latency run sends: an in-process node or a child process.
pub(crate) struct Target {
    pub(crate) node_id: String,
    pub(crate) public_addr: SocketAddr,
    pub(crate) admin: String,
}

impl Target {
    pub(crate) fn of(n: &RunningNode) -> Target {
        Target {
            node_id: n.node_id.clone(),
            public_addr: n.public_addr,
            admin: n.admin_url(),
        }
    }
    /// The one node of a [`ChildNode`] (its id is always `n1`).
    pub(crate) fn child(n: &ChildNode) -> Target {
        Target {
            node_id: "n1".into(),
            public_addr: n.public,
            admin: n.admin_url(),
        }
    }
    pub(crate) fn public_url(&self) -> String {
        format!("http://{}", self.public_addr)
    }
    pub(crate) fn admin_url(&self) -> String {
        self.admin.clone()
    }
}

/// The store operations the socket's node runs for a live delivery and its acknowledgement.
const HOME_OPS: [&str; 3] = ["lease", "ack", "pending_stats"];

/// The node's store operations `op` so far: (how many, seconds in all).
async fn op_totals(admin: &str, op: &str) -> Option<(f64, f64)> {
    let n = metric(admin, &format!("mailroom_store_seconds_count{{op=\"{op}\"}}")).await?;
    let s = metric(admin, &format!("mailroom_store_seconds_sum{{op=\"{op}\"}}")).await?;
    Some((n, s))
}

async fn home_totals(admin: &str) -> Vec<Option<(f64, f64)>> {
    let mut v = Vec::new();
    for op in HOME_OPS {
        v.push(op_totals(admin, op).await);
    }
    v
}

/// `home_ops` lines: "lease 1234 x 1.40 ms, ack ...".
fn home_ops_note(ops: &[(&str, u64, f64)]) -> String {
    if ops.is_empty() {
        return "store times ?".into();
    }
    ops.iter()
        .map(|(op, n, mean)| format!("{op} {n} x {mean:.2} ms"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) async fn live_latency(
    o: &Opts,
    home: &Target,
    via: &Target,
    rate: u64,
    secs: u64,
    cut: bool,
) -> Result<LatencyResult> {
    let ws_url = format!("ws://{}/", home.public_addr);
    let wallets = onboard_wallets(o.didcomm, &home.public_url(), &ws_url, 1).await?;
    let w = Rc::new(wallets.into_iter().next().context("one wallet")?);
    let conn = get_json(&format!("{}/connections", home.admin_url())).await?["connections"][0]["id"]
        .as_str()
        .context("connection id")?
        .to_string();
    let ws = w.live_socket(&ws_url).await?;
    if !cut && home.node_id != via.node_id {
        let url = format!("{}/cluster", via.admin_url());
        wait_for(
            "the sending node sees the wallet's session owner",
            Duration::from_secs(30),
            || async {
                let v = get_json(&url).await.ok()?;
                v["cluster"]["directory"]
                    .as_array()?
                    .iter()
                    .any(|e| e["conn"] == conn.as_str() && e["node"] == home.node_id.as_str())
                    .then_some(())
            },
        )
        .await?;
    }
    let ops_before = home_totals(&home.admin_url()).await;
    let live_metric = format!(
        "mailroom_delivered_total{{path=\"live\",didcomm=\"{}\"}}",
        match o.didcomm {
            Didcomm::V1 => "v1",
            Didcomm::V2 => "v2",
        }
    );
    let live_before = metric(&home.admin_url(), &live_metric).await.unwrap_or(0.0);
    let n = (rate * secs) as usize;
    let to = w.recipient();
    let (envs, _) = build_forwards(std::slice::from_ref(&to), n, "lat", o.v2_pack)?;
    let host = via.public_addr.to_string();
    let reqs: Rc<Vec<Vec<u8>>> = Rc::new(envs.iter().map(|e| to.request(&host, e)).collect());
    let sent_at: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let ok_at: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let arrived: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let accepted = Rc::new(Cell::new(0usize));
    // When the last POST was answered (none yet: still sending); the receiver waits at least
    // 30 s past it.
    let sending_done_at: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
    let start = Instant::now() + Duration::from_millis(50);

    // Receiver: reads deliveries, stamps them on arrival, hands their ids to the acker.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let receiver = {
        let w = w.clone();
        let arrived = arrived.clone();
        let accepted = accepted.clone();
        let sending_done_at = sending_done_at.clone();
        let mut ws = ws;
        actix_rt::spawn(async move {
            let mut got = 0usize;
            let mut frames = 0usize;
            let hard = start + Duration::from_secs(secs + 40);
            let ended = loop {
                if sending_done_at.get().is_some() && got >= accepted.get() {
                    break String::new();
                }
                // Not while the senders still send (on a box that cannot offer the rate they
                // run late); then until 30 s past the last POST's answer at least.
                let until = match sending_done_at.get() {
                    None => Instant::now() + Duration::from_secs(1),
                    Some(t) => hard.max(t + Duration::from_secs(30)),
                };
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break format!(
                        "the receiver gave up {:.0} s after the first send, having read {got} of the forwards in {frames} frames",
                        until.saturating_duration_since(start).as_secs_f64()
                    );
                }
                let ev = match ws.next(left.min(Duration::from_millis(500))).await {
                    Ok(ev) => ev,
                    Err(_) => continue, // nothing within 500 ms: re-check the exit conditions
                };
                let now = Instant::now();
                let env = match ev {
                    WsEvent::Envelope(e) => e,
                    WsEvent::Closed(why) => break format!("the socket closed: {why:?}"),
                };
                let Some(opened) = w.delivery(&env, true) else { continue };
                frames += 1;
                let mut ids = Vec::new();
                for (id, content) in opened {
                    ids.push(id);
                    if let Some(i) = content.strip_prefix("lat-").and_then(|s| s.parse::<usize>().ok()) {
                        let mut a = arrived.borrow_mut();
                        if i < a.len() && a[i].is_none() {
                            a[i] = Some(now);
                            got += 1;
                        }
                    }
                }
                let _ = ack_tx.send(ids);
            };
            // Closed by the caller, once it has looked at the session (when some did not arrive).
            (got, frames, ended, ws)
        })
    };
    let acker = {
        let addr = home.public_addr;
        let home_host = home.public_addr.to_string();
        actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut n = 0u64;
            while let Some(mut ids) = ack_rx.recv().await {
                while let Ok(more) = ack_rx.try_recv() {
                    ids.extend(more);
                }
                let Ok(req) = w.ack_request(&home_host, ids) else {
                    continue;
                };
                if c.send(&req).await.is_ok() {
                    n += 1;
                }
            }
            n
        })
    };

    // Senders: K connections, one POST in flight each; request i leaves at start + i/rate.
    // Enough of them that a POST may take 40 ms and the rate still leaves on time (8, as
    // before 2026-12-02, kept 1,000/s only while a POST took under 8 ms: it took ~14 ms on
    // PostgreSQL, and the runs offered ~640/s).
    let k = (rate as usize / 25).clamp(8, 64);
    let max_late = Rc::new(Cell::new(Duration::ZERO));
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut senders = Vec::new();
    for j in 0..k {
        let reqs = reqs.clone();
        let sent_at = sent_at.clone();
        let ok_at = ok_at.clone();
        let accepted = accepted.clone();
        let max_late = max_late.clone();
        let addr = via.public_addr;
        senders.push(actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            for i in (j..reqs.len()).step_by(k) {
                let due = start + period * i as u32;
                tokio::time::sleep_until(due.into()).await;
                let t0 = Instant::now();
                max_late.set(max_late.get().max(t0.saturating_duration_since(due)));
                sent_at.borrow_mut()[i] = Some(t0);
                if let Ok((s, _)) = c.send(&reqs[i]).await {
                    if (200..300).contains(&s) {
                        ok_at.borrow_mut()[i] = Some(Instant::now());
                        accepted.set(accepted.get() + 1);
                    }
                }
            }
        }));
    }
    for s in senders {
        s.await?;
    }
    let sending_secs = start.elapsed().as_secs_f64();
    sending_done_at.set(Some(Instant::now()));
    let (delivered, frames, mut ended, ws) = receiver.await?;
    if !ended.is_empty() {
        // Where the rest is: still queued (pending or leased) on the wallet's connection?
        let q = get_json(&format!("{}/connections/{conn}", home.admin_url())).await;
        let sessions = get_json(&format!("{}/sessions", home.admin_url())).await;
        let directory = get_json(&format!("{}/cluster", via.admin_url())).await;
        let owner = directory.map(|v| {
            v["cluster"]["directory"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["conn"] == conn.as_str())
                .cloned()
                .collect::<Vec<_>>()
        });
        // Written by the node and not read: the receiver is behind; not written: the node is.
        let wrote = metric(&home.admin_url(), &live_metric)
            .await
            .map_or_else(|| "?".into(), |n| format!("{:.0}", n - live_before));
        ended = format!(
            "{ended}; {} had written {wrote} messages live to sockets meanwhile; its queue then: {}; {}'s sessions: {}; the sending node's directory for it: {:?}",
            home.node_id,
            q.map_or_else(|e| e.to_string(), |v| v["queue"].to_string()),
            home.node_id,
            sessions.map_or_else(|e| e.to_string(), |v| v["sessions"].to_string()),
            owner.map_err(|e| e.to_string()),
        );
    }
    ws.close().await;
    let _acks = acker.await?;
    let home_ops = HOME_OPS
        .iter()
        .zip(ops_before.into_iter().zip(home_totals(&home.admin_url()).await))
        .filter_map(|(op, (before, after))| {
            // An operation that had not run before the load has no sample yet.
            let ((n0, s0), (n1, s1)) = (before.unwrap_or((0.0, 0.0)), after?);
            (n1 > n0).then(|| (*op, (n1 - n0) as u64, (s1 - s0) * 1000.0 / (n1 - n0)))
        })
        .collect();
    let (sent, ok, arr) = (sent_at.borrow(), ok_at.borrow(), arrived.borrow());
    let mut lat = Vec::new();
    let mut from_send = Vec::new();
    let mut before = 0usize;
    for i in 0..n {
        if let (Some(s), Some(o), Some(a)) = (sent[i], ok[i], arr[i]) {
            if a < o {
                before += 1;
            }
            lat.push(a.saturating_duration_since(o).as_micros() as u64);
            from_send.push(a.saturating_duration_since(s).as_micros() as u64);
        }
    }
    lat.sort_unstable();
    from_send.sort_unstable();
    Ok(LatencyResult {
        sent: n,
        accepted: accepted.get(),
        delivered,
        lat_us: lat,
        before_2xx: before,
        from_send_us: from_send,
        frames,
        home_ops,
        ended,
        sending_secs,
        max_late_ms: max_late.get().as_secs_f64() * 1000.0,
    })
}

pub(crate) async fn cluster_latency(t: &mut Table, o: &Opts) -> Result<()> {
    let c = start_cluster(o, 3, false).await?;
    let r = live_latency(
        o,
        &Target::of(&c.nodes[0]),
        &Target::of(&c.nodes[1]),
        o.rate,
        o.secs,
        false,
    )
    .await?;
    let note = format!(
        "3 in-process nodes, one PostgreSQL{}; socket on n1, {}/s POSTed to n2 for {} s: {} sent, {} accepted, {} delivered live in {} frames (n1's store: {}){}{}; {} arrived before the POST's 2xx (counted 0); {}; max {} ms; from POST sent: p50 {} p99 {} ms",
        match o.didcomm {
            Didcomm::V1 => String::new(),
            Didcomm::V2 => format!("; v2 wallet (pickup 3.0 live mode), forwards {}", o.v2_pack.label()),
        },
        o.rate,
        o.secs,
        r.sent,
        r.accepted,
        r.delivered,
        r.frames,
        home_ops_note(&r.home_ops),
        r.slip_note(o.secs),
        if r.ended.is_empty() { String::new() } else { format!(" [{}]", r.ended) },
        r.before_2xx,
        tail(&r.lat_us),
        ms(r.lat_us.last().copied().unwrap_or(0)),
        ms(pct(&r.from_send_us, 0.5)),
        ms(pct(&r.from_send_us, 0.99)),
    );
    t.add(
        &format!("cross-node live delivery latency p50{}", o.tag()),
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        "POST 2xx on n2 -> delivery frame read on n1's socket".into(),
    );
    t.add(
        &format!("cross-node live delivery latency p99{}", o.tag()),
        ms(pct(&r.lat_us, 0.99)),
        "ms",
        "< 20 ms",
        note,
    );
    drop(c);
    Ok(())
}

/// Baselines for the cluster hop: the same measurement with the POSTs on the socket's own node,
/// on PostgreSQL (one in-process node) and on sled (a child process).
pub(crate) async fn same_node_latency(t: &mut Table, o: &Opts) -> Result<()> {
    for backend in ["PostgreSQL", "sled"] {
        let (r, what) = if backend == "sled" {
            let node = ChildNode::start(None).await?;
            let tg = Target::child(&node);
            (
                live_latency(o, &tg, &tg, o.rate, o.secs, false).await?,
                "a mailroom child process",
            )
        } else {
            let c = start_cluster(o, 1, false).await?;
            let tg = Target::of(&c.nodes[0]);
            (
                live_latency(o, &tg, &tg, o.rate, o.secs, false).await?,
                "one in-process node",
            )
        };
        t.add(
            &format!("same-node live delivery latency p50, {backend}{}", o.tag()),
            ms(pct(&r.lat_us, 0.50)),
            "ms",
            "",
            format!("baseline for the cluster hop: {what}, POSTs to the socket's own node"),
        );
        t.add(
            &format!("same-node live delivery latency p99, {backend}{}", o.tag()),
            ms(pct(&r.lat_us, 0.99)),
            "ms",
            "",
            format!(
                "{}/s for {} s: {} sent, {} accepted, {} delivered{}; {} arrived before the POST's 2xx; {}; from POST sent: p50 {} p99 {} ms",
                o.rate,
                o.secs,
                r.sent,
                r.accepted,
                r.delivered,
                r.slip_note(o.secs),
                r.before_2xx,
                tail(&r.lat_us),
                ms(pct(&r.from_send_us, 0.5)),
                ms(pct(&r.from_send_us, 0.99)),
            ),
        );
    }
    Ok(())
}

pub(crate) async fn sweep_latency(t: &mut Table, o: &Opts) -> Result<()> {
    let c = start_cluster(o, 2, true).await?;
    let sweep = Config::single_node_default().delivery.sweep_interval_ms;
    let r = live_latency(
        o,
        &Target::of(&c.nodes[0]),
        &Target::of(&c.nodes[1]),
        o.sweep_rate,
        o.secs,
        true,
    )
    .await?;
    let note = format!(
        "cluster link cut (peer addresses point at closed ports), sweep_interval_ms = {sweep} (default); {}/s POSTed to n2 for {} s: {} sent, {} accepted, {} delivered{}; max {} ms",
        o.sweep_rate,
        o.secs,
        r.sent,
        r.accepted,
        r.delivered,
        r.slip_note(o.secs),
        ms(r.lat_us.last().copied().unwrap_or(0)),
    );
    t.add(
        &format!("sweep-bound delivery latency p50 (no notifications){}", o.tag()),
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        "POST 2xx on n2 -> delivery on n1's socket, found by n1's sweep".into(),
    );
    t.add(
        &format!("sweep-bound delivery latency p99 (no notifications){}", o.tag()),
        ms(pct(&r.lat_us, 0.99)),
        "ms",
        &format!("<= {sweep} ms"),
        note,
    );
    drop(c);
    Ok(())
}
