//! Driver for `scripts/nodecpu.sh`: the node's instructions per accepted forward against the
//! unpack floor, counted by `valgrind --tool=callgrind` (load-independent, unlike CPU time on
//! a shared box).
//!
//!   fwd_cost floor N
//!       packs N forwards (as `node` does) and unpacks each with the routing key; run under
//!       callgrind with `--toggle-collect='*didcomm::envelope::unpack'`.
//!   fwd_cost node http://127.0.0.1:PORT N CONCURRENCY PID
//!       onboards 16 wallets, packs N forwards to them, then turns callgrind's collection on in
//!       the node (`callgrind_control -i on PID`), POSTs the N forwards from CONCURRENCY
//!       connections (each used once), dumps (`callgrind_control -d PID`) and turns collection
//!       off. Exits non-zero unless every forward got a 2xx.
//!   fwd_cost pack http://127.0.0.1:PORT N FILE [WALLETS]
//!       onboards WALLETS (16) wallets and writes N forwards to them into FILE, one envelope
//!       per line (compact JSON has no newline): the request bodies of `scripts/wrk-forwards.lua`.

use anyhow::{bail, Context};
use mailroom::client::{basic_message, Agent, Invitation, Sender};
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use std::time::Duration;

const WALLETS: usize = 16;

fn build(targets: &[(String, Vec<String>)], n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let sender = Sender::new();
    (0..n)
        .map(|i| {
            let (key, routing) = &targets[i % targets.len()];
            sender.forward_envelope(&basic_message(&format!("cost-{i}")), key, routing)
        })
        .collect()
}

fn floor(n: usize) -> anyhow::Result<()> {
    let routing = KeyPair::generate();
    let wallet = KeyPair::generate();
    let rk = routing.verkey();
    let envs = build(&[(wallet.verkey(), vec![routing.did_key()])], n)?;
    let find = |kid: &str| (kid == rk).then(|| routing.clone());
    for e in &envs {
        std::hint::black_box(envelope::unpack(std::hint::black_box(e), &find)?);
    }
    println!("unpacked {n}");
    Ok(())
}

fn callgrind(args: &[&str]) -> anyhow::Result<()> {
    let st = std::process::Command::new("callgrind_control")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .context("callgrind_control")?;
    if !st.success() {
        bail!("callgrind_control {args:?}: {st}");
    }
    Ok(())
}

async fn onboard(base: &str, wallets: usize) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let http = awc::Client::builder().timeout(Duration::from_secs(120)).finish();
    let res = http
        .get(format!("{base}/invitation"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {base}/invitation: {e}"))?
        .json::<serde_json::Value>()
        .await?;
    let inv = Invitation::parse(&res["invitation"])?;
    let mut targets = Vec::new();
    for _ in 0..wallets {
        let (a, k) = Agent::onboard(&inv).await?;
        let routing = a.grant.clone().context("no grant")?.routing_keys;
        targets.push((k.verkey(), routing));
    }
    Ok(targets)
}

/// Packs on every core: the files for wrk hold 100,000 envelopes and more.
fn build_parallel(targets: &[(String, Vec<String>)], n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let sender = Sender::new();
                    (t * per..((t + 1) * per).min(n))
                        .map(|i| {
                            let (key, routing) = &targets[i % targets.len()];
                            sender.forward_envelope(&basic_message(&format!("wrk-{i}")), key, routing)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for h in hs {
            out.extend(h.join().map_err(|_| anyhow::anyhow!("packer panicked"))??);
        }
        Ok(out)
    })
}

async fn pack(base: &str, n: usize, file: &str, wallets: usize) -> anyhow::Result<()> {
    let targets = onboard(base.trim_end_matches('/'), wallets).await?;
    let envs = build_parallel(&targets, n)?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    for e in &envs {
        if e.contains(&b'\n') {
            bail!("an envelope contains a newline");
        }
        std::io::Write::write_all(&mut out, e)?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    std::io::Write::flush(&mut out)?;
    println!("wrote {n} envelopes for {wallets} wallets to {file}");
    Ok(())
}

async fn node(base: &str, n: usize, conc: usize, pid: &str) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let targets = onboard(base, WALLETS).await?;
    let envs = build(&targets, n)?;
    // One round of every path first (connection set up, caches filled), not counted.
    let warm = build(&targets, WALLETS)?;
    for e in warm {
        let (st, _) = mailroom::client::post(base, e, Duration::from_secs(120)).await?;
        if !(200..300).contains(&st) {
            bail!("warm-up forward answered {st}");
        }
    }
    callgrind(&["-z", pid])?;
    callgrind(&["-i", "on", pid])?;
    let envs = std::sync::Arc::new(std::sync::Mutex::new(envs));
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let envs = envs.clone();
        let base = base.to_string();
        tasks.push(actix_rt::spawn(async move {
            let client = awc::Client::builder().timeout(Duration::from_secs(120)).finish();
            let mut ok = 0usize;
            loop {
                let Some(e) = envs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop() else {
                    break;
                };
                let mut r = client
                    .post(&base)
                    .insert_header(("content-type", mailroom::client::CONTENT_TYPE))
                    .send_body(e)
                    .await
                    .map_err(|e| anyhow::anyhow!("POST: {e}"))?;
                let _ = r.body().await;
                if !r.status().is_success() {
                    bail!("forward answered {}", r.status());
                }
                ok += 1;
            }
            anyhow::Ok(ok)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await??;
    }
    callgrind(&["-d", pid])?;
    callgrind(&["-i", "off", pid])?;
    println!("accepted {ok}");
    if ok != n {
        bail!("{ok} of {n} accepted");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> anyhow::Result<usize> {
        args.get(i).context("missing argument")?.parse().context("not a number")
    };
    match args.get(1).map(String::as_str) {
        Some("floor") => floor(num(2)?),
        Some("node") => {
            let base = args.get(2).context("missing URL")?.clone();
            let (n, conc) = (num(3)?, num(4)?);
            let pid = args.get(5).context("missing PID")?.clone();
            actix_rt::System::new().block_on(node(&base, n, conc, &pid))
        }
        Some("pack") => {
            let base = args.get(2).context("missing URL")?.clone();
            let n = num(3)?;
            let file = args.get(4).context("missing FILE")?.clone();
            let wallets = if args.len() > 5 { num(5)? } else { WALLETS };
            actix_rt::System::new().block_on(pack(&base, n, &file, wallets))
        }
        _ => {
            bail!("usage: fwd_cost floor N | fwd_cost node URL N CONCURRENCY PID | fwd_cost pack URL N FILE [WALLETS]")
        }
    }
}
