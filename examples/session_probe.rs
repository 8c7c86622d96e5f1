//! A wallet session held open until the mediator closes it: `scripts/container-test.sh` uses
//! it to check that SIGTERM to a container closes live sessions with 1001 ("going away").
//!
//!   session_probe http://127.0.0.1:8080
//!
//! Onboards (connection, mediation), opens the WebSocket, turns on live mode, prints
//! `session open` and waits (up to 10 minutes) for the socket's end. Prints the close code and
//! exits 0 if it was 1001, 1 otherwise (another code, no close frame, or any failure).

use mailroom::client::{Agent, Invitation, WsEvent};
use serde_json::json;
use std::io::Write;
use std::time::Duration;

async fn probe(base: &str) -> anyhow::Result<u16> {
    let base = base.trim_end_matches('/');
    let res = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
        .get(format!("{base}/invitation"))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {base}/invitation: {e}"))?
        .json::<serde_json::Value>()
        .await?;
    let inv = Invitation::parse(&res["invitation"])?;
    let (a, _key) = Agent::onboard(&inv).await?;
    let ws_url = mailroom::config::ws_url(base);
    let mut ws = a.websocket(&ws_url).await?;
    let live = json!({
        "@type": "https://didcomm.org/messagepickup/2.0/live-delivery-change",
        "@id": mailroom::didcomm::message::new_id(),
        "live_delivery": true,
        "~transport": { "return_route": "all" },
    });
    ws.send_envelope(a.pack(&live)?, true).await?;
    match ws.next(Duration::from_secs(30)).await? {
        WsEvent::Envelope(_) => {}
        WsEvent::Closed(r) => anyhow::bail!("closed before live mode was on: {r:?}"),
    }
    println!("session open");
    std::io::stdout().flush()?;
    loop {
        match ws.next(Duration::from_secs(600)).await? {
            WsEvent::Envelope(_) => continue,
            WsEvent::Closed(Some(r)) => return Ok(u16::from(r.code)),
            WsEvent::Closed(None) => anyhow::bail!("the socket ended without a close frame"),
        }
    }
}

fn main() -> std::process::ExitCode {
    let Some(base) = std::env::args().nth(1) else {
        eprintln!("usage: session_probe PUBLIC_URL");
        return std::process::ExitCode::from(64);
    };
    match actix_rt::System::new().block_on(probe(&base)) {
        Ok(1001) => {
            println!("closed 1001");
            std::process::ExitCode::SUCCESS
        }
        Ok(code) => {
            println!("closed {code} (expected 1001)");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            println!("session probe failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
