//! coordinate-mediation keylist: keylist-update add and remove (each answered `success`), and
//! keylist-query listing what is registered (SKIP when the mediator does not answer it).
//!
//! The wallet here is connected and mediated but registers no key before the check: the first
//! keylist add is what `keylist-update` judges, so a mediator whose adds fail FAILs it (a
//! wallet onboarded with a key of its own would have failed before any check ran).

use super::target::Target;
use super::wallet::{is_type, keylist_update, mediate, problem, routed, show, update_result};
use super::{fail, pass, pass_note, skip, Runner, Verdict};
use crate::client::{connect_any, Agent};
use crate::didcomm::keys::{normalize_verkey, KeyPair};
use serde_json::json;

/// A mediated wallet that added two keys and removed one of them.
struct Registered {
    agent: Agent,
    kept: KeyPair,
    removed: KeyPair,
}

pub(crate) async fn run(r: &mut Runner, t: &Target) {
    let mut registered: Option<Registered> = None;
    let update = r
        .check("keylist-update", async {
            match register(t).await? {
                Ok(reg) => {
                    registered = Some(reg);
                    pass()
                }
                Err(why) => fail(why),
            }
        })
        .await;
    r.check("keylist-query", async {
        let reg = match (registered, update) {
            (Some(reg), _) => reg,
            // Filtered out by --only: register here.
            (None, None) => match register(t).await? {
                Ok(reg) => reg,
                Err(why) => return fail(format!("blocked: {why}")),
            },
            (None, Some(_)) => return fail("blocked: keylist-update failed, so no key is known to be registered"),
        };
        query(&reg).await
    })
    .await;
}

/// A fresh wallet, connected and mediated, adds two keys and removes one; `Err` names the
/// first update not answered `success`.
async fn register(t: &Target) -> anyhow::Result<Result<Registered, String>> {
    let mut agent = connect_any(t).await?;
    agent.grant = Some(mediate(&agent).await?);
    let removed = agent.new_recipient_key();
    let kept = agent.new_recipient_key();
    let added = keylist_update(&agent, &[removed.did_key(), kept.did_key()], &[]).await?;
    for k in [&removed, &kept] {
        match update_result(&added, &k.verkey()).as_deref() {
            Some("success") => {}
            other => return Ok(Err(format!("add {}: result {other:?}", k.did_key()))),
        }
    }
    super::tidy::remember(t, &agent, &kept, &Default::default());
    let dropped = keylist_update(&agent, &[], &[removed.did_key()]).await?;
    match update_result(&dropped, &removed.verkey()).as_deref() {
        Some("success") => Ok(Ok(Registered { agent, kept, removed })),
        other => Ok(Err(format!("remove {}: result {other:?}", removed.did_key()))),
    }
}

/// keylist-query lists the kept key and not the removed one.
async fn query(reg: &Registered) -> anyhow::Result<Verdict> {
    let reply = reg
        .agent
        .request(&routed("coordinate-mediation/1.0", "keylist-query", json!({})))
        .await?;
    let Some(reply) = reply else {
        return skip("keylist-query not answered (empty return route)");
    };
    if let Some(p) = problem(&reply) {
        return skip(format!("keylist-query refused: {p}"));
    }
    if !is_type(&reply, "coordinate-mediation", "keylist") {
        return fail(format!("keylist-query answered with {}", show(&reply)));
    }
    let listed: Vec<String> = reply["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["recipient_key"].as_str().and_then(|s| normalize_verkey(s).ok()))
        .collect();
    if !listed.contains(&reg.kept.verkey()) {
        return fail(format!("a registered key is not listed (listed: {})", listed.len()));
    }
    if listed.contains(&reg.removed.verkey()) {
        return fail("a removed key is still listed");
    }
    let paged = reply["pagination"].is_object();
    pass_note(format!(
        "{} key(s) listed{}",
        listed.len(),
        if paged { ", paginated" } else { "" }
    ))
}
