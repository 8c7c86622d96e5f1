//! Onboarding: each handshake the invitation offers (didexchange 1.1/1.0, connections 1.0),
//! discover-features (what the mediator says it speaks; later checks SKIP what it does not),
//! and coordinate-mediation's mediate-request -> grant.

use super::target::{protocol_key, Target};
use super::wallet::{self, ask, connect, is_type, routed, show, Handshake};
use super::{fail, pass_note, skip, Runner, Verdict};
use serde_json::{json, Value};

/// Why no wallet can onboard: the rest of the probe cannot run.
pub(crate) struct NoWallet {
    pub why: String,
    /// A handshake worked (mediation failed): the mediator is there and refuses wallets.
    pub connected: bool,
}

/// Ok when a handshake worked and mediation was granted (the rest of the probe needs both).
pub(crate) async fn run(r: &mut Runner, t: &mut Target) -> Result<(), NoWallet> {
    let mut first_agent = None;
    for (name, kinds) in [
        (
            "onboarding-didexchange",
            &[Handshake::DidExchange11, Handshake::DidExchange10][..],
        ),
        ("onboarding-connections", &[Handshake::Connections][..]),
    ] {
        let Some(hs) = t.handshakes.iter().copied().find(|h| kinds.contains(h)) else {
            r.skip(name, &format!("the invitation does not offer {}", kinds[0].protocol()));
            continue;
        };
        let mut conn = None;
        let v = r
            .check(name, async {
                let c = connect(t, hs).await?;
                let unsigned = c.unsigned.clone();
                conn = Some(c);
                match unsigned {
                    Some(why) => fail(format!("{}: {why}", hs.protocol())),
                    None => pass_note(hs.protocol()),
                }
            })
            .await;
        if let (Some(Verdict::Pass(_)), Some(c)) = (v, conn) {
            t.learn_endpoints(&c.endpoints);
            if t.handshake.is_none() {
                t.handshake = Some(hs);
                first_agent = Some(c.agent);
            }
        }
    }
    if t.handshake.is_none() {
        // Filtered out by --only, or failed: a handshake is still needed for what follows.
        for hs in t.handshakes.clone() {
            if let Ok(c) = connect(t, hs).await {
                t.learn_endpoints(&c.endpoints);
                t.handshake = Some(hs);
                first_agent = Some(c.agent);
                break;
            }
        }
    }
    let Some(agent) = first_agent else {
        r.skip("discover-features", "not run: no handshake worked");
        r.skip("mediation", "not run: no handshake worked");
        let why = if t.handshakes.is_empty() {
            format!(
                "the invitation offers no handshake the probe speaks ({})",
                t.unsupported_handshakes.join(" ")
            )
        } else {
            "no handshake worked".to_string()
        };
        return Err(NoWallet { why, connected: false });
    };
    let mut features = None;
    r.check("discover-features", async {
        match discover(&agent).await {
            Ok(f) => {
                let n = f.len();
                let shown = [
                    "coordinate-mediation/1",
                    "messagepickup/1",
                    "messagepickup/2",
                    "routing/1",
                ]
                .iter()
                .filter(|p| f.iter().any(|x| x == *p))
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
                features = Some(f);
                pass_note(format!("{n} protocols disclosed, among them: {shown}"))
            }
            Err(e) => skip(format!("not answered ({e:#}); every feature will be tried")),
        }
    })
    .await;
    if features.is_none() {
        // Filtered out by --only: still learn what the mediator speaks.
        features = discover(&agent).await.ok();
    }
    t.features = features;
    let refused = match r.check("mediation", mediation(&agent)).await {
        Some(Verdict::Fail(why)) => Some(why),
        Some(_) => None,
        // Filtered out by --only: every later wallet needs mediation, so still ask.
        None => match mediation(&agent).await {
            Ok(Verdict::Fail(why)) => Some(why),
            Ok(_) => None,
            Err(e) => Some(format!("{e:#}")),
        },
    };
    match refused {
        Some(why) => Err(NoWallet {
            why: format!("mediation failed: {why}"),
            connected: true,
        }),
        None => Ok(()),
    }
}

/// mediate-request -> a grant with an endpoint.
async fn mediation(agent: &crate::client::Agent) -> anyhow::Result<Verdict> {
    let g = wallet::mediate(agent).await?;
    if g.endpoint.is_empty() {
        return fail("mediate-grant without an endpoint");
    }
    pass_note(format!(
        "endpoint {}, {} routing key(s)",
        g.endpoint,
        g.routing_keys.len()
    ))
}

/// discover-features 1.0 `query *`, else 2.0 `queries`: the disclosed protocols as
/// `family/major`.
async fn discover(a: &crate::client::Agent) -> anyhow::Result<Vec<String>> {
    let v1 = ask(
        a,
        &routed("discover-features/1.0", "query", json!({ "query": "*" })),
        "discover-features 1.0",
    )
    .await;
    let pids: Vec<String> = match v1 {
        Ok(reply) if is_type(&reply, "discover-features", "disclose") => list(&reply["protocols"], "pid"),
        first => {
            let reply = ask(
                a,
                &routed(
                    "discover-features/2.0",
                    "queries",
                    json!({ "queries": [{ "feature-type": "protocol", "match": "*" }] }),
                ),
                "discover-features 2.0",
            )
            .await
            .map_err(|e| {
                let first = match first {
                    Ok(r) => show(&r),
                    Err(e) => format!("{e:#}"),
                };
                anyhow::anyhow!("1.0: {first}; 2.0: {e:#}")
            })?;
            if !is_type(&reply, "discover-features", "disclosures") {
                anyhow::bail!("discover-features 2.0 answered with {}", show(&reply));
            }
            list(&reply["disclosures"], "id")
        }
    };
    let mut keys: Vec<String> = pids.iter().filter_map(|p| protocol_key(p)).collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        anyhow::bail!("an empty disclosure");
    }
    Ok(keys)
}

fn list(v: &Value, field: &str) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p[field].as_str().map(str::to_string))
        .collect()
}
