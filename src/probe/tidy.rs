//! What the probe leaves on the mediator, and tidying it after the last check: each wallet
//! acknowledges what it was handed and did not acknowledge (a check that tests redelivery
//! leaves some on purpose), takes and acknowledges what still waits for it, and removes the
//! keys it registered. Best effort: a failing mediator stops the tidying, it does not fail the
//! run. Connections stay: DIDComm v1 has no message that ends one (coordinate-mediation 1.0
//! has no mediation removal either), so the report's last line before the summary says how
//! many the run made.

use super::pickup::not_advertised;
use super::target::Target;
use super::wallet::{is_type, routed, update_result};
use crate::client::{self, Agent};
use crate::didcomm::keys::KeyPair;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Attachment ids a wallet was handed and has not acknowledged.
pub(crate) type Unacked = Arc<Mutex<BTreeSet<String>>>;

/// A key registered by a connection, and what that connection was handed.
pub(crate) struct Left {
    /// The connection's DID key, DID, the mediator's key and endpoint (to talk as it again).
    did_key: KeyPair,
    did: String,
    mediator_verkey: String,
    endpoint: String,
    key: KeyPair,
    unacked: Unacked,
}

/// Everything the run made on the mediator.
#[derive(Default)]
pub(crate) struct Leftovers {
    connections: usize,
    left: Vec<Left>,
}

impl std::fmt::Debug for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Leftovers({} connections, {} keys)",
            self.connections,
            self.left.len()
        )
    }
}

pub(crate) type Shared = Arc<Mutex<Leftovers>>;

/// A connection made (it stays: nothing in DIDComm v1 ends it).
pub(crate) fn connected(t: &Target) {
    t.left.lock().unwrap().connections += 1;
}

/// `key`, registered by `agent`'s connection, to remove at the end (with what `unacked` holds
/// then, to acknowledge).
pub(crate) fn remember(t: &Target, agent: &Agent, key: &KeyPair, unacked: &Unacked) {
    t.left.lock().unwrap().left.push(Left {
        did_key: agent.key.clone(),
        did: agent.did.clone(),
        mediator_verkey: agent.mediator_verkey.clone(),
        endpoint: agent.endpoint.clone(),
        key: key.clone(),
        unacked: unacked.clone(),
    });
}

/// What tidying did.
#[derive(Default)]
struct Tally {
    keys: usize,
    removed: usize,
    /// Handed out and not acknowledged, after tidying.
    unacked: usize,
    /// What the mediator still counts waiting (pickup 2.0 status), when it says.
    waiting: u64,
    /// Why tidying stopped early.
    stopped: Option<String>,
}

/// Tidies what the run left (at most a few timeouts long) and says what remains, in one line.
pub(crate) async fn tidy(t: &Target) -> String {
    let (connections, left) = {
        let mut l = t.left.lock().unwrap();
        (l.connections, std::mem::take(&mut l.left))
    };
    let pickup = not_advertised(t, "messagepickup", 2).is_none();
    let mut tally = Tally {
        keys: left.len(),
        ..Tally::default()
    };
    let bound = t.timeout * 3;
    let all = async {
        for l in &left {
            if let Err(e) = tidy_one(t, l, pickup, &mut tally).await {
                tally.stopped = Some(format!("{e:#}"));
                break;
            }
        }
    };
    if tokio::time::timeout(bound, all).await.is_err() {
        tally.stopped = Some(format!("not done within {bound:?}"));
    }
    tally.unacked += left.iter().map(|l| l.unacked.lock().unwrap().len()).sum::<usize>();
    let mut line = format!(
        "left on the mediator: {connections} connection(s) (DIDComm v1 cannot end one); {} of {} registered key(s) still registered, {} message(s) handed out and not acknowledged",
        tally.keys - tally.removed,
        tally.keys,
        tally.unacked
    );
    if pickup {
        line.push_str(&format!(", {} waiting", tally.waiting));
    }
    if let Some(why) = tally.stopped {
        line.push_str(&format!(" (tidying stopped: {})", super::one_line(&why)));
    }
    line
}

/// Acknowledges what `l`'s connection was handed, takes and acknowledges what waits for it
/// (pickup 2.0), removes its key. An error when the mediator fails (a timeout, a 5xx): the
/// rest is not tried. A refusal (a problem report, a 4xx) only leaves that part undone.
async fn tidy_one(t: &Target, l: &Left, pickup: bool, tally: &mut Tally) -> anyhow::Result<()> {
    let agent = Agent::from_parts(
        l.did_key.clone(),
        l.did.clone(),
        l.mediator_verkey.clone(),
        l.endpoint.clone(),
    )
    .with_timeout(t.timeout);
    if pickup {
        let ids: Vec<String> = l.unacked.lock().unwrap().iter().cloned().collect();
        if !ids.is_empty() && answered(ack(&agent, &ids).await)? {
            l.unacked.lock().unwrap().clear();
        }
        // What waits (never handed out, or back from a lease): a few rounds, no waiting.
        for _ in 0..5 {
            let ask = routed("messagepickup/2.0", "delivery-request", json!({ "limit": 50 }));
            let reply = match agent.request(&ask).await {
                Ok(Some(r)) if is_type(&r, "messagepickup", "delivery") => r,
                Ok(_) => break,
                Err(e) => {
                    answered(Err(e))?;
                    break;
                }
            };
            let ids: Vec<String> = client::delivery_envelopes(&reply)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if ids.is_empty() || !answered(ack(&agent, &ids).await)? {
                tally.unacked += ids.len();
                break;
            }
        }
    }
    let update = routed(
        "coordinate-mediation/1.0",
        "keylist-update",
        json!({ "updates": [{ "recipient_key": l.key.did_key(), "action": "remove" }] }),
    );
    if let Some(r) = agent.request(&update).await.map(Some).or_else(refusal)?.flatten() {
        let updated = r["updated"].as_array().cloned().unwrap_or_default();
        if matches!(
            update_result(&updated, &l.key.verkey()).as_deref(),
            Some("success" | "no_change")
        ) {
            tally.removed += 1;
        }
    }
    if pickup {
        let ask = routed("messagepickup/2.0", "status-request", json!({}));
        if let Some(Some(r)) = agent.request(&ask).await.map(Some).or_else(refusal)? {
            if is_type(&r, "messagepickup", "status") {
                tally.waiting += r["message_count"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(())
}

async fn ack(agent: &Agent, ids: &[String]) -> anyhow::Result<Option<serde_json::Value>> {
    let received = routed(
        "messagepickup/2.0",
        "messages-received",
        json!({ "message_id_list": ids }),
    );
    agent.request(&received).await
}

/// Whether a request was accepted (`Ok(true)`), refused (`Ok(false)`: a problem report, a
/// 4xx), or failed (`Err`: a timeout, a 5xx, a dropped connection).
fn answered(r: anyhow::Result<Option<serde_json::Value>>) -> anyhow::Result<bool> {
    match r {
        Ok(Some(reply)) => Ok(super::wallet::problem(&reply).is_none()),
        Ok(None) => Ok(true),
        Err(e) => refusal::<()>(e).map(|_| false),
    }
}

/// `Ok(None)` for a 4xx (a refusal), the error itself for anything else.
fn refusal<T>(e: anyhow::Error) -> anyhow::Result<Option<T>> {
    match e.downcast_ref::<client::HttpStatus>() {
        Some(h) if (400..500).contains(&h.status) => Ok(None),
        _ => Err(e),
    }
}
