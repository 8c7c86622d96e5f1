//! Issue 7, "what must show it works" 3: the wallet-side plugin BC Wallet and Bifold run,
//! `@credo-ts/push-notifications` 0.7.1, on a real Credo 0.6.3 wallet
//! (tests/interop/push-credo06/wallet.mjs), registers its FCM token through mailroom:
//! set-device-info is acknowledged, get-device-info returns the token, and a forward while the
//! wallet is offline reaches the FCM stand-in with that token.
//!
//! Needs `tests/interop/push-credo06/node_modules` (scripts/interop-setup.sh installs it); the
//! test skips, loudly, only when that folder is absent (scripts/interop.sh runs it after the
//! install, with PUSH_CREDO_REQUIRED=1, which turns that skip into a failure).

mod common;
#[path = "common/push.rs"]
#[allow(dead_code)]
mod standin;

use common::*;
use mailroom::client::{basic_message, Sender};
use mailroom::config::Strategy;
use serde_json::Value;
use standin::StandIn;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Kills the wallet (our own child, by its handle) when the test ends, pass or fail.
struct Wallet(Child);
impl Drop for Wallet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[actix_rt::test]
async fn credo_push_plugin_registers_through_mailroom() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/push-credo06");
    if !dir.join("node_modules/@credo-ts/push-notifications").is_dir() {
        // scripts/interop.sh installs it and sets this: there, a missing install is a failure.
        assert!(
            std::env::var_os("PUSH_CREDO_REQUIRED").is_none(),
            "PUSH_CREDO_REQUIRED is set but {} has no node_modules",
            dir.display()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED credo_push_plugin_registers_through_mailroom: {} has no \
             node_modules (run scripts/interop-setup.sh) !!!!!!!!\n",
            dir.display()
        );
        return;
    }
    let si = StandIn::start();
    let pc = si.push_config(60, &["proj-credo"], false);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = test_config(tmp.path(), Strategy::QueueAndLiveModeDelivery);
    cfg.push = Some(pc);
    let n = start(&cfg);
    let inv = get_json(&format!("{}/invitation", n.public_url())).await;
    let url = inv["invitation_url"].as_str().expect("invitation_url").to_string();
    let token = format!("credo-fcm-token-{}", std::process::id());
    let wallet_dir = tempfile::tempdir().unwrap();

    let mut child = Command::new("node")
        .arg("wallet.mjs")
        .arg(&url)
        .arg(&token)
        .arg(wallet_dir.path())
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node runs");
    let stdout = child.stdout.take().unwrap();
    let _wallet = Wallet(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(120), line)
        .await
        .expect("the wallet is ready within 120 s")
        .unwrap()
        .unwrap();
    let out: Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("the wallet prints one JSON line ({e}): {line:?}"));
    eprintln!("wallet: {out}");
    assert_eq!(out["ready"], true, "{out}");
    // get-device-info, answered by mailroom and parsed by the plugin's own message class.
    let info = &out["deviceInfo"];
    assert_eq!(info["device_token"], token.as_str(), "{out}");
    assert_eq!(info["device_platform"], "android", "{out}");
    // set-device-info acknowledged.
    assert_eq!(
        out["ack"]["@type"], "https://didcomm.org/push-notifications-fcm/1.0/ack",
        "{out}"
    );

    // The wallet has shut down: a forward to its recipient key wakes it through FCM
    // with the token the plugin registered.
    let to = out["recipientKey"].as_str().expect("recipientKey").to_string();
    let routing: Vec<String> = out["routingKeys"]
        .as_array()
        .expect("routingKeys")
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let status = Sender::new()
        .forward(&n.public_url(), &basic_message("wake up"), &to, &routing)
        .await
        .unwrap();
    assert_eq!(status, 202, "forward accepted");
    let hits = eventually("a push at the FCM stand-in", || async {
        let h = si.state.hits("fcm:");
        (!h.is_empty()).then_some(h)
    })
    .await;
    for h in &hits {
        assert!(h.problems.is_empty(), "{} {}: {:?}", h.kind, h.path, h.problems);
    }
    assert_eq!(hits[0].path, "/v1/projects/proj-credo/messages:send");
    assert_eq!(hits[0].body["message"]["token"], token.as_str());
}
