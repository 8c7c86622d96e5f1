//! DIDComm v2 beside v1 on real nodes: the v2 Rust client (src/client/v2.rs) mediates,
//! registers, forwards and picks up over HTTP and live over a WebSocket; refusals come back
//! 4xx with a report-problem 2.0 the sender can open, and the node serves on; a v1 and a v2
//! wallet are live on one node at once; on a 2-node PostgreSQL cluster a v2 wallet's socket on
//! n1 receives live what a sender forwarded to n2.

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::v2::{V2Agent, V2Mediator, V2Sender, V2Socket};
use mailroom::client::{basic_message, Agent};
use mailroom::config::Strategy;
use mailroom::didcomm::v2::{did, TYP_ENCRYPTED};
use mailroom::node::RunningNode;
use mailroom::store::{Connection, Store, StoreResult};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::{watch, Notify};

fn node() -> (RunningNode, tempfile::TempDir) {
    node_with(|_| {})
}

fn node_with(edit: impl FnOnce(&mut mailroom::config::Config)) -> (RunningNode, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    // Longer than the slowest acknowledgement on a loaded machine: a duplicate means a bug.
    cfg.delivery.lease_ms = 30_000;
    edit(&mut cfg);
    let n = start(&cfg);
    (n, dir)
}

async fn v2_mediator(n: &RunningNode) -> V2Mediator {
    let v = get_json(&format!("{}/invitation?didcomm=v2", n.public_url())).await;
    let url = v["invitation_url"].as_str().unwrap();
    assert!(url.contains("?_oob="), "{url}");
    assert_eq!(
        v["invitation"]["type"],
        "https://didcomm.org/out-of-band/2.0/invitation"
    );
    let m = V2Mediator::from_invitation_url(url).unwrap();
    assert!(m.did.starts_with("did:peer:2."), "{}", m.did);
    assert!(did::veramo_readable(&m.did));
    m
}

fn kind(m: &Value) -> &str {
    m["type"]
        .as_str()
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// Reads live deliveries until `want` distinct contents arrived; acks each on the socket.
async fn receive_live(a: &V2Agent, s: &mut V2Socket, want: usize) -> (Vec<String>, usize) {
    let mut seen = Vec::new();
    let mut uniq = HashSet::new();
    let mut dups = 0;
    let deadline = std::time::Instant::now() + WAIT;
    while uniq.len() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {want} delivered: {seen:?}",
            uniq.len()
        );
        let d = a.recv(s, WAIT).await.unwrap();
        if kind(&d) != "delivery" {
            continue;
        }
        let mut ids = Vec::new();
        for (id, m) in a.open_delivery(&d).unwrap() {
            ids.push(id);
            let c = m["body"]["content"].as_str().unwrap().to_string();
            if !uniq.insert(c.clone()) {
                dups += 1;
            }
            seen.push(c);
        }
        let ack = a.message(
            "https://didcomm.org/messagepickup/3.0/messages-received",
            json!({ "message_id_list": ids }),
        );
        a.send(s, &ack).await.unwrap();
    }
    (seen, dups)
}

#[actix_rt::test]
async fn mediation_forward_and_pickup_over_http() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    assert_eq!(m.http, n.public_url().trim_end_matches('/'));
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    assert_eq!(a.routing_did.as_deref(), Some(m.did.as_str()));
    // The spec's authcrypt (draft-04, the tag in the KDF) answered in kind: Indicio needs it.
    let d = a.last_reply_dialect().unwrap();
    assert!(
        d.tag_in_kdf && d.enc == mailroom::didcomm::v2::jwe::Enc::A256CbcHs512,
        "{d:?}"
    );

    // Query the keylist (3.0).
    assert_eq!(recipient_dids(&a).await, vec![r.clone()]);

    let s = V2Sender::new().unwrap();
    for i in 0..3 {
        assert_eq!(s.forward(&r, &s.basic(&r, &format!("hello-{i}"))).await.unwrap(), 202);
    }
    assert_eq!(a.status(None).await.unwrap(), 3);
    let got = a.delivery(2, None).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1["body"]["content"], "hello-0");
    assert_eq!(got[0].1["from"], json!(s.did));
    let ids: Vec<String> = got.iter().map(|(i, _)| i.clone()).collect();
    assert_eq!(a.ack(&ids).await.unwrap(), 1);
    let rest = a.delivery(10, None).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(a.ack(&[rest[0].0.clone()]).await.unwrap(), 0);
    assert!(a.delivery(10, None).await.unwrap().is_empty());
    assert_eq!(queue_depth(&n).await, 0);

    // A resent forward inside the dedup window is not queued twice.
    let (http, env) = s.forward_envelope(&r, &s.basic(&r, "once")).unwrap();
    for _ in 0..2 {
        assert_eq!(post_raw(&http, TYP_ENCRYPTED, env.clone()).await.0, 202);
    }
    assert_eq!(a.status(None).await.unwrap(), 1);
}

/// A node's v2 DID names its public URLs: a node started again under another one (here a new
/// bound address, as a new port or container IP gives a node without `public_url`; or an
/// operator's new `cluster.public_url`) hands out a new DID of the same keys. The DID every
/// wallet was given before (its routing DID, in every peer DID it handed out) is still the
/// node's: a forward packed to it is queued, and the wallet's own messages naming it in `to`
/// are answered.
#[actix_rt::test]
async fn the_did_given_under_an_earlier_public_url_is_still_the_mediators() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    let store = mailroom::store::open_sled(&dir.path().join("data")).await.unwrap();
    let n1 = start_on(&cfg, store.clone());
    let before = v2_mediator(&n1).await;
    let mut a = V2Agent::new(before.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    assert_eq!(a.routing_did.as_deref(), Some(before.did.as_str()));
    n1.stop().unwrap();

    // The same store (the same keys) behind another address: another DID.
    let n2 = start_on(&cfg, store.clone());
    let after = v2_mediator(&n2).await;
    assert_ne!(after.did, before.did);
    let s = V2Sender::new().unwrap();
    // Anoncrypted to the routing DID the wallet was given (kid `<before>#key-1`).
    let (_, env) = s.forward_envelope(&r, &s.basic(&r, "still here")).unwrap();
    let (status, body) = post_raw(&n2.public_url(), TYP_ENCRYPTED, env).await;
    assert_eq!(status, 202, "{body}");

    // The wallet, authcrypting to the DID it knows and naming it in `to`, at the new address.
    a.mediator.http = n2.public_url();
    assert_eq!(a.message("x", json!({}))["to"], json!([before.did]));
    assert_eq!(a.status(None).await.unwrap(), 1);
    let got = a.delivery(10, None).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["body"]["content"], "still here");
}

/// By default an authcrypt in Veramo's form (A256GCM, no tag in the 1PU key derivation, no
/// `apv`) proves no sender: a co-recipient of a wallet's message can forge one
/// (`didcomm::v2::tests::a_co_recipient_forges_an_authcrypt_that_binds_no_sender`). It is
/// refused with the reason, and acts on nothing; the operator may accept it.
#[actix_rt::test]
async fn veramo_dialect_proves_no_sender_unless_the_operator_accepts_it() {
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.veramo_dialect = true;
    let req = a.message(
        "https://didcomm.org/coordinate-mediation/3.0/mediate-request",
        json!({}),
    );
    let (code, body) = post_raw(&a.mediator.http, TYP_ENCRYPTED, a.pack(&req).unwrap()).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("mediator.v2_legacy_authcrypt"), "{body}");
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    assert_eq!(conns["connections"].as_array().unwrap().len(), 0, "{conns}");
    // The spec's form from the same wallet is granted.
    a.veramo_dialect = false;
    a.mediate("3.0").await.unwrap();

    let (n, _d) = node_with(|c| c.mediator.v2_legacy_authcrypt = true);
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.veramo_dialect = true;
    a.mediate("3.0").await.unwrap();
}

#[actix_rt::test]
async fn veramo_dialect_mediation_2_0_and_the_recipient_filter() {
    let (n, _d) = node_with(|c| c.mediator.v2_legacy_authcrypt = true);
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m).unwrap();
    // Authcrypt as Veramo writes it (A256GCM, no tag in the 1PU KDF): the mediator answers in
    // the same dialect, or the client could not open the grant.
    a.veramo_dialect = true;
    a.mediate("2.0").await.unwrap();
    let d = a.last_reply_dialect().unwrap();
    assert!(!d.tag_in_kdf, "Veramo opens 1PU only without the tag in the KDF: {d:?}");
    let r1 = a.recipient_did.clone().unwrap();
    // A second recipient DID (registered as a DID URL: stored as its DID).
    let other = V2Agent::new(a.mediator.clone()).unwrap();
    let r2 = other.did.clone();
    let up = a
        .update("2.0", &[r1.clone(), format!("{r2}#key-1")], &[])
        .await
        .unwrap();
    assert!(up.iter().all(|u| u["result"] == "success"), "{up:?}");
    let kl = a
        .request(
            &a.message("https://didcomm.org/coordinate-mediation/2.0/keylist-query", json!({})),
            "keylist",
        )
        .await
        .unwrap();
    assert_eq!(kl["body"]["keys"].as_array().unwrap().len(), 2);
    // Adding a DID another connection holds is refused per key.
    let mut b = V2Agent::new(a.mediator.clone()).unwrap();
    b.mediate("3.0").await.unwrap();
    let up = b.update("3.0", std::slice::from_ref(&r1), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "client_error");

    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&r1, &s.basic(&r1, "for-r1")).await.unwrap(), 202);
    // r2 has no service: forward by hand through the mediator, next = r2 as a DID URL.
    let sender2 = V2Sender::new().unwrap();
    let fwd2 = forward_to(&sender2, &a.mediator, &format!("{r2}#key-1"), &other, "for-r2");
    assert_eq!(post_raw(&a.mediator.http, TYP_ENCRYPTED, fwd2).await.0, 202);
    assert_eq!(a.status(None).await.unwrap(), 2);
    assert_eq!(a.status(Some(&r1)).await.unwrap(), 1);
    assert_eq!(a.status(Some(&format!("{r2}#key-1"))).await.unwrap(), 1);
    let only_r1 = a.delivery(10, Some(&r1)).await.unwrap();
    assert_eq!(only_r1.len(), 1);
    assert_eq!(only_r1[0].1["body"]["content"], "for-r1");
    // The other one is still pending, and comes with no filter.
    assert!(a.delivery(10, Some(&r1)).await.unwrap().is_empty());
}

/// A forward anoncrypted to the mediator whose inner message is for `to_agent`.
fn forward_to(s: &V2Sender, m: &V2Mediator, next: &str, to_agent: &V2Agent, content: &str) -> Vec<u8> {
    use mailroom::didcomm::v2::jwe::{self, Alg, Dialect, Enc};
    let inner_doc = did::resolve(&to_agent.did).unwrap();
    let inner = jwe::pack(
        &serde_json::to_vec(&s.basic(&to_agent.did, content)).unwrap(),
        &inner_doc.agreement_keys(),
        None,
        Dialect {
            alg: Alg::EcdhEsA256Kw,
            enc: Enc::Xc20p,
            tag_in_kdf: false,
        },
    )
    .unwrap();
    forward_of(m, next, serde_json::from_slice(&inner).unwrap(), json!({}))
}

/// A forward anoncrypted to the mediator carrying `attachment` (as `data.json`), with the
/// fields of `extra` (e.g. `expires_time`) on the forward itself.
fn forward_of(m: &V2Mediator, next: &str, attachment: Value, extra: Value) -> Vec<u8> {
    forward_of_all(m, next, vec![attachment], extra)
}

/// [`forward_of`] with several attachments.
fn forward_of_all(m: &V2Mediator, next: &str, attachments: Vec<Value>, extra: Value) -> Vec<u8> {
    use mailroom::didcomm::v2::jwe::{self, Alg, Dialect, Enc};
    let attachments: Vec<Value> = attachments
        .into_iter()
        .enumerate()
        .map(|(i, a)| json!({ "id": format!("a{i}"), "data": { "json": a } }))
        .collect();
    let mut fwd = json!({
        "id": mailroom::didcomm::message::new_id(), "type": "https://didcomm.org/routing/2.0/forward", "to": [m.did],
        "body": { "next": next },
        "attachments": attachments,
    });
    for (k, v) in extra.as_object().unwrap() {
        fwd[k] = v.clone();
    }
    let mdoc = did::resolve(&m.did).unwrap();
    jwe::pack(
        &serde_json::to_vec(&fwd).unwrap(),
        &mdoc.agreement_keys(),
        None,
        Dialect {
            alg: Alg::EcdhEsA256Kw,
            enc: Enc::Xc20p,
            tag_in_kdf: false,
        },
    )
    .unwrap()
}

/// A v2 wallet that polls over its WebSocket (not in live mode) gets nothing raw: every v2
/// message binds the socket it came on (v2 answers as return route `all`), and the default
/// strategy's implicit pickup wrote the queue raw to it and removed it unacknowledged. Its
/// mail stays queued until `messages-received` names it.
#[actix_rt::test]
async fn a_v2_socket_not_in_live_mode_gets_nothing_raw() {
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    let r = a.onboard().await.unwrap();
    let mut sock = a.socket().await.unwrap();
    let pickup = "https://didcomm.org/messagepickup/3.0";
    a.send(&mut sock, &a.message(&format!("{pickup}/status-request"), json!({})))
        .await
        .unwrap();
    let st = a.recv(&mut sock, WAIT).await.unwrap();
    assert_eq!(kind(&st), "status", "{st}");

    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&r, &s.basic(&r, "polled")).await.unwrap(), 202);
    // Queued, not handed to the socket (a session here that takes nothing gives it back).
    eventually("the message pending, leased to nobody", || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        let q = &v["connections"][0]["queue"];
        (q["pending"] == 1 && q["in_flight"] == 0).then_some(())
    })
    .await;
    a.send(
        &mut sock,
        &a.message(&format!("{pickup}/delivery-request"), json!({"limit": 10})),
    )
    .await
    .unwrap();
    let d = a.recv(&mut sock, WAIT).await.unwrap();
    assert_eq!(kind(&d), "delivery", "the first frame is the delivery asked for: {d}");
    let got = a.open_delivery(&d).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["body"]["content"], "polled");
    a.send(
        &mut sock,
        &a.message(
            &format!("{pickup}/messages-received"),
            json!({"message_id_list": [got[0].0]}),
        ),
    )
    .await
    .unwrap();
    let st = a.recv(&mut sock, WAIT).await.unwrap();
    assert_eq!(st["body"]["message_count"], 0, "{st}");
}

/// A v2 wallet that turns live delivery off while its live window holds a handed message back
/// finds it in its queue at once (status counts it, a delivery-request takes it), not when the
/// hand-off's lease runs out; and once it acknowledged it there, turning live delivery on again
/// never writes it again: the next live delivery is the next message.
#[actix_rt::test]
async fn live_delivery_turned_off_gives_back_what_the_window_held() {
    let (n, _d) = node_with(|c| {
        // Only an acknowledgement opens the window, and no lease runs out during the test.
        c.delivery.live_ack_wait_ms = 60_000;
        c.delivery.lease_ms = 600_000;
    });
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    let r = a.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    let mut ws = a.live().await.unwrap();
    let handed = || async {
        metric(&n, r#"mailroom_handoffs_total{to="local"}"#)
            .await
            .unwrap_or(0.0)
    };
    // Acknowledged on the socket once (the window applies), then m1 is out, unacknowledged.
    assert_eq!(s.forward(&r, &s.basic(&r, "m0")).await.unwrap(), 202);
    assert_eq!(receive_live(&a, &mut ws, 1).await.0, vec!["m0".to_string()]);
    // The acknowledgement was handled (its status came back): the window applies from now on.
    let st = a.recv(&mut ws, WAIT).await.unwrap();
    assert_eq!(kind(&st), "status", "{st}");
    assert_eq!(s.forward(&r, &s.basic(&r, "m1")).await.unwrap(), 202);
    let d = a.recv(&mut ws, WAIT).await.unwrap();
    assert_eq!(kind(&d), "delivery", "{d}");
    // m2 is handed to the session and held back by the closed window.
    assert_eq!(s.forward(&r, &s.basic(&r, "m2")).await.unwrap(), 202);
    eventually("m2 handed to the session", || async {
        (handed().await >= 3.0).then_some(())
    })
    .await;
    let mut off = a.message(
        "https://didcomm.org/messagepickup/3.0/live-delivery-change",
        json!({"live_delivery": false}),
    );
    off.as_object_mut().map(|o| o.remove("return_route"));
    a.send(&mut ws, &off).await.unwrap();
    let mut st = a.recv(&mut ws, WAIT).await.unwrap();
    while st["body"]["live_delivery"].is_null() {
        st = a.recv(&mut ws, WAIT).await.unwrap();
    }
    assert_eq!(st["body"]["live_delivery"], json!(false), "{st}");
    eventually("m2 back in the queue", || async {
        (a.status(None).await.unwrap() == 1).then_some(())
    })
    .await;
    let got = a.delivery(5, None).await.unwrap();
    let contents: Vec<&str> = got
        .iter()
        .map(|(_, m)| m["body"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, vec!["m2"]);
    let ids: Vec<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(a.ack(&ids).await.unwrap(), 0, "nothing left");
    // Live again: m2, acknowledged, is not written again; m3 is.
    let mut on = a.message(
        "https://didcomm.org/messagepickup/3.0/live-delivery-change",
        json!({"live_delivery": true}),
    );
    on.as_object_mut().map(|o| o.remove("return_route"));
    a.send(&mut ws, &on).await.unwrap();
    assert_eq!(s.forward(&r, &s.basic(&r, "m3")).await.unwrap(), 202);
    loop {
        let d = a.recv(&mut ws, WAIT).await.unwrap();
        if kind(&d) != "delivery" {
            continue;
        }
        let got: Vec<String> = a
            .open_delivery(&d)
            .unwrap()
            .iter()
            .map(|(_, m)| m["body"]["content"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, vec!["m3".to_string()], "an acknowledged message written again");
        break;
    }
}

/// Live delivery asked for over HTTP is refused with pickup 3.0's own problem code.
#[actix_rt::test]
async fn live_delivery_over_http_is_refused_with_pickup_3_0_s_code() {
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.onboard().await.unwrap();
    let msg = a.message(
        "https://didcomm.org/messagepickup/3.0/live-delivery-change",
        json!({"live_delivery": true}),
    );
    let (code, reply) = a.post(&msg).await.unwrap();
    assert_eq!(code, 400);
    let reply = reply.expect("a problem report");
    assert_eq!(kind(&reply), "problem-report", "{reply}");
    assert_eq!(reply["body"]["code"], "e.m.live-mode-not-supported", "{reply}");
}

/// A message encrypted for others beside the mediator opens here as its sender's, whoever
/// sends it on: one of the others could replay it to the mediator and act as the sender. So
/// it must name the mediator in `to`; packed for the mediator alone, it need not.
#[actix_rt::test]
async fn a_message_encrypted_for_others_too_must_name_the_mediator() {
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.onboard().await.unwrap();
    let b = V2Agent::new(a.mediator.clone()).unwrap();
    let others = did::resolve(&b.did).unwrap().agreement_keys();
    let mut msg = a.message(
        "https://didcomm.org/coordinate-mediation/3.0/recipient-query",
        json!({}),
    );
    msg.as_object_mut().unwrap().remove("to");
    let (code, _) = post_raw(&a.mediator.http, TYP_ENCRYPTED, a.pack_also(&msg, &others).unwrap()).await;
    assert_eq!(code, 400, "a message for others too, without `to`, is refused");
    // Each try its own message (a copy of one would be refused as a replay).
    msg["id"] = json!(mailroom::didcomm::message::new_id());
    let (code, _) = post_raw(&a.mediator.http, TYP_ENCRYPTED, a.pack(&msg).unwrap()).await;
    assert_eq!(code, 200, "for the mediator alone it is answered");
    msg["id"] = json!(mailroom::didcomm::message::new_id());
    msg["to"] = json!([a.mediator.did]);
    let (code, _) = post_raw(&a.mediator.http, TYP_ENCRYPTED, a.pack_also(&msg, &others).unwrap()).await;
    assert_eq!(code, 200, "naming the mediator, it is answered");
}

/// A forward a wallet encrypted for another party beside the mediator, without `to`, acts as
/// nobody's when that party sends it on: the forward is queued, but the socket it came on is
/// not bound to the wallet's connection (it would hold the wallet's session, delivering
/// nothing, and keep the wallet from being pushed).
#[actix_rt::test]
async fn a_forward_sent_on_by_another_binds_no_socket_to_its_writer() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut w = V2Agent::new(m.clone()).unwrap();
    let r = w.onboard().await.unwrap();
    let p = V2Agent::new(m.clone()).unwrap();
    let others = did::resolve(&p.did).unwrap().agreement_keys();
    let s = V2Sender::new().unwrap();
    let fwd = json!({
        "id": mailroom::didcomm::message::new_id(),
        "type": "https://didcomm.org/routing/2.0/forward",
        "body": { "next": r },
        "attachments": [{ "id": "a1", "data": { "json": encrypted_for(&s, &w, "sent on") } }],
    });
    let env = w.pack_also(&fwd, &others).unwrap();
    let mut sock = p.socket().await.unwrap();
    sock.ws.send_envelope(env, false).await.unwrap();
    eventually("the forward queued", || async {
        (w.status(None).await.unwrap() == 1).then_some(())
    })
    .await;
    let sessions = get_json(&format!("{}/sessions", n.admin_url())).await;
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 0, "{sessions}");
}

#[actix_rt::test]
async fn live_delivery_over_websocket_beside_a_v1_wallet() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m).unwrap();
    let r = a.onboard().await.unwrap();
    let mut sock = a.live().await.unwrap();

    // A v1 wallet live on the same node at the same time.
    let inv = invitation(&n).await;
    let (v1, k1) = Agent::onboard(&inv).await.unwrap();
    let mut v1ws = common::cluster::live_socket(&v1, &n).await;

    let s = V2Sender::new().unwrap();
    for i in 0..5 {
        assert_eq!(s.forward(&r, &s.basic(&r, &format!("live-{i}"))).await.unwrap(), 202);
    }
    let routing = v1.grant.clone().unwrap().routing_keys;
    let v1s = mailroom::client::Sender::new();
    assert_eq!(
        v1s.forward(&n.public_url(), &basic_message("v1-live"), &k1.verkey(), &routing)
            .await
            .unwrap(),
        202
    );
    let (got, dups) = receive_live(&a, &mut sock, 5).await;
    assert_eq!(dups, 0, "{got:?}");
    let d = ws_next_message(&v1, &mut v1ws).await;
    assert_eq!(type_name(&d), "delivery");
    assert_eq!(contents(&v1, &d), vec!["v1-live".to_string()]);
    let ids: Vec<String> = v1.open_delivery(&d).unwrap().into_iter().map(|(i, _)| i).collect();
    v1.request(&pickup("messages-received", json!({ "message_id_list": ids })))
        .await
        .unwrap();
    eventually("v2 queue drained", || async {
        (queue_depth(&n).await == 0).then_some(())
    })
    .await;
    // Deliveries are counted by DIDComm version.
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert!(
        text.contains("mailroom_delivered_total{path=\"live\",didcomm=\"v2\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("mailroom_delivered_total{path=\"live\",didcomm=\"v1\"} 1"),
        "{text}"
    );
}

#[actix_rt::test]
async fn refusals_are_4xx_with_a_problem_report_and_the_node_serves_on() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let a = V2Agent::new(m.clone()).unwrap();

    // Pickup without mediation: 4xx and a report-problem 2.0 the wallet opens.
    let (st, rep) = a
        .post(&a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({})))
        .await
        .unwrap();
    assert_eq!(st, 403);
    let rep = rep.unwrap();
    assert_eq!(rep["type"], "https://didcomm.org/report-problem/2.0/problem-report");
    assert_eq!(rep["body"]["code"], "e.p.req.not-authorized");

    // An unknown protocol.
    let (st, rep) = a
        .post(&a.message("https://didcomm.org/nope/9.0/what", json!({})))
        .await
        .unwrap();
    assert_eq!(st, 400);
    assert_eq!(rep.unwrap()["body"]["code"], "e.p.msg.unsupported");

    // `from` that is not the authcrypting DID.
    let mut forged = a.message("https://didcomm.org/trust-ping/2.0/ping", json!({}));
    forged["from"] = json!(V2Agent::new(m.clone()).unwrap().did);
    assert_eq!(a.post(&forged).await.map(|r| r.0).unwrap(), 403);

    // Forward to nobody; expired forward.
    let s = V2Sender::new().unwrap();
    let other = V2Agent::new(m.clone()).unwrap();
    let env = forward_to(&s, &m, &other.did, &other, "x");
    assert_eq!(post_raw(&m.http, TYP_ENCRYPTED, env).await.0, 404);

    // Garbage, a tampered envelope, an unknown kid, an oversized body: 4xx, never 5xx.
    assert_eq!(
        post_raw(&m.http, TYP_ENCRYPTED, b"{\"recipients\":[]}".to_vec())
            .await
            .0,
        400
    );
    let ping = a
        .pack(&a.message("https://didcomm.org/trust-ping/2.0/ping", json!({})))
        .unwrap();
    let mut v: Value = serde_json::from_slice(&ping).unwrap();
    let t = v["tag"].as_str().unwrap().to_string();
    v["tag"] = json!(format!("{}{}", if t.starts_with('A') { "B" } else { "A" }, &t[1..]));
    assert_eq!(
        post_raw(&m.http, TYP_ENCRYPTED, serde_json::to_vec(&v).unwrap())
            .await
            .0,
        400
    );
    let stranger = V2Agent::new(V2Mediator {
        did: did::create_peer2(
            &[mailroom::didcomm::v2::keys::generate(askar_crypto::alg::KeyAlg::X25519).unwrap()],
            &[],
            &[],
        )
        .unwrap(),
        http: m.http.clone(),
        ws: None,
    })
    .unwrap();
    let wrong = stranger
        .pack(&stranger.message("https://didcomm.org/trust-ping/2.0/ping", json!({})))
        .unwrap();
    let (st, body) = post_raw(&m.http, TYP_ENCRYPTED, wrong).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("kid"), "{body}");

    // Still serving: a trust ping is answered.
    let pong = a
        .request(
            &a.message(
                "https://didcomm.org/trust-ping/2.0/ping",
                json!({"response_requested": true}),
            ),
            "ping-response",
        )
        .await
        .unwrap();
    assert!(pong["thid"].as_str().is_some());
    let disc = a
        .request(
            &a.message(
                "https://didcomm.org/discover-features/2.0/queries",
                json!({"queries": [{"feature-type": "protocol", "match": "https://didcomm.org/messagepickup/*"}]}),
            ),
            "disclose",
        )
        .await
        .unwrap();
    assert_eq!(disc["body"]["disclosures"].as_array().unwrap().len(), 2);
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    assert!(
        text.contains("mailroom_rejected_total{reason=\"no-connection\",didcomm=\"v2\"} 1"),
        "{text}"
    );
}

/// A `type` and a `thid` of 100 KB are answered by their first 200 characters, as v1 answers
/// an `@type`: the refusal (and its log line) does not carry back what the sender wrote there.
#[actix_rt::test]
async fn a_refusal_shows_only_the_start_of_a_long_type_or_thread() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let a = V2Agent::new(m.clone()).unwrap();
    let long_type = format!("https://didcomm.org/{}/1.0/what", "t".repeat(100 * 1024));
    let mut msg = a.message(&long_type, json!({}));
    msg["thid"] = json!("h".repeat(100 * 1024));
    let (st, rep) = a.post(&msg).await.unwrap();
    assert_eq!(st, 400);
    let rep = rep.unwrap();
    assert_eq!(rep["body"]["code"], "e.p.msg.unsupported");
    let comment = rep["body"]["comment"].as_str().unwrap();
    assert!(comment.len() <= 300, "a comment of {} bytes", comment.len());
    assert!(
        comment.contains("unsupported message type \"https://didcomm.org/ttt"),
        "{comment:.80}"
    );
    let pthid = rep["pthid"].as_str().unwrap();
    assert_eq!(pthid, "h".repeat(200));
}

#[actix_rt::test]
async fn isolation_a_wallet_picks_up_only_its_own_queue() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let ra = a.onboard().await.unwrap();
    let mut b = V2Agent::new(m.clone()).unwrap();
    b.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&ra, &s.basic(&ra, "for-a")).await.unwrap(), 202);
    assert_eq!(b.status(None).await.unwrap(), 0);
    assert!(b.delivery(10, Some(&ra)).await.unwrap().is_empty());
    // B acknowledging A's message id does nothing to A's queue.
    let got = a.delivery(10, None).await.unwrap();
    assert_eq!(b.ack(&[got[0].0.clone()]).await.unwrap(), 0);
    assert_eq!(queue_depth(&n).await, 1);
    assert_eq!(a.ack(&[got[0].0.clone()]).await.unwrap(), 0);
    assert_eq!(queue_depth(&n).await, 0);
}

/// #1625 on v2: the wallet's socket is on n1; forwards POSTed to n2 are delivered live
/// through n1, each once.
#[actix_rt::test]
async fn cluster_socket_on_n1_forward_to_n2_delivered_live() {
    let (_db, nodes, [on_n1, _]) = v2_pair().await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let mut a = V2Agent::new(on_n1).unwrap();
    let r = a.onboard().await.unwrap();
    let mut sock = a.live().await.unwrap();
    let conn = a_connection_id(n1).await;
    wait_owner(&[n2], &conn, "n1").await;
    let s = V2Sender::new().unwrap();
    for i in 0..10 {
        assert_eq!(
            s.forward_via(&n2.public_url(), &r, &s.basic(&r, &format!("via-n2-{i}")))
                .await
                .unwrap(),
            202
        );
    }
    let (got, dups) = receive_live(&a, &mut sock, 10).await;
    assert_eq!(dups, 0, "{got:?}");
    eventually("queue drained", || async { (queue_depth(n1).await == 0).then_some(()) }).await;
}

/// A DID rotated away (`from_prior`) takes its sockets with it: a socket bound by the old DID
/// before the rotation (whoever holds the old keys) is closed, on the node the rotation came
/// to and on the others, and gets none of the mail that follows; the socket that carried the
/// rotation keeps delivering. Before, such a socket went on getting the wallet's mail, packed
/// for the old DID, until it closed by itself.
#[actix_rt::test]
async fn sockets_bound_by_a_did_that_rotated_away_are_closed_on_every_node() {
    let (_db, nodes, [on_n1, on_n2]) = v2_pair().await;
    let n1 = nodes[0].public_url();
    let s = V2Sender::new().unwrap();
    // A's own socket and a copy of its old DID's (whoever holds the old keys) are both on n1,
    // bound by the old DID; A's rotation comes on its own socket, which keeps delivering.
    let mut a = V2Agent::new(on_n1.clone()).unwrap();
    let ra = a.onboard().await.unwrap();
    let mut old = a.live().await.unwrap();
    let mut own = a.live().await.unwrap();
    assert_eq!(s.forward_via(&n1, &ra, &s.basic(&ra, "a-before")).await.unwrap(), 202);
    let mut got = Vec::new();
    while got.is_empty() {
        for sock in [&mut old, &mut own] {
            if let Ok(d) = a.recv(sock, std::time::Duration::from_millis(100)).await {
                if kind(&d) == "delivery" {
                    got.extend(a.open_delivery(&d).unwrap().into_iter().map(|(id, _)| id));
                }
            }
        }
    }
    a.rotate().unwrap();
    let ack = a.message(
        "https://didcomm.org/messagepickup/3.0/messages-received",
        json!({ "message_id_list": got }),
    );
    a.send(&mut own, &ack).await.unwrap();
    assert_closed_as_rotated(&a, &mut old, "n1, the node of the rotation").await;
    assert_eq!(s.forward_via(&n1, &ra, &s.basic(&ra, "a-after")).await.unwrap(), 202);
    assert_eq!(receive_live(&a, &mut own, 1).await.0, ["a-after"]);

    // B's old socket is on n2; B rotates over HTTP on n1.
    let mut b = V2Agent::new(on_n2.clone()).unwrap();
    let rb = b.onboard().await.unwrap();
    let mut old = b.live().await.unwrap();
    let conn_b = connection_of(&nodes[0], &b.did).await;
    wait_owner(&[&nodes[0]], &conn_b, "n2").await;
    b.rotate().unwrap();
    b.mediator = on_n1.clone();
    assert_eq!(b.status(None).await.unwrap(), 0);
    assert_closed_as_rotated(&b, &mut old, "n2, another node").await;
    // Until n1 hears that n2's socket closed, a forward to n1 goes to n2 (and comes back).
    eventually("n1 names no owner of B once its old socket closed", || async {
        owner_seen_by(&nodes[0], &conn_b).await.is_none().then_some(())
    })
    .await;
    assert_eq!(s.forward_via(&n1, &rb, &s.basic(&rb, "b-after")).await.unwrap(), 202);
    let got = b.delivery(10, None).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
}

/// A socket bound by a DID that rotated away and that missed the rotation's close (its node
/// missed the frame, or it bound with a record read before the rotation committed) closes at
/// its drain's next read of the connection: it does not go on taking the wallet's mail.
#[actix_rt::test]
async fn a_socket_that_missed_its_rotations_close_closes_at_its_next_read() {
    // Queue-only: forwards wake the socket's drain, which reads the connection again (a
    // message handed to a live session is written without that read).
    let (_db, store, nodes, [on_n1, _]) = v2_pair_with(|c| {
        c.delivery.lease_ms = 2_000;
        c.delivery.strategy = Strategy::QueueOnly;
    })
    .await;
    let n1 = nodes[0].public_url();
    let s = V2Sender::new().unwrap();
    let mut a = V2Agent::new(on_n1).unwrap();
    let ra = a.onboard().await.unwrap();
    let mut old = a.live().await.unwrap();
    let conn = a_connection_id(&nodes[0]).await;
    // The rotation as the store has it, and no close sent (as if its frame were lost).
    let old_did = a.did.clone();
    let new_did = a.rotate().unwrap();
    let patch = mailroom::store::ConnectionPatch {
        rotate_did: Some((old_did, new_did)),
        updated_at_ms: mailroom::protocols::now_ms(),
        ..Default::default()
    };
    assert!(store.update_connection(&conn, &patch).await.unwrap().is_some());
    // Each forward wakes the socket; its drain half a lease after the last read reads again.
    let deadline = std::time::Instant::now() + WAIT;
    let closed = loop {
        assert!(std::time::Instant::now() < deadline, "the socket stayed open");
        assert_eq!(s.forward_via(&n1, &ra, &s.basic(&ra, "m")).await.unwrap(), 202);
        match a.recv(&mut old, std::time::Duration::from_millis(300)).await {
            Err(e) if format!("{e:#}").contains("socket closed") => break format!("{e:#}"),
            _ => continue,
        }
    };
    assert!(closed.contains("rotated"), "{closed}");
}

/// The node's store, except that once armed, the next read of the watched connection
/// (`get_connection`) waits until the test opens the gate. Reads of it are counted.
struct GatedReads {
    inner: Arc<dyn Store>,
    /// The connection watched, once it exists.
    conn: OnceLock<String>,
    armed: AtomicBool,
    /// Told as the armed read begins waiting.
    held: Notify,
    open: Notify,
    /// Reads of the watched connection begun so far.
    reads: watch::Sender<usize>,
}

#[async_trait::async_trait]
impl Store for GatedReads {
    async fn get_connection(&self, id: &str) -> StoreResult<Option<Connection>> {
        if self.conn.get().is_some_and(|c| c == id) {
            self.reads.send_modify(|n| *n += 1);
            if self.armed.swap(false, Ordering::SeqCst) {
                self.held.notify_one();
                self.open.notified().await;
            }
        }
        self.inner.get_connection(id).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased,
        release, release_owner, release_owners_under, reclaim_expired_leases,
        queue_stats, total_queued, connections_with_pending, pending_among, prune_dedup,
        dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due, push_done,
        first_sight, forget_sight, prune_sights,
        delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
    );
}

/// A drain of the socket that carries a rotation, begun before the rotation and reading the
/// connection after it, finds the new DID where the socket was bound by the old one: by then
/// that socket is bound by the new DID (the rotation's handler rebound it), so it stays open
/// and keeps delivering. Before, that drain closed it as bound by a DID rotated away.
#[actix_rt::test]
async fn a_drain_begun_before_its_sockets_rotation_leaves_that_socket_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 30_000;
    let gated = Arc::new(GatedReads {
        inner: mailroom::store::open_sled(&dir.path().join("data")).await.unwrap(),
        conn: OnceLock::new(),
        armed: AtomicBool::new(false),
        held: Notify::new(),
        open: Notify::new(),
        reads: watch::channel(0).0,
    });
    let n = start_on(&cfg, gated.clone());
    let m = v2_mediator(&n).await;
    let s = V2Sender::new().unwrap();
    let mut a = V2Agent::new(m).unwrap();
    let ra = a.onboard().await.unwrap();
    let conn = a_connection_id(&n).await;
    gated.conn.set(conn.clone()).unwrap();
    let mut reads = gated.reads.subscribe();
    // The first drain after the socket binds reads the connection: it waits there, begun
    // while the socket is bound by the old DID.
    gated.armed.store(true, Ordering::SeqCst);
    let mut own = a.live().await.unwrap();
    tokio::time::timeout(WAIT, gated.held.notified())
        .await
        .expect("the drain reads the connection");
    let before = *reads.borrow();
    // The rotation comes on that socket; its reply comes once the socket is rebound.
    let new_did = a.rotate().unwrap();
    let req = a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({}));
    a.send(&mut own, &req).await.unwrap();
    let st = a.recv(&mut own, WAIT).await.unwrap();
    assert_eq!(kind(&st), "status", "{st}");
    let stored = gated.inner.get_connection(&conn).await.unwrap().unwrap();
    assert_eq!(stored.their_did.as_deref(), Some(new_did.as_str()));
    // The drain reads the new DID. The socket's next drain reading the connection again
    // shows this one ended without closing it.
    gated.open.notify_one();
    tokio::select! {
        r = reads.wait_for(|n| *n > before) => { r.unwrap(); }
        r = a.recv(&mut own, WAIT) => panic!("the socket that carried the rotation: {r:?}"),
    }
    assert_eq!(
        s.forward_via(&n.public_url(), &ra, &s.basic(&ra, "after"))
            .await
            .unwrap(),
        202
    );
    assert_eq!(receive_live(&a, &mut own, 1).await.0, ["after"]);
}

/// `old` closes (after what it was sent before) with the reason a rotation gives.
async fn assert_closed_as_rotated(a: &V2Agent, old: &mut V2Socket, name: &str) {
    let closed = loop {
        match a.recv(old, WAIT).await {
            Ok(_) => continue,
            Err(e) => break format!("{e:#}"),
        }
    };
    assert!(
        closed.contains("socket closed") && closed.contains("rotated"),
        "{name}: {closed}"
    );
}

/// The id of the connection whose wallet talks as `did`, as `n` lists them.
async fn connection_of(n: &RunningNode, did: &str) -> String {
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    let list = v["connections"].as_array().unwrap();
    let c = list.iter().find(|c| c["their_did"] == did);
    c.unwrap_or_else(|| panic!("no connection of {did}: {v}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Two nodes of one cluster on a fresh PostgreSQL database, linked, with the v2 mediator as
/// seen through each.
async fn v2_pair() -> (FreshDb, Vec<RunningNode>, [V2Mediator; 2]) {
    let (db, _, nodes, on) = v2_pair_with(|_| {}).await;
    (db, nodes, on)
}

/// [`v2_pair`] of a config `edit` changed, with the store the nodes share.
async fn v2_pair_with(
    edit: impl FnOnce(&mut mailroom::config::Config),
) -> (
    FreshDb,
    std::sync::Arc<dyn mailroom::store::Store>,
    Vec<RunningNode>,
    [V2Mediator; 2],
) {
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 600_000);
    edit(&mut cfg);
    // The load balancer's URL: what the mediator's DID advertises on every node.
    cfg.cluster.public_url = Some("http://127.0.0.1:9".into());
    let store = open_shared_store(&cfg).await;
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        nodes.push(start_node(&cfg, &format!("n{}", i + 1), l, &store, None));
    }
    let (n1, n2) = (&nodes[0], &nodes[1]);
    for (x, y) in [(n1, n2), (n2, n1)] {
        eventually("cluster link up", || async {
            peer_connected(x, &y.node_id).await.then_some(())
        })
        .await;
    }
    let m1 = v2_mediator(n1).await;
    let m2 = v2_mediator(n2).await;
    assert_eq!(m1.did, m2.did, "every node has the same v2 DID");
    let on_n1 = V2Mediator {
        did: m1.did.clone(),
        http: n1.public_url(),
        ws: Some(ws_url(n1)),
    };
    let on_n2 = V2Mediator {
        did: m2.did.clone(),
        http: n2.public_url(),
        ws: Some(ws_url(n2)),
    };
    (db, store, nodes, [on_n1, on_n2])
}

/// The basic message `content` from `s` for `to`, anoncrypted to `to`'s keys (what a
/// forward's attachment carries: opaque to the mediator).
fn encrypted_for(s: &V2Sender, to: &V2Agent, content: &str) -> Value {
    use mailroom::didcomm::v2::jwe::{self, Alg, Dialect, Enc};
    let packed = jwe::pack(
        &serde_json::to_vec(&s.basic(&to.did, content)).unwrap(),
        &did::resolve(&to.did).unwrap().agreement_keys(),
        None,
        Dialect {
            alg: Alg::EcdhEsA256Kw,
            enc: Enc::Xc20p,
            tag_in_kdf: false,
        },
    )
    .unwrap();
    serde_json::from_slice(&packed).unwrap()
}

/// `expires_time` (issue 8): a forward's own expiry covers its encrypted attachment; a
/// plaintext attachment's expiry covers itself. Queued before it, such a message is pending;
/// once it passed it is never delivered, the sweep drops it and counts it.
#[actix_rt::test]
async fn messages_past_their_expires_time_are_never_delivered() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    // Seconds ahead: room for the packs and posts below on a loaded box, before it passes.
    let soon = mailroom::protocols::now_ms() / 1000 + 8;
    // Encrypted inner message: the mediator sees only the forward's expires_time.
    let f1 = forward_of(
        &m,
        &r,
        encrypted_for(&s, &a, "expiring"),
        json!({ "expires_time": soon }),
    );
    assert_eq!(post_raw(&m.http, TYP_ENCRYPTED, f1).await.0, 202);
    // A plaintext attachment with its own expiry, in a forward without one.
    let mut plain = s.basic(&a.did, "plain-expiring");
    plain["expires_time"] = json!(soon);
    assert_eq!(
        post_raw(&m.http, TYP_ENCRYPTED, forward_of(&m, &r, plain, json!({})))
            .await
            .0,
        202
    );
    // No expiry, and an expiry well ahead: both delivered.
    assert_eq!(s.forward(&r, &s.basic(&r, "lasting")).await.unwrap(), 202);
    let f4 = forward_of(
        &m,
        &r,
        encrypted_for(&s, &a, "later"),
        json!({ "expires_time": soon + 3600 }),
    );
    assert_eq!(post_raw(&m.http, TYP_ENCRYPTED, f4).await.0, 202);
    assert_eq!(a.status(None).await.unwrap(), 4, "all pending before the expiry");

    eventually("the expiry passes", || async {
        (mailroom::protocols::now_ms() >= soon * 1000).then_some(())
    })
    .await;
    let got = a.delivery(10, None).await.unwrap();
    let mut contents: Vec<String> = got
        .iter()
        .map(|(_, m)| m["body"]["content"].as_str().unwrap_or_default().to_string())
        .collect();
    contents.sort();
    assert_eq!(contents, ["lasting", "later"]);
    eventually("the sweep drops and counts both", || async {
        let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
        text.contains("mailroom_expired_by_sender_total 2").then_some(())
    })
    .await;
    assert_eq!(queue_depth(&n).await, 2);
}

/// `from_prior` (issue 8): a wallet that rotates its DID keeps its connection (queue, keylist,
/// routing) under the new DID. A `from_prior` replayed by another connection, one not signed by
/// its `iss`, or one naming another connection's DID is refused with a problem report and
/// changes nothing.
/// A DID another wallet registered first is taken by the wallet that proves it controls it:
/// the one that rotates to it (`from_prior`), or that registers its own DID. First come first
/// served let a contact told of A's rotation register A's new DID first: A's rotation was
/// refused, and mail for A's new DID queued for the contact, who could acknowledge it away.
#[actix_rt::test]
async fn a_did_registered_by_another_wallet_is_taken_by_the_one_that_proves_it() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    a.onboard().await.unwrap();
    let old = a.did.clone();
    let up = a.update("3.0", std::slice::from_ref(&old), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let mut b = V2Agent::new(m.clone()).unwrap();
    b.onboard().await.unwrap();

    // A rotates and tells its contacts; B registers A's new DID before A's next message.
    let new = a.rotate().unwrap();
    let up = b.update("3.0", std::slice::from_ref(&new), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    // A's next message rotates it all the same.
    assert_eq!(a.status(None).await.unwrap(), 0);
    assert!(recipient_dids(&a).await.contains(&new), "the new DID is A's");
    assert!(!recipient_dids(&b).await.contains(&new), "and no longer B's");
    let s = V2Sender::new().unwrap();
    let to_new = forward_to(&s, &m, &new, &a, "to-new");
    assert_eq!(post_raw(&m.http, TYP_ENCRYPTED, to_new).await.0, 202);
    assert_eq!(a.status(None).await.unwrap(), 1);
    assert_eq!(b.status(None).await.unwrap(), 0);

    // B registers C's DID before C has a connection; C registering its own DID takes it.
    let mut c = V2Agent::new(m.clone()).unwrap();
    let up = b.update("3.0", std::slice::from_ref(&c.did), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    c.onboard().await.unwrap();
    let up = c.update("3.0", std::slice::from_ref(&c.did), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    assert!(!recipient_dids(&b).await.contains(&c.did));
    // A DID B does not control it cannot take back: A's is A's.
    let up = b.update("3.0", std::slice::from_ref(&new), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "client_error", "{up:?}");
}

#[actix_rt::test]
async fn from_prior_rotation_moves_the_connection_and_refuses_forgeries() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let old = a.did.clone();
    // The wallet's own DID is in its keylist too (as Veramo registers it).
    let up = a.update("3.0", std::slice::from_ref(&old), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&r, &s.basic(&r, "before")).await.unwrap(), 202);
    let mut b = V2Agent::new(m.clone()).unwrap();
    b.onboard().await.unwrap();
    let status_request = |x: &V2Agent| x.message("https://didcomm.org/messagepickup/3.0/status-request", json!({}));
    let refused = |(st, rep): (u16, Option<Value>)| {
        assert_eq!(st, 403);
        let rep = rep.expect("a problem report");
        assert_eq!(rep["type"], "https://didcomm.org/report-problem/2.0/problem-report");
        assert_eq!(rep["body"]["code"], "e.p.req.not-authorized", "{rep}");
        rep["body"]["comment"].as_str().unwrap_or_default().to_string()
    };

    // A rotates; before it says so, B (connected) and X (a stranger) replay A's valid
    // from_prior from their own DIDs.
    let new = a.rotate().unwrap();
    let mut x = V2Agent::new(m.clone()).unwrap();
    x.from_prior = a.from_prior.clone();
    let why = refused(x.post(&status_request(&x)).await.unwrap());
    assert!(why.contains("sub"), "{why}");
    b.from_prior = a.from_prior.clone();
    let why = refused(b.post(&status_request(&b)).await.unwrap());
    assert!(why.contains("sub"), "{why}");
    b.from_prior = None;
    assert_eq!(b.status(None).await.unwrap(), 0, "B is unchanged");

    // The rotation itself: the queue is still there, under the new DID.
    assert_eq!(a.status(None).await.unwrap(), 1);
    let mut dids = recipient_dids(&a).await;
    dids.sort();
    let mut want = vec![r.clone(), new.clone()];
    want.sort();
    assert_eq!(dids, want, "the keylist entry of the old DID moved to the new one");
    // Routing follows: the old DID is nobody's any more, the new one reaches A.
    let other = V2Sender::new().unwrap();
    assert_eq!(
        post_raw(&m.http, TYP_ENCRYPTED, forward_to(&other, &m, &old, &a, "to-old"))
            .await
            .0,
        404
    );
    assert_eq!(
        post_raw(&m.http, TYP_ENCRYPTED, forward_to(&other, &m, &new, &a, "after"))
            .await
            .0,
        202
    );

    // Not signed by the old DID: X signs a rotation of A's DID to itself, naming A's key, then
    // its own key.
    for kid in [format!("{new}#key-2"), format!("{}#key-2", x.did)] {
        x.from_prior = Some(x.sign_from_prior(&new, &x.did, &kid).unwrap());
        let why = refused(x.post(&status_request(&x)).await.unwrap());
        assert!(why.contains("from_prior"), "{why}");
    }
    x.from_prior = None;
    assert_eq!(x.post(&status_request(&x)).await.unwrap().0, 403, "X got no connection");

    // The old DID of another connection: B (connected) claims A's DID rotated to B's.
    b.from_prior = Some(b.sign_from_prior(&new, &b.did, &format!("{}#key-2", b.did)).unwrap());
    refused(b.post(&status_request(&b)).await.unwrap());
    b.from_prior = None;
    assert_eq!(b.status(None).await.unwrap(), 0);
    // Even a rotation the old DID did sign never merges two connections: A's DID "rotated"
    // to B's, sent by B.
    b.from_prior = Some(a.sign_from_prior(&new, &b.did, &format!("{new}#key-2")).unwrap());
    let why = refused(b.post(&status_request(&b)).await.unwrap());
    assert!(why.contains("already has a connection"), "{why}");
    b.from_prior = None;
    assert_eq!(b.status(None).await.unwrap(), 0);

    // A is unchanged by all of it, still sends from_prior (harmless once rotated), and gets
    // both messages: the one queued before the rotation and the one after.
    let got = a.delivery(10, None).await.unwrap();
    let mut contents: Vec<String> = got
        .iter()
        .map(|(_, m)| m["body"]["content"].as_str().unwrap_or_default().to_string())
        .collect();
    contents.sort();
    assert_eq!(contents, ["after", "before"]);
}

#[actix_rt::test]
async fn a_revoked_mediation_is_not_granted_again_by_a_v2_mediate_request() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m).unwrap();
    a.onboard().await.unwrap();
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    let id = v["connections"][0]["id"].as_str().unwrap().to_string();
    let mut res = awc::Client::default()
        .post(format!("{}/connections/{id}/mediation", n.admin_url()))
        .send_json(&json!({"state": "denied"}))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200, "{:?}", res.body().await);

    for version in ["2.0", "3.0"] {
        let (code, reply) = a
            .post(&a.message(
                &format!("https://didcomm.org/coordinate-mediation/{version}/mediate-request"),
                json!({}),
            ))
            .await
            .unwrap();
        let reply = reply.expect("a reply");
        assert_eq!(kind(&reply), "mediate-deny", "{version}: {code} {reply}");
    }
    let c = get_json(&format!("{}/connections/{id}", n.admin_url())).await;
    assert_eq!(c["mediation"], "denied", "{c}");
}

/// Routing 2.0 gets the refusal routing 1.0 gets: a connection whose mediation is revoked
/// while its DID is still registered (what another node sees between a revocation and the
/// removal of the keys, or after a removal that failed) takes no forward: 404, as for a DID
/// nobody registered, though this node's route cache still holds it, and nothing is queued.
#[actix_rt::test]
async fn a_denied_connection_whose_did_is_still_registered_gets_no_v2_forward() {
    use mailroom::store::{ConnectionPatch, MediationState};
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path(), Strategy::QueueOnly);
    let store = mailroom::store::open_sled(&dir.path().join("data")).await.unwrap();
    let n = start_on(&cfg, store.clone());
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    let r = a.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    assert_eq!(
        s.forward(&r, &s.basic(&r, "before")).await.unwrap(),
        202,
        "and the route is cached"
    );
    let id = a_connection_id(&n).await;
    let deny = ConnectionPatch {
        mediation: Some(MediationState::Denied),
        updated_at_ms: 1,
        ..ConnectionPatch::default()
    };
    store.update_connection(&id, &deny).await.unwrap().unwrap();
    assert!(
        !store.keys_of(&id).await.unwrap().is_empty(),
        "the DID is still registered"
    );
    for text in ["after", "after again"] {
        assert_eq!(s.forward(&r, &s.basic(&r, text)).await.unwrap(), 404, "{text}");
    }
    assert_eq!(queue_depth(&n).await, 1);
}

#[actix_rt::test]
async fn a_key_registered_in_one_did_key_form_cannot_be_claimed_in_another() {
    use mailroom::didcomm::v2::jwe::{self, Alg, Dialect, Enc};
    use mailroom::didcomm::v2::keys;
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut victim = V2Agent::new(m.clone()).unwrap();
    victim.onboard().await.unwrap();
    let mut attacker = V2Agent::new(m.clone()).unwrap();
    attacker.onboard().await.unwrap();

    // The victim registers an X25519 did:key; the attacker computes an Ed25519 did:key that
    // converts to it (public: no secret needed) and tries to register that.
    let x = keys::generate(askar_crypto::alg::KeyAlg::X25519).unwrap();
    let dx = format!("did:key:{}", keys::to_multibase(&x).unwrap());
    let up = victim.update("3.0", std::slice::from_ref(&dx), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let equivalents = keys::did_key_equivalents(&dx);
    assert_eq!(equivalents.len(), 2);
    for de in &equivalents {
        let up = attacker.update("3.0", std::slice::from_ref(de), &[]).await.unwrap();
        assert_eq!(up[0]["result"], "client_error", "{de}: {up:?}");
    }

    // A forward to an Ed25519 form reaches the victim, not the attacker.
    let fwd = json!({
        "id": "fwd-1",
        "type": "https://didcomm.org/routing/2.0/forward",
        "to": [m.did],
        "body": { "next": equivalents[0] },
        "attachments": [{ "id": "a1", "media_type": TYP_ENCRYPTED, "data": { "json": { "ciphertext": "opaque" } } }],
    });
    let dialect = Dialect {
        alg: Alg::EcdhEsA256Kw,
        enc: Enc::A256CbcHs512,
        tag_in_kdf: false,
    };
    let env = jwe::pack(&serde_json::to_vec(&fwd).unwrap(), &m.keys().unwrap(), None, dialect).unwrap();
    let (code, body) = post_raw(&m.http, TYP_ENCRYPTED, env).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(victim.status(None).await.unwrap(), 1);
    assert_eq!(attacker.status(None).await.unwrap(), 0);

    // The other way round: registered as Ed25519, forwarded to its X25519 form.
    let e = keys::generate(askar_crypto::alg::KeyAlg::Ed25519).unwrap();
    let de = format!("did:key:{}", keys::to_multibase(&e).unwrap());
    let up = victim.update("3.0", std::slice::from_ref(&de), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let dx = format!(
        "did:key:{}",
        keys::to_multibase(&keys::ed25519_to_x25519(&e).unwrap()).unwrap()
    );
    let up = attacker.update("3.0", std::slice::from_ref(&dx), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "client_error", "{up:?}");
    let mut fwd = fwd;
    fwd["id"] = json!("fwd-2");
    fwd["body"]["next"] = json!(dx);
    // Another payload: the same one would be a duplicate inside the dedup window.
    fwd["attachments"][0]["data"]["json"]["ciphertext"] = json!("opaque-2");
    let env = jwe::pack(&serde_json::to_vec(&fwd).unwrap(), &m.keys().unwrap(), None, dialect).unwrap();
    let (code, body) = post_raw(&m.http, TYP_ENCRYPTED, env).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(victim.status(None).await.unwrap(), 2);
    assert_eq!(attacker.status(None).await.unwrap(), 0);
}

/// The X25519 did:key of the Ed25519 did:key `dk`.
fn x25519_did_key(dk: &str) -> String {
    let x = mailroom::didcomm::v2::keys::did_key_equivalents(dk)
        .into_iter()
        .find(|d| d.starts_with("did:key:z6LS"));
    x.unwrap_or_else(|| panic!("no X25519 form of {dk}"))
}

/// pickup 2.0 status-request of a v1 wallet -> message_count.
async fn v1_pending(a: &Agent) -> u64 {
    let st = a.request(&pickup("status-request", json!({}))).await.unwrap();
    let st = st.expect("a status");
    st["message_count"].as_u64().unwrap_or_else(|| panic!("{st}"))
}

/// DIDComm v1 stores a recipient key as its base58 verkey, v2 as a did:key: one Ed25519 key,
/// two strings. A key one wallet registered over one version is refused to another
/// connection over the other, in any form (did:key with or without a fragment, its X25519
/// did:key, base58), both ways; and forwards to it reach its wallet, never the other.
#[actix_rt::test]
async fn a_key_registered_over_one_didcomm_version_cannot_be_claimed_over_the_other() {
    use mailroom::didcomm::keys::KeyPair;
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let v1s = mailroom::client::Sender::new();

    // v1 first: a v1 wallet registered its key (stored base58); a v2 connection claims it.
    let (v1, k1) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let mut attacker = V2Agent::new(m.clone()).unwrap();
    let own = attacker.onboard().await.unwrap();
    let dk = k1.did_key();
    for form in [
        dk.clone(),
        format!("{dk}#{}", &dk["did:key:".len()..]),
        x25519_did_key(&dk),
    ] {
        let up = attacker.update("3.0", std::slice::from_ref(&form), &[]).await.unwrap();
        assert_eq!(up[0]["result"], "client_error", "{form}: {up:?}");
    }
    assert_eq!(recipient_dids(&attacker).await, vec![own]);
    let routing = v1.grant.clone().unwrap().routing_keys;
    let url = n.public_url();
    let code = v1s.forward(&url, &basic_message("to-v1"), &k1.verkey(), &routing).await;
    assert_eq!(code.unwrap(), 202);
    assert_eq!(forward_opaque(&m, &dk, "to-v1-as-did").await, 404, "no v2 route");
    assert_eq!(v1_pending(&v1).await, 1);
    assert_eq!(attacker.status(None).await.unwrap(), 0);

    // v2 first: a v2 wallet registered a key as its did:key and another as its X25519
    // did:key; a v1 connection claims them (base58 or did:key, stored base58).
    let mut victim = V2Agent::new(m.clone()).unwrap();
    victim.onboard().await.unwrap();
    let (ed, xk) = (KeyPair::generate(), KeyPair::generate());
    let (ded, dx) = (ed.did_key(), x25519_did_key(&xk.did_key()));
    let up = victim.update("3.0", &[ded.clone(), dx.clone()], &[]).await.unwrap();
    assert!(up.iter().all(|u| u["result"] == "success"), "{up:?}");
    let (v1_attacker, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    for key in [ed.verkey(), ded.clone(), xk.verkey(), xk.did_key()] {
        let up = v1_attacker
            .keylist_update(std::slice::from_ref(&key), &[])
            .await
            .unwrap();
        assert_eq!(up[0]["result"], "client_error", "{key}: {up:?}");
    }
    assert_eq!(forward_opaque(&m, &ded, "to-v2-ed").await, 202);
    assert_eq!(forward_opaque(&m, &dx, "to-v2-x").await, 202);
    assert_eq!(victim.status(None).await.unwrap(), 2);
    let routing = v1_attacker.grant.clone().unwrap().routing_keys;
    for key in [ed.verkey(), xk.verkey()] {
        let code = v1s.forward(&url, &basic_message("to-v2-over-v1"), &key, &routing).await;
        assert_eq!(code.unwrap(), 404, "no v1 route to {key}");
    }
    assert_eq!(v1_pending(&v1_attacker).await, 0);
}

/// A did:peer:4 (long form, short form) with a made-up document: a recipient DID as a wallet
/// registers it (the mediator reads nothing in it but its hash).
fn peer4() -> (String, String) {
    use mailroom::didcomm::did::{create_peer4, peer4_short_form};
    let verkey = mailroom::didcomm::keys::KeyPair::generate().verkey();
    let long = create_peer4(&verkey, &["https://wallet.example".into()], &[]);
    let short = peer4_short_form(&long).unwrap();
    assert!(long.starts_with(&format!("{short}:")));
    (long, short)
}

/// Forwards an opaque attachment (`tag` makes it a payload of its own) to `next`: the status.
async fn forward_opaque(m: &V2Mediator, next: &str, tag: &str) -> u16 {
    let fwd = forward_of(m, next, json!({ "ciphertext": tag }), json!({}));
    post_raw(&m.http, TYP_ENCRYPTED, fwd).await.0
}

/// The recipient DIDs of `a`'s keylist, as recipient-query lists them.
async fn recipient_dids(a: &V2Agent) -> Vec<String> {
    let q = a
        .request(
            &a.message(
                "https://didcomm.org/coordinate-mediation/3.0/recipient-query",
                json!({}),
            ),
            "recipient",
        )
        .await
        .unwrap();
    q["body"]["dids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["recipient_did"].as_str().unwrap().to_string())
        .collect()
}

/// A did:peer:4's short form is its long form's prefix: anyone can compute it. The victim
/// registers the long form; the attacker's claim of the short form is refused, and a forward
/// naming the DID in either form (or a key of it) reaches the victim.
#[actix_rt::test]
async fn a_did_peer_4_registered_in_its_long_form_cannot_be_claimed_in_its_short_form() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut victim = V2Agent::new(m.clone()).unwrap();
    let r = victim.onboard().await.unwrap();
    let mut attacker = V2Agent::new(m.clone()).unwrap();
    attacker.onboard().await.unwrap();
    let (long, short) = peer4();

    let up = victim.update("3.0", std::slice::from_ref(&long), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    assert_eq!(up[0]["recipient_did"], json!(long), "answered as the wallet named it");
    for claim in [&short, &long] {
        let up = attacker.update("3.0", std::slice::from_ref(claim), &[]).await.unwrap();
        assert_eq!(up[0]["result"], "client_error", "{claim}: {up:?}");
    }
    // Listed as the short form: the wallet's own document has it in `alsoKnownAs`.
    let mut want = vec![r.clone(), short.clone()];
    want.sort();
    let mut dids = recipient_dids(&victim).await;
    dids.sort();
    assert_eq!(dids, want);
    assert_eq!(recipient_dids(&attacker).await.len(), 1);

    let nexts = [
        short.clone(),
        format!("{short}#key-1"),
        long.clone(),
        format!("{long}#key-1"),
    ];
    for (i, next) in nexts.iter().enumerate() {
        assert_eq!(forward_opaque(&m, next, &format!("to-{i}")).await, 202, "{next}");
    }
    assert_eq!(victim.status(None).await.unwrap(), 4);
    assert_eq!(victim.status(Some(&long)).await.unwrap(), 4, "filtered by either form");
    assert_eq!(victim.status(Some(&short)).await.unwrap(), 4);
    assert_eq!(attacker.status(None).await.unwrap(), 0);

    // Removed in either form.
    let up = victim.update("3.0", &[], std::slice::from_ref(&short)).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    assert_eq!(forward_opaque(&m, &long, "after").await, 404);
}

/// The other way round: the victim registers the short form (what senders use after first
/// contact); the attacker's claim of the long form is refused, and first-contact mail (to the
/// long form) reaches the victim. A long form whose hash does not match its document, and a
/// did:peer:3 (the hash of a did:peer:2 nothing here links it to), are refused.
#[actix_rt::test]
async fn a_did_peer_4_registered_in_its_short_form_cannot_be_claimed_in_its_long_form() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut victim = V2Agent::new(m.clone()).unwrap();
    victim.onboard().await.unwrap();
    let mut attacker = V2Agent::new(m.clone()).unwrap();
    attacker.onboard().await.unwrap();
    let (long, short) = peer4();

    let up = victim.update("3.0", std::slice::from_ref(&short), &[]).await.unwrap();
    assert_eq!(up[0]["result"], "success", "{up:?}");
    let (other_long, _) = peer4();
    let forged = format!("{short}:{}", other_long.rsplit(':').next().unwrap());
    let p3 = "did:peer:3zQmR1arqG7V8Guck9KHWkxYBAxjegVxhVLbp6fmrisUSgnp".to_string();
    for claim in [&long, &format!("{long}#key-1"), &forged, &p3] {
        let up = attacker.update("3.0", std::slice::from_ref(claim), &[]).await.unwrap();
        assert_eq!(up[0]["result"], "client_error", "{claim}: {up:?}");
    }
    assert_eq!(recipient_dids(&attacker).await.len(), 1);

    for (i, next) in [long.clone(), format!("{long}#key-1"), short.clone()]
        .iter()
        .enumerate()
    {
        assert_eq!(forward_opaque(&m, next, &format!("to-{i}")).await, 202, "{next}");
    }
    assert_eq!(forward_opaque(&m, &forged, "forged").await, 400);
    assert_eq!(victim.status(None).await.unwrap(), 3);
    assert_eq!(attacker.status(None).await.unwrap(), 0);
}

/// A forward refused in part: of two attachments for a live wallet, the queue holds room for
/// one. The sender gets the refusal (and retries); the attachment queued already was leased
/// to the live session's hand-off, which no refusal sends: it is given back and delivered
/// within a sweep, not left leased until the lease (60 s here) runs out.
#[actix_rt::test]
async fn an_attachment_queued_before_a_refusal_is_delivered_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.delivery.lease_ms = 60_000;
    cfg.delivery.sweep_interval_ms = 200;
    cfg.limits.max_queue_messages = 1;
    let n = start(&cfg);
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let mut sock = a.live().await.unwrap();
    let s = V2Sender::new().unwrap();
    let both = forward_of_all(
        &m,
        &r,
        vec![encrypted_for(&s, &a, "first"), encrypted_for(&s, &a, "second")],
        json!({}),
    );
    let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, both).await;
    assert_eq!(status, 429, "{body}");
    let (got, dups) = receive_live(&a, &mut sock, 1).await;
    assert_eq!((got, dups), (vec!["first".to_string()], 0));
}

/// A refusal for the node's state (a full queue) is no bad frame of the sender's, over v2 as
/// over v1: a known sender's refusal (a report-problem packed for it) keeps its kind, and a
/// sender forwarding over its socket into a full queue is answered each time, never closed
/// for it (20 bad frames close a socket).
#[actix_rt::test]
async fn a_v2_sender_forwarding_into_a_full_queue_over_its_socket_is_not_closed_for_it() {
    let (n, _d) = node_with(|c| c.limits.max_queue_messages = 1);
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let mut s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&r, &s.basic(&r, "fills it")).await.unwrap(), 202);
    // Authcrypted: the refusal is packed for the sender, as every refusal to a known sender is.
    s.authcrypt_forward = true;
    let mut ws = mailroom::client::websocket(m.ws.as_deref().unwrap()).await.unwrap();
    for i in 0..25 {
        let (_, env) = s.forward_envelope(&r, &s.basic(&r, &format!("refused-{i}"))).unwrap();
        ws.send_envelope(env, false).await.unwrap();
        match ws.next(WAIT).await.unwrap() {
            mailroom::client::WsEvent::Envelope(e) => {
                assert!(serde_json::from_slice::<Value>(&e).unwrap()["ciphertext"].is_string());
            }
            mailroom::client::WsEvent::Closed(why) => panic!("closed after {i} refusals: {why:?}"),
        }
    }
    assert_eq!(a.status(None).await.unwrap(), 1);
}

/// A signature says who wrote a message, not for whom: B holds a ping A signed for B, and sends
/// it on to the mediator as its own, over a WebSocket (to bind the socket to A's connection and
/// take A's queue) and over HTTP. Both are refused; A's mail stays queued. A message signed
/// for the mediator is answered.
#[actix_rt::test]
async fn a_message_signed_for_another_wallet_does_not_act_for_its_signer() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let ra = a.onboard().await.unwrap();
    let mut b = V2Agent::new(m.clone()).unwrap();
    b.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&ra, &s.basic(&ra, "for-a")).await.unwrap(), 202);

    let ping = "https://didcomm.org/trust-ping/2.0/ping";
    let mut for_b = a.message(ping, json!({"response_requested": true}));
    for_b["to"] = json!([b.did]);
    let replayed = a.sign(&for_b).unwrap();

    let mut ws = mailroom::client::websocket(m.ws.as_deref().unwrap()).await.unwrap();
    ws.send_envelope(replayed.clone(), false).await.unwrap();
    let first = match ws.next(std::time::Duration::from_secs(20)).await.unwrap() {
        mailroom::client::WsEvent::Envelope(b) => b,
        other => panic!("no answer on the socket: {other:?}"),
    };
    let answer = a.unpack(&first).expect("the refusal is for A");
    assert_eq!(kind(&answer), "problem-report", "refused, not answered: {answer}");
    assert_eq!(a.status(None).await.unwrap(), 1, "A's mail is still queued");
    assert_eq!(queue_depth(&n).await, 1);

    let (st, _) = post_raw(&m.http, mailroom::didcomm::v2::TYP_SIGNED, replayed).await;
    assert!((400..500).contains(&st), "over HTTP: {st}");
    // A signed message that names no recipient could be anyone's too.
    let mut unaddressed = a.message(ping, json!({"response_requested": true}));
    unaddressed.as_object_mut().unwrap().remove("to");
    let (st, _) = post_raw(
        &m.http,
        mailroom::didcomm::v2::TYP_SIGNED,
        a.sign(&unaddressed).unwrap(),
    )
    .await;
    assert!((400..500).contains(&st), "unaddressed: {st}");
    assert_eq!(a.status(None).await.unwrap(), 1);

    // Signed for the mediator: answered, packed for A.
    let own = a.sign(&a.message(ping, json!({"response_requested": true}))).unwrap();
    let (st, body) = post_raw(&m.http, mailroom::didcomm::v2::TYP_SIGNED, own).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(kind(&a.unpack(body.as_bytes()).unwrap()), "ping-response");
}

/// A signer whose DID has no key agreement key (a secp256k1 did:key) cannot be answered: its
/// message is refused with a 4xx before it acts, not handled and then answered 500.
#[actix_rt::test]
async fn a_signer_with_no_key_agreement_key_is_refused_before_anything_is_done() {
    use askar_crypto::alg::{EcCurves, KeyAlg};
    use mailroom::didcomm::v2::{jws, keys};
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let k = keys::generate(KeyAlg::EcCurve(EcCurves::Secp256k1)).unwrap();
    let mb = keys::to_multibase(&k).unwrap();
    let signer = format!("did:key:{mb}");
    let msg = json!({
        "id": "k1", "type": "https://didcomm.org/coordinate-mediation/3.0/mediate-request",
        "from": signer, "to": [m.did], "return_route": "all", "body": {},
    });
    let jws = jws::sign(&serde_json::to_vec(&msg).unwrap(), &format!("{signer}#{mb}"), &k).unwrap();
    let (st, body) = post_raw(
        &m.http,
        mailroom::didcomm::v2::TYP_SIGNED,
        serde_json::to_vec(&jws).unwrap(),
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("key agreement"), "{body}");
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    assert_eq!(
        conns["connections"].as_array().map(Vec::len),
        Some(0),
        "no mediation granted: {conns}"
    );
}

/// A v2 message acts once: its copy is refused (409, a report the sender opens) on the node it
/// was sent to; `created_time` outside the replay window (older, or further ahead of the
/// node's clock) and `expires_time` past are refused before anything acts; a `created_time`
/// not written in seconds is not read (the record alone refuses its copy).
#[actix_rt::test]
async fn a_replayed_v2_message_acts_once_and_its_times_bound_it() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    a.onboard().await.unwrap();
    let post = |env: Vec<u8>| {
        let url = m.http.clone();
        async move {
            mailroom::client::post_typed(&url, env, TYP_ENCRYPTED, WAIT)
                .await
                .unwrap()
        }
    };
    let status_request = || a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({}));
    let code = |body: &[u8]| a.unpack(body).unwrap()["body"]["code"].as_str().unwrap().to_string();

    let env = a.pack(&status_request()).unwrap();
    assert_eq!(post(env.clone()).await.0, 200);
    let (st, body) = post(env.clone()).await;
    assert_eq!((st, code(&body).as_str()), (409, "e.p.msg.replayed"));
    // Packed again (new ciphertext), the same message is still the same message.
    let same = status_request();
    assert_eq!(a.post(&same).await.unwrap().0, 200);
    assert_eq!(a.post(&same).await.unwrap().0, 409);

    let now_s = mailroom::protocols::now_ms() / 1000;
    for (created, what) in [(now_s - 2 * 86_400, "older"), (now_s + 2 * 86_400, "ahead")] {
        let mut msg = status_request();
        msg["created_time"] = json!(created);
        let (st, body) = post(a.pack(&msg).unwrap()).await;
        assert_eq!((st, code(&body).as_str()), (400, "e.p.msg.expired"), "{what}");
    }
    let mut msg = status_request();
    msg["expires_time"] = json!(now_s - 1);
    let (st, body) = post(a.pack(&msg).unwrap()).await;
    assert_eq!((st, code(&body).as_str()), (400, "e.p.msg.expired"));
    // Milliseconds in `created_time` (a sender's bug) are not read as a time far ahead.
    let mut msg = status_request();
    msg["created_time"] = json!(mailroom::protocols::now_ms());
    let env = a.pack(&msg).unwrap();
    assert_eq!(post(env.clone()).await.0, 200);
    assert_eq!(post(env).await.0, 409);

    // The first message of a rotated DID comes from a DID with no connection yet (its
    // `from_prior` moves the wallet's to it): it is recorded all the same, so its copy does not
    // act once the connection is the new DID's.
    a.rotate().unwrap();
    let env = a
        .pack(&a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({})))
        .unwrap();
    assert_eq!(post(env.clone()).await.0, 200);
    let (st, body) = post(env).await;
    let report = a.unpack(&body).unwrap();
    assert_eq!((st, report["body"]["code"].as_str()), (409, Some("e.p.msg.replayed")));
}

/// A forward anoncrypted to the mediator carrying `attachment`, JSON text as written (which a
/// `Value` may not hold), as `data.json`.
fn forward_of_text(m: &V2Mediator, next: &str, attachment: &str) -> Vec<u8> {
    use mailroom::didcomm::v2::jwe::{self, Dialect};
    let head = json!({
        "id": mailroom::didcomm::message::new_id(), "type": "https://didcomm.org/routing/2.0/forward", "to": [m.did],
        "body": { "next": next },
    })
    .to_string();
    let plaintext = format!(
        r#"{},"attachments":[{{"id":"a0","data":{{"json":{attachment}}}}}]}}"#,
        head.strip_suffix('}').unwrap()
    );
    let mdoc = did::resolve(&m.did).unwrap();
    jwe::pack(plaintext.as_bytes(), &mdoc.agreement_keys(), None, Dialect::ANONCRYPT).unwrap()
}

/// JSON's grammar allows a lone surrogate, a number out of range and nesting of any depth;
/// parsers (serde_json's, the wallet's) refuse them. Queued and written into deliveries as it
/// was, such an attachment made every delivery of its wallet unreadable: never acknowledged,
/// it came back first in every batch. Refused as other malformed forwards are; the wallet
/// reads the rest of its mail.
#[actix_rt::test]
async fn a_forward_whose_json_a_parser_refuses_is_not_queued() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    for bad in [
        r#"{"ciphertext": "c", "n": 1e400}"#.to_string(),
        r#"{"ciphertext": "\ud800"}"#.to_string(),
        format!(r#"{{"ciphertext": "c", "a": {deep}}}"#),
    ] {
        let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, forward_of_text(&m, &r, &bad)).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(queue_depth(&n).await, 0);
    let good = serde_json::to_string(&encrypted_for(&s, &a, "readable")).unwrap();
    let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, forward_of_text(&m, &r, &good)).await;
    assert_eq!(status, 202, "{body}");
    let got = a.delivery(10, None).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1["body"]["content"], "readable");
}

/// `msg` (an envelope's bytes) anoncrypted to the mediator `m`: the outer layer of DIDComm
/// v2's sender identity protection.
fn anoncrypted(m: &V2Mediator, msg: &[u8]) -> Vec<u8> {
    use mailroom::didcomm::v2::jwe::{self, Dialect};
    jwe::pack(msg, &m.keys().unwrap(), None, Dialect::ANONCRYPT).unwrap()
}

/// `zip` and `crit` are refused before anything is decrypted, 400 with the header named:
/// a compressed plaintext was refused as "not JSON" with no word of why, and a `crit` names
/// an extension the recipient must understand or refuse (none is implemented).
#[actix_rt::test]
async fn a_jwe_with_zip_or_crit_is_refused_naming_it() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.mediate("3.0").await.unwrap();
    let env = a
        .pack(&a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({})))
        .unwrap();
    for (name, value) in [("zip", json!("DEF")), ("crit", json!(["exp"]))] {
        let mut v: Value = serde_json::from_slice(&env).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(v["protected"].as_str().unwrap()).unwrap();
        let mut p: Value = serde_json::from_slice(&raw).unwrap();
        p[name] = value;
        v["protected"] = json!(URL_SAFE_NO_PAD.encode(p.to_string().as_bytes()));
        let (status, body) = post_raw(&a.mediator.http, TYP_ENCRYPTED, serde_json::to_vec(&v).unwrap()).await;
        assert_eq!(status, 400, "{name}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "bad-envelope", "{body}");
        assert!(body["reason"].as_str().unwrap().contains(name), "{body}");
    }
    // The node serves on.
    assert_eq!(a.status(None).await.unwrap(), 0);
}

/// DIDComm v2's sender identity protection (an authcrypt anoncrypted again, so the sender's
/// `skid` is not on the wire) acts as the inner authcrypt's sender: a status-request is
/// answered for that wallet's connection (it was refused 403, "no proof of possession": the
/// inner JWE was read as the message). Any other nesting is refused 400 saying why, and an
/// anoncrypt never acts on a connection.
#[actix_rt::test]
async fn a_sender_protected_authcrypt_acts_as_its_inner_sender() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    let r = a.onboard().await.unwrap();
    let s = V2Sender::new().unwrap();
    assert_eq!(s.forward(&r, &s.basic(&r, "queued")).await.unwrap(), 202);
    let status_request = || a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({}));

    let env = anoncrypted(&m, &a.pack(&status_request()).unwrap());
    let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, env).await;
    assert_eq!(status, 200, "{body}");
    let reply = a.unpack(body.as_bytes()).unwrap();
    assert_eq!(kind(&reply), "status", "{reply}");
    assert_eq!(reply["body"]["message_count"], 1, "{reply}");

    // Anoncrypt in anoncrypt: nobody is proven.
    let plain = serde_json::to_vec(&status_request()).unwrap();
    let env = anoncrypted(&m, &anoncrypted(&m, &plain));
    // Authcrypt around anoncrypt: the outer layer must be the anonymous one.
    let anon: Value = serde_json::from_slice(&anoncrypted(&m, &plain)).unwrap();
    let auth_anon = a.pack(&anon).unwrap();
    // A third layer.
    let inner: Value = serde_json::from_slice(&anoncrypted(&m, &a.pack(&status_request()).unwrap())).unwrap();
    let three = anoncrypted(&m, &a.pack(&inner).unwrap());
    for (env, why) in [
        (env, "inner layer must be authcrypt"),
        (auth_anon, "outer layer must be anoncrypt"),
        (three, "third JWE layer"),
    ] {
        let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, env).await;
        assert_eq!(status, 400, "{why}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains("nested JWE") && reason.contains(why), "{reason}");
    }
    // Nothing was taken from the queue.
    assert_eq!(a.status(None).await.unwrap(), 1);
}

/// Another client that captured a wallet's authcrypted message and sends it again inside an
/// anoncrypt of its own (sender protection's form) sends the same message: it is refused as
/// a replay, as the bare copy is (the replay record is the inner message's); the outer layer
/// proves nothing of its own and acts for nobody.
#[actix_rt::test]
async fn a_captured_authcrypt_wrapped_in_another_clients_anoncrypt_is_a_replay() {
    let (n, _d) = node();
    let m = v2_mediator(&n).await;
    let mut a = V2Agent::new(m.clone()).unwrap();
    a.onboard().await.unwrap();
    let captured = a
        .pack(&a.message("https://didcomm.org/messagepickup/3.0/status-request", json!({})))
        .unwrap();
    let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, captured.clone()).await;
    assert_eq!(status, 200, "the wallet's own: {body}");
    for (copy, what) in [
        (captured.clone(), "the bare copy"),
        (anoncrypted(&m, &captured), "the wrapped copy"),
    ] {
        let (status, body) = post_raw(&m.http, TYP_ENCRYPTED, copy).await;
        assert!((400..500).contains(&status), "{what}: {status} {body}");
        let report = a.unpack(body.as_bytes()).unwrap();
        assert_eq!(report["body"]["code"], "e.p.msg.replayed", "{what}: {report}");
    }
}

/// A recipient-update (3.0) or keylist-update (2.0) past `limits.max_keys_per_connection` is
/// refused whole, and the wallet over HTTP reads why in its one reply (the problem report
/// after it has no endpoint to go to). Nothing is registered.
#[actix_rt::test]
async fn an_update_over_the_key_limit_says_why_over_http() {
    let (n, _d) = node_with(|c| c.limits.max_keys_per_connection = 1);
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    a.mediate("3.0").await.unwrap();
    let two: Vec<Value> = (0..2)
        .map(|_| {
            let other = V2Agent::new(a.mediator.clone()).unwrap();
            json!({ "recipient_did": other.did, "action": "add" })
        })
        .collect();
    for (version, name) in [("3.0", "recipient-update"), ("2.0", "keylist-update")] {
        let msg = a.message(
            &format!("https://didcomm.org/coordinate-mediation/{version}/{name}"),
            json!({ "updates": two }),
        );
        let reply = a.request(&msg, &format!("{name}-response")).await.unwrap();
        let updated = reply["body"]["updated"].as_array().unwrap();
        assert!(updated.iter().all(|u| u["result"] == "server_error"), "{reply}");
        let comment = reply["body"]["comment"].as_str().unwrap_or_default();
        assert!(
            comment.contains("limits.max_keys_per_connection = 1") && comment.contains("nothing applied"),
            "{version}: {reply}"
        );
    }
    assert!(recipient_dids(&a).await.is_empty());
}

/// keylist-query and recipient-query answer a page of `body.paginate` (`limit`, `offset`), the
/// answer's `body.pagination` saying `count`, `offset` and `remaining`: a wallet pages through
/// its keylist over HTTP, every DID once.
#[actix_rt::test]
async fn a_keylist_is_answered_a_page_at_a_time() {
    use mailroom::didcomm::keys::KeyPair;
    let (n, _d) = node();
    let mut a = V2Agent::new(v2_mediator(&n).await).unwrap();
    let own = a.onboard().await.unwrap();
    let more: Vec<String> = (0..4).map(|_| KeyPair::generate().did_key()).collect();
    let up = a.update("3.0", &more, &[]).await.unwrap();
    assert!(up.iter().all(|u| u["result"] == "success"), "{up:?}");
    let mut want: Vec<String> = more.iter().cloned().chain([own]).collect();
    want.sort();
    for (version, name, answer, list) in [
        ("2.0", "keylist-query", "keylist", "keys"),
        ("3.0", "recipient-query", "recipient", "dids"),
    ] {
        let (mut got, mut offset) = (Vec::new(), 0);
        for remaining in [3, 1, 0] {
            let body = json!({ "paginate": { "limit": 2, "offset": offset } });
            let typ = format!("https://didcomm.org/coordinate-mediation/{version}/{name}");
            let r = a.request(&a.message(&typ, body), answer).await.unwrap();
            let page = r["body"][list].as_array().unwrap();
            let count = page.len();
            assert_eq!(
                r["body"]["pagination"],
                json!({ "count": count, "offset": offset, "remaining": remaining }),
                "{version}: {r}"
            );
            got.extend(page.iter().map(|d| d["recipient_did"].as_str().unwrap().to_string()));
            offset += count;
        }
        got.sort();
        assert_eq!(got, want, "{version}");
    }
}
