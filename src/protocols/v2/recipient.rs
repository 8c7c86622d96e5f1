//! Recipient DIDs as this mediator stores and routes them: one form per DID, so that a DID
//! one connection registered cannot be claimed by another in a form of its own.
//!
//! A did:peer:4 has a long form (`did:peer:4<hash>:<encoded doc>`) and a short form (its
//! prefix `did:peer:4<hash>`, which anyone can compute): both are stored and routed as the
//! short form, a long form only once its hash matches its document. A did:peer:3 (the hash of
//! a did:peer:2) is not taken as a recipient ([`Recipient::unlinkable`]): nothing here resolves
//! one, and nothing can tell from it which did:peer:2 it names. A did:peer:2 stays the form it
//! is stored in: stored as its did:peer:3, it would be listed to its wallet (Veramo) as a DID
//! the wallet never made, and the did:peer:2 keys stored before could not be found from it.
//! Other DIDs are their own form (did:key's equivalent forms are looked up by
//! [`super::routing`], not rewritten).
//!
//! Keys stored before this rule are as registered: a long form may be stored as it is. Named,
//! it is looked up as named before the short form ([`Recipient::legacy`]); from its short
//! form, it is found by prefix (`<short>:...`, [`Recipient::peer4_short`]) once its hash is
//! checked ([`is_long_form_of`]): the short form is then its holder's, as if it was stored
//! now, and its own wallet registering the DID again claims the short form too.

use crate::didcomm::did::{peer4_short_form, MAX_DID_LEN};
use crate::didcomm::v2::did;
use crate::protocols::HandleError;

/// A recipient DID as a wallet or a sender named it and as it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The DID as named: a DID URL's fragment or query dropped.
    pub named: String,
    /// The form stored and routed ([`canonical`] of `named`).
    pub canonical: String,
}

impl Recipient {
    /// A recipient DID (or DID URL) of a keylist update, a pickup filter or a rotation. Refused:
    /// what is not a DID, one holding a control character, and a did:peer:4 long form whose
    /// hash does not match its document.
    pub fn parse(s: &str) -> Result<Recipient, HandleError> {
        refuse_control_characters(s.trim())?;
        let named = did::did_of(s.trim());
        if !named.starts_with("did:") || named.len() > MAX_DID_LEN {
            return Err(HandleError::BadMessage(format!(
                "recipient {:?} is not a DID",
                s.chars().take(80).collect::<String>()
            )));
        }
        Recipient::of(named)
    }

    /// [`Recipient::parse`] of a DID without the check that it is one (a forward's `next`:
    /// whatever is not registered finds no route). A control character is refused all the same.
    pub fn of(named: &str) -> Result<Recipient, HandleError> {
        refuse_control_characters(named)?;
        Ok(Recipient {
            canonical: canonical(named)?,
            named: named.to_string(),
        })
    }

    /// The form an earlier version stored this DID in, when it is not the canonical one (a
    /// did:peer:4 long form): such a key routes as before, and is removed with the DID.
    pub fn legacy(&self) -> Option<&str> {
        (self.named != self.canonical).then_some(self.named.as_str())
    }

    /// Every form of this DID a connection may hold: the canonical one, then the legacy one.
    pub fn stored_forms(&self) -> Vec<String> {
        let mut forms = vec![self.canonical.clone()];
        forms.extend(self.legacy().map(str::to_string));
        forms
    }

    /// The did:peer:4 short form this DID is stored under, if it is a did:peer:4 (named in
    /// either form): a long form an earlier version stored starts with it and `:`.
    pub fn peer4_short(&self) -> Option<&str> {
        let c = self.canonical.as_str();
        (c.starts_with("did:peer:4") && !is_peer4_long_form(c)).then_some(c)
    }

    /// A DID that is another DID's hash, which this mediator cannot link to it: a did:peer:3.
    /// Taken as a recipient, it would let a connection claim the did:peer:2 of another.
    pub fn unlinkable(&self) -> bool {
        self.canonical.starts_with("did:peer:3")
    }
}

/// Refuses a DID (or DID URL) holding a control character, a NUL among them: no DID holds one,
/// and the store refuses a key with a NUL (`StoreError::Invalid`), which would fail the whole
/// keylist update (503) instead of answering this entry `client_error` (a forward: 400).
pub fn refuse_control_characters(s: &str) -> Result<(), HandleError> {
    match s.chars().find(|c| c.is_control()) {
        None => Ok(()),
        Some(c) => Err(HandleError::BadMessage(format!(
            "recipient {:?} holds a control character ({c:?})",
            s.chars().take(80).collect::<String>()
        ))),
    }
}

/// The form `did` is stored and routed under: a did:peer:4 long form's short form (its hash
/// checked against its document), any other DID as it is.
pub fn canonical(did: &str) -> Result<String, HandleError> {
    if !is_peer4_long_form(did) {
        return Ok(did.to_string());
    }
    peer4_short_form(did).map_err(|e| {
        HandleError::BadMessage(format!(
            "recipient {}...: {e}",
            did.chars().take(60).collect::<String>()
        ))
    })
}

/// Whether the stored routing key `key` (a DID URL's fragment dropped) is a long form of the
/// did:peer:4 short form `short`, its hash matching its document. Earlier versions stored any
/// string as given: a key that starts with `<short>:` proves nothing by itself.
pub fn is_long_form_of(key: &str, short: &str) -> bool {
    let d = did::did_of(key);
    is_peer4_long_form(d) && peer4_short_form(d).is_ok_and(|s| s == short)
}

/// `did:peer:4<hash>:<encoded doc>`, not the short form `did:peer:4<hash>`.
fn is_peer4_long_form(did: &str) -> bool {
    did.strip_prefix("did:peer:4").is_some_and(|rest| rest.contains(':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::keys::KeyPair;

    fn long_form() -> String {
        crate::didcomm::did::create_peer4(&KeyPair::generate().verkey(), &["https://w.example".into()], &[])
    }

    #[test]
    fn a_peer4_long_form_is_stored_as_its_short_form() {
        let long = long_form();
        let short = peer4_short_form(&long).unwrap();
        assert!(long.starts_with(&format!("{short}:")));
        let r = Recipient::parse(&format!("{long}#key-1")).unwrap();
        assert_eq!(r.named, long);
        assert_eq!(r.canonical, short);
        assert_eq!(r.legacy(), Some(long.as_str()));
        assert_eq!(r.stored_forms(), [short.clone(), long.clone()]);
    }

    #[test]
    fn a_peer4_short_form_and_other_dids_are_their_own_form() {
        let short = peer4_short_form(&long_form()).unwrap();
        for d in [
            short.as_str(),
            "did:peer:2.Ez6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc",
            "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
            "did:example:a:b",
        ] {
            let r = Recipient::parse(&format!("{d}#key-1")).unwrap();
            assert_eq!((r.named.as_str(), r.canonical.as_str()), (d, d));
            assert_eq!(r.legacy(), None);
            assert_eq!(r.stored_forms(), [d]);
        }
    }

    #[test]
    fn a_peer4_long_form_whose_hash_does_not_match_is_refused() {
        let long = long_form();
        let (short, doc) = long.rsplit_once(':').unwrap();
        // The document of one DID under the hash of another: its short form is that other's.
        let other = peer4_short_form(&long_form()).unwrap();
        for forged in [format!("{other}:{doc}"), format!("{short}:{doc}x")] {
            let e = Recipient::parse(&forged).unwrap_err().to_string();
            assert!(e.contains("hash does not match"), "{e}");
            assert!(Recipient::of(&forged).is_err());
        }
        let e = Recipient::parse(&format!("{short}:")).unwrap_err().to_string();
        assert!(e.contains("did:peer:4"), "{e}");
    }

    #[test]
    fn what_is_not_a_did_is_refused() {
        for s in [
            "",
            "#key-1",
            "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
            "peer:4zQm",
        ] {
            assert!(Recipient::parse(s).is_err(), "{s:?}");
        }
        assert!(Recipient::parse(&format!("did:key:{}", "z".repeat(MAX_DID_LEN))).is_err());
    }

    #[test]
    fn a_did_holding_a_control_character_is_refused() {
        let dk = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        for s in [
            "did:x\u{0}".to_string(),
            format!("{dk}\u{0}"),
            format!("{dk}#key-1\u{0}"),
            "did:x:a\u{1b}b".to_string(),
            "did:x:a\u{7f}b".to_string(),
            "did:x:a\u{85}b".to_string(),
        ] {
            let e = Recipient::parse(&s).unwrap_err().to_string();
            assert!(e.contains("control character"), "{s:?}: {e}");
        }
        assert!(Recipient::of("did:x\u{0}").is_err());
        // Whitespace around the DID is trimmed, as before.
        assert_eq!(Recipient::parse(&format!(" {dk}\n")).unwrap().named, dk);
    }

    #[test]
    fn only_a_did_peer_3_is_unlinkable() {
        let p3 = Recipient::parse("did:peer:3zQmR1arqG7V8Guck9KHWkxYBAxjegVxhVLbp6fmrisUSgnp").unwrap();
        assert!(p3.unlinkable());
        let short = peer4_short_form(&long_form()).unwrap();
        for d in [
            short.as_str(),
            "did:peer:2.Ez6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc",
        ] {
            assert!(!Recipient::parse(d).unwrap().unlinkable(), "{d}");
        }
    }
}
