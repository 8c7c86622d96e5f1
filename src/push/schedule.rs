//! When to push, as pure functions of (state, event, now): no I/O, no clock of its own.
//!
//! - [`window`]: per wallet, one push at once and at most one trailing push per window; an
//!   event inside the window is folded into the trailing push, so the last message is never
//!   left without a wake-up. The rule is [`crate::store::push_window_step`]; the state lives in
//!   the store so that every node shares it.
//! - [`retry_delay`]: exponential backoff with full jitter, honouring `Retry-After`, bounded.

pub use crate::store::push_window_step as window;

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

    /// Replays events at the given times through the window rule; returns the pushes (times)
    /// with trailing ones taken when due, as the nodes' poll does.
    fn replay(events: &[i64], window_ms: i64) -> Vec<i64> {
        let mut st = None;
        let mut pushes = Vec::new();
        for &t in events {
            if let Some((_, Some(due))) = st {
                if due <= t {
                    pushes.push(due);
                    st = Some((due, None));
                }
            }
            let (next, slot) = window(st, t, window_ms);
            st = Some(next);
            if slot.is_none() {
                pushes.push(t);
            }
        }
        if let Some((_, Some(due))) = st {
            pushes.push(due);
        }
        pushes
    }

    #[test]
    fn one_now_then_one_trailing_per_window() {
        assert_eq!(window(None, 0, 1000), ((0, None), None));
        assert_eq!(window(Some((0, None)), 10, 1000), ((0, Some(1000)), Some(1000)));
        assert_eq!(window(Some((0, Some(1000))), 999, 1000), ((0, Some(1000)), Some(1000)));
        // After the window a new event pushes at once (a trailing push not yet taken is this one).
        assert_eq!(window(Some((0, Some(1000))), 1000, 1000), ((1000, None), None));
        // 100 events 7 ms apart: one now, one trailing at the window's end.
        let burst: Vec<i64> = (0..100).map(|i| i * 7).collect();
        assert_eq!(replay(&burst, 1000), vec![0, 1000]);
        // A steady stream: at most one push per window.
        let stream: Vec<i64> = (0..300).map(|i| i * 10).collect();
        let p = replay(&stream, 1000);
        assert_eq!(p, vec![0, 1000, 2000, 3000]);
        // No window: every event pushes.
        assert_eq!(replay(&[5, 5, 6], 0), vec![5, 5, 6]);
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
