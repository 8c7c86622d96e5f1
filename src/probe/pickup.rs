//! Forward and pickup over HTTP: a sender's forward to a registered key is accepted; pickup
//! 2.0 status-request, delivery-request and messages-received; pickup 1.0 batch-pickup; and
//! redelivery: a delivery that is not acknowledged is offered again (after the mediator's
//! lease, bounded by `--redelivery-wait`).

use super::target::Target;
use super::wallet::{contents, is_type, nonce, poll, problem, routed, show, Incoming, Wallet};
use super::{fail, pass_note, skip, Options, Runner, Verdict};
use serde_json::json;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(250);

/// Why a pickup check does not run, when discover-features disclosed the protocol as absent.
pub(crate) fn not_advertised(t: &Target, family: &str, major: u32) -> Option<String> {
    match t.advertises(family, major) {
        Some(false) => Some(format!("{family} {major}.x not disclosed by discover-features")),
        _ => None,
    }
}

/// A pickup 2.0 reply that refuses: SKIP when the mediator disclosed nothing (it may simply
/// not speak the protocol), FAIL when it said it does.
fn refused(t: &Target, what: &str, e: &anyhow::Error) -> anyhow::Result<Verdict> {
    if t.features.is_none() {
        skip(format!(
            "{what} not answered ({e:#}); no discover-features to say it is supported"
        ))
    } else {
        Err(anyhow::anyhow!("{what}: {e:#}"))
    }
}

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let w = match Wallet::onboard(t).await {
        Ok(w) => w,
        Err(e) => {
            let why = format!("not run: a fresh wallet could not onboard: {e:#}");
            for n in [
                "forward",
                "pickup-2.0-status",
                "pickup-2.0-delivery",
                "pickup-2.0-messages-received",
                "pickup-1.0-batch",
                "redelivery",
            ] {
                r.skip(n, &why);
            }
            return;
        }
    };
    let content = nonce("forward");
    let forwarded = r
        .check("forward", async {
            let status = w.forward(&content).await?;
            pass_note(format!("HTTP {status}"))
        })
        .await;
    let forwarded = !matches!(forwarded, Some(Verdict::Fail(_)));

    let v2_skip = not_advertised(t, "messagepickup", 2);
    let mut ids: Vec<String> = Vec::new();
    if let Some(why) = &v2_skip {
        for n in [
            "pickup-2.0-status",
            "pickup-2.0-delivery",
            "pickup-2.0-messages-received",
        ] {
            r.skip(n, why);
        }
    } else if !forwarded {
        for n in [
            "pickup-2.0-status",
            "pickup-2.0-delivery",
            "pickup-2.0-messages-received",
        ] {
            r.skip(n, "not run: the forward was refused");
        }
    } else {
        let status = r
            .check("pickup-2.0-status", async {
                // A mediator may queue after answering the forward: wait for the count.
                let n = poll(t.timeout, POLL, || async {
                    let n = w.status().await?;
                    Ok((n >= 1).then_some(n))
                })
                .await;
                match n {
                    Ok(Some(n)) => pass_note(format!("message_count {n}")),
                    Ok(None) => fail(format!("message_count still 0 {:?} after the forward", t.timeout)),
                    Err(e) => refused(t, "status-request", &e),
                }
            })
            .await;
        let supported = !matches!(status, Some(Verdict::Skip(_)));
        if !supported {
            r.skip("pickup-2.0-delivery", "pickup 2.0 not answered");
            r.skip("pickup-2.0-messages-received", "pickup 2.0 not answered");
        } else {
            r.check("pickup-2.0-delivery", async {
                let got = poll(t.timeout, POLL, || async {
                    let r = w
                        .ask(
                            &routed("messagepickup/2.0", "delivery-request", json!({ "limit": 10 })),
                            "delivery-request",
                        )
                        .await?;
                    if is_type(&r, "messagepickup", "status") {
                        return Ok(None);
                    }
                    if !is_type(&r, "messagepickup", "delivery") {
                        anyhow::bail!("delivery-request answered with {}", show(&r));
                    }
                    Ok(Some(w.open_ids(&r)?))
                })
                .await?;
                let Some(items) = got else {
                    return fail(format!("no delivery within {:?}", t.timeout));
                };
                let mut found = false;
                for (id, inc) in &items {
                    if let Incoming::Message { content: Some(c), .. } = inc {
                        ids.push(id.clone());
                        found |= *c == content;
                    }
                }
                let (_, others) = contents(&items.into_iter().map(|(_, i)| i).collect::<Vec<_>>());
                if !others.is_empty() {
                    return fail(format!("the delivery holds {} message(s) for other keys", others.len()));
                }
                if !found {
                    return fail("the forwarded message is not in the delivery");
                }
                pass_note(format!("{} message(s) delivered", ids.len()))
            })
            .await;
            r.check("pickup-2.0-messages-received", async {
                if ids.is_empty() {
                    return skip("not run: nothing was delivered");
                }
                let left = w.ack(&ids).await?;
                if left != 0 {
                    return fail(format!("message_count {left} after acknowledging everything delivered"));
                }
                let again = w.delivery_request(10).await?;
                let (mine, _) = contents(&again);
                if mine.contains(&content) {
                    return fail("an acknowledged message was delivered again");
                }
                pass_note("status message_count 0 after the ack")
            })
            .await;
        }
    }

    r.check("pickup-1.0-batch", async {
        if let Some(why) = not_advertised(t, "messagepickup", 1) {
            return skip(why);
        }
        let w = Wallet::onboard(t).await?;
        let sent = [nonce("batch-1"), nonce("batch-2")];
        for c in &sent {
            w.forward(c).await?;
        }
        let mut seen: Vec<String> = Vec::new();
        let mut foreign = 0;
        let deadline = Instant::now() + t.timeout;
        let done = loop {
            let r = w
                .ask(
                    &routed("messagepickup/1.0", "batch-pickup", json!({ "batch_size": 10 })),
                    "batch-pickup",
                )
                .await?;
            if let Some(p) = problem(&r) {
                if t.features.is_none() {
                    return skip(format!(
                        "batch-pickup refused ({p}); no discover-features to say it is supported"
                    ));
                }
                return fail(format!("batch-pickup refused: {p}"));
            }
            if !is_type(&r, "messagepickup", "batch") {
                return fail(format!("batch-pickup answered with {}", show(&r)));
            }
            let (mine, others) = contents(&w.open(&r)?);
            foreign += others.len();
            seen.extend(mine);
            if sent.iter().all(|c| seen.contains(c)) {
                break Some(());
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(POLL).await;
        };
        if foreign > 0 {
            return fail(format!("a batch held {foreign} message(s) for other keys"));
        }
        match done {
            Some(()) => pass_note(format!("{} message(s) in batches", seen.len())),
            None => fail(format!(
                "{} of 2 forwarded messages came in batches within {:?}",
                sent.iter().filter(|c| seen.contains(c)).count(),
                t.timeout
            )),
        }
    })
    .await;

    r.check("redelivery", async {
        if let Some(why) = &v2_skip {
            return skip(why.clone());
        }
        redelivery_http(t, opts).await
    })
    .await;
}

/// Forward, take the delivery over HTTP without acknowledging it, then ask again until it is
/// offered again (a mediator with leases waits for the lease to run out).
async fn redelivery_http(t: &Target, opts: &Options) -> anyhow::Result<Verdict> {
    let w = Wallet::onboard(t).await?;
    let content = nonce("redelivery");
    w.forward(&content).await?;
    let first = poll(t.timeout, POLL, || async {
        let got = match w.delivery_request(10).await {
            Ok(g) => g,
            Err(e) if t.features.is_none() => return Err(e.context("no discover-features")),
            Err(e) => return Err(e),
        };
        Ok(contents(&got).0.contains(&content).then_some(()))
    })
    .await;
    match first {
        Ok(Some(())) => {}
        Ok(None) => return fail(format!("the message was not delivered within {:?}", t.timeout)),
        Err(e) => return refused(t, "delivery-request", &e),
    }
    offered_again(
        &w,
        &content,
        opts.redelivery_wait,
        Duration::from_millis(500),
        "the unacknowledged delivery",
    )
    .await
}

/// Redelivery: polls delivery-request until `content` is offered again (pass, with how long it
/// took after `since_what`) or `wait` runs out (fail, naming `--redelivery-wait`).
pub(crate) async fn offered_again(
    w: &Wallet,
    content: &str,
    wait: Duration,
    every: Duration,
    since_what: &str,
) -> anyhow::Result<Verdict> {
    let start = Instant::now();
    let again = poll(wait, every, || async {
        Ok(contents(&w.delivery_request(10).await?)
            .0
            .iter()
            .any(|c| c == content)
            .then_some(()))
    })
    .await?;
    match again {
        Some(()) => pass_note(format!(
            "offered again {:.1} s after {since_what}",
            start.elapsed().as_secs_f64()
        )),
        None => fail(format!(
            "a delivery left unacknowledged was not offered again within {wait:?} after {since_what} (--redelivery-wait)"
        )),
    }
}
