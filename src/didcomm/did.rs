//! DID resolution without I/O, for the DID methods DIDComm v1 peers use with a mediator:
//! `did:key`, `did:peer:0/1/2/4`, and legacy (unqualified or `did:sov`) DIDs that come with an
//! inline RFC 0067 DID doc. Also builds the documents we publish: a `did:peer:4` long form
//! (didexchange 1.1) and an RFC 0067 doc (connections 1.0, didexchange 1.0).
//!
//! Everything here reads network input: lengths and counts are capped, nothing panics.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::b64;
use super::keys::{self, KeyError, ED25519_CODEC, X25519_CODEC};

/// Longest DID string we look at at all (legacy and did:peer:1 ids, did:key, kids).
pub const MAX_DID_LEN: usize = 8 * 1024;
/// Longest did:peer:2 / did:peer:4 we resolve. A long-form did:peer:4 is its document in
/// base58, and base58 decoding takes time quadratic in the length (~6M steps at 4 KiB, ~24M at
/// 8 KiB). The longest real peer DIDs in the interop captures: Credo 0.6.3's mediator 901 bytes
/// (did:peer:4, two services), its wallet 705, ACA-Py 1.7's did:peer:4 644-840 and did:peer:2
/// 427, Indicio's v2 did:peer:2 569; ours is ~900 with short URLs and stays under this while
/// `cluster.public_url` is at most [`crate::config::MAX_PUBLIC_URL_LEN`].
pub const MAX_PEER_DID_LEN: usize = 4 * 1024;
/// Most distinct other DIDs the key references of one document may name (each resolved once
/// per [`resolve`]). Real documents name none (Credo's and ACA-Py's routing keys are did:key,
/// read without resolving) or their one mediator.
pub const MAX_EXTERNAL_DIDS: usize = 4;
/// Longest DID a key reference of a document may name (a mediator's DID: Credo's is 901 bytes).
pub const MAX_NESTED_DID_LEN: usize = 4 * 1024;
/// Most bytes of peer DIDs one [`resolve`] decodes, the DID itself and the DIDs its key
/// references name together: with [`MAX_PEER_DID_LEN`] it bounds the base58 work of one
/// document to ~18M steps (before these caps one handshake could ask for ~9G).
pub const MAX_RESOLVE_DID_BYTES: usize = 12 * 1024;
/// Longest did:peer:4 hash: a sha2-256 multihash is 46 base58 characters after the `z`.
const MAX_PEER4_HASH_LEN: usize = 64;
/// Most services and verification methods we read from one document.
pub const MAX_SERVICES: usize = 16;
pub const MAX_VERIFICATION_METHODS: usize = 32;
/// Most keys we take from one service's `recipientKeys` / `routingKeys`.
pub const MAX_KEYS_PER_SERVICE: usize = 8;
/// Endpoints read from one document (the first, by priority), and the longest read: a
/// connection keeps some of them, so a document cannot make its record megabytes.
pub const MAX_ENDPOINTS: usize = 16;
pub const MAX_ENDPOINT_LEN: usize = 2048;

/// Service endpoint that means "no endpoint, queue at my mediator / use return route".
pub const QUEUE_ENDPOINT: &str = "didcomm:transport/queue";

/// Service types whose endpoints carry DIDComm.
const DIDCOMM_SERVICE_TYPES: &[&str] = &["did-communication", "IndyAgent", "DIDCommMessaging", "DIDComm"];

/// Multicodec prefix of JSON (varint 0x0200), used by did:peer:4's encoded document.
const JSON_CODEC: [u8; 2] = [0x80, 0x04];
/// Multihash prefix of sha2-256 with a 32-byte digest.
const SHA256_MULTIHASH: [u8; 2] = [0x12, 0x20];

#[derive(Debug, thiserror::Error)]
pub enum DidError {
    #[error("unsupported DID method: {0}")]
    Unsupported(String),
    #[error("malformed DID or DID doc: {0}")]
    Malformed(String),
    #[error("did:peer:4 hash does not match its document")]
    HashMismatch,
    #[error("short-form did:peer:4 cannot be resolved without its long form")]
    NeedsLongForm,
    #[error("{0} can only be resolved with an attached DID doc")]
    NeedsDoc(String),
    #[error("bad key in DID: {0}")]
    Key(#[from] KeyError),
    #[error("DID too long")]
    TooLong,
}

/// What DIDComm v1 needs from a DID: the keys to encrypt to, the mediators' routing keys and
/// where to send.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedDoc {
    /// The DID as given (for did:peer:4 the long or short form; `doc.id` is the long form and
    /// `doc.alsoKnownAs` the short one).
    pub id: String,
    /// Base58 Ed25519 verkeys to pack for, in service priority order.
    pub recipient_keys: Vec<String>,
    /// Base58 verkeys of the mediators, innermost first, as listed by the services.
    pub routing_keys: Vec<String>,
    /// Transport endpoints in priority order; never [`QUEUE_ENDPOINT`].
    pub endpoints: Vec<String>,
    /// The resolved document (for did:peer:2/4, expanded).
    pub doc: Value,
}

/// Resolve `did`. `attached_doc` is the DID doc that came with the message (connections 1.0
/// `DIDDoc`, didexchange `did_doc~attach`), required for did:peer:1 and legacy DIDs; or, for a
/// short-form did:peer:4, a known long form (as a string, or a doc with it in `id` /
/// `alsoKnownAs`).
///
/// Everything one call decodes is bounded: [`MAX_PEER_DID_LEN`] per peer DID,
/// [`MAX_EXTERNAL_DIDS`] other DIDs named by key references (each resolved once),
/// [`MAX_NESTED_DID_LEN`] each, [`MAX_RESOLVE_DID_BYTES`] in all. A document over a cap is
/// refused ([`DidError::Malformed`] saying which).
pub fn resolve(did: &str, attached_doc: Option<&Value>) -> Result<ResolvedDoc, DidError> {
    resolve_depth(did, attached_doc, 0, &mut Work::default())
}

/// What one [`resolve`] has spent: the peer DID bytes it decoded and the other DIDs its key
/// references named, each resolved once (`None`: it did not resolve).
#[derive(Default)]
struct Work {
    did_bytes: usize,
    externals: Vec<(String, Option<External>)>,
    /// A cap was hit: the resolve fails, whichever nested lookup hit it.
    over: bool,
}

/// What a key reference into another DID needs of that DID's document.
struct External {
    vms: Vec<Vm>,
    first_key: Option<[u8; 32]>,
}

impl Work {
    fn refuse(&mut self, why: String) -> DidError {
        self.over = true;
        DidError::Malformed(why)
    }

    /// Counts a peer DID about to be decoded against the caps.
    fn charge(&mut self, did: &str) -> Result<(), DidError> {
        if did.len() > MAX_PEER_DID_LEN {
            let method: String = did.chars().take(10).collect();
            return Err(self.refuse(format!("{method} of {} bytes (at most {MAX_PEER_DID_LEN})", did.len())));
        }
        self.did_bytes += did.len();
        if self.did_bytes > MAX_RESOLVE_DID_BYTES {
            return Err(self.refuse(format!(
                "DID doc needs more than {MAX_RESOLVE_DID_BYTES} bytes of DIDs decoded"
            )));
        }
        Ok(())
    }
}

fn resolve_depth(did: &str, attached: Option<&Value>, depth: u8, work: &mut Work) -> Result<ResolvedDoc, DidError> {
    if did.len() > MAX_DID_LEN {
        return Err(DidError::TooLong);
    }
    if did.starts_with("did:key:") {
        return resolve_did_key(did, did);
    }
    if let Some(rest) = did.strip_prefix("did:peer:") {
        return match rest.as_bytes().first() {
            Some(b'0') => resolve_did_key(did, &format!("did:key:{}", &rest[1..])),
            Some(b'1') => {
                let doc = attached.ok_or_else(|| DidError::NeedsDoc("did:peer:1".into()))?;
                check_doc_id(did, doc)?;
                interpret(did, doc, &[did], depth, work)
            }
            Some(b'2') => resolve_peer2(did, depth, work),
            Some(b'4') => resolve_peer4(did, attached, depth, work),
            _ => Err(DidError::Unsupported(short(did))),
        };
    }
    if let Some(legacy) = legacy_id(did) {
        let doc = attached.ok_or_else(|| DidError::NeedsDoc(short(did)))?;
        let qualified = format!("did:sov:{legacy}");
        if let Some(id) = doc.get("id").and_then(Value::as_str) {
            if legacy_id(id) != Some(legacy) {
                return Err(DidError::Malformed(format!(
                    "attached doc is for {}, not {}",
                    short(id),
                    short(did)
                )));
            }
        }
        return interpret(did, doc, &[did, legacy, &qualified], depth, work);
    }
    Err(DidError::Unsupported(short(did)))
}

/// The base58 identifier of a legacy DID (`did:sov:X` or bare `X`): 16 bytes in base58.
fn legacy_id(did: &str) -> Option<&str> {
    let id = did.strip_prefix("did:sov:").unwrap_or(did);
    if id.is_empty() || id.len() > 32 || id.contains(':') {
        return None;
    }
    let raw = bs58::decode(id).into_vec().ok()?;
    (raw.len() == 16).then_some(id)
}

fn check_doc_id(did: &str, doc: &Value) -> Result<(), DidError> {
    match doc.get("id").and_then(Value::as_str) {
        Some(id) if id != did => Err(DidError::Malformed(format!(
            "attached doc is for {}, not {}",
            short(id),
            short(did)
        ))),
        _ => Ok(()),
    }
}

fn short(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(80).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn resolve_did_key(did: &str, did_key: &str) -> Result<ResolvedDoc, DidError> {
    let pk = keys::parse_verkey(did_key)?;
    let mb = keys::encode_multikey(&pk, ED25519_CODEC);
    let vm_id = format!("{did}#{mb}");
    let mut vms = vec![json!({
        "id": vm_id, "type": "Ed25519VerificationKey2018", "controller": did,
        "publicKeyBase58": keys::verkey_to_base58(&pk),
    })];
    let mut ka = vec![];
    if let Ok(x) = keys::ed_to_x25519_public(&pk) {
        let xmb = keys::encode_multikey(&keys::x25519_public_bytes(&x), X25519_CODEC);
        let xid = format!("{did}#{xmb}");
        vms.push(json!({
            "id": xid, "type": "X25519KeyAgreementKey2019", "controller": did,
            "publicKeyBase58": bs58::encode(keys::x25519_public_bytes(&x)).into_string(),
        }));
        ka.push(Value::String(xid));
    }
    let doc = json!({
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "verificationMethod": vms,
        "authentication": [vm_id],
        "assertionMethod": [vm_id],
        "keyAgreement": ka,
    });
    Ok(ResolvedDoc {
        id: did.to_owned(),
        recipient_keys: vec![keys::verkey_to_base58(&pk)],
        routing_keys: vec![],
        endpoints: vec![],
        doc,
    })
}

// ---------------------------------------------------------------------------------------------
// did:peer:2

fn resolve_peer2(did: &str, depth: u8, work: &mut Work) -> Result<ResolvedDoc, DidError> {
    work.charge(did)?;
    let body = did
        .strip_prefix("did:peer:2")
        .ok_or_else(|| DidError::Malformed("not did:peer:2".into()))?;
    let body = body
        .strip_prefix('.')
        .ok_or_else(|| DidError::Malformed("did:peer:2 without elements".into()))?;
    let mut vms = Vec::new();
    let mut by_purpose: Map<String, Value> = Map::new();
    let mut services = Vec::new();
    let mut key_index = 0usize;
    for element in body.split('.') {
        let mut chars = element.chars();
        let purpose = chars
            .next()
            .ok_or_else(|| DidError::Malformed("empty element".into()))?;
        let value = chars.as_str();
        let rel = match purpose {
            'A' => Some("assertionMethod"),
            'E' => Some("keyAgreement"),
            'V' => Some("authentication"),
            'I' => Some("capabilityInvocation"),
            'D' => Some("capabilityDelegation"),
            'S' => None,
            _ => return Err(DidError::Malformed(format!("unknown did:peer:2 purpose {purpose}"))),
        };
        match rel {
            Some(rel) => {
                if vms.len() >= MAX_VERIFICATION_METHODS {
                    return Err(DidError::Malformed("too many keys".into()));
                }
                key_index += 1;
                let vm_id = format!("#key-{key_index}");
                let ty = if keys::decode_multikey(value, ED25519_CODEC).is_ok() {
                    "Ed25519VerificationKey2020"
                } else if keys::decode_multikey(value, X25519_CODEC).is_ok() {
                    "X25519KeyAgreementKey2020"
                } else {
                    "Multikey"
                };
                vms.push(json!({
                    "id": vm_id, "type": ty, "controller": did, "publicKeyMultibase": value,
                }));
                let entry = by_purpose.entry(rel.to_owned()).or_insert_with(|| Value::Array(vec![]));
                if let Value::Array(a) = entry {
                    a.push(Value::String(vm_id.clone()));
                }
            }
            None => {
                let raw = b64::decode(value).ok_or_else(|| DidError::Malformed("service is not base64".into()))?;
                let parsed: Value =
                    serde_json::from_slice(&raw).map_err(|_| DidError::Malformed("service is not JSON".into()))?;
                let list = match parsed {
                    Value::Array(a) => a,
                    other => vec![other],
                };
                for s in list {
                    if services.len() >= MAX_SERVICES {
                        return Err(DidError::Malformed("too many services".into()));
                    }
                    let mut s = expand_abbreviations(s);
                    if let Value::Object(obj) = &mut s {
                        if !obj.contains_key("id") {
                            let id = match services.len() {
                                0 => "#service".to_owned(),
                                n => format!("#service-{n}"),
                            };
                            obj.insert("id".into(), id.into());
                        }
                    }
                    services.push(s);
                }
            }
        }
    }
    let mut doc = Map::new();
    doc.insert("@context".into(), json!(["https://www.w3.org/ns/did/v1"]));
    doc.insert("id".into(), did.into());
    doc.insert("verificationMethod".into(), Value::Array(vms));
    doc.extend(by_purpose);
    doc.insert("service".into(), Value::Array(services));
    let doc = Value::Object(doc);
    interpret(did, &doc, &[did], depth, work)
}

/// did:peer:2 service abbreviations (peer DID spec "Service abbreviation").
pub(crate) fn expand_abbreviations(v: Value) -> Value {
    match v {
        Value::Object(obj) => Value::Object(
            obj.into_iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        "t" => "type".to_owned(),
                        "s" => "serviceEndpoint".to_owned(),
                        "r" => "routingKeys".to_owned(),
                        "a" => "accept".to_owned(),
                        _ => k,
                    };
                    let v = match (key.as_str(), v) {
                        ("type", Value::String(s)) if s == "dm" => "DIDCommMessaging".into(),
                        (_, v @ Value::Object(_)) => expand_abbreviations(v),
                        (_, v) => v,
                    };
                    (key, v)
                })
                .collect(),
        ),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// did:peer:4

struct Peer4<'a> {
    hash: &'a str,
    encoded: &'a str,
}

fn split_peer4(long: &str) -> Result<Peer4<'_>, DidError> {
    let body = long
        .strip_prefix("did:peer:4")
        .ok_or_else(|| DidError::Malformed("not did:peer:4".into()))?;
    let (hash, encoded) = body.split_once(':').ok_or(DidError::NeedsLongForm)?;
    Ok(Peer4 { hash, encoded })
}

fn check_peer4_hash(p: &Peer4<'_>) -> Result<(), DidError> {
    if p.hash.len() > MAX_PEER4_HASH_LEN {
        return Err(DidError::Malformed(
            "did:peer:4 hash is not a sha2-256 multihash".into(),
        ));
    }
    let mh = p
        .hash
        .strip_prefix('z')
        .and_then(|h| bs58::decode(h).into_vec().ok())
        .ok_or_else(|| DidError::Malformed("did:peer:4 hash is not base58btc multibase".into()))?;
    let digest = mh
        .strip_prefix(&SHA256_MULTIHASH[..])
        .ok_or_else(|| DidError::Malformed("did:peer:4 hash is not a sha2-256 multihash".into()))?;
    if digest != Sha256::digest(p.encoded.as_bytes()).as_slice() {
        return Err(DidError::HashMismatch);
    }
    Ok(())
}

/// The short form (`did:peer:4<hash>`) of a long-form did:peer:4, after checking its hash.
pub fn peer4_short_form(long: &str) -> Result<String, DidError> {
    if long.len() > MAX_DID_LEN {
        return Err(DidError::TooLong);
    }
    let p = split_peer4(long)?;
    check_peer4_hash(&p)?;
    Ok(format!("did:peer:4{}", p.hash))
}

fn resolve_peer4(did: &str, attached: Option<&Value>, depth: u8, work: &mut Work) -> Result<ResolvedDoc, DidError> {
    let body = did.strip_prefix("did:peer:4").unwrap_or(did);
    if body.contains(':') {
        return resolve_peer4_long(did, depth, work);
    }
    // Short form: only through a known long form that hashes to it.
    let long = attached
        .and_then(|a| find_long_form(did, a))
        .ok_or(DidError::NeedsLongForm)?;
    let mut r = resolve_peer4_long(&long, depth, work)?;
    r.id = did.to_owned();
    Ok(r)
}

fn find_long_form(short_did: &str, attached: &Value) -> Option<String> {
    let mut candidates: Vec<&str> = Vec::new();
    match attached {
        Value::String(s) => candidates.push(s),
        Value::Object(o) => {
            if let Some(id) = o.get("id").and_then(Value::as_str) {
                candidates.push(id);
            }
            if let Some(Value::Array(a)) = o.get("alsoKnownAs") {
                candidates.extend(a.iter().take(MAX_SERVICES).filter_map(Value::as_str));
            }
        }
        _ => {}
    }
    candidates
        .into_iter()
        .find(|c| peer4_short_form(c).ok().as_deref() == Some(short_did))
        .map(str::to_owned)
}

fn resolve_peer4_long(did: &str, depth: u8, work: &mut Work) -> Result<ResolvedDoc, DidError> {
    work.charge(did)?;
    let p = split_peer4(did)?;
    check_peer4_hash(&p)?;
    let raw = p
        .encoded
        .strip_prefix('z')
        .and_then(|e| bs58::decode(e).into_vec().ok())
        .ok_or_else(|| DidError::Malformed("did:peer:4 document is not base58btc".into()))?;
    let json_bytes = raw
        .strip_prefix(&JSON_CODEC[..])
        .ok_or_else(|| DidError::Malformed("did:peer:4 document is not multicodec JSON".into()))?;
    let mut doc: Value = serde_json::from_slice(json_bytes)
        .map_err(|_| DidError::Malformed("did:peer:4 document is not JSON".into()))?;
    let short_form = format!("did:peer:4{}", p.hash);
    let Value::Object(obj) = &mut doc else {
        return Err(DidError::Malformed("did:peer:4 document is not an object".into()));
    };
    // Contextualize (peer DID spec, method 4): the input doc has no id.
    obj.insert("id".into(), did.into());
    obj.insert("alsoKnownAs".into(), json!([short_form]));
    interpret(did, &doc, &[did, &short_form], depth, work)
}

/// Build a long-form did:peer:4 for one Ed25519 key, in the shape Credo 0.6.3 writes its own
/// (Ed25519VerificationKey2018 in `authentication`, its X25519 form in `keyAgreement`,
/// one `did-communication` service per endpoint with `recipientKeys: ["#key-1"]` and did:key
/// routing keys). Credo resolves its own shape; ACA-Py 1.7 resolves did:peer:4 with the
/// `did-peer-4` library and reads `did-communication` services and
/// Ed25519VerificationKey2018 keys, so both accept it.
///
/// An invalid `verkey_b58` yields a DID whose keys nobody can use; check it with
/// [`keys::parse_verkey`] first if it is not your own.
pub fn create_peer4(verkey_b58: &str, endpoints: &[String], routing_keys: &[String]) -> String {
    let routing: Vec<Value> = routing_keys
        .iter()
        .map(|rk| match keys::parse_verkey(rk) {
            Ok(pk) => {
                let dk = keys::verkey_to_did_key(&pk);
                let frag = dk.trim_start_matches("did:key:").to_owned();
                Value::String(format!("{dk}#{frag}"))
            }
            Err(_) => Value::String(rk.clone()),
        })
        .collect();
    let services: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            json!({
                "id": format!("#inline-{i}"),
                "serviceEndpoint": ep,
                "type": "did-communication",
                "priority": i,
                "recipientKeys": ["#key-1"],
                "routingKeys": routing,
            })
        })
        .collect();
    let mut doc = json!({
        "@context": ["https://www.w3.org/ns/did/v1"],
        "service": services,
        "authentication": [{
            "id": "#key-1",
            "type": "Ed25519VerificationKey2018",
            "publicKeyBase58": verkey_b58,
        }],
    });
    if let Ok(x) = keys::parse_verkey(verkey_b58).and_then(|pk| keys::ed_to_x25519_public(&pk)) {
        doc["keyAgreement"] = json!([{
            "id": "#key-2",
            "type": "X25519KeyAgreementKey2019",
            "publicKeyBase58": bs58::encode(keys::x25519_public_bytes(&x)).into_string(),
        }]);
    }
    let json_bytes = serde_json::to_vec(&doc).unwrap_or_default();
    let mut raw = Vec::with_capacity(json_bytes.len() + 2);
    raw.extend_from_slice(&JSON_CODEC);
    raw.extend_from_slice(&json_bytes);
    let encoded = format!("z{}", bs58::encode(raw).into_string());
    let mut mh = SHA256_MULTIHASH.to_vec();
    mh.extend_from_slice(&Sha256::digest(encoded.as_bytes()));
    format!("did:peer:4z{}:{encoded}", bs58::encode(mh).into_string())
}

// ---------------------------------------------------------------------------------------------
// Legacy RFC 0067 documents

/// An RFC 0067 DID doc as Credo and ACA-Py write it for connections 1.0 and the didexchange
/// 1.0 `did_doc~attach`: one Ed25519 key `did#1`, one `IndyAgent` service per endpoint with
/// base58 recipient and routing keys. `did` is the unqualified or `did:sov` DID.
pub fn legacy_diddoc(did: &str, verkey_b58: &str, endpoints: &[String], routing_keys: &[String]) -> Value {
    let key_id = format!("{did}#1");
    let routing: Vec<String> = routing_keys
        .iter()
        .map(|rk| keys::normalize_verkey(rk).unwrap_or_else(|_| rk.clone()))
        .collect();
    let services: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, ep)| {
            json!({
                "id": if i == 0 { format!("{did};indy") } else { format!("{did};indy-{i}") },
                "type": "IndyAgent",
                "priority": i,
                "recipientKeys": [verkey_b58],
                "routingKeys": routing,
                "serviceEndpoint": ep,
            })
        })
        .collect();
    json!({
        "@context": "https://w3id.org/did/v1",
        "id": did,
        "publicKey": [{
            "id": key_id,
            "type": "Ed25519VerificationKey2018",
            "controller": did,
            "publicKeyBase58": verkey_b58,
        }],
        "authentication": [{
            "type": "Ed25519SignatureAuthentication2018",
            "publicKey": key_id,
        }],
        "service": services,
    })
}

/// The unqualified legacy DID of a verkey: base58 of its first 16 bytes (Indy convention).
pub fn legacy_did_from_verkey(pk: &[u8; 32]) -> String {
    bs58::encode(&pk[..16]).into_string()
}

// ---------------------------------------------------------------------------------------------
// Interpreting a DID document

struct Vm {
    id: String,
    /// Ed25519 key, if the method is one.
    key: Option<[u8; 32]>,
    /// X25519 key, if the method is one: Credo dereferences `recipientKeys` that point at a
    /// keyAgreement key to the Ed25519 key that converts to it, and so do we.
    x25519: Option<[u8; 32]>,
}

/// Read keys, services and endpoints out of a DID doc. `aliases` are the DIDs that relative
/// and absolute key references of this doc may start with.
fn interpret(did: &str, doc: &Value, aliases: &[&str], depth: u8, work: &mut Work) -> Result<ResolvedDoc, DidError> {
    let obj = doc
        .as_object()
        .ok_or_else(|| DidError::Malformed("DID doc is not an object".into()))?;
    let mut vms: Vec<Vm> = Vec::new();
    let mut auth_keys: Vec<[u8; 32]> = Vec::new();
    for field in [
        "verificationMethod",
        "publicKey",
        "authentication",
        "keyAgreement",
        "assertionMethod",
    ] {
        let Some(Value::Array(items)) = obj.get(field) else {
            continue;
        };
        for item in items.iter().take(MAX_VERIFICATION_METHODS) {
            if let Value::Object(o) = item {
                let key = vm_key(o);
                if let Some(id) = o.get("id").and_then(Value::as_str) {
                    if vms.len() < MAX_VERIFICATION_METHODS {
                        vms.push(Vm {
                            id: id.to_owned(),
                            key,
                            x25519: vm_x25519(o),
                        });
                    }
                }
                if field == "authentication" {
                    // RFC 0067 authentication entries reference a publicKey.
                    let k = match (key, o.get("publicKey").and_then(Value::as_str)) {
                        (Some(k), _) => Some(k),
                        (None, Some(r)) => deref_key(r, &vms, aliases, depth, work)?,
                        (None, None) => None,
                    };
                    auth_keys.extend(k);
                }
            } else if let (Value::String(r), "authentication") = (item, field) {
                auth_keys.extend(deref_key(r, &vms, aliases, depth, work)?);
            }
        }
    }
    // References in authentication may point at methods listed after it.
    if auth_keys.is_empty() {
        if let Some(Value::Array(items)) = obj.get("authentication") {
            for r in items.iter().take(MAX_VERIFICATION_METHODS).filter_map(Value::as_str) {
                auth_keys.extend(deref_key(r, &vms, aliases, depth, work)?);
            }
        }
    }

    let mut services: Vec<&Map<String, Value>> = match obj.get("service") {
        Some(Value::Array(a)) => a.iter().take(MAX_SERVICES).filter_map(Value::as_object).collect(),
        Some(Value::Object(o)) => vec![o],
        _ => vec![],
    };
    services.retain(|s| {
        s.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| DIDCOMM_SERVICE_TYPES.contains(&t))
    });
    services.sort_by_key(|s| s.get("priority").and_then(Value::as_i64).unwrap_or(0));

    let mut recipient_keys = Vec::new();
    let mut routing_keys = Vec::new();
    let mut endpoints = Vec::new();
    for s in &services {
        for r in key_list(s.get("recipientKeys")) {
            let pk = deref_key(r, &vms, aliases, depth, work)?
                .ok_or_else(|| DidError::Malformed(format!("recipient key {} not found", short(r))))?;
            push_unique(&mut recipient_keys, keys::verkey_to_base58(&pk));
        }
        let ep = s.get("serviceEndpoint");
        let nested_routing = ep.and_then(|e| e.get("routingKeys"));
        for r in key_list(s.get("routingKeys")).chain(key_list(nested_routing)) {
            let pk = deref_key(r, &vms, aliases, depth, work)?
                .ok_or_else(|| DidError::Malformed(format!("routing key {} not found", short(r))))?;
            push_unique(&mut routing_keys, keys::verkey_to_base58(&pk));
        }
        for uri in endpoint_uris(ep) {
            if uri != QUEUE_ENDPOINT
                && !uri.is_empty()
                && uri.len() <= MAX_ENDPOINT_LEN
                && endpoints.len() < MAX_ENDPOINTS
            {
                push_unique(&mut endpoints, uri.to_owned());
            }
        }
    }
    if recipient_keys.is_empty() {
        // DIDCommMessaging services have no recipientKeys: use the authentication keys, else
        // any Ed25519 key of the doc.
        for pk in auth_keys.iter().chain(vms.iter().filter_map(|v| v.key.as_ref())) {
            push_unique(&mut recipient_keys, keys::verkey_to_base58(pk));
        }
    }
    Ok(ResolvedDoc {
        id: did.to_owned(),
        recipient_keys,
        routing_keys,
        endpoints,
        doc: doc.clone(),
    })
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

fn key_list(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flat_map(|a| a.iter().take(MAX_KEYS_PER_SERVICE).filter_map(Value::as_str))
}

fn endpoint_uris(ep: Option<&Value>) -> Vec<&str> {
    match ep {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Object(o)) => o.get("uri").and_then(Value::as_str).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .take(MAX_SERVICES)
            .filter_map(|e| match e {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("uri").and_then(Value::as_str),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// The Ed25519 key of a verification method object, if it has one.
fn vm_key(o: &Map<String, Value>) -> Option<[u8; 32]> {
    let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
    if ty.contains("X25519") {
        return None;
    }
    if let Some(b58) = o.get("publicKeyBase58").and_then(Value::as_str) {
        return keys::parse_verkey(b58).ok();
    }
    if let Some(mb) = o.get("publicKeyMultibase").and_then(Value::as_str) {
        return keys::decode_multikey(mb, ED25519_CODEC)
            .ok()
            .or_else(|| keys::parse_verkey(mb.strip_prefix('z')?).ok())
            .filter(|pk| keys::parse_verkey(&keys::verkey_to_base58(pk)).is_ok());
    }
    if let Some(jwk) = o.get("publicKeyJwk").and_then(Value::as_object) {
        if jwk.get("crv").and_then(Value::as_str) == Some("Ed25519") {
            let x = b64::decode(jwk.get("x")?.as_str()?)?;
            let pk: [u8; 32] = x.try_into().ok()?;
            return keys::parse_verkey(&keys::verkey_to_base58(&pk)).ok();
        }
    }
    None
}

/// Resolve a key reference from a doc: `did:key:...`, a base58 verkey (RFC 0067
/// `recipientKeys`), `#frag`, `<alias>#frag`, or a reference into another DID we can resolve
/// without I/O (did:peer:2, did:peer:4 long form). `Ok(None)`: the reference names no key we
/// can read; `Err`: the document is over a cap of [`resolve`].
///
/// Another DID is resolved once per [`resolve`] however many references name it (a document
/// may list the same mediator DID in every service), and at most [`MAX_EXTERNAL_DIDS`] of them.
fn deref_key(r: &str, vms: &[Vm], aliases: &[&str], depth: u8, work: &mut Work) -> Result<Option<[u8; 32]>, DidError> {
    if r.starts_with("did:key:") {
        return Ok(keys::parse_verkey(r).ok());
    }
    let (did_part, frag) = match r.split_once('#') {
        Some((d, f)) => (d, Some(f)),
        None => (r, None),
    };
    let Some(frag) = frag else {
        // No fragment: a bare verkey, or a method id written without '#'.
        return Ok(keys::parse_verkey(r).ok().or_else(|| find_vm(vms, r, r, aliases)));
    };
    if did_part.is_empty() || aliases.contains(&did_part) {
        return Ok(find_vm(vms, r, frag, aliases).or_else(|| {
            // Old peer DIDs name keys by their multibase value, with or without the 'z'.
            keys::parse_verkey(frag)
                .ok()
                .or_else(|| keys::parse_verkey(&format!("z{frag}")).ok())
        }));
    }
    if depth > 0 {
        return Ok(None);
    }
    let known = work.externals.iter().position(|(d, _)| d == did_part);
    let i = match known {
        Some(i) => i,
        None => {
            if did_part.len() > MAX_NESTED_DID_LEN {
                return Err(work.refuse(format!(
                    "key reference {} names a DID of {} bytes (at most {MAX_NESTED_DID_LEN})",
                    short(r),
                    did_part.len()
                )));
            }
            if work.externals.len() >= MAX_EXTERNAL_DIDS {
                return Err(work.refuse(format!(
                    "key references name more than {MAX_EXTERNAL_DIDS} other DIDs (too many external DID references)"
                )));
            }
            let resolved = match resolve_depth(did_part, None, depth + 1, work) {
                Ok(other) => Some(External {
                    vms: doc_vms(&other.doc),
                    first_key: other.recipient_keys.first().and_then(|k| keys::parse_verkey(k).ok()),
                }),
                Err(e) if work.over => return Err(e),
                Err(_) => None,
            };
            work.externals.push((did_part.to_owned(), resolved));
            work.externals.len() - 1
        }
    };
    Ok(work.externals[i]
        .1
        .as_ref()
        .and_then(|o| find_vm(&o.vms, r, frag, &[did_part]).or(o.first_key)))
}

fn doc_vms(doc: &Value) -> Vec<Vm> {
    ["verificationMethod", "authentication", "publicKey"]
        .iter()
        .filter_map(|f| doc.get(f).and_then(Value::as_array))
        .flat_map(|a| a.iter().take(MAX_VERIFICATION_METHODS))
        .filter_map(Value::as_object)
        .filter_map(|o| {
            Some(Vm {
                id: o.get("id")?.as_str()?.to_owned(),
                key: vm_key(o),
                x25519: vm_x25519(o),
            })
        })
        .collect()
}

fn find_vm(vms: &[Vm], full: &str, frag: &str, aliases: &[&str]) -> Option<[u8; 32]> {
    vms.iter()
        .find(|vm| {
            if vm.id == full {
                return true;
            }
            match vm.id.split_once('#') {
                Some((d, f)) => f == frag && (d.is_empty() || aliases.contains(&d)),
                None => vm.id == frag,
            }
        })
        .and_then(|vm| {
            vm.key.or_else(|| {
                let x = vm.x25519?;
                vms.iter().filter_map(|v| v.key).find(|ed| {
                    keys::ed_to_x25519_public(ed)
                        .map(|xk| keys::x25519_public_bytes(&xk) == x)
                        .unwrap_or(false)
                })
            })
        })
}

/// The X25519 key of a verification method object, if it has one.
fn vm_x25519(o: &Map<String, Value>) -> Option<[u8; 32]> {
    let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
    if let Some(mb) = o.get("publicKeyMultibase").and_then(Value::as_str) {
        return keys::decode_multikey(mb, X25519_CODEC).ok();
    }
    if let Some(jwk) = o.get("publicKeyJwk").and_then(Value::as_object) {
        if jwk.get("crv").and_then(Value::as_str) == Some("X25519") {
            return b64::decode(jwk.get("x")?.as_str()?)?.try_into().ok();
        }
        return None;
    }
    if ty.contains("X25519") {
        let b58 = o.get("publicKeyBase58")?.as_str()?;
        if b58.len() > 64 {
            return None;
        }
        let b = bs58::decode(b58).into_vec().ok()?;
        return b.try_into().ok();
    }
    None
}

#[cfg(test)]
mod tests;
