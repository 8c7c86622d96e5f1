//! Scenario `sessions`: RSS per idle bound WebSocket session.

use crate::{client::*, nodes::*, report::*, Opts};
use anyhow::{bail, Context, Result};
use mailroom::client::{Agent, WsClient, WsEvent};
use mailroom::didcomm::message::new_id;
use serde_json::json;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// 4: idle WebSocket sessions memory
// ---------------------------------------------------------------------------------------------

pub(crate) async fn sessions_memory(t: &mut Table, o: &Opts) -> Result<()> {
    // The loadgen and the node are separate processes, each holding one descriptor per
    // session under the same open-files cap (20,000 here, a hard limit): leave each 1,000 for
    // its own files (listeners, sled, the runtime, the admin client).
    let limit = open_files_limit();
    let n = o.sessions.min(limit.saturating_sub(1_000)).max(10);
    let node = ChildNode::start(None).await?;
    let mut wallets = onboard(&node.public_url(), 1).await?;
    let a = Rc::new(wallets.pop().context("wallet")?.agent);
    // Source addresses: more sockets than one address has ephemeral ports, spread evenly.
    let sources: Vec<IpAddr> = (2..=5).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))).collect();
    let open_one = |a: Rc<Agent>, url: String, from: IpAddr| async move {
        let mut ws = a.websocket_from(&url, from).await?;
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
    // Each open socket is held by a task that answers the node's pings (15 s heartbeat,
    // closed after 60 s without a frame): opening 19,000 takes longer than that.
    let closed = Rc::new(Cell::new(0usize));
    let keepers: Rc<RefCell<Vec<actix_rt::task::JoinHandle<()>>>> = Rc::new(RefCell::new(Vec::with_capacity(n)));
    let keep = |ws: WsClient, closed: Rc<Cell<usize>>| {
        actix_rt::spawn(async move {
            let mut ws = ws;
            loop {
                match ws.next(Duration::from_secs(24 * 3600)).await {
                    Ok(WsEvent::Envelope(_)) => {}
                    Ok(WsEvent::Closed(_)) | Err(_) => {
                        closed.set(closed.get() + 1);
                        return;
                    }
                }
            }
        })
    };
    // One socket first, so the per-session figure excludes one-time allocations.
    let first = open_one(a.clone(), node.ws_url(), sources[0]).await?;
    keepers.borrow_mut().push(keep(first, closed.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = rss_kib(node.pid())?;
    let t0 = Instant::now();
    let next = Rc::new(Cell::new(1usize));
    let failures = Rc::new(Cell::new(0usize));
    // RSS at each quarter of the way, to see that the growth is linear.
    let marks: Rc<RefCell<Vec<(usize, u64)>>> = Rc::new(RefCell::new(Vec::new()));
    let pid = node.pid();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (a, url, next, failures, closed) =
            (a.clone(), node.ws_url(), next.clone(), failures.clone(), closed.clone());
        let (keepers, marks, sources) = (keepers.clone(), marks.clone(), sources.clone());
        let deadline = t0 + Duration::from_secs(600);
        tasks.push(actix_rt::spawn(async move {
            while next.get() < n && Instant::now() < deadline && failures.get() < 50 {
                let i = next.get();
                next.set(i + 1);
                match open_one(a.clone(), url.clone(), sources[i % sources.len()]).await {
                    Ok(ws) => {
                        let open = {
                            let mut k = keepers.borrow_mut();
                            k.push(keep(ws, closed.clone()));
                            k.len()
                        };
                        if open % (n / 4).max(1) == 0 && open < n {
                            if let Ok(r) = rss_kib(pid) {
                                marks.borrow_mut().push((open, r));
                            }
                        }
                    }
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
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let rss1 = rss_kib(pid)?;
    let open = keepers.borrow().len() - closed.get();
    let status = get_json(&format!("{}/status", node.admin_url())).await?;
    let bound = status["sessions"].as_u64().unwrap_or(0);
    let added = open.saturating_sub(1).max(1);
    let per_kib = (rss1 as f64 - rss0 as f64) / added as f64;
    let proj_gib = per_kib * 50_000.0 / (1024.0 * 1024.0);
    let curve: Vec<String> = marks
        .borrow()
        .iter()
        .map(|(k, r)| format!("{k}: {} MiB", r / 1024))
        .collect();
    t.add(
        "idle WebSocket session RSS",
        format!("{per_kib:.1}"),
        "KiB/session",
        "<= 12",
        format!(
            "mailroom child (sled): {added} sockets added in {:.1} s from 127.0.0.2-127.0.0.5 ({} closed, {} failed; all bound to one connection by a trust ping with return_route all; node reports {bound} bound sessions), RSS {} -> {} MiB (on the way: {}); open-files limit {limit}",
            opened_in.as_secs_f64(),
            closed.get(),
            failures.get(),
            rss0 / 1024,
            rss1 / 1024,
            curve.join(", "),
        ),
    );
    t.add(
        "idle sessions RSS extrapolated to 50,000",
        format!("{proj_gib:.2}"),
        "GiB",
        "<= 0.6",
        format!(
            "linear from {added} sessions measured: {per_kib:.1} KiB x 50,000, plus a {} MiB base. One shared connection: per-wallet connection records and registry keys are not counted",
            rss0 / 1024
        ),
    );
    for k in keepers.borrow_mut().drain(..) {
        k.abort();
    }
    drop(node);
    Ok(())
}
