//! What talks to a mediator: a minimal raw HTTP/1.1 client for the timed loops, and helpers on
//! top of `mailroom::client` (onboarding, pickup messages, live sockets, pre-built forwards).

use crate::Didcomm;
use anyhow::{anyhow, bail, Context, Result};
use mailroom::client::v2::{V2Agent, V2Mediator, V2Sender};
use mailroom::client::{self, basic_message, Agent, Sender, WsClient, WsEvent};
pub(crate) use mailroom::client::{pickup_message as pickup, type_name};
use mailroom::didcomm::v2::jwe::Enc;
use mailroom::didcomm::v2::TYP_ENCRYPTED;
use mailroom::probe::Target;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client: pre-built requests, one in flight per connection, so the
// load generator spends as little of the shared CPU as possible.
// ---------------------------------------------------------------------------------------------

/// A v1 envelope POST (`application/didcomm-envelope-enc`).
pub(crate) fn build_request(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    build_request_typed(host, path, mailroom::client::CONTENT_TYPE, body)
}

pub(crate) fn build_request_typed(host: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

pub(crate) struct RawConn {
    pub(crate) addr: SocketAddr,
    pub(crate) stream: Option<tokio::net::TcpStream>,
    pub(crate) buf: Vec<u8>,
}

impl RawConn {
    pub(crate) fn new(addr: SocketAddr) -> RawConn {
        RawConn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends a pre-built request; returns (status, body). Reconnects once if a kept-alive
    /// connection was closed under us.
    pub(crate) async fn send(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        let reused = self.stream.is_some();
        match tokio::time::timeout(Duration::from_secs(30), self.try_send(req)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) if reused => {
                self.stream = None;
                tokio::time::timeout(Duration::from_secs(30), self.try_send(req))
                    .await
                    .map_err(|_| anyhow!("request timed out"))?
            }
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("request timed out")
            }
        }
    }

    pub(crate) async fn try_send(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>)> {
        if self.stream.is_none() {
            let s = tokio::net::TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected above");
        s.write_all(req).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if self.buf.len() > 64 * 1024 {
                bail!("response head too long");
            }
            if s.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed");
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .context("status line")?;
        let mut len = 0usize;
        let mut close = false;
        let mut chunked = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else { continue };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            match k.as_str() {
                "content-length" => len = v.parse().context("content-length")?,
                "connection" => close = v.eq_ignore_ascii_case("close"),
                // Node's http (Credo) may answer chunked; mailroom and ACA-Py send a length.
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        if chunked {
            // The body is not needed by any scenario: read up to the last chunk and drop it.
            while !self.buf[head_end..].ends_with(b"0\r\n\r\n") {
                if self.buf.len() > head_end + (64 << 20) {
                    bail!("chunked body too long");
                }
                if s.read_buf(&mut self.buf).await? == 0 {
                    bail!("connection closed in chunked body");
                }
            }
            if close {
                self.stream = None;
            }
            return Ok((status, Vec::new()));
        }
        while self.buf.len() < head_end + len {
            if s.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed in body");
            }
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        if close {
            self.stream = None;
        }
        Ok((status, body))
    }
}

/// One sample of a node's Prometheus text (`GET {admin}/metrics`), e.g.
/// `mailroom_store_seconds_count{op="lease"}`; None when the node does not expose it.
pub(crate) async fn metric(admin: &str, sample: &str) -> Option<f64> {
    let url = format!("{admin}/metrics");
    let mut res = awc::Client::default()
        .get(&url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .ok()?;
    let body = res.body().limit(16 << 20).await.ok()?;
    let text = std::str::from_utf8(&body).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

pub(crate) async fn get_json(url: &str) -> Result<Value> {
    let mut res = awc::Client::default()
        .get(url)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .map_err(|e| anyhow!("GET {url}: {e}"))?;
    if !res.status().is_success() {
        bail!("GET {url}: {}", res.status());
    }
    res.json::<Value>()
        .limit(64 << 20)
        .await
        .map_err(|e| anyhow!("GET {url} JSON: {e}"))
}

/// Polls `f` every 20 ms until it returns Some, at most `within`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn queued(admin_url: &str) -> Option<u64> {
    get_json(&format!("{admin_url}/status")).await.ok()?["queued"].as_u64()
}

/// The queue ids of a pickup 2.0 delivery, without opening the inner messages.
pub(crate) fn delivery_ids(msg: &Value) -> Vec<String> {
    msg["~attach"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["@id"].as_str().map(str::to_string))
        .collect()
}

/// Opens a WebSocket, switches it to live mode and waits for the status answer.
pub(crate) async fn live_socket(a: &Agent, ws_url: &str) -> Result<WsClient> {
    let mut ws = a.websocket(ws_url).await?;
    ws.send_envelope(
        a.pack(&pickup("live-delivery-change", json!({"live_delivery": true})))?,
        true,
    )
    .await?;
    match ws.next(Duration::from_secs(20)).await? {
        WsEvent::Envelope(e) => {
            let (m, _) = a.unpack(&e)?;
            if type_name(&m) == "status" {
                return Ok(ws);
            }
            bail!("expected a status answer to live-delivery-change, got {m}");
        }
        WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
    }
}

/// A wallet that can receive forwards: the agent, its recipient key (base58) and routing keys.
pub(crate) struct Wallet {
    pub(crate) agent: Agent,
    pub(crate) key: String,
    pub(crate) routing: Vec<String>,
}

pub(crate) async fn onboard(public_url: &str, n: usize) -> Result<Vec<Wallet>> {
    let t = Target::from_url(&format!("{public_url}/invitation"), None, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(onboard_any(&t, n).await?.0)
}

/// Who a forward is for: a v1 wallet's recipient key and routing keys, or a v2 wallet's
/// recipient DID (its service names the mediator's routing DID).
#[derive(Clone)]
pub(crate) enum Recipient {
    V1 { key: String, routing: Vec<String> },
    V2 { did: String },
}

/// How v2 forwards are packed: the anoncrypt content encryption, or authcrypt (1PU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum V2Pack {
    Anon(Enc),
    Authcrypt,
}

impl V2Pack {
    pub(crate) fn parse(s: &str) -> Option<V2Pack> {
        match s.to_ascii_uppercase().as_str() {
            "AUTHCRYPT" | "1PU" => Some(V2Pack::Authcrypt),
            "A256GCM" | "GCM" => Some(V2Pack::Anon(Enc::A256Gcm)),
            "A256CBC-HS512" | "CBC" => Some(V2Pack::Anon(Enc::A256CbcHs512)),
            "XC20P" => Some(V2Pack::Anon(Enc::Xc20p)),
            _ => None,
        }
    }

    pub(crate) fn label(self) -> String {
        match self {
            V2Pack::Anon(e) => format!("anoncrypt ECDH-ES+A256KW/{}", e.label()),
            V2Pack::Authcrypt => "authcrypt ECDH-1PU+A256KW/A256CBC-HS512".into(),
        }
    }

    fn sender(self) -> Result<V2Sender> {
        let mut s = V2Sender::new()?;
        match self {
            V2Pack::Anon(e) => s.enc = e,
            V2Pack::Authcrypt => s.authcrypt_forward = true,
        }
        Ok(s)
    }
}

impl Recipient {
    /// The POST for an envelope to this recipient (its content type).
    pub(crate) fn request(&self, host: &str, body: &[u8]) -> Vec<u8> {
        match self {
            Recipient::V1 { .. } => build_request(host, "/", body),
            Recipient::V2 { .. } => build_request_typed(host, "/", TYP_ENCRYPTED, body),
        }
    }
}

/// Pre-builds `n` forward envelopes spread over the recipients, on every core (before any timed
/// part). Contents are `{prefix}-{i}`; v2 forwards are packed as `pack` says. Returns them and
/// the build time.
pub(crate) fn build_forwards(
    targets: &[Recipient],
    n: usize,
    prefix: &str,
    pack: V2Pack,
) -> Result<(Vec<Vec<u8>>, Duration)> {
    let t0 = Instant::now();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(1);
    let chunks: Vec<Vec<usize>> = (0..threads).map(|t| (t..n).step_by(threads).collect()).collect();
    let mut built: Vec<Vec<(usize, Vec<u8>)>> = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                s.spawn(move || -> Result<Vec<(usize, Vec<u8>)>> {
                    let sender = Sender::new();
                    let v2 = pack.sender()?;
                    idx.into_iter()
                        .map(|i| {
                            let content = format!("{prefix}-{i}");
                            let env = match &targets[i % targets.len()] {
                                Recipient::V1 { key, routing } => {
                                    sender.forward_envelope(&basic_message(&content), key, routing)?
                                }
                                Recipient::V2 { did } => v2.forward_envelope(did, &v2.basic(did, &content))?.1,
                            };
                            Ok((i, env))
                        })
                        .collect()
                })
            })
            .collect();
        for h in handles {
            built.push(h.join().map_err(|_| anyhow!("builder thread panicked"))??);
        }
        Ok(())
    })?;
    let mut all: Vec<(usize, Vec<u8>)> = built.into_iter().flatten().collect();
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, e)| e).collect(), t0.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// A wallet of either DIDComm version, as the scenarios need it: onboarded, forwarded to, with a
// live socket whose deliveries it opens and acknowledges.
// ---------------------------------------------------------------------------------------------

pub(crate) enum AnyWallet {
    V1(Wallet),
    V2 { agent: V2Agent, recipient: String },
}

impl AnyWallet {
    pub(crate) fn recipient(&self) -> Recipient {
        match self {
            AnyWallet::V1(w) => Recipient::V1 {
                key: w.key.clone(),
                routing: w.routing.clone(),
            },
            AnyWallet::V2 { recipient, .. } => Recipient::V2 { did: recipient.clone() },
        }
    }

    /// A WebSocket to `ws_url` in live mode (pickup 2.0 / 3.0 live-delivery-change answered).
    pub(crate) async fn live_socket(&self, ws_url: &str) -> Result<WsClient> {
        match self {
            AnyWallet::V1(w) => live_socket(&w.agent, ws_url).await,
            AnyWallet::V2 { agent, .. } => {
                // The socket goes where the agent's mediator record says: `ws_url` itself.
                if agent.mediator.ws.as_deref() != Some(ws_url) {
                    bail!("v2 wallet's mediator ws is {:?}, not {ws_url}", agent.mediator.ws);
                }
                Ok(agent.live().await?.ws)
            }
        }
    }

    /// A frame read on the live socket: the queue ids and contents of a delivery (None for
    /// anything else). With `open_inner` false the inner messages are not opened (contents
    /// empty): what a wallet that only acknowledges does.
    pub(crate) fn delivery(&self, env: &[u8], open_inner: bool) -> Option<Vec<(String, String)>> {
        match self {
            AnyWallet::V1(w) => {
                let (msg, _) = w.agent.unpack(env).ok()?;
                if type_name(&msg) != "delivery" {
                    return None;
                }
                if !open_inner {
                    return Some(delivery_ids(&msg).into_iter().map(|i| (i, String::new())).collect());
                }
                let opened = w.agent.open_delivery(&msg).ok()?;
                Some(
                    opened
                        .into_iter()
                        .map(|(id, m)| (id, m["content"].as_str().unwrap_or_default().to_string()))
                        .collect(),
                )
            }
            AnyWallet::V2 { agent, .. } => {
                let msg = agent.unpack(env).ok()?;
                if !msg["type"].as_str().unwrap_or_default().ends_with("/delivery") {
                    return None;
                }
                if !open_inner {
                    let ids = msg["attachments"].as_array().into_iter().flatten();
                    return Some(
                        ids.filter_map(|a| a["id"].as_str().map(|i| (i.to_string(), String::new())))
                            .collect(),
                    );
                }
                let opened = agent.open_delivery(&msg).ok()?;
                Some(
                    opened
                        .into_iter()
                        .map(|(id, m)| (id, m["body"]["content"].as_str().unwrap_or_default().to_string()))
                        .collect(),
                )
            }
        }
    }

    /// The POST acknowledging `ids` (pickup 2.0 / 3.0 messages-received) to `host`.
    pub(crate) fn ack_request(&self, host: &str, ids: Vec<String>) -> Result<Vec<u8>> {
        Ok(match self {
            AnyWallet::V1(w) => build_request(
                host,
                "/",
                &w.agent
                    .pack(&pickup("messages-received", json!({ "message_id_list": ids })))?,
            ),
            AnyWallet::V2 { agent, .. } => build_request_typed(
                host,
                "/",
                TYP_ENCRYPTED,
                &agent.pack(&agent.message(
                    &format!("{}/messages-received", client::v2::PICKUP),
                    json!({ "message_id_list": ids }),
                ))?,
            ),
        })
    }
}

/// Onboards `n` wallets of DIDComm `version` on the node at `public_url` (its socket at
/// `ws_url`): v1 through its invitation (didexchange, mediation 1.0, keylist-update); v2
/// through its out-of-band 2.0 invitation (coordinate-mediation 3.0, recipient-update).
pub(crate) async fn onboard_wallets(
    version: Didcomm,
    public_url: &str,
    ws_url: &str,
    n: usize,
) -> Result<Vec<AnyWallet>> {
    match version {
        Didcomm::V1 => Ok(onboard(public_url, n).await?.into_iter().map(AnyWallet::V1).collect()),
        Didcomm::V2 => {
            let v = get_json(&format!("{public_url}/invitation?didcomm=v2")).await?;
            let url = v["invitation_url"].as_str().context("no v2 invitation_url")?;
            let did = V2Mediator::from_invitation_url(url)?.did;
            // This node, whatever URLs the DID's services name (a cluster's load balancer).
            let m = V2Mediator {
                did,
                http: public_url.to_string(),
                ws: Some(ws_url.to_string()),
            };
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let mut agent = V2Agent::new(m.clone())?;
                let recipient = agent.onboard().await.with_context(|| format!("v2 wallet {i}"))?;
                out.push(AnyWallet::V2 { agent, recipient });
            }
            Ok(out)
        }
    }
}

/// Onboards `n` wallets on any DIDComm v1 mediator ([`mailroom::client::onboard_any`]).
/// Also returns the HTTP endpoint forwards go to (the grant's, else the invitation's).
pub(crate) async fn onboard_any(t: &Target, n: usize) -> Result<(Vec<Wallet>, String)> {
    let mut out = Vec::with_capacity(n);
    let mut endpoint = t.http.clone();
    for i in 0..n {
        let w = client::onboard_any(t).await.with_context(|| format!("wallet {i}"))?;
        endpoint = w.endpoint(t);
        out.push(Wallet {
            key: w.key.verkey(),
            routing: w.grant.routing_keys,
            agent: w.agent,
        });
    }
    Ok((out, endpoint))
}
