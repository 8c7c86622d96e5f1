//! What a WebSocket wrote without an acknowledgement to wait for (implicit pickup's raw
//! messages, a pickup 1.0 batch) is removed once the wallet's end answered a ping sent after
//! it: frames arrive in order, and a client answers a ping as it reads it, so the pong proves
//! the wallet's WebSocket read everything written before that ping. Until then the messages
//! stay leased: a socket that is gone (half-open after a network change, say) gives them back
//! when it ends, or their lease runs out, instead of swallowing them.
//!
//! One ping at a time is on its way: what is written meanwhile waits for the next, sent when
//! the pong comes. The pings are the session's to send; this is the bookkeeping alone.
//!
//! What is written and not yet confirmed is bounded ([`Confirming::full`]): past the bound
//! the session leases nothing more until a pong comes. Unbounded, a backlog was written at
//! once, and on a slow link the wallet could not read it all before its leases ran out: the
//! node wrote it again, and closed the socket when the pong took longer than its patience.

use std::time::Instant;

/// A confirming ping's payload: this prefix and the ping's number (the heartbeat's is empty).
const PREFIX: &[u8; 4] = b"mrcf";

/// The ping payload for number `seq`.
pub(super) type Payload = [u8; 12];

/// Messages written for one connection.
pub(super) type Written = (String, Vec<i64>);

/// Written and not yet confirmed, at most (either bound): about what a mobile link carries in a
/// few seconds, well within a lease.
const MAX_UNCONFIRMED_MESSAGES: usize = 1_000;
const MAX_UNCONFIRMED_BYTES: usize = 1 << 20;

#[derive(Default)]
pub(super) struct Confirming {
    /// The last ping's number.
    seq: u64,
    /// The ping on its way: its number, when it was sent, and what its pong confirms.
    awaiting: Option<(u64, Instant, Round)>,
    /// Written since that ping was sent: the next ping confirms them.
    next: Round,
}

/// What one ping confirms.
#[derive(Default)]
struct Round {
    written: Vec<Written>,
    messages: usize,
    bytes: usize,
}

impl Confirming {
    /// `ids` of `conn`, `bytes` in all, were written to the socket. Returns the ping to send
    /// now, when none is on its way (else the next one, sent at its pong, confirms them).
    pub(super) fn written(&mut self, conn: &str, ids: Vec<i64>, bytes: usize, now: Instant) -> Option<Payload> {
        if ids.is_empty() {
            return None;
        }
        self.next.messages += ids.len();
        self.next.bytes += bytes;
        match self.next.written.last_mut() {
            Some((c, held)) if c == conn => held.extend(ids),
            _ => self.next.written.push((conn.to_owned(), ids)),
        }
        if self.awaiting.is_some() {
            return None;
        }
        Some(self.send_next(now))
    }

    /// A pong came with `payload`. Returns what it confirms (empty for a heartbeat's pong or
    /// one that is not the awaited ping's) and the next ping to send, if anything waits for one.
    pub(super) fn pong(&mut self, payload: &[u8], now: Instant) -> (Vec<Written>, Option<Payload>) {
        let Some(seq) = parse(payload) else {
            return (Vec::new(), None);
        };
        if self.awaiting.as_ref().map(|(s, _, _)| *s) != Some(seq) {
            return (Vec::new(), None);
        }
        let (_, _, done) = self.awaiting.take().expect("checked above");
        let ping = (!self.next.written.is_empty()).then(|| self.send_next(now));
        (done.written, ping)
    }

    /// Since when a ping has waited for its pong, if one does.
    pub(super) fn waiting_since(&self) -> Option<Instant> {
        self.awaiting.as_ref().map(|(_, at, _)| *at)
    }

    /// The payload of the ping on its way, if one is: the heartbeat sends it again, as a
    /// client may answer only the latest ping it read (RFC 6455 5.5.3).
    pub(super) fn awaited(&self) -> Option<Payload> {
        self.awaiting.as_ref().map(|(seq, _, _)| payload(*seq))
    }

    /// Nothing written waits for a pong.
    pub(super) fn is_empty(&self) -> bool {
        self.awaiting.is_none() && self.next.written.is_empty()
    }

    /// As much is written and unconfirmed as may be: nothing more is leased until a pong.
    pub(super) fn full(&self) -> bool {
        let (mut messages, mut bytes) = (self.next.messages, self.next.bytes);
        if let Some((_, _, r)) = &self.awaiting {
            messages += r.messages;
            bytes += r.bytes;
        }
        messages >= MAX_UNCONFIRMED_MESSAGES || bytes >= MAX_UNCONFIRMED_BYTES
    }

    fn send_next(&mut self, now: Instant) -> Payload {
        self.seq += 1;
        self.awaiting = Some((self.seq, now, std::mem::take(&mut self.next)));
        payload(self.seq)
    }
}

fn payload(seq: u64) -> Payload {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(PREFIX);
    p[4..].copy_from_slice(&seq.to_be_bytes());
    p
}

fn parse(p: &[u8]) -> Option<u64> {
    let rest = p.strip_prefix(PREFIX.as_slice())?;
    Some(u64::from_be_bytes(rest.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_confirms_what_was_written_before_its_ping_and_nothing_after() {
        let now = Instant::now();
        let mut c = Confirming::default();
        let p1 = c
            .written("a", vec![1, 2], 10, now)
            .expect("the first write sends a ping");
        assert_eq!(c.awaited(), Some(p1));
        // Written while that ping is on its way: the next ping's.
        assert_eq!(c.written("a", vec![3], 10, now), None);
        assert_eq!(c.written("b", vec![4], 10, now), None);
        assert_eq!(c.waiting_since(), Some(now));
        // A heartbeat's pong, or a stray one, confirms nothing.
        assert_eq!(c.pong(b"", now), (Vec::new(), None));
        assert_eq!(c.pong(&payload(7), now), (Vec::new(), None));
        let (done, p2) = c.pong(&p1, now);
        assert_eq!(done, vec![("a".to_string(), vec![1, 2])]);
        let p2 = p2.expect("what waits gets its ping");
        // The first ping's pong again: already answered.
        assert_eq!(c.pong(&p1, now), (Vec::new(), None));
        let (done, p3) = c.pong(&p2, now);
        assert_eq!(done, vec![("a".to_string(), vec![3]), ("b".to_string(), vec![4])]);
        assert_eq!(p3, None);
        assert!(c.is_empty());
        assert_eq!(c.waiting_since(), None);
        assert_eq!(c.awaited(), None);
    }

    #[test]
    fn what_is_written_unconfirmed_is_bounded_by_messages_and_by_bytes() {
        let now = Instant::now();
        let mut c = Confirming::default();
        let p = c.written("a", (0..999).collect(), 999, now).unwrap();
        assert!(!c.full());
        c.written("a", vec![999], 1, now);
        assert!(c.full(), "1,000 messages, the ping's and the next one's together");
        let (_, next) = c.pong(&p, now);
        assert!(!c.full(), "999 confirmed");
        let next = next.unwrap();
        c.written("b", vec![1], MAX_UNCONFIRMED_BYTES, now);
        assert!(c.full(), "a mebibyte");
        c.pong(&next, now);
        assert!(c.full(), "not yet confirmed");
    }
}
