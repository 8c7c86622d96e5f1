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
    "https://didcomm.org/push-notifications-fcm/1.0",
    "https://didcomm.org/push-notifications-apns/1.0",
];

/// Queries of one discover-features 2.0 message that are answered; the rest are ignored.
pub const MAX_QUERIES: usize = 32;

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
        // As many queries as protocols are worth answering: past that an envelope of copies
        // would only make the node build and drop replies (a 4 MiB body holds ~75,000).
        for q in ctx.msg["queries"].as_array().into_iter().flatten().take(MAX_QUERIES) {
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
    #[tokio::test]
    async fn push_protocols_are_disclosed_by_1_0_and_2_0() {
        use crate::protocols::{Inbound, Mediator, MediatorKeys};
        use serde_json::{json, Value};
        let store = std::sync::Arc::new(crate::store::SledStore::temporary().await.unwrap());
        let cfg = crate::config::Config::single_node_default();
        let m = Mediator::new(store, MediatorKeys::generate(), &cfg, "n1", "http://127.0.0.1:1");
        let ask = |msg: Value| {
            let ctx = Inbound::for_test(msg, None, None);
            super::query(&m, &ctx).unwrap().replies.remove(0)
        };
        let v1 = ask(
            json!({"@type": "https://didcomm.org/discover-features/1.0/query", "@id": "q", "query": "https://didcomm.org/push-notifications-*"}),
        );
        let pids: Vec<&str> = v1["protocols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_str().unwrap())
            .collect();
        assert_eq!(
            pids,
            [
                "https://didcomm.org/push-notifications-fcm/1.0",
                "https://didcomm.org/push-notifications-apns/1.0"
            ]
        );
        let v2 = ask(
            json!({"@type": "https://didcomm.org/discover-features/2.0/queries", "@id": "q",
            "queries": [{"feature-type": "protocol", "match": "https://didcomm.org/push-notifications-fcm/*"},
                        {"feature-type": "protocol", "match": "https://didcomm.org/push-notifications-apns/1.0"}]}),
        );
        let ids: Vec<&str> = v2["disclosures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "https://didcomm.org/push-notifications-fcm/1.0",
                "https://didcomm.org/push-notifications-apns/1.0"
            ]
        );
        // 10,000 copies of `*`: only the first MAX_QUERIES are answered.
        let many: Vec<Value> = (0..10_000)
            .map(|_| json!({"feature-type": "protocol", "match": "*"}))
            .collect();
        let big =
            ask(json!({"@type": "https://didcomm.org/discover-features/2.0/queries", "@id": "q", "queries": many}));
        assert_eq!(
            big["disclosures"].as_array().unwrap().len(),
            super::MAX_QUERIES * super::PROTOCOLS.len()
        );
    }

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
