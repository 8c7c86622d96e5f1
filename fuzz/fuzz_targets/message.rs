//! Plaintext message parsing: `@type` URIs (both prefixes, versions), ids, threads and
//! `~transport` return routes of v1 messages, and the `type`/`id` of v2 ones, on arbitrary
//! bytes, as `Mediator::handle` reads them after unpacking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailroom::didcomm::message::{self, MessageType};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(t) = MessageType::parse(s) {
            let _ = t.version_numbers();
            let _ = t.is("routing", "forward");
            // A parsed type prints back to a type that parses the same.
            let again = MessageType::parse(&t.to_string()).expect("a printed type parses");
            assert_eq!(again, t);
        }
    }
    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Some(t) = message::message_type(&msg) {
        let _ = t.reply_type("problem-report");
    }
    let _ = message::id(&msg);
    let _ = message::thid(&msg);
    let _ = message::pthid(&msg);
    let _ = message::return_route(&msg);
    let _ = mailroom::protocols::decode_b64_any(msg["data"]["base64"].as_str().unwrap_or_default());
});
