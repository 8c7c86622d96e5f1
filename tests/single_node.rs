//! One real node on 127.0.0.1:0 (sled), driven by the Rust client over HTTP and WebSocket:
//! onboarding, mediation, keylists, forwards, every pickup flavour, live delivery,
//! redelivery, restart, endpoint delivery, and each kind of bad input.

mod common;

use common::cluster::live_socket;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsEvent};
use mailroom::config::Strategy;
use serde_json::{json, Value};
use std::collections::HashSet;

#[actix_rt::test]
async fn onboarding_mediation_and_keylist() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let inv = invitation(&n).await;
    let mut a = Agent::connect(&inv).await.expect("didexchange");
    let g = a.mediate().await.expect("grant");
    assert_eq!(g.endpoint, n.public_url());
    assert!(g.routing_keys[0].starts_with("did:key:z6Mk"), "{:?}", g.routing_keys);
    let k1 = a.new_recipient_key();
    let k2 = a.new_recipient_key();
    let updated = a.keylist_update(&[k1.did_key(), k2.verkey()], &[]).await.unwrap();
    assert_eq!(updated.len(), 2);
    assert!(updated.iter().all(|u| u["result"] == "success"), "{updated:?}");
    // Adding again changes nothing; removing works.
    let again = a.keylist_update(&[k1.did_key()], &[k2.verkey()]).await.unwrap();
    assert_eq!(again[0]["result"], "no_change");
    assert_eq!(again[1]["result"], "success");
    let list = a
        .request(&json!({"@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-query", "@id": "q1", "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&list), "keylist");
    assert_eq!(list["keys"], json!([{ "recipient_key": k1.did_key() }]));
    // Trust ping and discover features.
    let pong = a
        .request(&json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p1", "response_requested": true, "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&pong), "ping_response");
    assert_eq!(pong["~thread"]["thid"], "p1");
    let disclose = a
        .request(&json!({"@type": "https://didcomm.org/discover-features/1.0/query", "@id": "d1", "query": "https://didcomm.org/messagepickup/*", "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    let pids: Vec<&str> = disclose["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_str())
        .collect();
    assert_eq!(
        pids,
        vec![
            "https://didcomm.org/messagepickup/1.0",
            "https://didcomm.org/messagepickup/2.0"
        ]
    );
    // The legacy prefix is understood too.
    let pong = a
        .request(&json!({"@type": "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/trust_ping/1.0/ping", "@id": "p2", "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        pong["@type"],
        "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/trust_ping/1.0/ping_response"
    );
}

#[actix_rt::test]
async fn invitation_has_one_service_for_every_client() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let both = get_json(&format!("{}/invitation", n.public_url())).await;
    let eps: Vec<&str> = both["invitation"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["serviceEndpoint"].as_str().unwrap())
        .collect();
    // One service: ACA-Py 1.7 refuses more; Credo finds ws in the DID the exchange answers.
    assert_eq!(eps, vec![n.public_url()]);
    assert!(both["invitation_url"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}?oob=", n.public_url())));
    let http_only = get_json(&format!("{}/invitation?transport=http", n.public_url())).await;
    assert_eq!(http_only["invitation"]["services"].as_array().unwrap().len(), 1);
    assert_eq!(
        http_only["invitation"]["services"][0]["serviceEndpoint"],
        n.public_url()
    );
    assert_eq!(http_only["invitation"]["@id"], both["invitation"]["@id"]);
    let ws_only = get_json(&format!("{}/invitation?transport=ws", n.public_url())).await;
    assert_eq!(
        ws_only["invitation"]["services"][0]["serviceEndpoint"],
        format!("ws://{}", n.public_addr)
    );
    assert_eq!(ws_only["invitation"]["services"].as_array().unwrap().len(), 1);
    let (st, _) = get_status(&format!("{}/invitation?transport=smoke", n.public_url()), None).await;
    assert_eq!(st, 400);
}

#[actix_rt::test]
async fn a_key_held_by_another_connection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let inv = invitation(&n).await;
    let (_a, k) = Agent::onboard(&inv).await.unwrap();
    let mut b = Agent::connect(&inv).await.unwrap();
    b.mediate().await.unwrap();
    let updated = b.keylist_update(&[k.did_key()], &[]).await.unwrap();
    assert_eq!(updated[0]["result"], "client_error", "{updated:?}");
}

#[actix_rt::test]
async fn pickup_v2_over_http_leases_until_messages_received() {
    // Leases outlast the test: the checks below count what is leased.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 60_000;
    })
    .await;
    for i in 0..3 {
        assert_eq!(forward_to(&n, &a, &k, &format!("m{i}")).await, 202);
    }
    let status = a.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(type_name(&status), "status");
    assert_eq!(status["message_count"], 3);
    let delivery = a
        .request(&pickup("delivery-request", json!({"limit": 2})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&delivery), "delivery");
    let opened = a.open_delivery(&delivery).unwrap();
    assert_eq!(opened.len(), 2);
    assert_eq!(opened[0].1["content"], "m0");
    assert_eq!(opened[1].1["content"], "m1");
    // Leased: not counted as pending, not delivered again.
    let status = a.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(status["message_count"], 1);
    let ids: Vec<String> = opened.iter().map(|(id, _)| id.clone()).collect();
    let after = a
        .request(&pickup("messages-received", json!({"message_id_list": ids})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&after), "status");
    assert_eq!(after["message_count"], 1);
    let last = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    let opened = a.open_delivery(&last).unwrap();
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].1["content"], "m2");
    a.request(&pickup("messages-received", json!({"message_id_list": [opened[0].0]})))
        .await
        .unwrap();
    assert_eq!(queue_depth(&n).await, 0);
    // Empty queue: delivery-request answers with a status of 0.
    let empty = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&empty), "status");
    assert_eq!(empty["message_count"], 0);
}

#[actix_rt::test]
async fn pickup_v2_delivery_request_a_wallet_sends_without_return_route_leases_nothing() {
    // Without a return route a delivery would go to the wallet's endpoint, and a wallet has
    // none: leased, the message would look gone from the queue for the lease (60 s here).
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 60_000;
    })
    .await;
    assert_eq!(forward_to(&n, &a, &k, "kept").await, 202);
    // `pickup` asks for return route `all`: this one asks for none.
    let mut no_route = pickup("delivery-request", json!({"limit": 10}));
    no_route.as_object_mut().unwrap().remove("~transport");
    assert_eq!(a.send(&no_route).await.unwrap(), 202);
    let status = a.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(status["message_count"], 1, "still pending: {status}");
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&d), "delivery", "{d}");
    assert_eq!(contents(&a, &d), vec!["kept"]);
}

#[actix_rt::test]
async fn unacknowledged_http_delivery_comes_back_after_the_lease() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    forward_to(&n, &a, &k, "again").await;
    let d1 = a
        .request(&pickup("delivery-request", json!({"limit": 5})))
        .await
        .unwrap()
        .unwrap();
    let first = a.open_delivery(&d1).unwrap();
    assert_eq!(first.len(), 1);
    // No messages-received: after the 2 s lease the same message is delivered again.
    let again = eventually("redelivery after the lease", || {
        let a = &a;
        async move {
            let d = a
                .request(&pickup("delivery-request", json!({"limit": 5})))
                .await
                .ok()??;
            (type_name(&d) == "delivery").then(|| a.open_delivery(&d).unwrap())
        }
    })
    .await;
    assert_eq!(again[0].0, first[0].0);
    assert_eq!(again[0].1["content"], "again");
}

#[actix_rt::test]
async fn pickup_v1_batch() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    for i in 0..4 {
        forward_to(&n, &a, &k, &format!("b{i}")).await;
    }
    let batch = a
        .request(&json!({"@type": "https://didcomm.org/messagepickup/1.0/batch-pickup", "@id": "bp", "batch_size": 3, "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&batch), "batch");
    let got = contents(&a, &batch);
    assert_eq!(got, vec!["b0", "b1", "b2"]);
    // Credo reads `id` (RFC 0212 says `@id`) and validates it against [-_./a-zA-Z0-9]{8,64}.
    for item in batch["messages~attach"].as_array().unwrap() {
        let id = item["id"].as_str().expect("id as Credo reads it");
        assert_eq!(item["@id"], id);
        assert!(id.len() >= 8 && id.chars().all(|c| c.is_ascii_digit()), "{id}");
    }
    assert_eq!(queue_depth(&n).await, 1);
}

#[actix_rt::test]
async fn pickup_v1_batch_without_a_return_route_deletes_nothing() {
    // pickup 1.0 has no acknowledgement: a batch is removed only once it is handed back on the
    // request's own transport. Without a return route (a wallet has no endpoint either) it
    // would go nowhere, so nothing is taken from the queue.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 60_000; // a lease taken here would still hold the messages below
    })
    .await;
    for i in 0..2 {
        forward_to(&n, &a, &k, &format!("b{i}")).await;
    }
    let bp =
        |id: &str| json!({"@type": "https://didcomm.org/messagepickup/1.0/batch-pickup", "@id": id, "batch_size": 5});
    assert_eq!(a.send(&bp("no-route")).await.unwrap(), 202);
    assert_eq!(
        queue_depth(&n).await,
        2,
        "a batch-pickup without return route took messages"
    );
    // The same request with a return route gets both (none was leased above) and removes them.
    let mut with_route = bp("routed");
    with_route["~transport"] = json!({"return_route": "all"});
    let batch = a.request(&with_route).await.unwrap().unwrap();
    assert_eq!(type_name(&batch), "batch");
    assert_eq!(contents(&a, &batch), vec!["b0", "b1"]);
    assert_eq!(queue_depth(&n).await, 0);
}

#[actix_rt::test]
async fn pickup_v1_batch_over_a_socket_is_removed_once_read() {
    // QueueOnly: the socket pushes nothing itself, the batch is all it carries.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| c.delivery.lease_ms = 60_000).await;
    for i in 0..3 {
        forward_to(&n, &a, &k, &format!("w{i}")).await;
    }
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let bp = json!({"@type": "https://didcomm.org/messagepickup/1.0/batch-pickup", "@id": "bp", "batch_size": 2, "~transport": {"return_route": "all"}});
    let batch = ws_request(&a, &mut ws, &bp).await;
    assert_eq!(type_name(&batch), "batch", "{batch}");
    assert_eq!(contents(&a, &batch), vec!["w0", "w1"]);
    // Removed once the socket answered the ping that followed it: as the wallet reads on.
    read_on_until_depth(&n, &mut ws, 1, "the batch read removed").await;
    let status = a.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(status["message_count"], 1, "{status}");
}

/// A pickup 1.0 batch written to a socket whose wallet never reads it (gone, its socket left
/// half-open) is not lost: pickup 1.0 has no acknowledgement, but the batch stays leased until
/// a ping sent after it is answered, and the socket's end gives it back. Before, it was removed
/// as soon as it was written.
/// The same over return route `thread`, on a socket that is no session (not bound to the
/// wallet's connection): the batch the socket was written, and never confirmed, goes back as
/// the socket ends, not once its lease (60 s here) runs out.
#[actix_rt::test]
async fn pickup_v1_batch_on_a_thread_route_goes_back_when_its_socket_ends() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| c.delivery.lease_ms = 60_000).await;
    for i in 0..3 {
        forward_to(&n, &a, &k, &format!("t{i}")).await;
    }
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let bp = json!({"@type": "https://didcomm.org/messagepickup/1.0/batch-pickup", "@id": "bp-thread", "batch_size": 2, "~transport": {"return_route": "thread"}});
    let batch = ws_request(&a, &mut ws, &bp).await;
    assert_eq!(contents(&a, &batch), vec!["t0", "t1"]);
    drop(ws);
    eventually("the batch given back with the socket", || async {
        let status = a.request(&pickup("status-request", json!({}))).await.ok()??;
        (status["message_count"] == 3).then_some(())
    })
    .await;
}

#[actix_rt::test]
async fn pickup_v1_batch_written_to_a_socket_that_never_reads_it_comes_back() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| c.delivery.lease_ms = 60_000).await;
    for i in 0..3 {
        forward_to(&n, &a, &k, &format!("w{i}")).await;
    }
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let bp = json!({"@type": "https://didcomm.org/messagepickup/1.0/batch-pickup", "@id": "bp", "batch_size": 2, "~transport": {"return_route": "all"}});
    ws.send_envelope(a.pack(&bp).unwrap(), true).await.unwrap();
    let written = r#"mailroom_delivered_total{path="pickup",didcomm="v1"}"#;
    eventually("the batch written to the socket", || async {
        (metric(&n, written).await == Some(2.0)).then_some(())
    })
    .await;
    drop(ws);
    eventually("the batch given back with the socket", || async {
        let status = a.request(&pickup("status-request", json!({}))).await.ok()??;
        (status["message_count"] == 3).then_some(())
    })
    .await;
    let mut again = bp.clone();
    again["@id"] = json!("bp-again");
    let batch = a.request(&again).await.unwrap().unwrap();
    assert_eq!(contents(&a, &batch), vec!["w0", "w1"]);
}

#[actix_rt::test]
async fn return_route_thread_on_a_socket_answers_that_thread_only() {
    // RFC 0092 `thread`: replies of that thread come back on the socket; it is not a delivery
    // channel (only `all` binds it).
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    assert_eq!(forward_to(&n, &a, &k, "stay").await, 202);
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let ping = |id: &str, route: &str| {
        json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": id, "response_requested": true,
            "~transport": {"return_route": route}})
    };
    let pong = ws_request(&a, &mut ws, &ping("t1", "thread")).await;
    assert_eq!(type_name(&pong), "ping_response", "{pong}");
    assert_eq!(pong["~thread"]["thid"], "t1");
    // A second ping's answer is the very next frame: a push of "stay" would come before it.
    let pong = ws_request(&a, &mut ws, &ping("t2", "thread")).await;
    assert_eq!(
        type_name(&pong),
        "ping_response",
        "pushed on a thread-only socket: {pong}"
    );
    assert_eq!(
        queue_depth(&n).await,
        1,
        "the queued message was taken by a thread-only socket"
    );
    // `all` binds the socket: the queued message is pushed (implicit pickup).
    let pong = ws_request(&a, &mut ws, &ping("t3", "all")).await;
    assert_eq!(type_name(&pong), "ping_response", "{pong}");
    let pushed = ws_next_message(&a, &mut ws).await;
    assert_eq!(pushed["content"], "stay", "{pushed}");
}

#[actix_rt::test]
async fn live_mode_over_websocket_with_acks_over_http() {
    // A live window that held deliveries for a wallet acknowledging over HTTP would hold each
    // for a minute here: it never applies to such a wallet.
    // Leases outlast the test: one that ran out while the forwards below were slow would
    // deliver "queued-before" again.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.live_ack_wait_ms = 60_000;
        c.delivery.lease_ms = 60_000;
    })
    .await;
    forward_to(&n, &a, &k, "queued-before").await;
    let mut ws = live_socket(&a, &n).await;
    let mut seen = Vec::new();
    let mut ids = Vec::new();
    // What was queued before goes out at once; new forwards arrive live.
    let first = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&first), "delivery");
    for (id, m) in a.open_delivery(&first).unwrap() {
        ids.push(id);
        seen.push(m["content"].as_str().unwrap().to_string());
    }
    for i in 0..5 {
        assert_eq!(forward_to(&n, &a, &k, &format!("live{i}")).await, 202);
    }
    while seen.len() < 6 {
        let d = ws_next_message(&a, &mut ws).await;
        assert_eq!(type_name(&d), "delivery", "{d}");
        for (id, m) in a.open_delivery(&d).unwrap() {
            ids.push(id);
            seen.push(m["content"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen[0], "queued-before");
    let uniq: HashSet<&String> = seen.iter().collect();
    assert_eq!(uniq.len(), 6, "no duplicates: {seen:?}");
    // Credo 0.6.3 acknowledges over HTTP while the socket stays open.
    a.request(&pickup("messages-received", json!({"message_id_list": ids})))
        .await
        .unwrap();
    assert_eq!(queue_depth(&n).await, 0);
    // Six deliveries acknowledged: six observations of the delivery -> ack lag.
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert!(text.contains("mailroom_ack_lag_seconds_count 6"), "{text}");
    assert!(text.contains("mailroom_acknowledged_total 6"), "{text}");
    ws.close().await;
}

#[actix_rt::test]
async fn live_messages_wait_for_the_socket_acknowledgement_and_a_backlog_streams() {
    // batch_size 10; the wait long enough that only an acknowledgement can end it in the test,
    // and the lease too: m1, left unacknowledged while 25 forwards go in, is not delivered again.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.live_ack_wait_ms = 60_000;
        c.delivery.lease_ms = 60_000;
    })
    .await;
    let mut ws = live_socket(&a, &n).await;
    // The wallet acknowledges on its socket: from then on the window applies.
    assert_eq!(forward_to(&n, &a, &k, "m0").await, 202);
    let d0 = ws_next_message(&a, &mut ws).await;
    let ids0 = delivery_ids(&a, &d0);
    assert_eq!(ack_on_socket(&a, &mut ws, &ids0).await, Vec::<Vec<String>>::new());
    assert_eq!(forward_to(&n, &a, &k, "m1").await, 202);
    let d1 = ws_next_message(&a, &mut ws).await;
    let opened = a.open_delivery(&d1).unwrap();
    assert_eq!(opened.len(), 1);
    assert_eq!(opened[0].1["content"], "m1");
    // m1 is out, unacknowledged: what comes now waits in the queue.
    let want: Vec<String> = (0..25).map(|i| format!("w{i}")).collect();
    for w in &want {
        assert_eq!(forward_to(&n, &a, &k, w).await, 202);
    }
    // Each forward hands its message to the session in a task of its own, after the 202:
    // all 27 (m0, m1 and the 25) are with the session before the acknowledgement.
    eventually("every forward handed to the session", || async {
        let handed = metric(&n, r#"mailroom_handoffs_total{to="local"}"#).await;
        (handed == Some(27.0)).then_some(())
    })
    .await;
    // Acknowledged: the 25 go out together, in queue order (hand-offs of sequential forwards
    // may reach the session in another), and as full batches they stream without waiting for
    // acknowledgements of their own (10, 10, then the partial 5).
    let mut got = ack_on_socket(&a, &mut ws, &[opened[0].0.clone()]).await;
    while got.iter().map(Vec::len).sum::<usize>() < want.len() {
        let m = ws_next_message(&a, &mut ws).await;
        assert_eq!(type_name(&m), "delivery", "{m}");
        got.push(contents(&a, &m));
    }
    let sizes: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(sizes, vec![10, 10, 5], "{got:?}");
    assert_eq!(got.concat(), want);
    ws.close().await;
}

#[actix_rt::test]
async fn live_delivery_unacknowledged_comes_back_on_a_new_session() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 60_000; // only the session's end can free it in time
    })
    .await;
    let mut ws = live_socket(&a, &n).await;
    forward_to(&n, &a, &k, "unacked").await;
    let d = ws_next_message(&a, &mut ws).await;
    let first = a.open_delivery(&d).unwrap();
    assert_eq!(first[0].1["content"], "unacked");
    ws.close().await; // dropped without messages-received
    let mut ws2 = live_socket(&a, &n).await;
    let d2 = ws_next_message(&a, &mut ws2).await;
    let again = a.open_delivery(&d2).unwrap();
    assert_eq!(again[0].0, first[0].0, "the same queue entry is delivered again");
    a.request(&pickup("messages-received", json!({"message_id_list": [again[0].0]})))
        .await
        .unwrap();
    assert_eq!(queue_depth(&n).await, 0);
}

#[actix_rt::test]
async fn implicit_pickup_on_a_return_route_socket() {
    // i0 is confirmed only by the pong this socket sends as it reads on, after the next two
    // forwards: a lease running out meanwhile would write it again.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 30_000;
    })
    .await;
    forward_to(&n, &a, &k, "i0").await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    // Text frames work as well as binary ones.
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p", "response_requested": false, "~transport": {"return_route": "all"}});
    ws.send_envelope(a.pack(&ping).unwrap(), false).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        if got.len() == 1 {
            assert_eq!(forward_to(&n, &a, &k, "i1").await, 202);
            assert_eq!(forward_to(&n, &a, &k, "i2").await, 202);
        }
        let m = ws_next_message(&a, &mut ws).await;
        assert_eq!(type_name(&m), "message", "raw forwarded message: {m}");
        got.push(m["content"].as_str().unwrap().to_string());
    }
    assert_eq!(got, vec!["i0", "i1", "i2"]);
    read_on_until_depth(&n, &mut ws, 0, "implicit deliveries read removed").await;
}

/// Forwards answered one after the other reach an implicit-pickup socket in that order: their
/// hand-offs run on whichever HTTP workers took them, and used to race to the session.
#[actix_rt::test]
async fn implicit_pickup_writes_forwards_in_the_order_they_were_answered() {
    // A lease that ran out before the socket's pong confirmed its message would have it
    // written again: out of order, twice. 30 s: longer than a loaded box takes to confirm.
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.lease_ms = 30_000;
    })
    .await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p", "response_requested": false, "~transport": {"return_route": "all"}});
    ws.send_envelope(a.pack(&ping).unwrap(), true).await.unwrap();
    // Bound once a forward comes back on the socket.
    assert_eq!(forward_to(&n, &a, &k, "first").await, 202);
    let m = ws_next_message(&a, &mut ws).await;
    assert_eq!(m["content"], "first");
    // Read on while the forwards go in, as a wallet does: what is written is removed once the
    // socket answers the ping after it, and a socket that reads nothing for longer than a
    // lease would have it written again.
    let mut ws = ws.spawn_reader();
    let g = a.grant.clone().unwrap();
    let sender = Sender::new();
    let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    for text in &want {
        let status = sender
            .forward(&n.public_url(), &basic_message(text), &k.verkey(), &g.routing_keys)
            .await
            .unwrap();
        assert_eq!(status, 202);
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < want.len() {
        match ws.next(deadline).await.unwrap() {
            Some(mailroom::client::WsEvent::Envelope(e)) => {
                let m = a.unpack(&e).unwrap().0;
                got.push(m["content"].as_str().unwrap().to_string());
            }
            other => panic!("{other:?} after {} messages", got.len()),
        }
    }
    assert_eq!(got, want);
}

#[actix_rt::test]
async fn queue_only_pushes_nothing() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |_| {}).await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let ping =
        json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p", "~transport": {"return_route": "all"}});
    let pong = ws_request(&a, &mut ws, &ping).await;
    assert_eq!(type_name(&pong), "ping_response");
    assert_eq!(forward_to(&n, &a, &k, "stay").await, 202);
    // Not silence as proof: a positive marker. Several sweeps run after the forward was
    // queued, then a second ping on the same socket; its answer must be the very next frame
    // (a push of "stay" would come before it), and the message must still be pending, never
    // leased to this socket.
    let sweeps = |text: &str| -> u64 {
        text.lines()
            .filter(|l| {
                // The sweep's store query: for the node's own sessions, or every 10th sweep
                // for all connections.
                l.starts_with("mailroom_store_seconds_count{")
                    && (l.contains("op=\"pending_among\"") || l.contains("op=\"connections_with_pending\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let metrics_url = format!("{}/metrics", n.admin_url());
    let before = sweeps(&get_status(&metrics_url, None).await.1);
    eventually("three sweeps after the forward", || async {
        (sweeps(&get_status(&metrics_url, None).await.1) >= before + 3).then_some(())
    })
    .await;
    let ping2 =
        json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p2", "~transport": {"return_route": "all"}});
    let next = ws_request(&a, &mut ws, &ping2).await;
    assert_eq!(type_name(&next), "ping_response", "pushed under QueueOnly: {next}");
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    let q = &conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["mediation"] == "granted")
        .expect("the mediated connection")["queue"];
    assert_eq!(
        (q["pending"].as_u64(), q["in_flight"].as_u64()),
        (Some(1), Some(0)),
        "{q}"
    );
    let status = a.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(status["message_count"], 1);
}

#[actix_rt::test]
async fn queued_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    let n = start(&cfg);
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    for i in 0..10 {
        assert_eq!(forward_to(&n, &a, &k, &format!("r{i}")).await, 202);
    }
    n.stop().unwrap();
    let n2 = start(&cfg);
    let mut a = a;
    a.endpoint = n2.public_url();
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 100})))
        .await
        .unwrap()
        .unwrap();
    let got = contents(&a, &d);
    assert_eq!(got, (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>());
}

#[actix_rt::test]
async fn duplicate_forward_is_queued_once() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |_| {}).await;
    let s = Sender::new();
    let g = a.grant.clone().unwrap();
    let env = s
        .forward_envelope(&basic_message("once"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let (st1, _) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env.clone()).await;
    let (st2, _) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert_eq!((st1, st2), (202, 202));
    assert_eq!(queue_depth(&n).await, 1);
}

/// At the node's bound on queued messages (`store.max_queued_messages`, sled), a new forward is
/// refused 507 naming the setting, from any sender for any wallet; a copy of a message already
/// queued is still answered 202 (nothing new is queued); the wallet picks up and acknowledges
/// as ever, and each acknowledged message makes room for the next forward. Without it, every
/// connection anyone opens could fill its own queue and the node's memory had no bound.
#[actix_rt::test]
async fn at_the_node_s_bound_on_queued_messages_forwards_are_refused_until_a_pickup_makes_room() {
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.store.max_queued_messages = 3;
    })
    .await;
    let s = Sender::new();
    let g = a.grant.clone().unwrap();
    let first = s
        .forward_envelope(&basic_message("m0"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", first.clone()).await;
    assert_eq!(st, 202, "{body}");
    for i in 1..3 {
        assert_eq!(forward_to(&n, &a, &k, &format!("m{i}")).await, 202);
    }
    let env = s
        .forward_envelope(&basic_message("over"), &k.verkey(), &g.routing_keys)
        .unwrap();
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert_eq!(st, 507, "{body}");
    assert!(body.contains("store.max_queued_messages"), "{body}");
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", first).await;
    assert_eq!(
        st, 202,
        "a copy of a queued message is a duplicate, not refused: {body}"
    );
    assert_eq!(queue_depth(&n).await, 3);
    let refusing = || async {
        let s = get_json(&format!("{}/status", n.admin_url())).await;
        s["store"]["queue_log"]["refusing_new_messages"].as_bool()
    };
    assert_eq!(refusing().await, Some(true), "said on /status");

    let delivery = a
        .request(&pickup("delivery-request", json!({"limit": 1})))
        .await
        .unwrap()
        .unwrap();
    let opened = a.open_delivery(&delivery).unwrap();
    assert_eq!(opened.len(), 1);
    a.request(&pickup("messages-received", json!({"message_id_list": [opened[0].0]})))
        .await
        .unwrap();
    assert_eq!(refusing().await, Some(false), "room for one");
    assert_eq!(forward_to(&n, &a, &k, "after-room").await, 202);
    assert_eq!(forward_to(&n, &a, &k, "over-again").await, 507);
}

/// A wallet whose DID document lists routing keys (it has a mediator of its own) reads what it
/// is sent on its own transport: replies on its return route (pickups among them) are packed
/// for its key, never wrapped in forwards for its mediators, which it could not open (Credo packs a
/// return route's replies for the sender's key with no routing keys). A reply sent to its
/// endpoint (no return route) goes through its mediators: wrapped for the outermost routing
/// key. Before, return-route replies were wrapped too, and each wrap grew a pickup by a third.
#[actix_rt::test]
async fn return_route_replies_are_for_the_wallet_and_endpoint_replies_for_its_mediators() {
    use mailroom::didcomm::{did, envelope, keys::KeyPair};
    let (_dir, n, ..) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let (inner, outer) = (KeyPair::generate(), KeyPair::generate());
    let routing = [inner.verkey(), outer.verkey()];
    let posted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let p = posted.clone();
    let (endpoint, handle) = endpoint_stub(move |body| {
        p.lock().unwrap().push(body);
        202
    });
    let request = |my_did: &str, id: &str, pthid: &str| {
        json!({
            "@type": "https://didcomm.org/didexchange/1.1/request",
            "@id": id,
            "label": "behind-a-mediator",
            "did": my_did,
            "~thread": { "pthid": pthid },
        })
    };

    // On the return route: the response, then a mediation grant, each opened with the key.
    let inv = invitation(&n).await;
    let key = KeyPair::generate();
    let my_did = did::create_peer4(&key.verkey(), std::slice::from_ref(&endpoint), &routing);
    let mut a = Agent::from_parts(key, my_did.clone(), inv.recipient_key.clone(), n.public_url());
    let mut req = request(&my_did, "on-the-return-route", &inv.id);
    req["~transport"] = json!({ "return_route": "all" });
    let (status, body) = mailroom::client::post(&n.public_url(), a.pack(&req).unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(envelope::recipient_kids(&body).unwrap(), [a.key.verkey()]);
    assert_eq!(type_name(&a.unpack(&body).unwrap().0), "response");
    a.mediate().await.expect("a grant the wallet can open");

    // To the endpoint: wrapped for the outermost of its mediators.
    let inv = invitation(&n).await;
    let key = KeyPair::generate();
    let my_did = did::create_peer4(&key.verkey(), &[endpoint], &routing);
    let b = Agent::from_parts(key, my_did.clone(), inv.recipient_key.clone(), n.public_url());
    assert_eq!(
        b.send(&request(&my_did, "to-the-endpoint", &inv.id)).await.unwrap(),
        202
    );
    let body = eventually("the response POSTed to the endpoint", || async {
        posted.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(envelope::recipient_kids(&body).unwrap(), [outer.verkey()]);
    handle.stop(true).await;
}

#[actix_rt::test]
async fn bad_inputs_get_clear_errors_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.max_envelope_bytes = 64 * 1024;
    cfg.limits.max_ws_frame_bytes = 64 * 1024;
    let n = start(&cfg);
    let url = n.public_url();
    let ct = "application/didcomm-envelope-enc";
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();

    let (st, body) = post_raw(&url, ct, b"this is not json".to_vec()).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("bad-envelope"), "{body}");

    let good = a
        .pack(&json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "x"}))
        .unwrap();
    let (st, body) = post_raw(&url, ct, good[..good.len() / 2].to_vec()).await;
    assert_eq!(st, 400, "truncated: {body}");

    // Packed for a key this mediator does not have.
    let stranger = mailroom::didcomm::keys::KeyPair::generate();
    let wrong = mailroom::didcomm::envelope::pack(b"{}", &[stranger.verkey()], None).unwrap();
    let (st, body) = post_raw(&url, ct, wrong).await;
    assert_eq!(st, 400, "wrong key: {body}");

    // A forward to a key nobody registered.
    let g = a.grant.clone().unwrap();
    let st = Sender::new()
        .forward(&url, &basic_message("lost?"), &stranger.verkey(), &g.routing_keys)
        .await
        .unwrap();
    assert_eq!(st, 404);

    // An unknown message type from a connection: a problem report.
    let pr = a
        .request(&json!({"@type": "https://didcomm.org/no-such-protocol/1.0/hello", "@id": "u1", "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&pr), "problem-report");
    assert_eq!(pr["~thread"]["thid"], "u1");
    // A problem report, of any family, is never answered (no report ping-pong).
    let none = a
        .request(
            &json!({"@type": "https://didcomm.org/notification/1.0/problem-report", "@id": "pr1",
            "description": {"code": "message-parse-failure", "en": "x"}, "~transport": {"return_route": "all"}}),
        )
        .await
        .unwrap();
    assert!(none.is_none(), "{none:?}");

    // Oversized body: 413, in JSON as every refusal, and counted.
    let (st, body) = post_raw(&url, ct, vec![b'{'; 100 * 1024]).await;
    assert_eq!(st, 413, "{body}");
    let refusal: Value = serde_json::from_str(&body).expect("a JSON refusal");
    assert_eq!(refusal["error"], "envelope-too-big", "{body}");
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("limits.max_envelope_bytes"),
        "{body}"
    );
    assert_eq!(
        metric(
            &n,
            r#"mailroom_rejected_total{reason="envelope-too-big",didcomm="unknown"}"#
        )
        .await,
        Some(1.0)
    );

    // Oversized WebSocket frame: closed with 1009.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws.send_envelope(vec![b'x'; 100 * 1024], true).await.unwrap();
    match ws.next(WAIT).await.unwrap() {
        WsEvent::Closed(Some(r)) => assert_eq!(u16::from(r.code), 1009, "{r:?}"),
        other => panic!("expected a close, got {other:?}"),
    }

    // Garbage on a socket: an error frame, and the socket stays usable.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    ws.send_envelope(b"{\"protected\": 5}".to_vec(), false).await.unwrap();
    match ws.next(WAIT).await.unwrap() {
        WsEvent::Envelope(e) => {
            let v: Value = serde_json::from_slice(&e).unwrap();
            assert_eq!(v["error"], "bad-envelope");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    let pong = ws_request(&a, &mut ws, &json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "after", "~transport": {"return_route": "all"}})).await;
    assert_eq!(type_name(&pong), "ping_response");
    // (closed so that the next forward is not pushed down this implicit-pickup socket)
    ws.close().await;
    eventually("socket unbound", || async {
        (get_json(&format!("{}/status", n.admin_url())).await["sessions"] == 0).then_some(())
    })
    .await;

    // A connection without mediation asks for pickup: a problem report.
    let b = Agent::connect(&inv).await.unwrap();
    let pr = b.request(&pickup("status-request", json!({}))).await.unwrap().unwrap();
    assert_eq!(type_name(&pr), "problem-report", "{pr}");

    // An unknown sender's pickup: refused outright.
    let mut c = Agent::connect(&inv).await.unwrap();
    c.key = mailroom::didcomm::keys::KeyPair::generate();
    let err = c
        .request(&pickup("status-request", json!({})))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("403"), "{err}");

    // Still serving, and nothing queued was lost.
    assert_eq!(forward_to(&n, &a, &k, "still here").await, 202);
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.open_delivery(&d).unwrap()[0].1["content"], "still here");
}

/// An agent with its own HTTP endpoint gets its messages POSTed there, kept queued until a
/// POST succeeds.
#[actix_rt::test]
async fn endpoint_delivery_retries_until_accepted() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let refuse_first = Arc::new(AtomicUsize::new(1));
    let (r, f) = (received.clone(), refuse_first.clone());
    let (endpoint, handle) = endpoint_stub(move |body| {
        if f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
        {
            return 500;
        }
        r.lock().unwrap().push(body);
        202
    });

    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    assert_eq!(forward_to(&n, &a, &k, "to-endpoint").await, 202);
    let body = eventually("endpoint POST accepted", || {
        let received = received.clone();
        async move { received.lock().unwrap().first().cloned() }
    })
    .await;
    assert_eq!(
        refuse_first.load(Ordering::SeqCst),
        0,
        "the first POST was refused and retried"
    );
    let (m, _) = a.unpack(&body).unwrap();
    assert_eq!(m["content"], "to-endpoint");
    eventually("queue empty after delivery", || async {
        (queue_depth(&n).await == 0).then_some(())
    })
    .await;
    handle.stop(true).await;
}

/// A slow endpoint is not POSTed what its lease no longer covers: once the lease left is shorter
/// than a POST may take, the rest of the batch goes back to the queue. Before, the drain POSTed
/// its whole batch after the lease ran out, while the sweep had reclaimed those messages and the
/// wallet had picked them up: each delivered twice.
#[actix_rt::test]
async fn a_slow_endpoint_is_not_posted_what_its_lease_no_longer_covers() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const N: usize = 8;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    // Each POST takes 1.5 s, 2 s inside its timeout. A lease covers two: the second starts at
    // 1.5 s with 4.5 s of the lease left (the timeout and 1 s to spare), the third would start
    // at 3 s with 3 s left, so it and the rest are given back. POSTing the batch regardless,
    // the drain would still be at it when the lease runs out at 6 s.
    cfg.delivery.lease_ms = 6_000;
    cfg.delivery.endpoint_timeout_ms = 3_500;
    let n = start(&cfg);
    // Until every forward is queued the endpoint answers 503 at once, taking nothing (the
    // sweep tries again 1 s, 2 s, ... later): the first POST it takes comes from a drain that
    // leased them all. A POST is recorded as it arrives: sent is delivered, however late the
    // drain goes on.
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let all_queued = Arc::new(AtomicBool::new(false));
    let (r, q) = (received.clone(), all_queued.clone());
    let (endpoint, handle) = endpoint_stub(move |body| {
        if !q.load(Ordering::SeqCst) {
            return 503;
        }
        r.lock().unwrap().push(body);
        std::thread::sleep(std::time::Duration::from_millis(1_500));
        200
    });
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    forward_many(&n, &a, &k, N).await;
    all_queued.store(true, Ordering::SeqCst);
    // Once the batch is leased and its second POST under way, the wallet also picks up, and
    // acknowledges, whatever the queue gives it: what a lease that ran out would give.
    eventually("the endpoint's second POST", || {
        let received = received.clone();
        async move { (received.lock().unwrap().len() >= 2).then_some(()) }
    })
    .await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut picked = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let d = a
            .request(&pickup("delivery-request", json!({"limit": 10})))
            .await
            .unwrap()
            .unwrap();
        if type_name(&d) == "delivery" {
            let opened = a.open_delivery(&d).unwrap();
            let ids: Vec<&str> = opened.iter().map(|(id, _)| id.as_str()).collect();
            a.request(&pickup("messages-received", json!({"message_id_list": ids})))
                .await
                .unwrap();
            for (_, m) in &opened {
                *seen.entry(m["content"].as_str().unwrap().to_string()).or_default() += 1;
                picked += 1;
            }
        }
        if queue_depth(&n).await == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the queue never emptied");
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for body in received.lock().unwrap().iter() {
        let (m, _) = a.unpack(body).unwrap();
        *seen.entry(m["content"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), N, "every message delivered: {seen:?}");
    assert!(
        seen.values().all(|c| *c == 1),
        "none delivered twice (endpoint {}, pickup {picked}): {seen:?}",
        received.lock().unwrap().len()
    );
    handle.stop(true).await;
}

/// An endpoint that keeps failing costs one POST per try, not one per queued message, and the
/// sweep's retries of it back off (period, then doubled per failure). Before, every retry
/// period POSTed every message of a batch, for the queue's whole TTL. A new forward waits
/// for the next retry too (it is not POSTed at once while the endpoint backs off), which
/// delivers everything once the endpoint answers again.
#[actix_rt::test]
async fn a_failing_endpoint_is_retried_with_backoff_one_post_per_try() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    const N: usize = 5;

    let dir = tempfile::tempdir().unwrap();
    // The sweep every 100 ms retries endpoints every second. The first POST waits at the stub
    // until every forward is queued: its timeout outlasts that, so it fails by the 503, not by
    // timing out while the stub holds the retries behind it (answered, and counted, at once).
    // Well inside the lease, so a drain may POST its whole batch.
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    cfg.delivery.endpoint_timeout_ms = 10_000;
    cfg.delivery.lease_ms = 30_000;
    let n = start(&cfg);
    // When the stub refused each POST, on its own clock.
    let posts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let all_queued = Arc::new(AtomicBool::new(false));
    let up = Arc::new(AtomicBool::new(false));
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (p, q, u, r) = (posts.clone(), all_queued.clone(), up.clone(), received.clone());
    let (endpoint, handle) = endpoint_stub(move |body| {
        wait_for(&q);
        if !u.load(Ordering::SeqCst) {
            p.lock().unwrap().push(Instant::now());
            return 503;
        }
        r.lock().unwrap().push(body);
        200
    });
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    forward_many(&n, &a, &k, N).await;
    all_queued.store(true, Ordering::SeqCst);
    let first = eventually("the first POST refused", || async {
        posts.lock().unwrap().first().copied()
    })
    .await;
    // Retries 1 s, then 2 s, then 4 s after the failures before them: at most 3 tries in the
    // 4 s after the first, counted on the stub's clock (however late this test looks, a 4th
    // comes 7 s after the first at the earliest: 3 s to spare). Without the backoff, one POST
    // per message each try: 5 at the first, ~20 in the window.
    let window = Duration::from_secs(4);
    actix_rt::time::sleep_until((first + window).into()).await;
    let tried = posts.lock().unwrap().iter().filter(|t| **t < first + window).count();
    assert!(
        (1..=3).contains(&tried),
        "{tried} POSTs to a failing endpoint in the {window:?} after its first failure: {:?}",
        posts
            .lock()
            .unwrap()
            .iter()
            .map(|t| t.duration_since(first))
            .collect::<Vec<_>>()
    );
    assert_eq!(queue_depth(&n).await, N as u64, "nothing is lost meanwhile");
    up.store(true, Ordering::SeqCst);
    assert_eq!(forward_to(&n, &a, &k, "back").await, 202);
    eventually("everything POSTed once the endpoint answers", || {
        let received = received.clone();
        async move { (received.lock().unwrap().len() == N + 1).then_some(()) }
    })
    .await;
    handle.stop(true).await;
}

/// A message the endpoint refuses alone (a 4xx about it) does not hold back the messages
/// queued behind it: the drain goes on past it, and only it waits for a later try (its lease
/// running out), not POSTed again by the drain the next forward starts. Before, the drain ended
/// at the refusal and the rest waited for the sweep's next retry of the endpoint.
#[actix_rt::test]
async fn a_message_the_endpoint_refuses_does_not_hold_back_the_others() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    // The sweep retries endpoints every 50 s: longer than the test waits.
    let mut cfg = test_config(dir.path(), Strategy::QueueOnly);
    cfg.delivery.sweep_interval_ms = 5_000;
    cfg.delivery.lease_ms = 30_000;
    let n = start(&cfg);
    let all_queued = Arc::new(AtomicBool::new(false));
    let refused: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let refusals = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    // Every POST the stub answered: when, which body (its length and last bytes), what answer
    // (shown if the test fails: it failed once, in CI, with the refused message POSTed twice).
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = std::time::Instant::now();
    let (q, f, r, c, log) = (
        all_queued.clone(),
        refused.clone(),
        received.clone(),
        refusals.clone(),
        answered.clone(),
    );
    // The first message POSTed (once every forward is queued) is refused, every time.
    let (endpoint, handle) = endpoint_stub(move |body| {
        let arrived = started.elapsed();
        wait_for(&q);
        let tail = hex::encode(&body[body.len().saturating_sub(8)..]);
        let mut first = f.lock().unwrap();
        let status = match first.as_ref() {
            Some(b) if *b != body => {
                r.lock().unwrap().push(body.clone());
                200
            }
            _ => {
                *first = Some(body.clone());
                c.fetch_add(1, Ordering::SeqCst);
                400
            }
        };
        log.lock().unwrap().push(format!(
            "arrived {arrived:?}, answered {:?}: {} bytes ..{tail} -> {status}",
            started.elapsed(),
            body.len()
        ));
        status
    });
    let (a, k) = wallet_at_endpoint(&n, &endpoint).await;
    forward_many(&n, &a, &k, 4).await;
    all_queued.store(true, Ordering::SeqCst);
    eventually("the three others POSTed", || {
        let received = received.clone();
        async move { (received.lock().unwrap().len() == 3).then_some(()) }
    })
    .await;
    assert!(refused.lock().unwrap().is_some());
    // The stub records a body before it answers: the node removes a message once it has read
    // the 2xx (and counts it delivered after that).
    wait_endpoint_delivered(&n, 3).await;
    assert_eq!(queue_depth(&n).await, 1, "the refused one stays queued");
    // The next forward's drain POSTs the new one, not the refused one again.
    assert_eq!(forward_to(&n, &a, &k, "m4").await, 202);
    eventually("the next one POSTed", || {
        let received = received.clone();
        async move { (received.lock().unwrap().len() == 4).then_some(()) }
    })
    .await;
    let posts = (endpoint_posts(&n, "ok").await, endpoint_posts(&n, "failed").await);
    let answers = answered.lock().unwrap().join("\n");
    assert_eq!(
        refusals.load(Ordering::SeqCst),
        1,
        "refused once, left for its lease to run out; the stub answered:\n{answers}\nthe node's POSTs (ok, failed): {posts:?}"
    );
    wait_endpoint_delivered(&n, 4).await;
    assert_eq!(queue_depth(&n).await, 1);
    handle.stop(true).await;
}

/// Waits until the node counts `count` messages delivered to endpoints: each removed from the
/// queue first (the count follows the removal).
async fn wait_endpoint_delivered(n: &mailroom::node::RunningNode, count: u64) {
    let name = r#"mailroom_delivered_total{path="endpoint",didcomm="v1"}"#;
    eventually(&format!("{count} messages delivered to the endpoint"), || async {
        (metric(n, name).await.unwrap_or(0.0) as u64 >= count).then_some(())
    })
    .await;
}

/// Forwards `m0`, `m1`, ... to `k`, each accepted.
async fn forward_many(n: &mailroom::node::RunningNode, a: &Agent, k: &mailroom::didcomm::keys::KeyPair, count: usize) {
    for i in 0..count {
        assert_eq!(forward_to(n, a, k, &format!("m{i}")).await, 202);
    }
}

/// Holds an endpoint stub's answer (its own thread) until the test sets `flag`.
fn wait_for(flag: &std::sync::atomic::AtomicBool) {
    while !flag.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Every POST to an agent's endpoint so far, whatever its result.
async fn endpoint_posts_done(n: &mailroom::node::RunningNode) -> u64 {
    let mut all = 0;
    for r in ["ok", "failed", "refused"] {
        all += endpoint_posts(n, r).await;
    }
    all
}

async fn assert_not_drained(n: &mailroom::node::RunningNode) {
    let (st, body) = get_status(&format!("{}/ready", n.admin_url()), None).await;
    assert_eq!(st, 200, "the node is still ready: {body}");
    let s = get_json(&format!("{}/status", n.admin_url())).await;
    assert_eq!(s["drain"]["draining"], false, "{s}");
}

/// Blind SSRF: anyone can connect with a DID document whose endpoint is the node's own admin
/// listener (tokenless on loopback) and no return route. Neither the didexchange response nor
/// a queued message is POSTed there (the node would drain itself); the message stays queued.
#[actix_rt::test]
async fn an_endpoint_on_the_admin_listener_is_never_posted_to_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    // Through a name too: the check is on the addresses dialled, not on the URL.
    let port = n.admin_addr.port();
    for (i, endpoint) in [
        format!("{}/drain", n.admin_url()),
        format!("http://localhost:{port}/drain"),
    ]
    .into_iter()
    .enumerate()
    {
        connect_replying_to(&n, &endpoint).await;
        eventually("the response's POST done", || async {
            (endpoint_posts_done(&n).await > i as u64).then_some(())
        })
        .await;
        assert_not_drained(&n).await;
        assert_eq!(endpoint_posts(&n, "refused").await, i as u64 + 1, "{endpoint} refused");
    }

    // A queued message for such an agent: refused at every attempt, kept queued.
    let mut a = connect_replying_to(&n, &format!("http://[::ffff:127.0.0.1]:{port}/drain")).await;
    a.mediate().await.unwrap();
    let k = a.new_recipient_key();
    a.keylist_update(&[k.did_key()], &[]).await.unwrap();
    assert_eq!(forward_to(&n, &a, &k, "kept").await, 202);
    // Its response, then the message at least once.
    eventually("the response's and the queued message's POSTs done", || async {
        (endpoint_posts_done(&n).await > 3).then_some(())
    })
    .await;
    assert_not_drained(&n).await;
    assert_eq!(
        endpoint_posts(&n, "ok").await,
        0,
        "nothing POSTed to the admin listener"
    );
    assert_eq!(endpoint_posts(&n, "failed").await, 0);
    assert_eq!(queue_depth(&n).await, 1, "nothing lost");
    // Still there for the agent to pick up (once the endpoint attempt released it).
    let got = eventually("the message picked up", || async {
        let d = a
            .request(&pickup("delivery-request", json!({"limit": 10})))
            .await
            .ok()??;
        (type_name(&d) == "delivery").then(|| contents(&a, &d))
    })
    .await;
    assert_eq!(got, vec!["kept".to_string()]);
}

/// A redirect answered by an agent's endpoint is a failed POST, never followed: not to another
/// address that would take it, nor to the admin listener.
#[actix_rt::test]
async fn redirects_from_an_endpoint_are_not_followed() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let standin = format!("http://{}", listener.local_addr().unwrap());
    let hits: Arc<[AtomicUsize; 3]> = Arc::default();
    let (h, to_sink, to_admin) = (
        hits.clone(),
        format!("{standin}/sink"),
        format!("{}/drain", n.admin_url()),
    );
    // A POST counted in hits[i], answered 307 to `to`.
    fn redirect(hits: Arc<[AtomicUsize; 3]>, i: usize, to: String) -> actix_web::Route {
        web::post().to(move || {
            hits[i].fetch_add(1, Ordering::SeqCst);
            let to = to.clone();
            async move {
                HttpResponse::TemporaryRedirect()
                    .insert_header(("Location", to))
                    .finish()
            }
        })
    }
    let server = HttpServer::new(move || {
        let sink = h.clone();
        App::new()
            .route("/to-sink", redirect(h.clone(), 0, to_sink.clone()))
            .route("/to-admin", redirect(h.clone(), 1, to_admin.clone()))
            .route(
                "/sink",
                web::post().to(move || {
                    sink[2].fetch_add(1, Ordering::SeqCst);
                    async { HttpResponse::Accepted().finish() }
                }),
            )
    })
    .listen(listener)
    .unwrap()
    .workers(1)
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);

    for (i, path) in ["to-sink", "to-admin"].into_iter().enumerate() {
        connect_replying_to(&n, &format!("{standin}/{path}")).await;
        eventually("the response's POST done", || async {
            (endpoint_posts_done(&n).await > i as u64).then_some(())
        })
        .await;
        assert_eq!(hits[i].load(Ordering::SeqCst), 1, "{path} reached once");
        assert_eq!(
            hits[2].load(Ordering::SeqCst),
            0,
            "the redirect to the sink not followed"
        );
        assert_eq!(endpoint_posts(&n, "ok").await, 0, "a redirect is a failure");
    }
    assert_eq!(endpoint_posts(&n, "failed").await, 2, "both redirects are failed POSTs");
    assert_not_drained(&n).await;
    handle.stop(true).await;
}

#[actix_rt::test]
async fn admin_health_ready_status_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let (st, _) = get_status(&format!("{}/health", n.admin_url()), None).await;
    assert_eq!(st, 200);
    let (st, _) = get_status(&format!("{}/ready", n.admin_url()), None).await;
    assert_eq!(st, 200);
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    forward_to(&n, &a, &k, "count me").await;
    let s = get_json(&format!("{}/status", n.admin_url())).await;
    assert_eq!(s["node"], "n1");
    assert_eq!(s["queued"], 1);
    assert_eq!(s["sessions"], 0);
    assert!(s["peers"].is_array());
    let (st, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert_eq!(st, 200);
    assert!(text.contains("mailroom_forwards_received_total 1"), "{text}");
    assert!(text.contains("mailroom_queue_depth 1"), "{text}");
}

/// connections 1.0 (RFC 0160) with a legacy DID and inline DIDDoc: the response's
/// `connection~sig` is signed by the invitation key and names a DID document with the
/// mediator's key and endpoints; the connection then works.
#[actix_rt::test]
async fn connections_1_0_and_didexchange_1_0_with_legacy_dids() {
    use mailroom::didcomm::{did, envelope, jws, keys::KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let inv = invitation(&n).await;

    // connections 1.0
    let key = KeyPair::generate();
    let my_did = did::legacy_did_from_verkey(&key.public_bytes());
    let request = json!({
        "@type": "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/connections/1.0/request",
        "@id": "c-req",
        "label": "legacy",
        "connection": { "DID": my_did, "DIDDoc": did::legacy_diddoc(&my_did, &key.verkey(), &[], &[]) },
        "~transport": { "return_route": "all" },
    });
    let env = envelope::pack(
        request.to_string().as_bytes(),
        std::slice::from_ref(&inv.recipient_key),
        Some(&key),
    )
    .unwrap();
    let (st, body) = post_raw(&n.public_url(), "application/ssi-agent-wire", env).await;
    assert_eq!(st, 200, "{body}");
    let a = Agent::from_parts(key.clone(), my_did.clone(), inv.recipient_key.clone(), n.public_url());
    let (resp, _) = a.unpack(body.as_bytes()).unwrap();
    assert_eq!(
        resp["@type"],
        "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/connections/1.0/response"
    );
    assert_eq!(resp["~thread"]["thid"], "c-req");
    let (connection, signer) = jws::verify_connection(&resp["connection~sig"]).unwrap();
    assert_eq!(signer, inv.recipient_key, "signed by the invitation key");
    let doc = did::resolve(connection["DID"].as_str().unwrap(), Some(&connection["DIDDoc"])).unwrap();
    assert_eq!(doc.recipient_keys, vec![inv.recipient_key.clone()]);
    assert!(doc.endpoints.contains(&n.public_url()), "{:?}", doc.endpoints);
    let mut a = a;
    a.mediate().await.expect("the legacy connection works for mediation");

    // didexchange 1.0 with a signed did_doc~attach
    let key = KeyPair::generate();
    let my_did = did::legacy_did_from_verkey(&key.public_bytes());
    let doc_b64 = mailroom::client::b64url_json(&did::legacy_diddoc(&my_did, &key.verkey(), &[], &[]));
    let request = json!({
        "@type": "https://didcomm.org/didexchange/1.0/request",
        "@id": "dx-req",
        "label": "didexchange-1.0",
        "did": my_did,
        "did_doc~attach": { "@id": "d", "mime-type": "application/json", "data": { "base64": doc_b64, "jws": jws::sign_attachment_base64(&doc_b64, &key) } },
        "~thread": { "pthid": inv.id },
        "~transport": { "return_route": "all" },
    });
    let env = envelope::pack(
        request.to_string().as_bytes(),
        std::slice::from_ref(&inv.recipient_key),
        Some(&key),
    )
    .unwrap();
    let (st, body) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert_eq!(st, 200, "{body}");
    let b = Agent::from_parts(key, my_did, inv.recipient_key.clone(), n.public_url());
    let (resp, _) = b.unpack(body.as_bytes()).unwrap();
    assert_eq!(resp["@type"], "https://didcomm.org/didexchange/1.0/response");
    assert_eq!(resp["~thread"]["thid"], "dx-req");
    assert_eq!(resp["~thread"]["pthid"], inv.id.as_str());
    let att = &resp["did_doc~attach"]["data"];
    let signer = jws::verify_attachment_base64(att["base64"].as_str().unwrap(), &att["jws"]).unwrap();
    assert_eq!(signer, inv.recipient_key);
    let doc_json: Value =
        serde_json::from_slice(&mailroom::protocols::decode_b64_any(att["base64"].as_str().unwrap()).unwrap()).unwrap();
    let doc = did::resolve(resp["did"].as_str().unwrap(), Some(&doc_json)).unwrap();
    assert_eq!(doc.recipient_keys, vec![inv.recipient_key.clone()]);
    let pong = b
        .request(&json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": "p", "~transport": {"return_route": "all"}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&pong), "ping_response");
}

/// pickup 2.0 `recipient_key`: status and delivery-request naming a key cover only the
/// messages forwarded to that key (either key form), and leave the others queued.
#[actix_rt::test]
async fn pickup_recipient_key_filters_status_and_delivery() {
    // Leases outlast the test: "two" must still be leased at the last request.
    let (_d, n, mut a, k1) = node_with_wallet(Strategy::QueueOnly, |c| {
        c.delivery.lease_ms = 60_000;
    })
    .await;
    let k2 = a.new_recipient_key();
    let r = a.keylist_update(&[k2.did_key()], &[]).await.unwrap();
    assert_eq!(r[0]["result"], "success");
    let routing = a.grant.clone().unwrap().routing_keys;
    let sender = Sender::new();
    for (k, text) in [(&k1, "one-a"), (&k2, "two"), (&k1, "one-b")] {
        let st = sender
            .forward(
                &n.public_url(),
                &mailroom::client::basic_message(text),
                &k.verkey(),
                &routing,
            )
            .await
            .unwrap();
        assert_eq!(st, 202);
    }
    let status = a
        .request(&pickup("status-request", json!({"recipient_key": k1.verkey()})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status["message_count"], 2, "{status}");
    assert_eq!(status["recipient_key"], k1.verkey());
    // Another wallet naming this one's key counts and takes nothing of it: the filter narrows
    // the asker's own queue, never reaches another's.
    let (b, _) = Agent::onboard(&invitation(&n).await).await.expect("onboarding");
    let status = b
        .request(&pickup("status-request", json!({"recipient_key": k1.verkey()})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status["message_count"], 0, "{status}");
    let d = b
        .request(&pickup(
            "delivery-request",
            json!({"limit": 10, "recipient_key": k1.verkey()}),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(type_name(&d), "status", "nothing to deliver: {d}");
    let d = a
        .request(&pickup(
            "delivery-request",
            json!({"limit": 10, "recipient_key": k2.did_key()}),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(contents(&a, &d), vec!["two".to_string()]);
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(contents(&a, &d), vec!["one-a".to_string(), "one-b".to_string()]);
}

/// A forward whose `to` is a did:key (or a base58 key with a stray form) routes like its base58
/// verkey: the node looks a base58 `to` up as written and decodes only the other forms.
#[actix_rt::test]
async fn forward_to_in_any_key_form_is_queued() {
    use mailroom::didcomm::envelope;
    let (_dir, n, a, k) = node_with_wallet(Strategy::QueueOnly, |_| {}).await;
    let g = a.grant.clone().unwrap();
    let sender = Sender::new();
    let stranger = mailroom::didcomm::keys::KeyPair::generate();
    let forward = |text: &str, to: &str| {
        let inner = envelope::pack(
            &serde_json::to_vec(&basic_message(text)).unwrap(),
            &[k.verkey()],
            Some(&sender.key),
        )
        .unwrap();
        let fwd = json!({
            "@type": envelope::FORWARD_TYPE,
            "@id": mailroom::didcomm::message::new_id(),
            "to": to,
            "msg": serde_json::from_slice::<Value>(&inner).unwrap(),
        });
        envelope::pack(&serde_json::to_vec(&fwd).unwrap(), &g.routing_keys[..1], None).unwrap()
    };
    let ct = "application/didcomm-envelope-enc";
    let url = n.public_url();
    let (st, body) = post_raw(&url, ct, forward("as did:key", &k.did_key())).await;
    assert_eq!(st, 202, "did:key to: {body}");
    let (st, body) = post_raw(&url, ct, forward("as base58", &k.verkey())).await;
    assert_eq!(st, 202, "base58 to: {body}");
    let (st, _) = post_raw(&url, ct, forward("lost", &stranger.did_key())).await;
    assert_eq!(st, 404, "unknown did:key to");
    let (st, _) = post_raw(&url, ct, forward("lost", &stranger.verkey())).await;
    assert_eq!(st, 404, "unknown base58 to");
    // Base58 of 32 bytes that are not an Ed25519 point: refused as before, not looked up as is.
    let off_curve = (1u8..=255)
        .map(|b| bs58::encode([b; 32]).into_string())
        .find(|s| mailroom::didcomm::keys::parse_verkey(s).is_err())
        .expect("some 32-byte pattern is off the curve");
    let (st, body) = post_raw(&url, ct, forward("bad", &off_curve)).await;
    assert_eq!(st, 400, "off-curve to: {body}");
    assert_eq!(queue_depth(&n).await, 2);
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        contents(&a, &d),
        vec!["as did:key".to_string(), "as base58".to_string()]
    );
}

/// An agent whose endpoint is `https://`: reached with the webpki roots plus
/// `delivery.ca_file` (an operator's CA, here a test one); a node without that CA refuses the
/// certificate and counts a failed POST.
#[actix_rt::test]
async fn https_endpoints_are_reached_with_the_operators_ca() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, tls) = test_ca_and_server("mailroom endpoint test CA", &["127.0.0.1"]);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("https://{}/agent", listener.local_addr().unwrap());
    let hits: Arc<AtomicUsize> = Arc::default();
    let h = hits.clone();
    let server = HttpServer::new(move || {
        let h = h.clone();
        App::new().route(
            "/agent",
            web::post().to(move || {
                h.fetch_add(1, Ordering::SeqCst);
                async { HttpResponse::Accepted().finish() }
            }),
        )
    })
    .listen_rustls_0_23(listener, tls)
    .unwrap()
    .workers(1)
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);

    let mut cfg = test_config(&dir.path().join("a"), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.ca_file = Some(ca_file.clone());
    let trusting = start(&cfg);
    connect_replying_to(&trusting, &endpoint).await;
    eventually("the response POSTed over TLS", || async {
        (endpoint_posts_done(&trusting).await > 0).then_some(())
    })
    .await;
    assert_eq!(endpoint_posts(&trusting, "ok").await, 1);
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let other = start(&test_config(&dir.path().join("b"), Strategy::QueueAndLiveModeDelivery));
    connect_replying_to(&other, &endpoint).await;
    eventually("the POST tried", || async {
        (endpoint_posts_done(&other).await > 0).then_some(())
    })
    .await;
    assert_eq!(
        endpoint_posts(&other, "failed").await,
        1,
        "a certificate no root vouches for"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    handle.stop(true).await;
}

/// `delivery.allow_private_endpoints = false`: an agent whose endpoint is on loopback is not
/// POSTed to (a refusal, counted), and what is queued for it stays queued.
#[actix_rt::test]
async fn private_endpoints_are_refused_when_the_operator_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.allow_private_endpoints = false;
    let n = start(&cfg);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/agent", listener.local_addr().unwrap());
    connect_replying_to(&n, &endpoint).await;
    eventually("the POST refused", || async {
        (endpoint_posts(&n, "refused").await > 0).then_some(())
    })
    .await;
    assert_eq!(endpoint_posts(&n, "ok").await + endpoint_posts(&n, "failed").await, 0);
    drop(listener);
}

/// `limits.unmediated_connection_ttl_secs`: a connection that has not asked for mediation
/// that long after it was made is removed (anyone can make connections; one that never
/// mediates would stay for ever), and its sender is then a stranger. A mediated one stays.
#[actix_rt::test]
async fn connections_that_never_ask_for_mediation_are_removed_after_their_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.limits.unmediated_connection_ttl_secs = 1;
    let n = start(&cfg);
    let inv = invitation(&n).await;
    let idle = Agent::connect(&inv).await.unwrap();
    let mut wallet = Agent::connect(&inv).await.unwrap();
    wallet.mediate().await.unwrap();
    let listed = || async {
        get_json(&format!("{}/connections", n.admin_url())).await["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["mediation"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    eventually("the unmediated connection removed", || async {
        (listed().await == ["granted"]).then_some(())
    })
    .await;
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": mailroom::didcomm::message::new_id(),
        "response_requested": true, "~transport": {"return_route": "all"}});
    let err = idle.request(&ping).await.unwrap_err().to_string();
    assert!(err.contains("403"), "{err}");
    let k = wallet.new_recipient_key();
    wallet.keylist_update(&[k.did_key()], &[]).await.unwrap();
    assert_eq!(forward_to(&n, &wallet, &k, "still mediated").await, 202);
}
