//! The `mailroom` binary: parse the CLI, load and validate the config, bind the listeners,
//! hand over to `node::run`. No logic of its own.

use clap::{Parser, Subcommand};
use mailroom::config::env_var;
use mailroom::config::{Config, ConfigError, EXIT_BAD_CONFIG};
use mailroom::node;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// mimalloc, not glibc's malloc: ~8 % less CPU per forward on a loaded node and a lower, flat
/// RSS under steady load, for ~0.7 KiB more per idle session (docs/BENCHMARKS.md, "The
/// allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "mailroom", version, about = "A clustered DIDComm mediator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a mediator node. Without --config: one node, sled in ./mailroom-data,
    /// public 127.0.0.1:8080, admin 127.0.0.1:8081. MAILROOM_* variables override the
    /// addresses and secrets (see the README); a bad one exits 64 with the reason.
    Run {
        #[arg(long, env = "MAILROOM_CONFIG")]
        config: Option<PathBuf>,
        /// Which [[node]] of the config this process is (default: the first).
        #[arg(long, env = "MAILROOM_NODE")]
        node: Option<String>,
    },
    /// Validate a config file (with the MAILROOM_* overrides, as `run` sees it); exit 64 with
    /// the reason when it is bad.
    CheckConfig {
        #[arg(long, env = "MAILROOM_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "MAILROOM_NODE")]
        node: Option<String>,
    },
    /// Exit 0 when this node's admin /ready answers 200, else 1 with the reason (the
    /// container HEALTHCHECK: the image needs no curl). The admin address is the one `run`
    /// would bind, from the same config and MAILROOM_* variables, unless --admin is given.
    Healthcheck {
        #[arg(long, env = "MAILROOM_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "MAILROOM_NODE")]
        node: Option<String>,
        /// Admin base URL, e.g. http://127.0.0.1:8081 (default: from the config).
        #[arg(long, value_parser = admin_url)]
        admin: Option<String>,
        /// Give up after this many milliseconds (1..=3600000).
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        timeout_ms: u64,
    },
    /// Show a node's and its cluster's status from its admin endpoint.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8081", value_parser = admin_url)]
        admin: String,
        #[arg(long, env = "MAILROOM_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Drain a node: not ready for the load balancer, WebSockets closed with 1001 so wallets
    /// reconnect elsewhere, no new sessions. Names the node by --node (with --config) or --admin.
    Drain(NodeTarget),
    /// Reverse `drain`: the node is ready and accepts sessions again.
    Undrain(NodeTarget),
    /// Check any DIDComm v1 mediator (mailroom, Credo, ACA-Py, ...) from its invitation URL:
    /// onboarding, keylist, forward, each pickup flavour, live mode, isolation between two
    /// wallets, key takeover, malformed input, redelivery. One line per check (PASS, FAIL,
    /// SKIP), then `N passed, M failed, K skipped`; exit 0 without a FAIL, 1 with one (or when
    /// the invitation URL is down or answers 5xx: `FAIL invitation`), 64 for a bad URL or
    /// arguments.
    Probe {
        /// The invitation URL (`?oob=...` or `?c_i=...`), or a URL that serves the invitation
        /// as JSON (mailroom's `GET /invitation`).
        url: String,
        /// WebSocket endpoint, when neither the invitation nor the mediator's DID names one.
        #[arg(long)]
        ws: Option<String>,
        /// Longest wait for one reply or delivery, in seconds (1..=3600).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_secs: u64,
        /// Longest wait for an unacknowledged delivery to be offered again (a mediator's
        /// lease: mailroom's `delivery.lease_ms` is 30 s by default), in seconds (0..=86400).
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        redelivery_wait_secs: u64,
        /// Size in bytes of the oversized body of `malformed-huge` (1..=1 GiB).
        #[arg(long, default_value_t = 8 << 20, value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
        huge_bytes: u64,
        /// Run only the checks whose names start with one of these (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
}

#[derive(clap::Args)]
struct NodeTarget {
    /// The [[node]] whose admin listener to call (from --config).
    #[arg(long)]
    node: Option<String>,
    /// The config the node runs with (the image sets MAILROOM_CONFIG).
    #[arg(long, env = "MAILROOM_CONFIG", default_value = "cluster.toml")]
    config: PathBuf,
    /// The admin URL, instead of --node.
    #[arg(long, value_parser = admin_url, conflicts_with = "node")]
    admin: Option<String>,
    /// Bearer token (default: [admin] token of --config).
    #[arg(long, env = "MAILROOM_ADMIN_TOKEN")]
    token: Option<String>,
}

/// An `--admin` value: an `http://` or `https://` URL with a host (else a usage error, 64).
fn admin_url(s: &str) -> Result<String, String> {
    match url::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(s.to_string()),
        Ok(_) => Err("an http:// or https:// URL of the node's admin listener".into()),
        Err(e) => Err(format!("not a URL ({e})")),
    }
}

impl NodeTarget {
    /// (admin URL, token), or the reason the target is unusable.
    fn resolve(self) -> Result<(String, Option<String>), String> {
        if let Some(a) = self.admin {
            return Ok((a, self.token));
        }
        let node = self
            .node
            .ok_or("name the node with --node ID (and --config FILE) or --admin URL")?;
        // The node's admin address and token only (with their environment overrides): the
        // machine an operator drains from need not hold the node's other secrets.
        let (admin, token) =
            Config::admin_of(&self.config, &node, env_var).map_err(|e| format!("{}: {e}", self.config.display()))?;
        Ok((admin, self.token.or(token)))
    }
}

fn bad_config(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mailroom: bad configuration: {msg}");
    ExitCode::from(EXIT_BAD_CONFIG as u8)
}

fn drain(target: NodeTarget, on: bool) -> ExitCode {
    let (admin, token) = match target.resolve() {
        Ok(x) => x,
        Err(e) => return bad_config(e),
    };
    let sys = actix_rt::System::new();
    match sys.block_on(mailroom::client::status::drain(&admin, token.as_deref(), on)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailroom {}drain: {e:#}", if on { "" } else { "un" });
            ExitCode::FAILURE
        }
    }
}

/// The config a node runs with: the file (or the built-in default), its node id, and the
/// MAILROOM_* environment overrides applied before validation.
fn effective_config(
    path: Option<&Path>,
    node: Option<String>,
) -> Result<(Config, String, Vec<&'static str>), ConfigError> {
    Config::load_for_node(path, node.as_deref(), env_var)
}

/// The open files this process may hold, its soft limit raised to the hard one first (the
/// soft limit is often 1,024, far below what a mediator's sessions need).
fn open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only the `rlimit` passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    Some(r.rlim_cur)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // A usage error (an unknown flag, a missing value or subcommand) exits 64, EX_USAGE, as
        // a bad config does, from every command (clap's own code is 2); help and version, which
        // clap reports as errors printed to stdout, exit 0.
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(mailroom::probe::EXIT_USAGE);
        }
        Err(e) => e.exit(),
    };
    match cli.cmd {
        Cmd::CheckConfig { config, node } => match effective_config(Some(&config), node) {
            Ok((c, node_id, applied)) => {
                println!(
                    "{}: ok ({} node(s), store {}, strategy {:?}){}",
                    config.display(),
                    c.nodes.len(),
                    c.store.backend,
                    c.delivery.strategy,
                    if applied.is_empty() {
                        String::new()
                    } else {
                        format!("; node {node_id} with {} from the environment", applied.join(", "))
                    }
                );
                for w in c.warnings() {
                    eprintln!("mailroom: warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(e),
        },
        Cmd::Healthcheck {
            config,
            node,
            admin,
            timeout_ms,
        } => {
            let base = match admin {
                Some(a) => a,
                None => match effective_config(config.as_deref(), node) {
                    Ok((cfg, node_id, _)) => match healthcheck_admin_url(&cfg, &node_id) {
                        Ok(u) => u,
                        Err(e) => return bad_config(e),
                    },
                    Err(e) => return bad_config(e),
                },
            };
            let sys = actix_rt::System::new();
            match sys.block_on(ready(&base, Duration::from_millis(timeout_ms))) {
                Ok(body) => {
                    println!("healthy: {body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run { config, node } => {
            // First, while the process has one thread: this clears LISTEN_FDS from the environment.
            let inherited = match node::inherited_listeners() {
                Ok(l) => l,
                Err(e) => return bad_config(e),
            };
            let (cfg, node_id, applied) = match effective_config(config.as_deref(), node) {
                Ok(c) => c,
                Err(e) => return bad_config(e),
            };
            let mut cfg = cfg;
            let entry = cfg.node(&node_id).expect("checked by effective_config").clone();
            mailroom::logging::init(&cfg.log);
            if let Some(open_files) = open_files_limit() {
                if let Some(configured) = cfg.fit_sessions_to(open_files) {
                    tracing::warn!(
                        configured,
                        open_files,
                        max_sessions = cfg.limits.max_sessions,
                        "limits.max_sessions lowered to what the process's open-file limit (ulimit -n, LimitNOFILE) leaves room for: raise that limit for more sessions"
                    );
                }
            }
            if !applied.is_empty() {
                tracing::info!(node = %node_id, "from the environment: {}", applied.join(", "));
            }
            let listeners = match node::Listeners::bind(&entry, inherited) {
                Ok(l) => l,
                Err(e @ node::ListenError::Unmatched(_)) => return bad_config(e),
                Err(node::ListenError::Bind(e)) => {
                    eprintln!("mailroom: {e}");
                    return ExitCode::from(71);
                }
            };
            let sys = actix_rt::System::new();
            let res = sys.block_on(async move {
                // First, before the node starts: from here SIGTERM and SIGINT stop it, while it
                // starts as while it serves, rather than end the process by their default action;
                // a second one ends the stop at once.
                let shutdown = mailroom::signals::shutdown_signal();
                node::run(
                    cfg,
                    &node_id,
                    listeners,
                    node::NodeOptions {
                        store: None,
                        config_path: config,
                    },
                    shutdown,
                    Arc::new(AtomicBool::new(false)),
                )
                .await
            });
            if res.is_ok() && node::STOPPED_STARTING.load(std::sync::atomic::Ordering::SeqCst) {
                // Not `sys`'s drop: it would wait for a store's open still running on a
                // blocking thread (nothing of it was served or needs finishing).
                std::process::exit(0);
            }
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mailroom: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Probe {
            url,
            ws,
            timeout_secs,
            redelivery_wait_secs,
            huge_bytes,
            only,
        } => {
            let mut opts = mailroom::probe::Options::new(&url);
            opts.ws = ws;
            opts.timeout = Duration::from_secs(timeout_secs);
            opts.redelivery_wait = Duration::from_secs(redelivery_wait_secs);
            opts.huge_bytes = usize::try_from(huge_bytes).unwrap_or(usize::MAX);
            opts.only = only;
            let sys = actix_rt::System::new();
            ExitCode::from(sys.block_on(mailroom::probe::main(opts)))
        }
        Cmd::Drain(t) => drain(t, true),
        Cmd::Undrain(t) => drain(t, false),
        Cmd::Status { admin, token } => {
            let sys = actix_rt::System::new();
            match sys.block_on(mailroom::client::status::print(&admin, token.as_deref())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mailroom status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The URL a local probe reaches this node's admin listener at: an unspecified bind address
/// (0.0.0.0, [::]) is reached on loopback.
fn healthcheck_admin_url(cfg: &Config, node_id: &str) -> Result<String, ConfigError> {
    let entry = cfg.node(node_id)?;
    let mut a: SocketAddr = entry
        .admin
        .parse()
        .map_err(|_| ConfigError::Invalid(format!("node {node_id}: admin address {:?}", entry.admin)))?;
    if a.ip().is_unspecified() {
        a.set_ip(match a.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(format!("http://{a}"))
}

/// GET {base}/ready: Ok(body) on 200, Err(reason) otherwise, within `timeout` as a whole:
/// awc's own timeout ends at the answer's head, and a listener that sent a head and then no
/// body would otherwise hold the check (and the orchestrator's probe) for good.
async fn ready(base: &str, timeout: Duration) -> Result<String, String> {
    let url = format!("{}/ready", base.trim_end_matches('/'));
    match tokio::time::timeout(timeout, ready_unbounded(&url, timeout)).await {
        Ok(res) => res,
        Err(_) => Err(format!("GET {url}: no whole answer within {timeout:?}")),
    }
}

async fn ready_unbounded(url: &str, timeout: Duration) -> Result<String, String> {
    let client = awc::Client::builder().timeout(timeout).finish();
    let mut res = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let body = res.body().limit(64 << 10).await.unwrap_or_default();
    let body = String::from_utf8_lossy(&body).trim().to_string();
    if res.status().as_u16() == 200 {
        Ok(body)
    } else {
        Err(format!("GET {url}: HTTP {} {body}", res.status().as_u16()))
    }
}
