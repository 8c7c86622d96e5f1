//! Firebase Cloud Messaging HTTP v1: `POST {base}/v1/projects/{project}/messages:send` with an
//! OAuth2 access token got from the service account's `token_uri` by an RS256 JWT-bearer grant.
//!
//! Per project, the access token is cached until [`TOKEN_REFRESH_MARGIN`] before it expires,
//! and one refresh at most is in flight (callers wait for it on the project's lock). A refresh
//! that failed is answered to the callers that waited for it, and to those of the next
//! [`TOKEN_FAILURE_KEPT`] (or the endpoint's `Retry-After`, at most 30 s), without a request
//! each: an endpoint that is down does not make every push of the project wait its timeout in
//! turn. With
//! several projects (dev/stage/prod builds of the app), a token is tried on each until one
//! accepts it; the project that did is remembered for that token.

use super::config::{FcmProject, FCM_SCOPE};
use super::{Event, Outcome, Transport};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// An access token is renewed this long before it expires.
pub const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// How long a failed token refresh is answered to callers without another request, unless the
/// endpoint's `Retry-After` says longer (at most [`TOKEN_FAILURE_KEPT_MAX`]).
pub const TOKEN_FAILURE_KEPT: Duration = Duration::from_secs(1);
pub const TOKEN_FAILURE_KEPT_MAX: Duration = Duration::from_secs(30);
/// Lifetime asked for in the JWT grant (Google's maximum).
pub const ASSERTION_LIFETIME_S: u64 = 3600;
/// Tokens whose accepting project is remembered; the map is cleared beyond this.
const REMEMBERED_MAX: usize = 100_000;

/// The `@type` of the data payload (RFC 0734 names the family this way).
pub const DATA_TYPE: &str = "https://didcomm.org/push-notifications-fcm";

/// What one project answered for one message.
#[derive(Debug, PartialEq)]
pub enum FcmAnswer {
    Sent,
    Retry {
        retry_after_ms: Option<u64>,
        reason: String,
    },
    /// The token is dead: `UNREGISTERED`, or an invalid registration token.
    Dead(String),
    /// The token belongs to another Firebase project (`SENDER_ID_MISMATCH`).
    Mismatch,
    /// The access token was refused: refresh and try once more.
    Unauthorized,
    Failed(String),
}

/// Reads FCM's answer (pure: tested on the bodies Google documents).
pub fn classify(status: u16, retry_after_ms: Option<u64>, body: &[u8]) -> FcmAnswer {
    if (200..300).contains(&status) {
        return FcmAnswer::Sent;
    }
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = &v["error"];
    let status_text = err["status"].as_str().unwrap_or_default();
    let message = err["message"].as_str().unwrap_or_default();
    let codes: Vec<&str> = err["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["errorCode"].as_str())
        .collect();
    let has = |c: &str| codes.contains(&c) || status_text == c;
    let reason = format!("{status} {}", if codes.is_empty() { status_text } else { codes[0] });
    if status == 429 || status >= 500 || has("QUOTA_EXCEEDED") || has("UNAVAILABLE") || has("INTERNAL") {
        return FcmAnswer::Retry { retry_after_ms, reason };
    }
    // The Firebase project's own APNs credentials are missing or refused (iOS tokens): not
    // our access token, which a fresh grant would not mend. The operator's to mend, as is a
    // setup refused below: tried again, then left to the push's claim (retaken later), so the
    // wake-up outlives the fix instead of being lost.
    if has("THIRD_PARTY_AUTH_ERROR") {
        return FcmAnswer::Retry {
            retry_after_ms,
            reason: format!("{reason}: the Firebase project's APNs key or certificate"),
        };
    }
    if status == 401 {
        return FcmAnswer::Unauthorized;
    }
    if has("SENDER_ID_MISMATCH") {
        return FcmAnswer::Mismatch;
    }
    // Only FCM's own word forgets a token: a bare 404 (a wrong project id, a proxy) says
    // nothing about it, and a forgotten registration needs the wallet to register again.
    if has("UNREGISTERED") {
        return FcmAnswer::Dead(reason);
    }
    if status == 400 && has("INVALID_ARGUMENT") && message.to_ascii_lowercase().contains("registration token") {
        return FcmAnswer::Dead(reason);
    }
    // The service account may not send (its role, the API disabled), or the project id is
    // wrong (a bare 404): the operator's setup, not the wallet's token.
    if status == 403 || status == 404 {
        return FcmAnswer::Retry {
            retry_after_ms,
            reason: format!(
                "{reason}: the Firebase project's setup (project id, the service account's role, the FCM API enabled)"
            ),
        };
    }
    FcmAnswer::Failed(reason)
}

/// Whether a push to a token registered with `platform` carries the APNs block (FCM delivers
/// it through APNs to an iPhone app, which only that block wakes in the background). Pushes
/// are folded per device only where this is alike (`devices::Device`).
pub fn via_apns(platform: Option<&str>) -> bool {
    platform.is_some_and(|s| s.eq_ignore_ascii_case("ios"))
}

/// The message FCM is asked to send.
pub fn message_body(p: &FcmProject, ev: &Event) -> Value {
    let mut message = json!({
        "token": ev.token,
        // FCM data values are strings.
        "data": {
            "@type": DATA_TYPE,
            "message_count": ev.count.to_string(),
        },
        "android": {
            "priority": "high",
            "collapse_key": p.collapse_key,
        },
    });
    if let Some((title, body)) = &p.notification {
        message["notification"] = json!({ "title": title, "body": body });
    }
    // iOS tokens registered through FCM are delivered by APNs: give it its headers.
    if via_apns(ev.platform.as_deref()) {
        let visible = p.notification.is_some();
        message["apns"] = json!({
            "headers": {
                "apns-priority": if visible { "10" } else { "5" },
                "apns-push-type": if visible { "alert" } else { "background" },
                "apns-collapse-id": p.collapse_key,
            },
            "payload": { "aps": if visible { json!({ "sound": "default" }) } else { json!({ "content-available": 1 }) } },
        });
    }
    json!({ "message": message })
}

/// A failed grant as a push is told it: a retry waits until a grant will be asked again
/// (`left`; before, it would only be answered the same failure), and no longer: the token
/// endpoint's own `Retry-After` (kept at most [`TOKEN_FAILURE_KEPT_MAX`]) is the project's,
/// not this wallet's, and must not hold the wallet's push for longer.
fn waiting_until(why: Outcome, left: Duration) -> Outcome {
    match why {
        Outcome::Retry { reason, .. } => Outcome::Retry {
            retry_after_ms: Some(left.as_millis().min(u64::MAX as u128) as u64),
            reason,
        },
        other => other,
    }
}

/// The signed JWT of the grant: RS256, `iss` the service account, `aud` its `token_uri`,
/// issued at `iat_unix_s` and good for [`ASSERTION_LIFETIME_S`] from then (Google refuses a
/// longer one).
pub fn grant_assertion(p: &FcmProject, key: &jsonwebtoken::EncodingKey, iat_unix_s: u64) -> Result<String, String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = p.account.private_key_id.clone();
    let claims = json!({
        "iss": p.account.client_email,
        "scope": FCM_SCOPE,
        "aud": p.account.token_uri,
        "iat": iat_unix_s,
        "exp": iat_unix_s + ASSERTION_LIFETIME_S,
    });
    jsonwebtoken::encode(&header, &claims, key).map_err(|e| format!("signing the FCM grant: {e}"))
}

struct Project {
    cfg: FcmProject,
    key: jsonwebtoken::EncodingKey,
    /// (access token, renew after). Held across the refresh: one refresh in flight.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    /// The last refresh's failure, answered until the instant given.
    failed: RefCell<Option<(Instant, Outcome)>>,
}

/// The FCM sender of one node (lives on the push thread; not `Send`).
pub struct Fcm {
    projects: Vec<Project>,
    /// device token -> index of the project that accepted it.
    remembered: RefCell<HashMap<String, usize>>,
    pub token_refreshes: std::cell::Cell<u64>,
}

impl Fcm {
    pub fn new(projects: &[FcmProject]) -> Result<Fcm, String> {
        let projects = projects
            .iter()
            .map(|p| {
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(p.account.private_key.0.as_bytes())
                    .map_err(|_| format!("FCM project {}: bad private key", p.account.project_id))?;
                Ok(Project {
                    cfg: p.clone(),
                    key,
                    token: tokio::sync::Mutex::new(None),
                    failed: RefCell::new(None),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Fcm {
            projects,
            remembered: RefCell::new(HashMap::new()),
            token_refreshes: std::cell::Cell::new(0),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.projects.is_empty()
    }

    /// A valid access token of project `i`; `stale` is one the provider refused (renewed
    /// unless someone renewed it meanwhile).
    async fn access_token(&self, t: &Transport, i: usize, stale: Option<&str>) -> Result<String, Outcome> {
        let p = &self.projects[i];
        let mut slot = p.token.lock().await;
        if let Some((tok, renew_after)) = slot.as_ref() {
            if Instant::now() < *renew_after && Some(tok.as_str()) != stale {
                return Ok(tok.clone());
            }
        }
        if let Some((until, why)) = p.failed.borrow().as_ref() {
            let now = Instant::now();
            if now < *until {
                // A retry waits until a grant will be asked again: before, it would only be
                // answered this same failure.
                return Err(waiting_until(why.clone(), *until - now));
            }
        }
        match self.refresh(t, p).await {
            Ok(tok) => {
                *p.failed.borrow_mut() = None;
                *slot = Some(tok.clone());
                Ok(tok.0)
            }
            Err(why) => {
                let kept = match why {
                    Outcome::Retry {
                        retry_after_ms: Some(ms),
                        ..
                    } => Duration::from_millis(ms).clamp(TOKEN_FAILURE_KEPT, TOKEN_FAILURE_KEPT_MAX),
                    _ => TOKEN_FAILURE_KEPT,
                };
                *p.failed.borrow_mut() = Some((Instant::now() + kept, why.clone()));
                Err(waiting_until(why, kept))
            }
        }
    }

    /// One token request of project `p`: the access token and when to renew it.
    async fn refresh(&self, t: &Transport, p: &Project) -> Result<(String, Instant), Outcome> {
        let assertion = grant_assertion(&p.cfg, &p.key, super::issued_at_s()).map_err(Outcome::Failed)?;
        self.token_refreshes.set(self.token_refreshes.get() + 1);
        let form = format!(
            "grant_type={}&assertion={}",
            urlencoding::encode("urn:ietf:params:oauth:grant-type:jwt-bearer"),
            urlencoding::encode(&assertion)
        );
        let ans = t
            .post(
                &p.cfg.account.token_uri,
                vec![("content-type".into(), "application/x-www-form-urlencoded".into())],
                form.into_bytes(),
            )
            .await
            .map_err(|e| Outcome::Retry {
                retry_after_ms: None,
                reason: format!("token endpoint: {e}"),
            })?;
        if ans.status == 429 || ans.status >= 500 {
            return Err(Outcome::Retry {
                retry_after_ms: ans.retry_after_ms,
                reason: format!("token endpoint answered {}", ans.status),
            });
        }
        // Every other failure of the grant is the node's, not the wallet's: a service account
        // whose key was revoked or rotated, a clock Google finds too far off (`invalid_grant`),
        // a proxy answering in Google's place. The push is tried again (and, out of tries, its
        // claim left to run out and the push taken again): an operator who mends the account
        // or the clock loses no wallet's wake-up.
        let node_side = |reason: String| {
            tracing::warn!(project = %p.cfg.account.project_id, "FCM access token not granted: {reason}");
            Outcome::Retry {
                retry_after_ms: None,
                reason,
            }
        };
        if !(200..300).contains(&ans.status) {
            // The body may say why (invalid_grant); it holds no secret of ours.
            let why: Value = serde_json::from_slice(&ans.body).unwrap_or(Value::Null);
            return Err(node_side(format!(
                "token endpoint refused the grant of {}: {} {}",
                p.cfg.account.client_email,
                ans.status,
                why["error"].as_str().unwrap_or_default()
            )));
        }
        let v: Value = serde_json::from_slice(&ans.body)
            .map_err(|_| node_side("token endpoint answered something that is not JSON".into()))?;
        let tok = v["access_token"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| node_side("token endpoint answer has no access_token".into()))?
            .to_string();
        // Bounded: an absurd lifetime would overflow the clock (Google grants an hour).
        let lifetime = Duration::from_secs(v["expires_in"].as_u64().unwrap_or(3600).clamp(60, 86_400));
        // Renewed the margin ahead of its expiry; a token too short-lived for that (five
        // minutes and a few seconds or less) at half its life: it would otherwise be due at
        // once, and every push would ask for a new one.
        let ahead = if lifetime > TOKEN_REFRESH_MARGIN + Duration::from_secs(5) {
            TOKEN_REFRESH_MARGIN
        } else {
            lifetime / 2
        };
        let renew_after = Instant::now() + (lifetime - ahead);
        tracing::debug!(project = %p.cfg.account.project_id, "FCM access token renewed");
        Ok((tok, renew_after))
    }

    async fn send_to(&self, t: &Transport, i: usize, ev: &Event) -> FcmAnswer {
        let p = &self.projects[i];
        let url = format!(
            "{}/v1/projects/{}/messages:send",
            p.cfg.base_url, p.cfg.account.project_id
        );
        let body = serde_json::to_vec(&message_body(&p.cfg, ev)).unwrap_or_default();
        let mut stale: Option<String> = None;
        for _ in 0..2 {
            let tok = match self.access_token(t, i, stale.as_deref()).await {
                Ok(tok) => tok,
                Err(Outcome::Retry { retry_after_ms, reason }) => return FcmAnswer::Retry { retry_after_ms, reason },
                Err(Outcome::Failed(r)) | Err(Outcome::Dead(r)) => return FcmAnswer::Failed(r),
                Err(Outcome::Sent) => return FcmAnswer::Failed("token".into()),
            };
            let ans = match t
                .post(
                    &url,
                    vec![
                        ("authorization".into(), format!("Bearer {tok}")),
                        ("content-type".into(), "application/json".into()),
                    ],
                    body.clone(),
                )
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    return FcmAnswer::Retry {
                        retry_after_ms: None,
                        reason: e,
                    }
                }
            };
            match classify(ans.status, ans.retry_after_ms, &ans.body) {
                FcmAnswer::Unauthorized if stale.is_none() => stale = Some(tok),
                // Our credentials, not the push: tried again, as a refused grant is.
                FcmAnswer::Unauthorized => {
                    return FcmAnswer::Retry {
                        retry_after_ms: None,
                        reason: "401 after a fresh access token".into(),
                    }
                }
                other => return other,
            }
        }
        FcmAnswer::Retry {
            retry_after_ms: None,
            reason: "401".into(),
        }
    }

    /// Sends one push: the remembered project first, then the others. A project that fails
    /// for reasons of its own (its grant refused, its quota spent, unreachable) does not keep
    /// the others from the token: the next is tried, unless it is the project that accepted
    /// the token before. With none accepting, a project that asked to retry wins (the token
    /// may be its), then one that failed (as may be its: the token is kept), then one that
    /// called the token dead.
    pub async fn send(&self, t: &Transport, ev: &Event) -> Outcome {
        let first = self.remembered.borrow().get(&ev.token).copied();
        let order: Vec<usize> = first
            .into_iter()
            .chain((0..self.projects.len()).filter(|i| Some(*i) != first))
            .collect();
        let mut dead: Option<String> = None;
        let mut retry: Option<(Option<u64>, String)> = None;
        let mut failed: Vec<String> = Vec::new();
        let project = |i: usize| self.projects[i].cfg.account.project_id.clone();
        for i in order {
            match self.send_to(t, i, ev).await {
                FcmAnswer::Sent => {
                    let mut r = self.remembered.borrow_mut();
                    if r.len() >= REMEMBERED_MAX {
                        r.clear();
                    }
                    r.insert(ev.token.clone(), i);
                    return Outcome::Sent;
                }
                FcmAnswer::Mismatch => continue,
                // The project that accepted this token before calls it dead: it is.
                FcmAnswer::Dead(r) if Some(i) == first || self.projects.len() == 1 => return Outcome::Dead(r),
                // Another project may know it.
                FcmAnswer::Dead(r) => dead = Some(r),
                FcmAnswer::Retry { retry_after_ms, reason } if Some(i) == first => {
                    return Outcome::Retry { retry_after_ms, reason }
                }
                FcmAnswer::Retry { retry_after_ms, reason } => {
                    retry.get_or_insert((retry_after_ms, format!("{}: {reason}", project(i))));
                }
                FcmAnswer::Failed(r) if Some(i) == first => return Outcome::Failed(r),
                FcmAnswer::Failed(r) => failed.push(format!("{}: {r}", project(i))),
                FcmAnswer::Unauthorized => {
                    retry.get_or_insert((None, format!("{}: 401", project(i))));
                }
            }
        }
        if let Some((retry_after_ms, reason)) = retry {
            return Outcome::Retry { retry_after_ms, reason };
        }
        self.remembered.borrow_mut().remove(&ev.token);
        match (failed.is_empty(), dead) {
            (false, _) => Outcome::Failed(failed.join("; ")),
            (true, Some(r)) => Outcome::Dead(r),
            (true, None) => {
                Outcome::Failed("no configured Firebase project accepts this token (SENDER_ID_MISMATCH)".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_googles_answers() {
        assert_eq!(
            classify(200, None, b"{\"name\":\"projects/p/messages/1\"}"),
            FcmAnswer::Sent
        );
        let unreg = br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert!(matches!(classify(404, None, unreg), FcmAnswer::Dead(_)));
        let invalid = br#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(classify(400, None, invalid), FcmAnswer::Dead(_)));
        let bad_payload = br#"{"error":{"code":400,"message":"Invalid value at 'message.data[0].value'","status":"INVALID_ARGUMENT"}}"#;
        assert!(matches!(classify(400, None, bad_payload), FcmAnswer::Failed(_)));
        let mismatch =
            br#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"errorCode":"SENDER_ID_MISMATCH"}]}}"#;
        assert_eq!(classify(403, None, mismatch), FcmAnswer::Mismatch);
        // A 404 that is not FCM's UNREGISTERED (a wrong project id, a proxy) forgets no token.
        let no_such_project =
            br#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND"}}"#;
        // The operator's setup: tried again (then left to the claim), not given up for good.
        assert!(matches!(classify(404, None, no_such_project), FcmAnswer::Retry { .. }));
        let denied = br#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#;
        assert!(matches!(classify(403, None, denied), FcmAnswer::Retry { reason, .. } if reason.contains("role")));
        // The project's APNs credentials, not our access token: no second grant.
        let apns_auth =
            br#"{"error":{"code":401,"status":"UNAUTHENTICATED","details":[{"errorCode":"THIRD_PARTY_AUTH_ERROR"}]}}"#;
        assert!(matches!(classify(401, None, apns_auth), FcmAnswer::Retry { reason, .. } if reason.contains("APNs")));
        assert!(matches!(
            classify(
                429,
                Some(2000),
                br#"{"error":{"status":"RESOURCE_EXHAUSTED","details":[{"errorCode":"QUOTA_EXCEEDED"}]}}"#
            ),
            FcmAnswer::Retry {
                retry_after_ms: Some(2000),
                ..
            }
        ));
        assert!(matches!(
            classify(503, None, b""),
            FcmAnswer::Retry {
                retry_after_ms: None,
                ..
            }
        ));
        assert_eq!(classify(401, None, b""), FcmAnswer::Unauthorized);
    }
}
