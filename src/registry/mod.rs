//! The per-node registry actor: connection id -> the live sessions on this node.
//!
//! Sessions register once a connection authenticates a message on them with return-route,
//! and unregister on every exit path. The registry wakes a connection's sessions when a
//! message for it is queued (they then drain from the store themselves), and tells the
//! cluster which connections this node owns. It does no store I/O; its handlers never block.
//!
//! Keyed by (connection, session id) so a late unregister of an old session cannot remove a
//! newer one.

use actix::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

use crate::cluster::ClusterHandle;
use crate::store::QueuedMessage;

pub type SessionId = u64;

/// Ask a session to drain its connection's queue.
#[derive(Message, Clone, Copy)]
#[rtype(result = "()")]
pub struct Wake;

/// Ask a session to close ([`Signal::Close`]; graceful shutdown: WebSocket close 1001 so the wallet reconnects
/// to another node).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Close {
    pub code: u16,
    pub reason: String,
}

/// What the registry tells a session, through one recipient per session (every recipient
/// made from an actor's address allocates its own sender state: a session used to register
/// three).
#[derive(Message)]
#[rtype(result = "()")]
pub enum Signal {
    /// [`Wake`].
    Wake,
    /// [`Close`].
    Close(Close),
    /// A newer session on another node owns the connection now: the session stops
    /// delivering (a half-open socket would swallow implicit deliveries) and hands back its
    /// leases.
    Superseded,
    /// Messages queued leased to this node's hand-off owner
    /// ([`crate::protocols::handoff_owner`]): write them out, or release them.
    HandOff(Offered),
}

/// Messages handed to a session ([`Signal::HandOff`]) that the sender can take back until the
/// session takes them: a session runs only when its socket takes bytes, so one whose wallet
/// stopped reading may not take them for a minute or more, and what sat in its mailbox
/// meanwhile (payloads included) would be outside every budget of the node.
#[derive(Clone)]
pub struct Offered(Arc<parking_lot::Mutex<Option<Vec<QueuedMessage>>>>);

impl Offered {
    pub fn new(msgs: Vec<QueuedMessage>) -> Offered {
        Offered(Arc::new(parking_lot::Mutex::new(Some(msgs))))
    }

    /// The messages, if nobody took them yet: the session's, or the sender's taking them back.
    pub fn take(&self) -> Option<Vec<QueuedMessage>> {
        self.0.lock().take()
    }
}

/// The connections this node holds bound sessions of, readable without a message to the
/// registry: the forward handlers ask on every forward ([`crate::protocols::Holders`] on a node
/// without a cluster) and before every wake-up (most forwards are for wallets with no session
/// here, and asking the registry actor cost two cross-thread wake-ups per forward).
///
/// Kept by the sessions themselves, not by the registry: a session counts itself in after its
/// `Register` is sent and before its first drain, and out when it leaves. So a message
/// written before a check that finds no session here is seen by that session's first drain,
/// and a check that finds one is answered by a registry that has the session's `Register`.
/// Counted per session: one socket of a wallet closing leaves the others counted. It may say
/// "held" a moment after the registry let a session go (the wake-up then finds nobody and
/// goes on as before); it never says "not held" while a bound session could miss the wake.
#[derive(Default)]
pub struct LocalHolders(parking_lot::Mutex<HashMap<String, usize>>);

impl LocalHolders {
    pub fn holds(&self, conn: &str) -> bool {
        self.0.lock().contains_key(conn)
    }

    /// A session bound to `conn`: before it first drains the queue.
    pub fn count_in(&self, conn: &str) {
        *self.0.lock().entry(conn.to_string()).or_default() += 1;
    }

    /// A session counted in for `conn` left it (closed, rebound or superseded).
    pub fn count_out(&self, conn: &str) {
        let mut m = self.0.lock();
        if let Some(n) = m.get_mut(conn) {
            *n -= 1;
            if *n == 0 {
                m.remove(conn);
            }
        }
    }
}

struct Entry {
    session: SessionId,
    to: Recipient<Signal>,
    opened_ms: i64,
}

/// Cluster ownership of a connection, held while it has at least one session here.
struct Owned {
    epoch: u64,
}

pub struct Registry {
    by_conn: HashMap<String, Vec<Entry>>,
    /// Every socket open on this node, bound or not ([`Opened`] until [`Gone`]): a drain or
    /// a stop closes them all, not only those registered for a connection (a socket that
    /// never bound, or one superseded by a newer session elsewhere, stays open otherwise).
    sockets: HashMap<SessionId, Recipient<Signal>>,
    owned: HashMap<String, Owned>,
    cluster: Option<ClusterHandle>,
    sessions: usize,
    /// Set by [`CloseAll`] (a drain, a shutdown) until [`OpenAgain`]: a session that
    /// registers meanwhile (it checked the drain flag before the drain began, and its
    /// `Register` arrived after the `CloseAll`) is closed as the others were, not kept.
    closed: Option<Close>,
    /// A stopping node's [`CloseAll`]: no [`OpenAgain`] ends it (an undrain racing the stop).
    closed_for_good: bool,
}

impl Registry {
    pub fn new(cluster: Option<ClusterHandle>) -> Registry {
        Registry {
            by_conn: HashMap::new(),
            sockets: HashMap::new(),
            owned: HashMap::new(),
            cluster,
            sessions: 0,
            closed: None,
            closed_for_good: false,
        }
    }

    fn wake_conn(&self, conn: &str) -> bool {
        match self.by_conn.get(conn) {
            Some(entries) if !entries.is_empty() => {
                for e in entries {
                    // A full mailbox already holds a wake-up: dropping this one loses nothing.
                    // (Control signals are sent past a full mailbox: `do_send`.)
                    let _ = e.to.try_send(Signal::Wake);
                }
                true
            }
            _ => false,
        }
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Forwards arrive faster than 16 at a time; notifications must not be refused.
        ctx.set_mailbox_capacity(65_536);
    }
}

/// A socket opened on this node (before it binds to any connection).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Opened {
    pub session: SessionId,
    pub to: Recipient<Signal>,
}

impl Handler<Opened> for Registry {
    type Result = ();
    fn handle(&mut self, m: Opened, _: &mut Context<Self>) {
        if let Some(close) = &self.closed {
            // It was upgraded before the drain began: closed as the others were.
            m.to.do_send(Signal::Close(close.clone()));
        }
        self.sockets.insert(m.session, m.to);
    }
}

/// A socket that [`Opened`] stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Gone {
    pub session: SessionId,
}

impl Handler<Gone> for Registry {
    type Result = ();
    fn handle(&mut self, m: Gone, _: &mut Context<Self>) {
        self.sockets.remove(&m.session);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub conn: String,
    pub session: SessionId,
    pub to: Recipient<Signal>,
}

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, m: Register, _: &mut Context<Self>) {
        if let Some(close) = &self.closed {
            m.to.do_send(Signal::Close(close.clone()));
            tracing::info!(connection = %m.conn, session = m.session, "session closed as it bound: the node drains");
            return;
        }
        let entries = self.by_conn.entry(m.conn.clone()).or_default();
        if entries.iter().any(|e| e.session == m.session) {
            return;
        }
        entries.push(Entry {
            session: m.session,
            to: m.to,
            opened_ms: crate::protocols::now_ms(),
        });
        self.sessions += 1;
        // A new session always re-announces: a newer epoch moves ownership to this node.
        if let Some(c) = &self.cluster {
            let epoch = c.announce_session(&m.conn);
            self.owned.insert(m.conn.clone(), Owned { epoch });
        }
        tracing::info!(connection = %m.conn, session = m.session, "session bound");
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub conn: String,
    pub session: SessionId,
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, m: Unregister, _: &mut Context<Self>) {
        let Some(entries) = self.by_conn.get_mut(&m.conn) else {
            return;
        };
        let before = entries.len();
        entries.retain(|e| e.session != m.session);
        self.sessions -= before - entries.len();
        if entries.is_empty() {
            self.by_conn.remove(&m.conn);
            if let (Some(c), Some(o)) = (&self.cluster, self.owned.remove(&m.conn)) {
                c.withdraw_session(&m.conn, o.epoch);
            }
        }
    }
}

/// The cluster says a newer session on another node owns `conn` (its epoch is higher): the
/// sessions here stop delivering and leave the registry; a session that speaks again with
/// return-route binds anew (and takes ownership back with a newer epoch).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct SessionMoved {
    pub conn: String,
}

impl Handler<SessionMoved> for Registry {
    type Result = usize;
    fn handle(&mut self, m: SessionMoved, _: &mut Context<Self>) -> usize {
        // Only when the directory still names another owner: a session bound here since the
        // event announced a newer epoch of its own.
        let Some(c) = &self.cluster else { return 0 };
        match c.owner_of(&m.conn) {
            Some(owner) if owner != c.node_id() => {}
            _ => return 0,
        }
        let Some(entries) = self.by_conn.remove(&m.conn) else {
            return 0;
        };
        // Withdraw this node's claim too: otherwise, once the newer session ends and its node
        // withdraws, the directory falls back to this claim, naming a node with no session
        // for the connection (pushes taken for "online", hand-offs sent to nobody).
        if let Some(o) = self.owned.remove(&m.conn) {
            c.withdraw_session(&m.conn, o.epoch);
        }
        self.sessions -= entries.len();
        for e in &entries {
            // Sent past a full mailbox (of wake-ups): a session that missed this would go on
            // delivering beside the new owner.
            e.to.do_send(Signal::Superseded);
        }
        tracing::info!(connection = %m.conn, sessions = entries.len(), "session moved to another node: stopped delivering here");
        entries.len()
    }
}

/// The newest session of `conn` here, to hand messages to ([`Signal::HandOff`]): the caller
/// sends and awaits, so a message a stopping session's mailbox drops is known as not taken.
#[derive(Message)]
#[rtype(result = "Option<Recipient<Signal>>")]
pub struct SessionFor {
    pub conn: String,
}

impl Handler<SessionFor> for Registry {
    type Result = Option<Recipient<Signal>>;
    fn handle(&mut self, m: SessionFor, _: &mut Context<Self>) -> Self::Result {
        self.by_conn.get(&m.conn).and_then(|e| e.last()).map(|e| e.to.clone())
    }
}

/// The connections this node holds live sessions of (the sweep asks the store about these).
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct LocalConns;

impl Handler<LocalConns> for Registry {
    type Result = MessageResult<LocalConns>;
    fn handle(&mut self, _: LocalConns, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.by_conn.keys().cloned().collect())
    }
}

/// Wake the local sessions of a connection; answers whether there was one.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct WakeLocal {
    pub conn: String,
}

impl Handler<WakeLocal> for Registry {
    type Result = bool;
    fn handle(&mut self, m: WakeLocal, _: &mut Context<Self>) -> bool {
        self.wake_conn(&m.conn)
    }
}

/// Wake the local sessions of many connections (the sweep); answers how many had one.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct WakeMany {
    pub conns: Vec<String>,
}

impl Handler<WakeMany> for Registry {
    type Result = usize;
    fn handle(&mut self, m: WakeMany, _: &mut Context<Self>) -> usize {
        m.conns.iter().filter(|c| self.wake_conn(c)).count()
    }
}

/// Whether this node holds a live session of the connection.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct IsLocal {
    pub conn: String,
}

impl Handler<IsLocal> for Registry {
    type Result = bool;
    fn handle(&mut self, m: IsLocal, _: &mut Context<Self>) -> bool {
        self.by_conn.get(&m.conn).map(|e| !e.is_empty()).unwrap_or(false)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub connection: String,
    pub session: SessionId,
    pub opened_ms: i64,
}

/// The live sessions on this node, for the admin endpoint.
#[derive(Message)]
#[rtype(result = "Vec<SessionInfo>")]
pub struct ListSessions;

impl Handler<ListSessions> for Registry {
    type Result = MessageResult<ListSessions>;
    fn handle(&mut self, _: ListSessions, _: &mut Context<Self>) -> Self::Result {
        let mut v: Vec<SessionInfo> = self
            .by_conn
            .iter()
            .flat_map(|(c, es)| {
                es.iter().map(|e| SessionInfo {
                    connection: c.clone(),
                    session: e.session,
                    opened_ms: e.opened_ms,
                })
            })
            .collect();
        v.sort_by_key(|s| s.opened_ms);
        MessageResult(v)
    }
}

/// How many bound sessions this node holds.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Count;

impl Handler<Count> for Registry {
    type Result = usize;
    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
        self.sessions
    }
}

/// Close every socket (a drain, a graceful shutdown), bound or not, and every one that opens
/// or registers until [`OpenAgain`]; ownership is withdrawn as they unregister. Answers how
/// many were asked to close.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseAll {
    pub code: u16,
    pub reason: String,
    /// The node stops: [`OpenAgain`] no longer reopens it.
    pub for_good: bool,
}

impl Handler<CloseAll> for Registry {
    type Result = usize;
    fn handle(&mut self, m: CloseAll, _: &mut Context<Self>) -> usize {
        self.closed = Some(Close {
            code: m.code,
            reason: m.reason.clone(),
        });
        self.closed_for_good |= m.for_good;
        let close = Close {
            code: m.code,
            reason: m.reason,
        };
        // Past a full mailbox, as every control signal: see `SessionMoved`.
        for to in self.sockets.values() {
            to.do_send(Signal::Close(close.clone()));
        }
        let mut n = self.sockets.len();
        // A session registered without `Opened` (none does on a node; tests register bare).
        for e in self.by_conn.values().flatten() {
            if !self.sockets.contains_key(&e.session) {
                e.to.do_send(Signal::Close(close.clone()));
                n += 1;
            }
        }
        n
    }
}

/// Sessions may register again (`POST /undrain`): ends what [`CloseAll`] began.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OpenAgain;

impl Handler<OpenAgain> for Registry {
    type Result = ();
    fn handle(&mut self, _: OpenAgain, _: &mut Context<Self>) {
        if !self.closed_for_good {
            self.closed = None;
        }
    }
}

/// Close the live sessions of one connection on this node (an operator removed it or revoked
/// its mediation); they unregister as they stop. Answers how many were asked to close.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct CloseConn {
    pub conn: String,
    pub code: u16,
    pub reason: String,
    /// A session left open (the one that carried a DID rotation).
    pub except: Option<SessionId>,
}

impl Handler<CloseConn> for Registry {
    type Result = usize;
    fn handle(&mut self, m: CloseConn, _: &mut Context<Self>) -> usize {
        let Some(entries) = self.by_conn.get(&m.conn) else {
            return 0;
        };
        let closing: Vec<&Entry> = entries.iter().filter(|e| Some(e.session) != m.except).collect();
        for e in &closing {
            // Past a full mailbox, as every control signal: see `SessionMoved`.
            e.to.do_send(Signal::Close(Close {
                code: m.code,
                reason: m.reason.clone(),
            }));
        }
        tracing::info!(connection = %m.conn, sessions = closing.len(), reason = %m.reason, "sessions closed");
        closing.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A session that takes nothing from its mailbox (of one slot) until `go` is sent.
    struct Stalled {
        go: Option<tokio::sync::oneshot::Receiver<()>>,
        got: Received,
    }

    impl Actor for Stalled {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            let go = self.go.take().expect("started once");
            ctx.wait(
                async move {
                    let _ = go.await;
                }
                .into_actor(self),
            );
        }
    }

    impl Handler<Signal> for Stalled {
        type Result = ();
        fn handle(&mut self, m: Signal, _: &mut Context<Self>) {
            self.got.lock().unwrap().push(match m {
                Signal::Wake => "wake",
                Signal::Close(_) => "close",
                Signal::Superseded => "superseded",
                Signal::HandOff(_) => "handoff",
            });
        }
    }

    /// A stalled session: its recipient, the sender that lets it go on, what it received.
    type StalledSession = (Recipient<Signal>, tokio::sync::oneshot::Sender<()>, Received);
    type Received = Arc<Mutex<Vec<&'static str>>>;

    fn stalled() -> StalledSession {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let got = Arc::default();
        let mut ctx = Context::new();
        ctx.set_mailbox_capacity(1);
        let addr = ctx.run(Stalled {
            go: Some(rx),
            got: Arc::clone(&got),
        });
        (addr.recipient(), tx, got)
    }

    async fn received(got: &Received, what: &str) -> bool {
        for _ in 0..500 {
            if got.lock().unwrap().contains(&what) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }

    /// A session's mailbox full of wake-ups (a burst of forwards, the socket slow) must not
    /// swallow the registry's control signals: a superseded session that never hears it goes
    /// on delivering beside the new owner, and one asked to close stays open.
    #[actix_rt::test]
    async fn control_signals_reach_a_session_whose_mailbox_is_full() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cfg = crate::cluster::ClusterConfig::new(
            "n1",
            "c",
            "s",
            vec![crate::cluster::PeerConfig {
                id: "n2".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
            }],
        );
        let (events, _events_rx) = tokio::sync::mpsc::channel(16);
        let cluster = ClusterHandle::start(cfg, listener, events).await.unwrap();
        let registry = Registry::new(Some(cluster.clone())).start();

        let (moved, go_moved, got_moved) = stalled();
        let (closed, go_closed, got_closed) = stalled();
        let (all, go_all, got_all) = stalled();
        for (conn, session, to) in [("c1", 1, moved), ("c2", 2, closed), ("c3", 3, all)] {
            registry
                .send(Register {
                    conn: conn.into(),
                    session,
                    to,
                })
                .await
                .unwrap();
            for _ in 0..2 {
                assert!(registry.send(WakeLocal { conn: conn.into() }).await.unwrap());
            }
        }
        cluster.claim_for_test("c1", "n2");
        assert_eq!(registry.send(SessionMoved { conn: "c1".into() }).await.unwrap(), 1);
        let close = CloseConn {
            conn: "c2".into(),
            code: 1000,
            reason: "removed".into(),
            except: None,
        };
        assert_eq!(registry.send(close).await.unwrap(), 1);
        let shutdown = CloseAll {
            code: 1001,
            reason: "shutdown".into(),
            for_good: true,
        };
        // c2's session (asked once already: its mailbox is past full) and c3's.
        assert_eq!(registry.send(shutdown).await.unwrap(), 2);
        for go in [go_moved, go_closed, go_all] {
            go.send(()).unwrap();
        }
        assert!(
            received(&got_moved, "superseded").await,
            "{:?}",
            got_moved.lock().unwrap()
        );
        assert!(received(&got_closed, "close").await, "{:?}", got_closed.lock().unwrap());
        assert!(received(&got_all, "close").await, "{:?}", got_all.lock().unwrap());
    }

    /// A session that checked the drain flag just before a drain began registers after the
    /// registry closed every session: it is closed too, not kept (announced as the owner and
    /// handed messages on a drained node). After an undrain sessions register again.
    #[actix_rt::test]
    async fn a_session_registering_after_a_drain_is_closed() {
        let registry = Registry::new(None).start();
        let drain = CloseAll {
            code: 1001,
            reason: "mediator node draining: reconnect".into(),
            for_good: false,
        };
        assert_eq!(registry.send(drain).await.unwrap(), 0);
        let (late, go, got) = stalled();
        let register = |session, to| Register {
            conn: "c".into(),
            session,
            to,
        };
        registry.send(register(1, late)).await.unwrap();
        go.send(()).unwrap();
        assert!(received(&got, "close").await, "{:?}", got.lock().unwrap());
        assert_eq!(registry.send(Count).await.unwrap(), 0, "not registered");

        registry.send(OpenAgain).await.unwrap();
        let (after, go, got) = stalled();
        registry.send(register(2, after)).await.unwrap();
        go.send(()).unwrap();
        assert!(
            registry.send(WakeLocal { conn: "c".into() }).await.unwrap(),
            "registered"
        );
        assert!(received(&got, "wake").await);
        assert!(!got.lock().unwrap().contains(&"close"));
    }

    /// The stop's close is for good: an undrain racing it (its `OpenAgain` after the stop's
    /// `CloseAll`) does not reopen the registry, and a socket opening then is closed.
    #[actix_rt::test]
    async fn an_undrain_racing_the_stop_reopens_nothing() {
        let registry = Registry::new(None).start();
        let stop = CloseAll {
            code: 1001,
            reason: "mediator node shutting down: reconnect".into(),
            for_good: true,
        };
        registry.send(stop).await.unwrap();
        registry.send(OpenAgain).await.unwrap();
        let (late, go, got) = stalled();
        registry.send(Opened { session: 1, to: late }).await.unwrap();
        go.send(()).unwrap();
        assert!(received(&got, "close").await, "{:?}", got.lock().unwrap());
    }

    #[test]
    fn a_connection_is_held_while_any_of_its_sessions_is_counted_in() {
        let h = LocalHolders::default();
        assert!(!h.holds("c1"));
        h.count_in("c1");
        h.count_in("c1");
        h.count_in("c2");
        // One of two sockets of c1 closes: the other still takes wake-ups.
        h.count_out("c1");
        assert!(h.holds("c1"));
        h.count_out("c1");
        assert!(!h.holds("c1"));
        assert!(h.holds("c2"));
        // A stray count-out (a session never counted in) takes nobody else's count.
        h.count_out("c1");
        h.count_in("c1");
        assert!(h.holds("c1"));
        h.count_out("c2");
        h.count_out("c1");
        assert!(h.0.lock().is_empty(), "no entry once every session left");
    }
}
