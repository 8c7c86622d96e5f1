//! The agent side of the same protocols, in Rust: a wallet that connects to a mediator
//! (didexchange 1.1), asks for mediation, registers keys, picks up (pickup 1.0/2.0, live
//! mode, implicit) over HTTP or WebSocket; and a sender that forwards messages to it.
//! Used by the integration tests and the load generator; it shares the envelope code with
//! the mediator, and is checked against real Credo and ACA-Py peers by the interop suite.

pub mod any;
pub mod status;
pub mod v2;

pub use any::{connect_any, onboard_any, Onboarded};

use crate::didcomm::keys::{normalize_verkey, KeyPair};
use crate::didcomm::message::new_id;
use crate::didcomm::{did, envelope, jws};
use anyhow::{anyhow, bail, Context};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

pub const CONTENT_TYPE: &str = "application/didcomm-envelope-enc";

/// What a mediator granted.
#[derive(Clone, Debug)]
pub struct Grant {
    pub endpoint: String,
    pub routing_keys: Vec<String>,
}

/// Box-key pairs an [`Agent`] keeps (its keys with the mediator's, and a few senders), and as
/// many sealed senders it opened (the mediator's and a sender's that reuse theirs).
const AGENT_BOX_PAIRS: usize = 16;

/// An agent without an endpoint of its own (a wallet), connected to one mediator.
pub struct Agent {
    /// The key of our DID for this connection.
    pub key: KeyPair,
    pub did: String,
    /// The mediator's key we talk to, base58.
    pub mediator_verkey: String,
    /// The mediator's HTTP endpoint.
    pub endpoint: String,
    pub grant: Option<Grant>,
    /// The thread of the exchange that made the connection (the request's `@id`).
    pub thread_id: String,
    /// Every key we can unpack with (the DID key and registered recipient keys).
    keyring: HashMap<String, KeyPair>,
    /// Box keys with the mediator (one pair per key of ours that talks to it).
    box_keys: Box<envelope::BoxKeys>,
    timeout: Duration,
}

/// A parsed out-of-band invitation: its id, the recipient key and the endpoints.
#[derive(Clone, Debug)]
pub struct Invitation {
    pub id: String,
    pub recipient_key: String,
    pub http: String,
    pub ws: Option<String>,
}

impl Invitation {
    pub fn parse(inv: &Value) -> anyhow::Result<Invitation> {
        let services = inv["services"].as_array().context("invitation without services")?;
        let mut http = None;
        let mut ws = None;
        let mut key = None;
        for s in services {
            let ep = s["serviceEndpoint"].as_str().unwrap_or_default();
            if key.is_none() {
                key = s["recipientKeys"][0].as_str().map(str::to_string);
            }
            if ep.starts_with("http") && http.is_none() {
                http = Some(ep.to_string());
            }
            if ep.starts_with("ws") && ws.is_none() {
                ws = Some(ep.to_string());
            }
        }
        Ok(Invitation {
            id: inv["@id"].as_str().unwrap_or_default().to_string(),
            recipient_key: normalize_verkey(&key.context("invitation without recipientKeys")?)?,
            http: http.context("invitation without an http endpoint")?,
            ws,
        })
    }

    /// Reads the `oob=` parameter of an invitation URL.
    pub fn from_url(url: &str) -> anyhow::Result<Invitation> {
        let u = url::Url::parse(url)?;
        let oob = u
            .query_pairs()
            .find(|(k, _)| k == "oob")
            .map(|(_, v)| v.into_owned())
            .context("invitation URL without oob=")?;
        let bytes = crate::protocols::decode_b64_any(&oob).context("oob= is not base64")?;
        Self::parse(&serde_json::from_slice(&bytes)?)
    }
}

/// POSTs an envelope; returns the response body if there is one.
pub async fn post(url: &str, body: Vec<u8>, timeout: Duration) -> anyhow::Result<(u16, Vec<u8>)> {
    post_typed(url, body, CONTENT_TYPE, timeout).await
}

/// POSTs a body with the given content type; returns the status and the response body.
pub async fn post_typed(
    url: &str,
    body: Vec<u8>,
    content_type: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let client = awc::Client::builder().timeout(timeout).finish();
    let mut res = client
        .post(url)
        .insert_header(("Content-Type", content_type))
        .send_body(body)
        .await
        .map_err(|e| anyhow!("POST {url}: {e}"))?;
    let status = res.status().as_u16();
    let body = res
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| anyhow!("POST {url} body: {e}"))?;
    Ok((status, body.to_vec()))
}

/// A request answered with a non-2xx status: typed, so a caller can tell a refusal (4xx) from
/// a failure (5xx) without reading the text.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {body}")]
pub struct HttpStatus {
    pub status: u16,
    /// The response body as text.
    pub body: String,
}

impl HttpStatus {
    fn new(status: u16, body: &[u8]) -> HttpStatus {
        HttpStatus {
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        }
    }
}

impl Agent {
    /// Connects to a mediator through its invitation with didexchange 1.1 over HTTP with
    /// return-route (as a wallet does).
    pub async fn connect(inv: &Invitation) -> anyhow::Result<Agent> {
        Self::connect_with_endpoint(inv, None).await
    }

    /// As [`Agent::connect`], for an agent with an HTTP endpoint of its own in its DID document.
    pub async fn connect_with_endpoint(inv: &Invitation, endpoint: Option<&str>) -> anyhow::Result<Agent> {
        let key = KeyPair::generate();
        let ep = endpoint.unwrap_or("didcomm:transport/queue").to_string();
        let did = did::create_peer4(&key.verkey(), &[ep], &[]);
        let mut keyring = HashMap::new();
        keyring.insert(key.verkey(), key.clone());
        let mut a = Agent {
            key,
            did,
            mediator_verkey: inv.recipient_key.clone(),
            endpoint: inv.http.clone(),
            grant: None,
            thread_id: String::new(),
            keyring,
            box_keys: Box::new(envelope::BoxKeys::remembering_senders(AGENT_BOX_PAIRS)),
            timeout: Duration::from_secs(20),
        };
        let req_id = new_id();
        a.thread_id = req_id.clone();
        let request = json!({
            "@type": "https://didcomm.org/didexchange/1.1/request",
            "@id": req_id,
            "label": "mailroom-client",
            "did": a.did,
            "~thread": { "pthid": inv.id },
            "~transport": { "return_route": "all" },
        });
        let response = a.request(&request).await?.context("no didexchange response")?;
        if response["@type"].as_str() != Some("https://didcomm.org/didexchange/1.1/response") {
            bail!("expected a didexchange response, got {response}");
        }
        if response["~thread"]["thid"].as_str() != Some(req_id.as_str()) {
            bail!("didexchange response answers another thread: {response}");
        }
        let their_did = response["did"].as_str().context("response without did")?;
        let att = &response["did_rotate~attach"]["data"];
        let signer = jws::verify_attachment_base64(att["base64"].as_str().unwrap_or_default(), &att["jws"])
            .map_err(|e| anyhow!("did_rotate~attach: {e}"))?;
        if signer != inv.recipient_key {
            bail!("did_rotate~attach signed by {signer}, not the invitation key");
        }
        let doc = did::resolve(their_did, None).map_err(|e| anyhow!("resolve {their_did}: {e}"))?;
        a.mediator_verkey = doc
            .recipient_keys
            .first()
            .cloned()
            .context("mediator DID without keys")?;
        let complete = json!({
            "@type": "https://didcomm.org/didexchange/1.1/complete",
            "@id": new_id(),
            "~thread": { "thid": req_id, "pthid": inv.id },
        });
        a.send(&complete).await?;
        Ok(a)
    }

    /// An agent already connected by other means (a hand-made exchange in tests): our DID key,
    /// our DID, the mediator's key and HTTP endpoint.
    pub fn from_parts(key: KeyPair, did: String, mediator_verkey: String, endpoint: String) -> Agent {
        let mut keyring = HashMap::new();
        keyring.insert(key.verkey(), key.clone());
        Agent {
            key,
            did,
            mediator_verkey,
            endpoint,
            grant: None,
            thread_id: String::new(),
            keyring,
            box_keys: Box::new(envelope::BoxKeys::remembering_senders(AGENT_BOX_PAIRS)),
            timeout: Duration::from_secs(20),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Agent {
        self.timeout = t;
        self
    }

    /// Packs a plaintext for the mediator (authcrypt from our DID key).
    pub fn pack(&self, msg: &Value) -> anyhow::Result<Vec<u8>> {
        Ok(envelope::pack_cached(
            &serde_json::to_vec(msg)?,
            std::slice::from_ref(&self.mediator_verkey),
            Some(&self.key),
            envelope::PayloadCipher::ChaCha20Poly1305,
            Some(&self.box_keys),
        )?)
    }

    /// Unpacks anything addressed to one of our keys.
    pub fn unpack(&self, env: &[u8]) -> anyhow::Result<(Value, String)> {
        let u = envelope::unpack_cached(env, &|kid| self.keyring.get(kid).cloned(), Some(&self.box_keys))?;
        Ok((serde_json::from_slice(&u.plaintext)?, u.recipient_verkey))
    }

    /// Sends a message over HTTP and returns the unpacked reply, if any.
    pub async fn request(&self, msg: &Value) -> anyhow::Result<Option<Value>> {
        let (status, body) = post(&self.endpoint, self.pack(msg)?, self.timeout).await?;
        if !(200..300).contains(&status) {
            return Err(HttpStatus::new(status, &body).into());
        }
        if body.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.unpack(&body)?.0))
    }

    /// Sends a message over HTTP without expecting a reply.
    pub async fn send(&self, msg: &Value) -> anyhow::Result<u16> {
        let (status, body) = post(&self.endpoint, self.pack(msg)?, self.timeout).await?;
        if !(200..300).contains(&status) {
            return Err(HttpStatus::new(status, &body).into());
        }
        Ok(status)
    }

    /// coordinate-mediation 1.0: mediate-request -> grant.
    pub async fn mediate(&mut self) -> anyhow::Result<Grant> {
        let reply = self
            .request(&json!({
                "@type": "https://didcomm.org/coordinate-mediation/1.0/mediate-request",
                "@id": new_id(),
                "~transport": { "return_route": "all" },
            }))
            .await?
            .context("no reply to mediate-request")?;
        if !reply["@type"].as_str().unwrap_or_default().ends_with("/mediate-grant") {
            bail!("mediation not granted: {reply}");
        }
        let g = Grant {
            endpoint: reply["endpoint"].as_str().unwrap_or_default().to_string(),
            routing_keys: reply["routing_keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect(),
        };
        self.grant = Some(g.clone());
        Ok(g)
    }

    /// A new recipient key the wallet can unpack with (register it with `keylist_update`).
    pub fn new_recipient_key(&mut self) -> KeyPair {
        let k = KeyPair::generate();
        self.keyring.insert(k.verkey(), k.clone());
        k
    }

    /// keylist-update; returns the `updated` array.
    pub async fn keylist_update(&self, add: &[String], remove: &[String]) -> anyhow::Result<Vec<Value>> {
        let mut updates: Vec<Value> = add
            .iter()
            .map(|k| json!({"recipient_key": k, "action": "add"}))
            .collect();
        updates.extend(remove.iter().map(|k| json!({"recipient_key": k, "action": "remove"})));
        let reply = self
            .request(&json!({
                "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
                "@id": new_id(),
                "updates": updates,
                "~transport": { "return_route": "all" },
            }))
            .await?
            .context("no reply to keylist-update")?;
        reply["updated"]
            .as_array()
            .cloned()
            .ok_or_else(|| anyhow!("keylist-update answered with {reply}"))
    }

    /// Onboards a wallet: connect, mediate, register one recipient key. Returns the key.
    pub async fn onboard(inv: &Invitation) -> anyhow::Result<(Agent, KeyPair)> {
        let mut a = Agent::connect(inv).await?;
        a.mediate().await?;
        let k = a.new_recipient_key();
        let updated = a.keylist_update(&[k.did_key()], &[]).await?;
        if updated.first().and_then(|u| u["result"].as_str()) != Some("success") {
            bail!("keylist-update failed: {updated:?}");
        }
        Ok((a, k))
    }

    /// The unpacked inner messages of a pickup 2.0 `delivery` or 1.0 `batch`, with their
    /// queue ids.
    pub fn open_delivery(&self, msg: &Value) -> anyhow::Result<Vec<(String, Value)>> {
        delivery_envelopes(msg)?
            .into_iter()
            .map(|(id, env)| Ok((id, self.unpack(&env)?.0)))
            .collect()
    }

    /// Opens a WebSocket to the mediator (its ws URL).
    pub async fn websocket(&self, ws_url: &str) -> anyhow::Result<WsClient> {
        websocket(ws_url).await
    }

    /// As [`Agent::websocket`], from a given local address.
    pub async fn websocket_from(&self, ws_url: &str, local: std::net::IpAddr) -> anyhow::Result<WsClient> {
        websocket_from(ws_url, local).await
    }
}

/// The packed messages of a pickup 2.0 `delivery` (`~attach`) or 1.0 `batch`
/// (`messages~attach`), with their queue ids, still packed: a caller that may not hold every
/// recipient key (a probe checking isolation) reads their recipients with
/// [`envelope::recipient_kids`].
pub fn delivery_envelopes(msg: &Value) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let atts = msg["~attach"].as_array().or_else(|| msg["messages~attach"].as_array());
    for a in atts.into_iter().flatten() {
        let id = a["@id"]
            .as_str()
            .or_else(|| a["id"].as_str())
            .unwrap_or_default()
            .to_string();
        let env = if let Some(j) = a["data"].get("json") {
            serde_json::to_vec(j)?
        } else if let Some(m) = a.get("message") {
            match m {
                Value::String(s) => s.as_bytes().to_vec(),
                other => serde_json::to_vec(other)?,
            }
        } else if let Some(b) = a["data"]["base64"].as_str() {
            crate::protocols::decode_b64_any(b).context("attachment base64")?
        } else {
            bail!("attachment without data: {a}");
        };
        out.push((id, env));
    }
    Ok(out)
}

/// Opens a WebSocket to the mediator (no connection bound until a message says so).
pub async fn websocket(ws_url: &str) -> anyhow::Result<WsClient> {
    websocket_with(awc::Client::new(), ws_url).await
}

/// As [`websocket`], from a given local address (e.g. one of 127.0.0.2-127.0.0.5, to open
/// more sockets to one mediator than one source address has ports for).
pub async fn websocket_from(ws_url: &str, local: std::net::IpAddr) -> anyhow::Result<WsClient> {
    let client = awc::Client::builder()
        .connector(awc::Connector::new().local_address(local))
        .finish();
    websocket_with(client, ws_url).await
}

async fn websocket_with(client: awc::Client, ws_url: &str) -> anyhow::Result<WsClient> {
    let (_res, framed) = client
        .ws(ws_url)
        .max_frame_size(64 << 20)
        .connect()
        .await
        .map_err(|e| anyhow!("WebSocket {ws_url}: {e}"))?;
    Ok(WsClient { framed })
}

/// A WebSocket to the mediator.
pub struct WsClient {
    framed: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
}

/// What arrived on a socket.
#[derive(Debug)]
pub enum WsEvent {
    Envelope(Vec<u8>),
    Closed(Option<awc::ws::CloseReason>),
}

impl WsClient {
    pub async fn send_envelope(&mut self, env: Vec<u8>, binary: bool) -> anyhow::Result<()> {
        let msg = if binary {
            awc::ws::Message::Binary(env.into())
        } else {
            awc::ws::Message::Text(String::from_utf8(env)?.into())
        };
        self.framed.send(msg).await.map_err(|e| anyhow!("ws send: {e}"))
    }

    pub async fn send_raw(&mut self, msg: awc::ws::Message) -> anyhow::Result<()> {
        self.framed.send(msg).await.map_err(|e| anyhow!("ws send: {e}"))
    }

    /// Next text/binary frame or close, within `timeout`; answers pings on the way.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<WsEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .map_err(|_| anyhow!("nothing received within {timeout:?}"))?;
            match frame {
                None => return Ok(WsEvent::Closed(None)),
                Some(Err(e)) => bail!("ws receive: {e}"),
                Some(Ok(awc::ws::Frame::Text(b))) | Some(Ok(awc::ws::Frame::Binary(b))) => {
                    return Ok(WsEvent::Envelope(b.to_vec()))
                }
                Some(Ok(awc::ws::Frame::Ping(p))) => {
                    let _ = self.framed.send(awc::ws::Message::Pong(p)).await;
                }
                Some(Ok(awc::ws::Frame::Close(r))) => return Ok(WsEvent::Closed(r)),
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.framed.send(awc::ws::Message::Close(None)).await;
    }

    /// Hands the socket to a task of its own (on the current thread's local set, as awc's
    /// sockets are not `Send`) that reads it all along: pings are answered as they come, and
    /// every other frame waits in [`WsReader`] until the caller asks. A caller busy elsewhere
    /// (onboarding another wallet, posting a forward) then still answers the mediator's pings:
    /// ACA-Py closes a socket whose pongs stop for 1.5 s, and [`WsClient::next`] answers them
    /// only while it is called.
    pub fn spawn_reader(self) -> WsReader {
        let (out, out_rx) = tokio::sync::mpsc::unbounded_channel();
        let (events_tx, events) = tokio::sync::mpsc::channel(WS_UNREAD_FRAMES);
        tokio::task::spawn_local(pump(self.framed, out_rx, events_tx));
        WsReader {
            out,
            events,
            ended: false,
        }
    }
}

/// Frames a [`WsReader`] holds for its caller. A probe socket lives for one check and gets only
/// what that check asked for; a mediator flooding it past this ends the reader (the caller is
/// told so) rather than growing memory.
pub const WS_UNREAD_FRAMES: usize = 4_096;

/// What the caller of a [`WsReader`] asks its task to do.
enum WsCommand {
    Send(awc::ws::Message, tokio::sync::oneshot::Sender<anyhow::Result<()>>),
    /// Send a close frame and stop reading.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// The last thing a reader's task reports before it ends (besides the frames before it).
type WsItem = Result<WsEvent, String>;

/// A WebSocket read by a task of its own ([`WsClient::spawn_reader`]).
pub struct WsReader {
    out: tokio::sync::mpsc::UnboundedSender<WsCommand>,
    events: tokio::sync::mpsc::Receiver<WsItem>,
    /// The task reported how the socket ended: later reads say it is closed.
    ended: bool,
}

impl WsReader {
    pub async fn send(&self, msg: awc::ws::Message) -> anyhow::Result<()> {
        let (done, sent) = tokio::sync::oneshot::channel();
        self.out
            .send(WsCommand::Send(msg, done))
            .map_err(|_| anyhow!("ws send: the socket is closed"))?;
        sent.await.map_err(|_| anyhow!("ws send: the socket is closed"))?
    }

    /// The next text/binary frame or the close, by `deadline` (None when it passes; one that
    /// already arrived is returned even past it). An `Err` is a frame that cannot be read as
    /// WebSocket (a protocol error), which is not a close.
    pub async fn next(&mut self, deadline: tokio::time::Instant) -> anyhow::Result<Option<WsEvent>> {
        if self.ended {
            return Ok(Some(WsEvent::Closed(None)));
        }
        use tokio::sync::mpsc::error::TryRecvError;
        let item = match self.events.try_recv() {
            Ok(item) => Some(item),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) => match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return Ok(None),
                Ok(item) => item,
            },
        };
        match item {
            Some(Ok(e @ WsEvent::Envelope(_))) => Ok(Some(e)),
            Some(Ok(closed)) => {
                self.ended = true;
                Ok(Some(closed))
            }
            Some(Err(e)) => {
                self.ended = true;
                bail!("ws receive: {e}")
            }
            None => {
                self.ended = true;
                bail!("ws receive: more than {WS_UNREAD_FRAMES} frames unread, the socket was dropped")
            }
        }
    }

    /// Sends a close frame (once what was sent before it is written) and stops reading.
    pub async fn close(self) {
        let (done, closed) = tokio::sync::oneshot::channel();
        if self.out.send(WsCommand::Close(done)).is_ok() {
            let _ = closed.await;
        }
    }
}

/// The task behind a [`WsReader`]: reads every frame as it comes (answering pings at once) and
/// writes what the caller sends. Ends on a close either way, a read error, a flood of unread
/// frames, or when the caller drops its reader (a close frame is sent then).
async fn pump(
    mut framed: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<WsCommand>,
    events: tokio::sync::mpsc::Sender<WsItem>,
) {
    loop {
        // Both branches are cancel-safe: a frame half read stays in `framed`'s buffer.
        let last = tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(awc::ws::Frame::Ping(p))) => {
                    if let Err(e) = framed.send(awc::ws::Message::Pong(p)).await {
                        Some(Ok(WsEvent::Closed(Some(dropped(&e)))))
                    } else {
                        continue;
                    }
                }
                Some(Ok(awc::ws::Frame::Text(b))) | Some(Ok(awc::ws::Frame::Binary(b))) => {
                    match events.try_send(Ok(WsEvent::Envelope(b.to_vec()))) {
                        Ok(()) => continue,
                        // Flooded (the reader says so when it finds the channel closed), or
                        // nobody reads any more.
                        Err(_) => None,
                    }
                }
                Some(Ok(awc::ws::Frame::Close(r))) => Some(Ok(WsEvent::Closed(r))),
                None => Some(Ok(WsEvent::Closed(None))),
                // An I/O error is the connection dropping, not a frame that cannot be read.
                Some(Err(awc::error::WsProtocolError::Io(e))) => Some(Ok(WsEvent::Closed(Some(dropped(&e))))),
                Some(Err(e)) => Some(Err(e.to_string())),
                Some(Ok(_)) => continue,
            },
            cmd = commands.recv() => match cmd {
                Some(WsCommand::Send(msg, done)) => {
                    let r = framed.send(msg).await.map_err(|e| anyhow!("ws send: {e}"));
                    let _ = done.send(r);
                    continue;
                }
                Some(WsCommand::Close(done)) => {
                    let _ = framed.send(awc::ws::Message::Close(None)).await;
                    let _ = done.send(());
                    return;
                }
                None => {
                    let _ = framed.send(awc::ws::Message::Close(None)).await;
                    return;
                }
            },
        };
        if let Some(item) = last {
            let _ = events.try_send(item);
        }
        return;
    }
}

/// The close reason of a connection that dropped without a close frame.
fn dropped(e: &dyn std::fmt::Display) -> awc::ws::CloseReason {
    awc::ws::CloseReason {
        code: awc::ws::CloseCode::Abnormal,
        description: Some(format!("connection dropped: {e}")),
    }
}

/// Recipients a [`Sender`] keeps box keys for.
const SENDER_BOX_PAIRS: usize = 1_024;

/// A sender: packs a message for a mediated recipient and forwards it through the mediator.
pub struct Sender {
    pub key: KeyPair,
    timeout: Duration,
    /// Box keys (and the sealed sender) per recipient: the same for each of its messages.
    box_keys: envelope::BoxKeys,
}

impl Default for Sender {
    fn default() -> Self {
        Self::new()
    }
}

impl Sender {
    pub fn new() -> Sender {
        Sender {
            key: KeyPair::generate(),
            timeout: Duration::from_secs(20),
            box_keys: envelope::BoxKeys::new(SENDER_BOX_PAIRS),
        }
    }

    /// The outer envelope for `msg` to `recipient` (base58 or did:key), routed through
    /// `routing_keys` (as granted).
    pub fn forward_envelope(&self, msg: &Value, recipient: &str, routing_keys: &[String]) -> anyhow::Result<Vec<u8>> {
        let recipient = normalize_verkey(recipient)?;
        let inner = envelope::pack_cached(
            &serde_json::to_vec(msg)?,
            std::slice::from_ref(&recipient),
            Some(&self.key),
            envelope::PayloadCipher::ChaCha20Poly1305,
            Some(&self.box_keys),
        )?;
        Ok(envelope::wrap_forward(&inner, &recipient, routing_keys)?)
    }

    /// POSTs a forward; returns the HTTP status.
    pub async fn forward(
        &self,
        endpoint: &str,
        msg: &Value,
        recipient: &str,
        routing_keys: &[String],
    ) -> anyhow::Result<u16> {
        let env = self.forward_envelope(msg, recipient, routing_keys)?;
        Ok(post(endpoint, env, self.timeout).await?.0)
    }
}

/// A basic message, the payload the tests send through the mediator.
pub fn basic_message(content: &str) -> Value {
    json!({
        "@type": "https://didcomm.org/basicmessage/1.0/message",
        "@id": new_id(),
        "content": content,
        "sent_time": crate::protocols::rfc3339_ms(crate::protocols::now_ms()),
    })
}

/// A pickup 2.0 message (`status-request`, `delivery-request`, `messages-received`,
/// `live-delivery-change`...) asking for the reply on the same connection, with `extra`'s fields.
pub fn pickup_message(name: &str, extra: Value) -> Value {
    let mut m = json!({
        "@type": format!("https://didcomm.org/messagepickup/2.0/{name}"),
        "@id": new_id(),
        "~transport": { "return_route": "all" },
    });
    if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    m
}

/// The last segment of a message's `@type` (`delivery`, `status`...), or "" without one.
pub fn type_name(v: &Value) -> &str {
    v["@type"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// base64url (no pad) of a JSON value, as invitations and attachments carry it.
pub fn b64url_json(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}
