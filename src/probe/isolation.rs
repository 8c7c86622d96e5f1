//! Isolation between two wallets of the same mediator: B cannot read A's queue nor acknowledge
//! A's messages, a forward to A never reaches B, and B registering A's key (key takeover) is
//! refused or at least leaves A's messages with A (the line says which).
//!
//! A receives through pickup 2.0 when the mediator speaks it, else on an implicit
//! (return-route) socket. B looks every way it could get A's mail: while A's message waits,
//! status and delivery requests with and without RFC 0685's `recipient_key` set to A's key, and
//! pickup 1.0 batch-pickup (isolation-read); while a forward to A is delivered, pickup 2.0 and
//! a socket, in live mode where the mediator has it (isolation-forward).

use super::pickup::not_advertised;
use super::target::Target;
use super::wallet::{
    contents, declined, is_type, nonce, poll, problem, routed, show, trust_ping, update_result, Incoming, Socket,
    SocketClosed, Wallet,
};
use super::{fail, fresh_wallet, is_blocked, pass, pass_note, skip, Options, Runner, Verdict};
use crate::client::HttpStatus;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// How long B keeps watching after A has its message.
const WATCH: Duration = Duration::from_millis(1500);
/// One turn of listening (a delivery-request, then the socket), alternating between A and B.
/// Their sockets' pings are answered by the sockets' own tasks whatever the turn
/// ([`Socket`]), also while B onboards or the forward is posted.
const SLICE: Duration = Duration::from_millis(100);

/// What A and B got while watched.
struct Watched {
    a_got: Vec<Incoming>,
    b_got: Vec<Incoming>,
    /// B's pickup 2.0 `message_count` after the window (0 when B does not pick up). B has no
    /// mail of its own: anything counted is someone else's.
    b_left: u64,
}

/// A listens until `a_done` holds or `within` passes, B all along and `WATCH` longer; then B
/// asks once more by pickup (status-request, then delivery-request). A leak delivered after
/// the window (by a sweep, from another node) is then still seen while it waits in B's queue.
async fn watch(
    a: &mut Receiver,
    b: &mut Receiver,
    within: Duration,
    a_done: impl Fn(&[Incoming]) -> bool,
) -> anyhow::Result<Watched> {
    let (mut a_got, mut b_got) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + within;
    while !a_done(&a_got) && Instant::now() < deadline {
        a.step(SLICE, &mut a_got).await?;
        b.step(SLICE, &mut b_got).await?;
    }
    let watch_end = Instant::now() + WATCH;
    while Instant::now() < watch_end {
        b.step(SLICE, &mut b_got).await?;
    }
    // The count first: a delivery-request leases what it hands out, and leased messages are
    // not counted (RFC 0685's count is of messages waiting).
    let b_left = if b.pickup { b.w.status().await? } else { 0 };
    b.step(Duration::ZERO, &mut b_got).await?;
    Ok(Watched { a_got, b_got, b_left })
}

/// Why A did not get its message, when its socket was closed on it.
fn a_closed(a: &Receiver) -> String {
    a.closed
        .as_ref()
        .map(|c| format!(" (A's socket was closed: {c})"))
        .unwrap_or_default()
}

/// How a wallet receives.
#[derive(Clone, Copy)]
struct Ways {
    pickup: bool,
    socket: bool,
    /// Its socket asks for pickup 2.0 live mode (else it is an implicit, return-route one).
    live: bool,
}

/// A wallet and what it listens on.
struct Receiver {
    w: Wallet,
    sock: Option<Socket>,
    pickup: bool,
    /// Why the socket stopped (the mediator closed it).
    closed: Option<String>,
    /// What is worth saying about how it listens (live mode refused).
    note: Option<String>,
    /// "A" or "B", for reasons.
    who: &'static str,
}

impl Receiver {
    async fn open(t: &Target, who: &'static str, ways: Ways) -> anyhow::Result<Receiver> {
        let w = fresh_wallet(t).await?;
        let sock = match (&t.ws, ways.socket) {
            (Some(ws), true) => {
                let mut s = w.socket(ws).await?;
                s.request(&w, &trust_ping(), "trust_ping", "ping_response").await?;
                Some(s)
            }
            _ => None,
        };
        let mut r = Receiver {
            w,
            sock,
            pickup: ways.pickup,
            closed: None,
            note: None,
            who,
        };
        if ways.live {
            r.live_mode().await;
        }
        Ok(r)
    }

    /// Turns pickup 2.0 live mode on for the socket, so the mediator's live delivery path is
    /// watched too (a leak there is as bad as one by pickup). A mediator that refuses leaves
    /// the socket watching as an implicit one; the check's note says so.
    async fn live_mode(&mut self) {
        let Some(s) = &mut self.sock else { return };
        let change = routed(
            "messagepickup/2.0",
            "live-delivery-change",
            json!({ "live_delivery": true }),
        );
        if let Err(e) = s.request(&self.w, &change, "messagepickup", "status").await {
            if e.downcast_ref::<SocketClosed>().is_some() {
                self.closed = Some(format!("{e:#}"));
                self.sock = None;
            }
            self.note = Some(format!("live mode refused on {}'s socket ({e:#})", self.who));
        }
    }

    /// One round of listening: a delivery-request (when this wallet picks up), then the
    /// socket for up to `slice`. A socket the mediator closes stops being read (the line
    /// of the check says so only if it mattered). A frame that cannot be read is an error:
    /// it may be A's message, or B's leak, in a shape the probe cannot see into.
    async fn step(&mut self, slice: Duration, got: &mut Vec<Incoming>) -> anyhow::Result<()> {
        if self.pickup {
            got.extend(self.w.delivery_request(10).await?);
        }
        let until = Instant::now() + slice;
        match &mut self.sock {
            Some(s) => match s.read_until(&self.w, until, |_| false).await {
                Ok((more, _)) => got.extend(more),
                Err(e) if e.downcast_ref::<SocketClosed>().is_some() => {
                    self.closed = Some(format!("{e:#}"));
                    self.sock = None;
                }
                Err(e) => return Err(e.context(format!("{}'s socket", self.who))),
            },
            None => tokio::time::sleep_until(until).await,
        }
        Ok(())
    }

    async fn close(&mut self) {
        if let Some(s) = self.sock.take() {
            s.close().await;
        }
    }
}

/// Whether check `name` passed; None when it did not run or a wallet could not onboard for it
/// (which says nothing of the feature).
fn passed(r: &Runner, name: &str) -> Option<bool> {
    r.report
        .get(name)
        .filter(|c| !is_blocked(&c.verdict))
        .map(|c| matches!(c.verdict, Verdict::Pass(_)))
}

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let pickup = passed(r, "pickup-2.0-status").unwrap_or(not_advertised(t, "messagepickup", 2).is_none());
    let implicit = t.ws.is_some() && passed(r, "implicit-ws").unwrap_or(true);
    // A uses one way only (a socket would take what pickup should see); B watches both.
    let a_ways = Ways {
        pickup,
        socket: !pickup && implicit,
        live: false,
    };
    let b_ways = Ways {
        pickup,
        socket: t.ws.is_some(),
        live: false,
    };
    // isolation-forward's B also watches live delivery, where the mediator has it.
    let b_live = Ways {
        live: pickup && passed(r, "live-mode-ws") != Some(false),
        ..b_ways
    };
    let no_way = "no way to receive: neither pickup 2.0 nor implicit delivery on a socket worked";

    for name in ["isolation-read", "isolation-ack"] {
        if !pickup {
            r.skip(name, "pickup 2.0 not available");
        }
    }
    if pickup {
        let mut pair: Option<(Wallet, Wallet, Vec<String>, String)> = None;
        let read = r
            .check("isolation-read", async {
                let a = fresh_wallet(t).await?;
                let b = fresh_wallet(t).await?;
                let content = nonce("isolation-read");
                a.forward(&content).await?;
                let queued = poll(t.timeout, Duration::from_millis(250), || async {
                    Ok((a.status().await? >= 1).then_some(()))
                })
                .await?;
                if queued.is_none() {
                    return fail("A's message_count stayed 0 after a forward to A");
                }
                let not_tried = match b_reads_nothing(t, &b, &a.key.verkey()).await? {
                    Ok(n) => n,
                    Err(why) => return fail(why),
                };
                let a_got = a.open_ids(&delivery_of(&a).await?)?;
                let ids: Vec<String> = a_got
                    .iter()
                    .filter(|(_, i)| matches!(i, Incoming::Message { content: Some(c), .. } if *c == content))
                    .map(|(id, _)| id.clone())
                    .collect();
                if ids.is_empty() {
                    return fail("A's own delivery-request did not return A's message");
                }
                pair = Some((a, b, ids, content));
                if not_tried.is_empty() {
                    pass()
                } else {
                    pass_note(format!("B could not ask by {}", not_tried.join("; ")))
                }
            })
            .await;
        let redelivers = passed(r, "redelivery");
        r.check("isolation-ack", async {
            let Some((a, b, ids, content)) = pair else {
                return match read {
                    // Blocked the same way.
                    Some(v) if is_blocked(&v) => Ok(v),
                    _ => skip("not run: isolation-read did not finish"),
                };
            };
            let before = a.status().await?;
            // B acknowledges A's message ids. Whatever the answer says (B's own status, a
            // problem report, a 4xx, nothing), it must be an answer: a mediator that times out
            // or fails on it may have acted on it, or not, and nothing below could tell.
            if let Err(why) = answered(b.agent.request(&messages_received(&ids)).await) {
                return fail(format!("B's messages-received with A's ids: {why}"));
            }
            // A mediator may act on an ack after answering it: A's count is read again for a
            // short while, and must not drop below what it was.
            let dropped = poll(ACK_SETTLE, Duration::from_millis(250), || async {
                let n = a.status().await?;
                Ok((n < before).then_some(n))
            })
            .await?;
            if let Some(after) = dropped {
                return fail(format!(
                    "B's messages-received with A's ids dropped A's message_count from {before} to {after}"
                ));
            }
            if before > 0 {
                let left = a.ack(&ids).await?;
                if left >= before {
                    return fail(format!(
                        "A's own ack left message_count at {left} (was {before}): acks do not work at all"
                    ));
                }
                return pass_note("A's message_count unchanged by B's ack");
            }
            // The status does not count a message out for delivery: A's unacknowledged
            // message must come back to A once the mediator offers it again.
            if redelivers == Some(false) {
                return skip(
                    "cannot tell: the status counts no message out for delivery and the mediator does not redeliver",
                );
            }
            let start = std::time::Instant::now();
            let back = poll(opts.redelivery_wait, Duration::from_millis(250), || async {
                Ok(contents(&a.delivery_request(10).await?)
                    .0
                    .contains(&content)
                    .then_some(()))
            })
            .await?;
            match back {
                Some(()) => {
                    a.ack(&ids).await?;
                    pass_note(format!(
                        "A's message offered to A again {:.1} s after B acknowledged its id",
                        start.elapsed().as_secs_f64()
                    ))
                }
                None => fail(format!(
                    "after B acknowledged A's message id, A's message never came back to A (waited {:?})",
                    opts.redelivery_wait
                )),
            }
        })
        .await;
    }

    r.check("isolation-forward", async {
        if !a_ways.pickup && !a_ways.socket {
            return skip(no_way);
        }
        let mut a = Receiver::open(t, "A", a_ways).await?;
        let mut b = Receiver::open(t, "B", b_live).await?;
        let content = nonce("isolation-forward");
        a.w.forward(&content).await?;
        let seen = watch(&mut a, &mut b, t.timeout, |g| contents(g).0.contains(&content)).await?;
        let a_key = a.w.key.verkey();
        a.close().await;
        b.close().await;
        if contents(&seen.b_got).1.contains(&a_key) {
            return fail("a forward to A reached B");
        }
        if seen.b_left > 0 {
            return fail(format!(
                "after a forward to A, B's status-request counted {} message(s) once the watch was over (B has no mail of its own)",
                seen.b_left
            ));
        }
        if !contents(&seen.a_got).0.contains(&content) {
            return fail(format!(
                "a forward to A did not reach A within {:?}{}",
                t.timeout,
                a_closed(&a)
            ));
        }
        match b.note {
            Some(n) => pass_note(n),
            None => pass(),
        }
    })
    .await;

    r.check("key-takeover", async {
        if !a_ways.pickup && !a_ways.socket {
            return skip(no_way);
        }
        let mut a = Receiver::open(t, "A", a_ways).await?;
        let mut b = Receiver::open(t, "B", b_ways).await?;
        let a_key = a.w.key.clone();
        let update = routed(
            "coordinate-mediation/1.0",
            "keylist-update",
            json!({ "updates": [{ "recipient_key": a_key.did_key(), "action": "add" }] }),
        );
        let answer = takeover_answer(b.w.agent.request(&update).await, &a_key.verkey());
        if !matches!(answer, Takeover::Refused(_)) {
            // B may hold A's key now: B removes it when the run ends.
            super::tidy::remember(t, &b.w.agent, &a_key, &Default::default());
        }
        let content = nonce("takeover");
        a.w.forward_to(&a_key.verkey(), &content).await?;
        let seen = watch(&mut a, &mut b, t.timeout, |g| contents(g).0.contains(&content)).await?;
        a.close().await;
        b.close().await;
        if contents(&seen.b_got).1.contains(&a_key.verkey()) {
            return fail(format!(
                "B's keylist-update adding A's key ({answer}) and a forward to that key reached B"
            ));
        }
        if seen.b_left > 0 {
            return fail(format!(
                "after B's keylist-update adding A's key ({answer}) and a forward to that key, B's status-request counted {} message(s) once the watch was over (B has no mail of its own)",
                seen.b_left
            ));
        }
        if !contents(&seen.a_got).0.contains(&content) {
            return fail(format!(
                "after B's keylist-update adding A's key ({answer}) a forward to that key reached neither A (waited {:?}) nor B: another wallet can cut A off{}",
                t.timeout,
                a_closed(&a)
            ));
        }
        match answer {
            Takeover::Refused(why) => pass_note(format!("refused ({why})")),
            Takeover::Accepted => {
                pass_note("B's keylist-update of A's key answered success, but forwards to it still reach A only")
            }
            Takeover::Unclear(why) => pass_note(format!(
                "B's keylist-update of A's key was not refused ({why}), but forwards to it still reach A only"
            )),
            // A mediator failing on the attack shows no refusal: what it did to the key is
            // unknown (a later retry, another node, may register it).
            Takeover::Broken(why) => fail(format!(
                "B's keylist-update adding A's key was not answered ({why}): a failure is not a refusal (forwards to A's key still reached A only)"
            )),
        }
    })
    .await;
}

/// How long isolation-ack reads A's count again after B's ack was answered.
const ACK_SETTLE: Duration = Duration::from_secs(1);

/// pickup 2.0 messages-received for `ids`.
fn messages_received(ids: &[String]) -> serde_json::Value {
    routed(
        "messagepickup/2.0",
        "messages-received",
        json!({ "message_id_list": ids }),
    )
}

/// Whether a request was answered, and how: any readable reply (a status, a problem report),
/// a 4xx, or a 2xx with an empty body (pickup 2.0 lets a mediator answer messages-received
/// with nothing). `Err` for no answer: a timeout, a 5xx, a dropped connection, an unreadable
/// reply.
fn answered(r: anyhow::Result<Option<serde_json::Value>>) -> Result<String, String> {
    match r {
        Ok(Some(reply)) => Ok(show(&reply)),
        Ok(None) => Ok("HTTP 2xx with an empty body".into()),
        Err(e) => match e.downcast_ref::<HttpStatus>() {
            Some(h) if (400..500).contains(&h.status) => Ok(format!("HTTP {}", h.status)),
            _ => Err(format!("not answered: {e:#}")),
        },
    }
}

/// How the mediator answered B's keylist-update adding A's key.
#[derive(Debug)]
enum Takeover {
    /// A keylist-update-response with a result other than `success` for the key, a problem
    /// report, a 4xx.
    Refused(String),
    /// `success` for the key.
    Accepted,
    /// An answer that neither refuses nor accepts: no reply, another message, a response
    /// without the key.
    Unclear(String),
    /// No answer: a timeout, a 5xx, a dropped connection, an unreadable reply.
    Broken(String),
}

impl std::fmt::Display for Takeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Takeover::Refused(why) => write!(f, "refused: {why}"),
            Takeover::Accepted => write!(f, "result \"success\""),
            Takeover::Unclear(why) | Takeover::Broken(why) => write!(f, "{why}"),
        }
    }
}

/// Reads the answer to B's keylist-update adding `key` (A's, base58).
fn takeover_answer(r: anyhow::Result<Option<serde_json::Value>>, key: &str) -> Takeover {
    let reply = match r {
        Ok(Some(reply)) => reply,
        Ok(None) => return Takeover::Unclear("no reply on the return route".into()),
        Err(e) => {
            return match e.downcast_ref::<HttpStatus>() {
                Some(h) if (400..500).contains(&h.status) => Takeover::Refused(format!("HTTP {}", h.status)),
                _ => Takeover::Broken(super::one_line(&format!("{e:#}"))),
            }
        }
    };
    if let Some(p) = problem(&reply) {
        return Takeover::Refused(p);
    }
    if !is_type(&reply, "coordinate-mediation", "keylist-update-response") {
        return Takeover::Unclear(format!("answered with {}", show(&reply)));
    }
    let updated = reply["updated"].as_array().cloned().unwrap_or_default();
    match update_result(&updated, key).as_deref() {
        Some("success") => Takeover::Accepted,
        Some(other) => Takeover::Refused(format!("result {other:?}")),
        None => Takeover::Unclear("the keylist-update-response has no result for the key".into()),
    }
}

/// While A's message is pending, B asks for mail every way pickup lets a wallet ask: a
/// status-request and a delivery-request, both also with RFC 0685's `recipient_key` set to A's
/// key (a filter that forgets the connection hands B A's queue), and pickup 1.0 batch-pickup.
/// Each must show B nothing: `Ok` with the ways the mediator declined (a filter or a protocol
/// it does not speak is no leak), `Err` with the reason to FAIL.
async fn b_reads_nothing(t: &Target, b: &Wallet, a_key: &str) -> anyhow::Result<Result<Vec<String>, String>> {
    let mut not_tried = Vec::new();
    let filter = "recipient_key set to A's key";
    for key in [None, Some(a_key)] {
        let what = |m: &str| match key {
            Some(_) => format!("B's {m} with {filter}"),
            None => format!("B's {m}"),
        };
        match may_decline(key.is_some(), b.status_for(key).await)? {
            Some(0) => {}
            Some(n) => {
                return Ok(Err(format!(
                    "{} counted {n} message(s) while only A has mail",
                    what("status-request")
                )))
            }
            None => not_tried.push(format!("status-request with {filter} (declined)")),
        }
        match may_decline(key.is_some(), b.delivery_request_for(10, key).await)? {
            Some(got) => {
                let got: Vec<Incoming> = got.into_iter().map(|(_, m)| m).collect();
                if let Some(why) = foreign(&got, a_key, &what("delivery-request")) {
                    return Ok(Err(why));
                }
            }
            None => not_tried.push(format!("delivery-request with {filter} (declined)")),
        }
    }
    if let Some(why) = not_advertised(t, "messagepickup", 1) {
        not_tried.push(format!("batch-pickup ({why})"));
    } else {
        match may_decline(true, b.batch_pickup(10).await)? {
            Some(got) => {
                if let Some(why) = foreign(&got, a_key, "B's batch-pickup") {
                    return Ok(Err(why));
                }
            }
            None => not_tried.push("batch-pickup (declined)".into()),
        }
    }
    Ok(Ok(not_tried))
}

/// `Ok(None)` for an answer that declines ([`declined`]) what is `optional`; every other error
/// stays one. Pickup 2.0 works when isolation-read runs: only the `recipient_key` filter and
/// pickup 1.0 are optional.
fn may_decline<T>(optional: bool, r: anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if optional && declined(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why `got`, handed to B by `what`, is a breach: A's message, or anyone else's.
fn foreign(got: &[Incoming], a_key: &str, what: &str) -> Option<String> {
    let others = contents(got).1;
    if others.iter().any(|k| k == a_key) {
        Some(format!("{what} was handed A's message"))
    } else if !others.is_empty() {
        Some(format!("{what} was handed {} message(s) for other keys", others.len()))
    } else {
        None
    }
}

/// A delivery-request's reply as a raw message (for its attachment ids).
async fn delivery_of(w: &Wallet) -> anyhow::Result<serde_json::Value> {
    w.ask(
        &super::wallet::routed(
            "messagepickup/2.0",
            "delivery-request",
            serde_json::json!({ "limit": 10 }),
        ),
        "delivery-request",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::wallet::offline_wallet;
    use crate::probe::ws_stub::{self, frame, Behaviour};

    /// B listens on a socket to a stub that sends `bytes`, until a step errs or takes the
    /// socket for closed (at most 10 s).
    async fn listen_to(bytes: Vec<u8>) -> (Receiver, anyhow::Result<()>) {
        let stub = ws_stub::start(Behaviour::Raw(bytes)).await;
        let mut b = Receiver {
            w: offline_wallet(),
            sock: Some(Socket::open(&stub.url).await.unwrap()),
            pickup: false,
            closed: None,
            note: None,
            who: "B",
        };
        let mut got = Vec::new();
        let res = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                b.step(SLICE, &mut got).await?;
                if b.closed.is_some() {
                    return Ok(());
                }
            }
        })
        .await
        .expect("an error or a close within 10 s");
        (b, res)
    }

    /// A frame on B's socket that the probe cannot read may be A's message in a shape the
    /// probe cannot see into: the check must FAIL on it, not take the socket for closed and
    /// pass on what B's other ways saw.
    #[actix_rt::test]
    async fn an_unreadable_frame_on_b_s_socket_is_an_error_not_a_close() {
        let text = 0x1;
        let reserved = 0x3;
        for (what, bytes) in [
            ("a text frame that is not an envelope", frame(text, b"not an envelope")),
            ("a frame that is not WebSocket", frame(reserved, b"?")),
        ] {
            let (b, res) = listen_to(bytes).await;
            assert!(res.is_err(), "{what}: taken for closed ({:?})", b.closed);
            let why = format!("{:#}", res.unwrap_err());
            assert!(why.starts_with("B's socket"), "{what}: {why}");
        }
    }

    /// Only an answer that says no refuses B's takeover: a timeout, a 5xx or a dropped
    /// connection is no answer, and must not read as one.
    #[test]
    fn only_an_answer_refuses_a_takeover() {
        let key = crate::didcomm::keys::KeyPair::generate();
        let http = |status: u16| -> anyhow::Result<Option<serde_json::Value>> {
            Err(anyhow::Error::new(HttpStatus {
                status,
                body: "x".into(),
            })
            .context("keylist-update: request failed"))
        };
        let response = |result: &str| {
            Ok(Some(json!({
                "@type": "https://didcomm.org/coordinate-mediation/1.0/keylist-update-response",
                "updated": [{ "recipient_key": key.did_key(), "action": "add", "result": result }],
            })))
        };
        let report = Ok(Some(json!({
            "@type": "https://didcomm.org/coordinate-mediation/1.0/problem-report",
            "description": { "code": "denied", "en": "no" },
        })));
        for (what, r, want) in [
            ("client_error", response("client_error"), "Refused"),
            ("success", response("success"), "Accepted"),
            ("a problem report", report, "Refused"),
            ("a 403", http(403), "Refused"),
            ("a 503", http(503), "Broken"),
            ("a timeout", Err(anyhow::anyhow!("timed out")), "Broken"),
            ("nothing", Ok(None), "Unclear"),
        ] {
            let got = format!("{:?}", takeover_answer(r, &key.verkey()));
            assert!(got.starts_with(want), "{what}: {got}");
        }
        assert!(answered(http(500)).is_err());
        assert!(answered(Err(anyhow::anyhow!("timed out"))).is_err());
        assert!(answered(http(400)).is_ok());
        assert!(answered(Ok(None)).is_ok());
    }

    /// The mediator closing B's socket stays a close (the check says so only if it mattered).
    #[actix_rt::test]
    async fn a_close_frame_is_a_close() {
        let close = 0x8;
        let (b, res) = listen_to(frame(close, &[])).await;
        assert!(res.is_ok(), "{res:?}");
        assert!(b.closed.is_some());
    }
}
