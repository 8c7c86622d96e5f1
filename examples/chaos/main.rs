//! The load driver and fault injector of `scripts/chaos.sh` (run it through the script, which
//! sets up PostgreSQL, the ports, the configs and nginx, and cleans up whatever happens).
//!
//!   chaos --spec WORK/spec.json --duration 60s --pg-restart "pg_ctlcluster ... restart"
//!
//! It starts one TCP proxy per ordered pair of nodes (each node's config reaches every peer's
//! cluster port through its own proxy, so the driver can cut the links of one node and leave
//! the others alone), starts the nodes (pid files where `scripts/cluster.sh down` finds them),
//! onboards wallets through the load balancer and then, for the set time, sends forwards from
//! several senders to wallets that are live (WebSocket, pickup 2.0 live mode), polling (pickup
//! 2.0 over HTTP) and offline-then-back, while it kills (-9) and restarts nodes, cuts and
//! restores a node's cluster links and restarts PostgreSQL, one fault at a time. Every forward
//! carries a unique content (`chaos-<n>`), so each delivery is matched to its send. After the
//! load, every wallet comes online and the driver waits (`--drain`) for everything answered
//! 2xx. It prints the table and exits 1 if a forward answered 2xx was never delivered (lost),
//! reached the wrong wallet, or a node died on its own; 2 if the run could not start.

mod book;
mod faults;
mod http;
mod nodes;
mod proxies;
mod report;
mod senders;
mod wallets;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mailroom::client::{onboard_any, Sender};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::Value;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::book::{Answer, Book, Kind, Sent, Shared, PREFIX};
use crate::faults::{run_faults, Ctx};
use crate::http::{all_ready_and_linked, get_json, wait_until};
use crate::nodes::Nodes;
use crate::proxies::Proxies;
use crate::report::{fmt_opt, ms, pct};
use crate::senders::{accepted, send_one, Targets};
use crate::wallets::{live, offline_then_back, polling, Flags, Wallet};

#[derive(Parser, Debug)]
#[command(about = "mailroom chaos driver (run through scripts/chaos.sh)")]
struct Args {
    /// JSON written by scripts/chaos.sh: public URL, nodes, proxies, binary.
    #[arg(long)]
    spec: PathBuf,
    /// How long the load (and the faults) last, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Forwards per second, all senders together.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Wallets in WebSocket live mode.
    #[arg(long, default_value_t = 4)]
    live: usize,
    /// Wallets polling with pickup 2.0 over HTTP.
    #[arg(long, default_value_t = 3)]
    polling: usize,
    /// Wallets that go offline and come back (alternately over WebSocket and HTTP).
    #[arg(long, default_value_t = 3)]
    offline: usize,
    /// Mean time between the end of one fault's healing and the next fault.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_gap: Duration,
    /// Fault kinds, taken in turn in a shuffled order: kill, cut, pg.
    #[arg(long, default_value = "kill,cut,pg")]
    faults: String,
    /// After the load: how long to wait for every accepted forward to be delivered.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain: Duration,
    /// How long a fault is held before it is repaired: random, from a third of this to this
    /// (a cut longer than `failure_timeout_ms`, 3 s by default, makes the peers declare each
    /// other down).
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    hold: Duration,
    /// A fault not healed this long after its repair fails the run.
    #[arg(long, default_value = "45s", value_parser = parse_duration)]
    heal_within: Duration,
    /// Shell command that restarts PostgreSQL.
    #[arg(long)]
    pg_restart: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 20s, 2m)"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

#[derive(Deserialize, Clone, Debug)]
struct NodeSpec {
    id: String,
    listen: String,
    admin: String,
    /// This node's own config file (its peers' cluster addresses are proxies).
    config: PathBuf,
}

#[derive(Deserialize, Clone, Debug)]
struct ProxySpec {
    from: String,
    to: String,
    listen: SocketAddr,
    target: SocketAddr,
}

#[derive(Deserialize, Clone, Debug)]
struct Spec {
    public_url: String,
    bin: PathBuf,
    run_dir: PathBuf,
    nodes: Vec<NodeSpec>,
    proxies: Vec<ProxySpec>,
    /// Noted in the table.
    lease_ms: u64,
}

async fn run(args: Args) -> Result<i32> {
    let spec: Spec =
        serde_json::from_slice(&std::fs::read(&args.spec).context("read --spec")?).context("parse --spec")?;
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    let args = Rc::new(Args {
        seed: Some(seed),
        ..args
    });
    let started = Instant::now();
    let proxies = Rc::new(Proxies::start(&spec.proxies)?);
    let nodes = Rc::new(RefCell::new(Nodes {
        spec: spec.clone(),
        children: HashMap::new(),
        died: Vec::new(),
    }));
    for n in &spec.nodes {
        nodes.borrow_mut().start(&n.id)?;
    }
    let nodes_spec = spec.nodes.clone();
    wait_until("the nodes ready and linked", Duration::from_secs(60), || {
        all_ready_and_linked(&nodes_spec)
    })
    .await?;
    let public = spec.public_url.trim_end_matches('/').to_string();
    wait_until("the load balancer", Duration::from_secs(30), || {
        let u = format!("{public}/invitation");
        async move { matches!(get_json(&u).await, Ok((200, _))) }
    })
    .await?;
    eprintln!(
        "[chaos] cluster up: {} nodes behind {public} after {:.1} s; seed {seed}",
        spec.nodes.len(),
        started.elapsed().as_secs_f64()
    );

    // Wallets, onboarded through the load balancer (every step may land on another node).
    let (_, inv) = get_json(&format!("{public}/invitation")).await?;
    let target = mailroom::probe::Target::from_invitation(inv["invitation"].clone(), None, Duration::from_secs(20))
        .map_err(|e| anyhow!("{e}"))?;
    let mut wallets = Vec::new();
    let kinds = std::iter::repeat(Kind::Live)
        .take(args.live)
        .chain(std::iter::repeat(Kind::Polling).take(args.polling))
        .chain(std::iter::repeat(Kind::Offline).take(args.offline));
    for (idx, kind) in kinds.enumerate() {
        let w = onboard_any(&target)
            .await
            .with_context(|| format!("onboard wallet {idx}"))?;
        let (agent, k, routing) = (
            w.agent.with_timeout(Duration::from_secs(5)),
            w.key,
            w.grant.routing_keys,
        );
        wallets.push(Rc::new(Wallet {
            idx,
            kind,
            agent,
            key: k.verkey(),
            routing,
            reconnects: Cell::new(0),
        }));
    }
    if wallets.is_empty() {
        bail!("no wallets");
    }
    let targets = Rc::new(Targets {
        keys: wallets.iter().map(|w| (w.key.clone(), w.routing.clone())).collect(),
    });
    let book: Shared = Rc::new(RefCell::new(Book::default()));
    let flags = Rc::new(Flags {
        stop: Cell::new(false),
        draining: Cell::new(false),
    });
    let ws_url = mailroom::config::ws_url(&public);
    let mut tasks = Vec::new();
    for w in &wallets {
        let (w, book, flags, ws_url) = (w.clone(), book.clone(), flags.clone(), ws_url.clone());
        tasks.push(match w.kind {
            Kind::Live => actix_rt::spawn(live(w, ws_url, book, flags, None)),
            Kind::Polling => actix_rt::spawn(polling(w, book, flags, None)),
            Kind::Offline => {
                let s = seed ^ (w.idx as u64) << 8;
                actix_rt::spawn(offline_then_back(w, ws_url, book, flags, s))
            }
        });
    }
    eprintln!(
        "[chaos] {} wallets onboarded after {:.1} s",
        wallets.len(),
        started.elapsed().as_secs_f64()
    );
    // Let the live wallets bind their sockets before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t0 = Instant::now();
    let end = t0 + args.duration;
    let ctx = Rc::new(Ctx {
        spec: spec.clone(),
        book: book.clone(),
        targets: targets.clone(),
        live_wallets: wallets.iter().filter(|w| w.kind == Kind::Live).map(|w| w.idx).collect(),
        t0,
    });
    let faults = actix_rt::spawn(run_faults(
        ctx.clone(),
        nodes.clone(),
        proxies.clone(),
        args.clone(),
        end,
    ));
    let mut senders = Vec::new();
    let period = Duration::from_secs_f64(args.senders.max(1) as f64 / args.rate.max(0.1));
    for j in 0..args.senders.max(1) {
        let (book, targets, public) = (book.clone(), targets.clone(), public.clone());
        let seed = seed ^ (j as u64 + 1) << 16;
        let n_senders = args.senders.max(1) as u32;
        senders.push(actix_rt::spawn(async move {
            let sender = Sender::new();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut next = t0 + period * j as u32 / n_senders;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                next += period;
                let w = rng.gen_range(0..targets.keys.len());
                send_one(&book, &sender, &targets, format!("{public}/"), w, false);
            }
        }));
    }
    for s in senders {
        let _ = s.await;
    }
    let load_secs = t0.elapsed();
    let faults = faults.await.unwrap_or_default();
    eprintln!("[chaos] {:>6.1}s load over; faults over", t0.elapsed().as_secs_f64());
    // Answers still on the way.
    let _ = wait_until("answers", Duration::from_secs(15), || {
        let b = book.clone();
        async move { b.borrow().in_flight == 0 }
    })
    .await;
    // Drain: everyone online; wait for every accepted forward.
    flags.draining.set(true);
    let drain_start = Instant::now();
    let drained = wait_until("drain", args.drain, || {
        let b = book.clone();
        async move {
            b.borrow()
                .sent
                .iter()
                .all(|s| !accepted(s) || s.first_delivery.is_some())
        }
    })
    .await
    .ok();
    eprintln!("[chaos] {:>6.1}s drain over", t0.elapsed().as_secs_f64());
    // A moment more to see late duplicates.
    tokio::time::sleep(Duration::from_secs(1)).await;
    flags.stop.set(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    eprintln!("[chaos] {:>6.1}s wallets stopped", t0.elapsed().as_secs_f64());
    nodes.borrow_mut().check();

    // ---- the table ----
    let b = book.borrow();
    let load: Vec<&Sent> = b.sent.iter().filter(|s| !s.probe).collect();
    let probes: Vec<&Sent> = b.sent.iter().filter(|s| s.probe).collect();
    let mut by_status: HashMap<String, u64> = HashMap::new();
    for s in &load {
        let k = match &s.answer {
            Answer::Status(c) if (200..300).contains(c) => continue,
            Answer::Status(c) => c.to_string(),
            Answer::Error(e) if e.contains("imeout") => "timeout".into(),
            Answer::Error(_) => "connection error".into(),
            Answer::Pending => "no answer".into(),
        };
        *by_status.entry(k).or_default() += 1;
    }
    let count = |v: &[&Sent], f: &dyn Fn(&Sent) -> bool| v.iter().filter(|s| f(s)).count();
    let sent_n = load.len();
    let acc_n = count(&load, &accepted);
    let deliv_acc = count(&load, &|s| accepted(s) && s.first_delivery.is_some());
    let lost: Vec<(usize, &Sent)> = b
        .sent
        .iter()
        .enumerate()
        .filter(|(_, s)| accepted(s) && s.first_delivery.is_none())
        .collect();
    let dup = count(&load, &|s| s.deliveries > 1);
    let dup_extra: u32 = load.iter().map(|s| s.deliveries.saturating_sub(1)).sum();
    let deliv_unacc = count(&load, &|s| !accepted(s) && s.first_delivery.is_some());
    let mut refused: Vec<String> = by_status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    refused.sort();
    let lat = |kind: Option<Kind>| -> Vec<Duration> {
        let mut v: Vec<Duration> = load
            .iter()
            .filter(|s| accepted(s) && kind.map_or(true, |k| wallets[s.wallet].kind == k))
            .filter_map(|s| Some(s.first_delivery?.saturating_duration_since(s.answered_at?)))
            .collect();
        v.sort();
        v
    };
    let machine = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    println!();
    println!(
        "mailroom chaos: {} nodes on PostgreSQL behind nginx; {:.0} s of load at {} forwards/s from {} senders to {} wallets ({} live over WebSocket, {} polling over HTTP, {} offline-then-back); {} faults; lease_ms {}; seed {seed}; load average {machine} on {cores} cores at the end",
        spec.nodes.len(),
        load_secs.as_secs_f64(),
        args.rate,
        args.senders,
        wallets.len(),
        args.live,
        args.polling,
        args.offline,
        faults.len(),
        spec.lease_ms,
    );
    println!();
    println!("| forwards | count | |");
    println!("| --- | ---: | --- |");
    println!("| sent | {sent_n} | |");
    println!("| accepted (2xx) | {acc_n} | |");
    println!(
        "| not accepted | {} | {} (the sender knows: not the mediator's to keep) |",
        sent_n - acc_n,
        if refused.is_empty() {
            "-".to_string()
        } else {
            refused.join(", ")
        }
    );
    println!("| delivered (of accepted) | {deliv_acc} | |");
    println!(
        "| **lost** (accepted, never delivered) | **{}** | must be 0 |",
        lost.len()
    );
    println!(
        "| duplicated | {dup} ({dup_extra} extra deliveries) | allowed: at-least-once (ARCHITECTURE.md, Delivery guarantees) |"
    );
    println!(
        "| delivered though not answered 2xx | {deliv_unacc} | allowed (the commit happened, the answer was lost) |"
    );
    println!(
        "| delivered to the wrong wallet / undecryptable | {} / {} | must be 0 |",
        b.misdelivered, b.undecryptable
    );
    println!(
        "| probes (forwards posted straight to a repaired node) | {} sent, {} accepted, {} delivered | counted in lost too |",
        probes.len(),
        count(&probes, &accepted),
        count(&probes, &|s| accepted(s) && s.first_delivery.is_some())
    );
    println!();
    println!("| delivery latency (2xx to first delivery) | n | p50 | p99 | max | duplicated |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, k) in [
        ("all wallets", None),
        (Kind::Live.name(), Some(Kind::Live)),
        (Kind::Polling.name(), Some(Kind::Polling)),
        (Kind::Offline.name(), Some(Kind::Offline)),
    ] {
        let v = lat(k);
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(&v, 50.0)),
            ms(pct(&v, 99.0)),
            ms(v.last().copied().unwrap_or_default()),
            load.iter()
                .filter(|s| s.deliveries > 1 && k.map_or(true, |k| wallets[s.wallet].kind == k))
                .count()
        );
    }
    println!();
    println!(
        "| # | at | fault | held | healed: all ready, all links up | healed: forward to it delivered | sent during it: accepted / sent, duplicated | note |"
    );
    println!("| ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |");
    for (i, f) in faults.iter().enumerate() {
        let during: Vec<&Sent> = load.iter().copied().filter(|s| s.fault == Some(i)).collect();
        println!(
            "| {} | {:.1} s | {} | {:.1} s | {} | {} | {} / {}, {} | {} |",
            i + 1,
            f.at.as_secs_f64(),
            f.describe(),
            f.held.as_secs_f64(),
            fmt_opt(f.links_healed),
            fmt_opt(f.forward_healed),
            count(&during, &accepted),
            during.len(),
            count(&during, &|s| s.deliveries > 1),
            f.note
        );
    }
    println!();
    let sockets = |k: Kind| -> u64 { wallets.iter().filter(|w| w.kind == k).map(|w| w.reconnects.get()).sum() };
    println!(
        "WebSocket sessions opened: {} by the {} live wallets (so {} reconnections after a drop), {} by the offline-then-back ones; drain after the load: {}",
        sockets(Kind::Live),
        args.live,
        sockets(Kind::Live).saturating_sub(args.live as u64),
        sockets(Kind::Offline),
        match drained {
            Some(d) => format!("everything accepted delivered {:.1} s after the load ended", d.as_secs_f64()),
            None => format!("NOT complete after {:.0} s", drain_start.elapsed().as_secs_f64()),
        }
    );
    let mut rc = 0;
    if !lost.is_empty() {
        rc = 1;
        println!("FAIL: {} forwards answered 2xx were never delivered:", lost.len());
        for (i, s) in lost.iter().take(50) {
            let at = s.at.saturating_duration_since(t0);
            let near = match s.fault {
                Some(f) => format!("during fault {} ({})", f + 1, faults[f].describe()),
                None => match faults.iter().enumerate().find(|(_, f)| f.at >= at) {
                    Some((k, f)) => format!(
                        "{:.2} s before fault {} ({})",
                        (f.at - at).as_secs_f64(),
                        k + 1,
                        f.describe()
                    ),
                    None => "after the last fault".into(),
                },
            };
            println!(
                "  {PREFIX}{i}: {}wallet {} ({}), sent at {:.2} s, {near}, answered {:?} {:.2} s later",
                if s.probe { "probe, " } else { "" },
                s.wallet,
                wallets[s.wallet].kind.name(),
                at.as_secs_f64(),
                s.answer,
                s.answered_at
                    .map(|a| a.saturating_duration_since(s.at).as_secs_f64())
                    .unwrap_or(0.0)
            );
        }
    }
    if b.misdelivered > 0 || b.undecryptable > 0 {
        rc = 1;
        println!("FAIL: messages reached the wrong wallet or could not be opened");
    }
    let died = &nodes.borrow().died;
    if !died.is_empty() {
        rc = 1;
        for (id, st) in died {
            println!("FAIL: node {id} exited on its own ({st}); see its log");
        }
    }
    if faults
        .iter()
        .any(|f| f.links_healed.is_none() || f.forward_healed.is_none())
    {
        rc = 1;
        println!("FAIL: a fault did not heal");
    }
    if rc == 0 {
        println!("PASS: lost 0 of {} accepted", acc_n + count(&probes, &accepted));
    }
    Ok(rc)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match actix_rt::System::new().block_on(run(args)) {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("[chaos] could not run: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
