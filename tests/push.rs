//! Push notifications end to end: real nodes, a wallet registering its device over DIDComm,
//! forwards from a sender, and local HTTPS stand-ins for Google's OAuth2 and FCM endpoints,
//! APNs (HTTP/2) and a webhook, which check every request as the real ones would.

mod common;
#[path = "common/push.rs"]
mod standin;

use common::cluster::*;
use common::*;
use mailroom::client::{basic_message, Agent, Sender, WsClient};
use mailroom::cluster::proto::Frame;
use mailroom::config::Strategy;
use mailroom::didcomm::keys::KeyPair;
use mailroom::didcomm::message::new_id;
use mailroom::node::RunningNode;
use serde_json::{json, Value};
use standin::{Hit, Reply, StandIn};
use std::time::{Duration, Instant};

const FCM: &str = "push-notifications-fcm";
const APNS: &str = "push-notifications-apns";

async fn set_device(a: &Agent, family: &str, token: Value, platform: Option<&str>) -> Value {
    let mut m = json!({
        "@type": format!("https://didcomm.org/{family}/1.0/set-device-info"),
        "@id": new_id(),
        "device_token": token,
        "~transport": { "return_route": "all" },
    });
    if family == FCM {
        m["device_platform"] = json!(platform);
    }
    a.request(&m).await.unwrap().expect("a reply to set-device-info")
}

async fn get_device(a: &Agent, family: &str) -> Value {
    a.request(&json!({
        "@type": format!("https://didcomm.org/{family}/1.0/get-device-info"),
        "@id": new_id(),
        "~transport": { "return_route": "all" },
    }))
    .await
    .unwrap()
    .expect("a reply to get-device-info")
}

async fn forward(n: &RunningNode, a: &Agent, k: &KeyPair, text: &str) {
    let routing = a.grant.as_ref().unwrap().routing_keys.clone();
    let status = Sender::new()
        .forward(&n.public_url(), &basic_message(text), &k.verkey(), &routing)
        .await
        .unwrap();
    assert_eq!(status, 202, "forward accepted");
}

/// Forwards `texts` with at most 8 in flight, round-robin over `nodes`. The envelopes are
/// packed first, so the burst is as fast as the nodes take it.
async fn forward_many(nodes: &[&RunningNode], a: &Agent, k: &KeyPair, texts: &[String]) {
    let urls: Vec<String> = nodes.iter().map(|n| n.public_url()).collect();
    forward_many_to(&urls, a, k, texts).await
}

/// [`forward_many`] to public URLs (nodes, or a load balancer in front of them).
async fn forward_many_to(urls: &[String], a: &Agent, k: &KeyPair, texts: &[String]) {
    use futures_util::StreamExt;
    let routing = a.grant.as_ref().unwrap().routing_keys.clone();
    let sender = Sender::new();
    let envs: Vec<Vec<u8>> = texts
        .iter()
        .map(|t| {
            sender
                .forward_envelope(&basic_message(t), &k.verkey(), &routing)
                .unwrap()
        })
        .collect();
    let statuses = futures_util::stream::iter(envs.into_iter().enumerate())
        .map(|(i, env)| {
            let url = urls[i % urls.len()].clone();
            async move { mailroom::client::post(&url, env, WAIT).await.unwrap().0 }
        })
        .buffer_unordered(8)
        .collect::<Vec<u16>>()
        .await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
}

async fn metric(n: &RunningNode, name: &str) -> f64 {
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `metric` summed over nodes.
async fn metric_sum(nodes: &[&RunningNode], name: &str) -> f64 {
    let mut sum = 0.0;
    for n in nodes {
        sum += metric(n, name).await;
    }
    sum
}

async fn wait_hits(si: &StandIn, kind: &str, n: usize) -> Vec<Hit> {
    eventually(&format!("{n} {kind} request(s) at the stand-in"), || async {
        let h = si.state.hits(kind);
        (h.len() >= n).then_some(h)
    })
    .await
}

fn assert_clean(hits: &[Hit]) {
    for h in hits {
        assert!(h.problems.is_empty(), "{} {}: {:?}", h.kind, h.path, h.problems);
    }
}

async fn push_node(
    si: &StandIn,
    min_interval: u64,
    projects: &[&str],
    webhook: bool,
) -> (tempfile::TempDir, RunningNode, Agent, KeyPair) {
    let pc = si.push_config(min_interval, projects, webhook);
    node_with_wallet(Strategy::QueueAndLiveModeDelivery, move |c| c.push = Some(pc)).await
}

/// The whole FCM path: registration over DIDComm (ack, device-info, admin view redacted),
/// the RS256 grant verified against the service account's public key, the message's shape,
/// the access token reused, and a burst folded into the trailing push.
#[actix_rt::test]
async fn fcm_registration_grant_and_message() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 60, &["proj-a"], false).await;
    let token = "fcm-token-0123456789-abcdefghijklmnopqrstuvwxyz";

    let ack = set_device(&a, FCM, json!(token), Some("ios")).await;
    assert_eq!(
        ack["@type"], "https://didcomm.org/push-notifications-fcm/1.0/ack",
        "{ack}"
    );
    let info = get_device(&a, FCM).await;
    assert_eq!(type_name(&info), "device-info", "{info}");
    assert_eq!(info["device_token"], token);
    assert_eq!(info["device_platform"], "ios");
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    let shown = conns["connections"][0]["push"].clone();
    assert_eq!(shown["service"], "fcm");
    assert!(
        !shown.to_string().contains(token),
        "the admin API shows the token redacted: {shown}"
    );

    forward(&n, &a, &k, "first").await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_clean(&si.state.hits("token"));
    assert_eq!(si.state.hits("token").len(), 1);
    let h = &hits[0];
    assert_eq!(h.path, "/v1/projects/proj-a/messages:send");
    let m = &h.body["message"];
    assert_eq!(m["token"], token);
    assert_eq!(m["data"]["message_count"], "1");
    assert_eq!(m["notification"]["title"], "New message");
    assert_eq!(m["android"]["priority"], "high");
    // An iOS token through FCM carries APNs headers.
    assert_eq!(m["apns"]["headers"]["apns-push-type"], "alert");
    assert!(m["apns"]["headers"]["apns-collapse-id"].is_string());

    // A burst inside the window: every event folded into the trailing push, none sent now.
    let texts: Vec<String> = (0..10).map(|i| format!("b{i}")).collect();
    forward_many(&[&n], &a, &k, &texts).await;
    eventually("10 events coalesced", || async {
        (metric(&n, "mailroom_push_coalesced_total").await >= 10.0).then_some(())
    })
    .await;
    assert_eq!(si.state.hits("fcm:").len(), 1, "one push per window");
    // Counted once the provider's answer is read, which may come after its request was seen.
    eventually("the first push counted", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 1.0).then_some(())
    })
    .await;
    let status = get_json(&format!("{}/status", n.admin_url())).await;
    assert_eq!(status["push"]["enabled"], true, "{status}");
    assert_eq!(status["push"]["sent"]["fcm"], 1);
    assert_eq!(status["push"]["coalesced"], 10);

    // Unregister with "" (BC Wallet): get-device-info now says not registered.
    let ack = set_device(&a, FCM, json!(""), None).await;
    assert_eq!(type_name(&ack), "ack");
    let info = get_device(&a, FCM).await;
    assert_eq!(
        info["description"]["code"], "not-registered-for-push-notifications",
        "{info}"
    );
}

/// An offline wallet and a burst of forwards: one push at once and one trailing push at the
/// window's end that counts every message; nothing more.
#[actix_rt::test]
async fn burst_gives_one_push_now_and_one_trailing() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 4, &["proj-a"], false).await;
    set_device(&a, FCM, json!("burst-token"), Some("android")).await;
    let started = Instant::now();
    let texts: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    forward_many(&[&n], &a, &k, &texts).await;
    let burst = started.elapsed();
    // Whatever the timing, the last message is not left without a wake-up: some push counts
    // all 30.
    // Both pushes awaited: on a slow box the one sent now may already count all 30.
    let hits = eventually("a push that counts every message, and a trailing one", || async {
        let h = si.state.hits("fcm:");
        (h.len() >= 2 && h.iter().any(|h| h.body["message"]["data"]["message_count"] == "30")).then_some(h)
    })
    .await;
    assert_clean(&hits);
    assert!(hits.len() >= 2, "one push now, the last message in a trailing one");
    let window = Duration::from_secs(4);
    // From the burst's start: the first push may reach the stand-in late (token grant).
    assert!(
        hits[1].at >= started + window - Duration::from_millis(50),
        "the trailing push waits for the window"
    );
    // The window runs from the node's first event, later than `started`, and an event is
    // recorded after its forward was answered: only a burst well inside the window is sure
    // to have been folded whole.
    if burst < window / 2 {
        assert_eq!(
            hits[1].body["message"]["data"]["message_count"], "30",
            "the trailing push counts every message"
        );
        assert_eq!(
            metric(&n, "mailroom_push_coalesced_total").await,
            29.0,
            "29 of 30 events folded into the trailing push"
        );
        // Nothing else is scheduled: no more events, and the window closed.
        eventually("the trailing push counted", || async {
            (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 2.0).then_some(())
        })
        .await;
        tokio::time::sleep(window + Duration::from_millis(500)).await;
        assert_eq!(si.state.hits("fcm:").len(), 2, "one push now, one trailing, no more");
    } else {
        // A slow machine stretched the burst over several windows: one push per window at most
        // (and one more for events recorded after the window the test's clock put them in).
        tokio::time::sleep(window + Duration::from_millis(500)).await;
        let max = 3 + burst.as_millis() / window.as_millis();
        assert!(si.state.hits("fcm:").len() as u128 <= max);
    }
}

/// 429 with Retry-After, then 500, then 200: retried with backoff honouring Retry-After, the
/// cached access token reused.
#[actix_rt::test]
async fn retries_honour_retry_after_then_succeed() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("retry-token"), Some("android")).await;
    si.state.script(
        "fcm:proj-a",
        vec![
            Reply::new(429, json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"errorCode": "QUOTA_EXCEEDED"}]}}))
                .retry_after("1"),
            Reply::new(500, json!({"error": {"code": 500, "status": "INTERNAL"}})),
        ],
    );
    forward(&n, &a, &k, "x").await;
    let hits = wait_hits(&si, "fcm:", 3).await;
    assert_clean(&hits);
    assert_eq!((hits[0].status, hits[1].status, hits[2].status), (429, 500, 200));
    assert!(
        hits[1].at.duration_since(hits[0].at) >= Duration::from_millis(950),
        "Retry-After: 1 honoured ({:?})",
        hits[1].at.duration_since(hits[0].at)
    );
    assert_eq!(si.state.hits("token").len(), 1, "one access token for the three tries");
    eventually("sent counted", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"retry\"}").await,
        2.0
    );
}

/// `[push]` at `si` (a 60 s window, the webhook if `webhook`) with one try of 1 s per push, and
/// the claim that gives: 1 try × 4 requests (grant, send, and both again after a 401) × 1 s +
/// 5 s = 9 s.
fn one_try(si: &StandIn, webhook: bool) -> (mailroom::push::PushConfig, Duration) {
    let mut pc = si.push_config(60, &["proj-a"], webhook);
    pc.max_attempts = 1;
    pc.timeout_ms = 1000;
    let claim = mailroom::push::claim_length(&pc.load().unwrap());
    assert_eq!(claim, Duration::from_secs(9));
    (pc, claim)
}

/// A push the provider keeps failing (503 on its only try) is not given up: its claim is left
/// to run out and a poll takes the push again then, and sends it. Before, out of tries, the
/// claim was ended and the wallet woken by nothing until its next message. The webhook, which
/// took the push the first time, gets it again with the same `event_id` (its receiver drops
/// the repeat).
#[actix_rt::test]
async fn a_push_the_provider_kept_failing_is_sent_again_once_its_claim_ran_out() {
    let si = StandIn::start();
    let (pc, claim) = one_try(&si, true);
    si.state.script(
        "fcm:proj-a",
        vec![Reply::new(
            503,
            json!({"error": {"code": 503, "status": "UNAVAILABLE"}}),
        )],
    );
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "kept-failing").await;
    let sent = Instant::now();
    forward(&n, &a, &k, "x").await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!((hits[0].status, hits[1].status), (503, 200));
    assert!(
        hits[1].at.duration_since(sent) >= claim - Duration::from_secs(1),
        "taken again {:?} after the forward: before its claim ran out",
        hits[1].at.duration_since(sent)
    );
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    let hooks = wait_hits(&si, "hook", 2).await;
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert!(hooks[0].body["event_id"].is_string(), "{:?}", hooks[0].body);
    assert_eq!(
        hooks[0].body["event_id"], hooks[1].body["event_id"],
        "the push taken again is the same push"
    );
    let results = |r: &'static str| {
        let n = &n;
        async move { metric(n, &format!("mailroom_push_total{{provider=\"fcm\",result=\"{r}\"}}")).await }
    };
    assert_eq!(results("gave_up").await, 1.0);
    eventually("sent counted", || async {
        (results("sent").await == 1.0).then_some(())
    })
    .await;
}

/// The webhook gets every push event, whatever the provider. One the webhook gave up on (its
/// only try answered 503) while FCM took the push was lost: the provider's success ended the
/// push. Now the node owes it to the webhook and sends it again a claim length later, with
/// the same event id; FCM is not asked again.
#[actix_rt::test]
async fn the_webhook_gets_an_event_it_missed_while_the_provider_took_the_push() {
    let si = StandIn::start();
    let (pc, claim) = one_try(&si, true);
    si.state.script("hook", vec![Reply::new(503, json!({}))]);
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "webhook-missed").await;
    let sent = Instant::now();
    forward(&n, &a, &k, "x").await;
    let hooks = wait_hits(&si, "hook", 2).await;
    assert_eq!((hooks[0].status, hooks[1].status), (503, 200));
    assert_eq!(
        hooks[0].body["event_id"], hooks[1].body["event_id"],
        "the push taken again is the same push"
    );
    assert!(
        hooks[1].at.duration_since(sent) >= claim - Duration::from_secs(1),
        "sent again {:?} after the forward: before a claim length",
        hooks[1].at.duration_since(sent)
    );
    let fcm = si.state.hits("fcm:");
    assert_clean(&fcm);
    assert_eq!(fcm.len(), 1, "the wallet is pushed once: {fcm:?}");
}

/// The `n`th request of `kind` at the stand-in, waited for until `deadline`.
async fn wait_hits_until(si: &StandIn, kind: &str, n: usize, deadline: Instant) -> Vec<Hit> {
    loop {
        let hits = si.state.hits(kind);
        if hits.len() >= n {
            return hits;
        }
        assert!(Instant::now() < deadline, "{n} {kind} request(s) awaited: {hits:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The webhook sends its answer's head and never its body while FCM takes the push: the
/// webhook's request ends at `timeout_ms` as one unanswered does, the event is owed to the
/// webhook (sent again a claim length later, with the same id), and the wallet is pushed once.
/// Before, awc's timeout ended at the head and the body was waited for without end: the push
/// was cut off at its budget as unsent, its claim ran out and was taken again, and the wallet
/// was pushed through FCM again every claim length.
#[actix_rt::test]
async fn a_webhook_that_never_sends_its_answers_body_does_not_push_the_wallet_again() {
    let si = StandIn::start();
    let (pc, claim) = one_try(&si, true);
    si.state.script("hook", vec![Reply::new(200, json!({})).stalled_body()]);
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "webhook-stalled").await;
    let sent = Instant::now();
    forward(&n, &a, &k, "x").await;
    let hooks = wait_hits_until(&si, "hook", 2, sent + claim + WAIT).await;
    assert_clean(&hooks);
    assert_eq!(
        hooks[0].body["event_id"], hooks[1].body["event_id"],
        "the webhook gets the same push again"
    );
    assert!(
        hooks[1].at.duration_since(sent) >= claim - Duration::from_secs(1),
        "sent again {:?} after the forward: before a claim length",
        hooks[1].at.duration_since(sent)
    );
    // A push taken again would have asked FCM beside the webhook: give it room to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fcm = si.state.hits("fcm:");
    assert_clean(&fcm);
    assert_eq!(fcm.len(), 1, "the wallet is pushed once: {fcm:?}");
    assert_eq!(si.state.hits("hook").len(), 2);
    assert_eq!(
        metric(&n, "mailroom_push_total{provider=\"webhook\",result=\"gave_up\"}").await,
        1.0,
        "the stalled answer ended the webhook's only try"
    );
}

/// Without a window (`min_interval_secs = 0`) and with one send slot, FCM sends the head of the
/// first push's answer and never its body: the request ends at `timeout_ms` and the push is
/// tried again, and the next wallet's push goes out. Before, the first push waited for the body
/// without end, holding the node's only send slot: no push of the node went out again.
#[actix_rt::test]
async fn a_provider_that_never_sends_its_answers_body_does_not_hold_the_send_slot() {
    let si = StandIn::start();
    si.state.script(
        "fcm:proj-a",
        vec![Reply::new(200, json!({"name": "projects/p/messages/0"})).stalled_body()],
    );
    let mut pc = si.push_config(0, &["proj-a"], false);
    pc.max_in_flight = 1;
    pc.timeout_ms = 1000;
    pc.max_attempts = 2;
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, ka, _) = registered_wallet(&n, "stalled-first").await;
    let (b, kb, _) = registered_wallet(&n, "pushed-next").await;
    forward(&n, &a, &ka, "a").await;
    eventually("the first push's answer stalled at the stand-in", || async {
        si.state.arrived.lock().iter().any(|k| k == "fcm:proj-a").then_some(())
    })
    .await;
    forward(&n, &b, &kb, "b").await;
    let hits = eventually("the stalled push tried again and the next wallet pushed", || async {
        let hits = si.state.hits("fcm:");
        let of = |t: &str| hits.iter().filter(|h| h.body["message"]["token"] == t).count();
        (of("stalled-first") >= 2 && of("pushed-next") >= 1).then_some(hits)
    })
    .await;
    assert_clean(&hits);
    eventually("both pushes counted sent", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 2.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"retry\"}").await,
        1.0,
        "the stalled answer retried once"
    );
}

/// A push whose access token FCM refuses (401: a token revoked before its expiry) takes four
/// requests: the grant, the send answered 401, a new grant, the send again. With slow
/// endpoints (each answers after 3.5 s, `timeout_ms = 6000`, one try) that is about 14 s,
/// within a budget that counts four requests per FCM project (`push_budget`: 1 try x 4
/// requests x 6 s = 24 s; claim 29 s). Before, the budget counted two (1 x 2 x 6 s = 12 s;
/// claim 17 s): the push was cut off during its second send (from 10.5 s), and the wallet was
/// pushed only once its claim had run out and the push was taken again (a third send). Each
/// request has 2.5 s to spare before its timeout, the four 10 s before the budget's end.
#[actix_rt::test]
async fn a_push_sent_again_after_a_401_fits_its_budget() {
    let si = StandIn::start();
    let slow = Duration::from_millis(3500);
    si.state
        .script("token", vec![Reply::new(200, json!({})).delayed(slow); 2]);
    si.state.script(
        "fcm:proj-a",
        vec![
            Reply::new(401, json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}})).delayed(slow),
            Reply::new(200, json!({"name": "projects/p/messages/0"})).delayed(slow),
        ],
    );
    let mut pc = si.push_config(60, &["proj-a"], false);
    pc.max_attempts = 1;
    pc.timeout_ms = 6000;
    let claim = mailroom::push::claim_length(&pc.load().unwrap());
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "revoked-access-token").await;
    let sent = Instant::now();
    forward(&n, &a, &k, "x").await;
    let deadline = sent + claim + WAIT;
    loop {
        if metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the push was never sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = sent.elapsed();
    let arrived = |kind: &str| si.state.arrived.lock().iter().filter(|k| *k == kind).count();
    assert_eq!(
        (arrived("token"), arrived("fcm:proj-a")),
        (2, 2),
        "two grants and two sends, no push taken again ({took:?})"
    );
    assert!(
        took < claim - Duration::from_secs(1),
        "sent {took:?} after the forward: not before its claim ({claim:?}) ran out"
    );
    let hits = si.state.hits("fcm:");
    assert_clean(&hits);
    assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), [401, 200]);
    assert_eq!(
        metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"gave_up\"}").await,
        0.0
    );
}

/// A provider's `Retry-After` longer than the node retries (FCM's 429 for a spent quota) is
/// honoured across the push's claims: the push is taken again each time its claim runs out
/// (9 s here), and asks FCM nothing until the 14 s it was told have passed. Before, each
/// claim asked again: for an hour's `Retry-After`, ten requests per offline wallet.
#[actix_rt::test]
async fn a_long_retry_after_holds_the_push_across_its_claims() {
    let si = StandIn::start();
    let (pc, _claim) = one_try(&si, false);
    // Past one claim (the retake at 9-10 s is held), short of two (sent at the 18-19 s retake).
    let told = Duration::from_secs(14);
    si.state.script(
        "fcm:proj-a",
        vec![Reply::new(
            429,
            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"errorCode": "QUOTA_EXCEEDED"}]}}),
        )
        .retry_after(&told.as_secs().to_string())],
    );
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "held-by-retry-after").await;
    forward(&n, &a, &k, "x").await;
    // Longer than `wait_hits` waits: the push goes out at the second retake, ~19 s in.
    let deadline = Instant::now() + Duration::from_secs(60);
    let hits = loop {
        let hits = si.state.hits("fcm:");
        if hits.len() >= 2 {
            break hits;
        }
        assert!(Instant::now() < deadline, "no second FCM request: {hits:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_clean(&hits);
    assert_eq!((hits[0].status, hits[1].status), (429, 200));
    let waited = hits[1].at.duration_since(hits[0].at);
    assert!(waited >= told, "asked again {waited:?} after a Retry-After of {told:?}");
    assert!(
        metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"held\"}").await >= 1.0,
        "a claim taken again inside the wait was held"
    );
}

/// A wallet pushed, then back (a live session) when its trailing push comes due, then gone
/// again: the trailing push sends nothing and does not count as a push, so the next message
/// wakes the wallet at once. Before, the window counted it, and that message waited for the
/// window's end (8 s here; a minute by default).
#[actix_rt::test]
async fn a_trailing_push_that_finds_the_wallet_back_does_not_delay_the_next_one() {
    use std::sync::atomic::Ordering::SeqCst;
    const WINDOW: Duration = Duration::from_secs(8);
    let si = StandIn::start();
    let pc = si.push_config(WINDOW.as_secs(), &["proj-a"], false);
    let (_dir, n, store) = EventAnswerLost::node(pc, false).await;
    let (a, k, _) = registered_wallet(&n, "back-and-gone").await;
    forward(&n, &a, &k, "one").await;
    wait_hits(&si, "fcm:", 1).await;
    // Folded into the trailing push, due a window after the first.
    forward(&n, &a, &k, "two").await;
    eventually("the first push ended", || async {
        (store.claims_ended.load(SeqCst) >= 1).then_some(())
    })
    .await;
    let mut ws = live_socket(&a, &n).await;
    let mut got = 0;
    while got < 2 {
        got += receive_and_ack(&a, &mut ws).await;
    }
    // The trailing push comes due while the wallet is here: it ends, sending nothing.
    eventually("the trailing push ended", || async {
        (store.claims_ended.load(SeqCst) >= 2).then_some(())
    })
    .await;
    assert_eq!(si.state.hits("fcm:").len(), 1, "no push while the wallet was here");
    ws.close().await;
    eventually("session gone", || async {
        let v = get_json(&format!("{}/status", n.admin_url())).await;
        (v["sessions"] == 0).then_some(())
    })
    .await;
    assert_eq!(si.state.hits("fcm:").len(), 1, "nothing pushed since the first");
    let sent = Instant::now();
    forward(&n, &a, &k, "three").await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    let waited = hits[1].at.duration_since(sent);
    assert!(
        waited < WINDOW / 2,
        "the next message's push came {waited:?} after it, not at once"
    );
}

/// FCM UNREGISTERED and APNs 410 make the mediator forget the token.
#[actix_rt::test]
async fn dead_tokens_are_forgotten() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("dead-fcm-token"), Some("android")).await;
    si.state.script("fcm:proj-a", vec![Reply::unregistered()]);
    forward(&n, &a, &k, "x").await;
    wait_hits(&si, "fcm:", 1).await;
    eventually("FCM token forgotten", || async {
        let info = get_device(&a, FCM).await;
        (info["description"]["code"] == "not-registered-for-push-notifications").then_some(())
    })
    .await;

    set_device(&a, APNS, json!("dead-apns-token"), None).await;
    si.state.script(
        "apns",
        vec![Reply::new(410, json!({"reason": "Unregistered", "timestamp": 1}))],
    );
    forward(&n, &a, &k, "y").await;
    let hits = wait_hits(&si, "apns", 1).await;
    assert_clean(&hits);
    eventually("APNs token forgotten", || async {
        let info = get_device(&a, APNS).await;
        (info["description"]["code"] == "not-registered-for-push-notifications").then_some(())
    })
    .await;
    // Counted just after the store forgot the token, which the check above may see first.
    eventually("two dropped tokens counted", || async {
        (metric(&n, "mailroom_push_dropped_tokens_total").await == 2.0).then_some(())
    })
    .await;
    // No device, no push.
    forward(&n, &a, &k, "z").await;
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    assert!(conns["connections"][0]["push"].is_null());
}

/// A grant Google refuses (`invalid_grant`: a clock ahead of Google's, a key being rotated) or
/// an APNs provider token Apple refuses (`InvalidProviderToken`, twice: the token reused and
/// refused again) is the node's trouble, not the wallet's: the push is tried again and goes
/// out once the credentials are taken. Before, the refusal ended the push for good and the
/// wallet slept until its next message.
#[actix_rt::test]
async fn refused_credentials_do_not_lose_the_wake_up() {
    let si = StandIn::start();
    si.state.script(
        "token",
        vec![Reply::new(
            400,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."}),
        )],
    );
    let refused = || Reply::new(403, json!({"reason": "InvalidProviderToken"}));
    si.state.script("apns", vec![refused(), refused()]);
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    let (b, kb) = Agent::onboard(&invitation(&n).await).await.unwrap();
    set_device(&a, FCM, json!("grant-refused-token"), Some("android")).await;
    set_device(&b, APNS, json!("a1b2c3d4e5f6"), None).await;
    forward(&n, &a, &k, "x").await;
    forward(&n, &b, &kb, "y").await;

    let fcm = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&fcm);
    let grants = si.state.hits("token");
    assert_eq!(
        grants.iter().map(|h| h.status).collect::<Vec<_>>(),
        [400, 200],
        "the refused grant asked again"
    );
    assert_clean(&grants);
    let apns = wait_hits(&si, "apns", 3).await;
    assert_clean(&apns);
    assert_eq!(apns.iter().map(|h| h.status).collect::<Vec<_>>(), [403, 403, 200]);
    // Refused, the provider token is not tried again for a second (by this push or another).
    let waited = apns[2].at.duration_since(apns[1].at);
    assert!(
        waited >= mailroom::push::apns::REFUSED_KEPT - Duration::from_millis(50),
        "asked again {waited:?} after the refusal"
    );
    eventually("both pushes counted sent", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 1.0
            && metric(&n, "mailroom_push_total{provider=\"apns\",result=\"sent\"}").await == 1.0)
            .then_some(())
    })
    .await;
    for p in ["fcm", "apns"] {
        let failed = format!("mailroom_push_total{{provider=\"{p}\",result=\"failed\"}}");
        assert_eq!(metric(&n, &failed).await, 0.0, "{p}: no push given up for good");
    }
}

/// A send refused for the operator's setup (FCM: the service account lacks the role, or the
/// API is disabled, 403 PERMISSION_DENIED; APNs: a topic the key may not push to,
/// `TopicDisallowed`) is tried again, not given up for good: an operator who mends the setup
/// wakes the wallets queued meanwhile. Before, each such push ended for good, and its wallet
/// slept until its next message.
#[actix_rt::test]
async fn a_push_refused_for_the_operators_setup_is_tried_again() {
    let si = StandIn::start();
    si.state.script(
        "fcm:proj-a",
        vec![Reply::new(
            403,
            json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "The caller does not have permission"}}),
        )],
    );
    si.state
        .script("apns", vec![Reply::new(400, json!({"reason": "TopicDisallowed"}))]);
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    let (b, kb) = Agent::onboard(&invitation(&n).await).await.unwrap();
    set_device(&a, FCM, json!("setup-refused-token"), Some("android")).await;
    set_device(&b, APNS, json!("a1b2c3d4e5f6"), None).await;
    forward(&n, &a, &k, "x").await;
    forward(&n, &b, &kb, "y").await;
    for (kind, provider) in [("fcm:", "fcm"), ("apns", "apns")] {
        let hits = wait_hits(&si, kind, 2).await;
        assert_clean(&hits);
        assert_eq!(hits.iter().map(|h| h.status).collect::<Vec<_>>(), [hits[0].status, 200]);
        assert!(hits[0].status == 403 || hits[0].status == 400);
        let failed = format!("mailroom_push_total{{provider=\"{provider}\",result=\"failed\"}}");
        assert_eq!(metric(&n, &failed).await, 0.0, "{provider}: no push given up for good");
    }
}

/// A push that waits to be tried again (FCM answered 503, try again in 10 s) finds the wallet
/// back meanwhile (a live socket): it is dropped, not sent to a wallet that is awake. Before,
/// only the first try looked, and the retry pushed a wallet reading its mail.
#[actix_rt::test]
async fn a_push_retried_after_the_wallet_came_back_is_not_sent() {
    let si = StandIn::start();
    // Ten seconds for the wallet to come back on a loaded box, taken as a wait, not a give-up.
    let busy = Reply::new(503, json!({"error": {"status": "UNAVAILABLE"}})).retry_after("10");
    si.state.script("fcm:proj-a", vec![busy]);
    let mut pc = si.push_config(0, &["proj-a"], false);
    pc.retry_max_ms = 20_000;
    let (_d, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, move |c| c.push = Some(pc)).await;
    set_device(&a, FCM, json!("back-meanwhile-token"), Some("android")).await;
    forward(&n, &a, &k, "x").await;
    let first = wait_hits(&si, "fcm:", 1).await;
    assert_eq!(first[0].status, 503);
    let mut ws = live_socket_at(&a, &ws_url(&n)).await;
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&d), "delivery", "the wallet back: {d}");
    assert!(
        first[0].at.elapsed() < Duration::from_secs(10),
        "the wallet came back after the retry was due ({:?}): the test proves nothing",
        first[0].at.elapsed()
    );
    // The retry is due 10 s after the 503, a wait of its own beyond `eventually`'s.
    let deadline = first[0].at + Duration::from_secs(10) + WAIT;
    while metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"online\"}").await != 1.0 {
        assert!(Instant::now() < deadline, "no retry found the wallet back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(si.state.hits("fcm:").len(), 1, "no push to a wallet that is back");
}

/// Someone who learned a wallet's device token registers it on connections of their own and
/// forwards to each, and mail for the wallet arrives too: the device is pushed once a window
/// (`min_interval_secs`), not once per connection, and every connection's push still goes out,
/// each put off to a later window's end (not to its claim's, minutes away). Before, every
/// connection had a window of its own, and the phone was pushed as often as connections were
/// opened (and the provider's per-device limit then throttled the wallet's own wake-ups).
#[actix_rt::test]
async fn a_device_token_registered_by_many_connections_is_pushed_once_a_window() {
    const WINDOW: u64 = 3;
    let si = StandIn::start();
    let (_d, n, wallet, kw) = push_node(&si, WINDOW, &["proj-a"], false).await;
    let token = json!("the-wallets-device-token");
    set_device(&wallet, FCM, token.clone(), Some("android")).await;
    let mut others = Vec::new();
    for _ in 0..3 {
        let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
        set_device(&a, FCM, token.clone(), Some("android")).await;
        others.push((a, k));
    }
    for (a, k) in &others {
        forward(&n, a, k, "spam").await;
    }
    forward(&n, &wallet, &kw, "for the wallet").await;
    eventually("three pushes put off", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"device_pushed\"}").await >= 3.0).then_some(())
    })
    .await;
    // The device counts as pushed once its push is on its way: on a loaded box the request
    // may not have reached the stand-in yet (it asks for an access token first). The gaps
    // below show the device pushed once a window, whatever the first request's pace.
    wait_hits(&si, "fcm:", 1).await;
    // Each connection's push goes out in turn, a window apart.
    let hits = wait_hits(&si, "fcm:", 4).await;
    assert_clean(&hits);
    for pair in hits.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        assert!(
            gap >= Duration::from_millis(WINDOW * 1000 - 300),
            "pushed {gap:?} after the last: {:?}",
            hits.iter().map(|h| h.at.duration_since(hits[0].at)).collect::<Vec<_>>()
        );
    }
}

/// APNs over HTTP/2: the ES256 provider token verifies against the key's public half, the
/// headers are there, and the token is reused for the next push.
#[actix_rt::test]
async fn apns_over_http2_with_a_reused_provider_token() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    let ack = set_device(&a, APNS, json!("a1b2c3d4e5f6"), None).await;
    assert_eq!(
        ack["@type"], "https://didcomm.org/push-notifications-apns/1.0/ack",
        "{ack}"
    );
    let info = get_device(&a, APNS).await;
    assert_eq!(info["device_token"], "a1b2c3d4e5f6");
    forward(&n, &a, &k, "one").await;
    forward(&n, &a, &k, "two").await;
    let hits = wait_hits(&si, "apns", 2).await;
    assert_clean(&hits);
    assert!(hits.iter().all(|h| h.http2), "APNs is spoken over HTTP/2");
    assert_eq!(hits[0].path, "/3/device/a1b2c3d4e5f6");
    assert_eq!(hits[0].headers["apns-push-type"], "alert");
    assert_eq!(hits[0].headers["apns-collapse-id"], "mailroom");
    assert_eq!(
        hits[0].headers["authorization"], hits[1].headers["authorization"],
        "provider token reused"
    );
    assert!(
        si.state.hits("fcm:").is_empty(),
        "an APNs registration is not pushed through FCM"
    );
}

/// Several Firebase projects: a token of the second one is refused by the first
/// (SENDER_ID_MISMATCH), sent by the second, which is then remembered. The webhook gets every
/// push event, signed.
#[actix_rt::test]
async fn several_projects_and_the_webhook() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a", "proj-b"], true).await;
    set_device(&a, FCM, json!("token-of-b"), Some("android")).await;
    si.state.script("fcm:proj-a", vec![Reply::sender_id_mismatch()]);
    // The webhook's first try fails: tried again, with the same event id.
    si.state.script("hook", vec![Reply::new(503, json!({}))]);
    forward(&n, &a, &k, "x").await;
    let b = wait_hits(&si, "fcm:proj-b", 1).await;
    assert_clean(&b);
    assert_eq!(si.state.hits("fcm:proj-a").len(), 1);
    forward(&n, &a, &k, "y").await;
    wait_hits(&si, "fcm:proj-b", 2).await;
    assert_eq!(
        si.state.hits("fcm:proj-a").len(),
        1,
        "the accepting project is remembered"
    );
    let hooks = wait_hits(&si, "hook", 3).await;
    assert_clean(&hooks);
    // Two pushes, the first tried twice: one id per push, the same on each try.
    let id_of = |h: &Hit| h.body["event_id"].as_str().expect("an event id").to_string();
    let failed = hooks.iter().find(|h| h.status == 503).expect("the failed try");
    let tries_of_first = hooks.iter().filter(|h| id_of(h) == id_of(failed)).count();
    assert_eq!(tries_of_first, 2, "{hooks:?}");
    let ids: std::collections::HashSet<String> = hooks.iter().map(id_of).collect();
    assert_eq!(ids.len(), 2, "{hooks:?}");
    let e = &hooks[0].body;
    assert_eq!(e["event"], "message_queued");
    assert_eq!(e["token"], "token-of-b");
    assert_eq!(e["service"], "fcm");
    assert_eq!(e["node"], "n1");
    assert!(e["connection_id"].is_string() && e["count"].is_u64());
}

/// Several Firebase projects, the first of which fails for reasons of its own (its service
/// account lacks the FCM role: 403 PERMISSION_DENIED, not a sender mismatch): the token is
/// still sent through the second. Before, the first project's failure ended the push, on
/// every node and every event, as no node had yet learnt which project the token is of.
#[actix_rt::test]
async fn a_failing_project_does_not_keep_the_others_from_a_token() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-broken", "proj-a"], false).await;
    set_device(&a, FCM, json!("token-of-a"), Some("android")).await;
    let denied = Reply::new(
        403,
        json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
            "message": "Permission 'cloudmessaging.messages.create' denied on resource"}}),
    );
    si.state.script("fcm:proj-broken", vec![denied]);
    forward(&n, &a, &k, "x").await;
    let sent = wait_hits(&si, "fcm:proj-a", 1).await;
    assert_clean(&sent);
    assert_eq!(sent[0].status, 200);
    assert_eq!(si.state.hits("fcm:proj-broken").len(), 1);
}

/// The same failing project, and the other one calls the token dead: the token is kept (it
/// may be the failing project's; forgotten, its wallet would be unreachable until it
/// registers again, after the operator mended the project).
#[actix_rt::test]
async fn a_token_is_not_forgotten_while_a_project_that_may_own_it_fails() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-broken", "proj-a"], false).await;
    set_device(&a, FCM, json!("token-of-broken"), Some("android")).await;
    let denied = Reply::new(403, json!({"error": {"code": 403, "status": "PERMISSION_DENIED"}}));
    si.state.script("fcm:proj-broken", vec![denied.clone(); 10]);
    si.state.script("fcm:proj-a", vec![Reply::unregistered(); 10]);
    forward(&n, &a, &k, "x").await;
    // Refused for the failing project's setup: tried again (both projects asked each time).
    eventually("the push tried again", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"retry\"}").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(metric(&n, "mailroom_push_dropped_tokens_total").await, 0.0);
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    let registered = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| !c["push"].is_null() && c["push"] != json!({}));
    assert!(registered, "the registration is kept: {conns}");
}

/// Reads one delivery on a live socket and acknowledges it there.
async fn receive_and_ack(a: &Agent, ws: &mut WsClient) -> usize {
    loop {
        let d = ws_next_message(a, ws).await;
        if type_name(&d) != "delivery" {
            continue;
        }
        let ids = delivery_ids(a, &d);
        let n = ids.len();
        ws.send_envelope(
            a.pack(&pickup("messages-received", json!({ "message_id_list": ids })))
                .unwrap(),
            true,
        )
        .await
        .unwrap();
        return n;
    }
}

/// A wallet with a live WebSocket session gets its messages there and no push; once the
/// socket closes, pushes resume.
#[actix_rt::test]
async fn a_live_session_means_no_push() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("live-token"), Some("android")).await;
    let mut ws = live_socket(&a, &n).await;
    for i in 0..5 {
        forward(&n, &a, &k, &format!("live-{i}")).await;
        assert_eq!(receive_and_ack(&a, &mut ws).await, 1);
    }
    eventually("queue empty", || async { (queue_depth(&n).await == 0).then_some(()) }).await;
    ws.close().await;
    eventually("session gone", || async {
        let v = get_json(&format!("{}/status", n.admin_url())).await;
        (v["sessions"] == 0).then_some(())
    })
    .await;
    forward(&n, &a, &k, "offline").await;
    // Every event goes through the worker in order, with no coalescing window: a push for one
    // of the five live forwards would have reached the stand-in before this one.
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits.len(), 1, "no push while the session was live");
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
}

/// Two nodes on PostgreSQL: the wallet's socket on n1, forwards to n2 -> no push from
/// anyone; the socket closes -> n2 pushes, once.
#[actix_rt::test]
async fn cluster_session_on_another_node_means_no_push() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 100);
    cfg.push = Some(si.push_config(0, &["proj-a"], true));
    let store = open_shared_store(&cfg).await;
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    let n2 = start_node(&cfg, "n2", it.next().unwrap(), &store, None);
    for (x, y) in [(&n1, "n2"), (&n2, "n1")] {
        eventually("link up", || async { peer_connected(x, y).await.then_some(()) }).await;
    }
    let inv = invitation(&n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    set_device(&a, FCM, json!("cluster-token"), Some("android")).await;
    let conn = a_connection_id(&n1).await;
    let mut ws = live_socket(&a, &n1).await;
    wait_owner(&[&n2], &conn, "n1").await;
    for i in 0..5 {
        forward(&n2, &a, &k, &format!("via-n2-{i}")).await;
        assert_eq!(receive_and_ack(&a, &mut ws).await, 1);
    }
    // Every delivery acknowledged: closing the socket leaves nothing to hand back (a session
    // that ends with unacknowledged deliveries counts as queued again, and would push).
    eventually("queue empty", || async { (queue_depth(&n1).await == 0).then_some(()) }).await;
    ws.close().await;
    eventually("n2 sees no owner", || async {
        owner_seen_by(&n2, &conn).await.is_none().then_some(())
    })
    .await;
    // n1 is done with the closed session (its socket's slot goes last): a forward it found
    // pending then would be one more event, and with no window (here) one more push.
    eventually("n1 done with the session", || async {
        let st = get_json(&format!("{}/status", n1.admin_url())).await;
        (st["open_sockets"] == 0).then_some(())
    })
    .await;
    forward(&n2, &a, &k, "offline").await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    let hooks = wait_hits(&si, "hook", 1).await;
    assert_eq!(hits.len(), 1, "no push while the session was live on n1");
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].body["node"], "n2", "the node that accepted the forward pushes");
    assert_eq!(metric(&n1, "mailroom_push_total").await, 0.0, "n1 sent nothing");

    // The registration goes with its connection (issue 11's DELETE removes the row).
    let (pg, task) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    actix_rt::spawn(task);
    let count = "SELECT count(*) FROM mailroom_devices WHERE conn_id = $1";
    assert_eq!(pg.query_one(count, &[&conn]).await.unwrap().get::<_, i64>(0), 1);
    pg.execute("DELETE FROM mailroom_connections WHERE id = $1", &[&conn])
        .await
        .unwrap();
    assert_eq!(pg.query_one(count, &[&conn]).await.unwrap().get::<_, i64>(0), 0);
}

/// A peer queued mail while its directory still named n1 as the wallet's (n1's `Disown` not
/// applied there yet), so it notified n1 and pushed nobody; on n1 the session is gone. The
/// notification pushes the wallet from n1. The test speaks as the peer, n2, over the real
/// authenticated link; the forward's own push (no session anywhere) comes first.
#[actix_rt::test]
async fn a_notification_finding_no_session_pushes() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 100);
    cfg.push = Some(si.push_config(0, &["proj-a"], false));
    // The test answers no heartbeats for n2: n1 keeps its link up for the whole test.
    cfg.cluster.failure_timeout_ms = 60_000;
    let store = open_shared_store(&cfg).await;
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    drop(it);
    let inv = invitation(&n1).await;
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    set_device(&a, FCM, json!("relay-token"), Some("android")).await;
    let conn = a_connection_id(&n1).await;
    forward(&n1, &a, &k, "queued").await;
    wait_hits(&si, "fcm:", 1).await;

    let mut n2 = link_as_peer(&cfg, &n1, "n2").await;
    n2.writer.send(&Frame::Queued { conn }).await.unwrap();
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
}

fn percentiles(mut lat: Vec<f64>) -> (f64, f64, f64) {
    lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.99), lat[lat.len() - 1])
}

/// Forwards one at a time through `nodes` (round-robin) and measures forward 2xx -> the
/// provider stand-in receiving the push.
async fn measure(si: &StandIn, nodes: &[&RunningNode], a: &Agent, k: &KeyPair, n: usize) -> Vec<f64> {
    let base = si.state.hits("fcm:").len();
    let mut lat = Vec::new();
    for i in 0..n {
        forward(nodes[i % nodes.len()], a, k, &format!("l{i}")).await;
        let answered = Instant::now();
        let h = wait_hits(si, "fcm:", base + i + 1).await;
        lat.push(h[base + i].at.saturating_duration_since(answered).as_secs_f64() * 1000.0);
    }
    lat
}

/// Forward 2xx -> the provider receiving the push (no coalescing window, so every forward
/// pushes): one node on sled, and two PostgreSQL nodes with forwards landing on both. p50/p99.
#[actix_rt::test]
async fn push_latency_figures() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("latency-token"), Some("android")).await;
    let (p50, p99, max) = percentiles(measure(&si, &[&n], &a, &k, 40).await);
    println!("push latency, one node (sled), forward 2xx -> FCM stand-in: n=40 p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");

    let (_db, n1, n2, a, k) = two_nodes_and_wallet(&si, 0, "latency-token-2").await;
    let (p50, p99, max) = percentiles(measure(&si, &[&n1, &n2], &a, &k, 40).await);
    println!(
        "push latency, 2 nodes (PostgreSQL), forwards on both: n=40 p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
}

/// A session that ends with delivered but unacknowledged messages hands them back to the
/// queue: that counts as queued, and the wallet is pushed.
#[actix_rt::test]
async fn unacknowledged_deliveries_on_close_wake_the_wallet() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("close-token"), Some("android")).await;
    let mut ws = live_socket(&a, &n).await;
    forward(&n, &a, &k, "never-acked").await;
    loop {
        if type_name(&ws_next_message(&a, &mut ws).await) == "delivery" {
            break;
        }
    }
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
}

/// A socket that delivered A's queued mail (its own drain's lease, not a hand-off) and was then
/// rebound by B (a message of B's with return route) gives A's unacknowledged delivery back as
/// it closes, and A is pushed at once. Before, the release woke only B, the connection bound
/// at the end: A's message was pending again with nobody told until new mail came (the lease,
/// here two minutes, was not left to run out, so no reclaim pushed either).
#[actix_rt::test]
async fn a_socket_rebound_to_another_connection_wakes_the_one_it_left_as_it_closes() {
    let si = StandIn::start();
    let pc = si.push_config(0, &["proj-a"], false);
    let (_d, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, move |c| {
        c.push = Some(pc);
        c.delivery.lease_ms = 120_000;
    })
    .await;
    let (b, _) = Agent::onboard(&invitation(&n).await).await.unwrap();
    set_device(&a, FCM, json!("left-token"), Some("android")).await;
    forward(&n, &a, &k, "drained").await;
    wait_hits(&si, "fcm:", 1).await;
    let mut ws = live_socket(&a, &n).await;
    loop {
        if type_name(&ws_next_message(&a, &mut ws).await) == "delivery" {
            break;
        }
    }
    let ping = json!({"@type": "https://didcomm.org/trust_ping/1.0/ping", "@id": new_id(),
        "response_requested": true, "~transport": {"return_route": "all"}});
    let pong = ws_request(&b, &mut ws, &ping).await;
    assert_eq!(type_name(&pong), "ping_response", "on B's socket: {pong}");
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
}

/// A wallet that picked up over HTTP and went away before acknowledging hears of its mail
/// again: once the lease runs out, the messages go back to the queue and the wallet is pushed
/// (it holds no session, so nobody else would tell it). A message delivered
/// `RECLAIM_PUSHES` times and never acknowledged (one the wallet cannot take) pushes no more.
#[actix_rt::test]
async fn an_unacknowledged_pickup_whose_lease_runs_out_pushes_again() {
    let si = StandIn::start();
    let (_d, n, a) = wallet_with_one_unacknowledged_pickup(&si, 500).await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    // Picked up again and again, never acknowledged: a push after each of the first
    // RECLAIM_PUSHES deliveries, none after the next.
    let pushes = mailroom::session::RECLAIM_PUSHES as usize;
    for delivered in 2..=pushes + 1 {
        pick_up_one_unacknowledged(&a).await;
        if delivered <= pushes {
            wait_hits(&si, "fcm:", delivered + 1).await;
        }
    }
    eventually("the last lease taken back", || async {
        let v = get_json(&format!("{}/connections", n.admin_url())).await;
        let c = &v["connections"][0]["queue"];
        (c["pending"] == 1 && c["in_flight"] == 0).then_some(())
    })
    .await;
    // Two more passes of the sweep's reclaim: the one that took the lease back has handed its
    // wake-ups over (the passes run one after the other). Push events: the forward and one
    // per lease taken back while the message had been delivered at most RECLAIM_PUSHES times.
    let reclaims =
        || async { metric_line_sum(&n, "mailroom_store_seconds_count{", "op=\"reclaim_expired_leases\"").await };
    let seen = reclaims().await;
    eventually("two more reclaim passes", || async {
        (reclaims().await >= seen + 2.0).then_some(())
    })
    .await;
    assert_eq!(
        metric(&n, "mailroom_push_events_total").await,
        (1 + pushes) as f64,
        "no push for a message delivered {} times",
        pushes + 1
    );
    assert_eq!(si.state.hits("fcm:").len(), pushes + 1);
}

/// Revokes the mediation of the node's only connection, as the operator does.
async fn revoke_the_only_connection(n: &RunningNode) {
    let all = get_json(&format!("{}/connections", n.admin_url())).await;
    let id = all["connections"][0]["id"].as_str().expect("a connection").to_string();
    let res = common::client()
        .post(format!("{}/connections/{id}/mediation", n.admin_url()))
        .send_json(&json!({"state": "denied"}))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

/// Waits until `n` skipped `k` pushes of FCM wallets whose mediation was revoked.
async fn revoked_pushes_skipped(n: &RunningNode, k: f64) {
    eventually(&format!("{k} revoked push(es) skipped"), || async {
        (metric(n, "mailroom_push_total{provider=\"fcm\",result=\"revoked\"}").await >= k).then_some(())
    })
    .await;
}

/// A wallet whose mediation the operator revoked keeps its queue and its device (pickup
/// refuses it), but is not woken for that mail: not when an unacknowledged pickup's lease
/// runs out (an immediate push)...
#[actix_rt::test]
async fn a_revoked_wallet_is_not_pushed_when_its_lease_runs_out() {
    let si = StandIn::start();
    let (_d, n, _a) = wallet_with_one_unacknowledged_pickup(&si, 6000).await;
    revoke_the_only_connection(&n).await;
    revoked_pushes_skipped(&n, 1.0).await;
    assert_eq!(si.state.hits("fcm:").len(), 1, "only the push before the revocation");
}

/// ... nor by the trailing push of mail queued in its window before the revocation.
#[actix_rt::test]
async fn a_revoked_wallet_gets_no_trailing_push() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 8, &["proj-a"], false).await;
    set_device(&a, FCM, json!("revoked-trailing-token"), Some("android")).await;
    forward(&n, &a, &k, "pushed-now").await;
    wait_hits(&si, "fcm:", 1).await;
    let texts: Vec<String> = (0..3).map(|i| format!("trailing-{i}")).collect();
    forward_many(&[&n], &a, &k, &texts).await;
    eventually("3 events folded into the trailing push", || async {
        (metric(&n, "mailroom_push_coalesced_total").await >= 3.0).then_some(())
    })
    .await;
    revoke_the_only_connection(&n).await;
    revoked_pushes_skipped(&n, 1.0).await;
    assert_eq!(si.state.hits("fcm:").len(), 1, "only the push before the revocation");
}

/// The sum of the `/metrics` lines of `n` that start with `prefix` and hold `label`.
async fn metric_line_sum(n: &RunningNode, prefix: &str, label: &str) -> f64 {
    let text = get_status(&format!("{}/metrics", n.admin_url()), None).await.1;
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A node pushing at once (no window) with leases of `lease_ms`, and a wallet registered for
/// FCM that was pushed for one message and picked it up over HTTP without acknowledging it.
async fn wallet_with_one_unacknowledged_pickup(si: &StandIn, lease_ms: u64) -> (tempfile::TempDir, RunningNode, Agent) {
    let pc = si.push_config(0, &["proj-a"], false);
    let (d, n, a, k) = node_with_wallet(Strategy::QueueAndLiveModeDelivery, move |c| {
        c.push = Some(pc);
        c.delivery.lease_ms = lease_ms;
    })
    .await;
    set_device(&a, FCM, json!("pickup-token"), Some("android")).await;
    forward(&n, &a, &k, "picked-up-never-acked").await;
    wait_hits(si, "fcm:", 1).await;
    pick_up_one_unacknowledged(&a).await;
    (d, n, a)
}

/// A pickup 2.0 delivery-request over HTTP that gets one message, not acknowledged.
async fn pick_up_one_unacknowledged(a: &Agent) {
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .expect("a delivery");
    assert_eq!(delivery_ids(a, &d).len(), 1, "{d}");
}

/// Under `queue-only`, a socket that asked for its status with return route `all` (a Credo
/// wallet polling pickup 2.0) holds the wallet's session without delivering: a forward wakes
/// it and pushes nobody. Once it closes, the mail it never took pushes the wallet, once.
#[actix_rt::test]
async fn a_quiet_session_closing_with_mail_queued_pushes() {
    let si = StandIn::start();
    let pc = si.push_config(0, &["proj-a"], false);
    let (_d, n, a, k) = node_with_wallet(Strategy::QueueOnly, move |c| c.push = Some(pc)).await;
    set_device(&a, FCM, json!("quiet-token"), Some("android")).await;
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let st = ws_request(&a, &mut ws, &pickup("status-request", json!({}))).await;
    assert_eq!(type_name(&st), "status", "{st}");
    assert_eq!(st["message_count"], 0, "{st}");
    forward(&n, &a, &k, "while-polling").await;
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
    assert_eq!(queue_depth(&n).await, 1, "the quiet session took nothing");
}

/// Concurrent pushes share one access-token request; a token close to its expiry is renewed.
#[actix_rt::test]
async fn one_token_refresh_in_flight_and_renewal_before_expiry() {
    let si = StandIn::start();
    // Renewed 300 s before expiry: a 310 s token is good for ten seconds (room for the eight
    // pushes to start on a loaded box before it is due).
    *si.state.expires_in.lock() = 310;
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("token-refresh"), Some("android")).await;
    // Eight wallets, one message each: a wallet's own events fold while its push is under way.
    let mut wallets = Vec::new();
    for i in 0..7 {
        let (a, k, _) = registered_wallet(&n, &format!("token-refresh-{i}")).await;
        wallets.push((a, k));
    }
    wallets.push((a, k));
    let n = &n;
    futures_util::future::join_all(wallets.iter().map(|(a, k)| forward(n, a, k, "one"))).await;
    let (a, k) = wallets.pop().unwrap();
    let hits = wait_hits(&si, "fcm:", 8).await;
    assert_clean(&hits);
    assert_eq!(si.state.hits("token").len(), 1, "eight concurrent pushes, one grant");
    let first = si.state.hits("token")[0].at;
    // Two seconds past the ten: the node counts them from when it read the answer.
    eventually("the access token is due for renewal", || async {
        (first.elapsed() > Duration::from_millis(12_000)).then_some(())
    })
    .await;
    forward(n, &a, &k, "later").await;
    wait_hits(&si, "fcm:", 9).await;
    assert_eq!(si.state.hits("token").len(), 2, "renewed before it expires");
    assert_clean(&si.state.hits(""));
}

/// An access token granted for two minutes (less than the five the node renews ahead) is
/// used for the pushes after the first, not renewed for each: before, it was due at once.
#[actix_rt::test]
async fn a_short_lived_access_token_is_reused() {
    let si = StandIn::start();
    *si.state.expires_in.lock() = 120;
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, FCM, json!("short-lived-token"), Some("android")).await;
    let (b, kb, _) = registered_wallet(&n, "short-lived-token-2").await;
    forward(&n, &a, &k, "one").await;
    wait_hits(&si, "fcm:", 1).await;
    forward(&n, &b, &kb, "two").await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(si.state.hits("token").len(), 1, "one grant for both pushes");
}

/// While the token endpoint fails slowly (503 after 4.5 s), the pushes of five wallets waiting
/// for the project's access token are answered the failure of the one request under way,
/// instead of each making its own in turn behind the project's lock (five requests, 22.5 s).
/// A push that reaches the token after the failure stopped being kept (`TOKEN_FAILURE_KEPT`
/// after the answer) asks again: the delay leaves the five pushes 5.5 s from the first.
#[actix_rt::test]
async fn a_failing_token_endpoint_is_asked_once_for_the_pushes_waiting_on_it() {
    let si = StandIn::start();
    let slow_503 = Reply::new(503, json!({"error": "unavailable"})).delayed(Duration::from_millis(4500));
    si.state.script("token", vec![slow_503; 5]);
    let mut pc = si.push_config(0, &["proj-a"], false);
    pc.max_attempts = 1;
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let mut wallets = Vec::new();
    for i in 0..5 {
        wallets.push(registered_wallet(&n, &format!("token-down-{i}")).await);
    }
    let n = &n;
    futures_util::future::join_all(wallets.iter().map(|(a, k, _)| forward(n, a, k, "m"))).await;
    let grants = || si.state.arrived.lock().iter().filter(|k| *k == "token").count();
    // Or a second grant asked: a request each would take the five longer than the wait.
    eventually("five pushes given up", || async {
        (grants() > 1 || metric(n, "mailroom_push_total{provider=\"fcm\",result=\"gave_up\"}").await == 5.0)
            .then_some(())
    })
    .await;
    assert_eq!(grants(), 1);
}

/// `check-config` refuses a `[push]` section whose credentials are missing, unreadable or
/// malformed, with exit 64 and the reason, and never prints the secret.
#[test]
fn check_config_refuses_bad_push_credentials() {
    let si = StandIn::start();
    let dir = tempfile::tempdir().unwrap();
    let good_sa = si.service_account("proj-a");
    let bad_key_sa = dir.path().join("bad-key.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&good_sa).unwrap()).unwrap();
    v["private_key"] = json!(
        "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC-secret-bytes\n-----END PRIVATE KEY-----\n"
    );
    std::fs::write(&bad_key_sa, v.to_string()).unwrap();
    let not_json = dir.path().join("not-json.json");
    std::fs::write(&not_json, "{ \"private_key\": \"MIIsecret").unwrap();
    let bad_p8 = dir.path().join("bad.p8");
    std::fs::write(
        &bad_p8,
        "-----BEGIN PRIVATE KEY-----\nMIGTsecret\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    // EC keys in PKCS#8 that parse as such, and do not sign APNs' ES256 (before, refused by
    // every push, never at start).
    let p384_p8 = dir.path().join("p384.p8");
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let p384_pem = p384.serialize_pem();
    std::fs::write(&p384_p8, &p384_pem).unwrap();
    // An RSA PEM that parses (its DER is well formed) and signs no grant.
    let unsigning_sa = dir.path().join("unsigning-key.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&good_sa).unwrap()).unwrap();
    v["private_key"] = json!("-----BEGIN RSA PRIVATE KEY-----\nMAMCAQA=\n-----END RSA PRIVATE KEY-----\n");
    std::fs::write(&unsigning_sa, v.to_string()).unwrap();
    // PEM that decodes, holding no certificate TLS takes.
    let bad_ca = dir.path().join("bad-ca.pem");
    std::fs::write(
        &bad_ca,
        "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let head = "[[node]]\nid = 'n1'\nlisten = '127.0.0.1:0'\nadmin = '127.0.0.1:0'\n";
    let apns = |key: &std::path::Path| {
        format!("[push.apns]\nkey_file = {key:?}\nkey_id = 'ABC123DEFG'\nteam_id = 'DEF123GHIJ'\ntopic = 'org.example.wallet'\n")
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("[[push.fcm]]\nservice_account = {:?}\n", dir.path().join("missing.json")), "cannot read", "-"),
        (format!("[[push.fcm]]\nservice_account = {not_json:?}\n"), "not JSON", "MIIsecret"),
        (format!("[[push.fcm]]\nservice_account = {bad_key_sa:?}\n"), "not an RSA private key", "secret-bytes"),
        (apns(&bad_p8), "not a P-256 private key", "MIGTsecret"),
        (
            apns(&p384_p8),
            "push.apns.key_file: must be a P-256 key",
            p384_pem.lines().nth(1).unwrap(),
        ),
        (
            format!("[[push.fcm]]\nservice_account = {unsigning_sa:?}\n"),
            "push.fcm[0].service_account: `private_key` must be an RSA key of at least 2048 bits",
            "MAMCAQA",
        ),
        (
            "[push.webhook]\nurl = 'https://push.example.org/mailroom'\nsecret_env = 'MAILROOM_TEST_UNSET_PUSH_SECRET'\n".into(),
            "MAILROOM_TEST_UNSET_PUSH_SECRET is not set",
            "-",
        ),
        (
            "[push.webhook]\nurl = 'https://push.example.org/mailroom'\nsecret = 'tooshort'\n".into(),
            "at least 16",
            "tooshort",
        ),
        ("[push]\nmin_interval_secs = 5\n".into(), "names no provider", "-"),
        (
            format!("[push]\nca_file = {bad_ca:?}\n[[push.fcm]]\nservice_account = {good_sa:?}\n"),
            "push.ca_file",
            "-",
        ),
        ("[push]\nmin_interval = 5\n".into(), "unknown field", "-"),
        (
            format!("[[push.fcm]]\nservice_account = {good_sa:?}\nbase_url = 'ftp://x'\n"),
            "base_url",
            "-",
        ),
        // Values every push would then fail on (before, accepted: the providers refused each).
        (
            format!("{}alert_body = '{}'\n", apns(&si.apns_key_file), "x".repeat(5000)),
            "push.apns.alert_title and alert_body are 5000 bytes together",
            "-",
        ),
        (
            format!("{}collapse_id = '{}'\n", apns(&si.apns_key_file), "c".repeat(65)),
            "push.apns.collapse_id is 65 bytes long, at most 64",
            "-",
        ),
        (
            apns(&si.apns_key_file).replace("topic = 'org.example.wallet'", "topic = \"org.example\\nwallet\""),
            "push.apns.topic must be visible ASCII",
            "-",
        ),
        (
            format!("[[push.fcm]]\nservice_account = {good_sa:?}\nnotification_body = '{}'\n", "y".repeat(4000)),
            "push.fcm[0].notification_title and notification_body are 4000 bytes together",
            "-",
        ),
        (
            format!("[[push.fcm]]\nservice_account = {good_sa:?}\ncollapse_key = '{}'\n", "k".repeat(65)),
            "push.fcm[0].collapse_key is 65 bytes long, at most 64",
            "-",
        ),
    ];
    let run = |toml: &str| {
        let f = dir.path().join("cluster.toml");
        std::fs::write(&f, format!("{head}{toml}")).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_mailroom"))
            .args(["check-config", "--config"])
            .arg(&f)
            .env_remove("MAILROOM_TEST_UNSET_PUSH_SECRET")
            .output()
            .unwrap()
    };
    for (toml, reason, secret) in &cases {
        let out = run(toml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml} -> {err}");
        assert!(err.contains(reason), "{toml}: {err:?} should say {reason:?}");
        assert!(!err.contains(secret), "{toml}: the secret leaked: {err}");
    }
    // The same credentials, good, pass.
    let good = format!(
        "[push]\nmin_interval_secs = 60\n[[push.fcm]]\nservice_account = {good_sa:?}\n{}[push.webhook]\nurl = 'https://push.example.org/mailroom'\nsecret = 'a-long-enough-webhook-secret'\n",
        apns(&si.apns_key_file)
    );
    let out = run(&good);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Two PostgreSQL nodes with push on (window `min_interval` s), linked, and a wallet onboarded on
/// n1 with an FCM registration `token`.
async fn two_nodes_and_wallet(
    si: &StandIn,
    min_interval: u64,
    token: &str,
) -> (FreshDb, RunningNode, RunningNode, Agent, KeyPair) {
    two_nodes_and_wallet_with(si.push_config(min_interval, &["proj-a"], true), token).await
}

/// [`two_nodes_and_wallet`] with the `[push]` section `push`.
async fn two_nodes_and_wallet_with(
    push: mailroom::push::PushConfig,
    token: &str,
) -> (FreshDb, RunningNode, RunningNode, Agent, KeyPair) {
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 100);
    cfg.push = Some(push);
    let store = open_shared_store(&cfg).await;
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    let n2 = start_node(&cfg, "n2", it.next().unwrap(), &store, None);
    for (x, y) in [(&n1, "n2"), (&n2, "n1")] {
        eventually("link up", || async { peer_connected(x, y).await.then_some(()) }).await;
    }
    let (a, k) = Agent::onboard(&invitation(&n1).await).await.unwrap();
    set_device(&a, FCM, json!(token), Some("android")).await;
    (db, n1, n2, a, k)
}

/// A wallet picked up over HTTP on a node that then failed, and never acknowledged: the node
/// that takes over gives the delivery back, and the wallet, which held no session anywhere, is
/// pushed for it long before its lease would run out. The failed peer is the test, which
/// leases the message as that peer's HTTP pickup would, links as the peer and goes silent.
#[actix_rt::test]
async fn a_failed_peers_unacknowledged_pickup_pushes_the_wallet() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(2, &db.url, 100);
    cfg.push = Some(si.push_config(0, &["proj-a"], false));
    let store = open_shared_store(&cfg).await;
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    drop(it);
    let (a, k) = Agent::onboard(&invitation(&n1).await).await.unwrap();
    set_device(&a, FCM, json!("failed-peer-token"), Some("android")).await;
    let conn = a_connection_id(&n1).await;
    forward(&n1, &a, &k, "picked-up-on-n2").await;
    wait_hits(&si, "fcm:", 1).await;
    let now = mailroom::protocols::now_ms();
    let leased = store.lease(&conn, 10, "n2/http", now, now + 600_000).await.unwrap();
    assert_eq!(leased.len(), 1);
    // n2 comes up and goes silent (no heartbeats): n1 finds it failed and takes over.
    let ghost = link_as_peer(&cfg, &n1, "n2").await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    drop(ghost);
}

/// The failure timeout of [`TakenOverElsewhere`]: n1's death, the forward and the checks
/// after it fit well within it.
const FOUND_DOWN_AFTER: Duration = Duration::from_secs(6);

/// n3, a node in a cluster whose n1 and n2 are the test (links as those peers, kept alive with
/// heartbeats; n2 is the lower id left up, so n2, not n3, takes over a failed n1), with a
/// wallet onboarded on n3 whose session n1 holds. Push without a window; a failure timeout of
/// [`FOUND_DOWN_AFTER`], time to queue mail between n1's death and n3 finding it down.
struct TakenOverElsewhere {
    _db: FreshDb,
    si: StandIn,
    n3: RunningNode,
    n1: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
    n2: (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>),
    a: Agent,
    k: KeyPair,
}

impl TakenOverElsewhere {
    async fn start(token: &str, strategy: Strategy) -> TakenOverElsewhere {
        let si = StandIn::start();
        let db = FreshDb::create().await;
        let (mut cfg, ls) = bind_cluster(3, &db.url, 100);
        cfg.push = Some(si.push_config(0, &["proj-a"], false));
        cfg.cluster.failure_timeout_ms = FOUND_DOWN_AFTER.as_millis() as u64;
        cfg.delivery.strategy = strategy;
        let store = open_shared_store(&cfg).await;
        let n3 = start_node(&cfg, "n3", ls.into_iter().nth(2).unwrap(), &store, None);
        let beat = Duration::from_millis(100);
        let n2 = keep_alive(link_as_peer(&cfg, &n3, "n2").await, beat);
        let (a, k) = Agent::onboard(&invitation(&n3).await).await.unwrap();
        set_device(&a, FCM, json!(token), Some("android")).await;
        let conn = a_connection_id(&n3).await;
        let mut n1 = link_as_peer(&cfg, &n3, "n1").await;
        n1.writer
            .send(&Frame::Own {
                conn: conn.clone(),
                epoch: 1,
            })
            .await
            .unwrap();
        n1.writer.flush().await.unwrap();
        let n1 = keep_alive(n1, beat);
        eventually("n3 names n1 as the session's node", || async {
            let c = get_json(&format!("{}/cluster", n3.admin_url())).await;
            c.to_string().contains(&conn).then_some(())
        })
        .await;
        TakenOverElsewhere {
            _db: db,
            si,
            n3,
            n1,
            n2,
            a,
            k,
        }
    }

    /// Whether n3 sees `peer` up, and linked.
    async fn sees(&self, peer: &str) -> (bool, bool) {
        let c = get_json(&format!("{}/cluster", self.n3.admin_url())).await;
        let p = c["cluster"]["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == peer).cloned())
            .unwrap_or(Value::Null);
        (p["up"] == true, p["connected"] == true)
    }

    /// A forward on n3 while n1 is dead and not yet found down: notified to n1 (`counter`
    /// counts it), no push; once n3 finds n1 down (n2 still up: n2 takes over), one push.
    async fn mail_then_push(&self, counter: &str) {
        let before = metric(&self.n3, counter).await;
        forward(&self.n3, &self.a, &self.k, "to-a-dead-node").await;
        // Notified after the answer (the forward's follow-up is a task of its own).
        eventually(&format!("{counter} counts the notification"), || async {
            (metric(&self.n3, counter).await == before + 1.0).then_some(())
        })
        .await;
        assert!(self.sees("n1").await.0, "n1 is not yet found down");
        assert_eq!(self.si.state.hits("fcm:").len(), 0, "notified, not pushed");
        // Found down within a failure timeout, woken two after that.
        let deadline = Instant::now() + 3 * FOUND_DOWN_AFTER + WAIT;
        while self.si.state.hits("fcm:").is_empty() {
            assert!(Instant::now() < deadline, "the wallet was never pushed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let hits = self.si.state.hits("fcm:");
        assert_clean(&hits);
        assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
        assert!(!self.sees("n1").await.0);
        assert_eq!(self.sees("n2").await, (true, true), "n2 took n1 over, not n3");
    }
}

/// Mail queued on a node whose notification to the wallet's session node failed (that node
/// crashed: its link closed) while another node took that node over: the take-over woke the
/// wallet before the mail was queued, so this node, which finds the failed node down later
/// and does not take it over, pushes the wallet then.
#[actix_rt::test]
async fn mail_notified_to_a_crashed_node_pushes_when_another_node_took_it_over() {
    let t = TakenOverElsewhere::start("crashed-node-token", Strategy::QueueAndLiveModeDelivery).await;
    t.n1.0.abort();
    t.n1.1.abort();
    eventually("n3's link to n1 gone", || async {
        (!t.sees("n1").await.1).then_some(())
    })
    .await;
    t.mail_then_push("mailroom_cluster_notifications_failed_total").await;
    t.n2.0.abort();
}

/// The same with a node that died without closing its link (a host gone dark), under
/// `queue-only` (nothing handed to the session's node: a hand-off the dead node never
/// confirmed is given back when its link ends): the notification goes out on the link, to
/// nobody, and is woken once the node is found down.
#[actix_rt::test]
async fn mail_notified_to_a_silently_dead_node_pushes_when_another_node_took_it_over() {
    let t = TakenOverElsewhere::start("dark-node-token", Strategy::QueueOnly).await;
    // No more heartbeats; the link stays open (its reader runs).
    t.n1.0.abort();
    t.mail_then_push("mailroom_cluster_notifications_sent_total").await;
    assert_eq!(metric(&t.n3, "mailroom_cluster_notifications_failed_total").await, 0.0);
    t.n1.1.abort();
    t.n2.0.abort();
}

/// A wallet picked up over HTTP and went away before acknowledging; the node stops. It gives
/// its HTTP deliveries back before its push worker stops, and pushes the wallet for them.
#[actix_rt::test]
async fn a_stopping_node_pushes_for_the_pickups_it_gives_back() {
    let si = StandIn::start();
    let (_d, n, _a) = wallet_with_one_unacknowledged_pickup(&si, 600_000).await;
    n.stop().unwrap();
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
}

/// The node's store, except that once armed, the next `pending_among` fails (a failover).
struct PendingAmongFailsOnce {
    inner: std::sync::Arc<dyn mailroom::store::Store>,
    armed: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl mailroom::store::Store for PendingAmongFailsOnce {
    async fn pending_among(
        &self,
        conns: &[mailroom::store::ConnId],
        now_ms: i64,
    ) -> mailroom::store::StoreResult<Vec<mailroom::store::ConnId>> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.armed.swap(false, SeqCst) {
            self.failed.fetch_add(1, SeqCst);
            return Err(mailroom::store::StoreError::Unavailable(
                "injected: the database fails over".into(),
            ));
        }
        self.inner.pending_among(conns, now_ms).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, update_keys, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased,
        release, release_owner, release_owners_under, reclaim_expired_leases,
        queue_stats, total_queued, connections_with_pending, prune_dedup,
        dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats, expire, expire_due, oldest_received_ms,
        flush, device_of, set_device, forget_device_token, push_event, push_take_due, push_done,
        first_sight, forget_sight, prune_sights,
        delete_connection, delete_unmediated, revoke_mediation, drop_queue, top_queues,
    );
}

/// A message the run before left leased (under this node's owners, unacknowledged) goes back
/// to pending as the node starts again, and its wallet, with no session anywhere, is pushed
/// for it, though the store fails the first time the node asks whose mail is pending. Before,
/// that failure dropped the wake-up: the message was pending with no lease (no reclaim to
/// find it), the sweep looks only at the node's sessions, and the wallet was never pushed.
#[actix_rt::test]
async fn a_wake_up_after_the_start_release_survives_a_store_failure() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.push = Some(si.push_config(0, &["proj-a"], false));
    cfg.delivery.lease_ms = 60_000;
    let store = std::sync::Arc::new(PendingAmongFailsOnce {
        inner: mailroom::node::open_store(&cfg).await.unwrap(),
        armed: std::sync::atomic::AtomicBool::new(false),
        failed: std::sync::atomic::AtomicUsize::new(0),
    });
    let n = start_on(&cfg, store.clone());
    let (a, k, conn) = registered_wallet(&n, "start-release-token").await;
    forward(&n, &a, &k, "left-leased").await;
    wait_hits(&si, "fcm:", 1).await;
    n.stop().unwrap();
    // As a session of the run before would have left it: delivered, never acknowledged (its
    // lease runs out long after the test).
    let now = mailroom::protocols::now_ms();
    let owner = mailroom::protocols::lease_owner("n1", "ws/1/1");
    let leased = store.inner.lease(&conn, 10, &owner, now, now + 30_000).await.unwrap();
    assert_eq!(leased.len(), 1);
    store.armed.store(true, SeqCst);
    let _n = start_on(&cfg, store.clone());
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_eq!(store.failed.load(SeqCst), 1, "the store failed the wake-up's question");
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    let st = store
        .inner
        .queue_stats(&conn, mailroom::protocols::now_ms())
        .await
        .unwrap();
    assert_eq!((st.pending, st.leased), (1, 0), "given back by the start's release");
}

/// A burst of 100 forwards spread over two nodes (PostgreSQL) to an offline wallet: one push now and one
/// trailing push for the whole cluster, not one pair per node.
#[actix_rt::test]
async fn cluster_burst_over_nodes_gives_one_push_and_one_trailing() {
    let si = StandIn::start();
    let (_db, n1, n2, a, k) = two_nodes_and_wallet(&si, 10, "cluster-burst-token").await;
    let started = Instant::now();
    let texts: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    forward_many(&[&n1, &n2], &a, &k, &texts).await;
    let burst = started.elapsed();
    let window = Duration::from_secs(10);
    // Measured from the burst's start, not from the first push's arrival: that one can reach
    // the provider late on a loaded machine (token grant, TLS), the window runs from the event.
    let trailing_from = started + window - Duration::from_millis(100);
    let trailing = eventually("a push after the window", || async {
        si.state.hits("fcm:").into_iter().find(|h| h.at >= trailing_from)
    })
    .await;
    let sent = |n: &RunningNode| {
        let url = format!("{}/metrics", n.admin_url());
        async move {
            let (_, t) = get_status(&url, None).await;
            t.lines()
                .filter(|l| l.starts_with("mailroom_push_total{provider=\"fcm\",result=\"sent\"}"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        }
    };
    let pushed = si.state.hits("fcm:").len() as f64;
    eventually("every push counted", || async {
        (sent(&n1).await + sent(&n2).await == pushed).then_some(())
    })
    .await;
    let (hits, early, unavailable, seen) = burst_pushes(&si, &[&n1, &n2], started, trailing_from, burst).await;
    // Only a burst well inside the window (which runs from the node's first event) is sure to
    // have been folded whole.
    if burst < window / 2 {
        assert_eq!(
            hits.len(),
            early + 1,
            "one trailing push, cluster-wide; pushes: {seen:?}"
        );
        assert_eq!(trailing.body["message"]["data"]["message_count"], "100");
        let coalesced = metric_sum(&[&n1, &n2], "mailroom_push_coalesced_total").await;
        assert_eq!(
            coalesced,
            99.0 - unavailable,
            "every event but the first folded, whichever node took it ({unavailable} window unavailable)"
        );
    }
    println!(
        "cluster burst: 100 forwards over 2 nodes in {burst:?} -> {} pushes",
        si.state.hits("fcm:").len()
    );
}

/// The shared push window cannot be claimed (here: a trigger makes PostgreSQL refuse every
/// write to the windows table, the rest of the store answering): each event is pushed at once
/// and counted in `mailroom_push_window_unavailable_total` (a push too many, never none); once
/// the table answers again, the window it held folds events again.
#[actix_rt::test]
async fn an_unavailable_push_window_pushes_at_once_and_is_counted() {
    let si = StandIn::start();
    let (db, n1, n2, a, k) = two_nodes_and_wallet(&si, 60, "window-away-token").await;
    forward(&n1, &a, &k, "first").await;
    wait_hits(&si, "fcm:", 1).await;
    let unavailable = || async { metric_sum(&[&n1, &n2], WINDOW_UNAVAILABLE).await };
    assert_eq!(unavailable().await, 0.0);

    let (pg, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    let pg_task = tokio::spawn(conn);
    pg.batch_execute(
        "CREATE FUNCTION windows_away() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'push windows away (test)'; END $$; \
         CREATE TRIGGER windows_away BEFORE INSERT OR UPDATE ON mailroom_push_windows \
         FOR EACH ROW EXECUTE FUNCTION windows_away();",
    )
    .await
    .unwrap();
    forward(&n1, &a, &k, "second").await;
    wait_hits(&si, "fcm:", 2).await;
    forward(&n2, &a, &k, "third").await;
    let hits = wait_hits(&si, "fcm:", 3).await;
    assert_clean(&hits);
    let counts: Vec<_> = hits
        .iter()
        .map(|h| h.body["message"]["data"]["message_count"].clone())
        .collect();
    assert_eq!(
        counts,
        [json!("1"), json!("2"), json!("3")],
        "every event pushed at once"
    );
    assert_eq!(unavailable().await, 2.0);
    assert_eq!(metric_sum(&[&n1, &n2], "mailroom_push_coalesced_total").await, 0.0);

    pg.batch_execute("DROP TRIGGER windows_away ON mailroom_push_windows")
        .await
        .unwrap();
    forward(&n2, &a, &k, "fourth").await;
    eventually("the fourth event folded into the window", || async {
        (metric_sum(&[&n1, &n2], "mailroom_push_coalesced_total").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        si.state.hits("fcm:").len(),
        3,
        "no push within the window once it answers"
    );
    assert_eq!(unavailable().await, 2.0);
    drop(pg);
    let _ = pg_task.await;
}

const WINDOW_UNAVAILABLE: &str = "mailroom_push_window_unavailable_total";

/// The pushes of a burst of forwards over `nodes` that began at `started` and took `burst`,
/// once its trailing push (due from `trailing_from`) came: checks that exactly one came
/// before the window's end, plus one per event the store could not place in the shared
/// window (a pool timeout on a loaded box: pushed at once by design, and counted); every other
/// early push would be a bug. Returns the pushes, how many came early, the window-unavailable
/// count, and the pushes as text for messages.
async fn burst_pushes(
    si: &StandIn,
    nodes: &[&RunningNode],
    started: Instant,
    trailing_from: Instant,
    burst: Duration,
) -> (Vec<Hit>, usize, f64, Vec<String>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = si.state.hits("fcm:");
    assert_clean(&hits);
    let unavailable = metric_sum(nodes, WINDOW_UNAVAILABLE).await;
    let seen: Vec<String> = hits
        .iter()
        .map(|h| {
            let at = h.at.saturating_duration_since(started);
            format!("{at:?}: count {}", h.body["message"]["data"]["message_count"])
        })
        .collect();
    let early = hits.iter().filter(|h| h.at < trailing_from).count();
    assert_eq!(
        early as f64,
        1.0 + unavailable,
        "one push before the window's end (+ {unavailable} window unavailable); burst took {burst:?}; pushes: {seen:?}"
    );
    (hits, early, unavailable, seen)
}

/// A store whose push events are recorded and then answered with an error while `lose` is set
/// (a commit whose answer was lost: a connection cut, a timeout after the commit), which
/// counts the push claims [`Store::push_done`] ended, which fails the next
/// `fail_device_lookups` device lookups (a pool timeout), and which holds each device lookup
/// `slow_device_ms` (a loaded pool), counting the most it held at once.
struct EventAnswerLost {
    inner: std::sync::Arc<dyn mailroom::store::Store>,
    lose: std::sync::atomic::AtomicBool,
    claims_ended: std::sync::atomic::AtomicUsize,
    fail_device_lookups: std::sync::atomic::AtomicUsize,
    slow_device_ms: std::sync::atomic::AtomicU64,
    lookups: std::sync::atomic::AtomicUsize,
    most_lookups: std::sync::atomic::AtomicUsize,
    /// Connection reads take this long (0: as the store answers), and how many are under way.
    slow_connection_ms: std::sync::atomic::AtomicU64,
    connection_reads: std::sync::atomic::AtomicUsize,
    /// The connections whose device was looked up, in order.
    looked_up: parking_lot::Mutex<Vec<String>>,
    /// While true, device lookups wait.
    hold_lookups: tokio::sync::watch::Sender<bool>,
    /// Push events recorded (the answer returned, or lost).
    events_recorded: std::sync::atomic::AtomicUsize,
}

impl EventAnswerLost {
    /// A node on this store (push window 60 s, FCM at `si`) and a wallet registered with
    /// `token`; push events' answers lost from the start if `lose`.
    async fn node_with_wallet(
        si: &StandIn,
        lose: bool,
        token: &str,
    ) -> (
        tempfile::TempDir,
        RunningNode,
        std::sync::Arc<EventAnswerLost>,
        Agent,
        KeyPair,
    ) {
        let (dir, n, store) = EventAnswerLost::node(si.push_config(60, &["proj-a"], false), lose).await;
        let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
        set_device(&a, FCM, json!(token), Some("android")).await;
        (dir, n, store, a, k)
    }

    /// A node on this store with `[push]` as `pc`; push events' answers lost from the start
    /// if `lose`.
    async fn node(
        pc: mailroom::push::PushConfig,
        lose: bool,
    ) -> (tempfile::TempDir, RunningNode, std::sync::Arc<EventAnswerLost>) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
        cfg.push = Some(pc);
        let store = std::sync::Arc::new(EventAnswerLost {
            inner: mailroom::node::open_store(&cfg).await.unwrap(),
            lose: std::sync::atomic::AtomicBool::new(lose),
            claims_ended: std::sync::atomic::AtomicUsize::new(0),
            fail_device_lookups: std::sync::atomic::AtomicUsize::new(0),
            slow_device_ms: std::sync::atomic::AtomicU64::new(0),
            lookups: std::sync::atomic::AtomicUsize::new(0),
            most_lookups: std::sync::atomic::AtomicUsize::new(0),
            slow_connection_ms: std::sync::atomic::AtomicU64::new(0),
            connection_reads: std::sync::atomic::AtomicUsize::new(0),
            looked_up: parking_lot::Mutex::new(Vec::new()),
            hold_lookups: tokio::sync::watch::channel(false).0,
            events_recorded: std::sync::atomic::AtomicUsize::new(0),
        });
        let n = start_on(&cfg, store.clone());
        (dir, n, store)
    }
}

#[async_trait::async_trait]
impl mailroom::store::Store for EventAnswerLost {
    async fn push_event(
        &self,
        conn: &str,
        now_ms: i64,
        window_ms: i64,
        claim: mailroom::store::NewClaim,
        unless_pushed_since_ms: Option<i64>,
    ) -> mailroom::store::StoreResult<mailroom::store::PushSlot> {
        let slot = self
            .inner
            .push_event(conn, now_ms, window_ms, claim, unless_pushed_since_ms)
            .await;
        self.events_recorded.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.lose.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(mailroom::store::StoreError::Unavailable(
                "injected: the answer to a committed push event was lost".into(),
            ));
        }
        slot
    }
    async fn device_of(&self, conn: &str) -> mailroom::store::StoreResult<Option<mailroom::store::Device>> {
        let fail = &self.fail_device_lookups;
        let take = |n: usize| n.checked_sub(1);
        if fail
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                take,
            )
            .is_ok()
        {
            return Err(mailroom::store::StoreError::Unavailable(
                "injected: timed out waiting for a pooled connection".into(),
            ));
        }
        use std::sync::atomic::Ordering::SeqCst;
        let _ = self.hold_lookups.subscribe().wait_for(|held| !*held).await;
        let now = self.lookups.fetch_add(1, SeqCst) + 1;
        self.most_lookups.fetch_max(now, SeqCst);
        let slow = self.slow_device_ms.load(SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        let found = self.inner.device_of(conn).await;
        self.lookups.fetch_sub(1, SeqCst);
        self.looked_up.lock().push(conn.to_string());
        found
    }
    async fn get_connection(&self, id: &str) -> mailroom::store::StoreResult<Option<mailroom::store::Connection>> {
        use std::sync::atomic::Ordering::SeqCst;
        let slow = self.slow_connection_ms.load(SeqCst);
        if slow > 0 {
            self.connection_reads.fetch_add(1, SeqCst);
            tokio::time::sleep(Duration::from_millis(slow)).await;
            self.connection_reads.fetch_sub(1, SeqCst);
        }
        self.inner.get_connection(id).await
    }
    async fn push_done(&self, conn: &str, token: i64, reopen_ms: Option<i64>) -> mailroom::store::StoreResult<bool> {
        let ended = self.inner.push_done(conn, token, reopen_ms).await?;
        if ended {
            self.claims_ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(ended)
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased, release,
        release_owner, release_owners_under, reclaim_expired_leases, queue_stats, total_queued, connections_with_pending,
        pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, set_device, forget_device_token, first_sight, forget_sight,
        prune_sights, push_take_due, update_keys, revoke_mediation, delete_connection, delete_unmediated, drop_queue, top_queues,
    );
}

/// A forward answered just before the node stops still wakes its wallet. Its wake-up ran on
/// the HTTP worker that took the request, and a stopping node stops a worker as soon as its
/// last connection ends: a wake-up still reading the store then (here the wallet's
/// connection, read slowly) died with the worker, the wallet was never pushed, and the stop
/// was recorded as clean. The stop now waits for it.
#[actix_rt::test]
async fn a_forward_answered_just_before_the_stop_still_pushes() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let (_d, n, store, a, k) = EventAnswerLost::node_with_wallet(&si, false, "stop-race-token").await;
    store.slow_connection_ms.store(1500, SeqCst);
    forward(&n, &a, &k, "just before the stop").await;
    eventually("the wake-up reading the store", || async {
        (store.connection_reads.load(SeqCst) > 0).then_some(())
    })
    .await;
    n.stop().unwrap();
    let hits = si.state.hits("fcm:");
    assert_eq!(hits.len(), 1, "the wallet was pushed before the node exited");
    assert_clean(&hits);
}

/// The store records a push event but its answer is lost: the node pushes at once (a push too
/// many, never none), and then ends the claim the event took in the store, named before the
/// call. Left in place, that claim would push the wallet a second time once it ran out.
#[actix_rt::test]
async fn a_push_event_whose_answer_was_lost_pushes_once() {
    let si = StandIn::start();
    let (_dir, n, store, a, k) = EventAnswerLost::node_with_wallet(&si, true, "answer-lost-token").await;
    forward(&n, &a, &k, "only").await;
    assert_clean(&wait_hits(&si, "fcm:", 1).await);
    eventually("the claim of the failed event ended", || async {
        (store.claims_ended.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert_eq!(metric(&n, WINDOW_UNAVAILABLE).await, 1.0);
    // Long after any claim would have run out, no node has a push to take.
    let later = i64::MAX / 2;
    let due = store.inner.push_take_due(later, later + 1, 0, 10).await.unwrap();
    assert!(due.is_empty(), "a second push of the same event: {due:?}");
    assert_eq!(si.state.hits("fcm:").len(), 1);
}

/// The store fails the device lookup of a wallet's only event three times (a pool timeout, a
/// failover): the lookup is tried again, 0.5 s, 1 s and 2 s later, and the wallet pushed.
/// Before, the event was dropped, at first on the first failure, then on the third, and
/// nothing woke the wallet.
#[actix_rt::test]
async fn a_device_lookup_the_store_failed_is_tried_again() {
    let si = StandIn::start();
    let (_dir, n, store, a, k) = EventAnswerLost::node_with_wallet(&si, false, "lookup-failed-token").await;
    store.fail_device_lookups.store(3, std::sync::atomic::Ordering::SeqCst);
    forward(&n, &a, &k, "only").await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
    assert_eq!(store.fail_device_lookups.load(std::sync::atomic::Ordering::SeqCst), 0);
    let store_results = |r: &'static str| {
        let n = &n;
        async move { metric(n, &format!("mailroom_push_total{{provider=\"store\",result=\"{r}\"}}")).await }
    };
    assert_eq!(store_results("retry").await, 3.0);
    assert_eq!(store_results("gave_up").await + store_results("failed").await, 0.0);
}

/// A burst of events for 20 wallets on a slow store: the push worker has at most 8 of them
/// in the store at once, the rest wait their turn (before, each event's lookup went to the
/// store's pool at once, where a burst of thousands timed out, forwards beside them too).
/// Every wallet is still pushed.
#[actix_rt::test]
async fn a_burst_of_events_takes_few_store_connections_at_once() {
    let si = StandIn::start();
    let (_dir, n, store) = EventAnswerLost::node(si.push_config(60, &["proj-a"], false), false).await;
    let mut wallets = Vec::new();
    for i in 0..20 {
        wallets.push(registered_wallet(&n, &format!("burst-{i}")).await);
    }
    store.slow_device_ms.store(300, std::sync::atomic::Ordering::SeqCst);
    let n = &n;
    futures_util::future::join_all(wallets.iter().map(|(a, k, _)| forward(n, a, k, "b"))).await;
    assert_eq!(wait_hits(&si, "fcm:", 20).await.len(), 20);
    let most = store.most_lookups.load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=8).contains(&most), "{most} device lookups at once");
}

/// A flood of forwards for one offline wallet while its event is slow in the store: the wallet
/// holds one place in the push worker, and its repeats fold into one event waiting behind it.
/// Before, each event was a task of its own with its own device lookup (200 here, 8 at once),
/// and a flood grew the worker's tasks without bound.
#[actix_rt::test]
async fn a_flood_for_one_wallet_takes_one_place_in_the_push_worker() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let (_dir, n, store, a, k) = EventAnswerLost::node_with_wallet(&si, false, "flood-token").await;
    store.slow_device_ms.store(1000, SeqCst);
    let texts: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
    forward_many(&[&n], &a, &k, &texts).await;
    eventually("every event handled", || async {
        (metric(&n, "mailroom_push_coalesced_total").await == 199.0).then_some(())
    })
    .await;
    assert_eq!(wait_hits(&si, "fcm:", 1).await.len(), 1);
    let lookups = store.looked_up.lock().len();
    assert!(lookups <= 10, "{lookups} device lookups for one wallet's 200 events");
    // The wallet's event's lookup, and its push's reading the registration again.
    let most = store.most_lookups.load(SeqCst);
    assert!(most <= 2, "{most} lookups at once for one wallet");
    assert_eq!(metric(&n, "mailroom_push_waiting").await, 0.0);
}

/// The stand-in holds the first FCM push until the test adds a permit to the gate returned.
fn hold_first_fcm_push(si: &StandIn) -> std::sync::Arc<tokio::sync::Semaphore> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    si.state.script(
        "fcm:proj-a",
        vec![Reply::new(200, json!({"name": "projects/p/messages/0"})).held(&gate)],
    );
    gate
}

/// A node with one send slot (`max_in_flight = 1`: the worker runs 17 events at once) and
/// 20 wallets registered.
async fn one_slot_node_and_wallets(
    si: &StandIn,
) -> (
    tempfile::TempDir,
    RunningNode,
    std::sync::Arc<EventAnswerLost>,
    Vec<(Agent, KeyPair)>,
) {
    let mut pc = si.push_config(60, &["proj-a"], false);
    pc.max_in_flight = 1;
    // A held push must not time out (and free the slot) while a loaded box sets the rest up;
    // two tries keep the claim within the hour the configuration allows.
    pc.timeout_ms = 300_000;
    pc.max_attempts = 2;
    let (dir, n, store) = EventAnswerLost::node(pc, false).await;
    let mut wallets = Vec::new();
    for i in 0..20 {
        let (a, k, _) = registered_wallet(&n, &format!("waits-its-turn-{i}")).await;
        wallets.push((a, k));
    }
    (dir, n, store, wallets)
}

async fn all_pushed_once(si: &StandIn, n: &RunningNode) {
    let hits = wait_hits(si, "fcm:", 20).await;
    assert_clean(&hits);
    let mut tokens: Vec<&str> = hits
        .iter()
        .filter_map(|h| h.body["message"]["token"].as_str())
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 20, "each wallet pushed once: {tokens:?}");
    eventually("none waiting", || async {
        (metric(n, "mailroom_push_waiting").await == 0.0).then_some(())
    })
    .await;
}

/// Events for more wallets than the push worker runs at once (17 here) while the store holds
/// every device lookup: the rest wait their turn in the worker, counted by
/// `mailroom_push_waiting`, and each wallet is pushed once the store answers. Before, every
/// event became a task at once, waiting without bound.
#[actix_rt::test]
async fn events_past_what_the_push_worker_runs_wait_their_turn_and_each_is_pushed() {
    let si = StandIn::start();
    let (_dir, n, store, wallets) = one_slot_node_and_wallets(&si).await;
    store.hold_lookups.send_replace(true);
    for (a, k) in &wallets {
        forward(&n, a, k, "waits").await;
    }
    eventually("17 events run, 3 wait", || async {
        (metric(&n, "mailroom_push_waiting").await == 3.0).then_some(())
    })
    .await;
    store.hold_lookups.send_replace(false);
    all_pushed_once(&si, &n).await;
}

/// While the only send slot is held (a slow provider), the events of 19 other wallets are
/// still recorded in the store at once, each with its push's claim: a push waiting for a slot
/// does not keep other wallets' events from their turn, and its claim outlives a stop or a
/// crash of this node. Before, 17 events held the worker's places while they waited for the
/// slot, and the rest waited in the worker's memory only.
#[actix_rt::test]
async fn pushes_waiting_for_a_slot_leave_the_other_wallets_events_their_turn() {
    let si = StandIn::start();
    let gate = hold_first_fcm_push(&si);
    let (_dir, n, store, wallets) = one_slot_node_and_wallets(&si).await;
    forward(&n, &wallets[0].0, &wallets[0].1, "holds the slot").await;
    eventually("the first push held at the stand-in", || async {
        si.state.arrived.lock().iter().any(|k| k == "fcm:proj-a").then_some(())
    })
    .await;
    for (a, k) in &wallets[1..] {
        forward(&n, a, k, "waits for the slot").await;
    }
    use std::sync::atomic::Ordering::SeqCst;
    eventually("every event recorded, the slot still held", || async {
        (store.events_recorded.load(SeqCst) == 20).then_some(())
    })
    .await;
    assert_eq!(metric(&n, "mailroom_push_waiting").await, 0.0);
    assert_eq!(si.state.hits("fcm:").len(), 0, "the slot is still held");
    gate.add_permits(1);
    all_pushed_once(&si, &n).await;
}

/// The ids of the node's connections.
async fn connection_ids(n: &RunningNode) -> Vec<String> {
    let all = get_json(&format!("{}/connections", n.admin_url())).await;
    all["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["id"].as_str().expect("an id").to_string())
        .collect()
}

/// A wallet onboarded on `n` and registered for FCM with `token`, and its connection's id.
async fn registered_wallet(n: &RunningNode, token: &str) -> (Agent, KeyPair, String) {
    let before = connection_ids(n).await;
    let (a, k) = Agent::onboard(&invitation(n).await).await.unwrap();
    set_device(&a, FCM, json!(token), Some("android")).await;
    let id = connection_ids(n)
        .await
        .into_iter()
        .find(|id| !before.contains(id))
        .expect("the new connection");
    (a, k, id)
}

/// Events wait for the only send slot (`max_in_flight = 1`), held by another wallet's push
/// the stand-in does not answer; meanwhile one wallet unregisters its token and another
/// wallet's connection is deleted. Once the slot frees, neither is pushed, to FCM or to the
/// webhook. Before, a push used the registration read when its event came and skipped only
/// a revoked connection: both tokens went out, and the webhook was given the deleted
/// connection.
#[actix_rt::test]
async fn a_push_waiting_for_a_slot_reads_the_registration_again() {
    let si = StandIn::start();
    let gate = hold_first_fcm_push(&si);
    let mut pc = si.push_config(60, &["proj-a"], true);
    pc.max_in_flight = 1;
    // The held push must not time out (and free the slot) while a loaded box sets the rest up;
    // two tries keep the claim within the hour the configuration allows.
    pc.timeout_ms = 300_000;
    pc.max_attempts = 2;
    let (_dir, n, store) = EventAnswerLost::node(pc, false).await;
    let (a, ka, _) = registered_wallet(&n, "holds-the-slot").await;
    let (b, kb, b_id) = registered_wallet(&n, "unregistered-meanwhile").await;
    let (c, kc, c_id) = registered_wallet(&n, "deleted-meanwhile").await;
    forward(&n, &a, &ka, "a").await;
    eventually("the first push held at the stand-in", || async {
        si.state.arrived.lock().iter().any(|k| k == "fcm:proj-a").then_some(())
    })
    .await;
    let mark = store.looked_up.lock().len();
    forward(&n, &b, &kb, "b").await;
    forward(&n, &c, &kc, "c").await;
    eventually("both events read their registration", || async {
        let seen = store.looked_up.lock()[mark..].to_vec();
        (seen.contains(&b_id) && seen.contains(&c_id)).then_some(())
    })
    .await;
    set_device(&b, FCM, Value::Null, None).await;
    let res = common::client()
        .delete(format!("{}/connections/{c_id}", n.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    gate.add_permits(1);
    let stale = |h: &Hit| {
        let token = h.body["message"]["token"].as_str().or(h.body["token"].as_str());
        matches!(token, Some("unregistered-meanwhile" | "deleted-meanwhile"))
    };
    let hits = eventually("both pushes skipped, or sent", || async {
        let hits = si.state.hits("");
        let skipped = metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"unregistered\"}").await;
        (skipped >= 2.0 || hits.iter().any(stale)).then_some(hits)
    })
    .await;
    let sent: Vec<String> = hits
        .iter()
        .filter(|h| stale(h))
        .map(|h| format!("{}: {}", h.kind, h.body))
        .collect();
    assert!(sent.is_empty(), "pushed after unregistering or deletion: {sent:?}");
    assert_eq!(si.state.hits("fcm:").len(), 1, "only the first wallet pushed");
}

/// The node that pushed first and scheduled the trailing push stops mid-window: the other
/// node sends the trailing push (the window lives in the shared store). The window is 8 s:
/// the second forward and n2's whole stop fit in it on a loaded box (n2 would send the
/// trailing push itself if it fell due first).
#[actix_rt::test]
async fn trailing_push_survives_the_node_that_scheduled_it() {
    let si = StandIn::start();
    let (_db, _n1, n2, a, k) = two_nodes_and_wallet(&si, 8, "survivor-token").await;
    forward(&n2, &a, &k, "first").await;
    let hooks = wait_hits(&si, "hook", 1).await;
    assert_eq!(hooks[0].body["node"], "n2");
    forward(&n2, &a, &k, "second").await;
    eventually("the second event folded on n2", || async {
        (metric(&n2, "mailroom_push_coalesced_total").await == 1.0).then_some(())
    })
    .await;
    let stopped = Instant::now();
    n2.stop().unwrap();
    let hooks = wait_hits(&si, "hook", 2).await;
    assert_clean(&hooks);
    assert_eq!(hooks[1].body["node"], "n1", "n1 took the trailing push of stopped n2");
    assert_eq!(hooks[1].body["count"], 2);
    assert!(hooks[1].at > stopped);
    // The provider gets it too (sent beside the webhook, not after it).
    assert_clean(&wait_hits(&si, "fcm:", 2).await);
}

/// Push settings with a window of `window` s and the webhook as the wallets' one channel (no
/// FCM project: beside a provider the webhook is sent apart, and does not hold the push),
/// whose pushes are tried three times 8 s apart: a node stopped while it retries is still
/// retrying when its stop gives up on the push (its stop closes sessions, leaves the cluster
/// and stops its listeners first: 8 s is room for that on a loaded machine).
fn retrying_push_config(si: &StandIn, window: u64) -> mailroom::push::PushConfig {
    let mut push = si.push_config(window, &[], true);
    push.timeout_ms = 1000;
    push.max_attempts = 3;
    push.retry_max_ms = 8000;
    push
}

/// The first webhook call answered 200 after the first `tries`, by `deadline`: the push a
/// stopped node abandoned, sent by a node left.
async fn abandoned_push_sent(si: &StandIn, tries: usize, deadline: Instant) -> Hit {
    loop {
        let hooks = si.state.hits("hook");
        if let Some(h) = hooks[tries..].iter().find(|h| h.status == 200) {
            return h.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned push was never sent: {:?}",
            hooks.iter().map(|h| (&h.body["node"], h.status)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node that claimed a trailing push is stopped while the push is still being retried
/// (the webhook answers 503 with a `Retry-After` of 8 s): past `STOP_GRACE` it abandons the
/// push, whose claim stays in the store. Once the claim has run out, and not before, the other
/// node sends the trailing push.
#[actix_rt::test]
async fn a_trailing_push_abandoned_by_its_node_is_sent_by_another() {
    const WINDOW: Duration = Duration::from_secs(2);
    let si = StandIn::start();
    let push = retrying_push_config(&si, WINDOW.as_secs());
    let claim = mailroom::push::claim_length(&push.load().unwrap());
    let (_db, n1, n2, a, k) = two_nodes_and_wallet_with(push, "abandoned-token").await;
    let started = Instant::now();
    forward(&n1, &a, &k, "first").await;
    wait_hits(&si, "hook", 1).await;
    si.state.script(
        "hook",
        (0..3).map(|_| Reply::new(503, json!({})).retry_after("8")).collect(),
    );
    forward(&n2, &a, &k, "second").await;
    let hooks = wait_hits(&si, "hook", 2).await;
    assert_eq!(hooks[1].status, 503, "the trailing push's first try failed");
    assert_eq!(hooks[1].body["count"], 2);
    let claimer = hooks[1].body["node"].as_str().unwrap().to_owned();
    let (stopping, survivor, survivor_id) = if claimer == "n1" {
        (n1, n2, "n2")
    } else {
        (n2, n1, "n1")
    };
    stopping.stop().unwrap();
    // Gone, its push abandoned between two tries: the webhook answers again.
    si.state.scripts.lock().clear();
    let tries = si.state.hits("hook").len();
    assert!(tries < 4, "the claiming node gave up on its own: {tries} webhook calls");
    // The claim was taken a window after the first event at the earliest, and runs out
    // `claim` after it; then any node's poll (every half second here) takes the push.
    let sent = abandoned_push_sent(&si, tries, started + WINDOW + claim + WAIT).await;
    assert_clean(std::slice::from_ref(&sent));
    assert_eq!(sent.body["node"], survivor_id, "the node left took the push over");
    assert_eq!(sent.body["count"], 2);
    assert!(
        sent.at >= started + WINDOW + claim - Duration::from_millis(100),
        "taken over only once the claim ran out: {:?} after the first event, the claim lasts {claim:?}",
        sent.at - started
    );
    drop(survivor);
}

/// The node that pushed at once is stopped while that push is still being retried (the
/// webhook answers 503 with a `Retry-After` of 8 s): past `STOP_GRACE` it abandons the push,
/// whose claim (made with the window's step) stays in the store. Once the claim has run out,
/// and not before, the other node sends the push: a wallet is not left asleep because the node
/// that took its push died first.
#[actix_rt::test]
async fn an_immediate_push_abandoned_by_its_node_is_sent_by_another() {
    let si = StandIn::start();
    let push = retrying_push_config(&si, 2);
    let claim = mailroom::push::claim_length(&push.load().unwrap());
    let (_db, n1, n2, a, k) = two_nodes_and_wallet_with(push, "abandoned-now-token").await;
    si.state.script(
        "hook",
        (0..3).map(|_| Reply::new(503, json!({})).retry_after("8")).collect(),
    );
    let started = Instant::now();
    forward(&n1, &a, &k, "only").await;
    let hooks = wait_hits(&si, "hook", 1).await;
    assert_eq!(hooks[0].status, 503, "the push's first try failed");
    assert_eq!(hooks[0].body["node"], "n1");
    n1.stop().unwrap();
    si.state.scripts.lock().clear();
    let tries = si.state.hits("hook").len();
    assert!(tries < 4, "n1 gave up on its own: {tries} webhook calls");
    let sent = abandoned_push_sent(&si, tries, started + claim + WAIT).await;
    assert_clean(std::slice::from_ref(&sent));
    assert_eq!(sent.body["node"], "n2", "the node left took the push over");
    assert_eq!(sent.body["count"], 1);
    assert!(
        sent.at >= started + claim - Duration::from_millis(100),
        "taken over only once the claim ran out: {:?} after the event, the claim lasts {claim:?}",
        sent.at - started
    );
    drop(n2);
}

/// A node stopped gracefully while its push is in flight (here: the provider's token endpoint
/// is slow) sends that push before it exits: the push window it claimed would otherwise leave
/// the wallet asleep until its next event.
#[actix_rt::test]
async fn a_graceful_stop_finishes_the_push_in_flight() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 60, &["proj-a"], false).await;
    set_device(&a, FCM, json!("stopping-node-token"), Some("android")).await;
    si.state.script(
        "token",
        vec![Reply::new(200, json!({})).delayed(Duration::from_millis(1500))],
    );
    forward(&n, &a, &k, "wake up").await;
    eventually("the token grant under way", || async {
        si.state.arrived.lock().iter().any(|k| k == "token").then_some(())
    })
    .await;
    assert!(si.state.hits("fcm:").is_empty(), "the token is held: no push yet");
    n.stop().unwrap();
    // `stop` returned: the node is gone, and its push reached the provider first.
    let hits = si.state.hits("fcm:");
    assert_eq!(hits.len(), 1, "the push in flight went out before the node exited");
    assert_clean(&hits);
}

/// The config file of a cluster whose n1 is a `mailroom` process (`n1`, free addresses) and
/// whose other nodes are in-process (their listeners already bound), with this stand-in's
/// `[push]` section: every node reads the same file.
fn write_mixed_cluster(
    dir: &std::path::Path,
    db_url: &str,
    si: &StandIn,
    window_secs: u64,
    failure_timeout_ms: u64,
    nodes: &[mailroom::config::NodeEntry],
) -> (std::path::PathBuf, mailroom::config::Config) {
    let mut text = format!(
        "[cluster]\nname = \"push-kill\"\nsecret = \"{SECRET}\"\nheartbeat_ms = 100\nfailure_timeout_ms = {failure_timeout_ms}\n\n\
         [store]\nbackend = \"postgres\"\nurl = \"{db_url}\"\npool_size = 4\n\n\
         [delivery]\nsweep_interval_ms = 200\nlease_ms = 30000\n\n"
    );
    for n in nodes {
        text.push_str(&format!(
            "[[node]]\nid = \"{}\"\nlisten = \"{}\"\ncluster = \"{}\"\nadmin = \"{}\"\n\n",
            n.id,
            n.listen,
            n.cluster.as_deref().unwrap(),
            n.admin
        ));
    }
    text.push_str("[push]\n");
    text.push_str(
        &si.push_toml(window_secs, &["proj-a"], true)
            .replace("[[fcm]]", "[[push.fcm]]")
            .replace("[apns]", "[push.apns]")
            .replace("[webhook]", "[push.webhook]"),
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, &text).unwrap();
    let cfg = mailroom::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"));
    (path, cfg)
}

/// A lone `mailroom` process on sled (the default store) pushing to a [`StandIn`] (window
/// 60 s, FCM), with its config and data in a directory of its own: started again on the same.
struct SledProcess {
    dir: tempfile::TempDir,
    /// The config without its `[[node]]`: each run names addresses of its own.
    config: String,
}

impl SledProcess {
    fn new(si: &StandIn) -> SledProcess {
        let dir = tempfile::tempdir().unwrap();
        let push = si
            .push_toml(60, &["proj-a"], false)
            .replace("[[fcm]]", "[[push.fcm]]")
            .replace("[apns]", "[push.apns]");
        let config = format!(
            "[store]\nbackend = \"sled\"\npath = {:?}\n\n[delivery]\nlease_ms = 600000\n\n[push]\n{push}\n",
            dir.path().join("data"),
        );
        SledProcess { dir, config }
    }

    /// Start `i` (its own log and config), once ready. Each run listens on addresses held for
    /// it until it inherits them (`free_addr`): a restart on the addresses the run before had
    /// bound them itself, and a port freed by the stop could be taken by any other socket on
    /// the machine meanwhile (the node then never came up: "not ready after 90 s", seen in CI).
    async fn run(&self, i: usize) -> NodeProcess {
        let entry = mailroom::config::NodeEntry {
            id: "n1".into(),
            listen: free_addr(),
            cluster: None,
            admin: free_addr(),
        };
        let text = format!(
            "[[node]]\nid = \"n1\"\nlisten = \"{}\"\nadmin = \"{}\"\n\n{}",
            entry.listen, entry.admin, self.config
        );
        let path = self.dir.path().join(format!("mailroom-{i}.toml"));
        std::fs::write(&path, &text).unwrap();
        let log = self.dir.path().join(format!("n1-{i}.log"));
        let p = NodeProcess::spawn(&path, &entry, &log);
        p.wait_ready().await;
        p
    }
}

/// A wallet onboarded on node process `p`, registered with `token`, offline with one message
/// queued, once pushed for it (the first push at `si`).
async fn offline_wallet_pushed(si: &StandIn, p: &NodeProcess, token: &str) -> (Agent, KeyPair) {
    let (a, k) = Agent::onboard(&invitation_at(&p.public_url()).await).await.unwrap();
    set_device(&a, FCM, json!(token), Some("android")).await;
    let routing = a.grant.clone().unwrap().routing_keys;
    let st = Sender::new()
        .forward(&p.public_url(), &basic_message("waiting"), &k.verkey(), &routing)
        .await
        .unwrap();
    assert_eq!(st, 202);
    wait_hits(si, "fcm:", 1).await;
    (a, k)
}

/// `/status` `store.previous_run_unfinished` of a node process.
async fn previous_run_unfinished(p: &NodeProcess) -> Value {
    get_json(&format!("{}/status", p.admin_url())).await["store"]["previous_run_unfinished"].clone()
}

/// A lone sled node (the default store: leases in memory only) is killed while its wallet's
/// socket holds a delivery not yet acknowledged: the wallet's socket died with it, and nobody
/// would wake it. Started again, the node finds its last run unfinished and pushes every
/// wallet with mail pending, but one whose mediation was revoked (it keeps its queue and its
/// device; pickup refuses it). A clean stop and start after that pushes nobody again (the
/// stop marks the store; a clean stop gives back and pushes for its own deliveries).
#[actix_rt::test]
async fn a_sled_node_killed_with_mail_in_flight_pushes_its_wallet_when_it_starts_again() {
    let si = StandIn::start();
    let node = SledProcess::new(&si);
    let run = |i: usize| node.run(i);
    let status = previous_run_unfinished;
    let tokens = |t: &str| {
        let hits = si.state.hits("fcm:");
        hits.iter().filter(|h| h.body["message"]["token"] == t).count()
    };

    let mut p = run(1).await;
    let inv = invitation_at(&p.public_url()).await;
    // An offline wallet with mail, pushed for it, then revoked.
    let (_b, kb) = offline_wallet_pushed(&si, &p, "revoked-sled-token").await;
    let all = get_json(&format!("{}/connections", p.admin_url())).await;
    let revoked = all["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["routing_keys"]
                .as_array()
                .is_some_and(|ks| ks.contains(&json!(kb.verkey())))
        })
        .expect("b's connection")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = common::client()
        .post(format!("{}/connections/{revoked}/mediation", p.admin_url()))
        .send_json(&json!({"state": "denied"}))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(tokens("revoked-sled-token"), 1);

    let (mut a, k) = Agent::onboard(&inv).await.unwrap();
    set_device(&a, FCM, json!("crashed-sled-token"), Some("android")).await;
    let mut ws = live_socket_at(&a, &p.ws_url()).await;
    Sender::new()
        .forward(
            &p.public_url(),
            &basic_message("in-flight"),
            &k.verkey(),
            &a.grant.clone().unwrap().routing_keys,
        )
        .await
        .unwrap();
    let d = ws_next_message(&a, &mut ws).await;
    assert_eq!(type_name(&d), "delivery", "delivered live, not acknowledged: {d}");
    assert_eq!(tokens("crashed-sled-token"), 0, "live: no push");

    p.kill9();
    drop(ws);
    let p = run(2).await;
    assert_eq!(status(&p).await, json!(true));
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["token"], "crashed-sled-token");
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");

    // A clean stop, then a start: nothing to wake.
    let mut p = p;
    assert!(p.terminate().success());
    let p = run(3).await;
    assert_eq!(status(&p).await, json!(false));
    // The wallet gets its mail from the node started again.
    a.endpoint = p.public_url();
    let d = a
        .request(&pickup("delivery-request", json!({"limit": 10})))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery_ids(&a, &d).len(), 1, "{d}");
    assert_eq!(tokens("crashed-sled-token"), 1, "pushed once, not at the clean start");
    assert_eq!(tokens("revoked-sled-token"), 1, "a revoked wallet is not woken");
}

/// A sled node started after a crash is stopped while the push its wake-up owes a wallet is
/// still being retried (FCM answers 503, try again in 4 s; the stop gives pushes 5 s): the
/// stop leaves the store marked, and the next start pushes the wallet. Before, any clean stop
/// cleared the mark, and the wallet was left asleep.
#[actix_rt::test]
async fn a_stop_that_abandons_the_wake_up_push_leaves_the_store_marked() {
    let si = StandIn::start();
    let node = SledProcess::new(&si);
    let mut p = node.run(1).await;
    offline_wallet_pushed(&si, &p, "owed-token").await;
    p.kill9();

    let busy = Reply::new(503, json!({"error": {"status": "UNAVAILABLE"}})).retry_after("4");
    si.state.script("fcm:proj-a", vec![busy; 10]);
    let mut p = node.run(2).await;
    assert_eq!(previous_run_unfinished(&p).await, json!(true));
    let tried = wait_hits(&si, "fcm:", 2).await;
    assert_eq!(tried[1].status, 503, "the wake-up's push is being retried");
    assert!(p.terminate().success());
    si.state.scripts.lock().clear();

    let p = node.run(3).await;
    assert_eq!(
        previous_run_unfinished(&p).await,
        json!(true),
        "the abandoned push kept the mark"
    );
    let sent = eventually("the owed push sent", || async {
        si.state
            .hits("fcm:")
            .into_iter()
            .find(|h| h.status == 200 && h.at > tried[1].at)
    })
    .await;
    assert_clean(std::slice::from_ref(&sent));
    assert_eq!(sent.body["message"]["token"], "owed-token");
}

/// Three PostgreSQL nodes; the wallet's live session is on n1, a real process. n1 is killed
/// with SIGKILL and a burst of forwards lands on n2 and n3 before anyone notices: they notify
/// n1 (gone) and wake nobody. Once n1 is found dead, the wallet, with no session anywhere, gets
/// exactly one push, from one node (the lowest id left: n2), not zero and not one per node.
#[actix_rt::test]
async fn kill_9_of_the_session_node_still_wakes_the_wallet_once() {
    const WINDOW_SECS: u64 = 3;
    // Room for the burst of 20 forwards through two nodes on one shared pool, loaded.
    const FAILURE_TIMEOUT_MS: u64 = 10_000;
    const FAILURE_TIMEOUT: Duration = Duration::from_millis(FAILURE_TIMEOUT_MS);
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let (l2, l3) = (bind_listeners(), bind_listeners());
    let n1_entry = mailroom::config::NodeEntry {
        id: "n1".into(),
        listen: free_addr(),
        cluster: Some(free_addr()),
        admin: free_addr(),
    };
    let (path, cfg) = write_mixed_cluster(
        dir.path(),
        &db.url,
        &si,
        WINDOW_SECS,
        FAILURE_TIMEOUT_MS,
        &[n1_entry.clone(), entry("n2", &l2), entry("n3", &l3)],
    );
    let mut p1 = NodeProcess::spawn(&path, &n1_entry, &dir.path().join("n1.log"));
    let store = open_shared_store(&cfg).await;
    let n2 = start_node(&cfg, "n2", l2, &store, Some(path.clone()));
    let n3 = start_node(&cfg, "n3", l3, &store, Some(path.clone()));
    p1.wait_ready().await;
    for (x, y) in [(&n2, "n1"), (&n2, "n3"), (&n3, "n1"), (&n3, "n2")] {
        eventually("link up", || async { peer_connected(x, y).await.then_some(()) }).await;
    }

    let inv = invitation(&n2).await;
    let (mut a, k) = Agent::onboard(&inv).await.unwrap();
    set_device(&a, FCM, json!("kill-9-token"), Some("android")).await;
    let conn = a_connection_id(&n2).await;
    let mut ws = live_socket_at(&a, &p1.ws_url()).await;
    wait_owner(&[&n2, &n3], &conn, "n1").await;
    forward(&n3, &a, &k, "while-live").await;
    assert_eq!(receive_and_ack(&a, &mut ws).await, 1);
    eventually("the live delivery acknowledged", || async {
        (queue_depth(&n2).await == 0).then_some(())
    })
    .await;

    p1.kill9();
    let killed = Instant::now();
    let texts: Vec<String> = (0..20).map(|i| format!("after-kill-{i}")).collect();
    forward_many(&[&n2, &n3], &a, &k, &texts).await;
    let burst = killed.elapsed();
    assert!(
        burst < Duration::from_millis(FAILURE_TIMEOUT_MS),
        "the burst ({burst:?}) must land before n1 is found dead"
    );
    // n1 is found dead a failure timeout after the kill; then n2 takes it over and pushes.
    let hits = wait_hits_until(&si, "fcm:", 1, killed + FAILURE_TIMEOUT + WAIT).await;
    assert_clean(&hits);
    let hooks = wait_hits_until(&si, "hook", 1, killed + FAILURE_TIMEOUT + WAIT).await;
    assert_eq!(hooks[0].body["node"], "n2", "the lowest node left takes over");
    // Nothing more within the window, nor at its end (no trailing push: no later event).
    tokio::time::sleep(Duration::from_millis(WINDOW_SECS * 1000 + 1_500)).await;
    // n3 notified n1 of the burst: once n3 has found n1 down, it wakes the wallet for it,
    // two failure timeouts later, and finds it pushed since (by n2's take-over).
    let deadline = killed + 3 * FAILURE_TIMEOUT + WAIT;
    while metric(&n3, "mailroom_push_coalesced_total").await < 1.0 {
        assert!(
            Instant::now() < deadline,
            "no wake-up from n3 for what it notified n1 of"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(si.state.hits("fcm:").len(), 1, "one push, not one per node");
    assert_eq!(metric(&n3, "mailroom_push_total").await, 0.0, "n3 sent nothing");
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "20");
    println!(
        "kill -9: burst of 20 in {burst:?}; push {:?} after the kill",
        hits[0].at - killed
    );
    // The woken wallet gets everything from the nodes left.
    a.endpoint = n3.public_url();
    let mut got = 0;
    while got < 20 {
        let d = a
            .request(&pickup("delivery-request", json!({"limit": 20})))
            .await
            .unwrap()
            .unwrap();
        let ids = delivery_ids(&a, &d);
        got += ids.len();
        a.request(&pickup("messages-received", json!({ "message_id_list": ids })))
            .await
            .unwrap();
    }
}

async fn forwards_per_node(nodes: &[RunningNode]) -> Vec<f64> {
    let mut per = Vec::new();
    for n in nodes {
        per.push(metric(n, "mailroom_forwards_received_total").await);
    }
    per
}

/// Issue 7's cluster case as operators run it: nginx round-robin in front of 3 PostgreSQL
/// nodes, the wallet and its senders only ever talking to nginx. Offline: 100 forwards spread
/// over the nodes give one push now and one trailing push for the whole cluster. Live (its
/// socket on whichever node nginx picked): forwards landing on every node give no push. The
/// socket closes: pushes resume.
#[actix_rt::test]
async fn through_nginx_in_front_of_three_nodes() {
    use common::nginx::Nginx;
    let si = StandIn::start();
    // Roomy: `burst_pushes` wants a single push before the window's end, which a burst longer
    // than the window (a loaded box) would give more of.
    let window = Duration::from_secs(6);
    let mut lb = None;
    let c = cluster_with(3, 100, |cfg| {
        cfg.push = Some(si.push_config(window.as_secs(), &["proj-a"], true));
        let n = Nginx::start(&cfg.nodes.iter().map(|n| n.listen.clone()).collect::<Vec<_>>());
        cfg.cluster.public_url = Some(n.url());
        lb = Some(n);
    })
    .await;
    let (lb, nodes) = (lb.unwrap(), &c.nodes);
    let v = get_json(&format!("{}/invitation", lb.url())).await;
    let inv = mailroom::client::Invitation::parse(&v["invitation"]).unwrap();
    assert_eq!(inv.http, lb.url(), "the invitation names the load balancer");
    let (a, k) = Agent::onboard(&inv).await.unwrap();
    set_device(&a, FCM, json!("nginx-token"), Some("android")).await;
    let lb_urls = vec![lb.url()];

    // Offline: 100 forwards through nginx (round-robin over the 3 nodes).
    let started = Instant::now();
    let texts: Vec<String> = (0..100).map(|i| format!("off-{i}")).collect();
    forward_many_to(&lb_urls, &a, &k, &texts).await;
    let burst = started.elapsed();
    let per_node = forwards_per_node(nodes).await;
    assert!(
        per_node.iter().all(|c| *c > 0.0),
        "nginx spread the forwards: {per_node:?}"
    );
    // Measured from the burst's start, not from the first push's arrival: that one can reach
    // the provider late on a loaded machine (token grant, TLS), the window runs from the event.
    let trailing_from = started + window - Duration::from_millis(100);
    let trailing = eventually("a push after the window", || async {
        si.state.hits("fcm:").into_iter().find(|h| h.at >= trailing_from)
    })
    .await;
    let nodes_ref: Vec<&RunningNode> = nodes.iter().collect();
    let (hits, early, _, seen) = burst_pushes(&si, &nodes_ref, started, trailing_from, burst).await;
    // Only a burst well inside the window (which runs from the node's first event) is sure to
    // have been folded whole.
    if burst < window / 2 {
        assert_eq!(
            hits.len(),
            early + 1,
            "one trailing push, cluster-wide; pushes: {seen:?}"
        );
        assert_eq!(trailing.body["message"]["data"]["message_count"], "100");
    }
    let hooks = wait_hits(&si, "hook", 2).await;
    println!(
        "through nginx: 100 forwards in {burst:?} over {per_node:?} -> pushes from {:?}",
        hooks.iter().map(|h| h.body["node"].clone()).collect::<Vec<_>>()
    );

    // Live through nginx: drain the queue, then forwards on every node give no push.
    let mut ws = a.websocket(&format!("ws://{}/", lb.addr)).await.unwrap();
    let st = ws_request(
        &a,
        &mut ws,
        &pickup("live-delivery-change", json!({"live_delivery": true})),
    )
    .await;
    assert_eq!(type_name(&st), "status", "{st}");
    let mut got = 0;
    while got < 100 {
        got += receive_and_ack(&a, &mut ws).await;
    }
    let conn = a_connection_id(&nodes[0]).await;
    let owner = eventually("a node owns the live session", || async {
        owner_seen_by(&nodes[0], &conn).await
    })
    .await;
    for n in nodes {
        wait_owner(&[n], &conn, &owner).await;
    }
    // Past the window, so a push would not be folded into a trailing one.
    tokio::time::sleep(window).await;
    let before = si.state.hits("fcm:").len();
    let texts: Vec<String> = (0..9).map(|i| format!("live-{i}")).collect();
    forward_many_to(&lb_urls, &a, &k, &texts).await;
    let mut got = 0;
    while got < 9 {
        got += receive_and_ack(&a, &mut ws).await;
    }
    let per_node_after = forwards_per_node(nodes).await;
    assert!(
        per_node_after.iter().zip(&per_node).all(|(a, b)| a > b),
        "the live forwards landed on every node: {per_node:?} -> {per_node_after:?}"
    );
    assert_eq!(
        si.state.hits("fcm:").len(),
        before,
        "no push while the wallet was live on {owner}"
    );

    // The socket closes: the next forward wakes the wallet again.
    eventually("queue empty", || async {
        (queue_depth(&nodes[0]).await == 0).then_some(())
    })
    .await;
    ws.close().await;
    for n in nodes {
        eventually("no owner any more", || async {
            owner_seen_by(n, &conn).await.is_none().then_some(())
        })
        .await;
    }
    forward_many_to(&lb_urls, &a, &k, &["after-close".to_string()]).await;
    wait_hits(&si, "fcm:", before + 1).await;
}

/// Two wallets of one mediator: each message acts on the connection of the key that
/// authcrypted it. B reads only its own registration and replaces only its own; an anoncrypted
/// `set-device-info` (nobody's key) acts on no connection and is refused. A's token stays A's.
#[actix_rt::test]
async fn a_wallet_reads_and_replaces_only_its_own_device_registration() {
    let si = StandIn::start();
    let (_d, n, a, _k) = push_node(&si, 60, &["proj-a"], false).await;
    let (b, _kb) = Agent::onboard(&invitation(&n).await).await.unwrap();
    set_device(&a, FCM, json!("token-of-a"), Some("android")).await;
    let seen_by_b = get_device(&b, FCM).await;
    assert_eq!(
        seen_by_b["description"]["code"], "not-registered-for-push-notifications",
        "B sees no registration, not A's: {seen_by_b}"
    );
    assert_eq!(type_name(&set_device(&b, FCM, json!("token-of-b"), None).await), "ack");
    assert_eq!(
        set_device(&b, FCM, json!(""), None).await["@type"]
            .as_str()
            .map(|t| t.ends_with("/ack")),
        Some(true)
    );
    // Anoncrypted to the mediator: no sender key, so no connection to act on.
    let anon = json!({
        "@type": format!("https://didcomm.org/{FCM}/1.0/set-device-info"),
        "@id": new_id(),
        "device_token": "token-of-a-stranger",
        "device_platform": "android",
        "~transport": { "return_route": "all" },
    });
    let env = mailroom::didcomm::envelope::pack(
        &serde_json::to_vec(&anon).unwrap(),
        std::slice::from_ref(&a.mediator_verkey),
        None,
    )
    .unwrap();
    let (status, _) = post_raw(&n.public_url(), "application/didcomm-envelope-enc", env).await;
    assert!(
        (400..500).contains(&status),
        "an anoncrypted registration answered {status}"
    );
    let info = get_device(&a, FCM).await;
    assert_eq!(info["device_token"], "token-of-a", "{info}");
}

/// Only a connection the mediator mediates for may register a device: one that never asked
/// for mediation (or whose mediation was revoked) gets a problem report and registers
/// nothing, so a stranger cannot have someone else's device pushed from connections of its own.
#[actix_rt::test]
async fn a_connection_without_mediation_registers_no_device() {
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(
        dir.path(),
        mailroom::config::Strategy::QueueAndLiveModeDelivery,
    ));
    let inv = invitation(&n).await;
    let a = Agent::connect(&inv).await.expect("a connection, no mediation");
    let r = set_device(&a, FCM, json!("someone-elses-token"), Some("android")).await;
    assert!(r["@type"].as_str().unwrap_or("").ends_with("/problem-report"), "{r}");
    assert!(
        r["description"]["en"]
            .as_str()
            .unwrap_or("")
            .contains("needs mediation"),
        "{r}"
    );
    let conns = get_json(&format!("{}/connections", n.admin_url())).await;
    let id = conns["connections"][0]["id"].as_str().unwrap().to_string();
    let c = get_json(&format!("{}/connections/{id}", n.admin_url())).await;
    assert!(c.get("push").is_some_and(Value::is_null), "a device registered: {c}");
}

/// A webhook that answers 503 with `Retry-After: 60` (waited for: `retry_max_ms` is the
/// default minute) beside FCM, which takes every push, on a node with one send slot: wallets A
/// and B each get a forward, back to back, and B's push goes out at once, each wallet pushed
/// once. Before, a push waited for the webhook beside its provider: A's push held the slot for
/// its webhook's five tries (four minutes), B's push waited that long, and, its budget (440 s)
/// running from its event, was cut off while its webhook still retried and pushed again once
/// its claim ran out.
#[actix_rt::test]
async fn a_webhook_asking_for_long_waits_holds_up_no_providers_push() {
    let si = StandIn::start();
    let wait_a_minute = Reply::new(503, json!({})).retry_after("60");
    si.state.script("hook", vec![wait_a_minute; 20]);
    let mut pc = si.push_config(60, &["proj-a"], true);
    pc.max_in_flight = 1;
    pc.retry_max_ms = 60_000;
    let (_dir, n, _store) = EventAnswerLost::node(pc, false).await;
    let (a, ka, _) = registered_wallet(&n, "pushed-first").await;
    let (b, kb, _) = registered_wallet(&n, "pushed-second").await;
    forward(&n, &a, &ka, "a").await;
    forward(&n, &b, &kb, "b").await;
    // Far short of the minute the webhook asks A's push to wait, were B's push behind it.
    let deadline = Instant::now() + Duration::from_secs(45);
    // Both, in whichever order the one slot takes them.
    let pushed = |h: &Hit, t: &str| h.body["message"]["token"] == t;
    loop {
        let hits = si.state.hits("fcm:");
        if hits.iter().any(|h| pushed(h, "pushed-first")) && hits.iter().any(|h| pushed(h, "pushed-second")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a push waits behind the other's webhook: {hits:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The webhook still got A's event (and waits to try it again).
    let hooks = wait_hits(&si, "hook", 1).await;
    assert_eq!(hooks[0].status, 503);
    eventually("both pushes counted sent", || async {
        (metric(&n, "mailroom_push_total{provider=\"fcm\",result=\"sent\"}").await == 2.0).then_some(())
    })
    .await;
    // Each once: neither was cut off and taken again.
    let hits = si.state.hits("fcm:");
    assert_clean(&hits);
    let of = |t: &str| hits.iter().filter(|h| pushed(h, t)).count();
    assert_eq!((of("pushed-first"), of("pushed-second")), (1, 1), "{hits:?}");
}

/// The webhook is the wallet's one channel (no provider serves its device) and refuses for its
/// setup (401 and 403: a secret rotated on one side first; 404: a wrong path; 408: a proxy's
/// timeout): the push is tried again, as FCM's and APNs' setup errors are, and goes out once
/// the webhook takes it, with the same event id on every try. Before, the first such answer
/// gave the push up for good and the wallet slept until its next message.
#[actix_rt::test]
async fn a_webhook_refusing_for_its_setup_is_tried_again() {
    let si = StandIn::start();
    si.state.script(
        "hook",
        [401, 403, 404, 408]
            .into_iter()
            .map(|s| Reply::new(s, json!({})))
            .collect(),
    );
    let (_d, n, a, k) = push_node(&si, 60, &[], true).await;
    set_device(&a, FCM, json!("webhook-only-token"), Some("android")).await;
    forward(&n, &a, &k, "x").await;
    let hooks = wait_hits(&si, "hook", 5).await;
    assert_clean(&hooks);
    let statuses: Vec<u16> = hooks.iter().map(|h| h.status).collect();
    assert_eq!(statuses, [401, 403, 404, 408, 200]);
    assert!(
        hooks.iter().all(|h| h.body["event_id"] == hooks[0].body["event_id"]),
        "one push, tried five times: {hooks:?}"
    );
    assert_eq!(hooks[4].body["token"], "webhook-only-token");
}

/// APNs answers 400 `BadDeviceToken` for a token of the other environment too (a sandbox
/// token pushed to production, `base_url` mixed up): the push fails and the token is kept.
/// Before, it was forgotten: a configuration slip deleted every APNs registration it pushed
/// to, and each wallet slept until it registered again.
#[actix_rt::test]
async fn an_apns_bad_device_token_is_not_forgotten() {
    let si = StandIn::start();
    let (_d, n, a, k) = push_node(&si, 0, &["proj-a"], false).await;
    set_device(&a, APNS, json!("sandbox-token"), None).await;
    si.state
        .script("apns", vec![Reply::new(400, json!({"reason": "BadDeviceToken"}))]);
    forward(&n, &a, &k, "x").await;
    let hits = wait_hits(&si, "apns", 1).await;
    assert_clean(&hits);
    eventually("the push counted failed", || async {
        (metric(&n, "mailroom_push_total{provider=\"apns\",result=\"failed\"}").await == 1.0).then_some(())
    })
    .await;
    let info = get_device(&a, APNS).await;
    assert_eq!(info["device_token"], "sandbox-token", "{info}");
    assert_eq!(metric(&n, "mailroom_push_dropped_tokens_total").await, 0.0);
}

/// A store whose give-backs fail as a transient error does: the release of a WebSocket
/// session's own leases (`release_owner` of a `ws` owner) while `fail_own`, that of the
/// messages handed to it (`release` by the hand-off owner) while `fail_handed`.
struct FailingGiveBack {
    inner: std::sync::Arc<dyn mailroom::store::Store>,
    fail_own: std::sync::atomic::AtomicBool,
    fail_handed: std::sync::atomic::AtomicBool,
}

impl FailingGiveBack {
    /// A node on this store under `strategy`, pushing at once to FCM at `si`, with leases
    /// longer than the test (no lease runs out to wake the wallet instead), and a wallet
    /// registered for push.
    async fn node_with_wallet(
        si: &StandIn,
        strategy: Strategy,
    ) -> (
        tempfile::TempDir,
        RunningNode,
        std::sync::Arc<FailingGiveBack>,
        Agent,
        KeyPair,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path(), strategy);
        cfg.push = Some(si.push_config(0, &["proj-a"], false));
        cfg.delivery.lease_ms = 120_000;
        let store = std::sync::Arc::new(FailingGiveBack {
            inner: mailroom::node::open_store(&cfg).await.unwrap(),
            fail_own: Default::default(),
            fail_handed: Default::default(),
        });
        let n = start_on(&cfg, store.clone());
        let (a, k) = Agent::onboard(&invitation(&n).await).await.unwrap();
        set_device(&a, FCM, json!("give-back-token"), Some("android")).await;
        (dir, n, store, a, k)
    }

    fn injected(what: &str) -> mailroom::store::StoreError {
        mailroom::store::StoreError::Unavailable(format!("injected: {what} timed out"))
    }
}

#[async_trait::async_trait]
impl mailroom::store::Store for FailingGiveBack {
    async fn release_owner(&self, owner: &str) -> mailroom::store::StoreResult<u64> {
        if self.fail_own.load(std::sync::atomic::Ordering::SeqCst) && owner.contains("/ws/") {
            return Err(FailingGiveBack::injected("release_owner"));
        }
        self.inner.release_owner(owner).await
    }
    async fn release(&self, conn: &str, ids: &[i64], owner: &str) -> mailroom::store::StoreResult<u64> {
        if self.fail_handed.load(std::sync::atomic::Ordering::SeqCst) && owner.ends_with("/handoff") {
            return Err(FailingGiveBack::injected("release"));
        }
        self.inner.release(conn, ids, owner).await
    }
    mailroom::store_pass_through!(inner:
        backend, health, identity_get_or_create, put_connection, get_connection, put_invitation,
        use_invitation, update_connection, connection_by_their_verkey, connection_by_thread,
        list_connections, keys_of, route, route_long_forms, enqueue, enqueue_routed, lease, lease_upto, ack_leased,
        release_owners_under, reclaim_expired_leases, queue_stats, total_queued, connections_with_pending,
        pending_among, prune_dedup, dedup_records, queue_log, begin_run, end_run, lease_for_key, lease_for_key_upto, pending_stats,
        expire, expire_due, oldest_received_ms, flush, device_of, set_device, forget_device_token, push_event,
        push_take_due, push_done, first_sight, forget_sight, prune_sights, update_keys, revoke_mediation,
        delete_connection, delete_unmediated, drop_queue, top_queues,
    );
}

/// Reads on a live socket until a delivery comes, not acknowledged; returns its contents.
async fn next_delivery(a: &Agent, ws: &mut WsClient) -> Vec<String> {
    loop {
        let d = ws_next_message(a, ws).await;
        if type_name(&d) == "delivery" {
            return contents(a, &d);
        }
    }
}

/// A live session closes with a delivery handed to it unacknowledged, and the store fails
/// the release of the session's own leases (a pool timeout). The handed message goes back
/// all the same, and the wallet is pushed for it. Before, the first failure ended the
/// give-back: the handed message stayed leased, and nobody was told until its lease ran out.
#[actix_rt::test]
async fn a_failed_release_of_a_sessions_own_leases_still_gives_back_and_pushes_for_the_rest() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let (_d, n, store, a, k) = FailingGiveBack::node_with_wallet(&si, Strategy::QueueAndLiveModeDelivery).await;
    let mut ws = live_socket(&a, &n).await;
    forward(&n, &a, &k, "handed").await;
    assert_eq!(next_delivery(&a, &mut ws).await, vec!["handed"]);
    assert_eq!(
        metric(&n, "mailroom_handoffs_total{to=\"local\"}").await,
        1.0,
        "handed to the session"
    );
    store.fail_own.store(true, SeqCst);
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
}

/// ... and the other way round: the session's own lease (a message queued before it went
/// live) goes back while the release of what was handed to it fails, and the wallet is pushed
/// for what went back. Before, the error threw away the count of what did: no push.
#[actix_rt::test]
async fn a_failed_release_of_handed_messages_still_pushes_for_what_went_back() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let (_d, n, store, a, k) = FailingGiveBack::node_with_wallet(&si, Strategy::QueueAndLiveModeDelivery).await;
    forward(&n, &a, &k, "queued").await;
    wait_hits(&si, "fcm:", 1).await;
    let mut ws = live_socket(&a, &n).await;
    assert_eq!(next_delivery(&a, &mut ws).await, vec!["queued"]);
    forward(&n, &a, &k, "handed").await;
    assert_eq!(next_delivery(&a, &mut ws).await, vec!["handed"]);
    store.fail_handed.store(true, SeqCst);
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    // The queue's count: the message that went back, and the handed one, still leased.
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "2");
    let c = get_json(&format!("{}/connections", n.admin_url())).await["connections"][0]["queue"].clone();
    assert_eq!(
        (c["pending"].clone(), c["in_flight"].clone()),
        (json!(1), json!(1)),
        "{c}"
    );
}

/// A quiet session (it takes nothing) closes with mail pending, and the store fails its
/// release. The mail it never took still wakes the wallet: before, a failed release skipped
/// the look at what was pending, and nothing woke the wallet again until new mail came.
#[actix_rt::test]
async fn a_quiet_session_whose_release_fails_still_pushes_for_the_mail_it_never_took() {
    use std::sync::atomic::Ordering::SeqCst;
    let si = StandIn::start();
    let (_d, n, store, a, k) = FailingGiveBack::node_with_wallet(&si, Strategy::QueueOnly).await;
    forward(&n, &a, &k, "pending").await;
    wait_hits(&si, "fcm:", 1).await;
    // The wallet, pushed, opens a socket and asks for its status, then goes away.
    let mut ws = a.websocket(&ws_url(&n)).await.unwrap();
    let st = ws_request(&a, &mut ws, &pickup("status-request", json!({}))).await;
    assert_eq!(st["message_count"], 1, "{st}");
    store.fail_own.store(true, SeqCst);
    ws.close().await;
    let hits = wait_hits(&si, "fcm:", 2).await;
    assert_clean(&hits);
    assert_eq!(hits[1].body["message"]["data"]["message_count"], "1");
    assert_eq!(queue_depth(&n).await, 1, "the quiet session took nothing");
}

/// Three nodes; only the n2<->n3 link breaks (n3 stays up, and a closed link finds no peer
/// down before the failure timeout). The wallet's only session, on n3, ends meanwhile: n3's
/// `Disown` reaches n1, not n2. A forward to n2 finds n3 named there and no link to it: the
/// notification fails and n2 pushes nobody. Once the link is back, n3's resync drops the claim
/// on n2, which is not the node that takes n3 over (n1 is) and tells nobody. Before, nobody
/// ever pushed the wallet: n2 forgot the failed notification on its next one to n3, and no
/// node held a session of it for a sweep to find. Now n2 notifies again what it could not send
/// once the link is back, and the wallet is pushed.
#[actix_rt::test]
async fn a_notification_lost_with_a_link_is_pushed_once_the_link_is_back() {
    let si = StandIn::start();
    let db = FreshDb::create().await;
    let (mut cfg, ls) = bind_cluster(3, &db.url, 100);
    cfg.push = Some(si.push_config(0, &["proj-a"], false));
    // The cut lasts well within it: n2 and n3 keep each other up, only their link is gone.
    cfg.cluster.failure_timeout_ms = 120_000;
    let store = open_shared_store(&cfg).await;
    let real = |i: usize| -> std::net::SocketAddr { cfg.nodes[i].cluster.clone().unwrap().parse().unwrap() };
    // n2's way to n3 and n3's way to n2 go through a proxy each; n1 reaches both directly.
    let (to_n3, to_n2) = (Proxy::start(real(2)).await, Proxy::start(real(1)).await);
    let mut cfg2 = cfg.clone();
    cfg2.nodes[2].cluster = Some(to_n3.addr.to_string());
    let mut cfg3 = cfg.clone();
    cfg3.nodes[1].cluster = Some(to_n2.addr.to_string());
    let mut it = ls.into_iter();
    let n1 = start_node(&cfg, "n1", it.next().unwrap(), &store, None);
    let n2 = start_node(&cfg2, "n2", it.next().unwrap(), &store, None);
    let n3 = start_node(&cfg3, "n3", it.next().unwrap(), &store, None);
    for (x, y) in [
        (&n1, "n2"),
        (&n1, "n3"),
        (&n2, "n1"),
        (&n2, "n3"),
        (&n3, "n1"),
        (&n3, "n2"),
    ] {
        eventually("link up", || async { peer_connected(x, y).await.then_some(()) }).await;
    }
    let (a, k) = Agent::onboard(&invitation(&n3).await).await.unwrap();
    set_device(&a, FCM, json!("lost-link-token"), Some("android")).await;
    let conn = a_connection_id(&n3).await;
    let ws = live_socket(&a, &n3).await;
    wait_owner(&[&n1, &n2], &conn, "n3").await;

    to_n3.cut();
    to_n2.cut();
    eventually("n2 and n3 unlinked", || async {
        (!peer_connected(&n2, "n3").await && !peer_connected(&n3, "n2").await).then_some(())
    })
    .await;
    ws.close().await;
    eventually("n1 sees no owner", || async {
        owner_seen_by(&n1, &conn).await.is_none().then_some(())
    })
    .await;
    eventually("n3 done with the session", || async {
        let st = get_json(&format!("{}/status", n3.admin_url())).await;
        (st["open_sockets"] == 0).then_some(())
    })
    .await;
    assert_eq!(
        owner_seen_by(&n2, &conn).await.as_deref(),
        Some("n3"),
        "n3's Disown was lost with the link"
    );
    let failed = "mailroom_cluster_notifications_failed_total";
    let failed_before = metric(&n2, failed).await;
    forward(&n2, &a, &k, "while-cut").await;
    eventually("n2's notification to n3 failed", || async {
        (metric(&n2, failed).await > failed_before).then_some(())
    })
    .await;
    assert!(si.state.hits("fcm:").is_empty(), "n2 counts on n3 for the wallet");

    to_n3.restore();
    to_n2.restore();
    let hits = wait_hits(&si, "fcm:", 1).await;
    assert_clean(&hits);
    assert_eq!(hits[0].body["message"]["data"]["message_count"], "1");
    eventually("n2 sees no owner once n3's resync is in", || async {
        owner_seen_by(&n2, &conn).await.is_none().then_some(())
    })
    .await;
}
