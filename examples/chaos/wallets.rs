//! The wallets: live over a WebSocket (pickup 2.0 live mode), polling (pickup 2.0 over HTTP)
//! and offline-then-back; every message a wallet receives is entered in the book.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mailroom::client::{pickup_message as pickup, post, type_name, Agent, WsEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::book::{record_delivery, Kind, Shared};

pub(crate) struct Wallet {
    pub(crate) idx: usize,
    pub(crate) kind: Kind,
    pub(crate) agent: Agent,
    pub(crate) key: String,
    pub(crate) routing: Vec<String>,
    pub(crate) reconnects: Cell<u64>,
}

/// Records the contents of a delivery (or of a raw implicit push); returns the queue ids to
/// acknowledge.
pub(crate) fn take_delivery(book: &Shared, w: &Wallet, env: &[u8]) -> Vec<String> {
    let Ok((msg, _)) = w.agent.unpack(env) else {
        // `{"error":"busy"}` and the like are not envelopes.
        if serde_json::from_slice::<Value>(env)
            .map(|v| v.get("protected").is_some())
            .unwrap_or(false)
        {
            book.borrow_mut().undecryptable += 1;
        }
        return Vec::new();
    };
    match type_name(&msg) {
        "delivery" => match w.agent.open_delivery(&msg) {
            Ok(items) => items
                .into_iter()
                .map(|(id, inner)| {
                    record_delivery(book, w.idx, inner["content"].as_str().unwrap_or_default());
                    id
                })
                .collect(),
            Err(_) => {
                book.borrow_mut().undecryptable += 1;
                Vec::new()
            }
        },
        "message" => {
            record_delivery(book, w.idx, msg["content"].as_str().unwrap_or_default());
            Vec::new()
        }
        _ => Vec::new(),
    }
}

pub(crate) struct Flags {
    /// Everything ends.
    pub(crate) stop: Cell<bool>,
    /// The load is over: offline wallets stay online.
    pub(crate) draining: Cell<bool>,
}

/// A WebSocket in live mode until `until` (or the end), reconnecting through the load
/// balancer whenever the socket ends.
pub(crate) async fn live(w: Rc<Wallet>, ws_url: String, book: Shared, flags: Rc<Flags>, until: Option<Instant>) {
    let over = |flags: &Flags| flags.stop.get() || until.is_some_and(|u| Instant::now() >= u && !flags.draining.get());
    while !over(&flags) {
        let ws = tokio::time::timeout(Duration::from_secs(5), w.agent.websocket(&ws_url)).await;
        let mut ws = match ws {
            Ok(Ok(ws)) => ws,
            _ => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        w.reconnects.set(w.reconnects.get() + 1);
        let Ok(p) = w
            .agent
            .pack(&pickup("live-delivery-change", json!({"live_delivery": true})))
        else {
            return;
        };
        if ws.send_envelope(p, true).await.is_err() {
            continue;
        }
        while !over(&flags) {
            let ev = match tokio::time::timeout(Duration::from_millis(300), ws.next(Duration::from_secs(3600))).await {
                Err(_) => continue,
                Ok(Err(_)) | Ok(Ok(WsEvent::Closed(_))) => break,
                Ok(Ok(WsEvent::Envelope(e))) => e,
            };
            // A refusal in clear (`{"error": ...}`, e.g. store-unavailable while PostgreSQL
            // restarts) may have been the live-mode request itself: the socket is then bound
            // to nothing and would wait for good. Start over, as a wallet should.
            if serde_json::from_slice::<Value>(&ev).is_ok_and(|v| v.get("error").is_some()) {
                break;
            }
            let ids = take_delivery(&book, &w, &ev);
            if !ids.is_empty() {
                let Ok(p) = w
                    .agent
                    .pack(&pickup("messages-received", json!({ "message_id_list": ids })))
                else {
                    continue;
                };
                if ws.send_envelope(p, true).await.is_err() {
                    break;
                }
            }
        }
        ws.close().await;
        if !over(&flags) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Polls with pickup 2.0 over HTTP (through the load balancer) until `until` (or the end).
pub(crate) async fn polling(w: Rc<Wallet>, book: Shared, flags: Rc<Flags>, until: Option<Instant>) {
    let over = |flags: &Flags| flags.stop.get() || until.is_some_and(|u| Instant::now() >= u && !flags.draining.get());
    while !over(&flags) {
        let req = pickup("delivery-request", json!({"limit": 10}));
        let got = match (w.agent.pack(&req), w.agent.endpoint.clone()) {
            (Ok(env), ep) => post(&ep, env, Duration::from_secs(5)).await,
            (Err(e), _) => Err(e),
        };
        let mut more = false;
        if let Ok((s, body)) = got {
            if (200..300).contains(&s) && !body.is_empty() {
                let ids = take_delivery(&book, &w, &body);
                if !ids.is_empty() {
                    more = true;
                    let ack = pickup("messages-received", json!({ "message_id_list": ids }));
                    if let Ok(env) = w.agent.pack(&ack) {
                        let _ = post(&w.agent.endpoint, env, Duration::from_secs(5)).await;
                    }
                }
            }
        }
        if !more {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Offline for a while, online (WebSocket live mode or HTTP polling, by wallet) for a while,
/// again and again; online for good once the load is over.
pub(crate) async fn offline_then_back(w: Rc<Wallet>, ws_url: String, book: Shared, flags: Rc<Flags>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !flags.stop.get() {
        let off = Instant::now() + Duration::from_millis(rng.gen_range(2000..7000));
        while Instant::now() < off && !flags.draining.get() && !flags.stop.get() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let until = Some(Instant::now() + Duration::from_millis(rng.gen_range(1500..4000)));
        if w.idx % 2 == 0 {
            live(w.clone(), ws_url.clone(), book.clone(), flags.clone(), until).await;
        } else {
            polling(w.clone(), book.clone(), flags.clone(), until).await;
        }
    }
}
