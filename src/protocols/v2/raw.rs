//! Queued payloads inside v2 replies as the JSON text they are, never as a tree: a delivery
//! embeds each queued JWE as its attachment's `data.json`, and a payload read into a
//! `serde_json::Value` costs 16-32 times its bytes (a 4 MiB attachment of `[0,0,...]`, queued
//! by anyone, became 64-128 MB each time it was delivered).
//!
//! Replies are `Value`s (every transport packs them through [`super::pack`], and v1's through
//! [`crate::protocols::Mediator::pack_for`]), so the text rides in one as a marked string,
//! [`json()`], and [`to_vec`] writes it in place, as it is, when the reply is packed. Owns that
//! marking only; what is embedded is the callers' choice.

use crate::didcomm::v2::json::{self as djson, Strict};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::sync::LazyLock;

/// The one member of an object standing for JSON text written in its place: a name drawn at
/// random for each process. A fixed one could be written by a sender into anything a reply
/// echoes, and its text would then be spliced into the reply as it is (checked only against
/// JSON's grammar); nobody outside the process knows this one, and it is never written out
/// (every marked object is replaced by its text).
static MARK: LazyLock<String> = LazyLock::new(|| format!("$mailroom:raw-json:{:032x}", rand::random::<u128>()));

/// `text` (JSON a real parse reads: [`djson::strict`]) as a value of a reply being built,
/// written as it is by [`to_vec`]. Only such text is ever spliced: text that a lexical check
/// passes but a parser refuses would make the whole reply unreadable.
pub fn json(text: Strict<'_>) -> Value {
    let mut m = Map::new();
    m.insert(MARK.clone(), Value::String(text.get().to_owned()));
    Value::Object(m)
}

/// A queued payload as a v2 attachment's `data`: `json`, the payload as it is, when it is a
/// JSON object (a JWE, as every sender forwards one) that a real parse reads; else unpadded
/// base64url (what was queued before forwards were checked strictly, or not JSON at all).
/// Checked without building it.
pub fn attachment_data(payload: &[u8]) -> Value {
    // An object or nothing: what does not start as one is not read at all.
    let object = payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    match object.then(|| djson::strict(payload)) {
        Some(Ok(text)) => json!({ "json": json(text) }),
        _ => json!({ "base64": crate::didcomm::b64::encode(payload) }),
    }
}

/// A reply serialized as `serde_json::to_vec` would, each [`json()`] written as its text, into a
/// buffer of exactly its length plus `spare` bytes of capacity (measured first: growing a
/// buffer of megabytes by doubling copies it and leaves up to twice its size allocated).
pub fn to_vec(msg: &Value, spare: usize) -> serde_json::Result<Vec<u8>> {
    let mut len = Count(0);
    serde_json::to_writer(&mut len, &Spliced(msg))?;
    let mut out = Vec::with_capacity(len.0 + spare);
    serde_json::to_writer(&mut out, &Spliced(msg))?;
    Ok(out)
}

/// The text a value stands for, if it is a marked one holding JSON. Only [`json()`] writes the
/// mark, from text checked strictly already: checked here only to be JSON (cheaply, twice per
/// reply), not strictly again.
fn text_of(m: &Map<String, Value>) -> Option<&RawValue> {
    match (m.len(), m.get(MARK.as_str())) {
        (1, Some(Value::String(s))) => serde_json::from_str::<&RawValue>(s).ok(),
        _ => None,
    }
}

/// A value serialized with its marked texts written as they are.
struct Spliced<'a>(&'a Value);

impl Serialize for Spliced<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => match text_of(m) {
                Some(text) => text.serialize(s),
                None => {
                    let mut map = s.serialize_map(Some(m.len()))?;
                    for (k, v) in m {
                        map.serialize_entry(k, &Spliced(v))?;
                    }
                    map.end()
                }
            },
            Value::Array(a) => s.collect_seq(a.iter().map(Spliced)),
            v => v.serialize(s),
        }
    }
}

/// An `io::Write` that only counts.
struct Count(usize);

impl std::io::Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_is_written_byte_for_byte_where_a_tree_of_it_would_be() {
        // Not in serde_json's key order, with spaces: a tree would sort and compact it.
        let jwe = br#"{ "protected": "p", "iv": "i", "ciphertext": "c", "tag": "t" }"#;
        let reply = json!({ "id": "1", "attachments": [{ "id": "a", "data": attachment_data(jwe) }] });
        let out = to_vec(&reply, 0).unwrap();
        let want = format!(
            r#"{{"attachments":[{{"data":{{"json":{}}},"id":"a"}}],"id":"1"}}"#,
            std::str::from_utf8(jwe).unwrap()
        );
        assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        assert_eq!(out.capacity(), out.len());
        // Read back, it is the payload's own JSON.
        let back: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back["attachments"][0]["data"]["json"]["ciphertext"], "c");
        // A reply without any is what serde_json writes.
        let plain = json!({ "b": [1, "x", null], "a": { "c": true } });
        assert_eq!(to_vec(&plain, 8).unwrap(), serde_json::to_vec(&plain).unwrap());
    }

    #[test]
    fn what_is_not_a_json_object_is_embedded_as_base64() {
        for p in [&b"[1, 2]"[..], b"\"s\"", b"not json", b"{\"a\": 1", &[0xff, 0xfe]] {
            let d = attachment_data(p);
            assert_eq!(d["base64"], crate::didcomm::b64::encode(p), "{p:?}");
        }
    }

    #[test]
    fn a_marked_string_that_is_not_json_is_written_as_the_object_it_is() {
        let forged = json!({ "x": { MARK.as_str(): "{not json" } });
        assert_eq!(to_vec(&forged, 0).unwrap(), serde_json::to_vec(&forged).unwrap());
    }

    /// Text that JSON's grammar allows and parsers refuse: a lone surrogate, a number out of
    /// range, nesting past serde_json's limit (what forwards queued before they were checked
    /// strictly may hold).
    fn unreadable() -> Vec<String> {
        vec![
            r#"{"ciphertext": "\ud800"}"#.into(),
            r#"{"ciphertext": "c", "n": 1e400}"#.into(),
            format!(r#"{{"ciphertext": "c", "a": {}{}}}"#, "[".repeat(200), "]".repeat(200)),
        ]
    }

    #[test]
    fn a_payload_a_parser_refuses_is_embedded_as_base64() {
        for p in unreadable() {
            assert!(serde_json::from_str::<&RawValue>(&p).is_ok(), "{p}");
            let d = attachment_data(p.as_bytes());
            assert_eq!(d, json!({ "base64": crate::didcomm::b64::encode(p.as_bytes()) }), "{p}");
        }
    }

    #[test]
    fn a_reply_delivering_a_payload_a_parser_refuses_is_read_by_a_parser() {
        let jwe = r#"{"protected": "p", "ciphertext": "c"}"#;
        let mut atts = vec![json!({ "id": "ok", "data": attachment_data(jwe.as_bytes()) })];
        atts.extend(
            unreadable()
                .iter()
                .map(|p| json!({ "id": "bad", "data": attachment_data(p.as_bytes()) })),
        );
        let reply = json!({ "id": "1", "attachments": atts });
        let out = to_vec(&reply, 0).unwrap();
        let back: Value = serde_json::from_slice(&out).expect("the delivery parses");
        assert_eq!(back["attachments"][0]["data"]["json"]["ciphertext"], "c");
        for (i, p) in unreadable().iter().enumerate() {
            let b64 = back["attachments"][i + 1]["data"]["base64"].as_str().unwrap();
            assert_eq!(crate::didcomm::b64::decode(b64).unwrap(), p.as_bytes());
        }
    }

    #[test]
    fn a_sender_written_object_under_the_old_mark_is_written_as_that_object_not_spliced() {
        // What `{"$mailroom:raw-json": ...}` echoed from a message would have become: its text
        // spliced unchecked (here a lone surrogate that makes the reply unreadable).
        for forged in [
            json!({ "$mailroom:raw-json": r#""\ud800""# }),
            json!({ "$mailroom:raw-json": r#"{"ciphertext": "c", "n": 1e400}"# }),
        ] {
            let reply = json!({ "id": "1", "body": { "updated": [{ "action": forged.clone() }] } });
            let out = String::from_utf8(to_vec(&reply, 0).unwrap()).unwrap();
            assert_eq!(out, serde_json::to_string(&reply).unwrap());
            let back: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(back["body"]["updated"][0]["action"], forged);
        }
        // The mark of this process is another name, nobody else's to know.
        assert!(MARK.starts_with("$mailroom:raw-json:") && MARK.len() > "$mailroom:raw-json:".len() + 16);
    }
}
