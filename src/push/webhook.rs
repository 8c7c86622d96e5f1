//! The operator's own push service: `POST` of a JSON event, signed with
//! `X-Mailroom-Signature: sha256=<hex HMAC-SHA256 of the body>` under the configured secret.

use super::config::WebhookCredentials;
use super::{Event, Outcome, Transport};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "X-Mailroom-Signature";

/// `sha256=<hex>` of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn event_body(ev: &Event, node: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "event": "message_queued",
        "event_id": ev.id,
        "connection_id": ev.conn,
        "service": ev.service.as_str(),
        "token": ev.token,
        "platform": ev.platform,
        "count": ev.count,
        "node": node,
        "sent_at_ms": crate::protocols::now_ms(),
    }))
    .unwrap_or_default()
}

pub async fn send(t: &Transport, w: &WebhookCredentials, node: &str, ev: &Event) -> Outcome {
    let body = event_body(ev, node);
    let sig = signature(w.secret.0.as_bytes(), &body);
    let ans = match t
        .post(
            &w.url,
            vec![
                ("content-type".into(), "application/json".into()),
                (SIGNATURE_HEADER.into(), sig),
            ],
            body,
        )
        .await
    {
        Ok(a) => a,
        Err(e) => {
            return Outcome::Retry {
                retry_after_ms: None,
                reason: e,
            }
        }
    };
    classify(ans.status, ans.retry_after_ms)
}

/// Reads the webhook's answer (pure).
pub fn classify(status: u16, retry_after_ms: Option<u64>) -> Outcome {
    match status {
        200..=299 => Outcome::Sent,
        429 | 500..=599 => Outcome::Retry {
            retry_after_ms,
            reason: format!("webhook answered {status}"),
        },
        // The operator's setup, not the event: a secret rotated on one side first (401, 403),
        // a wrong path (404), a proxy's timeout (408). Tried again, then left to the push's
        // claim (retaken later) or owed, as FCM's and APNs' setup errors are: the wake-ups
        // outlive the fix instead of being lost meanwhile.
        401 | 403 | 404 | 408 => Outcome::Retry {
            retry_after_ms,
            reason: format!("webhook answered {status}: the webhook's setup (its URL, the shared secret)"),
        },
        s => Outcome::Failed(format!("webhook answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Outcome};

    /// Only the event's own refusal gives it up; the receiver's setup is tried again.
    #[test]
    fn a_setup_error_is_tried_again() {
        assert_eq!(classify(204, None), Outcome::Sent);
        for s in [401, 403, 404, 408, 429, 500, 503] {
            assert!(
                matches!(
                    classify(s, Some(7)),
                    Outcome::Retry {
                        retry_after_ms: Some(7),
                        ..
                    }
                ),
                "{s}"
            );
        }
        assert!(matches!(classify(400, None), Outcome::Failed(_)));
        assert!(matches!(classify(413, None), Outcome::Failed(_)));
    }

    #[test]
    fn signature_is_rfc2104_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
