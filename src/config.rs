//! `cluster.toml`: the serde structures, their defaults, and `validate()`.
//!
//! One file describes the whole cluster; each node picks its own `[[node]]` entry by id. This
//! module parses and checks; it opens no socket and touches no store. Every limit the node
//! enforces is named here with its default, so an operator can read them in one place.

use crate::cluster::{ClusterConfig, PeerConfig};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit code for a bad configuration (EX_CONFIG would be 78; the brief asks for EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;
/// Longest `cluster.public_url`: the mediator's DIDs (did:peer:4 for v1, did:peer:2 for v2)
/// carry it and its ws twin, and must stay under the length peers' DIDs are held to
/// ([`crate::didcomm::did::MAX_PEER_DID_LEN`]; a test in `didcomm::did` checks it).
pub const MAX_PUBLIC_URL_LEN: usize = 1024;

/// Upper bounds of the settings that become durations, deadlines or allocations. Each is far
/// above any production value and far below where the node's arithmetic (milliseconds as
/// `i64`, `now + lease`, `Instant + Duration`, a semaphore's permits) would overflow or panic:
/// a value past one is a typo, refused with its name rather than run as "every queued message
/// already expired".
pub mod bounds {
    /// `limits.message_ttl_secs`: ten years.
    pub const MESSAGE_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
    /// `limits.dedup_window_secs`: one day.
    pub const DEDUP_WINDOW_SECS: u64 = 24 * 3600;
    /// `limits.replay_window_secs`: thirty days.
    pub const REPLAY_WINDOW_SECS: u64 = 30 * 24 * 3600;
    /// `limits.unmediated_connection_ttl_secs`: one year.
    pub const UNMEDIATED_CONNECTION_TTL_SECS: u64 = 365 * 24 * 3600;
    /// `delivery.lease_ms`: one day.
    pub const LEASE_MS: u64 = 24 * 3600 * 1000;
    /// `delivery.sweep_interval_ms`: one hour (it bounds the delay a lost notification causes).
    pub const SWEEP_INTERVAL_MS: u64 = 3600 * 1000;
    /// `delivery.endpoint_timeout_ms`: ten minutes.
    pub const ENDPOINT_TIMEOUT_MS: u64 = 600 * 1000;
    /// `limits.max_endpoint_drains`: within the open files a node keeps for itself
    /// ([`super::OPEN_FILES_SLACK`]), each drain holding one socket.
    pub const ENDPOINT_DRAINS: usize = 1024;
    /// `cluster.heartbeat_ms`: one minute.
    pub const HEARTBEAT_MS: u64 = 60 * 1000;
    /// `cluster.failure_timeout_ms`: one hour.
    pub const FAILURE_TIMEOUT_MS: u64 = 3600 * 1000;
    /// `cluster.name`, bytes: it travels in the clear `Hello`, which must fit the smallest frame.
    pub const CLUSTER_NAME_BYTES: usize = 255;
    /// `store.pool_size`: PostgreSQL itself allows 100 connections by default; the pool
    /// allocates its slots up front.
    pub const POOL_SIZE: usize = 1000;
    /// `store.statement_timeout_ms`, lowest: below a second an ordinary commit under load
    /// would be refused (and the server's lock timeout, half of it, would end ordinary waits).
    pub const STATEMENT_TIMEOUT_MS_MIN: u64 = 1000;
    /// `store.statement_timeout_ms`, highest: ten minutes (the bound of a forward's answer).
    pub const STATEMENT_TIMEOUT_MS: u64 = 600 * 1000;
    /// `limits.max_envelope_bytes` and `max_ws_frame_bytes`: 1 GiB, PostgreSQL's largest
    /// `bytea` (a bigger message could be accepted and never stored).
    pub const MESSAGE_BYTES: usize = 1 << 30;
}

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
    /// At most [`MAX_PUBLIC_URL_LEN`] bytes.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Heartbeat period on cluster links, milliseconds (at most [`bounds::HEARTBEAT_MS`]).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A peer silent for this long is considered down, milliseconds (at least twice `heartbeat_ms`, at
    /// most [`bounds::FAILURE_TIMEOUT_MS`]).
    #[serde(default = "default_failure_ms")]
    pub failure_timeout_ms: u64,
    /// Largest cluster frame accepted, bytes (1024 to [`crate::cluster::proto::MAX_FRAME_CEILING`]).
    #[serde(default = "default_cluster_frame")]
    pub max_frame_bytes: usize,
    /// Frames queued per peer before new notifications are dropped (the sweep covers them); at
    /// most [`ClusterConfig::MAX_PEER_QUEUE`].
    #[serde(default = "default_peer_queue")]
    pub peer_queue: usize,
}

impl std::fmt::Debug for StoreSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = self.url.as_deref().map(without_password);
        f.debug_struct("StoreSection")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("url", &url)
            .field("pool_size", &self.pool_size)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("sled_cache_mib", &self.sled_cache_mib)
            .field("min_free_disk_mib", &self.min_free_disk_mib)
            .field("max_queued_messages", &self.max_queued_messages)
            .finish()
    }
}

/// `url` with its password (and a `password` query parameter) replaced, for logs and `Debug`;
/// a URL that does not parse is withheld whole.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("redacted"));
            }
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k.eq_ignore_ascii_case("password") {
                        "redacted".into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            if !pairs.is_empty() {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "<unparsed URL withheld>".into(),
    }
}

impl std::fmt::Debug for AdminSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSection")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_label", &self.token_label)
            .finish()
    }
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

/// An environment variable as the node reads its overrides (`MAILROOM_*`), at start and at a
/// reload alike: not valid UTF-8, converted lossily rather than ignored.
pub fn env_var(k: &str) -> Option<String> {
    std::env::var_os(k).map(|v| v.to_string_lossy().into_owned())
}

/// `Debug` shows the PostgreSQL URL without its password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// "sled" (embedded, default) or "postgres".
    #[serde(default = "default_backend")]
    pub backend: String,
    /// sled directory.
    #[serde(default = "default_sled_path")]
    pub path: PathBuf,
    /// PostgreSQL URL. Its `sslmode` (`disable`, `prefer` (default), `require`, `verify-ca`,
    /// `verify-full`) and `sslrootcert` (a PEM file) mean what they mean to libpq; checked by
    /// [`Config::validate`].
    #[serde(default)]
    pub url: Option<String>,
    /// PostgreSQL pool size per node (at most [`bounds::POOL_SIZE`]).
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// PostgreSQL: the longest a call waits for a pooled connection and its statements'
    /// answers before it fails (503) and closes a connection left waiting, milliseconds
    /// ([`bounds::STATEMENT_TIMEOUT_MS_MIN`] to [`bounds::STATEMENT_TIMEOUT_MS`]). The server
    /// ends the sessions' lock waits at half of it and their transactions idle for three
    /// times it (a node that froze or lost its link in one).
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_ms: u64,
    /// sled page cache, MiB (sled's own default, 1 GiB, lets a node's memory grow towards it).
    #[serde(default = "default_sled_cache_mib")]
    pub sled_cache_mib: u64,
    /// sled: new messages are refused (507) while the disk holding `path` has less than this
    /// free, MiB (0 = no reserve; at most 1048576): pickups and acknowledgements, which the
    /// queue needs to empty, keep the room. Without it a full disk fails every write.
    #[serde(default = "default_min_free_disk_mib")]
    pub min_free_disk_mib: u64,
    /// sled: new messages are refused (507) while the node holds this many queued (at least
    /// 1): each costs ~250-350 bytes of RAM in the queue's index, and nothing else bounds
    /// their sum (anyone may open connections and fill each one's queue). Pickups and
    /// acknowledgements go on and make room. Ignored with PostgreSQL (its queue is not in the
    /// node's memory).
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: u64,
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
    /// How long a delivered-but-unacknowledged message stays leased, milliseconds (100 to
    /// [`bounds::LEASE_MS`]).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// Period of the sweep that finds live sessions with pending messages (bounds the delay
    /// a lost cluster notification can cause), milliseconds (10 to [`bounds::SWEEP_INTERVAL_MS`]).
    #[serde(default = "default_sweep_ms")]
    pub sweep_interval_ms: u64,
    /// Messages per live delivery / pickup batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Timeout of one POST to an agent's own HTTP endpoint, milliseconds (1 to
    /// [`bounds::ENDPOINT_TIMEOUT_MS`]).
    #[serde(default = "default_endpoint_timeout")]
    pub endpoint_timeout_ms: u64,
    /// pickup 2.0 live mode, for a wallet that acknowledges on its socket: while a delivery of
    /// fewer than `batch_size` messages is unacknowledged, new messages wait (at most this long,
    /// milliseconds) and go out together once it is acknowledged. 0: every message at once.
    #[serde(default = "default_live_ack_wait")]
    pub live_ack_wait_ms: u64,
    /// Extra trust anchors (PEM) for `https://` endpoints of agents, beside the webpki roots:
    /// an operator's private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether agents' endpoints on loopback, private (RFC 1918, unique local) and shared
    /// (CGNAT) addresses are POSTed to. `false` for a mediator facing the internet, whose
    /// agents all have public endpoints: a DID document cannot then aim the node at the
    /// operator's own network. Admin listeners and metadata services are refused either way.
    #[serde(default = "yes")]
    pub allow_private_endpoints: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest envelope accepted on `POST /`, bytes (413 above; at most [`bounds::MESSAGE_BYTES`]).
    #[serde(default = "default_max_envelope")]
    pub max_envelope_bytes: usize,
    /// Largest WebSocket frame accepted, bytes (close 1009 above; at most [`bounds::MESSAGE_BYTES`]).
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
    /// A queued message older than this is expired by the sweep, seconds (0 = never; at most
    /// [`bounds::MESSAGE_TTL_SECS`]).
    #[serde(default = "default_ttl")]
    pub message_ttl_secs: u64,
    /// The same inner message forwarded twice within this window is queued once, seconds (0 =
    /// no dedup; at most [`bounds::DEDUP_WINDOW_SECS`]).
    #[serde(default = "default_dedup")]
    pub dedup_window_secs: u64,
    /// An authenticated message is handled once: a copy of it (a replay of a captured
    /// message) within this window is refused, seconds (0 = off; at most
    /// [`bounds::REPLAY_WINDOW_SECS`]). See [`crate::protocols::replay`].
    #[serde(default = "default_replay")]
    pub replay_window_secs: u64,
    /// A connection that has not asked for mediation (nor been granted it) this long after it
    /// was made is removed, seconds (0 = never; at most
    /// [`bounds::UNMEDIATED_CONNECTION_TTL_SECS`]): anyone can make connections, and one
    /// that never mediates is of no use to anybody.
    #[serde(default = "default_unmediated_ttl")]
    pub unmediated_connection_ttl_secs: u64,
    /// Messages of one WebSocket being handled at once; beyond it a frame is answered
    /// `{"error":"busy"}` and not handled (the sender retries).
    #[serde(default = "default_ws_inflight")]
    pub max_ws_inflight: usize,
    /// Recipient keys one connection may register (coordinate-mediation keylist-update, v1
    /// and v2). A keylist-update that would take a connection past it is refused whole:
    /// nothing of it is applied and every update in it is answered `server_error`, with a
    /// problem report saying why. Keeps one client from growing the routing table (and every
    /// keylist-query answer) without bound.
    #[serde(default = "default_max_keys")]
    pub max_keys_per_connection: usize,
    /// Drains of queues to agents' own endpoints under way on the node at once (1 to
    /// [`bounds::ENDPOINT_DRAINS`]). Each holds a socket for up to
    /// `delivery.endpoint_timeout_ms` and a batch of leased payload (up to twice the larger
    /// message limit): without a bound, connections whose endpoints accept and never answer
    /// held one each. A drain that finds none free is left to the sweep.
    #[serde(default = "default_max_endpoint_drains")]
    pub max_endpoint_drains: usize,
    /// A client must send a request's headers (WebSocket handshakes included) within this
    /// long of connecting, milliseconds; a slow-loris client is dropped after it.
    #[serde(default = "default_client_timeout")]
    pub client_timeout_ms: u64,
    /// A WebSocket whose client takes none of the bytes the node has for it for this long
    /// (its receive window shut: an app frozen by its OS, a peer gone without a FIN) is
    /// closed, milliseconds: its leases go back at once and its wallet is woken elsewhere or
    /// pushed. While the node waits on such a socket its session does nothing else, not even
    /// its heartbeat, so without this it would hold the wallet's session (and keep pushes
    /// off) for as long as the TCP connection lived.
    #[serde(default = "default_ws_write_stall")]
    pub ws_write_stall_ms: u64,
    /// A message must be whole within this long of its start, milliseconds: a `POST /` body
    /// from the end of its head (else 408), a WebSocket message sent in fragments from its
    /// first fragment (else the socket is closed 1008; pings between fragments keep a socket
    /// alive, not its unfinished message). Together with the node-wide budget for unfinished
    /// WebSocket messages (16 x `max_ws_frame_bytes`; a fragment that would pass it closes its
    /// socket 1013), a client cannot hold the node's memory with a message it never finishes.
    #[serde(default = "default_message_timeout")]
    pub message_timeout_ms: u64,
    /// The slowest a client may take what the node writes to it, bytes per second: a reply
    /// (an HTTP response, a WebSocket write) has its size over this rate, on top of
    /// `client_timeout_ms` (HTTP) or `ws_write_stall_ms` (WebSocket), to be taken whole, else
    /// its connection is reset. Without it a client reading a byte now and then held a reply
    /// (megabytes of a pickup batch), its socket and, on a WebSocket, its session (which runs
    /// nothing else while it writes: no heartbeat, no pushes for its wallet) for as long as it
    /// liked.
    #[serde(default = "default_min_write_rate")]
    pub min_write_bytes_per_sec: u64,
    /// A WebSocket bound to no connection (no wallet's message bound it) that has forwarded
    /// no new mail for this long is closed 1008, seconds: a sender forwarding over its socket
    /// keeps it, and reconnects when it has mail again. Without it a client holding sockets
    /// open with a ping now and then kept `max_sessions` full, and every wallet out, for as
    /// long as it liked.
    #[serde(default = "default_unbound_socket_idle")]
    pub unbound_socket_idle_secs: u64,
    /// The open files the process may hold, when `max_sessions` was fitted to them
    /// ([`Limits::fit_sessions_to`]): a reload fits the file it reads the same way before it
    /// compares it with the running config. Not a setting.
    #[serde(skip)]
    pub fitted_to_open_files: Option<u64>,
}

/// `Debug` shows every field but the token.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
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
    /// A tracing filter, e.g. "info" or "mailroom=debug" (RUST_LOG overrides); every directive
    /// must parse ([`LogSection::filter`]).
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MediatorSection {
    /// The label in the mediator's invitations.
    #[serde(default = "default_label")]
    pub label: String,
    /// Accept DIDComm v2 authcrypt in Veramo's form (ECDH-1PU without the tag in the key
    /// derivation, without `apv`, or with A256GCM/XC20P) as proof of its sender. Off: any
    /// wallet that receives a message from another can forge messages to this mediator as
    /// that wallet, in that form; such a message only forwards.
    #[serde(default)]
    pub v2_legacy_authcrypt: bool,
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

/// A cluster secret shorter than this is warned about ([`cluster_secret_warning`]); 8 is
/// refused, but files in use hold such secrets, so shorter ones still run.
pub const CLUSTER_SECRET_WARN_LEN: usize = 16;

/// Secrets printed in this project's documentation and examples: as guessable as short ones.
const EXAMPLE_SECRETS: &[&str] = &["change-me", "change-me-please"];

/// Why `secret` is a cluster secret an offline guesser finds, if it is: shorter than
/// [`CLUSTER_SECRET_WARN_LEN`] bytes, or an example's. A warning (at start, on reload, in
/// `check-config`), not an error: whoever records one handshake on the cluster port, or one
/// signed admin read, can test guesses of it offline (each at Argon2id's cost), and with the
/// secret join the cluster as any node.
pub fn cluster_secret_warning(secret: &str) -> Option<String> {
    let why = if EXAMPLE_SECRETS.contains(&secret) {
        "is an example's value"
    } else if secret.len() < CLUSTER_SECRET_WARN_LEN {
        "is shorter than 16 bytes"
    } else {
        return None;
    };
    Some(format!(
        "cluster.secret {why}: whoever records one cluster handshake (or one signed admin read between nodes) can guess it offline, and with it join the cluster as any node; use a long random one, e.g. `openssl rand -base64 32`"
    ))
}

/// RSS a queued message holds on a sled node at most (its index entry, its record's place in
/// the queue log, its dedup and expiry entries: ~250-350 bytes, docs/BENCHMARKS.md).
pub const SLED_BYTES_PER_QUEUED_MESSAGE: u64 = 350;

/// A warning when a sled node holding `store.max_queued_messages` would need more than three
/// quarters of `memory` (the machine's, or its container's limit): it would be killed for its
/// memory before the bound refused anything. `None` on PostgreSQL, whose queue is not in the
/// node's memory, and when the memory is not known.
pub fn queued_memory_warning(store: &StoreSection, memory: Option<u64>) -> Option<String> {
    let memory = memory.filter(|_| store.backend == "sled")?;
    let at_bound = store.max_queued_messages.saturating_mul(SLED_BYTES_PER_QUEUED_MESSAGE);
    if at_bound <= memory / 4 * 3 {
        return None;
    }
    let fits = memory / 4 * 3 / SLED_BYTES_PER_QUEUED_MESSAGE;
    Some(format!(
        "store.max_queued_messages = {} holds up to ~{} MiB of RAM at the bound (~{SLED_BYTES_PER_QUEUED_MESSAGE} bytes each), more than three quarters of this machine's {} MiB: the node would run out of memory before the bound refused anything; set it to at most ~{fits}",
        store.max_queued_messages,
        at_bound >> 20,
        memory >> 20
    ))
}

/// The memory this process may use: the machine's (`MemTotal`), or its cgroup's limit
/// (`memory.max`, cgroup v2) when lower. `None` when neither can be read.
pub fn memory_available() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let kib = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
        kib.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()
            .map(|k| k << 10)
    });
    let limit = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
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
fn default_statement_timeout() -> u64 {
    10_000
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
fn yes() -> bool {
    true
}
fn default_live_ack_wait() -> u64 {
    250
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
fn default_replay() -> u64 {
    24 * 3600
}
fn default_unmediated_ttl() -> u64 {
    24 * 3600
}
fn default_sled_cache_mib() -> u64 {
    64
}
fn default_min_free_disk_mib() -> u64 {
    crate::store::sled_store::DEFAULT_MIN_FREE_BYTES >> 20
}
fn default_max_queued_messages() -> u64 {
    crate::store::sled_store::DEFAULT_MAX_QUEUED_MESSAGES
}
fn default_ws_inflight() -> usize {
    32
}
fn default_max_keys() -> usize {
    1000
}
fn default_max_endpoint_drains() -> usize {
    64
}
fn default_client_timeout() -> u64 {
    5_000
}
fn default_ws_write_stall() -> u64 {
    60_000
}
fn default_message_timeout() -> u64 {
    60_000
}
fn default_min_write_rate() -> u64 {
    8 * 1024
}
fn default_unbound_socket_idle() -> u64 {
    300
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

/// Seconds as milliseconds in the store's `i64`, saturating: validation keeps every setting far
/// below, and a config built in code (tests) cannot wrap it negative.
fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

impl StoreSection {
    /// `statement_timeout_ms` as a duration.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.statement_timeout_ms)
    }
}

impl Limits {
    /// `message_ttl_secs` in milliseconds (saturating; 0 = never).
    pub fn message_ttl_ms(&self) -> i64 {
        secs_to_ms(self.message_ttl_secs)
    }

    /// `dedup_window_secs` in milliseconds (saturating; 0 = no dedup).
    pub fn dedup_window_ms(&self) -> i64 {
        secs_to_ms(self.dedup_window_secs)
    }

    /// `replay_window_secs` in milliseconds (saturating; 0 = off).
    pub fn replay_window_ms(&self) -> i64 {
        secs_to_ms(self.replay_window_secs)
    }

    /// `unmediated_connection_ttl_secs` in milliseconds (saturating; 0 = never).
    pub fn unmediated_connection_ttl_ms(&self) -> i64 {
        secs_to_ms(self.unmediated_connection_ttl_secs)
    }
}

impl DeliverySection {
    /// The certificates of `ca_file` (none when unset), DER.
    pub fn extra_roots(&self) -> Result<Vec<Vec<u8>>, String> {
        match &self.ca_file {
            Some(p) => crate::tls::pem_certs(p, "delivery.ca_file"),
            None => Ok(Vec::new()),
        }
    }

    /// `lease_ms` as the store's `i64` (saturating).
    pub fn lease_ms_i64(&self) -> i64 {
        i64::try_from(self.lease_ms).unwrap_or(i64::MAX)
    }
}

impl LogSection {
    /// `level` as a tracing filter. Every directive must parse: `EnvFilter::new` would drop a
    /// bad one with a note on stderr and leave the node logging errors only, its
    /// `mailroom::audit` lines lost.
    pub fn filter(&self) -> Result<tracing_subscriber::EnvFilter, String> {
        if self.level.trim().is_empty() {
            return Err("log.level is empty (e.g. \"info\" or \"mailroom=debug\")".into());
        }
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.level)
            .map_err(|e| format!("log.level {:?} is not a tracing filter: {e}", self.level))
    }
}

/// A TOML error as `line L, column C: what`, without the source line that toml's `Display`
/// quotes: that line may hold a secret (`secret = "hunter2` missing its closing quote), and
/// the error goes to stderr and to the admin `POST /reload` answer.
fn parse_error(path: String, text: &str, e: &toml::de::Error) -> ConfigError {
    let what = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let what = without_value(&what);
    let message = match e.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            match key_at(text, span.start) {
                Some(key) => format!("line {line}, column {column} ({key}): {what}"),
                None => format!("line {line}, column {column}: {what}"),
            }
        }
        None => what,
    };
    ConfigError::Parse { path, message }
}

/// The dotted key of the TOML line holding byte `at` (`limits.max_sessions` for
/// `max_sessions = "lots"` under `[limits]`; `node` for a `[node]` table where `[[node]]` is
/// meant), when that line is a table header or a `key = value` line: toml's message names
/// no key. Keys only, never values (a value may be a secret).
fn key_at(text: &str, at: usize) -> Option<String> {
    let at = at.min(text.len());
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    // Inside a multi-line string, a line that looks like `key = ...` is part of a value.
    if text[..start].matches("\"\"\"").count() % 2 == 1 || text[..start].matches("'''").count() % 2 == 1 {
        return None;
    }
    let bare = |k: &str| {
        let k = k.trim();
        (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c)))
            .then(|| k.replace(['"', '\'', ' '], ""))
    };
    let header = |line: &str| {
        // A comment may follow a table header.
        let line = line.split('#').next().unwrap_or("").trim();
        let inner = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]"));
        let inner = inner.or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
        inner.and_then(bare)
    };
    let line = text[start..].lines().next().unwrap_or("");
    if let Some(table) = header(line) {
        return Some(table);
    }
    let key = bare(line.split_once('=')?.0)?;
    let table = text[..start].lines().rev().find_map(header);
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// serde's `invalid type: integer `12345678`, expected a string` without the value: a secret
/// written without its quotes would otherwise be echoed (the line and column point at it).
fn without_value(what: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = what.strip_prefix(prefix) else {
            continue;
        };
        let kinds = ["string \"", "integer `", "floating point `", "boolean `", "character `"];
        let Some(kind) = kinds.iter().find(|k| rest.starts_with(**k)) else {
            continue;
        };
        if let Some(at) = rest.rfind(", expected ") {
            let kind = &kind[..kind.len() - 2];
            return format!("{prefix}{kind}{}", &rest[at..]);
        }
    }
    what.to_string()
}

/// 1-based line and column (in characters) of byte offset `at` of `text`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let (mut line, mut column) = (1, 1);
    for (i, c) in text.char_indices() {
        if i >= at {
            break;
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    (line, column)
}

/// `var`, or the contents of the file named by `var`_FILE when `from_file` (mounted secrets);
/// not both. A set but empty one is refused with its name; one found is added to `applied`.
fn env_value(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    from_file: bool,
    applied: &mut Vec<&'static str>,
) -> Result<Option<String>, ConfigError> {
    let bad = |m: String| ConfigError::Invalid(m);
    let direct = get(var);
    let file_var = format!("{var}_FILE");
    let file = if from_file { get(&file_var) } else { None };
    let v = match (direct, file) {
        (Some(_), Some(_)) => return Err(bad(format!("set {var} or {file_var}, not both"))),
        (Some(v), None) => v,
        (None, Some(path)) => {
            if path.is_empty() {
                return Err(bad(format!("{file_var} is set but empty")));
            }
            let text = read_small_file(Path::new(&path), SECRET_FILE_MAX_BYTES)
                .map_err(|e| bad(format!("{file_var}: cannot read {path}: {e}")))?;
            text.trim_end_matches(['\n', '\r']).to_string()
        }
        (None, None) => return Ok(None),
    };
    if v.trim().is_empty() {
        return Err(bad(format!("{var} is set but empty")));
    }
    applied.push(var);
    Ok(Some(v))
}

/// Whether `u` holds only what a `cluster.public_url` may: visible ASCII URL characters (no
/// space, control or non-ASCII character, none of `"` `\` `<` `>` `` ` `` `{` `}` `|` `^`).
/// The URL goes out as written, in JSON too, where each of these would be escaped (a `"`
/// doubles in length) or break the invitation. `setting` names where the value came from.
fn public_url_chars(setting: &str, u: &str) -> Result<(), String> {
    let refused = |c: char| !c.is_ascii_graphic() || matches!(c, '"' | '\\' | '<' | '>' | '`' | '{' | '}' | '|' | '^');
    match u.char_indices().find(|&(_, c)| refused(c)) {
        None => Ok(()),
        Some((at, c)) => Err(format!(
            "{setting} holds {c:?} at byte {at}: cluster.public_url may hold only visible ASCII URL \
             characters (no space, control or non-ASCII character, none of \" \\ < > ` {{ }} | ^)"
        )),
    }
}

/// The most a `MAILROOM_*_FILE` secret or a push credential file may hold: a PEM key, a
/// service account's JSON or a token is a few KiB.
pub const SECRET_FILE_MAX_BYTES: u64 = 64 << 10;

/// The most a config file may hold.
pub const CONFIG_FILE_MAX_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most `max` bytes as UTF-8. A start-up reads its config and its
/// secrets from paths an operator (or a mount) gives: a FIFO held the start forever (its open
/// waits for a writer), `/dev/zero` or a log file named by mistake grew the process until it
/// ran out of memory. Refused up front instead, naming what the path is.
pub fn read_small_file(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    // Before the open: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(Error::new(ErrorKind::InvalidInput, what));
    }
    let mut text = String::new();
    std::fs::File::open(path)?.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(Error::new(ErrorKind::InvalidInput, format!("larger than {max} bytes")));
    }
    Ok(text)
}

/// `v`, the value of `var`, is an IP:port address.
fn env_addr(var: &str, v: &str) -> Result<(), ConfigError> {
    v.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|_| ConfigError::Invalid(format!("{var} = {v:?} is not an IP:port address")))
}

/// Open files a node keeps for itself, beyond its WebSocket sessions and what its config
/// names ([`Config::files_reserved`]): listeners, store files, threads, endpoint drains, HTTP
/// keep-alive connections.
pub const OPEN_FILES_SLACK: u64 = 1024;

/// Connections the admin listener serves at once; past it, new ones wait in its backlog. Each
/// holds two open files (its socket and the slow-client watchdog's duplicate of it), which
/// [`Config::files_reserved`] keeps: unbounded, slow clients of the admin port took the files
/// the node keeps for itself, and the listener (`/ready` with it) went dark.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

impl Limits {
    /// Fits `max_sessions` to a process that may hold `open_files` files, `reserved` of them
    /// (or half, under a small limit) kept for everything else: past that, the node would run
    /// out of files before it refused a session (its accept loop pausing on both listeners,
    /// `/health` going dark) instead of answering 503. Returns the value it lowered, if it did.
    pub fn fit_sessions_to(&mut self, open_files: u64, reserved: u64) -> Option<usize> {
        self.fitted_to_open_files = Some(open_files);
        let room = open_files.saturating_sub(reserved.min(open_files / 2)).max(1);
        let room = usize::try_from(room).unwrap_or(usize::MAX);
        (self.max_sessions > room).then(|| std::mem::replace(&mut self.max_sessions, room))
    }
}

impl Config {
    /// Open files a node of this config keeps beside its sessions: its store's pool, the
    /// pushes it may send at once, the 256 reply POSTs, the drains to agents' endpoints
    /// (`limits.max_endpoint_drains`, a socket each), two links a peer, two files for each of
    /// the admin listener's [`ADMIN_MAX_CONNECTIONS`], and [`OPEN_FILES_SLACK`].
    pub fn files_reserved(&self) -> u64 {
        let pool = if self.store.backend == "postgres" {
            self.store.pool_size
        } else {
            0
        };
        let pushes = self.push.as_ref().map_or(0, |p| p.max_in_flight);
        let links = 2 * self.nodes.len();
        let admin = 2 * ADMIN_MAX_CONNECTIONS;
        let drains = self.limits.max_endpoint_drains;
        (pool + pushes + 256 + drains + links + admin) as u64 + OPEN_FILES_SLACK
    }

    /// [`Limits::fit_sessions_to`] with [`Config::files_reserved`].
    pub fn fit_sessions_to(&mut self, open_files: u64) -> Option<usize> {
        let reserved = self.files_reserved();
        self.limits.fit_sessions_to(open_files, reserved)
    }

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
        let c = Self::load_unvalidated(path)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a file without [`Config::validate`] (the caller validates, e.g. after
    /// [`Config::apply_env`]).
    fn load_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        let text = read_small_file(path, CONFIG_FILE_MAX_BYTES).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| parse_error(path.display().to_string(), &text, &e))
    }

    /// What `mailroom run` runs with: the file (or [`Config::single_node_default`]), the
    /// node id (default: the first `[[node]]`), and the environment overrides applied before
    /// validation, so a file may leave to the environment what it must not hold (an admin
    /// token for a non-loopback listener, the cluster secret). Returns the config, the node id
    /// and the names of the variables applied.
    pub fn load_for_node(
        path: Option<&Path>,
        node: Option<&str>,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(Config, String, Vec<&'static str>), ConfigError> {
        let mut c = match path {
            Some(p) => Self::load_unvalidated(p)?,
            None => Config::single_node_default(),
        };
        let node_id = match (node, c.nodes.first()) {
            (Some(n), _) => n.to_string(),
            (None, Some(first)) => first.id.clone(),
            (None, None) => {
                c.validate()?;
                unreachable!("validate refuses a config without nodes")
            }
        };
        c.node(&node_id)?;
        // Checked here, not at `logging::init`: a filter that does not parse left the node
        // logging at `log.level` with no word of it.
        if let Some(v) = get("RUST_LOG") {
            crate::logging::env_filter(&v).map_err(ConfigError::Invalid)?;
        }
        let applied = c.apply_env(&node_id, &get)?;
        // One node per process here: nodes on sled would each open their own store (their own
        // mediator identity, connections and queue), or fail on its lock on one machine. Only
        // nodes inside one process (tests, through the library) can share a sled store.
        if c.store.backend == "sled" && c.nodes.len() > 1 {
            return Err(ConfigError::Invalid(format!(
                "{} [[node]] entries on store.backend = \"sled\": sled is one node's own store; \
                 a cluster of several nodes needs store.backend = \"postgres\" (shared by every node)",
                c.nodes.len()
            )));
        }
        if c.store.backend == "sled" {
            // Found by `run` only as it opened the store (exit 1): a bad directory is the file's.
            let p = &c.store.path;
            if p.as_os_str().is_empty() {
                return Err(ConfigError::Invalid(
                    "store.path is empty: the sled store needs a directory".into(),
                ));
            }
            if p.exists() && !p.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "store.path {} is not a directory (the sled store's)",
                    p.display()
                )));
            }
        }
        c.check_peer_addresses(&node_id)?;
        Ok((c, node_id, applied))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| parse_error("<config>".into(), text, &e))?;
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
            let mut own: Vec<(&str, SocketAddr)> = Vec::new();
            for (field, v) in fields {
                let a: SocketAddr = v.parse().map_err(|_| {
                    ConfigError::Invalid(format!("node {}: {field} = {v:?} is not an IP:port address", n.id))
                })?;
                if a.port() != 0 && !addrs.insert(a) {
                    return bad(format!("node {}: {field} address {a} is used twice", n.id));
                }
                // One machine's listeners: 0.0.0.0:8080 takes 127.0.0.1:8080 too (the node
                // would fail to bind, exit 71, after `check-config` said ok).
                if let Some((other, b)) = own.iter().find(|(_, b)| {
                    a.port() != 0
                        && b.port() == a.port()
                        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
                }) {
                    return bad(format!(
                        "node {}: {field} address {a} and {other} address {b} share port {}",
                        n.id,
                        a.port()
                    ));
                }
                own.push((field, a));
            }
        }
        if let Some(t) = &self.admin.token {
            // What a client can present in `Authorization: Bearer <token>`: HTTP trims the
            // header's ends and reads it as visible ASCII, so a token with spaces at its ends
            // (a token file ending in a space), other characters, or none at all would lock
            // every guarded route into 401.
            if t.is_empty() {
                return bad("[admin] token is empty: remove it, or set one of visible ASCII characters".into());
            }
            if !t.chars().all(|c| c.is_ascii_graphic()) {
                return bad(
                    "[admin] token (or MAILROOM_ADMIN_TOKEN, MAILROOM_ADMIN_TOKEN_FILE) holds a space, a \
                     control or a non-ASCII character: no client could present it as a bearer token"
                        .into(),
                );
            }
        }
        for n in &self.nodes {
            let admin: SocketAddr = n
                .admin
                .parse()
                .map_err(|_| ConfigError::Invalid(format!("node {}: admin address", n.id)))?;
            if !admin.ip().is_loopback() && self.admin.token.as_deref().map(str::is_empty).unwrap_or(true) {
                return bad(format!(
                    "node {}: admin = {} is not on loopback, so [admin] token (or MAILROOM_ADMIN_TOKEN) is required",
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
        }
        if self.cluster.secret.is_some() && self.cluster.secret_env.is_some() {
            return bad("set cluster.secret or cluster.secret_env, not both".into());
        }
        if let Some(u) = &self.cluster.public_url {
            // Used as written (in invitations, in the mediator's DIDs), not as `Url` would
            // normalise it: a space, a control character or a `"` would go out as it is.
            public_url_chars("cluster.public_url", u).map_err(ConfigError::Invalid)?;
            // Invitations append `?oob=` to it and the WebSocket URL swaps its scheme: a query,
            // a fragment, credentials or a scheme in capitals would break both.
            match url::Url::parse(u) {
                Ok(p)
                    if (u.starts_with("http://") || u.starts_with("https://"))
                        && p.query().is_none()
                        && p.fragment().is_none()
                        && p.username().is_empty()
                        && p.password().is_none() => {}
                _ => {
                    // A password in it is not echoed (the error goes to stderr and to the
                    // `POST /reload` answer).
                    return bad(format!(
                        "cluster.public_url {:?} must be an http:// or https:// URL (lowercase scheme) with no query, fragment or credentials",
                        without_password(u)
                    ));
                }
            }
            if u.len() > MAX_PUBLIC_URL_LEN {
                return bad(format!(
                    "cluster.public_url is {} bytes long, at most {MAX_PUBLIC_URL_LEN} (the mediator's DIDs carry it)",
                    u.len()
                ));
            }
        }
        self.validate_cluster()?;
        match self.store.backend.as_str() {
            // The node would run on sled while its operator believes PostgreSQL (the
            // environment's MAILROOM_STORE_URL sets the backend too).
            "sled" if self.store.url.is_some() => {
                return bad("store.url is set but store.backend is \"sled\" (set backend = \"postgres\")".into())
            }
            "sled" => {}
            "postgres" => match &self.store.url {
                // Read as the store reads it (no connection): a bad `sslmode` or unreadable
                // `sslrootcert` stops the node here, not at the store's first connection.
                Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                    crate::store::postgres::check_url(u)
                        .map_err(|e| ConfigError::Invalid(format!("store.url: {e}")))?;
                }
                _ => return bad("store.backend = \"postgres\" needs store.url = \"postgres://...\"".into()),
            },
            other => return bad(format!("store.backend {other:?} is not \"sled\" or \"postgres\"")),
        }
        if self.store.pool_size == 0 || self.store.pool_size > bounds::POOL_SIZE {
            return bad(format!("store.pool_size must be 1..={}", bounds::POOL_SIZE));
        }
        if !(bounds::STATEMENT_TIMEOUT_MS_MIN..=bounds::STATEMENT_TIMEOUT_MS).contains(&self.store.statement_timeout_ms)
        {
            return bad(format!(
                "store.statement_timeout_ms must be {}..={} (how long a call waits for PostgreSQL)",
                bounds::STATEMENT_TIMEOUT_MS_MIN,
                bounds::STATEMENT_TIMEOUT_MS
            ));
        }
        if self.store.min_free_disk_mib > 1 << 20 {
            return bad("store.min_free_disk_mib must be 0..=1048576 (MiB; 0 = no reserve)".into());
        }
        if self.store.max_queued_messages == 0 {
            return bad("store.max_queued_messages must be at least 1 (0 would refuse every message; raise it with the node's RAM, ~350 bytes each)".into());
        }
        if self.store.sled_cache_mib == 0 || self.store.sled_cache_mib > 1 << 20 {
            return bad("store.sled_cache_mib must be 1..=1048576".into());
        }
        if self.limits.max_keys_per_connection == 0 {
            return bad("limits.max_keys_per_connection must be at least 1 (0 would refuse every key: no wallet could be mediated)".into());
        }
        if !(1..=86_400).contains(&self.limits.unbound_socket_idle_secs) {
            return bad(
                "limits.unbound_socket_idle_secs must be 1..=86400 (how long a socket bound to no connection is kept without new mail)".into(),
            );
        }
        if !(512..=1 << 30).contains(&self.limits.min_write_bytes_per_sec) {
            return bad(
                "limits.min_write_bytes_per_sec must be 512..=1073741824 (the slowest a client may take a reply)"
                    .into(),
            );
        }
        if self.limits.message_timeout_ms < 100 || self.limits.message_timeout_ms > 3_600_000 {
            return bad(
                "limits.message_timeout_ms must be 100..=3600000 (how long a POST body or a WebSocket message sent in fragments may take to be whole)"
                    .into(),
            );
        }
        if self.limits.ws_write_stall_ms < 100 || self.limits.ws_write_stall_ms > 3_600_000 {
            return bad(
                "limits.ws_write_stall_ms must be 100..=3600000 (how long a WebSocket may take none of the node's bytes)"
                    .into(),
            );
        }
        if self.limits.client_timeout_ms < 100 || self.limits.client_timeout_ms > 600_000 {
            return bad(
                "limits.client_timeout_ms must be 100..=600000 (the time a client has to send its request headers)"
                    .into(),
            );
        }
        if self.limits.max_ws_inflight == 0 {
            return bad("limits.max_ws_inflight must be at least 1".into());
        }
        if !(1..=bounds::ENDPOINT_DRAINS).contains(&self.limits.max_endpoint_drains) {
            return bad(format!(
                "limits.max_endpoint_drains must be 1..={} (drains to agents' endpoints under way at once; 0 would deliver nothing to them)",
                bounds::ENDPOINT_DRAINS
            ));
        }
        if self.delivery.batch_size == 0 || self.delivery.batch_size > 1000 {
            return bad("delivery.batch_size must be 1..=1000".into());
        }
        if self.delivery.live_ack_wait_ms > 60_000 {
            return bad(
                "delivery.live_ack_wait_ms must be 0..=60000 (how long live messages may wait for an acknowledgement)"
                    .into(),
            );
        }
        if self.delivery.lease_ms < 100 || self.delivery.sweep_interval_ms < 10 {
            return bad("delivery.lease_ms must be >= 100 and delivery.sweep_interval_ms >= 10".into());
        }
        if self.delivery.lease_ms > bounds::LEASE_MS {
            return bad(format!(
                "delivery.lease_ms must be 100..={} (one day: how long a delivered, unacknowledged message stays leased)",
                bounds::LEASE_MS
            ));
        }
        if self.delivery.sweep_interval_ms > bounds::SWEEP_INTERVAL_MS {
            return bad(format!(
                "delivery.sweep_interval_ms must be 10..={} (one hour: the longest a lost notification may delay a delivery)",
                bounds::SWEEP_INTERVAL_MS
            ));
        }
        // PEM that decodes can still hold a certificate TLS will not take: refused here, not by
        // the node's egress once the store is open (exit 1).
        let roots = self.delivery.extra_roots().map_err(ConfigError::Invalid)?;
        crate::tls::client_config(&roots, &[b"http/1.1"], "delivery.ca_file").map_err(ConfigError::Invalid)?;
        if self.delivery.endpoint_timeout_ms == 0 || self.delivery.endpoint_timeout_ms > bounds::ENDPOINT_TIMEOUT_MS {
            return bad(format!(
                "delivery.endpoint_timeout_ms must be 1..={} (ten minutes: the timeout of one POST to an agent's endpoint)",
                bounds::ENDPOINT_TIMEOUT_MS
            ));
        }
        if self.limits.max_envelope_bytes < 1024 || self.limits.max_ws_frame_bytes < 1024 {
            return bad("limits.max_envelope_bytes and limits.max_ws_frame_bytes must be >= 1024".into());
        }
        if self.limits.max_envelope_bytes > bounds::MESSAGE_BYTES
            || self.limits.max_ws_frame_bytes > bounds::MESSAGE_BYTES
        {
            return bad(format!(
                "limits.max_envelope_bytes and limits.max_ws_frame_bytes must be at most {} (1 GiB, the largest message PostgreSQL stores)",
                bounds::MESSAGE_BYTES
            ));
        }
        if self.limits.max_sessions == 0 || self.limits.max_queue_messages == 0 || self.limits.max_queue_bytes == 0 {
            return bad("limits.max_sessions, max_queue_messages and max_queue_bytes must be > 0".into());
        }
        if self.limits.message_ttl_secs > bounds::MESSAGE_TTL_SECS {
            return bad(format!(
                "limits.message_ttl_secs must be 0..={} (ten years; 0 = never expire)",
                bounds::MESSAGE_TTL_SECS
            ));
        }
        if self.limits.dedup_window_secs > bounds::DEDUP_WINDOW_SECS {
            return bad(format!(
                "limits.dedup_window_secs must be 0..={} (one day; 0 = no dedup)",
                bounds::DEDUP_WINDOW_SECS
            ));
        }
        if self.limits.replay_window_secs > bounds::REPLAY_WINDOW_SECS {
            return bad(format!(
                "limits.replay_window_secs must be 0..={} (thirty days; 0 = off)",
                bounds::REPLAY_WINDOW_SECS
            ));
        }
        if self.limits.unmediated_connection_ttl_secs > bounds::UNMEDIATED_CONNECTION_TTL_SECS {
            return bad(format!(
                "limits.unmediated_connection_ttl_secs must be 0..={} (one year; 0 = never)",
                bounds::UNMEDIATED_CONNECTION_TTL_SECS
            ));
        }
        if self.log.format != "human" && self.log.format != "json" {
            return bad(format!("log.format {:?} is not \"human\" or \"json\"", self.log.format));
        }
        self.log.filter().map_err(ConfigError::Invalid)?;
        if let Some(p) = &self.push {
            // Reads and parses every credential: a bad one stops the node before it starts.
            p.load().map_err(ConfigError::Invalid)?;
        }
        Ok(())
    }

    /// The `[cluster]` section, and the cluster settings of every node that starts one (a node
    /// with a `cluster` address): [`ClusterConfig::validate`] refuses nothing this accepts, so
    /// `check-config` and `run` refuse a bad value (exit 64) before the store is opened.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let c = &self.cluster;
        if c.name.is_empty() || c.name.len() > bounds::CLUSTER_NAME_BYTES {
            return bad(format!(
                "cluster.name must be 1-{} bytes (peers must name the same cluster)",
                bounds::CLUSTER_NAME_BYTES
            ));
        }
        if c.heartbeat_ms == 0 || c.heartbeat_ms > bounds::HEARTBEAT_MS {
            return bad(format!(
                "cluster.heartbeat_ms must be 1..={} (one minute)",
                bounds::HEARTBEAT_MS
            ));
        }
        if c.failure_timeout_ms > bounds::FAILURE_TIMEOUT_MS {
            return bad(format!(
                "cluster.failure_timeout_ms must be at most {} (one hour)",
                bounds::FAILURE_TIMEOUT_MS
            ));
        }
        // A peer is found down after this long without a frame: under two heartbeats, one
        // heartbeat a little late (a loaded peer, a GC pause of the network) finds a live peer
        // down, and its take-over releases the leases its sessions are delivering.
        if c.failure_timeout_ms < 2 * c.heartbeat_ms {
            return bad(format!(
                "cluster.failure_timeout_ms ({}) must be at least twice cluster.heartbeat_ms ({}): one late heartbeat would find a live peer down",
                c.failure_timeout_ms, c.heartbeat_ms
            ));
        }
        if c.max_frame_bytes < 1024 || c.max_frame_bytes > crate::cluster::proto::MAX_FRAME_CEILING {
            return bad(format!(
                "cluster.max_frame_bytes must be 1024..={}",
                crate::cluster::proto::MAX_FRAME_CEILING
            ));
        }
        if c.peer_queue == 0 || c.peer_queue > ClusterConfig::MAX_PEER_QUEUE {
            return bad(format!(
                "cluster.peer_queue must be 1..={}",
                ClusterConfig::MAX_PEER_QUEUE
            ));
        }
        let starting: Vec<&NodeEntry> = self.nodes.iter().filter(|n| n.cluster.is_some()).collect();
        let Some(first) = starting.first() else {
            return Ok(()); // no cluster listener anywhere: the secret is never used
        };
        match self.cluster_secret()? {
            s if s.is_empty() => {
                return bad(format!(
                    "node {} has a cluster address, so cluster.secret (or cluster.secret_env, or MAILROOM_CLUSTER_SECRET) is required",
                    first.id
                ))
            }
            s if s.len() < 8 => return bad("cluster.secret must be at least 8 characters".into()),
            _ => {}
        }
        for n in starting {
            self.cluster_config(&n.id)?
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("node {}: {e}", n.id)))?;
        }
        Ok(())
    }

    /// Every other node's `cluster` address is one this node can dial. `0.0.0.0:7000` is
    /// where a node listens on every interface, not an address to reach it at: dialed, it is
    /// this machine (the node links to nothing, or to itself); port 0 is no port. Each node
    /// of such a file started, with its dials failing at debug level and `/ready` at 200: a
    /// cluster split with no word of it. A node's own address may be a wildcard (it only
    /// binds it), as `MAILROOM_CLUSTER_LISTEN` sets it in a container.
    fn check_peer_addresses(&self, node_id: &str) -> Result<(), ConfigError> {
        for n in self.nodes.iter().filter(|n| n.id != node_id) {
            let Some(c) = &n.cluster else { continue };
            let Ok(a) = c.parse::<SocketAddr>() else {
                continue; // named by `validate` with its own reason
            };
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "node {}: cluster = {c:?} is not an address node {node_id} can dial: every other \
                     node dials the address written here, so write the one {} is reached at \
                     (an IP and a port; a wildcard listener goes in MAILROOM_CLUSTER_LISTEN on \
                     that node)",
                    n.id, n.id
                )));
            }
        }
        Ok(())
    }

    /// The cluster settings of node `node_id`: every other `[[node]]` with a `cluster` address
    /// is a peer.
    pub fn cluster_config(&self, node_id: &str) -> Result<ClusterConfig, ConfigError> {
        let mut peers = Vec::new();
        for n in self.nodes.iter().filter(|n| n.id != node_id) {
            if let Some(c) = &n.cluster {
                peers.push(PeerConfig {
                    id: n.id.clone(),
                    addr: c.parse().map_err(|_| {
                        ConfigError::Invalid(format!("node {}: cluster = {c:?} is not an IP:port address", n.id))
                    })?,
                });
            }
        }
        Ok(ClusterConfig {
            node_id: node_id.to_string(),
            cluster_name: self.cluster.name.clone(),
            secret: self.cluster_secret()?,
            peers,
            heartbeat_interval: Duration::from_millis(self.cluster.heartbeat_ms),
            failure_timeout: Duration::from_millis(self.cluster.failure_timeout_ms),
            max_frame: self.cluster.max_frame_bytes,
            peer_queue: self.cluster.peer_queue,
            max_peer_claims: ClusterConfig::DEFAULT_MAX_PEER_CLAIMS,
        })
    }

    /// Applies the `MAILROOM_*` environment overrides ([`ENV_OVERRIDES`]) to the whole config
    /// and to node `node_id`'s entry, then validates the result like a file: how a container
    /// listens on all interfaces and gets its secrets without editing the defaults for
    /// everyone. `get` reads a variable (`std::env::var` in the binary). Returns the names of
    /// the variables applied. A set but empty or malformed variable is refused with its name.
    pub fn apply_env(
        &mut self,
        node_id: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<&'static str>, ConfigError> {
        let bad = |m: String| ConfigError::Invalid(m);
        let mut applied = Vec::new();
        let mut value = |var: &'static str, from_file: bool| env_value(&get, var, from_file, &mut applied);
        let listen = value("MAILROOM_LISTEN", false)?;
        let admin = value("MAILROOM_ADMIN", false)?;
        let cluster = value("MAILROOM_CLUSTER_LISTEN", false)?;
        let public_url = value("MAILROOM_PUBLIC_URL", false)?;
        let store_url = value("MAILROOM_STORE_URL", true)?;
        let data_dir = value("MAILROOM_DATA_DIR", false)?;
        let token = value("MAILROOM_ADMIN_TOKEN", true)?;
        let secret = value("MAILROOM_CLUSTER_SECRET", true)?;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id == node_id)
            .ok_or_else(|| ConfigError::UnknownNode(node_id.into()))?;
        if let Some(v) = listen {
            env_addr("MAILROOM_LISTEN", &v)?;
            node.listen = v;
        }
        if let Some(v) = admin {
            env_addr("MAILROOM_ADMIN", &v)?;
            node.admin = v;
        }
        if let Some(v) = cluster {
            env_addr("MAILROOM_CLUSTER_LISTEN", &v)?;
            node.cluster = Some(v);
        }
        if let Some(v) = public_url {
            public_url_chars("MAILROOM_PUBLIC_URL (cluster.public_url)", &v).map_err(bad)?;
            match url::Url::parse(&v) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => self.cluster.public_url = Some(v),
                _ => {
                    return Err(bad(format!(
                        "MAILROOM_PUBLIC_URL = {v:?} is not an http:// or https:// URL"
                    )))
                }
            }
        }
        if let Some(v) = store_url {
            if !(v.starts_with("postgres://") || v.starts_with("postgresql://")) {
                // The URL may hold a password: name the variable, not its value.
                return Err(bad(
                    "MAILROOM_STORE_URL must be a postgres:// or postgresql:// URL".into()
                ));
            }
            self.store.backend = "postgres".into();
            self.store.url = Some(v);
        }
        if let Some(v) = data_dir {
            self.store.path = PathBuf::from(v);
        }
        if let Some(v) = token {
            self.admin.token = Some(v);
        }
        if let Some(v) = secret {
            self.cluster.secret = Some(v);
            self.cluster.secret_env = None;
        }
        self.validate()?;
        Ok(applied)
    }

    /// The admin URL and token of node `node_id` in the file at `path`, with `MAILROOM_ADMIN`
    /// and `MAILROOM_ADMIN_TOKEN` (or `_FILE`) applied: all that `drain` and `undrain` need. The
    /// rest of the file is parsed, not validated: the machine an operator drains from need not
    /// hold the node's other secrets (the cluster's, the push credentials).
    pub fn admin_of(
        path: &Path,
        node_id: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<(String, Option<String>), ConfigError> {
        let c = Self::load_unvalidated(path)?;
        let node = c.node(node_id)?;
        let mut applied = Vec::new();
        let admin = match env_value(&get, "MAILROOM_ADMIN", false, &mut applied)? {
            Some(v) => {
                env_addr("MAILROOM_ADMIN", &v)?;
                v
            }
            None => node.admin.clone(),
        };
        let token = env_value(&get, "MAILROOM_ADMIN_TOKEN", true, &mut applied)?.or(c.admin.token);
        Ok((format!("http://{admin}"), token))
    }

    pub fn node(&self, id: &str) -> Result<&NodeEntry, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ConfigError::UnknownNode(id.into()))
    }

    /// What `check-config` prints as warnings about a file that is valid: a cluster secret
    /// guessable offline ([`cluster_secret_warning`]), where a node has a cluster address; a
    /// bound on queued messages this machine's memory cannot hold ([`queued_memory_warning`]).
    pub fn warnings(&self) -> Vec<String> {
        let clustered = self.nodes.iter().any(|n| n.cluster.is_some());
        let mut out: Vec<String> = match self.cluster_secret() {
            Ok(secret) if clustered => cluster_secret_warning(&secret).into_iter().collect(),
            _ => Vec::new(),
        };
        out.extend(queued_memory_warning(&self.store, memory_available()));
        out
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

    /// Why the URL a node listening on `bound` advertises in place of an unset
    /// `cluster.public_url` ([`Config::public_url`]) will not serve wallets, if it will not.
    /// Logged as a warning at start, not refused: a node on every interface behind a proxy
    /// that rewrites nothing is a setup people test with.
    pub fn advertised_url_problem(&self, bound: SocketAddr) -> Option<&'static str> {
        if self.cluster.public_url.is_some() {
            None
        } else if bound.ip().is_unspecified() {
            Some("invitations and the mediator's DIDs advertise the listener's address on every interface, which no wallet can reach")
        } else if self.nodes.len() > 1 {
            Some("each node of the cluster advertises its own listener in invitations and the mediator's DIDs, not the load balancer")
        } else {
            None
        }
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.delivery.lease_ms)
    }
}

/// The environment variables [`Config::apply_env`] reads, with what each sets (the README
/// lists them). Those marked `_FILE` may instead name a file holding the value.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    (
        "MAILROOM_LISTEN",
        "this node's public listener (node.listen), e.g. 0.0.0.0:8080",
    ),
    (
        "MAILROOM_ADMIN",
        "this node's admin listener (node.admin); off loopback it needs a token",
    ),
    ("MAILROOM_CLUSTER_LISTEN", "this node's cluster listener (node.cluster)"),
    (
        "MAILROOM_PUBLIC_URL",
        "cluster.public_url, the URL wallets and senders use",
    ),
    (
        "MAILROOM_STORE_URL[_FILE]",
        "store.url, and store.backend = \"postgres\"",
    ),
    ("MAILROOM_DATA_DIR", "store.path, the sled directory"),
    ("MAILROOM_ADMIN_TOKEN[_FILE]", "admin.token, the admin bearer token"),
    (
        "MAILROOM_CLUSTER_SECRET[_FILE]",
        "cluster.secret (replaces cluster.secret_env)",
    ),
];

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
    fn a_value_of_the_wrong_type_is_named_by_its_key() {
        let err = |text: &str| Config::parse(text).unwrap_err().to_string();
        let e = err("[limits]\nmax_sessions = \"lots\"\n");
        assert!(e.contains("(limits.max_sessions)"), "{e}");
        // `[node]` where `[[node]]` is meant.
        let e = err("[node]\nid = 'n1'\nlisten = '127.0.0.1:1'\nadmin = '127.0.0.1:2'\n");
        assert!(e.contains("(node)"), "{e}");
        let e = err("[[node]]\nid = 'n1'\nlisten = 1\nadmin = '127.0.0.1:2'\n");
        assert!(e.contains("(node.listen)"), "{e}");
        // Never a value: a secret written unquoted is not echoed.
        let e = err("[cluster]\nsecret = 12345678\n");
        assert!(e.contains("(cluster.secret)") && !e.contains("12345678"), "{e}");
        // A header with a comment after it.
        let e = err("[store]\nbackend = 'sled'\n[limits] # ours\nmax_sessions = 'lots'\n");
        assert!(e.contains("(limits.max_sessions)"), "{e}");
        // A line inside an unfinished multi-line string names nothing (it is a value's).
        let e = err("[cluster]\nsecret = \"\"\"\nab12 = cd");
        assert!(!e.contains("ab12"), "{e}");
    }

    #[test]
    fn sessions_are_fitted_to_the_open_files_a_process_may_hold() {
        let fit = |max_sessions: usize, open_files: u64| {
            let mut c = Config::single_node_default();
            c.limits.max_sessions = max_sessions;
            (c.fit_sessions_to(open_files), c.limits.max_sessions)
        };
        // This machine's cap: the default of 100,000 is lowered, with 256 reply POSTs, 64
        // endpoint drains, 2 links, 512 for the admin listener's connections and 1,024 files
        // more kept.
        assert_eq!(fit(100_000, 20_000), (Some(100_000), 18_142));
        // A small limit (systemd's soft 1,024): half kept.
        assert_eq!(fit(100_000, 1_024), (Some(100_000), 512));
        assert_eq!(fit(100_000, 256), (Some(100_000), 128));
        // Under the room: as configured.
        assert_eq!(fit(5_000, 20_000), (None, 5_000));
        assert_eq!(fit(100_000, 1 << 20), (None, 100_000));
        assert_eq!(fit(10, 0), (Some(10), 1));
        // What the config may open itself is kept too: a PostgreSQL pool, the pushes at once.
        let mut c = Config::single_node_default();
        c.store.backend = "postgres".into();
        c.store.pool_size = 200;
        c.push = Some(
            toml::from_str(
                "max_in_flight = 5000\n[webhook]\nurl = 'https://h.example/x'\nsecret = 'hunter2hunter2hunter2'\n",
            )
            .unwrap(),
        );
        c.fit_sessions_to(20_000);
        assert_eq!(
            c.limits.max_sessions,
            20_000 - (200 + 5_000 + 256 + 64 + 2 + 512 + 1_024)
        );
    }

    #[test]
    fn debug_output_shows_no_admin_token_store_password_or_cluster_secret() {
        let mut c = Config::single_node_default();
        c.admin.token = Some("hunter2-admin".into());
        c.store.url = Some("postgres://mailroom:hunter2-pg@db:5432/m?sslmode=require&password=hunter2-q".into());
        c.cluster.secret = Some("hunter2-cluster".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("postgres://mailroom:redacted@db:5432/m"), "{shown}");
        assert_eq!(without_password("not a url"), "<unparsed URL withheld>");
    }

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
        assert_eq!(c.store.statement_timeout_ms, 10_000);
        assert_eq!(c.store.max_queued_messages, 10_000_000);
        assert_eq!(
            c.store.statement_timeout(),
            crate::store::postgres::DEFAULT_STATEMENT_TIMEOUT
        );
        assert_eq!(c.nodes[0].listen, "127.0.0.1:8080");
        assert_eq!(c.nodes[0].admin, "127.0.0.1:8081");
        assert_eq!(c.limits.max_envelope_bytes, 4 << 20);
        assert_eq!(c.delivery.sweep_interval_ms, 2000);
        assert_eq!(c.limits.max_keys_per_connection, 1000);
        assert_eq!(c.limits.max_endpoint_drains, 64);
        assert_eq!(c.limits.client_timeout_ms, 5000);
        assert_eq!(c.limits.ws_write_stall_ms, 60_000);
        assert_eq!(c.limits.message_timeout_ms, 60_000);
        assert_eq!(c.limits.min_write_bytes_per_sec, 8192);
        assert_eq!(c.limits.unbound_socket_idle_secs, 300);
        assert_eq!(c.delivery.live_ack_wait_ms, 250);
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let cases = [
            ("[cluster]\nname='x'\nbogus=1\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "bogus"),
            ("[[node]]\nid='n1'\nlisten='nope'\nadmin='127.0.0.1:2'", "not an IP:port"),
            ("[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:1'", "used twice"),
            ("[[node]]\nid='n1'\nlisten='0.0.0.0:8080'\nadmin='127.0.0.1:8080'", "share port 8080"),
            ("[cluster]\npublic_url='https://m.example/?a=b'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "no query, fragment or credentials"),
            ("[cluster]\npublic_url='https://m.example/#f'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "no query, fragment or credentials"),
            ("[cluster]\npublic_url='HTTPS://m.example'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "lowercase scheme"),
            ("[cluster]\npublic_url='https://u:p@m.example'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "no query, fragment or credentials"),
            ("[cluster]\npublic_url='https://u:hunter2@m.example'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "https://u:redacted@m.example"),
            ("", "at least one [[node]]"),
            ("[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='0.0.0.0:2'", "token (or MAILROOM_ADMIN_TOKEN) is required"),
            ("[store]\nbackend='postgres'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "store.url"),
            // libpq's sslmode values only, a readable sslrootcert; never the URL (a password).
            ("[store]\nbackend='postgres'\nurl='postgres://u:hunter2@db/m?sslmode=bogus'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "store.url: sslmode \"bogus\" is not one of disable, prefer, require, verify-ca, verify-full"),
            ("[store]\nbackend='postgres'\nurl='postgres://db/m?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "store.url: sslrootcert: cannot read /nonexistent/ca.pem"),
            ("[store]\nbackend='postgres'\nurl='postgres://db/m?sslcert=/c.pem'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "store.url: invalid connection string: unknown option"),
            ("[delivery]\nstrategy='Sometimes'\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "Sometimes"),
            ("[limits]\nmax_keys_per_connection=0\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.max_keys_per_connection must be at least 1"),
            ("[limits]\nmax_endpoint_drains=0\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.max_endpoint_drains must be 1..=1024"),
            ("[limits]\nmax_endpoint_drains=1025\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.max_endpoint_drains must be 1..=1024"),
            ("[limits]\nclient_timeout_ms=0\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.client_timeout_ms must be 100..=600000"),
            ("[limits]\nws_write_stall_ms=99\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.ws_write_stall_ms must be 100..=3600000"),
            ("[limits]\nmessage_timeout_ms=99\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.message_timeout_ms must be 100..=3600000"),
            ("[limits]\nunbound_socket_idle_secs=0\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.unbound_socket_idle_secs must be 1..=86400"),
            ("[limits]\nmin_write_bytes_per_sec=511\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "limits.min_write_bytes_per_sec must be 512..=1073741824"),
            ("[delivery]\nlive_ack_wait_ms=60001\n[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'", "delivery.live_ack_wait_ms must be 0..=60000"),
            (
                "[[node]]\nid='n1'\nlisten='127.0.0.1:1'\ncluster='127.0.0.1:3'\nadmin='127.0.0.1:2'\n[[node]]\nid='n2'\nlisten='127.0.0.1:4'\ncluster='127.0.0.1:5'\nadmin='127.0.0.1:6'",
                "secret",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
            assert!(!err.contains("hunter2"), "{err:?} shows the password");
        }
        // A public URL the mediator's DIDs could not carry under the peer-DID cap.
        let node = "[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'";
        let url = |n: usize| format!("https://{}", "m".repeat(n - 8));
        let text = format!("[cluster]\npublic_url='{}'\n{node}", url(MAX_PUBLIC_URL_LEN));
        Config::parse(&text).unwrap();
        let text = format!("[cluster]\npublic_url='{}'\n{node}", url(MAX_PUBLIC_URL_LEN + 1));
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("at most 1024"), "{err}");
    }

    /// Every `sslmode` libpq has but `allow`, with or without a root certificate.
    #[test]
    fn store_urls_with_a_tls_mode_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        for q in [
            "".to_owned(),
            "?sslmode=disable".into(),
            "?sslmode=prefer".into(),
            "?sslmode=require".into(),
            "?sslmode=verify-ca".into(),
            format!("?sslmode=verify-full&sslrootcert={}", ca.display()),
            format!("?sslmode=require&sslrootcert={}&application_name=m", ca.display()),
        ] {
            let text = format!("[store]\nbackend='postgres'\nurl='postgres://u:pw@db:5432/m{q}'\n{NODE}");
            Config::parse(&text).unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        let err = Config::parse(&format!(
            "[store]\nbackend='postgres'\nurl='postgres://db/m?sslmode=allow'\n{NODE}"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("sslmode \"allow\""), "{err}");
    }

    const NODE: &str = "[[node]]\nid='n1'\nlisten='127.0.0.1:1'\nadmin='127.0.0.1:2'\n";
    const CLUSTER_NODE: &str = "[[node]]\nid='n1'\nlisten='127.0.0.1:1'\ncluster='127.0.0.1:3'\nadmin='127.0.0.1:2'\n";

    /// Values the node's arithmetic would overflow on (a TTL that wraps negative expires every
    /// queued message at start; a dedup window that does turns dedup off; `now + lease` wraps)
    /// or that panic where they are used, each refused with the setting's name and range.
    /// A sled bound the machine's memory cannot hold is warned about, saying what would fit;
    /// one it can, a PostgreSQL store, or an unknown memory are not.
    #[test]
    fn a_bound_on_queued_messages_past_the_memory_is_warned_about() {
        let mut c = Config::single_node_default();
        let gib = 1u64 << 30;
        assert_eq!(c.store.max_queued_messages, 10_000_000);
        assert!(queued_memory_warning(&c.store, Some(24 * gib)).is_none());
        let w = queued_memory_warning(&c.store, Some(2 * gib)).expect("3.3 GiB at the bound on 2 GiB");
        assert!(
            w.contains("store.max_queued_messages = 10000000") && w.contains("at most ~4601"),
            "{w}"
        );
        assert!(queued_memory_warning(&c.store, None).is_none());
        c.store.max_queued_messages = 4_000_000;
        assert!(queued_memory_warning(&c.store, Some(2 * gib)).is_none());
        c.store.max_queued_messages = 10_000_000;
        c.store.backend = "postgres".into();
        assert!(queued_memory_warning(&c.store, Some(2 * gib)).is_none());
        assert!(memory_available().is_some_and(|m| m > 64 << 20), "read on Linux");
    }

    #[test]
    fn out_of_range_numbers_are_refused_with_the_setting_and_its_bounds() {
        let cases = [
            ("[limits]\nmessage_ttl_secs = 10000000000000000\n", "limits.message_ttl_secs must be 0..=315360000"),
            ("[limits]\nmessage_ttl_secs = 315360001\n", "limits.message_ttl_secs must be 0..=315360000"),
            ("[limits]\ndedup_window_secs = 10000000000000000\n", "limits.dedup_window_secs must be 0..=86400"),
            ("[limits]\ndedup_window_secs = 86401\n", "limits.dedup_window_secs must be 0..=86400"),
            ("[limits]\nreplay_window_secs = 2592001\n", "limits.replay_window_secs must be 0..=2592000"),
            (
                "[limits]\nunmediated_connection_ttl_secs = 31536001\n",
                "limits.unmediated_connection_ttl_secs must be 0..=31536000",
            ),
            ("[delivery]\nlease_ms = 9223372036854775807\n", "delivery.lease_ms must be 100..=86400000"),
            ("[delivery]\nlease_ms = 86400001\n", "delivery.lease_ms must be 100..=86400000"),
            ("[delivery]\nsweep_interval_ms = 3600001\n", "delivery.sweep_interval_ms must be 10..=3600000"),
            ("[delivery]\nendpoint_timeout_ms = 0\n", "delivery.endpoint_timeout_ms must be 1..=600000"),
            ("[delivery]\nca_file = \"/nonexistent/ca.pem\"\n", "delivery.ca_file: cannot read /nonexistent/ca.pem"),
            ("[delivery]\nca_file = \"/dev/null\"\n", "delivery.ca_file /dev/null: no certificate in it"),
            ("[delivery]\nendpoint_timeout_ms = 9223372036854775807\n", "delivery.endpoint_timeout_ms must be 1..=600000"),
            ("[limits]\nmax_envelope_bytes = 1073741825\n", "limits.max_envelope_bytes and limits.max_ws_frame_bytes must be at most 1073741824"),
            ("[limits]\nmax_ws_frame_bytes = 9223372036854775807\n", "must be at most 1073741824"),
            ("[store]\npool_size = 9223372036854775807\n", "store.pool_size must be 1..=1000"),
            ("[store]\nstatement_timeout_ms = 0\n", "store.statement_timeout_ms must be 1000..=600000"),
            ("[store]\nmax_queued_messages = 0\n", "store.max_queued_messages must be at least 1"),
            ("[store]\nstatement_timeout_ms = 999\n", "store.statement_timeout_ms must be 1000..=600000"),
            ("[store]\nstatement_timeout_ms = 600001\n", "store.statement_timeout_ms must be 1000..=600000"),
            ("[store]\nstatement_timeout_ms = 9223372036854775807\n", "store.statement_timeout_ms must be 1000..=600000"),
            ("[store]\nbackend='postgres'\nurl='postgres://db/m?keepalives_idle=soon'\n", "store.url: keepalives_idle must be a whole number of seconds"),
            ("[store]\nbackend='postgres'\nurl='postgres://u:hunter2@db/m?tcp_user_timeout=-5'\n", "store.url: tcp_user_timeout must be a whole number of milliseconds"),
            ("[cluster]\nheartbeat_ms = 60001\nfailure_timeout_ms = 120000\n", "cluster.heartbeat_ms must be 1..=60000"),
            ("[cluster]\nfailure_timeout_ms = 9223372036854775807\n", "cluster.failure_timeout_ms must be at most 3600000"),
            ("[cluster]\nheartbeat_ms = 2000\n", "cluster.failure_timeout_ms (3000) must be at least twice cluster.heartbeat_ms (2000)"),
            ("[cluster]\nheartbeat_ms = 0\n", "cluster.heartbeat_ms must be 1..=60000"),
            ("[cluster]\nmax_frame_bytes = 10\n", "cluster.max_frame_bytes must be 1024..=8388608"),
            ("[cluster]\nmax_frame_bytes = 8388609\n", "cluster.max_frame_bytes must be 1024..=8388608"),
            ("[cluster]\npeer_queue = 0\n", "cluster.peer_queue must be 1..=1048576"),
            ("[cluster]\npeer_queue = 9223372036854775807\n", "cluster.peer_queue must be 1..=1048576"),
            ("[cluster]\nname = ''\n", "cluster.name must be 1-255 bytes"),
            (
                "[push]\nmax_in_flight = 9223372036854775807\n[push.webhook]\nurl = 'https://h.example/x'\nsecret = 'hunter2hunter2hunter2'\n",
                "push.max_in_flight must be 1..=10000",
            ),
            (
                "[push]\ntimeout_ms = 600001\n[push.webhook]\nurl = 'https://h.example/x'\nsecret = 'hunter2hunter2hunter2'\n",
                "push.timeout_ms must be 100..=600000",
            ),
            (
                "[push]\nretry_max_ms = 3600001\n[push.webhook]\nurl = 'https://h.example/x'\nsecret = 'hunter2hunter2hunter2'\n",
                "push.retry_max_ms must be at most 3600000",
            ),
        ];
        for (section, want) in cases {
            let text = format!("{section}{NODE}");
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{text}: {err:?} should mention {want:?}");
        }
        // The bounds themselves are accepted.
        let at_bounds = "[limits]\nmessage_ttl_secs = 315360000\ndedup_window_secs = 86400\nreplay_window_secs = 2592000\n\
             max_envelope_bytes = 1073741824\n\
             [delivery]\nlease_ms = 86400000\nsweep_interval_ms = 3600000\nendpoint_timeout_ms = 600000\n\
             [store]\npool_size = 1000\nstatement_timeout_ms = 600000\nmax_queued_messages = 1\n\
             [cluster]\nsecret = 'at-least-8'\nheartbeat_ms = 60000\nfailure_timeout_ms = 3600000\nmax_frame_bytes = 8388608\npeer_queue = 1048576\n";
        let c = Config::parse(&format!("{at_bounds}{CLUSTER_NODE}")).unwrap();
        c.cluster_config("n1").unwrap().validate().unwrap();
        assert_eq!(c.limits.message_ttl_ms(), 315_360_000_000);
        assert_eq!(c.limits.dedup_window_ms(), 86_400_000);
        assert_eq!(c.limits.replay_window_ms(), 2_592_000_000);
        assert_eq!(c.delivery.lease_ms_i64(), 86_400_000);
        assert_eq!(c.store.statement_timeout(), Duration::from_secs(600));
        let low = Config::parse(&format!("[store]\nstatement_timeout_ms = 1000\n{NODE}")).unwrap();
        assert_eq!(low.store.statement_timeout(), Duration::from_secs(1));
    }

    /// A config built in code skips validation: the conversions saturate instead of wrapping.
    #[test]
    fn millisecond_conversions_saturate() {
        let mut c = Config::single_node_default();
        c.limits.message_ttl_secs = 10_000_000_000_000_000;
        c.limits.dedup_window_secs = u64::MAX;
        c.delivery.lease_ms = u64::MAX;
        assert_eq!(c.limits.message_ttl_ms(), i64::MAX);
        assert_eq!(c.limits.dedup_window_ms(), i64::MAX);
        assert_eq!(c.delivery.lease_ms_i64(), i64::MAX);
    }

    /// What `ClusterHandle::start` would refuse (after the store is opened, exit 1) is refused
    /// by validation: `check-config` and `run` exit 64 with the reason.
    #[test]
    fn cluster_settings_are_checked_before_the_node_starts() {
        let cases = [
            (
                CLUSTER_NODE.to_string(),
                "node n1 has a cluster address, so cluster.secret",
            ),
            (
                format!("[cluster]\nsecret = 'short'\n{CLUSTER_NODE}"),
                "cluster.secret must be at least 8 characters",
            ),
            (
                format!("[cluster]\nsecret_env = 'MAILROOM_TEST_SURELY_UNSET_SECRET'\n{CLUSTER_NODE}"),
                "cluster.secret_env names \"MAILROOM_TEST_SURELY_UNSET_SECRET\", which is not set",
            ),
            (
                format!("[cluster]\nsecret = 'long-enough'\nmax_frame_bytes = 10\n{CLUSTER_NODE}"),
                "cluster.max_frame_bytes",
            ),
        ];
        for (text, want) in &cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}: {err:?} should mention {want:?}");
        }
        // A lone node without a cluster address needs no secret; with one and a secret it runs.
        Config::parse(NODE).unwrap();
        let c = Config::parse(&format!("[cluster]\nsecret = 'long-enough'\n{CLUSTER_NODE}")).unwrap();
        let cc = c.cluster_config("n1").unwrap();
        assert!(cc.peers.is_empty());
        cc.validate().unwrap();
        // Every node of the example file gets settings the cluster accepts.
        let c = Config::parse(include_str!("../cluster.toml")).unwrap();
        for n in &c.nodes {
            let cc = c.cluster_config(&n.id).unwrap();
            assert_eq!(cc.peers.len(), 2);
            cc.validate().unwrap();
        }
    }

    /// `EnvFilter::new` would drop a bad directive with a note on stderr and run at ERROR only
    /// (the audit lines lost).
    #[test]
    fn a_log_level_that_does_not_parse_is_refused() {
        for (level, want) in [
            ("mailroom=loud", "log.level \"mailroom=loud\" is not a tracing filter"),
            (
                "info,mailroom=verbose",
                "log.level \"info,mailroom=verbose\" is not a tracing filter",
            ),
            ("", "log.level is empty"),
        ] {
            let text = format!("[log]\nlevel = {level:?}\n{NODE}");
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        for level in [
            "info",
            "mailroom=debug",
            "warn,mailroom::audit=info",
            "mailroom[span]=trace",
        ] {
            Config::parse(&format!("[log]\nlevel = {level:?}\n{NODE}")).unwrap_or_else(|e| panic!("{level}: {e}"));
        }
    }

    /// toml's own `Display` quotes the offending source line; a secret missing its closing
    /// quote would go to stderr and into the admin `POST /reload` answer.
    #[test]
    fn toml_errors_name_the_place_not_the_line() {
        let cases = [
            ("[cluster]\nsecret = \"hunter2hunter2", "line 2, column"),
            (
                "[cluster]\nname = 'x'\nsecret = 'hunter2hunter2\n[[node]]\n",
                "line 3, column",
            ),
            ("[admin]\ntoken = hunter2hunter2\n", "line 2, column"),
            // A secret written without quotes, in a field that wants a string: serde would
            // quote the value.
            (
                "[cluster]\nsecret = 77777777\n",
                "invalid type: integer, expected a string",
            ),
            (
                "[admin]\ntoken = 7.77777\n",
                "invalid type: floating point, expected a string",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} should mention {want:?}");
            for secret in ["hunter2", "7777"] {
                assert!(!err.contains(secret), "{text:?}: {err:?} echoes the value");
            }
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
        // Names stay: an unknown field, an unknown variant.
        let err = Config::parse("[cluster]\nbogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("line 2, column 1") && err.contains("bogus"), "{err}");
        // The same through a file (load, load_for_node).
        let dir = std::env::temp_dir().join(format!("mailroom-tomlerr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(&path, "[cluster]\nsecret = \"hunter2hunter2\n").unwrap();
        let err = Config::load_for_node(Some(&path), None, |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\né=", 5), (2, 2));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn env_overrides_set_addresses_store_and_secrets_of_the_running_node_only() {
        let mut c = Config::parse(include_str!("../cluster.toml")).unwrap();
        let applied = c
            .apply_env(
                "n2",
                env(&[
                    ("MAILROOM_LISTEN", "0.0.0.0:8080"),
                    ("MAILROOM_ADMIN", "0.0.0.0:8081"),
                    ("MAILROOM_CLUSTER_LISTEN", "0.0.0.0:7000"),
                    ("MAILROOM_PUBLIC_URL", "https://mediator.example.org"),
                    ("MAILROOM_STORE_URL", "postgres://mailroom:pw@db:5432/mailroom"),
                    ("MAILROOM_ADMIN_TOKEN", "admin-token"),
                    ("MAILROOM_CLUSTER_SECRET", "from-the-environment"),
                    ("UNRELATED", "x"),
                ]),
            )
            .unwrap();
        assert_eq!(applied.len(), 7, "{applied:?}");
        let n2 = c.node("n2").unwrap();
        assert_eq!(
            (n2.listen.as_str(), n2.admin.as_str()),
            ("0.0.0.0:8080", "0.0.0.0:8081")
        );
        assert_eq!(n2.cluster.as_deref(), Some("0.0.0.0:7000"));
        // The other nodes' entries (their peer addresses) are the file's.
        assert_eq!(c.node("n1").unwrap().listen, "127.0.0.1:8001");
        assert_eq!(c.node("n3").unwrap().cluster.as_deref(), Some("127.0.0.1:7003"));
        assert_eq!(c.cluster.public_url.as_deref(), Some("https://mediator.example.org"));
        assert_eq!(c.store.url.as_deref(), Some("postgres://mailroom:pw@db:5432/mailroom"));
        assert_eq!(c.admin.token.as_deref(), Some("admin-token"));
        assert_eq!(c.cluster_secret().unwrap(), "from-the-environment");
    }

    #[test]
    fn env_overrides_on_the_default_node_and_none_set_changes_nothing() {
        let mut c = Config::single_node_default();
        assert!(c.apply_env("n1", env(&[])).unwrap().is_empty());
        assert_eq!(c.nodes[0].listen, "127.0.0.1:8080");
        assert_eq!(c.store.backend, "sled");
        c.apply_env(
            "n1",
            env(&[
                ("MAILROOM_STORE_URL", "postgresql://db/m"),
                ("MAILROOM_DATA_DIR", "/var/lib/mailroom"),
            ]),
        )
        .unwrap();
        assert_eq!(c.store.backend, "postgres");
        assert_eq!(c.store.path, PathBuf::from("/var/lib/mailroom"));
    }

    /// A token no client can present as `Authorization: Bearer <token>` is refused, on
    /// loopback too (the guard would lock every route into 401).
    #[test]
    fn an_admin_token_must_be_one_a_client_can_present() {
        let base = "[[node]]\nid = 'n1'\nlisten = '127.0.0.1:0'\nadmin = '127.0.0.1:0'\n";
        for token in ["", " ", "tok ", " tok", "t\tok", "tök"] {
            let text = format!("[admin]\ntoken = {token:?}\n{base}");
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(err.contains("[admin] token"), "{text}: {err}");
        }
        Config::parse(&format!("[admin]\ntoken = 'A-z0.9_~+/=!'\n{base}")).unwrap();
    }

    #[test]
    fn secrets_can_come_from_mounted_files() {
        let dir = std::env::temp_dir().join(format!("mailroom-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = dir.join("token");
        std::fs::write(&tok, "file-token\n").unwrap();
        let sec = dir.join("secret");
        std::fs::write(&sec, "file-secret-123").unwrap();
        let (tok_s, sec_s) = (tok.display().to_string(), sec.display().to_string());
        let mut c = Config::parse(include_str!("../cluster.toml")).unwrap();
        c.apply_env(
            "n1",
            env(&[
                ("MAILROOM_ADMIN", "0.0.0.0:9001"),
                ("MAILROOM_ADMIN_TOKEN_FILE", &tok_s),
                ("MAILROOM_CLUSTER_SECRET_FILE", &sec_s),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.admin.token.as_deref(),
            Some("file-token"),
            "the trailing newline is not part of it"
        );
        assert_eq!(c.cluster_secret().unwrap(), "file-secret-123");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_env_overrides_are_refused_with_the_variable_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("MAILROOM_LISTEN", "0.0.0.0")],
                "MAILROOM_LISTEN = \"0.0.0.0\" is not an IP:port",
            ),
            (&[("MAILROOM_ADMIN", "localhost:8081")], "MAILROOM_ADMIN"),
            (&[("MAILROOM_CLUSTER_LISTEN", "x")], "MAILROOM_CLUSTER_LISTEN"),
            (&[("MAILROOM_PUBLIC_URL", "ftp://x")], "MAILROOM_PUBLIC_URL"),
            (
                &[("MAILROOM_STORE_URL", "mysql://u:secretpw@db/x")],
                "MAILROOM_STORE_URL must be a postgres://",
            ),
            // Checked as the file's store.url is, without quoting it.
            (
                &[("MAILROOM_STORE_URL", "postgres://u:secretpw@db/x?sslmode=verify")],
                "store.url: sslmode \"verify\" is not one of",
            ),
            (&[("MAILROOM_ADMIN_TOKEN", "")], "MAILROOM_ADMIN_TOKEN is set but empty"),
            (&[("MAILROOM_LISTEN", " ")], "MAILROOM_LISTEN is set but empty"),
            (
                &[
                    ("MAILROOM_ADMIN_TOKEN", "a"),
                    ("MAILROOM_ADMIN_TOKEN_FILE", "/nonexistent"),
                ],
                "not both",
            ),
            (
                &[("MAILROOM_CLUSTER_SECRET_FILE", "/nonexistent/secret")],
                "cannot read /nonexistent/secret",
            ),
            // The rule of the file holds for the environment: admin off loopback needs a token.
            (
                &[("MAILROOM_ADMIN", "0.0.0.0:8081")],
                "token (or MAILROOM_ADMIN_TOKEN) is required",
            ),
            // And a clash with another listener of the same node.
            (&[("MAILROOM_LISTEN", "127.0.0.1:8081")], "used twice"),
        ];
        for (vars, want) in cases {
            let mut c = Config::single_node_default();
            let err = c.apply_env("n1", env(vars)).expect_err(want).to_string();
            assert!(err.contains(want), "{vars:?}: {err:?} should mention {want:?}");
            assert!(
                !err.contains("secretpw"),
                "a store URL's password is never echoed: {err}"
            );
        }
        let err = Config::single_node_default()
            .apply_env("n9", env(&[]))
            .expect_err("unknown node")
            .to_string();
        assert!(err.contains("n9"), "{err}");
    }

    /// The public URL goes out as written (invitations, the mediator's DIDs, as JSON): a space,
    /// a control character, a `"` or the like is refused, from the file and from
    /// MAILROOM_PUBLIC_URL, naming the setting. Before, `Url::parse` took them (it trims and
    /// escapes what it reads), and 1000 `"` (JSON doubles each) made the did:peer:2 too long:
    /// `run` panicked.
    #[test]
    fn a_public_url_holds_only_visible_url_characters() {
        let quotes = format!("https://m.example/{}", "\"".repeat(1000));
        let cases: &[(&str, &str)] = &[
            ("https://m.example\n", "'\\n' at byte 17"),
            ("https://m.example/a b", "' ' at byte 19"),
            ("https://m.example/\t", "'\\t'"),
            ("https://m.example/\u{1}", "'\\u{1}'"),
            ("https://m.example/\u{7f}", "'\\u{7f}'"),
            ("https://m.example/é", "'é'"),
            ("https://m.example/\"x\"", "'\"' at byte 18"),
            ("https://m.example/a\\b", "'\\\\'"),
            ("https://m.example/<x>", "'<'"),
            ("https://m.example/>", "'>'"),
            ("https://m.example/`", "'`'"),
            ("https://m.example/{x}", "'{'"),
            ("https://m.example/}", "'}'"),
            ("https://m.example/a|b", "'|'"),
            ("https://m.example/a^b", "'^'"),
            (&quotes, "'\"' at byte 18"),
        ];
        for (u, want) in cases {
            // From the file (a TOML basic string holds any of them, escaped).
            let toml_str: String = u
                .chars()
                .map(|c| match c {
                    '"' => "\\\"".to_string(),
                    '\\' => "\\\\".to_string(),
                    c if c.is_control() => format!("\\u{:04X}", c as u32),
                    c => c.to_string(),
                })
                .collect();
            let text = format!("[cluster]\npublic_url = \"{toml_str}\"\n{NODE}");
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(
                err.contains("cluster.public_url holds") && err.contains(want),
                "{u:?}: {err:?} should name the setting and {want:?}"
            );
            // From the environment.
            let err = Config::single_node_default()
                .apply_env("n1", env(&[("MAILROOM_PUBLIC_URL", u)]))
                .expect_err(u)
                .to_string();
            assert!(
                err.contains("MAILROOM_PUBLIC_URL (cluster.public_url) holds") && err.contains(want),
                "{u:?}: {err:?} should name the variable, the setting and {want:?}"
            );
        }
        // Every other visible ASCII character a URL's path takes, up to the longest URL
        // accepted: the mediator's did:peer:2 (as `Mediator::new` derives it, from any keys)
        // stays under the peer-DID cap, so no accepted URL can stop the node.
        let longest: String = "https://m.example/"
            .chars()
            .chain("!$&'()*+,-./:;=@[]_~%aZ09".chars().cycle())
            .take(MAX_PUBLIC_URL_LEN)
            .collect();
        let c = Config::parse(&format!("[cluster]\npublic_url = \"{longest}\"\n{NODE}")).unwrap();
        assert_eq!(c.cluster.public_url.as_deref(), Some(longest.as_str()));
        let mut e = Config::single_node_default();
        e.apply_env("n1", env(&[("MAILROOM_PUBLIC_URL", &longest)])).unwrap();
        assert_eq!(e.cluster.public_url.as_deref(), Some(longest.as_str()));
        for _ in 0..8 {
            let keys = crate::protocols::MediatorKeys::generate();
            let v2 = crate::protocols::v2::V2Identity::derive(&keys, &longest, &ws_url(&longest)).unwrap();
            // Over 1 KiB of room, whatever the keys.
            assert!(
                v2.did.len() + 1024 <= crate::didcomm::did::MAX_PEER_DID_LEN,
                "{}",
                v2.did.len()
            );
        }
    }

    /// A node on every interface (the container image's config) or one of several, without
    /// `cluster.public_url`, advertises an address wallets cannot use: said at start.
    #[test]
    fn an_unset_public_url_is_a_problem_only_where_the_listener_is_not_the_address() {
        let one = Config::parse(NODE).unwrap();
        let here: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let every: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(one.advertised_url_problem(here), None);
        assert!(one.advertised_url_problem(every).unwrap().contains("every interface"));
        let mut set = one.clone();
        set.cluster.public_url = Some("https://m.example".into());
        assert_eq!(set.advertised_url_problem(every), None);
        let mut two = one.clone();
        let mut n2 = two.nodes[0].clone();
        n2.id = "n2".into();
        two.nodes.push(n2);
        assert!(two.advertised_url_problem(here).unwrap().contains("each node"));
    }

    /// A `store.url` with the backend left at sled would be ignored: the node would run on
    /// sled while its operator believes PostgreSQL. MAILROOM_STORE_URL sets both.
    #[test]
    fn a_store_url_on_sled_is_refused_unless_the_environment_switches_the_backend() {
        let want = "store.url is set but store.backend is \"sled\" (set backend = \"postgres\")";
        for store in [
            "[store]\nurl = 'postgres://m:hunter2@db/m'\n",
            "[store]\nbackend = 'sled'\nurl = 'postgres://m:hunter2@db/m'\n",
        ] {
            let text = format!("{store}{NODE}");
            let err = Config::parse(&text).expect_err(&text).to_string();
            assert!(err.contains(want) && !err.contains("hunter2"), "{err}");
        }
        Config::parse(&format!(
            "[store]\nbackend = 'postgres'\nurl = 'postgres://db/m'\n{NODE}"
        ))
        .unwrap();
        // The environment's URL switches the backend, over a file that names sled or a URL.
        for store in [
            "",
            "[store]\nbackend = 'sled'\n",
            "[store]\nurl = 'postgres://file-db/m'\n",
        ] {
            let mut c: Config = toml::from_str(&format!("{store}{NODE}")).unwrap();
            c.apply_env("n1", env(&[("MAILROOM_STORE_URL", "postgres://env-db/m")]))
                .unwrap_or_else(|e| panic!("{store:?}: {e}"));
            assert_eq!(c.store.backend, "postgres");
            assert_eq!(c.store.url.as_deref(), Some("postgres://env-db/m"));
        }
    }

    #[test]
    fn a_file_may_leave_the_admin_token_and_secret_to_the_environment() {
        let dir = std::env::temp_dir().join(format!("mailroom-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.toml");
        std::fs::write(
            &path,
            "[store]\nbackend='postgres'\nurl='postgres://m@10.0.0.9/m'\n\
             [[node]]\nid='a'\nlisten='10.0.0.1:8080'\ncluster='10.0.0.1:7000'\nadmin='10.0.0.1:8081'\n\
             [[node]]\nid='b'\nlisten='10.0.0.2:8080'\ncluster='10.0.0.2:7000'\nadmin='10.0.0.2:8081'\n",
        )
        .unwrap();
        // Alone, the file is refused (admin off loopback without a token)...
        assert!(Config::load(&path).is_err());
        let err = Config::load_for_node(Some(&path), Some("b"), env(&[]))
            .expect_err("no token")
            .to_string();
        assert!(err.contains("MAILROOM_ADMIN_TOKEN"), "{err}");
        // ...and runs with both secrets from the environment.
        let (c, id, applied) = Config::load_for_node(
            Some(&path),
            Some("b"),
            env(&[
                ("MAILROOM_ADMIN_TOKEN", "tok"),
                ("MAILROOM_CLUSTER_SECRET", "secret-of-8"),
                ("MAILROOM_LISTEN", "0.0.0.0:8080"),
            ]),
        )
        .unwrap();
        assert_eq!(id, "b");
        assert_eq!(
            applied,
            ["MAILROOM_LISTEN", "MAILROOM_ADMIN_TOKEN", "MAILROOM_CLUSTER_SECRET"]
        );
        assert_eq!(c.node("b").unwrap().listen, "0.0.0.0:8080");
        assert_eq!(c.node("a").unwrap().listen, "10.0.0.1:8080");
        let (_, first, _) = Config::load_for_node(
            Some(&path),
            None,
            env(&[
                ("MAILROOM_ADMIN_TOKEN", "tok"),
                ("MAILROOM_CLUSTER_SECRET", "secret-of-8"),
            ]),
        )
        .unwrap();
        assert_eq!(first, "a");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    /// A file of several nodes whose other nodes' `cluster` addresses no node can dial: each
    /// node started and dialed its own machine, a cluster split with `/ready` at 200.
    #[test]
    fn a_peer_address_no_node_can_dial_is_refused_and_a_nodes_own_wildcard_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");
        let file = |a: &str, b: &str| {
            format!(
                "[cluster]\nsecret='secret-of-8'\n[store]\nbackend='postgres'\nurl='postgres://m@10.0.0.9/m'\n\
                 [[node]]\nid='a'\nlisten='127.0.0.1:8080'\ncluster='{a}'\nadmin='127.0.0.1:8081'\n\
                 [[node]]\nid='b'\nlisten='127.0.0.1:8090'\ncluster='{b}'\nadmin='127.0.0.1:8091'\n"
            )
        };
        for (a, b, refused_at) in [
            ("0.0.0.0:7001", "127.0.0.1:7002", "b"),
            ("[::]:7001", "127.0.0.1:7002", "b"),
            ("127.0.0.1:7001", "127.0.0.1:0", "a"),
        ] {
            std::fs::write(&path, file(a, b)).unwrap();
            let err = Config::load_for_node(Some(&path), Some(refused_at), env(&[]))
                .expect_err(a)
                .to_string();
            assert!(err.contains("cluster =") && err.contains("can dial"), "{err}");
            // The node whose own address it is only binds it.
            let own = if refused_at == "a" { "b" } else { "a" };
            Config::load_for_node(Some(&path), Some(own), env(&[])).unwrap_or_else(|e| panic!("{a} {b}: {e}"));
        }
        // A wildcard listener from the environment is the node's own: its peers read the file.
        std::fs::write(&path, file("127.0.0.1:7001", "127.0.0.1:7002")).unwrap();
        Config::load_for_node(
            Some(&path),
            Some("a"),
            env(&[("MAILROOM_CLUSTER_LISTEN", "0.0.0.0:7001")]),
        )
        .unwrap();
    }

    /// `RUST_LOG` that does not parse was dropped for `log.level` with no word; an empty one
    /// (a compose file's `${RUST_LOG}` unset) logged nothing at all.
    #[test]
    fn rust_log_is_refused_when_it_does_not_parse_and_ignored_when_blank() {
        let err = Config::load_for_node(None, None, env(&[("RUST_LOG", "mailroom=loud")]))
            .expect_err("a bad filter")
            .to_string();
        assert!(err.contains("RUST_LOG") && err.contains("loud"), "{err}");
        Config::load_for_node(None, None, env(&[("RUST_LOG", "warn,mailroom=debug")])).unwrap();
        Config::load_for_node(None, None, env(&[("RUST_LOG", " ")])).unwrap();
        assert!(crate::logging::env_filter("").unwrap().is_none());
        assert!(crate::logging::env_filter("info").unwrap().is_some());
    }

    /// A secret or config path naming a FIFO held the start forever (its open waits for a
    /// writer); one naming a huge file grew the process until it ran out of memory.
    #[test]
    fn secret_and_config_files_must_be_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(made.success(), "mkfifo");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; SECRET_FILE_MAX_BYTES as usize + 1]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (f, b, d) = (fifo.clone(), big.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let get = |var: &str, path: &Path| {
                let v = path.to_str().unwrap().to_string();
                Config::load_for_node(None, None, move |k| (k == var).then(|| v.clone()))
                    .expect_err("refused")
                    .to_string()
            };
            let _ = tx.send([
                get("MAILROOM_CLUSTER_SECRET_FILE", &f),
                get("MAILROOM_ADMIN_TOKEN_FILE", &b),
                get("MAILROOM_ADMIN_TOKEN_FILE", &d),
                Config::load_for_node(Some(&f), None, env(&[])).unwrap_err().to_string(),
            ]);
        });
        let errs = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a FIFO held the read");
        assert!(errs[0].contains("not a regular file"), "{}", errs[0]);
        assert!(errs[1].contains("larger than 65536 bytes"), "{}", errs[1]);
        assert!(errs[2].contains("a directory"), "{}", errs[2]);
        assert!(errs[3].contains("not a regular file"), "{}", errs[3]);
    }
}
