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
//! Between checks, the node's clock is followed against its monotonic one: a step (an operator's
//! `date`, a VM resumed, NTP stepping) moves the two apart by the step, so the skew the last
//! check measured plus what the clock moved since is known at every call, with no round trip:
//! a node whose clock steps is caught at its next statement. A check runs every
//! [`CLOCK_CHECK_EVERY`] besides (a server whose clock steps, a slow drift). While the skew is
//! past the bound, the statements that judge or write times every node shares by the node's
//! clock (leases, push windows, replay records) answer `Unavailable` as in an outage, and the
//! passes that delete by it (expiry, dedup and replay records, unmediated connections) delete
//! nothing.
//!
//! One time is written in the server's time instead: a message's `received_at_ms`, queued
//! while the skew is past the bound ([`Clock::server_time_of`]). Refusing every forward then
//! would cost availability, and the skew is measured; written as the node read it, a message
//! from a node behind by the TTL would be deleted at once by another node's TTL sweep (lost
//! after a 2xx), and one from a node ahead would hold its dedup record past the window.
//!
//! Must not: correct the callers' other times (the trait's `now_ms` is the caller's to give:
//! what judges or writes by it is refused while skewed, as above).

#[cfg(test)]
use std::sync::atomic::AtomicI64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bounded::Conn;
use crate::store::{StoreError, StoreResult};

/// Largest difference between the node's clock and PostgreSQL's past which the store reports
/// itself not ready. Well under the default lease (`delivery.lease_ms`, 30 s: a quarter of it is
/// 7.5 s) so that a node is taken out long before its clock can take a lease back, and far
/// above what time sync (NTP: milliseconds) leaves, so that a synced node never is. The
/// round trip's own time is never counted as skew (see `skew_ms`).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);

/// How often the store checks its clock against the server's besides its health checks and
/// sweeps (one round trip each): a drift or a step of the server's is found within it.
pub const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The server's clock, in ms since the epoch (one simple-query round trip).
const SERVER_NOW_SQL: &str = "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::int8";

/// What the store last found of the node's clock.
#[derive(Default)]
pub(super) struct Clock {
    /// The last check found the clock past [`MAX_CLOCK_SKEW`] (logged once as it turns).
    skewed: AtomicBool,
    /// The last check that read the server's clock: when (monotonic), the node's clock then,
    /// and the skew it found.
    last: Mutex<Option<(Instant, i64, i64)>>,
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

    /// The node's skew now: the last check's, moved by what the node's clock moved since apart
    /// from the monotonic clock (a step). `None` before any check read the server's clock.
    fn skew_now(&self) -> Option<i64> {
        let (at, wall, skew) = (*self.last.lock().unwrap_or_else(|e| e.into_inner()))?;
        let elapsed = i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX);
        let stepped = self.now_ms().saturating_sub(wall).saturating_sub(elapsed);
        Some(skew.saturating_add(stepped))
    }

    /// Whether the node's clock is off from the server's by more than [`MAX_CLOCK_SKEW`]: as
    /// the last check found it, or since moved there (a step).
    pub(super) fn is_skewed(&self) -> bool {
        self.skew_now().is_some_and(past_bound)
    }

    /// `node_ms`, a time read on the node's clock now, in the server's time while the clock is
    /// past [`MAX_CLOCK_SKEW`] (the node's time less the skew); as given otherwise.
    ///
    /// Only past the bound: within it the store trusts every node's clock as it is (leases and
    /// sweeps are judged by it), so nothing compares finer than the bound and a correction
    /// would buy nothing; a synced node's times, and a caller's fixed ones, are written exactly
    /// as given; and the few milliseconds each check measures on a synced node do not move
    /// every write a little.
    pub(super) fn server_time_of(&self, node_ms: i64) -> i64 {
        match self.skew_now() {
            Some(skew) if past_bound(skew) => node_ms.saturating_sub(skew),
            _ => node_ms,
        }
    }

    /// `Unavailable` while [`Clock::is_skewed`]: what a statement that judges or writes a
    /// time every node shares answers then, as in a store outage (the caller tries later).
    pub(super) fn guard(&self, what: &str) -> StoreResult<()> {
        if !self.is_skewed() {
            return Ok(());
        }
        let skew = self.skew_now().unwrap_or(0);
        Err(StoreError::Unavailable(format!(
            "clock skew: this node's clock is {} ms {} PostgreSQL's (at most {} ms allowed); \
             no {what} by it until its time sync (NTP) is fixed",
            skew.unsigned_abs(),
            if skew > 0 { "ahead of" } else { "behind" },
            MAX_CLOCK_SKEW.as_millis(),
        )))
    }

    /// Reads the server's clock on `c` and compares it with the node's: `Unavailable`, naming
    /// the skew, when it is past [`MAX_CLOCK_SKEW`] (logged as an error when it becomes so).
    pub(super) async fn check(&self, c: &Conn) -> StoreResult<()> {
        let began = Instant::now();
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
        // Followed from the trip's start: a step during the trip puts the server's time inside
        // [before, after] (no skew found), and is seen as the clock moving apart from the
        // monotonic one since `began`.
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((began, before, skew));
        let bound = MAX_CLOCK_SKEW.as_millis();
        if !past_bound(skew) {
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

/// Whether `skew` (ms, either way) is past [`MAX_CLOCK_SKEW`].
fn past_bound(skew: i64) -> bool {
    skew.unsigned_abs() > u64::try_from(MAX_CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX)
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
