//! `from_prior` (DIDComm v2 DID rotation): a wallet that rotated its DID sends its next
//! messages from the new DID with `from_prior`, a compact JWT signed by an authentication key
//! of the old DID with claims `iss` = old DID, `sub` = new DID, `iat`. The mediator verifies it
//! and moves the connection of the old DID to the new one: the connection record (its DID and
//! peer-key index), keylist entries naming the old DID, and with them routing; the queue and
//! live sessions belong to the connection id and stay.
//!
//! Refused (a problem report, nothing changed): a JWT not signed by a key of `iss`, a `sub`
//! that is not the DID that authenticated the message, an `iss` no connection holds, or a new
//! DID that already has a connection of its own (a rotation never merges two connections).

use super::Inbound;
use crate::didcomm::v2::did::{self, Purpose};
use crate::didcomm::v2::jws;
use crate::protocols::{now_ms, HandleError, Mediator};
use crate::store::KeyUpdate;

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
    // Keylist entries naming the old DID move to the new one: add first, so a new DID another
    // connection registered refuses the rotation before anything changed.
    let moves_key = m.store.keys_of(&old.id).await?.contains(&old_did);
    if moves_key {
        let r = m
            .store
            .update_keys(&old.id, std::slice::from_ref(&new_did), &[])
            .await?;
        if r.iter().any(|(_, u)| *u == KeyUpdate::HeldByOther) {
            return Err(refused("the new DID is registered by another connection"));
        }
    }
    let mut c = old.clone();
    c.their_did = Some(new_did.clone());
    c.their_verkeys = c
        .their_verkeys
        .iter()
        .map(|k| if *k == old_did { new_did.clone() } else { k.clone() })
        .collect();
    if !c.their_verkeys.contains(&new_did) {
        c.their_verkeys.push(new_did.clone());
    }
    c.updated_at_ms = now_ms();
    if let Err(e) = m.store.put_connection(&c).await {
        if moves_key {
            let _ = m.store.update_keys(&old.id, &[], std::slice::from_ref(&new_did)).await;
        }
        return Err(e.into());
    }
    if moves_key {
        m.store
            .update_keys(&old.id, &[], std::slice::from_ref(&old_did))
            .await?;
    }
    tracing::info!(connection = %c.id, old = %old_did, new = %new_did, "v2 wallet rotated its DID (from_prior)");
    ctx.conn = Some(c);
    Ok(())
}
