//! Prometheus metrics (prometheus-client), all named `mailroom_*`. Counters are bumped where
//! things happen; gauges that need the store (queue depth) are refreshed on scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
    /// `v1` | `v2`: the DIDComm version of the connection.
    pub didcomm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
    /// `v1` | `v2` (the envelope's), or `unknown` when refused before one was read.
    pub didcomm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabel {
    /// `local` (a session here took it), `peer` (sent to the session's node), `returned`
    /// (no session took it: released and woken as any new message).
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` (2xx), `failed` (no answer, or not 2xx: a redirect included), `refused` (every
    /// address of the endpoint is one this node may not connect to: session::egress).
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub forwards_received: Counter,
    pub forwards_queued: Counter,
    pub forwards_duplicate: Counter,
    pub delivered: Family<PathLabel, Counter>,
    pub acknowledged: Counter,
    pub redelivered: Counter,
    pub expired: Counter,
    /// Messages dropped undelivered once the sender's expiry (DIDComm v2 `expires_time`) passed.
    pub expired_by_sender: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub sessions: Gauge,
    pub peers_up: Gauge,
    pub queue_depth: Gauge,
    /// Dedup records held by the store (pruned once their window has passed).
    pub dedup_records: Gauge,
    /// Bytes of the sled store's queue log on this node's disk (0 on PostgreSQL).
    pub queue_log_bytes: Gauge,
    pub queue_log_damaged_records: Gauge,
    pub queue_log_damaged_segments: Gauge,
    /// Bytes free on the disk holding the sled store (0 on PostgreSQL or before a reading).
    pub store_disk_free_bytes: Gauge,
    /// 1 while the sled store refuses new messages (free disk under `store.min_free_disk_mib`).
    pub store_refusing_new_messages: Gauge,
    /// Age of the oldest queued message, seconds (0 when the queue is empty).
    pub oldest_message_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub notifications_sent: Counter,
    pub notifications_received: Counter,
    pub notifications_failed: Counter,
    /// Forwards queued leased to their live session's node and handed to it, by outcome.
    pub handoffs: Family<HandoffLabel, Counter>,
    /// POSTs to agents' own endpoints (replies and queued messages), by result (`dropped`: a
    /// reply past its connection's or the node's bound, not sent:
    /// [`crate::session::outbound::ReplySlots`]).
    pub endpoint_posts: Family<ResultLabel, Counter>,
    /// Time to accept one forward durably: unpack, route, commit.
    pub forward_seconds: Histogram,
    /// Delivery to acknowledgement (pickup 2.0 messages-received).
    pub ack_lag: Histogram,
    /// Every store call, by operation (`op` label), whatever the backend.
    pub store_latency: crate::store::metered::StoreLatency,
    /// `mailroom_push_*`.
    pub push: crate::push::PushMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mailroom");
        let m = Metrics {
            forwards_received: Counter::default(),
            forwards_queued: Counter::default(),
            forwards_duplicate: Counter::default(),
            delivered: Family::default(),
            acknowledged: Counter::default(),
            redelivered: Counter::default(),
            expired: Counter::default(),
            expired_by_sender: Counter::default(),
            rejected: Family::default(),
            sessions: Gauge::default(),
            peers_up: Gauge::default(),
            queue_depth: Gauge::default(),
            dedup_records: Gauge::default(),
            queue_log_bytes: Gauge::default(),
            queue_log_damaged_records: Gauge::default(),
            queue_log_damaged_segments: Gauge::default(),
            store_disk_free_bytes: Gauge::default(),
            store_refusing_new_messages: Gauge::default(),
            oldest_message_age: Gauge::default(),
            notifications_sent: Counter::default(),
            notifications_received: Counter::default(),
            notifications_failed: Counter::default(),
            handoffs: Family::default(),
            endpoint_posts: Family::default(),
            forward_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ack_lag: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            store_latency: crate::store::metered::latency_family(),
            push: crate::push::PushMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "forwards_received",
            "Forward messages received",
            m.forwards_received.clone(),
        );
        registry.register(
            "forwards_queued",
            "Forwards committed to the queue",
            m.forwards_queued.clone(),
        );
        registry.register(
            "forwards_duplicate",
            "Forwards dropped as duplicates within the dedup window",
            m.forwards_duplicate.clone(),
        );
        registry.register(
            "delivered",
            "Messages delivered, by path (live, pickup, implicit, endpoint)",
            m.delivered.clone(),
        );
        registry.register(
            "acknowledged",
            "Messages acknowledged by messages-received",
            m.acknowledged.clone(),
        );
        registry.register(
            "redelivered",
            "Messages delivered more than once",
            m.redelivered.clone(),
        );
        registry.register("expired", "Messages removed by the TTL sweep", m.expired.clone());
        registry.register(
            "expired_by_sender",
            "Messages dropped undelivered because the sender's expires_time passed",
            m.expired_by_sender.clone(),
        );
        registry.register("rejected", "Inputs refused, by reason", m.rejected.clone());
        registry.register(
            "sessions",
            "Live WebSocket sessions bound to a connection on this node",
            m.sessions.clone(),
        );
        registry.register("peers_up", "Cluster peers with a live link", m.peers_up.clone());
        registry.register("queue_depth", "Messages queued in the store", m.queue_depth.clone());
        registry.register(
            "dedup_records",
            "Dedup records held in the store (each lives one dedup window)",
            m.dedup_records.clone(),
        );
        registry.register(
            "queue_log_bytes",
            "Bytes of the sled store's queue log segments on this node's disk (0 on PostgreSQL)",
            m.queue_log_bytes.clone(),
        );
        registry.register(
            "queue_log_damaged_records",
            "Records of the sled store's queue log found damaged on the disk since the node started and skipped: each a queued message or a removal lost (0 on PostgreSQL)",
            m.queue_log_damaged_records.clone(),
        );
        registry.register(
            "queue_log_damaged_segments",
            "Segments of the sled store's queue log found damaged since the node started: cut at a damaged record, the records after it lost (the segment as it was kept aside as NNNN.qlog.damaged when the copy could be made), or missing between two others (0 on PostgreSQL)",
            m.queue_log_damaged_segments.clone(),
        );
        registry.register(
            "store_disk_free_bytes",
            "Bytes free on the disk holding the sled store, read every 200 ms (0 on PostgreSQL)",
            m.store_disk_free_bytes.clone(),
        );
        registry.register(
            "store_refusing_new_messages",
            "1 while the sled store refuses new messages (507): its disk has less free space than store.min_free_disk_mib, or it holds store.max_queued_messages",
            m.store_refusing_new_messages.clone(),
        );
        registry.register(
            "oldest_message_age_seconds",
            "Age of the oldest queued message",
            m.oldest_message_age.clone(),
        );
        registry.register(
            "cluster_notifications_sent",
            "Message-queued notifications sent to peers",
            m.notifications_sent.clone(),
        );
        registry.register(
            "cluster_notifications_received",
            "Message-queued notifications received from peers",
            m.notifications_received.clone(),
        );
        registry.register(
            "cluster_notifications_failed",
            "Notifications that could not be sent",
            m.notifications_failed.clone(),
        );
        registry.register(
            "handoffs",
            "Forwards queued leased to the node of their wallet's live session and handed to it (to: local, peer, returned)",
            m.handoffs.clone(),
        );
        registry.register(
            "endpoint_posts",
            "POSTs to agents' own endpoints, replies and queued messages (result: ok, failed, refused; deferred: a try put off, no drain slot free or the endpoint backing off)",
            m.endpoint_posts.clone(),
        );
        registry.register(
            "forward_seconds",
            "Time to accept a forward durably (unpack, route, commit)",
            m.forward_seconds.clone(),
        );
        registry.register(
            "ack_lag_seconds",
            "Time from a delivery to its messages-received",
            m.ack_lag.clone(),
        );
        registry.register(
            "store_seconds",
            "Store call latency by operation",
            m.store_latency.clone(),
        );
        m.push.register(&mut registry);
        Metrics { registry, ..m }
    }

    pub fn delivered(&self, path: &str, didcomm: &str, n: u64) {
        self.delivered
            .get_or_create(&PathLabel {
                path: path.into(),
                didcomm: didcomm.into(),
            })
            .inc_by(n);
    }

    pub fn handed(&self, to: &str, n: u64) {
        self.handoffs.get_or_create(&HandoffLabel { to: to.into() }).inc_by(n);
    }

    pub fn endpoint_post(&self, result: &str) {
        self.endpoint_posts
            .get_or_create(&ResultLabel { result: result.into() })
            .inc();
    }

    pub fn rejected(&self, reason: &str, didcomm: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
                didcomm: didcomm.into(),
            })
            .inc();
    }

    /// Counts acknowledgements and their lag (from the protocol outcome).
    pub fn acknowledged(&self, count: u64, lags_ms: &[i64]) {
        self.acknowledged.inc_by(count);
        for l in lags_ms {
            self.ack_lag.observe(*l as f64 / 1000.0);
        }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}
