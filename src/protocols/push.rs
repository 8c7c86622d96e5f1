//! push-notifications-fcm 1.0 (RFC 0734) and push-notifications-apns 1.0 (RFC 0699), mediator
//! side: a wallet tells the mediator where to wake it when mail is queued.
//!
//! - `set-device-info {device_token, device_platform}` -> `ack`. A `null` or empty token
//!   unregisters (BC Wallet sends `""` when the user turns notifications off).
//! - `get-device-info` -> `device-info {device_token, device_platform}` with `~thread`, or a
//!   problem report `not-registered-for-push-notifications`.
//!
//! Only an authenticated (authcrypt) message from an existing connection can register: the
//! registration belongs to that connection and goes with it. This module decides and writes
//! through the store; sending pushes is [`crate::push`]'s business.

use super::{now_ms, HandleError, Inbound, Mediator, Outcome};
use crate::store::{Device, PushService};
use serde_json::{json, Value};

/// Longest device token accepted (FCM tokens are ~160 characters, APNs ones 64 hex digits).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Longest `device_platform` accepted.
pub const MAX_PLATFORM_LEN: usize = 64;

pub const FCM_FAMILY: &str = "push-notifications-fcm";
pub const APNS_FAMILY: &str = "push-notifications-apns";

/// The service of a message family, if it is one of the push families.
pub fn service_of(family: &str) -> Option<PushService> {
    match family {
        FCM_FAMILY => Some(PushService::Fcm),
        APNS_FAMILY => Some(PushService::Apns),
        _ => None,
    }
}

/// Dispatches a message of either push family.
pub async fn handle(m: &Mediator, ctx: &Inbound, service: PushService) -> Result<Outcome, HandleError> {
    let name = ctx.mtype.as_ref().map(|t| t.name.as_str()).unwrap_or_default();
    match name {
        "set-device-info" => set_device_info(m, ctx, service).await,
        "get-device-info" => get_device_info(m, ctx, service).await,
        // A wallet's own acks and device-info are not requests: nothing to answer.
        "ack" | "device-info" => {
            ctx.require_conn()?;
            Ok(Outcome::default())
        }
        _ => super::problem::unknown_type(m, ctx),
    }
}

/// A problem report of the push family itself (RFC 0734/0699 name their own codes).
fn family_problem(ctx: &Inbound, code: &str, explain: &str) -> Outcome {
    tracing::info!(
        connection = ctx.conn.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
        r#type = %ctx.type_str,
        code,
        "push registration refused: {explain}"
    );
    let mut r = ctx.reply("problem-report");
    r["description"] = json!({ "code": code, "en": explain });
    r["explain_ltxt"] = json!(explain);
    Outcome {
        replies: vec![r],
        ..Outcome::default()
    }
}

pub async fn set_device_info(m: &Mediator, ctx: &Inbound, service: PushService) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?;
    let token = match ctx.msg.get("device_token") {
        None => {
            return Ok(family_problem(
                ctx,
                "missing-value",
                "set-device-info needs `device_token` (null or \"\" to unregister)",
            ))
        }
        Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s.len() > MAX_TOKEN_LEN || s.contains('\0') => {
            return Ok(family_problem(
                ctx,
                "invalid-value",
                "`device_token` is too long or holds a NUL",
            ))
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Ok(family_problem(
                ctx,
                "invalid-value",
                "`device_token` must be a string or null",
            ))
        }
    };
    // A device is woken for the mail the mediator holds for it: a connection it does not
    // mediate for has none, and letting any connection register any token would let a
    // stranger have a device pushed from as many connections as it opens. Unregistering is
    // always allowed: a wallet whose mediation was revoked can still take its token back.
    if token.is_some() && conn.mediation != crate::store::MediationState::Granted {
        return Ok(family_problem(
            ctx,
            "request_not_accepted",
            "set-device-info needs mediation: this connection has none granted",
        ));
    }
    let platform = match ctx.msg.get("device_platform") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) if s.len() <= MAX_PLATFORM_LEN && !s.contains('\0') => Some(s.clone()),
        Some(_) => {
            return Ok(family_problem(
                ctx,
                "invalid-value",
                "`device_platform` must be a short string or null",
            ))
        }
    };
    let device = token.map(|token| Device {
        service,
        token,
        // APNs has no platform: the device is an Apple one.
        platform: if service == PushService::Apns { None } else { platform },
        updated_at_ms: now_ms(),
    });
    m.store.set_device(&conn.id, device.as_ref()).await?;
    tracing::info!(
        connection = %conn.id,
        service = service.as_str(),
        registered = device.is_some(),
        "push device registration changed"
    );
    let mut ack = ctx.reply("ack");
    ack["status"] = json!("OK");
    Ok(Outcome {
        replies: vec![ack],
        ..Outcome::default()
    })
}

pub async fn get_device_info(m: &Mediator, ctx: &Inbound, service: PushService) -> Result<Outcome, HandleError> {
    let conn = ctx.require_conn()?;
    match m.store.device_of(&conn.id).await? {
        Some(d) if d.service == service => {
            let mut r = ctx.reply("device-info");
            r["device_token"] = json!(d.token);
            if service == PushService::Fcm {
                r["device_platform"] = json!(d.platform);
            }
            Ok(Outcome {
                replies: vec![r],
                ..Outcome::default()
            })
        }
        _ => Ok(family_problem(
            ctx,
            "not-registered-for-push-notifications",
            "this connection has no device registered for push notifications",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::didcomm::message::new_id;
    use crate::store::Connection;

    use crate::protocols::mediator_for_test as mediator;

    fn inbound(msg: Value, conn: Option<&Connection>) -> Inbound {
        Inbound::for_test(msg, conn.map(|_| "theirs"), conn)
    }

    async fn run(m: &Mediator, msg: Value, conn: Option<&Connection>) -> Result<Outcome, HandleError> {
        let ctx = inbound(msg, conn);
        let family = ctx.mtype.as_ref().unwrap().family.clone();
        handle(m, &ctx, service_of(&family).unwrap()).await
    }

    const FCM: &str = "https://didcomm.org/push-notifications-fcm/1.0/";
    const APNS: &str = "https://didcomm.org/push-notifications-apns/1.0/";

    #[tokio::test]
    async fn fcm_set_get_unregister() {
        let (m, c) = mediator().await;
        // Not registered yet.
        let out = run(
            &m,
            json!({"@type": format!("{FCM}get-device-info"), "@id": "g0"}),
            Some(&c),
        )
        .await
        .unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{FCM}problem-report"));
        assert_eq!(
            out.replies[0]["description"]["code"],
            "not-registered-for-push-notifications"
        );
        assert_eq!(out.replies[0]["~thread"]["thid"], "g0");

        let out = run(
            &m,
            json!({"@type": format!("{FCM}set-device-info"), "@id": "s1", "device_token": "tok-1", "device_platform": "android"}),
            Some(&c),
        )
        .await
        .unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{FCM}ack"));
        assert_eq!(out.replies[0]["status"], "OK");
        assert_eq!(out.replies[0]["~thread"]["thid"], "s1");
        let d = m.store.device_of("c1").await.unwrap().unwrap();
        assert_eq!(
            (d.service, d.token.as_str(), d.platform.as_deref()),
            (PushService::Fcm, "tok-1", Some("android"))
        );

        let out = run(
            &m,
            json!({"@type": format!("{FCM}get-device-info"), "@id": "g1"}),
            Some(&c),
        )
        .await
        .unwrap();
        let r = &out.replies[0];
        assert_eq!(r["@type"], format!("{FCM}device-info"));
        assert_eq!(r["device_token"], "tok-1");
        assert_eq!(r["device_platform"], "android");
        assert_eq!(r["~thread"]["thid"], "g1");

        // BC Wallet unregisters with "", others with null: both acknowledged.
        for empty in [json!(""), Value::Null] {
            run(
                &m,
                json!({"@type": format!("{FCM}set-device-info"), "@id": "s2", "device_token": "tok-2", "device_platform": "ios"}),
                Some(&c),
            )
            .await
            .unwrap();
            assert!(m.store.device_of("c1").await.unwrap().is_some());
            let out = run(
                &m,
                json!({"@type": format!("{FCM}set-device-info"), "@id": "s3", "device_token": empty, "device_platform": null}),
                Some(&c),
            )
            .await
            .unwrap();
            assert_eq!(out.replies[0]["@type"], format!("{FCM}ack"));
            assert_eq!(m.store.device_of("c1").await.unwrap(), None);
        }
    }

    /// A connection whose mediation was revoked registers no device, and can still take back
    /// the one it registered before (its token is the wallet's, not the mediator's to keep).
    #[tokio::test]
    async fn a_revoked_connection_unregisters_but_registers_nothing() {
        let (m, mut c) = mediator().await;
        let set =
            |token: Value| json!({"@type": format!("{FCM}set-device-info"), "@id": new_id(), "device_token": token});
        let out = run(&m, set(json!("tok-1")), Some(&c)).await.unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{FCM}ack"));
        c.mediation = crate::store::MediationState::Denied;
        m.store.put_connection(&c).await.unwrap();
        let out = run(&m, set(json!("tok-2")), Some(&c)).await.unwrap();
        assert_eq!(out.replies[0]["description"]["code"], "request_not_accepted");
        assert_eq!(m.store.device_of("c1").await.unwrap().unwrap().token, "tok-1");
        let out = run(&m, set(Value::Null), Some(&c)).await.unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{FCM}ack"), "{:?}", out.replies);
        assert_eq!(m.store.device_of("c1").await.unwrap(), None);
    }

    #[tokio::test]
    async fn apns_has_no_platform_and_is_separate_from_fcm() {
        let (m, c) = mediator().await;
        let out = run(
            &m,
            json!({"@type": format!("{APNS}set-device-info"), "@id": "a1", "device_token": "abcd"}),
            Some(&c),
        )
        .await
        .unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{APNS}ack"));
        let out = run(
            &m,
            json!({"@type": format!("{APNS}get-device-info"), "@id": "a2"}),
            Some(&c),
        )
        .await
        .unwrap();
        assert_eq!(out.replies[0]["@type"], format!("{APNS}device-info"));
        assert_eq!(out.replies[0]["device_token"], "abcd");
        assert!(out.replies[0].get("device_platform").is_none());
        // The FCM family does not report an APNs registration as its own.
        let out = run(
            &m,
            json!({"@type": format!("{FCM}get-device-info"), "@id": "a3"}),
            Some(&c),
        )
        .await
        .unwrap();
        assert_eq!(
            out.replies[0]["description"]["code"],
            "not-registered-for-push-notifications"
        );
    }

    #[tokio::test]
    async fn refusals() {
        let (m, c) = mediator().await;
        // Anoncrypt / unknown sender: no connection to register for.
        let e = run(
            &m,
            json!({"@type": format!("{FCM}set-device-info"), "@id": "x", "device_token": "t"}),
            None,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, HandleError::NoConnection));
        let e = run(&m, json!({"@type": format!("{FCM}get-device-info"), "@id": "x"}), None)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, HandleError::NoConnection));
        // Missing or malformed values: problem reports, nothing stored.
        for bad in [
            json!({"@type": format!("{FCM}set-device-info"), "@id": "b1"}),
            json!({"@type": format!("{FCM}set-device-info"), "@id": "b2", "device_token": 5}),
            json!({"@type": format!("{FCM}set-device-info"), "@id": "b3", "device_token": "x".repeat(MAX_TOKEN_LEN + 1)}),
            json!({"@type": format!("{FCM}set-device-info"), "@id": "b4", "device_token": "t", "device_platform": ["a"]}),
        ] {
            let out = run(&m, bad, Some(&c)).await.unwrap();
            assert!(out.replies[0]["@type"].as_str().unwrap().ends_with("/problem-report"));
            assert_eq!(m.store.device_of("c1").await.unwrap(), None);
        }
        // A connection that no longer exists cannot register.
        let mut gone = c.clone();
        gone.id = "gone".into();
        let e = run(
            &m,
            json!({"@type": format!("{FCM}set-device-info"), "@id": "x", "device_token": "t"}),
            Some(&gone),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, HandleError::NoConnection));
    }
}
