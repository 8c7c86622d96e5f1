//! crypto_box between one of our keys and a peer's key, with the shared key computed once per
//! pair.
//!
//! Authcrypt boxes the content key from the sender's key to each recipient's key: an X25519
//! multiplication and an HSalsa20 per envelope (and as many to open it), for a pair of keys
//! that is the same for every message of a connection — each delivery to a wallet, its
//! acknowledgement, the status reply. [`BoxKeys`] keeps the derived XSalsa20-Poly1305 key (and
//! the peer's X25519 key, a point decompression) by pair, bounded, so a busy connection pays
//! for them once.
//!
//! The sealed sender of an authcrypt envelope we pack (`crypto_box_seal` of our verkey to the
//! peer: an ephemeral key and an X25519 multiplication) is made once per pair too and reused:
//! it boxes the same constant, only the peer can open it, and it proves nothing (the content
//! key's box does, and that one gets a fresh nonce and content key every time). What reuse
//! shows an observer is that envelopes to this recipient key come from one sender: a pairwise
//! key has only one, us. Anoncrypt's sealed content key is fresh every time; sealed parts we
//! receive are always opened.
//!
//! An agent that asks for it ([`BoxKeys::remembering_senders`]: the client's wallets, not the
//! node) also keeps the sealed senders it opened: a peer that reuses its header, as mailroom
//! does, costs it no X25519 multiplication per envelope. The sealed bytes open to the same key
//! every time, so this only skips recomputing it; the sender is still proven by the content
//! key's box, and a header is remembered only once that box opened. The node does not keep
//! them: wallets seal afresh (Credo, ACA-Py) and would only fill the map.
//!
//! A box is byte for byte libsodium's `crypto_box_easy` (tag, then ciphertext), as askar's
//! `crypto_box` makes it (tests). A pair enters the cache only once it has opened or made a
//! box, and is found only by both public keys: a cached key never serves another pair.

use super::super::b64;
use super::super::keys::{self, KeyError, KeyPair};
use askar_crypto::alg::x25519::X25519KeyPair;
use askar_crypto::encrypt::crypto_box::crypto_box_seal;
use askar_crypto::repr::ToSecretBytes;
use crypto_box::aead::generic_array::GenericArray;
use crypto_box::aead::AeadInPlace;
use crypto_box::SalsaBox;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Pairs a node keeps: one per connection that exchanged authcrypt messages lately. ~0.2 KiB
/// each (3 MiB when full); when full the cache starts over.
pub const DEFAULT_CAPACITY: usize = 16_384;

const TAG_LEN: usize = 16;

/// One of our keys and one peer key: the peer's X25519 key and the box's shared key.
pub struct Pair {
    pub(crate) their_x: X25519KeyPair,
    shared: SalsaBox,
    /// Our verkey sealed to the peer, base64url: made by the first pack, then reused.
    sealed_sender: OnceLock<String>,
}

impl Pair {
    /// The X25519 multiplication and HSalsa20 for `ours` and the peer's Ed25519 key `theirs`.
    pub fn derive(ours: &KeyPair, theirs: &[u8; 32]) -> Result<Pair, KeyError> {
        let their_x = keys::ed_to_x25519_public(theirs)?;
        let their_pk = crypto_box::PublicKey::from(keys::x25519_public_bytes(&their_x));
        let secret = ours
            .x25519()
            .to_secret_bytes()
            .map_err(|_| KeyError::Unsupported("a key pair without its X25519 secret".into()))?;
        let bytes: [u8; 32] = secret
            .as_ref()
            .try_into()
            .map_err(|_| KeyError::BadLength(secret.len()))?;
        let sk = crypto_box::SecretKey::from(bytes);
        Ok(Pair {
            their_x,
            shared: SalsaBox::new(&their_pk, &sk),
            sealed_sender: OnceLock::new(),
        })
    }

    /// The authcrypt `sender` header for envelopes from `ours` (the key this pair was derived
    /// for) to the peer: `crypto_box_seal` of our verkey, base64url, sealed once per pair.
    pub(crate) fn sealed_sender(&self, ours: &KeyPair) -> Result<&str, askar_crypto::Error> {
        if let Some(s) = self.sealed_sender.get() {
            return Ok(s);
        }
        let sealed = crypto_box_seal(&self.their_x, ours.verkey().as_bytes())?;
        Ok(self.sealed_sender.get_or_init(|| b64::encode(sealed.as_ref())))
    }

    /// Boxes `msg` with a 24-byte `nonce`: tag, then ciphertext.
    pub fn seal(&self, msg: &[u8], nonce: &[u8; 24]) -> Vec<u8> {
        let mut out = Vec::with_capacity(TAG_LEN + msg.len());
        out.extend_from_slice(&[0u8; TAG_LEN]);
        out.extend_from_slice(msg);
        // Infallible for XSalsa20-Poly1305 at these sizes (the AEAD refuses only > 2^38 bytes).
        if let Ok(tag) =
            self.shared
                .encrypt_in_place_detached(GenericArray::from_slice(nonce), &[], &mut out[TAG_LEN..])
        {
            out[..TAG_LEN].copy_from_slice(&tag);
        }
        out
    }

    /// Opens a box made by [`Pair::seal`] (or `crypto_box_easy`); `None` if it does not verify.
    pub fn open(&self, boxed: &[u8], nonce: &[u8]) -> Option<Vec<u8>> {
        if boxed.len() < TAG_LEN || nonce.len() != 24 {
            return None;
        }
        let tag = GenericArray::clone_from_slice(&boxed[..TAG_LEN]);
        let mut msg = boxed[TAG_LEN..].to_vec();
        self.shared
            .decrypt_in_place_detached(GenericArray::from_slice(nonce), &[], &mut msg, &tag)
            .ok()?;
        Some(msg)
    }
}

#[cfg(test)]
impl Pair {
    /// This pair with `sealed` as its `sender` header, whatever that seals: how a forger puts
    /// someone else's header into an envelope that is otherwise well formed (tests).
    pub(crate) fn with_sealed_sender(self, sealed: String) -> Pair {
        let _ = self.sealed_sender.set(sealed);
        self
    }
}

/// Pairs by (our Ed25519 public key, theirs), bounded. Shared by the threads of a node.
pub struct BoxKeys {
    pairs: Mutex<HashMap<[u8; 64], Arc<Pair>>>,
    capacity: usize,
    senders: Option<Mutex<SealedSenders>>,
}

/// A sealed sender's bytes -> (our Ed25519 public key it opened with, the sender's).
type SealedSenders = HashMap<Box<[u8]>, ([u8; 32], [u8; 32])>;

impl Default for BoxKeys {
    fn default() -> Self {
        BoxKeys::new(DEFAULT_CAPACITY)
    }
}

impl BoxKeys {
    pub fn new(capacity: usize) -> BoxKeys {
        BoxKeys {
            pairs: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            senders: None,
        }
    }

    /// As [`BoxKeys::new`], and keeps up to `capacity` sealed senders it opened (see the
    /// module's notes): for an agent whose peers reuse theirs.
    pub fn remembering_senders(capacity: usize) -> BoxKeys {
        BoxKeys {
            senders: Some(Mutex::new(HashMap::new())),
            ..BoxKeys::new(capacity)
        }
    }

    /// The sender's key `sealed` opened to for `ours` before, if remembered.
    pub(crate) fn opened_sender(&self, ours: &KeyPair, sealed: &[u8]) -> Option<[u8; 32]> {
        let senders = self.senders.as_ref()?;
        let (with, sender) = *senders.lock().get(sealed)?;
        // Found only for the key it opened with (no other key of ours can open it).
        (with == ours.public_bytes()).then_some(sender)
    }

    /// Remembers what `sealed` opened to for `ours` (when this cache keeps senders), once the
    /// content key's box of its envelope opened.
    pub(crate) fn remember_sender(&self, ours: &KeyPair, sealed: &[u8], sender: [u8; 32]) {
        let Some(senders) = &self.senders else { return };
        let mut senders = senders.lock();
        if senders.len() >= self.capacity {
            senders.clear();
        }
        senders.insert(sealed.into(), (ours.public_bytes(), sender));
    }

    /// Sealed senders remembered now.
    pub fn senders_len(&self) -> usize {
        self.senders.as_ref().map_or(0, |s| s.lock().len())
    }

    fn id(ours: &KeyPair, theirs: &[u8; 32]) -> [u8; 64] {
        let mut id = [0u8; 64];
        id[..32].copy_from_slice(&ours.public_bytes());
        id[32..].copy_from_slice(theirs);
        id
    }

    /// The cached pair, if any.
    pub fn get(&self, ours: &KeyPair, theirs: &[u8; 32]) -> Option<Arc<Pair>> {
        self.pairs.lock().get(&Self::id(ours, theirs)).cloned()
    }

    /// Keeps a pair that made or opened a box.
    pub fn insert(&self, ours: &KeyPair, theirs: &[u8; 32], pair: Arc<Pair>) {
        let mut pairs = self.pairs.lock();
        if pairs.len() >= self.capacity {
            pairs.clear();
        }
        pairs.insert(Self::id(ours, theirs), pair);
    }

    pub fn len(&self) -> usize {
        self.pairs.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pair from `cache` or derived; the flag says whether it still has to be inserted.
pub(crate) fn lookup(
    cache: Option<&BoxKeys>,
    ours: &KeyPair,
    theirs: &[u8; 32],
) -> Result<(Arc<Pair>, bool), KeyError> {
    if let Some(p) = cache.and_then(|c| c.get(ours, theirs)) {
        return Ok((p, false));
    }
    Ok((Arc::new(Pair::derive(ours, theirs)?), cache.is_some()))
}
