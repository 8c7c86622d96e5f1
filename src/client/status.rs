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
        "drain: DRAINING since {}  sessions {}  open sockets {}  {}",
        d["since_ms"]
            .as_i64()
            .map(|t| format!("{}s ago", (crate::protocols::now_ms() - t).max(0) / 1000))
            .unwrap_or_else(|| "shutdown".into()),
        d["sessions"],
        d["open_sockets"],
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
    Ok(())
}
