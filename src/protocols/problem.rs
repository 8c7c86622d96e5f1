//! report-problem 1.0: every refusal the peer can be told about, in one shape.

use super::{HandleError, Inbound, Mediator, Outcome};
use crate::didcomm::message::{self, DIDCOMM_PREFIX, LEGACY_PREFIX};
use serde_json::json;

/// A problem report answering `ctx`, with a code from RFC 0035 and an English explanation.
pub fn report(ctx: &Inbound, code: &str, explain: &str) -> Outcome {
    let prefix = match &ctx.mtype {
        Some(t) if t.legacy => LEGACY_PREFIX,
        _ => DIDCOMM_PREFIX,
    };
    tracing::info!(
        connection = ctx.conn.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
        r#type = %ctx.type_str,
        code,
        "refused: {explain}"
    );
    Outcome {
        replies: vec![json!({
            "@type": format!("{prefix}report-problem/1.0/problem-report"),
            "@id": crate::didcomm::message::new_id(),
            "~thread": { "thid": ctx.thid() },
            "description": { "code": code, "en": explain },
            "explain_ltxt": explain,
        })],
        ..Outcome::default()
    }
}

/// An unknown or unsupported `@type`: a problem report to a known peer; a plain refusal to
/// an unknown one (there is nobody to address a report to).
pub fn unknown_type(_m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let what = if ctx.type_str.is_empty() {
        "the message has no @type".to_string()
    } else {
        format!("unsupported message type {:?}", message::clip(&ctx.type_str, 200))
    };
    if ctx.conn.is_none() {
        return Err(HandleError::BadMessage(what));
    }
    Ok(report(ctx, "unsupported-message-type", &what))
}

/// A peer's problem report: logged, its code and the start of its explanation only (anyone
/// may send one, anoncrypted, up to a whole envelope).
pub fn received(_m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let d = &ctx.msg["description"];
    let code = d["code"].as_str().or(ctx.msg["code"].as_str()).unwrap_or_default();
    let explain = d["en"]
        .as_str()
        .or(ctx.msg["explain_ltxt"].as_str())
        .or(ctx.msg["comment"].as_str())
        .unwrap_or_default();
    tracing::warn!(
        connection = ctx.conn.as_ref().map(|c| c.id.as_str()).unwrap_or("-"),
        code = message::clip(code, 80),
        explain = message::clip(explain, 200),
        thid = message::clip(&ctx.thid(), 80),
        "peer sent a problem report"
    );
    Ok(Outcome::default())
}
