//! Malformed input: garbage, a truncated envelope, an envelope for a key the mediator does
//! not hold, an unknown message type, an oversized body. Each must be answered with a 4xx
//! (the unknown type, a valid message on a valid connection, may also get a 2xx, with or
//! without a problem report), never a 5xx or a dropped connection, and the mediator must
//! still answer a trust ping afterwards.

use super::target::Target;
use super::wallet::{is_type, problem, routed, trust_ping, Wallet};
use super::{blocked, fail, Options, Runner, Verdict};
use crate::client::post;
use crate::didcomm::envelope;
use crate::didcomm::keys::KeyPair;
use serde_json::json;

pub(crate) async fn run(r: &mut Runner, t: &Target, opts: &Options) {
    let names = [
        "malformed-garbage",
        "malformed-truncated",
        "malformed-wrong-key",
        "malformed-unknown-type",
        "malformed-huge",
    ];
    let w = match Wallet::onboard(t).await {
        Ok(w) => w,
        Err(e) => {
            for n in names {
                r.fail(n, &blocked(&e));
            }
            return;
        }
    };
    let ping = match w.agent.pack(&trust_ping()) {
        Ok(p) => p,
        Err(e) => {
            for n in names {
                r.fail(n, &format!("the probe could not pack a trust ping: {e:#}"));
            }
            return;
        }
    };
    let mut garbage: Vec<u8> = b"\x00\xff not a DIDComm envelope {{{".to_vec();
    garbage.extend((0..512).map(|_| rand::random::<u8>()));
    let truncated = ping[..ping.len() / 2].to_vec();
    let stranger = KeyPair::generate();
    let wrong_key = envelope::pack(
        &serde_json::to_vec(&trust_ping()).unwrap_or_default(),
        std::slice::from_ref(&stranger.verkey()),
        Some(&w.agent.key),
    )
    .unwrap_or_default();
    let unknown = w
        .agent
        .pack(&routed("mailroom-probe-unknown/1.0", "nonsense", json!({ "x": 1 })))
        .unwrap_or_default();
    // Shaped like an envelope, far over any sane envelope limit.
    let huge = {
        let mut b =
            br#"{"protected":"eyJlbmMiOiJ4Y2hhY2hhMjBwb2x5MTMwNV9pZXRmIn0","iv":"AAAA","tag":"AAAA","ciphertext":""#
                .to_vec();
        b.resize(b.len() + opts.huge_bytes, b'A');
        b.extend_from_slice(br#""}"#);
        b
    };
    let cases: [(&'static str, Vec<u8>, bool); 5] = [
        ("malformed-garbage", garbage, false),
        ("malformed-truncated", truncated, false),
        ("malformed-wrong-key", wrong_key, false),
        ("malformed-unknown-type", unknown, true),
        ("malformed-huge", huge, false),
    ];
    for (name, body, may_succeed) in cases {
        r.check(name, one(t, &w, body, may_succeed)).await;
    }
}

/// Whether an HTTP status is a right answer to a malformed body: a 4xx always; a 2xx only when
/// the body may succeed (a valid message of an unknown type). Anything else (a 3xx sends the
/// sender elsewhere with its envelope unread, a 5xx is the mediator failing) is the reason
/// to FAIL.
pub(crate) fn judge(status: u16, may_succeed: bool) -> Result<(), String> {
    match status {
        400..=499 => Ok(()),
        200..=299 if may_succeed => Ok(()),
        200..=299 => Err(format!(
            "HTTP {status}: answered as if accepted (a sender cannot tell it was dropped)"
        )),
        s if s >= 500 => Err(format!("HTTP {s}")),
        s => Err(format!("HTTP {s}: neither a refusal (4xx) nor an answer (2xx)")),
    }
}

/// Posts `body`; judges the status; then checks the mediator still answers.
async fn one(t: &Target, w: &Wallet, body: Vec<u8>, may_succeed: bool) -> anyhow::Result<Verdict> {
    let len = body.len();
    let answer = post(&t.http, body, t.timeout).await;
    let verdict = match &answer {
        Err(e) => Verdict::Fail(format!("no HTTP status for a {len}-byte body: {e:#}")),
        Ok((status, reply)) => match judge(*status, may_succeed) {
            // An error page says what went wrong (the runner keeps it to one line).
            Err(why) if *status >= 300 => {
                let text = String::from_utf8_lossy(&reply[..reply.len().min(200)]);
                Verdict::Fail(format!("{why} {text}"))
            }
            Err(why) => Verdict::Fail(why),
            Ok(()) if (400..500).contains(status) => Verdict::Pass(Some(format!("HTTP {status}"))),
            Ok(()) => {
                // A valid message of an unknown type: a problem report (or silence) is right.
                let what = if reply.is_empty() {
                    "no reply".to_string()
                } else {
                    match w.agent.unpack(reply) {
                        Ok((m, _)) => problem(&m).unwrap_or_else(|| super::wallet::show(&m)),
                        Err(e) => format!("an unreadable reply ({e})"),
                    }
                };
                Verdict::Pass(Some(format!("HTTP {status}, {what}")))
            }
        },
    };
    // Still there?
    let alive = w.agent.request(&trust_ping()).await;
    match alive {
        Ok(Some(m)) if is_type(&m, "trust_ping", "ping_response") => Ok(verdict),
        Ok(_) if matches!(verdict, Verdict::Fail(_)) => Ok(verdict),
        Ok(other) => fail(format!(
            "afterwards a trust ping got {}",
            other.map(|m| super::wallet::show(&m)).unwrap_or("no reply".into())
        )),
        Err(e) => match verdict {
            Verdict::Fail(why) => fail(format!("{why}; and the mediator no longer answers: {e:#}")),
            _ => fail(format!("the mediator no longer answers a trust ping: {e:#}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::judge;

    #[test]
    fn a_malformed_body_passes_on_a_4xx_and_an_unknown_type_also_on_a_2xx() {
        for s in [400, 403, 404, 413, 415] {
            assert!(judge(s, false).is_ok(), "{s}");
            assert!(judge(s, true).is_ok(), "{s}");
        }
        for s in [200, 202, 204] {
            assert!(judge(s, true).is_ok(), "{s}");
            assert!(judge(s, false).is_err(), "{s}: a dropped envelope answered as accepted");
        }
    }

    #[test]
    fn a_redirect_or_a_5xx_never_passes() {
        for s in [101, 301, 302, 303, 307, 308, 500, 502, 503] {
            assert!(judge(s, true).is_err(), "{s}");
            assert!(judge(s, false).is_err(), "{s}");
        }
    }
}
