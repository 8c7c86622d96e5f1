//! Hostile clients against one real node on 127.0.0.1:0: slow-loris requests and WebSocket
//! handshakes, a wallet that never reads its socket, a flood of sockets past
//! `limits.max_sessions`, fragmented and oversized frames and bodies, and a keylist grown
//! past `limits.max_keys_per_connection`. Each ends with the node serving well-behaved clients.

mod common;

use actix_http::ws::Item;
use bytes::Bytes;
use common::*;
use mailroom::client::v2::{V2Agent, V2Mediator};
use mailroom::client::{basic_message, websocket, Agent, Sender, WsEvent};
use mailroom::config::Strategy;
use mailroom::didcomm::keys::KeyPair;
use mailroom::node::RunningNode;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a raw connection saw before `deadline`: the bytes it read, and whether the node
/// closed it.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status line of the node's answer on a raw connection.
async fn status_line(s: &mut (impl AsyncReadExt + Unpin)) -> String {
    let line = read_until(s, b"\r\n", "status line").await;
    String::from_utf8_lossy(&line).trim_end().to_string()
}

/// Trickles `head` one byte every 50 ms, never finishing it, for at most `for_at_most`;
/// returns how long the node let it go on before closing the connection (None: never).
async fn trickle(addr: std::net::SocketAddr, head: &str, for_at_most: Duration) -> Option<Duration> {
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1024];
    for b in head.bytes().cycle() {
        if started.elapsed() > for_at_most {
            return None;
        }
        if s.write_all(&[b]).await.is_err() {
            return Some(started.elapsed());
        }
        // Anything the node sends (a 408) or its close ends the trickle.
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {
                let (_, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
                assert!(closed, "the node answered the slow client but kept its connection");
                return Some(started.elapsed());
            }
            Err(_) => {}
        }
    }
    unreachable!("cycle never ends")
}

#[actix_rt::test]
async fn slow_loris_requests_and_handshakes_are_dropped_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Short enough to tell from actix's 5 s default, long enough that the wallet onboarding
    // beside the slow clients on this loaded box gets its heads in.
    cfg.limits.client_timeout_ms = 1_000;
    let n = start(&cfg);
    let addr = n.public_addr;
    let post_head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let ws_head = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Slow: aaaaaaaa\r\n";
    // Ten slow clients of each kind at once, trickling for up to 15 s (15 times the limit).
    let mut slow = Vec::new();
    for i in 0..20 {
        let head = if i % 2 == 0 { post_head } else { ws_head };
        slow.push(actix_rt::spawn(trickle(addr, head, Duration::from_secs(15))));
    }
    // Meanwhile a wallet onboards and a forward reaches it.
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.expect("onboarding beside slow clients");
    assert_eq!(forward_to(&n, &a, &k, "served").await, 202);
    for s in slow {
        let held = s.await.unwrap().expect("a slow-loris client was never dropped");
        // Dropped once limits.client_timeout_ms (1 s) passed, not at actix's 5 s default.
        assert!(
            held < Duration::from_secs(4),
            "a slow client was held {held:?} with limits.client_timeout_ms = 1000"
        );
    }
    assert_eq!(queue_depth(&n).await, 1);
}

/// Sends `GET /invitation` on a kept-alive raw connection and reads its whole answer
/// (head and `Content-Length` body); the status line.
async fn keep_alive_request(s: &mut TcpStream) -> String {
    s.write_all(b"GET /invitation HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_answer(s).await
}

#[actix_rt::test]
async fn slow_loris_on_a_kept_alive_connection_is_dropped_and_busy_clients_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // 2 s: on a loaded box the busy client below may stall between a response and its next
    // head for most of a second (500 ms cut it); still far from the 20 s a trickle is held
    // without the watchdog.
    cfg.limits.client_timeout_ms = 2_000;
    let limit = Duration::from_millis(cfg.limits.client_timeout_ms);
    let n = start(&cfg);
    // One good request, then the head of a second one trickled on the same connection: actix
    // times only a connection's first head, so this held a connection forever.
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    assert_eq!(keep_alive_request(&mut s).await, "HTTP/1.1 200 OK");
    let started = tokio::time::Instant::now();
    // A head that never ends and stays valid: one header value grows a byte at a time.
    let head = b"GET /invitation HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut buf = [0u8; 1024];
    let mut closed = false;
    'trickle: for b in head.iter().chain(std::iter::repeat(&b'a')) {
        if started.elapsed() > Duration::from_secs(20) || s.write_all(&[*b]).await.is_err() {
            closed = s.write_all(b"a").await.is_err();
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break 'trickle;
            }
            Ok(Ok(_)) => {
                let (_, c) = read_until_closed(&mut s, Duration::from_secs(2)).await;
                closed = c;
                break 'trickle;
            }
            Err(_) => {}
        }
    }
    let held = started.elapsed();
    assert!(closed, "a second head trickled for {held:?} kept its connection open");
    // Without the watchdog it is held for as long as it trickles (20 s here); with it, about
    // the limit (2 s), 10 s to spare.
    assert!(
        held < Duration::from_secs(12),
        "a trickled second head was held {held:?} with limits.client_timeout_ms = 2000"
    );
    let (_, metrics) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert!(
        metrics.contains(r#"mailroom_rejected_total{reason="slow-request""#),
        "{metrics}"
    );
    // A kept-alive client with requests back to back, and with pauses shorter than the limit,
    // for three times the limit: never disconnected.
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut served = 0;
    while started.elapsed() < limit * 3 {
        assert_eq!(
            keep_alive_request(&mut s).await,
            "HTTP/1.1 200 OK",
            "after {served} requests"
        );
        served += 1;
        // Well short of the limit: a loaded box may stall this client a few hundred ms more.
        if served % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!("{served} requests on one kept-alive connection");
    // A WebSocket session is one long request: quiet for twice the limit, it stays.
    let (a, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    tokio::time::sleep(limit * 2).await;
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "quiet", "response_requested": true, "~transport": {"return_route": "all"}});
    assert_eq!(type_name(&ws_request(&a, &mut ws, &ping).await), "ping_response");
}

/// The `in_flight` (leased) and `depth` counts of the node's only connection.
async fn lease_counts(n: &RunningNode) -> (u64, u64) {
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    let q = &v["connections"][0]["queue"];
    (q["in_flight"].as_u64().unwrap(), q["depth"].as_u64().unwrap())
}

/// A socket of `a`'s in live mode that reads nothing more (a small receive buffer, so the
/// node meets a full socket soon).
async fn deaf_live_socket(n: &RunningNode, a: &Agent) -> TcpStream {
    let mut s = deaf_socket(n.public_addr).await;
    let env = a
        .pack(&pickup("live-delivery-change", json!({"live_delivery": true})))
        .unwrap();
    s.write_all(&common::masked_frame(&env)).await.unwrap();
    s
}

/// Records in `got` what delivery `d` carries (each content up to its `:`) and acknowledges
/// it; a status (the answer to an acknowledgement) carries nothing.
async fn ack_delivery(a: &Agent, ws: &mut mailroom::client::WsClient, d: &Value, got: &mut HashSet<String>) {
    if type_name(d) == "status" {
        return;
    }
    assert_eq!(type_name(d), "delivery", "{d}");
    let items = a.open_delivery(d).unwrap();
    let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
    for (_, m) in items {
        let c = m["content"].as_str().unwrap();
        got.insert(c.split(':').next().unwrap().to_string());
    }
    ws.send_envelope(
        a.pack(&pickup("messages-received", json!({"message_id_list": ids})))
            .unwrap(),
        true,
    )
    .await
    .unwrap();
}

#[actix_rt::test]
async fn a_wallet_that_never_reads_holds_a_bounded_share_and_loses_nothing() {
    // Leases outlive the test: only the session's end gives them back.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 600_000;
    // The kernel's share is bounded by its send buffer (autotuned up to megabytes): pinned
    // small so what the node itself holds shows plainly.
    let l = listeners_with_small_send_buffer(&mut cfg, 16 << 10);
    let n = mailroom::node::spawn(cfg, "n1", l, Default::default()).unwrap();
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    // A backlog waits for the wallet: 250 messages of 16 KiB.
    const BACKLOG: usize = 250;
    const N: usize = BACKLOG + 20;
    let big = "x".repeat(16 << 10);
    let mut sent = HashSet::new();
    for i in 0..BACKLOG {
        assert_eq!(forward_to(&n, &a, &k, &format!("{i}:{big}")).await, 202);
        sent.insert(i.to_string());
    }
    // It comes back in live mode on a socket it then never reads (a small receive buffer,
    // so the node meets a full socket soon), and more mail arrives live.
    let deaf = deaf_live_socket(&n, &a).await;
    for i in BACKLOG..N {
        assert_eq!(forward_to(&n, &a, &k, &format!("{i}:{big}")).await, 202);
        sent.insert(i.to_string());
    }
    // The node took what the socket could hold and stopped: every message is still queued,
    // and no more than a few batches (delivery.batch_size = 10) are leased to the deaf
    // session: the rest never left the store for its memory. A few: the batch the writer
    // holds, the lease in flight, and what the kernel took (its loopback accounting lets
    // through a varying share despite the pinned buffers: 2 to 6 batches seen, under load).
    let (in_flight, depth) = eventually("the deaf session's leases to settle", || async {
        let first = lease_counts(&n).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = lease_counts(&n).await;
        (first == second).then_some(second)
    })
    .await;
    assert_eq!(depth, N as u64, "every message stays queued");
    assert!(
        in_flight <= 8 * 10,
        "{in_flight} of {N} messages leased to a session that reads nothing"
    );
    let (_, metrics) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    println!("deaf session: {in_flight} of {N} leased");
    assert!(metrics.contains("mailroom_"), "{metrics}");
    // A well-behaved client picks up later: the deaf socket goes, everything arrives.
    drop(deaf);
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(
        &a,
        &mut ws,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    let mut got = HashSet::new();
    while got.len() < N {
        let d = ws_next_message(&a, &mut ws).await;
        ack_delivery(&a, &mut ws, &d, &mut got).await;
    }
    assert_eq!(got, sent, "every message delivered once the wallet reads");
    eventually("the queue to empty", || async {
        (queue_depth(&n).await == 0).then_some(())
    })
    .await;
}

/// A wallet whose phone changed networks leaves a socket that takes no bytes (no FIN): the
/// session there runs only when its socket takes some, so a forward handed to it waits. Before,
/// the connection's later hand-offs waited behind it, each leased to the node's hand-off
/// owner: the wallet, back on a new socket, got nothing live until the old socket's write
/// stall gave it up (a minute by default; here longer than the test). Now a hand-off the
/// session does not take within `HAND_LOCAL_WAIT` goes back to the queue, with the later
/// ones, and the new socket leases them.
#[actix_rt::test]
async fn a_socket_that_stopped_reading_holds_no_hand_offs_from_the_wallet_s_new_socket() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 600_000;
    cfg.limits.ws_write_stall_ms = 600_000;
    let l = listeners_with_small_send_buffer(&mut cfg, 16 << 10);
    let n = mailroom::node::spawn(cfg, "n1", l, Default::default()).unwrap();
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let big = "x".repeat(16 << 10);
    for i in 0..60 {
        assert_eq!(forward_to(&n, &a, &k, &format!("backlog {i}:{big}")).await, 202);
    }
    // The old socket in live mode fills with the backlog and is read no more.
    let deaf = deaf_live_socket(&n, &a).await;
    eventually("the deaf session's leases to settle", || async {
        let first = lease_counts(&n).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let second = lease_counts(&n).await;
        (first == second && first.0 > 0).then_some(())
    })
    .await;
    // Mail arriving now is handed to that session, which does not run.
    for i in 0..3 {
        assert_eq!(forward_to(&n, &a, &k, &format!("handed {i}:{big}")).await, 202);
    }
    // The wallet is back on a new socket, in live mode; then one more message.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(
        &a,
        &mut ws,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    assert_eq!(forward_to(&n, &a, &k, "after the move").await, 202);
    // They arrive on the new socket well before either the lease or the stall runs out: the
    // one the old session was offered (taken back), those behind it, and the last.
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let wanted = ["handed 0", "handed 1", "handed 2", "after the move"];
    while !wanted.iter().all(|w| got.contains(*w)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let d = match ws.next(left).await {
            Ok(WsEvent::Envelope(e)) => a.unpack(&e).expect("reply unpacks").0,
            other => panic!("not all of {wanted:?} delivered on the new socket within 60 s ({other:?}); got {got:?}"),
        };
        ack_delivery(&a, &mut ws, &d, &mut got).await;
    }
    drop(deaf);
}

/// A wallet's live socket read a trickle at a time (a segment now and then: progress, so
/// never a stall) is closed once its writes take longer than `limits.min_write_bytes_per_sec`
/// allows, and what it was leased goes back. Before, each byte taken started the stall's
/// wait again: the session ran nothing else (no heartbeat, no pushes for its wallet) and held
/// its batch for as long as the client trickled.
#[actix_rt::test]
async fn a_live_socket_read_a_trickle_at_a_time_is_closed_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.ws_write_stall_ms = 5_000;
    cfg.limits.min_write_bytes_per_sec = 32 << 10;
    let l = listeners_with_small_send_buffer(&mut cfg, 16 << 10);
    let n = mailroom::node::spawn(cfg, "n1", l, Default::default()).unwrap();
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    // Batches of 10 x 16 KiB: 160 KiB a frame, 10 s allowed; the trickle (2 KiB every 200 ms
    // at best: progress well within the stall's 5 s) takes 20 s or more for one.
    const N: usize = 40;
    let big = "x".repeat(16 << 10);
    for i in 0..N {
        assert_eq!(forward_to(&n, &a, &k, &format!("{i}:{big}")).await, 202);
    }
    let mut slow = deaf_live_socket(&n, &a).await;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 2048];
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a socket read a trickle at a time kept for 30 s"
        );
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    println!("trickled socket closed after {closed:?}");
    assert!(rejected(&n, "ws-write-slow").await >= 1.0);
    // Its leases went back: everything is still queued, and nothing leased.
    eventually("the slow socket's leases back", || async {
        (lease_counts(&n).await == (0, N as u64)).then_some(())
    })
    .await;
}

/// An HTTP response its client does not read is given up once it has taken longer than
/// `limits.client_timeout_ms` plus its size over `limits.min_write_bytes_per_sec`: the
/// connection goes, with its descriptor and the response it held. Before, actix-http kept
/// both for as long as the client liked (it has no write timeout), and enough such requests
/// took every file the process may open.
#[actix_rt::test]
async fn a_response_its_client_never_reads_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Also each new connection's time for its head (the onboarding and 30 forwards open
    // one each): 2 s, for a loaded box. The test waits for the give-up, it does not time it.
    cfg.limits.client_timeout_ms = 2_000;
    cfg.limits.min_write_bytes_per_sec = 256 << 10;
    let l = listeners_with_small_send_buffer(&mut cfg, 16 << 10);
    let n = mailroom::node::spawn(cfg, "n1", l, Default::default()).unwrap();
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let big = "x".repeat(16 << 10);
    for i in 0..30 {
        assert_eq!(forward_to(&n, &a, &k, &format!("{i}:{big}")).await, 202);
    }
    // A delivery of 30 x 16 KiB (about 650 KiB packed: 4.5 s allowed), asked for on a
    // socket with a small receive buffer, and not read.
    let env = a.pack(&pickup("delivery-request", json!({"limit": 30}))).unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(n.public_addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nContent-Length: {}\r\n\r\n",
        env.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&env).await.unwrap();
    eventually("the unread response given up", || async {
        (rejected(&n, "http-write-slow").await >= 1.0).then_some(())
    })
    .await;
    // What reaches the client is cut short of the length its head announced.
    let (got, closed) = read_until_closed(&mut s, WAIT).await;
    assert!(closed, "the connection closed");
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let announced: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    assert!(body.len() < announced, "{} of {announced} bytes", body.len());
    // The node serves others meanwhile.
    assert_eq!(forward_to(&n, &a, &k, "after").await, 202);
}

/// A masked ping frame, as a client sends it.
fn masked_ping() -> [u8; 6] {
    [0x89, 0x80, 1, 2, 3, 4]
}

/// Sockets bound to no connection that only ping are closed after
/// `limits.unbound_socket_idle_secs`, so a client cannot hold `max_sessions` with them;
/// a wallet's bound socket, idle as long, and a sender's socket that forwards, are kept.
#[actix_rt::test]
async fn sockets_that_only_ping_are_closed_and_bound_or_forwarding_ones_are_kept() {
    const MAX: usize = 6;
    // 5 s: the sender's socket must forward that often, setup included, on a loaded box.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_sessions = MAX;
        c.limits.unbound_socket_idle_secs = 5;
    })
    .await;
    // The wallet's socket, bound by its ping; and a sender forwarding over its own socket.
    let mut wallet = a.websocket(&ws_url(&n)).await.unwrap();
    let pong = ws_request(&a, &mut wallet, &binding_ping()).await;
    assert_eq!(type_name(&pong), "ping_response");
    let (b, kb) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let gb = b.grant.clone().unwrap();
    let sender = Sender::new();
    let mut sending = websocket(&ws_url(&n)).await.unwrap();
    let envelope = |i: usize| {
        sender
            .forward_envelope(&basic_message(&format!("f{i}")), &kb.verkey(), &gb.routing_keys)
            .unwrap()
    };
    sending.send_envelope(envelope(0), false).await.unwrap();
    let mut forwarded = 1;
    // The other places: sockets that only ping, opened from here on: none may be closed
    // before 5 s from here.
    let started = tokio::time::Instant::now();
    let mut pinging = Vec::new();
    for _ in 0..MAX - 2 {
        let (code, s) = raw_upgrade(n.public_addr, true).await;
        assert_eq!(code, 101);
        pinging.push(s);
    }
    assert!(websocket(&ws_url(&n)).await.is_err(), "full");
    let mut buf = [0u8; 256];
    let mut open = pinging.len();
    while open > 0 {
        assert!(started.elapsed() < WAIT, "{open} pinging sockets kept");
        for s in pinging.iter_mut() {
            let _ = s.write_all(&masked_ping()).await;
            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                open -= 1;
            }
        }
        sending.send_envelope(envelope(forwarded), false).await.unwrap();
        forwarded += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(started.elapsed() >= Duration::from_secs(5), "closed before their time");
    assert!(rejected(&n, "ws-unbound-idle").await >= MAX as f64 - 2.0);
    // Places again; the wallet's socket, idle all along, still gets its mail live, and the
    // sender's socket still forwards.
    let _newcomer = websocket(&ws_url(&n))
        .await
        .expect("a place once the pinging sockets went");
    assert_eq!(forward_to(&n, &a, &k, "still bound").await, 202);
    let m = ws_next_message(&a, &mut wallet).await;
    assert_eq!(m["content"], "still bound", "{m}");
    let env = sender
        .forward_envelope(&basic_message("last"), &kb.verkey(), &gb.routing_keys)
        .unwrap();
    sending.send_envelope(env, false).await.unwrap();
    eventually("every forward on the sender's socket queued", || async {
        (queue_depth(&n).await > forwarded as u64).then_some(())
    })
    .await;
}

/// Frames and `POST /` bodies begun and never finished, on many connections, hold at most the
/// node's budget for unfinished messages (16 x the larger message limit): the frame or body
/// whose bytes would pass it is refused (a socket closed 1013, a body 503), and the budget
/// comes back as connections let go. Only bytes received count: headers declaring large
/// messages that never come take nothing, and small messages are never counted. Before, only
/// messages sent in fragments were counted: each connection held a limit's worth of one
/// unfinished frame or body, gigabytes across the sessions a node takes.
#[actix_rt::test]
async fn unfinished_frames_and_bodies_share_the_nodes_budget() {
    const LIMIT: usize = 64 << 10;
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_ws_frame_bytes = LIMIT;
        c.limits.max_envelope_bytes = LIMIT;
    })
    .await;
    let frame = common::masked_frame(&vec![b'x'; 60 << 10]);
    let body = vec![b'{'; 60 << 10];
    let head = format!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Headers alone, declaring 60 KiB each, on 20 sockets and 20 POSTs: nothing held.
    let mut declared = Vec::new();
    for _ in 0..20 {
        let (code, mut s) = raw_upgrade(n.public_addr, true).await;
        assert_eq!(code, 101);
        s.write_all(&frame[..14]).await.unwrap();
        declared.push(s);
        let mut p = TcpStream::connect(n.public_addr).await.unwrap();
        p.write_all(head.as_bytes()).await.unwrap();
        declared.push(p);
    }
    // Large messages of others are served meanwhile: a 40 KB forward, a 40 KB message on a socket.
    let pad = "x".repeat(30_000);
    assert_eq!(forward_to(&n, &a, &k, &format!("big:{pad}")).await, 202);
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let mut ping = binding_ping();
    ping["comment"] = json!(pad);
    let reply = ws_request(&a, &mut ws, &ping).await;
    assert_eq!(type_name(&reply), "ping_response");
    assert_eq!(rejected(&n, "ws-fragments-budget").await, 0.0);
    assert_eq!(rejected(&n, "body-budget").await, 0.0);
    drop(declared);

    // Real bytes: sockets each with 56 KiB of a 60 KiB frame. Within about 16 of them the
    // budget is spent, and the frame whose bytes pass it closes its socket 1013. Its close is
    // awaited 3 s where it may come (from the 14th on: see below), not to open one more socket
    // (refused too) past a late one; 300 ms before, where the frames are taken.
    let mut held = Vec::new();
    let refused_at = loop {
        assert!(held.len() < 40, "40 unfinished frames of 56 KiB held");
        let (code, mut s) = raw_upgrade(n.public_addr, true).await;
        assert_eq!(code, 101);
        s.write_all(&frame[..56 << 10]).await.unwrap();
        let wait = Duration::from_millis(if held.len() < 14 { 300 } else { 3_000 });
        let (got, _) = read_until_closed(&mut s, wait).await;
        // A close frame (0x88) with code 1013 (0x03f5).
        if got.windows(4).any(|w| w[0] == 0x88 && w[2..] == [0x03, 0xf5]) {
            break held.len();
        }
        held.push(s);
    };
    assert!((14..=18).contains(&refused_at), "refused after {refused_at} frames");
    assert_eq!(rejected(&n, "ws-fragments-budget").await, 1.0);
    // A body sent meanwhile is refused too, once its bytes pass what is left.
    let mut post = TcpStream::connect(n.public_addr).await.unwrap();
    post.write_all(head.as_bytes()).await.unwrap();
    let _ = post.write_all(&body[..56 << 10]).await;
    assert!(status_line(&mut post).await.contains(" 503 "));
    assert_eq!(rejected(&n, "body-budget").await, 1.0);
    // Small messages are not counted: served.
    assert_eq!(forward_to(&n, &a, &k, "small").await, 202);
    // The sockets go: the budget is whole again, and a whole 60 KiB body is read and answered
    // (400: not an envelope).
    drop(held);
    drop(post);
    eventually("the budget back", || async {
        let mut s = TcpStream::connect(n.public_addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        status_line(&mut s).await.contains(" 400 ").then_some(())
    })
    .await;
    assert_eq!(rejected(&n, "body-budget").await, 1.0);
}

/// A delivery holds at most twice the largest message the node takes in payload bytes (and at
/// least one message), whatever number the wallet asks for: before, one delivery-request could
/// load its connection's whole queue (up to 100 messages of 4 MiB) and pack copies of it.
/// Everything still arrives, each message once, a delivery at a time.
#[actix_rt::test]
async fn a_delivery_is_bounded_in_bytes_as_well_as_in_messages() {
    const LIMIT: usize = 64 << 10;
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_envelope_bytes = LIMIT;
        c.limits.max_ws_frame_bytes = LIMIT;
        c.delivery.lease_ms = 60_000;
    })
    .await;
    // Ten messages of 25 KB queued (about 34 KB each once packed): a delivery of 128 KiB
    // takes three of them.
    let pad = "x".repeat(25_000);
    for i in 0..10 {
        assert_eq!(forward_to(&n, &a, &k, &format!("{i}:{pad}")).await, 202);
    }
    let mut got = HashSet::new();
    let mut deliveries = 0;
    while got.len() < 10 {
        let d = a
            .request(&pickup("delivery-request", json!({"limit": 10})))
            .await
            .unwrap()
            .expect("a delivery");
        assert_eq!(type_name(&d), "delivery", "{d}");
        let items = contents(&a, &d);
        assert!(
            (1..=3).contains(&items.len()),
            "{} messages of 25 KB in one delivery",
            items.len()
        );
        for c in items {
            assert!(
                got.insert(c.split(':').next().unwrap().to_string()),
                "twice: {}",
                &c[..8]
            );
        }
        let ids = delivery_ids(&a, &d);
        a.request(&pickup("messages-received", json!({"message_id_list": ids})))
            .await
            .unwrap();
        deliveries += 1;
    }
    assert!(deliveries >= 4, "{deliveries} deliveries");
    assert_eq!(queue_depth(&n).await, 0);
}

/// An upgrade request straight on TCP; the status line's code.
async fn raw_upgrade(addr: std::net::SocketAddr, with_key: bool) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let key = if with_key {
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        ""
    };
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            other => panic!(
                "no answer to an upgrade: {other:?} after {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let code = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, s)
}

async fn open_sockets(n: &RunningNode) -> u64 {
    get_json(&format!("{}/status", n.admin_url())).await["open_sockets"]
        .as_u64()
        .unwrap()
}

#[actix_rt::test]
async fn a_flood_of_sockets_past_max_sessions_is_refused_and_live_wallets_keep_receiving() {
    const MAX: usize = 20;
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_sessions = MAX;
        // A delivery acknowledged after its lease ran out would come again, in the place of
        // the next one.
        c.delivery.lease_ms = 30_000;
    })
    .await;
    let mut live = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(
        &a,
        &mut live,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    // Broken handshakes (no key) are refused and hold no place.
    for _ in 0..2 * MAX {
        let (code, _) = raw_upgrade(n.public_addr, false).await;
        assert_eq!(code, 400);
    }
    assert_eq!(open_sockets(&n).await, 1);
    // A flood of 3 x MAX handshakes at once: exactly the places left are taken.
    let flood: Vec<_> = (0..3 * MAX)
        .map(|_| actix_rt::spawn(raw_upgrade(n.public_addr, true)))
        .collect();
    let mut held = Vec::new();
    let mut refused = 0;
    for f in flood {
        match f.await.unwrap() {
            (101, s) => held.push(s),
            (503, _) => refused += 1,
            (other, _) => panic!("upgrade answered {other}"),
        }
    }
    assert_eq!(held.len(), MAX - 1, "places taken by the flood");
    assert_eq!(refused, 3 * MAX - (MAX - 1));
    assert!(websocket(&ws_url(&n)).await.is_err(), "full: a new socket is refused");
    // The wallet already connected is served live throughout.
    for i in 0..3 {
        assert_eq!(forward_to(&n, &a, &k, &format!("during-flood-{i}")).await, 202);
        let d = ws_next_message(&a, &mut live).await;
        assert_eq!(contents(&a, &d), vec![format!("during-flood-{i}")]);
        let ids = delivery_ids(&a, &d);
        let status = ws_request(
            &a,
            &mut live,
            &pickup("messages-received", json!({"message_id_list": ids})),
        )
        .await;
        assert_eq!(type_name(&status), "status", "{status}");
    }
    // The flood goes: its places come back, new sessions are accepted.
    drop(held);
    eventually("the flood's places to come back", || async {
        (open_sockets(&n).await == 1).then_some(())
    })
    .await;
    let mut again = a.websocket(&ws_url(&n)).await.expect("accepted after the flood");
    let pong = ws_request(
        &a,
        &mut again,
        &json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p", "response_requested": true, "~transport": {"return_route": "all"}}),
    )
    .await;
    assert_eq!(type_name(&pong), "ping_response");
}

/// A `POST /` body trickled a byte at a time is answered 408 once
/// `limits.message_timeout_ms` has passed since its head, and its connection closed: it held
/// its buffer and its connection for as long as it trickled. A body sent promptly is handled.
#[actix_rt::test]
async fn a_trickled_body_is_answered_408_after_the_message_timeout() {
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.message_timeout_ms = 500;
    })
    .await;
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 4096];
    let answer = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a body trickled for 20 s is still being read with message_timeout_ms = 500"
        );
        if s.write_all(b"x").await.is_err() {
            break Vec::new();
        }
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break Vec::new(),
            Ok(Ok(k)) => break buf[..k].to_vec(),
            Err(_) => {}
        }
    };
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body-timeout"), "{answer}");
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "the connection of a timed-out body was kept");
    assert_eq!(rejected(&n, "message-timeout").await, 1.0);
    // A prompt one is handled as ever.
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "prompt", "response_requested": true, "~transport": {"return_route": "all"}});
    let reply = a.request(&ping).await.unwrap().expect("a ping response");
    assert_eq!(type_name(&reply), "ping_response");
}

/// A `POST /` body with a `Content-Encoding` is refused 415 before any of it is read, and its
/// connection closed. Before, actix-web inflated gzip and deflate bodies: a few KiB of gzip
/// held a whole envelope's memory for `limits.message_timeout_ms` while the budget for
/// unfinished messages counted the few KiB (nothing, under 16 KiB). `identity` is no coding.
#[actix_rt::test]
async fn a_compressed_body_is_refused_before_it_is_read() {
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    for coding in ["gzip", "deflate", "br, gzip"] {
        let mut s = TcpStream::connect(n.public_addr).await.unwrap();
        // The head declares a body never sent: the answer does not wait for it.
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nContent-Encoding: {coding}\r\nContent-Length: 4000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (answer, closed) = read_until_closed(&mut s, WAIT).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 415"), "{coding}: {answer}");
        assert!(answer.contains("\"content-encoding\""), "{coding}: {answer}");
        assert!(closed, "{coding}: the connection is closed");
    }
    assert_eq!(rejected(&n, "content-encoding").await, 3.0);
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "plain", "response_requested": true, "~transport": {"return_route": "all"}});
    let envelope = a.pack(&ping).unwrap();
    let mut res = client()
        .post(n.public_url())
        .insert_header(("Content-Type", "application/didcomm-envelope-enc"))
        .insert_header(("Content-Encoding", "identity"))
        .send_body(envelope)
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.body().await);
}

/// A WebSocket frame as a client sends it (masked), with `first` as its first byte (FIN and
/// opcode): a fragment (`0x02`, then `0x00`) or a ping (`0x89`).
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = masked_frame(payload);
    f[0] = first;
    f
}

/// Reads a raw WebSocket until the node's pong (None) or close frame (its code).
async fn pong_or_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (first, payload) = tokio::time::timeout(WAIT, async {
            let mut head = [0u8; 2];
            s.read_exact(&mut head).await?;
            let len = match head[1] & 0x7f {
                126 => s.read_u16().await? as usize,
                127 => s.read_u64().await? as usize,
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await?;
            std::io::Result::Ok((head[0], payload))
        })
        .await
        .expect("a pong or a close in time")
        .expect("a frame, not the connection's end");
        match first {
            0x8a => return None,
            0x88 => return Some(u16::from_be_bytes([payload[0], payload[1]])),
            // A heartbeat's ping, say.
            _ => {}
        }
    }
}

/// A message begun in fragments and never finished holds the node's memory only for
/// `limits.message_timeout_ms`, whatever pings keep its socket alive; and all unfinished
/// messages of the node together hold at most 16 x `limits.max_ws_frame_bytes`: the fragment
/// that would pass it closes its socket 1013, and the budget comes back as sockets let go.
#[actix_rt::test]
async fn unfinished_fragmented_messages_are_bounded_in_time_and_in_bytes() {
    const LIMIT: usize = 64 << 10;
    // In time: pings every 100 ms keep the socket alive, not its unfinished message.
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.message_timeout_ms = 300;
    })
    .await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws.send_raw(awc::ws::Message::Continuation(Item::FirstBinary(Bytes::from(
        vec![b'x'; 16 << 10],
    ))))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let closed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "an unfinished message kept its socket open for 15 s with message_timeout_ms = 300"
        );
        if ws.send_raw(awc::ws::Message::Ping(Bytes::new())).await.is_err() {
            break ws.next(WAIT).await;
        }
        match ws.next(Duration::from_millis(100)).await {
            Err(_) => continue,
            other => break other,
        }
    };
    match closed {
        Ok(WsEvent::Closed(Some(r))) => {
            assert_eq!(u16::from(r.code), 1008, "{r:?}");
            assert!(format!("{r:?}").contains("message_timeout_ms"), "{r:?}");
        }
        other => panic!("expected a close 1008, got {other:?}"),
    }
    assert_eq!(rejected(&n, "message-timeout").await, 1.0);
    drop(n);

    // In bytes: 20 sockets each with 52 KiB of a message never finished (fragments of 16, 16,
    // 16 and 4 KiB), against a budget of 16 x 64 KiB: 19 of them hold 988 KiB, and the 20th is
    // closed 1013 at its second or third fragment (its reader counts a fragment's bytes as they
    // arrive, up to 24 KiB with the next one's first bytes, and the 36 KiB left do not take
    // them), and only it. One socket at a time: the next opens once the node answered the ping
    // behind this one's fragments, so it has counted them. Sent together, the node's HTTP
    // workers (two here) read several sockets at once: with four of them a 4 KiB fragment
    // short of a budget full to the byte, two refused at the same moment on the two workers
    // were both closed 1013 (seen in CI; once in 40 runs here, a print widening that moment).
    // TCP_NODELAY: no fragment waits for the others' ACK (Nagle), which bunched the last ones.
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_ws_frame_bytes = LIMIT;
        c.limits.max_envelope_bytes = LIMIT;
    })
    .await;
    let mut held = Vec::new();
    let mut closes = Vec::new();
    for i in 0..20 {
        let (code, mut s) = raw_upgrade(n.public_addr, true).await;
        assert_eq!(code, 101);
        s.set_nodelay(true).unwrap();
        let mut bytes = Vec::new();
        for (first, len) in [(0x02, 16 << 10), (0x00, 16 << 10), (0x00, 16 << 10), (0x00, 4 << 10)] {
            bytes.extend(client_frame(first, &vec![b'x'; len]));
        }
        bytes.extend(client_frame(0x89, b"counted"));
        s.write_all(&bytes).await.unwrap();
        if let Some(code) = pong_or_close(&mut s).await {
            closes.push((i, code));
        }
        held.push(s);
    }
    assert_eq!(closes, vec![(19, 1013)], "refused: (socket, close code)");
    assert_eq!(rejected(&n, "ws-fragments-budget").await, 1.0);
    // The others are open still, each answering a ping.
    for s in &mut held[..19] {
        s.write_all(&client_frame(0x89, b"still")).await.unwrap();
        assert_eq!(pong_or_close(s).await, None);
    }
    // Every socket lets go: the budget is whole again, and a fragmented message of nearly the
    // frame limit (more than 16 x 64 KiB less what the others held) is answered.
    drop(held);
    let comment = "c".repeat(40 << 10);
    let mut i = 0;
    eventually("a fragmented message once the others let go", || {
        i += 1;
        let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": format!("after-{i}"), "comment": comment, "response_requested": true, "~transport": {"return_route": "all"}});
        let a = &a;
        let n = &n;
        async move {
            let env = Bytes::from(a.pack(&ping).unwrap());
            assert!(env.len() > 48 << 10 && env.len() < LIMIT, "{}", env.len());
            let mut ws = a.websocket(&ws_url(n)).await.unwrap();
            let h = env.len() / 2;
            ws.send_raw(awc::ws::Message::Continuation(Item::FirstText(env.slice(..h)))).await.ok()?;
            ws.send_raw(awc::ws::Message::Continuation(Item::Last(env.slice(h..)))).await.ok()?;
            match ws.next(WAIT).await {
                Ok(WsEvent::Envelope(b)) => Some(a.unpack(&b).unwrap()),
                _ => None,
            }
        }
    })
    .await;
}

#[actix_rt::test]
async fn fragmented_frames_reassemble_and_oversized_ones_are_refused() {
    const LIMIT: usize = 64 << 10;
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_ws_frame_bytes = LIMIT;
        c.limits.max_envelope_bytes = LIMIT;
    })
    .await;
    // A valid envelope in four fragments (text), then in two (binary): both answered.
    // Each envelope its own message: a copy of one would be refused as a replay.
    let ping = |id: &str| json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": id, "response_requested": true, "~transport": {"return_route": "all"}});
    let env = Bytes::from(a.pack(&ping("frag")).unwrap());
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let q = env.len() / 4;
    ws.send_raw(awc::ws::Message::Continuation(Item::FirstText(env.slice(..q))))
        .await
        .unwrap();
    ws.send_raw(awc::ws::Message::Continuation(Item::Continue(env.slice(q..2 * q))))
        .await
        .unwrap();
    ws.send_raw(awc::ws::Message::Continuation(Item::Continue(env.slice(2 * q..3 * q))))
        .await
        .unwrap();
    ws.send_raw(awc::ws::Message::Continuation(Item::Last(env.slice(3 * q..))))
        .await
        .unwrap();
    let pong = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&pong), "ping_response");
    assert_eq!(pong["~thread"]["thid"], "frag");
    let env = Bytes::from(a.pack(&ping("frag-2")).unwrap());
    let q = env.len() / 4;
    ws.send_raw(awc::ws::Message::Continuation(Item::FirstBinary(env.slice(..q))))
        .await
        .unwrap();
    ws.send_raw(awc::ws::Message::Continuation(Item::Last(env.slice(q..))))
        .await
        .unwrap();
    assert_eq!(type_name(&ws_next_message(&a, &mut ws).await), "ping_response");

    // Fragments each under the limit that together pass it: closed 1009 once past it, before
    // the sender has sent ten times the limit (the node buffers no more than the limit).
    let mut big = a.websocket(&ws_url(&n)).await.unwrap();
    let chunk = Bytes::from(vec![b'x'; 16 << 10]);
    big.send_raw(awc::ws::Message::Continuation(Item::FirstBinary(chunk.clone())))
        .await
        .unwrap();
    let mut sent = chunk.len();
    let closed = loop {
        assert!(
            sent < 10 * LIMIT,
            "{sent} bytes of fragments accepted with max_ws_frame_bytes = {LIMIT}"
        );
        if big
            .send_raw(awc::ws::Message::Continuation(Item::Continue(chunk.clone())))
            .await
            .is_err()
        {
            break big.next(WAIT).await;
        }
        sent += chunk.len();
        if sent > LIMIT {
            // Past the limit: the close must come (the fragments never end).
            if let Ok(e) = big.next(Duration::from_millis(200)).await {
                break Ok(e);
            }
        }
    };
    match closed {
        Ok(WsEvent::Closed(Some(r))) => assert_eq!(u16::from(r.code), 1009, "{r:?}"),
        other => panic!("expected a close 1009, got {other:?}"),
    }

    // An HTTP body declared far over the limit: 413 after a few bytes of it, not at its end.
    let mut s = TcpStream::connect(n.public_addr).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nContent-Length: 1073741824\r\n\r\n",
    )
    .await
    .unwrap();
    s.write_all(&[b'x'; 4096]).await.unwrap();
    assert_eq!(status_line(&mut s).await, "HTTP/1.1 413 Payload Too Large");
    // Chunked, with no length to judge by: 413 once the chunks pass the limit, though the
    // body never ends.
    let s = TcpStream::connect(n.public_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = actix_rt::spawn(async move {
        wr.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/didcomm-envelope-enc\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await?;
        let piece = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
        for _ in 0..(2 * LIMIT / 0x4000) {
            wr.write_all(piece.as_bytes()).await?;
        }
        // Never the final chunk: the body does not end. Keep the socket open meanwhile.
        tokio::time::sleep(WAIT).await;
        Ok::<_, std::io::Error>(wr)
    });
    assert_eq!(status_line(&mut rd).await, "HTTP/1.1 413 Payload Too Large");
    writer.abort();
    // The node serves on.
    let pong = a.request(&ping("after")).await.unwrap().unwrap();
    assert_eq!(type_name(&pong), "ping_response");
}

fn keylist_update_msg(add: &[String], remove: &[String]) -> Value {
    let mut updates: Vec<Value> = add
        .iter()
        .map(|k| json!({"recipient_key": k, "action": "add"}))
        .collect();
    updates.extend(remove.iter().map(|k| json!({"recipient_key": k, "action": "remove"})));
    json!({
        "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
        "@id": mailroom::didcomm::message::new_id(),
        "updates": updates,
        "~transport": { "return_route": "all" },
    })
}

async fn keylist_len(a: &Agent) -> usize {
    let list = a
        .request(&json!({"@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-query", "@id": mailroom::didcomm::message::new_id(), "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&list), "keylist", "{list}");
    list["keys"].as_array().unwrap().len()
}

#[actix_rt::test]
async fn keylist_past_max_keys_per_connection_is_refused_whole_v1() {
    const MAX: usize = 50;
    let (_dir, n, mut a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_keys_per_connection = MAX;
    })
    .await;
    // One key from onboarding; fill up to the limit in two updates.
    let keys: Vec<KeyPair> = (0..MAX - 1).map(|_| a.new_recipient_key()).collect();
    let dids: Vec<String> = keys.iter().map(|k| k.did_key()).collect();
    let half = dids.len() / 2;
    for part in [&dids[..half], &dids[half..]] {
        let up = a.keylist_update(part, &[]).await.unwrap();
        assert!(up.iter().all(|u| u["result"] == "success"), "{up:?}");
    }
    assert_eq!(keylist_len(&a).await, MAX);
    // Over WebSocket, the refusal of one more key, and why.
    let extra: Vec<String> = (0..3).map(|_| a.new_recipient_key().did_key()).collect();
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let resp = ws_request(&a, &mut ws, &keylist_update_msg(&extra, &dids[..1])).await;
    assert_eq!(type_name(&resp), "keylist-update-response", "{resp}");
    let updated = resp["updated"].as_array().unwrap();
    assert_eq!(updated.len(), 4);
    assert!(updated.iter().all(|u| u["result"] == "server_error"), "{updated:?}");
    let why = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&why), "problem-report", "{why}");
    let text = why["description"]["en"].as_str().unwrap();
    assert!(
        text.contains("limits.max_keys_per_connection = 50") && text.contains("nothing applied"),
        "{text}"
    );
    // Nothing of it applied: the removal did not happen either.
    assert_eq!(keylist_len(&a).await, MAX);
    let routed = a.keylist_update(&[], &[dids[0].clone()]).await.unwrap();
    assert_eq!(routed[0]["result"], "success", "the key refused with it was still held");
    // Swapping keys at the limit is fine.
    let up = a.keylist_update(&extra[..1], &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success");
    assert_eq!(keylist_len(&a).await, MAX);
    // One update of a thousand keys (the most one message may carry): refused by the limit.
    let many: Vec<String> = (0..1000).map(|_| KeyPair::generate().did_key()).collect();
    let up = a.keylist_update(&many, &[]).await.unwrap();
    assert_eq!(up.len(), 1000);
    assert!(up.iter().all(|u| u["result"] == "server_error"));
    // A hundred thousand keys in one message: refused before any is read (the envelope is
    // over limits.max_envelope_bytes), and the node serves on.
    let huge: Vec<String> = (0..100_000).map(|i| format!("did:key:z6Mk{:0>44}", i)).collect();
    let env = a.pack(&keylist_update_msg(&huge, &[])).unwrap();
    assert!(env.len() > 4 << 20, "{} bytes", env.len());
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert_eq!(st, 413, "{body}");
    assert_eq!(keylist_len(&a).await, MAX);
}

#[actix_rt::test]
async fn keylist_past_max_keys_per_connection_is_refused_whole_v2() {
    const MAX: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.max_keys_per_connection = MAX;
    let n = start(&cfg);
    let v = get_json(&format!("{}/invitation?didcomm=v2", n.public_url())).await;
    let m = V2Mediator::from_invitation_url(v["invitation_url"].as_str().unwrap()).unwrap();
    let mut a = V2Agent::new(m).unwrap();
    a.onboard().await.unwrap(); // one recipient DID
    let dids: Vec<String> = (0..MAX - 1).map(|_| KeyPair::generate().did_key()).collect();
    let up = a.update("2.0", &dids, &[]).await.unwrap();
    assert!(up.iter().all(|u| u["result"] == "success"), "{up:?}");
    for version in ["2.0", "3.0"] {
        let more = vec![KeyPair::generate().did_key()];
        let up = a.update(version, &more, &[]).await.unwrap();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0]["result"], "server_error", "{version}: {up:?}");
    }
    // The reason comes as a problem report over a socket (the second reply).
    let mut s = a.live().await.unwrap();
    let more = [KeyPair::generate().did_key()];
    a.send(
        &mut s,
        &a.message(
            "https://didcomm.org/coordinate-mediation/2.0/keylist-update",
            json!({ "updates": [{ "recipient_did": more[0], "action": "add" }] }),
        ),
    )
    .await
    .unwrap();
    let mut saw_report = false;
    for _ in 0..4 {
        let r = a.recv(&mut s, WAIT).await.unwrap();
        if r["type"].as_str().unwrap_or_default().ends_with("/problem-report") {
            let comment = r["body"]["comment"].as_str().unwrap();
            assert!(comment.contains("limits.max_keys_per_connection = 5"), "{comment}");
            saw_report = true;
            break;
        }
    }
    assert!(saw_report, "no problem report saying why");
    let q = a
        .request(
            &a.message("https://didcomm.org/coordinate-mediation/2.0/keylist-query", json!({})),
            "keylist",
        )
        .await
        .unwrap();
    assert_eq!(q["body"]["keys"].as_array().unwrap().len(), MAX, "{q}");
}

/// An agent whose DID document names an endpoint that accepts connections and never answers
/// sends trust pings without a return route: each is answered by a POST to that endpoint,
/// which holds a socket for `delivery.endpoint_timeout_ms`. Those POSTs had no bound: a
/// stream of pings held a socket each until the node ran out of descriptors and refused its
/// wallets. A connection now has at most 2 reply POSTs under way and 256 sends waiting or
/// under way; the rest of its replies are dropped (counted), and other wallets are served.
#[actix_rt::test]
async fn replies_to_an_endpoint_that_never_answers_hold_a_bounded_number_of_sockets() {
    const PINGS: u64 = 300;
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/", tarpit.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    let pit = actix_rt::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tarpit.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Longer than the test: a POST to the tarpit is under way until the node stops.
    cfg.delivery.endpoint_timeout_ms = 600_000;
    let n = start(&cfg);
    let inv = invitation(&n).await;
    let a = Agent::connect_with_endpoint(&inv, Some(&endpoint)).await.unwrap();
    for i in 0..PINGS {
        let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": format!("p{i}"), "response_requested": true});
        assert_eq!(a.send(&ping).await.unwrap(), 202);
    }
    // Every ping handled: 2 replies under way, 254 waiting their turn, the rest dropped.
    eventually("the pings' replies sent or dropped", || async {
        (endpoint_posts(&n, "dropped").await == PINGS - 256).then_some(())
    })
    .await;
    eventually("the first replies at the endpoint", || async {
        (accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let open = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        open <= 2,
        "{open} sockets held open at the endpoint by one connection's replies"
    );
    // A wallet is served all the while.
    let (w, k) = Agent::onboard(&inv).await.unwrap();
    assert_eq!(forward_to(&n, &w, &k, "served").await, 202);
    pit.abort();
}

/// A handshake request (`didexchange` 1.1, or `connections` 1.0) from a fresh key presenting a
/// legacy DID whose two services list `routing` keys between them (one list holds at most
/// eight), authcrypted for the invitation key; answered on the return route.
fn handshake_with_routing_keys(protocol: &str, routing: &[String]) -> (KeyPair, Value) {
    let key = KeyPair::generate();
    let legacy = mailroom::didcomm::did::legacy_did_from_verkey(&key.public_bytes());
    let endpoints = ["http://127.0.0.1:9/".to_string(), "http://127.0.0.1:9/b".to_string()];
    let mut doc = mailroom::didcomm::did::legacy_diddoc(&legacy, &key.verkey(), &endpoints, &[]);
    let (first, second) = routing.split_at(routing.len() / 2);
    doc["service"][0]["routingKeys"] = json!(first);
    doc["service"][1]["routingKeys"] = json!(second);
    let mut req = if protocol == "didexchange" {
        json!({
            "@type": "https://didcomm.org/didexchange/1.1/request",
            "did": legacy,
            "did_doc~attach": { "@id": "d", "mime-type": "application/json", "data": { "json": doc } },
        })
    } else {
        json!({
            "@type": "https://didcomm.org/connections/1.0/request",
            "connection": { "DID": legacy, "DIDDoc": doc },
        })
    };
    req["@id"] = json!(mailroom::didcomm::message::new_id());
    req["label"] = json!("routed");
    req["~transport"] = json!({ "return_route": "all" });
    (key, req)
}

/// A handshake whose DID document lists more routing keys than a reply can be wrapped for
/// (`envelope::MAX_ROUTING_KEYS`, 8) is refused (400, saying why) before a connection is
/// stored. Before, the connection was stored with them all and every reply to it failed to
/// pack (then on its return route too: 500, its socket deliveries dropped; now what is sent to
/// its endpoint). Eight are taken.
#[actix_rt::test]
async fn a_handshake_with_more_routing_keys_than_a_reply_can_carry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let inv = invitation(&n).await;
    let routing = |count: usize| (0..count).map(|_| KeyPair::generate().verkey()).collect::<Vec<_>>();
    let connections = || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        v["connections"].as_array().unwrap().len()
    };
    for protocol in ["didexchange", "connections"] {
        let (key, req) = handshake_with_routing_keys(protocol, &routing(9));
        let env = mailroom::didcomm::envelope::pack(
            &serde_json::to_vec(&req).unwrap(),
            std::slice::from_ref(&inv.recipient_key),
            Some(&key),
        )
        .unwrap();
        let (status, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
        assert_eq!(status, 400, "{protocol}: {body}");
        assert!(
            body.contains("lists 9 routing keys") && body.contains("at most 8"),
            "{protocol}: {body}"
        );
        assert_eq!(connections().await, 0, "{protocol}: no connection stored");
    }
    for protocol in ["didexchange", "connections"] {
        let (key, req) = handshake_with_routing_keys(protocol, &routing(8));
        let env = mailroom::didcomm::envelope::pack(
            &serde_json::to_vec(&req).unwrap(),
            std::slice::from_ref(&inv.recipient_key),
            Some(&key),
        )
        .unwrap();
        let (status, body) = mailroom::client::post(&n.public_url(), env, WAIT).await.unwrap();
        assert_eq!(status, 200, "{protocol}: {}", String::from_utf8_lossy(&body));
        // The response on the return route is for the wallet itself: the routing keys name its
        // mediators, for what is sent to its endpoint (`single_node`'s
        // `return_route_replies_are_for_the_wallet_and_endpoint_replies_for_its_mediators`).
        let kids = mailroom::didcomm::envelope::recipient_kids(&body).unwrap();
        assert_eq!(kids, [key.verkey()], "{protocol}");
    }
    assert_eq!(connections().await, 2);
}

/// The store applies a keylist update's adds before its removes, whatever their order: a
/// wallet's `[remove K, add K]` on its registered K left K unregistered while both entries
/// were answered `no_change`, so the wallet believed K routed and forwards to K were refused
/// (404). An update naming one key twice, in any form, is now refused whole with a reason, in
/// DIDComm v1 and v2; K stays routed and its forwards queued for the wallet.
#[actix_rt::test]
async fn a_keylist_update_naming_a_key_twice_is_refused_and_the_key_stays_routed() {
    let (_dir, n, mut a, k) = node_with_wallet(Strategy::QueueOnly, |_| {}).await;
    a.endpoint = n.public_url();
    for (first, second) in [(k.did_key(), k.did_key()), (k.verkey(), k.did_key())] {
        let mut msg = keylist_update_msg(&[], &[first]);
        msg["updates"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "recipient_key": second, "action": "add" }));
        let r = a.request(&msg).await.unwrap().expect("a reply");
        assert_eq!(type_name(&r), "problem-report", "{r}");
        let why = r["description"]["en"].as_str().unwrap();
        assert!(
            why.contains("more than once") && why.contains("nothing applied"),
            "{why}"
        );
    }
    assert_eq!(keylist_len(&a).await, 1);
    assert_eq!(forward_to(&n, &a, &k, "still routed").await, 202);
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .expect("a delivery");
    assert_eq!(contents(&a, &d), ["still routed"]);

    // DIDComm v2: keylist-update 2.0 and recipient-update 3.0 alike.
    let v = get_json(&format!("{}/invitation?didcomm=v2", n.public_url())).await;
    let m = V2Mediator::from_invitation_url(v["invitation_url"].as_str().unwrap()).unwrap();
    let mut w = V2Agent::new(m).unwrap();
    let r = w.onboard().await.unwrap();
    for (typ, field) in [
        (
            "https://didcomm.org/coordinate-mediation/2.0/keylist-update",
            "recipient_did",
        ),
        (
            "https://didcomm.org/coordinate-mediation/3.0/recipient-update",
            "recipient_did",
        ),
    ] {
        let updates = json!([{ field: r, "action": "remove" }, { field: r, "action": "add" }]);
        let (status, reply) = w.post(&w.message(typ, json!({ "updates": updates }))).await.unwrap();
        assert_eq!(status, 400, "{typ}: {reply:?}");
        let reply = reply.expect("a problem report");
        assert!(reply["type"].as_str().unwrap().ends_with("/problem-report"), "{reply}");
        let comment = reply["body"]["comment"].as_str().unwrap();
        assert!(comment.contains("more than once"), "{comment}");
    }
    let sender = mailroom::client::v2::V2Sender::new().unwrap();
    assert_eq!(
        sender.forward(&r, &sender.basic(&r, "v2 still routed")).await.unwrap(),
        202
    );
    assert_eq!(w.status(None).await.unwrap(), 1);
}
