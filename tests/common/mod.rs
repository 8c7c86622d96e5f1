//! Shared helpers for integration tests: real nodes on 127.0.0.1:0, wallets, waiting on
//! conditions (never fixed sleeps as synchronisation).
#![allow(dead_code)]

pub mod cluster;
pub mod nginx;
pub mod ports;

pub use mailroom::client::{pickup_message as pickup, type_name};
use mailroom::client::{Agent, Invitation, WsClient, WsEvent};
use mailroom::config::{Config, Strategy};
use mailroom::node::{self, RunningNode};
use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(20);

/// A config for one test node: sled in `dir`, fast sweeps.
pub fn test_config(dir: &std::path::Path, strategy: Strategy) -> Config {
    let mut cfg = Config::single_node_default();
    cfg.nodes.clear();
    cfg.store.path = dir.join("data");
    cfg.delivery.strategy = strategy;
    cfg.delivery.sweep_interval_ms = 100;
    cfg.delivery.lease_ms = 2_000;
    cfg
}

pub fn start(cfg: &Config) -> RunningNode {
    let mut cfg = cfg.clone();
    let l = node::bind_ephemeral(&mut cfg, "n1", false).expect("bind 127.0.0.1:0");
    node::spawn(cfg, "n1", l, Default::default()).expect("node starts")
}

/// [`start`] on a store of the test's own (a wrapper that fails or gates some calls).
pub fn start_on(cfg: &Config, store: std::sync::Arc<dyn mailroom::store::Store>) -> RunningNode {
    let mut cfg = cfg.clone();
    let l = node::bind_ephemeral(&mut cfg, "n1", false).expect("bind 127.0.0.1:0");
    let opts = node::NodeOptions {
        store: Some(store),
        config_path: None,
    };
    node::spawn(cfg, "n1", l, opts).expect("node starts")
}

pub async fn invitation(n: &RunningNode) -> Invitation {
    invitation_at(&n.public_url()).await
}

/// The invitation of the node whose public listener is `public_url` (a node process).
pub async fn invitation_at(public_url: &str) -> Invitation {
    let v = get_json(&format!("{public_url}/invitation")).await;
    Invitation::parse(&v["invitation"]).expect("invitation parses")
}

/// An HTTP client that waits as long as the tests wait for anything (awc's default is 5 s: a
/// node's store-backed answer on a loaded box can take longer, and the helpers panic on errors).
pub fn client() -> awc::Client {
    awc::Client::builder().timeout(WAIT).finish()
}

pub async fn get_json(url: &str) -> Value {
    let mut res = client().get(url).send().await.expect("GET");
    assert!(res.status().is_success(), "GET {url}: {}", res.status());
    res.json::<Value>().limit(16 << 20).await.expect("JSON")
}

pub async fn get_status(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.insert_header(("Authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.expect("GET");
    let body = res.body().limit(16 << 20).await.expect("body");
    (res.status().as_u16(), String::from_utf8_lossy(&body).into_owned())
}

pub async fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, String) {
    let mut res = client()
        .post(url)
        .insert_header(("Content-Type", content_type))
        .send_body(body)
        .await
        .expect("POST");
    let body = res.body().limit(16 << 20).await.expect("body");
    (res.status().as_u16(), String::from_utf8_lossy(&body).into_owned())
}

/// Bytes of a raw connection read one at a time until they end with `end` (what follows stays
/// in the socket); panics naming `what` on EOF, an error, or nothing for `WAIT`.
pub async fn read_until(s: &mut (impl tokio::io::AsyncReadExt + Unpin), end: &[u8], what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(end) {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(1)) => got.push(b[0]),
            other => panic!("no {what}: {other:?} after {:?}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// Reads one answer (head and `Content-Length` body) from a raw kept-alive connection; its
/// status line.
pub async fn read_answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let head = String::from_utf8_lossy(&read_until(s, b"\r\n\r\n", "an answer's head").await).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("the answer's body in time")
        .unwrap();
    head.lines().next().unwrap_or_default().to_string()
}

/// A WebSocket opened by hand on a socket with a 4 KiB receive buffer, never read after
/// the handshake.
pub async fn deaf_socket(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut s, b"\r\n\r\n", "handshake answer").await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A single node's listeners on 127.0.0.1:0, its public one with a send buffer pinned to
/// `bytes` (accepted sockets inherit it): a client that reads nothing fills it soon.
pub fn listeners_with_small_send_buffer(cfg: &mut Config, bytes: u32) -> node::Listeners {
    let mut l = node::bind_ephemeral(cfg, "n1", false).unwrap();
    let public = tokio::net::TcpSocket::new_v4().unwrap();
    public.set_send_buffer_size(bytes).unwrap();
    public.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    l.public = public.listen(1024).unwrap().into_std().unwrap();
    l.public.set_nonblocking(false).unwrap();
    cfg.nodes[0].listen = l.public.local_addr().unwrap().to_string();
    l
}

/// Polls `f` until it returns Some, or panics after `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a GET of `url` answers 2xx (a child process starting, say).
pub async fn wait_ok(what: &str, url: &str) {
    eventually(what, || async {
        let r = client().get(url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
}

pub fn ws_url(n: &RunningNode) -> String {
    format!("ws://{}/", n.public_addr)
}

/// Sends a message on the socket (binary, as Credo does) and returns the next unpacked reply.
pub async fn ws_request(a: &Agent, ws: &mut WsClient, msg: &Value) -> Value {
    ws.send_envelope(a.pack(msg).unwrap(), true).await.unwrap();
    ws_next_message(a, ws).await
}

/// Sends messages-received for `ids` on the socket; returns what the socket carried until the
/// node's status answer: deliveries' contents, in order.
pub async fn ack_on_socket(a: &Agent, ws: &mut WsClient, ids: &[String]) -> Vec<Vec<String>> {
    let ack = pickup("messages-received", json!({ "message_id_list": ids }));
    ws.send_envelope(a.pack(&ack).unwrap(), true).await.unwrap();
    let mut deliveries = Vec::new();
    loop {
        let m = ws_next_message(a, ws).await;
        match type_name(&m) {
            "status" => return deliveries,
            "delivery" => deliveries.push(contents(a, &m)),
            other => panic!("unexpected {other}: {m}"),
        }
    }
}

pub async fn ws_next_message(a: &Agent, ws: &mut WsClient) -> Value {
    match ws.next(WAIT).await.expect("a frame") {
        WsEvent::Envelope(e) => a.unpack(&e).expect("reply unpacks").0,
        WsEvent::Closed(r) => panic!("socket closed: {r:?}"),
    }
}

/// The value of one metric series (`name` with its labels, as `/metrics` prints it), if the
/// node has it.
pub async fn metric(n: &RunningNode, name: &str) -> Option<f64> {
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// An agent whose DID document's endpoint is `endpoint`, connected by a didexchange request
/// without return route: the mediator POSTs its response to that endpoint.
pub async fn connect_replying_to(n: &RunningNode, endpoint: &str) -> Agent {
    use mailroom::didcomm::{did, keys::KeyPair};
    let inv = invitation(n).await;
    let key = KeyPair::generate();
    let my_did = did::create_peer4(&key.verkey(), &[endpoint.to_string()], &[]);
    let a = Agent::from_parts(key, my_did.clone(), inv.recipient_key.clone(), n.public_url());
    let request = json!({
        "@type": "https://didcomm.org/didexchange/1.1/request",
        "@id": "no-return-route",
        "label": "endpoint-agent",
        "did": my_did,
        "~thread": { "pthid": inv.id },
    });
    assert_eq!(
        a.send(&request).await.unwrap(),
        202,
        "the response goes to the endpoint"
    );
    a
}

/// `mailroom_rejected_total` summed over the series of `reason` (0 before the first).
pub async fn rejected(n: &RunningNode, reason: &str) -> f64 {
    let (_, text) = get_status(&format!("{}/metrics", n.admin_url()), None).await;
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.starts_with("mailroom_rejected_total{") && l.contains(&label))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// `mailroom_endpoint_posts_total{result=...}`, 0 before the first.
pub async fn endpoint_posts(n: &RunningNode, result: &str) -> u64 {
    metric(n, &format!("mailroom_endpoint_posts_total{{result=\"{result}\"}}"))
        .await
        .unwrap_or(0.0) as u64
}

pub async fn queue_depth(n: &RunningNode) -> u64 {
    get_json(&format!("{}/status", n.admin_url())).await["queued"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A ping with return route `all`: what binds a socket to its sender's connection (implicit
/// pickup under the default strategy).
pub fn binding_ping() -> Value {
    serde_json::json!({
        "@type": "https://didcomm.org/trust_ping/1.0/ping",
        "@id": mailroom::didcomm::message::new_id(),
        "response_requested": true,
        "~transport": {"return_route": "all"},
    })
}

/// Reads on `ws`, answering the node's pings, until `n` holds `depth` messages (or panics
/// after `WAIT`, or when anything but a ping comes): what a socket was written without an
/// acknowledgement (implicit pickup, a pickup 1.0 batch) is removed once the wallet's end
/// answered a ping sent after it, and a client answers as it reads.
pub async fn read_on_until_depth(n: &RunningNode, ws: &mut WsClient, depth: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while queue_depth(n).await != depth {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        match ws.next(Duration::from_millis(50)).await {
            Err(_) => {}
            Ok(e) => panic!("waiting for {what}, nothing else expected: {e:?}"),
        }
    }
}

/// The queue ids of a delivery's messages, in order (what messages-received lists).
pub fn delivery_ids(a: &Agent, delivery: &Value) -> Vec<String> {
    a.open_delivery(delivery)
        .expect("delivery opens")
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// The `content` of every basic message in a delivery or batch, in order.
pub fn contents(a: &Agent, delivery: &Value) -> Vec<String> {
    a.open_delivery(delivery)
        .expect("delivery opens")
        .iter()
        .map(|(_, m)| m["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A node (config from [`test_config`], adjusted by `edit`) and one onboarded wallet with one
/// registered key. Keep the `TempDir` alive for the test.
pub async fn node_with_wallet(
    strategy: Strategy,
    edit: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, RunningNode, Agent, mailroom::didcomm::keys::KeyPair) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path(), strategy);
    edit(&mut cfg);
    let n = start(&cfg);
    let inv = invitation(&n).await;
    let (a, k) = Agent::onboard(&inv).await.expect("onboarding");
    (dir, n, a, k)
}

/// One binary WebSocket frame as a client sends it (masked, as RFC 6455 requires), for tests
/// that speak the protocol on a raw socket.
pub fn masked_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x82u8];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 1 << 16 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// A test CA and a server configuration whose certificate it signs for `names` (host names or
/// IP addresses): (the CA certificate's PEM, what a TLS listener serves). For local HTTPS
/// stand-ins a node reaches with the CA added to its trust.
pub fn test_ca_and_server(ca_name: &str, names: &[&str]) -> (String, rustls::ServerConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, ca_name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let srv_key = rcgen::KeyPair::generate().unwrap();
    let srv = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&srv_key, &ca, &ca_key)
        .unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![srv.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(srv_key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), tls)
}

/// An agent's own HTTP endpoint on 127.0.0.1:0: each POST's body goes to `answer`, whose
/// status code is the reply. Returns its URL and the server's handle (stop it at the end).
pub fn endpoint_stub(
    answer: impl Fn(Vec<u8>) -> u16 + Clone + Send + 'static,
) -> (String, actix_web::dev::ServerHandle) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/", listener.local_addr().unwrap());
    let server = HttpServer::new(move || {
        let answer = answer.clone();
        App::new().route(
            "/",
            web::post().to(move |body: web::Bytes| {
                let status = answer(body.to_vec());
                async move { HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap()).finish() }
            }),
        )
    })
    .listen(listener)
    .unwrap()
    .workers(1)
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    (endpoint, handle)
}

/// A basic message `text` forwarded to `key` of mediated wallet `a` through `n`'s routing
/// keys; the forward POST's status.
pub async fn forward_to(n: &RunningNode, a: &Agent, key: &mailroom::didcomm::keys::KeyPair, text: &str) -> u16 {
    let g = a.grant.clone().expect("mediated");
    mailroom::client::Sender::new()
        .forward(
            &n.public_url(),
            &mailroom::client::basic_message(text),
            &key.verkey(),
            &g.routing_keys,
        )
        .await
        .expect("forward POST")
}

/// A wallet of `n` whose DID document names `endpoint`, mediated, with one recipient key.
pub async fn wallet_at_endpoint(n: &RunningNode, endpoint: &str) -> (Agent, mailroom::didcomm::keys::KeyPair) {
    let inv = invitation(n).await;
    let mut a = Agent::connect_with_endpoint(&inv, Some(endpoint)).await.unwrap();
    a.mediate().await.unwrap();
    let k = a.new_recipient_key();
    a.keylist_update(&[k.did_key()], &[]).await.unwrap();
    (a, k)
}
