//! An authenticated message acts once.
//!
//! An authcrypted (or, in DIDComm v2, signed) message proves who wrote it, not when: whoever
//! holds a copy (a capture, a log) could send it again, and it would act again as its sender's:
//! bind the socket it came on to the sender's connection and take its queue, empty a pickup 1.0
//! batch, change its keylist back. So every authenticated message leaves a record of its sender
//! and id in the store ([`Store::first_sight`](crate::store::Store::first_sight)), shared by
//! every node, and a second copy within `limits.replay_window_secs` is refused (`409
//! replayed`) before it acts on anything.
//!
//! - The record is named by a digest of the DIDComm version, the sender (v1: its verkey; v2: its
//!   DID) and the message id (`@id`, `id`); a message without one is named by its whole
//!   plaintext.
//! - DIDComm v2 messages that carry `created_time` (seconds) are refused when older than the
//!   window or further ahead of this node's clock than the window, so a copy is refused after
//!   its record is gone too: it runs out `window` after the later of now and `created_time`.
//!   A v1 message has no time: a copy older than the window acts again.
//! - A message that was refused (it acted on nothing: a bad message, the store unavailable, a
//!   full queue) has its record forgotten: its retry is handled, or refused for its own reason
//!   again, not as a replay. Only a message that acted keeps its record, so a copy acts at
//!   most once either way.
//! - Anonymous messages leave no record: they act on no connection (a forward has its own
//!   dedup window). Nor do messages of a sender with no connection that cannot start one (a
//!   ping, a problem report): they act on none, and anyone could make records with them. A
//!   copy of an authenticated forward is queued as an anonymous forward is, and binds nothing:
//!   within the dedup window the store finds it a duplicate (202), so its sender's retry is
//!   not refused; after it, it is queued again, as any copy of a forward.

use super::{now_ms, HandleError, Mediator, Outcome};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// DIDComm v1 or v2: the two never share a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Longest message id that names a record; a longer one is named with the plaintext.
use crate::didcomm::message::MAX_ID_LEN;

/// The record of one message ([`first_sight`]), forgotten again by [`settle`] when the
/// message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sight {
    digest: [u8; 32],
    until_ms: i64,
}

/// The digest naming a message's record: version, sender, then its id or, without a usable
/// one, its plaintext (each part length-prefixed, so no two inputs share a digest).
pub fn digest(version: Version, sender: &str, id: Option<&str>, plaintext: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mailroom/sight/1");
    h.update([match version {
        Version::V1 => 1u8,
        Version::V2 => 2,
    }]);
    let mut part = |tag: u8, bytes: &[u8]| {
        h.update([tag]);
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    part(b's', sender.as_bytes());
    match id.filter(|i| !i.is_empty() && i.len() <= MAX_ID_LEN) {
        Some(i) => part(b'i', i.as_bytes()),
        None => part(b'p', plaintext),
    }
    h.finalize().into()
}

/// Why a v2 message is refused by its times, before any record is read; `None` when they
/// allow it. `created_time` and `expires_time` are seconds since the epoch; a `created_time`
/// that is not an integer count of seconds up to [`MAX_SECONDS`] (a string, milliseconds) is
/// not read, and leaves the message to its record alone.
pub fn refused_by_time(msg: &Value, now_ms: i64, window_ms: i64) -> Option<String> {
    if let Some(exp) = seconds(&msg["expires_time"]) {
        if exp.saturating_mul(1000) <= now_ms {
            return Some(format!("message expired at {exp} (expires_time, seconds)"));
        }
    }
    let created = created_ms(msg, window_ms)?;
    // At the edge too: a record made at `created_time` runs out then, and the copy must be
    // refused by one or the other.
    if created <= now_ms.saturating_sub(window_ms) {
        return Some(format!(
            "created_time {} is older than the replay window ({} s): a message is accepted once, within it",
            created / 1000,
            window_ms / 1000
        ));
    }
    if created > now_ms.saturating_add(window_ms) {
        return Some(format!(
            "created_time {} is more than the replay window ({} s) ahead of this mediator's clock",
            created / 1000,
            window_ms / 1000
        ));
    }
    None
}

/// Seconds since the epoch past which a time field is not read as seconds (year 5138): a
/// sender writing milliseconds there is not refused for it.
pub const MAX_SECONDS: i64 = 100_000_000_000;

fn seconds(v: &Value) -> Option<i64> {
    v.as_i64().filter(|s| (0..MAX_SECONDS).contains(s))
}

/// `created_time` in ms, when the replay window is on and the field is read.
fn created_ms(msg: &Value, window_ms: i64) -> Option<i64> {
    if window_ms <= 0 {
        return None;
    }
    seconds(&msg["created_time"]).map(|s| s * 1000)
}

/// Records the sight of an authenticated message of `sender`; `Err(Replayed)` when the store
/// holds one already (cluster-wide). `None` when the replay window is off. `msg` is the
/// plaintext's JSON (its id; for v2, its `created_time`).
pub async fn first_sight(
    m: &Mediator,
    version: Version,
    sender: &str,
    msg: &Value,
    plaintext: &[u8],
) -> Result<Option<Sight>, HandleError> {
    let window = m.replay_window_ms;
    if window <= 0 {
        return Ok(None);
    }
    let id_field = match version {
        Version::V1 => "@id",
        Version::V2 => "id",
    };
    let id = msg[id_field].as_str();
    let now = now_ms();
    let from = match version {
        Version::V2 => created_ms(msg, window).map_or(now, |c| c.max(now)),
        Version::V1 => now,
    };
    let sight = Sight {
        digest: digest(version, sender, id, plaintext),
        until_ms: from.saturating_add(window),
    };
    let first = match m.store.first_sight(&sight.digest, now, sight.until_ms).await {
        Ok(first) => first,
        Err(e) => {
            // The write may have landed all the same (an answer lost at its deadline): the
            // sender's retry must not find it.
            let _ = m.store.forget_sight(&sight.digest, sight.until_ms).await;
            return Err(e.into());
        }
    };
    if first {
        Ok(Some(sight))
    } else {
        Err(HandleError::Replayed(
            id.map(|i| i.chars().take(80).collect())
                .unwrap_or_else(|| "(without id)".into()),
        ))
    }
}

/// After handling: a message that was refused (it acted on nothing) has its record forgotten.
/// Its sender's retry is then handled (after a store outage, a full queue) or refused for its
/// own reason again, not as a replay; a copy acts at most once either way, as only a message
/// that acted keeps its record.
pub async fn settle(m: &Mediator, sight: Option<Sight>, result: &Result<Outcome, HandleError>) {
    let Some(s) = sight else { return };
    if result.is_err() {
        if let Err(e) = m.store.forget_sight(&s.digest, s.until_ms).await {
            // The sender's retry is then refused as a replay until the record runs out.
            tracing::warn!("a refused message's replay record not forgotten: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;

    #[test]
    fn digests_name_version_sender_and_id() {
        let d = digest(Version::V1, "alice", Some("m1"), b"x");
        assert_eq!(d, digest(Version::V1, "alice", Some("m1"), b"other plaintext"));
        assert_ne!(d, digest(Version::V2, "alice", Some("m1"), b"x"));
        assert_ne!(d, digest(Version::V1, "bob", Some("m1"), b"x"));
        assert_ne!(d, digest(Version::V1, "alice", Some("m2"), b"x"));
        // No id (or an unusable one): the plaintext names it.
        assert_ne!(
            digest(Version::V1, "alice", None, b"x"),
            digest(Version::V1, "alice", None, b"y")
        );
        assert_eq!(
            digest(Version::V1, "alice", Some(""), b"x"),
            digest(Version::V1, "alice", None, b"x")
        );
        let long = "i".repeat(MAX_ID_LEN + 1);
        assert_ne!(
            digest(Version::V1, "alice", Some(&long), b"x"),
            digest(Version::V1, "alice", Some(&long), b"y")
        );
        // Length prefixes: moving a byte from the sender to the id changes the digest.
        assert_ne!(
            digest(Version::V1, "ab", Some("c"), b""),
            digest(Version::V1, "a", Some("bc"), b"")
        );
    }

    #[test]
    fn v2_times_bound_the_window() {
        let at = |secs: i64| json!({ "created_time": secs });
        let now_s = NOW / 1000;
        assert_eq!(refused_by_time(&json!({}), NOW, DAY), None);
        assert_eq!(refused_by_time(&at(now_s), NOW, DAY), None);
        assert_eq!(refused_by_time(&at(now_s - 86_399), NOW, DAY), None);
        assert!(
            refused_by_time(&at(now_s - 86_400), NOW, DAY)
                .unwrap()
                .contains("older than the replay window"),
            "the window's edge: the record made at created_time runs out now"
        );
        assert_eq!(refused_by_time(&at(now_s + 86_400), NOW, DAY), None);
        assert!(refused_by_time(&at(now_s + 86_401), NOW, DAY)
            .unwrap()
            .contains("ahead"));
        // Not seconds: not read.
        assert_eq!(refused_by_time(&at(NOW), NOW, DAY), None, "milliseconds");
        assert_eq!(
            refused_by_time(&json!({"created_time": "2026-01-01T00:00:00Z"}), NOW, DAY),
            None
        );
        assert_eq!(refused_by_time(&at(-5), NOW, DAY), None);
        // The window off: created_time is not read; expires_time still is.
        assert_eq!(refused_by_time(&at(1), NOW, 0), None);
        let expired = json!({ "expires_time": now_s });
        assert!(refused_by_time(&expired, NOW, 0).unwrap().contains("expired"));
        assert_eq!(refused_by_time(&json!({ "expires_time": now_s + 1 }), NOW, DAY), None);
    }
}

#[cfg(test)]
mod handled {
    use super::super::{granted_connection_for_test, mediator_for_test, TransportKind};
    use crate::didcomm::envelope;
    use crate::didcomm::keys::KeyPair;
    use serde_json::json;

    /// `msg` authcrypted from `from` for the mediator key `to`.
    fn authcrypt(msg: &serde_json::Value, to: &str, from: &KeyPair) -> Vec<u8> {
        envelope::pack(&serde_json::to_vec(msg).unwrap(), &[to.to_string()], Some(from)).unwrap()
    }

    /// A wallet's authcrypted forward, and its copy, on a socket: the copy is queued as an
    /// anonymous forward is (a duplicate here) and names no connection, so no socket is bound
    /// to the wallet's; the wallet's own message names its connection.
    #[actix_rt::test]
    async fn a_copy_of_an_authenticated_forward_binds_nothing() {
        let (m, _) = mediator_for_test().await;
        let wallet = KeyPair::generate();
        let conn = granted_connection_for_test("w", "ours", &wallet.verkey());
        m.store.put_connection(&conn).await.unwrap();
        let recipient = KeyPair::generate().verkey();
        m.store
            .update_keys("c1", std::slice::from_ref(&recipient), &[])
            .await
            .unwrap();
        let inner: serde_json::Value =
            serde_json::from_slice(&envelope::pack(b"{}", std::slice::from_ref(&recipient), None).unwrap()).unwrap();
        let forward = json!({
            "@type": "https://didcomm.org/routing/1.0/forward",
            "@id": crate::didcomm::message::new_id(),
            "to": recipient,
            "msg": inner,
            "~transport": { "return_route": "all" },
        });
        let env = authcrypt(&forward, &m.keys.routing.verkey(), &wallet);
        let first = m.handle(&env, TransportKind::WebSocket, "n1/ws/1/1").await.unwrap();
        assert_eq!(first.connection.map(|c| c.id), Some("w".to_string()));
        assert_eq!(
            first.forward,
            Some(super::super::ForwardResult::Queued { duplicate: false })
        );
        let copy = m.handle(&env, TransportKind::WebSocket, "n1/ws/2/1").await.unwrap();
        assert!(copy.connection.is_none(), "a copy names no connection to bind");
        assert_eq!(
            copy.forward,
            Some(super::super::ForwardResult::Queued { duplicate: true })
        );
        assert_eq!(m.store.total_queued().await.unwrap(), 1);
    }

    /// A sender with no connection leaves no record with a message that cannot start one: it
    /// acts on nothing, and anyone could fill the store with such records.
    #[actix_rt::test]
    async fn only_messages_that_can_act_on_a_connection_are_recorded() {
        let (m, _) = mediator_for_test().await;
        let stranger = KeyPair::generate();
        // A ping response is taken from anyone (and acts on nothing).
        let ping = json!({
            "@type": "https://didcomm.org/trust_ping/1.0/ping_response",
            "@id": "one-response",
            "~thread": { "thid": "a-ping" },
        });
        let env = authcrypt(&ping, &m.keys.did_key.verkey(), &stranger);
        for _ in 0..2 {
            let out = m.handle(&env, TransportKind::Http, "n1/http").await;
            assert!(out.is_ok(), "taken, and no record refuses it: {:?}", out.err());
        }
    }
}
