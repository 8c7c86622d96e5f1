//! Delivery to agents' own HTTP endpoints under hostile or failing endpoints, against one real
//! node on 127.0.0.1:0: the node-wide bound on drains under way
//! (`limits.max_endpoint_drains`), the backoff that leases running out and forwards respect,
//! and acknowledgements that follow each 2xx. Nothing queued is lost along the way.

mod common;

use common::*;
use mailroom::config::Strategy;
use mailroom::node::RunningNode;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Tries of a connection's queue at its endpoint put off (the endpoint backing off, or the
/// node's drain slots all taken), left to the sweep.
async fn deferred(n: &RunningNode) -> u64 {
    endpoint_posts(n, "deferred").await
}

/// Holds an endpoint stub's answer (its own thread) until the test sets `flag`.
fn wait_for(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// POSTs an endpoint whose drains fail (or refuse) from `first` on may have had by now: the
/// first, and one more for each retry of the sweep's schedule due by now (`period`, doubled
/// after each). A retry comes at a sweep pass after it is due, never before: the bound is
/// never too tight, however slow the machine.
fn allowed_by_schedule(first: Instant, period: Duration) -> usize {
    let (mut posts, mut due) = (1, period);
    while first.elapsed() >= due {
        posts += 1;
        due += period * 2u32.pow((posts - 1).min(10) as u32);
    }
    posts
}

/// What a tarpit endpoint has seen.
#[derive(Default)]
struct Pit {
    /// Sockets open at it now.
    open: AtomicUsize,
    /// The most open at once.
    most: AtomicUsize,
    /// Requests answered.
    answered: AtomicUsize,
}

/// An agent endpoint on 127.0.0.1:0 that accepts connections and reads their requests, but
/// answers none until `answer` turns true: then 200 to each (the ones held too), closing the
/// connection after it, so that every socket open at it is a POST under way.
async fn tarpit(answer: tokio::sync::watch::Receiver<bool>) -> (String, Arc<Pit>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let pit = Arc::new(Pit::default());
    let p = pit.clone();
    actix_rt::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let open = p.open.fetch_add(1, Ordering::SeqCst) + 1;
            p.most.fetch_max(open, Ordering::SeqCst);
            let (p, mut answer) = (p.clone(), answer.clone());
            actix_rt::spawn(async move {
                // The request: its head, then as many bytes as its Content-Length says.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let whole = loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break true;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break false,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                if whole && answer.wait_for(|a| *a).await.is_ok() {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    p.answered.fetch_add(1, Ordering::SeqCst);
                }
                // Closed here (dropped): counted out before the node can read the answer
                // and start another POST.
                p.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (url, pit)
}

/// Connections whose endpoints accept and never answer, each with mail queued: every forward
/// started a drain that held a socket at the endpoint (and its leased batch) for
/// `delivery.endpoint_timeout_ms`, so N such connections held N sockets, without bound. Now
/// the node has at most `limits.max_endpoint_drains` drains under way; the others are put
/// off, their messages still queued, and the sweep delivers them once the endpoints answer.
#[actix_rt::test]
async fn drains_to_endpoints_that_never_answer_hold_at_most_the_nodes_drain_slots() {
    const CONNECTIONS: usize = 50;
    const SLOTS: usize = 4;
    let (answer, answering) = tokio::sync::watch::channel(false);
    let (endpoint, pit) = tarpit(answering).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    cfg.limits.max_endpoint_drains = SLOTS;
    // Longer than the test: a POST to the tarpit is under way until it answers, and its
    // lease outlasts it. The sweep retries endpoints every 200 ms.
    cfg.delivery.endpoint_timeout_ms = 600_000;
    cfg.delivery.lease_ms = 1_200_000;
    cfg.delivery.sweep_interval_ms = 20;
    let n = start(&cfg);
    let mut wallets = Vec::new();
    for _ in 0..CONNECTIONS {
        wallets.push(wallet_at_endpoint(&n, &endpoint).await);
    }
    for (i, (a, k)) in wallets.iter().enumerate() {
        assert_eq!(forward_to(&n, a, k, &format!("m{i}")).await, 202);
    }
    // Every drain beyond the slots put off (the forwards', then the sweep's), or more
    // sockets than the slots held at the tarpit.
    eventually("the drains beyond the node's slots put off", || async {
        (pit.most.load(Ordering::SeqCst) > SLOTS || deferred(&n).await >= (CONNECTIONS - SLOTS) as u64).then_some(())
    })
    .await;
    let most = pit.most.load(Ordering::SeqCst);
    assert!(
        most <= SLOTS,
        "{most} sockets held open at once at an endpoint that never answers, by {CONNECTIONS} connections' drains (limits.max_endpoint_drains = {SLOTS})"
    );
    eventually("the first drains at the tarpit", || async {
        (pit.open.load(Ordering::SeqCst) == SLOTS).then_some(())
    })
    .await;
    // Two more endpoint retries of the sweep meanwhile: they start no drain either.
    let passes = || async {
        metric(&n, "mailroom_store_seconds_count{op=\"connections_with_pending\"}")
            .await
            .unwrap_or(0.0)
    };
    let seen = passes().await;
    eventually("two endpoint retry passes", || async {
        (passes().await >= seen + 2.0).then_some(())
    })
    .await;
    let most = pit.most.load(Ordering::SeqCst);
    assert!(
        most <= SLOTS,
        "{most} sockets held open at once at an endpoint that never answers, by {CONNECTIONS} connections' drains (limits.max_endpoint_drains = {SLOTS})"
    );
    assert_eq!(queue_depth(&n).await, CONNECTIONS as u64, "nothing lost meanwhile");

    // The endpoint answers: every message is delivered, the drains still within the slots.
    answer.send(true).unwrap();
    eventually("every message delivered", || async {
        (pit.answered.load(Ordering::SeqCst) >= CONNECTIONS && queue_depth(&n).await == 0).then_some(())
    })
    .await;
    assert_eq!(endpoint_posts(&n, "ok").await, CONNECTIONS as u64, "each POSTed once");
    let most = pit.most.load(Ordering::SeqCst);
    assert!(
        most <= SLOTS,
        "{most} sockets open at once (limits.max_endpoint_drains = {SLOTS})"
    );
}

/// Connections put off for want of a drain slot (a backlog after a restart, an outage, or
/// endpoints slower than the forwards) were tried again only at the sweep's next endpoint
/// pass, every tenth pass: `limits.max_endpoint_drains` connections an endpoint pass (64 per
/// 20 s by default), however fast the endpoints answered. Now every sweep pass goes on with
/// them while drains are lacking.
#[actix_rt::test]
async fn connections_put_off_for_a_drain_slot_are_served_as_slots_free_not_an_endpoint_pass_each() {
    const CONNECTIONS: usize = 6;
    let (answer, answering) = tokio::sync::watch::channel(false);
    let (endpoint, pit) = tarpit(answering).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    cfg.limits.max_endpoint_drains = 1;
    cfg.delivery.endpoint_timeout_ms = 600_000;
    cfg.delivery.lease_ms = 1_200_000;
    // A sweep pass a second, an endpoint pass every ten: five connections served an endpoint
    // pass each would take 50 s, past the test's wait.
    cfg.delivery.sweep_interval_ms = 1_000;
    let n = start(&cfg);
    let mut wallets = Vec::new();
    for _ in 0..CONNECTIONS {
        wallets.push(wallet_at_endpoint(&n, &endpoint).await);
    }
    for (i, (a, k)) in wallets.iter().enumerate() {
        assert_eq!(forward_to(&n, a, k, &format!("m{i}")).await, 202);
    }
    eventually("one drain at the endpoint, the others put off", || async {
        (pit.open.load(Ordering::SeqCst) == 1 && deferred(&n).await >= (CONNECTIONS - 1) as u64).then_some(())
    })
    .await;
    answer.send(true).unwrap();
    eventually("every message delivered, a sweep pass or so each", || async {
        (pit.answered.load(Ordering::SeqCst) >= CONNECTIONS && queue_depth(&n).await == 0).then_some(())
    })
    .await;
    assert!(pit.most.load(Ordering::SeqCst) <= 1, "within the one drain slot");
}

/// A forward to a connection whose endpoint refused a message lately drains only messages on
/// their first delivery: the others it leases are held back. They stayed leased, so a forward
/// every few seconds kept them leased, and the sweep's retry at the end of the backoff missed
/// them (for as long as forwards came). They are given back when that drain ends.
#[actix_rt::test]
async fn messages_a_forwards_drain_holds_back_are_given_back_when_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    // Endpoint retries every 10 s; a held-back lease would hold its message 6 s. A POST may
    // take 2 s (a timed-out one gives m1 back too).
    cfg.delivery.sweep_interval_ms = 1_000;
    cfg.delivery.lease_ms = 6_000;
    cfg.delivery.endpoint_timeout_ms = 2_000;
    let n = start(&cfg);
    let requests = Arc::new(AtomicUsize::new(0));
    let r = requests.clone();
    // The first message is refused (a 4xx about it), the rest taken.
    let (endpoint, handle) = endpoint_stub(move |_| {
        if r.fetch_add(1, Ordering::SeqCst) == 0 {
            400
        } else {
            200
        }
    });
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    let queue = || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        let q = &v["connections"][0]["queue"];
        (q["depth"].as_u64().unwrap_or(99), q["in_flight"].as_u64().unwrap_or(99))
    };
    assert_eq!(forward_to(&n, &a, &k, "m0").await, 202);
    eventually("m0 refused", || async {
        (requests.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // m0's lease runs out and the sweep takes it back (not POSTed: the endpoint backs off).
    eventually("m0 taken back, pending", || async {
        (queue().await == (1, 0)).then_some(())
    })
    .await;
    // A forward: its drain leases m0 (tried before: held back) and m1, POSTs m1.
    assert_eq!(forward_to(&n, &a, &k, "m1").await, 202);
    eventually("m1 taken", || async {
        (requests.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    // m0 is given back as the drain ends, long before the 6 s lease it took would run out
    // (4 s: 2 s short of it, for the drain to end on a loaded box).
    let given_back = Instant::now() + Duration::from_millis(4_000);
    loop {
        let (depth, in_flight) = queue().await;
        if in_flight == 0 && depth <= 1 {
            break;
        }
        assert!(
            Instant::now() < given_back,
            "m0 still leased by the forward's drain that held it back ({depth} queued, {in_flight} in flight)"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    handle.stop(true).await;
}

/// An endpoint that always answers 500: its message is released for the sweep, which retries
/// it on a doubling schedule. Forwards and leases that ran out each tried it at once, whatever
/// that schedule: a steady stream of forwards, or a message leased and never acknowledged
/// (here, picked up and not acknowledged) every lease period, made it a POST each. Now they
/// wait for the sweep's retry: over several forwards and lease periods the endpoint is POSTed
/// as often as the schedule says, and nothing queued is lost.
#[actix_rt::test]
async fn an_endpoint_that_always_fails_is_posted_on_its_backoff_schedule_not_per_forward_or_lease() {
    const FORWARDS: usize = 5;
    const LEASES: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    // Endpoint retries every 20 s (ten sweeps), then 40 s: the test ends well inside the
    // first. Leases run out at the sweep after they are taken.
    cfg.delivery.sweep_interval_ms = 2_000;
    cfg.delivery.lease_ms = 300;
    cfg.delivery.endpoint_timeout_ms = 200;
    let period = Duration::from_millis(cfg.delivery.sweep_interval_ms * 10);
    let n = start(&cfg);
    let requests = Arc::new(AtomicUsize::new(0));
    let r = requests.clone();
    let (endpoint, handle) = endpoint_stub(move |_| {
        r.fetch_add(1, Ordering::SeqCst);
        500
    });
    let posts = || requests.load(Ordering::SeqCst);
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    assert_eq!(forward_to(&n, &a, &k, "m0").await, 202);
    eventually("the first POST, answered 500", || async {
        (posts() == 1 && endpoint_posts(&n, "failed").await == 1).then_some(())
    })
    .await;
    let first = Instant::now();

    // Forwards while the endpoint backs off: put off, not POSTed. (The first may still find
    // the failed drain under way, which takes nothing more once it failed.)
    for i in 1..=FORWARDS {
        assert_eq!(forward_to(&n, &a, &k, &format!("m{i}")).await, 202);
    }
    eventually("the forwards put off, or POSTed", || async {
        (posts() > 1 || deferred(&n).await >= FORWARDS as u64 - 1).then_some(())
    })
    .await;

    // Leases that run out: the wallet picks its mail up and never acknowledges it.
    for round in 0..LEASES {
        if posts() > allowed_by_schedule(first, period) {
            break;
        }
        let before = deferred(&n).await;
        let d = a
            .request(&pickup("delivery-request", json!({"limit": 10})))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(type_name(&d), "delivery", "round {round}: {d}");
        eventually(
            "the lease run out and taken back, its endpoint put off or POSTed",
            || async { (posts() > allowed_by_schedule(first, period) || deferred(&n).await > before).then_some(()) },
        )
        .await;
    }
    let (tried, allowed) = (posts(), allowed_by_schedule(first, period));
    assert!(
        tried <= allowed,
        "{tried} POSTs to an endpoint that always fails, {:?} after its first failure ({FORWARDS} forwards, {LEASES} leases run out): its schedule allows {allowed}",
        first.elapsed()
    );
    assert_eq!(queue_depth(&n).await, FORWARDS as u64 + 1, "nothing lost");
    handle.stop(true).await;
}

/// An endpoint that refuses a message (a 4xx about it) leaves it leased; when that lease ran
/// out, it was POSTed again at once, and again every lease period for the queue's whole TTL
/// (and every such message of the connection with it). Now it waits for the sweep's retry
/// schedule, while new mail for the connection is still POSTed at once, each message once.
#[actix_rt::test]
async fn a_message_its_endpoint_refuses_is_posted_again_on_the_backoff_schedule_not_every_lease() {
    const FORWARDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    // Endpoint retries every 30 s (ten sweeps); a lease runs out at the first or second sweep
    // after it is taken (5.5 s at most: the three rounds end well inside the retry period). A
    // POST may take 2 s: one timed out is an endpoint-wide failure, and the next new message
    // would not be POSTed at once.
    cfg.delivery.sweep_interval_ms = 3_000;
    cfg.delivery.lease_ms = 2_500;
    cfg.delivery.endpoint_timeout_ms = 2_000;
    let period = Duration::from_millis(cfg.delivery.sweep_interval_ms * 10);
    let n = start(&cfg);
    let requests = Arc::new(AtomicUsize::new(0));
    let r = requests.clone();
    let (endpoint, handle) = endpoint_stub(move |_| {
        r.fetch_add(1, Ordering::SeqCst);
        400
    });
    let posts = || requests.load(Ordering::SeqCst);
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    assert_eq!(forward_to(&n, &a, &k, "m0").await, 202);
    eventually("the first POST, refused", || async { (posts() == 1).then_some(()) }).await;
    let first = Instant::now();
    // Each new message once (and the refused ones only on the schedule).
    let allowed = |sent: usize| sent + allowed_by_schedule(first, period) - 1;
    let mut sent = 1;
    for i in 1..=FORWARDS {
        let before = deferred(&n).await;
        eventually(
            "the refused lease run out and taken back, put off or POSTed",
            || async { (posts() > allowed(sent) || deferred(&n).await > before).then_some(()) },
        )
        .await;
        if posts() > allowed(sent) {
            break;
        }
        assert_eq!(forward_to(&n, &a, &k, &format!("m{i}")).await, 202);
        sent += 1;
        eventually("the new message POSTed at once", || async {
            (posts() >= sent).then_some(())
        })
        .await;
    }
    let (tried, allowed) = (posts(), allowed(sent));
    assert!(
        tried <= allowed,
        "{tried} POSTs of {sent} messages to an endpoint that refuses each, {:?} after its first refusal: each once, and the schedule's retries, allow {allowed}",
        first.elapsed()
    );
    assert_eq!(queue_depth(&n).await, FORWARDS as u64 + 1, "nothing lost");
    handle.stop(true).await;
}

/// A drain acknowledged what its endpoint took only once the whole batch was POSTed: a batch
/// whose last POST took its whole timeout left the messages delivered before it leased, to be
/// delivered again should that lease run out first. Now each is removed right after its 2xx.
#[actix_rt::test]
async fn each_message_is_removed_as_soon_as_its_endpoint_answers_2xx() {
    const N: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    // The stalled POST and its lease outlast the test; the sweep retries the endpoint 1 s
    // after its first failure.
    cfg.delivery.endpoint_timeout_ms = 60_000;
    cfg.delivery.lease_ms = 300_000;
    let n = start(&cfg);
    // The first POST fails once every message is queued: the sweep's retry then leases them
    // all in one batch. Of that batch the endpoint takes all but the last at once, and
    // stalls the last until the test lets it go.
    let requests = Arc::new(AtomicUsize::new(0));
    let all_queued = Arc::new(AtomicBool::new(false));
    let stall_over = Arc::new(AtomicBool::new(false));
    let (r, q, s) = (requests.clone(), all_queued.clone(), stall_over.clone());
    let (endpoint, handle) = endpoint_stub(move |_| match r.fetch_add(1, Ordering::SeqCst) {
        0 => {
            wait_for(&q);
            503
        }
        i if i == N => {
            wait_for(&s);
            200
        }
        _ => 200,
    });
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    for i in 0..N {
        assert_eq!(forward_to(&n, &a, &k, &format!("m{i}")).await, 202);
    }
    all_queued.store(true, Ordering::SeqCst);
    eventually("the batch's last POST under way", || async {
        (requests.load(Ordering::SeqCst) == N + 1).then_some(())
    })
    .await;
    eventually(
        "the messages the endpoint took removed while the last stalls",
        || async { (queue_depth(&n).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(endpoint_posts(&n, "ok").await, N as u64 - 1);
    stall_over.store(true, Ordering::SeqCst);
    eventually("the last removed once taken", || async {
        (queue_depth(&n).await == 0).then_some(())
    })
    .await;
    handle.stop(true).await;
}
