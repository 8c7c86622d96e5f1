//! The records on disk: message ids, the message record layout, dedup and key entries, push
//! windows.

use sled::transaction::TransactionError;

use super::inner::PushWindow;
use super::queue_log::Body;
use super::{corrupt, unavailable, MSG_FORMAT_V1, MSG_FORMAT_V2};
use crate::store::{Connection, MediationState, MessageId, NewMessage, StoreError, StoreResult};

pub(super) fn encode_id(id: MessageId) -> [u8; 8] {
    (id as u64).to_be_bytes()
}

pub(super) fn decode_id(k: &[u8]) -> StoreResult<MessageId> {
    let b: [u8; 8] = k.try_into().map_err(|_| corrupt("message id"))?;
    Ok(u64::from_be_bytes(b) as i64)
}

fn push_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A message as its queue log record body ([`encode_msg_into`]).
pub(super) struct MsgBody<'a>(pub(super) &'a NewMessage);

impl Body for MsgBody<'_> {
    fn len_hint(&self) -> usize {
        let m = self.0;
        1 + 16 + 4 + m.connection.len() + m.recipient_key.len() + 33 + m.payload.len()
    }
    fn write_to(&self, out: &mut Vec<u8>) {
        encode_msg_into(out, self.0);
    }
}

/// [`encode_msg_into`] into a buffer of its own (stores written before the queue log, tests).
#[cfg(test)]
pub(super) fn encode_msg(m: &NewMessage) -> Vec<u8> {
    let mut out = Vec::with_capacity(MsgBody(m).len_hint());
    encode_msg_into(&mut out, m);
    out
}

/// `v1 | received_at i64 | len16 conn | conn | len16 rkey | rkey | 0 or 1+key32 | payload`, or
/// with a sender's expiry `v2 | received_at i64 | expires_at i64 | ...` (the rest as v1).
pub(super) fn encode_msg_into(out: &mut Vec<u8>, m: &NewMessage) {
    match m.expires_at_ms {
        None => {
            out.push(MSG_FORMAT_V1);
            out.extend_from_slice(&m.received_at_ms.to_be_bytes());
        }
        Some(e) => {
            out.push(MSG_FORMAT_V2);
            out.extend_from_slice(&m.received_at_ms.to_be_bytes());
            out.extend_from_slice(&e.to_be_bytes());
        }
    }
    push_str16(out, &m.connection);
    push_str16(out, &m.recipient_key);
    match &m.dedup_key {
        Some(k) => {
            out.push(1);
            out.extend_from_slice(k);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&m.payload);
}

pub(super) struct MsgRef<'a> {
    pub(super) received_at_ms: i64,
    pub(super) expires_at_ms: Option<i64>,
    pub(super) connection: &'a str,
    pub(super) recipient_key: &'a str,
    pub(super) dedup_key: Option<[u8; 32]>,
    pub(super) payload: &'a [u8],
}

pub(super) fn decode_msg(v: &[u8]) -> StoreResult<MsgRef<'_>> {
    fn take<'a>(v: &mut &'a [u8], n: usize) -> StoreResult<&'a [u8]> {
        if v.len() < n {
            return Err(corrupt("message truncated"));
        }
        let (a, b) = v.split_at(n);
        *v = b;
        Ok(a)
    }
    fn take_str<'a>(v: &mut &'a [u8]) -> StoreResult<&'a str> {
        let n = u16::from_be_bytes(take(v, 2)?.try_into().expect("2 bytes")) as usize;
        std::str::from_utf8(take(v, n)?).map_err(|_| corrupt("message string"))
    }
    let mut v = v;
    let format = take(&mut v, 1)?[0];
    if format != MSG_FORMAT_V1 && format != MSG_FORMAT_V2 {
        return Err(corrupt("unknown message format"));
    }
    let received_at_ms = i64::from_be_bytes(take(&mut v, 8)?.try_into().expect("8 bytes"));
    let expires_at_ms = if format == MSG_FORMAT_V2 {
        Some(i64::from_be_bytes(take(&mut v, 8)?.try_into().expect("8 bytes")))
    } else {
        None
    };
    let connection = take_str(&mut v)?;
    let recipient_key = take_str(&mut v)?;
    let dedup_key = match take(&mut v, 1)?[0] {
        0 => None,
        1 => Some(take(&mut v, 32)?.try_into().expect("32 bytes")),
        _ => return Err(corrupt("dedup flag")),
    };
    Ok(MsgRef {
        received_at_ms,
        expires_at_ms,
        connection,
        recipient_key,
        dedup_key,
        payload: v,
    })
}

/// How long the head of a message record is (all of [`encode_msg_into`] but the payload), as
/// far as `v`, the record's first bytes, tells: at most `v.len()` when `v` holds the whole head;
/// more when it does not, and then at least what it takes to learn more (the caller reads that
/// many bytes and asks again). A record of an unknown format is `Corrupt`.
pub(super) fn msg_head_len(v: &[u8]) -> StoreResult<usize> {
    let mut at = match v.first() {
        None => return Ok(1),
        Some(&MSG_FORMAT_V1) => 1 + 8,
        Some(&MSG_FORMAT_V2) => 1 + 8 + 8,
        Some(_) => return Err(corrupt("unknown message format")),
    };
    // The connection and the recipient key, each `len16 | bytes`.
    for _ in 0..2 {
        let Some(n) = v.get(at..at + 2) else {
            return Ok(at + 2);
        };
        at += 2 + usize::from(u16::from_be_bytes([n[0], n[1]]));
    }
    // The dedup flag, and the key when it is set.
    Ok(match v.get(at) {
        None => at + 1 + 32,
        Some(1) => at + 1 + 32,
        Some(_) => at + 1,
    })
}

pub(super) fn dedup_tree_key(conn: &str, key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len() + 32);
    push_str16(&mut out, conn);
    out.extend_from_slice(key);
    out
}

pub(super) fn decode_dedup_key(k: &[u8]) -> StoreResult<(String, [u8; 32])> {
    if k.len() < 2 {
        return Err(corrupt("dedup key"));
    }
    let n = u16::from_be_bytes([k[0], k[1]]) as usize;
    if k.len() != 2 + n + 32 {
        return Err(corrupt("dedup key length"));
    }
    let conn = std::str::from_utf8(&k[2..2 + n]).map_err(|_| corrupt("dedup conn"))?;
    let key: [u8; 32] = k[2 + n..].try_into().expect("length checked");
    Ok((conn.to_owned(), key))
}

/// Queue log kinds: a queued message (body: [`encode_msg`]), and the dedup record of a message
/// that left the queue inside its window (body: [`dedup_record`]), both keyed by message id.
pub(super) const KIND_MSG: u8 = 1;
pub(super) const KIND_DEDUP: u8 = 2;

/// A dedup record's body in the queue log: `dedup_tree_key(conn, key) | dedup_value(id, at)`.
pub(super) fn dedup_record(conn: &str, key: &[u8; 32], id: MessageId, at: i64) -> Vec<u8> {
    let mut out = dedup_tree_key(conn, key);
    out.extend_from_slice(&dedup_value(id, at));
    out
}

/// (connection, dedup key, message id, received at) of a [`dedup_record`].
pub(super) fn decode_dedup_record(v: &[u8]) -> StoreResult<(String, [u8; 32], MessageId, i64)> {
    let split = v.len().checked_sub(16).ok_or_else(|| corrupt("dedup record"))?;
    let (conn, key) = decode_dedup_key(&v[..split])?;
    let id = i64::from_be_bytes(v[split..split + 8].try_into().expect("8 bytes"));
    let at = i64::from_be_bytes(v[split + 8..].try_into().expect("8 bytes"));
    Ok((conn, key, id, at))
}

pub(super) fn dedup_value(id: MessageId, at: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&at.to_be_bytes());
    v
}

/// `len16(a) a b`: keys of multi-valued indexes (a -> several b), scanned by `len16(a) a`.
pub(super) fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + a.len() + b.len());
    push_str16(&mut out, a);
    out.extend_from_slice(b.as_bytes());
    out
}

/// The connection written last among those a multi-valued index lists under `key`.
pub(super) fn latest_of(tree: &sled::Tree, key: &str) -> StoreResult<Option<String>> {
    let prefix = conn_prefix(key);
    let mut best: Option<(u64, String)> = None;
    for kv in tree.scan_prefix(&prefix) {
        let (k, v) = kv.map_err(unavailable)?;
        let seq = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| corrupt("index seq"))?);
        if best.as_ref().map_or(true, |(s, _)| seq > *s) {
            let id = std::str::from_utf8(&k[prefix.len()..]).map_err(|_| corrupt("index id"))?;
            best = Some((seq, id.to_owned()));
        }
    }
    Ok(best.map(|(_, id)| id))
}

pub(super) fn conn_key_entry(conn: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len() + key.len());
    push_str16(&mut out, conn);
    out.extend_from_slice(key.as_bytes());
    out
}

pub(super) fn conn_prefix(conn: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + conn.len());
    push_str16(&mut out, conn);
    out
}

pub(super) fn decode_conn(v: &[u8]) -> StoreResult<Connection> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("connection: {e}")))
}

/// The mediation state of a stored connection, without decoding the rest of it.
pub(super) fn decode_mediation(v: &[u8]) -> StoreResult<MediationState> {
    #[derive(serde::Deserialize)]
    struct Mediation {
        #[serde(default)]
        mediation: MediationState,
    }
    serde_json::from_slice::<Mediation>(v)
        .map(|m| m.mediation)
        .map_err(|e| StoreError::Corrupt(format!("connection: {e}")))
}

pub(super) fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => unavailable(e),
    }
}

/// Bytes of a push window record: `last_push i64, flags u8, trailing_due i64, claimed_until
/// i64, claim_token i64, push_id i64` (BE; flag 1: a trailing push is due, flag 2: a claim is
/// held; the value of an absent one is 0). A record of [`PUSH_WINDOW_LEN_V1`] bytes (no
/// `push_id`, written before it) reads as the claim's token.
const PUSH_WINDOW_LEN: usize = 41;
const PUSH_WINDOW_LEN_V1: usize = 33;
const PUSH_TRAILING: u8 = 1;
const PUSH_CLAIMED: u8 = 2;

pub(super) fn encode_push_window(w: &PushWindow) -> [u8; PUSH_WINDOW_LEN] {
    let mut out = [0u8; PUSH_WINDOW_LEN];
    let flags = w.trailing_due_ms.map_or(0, |_| PUSH_TRAILING) | w.claim.map_or(0, |_| PUSH_CLAIMED);
    let (until, token) = w.claim.unwrap_or((0, 0));
    out[..8].copy_from_slice(&w.last_push_ms.to_be_bytes());
    out[8] = flags;
    out[9..17].copy_from_slice(&w.trailing_due_ms.unwrap_or(0).to_be_bytes());
    out[17..25].copy_from_slice(&until.to_be_bytes());
    out[25..33].copy_from_slice(&token.to_be_bytes());
    out[33..].copy_from_slice(&w.push_id.to_be_bytes());
    out
}

pub(super) fn decode_push_window(v: &[u8]) -> StoreResult<PushWindow> {
    if v.len() != PUSH_WINDOW_LEN && v.len() != PUSH_WINDOW_LEN_V1 {
        return Err(corrupt("push window"));
    }
    let at = |i: usize| i64::from_be_bytes(v[i..i + 8].try_into().expect("length checked"));
    let flags = v[8];
    let claim = (flags & PUSH_CLAIMED != 0).then(|| (at(17), at(25)));
    Ok(PushWindow {
        last_push_ms: at(0),
        trailing_due_ms: (flags & PUSH_TRAILING != 0).then(|| at(9)),
        claim,
        push_id: if v.len() == PUSH_WINDOW_LEN {
            at(33)
        } else {
            claim.map_or(0, |(_, token)| token)
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window written before records named their push (33 bytes) reads back with its claim's
    /// token as its push; a new record round-trips.
    #[test]
    fn push_window_records_old_and_new() {
        let w = PushWindow {
            last_push_ms: 1_000,
            trailing_due_ms: Some(2_000),
            claim: Some((3_000, 77)),
            push_id: 55,
        };
        let new = encode_push_window(&w);
        assert_eq!(decode_push_window(&new).unwrap(), w);
        let old = &new[..PUSH_WINDOW_LEN_V1];
        assert_eq!(decode_push_window(old).unwrap(), PushWindow { push_id: 77, ..w });
        let unclaimed = PushWindow { claim: None, ..w };
        let old = encode_push_window(&unclaimed);
        assert_eq!(decode_push_window(&old[..PUSH_WINDOW_LEN_V1]).unwrap().push_id, 0);
        assert!(decode_push_window(&new[..40]).is_err());
    }
}
