//! Delivery on a WebSocket: pickup 2.0 live mode (live-delivery-change, a `delivery` pushed as
//! the forward arrives, messages-received on the socket), Credo-style implicit delivery (a
//! socket opened by a message with return-route gets the raw forwarded messages), and
//! redelivery after a live session ends without acknowledging.

use super::pickup::{not_advertised, offered_again};
use super::target::Target;
use super::wallet::{contents, is_type, nonce, routed, trust_ping, Incoming, Socket, Wallet};
use super::{fail, pass_note, skip, Options, Runner, Verdict};
use serde_json::json;
use std::time::Duration;

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let Some(ws) = t.ws.clone() else {
        let why = "no WebSocket endpoint in the invitation or the mediator's DID (give one with --ws)";
        for n in ["live-mode-ws", "redelivery-session-end", "implicit-ws"] {
            r.skip(n, why);
        }
        return;
    };
    let live_skip = not_advertised(t, "messagepickup", 2);
    r.check("live-mode-ws", async {
        if let Some(why) = &live_skip {
            return skip(why.clone());
        }
        live_mode(t, &ws, true).await.map(|(v, _)| v)
    })
    .await;
    r.check("redelivery-session-end", async {
        if let Some(why) = &live_skip {
            return skip(why.clone());
        }
        let (v, left) = live_mode(t, &ws, false).await?;
        let Some((w, content)) = left else { return Ok(v) };
        if !matches!(v, Verdict::Pass(_)) {
            return Ok(v);
        }
        // The socket is closed with the delivery unacknowledged: it must be offered again.
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
    r.check("implicit-ws", implicit(t, &ws)).await;
}

/// Live mode on a fresh wallet: live-delivery-change(true), a forward, the `delivery` on the
/// socket. With `ack`, messages-received on the socket; without, the socket is closed and the
/// wallet and content are handed back for the redelivery check.
async fn live_mode(t: &Target, ws: &str, ack: bool) -> anyhow::Result<(Verdict, Option<(Wallet, String)>)> {
    let w = Wallet::onboard(t).await?;
    let mut s = w.socket(ws).await?;
    let change = routed(
        "messagepickup/2.0",
        "live-delivery-change",
        json!({ "live_delivery": true }),
    );
    s.request(&w, &change, "messagepickup", "status").await?;
    let content = nonce("live");
    w.forward(&content).await?;
    let deadline = tokio::time::Instant::now() + t.timeout;
    let (got, arrived) = s.read_until(&w, deadline, |g| contents(g).0.contains(&content)).await?;
    if !arrived {
        s.close().await;
        return Ok((
            Verdict::Fail(format!(
                "the forward did not reach the live socket within {:?}",
                t.timeout
            )),
            None,
        ));
    }
    let (_, others) = contents(&got);
    if !others.is_empty() {
        s.close().await;
        return Ok((
            Verdict::Fail(format!("the socket carried {} message(s) for other keys", others.len())),
            None,
        ));
    }
    // Live mode delivers `delivery` messages (with ids to acknowledge), not raw envelopes.
    let Some(delivery) = got.iter().find_map(|i| match i {
        Incoming::Reply(r) if is_type(r, "messagepickup", "delivery") => Some(r.clone()),
        _ => None,
    }) else {
        s.close().await;
        return Ok((
            Verdict::Fail("the message came raw, not in a pickup 2.0 delivery".into()),
            None,
        ));
    };
    if !ack {
        s.close().await;
        return Ok((Verdict::Pass(None), Some((w, content))));
    }
    let ids: Vec<String> = w.open_ids(&delivery)?.into_iter().map(|(id, _)| id).collect();
    let received = routed(
        "messagepickup/2.0",
        "messages-received",
        json!({ "message_id_list": ids }),
    );
    let (status, _) = s.request(&w, &received, "messagepickup", "status").await?;
    s.close().await;
    let left = status["message_count"].as_u64().unwrap_or(u64::MAX);
    if left != 0 {
        return Ok((
            Verdict::Fail(format!("message_count {left} after messages-received on the socket")),
            None,
        ));
    }
    Ok((
        Verdict::Pass(Some("delivery pushed on the socket, acknowledged on it".into())),
        None,
    ))
}

/// Implicit (return-route) delivery: a trust ping with return_route all opens the session;
/// a forward must then arrive on the socket as the raw forwarded message.
async fn implicit(t: &Target, ws: &str) -> anyhow::Result<Verdict> {
    let w = Wallet::onboard(t).await?;
    let mut s: Socket = w.socket(ws).await?;
    s.request(&w, &trust_ping(), "trust_ping", "ping_response").await?;
    let content = nonce("implicit");
    w.forward(&content).await?;
    let deadline = tokio::time::Instant::now() + t.timeout;
    let (got, arrived) = s.read_until(&w, deadline, |g| contents(g).0.contains(&content)).await?;
    s.close().await;
    if !arrived {
        return fail(format!(
            "the forward did not reach the return-route socket within {:?}",
            t.timeout
        ));
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
