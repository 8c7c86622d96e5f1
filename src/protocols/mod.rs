//! The mediator's protocol families, one module each, behind one entry point: [`Mediator::handle`].
//!
//! An envelope comes in from a transport (HTTP POST, WebSocket frame); `handle` unpacks it,
//! finds the connection its sender key belongs to, dispatches on `@type`, and returns an
//! [`Outcome`]: replies to pack, forwards it queued, and what the transport should do next
//! (bind the session to a connection, switch live mode). This module knows nothing of actix
//! or sockets; it reaches durable state only through [`crate::store::Store`].
//!
//! DIDComm v2 families will sit beside these under the same entry point.

pub mod connections;
pub mod didexchange;
pub mod discover;
pub mod mediation;
pub mod oob;
pub mod pickup;
pub mod problem;
pub mod push;
pub mod replay;
pub mod routing;
pub mod trust_ping;
pub mod v2;

pub use didexchange::decode_b64_any;

use crate::config::{Config, Strategy};
use crate::didcomm::envelope::{self, EnvelopeError};
use crate::didcomm::keys::KeyPair;
use crate::didcomm::message::{self, MessageType, ReturnRoute};
use crate::store::{Connection, Identity, MessageId, Store, StoreError};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// The mediator's long-lived keys, kept in the store's identity record so every node of a
/// cluster uses the same ones.
#[derive(Clone)]
pub struct MediatorKeys {
    /// Invitation key: the key of the mediator's DID and of its invitations.
    pub did_key: KeyPair,
    /// The routing key granted to mediatees; senders anoncrypt forwards to it.
    pub routing: KeyPair,
}

impl MediatorKeys {
    pub fn generate() -> MediatorKeys {
        MediatorKeys {
            did_key: KeyPair::generate(),
            routing: KeyPair::generate(),
        }
    }

    pub fn to_identity(&self, now_ms: i64) -> Identity {
        Identity {
            created_at_ms: now_ms,
            secrets: json!({
                "did_seed": hex::encode(self.did_key.secret_bytes()),
                "routing_seed": hex::encode(self.routing.secret_bytes()),
            }),
        }
    }

    pub fn from_identity(id: &Identity) -> Result<MediatorKeys, String> {
        let seed = |field: &str| -> Result<KeyPair, String> {
            let hexs = id.secrets[field]
                .as_str()
                .ok_or_else(|| format!("identity record lacks {field}"))?;
            let bytes = hex::decode(hexs).map_err(|e| format!("identity {field}: {e}"))?;
            KeyPair::from_secret_bytes(&bytes).map_err(|e| format!("identity {field}: {e}"))
        };
        Ok(MediatorKeys {
            did_key: seed("did_seed")?,
            routing: seed("routing_seed")?,
        })
    }
}

/// What the mediator knows of itself: keys, URLs, DID, delivery settings.
pub struct Mediator {
    pub store: Arc<dyn Store>,
    pub keys: MediatorKeys,
    pub node_id: String,
    pub label: String,
    /// `http(s)://` public URL (the load balancer's).
    pub public_url: String,
    /// `ws(s)://` twin of `public_url`.
    pub public_ws_url: String,
    /// The mediator's DID (did:peer:4 long form), stable for the identity and URLs.
    pub did: String,
    pub strategy: Strategy,
    pub lease_ms: i64,
    pub batch_size: usize,
    /// The payload bytes one delivery (a pickup batch, a live push, an endpoint POST run)
    /// leases at most, beside its count (at least one message is always leased): twice the
    /// largest message the node takes. Without it one delivery-request loaded up to its
    /// connection's whole queue (256 MiB) and packed copies of it.
    pub delivery_max_bytes: usize,
    /// The largest queued payload: the larger of `limits.max_envelope_bytes` and
    /// `limits.max_ws_frame_bytes` (a forward's inner message is smaller than its envelope).
    pub largest_message: usize,
    pub limits: crate::store::EnqueueLimits,
    /// `limits.max_keys_per_connection`.
    pub max_keys_per_connection: usize,
    /// `limits.replay_window_secs` in ms: how long an authenticated message's record refuses
    /// a copy of it ([`replay`]); 0 = off.
    pub replay_window_ms: i64,
    /// The stable id of the public multi-use invitation.
    pub invitation_id: String,
    by_verkey: HashMap<String, KeyPair>,
    /// Authcrypt box keys by (our key, the peer's): one X25519 multiplication per connection,
    /// not one per message.
    box_keys: envelope::BoxKeys,
    /// The DIDComm v2 identity (did:peer:2), derived from the same keys.
    pub v2: v2::V2Identity,
    /// `mediator.v2_legacy_authcrypt`: an authcrypt in a form a co-recipient could forge
    /// (Veramo's) proves its sender ([`crate::didcomm::v2::Unpacked::authcrypt_binds_sender`]).
    pub v2_legacy_authcrypt: bool,
    /// v2 peers' resolved DID documents: a connection's DID is resolved once, not on every
    /// message to it or from it.
    pub(crate) v2_docs: crate::didcomm::v2::did::DocCache,
    /// Where wallets' live sessions are, so a forward is queued leased to its session's node
    /// and handed to it ([`Outcome::handed`]); unset: every forward is queued pending.
    pub holders: std::sync::OnceLock<Arc<dyn Holders>>,
}

/// Where a connection's live session is, for the forward handlers ([`Mediator::holders`]).
pub trait Holders: Send + Sync {
    /// The node (this one included) holding a session of `conn` that delivers as messages
    /// arrive, if messages carrying `len` bytes (payloads and their recipient keys, which a
    /// hand-off repeats per message) may be handed to it there; `None` queues them pending
    /// and wakes whoever holds the session, as before.
    fn holder(&self, conn: &str, len: usize) -> Option<String>;

    /// `conn`'s peer is another DID now (a DIDComm v2 `from_prior`): the sessions bound to it
    /// by the old DID, on every node, are closed, so whoever holds the old DID's keys stops
    /// getting the wallet's mail on a socket opened before the rotation. `kept_owner`, the
    /// lease owner of the transport that carried the rotation (it proved the new DID), keeps
    /// its session.
    fn rotated(&self, conn: &str, kept_owner: &str);
}

/// The lease owner of messages queued leased to `node`'s live sessions ([`Outcome::handed`]):
/// the enqueuing node names it, the holding node releases with it.
pub fn handoff_owner(node: &str) -> String {
    lease_owner(node, "handoff")
}

/// A lease owner of `node`: `<node>/<holder>` (`handoff`, `http`, `endpoint`,
/// `ws/<pid>/<session>`). Every owner is built here, so [`node_owners`] covers them all.
pub fn lease_owner(node: &str, holder: &str) -> String {
    format!("{}{holder}", node_owners(node))
}

/// What every lease owner of `node` starts with ([`lease_owner`]): the prefix that gives back
/// all of a node's leases.
pub fn node_owners(node: &str) -> String {
    format!("{node}/")
}

/// The messages one forward queued for a connection, leased to [`handoff_owner`] of `node`,
/// the node holding the wallet's live session: handed to it.
#[derive(Clone, Debug)]
pub struct Handed {
    pub node: String,
    pub conn: crate::store::ConnId,
    pub msgs: Vec<crate::store::QueuedMessage>,
}

impl Mediator {
    /// Whether a lease of `n` messages and `bytes` payload bytes, taken with at most `batch`
    /// messages and [`Mediator::delivery_max_bytes`], may have left messages behind: it took
    /// its count, or its bytes leave less room than the largest message may need.
    pub fn lease_may_be_cut(&self, n: usize, bytes: usize, batch: usize) -> bool {
        n >= batch || bytes.saturating_add(self.largest_message) > self.delivery_max_bytes
    }

    pub fn new(store: Arc<dyn Store>, keys: MediatorKeys, cfg: &Config, node_id: &str, public_url: &str) -> Mediator {
        let public_url = public_url.trim_end_matches('/').to_string();
        let public_ws_url = crate::config::ws_url(&public_url);
        let did = crate::didcomm::did::create_peer4(
            &keys.did_key.verkey(),
            &[public_url.clone(), public_ws_url.clone()],
            &[],
        );
        let mut by_verkey = HashMap::new();
        by_verkey.insert(keys.did_key.verkey(), keys.did_key.clone());
        by_verkey.insert(keys.routing.verkey(), keys.routing.clone());
        // The public invitation's id is derived from the identity so every node serves the same.
        let invitation_id = uuid_from_bytes(&keys.did_key.public_bytes());
        // Infallible for keys read from an identity record (32-byte seeds) and a public URL the
        // config accepts (at most `config::MAX_PUBLIC_URL_LEN` bytes, each one byte in JSON, so
        // the DID is under the peer-DID cap: tested in `didcomm::v2` and `config`).
        let v2 = v2::V2Identity::derive(&keys, &public_url, &public_ws_url).expect("v2 identity from valid seeds");
        if !crate::didcomm::v2::did::veramo_readable(&v2.did) {
            tracing::warn!(did = %v2.did, "public_url makes a did:peer:2 Veramo cannot resolve (avoid ?, > and ~ in it)");
        }
        let largest_message = cfg.limits.max_envelope_bytes.max(cfg.limits.max_ws_frame_bytes);
        Mediator {
            store,
            node_id: node_id.to_string(),
            label: cfg.mediator.label.clone(),
            public_url,
            public_ws_url,
            did,
            strategy: cfg.delivery.strategy,
            lease_ms: cfg.delivery.lease_ms_i64(),
            batch_size: cfg.delivery.batch_size,
            delivery_max_bytes: largest_message.saturating_mul(2),
            largest_message,
            limits: crate::store::EnqueueLimits {
                max_messages: cfg.limits.max_queue_messages,
                max_bytes: cfg.limits.max_queue_bytes,
                dedup_window_ms: cfg.limits.dedup_window_ms(),
            },
            max_keys_per_connection: cfg.limits.max_keys_per_connection,
            replay_window_ms: cfg.limits.replay_window_ms(),
            invitation_id,
            by_verkey,
            box_keys: envelope::BoxKeys::default(),
            keys,
            v2,
            v2_legacy_authcrypt: cfg.mediator.v2_legacy_authcrypt,
            v2_docs: crate::didcomm::v2::did::DocCache::default(),
            holders: std::sync::OnceLock::new(),
        }
    }

    /// [`Holders::holder`] of `conn`, with the lease a message for it is queued with.
    pub(crate) fn handoff(&self, conn: &str, len: usize, now_ms: i64) -> Option<(String, crate::store::LeaseTo)> {
        let node = self.holders.get()?.holder(conn, len)?;
        let lease = crate::store::LeaseTo {
            owner: handoff_owner(&node),
            until_ms: now_ms.saturating_add(self.lease_ms),
        };
        Some((node, lease))
    }

    pub fn key_for(&self, verkey: &str) -> Option<KeyPair> {
        self.by_verkey.get(verkey).cloned()
    }

    /// Unpacks an envelope with the mediator's keys.
    pub fn unpack(&self, env: &[u8]) -> Result<envelope::Unpacked, EnvelopeError> {
        envelope::unpack_cached(env, &|kid| self.key_for(kid), Some(&self.box_keys))
    }

    /// Packs a message for a connection's own transport (a return route, its socket):
    /// authcrypt from the key the peer talks to, for the peer's key, never wrapped for the
    /// routing keys its DID document lists. Those name the peer's mediators, for messages sent
    /// to its endpoint ([`Mediator::pack_for_endpoint`]); on a transport the peer reads itself
    /// a forward for its mediator is one it cannot open (Credo packs a return route's replies
    /// for the sender's key with no routing keys). Wrapped, each layer also grew a delivery by
    /// a third: 8 MiB of queued messages made ~107 MB for eight routing keys, per pickup.
    pub fn pack_for(&self, conn: &Connection, msg: &Value) -> Result<Vec<u8>, HandleError> {
        self.pack(conn, msg, false)
    }

    /// Packs a message sent to a connection's endpoint (a reply without a return route): as
    /// [`Mediator::pack_for`], then wrapped in a forward for each of its routing keys, innermost
    /// first, as its mediators unwrap it.
    pub fn pack_for_endpoint(&self, conn: &Connection, msg: &Value) -> Result<Vec<u8>, HandleError> {
        self.pack(conn, msg, true)
    }

    fn pack(&self, conn: &Connection, msg: &Value, routed: bool) -> Result<Vec<u8>, HandleError> {
        if conn.protocol == v2::PROTOCOL {
            return v2::pack(self, conn, msg);
        }
        let sender = self
            .key_for(&conn.our_verkey)
            .unwrap_or_else(|| self.keys.did_key.clone());
        if conn.their_verkeys.is_empty() {
            return Err(HandleError::Internal(format!("connection {} has no keys", conn.id)));
        }
        // Queued payloads embedded as their text ([`v2::raw`]: a 1.0 batch, a 2.0 delivery)
        // are written in place; any other reply is what `serde_json::to_vec` writes.
        let body = v2::raw::to_vec(msg, 0).map_err(|e| HandleError::Internal(e.to_string()))?;
        let packed = envelope::pack_cached(
            &body,
            &conn.their_verkeys[..1],
            Some(&sender),
            envelope::PayloadCipher::ChaCha20Poly1305,
            Some(&self.box_keys),
        )
        .map_err(|e| HandleError::Internal(format!("pack: {e}")))?;
        if !routed || conn.their_routing_keys.is_empty() {
            Ok(packed)
        } else {
            envelope::wrap_forward(&packed, &conn.their_verkeys[0], &conn.their_routing_keys)
                .map_err(|e| HandleError::Internal(format!("wrap forward: {e}")))
        }
    }

    /// Handles one inbound envelope. `transport` says what the transport can carry back.
    pub async fn handle(
        &self,
        env: &[u8],
        transport: TransportKind,
        lease_owner: &str,
    ) -> Result<Outcome, HandleError> {
        // A v1 envelope is unpacked without a probe first: only one that v1 cannot open is
        // asked whether it is DIDComm v2 (no v2 form has the v1 protected header's recipients).
        let mut unpacked = match self.unpack(env) {
            Ok(u) => u,
            Err(_) if crate::didcomm::v2::is_v2(env) => {
                return v2::handle(self, env, transport, lease_owner).await;
            }
            Err(e) => return Err(HandleError::Envelope(e)),
        };
        // An authcrypt packed for several recipients proves no sender: each of them holds the
        // content key and can write any payload under the sender's header
        // ([`envelope::Unpacked::recipients`]). It is read as an anoncrypt is (a forward needs
        // no sender), and what needs its sender's connection is refused saying why.
        let shared_authcrypt = (unpacked.sender_verkey.is_some() && unpacked.recipients > 1).then(|| {
            unpacked.sender_verkey = None;
            unpacked.recipients
        });
        // An anoncrypted forward (what senders send a mediator) is read without a JSON tree: it
        // acts on no connection, so it needs none of what the dispatch looks up.
        if unpacked.sender_verkey.is_none() {
            if let Some(f) = routing::RawForward::peek(&unpacked.plaintext) {
                return routing::queue(self, &f).await;
            }
        }
        let msg = read_message(&unpacked.plaintext)?;
        let type_str = msg["@type"].as_str().unwrap_or_default().to_string();
        let mtype = MessageType::parse(&type_str);
        let return_route = message::return_route(&msg);
        let conn = match &unpacked.sender_verkey {
            Some(sk) => self.store.connection_by_their_verkey(sk).await?,
            None => None,
        };
        let ctx = Inbound {
            msg,
            mtype,
            type_str,
            recipient_verkey: unpacked.recipient_verkey,
            sender_verkey: unpacked.sender_verkey,
            conn,
            return_route,
            transport,
            lease_owner: lease_owner.to_string(),
            plaintext: unpacked.plaintext,
            shared_authcrypt,
        };
        // An authenticated message acts once (a copy would act as its sender again): recorded
        // when it can act on a connection, its sender's or one it starts.
        let sight = match &ctx.sender_verkey {
            Some(sk) if ctx.conn.is_some() || ctx.mtype.as_ref().is_some_and(starts_a_connection) => {
                match replay::first_sight(self, replay::Version::V1, sk, &ctx.msg, &ctx.plaintext).await {
                    // A copy of a forward is queued as an anonymous forward is (within the dedup
                    // window a duplicate): it binds nothing to its sender's connection.
                    Err(HandleError::Replayed(_)) if ctx.mtype.as_ref().is_some_and(|t| t.is("routing", "forward")) => {
                        return routing::forward(self, &ctx).await;
                    }
                    r => r?,
                }
            }
            _ => None,
        };
        let result = self.dispatch(&ctx).await;
        replay::settle(self, sight, &result).await;
        let mut out = result?;
        out.return_route = ctx.return_route.clone();
        if out.connection.is_none() {
            out.connection = ctx.conn.clone();
        }
        Ok(out)
    }

    async fn dispatch(&self, ctx: &Inbound) -> Result<Outcome, HandleError> {
        let Some(t) = &ctx.mtype else {
            return problem::unknown_type(self, ctx);
        };
        // A major version other than the one a family is implemented in is another protocol
        // (RFC 0003): answered as an unknown type, never handled as if it were this one (a
        // `didexchange/2.0/request` made a connection, and left no replay record, which only
        // major version 1 gets: `starts_a_connection`). Pickup (1.0 and 2.0) and
        // discover-features (1.0 `query`, 2.0 `queries`) dispatch on their versions themselves.
        let v1 = t.version_numbers().0 == 1;
        match (t.family.as_str(), t.name.as_str()) {
            // Any family's problem report (Credo sends `notification/1.0/problem-report`) is
            // logged, never answered: answering would ping-pong reports forever.
            (_, "problem-report") | (_, "problem_report") => problem::received(self, ctx),
            ("messagepickup", _) => pickup::handle(self, ctx).await,
            ("discover-features", "query") | ("discover-features", "queries") => discover::query(self, ctx),
            _ if !v1 => problem::unknown_type(self, ctx),
            ("routing", "forward") => routing::forward(self, ctx).await,
            ("didexchange", "request") => didexchange::request(self, ctx).await,
            ("didexchange", "complete") => didexchange::complete(self, ctx).await,
            ("connections", "request") => connections::request(self, ctx).await,
            ("out-of-band", "handshake-reuse") => oob::handshake_reuse(self, ctx),
            ("coordinate-mediation", "mediate-request") => mediation::mediate_request(self, ctx).await,
            ("coordinate-mediation", "keylist-update") => mediation::keylist_update(self, ctx).await,
            ("coordinate-mediation", "keylist-query") => mediation::keylist_query(self, ctx).await,
            ("trust_ping", "ping") => trust_ping::ping(self, ctx),
            ("trust_ping", "ping_response") => Ok(Outcome::default()),
            (family, _) if push::service_of(family).is_some() => {
                let service = push::service_of(family).expect("checked by the guard");
                push::handle(self, ctx, service).await
            }
            _ => problem::unknown_type(self, ctx),
        }
    }
}

/// A DIDComm v1 plaintext read into a tree of at most [`v2::MAX_MESSAGE_VALUES`] values, as
/// v2's is: anyone may send one (anoncrypted to the mediator's key), and a 4 MiB body of
/// `[0,0,0,...]` read without a bound built a tree of ~100 MB before it was refused. The
/// largest v1 message a mediator takes (a keylist update of 1,000 keys, a messages-received of
/// 1,000 ids) holds a few thousand.
fn read_message(plaintext: &[u8]) -> Result<Value, HandleError> {
    crate::didcomm::v2::json::object_within(plaintext, v2::MAX_MESSAGE_VALUES)
        .map(Value::Object)
        .map_err(|e| unreadable(e, ""))
}

/// Why a plaintext was not read ([`read_message`], and v2's): `besides` names what the bound
/// on its values did not count.
pub(crate) fn unreadable(e: crate::didcomm::v2::json::TreeError, besides: &str) -> HandleError {
    use crate::didcomm::v2::json::TreeError;
    HandleError::BadMessage(match e {
        TreeError::NotJson(e) => format!("plaintext is not JSON: {e}"),
        TreeError::NotObject => "plaintext is not a JSON object".into(),
        TreeError::TooManyValues(n) => format!("plaintext holds more than {n} JSON values{besides}"),
    })
}

/// A handshake request: it creates the connection of its (authcrypting) sender.
fn starts_a_connection(t: &MessageType) -> bool {
    t.is("didexchange", "request") || t.is("connections", "request")
}

/// What the transport that carried a message can do with replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// An HTTP POST: at most one reply in the response body.
    Http,
    /// A WebSocket session: any number of replies, and live delivery.
    WebSocket,
}

/// One unpacked inbound message with what is known about its sender.
pub struct Inbound {
    pub msg: Value,
    pub mtype: Option<MessageType>,
    pub type_str: String,
    pub recipient_verkey: String,
    pub sender_verkey: Option<String>,
    /// The connection whose key authenticated the message (authcrypt sender), if any.
    pub conn: Option<Connection>,
    pub return_route: ReturnRoute,
    pub transport: TransportKind,
    /// Who leases pickup 2.0 deliveries: the WebSocket session, or the node for HTTP.
    pub lease_owner: String,
    /// The unpacked plaintext `msg` was read from (a forward queues its `msg` as sent).
    pub plaintext: Vec<u8>,
    /// The message came authcrypted for this many recipients: it was read as anoncrypted
    /// (`sender_verkey` and `conn` are `None`), and a refusal for want of a sender says why.
    pub shared_authcrypt: Option<usize>,
}

#[cfg(test)]
impl Inbound {
    /// A message as the HTTP path hands it over, for handler tests: its type read from `msg`,
    /// authcrypted by `sender` (the key of `conn`, when it has one), return-route `all`.
    pub(crate) fn for_test(msg: Value, sender: Option<&str>, conn: Option<&Connection>) -> Inbound {
        let type_str = msg["@type"].as_str().unwrap_or_default().to_string();
        Inbound {
            mtype: MessageType::parse(&type_str),
            type_str,
            msg,
            recipient_verkey: "r".into(),
            sender_verkey: sender.map(str::to_string),
            conn: conn.cloned(),
            return_route: ReturnRoute::All,
            transport: TransportKind::Http,
            lease_owner: "n1/http".into(),
            plaintext: Vec::new(),
            shared_authcrypt: None,
        }
    }
}

impl Inbound {
    pub fn id(&self) -> String {
        self.msg["@id"].as_str().unwrap_or_default().to_string()
    }
    pub fn thid(&self) -> String {
        message::thid(&self.msg)
    }
    /// The connection, or a refusal for messages that need one.
    pub fn require_conn(&self) -> Result<&Connection, HandleError> {
        self.conn.as_ref().ok_or_else(|| self.no_sender())
    }
    /// Why a message that needs a proven sender has none: it came anoncrypted, or authcrypted
    /// for several recipients ([`HandleError::SharedAuthcrypt`]), or from a key no connection
    /// holds.
    pub fn no_sender(&self) -> HandleError {
        match self.shared_authcrypt {
            Some(n) => HandleError::SharedAuthcrypt(n),
            None => HandleError::NoConnection,
        }
    }
    /// A reply to this message of the given name, in the same family, version and prefix.
    pub fn reply(&self, name: &str) -> Value {
        let t = self
            .mtype
            .as_ref()
            .map(|t| t.reply_type(name))
            .unwrap_or_else(|| name.to_string());
        json!({ "@type": t, "@id": message::new_id(), "~thread": { "thid": self.thid() } })
    }
}

/// The result of handling one message.
pub struct Outcome {
    /// Plaintext replies for `connection` (packed by the transport or the sender).
    pub replies: Vec<Value>,
    /// The connection the message came from, or that it created.
    pub connection: Option<Connection>,
    /// Queue ids leased for this transport by a pickup delivery (acked by messages-received).
    pub leased: Vec<MessageId>,
    /// A forward was queued for this connection: wake whoever owns its session.
    pub queued_for: Vec<crate::store::ConnId>,
    /// A forward queued leased to the node of its wallet's live session: hand it over (its
    /// connection is not in `queued_for`).
    pub handed: Option<Handed>,
    /// A forward repeated messages queued before for this connection (duplicates): its wallet
    /// is woken if its queue holds pending messages. The first forward's wake-up may never have
    /// happened: its node stopped between the commit and the answer, or a PostgreSQL batch
    /// answered 503 at its deadline committed after all; the sender's retry is the last event
    /// that can wake (or push) the wallet.
    pub repeated: Option<crate::store::ConnId>,
    /// A forward was answered: the HTTP status to give (202, or a refusal).
    pub forward: Option<ForwardResult>,
    /// A pickup 1.0 batch in `replies[0]`: its messages are leased to the transport's owner,
    /// not removed. pickup 1.0 has no acknowledgement, so the transport removes them once it
    /// has written that reply on the request's own transport (its return route), and gives
    /// them back otherwise: nothing is deleted that was not handed back.
    pub ack_on_return: Option<AckOnReturn>,
    /// pickup 2.0 live-delivery-change.
    pub live_mode: Option<bool>,
    /// pickup 2.0 messages-received acknowledged messages: more may be deliverable.
    pub acked: u64,
    /// For each acknowledged message that had been delivered: milliseconds from delivery to
    /// acknowledgement.
    pub ack_lags_ms: Vec<i64>,
    pub return_route: ReturnRoute,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            replies: Vec::new(),
            connection: None,
            leased: Vec::new(),
            queued_for: Vec::new(),
            handed: None,
            repeated: None,
            forward: None,
            ack_on_return: None,
            live_mode: None,
            acked: 0,
            ack_lags_ms: Vec::new(),
            return_route: ReturnRoute::None,
        }
    }
}

/// Queue ids of one connection handed out with no acknowledgement to come
/// ([`Outcome::ack_on_return`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckOnReturn {
    /// The connection whose key authenticated the request: the ids are of its queue only.
    pub conn: crate::store::ConnId,
    pub ids: Vec<MessageId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForwardResult {
    Queued { duplicate: bool },
}

/// Why a message could not be handled. Mapped to HTTP statuses, WebSocket error frames or
/// problem reports in one place ([`HandleError::http_status`], [`problem`]).
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("envelope: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("bad message: {0}")]
    BadMessage(String),
    #[error("no connection: the sender key is not one of a connection of this mediator")]
    NoConnection,
    #[error("forward to unknown recipient key {0}")]
    UnknownRecipient(String),
    #[error("invitation {0} was single-use and is already used")]
    InvitationUsed(String),
    /// A handshake whose authcrypt sender key is not in the DID document it presents (or that
    /// is anoncrypted): nothing proves the sender holds the keys it claims.
    #[error("no proof of possession: the request must be authcrypted with a key of the DID document it presents")]
    Unproven,
    /// An authcrypt packed for several recipients: any of them could have written it under its
    /// sender's header, so it proves no sender and acts on no connection.
    #[error(
        "an authcrypt packed for {0} recipients proves no sender (any recipient could have written it): \
         pack for the mediator's key alone"
    )]
    SharedAuthcrypt(usize),
    /// A handshake presenting a key another connection holds.
    #[error("key {0} belongs to another connection")]
    KeyTaken(String),
    /// A DIDComm v2 `from_prior` (DID rotation) that does not prove the rotation it claims.
    #[error("DID rotation refused: {0}")]
    Rotation(String),
    /// A copy of an authenticated message handled before ([`replay`]): it acts once.
    #[error("message {0} from this sender was received before: a replay is not handled")]
    Replayed(String),
    /// A DIDComm v2 message refused by its `created_time` or `expires_time` ([`replay`]).
    #[error("{0}")]
    Stale(String),
    #[error("queue full for this recipient ({pending} messages, {bytes} bytes): try later")]
    QueueFull { pending: u64, bytes: u64 },
    #[error("store: {0}")]
    Store(StoreError),
    #[error("internal: {0}")]
    Internal(String),
    /// A DIDComm v2 envelope the node cannot open or trust.
    #[error("DIDComm v2 envelope: {0}")]
    V2(crate::didcomm::v2::V2Error),
    /// A refusal of a DIDComm v2 message whose sender is known: `packed` is a report-problem
    /// 2.0 for it, the body of the refusal.
    #[error("{reason}")]
    Problem {
        status: u16,
        code: &'static str,
        reason: String,
        packed: Vec<u8>,
    },
}

impl From<StoreError> for HandleError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::QueueFull { pending, bytes } => HandleError::QueueFull { pending, bytes },
            StoreError::KeyTaken(k) => HandleError::KeyTaken(k),
            // The connection the message acts on was deleted while it was handled (the
            // operator's `DELETE /connections/{id}`): no retry will find it.
            StoreError::NotFound => HandleError::NoConnection,
            other => HandleError::Store(other),
        }
    }
}

impl HandleError {
    /// The HTTP status for this refusal: 4xx for what the client sent, 5xx for our failures.
    pub fn http_status(&self) -> u16 {
        match self {
            HandleError::Envelope(_) | HandleError::BadMessage(_) => 400,
            HandleError::NoConnection
            | HandleError::Unproven
            | HandleError::SharedAuthcrypt(_)
            | HandleError::Rotation(_) => 403,
            HandleError::KeyTaken(_) | HandleError::Replayed(_) => 409,
            HandleError::Stale(_) => 400,
            HandleError::UnknownRecipient(_) => 404,
            HandleError::InvitationUsed(_) => 410,
            HandleError::QueueFull { .. } => 429,
            // 507 Insufficient Storage: the node refuses new messages until its disk has room
            // again; what it holds is still delivered.
            HandleError::Store(StoreError::Full(_)) => 507,
            // Input the store cannot hold (a NUL, a key too long for its index): the sender's
            // to change, not to retry.
            HandleError::Store(StoreError::Invalid(_)) => 400,
            HandleError::Store(_) => 503,
            HandleError::Internal(_) => 500,
            HandleError::V2(_) => 400,
            HandleError::Problem { status, .. } => *status,
        }
    }

    /// A stable short code for logs, metrics and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            HandleError::Envelope(_) => "bad-envelope",
            HandleError::BadMessage(_) => "bad-message",
            HandleError::NoConnection => "no-connection",
            HandleError::Unproven => "no-proof-of-possession",
            HandleError::SharedAuthcrypt(_) => "shared-authcrypt",
            HandleError::KeyTaken(_) => "key-taken",
            HandleError::Rotation(_) => "rotation-refused",
            HandleError::Replayed(_) => "replayed",
            HandleError::Stale(_) => "stale-message",
            HandleError::UnknownRecipient(_) => "unknown-recipient",
            HandleError::InvitationUsed(_) => "invitation-used",
            HandleError::QueueFull { .. } => "queue-full",
            HandleError::Store(StoreError::Full(_)) => "store-full",
            HandleError::Store(StoreError::Invalid(_)) => "unstorable",
            HandleError::Store(_) => "store-unavailable",
            HandleError::Internal(_) => "internal",
            HandleError::V2(_) => "bad-envelope",
            HandleError::Problem { code, .. } => code,
        }
    }

    /// The JSON body of an error answer on HTTP or a WebSocket error frame.
    pub fn body(&self) -> Value {
        json!({ "error": self.code(), "reason": self.reason() })
    }

    /// The refusal's reason as its sender is told it: the log's, except that a full queue does
    /// not say how much it holds (any sender, anonymous too, could read a wallet's backlog).
    pub fn reason(&self) -> String {
        match self {
            HandleError::QueueFull { .. } => "queue full for this recipient: try later".into(),
            e => e.to_string(),
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC time with milliseconds, as Credo writes `lastmod_time`.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.format(&f).unwrap_or_default()
}

fn uuid_from_bytes(b: &[u8; 32]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(b);
    let mut u = [0u8; 16];
    u.copy_from_slice(&h[..16]);
    uuid::Builder::from_random_bytes(u).into_uuid().to_string()
}

/// A mediator on a temporary sled store holding one granted connection, `c1` (unit tests of
/// the protocol families).
#[cfg(test)]
pub(crate) async fn mediator_for_test() -> (Mediator, Connection) {
    let store: std::sync::Arc<dyn crate::store::Store> =
        std::sync::Arc::new(crate::store::SledStore::temporary().await.unwrap());
    let conn = granted_connection_for_test("c1", "ours", "theirs");
    store.put_connection(&conn).await.unwrap();
    let cfg = crate::config::Config::single_node_default();
    let m = Mediator::new(store, MediatorKeys::generate(), &cfg, "n1", "http://127.0.0.1:1");
    (m, conn)
}

/// A completed DID exchange with mediation granted (unit tests of the protocol families).
#[cfg(test)]
pub(crate) fn granted_connection_for_test(id: &str, our_verkey: &str, their_verkey: &str) -> Connection {
    Connection {
        id: id.into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        state: "completed".into(),
        protocol: "didexchange/1.1".into(),
        label: None,
        our_verkey: our_verkey.into(),
        our_did: None,
        their_did: None,
        their_verkeys: vec![their_verkey.into()],
        their_endpoints: vec![],
        their_routing_keys: vec![],
        mediation: crate::store::MediationState::Granted,
        invitation_id: None,
        thread_id: None,
        extra: json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 plaintext is read within the values a mediator's largest message needs: a list of
    /// zeros past them is refused saying why, before a tree of it is built; a keylist update
    /// of 1,000 keys (the most a connection holds by default) is read.
    #[test]
    fn a_plaintext_is_read_within_a_bound_on_its_values() {
        let zeros = format!(r#"{{"@type": "x", "a": [{}0]}}"#, "0,".repeat(v2::MAX_MESSAGE_VALUES));
        match read_message(zeros.as_bytes()) {
            Err(HandleError::BadMessage(why)) => assert!(why.contains("more than"), "{why}"),
            other => panic!("{other:?}"),
        }
        let updates: Vec<Value> = (0..1000)
            .map(|i| json!({"recipient_key": format!("did:key:z{i}"), "action": "add"}))
            .collect();
        let update =
            json!({"@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update", "updates": updates});
        let read = read_message(update.to_string().as_bytes()).unwrap();
        assert_eq!(read["updates"].as_array().unwrap().len(), 1000);
        assert!(matches!(read_message(b"[1]"), Err(HandleError::BadMessage(_))));
        assert!(matches!(read_message(b"{"), Err(HandleError::BadMessage(_))));
    }

    #[test]
    fn rfc3339_has_millis() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
