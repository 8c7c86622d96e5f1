//! Scenario `soak` (only when named): the RSS of a sled node under a steady load, to show that
//! memory stays flat once the dedup window has passed (every forward adds a dedup record that
//! lives for the window; past it, records are pruned as fast as they are made).
//!
//! One wallet in live mode on a `mailroom` child process (sled, `dedup_window_secs` =
//! LOADGEN_SOAK_DEDUP_SECS, 60), forwards POSTed to it at LOADGEN_SOAK_RATE (500/s) for
//! LOADGEN_SOAK_SECS (300), every delivery acknowledged: the queue stays empty. The child's
//! VmRSS and its forwards counter are sampled every 5 s; the figure is the growth over the second
//! half of the run (and at least a window plus 10 s after the first forward: sled's page cache
//! fills for the first minutes), in bytes per forward accepted meanwhile.

use crate::cross_node::{live_latency, Target};
use crate::{client::*, env_num, nodes::*, report::*, Opts};
use anyhow::{bail, Result};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// One sample: seconds since the scenario began, RSS in KiB, forwards received so far.
#[derive(Clone, Copy)]
struct Sample {
    at_s: f64,
    rss_kib: u64,
    forwards: u64,
}

pub(crate) async fn soak_memory(t: &mut Table, o: &Opts) -> Result<()> {
    let window = env_num("LOADGEN_SOAK_DEDUP_SECS", 60u64).clamp(1, 3_600);
    let secs = env_num("LOADGEN_SOAK_SECS", 300u64).clamp(30, 3_600);
    let rate = env_num("LOADGEN_SOAK_RATE", 500u64).clamp(1, 5_000);
    if secs <= window + 20 {
        bail!("LOADGEN_SOAK_SECS ({secs}) must exceed the dedup window ({window} s) by more than 20 s");
    }
    let node = ChildNode::start_with(None, &format!("[limits]\ndedup_window_secs = {window}\n")).await?;
    let tg = Target::child(&node);
    let (pid, admin) = (node.pid(), node.admin_url());
    let samples: Rc<RefCell<Vec<Sample>>> = Rc::default();
    let done = Rc::new(Cell::new(false));
    let sampler = {
        let (samples, done, admin) = (samples.clone(), done.clone(), admin.clone());
        actix_rt::spawn(async move {
            let t0 = Instant::now();
            while !done.get() {
                let forwards = metric(&admin, "mailroom_forwards_received_total").await.unwrap_or(0.0) as u64;
                if let Ok(rss_kib) = rss_kib(pid) {
                    samples.borrow_mut().push(Sample {
                        at_s: t0.elapsed().as_secs_f64(),
                        rss_kib,
                        forwards,
                    });
                }
                actix_rt::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    eprintln!("[soak] {rate}/s for {secs} s, dedup window {window} s (envelopes are packed first)");
    let r = live_latency(o, &tg, &tg, rate, secs, false).await;
    done.set(true);
    let _ = sampler.await;
    let r = r?;
    let depth = queued(&admin).await.unwrap_or(u64::MAX);
    let dedup = metric(&admin, "mailroom_dedup_records").await.unwrap_or(-1.0);
    let samples = samples.borrow().clone();
    // The sending began with the first sample that saw a forward.
    let Some(first) = samples.iter().find(|s| s.forwards > 0) else {
        bail!("no forward was counted by the node");
    };
    let steady_from = first.at_s + ((window + 10) as f64).max(secs as f64 / 2.0);
    let (Some(a), Some(b)) = (samples.iter().find(|s| s.at_s >= steady_from), samples.last()) else {
        bail!("no sample after the dedup window");
    };
    let forwards = b.forwards.saturating_sub(a.forwards);
    if forwards == 0 || b.at_s - a.at_s < 10.0 {
        bail!("too little steady load after the dedup window to measure ({forwards} forwards)");
    }
    let growth = (b.rss_kib as f64 - a.rss_kib as f64) * 1024.0 / forwards as f64;
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let every_30s: Vec<String> = samples
        .iter()
        .filter(|s| s.forwards > 0)
        .step_by(6)
        .map(|s| format!("{:.0} s: {} MiB", s.at_s - first.at_s, s.rss_kib / 1024))
        .collect();
    t.add(
        "RSS growth under steady load past the dedup window, sled",
        format!("{growth:.1}"),
        "B/fwd",
        "~0 (flat)",
        format!(
            "{} -> {} MiB from {:.0} s to {:.0} s after the first forward ({forwards} forwards, {rate}/s, dedup window {window} s); \
             one live wallet acknowledging: {} of {} accepted delivered, queue depth {depth} after; {dedup} dedup records at the end",
            a.rss_kib / 1024,
            b.rss_kib / 1024,
            a.at_s - first.at_s,
            b.at_s - first.at_s,
            r.delivered,
            r.accepted,
        ),
    );
    t.add(
        "RSS under steady load, sled: peak",
        format!("{:.0}", peak as f64 / 1024.0),
        "MiB",
        "",
        format!("every 30 s from the first forward: {}", every_30s.join(", ")),
    );
    Ok(())
}
