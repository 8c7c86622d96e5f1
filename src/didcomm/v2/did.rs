//! DIDs as DIDComm v2 peers use them: did:peer:2 (current `#key-N` ids and the legacy ids
//! SICPA's libraries emit: `#` + the multibase key without its `z`), did:peer:4 long form
//! (short form through a known long form), did:key (Ed25519 with its X25519 key agreement
//! key, X25519, P-256, P-384, secp256k1). `DIDCommMessaging` services in both shapes: the v2.1
//! object `{uri, accept, routingKeys}` and the legacy string with `accept`/`routingKeys` beside
//! it. A service `uri` that is itself a DID means "through that DID's service"
//! ([`Service::uri_is_did`]).
//!
//! What an envelope can make us resolve is bounded: peer DIDs of at most
//! [`MAX_PEER_DID_LEN`] bytes, [`MAX_DIDS_PER_ENVELOPE`] DIDs per envelope, each once
//! ([`EnvelopeKeys`]); a node keeps resolved documents by DID ([`DocCache`]).

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::keys::{self, Key};
use super::V2Error;
use crate::didcomm::b64;
use crate::didcomm::did::{MAX_DID_LEN, MAX_PEER_DID_LEN};

const MAX_METHODS: usize = 32;
const MAX_SERVICES: usize = 16;
const JSON_CODEC: [u8; 2] = [0x80, 0x04];

/// What a key is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    KeyAgreement,
    Authentication,
}

#[derive(Clone, Debug)]
pub struct Method {
    /// Absolute DID URL (`did#key-1`).
    pub id: String,
    /// Other DID URLs naming the same key (legacy did:peer:2 ids, the did:peer:4 short form).
    pub aliases: Vec<String>,
    pub key: Key,
}

impl Method {
    fn named(&self, kid: &str) -> bool {
        self.id == kid || self.aliases.iter().any(|a| a == kid)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: String,
    pub uri: String,
    pub accept: Vec<String>,
    pub routing_keys: Vec<String>,
}

impl Service {
    /// The endpoint is another DID (a mediator): send through that DID's service.
    pub fn uri_is_did(&self) -> bool {
        self.uri.starts_with("did:")
    }
}

/// A resolved DID document, reduced to what DIDComm v2 needs.
#[derive(Clone, Debug)]
pub struct Doc {
    pub id: String,
    pub also_known_as: Vec<String>,
    pub methods: Vec<Method>,
    /// Indexes into `methods`.
    pub key_agreement: Vec<usize>,
    pub authentication: Vec<usize>,
    pub services: Vec<Service>,
}

impl Doc {
    /// A key of the given purpose by DID URL (any of its names).
    pub fn key(&self, kid: &str, purpose: Purpose) -> Option<&Method> {
        let list = match purpose {
            Purpose::KeyAgreement => &self.key_agreement,
            Purpose::Authentication => &self.authentication,
        };
        list.iter().map(|&i| &self.methods[i]).find(|m| m.named(kid))
    }

    /// Every key agreement key (kid, key), in document order.
    pub fn agreement_keys(&self) -> Vec<(String, Key)> {
        self.key_agreement
            .iter()
            .map(|&i| (self.methods[i].id.clone(), self.methods[i].key.clone()))
            .collect()
    }

    /// `DIDCommMessaging` services that accept didcomm/v2 (or say nothing about it).
    pub fn didcomm_services(&self) -> impl Iterator<Item = &Service> {
        self.services
            .iter()
            .filter(|s| s.accept.is_empty() || s.accept.iter().any(|a| a == "didcomm/v2"))
    }

    /// Whether `did` is this document's DID (either did:peer:4 form).
    pub fn is(&self, did: &str) -> bool {
        self.id == did || self.also_known_as.iter().any(|a| a == did)
    }
}

fn bad(s: impl Into<String>) -> V2Error {
    V2Error::Did(s.into())
}

/// The DID of a DID URL (`did:...#frag` or `did:...?q`).
pub fn did_of(url: &str) -> &str {
    let end = url.find(['#', '?']).unwrap_or(url.len());
    &url[..end]
}

/// Resolves a self-certifying DID (did:peer:2, long-form did:peer:4, did:key). A peer DID
/// longer than [`MAX_PEER_DID_LEN`] is refused: a did:peer:4's document is base58, decoded in
/// time quadratic in its length.
pub fn resolve(did: &str) -> Result<Doc, V2Error> {
    if did.len() > MAX_DID_LEN {
        return Err(bad("DID too long"));
    }
    let did = did_of(did);
    if did.starts_with("did:peer:") && did.len() > MAX_PEER_DID_LEN {
        return Err(bad(format!(
            "{} of {} bytes (at most {MAX_PEER_DID_LEN})",
            did.chars().take(10).collect::<String>(),
            did.len()
        )));
    }
    if let Some(rest) = did.strip_prefix("did:key:") {
        return resolve_did_key(did, rest);
    }
    if did.starts_with("did:peer:2") {
        return resolve_peer2(did);
    }
    if did.starts_with("did:peer:4") {
        return resolve_peer4(did);
    }
    Err(bad(format!(
        "unsupported DID method: {}",
        did.chars().take(40).collect::<String>()
    )))
}

/// The public key a DID URL names, for the purpose (authcrypt `skid`: key agreement; JWS
/// `kid`: authentication). A did:key without fragment names its first key of the purpose.
pub fn resolve_key(kid: &str, purpose: Purpose) -> Result<Key, V2Error> {
    key_of(&resolve(kid)?, kid, purpose)
}

/// The key `kid` names in `doc` (the document of `did_of(kid)`), as [`resolve_key`] reads it.
fn key_of(doc: &Doc, kid: &str, purpose: Purpose) -> Result<Key, V2Error> {
    if !kid.contains('#') {
        let list = match purpose {
            Purpose::KeyAgreement => &doc.key_agreement,
            Purpose::Authentication => &doc.authentication,
        };
        if let Some(&i) = list.first() {
            return Ok(doc.methods[i].key.clone());
        }
    }
    doc.key(kid, purpose)
        .map(|m| m.key.clone())
        .ok_or_else(|| V2Error::UnknownSender(kid.chars().take(200).collect()))
}

/// Most distinct DIDs the kids of one envelope may name ([`EnvelopeKeys`]): the authcrypt
/// `skid` and the signers of a JWS inside or alone (up to [`super::jws::MAX_SIGNATURES`]).
/// Real peers name one (the sender signs and encrypts with keys of its one DID).
pub const MAX_DIDS_PER_ENVELOPE: usize = 4;

/// The keys the kids of one envelope name, each DID resolved once (an `skid` and the JWS
/// signer inside are usually the same DID), at most [`MAX_DIDS_PER_ENVELOPE`] DIDs, through
/// `cache` when given.
pub struct EnvelopeKeys<'a> {
    cache: Option<&'a DocCache>,
    seen: RefCell<Vec<(String, Resolved)>>,
}

/// A DID's document, or why it did not resolve.
type Resolved = Result<Arc<Doc>, V2Error>;

impl<'a> EnvelopeKeys<'a> {
    pub fn new(cache: Option<&'a DocCache>) -> EnvelopeKeys<'a> {
        EnvelopeKeys {
            cache,
            seen: RefCell::new(Vec::new()),
        }
    }

    /// [`resolve_key`], within the caps of one envelope.
    pub fn resolve_key(&self, kid: &str, purpose: Purpose) -> Result<Key, V2Error> {
        if kid.len() > MAX_DID_LEN {
            return Err(bad("DID too long"));
        }
        let did = did_of(kid);
        let known = self
            .seen
            .borrow()
            .iter()
            .find(|(d, _)| d == did)
            .map(|(_, r)| r.clone());
        let doc = match known {
            Some(r) => r?,
            None => {
                if self.seen.borrow().len() >= MAX_DIDS_PER_ENVELOPE {
                    return Err(bad(format!(
                        "the kids of one envelope name more than {MAX_DIDS_PER_ENVELOPE} DIDs"
                    )));
                }
                let r = match self.cache {
                    Some(c) => c.resolve(did),
                    None => resolve(did).map(Arc::new),
                };
                self.seen.borrow_mut().push((did.to_string(), r.clone()));
                r?
            }
        };
        key_of(&doc, kid, purpose)
    }
}

/// Resolved documents of peer DIDs by DID, shared by a node: a DID names its document (every
/// method read here is self-certifying), so an entry never goes stale and a connection's
/// replies and live deliveries resolve its DID once, not once per message. Bounded by entries
/// and by the bytes of the names it holds; when full it starts over.
pub struct DocCache {
    inner: Mutex<CacheInner>,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct CacheInner {
    docs: HashMap<String, Arc<Doc>>,
    bytes: usize,
}

impl DocCache {
    /// Entries a node keeps by default: one per v2 peer that talked to it lately.
    pub const DEFAULT_ENTRIES: usize = 4096;
    /// Bytes of DIDs and key ids a node keeps by default. A real peer's entry is ~4-5 KiB (its
    /// DID is in every key id, under three names), the largest a peer DID can make ~400 KiB.
    pub const DEFAULT_BYTES: usize = 8 << 20;

    pub fn new(max_entries: usize, max_bytes: usize) -> DocCache {
        DocCache {
            inner: Mutex::new(CacheInner::default()),
            max_entries,
            max_bytes,
        }
    }

    /// [`resolve`] of the DID of `did` (a DID or DID URL), from the cache when it is there.
    /// Only documents that resolved are kept.
    pub fn resolve(&self, did: &str) -> Result<Arc<Doc>, V2Error> {
        let did = did_of(did);
        if let Some(d) = self.inner.lock().docs.get(did) {
            return Ok(d.clone());
        }
        // Resolved outside the lock: other peers' lookups do not wait for this one.
        let doc = Arc::new(resolve(did)?);
        let size = did.len() + doc_bytes(&doc);
        if size <= self.max_bytes {
            let mut inner = self.inner.lock();
            if inner.docs.len() >= self.max_entries || inner.bytes + size > self.max_bytes {
                inner.docs.clear();
                inner.bytes = 0;
            }
            if inner.docs.insert(did.to_string(), doc.clone()).is_none() {
                inner.bytes += size;
            }
        }
        Ok(doc)
    }

    /// Documents held now.
    pub fn len(&self) -> usize {
        self.inner.lock().docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for DocCache {
    fn default() -> Self {
        DocCache::new(DocCache::DEFAULT_ENTRIES, DocCache::DEFAULT_BYTES)
    }
}

/// The bytes a document holds in names (its keys and services are small beside them).
fn doc_bytes(doc: &Doc) -> usize {
    let names = doc.id.len()
        + doc.also_known_as.iter().map(String::len).sum::<usize>()
        + doc
            .methods
            .iter()
            .map(|m| m.id.len() + m.aliases.iter().map(String::len).sum::<usize>() + 128)
            .sum::<usize>()
        + doc
            .services
            .iter()
            .map(|s| s.id.len() + s.uri.len() + s.accept.iter().chain(&s.routing_keys).map(String::len).sum::<usize>())
            .sum::<usize>();
    names + 256
}

// ---------------------------------------------------------------------------------------------
// did:key

fn resolve_did_key(did: &str, mb: &str) -> Result<Doc, V2Error> {
    let key = keys::from_multibase(mb)?;
    let id = format!("{did}#{mb}");
    let alg = key.algorithm();
    let mut doc = Doc {
        id: did.to_string(),
        also_known_as: vec![],
        methods: vec![Method {
            id,
            aliases: vec![],
            key: key.clone(),
        }],
        key_agreement: vec![],
        authentication: vec![],
        services: vec![],
    };
    match alg {
        askar_crypto::alg::KeyAlg::Ed25519 => {
            doc.authentication.push(0);
            let x = keys::ed25519_to_x25519(&key)?;
            let xmb = keys::to_multibase(&x)?;
            doc.methods.push(Method {
                id: format!("{did}#{xmb}"),
                aliases: vec![],
                key: x,
            });
            doc.key_agreement.push(1);
        }
        askar_crypto::alg::KeyAlg::X25519 => doc.key_agreement.push(0),
        askar_crypto::alg::KeyAlg::EcCurve(askar_crypto::alg::EcCurves::Secp256k1) => doc.authentication.push(0),
        _ => {
            doc.authentication.push(0);
            doc.key_agreement.push(0);
        }
    }
    Ok(doc)
}

// ---------------------------------------------------------------------------------------------
// did:peer:2

fn resolve_peer2(did: &str) -> Result<Doc, V2Error> {
    let body = did
        .strip_prefix("did:peer:2.")
        .ok_or_else(|| bad("did:peer:2 without elements"))?;
    let mut doc = Doc {
        id: did.to_string(),
        also_known_as: vec![],
        methods: vec![],
        key_agreement: vec![],
        authentication: vec![],
        services: vec![],
    };
    let mut raw_services = Vec::new();
    for element in body.split('.') {
        let mut chars = element.chars();
        let purpose = chars.next().ok_or_else(|| bad("empty did:peer:2 element"))?;
        let value = chars.as_str();
        match purpose {
            'A' | 'E' | 'V' | 'I' | 'D' => {
                if doc.methods.len() >= MAX_METHODS {
                    return Err(bad("too many keys"));
                }
                let key = keys::from_multibase(value)?;
                let n = doc.methods.len() + 1;
                doc.methods.push(Method {
                    id: format!("{did}#key-{n}"),
                    aliases: vec![
                        format!("{did}#{}", value.strip_prefix('z').unwrap_or(value)),
                        format!("{did}#{value}"),
                    ],
                    key,
                });
                match purpose {
                    'E' => doc.key_agreement.push(n - 1),
                    'V' => doc.authentication.push(n - 1),
                    _ => {}
                }
            }
            'S' => {
                let raw = b64::decode(value).ok_or_else(|| bad("did:peer:2 service is not base64"))?;
                let parsed: Value = serde_json::from_slice(&raw).map_err(|_| bad("did:peer:2 service is not JSON"))?;
                match parsed {
                    Value::Array(a) => raw_services.extend(a),
                    other => raw_services.push(other),
                }
            }
            other => return Err(bad(format!("unknown did:peer:2 purpose {other}"))),
        }
    }
    for (i, s) in raw_services.into_iter().enumerate() {
        if i >= MAX_SERVICES {
            return Err(bad("too many services"));
        }
        let s = crate::didcomm::did::expand_abbreviations(s);
        let default_id = if i == 0 {
            "#service".to_string()
        } else {
            format!("#service-{i}")
        };
        read_service(did, &s, &default_id, &mut doc.services);
    }
    Ok(doc)
}

/// Reads one service entry (any shape) into `out`; non-DIDComm services are skipped.
fn read_service(did: &str, s: &Value, default_id: &str, out: &mut Vec<Service>) {
    if s["type"].as_str() != Some("DIDCommMessaging") {
        return;
    }
    let id = s["id"].as_str().unwrap_or(default_id);
    let id = if id.starts_with('#') {
        format!("{did}{id}")
    } else {
        id.to_string()
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .take(16)
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut push = |uri: &str, accept: Vec<String>, routing_keys: Vec<String>| {
        if out.len() < MAX_SERVICES && !uri.is_empty() {
            out.push(Service {
                id: id.clone(),
                uri: uri.to_string(),
                accept,
                routing_keys,
            });
        }
    };
    let ep = &s["serviceEndpoint"];
    let entries: Vec<&Value> = match ep {
        Value::Array(a) => a.iter().take(MAX_SERVICES).collect(),
        other => vec![other],
    };
    for e in entries {
        match e {
            // Legacy shape: the endpoint is a string, accept and routingKeys beside it.
            Value::String(uri) => push(uri, strings(&s["accept"]), strings(&s["routingKeys"])),
            Value::Object(_) => {
                if let Some(uri) = e["uri"].as_str() {
                    push(uri, strings(&e["accept"]), strings(&e["routingKeys"]));
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// did:peer:4

fn resolve_peer4(did: &str) -> Result<Doc, V2Error> {
    let short = crate::didcomm::did::peer4_short_form(did).map_err(|e| bad(e.to_string()))?;
    let encoded = did.rsplit(':').next().unwrap_or_default();
    let raw = encoded
        .strip_prefix('z')
        .and_then(|e| bs58::decode(e).into_vec().ok())
        .ok_or_else(|| bad("did:peer:4 document is not base58btc"))?;
    let json_bytes = raw
        .strip_prefix(&JSON_CODEC[..])
        .ok_or_else(|| bad("did:peer:4 document is not multicodec JSON"))?;
    let doc: Value = serde_json::from_slice(json_bytes).map_err(|_| bad("did:peer:4 document is not JSON"))?;
    interpret(did, &[short], &doc)
}

/// Reads a JSON DID document (ids relative or absolute) for `did`, also known as `aliases`.
pub fn interpret(did: &str, aliases: &[String], doc: &Value) -> Result<Doc, V2Error> {
    let mut out = Doc {
        id: did.to_string(),
        also_known_as: aliases.to_vec(),
        methods: vec![],
        key_agreement: vec![],
        authentication: vec![],
        services: vec![],
    };
    let names = |id: &str| -> (String, Vec<String>) {
        let frag = match id.find('#') {
            Some(i) => &id[i..],
            None => return (id.to_string(), vec![]),
        };
        let abs = format!("{did}{frag}");
        let mut al: Vec<String> = aliases.iter().map(|a| format!("{a}{frag}")).collect();
        if id != abs {
            al.push(id.to_string());
        }
        (abs, al)
    };
    let add_method = |out: &mut Doc, vm: &Value| -> Option<usize> {
        let id = vm["id"].as_str()?;
        let (abs, al) = names(id);
        if let Some(i) = out.methods.iter().position(|m| m.id == abs) {
            return Some(i);
        }
        if out.methods.len() >= MAX_METHODS {
            return None;
        }
        let key = method_key(vm).ok()?;
        out.methods.push(Method {
            id: abs,
            aliases: al,
            key,
        });
        Some(out.methods.len() - 1)
    };
    if let Some(vms) = doc["verificationMethod"].as_array() {
        for vm in vms.iter().take(MAX_METHODS) {
            add_method(&mut out, vm);
        }
    }
    for (rel, purpose) in [
        ("keyAgreement", Purpose::KeyAgreement),
        ("authentication", Purpose::Authentication),
    ] {
        let Some(list) = doc[rel].as_array() else { continue };
        for r in list.iter().take(MAX_METHODS) {
            let idx = match r {
                Value::String(s) => {
                    let (abs, _) = names(s);
                    out.methods.iter().position(|m| m.id == abs)
                }
                Value::Object(_) => add_method(&mut out, r),
                _ => None,
            };
            if let Some(i) = idx {
                match purpose {
                    Purpose::KeyAgreement => out.key_agreement.push(i),
                    Purpose::Authentication => out.authentication.push(i),
                }
            }
        }
    }
    if let Some(services) = doc["service"].as_array() {
        for (i, s) in services.iter().take(MAX_SERVICES).enumerate() {
            read_service(did, s, &format!("#service-{i}"), &mut out.services);
        }
    }
    Ok(out)
}

fn method_key(vm: &Value) -> Result<Key, V2Error> {
    if let Some(mb) = vm["publicKeyMultibase"].as_str() {
        return keys::from_multibase(mb);
    }
    if vm.get("publicKeyJwk").is_some() {
        return keys::from_jwk(&vm["publicKeyJwk"]);
    }
    if let Some(b58) = vm["publicKeyBase58"].as_str() {
        // An Ed25519 or X25519 key is 44 characters; base58 decoding is quadratic.
        if b58.len() > 64 {
            return Err(bad("publicKeyBase58 too long"));
        }
        let raw = bs58::decode(b58)
            .into_vec()
            .map_err(|_| bad("publicKeyBase58 is not base58"))?;
        let alg = match vm["type"].as_str() {
            Some(t) if t.starts_with("X25519") => askar_crypto::alg::KeyAlg::X25519,
            Some(t) if t.starts_with("Ed25519") => askar_crypto::alg::KeyAlg::Ed25519,
            _ => return Err(bad("publicKeyBase58 of an unknown type")),
        };
        return keys::from_public_bytes(alg, &raw);
    }
    Err(bad("verification method without a key"))
}

// ---------------------------------------------------------------------------------------------
// Creating did:peer:2

/// A did:peer:2 with key agreement keys (`E`) first, then authentication keys (`V`), then one
/// `S` element per service `(uri, routing_keys)`, each in the v2.1 object shape with
/// `accept: ["didcomm/v2"]` (what Veramo and Indicio both read). Check the result with
/// [`veramo_readable`]: Veramo refuses a did:peer:2 whose service base64url has `-` or `_`
/// (ASCII JSON gets them only from `>`, `?`, `~`, e.g. a query string in a URI).
pub fn create_peer2(agreement: &[Key], auth: &[Key], services: &[(String, Vec<String>)]) -> Result<String, V2Error> {
    let mut did = String::from("did:peer:2");
    for k in agreement {
        did.push_str(".E");
        did.push_str(&keys::to_multibase(k)?);
    }
    for k in auth {
        did.push_str(".V");
        did.push_str(&keys::to_multibase(k)?);
    }
    for (uri, routing) in services {
        let mut ep = Map::new();
        ep.insert("uri".into(), uri.as_str().into());
        ep.insert("a".into(), json!(["didcomm/v2"]));
        if !routing.is_empty() {
            ep.insert("r".into(), json!(routing));
        }
        let s = json!({ "t": "dm", "s": Value::Object(ep) }).to_string();
        let enc = b64::encode(s.as_bytes());
        did.push_str(".S");
        did.push_str(&enc);
    }
    Ok(did)
}

/// Whether Veramo's did:peer:2 pattern (`[0-9a-zA-Z=]` in every element) accepts `did`.
pub fn veramo_readable(did: &str) -> bool {
    did.strip_prefix("did:peer:2.")
        .map(|b| {
            b.split('.')
                .all(|e| e.chars().all(|c| c.is_ascii_alphanumeric() || c == '='))
        })
        .unwrap_or(false)
}

/// The JSON DID document of a resolved DID (for the admin views and tests).
pub fn to_json(doc: &Doc) -> Value {
    let vm: Vec<Value> = doc
        .methods
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "type": "Multikey", "controller": doc.id,
                "publicKeyMultibase": keys::to_multibase(&m.key).unwrap_or_default(),
            })
        })
        .collect();
    let ids = |l: &[usize]| -> Vec<Value> { l.iter().map(|&i| Value::String(doc.methods[i].id.clone())).collect() };
    let services: Vec<Value> = doc
        .services
        .iter()
        .map(|s| json!({ "id": s.id, "type": "DIDCommMessaging", "serviceEndpoint": { "uri": s.uri, "accept": s.accept, "routingKeys": s.routing_keys } }))
        .collect();
    json!({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": doc.id,
        "alsoKnownAs": doc.also_known_as,
        "verificationMethod": vm,
        "keyAgreement": ids(&doc.key_agreement),
        "authentication": ids(&doc.authentication),
        "service": services,
    })
}
