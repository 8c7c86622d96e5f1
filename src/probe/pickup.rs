//! Forward and pickup over HTTP: a sender's forward to a registered key is accepted; pickup
//! 2.0 status-request, delivery-request and messages-received; pickup 1.0 batch-pickup; and
//! redelivery: a delivery that is not acknowledged is offered again (after the mediator's
//! lease, bounded by `--redelivery-wait`).

use super::target::Target;
use super::wallet::{contents, declined, is_type, nonce, poll, problem, routed, show, Incoming, Wallet};
use super::{fail, fresh_wallet, pass_note, skip, Options, Runner, Verdict};
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

/// A pickup reply that refuses, when discover-features disclosed nothing: SKIP when the
/// mediator declined (a problem report, another type, a 4xx or silence: it may simply not
/// speak the protocol), FAIL when it broke (a 5xx, a timeout, an unreadable reply) or when it
/// said it speaks the protocol.
fn refused(t: &Target, what: &str, e: &anyhow::Error) -> anyhow::Result<Verdict> {
    if t.features.is_none() && declined(e) {
        skip(format!(
            "{what} declined ({e:#}); no discover-features to say it is supported"
        ))
    } else {
        Err(anyhow::anyhow!("{what}: {e:#}"))
    }
}

const V2_CHECKS: [&str; 3] = [
    "pickup-2.0-status",
    "pickup-2.0-delivery",
    "pickup-2.0-messages-received",
];

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let v2_skip = not_advertised(t, "messagepickup", 2);
    match fresh_wallet(t).await {
        Ok(w) => forward_and_v2(r, t, opts, &w, v2_skip.as_deref()).await,
        Err(e) => {
            let why = format!("{e:#}");
            r.fail("forward", &why);
            for n in V2_CHECKS {
                match &v2_skip {
                    Some(not) => r.skip(n, not),
                    None => r.fail(n, &why),
                }
            }
        }
    }

    r.check("pickup-1.0-batch", batch(t)).await;

    r.check("redelivery", async {
        if let Some(why) = &v2_skip {
            return skip(why.clone());
        }
        redelivery_http(t, opts).await
    })
    .await;
}

/// `forward` to `w`'s key, then pickup 2.0 over HTTP: status, delivery, messages-received.
async fn forward_and_v2(r: &mut Runner, t: &Target, opts: &Options, w: &Wallet, v2_skip: Option<&str>) {
    let content = nonce("forward");
    let forwarded = match r
        .check("forward", async {
            let status = w.forward(&content).await?;
            pass_note(format!("HTTP {status}"))
        })
        .await
    {
        Some(v) => !matches!(v, Verdict::Fail(_)),
        // Filtered out by --only: the pickup checks still need the message.
        None => w.forward(&content).await.is_ok(),
    };
    if let Some(why) = v2_skip {
        for n in V2_CHECKS {
            r.skip(n, why);
        }
        return;
    }
    if !forwarded {
        for n in V2_CHECKS {
            r.skip(n, "not run: the forward was refused");
        }
        return;
    }
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
    if matches!(status, Some(Verdict::Skip(_))) {
        r.skip("pickup-2.0-delivery", "pickup 2.0 not answered");
        r.skip("pickup-2.0-messages-received", "pickup 2.0 not answered");
        return;
    }
    r.check("pickup-2.0-delivery", delivery(t, w, &content)).await;
    r.check("pickup-2.0-messages-received", messages_received(t, opts))
        .await;
}

/// delivery-request returns the forwarded message, and nothing for other keys.
async fn delivery(t: &Target, w: &Wallet, content: &str) -> anyhow::Result<Verdict> {
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
        Ok(Some(w.open(&r)?))
    })
    .await?;
    let Some(items) = got else {
        return fail(format!("no delivery within {:?}", t.timeout));
    };
    let (mine, others) = contents(&items);
    if !others.is_empty() {
        return fail(format!("the delivery holds {} message(s) for other keys", others.len()));
    }
    if !mine.iter().any(|c| c == content) {
        return fail("the forwarded message is not in the delivery");
    }
    pass_note(format!("{} message(s) delivered", mine.len()))
}

/// messages-received removes what it lists and nothing else. Right after a delivery both
/// messages are out on lease, so neither the status count nor a delivery-request can tell an
/// ack that worked from one that did nothing; only when the mediator offers the unacknowledged
/// one again is the absence of the acknowledged one evidence.
async fn messages_received(t: &Target, opts: &Options) -> anyhow::Result<Verdict> {
    let w = fresh_wallet(t).await?;
    let sent = [nonce("ack-1"), nonce("ack-2")];
    for c in &sent {
        w.forward(c).await?;
    }
    let ids = match take_all(t, &w, &sent).await? {
        Ok(ids) => ids,
        Err(why) => return Ok(Verdict::Fail(why)),
    };
    w.ack(&ids[..1]).await?;
    ack_removed_only_acked(
        &w,
        &sent[0],
        &sent[1],
        opts.redelivery_wait,
        Duration::from_millis(500),
        "the ack of the other",
    )
    .await
}

/// delivery-requests until every message of `sent` was handed out: their ids, in `sent`'s
/// order (`Err`: the reason to FAIL).
async fn take_all(t: &Target, w: &Wallet, sent: &[String]) -> anyhow::Result<Result<Vec<String>, String>> {
    let mut ids: Vec<Option<String>> = vec![None; sent.len()];
    let deadline = Instant::now() + t.timeout;
    loop {
        for (id, m) in w.delivery_request_ids(10).await? {
            match m {
                Incoming::Message { content: Some(c), .. } => {
                    if let Some(i) = sent.iter().position(|s| *s == c) {
                        ids[i] = Some(id);
                    }
                }
                Incoming::Message { content: None, .. } => {
                    return Ok(Err("a delivery held a message for another key".into()));
                }
                Incoming::Reply(_) => {}
            }
        }
        if ids.iter().all(Option::is_some) {
            return Ok(Ok(ids.into_iter().flatten().collect()));
        }
        if Instant::now() >= deadline {
            let n = ids.iter().filter(|i| i.is_some()).count();
            return Ok(Err(format!(
                "{n} of {} forwarded messages delivered within {:?}",
                sent.len(),
                t.timeout
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What came back first after an ack.
enum Back {
    Acked,
    Unacked(Vec<String>),
}

/// After `acked` was acknowledged and `unacked`, delivered with it, was not: delivery-requests
/// until `unacked` is offered again (PASS, if `acked` never was), `acked` is (FAIL: the ack
/// removed nothing), or `wait` runs out (SKIP: a mediator that never redelivers looks the
/// same whether or not its ack removes anything; Credo's marks what it hands out `sending`).
pub(crate) async fn ack_removed_only_acked(
    w: &Wallet,
    acked: &str,
    unacked: &str,
    wait: Duration,
    every: Duration,
    since_what: &str,
) -> anyhow::Result<Verdict> {
    let start = Instant::now();
    let back = poll(wait, every, || async {
        let mut ids = Vec::new();
        for (id, m) in w.delivery_request_ids(10).await? {
            match m {
                Incoming::Message { content: Some(c), .. } if c == acked => return Ok(Some(Back::Acked)),
                Incoming::Message { content: Some(c), .. } if c == unacked => ids.push(id),
                _ => {}
            }
        }
        Ok((!ids.is_empty()).then_some(Back::Unacked(ids)))
    })
    .await?;
    let after = start.elapsed().as_secs_f64();
    match back {
        Some(Back::Acked) => fail(format!(
            "the acknowledged message was offered again {after:.1} s after {since_what}: messages-received removed nothing"
        )),
        None => skip(format!(
            "cannot tell: the unacknowledged message was not offered again within {wait:?} after {since_what} (--redelivery-wait), and an ack that removed nothing would look the same"
        )),
        Some(Back::Unacked(ids)) => {
            // Tidy up, then look once more: the acknowledged one must not follow.
            w.ack(&ids).await?;
            if contents(&w.delivery_request(10).await?).0.iter().any(|c| c == acked) {
                return fail("the acknowledged message was offered again: messages-received removed nothing");
            }
            pass_note(format!(
                "the unacknowledged message was offered again {after:.1} s after {since_what}, the acknowledged one not"
            ))
        }
    }
}

/// pickup 1.0: batch-pickup returns both forwarded messages (and nothing for other keys).
async fn batch(t: &Target) -> anyhow::Result<Verdict> {
    if let Some(why) = not_advertised(t, "messagepickup", 1) {
        return skip(why);
    }
    let w = fresh_wallet(t).await?;
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
}

/// Forward, take the delivery over HTTP without acknowledging it, then ask again until it is
/// offered again (a mediator with leases waits for the lease to run out).
async fn redelivery_http(t: &Target, opts: &Options) -> anyhow::Result<Verdict> {
    let w = fresh_wallet(t).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::HttpStatus;
    use crate::probe::wallet::{status_count, Declined};

    /// A mediator's target as the probe knows it, with `features` as discover-features left it.
    fn target(features: Option<Vec<String>>) -> Target {
        let key = crate::didcomm::keys::KeyPair::generate();
        let inv = json!({
            "@type": "https://didcomm.org/out-of-band/1.1/invitation",
            "@id": "i1",
            "handshake_protocols": ["https://didcomm.org/didexchange/1.1"],
            "services": [{"serviceEndpoint": "http://127.0.0.1:1", "recipientKeys": [key.did_key()]}],
        });
        let mut t = Target::from_invitation(inv, None, Duration::from_secs(1)).unwrap();
        t.features = features;
        t
    }

    fn http(status: u16, body: &str) -> anyhow::Error {
        anyhow::Error::from(HttpStatus {
            status,
            body: body.into(),
        })
        .context("status-request: request failed")
    }

    #[test]
    fn without_discover_features_only_a_declining_answer_skips() {
        let t = target(None);
        let problem = json!({
            "@type": "https://didcomm.org/report-problem/1.0/problem-report",
            "description": { "code": "unsupported-message-type", "en": "no pickup here" },
        });
        let declining = [
            status_count(&problem).unwrap_err(),
            status_count(&json!({"@type": "https://didcomm.org/other/1.0/thing"})).unwrap_err(),
            anyhow::Error::from(Declined("no reply on the return route".into())),
            http(404, "not found"),
        ];
        for e in &declining {
            let v = refused(&t, "status-request", e);
            assert!(matches!(v, Ok(Verdict::Skip(_))), "{e:#}: {v:?}");
        }
        let broken = [
            http(500, "<html>\n<body>Internal Server Error</body>\n</html>"),
            http(503, "unavailable"),
            anyhow::anyhow!("POST http://127.0.0.1:1: Timeout while waiting for response"),
            anyhow::anyhow!("unreadable envelope: not JSON"),
        ];
        for e in &broken {
            let v = refused(&t, "status-request", e);
            assert!(v.is_err(), "{e:#}: {v:?}");
        }
    }

    #[test]
    fn a_disclosed_protocol_that_declines_fails() {
        let t = target(Some(vec!["messagepickup/2".into()]));
        let e = anyhow::Error::from(Declined("problem-report".into()));
        assert!(refused(&t, "status-request", &e).is_err());
    }
}
