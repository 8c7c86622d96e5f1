//! Driver for `scripts/nodecpu.sh`: the node's instructions per accepted forward against the
//! unpack floor, counted by `valgrind --tool=callgrind` (load-independent, unlike CPU time on
//! a shared box).
//!
//!   fwd_cost floor N
//!       packs N forwards (as `node` does) and unpacks each with the routing key; run under
//!       callgrind with `--toggle-collect='*didcomm::envelope::unpack'`; natively, its wall
//!       time per unpack is the floor in time.
//!   fwd_cost node http://127.0.0.1:PORT N CONCURRENCY PID
//!       onboards 16 wallets, packs N forwards to them, then turns callgrind's instrumentation on in
//!       the node (`callgrind_control -i on PID`), POSTs the N forwards from CONCURRENCY
//!       connections (each used once), dumps (`callgrind_control -d PID`) and turns instrumentation
//!       off. Exits non-zero unless every forward got a 2xx.
//!   fwd_cost cpu http://127.0.0.1:PORT N CONCURRENCY PID
//!       `node` without valgrind (the node runs natively): prints the node's user and system
//!       CPU time and context switches per accepted forward over the window, from /proc, and the
//!       CPU time per forward of each kind of thread (`sled-io-0`..`6` summed as `sled-io`).
//!   fwd_cost serve ADDR http|unpack
//!       what any actix-web mediator answering one HTTP request per forward cannot go below: an
//!       actix-web server (the node's public listener settings: a worker per core, TCP_NODELAY,
//!       keep-alive, the same body limit) whose POST handler reads the body and answers 202
//!       (`http`), or also unpacks it with a routing key of its own (`unpack`, 400 if that fails).
//!       Prints `serving http://ADDR routing VERKEY`; no store, no routing, no session.
//!   fwd_cost bare-cpu http://127.0.0.1:PORT VERKEY N CONCURRENCY PID
//!       `cpu` against `serve`: N forwards through VERKEY as the routing key, the server's CPU
//!       per request from /proc.
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
    let t0 = std::time::Instant::now();
    for e in &envs {
        std::hint::black_box(envelope::unpack(std::hint::black_box(e), &find)?);
    }
    let us = t0.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    println!("unpacked {n}: {us:.1} us each (wall clock, one thread)");
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

/// Onboards the wallets, packs `n` forwards and sends one warm-up forward per wallet: what
/// `node` and `cpu` do before their counted window.
async fn prepare(base: &str, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
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
    Ok(envs)
}

/// POSTs every envelope once from `conc` connections; fails unless every one got a 2xx.
async fn send_all(base: &str, envs: Vec<Vec<u8>>, conc: usize) -> anyhow::Result<()> {
    let n = envs.len();
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
    println!("accepted {ok}");
    if ok != n {
        bail!("{ok} of {n} accepted");
    }
    Ok(())
}

async fn node(base: &str, n: usize, conc: usize, pid: &str) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let envs = prepare(base, n).await?;
    callgrind(&["-z", pid])?;
    callgrind(&["-i", "on", pid])?;
    let sent = send_all(base, envs, conc).await;
    callgrind(&["-d", pid])?;
    callgrind(&["-i", "off", pid])?;
    sent
}

/// What the kernel says the process `pid` has used so far: user and system CPU (clock ticks,
/// every thread including exited ones) and context switches summed over its live threads.
struct ProcCpu {
    utime: u64,
    stime: u64,
    voluntary: u64,
    involuntary: u64,
    /// utime+stime ticks of the live threads by name, numbered threads (`sled-io-3`) summed.
    threads: std::collections::BTreeMap<String, u64>,
}

/// (utime, stime) in clock ticks from a process's or a task's `stat`, or None.
fn stat_times(stat: &str) -> Option<(u64, u64)> {
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

fn proc_cpu(pid: &str) -> anyhow::Result<ProcCpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let (utime, stime) = stat_times(&stat).context("utime and stime in /proc/PID/stat")?;
    let (mut voluntary, mut involuntary) = (0, 0);
    let mut threads = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = t?.path();
        let Ok(s) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name = name.trim().trim_end_matches(|c: char| c.is_ascii_digit() || c == '-');
        if let Some((u, s)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .as_deref()
            .and_then(stat_times)
        {
            *threads.entry(name.to_string()).or_insert(0) += u + s;
        }
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                voluntary += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                involuntary += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(ProcCpu {
        utime,
        stime,
        voluntary,
        involuntary,
        threads,
    })
}

/// `node` without valgrind: the node's user and system CPU time and context switches per
/// accepted forward, from /proc (clock ticks of 10 ms: use N of 10,000 or more). CPU time
/// moves with the load on the box; the split between user and system time is the point.
async fn cpu(base: &str, n: usize, conc: usize, pid: &str) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let envs = prepare(base, n).await?;
    measure(base, envs, conc, pid).await
}

/// Sends `envs` from `conc` connections and prints what the process `pid` spent per request.
async fn measure(base: &str, envs: Vec<Vec<u8>>, conc: usize, pid: &str) -> anyhow::Result<()> {
    let n = envs.len();
    let t0 = std::time::Instant::now();
    let before = proc_cpu(pid)?;
    send_all(base, envs, conc).await?;
    let after = proc_cpu(pid)?;
    let secs = t0.elapsed().as_secs_f64();
    let tick_us = 1e6 / 100.0; // USER_HZ
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / n as f64;
    let (u, s) = (
        per(before.utime, after.utime) * tick_us,
        per(before.stime, after.stime) * tick_us,
    );
    println!(
        "node CPU per forward: {:.0} us ({:.0} us user, {:.0} us system); {:.2} voluntary and {:.2} involuntary context switches per forward; {:.0} forwards/s",
        u + s,
        u,
        s,
        per(before.voluntary, after.voluntary),
        per(before.involuntary, after.involuntary),
        n as f64 / secs
    );
    let mut by_thread: Vec<(f64, &String)> = after
        .threads
        .iter()
        .map(|(name, t)| {
            let t0 = before.threads.get(name).copied().unwrap_or(0);
            (per(t0, *t) * tick_us, name)
        })
        .filter(|(us, _)| *us >= 0.5)
        .collect();
    by_thread.sort_by(|a, b| b.0.total_cmp(&a.0));
    let by_thread: Vec<String> = by_thread
        .iter()
        .map(|(us, name)| format!("{name} {us:.0} us"))
        .collect();
    println!("by thread (live threads, per forward): {}", by_thread.join(", "));
    Ok(())
}

/// The bare server of `serve`: the node's request path without the node.
async fn serve(addr: &str, unpack: bool) -> anyhow::Result<()> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let routing = KeyPair::generate();
    let rk = routing.verkey();
    let limit = mailroom::config::Limits::default().max_envelope_bytes;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("serving http://{} routing {rk}", listener.local_addr()?);
    let state = web::Data::new((routing, rk, unpack));
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(limit))
            .route(
                "/",
                web::post().to(|body: web::Bytes, st: web::Data<(KeyPair, String, bool)>| async move {
                    let (routing, rk, unpack) = &**st;
                    if *unpack {
                        let find = |kid: &str| (kid == rk).then(|| routing.clone());
                        if envelope::unpack(&body, &find).is_err() {
                            return HttpResponse::BadRequest().finish();
                        }
                    }
                    HttpResponse::Accepted().finish()
                }),
            )
    })
    .tcp_nodelay(true)
    .listen(listener)?
    .run()
    .await?;
    Ok(())
}

/// `cpu` against `serve`: forwards through `routing` (any recipient), the server's CPU.
async fn bare_cpu(base: &str, routing: &str, n: usize, conc: usize, pid: &str) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let wallet = KeyPair::generate();
    let targets = [(
        wallet.verkey(),
        vec![mailroom::didcomm::keys::verkey_to_did_key(
            &mailroom::didcomm::keys::parse_verkey(routing)?,
        )],
    )];
    let envs = build(&targets, n)?;
    // As many warm-up forwards as `cpu` sends (one per wallet), outside the window.
    for e in build(&targets, WALLETS)? {
        let (st, _) = mailroom::client::post(base, e, Duration::from_secs(120)).await?;
        if !(200..300).contains(&st) {
            bail!("warm-up forward answered {st}");
        }
    }
    measure(base, envs, conc, pid).await
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
        Some("cpu") => {
            let base = args.get(2).context("missing URL")?.clone();
            let (n, conc) = (num(3)?, num(4)?);
            let pid = args.get(5).context("missing PID")?.clone();
            actix_rt::System::new().block_on(cpu(&base, n, conc, &pid))
        }
        Some("serve") => {
            let addr = args.get(2).context("missing ADDR")?.clone();
            let unpack = match args.get(3).map(String::as_str) {
                Some("http") => false,
                Some("unpack") => true,
                _ => bail!("fwd_cost serve ADDR http|unpack"),
            };
            actix_rt::System::new().block_on(serve(&addr, unpack))
        }
        Some("bare-cpu") => {
            let base = args.get(2).context("missing URL")?.clone();
            let routing = args.get(3).context("missing VERKEY")?.clone();
            let (n, conc) = (num(4)?, num(5)?);
            let pid = args.get(6).context("missing PID")?.clone();
            actix_rt::System::new().block_on(bare_cpu(&base, &routing, n, conc, &pid))
        }
        Some("pack") => {
            let base = args.get(2).context("missing URL")?.clone();
            let n = num(3)?;
            let file = args.get(4).context("missing FILE")?.clone();
            let wallets = if args.len() > 5 { num(5)? } else { WALLETS };
            actix_rt::System::new().block_on(pack(&base, n, &file, wallets))
        }
        _ => {
            bail!("usage: fwd_cost floor N | fwd_cost node URL N CONCURRENCY PID | fwd_cost cpu URL N CONCURRENCY PID | fwd_cost serve ADDR http|unpack | fwd_cost bare-cpu URL VERKEY N CONCURRENCY PID | fwd_cost pack URL N FILE [WALLETS]")
        }
    }
}
