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
use super::super::nacl;
use crypto_secretbox::XSalsa20Poly1305;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// Pairs a node keeps: one per connection that exchanged authcrypt messages lately. ~0.2 KiB
/// each (3 MiB when full); when full the cache starts over.
pub const DEFAULT_CAPACITY: usize = 16_384;

/// One of our keys and one peer key: the peer's X25519 key and the box's shared key.
pub struct Pair {
    pub(crate) their_x: [u8; 32],
    shared: XSalsa20Poly1305,
    /// Our verkey sealed to the peer, base64url: made by the first pack, then reused.
    sealed_sender: OnceLock<String>,
}

impl Pair {
    /// The X25519 multiplication and HSalsa20 for `ours` and the peer's Ed25519 key `theirs`.
    pub fn derive(ours: &KeyPair, theirs: &[u8; 32]) -> Result<Pair, KeyError> {
        let their_x = keys::x25519_public_bytes(&keys::ed_to_x25519_public(theirs)?);
        let shared = ours.x25519_secret().agree(&their_x).ok_or(KeyError::SmallOrder)?;
        Ok(Pair {
            their_x,
            shared: nacl::box_key(&shared),
            sealed_sender: OnceLock::new(),
        })
    }

    /// The authcrypt `sender` header for envelopes from `ours` (the key this pair was derived
    /// for) to the peer: `crypto_box_seal` of our verkey, base64url, sealed once per pair.
    pub(crate) fn sealed_sender(&self, ours: &KeyPair) -> Result<&str, KeyError> {
        if let Some(s) = self.sealed_sender.get() {
            return Ok(s);
        }
        let sealed = nacl::seal(&self.their_x, ours.verkey_str().as_bytes()).ok_or(KeyError::SmallOrder)?;
        Ok(self.sealed_sender.get_or_init(|| b64::encode(&sealed)))
    }

    /// Boxes `msg` with a 24-byte `nonce`: tag, then ciphertext.
    pub fn seal(&self, msg: &[u8], nonce: &[u8; 24]) -> Vec<u8> {
        nacl::seal_detached(&self.shared, nonce, msg)
    }

    /// Opens a box made by [`Pair::seal`] (or `crypto_box_easy`); `None` if it does not verify.
    pub fn open(&self, boxed: &[u8], nonce: &[u8]) -> Option<Vec<u8>> {
        nacl::open_detached(&self.shared, nonce.try_into().ok()?, boxed)
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
