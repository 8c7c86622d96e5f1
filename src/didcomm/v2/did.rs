//! DIDs as DIDComm v2 peers use them: did:peer:2 (current `#key-N` ids and the legacy ids
//! SICPA's libraries emit: `#` + the multibase key without its `z`), did:peer:4 long form
//! (short form through a known long form), did:key (Ed25519 with its X25519 key agreement
//! key, X25519, P-256, P-384, secp256k1). `DIDCommMessaging` services in both shapes: the v2.1
//! object `{uri, accept, routingKeys}` and the legacy string with `accept`/`routingKeys` beside
//! it. A service `uri` that is itself a DID means "through that DID's service"
//! ([`Service::uri_is_did`]).

use serde_json::{json, Map, Value};

use super::keys::{self, Key};
use super::V2Error;
use crate::didcomm::b64;
use crate::didcomm::did::MAX_DID_LEN;

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

/// Resolves a self-certifying DID (did:peer:2, long-form did:peer:4, did:key).
pub fn resolve(did: &str) -> Result<Doc, V2Error> {
    if did.len() > MAX_DID_LEN {
        return Err(bad("DID too long"));
    }
    let did = did_of(did);
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
    let doc = resolve(kid)?;
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
