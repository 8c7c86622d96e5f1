//! The faults, one at a time: kill -9 and restart a node, cut and restore its cluster links,
//! restart PostgreSQL; after each, how long the cluster takes to heal and a probe forward to reach
//! its wallet.

use std::cell::RefCell;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use mailroom::client::Sender;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::book::Shared;
use crate::http::wait_healed;
use crate::nodes::Nodes;
use crate::proxies::Proxies;
use crate::report::fmt_opt;
use crate::senders::{accepted, send_one, Targets};
use crate::{Args, Spec};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum FaultKind {
    Kill,
    Cut,
    Pg,
}

pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    pub(crate) node: Option<String>,
    pub(crate) at: Duration,
    pub(crate) held: Duration,
    /// From the repair to: every node ready and every link up (per /status).
    pub(crate) links_healed: Option<Duration>,
    /// From the repair to: a forward posted to the affected node (any node for PostgreSQL)
    /// answered 2xx and delivered to a live wallet.
    pub(crate) forward_healed: Option<Duration>,
    pub(crate) note: String,
}

impl Fault {
    pub(crate) fn describe(&self) -> String {
        describe(self.kind, self.node.as_deref())
    }
}

pub(crate) fn describe(kind: FaultKind, node: Option<&str>) -> String {
    match kind {
        FaultKind::Kill => format!("kill -9 {}, restart", node.unwrap_or("?")),
        FaultKind::Cut => format!("cut {}'s cluster links, restore", node.unwrap_or("?")),
        FaultKind::Pg => "restart PostgreSQL".to_string(),
    }
}

/// Runs a shell command off the event loop.
pub(crate) async fn shell(cmd: &str) -> Result<()> {
    let cmd = cmd.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let r = Command::new("sh").arg("-c").arg(&cmd).output();
        let _ = tx.send(r.map_err(anyhow::Error::from).and_then(|o| {
            if o.status.success() {
                Ok(())
            } else {
                Err(anyhow!(
                    "{cmd}: {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ))
            }
        }));
    });
    rx.await.map_err(|_| anyhow!("shell thread gone"))?
}

pub(crate) struct Ctx {
    pub(crate) spec: Spec,
    pub(crate) book: Shared,
    pub(crate) targets: Rc<Targets>,
    pub(crate) live_wallets: Vec<usize>,
    pub(crate) t0: Instant,
}

/// After a repair: probes the affected node(s) with forwards to live wallets until one is
/// answered 2xx and delivered. Returns the time from `from`.
pub(crate) async fn probe_forward(ctx: &Ctx, node: Option<&str>, from: Instant, within: Duration) -> Option<Duration> {
    let sender = Sender::new();
    let urls: Vec<String> = ctx
        .spec
        .nodes
        .iter()
        .filter(|n| node.map_or(true, |id| id == n.id))
        .map(|n| format!("http://{}/", n.listen))
        .collect();
    let mut rng = StdRng::from_entropy();
    let mut probes: Vec<usize> = Vec::new();
    let deadline = from + within;
    let mut k = 0usize;
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        {
            let b = ctx.book.borrow();
            for &i in &probes {
                if let Some(t) = b.sent[i].first_delivery {
                    return Some(t.saturating_duration_since(from));
                }
            }
        }
        // One probe in flight at a time, a new one every 500 ms until one is answered 2xx,
        // then wait for it (and any earlier one) to arrive.
        let any_accepted = probes.iter().any(|&i| accepted(&ctx.book.borrow().sent[i]));
        if !any_accepted && Instant::now() >= next_send && !ctx.live_wallets.is_empty() {
            let w = ctx.live_wallets[rng.gen_range(0..ctx.live_wallets.len())];
            let url = urls[k % urls.len()].clone();
            k += 1;
            probes.push(send_one(&ctx.book, &sender, &ctx.targets, url, w, true));
            next_send = Instant::now() + Duration::from_millis(500);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

pub(crate) async fn run_faults(
    ctx: Rc<Ctx>,
    nodes: Rc<RefCell<Nodes>>,
    proxies: Rc<Proxies>,
    args: Rc<Args>,
    end: Instant,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(args.seed.unwrap_or(0) ^ 0x5eed);
    let mut kinds: Vec<FaultKind> = args
        .faults
        .split(',')
        .filter_map(|k| match k.trim() {
            "kill" => Some(FaultKind::Kill),
            "cut" => Some(FaultKind::Cut),
            "pg" if args.pg_restart.is_some() => Some(FaultKind::Pg),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    if kinds.is_empty() {
        return out;
    }
    let mut order: Vec<FaultKind> = Vec::new();
    // Let the load settle first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while Instant::now() + Duration::from_secs(2) < end {
        if order.is_empty() {
            use rand::seq::SliceRandom;
            kinds.shuffle(&mut rng);
            order = kinds.iter().rev().copied().collect();
        }
        let kind = order.pop().expect("refilled");
        let ids: Vec<String> = ctx.spec.nodes.iter().map(|n| n.id.clone()).collect();
        let node = ids[rng.gen_range(0..ids.len())].clone();
        let hold_ms = args.hold.as_millis().max(300) as u64;
        let hold = Duration::from_millis(rng.gen_range(hold_ms / 3..=hold_ms));
        let idx = out.len();
        ctx.book.borrow_mut().current_fault = Some(idx);
        let at = ctx.t0.elapsed();
        let mut note = String::new();
        let node_of = (kind != FaultKind::Pg).then_some(node.as_str());
        eprintln!(
            "[chaos] {:>6.1}s fault {}: {}",
            at.as_secs_f64(),
            idx + 1,
            describe(kind, node_of)
        );
        let (node, held) = match kind {
            FaultKind::Kill => {
                nodes.borrow_mut().kill9(&node);
                let t = Instant::now();
                tokio::time::sleep(hold).await;
                if let Err(e) = nodes.borrow_mut().start(&node) {
                    note = format!("restart failed: {e:#}");
                }
                (Some(node), t.elapsed())
            }
            FaultKind::Cut => {
                proxies.set_node(&node, false);
                let t = Instant::now();
                tokio::time::sleep(hold).await;
                proxies.set_node(&node, true);
                (Some(node), t.elapsed())
            }
            FaultKind::Pg => {
                let t = Instant::now();
                if let Err(e) = shell(args.pg_restart.as_deref().unwrap_or("true")).await {
                    note = format!("{e:#}");
                }
                (None, t.elapsed())
            }
        };
        eprintln!("[chaos]         repaired after {:.1} s", held.as_secs_f64());
        let repaired = Instant::now();
        let within = args.heal_within;
        let nodes_spec = ctx.spec.nodes.clone();
        let links = wait_healed(&nodes_spec, within);
        let fwd = probe_forward(&ctx, node.as_deref(), repaired, within);
        let (links_healed, forward_healed) = futures_util::join!(links, fwd);
        let links_healed = match links_healed {
            Ok(d) => Some(d),
            Err(last) => {
                note.push_str(&format!(" not ready/linked within {within:?} ({last});"));
                None
            }
        };
        if forward_healed.is_none() {
            note.push_str(&format!(" no probe forward delivered within {within:?};"));
        }
        eprintln!(
            "[chaos]         healed: ready+links {}, forward {}",
            fmt_opt(links_healed),
            fmt_opt(forward_healed)
        );
        out.push(Fault {
            kind,
            node,
            at,
            held,
            links_healed,
            forward_healed,
            note: note.trim().to_string(),
        });
        ctx.book.borrow_mut().current_fault = None;
        nodes.borrow_mut().check();
        let gap = Duration::from_millis(rng.gen_range(0..=(2 * args.fault_gap.as_millis() as u64)));
        tokio::time::sleep(gap.min(end.saturating_duration_since(Instant::now()))).await;
    }
    out
}
