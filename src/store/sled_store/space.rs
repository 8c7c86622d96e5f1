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
//! readings writes into the reserve, which is why it is one. Refused once under the reserve,
//! new messages are accepted again only over it by an eighth more, so a disk at the edge
//! does not flip at every reading. On a small volume the reserve is at most a quarter of it
//! (said once): 128 MiB of a 100 MiB volume would refuse everything.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use crate::store::{StoreError, StoreResult};

/// The reserve when none is configured (`store.min_free_disk_mib`): room for compaction to
/// copy a whole queue-log segment (64 MiB) and for sled's own segments beside it.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 128 << 20;

/// Not read yet, or unreadable (a temporary store has no directory).
const UNKNOWN: u64 = u64::MAX;

pub(super) struct Space {
    /// Bytes configured to stay free; 0: no reserve.
    configured: u64,
    /// The reserve in force: `configured`, at most a quarter of the volume (set at each
    /// reading).
    reserve: AtomicU64,
    /// The last reading, bytes available ([`UNKNOWN`] before one).
    free: AtomicU64,
    /// Whether new messages are refused (the last reading was under the reserve).
    refusing: AtomicBool,
}

impl Space {
    pub(super) fn new(reserve: u64) -> Space {
        Space {
            configured: reserve,
            reserve: AtomicU64::new(reserve),
            free: AtomicU64::new(UNKNOWN),
            refusing: AtomicBool::new(false),
        }
    }

    /// Reads the space available on the filesystem holding `dir`. A failed reading changes
    /// nothing (the store's own writes will say what is wrong).
    pub(super) fn sample(&self, dir: &Path) {
        // One `statvfs` for the three figures.
        match fs2::statvfs(dir) {
            Ok(st) => {
                // What the process can fill: the volume less the blocks kept for root.
                let kept_for_root = st.free_space().saturating_sub(st.available_space());
                self.size_for(st.total_space().saturating_sub(kept_for_root));
                self.record(st.available_space());
            }
            Err(e) => tracing::debug!(error = %e, "sled: free disk space not read"),
        }
    }

    /// Bounds the reserve to a quarter of a volume of which `fillable` bytes can be written
    /// (read again each time: a volume may grow). Said when the bound changes.
    fn size_for(&self, fillable: u64) {
        let reserve = self.configured.min(fillable / 4);
        let was = self.reserve.swap(reserve, SeqCst);
        if reserve != was && reserve < self.configured {
            tracing::warn!(
                volume_bytes = fillable,
                reserve_bytes = reserve,
                "sled: store.min_free_disk_mib is more than a quarter of the store's volume: the reserve is a quarter of it"
            );
        }
    }

    fn record(&self, free: u64) {
        self.free.store(free, SeqCst);
        let reserve = self.reserve.load(SeqCst);
        let was = self.refusing.load(SeqCst);
        let refuse = if was {
            free < reserve.saturating_add(reserve / 8)
        } else {
            free < reserve
        };
        self.refusing.store(refuse, SeqCst);
        if refuse && !was {
            tracing::error!(
                free_bytes = free,
                reserve_bytes = reserve,
                "sled: free disk space under the reserve (store.min_free_disk_mib): new messages refused (507), pickups and acknowledgements go on"
            );
        } else if was && !refuse {
            tracing::warn!(
                free_bytes = free,
                reserve_bytes = reserve,
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
            self.reserve.load(SeqCst)
        )))
    }

    /// The last reading, if any.
    pub(super) fn free(&self) -> Option<u64> {
        Some(self.free.load(SeqCst)).filter(|f| *f != UNKNOWN)
    }

    pub(super) fn reserve(&self) -> u64 {
        self.reserve.load(SeqCst)
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
        s.record(110);
        assert!(s.check().is_err(), "refused until an eighth over the reserve");
        s.record(112);
        assert!(s.check().is_ok());
        s.record(105);
        assert!(s.check().is_ok(), "accepted down to the reserve itself");
        s.record(1_000);
        assert!(s.check().is_ok());
        assert_eq!(s.free(), Some(1_000));
        let small = Space::new(100);
        small.size_for(200);
        assert_eq!(small.reserve(), 50, "a quarter of a small volume");
        small.record(60);
        assert!(small.check().is_ok());
        small.size_for(1 << 40);
        assert_eq!(small.reserve(), 100);
        let off = Space::new(0);
        off.record(0);
        assert!(off.check().is_ok(), "no reserve: never refused here");
    }
}
