//! The load driver and fault injector of `scripts/chaos.sh` (run it through the script, which
//! sets up PostgreSQL, the ports, the configs and nginx, and cleans up whatever happens).
//!
//!   chaos --spec WORK/spec.json --duration 60s --pg-restart "pg_ctlcluster ... restart"
//!
//! It starts one TCP proxy per ordered pair of nodes (each node's config reaches every peer's
//! cluster port through its own proxy, so the driver can cut the links of one node and leave
//! the others alone), starts the nodes (pid files where `scripts/cluster.sh down` finds them),
//! onboards wallets through the load balancer and then, for the set time, sends forwards from
//! several senders to wallets that are live (WebSocket, pickup 2.0 live mode), polling (pickup
//! 2.0 over HTTP) and offline-then-back, while it kills (-9) and restarts nodes, cuts and
//! restores a node's cluster links and restarts PostgreSQL, one fault at a time. Every forward
//! carries a unique content (`chaos-<n>`), so each delivery is matched to its send. After the
//! load, every wallet comes online and the driver waits (`--drain`) for everything answered
//! 2xx. It prints the table and exits 1 if a forward answered 2xx was never delivered (lost),
//! reached the wrong wallet, or a node died on its own; 2 if the run could not start.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mailroom::client::{basic_message, onboard_any, post, Agent, Sender, WsEvent};
use mailroom::didcomm::message::new_id;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "mailroom chaos driver (run through scripts/chaos.sh)")]
struct Args {
    /// JSON written by scripts/chaos.sh: public URL, nodes, proxies, binary.
    #[arg(long)]
    spec: PathBuf,
    /// How long the load (and the faults) last, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Forwards per second, all senders together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Wallets in WebSocket live mode.
    #[arg(long, default_value_t = 4)]
    live: usize,
    /// Wallets polling with pickup 2.0 over HTTP.
    #[arg(long, default_value_t = 3)]
    polling: usize,
    /// Wallets that go offline and come back (alternately over WebSocket and HTTP).
    #[arg(long, default_value_t = 3)]
    offline: usize,
    /// Mean time between the end of one fault's healing and the next fault.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_gap: Duration,
    /// Fault kinds, taken in turn in a shuffled order: kill, cut, pg.
    #[arg(long, default_value = "kill,cut,pg")]
    faults: String,
    /// After the load: how long to wait for every accepted forward to be delivered.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain: Duration,
    /// How long a fault is held before it is repaired: random, from a third of this to this
    /// (a cut longer than `failure_timeout_ms`, 3 s by default, makes the peers declare each
    /// other down).
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    hold: Duration,
    /// A fault not healed this long after its repair fails the run.
    #[arg(long, default_value = "45s", value_parser = parse_duration)]
    heal_within: Duration,
    /// Shell command that restarts PostgreSQL.
    #[arg(long)]
    pg_restart: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 20s, 2m)"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

#[derive(Deserialize, Clone, Debug)]
struct NodeSpec {
    id: String,
    listen: String,
    admin: String,
    /// This node's own config file (its peers' cluster addresses are proxies).
    config: PathBuf,
}

#[derive(Deserialize, Clone, Debug)]
struct ProxySpec {
    from: String,
    to: String,
    listen: SocketAddr,
    target: SocketAddr,
}

#[derive(Deserialize, Clone, Debug)]
struct Spec {
    public_url: String,
    bin: PathBuf,
    run_dir: PathBuf,
    nodes: Vec<NodeSpec>,
    proxies: Vec<ProxySpec>,
    /// Noted in the table.
    lease_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Cluster-link proxies: their own thread and runtime, so the driver's crypto never delays them.
// ---------------------------------------------------------------------------------------------

struct Proxies {
    /// (from, to) -> open?
    switches: HashMap<(String, String), tokio::sync::watch::Sender<bool>>,
}

impl Proxies {
    fn start(specs: &[ProxySpec]) -> Result<Proxies> {
        let mut switches = HashMap::new();
        let mut listeners = Vec::new();
        for p in specs {
            let l = std::net::TcpListener::bind(p.listen).with_context(|| format!("proxy bind {}", p.listen))?;
            l.set_nonblocking(true)?;
            let (tx, rx) = tokio::sync::watch::channel(true);
            switches.insert((p.from.clone(), p.to.clone()), tx);
            listeners.push((l, p.target, rx));
        }
        std::thread::Builder::new().name("proxies".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, target, rx) in listeners {
                    let l = tokio::net::TcpListener::from_std(l).expect("proxy listener");
                    tasks.push(tokio::spawn(proxy_loop(l, target, rx)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
        Ok(Proxies { switches })
    }

    /// Opens or cuts every link of `node` (both directions, with every peer).
    fn set_node(&self, node: &str, open: bool) {
        for ((from, to), tx) in &self.switches {
            if from == node || to == node {
                tx.send_replace(open);
            }
        }
    }
}

async fn proxy_loop(l: tokio::net::TcpListener, target: SocketAddr, rx: tokio::sync::watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            continue;
        };
        if !*rx.borrow() {
            drop(inbound); // cut: refused at once
            continue;
        }
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = rx.wait_for(|open| !*open) => {} // cut: both sides see the connection end
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes: started here, so a kill -9 is ours and a node that died on its own is seen.
// ---------------------------------------------------------------------------------------------

struct Nodes {
    spec: Spec,
    children: HashMap<String, Child>,
    /// Nodes that exited without being killed by us: (id, exit status).
    died: Vec<(String, String)>,
}

impl Nodes {
    fn start(&mut self, id: &str) -> Result<()> {
        let n = self.spec.nodes.iter().find(|n| n.id == id).context("no such node")?;
        let log_path = self.spec.run_dir.join(format!("{id}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.spec.bin)
            .arg("run")
            .arg("--config")
            .arg(&n.config)
            .arg("--node")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.spec.bin.display()))?;
        std::fs::write(self.spec.run_dir.join(format!("{id}.pid")), format!("{}\n", child.id()))?;
        self.children.insert(id.to_string(), child);
        Ok(())
    }

    fn kill9(&mut self, id: &str) {
        self.check();
        if let Some(mut c) = self.children.remove(id) {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Notes every node that exited on its own.
    fn check(&mut self) {
        let mut gone = Vec::new();
        for (id, c) in self.children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                gone.push((id.clone(), st.to_string()));
            }
        }
        for (id, st) in gone {
            self.children.remove(&id);
            eprintln!("[chaos] node {id} exited on its own: {st}");
            self.died.push((id, st));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The book: every forward sent, and what became of it.
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Live,
    Polling,
    Offline,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Live => "live (WebSocket, live mode)",
            Kind::Polling => "polling (pickup 2.0 over HTTP)",
            Kind::Offline => "offline-then-back",
        }
    }
}

#[derive(Clone, Debug)]
enum Answer {
    Pending,
    Status(u16),
    Error(String),
}

struct Sent {
    wallet: usize,
    probe: bool,
    /// Which fault was on (or healing) when it was sent.
    fault: Option<usize>,
    at: Instant,
    answer: Answer,
    answered_at: Option<Instant>,
    first_delivery: Option<Instant>,
    deliveries: u32,
}

#[derive(Default)]
struct Book {
    sent: Vec<Sent>,
    misdelivered: u64,
    undecryptable: u64,
    in_flight: usize,
    current_fault: Option<usize>,
}

type Shared = Rc<RefCell<Book>>;

const PREFIX: &str = "chaos-";

fn record_delivery(book: &Shared, wallet: usize, content: &str) {
    let Some(i) = content.strip_prefix(PREFIX).and_then(|s| s.parse::<usize>().ok()) else {
        return;
    };
    let now = Instant::now();
    let mut b = book.borrow_mut();
    let Some(s) = b.sent.get_mut(i) else {
        b.misdelivered += 1;
        return;
    };
    if s.wallet != wallet {
        b.misdelivered += 1;
        return;
    }
    s.deliveries += 1;
    if s.first_delivery.is_none() {
        s.first_delivery = Some(now);
    }
}

// ---------------------------------------------------------------------------------------------
// Wallets
// ---------------------------------------------------------------------------------------------

struct Wallet {
    idx: usize,
    kind: Kind,
    agent: Agent,
    key: String,
    routing: Vec<String>,
    reconnects: Cell<u64>,
}

fn pickup(name: &str, extra: Value) -> Value {
    let mut m = json!({
        "@type": format!("https://didcomm.org/messagepickup/2.0/{name}"),
        "@id": new_id(),
        "~transport": { "return_route": "all" },
    });
    if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    m
}

fn type_name(v: &Value) -> &str {
    v["@type"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// Records the contents of a delivery (or of a raw implicit push); returns the queue ids to
/// acknowledge.
fn take_delivery(book: &Shared, w: &Wallet, env: &[u8]) -> Vec<String> {
    let Ok((msg, _)) = w.agent.unpack(env) else {
        // `{"error":"busy"}` and the like are not envelopes.
        if serde_json::from_slice::<Value>(env)
            .map(|v| v.get("protected").is_some())
            .unwrap_or(false)
        {
            book.borrow_mut().undecryptable += 1;
        }
        return Vec::new();
    };
    match type_name(&msg) {
        "delivery" => match w.agent.open_delivery(&msg) {
            Ok(items) => items
                .into_iter()
                .map(|(id, inner)| {
                    record_delivery(book, w.idx, inner["content"].as_str().unwrap_or_default());
                    id
                })
                .collect(),
            Err(_) => {
                book.borrow_mut().undecryptable += 1;
                Vec::new()
            }
        },
        "message" => {
            record_delivery(book, w.idx, msg["content"].as_str().unwrap_or_default());
            Vec::new()
        }
        _ => Vec::new(),
    }
}

struct Flags {
    /// Everything ends.
    stop: Cell<bool>,
    /// The load is over: offline wallets stay online.
    draining: Cell<bool>,
}

/// A WebSocket in live mode until `until` (or the end), reconnecting through the load
/// balancer whenever the socket ends.
async fn live(w: Rc<Wallet>, ws_url: String, book: Shared, flags: Rc<Flags>, until: Option<Instant>) {
    let over = |flags: &Flags| flags.stop.get() || until.is_some_and(|u| Instant::now() >= u && !flags.draining.get());
    while !over(&flags) {
        let ws = tokio::time::timeout(Duration::from_secs(5), w.agent.websocket(&ws_url)).await;
        let mut ws = match ws {
            Ok(Ok(ws)) => ws,
            _ => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        w.reconnects.set(w.reconnects.get() + 1);
        let Ok(p) = w
            .agent
            .pack(&pickup("live-delivery-change", json!({"live_delivery": true})))
        else {
            return;
        };
        if ws.send_envelope(p, true).await.is_err() {
            continue;
        }
        while !over(&flags) {
            let ev = match tokio::time::timeout(Duration::from_millis(300), ws.next(Duration::from_secs(3600))).await {
                Err(_) => continue,
                Ok(Err(_)) | Ok(Ok(WsEvent::Closed(_))) => break,
                Ok(Ok(WsEvent::Envelope(e))) => e,
            };
            // A refusal in clear (`{"error": ...}`, e.g. store-unavailable while PostgreSQL
            // restarts) may have been the live-mode request itself: the socket is then bound
            // to nothing and would wait for good. Start over, as a wallet should.
            if serde_json::from_slice::<Value>(&ev).is_ok_and(|v| v.get("error").is_some()) {
                break;
            }
            let ids = take_delivery(&book, &w, &ev);
            if !ids.is_empty() {
                let Ok(p) = w
                    .agent
                    .pack(&pickup("messages-received", json!({ "message_id_list": ids })))
                else {
                    continue;
                };
                if ws.send_envelope(p, true).await.is_err() {
                    break;
                }
            }
        }
        ws.close().await;
        if !over(&flags) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Polls with pickup 2.0 over HTTP (through the load balancer) until `until` (or the end).
async fn polling(w: Rc<Wallet>, book: Shared, flags: Rc<Flags>, until: Option<Instant>) {
    let over = |flags: &Flags| flags.stop.get() || until.is_some_and(|u| Instant::now() >= u && !flags.draining.get());
    while !over(&flags) {
        let req = pickup("delivery-request", json!({"limit": 10}));
        let got = match (w.agent.pack(&req), w.agent.endpoint.clone()) {
            (Ok(env), ep) => post(&ep, env, Duration::from_secs(5)).await,
            (Err(e), _) => Err(e),
        };
        let mut more = false;
        if let Ok((s, body)) = got {
            if (200..300).contains(&s) && !body.is_empty() {
                let ids = take_delivery(&book, &w, &body);
                if !ids.is_empty() {
                    more = true;
                    let ack = pickup("messages-received", json!({ "message_id_list": ids }));
                    if let Ok(env) = w.agent.pack(&ack) {
                        let _ = post(&w.agent.endpoint, env, Duration::from_secs(5)).await;
                    }
                }
            }
        }
        if !more {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Offline for a while, online (WebSocket live mode or HTTP polling, by wallet) for a while,
/// again and again; online for good once the load is over.
async fn offline_then_back(w: Rc<Wallet>, ws_url: String, book: Shared, flags: Rc<Flags>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !flags.stop.get() {
        let off = Instant::now() + Duration::from_millis(rng.gen_range(2000..7000));
        while Instant::now() < off && !flags.draining.get() && !flags.stop.get() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let until = Some(Instant::now() + Duration::from_millis(rng.gen_range(1500..4000)));
        if w.idx % 2 == 0 {
            live(w.clone(), ws_url.clone(), book.clone(), flags.clone(), until).await;
        } else {
            polling(w.clone(), book.clone(), flags.clone(), until).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------

async fn get_json(url: &str) -> Result<(u16, Value)> {
    let client = awc::Client::builder().timeout(Duration::from_secs(3)).finish();
    let mut res = client.get(url).send().await.map_err(|e| anyhow!("GET {url}: {e}"))?;
    let status = res.status().as_u16();
    let v = res.json::<Value>().limit(16 << 20).await.unwrap_or(Value::Null);
    Ok((status, v))
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f().await {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what}: not within {within:?}")
}

/// Every node ready, and every node's /status shows every peer connected; else what is not.
async fn cluster_state(nodes: &[NodeSpec]) -> Result<(), String> {
    for n in nodes {
        let t = Instant::now();
        let ready = get_json(&format!("http://{}/ready", n.admin)).await;
        if t.elapsed() > Duration::from_secs(1) {
            // /ready checks the store: slow while the pool reconnects after PostgreSQL restarts.
            eprintln!(
                "[chaos]           {} /ready took {:.1} s",
                n.id,
                t.elapsed().as_secs_f64()
            );
        }
        match ready {
            Ok((200, _)) => {}
            Ok((s, v)) => return Err(format!("{} /ready {s} {v}", n.id)),
            Err(e) => return Err(format!("{} /ready: {e:#}", n.id)),
        }
        match get_json(&format!("http://{}/status", n.admin)).await {
            Ok((200, v)) => {
                let peers = v["peers"].as_array().cloned().unwrap_or_default();
                let down: Vec<&str> = peers
                    .iter()
                    .filter(|p| p["connected"].as_bool() != Some(true))
                    .filter_map(|p| p["id"].as_str())
                    .collect();
                if peers.len() + 1 != nodes.len() || !down.is_empty() {
                    return Err(format!("{}: peers not connected: {down:?}", n.id));
                }
            }
            Ok((s, _)) => return Err(format!("{} /status {s}", n.id)),
            Err(e) => return Err(format!("{} /status: {e:#}", n.id)),
        }
    }
    Ok(())
}

async fn all_ready_and_linked(nodes: &[NodeSpec]) -> bool {
    cluster_state(nodes).await.is_ok()
}

/// Waits until [`cluster_state`] is Ok; returns how long it took, or the last reason.
async fn wait_healed(nodes: &[NodeSpec], within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        match cluster_state(nodes).await {
            Ok(()) => return Ok(t0.elapsed()),
            Err(e) => {
                // Each new reason once, so a slow heal shows what it waited on.
                if e != last {
                    eprintln!("[chaos]         {:>5.1} s waiting: {e}", t0.elapsed().as_secs_f64());
                }
                last = e;
            }
        }
        if t0.elapsed() >= within {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Senders
// ---------------------------------------------------------------------------------------------

struct Targets {
    /// (recipient key, routing keys) per wallet index.
    keys: Vec<(String, Vec<String>)>,
}

/// Sends one forward (to `url`) and books it; returns its index.
fn send_one(book: &Shared, sender: &Sender, targets: &Targets, url: String, wallet: usize, probe: bool) -> usize {
    let idx = {
        let mut b = book.borrow_mut();
        let fault = b.current_fault;
        b.sent.push(Sent {
            wallet,
            probe,
            fault,
            at: Instant::now(),
            answer: Answer::Pending,
            answered_at: None,
            first_delivery: None,
            deliveries: 0,
        });
        b.in_flight += 1;
        b.sent.len() - 1
    };
    let (key, routing) = &targets.keys[wallet];
    let env = sender.forward_envelope(&basic_message(&format!("{PREFIX}{idx}")), key, routing);
    let book = book.clone();
    actix_rt::spawn(async move {
        let answer = match env {
            Ok(env) => match post(&url, env, Duration::from_secs(10)).await {
                Ok((s, _)) => Answer::Status(s),
                Err(e) => Answer::Error(format!("{e:#}")),
            },
            Err(e) => Answer::Error(format!("pack: {e:#}")),
        };
        let mut b = book.borrow_mut();
        b.in_flight -= 1;
        let s = &mut b.sent[idx];
        s.answer = answer;
        s.answered_at = Some(Instant::now());
    });
    idx
}

fn accepted(s: &Sent) -> bool {
    matches!(s.answer, Answer::Status(c) if (200..300).contains(&c))
}

// ---------------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FaultKind {
    Kill,
    Cut,
    Pg,
}

struct Fault {
    kind: FaultKind,
    node: Option<String>,
    at: Duration,
    held: Duration,
    /// From the repair to: every node ready and every link up (per /status).
    links_healed: Option<Duration>,
    /// From the repair to: a forward posted to the affected node (any node for PostgreSQL)
    /// answered 2xx and delivered to a live wallet.
    forward_healed: Option<Duration>,
    note: String,
}

impl Fault {
    fn describe(&self) -> String {
        describe(self.kind, self.node.as_deref())
    }
}

fn describe(kind: FaultKind, node: Option<&str>) -> String {
    match kind {
        FaultKind::Kill => format!("kill -9 {}, restart", node.unwrap_or("?")),
        FaultKind::Cut => format!("cut {}'s cluster links, restore", node.unwrap_or("?")),
        FaultKind::Pg => "restart PostgreSQL".to_string(),
    }
}

/// Runs a shell command off the event loop.
async fn shell(cmd: &str) -> Result<()> {
    let cmd = cmd.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = Command::new("sh").arg("-c").arg(&cmd).output();
        let _ = tx.send(r.map_err(anyhow::Error::from).and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(anyhow!(
                    "{cmd}: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        }));
    });
    rx.await.map_err(|_| anyhow!("shell thread gone"))?
}

struct Ctx {
    spec: Spec,
    book: Shared,
    targets: Rc<Targets>,
    live_wallets: Vec<usize>,
    t0: Instant,
}

/// After a repair: probes the affected node(s) with forwards to live wallets until one is
/// answered 2xx and delivered. Returns the time from `from`.
async fn probe_forward(ctx: &Ctx, node: Option<&str>, from: Instant, within: Duration) -> Option<Duration> {
    let sender = Sender::new();
    let urls: Vec<String> = ctx
        .spec
        .nodes
        .iter()
        .filter(|n| node.map_or(true, |id| id == n.id))
        .map(|n| format!("http://{}/", n.listen))
        .collect();
    let mut rng = StdRng::from_entropy();
    let mut probes: Vec<usize> = Vec::new();
    let deadline = from + within;
    let mut k = 0usize;
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        {
            let b = ctx.book.borrow();
            for &i in &probes {
                if let Some(t) = b.sent[i].first_delivery {
                    return Some(t.saturating_duration_since(from));
                }
            }
        }
        // One probe in flight at a time, a new one every 500 ms until one is answered 2xx,
        // then wait for it (and any earlier one) to arrive.
        let any_accepted = probes.iter().any(|&i| accepted(&ctx.book.borrow().sent[i]));
        if !any_accepted && Instant::now() >= next_send && !ctx.live_wallets.is_empty() {
            let w = ctx.live_wallets[rng.gen_range(0..ctx.live_wallets.len())];
            let url = urls[k % urls.len()].clone();
            k += 1;
            probes.push(send_one(&ctx.book, &sender, &ctx.targets, url, w, true));
            next_send = Instant::now() + Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn run_faults(
    ctx: Rc<Ctx>,
    nodes: Rc<RefCell<Nodes>>,
    proxies: Rc<Proxies>,
    args: Rc<Args>,
    end: Instant,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(args.seed.unwrap_or(0) ^ 0x5eed);
    let mut kinds: Vec<FaultKind> = args
        .faults
        .split(',')
        .filter_map(|k| match k.trim() {
            "kill" => Some(FaultKind::Kill),
            "cut" => Some(FaultKind::Cut),
            "pg" if args.pg_restart.is_some() => Some(FaultKind::Pg),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    let mut order: Vec<FaultKind> = Vec::new();
    // Let the load settle first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() + Duration::from_secs(2) < end {
        if order.is_empty() {
            use rand::seq::SliceRandom;
            kinds.shuffle(&mut rng);
            order = kinds.iter().rev().copied().collect();
        }
        let kind = order.pop().expect("refilled");
        let ids: Vec<String> = ctx.spec.nodes.iter().map(|n| n.id.clone()).collect();
        let node = ids[rng.gen_range(0..ids.len())].clone();
        let hold_ms = args.hold.as_millis().max(300) as u64;
        let hold = Duration::from_millis(rng.gen_range(hold_ms / 3..=hold_ms));
        let idx = out.len();
        ctx.book.borrow_mut().current_fault = Some(idx);
        let at = ctx.t0.elapsed();
        let mut note = String::new();
        let node_of = (kind != FaultKind::Pg).then_some(node.as_str());
        eprintln!(
            "[chaos] {:>6.1}s fault {}: {}",
            at.as_secs_f64(),
            idx + 1,
            describe(kind, node_of)
        );
        let (node, held) = match kind {
            FaultKind::Kill => {
                nodes.borrow_mut().kill9(&node);
                let t = Instant::now();
                tokio::time::sleep(hold).await;
                if let Err(e) = nodes.borrow_mut().start(&node) {
                    note = format!("restart failed: {e:#}");
                }
                (Some(node), t.elapsed())
            }
            FaultKind::Cut => {
                proxies.set_node(&node, false);
                let t = Instant::now();
                tokio::time::sleep(hold).await;
                proxies.set_node(&node, true);
                (Some(node), t.elapsed())
            }
            FaultKind::Pg => {
                let t = Instant::now();
                if let Err(e) = shell(args.pg_restart.as_deref().unwrap_or("true")).await {
                    note = format!("{e:#}");
                }
                (None, t.elapsed())
            }
        };
        eprintln!("[chaos]         repaired after {:.1} s", held.as_secs_f64());
        let repaired = Instant::now();
        let within = args.heal_within;
        let nodes_spec = ctx.spec.nodes.clone();
        let links = wait_healed(&nodes_spec, within);
        let fwd = probe_forward(&ctx, node.as_deref(), repaired, within);
        let (links_healed, forward_healed) = futures_util::join!(links, fwd);
        let links_healed = match links_healed {
            Ok(d) => Some(d),
            Err(last) => {
                note.push_str(&format!(" not ready/linked within {within:?} ({last});"));
                None
            }
        };
        if forward_healed.is_none() {
            note.push_str(&format!(" no probe forward delivered within {within:?};"));
        }
        eprintln!(
            "[chaos]         healed: ready+links {}, forward {}",
            fmt_opt(links_healed),
            fmt_opt(forward_healed)
        );
        out.push(Fault {
            kind,
            node,
            at,
            held,
            links_healed,
            forward_healed,
            note: note.trim().to_string(),
        });
        ctx.book.borrow_mut().current_fault = None;
        nodes.borrow_mut().check();
        let gap = Duration::from_millis(rng.gen_range(0..=(2 * args.fault_gap.as_millis() as u64)));
        tokio::time::sleep(gap.min(end.saturating_duration_since(Instant::now()))).await;
    }
    out
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1} s", d.as_secs_f64()))
        .unwrap_or_else(|| "NOT HEALED".into())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

async fn run(args: Args) -> Result<i32> {
    let spec: Spec =
        serde_json::from_slice(&std::fs::read(&args.spec).context("read --spec")?).context("parse --spec")?;
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let args = Rc::new(Args {
        seed: Some(seed),
        ..args
    });
    let started = Instant::now();
    let proxies = Rc::new(Proxies::start(&spec.proxies)?);
    let nodes = Rc::new(RefCell::new(Nodes {
        spec: spec.clone(),
        children: HashMap::new(),
        died: Vec::new(),
    }));
    for n in &spec.nodes {
        nodes.borrow_mut().start(&n.id)?;
    }
    let nodes_spec = spec.nodes.clone();
    wait_until("the nodes ready and linked", Duration::from_secs(60), || {
        all_ready_and_linked(&nodes_spec)
    })
    .await?;
    let public = spec.public_url.trim_end_matches('/').to_string();
    wait_until("the load balancer", Duration::from_secs(30), || {
        let u = format!("{public}/invitation");
        async move { matches!(get_json(&u).await, Ok((200, _))) }
    })
    .await?;
    eprintln!(
        "[chaos] cluster up: {} nodes behind {public} after {:.1} s; seed {seed}",
        spec.nodes.len(),
        started.elapsed().as_secs_f64()
    );

    // Wallets, onboarded through the load balancer (every step may land on another node).
    let (_, inv) = get_json(&format!("{public}/invitation")).await?;
    let target = mailroom::probe::Target::from_invitation(inv["invitation"].clone(), None, Duration::from_secs(20))
        .map_err(|e| anyhow!("{e}"))?;
    let mut wallets = Vec::new();
    let kinds = std::iter::repeat(Kind::Live)
        .take(args.live)
        .chain(std::iter::repeat(Kind::Polling).take(args.polling))
        .chain(std::iter::repeat(Kind::Offline).take(args.offline));
    for (idx, kind) in kinds.enumerate() {
        let w = onboard_any(&target)
            .await
            .with_context(|| format!("onboard wallet {idx}"))?;
        let (agent, k, routing) = (
            w.agent.with_timeout(Duration::from_secs(5)),
            w.key,
            w.grant.routing_keys,
        );
        wallets.push(Rc::new(Wallet {
            idx,
            kind,
            agent,
            key: k.verkey(),
            routing,
            reconnects: Cell::new(0),
        }));
    }
    if wallets.is_empty() {
        bail!("no wallets");
    }
    let targets = Rc::new(Targets {
        keys: wallets.iter().map(|w| (w.key.clone(), w.routing.clone())).collect(),
    });
    let book: Shared = Rc::new(RefCell::new(Book::default()));
    let flags = Rc::new(Flags {
        stop: Cell::new(false),
        draining: Cell::new(false),
    });
    let ws_url = mailroom::config::ws_url(&public);
    let mut tasks = Vec::new();
    for w in &wallets {
        let (w, book, flags, ws_url) = (w.clone(), book.clone(), flags.clone(), ws_url.clone());
        tasks.push(match w.kind {
            Kind::Live => actix_rt::spawn(live(w, ws_url, book, flags, None)),
            Kind::Polling => actix_rt::spawn(polling(w, book, flags, None)),
            Kind::Offline => {
                let s = seed ^ (w.idx as u64) << 8;
                actix_rt::spawn(offline_then_back(w, ws_url, book, flags, s))
            }
        });
    }
    eprintln!(
        "[chaos] {} wallets onboarded after {:.1} s",
        wallets.len(),
        started.elapsed().as_secs_f64()
    );
    // Let the live wallets bind their sockets before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t0 = Instant::now();
    let end = t0 + args.duration;
    let ctx = Rc::new(Ctx {
        spec: spec.clone(),
        book: book.clone(),
        targets: targets.clone(),
        live_wallets: wallets.iter().filter(|w| w.kind == Kind::Live).map(|w| w.idx).collect(),
        t0,
    });
    let faults = actix_rt::spawn(run_faults(
        ctx.clone(),
        nodes.clone(),
        proxies.clone(),
        args.clone(),
        end,
    ));
    let mut senders = Vec::new();
    let period = Duration::from_secs_f64(args.senders.max(1) as f64 / args.rate.max(0.1));
    for j in 0..args.senders.max(1) {
        let (book, targets, public) = (book.clone(), targets.clone(), public.clone());
        let seed = seed ^ (j as u64 + 1) << 16;
        let n_senders = args.senders.max(1) as u32;
        senders.push(actix_rt::spawn(async move {
            let sender = Sender::new();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut next = t0 + period * j as u32 / n_senders;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                next += period;
                let w = rng.gen_range(0..targets.keys.len());
                send_one(&book, &sender, &targets, format!("{public}/"), w, false);
            }
        }));
    }
    for s in senders {
        let _ = s.await;
    }
    let load_secs = t0.elapsed();
    let faults = faults.await.unwrap_or_default();
    eprintln!("[chaos] {:>6.1}s load over; faults over", t0.elapsed().as_secs_f64());
    // Answers still on the way.
    let _ = wait_until("answers", Duration::from_secs(15), || {
        let b = book.clone();
        async move { b.borrow().in_flight == 0 }
    })
    .await;
    // Drain: everyone online; wait for every accepted forward.
    flags.draining.set(true);
    let drain_start = Instant::now();
    let drained = wait_until("drain", args.drain, || {
        let b = book.clone();
        async move {
            b.borrow()
                .sent
                .iter()
                .all(|s| !accepted(s) || s.first_delivery.is_some())
        }
    })
    .await
    .ok();
    eprintln!("[chaos] {:>6.1}s drain over", t0.elapsed().as_secs_f64());
    // A moment more to see late duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    flags.stop.set(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    eprintln!("[chaos] {:>6.1}s wallets stopped", t0.elapsed().as_secs_f64());
    nodes.borrow_mut().check();

    // ---- the table ----
    let b = book.borrow();
    let load: Vec<&Sent> = b.sent.iter().filter(|s| !s.probe).collect();
    let probes: Vec<&Sent> = b.sent.iter().filter(|s| s.probe).collect();
    let mut by_status: HashMap<String, u64> = HashMap::new();
    for s in &load {
        let k = match &s.answer {
            Answer::Status(c) if (200..300).contains(c) => continue,
            Answer::Status(c) => c.to_string(),
            Answer::Error(e) if e.contains("imeout") => "timeout".into(),
            Answer::Error(_) => "connection error".into(),
            Answer::Pending => "no answer".into(),
        };
        *by_status.entry(k).or_default() += 1;
    }
    let count = |v: &[&Sent], f: &dyn Fn(&Sent) -> bool| v.iter().filter(|s| f(s)).count();
    let sent_n = load.len();
    let acc_n = count(&load, &accepted);
    let deliv_acc = count(&load, &|s| accepted(s) && s.first_delivery.is_some());
    let lost: Vec<(usize, &Sent)> = b
        .sent
        .iter()
        .enumerate()
        .filter(|(_, s)| accepted(s) && s.first_delivery.is_none())
        .collect();
    let dup = count(&load, &|s| s.deliveries > 1);
    let dup_extra: u32 = load.iter().map(|s| s.deliveries.saturating_sub(1)).sum();
    let deliv_unacc = count(&load, &|s| !accepted(s) && s.first_delivery.is_some());
    let mut refused: Vec<String> = by_status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    refused.sort();
    let lat = |kind: Option<Kind>| -> Vec<Duration> {
        let mut v: Vec<Duration> = load
            .iter()
            .filter(|s| accepted(s) && kind.map_or(true, |k| wallets[s.wallet].kind == k))
            .filter_map(|s| Some(s.first_delivery?.saturating_duration_since(s.answered_at?)))
            .collect();
        v.sort();
        v
    };
    let machine = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!();
    println!(
        "mailroom chaos: {} nodes on PostgreSQL behind nginx; {:.0} s of load at {} forwards/s from {} senders to {} wallets ({} live over WebSocket, {} polling over HTTP, {} offline-then-back); {} faults; lease_ms {}; seed {seed}; load average {machine} on {cores} cores at the end",
        spec.nodes.len(),
        load_secs.as_secs_f64(),
        args.rate,
        args.senders,
        wallets.len(),
        args.live,
        args.polling,
        args.offline,
        faults.len(),
        spec.lease_ms,
    );
    println!();
    println!("| forwards | count | |");
    println!("| --- | ---: | --- |");
    println!("| sent | {sent_n} | |");
    println!("| accepted (2xx) | {acc_n} | |");
    println!(
        "| not accepted | {} | {} (the sender knows: not the mediator's to keep) |",
        sent_n - acc_n,
        if refused.is_empty() {
            "-".to_string()
        } else {
            refused.join(", ")
        }
    );
    println!("| delivered (of accepted) | {deliv_acc} | |");
    println!(
        "| **lost** (accepted, never delivered) | **{}** | must be 0 |",
        lost.len()
    );
    println!(
        "| duplicated | {dup} ({dup_extra} extra deliveries) | allowed: at-least-once (ARCHITECTURE.md, Delivery guarantees) |"
    );
    println!(
        "| delivered though not answered 2xx | {deliv_unacc} | allowed (the commit happened, the answer was lost) |"
    );
    println!(
        "| delivered to the wrong wallet / undecryptable | {} / {} | must be 0 |",
        b.misdelivered, b.undecryptable
    );
    println!(
        "| probes (forwards posted straight to a repaired node) | {} sent, {} accepted, {} delivered | counted in lost too |",
        probes.len(),
        count(&probes, &accepted),
        count(&probes, &|s| accepted(s) && s.first_delivery.is_some())
    );
    println!();
    println!("| delivery latency (2xx to first delivery) | n | p50 | p99 | max | duplicated |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, k) in [
        ("all wallets", None),
        (Kind::Live.name(), Some(Kind::Live)),
        (Kind::Polling.name(), Some(Kind::Polling)),
        (Kind::Offline.name(), Some(Kind::Offline)),
    ] {
        let v = lat(k);
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(&v, 50.0)),
            ms(pct(&v, 99.0)),
            ms(v.last().copied().unwrap_or_default()),
            load.iter()
                .filter(|s| s.deliveries > 1 && k.map_or(true, |k| wallets[s.wallet].kind == k))
                .count()
        );
    }
    println!();
    println!(
        "| # | at | fault | held | healed: all ready, all links up | healed: forward to it delivered | sent during it: accepted / sent, duplicated | note |"
    );
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |");
    for (i, f) in faults.iter().enumerate() {
        let during: Vec<&Sent> = load.iter().copied().filter(|s| s.fault == Some(i)).collect();
        println!(
            "| {} | {:.1} s | {} | {:.1} s | {} | {} | {} / {}, {} | {} |",
            i + 1,
            f.at.as_secs_f64(),
            f.describe(),
            f.held.as_secs_f64(),
            fmt_opt(f.links_healed),
            fmt_opt(f.forward_healed),
            count(&during, &accepted),
            during.len(),
            count(&during, &|s| s.deliveries > 1),
            f.note
        );
    }
    println!();
    let sockets = |k: Kind| -> u64 { wallets.iter().filter(|w| w.kind == k).map(|w| w.reconnects.get()).sum() };
    println!(
        "WebSocket sessions opened: {} by the {} live wallets (so {} reconnections after a drop), {} by the offline-then-back ones; drain after the load: {}",
        sockets(Kind::Live),
        args.live,
        sockets(Kind::Live).saturating_sub(args.live as u64),
        sockets(Kind::Offline),
        match drained {
            Some(d) => format!("everything accepted delivered {:.1} s after the load ended", d.as_secs_f64()),
            None => format!("NOT complete after {:.0} s", drain_start.elapsed().as_secs_f64()),
        }
    );
    let mut rc = 0;
    if !lost.is_empty() {
        rc = 1;
        println!("FAIL: {} forwards answered 2xx were never delivered:", lost.len());
        for (i, s) in lost.iter().take(50) {
            let at = s.at.saturating_duration_since(t0);
            let near = match s.fault {
                Some(f) => format!("during fault {} ({})", f + 1, faults[f].describe()),
                None => match faults.iter().enumerate().find(|(_, f)| f.at >= at) {
                    Some((k, f)) => format!(
                        "{:.2} s before fault {} ({})",
                        (f.at - at).as_secs_f64(),
                        k + 1,
                        f.describe()
                    ),
                    None => "after the last fault".into(),
                },
            };
            println!(
                "  {PREFIX}{i}: {}wallet {} ({}), sent at {:.2} s, {near}, answered {:?} {:.2} s later",
                if s.probe { "probe, " } else { "" },
                s.wallet,
                wallets[s.wallet].kind.name(),
                at.as_secs_f64(),
                s.answer,
                s.answered_at
                    .map(|a| a.saturating_duration_since(s.at).as_secs_f64())
                    .unwrap_or(0.0)
            );
        }
    }
    if b.misdelivered > 0 || b.undecryptable > 0 {
        rc = 1;
        println!("FAIL: messages reached the wrong wallet or could not be opened");
    }
    let died = &nodes.borrow().died;
    if !died.is_empty() {
        rc = 1;
        for (id, st) in died {
            println!("FAIL: node {id} exited on its own ({st}); see its log");
        }
    }
    if faults
        .iter()
        .any(|f| f.links_healed.is_none() || f.forward_healed.is_none())
    {
        rc = 1;
        println!("FAIL: a fault did not heal");
    }
    if rc == 0 {
        println!("PASS: lost 0 of {} accepted", acc_n + count(&probes, &accepted));
    }
    Ok(rc)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match actix_rt::System::new().block_on(run(args)) {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("[chaos] could not run: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
