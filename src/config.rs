//! `cluster.toml`: the serde structures, their defaults, and `validate()`.
//!
//! One file describes the whole cluster; each node picks its own `[[node]]` entry by id. This
//! module parses and checks; it opens no socket and touches no store. Every limit the node
//! enforces is named here with its default, so an operator can read them in one place.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit code for a bad configuration (EX_CONFIG would be 78; the brief asks for EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("node {0:?} is not listed in the [[node]] entries")]
    UnknownNode(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub delivery: DeliverySection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub mediator: MediatorSection,
    /// Push notifications that wake offline wallets (off when absent).
    #[serde(default)]
    pub push: Option<crate::push::PushConfig>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeEntry>,
}

/// `Debug` shows every field but the secret.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Peers must name the same cluster in their handshake.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// Shared secret proving membership and keying the link encryption (never sent on the
    /// wire, never in logs or `Debug` output).
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of an environment variable holding the secret instead.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// What wallets and senders use (the load balancer's URL). Defaults to the node's listener.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Heartbeat period on cluster links, milliseconds.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A peer silent for this long is considered down, milliseconds.
    #[serde(default = "default_failure_ms")]
    pub failure_timeout_ms: u64,
    /// Largest cluster frame accepted, bytes.
    #[serde(default = "default_cluster_frame")]
    pub max_frame_bytes: usize,
    /// Frames queued per peer before new notifications are dropped (the sweep covers them).
    #[serde(default = "default_peer_queue")]
    pub peer_queue: usize,
}

impl std::fmt::Debug for ClusterSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSection")
            .field("name", &self.name)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("public_url", &self.public_url)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("failure_timeout_ms", &self.failure_timeout_ms)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("peer_queue", &self.peer_queue)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// "sled" (embedded, default) or "postgres".
    #[serde(default = "default_backend")]
    pub backend: String,
    /// sled directory.
    #[serde(default = "default_sled_path")]
    pub path: PathBuf,
    /// PostgreSQL URL.
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL pool size per node.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// sled page cache, MiB (sled's own default, 1 GiB, lets a node's memory grow towards it).
    #[serde(default = "default_sled_cache_mib")]
    pub sled_cache_mib: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Strategy {
    /// Queue only; wallets must pick up.
    QueueOnly,
    /// Queue, and push to sessions in pickup 2.0 live mode or with return-route (default).
    QueueAndLiveModeDelivery,
    /// Push raw to any open return-route session, else queue.
    DirectDelivery,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// How long a delivered-but-unacknowledged message stays leased, milliseconds.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Period of the sweep that finds live sessions with pending messages (bounds the delay
    /// a lost cluster notification can cause), milliseconds.
    #[serde(default = "default_sweep_ms")]
    pub sweep_interval_ms: u64,
    /// Messages per live delivery / pickup batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Timeout of one POST to an agent's own HTTP endpoint, milliseconds.
    #[serde(default = "default_endpoint_timeout")]
    pub endpoint_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest envelope accepted on `POST /`, bytes (413 above).
    #[serde(default = "default_max_envelope")]
    pub max_envelope_bytes: usize,
    /// Largest WebSocket frame accepted, bytes (close 1009 above).
    #[serde(default = "default_max_envelope")]
    pub max_ws_frame_bytes: usize,
    /// Live WebSocket sessions per node (503 above).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Messages queued per connection before forwards are refused.
    #[serde(default = "default_queue_messages")]
    pub max_queue_messages: u64,
    /// Bytes queued per connection before forwards are refused.
    #[serde(default = "default_queue_bytes")]
    pub max_queue_bytes: u64,
    /// A queued message older than this is expired by the sweep, seconds (0 = never).
    #[serde(default = "default_ttl")]
    pub message_ttl_secs: u64,
    /// The same inner message forwarded twice within this window is queued once, seconds.
    #[serde(default = "default_dedup")]
    pub dedup_window_secs: u64,
    /// Messages of one WebSocket being handled at once; beyond it a frame is answered
    /// `{"error":"busy"}` and not handled (the sender retries).
    #[serde(default = "default_ws_inflight")]
    pub max_ws_inflight: usize,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Bearer token for the admin listener; required unless it binds loopback.
    #[serde(default)]
    pub token: Option<String>,
    /// Who the token stands for in the audit log of operator actions (default `"admin-token"`).
    #[serde(default)]
    pub token_label: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// "human" (default) or "json".
    #[serde(default = "default_log_format")]
    pub format: String,
    /// A tracing filter, e.g. "info" or "mailroom=debug" (RUST_LOG overrides).
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediatorSection {
    /// The label in the mediator's invitations.
    #[serde(default = "default_label")]
    pub label: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    pub id: String,
    /// Public HTTP POST + WebSocket listener.
    pub listen: String,
    /// Cluster peer protocol listener (optional for a lone node).
    #[serde(default)]
    pub cluster: Option<String>,
    /// Admin listener.
    pub admin: String,
}

fn default_cluster_name() -> String {
    "local".into()
}
fn default_heartbeat_ms() -> u64 {
    500
}
fn default_failure_ms() -> u64 {
    3000
}
fn default_cluster_frame() -> usize {
    1 << 20
}
fn default_peer_queue() -> usize {
    4096
}
fn default_backend() -> String {
    "sled".into()
}
fn default_sled_path() -> PathBuf {
    PathBuf::from("./mailroom-data")
}
fn default_pool() -> usize {
    16
}
fn default_strategy() -> Strategy {
    Strategy::QueueAndLiveModeDelivery
}
fn default_lease_ms() -> u64 {
    30_000
}
fn default_sweep_ms() -> u64 {
    2_000
}
fn default_batch() -> usize {
    10
}
fn default_endpoint_timeout() -> u64 {
    10_000
}
fn default_max_envelope() -> usize {
    4 << 20
}
fn default_max_sessions() -> usize {
    100_000
}
fn default_queue_messages() -> u64 {
    10_000
}
fn default_queue_bytes() -> u64 {
    256 << 20
}
fn default_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_dedup() -> u64 {
    300
}
fn default_sled_cache_mib() -> u64 {
    64
}
fn default_ws_inflight() -> usize {
    32
}
fn default_log_format() -> String {
    "human".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_label() -> String {
    "mailroom".into()
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // An empty table deserializes to every documented default.
                toml::from_str("").expect("defaults of a config section")
            }
        }
    )*};
}
default_from_serde!(
    ClusterSection,
    StoreSection,
    DeliverySection,
    Limits,
    LogSection,
    MediatorSection
);

impl Config {
    /// The configuration of `mailroom run` with no arguments: one node, sled in
    /// `./mailroom-data`, public `127.0.0.1:8080`, admin `127.0.0.1:8081`.
    pub fn single_node_default() -> Config {
        let mut c: Config = toml::from_str("").expect("empty config");
        c.nodes.push(NodeEntry {
            id: "n1".into(),
            listen: "127.0.0.1:8080".into(),
            cluster: None,
            admin: "127.0.0.1:8081".into(),
        });
        c
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let c = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks everything that can be checked before a port is bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.nodes.is_empty() {
            return bad("at least one [[node]] entry is required".into());
        }
        let mut ids = std::collections::HashSet::new();
        let mut addrs = std::collections::HashSet::new();
        for n in &self.nodes {
            if n.id.is_empty()
                || n.id.len() > 64
                || !n.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return bad(format!("node id {:?} must be 1-64 characters of [A-Za-z0-9_-]", n.id));
            }
            if !ids.insert(n.id.clone()) {
                return bad(format!("node id {:?} is listed twice", n.id));
            }
            let mut fields = vec![("listen", &n.listen), ("admin", &n.admin)];
            if let Some(c) = &n.cluster {
                fields.push(("cluster", c));
            }
            for (field, v) in fields {
                let a: SocketAddr = v.parse().map_err(|_| {
                    ConfigError::Invalid(format!("node {}: {field} = {v:?} is not an IP:port address", n.id))
                })?;
                if a.port() != 0 && !addrs.insert(a) {
                    return bad(format!("node {}: {field} address {a} is used twice", n.id));
                }
            }
        }
        for n in &self.nodes {
            let admin: SocketAddr = n
                .admin
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("node {}: admin address", n.id)))?;
            if !admin.ip().is_loopback() && self.admin.token.as_deref().map(str::is_empty).unwrap_or(true) {
                return bad(format!(
                    "node {}: admin = {} is not on loopback, so [admin] token is required",
                    n.id, n.admin
                ));
            }
        }
        if self.nodes.len() > 1 {
            for n in &self.nodes {
                if n.cluster.is_none() {
                    return bad(format!(
                        "node {}: a cluster of several nodes needs a `cluster` address on every node",
                        n.id
                    ));
                }
            }
            match self.cluster_secret() {
                Ok(s) if s.len() >= 8 => {}
                Ok(_) => return bad("cluster.secret must be at least 8 characters".into()),
                Err(e) => return Err(e),
            }
        }
        if self.cluster.secret.is_some() && self.cluster.secret_env.is_some() {
            return bad("set cluster.secret or cluster.secret_env, not both".into());
        }
        if let Some(u) = &self.cluster.public_url {
            match url::Url::parse(u) {
                Ok(p) if p.scheme() == "http" || p.scheme() == "https" => {}
                _ => return bad(format!("cluster.public_url {u:?} must be an http:// or https:// URL")),
            }
        }
        if self.cluster.heartbeat_ms == 0 || self.cluster.failure_timeout_ms <= self.cluster.heartbeat_ms {
            return bad("cluster.failure_timeout_ms must exceed cluster.heartbeat_ms > 0".into());
        }
        match self.store.backend.as_str() {
            "sled" => {}
            "postgres" => match &self.store.url {
                Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {}
                _ => return bad("store.backend = \"postgres\" needs store.url = \"postgres://...\"".into()),
            },
            other => return bad(format!("store.backend {other:?} is not \"sled\" or \"postgres\"")),
        }
        if self.store.pool_size == 0 {
            return bad("store.pool_size must be at least 1".into());
        }
        if self.store.sled_cache_mib == 0 || self.store.sled_cache_mib > 1 << 20 {
            return bad("store.sled_cache_mib must be 1..=1048576".into());
        }
        if self.limits.max_ws_inflight == 0 {
            return bad("limits.max_ws_inflight must be at least 1".into());
        }
        if self.delivery.batch_size == 0 || self.delivery.batch_size > 1000 {
            return bad("delivery.batch_size must be 1..=1000".into());
        }
        if self.delivery.lease_ms < 100 || self.delivery.sweep_interval_ms < 10 {
            return bad("delivery.lease_ms must be >= 100 and delivery.sweep_interval_ms >= 10".into());
        }
        if self.limits.max_envelope_bytes < 1024 || self.limits.max_ws_frame_bytes < 1024 {
            return bad("limits.max_envelope_bytes and limits.max_ws_frame_bytes must be >= 1024".into());
        }
        if self.limits.max_sessions == 0 || self.limits.max_queue_messages == 0 || self.limits.max_queue_bytes == 0 {
            return bad("limits.max_sessions, max_queue_messages and max_queue_bytes must be > 0".into());
        }
        if self.log.format != "human" && self.log.format != "json" {
            return bad(format!("log.format {:?} is not \"human\" or \"json\"", self.log.format));
        }
        if let Some(p) = &self.push {
            // Reads and parses every credential: a bad one stops the node before it starts.
            p.load().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    pub fn node(&self, id: &str) -> Result<&NodeEntry, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ConfigError::UnknownNode(id.into()))
    }

    /// The shared secret, from `secret` or the variable named by `secret_env`.
    pub fn cluster_secret(&self) -> Result<String, ConfigError> {
        if let Some(var) = &self.cluster.secret_env {
            return std::env::var(var)
                .map_err(|_| ConfigError::Invalid(format!("cluster.secret_env names {var:?}, which is not set")));
        }
        Ok(self.cluster.secret.clone().unwrap_or_default())
    }

    /// The public URL wallets use; the node's own listener when the file sets none.
    pub fn public_url(&self, node: &NodeEntry, bound: Option<SocketAddr>) -> String {
        match &self.cluster.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!(
                "http://{}",
                bound.map(|a| a.to_string()).unwrap_or_else(|| node.listen.clone())
            ),
        }
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.delivery.lease_ms)
    }
}

/// `ws://` twin of an `http://` URL (and `wss://` of `https://`).
pub fn ws_url(http_url: &str) -> String {
    if let Some(rest) = http_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = http_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        http_url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_cluster_toml_parses() {
        let text = include_str!("../cluster.toml");
        let c = Config::parse(text).expect("cluster.toml at the top level must be valid");
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.node("n2").unwrap().listen, "127.0.0.1:8002");
        assert_eq!(c.delivery.strategy, Strategy::QueueAndLiveModeDelivery);
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::single_node_default();
        c.validate().unwrap();
        assert_eq!(c.store.backend, "sled");
        assert_eq!(c.store.path, PathBuf::from("./mailroom-data"));
        assert_eq!(c.nodes[0].listen, "127.0.0.1:8080");
        assert_eq!(c.nodes[0].admin, "127.0.0.1:8081");
        assert_eq!(c.limits.max_envelope_bytes, 4 << 20);
        assert_eq!(c.delivery.sweep_interval_ms, 2000);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            ("[cluster]\nname='x'\nbogus=1\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "bogus"),
            ("[[node]]\nid='n1'\nlisten='nope'\nadmin='127.0.0.1:2'", "not an IP:port"),
            ("[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:1'", "used twice"),
            ("", "at least one [[node]]"),
            ("[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='0.0.0.0:2'", "token is required"),
            ("[store]\nbackend='postgres'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "store.url"),
            ("[delivery]\nstrategy='Sometimes'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "Sometimes"),
            (
                "[[node]]\nid='n1'\nlisten='127.0.0.1:1'\ncluster='127.0.0.1:3'\nadmin='127.0.0.1:2'\n[[node]]\nid='n2'\nlisten='127.0.0.1:4'\ncluster='127.0.0.1:5'\nadmin='127.0.0.1:6'",
                "secret",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
