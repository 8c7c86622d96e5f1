//! `from_prior` (DIDComm v2 DID rotation): a wallet that rotated its DID sends its next
//! messages from the new DID with `from_prior`, a compact JWT signed by an authentication key
//! of the old DID with claims `iss` = old DID, `sub` = new DID, `iat`. The mediator verifies it
//! and moves the connection of the old DID to the new one: the connection record (its DID and
//! peer-key index), keylist entries naming the old DID (in the form they are stored in:
//! [`Recipient`]), and with them routing; the queue and live sessions belong to the
//! connection id and stay.
//!
//! Refused (a problem report, nothing changed): a JWT not signed by a key of `iss`, a `sub`
//! that is not the DID that authenticated the message, an `iss` no connection holds, or a new
//! DID that already has a connection of its own (a rotation never merges two connections).

use super::recipient::Recipient;
use super::Inbound;
use crate::didcomm::v2::did::{self, Purpose};
use crate::didcomm::v2::jws;
use crate::protocols::{now_ms, HandleError, Mediator};
use crate::store::{ConnectionPatch, KeyUpdate};

fn refused(why: impl Into<String>) -> HandleError {
    HandleError::Rotation(why.into())
}

/// The rotation a `from_prior` proves: (old DID, new DID).
pub fn verify(from_prior: &serde_json::Value, sender: Option<&str>) -> Result<(String, String), HandleError> {
    let jwt = from_prior
        .as_str()
        .ok_or_else(|| refused("from_prior is not a compact JWT string"))?;
    let sender = sender.ok_or_else(|| refused("from_prior needs an authcrypted or signed message"))?;
    let (claims, kid) = jws::verify_jwt(jwt, &|k| did::resolve_key(k, Purpose::Authentication))
        .map_err(|e| refused(format!("from_prior does not verify: {e}")))?;
    let iss = claims["iss"].as_str().ok_or_else(|| refused("from_prior has no iss"))?;
    let sub = claims["sub"].as_str().ok_or_else(|| refused("from_prior has no sub"))?;
    if did::did_of(&kid) != iss {
        return Err(refused(format!(
            "from_prior is signed by {}, not by its iss",
            did::did_of(&kid)
        )));
    }
    if sub != sender {
        return Err(refused("from_prior's sub is not the DID that sent this message"));
    }
    if iss == sub {
        return Err(refused("from_prior rotates a DID to itself"));
    }
    Ok((iss.to_string(), sub.to_string()))
}

/// A DID of a rotation as a recipient DID (the one form it is stored in).
fn recipient(d: &str) -> Result<Recipient, HandleError> {
    Recipient::parse(d).map_err(|e| refused(e.to_string()))
}

/// The keylist change a rotation from `old` to `new` makes to a connection holding `held`:
/// the form of `new` to add, and the forms of `old` it holds, to remove. `None` when it holds
/// no form of `old`.
fn key_move(held: &[String], old: &Recipient, new: &Recipient) -> Option<(String, Vec<String>)> {
    let remove: Vec<String> = old
        .stored_forms()
        .into_iter()
        .filter(|f| held.contains(f) && *f != new.canonical)
        .collect();
    (!remove.is_empty()).then(|| (new.canonical.clone(), remove))
}

/// Applies the `from_prior` of `ctx`, if any: afterwards `ctx.conn` is the connection of the
/// (new) sender DID.
pub async fn apply(m: &Mediator, ctx: &mut Inbound) -> Result<(), HandleError> {
    let Some(fp) = ctx.msg.get("from_prior") else {
        return Ok(());
    };
    let (old_did, new_did) = verify(fp, ctx.sender.as_deref())?;
    let old = m.store.connection_by_their_verkey(&old_did).await?;
    let old = match (old, &ctx.conn) {
        // The wallet repeats from_prior until it hears from the new DID: already rotated.
        (None, Some(_)) => return Ok(()),
        (Some(o), Some(c)) if o.id == c.id => return Ok(()),
        (Some(_), Some(_)) => return Err(refused("the new DID already has a connection of its own")),
        (None, None) => {
            return Err(refused(
                "from_prior's iss is not the DID of a connection of this mediator",
            ))
        }
        (Some(o), None) => o,
    };
    // Keylist entries naming the old DID (in any form it is stored in) move to the new one:
    // add first, so a new DID another connection registered refuses the rotation before
    // anything changed.
    let (old_r, new_r) = (recipient(&old_did)?, recipient(&new_did)?);
    let moved = key_move(&m.store.keys_of(&old.id).await?, &old_r, &new_r);
    // Signed by the old DID, sent as the new one: this wallet controls both, and no other
    // connection that merely registered the new one keeps it.
    super::mediation::take_proven(m, &old.id, &new_r).await?;
    // Whether the new DID's entry is this rotation's (to take back if the rotation fails),
    // not one the connection held already.
    let mut added = false;
    if let Some((add, _)) = &moved {
        let elsewhere = super::routing::held_in_another_form(m, &new_r).await?;
        if elsewhere.is_some_and(|(c, _)| c != old.id) {
            return Err(refused("the new DID is registered by another connection"));
        }
        let r = m.store.update_keys(&old.id, std::slice::from_ref(add), &[]).await?;
        if r.iter().any(|(_, u)| *u == KeyUpdate::HeldByOther) {
            return Err(refused("the new DID is registered by another connection"));
        }
        added = r.iter().any(|(_, u)| *u == KeyUpdate::Added);
    }
    // A patch of the stored record, not the copy read above written back: a connection the
    // operator deleted meanwhile is not put back, and a change made meanwhile stays.
    let patch = ConnectionPatch {
        rotate_did: Some((old_did.clone(), new_did.clone())),
        updated_at_ms: now_ms(),
        ..ConnectionPatch::default()
    };
    let c = match m.store.update_connection(&old.id, &patch).await {
        Ok(Some(c)) => c,
        gone_or_failed => {
            if let Some((add, _)) = moved.as_ref().filter(|_| added) {
                let _ = m.store.update_keys(&old.id, &[], std::slice::from_ref(add)).await;
            }
            return Err(match gone_or_failed {
                Err(e) => e.into(),
                Ok(_) => HandleError::NoConnection,
            });
        }
    };
    if let Some((_, remove)) = &moved {
        m.store.update_keys(&old.id, &[], remove).await?;
    }
    tracing::info!(connection = %c.id, old = %old_did, new = %new_did, "v2 wallet rotated its DID (from_prior)");
    // Sockets bound by the old DID (here or on other nodes) would go on delivering the
    // connection's mail packed for it: whoever holds the old keys kept a socket's worth.
    if let Some(h) = m.holders.get() {
        h.rotated(&c.id, &ctx.lease_owner);
    }
    ctx.conn = Some(c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didcomm::did::{create_peer4, peer4_short_form};
    use crate::didcomm::keys::KeyPair;

    fn peer4() -> (String, String) {
        let long = create_peer4(&KeyPair::generate().verkey(), &[], &[]);
        let short = peer4_short_form(&long).unwrap();
        (long, short)
    }

    #[test]
    fn a_rotation_moves_the_old_did_in_the_form_it_is_stored_in() {
        let ((old_long, old_short), (new_long, new_short)) = (peer4(), peer4());
        let (old, new) = (
            Recipient::parse(&old_long).unwrap(),
            Recipient::parse(&new_long).unwrap(),
        );
        let other = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".to_string();
        // Registered as the short form (what a keylist update stores now).
        let held = [other.clone(), old_short.clone()];
        assert_eq!(
            key_move(&held, &old, &new),
            Some((new_short.clone(), vec![old_short.clone()]))
        );
        // Registered as the long form by an earlier version, or in both forms.
        let held = [old_long.clone()];
        assert_eq!(
            key_move(&held, &old, &new),
            Some((new_short.clone(), vec![old_long.clone()]))
        );
        let held = [old_long.clone(), old_short.clone()];
        assert_eq!(
            key_move(&held, &old, &new),
            Some((new_short, vec![old_short, old_long]))
        );
        // Not registered: nothing moves.
        assert_eq!(key_move(&[other], &old, &new), None);
    }

    #[test]
    fn a_did_peer_2_rotation_moves_it_as_it_is() {
        let (old, new) = ("did:peer:2.Ez6LSold", "did:peer:2.Ez6LSnew");
        let (o, n) = (Recipient::parse(old).unwrap(), Recipient::parse(new).unwrap());
        assert_eq!(
            key_move(&[old.to_string()], &o, &n),
            Some((new.to_string(), vec![old.to_string()]))
        );
    }
}
