//! A WebSocket that stops delivering for a connection (rebound by another connection speaking
//! on it, or superseded by a newer session of its bound connection elsewhere) leaves no mail
//! of the connection it delivered for before pending with nobody told: that wallet is pushed
//! (local HTTPS stand-in for FCM, as in `tests/push.rs`). And a wallet that speaks the legacy
//! `did:sov:...;spec/` prefix gets its live deliveries with it.

mod common;
#[path = "common/push.rs"]
#[allow(dead_code)]
mod standin;

use common::cluster::*;
use common::*;
use mailroom::client::Agent;
use mailroom::config::Strategy;
use mailroom::didcomm::message::{new_id, LEGACY_PREFIX};
use serde_json::{json, Value};
use standin::{Hit, StandIn};

async fn set_fcm_device(a: &Agent, token: &str) {
    let m = json!({
        "@type": "https://didcomm.org/push-notifications-fcm/1.0/set-device-info",
        "@id": new_id(),
        "device_token": token,
        "device_platform": "android",
        "~transport": { "return_route": "all" },
    });
    a.request(&m).await.unwrap().expect("a reply to set-device-info");
}

async fn wait_fcm(si: &StandIn, n: usize) -> Vec<Hit> {
    let hits = eventually(&format!("{n} FCM push(es) at the stand-in"), || async {
        let h = si.state.hits("fcm:");
        (h.len() >= n).then_some(h)
    })
    .await;
    for h in &hits {
        assert!(h.problems.is_empty(), "{} {}: {:?}", h.kind, h.path, h.problems);
    }
    hits
}

/// `b` speaks on `a`'s socket with return route `all`: the socket is rebound to `b`.
async fn rebind(b: &Agent, ws: &mut mailroom::client::WsClient) {
    let pong = ws_request(b, ws, &binding_ping()).await;
    assert_eq!(type_name(&pong), "ping_response", "on b's socket: {pong}");
}

/// One socket on n1, live for X, is written X's queued message (its own drain's lease) and not
/// acknowledged; Y speaks on it (rebound to Y, X's delivery still leased); Y's wallet then
/// connects to n2, which supersedes n1's session: every lease of the socket goes back, X's
/// too. X has no session anywhere and nothing leased to reclaim: it is pushed. Before, only Y
/// was woken, and X heard nothing until new mail came (the lease, two minutes here, was not
/// left to run out).
#[actix_rt::test]
async fn a_superseded_socket_wakes_the_connection_it_left() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 100);
    cfg.push = Some(si.push_config(0, &["proj-a"], false));
    cfg.delivery.lease_ms = 120_000;
    let store = open_shared_store(&cfg).await;
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    let n2 = start_node(&cfg, "n2", it.next().unwrap(), &store, None);
    for (x, y) in [(&n1, "n2"), (&n2, "n1")] {
        eventually("link up", || async { peer_connected(x, y).await.then_some(()) }).await;
    }
    let (x, kx) = Agent::onboard(&invitation(&n1).await).await.unwrap();
    let (y, _) = Agent::onboard(&invitation(&n1).await).await.unwrap();
    set_fcm_device(&x, "left-token").await;
    assert_eq!(forward_to(&n1, &x, &kx, "leased").await, 202);
    wait_fcm(&si, 1).await;
    let mut ws = live_socket(&x, &n1).await;
    loop {
        if type_name(&ws_next_message(&x, &mut ws).await) == "delivery" {
            break;
        }
    }
    rebind(&y, &mut ws).await;
    // Y's wallet reconnects on n2: n1's session of Y is superseded.
    let mut on_n2 = y.websocket(&ws_url(&n2)).await.unwrap();
    rebind(&y, &mut on_n2).await;
    let hits = wait_fcm(&si, 2).await;
    assert_eq!(hits[1].body["message"]["token"], "left-token", "{:?}", hits[1].body);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    // Open until here: a socket's end wakes X too (tests/push.rs), not what this tests.
    drop((ws, on_n2));
}

/// A quiet socket (queue-only: a wallet polling its status) holds X's session, so a forward
/// for X wakes it and pushes nobody; it takes nothing. Y then speaks on it (rebound to Y): X
/// has no session anywhere and its mail is pending, so X is pushed then, as when a socket
/// closes. Before, nobody was told until new mail came or the socket closed.
#[actix_rt::test]
async fn a_socket_rebound_from_a_quiet_session_wakes_the_connection_it_left() {
    let si = StandIn::start();
    let pc = si.push_config(0, &["proj-a"], false);
    let (_d, n, x, kx) = node_with_wallet(Strategy::QueueOnly, move |c| c.push = Some(pc)).await;
    let (y, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    set_fcm_device(&x, "quiet-token").await;
    let mut ws = x.websocket(&ws_url(&n)).await.unwrap();
    let st = ws_request(&x, &mut ws, &pickup("status-request", json!({}))).await;
    assert_eq!(type_name(&st), "status", "{st}");
    assert_eq!(forward_to(&n, &x, &kx, "while-polling").await, 202);
    rebind(&y, &mut ws).await;
    let hits = wait_fcm(&si, 1).await;
    assert_eq!(hits[0].body["message"]["token"], "quiet-token", "{:?}", hits[0].body);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
    assert_eq!(queue_depth(&n).await, 1, "the quiet session took nothing");
    drop(ws);
}

/// A wallet that turns live mode on with the legacy prefix gets its live deliveries with it,
/// as every reply mirrors the prefix of what it answers.
#[actix_rt::test]
async fn live_deliveries_use_the_legacy_prefix_of_the_wallet_that_asked() {
    let (_d, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let change = json!({
        "@type": format!("{LEGACY_PREFIX}messagepickup/2.0/live-delivery-change"),
        "@id": new_id(),
        "live_delivery": true,
        "~transport": { "return_route": "all" },
    });
    let st = ws_request(&a, &mut ws, &change).await;
    assert_eq!(st["@type"], format!("{LEGACY_PREFIX}messagepickup/2.0/status"), "{st}");
    assert_eq!(st["live_delivery"], true, "{st}");
    assert_eq!(forward_to(&n, &a, &k, "legacy").await, 202);
    let d: Value = ws_next_message(&a, &mut ws).await;
    assert_eq!(d["@type"], format!("{LEGACY_PREFIX}messagepickup/2.0/delivery"), "{d}");
    assert_eq!(contents(&a, &d), vec!["legacy".to_string()]);
}
