//! Delivery on a WebSocket: pickup 2.0 live mode (live-delivery-change, a `delivery` pushed as
//! the forward arrives, messages-received on the socket), what that ack removed (once the
//! socket is closed, the acknowledged message must never come back and the other must),
//! Credo-style implicit delivery (a socket opened by a message with return-route gets the raw
//! forwarded messages; optional: a mediator may queue them for pickup instead), and redelivery
//! after a live session ends without acknowledging.

use super::pickup::{ack_removed_only_acked, not_advertised, offered_again};
use super::target::Target;
use super::wallet::{contents, is_type, nonce, routed, trust_ping, Incoming, Socket, Wallet};
use super::{fail, fresh_wallet, is_blocked, pass_note, skip, Options, Runner, Verdict};
use serde_json::json;
use std::time::Duration;

const CHECKS: [&str; 4] = ["live-mode-ws", "redelivery-session-end", "live-mode-ack", "implicit-ws"];

/// What `live-mode-ws` hands to `live-mode-ack`: a wallet whose closed live socket got two
/// messages, of which it acknowledged one.
struct Acked {
    w: Wallet,
    acked: String,
    unacked: String,
}

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let Some(ws) = t.ws.clone() else {
        let why = "no WebSocket endpoint in the invitation or the mediator's DID (give one with --ws)";
        for n in CHECKS {
            r.skip(n, why);
        }
        return;
    };
    let live_skip = not_advertised(t, "messagepickup", 2);
    let mut handed: Option<Acked> = None;
    let live = r
        .check("live-mode-ws", async {
            if let Some(why) = &live_skip {
                return skip(why.clone());
            }
            let (v, acked) = ack_one_of_two(t, &ws, fresh_wallet(t).await?).await?;
            handed = acked;
            Ok(v)
        })
        .await;
    r.check("redelivery-session-end", async {
        if let Some(why) = &live_skip {
            return skip(why.clone());
        }
        let w = fresh_wallet(t).await?;
        let (s, content) = match live_delivery(t, &ws, &w, 1).await? {
            Ok((s, mut got)) => (s, got.remove(0).0),
            Err(why) => return fail(why),
        };
        // The socket is closed with the delivery unacknowledged: it must be offered again.
        s.close().await;
        offered_again(
            &w,
            &content,
            opts.redelivery_wait,
            Duration::from_millis(250),
            "the socket closed",
        )
        .await
    })
    .await;
    let session_end = r.report.get("redelivery-session-end").map(|c| c.verdict.clone());
    r.check("live-mode-ack", async {
        if let Some(why) = &live_skip {
            return skip(why.clone());
        }
        let a = match (handed, live) {
            (Some(a), _) => a,
            // Filtered out by --only: do its part here.
            (None, None) => match ack_one_of_two(t, &ws, fresh_wallet(t).await?).await? {
                (_, Some(a)) => a,
                (v, None) => return Ok(v),
            },
            // Blocked the same way.
            (None, Some(v)) if is_blocked(&v) => return Ok(v),
            (None, Some(_)) => return skip("not run: live-mode-ws failed"),
        };
        if matches!(session_end, Some(Verdict::Fail(_))) {
            // Waiting again would only end the same way.
            return skip("cannot tell: the mediator does not offer a live delivery again after its socket closes (redelivery-session-end), and an ack that removed nothing would look the same");
        }
        ack_removed_only_acked(
            &a.w,
            &a.acked,
            &a.unacked,
            opts.redelivery_wait,
            Duration::from_millis(250),
            "the socket closed",
        )
        .await
    })
    .await;
    r.check("implicit-ws", implicit(t, &ws)).await;
}

/// Live mode on `w`: two forwards arrive on the socket in pickup 2.0 deliveries, the first is
/// acknowledged on it, the socket is closed. The verdict of `live-mode-ws`, and on a pass what
/// `live-mode-ack` needs.
async fn ack_one_of_two(t: &Target, ws: &str, w: Wallet) -> anyhow::Result<(Verdict, Option<Acked>)> {
    let (mut s, got) = match live_delivery(t, ws, &w, 2).await? {
        Ok(d) => d,
        Err(why) => return Ok((Verdict::Fail(why), None)),
    };
    let left = s.ack(&w, &[got[0].1.clone()]).await;
    s.close().await;
    let left = left.map_err(|e| e.context("messages-received on the socket"))?;
    let mut got = got.into_iter().map(|(c, _)| c);
    let (acked, unacked) = (got.next().unwrap_or_default(), got.next().unwrap_or_default());
    let note =
        format!("2 messages pushed on the socket in deliveries, one acknowledged on it (status message_count {left})");
    Ok((Verdict::Pass(Some(note)), Some(Acked { w, acked, unacked })))
}

/// live-delivery-change(true) on a new socket of `w`, then `n` forwards, each of which must
/// arrive on the socket in a pickup 2.0 `delivery` (not raw, nothing for other keys). Returns
/// the open socket and each content with its attachment id, in the order sent; `Err` is the
/// reason to FAIL (the socket is closed then).
async fn live_delivery(
    t: &Target,
    ws: &str,
    w: &Wallet,
    n: usize,
) -> anyhow::Result<Result<(Socket, Vec<(String, String)>), String>> {
    let mut s = w.socket(ws).await?;
    let change = routed(
        "messagepickup/2.0",
        "live-delivery-change",
        json!({ "live_delivery": true }),
    );
    s.request(w, &change, "messagepickup", "status").await?;
    let sent: Vec<String> = (0..n).map(|_| nonce("live")).collect();
    for c in &sent {
        w.forward(c).await?;
    }
    let deadline = tokio::time::Instant::now() + t.timeout;
    let (got, arrived) = s
        .read_until(w, deadline, |g| {
            let mine = contents(g).0;
            sent.iter().all(|c| mine.contains(c))
        })
        .await?;
    let why = if !arrived {
        Some(format!(
            "{} of {n} forwards reached the live socket within {:?}",
            sent.iter().filter(|c| contents(&got).0.contains(c)).count(),
            t.timeout
        ))
    } else if !contents(&got).1.is_empty() {
        Some(format!(
            "the socket carried {} message(s) for other keys",
            contents(&got).1.len()
        ))
    } else {
        None
    };
    if let Some(why) = why {
        s.close().await;
        return Ok(Err(why));
    }
    // Live mode delivers `delivery` messages (with ids to acknowledge), not raw envelopes.
    let ids = delivery_ids(w, &got)?;
    let mut out = Vec::new();
    for c in sent {
        match ids.iter().find(|(d, _)| *d == c) {
            Some((_, id)) => out.push((c, id.clone())),
            None => {
                s.close().await;
                return Ok(Err("a message came raw, not in a pickup 2.0 delivery".into()));
            }
        }
    }
    Ok(Ok((s, out)))
}

/// The content and attachment id of each message to `w`'s key in the deliveries among `got`.
fn delivery_ids(w: &Wallet, got: &[Incoming]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for i in got {
        let Incoming::Reply(r) = i else { continue };
        if !is_type(r, "messagepickup", "delivery") {
            continue;
        }
        for (id, m) in w.open_ids(r)? {
            if let Incoming::Message { content: Some(c), .. } = m {
                out.push((c, id));
            }
        }
    }
    Ok(out)
}

/// Implicit (return-route) delivery: a trust ping with return_route all opens the session;
/// a forward must then arrive on the socket as the raw forwarded message.
async fn implicit(t: &Target, ws: &str) -> anyhow::Result<Verdict> {
    let w = fresh_wallet(t).await?;
    let mut s: Socket = w.socket(ws).await?;
    s.request(&w, &trust_ping(), "trust_ping", "ping_response").await?;
    let content = nonce("implicit");
    w.forward(&content).await?;
    let deadline = tokio::time::Instant::now() + t.timeout;
    let (got, arrived) = s.read_until(&w, deadline, |g| contents(g).0.contains(&content)).await?;
    s.close().await;
    if !arrived {
        // RFC 0685: messages that arrive while live mode is off MUST be queued, and RFC 0092's
        // return route lets a mediator push or not: a mediator that queues is not failing.
        // Only one that neither pushes nor lets the message be picked up is.
        let waited = t.timeout;
        return match picked_up(t, &w, &content).await {
            Some(how) => skip(format!(
                "not offered (queues for pickup): nothing came on the return-route socket within {waited:?}, then {how} handed the message out"
            )),
            None => fail(format!(
                "the forward did not reach the return-route socket within {waited:?}, and no pickup (2.0 delivery-request, 1.0 batch-pickup) handed it out"
            )),
        };
    }
    let wrapped = got
        .iter()
        .any(|i| matches!(i, Incoming::Reply(r) if is_type(r, "messagepickup", "delivery")));
    pass_note(if wrapped {
        "delivered in a pickup 2.0 delivery"
    } else {
        "raw forwarded message pushed on the socket"
    })
}

/// How `content`, forwarded to `w`, can be picked up over HTTP: by a pickup 2.0
/// delivery-request, else a pickup 1.0 batch-pickup (each unless discover-features disclosed
/// it absent); None when neither hands it out (declined, failed, or without it).
async fn picked_up(t: &Target, w: &Wallet, content: &str) -> Option<&'static str> {
    let has = |got: anyhow::Result<Vec<Incoming>>| got.is_ok_and(|g| contents(&g).0.iter().any(|c| c == content));
    if not_advertised(t, "messagepickup", 2).is_none() && has(w.delivery_request(10).await) {
        return Some("a pickup 2.0 delivery-request");
    }
    if not_advertised(t, "messagepickup", 1).is_none() && has(w.batch_pickup(10).await) {
        return Some("a pickup 1.0 batch-pickup");
    }
    None
}
