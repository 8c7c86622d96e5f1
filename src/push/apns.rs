//! Apple Push Notification service over HTTP/2: `POST {base}/3/device/{token}` with an ES256
//! provider token (`kid` = key id, `iss` = team id).
//!
//! Apple refuses a provider token older than an hour and one renewed more often than every
//! 20 minutes (`TooManyProviderTokenUpdates`): the token is reused for [`TOKEN_REUSE`] and
//! renewed early only when Apple refuses it (`ExpiredProviderToken`, `InvalidProviderToken`)
//! and it is at least [`TOKEN_MIN_AGE`] old. A provider token Apple keeps refusing is the
//! node's trouble (a key revoked, a key or team id mistyped, a clock far off), not the
//! wallet's: the push is tried again later, never given up for good.

use super::config::ApnsCredentials;
use super::{Event, Outcome, Transport};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::time::{Duration, Instant};

pub const TOKEN_REUSE: Duration = Duration::from_secs(50 * 60);
/// How long a provider token Apple refused (after a renewal, where allowed) is answered to
/// pushes without another request: a key id mistyped would otherwise have every offline
/// wallet's every try ask Apple twice. As FCM's failed grant is kept.
pub const REFUSED_KEPT: Duration = Duration::from_secs(1);
pub const TOKEN_MIN_AGE: Duration = Duration::from_secs(20 * 60);
/// The `@type` beside `aps` in the payload.
pub const DATA_TYPE: &str = "https://didcomm.org/push-notifications-apns";

#[derive(Debug, PartialEq)]
pub enum ApnsAnswer {
    Sent,
    Retry {
        retry_after_ms: Option<u64>,
        reason: String,
    },
    Dead(String),
    /// 400 `BadDeviceToken`: a malformed token, or one of the other environment (a sandbox
    /// token sent to production, or the other way round). Given up, the token kept: Apple says
    /// the same of every token when `base_url` names the wrong environment, and forgetting
    /// them would delete every registration a configuration slip pushes to.
    BadDeviceToken(String),
    /// `ExpiredProviderToken` or `InvalidProviderToken`: renew it (if allowed) and try once
    /// more; refused again, the push is retried later.
    TokenRefused(String),
    Failed(String),
}

/// Reads APNs' answer: status and `{"reason": ...}` (pure).
pub fn classify(status: u16, retry_after_ms: Option<u64>, body: &[u8]) -> ApnsAnswer {
    if status == 200 {
        return ApnsAnswer::Sent;
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let reason = v["reason"].as_str().unwrap_or_default().to_string();
    let why = format!("{status} {reason}");
    match (status, reason.as_str()) {
        // Only Apple's word that the token is no longer active forgets it.
        (410, _) | (_, "Unregistered") => ApnsAnswer::Dead(why),
        (400, "BadDeviceToken") => ApnsAnswer::BadDeviceToken(why),
        (403, "ExpiredProviderToken" | "InvalidProviderToken") => ApnsAnswer::TokenRefused(why),
        (429, _) | (500..=599, _) => ApnsAnswer::Retry {
            retry_after_ms,
            reason: why,
        },
        // The operator's setup (the key's team or environment, the topic, the collapse id,
        // the alert's size), not the wallet's token: tried again, then left to the push's
        // claim (retaken later), so the wake-up outlives the fix instead of being lost.
        (403, "MissingProviderToken" | "BadCertificate" | "BadCertificateEnvironment" | "Forbidden")
        | (400, "TopicDisallowed" | "BadTopic" | "MissingTopic" | "BadCollapseId")
        | (413, _) => ApnsAnswer::Retry {
            retry_after_ms,
            reason: format!("{why}: the APNs setup (key, team, topic, collapse id, alert size)"),
        },
        _ => ApnsAnswer::Failed(why),
    }
}

pub fn payload(c: &ApnsCredentials, ev: &Event) -> Value {
    let aps = if c.push_type == "background" {
        json!({ "content-available": 1 })
    } else {
        let title = c.alert.0.clone().unwrap_or_else(|| "New message".into());
        let body = c.alert.1.clone().unwrap_or_else(|| "You have new messages".into());
        json!({ "alert": { "title": title, "body": body }, "sound": "default", "content-available": 1 })
    };
    json!({ "aps": aps, "@type": DATA_TYPE, "message_count": ev.count })
}

pub fn provider_token(c: &ApnsCredentials, key: &jsonwebtoken::EncodingKey, now_unix_s: u64) -> Result<String, String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(c.key_id.clone());
    let claims = json!({ "iss": c.team_id, "iat": now_unix_s });
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("signing the APNs provider token: {e}"))
}

pub struct Apns {
    cfg: ApnsCredentials,
    key: jsonwebtoken::EncodingKey,
    token: RefCell<Option<(String, Instant)>>,
    pub token_issues: std::cell::Cell<u64>,
    /// Apple refused the provider token: until then, pushes are told to retry, unasked.
    refused: RefCell<Option<(Instant, String)>>,
}

impl Apns {
    pub fn new(cfg: &ApnsCredentials) -> Result<Apns, String> {
        let key = jsonwebtoken::EncodingKey::from_ec_pem(cfg.key_pem.0.as_bytes())
            .map_err(|_| "APNs: bad signing key".to_string())?;
        Ok(Apns {
            cfg: cfg.clone(),
            key,
            token: RefCell::new(None),
            token_issues: std::cell::Cell::new(0),
            refused: RefCell::new(None),
        })
    }

    fn token(&self, renew: bool) -> Result<String, String> {
        let mut slot = self.token.borrow_mut();
        if let Some((tok, issued)) = slot.as_ref() {
            let age = issued.elapsed();
            if age < TOKEN_REUSE && !(renew && age >= TOKEN_MIN_AGE) {
                return Ok(tok.clone());
            }
        }
        let tok = provider_token(&self.cfg, &self.key, super::issued_at_s())?;
        self.token_issues.set(self.token_issues.get() + 1);
        *slot = Some((tok.clone(), Instant::now()));
        Ok(tok)
    }

    pub async fn send(&self, t: &Transport, ev: &Event) -> Outcome {
        let url = format!("{}/3/device/{}", self.cfg.base_url, urlencoding::encode(&ev.token));
        let body = serde_json::to_vec(&payload(&self.cfg, ev)).unwrap_or_default();
        let priority = if self.cfg.push_type == "background" { "5" } else { "10" };
        if let Some((until, why)) = self.refused.borrow().as_ref() {
            let now = Instant::now();
            if now < *until {
                // Spread over another second: the pushes told this all come back at once
                // otherwise, and each would ask Apple again.
                let left = (*until - now).as_millis().min(u64::MAX as u128) as u64;
                let spread = rand::random::<u64>() % (REFUSED_KEPT.as_millis() as u64 + 1);
                return Outcome::Retry {
                    retry_after_ms: Some(left + spread),
                    reason: why.clone(),
                };
            }
        }
        let mut renew = false;
        for _ in 0..2 {
            let tok = match self.token(renew) {
                Ok(t) => t,
                Err(e) => return Outcome::Failed(e),
            };
            let headers = vec![
                ("authorization".into(), format!("bearer {tok}")),
                ("apns-topic".into(), self.cfg.topic.clone()),
                ("apns-push-type".into(), self.cfg.push_type.clone()),
                ("apns-priority".into(), priority.into()),
                ("apns-collapse-id".into(), self.cfg.collapse_id.clone()),
                ("apns-expiration".into(), (super::unix_now_s() + 86_400).to_string()),
                ("content-type".into(), "application/json".into()),
            ];
            let ans = match t.post(&url, headers, body.clone()).await {
                Ok(a) => a,
                Err(e) => {
                    return Outcome::Retry {
                        retry_after_ms: None,
                        reason: e,
                    }
                }
            };
            match classify(ans.status, ans.retry_after_ms, &ans.body) {
                ApnsAnswer::Sent => return Outcome::Sent,
                ApnsAnswer::Dead(r) => return Outcome::Dead(r),
                ApnsAnswer::BadDeviceToken(r) => {
                    tracing::error!(
                        token = %super::redact(&ev.token),
                        "APNs refuses the device token ({r}): a sandbox token sent to production or the other way round? push.apns.base_url is {}; the token is kept",
                        self.cfg.base_url
                    );
                    return Outcome::Failed(r);
                }
                ApnsAnswer::Retry { retry_after_ms, reason } => return Outcome::Retry { retry_after_ms, reason },
                ApnsAnswer::Failed(r) => return Outcome::Failed(r),
                ApnsAnswer::TokenRefused(_) if !renew => renew = true,
                ApnsAnswer::TokenRefused(why) => {
                    tracing::warn!("APNs refuses the provider token (key_id {}): {why}", self.cfg.key_id);
                    *self.refused.borrow_mut() = Some((Instant::now() + REFUSED_KEPT, why.clone()));
                    return Outcome::Retry {
                        retry_after_ms: Some(REFUSED_KEPT.as_millis() as u64),
                        reason: why,
                    };
                }
            }
        }
        Outcome::Retry {
            retry_after_ms: None,
            reason: "403: the provider token refused twice".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_apples_answers() {
        assert_eq!(classify(200, None, b""), ApnsAnswer::Sent);
        assert!(matches!(
            classify(410, None, br#"{"reason":"Unregistered","timestamp":1}"#),
            ApnsAnswer::Dead(_)
        ));
        // Also a token of the other environment (sandbox, production): not forgotten.
        assert!(matches!(
            classify(400, None, br#"{"reason":"BadDeviceToken"}"#),
            ApnsAnswer::BadDeviceToken(_)
        ));
        assert!(matches!(
            classify(410, None, br#"{"reason":"ExpiredToken"}"#),
            ApnsAnswer::Dead(_)
        ));
        assert!(matches!(
            classify(400, None, br#"{"reason":"BadCollapseId"}"#),
            ApnsAnswer::Retry { .. }
        ));
        assert!(matches!(
            classify(400, None, br#"{"reason":"TopicDisallowed"}"#),
            ApnsAnswer::Retry { .. }
        ));
        // The wallet's own: given up.
        assert!(matches!(
            classify(400, None, br#"{"reason":"DeviceTokenNotForTopic"}"#),
            ApnsAnswer::Failed(_)
        ));
        assert!(matches!(
            classify(403, None, br#"{"reason":"ExpiredProviderToken"}"#),
            ApnsAnswer::TokenRefused(_)
        ));
        assert!(matches!(
            classify(403, None, br#"{"reason":"InvalidProviderToken"}"#),
            ApnsAnswer::TokenRefused(_)
        ));
        assert!(matches!(
            classify(429, Some(1000), br#"{"reason":"TooManyRequests"}"#),
            ApnsAnswer::Retry {
                retry_after_ms: Some(1000),
                ..
            }
        ));
        assert!(matches!(classify(503, None, b""), ApnsAnswer::Retry { .. }));
    }
}
