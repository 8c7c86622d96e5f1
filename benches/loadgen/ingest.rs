//! Scenario `crypto` + `sled`/`pg`: the unpack floor and forwards accepted/s by one node.

use crate::{client::*, nodes::*, report::*, Didcomm, Opts};
use anyhow::{Context, Result};
use askar_crypto::alg::KeyAlg;
use mailroom::didcomm::envelope;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::v2::jwe::Enc;
use mailroom::didcomm::v2::{self as dv2, did as v2did, keys as v2keys};
use mailroom::protocols::v2::V2Identity;
use mailroom::protocols::MediatorKeys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// 1 + 2: forwards accepted/s by one node, CPU per accepted forward, crypto floor
// ---------------------------------------------------------------------------------------------

/// Unpacks `envs` (cycling) on this thread for ~2 s or 50,000 unpacks, in batches of 100:
/// returns (fastest batch's mean, overall mean) in us and the count. The fastest batch is the
/// figure least disturbed by other jobs on a shared box.
fn time_unpacks(envs: &[Vec<u8>], unpack: &dyn Fn(&[u8]) -> Result<()>) -> Result<(f64, f64, u64)> {
    for e in envs.iter().take(200) {
        unpack(e)?;
    }
    let t0 = Instant::now();
    let (mut n, mut best) = (0u64, f64::MAX);
    let mut it = envs.iter().cycle();
    while n < 50_000 && t0.elapsed() < Duration::from_secs(2) {
        let b0 = Instant::now();
        for _ in 0..100 {
            unpack(it.next().context("no envelopes")?)?;
        }
        best = best.min(b0.elapsed().as_secs_f64() * 1e6 / 100.0);
        n += 100;
    }
    Ok((best, t0.elapsed().as_secs_f64() * 1e6 / n as f64, n))
}

/// The crypto floors: what unpacking one forward costs the node, v1 (anoncrypt to the routing
/// key) and v2 (routing 2.0 forward to the mediator's did:peer:2, each packing). Returns the
/// floor of the packing the load uses (LOADGEN_DIDCOMM, LOADGEN_V2_PACK).
pub(crate) fn crypto_floor(t: &mut Table, o: &Opts) -> Result<f64> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let routing = KeyPair::generate();
    let wallet = KeyPair::generate();
    let rk = routing.verkey();
    let v1 = Recipient::V1 {
        key: wallet.verkey(),
        routing: vec![routing.did_key()],
    };
    let any = V2Pack::Anon(Enc::A256Gcm);
    let (envs, built) = build_forwards(&[v1], 2_000, "floor", any)?;
    let find = |kid: &str| (kid == rk).then(|| routing.clone());
    let (best, mean, n) = time_unpacks(&envs, &|e| {
        std::hint::black_box(envelope::unpack(e, &find)?);
        Ok(())
    })?;
    t.add(
        "crypto floor: unpack one anoncrypt forward",
        format!("{best:.1}"),
        "us",
        "~60 us",
        format!(
            "envelope::unpack with the routing key, one thread, fastest of {} batches of 100 (mean {mean:.1} us over {n} unpacks); {} B; client builds one forward envelope (authcrypt inner + anoncrypt forward) in {:.0} us of one core",
            n / 100,
            envs[0].len(),
            built.as_secs_f64() * 1e6 / 2000.0 * cores
        ),
    );
    let mut chosen = if o.didcomm == Didcomm::V1 { Some(best) } else { None };

    // What a live message costs the node besides the forward: a delivery packed to the wallet
    // and the wallet's acknowledgement opened (both authcrypt between the same two keys),
    // with the box key computed each time and once per pair (envelope::BoxKeys).
    let mediator = KeyPair::generate();
    let delivery = vec![b'x'; 1_200];
    let to_wallet = [wallet.verkey()];
    let ack = br#"{"@type":"https://didcomm.org/messagepickup/2.0/messages-received","message_id_list":["0"]}"#;
    let acks: Vec<Vec<u8>> = (0..200)
        .map(|_| envelope::pack(ack, &[mediator.verkey()], Some(&wallet)))
        .collect::<Result<_, _>>()?;
    let mk = mediator.verkey();
    let find_m = |kid: &str| (kid == mk).then(|| mediator.clone());
    let cache = envelope::BoxKeys::default();
    for cached in [false, true] {
        let c = cached.then_some(&cache);
        let (best, mean, n) = time_unpacks(&acks, &|e| {
            let cipher = envelope::PayloadCipher::ChaCha20Poly1305;
            std::hint::black_box(envelope::pack_cached(
                &delivery,
                &to_wallet,
                Some(&mediator),
                cipher,
                c,
            )?);
            std::hint::black_box(envelope::unpack_cached(e, &find_m, c)?);
            Ok(())
        })?;
        t.add(
            &format!(
                "crypto: pack a delivery + open its ack, box key {}",
                if cached { "cached per pair" } else { "per message" }
            ),
            format!("{best:.1}"),
            "us",
            "",
            format!("authcrypt both ways between one wallet's key and the mediator's, 1,200 B delivery, one thread, fastest of {} batches of 100 (mean {mean:.1} us)", n / 100),
        );
    }

    // v2: the mediator's identity as a node derives it; a wallet's recipient DID routed
    // through it (service uri = the mediator's DID, as a grant makes it).
    let id = V2Identity::derive(&MediatorKeys::generate(), "http://127.0.0.1:9", "ws://127.0.0.1:9")
        .map_err(|e| anyhow::anyhow!("v2 identity: {e}"))?;
    let agreement = v2keys::generate(KeyAlg::X25519)?;
    let recipient = v2did::create_peer2(std::slice::from_ref(&agreement), &[], &[(id.did.clone(), vec![])])?;
    for pack in [
        V2Pack::Anon(Enc::A256CbcHs512),
        V2Pack::Anon(Enc::A256Gcm),
        V2Pack::Anon(Enc::Xc20p),
        V2Pack::Authcrypt,
    ] {
        let (envs, built) = build_forwards(&[Recipient::V2 { did: recipient.clone() }], 1_000, "floor", pack)?;
        let (best, mean, n) = time_unpacks(&envs, &|e| {
            std::hint::black_box(dv2::unpack(e, &|kid| id.key_for(kid), &v2did::resolve_key)?);
            Ok(())
        })?;
        t.add(
            &format!("crypto floor (v2): unpack one forward, {}", pack.label()),
            format!("{best:.1}"),
            "us",
            "",
            format!(
                "didcomm::v2::unpack with the mediator's X25519 key{}, one thread, fastest of {} batches of 100 (mean {mean:.1} us over {n} unpacks); {} B; client builds one (authcrypt inner + forward) in {:.0} us of one core",
                if pack == V2Pack::Authcrypt { " (and the sender's did:peer:2 resolved)" } else { "" },
                n / 100,
                envs[0].len(),
                built.as_secs_f64() * 1e6 / 1000.0 * cores
            ),
        );
        if o.didcomm == Didcomm::V2 && pack == o.v2_pack {
            chosen = Some(best);
        }
    }
    chosen.context("no floor for the load's packing")
}

pub(crate) struct LoadResult {
    pub(crate) accepted: u64,
    pub(crate) other: HashMap<u16, u64>,
    pub(crate) errors: u64,
    pub(crate) window: Duration,
    pub(crate) lat_us: Vec<u64>,
    pub(crate) node_cpu: f64,
    pub(crate) self_cpu: f64,
    /// CPU of the node's PostgreSQL backends over the window (PostgreSQL runs only).
    pub(crate) pg_cpu: f64,
    pub(crate) pg_backends: usize,
    pub(crate) exhausted: bool,
    pub(crate) warm: u64,
}

/// `senders` tasks on this (single) thread POST pre-built requests back to back: a warm-up,
/// then the measured window. Each request is used once.
pub(crate) async fn forward_load(
    addr: std::net::SocketAddr,
    pid: &str,
    reqs: Arc<Vec<Vec<u8>>>,
    o: &Opts,
    db: Option<&FreshDb>,
) -> Result<LoadResult> {
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(o.warmup_ms);
    let deadline = measure_from + Duration::from_secs(o.secs);
    let next = Rc::new(Cell::new(0usize));
    let cpu0: Rc<Cell<Option<(f64, f64, f64)>>> = Rc::new(Cell::new(None));
    let pg_pids: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(Vec::new()));
    let pid = pid.to_string();
    {
        let (cpu0, pid, pg_pids) = (cpu0.clone(), pid.clone(), pg_pids.clone());
        let db = db.map(|d| (d.admin.clone(), d.name.clone()));
        actix_rt::spawn(async move {
            if let Some((admin, name)) = &db {
                // Find the node's PostgreSQL backends shortly before the window (after the pool
                // has grown under the warm-up).
                tokio::time::sleep_until((measure_from - Duration::from_millis(200)).into()).await;
                if let Ok(p) = pg_backend_pids(admin, name).await {
                    *pg_pids.borrow_mut() = p;
                }
            }
            tokio::time::sleep_until(measure_from.into()).await;
            if let (Ok(a), Ok(b)) = (cpu_secs(&pid), cpu_secs("self")) {
                let pg = cpu_sum(&pg_pids.borrow());
                cpu0.set(Some((a, b, pg)));
            }
        });
    }
    let mut tasks = Vec::new();
    for _ in 0..o.senders {
        let reqs = reqs.clone();
        let next = next.clone();
        tasks.push(actix_rt::spawn(async move {
            let mut conn = RawConn::new(addr);
            let mut lat = Vec::with_capacity(4096);
            let mut statuses: HashMap<u16, u64> = HashMap::new();
            let (mut errors, mut warm, mut exhausted) = (0u64, 0u64, false);
            loop {
                let i = next.get();
                if i >= reqs.len() {
                    exhausted = true;
                    break;
                }
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                next.set(i + 1);
                let r = conn.send(&reqs[i]).await;
                let t1 = Instant::now();
                if t0 < measure_from {
                    warm += 1;
                    continue;
                }
                match r {
                    Ok((s, _)) => {
                        *statuses.entry(s).or_default() += 1;
                        if (200..300).contains(&s) {
                            lat.push((t1 - t0).as_micros() as u64);
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (lat, statuses, errors, warm, exhausted)
        }));
    }
    let mut res = LoadResult {
        accepted: 0,
        other: HashMap::new(),
        errors: 0,
        window: Duration::ZERO,
        lat_us: Vec::new(),
        node_cpu: 0.0,
        self_cpu: 0.0,
        pg_cpu: 0.0,
        pg_backends: 0,
        exhausted: false,
        warm: 0,
    };
    for t in tasks {
        let (lat, statuses, errors, warm, exhausted) = t.await?;
        res.lat_us.extend(lat);
        for (s, n) in statuses {
            if (200..300).contains(&s) {
                res.accepted += n;
            } else {
                *res.other.entry(s).or_default() += n;
            }
        }
        res.errors += errors;
        res.warm += warm;
        res.exhausted |= exhausted;
    }
    let end = Instant::now();
    res.window = end.saturating_duration_since(measure_from);
    let (c0, s0, p0) = cpu0.get().context("the warm-up did not finish (too few envelopes?)")?;
    res.node_cpu = cpu_secs(&pid)? - c0;
    res.self_cpu = cpu_secs("self")? - s0;
    res.pg_cpu = cpu_sum(&pg_pids.borrow()) - p0;
    res.pg_backends = pg_pids.borrow().len();
    res.lat_us.sort_unstable();
    Ok(res)
}

pub(crate) async fn single_node_forwards(t: &mut Table, o: &Opts, backend: &str, floor_us: Option<f64>) -> Result<()> {
    let db = if backend == "postgres" {
        Some(FreshDb::create(&o.pg_admin).await?)
    } else {
        None
    };
    let node = ChildNode::start(db.as_ref().map(|d| d.url()).as_deref()).await?;
    let wallets = onboard_wallets(o.didcomm, &node.public_url(), &node.ws_url(), o.wallets).await?;
    let targets: Vec<Recipient> = wallets.iter().map(AnyWallet::recipient).collect();
    eprintln!(
        "[{backend}] building {} forward envelopes for {} wallets",
        o.envelopes, o.wallets
    );
    let (envs, built) = build_forwards(&targets, o.envelopes, &format!("load-{backend}"), o.v2_pack)?;
    let env_len = envs.iter().map(|e| e.len()).sum::<usize>() / envs.len();
    let host = node.public.to_string();
    let reqs: Arc<Vec<Vec<u8>>> = Arc::new(envs.iter().map(|e| targets[0].request(&host, e)).collect());
    drop(envs);
    eprintln!(
        "[{backend}] built in {:.1} s; {} senders, warm-up {} ms, window {} s",
        built.as_secs_f64(),
        o.senders,
        o.warmup_ms,
        o.secs
    );
    let r = forward_load(node.public, &node.pid().to_string(), reqs, o, db.as_ref()).await?;
    let secs = r.window.as_secs_f64();
    let rate = r.accepted as f64 / secs;
    let admin = node.admin_url();
    let depth = wait_for("queue depth", Duration::from_secs(10), || queued(&admin)).await?;
    let mut refusals: Vec<String> = r.other.iter().map(|(s, n)| format!("{n}x HTTP {s}")).collect();
    if r.errors > 0 {
        refusals.push(format!("{} transport errors", r.errors));
    }
    let refusals = if refusals.is_empty() {
        "no refusals".to_string()
    } else {
        refusals.join(", ")
    };
    let label = format!(
        "{}{}",
        if backend == "postgres" { "PostgreSQL" } else { "sled" },
        o.tag()
    );
    let packing = match o.didcomm {
        Didcomm::V1 => String::new(),
        Didcomm::V2 => format!("; v2 forwards, {}", o.v2_pack.label()),
    };
    t.add(
        &format!("forwards accepted/s, one node, {label}"),
        format!("{rate:.0}"),
        "fwd/s",
        ">= 10000",
        format!(
            "{} accepted in {secs:.1} s after {} ms warm-up; {} senders on one client thread sharing the 2 cores; {} B envelopes{packing}; {refusals}; queue depth after run {depth} (= {} accepted incl. warm-up){}",
            r.accepted,
            o.warmup_ms,
            o.senders,
            env_len,
            r.accepted + r.warm,
            if r.exhausted { "; envelope pool ran out before the window ended (raise LOADGEN_ENVELOPES)" } else { "" }
        ),
    );
    t.add(
        &format!("forward request latency p50, {label}"),
        ms(pct(&r.lat_us, 0.50)),
        "ms",
        "",
        format!("POST sent -> 2xx read, at {} concurrent senders", o.senders),
    );
    t.add(
        &format!("forward request latency p99, {label}"),
        ms(pct(&r.lat_us, 0.99)),
        "ms",
        "",
        format!("max {} ms", ms(r.lat_us.last().copied().unwrap_or(0))),
    );
    let per = r.node_cpu / r.accepted.max(1) as f64 * 1e6;
    t.add(
        &format!("node CPU per accepted forward, {label}"),
        format!("{per:.0}"),
        "us",
        "",
        format!(
            "mailroom child utime+stime {:.2} s over the window ({:.2} cores busy){}; the load generator used {:.2} s ({:.0} us/request)",
            r.node_cpu,
            r.node_cpu / secs,
            floor_us
                .map(|f| format!(", {:.1}x the {f:.0} us crypto floor", per / f))
                .unwrap_or_default(),
            r.self_cpu,
            r.self_cpu / (r.accepted.max(1) as f64) * 1e6
        ),
    );
    t.add(
        &format!("load generator CPU per accepted forward, {label}"),
        format!("{:.0}", r.self_cpu / r.accepted.max(1) as f64 * 1e6),
        "us",
        "",
        format!(
            "utime+stime of the load generator over the window ({:.2} cores busy): envelopes were packed before it, so this is the HTTP client only",
            r.self_cpu / secs
        ),
    );
    if db.is_some() {
        t.add(
            &format!("PostgreSQL backend CPU per accepted forward{}", o.tag()),
            format!("{:.0}", r.pg_cpu / r.accepted.max(1) as f64 * 1e6),
            "us",
            "",
            format!(
                "utime+stime of the {} server processes serving the node's database ({:.2} cores busy); WAL writer and checkpointer not included",
                r.pg_backends,
                r.pg_cpu / secs
            ),
        );
    }
    drop(node);
    drop(db);
    Ok(())
}
