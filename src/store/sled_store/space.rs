//! The free-disk reserve: below it, new messages are refused and everything else goes on.
//!
//! Every write of the store takes disk space, acknowledgements too (a removal is a record
//! of the queue log until compaction drops it with its message). On a full disk all writes
//! fail: forwards answer 503, but so do the acknowledgements and pickups that would empty the
//! queue, and the node waits for its operator. With a reserve, forwards are refused first
//! (507, [`StoreError::Full`]) while the disk still has room, so wallets keep picking up and
//! acknowledging, and compaction can copy what is left of a segment and delete it.
//!
//! The reading is the filesystem's space available to the process (`statvfs`), taken by the
//! supervisor every [`super::supervisor`] tick (200 ms) and at open: a burst between two
//! readings writes into the reserve, which is why it is one.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use crate::store::{StoreError, StoreResult};

/// The reserve when none is configured (`store.min_free_disk_mib`): room for compaction to
/// copy a whole queue-log segment (64 MiB) and for sled's own segments beside it.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 128 << 20;

/// Not read yet, or unreadable (a temporary store has no directory).
const UNKNOWN: u64 = u64::MAX;

pub(super) struct Space {
    /// Bytes that must stay free; 0: no reserve.
    reserve: u64,
    /// The last reading, bytes available ([`UNKNOWN`] before one).
    free: AtomicU64,
    /// Whether new messages are refused (the last reading was under the reserve).
    refusing: AtomicBool,
}

impl Space {
    pub(super) fn new(reserve: u64) -> Space {
        Space {
            reserve,
            free: AtomicU64::new(UNKNOWN),
            refusing: AtomicBool::new(false),
        }
    }

    /// Reads the space available on the filesystem holding `dir`. A failed reading changes
    /// nothing (the store's own writes will say what is wrong).
    pub(super) fn sample(&self, dir: &Path) {
        match fs2::available_space(dir) {
            Ok(free) => self.record(free),
            Err(e) => tracing::debug!(error = %e, "sled: free disk space not read"),
        }
    }

    fn record(&self, free: u64) {
        self.free.store(free, SeqCst);
        let refuse = free < self.reserve;
        let was = self.refusing.swap(refuse, SeqCst);
        if refuse && !was {
            tracing::error!(
                free_bytes = free,
                reserve_bytes = self.reserve,
                "sled: free disk space under the reserve (store.min_free_disk_mib): new messages refused (507), pickups and acknowledgements go on"
            );
        } else if was && !refuse {
            tracing::warn!(
                free_bytes = free,
                reserve_bytes = self.reserve,
                "sled: free disk space back over the reserve: new messages accepted again"
            );
        }
    }

    /// `Err(Full)` while the free space is under the reserve.
    pub(super) fn check(&self) -> StoreResult<()> {
        if !self.refusing.load(SeqCst) {
            return Ok(());
        }
        Err(StoreError::Full(format!(
            "{} bytes free on the store's disk, under the reserve of {} (store.min_free_disk_mib)",
            self.free.load(SeqCst),
            self.reserve
        )))
    }

    /// The last reading, if any.
    pub(super) fn free(&self) -> Option<u64> {
        Some(self.free.load(SeqCst)).filter(|f| *f != UNKNOWN)
    }

    pub(super) fn reserve(&self) -> u64 {
        self.reserve
    }

    pub(super) fn refusing(&self) -> bool {
        self.refusing.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_under_the_reserve_only() {
        let s = Space::new(100);
        assert!(s.check().is_ok(), "nothing read yet: nothing refused");
        assert_eq!(s.free(), None);
        s.record(100);
        assert!(s.check().is_ok());
        s.record(99);
        let e = s.check().unwrap_err();
        assert!(
            matches!(e, StoreError::Full(ref m) if m.contains("99 bytes free")),
            "{e}"
        );
        s.record(1_000);
        assert!(s.check().is_ok());
        assert_eq!(s.free(), Some(1_000));
        let off = Space::new(0);
        off.record(0);
        assert!(off.check().is_ok(), "no reserve: never refused here");
    }
}
