//! Scenario `sessions`: RSS per idle bound WebSocket session.

use crate::{client::*, nodes::*, report::*, Opts};
use anyhow::{bail, Context, Result};
use mailroom::client::{Agent, WsClient, WsEvent};
use mailroom::didcomm::message::new_id;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// 4: idle WebSocket sessions memory
// ---------------------------------------------------------------------------------------------

pub(crate) async fn sessions_memory(t: &mut Table, o: &Opts) -> Result<()> {
    let limit = open_files_limit();
    let n = o.sessions.min(limit.saturating_sub(500)).max(10);
    let node = ChildNode::start(None).await?;
    let mut wallets = onboard(&node.public_url(), 1).await?;
    let a = Rc::new(wallets.pop().context("wallet")?.agent);
    // One socket first, so the per-session figure excludes one-time allocations.
    let socks: Rc<RefCell<Vec<WsClient>>> = Rc::new(RefCell::new(Vec::with_capacity(n)));
    let open_one = |a: Rc<Agent>, url: String| async move {
        let mut ws = a.websocket(&url).await?;
        // A trust ping with return_route all binds the socket to the connection.
        let ping = json!({
            "@type": "https://didcomm.org/trust_ping/1.0/ping",
            "@id": new_id(),
            "response_requested": true,
            "~transport": { "return_route": "all" },
        });
        ws.send_envelope(a.pack(&ping)?, true).await?;
        match ws.next(Duration::from_secs(30)).await? {
            WsEvent::Envelope(_) => Ok::<WsClient, anyhow::Error>(ws),
            WsEvent::Closed(r) => bail!("socket closed: {r:?}"),
        }
    };
    let first = open_one(a.clone(), node.ws_url()).await?;
    socks.borrow_mut().push(first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(node.pid())?;
    let t0 = Instant::now();
    let next = Rc::new(Cell::new(1usize));
    let failures = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (a, url, next, socks, failures) = (a.clone(), node.ws_url(), next.clone(), socks.clone(), failures.clone());
        let deadline = t0 + Duration::from_secs(45);
        tasks.push(actix_rt::spawn(async move {
            while next.get() < n && Instant::now() < deadline && failures.get() < 50 {
                next.set(next.get() + 1);
                match open_one(a.clone(), url.clone()).await {
                    Ok(ws) => socks.borrow_mut().push(ws),
                    Err(e) => {
                        failures.set(failures.get() + 1);
                        eprintln!("[sessions] socket failed: {e:#}");
                    }
                }
            }
        }));
    }
    for tk in tasks {
        tk.await?;
    }
    let opened_in = t0.elapsed();
    let open = socks.borrow().len();
    let status = get_json(&format!("{}/status", node.admin_url())).await?;
    let bound = status["sessions"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss1 = rss_kib(node.pid())?;
    let added = open.saturating_sub(1).max(1);
    let per_kib = (rss1 as f64 - rss0 as f64) / added as f64;
    let proj_gib = per_kib * 50_000.0 / (1024.0 * 1024.0);
    t.add(
        "idle WebSocket session RSS",
        format!("{per_kib:.1}"),
        "KiB/session",
        "",
        format!(
            "mailroom child (sled): {added} sockets added in {:.1} s (all bound to one connection by a trust ping with return_route all; node reports {bound} bound sessions), RSS {} -> {} MiB; open-files limit {limit}",
            opened_in.as_secs_f64(),
            rss0 / 1024,
            rss1 / 1024
        ),
    );
    t.add(
        "idle sessions RSS extrapolated to 50,000",
        format!("{proj_gib:.2}"),
        "GiB",
        "< 1 GiB",
        format!(
            "linear: {per_kib:.1} KiB x 50,000 (measured {added}); plus a {} MiB base. One shared connection: per-wallet connection records and registry keys are not counted",
            rss0 / 1024
        ),
    );
    socks.borrow_mut().clear();
    drop(node);
    Ok(())
}
