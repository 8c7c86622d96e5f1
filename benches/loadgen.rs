//! mailroom load generator: measures the figures the project is judged on and prints them as
//! one table (metric, value, unit, target, note). Run through `scripts/bench.sh` or
//! `cargo bench --bench loadgen`; method and recorded figures are in `docs/BENCHMARKS.md`.
//!
//! Sections (all traffic on 127.0.0.1, every loop bounded in count and time):
//! - `crypto`:   the crypto floor: `didcomm::envelope::unpack` of one anoncrypt forward.
//! - `sled`/`pg`: forwards accepted/s by one `mailroom` child process (sled / PostgreSQL),
//!   request latency p50/p99, and the child's CPU time per accepted forward.
//! - `cluster`:  cross-node live delivery latency on 3 in-process nodes sharing PostgreSQL.
//! - `samenode`: the same with the POSTs on the socket's own node (baseline for the hop).
//! - `sweep`:    the same with the cluster link cut: delivery bounded by the sweep interval.
//! - `sessions`: RSS per idle bound WebSocket session of a `mailroom` child process.
//! - `live`:     delivered msg/s to one wallet in live mode (1,000 queued, delivered, acked).
//!
//! Knobs (environment): LOADGEN_ONLY (comma list of sections), LOADGEN_SECS (10),
//! LOADGEN_WARMUP_MS (1000), LOADGEN_SENDERS (64), LOADGEN_ENVELOPES (60000),
//! LOADGEN_WALLETS (16), LOADGEN_RATE (200), LOADGEN_SWEEP_RATE (50), LOADGEN_SESSIONS (5000),
//! LOADGEN_LIVE_MSGS (1000), LOADGEN_PG (admin connection string), LOADGEN_MD (write the table
//! as Markdown to this file too), LOADGEN_RUN=1 (run when started without `--bench`).

use anyhow::{anyhow, bail, Context, Result};
use mailroom::client::{basic_message, Agent, Invitation, Sender, WsClient, WsEvent};
use mailroom::config::{Config, NodeEntry, Strategy};
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::message::new_id;
use mailroom::node::{self, Listeners, NodeOptions, RunningNode};
use mailroom::store::Store;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Options and the result table
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Opts {
    only: Option<Vec<String>>,
    secs: u64,
    warmup_ms: u64,
    senders: usize,
    envelopes: usize,
    wallets: usize,
    rate: u64,
    sweep_rate: u64,
    sessions: usize,
    live_msgs: usize,
    pg_admin: String,
    md: Option<String>,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Opts {
    fn from_env() -> Opts {
        Opts {
            only: std::env::var("LOADGEN_ONLY")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.split(',').map(|x| x.trim().to_string()).collect()),
            secs: env_num("LOADGEN_SECS", 10u64).clamp(1, 120),
            warmup_ms: env_num("LOADGEN_WARMUP_MS", 1000u64).min(10_000),
            senders: env_num("LOADGEN_SENDERS", 64usize).clamp(1, 1024),
            envelopes: env_num("LOADGEN_ENVELOPES", 60_000usize).clamp(100, 1_000_000),
            wallets: env_num("LOADGEN_WALLETS", 16usize).clamp(1, 256),
            rate: env_num("LOADGEN_RATE", 200u64).clamp(1, 5_000),
            sweep_rate: env_num("LOADGEN_SWEEP_RATE", 50u64).clamp(1, 1_000),
            sessions: env_num("LOADGEN_SESSIONS", 5_000usize).clamp(10, 50_000),
            live_msgs: env_num("LOADGEN_LIVE_MSGS", 1_000usize).clamp(10, 9_000),
            pg_admin: std::env::var("LOADGEN_PG")
                .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into()),
            md: std::env::var("LOADGEN_MD").ok().filter(|s| !s.is_empty()),
        }
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .map(|o| o.iter().any(|s| s == section))
            .unwrap_or(true)
    }
}

struct Row {
    metric: String,
    value: String,
    unit: String,
    target: String,
    note: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(&mut self, metric: &str, value: String, unit: &str, target: &str, note: String) {
        eprintln!("  -> {metric}: {value} {unit} ({note})");
        self.rows.push(Row {
            metric: metric.into(),
            value,
            unit: unit.into(),
            target: target.into(),
            note,
        });
    }

    fn failed(&mut self, section: &str, e: &anyhow::Error) {
        self.add(&format!("{section}: FAILED"), "-".into(), "", "", format!("{e:#}"));
    }

    fn print(&self) {
        let heads = ["metric", "value", "unit", "target", "note"];
        let cols = |r: &Row| -> [String; 5] {
            [
                r.metric.clone(),
                r.value.clone(),
                r.unit.clone(),
                r.target.clone(),
                r.note.clone(),
            ]
        };
        let mut w = heads.map(|h| h.len());
        for r in &self.rows {
            for (i, c) in cols(r).iter().enumerate().take(4) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |c: [String; 5]| {
            format!(
                "{:<w0$} | {:>w1$} | {:<w2$} | {:<w3$} | {}",
                c[0],
                c[1],
                c[2],
                c[3],
                c[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3]
            )
        };
        println!();
        println!("{}", line(heads.map(String::from)));
        println!("{}", "-".repeat(w.iter().take(4).sum::<usize>() + 12 + 20));
        for r in &self.rows {
            println!("{}", line(cols(r)));
        }
        println!();
    }

    fn markdown(&self) -> String {
        let mut s = String::from("| metric | value | unit | target | note |\n|---|---:|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.metric,
                r.value,
                r.unit,
                r.target,
                r.note.replace('|', "/")
            ));
        }
        s
    }
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// p90/p95/p98 of a sorted latency list, for the notes.
fn tail(sorted: &[u64]) -> String {
    format!(
        "p90 {} p95 {} p98 {} ms",
        ms(pct(sorted, 0.90)),
        ms(pct(sorted, 0.95)),
        ms(pct(sorted, 0.98))
    )
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

// ---------------------------------------------------------------------------------------------
// Process figures: CPU time and RSS from /proc
// ---------------------------------------------------------------------------------------------

fn clk_tck() -> f64 {
    static T: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of a process, seconds (`pid` "self" for this one).
fn cpu_secs(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ut: f64 = f.get(11).context("utime")?.parse()?;
    let st: f64 = f.get(12).context("stime")?.parse()?;
    Ok((ut + st) / clk_tck())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "{cores} cores ({cpu}), {} GiB RAM, load average {}",
        mem / (1 << 20),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client: pre-built requests, one in flight per connection, so the
// load generator spends as little of the shared CPU as possible.
// ---------------------------------------------------------------------------------------------

fn build_request(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        mailroom::client::CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

struct RawConn {
    addr: SocketAddr,
    stream: Option<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl RawConn {
    fn new(addr: SocketAddr) -> RawConn {
        RawConn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends a pre-built request; returns (status, body). Reconnects once if a kept-alive
    /// connection was closed under us.
    async fn send(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        let reused = self.stream.is_some();
        match tokio::time::timeout(Duration::from_secs(30), self.try_send(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) if reused => {
                self.stream = None;
                tokio::time::timeout(Duration::from_secs(30), self.try_send(req))
                    .await
                    .map_err(|_| anyhow!("request timed out"))?
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("request timed out")
            }
        }
    }

    async fn try_send(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected above");
        s.write_all(req).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 64 * 1024 {
                bail!("response head too long");
            }
            if s.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed");
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .context("status line")?;
        let mut len = 0usize;
        let mut close = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => len = v.parse().context("content-length")?,
                "connection" => close = v.eq_ignore_ascii_case("close"),
                "transfer-encoding" => bail!("chunked responses are not supported here"),
                _ => {}
            }
        }
        while self.buf.len() < head_end + len {
            if s.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed in body");
            }
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

async fn get_json(url: &str) -> Result<Value> {
    let mut res = awc::Client::default()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| anyhow!("GET {url}: {e}"))?;
    if !res.status().is_success() {
        bail!("GET {url}: {}", res.status());
    }
    res.json::<Value>()
        .limit(64 << 20)
        .await
        .map_err(|e| anyhow!("GET {url} JSON: {e}"))
}

async fn invitation(public_url: &str) -> Result<Invitation> {
    let v = get_json(&format!("{public_url}/invitation")).await?;
    Invitation::parse(&v["invitation"])
}

/// Polls `f` every 20 ms until it returns Some, at most `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn queued(admin_url: &str) -> Option<u64> {
    get_json(&format!("{admin_url}/status")).await.ok()?["queued"].as_u64()
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

/// The queue ids of a pickup 2.0 delivery, without opening the inner messages.
fn delivery_ids(msg: &Value) -> Vec<String> {
    msg["~attach"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["@id"].as_str().map(str::to_string))
        .collect()
}

/// Opens a WebSocket, switches it to live mode and waits for the status answer.
async fn live_socket(a: &Agent, ws_url: &str) -> Result<WsClient> {
    let mut ws = a.websocket(ws_url).await?;
    ws.send_envelope(
        a.pack(&pickup("live-delivery-change", json!({"live_delivery": true})))?,
        true,
    )
    .await?;
    match ws.next(Duration::from_secs(20)).await? {
        WsEvent::Envelope(e) => {
            let (m, _) = a.unpack(&e)?;
            if type_name(&m) == "status" {
                return Ok(ws);
            }
            bail!("expected a status answer to live-delivery-change, got {m}");
        }
        WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
    }
}

/// A wallet that can receive forwards: the agent, its recipient key (base58) and routing keys.
struct Wallet {
    agent: Agent,
    key: String,
    routing: Vec<String>,
}

async fn onboard(public_url: &str, n: usize) -> Result<Vec<Wallet>> {
    let inv = invitation(public_url).await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (agent, k) = Agent::onboard(&inv).await?;
        let routing = agent.grant.clone().context("no grant")?.routing_keys;
        out.push(Wallet {
            agent,
            key: k.verkey(),
            routing,
        });
    }
    Ok(out)
}

/// Pre-builds `n` forward envelopes spread over the wallets, on every core (before any timed
/// part). Contents are `{prefix}-{i}`. Returns them and the build time.
fn build_forwards(targets: &[(String, Vec<String>)], n: usize, prefix: &str) -> Result<(Vec<Vec<u8>>, Duration)> {
    let t0 = Instant::now();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(1);
    let chunks: Vec<Vec<usize>> = (0..threads).map(|t| (t..n).step_by(threads).collect()).collect();
    let mut built: Vec<Vec<(usize, Vec<u8>)>> = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                s.spawn(move || -> Result<Vec<(usize, Vec<u8>)>> {
                    let sender = Sender::new();
                    idx.into_iter()
                        .map(|i| {
                            let (key, routing) = &targets[i % targets.len()];
                            let env =
                                sender.forward_envelope(&basic_message(&format!("{prefix}-{i}")), key, routing)?;
                            Ok((i, env))
                        })
                        .collect()
                })
            })
            .collect();
        for h in handles {
            built.push(h.join().map_err(|_| anyhow!("builder thread panicked"))??);
        }
        Ok(())
    })?;
    let mut all: Vec<(usize, Vec<u8>)> = built.into_iter().flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, e)| e).collect(), t0.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// A mailroom child process
// ---------------------------------------------------------------------------------------------

fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

struct ChildNode {
    child: std::process::Child,
    public: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ChildNode {
    /// Starts `mailroom run` with one node: sled in a temporary directory, or PostgreSQL at
    /// `pg_url`. Defaults otherwise (strategy QueueAndLiveModeDelivery, sweep 2000 ms).
    async fn start(pg_url: Option<&str>) -> Result<ChildNode> {
        let dir = tempfile::tempdir()?;
        let (public, admin) = (free_addr()?, free_addr()?);
        let store = match pg_url {
            Some(u) => format!("[store]\nbackend = \"postgres\"\nurl = \"{u}\"\n"),
            None => format!(
                "[store]\nbackend = \"sled\"\npath = \"{}\"\n",
                dir.path().join("data").display()
            ),
        };
        let toml = format!(
            "{store}\n[log]\nlevel = \"warn\"\n\n[[node]]\nid = \"n1\"\nlisten = \"{public}\"\nadmin = \"{admin}\"\n"
        );
        let cfg = dir.path().join("mailroom.toml");
        std::fs::write(&cfg, toml)?;
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn mailroom")?;
        let node = ChildNode {
            child,
            public,
            admin,
            _dir: dir,
        };
        eprintln!(
            "  mailroom child pid {} (public {public}, admin {admin})",
            node.child.id()
        );
        let ready = format!("http://{admin}/ready");
        wait_for("the mailroom child to be ready", Duration::from_secs(60), || async {
            get_json(&ready).await.ok().filter(|v| v["ready"] == true)
        })
        .await?;
        Ok(node)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn public_url(&self) -> String {
        format!("http://{}", self.public)
    }
    fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
    fn ws_url(&self) -> String {
        format!("ws://{}/", self.public)
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: a fresh database per run, dropped after it
// ---------------------------------------------------------------------------------------------

struct FreshDb {
    name: String,
    admin: String,
}

async fn pg_exec(admin: &str, sql: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {admin} (run scripts/ensure-postgres.sh)"))?;
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await.with_context(|| sql.to_string())?;
    drop(client);
    let _ = task.await;
    Ok(())
}

/// The server processes serving database `db` (the node's pool connections).
async fn pg_backend_pids(admin: &str, db: &str) -> Result<Vec<String>> {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let rows = client
        .query("SELECT pid FROM pg_stat_activity WHERE datname = $1", &[&db])
        .await?;
    drop(client);
    let _ = task.await;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0).to_string()).collect())
}

fn cpu_sum(pids: &[String]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(p).ok()).sum()
}

impl FreshDb {
    async fn create(admin: &str) -> Result<FreshDb> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!("mailroom_bench_{}_{}", std::process::id(), nanos);
        pg_exec(admin, &format!("CREATE DATABASE {name}")).await?;
        Ok(FreshDb {
            name,
            admin: admin.to_string(),
        })
    }

    fn url(&self) -> String {
        // The admin string is key=value; the nodes get a URL on the same server.
        let get = |k: &str, d: &str| -> String {
            self.admin
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap_or_else(|| d.to_string())
        };
        format!(
            "postgres://{}@{}:{}/{}",
            get("user", "postgres"),
            get("host", "127.0.0.1"),
            get("port", "5432"),
            self.name
        )
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin = self.admin.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                if let Err(e) = rt.block_on(pg_exec(&admin, &sql)) {
                    eprintln!("loadgen: {e:#}");
                }
            }
        })
        .join();
    }
}

/// Stores shared by in-process nodes are opened on this runtime, so their background tasks (the
/// PostgreSQL writer) keep running whatever the bench's own thread does.
fn background_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("background runtime")
    })
}

async fn open_shared_store(cfg: &Config) -> Result<Arc<dyn Store>> {
    let cfg = cfg.clone();
    background_runtime()
        .spawn(async move { node::open_store(&cfg).await })
        .await?
}

// ---------------------------------------------------------------------------------------------
// 1 + 2: forwards accepted/s by one node, CPU per accepted forward, crypto floor
// ---------------------------------------------------------------------------------------------

fn crypto_floor(t: &mut Table) -> Result<f64> {
    let routing = KeyPair::generate();
    let wallet = KeyPair::generate();
    let rk = routing.verkey();
    let (envs, built) = build_forwards(&[(wallet.verkey(), vec![routing.did_key()])], 2_000, "floor")?;
    let find = |kid: &str| (kid == rk).then(|| routing.clone());
    // Warm up, then unpack for ~2 s or 50,000 envelopes, whichever comes first.
    for e in envs.iter().take(200) {
        envelope::unpack(e, &find)?;
    }
    let t0 = Instant::now();
    let mut n = 0u64;
    'outer: loop {
        for e in &envs {
            let u = envelope::unpack(e, &find)?;
            std::hint::black_box(&u);
            n += 1;
            if n >= 50_000 || t0.elapsed() > Duration::from_secs(2) {
                break 'outer;
            }
        }
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    t.add(
        "crypto floor: unpack one anoncrypt forward",
        format!("{us:.1}"),
        "us",
        "~60 us",
        format!(
            "envelope::unpack with the routing key, one thread, {n} unpacks; client builds one forward envelope (authcrypt inner + anoncrypt forward) in {:.0} us of one core",
            built.as_secs_f64() * 1e6 / 2000.0 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64
        ),
    );
    Ok(us)
}

struct LoadResult {
    accepted: u64,
    other: HashMap<u16, u64>,
    errors: u64,
    window: Duration,
    lat_us: Vec<u64>,
    node_cpu: f64,
    self_cpu: f64,
    /// CPU of the node's PostgreSQL backends over the window (PostgreSQL runs only).
    pg_cpu: f64,
    pg_backends: usize,
    exhausted: bool,
    warm: u64,
}

/// `senders` tasks on this (single) thread POST pre-built requests back to back: a warm-up,
/// then the measured window. Each request is used once.
async fn forward_load(node: &ChildNode, reqs: Arc<Vec<Vec<u8>>>, o: &Opts, db: Option<&FreshDb>) -> Result<LoadResult> {
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(o.warmup_ms);
    let deadline = measure_from + Duration::from_secs(o.secs);
    let next = Rc::new(Cell::new(0usize));
    let cpu0: Rc<Cell<Option<(f64, f64, f64)>>> = Rc::new(Cell::new(None));
    let pg_pids: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(Vec::new()));
    let pid = node.pid().to_string();
    {
        let (cpu0, pid, pg_pids) = (cpu0.clone(), pid.clone(), pg_pids.clone());
        let db = db.map(|d| (d.admin.clone(), d.name.clone()));
        actix_rt::spawn(async move {
            if let Some((admin, name)) = &db {
                // Find the node's PostgreSQL backends shortly before the window (after the pool
                // has grown under the warm-up).
                tokio::time::sleep_until((measure_from - Duration::from_millis(200)).into()).await;
                if let Ok(p) = pg_backend_pids(admin, name).await {
                    *pg_pids.borrow_mut() = p;
                }
            }
            tokio::time::sleep_until(measure_from.into()).await;
            if let (Ok(a), Ok(b)) = (cpu_secs(&pid), cpu_secs("self")) {
                let pg = cpu_sum(&pg_pids.borrow());
                cpu0.set(Some((a, b, pg)));
            }
        });
    }
    let mut tasks = Vec::new();
    for _ in 0..o.senders {
        let reqs = reqs.clone();
        let next = next.clone();
        let addr = node.public;
        tasks.push(actix_rt::spawn(async move {
            let mut conn = RawConn::new(addr);
            let mut lat = Vec::with_capacity(4096);
            let mut statuses: HashMap<u16, u64> = HashMap::new();
            let (mut errors, mut warm, mut exhausted) = (0u64, 0u64, false);
            loop {
                let i = next.get();
                if i >= reqs.len() {
                    exhausted = true;
                    break;
                }
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                next.set(i + 1);
                let r = conn.send(&reqs[i]).await;
                let t1 = Instant::now();
                if t0 < measure_from {
                    warm += 1;
                    continue;
                }
                match r {
                    Ok((s, _)) => {
                        *statuses.entry(s).or_default() += 1;
                        if (200..300).contains(&s) {
                            lat.push((t1 - t0).as_micros() as u64);
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, statuses, errors, warm, exhausted)
        }));
    }
    let mut res = LoadResult {
        accepted: 0,
        other: HashMap::new(),
        errors: 0,
        window: Duration::ZERO,
        lat_us: Vec::new(),
        node_cpu: 0.0,
        self_cpu: 0.0,
        pg_cpu: 0.0,
        pg_backends: 0,
        exhausted: false,
        warm: 0,
    };
    for t in tasks {
        let (lat, statuses, errors, warm, exhausted) = t.await?;
        res.lat_us.extend(lat);
        for (s, n) in statuses {
            if (200..300).contains(&s) {
                res.accepted += n;
            } else {
                *res.other.entry(s).or_default() += n;
            }
        }
        res.errors += errors;
        res.warm += warm;
        res.exhausted |= exhausted;
    }
    let end = Instant::now();
    res.window = end.saturating_duration_since(measure_from);
    let (c0, s0, p0) = cpu0.get().context("the warm-up did not finish (too few envelopes?)")?;
    res.node_cpu = cpu_secs(&pid)? - c0;
    res.self_cpu = cpu_secs("self")? - s0;
    res.pg_cpu = cpu_sum(&pg_pids.borrow()) - p0;
    res.pg_backends = pg_pids.borrow().len();
    res.lat_us.sort_unstable();
    Ok(res)
}

async fn single_node_forwards(t: &mut Table, o: &Opts, backend: &str, floor_us: Option<f64>) -> Result<()> {
    let db = if backend == "postgres" {
        Some(FreshDb::create(&o.pg_admin).await?)
    } else {
        None
    };
    let node = ChildNode::start(db.as_ref().map(|d| d.url()).as_deref()).await?;
    let wallets = onboard(&node.public_url(), o.wallets).await?;
    let targets: Vec<(String, Vec<String>)> = wallets.iter().map(|w| (w.key.clone(), w.routing.clone())).collect();
    eprintln!(
        "[{backend}] building {} forward envelopes for {} wallets",
        o.envelopes, o.wallets
    );
    let (envs, built) = build_forwards(&targets, o.envelopes, &format!("load-{backend}"))?;
    let env_len = envs.iter().map(|e| e.len()).sum::<usize>() / envs.len();
    let host = node.public.to_string();
    let reqs: Arc<Vec<Vec<u8>>> = Arc::new(envs.iter().map(|e| build_request(&host, "/", e)).collect());
    drop(envs);
    eprintln!(
        "[{backend}] built in {:.1} s; {} senders, warm-up {} ms, window {} s",
        built.as_secs_f64(),
        o.senders,
        o.warmup_ms,
        o.secs
    );
    let r = forward_load(&node, reqs, o, db.as_ref()).await?;
    let secs = r.window.as_secs_f64();
    let rate = r.accepted as f64 / secs;
    let admin = node.admin_url();
    let depth = wait_for("queue depth", Duration::from_secs(10), || queued(&admin)).await?;
    let mut refusals: Vec<String> = r.other.iter().map(|(s, n)| format!("{n}x HTTP {s}")).collect();
    if r.errors > 0 {
        refusals.push(format!("{} transport errors", r.errors));
    }
    let refusals = if refusals.is_empty() {
        "no refusals".to_string()
    } else {
        refusals.join(", ")
    };
    let label = if backend == "postgres" { "PostgreSQL" } else { "sled" };
    t.add(
        &format!("forwards accepted/s, one node, {label}"),
        format!("{rate:.0}"),
        "fwd/s",
        ">= 10000",
        format!(
            "{} accepted in {secs:.1} s after {} ms warm-up; {} senders on one client thread sharing the 2 cores; {} B envelopes; {refusals}; queue depth after run {depth} (= {} accepted incl. warm-up){}",
            r.accepted,
            o.warmup_ms,
            o.senders,
            env_len,
            r.accepted + r.warm,
            if r.exhausted { "; envelope pool ran out before the window ended (raise LOADGEN_ENVELOPES)" } else { "" }
        ),
    );
    t.add(
        &format!("forward request latency p50, {label}"),
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        format!("POST sent -> 2xx read, at {} concurrent senders", o.senders),
    );
    t.add(
        &format!("forward request latency p99, {label}"),
        ms(pct(&r.lat_us, 0.99)),
        "ms",
        "",
        format!("max {} ms", ms(r.lat_us.last().copied().unwrap_or(0))),
    );
    let per = r.node_cpu / r.accepted.max(1) as f64 * 1e6;
    t.add(
        &format!("node CPU per accepted forward, {label}"),
        format!("{per:.0}"),
        "us",
        "",
        format!(
            "mailroom child utime+stime {:.2} s over the window ({:.2} cores busy){}; the load generator used {:.2} s ({:.0} us/request)",
            r.node_cpu,
            r.node_cpu / secs,
            floor_us
                .map(|f| format!(", {:.1}x the {f:.0} us crypto floor", per / f))
                .unwrap_or_default(),
            r.self_cpu,
            r.self_cpu / (r.accepted.max(1) as f64) * 1e6
        ),
    );
    if db.is_some() {
        t.add(
            "PostgreSQL backend CPU per accepted forward",
            format!("{:.0}", r.pg_cpu / r.accepted.max(1) as f64 * 1e6),
            "us",
            "",
            format!(
                "utime+stime of the {} server processes serving the node's database ({:.2} cores busy); WAL writer and checkpointer not included",
                r.pg_backends,
                r.pg_cpu / secs
            ),
        );
    }
    drop(node);
    drop(db);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3: cross-node live delivery latency (in-process nodes on PostgreSQL)
// ---------------------------------------------------------------------------------------------

struct Cluster {
    nodes: Vec<RunningNode>,
    db: Option<FreshDb>,
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

const SECRET: &str = "loadgen-cluster-secret";

/// `n` nodes on one fresh PostgreSQL database. With `cut`, every node's peer addresses point
/// at a closed port: no notifications, only the sweep delivers.
async fn start_cluster(o: &Opts, n: usize, cut: bool) -> Result<Cluster> {
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

struct LatencyResult {
    sent: usize,
    accepted: usize,
    delivered: usize,
    lat_us: Vec<u64>,
    before_2xx: usize,
    from_send_us: Vec<u64>,
}

/// Forwards POSTed to `via` at `rate`/s for `secs`; the wallet's live socket is on `home`;
/// latency = delivery frame read on the socket - POST's 2xx read. Deliveries are acknowledged
/// with messages-received over HTTP to `home`, as Credo 0.6.3 does.
/// Where a latency run sends: an in-process node or a child process.
struct Target {
    node_id: String,
    public_addr: SocketAddr,
    admin: String,
}

impl Target {
    fn of(n: &RunningNode) -> Target {
        Target {
            node_id: n.node_id.clone(),
            public_addr: n.public_addr,
            admin: n.admin_url(),
        }
    }
    fn public_url(&self) -> String {
        format!("http://{}", self.public_addr)
    }
    fn admin_url(&self) -> String {
        self.admin.clone()
    }
}

async fn live_latency(home: &Target, via: &Target, rate: u64, secs: u64, cut: bool) -> Result<LatencyResult> {
    let ws_url = format!("ws://{}/", home.public_addr);
    let wallets = onboard(&home.public_url(), 1).await?;
    let w = wallets.into_iter().next().context("one wallet")?;
    let conn = get_json(&format!("{}/connections", home.admin_url())).await?["connections"][0]["id"]
        .as_str()
        .context("connection id")?
        .to_string();
    let ws = live_socket(&w.agent, &ws_url).await?;
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
    let n = (rate * secs) as usize;
    let (envs, _) = build_forwards(&[(w.key.clone(), w.routing.clone())], n, "lat")?;
    let host = via.public_addr.to_string();
    let reqs: Rc<Vec<Vec<u8>>> = Rc::new(envs.iter().map(|e| build_request(&host, "/", e)).collect());
    let sent_at: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let ok_at: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let arrived: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; n]));
    let accepted = Rc::new(Cell::new(0usize));
    let sending_done = Rc::new(Cell::new(false));

    // Receiver: reads deliveries, stamps them on arrival, hands acks to the acker.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let receiver = {
        let arrived = arrived.clone();
        let accepted = accepted.clone();
        let sending_done = sending_done.clone();
        let home_host = home.public_addr.to_string();
        let mut ws = ws;
        let agent = w.agent;
        actix_rt::spawn(async move {
            let mut got = 0usize;
            let hard = Instant::now() + Duration::from_secs(secs + 40);
            loop {
                if sending_done.get() && got >= accepted.get() {
                    break;
                }
                let left = hard.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let ev = match ws.next(left.min(Duration::from_millis(500))).await {
                    Ok(ev) => ev,
                    Err(_) => continue, // nothing within 500 ms: re-check the exit conditions
                };
                let now = Instant::now();
                let env = match ev {
                    WsEvent::Envelope(e) => e,
                    WsEvent::Closed(_) => break,
                };
                let Ok((msg, _)) = agent.unpack(&env) else { continue };
                if type_name(&msg) != "delivery" {
                    continue;
                }
                let mut ids = Vec::new();
                for (id, inner) in agent.open_delivery(&msg).unwrap_or_default() {
                    ids.push(id);
                    let content = inner["content"].as_str().unwrap_or_default();
                    if let Some(i) = content.strip_prefix("lat-").and_then(|s| s.parse::<usize>().ok()) {
                        let mut a = arrived.borrow_mut();
                        if i < a.len() && a[i].is_none() {
                            a[i] = Some(now);
                            got += 1;
                        }
                    }
                }
                if let Ok(p) = agent.pack(&pickup("messages-received", json!({ "message_id_list": ids }))) {
                    let _ = ack_tx.send(build_request(&home_host, "/", &p));
                }
            }
            ws.close().await;
            got
        })
    };
    let acker = {
        let addr = home.public_addr;
        actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut n = 0u64;
            while let Some(req) = ack_rx.recv().await {
                if c.send(&req).await.is_ok() {
                    n += 1;
                }
            }
            n
        })
    };

    // Senders: K connections; request i leaves at start + i/rate.
    let k = 8usize;
    let start = Instant::now() + Duration::from_millis(50);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut senders = Vec::new();
    for j in 0..k {
        let reqs = reqs.clone();
        let sent_at = sent_at.clone();
        let ok_at = ok_at.clone();
        let accepted = accepted.clone();
        let addr = via.public_addr;
        senders.push(actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            for i in (j..reqs.len()).step_by(k) {
                tokio::time::sleep_until((start + period * i as u32).into()).await;
                let t0 = Instant::now();
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
    sending_done.set(true);
    let delivered = receiver.await?;
    let _acks = acker.await?;
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
    })
}

async fn cluster_latency(t: &mut Table, o: &Opts) -> Result<()> {
    let c = start_cluster(o, 3, false).await?;
    let r = live_latency(
        &Target::of(&c.nodes[0]),
        &Target::of(&c.nodes[1]),
        o.rate,
        o.secs,
        false,
    )
    .await?;
    let note = format!(
        "3 in-process nodes, one PostgreSQL; socket on n1, {}/s POSTed to n2 for {} s: {} sent, {} accepted, {} delivered live; {} arrived before the POST's 2xx (counted 0); {}; max {} ms; from POST sent: p50 {} p99 {} ms",
        o.rate,
        o.secs,
        r.sent,
        r.accepted,
        r.delivered,
        r.before_2xx,
        tail(&r.lat_us),
        ms(r.lat_us.last().copied().unwrap_or(0)),
        ms(pct(&r.from_send_us, 0.5)),
        ms(pct(&r.from_send_us, 0.99)),
    );
    t.add(
        "cross-node live delivery latency p50",
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        "POST 2xx on n2 -> delivery frame read on n1's socket".into(),
    );
    t.add(
        "cross-node live delivery latency p99",
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
async fn same_node_latency(t: &mut Table, o: &Opts) -> Result<()> {
    for backend in ["PostgreSQL", "sled"] {
        let (r, what) = if backend == "sled" {
            let node = ChildNode::start(None).await?;
            let tg = Target {
                node_id: "n1".into(),
                public_addr: node.public,
                admin: node.admin_url(),
            };
            (
                live_latency(&tg, &tg, o.rate, o.secs, false).await?,
                "a mailroom child process",
            )
        } else {
            let c = start_cluster(o, 1, false).await?;
            let tg = Target::of(&c.nodes[0]);
            (
                live_latency(&tg, &tg, o.rate, o.secs, false).await?,
                "one in-process node",
            )
        };
        t.add(
            &format!("same-node live delivery latency p50, {backend}"),
            ms(pct(&r.lat_us, 0.50)),
            "ms",
            "",
            format!("baseline for the cluster hop: {what}, POSTs to the socket's own node"),
        );
        t.add(
            &format!("same-node live delivery latency p99, {backend}"),
            ms(pct(&r.lat_us, 0.99)),
            "ms",
            "",
            format!(
                "{}/s for {} s: {} sent, {} accepted, {} delivered; {} arrived before the POST's 2xx; {}; from POST sent: p50 {} p99 {} ms",
                o.rate,
                o.secs,
                r.sent,
                r.accepted,
                r.delivered,
                r.before_2xx,
                tail(&r.lat_us),
                ms(pct(&r.from_send_us, 0.5)),
                ms(pct(&r.from_send_us, 0.99)),
            ),
        );
    }
    Ok(())
}

async fn sweep_latency(t: &mut Table, o: &Opts) -> Result<()> {
    let c = start_cluster(o, 2, true).await?;
    let sweep = Config::single_node_default().delivery.sweep_interval_ms;
    let r = live_latency(
        &Target::of(&c.nodes[0]),
        &Target::of(&c.nodes[1]),
        o.sweep_rate,
        o.secs,
        true,
    )
    .await?;
    let note = format!(
        "cluster link cut (peer addresses point at closed ports), sweep_interval_ms = {sweep} (default); {}/s POSTed to n2 for {} s: {} sent, {} accepted, {} delivered; max {} ms",
        o.sweep_rate,
        o.secs,
        r.sent,
        r.accepted,
        r.delivered,
        ms(r.lat_us.last().copied().unwrap_or(0)),
    );
    t.add(
        "sweep-bound delivery latency p50 (no notifications)",
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        "POST 2xx on n2 -> delivery on n1's socket, found by n1's sweep".into(),
    );
    t.add(
        "sweep-bound delivery latency p99 (no notifications)",
        ms(pct(&r.lat_us, 0.99)),
        "ms",
        &format!("<= {sweep} ms"),
        note,
    );
    drop(c);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4: idle WebSocket sessions memory
// ---------------------------------------------------------------------------------------------

async fn sessions_memory(t: &mut Table, o: &Opts) -> Result<()> {
    let limit = open_files_limit();
    let n = o.sessions.min(limit.saturating_sub(500)).max(10);
    let node = ChildNode::start(None).await?;
    let mut wallets = onboard(&node.public_url(), 1).await?;
    let a = Rc::new(wallets.pop().context("wallet")?.agent);
    // One socket first, so the per-session figure excludes one-time allocations.
    let socks: Rc<RefCell<Vec<WsClient>>> = Rc::new(RefCell::new(Vec::with_capacity(n)));
    let open_one = |a: Rc<Agent>, url: String| async move {
        let mut ws = a.websocket(&url).await?;
        // A trust ping with return_route all binds the socket to the connection.
        let ping = json!({
            "@type": "https://didcomm.org/trust_ping/1.0/ping",
            "@id": new_id(),
            "response_requested": true,
            "~transport": { "return_route": "all" },
        });
        ws.send_envelope(a.pack(&ping)?, true).await?;
        match ws.next(Duration::from_secs(30)).await? {
            WsEvent::Envelope(_) => Ok::<WsClient, anyhow::Error>(ws),
            WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
        }
    };
    let first = open_one(a.clone(), node.ws_url()).await?;
    socks.borrow_mut().push(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(node.pid())?;
    let t0 = Instant::now();
    let next = Rc::new(Cell::new(1usize));
    let failures = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (a, url, next, socks, failures) = (a.clone(), node.ws_url(), next.clone(), socks.clone(), failures.clone());
        let deadline = t0 + Duration::from_secs(45);
        tasks.push(actix_rt::spawn(async move {
            while next.get() < n && Instant::now() < deadline && failures.get() < 50 {
                next.set(next.get() + 1);
                match open_one(a.clone(), url.clone()).await {
                    Ok(ws) => socks.borrow_mut().push(ws),
                    Err(e) => {
                        failures.set(failures.get() + 1);
                        eprintln!("[sessions] socket failed: {e:#}");
                    }
                }
            }
        }));
    }
    for tk in tasks {
        tk.await?;
    }
    let opened_in = t0.elapsed();
    let open = socks.borrow().len();
    let status = get_json(&format!("{}/status", node.admin_url())).await?;
    let bound = status["sessions"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss1 = rss_kib(node.pid())?;
    let added = open.saturating_sub(1).max(1);
    let per_kib = (rss1 as f64 - rss0 as f64) / added as f64;
    let proj_gib = per_kib * 50_000.0 / (1024.0 * 1024.0);
    t.add(
        "idle WebSocket session RSS",
        format!("{per_kib:.1}"),
        "KiB/session",
        "",
        format!(
            "mailroom child (sled): {added} sockets added in {:.1} s (all bound to one connection by a trust ping with return_route all; node reports {bound} bound sessions), RSS {} -> {} MiB; open-files limit {limit}",
            opened_in.as_secs_f64(),
            rss0 / 1024,
            rss1 / 1024
        ),
    );
    t.add(
        "idle sessions RSS extrapolated to 50,000",
        format!("{proj_gib:.2}"),
        "GiB",
        "< 1 GiB",
        format!(
            "linear: {per_kib:.1} KiB x 50,000 (measured {added}); plus a {} MiB base. One shared connection: per-wallet connection records and registry keys are not counted",
            rss0 / 1024
        ),
    );
    socks.borrow_mut().clear();
    drop(node);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5: delivered msg/s to one wallet in live mode
// ---------------------------------------------------------------------------------------------

async fn live_throughput(t: &mut Table, o: &Opts) -> Result<()> {
    let node = ChildNode::start(None).await?;
    let mut wallets = onboard(&node.public_url(), 1).await?;
    let w = wallets.pop().context("wallet")?;
    let n = o.live_msgs;
    let (envs, _) = build_forwards(&[(w.key.clone(), w.routing.clone())], n, "live")?;
    let host = node.public.to_string();
    let reqs: Rc<Vec<Vec<u8>>> = Rc::new(envs.iter().map(|e| build_request(&host, "/", e)).collect());
    let next = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (reqs, next, addr) = (reqs.clone(), next.clone(), node.public);
        tasks.push(actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut bad = 0usize;
            while next.get() < reqs.len() {
                let i = next.get();
                next.set(i + 1);
                match c.send(&reqs[i]).await {
                    Ok((s, _)) if (200..300).contains(&s) => {}
                    _ => bad += 1,
                }
            }
            bad
        }));
    }
    let mut bad = 0;
    for tk in tasks {
        bad += tk.await?;
    }
    if bad > 0 {
        bail!("{bad} of {n} forwards were not accepted");
    }
    let admin = node.admin_url();
    wait_for("all messages queued", Duration::from_secs(30), || async {
        (queued(&admin).await == Some(n as u64)).then_some(())
    })
    .await?;

    // Live mode on: time until every message is delivered, and until every one is acked.
    let t0 = Instant::now();
    let mut ws = live_socket(&w.agent, &node.ws_url()).await?;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, usize)>();
    let acker = {
        let addr = node.public;
        actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut acked = 0usize;
            let mut done_at = None;
            while let Some((req, k)) = ack_rx.recv().await {
                if matches!(c.send(&req).await, Ok((s, _)) if (200..300).contains(&s)) {
                    acked += k;
                    if acked >= n && done_at.is_none() {
                        done_at = Some(Instant::now());
                    }
                }
            }
            (acked, done_at)
        })
    };
    let mut delivered = 0usize;
    let mut frames = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("only {delivered} of {n} delivered within 60 s");
        }
        let env = match ws.next(left).await? {
            WsEvent::Envelope(e) => e,
            WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
        };
        let (msg, _) = w.agent.unpack(&env)?;
        if type_name(&msg) != "delivery" {
            continue;
        }
        frames += 1;
        let ids = delivery_ids(&msg);
        delivered += ids.len();
        let ack = w
            .agent
            .pack(&pickup("messages-received", json!({ "message_id_list": ids })))?;
        let _ = ack_tx.send((build_request(&host, "/", &ack), ids.len()));
    }
    let t_delivered = t0.elapsed();
    drop(ack_tx);
    let (acked, done_at) = acker.await?;
    let t_acked = done_at.map(|d| d - t0).context("not every message was acknowledged")?;
    let left = wait_for("queue empty", Duration::from_secs(10), || queued(&admin)).await?;
    ws.close().await;
    t.add(
        "live-mode delivery to one wallet",
        format!("{:.0}", n as f64 / t_acked.as_secs_f64()),
        "msg/s",
        "",
        format!(
            "one node (sled): {n} queued, then live-delivery-change; all acknowledged (messages-received over HTTP, one per delivery, sequential) {:.0} ms after it, all delivered after {:.0} ms ({:.0} msg/s) in {frames} delivery frames; {acked} acked, queue after {left}",
            t_acked.as_secs_f64() * 1e3,
            t_delivered.as_secs_f64() * 1e3,
            n as f64 / t_delivered.as_secs_f64()
        ),
    );
    drop(node);
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and a
    // two-minute load run has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") && std::env::var_os("LOADGEN_RUN").is_none() {
        println!("loadgen: run with `cargo bench --bench loadgen` or scripts/bench.sh (or LOADGEN_RUN=1); skipped");
        return;
    }
    let o = Opts::from_env();
    let started = Instant::now();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let machine_before = machine();
    eprintln!("loadgen: {} on {machine_before}", date.trim());
    let mut t = Table::default();
    let sys = actix_rt::System::new();
    sys.block_on(async {
        let mut floor = None;
        if o.wants("crypto") {
            eprintln!("[crypto] unpack floor");
            match crypto_floor(&mut t) {
                Ok(us) => floor = Some(us),
                Err(e) => t.failed("crypto", &e),
            }
        }
        if o.wants("sled") {
            eprintln!("[sled] forwards accepted by one node");
            if let Err(e) = single_node_forwards(&mut t, &o, "sled", floor).await {
                t.failed("sled", &e);
            }
        }
        if o.wants("pg") {
            eprintln!("[pg] forwards accepted by one node");
            if let Err(e) = single_node_forwards(&mut t, &o, "postgres", floor).await {
                t.failed("pg", &e);
            }
        }
        if o.wants("cluster") {
            eprintln!("[cluster] cross-node live delivery latency");
            if let Err(e) = cluster_latency(&mut t, &o).await {
                t.failed("cluster", &e);
            }
        }
        if o.wants("samenode") {
            eprintln!("[samenode] live delivery latency on one node (baseline)");
            if let Err(e) = same_node_latency(&mut t, &o).await {
                t.failed("samenode", &e);
            }
        }
        if o.wants("sweep") {
            eprintln!("[sweep] delivery with the cluster link cut");
            if let Err(e) = sweep_latency(&mut t, &o).await {
                t.failed("sweep", &e);
            }
        }
        if o.wants("live") {
            eprintln!("[live] live-mode delivery to one wallet");
            if let Err(e) = live_throughput(&mut t, &o).await {
                t.failed("live", &e);
            }
        }
        if o.wants("sessions") {
            eprintln!("[sessions] idle WebSocket sessions");
            if let Err(e) = sessions_memory(&mut t, &o).await {
                t.failed("sessions", &e);
            }
        }
    });
    println!(
        "mailroom loadgen, {} ({:.0} s); machine: {machine_before}; release build; load generator and nodes share the cores",
        date.trim(),
        started.elapsed().as_secs_f64()
    );
    t.print();
    if let Some(path) = &o.md {
        let md = format!("Run {}; machine: {machine_before}.\n\n{}", date.trim(), t.markdown());
        if let Err(e) = std::fs::write(path, md) {
            eprintln!("loadgen: cannot write {path}: {e}");
        }
    }
    if t.rows.iter().any(|r| r.metric.ends_with("FAILED")) {
        std::process::exit(1);
    }
}
