//! `mailroom status`: a node's and its cluster's state from the admin endpoint, in a terminal.

use anyhow::{anyhow, bail};
use serde_json::Value;
use std::time::Duration;

/// `fut` within `limit` as a whole: awc's own timeout ends at the answer's head, and a node
/// that sent a head and then no body would otherwise hold the command for good.
async fn whole<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(res) => res,
        Err(_) => bail!("{what}: no whole answer within {limit:?}"),
    }
}

async fn get(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    whole(&format!("GET {url}"), GET_TIMEOUT, get_unbounded(url, token)).await
}

const GET_TIMEOUT: Duration = Duration::from_secs(5);
const POST_TIMEOUT: Duration = Duration::from_secs(10);

async fn get_unbounded(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let client = awc::Client::builder().timeout(GET_TIMEOUT).finish();
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.insert_header(("Authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.map_err(|e| anyhow!("GET {url}: {e}"))?;
    if !res.status().is_success() {
        bail!("GET {url}: HTTP {}", res.status());
    }
    res.json::<Value>()
        .limit(16 << 20)
        .await
        .map_err(|e| anyhow!("GET {url}: {e}"))
}

async fn post(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    whole(&format!("POST {url}"), POST_TIMEOUT, post_unbounded(url, token)).await
}

async fn post_unbounded(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let client = awc::Client::builder().timeout(POST_TIMEOUT).finish();
    let mut req = client.post(url);
    if let Some(t) = token {
        req = req.insert_header(("Authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.map_err(|e| anyhow!("POST {url}: {e}"))?;
    let body = res
        .body()
        .limit(1 << 20)
        .await
        .map_err(|e| anyhow!("POST {url}: {e}"))?;
    if !res.status().is_success() {
        bail!(
            "POST {url}: HTTP {}: {}",
            res.status(),
            printable(&String::from_utf8_lossy(&body))
        );
    }
    serde_json::from_slice(&body).map_err(|e| anyhow!("POST {url}: {e}"))
}

/// `mailroom drain` / `mailroom undrain`: posts to the node's admin `/drain` or `/undrain`
/// and prints its drain state.
pub async fn drain(admin: &str, token: Option<&str>, on: bool) -> anyhow::Result<()> {
    let base = admin.trim_end_matches('/');
    let path = if on { "drain" } else { "undrain" };
    let v = post(&format!("{base}/{path}"), token).await?;
    println!("{}", render_drain(&v));
    Ok(())
}

/// `s` as a terminal may be given it: every control character (C0, DEL, C1) and every bidi
/// formatting character written as `\u{..}`, the rest as is. What `mailroom status` prints
/// comes from the node, its peers (any answer at a peer's admin address) and wallets (a
/// connection's label): written raw, an escape sequence in it would drive the operator's
/// terminal (clear the screen, draw a fake table, set the clipboard with OSC 52), and a bidi
/// override would show the line's text in another order.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// The Unicode bidi formatting characters (marks, embeddings, overrides, isolates), and the
/// line and paragraph separators.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A string field of an answer, [`printable`]; `absent` when it is missing or not a string.
fn text(v: &Value, absent: &str) -> String {
    printable(v.as_str().unwrap_or(absent))
}

/// Any value of an answer as JSON, [`printable`] (a peer may send a string where a number
/// belongs).
fn json_text(v: &Value) -> String {
    printable(&v.to_string())
}

/// One line for a drain state (`/status` `drain`, or the answer of `/drain`).
pub fn render_drain(d: &Value) -> String {
    if d["draining"].as_bool() != Some(true) {
        return "drain: no (accepting sessions)".into();
    }
    format!(
        "drain: DRAINING since {}  sessions {}  open sockets {}  http requests {}  http leases {}  {}",
        d["since_ms"]
            .as_i64()
            .map(|t| format!("{}s ago", (crate::protocols::now_ms() - t).max(0) / 1000))
            .unwrap_or_else(|| "shutdown".into()),
        json_text(&d["sessions"]),
        json_text(&d["open_sockets"]),
        json_text(&d["http_requests"]),
        // What HTTP pickups here delivered and no one acknowledged yet: `empty` waits for it.
        match d["http_leases_held"].as_bool() {
            Some(true) => "held",
            Some(false) => "none",
            None => "?",
        },
        if d["empty"].as_bool() == Some(true) {
            "EMPTY: safe to stop"
        } else {
            "not empty yet"
        }
    )
}

/// Renders `/status` as a few lines of text (also used by tests).
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "node {}  version {}  up {}s  store {} ({})\n",
        text(&status["node"], "?"),
        text(&status["version"], "?"),
        json_text(&status["uptime_secs"]),
        text(&status["store"]["backend"], "?"),
        text(&status["store"]["health"], "?"),
    ));
    out.push_str(&format!(
        "sessions {}  queued {}\n",
        json_text(&status["sessions"]),
        json_text(&status["queued"])
    ));
    if status.get("drain").is_some() {
        out.push_str(&render_drain(&status["drain"]));
        out.push('\n');
    }
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    if !peers.is_empty() {
        out.push_str(&format!(
            "{:<12} {:<10} {:>14} {:>10}\n",
            "PEER", "LINK", "HEARTBEAT AGE", "RTT"
        ));
        for p in peers {
            out.push_str(&format!(
                "{:<12} {:<10} {:>14} {:>10}\n",
                text(&p["id"], "?"),
                if p["connected"].as_bool().unwrap_or(false) {
                    "up"
                } else {
                    "DOWN"
                },
                p["last_heartbeat_age_ms"]
                    .as_u64()
                    .map(|a| format!("{a} ms"))
                    .unwrap_or_else(|| "-".into()),
                p["rtt_ms"]
                    .as_f64()
                    .map(|r| format!("{r:.1} ms"))
                    .unwrap_or_else(|| "-".into()),
            ));
        }
    }
    out
}

pub async fn print(admin: &str, token: Option<&str>) -> anyhow::Result<()> {
    let base = admin.trim_end_matches('/');
    let status = get(&format!("{base}/status"), token).await?;
    print!("{}", render(&status));
    // The history, as the status page shows it (a node of an older version has none).
    if let Ok(h) = get(&format!("{base}/history"), token).await {
        print!("{}", render_history(&h));
    }
    Ok(())
}

/// Mean rate of `key` over the last `secs` seconds of a series of per-step rates.
fn mean_rate(points: &[Value], step_s: u64, secs: u64, key: &str) -> Option<f64> {
    let n = (secs / step_s.max(1)) as usize;
    if points.is_empty() {
        return None;
    }
    let tail = &points[points.len().saturating_sub(n)..];
    let v = |p: &Value| -> f64 {
        if key == "refusals" {
            p["refusals"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_f64).sum())
                .unwrap_or(0.0)
        } else {
            p[key].as_f64().unwrap_or(0.0)
        }
    };
    Some(tail.iter().map(v).sum::<f64>() / tail.len() as f64)
}

/// Renders `/history`: the cluster's rates over the last minute, 10 minutes and hour, the
/// nodes (sessions, drain), the refusal reasons, and the deepest and oldest queues.
pub fn render_history(h: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let fine = h["cluster"]["fine"].as_array().unwrap_or(&empty);
    let coarse = h["cluster"]["coarse"].as_array().unwrap_or(&empty);
    out.push_str(&format!(
        "{:<12} {:>10} {:>10} {:>10}\n",
        "RATE /s", "1 min", "10 min", "1 hour"
    ));
    for key in ["forwards", "deliveries", "acks", "refusals", "pushes"] {
        let f = |x: Option<f64>| x.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        let ten = if coarse.len() >= 6 {
            mean_rate(coarse, 10, 600, key)
        } else {
            mean_rate(fine, 1, 600, key)
        };
        let hour = if coarse.is_empty() {
            None
        } else {
            mean_rate(coarse, 10, 3600, key)
        };
        out.push_str(&format!(
            "{:<12} {:>10} {:>10} {:>10}\n",
            key,
            f(mean_rate(fine, 1, 60, key)),
            f(ten),
            f(hour)
        ));
    }
    let mut reasons = std::collections::BTreeMap::<String, f64>::new();
    for p in coarse.iter().chain(fine.iter()) {
        for (k, v) in p["refusals"].as_object().into_iter().flatten() {
            *reasons.entry(k.clone()).or_default() += v.as_f64().unwrap_or(0.0);
        }
    }
    if !reasons.is_empty() {
        out.push_str(&format!(
            "refusal reasons: {}\n",
            reasons.keys().map(|r| printable(r)).collect::<Vec<_>>().join(", ")
        ));
    }
    for n in h["nodes"].as_array().unwrap_or(&empty) {
        let id = text(&n["id"], "?");
        if n["reachable"] == false {
            out.push_str(&format!("node {id}: unreachable ({})\n", text(&n["error"], "?")));
        } else {
            out.push_str(&format!(
                "node {id}: {} sessions, {}\n",
                json_text(&n["sessions"]),
                render_drain(&n["drain"])
            ));
        }
    }
    for (what, key) in [("DEEPEST QUEUES", "deepest"), ("OLDEST QUEUES", "oldest")] {
        let list = h["queues"][key].as_array().unwrap_or(&empty);
        if list.is_empty() {
            continue;
        }
        out.push_str(&format!("{what:<38} {:<16} {:>8} {:>12}\n", "LABEL", "MSGS", "OLDEST"));
        for q in list {
            out.push_str(&format!(
                "{:<38} {:<16} {:>8} {:>12}\n",
                text(&q["connection"], "?"),
                text(&q["label"], "-"),
                json_text(&q["depth"]),
                q["oldest_age_ms"]
                    .as_i64()
                    .map(|a| format!("{}s", a / 1000))
                    .unwrap_or_else(|| "-".into())
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a terminal would act on: C0 (ESC among them), DEL, C1 (CSI among them), bidi
    /// formatting characters.
    fn raw_controls(s: &str) -> Vec<char> {
        s.chars()
            .filter(|c| (c.is_control() && *c != '\n') || is_bidi_control(*c))
            .collect()
    }

    const HOSTILE: &str = "\u{1b}[2J\u{1b}]52;c;ZXZpbA==\u{7}\u{9b}31m\u{202e}evil\u{7f}\u{2066}";

    #[test]
    fn what_peers_and_wallets_wrote_reaches_the_terminal_escaped() {
        let h = json!({
            "cluster": {"fine": [{"refusals": {HOSTILE: 1.0}}], "coarse": []},
            "nodes": [
                {"id": HOSTILE, "reachable": false, "error": HOSTILE},
                {"id": "n2", "reachable": true, "sessions": HOSTILE,
                 "drain": {"draining": true, "sessions": HOSTILE, "open_sockets": 0, "http_requests": 0}},
            ],
            "queues": {
                "deepest": [{"connection": HOSTILE, "label": HOSTILE, "depth": HOSTILE, "oldest_age_ms": 1000}],
                "oldest": [{"connection": "c1", "label": HOSTILE, "depth": 3, "oldest_age_ms": 1000}],
            },
        });
        let out = render_history(&h);
        assert_eq!(raw_controls(&out), Vec::<char>::new(), "{out:?}");
        // Shown, escaped: the operator sees that the label holds them.
        assert!(out.contains("\\u{1b}[2J"), "{out}");
        assert!(out.contains("\\u{9b}31m"), "{out}");
        assert!(out.contains("\\u{202e}evil"), "{out}");

        let status = json!({
            "node": HOSTILE, "version": HOSTILE, "uptime_secs": HOSTILE,
            "store": {"backend": HOSTILE, "health": HOSTILE},
            "sessions": HOSTILE, "queued": HOSTILE,
            "drain": {"draining": true, "sessions": HOSTILE, "open_sockets": HOSTILE, "http_requests": HOSTILE},
            "peers": [{"id": HOSTILE, "connected": true}],
        });
        let out = render(&status);
        assert_eq!(raw_controls(&out), Vec::<char>::new(), "{out:?}");
    }

    #[test]
    fn printable_leaves_ordinary_text_alone() {
        assert_eq!(
            printable("Alice's wallet — café 日本 🙂"),
            "Alice's wallet — café 日本 🙂"
        );
        assert_eq!(printable("a\u{1b}b\u{9b}c\u{202e}d"), "a\\u{1b}b\\u{9b}c\\u{202e}d");
    }
}
