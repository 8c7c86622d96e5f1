//! Isolation: a message acts only on the connection whose proven key sent it. Two real
//! clients, a victim and an attacker, over HTTP and WebSocket, on one node and across the
//! nodes of a PostgreSQL cluster:
//! - an anoncrypted (or someone else's) didexchange `complete` naming the victim's thread
//!   takes over nothing: no socket is bound to the victim, nothing of its queue moves;
//! - a handshake whose DID document lists the victim's key (beside the attacker's, or alone)
//!   is refused, so the victim's own messages keep acting on the victim's connection;
//! - a session that moved to another node stops taking deliveries on the old one;
//! - a captured authenticated message, replayed on any node, acts once.

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, post, Agent, Sender, WsEvent};
use mailroom::config::Strategy;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::message::new_id;
use mailroom::didcomm::{did, envelope};
use mailroom::node::RunningNode;
use serde_json::{json, Value};

const DIDEXCHANGE: &str = "https://didcomm.org/didexchange/1.1";

fn b64(v: &Value) -> String {
    mailroom::client::b64url_json(v)
}

/// Packs `msg` for the mediator key `to`: authcrypt from `from`, or anoncrypt.
fn pack(msg: &Value, to: &str, from: Option<&KeyPair>) -> Vec<u8> {
    envelope::pack(&serde_json::to_vec(msg).unwrap(), &[to.to_string()], from).unwrap()
}

/// A handshake request, `didexchange` or `connections` 1.0, presenting `did` and its `doc`,
/// answered on the return route; under the invitation `pthid` when given.
fn handshake_request(protocol: &str, did: &str, doc: &Value, pthid: Option<&str>) -> Value {
    let mut req = if protocol == "didexchange" {
        json!({
            "@type": "https://didcomm.org/didexchange/1.0/request",
            "did": did,
            "did_doc~attach": { "@id": new_id(), "mime-type": "application/json", "data": { "base64": b64(doc) } },
        })
    } else {
        json!({
            "@type": "https://didcomm.org/connections/1.0/request",
            "connection": { "DID": did, "DIDDoc": doc },
        })
    };
    req["@id"] = json!(new_id());
    req["label"] = json!("handshake");
    req["~transport"] = json!({ "return_route": "all" });
    if let Some(pthid) = pthid {
        req["~thread"] = json!({ "pthid": pthid });
    }
    req
}

/// Sends `env` over HTTP to `http` and over a fresh WebSocket to `ws`; returns the HTTP
/// status and the `error` code of the first frame the socket answers with (the frame must be
/// an error, not a delivery).
async fn refused_both_ways(env: Vec<u8>, http: &str, ws: &str) -> (u16, String) {
    let (status, body) = post(http, env.clone(), WAIT).await.unwrap();
    let mut sock = mailroom::client::websocket(ws).await.unwrap();
    sock.send_envelope(env, true).await.unwrap();
    let code = match sock.next(WAIT).await.unwrap() {
        WsEvent::Envelope(f) => {
            let v: Value = serde_json::from_slice(&f).unwrap_or_else(|_| {
                panic!(
                    "the socket was answered with a non-JSON frame: {}",
                    String::from_utf8_lossy(&f)
                )
            });
            v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("the socket got something other than a refusal: {v}"))
                .to_string()
        }
        WsEvent::Closed(r) => panic!("socket closed: {r:?}"),
    };
    sock.close().await;
    assert!(
        !(200..300).contains(&status),
        "HTTP accepted it: {status} {}",
        String::from_utf8_lossy(&body)
    );
    (status, code)
}

/// The victim's queued messages, picked up over HTTP on `via` (and acknowledged).
async fn pick_up(victim: &mut Agent, via: &str) -> Vec<String> {
    victim.endpoint = via.to_string();
    let d = victim
        .request(&pickup("delivery-request", json!({"limit": 100})))
        .await
        .unwrap()
        .expect("a reply");
    if type_name(&d) != "delivery" {
        return Vec::new();
    }
    contents(victim, &d)
}

/// Item 1: the takeover attempts, from the node at `http`/`ws`.
async fn complete_attacks(victim: &Agent, attacker: &Agent, http: &str, ws: &str) {
    let complete = json!({
        "@type": format!("{DIDEXCHANGE}/complete"),
        "@id": new_id(),
        "~thread": { "thid": victim.thread_id },
        "~transport": { "return_route": "all" },
    });
    // Anoncrypted: acts on no connection at all.
    let (status, code) = refused_both_ways(pack(&complete, &victim.mediator_verkey, None), http, ws).await;
    assert_eq!((status, code.as_str()), (403, "no-connection"));
    // Authcrypted by another connection: not that connection's exchange.
    let env = pack(&complete, &attacker.mediator_verkey, Some(&attacker.key));
    let (status, code) = refused_both_ways(env, http, ws).await;
    assert_eq!((status, code.as_str()), (400, "bad-message"));
}

/// Item 2: handshakes presenting the victim's key, from the node at `http`/`ws`.
async fn key_claims(victim: &Agent, inv_key: &str, http: &str, ws: &str) {
    let attacker = KeyPair::generate();
    let legacy = did::legacy_did_from_verkey(&attacker.public_bytes());
    let doc_with = |keys: Vec<String>| {
        let mut doc = did::legacy_diddoc(&legacy, &attacker.verkey(), &["http://127.0.0.1:9/".into()], &[]);
        doc["service"][0]["recipientKeys"] = json!(keys);
        doc
    };
    let both = doc_with(vec![attacker.verkey(), victim.key.verkey()]);
    let only_victim = doc_with(vec![victim.key.verkey()]);
    for req in ["didexchange", "connections"].map(|p| handshake_request(p, &legacy, &both, None)) {
        // Authcrypted with a key of the document (proof of possession), but the document
        // also lists the victim's key: refused, nothing stored.
        let (status, code) = refused_both_ways(pack(&req, inv_key, Some(&attacker)), http, ws).await;
        assert_eq!((status, code.as_str()), (409, "key-taken"), "{req}");
    }
    for req in ["didexchange", "connections"].map(|p| handshake_request(p, &legacy, &only_victim, None)) {
        // The sender's key is not in the document it presents.
        let (status, code) = refused_both_ways(pack(&req, inv_key, Some(&attacker)), http, ws).await;
        assert_eq!((status, code.as_str()), (403, "no-proof-of-possession"), "{req}");
        // Anoncrypted: nothing proves anything.
        let (status, code) = refused_both_ways(pack(&req, inv_key, None), http, ws).await;
        assert_eq!((status, code.as_str()), (403, "no-proof-of-possession"), "{req}");
    }
}

/// After the attacks the victim's connection is intact: its queued message is still there,
/// its keylist-update registers for itself, and forwards to the new key reach it.
async fn victim_is_intact(victim: &mut Agent, via: &RunningNode, queued: &str) {
    victim.endpoint = via.public_url();
    let k2 = victim.new_recipient_key();
    let r = victim.keylist_update(&[k2.did_key()], &[]).await.unwrap();
    assert_eq!(r[0]["result"], "success", "{r:?}");
    let routing = victim.grant.clone().unwrap().routing_keys;
    let status = Sender::new()
        .forward(
            &via.public_url(),
            &basic_message("to the new key"),
            &k2.verkey(),
            &routing,
        )
        .await
        .unwrap();
    assert_eq!(status, 202);
    let mut got = pick_up(victim, &via.public_url()).await;
    got.sort();
    assert_eq!(got, vec![queued.to_string(), "to the new key".to_string()]);
}

async fn queue_for(victim: &Agent, key: &KeyPair, node: &RunningNode, text: &str) {
    let routing = victim.grant.clone().unwrap().routing_keys;
    let status = Sender::new()
        .forward(&node.public_url(), &basic_message(text), &key.verkey(), &routing)
        .await
        .unwrap();
    assert_eq!(status, 202);
}

#[actix_rt::test]
async fn one_node_attacks_over_http_and_websocket() {
    // The default strategy: a socket bound to the victim would get its queue pushed raw.
    let (_d, n, mut victim, vk) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let inv = invitation(&n).await;
    let (attacker, _) = Agent::onboard(&inv).await.unwrap();
    queue_for(&victim, &vk, &n, "for the victim").await;

    complete_attacks(&victim, &attacker, &n.public_url(), &ws_url(&n)).await;
    assert_eq!(queue_depth(&n).await, 1, "nothing of the victim's queue moved");
    key_claims(&victim, &inv.recipient_key, &n.public_url(), &ws_url(&n)).await;
    victim_is_intact(&mut victim, &n, "for the victim").await;
}

/// An acknowledgement acts only on its sender's connection. The attacker has learned the ids
/// of the victim's live delivery (a leaked log, say) and acknowledges them over HTTP and on its
/// own socket: the victim's messages stay queued, and the victim's live window still holds its
/// next message until the victim itself acknowledges.
#[actix_rt::test]
async fn acknowledging_another_wallets_messages_removes_nothing_and_moves_no_window() {
    let (_d, n, victim, vk) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |c| {
        c.delivery.live_ack_wait_ms = 60_000; // only an acknowledgement can open the window
    })
    .await;
    let (attacker, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let mut vws = live_socket(&victim, &n).await;
    // The victim acknowledges on its socket, so its window applies.
    queue_for(&victim, &vk, &n, "v0").await;
    let d0 = ws_next_message(&victim, &mut vws).await;
    assert_eq!(
        ack_on_socket(&victim, &mut vws, &delivery_ids(&victim, &d0)).await,
        Vec::<Vec<String>>::new()
    );
    queue_for(&victim, &vk, &n, "v1").await;
    let d1 = ws_next_message(&victim, &mut vws).await;
    assert_eq!(contents(&victim, &d1), vec!["v1".to_string()]);
    let ids1 = delivery_ids(&victim, &d1);
    queue_for(&victim, &vk, &n, "v2").await; // held: v1 is out, unacknowledged

    let ack = pickup("messages-received", json!({ "message_id_list": ids1 }));
    let st = attacker.request(&ack).await.unwrap().expect("a status reply");
    assert_eq!(type_name(&st), "status", "{st}");
    let mut aws = live_socket(&attacker, &n).await;
    assert_eq!(
        ack_on_socket(&attacker, &mut aws, &ids1).await,
        Vec::<Vec<String>>::new()
    );
    assert_eq!(queue_depth(&n).await, 2, "v1 (out, unacknowledged) and v2 stay queued");

    // The victim's own acknowledgement removes v1 and lets v2 out.
    let mut got = ack_on_socket(&victim, &mut vws, &ids1).await;
    if got.is_empty() {
        got.push(contents(&victim, &ws_next_message(&victim, &mut vws).await));
    }
    assert_eq!(got, vec![vec!["v2".to_string()]]);
    assert_eq!(queue_depth(&n).await, 1, "v2, out and unacknowledged");
    aws.close().await;
    vws.close().await;
}

#[actix_rt::test]
async fn cluster_attacks_from_another_node() {
    let c = cluster_of(2, 100).await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let inv1 = invitation(n1).await;
    let inv2 = invitation(n2).await;
    let (mut victim, vk) = Agent::onboard(&inv1).await.unwrap();
    let (mut attacker, _) = Agent::onboard(&inv2).await.unwrap();
    attacker.endpoint = n2.public_url();
    queue_for(&victim, &vk, n1, "for the victim").await;

    complete_attacks(&victim, &attacker, &n2.public_url(), &ws_url(n2)).await;
    key_claims(&victim, &inv2.recipient_key, &n2.public_url(), &ws_url(n2)).await;
    // And the same from the victim's own node.
    complete_attacks(&victim, &attacker, &n1.public_url(), &ws_url(n1)).await;
    // A copy of the victim's message replayed on the other node: the record is the store's.
    let query = json!({
        "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-query",
        "@id": new_id(),
        "~transport": { "return_route": "all" },
    });
    let env = victim.pack(&query).unwrap();
    let (status, body) = post(&n1.public_url(), env.clone(), WAIT).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, code) = refused_both_ways(env, &n2.public_url(), &ws_url(n2)).await;
    assert_eq!((status, code.as_str()), (409, "replayed"));
    victim_is_intact(&mut victim, n2, "for the victim").await;
}

/// Item 4: the wallet reconnects on n2 while its old socket on n1 is half-open (the test
/// simply stops reading it). In implicit mode a delivery written into the old socket would be
/// lost; once n2's newer epoch owns the connection, n1 stops delivering there and the
/// message reaches the new socket.
#[actix_rt::test]
async fn a_moved_session_stops_taking_deliveries_on_its_old_node() {
    // No sweep during the test: only the notification path can deliver.
    let c = cluster_of(2, 600_000).await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let inv = invitation(n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    let conn = a_connection_id(n1).await;
    // Each ping its own message: a copy of one would be refused as a replay.
    let ping = || json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": new_id(), "response_requested": false, "~transport": {"return_route": "all"}});

    let mut old = a.websocket(&ws_url(n1)).await.unwrap();
    old.send_envelope(a.pack(&ping()).unwrap(), true).await.unwrap();
    wait_owner(&[n1, n2], &conn, "n1").await;
    let mut new = a.websocket(&ws_url(n2)).await.unwrap();
    new.send_envelope(a.pack(&ping()).unwrap(), true).await.unwrap();
    wait_owner(&[n1, n2], &conn, "n2").await;
    eventually("n1 let go of the superseded session", || async {
        let v = get_json(&format!("{}/sessions", n1.admin_url())).await;
        v["sessions"].as_array().unwrap().is_empty().then_some(())
    })
    .await;

    // A forward lands on the old node.
    queue_for(&a, &k, n1, "after the move").await;
    match new.next(WAIT).await.unwrap() {
        WsEvent::Envelope(e) => {
            let (m, _) = a.unpack(&e).unwrap();
            assert_eq!(m["content"], "after the move");
        }
        WsEvent::Closed(r) => panic!("new socket closed: {r:?}"),
    }
    // The newer session ends while the superseded one is still open: no node holds a live
    // session of the connection, so none may be named its owner (a claim n1 left behind would
    // come back and take pushes and hand-offs for a node that delivers nothing).
    drop(new);
    for n in [n1, n2] {
        eventually(
            &format!("{} names no owner once the newer session ended", n.node_id),
            || async { owner_seen_by(n, &conn).await.is_none().then_some(()) },
        )
        .await;
    }
    drop(old);
}

/// A handshake holds only the key its sender proved: a document that also lists a key no
/// connection holds yet (a bystander's, e.g. a public DID's verkey) does not make the
/// requester that key's holder, so the bystander connects with it afterwards.
#[actix_rt::test]
async fn a_handshake_holds_only_the_key_it_proved() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let inv = invitation(&n).await;
    let (attacker, bystander) = (KeyPair::generate(), KeyPair::generate());
    let request = |signer: &KeyPair, keys: Vec<String>| {
        let legacy = did::legacy_did_from_verkey(&signer.public_bytes());
        let mut doc = did::legacy_diddoc(&legacy, &signer.verkey(), &["http://127.0.0.1:9/".into()], &[]);
        doc["service"][0]["recipientKeys"] = json!(keys);
        handshake_request("didexchange", &legacy, &doc, Some(&inv.id))
    };
    let req = request(&attacker, vec![attacker.verkey(), bystander.verkey()]);
    let (status, body) = post(&n.public_url(), pack(&req, &inv.recipient_key, Some(&attacker)), WAIT)
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let req = request(&bystander, vec![bystander.verkey()]);
    let (status, body) = post(&n.public_url(), pack(&req, &inv.recipient_key, Some(&bystander)), WAIT)
        .await
        .unwrap();
    assert_eq!(
        status,
        200,
        "the bystander's own key is free: {}",
        String::from_utf8_lossy(&body)
    );
    let v = get_json(&format!("{}/connections", n.admin_url())).await;
    assert_eq!(v["connections"].as_array().unwrap().len(), 2, "{v}");
}

/// A handshake request from a key that already has a connection is refused (409 `key-taken`)
/// before its invitation is claimed: a single-use invitation it names stays usable by the
/// client it was made for. Before, the key check skipped the sender's own key (the one key a
/// handshake stores), so the invitation was used up and then the store refused the key: the
/// invitation's client got 410 `invitation-used`. A wallet with a connection (or anyone who
/// held its key and knew the invitation's id) could burn invitations the operator minted.
#[actix_rt::test]
async fn a_handshake_from_a_key_with_a_connection_leaves_a_single_use_invitation_unused() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let (a, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    let legacy = did::legacy_did_from_verkey(&a.key.public_bytes());
    let doc = did::legacy_diddoc(&legacy, &a.key.verkey(), &["http://127.0.0.1:9/".into()], &[]);
    for protocol in ["didexchange", "connections"] {
        let (st, body) = post_raw(&format!("{}/invitations", n.admin_url()), "application/json", vec![]).await;
        assert_eq!(st, 201, "{body}");
        let minted: Value = serde_json::from_str(&body).unwrap();
        let inv = mailroom::client::Invitation::from_url(minted["invitation_url"].as_str().unwrap()).unwrap();
        let req = handshake_request(protocol, &legacy, &doc, Some(&inv.id));
        let (status, code) = refused_both_ways(
            pack(&req, &inv.recipient_key, Some(&a.key)),
            &n.public_url(),
            &ws_url(&n),
        )
        .await;
        assert_eq!((status, code.as_str()), (409, "key-taken"), "{protocol}");
        Agent::connect(&inv)
            .await
            .unwrap_or_else(|e| panic!("the invitation's own client, after a refused {protocol} request: {e}"));
    }
}

/// Handshake requests refused for what they carry make no connection and leave a single-use
/// invitation they name usable by its own client, over HTTP and WebSocket, for both protocols:
/// - an `@id` holding a NUL (stored as the connection's thread id): the store refused it only
///   after the invitation was claimed, so the invitation was used up by nothing;
/// - a DID document whose routing key is a point of small order (the Ed25519 identity, whose
///   X25519 form is all zeros): stored, every reply to the connection failed to seal (500 on its
///   return route, dropped on its socket, before replies there were no longer wrapped for
///   routing keys; still every reply sent to its endpoint) and its key was taken for good;
/// - a `didexchange/2.0/request`, another protocol than 1.x (RFC 0003): it was handled as 1.x,
///   made a connection and left no replay record.
#[actix_rt::test]
async fn handshakes_refused_for_what_they_carry_make_nothing_and_use_no_invitation() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let small_order = "4uQeVj5tqViQh7yWWGStvkEG1Zmhx6uasJtWCJziofM";
    let connections = || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        v["connections"].as_array().unwrap().len()
    };
    let mut made = 0;
    for protocol in ["didexchange", "connections"] {
        for case in ["nul-id", "small-order-routing-key", "major-version-2"] {
            if case == "major-version-2" && protocol == "connections" {
                continue;
            }
            let (st, body) = post_raw(&format!("{}/invitations", n.admin_url()), "application/json", vec![]).await;
            assert_eq!(st, 201, "{body}");
            let minted: Value = serde_json::from_str(&body).unwrap();
            let inv = mailroom::client::Invitation::from_url(minted["invitation_url"].as_str().unwrap()).unwrap();
            let key = KeyPair::generate();
            let legacy = did::legacy_did_from_verkey(&key.public_bytes());
            let routing = if case == "small-order-routing-key" {
                vec![small_order.to_string()]
            } else {
                vec![]
            };
            let doc = did::legacy_diddoc(&legacy, &key.verkey(), &["http://127.0.0.1:9/".into()], &routing);
            let mut req = handshake_request(protocol, &legacy, &doc, Some(&inv.id));
            match case {
                "nul-id" => req["@id"] = json!("a\u{0}b"),
                "major-version-2" => req["@type"] = json!("https://didcomm.org/didexchange/2.0/request"),
                _ => {}
            }
            let (status, _) =
                refused_both_ways(pack(&req, &inv.recipient_key, Some(&key)), &n.public_url(), &ws_url(&n)).await;
            assert_eq!(status, 400, "{protocol} {case}");
            assert_eq!(connections().await, made, "{protocol} {case}: no connection stored");
            Agent::connect(&inv)
                .await
                .unwrap_or_else(|e| panic!("the invitation's own client, after a refused {protocol} {case}: {e}"));
            made += 1;
            assert_eq!(connections().await, made, "{protocol} {case}");
        }
    }
}

/// A captured authenticated message acts once. The attacker holds a copy of what the victim
/// sent (a leaked log, a capture): a ping that bound the victim's socket, and a pickup 1.0
/// `batch-pickup`, whose batch is removed once written back. Replayed over HTTP and on the
/// attacker's own socket, each is refused before it acts: no socket is bound to the victim,
/// nothing of its queue is taken, and its own socket still delivers.
#[actix_rt::test]
async fn a_replayed_message_acts_once() {
    let (_d, n, mut victim, vk) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let (http, ws) = (n.public_url(), ws_url(&n));
    victim.endpoint = http.clone();

    // The victim's batch-pickup over HTTP takes its one queued message.
    queue_for(&victim, &vk, &n, "picked up").await;
    let batch = json!({
        "@type": "https://didcomm.org/messagepickup/1.0/batch-pickup",
        "@id": new_id(),
        "batch_size": 10,
        "~transport": { "return_route": "all" },
    });
    let captured_batch = victim.pack(&batch).unwrap();
    let (status, body) = post(&http, captured_batch.clone(), WAIT).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (reply, _) = victim.unpack(&body).unwrap();
    assert_eq!(reply["messages~attach"].as_array().map(Vec::len), Some(1), "{reply}");
    // The victim's socket, bound by a ping with return route `all` (implicit pickup).
    let ping = json!({
        "@type": "https://didcomm.org/trust_ping/1.0/ping",
        "@id": new_id(),
        "response_requested": true,
        "~transport": { "return_route": "all" },
    });
    let captured_ping = victim.pack(&ping).unwrap();
    let mut vws = victim.websocket(&ws).await.unwrap();
    vws.send_envelope(captured_ping.clone(), true).await.unwrap();
    assert_eq!(type_name(&ws_next_message(&victim, &mut vws).await), "ping_response");

    // Held while the victim's socket is open: raw pushes go to whichever socket is bound.
    queue_for(&victim, &vk, &n, "first").await;
    let first = ws_next_message(&victim, &mut vws).await;
    assert_eq!(first["content"], "first", "{first}");
    read_on_until_depth(&n, &mut vws, 0, "the pushed message removed").await;
    // The victim's socket closed (and let go: a forward handed to it while it closed would
    // be written there), two more queued, then the replays.
    vws.close().await;
    eventually("the victim's socket let go", || async {
        let v = get_json(&format!("{}/sessions", n.admin_url())).await;
        v["sessions"].as_array().is_some_and(Vec::is_empty).then_some(())
    })
    .await;
    queue_for(&victim, &vk, &n, "kept 1").await;
    queue_for(&victim, &vk, &n, "kept 2").await;
    for env in [captured_ping, captured_batch] {
        let (status, code) = refused_both_ways(env, &http, &ws).await;
        assert_eq!((status, code.as_str()), (409, "replayed"));
    }
    assert_eq!(queue_depth(&n).await, 2, "nothing of the victim's queue was taken");

    // The victim's own new messages act as before.
    let mut vws = victim.websocket(&ws).await.unwrap();
    let ping = json!({
        "@type": "https://didcomm.org/trust_ping/1.0/ping",
        "@id": new_id(),
        "response_requested": false,
        "~transport": { "return_route": "all" },
    });
    vws.send_envelope(victim.pack(&ping).unwrap(), true).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            ws_next_message(&victim, &mut vws).await["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    got.sort();
    assert_eq!(got, ["kept 1", "kept 2"]);
    vws.close().await;
}

/// A message refused leaves no record: its sender's retry of the very same envelope is
/// handled once the refusal's cause is gone (here a full queue), not refused as a replay. A
/// copy of the forward that acted is then a duplicate.
#[actix_rt::test]
async fn a_refused_message_can_be_retried_and_then_acts_once() {
    let (_d, n, victim, vk) = node_with_wallet(Strategy::QueueOnly, |c| c.limits.max_queue_messages = 1).await;
    let (sender, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    queue_for(&victim, &vk, &n, "fills the queue").await;
    // The sender's own connection authcrypts a forward to the victim's key.
    let forward = forward_to(&vk, "retried");
    let env = sender.pack(&forward).unwrap();
    let (status, _) = post(&n.public_url(), env.clone(), WAIT).await.unwrap();
    assert_eq!(status, 429, "the queue is full");
    let (status, _) = post(&n.public_url(), env.clone(), WAIT).await.unwrap();
    assert_eq!(status, 429, "refused for its own reason again, not as a replay");
    let mut v = victim;
    v.endpoint = n.public_url();
    let d = v
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .expect("a delivery");
    assert_eq!(contents(&v, &d), ["fills the queue"]);
    let ack = pickup("messages-received", json!({ "message_id_list": delivery_ids(&v, &d) }));
    v.request(&ack).await.unwrap();
    assert_eq!(queue_depth(&n).await, 0);
    let (status, body) = post(&n.public_url(), env.clone(), WAIT).await.unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    // A copy of a forward that was queued: a duplicate, answered as one, queued once.
    let (status, body) = post(&n.public_url(), env, WAIT).await.unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    assert_eq!(pick_up(&mut v, &n.public_url()).await, ["retried"]);
}

/// What `co` (a co-recipient of the authcrypt `env`) can write: `msg` under `env`'s protected
/// header (the payload's AAD, naming the sender and sealing its key for every recipient),
/// encrypted with the content key `co` opens from its own recipient entry. Every recipient of
/// an RFC 0019 envelope gets the same content key.
fn rewritten_by_co_recipient(env: &[u8], co: &KeyPair, msg: &Value) -> Vec<u8> {
    use askar_crypto::alg::chacha20::{Chacha20Key, C20P};
    use askar_crypto::alg::ed25519::Ed25519KeyPair;
    use askar_crypto::buffer::SecretBytes;
    use askar_crypto::encrypt::crypto_box::{crypto_box_open, crypto_box_seal_open};
    use askar_crypto::encrypt::KeyAeadInPlace;
    use askar_crypto::repr::{KeyPublicBytes, KeySecretBytes};
    use base64::Engine;
    let b64d = |s: &Value| mailroom::protocols::decode_b64_any(s.as_str().unwrap()).unwrap();
    let b64e = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let outer: Value = serde_json::from_slice(env).unwrap();
    let protected: Value = serde_json::from_slice(&b64d(&outer["protected"])).unwrap();
    let entry = protected["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["header"]["kid"] == co.verkey())
        .expect("co is a recipient");
    let co_x = Ed25519KeyPair::from_secret_bytes(&co.secret_bytes())
        .unwrap()
        .to_x25519_keypair();
    let sender = crypto_box_seal_open(&co_x, &b64d(&entry["header"]["sender"])).unwrap();
    let sender_pk = mailroom::didcomm::keys::parse_verkey(std::str::from_utf8(sender.as_ref()).unwrap()).unwrap();
    let sender_x = Ed25519KeyPair::from_public_bytes(&sender_pk)
        .unwrap()
        .to_x25519_keypair();
    let mut cek = SecretBytes::from_slice(&b64d(&entry["encrypted_key"]));
    crypto_box_open(&co_x, &sender_x, &mut cek, &b64d(&entry["header"]["iv"])).unwrap();
    let nonce = [7u8; 12];
    let mut buf = SecretBytes::from_slice(&serde_json::to_vec(msg).unwrap());
    Chacha20Key::<C20P>::from_secret_bytes(cek.as_ref())
        .unwrap()
        .encrypt_in_place(&mut buf, &nonce, outer["protected"].as_str().unwrap().as_bytes())
        .unwrap();
    let (ciphertext, tag) = buf.as_ref().split_at(buf.len() - 16);
    serde_json::to_vec(&json!({
        "protected": outer["protected"],
        "iv": b64e(&nonce),
        "ciphertext": b64e(ciphertext),
        "tag": b64e(tag),
    }))
    .unwrap()
}

/// A DIDComm v1 authcrypt packed for several recipients proves no sender: each recipient gets
/// the same content key, and the protected header (with the sender's sealed key for the
/// mediator) stays valid under any payload. A wallet's message packed for the mediator and
/// someone else let that someone (here another wallet of the same mediator) write any message
/// as the wallet: before, its `keylist-update` removing the wallet's key was applied and its
/// `batch-pickup` took the wallet's queue, with a fresh `@id` each (no replay record stops
/// that). Now such an envelope acts on no connection, from whoever it comes (they cannot be
/// told apart), with a refusal that says why; a forward in one still queues (it needs no
/// sender).
#[actix_rt::test]
async fn an_authcrypt_for_several_recipients_acts_on_no_connection() {
    let (_d, n, mut victim, vk) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, |_| {}).await;
    let (http, ws) = (n.public_url(), ws_url(&n));
    victim.endpoint = http.clone();
    let (co, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    queue_for(&victim, &vk, &n, "for the victim").await;
    let shared_with_co = |msg: &Value| {
        let to = [victim.mediator_verkey.clone(), co.key.verkey()];
        envelope::pack(&serde_json::to_vec(msg).unwrap(), &to, Some(&victim.key)).unwrap()
    };
    let message = |typ: &str, body: Value| {
        let mut m = json!({ "@type": typ, "@id": new_id(), "~transport": { "return_route": "all" } });
        m.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        m
    };
    let query = || message("https://didcomm.org/coordinate-mediation/1.0/keylist-query", json!({}));
    // The victim's own keylist-query, sent to the mediator and copied to `co`.
    let seen = shared_with_co(&query());
    let forged = [
        message(
            "https://didcomm.org/coordinate-mediation/1.0/keylist-update",
            json!({ "updates": [{ "recipient_key": vk.did_key(), "action": "remove" }] }),
        ),
        message(
            "https://didcomm.org/messagepickup/1.0/batch-pickup",
            json!({ "batch_size": 10 }),
        ),
    ];
    for msg in &forged {
        let env = rewritten_by_co_recipient(&seen, &co.key, msg);
        let (status, code) = refused_both_ways(env, &http, &ws).await;
        assert_eq!((status, code.as_str()), (403, "shared-authcrypt"), "{msg}");
    }
    // The victim's own multi-recipient message is refused the same way, saying why.
    let (status, body) = post(&http, seen.clone(), WAIT).await.unwrap();
    let refusal: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 403, "{refusal}");
    assert_eq!(refusal["error"], "shared-authcrypt");
    let reason = refusal["reason"].as_str().unwrap();
    assert!(
        reason.contains("packed for 2 recipients proves no sender") && reason.contains("mediator's key alone"),
        "{reason}"
    );
    let (status, code) = refused_both_ways(seen, &http, &ws).await;
    assert_eq!((status, code.as_str()), (403, "shared-authcrypt"));

    // Nothing acted: the victim's key is registered and its message queued.
    let list = victim.request(&query()).await.unwrap().expect("a keylist");
    assert_eq!(list["keys"], json!([{ "recipient_key": vk.did_key() }]), "{list}");
    assert_eq!(queue_depth(&n).await, 1);
    // A forward needs no sender: one packed for several recipients is queued.
    let forward = forward_to(&vk, "forwarded");
    let (status, body) = post(&http, shared_with_co(&forward), WAIT).await.unwrap();
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let mut got = pick_up(&mut victim, &http).await;
    got.sort();
    assert_eq!(got, ["for the victim", "forwarded"]);
}

/// A routing 1.0 `forward` to `vk` of a basic message `text`, anoncrypted to it, as a plain
/// JSON message (for a sender to pack as it likes).
fn forward_to(vk: &KeyPair, text: &str) -> Value {
    let inner = Sender::new()
        .forward_envelope(&basic_message(text), &vk.verkey(), &[])
        .unwrap();
    json!({
        "@type": "https://didcomm.org/routing/1.0/forward",
        "@id": new_id(),
        "to": vk.verkey(),
        "msg": serde_json::from_slice::<Value>(&inner).unwrap(),
    })
}
