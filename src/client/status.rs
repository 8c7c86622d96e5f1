//! `mailroom status`: a node's and its cluster's state from the admin endpoint, in a terminal.

use anyhow::{anyhow, bail};
use serde_json::Value;
use std::time::Duration;

async fn get(url: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let client = awc::Client::builder().timeout(Duration::from_secs(5)).finish();
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
    let client = awc::Client::builder().timeout(Duration::from_secs(10)).finish();
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
        bail!("POST {url}: HTTP {}: {}", res.status(), String::from_utf8_lossy(&body));
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
        d["sessions"],
        d["open_sockets"],
        d["http_requests"],
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
        status["node"].as_str().unwrap_or("?"),
        status["version"].as_str().unwrap_or("?"),
        status["uptime_secs"],
        status["store"]["backend"].as_str().unwrap_or("?"),
        status["store"]["health"].as_str().unwrap_or("?"),
    ));
    out.push_str(&format!(
        "sessions {}  queued {}\n",
        status["sessions"], status["queued"]
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
                p["id"].as_str().unwrap_or("?"),
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
            reasons.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    for n in h["nodes"].as_array().unwrap_or(&empty) {
        let id = n["id"].as_str().unwrap_or("?");
        if n["reachable"] == false {
            out.push_str(&format!(
                "node {id}: unreachable ({})\n",
                n["error"].as_str().unwrap_or("?")
            ));
        } else {
            out.push_str(&format!(
                "node {id}: {} sessions, {}\n",
                n["sessions"],
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
                q["connection"].as_str().unwrap_or("?"),
                q["label"].as_str().unwrap_or("-"),
                q["depth"],
                q["oldest_age_ms"]
                    .as_i64()
                    .map(|a| format!("{}s", a / 1000))
                    .unwrap_or_else(|| "-".into())
            ));
        }
    }
    out
}
