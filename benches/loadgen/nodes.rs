//! What the scenarios run against: process figures from /proc, a `mailroom` child process,
//! a fresh PostgreSQL database per run, stores shared by in-process nodes.

use crate::client::*;
use anyhow::{Context, Result};
use mailroom::config::Config;
use mailroom::node;
use mailroom::store::Store;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Process figures: CPU time and RSS from /proc
// ---------------------------------------------------------------------------------------------

pub(crate) fn clk_tck() -> f64 {
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
pub(crate) fn cpu_secs(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let ut: f64 = f.get(11).context("utime")?.parse()?;
    let st: f64 = f.get(12).context("stime")?.parse()?;
    Ok((ut + st) / clk_tck())
}

pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

pub(crate) fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

// ---------------------------------------------------------------------------------------------
// A mailroom child process
// ---------------------------------------------------------------------------------------------

/// An address on 127.0.0.1 nothing listens on (bound, then released).
pub(crate) fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

pub(crate) struct ChildNode {
    pub(crate) child: std::process::Child,
    pub(crate) public: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) _dir: tempfile::TempDir,
}

impl ChildNode {
    /// Starts `mailroom run` with one node: sled in a temporary directory, or PostgreSQL at
    /// `pg_url`. Defaults otherwise (strategy QueueAndLiveModeDelivery, sweep 2000 ms).
    pub(crate) async fn start(pg_url: Option<&str>) -> Result<ChildNode> {
        Self::start_with(pg_url, "").await
    }

    /// [`ChildNode::start`] with `extra` appended to the config (whole TOML sections).
    pub(crate) async fn start_with(pg_url: Option<&str>, extra: &str) -> Result<ChildNode> {
        let dir = tempfile::tempdir()?;
        // Held until the child inherits them (tests/common/ports.rs): never free in between.
        let (public_s, admin_s) = (crate::ports::held_addr(), crate::ports::held_addr());
        let (public, admin): (SocketAddr, SocketAddr) = (public_s.parse()?, admin_s.parse()?);
        let store = match pg_url {
            Some(u) => format!("[store]\nbackend = \"postgres\"\nurl = \"{u}\"\n"),
            None => format!(
                "[store]\nbackend = \"sled\"\npath = \"{}\"\n",
                dir.path().join("data").display()
            ),
        };
        let toml = format!(
            "{store}\n{extra}\n[log]\nlevel = \"warn\"\n\n[[node]]\nid = \"n1\"\nlisten = \"{public}\"\nadmin = \"{admin}\"\n"
        );
        let cfg = dir.path().join("mailroom.toml");
        std::fs::write(&cfg, toml)?;
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
        cmd.args(["run", "--config"])
            .arg(&cfg)
            .stdout(log.try_clone()?)
            .stderr(log);
        let _inherited = crate::ports::inherit_systemd(&mut cmd, &[&public_s, &admin_s]);
        let child = cmd.spawn().context("spawn mailroom")?;
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

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn public_url(&self) -> String {
        format!("http://{}", self.public)
    }
    pub(crate) fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }
    pub(crate) fn ws_url(&self) -> String {
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

pub(crate) struct FreshDb {
    pub(crate) name: String,
    pub(crate) admin: String,
}

pub(crate) async fn pg_exec(admin: &str, sql: &str) -> Result<()> {
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
pub(crate) async fn pg_backend_pids(admin: &str, db: &str) -> Result<Vec<String>> {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls).await?;
    let task = tokio::spawn(conn);
    let rows = client
        .query("SELECT pid FROM pg_stat_activity WHERE datname = $1", &[&db])
        .await?;
    drop(client);
    let _ = task.await;
    Ok(rows.iter().map(|r| r.get::<_, i32>(0).to_string()).collect())
}

pub(crate) fn cpu_sum(pids: &[String]) -> f64 {
    pids.iter().filter_map(|p| cpu_secs(p).ok()).sum()
}

impl FreshDb {
    pub(crate) async fn create(admin: &str) -> Result<FreshDb> {
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

    pub(crate) fn url(&self) -> String {
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
pub(crate) fn background_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("background runtime")
    })
}

pub(crate) async fn open_shared_store(cfg: &Config) -> Result<Arc<dyn Store>> {
    let cfg = cfg.clone();
    background_runtime()
        .spawn(async move { node::open_store(&cfg).await })
        .await?
}
