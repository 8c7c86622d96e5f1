//! Operator actions across a 3-node cluster on the real PostgreSQL (a fresh database per
//! test): the action is taken on one node's admin listener, its effect is checked on the
//! others. Also the node drain: not ready, sessions closed with 1001, no new sessions, the
//! wallet carries on through another node without losing a message.

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsClient, WsEvent};
use mailroom::didcomm::keys::KeyPair;
use mailroom::node::RunningNode;
use serde_json::{json, Value};

/// A fast sweep: the drain test relies on delivery after the session moved.
const FAST_SWEEP_MS: u64 = 200;

async fn admin(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let c = common::client();
    let req = match method {
        "DELETE" => c.delete(url),
        "POST" => c.post(url),
        _ => c.get(url),
    };
    let mut res = match body {
        Some(b) => req.send_json(&b).await,
        None => req.send().await,
    }
    .expect("admin request");
    let bytes = res.body().limit(16 << 20).await.expect("body");
    (
        res.status().as_u16(),
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn forward_via(node: &RunningNode, a: &Agent, key: &KeyPair, text: &str) -> u16 {
    Sender::new()
        .forward(
            &node.public_url(),
            &basic_message(text),
            &key.verkey(),
            &a.grant.as_ref().unwrap().routing_keys,
        )
        .await
        .unwrap()
}

/// Reads the socket until it closes; returns the close code.
async fn closed_with(ws: &mut WsClient) -> u16 {
    loop {
        match ws.next(WAIT).await.expect("the socket closes") {
            WsEvent::Closed(r) => return r.map(|r| u16::from(r.code)).unwrap_or(0),
            WsEvent::Envelope(_) => continue,
        }
    }
}

async fn connection_status(n: &RunningNode, id: &str) -> (u16, Value) {
    admin("GET", &format!("{}/connections/{id}", n.admin_url()), None).await
}

async fn local_sessions(n: &RunningNode, conn: &str) -> usize {
    let v = get_json(&format!("{}/sessions", n.admin_url())).await;
    v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["connection"] == conn)
        .count()
}

#[actix_rt::test]
async fn deleting_a_connection_on_one_node_removes_it_everywhere() {
    let f = cluster_of(3, FAST_SWEEP_MS).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let inv = invitation(n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    let id = a_connection_id(n1).await;
    // Queued while offline, then handed to the live session on n2 and left unacknowledged:
    // leased messages must go too.
    for i in 0..2 {
        assert_eq!(forward_via(n3, &a, &k, &format!("m{i}")).await, 202);
    }
    let mut ws = live_socket(&a, n2).await;
    wait_owner(&[n1, n2, n3], &id, "n2").await;
    eventually("both messages in flight on n2", || async {
        let (_, c) = connection_status(n1, &id).await;
        (c["queue"]["in_flight"] == 2).then_some(())
    })
    .await;

    // The operator acts on n3: the session lives on n2.
    let (code, body) = admin("DELETE", &format!("{}/connections/{id}", n3.admin_url()), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["removed"]["connection"], true, "{body}");
    assert_eq!(body["removed"]["routing_keys"], 1, "{body}");
    assert_eq!(body["removed"]["messages"], 2, "{body}");
    assert_eq!(body["sessions_closed_here"], 0, "{body}");
    assert_eq!(body["close_requested_on"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(
        closed_with(&mut ws).await,
        1008,
        "the session on n2 is closed with a reason"
    );
    eventually("n2 holds no session of the removed connection", || async {
        (local_sessions(n2, &id).await == 0).then_some(())
    })
    .await;

    for n in [n1, n2, n3] {
        assert_eq!(connection_status(n, &id).await.0, 404, "{} still knows {id}", n.node_id);
        assert_eq!(queue_depth(n).await, 0);
        assert_eq!(
            forward_via(n, &a, &k, "after").await,
            404,
            "a forward to a removed key on {} is refused like any unknown key",
            n.node_id
        );
    }
    // The wallet itself is gone too: its messages no longer authenticate a connection.
    let ping = a
        .request(&json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p1", "response_requested": true, "~transport": {"return_route": "all"}}))
        .await;
    assert!(ping
        .map(|r| r.is_none() || type_name(&r.unwrap()) != "ping_response")
        .unwrap_or(true));

    // Idempotent, from any node.
    let (code, again) = admin("DELETE", &format!("{}/connections/{id}", n1.admin_url()), None).await;
    assert_eq!(code, 200);
    assert_eq!(again["removed"]["connection"], false, "{again}");
    assert_eq!(again["removed"]["messages"], 0, "{again}");
}

#[actix_rt::test]
async fn dropping_a_queue_and_revoking_mediation_hold_on_every_node() {
    let f = cluster_of(3, FAST_SWEEP_MS).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let inv = invitation(n1).await;
    let (mut a, k) = Agent::onboard(&inv).await.unwrap();
    let id = a_connection_id(n1).await;
    for i in 0..3 {
        assert_eq!(forward_via(n2, &a, &k, &format!("m{i}")).await, 202);
    }
    assert_eq!(connection_status(n1, &id).await.1["queue"]["depth"], 3);

    // Drop the queue on n3; n1 sees it empty, the connection and its key stay.
    let (code, body) = admin("DELETE", &format!("{}/connections/{id}/queue", n3.admin_url()), None).await;
    assert_eq!((code, body["dropped"].as_u64()), (200, Some(3)), "{body}");
    let (_, c) = connection_status(n1, &id).await;
    assert_eq!(c["queue"]["depth"], 0, "{c}");
    assert_eq!(c["routing_keys"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(
        admin("DELETE", &format!("{}/connections/nope/queue", n3.admin_url()), None)
            .await
            .0,
        404
    );

    // Revoke mediation on n2 while the wallet's live session is on n1.
    let mut ws = live_socket(&a, n1).await;
    wait_owner(&[n1, n2, n3], &id, "n1").await;
    let url = format!("{}/connections/{id}/mediation", n2.admin_url());
    let (code, body) = admin("POST", &url, Some(json!({"state": "granted"}))).await;
    assert_eq!(code, 400, "only a revocation: {body}");
    let (code, body) = admin("POST", &url, Some(json!({"state": "denied"}))).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["routing_keys_removed"], 1, "{body}");
    assert_eq!(
        closed_with(&mut ws).await,
        1008,
        "the session on n1 is closed with a reason"
    );
    assert_eq!(connection_status(n3, &id).await.1["mediation"], "denied");
    for n in [n1, n2, n3] {
        assert_eq!(forward_via(n, &a, &k, "after").await, 404, "forward via {}", n.node_id);
    }
    // The wallet, through any node: keylist-update and pickup are refused, mediation too.
    a.endpoint = n3.public_url();
    let k2 = a.new_recipient_key();
    let r = a
        .request(&json!({
            "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
            "@id": "ku1",
            "updates": [{"recipient_key": k2.did_key(), "action": "add"}],
            "~transport": {"return_route": "all"},
        }))
        .await
        .unwrap()
        .expect("a reply");
    assert_eq!(type_name(&r), "problem-report", "{r}");
    let r = a
        .request(&pickup("status-request", json!({})))
        .await
        .unwrap()
        .expect("a reply");
    assert_eq!(type_name(&r), "problem-report", "{r}");
    a.endpoint = n2.public_url();
    assert!(a.mediate().await.is_err(), "a revoked mediation is not granted again");
    assert_eq!(connection_status(n1, &id).await.1["mediation"], "denied");
}

/// A revocation made while forwards flow in through every node: each forward is answered 202
/// and queued, or refused 404 and not; once the operator has the answer, no forward is
/// accepted and the connection's queue no longer grows.
#[actix_rt::test]
async fn forwards_flowing_through_every_node_stop_at_the_revocation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let f = cluster_of(3, FAST_SWEEP_MS).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let (a, k) = Agent::onboard(&invitation(n1).await).await.unwrap();
    let id = a_connection_id(n1).await;
    let depth = |n: &RunningNode| {
        let (n, id) = (n.admin_url(), id.clone());
        async move {
            admin("GET", &format!("{n}/connections/{id}"), None).await.1["queue"]["depth"]
                .as_u64()
                .expect("queue.depth")
        }
    };
    let answered = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for (i, n) in [n1, n2, n3].into_iter().enumerate() {
        let (url, key) = (n.public_url(), k.verkey());
        let routing = a.grant.as_ref().unwrap().routing_keys.clone();
        let answered = answered.clone();
        senders.push(actix_rt::spawn(async move {
            let (mut out, mut after) = (Vec::new(), 0);
            for j in 0.. {
                let started_after = answered.load(Ordering::SeqCst);
                let st = Sender::new()
                    .forward(&url, &basic_message(&format!("{i}-{j}")), &key, &routing)
                    .await
                    .unwrap();
                out.push((started_after, st));
                after += usize::from(started_after);
                if after == 10 {
                    break;
                }
            }
            out
        }));
    }
    eventually("forwards queued through the nodes", || async {
        (depth(n1).await >= 6).then_some(())
    })
    .await;
    let url = format!("{}/connections/{id}/mediation", n2.admin_url());
    let (code, body) = admin("POST", &url, Some(json!({"state": "denied"}))).await;
    assert_eq!((code, body["routing_keys_removed"].as_u64()), (200, Some(1)), "{body}");
    answered.store(true, Ordering::SeqCst);
    let at_answer = depth(n3).await;
    let mut accepted = 0;
    for s in senders {
        for (started_after, st) in s.await.unwrap() {
            assert!(st == 202 || st == 404, "{st}");
            if started_after {
                assert_eq!(st, 404, "a forward sent after the revocation was answered is refused");
            }
            accepted += u64::from(st == 202);
        }
    }
    let held = depth(n1).await;
    assert_eq!(held, at_answer, "the queue grew after the revocation was answered");
    assert_eq!(held, accepted, "a forward answered 202 is queued, one refused is not");
}

#[actix_rt::test]
async fn a_drained_node_sends_its_wallets_elsewhere_and_loses_nothing() {
    let f = cluster_of(3, FAST_SWEEP_MS).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let inv = invitation(n1).await;
    let (mut a, k) = Agent::onboard(&inv).await.unwrap();
    let id = a_connection_id(n1).await;
    let mut ws = live_socket(&a, n1).await;
    wait_owner(&[n1, n2, n3], &id, "n1").await;
    assert_eq!(forward_via(n2, &a, &k, "before").await, 202);
    let d = ws_next_message(&a, &mut ws).await;
    let ids: Vec<String> = a.open_delivery(&d).unwrap().into_iter().map(|(i, _)| i).collect();
    a.endpoint = n1.public_url();
    a.request(&pickup("messages-received", json!({"message_id_list": ids})))
        .await
        .unwrap();

    // A socket that never bound to a connection (it sent nothing yet) is closed too: it kept
    // the drained node from ever being empty, and was dropped without a close at the stop.
    let mut unbound = a.websocket(&ws_url(n1)).await.unwrap();
    let (code, body) = admin("POST", &format!("{}/drain", n1.admin_url()), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["draining"], true);
    assert_eq!(closed_with(&mut ws).await, 1001, "the live socket is closed with 1001");
    assert_eq!(
        closed_with(&mut unbound).await,
        1001,
        "the unbound socket is closed with 1001"
    );
    assert_eq!(get_status(&format!("{}/ready", n1.admin_url()), None).await.0, 503);
    assert_eq!(get_status(&format!("{}/ready", n2.admin_url()), None).await.0, 200);
    // No new session on n1.
    assert!(
        a.websocket(&ws_url(n1)).await.is_err(),
        "a WebSocket upgrade on a draining node is refused"
    );
    eventually("n1 says it is empty", || async {
        let s = get_json(&format!("{}/status", n1.admin_url())).await;
        (s["drain"]["empty"] == true).then_some(())
    })
    .await;
    // Forwards still answered on n1 (the load balancer may still have some in flight).
    assert_eq!(forward_via(n1, &a, &k, "during-1").await, 202);
    // The wallet reconnects through the load balancer and lands on n2: everything arrives.
    a.endpoint = n2.public_url();
    let mut ws = live_socket(&a, n2).await;
    assert_eq!(forward_via(n3, &a, &k, "during-2").await, 202);
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = ws_next_message(&a, &mut ws).await;
        if type_name(&d) != "delivery" {
            continue;
        }
        let mut ids = Vec::new();
        for (i, m) in a.open_delivery(&d).unwrap() {
            ids.push(i);
            got.push(m["content"].as_str().unwrap().to_string());
        }
        a.request(&pickup("messages-received", json!({"message_id_list": ids})))
            .await
            .unwrap();
    }
    got.sort();
    assert_eq!(got, vec!["during-1", "during-2"]);
    eventually("nothing left queued", || async {
        (queue_depth(n2).await == 0).then_some(())
    })
    .await;

    let (code, body) = admin("POST", &format!("{}/undrain", n1.admin_url()), None).await;
    assert_eq!((code, body["draining"].clone()), (200, json!(false)), "{body}");
    assert_eq!(get_status(&format!("{}/ready", n1.admin_url()), None).await.0, 200);
    let ws = a.websocket(&ws_url(n1)).await;
    assert!(ws.is_ok(), "sessions accepted again after undrain");
}

/// Forwards per second summed over a series (one point per second: the count it saw).
fn forwards_in(series: &Value) -> f64 {
    series
        .as_array()
        .map(|ps| ps.iter().map(|p| p["forwards"].as_f64().unwrap_or(0.0)).sum())
        .unwrap_or(0.0)
}

/// The history asked of one node shows the whole cluster: each node's own series, their sum,
/// and the deepest queues with their connection labels, although that node took no forward.
#[actix_rt::test]
async fn the_history_of_one_node_shows_the_rates_of_every_node() {
    let f = cluster_of(3, FAST_SWEEP_MS).await;
    let (n1, n2, n3) = (&f.nodes[0], &f.nodes[1], &f.nodes[2]);
    let inv = invitation(n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    let id = a_connection_id(n1).await;
    for i in 0..5 {
        assert_eq!(forward_via(n2, &a, &k, &format!("two-{i}")).await, 202);
    }
    for i in 0..3 {
        assert_eq!(forward_via(n3, &a, &k, &format!("three-{i}")).await, 202);
    }
    let h = eventually("n1's history counts the 8 forwards of n2 and n3", || async {
        let (code, h) = admin("GET", &format!("{}/history", n1.admin_url()), None).await;
        assert_eq!(code, 200, "{h}");
        (forwards_in(&h["cluster"]["fine"]) > 7.5).then_some(h)
    })
    .await;
    let nodes = h["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{h}");
    let node = |id: &str| {
        nodes
            .iter()
            .find(|n| n["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {h}"))
    };
    assert!(
        forwards_in(&node("n1")["history"]["fine"]) < 0.5,
        "n1 took no forward: {h}"
    );
    assert!(forwards_in(&node("n2")["history"]["fine"]) > 4.5, "{h}");
    assert!(forwards_in(&node("n3")["history"]["fine"]) > 2.5, "{h}");
    let deepest = &h["queues"]["deepest"][0];
    assert_eq!(deepest["connection"], id.as_str(), "{h}");
    assert_eq!(deepest["depth"], 8, "{h}");
    assert_eq!(deepest["label"], "mailroom-client", "{h}");
    assert_eq!(h["links"].as_array().map(Vec::len), Some(2), "{h}");
}

/// A connection deleted while the link to the node holding its session is cut: the request
/// cannot reach that node then, and is repeated when the link comes back, so the session
/// closes there too.
#[actix_rt::test]
async fn a_delete_made_while_a_link_is_cut_closes_the_session_when_it_heals() {
    let pair = ProxiedPair::start(FAST_SWEEP_MS).await;
    let (n1, n2) = (&pair.n1, &pair.n2);
    let inv = invitation(n1).await;
    let (a, _) = Agent::onboard(&inv).await.unwrap();
    let id = a_connection_id(n1).await;
    let mut ws = live_socket(&a, n2).await;
    wait_owner(&[n1], &id, "n2").await;

    pair.cut();
    eventually("n1 sees n2 down", || async {
        (!peer_connected(n1, "n2").await).then_some(())
    })
    .await;
    let (code, body) = admin("DELETE", &format!("{}/connections/{id}", n1.admin_url()), None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["close_requested_on"], json!([]), "no link was up: {body}");
    assert_eq!(local_sessions(n2, &id).await, 1, "n2 could not have heard of it yet");

    pair.restore();
    assert_eq!(
        closed_with(&mut ws).await,
        1008,
        "the session on n2 is closed once the link is back"
    );
    eventually("n2 holds no session of the removed connection", || async {
        (local_sessions(n2, &id).await == 0).then_some(())
    })
    .await;
}
