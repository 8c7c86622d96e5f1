//! replay: a copy of an authenticated message the mediator handled is not handled again.
//!
//! A fresh wallet sends a trust ping (authcrypted, return route `all`) and is answered; then
//! the very same envelope is sent again, as one who captured it would. A mediator that
//! answers the copy acts on an authcrypted message whoever sends it: one copy of a wallet's
//! message lets anyone act as that wallet (bind a socket to its connection, take a pickup 1.0
//! batch). The ping is harmless; what the mediator does with its copy is what it does with
//! every message.

use super::target::Target;
use super::wallet::{is_type, trust_ping};
use super::{fail, fresh_wallet, pass_note, skip, Runner, Verdict};
use crate::client;

pub(crate) async fn run(r: &mut Runner, t: &Target) {
    r.check("replay", check(t)).await;
}

async fn check(t: &Target) -> anyhow::Result<Verdict> {
    let w = fresh_wallet(t).await?;
    let env = w.agent.pack(&trust_ping())?;
    let (first, body) = client::post(&w.agent.endpoint, env.clone(), t.timeout).await?;
    let answered = |body: &[u8]| {
        !body.is_empty()
            && w.agent
                .unpack(body)
                .is_ok_and(|(m, _)| is_type(&m, "trust_ping", "ping_response"))
    };
    if !(200..300).contains(&first) || !answered(&body) {
        return skip(format!(
            "cannot tell: the trust ping itself was not answered on its return route (HTTP {first})"
        ));
    }
    let (again, body) = client::post(&w.agent.endpoint, env, t.timeout).await?;
    if answered(&body) {
        return fail(format!(
            "the copy was answered again (HTTP {again}): anyone holding a copy of a wallet's message acts as that wallet"
        ));
    }
    match again {
        400..=499 => pass_note(format!("refused, {again}")),
        200..=299 => pass_note(format!("not answered, {again}")),
        _ => fail(format!("the copy was answered HTTP {again}")),
    }
}
