//! Waking offline wallets: push notifications through FCM, APNs and a signed webhook.
//!
//! Owns: the `[push]` settings ([`config`]), the decision *when* to push ([`schedule`], pure),
//! one sender per provider ([`fcm`], [`apns`], [`webhook`]) and the node's push worker.
//!
//! Flow: a forward is committed and answered 2xx; the node that accepted it finds no live
//! session of the wallet on any node (its registry, then the cluster directory) and calls
//! [`PushHandle::queued`], which never waits: the event goes through a bounded channel to the
//! worker, which runs on a thread (actix arbiter) of its own with its own HTTP/2 client. The
//! worker runs one event per wallet at a time, at most `max_in_flight` + 16 in all; the rest
//! wait their turn, a wallet's repeats folded into one (`waiting.rs`). Then
//! the wallet's push window, kept in the store and shared by every node
//! ([`crate::store::Store::push_event`]), lets one push through at once and folds a burst into
//! at most one trailing push per window, whichever nodes the forwards landed on. Every push is
//! sent under a claim that lasts [`claim_length`]: an immediate push is claimed by the node
//! whose event it is, in the same step as the window's; every node polls for due trailing
//! pushes, each taken by one node ([`crate::store::Store::push_take_due`]). The claim ends once
//! the push is sent or given up for good ([`crate::store::Store::push_done`]); a claim that
//! runs out first (its node died, was stopped mid-push, could not read the registration, or
//! the provider kept failing past `max_attempts` or asked for a wait past `retry_max_ms`) is
//! taken again by any node's poll, so a node that dies leaves its pushes to the others. Without
//! a window (`min_interval_secs = 0`) nothing is kept in the store and nothing claimed. A node
//! whose window call fails pushes at once; the claim's token is made before the call, so that
//! push ends the claim the store may have recorded all the same. Where no claim was recorded
//! (no window, or a window call that failed before its commit), a push the provider kept
//! failing is not taken again: the wallet's next message pushes. The duplicates this allows:
//! a push sent by a node that died before it ended its claim, or cut off at the end of its
//! budget after the provider took it, goes out again. A
//! node takes at most as many trailing pushes as it has free slots, so a push it claims starts
//! at once. Just before the send, every push checks again that no session appeared, reads the
//! registration again and skips a connection deleted or revoked since; a trailing push also
//! checks that mail is still queued. A push is retried on 429/5xx with backoff (honouring `Retry-After`),
//! and a token the provider calls dead is forgotten in the store. Nothing here touches the
//! queue, and a push that is slow or fails never delays or fails a forward.
//!
//! Where a provider (FCM, APNs) serves the device, the push is the provider's: it ends, with
//! its claim and its slot, on the provider's answer, and the webhook gets the event from a
//! sender of its own (`webhook_sender`), with its own bound and its own HTTP client. A
//! webhook that hangs or asks for long waits then holds up no push, and never makes a push the
//! provider took run past its budget and go out again. Where no provider serves the device, the
//! webhook is the push.
//!
//! Exactly one node sends for a queued event: only the node that accepted the forward (or
//! took back the lease that ran out, or was given back a session's leases) calls `queued`, and
//! only when no node holds a session; the shared window folds the events of several nodes.
//! Mail a node notified to a peer later found down is pushed by that node only if nobody
//! pushed the wallet since (`queued_unless_pushed_since`): the node that took the peer over
//! pushes for what was queued before its take-over.
//!
//! Must not: block the caller, log a device token or a credential in full, touch the queue.

pub mod apns;
pub mod config;
mod devices;
pub mod fcm;
pub mod schedule;
mod waiting;
pub mod webhook;

use crate::store::{Device, MediationState, NewClaim, PushClaim, PushService, PushSlot, Store};
use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use config::{PushConfig, PushSettings};

/// Events handed to the worker and not yet taken; beyond it events are dropped and counted
/// (the store still holds the mail, and the next event of that wallet pushes). The worker takes
/// them into [`WAITING_MAX`] wallets' events waiting for their turn, folding a wallet's repeats.
pub const EVENT_QUEUE: usize = 65_536;

/// Wallets whose event waits for its turn in the worker, at most: past it the worker takes no
/// more off its channel until some start.
pub const WAITING_MAX: usize = 65_536;

/// A device token as logs and the admin API show it: its first characters and its length.
pub fn redact(token: &str) -> String {
    let head: String = token.chars().take(6).collect();
    format!("{head}…({} chars)", token.chars().count())
}

pub(crate) fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How far back the `iat` of the tokens we sign is set: a node whose clock runs a little ahead
/// of the provider's would otherwise sign tokens "issued in the future", which Google's token
/// endpoint (`invalid_grant`) and APNs (`InvalidProviderToken`) refuse.
pub(crate) const ISSUED_AT_BACKDATE_S: u64 = 60;

/// The `iat` of a token signed now ([`ISSUED_AT_BACKDATE_S`] back).
pub(crate) fn issued_at_s() -> u64 {
    unix_now_s().saturating_sub(ISSUED_AT_BACKDATE_S)
}

/// One push to send.
#[derive(Clone, Debug)]
pub struct Event {
    /// One id per push, the same on each of its tries and, with a push window, on each retake
    /// of its claim, on any node ([`event_id`]; the webhook sends it: a receiver drops a repeat
    /// by it). Without a window each push has an id of its own.
    pub id: String,
    pub conn: String,
    pub service: PushService,
    pub token: String,
    pub platform: Option<String>,
    /// Messages queued for the wallet when the push is sent.
    pub count: u64,
}

/// What a provider made of one try.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Sent,
    Retry {
        retry_after_ms: Option<u64>,
        reason: String,
    },
    /// The provider says the token is dead: forget it.
    Dead(String),
    Failed(String),
}

/// A provider's HTTP answer.
pub struct HttpAnswer {
    pub status: u16,
    pub retry_after_ms: Option<u64>,
    pub body: Vec<u8>,
}

/// An HTTP client of the push thread (HTTP/2 over TLS where the server offers it): one for the
/// providers, one for the webhook, each with its own connections.
pub struct Transport {
    client: awc::Client,
    /// The longest one request takes, from its send to the last byte of its answer's body
    /// (`timeout_ms`).
    timeout: Duration,
}

impl Transport {
    /// A client of at most `connections` connections at once.
    pub fn new(s: &PushSettings, connections: usize) -> Result<Transport, String> {
        let tls = crate::tls::client_config(&s.extra_roots, &[b"h2", b"http/1.1"], "push.ca_file")?;
        let timeout = Duration::from_millis(s.timeout_ms);
        let connector = awc::Connector::new()
            .rustls_0_23(tls)
            .timeout(timeout)
            .limit(connections.max(16));
        let client = awc::Client::builder()
            .connector(connector)
            .timeout(timeout)
            .disable_redirects()
            .finish();
        Ok(Transport { client, timeout })
    }

    /// One `POST`, bounded as a whole by `timeout_ms`: awc's own timeouts end at the answer's
    /// head, and an endpoint that sends its head and then never its body would otherwise hold
    /// the request (its send slot, an FCM project's token lock, a webhook turn) for good.
    pub async fn post(&self, url: &str, headers: Vec<(String, String)>, body: Vec<u8>) -> Result<HttpAnswer, String> {
        match tokio::time::timeout(self.timeout, self.post_unbounded(url, headers, body)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("{}: no whole answer within {:?}", host_of(url), self.timeout)),
        }
    }

    async fn post_unbounded(
        &self,
        url: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<HttpAnswer, String> {
        let mut req = self.client.post(url);
        for (k, v) in &headers {
            req = req.insert_header((k.as_str(), v.as_str()));
        }
        let mut resp = req
            .send_body(body)
            .await
            .map_err(|e| format!("{}: {e}", host_of(url)))?;
        let status = resp.status().as_u16();
        let retry_after_ms = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| schedule::parse_retry_after(v, unix_now_s()));
        let body = resp
            .body()
            .limit(256 * 1024)
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        Ok(HttpAnswer {
            status,
            retry_after_ms,
            body,
        })
    }
}

/// The host of `url`, for messages ("" if it has none).
fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether a wallet has a live session anywhere in the cluster (implemented by the node over
/// its registry and the cluster directory).
pub trait Presence: Send + Sync + 'static {
    fn online<'a>(&'a self, conn: &'a str) -> BoxFuture<'a, bool>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderResult {
    pub provider: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: String,
}

/// `mailroom_push_*` metrics.
#[derive(Clone)]
pub struct PushMetrics {
    /// Tries by provider and result: sent, retry, gave_up, held (not tried: a `Retry-After`
    /// the provider gave this wallet's push has not passed), dead_token, failed, no_provider,
    /// revoked (skipped: the connection's mediation was revoked), deleted (skipped: the
    /// connection was deleted), unregistered (skipped: the device registration read for the
    /// event was gone at the send).
    pub total: Family<ProviderResult, Counter>,
    /// Queued event to the provider's 2xx, seconds (retries included).
    pub latency: Family<ProviderLabel, Histogram, fn() -> Histogram>,
    /// Events handed to the worker: queued mail for a wallet no node holds a session of.
    pub events: Counter,
    /// Wallets whose event waits for its turn in the worker (the worker runs at most
    /// `max_in_flight` + 16 events, one per wallet, and folds a wallet's repeats meanwhile).
    pub waiting: Gauge,
    /// Events folded into another push of their wallet (one sent at once, a trailing one, or
    /// one another node sent since).
    pub coalesced: Counter,
    /// Tokens forgotten because the provider called them dead.
    pub dropped_tokens: Counter,
    /// Events dropped because the worker's queue was full.
    pub overflow: Counter,
    /// Events pushed at once because the shared push window could not be read or claimed
    /// (store unavailable): each may be a push more than the window allows.
    pub window_unavailable: Counter,
}

impl Default for PushMetrics {
    fn default() -> Self {
        PushMetrics {
            total: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16))),
            events: Counter::default(),
            waiting: Gauge::default(),
            coalesced: Counter::default(),
            dropped_tokens: Counter::default(),
            overflow: Counter::default(),
            window_unavailable: Counter::default(),
        }
    }
}

impl PushMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register(
            "push",
            "Push notification tries by provider and result",
            self.total.clone(),
        );
        r.register(
            "push_latency_seconds",
            "From the queued message to the provider's acceptance of its push",
            self.latency.clone(),
        );
        r.register(
            "push_events",
            "Queued mail for wallets no node holds a session of, handed to the push worker",
            self.events.clone(),
        );
        r.register(
            "push_waiting",
            "Wallets whose push event waits for its turn in the push worker",
            self.waiting.clone(),
        );
        r.register(
            "push_coalesced",
            "Queued messages folded into another push of their wallet: one sent at once, a trailing one, or one another node sent since",
            self.coalesced.clone(),
        );
        r.register(
            "push_dropped_tokens",
            "Device tokens forgotten because the provider called them dead",
            self.dropped_tokens.clone(),
        );
        r.register(
            "push_overflow",
            "Push events dropped because the push queue was full",
            self.overflow.clone(),
        );
        r.register(
            "push_window_unavailable",
            "Push events pushed at once because the shared push window was unavailable",
            self.window_unavailable.clone(),
        );
    }

    fn count(&self, provider: &str, result: &str) {
        self.total
            .get_or_create(&ProviderResult {
                provider: provider.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Sum over results of one provider (status page, tests).
    pub fn sent(&self, provider: &str) -> u64 {
        self.total
            .get_or_create(&ProviderResult {
                provider: provider.into(),
                result: "sent".into(),
            })
            .get()
    }
}

/// A queued event handed to the worker.
struct Queued {
    conn: String,
    at: Instant,
    /// Only if the wallet was not pushed since (ms; see [`PushHandle::queued_unless_pushed_since`]).
    unless_pushed_since_ms: Option<i64>,
}

/// Asks the worker to finish what it was handed and what is in flight (within
/// [`STOP_GRACE`]), then to answer whether all of it did.
type Stop = tokio::sync::oneshot::Sender<bool>;

/// How long a stopping node gives the pushes it has started (a token grant, a provider's
/// answer, a retry's back-off) before it abandons them. An immediate push is the wallet's only
/// wake-up until its next event; a trailing push abandoned here keeps its claim, which runs
/// out ([`claim_length`]) and leaves it to the other nodes.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What a trailing push's claim lasts beyond [`push_budget`]: the store write that ends the
/// claim, and the difference between the clocks of the node that claimed it and the node that
/// takes it once it ran out.
pub const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// The longest a trailing push runs once it holds a slot; past it the push is cut off and its
/// claim left to run out (a node takes it again). `max_attempts` tries, each at most
/// `max(4 × FCM projects, 2)` provider requests of at most `timeout_ms` (FCM, per project
/// tried: an access-token grant and the send, and both again when the send is answered 401;
/// APNs: the send and once more on an expired provider token; the webhook, where it is the
/// push: one; beside a provider it is sent apart, by a sender of its own), and the
/// `max_attempts - 1` waits between tries, each at most
/// `retry_max_ms` (a longer `Retry-After` gives up). The checks before the send (session,
/// registration, queue) count against it too. Defaults, one FCM project:
/// 5 × 4 × 10 s + 4 × 60 s = 440 s (APNs or the webhook alone: 5 × 2 × 10 s + 4 × 60 s = 340 s).
pub fn push_budget(s: &PushSettings) -> Duration {
    let attempts = u64::from(s.max_attempts.max(1));
    let requests = (4 * s.fcm.len() as u64).max(2);
    let ms = attempts
        .saturating_mul(requests)
        .saturating_mul(s.timeout_ms)
        .saturating_add((attempts - 1).saturating_mul(s.retry_max_ms));
    Duration::from_millis(ms)
}

/// How long a node's claim on a trailing push lasts: [`push_budget`] + [`CLAIM_MARGIN`]
/// (445 s with the defaults and one FCM project). A trailing push whose node died, stopped or failed before
/// sending it is taken by another node this long after it was claimed.
pub fn claim_length(s: &PushSettings) -> Duration {
    push_budget(s) + CLAIM_MARGIN
}

/// The node's handle on its push worker. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct PushHandle {
    tx: mpsc::Sender<Queued>,
    /// Apart from the events, so that a full event channel does not hold up the stop.
    stop_tx: mpsc::Sender<Stop>,
    metrics: PushMetrics,
    /// How long an idle push window is kept ([`windows_kept_ms`]).
    windows_kept_ms: i64,
}

/// How long a push window idle since its last push is kept (then forgotten, as if the wallet
/// had never been pushed): twice the window, and at least `keep_windows_ms`.
fn windows_kept_ms(settings: &PushSettings, deps: &Deps) -> i64 {
    settings.min_interval_ms.saturating_mul(2).max(deps.keep_windows_ms)
}

impl PushHandle {
    /// How long an idle push window is kept: a wallet pushed for mail received less than this
    /// ago still has its window (what `session::owed` relies on).
    pub fn windows_kept_ms(&self) -> i64 {
        self.windows_kept_ms
    }

    /// A message was queued for `conn` and no node holds a session of it.
    pub fn queued(&self, conn: &str) {
        self.queued_unless_pushed_since(conn, None);
    }

    /// As [`PushHandle::queued`], for mail another node may have pushed the wallet for
    /// already: with `Some(since_ms)`, not if the wallet's shared window says it was pushed
    /// at or after `since_ms` (without a window, `min_interval_secs = 0`, it is pushed).
    pub fn queued_unless_pushed_since(&self, conn: &str, unless_pushed_since_ms: Option<i64>) {
        let cmd = Queued {
            conn: conn.to_string(),
            at: Instant::now(),
            unless_pushed_since_ms,
        };
        match self.tx.try_send(cmd) {
            Ok(()) => self.metrics.events.inc(),
            Err(_) => self.metrics.overflow.inc(),
        };
    }

    /// Stops the worker (node shutdown): the events already handed over are handled and the
    /// pushes in flight finish, for at most [`STOP_GRACE`]; returns when they have.
    /// Returns whether every push the worker had started finished (false: some were
    /// abandoned, or the worker did not answer).
    pub async fn stop(&self) -> bool {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let handed = tokio::time::timeout(STOP_GRACE, self.stop_tx.send(done_tx)).await;
        if !matches!(handed, Ok(Ok(()))) {
            return false;
        }
        // The worker bounds its own wait; this bound is for a worker that is gone.
        matches!(
            tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), done_rx).await,
            Ok(Ok(true))
        )
    }
}

/// What the worker needs, besides its settings.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub presence: Arc<dyn Presence>,
    pub metrics: PushMetrics,
    pub node_id: String,
    /// How long a wallet's push window is kept after its last push, at the least (beyond
    /// twice `min_interval`): a node that notified a peer found down asks it whether the
    /// wallet was pushed since, up to this long after the push of the node that took the
    /// peer over (`session::Shared::wake_notified`).
    pub keep_windows_ms: i64,
}

/// Starts the push worker on an arbiter (thread) of its own. Fails on credentials that do not
/// load (they were checked by `check-config` already).
pub fn start(settings: PushSettings, deps: Deps) -> Result<PushHandle, String> {
    // Build once here so a bad key is an error of the node's start, not a silent thread.
    fcm::Fcm::new(&settings.fcm)?;
    if let Some(a) = &settings.apns {
        apns::Apns::new(a)?;
    }
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let (stop_tx, stop_rx) = mpsc::channel(1);
    let metrics = deps.metrics.clone();
    let windows_kept_ms = windows_kept_ms(&settings, &deps);
    let arbiter = actix_rt::Arbiter::new();
    let handle = arbiter.handle();
    let ok = handle.spawn_fn(move || {
        actix_rt::spawn(async move {
            worker(settings, deps, rx, stop_rx).await;
            actix_rt::Arbiter::current().stop();
        });
    });
    if !ok {
        return Err("push worker thread did not start".into());
    }
    Ok(PushHandle {
        tx,
        stop_tx,
        metrics,
        windows_kept_ms,
    })
}

struct Ctx {
    settings: PushSettings,
    store: Arc<dyn Store>,
    presence: Arc<dyn Presence>,
    metrics: PushMetrics,
    node_id: String,
    /// The providers' client.
    transport: Transport,
    /// The webhook's client (with a webhook configured), apart from the providers': a webhook
    /// that holds its connections takes none of theirs.
    hook_transport: Option<Transport>,
    fcm: fcm::Fcm,
    apns: Option<apns::Apns>,
    /// Pushes being sent; a trailing push holds its slot from before it is claimed.
    slots: Arc<tokio::sync::Semaphore>,
    /// How long a claimed push is this node's ([`claim_length`]), milliseconds.
    claim_ms: i64,
    /// Events reading or recording in the store at once ([`STORE_LOOKUPS`]): a burst of
    /// events (a take-over, a crash wake, a broadcast) waits here, not on the store's pool,
    /// where each would time out and the forwards beside them too.
    lookups: tokio::sync::Semaphore,
    /// Set when the stop began: a poll takes no more trailing pushes (their claims would be
    /// this node's while it stops, and kept from the other nodes until they ran out).
    stopping: std::cell::Cell<bool>,
    /// Set once the stop's pushes have all ended: no more webhook events come beside them, and
    /// [`webhook_sender`] ends once it sent those it has.
    pushes_ended: std::cell::Cell<bool>,
    /// (provider, connection) -> no request before then: a push given up on a `Retry-After`
    /// (FCM's 429 for a spent quota says an hour) is taken again when its claim runs out,
    /// every [`claim_length`]; until the wait the provider asked for has passed, that try
    /// asks nothing of the provider. Per node: another node taking the push asks once.
    held: std::cell::RefCell<HashMap<(&'static str, String), Instant>>,
    /// When [`Ctx::held`] was last swept of holds that ran out (at most once a second).
    held_swept: std::cell::Cell<Instant>,
    /// Webhook events of pushes a provider serves ([`push_one`]), waiting for their turn in
    /// [`webhook_sender`] (at most [`BESIDE_WAITING_MAX`]), with when their event was queued.
    beside: std::cell::RefCell<std::collections::VecDeque<(Event, Instant)>>,
    /// Wakes [`webhook_sender`]: an event in [`Ctx::beside`], or the stop.
    hook_wake: tokio::sync::Notify,
    /// Webhook events the webhook failed on (out of tries) beside a provider: sent again by
    /// [`webhook_sender`], every [`claim_length`], in [`WEBHOOK_ROUNDS`] more rounds of tries.
    /// Per node, in memory: a node that stops drops what it still owes.
    owed: std::cell::RefCell<std::collections::VecDeque<Owed>>,
    /// Devices a provider accepted a push to lately, and for which connection: a device is
    /// pushed once a window whichever connections registered its token ([`devices`]).
    devices: std::cell::RefCell<devices::Devices>,
}

impl Ctx {
    /// The worker's context, its providers' clients built (fails on credentials that do not
    /// load).
    fn new(settings: &PushSettings, deps: &Deps) -> Result<Ctx, String> {
        let transport = Transport::new(settings, settings.max_in_flight)?;
        let hook_transport = match settings.webhook {
            Some(_) => Some(Transport::new(settings, webhook_connections(settings))?),
            None => None,
        };
        Ok(Ctx {
            fcm: fcm::Fcm::new(&settings.fcm)?,
            apns: settings.apns.as_ref().map(apns::Apns::new).transpose()?,
            slots: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight)),
            transport,
            hook_transport,
            store: deps.store.clone(),
            presence: deps.presence.clone(),
            metrics: deps.metrics.clone(),
            node_id: deps.node_id.clone(),
            claim_ms: claim_length(settings).as_millis().min(i64::MAX as u128) as i64,
            lookups: tokio::sync::Semaphore::new(STORE_LOOKUPS),
            stopping: std::cell::Cell::new(false),
            pushes_ended: std::cell::Cell::new(false),
            held: Default::default(),
            held_swept: std::cell::Cell::new(Instant::now()),
            beside: Default::default(),
            hook_wake: tokio::sync::Notify::new(),
            owed: Default::default(),
            devices: Default::default(),
            settings: settings.clone(),
        })
    }
}

/// A webhook event owed ([`Ctx::owed`]): the event, when it is tried again, the rounds left.
struct Owed {
    ev: Event,
    due: Instant,
    rounds: u32,
}

/// Rounds of tries a webhook event owed gets after its first ([`Ctx::owed`]): with the
/// default claim length (445 s with one FCM project, 345 s without) an hour or so.
const WEBHOOK_ROUNDS: u32 = 10;
/// Webhook events owed at most; past it, one more is given up.
const OWED_MAX: usize = 10_000;
/// Webhook events beside a provider waiting for their turn ([`Ctx::beside`]) at most; past
/// it, one more is owed (tried a claim length later) instead.
const BESIDE_WAITING_MAX: usize = 10_000;

/// The longest a provider's `Retry-After` holds a wallet's pushes on this node.
const HOLD_MAX: Duration = Duration::from_secs(3600);
/// Holds kept at most; beyond it, the ones over are dropped first, then no new one is kept
/// (a push then tries again when its claim runs out, as without a hold).
const HELD_MAX: usize = 100_000;

impl Ctx {
    /// The push of `conn` through `provider` must not ask before the returned instant.
    fn held_until(&self, provider: &'static str, conn: &str) -> Option<Instant> {
        let mut held = self.held.borrow_mut();
        let key = (provider, conn.to_owned());
        match held.get(&key) {
            Some(until) if *until > Instant::now() => Some(*until),
            Some(_) => {
                held.remove(&key);
                None
            }
            None => None,
        }
    }

    fn hold(&self, provider: &'static str, conn: &str, retry_after_ms: u64) {
        // Without a window there is no claim to take the push again: a hold would only drop
        // the wallet's next events too.
        if self.settings.min_interval_ms == 0 {
            return;
        }
        let now = Instant::now();
        let until = now + Duration::from_millis(retry_after_ms).min(HOLD_MAX);
        let mut held = self.held.borrow_mut();
        if held.len() >= HELD_MAX && now.duration_since(self.held_swept.get()) >= Duration::from_secs(1) {
            held.retain(|_, u| *u > now);
            self.held_swept.set(now);
        }
        if held.len() < HELD_MAX {
            held.insert((provider, conn.to_owned()), until);
        }
    }
}

impl Ctx {
    /// The webhook's copy of a push a provider serves: sent by [`webhook_sender`], never
    /// waited for by the push.
    fn webhook_beside(&self, ev: Event, at: Instant) {
        {
            let mut beside = self.beside.borrow_mut();
            if beside.len() >= BESIDE_WAITING_MAX {
                drop(beside);
                self.owe_webhook(ev, WEBHOOK_ROUNDS);
                return;
            }
            beside.push_back((ev, at));
        }
        self.hook_wake.notify_one();
    }

    /// The webhook failed on `ev` (out of tries), whose push a provider serves: the webhook is
    /// owed it ([`Ctx::owed`]), for `rounds` more rounds of tries. Owed whatever the provider
    /// made of the push: one the provider failed too is taken again once its claim runs out,
    /// and the webhook may then get it twice, with the same event id (its receiver drops the
    /// repeat).
    fn owe_webhook(&self, ev: Event, rounds: u32) {
        let mut owed = self.owed.borrow_mut();
        if rounds == 0 || owed.len() >= OWED_MAX {
            tracing::warn!(connection = %ev.conn, event = %ev.id, "webhook event given up for good");
            return;
        }
        let due = Instant::now() + Duration::from_millis(u64::try_from(self.claim_ms).unwrap_or(0));
        owed.push_back(Owed { ev, due, rounds });
    }
}

/// Sends the webhook's events of the pushes a provider serves ([`Ctx::beside`]), at most
/// [`beside_sends_max`] at once, each within [`push_budget`]; one the webhook failed on is
/// owed. Sends the events owed ([`Ctx::owed`]) as they come due, at most [`owed_sends_max`]
/// at once; an event whose connection was deleted, or whose mediation was revoked, since is
/// dropped. Apart from the send slots of the pushes, which a webhook that stays down or asks
/// for long waits would otherwise fill (each send may retry for minutes). When the worker's
/// stop begins, the owed sends are aborted (what is still owed is dropped) and the events
/// beside pushes are still sent, within the stop's grace: returns once none is left.
async fn webhook_sender(ctx: Rc<Ctx>) {
    let beside_room = Arc::new(tokio::sync::Semaphore::new(beside_sends_max(&ctx.settings)));
    let owed_room = Arc::new(tokio::sync::Semaphore::new(owed_sends_max(&ctx.settings)));
    let mut beside = tokio::task::JoinSet::new();
    let mut owed_sends = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctx.hook_wake.notified() => {}
            Some(_) = beside.join_next(), if !beside.is_empty() => {}
        }
        while beside.try_join_next().is_some() {}
        while owed_sends.try_join_next().is_some() {}
        while let Ok(turn) = beside_room.clone().try_acquire_owned() {
            let Some((ev, at)) = ctx.beside.borrow_mut().pop_front() else {
                break;
            };
            let ctx = ctx.clone();
            beside.spawn_local(async move {
                let _turn = turn;
                // Bounded as a push is: with_retries ends within it, short of a hung store.
                let budget = push_budget(&ctx.settings);
                match tokio::time::timeout(budget, with_retries(&ctx, "webhook", &ev, at)).await {
                    Ok(Tried::GaveUp) | Err(_) => ctx.owe_webhook(ev, WEBHOOK_ROUNDS),
                    Ok(Tried::Done | Tried::Back | Tried::Folded) => {}
                }
            });
        }
        if ctx.stopping.get() {
            owed_sends.abort_all();
            if ctx.pushes_ended.get() && beside.is_empty() && ctx.beside.borrow().is_empty() {
                return;
            }
            continue;
        }
        let now = Instant::now();
        loop {
            let Ok(turn) = owed_room.clone().try_acquire_owned() else {
                break;
            };
            let due = {
                let mut owed = ctx.owed.borrow_mut();
                match owed.front() {
                    Some(o) if o.due <= now => owed.pop_front(),
                    _ => None,
                }
            };
            let Some(o) = due else { break };
            let ctx = ctx.clone();
            owed_sends.spawn_local(async move {
                let _turn = turn;
                // In line with the events' reads ([`STORE_LOOKUPS`]): a burst of owed events
                // after a webhook outage does not take the store's pool.
                let Ok(read) = ctx.lookups.acquire().await else { return };
                let conn = ctx.store.get_connection(&o.ev.conn).await;
                drop(read);
                match conn {
                    Ok(None) => {
                        ctx.metrics.count("webhook", "deleted");
                        return;
                    }
                    Ok(Some(c)) if c.mediation == MediationState::Denied => {
                        ctx.metrics.count("webhook", "revoked");
                        return;
                    }
                    // Unreadable: sent, as a push would be.
                    Ok(Some(_)) | Err(_) => {}
                }
                if with_retries(&ctx, "webhook", &o.ev, Instant::now()).await == Tried::GaveUp {
                    ctx.owe_webhook(o.ev, o.rounds - 1);
                }
            });
        }
    }
}

/// Webhook events beside a provider's pushes sent at once ([`webhook_sender`]): as many as
/// the node's pushes at once, `max_in_flight`.
fn beside_sends_max(s: &PushSettings) -> usize {
    s.max_in_flight
}

/// Connections of the webhook's client: the pushes whose one channel it is, its events beside
/// a provider and its owed events, all at once.
fn webhook_connections(s: &PushSettings) -> usize {
    s.max_in_flight
        .saturating_add(beside_sends_max(s))
        .saturating_add(owed_sends_max(s))
}

/// Owed webhook events sent at once ([`webhook_sender`]): an eighth of `max_in_flight`, at
/// least one.
fn owed_sends_max(s: &PushSettings) -> usize {
    (s.max_in_flight / 8).max(1)
}

/// Events of the push worker in the store at once (their device lookup, their window): a
/// fraction of a PostgreSQL pool (16 by default), the rest left to forwards and deliveries.
const STORE_LOOKUPS: usize = 8;

/// Events started and not ended, at most, beyond the pushes `max_in_flight` lets out at once:
/// the events reading or recording in the store ([`STORE_LOOKUPS`]) and as many again ready to.
fn events_running_max(s: &PushSettings) -> usize {
    s.max_in_flight + 2 * STORE_LOOKUPS
}

async fn worker(settings: PushSettings, deps: Deps, mut rx: mpsc::Receiver<Queued>, mut stop_rx: mpsc::Receiver<Stop>) {
    let built = Ctx::new(&settings, &deps);
    let ctx = match built {
        Ok(c) => Rc::new(c),
        Err(e) => {
            tracing::error!("push worker not started: {e}");
            return;
        }
    };
    let window = settings.min_interval_ms;
    // Windows idle this long are forgotten.
    let keep_ms = windows_kept_ms(&settings, &deps);
    // Trailing pushes are due at most this late (any node's poll may take them).
    let mut poll = tokio::time::interval(Duration::from_millis((window as u64 / 4).clamp(50, 1000)));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(
        fcm_projects = settings.fcm.len(),
        apns = settings.apns.is_some(),
        webhook = settings.webhook.is_some(),
        min_interval_ms = window,
        "push notifications on"
    );
    // Every push this worker starts, so that a stop can let them finish. Events wait in
    // `waiting` (one per wallet) until fewer than `running_max` run: a flood of events is
    // bounded there and in the channel, not in tasks waiting on the store or a send slot.
    let mut in_flight: tokio::task::JoinSet<Next> = tokio::task::JoinSet::new();
    let mut waiting = waiting::Waiting::default();
    let running_max = events_running_max(&settings);
    let claimed_max = settings.max_in_flight + CLAIMED_WAITING_MAX;
    let mut tasks = Tasks::default();
    // As the stop begins it drops what the webhook is still owed (the stop's grace is the
    // pushes'), and sends the events of the pushes, within the grace.
    let mut hooks = settings
        .webhook
        .is_some()
        .then(|| tokio::task::spawn_local(webhook_sender(ctx.clone())));
    let done = loop {
        tasks.start_events(&ctx, &mut waiting, running_max, &mut in_flight);
        ctx.metrics.waiting.set(waiting.len() as i64);
        tokio::select! {
            stop = stop_rx.recv() => {
                ctx.stopping.set(true);
                break stop;
            }
            ev = rx.recv(), if waiting.len() < WAITING_MAX => match ev {
                None => break None,
                Some(q) => {
                    let p = q.pending();
                    waiting.add(q.conn, p);
                }
            },
            Some(r) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                tasks.ended(&ctx, r, &mut waiting, claimed_max, &mut in_flight);
            }
            // One poll at a time, in a task of its own: it waits for a send slot in line with
            // the immediate pushes (a slot taken only when free would go to them first for as
            // long as they keep coming, and the trailing pushes wait without end).
            _ = poll.tick(), if window > 0 && tasks.poller.is_none() => {
                let task = in_flight.spawn_local(poll_due(ctx.clone(), keep_ms));
                tasks.poller = Some(task.id());
            }
        }
    };
    // (Also when the channel closed.)
    ctx.stopping.set(true);
    ctx.hook_wake.notify_one();
    // The events handed over before the stop are handled too, as room frees, within the grace.
    rx.close();
    while let Ok(q) = rx.try_recv() {
        let p = q.pending();
        waiting.add(q.conn, p);
    }
    let grace_ends = tokio::time::Instant::now() + STOP_GRACE;
    let drained = tokio::time::timeout_at(grace_ends, async {
        loop {
            tasks.start_events(&ctx, &mut waiting, running_max, &mut in_flight);
            match in_flight.join_next_with_id().await {
                Some(r) => tasks.ended(&ctx, r, &mut waiting, claimed_max, &mut in_flight),
                None => break,
            }
        }
    })
    .await;
    ctx.metrics.waiting.set(waiting.len() as i64);
    let finished = drained.is_ok();
    if !finished {
        tracing::warn!(
            abandoned = in_flight.len(),
            not_started = waiting.len(),
            "push worker stopped with pushes still in flight after {STOP_GRACE:?}"
        );
        in_flight.abort_all();
    }
    // No push is left to hand the webhook an event: its sender ends once it sent those it has,
    // within what is left of the grace. Not counted in `finished`, as the events still owed
    // are not: those pushes' wake-ups went through their providers, and a webhook event left
    // unsent leaves no wallet asleep.
    ctx.pushes_ended.set(true);
    ctx.hook_wake.notify_one();
    if let Some(hooks) = hooks.as_mut() {
        if tokio::time::timeout_at(grace_ends, &mut *hooks).await.is_err() {
            tracing::warn!("push worker stopped with webhook events unsent after {STOP_GRACE:?}");
            hooks.abort();
        }
    }
    tracing::info!("push worker stopped");
    if let Some(done) = done {
        let _ = done.send(finished);
    }
}

impl Queued {
    fn pending(&self) -> waiting::Pending {
        waiting::Pending {
            at: self.at,
            unless_pushed_since_ms: self.unless_pushed_since_ms,
            folded: 0,
        }
    }
}

/// The worker's tasks that count against a bound, by task id (a task that panicked is known
/// by its id only): events in their turn, and claimed pushes waiting for a slot or being sent.
#[derive(Default)]
struct Tasks {
    /// The wallet of each event task.
    events: HashMap<tokio::task::Id, String>,
    claimed: HashSet<tokio::task::Id>,
    /// The poll for trailing pushes under way.
    poller: Option<tokio::task::Id>,
}

type JoinAnswer = Result<(tokio::task::Id, Next), tokio::task::JoinError>;

impl Tasks {
    /// Starts the waiting events that may start, while fewer than `running_max` run.
    fn start_events(
        &mut self,
        ctx: &Rc<Ctx>,
        waiting: &mut waiting::Waiting,
        running_max: usize,
        in_flight: &mut tokio::task::JoinSet<Next>,
    ) {
        while waiting.running() < running_max {
            let Some((conn, p)) = waiting.next() else { break };
            let ctx = ctx.clone();
            let event = conn.clone();
            let task = in_flight.spawn_local(async move {
                match on_event(ctx, event, p).await {
                    Some(c) => Next::Claimed(c),
                    None => Next::Nothing,
                }
            });
            self.events.insert(task.id(), conn);
        }
    }

    /// A task ended: an event frees its wallet's place, and the push it claimed, if any, waits
    /// for its slot in a task of its own (at most `claimed_max` such; past it, left to its
    /// claim); the trailing pushes a poll took start.
    fn ended(
        &mut self,
        ctx: &Rc<Ctx>,
        r: JoinAnswer,
        waiting: &mut waiting::Waiting,
        claimed_max: usize,
        in_flight: &mut tokio::task::JoinSet<Next>,
    ) {
        let (id, next) = match r {
            Ok((id, next)) => (id, next),
            Err(e) => (e.id(), Next::Nothing),
        };
        if let Some(conn) = self.events.remove(&id) {
            waiting.done(&conn);
        }
        self.claimed.remove(&id);
        if self.poller == Some(id) {
            self.poller = None;
        }
        let c = match next {
            Next::Nothing => return,
            Next::Claimed(c) => c,
            Next::Due { due, taken } => {
                for (claim, slot) in due {
                    let push = claimed_push(ctx.clone(), claim, slot, taken, Instant::now(), None);
                    in_flight.spawn_local(async move {
                        push.await;
                        Next::Nothing
                    });
                }
                return;
            }
        };
        if self.claimed.len() >= claimed_max {
            tracing::warn!(connection = %c.claim.conn, "too many pushes waiting for a slot: this one left to its claim");
            return;
        }
        let ctx = ctx.clone();
        let task = in_flight.spawn_local(async move {
            wait_and_push(ctx, c).await;
            Next::Nothing
        });
        self.claimed.insert(task.id());
    }
}

/// Trailing pushes one poll takes at most.
const TAKE_DUE_BATCH: usize = 256;

/// The pause before the device lookup of an event is tried again after the store failed it
/// the `retry`th time (from 1; a pool timeout under load, a failover, an outage): 0.5 s, then
/// twice the last, at most 30 s, for [`DEVICE_LOOKUP_RETRIES`] retries (about 3.5 minutes in
/// all). The event is
/// the wallet's only wake-up, and a later event may never come; meanwhile the wallet's later
/// events fold into one waiting behind it, so an outage holds one event per wallet.
fn device_lookup_pause(retry: u32) -> Duration {
    let ms = 500u64.saturating_mul(2u64.saturating_pow(retry.saturating_sub(1)));
    Duration::from_millis(ms.min(30_000))
}

/// Device lookups of one event the store may fail, after the first, before the event gives up.
const DEVICE_LOOKUP_RETRIES: u32 = 12;

/// An immediate push an event claimed in the store ([`PushSlot::Now`]), to be sent by a task
/// of its own once a send slot frees ([`wait_and_push`]): the event's place in the worker is
/// free by then. Its claim outlives it, so one abandoned (a stop, too many waiting) is taken
/// again by a node's poll once the claim ran out.
struct Claimed {
    claim: PushClaim,
    device: Device,
    taken: tokio::time::Instant,
    at: Instant,
}

/// Claimed pushes waiting for a send slot, at most; past it a claimed push is left to its claim
/// (a node's poll sends it once the claim ran out).
const CLAIMED_WAITING_MAX: usize = 8_192;

/// What a worker task leaves for the worker to start.
enum Next {
    Nothing,
    /// An event's immediate push, to wait for its slot.
    Claimed(Claimed),
    /// Trailing pushes a poll took, each with its slot, their budget running from `taken`.
    Due {
        due: Vec<(PushClaim, tokio::sync::OwnedSemaphorePermit)>,
        taken: tokio::time::Instant,
    },
}

/// Takes the trailing pushes that are due, as many as there are free send slots, waiting in
/// line for the first slot. A claim runs from the take: only pushes that start at once are
/// taken, each with its slot held from before the take. The idle windows (`keep_ms`) go too.
async fn poll_due(ctx: Rc<Ctx>, keep_ms: i64) -> Next {
    let Ok(first) = ctx.slots.clone().acquire_owned().await else {
        return Next::Nothing;
    };
    if ctx.stopping.get() {
        return Next::Nothing;
    }
    let mut slots = vec![first];
    while slots.len() < TAKE_DUE_BATCH {
        match ctx.slots.clone().try_acquire_owned() {
            Ok(p) => slots.push(p),
            Err(_) => break,
        }
    }
    // The claim runs from `now`, the push's budget from `taken`, both read before the take: a
    // slow take shortens the budget, never outlasts the claim.
    let taken = tokio::time::Instant::now();
    let now = crate::protocols::now_ms();
    let due = ctx
        .store
        .push_take_due(
            now,
            now.saturating_add(ctx.claim_ms),
            now.saturating_sub(keep_ms),
            slots.len(),
        )
        .await;
    match due {
        Ok(due) => Next::Due {
            due: due.into_iter().zip(slots).collect(),
            taken,
        },
        Err(e) => {
            tracing::warn!("push: trailing pushes not polled: {e}");
            Next::Nothing
        }
    }
}

/// Waits for a send slot within the push's budget, then sends the push ([`claimed_push`]).
async fn wait_and_push(ctx: Rc<Ctx>, c: Claimed) {
    let budget = push_budget(&ctx.settings);
    let Ok(Ok(slot)) = tokio::time::timeout_at(c.taken + budget, ctx.slots.clone().acquire_owned()).await else {
        // Not started within its budget (or the worker stops): its claim runs out and a node
        // takes the push then.
        tracing::warn!(connection = %c.claim.conn, "push not started within its budget: left to its claim");
        return;
    };
    claimed_push(ctx, c.claim, slot, c.taken, c.at, Some(c.device)).await;
}

/// One waiting event (`p`, folded from `p.folded + 1` queued events): a wallet with a device
/// registration gets a push now (returned as [`Claimed`] with a window, sent here without),
/// or the event is folded into its window's trailing push (the window is shared by every
/// node). Returns once the store has answered, with a window: the push then waits for its
/// send slot outside the worker's places.
async fn on_event(ctx: Rc<Ctx>, conn: String, p: waiting::Pending) -> Option<Claimed> {
    let at = p.at;
    let mut retries = 0u32;
    let device = loop {
        let found = {
            let Ok(_turn) = ctx.lookups.acquire().await else {
                return None;
            };
            ctx.store.device_of(&conn).await
        };
        match found {
            Ok(Some(d)) => break d,
            Ok(None) => return None,
            // Only an unavailable store may answer later; a record it cannot read will not.
            Err(e @ crate::store::StoreError::Unavailable(_)) if retries < DEVICE_LOOKUP_RETRIES => {
                retries += 1;
                let pause = device_lookup_pause(retries);
                tracing::debug!(connection = %conn, "device lookup failed, tried again in {pause:?}: {e}");
                ctx.metrics.count("store", "retry");
                tokio::time::sleep(pause).await;
            }
            Err(e @ crate::store::StoreError::Unavailable(_)) => {
                tracing::warn!(connection = %conn, "push skipped: store unavailable: {e}");
                ctx.metrics.count("store", "gave_up");
                return None;
            }
            Err(e) => {
                tracing::warn!(connection = %conn, "push skipped: device not read: {e}");
                ctx.metrics.count("store", "failed");
                return None;
            }
        }
    };
    // The events folded into this one go out with its push (or its window's trailing push).
    let folded = || ctx.metrics.coalesced.inc_by(p.folded);
    let window = ctx.settings.min_interval_ms;
    if window == 0 {
        // No window, so nothing in the store to claim the push with: sent here.
        let Ok(_slot) = ctx.slots.acquire().await else {
            return None;
        };
        folded();
        // Bounded as a claimed push is: a push that outlived its budget would keep its slot,
        // and `max_in_flight` of them every push of the node.
        let budget = push_budget(&ctx.settings);
        if tokio::time::timeout(budget, push_one(&ctx, &conn, None, at, Some(device)))
            .await
            .is_err()
        {
            tracing::warn!(connection = %conn, "push cut off after {budget:?}");
        }
        return None;
    }
    // The claim runs from `now`, the push's budget from `taken`, both read before the event is
    // recorded: waiting for a slot shortens the budget, never outlasts the claim.
    let Ok(turn) = ctx.lookups.acquire().await else {
        return None;
    };
    let taken = tokio::time::Instant::now();
    let now = crate::protocols::now_ms();
    let new_claim = NewClaim::until(now.saturating_add(ctx.claim_ms));
    let recorded = ctx
        .store
        .push_event(&conn, now, window, new_claim, p.unless_pushed_since_ms)
        .await;
    drop(turn);
    match recorded {
        Ok(PushSlot::Now) => {
            folded();
            let claim = PushClaim {
                conn,
                token: new_claim.token,
                push_id: new_claim.token,
            };
            return Some(Claimed {
                claim,
                device,
                taken,
                at,
            });
        }
        Ok(PushSlot::Trailing { .. }) | Ok(PushSlot::PushedSince) => {
            ctx.metrics.coalesced.inc();
            folded();
        }
        Err(e) => {
            // Better a push too many than a wallet left asleep: pushed at once, as a claimed
            // push. The event may have been recorded all the same (a commit whose answer was
            // lost): its claim would push the wallet again once it ran out. The push ends it by
            // the token made before the call, which ends nothing when the event was not
            // recorded (and a push left unsent then has no claim to be taken again by).
            tracing::warn!(connection = %conn, "push window unavailable, pushing: {e}");
            ctx.metrics.window_unavailable.inc();
            folded();
            return Some(Claimed {
                claim: PushClaim {
                    conn,
                    token: new_claim.token,
                    push_id: new_claim.token,
                },
                device,
                taken,
                at,
            });
        }
    }
    None
}

/// A push this node claimed (a trailing one from [`crate::store::Store::push_take_due`],
/// `device` `None`; an immediate one from [`crate::store::Store::push_event`], with the
/// registration read for it), holding its slot: sent within [`push_budget`] of `taken`, then
/// its claim is ended, unless it could not be sent for a reason that may pass or was cut off
/// at the end of its budget. Then (or if the
/// node dies or stops first) the claim runs out and any node takes the push again.
async fn claimed_push(
    ctx: Rc<Ctx>,
    claim: PushClaim,
    slot: tokio::sync::OwnedSemaphorePermit,
    taken: tokio::time::Instant,
    at: Instant,
    device: Option<Device>,
) {
    let budget = push_budget(&ctx.settings);
    let (mut claim, mut device) = (claim, device);
    let reopen = loop {
        let push = push_one(&ctx, &claim.conn, Some(claim.push_id), at, device.take());
        let ended = match tokio::time::timeout_at(taken + budget, push).await {
            Ok(ended) => ended,
            // Cut off (a provider slow to answer, or the wait for a slot took most of the
            // budget): the claim runs out and a node takes the push again. A push too many (the
            // provider may have taken the one cut off) rather than a wallet left asleep.
            Err(_) => {
                tracing::warn!(connection = %claim.conn, "push cut off after {budget:?}: left to its claim");
                Ended::Unsent
            }
        };
        break match ended {
            Ended::ForGood => None,
            // Not a push: the window is as if it had not been taken. Unless this claim took the
            // push again after an earlier claim ran out (its `push_id` is that claim's token):
            // the earlier one may have sent it just before its node died or its budget ended,
            // and the window must count that push.
            Ended::Nothing if claim.push_id == claim.token => Some(ctx.settings.min_interval_ms),
            Ended::Nothing => None,
            Ended::Unsent => return,
            Ended::PutOff => match put_off(&ctx, &claim).await {
                // The window passed meanwhile: the push's claim is this node's again, now.
                Some(again) => {
                    claim = again;
                    continue;
                }
                None => return,
            },
        };
    };
    drop(slot);
    if let Err(e) = ctx.store.push_done(&claim.conn, claim.token, reopen).await {
        // Its claim runs out: another node (or this one) pushes again then.
        tracing::warn!(connection = %claim.conn, "push not marked done: {e}");
    }
}

/// A push folded into another connection's push to the same device ([`devices`]) goes out at
/// its window's end instead: an event recorded now schedules the window's trailing push (taken
/// by any node when due), and only then does its claim end, as a push (the window counts it).
/// The trailing push is sent unless the wallet came back or picked up, or the device was
/// pushed again meanwhile (put off once more). Not left to its claim: that would hold the
/// wallet's wake-up for a claim's length (minutes), not a window's. If the event cannot be
/// recorded, the claim is left to run out (a node takes the push again then); if the window
/// passed meanwhile, the event took a new claim for this node: returned, to push now.
async fn put_off(ctx: &Ctx, claim: &PushClaim) -> Option<PushClaim> {
    let now = crate::protocols::now_ms();
    let again = NewClaim::until(now.saturating_add(ctx.claim_ms));
    match ctx
        .store
        .push_event(&claim.conn, now, ctx.settings.min_interval_ms, again, None)
        .await
    {
        Ok(PushSlot::Trailing { .. }) | Ok(PushSlot::PushedSince) => {
            if let Err(e) = ctx.store.push_done(&claim.conn, claim.token, None).await {
                // Its claim runs out and a node pushes again then: a push too many at worst.
                tracing::warn!(connection = %claim.conn, "put-off push not marked done: {e}");
            }
            None
        }
        Ok(PushSlot::Now) => Some(PushClaim {
            conn: claim.conn.clone(),
            token: again.token,
            push_id: again.token,
        }),
        Err(e) => {
            tracing::warn!(connection = %claim.conn, "push put off and not scheduled: left to its claim: {e}");
            None
        }
    }
}

/// How a push ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Sent, nothing to send (the connection deleted or revoked, no provider for the device),
    /// or given up for good (the provider refused it or called the token dead).
    ForGood,
    /// Nothing sent because nothing was to be woken: the wallet is back (a session), its
    /// registration is gone, or a trailing push found no mail queued. The window reopens
    /// ([`Store::push_done`]).
    Nothing,
    /// Not sent for a reason that may pass (the store did not answer, the budget ran out, the
    /// provider kept failing past the tries).
    Unsent,
    /// Not sent to the provider: the device was pushed for another connection within the
    /// window ([`devices`]). Put off to the window's end, as a trailing push.
    PutOff,
}

/// Sends the push of one event, with retries, to the wallet's provider (handing the webhook
/// its copy, [`webhook_sender`]), or to the webhook where no provider serves the device; the
/// caller holds a slot. `read_before` is the registration read for an immediate push, `None`
/// for a trailing push (which goes out a window later and must find mail still queued). Either
/// way the session, the registration and the connection are read again here, just before the
/// send: an event may wait long for its slot, and must not push a wallet that came back, a
/// token the wallet unregistered or replaced, or a connection deleted or revoked meanwhile.
/// Only if the store cannot be read again is an immediate push sent with `read_before`.
/// `push_id` names the push ([`PushClaim::push_id`]; `None` without a window): the event's id
/// is derived from it, the same on each retake of the push.
async fn push_one(ctx: &Ctx, conn: &str, push_id: Option<i64>, at: Instant, read_before: Option<Device>) -> Ended {
    let trailing = read_before.is_none();
    // The wallet may be back, or have picked up, since the event.
    if ctx.presence.online(conn).await {
        return Ended::Nothing;
    }
    // In the store as an event is: trailing pushes taken by one poll are many at once.
    let Ok(turn) = ctx.lookups.acquire().await else {
        return Ended::Unsent;
    };
    let device = match (ctx.store.device_of(conn).await, read_before) {
        (Ok(Some(d)), _) => d,
        // Unregistered, or the connection deleted, since the event: nothing to wake, and not a
        // push. The window reopens: a wallet that turns its notifications off and on again
        // (a new token) within it has its next message pushed at once, not a window later.
        (Ok(None), Some(d)) => {
            ctx.metrics.count(d.service.as_str(), "unregistered");
            tracing::debug!(connection = %conn, "push skipped: unregistered since the event");
            return Ended::Nothing;
        }
        (Ok(None), None) => return Ended::Nothing,
        // Better a push too many than a wallet left asleep: its event is its only wake-up.
        (Err(e), Some(d)) => {
            tracing::debug!(connection = %conn, "registration not read again, pushing the one read for the event: {e}");
            d
        }
        (Err(e), None) => {
            tracing::warn!(connection = %conn, "push skipped: store unavailable: {e}");
            ctx.metrics.count("store", "failed");
            return Ended::Unsent;
        }
    };
    // The connection was deleted, or the operator revoked its mediation, after the mail was
    // queued (on revocation the queue and the device are kept, pickup refuses it): a push
    // would wake a wallet that can take nothing, and give a webhook a connection that is
    // gone. Unreadable, it is pushed: better a push too many.
    match ctx.store.get_connection(conn).await {
        Ok(None) => {
            ctx.metrics.count(device.service.as_str(), "deleted");
            tracing::debug!(connection = %conn, "push skipped: connection deleted");
            return Ended::ForGood;
        }
        Ok(Some(c)) if c.mediation == MediationState::Denied => {
            ctx.metrics.count(device.service.as_str(), "revoked");
            tracing::debug!(connection = %conn, "push skipped: mediation revoked");
            return Ended::ForGood;
        }
        Ok(Some(_)) | Err(_) => {}
    }
    let count = match ctx.store.queue_stats(conn, crate::protocols::now_ms()).await {
        Ok(q) => q.pending + q.leased,
        Err(_) => 1,
    };
    drop(turn);
    if trailing && count == 0 {
        return Ended::Nothing;
    }
    let ev = Event {
        id: push_id.map_or_else(crate::didcomm::message::new_id, |p| event_id(conn, p)),
        conn: conn.to_owned(),
        service: device.service,
        token: device.token.clone(),
        platform: device.platform.clone(),
        count,
    };
    let provider = match (device.service, ctx.fcm.is_empty(), ctx.apns.is_some()) {
        (PushService::Fcm, false, _) => Some("fcm"),
        (PushService::Apns, _, true) => Some("apns"),
        _ => None,
    };
    let window = Duration::from_millis(u64::try_from(ctx.settings.min_interval_ms).unwrap_or(0));
    let tried = match provider {
        Some(p) => {
            // The webhook gets every push event, beside the provider, which alone decides the
            // push: a webhook that hangs or asks for long waits must not hold this push (its
            // slot, its claim) and run it past its budget, to be taken again and pushed twice.
            if ctx.settings.webhook.is_some() {
                ctx.webhook_beside(ev.clone(), at);
            }
            let to = devices::Device::of(ev.service, &ev.token, ev.platform.as_deref());
            match devices::begin(&ctx.devices, to, conn, window, Instant::now()) {
                // Ends with the push (sent, failed or cut off).
                Some(_flight) => with_retries(ctx, p, &ev, at).await,
                None => {
                    ctx.metrics.count(p, "device_pushed");
                    tracing::debug!(connection = %conn, provider = p, "push put off: its device was pushed for another connection within the window");
                    Tried::Folded
                }
            }
        }
        None if ctx.settings.webhook.is_none() => {
            ctx.metrics.count(device.service.as_str(), "no_provider");
            tracing::debug!(connection = %conn, service = device.service.as_str(), "no provider configured for this device");
            Tried::Done
        }
        // The wallet's one channel: the webhook is the push.
        None => with_retries(ctx, "webhook", &ev, at).await,
    };
    match tried {
        Tried::Done => Ended::ForGood,
        Tried::Folded => Ended::PutOff,
        // The provider kept failing for reasons that may pass (429, 5xx, no answer), or asked
        // for a wait past `retry_max_ms`: the wake-up is not given up, its claim is left to run
        // out and a node's poll takes the push again then ([`claim_length`] after it was
        // claimed; without a window there is no claim, and the wallet's next event pushes).
        Tried::GaveUp => Ended::Unsent,
        Tried::Back => Ended::Nothing,
    }
}

/// The id of push `push_id` of `conn` ([`Event::id`]): a UUID derived from both, so every
/// node that takes the push (again) sends the same one.
pub fn event_id(conn: &str, push_id: i64) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"mailroom/push-event/1");
    h.update((conn.len() as u64).to_be_bytes());
    h.update(conn.as_bytes());
    h.update(push_id.to_be_bytes());
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    uuid::Builder::from_random_bytes(u).into_uuid().to_string()
}

/// How a provider's tries ended.
#[derive(Debug, PartialEq, Eq)]
enum Tried {
    /// Sent, or refused for good (a dead token, a request it will never take).
    Done,
    /// Out of tries on failures that may pass, or told to wait past `retry_max_ms`.
    GaveUp,
    /// The wallet came back while the push waited to be tried again: not pushed, as if it
    /// had been back at the first try.
    Back,
    /// Not asked: the device was pushed for another connection within the window
    /// ([`devices`]).
    Folded,
}

async fn try_once(ctx: &Ctx, provider: &'static str, ev: &Event) -> Outcome {
    match provider {
        "fcm" => ctx.fcm.send(&ctx.transport, ev).await,
        "apns" => match &ctx.apns {
            Some(a) => a.send(&ctx.transport, ev).await,
            None => Outcome::Failed("APNs not configured".into()),
        },
        _ => match (&ctx.settings.webhook, &ctx.hook_transport) {
            (Some(w), Some(t)) => webhook::send(t, w, &ctx.node_id, ev).await,
            _ => Outcome::Failed("webhook not configured".into()),
        },
    }
}

async fn with_retries(ctx: &Ctx, provider: &'static str, ev: &Event, at: Instant) -> Tried {
    let s = &ctx.settings;
    if let Some(until) = ctx.held_until(provider, &ev.conn) {
        ctx.metrics.count(provider, "held");
        tracing::debug!(connection = %ev.conn, provider, wait_ms = until.saturating_duration_since(Instant::now()).as_millis() as u64, "push held: the provider asked for a wait");
        return Tried::GaveUp;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_once(ctx, provider, ev).await {
            Outcome::Sent => {
                ctx.metrics.count(provider, "sent");
                if provider != "webhook" {
                    let window = Duration::from_millis(u64::try_from(s.min_interval_ms).unwrap_or(0));
                    let to = devices::Device::of(ev.service, &ev.token, ev.platform.as_deref());
                    ctx.devices.borrow_mut().accepted(to, &ev.conn, window, Instant::now());
                }
                ctx.metrics
                    .latency
                    .get_or_create(&ProviderLabel {
                        provider: provider.into(),
                    })
                    .observe(at.elapsed().as_secs_f64());
                tracing::debug!(connection = %ev.conn, provider, count = ev.count, "push sent");
                return Tried::Done;
            }
            Outcome::Dead(reason) => {
                ctx.metrics.count(provider, "dead_token");
                // The webhook cannot call a token dead; a provider can.
                match ctx.store.forget_device_token(&ev.conn, &ev.token).await {
                    Ok(true) => {
                        ctx.metrics.dropped_tokens.inc();
                        tracing::info!(connection = %ev.conn, provider, token = %redact(&ev.token), "device token forgotten: {reason}");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(connection = %ev.conn, "dead device token not forgotten: {e}"),
                }
                return Tried::Done;
            }
            Outcome::Failed(reason) => {
                ctx.metrics.count(provider, "failed");
                tracing::warn!(connection = %ev.conn, provider, "push failed: {reason}");
                return Tried::Done;
            }
            Outcome::Retry { retry_after_ms, reason } => {
                let jitter: f64 = rand::random();
                match schedule::retry_delay(
                    attempt,
                    s.max_attempts,
                    retry_after_ms,
                    s.retry_base_ms,
                    s.retry_max_ms,
                    jitter,
                ) {
                    Some(d) => {
                        ctx.metrics.count(provider, "retry");
                        tracing::debug!(connection = %ev.conn, provider, attempt, delay_ms = d, "push retried: {reason}");
                        tokio::time::sleep(Duration::from_millis(d)).await;
                        // Back meanwhile (a wait may last a minute): its session takes the mail,
                        // and a push now would wake a wallet that is awake.
                        if ctx.presence.online(&ev.conn).await {
                            ctx.metrics.count(provider, "online");
                            tracing::debug!(connection = %ev.conn, provider, "push dropped: the wallet came back while it was retried");
                            return Tried::Back;
                        }
                    }
                    None => {
                        if let Some(ra) = retry_after_ms {
                            ctx.hold(provider, &ev.conn, ra);
                        }
                        ctx.metrics.count(provider, "gave_up");
                        tracing::warn!(connection = %ev.conn, provider, attempt, "push given up for now: {reason}");
                        return Tried::GaveUp;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figures the docs and the README give for the defaults without FCM.
    #[test]
    fn a_claim_outlasts_the_push_budget() {
        let c: PushConfig =
            toml::from_str("[webhook]\nurl = \"https://h.example/x\"\nsecret = \"hunter2hunter2hunter2\"\n").unwrap();
        let s = c.load().unwrap();
        assert_eq!(push_budget(&s), Duration::from_secs(340));
        assert_eq!(claim_length(&s), Duration::from_secs(345));
        let mut two = c.clone();
        two.max_attempts = 1;
        let s = two.load().unwrap();
        assert_eq!(push_budget(&s), Duration::from_secs(20), "one try: no wait");
    }

    /// A session of a node this node sees down (its claims not swept from the directory yet)
    /// died with it: its wallet has no live session, as a notification finds it, and is
    /// pushed. Before, the push read the directory's raw owner and found the wallet online:
    /// nothing woke it.
    #[actix_rt::test]
    async fn a_session_of_a_node_found_down_is_not_presence() {
        use actix::Actor;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = crate::cluster::PeerConfig {
            id: "n2".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let cfg = crate::cluster::ClusterConfig::new("n1", "c", "s", vec![peer]);
        let (events, _events_rx) = mpsc::channel(16);
        let cluster = crate::cluster::ClusterHandle::start(cfg, listener, events)
            .await
            .unwrap();
        let presence = crate::session::NodePresence {
            registry: crate::registry::Registry::new(Some(cluster.clone())).start(),
            cluster: Some(cluster.clone()),
        };
        // n2 takes no link (nothing listens at its address): down, its claim still listed.
        cluster.claim_for_test("gone", "n2");
        assert_eq!(cluster.owner_of("gone").as_deref(), Some("n2"));
        assert!(!presence.online("gone").await, "a down node's session counted as live");
        cluster.claim_for_test("here", "n1");
        assert!(presence.online("here").await, "this node's own claim");
        cluster.shutdown().await;
    }

    /// An FCM project may take four requests a try (grant, send answered 401, grant, send);
    /// a budget of two cut such a push off before its second send.
    #[test]
    fn the_push_budget_counts_four_requests_per_fcm_project() {
        let c: PushConfig =
            toml::from_str("[webhook]\nurl = \"https://h.example/x\"\nsecret = \"hunter2hunter2hunter2\"\n").unwrap();
        let mut s = c.load().unwrap();
        let project = config::FcmProject {
            account: config::ServiceAccount {
                project_id: "p".into(),
                client_email: "e@x".into(),
                private_key_id: None,
                private_key: config::Secret(String::new()),
                token_uri: "https://oauth2.googleapis.com/token".into(),
            },
            base_url: "https://fcm.googleapis.com".into(),
            notification: None,
            collapse_key: "mailroom".into(),
        };
        s.fcm = vec![project.clone()];
        // The README's figures for the defaults with one FCM project.
        assert_eq!(push_budget(&s), Duration::from_secs(440));
        assert_eq!(claim_length(&s), Duration::from_secs(445));
        s.fcm = vec![project.clone(), project];
        assert_eq!(push_budget(&s), Duration::from_secs(5 * 8 * 10 + 4 * 60));
        s.max_attempts = 1;
        s.fcm.truncate(1);
        assert_eq!(push_budget(&s), Duration::from_secs(40), "one try: four requests");
    }

    struct Away;

    impl Presence for Away {
        fn online<'a>(&'a self, _: &'a str) -> BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
    }

    /// A registration gone between the event and the send (a wallet that turned its
    /// notifications off, to turn them on again with a new token) is nothing to wake, not a
    /// push: the window reopens. Before, the push ended for good, the window stayed closed, and
    /// the wallet's next message, to its new token, waited for the window's trailing push.
    #[actix_rt::test]
    async fn a_registration_gone_before_the_send_reopens_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open_sled(dir.path()).await.unwrap();
        let c: PushConfig =
            toml::from_str("[webhook]\nurl = \"https://h.example/x\"\nsecret = \"hunter2hunter2hunter2\"\n").unwrap();
        let settings = c.load().unwrap();
        let window = settings.min_interval_ms;
        assert!(window > 0);
        let deps = Deps {
            store: store.clone(),
            presence: Arc::new(Away),
            metrics: PushMetrics::default(),
            node_id: "n1".into(),
            keep_windows_ms: 0,
        };
        let ctx = Rc::new(Ctx::new(&settings, &deps).unwrap());
        let device = Device {
            service: PushService::Fcm,
            token: "tok".into(),
            platform: Some("ios".into()),
            updated_at_ms: 0,
        };
        let conn = crate::protocols::granted_connection_for_test("w", "our-key", "their-key");
        store.put_connection(&conn).await.unwrap();
        store.set_device("w", Some(&device)).await.unwrap();
        // The event finds the registration and claims the push.
        let now = crate::protocols::now_ms();
        let claim = NewClaim::until(now + ctx.claim_ms);
        let slot = store.push_event("w", now, window, claim, None).await.unwrap();
        assert!(matches!(slot, PushSlot::Now), "{slot:?}");
        // The wallet unregisters before the send.
        store.set_device("w", None).await.unwrap();
        let at = Instant::now();
        assert_eq!(
            push_one(&ctx, "w", Some(claim.token), at, Some(device.clone())).await,
            Ended::Nothing
        );
        assert_eq!(
            push_one(&ctx, "w", Some(claim.token), at, None).await,
            Ended::Nothing,
            "trailing"
        );
        let permit = ctx.slots.clone().acquire_owned().await.unwrap();
        let claim = PushClaim {
            conn: "w".into(),
            token: claim.token,
            push_id: claim.token,
        };
        claimed_push(
            ctx.clone(),
            claim,
            permit,
            tokio::time::Instant::now(),
            at,
            Some(device.clone()),
        )
        .await;
        // Registered again with a new token: its next message is pushed at once.
        let new = Device {
            token: "tok-2".into(),
            ..device
        };
        store.set_device("w", Some(&new)).await.unwrap();
        let now = crate::protocols::now_ms();
        let again = NewClaim::until(now + ctx.claim_ms);
        let slot = store.push_event("w", now, window, again, None).await.unwrap();
        assert!(matches!(slot, PushSlot::Now), "the window stayed closed: {slot:?}");
    }
}
