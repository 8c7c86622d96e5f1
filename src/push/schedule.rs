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

/// Parses `Retry-After` as delay-seconds (the form FCM and APNs send) or an HTTP date in any
/// of the three forms RFC 9110 (5.6.7) has recipients accept: IMF-fixdate, and the obsolete
/// RFC 850 and asctime forms a proxy or an old server in front of a webhook may still send.
/// The wait is relative to `now` (Unix seconds); a date in the past is no wait.
pub fn parse_retry_after(v: &str, now_unix_s: u64) -> Option<u64> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(s.saturating_mul(1000));
    }
    let fmt = time::format_description::well_known::Rfc2822;
    let at = match time::OffsetDateTime::parse(v, &fmt) {
        Ok(t) => t.unix_timestamp(),
        Err(_) => obsolete_http_date(v, now_unix_s)?,
    };
    Some((at.max(0) as u64).saturating_sub(now_unix_s).saturating_mul(1000))
}

/// An RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`) or an asctime one (`Sun Nov  6 08:49:37
/// 1994`), as Unix seconds. RFC 850's two-digit year is the latest year ending in those digits
/// that is not more than 50 years after `now` (RFC 9110).
fn obsolete_http_date(v: &str, now_unix_s: u64) -> Option<i64> {
    let parts: Vec<&str> = v.split_ascii_whitespace().collect();
    let (day, month, year, clock) = match parts.as_slice() {
        [weekday, date, clock, "GMT"] if weekday.ends_with(',') => {
            let mut d = date.split('-');
            let (day, month, yy) = (d.next()?, d.next()?, d.next()?);
            if d.next().is_some() || yy.len() != 2 {
                return None;
            }
            let yy: i32 = yy.parse().ok()?;
            let now_year = time::OffsetDateTime::from_unix_timestamp(now_unix_s.min(253_402_300_799) as i64)
                .ok()?
                .year();
            let mut year = now_year - now_year.rem_euclid(100) + yy;
            if year > now_year + 50 {
                year -= 100;
            }
            (day, month, year, *clock)
        }
        [_weekday, month, day, clock, year] => (*day, *month, year.parse().ok()?, *clock),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u8 + 1;
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day.parse().ok()?).ok()?;
    let mut hms = clock.split(':').map(|x| x.parse::<u8>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() {
        return None;
    }
    let time = time::Time::from_hms(h, m, s).ok()?;
    Some(time::PrimitiveDateTime::new(date, time).assume_utc().unix_timestamp())
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
        // The obsolete forms RFC 9110 has recipients accept, the same instant as above.
        assert_eq!(
            parse_retry_after("Tuesday, 15-Nov-94 08:12:31 GMT", 784_887_141),
            Some(10_000)
        );
        assert_eq!(parse_retry_after("Tue Nov 15 08:12:31 1994", 784_887_141), Some(10_000));
        assert_eq!(parse_retry_after("Sat Nov  5 08:12:31 1994", 0), Some(784_023_151_000));
        // RFC 850's two-digit year: at most 50 years ahead of now, else the century before.
        let now_2026 = 1_796_083_200; // 2026-12-01
        assert_eq!(
            parse_retry_after("Monday, 07-Dec-26 00:00:10 GMT", now_2026),
            Some((1_796_601_610 - now_2026) * 1000)
        );
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now_2026), Some(0));
        assert_eq!(parse_retry_after("Sunday, 06-Nov-1994 08:49:37 GMT", 0), None);
        assert_eq!(parse_retry_after("Sun Nov 31 08:49:37 1994", 0), None);
        assert_eq!(parse_retry_after("Sun Nov 6 25:49:37 1994", 0), None);
    }
}
