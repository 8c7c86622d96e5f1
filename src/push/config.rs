//! The `[push]` section of `cluster.toml` and the credentials it names.
//!
//! Parsing and checking only: `check-config` calls [`PushConfig::load`], which reads every
//! credential file (or variable) and parses its key, so a bad or unreadable credential is
//! refused before a node starts (exit 64 with the reason). Secrets are never put in an error,
//! a log line or a `Debug` output: [`Secret`] prints as `<redacted>`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_FCM_BASE: &str = "https://fcm.googleapis.com";
pub const DEFAULT_APNS_BASE: &str = "https://api.push.apple.com";
/// The OAuth2 scope of FCM HTTP v1.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Most `max_in_flight`: far more pushes at once than a provider takes from one node, far
/// below the worker's semaphore's ceiling (`usize::MAX >> 3` permits, past which it panics).
pub const MAX_IN_FLIGHT: usize = 10_000;
/// Longest `timeout_ms`: ten minutes.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// Longest `retry_max_ms`: one hour.
pub const MAX_RETRY_MS: u64 = 3_600_000;
/// Longest claim a push may be sent under ([`crate::push::claim_length`]): one hour. A node
/// that dies mid-push leaves its wake-up to the others only once the claim ran out; the
/// settings each within their bounds multiply out to days.
pub const MAX_CLAIM: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// Per wallet: one push now, at most one trailing push per window, seconds.
    #[serde(default = "default_min_interval")]
    pub min_interval_secs: u64,
    /// One entry per Firebase project (dev/stage/prod apps); a token is tried on each until
    /// one accepts it, and that project is remembered for the token.
    #[serde(default)]
    pub fcm: Vec<FcmConfig>,
    #[serde(default)]
    pub apns: Option<ApnsConfig>,
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// PEM file of extra trust anchors for provider TLS (a private PKI, or tests' stand-ins);
    /// the public web roots are always trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Timeout of one provider request, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Tries of one push (the first included) on 429 and 5xx answers.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay, milliseconds; doubled each try, with jitter.
    #[serde(default = "default_retry_base")]
    pub retry_base_ms: u64,
    /// Longest wait before a retry, milliseconds; a `Retry-After` longer than this gives up.
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: u64,
    /// Pushes being sent at once by one node; events beyond wait in a bounded queue.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// Google's service-account JSON (`project_id`, `client_email`, `private_key`, `token_uri`).
    #[serde(default)]
    pub service_account: Option<PathBuf>,
    /// Or: the name of an environment variable holding that JSON.
    #[serde(default)]
    pub service_account_env: Option<String>,
    /// `https://fcm.googleapis.com` by default; `http://` allowed for local stand-ins.
    #[serde(default = "default_fcm_base")]
    pub base_url: String,
    /// A visible notification's title and body; without them the push is data-only.
    #[serde(default)]
    pub notification_title: Option<String>,
    #[serde(default)]
    pub notification_body: Option<String>,
    /// Collapse key: pushes of one wallet not yet delivered replace each other.
    #[serde(default = "default_collapse")]
    pub collapse_key: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// The `.p8` signing key (PKCS#8 PEM, P-256) from Apple.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Or: the name of an environment variable holding that PEM.
    #[serde(default)]
    pub key_env: Option<String>,
    pub key_id: String,
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    #[serde(default = "default_apns_base")]
    pub base_url: String,
    /// `apns-push-type`: "alert" (visible, priority 10) or "background" (silent, priority 5).
    #[serde(default = "default_push_type")]
    pub push_type: String,
    #[serde(default)]
    pub alert_title: Option<String>,
    #[serde(default)]
    pub alert_body: Option<String>,
    /// `apns-collapse-id`.
    #[serde(default = "default_collapse")]
    pub collapse_id: String,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// HMAC-SHA256 key of the `X-Mailroom-Signature` header.
    #[serde(default)]
    pub secret: Option<String>,
    /// Or: the name of an environment variable holding it.
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// The secret never prints, even in a `{:?}` of the whole configuration.
impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .finish()
    }
}

fn default_min_interval() -> u64 {
    60
}
fn default_timeout() -> u64 {
    10_000
}
fn default_attempts() -> u32 {
    5
}
fn default_retry_base() -> u64 {
    500
}
fn default_retry_max() -> u64 {
    60_000
}
fn default_in_flight() -> usize {
    64
}
fn default_fcm_base() -> String {
    DEFAULT_FCM_BASE.into()
}
fn default_apns_base() -> String {
    DEFAULT_APNS_BASE.into()
}
fn default_collapse() -> String {
    "mailroom".into()
}
fn default_push_type() -> String {
    "alert".into()
}

/// A secret value: never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A Firebase project's service account, parsed and its key checked.
#[derive(Clone, Debug)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    pub private_key_id: Option<String>,
    /// PKCS#8 PEM of the RSA key.
    pub private_key: Secret,
    pub token_uri: String,
}

#[derive(Clone, Debug)]
pub struct FcmProject {
    pub account: ServiceAccount,
    pub base_url: String,
    pub notification: Option<(String, String)>,
    pub collapse_key: String,
}

#[derive(Clone, Debug)]
pub struct ApnsCredentials {
    pub key_pem: Secret,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    pub base_url: String,
    pub push_type: String,
    pub alert: (Option<String>, Option<String>),
    pub collapse_id: String,
}

#[derive(Clone, Debug)]
pub struct WebhookCredentials {
    pub url: String,
    pub secret: Secret,
}

/// Everything a node needs to send pushes, loaded and checked.
#[derive(Clone, Debug)]
pub struct PushSettings {
    pub min_interval_ms: i64,
    pub fcm: Vec<FcmProject>,
    pub apns: Option<ApnsCredentials>,
    pub webhook: Option<WebhookCredentials>,
    /// DER certificates of the extra trust anchors.
    pub extra_roots: Vec<Vec<u8>>,
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_in_flight: usize,
}

/// Where a URL may be plain `http://`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Clear {
    /// Anywhere (the webhook: its body is signed, and it may be a service of the operator's
    /// own network).
    Anywhere,
    /// Only on this machine (a local stand-in): the URL is given a credential (the signed
    /// grant of a service account, an access token, a provider token), which must not cross a
    /// network in clear.
    Loopback,
}

/// APNs refuses a longer `apns-collapse-id`.
const APNS_COLLAPSE_ID_MAX: usize = 64;
/// Bytes of a notification's title and body together, at most: both providers take 4 KiB of
/// payload, and the rest of ours (type, count, JSON) stays well under the difference.
const ALERT_MAX_BYTES: usize = 3_072;

/// `v` can go out as an HTTP header value: visible ASCII and spaces (no control character, no
/// newline), at most `max` bytes (0: no bound of its own).
fn header_value(what: &str, v: &str, max: usize) -> Result<(), String> {
    if !v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(format!("{what} must be visible ASCII (it is sent as an HTTP header)"));
    }
    if max > 0 && v.len() > max {
        return Err(format!("{what} is {} bytes long, at most {max}", v.len()));
    }
    Ok(())
}

/// A notification's `title` and `body` fit the providers' 4 KiB payload, as JSON (quotes and
/// control characters escaped).
fn alert_fits(what: &str, title: &str, body: &str) -> Result<(), String> {
    let json_len = |s: &str| serde_json::to_string(s).map_or(usize::MAX, |j| j.len() - 2);
    let n = json_len(title).saturating_add(json_len(body));
    if n > ALERT_MAX_BYTES {
        return Err(format!(
            "{what} are {n} bytes together, at most {ALERT_MAX_BYTES} (the providers refuse a payload over 4 KiB)"
        ));
    }
    Ok(())
}

fn check_url(what: &str, u: &str, clear: Clear) -> Result<(), String> {
    let loopback = |p: &url::Url| match p.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    let parsed = url::Url::parse(u);
    // Its scheme, host and port only: a webhook's path or query, or its user part, may hold a
    // token, and the error goes to stderr and to the `POST /reload` answer.
    let shown = match &parsed {
        Ok(p) => match (p.host_str(), p.port()) {
            (Some(h), Some(port)) => format!("{}://{h}:{port}/…", p.scheme()),
            (Some(h), None) => format!("{}://{h}/…", p.scheme()),
            (None, _) => format!("{}:…", p.scheme()),
        },
        Err(_) => "(not a URL)".into(),
    };
    match parsed {
        Ok(p) if p.scheme() == "https" && p.host().is_some() => Ok(()),
        Ok(p) if p.scheme() == "http" && (clear == Clear::Anywhere || loopback(&p)) => Ok(()),
        _ if clear == Clear::Anywhere => Err(format!("{what} {shown} must be an https:// (or http://) URL")),
        _ => Err(format!(
            "{what} {shown} must be an https:// URL (http:// only on this machine: it is given a credential)"
        )),
    }
}

/// Reads a file or a variable, one of which must be named. The error names the source, never
/// the content.
fn read_source(what: &str, file: &Option<PathBuf>, env: &Option<String>) -> Result<String, String> {
    match (file, env) {
        (Some(_), Some(_)) => Err(format!("{what}: set the file or the variable, not both")),
        (None, None) => Err(format!("{what}: a file or a variable is required")),
        (Some(p), None) => read_file(what, p),
        (None, Some(v)) => match std::env::var(v) {
            Ok(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(format!("{what}: environment variable {v} is not set")),
        },
    }
}

fn read_file(what: &str, p: &Path) -> Result<String, String> {
    crate::config::read_small_file(p, crate::config::SECRET_FILE_MAX_BYTES)
        .map_err(|e| format!("{what}: cannot read {}: {e}", p.display()))
}

/// The time the credentials are test-signed at when loaded (a fixed one: only whether the key
/// signs matters, not what it signed).
const TEST_SIGNING_TIME_S: u64 = 1_700_000_000;

/// Parses Google's service-account JSON and checks its key signs: a grant is signed once, as
/// [`crate::push::fcm::grant_assertion`] signs it for the token endpoint (RS256), so a key
/// that parses but does not sign (an RSA key shorter than 2048 bits, a malformed one) is
/// refused here rather than by every push.
pub fn parse_service_account(json: &str) -> Result<ServiceAccount, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not JSON (line {}, column {})", e.line(), e.column()))?;
    let field = |k: &str| -> Result<String, String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("lacks the string field `{k}`"))
    };
    if let Some(t) = v.get("type").and_then(|t| t.as_str()) {
        if t != "service_account" {
            return Err(format!("`type` is {t:?}, not \"service_account\""));
        }
    }
    let project_id = field("project_id")?;
    let client_email = field("client_email")?;
    let private_key = field("private_key")?;
    let token_uri = field("token_uri")?;
    check_url("token_uri", &token_uri, Clear::Loopback)?;
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key.as_bytes())
        .map_err(|_| "`private_key` is not an RSA private key in PEM".to_string())?;
    let account = ServiceAccount {
        project_id,
        client_email,
        private_key_id: v.get("private_key_id").and_then(|x| x.as_str()).map(str::to_owned),
        private_key: Secret(private_key),
        token_uri,
    };
    let project = FcmProject {
        account,
        base_url: String::new(),
        notification: None,
        collapse_key: String::new(),
    };
    // The error is jsonwebtoken's kind of failure, never the key.
    crate::push::fcm::grant_assertion(&project, &key, TEST_SIGNING_TIME_S)
        .map_err(|e| format!("`private_key` must be an RSA key of at least 2048 bits: {e}"))?;
    Ok(project.account)
}

impl PushConfig {
    /// Checks the section and loads every credential it names.
    pub fn load(&self) -> Result<PushSettings, String> {
        if self.fcm.is_empty() && self.apns.is_none() && self.webhook.is_none() {
            return Err("[push] names no provider: add [[push.fcm]], [push.apns] or [push.webhook]".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 20 {
            return Err("push.max_attempts must be 1..=20".into());
        }
        if self.timeout_ms < 100 || self.retry_base_ms == 0 || self.retry_max_ms < self.retry_base_ms {
            return Err("push.timeout_ms must be >= 100 and 0 < push.retry_base_ms <= push.retry_max_ms".into());
        }
        if self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!("push.timeout_ms must be 100..={MAX_TIMEOUT_MS} (ten minutes)"));
        }
        if self.retry_max_ms > MAX_RETRY_MS {
            return Err(format!("push.retry_max_ms must be at most {MAX_RETRY_MS} (one hour)"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT {
            return Err(format!("push.max_in_flight must be 1..={MAX_IN_FLIGHT}"));
        }
        if self.min_interval_secs > 86_400 {
            return Err("push.min_interval_secs must be at most 86400".into());
        }
        let mut fcm = Vec::new();
        for (i, f) in self.fcm.iter().enumerate() {
            let what = format!("push.fcm[{i}].service_account");
            let json = read_source(&what, &f.service_account, &f.service_account_env)?;
            let account = parse_service_account(&json).map_err(|e| format!("{what}: {e}"))?;
            check_url(&format!("push.fcm[{i}].base_url"), &f.base_url, Clear::Loopback)?;
            if fcm
                .iter()
                .any(|p: &FcmProject| p.account.project_id == account.project_id)
            {
                return Err(format!("{what}: project {:?} is listed twice", account.project_id));
            }
            let notification = match (&f.notification_title, &f.notification_body) {
                (None, None) => None,
                (t, b) => Some((t.clone().unwrap_or_default(), b.clone().unwrap_or_default())),
            };
            if let Some((t, b)) = &notification {
                alert_fits(&format!("push.fcm[{i}].notification_title and notification_body"), t, b)?;
            }
            // FCM hands it to APNs as `apns-collapse-id` for iOS devices.
            header_value(
                &format!("push.fcm[{i}].collapse_key"),
                &f.collapse_key,
                APNS_COLLAPSE_ID_MAX,
            )?;
            fcm.push(FcmProject {
                account,
                base_url: f.base_url.trim_end_matches('/').to_string(),
                notification,
                collapse_key: f.collapse_key.clone(),
            });
        }
        let apns = match &self.apns {
            None => None,
            Some(a) => {
                let pem = read_source("push.apns.key_file", &a.key_file, &a.key_env)?;
                let what = if a.key_file.is_some() {
                    "push.apns.key_file"
                } else {
                    "push.apns.key_env"
                };
                let key = jsonwebtoken::EncodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|_| format!("{what}: not a P-256 private key in PEM (.p8)"))?;
                let token_ok = |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_alphanumeric());
                if !token_ok(&a.key_id) || !token_ok(&a.team_id) {
                    return Err("push.apns.key_id and team_id must be Apple's short alphanumeric ids".into());
                }
                if a.topic.is_empty() {
                    return Err("push.apns.topic (the app's bundle id) is required".into());
                }
                // Sent as headers, and the alert in a payload of at most 4 KiB: a value APNs
                // refuses would fail every push (tried again for ever), so it is refused here.
                header_value("push.apns.topic", &a.topic, 0)?;
                header_value("push.apns.collapse_id", &a.collapse_id, APNS_COLLAPSE_ID_MAX)?;
                alert_fits(
                    "push.apns.alert_title and alert_body",
                    a.alert_title.as_deref().unwrap_or_default(),
                    a.alert_body.as_deref().unwrap_or_default(),
                )?;
                if a.push_type != "alert" && a.push_type != "background" {
                    return Err(format!(
                        "push.apns.push_type {:?} is not \"alert\" or \"background\"",
                        a.push_type
                    ));
                }
                check_url("push.apns.base_url", &a.base_url, Clear::Loopback)?;
                let credentials = ApnsCredentials {
                    key_pem: Secret(pem),
                    key_id: a.key_id.clone(),
                    team_id: a.team_id.clone(),
                    topic: a.topic.clone(),
                    base_url: a.base_url.trim_end_matches('/').to_string(),
                    push_type: a.push_type.clone(),
                    alert: (a.alert_title.clone(), a.alert_body.clone()),
                    collapse_id: a.collapse_id.clone(),
                };
                // Any EC key in PKCS#8 parses (P-384, secp256k1); only a P-256 one signs the
                // ES256 provider token: signed once here, as the APNs sender signs it, so a
                // wrong key is refused now rather than by every push.
                super::apns::provider_token(&credentials, &key, TEST_SIGNING_TIME_S)
                    .map_err(|e| format!("{what}: must be a P-256 key (Apple's .p8): {e}"))?;
                Some(credentials)
            }
        };
        let webhook = match &self.webhook {
            None => None,
            Some(w) => {
                check_url("push.webhook.url", &w.url, Clear::Anywhere)?;
                let secret = match (&w.secret, &w.secret_env) {
                    (Some(_), Some(_)) => return Err("push.webhook: set secret or secret_env, not both".into()),
                    (Some(s), None) => s.clone(),
                    (None, Some(v)) => std::env::var(v)
                        .map_err(|_| format!("push.webhook.secret_env: environment variable {v} is not set"))?,
                    (None, None) => return Err("push.webhook: secret or secret_env is required".into()),
                };
                if secret.len() < 16 {
                    return Err("push.webhook secret must be at least 16 characters".into());
                }
                Some(WebhookCredentials {
                    url: w.url.clone(),
                    secret: Secret(secret),
                })
            }
        };
        let extra_roots = match &self.ca_file {
            Some(p) => crate::tls::pem_certs(p, "push.ca_file")?,
            None => Vec::new(),
        };
        // PEM that decodes can still hold a certificate TLS will not take: refused here (and
        // so by check-config), not by a push worker that then never starts.
        crate::tls::client_config(&extra_roots, &[], "push.ca_file")?;
        let settings = PushSettings {
            min_interval_ms: (self.min_interval_secs * 1000) as i64,
            fcm,
            apns,
            webhook,
            extra_roots,
            timeout_ms: self.timeout_ms,
            max_attempts: self.max_attempts,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            max_in_flight: self.max_in_flight,
        };
        claim_within_bound(&settings)?;
        Ok(settings)
    }
}

/// A push's claim ([`crate::push::claim_length`]) lasts at most [`MAX_CLAIM`]; the error names
/// the settings it is the product of.
fn claim_within_bound(s: &PushSettings) -> Result<(), String> {
    let claim = crate::push::claim_length(s);
    if claim <= MAX_CLAIM {
        return Ok(());
    }
    let requests = (4 * s.fcm.len() as u64).max(2);
    Err(format!(
        "[push]: a push's claim would last {} s, more than {} s (one hour): push.max_attempts {} \
         x {requests} requests (4 per [[push.fcm]] project, {} here; at least 2) x push.timeout_ms {} \
         + {} waits x push.retry_max_ms {} + {} s; a node that dies mid-push leaves its wake-up \
         that long: lower max_attempts, timeout_ms or retry_max_ms",
        claim.as_secs() + u64::from(claim.subsec_nanos() > 0),
        MAX_CLAIM.as_secs(),
        s.max_attempts,
        s.fcm.len(),
        s.timeout_ms,
        s.max_attempts.saturating_sub(1),
        s.retry_max_ms,
        crate::push::CLAIM_MARGIN.as_secs(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Wrapper {
        push: PushConfig,
    }

    /// Every `[push]` example of the README parses with the names outside tests drive.
    #[test]
    fn readme_push_examples_parse() {
        let readme = include_str!("../../README.md");
        let mut n = 0;
        for block in readme.split("```toml").skip(1) {
            let block = block.split("```").next().unwrap();
            if !block.contains("[push]") {
                continue;
            }
            let w: Wrapper = toml::from_str(block).unwrap_or_else(|e| panic!("{block}: {e}"));
            n += 1;
            if let Some(a) = &w.push.apns {
                assert_eq!((a.key_id.as_str(), a.team_id.as_str()), ("ABC123DEFG", "DEF123GHIJ"));
            }
        }
        assert_eq!(n, 3, "one example per provider");
    }

    /// A URL given a credential (the grant, an access token) is https://, or http:// on this
    /// machine only; the webhook's may be http:// anywhere.
    #[test]
    fn credentials_go_in_clear_to_this_machine_only() {
        for ok in [
            "https://oauth2.googleapis.com/token",
            "http://127.0.0.1:8443/token",
            "http://[::1]:1/t",
            "http://localhost:9/t",
        ] {
            assert!(check_url("token_uri", ok, Clear::Loopback).is_ok(), "{ok}");
        }
        for bad in [
            "http://oauth2.googleapis.com/token",
            "http://10.0.0.5/token",
            "ftp://127.0.0.1/t",
            "https://",
        ] {
            let e = check_url("token_uri", bad, Clear::Loopback).unwrap_err();
            assert!(e.contains("must be an https:// URL"), "{bad}: {e}");
        }
        // What may hold a credential is not echoed.
        let e = check_url(
            "push.webhook.url",
            "ftp://u:pw@h.example/hook/s3cret?token=s3cret",
            Clear::Anywhere,
        )
        .unwrap_err();
        assert!(
            e.contains("ftp://h.example/…") && !e.contains("s3cret") && !e.contains("pw"),
            "{e}"
        );
        assert!(check_url("push.webhook.url", "http://hooks.internal/x", Clear::Anywhere).is_ok());
        let sa = |uri: &str| {
            parse_service_account(&format!(
                r#"{{"project_id":"p","client_email":"e@x","token_uri":"{uri}","private_key":"k"}}"#
            ))
        };
        assert!(sa("http://oauth2.googleapis.com/token")
            .unwrap_err()
            .contains("https://"));
    }

    /// Settings each within their bounds may multiply out to a claim of days: refused past an
    /// hour, with the product named.
    #[test]
    fn a_claim_longer_than_an_hour_is_refused() {
        let hook = "[webhook]\nurl = \"https://h.example/x\"\nsecret = \"hunter2hunter2hunter2\"\n";
        let c: PushConfig = toml::from_str(hook).unwrap();
        // The defaults: 5 x 2 x 10 s + 4 x 60 s + 5 s.
        assert!(c.load().is_ok());
        let mut long = c.clone();
        long.max_attempts = 20;
        long.timeout_ms = MAX_TIMEOUT_MS;
        long.retry_max_ms = MAX_RETRY_MS;
        let e = long.load().unwrap_err();
        assert!(
            e.contains("push.max_attempts 20")
                && e.contains("push.timeout_ms 600000")
                && e.contains("push.retry_max_ms 3600000")
                && e.contains("one hour"),
            "{e}"
        );
        // Just within: 3600 s = 2 x 2 x 600 s + 1 x 1195 s + 5 s.
        let mut edge = c.clone();
        edge.max_attempts = 2;
        edge.timeout_ms = 600_000;
        edge.retry_max_ms = 1_195_000;
        assert!(edge.load().is_ok());
        edge.retry_max_ms += 1;
        assert!(edge.load().unwrap_err().contains("would last 3601 s"));
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("-----BEGIN PRIVATE KEY-----".into());
        assert_eq!(format!("{s:?}"), "<redacted>");
        let w: Wrapper =
            toml::from_str("[push.webhook]\nurl = \"https://h.example/x\"\nsecret = \"hunter2hunter2hunter2\"\n")
                .unwrap();
        assert!(!format!("{:?}", w.push).contains("hunter2"));
        let loaded = w.push.load().unwrap();
        assert!(!format!("{loaded:?}").contains("hunter2"));
        assert!(parse_service_account("{\"private_key\": \"MIIsecret\"")
            .unwrap_err()
            .contains("not JSON"));
        let e = parse_service_account(
            r#"{"type":"service_account","project_id":"p","client_email":"e@x","token_uri":"https://oauth2.googleapis.com/token","private_key":"-----BEGIN PRIVATE KEY-----\nMIIsecret\n-----END PRIVATE KEY-----\n"}"#,
        )
        .unwrap_err();
        assert!(e.contains("not an RSA private key") && !e.contains("MIIsecret"), "{e}");
    }
}
