//! Where this node may connect when it POSTs to an agent's own endpoint, and the HTTP client
//! that holds it to that.
//!
//! An endpoint comes from a peer's DID document: whoever makes a connection chooses it, so it
//! may name this node's own admin listener (tokenless on loopback), a peer's, or a cloud
//! metadata service. The check runs inside the connector, after name resolution, on the very
//! addresses it is about to dial: a check of the URL beforehand would be defeated by a name
//! that resolves elsewhere the second time (DNS rebinding), and a redirect would skip it, so
//! redirects are never followed either.
//!
//! Refused always, whatever `delivery.allow_private_endpoints` says: the listeners of this
//! cluster's nodes that are not for agents (every node's admin and `cluster` listeners, this
//! node's as bound) and the store (the PostgreSQL servers of `store.url`, a named one at the
//! addresses its name resolves to), each at its exact address or its port on loopback or the
//! unspecified address; link-local addresses (169.254.0.0/16, fe80::/10: metadata services; no
//! agent lives there), and the two metadata services outside them ([`METADATA`]). An
//! IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) address is judged as the IPv4
//! address it reaches. Loopback and private addresses are otherwise allowed: agents on the
//! same host or network are normal (the interop suite runs its ACA-Py agents on 127.0.0.1).
//! Owns the policy and the client; no store, no protocol.

use actix_rt::net::TcpStream;
use actix_service::Service;
use actix_tls::connect::tcp::TcpConnectorService;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ResolverService};
use awc::http::Uri;
use futures_util::future::LocalBoxFuture;
use parking_lot::RwLock;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Cloud metadata services that are not link-local: AWS's over IPv6 (fd00:ec2::254) and
/// Alibaba Cloud's (100.100.100.200). The others answer on 169.254.169.254.
pub const METADATA: [IpAddr; 2] = [
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
];

/// Why one address may not be dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is an admin listener of this cluster")]
    AdminListener(SocketAddr),
    #[error("{0} is a cluster listener of this cluster")]
    ClusterListener(SocketAddr),
    #[error("{0} is the store (store.url)")]
    Store(SocketAddr),
    #[error("{0} is link-local (metadata services, never an agent)")]
    LinkLocal(SocketAddr),
    #[error("{0} is a cloud metadata service")]
    Metadata(SocketAddr),
    #[error("{0} is a loopback or private address (delivery.allow_private_endpoints = false)")]
    Private(SocketAddr),
}

/// Every address an endpoint's host resolved to was refused: the POST is not sent.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused to connect to {host}: {}", list(.reasons))]
pub struct Refused {
    pub host: String,
    pub reasons: Vec<Refusal>,
}

fn list(reasons: &[Refusal]) -> String {
    reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// What an address refused whatever the operator allows is ([`EgressPolicy::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Internal {
    Admin,
    Cluster,
    Store,
}

impl Internal {
    fn refusal(self, addr: SocketAddr) -> Refusal {
        match self {
            Internal::Admin => Refusal::AdminListener(addr),
            Internal::Cluster => Refusal::ClusterListener(addr),
            Internal::Store => Refusal::Store(addr),
        }
    }
}

/// The addresses outbound POSTs may not reach (see the module header). Pure: no I/O (a store
/// named by a host name is resolved by the connector as it dials).
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Ports of the cluster's own listeners (admin, cluster) and of the store: refused on
    /// loopback and the unspecified address, where any of them may listen.
    this_host_ports: BTreeMap<u16, Internal>,
    /// Their exact addresses.
    internal_addrs: BTreeMap<SocketAddr, Internal>,
    /// The store's servers named by a host name (`store.url`), with their ports: refused at
    /// the addresses the name resolves to ([`StoreNames`]).
    store_names: Vec<(String, u16)>,
    /// Loopback, private and shared (CGNAT) addresses refused too: a mediator facing the
    /// internet whose agents all have public endpoints.
    refuse_private: bool,
}

impl EgressPolicy {
    /// The policy of a node whose admin listener is bound at `own_admin`, in a cluster whose
    /// `[[node]]` entries list `admins` (every node's `admin`, this one's included; several
    /// nodes in one process share the host's loopback).
    pub fn new<'a>(own_admin: SocketAddr, admins: impl IntoIterator<Item = &'a str>) -> EgressPolicy {
        let mut p = EgressPolicy::default();
        p.add_admin(own_admin);
        p.add_admins(admins);
        p
    }

    /// Refuses these admin listeners too (`[[node]]` entries' `admin`, as written in the
    /// config; the ones that are not addresses name nothing dialable here and are skipped).
    /// Nothing is ever taken out: a node removed from the file may still be running.
    pub fn add_admins<'a>(&mut self, admins: impl IntoIterator<Item = &'a str>) {
        for a in admins.into_iter().filter_map(|a| a.parse::<SocketAddr>().ok()) {
            self.add_admin(a);
        }
    }

    fn add_admin(&mut self, a: SocketAddr) {
        self.add_internal(a, Internal::Admin);
    }

    /// The policy of a node of `cfg` whose admin listener is bound at `own_admin` and cluster
    /// listener, if any, at `own_cluster`: every `[[node]]`'s admin and cluster listeners,
    /// the store's servers (PostgreSQL), and loopback and private addresses when
    /// `delivery.allow_private_endpoints` is off.
    pub fn for_node(
        cfg: &crate::config::Config,
        own_admin: SocketAddr,
        own_cluster: Option<SocketAddr>,
    ) -> EgressPolicy {
        let mut p = EgressPolicy::default();
        p.add_admin(own_admin);
        p.add_nodes(&cfg.nodes);
        if let Some(c) = own_cluster {
            p.add_internal(c, Internal::Cluster);
        }
        if cfg.store.backend == "postgres" {
            if let Some(url) = &cfg.store.url {
                p.add_store(url);
            }
        }
        p.refusing_private(!cfg.delivery.allow_private_endpoints)
    }

    /// Refuses the admin and cluster listeners of these `[[node]]` entries too (as written in
    /// the config; the ones that are not addresses name nothing dialable here and are
    /// skipped). Nothing is ever taken out: a node removed from the file may still be running.
    pub fn add_nodes(&mut self, nodes: &[crate::config::NodeEntry]) {
        self.add_admins(nodes.iter().map(|n| n.admin.as_str()));
        for c in nodes
            .iter()
            .filter_map(|n| n.cluster.as_deref()?.parse::<SocketAddr>().ok())
        {
            self.add_internal(c, Internal::Cluster);
        }
    }

    /// Refuses the PostgreSQL servers `url` (`store.url`) names: an IP literal (or
    /// `localhost`) here, a name at the addresses it resolves to when dialled
    /// (every minute at most). A Unix socket needs nothing: no POST goes there.
    pub fn add_store(&mut self, url: &str) {
        for (host, port) in store_hosts(url) {
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>() {
                self.add_internal(SocketAddr::new(ip, port), Internal::Store);
            } else if host.eq_ignore_ascii_case("localhost") {
                self.add_internal(SocketAddr::from(([127, 0, 0, 1], port)), Internal::Store);
            } else if !self.store_names.contains(&(host.clone(), port)) {
                self.store_names.push((host, port));
            }
        }
    }

    /// Refuses `a` (its exact address, and its port on loopback or the unspecified address,
    /// where a listener of this host may be reached whatever address it bound) as `kind`.
    fn add_internal(&mut self, a: SocketAddr, kind: Internal) {
        if a.port() != 0 {
            self.this_host_ports.entry(a.port()).or_insert(kind);
            self.internal_addrs
                .entry(SocketAddr::new(canonical(a.ip()), a.port()))
                .or_insert(kind);
        }
    }

    /// The same policy, refusing loopback and private addresses too when `refuse` is set.
    pub fn refusing_private(mut self, refuse: bool) -> EgressPolicy {
        self.refuse_private = refuse;
        self
    }

    /// Whether a POST may open a connection to `addr`.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let ip = canonical(addr.ip());
        if is_link_local(ip) {
            return Err(Refusal::LinkLocal(addr));
        }
        if METADATA.contains(&ip) {
            return Err(Refusal::Metadata(addr));
        }
        let this_host = is_loopback_or_unspecified(ip);
        let internal = match self.internal_addrs.get(&SocketAddr::new(ip, addr.port())) {
            Some(kind) => Some(kind),
            None if this_host => self.this_host_ports.get(&addr.port()),
            None => None,
        };
        if let Some(kind) = internal {
            return Err(kind.refusal(addr));
        }
        if self.refuse_private && (this_host || is_private(ip)) {
            return Err(Refusal::Private(addr));
        }
        Ok(())
    }

    /// Splits resolved addresses into the ones that may be dialled and the refusals.
    pub fn filter(&self, addrs: impl IntoIterator<Item = SocketAddr>) -> (Vec<SocketAddr>, Vec<Refusal>) {
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        for a in addrs {
            match self.check(a) {
                Ok(()) => ok.push(a),
                Err(r) => refused.push(r),
            }
        }
        (ok, refused)
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) reaches the IPv4 one, and so does one of
/// the NAT64 well-known prefix (`64:ff9b::/96`, RFC 6052: `64:ff9b::a9fe:a9fe` is
/// 169.254.169.254 behind a NAT64 gateway): judge that.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
                let o = v6.octets();
                IpAddr::V4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            }
            None => ip,
        },
        v4 => v4,
    }
}

/// The TCP servers a PostgreSQL URL names, as (host as written, port): its hosts and
/// `hostaddr`s, with their ports (one for all, one each, or 5432). Unix sockets are left out;
/// so is everything of a URL that does not parse (the store refuses it too).
fn store_hosts(url: &str) -> Vec<(String, u16)> {
    // The query holds nothing of the address, and options tokio-postgres does not know
    // (`sslmode=verify-full`) that the store takes out before it parses the rest.
    let text = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url.split(['?', '#']).next().unwrap_or(url)
    } else {
        url
    };
    let Ok(cfg) = text.parse::<tokio_postgres::Config>() else {
        return Vec::new();
    };
    let ports = cfg.get_ports();
    let port = |i: usize| match ports {
        [] => 5432,
        [p] => *p,
        _ => ports.get(i).copied().unwrap_or(5432),
    };
    let mut out = Vec::new();
    for (i, h) in cfg.get_hosts().iter().enumerate() {
        if let tokio_postgres::config::Host::Tcp(name) = h {
            out.push((name.clone(), port(i)));
        }
    }
    for (i, ip) in cfg.get_hostaddrs().iter().enumerate() {
        out.push((ip.to_string(), port(i)));
    }
    out
}

/// How long the addresses of a store named by a host name are trusted before they are
/// resolved again ([`StoreNames`]).
const STORE_NAMES_REFRESH: Duration = Duration::from_secs(60);

/// The longest a background resolution of the store's names may take before the next dial
/// may start another (the system resolver's own timeouts end it well before).
const STORE_NAMES_LOOKUP_LIMIT: Duration = Duration::from_secs(60);

/// How a store's name is resolved: the system resolver, or a test's.
type Lookup = Arc<dyn Fn(String, u16) -> LocalBoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

fn system_lookup() -> Lookup {
    Arc::new(|host, port| Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) }))
}

/// The store's servers named by host names ([`EgressPolicy::add_store`]), and every address
/// they were found at, refused from then on (never taken out: the server may still answer
/// there).
///
/// The first dial waits for the first resolution, so none goes out before the store's
/// addresses are known. After it, a dial never waits on DNS: once the addresses are
/// [`STORE_NAMES_REFRESH`] old, the next dial starts one resolution in the background and goes
/// on with what is known. Resolved inside every dial under a lock, a slow resolver for the
/// store's name had held every endpoint POST of the node for as long as it took, every minute.
struct StoreNames {
    names: Vec<(String, u16)>,
    lookup: Lookup,
    refresh_every: Duration,
    /// Held by the dial that makes the first resolution; `true` once it is made.
    first: tokio::sync::Mutex<bool>,
    first_made: AtomicBool,
    /// When the last resolution ended.
    resolved_at: parking_lot::Mutex<Option<std::time::Instant>>,
    /// A background resolution is under way.
    refreshing: AtomicBool,
}

/// Clears [`StoreNames::refreshing`] when dropped.
struct Refreshing<'a>(&'a AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl StoreNames {
    fn new(names: Vec<(String, u16)>, lookup: Lookup, refresh_every: Duration) -> StoreNames {
        StoreNames {
            names,
            lookup,
            refresh_every,
            first: tokio::sync::Mutex::new(false),
            first_made: AtomicBool::new(false),
            resolved_at: parking_lot::Mutex::new(None),
            refreshing: AtomicBool::new(false),
        }
    }

    /// Run by every dial once its own host is resolved, before its addresses are judged.
    async fn before_dial(self: &Arc<Self>, policy: &Arc<RwLock<EgressPolicy>>) {
        if self.names.is_empty() {
            return;
        }
        if !self.first_made.load(Ordering::Acquire) {
            let mut made = self.first.lock().await;
            if !*made {
                self.resolve(policy).await;
                *made = true;
                self.first_made.store(true, Ordering::Release);
            }
            return;
        }
        let stale = self
            .resolved_at
            .lock()
            .map_or(true, |t| t.elapsed() >= self.refresh_every);
        if stale && !self.refreshing.swap(true, Ordering::AcqRel) {
            let (me, policy) = (self.clone(), policy.clone());
            actix_rt::spawn(async move {
                // Cleared however the task ends: dropped with a stopping worker too, or no
                // dial of this node would start a refresh again.
                let _refreshing = Refreshing(&me.refreshing);
                let _ = tokio::time::timeout(STORE_NAMES_LOOKUP_LIMIT, me.resolve(&policy)).await;
            });
        }
    }

    async fn resolve(&self, policy: &RwLock<EgressPolicy>) {
        for (host, port) in &self.names {
            match (self.lookup)(host.clone(), *port).await {
                Ok(addrs) => {
                    let mut p = policy.write();
                    for a in addrs {
                        p.add_internal(a, Internal::Store);
                    }
                }
                Err(e) => {
                    tracing::warn!(%host, "the store's name did not resolve (its addresses known so far are refused to endpoints): {e}")
                }
            }
        }
        *self.resolved_at.lock() = Some(std::time::Instant::now());
    }
}

/// Addresses that reach this host: loopback, and the unspecified address (Linux connects
/// `0.0.0.0` and `::` to the local host; the rest of 0.0.0.0/8 goes nowhere, refused alike).
fn is_loopback_or_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    }
}

/// Private (RFC 1918), shared (RFC 6598, carrier-grade NAT) and unique local (fc00::/7)
/// addresses: a network of the operator's, not an agent on the internet.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64),
        IpAddr::V6(v6) => v6.segments()[0] & 0xfe00 == 0xfc00,
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// awc's TCP connector with the policy between name resolution and the dial: resolves as
/// awc's default does (IP literals as they are, names through the system resolver), drops the
/// refused addresses, and fails with [`Refused`] (as an I/O error of kind `PermissionDenied`)
/// when none is left.
#[derive(Clone)]
struct GuardedConnector {
    policy: Arc<RwLock<EgressPolicy>>,
    store_names: Arc<StoreNames>,
    resolver: ResolverService,
    tcp: TcpConnectorService,
}

impl Service<ConnectInfo<Uri>> for GuardedConnector {
    type Response = Connection<Uri, TcpStream>;
    type Error = ConnectError;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    actix_service::always_ready!();

    fn call(&self, req: ConnectInfo<Uri>) -> Self::Future {
        let policy = self.policy.clone();
        let store_names = self.store_names.clone();
        let resolve = self.resolver.call(req);
        let tcp = self.tcp;
        Box::pin(async move {
            let mut req = resolve.await?;
            store_names.before_dial(&policy).await;
            let (ok, reasons) = policy.read().filter(req.take_addrs());
            if ok.is_empty() {
                let refused = Refused {
                    host: req.hostname().to_string(),
                    reasons,
                };
                return Err(ConnectError::Io(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    refused,
                )));
            }
            if !reasons.is_empty() {
                tracing::info!(host = req.hostname(), "some addresses not dialled: {}", list(&reasons));
            }
            tcp.call(req.set_addrs(ok)).await
        })
    }
}

/// What one node's outbound POSTs share: the policy and the request timeout. The awc client
/// built from it is kept per thread ([`Egress::client`]): awc clients are not `Send`.
pub struct Egress {
    /// Shared with every thread's connector: a reload that adds nodes refuses their admin
    /// and cluster listeners on every client at once.
    policy: Arc<RwLock<EgressPolicy>>,
    /// The store's servers named by host names, resolved by the connectors.
    store_names: Arc<StoreNames>,
    timeout: Duration,
    /// `https://` endpoints: the webpki roots and `delivery.ca_file`'s.
    tls: Arc<rustls::ClientConfig>,
}

thread_local! {
    /// One client (and connection pool) per node on this thread.
    static CLIENTS: RefCell<Vec<(Weak<Egress>, awc::Client)>> = const { RefCell::new(Vec::new()) };
}

impl Egress {
    /// `extra_roots`: DER certificates trusted beside the webpki roots (`delivery.ca_file`).
    pub fn new(policy: EgressPolicy, timeout: Duration, extra_roots: &[Vec<u8>]) -> Result<Egress, String> {
        let store_names = Arc::new(StoreNames::new(
            policy.store_names.clone(),
            system_lookup(),
            STORE_NAMES_REFRESH,
        ));
        Ok(Egress {
            policy: Arc::new(RwLock::new(policy)),
            store_names,
            timeout,
            tls: crate::tls::client_config(extra_roots, &[b"http/1.1"], "delivery.ca_file")?,
        })
    }

    /// Refuses the admin and cluster listeners of `[[node]]` entries the config gained since
    /// start (`POST /reload`, SIGHUP): a node that joins later is no less reachable by an
    /// endpoint.
    pub fn refuse_nodes(&self, nodes: &[crate::config::NodeEntry]) {
        self.policy.write().add_nodes(nodes);
    }

    /// This node's client on this thread, made on first use.
    pub fn client(self: &Arc<Self>) -> awc::Client {
        CLIENTS.with(|c| {
            let mut c = c.borrow_mut();
            // Nodes stopped since (tests start many in one process) leave their clients here.
            c.retain(|(e, _)| e.strong_count() > 0);
            if let Some((_, client)) = c.iter().find(|(e, _)| std::ptr::eq(e.as_ptr(), Arc::as_ptr(self))) {
                return client.clone();
            }
            let client = self.build();
            c.push((Arc::downgrade(self), client.clone()));
            client
        })
    }

    fn build(&self) -> awc::Client {
        let connector = awc::Connector::new()
            .connector(GuardedConnector {
                policy: self.policy.clone(),
                store_names: self.store_names.clone(),
                resolver: ResolverService::default(),
                tcp: TcpConnectorService::default(),
            })
            // The TLS handshake runs over what the guarded connector dialled.
            .rustls_0_23(self.tls.clone())
            // No pool limit, as with the client per POST this replaces: concurrency is bounded
            // by the callers (drains by `limits.max_endpoint_drains` and one per connection,
            // replies by `outbound::ReplySlots`).
            .limit(0);
        awc::Client::builder()
            .connector(connector)
            .timeout(self.timeout)
            .disable_redirects()
            .finish()
    }
}

/// Whether an awc error is the policy's refusal (not a network failure).
pub fn refusal(e: &awc::error::SendRequestError) -> Option<&Refused> {
    match e {
        awc::error::SendRequestError::Connect(awc::error::ConnectError::Io(io)) => {
            io.get_ref().and_then(|r| r.downcast_ref::<Refused>())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> EgressPolicy {
        // This node's admin bound on 127.0.0.1:9001; a peer's at 10.0.0.2:9002 (with a token);
        // a third node's in the same process on 127.0.0.1:9003.
        EgressPolicy::new(
            a("127.0.0.1:9001"),
            ["127.0.0.1:9001", "10.0.0.2:9002", "127.0.0.1:9003"],
        )
    }

    #[test]
    fn admin_listeners_are_refused_on_every_local_spelling() {
        let p = policy();
        for addr in [
            "127.0.0.1:9001",
            "127.0.0.2:9001",
            "0.0.0.0:9001",
            "0.1.2.3:9001",
            "[::1]:9001",
            "[::]:9001",
            "[::ffff:127.0.0.1]:9001",
            "127.0.0.1:9003",
            "[::1]:9002",
            "10.0.0.2:9002",
            "[::ffff:10.0.0.2]:9002",
        ] {
            assert_eq!(p.check(a(addr)), Err(Refusal::AdminListener(a(addr))), "{addr}");
        }
    }

    #[test]
    fn link_local_is_refused_on_any_port() {
        let p = policy();
        for addr in [
            "169.254.169.254:80",
            "169.254.0.1:8080",
            "[fe80::1]:80",
            "[febf::1]:443",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert_eq!(p.check(a(addr)), Err(Refusal::LinkLocal(a(addr))), "{addr}");
        }
    }

    #[test]
    fn metadata_services_outside_link_local_are_refused() {
        let p = policy();
        for addr in ["[fd00:ec2::254]:80", "100.100.100.200:80"] {
            assert_eq!(p.check(a(addr)), Err(Refusal::Metadata(a(addr))), "{addr}");
        }
        assert_eq!(p.check(a("[fd00:ec2::253]:80")), Ok(()));
        assert_eq!(p.check(a("100.100.100.201:80")), Ok(()));
    }

    #[test]
    fn agents_on_loopback_private_and_public_addresses_are_reached() {
        let p = policy();
        for addr in [
            "127.0.0.1:8020",
            "[::1]:8020",
            "10.0.0.2:8020",
            "10.0.0.3:9002",
            "192.168.1.5:9001",
            "172.30.0.11:8080",
            "203.0.113.7:443",
            "[2001:db8::1]:9001",
            "[fec0::1]:80",
        ] {
            assert_eq!(p.check(a(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn an_ephemeral_admin_port_counts_once_bound() {
        // Tests bind port 0 and the config is rewritten to the bound port; a config still
        // saying 0 refuses nothing by port 0, and the bound address is always known.
        let p = EgressPolicy::new(a("127.0.0.1:40123"), ["127.0.0.1:0"]);
        assert!(p.check(a("127.0.0.1:40123")).is_err());
        assert!(p.check(a("127.0.0.1:0")).is_ok());
    }

    #[test]
    fn loopback_and_private_addresses_are_refused_when_the_operator_says_so() {
        let p = policy().refusing_private(true);
        for addr in [
            "127.0.0.1:8000",
            "0.0.0.0:8000",
            "[::1]:8000",
            "[::ffff:10.1.2.3]:443",
            "10.0.0.5:443",
            "172.16.0.1:443",
            "192.168.1.1:443",
            "100.64.0.1:443",
            "[fd12::1]:443",
        ] {
            assert_eq!(p.check(a(addr)), Err(Refusal::Private(a(addr))), "{addr}");
        }
        for addr in [
            "93.184.216.34:443",
            "172.32.0.1:443",
            "100.128.0.1:443",
            "[2606:4700::1]:443",
        ] {
            assert_eq!(p.check(a(addr)), Ok(()), "{addr}");
        }
        // By default they are reached (agents on this host, as in the interop suite).
        assert_eq!(policy().check(a("10.0.0.5:443")), Ok(()));
    }

    /// A cluster of two nodes on a private network, with its store on another host.
    fn cluster_config(store_url: &str) -> crate::config::Config {
        let mut cfg = crate::config::Config::single_node_default();
        cfg.nodes[0].cluster = Some("10.0.0.1:7001".into());
        cfg.nodes.push(crate::config::NodeEntry {
            id: "n2".into(),
            listen: "10.0.0.2:8000".into(),
            cluster: Some("10.0.0.2:7002".into()),
            admin: "10.0.0.2:9002".into(),
        });
        cfg.store.backend = "postgres".into();
        cfg.store.url = Some(store_url.into());
        cfg
    }

    #[test]
    fn the_store_is_refused_whatever_private_endpoints_allow() {
        let cfg = cluster_config("postgres://mailroom:secret@10.0.0.9:5433/mailroom?sslmode=verify-full");
        assert!(
            cfg.delivery.allow_private_endpoints,
            "the default, and what this is about"
        );
        let p = EgressPolicy::for_node(&cfg, a("127.0.0.1:9001"), None);
        for addr in [
            "10.0.0.9:5433",
            "[::ffff:10.0.0.9]:5433",
            "[64:ff9b::a00:9]:5433",
            "127.0.0.1:5433",
            "[::1]:5433",
        ] {
            assert_eq!(p.check(a(addr)), Err(Refusal::Store(a(addr))), "{addr}");
        }
        // The store's host is reached on its other ports: an agent may live there.
        assert_eq!(p.check(a("10.0.0.9:8020")), Ok(()));
        assert_eq!(
            Refusal::Store(a("10.0.0.9:5433")).to_string(),
            "10.0.0.9:5433 is the store (store.url)"
        );
        // A store on this host, by name: every loopback spelling of its port.
        let p = EgressPolicy::for_node(
            &cluster_config("postgres://mailroom@localhost/mailroom"),
            a("127.0.0.1:9001"),
            None,
        );
        for addr in ["127.0.0.1:5432", "[::1]:5432", "0.0.0.0:5432"] {
            assert_eq!(p.check(a(addr)), Err(Refusal::Store(a(addr))), "{addr}");
        }
        // A sled store names no server.
        let mut sled = cluster_config("postgres://mailroom@localhost/mailroom");
        sled.store.backend = "sled".into();
        assert_eq!(
            EgressPolicy::for_node(&sled, a("127.0.0.1:9001"), None).check(a("127.0.0.1:5432")),
            Ok(())
        );
    }

    #[test]
    fn the_servers_of_a_store_url_are_read_as_postgres_reads_them() {
        let hosts = |u: &str| store_hosts(u);
        assert_eq!(
            hosts("postgres://u:p@10.0.0.9/db"),
            vec![("10.0.0.9".to_string(), 5432)]
        );
        assert_eq!(
            hosts("postgresql://u@db1.internal:6432,db2.internal:6433/db?sslmode=verify-ca&sslrootcert=/x.pem"),
            vec![("db1.internal".to_string(), 6432), ("db2.internal".to_string(), 6433)]
        );
        assert_eq!(hosts("postgres://u@[fd00::5]:5433/db")[0].1, 5433);
        assert_eq!(hosts("postgres://u@%2Frun%2Fpostgresql/db"), vec![], "a Unix socket");
        assert_eq!(hosts("not a url"), vec![]);
        // Names wait for the connector to resolve them; literals are refused at once.
        let mut p = EgressPolicy::default();
        p.add_store("postgres://u@db.internal:6432,[fd00::5]:5433/db");
        assert_eq!(p.store_names, vec![("db.internal".to_string(), 6432)]);
        assert_eq!(p.check(a("[fd00::5]:5433")), Err(Refusal::Store(a("[fd00::5]:5433"))));
    }

    #[test]
    fn every_cluster_listener_is_refused_whatever_private_endpoints_allow() {
        let cfg = cluster_config("postgres://mailroom@10.0.0.9/mailroom");
        // This node's own, bound on every interface (the config may say port 0).
        let p = EgressPolicy::for_node(&cfg, a("127.0.0.1:9001"), Some(a("0.0.0.0:7100")));
        for addr in [
            // The peer's, as the config names it.
            "10.0.0.2:7002",
            "[::ffff:10.0.0.2]:7002",
            "[64:ff9b::a00:2]:7002",
            // This node's in the config, and as bound.
            "10.0.0.1:7001",
            "127.0.0.1:7001",
            "127.0.0.1:7100",
            "[::1]:7100",
        ] {
            assert_eq!(p.check(a(addr)), Err(Refusal::ClusterListener(a(addr))), "{addr}");
        }
        // The peer's admin listener too, and its public listener is an agent's like any other.
        assert_eq!(
            p.check(a("10.0.0.2:9002")),
            Err(Refusal::AdminListener(a("10.0.0.2:9002")))
        );
        assert_eq!(p.check(a("10.0.0.2:8000")), Ok(()));
        // A node a reload adds.
        let mut p = p;
        p.add_nodes(&[crate::config::NodeEntry {
            id: "n3".into(),
            listen: "10.0.0.3:8000".into(),
            cluster: Some("10.0.0.3:7003".into()),
            admin: "10.0.0.3:9003".into(),
        }]);
        assert_eq!(
            p.check(a("10.0.0.3:7003")),
            Err(Refusal::ClusterListener(a("10.0.0.3:7003")))
        );
    }

    #[test]
    fn nat64_addresses_are_judged_as_the_ipv4_address_inside() {
        let p = policy();
        let metadata = "[64:ff9b::a9fe:a9fe]:80";
        assert_eq!(p.check(a(metadata)), Err(Refusal::LinkLocal(a(metadata))));
        let alibaba = "[64:ff9b::6464:64c8]:80";
        assert_eq!(p.check(a(alibaba)), Err(Refusal::Metadata(a(alibaba))));
        let admin = "[64:ff9b::7f00:1]:9001";
        assert_eq!(p.check(a(admin)), Err(Refusal::AdminListener(a(admin))));
        let private = "[64:ff9b::a00:5]:443";
        assert_eq!(
            p.clone().refusing_private(true).check(a(private)),
            Err(Refusal::Private(a(private)))
        );
        // A public IPv4 address behind NAT64 is an agent like any other.
        assert_eq!(
            policy().refusing_private(true).check(a("[64:ff9b::5db8:d822]:443")),
            Ok(())
        );
    }

    /// A store name's lookups: the first answers `first` at once; each later one waits for
    /// `later` to be notified and answers `then`. Counts the lookups.
    fn scripted_lookup(
        first: &str,
        then: &str,
        later: Arc<tokio::sync::Notify>,
    ) -> (Lookup, Arc<std::sync::atomic::AtomicUsize>) {
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (first, then, counted) = (a(first), a(then), calls.clone());
        let lookup: Lookup = Arc::new(move |_, _| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let later = later.clone();
            Box::pin(async move {
                if n == 0 {
                    return Ok(vec![first]);
                }
                later.notified().await;
                Ok(vec![then])
            })
        });
        (lookup, calls)
    }

    /// The first dial waits for the store's name to be resolved; later ones never wait on DNS:
    /// a stale answer starts one resolution in the background, whose addresses are refused
    /// once it ends. Resolved inside every dial, a resolver that took its time held every
    /// endpoint POST of the node as long (here: for ever).
    #[actix_rt::test]
    async fn a_dial_never_waits_on_a_refresh_of_the_stores_name() {
        let later = Arc::new(tokio::sync::Notify::new());
        let (lookup, calls) = scripted_lookup("10.0.0.5:6432", "10.0.0.6:6432", later.clone());
        let names = Arc::new(StoreNames::new(
            vec![("db.internal".into(), 6432)],
            lookup,
            Duration::ZERO,
        ));
        let policy = Arc::new(RwLock::new(EgressPolicy::default()));
        names.before_dial(&policy).await;
        assert_eq!(
            policy.read().check(a("10.0.0.5:6432")),
            Err(Refusal::Store(a("10.0.0.5:6432"))),
            "the first dial goes out once the store's addresses are known"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for round in 0..6 {
            tokio::time::timeout(Duration::from_secs(10), names.before_dial(&policy))
                .await
                .expect("a dial waited on the resolution of the store's name");
            if round == 2 {
                // The background resolution has begun (it is stuck in the resolver).
                while calls.load(Ordering::SeqCst) < 2 {
                    assert!(tokio::time::Instant::now() < deadline, "no refresh was started");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        tokio::task::yield_now().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one resolution under way, not one per dial"
        );
        assert_eq!(policy.read().check(a("10.0.0.6:6432")), Ok(()));
        later.notify_one();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while policy.read().check(a("10.0.0.6:6432")).is_ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the refresh's address was never refused"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn filter_keeps_the_allowed_addresses_in_order() {
        let (ok, refused) = policy().filter([a("127.0.0.1:9001"), a("10.1.1.1:80"), a("[::1]:80")]);
        assert_eq!(ok, vec![a("10.1.1.1:80"), a("[::1]:80")]);
        assert_eq!(refused, vec![Refusal::AdminListener(a("127.0.0.1:9001"))]);
        let e = Refused {
            host: "evil.example".into(),
            reasons: refused,
        };
        assert_eq!(
            e.to_string(),
            "refused to connect to evil.example: 127.0.0.1:9001 is an admin listener of this cluster"
        );
    }
}
