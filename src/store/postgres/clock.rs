//! The node's clock against PostgreSQL's. Every lease deadline the store writes and compares is
//! the calling node's own `now_ms` (compared in SQL with the deadlines other nodes wrote): a
//! node whose clock runs ahead of the others by more than a lease takes back their live leases
//! (the messages go out twice), and one behind them has its own taken back early. The server's
//! `clock_timestamp()` is the one clock every node can see, so each node measures its own
//! against it: at open, and with every health check (which `/ready` polls, so a node whose clock
//! drifts is taken out of the load balancer), in the round trip the health check makes anyway,
//! and before each pass of the sweep, which takes back no lease while the clock is off (leases
//! others hold would look run out to a clock ahead). Leases themselves cost nothing more.
//!
//! Must not: correct the callers' times (the trait's `now_ms` is the caller's to give).

#[cfg(test)]
use std::sync::atomic::AtomicI64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::bounded::Conn;
use crate::store::{StoreError, StoreResult};

/// Largest difference between the node's clock and PostgreSQL's past which the store reports
/// itself not ready. Well under the default lease (`delivery.lease_ms`, 30 s: a quarter of it is
/// 7.5 s) so that a node is taken out long before its clock can take a lease back, and far
/// above what time sync (NTP: milliseconds) leaves, so that a synced node never is. The
/// round trip's own time is never counted as skew (see `skew_ms`).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);

/// The server's clock, in ms since the epoch (one simple-query round trip).
const SERVER_NOW_SQL: &str = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::int8";

/// What the store last found of the node's clock.
#[derive(Default)]
pub(super) struct Clock {
    /// The last check found the clock past [`MAX_CLOCK_SKEW`] (logged once as it turns).
    skewed: AtomicBool,
    /// Added to the node's clock: a test's node whose clock is off.
    #[cfg(test)]
    shift_ms: AtomicI64,
}

impl Clock {
    /// The node's clock as the store's callers read it (ms since the epoch).
    fn now_ms(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        #[cfg(test)]
        let now = now.saturating_add(self.shift_ms.load(Ordering::SeqCst));
        now
    }

    /// Moves this store's view of the node's clock by `ms` (a test's node whose clock is off).
    #[cfg(test)]
    pub(super) fn shift_for_test(&self, ms: i64) {
        self.shift_ms.store(ms, Ordering::SeqCst);
    }

    /// Whether the last check found the node's clock off.
    pub(super) fn is_skewed(&self) -> bool {
        self.skewed.load(Ordering::SeqCst)
    }

    /// Reads the server's clock on `c` and compares it with the node's: `Unavailable`, naming
    /// the skew, when it is past [`MAX_CLOCK_SKEW`] (logged as an error when it becomes so).
    pub(super) async fn check(&self, c: &Conn) -> StoreResult<()> {
        let before = self.now_ms();
        let msgs = c.run(c.simple_query(SERVER_NOW_SQL)).await?;
        let after = self.now_ms();
        let server = msgs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(|| StoreError::Corrupt("postgres: clock_timestamp() gave no time".into()))?;
        let skew = skew_ms(before, after, server);
        let bound = i64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(i64::MAX);
        if skew.unsigned_abs() <= bound.unsigned_abs() {
            if self.skewed.swap(false, Ordering::SeqCst) {
                tracing::info!(
                    skew_ms = skew,
                    "this node's clock is within {bound} ms of PostgreSQL's again"
                );
            }
            return Ok(());
        }
        let why = format!(
            "clock skew: this node's clock is {} ms {} PostgreSQL's (at most {bound} ms allowed): \
             lease deadlines are read on each node's clock, so this node would {}; fix its time \
             sync (NTP)",
            skew.unsigned_abs(),
            if skew > 0 { "ahead of" } else { "behind" },
            if skew > 0 {
                "take back other nodes' live leases"
            } else {
                "have its own leases taken back early"
            },
        );
        if !self.skewed.swap(true, Ordering::SeqCst) {
            tracing::error!(
                skew_ms = skew,
                "{why}; the store reports itself not ready, and this node's sweep takes back no lease"
            );
        }
        Err(StoreError::Unavailable(why))
    }
}

/// How far the node's clock is ahead of the server's (negative: behind), given the node's
/// clock `before` and `after` a round trip in which the server read its clock (`server`): only
/// what the round trip cannot explain (the server's time outside `before..=after`), so a slow
/// link is never taken for a skewed clock.
pub(super) fn skew_ms(before: i64, after: i64, server: i64) -> i64 {
    if server < before {
        before.saturating_sub(server)
    } else if server > after {
        after.saturating_sub(server)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_round_trip_cannot_explain_is_skew() {
        assert_eq!(skew_ms(1_000, 1_500, 1_200), 0);
        assert_eq!(skew_ms(1_000, 1_500, 1_000), 0);
        assert_eq!(skew_ms(1_000, 1_500, 1_500), 0);
        assert_eq!(skew_ms(5_000, 5_010, 1_000), 4_000);
        assert_eq!(skew_ms(1_000, 1_010, 5_010), -4_000);
    }
}
