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
//! Refused always: an admin listener of this cluster's nodes (its exact address, or its port
//! on loopback or the unspecified address), link-local addresses (169.254.0.0/16, fe80::/10:
//! metadata services; no agent lives there), and the two metadata services outside them
//! ([`METADATA`]). Loopback and private addresses are
//! otherwise allowed: agents on the same host or network are normal (the interop suite runs
//! its ACA-Py agents on 127.0.0.1). Owns the policy and the client; no store, no protocol.

use actix_rt::net::TcpStream;
use actix_service::Service;
use actix_tls::connect::tcp::TcpConnectorService;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection, ResolverService};
use awc::http::Uri;
use futures_util::future::LocalBoxFuture;
use parking_lot::RwLock;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
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

/// The addresses outbound POSTs may not reach (see the module header). Pure: no I/O.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Ports of the admin listeners of every node in the config, and the one this node bound.
    admin_ports: BTreeSet<u16>,
    /// The admin listeners' exact addresses.
    admin_addrs: BTreeSet<SocketAddr>,
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
        if a.port() != 0 {
            self.admin_ports.insert(a.port());
            self.admin_addrs.insert(SocketAddr::new(canonical(a.ip()), a.port()));
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
        if self.admin_addrs.contains(&SocketAddr::new(ip, addr.port()))
            || (this_host && self.admin_ports.contains(&addr.port()))
        {
            return Err(Refusal::AdminListener(addr));
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

/// An IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) reaches the IPv4 one: judge that.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
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
        let resolve = self.resolver.call(req);
        let tcp = self.tcp;
        Box::pin(async move {
            let mut req = resolve.await?;
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
    /// listeners on every client at once.
    policy: Arc<RwLock<EgressPolicy>>,
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
        Ok(Egress {
            policy: Arc::new(RwLock::new(policy)),
            timeout,
            tls: crate::tls::client_config(extra_roots, &[b"http/1.1"], "delivery.ca_file")?,
        })
    }

    /// Refuses the admin listeners of `[[node]]` entries the config gained since start
    /// (`POST /reload`, SIGHUP): a node that joins later is no less reachable by an endpoint.
    pub fn refuse_admins<'a>(&self, admins: impl IntoIterator<Item = &'a str>) {
        self.policy.write().add_admins(admins);
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
                resolver: ResolverService::default(),
                tcp: TcpConnectorService::default(),
            })
            // The TLS handshake runs over what the guarded connector dialled.
            .rustls_0_23(self.tls.clone())
            // No pool limit, as with the client per POST this replaces: concurrency is bounded
            // by the callers (one drain per connection and node, replies per inbound request).
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
