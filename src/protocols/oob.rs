//! out-of-band 1.1: the mediator's multi-use invitation (served at `GET /invitation`), fresh
//! invitations for the admin API, and handshake-reuse.

use super::{HandleError, Inbound, Mediator, Outcome};
use base64::Engine;
use serde_json::{json, Value};

pub const HANDSHAKE_PROTOCOLS: &[&str] = &[
    "https://didcomm.org/didexchange/1.1",
    "https://didcomm.org/didexchange/1.0",
    "https://didcomm.org/connections/1.0",
];

/// An out-of-band 1.1 invitation with one service, the http form of the public URL: every
/// client takes it (ACA-Py 1.7 refuses an invitation with more than one service). Credo still
/// finds the ws endpoint for its live-mode socket: it opens it on the services of the DID the
/// mediator answers the exchange with (did:peer:4 listing the http and ws URLs).
pub fn invitation(m: &Mediator, id: &str) -> Value {
    invitation_over(m, id, &m.public_url)
}

/// The invitation with its one service at `endpoint` (`GET /invitation?transport=ws`).
pub fn invitation_over(m: &Mediator, id: &str, endpoint: &str) -> Value {
    let key = m.keys.did_key.did_key();
    let service = |n: usize, endpoint: &str| {
        json!({
            "id": format!("#inline-{n}"),
            "type": "did-communication",
            "serviceEndpoint": endpoint,
            "recipientKeys": [key],
            "routingKeys": [],
        })
    };
    json!({
        "@type": "https://didcomm.org/out-of-band/1.1/invitation",
        "@id": id,
        "label": m.label,
        "accept": ["didcomm/aip1", "didcomm/aip2;env=rfc19"],
        "handshake_protocols": HANDSHAKE_PROTOCOLS,
        "services": [service(0, endpoint)],
    })
}

/// `public_url?oob=<base64url(invitation)>`.
pub fn invitation_url(m: &Mediator, inv: &Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(inv.to_string());
    format!("{}?oob={b64}", m.public_url)
}

/// The public multi-use invitation: the same on every node of a cluster.
pub fn public_invitation(m: &Mediator) -> Value {
    invitation(m, &m.invitation_id)
}

/// Claims the invitation a handshake request names (`~thread.pthid`) for the key the
/// handshake proved (`claimant`): refused when it was single-use and someone else took it.
/// Requests naming no invitation, or the public one, pass. The claim stays its claimant's, so
/// a handshake whose connection was not written after it (a store failure) may be retried.
pub async fn claim(m: &Mediator, ctx: &Inbound, claimant: &str) -> Result<(), HandleError> {
    let Some(p) = crate::didcomm::message::pthid(&ctx.msg) else {
        return Ok(());
    };
    match m.store.use_invitation(&p, claimant).await? {
        crate::store::InvitationUse::AlreadyUsed => Err(HandleError::InvitationUsed(p)),
        _ => Ok(()),
    }
}

pub fn handshake_reuse(_m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    ctx.require_conn()?;
    let mut r = ctx.reply("handshake-reuse-accepted");
    r["~thread"] = json!({ "thid": ctx.id(), "pthid": crate::didcomm::message::pthid(&ctx.msg) });
    Ok(Outcome {
        replies: vec![r],
        ..Outcome::default()
    })
}
