//! DIDComm v2 core, beside v1: JWE envelopes (anoncrypt `ECDH-ES+A256KW`, authcrypt
//! `ECDH-1PU+A256KW`), JWS, plaintext, and the DIDs v2 peers use (did:peer:2, did:peer:4,
//! did:key). Pure code: no I/O, no clocks, no store. All cryptography is askar-crypto's.
//!
//! Interop reference: Veramo 7.0.1 and Indicio didcomm-messaging 0.1.1 captures in
//! `tests/fixtures/didcomm/v2/`, and what each needs in `tests/interop/v2/README.md`.

pub mod did;
pub mod json;
pub mod jwe;
pub mod jws;
pub mod keys;

#[cfg(test)]
mod tests;

pub use keys::Key;

/// Media types of the three DIDComm v2 message forms.
pub const TYP_ENCRYPTED: &str = "application/didcomm-encrypted+json";
pub const TYP_SIGNED: &str = "application/didcomm-signed+json";
pub const TYP_PLAIN: &str = "application/didcomm-plain+json";

/// Largest DIDComm v2 envelope read (JWE, JWS or plaintext). The transport's configured limit
/// is usually lower; this one bounds what pure code ever parses.
pub const MAX_ENVELOPE_LEN: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum V2Error {
    #[error("envelope too large ({0} bytes, at most {MAX_ENVELOPE_LEN})")]
    TooLarge(usize),
    #[error("not a DIDComm v2 envelope: {0}")]
    NotV2(String),
    #[error("malformed JWE: {0}")]
    Malformed(String),
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlg(String),
    #[error("alg {alg} cannot be used with enc {enc}")]
    AlgEncMismatch { alg: String, enc: String },
    #[error("too many recipients ({0}, at most {max})", max = jwe::MAX_RECIPIENTS)]
    TooManyRecipients(usize),
    #[error("no recipient kid of this envelope is a key of ours")]
    UnknownKid,
    #[error("sender key {0} is not a key agreement key of the sender's DID")]
    UnknownSender(String),
    #[error("apu does not match skid")]
    ApuMismatch,
    #[error("apv does not match the recipient kids")]
    ApvMismatch,
    #[error("invalid key {0}")]
    BadKey(String),
    #[error("key curves differ: {0}")]
    CurveMismatch(String),
    #[error("could not decrypt the envelope (wrong key or tampered)")]
    Decrypt,
    #[error("signature: {0}")]
    Signature(String),
    #[error("DID: {0}")]
    Did(String),
    #[error("encryption failed: {0}")]
    Crypto(String),
    /// A JWE inside a JWE that is not DIDComm v2's sender-protected authcrypt (an authcrypt
    /// anoncrypted once more), or whose inner layer does not open.
    #[error("nested JWE: {0}")]
    Nested(String),
}

/// What an inbound v2 envelope turned out to be, unwrapped down to the plaintext message.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The plaintext message (JSON bytes).
    pub plaintext: Vec<u8>,
    /// Which of our keys opened the outermost JWE (`None` for a bare JWS or plaintext).
    pub recipient_kid: Option<String>,
    /// The authcrypt sender's key id (`skid`), when the JWE was authcrypted (the inner JWE's,
    /// for a sender-protected authcrypt: never the outer anoncrypt's, which has none).
    pub sender_kid: Option<String>,
    /// The JWS signer's key id, when the message was signed.
    pub signer_kid: Option<String>,
    /// How the JWE was made, so a reply can be packed in the dialect the peer opens (the
    /// inner authcrypt's, for a sender-protected one).
    pub dialect: Option<jwe::Dialect>,
    /// The authcrypt's (else the outermost JWE's) `apv` named its recipients
    /// ([`jwe::Opened::recipients_bound`]): what binds the sender is the layer that names it.
    pub recipients_bound: bool,
    /// Some layer of the JWE was for others too ([`jwe::Opened::for_others`]).
    pub for_others: bool,
}

impl Unpacked {
    /// The DID that authenticated the message (authcrypt sender or signer), if any: the DID
    /// alone, as its key was resolved ([`did::did_of`]). A kid `X?anything` names X's key as
    /// `X#key-1` does; kept whole, one key would speak as any number of DIDs (each its own
    /// connection and replay identity).
    pub fn authenticated_did(&self) -> Option<&str> {
        self.sender_kid
            .as_deref()
            .or(self.signer_kid.as_deref())
            .map(did::did_of)
    }

    /// Whether an authcrypted message proves its sender to this recipient, not only to
    /// someone else who received the same message: ECDH-1PU as DIDComm v2 makes it, with
    /// A256CBC-HS512, the content tag in the key derivation and `apv` naming the recipients.
    /// In any other form (Veramo's: no tag in the derivation, no `apv`, A256GCM or XC20P,
    /// whose tags commit to nothing for one who holds the key) a co-recipient of the sender's
    /// message learns the content key, makes new content under the sender's own header
    /// (a tag that checks, a wrapped key that still opens), renames its own recipient entry
    /// to one of ours, and speaks as the sender. False when there is no authcrypt sender.
    pub fn authcrypt_binds_sender(&self) -> bool {
        self.sender_kid.is_some()
            && self.recipients_bound
            && self
                .dialect
                .is_some_and(|d| d.tag_in_kdf && d.enc == jwe::Enc::A256CbcHs512)
    }
}

/// True if `bytes` look like a DIDComm v2 envelope rather than a v1 one: a general JWE
/// (top-level `recipients`; v1 keeps them inside `protected`), a flattened JWE
/// (`encrypted_key`), a JWS (`payload`), or a plaintext message with `type` and no `@type`.
/// Reads the top-level keys only, allocating nothing, so v1's hot path pays one scan.
pub fn is_v2(bytes: &[u8]) -> bool {
    use serde::de::IgnoredAny;
    #[derive(serde::Deserialize)]
    struct Probe {
        recipients: Option<IgnoredAny>,
        encrypted_key: Option<IgnoredAny>,
        payload: Option<IgnoredAny>,
        #[serde(rename = "type")]
        typ: Option<IgnoredAny>,
        #[serde(rename = "@type")]
        at_type: Option<IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(p) => {
            p.recipients.is_some()
                || p.encrypted_key.is_some()
                || p.payload.is_some()
                || (p.typ.is_some() && p.at_type.is_none())
        }
        Err(_) => false,
    }
}

/// Unpacks any v2 form: JWE (possibly wrapping a JWS, or an authcrypt JWE: the spec's
/// sender-protected authcrypt, see `sender_protected`), JWS, or plaintext. Read without a
/// JSON tree of the envelope or its plaintext ([`json`]): anyone can send one, and a tree of
/// `[0,0,...]` is 16-32 times the bytes it is read from.
///
/// `our_key` looks up our private key by kid; `resolve_key` finds a peer's public key by DID URL
/// (authcrypt `skid` in keyAgreement, JWS `kid` in authentication).
pub fn unpack(
    bytes: &[u8],
    our_key: &dyn Fn(&str) -> Option<keys::Agreement>,
    resolve_key: &dyn Fn(&str, did::Purpose) -> Result<Key, V2Error>,
) -> Result<Unpacked, V2Error> {
    if bytes.len() > MAX_ENVELOPE_LEN {
        return Err(V2Error::TooLarge(bytes.len()));
    }
    match Form::of(bytes)? {
        Form::Jwe => {
            let opened = jwe::unpack(bytes, our_key, &|k| resolve_key(k, did::Purpose::KeyAgreement))?;
            let mut out = if matches!(Form::of(&opened.plaintext), Ok(Form::Jwe)) {
                sender_protected(opened, our_key, resolve_key)?
            } else {
                Unpacked {
                    plaintext: opened.plaintext,
                    recipient_kid: Some(opened.recipient_kid),
                    sender_kid: opened.sender_kid,
                    signer_kid: None,
                    dialect: Some(opened.dialect),
                    recipients_bound: opened.recipients_bound,
                    for_others: opened.for_others,
                }
            };
            // Sign-then-encrypt: the JWE may carry a JWS.
            if matches!(Form::of(&out.plaintext), Ok(Form::Jws)) {
                let (payload, kid) =
                    jws::verify_slice(&out.plaintext, &|k| resolve_key(k, did::Purpose::Authentication))?;
                out.plaintext = payload;
                out.signer_kid = Some(kid);
            }
            Ok(out)
        }
        Form::Jws => {
            let (payload, kid) = jws::verify_slice(bytes, &|k| resolve_key(k, did::Purpose::Authentication))?;
            Ok(Unpacked {
                plaintext: payload,
                recipient_kid: None,
                sender_kid: None,
                signer_kid: Some(kid),
                dialect: None,
                recipients_bound: false,
                for_others: false,
            })
        }
        Form::Plain => Ok(Unpacked {
            plaintext: bytes.to_vec(),
            recipient_kid: None,
            sender_kid: None,
            signer_kid: None,
            dialect: None,
            recipients_bound: false,
            for_others: false,
        }),
    }
}

/// DIDComm v2's sender identity protection: an authcrypt JWE anoncrypted to the same
/// recipient again, so its `skid` is not on the wire. `outer` is the opened anoncrypt; its
/// plaintext is opened once more, as a top-level authcrypt is (for one of our keys, `skid`
/// resolved and checked the same way), and the sender is the inner layer's alone.
///
/// Exactly this shape is read, anything else refused: an outer authcrypt (whose sender would
/// have to agree with the inner one's, for no protection), an inner anoncrypt (a JWE in a JWE
/// that proves no sender: it must not look like one that does), and a third layer (one
/// layer of nesting is all the spec makes; more would only cost decryptions).
fn sender_protected(
    outer: jwe::Opened,
    our_key: &dyn Fn(&str) -> Option<keys::Agreement>,
    resolve_key: &dyn Fn(&str, did::Purpose) -> Result<Key, V2Error>,
) -> Result<Unpacked, V2Error> {
    if outer.dialect.alg != jwe::Alg::EcdhEsA256Kw {
        return Err(V2Error::Nested(format!(
            "the outer layer must be anoncrypt ({}), not {}: a JWE nested in a JWE is read only as a \
             sender-protected authcrypt",
            jwe::ALG_ANON,
            outer.dialect.alg.label()
        )));
    }
    let inner = jwe::unpack(&outer.plaintext, our_key, &|k| {
        resolve_key(k, did::Purpose::KeyAgreement)
    })
    .map_err(|e| V2Error::Nested(format!("inner layer: {e}")))?;
    if inner.dialect.alg != jwe::Alg::Ecdh1PuA256Kw || inner.sender_kid.is_none() {
        return Err(V2Error::Nested(format!(
            "the inner layer must be authcrypt ({}), not {}: a JWE nested in a JWE is read only as a \
             sender-protected authcrypt",
            jwe::ALG_AUTH,
            inner.dialect.alg.label()
        )));
    }
    if matches!(Form::of(&inner.plaintext), Ok(Form::Jwe)) {
        return Err(V2Error::Nested(
            "a third JWE layer: a sender-protected authcrypt is one anoncrypt around one authcrypt".into(),
        ));
    }
    Ok(Unpacked {
        plaintext: inner.plaintext,
        recipient_kid: Some(outer.recipient_kid),
        sender_kid: inner.sender_kid,
        signer_kid: None,
        dialect: Some(inner.dialect),
        recipients_bound: inner.recipients_bound,
        // Either layer's other recipients could send it on.
        for_others: outer.for_others || inner.for_others,
    })
}

/// Which of the three v2 forms a JSON object is: a JWE has `ciphertext`, a JWS `payload`, a
/// plaintext message a string `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Jwe,
    Jws,
    Plain,
}

impl Form {
    /// Reads the top-level members only (every other member is checked to be JSON, not built).
    fn of(bytes: &[u8]) -> Result<Form, V2Error> {
        use serde::de::IgnoredAny;
        #[derive(serde::Deserialize)]
        struct Probe<'a> {
            ciphertext: Option<IgnoredAny>,
            payload: Option<IgnoredAny>,
            #[serde(rename = "type", borrow)]
            typ: Option<&'a serde_json::value::RawValue>,
        }
        let neither = || V2Error::NotV2("neither JWE, JWS nor a plaintext message".into());
        if !json::looks_like_object(bytes) {
            return match serde_json::from_slice::<IgnoredAny>(bytes) {
                Ok(_) => Err(neither()),
                Err(e) => Err(V2Error::NotV2(format!("not JSON: {e}"))),
            };
        }
        let p: Probe = serde_json::from_slice(bytes).map_err(|e| V2Error::NotV2(format!("not JSON: {e}")))?;
        if p.ciphertext.is_some() {
            Ok(Form::Jwe)
        } else if p.payload.is_some() {
            Ok(Form::Jws)
        } else if p.typ.is_some_and(|t| json::str_of(t).is_some()) {
            Ok(Form::Plain)
        } else {
            Err(neither())
        }
    }
}
