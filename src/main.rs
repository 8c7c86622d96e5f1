//! The `mailroom` binary: parse the CLI, load and validate the config, bind the listeners,
//! hand over to `node::run`. No logic of its own.

use clap::{Parser, Subcommand};
use mailroom::config::{Config, EXIT_BAD_CONFIG};
use mailroom::node;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "mailroom", version, about = "A clustered DIDComm mediator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a mediator node. Without --config: one node, sled in ./mailroom-data,
    /// public 127.0.0.1:8080, admin 127.0.0.1:8081.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Which [[node]] of the config this process is (default: the first).
        #[arg(long)]
        node: Option<String>,
    },
    /// Validate a config file; exit 64 with the reason when it is bad.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a node's and its cluster's status from its admin endpoint.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        admin: String,
        #[arg(long, env = "MAILROOM_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Drain a node: not ready for the load balancer, WebSockets closed with 1001 so wallets
    /// reconnect elsewhere, no new sessions. Names the node by --node (with --config) or --admin.
    Drain(NodeTarget),
    /// Reverse `drain`: the node is ready and accepts sessions again.
    Undrain(NodeTarget),
}

#[derive(clap::Args)]
struct NodeTarget {
    /// The [[node]] whose admin listener to call (from --config).
    #[arg(long)]
    node: Option<String>,
    #[arg(long, default_value = "cluster.toml")]
    config: PathBuf,
    /// The admin URL, instead of --node.
    #[arg(long)]
    admin: Option<String>,
    /// Bearer token (default: [admin] token of --config).
    #[arg(long, env = "MAILROOM_ADMIN_TOKEN")]
    token: Option<String>,
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
        let cfg = Config::load(&self.config).map_err(|e| format!("{}: {e}", self.config.display()))?;
        let entry = cfg.node(&node).map_err(|e| e.to_string())?;
        Ok((
            format!("http://{}", entry.admin),
            self.token.or(cfg.admin.token.clone()),
        ))
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} node(s), store {}, strategy {:?})",
                    config.display(),
                    c.nodes.len(),
                    c.store.backend,
                    c.delivery.strategy
                );
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(e),
        },
        Cmd::Run { config, node } => {
            let cfg = match &config {
                Some(p) => match Config::load(p) {
                    Ok(c) => c,
                    Err(e) => return bad_config(e),
                },
                None => Config::single_node_default(),
            };
            let node_id = node.unwrap_or_else(|| cfg.nodes[0].id.clone());
            let entry = match cfg.node(&node_id) {
                Ok(n) => n.clone(),
                Err(e) => return bad_config(e),
            };
            mailroom::logging::init(&cfg.log);
            let listeners = match node::Listeners::bind(&entry) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("mailroom: {e}");
                    return ExitCode::from(71);
                }
            };
            let sys = actix_rt::System::new();
            let res = sys.block_on(async move {
                node::run(
                    cfg,
                    &node_id,
                    listeners,
                    node::NodeOptions {
                        store: None,
                        config_path: config,
                    },
                    mailroom::signals::shutdown_signal(),
                    Arc::new(AtomicBool::new(false)),
                )
                .await
            });
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mailroom: {e:#}");
                    ExitCode::FAILURE
                }
            }
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
