//! Scenarios `peer-backlog` and `peer-fanout`: delivery (not ingest) against any DIDComm v1
//! mediator named by its invitation URL — mailroom, Credo's or ACA-Py's — so
//! `scripts/bench.sh peers` compares the three on the same loads.
//!
//! - backlog: one wallet comes back to LOADGEN_BACKLOG (10,000) queued messages and drains
//!   them: pickup 2.0 over HTTP (delivery-request of LOADGEN_BACKLOG_BATCH, messages-received),
//!   or, on a mediator without a pickup protocol (ACA-Py 1.7), a WebSocket opened with
//!   `return_route: all`, on which the mediator flushes the queue (implicit delivery).
//! - fan-out: LOADGEN_FANOUT_WALLETS (100) wallets hold a WebSocket each (pickup 2.0 live mode,
//!   or implicit delivery as above), LOADGEN_SENDERS senders POST forwards spread over them for
//!   the LOADGEN_SECS window; each delivery is acknowledged on its socket (messages-received).
//!   Delivered msg/s counts from the first POST to the last delivery; latency is POST sent ->
//!   message read by its wallet.
//!
//! Both take the mediator from LOADGEN_PEER_URL / LOADGEN_PEER_NAME / LOADGEN_PEER_PID (as
//! `peer`) and LOADGEN_PEER_WS (its ws URL when the invitation names none). Each message is counted once by content, so a duplicate is reported, not counted.

use crate::client::{
    build_forwards, build_request, onboard_any, pickup, type_name, RawConn, Recipient, V2Pack, Wallet,
};
use crate::report::{ms, pct, Table};
use crate::{env_num, Opts};
use anyhow::{anyhow, bail, Context, Result};
use mailroom::client::{delivery_envelopes, WsClient, WsEvent};
use mailroom::probe::Target;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How a wallet receives on this mediator.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Flavour {
    /// messagepickup 2.0 (delivery-request / live-delivery-change, messages-received).
    Pickup2,
    /// No pickup protocol: a socket opened with return_route all gets the raw messages.
    Implicit,
}

impl Flavour {
    fn label(self) -> &'static str {
        match self {
            Flavour::Pickup2 => "pickup 2.0",
            Flavour::Implicit => "implicit return-route (no pickup protocol)",
        }
    }
}

struct Peer {
    name: String,
    target: Target,
    pid: Option<String>,
}

async fn peer() -> Result<Peer> {
    let url =
        std::env::var("LOADGEN_PEER_URL").context("LOADGEN_PEER_URL (the mediator's invitation URL) is not set")?;
    let name = std::env::var("LOADGEN_PEER_NAME").unwrap_or_else(|_| "peer".into());
    let pid = std::env::var("LOADGEN_PEER_PID").ok().filter(|p| !p.trim().is_empty());
    let ws = std::env::var("LOADGEN_PEER_WS").ok().filter(|w| !w.trim().is_empty());
    let target = Target::from_url(&url, ws.as_deref(), Duration::from_secs(30))
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(Peer { name, target, pid })
}

/// The endpoint URL's socket address, `host:port` and path (for raw HTTP/1.1 requests).
pub(crate) fn socket_addr(endpoint: &str) -> Result<(SocketAddr, String, String)> {
    let ep = url::Url::parse(endpoint).with_context(|| format!("endpoint {endpoint}"))?;
    let host = format!(
        "{}:{}",
        ep.host_str().context("endpoint without host")?,
        ep.port_or_known_default().context("endpoint without port")?
    );
    let addr = host
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{host} does not resolve"))?;
    Ok((addr, host, ep.path().to_string()))
}

/// pickup 2.0 status-request over HTTP: the mediator's flavour and the wallet's count.
async fn probe_flavour(w: &Wallet) -> (Flavour, Option<u64>) {
    match w.agent.request(&pickup("status-request", json!({}))).await {
        Ok(Some(m)) if type_name(&m) == "status" => (Flavour::Pickup2, m["message_count"].as_u64()),
        _ => (Flavour::Implicit, None),
    }
}

fn content_index(m: &Value, prefix: &str) -> Option<usize> {
    m["content"]
        .as_str()?
        .strip_prefix(prefix)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// POSTs every request with `senders` connections, until all are sent or `deadline`; returns
/// per request the instant it was sent when it was answered 2xx.
async fn post_all(
    addr: SocketAddr,
    reqs: Rc<Vec<Vec<u8>>>,
    senders: usize,
    deadline: Instant,
) -> Result<(Vec<Option<Instant>>, u64)> {
    let sent: Rc<RefCell<Vec<Option<Instant>>>> = Rc::new(RefCell::new(vec![None; reqs.len()]));
    let next = Rc::new(std::cell::Cell::new(0usize));
    let mut tasks = Vec::new();
    for _ in 0..senders {
        let (reqs, next, sent) = (reqs.clone(), next.clone(), sent.clone());
        tasks.push(actix_rt::spawn(async move {
            let mut c = RawConn::new(addr);
            let mut refused = 0u64;
            loop {
                let i = next.get();
                if i >= reqs.len() || Instant::now() >= deadline {
                    break;
                }
                next.set(i + 1);
                let t0 = Instant::now();
                match c.send(&reqs[i]).await {
                    Ok((s, _)) if (200..300).contains(&s) => sent.borrow_mut()[i] = Some(t0),
                    _ => refused += 1,
                }
            }
            refused
        }));
    }
    let mut refused = 0;
    for t in tasks {
        refused += t.await?;
    }
    let sent = Rc::try_unwrap(sent).map_err(|_| anyhow!("senders still hold the send log"))?;
    Ok((sent.into_inner(), refused))
}

/// Opens a receiving socket: live mode on pickup 2.0, a return-route trust ping otherwise.
async fn receiving_socket(w: &Wallet, ws_url: &str, flavour: Flavour) -> Result<WsClient> {
    let mut ws = w.agent.websocket(ws_url).await?;
    let first = match flavour {
        Flavour::Pickup2 => pickup("live-delivery-change", json!({ "live_delivery": true })),
        Flavour::Implicit => json!({
            "@type": "https://didcomm.org/trust_ping/1.0/ping",
            "@id": mailroom::didcomm::message::new_id(),
            "response_requested": true,
            "~transport": { "return_route": "all" },
        }),
    };
    ws.send_envelope(w.agent.pack(&first)?, true).await?;
    Ok(ws)
}

/// What one wallet's socket read: for each message of ours, its index, and when it was read.
#[derive(Default)]
struct Received {
    got: Vec<(usize, Instant)>,
    frames: usize,
    acks_sent: usize,
}

/// Reads `w`'s socket until `want` of its messages arrived, nothing came for `stall`, or
/// `until`; acknowledges each pickup 2.0 delivery on the socket.
async fn read_socket(
    w: &Wallet,
    ws: &mut WsClient,
    prefix: &str,
    want: usize,
    stall: Duration,
    until: Instant,
) -> Result<Received> {
    let mut r = Received::default();
    while r.got.len() < want {
        let wait = stall.min(until.saturating_duration_since(Instant::now()));
        if wait.is_zero() {
            break;
        }
        let env = match ws.next(wait).await {
            Ok(WsEvent::Envelope(e)) => e,
            Ok(WsEvent::Closed(why)) => bail!("the mediator closed the socket: {why:?}"),
            Err(_) => break,
        };
        let at = Instant::now();
        r.frames += 1;
        let (m, _) = match w.agent.unpack(&env) {
            Ok(u) => u,
            Err(_) => continue,
        };
        if type_name(&m) == "delivery" {
            let mut ids = Vec::new();
            for (id, inner) in delivery_envelopes(&m)? {
                ids.push(id);
                if let Ok((msg, _)) = w.agent.unpack(&inner) {
                    if let Some(i) = content_index(&msg, prefix) {
                        r.got.push((i, at));
                    }
                }
            }
            let ack = pickup("messages-received", json!({ "message_id_list": ids }));
            ws.send_envelope(w.agent.pack(&ack)?, true).await?;
            r.acks_sent += 1;
        } else if let Some(i) = content_index(&m, prefix) {
            r.got.push((i, at));
        }
    }
    Ok(r)
}

pub(crate) async fn peer_backlog(t: &mut Table, o: &Opts) -> Result<()> {
    let p = peer().await?;
    let n: usize = env_num("LOADGEN_BACKLOG", 10_000usize).clamp(10, 100_000);
    let batch: u64 = env_num("LOADGEN_BACKLOG_BATCH", 100u64).clamp(1, 1_000);
    let name = &p.name;
    let (mut wallets, endpoint) = onboard_any(&p.target, 1).await?;
    let w = wallets.pop().context("wallet")?;
    let (flavour, before) = probe_flavour(&w).await;
    eprintln!("[peer-backlog {name}] {}; queueing {n} forwards", flavour.label());
    let (addr, host, path) = socket_addr(&endpoint)?;
    let prefix = format!("backlog-{name}");
    let (envs, _) = build_forwards(
        &[Recipient::V1 {
            key: w.key.clone(),
            routing: w.routing.clone(),
        }],
        n,
        &prefix,
        V2Pack::Anon(mailroom::didcomm::v2::jwe::Enc::A256Gcm),
    )?;
    let reqs = Rc::new(envs.iter().map(|e| build_request(&host, &path, e)).collect::<Vec<_>>());
    drop(envs);
    let t_fill = Instant::now();
    let (sent, refused) = post_all(addr, reqs, o.senders.min(16), Instant::now() + Duration::from_secs(600)).await?;
    let fill = t_fill.elapsed();
    let accepted = sent.iter().filter(|s| s.is_some()).count();
    if accepted == 0 {
        bail!("no forward accepted ({refused} refused)");
    }
    // The queue must hold them before the wallet "comes back" (pickup: the count says so).
    if flavour == Flavour::Pickup2 {
        let want = before.unwrap_or(0) + accepted as u64;
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let c = w
                .agent
                .request(&pickup("status-request", json!({})))
                .await?
                .and_then(|m| m["message_count"].as_u64())
                .unwrap_or(0);
            if c >= want {
                break;
            }
            if Instant::now() > until {
                bail!("only {c} of {want} queued 60 s after the last forward was accepted");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "[peer-backlog {name}] {accepted} queued in {:.1} s; draining",
        fill.as_secs_f64()
    );
    let t0 = Instant::now();
    let mut seen: HashSet<usize> = HashSet::new();
    let mut dups = 0usize;
    let mut rounds = 0usize;
    let stall = Duration::from_secs(15);
    match flavour {
        Flavour::Pickup2 => {
            let until = t0 + Duration::from_secs(600);
            while seen.len() < accepted && Instant::now() < until {
                let r = w
                    .agent
                    .request(&pickup("delivery-request", json!({ "limit": batch })))
                    .await?
                    .context("no answer to delivery-request")?;
                rounds += 1;
                if type_name(&r) != "delivery" {
                    break; // a status: nothing left
                }
                let mut ids = Vec::new();
                for (id, m) in w.agent.open_delivery(&r)? {
                    ids.push(id);
                    if let Some(i) = content_index(&m, &prefix) {
                        if !seen.insert(i) {
                            dups += 1;
                        }
                    }
                }
                w.agent
                    .request(&pickup("messages-received", json!({ "message_id_list": ids })))
                    .await?;
            }
        }
        Flavour::Implicit => {
            let ws_url = p
                .target
                .ws
                .clone()
                .context("no WebSocket endpoint for implicit delivery")?;
            let mut ws = receiving_socket(&w, &ws_url, flavour).await?;
            let r = read_socket(&w, &mut ws, &prefix, accepted, stall, t0 + Duration::from_secs(600)).await?;
            rounds = r.frames;
            for (i, _) in r.got {
                if !seen.insert(i) {
                    dups += 1;
                }
            }
            ws.close().await;
        }
    }
    let drain = t0.elapsed();
    let drained = seen.len();
    let value = if drained == accepted {
        format!("{:.2}", drain.as_secs_f64())
    } else {
        format!("{drained} of {accepted}")
    };
    t.add(
        &format!("backlog drain, {name}"),
        value,
        if drained == accepted { "s" } else { "msgs" },
        "< 2 s (10,000)",
        format!(
            "{accepted} queued for one wallet ({refused} refused; filled in {:.1} s), drained by {} in {:.2} s = {:.0} msg/s; {rounds} {}; {dups} duplicate(s)",
            fill.as_secs_f64(),
            flavour.label(),
            drain.as_secs_f64(),
            drained as f64 / drain.as_secs_f64(),
            if flavour == Flavour::Pickup2 {
                format!("delivery-requests of {batch} over HTTP, each acknowledged")
            } else {
                "socket frames".into()
            }
        ),
    );
    println!(
        "peer-backlog name={name} flavour={flavour:?} queued={accepted} drained={drained} secs={:.3} dups={dups}",
        drain.as_secs_f64()
    );
    Ok(())
}

pub(crate) async fn peer_fanout(t: &mut Table, o: &Opts) -> Result<()> {
    let p = peer().await?;
    let name = p.name.clone();
    let nw: usize = env_num("LOADGEN_FANOUT_WALLETS", 100usize).clamp(1, 1_000);
    let n: usize = env_num("LOADGEN_FANOUT_MSGS", 20_000usize).clamp(nw, 1_000_000);
    let ws_url = p.target.ws.clone().context("the mediator has no WebSocket endpoint")?;
    eprintln!("[peer-fanout {name}] onboarding {nw} wallets");
    let (wallets, endpoint) = onboard_any(&p.target, nw).await?;
    let (flavour, _) = probe_flavour(&wallets[0]).await;
    let (addr, host, path) = socket_addr(&endpoint)?;
    let prefix = format!("fan-{name}");
    let targets: Vec<Recipient> = wallets
        .iter()
        .map(|w| Recipient::V1 {
            key: w.key.clone(),
            routing: w.routing.clone(),
        })
        .collect();
    let (envs, _) = build_forwards(
        &targets,
        n,
        &prefix,
        V2Pack::Anon(mailroom::didcomm::v2::jwe::Enc::A256Gcm),
    )?;
    let reqs = Rc::new(envs.iter().map(|e| build_request(&host, &path, e)).collect::<Vec<_>>());
    drop(envs);
    // Message i goes to wallet i % nw (build_forwards spreads round-robin).
    let per_wallet = |k: usize| (n + nw - 1 - k) / nw;
    let mut sockets = Vec::with_capacity(nw);
    for w in &wallets {
        let mut ws = receiving_socket(w, &ws_url, flavour).await?;
        // The first frame answers the socket's opening message (status or ping response).
        match ws.next(Duration::from_secs(30)).await? {
            WsEvent::Envelope(_) => {}
            WsEvent::Closed(r) => bail!("socket closed at open: {r:?}"),
        }
        sockets.push(ws);
    }
    eprintln!(
        "[peer-fanout {name}] {nw} sockets in {}; {} senders for {} s",
        flavour.label(),
        o.senders,
        o.secs
    );
    let wallets = Rc::new(wallets);
    let stall = Duration::from_secs(if name == "mailroom" { 10 } else { 30 });
    // Readers stop at the end of the window plus LOADGEN_FANOUT_DRAIN_SECS (60): a mediator
    // slower than its ingest is reported with what it delivered by then.
    let drain_secs: u64 = env_num("LOADGEN_FANOUT_DRAIN_SECS", 60u64).clamp(1, 600);
    let until = Instant::now() + Duration::from_secs(o.secs + drain_secs);
    let mut readers = Vec::new();
    for (k, mut ws) in sockets.into_iter().enumerate() {
        let (wallets, prefix) = (wallets.clone(), prefix.clone());
        let want = per_wallet(k);
        readers.push(actix_rt::spawn(async move {
            let r = read_socket(&wallets[k], &mut ws, &prefix, want, stall, until).await;
            ws.close().await;
            r
        }));
    }
    let cpu0 = (
        p.pid.as_deref().map(crate::nodes::cpu_secs).transpose().ok().flatten(),
        crate::nodes::cpu_secs("self").ok(),
    );
    let t0 = Instant::now();
    let (sent, refused) = post_all(addr, reqs, o.senders, t0 + Duration::from_secs(o.secs)).await?;
    let posted = t0.elapsed();
    let accepted = sent.iter().filter(|s| s.is_some()).count();
    // Readers stop when they have all theirs, or after `stall` without a frame: the messages
    // not accepted (window over) never come.
    let mut seen: HashSet<usize> = HashSet::new();
    let (mut dups, mut lat, mut last, mut acks) = (0usize, Vec::new(), t0, 0usize);
    let mut reader_errors = Vec::new();
    for r in readers {
        match r.await? {
            Ok(rec) => {
                acks += rec.acks_sent;
                for (i, at) in rec.got {
                    if !seen.insert(i) {
                        dups += 1;
                        continue;
                    }
                    if let Some(Some(s)) = sent.get(i) {
                        lat.push(at.saturating_duration_since(*s).as_micros() as u64);
                    }
                    last = last.max(at);
                }
            }
            Err(e) => reader_errors.push(e.to_string()),
        }
    }
    let cpu1 = (
        p.pid.as_deref().map(crate::nodes::cpu_secs).transpose().ok().flatten(),
        crate::nodes::cpu_secs("self").ok(),
    );
    let span = (last - t0).as_secs_f64().max(1e-3);
    let delivered = seen.len();
    let rate = delivered as f64 / span;
    lat.sort_unstable();
    let (p50, p99) = (pct(&lat, 0.50), pct(&lat, 0.99));
    let med_cores = match (cpu0.0, cpu1.0) {
        (Some(a), Some(b)) => format!("{:.2}", (b - a) / span),
        _ => "-".into(),
    };
    let gen_cores = match (cpu0.1, cpu1.1) {
        (Some(a), Some(b)) => format!("{:.2}", (b - a) / span),
        _ => "-".into(),
    };
    t.add(
        &format!("live fan-out to {nw} wallets, {name}"),
        format!("{rate:.0}"),
        "msg/s",
        ">= 5,000 (mailroom)",
        format!(
            "{}: {accepted} forwards accepted in {:.1} s ({refused} refused), {delivered} delivered (each once: {dups} duplicates) by {:.1} s, {acks} acknowledgements sent; latency POST -> read p50 {} ms p99 {} ms; mediator {med_cores} cores, load generator {gen_cores} cores{}",
            flavour.label(),
            posted.as_secs_f64(),
            span,
            ms(p50),
            ms(p99),
            if reader_errors.is_empty() {
                String::new()
            } else {
                format!("; socket errors: {}", reader_errors.join("; "))
            }
        ),
    );
    println!(
        "peer-fanout name={name} flavour={flavour:?} wallets={nw} accepted={accepted} delivered={delivered} rate={rate:.1} p50_ms={} p99_ms={} dups={dups} acks={acks} mediator_cores={med_cores} loadgen_cores={gen_cores}",
        ms(p50),
        ms(p99)
    );
    Ok(())
}
