//! Local HTTPS stand-ins for the push providers: Google's OAuth2 token endpoint, FCM HTTP v1,
//! APNs (HTTP/2 only) and an operator webhook, on one TLS listener at 127.0.0.1:0 whose
//! certificate comes from a test CA made here (rcgen). Each endpoint checks what a real one
//! checks — path, headers, body, and the JWT signature against the credential's public key —
//! records every request with what it found wrong, and answers as the test scripted.

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub const FCM_PRIVATE_KEY: &str = include_str!("../fixtures/push/fcm-test-key.pem");
pub const FCM_PUBLIC_KEY: &str = include_str!("../fixtures/push/fcm-test-key.pub.pem");
pub const CLIENT_EMAIL: &str = "mailroom-test@proj.iam.gserviceaccount.com";
pub const APNS_KEY_ID: &str = "KEYID12345";
pub const APNS_TEAM_ID: &str = "TEAMID6789";
pub const APNS_TOPIC: &str = "org.example.wallet";
pub const WEBHOOK_SECRET: &str = "webhook-secret-for-tests-only";

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: Value,
    /// How long the endpoint holds the request before it answers (a slow provider).
    pub delay: Option<std::time::Duration>,
    /// FCM only: the request is held until the test adds a permit to this gate.
    pub gate: Option<Arc<tokio::sync::Semaphore>>,
    /// FCM and the webhook: the answer's head (the status, a `Content-Length` of 10) is sent,
    /// its body never.
    pub stall_body: bool,
}

impl Reply {
    pub fn new(status: u16, body: Value) -> Reply {
        Reply {
            status,
            retry_after: None,
            body,
            delay: None,
            gate: None,
            stall_body: false,
        }
    }
    /// The head sent, the body never (FCM and the webhook): an endpoint that hangs mid-answer.
    pub fn stalled_body(mut self) -> Reply {
        self.stall_body = true;
        self
    }
    /// Held until a permit is added to `gate` (FCM only).
    pub fn held(mut self, gate: &Arc<tokio::sync::Semaphore>) -> Reply {
        self.gate = Some(gate.clone());
        self
    }
    pub fn delayed(mut self, d: std::time::Duration) -> Reply {
        self.delay = Some(d);
        self
    }
    pub fn retry_after(mut self, v: &str) -> Reply {
        self.retry_after = Some(v.into());
        self
    }
    pub fn unregistered() -> Reply {
        Reply::new(
            404,
            json!({"error": {"code": 404, "message": "Requested entity was not found.", "status": "NOT_FOUND",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}}),
        )
    }
    pub fn sender_id_mismatch() -> Reply {
        Reply::new(
            403,
            json!({"error": {"code": 403, "message": "SenderId mismatch", "status": "PERMISSION_DENIED",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "SENDER_ID_MISMATCH"}]}}),
        )
    }
}

/// A request the stand-in received.
#[derive(Clone, Debug)]
pub struct Hit {
    /// "token", "fcm:<project>", "apns", "hook".
    pub kind: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    pub at: Instant,
    pub http2: bool,
    pub status: u16,
    /// What the stand-in found wrong (a real provider would refuse it).
    pub problems: Vec<String>,
}

#[derive(Default)]
pub struct State {
    pub scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    pub hits: Mutex<Vec<Hit>>,
    /// Kinds of the requests received, at their arrival (a hit is recorded when answered).
    pub arrived: Mutex<Vec<String>>,
    pub issued: Mutex<Vec<String>>,
    pub ec_public_pem: String,
    pub token_uri: Mutex<String>,
    /// Token lifetime the OAuth2 endpoint grants.
    pub expires_in: Mutex<u64>,
}

impl State {
    pub fn script(&self, kind: &str, replies: Vec<Reply>) {
        self.scripts.lock().entry(kind.into()).or_default().extend(replies);
    }
    fn next(&self, kind: &str) -> Reply {
        self.scripts
            .lock()
            .get_mut(kind)
            .and_then(|q| q.pop_front())
            .unwrap_or_else(|| Reply::new(200, json!({"name": "projects/p/messages/0"})))
    }
    pub fn hits(&self, kind_prefix: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .iter()
            .filter(|h| h.kind.starts_with(kind_prefix))
            .cloned()
            .collect()
    }
}

pub struct StandIn {
    pub base_url: String,
    pub state: Arc<State>,
    pub dir: tempfile::TempDir,
    /// PEM of the test CA (give it to `push.ca_file`).
    pub ca_file: PathBuf,
    /// The APNs `.p8` key of this run.
    pub apns_key_file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl StandIn {
    pub fn start() -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        // The test CA and the server certificate it signs (127.0.0.1 and localhost).
        let (ca_pem, tls) = crate::common::test_ca_and_server("mailroom push test CA", &["localhost", "127.0.0.1"]);
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        // The APNs signing key (P-256, PKCS#8 as Apple's .p8).
        let apns_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let apns_key_file = dir.path().join("AuthKey.p8");
        std::fs::write(&apns_key_file, apns_key.serialize_pem()).unwrap();

        let state = Arc::new(State {
            ec_public_pem: apns_key.public_key_pem(),
            expires_in: Mutex::new(3600),
            ..State::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let base_url = format!("https://127.0.0.1:{port}");
        *state.token_uri.lock() = format!("{base_url}/token");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let sys = actix_rt::System::new();
            sys.block_on(async move {
                let data = web::Data::from(st);
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(data.clone())
                        .route("/token", web::post().to(token))
                        .route("/v1/projects/{project}/messages:send", web::post().to(fcm))
                        .route("/3/device/{token}", web::post().to(apns))
                        .route("/hook", web::post().to(hook))
                })
                .workers(1)
                .disable_signals()
                .listen_rustls_0_23(listener, tls)
                .unwrap()
                .run();
                let h = server.handle();
                actix_rt::spawn(server);
                let _ = stop_rx.await;
                h.stop(false).await;
            });
        });
        StandIn {
            base_url,
            state,
            dir,
            ca_file,
            apns_key_file,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Writes a service-account JSON for `project` (the test RSA key) and returns its path.
    pub fn service_account(&self, project: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{project}.json"));
        let v = json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": format!("kid-{project}"),
            "private_key": FCM_PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "token_uri": self.state.token_uri.lock().clone(),
        });
        std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
        p
    }

    /// A `[push]` section for this stand-in: FCM projects, APNs and (optionally) the webhook.
    pub fn push_toml(&self, min_interval_secs: u64, projects: &[&str], webhook: bool) -> String {
        let mut t = format!(
            "min_interval_secs = {min_interval_secs}\nca_file = {:?}\nretry_base_ms = 50\nretry_max_ms = 5000\n",
            self.ca_file
        );
        for p in projects {
            t.push_str(&format!(
                "[[fcm]]\nservice_account = {:?}\nbase_url = {:?}\nnotification_title = \"New message\"\nnotification_body = \"Open your wallet\"\n",
                self.service_account(p),
                self.base_url
            ));
        }
        t.push_str(&format!(
            "[apns]\nkey_file = {:?}\nkey_id = {APNS_KEY_ID:?}\nteam_id = {APNS_TEAM_ID:?}\ntopic = {APNS_TOPIC:?}\nbase_url = {:?}\n",
            self.apns_key_file, self.base_url
        ));
        if webhook {
            t.push_str(&format!(
                "[webhook]\nurl = \"{}/hook\"\nsecret = {WEBHOOK_SECRET:?}\n",
                self.base_url
            ));
        }
        t
    }

    pub fn push_config(&self, min_interval_secs: u64, projects: &[&str], webhook: bool) -> mailroom::push::PushConfig {
        toml::from_str(&self.push_toml(min_interval_secs, projects, webhook)).expect("push config parses")
    }
}

fn headers_of(req: &HttpRequest) -> HashMap<String, String> {
    req.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect()
}

fn answer(r: &Reply) -> HttpResponse {
    let mut b = HttpResponse::build(actix_web::http::StatusCode::from_u16(r.status).unwrap());
    if let Some(ra) = &r.retry_after {
        b.insert_header(("Retry-After", ra.as_str()));
    }
    if r.stall_body {
        // Ten bytes announced, none ever sent: the stream stays open until the client leaves.
        let never = futures_util::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
        return b
            .content_type("application/json")
            .body(actix_web::body::SizedStream::new(10, never));
    }
    b.json(&r.body)
}

fn record(st: &State, kind: &str, req: &HttpRequest, body: Value, status: u16, problems: Vec<String>) {
    st.hits.lock().push(Hit {
        kind: kind.into(),
        path: req.path().to_string(),
        headers: headers_of(req),
        body,
        at: Instant::now(),
        http2: req.version() == actix_web::http::Version::HTTP_2,
        status,
        problems,
    });
}

async fn token(req: HttpRequest, body: web::Bytes, st: web::Data<State>) -> HttpResponse {
    st.arrived.lock().push("token".into());
    let mut problems = Vec::new();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        problems.push(format!("grant_type {:?}", form.get("grant_type")));
    }
    if req.headers().get("content-type").and_then(|v| v.to_str().ok()) != Some("application/x-www-form-urlencoded") {
        problems.push("content-type is not a form".into());
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[st.token_uri.lock().clone()]);
    v.set_issuer(&[CLIENT_EMAIL]);
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(FCM_PUBLIC_KEY.as_bytes()).unwrap();
    match jsonwebtoken::decode::<Value>(&assertion, &key, &v) {
        Ok(t) => {
            if t.claims["scope"] != "https://www.googleapis.com/auth/firebase.messaging" {
                problems.push(format!("scope {}", t.claims["scope"]));
            }
            if !t.header.kid.as_deref().unwrap_or_default().starts_with("kid-") {
                problems.push("no kid".into());
            }
        }
        Err(e) => problems.push(format!("assertion does not verify: {e}")),
    }
    let r = st.next("token");
    if let Some(d) = r.delay {
        actix_rt::time::sleep(d).await;
    }
    let r = if r.status == 200 && problems.is_empty() {
        let tok = format!("at-{}", uuid::Uuid::new_v4());
        st.issued.lock().push(tok.clone());
        Reply::new(
            200,
            json!({"access_token": tok, "expires_in": *st.expires_in.lock(), "token_type": "Bearer"}),
        )
    } else if problems.is_empty() {
        r
    } else {
        Reply::new(400, json!({"error": "invalid_grant"}))
    };
    record(&st, "token", &req, json!({"assertion": assertion}), r.status, problems);
    answer(&r)
}

async fn fcm(req: HttpRequest, body: web::Bytes, st: web::Data<State>, project: web::Path<String>) -> HttpResponse {
    let mut problems = Vec::new();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let issued = st.issued.lock().iter().any(|t| auth == format!("Bearer {t}"));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let m = &body["message"];
    if !m["token"].is_string() {
        problems.push("no message.token".into());
    }
    if m["data"]["@type"] != "https://didcomm.org/push-notifications-fcm" {
        problems.push(format!("data @type {}", m["data"]["@type"]));
    }
    if let Some(o) = m["data"].as_object() {
        if o.values().any(|v| !v.is_string()) {
            problems.push("an FCM data value is not a string".into());
        }
    }
    if m["android"]["priority"] != "high" || !m["android"]["collapse_key"].is_string() {
        problems.push(format!("android block {}", m["android"]));
    }
    let kind = format!("fcm:{project}");
    st.arrived.lock().push(kind.clone());
    let r = if !issued {
        Reply::new(401, json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}}))
    } else if !problems.is_empty() {
        Reply::new(
            400,
            json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad message"}}),
        )
    } else {
        st.next(&kind)
    };
    if let Some(g) = &r.gate {
        let _ = g.acquire().await;
    }
    if let Some(d) = r.delay {
        actix_rt::time::sleep(d).await;
    }
    if !issued {
        problems.push(format!("authorization {auth:?} is not an issued access token"));
    }
    record(&st, &kind, &req, body, r.status, problems);
    answer(&r)
}

async fn apns(req: HttpRequest, body: web::Bytes, st: web::Data<State>) -> HttpResponse {
    let mut problems = Vec::new();
    if req.version() != actix_web::http::Version::HTTP_2 {
        problems.push(format!("APNs needs HTTP/2, got {:?}", req.version()));
    }
    let h = headers_of(&req);
    let jwt = h
        .get("authorization")
        .and_then(|a| a.strip_prefix("bearer "))
        .unwrap_or_default();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.set_issuer(&[APNS_TEAM_ID]);
    let key = jsonwebtoken::DecodingKey::from_ec_pem(st.ec_public_pem.as_bytes()).unwrap();
    match jsonwebtoken::decode::<Value>(jwt, &key, &v) {
        Ok(t) => {
            if t.header.kid.as_deref() != Some(APNS_KEY_ID) {
                problems.push(format!("kid {:?}", t.header.kid));
            }
            if !t.claims["iat"].is_u64() {
                problems.push("no iat".into());
            }
        }
        Err(e) => problems.push(format!("provider token does not verify: {e}")),
    }
    if h.get("apns-topic").map(String::as_str) != Some(APNS_TOPIC) {
        problems.push(format!("apns-topic {:?}", h.get("apns-topic")));
    }
    for k in ["apns-push-type", "apns-collapse-id", "apns-priority"] {
        if !h.contains_key(k) {
            problems.push(format!("no {k}"));
        }
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !body["aps"].is_object() {
        problems.push("no aps".into());
    }
    let r = if problems.is_empty() {
        st.next("apns")
    } else {
        Reply::new(403, json!({"reason": "InvalidProviderToken"}))
    };
    record(&st, "apns", &req, body, r.status, problems);
    if r.status == 200 {
        return HttpResponse::Ok().finish();
    }
    answer(&r)
}

async fn hook(req: HttpRequest, body: web::Bytes, st: web::Data<State>) -> HttpResponse {
    let mut problems = Vec::new();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let got = req
        .headers()
        .get("x-mailroom-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if got != want {
        problems.push(format!("signature {got:?} != {want:?}"));
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let r = if problems.is_empty() {
        st.next("hook")
    } else {
        Reply::new(401, json!({}))
    };
    record(&st, "hook", &req, body, r.status, problems);
    answer(&r)
}
