//! Reading JSON from the network without building what it describes: a `serde_json::Value`
//! costs 32 bytes a value, so `[0,0,0,...]` (two bytes a value) read as a tree takes 16 to 32
//! times its own size, and anyone can send one. Envelopes and messages are read here as typed
//! fields borrowed from the bytes ([`RawValue`]: checked to be JSON, never built), as lists
//! of which only the first few elements are kept ([`list`]), or as a tree with a bounded
//! number of values ([`object_without`], [`value_within`]). JSON passed on as it was sent is
//! first read in full as a parser would, and dropped as it is read ([`strict`]).

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

/// A JSON value's string, if it is one: borrowed from the input unless it holds escapes.
/// Anything else (a number, an object, `null`) is `None`, as `Value::as_str` reads it.
pub fn str_of(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(s) {
        Ok(b) => Some(Cow::Borrowed(b)),
        Err(_) => serde_json::from_str::<String>(s).ok().map(Cow::Owned),
    }
}

/// [`str_of`] a member that may be absent.
pub fn opt_str<'a>(raw: Option<&'a RawValue>) -> Option<Cow<'a, str>> {
    raw.and_then(str_of)
}

/// Whether JSON text (checked to be JSON already) is an object.
pub fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// `raw` read as the struct `T` if it is a JSON object, else `T`'s default (every member
/// absent): serde's derived structs would read an array's elements as their members.
pub fn object_or_default<'a, T: serde::Deserialize<'a> + Default>(raw: &'a RawValue) -> serde_json::Result<T> {
    if is_object(raw) {
        serde_json::from_str(raw.get())
    } else {
        Ok(T::default())
    }
}

/// Whether `bytes` start (after whitespace) as a JSON object does. serde's derived structs
/// also read an array as a struct's fields in order: a message or an envelope is an object.
pub fn looks_like_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The first elements of a JSON array, and how many it holds.
pub struct List<'a> {
    /// At most the `keep` first elements, as sent.
    pub first: Vec<&'a RawValue>,
    /// How many elements the array holds (those past `keep` counted, never kept).
    pub len: usize,
}

/// `raw` read as a list keeping its `keep` first elements; `None` if it is not an array. The
/// rest are skipped (their count is known): a list of a million elements costs no million
/// entries before its length is refused.
pub fn list(raw: &RawValue, keep: usize) -> Option<List<'_>> {
    struct Keep(usize);
    impl<'de> Visitor<'de> for Keep {
        type Value = List<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List<'de>, A::Error> {
            let mut out = List {
                first: Vec::new(),
                len: 0,
            };
            loop {
                let more = if out.first.len() < self.0 {
                    seq.next_element::<&'de RawValue>()?.map(|r| out.first.push(r))
                } else {
                    seq.next_element::<IgnoredAny>()?.map(|_| ())
                };
                if more.is_none() {
                    return Ok(out);
                }
                out.len += 1;
            }
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let l = de::Deserializer::deserialize_seq(&mut de, Keep(keep)).ok()?;
    de.end().ok()?;
    Some(l)
}

/// JSON text that a real parse reads (serde_json into a `Value`, Python's `json`, a wallet's
/// JSON.parse into objects it then uses): checked by [`strict`], never built.
#[derive(Clone, Copy, Debug)]
pub struct Strict<'a>(&'a RawValue);

impl<'a> Strict<'a> {
    /// The text, without the whitespace around it.
    pub fn get(self) -> &'a str {
        self.0.get()
    }

    /// The text as a [`RawValue`], written as it is where it is serialized.
    pub fn raw(self) -> &'a RawValue {
        self.0
    }
}

/// `bytes` as JSON that a real parse reads, or why not. [`RawValue`] and [`IgnoredAny`] only
/// check JSON's grammar: they pass a lone surrogate (`"\ud800"`), a number out of range
/// (`1e400`) and nesting of any depth, all of which serde_json refuses to read into a
/// `Value`, as other parsers do. Such text queued and written into a delivery byte for byte
/// makes the whole delivery unreadable to the wallet: it never acknowledges it, and gets the
/// same message back first in every batch. Read here as a `Value` would be (serde_json's
/// unescaping, number parsing and depth limit of 128), every value dropped as soon as it is
/// read: no tree, nothing allocated beyond serde_json's scratch buffer.
///
/// Nested at most [`MAX_DEPTH`] deep, far below serde_json's 128: a delivery wraps the payload
/// in a few levels of its own (`attachments`, `data`, `json`), and a payload nested 127 deep,
/// read alone, made the delivery too deep for the wallet's parser.
pub fn strict(bytes: &[u8]) -> Result<Strict<'_>, serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(bytes)?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Discard { depth: 0 }.deserialize(&mut de)?;
    de.end()?;
    Ok(Strict(raw))
}

/// How deep a payload [`strict`] passes may nest (a JWE nests 3 deep).
pub const MAX_DEPTH: usize = 64;

/// Whether a tree already read (so by a real parse) nests at most [`MAX_DEPTH`] deep: what
/// [`strict`] checks, without reading the text again.
pub fn within_depth(v: &Value) -> bool {
    fn deepest(v: &Value, depth: usize) -> bool {
        match v {
            Value::Array(a) => depth < MAX_DEPTH && a.iter().all(|x| deepest(x, depth + 1)),
            Value::Object(m) => depth < MAX_DEPTH && m.values().all(|x| deepest(x, depth + 1)),
            _ => true,
        }
    }
    deepest(v, 0)
}

/// Whether `bytes` is JSON a parser reads ([`strict`]) and a JSON object, and which of
/// `names` are its members and not `null` (bit `i` for `names[i]`), in one pass: a forward's `msg` is checked
/// for its depth, its escapes and numbers and for `ciphertext`/`protected` together. `None`:
/// strict JSON, but not an object. A name given twice is refused, as a typed read refuses it.
pub fn strict_members(bytes: &[u8], names: &[&str]) -> Result<Option<u64>, serde_json::Error> {
    debug_assert!(names.len() <= 64);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let found = TopMembers { names }.deserialize(&mut de)?;
    de.end()?;
    Ok(found)
}

/// The top level of [`strict_members`]: an object's keys compared with `names` (unescaped, as a
/// typed read compares them), every value read by [`Discard`].
#[derive(Clone, Copy)]
struct TopMembers<'n> {
    names: &'n [&'n str],
}

/// A key of [`TopMembers`]: the index of the name it is, if any.
struct Key<'n>(&'n [&'n str]);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E: de::Error>(self, k: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|n| *n == k))
    }
}

impl<'de> DeserializeSeed<'de> for TopMembers<'_> {
    type Value = Option<u64>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopMembers<'_> {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<u64>, A::Error> {
        Discard { depth: 0 }.visit_seq(seq).map(|_| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        let inner = Discard { depth: 0 }.inside()?;
        let (mut found, mut seen) = (0u64, 0u64);
        while let Some(key) = map.next_key_seed(Key(self.names))? {
            let null = map.next_value_seed(inner)?;
            if let Some(i) = key {
                if seen & (1 << i) != 0 {
                    return Err(de::Error::custom(format!("duplicate field `{}`", self.names[i])));
                }
                // Present but `null` is absent, as a typed read of an `Option` reads it; it
                // still counts once for the duplicate check.
                found |= (!null as u64) << i;
                seen |= 1 << i;
            }
        }
        Ok(Some(found))
    }
}

/// Any JSON value, read in full and dropped ([`strict`]); `true` if it was `null`. Calls `deserialize_any` (never
/// `deserialize_ignored_any`, which serde_json skips lexically) down to every leaf; `depth`:
/// the arrays and objects around it.
#[derive(Clone, Copy)]
struct Discard {
    depth: usize,
}

impl Discard {
    /// The seed for what an array or object holds, or an error past [`MAX_DEPTH`].
    fn inside<E: de::Error>(self) -> Result<Discard, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format!("nested more than {MAX_DEPTH} deep")));
        }
        Ok(Discard { depth: self.depth + 1 })
    }
}

impl<'de> DeserializeSeed<'de> for Discard {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Discard {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_borrowed_str<E: de::Error>(self, _: &'de str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_string<E: de::Error>(self, _: String) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_none<E: de::Error>(self) -> Result<bool, E> {
        Ok(true)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let inner = self.inside()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let inner = self.inside()?;
        // Keys through the same seed: a key is a string, unescaped as any other.
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(false)
    }
}

/// Why JSON was not read into a tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("more than {0} JSON values")]
    TooManyValues(usize),
}

/// A JSON object read into a map, with at most `max_values` values in all: every member but
/// `skip`, whose value is checked to be JSON and never built (a forward's attachments: read as
/// sent where they are used).
pub fn object_without(bytes: &[u8], skip: &str, max_values: usize) -> Result<Map<String, Value>, TreeError> {
    object_of(bytes, Some(skip), max_values)
}

/// A JSON object read into a map, with at most `max_values` values in all (a DIDComm v1
/// plaintext: nothing in it is skipped).
pub fn object_within(bytes: &[u8], max_values: usize) -> Result<Map<String, Value>, TreeError> {
    object_of(bytes, None, max_values)
}

fn object_of(bytes: &[u8], skip: Option<&str>, max_values: usize) -> Result<Map<String, Value>, TreeError> {
    if !looks_like_object(bytes) {
        return Err(match serde_json::from_slice::<IgnoredAny>(bytes) {
            Ok(_) => TreeError::NotObject,
            Err(e) => TreeError::NotJson(e.to_string()),
        });
    }
    let budget = Budget::new(max_values);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let read = de::Deserializer::deserialize_map(&mut de, Members { skip, budget: &budget }).and_then(|m| {
        de.end()?;
        Ok(m)
    });
    read.map_err(|e| budget.error(max_values, e))
}

/// Any JSON value read into a tree of at most `max_values` values; `None` if it is not JSON or
/// holds more.
pub fn value_within(bytes: &[u8], max_values: usize) -> Option<Value> {
    let budget = Budget::new(max_values);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Bounded(&budget).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(v)
}

/// The values a tree may still take, and whether one more was refused.
struct Budget {
    left: Cell<usize>,
    exceeded: Cell<bool>,
}

impl Budget {
    fn new(max: usize) -> Budget {
        Budget {
            left: Cell::new(max),
            exceeded: Cell::new(false),
        }
    }

    /// Counts one value, or refuses it.
    fn take<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => {
                self.exceeded.set(true);
                Err(E::custom("too many JSON values"))
            }
        }
    }

    fn error(&self, max: usize, e: serde_json::Error) -> TreeError {
        if self.exceeded.get() {
            TreeError::TooManyValues(max)
        } else {
            TreeError::NotJson(e.to_string())
        }
    }
}

/// The members of the top-level object, but `skip`.
struct Members<'b> {
    skip: Option<&'b str>,
    budget: &'b Budget,
}

impl<'de> Visitor<'de> for Members<'_> {
    type Value = Map<String, Value>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.budget.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if self.skip == Some(key.as_str()) {
                map.next_value::<IgnoredAny>()?;
            } else {
                let v = map.next_value_seed(Bounded(self.budget))?;
                out.insert(key, v);
            }
        }
        Ok(out)
    }
}

/// One value of a tree, counted against the budget (serde_json bounds its depth).
#[derive(Clone, Copy)]
struct Bounded<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::from(n))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::from(n))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::from(n))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::String(s))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.take()?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.take()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.take()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let v = map.next_value_seed(self)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn a_string_is_borrowed_unless_escaped_and_anything_else_is_none() {
        assert!(matches!(str_of(raw(r#""abc""#)), Some(Cow::Borrowed("abc"))));
        assert_eq!(str_of(raw(r#""a\nb""#)).as_deref(), Some("a\nb"));
        for not in ["7", "null", "{}", r#"["a"]"#, "true"] {
            assert_eq!(str_of(raw(not)), None, "{not}");
        }
    }

    #[test]
    fn a_list_keeps_its_first_elements_and_counts_the_rest() {
        let l = list(raw(r#"[1, {"a": [2]}, 3, 4]"#), 2).unwrap();
        assert_eq!(l.len, 4);
        assert_eq!(
            l.first.iter().map(|r| r.get()).collect::<Vec<_>>(),
            ["1", r#"{"a": [2]}"#]
        );
        assert_eq!(list(raw("[]"), 2).unwrap().len, 0);
        assert!(list(raw(r#"{"a": 1}"#), 2).is_none());
        assert!(list(raw(r#""[]""#), 2).is_none());
    }

    #[test]
    fn an_object_is_read_without_its_skipped_member_and_within_its_budget() {
        let text = br#"{"type": "t", "body": {"n": [1, 2]}, "attachments": [[[0, 0, 0]]]}"#;
        let m = object_without(text, "attachments", 6).unwrap();
        assert_eq!(Value::Object(m), json!({"type": "t", "body": {"n": [1, 2]}}));
        // Six values: the object, "t", the body, its list and two numbers.
        assert_eq!(object_without(text, "attachments", 5), Err(TreeError::TooManyValues(5)));
        // The skipped member is still checked to be JSON.
        assert!(matches!(
            object_without(br#"{"attachments": [1,}"#, "attachments", 7),
            Err(TreeError::NotJson(_))
        ));
        assert_eq!(object_without(b" [1, 2]", "x", 7), Err(TreeError::NotObject));
        assert!(matches!(object_without(b"nope", "x", 7), Err(TreeError::NotJson(_))));
        assert!(matches!(
            object_without(br#"{"a": 1} x"#, "x", 7),
            Err(TreeError::NotJson(_))
        ));
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn the_strict_check_refuses_what_a_real_parse_refuses_and_lexical_checks_pass() {
        let deep = nested(200);
        let deep_in_object = format!(r#"{{"ciphertext": "c", "a": {deep}}}"#);
        for bad in [
            r#""\ud800""#,
            r#"{"ciphertext": "\ud800x"}"#,
            r#"{"\udc00": 1}"#,
            "1e400",
            r#"{"ciphertext": "c", "n": [-1e400]}"#,
            deep.as_str(),
            deep_in_object.as_str(),
        ] {
            // What the check before it passed, and serde_json into a tree refuses.
            assert!(serde_json::from_str::<&RawValue>(bad).is_ok(), "{bad}");
            assert!(serde_json::from_str::<IgnoredAny>(bad).is_ok(), "{bad}");
            assert!(serde_json::from_str::<Value>(bad).is_err(), "{bad}");
            assert!(strict(bad.as_bytes()).is_err(), "{bad}");
            assert!(strict_members(bad.as_bytes(), &["ciphertext"]).is_err(), "{bad}");
        }
        for not_json in ["", "{", r#"{"a": 1} x"#, "[1,]", r#"{"a" 1}"#] {
            assert!(strict(not_json.as_bytes()).is_err(), "{not_json}");
            assert!(strict_members(not_json.as_bytes(), &["a"]).is_err(), "{not_json}");
        }
        let bad_utf8: [&[u8]; 3] = [b"\"\xff\"", b"{\"ciphertext\": \"\xff\"}", b"{\"\xc3\": 1}"];
        for bytes in bad_utf8 {
            assert!(strict(bytes).is_err());
            assert!(strict_members(bytes, &["ciphertext"]).is_err());
        }
    }

    #[test]
    fn the_strict_check_passes_what_a_real_parse_reads_as_it_was_written() {
        let jwe = r#" { "protected": "eyJ0eXAiOiJKV00vMS4wIn0", "iv": "aXY", "ciphertext": "Y3Q", "tag": "dGFn",
            "recipients": [{ "encrypted_key": "ZWs", "header": { "kid": "did:key:z6LS#z6LS" } }] } "#;
        let zeros = format!("[{}0]", "0,".repeat(100_000));
        let deep_enough = nested(MAX_DEPTH);
        for good in [
            jwe,
            r#""\ud83d\ude00 \u00e9 \n""#,
            r#"{"\ud83d\ude00": [1.5e300, -0, 18446744073709551615, 1e-400, true, null]}"#,
            zeros.as_str(),
            deep_enough.as_str(),
        ] {
            assert!(serde_json::from_str::<Value>(good).is_ok(), "{good}");
            let s = strict(good.as_bytes()).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(s.get(), good.trim());
            assert!(strict_members(good.as_bytes(), &["ciphertext"]).is_ok(), "{good}");
        }
    }

    /// A payload a parser reads alone may be too deep once a delivery wraps it (three or four
    /// levels): past [`MAX_DEPTH`] it is refused, and one at the bound wrapped in a delivery
    /// still parses.
    #[test]
    fn the_strict_check_leaves_room_for_the_levels_a_delivery_adds() {
        let too_deep = format!(r#"{{"ciphertext": "c", "a": {}}}"#, nested(125));
        assert!(serde_json::from_str::<Value>(&too_deep).is_ok(), "read alone");
        let wrapped = format!(r#"{{"attachments": [{{"data": {{"json": {too_deep}}}}}]}}"#);
        assert!(
            serde_json::from_str::<Value>(&wrapped).is_err(),
            "too deep in a delivery"
        );
        assert!(strict(too_deep.as_bytes()).is_err());
        let at_bound = format!(r#"{{"ciphertext": "c", "a": {}}}"#, nested(MAX_DEPTH - 1));
        assert!(strict(at_bound.as_bytes()).is_ok());
        let wrapped = format!(r#"{{"attachments": [{{"data": {{"json": {at_bound}}}}}]}}"#);
        assert!(serde_json::from_str::<Value>(&wrapped).is_ok());
    }

    #[test]
    fn a_tree_read_is_within_depth_as_strict_says() {
        for depth in [1, 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 100] {
            let text = nested(depth);
            let tree: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(within_depth(&tree), strict(text.as_bytes()).is_ok(), "{depth}");
            let member = format!(r#"{{"ciphertext": "c", "a": {}}}"#, nested(depth - 1));
            assert_eq!(
                strict(member.as_bytes()).is_ok(),
                strict_members(member.as_bytes(), &["ciphertext"]).is_ok(),
                "{depth}"
            );
        }
    }

    /// The one pass over a forward's `msg`: which names are members of the object itself,
    /// unescaped as a typed read compares them, and nothing nested counts.
    #[test]
    fn the_members_of_an_object_are_found_in_the_strict_pass() {
        let names = &["ciphertext", "protected"];
        let found = |text: &str| strict_members(text.as_bytes(), names).unwrap();
        assert_eq!(found(r#"{"protected": "p", "iv": "i", "ciphertext": "c"}"#), Some(0b11));
        assert_eq!(found(r#"{"cipher\u0074ext": "c"}"#), Some(0b01));
        assert_eq!(found(r#"{"protected": {"ciphertext": "c"}}"#), Some(0b10));
        assert_eq!(found(r#"{"a": {"ciphertext": "c"}, "b": [{"protected": 1}]}"#), Some(0));
        assert_eq!(found("{}"), Some(0));
        assert_eq!(found(r#"{"ciphertext": null, "protected": "p"}"#), Some(0b10));
        for not_object in [r#""{\"ciphertext\": 1}""#, "[{\"ciphertext\": 1}]", "1", "null", "true"] {
            assert_eq!(found(not_object), None, "{not_object}");
        }
        let twice = strict_members(br#"{"ciphertext": "a", "iv": "", "ciphertext": "b"}"#, names);
        assert!(twice.unwrap_err().to_string().contains("duplicate field `ciphertext`"));
        let twice = strict_members(br#"{"ciphertext": null, "ciphertext": "b"}"#, names);
        assert!(twice.is_err());
    }

    #[test]
    fn a_value_within_its_budget_is_read_and_a_larger_one_is_not() {
        let zeros = format!("{{\"a\": [{}0]}}", "0,".repeat(99));
        assert_eq!(
            value_within(zeros.as_bytes(), 102).unwrap()["a"]
                .as_array()
                .unwrap()
                .len(),
            100
        );
        assert_eq!(value_within(zeros.as_bytes(), 101), None);
        assert_eq!(value_within(b"\"s\"", 1), Some(json!("s")));
        assert_eq!(value_within(b"{", 10), None);
    }
}
