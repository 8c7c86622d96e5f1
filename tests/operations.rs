//! What an operator relies on: the admin endpoints (codes, fields, token rules), limits with
//! clear refusals that drop nothing already queued, message time-to-live, the CLI.

mod common;

use common::*;
use mailroom::client::{basic_message, Agent, Sender};
use mailroom::config::Strategy;
use mailroom::store::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

async fn forward(n: &mailroom::node::RunningNode, a: &Agent, key: &str, text: &str) -> u16 {
    let g = a.grant.clone().unwrap();
    Sender::new()
        .forward(&n.public_url(), &basic_message(text), key, &g.routing_keys)
        .await
        .unwrap()
}

#[actix_rt::test]
async fn admin_endpoints_show_connections_sessions_and_invitations() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // The lease taken below outlasts the checks that count it in flight.
    cfg.delivery.lease_ms = 60_000;
    let n = start(&cfg);
    let admin = n.admin_url();
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    for _ in 0..2 {
        Agent::connect(&inv).await.unwrap();
    }
    forward(&n, &a, &k.verkey(), "one").await;
    forward(&n, &a, &k.verkey(), "two").await;
    // Lease one over HTTP so it shows as in flight.
    a.request(&pickup("delivery-request", json!({"limit": 1})))
        .await
        .unwrap();

    // Pagination: 3 connections, 2 per page.
    let p1 = get_json(&format!("{admin}/connections?limit=2")).await;
    assert_eq!(p1["connections"].as_array().unwrap().len(), 2);
    let next = p1["next"].as_str().expect("a next cursor").to_string();
    let p2 = get_json(&format!("{admin}/connections?limit=2&after={next}")).await;
    assert_eq!(p2["connections"].as_array().unwrap().len(), 1);
    assert!(p2["next"].is_null());

    let all: Vec<Value> = [p1, p2]
        .iter()
        .flat_map(|p| p["connections"].as_array().unwrap().clone())
        .collect();
    let mediated = all
        .iter()
        .find(|c| c["mediation"] == "granted")
        .expect("the mediated connection");
    let id = mediated["id"].as_str().unwrap();
    let one = get_json(&format!("{admin}/connections/{id}")).await;
    assert_eq!(one["routing_keys"], json!([k.verkey()]));
    assert_eq!(one["queue"]["depth"], 2);
    assert_eq!(one["queue"]["in_flight"], 1);
    assert_eq!(one["queue"]["pending"], 1);
    assert!(one["queue"]["oldest_age_ms"].as_i64().unwrap() >= 0);
    let (st, _) = get_status(&format!("{admin}/connections/no-such-id"), None).await;
    assert_eq!(st, 404);

    // A live session shows up in /sessions and /status.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws_request(
        &a,
        &mut ws,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    let sessions = get_json(&format!("{admin}/sessions")).await;
    assert_eq!(sessions["sessions"][0]["connection"], id);
    let status = get_json(&format!("{admin}/status")).await;
    assert_eq!(status["sessions"], 1);
    assert_eq!(status["store"]["backend"], "sled");
    assert_eq!(status["store"]["health"], "ok");
    // The queue log on this node's disk: what it holds, and no damage found there.
    let log = &status["store"]["queue_log"];
    assert!(log["bytes"].as_u64().unwrap() > 0, "{log}");
    assert_eq!(
        (&log["damaged_records"], &log["damaged_segments"]),
        (&json!(0), &json!(0))
    );
    let cluster = get_json(&format!("{admin}/cluster")).await;
    assert_eq!(cluster["node"], "n1");

    // A fresh invitation is usable.
    let (st, body) = post_raw(&format!("{admin}/invitations"), "application/json", vec![]).await;
    assert_eq!(st, 201, "{body}");
    let fresh: Value = serde_json::from_str(&body).unwrap();
    assert_ne!(fresh["invitation"]["@id"], inv.id.as_str());
    let fresh_inv = mailroom::client::Invitation::from_url(fresh["invitation_url"].as_str().unwrap()).unwrap();
    Agent::connect(&fresh_inv)
        .await
        .expect("connect through a fresh invitation");
    assert_eq!(fresh["multi_use"], false, "single-use by default");
    let again = Agent::connect(&fresh_inv)
        .await
        .err()
        .expect("a single-use invitation admits one")
        .to_string();
    assert!(again.contains("410") && again.contains("invitation-used"), "{again}");
    let (st, body) = post_raw(
        &format!("{admin}/invitations"),
        "application/json",
        br#"{"multi_use": true}"#.to_vec(),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let multi: Value = serde_json::from_str(&body).unwrap();
    let multi_inv = mailroom::client::Invitation::from_url(multi["invitation_url"].as_str().unwrap()).unwrap();
    Agent::connect(&multi_inv).await.expect("first");
    Agent::connect(&multi_inv)
        .await
        .expect("second through a multi-use invitation");
    let (st, _) = post_raw(&format!("{admin}/invitations"), "application/json", b"{nope".to_vec()).await;
    assert_eq!(st, 400);

    // Metrics carry the operator's counters.
    let (_, text) = get_status(&format!("{admin}/metrics"), None).await;
    for name in [
        "mailroom_forwards_received_total",
        "mailroom_forwards_queued_total",
        "mailroom_delivered_total{path=\"pickup\",didcomm=\"v1\"}",
        "mailroom_sessions",
        "mailroom_queue_depth",
        "mailroom_oldest_message_age_seconds",
        "mailroom_forward_seconds_bucket",
        "mailroom_store_seconds_bucket{le=\"0.00005\",op=\"enqueue\"}",
        "mailroom_store_seconds_count{op=\"route\"}",
        "mailroom_cluster_notifications_sent_total",
        "mailroom_queue_log_bytes",
        "mailroom_queue_log_damaged_records 0",
        "mailroom_queue_log_damaged_segments 0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    // Two messages are queued: the sled store's queue log holds them on disk.
    let log_bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("mailroom_queue_log_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("mailroom_queue_log_bytes has a value");
    assert!(log_bytes > 0, "queue log bytes: {log_bytes}");
    ws.close().await;
}

#[actix_rt::test]
async fn admin_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.admin.token = Some("s3cret-token".into());
    let n = start(&cfg);
    let admin = n.admin_url();
    for path in ["/status", "/cluster", "/sessions", "/connections", "/metrics"] {
        let (st, _) = get_status(&format!("{admin}{path}"), None).await;
        assert_eq!(st, 401, "{path} without a token");
        let (st, _) = get_status(&format!("{admin}{path}"), Some("wrong")).await;
        assert_eq!(st, 401, "{path} with a wrong token");
        let (st, _) = get_status(&format!("{admin}{path}"), Some("s3cret-token")).await;
        assert_eq!(st, 200, "{path} with the token");
    }
    let (st, _) = post_raw(&format!("{admin}/invitations"), "application/json", vec![]).await;
    assert_eq!(st, 401);
    // Probes stay open for load balancers.
    assert_eq!(get_status(&format!("{admin}/health"), None).await.0, 200);
    assert_eq!(get_status(&format!("{admin}/ready"), None).await.0, 200);
}

/// `/ready` takes no token, and on PostgreSQL each store health check is a statement on the
/// forwards' pool: a flood of probes asks the store about once a second, not once a probe.
#[actix_rt::test]
async fn a_flood_of_readiness_probes_asks_the_store_once_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let ready = format!("{}/ready", n.admin_url());
    let checks = || async {
        metric(&n, r#"mailroom_store_seconds_count{op="health"}"#)
            .await
            .unwrap_or(0.0)
    };
    assert_eq!(get_status(&ready, None).await.0, 200);
    let before = checks().await;
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all((0..200).map(|_| get_status(&ready, None))).await;
    let took = started.elapsed();
    assert!(answers.iter().all(|(st, _)| *st == 200), "every probe ready");
    let asked = checks().await - before;
    let allowed = took.as_secs_f64().ceil() + 1.0;
    assert!(
        asked <= allowed,
        "200 probes in {took:?} asked the store {asked} times (at most {allowed})"
    );
}

/// A request to the admin listener with extra headers: (status, JSON body or Null).
async fn admin_with(method: &str, url: &str, headers: &[(&str, String)]) -> (u16, Value) {
    let client = awc::Client::default();
    let mut req = match method {
        "POST" => client.post(url),
        "DELETE" => client.delete(url),
        _ => client.get(url),
    };
    for (k, v) in headers {
        req = req.insert_header((*k, v.as_str()));
    }
    let mut res = req.send().await.expect("admin request");
    let body = res.body().await.unwrap_or_default();
    (
        res.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Without a token the admin listener trusts loopback, so a browser on the same machine must
/// not be able to drive it: a page's no-cors POST (its `Origin`, its `Sec-Fetch-Site`) and DNS
/// rebinding (its name in `Host`) get 403, a page of another local server (a dev server on
/// the next port) as much as one on the internet; the CLI, the status page and local tools
/// (loopback Host) still work. A token-guarded listener is unchanged.
#[actix_rt::test]
async fn a_tokenless_admin_answers_only_loopback_hosts_and_no_foreign_origin() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let admin = n.admin_url();
    let port = n.admin_addr.port();
    let ready = format!("{admin}/ready");
    let host = |h: &str| ("Host", h.to_string());
    let origin = |o: &str| ("Origin", o.to_string());
    let fetch_site = |s: &str| ("Sec-Fetch-Site", s.to_string());
    let own_host = format!("127.0.0.1:{port}");
    let next_port = port.checked_add(1).unwrap_or(port - 1);

    for headers in [
        vec![host("evil.example")],
        vec![host(&format!("evil.example:{port}"))],
        vec![origin("https://evil.example")],
        vec![origin("null")],
        vec![
            host(&format!("localhost:{port}")),
            origin("http://127.0.0.1.evil.example"),
        ],
        // Another local server's page: another port, scheme or name of this machine.
        vec![host(&own_host), origin(&format!("http://127.0.0.1:{next_port}"))],
        vec![host(&own_host), origin(&format!("https://127.0.0.1:{port}"))],
        vec![host(&own_host), origin(&format!("http://localhost:{port}"))],
        vec![host(&own_host), origin("http://localhost:3000")],
        // A page of another site, whatever else it sends.
        vec![host(&own_host), fetch_site("cross-site")],
        vec![host(&own_host), fetch_site("same-site")],
    ] {
        let (st, body) = admin_with("POST", &format!("{admin}/drain"), &headers).await;
        assert_eq!(st, 403, "{headers:?}: {body}");
        assert_eq!(body["error"], "forbidden", "{body}");
        assert!(body["reason"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
        assert_eq!(get_status(&ready, None).await.0, 200, "not drained by {headers:?}");
    }
    // DNS rebinding reads nothing either, probes included.
    for path in ["/connections", "/status", "/ready", "/"] {
        let (st, _) = admin_with("GET", &format!("{admin}{path}"), &[host("rebound.evil.example")]).await;
        assert_eq!(st, 403, "GET {path}");
    }

    // Loopback names, with or without port; a same-origin page's Origin; what a browser
    // sends from the status page or the address bar.
    for headers in [
        vec![host(&format!("localhost:{port}"))],
        vec![host("localhost")],
        vec![host("127.0.0.1")],
        vec![origin(&admin)],
        vec![
            host(&format!("localhost:{port}")),
            origin(&format!("http://localhost:{port}")),
        ],
        vec![origin(&admin), fetch_site("same-origin")],
        vec![fetch_site("none")],
    ] {
        let (st, body) = admin_with("GET", &format!("{admin}/status"), &headers).await;
        assert_eq!(st, 200, "{headers:?}: {body}");
    }
    let (st, body) = admin_with("POST", &format!("{admin}/drain"), &[host(&format!("127.0.0.1:{port}"))]).await;
    assert_eq!((st, body["draining"].clone()), (200, json!(true)), "{body}");
    assert_eq!(get_status(&ready, None).await.0, 503, "drained");
    let (st, _) = admin_with("POST", &format!("{admin}/undrain"), &[]).await;
    assert_eq!(st, 200);
    assert_eq!(get_status(&ready, None).await.0, 200);

    // With a token, the token decides, whatever the Host or Origin.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.admin.token = Some("s3cret-token".into());
    let t = start(&cfg);
    let bearer = ("Authorization", "Bearer s3cret-token".to_string());
    let url = format!("{}/status", t.admin_url());
    let (st, _) = admin_with("GET", &url, &[host("evil.example"), origin("https://evil.example")]).await;
    assert_eq!(st, 401);
    let (st, _) = admin_with(
        "GET",
        &url,
        &[host("evil.example"), origin("https://evil.example"), bearer],
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(get_status(&format!("{}/ready", t.admin_url()), None).await.0, 200);
}

/// A reverse proxy on the same machine reaches a tokenless admin listener from loopback with
/// anyone's request (and may pass the loopback `Host` along): without a token, a request
/// carrying a proxy's headers is refused. With a token, the token decides.
#[actix_rt::test]
async fn a_tokenless_admin_refuses_requests_that_came_through_a_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let admin = n.admin_url();
    let ready = format!("{admin}/ready");
    let own_host = ("Host", format!("127.0.0.1:{}", n.admin_addr.port()));
    for (name, value) in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("Via", "1.1 proxy"),
    ] {
        let headers = [own_host.clone(), (name, value.to_string())];
        let (st, body) = admin_with("POST", &format!("{admin}/drain"), &headers).await;
        assert_eq!(st, 403, "{name}: {body}");
        assert_eq!(body["error"], "forbidden", "{body}");
        assert!(body["reason"].as_str().is_some_and(|r| r.contains("proxy")), "{body}");
        assert_eq!(get_status(&ready, None).await.0, 200, "not drained through {name}");
    }

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.admin.token = Some("s3cret-token".into());
    let t = start(&cfg);
    let headers = [
        ("X-Forwarded-For", "203.0.113.9".to_string()),
        ("Authorization", "Bearer s3cret-token".to_string()),
    ];
    let (st, body) = admin_with("GET", &format!("{}/status", t.admin_url()), &headers).await;
    assert_eq!(st, 200, "{body}");
}

/// Every operator action on a token-guarded admin listener is refused 401 without the token
/// and with a wrong one, and changes nothing.
#[actix_rt::test]
async fn every_operator_action_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.admin.token = Some("s3cret-token".into());
    let n = start(&cfg);
    let admin = n.admin_url();
    let (_a, _k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let token = |t: &str| ("Authorization", format!("Bearer {t}"));
    let (_, list) = admin_with("GET", &format!("{admin}/connections"), &[token("s3cret-token")]).await;
    let id = list["connections"][0]["id"].as_str().expect("a connection").to_string();
    let denied = r#"{"state": "denied"}"#;
    let actions = [
        ("DELETE", format!("/connections/{id}"), ""),
        ("DELETE", format!("/connections/{id}/queue"), ""),
        ("POST", format!("/connections/{id}/mediation"), denied),
        ("POST", "/drain".to_string(), ""),
        ("POST", "/undrain".to_string(), ""),
        ("POST", "/reload".to_string(), ""),
        ("POST", "/invitations".to_string(), r#"{"multi_use": true}"#),
    ];
    for (method, path, body) in &actions {
        for auth in [None, Some(token("wrong-token")), Some(token("s3cret-tokenX"))] {
            let req = match *method {
                "DELETE" => client().delete(format!("{admin}{path}")),
                _ => client().post(format!("{admin}{path}")),
            };
            let req = match &auth {
                Some(h) => req.insert_header(h.clone()),
                None => req,
            };
            let res = req
                .insert_header(("Content-Type", "application/json"))
                .send_body(body.to_string())
                .await
                .expect("admin request");
            assert_eq!(res.status().as_u16(), 401, "{method} {path} with {auth:?}");
            assert!(res.headers().contains_key("www-authenticate"), "{method} {path}");
        }
    }
    // Nothing was done: still ready, the connection still there and mediated.
    assert_eq!(get_status(&format!("{admin}/ready"), None).await.0, 200);
    let (st, c) = admin_with("GET", &format!("{admin}/connections/{id}"), &[token("s3cret-token")]).await;
    assert_eq!((st, c["mediation"].as_str()), (200, Some("granted")), "{c}");
}

/// Whether the node closes `s` (EOF or reset) within `within`, reading and dropping whatever
/// else it sends.
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// A node whose public head timeout (`limits.client_timeout_ms`) is 500 ms, a raw connection
/// to its admin listener, and the `Host` that listener accepts.
async fn raw_admin_connection() -> (
    tempfile::TempDir,
    mailroom::node::RunningNode,
    tokio::net::TcpStream,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.client_timeout_ms = 500;
    let n = start(&cfg);
    let s = tokio::net::TcpStream::connect(n.admin_addr).await.unwrap();
    let host = format!("127.0.0.1:{}", n.admin_addr.port());
    (dir, n, s, host)
}

/// An operator action whose body never comes holds no admin connection: without the token
/// it is refused 401 at once (its body is not read), and with it the body must be whole within
/// `admin::MIN_CLIENT_TIMEOUT` (408). Before, the body was read before the token was checked,
/// with no time limit: anyone who reached the listener held its connections (256 of them took
/// `/health` and `/ready` down) with heads that declared a body they never sent.
#[actix_rt::test]
async fn an_operator_actions_body_that_never_comes_holds_no_admin_connection() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.admin.token = Some("s3cret-token".into());
    let n = start(&cfg);
    let host = format!("127.0.0.1:{}", n.admin_addr.port());
    for path in ["/invitations", "/connections/some-id/mediation"] {
        for (auth, status) in [("", "401"), ("Authorization: Bearer s3cret-token\r\n", "408")] {
            let mut s = tokio::net::TcpStream::connect(n.admin_addr).await.unwrap();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let line = read_answer(&mut s).await;
            assert!(
                line.starts_with(&format!("HTTP/1.1 {status}")),
                "{path} {auth:?}: {line}"
            );
            assert!(closed_within(&mut s, WAIT).await, "{path}: the connection is let go");
        }
    }
    let with = |t: &str| ("Authorization", format!("Bearer {t}"));
    let (status, _) = admin_with(
        "POST",
        &format!("{}/invitations", n.admin_url()),
        &[with("s3cret-token")],
    )
    .await;
    assert_eq!(status, 201, "an action without a body is still served");
}

/// The admin listener guards its connections as the public one does: a kept-alive
/// connection whose next request head never ends (one byte of it, then silence) is closed
/// once `limits.client_timeout_ms` passed. actix times only a connection's first head, so
/// before, this held a connection of the admin's only worker forever, and enough of them took
/// the listener (and `/ready`) down. The admin's head timeout is at least
/// `admin::MIN_CLIENT_TIMEOUT` (2 s): still well before actix's 5 s keep-alive.
#[actix_rt::test]
async fn a_slow_client_on_a_kept_alive_admin_connection_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let (_dir, n, mut s, host) = raw_admin_connection().await;
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s).await, "HTTP/1.1 200 OK");
    // After the answer: the byte ends actix's keep-alive wait, and no head timer runs.
    s.write_all(b"G").await.unwrap();
    let started = std::time::Instant::now();
    // Without the watchdog, held for as long as the client stays (WAIT here).
    assert!(
        closed_within(&mut s, WAIT).await,
        "a kept-alive admin connection with one byte of its next head was held {:?}",
        started.elapsed()
    );
    // Closed by the head timeout (2 s), not at the end of the client's patience.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "held {:?} with limits.client_timeout_ms = 500",
        started.elapsed()
    );
    // The listener goes on serving.
    assert_eq!(get_status(&format!("{}/ready", n.admin_url()), None).await.0, 200);
}

/// `limits.client_timeout_ms` is tuned for wallets on the public listener; a health check
/// whose head takes longer than that (a busy prober, or the node's own admin worker not
/// scheduled for that long on a loaded box) is still answered, up to
/// `admin::MIN_CLIENT_TIMEOUT`. With the public limit of 500 ms applied to the admin too, a
/// node under load answered its load balancer's `/ready` with 408 (seen in CI).
#[actix_rt::test]
async fn a_health_check_slower_than_the_public_head_timeout_is_answered() {
    use tokio::io::AsyncWriteExt;
    let (_dir, _n, mut s, host) = raw_admin_connection().await;
    s.write_all(b"GET /ready HTTP/1.1\r\n").await.unwrap();
    // Past the public limit, well inside the admin's.
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    s.write_all(format!("Host: {host}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(read_answer(&mut s).await, "HTTP/1.1 200 OK");
}

/// The admin listener serves at most `ADMIN_MAX_CONNECTIONS` connections at once (each holds
/// two of the files the node keeps for itself): one more waits in the backlog, unanswered,
/// until one of them ends.
#[actix_rt::test]
async fn the_admin_listener_serves_at_most_its_connection_cap() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Idle connections are held for the test's length, not closed as slow.
    cfg.limits.client_timeout_ms = 120_000;
    let n = start(&cfg);
    let mut held = Vec::new();
    for _ in 0..mailroom::config::ADMIN_MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(n.admin_addr).await.unwrap());
    }
    // Each of them is being served: the last one answers.
    let host = format!("127.0.0.1:{}", n.admin_addr.port());
    let health = format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let last = held.last_mut().unwrap();
    last.write_all(health.as_bytes()).await.unwrap();
    assert_eq!(read_answer(last).await, "HTTP/1.1 200 OK");
    let mut one_more = tokio::net::TcpStream::connect(n.admin_addr).await.unwrap();
    one_more.write_all(health.as_bytes()).await.unwrap();
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(std::time::Duration::from_millis(500), one_more.peek(&mut b)).await;
    assert!(early.is_err(), "a connection past the cap was served: {early:?}");
    drop(held.remove(0));
    assert_eq!(read_answer(&mut one_more).await, "HTTP/1.1 200 OK");
}

/// A peer's admin listener answering the node's read of its history with a redirect does not
/// send the node elsewhere: the redirect's target gets no request (the node's signed read,
/// sent from inside the cluster's network, would go wherever the answer names), and the peer
/// shows unreachable.
#[actix_rt::test]
async fn a_peers_history_is_read_without_following_its_redirect() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.cluster.secret = Some("operations-test-secret".into());
    let l = mailroom::node::bind_ephemeral(&mut cfg, "n1", true).unwrap();
    // The peer n2 runs no node: its configured admin address answers every request with a
    // redirect to the recorder, which must never be asked anything.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let recorder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    recorder.set_nonblocking(true).unwrap();
    let recorder_addr = recorder.local_addr().unwrap();
    cfg.nodes.push(mailroom::config::NodeEntry {
        id: "n2".into(),
        listen: common::cluster::free_addr(),
        cluster: Some(common::cluster::free_addr()),
        admin: peer.local_addr().unwrap().to_string(),
    });
    let n = mailroom::node::spawn(cfg, "n1", l, Default::default()).expect("node starts");
    let history_url = format!("{}/history", n.admin_url());
    let (asked, history) = tokio::join!(
        tokio::task::spawn_blocking(move || {
            // The request's head, read to its blank line, answered with a redirect.
            peer.set_nonblocking(true).unwrap();
            let deadline = std::time::Instant::now() + WAIT;
            let mut s = loop {
                match peer.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(e) => panic!("n1 never read n2's history: {e}"),
                }
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            write!(
                s,
                "HTTP/1.1 302 Found\r\nLocation: http://{recorder_addr}/history?scope=node\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            String::from_utf8_lossy(&head).into_owned()
        }),
        get_json(&history_url)
    );
    let asked = asked.unwrap().to_lowercase();
    assert!(asked.starts_with("get /history?scope=node"), "{asked}");
    let n2 = history["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "n2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(n2["reachable"], false, "{history}");
    assert!(
        n2["error"].as_str().is_some_and(|e| e.contains("302")),
        "a redirect is the peer unreachable: {n2}"
    );
    // A redirect followed would have connected (the kernel completes it, into the backlog)
    // before n1 answered.
    match recorder.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the redirect was followed to the recorder: {other:?}"),
    }
}

#[actix_rt::test]
async fn a_full_queue_refuses_new_forwards_and_keeps_what_it_has() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.limits.max_queue_messages = 3;
    })
    .await;
    for i in 0..3 {
        assert_eq!(forward(&n, &a, &k.verkey(), &format!("q{i}")).await, 202);
    }
    let g = a.grant.clone().unwrap();
    let env = Sender::new()
        .forward_envelope(&basic_message("one too many"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("queue-full"), "{body}");
    // An anonymous sender learns the queue is full, not how much it holds.
    assert!(!body.contains("messages") && !body.contains("bytes"), "{body}");
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    let got = contents(&a, &d);
    assert_eq!(got, vec!["q0", "q1", "q2"]);
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert!(
        text.contains("mailroom_rejected_total{reason=\"queue-full\",didcomm=\"v1\"} 1"),
        "{text}"
    );
}

/// A sender forwarding over its WebSocket to a wallet whose queue is full is answered
/// `queue-full` each time and its socket stays open: a refusal for the node's state is not a
/// bad frame of the client's (20 of those in a row close the socket 1008).
#[actix_rt::test]
async fn forwards_refused_for_a_full_queue_do_not_close_the_senders_socket() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.limits.max_queue_messages = 1;
    })
    .await;
    assert_eq!(forward(&n, &a, &k.verkey(), "the one").await, 202);
    let g = a.grant.clone().unwrap();
    let sender = Sender::new();
    let mut ws = mailroom::client::websocket(&ws_url(&n)).await.unwrap();
    for i in 0..30 {
        let env = sender
            .forward_envelope(&basic_message(&format!("over-{i}")), &k.verkey(), &g.routing_keys)
            .unwrap();
        ws.send_envelope(env, true).await.unwrap();
        match ws.next(WAIT).await.unwrap() {
            mailroom::client::WsEvent::Envelope(b) => {
                let answer = String::from_utf8_lossy(&b);
                assert!(answer.contains("queue-full"), "forward {i}: {answer}");
            }
            other => panic!("forward {i}: {other:?}"),
        }
    }
    ws.close().await;
}

#[actix_rt::test]
async fn queue_bytes_limit_refuses_too() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.limits.max_queue_bytes = 10_000;
    })
    .await;
    let big = "x".repeat(1500);
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(forward(&n, &a, &k.verkey(), &big).await);
    }
    let accepted = codes.iter().filter(|c| **c == 202).count();
    assert!(accepted >= 2, "{codes:?}");
    // Eight ~2 kB messages do not fit in 10 000 bytes: the limit must refuse some of them.
    assert!(
        accepted < codes.len() && codes.contains(&429),
        "nothing refused at max_queue_bytes = 10000: {codes:?}"
    );
    assert!(
        codes[accepted..].iter().all(|c| *c == 429),
        "accepted until full, then refused: {codes:?}"
    );
    assert_eq!(queue_depth(&n).await, accepted as u64);
    // Refused because of the byte limit (not the message count): what is queued fits in it,
    // and one more message of the same size would not.
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    let conn = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mediation"] == "granted")
        .expect("the mediated connection")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let one = get_json(&format!("{}/connections/{conn}", n.admin_url())).await;
    let bytes = one["queue"]["bytes"].as_u64().expect("queue.bytes");
    let per_message = bytes / accepted as u64;
    assert!(bytes <= 10_000, "queued {bytes} bytes over the 10000 limit");
    assert!(
        bytes + per_message > 10_000,
        "refused with room left: {bytes} bytes queued, {per_message} per message"
    );
}

#[actix_rt::test]
async fn messages_past_their_time_to_live_are_expired_and_counted() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.limits.message_ttl_secs = 1;
    })
    .await;
    forward(&n, &a, &k.verkey(), "short-lived").await;
    eventually("the message expires", || async {
        (queue_depth(&n).await == 0).then_some(())
    })
    .await;
    // The sweep counts what the store call removed once that call has returned: the queue can
    // read empty a moment before the counter moves.
    eventually("the expiry is counted", || async {
        metric(&n, "mailroom_expired_total").await.filter(|v| *v > 0.0)
    })
    .await;
    assert_eq!(metric(&n, "mailroom_expired_total").await, Some(1.0));
}

#[actix_rt::test]
async fn sessions_beyond_the_limit_are_refused() {
    let (_dir, n, a, _) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.limits.max_sessions = 1;
    })
    .await;
    let _first = a.websocket(&ws_url(&n)).await.unwrap();
    assert!(
        a.websocket(&ws_url(&n)).await.is_err(),
        "a second socket must be refused"
    );
    // The refusal is a 503 with the reason, for an operator reading the wallet's logs.
    assert_session_limit_refusal(&ws_url(&n)).await;
}

/// A WebSocket upgrade at `ws_url` is refused 503 `session-limit`.
async fn assert_session_limit_refusal(ws_url: &str) {
    let mut res = awc::Client::default()
        .get(ws_url.replace("ws://", "http://"))
        .insert_header(("Upgrade", "websocket"))
        .insert_header(("Connection", "Upgrade"))
        .insert_header(("Sec-WebSocket-Version", "13"))
        .insert_header(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 503);
    let body = res.body().await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("session-limit"));
}

/// The node's store, except that while `fail_removals` is set, removing routing keys fails
/// (`update_keys` with removals, `revoke_mediation`), as when the database goes away in the
/// middle of an operator's revocation.
struct FailingRemovals {
    inner: Arc<dyn Store>,
    fail_removals: AtomicBool,
    /// Routed enqueues (forwards) take this long, and how many are under way.
    slow_forwards_ms: std::sync::atomic::AtomicU64,
    forwards_under_way: std::sync::atomic::AtomicUsize,
    /// The next lookup of a connection by this peer key deletes the connection it finds
    /// once it has been read: the operator's `DELETE /connections/{id}` landing just after.
    delete_after_lookup: std::sync::Mutex<Option<String>>,
    /// Once set, the next connection write fails (as a store going away in the middle of a
    /// handshake, after its invitation was claimed).
    fail_next_connection_write: AtomicBool,
}

impl FailingRemovals {
    fn check(&self) -> StoreResult<()> {
        if self.fail_removals.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: the store went away".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for FailingRemovals {
    async fn update_keys(
        &self,
        conn: &str,
        add: &[String],
        remove: &[String],
    ) -> StoreResult<Vec<(String, KeyUpdate)>> {
        if !remove.is_empty() {
            self.check()?;
        }
        self.inner.update_keys(conn, add, remove).await
    }
    async fn revoke_mediation(&self, id: &str, updated_at_ms: i64) -> StoreResult<Option<Vec<String>>> {
        self.check()?;
        self.inner.revoke_mediation(id, updated_at_ms).await
    }
    async fn put_connection(&self, c: &Connection) -> StoreResult<()> {
        if self.fail_next_connection_write.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected: the store went away".into()));
        }
        self.inner.put_connection(c).await
    }
    async fn enqueue_routed(
        &self,
        msgs: Vec<mailroom::store::NewMessage>,
        limits: &mailroom::store::EnqueueLimits,
    ) -> StoreResult<Vec<StoreResult<mailroom::store::Enqueued>>> {
        let slow = self.slow_forwards_ms.load(Ordering::SeqCst);
        self.forwards_under_way.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(slow)).await;
        let r = self.inner.enqueue_routed(msgs, limits).await;
        self.forwards_under_way.fetch_sub(1, Ordering::SeqCst);
        r
    }
    async fn connection_by_their_verkey(&self, verkey: &str) -> StoreResult<Option<Connection>> {
        let found = self.inner.connection_by_their_verkey(verkey).await?;
        let armed = {
            let mut d = self.delete_after_lookup.lock().unwrap();
            (d.as_deref() == Some(verkey)).then(|| d.take())
        };
        if let (Some(_), Some(c)) = (armed, &found) {
            self.inner.delete_connection(&c.id).await?;
        }
        Ok(found)
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, lease, lease_upto, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued, connections_with_pending,
        pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token,
        push_event, push_take_due, push_done, delete_connection, delete_unmediated, drop_queue, top_queues,
        first_sight, forget_sight, prune_sights,
    );
}

/// A node on a [`FailingRemovals`] store (not failing) with one onboarded wallet, its key, and
/// its connection id.
/// A node's directory, the node, its store, an onboarded wallet, its key, its connection id.
type NodeOnFailingRemovals = (
    tempfile::TempDir,
    mailroom::node::RunningNode,
    Arc<FailingRemovals>,
    Agent,
    mailroom::didcomm::keys::KeyPair,
    String,
);

async fn node_on_failing_removals() -> NodeOnFailingRemovals {
    node_on_failing_removals_with(Strategy::QueueOnly).await
}

/// [`node_on_failing_removals`] under `strategy`.
async fn node_on_failing_removals_with(strategy: Strategy) -> NodeOnFailingRemovals {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), strategy);
    let store = Arc::new(FailingRemovals {
        inner: open_sled(&dir.path().join("data")).await.unwrap(),
        fail_removals: AtomicBool::new(false),
        slow_forwards_ms: Default::default(),
        forwards_under_way: Default::default(),
        delete_after_lookup: Default::default(),
        fail_next_connection_write: AtomicBool::new(false),
    });
    let n = start_on(&cfg, store.clone());
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let id = common::cluster::a_connection_id(&n).await;
    (dir, n, store, a, k, id)
}

/// The store fails the connection write of a handshake after its single-use invitation was
/// claimed (503): the wallet's retry with the same key gets its connection, and the invitation
/// stays refused to anyone else. Before, the claim was spent on the failed attempt and the
/// wallet the operator minted the invitation for got 410 `invitation-used` for good.
#[actix_rt::test]
async fn a_handshake_the_store_failed_after_the_claim_is_retried_by_its_wallet_alone() {
    use mailroom::didcomm::{did, envelope, keys::KeyPair, message::new_id};
    let (_dir, n, store, _a, _k, _id) = node_on_failing_removals().await;
    let (st, body) = post_raw(&format!("{}/invitations", n.admin_url()), "application/json", vec![]).await;
    assert_eq!(st, 201, "{body}");
    let minted: Value = serde_json::from_str(&body).unwrap();
    let inv = mailroom::client::Invitation::from_url(minted["invitation_url"].as_str().unwrap()).unwrap();
    let key = KeyPair::generate();
    let wallet_did = did::create_peer4(&key.verkey(), &["didcomm:transport/queue".into()], &[]);
    let request = || {
        let req = json!({
            "@type": "https://didcomm.org/didexchange/1.1/request",
            "@id": new_id(),
            "label": "retried",
            "did": wallet_did,
            "~thread": { "pthid": inv.id },
            "~transport": { "return_route": "all" },
        });
        envelope::pack(
            &serde_json::to_vec(&req).unwrap(),
            std::slice::from_ref(&inv.recipient_key),
            Some(&key),
        )
        .unwrap()
    };
    store.fail_next_connection_write.store(true, Ordering::SeqCst);
    let (status, body) = mailroom::client::post(&inv.http, request(), WAIT).await.unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let connections = || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        v["connections"].as_array().unwrap().len()
    };
    assert_eq!(connections().await, 1, "the failed handshake made nothing");
    // Someone else first: the claim is the wallet's.
    let other = mailroom::client::Agent::connect(&inv)
        .await
        .err()
        .expect("the invitation is claimed")
        .to_string();
    assert!(other.contains("410") && other.contains("invitation-used"), "{other}");
    let (status, body) = mailroom::client::post(&inv.http, request(), WAIT).await.unwrap();
    assert_eq!(status, 200, "the wallet's retry: {}", String::from_utf8_lossy(&body));
    assert_eq!(connections().await, 2);
    let after = mailroom::client::Agent::connect(&inv)
        .await
        .err()
        .expect("still single-use")
        .to_string();
    assert!(after.contains("410") && after.contains("invitation-used"), "{after}");
}

/// A DIDComm v2 wallet rotates its DID (`from_prior`) while the operator deletes its
/// connection: the delete lands after the rotation read the connection. The rotation wrote
/// back the record it had read, and the deleted wallet was back, with its mediation granted
/// and its new DID routed. It is a patch of the stored record now, which finds nothing.
#[actix_rt::test]
async fn a_rotation_racing_the_operators_delete_does_not_bring_the_connection_back() {
    let (_dir, n, store, _a, _k, _id) = node_on_failing_removals_with(Strategy::QueueAndLiveModeDelivery).await;
    let v = get_json(&format!("{}/invitation?didcomm=v2", n.public_url())).await;
    let m = mailroom::client::v2::V2Mediator::from_invitation_url(v["invitation_url"].as_str().unwrap()).unwrap();
    let mut w = mailroom::client::v2::V2Agent::new(m).unwrap();
    w.onboard().await.unwrap();
    let old = w.did.clone();
    let up = w.update("3.0", std::slice::from_ref(&old), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let id = store.connection_by_their_verkey(&old).await.unwrap().unwrap().id;

    let new = w.rotate().unwrap();
    *store.delete_after_lookup.lock().unwrap() = Some(old.clone());
    let status = w.message("https://didcomm.org/messagepickup/3.0/status-request", json!({}));
    let (st, report) = w.post(&status).await.unwrap();
    assert!(
        store.delete_after_lookup.lock().unwrap().is_none(),
        "the rotation read the connection"
    );
    assert_eq!(st, 403, "{report:?}");
    assert_eq!(
        store.get_connection(&id).await.unwrap(),
        None,
        "the deleted connection is back"
    );
    assert_eq!(store.connection_by_their_verkey(&new).await.unwrap(), None);
    assert_eq!(store.route(&new).await.unwrap(), None, "the new DID routes nowhere");
    assert_eq!(store.route(&old).await.unwrap(), None);
    // Its next message finds no connection either.
    let (st, _) = w.post(&status).await.unwrap();
    assert_eq!(st, 403);
}

async fn revoke(n: &mailroom::node::RunningNode, id: &str) -> (u16, Value) {
    let mut res = awc::Client::default()
        .post(format!("{}/connections/{id}/mediation", n.admin_url()))
        .send_json(&json!({"state": "denied"}))
        .await
        .unwrap();
    let body = res.body().await.unwrap();
    (
        res.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

async fn connection(n: &mailroom::node::RunningNode, id: &str) -> Value {
    get_json(&format!("{}/connections/{id}", n.admin_url())).await
}

/// A wallet whose mediation was revoked (its queue kept: forwards it took were answered 202)
/// reconnects and speaks with return route `all`, what makes a socket deliver its queue (here
/// raw, and deleted once written: implicit pickup): nothing of the queue goes out on it, as
/// pickup refuses it, and the socket is no session.
#[actix_rt::test]
async fn a_revoked_connection_gets_nothing_of_its_queue_over_a_socket() {
    let (_dir, n, _store, a, k, id) = node_on_failing_removals_with(Strategy::QueueAndLiveModeDelivery).await;
    assert_eq!(forward(&n, &a, &k.verkey(), "before").await, 202);
    assert_eq!(revoke(&n, &id).await.0, 200);
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let reply = ws_request(&a, &mut ws, &binding_ping()).await;
    assert_eq!(type_name(&reply), "ping_response", "{reply}");
    // A bound socket registers before its reply is written.
    let sessions = get_json(&format!("{}/sessions", n.admin_url())).await;
    assert_eq!(sessions["sessions"], json!([]), "the socket delivers for nobody");
    let reply = ws_request(&a, &mut ws, &binding_ping()).await;
    assert_eq!(
        type_name(&reply),
        "ping_response",
        "nothing delivered before it: {reply}"
    );
    assert_eq!(connection(&n, &id).await["queue"]["depth"], 1, "kept queued");
    ws.close().await;
}

/// A socket of `a` bound (implicit pickup) on `n`, for connection `id`.
async fn bound_socket(n: &mailroom::node::RunningNode, a: &Agent, id: &str) -> mailroom::client::WsClient {
    let leases = || async {
        metric(n, r#"mailroom_store_seconds_count{op="lease"}"#)
            .await
            .unwrap_or(0.0)
    };
    let before = leases().await;
    let mut ws = a.websocket(&ws_url(n)).await.unwrap();
    assert_eq!(
        type_name(&ws_request(a, &mut ws, &binding_ping()).await),
        "ping_response"
    );
    let sessions = get_json(&format!("{}/sessions", n.admin_url())).await;
    assert_eq!(sessions["sessions"][0]["connection"], id, "bound");
    // The bind's first drain has read the connection and leased: a change made after this is
    // one it did not see (on a loaded machine it could run after the caller's next step).
    eventually("the bind's first drain", || async {
        (leases().await > before).then_some(())
    })
    .await;
    ws
}

/// A wallet's live session holds a message handed to it while an earlier delivery waits for
/// its acknowledgement (the live window). The operator drops the queue (the held message being
/// most often the one the wallet cannot take): the session is closed, and nothing dropped is
/// written to the wallet. Before, the drop answered "dropped" and the held message went out
/// as soon as the wallet acknowledged the first.
#[actix_rt::test]
async fn dropping_a_queue_closes_the_sessions_holding_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let id = common::cluster::a_connection_id(&n).await;
    let mut ws = common::cluster::live_socket(&a, &n).await;
    // A wallet that acknowledges on its socket: its window applies.
    assert_eq!(forward_to(&n, &a, &k, "warm").await, 202);
    let warm = ws_next_message(&a, &mut ws).await;
    assert_eq!(contents(&a, &warm), ["warm"]);
    assert!(ack_on_socket(&a, &mut ws, &delivery_ids(&a, &warm)).await.is_empty());
    assert_eq!(forward_to(&n, &a, &k, "first").await, 202);
    let first = ws_next_message(&a, &mut ws).await;
    assert_eq!(contents(&a, &first), ["first"]);
    // Not acknowledged: the next one is held by the session.
    assert_eq!(forward_to(&n, &a, &k, "poison").await, 202);
    eventually("the poison handed to the session", || async {
        let c = connection(&n, &id).await;
        (c["queue"]["depth"] == 2).then_some(())
    })
    .await;
    let (st, body) = admin_with("DELETE", &format!("{}/connections/{id}/queue", n.admin_url()), &[]).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["dropped"], 2, "{body}");
    assert_eq!(body["sessions_closed_here"], 1, "{body}");
    closed_as_revoked(&mut ws).await;
}

/// The next thing on `ws` is its close with the revocation's code, nothing written before.
async fn closed_as_revoked(ws: &mut mailroom::client::WsClient) {
    match ws.next(WAIT).await {
        Ok(mailroom::client::WsEvent::Closed(Some(r))) => {
            assert_eq!(u16::from(r.code), mailroom::admin::OPERATOR_CLOSE_CODE, "{r:?}")
        }
        other => panic!("the socket stays open for a revoked connection: {other:?}"),
    }
}

/// A node (default strategy) whose wallet's socket is bound, then the connection revoked in
/// the store only, as by a node whose close frame this node missed.
async fn bound_then_revoked_elsewhere() -> (NodeOnFailingRemovals, mailroom::client::WsClient) {
    let (dir, n, store, a, k, id) = node_on_failing_removals_with(Strategy::QueueAndLiveModeDelivery).await;
    let ws = bound_socket(&n, &a, &id).await;
    store
        .revoke_mediation(&id, mailroom::protocols::now_ms())
        .await
        .unwrap()
        .expect("the connection");
    ((dir, n, store, a, k, id), ws)
}

/// A socket still bound to a connection whose mediation was revoked without its close reaching
/// it (here: revoked in the store, as by a node whose close frame this node missed) closes, as
/// the revocation closes it, once its wallet speaks on it: it answers first.
#[actix_rt::test]
async fn a_socket_bound_to_a_connection_revoked_elsewhere_closes_when_it_speaks() {
    let ((_dir, _n, _store, a, _k, _id), mut ws) = bound_then_revoked_elsewhere().await;
    assert_eq!(
        type_name(&ws_request(&a, &mut ws, &binding_ping()).await),
        "ping_response"
    );
    closed_as_revoked(&mut ws).await;
}

/// The same socket, whose wallet stays silent, with mail the connection kept becoming
/// deliverable (a delivery whose lease ran out; here queued straight into the store): the
/// drain that would write it reads the connection first, once half a lease has passed since
/// it last did, and closes the socket instead.
#[actix_rt::test]
async fn a_socket_bound_to_a_connection_revoked_elsewhere_delivers_nothing_more() {
    let ((_dir, n, store, _a, k, id), mut ws) = bound_then_revoked_elsewhere().await;
    // Past half a lease (test_config: 2 s) since the bind read the connection.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let kept = NewMessage {
        connection: id.clone(),
        recipient_key: k.verkey(),
        payload: b"kept".to_vec(),
        received_at_ms: mailroom::protocols::now_ms(),
        dedup_key: None,
        expires_at_ms: None,
        lease: None,
    };
    store.enqueue(vec![kept], &EnqueueLimits::UNLIMITED).await.unwrap()[0]
        .as_ref()
        .unwrap();
    closed_as_revoked(&mut ws).await;
    assert_eq!(connection(&n, &id).await["queue"]["depth"], 1, "kept queued");
}

/// An agent with its own HTTP endpoint whose mediation was revoked while a message waited for
/// its endpoint to answer: the sweep's retries POST nothing more there once it answers.
#[actix_rt::test]
async fn a_revoked_connection_gets_nothing_of_its_queue_at_its_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let accept = Arc::new(AtomicBool::new(false));
    let acc = accept.clone();
    let (endpoint, handle) = endpoint_stub(move |_| if acc.load(Ordering::SeqCst) { 202 } else { 503 });

    let inv = invitation(&n).await;
    let mut a = Agent::connect_with_endpoint(&inv, Some(&endpoint)).await.unwrap();
    a.mediate().await.unwrap();
    let k = a.new_recipient_key();
    a.keylist_update(&[k.did_key()], &[]).await.unwrap();
    let id = common::cluster::a_connection_id(&n).await;
    assert_eq!(forward(&n, &a, &k.verkey(), "waiting").await, 202);
    eventually("the endpoint answered a POST 503", || async {
        (endpoint_posts(&n, "failed").await + endpoint_posts(&n, "refused").await > 0).then_some(())
    })
    .await;
    assert_eq!(revoke(&n, &id).await.0, 200);
    // The sweep's endpoint retries run every tenth pass, once a second here. A retry that read
    // the connection just before the revocation is over (refused) two passes after it, unless
    // the box stalled it: wait until two passes go by with no POST answered meanwhile.
    let passes = || async {
        metric(&n, "mailroom_store_seconds_count{op=\"connections_with_pending\"}")
            .await
            .unwrap_or(0.0)
    };
    let posts = || async { endpoint_posts(&n, "failed").await + endpoint_posts(&n, "refused").await };
    // (Bounded: POSTs that never stop are what the assertion below reports.)
    for _ in 0..10 {
        let (seen, posted) = (passes().await, posts().await);
        eventually("two endpoint retry passes", || async {
            (passes().await >= seen + 2.0).then_some(())
        })
        .await;
        if posts().await == posted {
            break;
        }
    }
    accept.store(true, Ordering::SeqCst);
    // Three more: each would POST the message now that the endpoint answers.
    let seen = passes().await;
    eventually("three endpoint retry passes", || async {
        (passes().await >= seen + 3.0).then_some(())
    })
    .await;
    assert_eq!(endpoint_posts(&n, "ok").await, 0, "a POST to a revoked connection");
    assert_eq!(connection(&n, &id).await["queue"]["depth"], 1, "kept queued");
    handle.stop(true).await;
}

/// A connection whose mediation is revoked while its key is still registered (what another
/// node sees between a revocation and the removal of the keys, or after a removal that failed)
/// takes no forward: the sender gets the 404 of an unknown key, though this node's route cache
/// still holds the key, and nothing is queued that pickup would never hand out.
#[actix_rt::test]
async fn a_denied_connection_whose_key_is_still_registered_gets_no_forward() {
    let (_dir, n, store, a, k, id) = node_on_failing_removals().await;
    assert_eq!(
        forward(&n, &a, &k.verkey(), "before").await,
        202,
        "and the route is cached"
    );
    let deny = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: 1,
        ..ConnectionPatch::default()
    };
    store.inner.update_connection(&id, &deny).await.unwrap().unwrap();
    assert_eq!(store.inner.keys_of(&id).await.unwrap(), vec![k.verkey()]);
    for text in ["after", "after again"] {
        assert_eq!(forward(&n, &a, &k.verkey(), text).await, 404, "{text}");
    }
    assert_eq!(connection(&n, &id).await["queue"]["depth"], 1);
    // Revoking through the admin listener removes what is left.
    let (code, body) = revoke(&n, &id).await;
    assert_eq!((code, body["routing_keys_removed"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(connection(&n, &id).await["routing_keys"], json!([]));
}

/// A revocation the store fails (503 to the operator) is all or nothing: never a denied
/// connection whose key still takes forwards that are never delivered. Here nothing changed:
/// the wallet is still mediated and gets what was forwarded meanwhile; the operator's retry
/// revokes it.
#[actix_rt::test]
async fn a_revocation_that_fails_leaves_no_denied_connection_taking_forwards() {
    let (_dir, n, store, a, k, id) = node_on_failing_removals().await;
    assert_eq!(forward(&n, &a, &k.verkey(), "before").await, 202);
    store.fail_removals.store(true, Ordering::SeqCst);
    let (code, body) = revoke(&n, &id).await;
    assert_eq!(code, 503, "{body}");
    let c = connection(&n, &id).await;
    let during = forward(&n, &a, &k.verkey(), "during").await;
    if c["mediation"] == "denied" {
        assert_eq!(
            during, 404,
            "a denied connection took a forward pickup never hands out: {c}"
        );
    }
    assert_eq!(c["mediation"], "granted", "the failed revocation changed nothing: {c}");
    assert_eq!(during, 202);
    let st = a
        .request(&pickup("status-request", json!({})))
        .await
        .unwrap()
        .expect("a status");
    assert_eq!(st["message_count"], 2, "{st}");

    store.fail_removals.store(false, Ordering::SeqCst);
    let (code, body) = revoke(&n, &id).await;
    assert_eq!((code, body["routing_keys_removed"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(forward(&n, &a, &k.verkey(), "after").await, 404);
    assert_eq!(connection(&n, &id).await["queue"]["depth"], 2);
}

#[test]
fn check_config_exits_64_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[cluster]\nname = 'x'\n[[node]]\nid = 'n1'\nlisten = 'nowhere'\nadmin = '127.0.0.1:1'\n",
    )
    .unwrap();
    // `mailroom CMD --config FILE`, no cluster secret from the environment: exit code, stderr.
    let mailroom = |cmd: &str, config: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args([cmd, "--config"])
            .arg(config)
            .env_remove("MAILROOM_CLUSTER_SECRET")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = mailroom("check-config", &bad);
    assert_eq!(code, Some(64));
    assert!(err.contains("listen") && err.contains("not an IP:port"), "{err}");
    let example = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.toml"));
    let (code, err) = mailroom("check-config", example);
    assert_eq!(code, Some(0), "{err}");
    // A sled directory that is a file, or none: found by the check, not by `run` opening it.
    let file_dir = dir.path().join("bad-dir.toml");
    for (path, words) in [(bad.display().to_string(), "not a directory"), (String::new(), "empty")] {
        std::fs::write(
            &file_dir,
            format!("[[node]]\nid = 'n1'\nlisten = '127.0.0.1:1'\nadmin = '127.0.0.1:2'\n[store]\npath = '{path}'\n"),
        )
        .unwrap();
        let (code, err) = mailroom("check-config", &file_dir);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("store.path") && err.contains(words), "{err}");
    }

    // `run` refuses a bad file the same way, before binding anything.
    assert_eq!(mailroom("run", &bad).0, Some(64));
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args([
            "run",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.toml"),
            "--node",
            "n9",
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(64));

    // Values that passed check-config and then lost messages or stopped the node later: each
    // is refused up front, by both commands, with the setting named. The node's store lives
    // in the temporary directory and its listeners on port 0, should `run` get that far.
    let node = format!(
        "[store]\npath = {:?}\n[[node]]\nid = 'n1'\nlisten = '127.0.0.1:0'\nadmin = '127.0.0.1:0'\n",
        dir.path().join("data")
    );
    let cluster_node = node.replace("admin =", "cluster = '127.0.0.1:0'\nadmin =");
    let cases = [
        // Was 1 (the cluster refused it after the store was opened).
        (
            format!("[cluster]\nmax_frame_bytes=10\n{node}"),
            "cluster.max_frame_bytes",
        ),
        (cluster_node.clone(), "cluster.secret"),
        // Was dropped with a note on stderr: the node ran at ERROR only.
        (format!("[log]\nlevel = 'mailroom=loud'\n{node}"), "log.level"),
        // Was a negative time-to-live: every queued message deleted at start.
        (
            format!("[limits]\nmessage_ttl_secs = 10000000000000000\n{node}"),
            "limits.message_ttl_secs",
        ),
        // Was 1 (the store's first connection failed), or no error at all.
        (
            node.replace(
                "[store]\n",
                "[store]\nbackend = 'postgres'\nurl = 'postgres://postgres@127.0.0.1:1/m?sslmode=bogus'\n",
            ),
            "store.url: sslmode \"bogus\"",
        ),
        (
            node.replace(
                "[store]\n",
                "[store]\nbackend = 'postgres'\nurl = 'postgres://postgres@127.0.0.1:1/m?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem'\n",
            ),
            "store.url: sslrootcert: cannot read /nonexistent/ca.pem",
        ),
        // Was accepted: each node of the file on a store of its own (its own identity,
        // connections and queue), or stopped by the sled lock of the first.
        (
            format!(
                "[cluster]\nsecret = 'a-cluster-secret-long-enough'\n{cluster_node}{}",
                cluster_node
                    .split_once("[[node]]")
                    .map(|(_, n)| format!("[[node]]{}", n.replace("'n1'", "'n2'")))
                    .unwrap()
            ),
            "store.backend = \"postgres\"",
        ),
        // Was accepted, then every guarded admin route answered 401: HTTP trims a header's
        // ends, so no client can present an empty token or one ending in a space.
        (format!("[admin]\ntoken = ''\n{node}"), "[admin] token is empty"),
        (format!("[admin]\ntoken = 'tok '\n{node}"), "[admin] token"),
        // Was accepted and used as written (invitations, the mediator's DIDs): `Url::parse`
        // trims and escapes what it reads. 1000 `"` (JSON doubles each) made the did:peer:2 too
        // long: `run` panicked (101).
        (
            format!("[cluster]\npublic_url = \"https://m.example\\n\"\n{node}"),
            "cluster.public_url holds '\\n' at byte 17",
        ),
        (
            format!("[cluster]\npublic_url = 'https://m.example/a b'\n{node}"),
            "cluster.public_url holds ' '",
        ),
        (
            format!(
                "[cluster]\npublic_url = \"https://m.example/{}\"\n{node}",
                "\\\"".repeat(1000)
            ),
            "cluster.public_url holds '\"'",
        ),
        // Was accepted (the PEM decodes), then `run` exited 1: TLS takes no such certificate.
        (
            {
                let bad_ca = dir.path().join("bad-ca.pem");
                std::fs::write(
                    &bad_ca,
                    "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n",
                )
                .unwrap();
                format!("[delivery]\nca_file = {bad_ca:?}\n{node}")
            },
            "delivery.ca_file",
        ),
        // Was ignored: the node ran on sled while its operator believed PostgreSQL.
        (
            node.replace(
                "[store]\n",
                "[store]\nurl = 'postgres://postgres@127.0.0.1:1/m'\n",
            ),
            "store.url is set but store.backend is \"sled\" (set backend = \"postgres\")",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        for cmd in ["check-config", "run"] {
            let (code, err) = mailroom(cmd, &path);
            assert_eq!(code, Some(64), "{cmd} {text}: {err}");
            assert!(err.contains(want), "{cmd} {text}: {err} should name {want:?}");
        }
    }

    // The environment's public URL is held to the file's rule, by both commands.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &node).unwrap();
    for cmd in ["check-config", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args([cmd, "--config"])
            .arg(&good)
            .env("MAILROOM_PUBLIC_URL", "https://m.example\n")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{cmd}: {err}");
        assert!(
            err.contains("MAILROOM_PUBLIC_URL (cluster.public_url) holds '\\n'"),
            "{cmd}: {err}"
        );
    }

    // A TOML error names the place, not the line: that line may hold a secret.
    std::fs::write(&bad, "[cluster]\nsecret = \"hunter2hunter2\n").unwrap();
    let (code, err) = mailroom("check-config", &bad);
    assert_eq!(code, Some(64));
    assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");

    // A usage error is EX_USAGE (64) from every command, as from `probe` (clap's own is 2);
    // asking for help or the version is not an error.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(args)
            .env_remove("MAILROOM_CONFIG")
            .env_remove("MAILROOM_NODE")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let good = good.to_str().unwrap();
    for args in [
        &["run", "--confg", good][..],
        &["run", "--config"],
        &["run", "--config", good, "--node"],
        &["check-config", "--confg", good],
        &["check-config", "--config"],
        &["check-config"],
        &["healthcheck", "--timeout-ms", "soon"],
        // Was 1, "unhealthy": an admin address that is no URL, a timeout that always fails.
        &["healthcheck", "--admin", "127.0.0.1:8081"],
        &["healthcheck", "--timeout-ms", "0"],
        &["status", "--bogus"],
        &["drain", "--bogus"],
        // An admin URL that is none, and two targets at once.
        &["status", "--admin", "not a url"],
        &["drain", "--admin", "127.0.0.1:8081"],
        &["undrain", "--admin", "ftp://127.0.0.1/"],
        &["drain", "--admin", "http://127.0.0.1:9/", "--node", "n1"],
        &["probe"],
        &["no-such-command"],
        &[],
    ] {
        let (code, err) = cli(args);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert!(err.contains("error:") || err.contains("Usage:"), "{args:?}: {err}");
    }
    // `drain` reads the config `run` reads: in the image, MAILROOM_CONFIG (it read
    // ./cluster.toml, which the image's working directory does not hold).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["drain", "--node", "n9"])
        .env("MAILROOM_CONFIG", good)
        .env_remove("MAILROOM_NODE")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(good) && err.contains("n9"), "{err}");
    for args in [
        &["--help"][..],
        &["--version"],
        &["help"],
        &["run", "--help"],
        &["check-config", "--help"],
        &["help", "check-config"],
    ] {
        assert_eq!(cli(args).0, Some(0), "{args:?}");
    }
}

/// A cluster secret an offline guesser finds (shorter than 16 bytes, or an example's) is
/// warned about by `check-config`, with how to make a good one, and still accepted (exit 0:
/// files in use hold such secrets). A long one, or a file with no cluster address, says
/// nothing.
#[test]
fn check_config_warns_of_a_guessable_cluster_secret_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let check = |secret: &str, cluster: bool| {
        let addr = if cluster { "cluster = '127.0.0.1:7001'\n" } else { "" };
        std::fs::write(
            &path,
            format!(
                "[cluster]\nsecret = {secret:?}\n[store]\npath = {:?}\n[[node]]\nid = 'n1'\nlisten = '127.0.0.1:8001'\n{addr}admin = '127.0.0.1:9001'\n",
                dir.path().join("data")
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("MAILROOM_CLUSTER_SECRET")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for weak in ["12345678", "fifteen-bytes-x", "change-me"] {
        let (code, err) = check(weak, true);
        assert_eq!(code, Some(0), "{weak}: {err}");
        assert!(
            err.contains("warning: cluster.secret")
                && err.contains("offline")
                && err.contains("openssl rand -base64 32"),
            "{weak}: {err}"
        );
        assert!(!err.contains(weak), "the warning does not repeat the secret: {err}");
    }
    for (secret, cluster) in [("sixteen-bytes-xx", true), ("12345678", false)] {
        let (code, err) = check(secret, cluster);
        assert_eq!(code, Some(0), "{secret}: {err}");
        assert!(!err.contains("warning"), "{secret}: {err}");
    }
}

/// The longest public URL accepted (1024 bytes, every visible URL character the rules let
/// through) is one the node starts with: the mediator's DIDs carry it and its ws twin, and
/// `run` derives them at start (a did:peer:2 past its cap panicked there).
#[actix_rt::test]
async fn the_longest_accepted_public_url_starts_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let longest: String = "https://m.example/"
        .chars()
        .chain("!$&'()*+,-./:;=@[]_~%aZ09".chars().cycle())
        .take(mailroom::config::MAX_PUBLIC_URL_LEN)
        .collect();
    let (listen, admin) = (common::ports::held_addr(), common::ports::held_addr());
    let path = dir.path().join("mailroom.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\npublic_url = \"{longest}\"\n[store]\npath = {:?}\n[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let child = std::cell::RefCell::new(spawn_run(&path, &dir.path().join("err.log"), &[&listen, &admin]));
    let (child_ref, ready, log) = (&child, &format!("http://{admin}/ready"), &dir.path().join("err.log"));
    eventually("the node ready, or its exit", || async move {
        if let Some(status) = child_ref.borrow_mut().try_wait().unwrap() {
            panic!(
                "`run` exited {status:?}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        (get_status(ready, None).await.0 == 200).then_some(())
    })
    .await;
    let mut child = child.into_inner();
    let v2 = get_json(&format!("http://{listen}/invitation?didcomm=v2")).await;
    let did = v2["did"].as_str().unwrap();
    assert!(did.starts_with("did:peer:2.") && did.len() <= 4096, "{}", did.len());
    let v1 = get_json(&format!("http://{listen}/invitation")).await;
    assert!(
        v1["invitation_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}?oob=", longest.trim_end_matches('/'))),
        "{v1}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

/// A socket handed over by the service manager (systemd socket activation) that is none of the
/// node's configured addresses: the unit and the config disagree, so `run` exits 64 naming it
/// rather than serving on a socket nobody configured or leaving one unserved.
#[test]
fn an_inherited_socket_the_config_does_not_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin, stray) = (
        common::ports::held_addr(),
        common::ports::held_addr(),
        common::ports::held_addr(),
    );
    let cfg = format!(
        "[store]\npath = \"{}\"\n[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.args(["run", "--config"]).arg(&path);
    let _inherited = common::ports::inherit_systemd(&mut cmd, &[&listen, &stray, &admin]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("LISTEN_FDS") && err.contains(&stray), "{err}");
}

/// `mailroom run --config path`, its standard error in `err_log`, handed the held sockets of
/// `addrs` (as systemd hands them).
fn spawn_run(path: &std::path::Path, err_log: &std::path::Path, addrs: &[&str]) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.args(["run", "--config"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(err_log).unwrap());
    let _inherited = common::ports::inherit_systemd(&mut cmd, addrs);
    cmd.spawn().unwrap()
}

/// Why an operator hands the node its sockets: they outlive the process. A request made while
/// no node runs (killed, about to be restarted by systemd) waits in the socket's backlog and is
/// answered by the next node, instead of being refused.
#[actix_rt::test]
async fn a_request_made_between_two_nodes_on_a_handed_over_socket_is_answered() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    // Kept here across both nodes, as systemd keeps a .socket unit's.
    let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (listen, admin_addr) = (
        public.local_addr().unwrap().to_string(),
        admin.local_addr().unwrap().to_string(),
    );
    let cfg = format!(
        "[store]\npath = \"{}\"\n[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\nadmin = \"{admin_addr}\"\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, cfg).unwrap();
    let start = || {
        common::ports::hold(public.try_clone().unwrap());
        common::ports::hold(admin.try_clone().unwrap());
        spawn_run(&path, &dir.path().join("err.log"), &[&listen, &admin_addr])
    };
    let invitation = format!("http://{listen}/invitation");
    let mut first = start();
    wait_ok("the first node serves", &invitation).await;
    first.kill().unwrap();
    first.wait().unwrap();
    // No node runs: the connection is still taken (by the kernel, into the backlog).
    let mut waiting = std::net::TcpStream::connect(&listen).expect("the socket outlives the node");
    write!(
        waiting,
        "GET /invitation HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut second = start();
    waiting
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "answered by the second node: {answer:.200}"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// `mailroom run` with a JSON log config, then `mailroom status` against its admin port.
#[actix_rt::test]
async fn the_binary_serves_logs_json_and_status_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (common::ports::held_addr(), common::ports::held_addr());
    let cfg = format!(
        "[store]\npath = \"{}\"\n[log]\nformat = \"json\"\n[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\nadmin = \"{admin}\"\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("mailroom.toml");
    std::fs::write(&path, cfg).unwrap();
    let log = dir.path().join("out.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.args(["run", "--config"])
        .arg(&path)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.log")).unwrap());
    let _inherited = common::ports::inherit_systemd(&mut cmd, &[&listen, &admin]);
    let mut child = cmd.spawn().unwrap();
    let ready = format!("http://{admin}/ready");
    wait_ok("binary ready", &ready).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["status", "--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("node solo") && text.contains("store sled (ok)"), "{text}");
    assert!(text.contains("drain: no"), "{text}");
    // Drain by node id from the config, as an operator does before maintenance.
    let mailroom = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cfg_path = path.to_str().unwrap();
    let out = mailroom(&["drain", "--config", cfg_path, "--node", "solo"]);
    assert!(out.contains("DRAINING") && out.contains("EMPTY"), "{out}");
    assert_eq!(get_status(&ready, None).await.0, 503, "a drained node is not ready");
    let out = mailroom(&["status", "--admin", &format!("http://{admin}")]);
    assert!(out.contains("drain: DRAINING"), "{out}");
    let out = mailroom(&["undrain", "--config", cfg_path, "--node", "solo"]);
    assert!(out.contains("drain: no"), "{out}");
    assert_eq!(get_status(&ready, None).await.0, 200);
    // A file that leaves the cluster secret to the environment, as a container's does: the
    // command reads it as `run` would (overrides applied before validation).
    let env_cfg = dir.path().join("env-secret.toml");
    std::fs::write(
        &env_cfg,
        format!("[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\ncluster = \"127.0.0.1:1\"\nadmin = \"{admin}\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["undrain", "--node", "solo", "--config"])
        .arg(&env_cfg)
        .env("MAILROOM_CLUSTER_SECRET", "a-secret-from-the-environment")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // From an operator's machine that holds the file but none of the node's other secrets
    // (no cluster secret, no push credentials): drain and undrain need only the admin address
    // and token. Before, the whole file was validated and the command exited 64.
    let ops_cfg = dir.path().join("ops-box.toml");
    std::fs::write(
        &ops_cfg,
        format!(
            "[[node]]\nid = \"solo\"\nlisten = \"{listen}\"\ncluster = \"127.0.0.1:1\"\nadmin = \"{admin}\"\n\
             [push]\n[[push.fcm]]\nservice_account = \"/nonexistent/fcm.json\"\n"
        ),
    )
    .unwrap();
    for cmd in ["drain", "undrain"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args([cmd, "--node", "solo", "--config"])
            .arg(&ops_cfg)
            .env_remove("MAILROOM_CLUSTER_SECRET")
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(get_status(&ready, None).await.0, 200, "undrained again");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["drain", "--config", cfg_path, "--node", "nope"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64), "an unknown node is a usage error");
    // Refusals are operator actions too: the queue of a connection that does not exist (404),
    // then, once a reload set a token, a drain with a wrong one (401).
    let (st, body) = admin_with("DELETE", &format!("http://{admin}/connections/no-such-id/queue"), &[]).await;
    assert_eq!(st, 404, "{body}");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}[admin]\ntoken = \"audit-token\"\n")).unwrap();
    let (st, body) = admin_with("POST", &format!("http://{admin}/reload"), &[]).await;
    assert_eq!((st, &body["admin_token_changed"]), (200, &json!(true)), "{body}");
    let wrong = [("Authorization", "Bearer not-the-token".to_string())];
    let (st, _) = admin_with("POST", &format!("http://{admin}/drain"), &wrong).await;
    assert_eq!(st, 401);
    // Someone trying tokens in a loop: 20 refusals are written at once, then one a second,
    // and the next line written says how many were not; all of them are counted.
    for _ in 0..60 {
        let (st, _) = admin_with("POST", &format!("http://{admin}/drain"), &wrong).await;
        assert_eq!(st, 401);
    }
    let (_, metrics) = get_status(&format!("http://{admin}/metrics"), Some("audit-token")).await;
    assert!(
        metrics.contains(r#"mailroom_rejected_total{reason="admin-unauthorized",didcomm="unknown"} 61"#),
        "{metrics}"
    );
    eventually("a refused action written again", || async {
        let (st, _) = admin_with("POST", &format!("http://{admin}/undrain"), &wrong).await;
        assert_eq!(st, 401);
        let logs = std::fs::read_to_string(&log).unwrap();
        logs.contains(r#"refused_not_written_before\":"#).then_some(())
    })
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM is a clean exit: {status:?}");
    let logs = std::fs::read_to_string(&log).unwrap();
    let json_lines: Vec<Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l["fields"]["message"] == "mailroom node ready"),
        "JSON log lines expected:\n{logs}"
    );
    assert!(
        logs.contains("invitation: http://"),
        "the invitation URL is printed:\n{logs}"
    );
    let audits: Vec<&Value> = json_lines
        .iter()
        .filter(|l| l["fields"]["message"] == "operator action")
        .collect();
    let actions: Vec<&str> = audits.iter().map(|a| a["fields"]["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions[..8],
        [
            "drain",
            "undrain",
            "undrain",
            "drain",
            "undrain",
            "drop-queue",
            "reload",
            "drain"
        ],
        "one audit line per action:\n{logs}"
    );
    // The refusals: 20 at once (the first above and 19 of the loop; one more a second if the
    // loop was slow), then the undrain that said how many were not written.
    let drains = actions[8..].iter().take_while(|a| **a == "drain").count();
    assert!((19..60).contains(&drains), "{drains} refusals written of 61:\n{logs}");
    assert!(
        actions.len() > 8 + drains && actions[8 + drains..].iter().all(|a| *a == "undrain"),
        "{logs}"
    );
    let outcome: Value = serde_json::from_str(audits[8 + drains]["fields"]["outcome"].as_str().unwrap()).unwrap();
    assert!(
        outcome["refused_not_written_before"].as_u64().unwrap() as usize >= 60 - drains,
        "{outcome}"
    );
    let statuses: Vec<i64> = audits[5..8]
        .iter()
        .map(|a| a["fields"]["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [404, 200, 401], "{logs}");
    assert_eq!(audits[5]["fields"]["connection"], "no-such-id");
    assert!(audits[5]["fields"]["outcome"].as_str().unwrap().contains("not-found"));
    let who = audits[7]["fields"]["who"].as_str().unwrap();
    assert!(who.starts_with("unauthenticated (127.0.0.1:"), "{who}");
}

/// A node that is stopping cannot be undrained: `POST /undrain` reopened it on its way down
/// (`draining` false on `/status`, and sockets binding meanwhile were never closed, only
/// dropped). A forward still being answered holds the stop open here.
#[actix_rt::test]
async fn a_stopping_node_cannot_be_undrained() {
    let (_d, n, store, a, k, _id) = node_on_failing_removals().await;
    let admin = n.admin_url();
    store.slow_forwards_ms.store(6000, Ordering::SeqCst);
    let url = n.public_url();
    let g = a.grant.clone().unwrap();
    let in_flight = actix_rt::spawn(async move {
        Sender::new()
            .forward(&url, &basic_message("held"), &k.verkey(), &g.routing_keys)
            .await
    });
    eventually("a forward being answered", || async {
        (store.forwards_under_way.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let stopping = std::thread::spawn(move || n.stop());
    eventually("the node stopping", || async {
        let s = get_json(&format!("{admin}/status")).await;
        (s["drain"]["draining"] == true).then_some(())
    })
    .await;
    let (code, body) = admin_with("POST", &format!("{admin}/undrain"), &[]).await;
    assert_eq!(code, 409, "{body}");
    let s = get_json(&format!("{admin}/status")).await;
    assert_eq!(s["drain"]["draining"], true, "{s}");
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        202,
        "the forward in flight is answered"
    );
    stopping.join().unwrap().unwrap();
}

/// A forward read from a WebSocket just before the stop is still queued. Its handler ran on
/// the HTTP worker, and a stopping node stopped the worker as soon as the socket was closed:
/// a forward still being stored was dropped, and its sender, on a socket, had no answer to
/// tell it. The stop now waits for each closed socket's requests and give-backs first.
#[actix_rt::test]
async fn a_forward_read_from_a_socket_just_before_the_stop_is_queued() {
    let (_d, n, store, a, k, id) = node_on_failing_removals().await;
    store.slow_forwards_ms.store(1500, Ordering::SeqCst);
    let g = a.grant.clone().unwrap();
    let env = Sender::new()
        .forward_envelope(&basic_message("on a socket"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let mut ws = mailroom::client::websocket(&ws_url(&n)).await.unwrap();
    ws.send_envelope(env, true).await.unwrap();
    eventually("the forward being stored", || async {
        (store.forwards_under_way.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    n.stop().unwrap();
    let q = store.queue_stats(&id, mailroom::protocols::now_ms()).await.unwrap();
    assert_eq!(q.pending + q.leased, 1, "the forward is queued: {q:?}");
}

/// The store of a node whose last run did not stop cleanly ([`Store::begin_run`] says so):
/// the first page of wallets with mail pending its wake-up asks for is a full one (of made-up
/// connections), held until the test lets it go; the page after it fails once (the store
/// went away); every page the wake-up asks for is recorded with its cursor.
struct UncleanRun {
    inner: Arc<dyn Store>,
    first_page: tokio::sync::Semaphore,
    pages: std::sync::Mutex<Vec<Option<String>>>,
}

#[async_trait::async_trait]
impl Store for UncleanRun {
    async fn begin_run(&self) -> StoreResult<Option<bool>> {
        self.inner.begin_run().await?;
        Ok(Some(true))
    }
    async fn connections_with_pending(
        &self,
        now_ms: i64,
        after: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<ConnId>> {
        // The wake-up's pages are of 500; the sweep's endpoint retries, of 10,000, are not
        // the test's.
        if limit != 500 {
            return self.inner.connections_with_pending(now_ms, after, limit).await;
        }
        let call = {
            let mut pages = self.pages.lock().unwrap();
            pages.push(after.map(str::to_owned));
            pages.len()
        };
        match call {
            1 => {
                let _held = self.first_page.acquire().await.unwrap();
                Ok((0..limit).map(|i| format!("gone-{i:06}")).collect())
            }
            2 => Err(StoreError::Unavailable("injected: the store went away".into())),
            _ => self.inner.connections_with_pending(now_ms, after, limit).await,
        }
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_thread, connection_by_their_verkey,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued,
        pending_among, prune_dedup, dedup_records, queue_log, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token,
        push_event, push_take_due, push_done, delete_connection, delete_unmediated, drop_queue, top_queues,
        first_sight, forget_sight, prune_sights, update_keys, revoke_mediation,
    );
}

/// After a run that did not stop cleanly, a node pages through every wallet with mail pending
/// and wakes it (their sockets died with the run; nothing else tells them). An operator's drain
/// meanwhile (a rolling restart begins) and a store that fails for a moment do not end that:
/// it goes on from where it was. Before, either ended it for good, and the wallets on the pages
/// not reached waited for their next message or the next restart.
#[actix_rt::test]
async fn waking_every_wallet_after_an_unclean_stop_outlasts_a_drain_and_a_store_failure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    let store = Arc::new(UncleanRun {
        inner: open_sled(&dir.path().join("data")).await.unwrap(),
        first_page: tokio::sync::Semaphore::new(0),
        pages: Default::default(),
    });
    let n = start_on(&cfg, store.clone());
    let pages = || store.pages.lock().unwrap().clone();
    eventually("the first page asked for", || async {
        (pages().len() == 1).then_some(())
    })
    .await;
    let (st, _) = post_raw(&format!("{}/drain", n.admin_url()), "application/json", Vec::new()).await;
    assert_eq!(st, 200);
    store.first_page.add_permits(1);
    let asked = eventually("the pages after the first asked for, the failed one again", || async {
        let p = pages();
        (p.len() >= 3).then_some(p)
    })
    .await;
    assert_eq!(asked[0], None);
    // After the first page's last, and asked again from there once the store came back.
    assert!(asked[1].as_deref().is_some_and(|a| a.starts_with("gone-")), "{asked:?}");
    assert_eq!(asked[1], asked[2]);
    let (st, _) = post_raw(&format!("{}/undrain", n.admin_url()), "application/json", Vec::new()).await;
    assert_eq!(st, 200);
}

/// A wallet asks for mediation again while the operator deletes its connection (the delete
/// lands after the request read the connection): it gets no grant, over DIDComm v1 or v2.
/// Before, a connection granted already was granted again from the copy read, although it no
/// longer existed.
#[actix_rt::test]
async fn a_mediate_request_racing_the_operators_delete_is_not_granted() {
    let (_dir, n, store, mut a, _k, id) = node_on_failing_removals_with(Strategy::QueueAndLiveModeDelivery).await;
    *store.delete_after_lookup.lock().unwrap() = Some(a.key.verkey());
    let err = a.mediate().await.expect_err("no grant for a deleted connection");
    assert!(
        store.delete_after_lookup.lock().unwrap().is_none(),
        "the request read the connection"
    );
    assert!(err.to_string().contains("403"), "{err:#}");
    assert_eq!(store.get_connection(&id).await.unwrap(), None);

    let v = get_json(&format!("{}/invitation?didcomm=v2", n.public_url())).await;
    let m = mailroom::client::v2::V2Mediator::from_invitation_url(v["invitation_url"].as_str().unwrap()).unwrap();
    let mut w = mailroom::client::v2::V2Agent::new(m).unwrap();
    w.onboard().await.unwrap();
    let id = store.connection_by_their_verkey(&w.did).await.unwrap().unwrap().id;

    *store.delete_after_lookup.lock().unwrap() = Some(w.did.clone());
    let again = w.message(
        "https://didcomm.org/coordinate-mediation/3.0/mediate-request",
        json!({}),
    );
    let (st, answer) = w.post(&again).await.unwrap();
    assert!(
        store.delete_after_lookup.lock().unwrap().is_none(),
        "the request read the connection"
    );
    assert_eq!(st, 403, "no grant for a deleted connection: {answer:?}");
    assert_eq!(store.get_connection(&id).await.unwrap(), None);
}

/// A SIGHUP (an operator adding a node: `scripts/cluster.sh reload` signals every node) that
/// comes while a node is still starting (its store slow to answer) leaves it running: it is
/// handled once the node runs. Before, the handler was set only after the store opened, and
/// until then the signal's default action ended the process.
#[test]
fn a_sighup_while_the_node_starts_does_not_end_it() {
    // A "PostgreSQL" that takes connections and never answers: the node waits in its start.
    let db = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow-store.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://postgres@{}/mailroom?sslmode=disable\"\n\n\
             [[node]]\nid = \"n1\"\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
            db.local_addr().unwrap()
        ),
    )
    .unwrap();
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    db.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let _held = loop {
        match db.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(std::time::Instant::now() < deadline, "the node opened its store");
                assert!(node.try_wait().unwrap().is_none(), "the node ended before its store");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let pid = i32::try_from(node.id()).unwrap();
    // SAFETY: signals the process this test started, by its PID.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    // Ended by the signal, it would be gone at once.
    let watch = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::time::Instant::now() < watch {
        assert_eq!(node.try_wait().unwrap(), None, "the node ended at the SIGHUP");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    node.kill().unwrap();
    node.wait().unwrap();
}

/// A node whose process may hold few files (`ulimit -n 256`; systemd's default soft limit is
/// 1,024) fits its session limit to them: sockets past it are refused 503 `session-limit`,
/// and the admin listener goes on answering. Before, the default of 100,000 sessions stood,
/// the process ran out of files first, and its accept loops paused: sockets hung unanswered
/// and `/health` went dark.
#[actix_rt::test]
async fn sockets_past_what_the_open_file_limit_leaves_room_for_are_refused_503() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let entry = mailroom::config::NodeEntry {
        id: "n1".into(),
        listen: common::cluster::free_addr(),
        cluster: None,
        admin: common::cluster::free_addr(),
    };
    let path = dir.path().join("mailroom.toml");
    std::fs::write(
        &path,
        format!(
            "[store]\nbackend = \"sled\"\npath = {:?}\n\n[[node]]\nid = \"n1\"\nlisten = \"{}\"\nadmin = \"{}\"\n",
            dir.path().join("data"),
            entry.listen,
            entry.admin
        ),
    )
    .unwrap();
    let p = common::cluster::NodeProcess::spawn_with(&path, &entry, &dir.path().join("n1.log"), |cmd| {
        // SAFETY: between fork and exec, one async-signal-safe call on a local value.
        unsafe {
            cmd.pre_exec(|| {
                let r = libc::rlimit {
                    rlim_cur: 256,
                    rlim_max: 256,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    wait_ok("the node ready", &format!("{}/ready", p.admin_url())).await;
    let (a, _) = Agent::onboard(&invitation_at(&p.public_url()).await).await.unwrap();

    let mut open = Vec::new();
    let refused = loop {
        assert!(open.len() < 256, "no socket refused");
        // WAIT, not a few seconds: a handshake to a child process on a loaded box may take
        // them; one the node cannot answer (out of files) hangs past any bound.
        let tried = tokio::time::timeout(WAIT, a.websocket(&p.ws_url())).await;
        match tried {
            Ok(Ok(ws)) => open.push(ws),
            Ok(Err(e)) => break e,
            Err(_) => panic!(
                "socket {} neither opened nor refused: the node ran out of files",
                open.len() + 1
            ),
        }
    };
    // Half of 256 kept for the node's own files.
    assert_eq!(open.len(), 128, "{refused:#}");
    assert_session_limit_refusal(&p.ws_url()).await;
    let (st, _) = get_status(&format!("{}/health", p.admin_url()), None).await;
    assert_eq!(st, 200);
    // A reload of the same file changes nothing: the limit lowered at start is no change.
    let (st, body) = post_raw(&format!("{}/reload", p.admin_url()), "application/json", Vec::new()).await;
    assert_eq!(st, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["restart_needed"], json!([]), "{r}");
}

/// `drain` of `/status`.
async fn drain_state(n: &mailroom::node::RunningNode) -> Value {
    get_json(&format!("{}/status", n.admin_url())).await["drain"].clone()
}

/// A drained node is `empty` only once what a pickup over HTTP delivered there is
/// acknowledged (or its lease ran out): nothing then waits on the node, and a stop gives
/// nothing back. Before, `empty` counted sessions only, and said so while the message was
/// leased to the node's HTTP owner: a stop then either gave it back, as a delivery to make
/// again to a wallet about to acknowledge it (and pushed it), or, unless graceful, left it
/// to its lease.
#[actix_rt::test]
async fn a_drained_node_is_not_empty_while_a_pickup_over_http_awaits_its_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Longer than the test: only the acknowledgement ends the lease.
    cfg.delivery.lease_ms = 120_000;
    let n = start(&cfg);
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    // Another wallet, live on a socket the drain closes.
    let (b, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let _ws = common::cluster::live_socket(&b, &n).await;
    assert_eq!(forward(&n, &a, &k.verkey(), "picked-up").await, 202);
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .expect("a delivery");
    assert_eq!(contents(&a, &d), vec!["picked-up"]);
    let (st, body) = post_raw(&format!("{}/drain", n.admin_url()), "application/json", Vec::new()).await;
    assert_eq!(st, 200, "{body}");
    let held = eventually("the session and its socket gone", || async {
        let s = drain_state(&n).await;
        (s["sessions"] == 0 && s["open_sockets"] == 0).then_some(s)
    })
    .await;
    assert_eq!(held["empty"], false, "the HTTP delivery is still leased: {held}");
    assert_eq!(held["http_leases_held"], true, "{held}");
    // A drained node still answers HTTP: the wallet acknowledges there.
    let ids = delivery_ids(&a, &d);
    a.request(&pickup("messages-received", json!({ "message_id_list": ids })))
        .await
        .unwrap();
    let s = eventually("empty once acknowledged", || async {
        let s = drain_state(&n).await;
        (s["empty"] == true).then_some(s)
    })
    .await;
    assert_eq!(s["http_leases_held"], false, "{s}");
    assert_eq!(queue_depth(&n).await, 0);
}

/// A store whose next `lease_upto` after `hold` is set, once it has leased, waits until
/// `open` says true: a pickup over HTTP held between its lease and its answer.
struct HeldPickup {
    inner: Arc<dyn Store>,
    hold: AtomicBool,
    leased: AtomicBool,
    open: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl Store for HeldPickup {
    async fn lease_upto(
        &self,
        conn: &str,
        max: usize,
        max_bytes: usize,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<QueuedMessage>> {
        let r = self
            .inner
            .lease_upto(conn, max, max_bytes, owner, now_ms, until_ms)
            .await;
        if self.hold.swap(false, Ordering::SeqCst) {
            self.leased.store(true, Ordering::SeqCst);
            let _ = self.open.subscribe().wait_for(|open| *open).await;
        }
        r
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued, connections_with_pending,
        pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token,
        push_event, push_take_due, push_done, update_keys, revoke_mediation, delete_connection, delete_unmediated,
        drop_queue, top_queues, first_sight, forget_sight, prune_sights,
    );
}

/// A pickup over HTTP that has leased and not yet answered keeps a drained node from being
/// `empty` too: stopped then, the node would take the answer down with it, and the message
/// would wait for its lease.
#[actix_rt::test]
async fn a_drained_node_is_not_empty_while_a_pickup_over_http_is_being_answered() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 120_000;
    let store = Arc::new(HeldPickup {
        inner: open_sled(&dir.path().join("data")).await.unwrap(),
        hold: AtomicBool::new(false),
        leased: AtomicBool::new(false),
        open: tokio::sync::watch::channel(false).0,
    });
    let n = start_on(&cfg, store.clone());
    let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
    assert_eq!(forward(&n, &a, &k.verkey(), "in-flight").await, 202);
    store.hold.store(true, Ordering::SeqCst);
    let operator = async {
        eventually("the pickup's lease taken", || async {
            store.leased.load(Ordering::SeqCst).then_some(())
        })
        .await;
        let (st, body) = post_raw(&format!("{}/drain", n.admin_url()), "application/json", Vec::new()).await;
        let during = drain_state(&n).await;
        // Opened before any assertion: a failing test must not leave the request waiting.
        store.open.send_replace(true);
        assert_eq!(st, 200, "{body}");
        during
    };
    let request = pickup("delivery-request", json!({"limit": 10}));
    let (delivered, during) = tokio::join!(a.request(&request), operator);
    assert_eq!(
        (during["sessions"].clone(), during["open_sockets"].clone()),
        (json!(0), json!(0)),
        "{during}"
    );
    assert_eq!(during["http_requests"], 1, "{during}");
    assert_eq!(during["empty"], false, "a pickup is being answered: {during}");
    let d = delivered.unwrap().expect("a delivery");
    assert_eq!(contents(&a, &d), vec!["in-flight"]);
    assert_eq!(drain_state(&n).await["empty"], false, "delivered, not acknowledged");
    let ids = delivery_ids(&a, &d);
    a.request(&pickup("messages-received", json!({ "message_id_list": ids })))
        .await
        .unwrap();
    eventually("empty once acknowledged", || async {
        (drain_state(&n).await["empty"] == true).then_some(())
    })
    .await;
}
