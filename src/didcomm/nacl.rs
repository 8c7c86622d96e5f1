//! X25519 and libsodium's boxes on top of it: `crypto_box_seal` / `crypto_box_seal_open`
//! (anoncrypt's content key, authcrypt's sealed sender) and the XSalsa20-Poly1305 key of a
//! `crypto_box` pair (authcrypt's content key, [`super::envelope::BoxKeys`]).
//!
//! The X25519 multiplication is AWS-LC's (through aws-lc-rs): its x86_64 and aarch64 code is
//! s2n-bignum's, written with the `mulx`/`adcx` instructions and formally verified, and took
//! 18-19 us a multiplication here where curve25519-dalek's portable code (askar's) took 42-46.
//! Every forward a node accepts opens one sealed box, so this was ~40 % of a forward's CPU
//! (docs/BENCHMARKS.md, "X25519 from AWS-LC"). The rest (HSalsa20, XSalsa20-Poly1305, the BLAKE2b nonce)
//! is RustCrypto's, as in askar, and the bytes are libsodium's: tests check them against
//! askar's `crypto_box_seal` both ways.
//!
//! A multiplication whose result is all zeros (a peer key of small order) is refused, as
//! libsodium refuses it: such a box proves nothing about who made it.

use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey, X25519};
use blake2::digest::consts::U24;
use blake2::{Blake2b, Digest};
use crypto_secretbox::aead::generic_array::GenericArray;
use crypto_secretbox::aead::AeadInPlace;
use crypto_secretbox::{Kdf, KeyInit, XSalsa20Poly1305};
use zeroize::Zeroizing;

/// Bytes a sealed box adds to its message: the ephemeral public key and the tag.
pub const SEAL_OVERHEAD: usize = 32 + TAG_LEN;
const TAG_LEN: usize = 16;

/// One of our X25519 secrets, parsed once (a key pair keeps it; cloning shares it).
#[derive(Clone)]
pub struct Secret(std::sync::Arc<PrivateKey>);

impl Secret {
    /// From the 32 secret bytes (clamped by the multiplication, as libsodium does).
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Secret> {
        PrivateKey::from_private_key(&X25519, bytes)
            .ok()
            .map(|k| Secret(k.into()))
    }

    /// A fresh secret and its public key.
    pub fn generate() -> Option<(Secret, [u8; 32])> {
        let k = PrivateKey::generate(&X25519).ok()?;
        let public: [u8; 32] = k.compute_public_key().ok()?.as_ref().try_into().ok()?;
        Some((Secret(k.into()), public))
    }

    /// The shared secret with `their_public`; `None` if it is all zeros (small-order key).
    pub fn agree(&self, their_public: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        agreement::agree(&self.0, UnparsedPublicKey::new(&X25519, their_public), (), |k| {
            <[u8; 32]>::try_from(k).map(Zeroizing::new).map_err(|_| ())
        })
        .ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The XSalsa20-Poly1305 key of `crypto_box` for a shared secret (HSalsa20, zero nonce).
pub fn box_key(shared: &[u8; 32]) -> XSalsa20Poly1305 {
    let key = Zeroizing::new(XSalsa20Poly1305::kdf(
        GenericArray::from_slice(shared),
        &GenericArray::default(),
    ));
    XSalsa20Poly1305::new(&key)
}

/// `crypto_box_easy`'s layout: tag, then ciphertext.
pub fn seal_detached(cipher: &XSalsa20Poly1305, nonce: &[u8; 24], msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(TAG_LEN + msg.len());
    out.extend_from_slice(&[0u8; TAG_LEN]);
    out.extend_from_slice(msg);
    // Infallible for XSalsa20-Poly1305 at these sizes (the AEAD refuses only > 2^38 bytes).
    if let Ok(tag) = cipher.encrypt_in_place_detached(GenericArray::from_slice(nonce), &[], &mut out[TAG_LEN..]) {
        out[..TAG_LEN].copy_from_slice(&tag);
    }
    out
}

/// Opens `crypto_box_easy`'s layout; `None` if it does not verify.
pub fn open_detached(cipher: &XSalsa20Poly1305, nonce: &[u8; 24], boxed: &[u8]) -> Option<Vec<u8>> {
    if boxed.len() < TAG_LEN {
        return None;
    }
    let tag = GenericArray::clone_from_slice(&boxed[..TAG_LEN]);
    let mut msg = boxed[TAG_LEN..].to_vec();
    cipher
        .decrypt_in_place_detached(GenericArray::from_slice(nonce), &[], &mut msg, &tag)
        .ok()?;
    Some(msg)
}

/// `crypto_box_seal`: `msg` boxed from a fresh ephemeral key to `their_public`, which alone
/// can open it; the ephemeral public key, then the box.
pub fn seal(their_public: &[u8; 32], msg: &[u8]) -> Option<Vec<u8>> {
    let (eph, eph_public) = Secret::generate()?;
    let shared = eph.agree(their_public)?;
    let boxed = seal_detached(&box_key(&shared), &seal_nonce(&eph_public, their_public), msg);
    let mut out = Vec::with_capacity(32 + boxed.len());
    out.extend_from_slice(&eph_public);
    out.extend_from_slice(&boxed);
    Some(out)
}

/// `crypto_box_seal_open` with our secret and our public key; `None` if it does not open.
pub fn seal_open(ours: &Secret, our_public: &[u8; 32], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if sealed.len() < SEAL_OVERHEAD {
        return None;
    }
    let (eph_public, boxed) = sealed.split_at(32);
    let eph_public: &[u8; 32] = eph_public.try_into().ok()?;
    let shared = ours.agree(eph_public)?;
    open_detached(&box_key(&shared), &seal_nonce(eph_public, our_public), boxed).map(Zeroizing::new)
}

/// The sealed box's nonce: BLAKE2b-192 of the ephemeral public key and the recipient's.
fn seal_nonce(eph_public: &[u8; 32], their_public: &[u8; 32]) -> [u8; 24] {
    let mut h = Blake2b::<U24>::new();
    h.update(eph_public);
    h.update(their_public);
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::keys::KeyPair;
    use askar_crypto::encrypt::crypto_box::{crypto_box_seal, crypto_box_seal_open};

    /// Sealed boxes are libsodium's both ways: askar (the reference Credo and ACA-Py use)
    /// opens ours and we open askar's; a box opens only with its recipient's key.
    #[test]
    fn sealed_boxes_open_with_askar_both_ways() {
        let (bob, eve) = (
            KeyPair::from_secret_bytes(&[2; 32]).unwrap(),
            KeyPair::from_secret_bytes(&[3; 32]).unwrap(),
        );
        let ours = seal(bob.x25519_public(), b"a content key of 32 bytes here!!").unwrap();
        assert_eq!(ours.len(), 32 + SEAL_OVERHEAD);
        let opened = crypto_box_seal_open(&bob.x25519(), &ours).unwrap();
        assert_eq!(opened.as_ref(), b"a content key of 32 bytes here!!");
        assert!(crypto_box_seal_open(&eve.x25519(), &ours).is_err());

        let askar = crypto_box_seal(&bob.x25519(), b"sealed by askar").unwrap();
        let opened = seal_open(bob.x25519_secret(), bob.x25519_public(), &askar).unwrap();
        assert_eq!(opened.as_slice(), b"sealed by askar");
        assert!(seal_open(eve.x25519_secret(), eve.x25519_public(), &askar).is_none());
        // Eve's secret with Bob's public key (the nonce binds the recipient's key) fails too.
        assert!(seal_open(eve.x25519_secret(), bob.x25519_public(), &askar).is_none());
    }

    #[test]
    fn tampered_short_and_empty_sealed_boxes_do_not_open() {
        let bob = KeyPair::from_secret_bytes(&[2; 32]).unwrap();
        let sealed = seal(bob.x25519_public(), b"x").unwrap();
        for i in [0, 31, 32, 47, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                seal_open(bob.x25519_secret(), bob.x25519_public(), &bad).is_none(),
                "byte {i}"
            );
        }
        for n in [0, 1, 32, SEAL_OVERHEAD - 1] {
            assert!(seal_open(bob.x25519_secret(), bob.x25519_public(), &sealed[..n]).is_none());
        }
        // An empty message seals and opens (the box is its overhead only).
        let empty = seal(bob.x25519_public(), b"").unwrap();
        assert_eq!(
            seal_open(bob.x25519_secret(), bob.x25519_public(), &empty)
                .unwrap()
                .len(),
            0
        );
    }

    /// Keys of small order make an all-zero shared secret, a key everyone knows: refused on
    /// both sides, as libsodium refuses them (askar computes the zero key and goes on).
    #[test]
    fn small_order_keys_are_refused() {
        let bob = KeyPair::from_secret_bytes(&[2; 32]).unwrap();
        // 0 and 1, and the first point of order 8 of libsodium's blocklist.
        let mut one = [0u8; 32];
        one[0] = 1;
        let order8: [u8; 32] = hex::decode("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
            .unwrap()
            .try_into()
            .unwrap();
        for small in [[0u8; 32], one, order8] {
            assert!(bob.x25519_secret().agree(&small).is_none());
            assert!(seal(&small, b"x").is_none());
            let mut forged = small.to_vec();
            forged.extend_from_slice(&seal_detached(
                &box_key(&[0; 32]),
                &seal_nonce(&small, bob.x25519_public()),
                b"forged",
            ));
            assert!(seal_open(bob.x25519_secret(), bob.x25519_public(), &forged).is_none());
        }
    }
}
