//! DIDComm v2 protocol families, mediator side, beside v1's under the same entry point
//! ([`super::Mediator::handle`] hands every v2 envelope to [`handle`]).
//!
//! A v2 peer is a [`Connection`] with `protocol = "didcomm/v2"` whose `their_verkeys` hold its
//! DID (the store's peer-key index is the lookup by DID) and whose routing keys are its
//! registered recipient DIDs; the queue, leases, dedup and limits are v1's. Isolation: a
//! message acts on a connection only when authcrypted (or signed) by that connection's DID,
//! and a plaintext `from` must be that DID.
//!
//! Families: out-of-band 2.0, trust-ping 2.0, discover-features 2.0, report-problem 2.0 (every
//! refusal to a known sender), coordinate-mediation 2.0 and 3.0 over one keylist, routing 2.0
//! forward, messagepickup 3.0 (and 4.0, same messages) over HTTP and WebSocket; `from_prior`
//! DID rotation on any message ([`rotation`]).
//!
//! Replies always come back on the transport that carried the request (Veramo sends
//! mediate-request without `return_route` and waits for the answer in the response; Indicio's
//! live-delivery-change has none either); they are packed in the dialect the peer used
//! (authcrypt with or without the tag in the 1PU KDF: Veramo cannot open draft-04).

pub mod mediation;
pub mod pickup;
pub mod raw;
pub mod recipient;
pub mod rotation;
pub mod routing;

use super::{now_ms, HandleError, MediatorKeys, Outcome, TransportKind};
use crate::didcomm::message::{clip, ReturnRoute};
use crate::didcomm::v2::did::{self, Purpose};
use crate::didcomm::v2::jwe::{Alg, Dialect, Enc};
use crate::didcomm::v2::keys::{self, Agreement, Key};
use crate::didcomm::v2::{self as dv2, V2Error};
use crate::store::Connection;
use askar_crypto::alg::KeyAlg;
use serde_json::{json, Value};

/// `Connection::protocol` of a DIDComm v2 peer.
pub const PROTOCOL: &str = "didcomm/v2";
/// `Connection::extra` field: whether the peer's authcrypt feeds the tag to the 1PU KDF.
const EXTRA_TAG_IN_KDF: &str = "v2_tag_in_kdf";
pub const PREFIX: &str = "https://didcomm.org/";

/// Every v2 protocol this mediator speaks (discover-features 2.0).
pub const PROTOCOLS: &[&str] = &[
    "https://didcomm.org/out-of-band/2.0",
    "https://didcomm.org/trust-ping/2.0",
    "https://didcomm.org/discover-features/2.0",
    "https://didcomm.org/report-problem/2.0",
    "https://didcomm.org/coordinate-mediation/2.0",
    "https://didcomm.org/coordinate-mediation/3.0",
    "https://didcomm.org/routing/2.0",
    "https://didcomm.org/messagepickup/3.0",
    "https://didcomm.org/messagepickup/4.0",
];

/// The mediator's v2 identity: a did:peer:2 with an X25519 keyAgreement key (`#key-1`), an
/// Ed25519 authentication key (`#key-2`) and one `DIDCommMessaging` service per public URI
/// (http first, then ws). Derived from the store's identity record, so every node of a
/// cluster has the same DID.
///
/// The DID names the public URLs too, so a new `public_url` (or, without one, a new bound
/// address) makes a new DID of the same keys. `did` is the one handed out; the DIDs wallets
/// were given before (their routing DIDs, built into every peer DID they handed out) are
/// still this mediator's: any did:peer:2 whose keys are all ours ([`V2Identity::is_ours`]).
#[derive(Clone)]
pub struct V2Identity {
    pub did: String,
    pub agreement: Agreement,
    pub agreement_kid: String,
    pub auth: Key,
    pub auth_kid: String,
    doc: did::Doc,
    /// The did:peer:2 elements of our keys (`E` + X25519 multibase, `V` + Ed25519 multibase).
    agreement_element: String,
    auth_element: String,
}

impl V2Identity {
    pub fn derive(keys: &MediatorKeys, public_url: &str, public_ws_url: &str) -> Result<V2Identity, String> {
        let routing_ed =
            keys::from_secret_bytes(KeyAlg::Ed25519, &keys.routing.secret_bytes()).map_err(|e| e.to_string())?;
        let agreement = keys::ed25519_to_x25519(&routing_ed).map_err(|e| e.to_string())?;
        let auth = keys::from_secret_bytes(KeyAlg::Ed25519, &keys.did_key.secret_bytes()).map_err(|e| e.to_string())?;
        let services = vec![(public_url.to_string(), vec![]), (public_ws_url.to_string(), vec![])];
        let did = did::create_peer2(std::slice::from_ref(&agreement), std::slice::from_ref(&auth), &services)
            .map_err(|e| e.to_string())?;
        let doc = did::resolve(&did).map_err(|e| e.to_string())?;
        Ok(V2Identity {
            agreement_kid: format!("{did}#key-1"),
            auth_kid: format!("{did}#key-2"),
            agreement_element: format!("E{}", keys::to_multibase(&agreement).map_err(|e| e.to_string())?),
            auth_element: format!("V{}", keys::to_multibase(&auth).map_err(|e| e.to_string())?),
            did,
            agreement: Agreement::new(agreement),
            auth,
            doc,
        })
    }

    /// Our private key for a kid (any of its names), in our DID or in another DID of ours
    /// ([`V2Identity::is_ours`]): a forward packed to the routing DID a wallet was given
    /// before the public URL changed.
    pub fn key_for(&self, kid: &str) -> Option<Agreement> {
        if self.doc.key(kid, Purpose::KeyAgreement).is_some() {
            return Some(self.agreement.clone());
        }
        let doc = self.other_doc(did::did_of(kid))?;
        let named = doc.key(kid, Purpose::KeyAgreement)?;
        same_key(&named.key, self.agreement.key()).then(|| self.agreement.clone())
    }

    /// Whether `did` is this mediator's: its DID (`did`), or a did:peer:2 of our keys alone
    /// whatever its services (the DID of our keys under other public URLs). Never a DID that
    /// holds a key of someone else's beside ours: its holder could open, and send on, what is
    /// written to it.
    pub fn is_ours(&self, did: &str) -> bool {
        self.doc.is(did) || self.other_doc(did).is_some()
    }

    /// The document of `did` when it is a did:peer:2 other than ours whose every key is one of
    /// ours, our agreement key among its key agreement keys. Read from the DID alone (no
    /// store), and resolved only once its key elements are seen to be our keys' own: a DID of
    /// anyone else's costs a scan of its text.
    fn other_doc(&self, did: &str) -> Option<did::Doc> {
        let body = did.strip_prefix("did:peer:2.")?;
        if did == self.did || did.len() > crate::didcomm::did::MAX_PEER_DID_LEN {
            return None;
        }
        let mut names_agreement = false;
        for element in body.split('.') {
            match element.chars().next() {
                Some('S') => {}
                _ if element == self.agreement_element => names_agreement = true,
                _ if element == self.auth_element => {}
                _ => return None,
            }
        }
        if !names_agreement {
            return None;
        }
        let doc = did::resolve(did).ok()?;
        let x = self.agreement.key();
        let all_ours = doc
            .methods
            .iter()
            .all(|m| same_key(&m.key, x) || same_key(&m.key, &self.auth));
        let agrees = doc.agreement_keys().iter().any(|(_, k)| same_key(k, x));
        (all_ours && agrees).then_some(doc)
    }

    /// The mediator's DID document.
    pub fn doc_json(&self) -> Value {
        did::to_json(&self.doc)
    }
}

/// Whether two public keys are one (same algorithm, same bytes).
fn same_key(a: &Key, b: &Key) -> bool {
    use askar_crypto::repr::ToPublicBytes;
    a.algorithm() == b.algorithm() && matches!((a.to_public_bytes(), b.to_public_bytes()), (Ok(x), Ok(y)) if x == y)
}

/// Most JSON values of a plaintext message read into [`Inbound::msg`], its attachments left
/// out: the largest messages a mediator reads (100 recipient updates, 1,000 ids received) hold
/// a few thousand. A tree costs 16-32 times the bytes it is read from, and anyone can send a
/// message (a forward or a report needs no sender).
pub const MAX_MESSAGE_VALUES: usize = 16 * 1024;

/// Most characters of a sender's `type` or thread id that logs and problem reports show, as
/// v1 shows of an `@type` (`problem::unknown_type`): a refusal does not carry back, or log,
/// the 100 KB a sender wrote there.
pub const SHOWN_CHARS: usize = 200;

/// One unpacked inbound v2 message with what is known about its sender.
pub struct Inbound {
    /// The message's members but `attachments` (see `read_message`).
    pub msg: Value,
    /// The message as it came, where its attachments are read (routing's forward, as sent).
    pub plaintext: Vec<u8>,
    pub type_str: String,
    pub family: String,
    pub version: String,
    pub name: String,
    /// The DID that authcrypted or signed the message (and `from`, if given, is this DID).
    pub sender: Option<String>,
    /// The connection of `sender`, if it has one.
    pub conn: Option<Connection>,
    pub dialect: Option<Dialect>,
    pub transport: TransportKind,
    pub lease_owner: String,
}

impl Inbound {
    pub fn id(&self) -> &str {
        self.msg["id"].as_str().unwrap_or_default()
    }
    pub fn thid(&self) -> String {
        self.msg["thid"].as_str().unwrap_or(self.id()).to_string()
    }
    /// The thread a problem report names as its parent (`pthid`), and logs show: [`Self::thid`]
    /// clipped to [`SHOWN_CHARS`] (an id is a UUID; a sender's 100 KB one is not repeated).
    pub fn shown_thid(&self) -> String {
        clip(&self.thid(), SHOWN_CHARS).to_string()
    }
    /// This message's `type`, clipped for logs and refusals.
    pub fn shown_type(&self) -> &str {
        clip(&self.type_str, SHOWN_CHARS)
    }
    /// The refusal of a message type this mediator does not handle.
    pub fn unsupported(&self) -> HandleError {
        HandleError::BadMessage(format!("unsupported message type {:?}", self.shown_type()))
    }
    /// A reply of the given name in this message's family and version, threaded.
    pub fn reply(&self, m: &super::Mediator, name: &str, body: Value) -> Value {
        let mut r = json!({
            "id": crate::didcomm::message::new_id(),
            "type": format!("{PREFIX}{}/{}/{name}", self.family, self.version),
            "thid": self.thid(),
            "from": m.v2.did,
            "created_time": now_ms() / 1000,
            "body": body,
        });
        if let Some(s) = &self.sender {
            r["to"] = json!([s]);
        }
        r
    }
    pub fn require_conn(&self) -> Result<&Connection, HandleError> {
        self.conn.as_ref().ok_or(HandleError::NoConnection)
    }
    pub fn major(&self) -> u32 {
        self.version.split('.').next().and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// A plaintext message read into a tree ([`Inbound::msg`]) of at most [`MAX_MESSAGE_VALUES`]
/// values, but its `attachments`: checked to be JSON here, read as sent where they are used
/// (a forward's, megabytes, are queued; no other message's are read).
fn read_message(plaintext: &[u8]) -> Result<Value, HandleError> {
    crate::didcomm::v2::json::object_without(plaintext, "attachments", MAX_MESSAGE_VALUES)
        .map(Value::Object)
        .map_err(|e| super::unreadable(e, " outside its attachments"))
}

fn parse_type(t: &str) -> Option<(String, String, String)> {
    if t.len() > 256 {
        return None;
    }
    let rest = t.strip_prefix(PREFIX)?;
    let mut parts = rest.split('/');
    let family = parts.next()?.to_string();
    let version = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    if parts.next().is_some() || family.is_empty() || name.is_empty() {
        return None;
    }
    Some((family, version, name))
}

impl From<V2Error> for HandleError {
    fn from(e: V2Error) -> Self {
        HandleError::V2(e)
    }
}

/// Handles one v2 envelope. Replies come back on the same transport (return route "all").
pub async fn handle(
    m: &super::Mediator,
    env: &[u8],
    transport: TransportKind,
    lease_owner: &str,
) -> Result<Outcome, HandleError> {
    // The sender's and signers' DIDs: each resolved once, a few at most, and not at all when
    // no recipient of the envelope is ours.
    let mut unpacked = {
        let kids = did::EnvelopeKeys::new(Some(&m.v2_docs));
        dv2::unpack(env, &|kid| m.v2.key_for(kid), &|kid, p| kids.resolve_key(kid, p))?
    };
    let msg = read_message(&unpacked.plaintext)?;
    // An authcrypt that a co-recipient could have forged proves no sender (unless the operator
    // accepts Veramo's form): it may still forward, as anoncrypt does, or be proven by a
    // signature inside it.
    let unbound = unpacked.sender_kid.is_some() && !unpacked.authcrypt_binds_sender() && !m.v2_legacy_authcrypt;
    // Read once, and only when one of the rules below needs it.
    let acts_on_none = (unbound || unpacked.for_others) && acts_on_no_connection(&msg);
    if unbound {
        unpacked.sender_kid = None;
    }
    // A forward or a report that others could open too may come from any of them: it acts as
    // nobody's (it would bind the socket it came on to its sender's connection).
    if unpacked.for_others && acts_on_none {
        unpacked.sender_kid = None;
        unpacked.signer_kid = None;
    }
    let sender = unpacked.authenticated_did().map(str::to_string);
    let signed_only = unpacked.sender_kid.is_none() && unpacked.signer_kid.is_some();
    // A message others can open too may be sent on by them: it must say it is for us.
    let must_name_us = signed_only || (unpacked.for_others && !acts_on_none);
    let refused = refused_before_handling(m, &msg, sender.as_deref(), signed_only, must_name_us).or_else(|| {
        (unbound && sender.is_none() && !acts_on_none).then(|| HandleError::BadMessage(UNBOUND_AUTHCRYPT.into()))
    });
    let conn = match &sender {
        Some(s) => m.store.connection_by_their_verkey(s).await?,
        None => None,
    };
    let type_str = msg["type"].as_str().unwrap_or_default().to_string();
    let (family, version, name) = parse_type(&type_str).unwrap_or_default();
    let mut ctx = Inbound {
        msg,
        plaintext: unpacked.plaintext,
        type_str,
        family,
        version,
        name,
        sender,
        conn,
        dialect: unpacked.dialect,
        transport,
        lease_owner: lease_owner.to_string(),
    };
    let (result, sight) = if let Some(e) = refused {
        (Err(e), None)
    } else {
        match authenticated_once(m, &ctx).await {
            // A copy of a forward is queued as an anonymous forward is (within the dedup window
            // a duplicate): it binds nothing to its sender's connection.
            Err(HandleError::Replayed(_))
                if (ctx.family.as_str(), ctx.major(), ctx.name.as_str()) == ("routing", 2, "forward") =>
            {
                return routing::forward(m, &ctx).await;
            }
            Err(e) => (Err(e), None),
            Ok(sight) => {
                let result = match rotation::apply(m, &mut ctx).await {
                    Ok(()) => dispatch(m, &ctx).await,
                    Err(e) => Err(e),
                };
                (result, sight)
            }
        }
    };
    super::replay::settle(m, sight, &result).await;
    let mut out = match result {
        Ok(o) => o,
        Err(e) => return Err(refusal(m, &ctx, e)),
    };
    out.return_route = ReturnRoute::All;
    if out.connection.is_none() {
        out.connection = ctx.conn.clone().or_else(|| ctx.sender.as_ref().map(|s| ephemeral(s)));
    }
    if let Some(c) = &mut out.connection {
        remember_dialect(c, ctx.dialect);
    }
    Ok(out)
}

/// An authenticated message acts once, and within its times ([`super::replay`]): refused by
/// its `expires_time` or `created_time`, or as a copy of one handled before; else its record.
/// Recorded when the message can act on a connection: its sender's, the one a mediate-request
/// starts, or the one a `from_prior` moves to its sender (a sender with none gets answers, on
/// no stored connection).
async fn authenticated_once(m: &super::Mediator, ctx: &Inbound) -> Result<Option<super::replay::Sight>, HandleError> {
    let Some(sender) = &ctx.sender else { return Ok(None) };
    if let Some(why) = super::replay::refused_by_time(&ctx.msg, now_ms(), m.replay_window_ms) {
        return Err(HandleError::Stale(why));
    }
    let starts_one = ctx.family == "coordinate-mediation" && ctx.name == "mediate-request";
    if ctx.conn.is_none() && !starts_one && ctx.msg.get("from_prior").is_none() {
        return Ok(None);
    }
    super::replay::first_sight(m, super::replay::Version::V2, sender, &ctx.msg, &ctx.plaintext).await
}

/// Pickup 3.0's problem code for live delivery over a transport without a socket.
pub(crate) const LIVE_MODE_NOT_SUPPORTED: &str = "e.m.live-mode-not-supported";

/// Why an authcrypt in a form that does not bind its sender is refused.
const UNBOUND_AUTHCRYPT: &str = "this authcrypt does not prove its sender: ECDH-1PU+A256KW is accepted with \
     A256CBC-HS512, the tag in the key derivation and apv (DIDComm v2); a co-recipient can forge any other form \
     (the operator may accept Veramo's with mediator.v2_legacy_authcrypt)";

/// Messages that need no authenticated sender: a forward (queued for its `next`, acting on no
/// connection of the sender's) and a problem report (logged).
fn acts_on_no_connection(msg: &Value) -> bool {
    let t = msg["type"].as_str().unwrap_or_default();
    matches!(
        parse_type(t),
        Some((f, v, n)) if (f == "routing" && n == "forward" || f == "report-problem" && n == "problem-report")
            && v.split('.').next() == Some("2")
    )
}

/// What refuses a message whatever its type, before it acts on anything:
/// - `from` must be the DID that authenticated the message: a message cannot speak for a DID
///   whose keys did not pack it (Veramo's own mediator does not check this).
/// - An authenticated message's `to`, when present, must name this mediator (the spec's MUST
///   for an encrypted message; an anonymous one can only forward or report, acting on no
///   connection, and is left as senders write it).
/// - A message proven only by its signature must name this mediator in `to`: a signature says
///   who wrote a message, not for whom, so a wallet could otherwise send on a message another
///   wallet signed for it (a ping, say) and act as that wallet here: bind a socket to its
///   connection and take its queue.
/// - So must a message encrypted for others beside this mediator (`must_name_us`, unless it
///   acts on no connection): any of them could send it on here unchanged, and it would open
///   as the sender's.
/// - A signer must have a key agreement key: every handled message is answered, and a reply
///   that cannot be packed would be a 500 after the handler acted.
fn refused_before_handling(
    m: &super::Mediator,
    msg: &Value,
    sender: Option<&str>,
    signed_only: bool,
    must_name_us: bool,
) -> Option<HandleError> {
    if let (Some(from), Some(s)) = (msg["from"].as_str(), sender) {
        if did::did_of(from) != s {
            return Some(HandleError::Unproven);
        }
    }
    let s = sender?;
    let to = &msg["to"];
    if !to.is_null() {
        let ours = to.as_array().is_some_and(|to| {
            to.iter()
                .filter_map(Value::as_str)
                .any(|d| m.v2.is_ours(did::did_of(d)))
        });
        if !ours {
            return Some(HandleError::BadMessage("`to` does not name this mediator".into()));
        }
    } else if signed_only {
        return Some(HandleError::BadMessage(
            "a message proven only by its signature must name this mediator in `to`".into(),
        ));
    } else if must_name_us {
        return Some(HandleError::BadMessage(
            "a message encrypted for others too must name this mediator in `to`".into(),
        ));
    }
    if signed_only {
        let answerable = m.v2_docs.resolve(s).is_ok_and(|d| {
            d.agreement_keys()
                .iter()
                .any(|(_, k)| keys::is_agreement_alg(k.algorithm()))
        });
        if !answerable {
            return Some(HandleError::BadMessage(format!(
                "the signer {s} has no key agreement key to answer to"
            )));
        }
    }
    None
}

async fn dispatch(m: &super::Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    match (ctx.family.as_str(), ctx.major(), ctx.name.as_str()) {
        ("routing", 2, "forward") => routing::forward(m, ctx).await,
        ("report-problem", 2, "problem-report") => {
            // Anyone may send one (anoncrypted, up to a whole envelope): its code and the start
            // of its comment are logged, not all of it.
            let body = &ctx.msg["body"];
            let comment: String = body["comment"].as_str().unwrap_or_default().chars().take(200).collect();
            let code: String = body["code"].as_str().unwrap_or_default().chars().take(80).collect();
            tracing::warn!(
                sender = ctx.sender.as_deref().unwrap_or("-"),
                code,
                comment,
                "v2 peer sent a problem report"
            );
            Ok(Outcome::default())
        }
        // Everything else answers someone: it needs an authenticated sender.
        _ if ctx.sender.is_none() => Err(HandleError::Unproven),
        ("trust-ping", 2, "ping") => Ok(ping(m, ctx)),
        ("trust-ping", 2, "ping-response") => Ok(Outcome::default()),
        ("discover-features", 2, "queries") => Ok(discover(m, ctx)),
        ("coordinate-mediation", 2 | 3, _) => mediation::handle(m, ctx).await,
        ("messagepickup" | "message-pickup", 3 | 4, _) => pickup::handle(m, ctx).await,
        _ => Err(ctx.unsupported()),
    }
}

/// A connection record that is never stored: the address of a reply to a DID that has no
/// connection yet (trust ping, discover-features, a refusal).
fn ephemeral(did: &str) -> Connection {
    Connection {
        id: format!(
            "v2-unbound:{}",
            crate::didcomm::v2::did::did_of(did)
                .chars()
                .take(64)
                .collect::<String>()
        ),
        created_at_ms: 0,
        updated_at_ms: 0,
        state: "unbound".into(),
        protocol: PROTOCOL.into(),
        label: None,
        our_verkey: String::new(),
        our_did: None,
        their_did: Some(did.to_string()),
        their_verkeys: vec![],
        their_endpoints: vec![],
        their_routing_keys: vec![],
        mediation: crate::store::MediationState::None,
        invitation_id: None,
        thread_id: None,
        extra: json!({}),
    }
}

/// The `didcomm` metrics label of a connection: `v2` or `v1`.
pub fn version_label(c: &Connection) -> &'static str {
    if c.protocol == PROTOCOL {
        "v2"
    } else {
        "v1"
    }
}

/// The `didcomm` metrics label of an envelope.
pub fn envelope_label(env: &[u8]) -> &'static str {
    if crate::didcomm::v2::is_v2(env) {
        "v2"
    } else {
        "v1"
    }
}

/// Whether a connection was bound by this code (not stored: see `ephemeral` in this module).
pub fn is_ephemeral(c: &Connection) -> bool {
    c.id.starts_with("v2-unbound:")
}

fn remember_dialect(c: &mut Connection, d: Option<Dialect>) {
    if let Some(d) = d {
        if d.alg == Alg::Ecdh1PuA256Kw {
            if !c.extra.is_object() {
                c.extra = json!({});
            }
            c.extra[EXTRA_TAG_IN_KDF] = json!(d.tag_in_kdf);
        }
    }
}

/// A problem-report 2.0 about `ctx`'s message, from the mediator, to `to` when known.
pub(super) fn problem_report(m: &super::Mediator, ctx: &Inbound, to: Option<&str>, code: &str, comment: &str) -> Value {
    let mut report = json!({
        "id": crate::didcomm::message::new_id(),
        "type": format!("{PREFIX}report-problem/2.0/problem-report"),
        "pthid": ctx.shown_thid(),
        "from": m.v2.did,
        "created_time": now_ms() / 1000,
        "body": { "code": code, "comment": comment },
    });
    if let Some(to) = to {
        report["to"] = json!([to]);
    }
    report
}

/// A problem-report 2.0 for a refusal, packed for the sender when we know who it is: the
/// transport answers it with the refusal's status.
fn refusal(m: &super::Mediator, ctx: &Inbound, e: HandleError) -> HandleError {
    let Some(sender) = &ctx.sender else { return e };
    let code = match &e {
        HandleError::NoConnection | HandleError::Unproven | HandleError::Rotation(_) => "e.p.req.not-authorized",
        HandleError::KeyTaken(_) => "e.p.req.key-taken",
        HandleError::Replayed(_) => "e.p.msg.replayed",
        HandleError::Stale(_) => "e.p.msg.expired",
        HandleError::UnknownRecipient(_) => "e.p.msg.recipient-unknown",
        HandleError::QueueFull { .. } => "w.p.xfer.queue-full",
        HandleError::BadMessage(r) if r.starts_with("unsupported message type") => "e.p.msg.unsupported",
        // Pickup 3.0's own code for live delivery asked of a transport that cannot carry it.
        HandleError::BadMessage(r) if r.starts_with(LIVE_MODE_NOT_SUPPORTED) => LIVE_MODE_NOT_SUPPORTED,
        HandleError::BadMessage(_) | HandleError::V2(_) => "e.p.msg.invalid",
        HandleError::Store(crate::store::StoreError::Full(_)) => "e.p.me.res.storage",
        HandleError::Store(_) | HandleError::Internal(_) => "e.p.me.res.unavailable",
        _ => "e.p.msg",
    };
    let report = problem_report(m, ctx, Some(sender), code, &e.reason());
    tracing::info!(sender = %sender, r#type = %ctx.shown_type(), code, "v2 refused: {e}");
    let mut conn = ctx.conn.clone().unwrap_or_else(|| ephemeral(sender));
    remember_dialect(&mut conn, ctx.dialect);
    match pack(m, &conn, &report) {
        Ok(packed) => HandleError::Problem {
            status: e.http_status(),
            code: e.code(),
            reason: e.reason(),
            packed,
        },
        Err(_) => e,
    }
}

/// Packs a plaintext v2 message for a v2 connection (queued payloads embedded by [`raw`]
/// written as they are): authcrypt from the mediator's X25519
/// key to the peer DID's X25519 keyAgreement keys (A256CBC-HS512; the 1PU KDF with or without
/// the tag, as the peer wrote it); anoncrypt (A256CBC-HS512) to the first key's curve when
/// the peer has no X25519 key.
pub fn pack(m: &super::Mediator, conn: &Connection, msg: &Value) -> Result<Vec<u8>, HandleError> {
    let their = conn
        .their_did
        .as_deref()
        .ok_or_else(|| HandleError::Internal(format!("v2 connection {} has no DID", conn.id)))?;
    let doc = m.v2_docs.resolve(their).map_err(HandleError::V2)?;
    let all = doc.agreement_keys();
    let first = all
        .iter()
        .find(|(_, k)| keys::is_agreement_alg(k.algorithm()))
        .ok_or_else(|| HandleError::Internal(format!("{their} has no keyAgreement key")))?;
    let x: Vec<(String, Key)> = all
        .iter()
        .filter(|(_, k)| k.algorithm() == KeyAlg::X25519)
        .cloned()
        .collect();
    // Queued payloads in it are written as they are ([`raw`]); encrypted in this buffer.
    let body = raw::to_vec(msg, dv2::jwe::PACK_ROOM).map_err(|e| HandleError::Internal(e.to_string()))?;
    let packed = if x.is_empty() {
        let curve = first.1.algorithm();
        let same: Vec<(String, Key)> = all.iter().filter(|(_, k)| k.algorithm() == curve).cloned().collect();
        dv2::jwe::pack_owned(
            body,
            &same,
            None,
            Dialect {
                alg: Alg::EcdhEsA256Kw,
                enc: Enc::A256CbcHs512,
                tag_in_kdf: false,
            },
        )
    } else {
        let tag_in_kdf = conn.extra[EXTRA_TAG_IN_KDF].as_bool().unwrap_or(true);
        dv2::jwe::pack_owned(
            body,
            &x,
            Some((&m.v2.agreement_kid, &m.v2.agreement)),
            Dialect {
                alg: Alg::Ecdh1PuA256Kw,
                enc: Enc::A256CbcHs512,
                tag_in_kdf,
            },
        )
    };
    packed.map_err(|e| HandleError::Internal(format!("v2 pack: {e}")))
}

fn ping(m: &super::Mediator, ctx: &Inbound) -> Outcome {
    let body = &ctx.msg["body"];
    // Spec: `response_requested` (default true); Veramo writes `responseRequested`.
    let wanted = body["response_requested"]
        .as_bool()
        .or_else(|| body["responseRequested"].as_bool())
        .unwrap_or(true);
    if !wanted {
        return Outcome::default();
    }
    Outcome {
        replies: vec![ctx.reply(m, "ping-response", json!({}))],
        ..Outcome::default()
    }
}

fn discover(m: &super::Mediator, ctx: &Inbound) -> Outcome {
    let mut found = Vec::new();
    for q in ctx.msg["body"]["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .take(super::discover::MAX_QUERIES)
    {
        if q["feature-type"].as_str() != Some("protocol") {
            continue;
        }
        let pat = q["match"].as_str().unwrap_or_default();
        let hit = |pid: &str| match pat.strip_suffix('*') {
            Some(p) => pid.starts_with(p),
            None => pat == pid,
        };
        for pid in PROTOCOLS.iter().filter(|p| hit(p)) {
            found.push(json!({ "feature-type": "protocol", "id": pid, "roles": ["mediator"] }));
        }
    }
    Outcome {
        replies: vec![ctx.reply(m, "disclose", json!({ "disclosures": found }))],
        ..Outcome::default()
    }
}

/// Out-of-band 2.0 mediator invitation: `from` is the mediator's did:peer:2 (both real peers
/// read only that), goal `request-mediate`, accept didcomm/v2.
pub fn invitation(m: &super::Mediator) -> Value {
    json!({
        "type": format!("{PREFIX}out-of-band/2.0/invitation"),
        "id": m.invitation_id,
        "from": m.v2.did,
        "body": {
            "goal_code": "request-mediate",
            "goal": "Request mediation from mailroom",
            "label": m.label,
            "accept": ["didcomm/v2"],
        },
    })
}

/// `<public_url>?_oob=<base64url(invitation)>`.
pub fn invitation_url(m: &super::Mediator, inv: &Value) -> String {
    format!(
        "{}?_oob={}",
        m.public_url,
        crate::didcomm::b64::encode(inv.to_string().as_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::MediatorKeys;

    /// The DID of the same keys under other public URLs is ours, its agreement key ours to open
    /// with; a DID holding our keys beside another's is not, nor a kid in it naming our key.
    #[test]
    fn a_did_of_our_keys_under_other_urls_is_ours_and_no_other() {
        let keys = MediatorKeys::generate();
        let now = V2Identity::derive(&keys, "https://new.example", "wss://new.example").unwrap();
        let before = V2Identity::derive(&keys, "http://10.0.0.7:8080", "ws://10.0.0.7:8080").unwrap();
        assert_ne!(now.did, before.did);
        assert!(now.is_ours(&now.did) && now.is_ours(&before.did));
        for kid in [format!("{}#key-1", before.did), before.agreement_kid.clone()] {
            assert!(now.key_for(&kid).is_some(), "{kid}");
        }
        // Its authentication key is no key agreement key.
        assert!(now.key_for(&before.auth_kid).is_none());

        let other = keys::generate(KeyAlg::X25519).unwrap();
        let services = [("https://evil.example".to_string(), vec![])];
        let x = now.agreement.key().clone();
        let mixed = did::create_peer2(&[x.clone(), other], std::slice::from_ref(&now.auth), &services).unwrap();
        assert!(!now.is_ours(&mixed));
        assert!(now.key_for(&format!("{mixed}#key-1")).is_none());
        // Our keys alone, but not our agreement key: nothing to open with, nor ours.
        let auth_only = did::create_peer2(&[], std::slice::from_ref(&now.auth), &services).unwrap();
        assert!(!now.is_ours(&auth_only));
        // Our agreement key alone, any services: ours.
        let x_only = did::create_peer2(std::slice::from_ref(&x), &[], &services).unwrap();
        assert!(now.is_ours(&x_only));
        assert!(now.key_for(&format!("{x_only}#key-1")).is_some());
        // Another mediator's DID is not ours.
        let theirs = V2Identity::derive(&MediatorKeys::generate(), "https://new.example", "wss://new.example").unwrap();
        assert!(!now.is_ours(&theirs.did) && now.key_for(&theirs.agreement_kid).is_none());
    }
}
