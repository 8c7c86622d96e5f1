//! A probe wallet: one connection to the mediator under test (didexchange or connections
//! 1.0, as its invitation offers), mediation, one registered recipient key, and the pickup
//! and WebSocket moves the checks are made of. Built on [`crate::client::Agent`]; written
//! for any peer's shapes (legacy `did:sov:...;spec/` types, `did:key` or base58 keys, JWS
//! in flattened or general form, replies over the HTTP return route or a socket).

use super::target::Target;
use crate::client::{self, Agent, Grant, Sender, WsEvent, WsReader};
use crate::didcomm::keys::{normalize_verkey, KeyPair};
use crate::didcomm::message::{message_type, new_id};
use crate::didcomm::{did, envelope, jws};
use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

pub const PREFIX: &str = "https://didcomm.org/";

/// A handshake protocol the probe speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    DidExchange11,
    DidExchange10,
    Connections,
}

impl Handshake {
    pub fn from_protocol(p: &str) -> Option<Handshake> {
        match super::target::protocol_key(p)?.as_str() {
            "didexchange/1" if p.trim_end_matches('/').ends_with("1.0") => Some(Handshake::DidExchange10),
            "didexchange/1" => Some(Handshake::DidExchange11),
            "connections/1" => Some(Handshake::Connections),
            _ => None,
        }
    }

    pub fn protocol(&self) -> &'static str {
        match self {
            Handshake::DidExchange11 => "didexchange/1.1",
            Handshake::DidExchange10 => "didexchange/1.0",
            Handshake::Connections => "connections/1.0",
        }
    }
}

/// `family` and `name` of a message's `@type`, whatever its prefix and minor version.
pub fn is_type(msg: &Value, family: &str, name: &str) -> bool {
    message_type(msg)
        .map(|t| t.family == family && t.name == name)
        .unwrap_or(false)
}

/// The text of a problem report (any family's `problem-report`), if `msg` is one.
pub fn problem(msg: &Value) -> Option<String> {
    let t = message_type(msg)?;
    if t.name != "problem-report" {
        return None;
    }
    let d = &msg["description"];
    let text = d["en"]
        .as_str()
        .or_else(|| msg["explain_ltxt"].as_str())
        .or_else(|| d["code"].as_str())
        .unwrap_or("(no text)");
    Some(format!(
        "problem-report {:?} {}",
        d["code"].as_str().unwrap_or(""),
        text
    ))
}

/// Short form of a message for reasons: its type name (or the whole thing, cut).
pub fn show(msg: &Value) -> String {
    if let Some(p) = problem(msg) {
        return p;
    }
    match message_type(msg) {
        Some(t) => format!("{}/{}/{}", t.family, t.version, t.name),
        None => super::one_line(&msg.to_string()),
    }
}

pub fn msg(family_version: &str, name: &str, extra: Value) -> Value {
    let mut m = json!({ "@type": format!("{PREFIX}{family_version}/{name}"), "@id": new_id() });
    if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    m
}

/// As [`msg`], asking for replies on the same transport (`~transport.return_route: all`).
pub fn routed(family_version: &str, name: &str, extra: Value) -> Value {
    let mut m = msg(family_version, name, extra);
    m["~transport"] = json!({ "return_route": "all" });
    m
}

/// A unique payload: the probe recognises its messages by this content.
pub fn nonce(tag: &str) -> String {
    format!("probe-{tag}-{}", new_id())
}

/// What came in on a socket or in a delivery, seen from one wallet.
#[derive(Debug)]
pub enum Incoming {
    /// A protocol message to the wallet's DID key (a reply, a status, a `delivery`).
    Reply(Value),
    /// A forwarded message: to whom (base58), and its content if it was to this wallet's key.
    Message { to: String, content: Option<String> },
}

/// One onboarded wallet.
pub struct Wallet {
    pub agent: Agent,
    pub grant: Grant,
    /// The recipient key registered with the mediator.
    pub key: KeyPair,
    pub timeout: Duration,
    /// Attachment ids handed to this wallet and not acknowledged yet (acknowledged when the
    /// run ends: [`super::tidy`]).
    pub unacked: super::tidy::Unacked,
}

/// A connection made by a handshake: the agent, and the mediator DID's endpoints.
pub struct Connected {
    pub agent: Agent,
    pub endpoints: Vec<String>,
    /// Why the mediator's DID is not bound to the invitation key (a didexchange response
    /// whose DID nothing signs): onboarding FAILs on it, later wallets still use the connection.
    pub unsigned: Option<String>,
}

/// An answer that says "not this" rather than "broken": a problem report, a reply of another
/// type, a 4xx, or silence (2xx with an empty body). These are the ways a mediator answers a
/// message type it does not speak (as `malformed-unknown-type` accepts them), so a check that
/// cannot know whether the feature is supported may SKIP on them; a 5xx, a timeout or an
/// unreadable reply is a failure whatever the mediator speaks. Carried in the error chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Declined(pub String);

/// Whether `e` is a [`Declined`] answer or a 4xx (anywhere under its context).
pub fn declined(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Declined>().is_some()
        || e.downcast_ref::<client::HttpStatus>()
            .is_some_and(|h| (400..500).contains(&h.status))
}

fn declined_err(msg: String) -> anyhow::Error {
    Declined(msg).into()
}

/// Sends `m` over HTTP and returns the unpacked reply (an error when there is none).
pub async fn ask(a: &Agent, m: &Value, what: &str) -> anyhow::Result<Value> {
    a.request(m)
        .await
        .with_context(|| format!("{what}: request failed"))?
        .ok_or_else(|| {
            declined_err(format!(
                "{what}: no reply on the return route (HTTP 2xx with an empty body)"
            ))
        })
}

/// didexchange 1.1 / 1.0 or connections 1.0 with the mediator, over HTTP with return-route.
pub async fn connect(t: &Target, hs: Handshake) -> anyhow::Result<Connected> {
    let c = match hs {
        Handshake::DidExchange11 | Handshake::DidExchange10 => didexchange(t, hs).await,
        Handshake::Connections => connections(t).await,
    }?;
    super::tidy::connected(t);
    Ok(c)
}

fn fresh_agent(t: &Target, key: KeyPair, did: String) -> Agent {
    Agent::from_parts(key, did, t.recipient_key.clone(), t.http.clone()).with_timeout(t.timeout)
}

async fn didexchange(t: &Target, hs: Handshake) -> anyhow::Result<Connected> {
    let version = if hs == Handshake::DidExchange10 { "1.0" } else { "1.1" };
    let key = KeyPair::generate();
    let our_did = did::create_peer4(&key.verkey(), &["didcomm:transport/queue".to_string()], &[]);
    let mut a = fresh_agent(t, key, our_did.clone());
    let req_id = new_id();
    let mut thread = json!({ "thid": req_id });
    if t.oob {
        thread["pthid"] = json!(t.invitation_id);
    }
    let request = json!({
        "@type": format!("{PREFIX}didexchange/{version}/request"),
        "@id": req_id,
        "label": "mailroom-probe",
        "did": our_did,
        "~thread": thread,
        "~transport": { "return_route": "all" },
    });
    let response = ask(&a, &request, "didexchange request").await?;
    if !is_type(&response, "didexchange", "response") {
        bail!("didexchange request answered with {}", show(&response));
    }
    if response["~thread"]["thid"].as_str() != Some(req_id.as_str()) {
        bail!("didexchange response answers another thread: {}", response["~thread"]);
    }
    let their_did = response["did"].as_str().context("didexchange response without did")?;
    let attached = attached_doc(&response["did_doc~attach"])?;
    let unsigned = match signed_did(&response, their_did, &t.recipient_key)? {
        Some(_) => None,
        None => Some(
            "the response's DID is not signed by the invitation key (neither did_rotate~attach nor did_doc~attach has a jws)"
                .to_string(),
        ),
    };
    let doc = did::resolve(their_did, attached.as_ref()).map_err(|e| anyhow!("resolve {their_did}: {e}"))?;
    a.mediator_verkey = doc
        .recipient_keys
        .first()
        .cloned()
        .context("the mediator's DID has no keys")?;
    let complete = json!({
        "@type": format!("{PREFIX}didexchange/{version}/complete"),
        "@id": new_id(),
        "~thread": thread,
    });
    a.send(&complete).await.context("didexchange complete")?;
    Ok(Connected {
        agent: a,
        endpoints: doc.endpoints,
        unsigned,
    })
}

/// Checks the signatures binding a didexchange response's `did` to the invitation key:
/// `did_rotate~attach` (1.1) must sign exactly `their_did`, `did_doc~attach` (1.0) must sign
/// the attached document, each by the invitation key (`invitation_key`, base58). Returns
/// which attachments are signed (`None`: neither carries a jws); an error for a signature
/// that does not verify, a signer other than the invitation key, a signed DID other than the
/// response's, or a jws without the data it signs.
fn signed_did(response: &Value, their_did: &str, invitation_key: &str) -> anyhow::Result<Option<&'static str>> {
    let mut signed = Vec::new();
    for name in ["did_rotate~attach", "did_doc~attach"] {
        let data = &response[name]["data"];
        let Some(sig) = data.get("jws") else { continue };
        let b64 = data["base64"]
            .as_str()
            .with_context(|| format!("{name}: a jws without data.base64 to sign"))?;
        let signer = jws::verify_attachment_base64(b64, sig).map_err(|e| anyhow!("{name}: {e}"))?;
        if signer != invitation_key {
            bail!("{name} signed by {signer}, not by the invitation key");
        }
        if name == "did_rotate~attach" {
            let payload = crate::protocols::decode_b64_any(b64).context("did_rotate~attach is not base64")?;
            if payload != their_did.as_bytes() {
                bail!(
                    "did_rotate~attach signs {:?}, not the response's did {:?}",
                    super::one_line(&String::from_utf8_lossy(&payload)),
                    super::one_line(their_did)
                );
            }
        }
        signed.push(name);
    }
    Ok(match signed.as_slice() {
        [] => None,
        [one] => Some(one),
        _ => Some("did_rotate~attach and did_doc~attach"),
    })
}

/// The DID document of a `did_doc~attach` (base64 or json data), if any.
fn attached_doc(att: &Value) -> anyhow::Result<Option<Value>> {
    let data = &att["data"];
    if let Some(j) = data.get("json") {
        return Ok(Some(j.clone()));
    }
    if let Some(b) = data["base64"].as_str() {
        let raw = crate::protocols::decode_b64_any(b).context("did_doc~attach is not base64")?;
        return Ok(Some(
            serde_json::from_slice(&raw).context("did_doc~attach is not JSON")?,
        ));
    }
    Ok(None)
}

async fn connections(t: &Target) -> anyhow::Result<Connected> {
    let key = KeyPair::generate();
    let our_did = did::legacy_did_from_verkey(&key.public_bytes());
    let doc = did::legacy_diddoc(&our_did, &key.verkey(), &["didcomm:transport/queue".to_string()], &[]);
    let mut a = fresh_agent(t, key, our_did.clone());
    let mut request = routed(
        "connections/1.0",
        "request",
        json!({ "label": "mailroom-probe", "connection": { "DID": our_did, "DIDDoc": doc } }),
    );
    if t.oob {
        request["~thread"] = json!({ "pthid": t.invitation_id });
    }
    let response = ask(&a, &request, "connections request").await?;
    if !is_type(&response, "connections", "response") {
        bail!("connections request answered with {}", show(&response));
    }
    let (conn, signer) =
        jws::verify_connection(&response["connection~sig"]).map_err(|e| anyhow!("connection~sig: {e}"))?;
    if signer != t.recipient_key {
        bail!("connection~sig signed by {signer}, not by the invitation key");
    }
    let their_did = conn["DID"]
        .as_str()
        .or_else(|| conn["did"].as_str())
        .context("connection without DID")?;
    let their_doc = conn.get("DIDDoc").or_else(|| conn.get("did_doc"));
    let doc = did::resolve(their_did, their_doc).map_err(|e| anyhow!("resolve {their_did}: {e}"))?;
    a.mediator_verkey = doc
        .recipient_keys
        .first()
        .cloned()
        .context("the mediator's DID has no keys")?;
    // connections 1.0 has no `complete`: a trust ping acknowledges the response (Credo moves
    // the connection to `completed` on it).
    let ping = ask(&a, &trust_ping(), "trust ping after the response").await?;
    if !is_type(&ping, "trust_ping", "ping_response") {
        bail!("trust ping after the response answered with {}", show(&ping));
    }
    Ok(Connected {
        agent: a,
        endpoints: doc.endpoints,
        unsigned: None,
    })
}

pub fn trust_ping() -> Value {
    routed("trust_ping/1.0", "ping", json!({ "response_requested": true }))
}

/// coordinate-mediation 1.0 mediate-request -> mediate-grant (routing keys normalised).
pub async fn mediate(a: &Agent) -> anyhow::Result<Grant> {
    let reply = ask(
        a,
        &routed("coordinate-mediation/1.0", "mediate-request", json!({})),
        "mediate-request",
    )
    .await?;
    if !is_type(&reply, "coordinate-mediation", "mediate-grant") {
        bail!("mediate-request answered with {}", show(&reply));
    }
    let mut routing_keys = Vec::new();
    for k in reply["routing_keys"].as_array().into_iter().flatten() {
        let k = k.as_str().context("a routing key is not a string")?;
        routing_keys.push(normalize_verkey(k).map_err(|e| anyhow!("routing key {k}: {e}"))?);
    }
    Ok(Grant {
        endpoint: reply["endpoint"].as_str().unwrap_or_default().to_string(),
        routing_keys,
    })
}

/// keylist-update; returns the `updated` entries, or the reason there are none.
pub async fn keylist_update(a: &Agent, add: &[String], remove: &[String]) -> anyhow::Result<Vec<Value>> {
    let mut updates: Vec<Value> = add
        .iter()
        .map(|k| json!({"recipient_key": k, "action": "add"}))
        .collect();
    updates.extend(remove.iter().map(|k| json!({"recipient_key": k, "action": "remove"})));
    let reply = ask(
        a,
        &routed(
            "coordinate-mediation/1.0",
            "keylist-update",
            json!({ "updates": updates }),
        ),
        "keylist-update",
    )
    .await?;
    if !is_type(&reply, "coordinate-mediation", "keylist-update-response") {
        bail!("keylist-update answered with {}", show(&reply));
    }
    reply["updated"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("keylist-update-response without `updated`: {reply}"))
}

/// The `result` of the update of `key` (any key form) in a keylist-update-response.
pub fn update_result(updated: &[Value], key: &str) -> Option<String> {
    let want = normalize_verkey(key).ok()?;
    updated
        .iter()
        .find(|u| {
            u["recipient_key"]
                .as_str()
                .and_then(|k| normalize_verkey(k).ok())
                .map(|k| k == want)
                .unwrap_or(false)
        })
        .map(|u| u["result"].as_str().unwrap_or("(none)").to_string())
}

impl Wallet {
    /// A new wallet: handshake, mediation, one recipient key registered
    /// ([`client::onboard_any`]).
    pub async fn onboard(t: &Target) -> anyhow::Result<Wallet> {
        let w = Self::from_onboarded(client::onboard_any(t).await?, t.timeout);
        super::tidy::remember(t, &w.agent, &w.key, &w.unacked);
        Ok(w)
    }

    fn from_onboarded(o: client::Onboarded, timeout: Duration) -> Wallet {
        Wallet {
            agent: o.agent,
            grant: o.grant,
            key: o.key,
            timeout,
            unacked: Default::default(),
        }
    }

    /// `ids` were acknowledged (nothing left to acknowledge when the run ends).
    fn acked(&self, ids: &[String]) {
        let mut u = self.unacked.lock().unwrap();
        for id in ids {
            u.remove(id);
        }
    }

    /// Where senders post forwards: the grant's endpoint, else the one we talk to.
    pub fn forward_endpoint(&self) -> &str {
        if self.grant.endpoint.starts_with("http") {
            &self.grant.endpoint
        } else {
            &self.agent.endpoint
        }
    }

    /// A sender forwards a basic message with `content` to `to` (a verkey in any form) through
    /// this wallet's grant; returns the HTTP status (an error for a non-2xx status).
    pub async fn forward_to(&self, to: &str, content: &str) -> anyhow::Result<u16> {
        let env = Sender::new().forward_envelope(&client::basic_message(content), to, &self.grant.routing_keys)?;
        let (status, body) = client::post(self.forward_endpoint(), env, self.timeout).await?;
        if !(200..300).contains(&status) {
            bail!(
                "forward answered HTTP {status}: {}",
                super::one_line(&String::from_utf8_lossy(&body))
            );
        }
        Ok(status)
    }

    /// Forwards `content` to this wallet's own registered key.
    pub async fn forward(&self, content: &str) -> anyhow::Result<u16> {
        self.forward_to(&self.key.verkey(), content).await
    }

    pub async fn ask(&self, m: &Value, what: &str) -> anyhow::Result<Value> {
        ask(&self.agent, m, what).await
    }

    /// pickup 2.0 status-request -> `message_count`.
    pub async fn status(&self) -> anyhow::Result<u64> {
        self.status_for(None).await
    }

    /// As [`Wallet::status`], with RFC 0685's `recipient_key` filter when given (base58: the
    /// form of `forward.to`, and what Credo turns into its queue's did:key).
    pub async fn status_for(&self, recipient_key: Option<&str>) -> anyhow::Result<u64> {
        let r = self
            .ask(
                &routed(
                    "messagepickup/2.0",
                    "status-request",
                    with_key(json!({}), recipient_key),
                ),
                "status-request",
            )
            .await?;
        status_count(&r)
    }

    /// pickup 2.0 delivery-request: the messages handed out (empty when the mediator answers
    /// with a status).
    pub async fn delivery_request(&self, limit: u64) -> anyhow::Result<Vec<Incoming>> {
        Ok(self
            .delivery_request_ids(limit)
            .await?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    /// As [`Wallet::delivery_request`], each message with its attachment id (what
    /// messages-received lists).
    pub async fn delivery_request_ids(&self, limit: u64) -> anyhow::Result<Vec<(String, Incoming)>> {
        self.delivery_request_for(limit, None).await
    }

    /// As [`Wallet::delivery_request_ids`], with the `recipient_key` filter when given.
    pub async fn delivery_request_for(
        &self,
        limit: u64,
        recipient_key: Option<&str>,
    ) -> anyhow::Result<Vec<(String, Incoming)>> {
        let body = with_key(json!({ "limit": limit }), recipient_key);
        let r = self
            .ask(
                &routed("messagepickup/2.0", "delivery-request", body),
                "delivery-request",
            )
            .await?;
        if is_type(&r, "messagepickup", "status") {
            return Ok(Vec::new());
        }
        if !is_type(&r, "messagepickup", "delivery") {
            return Err(declined_err(format!("delivery-request answered with {}", show(&r))));
        }
        self.open_ids(&r)
    }

    /// pickup 1.0 batch-pickup: the messages of the `batch` that answers it (any other answer
    /// is [`Declined`]).
    pub async fn batch_pickup(&self, size: u64) -> anyhow::Result<Vec<Incoming>> {
        let r = self
            .ask(
                &routed("messagepickup/1.0", "batch-pickup", json!({ "batch_size": size })),
                "batch-pickup",
            )
            .await?;
        if !is_type(&r, "messagepickup", "batch") {
            return Err(declined_err(format!("batch-pickup answered with {}", show(&r))));
        }
        self.open(&r)
    }

    /// pickup 2.0 messages-received -> the `message_count` of the status that answers it.
    /// RFC 0685 says the mediator SHOULD (not must) answer with a status: when it answers
    /// nothing, a status-request learns the count.
    pub async fn ack(&self, ids: &[String]) -> anyhow::Result<u64> {
        let received = routed(
            "messagepickup/2.0",
            "messages-received",
            json!({ "message_id_list": ids }),
        );
        let reply = self
            .agent
            .request(&received)
            .await
            .context("messages-received: request failed")?;
        self.acked(ids);
        match reply {
            Some(r) => status_count(&r),
            None => self.status().await,
        }
    }

    /// The messages of a `delivery` or `batch`, each with its attachment id.
    pub fn open(&self, delivery: &Value) -> anyhow::Result<Vec<Incoming>> {
        Ok(self.open_ids(delivery)?.into_iter().map(|(_, m)| m).collect())
    }

    /// Every id is remembered as handed out until acknowledged ([`Wallet::ack`]).
    pub fn open_ids(&self, delivery: &Value) -> anyhow::Result<Vec<(String, Incoming)>> {
        let got = client::delivery_envelopes(delivery)?;
        self.unacked
            .lock()
            .unwrap()
            .extend(got.iter().map(|(id, _)| id.clone()));
        got.into_iter()
            .map(|(id, env)| Ok((id, self.classify(&env)?)))
            .collect()
    }

    /// Reads an envelope addressed to this wallet (its DID key or its recipient key) or to
    /// someone else (only its recipient is known then).
    pub fn classify(&self, env: &[u8]) -> anyhow::Result<Incoming> {
        let kids = envelope::recipient_kids(env).map_err(|e| anyhow!("unreadable envelope: {e}"))?;
        if kids.contains(&self.agent.key.verkey()) {
            return Ok(Incoming::Reply(self.agent.unpack(env)?.0));
        }
        let content = if kids.contains(&self.key.verkey()) {
            let (m, _) = self.agent.unpack(env)?;
            Some(m["content"].as_str().unwrap_or_default().to_string())
        } else {
            None
        };
        Ok(Incoming::Message {
            to: kids.first().cloned().unwrap_or_default(),
            content,
        })
    }

    /// Opens a WebSocket to `url`.
    pub async fn socket(&self, url: &str) -> anyhow::Result<Socket> {
        Socket::open(url).await
    }
}

/// `body` with `recipient_key` set, when there is one.
fn with_key(mut body: Value, recipient_key: Option<&str>) -> Value {
    if let Some(k) = recipient_key {
        body["recipient_key"] = json!(k);
    }
    body
}

pub fn status_count(r: &Value) -> anyhow::Result<u64> {
    if !is_type(r, "messagepickup", "status") {
        return Err(declined_err(format!("expected a pickup status, got {}", show(r))));
    }
    r["message_count"]
        .as_u64()
        .ok_or_else(|| anyhow!("status without message_count: {r}"))
}

/// Contents of the messages to this wallet's key among `items`, and the recipients of the
/// others (an isolation breach when it is someone else's key).
pub fn contents(items: &[Incoming]) -> (Vec<String>, Vec<String>) {
    let mut mine = Vec::new();
    let mut others = Vec::new();
    for i in items {
        match i {
            Incoming::Message { content: Some(c), .. } => mine.push(c.clone()),
            Incoming::Message { to, content: None } => others.push(to.clone()),
            Incoming::Reply(_) => {}
        }
    }
    (mine, others)
}

/// The mediator closed a probe socket (a close frame, or the connection dropped): unlike a
/// frame the probe cannot read, this may be the mediator's choice, and a check says which.
#[derive(Debug, thiserror::Error)]
#[error("the mediator closed the socket: {0}")]
pub struct SocketClosed(pub String);

/// A WebSocket to the mediator, read as one wallet. A task of its own reads it from the start
/// ([`client::WsClient::spawn_reader`]): the mediator's pings are answered while the check does
/// something else (onboards another wallet, posts a forward, reads another socket), and what
/// arrives meanwhile waits for [`Socket::read_until`].
pub struct Socket {
    ws: WsReader,
}

impl Socket {
    pub async fn open(url: &str) -> anyhow::Result<Socket> {
        Ok(Socket {
            ws: client::websocket(url).await?.spawn_reader(),
        })
    }

    /// Sends a message (binary frame, as Credo does).
    pub async fn send(&mut self, w: &Wallet, m: &Value) -> anyhow::Result<()> {
        self.ws.send(awc::ws::Message::Binary(w.agent.pack(m)?.into())).await
    }

    /// Everything that arrives until `until` says stop or `deadline` passes; a `delivery` is
    /// opened into its messages (after itself). Returns what came, and whether `until` held.
    /// The mediator closing the socket is a [`SocketClosed`] error; a frame that is not
    /// WebSocket or not an envelope is another error (not a close).
    pub async fn read_until(
        &mut self,
        w: &Wallet,
        deadline: Instant,
        mut until: impl FnMut(&[Incoming]) -> bool,
    ) -> anyhow::Result<(Vec<Incoming>, bool)> {
        let mut got: Vec<Incoming> = Vec::new();
        loop {
            if until(&got) {
                return Ok((got, true));
            }
            // Past the deadline, what already arrived is still taken (`next` returns it first).
            match self.ws.next(deadline).await? {
                Some(WsEvent::Envelope(env)) => {
                    let inc = w.classify(&env)?;
                    if let Incoming::Reply(r) = &inc {
                        if is_type(r, "messagepickup", "delivery") {
                            let inner = w.open(r)?;
                            got.push(inc);
                            got.extend(inner);
                            continue;
                        }
                    }
                    got.push(inc);
                }
                Some(WsEvent::Closed(r)) => return Err(SocketClosed(format!("{r:?}")).into()),
                None => return Ok((got, false)),
            }
        }
    }

    /// Sends `m` and waits for a reply of `family`/`name` (other frames are kept).
    pub async fn request(
        &mut self,
        w: &Wallet,
        m: &Value,
        family: &str,
        name: &str,
    ) -> anyhow::Result<(Value, Vec<Incoming>)> {
        self.send(w, m).await?;
        let deadline = Instant::now() + w.timeout;
        let (got, ok) = self
            .read_until(w, deadline, |g| {
                g.iter().any(|i| match i {
                    Incoming::Reply(r) => is_type(r, family, name) || problem(r).is_some(),
                    _ => false,
                })
            })
            .await?;
        if !ok {
            bail!("no {family} {name} on the socket within {:?}", w.timeout);
        }
        let reply = got
            .iter()
            .find_map(|i| match i {
                Incoming::Reply(r) if is_type(r, family, name) || problem(r).is_some() => Some(r.clone()),
                _ => None,
            })
            .expect("checked by read_until");
        if let Some(p) = problem(&reply) {
            bail!("{family} {name} expected, got {p}");
        }
        Ok((reply, got))
    }

    /// messages-received on the socket -> the `message_count` of the status that answers it.
    /// Waits for that status (RFC 0685: SHOULD), else asks with a status-request, so the ack
    /// has been handled before the caller closes the socket (a mediator may handle a socket's
    /// messages concurrently: sending both at once would prove nothing).
    pub async fn ack(&mut self, w: &Wallet, ids: &[String]) -> anyhow::Result<u64> {
        let received = routed(
            "messagepickup/2.0",
            "messages-received",
            json!({ "message_id_list": ids }),
        );
        self.send(w, &received).await?;
        w.acked(ids);
        let answer = |i: &Incoming| match i {
            Incoming::Reply(r) if is_type(r, "messagepickup", "status") || problem(r).is_some() => Some(r.clone()),
            _ => None,
        };
        let deadline = Instant::now() + w.timeout;
        let (got, _) = self
            .read_until(w, deadline, |g| g.iter().any(|i| answer(i).is_some()))
            .await?;
        match got.iter().find_map(answer) {
            Some(r) => status_count(&r),
            None => {
                let ask = routed("messagepickup/2.0", "status-request", json!({}));
                let (status, _) = self.request(w, &ask, "messagepickup", "status").await?;
                status_count(&status)
            }
        }
    }

    pub async fn close(self) {
        self.ws.close().await
    }
}

/// Polls `f` every `every` until it returns Some or `within` passes.
pub async fn poll<T, F, Fut>(within: Duration, every: Duration, mut f: F) -> anyhow::Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await? {
            return Ok(Some(v));
        }
        if Instant::now() + every > deadline {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

/// A wallet that never talked to a mediator (its mediator key is a fresh one): enough to pack,
/// classify and read sockets in unit tests.
#[cfg(test)]
pub(crate) fn offline_wallet() -> Wallet {
    let key = KeyPair::generate();
    let did = did::create_peer4(&key.verkey(), &["didcomm:transport/queue".to_string()], &[]);
    let agent = Agent::from_parts(key, did, KeyPair::generate().verkey(), "http://127.0.0.1:9/".into());
    Wallet {
        agent,
        grant: Grant {
            endpoint: "http://127.0.0.1:9/".into(),
            routing_keys: Vec::new(),
        },
        key: KeyPair::generate(),
        timeout: Duration::from_secs(5),
        unacked: Default::default(),
    }
}

/// Waits until `cond` holds (checked every 20 ms, at most 10 s).
#[cfg(test)]
pub(crate) async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ws_stub::{self, Behaviour};

    /// A didexchange 1.1 response whose `did_rotate~attach` signs `signed_did` with `signer`.
    fn rotated(did: &str, signed_did: &str, signer: &KeyPair) -> Value {
        use base64::Engine;
        let data = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signed_did);
        json!({
            "@type": "https://didcomm.org/didexchange/1.1/response",
            "did": did,
            "did_rotate~attach": { "data": { "base64": data, "jws": jws::sign_attachment_base64(&data, signer) } },
        })
    }

    /// A didexchange 1.0 response whose `did_doc~attach` carries `doc`, signed by `signer` when given.
    fn with_doc(did: &str, doc: &Value, signer: Option<&KeyPair>) -> Value {
        use base64::Engine;
        let data = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doc.to_string());
        let mut att = json!({ "data": { "base64": data } });
        if let Some(k) = signer {
            att["data"]["jws"] = jws::sign_attachment_base64(&data, k);
        }
        json!({ "@type": "https://didcomm.org/didexchange/1.0/response", "did": did, "did_doc~attach": att })
    }

    /// The invitation key's signature binds the response's DID: a signature over another DID
    /// (a response spliced from another exchange), or a document signed by another key, is no
    /// binding however valid the signature.
    #[test]
    fn the_response_s_did_is_what_the_invitation_key_signed() {
        let inv = KeyPair::generate();
        let other = KeyPair::generate();
        let did = did::create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let elsewhere = did::create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let key = inv.verkey();

        let ok = rotated(&did, &did, &inv);
        assert_eq!(signed_did(&ok, &did, &key).unwrap(), Some("did_rotate~attach"));
        let spliced = rotated(&did, &elsewhere, &inv);
        let why = format!("{:#}", signed_did(&spliced, &did, &key).unwrap_err());
        assert!(why.contains("not the response's did"), "{why}");
        let foreign = rotated(&did, &did, &other);
        let why = format!("{:#}", signed_did(&foreign, &did, &key).unwrap_err());
        assert!(why.contains("not by the invitation key"), "{why}");

        let legacy = did::legacy_did_from_verkey(&other.public_bytes());
        let doc = did::legacy_diddoc(&legacy, &other.verkey(), &["http://127.0.0.1:9/".to_string()], &[]);
        let signed = with_doc(&legacy, &doc, Some(&inv));
        assert_eq!(signed_did(&signed, &legacy, &key).unwrap(), Some("did_doc~attach"));
        let by_other = with_doc(&legacy, &doc, Some(&other));
        let why = format!("{:#}", signed_did(&by_other, &legacy, &key).unwrap_err());
        assert!(why.contains("did_doc~attach signed by"), "{why}");
        // A jws whose signature is over other data than the attached document.
        let mut tampered = signed.clone();
        let forged = json!({ "id": legacy, "service": [] }).to_string();
        tampered["did_doc~attach"]["data"]["base64"] = json!(crate::didcomm::b64::encode(forged.as_bytes()));
        assert!(signed_did(&tampered, &legacy, &key).is_err());
        // Nothing signed: not an error here, the onboarding check FAILs on it.
        let unsigned = with_doc(&legacy, &doc, None);
        assert_eq!(signed_did(&unsigned, &legacy, &key).unwrap(), None);
        assert_eq!(signed_did(&json!({ "did": did }), &did, &key).unwrap(), None);
    }

    /// What Credo 0.6.3 (general JWS, the signature twice, unpadded base64) and ACA-Py 1.7.0
    /// (flattened, padded) send passes, signed by the key their JWS names (their invitation key).
    #[test]
    fn credo_s_and_aca_py_s_real_responses_pass() {
        let credo: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/didcomm/credo/didexchange_1.1_response.json"
        ))
        .unwrap();
        let acapy: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/didcomm/acapy/recipient_in_01_didexchange-1.1-response.json"
        ))
        .unwrap();
        for (who, r) in [("credo", &credo["plaintext"]), ("acapy", &acapy)] {
            let jws = &r["did_rotate~attach"]["data"]["jws"];
            let kid = jws["header"]["kid"]
                .as_str()
                .or_else(|| jws["signatures"][0]["header"]["kid"].as_str())
                .unwrap();
            let key = normalize_verkey(kid).unwrap();
            let did = r["did"].as_str().unwrap();
            assert_eq!(signed_did(r, did, &key).unwrap(), Some("did_rotate~attach"), "{who}");
            assert!(signed_did(r, "did:peer:4other", &key).is_err(), "{who}");
        }
    }

    /// ACA-Py closes a socket whose pongs stop for 1.5 s. A check that does something else for
    /// a while (onboards wallet B, posts a forward) while wallet A's socket is open must not
    /// lose that socket: its pings are answered without the check reading it.
    #[actix_rt::test]
    async fn a_socket_answers_pings_while_the_check_does_something_else() {
        let stub = ws_stub::start(Behaviour::Ping(Duration::from_millis(300))).await;
        let w = offline_wallet();
        let mut s = w.socket(&stub.url).await.unwrap();
        // The check's gap: over two seconds (eight pings) in which nothing reads the socket,
        // longer than the stub lets pongs stop (MISSED_PONGS pings) before it drops a client.
        const PINGS: usize = 8;
        const _: () = assert!(PINGS > ws_stub::MISSED_PONGS + 1);
        wait_for("eight pings, or the socket dropped", || {
            stub.pings() >= PINGS || stub.dropped()
        })
        .await;
        assert!(!stub.dropped(), "the stub closed the socket for a missed pong");
        // Still open: what is sent comes back (the stub echoes).
        s.send(&w, &trust_ping()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (got, echoed) = s
            .read_until(&w, deadline, |g| !g.is_empty())
            .await
            .expect("the socket is still open");
        assert!(echoed, "{got:?}");
        s.close().await;
    }
}
