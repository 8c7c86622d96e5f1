//! Onboarding a wallet on any DIDComm v1 mediator (mailroom, Credo, ACA-Py) from its
//! invitation: the handshake it offers (didexchange 1.1 / 1.0 or connections 1.0, over HTTP
//! with return-route), coordinate-mediation 1.0, one recipient key registered. The one
//! sequence the probe, the load generator and the chaos example use; the handshake and
//! mediation messages are the probe's (written for every peer's shapes, `crate::probe::wallet`).

use super::{Agent, Grant};
use crate::didcomm::keys::KeyPair;
use crate::probe::wallet::{connect, keylist_update, mediate, update_result};
use crate::probe::Target;
use anyhow::{bail, Context};

/// A wallet onboarded by [`onboard_any`].
pub struct Onboarded {
    /// Connected, with the grant in `agent.grant`.
    pub agent: Agent,
    pub grant: Grant,
    /// The recipient key registered with the mediator.
    pub key: KeyPair,
}

impl Onboarded {
    /// Where forwards to this wallet go: the grant's HTTP endpoint, else the invitation's.
    pub fn endpoint(&self, t: &Target) -> String {
        if self.grant.endpoint.starts_with("http") {
            self.grant.endpoint.clone()
        } else {
            t.http.clone()
        }
    }
}

/// Onboards one wallet on the mediator `t` names: its handshake (the one `t.handshake` names,
/// else the first the invitation offers), mediation, one recipient key registered.
pub async fn onboard_any(t: &Target) -> anyhow::Result<Onboarded> {
    mediated(connect_any(t).await?).await
}

/// A new connection to the mediator `t` names, by the handshake `t.handshake` names, else the
/// first the invitation offers (no mediation yet).
pub async fn connect_any(t: &Target) -> anyhow::Result<Agent> {
    let hs = t
        .handshake
        .or_else(|| t.handshakes.first().copied())
        .context("the invitation offers no handshake the client speaks")?;
    Ok(connect(t, hs).await?.agent)
}

/// Mediation and one registered key for an agent connected by other means.
pub async fn mediated(mut agent: Agent) -> anyhow::Result<Onboarded> {
    let grant = mediate(&agent).await?;
    let key = agent.new_recipient_key();
    let updated = keylist_update(&agent, &[key.did_key()], &[]).await?;
    match update_result(&updated, &key.verkey()).as_deref() {
        Some("success") => {}
        other => bail!("keylist-update add: result {other:?} in {updated:?}"),
    }
    agent.grant = Some(grant.clone());
    Ok(Onboarded { agent, grant, key })
}
