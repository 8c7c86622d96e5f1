//! When to push, as pure functions of (state, event, now): no I/O, no clock of its own.
//!
//! - [`Coalescer`]: per wallet, one push at once and at most one trailing push per window;
//!   an event inside the window is folded into the trailing push, so the last message is
//!   never left without a wake-up.
//! - [`retry_delay`]: exponential backoff with full jitter, honouring `Retry-After`, bounded.

use std::collections::{BTreeSet, HashMap};

/// What to do with one queued event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Push now.
    Now,
    /// Folded into the trailing push due at this time (scheduled now or earlier).
    Trailing { due_ms: i64, newly_scheduled: bool },
}

#[derive(Clone, Copy, Debug, Default)]
struct ConnState {
    last_push_ms: i64,
    trailing_due_ms: Option<i64>,
}

/// Per-connection coalescing. `window_ms` 0 pushes every event.
#[derive(Debug)]
pub struct Coalescer {
    window_ms: i64,
    conns: HashMap<String, ConnState>,
    /// (due, conn) of every scheduled trailing push.
    due: BTreeSet<(i64, String)>,
}

impl Coalescer {
    pub fn new(window_ms: i64) -> Coalescer {
        Coalescer {
            window_ms: window_ms.max(0),
            conns: HashMap::new(),
            due: BTreeSet::new(),
        }
    }

    /// A message was queued for `conn` at `now`.
    pub fn on_event(&mut self, conn: &str, now: i64) -> Decision {
        match self.conns.get_mut(conn) {
            Some(st) if now < st.last_push_ms + self.window_ms => {
                if let Some(due) = st.trailing_due_ms {
                    return Decision::Trailing {
                        due_ms: due,
                        newly_scheduled: false,
                    };
                }
                let due = st.last_push_ms + self.window_ms;
                st.trailing_due_ms = Some(due);
                self.due.insert((due, conn.to_string()));
                Decision::Trailing {
                    due_ms: due,
                    newly_scheduled: true,
                }
            }
            Some(st) => {
                // Window over. A trailing push still pending would fire now anyway: this is it.
                if let Some(due) = st.trailing_due_ms.take() {
                    self.due.remove(&(due, conn.to_string()));
                }
                st.last_push_ms = now;
                Decision::Now
            }
            None => {
                self.conns.insert(
                    conn.to_string(),
                    ConnState {
                        last_push_ms: now,
                        trailing_due_ms: None,
                    },
                );
                Decision::Now
            }
        }
    }

    /// Trailing pushes due at `now`, each recorded as pushed at `now` (so a later event
    /// inside the new window is folded again).
    pub fn take_due(&mut self, now: i64) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((due, conn)) = self.due.first().cloned() {
            if due > now {
                break;
            }
            self.due.pop_first();
            if let Some(st) = self.conns.get_mut(&conn) {
                st.trailing_due_ms = None;
                st.last_push_ms = now;
            }
            out.push(conn);
        }
        out
    }

    /// When the next trailing push is due.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(d, _)| *d)
    }

    /// Forgets wallets whose window is over and that have nothing scheduled (bounded memory).
    pub fn prune(&mut self, now: i64) {
        let w = self.window_ms;
        self.conns
            .retain(|_, st| st.trailing_due_ms.is_some() || now < st.last_push_ms + w);
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// The wait before try `attempt + 1` (`attempt` >= 1 tries done): full jitter over
/// `base * 2^(attempt-1)` capped at `max`, and never less than `Retry-After`. `None`: give up
/// (out of tries, or the provider asks for a wait longer than `max`). `jitter` is in [0, 1).
pub fn retry_delay(
    attempt: u32,
    max_attempts: u32,
    retry_after_ms: Option<u64>,
    base_ms: u64,
    max_ms: u64,
    jitter: f64,
) -> Option<u64> {
    if attempt >= max_attempts {
        return None;
    }
    let exp = base_ms
        .saturating_mul(1u64 << (attempt.saturating_sub(1)).min(30))
        .min(max_ms);
    // Half fixed, half random: retries of many nodes spread out, none comes back at once.
    let jittered = exp / 2 + ((exp / 2) as f64 * jitter.clamp(0.0, 1.0)) as u64;
    match retry_after_ms {
        Some(ra) if ra > max_ms => None,
        Some(ra) => Some(ra.max(jittered)),
        None => Some(jittered),
    }
}

/// Parses `Retry-After` as delay-seconds (the form FCM and APNs stand-ins send) or an HTTP
/// date, relative to `now` (Unix seconds).
pub fn parse_retry_after(v: &str, now_unix_s: u64) -> Option<u64> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(s.saturating_mul(1000));
    }
    let fmt = time::format_description::well_known::Rfc2822;
    let t = time::OffsetDateTime::parse(v, &fmt).ok()?;
    let at = t.unix_timestamp().max(0) as u64;
    Some(at.saturating_sub(now_unix_s).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_now_then_one_trailing_per_window() {
        let mut c = Coalescer::new(1000);
        assert_eq!(c.on_event("a", 0), Decision::Now);
        // A burst inside the window: one trailing push at the window's end.
        assert_eq!(
            c.on_event("a", 10),
            Decision::Trailing {
                due_ms: 1000,
                newly_scheduled: true
            }
        );
        for t in 11..100 {
            assert_eq!(
                c.on_event("a", t),
                Decision::Trailing {
                    due_ms: 1000,
                    newly_scheduled: false
                }
            );
        }
        // Another wallet is independent.
        assert_eq!(c.on_event("b", 50), Decision::Now);
        assert_eq!(c.next_due(), Some(1000));
        assert!(c.take_due(999).is_empty());
        assert_eq!(c.take_due(1000), vec!["a".to_string()]);
        assert_eq!(c.next_due(), None);
        // After the trailing push a new window starts at its time.
        assert_eq!(
            c.on_event("a", 1500),
            Decision::Trailing {
                due_ms: 2000,
                newly_scheduled: true
            }
        );
        assert_eq!(c.take_due(2100), vec!["a".to_string()]);
        // Quiet for a window: the next event pushes at once.
        assert_eq!(c.on_event("a", 3200), Decision::Now);
    }

    #[test]
    fn nothing_left_without_a_wake_up_and_state_is_bounded() {
        let mut c = Coalescer::new(1000);
        let mut pushes = 0;
        let mut t = 0;
        // 100 events 7 ms apart: pushes at 0, then one per window at most.
        for _ in 0..100 {
            pushes += c.take_due(t).len();
            if c.on_event("w", t) == Decision::Now {
                pushes += 1;
            }
            t += 7;
        }
        // The last event has a trailing push scheduled.
        assert!(c.next_due().is_some());
        pushes += c.take_due(t + 1000).len();
        assert_eq!(pushes, 1 + 1, "700 ms of events fit one window: one now, one trailing");
        c.prune(t + 5000);
        assert!(c.is_empty());
        let mut z = Coalescer::new(0);
        assert_eq!(z.on_event("x", 5), Decision::Now);
        assert_eq!(z.on_event("x", 5), Decision::Now);
    }

    #[test]
    fn backoff_is_bounded_jittered_and_honours_retry_after() {
        assert_eq!(retry_delay(1, 5, None, 500, 60_000, 0.0), Some(250));
        assert_eq!(retry_delay(1, 5, None, 500, 60_000, 0.999), Some(499));
        assert_eq!(retry_delay(3, 5, None, 500, 60_000, 0.0), Some(1000));
        assert_eq!(retry_delay(30, 40, None, 500, 60_000, 0.0), Some(30_000));
        assert_eq!(retry_delay(5, 5, None, 500, 60_000, 0.5), None);
        assert_eq!(retry_delay(1, 5, Some(3000), 500, 60_000, 0.5), Some(3000));
        assert_eq!(retry_delay(1, 5, Some(10), 500, 60_000, 0.0), Some(250));
        assert_eq!(retry_delay(1, 5, Some(120_000), 500, 60_000, 0.0), None);
        assert_eq!(parse_retry_after("2", 0), Some(2000));
        assert_eq!(parse_retry_after(" 0 ", 0), Some(0));
        assert_eq!(
            parse_retry_after("Tue, 15 Nov 1994 08:12:31 GMT", 784_887_141),
            Some(10_000)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }
}
