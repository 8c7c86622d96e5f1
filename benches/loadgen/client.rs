//! What talks to a mediator: a minimal raw HTTP/1.1 client for the timed loops, and helpers on
//! top of `mailroom::client` (onboarding, pickup messages, live sockets, pre-built forwards).

use anyhow::{anyhow, bail, Context, Result};
use mailroom::client::{basic_message, Agent, Invitation, Sender, WsClient, WsEvent};
use mailroom::didcomm::did;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::message::new_id;
use mailroom::probe::Target;
use mailroom::protocols::didexchange::decode_b64_any;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client: pre-built requests, one in flight per connection, so the
// load generator spends as little of the shared CPU as possible.
// ---------------------------------------------------------------------------------------------

pub(crate) fn build_request(host: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n",
        mailroom::client::CONTENT_TYPE,
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

pub(crate) async fn invitation(public_url: &str) -> Result<Invitation> {
    let v = get_json(&format!("{public_url}/invitation")).await?;
    Invitation::parse(&v["invitation"])
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

pub(crate) fn pickup(name: &str, extra: Value) -> Value {
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

pub(crate) fn type_name(v: &Value) -> &str {
    v["@type"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
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
    let inv = invitation(public_url).await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (agent, k) = Agent::onboard(&inv).await?;
        let routing = agent.grant.clone().context("no grant")?.routing_keys;
        out.push(Wallet {
            agent,
            key: k.verkey(),
            routing,
        });
    }
    Ok(out)
}

/// Pre-builds `n` forward envelopes spread over the wallets, on every core (before any timed
/// part). Contents are `{prefix}-{i}`. Returns them and the build time.
pub(crate) fn build_forwards(
    targets: &[(String, Vec<String>)],
    n: usize,
    prefix: &str,
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
                    idx.into_iter()
                        .map(|i| {
                            let (key, routing) = &targets[i % targets.len()];
                            let env =
                                sender.forward_envelope(&basic_message(&format!("{prefix}-{i}")), key, routing)?;
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

/// Connects to any DIDComm v1 mediator from its parsed invitation (mailroom, Credo, ACA-Py):
/// didexchange 1.1 (1.0 when that is all the invitation offers) over HTTP with return-route,
/// accepting the mediator's DID from `did_doc~attach` when it is not self-resolving.
pub(crate) async fn connect_any(t: &Target) -> Result<Agent> {
    let offered: Vec<&str> = t.invitation["handshake_protocols"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let version = if offered.iter().any(|p| p.ends_with("didexchange/1.1")) || offered.is_empty() {
        "1.1"
    } else if offered.iter().any(|p| p.ends_with("didexchange/1.0")) {
        "1.0"
    } else {
        bail!("the invitation offers no didexchange handshake ({offered:?})");
    };
    let key = KeyPair::generate();
    let our_did = did::create_peer4(&key.verkey(), &["didcomm:transport/queue".to_string()], &[]);
    let mut a = Agent::from_parts(key, our_did.clone(), t.recipient_key.clone(), t.http.clone())
        .with_timeout(Duration::from_secs(60));
    let req_id = new_id();
    let mut thread = json!({ "thid": req_id });
    if t.oob {
        thread["pthid"] = json!(t.invitation_id);
    }
    let request = json!({
        "@type": format!("https://didcomm.org/didexchange/{version}/request"),
        "@id": req_id,
        "label": "mailroom-loadgen",
        "did": our_did,
        "~thread": thread,
        "~transport": { "return_route": "all" },
    });
    let response = a.request(&request).await?.context("no didexchange response")?;
    if type_name(&response) != "response" {
        bail!("didexchange request answered with {response}");
    }
    let their_did = response["did"].as_str().context("didexchange response without did")?;
    let data = &response["did_doc~attach"]["data"];
    let attached = if let Some(j) = data.get("json") {
        Some(j.clone())
    } else if let Some(b) = data["base64"].as_str() {
        let raw = decode_b64_any(b).context("did_doc~attach is not base64")?;
        Some(serde_json::from_slice(&raw).context("did_doc~attach is not JSON")?)
    } else {
        None
    };
    let doc = did::resolve(their_did, attached.as_ref()).map_err(|e| anyhow!("resolve {their_did}: {e}"))?;
    a.mediator_verkey = doc
        .recipient_keys
        .first()
        .cloned()
        .context("the mediator's DID has no keys")?;
    let complete = json!({
        "@type": format!("https://didcomm.org/didexchange/{version}/complete"),
        "@id": new_id(),
        "~thread": thread,
    });
    a.send(&complete).await.context("didexchange complete")?;
    Ok(a)
}

/// Onboards `n` wallets on any DIDComm v1 mediator: connect, mediate, one recipient key each.
/// Also returns the HTTP endpoint forwards go to (the grant's, else the invitation's).
pub(crate) async fn onboard_any(t: &Target, n: usize) -> Result<(Vec<Wallet>, String)> {
    let mut out = Vec::with_capacity(n);
    let mut endpoint = t.http.clone();
    for i in 0..n {
        let mut agent = connect_any(t).await.with_context(|| format!("wallet {i}: connect"))?;
        let grant = agent.mediate().await.with_context(|| format!("wallet {i}: mediate"))?;
        if grant.endpoint.starts_with("http") {
            endpoint = grant.endpoint.clone();
        }
        let k = agent.new_recipient_key();
        let updated = agent.keylist_update(&[k.did_key()], &[]).await?;
        if updated.first().and_then(|u| u["result"].as_str()) != Some("success") {
            bail!("wallet {i}: keylist-update failed: {updated:?}");
        }
        out.push(Wallet {
            agent,
            key: k.verkey(),
            routing: grant.routing_keys,
        });
    }
    Ok((out, endpoint))
}
