//! `mailroom probe` against a real mailroom node: every check passes (the binary, as an
//! operator runs it), and the exit codes for bad arguments.

mod common;

use common::{start, test_config};
use mailroom::config::Strategy;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mailroom");

/// Every check the probe runs, in its order (a check that silently stops running is a failure).
const CHECKS: &[&str] = &[
    "onboarding-didexchange",
    "onboarding-connections",
    "discover-features",
    "mediation",
    "keylist-update",
    "keylist-query",
    "forward",
    "pickup-2.0-status",
    "pickup-2.0-delivery",
    "pickup-2.0-messages-received",
    "pickup-1.0-batch",
    "redelivery",
    "live-mode-ws",
    "redelivery-session-end",
    "implicit-ws",
    "isolation-read",
    "isolation-ack",
    "isolation-forward",
    "key-takeover",
    "malformed-garbage",
    "malformed-truncated",
    "malformed-wrong-key",
    "malformed-unknown-type",
    "malformed-huge",
];

async fn probe(args: &[&str]) -> Output {
    tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(BIN)
            .arg("probe")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the probe finishes within 240 s")
    .expect("the probe starts")
}

#[actix_rt::test]
async fn every_check_passes_against_mailroom() {
    let dir = tempfile::tempdir().unwrap();
    // test_config: 2 s leases, so `redelivery` (over HTTP, after the lease) takes ~2 s.
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let url = format!("{}/invitation", n.public_url());
    let out = probe(&[
        &url,
        "--redelivery-wait-secs",
        "15",
        "--huge-bytes",
        &(6usize << 20).to_string(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let ran: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("PASS ")
                .or_else(|| l.strip_prefix("FAIL "))
                .or_else(|| l.strip_prefix("SKIP "))?;
            Some(rest.split(':').next().unwrap_or(rest))
        })
        .collect();
    assert_eq!(ran, CHECKS, "the checks that ran, in order");
    let not_passed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("FAIL ") || l.starts_with("SKIP "))
        .collect();
    assert!(
        not_passed.is_empty(),
        "against mailroom every check passes: {not_passed:#?}"
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("{} passed, 0 failed, 0 skipped", CHECKS.len()).as_str())
    );
    assert_eq!(out.status.code(), Some(0));
    // The node is still serving after the malformed inputs.
    let inv = common::invitation(&n).await;
    mailroom::client::Agent::onboard(&inv)
        .await
        .expect("a wallet still onboards");
    n.stop().unwrap();
}

#[actix_rt::test]
async fn bad_urls_and_arguments_exit_64() {
    for args in [
        &["not a url"][..],
        &["ftp://127.0.0.1/x"][..],
        &["http://127.0.0.1:9/?oob=%%%"][..],
        &["http://127.0.0.1:9/?oob=bm90IGpzb24"][..],
        &[][..],
        &["http://127.0.0.1:9/", "--timeout-secs", "soon"][..],
    ] {
        let out = probe(args).await;
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
