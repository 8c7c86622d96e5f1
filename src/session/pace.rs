//! How long the node waits for a client to take a reply: a client must take its bytes at
//! `limits.min_write_bytes_per_sec` at the least, or its connection is reset. Shared by the
//! WebSocket writer ([`super::wsio`]) and the HTTP watchdog ([`super::watchdog`]).
//!
//! A wait measured from the last progress alone (`limits.ws_write_stall_ms`) is no bound: a
//! client that reads a segment a minute held a reply of megabytes, its socket and (on a
//! WebSocket) its whole session for days.

use std::time::Duration;

/// The pace a client's reads must keep.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// The allowance of any reply, however small (the wait for a client that takes nothing).
    pub base: Duration,
    /// Bytes per second at the least, beyond the base.
    pub min_rate: u64,
}

impl Pace {
    /// How long a reply of `bytes` may take to be taken whole.
    pub fn allowed(&self, bytes: u64) -> Duration {
        self.base + Duration::from_millis(bytes.saturating_mul(1000) / self.min_rate.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_has_the_base_and_its_size_over_the_rate() {
        let p = Pace {
            base: Duration::from_secs(5),
            min_rate: 8192,
        };
        assert_eq!(p.allowed(0), Duration::from_secs(5));
        assert_eq!(p.allowed(8192 * 10), Duration::from_secs(15));
        assert_eq!(p.allowed(4096), Duration::from_millis(5_500));
        // No overflow at the largest sizes.
        assert!(p.allowed(u64::MAX) > Duration::from_secs(1_000_000));
    }
}
