//! discover-features 1.0 (`query` -> `disclose`) and 2.0 (`queries` -> `disclosures`).

use super::{HandleError, Inbound, Mediator, Outcome};
use serde_json::{json, Value};

/// Every protocol this mediator speaks, as a protocol identifier URI.
pub const PROTOCOLS: &[&str] = &[
    "https://didcomm.org/out-of-band/1.1",
    "https://didcomm.org/didexchange/1.1",
    "https://didcomm.org/connections/1.0",
    "https://didcomm.org/coordinate-mediation/1.0",
    "https://didcomm.org/routing/1.0",
    "https://didcomm.org/messagepickup/1.0",
    "https://didcomm.org/messagepickup/2.0",
    "https://didcomm.org/trust_ping/1.0",
    "https://didcomm.org/discover-features/1.0",
    "https://didcomm.org/discover-features/2.0",
    "https://didcomm.org/report-problem/1.0",
];

/// `*`-suffix matching as RFC 0031 describes.
fn matches(pattern: &str, pid: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => pid.starts_with(prefix),
        None => pattern == pid || pid.starts_with(&format!("{pattern}/")) || pattern.trim_end_matches('/') == pid,
    }
}

pub fn query(_m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    let v2 = ctx.mtype.as_ref().map(|t| t.version.starts_with('2')).unwrap_or(false);
    let reply = if v2 {
        let mut found = Vec::new();
        for q in ctx.msg["queries"].as_array().into_iter().flatten() {
            if q["feature-type"].as_str() != Some("protocol") {
                continue;
            }
            let pat = q["match"].as_str().unwrap_or_default();
            for pid in PROTOCOLS.iter().filter(|p| matches(pat, p)) {
                found.push(json!({ "feature-type": "protocol", "id": pid }));
            }
        }
        let mut r = ctx.reply("disclosures");
        r["disclosures"] = Value::Array(found);
        r
    } else {
        let pat = ctx.msg["query"].as_str().unwrap_or("*");
        let protos: Vec<Value> = PROTOCOLS
            .iter()
            .filter(|p| matches(pat, p))
            .map(|p| json!({ "pid": p }))
            .collect();
        let mut r = ctx.reply("disclose");
        r["protocols"] = Value::Array(protos);
        r
    };
    Ok(Outcome {
        replies: vec![reply],
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wildcard_and_exact_matching() {
        assert!(super::matches(
            "https://didcomm.org/messagepickup/*",
            "https://didcomm.org/messagepickup/2.0"
        ));
        assert!(super::matches("*", "https://didcomm.org/routing/1.0"));
        assert!(super::matches(
            "https://didcomm.org/routing/1.0",
            "https://didcomm.org/routing/1.0"
        ));
        assert!(!super::matches(
            "https://didcomm.org/routing/2.0",
            "https://didcomm.org/routing/1.0"
        ));
    }
}
