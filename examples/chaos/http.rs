//! HTTP helpers, and the cluster as the nodes' admin endpoints show it: ready, linked, healed.

use crate::*;

pub(crate) async fn get_json(url: &str) -> Result<(u16, Value)> {
    let client = awc::Client::builder().timeout(Duration::from_secs(3)).finish();
    let mut res = client.get(url).send().await.map_err(|e| anyhow!("GET {url}: {e}"))?;
    let status = res.status().as_u16();
    let v = res.json::<Value>().limit(16 << 20).await.unwrap_or(Value::Null);
    Ok((status, v))
}

pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f().await {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what}: not within {within:?}")
}

/// Every node ready, and every node's /status shows every peer connected; else what is not.
pub(crate) async fn cluster_state(nodes: &[NodeSpec]) -> Result<(), String> {
    for n in nodes {
        let t = Instant::now();
        let ready = get_json(&format!("http://{}/ready", n.admin)).await;
        if t.elapsed() > Duration::from_secs(1) {
            // /ready checks the store: slow while the pool reconnects after PostgreSQL restarts.
            eprintln!(
                "[chaos]           {} /ready took {:.1} s",
                n.id,
                t.elapsed().as_secs_f64()
            );
        }
        match ready {
            Ok((200, _)) => {}
            Ok((s, v)) => return Err(format!("{} /ready {s} {v}", n.id)),
            Err(e) => return Err(format!("{} /ready: {e:#}", n.id)),
        }
        match get_json(&format!("http://{}/status", n.admin)).await {
            Ok((200, v)) => {
                let peers = v["peers"].as_array().cloned().unwrap_or_default();
                let down: Vec<&str> = peers
                    .iter()
                    .filter(|p| p["connected"].as_bool() != Some(true))
                    .filter_map(|p| p["id"].as_str())
                    .collect();
                if peers.len() + 1 != nodes.len() || !down.is_empty() {
                    return Err(format!("{}: peers not connected: {down:?}", n.id));
                }
            }
            Ok((s, _)) => return Err(format!("{} /status {s}", n.id)),
            Err(e) => return Err(format!("{} /status: {e:#}", n.id)),
        }
    }
    Ok(())
}

pub(crate) async fn all_ready_and_linked(nodes: &[NodeSpec]) -> bool {
    cluster_state(nodes).await.is_ok()
}

/// Waits until [`cluster_state`] is Ok; returns how long it took, or the last reason.
pub(crate) async fn wait_healed(nodes: &[NodeSpec], within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = String::new();
    loop {
        match cluster_state(nodes).await {
            Ok(()) => return Ok(t0.elapsed()),
            Err(e) => {
                // Each new reason once, so a slow heal shows what it waited on.
                if e != last {
                    eprintln!("[chaos]         {:>5.1} s waiting: {e}", t0.elapsed().as_secs_f64());
                }
                last = e;
            }
        }
        if t0.elapsed() >= within {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
