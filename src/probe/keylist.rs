//! coordinate-mediation keylist: keylist-update add and remove (each answered `success`), and
//! keylist-query listing what is registered (SKIP when the mediator does not answer it).

use super::target::Target;
use super::wallet::{is_type, keylist_update, problem, routed, show, update_result, Wallet};
use super::{fail, pass, pass_note, skip, Runner};
use crate::didcomm::keys::normalize_verkey;
use serde_json::json;

pub(crate) async fn run(r: &mut Runner, t: &Target) {
    let w = match Wallet::onboard(t).await {
        Ok(w) => w,
        Err(e) => {
            let why = format!("not run: a fresh wallet could not onboard: {e:#}");
            r.skip("keylist-update", &why);
            r.skip("keylist-query", &why);
            return;
        }
    };
    let mut agent = w.agent;
    let k_removed = agent.new_recipient_key();
    let k_kept = agent.new_recipient_key();
    r.check("keylist-update", async {
        let added = keylist_update(&agent, &[k_removed.did_key(), k_kept.did_key()], &[]).await?;
        for k in [&k_removed, &k_kept] {
            match update_result(&added, &k.verkey()).as_deref() {
                Some("success") => {}
                other => return fail(format!("add {}: result {other:?}", k.did_key())),
            }
        }
        let removed = keylist_update(&agent, &[], &[k_removed.did_key()]).await?;
        match update_result(&removed, &k_removed.verkey()).as_deref() {
            Some("success") => pass(),
            other => fail(format!("remove {}: result {other:?}", k_removed.did_key())),
        }
    })
    .await;
    r.check("keylist-query", async {
        let reply = agent
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
        if !listed.contains(&k_kept.verkey()) {
            return fail(format!("a registered key is not listed (listed: {})", listed.len()));
        }
        if listed.contains(&k_removed.verkey()) {
            return fail("a removed key is still listed");
        }
        let paged = reply["pagination"].is_object();
        pass_note(format!(
            "{} key(s) listed{}",
            listed.len(),
            if paged { ", paginated" } else { "" }
        ))
    })
    .await;
}
