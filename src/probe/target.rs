//! The mediator under test as the probe knows it: its invitation (handshake protocols, key,
//! endpoints), what it discloses through discover-features, and the WebSocket endpoint
//! learned from its DID. A bad URL, or one that holds no usable invitation, is the operator's
//! mistake (exit 64); a mediator that cannot be reached, or fails, serving its invitation is a
//! FAIL like any other (exit 1); everything else is a check.

use super::wallet::Handshake;
use crate::didcomm::{did, keys::normalize_verkey};
use serde_json::Value;
use std::time::Duration;

/// Why the invitation URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("bad invitation URL {0:?}: {1}")]
    BadUrl(String, String),
    #[error("no invitation at {0}: {1}")]
    NoInvitation(String, String),
    #[error("unusable invitation: {0}")]
    BadInvitation(String),
    /// The URL is fine but the mediator did not serve it: no connection, a timeout, a 5xx.
    /// The mediator is down or failing, which is what the probe is there to report.
    #[error("the invitation at {0} could not be fetched: {1}")]
    Unreachable(String, String),
}

impl TargetError {
    /// Whether the operator gave something unusable (exit 64), rather than the mediator
    /// failing to serve it (a FAIL, exit 1: scripts read 64 as "the probe was misused").
    pub fn is_usage(&self) -> bool {
        !matches!(self, TargetError::Unreachable(..))
    }
}

/// The mediator under test.
#[derive(Clone, Debug)]
pub struct Target {
    /// The invitation as received.
    pub invitation: Value,
    /// Its `@id` (the `pthid` of handshake requests; empty for a connections invitation).
    pub invitation_id: String,
    /// Whether it is an out-of-band invitation (else a connections 1.0 `c_i` one).
    pub oob: bool,
    pub label: String,
    /// The handshakes it offers that the probe speaks, in the invitation's order.
    pub handshakes: Vec<Handshake>,
    /// Handshake protocols offered that the probe does not speak.
    pub unsupported_handshakes: Vec<String>,
    /// The invitation key, base58.
    pub recipient_key: String,
    /// HTTP endpoint for envelopes.
    pub http: String,
    /// WebSocket endpoint: from the invitation, else the mediator's DID, else `--ws`.
    pub ws: Option<String>,
    ws_override: Option<String>,
    /// Protocols disclosed by discover-features as `family/major` (None: not answered).
    pub features: Option<Vec<String>>,
    /// The handshake the first wallet onboarded with (later wallets use it).
    pub handshake: Option<Handshake>,
    pub timeout: Duration,
    /// What the run made on the mediator, to tidy at the end (shared by clones).
    pub(crate) left: super::tidy::Shared,
}

impl Target {
    /// Reads the invitation from the URL: its `oob=` (or `c_i=`) parameter, else the JSON the
    /// URL serves (`{"invitation": ...}` as mailroom's and the interop Credo mediator's
    /// `/invitation` answer, an invitation itself, or `{"invitation_url": ...}`).
    pub async fn from_url(url: &str, ws: Option<&str>, timeout: Duration) -> Result<Target, TargetError> {
        let bad = |why: &str| TargetError::BadUrl(url.to_string(), why.to_string());
        let u = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if !matches!(u.scheme(), "http" | "https" | "didcomm") {
            return Err(bad("not an http(s) URL"));
        }
        if let Some(ws) = ws {
            let w = url::Url::parse(ws).map_err(|e| TargetError::BadUrl(ws.to_string(), e.to_string()))?;
            if !matches!(w.scheme(), "ws" | "wss") {
                return Err(TargetError::BadUrl(
                    ws.to_string(),
                    "--ws needs a ws:// or wss:// URL".into(),
                ));
            }
        }
        let inv = match invitation_param(&u)? {
            Some(v) => v,
            None => {
                if u.scheme() == "didcomm" {
                    return Err(bad("no oob= or c_i= parameter"));
                }
                fetch_invitation(url, timeout).await?
            }
        };
        Self::from_invitation(inv, ws, timeout)
    }

    pub fn from_invitation(inv: Value, ws: Option<&str>, timeout: Duration) -> Result<Target, TargetError> {
        let bad = |s: String| TargetError::BadInvitation(s);
        let ty = inv["@type"].as_str().unwrap_or_default().to_string();
        let mut endpoints: Vec<String> = Vec::new();
        let mut key: Option<String> = None;
        let (oob, handshakes, unsupported) = if ty.ends_with("out-of-band/1.1/invitation")
            || ty.ends_with("out-of-band/1.0/invitation")
        {
            let services = inv["services"]
                .as_array()
                .ok_or_else(|| bad("out-of-band invitation without services".into()))?;
            for s in services {
                match s {
                    Value::String(d) => {
                        let doc = did::resolve(d, None).map_err(|e| bad(format!("service DID {d}: {e}")))?;
                        if key.is_none() {
                            key = doc.recipient_keys.first().cloned();
                        }
                        endpoints.extend(doc.endpoints.iter().cloned());
                    }
                    Value::Object(_) => {
                        if s["routingKeys"].as_array().map(|a| !a.is_empty()).unwrap_or(false) {
                            return Err(bad("the invitation's service routes through routingKeys (a mediator behind a mediator); the probe talks to the mediator directly".into()));
                        }
                        if key.is_none() {
                            key = s["recipientKeys"][0].as_str().map(str::to_string);
                        }
                        endpoints.extend(service_endpoints(&s["serviceEndpoint"]));
                    }
                    _ => return Err(bad("a service is neither a DID nor an object".into())),
                }
            }
            let mut hs = Vec::new();
            let mut unsupported = Vec::new();
            for p in inv["handshake_protocols"].as_array().into_iter().flatten() {
                let p = p.as_str().unwrap_or_default();
                match Handshake::from_protocol(p) {
                    Some(h) if !hs.contains(&h) => hs.push(h),
                    Some(_) => {}
                    None => unsupported.push(p.to_string()),
                }
            }
            if hs.is_empty() && unsupported.is_empty() {
                return Err(bad(
                    "out-of-band invitation without handshake_protocols (a mediator's invitation starts a connection)"
                        .into(),
                ));
            }
            (true, hs, unsupported)
        } else if ty.ends_with("connections/1.0/invitation") {
            if inv["routingKeys"].as_array().map(|a| !a.is_empty()).unwrap_or(false) {
                return Err(bad(
                    "the invitation routes through routingKeys; the probe talks to the mediator directly".into(),
                ));
            }
            key = inv["recipientKeys"][0].as_str().map(str::to_string);
            endpoints.extend(service_endpoints(&inv["serviceEndpoint"]));
            (false, vec![Handshake::Connections], Vec::new())
        } else {
            return Err(bad(format!("not an invitation: @type {ty:?}")));
        };
        let key = key.ok_or_else(|| bad("no recipient key".into()))?;
        let recipient_key = normalize_verkey(&key).map_err(|e| bad(format!("recipient key {key}: {e}")))?;
        let http = endpoints
            .iter()
            .find(|e| e.starts_with("http://") || e.starts_with("https://"))
            .cloned()
            .ok_or_else(|| bad(format!("no http(s) endpoint among {endpoints:?}")))?;
        let ws_inv = endpoints
            .iter()
            .find(|e| e.starts_with("ws://") || e.starts_with("wss://"))
            .cloned();
        Ok(Target {
            invitation_id: inv["@id"].as_str().unwrap_or_default().to_string(),
            label: inv["label"].as_str().unwrap_or_default().to_string(),
            invitation: inv,
            oob,
            handshakes,
            unsupported_handshakes: unsupported,
            recipient_key,
            http,
            ws: ws.map(str::to_string).or(ws_inv),
            ws_override: ws.map(str::to_string),
            features: None,
            handshake: None,
            timeout,
            left: Default::default(),
        })
    }

    /// One line naming the mediator for the report's header.
    pub fn describe(&self) -> String {
        let hs: Vec<&str> = self.handshakes.iter().map(|h| h.protocol()).collect();
        format!(
            "{:?}, handshakes {}{}",
            self.label,
            hs.join(" "),
            if self.unsupported_handshakes.is_empty() {
                String::new()
            } else {
                format!(" (not spoken by the probe: {})", self.unsupported_handshakes.join(" "))
            }
        )
    }

    /// Endpoints from the mediator's DID document: takes a WebSocket endpoint from there when
    /// the invitation named none (mailroom and ACA-Py invite over http only).
    pub fn learn_endpoints(&mut self, endpoints: &[String]) {
        if self.ws.is_none() && self.ws_override.is_none() {
            self.ws = endpoints
                .iter()
                .find(|e| e.starts_with("ws://") || e.starts_with("wss://"))
                .cloned();
        }
    }

    /// Whether discover-features disclosed `family` at `major` (None: nothing was disclosed).
    pub fn advertises(&self, family: &str, major: u32) -> Option<bool> {
        let want = format!("{family}/{major}");
        self.features.as_ref().map(|f| f.contains(&want))
    }
}

/// The `oob=` / `c_i=` / `d_m=` parameter of an invitation URL, decoded.
fn invitation_param(u: &url::Url) -> Result<Option<Value>, TargetError> {
    let bad = |why: String| TargetError::BadUrl(u.to_string(), why);
    for (k, v) in u.query_pairs() {
        if matches!(k.as_ref(), "oob" | "c_i" | "d_m") {
            let bytes = crate::protocols::decode_b64_any(&v).ok_or_else(|| bad(format!("{k}= is not base64")))?;
            let inv: Value =
                serde_json::from_slice(&bytes).map_err(|e| bad(format!("{k}= does not hold JSON: {e}")))?;
            return Ok(Some(inv));
        }
    }
    Ok(None)
}

/// GETs `url` and finds an invitation in its JSON.
async fn fetch_invitation(url: &str, timeout: Duration) -> Result<Value, TargetError> {
    let no = |why: String| TargetError::NoInvitation(url.to_string(), why);
    let down = |why: String| TargetError::Unreachable(url.to_string(), why);
    let client = awc::Client::builder().timeout(timeout).finish();
    let mut res = client
        .get(url)
        .insert_header(("Accept", "application/json"))
        .send()
        .await
        .map_err(|e| down(format!("GET: {e}")))?;
    let body = res.body().limit(1 << 20).await.map_err(|e| match e {
        // More than an invitation could be: not one.
        awc::error::PayloadError::Overflow => no("more than 1 MiB: not an invitation".into()),
        e => down(format!("body: {e}")),
    })?;
    let status = res.status().as_u16();
    if status >= 500 {
        return Err(down(format!("HTTP {status}")));
    }
    // A 4xx (or a 3xx) says this URL is not the invitation: the operator's mistake.
    if !res.status().is_success() {
        return Err(no(format!("HTTP {status}")));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| no("neither an oob=/c_i= parameter in the URL nor JSON at it (give the invitation URL)".into()))?;
    if v["invitation"].is_object() {
        return Ok(v["invitation"].clone());
    }
    if v["@type"].as_str().map(|t| t.ends_with("/invitation")).unwrap_or(false) {
        return Ok(v);
    }
    if let Some(u) = v["invitation_url"].as_str() {
        let parsed = url::Url::parse(u).map_err(|e| no(format!("invitation_url: {e}")))?;
        if let Some(inv) = invitation_param(&parsed)? {
            return Ok(inv);
        }
    }
    Err(no("the JSON holds no invitation".into()))
}

/// A `serviceEndpoint` as a string, or the DIDComm v2-style `{ "uri": ... }` object.
fn service_endpoints(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Object(o) => o
            .get("uri")
            .and_then(Value::as_str)
            .map(str::to_string)
            .into_iter()
            .collect(),
        Value::Array(a) => a.iter().flat_map(service_endpoints).collect(),
        _ => Vec::new(),
    }
}

/// `https://didcomm.org/messagepickup/2.0` (or a legacy `did:sov:...;spec/` one) to
/// `messagepickup/2`.
pub(crate) fn protocol_key(pid: &str) -> Option<String> {
    let pid = pid.trim_end_matches('/');
    let mut parts = pid.rsplit('/');
    let version = parts.next()?;
    let family = parts.next()?;
    let major = version.split('.').next()?;
    if family.is_empty() || major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{family}/{major}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn protocol_keys_ignore_prefix_and_minor() {
        assert_eq!(
            protocol_key("https://didcomm.org/messagepickup/2.0").as_deref(),
            Some("messagepickup/2")
        );
        assert_eq!(
            protocol_key("did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/coordinate-mediation/1.0").as_deref(),
            Some("coordinate-mediation/1")
        );
        assert_eq!(protocol_key("nonsense"), None);
    }

    #[test]
    fn credo_invitation_offers_both_handshakes_and_ws() {
        let key = crate::didcomm::keys::KeyPair::generate();
        let inv = json!({
            "@type": "https://didcomm.org/out-of-band/1.1/invitation",
            "@id": "i1",
            "label": "credo",
            "handshake_protocols": ["https://didcomm.org/didexchange/1.1", "https://didcomm.org/connections/1.0"],
            "services": [
                {"id": "#inline-0", "serviceEndpoint": "http://127.0.0.1:1", "type": "did-communication",
                 "recipientKeys": [key.did_key()], "routingKeys": []},
                {"id": "#inline-1", "serviceEndpoint": "ws://127.0.0.1:1", "type": "did-communication",
                 "recipientKeys": [key.did_key()], "routingKeys": []},
            ],
        });
        let t = Target::from_invitation(inv, None, Duration::from_secs(1)).unwrap();
        assert_eq!(t.handshakes, vec![Handshake::DidExchange11, Handshake::Connections]);
        assert_eq!(t.http, "http://127.0.0.1:1");
        assert_eq!(t.ws.as_deref(), Some("ws://127.0.0.1:1"));
        assert_eq!(t.recipient_key, key.verkey());
    }

    #[test]
    fn an_invitation_without_http_endpoint_is_refused() {
        let key = crate::didcomm::keys::KeyPair::generate();
        let inv = json!({
            "@type": "https://didcomm.org/out-of-band/1.1/invitation",
            "handshake_protocols": ["https://didcomm.org/didexchange/1.1"],
            "services": [{"serviceEndpoint": "ws://127.0.0.1:1", "recipientKeys": [key.did_key()]}],
        });
        assert!(Target::from_invitation(inv, None, Duration::from_secs(1)).is_err());
    }
}
