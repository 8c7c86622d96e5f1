//! Scenario `live`: delivered msg/s to one wallet in live mode.

use crate::{client::*, nodes::*, report::*, Opts};
use anyhow::{bail, Context, Result};
use mailroom::client::WsEvent;
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// 5: delivered msg/s to one wallet in live mode
// ---------------------------------------------------------------------------------------------

/// `replay_off`: the same with `limits.replay_window_secs = 0`, the cost of the replay record
/// each acknowledgement (an authenticated message) writes, measured in the same run.
pub(crate) async fn live_throughput(t: &mut Table, o: &Opts, replay_off: bool) -> Result<()> {
    let extra = if replay_off {
        "[limits]\nreplay_window_secs = 0\n"
    } else {
        ""
    };
    let node = ChildNode::start_with(None, extra).await?;
    let mut wallets = onboard_wallets(o.didcomm, &node.public_url(), &node.ws_url(), 1).await?;
    let w = wallets.pop().context("wallet")?;
    let n = o.live_msgs;
    let to = w.recipient();
    let (envs, _) = build_forwards(std::slice::from_ref(&to), n, "live", o.v2_pack)?;
    let host = node.public.to_string();
    let reqs: Rc<Vec<Vec<u8>>> = Rc::new(envs.iter().map(|e| to.request(&host, e)).collect());
    let next = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (reqs, next, addr) = (reqs.clone(), next.clone(), node.public);
        tasks.push(actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut bad = 0usize;
            while next.get() < reqs.len() {
                let i = next.get();
                next.set(i + 1);
                match c.send(&reqs[i]).await {
                    Ok((s, _)) if (200..300).contains(&s) => {}
                    _ => bad += 1,
                }
            }
            bad
        }));
    }
    let mut bad = 0;
    for tk in tasks {
        bad += tk.await?;
    }
    if bad > 0 {
        bail!("{bad} of {n} forwards were not accepted");
    }
    let admin = node.admin_url();
    wait_for("all messages queued", Duration::from_secs(30), || async {
        (queued(&admin).await == Some(n as u64)).then_some(())
    })
    .await?;

    // Live mode on: time until every message is delivered, and until every one is acked.
    let t0 = Instant::now();
    let mut ws = w.live_socket(&node.ws_url()).await?;
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, usize)>();
    let acker = {
        let addr = node.public;
        actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut acked = 0usize;
            let mut done_at = None;
            while let Some((req, k)) = ack_rx.recv().await {
                if matches!(c.send(&req).await, Ok((s, _)) if (200..300).contains(&s)) {
                    acked += k;
                    if acked >= n && done_at.is_none() {
                        done_at = Some(Instant::now());
                    }
                }
            }
            (acked, done_at)
        })
    };
    let mut delivered = 0usize;
    let mut frames = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("only {delivered} of {n} delivered within 60 s");
        }
        let env = match ws.next(left).await? {
            WsEvent::Envelope(e) => e,
            WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
        };
        let Some(opened) = w.delivery(&env, false) else {
            continue;
        };
        frames += 1;
        let ids: Vec<String> = opened.into_iter().map(|(id, _)| id).collect();
        delivered += ids.len();
        let k = ids.len();
        let _ = ack_tx.send((w.ack_request(&host, ids)?, k));
    }
    let t_delivered = t0.elapsed();
    drop(ack_tx);
    let (acked, done_at) = acker.await?;
    let t_acked = done_at.map(|d| d - t0).context("not every message was acknowledged")?;
    let left = wait_for("queue empty", Duration::from_secs(10), || queued(&admin)).await?;
    ws.close().await;
    let off = if replay_off { ", replay window off" } else { "" };
    t.add(
        &format!("live-mode delivery to one wallet{off}{}", o.tag()),
        format!("{:.0}", n as f64 / t_acked.as_secs_f64()),
        "msg/s",
        "",
        format!(
            "one node (sled): {n} queued, then live-delivery-change; all acknowledged (messages-received over HTTP, one per delivery, sequential) {:.0} ms after it, all delivered after {:.0} ms ({:.0} msg/s) in {frames} delivery frames; {acked} acked, queue after {left}",
            t_acked.as_secs_f64() * 1e3,
            t_delivered.as_secs_f64() * 1e3,
            n as f64 / t_delivered.as_secs_f64()
        ),
    );
    drop(node);
    Ok(())
}
