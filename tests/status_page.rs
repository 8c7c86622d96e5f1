//! The operator's status page (`GET /` on the admin listener) in a real headless Chromium:
//! a 3-node cluster on PostgreSQL with a live wallet session, the DOM after the page's
//! scripts ran, a screenshot (`target/status-page.png`), and the admin token case.
//!
//! Needs `/usr/bin/chromium` (`scripts/install-chromium.sh` installs it) and PostgreSQL on
//! 127.0.0.1:5432 (`scripts/ensure-postgres.sh`).
//!
//! Also, without Chromium: the reads behind the page and `mailroom healthcheck` end in time
//! when what answers them sends a head and then never its body.

mod common;

use common::cluster::*;
use common::*;
use mailroom::client::Agent;
use mailroom::config::Strategy;
use mailroom::node::RunningNode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Virtual time the page gets before the DOM is dumped or the picture taken: the first
/// fetch of `/cluster` completes well within it.
const BUDGET_MS: &str = "5000";
/// Wall-clock limit of one Chromium run.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(90);

fn chromium() -> &'static str {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the status page test needs Debian's chromium package; \
         run scripts/install-chromium.sh (as root) first"
    );
    CHROMIUM
}

/// Runs headless Chromium on `url` with `args` (a fresh profile each time); returns stdout.
async fn run_chromium(args: &[String], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--virtual-time-budget={BUDGET_MS}"))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(CHROMIUM_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within {CHROMIUM_TIMEOUT:?} on {url}"))
        .expect("chromium runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "chromium {args:?} {url} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The DOM after the page's scripts ran, without its `<script>`, `<style>` and comments (whose
/// text would match the assertions on what is shown).
async fn dump_dom(url: &str) -> String {
    let mut dom = run_chromium(&["--dump-dom".into()], url).await;
    for (open, close) in [("<script", "</script>"), ("<style", "</style>"), ("<!--", "-->")] {
        while let Some(i) = dom.find(open) {
            let j = dom[i..].find(close).map(|j| i + j + close.len()).expect("closed");
            dom.replace_range(i..j, "");
        }
    }
    dom
}

/// [`dump_dom`] again (a few times, half a second apart) until `settled` holds for it: the page
/// shows the cluster at the instant it read it, and a link can read down for a moment (two
/// nodes that dialed each other at once close one link for the other). The last DOM read is
/// returned either way, for the test's assertions to report.
async fn dump_dom_settled(url: &str, settled: impl Fn(&str) -> bool) -> String {
    let mut dom = dump_dom(url).await;
    for _ in 0..4 {
        if settled(&dom) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        dom = dump_dom(url).await;
    }
    dom
}

/// The text of the element with this id (which holds no other element).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let s = dom
        .split(&format!("id=\"{id}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let s = &s[s.find('>').unwrap() + 1..];
    &s[..s.find('<').unwrap()]
}

/// The text of the error banner.
fn banner(dom: &str) -> &str {
    text_of(dom, "bannertext")
}

/// The `<tr>` of `node` in the page's nodes table.
fn node_row<'a>(dom: &'a str, node: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr data-node=\"{node}\""))
        .unwrap_or_else(|| panic!("no row for {node} in the page:\n{dom}"));
    let end = dom[start..].find("</tr>").map(|e| start + e).expect("row ends");
    &dom[start..end]
}

/// The number in the row's sessions cell.
fn sessions_in(row: &str) -> u64 {
    let cell = row
        .split("data-col=\"sessions\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no sessions cell in {row}"));
    cell[..cell.find('<').unwrap()].replace(',', "").parse().expect(row)
}

fn body_state(dom: &str) -> &str {
    let i = dom.find("<body").expect("a body");
    let tag = &dom[i..i + dom[i..].find('>').unwrap()];
    let s = tag.split("data-state=\"").nth(1).expect("data-state on body");
    &s[..s.find('"').unwrap()]
}

/// Takes a 1280x900 screenshot of `url` to `target/<name>` and checks it is a real picture.
async fn screenshot(url: &str, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join(name);
    let _ = std::fs::remove_file(&path);
    run_chromium(
        &[
            format!("--screenshot={}", path.display()),
            "--window-size=1280,900".into(),
        ],
        url,
    )
    .await;
    assert_png(&path, 1280, 900);
    path
}

/// A PNG of `w`x`h` with more in it than a blank page.
fn assert_png(path: &Path, w: u32, h: u32) {
    let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{} is not a PNG", path.display());
    assert_eq!(&png[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes(png[i..i + 4].try_into().unwrap());
    assert_eq!((be(16), be(20)), (w, h), "screenshot size");
    // A blank 1280x900 page compresses to a few kB; text, tables and colours take far more.
    assert!(
        png.len() > 25_000,
        "{} is only {} bytes: the page looks empty",
        path.display(),
        png.len()
    );
}

/// The page on n1 of a 3-node cluster, with a wallet's live session on n1: every node, its
/// link and its sessions are shown; a screenshot is taken.
#[actix_rt::test]
async fn the_status_page_shows_the_cluster_its_links_and_sessions() {
    chromium();
    let db = FreshDb::create().await;
    let (cfg, ls) = bind_cluster(3, &db.url, 1_000);
    let store = open_shared_store(&cfg).await;
    let nodes: Vec<RunningNode> = ls
        .into_iter()
        .enumerate()
        .map(|(i, l)| start_node(&cfg, &format!("n{}", i + 1), l, &store, None))
        .collect();
    for n in &nodes {
        for p in nodes.iter().filter(|p| p.node_id != n.node_id) {
            eventually(&format!("{} links to {}", n.node_id, p.node_id), || async {
                peer_connected(n, &p.node_id).await.then_some(())
            })
            .await;
        }
    }
    let n1 = &nodes[0];

    // A wallet with a live session on n1, known to the whole cluster.
    let inv = invitation(n1).await;
    let (a, _key) = Agent::onboard(&inv).await.unwrap();
    let ws = live_socket(&a, n1).await;
    let conns = get_json(&format!("{}/connections", n1.admin_url())).await;
    let conn = conns["connections"][0]["id"].as_str().unwrap().to_string();
    for n in &nodes {
        eventually(&format!("{} sees the session on n1", n.node_id), || async {
            (owner_seen_by(n, &conn).await.as_deref() == Some("n1")).then_some(())
        })
        .await;
    }

    // A second wallet, offline, with mail waiting: the queue lists show it with its label.
    let (b, kb) = Agent::onboard(&inv).await.unwrap();
    let g = b.grant.clone().unwrap();
    for i in 0..3 {
        mailroom::client::Sender::new()
            .forward(
                &n1.public_url(),
                &mailroom::client::basic_message(&format!("q{i}")),
                &kb.verkey(),
                &g.routing_keys,
            )
            .await
            .unwrap();
    }
    let queued_conn = {
        let all = get_json(&format!("{}/connections", n1.admin_url())).await;
        all["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["queue"]["depth"] == 3)
            .expect("the offline wallet's queue")["id"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // The HTML itself: no token configured, served as self-contained HTML.
    let (status, html) = get_status(&format!("{}/", n1.admin_url()), None).await;
    assert_eq!(status, 200);
    assert!(html.starts_with("<!doctype html>"), "{}", &html[..80.min(html.len())]);
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !html.contains(external),
            "the page must not load external assets ({external})"
        );
    }

    // The charts draw each node's history, whose first point needs two samples 1 s apart: a
    // page read sooner (a fast run) has no line to draw yet.
    for n in &nodes {
        eventually(&format!("{} has a point of history", n.node_id), || async {
            let h = get_json(&format!("{}/history?scope=node", n.admin_url())).await;
            h["history"]["fine"]
                .as_array()
                .is_some_and(|f| !f.is_empty())
                .then_some(())
        })
        .await;
    }
    let page = format!("{}/", n1.admin_url());
    let started = std::time::Instant::now();
    let dom = dump_dom_settled(&page, |d| d.contains(">2 / 2<")).await;
    let cluster: Value = get_json(&format!("{}/cluster", n1.admin_url())).await;
    let context = format!("/cluster = {cluster:#}\nDOM:\n{dom}");
    assert_eq!(body_state(&dom), "ok", "the page did not load its data\n{context}");
    assert_eq!(banner(&dom), "", "{context}");
    let r1 = node_row(&dom, "n1");
    assert!(r1.contains("data-link=\"self\""), "{r1}");
    assert!(r1.contains("this node"), "{r1}");
    assert_eq!(sessions_in(r1), 1, "n1 holds the wallet's session\n{context}");
    for peer in ["n2", "n3"] {
        let r = node_row(&dom, peer);
        assert!(r.contains("data-link=\"up\""), "{peer}'s link is up\n{context}");
        assert!(r.contains(">up<"), "{peer} shows 'up': {r}");
        assert!(r.contains(" ms<"), "{peer} shows heartbeat age and RTT: {r}");
        assert_eq!(sessions_in(r), 0, "{peer} holds no session\n{context}");
    }
    assert!(dom.contains("data-tile=\"store\""), "{context}");
    assert!(dom.contains("postgres"), "the store backend is shown\n{context}");
    assert!(dom.contains(">2 / 2<"), "both peers up\n{context}");
    assert_eq!(text_of(&dom, "totalsessions"), "1", "{context}");
    assert!(
        text_of(&dom, "refreshed").starts_with("updated "),
        "the last refresh time is shown\n{context}"
    );

    // History: charts of the rates, the queues with their labels, sessions per node.
    for chart in ["forwards", "deliveries", "acks", "refusals", "pushes"] {
        assert!(
            dom.contains(&format!("data-chart=\"{chart}\"")),
            "a {chart} chart is drawn\n{context}"
        );
    }
    assert!(dom.contains("<polyline"), "the charts have lines\n{context}");
    assert!(
        dom.contains(&format!("data-queue=\"{queued_conn}\"")),
        "the queued connection is listed among the deepest queues\n{context}"
    );
    assert!(dom.contains(">mailroom-client<"), "with its label\n{context}");
    assert!(dom.contains("data-histnode=\"n2\""), "{context}");

    let shot = screenshot(&page, "status-page.png").await;
    // And as a phone shows it.
    let phone = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("status-page-phone.png");
    let _ = std::fs::remove_file(&phone);
    run_chromium(
        &[
            format!("--screenshot={}", phone.display()),
            "--window-size=390,1600".into(),
        ],
        &page,
    )
    .await;
    assert_png(&phone, 390, 1600);
    eprintln!(
        "status page: DOM and screenshot ({}) in {:?}",
        shot.display(),
        started.elapsed()
    );

    // n3 goes away: the page shows its link down and the cluster degraded.
    let mut nodes = nodes;
    nodes.pop().unwrap().stop().unwrap();
    let n1 = &nodes[0];
    eventually("n1 sees n3 down", || async {
        (!peer_connected(n1, "n3").await).then_some(())
    })
    .await;
    let dom = dump_dom_settled(&page, |d| d.contains(">1 / 2<") && d.contains("1 peer not up")).await;
    let r3 = node_row(&dom, "n3");
    assert!(!r3.contains("data-link=\"up\""), "n3 is not shown up: {r3}");
    assert!(node_row(&dom, "n2").contains("data-link=\"up\""), "{dom}");
    assert!(dom.contains(">1 / 2<"), "one peer of two up:\n{dom}");
    assert!(dom.contains("1 peer not up"), "the headline says so:\n{dom}");
    screenshot(&page, "status-page-peer-down.png").await;

    ws.close().await;
}

/// With `[admin] token` set the page still loads, says the token is required, and shows the
/// data once given `#token=...`. A lone node (no cluster) shows itself.
#[actix_rt::test]
async fn with_an_admin_token_the_page_asks_for_it_and_then_shows_the_node() {
    chromium();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), Strategy::QueueAndLiveModeDelivery);
    let token = "page-test-token-3am";
    cfg.admin.token = Some(token.into());
    let n = start(&cfg);
    let page = format!("{}/", n.admin_url());

    let (status, _) = get_status(&page, None).await;
    assert_eq!(status, 200, "the page itself needs no token");
    let (status, _) = get_status(&format!("{}/cluster", n.admin_url()), None).await;
    assert_eq!(status, 401, "its data does");

    let dom = dump_dom(&page).await;
    assert_eq!(body_state(&dom), "unauthorized", "{dom}");
    assert!(
        banner(&dom).starts_with("Token required (401)"),
        "the banner says so:\n{dom}"
    );
    assert!(!dom.contains("<tr data-node="), "no data without the token:\n{dom}");

    screenshot(&page, "status-page-token-required.png").await;

    let dom = dump_dom(&format!("{page}#token=wrong")).await;
    assert_eq!(body_state(&dom), "unauthorized", "{dom}");
    assert!(banner(&dom).starts_with("Token rejected (401)"), "{dom}");

    let dom = dump_dom(&format!("{page}#token={token}")).await;
    assert_eq!(body_state(&dom), "ok", "{dom}");
    assert_eq!(banner(&dom), "", "{dom}");
    assert!(!dom.contains(token), "the token is not left in the page:\n{dom}");
    let r1 = node_row(&dom, "n1");
    assert!(r1.contains("data-link=\"self\""), "{r1}");
    assert_eq!(sessions_in(r1), 0);
    assert!(
        dom.contains("Single node"),
        "a lone node says it has no cluster:\n{dom}"
    );
    assert!(dom.contains("sled"), "{dom}");
}

/// A listener on 127.0.0.1:0 that answers every request with the head of a 200 whose 100-byte
/// body never comes (one byte of it, then the socket held open): an admin listener stuck, or
/// something hostile at a peer's admin address. Returns its address and how many requests it
/// took.
async fn head_then_no_body() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            read_until(&mut s, b"\r\n\r\n", "a request's head").await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
                .await
                .unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (addr, asked)
}

/// How long a read that must end in time may take here: the peer's 2 s, with room for a
/// loaded box, well short of forever.
const ANSWERS_WITHIN: Duration = Duration::from_secs(15);

/// A peer's admin address where a head comes and its body never does: n1's `GET /history`
/// still answers, in time, with that peer unreachable (it hung for good before).
#[actix_rt::test]
async fn history_answers_when_a_peer_sends_a_head_and_no_body() {
    let db = FreshDb::create().await;
    let (mut cfg, mut ls) = bind_cluster(2, &db.url, 1_000);
    // n2 does not run: its listeners are closed, and its admin address is the stuck one.
    drop(ls.pop());
    let (stuck, asked) = head_then_no_body().await;
    cfg.nodes[1].admin = stuck.to_string();
    let store = open_shared_store(&cfg).await;
    let n1 = start_node(&cfg, "n1", ls.pop().unwrap(), &store, None);

    let started = std::time::Instant::now();
    let h = tokio::time::timeout(ANSWERS_WITHIN, get_json(&format!("{}/history", n1.admin_url())))
        .await
        .unwrap_or_else(|_| panic!("GET /history did not answer within {ANSWERS_WITHIN:?}"));
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "n1 asked the stuck address: {h:#}"
    );
    let nodes = h["nodes"].as_array().expect("nodes");
    let n2 = nodes
        .iter()
        .find(|n| n["id"] == "n2")
        .unwrap_or_else(|| panic!("n2 listed: {h:#}"));
    assert_eq!(n2["reachable"], false, "{h:#}");
    assert!(n2["error"].as_str().is_some_and(|e| !e.is_empty()), "{h:#}");
    let me = nodes.iter().find(|n| n["id"] == "n1").expect("n1 listed");
    assert_eq!(me["reachable"], true, "{h:#}");
    eprintln!(
        "GET /history with a stuck peer: {:?}, {}",
        started.elapsed(),
        n2["error"]
    );
}

/// `mailroom healthcheck --timeout-ms` bounds the whole check: a head with no body after it
/// is unhealthy once the time is up, not a probe that never ends.
#[actix_rt::test]
async fn healthcheck_gives_up_on_a_head_without_its_body() {
    let (stuck, asked) = head_then_no_body().await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.args([
        "healthcheck",
        "--admin",
        &format!("http://{stuck}"),
        "--timeout-ms",
        "1000",
    ])
    .env_remove("MAILROOM_CONFIG")
    .env_remove("MAILROOM_NODE")
    .kill_on_drop(true);
    let out = tokio::time::timeout(ANSWERS_WITHIN, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("mailroom healthcheck did not end within {ANSWERS_WITHIN:?}"))
        .expect("mailroom healthcheck runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a head without its body is not healthy: {stderr}"
    );
    assert!(stderr.contains("unhealthy"), "{stderr}");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "{stderr}");
}

/// Lines logged by the admin listener's loopback guard (`mailroom::admin::loopback`), counted
/// by a subscriber set once for this test binary (its other tests log no such line).
fn loopback_lines() -> &'static std::sync::atomic::AtomicUsize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tracing_subscriber::layer::SubscriberExt;
    static LINES: AtomicUsize = AtomicUsize::new(0);
    static SET: std::sync::Once = std::sync::Once::new();
    struct Count;
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            if e.metadata().target() == "mailroom::admin::loopback" {
                LINES.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    SET.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Count))
            .expect("no other subscriber in this test binary");
    });
    &LINES
}

/// A page in a local browser looping cross-site requests at a tokenless admin listener: each
/// is refused (403), and the log takes a burst of lines and then one a second, not a line
/// per request.
#[actix_rt::test]
async fn refused_cross_site_requests_are_logged_within_a_budget() {
    use std::sync::atomic::Ordering;
    let lines = loopback_lines();
    let dir = tempfile::tempdir().unwrap();
    let n = start(&test_config(dir.path(), Strategy::QueueAndLiveModeDelivery));
    let url = format!("{}/status", n.admin_url());
    let before = lines.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    const REQUESTS: usize = 100;
    for _ in 0..REQUESTS {
        let res = client()
            .get(&url)
            .insert_header(("Origin", "http://evil.example"))
            .insert_header(("Sec-Fetch-Site", "cross-site"))
            .send()
            .await
            .expect("GET");
        assert_eq!(res.status().as_u16(), 403);
    }
    let logged = lines.load(Ordering::SeqCst) - before;
    // A burst of 20, then one a second.
    let budget = 20 + started.elapsed().as_secs() as usize + 1;
    assert!(logged >= 1, "the first refusals are logged");
    assert!(
        logged <= budget,
        "{logged} lines for {REQUESTS} refused requests in {:?}",
        started.elapsed()
    );
}

/// `mailroom status` gives up too (its reads are bounded as a whole, 5 s each).
#[actix_rt::test]
async fn status_gives_up_on_a_head_without_its_body() {
    let (stuck, asked) = head_then_no_body().await;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailroom"));
    cmd.args(["status", "--admin", &format!("http://{stuck}")])
        .env_remove("MAILROOM_ADMIN_TOKEN")
        .kill_on_drop(true);
    let out = tokio::time::timeout(ANSWERS_WITHIN, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("mailroom status did not end within {ANSWERS_WITHIN:?}"))
        .expect("mailroom status runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no whole answer"), "{stderr}");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1, "{stderr}");
}
