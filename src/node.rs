//! The composition root: open the store, load the mediator identity, start the registry,
//! the cluster and the listeners; on shutdown, tear down in a fixed order.
//!
//! `run` takes bound listeners and a shutdown future, so tests start whole nodes in-process
//! on `127.0.0.1:0` ([`spawn`]).

use crate::admin::{self, AdminState};
use crate::cluster::{ClusterConfig, ClusterEvent, ClusterHandle};
use crate::config::{Config, NodeEntry};
use crate::metrics::Metrics;
use crate::protocols::{now_ms, Mediator, MediatorKeys};
use crate::registry::{CloseAll, CloseConn, Registry, SessionMoved, WakeLocal};
use crate::session::Shared;
use crate::store::{self, Store};
use actix::Actor;
use anyhow::Context as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the start waits for the store to release this node's leases of before a restart.
const START_RELEASE_WAIT: Duration = Duration::from_secs(5);
/// How long in-flight requests get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The whole stop, from the signal to the exit, at most: under the 30 s a container runtime
/// gives before it kills (Kubernetes' default `terminationGracePeriodSeconds`, podman's and
/// docker's stop timeouts are 10 s and can be raised). Each phase of the stop has its own grace
/// ([`SHUTDOWN_GRACE`], [`crate::push::STOP_GRACE`]) and gets what is left of this when that
/// is less: a socket that takes none of the close frame, say, costs the later phases their
/// time, not the stop its deadline. A phase cut short leaves the stop owing (the next start
/// wakes every wallet with mail pending).
pub const STOP_DEADLINE: Duration = Duration::from_secs(25);
/// Of [`STOP_DEADLINE`], what the phases leave to the last steps: the store's flush and the
/// record of the clean end (on PostgreSQL a statement, up to its timeout).
const STOP_TAIL: Duration = Duration::from_secs(4);
/// Dedup records pruned per store call (the call repeats while batches come back full).
const DEDUP_PRUNE_BATCH: usize = 10_000;

/// What a failed peer left: the messages leased to it (delivered by its sessions and never
/// acknowledged, or handed to it) go back to pending now rather than when their leases run out
/// (`delivery.lease_ms`, 30 s by default), so a wallet that reconnected elsewhere gets them
/// within the failure timeout; this node's sessions are woken for them (other nodes' by their
/// sweep), and the wallets without a session anywhere are woken by push. A peer that was only
/// cut off may deliver some of them twice (at-least-once); a node that sees less than half the
/// cluster up, more likely cut off itself, leaves them to their leases (`release_leases`).
///
/// Then the wallets owed a wake-up ([`crate::session::owed::wake_owed`], on a store that
/// tracks them: PostgreSQL): the push events the peer held in memory when it died were never
/// written, and a peer that never comes back would wake nobody for them. `owing` counts the
/// wake-ups of this kind not finished, counted by the caller before this is spawned (a stop
/// meanwhile leaves this node's run marked: its next start wakes them).
async fn take_over(
    shared: Arc<Shared>,
    node: String,
    mut conns: Vec<String>,
    release_leases: bool,
    unrouted: Arc<dyn Store>,
    owing: Arc<AtomicUsize>,
) {
    if release_leases {
        conns.extend(release_failed_peer(&shared, &node).await);
        conns.sort_unstable();
        conns.dedup();
    }
    wake_lost_sessions(shared.clone(), conns).await;
    match crate::session::owed::wake_owed(&shared, &unrouted).await {
        Some((woken, complete)) => {
            if complete {
                owing.fetch_sub(1, Ordering::SeqCst);
            }
            if woken > 0 || !complete {
                tracing::info!(peer = %node, wallets = woken, complete, "wallets owed a wake-up woken after a failed peer");
            }
        }
        None => {
            owing.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Releases what `node` had leased, whatever its leases' length (nodes of a cluster may be
/// configured with different `delivery.lease_ms`); returns the connections it released
/// messages of. (A peer that restarted before it was found down may lose to this the leases it
/// took since, and deliver those messages twice: at-least-once.)
async fn release_failed_peer(shared: &Arc<Shared>, node: &str) -> Vec<String> {
    match shared
        .mediator
        .store
        .release_owners_under(&crate::protocols::node_owners(node), i64::MAX)
        .await
    {
        Ok(conns) if conns.is_empty() => conns,
        Ok(conns) => {
            tracing::info!(peer = %node, wallets = conns.len(), "a failed peer's deliveries are deliverable again");
            shared.sweep(false).await;
            conns
        }
        Err(e) => {
            tracing::warn!(peer = %node, "a failed peer's leases not released (they run out): {e}");
            Vec::new()
        }
    }
}

/// The wallets whose sessions a failed peer held, or whose deliveries it (or this node before
/// it restarted) left leased: each with mail pending is treated as if a message were queued now
/// (its session woken if it reconnected meanwhile, else pushed). Mail forwarded while the peer
/// was failing was notified to it and woke nobody; a wallet that picked up over HTTP there and
/// never acknowledged would hear of its mail from nobody.
async fn wake_lost_sessions(shared: Arc<Shared>, conns: Vec<String>) {
    crate::session::wake_pending(&shared, &conns).await;
}

/// A peer queued mail for `conn` and, its directory naming this node, notified it instead of
/// pushing: the sessions of `conn` here are woken. With none left (it ended before the
/// peer applied this node's `Disown`), nobody would deliver or push: the mail is treated as
/// queued here ([`Shared::queued_new`]), which pushes at most once, as the peer did not.
///
/// This cannot bounce between nodes for long: this node's directory is authoritative for its
/// own sessions and a link is FIFO, so a notification relayed on to a peer follows this node's
/// `Disown` there, and that peer names this node again only for a newer session of it, which
/// a wake-up here then finds. A relay goes only to a node whose claim this directory holds
/// (one newer, or one whose `Disown` is still on its way here); each hop wakes, relays or
/// pushes once, never more, and the relays end as the `Disown`s in flight land.
async fn notified(shared: &Arc<Shared>, conn: String) {
    shared.metrics.notifications_received.inc();
    let woken = shared
        .registry
        .send(WakeLocal { conn: conn.clone() })
        .await
        .unwrap_or(false);
    if !woken {
        // Off the event loop: it may read the store (the wallet's endpoint).
        let s = shared.clone();
        shared.tracked.spawn(async move { s.queued_new(&conn).await });
    }
}

/// Period of the sweep that deletes messages past the sender's expiry (they are never leased
/// meanwhile: this only frees their space and counts them).
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// Most expired messages deleted by one store call.
const EXPIRY_BATCH: usize = 1_000;
/// Pages of connections the collection of unmediated ones reads per period
/// ([`crate::store::unmediated::collect`]): 10,000 connections.
const UNMEDIATED_PAGES: usize = 20;

/// The node's bound sockets.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
    pub cluster: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of a `[[node]]` entry. An address whose socket the process was
    /// handed already bound and listening (`inherited`: systemd socket activation, see
    /// [`inherited_listeners`]) is used as it is, so connections wait in its backlog across a
    /// restart instead of being refused; an inherited socket that is none of the entry's
    /// addresses is an error (the unit and `cluster.toml` disagree).
    pub fn bind(node: &NodeEntry, mut inherited: Vec<TcpListener>) -> Result<Listeners, ListenError> {
        let mut take = |a: &str| -> Result<TcpListener, ListenError> {
            let wanted: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(a)
                .map_err(|e| ListenError::Bind(std::io::Error::new(e.kind(), format!("cannot bind {a}: {e}"))))?
                .collect();
            let held = inherited
                .iter()
                .position(|l| l.local_addr().is_ok_and(|b| wanted.contains(&b)));
            match held {
                Some(i) => Ok(inherited.swap_remove(i)),
                None => TcpListener::bind(a)
                    .map_err(|e| ListenError::Bind(std::io::Error::new(e.kind(), format!("cannot bind {a}: {e}")))),
            }
        };
        let listeners = Listeners {
            public: take(&node.listen)?,
            admin: take(&node.admin)?,
            cluster: node.cluster.as_deref().map(&mut take).transpose()?,
        };
        if let Some(l) = inherited.first() {
            let at = l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
            return Err(ListenError::Unmatched(format!(
                "an inherited socket (LISTEN_FDS) listens on {at}, which is none of node {}'s addresses (listen {}, admin {}, cluster {})",
                node.id,
                node.listen,
                node.admin,
                node.cluster.as_deref().unwrap_or("none")
            )));
        }
        Ok(listeners)
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("a bound listener has an address")
    }
}

/// Why the node's sockets could not be set up.
#[derive(Debug)]
pub enum ListenError {
    /// An address could not be bound (in use, not local, no permission).
    Bind(std::io::Error),
    /// The sockets handed to the process do not fit the configuration.
    Unmatched(String),
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenError::Bind(e) => e.fmt(f),
            ListenError::Unmatched(m) => f.write_str(m),
        }
    }
}

/// The listening TCP sockets handed to this process by its service manager (systemd's
/// `LISTEN_FDS`/`LISTEN_PID`, from fd 3). Read once, at start-up, before any thread runs: it
/// clears those variables from the environment.
pub fn inherited_listeners() -> Result<Vec<TcpListener>, ListenError> {
    let mut fds = listenfd::ListenFd::from_env();
    (0..fds.len())
        .map(|i| match fds.take_tcp_listener(i) {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(ListenError::Unmatched(format!(
                "inherited fd {} (LISTEN_FDS) was already taken",
                3 + i
            ))),
            Err(e) => Err(ListenError::Unmatched(format!(
                "inherited fd {} (LISTEN_FDS) is not a listening TCP socket: {e}",
                3 + i
            ))),
        })
        .collect()
}

/// Opens the store the config names.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.store.backend.as_str() {
        "postgres" => {
            let url = cfg.store.url.as_deref().context("store.url is required for postgres")?;
            Ok(store::open_postgres_with(url, cfg.store.pool_size, cfg.store.statement_timeout()).await?)
        }
        _ => {
            if let Some(w) = crate::config::queued_memory_warning(&cfg.store, crate::config::memory_available()) {
                tracing::warn!("{w}");
            }
            Ok(store::open_sled_with(
                &cfg.store.path,
                cfg.store.sled_cache_mib << 20,
                cfg.store.min_free_disk_mib << 20,
                cfg.store.max_queued_messages,
            )
            .await?)
        }
    }
}

/// What a node is started with besides its config and listeners.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// Use this store instead of opening the config's (several in-process nodes share one).
    pub store: Option<Arc<dyn Store>>,
    /// The file the config came from: SIGHUP and `POST /reload` re-read its peer list.
    pub config_path: Option<std::path::PathBuf>,
}

/// `step`, or what `stop` resolves to if it resolves first (a stop already asked wins).
async fn unless_stopped<T, S>(step: impl Future<Output = T>, stop: Pin<&mut impl Future<Output = S>>) -> Result<T, S> {
    tokio::select! {
        biased;
        s = stop => Err(s),
        t = step => Ok(t),
    }
}

/// Set when [`run`] returned because a stop came while the node started: the store's open
/// may still be running on a blocking thread (sled replaying its queue log, say), and the
/// runtime's drop would wait for it, the process up and deaf to a second signal. The binary
/// then exits at once instead (`main.rs`).
pub static STOPPED_STARTING: AtomicBool = AtomicBool::new(false);

/// A stop asked for while the node started, before it marked the store as running
/// ([`Store::begin_run`]) and served anything: what had started stops (the cluster is left, the
/// push worker stopped, the store flushed) and the node ends as a stop does, `Ok`. The store's
/// mark is the run before's, untouched, and a release of the leases of before the restart that
/// the stop cut short is the next start's to do.
async fn stopped_starting(
    node_id: &str,
    cause: impl std::fmt::Display,
    store: Option<&Arc<dyn Store>>,
    cluster: Option<&ClusterHandle>,
    shared: Option<&Shared>,
) -> anyhow::Result<()> {
    tracing::info!(node = node_id, "{cause} received during start-up: stopping");
    STOPPED_STARTING.store(true, Ordering::SeqCst);
    if let Some(c) = cluster {
        c.leave().await;
    }
    if let Some(p) = shared.and_then(|s| s.push.get()) {
        let _ = tokio::time::timeout(crate::push::STOP_GRACE + Duration::from_secs(1), p.stop()).await;
    }
    if let Some(s) = store {
        match tokio::time::timeout(STOP_TAIL, s.flush()).await {
            Ok(r) => r?,
            Err(_) => tracing::warn!("the store's flush did not finish within {STOP_TAIL:?}"),
        }
    }
    tracing::info!(node = node_id, "stopped during start-up");
    Ok(())
}

/// Runs one node until `shutdown` resolves (to what asked for the stop: `SIGTERM`, say); one
/// that resolves while the node starts stops the start. Must be called inside an actix
/// `System`.
pub async fn run(
    cfg: Config,
    node_id: &str,
    listeners: Listeners,
    opts: NodeOptions,
    shutdown: impl Future<Output = impl std::fmt::Display>,
    ready_flag: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    // First: opening the store may take a while, and until a handler is in place a SIGHUP (an
    // operator adding a node: `scripts/cluster.sh reload`) ends the process, its default
    // action. One that comes while the node starts is handled once it runs. (SIGTERM's and
    // SIGINT's handlers are in place already: `signals::shutdown_signal` installs them as it
    // makes `shutdown`, which the start races its waits against.)
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let mut shutdown = std::pin::pin!(shutdown);
    let store = opts.store.clone();
    let cfg = Arc::new(cfg);
    let node = cfg.node(node_id)?.clone();
    let metrics = Arc::new(Metrics::new());
    let store = match store {
        Some(s) => s,
        // PostgreSQL's pool connect and migrations, sled's wait for its file lock.
        None => match unless_stopped(open_store(&cfg), shutdown.as_mut()).await {
            Ok(s) => s?,
            Err(cause) => return stopped_starting(node_id, cause, None, None, None).await,
        },
    };
    let store = crate::store::metered::Metered::wrap(store, metrics.store_latency.clone());
    // The store below the route cache, which passes on only the methods it lists: the run's
    // mark and the wallets owed a wake-up are asked of this one.
    let unrouted = store.clone();
    // Wake-ups of the wallets owed one after a failed peer, not finished ([`take_over`]).
    let owing = Arc::new(AtomicUsize::new(0));
    // Routes cached on this node; peers' keylist removals reach it as cluster frames.
    let routes = crate::store::route_cache::RouteCache::wrap(store);
    let store: Arc<dyn Store> = routes.clone();
    let candidate = MediatorKeys::generate().to_identity(now_ms());
    let identity = match unless_stopped(store.identity_get_or_create(candidate), shutdown.as_mut()).await {
        Ok(i) => i?,
        Err(cause) => return stopped_starting(node_id, cause, Some(&store), None, None).await,
    };
    let keys = MediatorKeys::from_identity(&identity).map_err(anyhow::Error::msg)?;
    let public_addr = listeners.public_addr();
    let public_url = cfg.public_url(&node, Some(public_addr));
    if let Some(why) = cfg.advertised_url_problem(public_addr) {
        tracing::warn!(%public_url, "cluster.public_url is not set: {why}; set cluster.public_url or MAILROOM_PUBLIC_URL to the address wallets use");
    }
    let mediator = Arc::new(Mediator::new(store.clone(), keys, &cfg, node_id, &public_url));

    // Cluster: every other [[node]] is a peer.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel::<ClusterEvent>(4096);
    let cluster_addr = listeners.cluster.as_ref().map(|l| l.local_addr()).transpose()?;
    let cluster = match listeners.cluster {
        Some(l) => {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            let cc = cluster_config(&cfg, node_id)?;
            Some(ClusterHandle::start(cc, l, events_tx).await?)
        }
        None => None,
    };
    if let Some(c) = &cluster {
        let c = c.clone();
        routes.set_publisher(Box::new(move |conn, keys| {
            c.routes_changed(conn, keys);
        }));
    }
    let registry = Registry::new(cluster.clone()).start();
    let bound = Arc::new(crate::registry::LocalHolders::default());
    let _ = mediator.holders.set(Arc::new(crate::session::NodeHolders {
        node_id: node_id.to_string(),
        cluster: cluster.clone(),
        local: bound.clone(),
        strategy: cfg.delivery.strategy,
        registry: registry.clone(),
    }));
    // Agents' endpoints must not reach an admin or cluster listener of this cluster (this
    // node's, bound where they are even when the config says port 0, and every [[node]]'s), the
    // store, nor metadata services.
    let admin_addr = listeners.admin.local_addr()?;
    let egress = crate::session::egress::Egress::new(
        crate::session::egress::EgressPolicy::for_node(&cfg, admin_addr, cluster_addr),
        Duration::from_millis(cfg.delivery.endpoint_timeout_ms),
        &cfg.delivery.extra_roots().map_err(std::io::Error::other)?,
    )
    .map_err(std::io::Error::other)?;
    let shared = Arc::new(Shared::new(
        mediator.clone(),
        registry.clone(),
        cluster.clone(),
        cfg.clone(),
        metrics.clone(),
        bound,
        egress,
    ));

    // Push notifications wake wallets that no node holds a session of.
    if let Some(pc) = &cfg.push {
        let settings = pc.load().map_err(anyhow::Error::msg)?;
        let handle = crate::push::start(
            settings,
            crate::push::Deps {
                store: store.clone(),
                presence: Arc::new(crate::session::NodePresence {
                    registry: registry.clone(),
                    cluster: cluster.clone(),
                }),
                metrics: metrics.push.clone(),
                node_id: node_id.to_string(),
                keep_windows_ms: crate::session::notified_wake_after_ms(&cfg)
                    .saturating_add(cfg.cluster.failure_timeout_ms as i64),
            },
        )
        .map_err(anyhow::Error::msg)?;
        let _ = shared.push.set(handle);
    }

    // Messages this node's sessions were delivering, or were handed, before it last stopped
    // (a crash, or a shutdown that could not reach the store), never acknowledged: deliverable
    // again now rather than when their leases run out, and their wallets woken or pushed. Every
    // owner of this node is `<id>/...`: the node waits for the release before it serves (so it
    // never takes a lease of its own new sessions), for at most START_RELEASE_WAIT, so that a
    // slow store does not hold the start up; the release goes on past that, and wakes what it
    // released itself. The wallets are woken once the cluster's directory has had a failure
    // timeout to learn where their sessions are: sooner, one that reconnected to a peer
    // meanwhile would be pushed.
    let settle = match &cluster {
        Some(_) => Duration::from_millis(cfg.cluster.failure_timeout_ms),
        None => Duration::ZERO,
    };
    {
        let prefix = crate::protocols::node_owners(node_id);
        // Only the leases of before this run: past `START_RELEASE_WAIT` this run serves while
        // the release goes on, and its own leases, under the same owner names, run out later.
        // (A hand-off a peer leased here for longer, its `lease_ms` longer than ours, is left
        // to run out: later, not lost.)
        let taken_before = now_ms().saturating_add(shared.mediator.lease_ms);
        let (released_tx, released_rx) = tokio::sync::oneshot::channel::<()>();
        let s = shared.clone();
        actix_rt::spawn(async move {
            let released = s.mediator.store.release_owners_under(&prefix, taken_before).await;
            let _ = released_tx.send(());
            match released {
                Ok(conns) if conns.is_empty() => {}
                Ok(conns) => {
                    tracing::info!(
                        wallets = conns.len(),
                        "deliveries this node had in flight before it restarted are deliverable again"
                    );
                    tokio::time::sleep(settle).await;
                    wake_lost_sessions(s, conns).await;
                }
                Err(e) => tracing::warn!("deliveries of before the restart not released (their leases run out): {e}"),
            }
        });
        // A stop during this wait leaves the release to finish (or not) as the process ends:
        // what it does not release, the next start does.
        match unless_stopped(tokio::time::timeout(START_RELEASE_WAIT, released_rx), shutdown.as_mut()).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => tracing::warn!("the release of this node's deliveries of before the restart takes over {START_RELEASE_WAIT:?}: serving meanwhile"),
            Err(cause) => return stopped_starting(node_id, cause, Some(&store), cluster.as_ref(), Some(shared.as_ref())).await,
        }
    }

    // From here the start does not wait on the stop: `begin_run` marks the store (cut short, it
    // would leave unknown whether it did, and lose what the run before left owed), and what
    // follows waits on nothing. A stop asked for meanwhile is the ordinary stop below, once the
    // node serves, which clears the mark when the run owes nothing.

    // A store that keeps deliveries in memory (sled) has nothing in flight after a crash to
    // release: the run that ended without its stop left the wallets whose sessions were live
    // with mail delivered and not acknowledged, or not delivered yet, and woken by nobody
    // (their sockets died with it; an offline wallet wakes for a push). Every wallet with mail
    // pending is woken or pushed (sled's `begin_run` forgets when its push windows last
    // pushed, keeping their trailing pushes: a wallet pushed just before the crash is pushed
    // again at once). A clean stop gave its deliveries back and pushed
    // for them: nothing to do then. The mark stays until a stop that owes no wallet anything.
    //
    // PostgreSQL marks each node's run apart (by its id), and its leases outlived the run
    // (released above); what the run left in its memory only are push events not yet written
    // to their windows: the wallets owed a wake-up are woken ([`crate::session::owed`]).
    let tracks_owed = store.backend() == "postgres";
    let (run_begun, previous_run) = match unrouted.begin_node_run(node_id).await {
        Ok(run) => (true, run),
        Err(e) => {
            tracing::warn!("the store did not say how the run before this one ended (this run not marked): {e}");
            (false, None)
        }
    };
    let _ = shared.previous_run.set(previous_run);
    if previous_run == Some(true) {
        if tracks_owed {
            tracing::warn!("the run before this one did not stop cleanly (a crash, kill -9, power lost): waking the wallets owed a wake-up");
        } else {
            tracing::warn!("the run before this one did not stop cleanly (a crash, kill -9, power lost): waking every wallet with mail pending");
        }
        shared.wake_owed.store(true, Ordering::SeqCst);
        let s = shared.clone();
        let unrouted = unrouted.clone();
        actix_rt::spawn(async move {
            tokio::time::sleep(settle).await;
            let (woken, complete) = crate::session::owed::wake_after_unclean_stop(&s, &unrouted).await;
            if complete {
                s.wake_owed.store(false, Ordering::SeqCst);
            }
            tracing::info!(wallets = woken, complete, "wallets woken after the unclean stop");
        });
    }

    // Notifications from peers wake local sessions; the store holds the messages.
    {
        let shared = shared.clone();
        let routes = routes.clone();
        let (unrouted, owing) = (unrouted.clone(), owing.clone());
        actix_rt::spawn(async move {
            while let Some(ev) = events_rx.recv().await {
                match ev {
                    ClusterEvent::MessageQueued { conn } => notified(&shared, conn).await,
                    ClusterEvent::PeerUp { node } => {
                        tracing::info!(peer = %node, "peer up");
                        shared.peer_up(&node);
                    }
                    ClusterEvent::PeerDown { node, taken_over_here } => {
                        tracing::warn!(peer = %node, "peer down");
                        let conns = shared.peer_down(&node, taken_over_here);
                        if !conns.is_empty() {
                            tracing::info!(peer = %node, wallets = conns.len(), "waking the wallets whose mail was notified to a peer now down");
                            let s = shared.clone();
                            shared.tracked.spawn(async move { s.wake_notified(conns).await });
                        }
                    }
                    ClusterEvent::SessionsLost {
                        node,
                        conns,
                        release_leases,
                    } => {
                        tracing::info!(node = %shared.mediator.node_id, peer = %node, sessions = conns.len(), release_leases, "taking over the sessions a failed or restarted peer left");
                        owing.fetch_add(1, Ordering::SeqCst);
                        actix_rt::spawn(take_over(
                            shared.clone(),
                            node,
                            conns,
                            release_leases,
                            unrouted.clone(),
                            owing.clone(),
                        ));
                    }
                    ClusterEvent::SessionMoved { conn, node } => {
                        tracing::debug!(connection = %conn, to = %node, "session moved");
                        let _ = shared.registry.send(SessionMoved { conn }).await;
                    }
                    ClusterEvent::RoutesChanged { conn, keys } => routes.forget(&conn, &keys),
                    ClusterEvent::Delivered { conn, msgs, held } => {
                        let msgs = msgs
                            .into_iter()
                            .map(|m| crate::store::QueuedMessage {
                                id: m.id,
                                connection: conn.clone(),
                                recipient_key: m.recipient_key,
                                payload: m.payload,
                                received_at_ms: m.received_at_ms,
                                attempts: 1,
                            })
                            .collect();
                        // Off this loop (a session writing to a slow socket takes them
                        // late), in the order the link read them.
                        let node = shared.mediator.node_id.clone();
                        shared.hand_off_held_in_order(crate::protocols::Handed { node, conn, msgs }, held);
                    }
                    ClusterEvent::HandOffReturned { node, conn, ids } => {
                        let s = shared.clone();
                        shared
                            .tracked
                            .spawn(async move { s.hand_back(&node, &conn, &ids).await });
                    }
                    ClusterEvent::CloseSessions { conn, reason } => {
                        let _ = shared
                            .registry
                            .send(CloseConn {
                                conn,
                                code: crate::admin::OPERATOR_CLOSE_CODE,
                                reason,
                                except: None,
                            })
                            .await;
                    }
                }
            }
        });
    }

    // The sweep: bounded delay for lost notifications and expired leases.
    {
        let shared = shared.clone();
        let every = Duration::from_millis(cfg.delivery.sweep_interval_ms);
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                shared.sweep(n % crate::session::ENDPOINT_RETRY_EVERY == 0).await;
                shared.reclaim_expired_leases().await;
            }
        });
    }

    // Dedup and replay records outlive their window by at most one period (a bounded batch at
    // a time): memory and disk stay flat under steady traffic.
    {
        let shared = shared.clone();
        let window_ms = cfg.limits.dedup_window_ms();
        let every = Duration::from_millis((window_ms as u64 / 4).clamp(100, 5_000));
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let store = &shared.mediator.store;
                loop {
                    match store
                        .prune_dedup(now_ms().saturating_sub(window_ms), DEDUP_PRUNE_BATCH)
                        .await
                    {
                        Ok(n) if n as usize == DEDUP_PRUNE_BATCH => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!("dedup pruning: {e}");
                            break;
                        }
                    }
                }
                if let Ok(n) = store.dedup_records().await {
                    shared.metrics.dedup_records.set(n as i64);
                }
                // Replay records, as they run out (`limits.replay_window_secs`).
                loop {
                    match store.prune_sights(now_ms(), DEDUP_PRUNE_BATCH).await {
                        Ok(n) if n as usize == DEDUP_PRUNE_BATCH => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!("replay record pruning: {e}");
                            break;
                        }
                    }
                }
            }
        });
    }

    // Connections nobody mediates for (`limits.unmediated_connection_ttl_secs`): a page walk
    // per period, going round all of them.
    if cfg.limits.unmediated_connection_ttl_secs > 0 {
        let shared = shared.clone();
        let ttl_ms = cfg.limits.unmediated_connection_ttl_ms();
        let every = Duration::from_millis((ttl_ms as u64 / 4).clamp(100, 60_000));
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut cursor = None;
            loop {
                tick.tick().await;
                let before = now_ms().saturating_sub(ttl_ms);
                let store = shared.mediator.store.as_ref();
                match crate::store::unmediated::collect(store, &mut cursor, before, UNMEDIATED_PAGES).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "removed connections that never asked for mediation"),
                    Err(e) => tracing::warn!("collecting unmediated connections: {e}"),
                }
            }
        });
    }

    // The sender's expiry (DIDComm v2 `expires_time`): expired messages are never leased; this
    // deletes them (a bounded batch at a time) and counts them.
    {
        let shared = shared.clone();
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(EXPIRY_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                loop {
                    match shared.mediator.store.expire_due(now_ms(), EXPIRY_BATCH).await {
                        Ok(0) => break,
                        Ok(n) => {
                            shared.metrics.expired_by_sender.inc_by(n);
                            tracing::info!(expired = n, "dropped queued messages past their expires_time");
                            if (n as usize) < EXPIRY_BATCH {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                        Err(e) => {
                            tracing::warn!("expires_time sweep: {e}");
                            break;
                        }
                    }
                }
            }
        });
    }

    // Message time-to-live.
    if cfg.limits.message_ttl_secs > 0 {
        let shared = shared.clone();
        let ttl_ms = cfg.limits.message_ttl_ms();
        let every = Duration::from_millis((ttl_ms as u64 / 4).clamp(100, 60_000));
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match shared.mediator.store.expire(now_ms().saturating_sub(ttl_ms)).await {
                    Ok(0) => {}
                    Ok(n) => {
                        shared.metrics.expired.inc_by(n);
                        tracing::info!(expired = n, "expired queued messages past their time-to-live");
                    }
                    Err(e) => tracing::warn!("expiry sweep: {e}"),
                }
            }
        });
    }

    let public_server = crate::session::listener::serve(
        shared.clone(),
        listeners.public,
        Duration::from_millis(cfg.limits.client_timeout_ms),
        SHUTDOWN_GRACE,
    )?;
    let public_handle = public_server.handle();
    let reloader = Arc::new(Reloader::new(
        opts.config_path.clone(),
        node_id,
        cluster.clone(),
        shared.cfg.clone(),
        shared.egress.clone(),
    ));
    let admin_state = Arc::new(AdminState::new(
        shared.clone(),
        ready_flag.clone(),
        admin_addr,
        reloader.clone(),
    ));
    admin::spawn_history_sampler(admin_state.clone());
    // SIGHUP re-reads the peer list (scaling by adding nodes without a restart).
    {
        let reloader = reloader.clone();
        actix_rt::spawn(async move {
            let mut hup = match hup {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("SIGHUP not handled (reload with POST /reload): {e}");
                    return;
                }
            };
            while hup.recv().await.is_some() {
                // Off this thread: a reload reads files and test-signs push credentials.
                let r = reloader.clone();
                let reloaded = actix_web::web::block(move || r.reload())
                    .await
                    .unwrap_or_else(|e| Err(anyhow::anyhow!("reload task: {e}")));
                match reloaded {
                    Ok(r) => tracing::info!(
                        peers = r.peers,
                        secret_changed = r.secret_changed,
                        "SIGHUP: peer list reloaded"
                    ),
                    Err(e) => tracing::error!("SIGHUP: reload refused, peers unchanged: {e}"),
                }
            }
        });
    }
    // Slow clients and the connection cap as on the public listener (see admin::serve).
    let admin_server = admin::serve(
        admin_state.clone(),
        listeners.admin,
        Duration::from_millis(cfg.limits.client_timeout_ms),
    )?;
    let admin_handle = admin_server.handle();
    let public_task = actix_rt::spawn(public_server);
    let admin_task = actix_rt::spawn(admin_server);
    ready_flag.store(true, Ordering::SeqCst);
    tracing::info!(node = node_id, public = %public_addr, admin = %admin_addr, store = store.backend(), "mailroom node ready");
    println!("mailroom node {node_id} listening on http://{public_addr} (admin http://{admin_addr})");
    println!(
        "invitation: {}",
        crate::protocols::oob::invitation_url(&mediator, &crate::protocols::oob::public_invitation(&mediator))
    );
    println!(
        "invitation (DIDComm v2): {}",
        crate::protocols::v2::invitation_url(&mediator, &crate::protocols::v2::invitation(&mediator))
    );

    let cause = shutdown.await;
    tracing::info!("{cause} received");

    // Ordered teardown: stop accepting sockets, close sessions with 1001 so wallets reconnect
    // elsewhere, leave the cluster, finish in-flight requests and pushes, hand leases back,
    // flush.
    tracing::info!(node = node_id, "shutting down");
    let end = tokio::time::Instant::now() + STOP_DEADLINE;
    // The phases end in time to leave the last steps (flush, the clean end's record) theirs.
    let deadline = end - STOP_TAIL;
    // A phase's grace, or what is left of the phases' deadline when that is less.
    let grace = |phase: Duration| phase.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    ready_flag.store(false, Ordering::SeqCst);
    shared.begin_stop();
    shared.tracked.move_to_main();
    shared.draining.store(true, Ordering::SeqCst);
    let closed = registry
        .send(CloseAll {
            code: 1001,
            reason: "mediator node shutting down: reconnect".into(),
            for_good: true,
        })
        .await
        .unwrap_or(0);
    tracing::info!(sessions = closed, "sessions closed");
    // The closed sockets' requests (a forward read from a socket, still being stored) and
    // give-backs end before the listeners stop: they run on the workers, which stop as soon
    // as their connections end. Each socket's slot is held until both are done.
    let mut owes = false;
    let sockets_done = async {
        while shared.open_sockets.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let g = grace(SHUTDOWN_GRACE);
    if tokio::time::timeout(g, sockets_done).await.is_err() {
        owes = true;
        tracing::warn!("sockets' requests and give-backs not all finished within {g:?}");
    }
    // What requests and sockets started on the workers before the stop (wake-ups, hand-offs,
    // give-backs) ends before the workers stop; what they start from now on runs here.
    let g = grace(SHUTDOWN_GRACE);
    if !shared.tracked.idle_on_workers(g).await {
        owes = true;
        tracing::warn!("tasks on the workers not all finished within {g:?}");
    }
    if let Some(c) = &cluster {
        c.leave().await;
    }
    // The servers bound their own stop (`shutdown_timeout`); what is left of the deadline
    // bounds it too. Past it the node goes on and its exit ends their connections.
    let servers = async {
        public_handle.stop(true).await;
        admin_handle.stop(true).await;
        let _ = public_task.await;
        let _ = admin_task.await;
    };
    let g = grace(SHUTDOWN_GRACE);
    if tokio::time::timeout(g, servers).await.is_err() {
        owes = true;
        tracing::warn!("HTTP requests not all finished within {g:?}");
    }
    // After the last request: what it delivered over HTTP and was not acknowledged goes back,
    // and those wallets are woken or pushed (a peer taking over may have released them first,
    // and pushes then), before the push worker stops.
    let give_back = async {
        match store.release_owners_under(&shared.http_owner(), i64::MAX).await {
            Ok(conns) => wake_lost_sessions(shared.clone(), conns).await,
            Err(e) => tracing::warn!("leases not released on shutdown (they run out, and are taken back): {e}"),
        }
    };
    owes |= shared.wake_owed.load(Ordering::SeqCst);
    let g = grace(SHUTDOWN_GRACE);
    if tokio::time::timeout(g, give_back).await.is_err() {
        owes = true;
        tracing::warn!("HTTP deliveries not all given back within {g:?} (their leases run out, and are taken back)");
    }
    // What the last requests and sockets started (wake-ups of the wallets their forwards
    // queued for, hand-offs, give-backs) ran on this arbiter, not the stopped workers': it
    // finishes before the push worker stops, or the stop owes.
    let g = grace(SHUTDOWN_GRACE);
    if !shared.tracked.idle(g).await {
        owes = true;
        tracing::warn!(
            running = shared.tracked.running(),
            "wake-ups and give-backs not all finished within {g:?}"
        );
    }
    // Every forward the last request accepted has handed its event over, and the pushes
    // already started go out before it leaves (within `push::STOP_GRACE`, or what is left of
    // the deadline; a push abandoned then is another node's once its claim runs out).
    if let Some(p) = shared.push.get() {
        let g = grace(crate::push::STOP_GRACE + Duration::from_secs(1));
        owes |= !tokio::time::timeout(g, p.stop()).await.unwrap_or(false);
    }
    // What is left of the whole stop's deadline, at least a second.
    let tail = || {
        end.saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(1))
    };
    match tokio::time::timeout(tail(), store.flush()).await {
        Ok(r) => r?,
        Err(_) => {
            owes = true;
            tracing::warn!("the store's flush did not finish within the stop's deadline");
        }
    }
    // Last, and only when no wallet is owed a wake-up (the start-up one unfinished, a push
    // abandoned, a give-back unfinished, one after a failed peer unfinished) and the run was
    // marked: a stop that fails before this, or that owes, leaves the run marked, and the next
    // start (of this node, on PostgreSQL) wakes every wallet with mail pending (sled) or every
    // wallet owed a wake-up (PostgreSQL).
    // (Read last: a take-over that began during the stop ends at once, unfinished.)
    owes |= owing.load(Ordering::SeqCst) > 0;
    let next_start = if tracks_owed {
        "the next start of this node wakes the wallets owed a wake-up"
    } else {
        "the next start wakes every wallet with mail pending"
    };
    if !run_begun {
        tracing::warn!("this run was not marked in the store (its start failed to): its stop is not recorded");
    } else if owes {
        tracing::warn!("the store is left marked as running: {next_start}");
    } else {
        match tokio::time::timeout(tail(), unrouted.end_node_run(node_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the clean stop not recorded ({next_start}): {e}"),
            Err(_) => tracing::warn!("the clean stop not recorded within the stop's deadline ({next_start})"),
        }
    }
    if let Some(c) = &cluster {
        c.shutdown().await;
    }
    tracing::info!(node = node_id, "stopped");
    Ok(())
}

/// Re-reads the config file and applies what can change while the node runs: the `[[node]]`
/// list (new peers are dialled, removed ones forgotten, existing links and sessions
/// untouched), the cluster secret (a rotation: every link is opened again with it), and the
/// admin token and its label (a leaked token is replaced without a restart). Every other
/// setting the file changes is named in [`Reloaded::restart_needed`], never silently dropped.
pub struct Reloader {
    path: Option<std::path::PathBuf>,
    node_id: String,
    cluster: Option<ClusterHandle>,
    /// The config the node started with: what the file changes is compared with it.
    started: Arc<Config>,
    /// What reloads applied, as the admin listener reads it.
    live: parking_lot::RwLock<Live>,
    /// Held for a whole reload, read to applied: one that read an older file never finishes
    /// after one that read a newer one.
    one_at_a_time: parking_lot::Mutex<()>,
    /// The new nodes' admin listeners join the addresses endpoints may not reach.
    egress: Arc<crate::session::egress::Egress>,
}

/// The settings in force that a reload changes besides the cluster's own.
#[derive(Clone)]
pub struct Live {
    /// `[admin]`: the token guarding the admin listener and who it stands for.
    pub admin: crate::config::AdminSection,
    /// `[[node]]`: whose histories the status page gathers.
    pub nodes: Vec<crate::config::NodeEntry>,
}

/// What a reload did.
#[derive(Debug, serde::Serialize)]
pub struct Reloaded {
    /// Peers now configured.
    pub peers: usize,
    /// The file's `cluster.secret` (or `secret_env`'s variable) differed from the one in use:
    /// it is in use now, and every link was closed to be opened again with it.
    pub secret_changed: bool,
    /// The admin token (or its label) changed: requests with the old one are refused from now.
    pub admin_token_changed: bool,
    /// Settings the file changes that a reload does not apply, by their names in the file
    /// (`section.key`, or `node.<this node>` for its own addresses): they take effect when the
    /// node restarts.
    pub restart_needed: Vec<String>,
}

impl Reloader {
    pub fn new(
        path: Option<std::path::PathBuf>,
        node_id: &str,
        cluster: Option<ClusterHandle>,
        started: Arc<Config>,
        egress: Arc<crate::session::egress::Egress>,
    ) -> Reloader {
        let live = Live {
            admin: started.admin.clone(),
            nodes: started.nodes.clone(),
        };
        Reloader {
            path,
            node_id: node_id.to_string(),
            cluster,
            started,
            live: parking_lot::RwLock::new(live),
            one_at_a_time: parking_lot::Mutex::new(()),
            egress,
        }
    }

    /// The settings in force (the start's, or the last reload's).
    pub fn live(&self) -> Live {
        self.live.read().clone()
    }

    /// The admin token in force, if one guards the listener.
    pub fn admin_token(&self) -> Option<String> {
        self.live.read().admin.token.clone().filter(|t| !t.is_empty())
    }

    /// Applies the file: see [`Reloader`]. A file that does not load changes nothing.
    pub fn reload(&self) -> anyhow::Result<Reloaded> {
        let _one = self.one_at_a_time.lock();
        let path = self
            .path
            .as_ref()
            .context("this node was not started from a config file")?;
        // The same environment overrides as at start, read the same way (a token or secret
        // may live only there).
        let (mut cfg, _, _) = Config::load_for_node(Some(path), Some(&self.node_id), crate::config::env_var)
            .with_context(|| format!("the new file, for this node ({})", self.node_id))?;
        // Fitted to the open-file limit as at start (`mailroom run`), or every reload would
        // call the lowered `limits.max_sessions` a change.
        if let Some(open_files) = self.started.limits.fitted_to_open_files {
            cfg.fit_sessions_to(open_files);
        }
        token_kept_off_loopback(&self.started, &self.node_id, &cfg)?;
        let cc = match &self.cluster {
            Some(_) => Some(cluster_config(&cfg, &self.node_id)?),
            None => None,
        };
        let restart_needed = not_applied(&self.started, &cfg, &self.node_id);
        if !restart_needed.is_empty() {
            tracing::warn!(
                settings = ?restart_needed,
                "reload: these settings changed in the file and take effect at the next restart"
            );
        }
        self.egress.refuse_nodes(&cfg.nodes);
        let admin_token_changed = {
            let mut live = self.live.write();
            let changed = live.admin.token != cfg.admin.token || live.admin.token_label != cfg.admin.token_label;
            live.admin = cfg.admin.clone();
            live.nodes = cfg.nodes.clone();
            changed
        };
        if admin_token_changed {
            tracing::warn!("reload: the admin token changed; the old one is refused from now on");
        }
        let (mut peers, mut secret_changed) = (0, false);
        if let (Some(cluster), Some(cc)) = (&self.cluster, cc) {
            peers = cc.peers.len();
            cluster.update_peers(cc.peers);
            secret_changed = cluster.set_secret(&cc.secret);
            if secret_changed {
                tracing::warn!("reload: the cluster secret changed; every cluster link was closed and links again only with nodes that have the new secret");
            }
        }
        Ok(Reloaded {
            peers,
            secret_changed,
            admin_token_changed,
            restart_needed,
        })
    }
}

/// Refuses a reload that would leave the admin listener without a token where it is bound
/// off loopback: it stays where it was bound (`started`'s address) until a restart, whatever
/// address the new file gives it, and the guard of a tokenless listener (its `Host` header)
/// is the client's to choose.
fn token_kept_off_loopback(started: &Config, node_id: &str, new: &Config) -> anyhow::Result<()> {
    let bound = started.nodes.iter().find(|n| n.id == node_id).map(|n| n.admin.as_str());
    let off_loopback = bound
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .is_some_and(|a| !a.ip().is_loopback());
    if off_loopback && new.admin.token.as_deref().map_or(true, str::is_empty) {
        anyhow::bail!(
            "the admin listener is bound at {} (not loopback) until a restart: a reload cannot take its token away",
            bound.unwrap_or("?")
        );
    }
    Ok(())
}

/// The settings `new` changes from `started` that a reload does not apply, by their names in
/// the file: every key of every section but the cluster secret and the admin token (applied),
/// and this node's own `[[node]]` entry (its listeners); the other nodes' entries are the
/// peers, applied. Values are compared, never shown (some are secrets).
fn not_applied(started: &Config, new: &Config, node_id: &str) -> Vec<String> {
    const APPLIED: [&str; 4] = [
        "cluster.secret",
        "cluster.secret_env",
        "admin.token",
        "admin.token_label",
    ];
    let table = |c: &Config| match toml::Value::try_from(c) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::map::Map::new(),
    };
    let (old, new_t) = (table(started), table(new));
    let mut changed = Vec::new();
    let sections: std::collections::BTreeSet<&String> = old.keys().chain(new_t.keys()).collect();
    for section in sections.into_iter().filter(|s| *s != "node") {
        match (old.get(section), new_t.get(section)) {
            (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    let name = format!("{section}.{k}");
                    if a.get(k) != b.get(k) && !APPLIED.contains(&name.as_str()) {
                        changed.push(name);
                    }
                }
            }
            (a, b) if a != b => changed.push(section.clone()),
            _ => {}
        }
    }
    let own = |c: &Config| {
        c.nodes
            .iter()
            .find(|n| n.id == node_id)
            .map(|n| (n.listen.clone(), n.cluster.clone(), n.admin.clone()))
    };
    if own(started) != own(new) {
        changed.push(format!("node.{node_id}"));
    }
    changed
}

/// The cluster settings of one node: every other `[[node]]` is a peer
/// ([`Config::cluster_config`], which validation runs for every node with a cluster address).
pub fn cluster_config(cfg: &Config, node_id: &str) -> anyhow::Result<ClusterConfig> {
    Ok(cfg.cluster_config(node_id)?)
}

/// A node running on its own thread and actix system (tests, benchmarks).
pub struct RunningNode {
    pub node_id: String,
    pub public_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub cluster_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl RunningNode {
    pub fn public_url(&self) -> String {
        format!("http://{}", self.public_addr)
    }
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Graceful shutdown; waits for the node's thread.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("node thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Starts a node on a thread of its own with the given (already bound) listeners; returns
/// once it serves.
pub fn spawn(cfg: Config, node_id: &str, listeners: Listeners, opts: NodeOptions) -> anyhow::Result<RunningNode> {
    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let cluster_addr = listeners.cluster.as_ref().map(|l| l.local_addr()).transpose()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ready = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let id = node_id.to_string();
    let r2 = ready.clone();
    let thread = std::thread::Builder::new()
        .name(format!("mailroom-{id}"))
        .spawn(move || {
            let sys = actix_rt::System::new();
            let started = started_tx.clone();
            let res = sys.block_on(async move {
                let watcher = {
                    let r = r2.clone();
                    actix_rt::spawn(async move {
                        while !r.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        let _ = started.send(Ok(()));
                    })
                };
                let res = run(
                    cfg,
                    &id,
                    listeners,
                    opts,
                    async {
                        let _ = stop_rx.await;
                        "stop request"
                    },
                    r2,
                )
                .await;
                watcher.abort();
                res
            });
            if let Err(e) = &res {
                let _ = started_tx.send(Err(format!("{e:#}")));
            }
            res
        })?;
    match started_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => anyhow::bail!("node {node_id} failed to start: {e}"),
        Err(_) => anyhow::bail!("node {node_id} did not become ready within 60 s"),
    }
    Ok(RunningNode {
        node_id: node_id.to_string(),
        public_addr,
        admin_addr,
        cluster_addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Binds `127.0.0.1:0` listeners for a node in tests and rewrites its entry to match.
pub fn bind_ephemeral(cfg: &mut Config, node_id: &str, with_cluster: bool) -> std::io::Result<Listeners> {
    let l = Listeners {
        public: TcpListener::bind("127.0.0.1:0")?,
        admin: TcpListener::bind("127.0.0.1:0")?,
        cluster: if with_cluster {
            Some(TcpListener::bind("127.0.0.1:0")?)
        } else {
            None
        },
    };
    let entry = NodeEntry {
        id: node_id.to_string(),
        listen: l.public.local_addr()?.to_string(),
        cluster: l
            .cluster
            .as_ref()
            .map(|c| c.local_addr().map(|a| a.to_string()))
            .transpose()?,
        admin: l.admin.local_addr()?.to_string(),
    };
    match cfg.nodes.iter_mut().find(|n| n.id == node_id) {
        Some(n) => *n = entry,
        None => cfg.nodes.push(entry),
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_admin(admin: &str, token: Option<&str>) -> Config {
        let mut c = Config::single_node_default();
        c.nodes[0].admin = admin.into();
        c.admin.token = token.map(Into::into);
        c
    }

    #[test]
    fn a_reload_cannot_take_the_token_of_a_listener_bound_off_loopback() {
        let id = Config::single_node_default().nodes[0].id.clone();
        let started = with_admin("0.0.0.0:9002", Some("t"));
        // The new file moves the listener to loopback (it stays bound where it was) and drops
        // the token: refused.
        let err = token_kept_off_loopback(&started, &id, &with_admin("127.0.0.1:9002", None)).unwrap_err();
        assert!(err.to_string().contains("cannot take its token away"), "{err}");
        assert!(token_kept_off_loopback(&started, &id, &with_admin("0.0.0.0:9002", Some("new"))).is_ok());
        // A listener bound on loopback may go tokenless.
        let started = with_admin("127.0.0.1:9002", Some("t"));
        assert!(token_kept_off_loopback(&started, &id, &with_admin("127.0.0.1:9002", None)).is_ok());
    }

    #[test]
    fn restart_needed_names_what_changed_and_nothing_applied() {
        let id = Config::single_node_default().nodes[0].id.clone();
        let started = Config::single_node_default();
        let mut new = started.clone();
        assert!(not_applied(&started, &new, &id).is_empty());
        new.admin.token = Some("rotated".into());
        new.cluster.secret = Some("rotated".into());
        assert!(not_applied(&started, &new, &id).is_empty(), "applied by the reload");
        new.limits.max_sessions += 1;
        new.delivery.lease_ms += 1;
        new.nodes[0].listen = "127.0.0.1:1".into();
        assert_eq!(
            not_applied(&started, &new, &id),
            ["delivery.lease_ms", "limits.max_sessions", &format!("node.{id}")]
        );
    }
}
