//! A DIDComm v2 wallet and sender, in Rust, beside the v1 ones: it finds the mediator from an
//! out-of-band 2.0 invitation (`?_oob=`), asks for mediation (coordinate-mediation 3.0, or
//! 2.0), registers its DID, picks up (messagepickup 3.0) over HTTP or live over a WebSocket;
//! a [`V2Sender`] forwards (routing 2.0) to a mediated DID. It shares the envelope code with
//! the mediator. `veramo_dialect` packs authcrypt as Veramo does (no tag in the 1PU KDF,
//! A256GCM), to drive that path of the mediator without Node.

use super::{post_typed, WsClient, WsEvent};
use crate::didcomm::message::new_id;
use crate::didcomm::v2::did::{self, Purpose};
use crate::didcomm::v2::jwe::{self, Alg, Dialect, Enc};
use crate::didcomm::v2::keys::{self, Agreement, Key};
use crate::didcomm::v2::{self as dv2, TYP_ENCRYPTED};
use anyhow::{anyhow, bail, Context};
use askar_crypto::alg::KeyAlg;
use serde_json::{json, Value};
use std::time::Duration;

pub const PICKUP: &str = "https://didcomm.org/messagepickup/3.0";
pub const MEDIATION: &str = "https://didcomm.org/coordinate-mediation/3.0";

/// Where a v2 mediator is: its DID and transports (from its DID document).
#[derive(Clone, Debug)]
pub struct V2Mediator {
    pub did: String,
    pub http: String,
    pub ws: Option<String>,
}

impl V2Mediator {
    /// From an out-of-band 2.0 invitation URL (`...?_oob=<base64url>`): resolves `from`.
    pub fn from_invitation_url(url: &str) -> anyhow::Result<V2Mediator> {
        let oob = url::Url::parse(url)?
            .query_pairs()
            .find(|(k, _)| k == "_oob")
            .map(|(_, v)| v.into_owned())
            .context("invitation URL without _oob")?;
        let raw = crate::didcomm::b64::decode(&oob).context("_oob is not base64url")?;
        let inv: Value = serde_json::from_slice(&raw)?;
        Self::from_did(inv["from"].as_str().context("invitation without from")?)
    }

    pub fn from_did(d: &str) -> anyhow::Result<V2Mediator> {
        let doc = did::resolve(d)?;
        let uris: Vec<String> = doc.didcomm_services().map(|s| s.uri.clone()).collect();
        Ok(V2Mediator {
            did: d.to_string(),
            http: uris
                .iter()
                .find(|u| u.starts_with("http"))
                .cloned()
                .context("mediator DID has no http service")?,
            ws: uris.iter().find(|u| u.starts_with("ws")).cloned(),
        })
    }

    /// The mediator DID's keyAgreement keys.
    pub fn keys(&self) -> anyhow::Result<Vec<(String, Key)>> {
        Ok(did::resolve(&self.did)?.agreement_keys())
    }
}

/// A v2 wallet mediated by one mediator.
pub struct V2Agent {
    /// Our did:peer:2 (X25519 `#key-1`, Ed25519 `#key-2`, no service): what we talk as.
    pub did: String,
    agreement: Agreement,
    /// Ed25519 `#key-2` of `did`: signs a `from_prior` when we rotate away from it.
    auth: Key,
    /// DIDs we rotated away from, with their agreement keys (mail queued for them still opens).
    prior: Vec<(String, Agreement)>,
    /// The agreement key of `recipient_did`.
    recipient_agreement: Option<Agreement>,
    /// Sent in every message once we rotated ([`V2Agent::rotate`]).
    pub from_prior: Option<String>,
    pub mediator: V2Mediator,
    /// The DID senders use for us (`service.uri` = the mediator's routing DID), once granted.
    pub routing_did: Option<String>,
    pub recipient_did: Option<String>,
    /// Pack as Veramo does: authcrypt A256GCM without the tag in the 1PU KDF.
    pub veramo_dialect: bool,
    /// How the last envelope we opened was packed (what the mediator answered in).
    last_dialect: std::sync::Mutex<Option<Dialect>>,
    timeout: Duration,
}

fn type_of(m: &Value) -> &str {
    m["type"].as_str().unwrap_or_default()
}

impl V2Agent {
    pub fn new(mediator: V2Mediator) -> anyhow::Result<V2Agent> {
        let agreement = Agreement::new(keys::generate(KeyAlg::X25519)?);
        let auth = keys::generate(KeyAlg::Ed25519)?;
        let did = did::create_peer2(std::slice::from_ref(agreement.key()), std::slice::from_ref(&auth), &[])?;
        Ok(V2Agent {
            did,
            agreement,
            auth,
            prior: Vec::new(),
            recipient_agreement: None,
            from_prior: None,
            mediator,
            routing_did: None,
            recipient_did: None,
            veramo_dialect: false,
            last_dialect: std::sync::Mutex::new(None),
            timeout: Duration::from_secs(20),
        })
    }

    /// How the last envelope this agent opened was packed.
    pub fn last_reply_dialect(&self) -> Option<Dialect> {
        *self.last_dialect.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn kid(&self) -> String {
        format!("{}#key-1", self.did)
    }

    /// A plaintext message of ours to the mediator.
    pub fn message(&self, typ: &str, body: Value) -> Value {
        let mut m = json!({
            "id": new_id(),
            "type": typ,
            "from": self.did,
            "to": [self.mediator.did],
            "created_time": crate::protocols::now_ms() / 1000,
            "return_route": "all",
            "body": body,
        });
        if let Some(fp) = &self.from_prior {
            m["from_prior"] = json!(fp);
        }
        m
    }

    /// A `from_prior` JWT (`iss`, `sub`, `iat` now) signed by our authentication key, named
    /// `kid` (ours is `{did}#key-2`; tests name others to forge).
    pub fn sign_from_prior(&self, iss: &str, sub: &str, kid: &str) -> anyhow::Result<String> {
        let claims = json!({ "iss": iss, "sub": sub, "iat": crate::protocols::now_ms() / 1000 });
        Ok(crate::didcomm::v2::jws::sign_jwt(&claims, kid, &self.auth)?)
    }

    /// Rotates to a fresh did:peer:2 (new keys): from now on every message is sent from it
    /// with `from_prior` signed by the old DID. Returns the new DID.
    pub fn rotate(&mut self) -> anyhow::Result<String> {
        let agreement = Agreement::new(keys::generate(KeyAlg::X25519)?);
        let auth = keys::generate(KeyAlg::Ed25519)?;
        let new = did::create_peer2(std::slice::from_ref(agreement.key()), std::slice::from_ref(&auth), &[])?;
        let jwt = self.sign_from_prior(&self.did, &new, &format!("{}#key-2", self.did))?;
        let old = std::mem::replace(&mut self.did, new.clone());
        let old_agreement = std::mem::replace(&mut self.agreement, agreement);
        self.prior.push((old, old_agreement));
        self.auth = auth;
        self.from_prior = Some(jwt);
        Ok(new)
    }

    /// Signs a plaintext with our authentication key (`#key-2`): a JWS (JSON serialization),
    /// not encrypted.
    pub fn sign(&self, msg: &Value) -> anyhow::Result<Vec<u8>> {
        let jws = crate::didcomm::v2::jws::sign(&serde_json::to_vec(msg)?, &format!("{}#key-2", self.did), &self.auth)?;
        Ok(serde_json::to_vec(&jws)?)
    }

    /// Authcrypts a plaintext to the mediator and to `also` (kid, public key) in one envelope:
    /// what a wallet writes to several parties at once.
    pub fn pack_also(&self, msg: &Value, also: &[(String, Key)]) -> anyhow::Result<Vec<u8>> {
        let mut to = self.mediator.keys()?;
        to.extend_from_slice(also);
        Ok(jwe::pack(
            &serde_json::to_vec(msg)?,
            &to,
            Some((&self.kid(), &self.agreement)),
            Dialect::AUTHCRYPT,
        )?)
    }

    /// Authcrypts a plaintext to the mediator.
    pub fn pack(&self, msg: &Value) -> anyhow::Result<Vec<u8>> {
        let d = if self.veramo_dialect {
            Dialect {
                alg: Alg::Ecdh1PuA256Kw,
                enc: Enc::A256Gcm,
                tag_in_kdf: false,
            }
        } else {
            Dialect::AUTHCRYPT
        };
        Ok(jwe::pack(
            &serde_json::to_vec(msg)?,
            &self.mediator.keys()?,
            Some((&self.kid(), &self.agreement)),
            d,
        )?)
    }

    /// Opens an envelope addressed to us (our DID or our recipient DID: same key).
    pub fn unpack(&self, env: &[u8]) -> anyhow::Result<Value> {
        let mine = |kid: &str| -> Option<Agreement> {
            let d = did::did_of(kid);
            if d == self.did {
                Some(self.agreement.clone())
            } else if Some(d) == self.recipient_did.as_deref() {
                // Made with the agreement key we had then.
                self.recipient_agreement.clone()
            } else {
                self.prior.iter().find(|(p, _)| p == d).map(|(_, k)| k.clone())
            }
        };
        let u = dv2::unpack(env, &mine, &did::resolve_key)?;
        *self.last_dialect.lock().unwrap_or_else(|e| e.into_inner()) = u.dialect;
        Ok(serde_json::from_slice(&u.plaintext)?)
    }

    /// POSTs a message; returns the status and the opened reply, if any.
    pub async fn post(&self, msg: &Value) -> anyhow::Result<(u16, Option<Value>)> {
        let (status, body) = post_typed(&self.mediator.http, self.pack(msg)?, TYP_ENCRYPTED, self.timeout).await?;
        if body.is_empty() {
            return Ok((status, None));
        }
        let reply = self
            .unpack(&body)
            .with_context(|| format!("reply ({status}): {}", String::from_utf8_lossy(&body)))?;
        Ok((status, Some(reply)))
    }

    /// POSTs and expects a 200 reply of the given message name.
    pub async fn request(&self, msg: &Value, want: &str) -> anyhow::Result<Value> {
        let (status, reply) = self.post(msg).await?;
        let reply = reply.with_context(|| format!("no reply ({status})"))?;
        if status != 200 || !type_of(&reply).ends_with(&format!("/{want}")) {
            bail!("wanted {want}, got {status} {reply}");
        }
        Ok(reply)
    }

    /// coordinate-mediation 3.0 (or 2.0) mediate-request; registers a recipient DID whose
    /// service uri is the granted routing DID (as Indicio does) and keeps it.
    pub async fn mediate(&mut self, version: &str) -> anyhow::Result<String> {
        let grant = self
            .request(
                &self.message(
                    &format!("https://didcomm.org/coordinate-mediation/{version}/mediate-request"),
                    json!({}),
                ),
                "mediate-grant",
            )
            .await?;
        let routing = match &grant["body"]["routing_did"] {
            Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
        .context("grant without routing_did")?;
        let recipient = did::create_peer2(
            std::slice::from_ref(self.agreement.key()),
            &[],
            &[(routing.clone(), vec![])],
        )?;
        self.routing_did = Some(routing.clone());
        self.recipient_did = Some(recipient);
        self.recipient_agreement = Some(self.agreement.clone());
        Ok(routing)
    }

    /// recipient-update (3.0) or keylist-update (2.0): adds and removes recipient DIDs;
    /// returns the `updated` list.
    pub async fn update(&self, version: &str, add: &[String], remove: &[String]) -> anyhow::Result<Vec<Value>> {
        let updates: Vec<Value> = add
            .iter()
            .map(|d| json!({ "recipient_did": d, "action": "add" }))
            .chain(remove.iter().map(|d| json!({ "recipient_did": d, "action": "remove" })))
            .collect();
        let (name, want) = if version.starts_with('2') {
            ("keylist-update", "keylist-update-response")
        } else {
            ("recipient-update", "recipient-update-response")
        };
        let r = self
            .request(
                &self.message(
                    &format!("https://didcomm.org/coordinate-mediation/{version}/{name}"),
                    json!({ "updates": updates }),
                ),
                want,
            )
            .await?;
        Ok(r["body"]["updated"].as_array().cloned().unwrap_or_default())
    }

    /// Mediation 3.0, then registers our recipient DID: what senders then forward to.
    pub async fn onboard(&mut self) -> anyhow::Result<String> {
        self.mediate("3.0").await?;
        let r = self.recipient_did.clone().context("no recipient DID")?;
        let up = self.update("3.0", std::slice::from_ref(&r), &[]).await?;
        if up.first().and_then(|u| u["result"].as_str()) != Some("success") {
            bail!("recipient not registered: {up:?}");
        }
        Ok(r)
    }

    /// pickup 3.0 status-request -> message_count.
    pub async fn status(&self, recipient_did: Option<&str>) -> anyhow::Result<u64> {
        let mut body = json!({});
        if let Some(r) = recipient_did {
            body["recipient_did"] = json!(r);
        }
        let s = self
            .request(&self.message(&format!("{PICKUP}/status-request"), body), "status")
            .await?;
        s["body"]["message_count"]
            .as_u64()
            .context("status without message_count")
    }

    /// pickup 3.0 delivery-request: (attachment id, opened message) pairs; empty on `status`.
    pub async fn delivery(&self, limit: u64, recipient_did: Option<&str>) -> anyhow::Result<Vec<(String, Value)>> {
        let mut body = json!({ "limit": limit });
        if let Some(r) = recipient_did {
            body["recipient_did"] = json!(r);
        }
        let (status, reply) = self
            .post(&self.message(&format!("{PICKUP}/delivery-request"), body))
            .await?;
        let reply = reply.with_context(|| format!("no reply ({status})"))?;
        match type_of(&reply).rsplit('/').next() {
            Some("status") => Ok(vec![]),
            Some("delivery") => self.open_delivery(&reply),
            _ => bail!("delivery-request answered {status} {reply}"),
        }
    }

    /// The attachments of a delivery, opened.
    pub fn open_delivery(&self, d: &Value) -> anyhow::Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for a in d["attachments"].as_array().into_iter().flatten() {
            let id = a["id"].as_str().context("attachment without id")?.to_string();
            let env = match a["data"].get("json") {
                Some(j) => serde_json::to_vec(j)?,
                None => crate::didcomm::b64::decode(a["data"]["base64"].as_str().unwrap_or_default())
                    .context("attachment data")?,
            };
            out.push((id, self.unpack(&env)?));
        }
        Ok(out)
    }

    /// pickup 3.0 messages-received -> the status's message_count.
    pub async fn ack(&self, ids: &[String]) -> anyhow::Result<u64> {
        let s = self
            .request(
                &self.message(
                    &format!("{PICKUP}/messages-received"),
                    json!({ "message_id_list": ids }),
                ),
                "status",
            )
            .await?;
        s["body"]["message_count"]
            .as_u64()
            .context("status without message_count")
    }

    /// Opens a WebSocket to the mediator (not in live mode).
    pub async fn socket(&self) -> anyhow::Result<V2Socket> {
        let ws = self.mediator.ws.clone().context("mediator has no ws service")?;
        Ok(V2Socket {
            ws: super::websocket(&ws).await?,
        })
    }

    /// Opens a WebSocket to the mediator and turns live delivery on.
    pub async fn live(&self) -> anyhow::Result<V2Socket> {
        let mut s = self.socket().await?;
        let mut msg = self.message(
            &format!("{PICKUP}/live-delivery-change"),
            json!({ "live_delivery": true }),
        );
        // As Indicio: no return_route on the socket; the socket is the route.
        msg.as_object_mut().map(|o| o.remove("return_route"));
        s.ws.send_envelope(self.pack(&msg)?, true).await?;
        let st = self.recv(&mut s, self.timeout).await?;
        if !type_of(&st).ends_with("/status") || st["body"]["live_delivery"] != json!(true) {
            bail!("live-delivery-change answered {st}");
        }
        Ok(s)
    }

    /// The next message on the socket, opened.
    pub async fn recv(&self, s: &mut V2Socket, timeout: Duration) -> anyhow::Result<Value> {
        match s.ws.next(timeout).await? {
            WsEvent::Envelope(b) => self
                .unpack(&b)
                .with_context(|| String::from_utf8_lossy(&b).into_owned()),
            WsEvent::Closed(r) => Err(anyhow!("socket closed: {r:?}")),
        }
    }

    /// Sends a message on the socket.
    pub async fn send(&self, s: &mut V2Socket, msg: &Value) -> anyhow::Result<()> {
        s.ws.send_envelope(self.pack(msg)?, false).await
    }
}

/// A v2 WebSocket to the mediator.
pub struct V2Socket {
    pub ws: WsClient,
}

/// A v2 sender: authcrypts (or anoncrypts) a message to a mediated DID and forwards it
/// through the mediator its service names (routing 2.0).
pub struct V2Sender {
    pub did: String,
    agreement: Agreement,
    /// Content encryption of the anoncrypted forward (the inner message is always authcrypt).
    pub enc: Enc,
    /// Authcrypt the forward itself (1PU from our DID, A256CBC-HS512) instead of anoncrypt:
    /// the mediator accepts both (routing 2.0 needs no authenticated sender).
    pub authcrypt_forward: bool,
    timeout: Duration,
}

impl V2Sender {
    pub fn new() -> anyhow::Result<V2Sender> {
        let agreement = Agreement::new(keys::generate(KeyAlg::X25519)?);
        let did = did::create_peer2(
            std::slice::from_ref(agreement.key()),
            &[keys::generate(KeyAlg::Ed25519)?],
            &[],
        )?;
        Ok(V2Sender {
            did,
            agreement,
            enc: Enc::A256Gcm,
            authcrypt_forward: false,
            timeout: Duration::from_secs(20),
        })
    }

    /// A basic message 2.0 to `to`.
    pub fn basic(&self, to: &str, content: &str) -> Value {
        json!({
            "id": new_id(),
            "type": "https://didcomm.org/basicmessage/2.0/message",
            "from": self.did,
            "to": [to],
            "created_time": crate::protocols::now_ms() / 1000,
            "body": { "content": content },
        })
    }

    /// The envelope to POST: `msg` authcrypted to `to`, wrapped in a forward (`next` = `to`)
    /// anoncrypted to the mediator `to`'s service names. Returns (mediator http, envelope).
    pub fn forward_envelope(&self, to: &str, msg: &Value) -> anyhow::Result<(String, Vec<u8>)> {
        let doc = did::resolve(to)?;
        let svc = doc
            .didcomm_services()
            .next()
            .context("recipient DID has no DIDCommMessaging service")?;
        let inner = jwe::pack(
            &serde_json::to_vec(msg)?,
            &doc.agreement_keys(),
            Some((&format!("{}#key-1", self.did), &self.agreement)),
            Dialect::AUTHCRYPT,
        )?;
        let mediator = if svc.uri_is_did() {
            V2Mediator::from_did(&svc.uri)?
        } else {
            bail!("recipient service is not a mediator DID: {}", svc.uri)
        };
        let fwd = json!({
            "id": new_id(),
            "type": "https://didcomm.org/routing/2.0/forward",
            "to": [mediator.did],
            "body": { "next": to },
            "attachments": [{ "id": new_id(), "media_type": TYP_ENCRYPTED, "data": { "json": serde_json::from_slice::<Value>(&inner)? } }],
        });
        let kid = format!("{}#key-1", self.did);
        let (sender, dialect) = if self.authcrypt_forward {
            (Some((kid.as_str(), &self.agreement)), Dialect::AUTHCRYPT)
        } else {
            (
                None,
                Dialect {
                    alg: Alg::EcdhEsA256Kw,
                    enc: self.enc,
                    tag_in_kdf: false,
                },
            )
        };
        let outer = jwe::pack(&serde_json::to_vec(&fwd)?, &mediator.keys()?, sender, dialect)?;
        Ok((mediator.http, outer))
    }

    /// Forwards `msg` to `to`; returns the HTTP status.
    pub async fn forward(&self, to: &str, msg: &Value) -> anyhow::Result<u16> {
        let (http, env) = self.forward_envelope(to, msg)?;
        Ok(post_typed(&http, env, TYP_ENCRYPTED, self.timeout).await?.0)
    }

    /// Forwards to `to` through the mediator at `http` (another node of the same cluster).
    pub async fn forward_via(&self, http: &str, to: &str, msg: &Value) -> anyhow::Result<u16> {
        let (_, env) = self.forward_envelope(to, msg)?;
        Ok(post_typed(http, env, TYP_ENCRYPTED, self.timeout).await?.0)
    }
}

/// Whether `kid` names a key agreement key of `did_str` (for tests and tools).
pub fn names_agreement_key(did_str: &str, kid: &str) -> bool {
    did::resolve(did_str)
        .map(|d| d.key(kid, Purpose::KeyAgreement).is_some())
        .unwrap_or(false)
}
