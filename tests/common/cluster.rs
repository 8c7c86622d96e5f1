//! Cluster test harness: several real nodes (in-process, each on its own actix system and
//! thread, real TCP between them) sharing one PostgreSQL database made fresh for the test;
//! a TCP proxy that can cut a link; child processes for kill -9.
#![allow(dead_code)]

use mailroom::cluster::{handshake, link};
use mailroom::config::{Config, NodeEntry, Strategy};
use mailroom::node::{self, Listeners, NodeOptions, RunningNode};
use mailroom::store::Store;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{eventually, get_json, pickup, type_name, ws_request, ws_url};
use mailroom::client::{Agent, WsClient};
use serde_json::{json, Value};

pub const SECRET: &str = "cluster-test-secret";

/// A database created for one test and dropped after it.
pub struct FreshDb {
    pub name: String,
    pub url: String,
}

pub const PG_ADMIN_URL: &str = "host=127.0.0.1 port=5432 user=postgres dbname=postgres";

async fn admin_exec(sql: String) {
    let (client, conn) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (run scripts/ensure-postgres.sh)");
    let task = tokio::spawn(conn);
    client.batch_execute(&sql).await.expect(&sql);
    drop(client);
    let _ = task.await;
}

impl FreshDb {
    pub async fn create() -> FreshDb {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("mailroom_t_{}_{}", std::process::id(), nanos);
        admin_exec(format!("CREATE DATABASE {name}")).await;
        FreshDb {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
        }
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(admin_exec(sql));
            }
        })
        .join();
    }
}

/// A runtime that lives as long as the test process. Stores shared by in-process nodes are
/// opened on it, so their background tasks (the PostgreSQL writers) keep running while the
/// test's own thread waits on a node.
pub fn background_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("background runtime")
    })
}

/// Opens the store of `cfg` for several in-process nodes to share.
pub async fn open_shared_store(cfg: &Config) -> Arc<dyn Store> {
    let cfg = cfg.clone();
    background_runtime()
        .spawn(async move { mailroom::node::open_store(&cfg).await })
        .await
        .expect("store task")
        .expect("store opens")
}

/// The config of an n-node cluster whose listeners are already bound on 127.0.0.1:0.
pub fn bind_cluster(n: usize, db_url: &str, sweep_ms: u64) -> (Config, Vec<Listeners>) {
    let mut cfg = Config::single_node_default();
    cfg.nodes.clear();
    cfg.cluster.name = "test".into();
    cfg.cluster.secret = Some(SECRET.into());
    cfg.cluster.heartbeat_ms = 100;
    // Long enough that a node's thread stalled on a loaded box is not found down (a false
    // take-over releases live leases and forgets directory claims); tests of failure
    // detection itself set their own.
    cfg.cluster.failure_timeout_ms = 3_000;
    cfg.store.backend = "postgres".into();
    cfg.store.url = Some(db_url.to_string());
    cfg.store.pool_size = 4;
    cfg.delivery.strategy = Strategy::QueueAndLiveModeDelivery;
    cfg.delivery.sweep_interval_ms = sweep_ms;
    // Longer than the slowest test consumer, so a duplicate means a bug, not a slow ack.
    cfg.delivery.lease_ms = 30_000;
    let mut ls = Vec::new();
    for i in 1..=n {
        let l = bind_listeners();
        cfg.nodes.push(entry(&format!("n{i}"), &l));
        ls.push(l);
    }
    (cfg, ls)
}

pub fn bind_listeners() -> Listeners {
    Listeners {
        public: TcpListener::bind("127.0.0.1:0").unwrap(),
        admin: TcpListener::bind("127.0.0.1:0").unwrap(),
        cluster: Some(TcpListener::bind("127.0.0.1:0").unwrap()),
    }
}

pub fn entry(id: &str, l: &Listeners) -> NodeEntry {
    NodeEntry {
        id: id.into(),
        listen: l.public.local_addr().unwrap().to_string(),
        cluster: Some(l.cluster.as_ref().unwrap().local_addr().unwrap().to_string()),
        admin: l.admin.local_addr().unwrap().to_string(),
    }
}

/// Starts node `id` of `cfg` in-process on the shared store.
pub fn start_node(cfg: &Config, id: &str, l: Listeners, store: &Arc<dyn Store>, path: Option<PathBuf>) -> RunningNode {
    node::spawn(
        cfg.clone(),
        id,
        l,
        NodeOptions {
            store: Some(store.clone()),
            config_path: path,
        },
    )
    .expect("node starts")
}

/// A link to `node`'s cluster port opened as its peer `peer` of `cfg` would open it, over the
/// real authenticated handshake: the test speaks for that peer, which does not run (drop its
/// listeners, so `node`'s own dials to it fail and this is the only link).
pub async fn link_as_peer(cfg: &Config, node: &RunningNode, peer: &str) -> link::Link<tokio::net::TcpStream> {
    let addr = node.cluster_addr.expect("the node has a cluster listener");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = handshake::Local {
        cluster: &cfg.cluster.name,
        node: peer,
        secret: cfg.cluster.secret.as_deref().expect("a cluster secret").as_bytes(),
        max_frame: cfg.cluster.max_frame_bytes,
    };
    link::open(stream, &local, handshake::Role::Dialer, Some(&node.node_id), |_| true)
        .await
        .expect("the node takes the link")
}

/// Keeps a [`link_as_peer`] link alive as its peer would: a heartbeat every `every`, and
/// whatever the node sends read and dropped. The link ends when the returned tasks are
/// aborted (or dropped with the test's runtime).
pub fn keep_alive(
    l: link::Link<tokio::net::TcpStream>,
    every: std::time::Duration,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let link::Link {
        mut reader, mut writer, ..
    } = l;
    let beats = tokio::spawn(async move {
        let mut t = 0u64;
        loop {
            t += 1;
            if writer.send(&mailroom::cluster::proto::Frame::Ping { t }).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let reads = tokio::spawn(async move { while let Ok(Some(_)) = reader.read_frame().await {} });
    (beats, reads)
}

/// An n-node cluster (in-process nodes n1..nN) on a fresh PostgreSQL database, returned once
/// every node sees every other one connected. The database is dropped with the value.
pub struct TestCluster {
    pub nodes: Vec<RunningNode>,
    pub db: FreshDb,
}

/// `cluster_of(n, sweep_ms)`: see [`TestCluster`].
pub async fn cluster_of(n: usize, sweep_ms: u64) -> TestCluster {
    cluster_with(n, sweep_ms, |_| {}).await
}

/// [`cluster_of`] with the config changed by `tweak` before the nodes start (the nodes'
/// addresses are already in it).
pub async fn cluster_with(n: usize, sweep_ms: u64, tweak: impl FnOnce(&mut Config)) -> TestCluster {
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(n, &db.url, sweep_ms);
    tweak(&mut cfg);
    let store = open_shared_store(&cfg).await;
    let nodes: Vec<RunningNode> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| start_node(&cfg, &format!("n{}", i + 1), l, &store, None))
        .collect();
    for a in &nodes {
        for b in nodes.iter().filter(|b| b.node_id != a.node_id) {
            eventually(&format!("{} sees {} connected", a.node_id, b.node_id), || async {
                peer_connected(a, &b.node_id).await.then_some(())
            })
            .await;
        }
    }
    TestCluster { nodes, db }
}

/// Two nodes that reach each other's cluster port only through a [`Proxy`] each, so a test
/// can cut the link between them (`to_n1`: n2's way to n1, `to_n2`: n1's way to n2).
pub struct ProxiedPair {
    pub n1: RunningNode,
    pub n2: RunningNode,
    pub to_n1: Proxy,
    pub to_n2: Proxy,
    pub db: FreshDb,
}

impl ProxiedPair {
    pub async fn start(sweep_ms: u64) -> ProxiedPair {
        let db = FreshDb::create().await;
        let (cfg, ls) = bind_cluster(2, &db.url, sweep_ms);
        let store = open_shared_store(&cfg).await;
        let real = |i: usize| -> SocketAddr { cfg.nodes[i].cluster.clone().unwrap().parse().unwrap() };
        let (to_n1, to_n2) = (Proxy::start(real(0)).await, Proxy::start(real(1)).await);
        let mut cfg1 = cfg.clone();
        cfg1.nodes[1].cluster = Some(to_n2.addr.to_string());
        let mut cfg2 = cfg.clone();
        cfg2.nodes[0].cluster = Some(to_n1.addr.to_string());
        let mut ls = ls.into_iter();
        let n1 = start_node(&cfg1, "n1", ls.next().unwrap(), &store, None);
        let n2 = start_node(&cfg2, "n2", ls.next().unwrap(), &store, None);
        eventually("link up", || async { peer_connected(&n2, "n1").await.then_some(()) }).await;
        ProxiedPair {
            n1,
            n2,
            to_n1,
            to_n2,
            db,
        }
    }

    pub fn cut(&self) {
        self.to_n1.cut();
        self.to_n2.cut();
    }

    pub fn restore(&self) {
        self.to_n1.restore();
        self.to_n2.restore();
    }

    /// From now on n2's bytes to n1 vanish on the open link, whichever node dialed it; n1's
    /// bytes to n2 still arrive. Frames n2 writes are accepted by its socket and never read.
    pub fn swallow_n2_to_n1(&self) {
        self.to_n1.swallow_to_target.store(true, Ordering::SeqCst);
        self.to_n2.swallow_to_dialer.store(true, Ordering::SeqCst);
    }

    /// As [`ProxiedPair::swallow_n2_to_n1`], the other way.
    pub fn swallow_n1_to_n2(&self) {
        self.to_n2.swallow_to_target.store(true, Ordering::SeqCst);
        self.to_n1.swallow_to_dialer.store(true, Ordering::SeqCst);
    }

    pub fn stop_swallowing(&self) {
        for p in [&self.to_n1, &self.to_n2] {
            p.swallow_to_target.store(false, Ordering::SeqCst);
            p.swallow_to_dialer.store(false, Ordering::SeqCst);
        }
    }
}

/// A TCP proxy in front of `target` whose links can be cut and restored, and whose bytes in
/// one direction can be swallowed (read and dropped) while the link stays open.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    pub swallow_to_target: Arc<AtomicBool>,
    pub swallow_to_dialer: Arc<AtomicBool>,
}

/// Copies `from` to `to` until either ends; drops what it reads while `swallow` is set.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    swallow: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !swallow.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (gen_tx, gen_rx) = tokio::sync::watch::channel(0u64);
        let c2 = cut.clone();
        let swallow_to_target = Arc::new(AtomicBool::new(false));
        let swallow_to_dialer = Arc::new(AtomicBool::new(false));
        let (st, sd) = (swallow_to_target.clone(), swallow_to_dialer.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                // The generation this link belongs to, taken before the cut is read (a cut
                // stores the flag, then bumps the generation): a cut from now on ends it.
                let mut gen = gen_rx.clone();
                gen.borrow_and_update();
                if c2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (st, sd) = (st.clone(), sd.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (in_rd, in_wr) = inbound.into_split();
                    let (out_rd, out_wr) = outbound.into_split();
                    // Either direction ending ends both (the halves drop): each side sees the
                    // other close.
                    tokio::select! {
                        _ = pipe(in_rd, out_wr, st) => {}
                        _ = pipe(out_rd, in_wr, sd) => {}
                        _ = gen.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            generation: Arc::new(gen_tx),
            swallow_to_target,
            swallow_to_dialer,
        }
    }

    /// Drops every open link and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Swallows every byte both ways, on the open links and on new ones, and closes none: the
    /// link goes silent, as behind a partition whose NAT or firewall dropped its state, or to
    /// a frozen host (nothing the kernel notices for minutes, here never).
    pub fn go_silent(&self) {
        self.swallow_to_target.store(true, Ordering::SeqCst);
        self.swallow_to_dialer.store(true, Ordering::SeqCst);
    }

    /// Forwards bytes again (those swallowed meanwhile are lost).
    pub fn speak_again(&self) {
        self.swallow_to_target.store(false, Ordering::SeqCst);
        self.swallow_to_dialer.store(false, Ordering::SeqCst);
    }
}

/// A port on 127.0.0.1 for a `mailroom` child's config, held until [`NodeProcess::spawn`]
/// hands its socket to the child (see `common::ports`).
pub fn free_addr() -> String {
    super::ports::held_addr()
}

/// A mailroom process; killed (SIGKILL) on drop unless already stopped.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub entry: NodeEntry,
}

impl NodeProcess {
    pub fn spawn(config: &std::path::Path, entry: &NodeEntry, log: &std::path::Path) -> NodeProcess {
        Self::spawn_with(config, entry, log, |_| {})
    }

    /// [`NodeProcess::spawn`], `tune` adjusting the command first (its environment, a
    /// `pre_exec` of its own).
    pub fn spawn_with(
        config: &std::path::Path,
        entry: &NodeEntry,
        log: &std::path::Path,
        tune: impl FnOnce(&mut std::process::Command),
    ) -> NodeProcess {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
        cmd.args(["run", "--config"])
            .arg(config)
            .args(["--node", &entry.id])
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err);
        let mut addrs = vec![entry.listen.as_str(), entry.admin.as_str()];
        addrs.extend(entry.cluster.as_deref());
        let _inherited = super::ports::inherit_systemd(&mut cmd, &addrs);
        tune(&mut cmd);
        let child = cmd.spawn().expect("spawn mailroom");
        NodeProcess {
            child,
            entry: entry.clone(),
        }
    }

    /// Waits until the node answers `/ready`: a child process on a fresh database (migrations
    /// first) while the 2-core box is busy gets a generous bound of its own, longer than the
    /// shared `eventually`'s.
    pub async fn wait_ready(&self) {
        let url = format!("{}/ready", self.admin_url());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            if let Ok(res) = awc::Client::default().get(&url).send().await {
                if res.status().is_success() {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} not ready after 90 s (log in the test's temp dir)",
                self.entry.id
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn public_url(&self) -> String {
        format!("http://{}", self.entry.listen)
    }
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.entry.listen)
    }
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.entry.admin)
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

// ---- what the nodes say about the cluster (admin API) ----

pub async fn cluster_json(n: &RunningNode) -> Value {
    get_json(&format!("{}/cluster", n.admin_url())).await
}

pub async fn owner_seen_by(n: &RunningNode, conn: &str) -> Option<String> {
    let v = cluster_json(n).await;
    v["cluster"]["directory"]
        .as_array()?
        .iter()
        .find(|e| e["conn"] == conn)
        .and_then(|e| e["node"].as_str().map(str::to_string))
}

pub async fn wait_owner(nodes: &[&RunningNode], conn: &str, owner: &str) {
    for n in nodes {
        eventually(&format!("{} sees {conn} owned by {owner}", n.node_id), || async {
            (owner_seen_by(n, conn).await.as_deref() == Some(owner)).then_some(())
        })
        .await;
    }
}

pub async fn peer_connected(n: &RunningNode, peer: &str) -> bool {
    let v = get_json(&format!("{}/status", n.admin_url())).await;
    v["peers"]
        .as_array()
        .map(|ps| ps.iter().any(|p| p["id"] == peer && p["connected"] == true))
        .unwrap_or(false)
}

/// Opens a live-mode socket on `node` and waits for the status answer.
pub async fn live_socket(a: &Agent, node: &RunningNode) -> WsClient {
    live_socket_at(a, &ws_url(node)).await
}

/// [`live_socket`] at the WebSocket URL `url` (a node process's).
pub async fn live_socket_at(a: &Agent, url: &str) -> WsClient {
    let mut ws = a.websocket(url).await.unwrap();
    let st = ws_request(
        a,
        &mut ws,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    assert_eq!(type_name(&st), "status", "{st}");
    assert_eq!(st["live_delivery"], true, "{st}");
    ws
}

pub async fn a_connection_id(n: &RunningNode) -> String {
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    v["connections"][0]["id"].as_str().unwrap().to_string()
}
