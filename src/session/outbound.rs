//! Outbound HTTP: replies and queued messages POSTed to an agent's own endpoint.
//!
//! A queued message stays in the store until its POST succeeds (2xx): it is leased while
//! in flight and acknowledged after, or released on failure for the sweep to retry.

use super::Shared;
use crate::protocols::now_ms;
use crate::store::Connection;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

pub const ENVELOPE_CONTENT_TYPE: &str = "application/didcomm-envelope-enc";

/// The agent's own HTTP(S) endpoint, if its DID document has one (wallets have none).
pub fn http_endpoint(conn: &Connection) -> Option<&str> {
    conn.their_endpoints
        .iter()
        .map(String::as_str)
        .find(|e| e.starts_with("http://") || e.starts_with("https://"))
}

/// POSTs one envelope; Ok on a 2xx answer.
pub async fn post_envelope(url: &str, body: Vec<u8>, timeout: Duration) -> Result<(), String> {
    let client = awc::Client::builder().timeout(timeout).finish();
    let res = client
        .post(url)
        .insert_header(("Content-Type", ENVELOPE_CONTENT_TYPE))
        .send_body(body)
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    if res.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: HTTP {}", res.status()))
    }
}

/// Sends replies that could not go back on the inbound transport (no return-route) to the
/// connection's own endpoint. Agents without one (wallets) only ever use return-route.
pub async fn send_replies(shared: &Arc<Shared>, conn: &Connection, replies: &[Value]) {
    let Some(endpoint) = http_endpoint(conn) else {
        if !replies.is_empty() {
            tracing::debug!(connection = %conn.id, "no return route and no endpoint: {} replies dropped", replies.len());
        }
        return;
    };
    let timeout = Duration::from_millis(shared.cfg.delivery.endpoint_timeout_ms);
    for r in replies {
        match shared.mediator.pack_for(conn, r) {
            Ok(packed) => {
                if let Err(e) = post_envelope(endpoint, packed, timeout).await {
                    tracing::warn!(connection = %conn.id, "reply not delivered: {e}");
                }
            }
            Err(e) => tracing::warn!(connection = %conn.id, "reply not packed: {e}"),
        }
    }
}

/// Drains a connection's queue to its endpoint, a batch at a time, until it is empty or a
/// POST fails.
pub async fn drain_to_endpoint(shared: &Arc<Shared>, conn: &str, endpoint: &str) {
    let store = &shared.mediator.store;
    let owner = crate::protocols::lease_owner(&shared.mediator.node_id, "endpoint");
    let timeout = Duration::from_millis(shared.cfg.delivery.endpoint_timeout_ms);
    loop {
        let now = now_ms();
        let batch = match store
            .lease(
                conn,
                shared.mediator.batch_size,
                &owner,
                now,
                now.saturating_add(shared.mediator.lease_ms),
            )
            .await
        {
            Ok(b) if !b.is_empty() => b,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(connection = %conn, "endpoint delivery: store: {e}");
                return;
            }
        };
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for q in &batch {
            if q.attempts > 1 {
                shared.metrics.redelivered.inc();
            }
            match post_envelope(endpoint, q.payload.clone(), timeout).await {
                Ok(()) => done.push(q.id),
                Err(e) => {
                    tracing::info!(connection = %conn, "endpoint delivery failed, kept queued: {e}");
                    failed.push(q.id);
                }
            }
        }
        if !done.is_empty() {
            let _ = store.ack(conn, &done).await;
            shared.metrics.delivered("endpoint", "v1", done.len() as u64);
        }
        if !failed.is_empty() {
            let _ = store.release(conn, &failed, &owner).await;
            return;
        }
    }
}
