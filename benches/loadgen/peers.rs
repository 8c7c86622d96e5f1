//! Scenario `peer`: the ingest load of `sled`/`pg` (same senders, window, envelope size) against
//! any DIDComm v1 mediator, named by its invitation URL: mailroom, Credo's or ACA-Py's.
//! `scripts/bench.sh peers` starts each mediator in turn and runs this once per mediator.
//!
//! Environment: LOADGEN_PEER_URL (the invitation URL: `oob=`/`c_i=` or a URL serving it),
//! LOADGEN_PEER_NAME (label, default `peer`), LOADGEN_PEER_PID (the mediator's process, for its
//! CPU; optional).

use crate::client::{build_forwards, build_request, onboard_any, Recipient};
use crate::ingest::forward_load;
use crate::report::{ms, pct, Table};
use crate::Opts;
use anyhow::{Context, Result};
use mailroom::probe::Target;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn peer_forwards(t: &mut Table, o: &Opts) -> Result<()> {
    let url =
        std::env::var("LOADGEN_PEER_URL").context("LOADGEN_PEER_URL (the mediator's invitation URL) is not set")?;
    let name = std::env::var("LOADGEN_PEER_NAME").unwrap_or_else(|_| "peer".into());
    let pid = std::env::var("LOADGEN_PEER_PID").ok().filter(|p| !p.trim().is_empty());
    let target = Target::from_url(&url, None, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!("[peer {name}] onboarding {} wallets through {}", o.wallets, target.http);
    let (wallets, endpoint) = onboard_any(&target, o.wallets).await?;
    let (addr, host, path) = crate::peer_delivery::socket_addr(&endpoint)?;
    let targets: Vec<Recipient> = wallets
        .iter()
        .map(|w| Recipient::V1 {
            key: w.key.clone(),
            routing: w.routing.clone(),
        })
        .collect();
    eprintln!("[peer {name}] building {} forward envelopes", o.envelopes);
    let (envs, _) = build_forwards(&targets, o.envelopes, &format!("load-{name}"), o.v2_pack)?;
    let env_len = envs.iter().map(|e| e.len()).sum::<usize>() / envs.len();
    let reqs: Arc<Vec<Vec<u8>>> = Arc::new(envs.iter().map(|e| build_request(&host, &path, e)).collect());
    drop(envs);
    eprintln!(
        "[peer {name}] POST {endpoint}: {} senders, warm-up {} ms, window {} s",
        o.senders, o.warmup_ms, o.secs
    );
    let r = forward_load(addr, pid.as_deref().unwrap_or("self"), reqs, o, None).await?;
    let secs = r.window.as_secs_f64();
    let rate = r.accepted as f64 / secs;
    let refused: u64 = r.other.values().sum();
    let mut refusals: Vec<String> = r.other.iter().map(|(s, n)| format!("{n}x HTTP {s}")).collect();
    if r.errors > 0 {
        refusals.push(format!("{} transport errors", r.errors));
    }
    let refusals = if refusals.is_empty() {
        "no refusals".to_string()
    } else {
        refusals.join(", ")
    };
    let (p50, p99) = (pct(&r.lat_us, 0.50), pct(&r.lat_us, 0.99));
    let loadgen_cores = r.self_cpu / secs;
    let mediator_cores = pid.as_ref().map(|_| r.node_cpu / secs);
    t.add(
        &format!("forwards accepted/s, {name}"),
        format!("{rate:.0}"),
        "fwd/s",
        "",
        format!(
            "{} accepted (2xx) in {secs:.1} s after {} ms warm-up; {} senders; {env_len} B envelopes; {refusals}{}",
            r.accepted,
            o.warmup_ms,
            o.senders,
            if r.exhausted {
                "; envelope pool ran out before the window ended (raise LOADGEN_ENVELOPES)"
            } else {
                ""
            }
        ),
    );
    t.add(
        &format!("forward latency p50, {name}"),
        ms(p50),
        "ms",
        "",
        "POST sent -> 2xx read".into(),
    );
    t.add(
        &format!("forward latency p99, {name}"),
        ms(p99),
        "ms",
        "",
        String::new(),
    );
    t.add(
        &format!("CPU, {name} run"),
        format!("{loadgen_cores:.2}"),
        "cores",
        "",
        format!(
            "load generator (this process) {loadgen_cores:.2} cores busy; mediator {}",
            mediator_cores
                .map(|c| format!("{c:.2} cores busy (its process only)"))
                .unwrap_or_else(|| "not measured (no LOADGEN_PEER_PID)".into())
        ),
    );
    // One line for scripts/bench.sh peers to gather the side-by-side table from.
    println!(
        "peer-result name={name} rate={rate:.1} p50_ms={} p99_ms={} accepted={} refused={refused} errors={} secs={secs:.2} loadgen_cores={loadgen_cores:.2} mediator_cores={} env_bytes={env_len} exhausted={}",
        ms(p50),
        ms(p99),
        r.accepted,
        r.errors,
        mediator_cores.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into()),
        r.exhausted
    );
    Ok(())
}
