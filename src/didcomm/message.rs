//! DIDComm v1 plaintext message helpers: `@type` parsing (both the `https://didcomm.org/`
//! and the legacy `did:sov:...;spec/` prefixes), ids, threading and `~transport` return routes.

use serde_json::Value;

pub const DIDCOMM_PREFIX: &str = "https://didcomm.org/";
pub const LEGACY_PREFIX: &str = "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/";

/// Longest `@type` we parse; real ones are under 80 characters.
const MAX_TYPE_LEN: usize = 256;

/// A parsed message type URI: `<prefix><family>/<major.minor>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageType {
    /// `did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/` prefix rather than `https://didcomm.org/`.
    pub legacy: bool,
    pub family: String,
    /// As written, e.g. `"1.0"`.
    pub version: String,
    pub name: String,
}

impl MessageType {
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > MAX_TYPE_LEN {
            return None;
        }
        let (legacy, rest) = if let Some(r) = s.strip_prefix(DIDCOMM_PREFIX) {
            (false, r)
        } else if let Some(r) = s.strip_prefix(LEGACY_PREFIX) {
            (true, r)
        } else {
            return None;
        };
        let mut parts = rest.split('/');
        let (family, version, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || family.is_empty() || name.is_empty() {
            return None;
        }
        parse_version(version)?;
        Some(Self {
            legacy,
            family: family.to_owned(),
            version: version.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `(major, minor)` of the version.
    pub fn version_numbers(&self) -> (u32, u32) {
        parse_version(&self.version).unwrap_or((0, 0))
    }

    /// Same family and name, any minor version of major 1 (RFC 0003 semver: a 1.x peer
    /// understands 1.y messages).
    pub fn is(&self, family: &str, name: &str) -> bool {
        self.family == family && self.name == name && self.version_numbers().0 == 1
    }

    /// The type of a reply named `name` in the same family, prefix and version.
    pub fn reply_type(&self, name: &str) -> String {
        let prefix = if self.legacy { LEGACY_PREFIX } else { DIDCOMM_PREFIX };
        format!("{prefix}{}/{}/{name}", self.family, self.version)
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reply_type(&self.name))
    }
}

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (maj, min) = v.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(maj) || !digits(min) {
        return None;
    }
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// At most the first `max` characters of an untrusted string (never cut inside a
/// character): what logs and error answers show of what a sender wrote.
pub fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A fresh message id (UUID v4), as Credo and ACA-Py use.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `@type` of a plaintext message, parsed.
pub fn message_type(msg: &Value) -> Option<MessageType> {
    msg.get("@type")?.as_str().and_then(MessageType::parse)
}

/// Longest message or thread id kept with a record (a connection's thread, its invitation, a
/// replay record's name): ids are UUIDs in practice, 36 characters.
pub const MAX_ID_LEN: usize = 256;

/// `@id` of a message, if it is a string.
pub fn id(msg: &Value) -> Option<&str> {
    msg.get("@id")?.as_str()
}

/// The thread id: `~thread.thid`, or the message's own `@id` when it starts a thread (RFC 0008).
/// Empty when neither is present.
pub fn thid(msg: &Value) -> String {
    msg.get("~thread")
        .and_then(|t| t.get("thid"))
        .and_then(Value::as_str)
        .or_else(|| id(msg))
        .unwrap_or_default()
        .to_owned()
}

/// `~thread.pthid`, the parent thread (e.g. the out-of-band invitation a DID exchange answers).
pub fn pthid(msg: &Value) -> Option<String> {
    msg.get("~thread")?.get("pthid")?.as_str().map(str::to_owned)
}

/// RFC 0092 `~transport.return_route`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReturnRoute {
    /// Send nothing back on this connection (or no decorator).
    None,
    /// Send any message for the sender back on this connection while it is open.
    All,
    /// Send back only messages of this thread.
    Thread(String),
}

pub fn return_route(msg: &Value) -> ReturnRoute {
    let Some(transport) = msg.get("~transport") else {
        return ReturnRoute::None;
    };
    match transport.get("return_route").and_then(Value::as_str) {
        Some("all") => ReturnRoute::All,
        Some("thread") => ReturnRoute::Thread(
            transport
                .get("return_route_thread")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| thid(msg)),
        ),
        _ => ReturnRoute::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_types() {
        let t = MessageType::parse("https://didcomm.org/coordinate-mediation/1.0/mediate-request").unwrap();
        assert!(!t.legacy);
        assert_eq!(t.family, "coordinate-mediation");
        assert_eq!(t.version, "1.0");
        assert_eq!(t.name, "mediate-request");
        assert!(t.is("coordinate-mediation", "mediate-request"));
        assert!(!t.is("coordinate-mediation", "mediate-grant"));
        assert_eq!(
            t.reply_type("mediate-grant"),
            "https://didcomm.org/coordinate-mediation/1.0/mediate-grant"
        );

        let l = MessageType::parse("did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/trust_ping/1.0/ping").unwrap();
        assert!(l.legacy);
        assert!(l.is("trust_ping", "ping"));
        assert_eq!(
            l.reply_type("ping_response"),
            "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/trust_ping/1.0/ping_response"
        );
        assert_eq!(l.to_string(), "did:sov:BzCbsNYhMrjHiqZDTUASHg;spec/trust_ping/1.0/ping");

        let minor = MessageType::parse("https://didcomm.org/didexchange/1.1/request").unwrap();
        assert!(minor.is("didexchange", "request"));
        assert_eq!(minor.version_numbers(), (1, 1));
        let v2 = MessageType::parse("https://didcomm.org/messagepickup/2.0/status").unwrap();
        assert!(!v2.is("messagepickup", "status"));
    }

    #[test]
    fn rejects_bad_types() {
        for s in [
            "",
            "https://didcomm.org/",
            "https://didcomm.org/a/1.0",
            "https://didcomm.org/a/1/b",
            "https://didcomm.org/a/x.0/b",
            "https://didcomm.org/a/1.0/b/c",
            "https://didcomm.org//1.0/b",
            "https://didcomm.org/a/1.0/",
            "https://example.org/a/1.0/b",
            "https://didcomm.org/a/99999999999.0/b",
        ] {
            assert_eq!(MessageType::parse(s), None, "{s}");
        }
    }

    #[test]
    fn threading() {
        let m = json!({"@id": "a", "~thread": {"thid": "t", "pthid": "p"}});
        assert_eq!(thid(&m), "t");
        assert_eq!(pthid(&m).as_deref(), Some("p"));
        let m = json!({"@id": "a"});
        assert_eq!(thid(&m), "a");
        assert_eq!(pthid(&m), None);
        assert_eq!(thid(&json!({"~thread": 5})), "");
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 36);
    }

    #[test]
    fn return_routes() {
        assert_eq!(return_route(&json!({})), ReturnRoute::None);
        assert_eq!(
            return_route(&json!({"~transport": {"return_route": "all"}})),
            ReturnRoute::All
        );
        assert_eq!(
            return_route(&json!({"~transport": {"return_route": "none"}})),
            ReturnRoute::None
        );
        assert_eq!(
            return_route(&json!({"@id": "i", "~transport": {"return_route": "thread", "return_route_thread": "x"}})),
            ReturnRoute::Thread("x".into())
        );
        assert_eq!(
            return_route(&json!({"@id": "i", "~transport": {"return_route": "thread"}})),
            ReturnRoute::Thread("i".into())
        );
        assert_eq!(
            return_route(&json!({"~transport": {"return_route": 3}})),
            ReturnRoute::None
        );
    }
}
